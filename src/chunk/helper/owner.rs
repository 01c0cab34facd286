//! The session subcommands on a host (see `protocol/session.rs` for the
//! files and the order of creation): `__chunk-own` holds the owner lock of
//! a receiver's folder for a live orchestrator, `__chunk-sessions` lists,
//! cancels and removes dead session folders, `__chunk-manifest` writes a
//! sender folder's manifest.

use std::fs;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::files::{
    check_session_dir, is_session_locked, open_lockfile, owner_of, prepare_session_dir, read_all,
    read_marker, try_lock, write_atomic,
};
use crate::chunk::protocol::command::Scope;
use crate::chunk::protocol::folder::session_id_of;
use crate::chunk::protocol::session::{
    render_found, Manifest, Owner, Role, EXIT_HELD, MANIFEST, OWNER, OWNER_GRACE,
};
use crate::chunk::protocol::{CANCEL, EXIT_OK, LOCK};

/// How long `__chunk-own` waits for an older holder of the same nonce to go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// `__chunk-manifest --dir D --manifest TEXT`: creates D, writes `session`.
pub fn write_manifest(dir: &Path, text: &str) -> Result<i32> {
    Manifest::parse(text)?;
    prepare_session_dir(dir)?;
    write_atomic(dir, MANIFEST, text.as_bytes())?;
    Ok(EXIT_OK)
}

/// `__chunk-own`: see the module doc.
pub fn own(dir: &Path, grace: Option<Duration>, info: &str, manifest: Option<&str>) -> Result<i32> {
    let grace = grace.unwrap_or(OWNER_GRACE);
    let info = Owner::parse(info)?;
    if let Some(m) = manifest {
        Manifest::parse(m)?;
        prepare_session_dir(dir)?;
    } else if check_session_dir(dir).is_err() || read_marker(dir, MANIFEST)?.is_none() {
        println!("gone");
        return Ok(EXIT_OK);
    }
    let Some(mut file) = open_lockfile(dir, OWNER, true)? else {
        bail!("cannot create {}/{OWNER}", dir.display());
    };
    if !try_lock(&file) {
        let holder = Owner::parse(&read_all(&file));
        let ours = holder.as_ref().is_ok_and(|h| h.nonce == info.nonce);
        let mut locked = false;
        if let (true, Ok(h)) = (ours, &holder) {
            // Our own older `__chunk-own`, on a connection that died.
            if h.holder > 1 {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(h.holder as libc::pid_t, libc::SIGTERM) };
            }
            let deadline = Instant::now() + TAKEOVER_WAIT;
            while !locked && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
                locked = try_lock(&file);
            }
        }
        if !locked {
            print!("held\n{}", read_all(&file));
            io::stdout().flush().ok();
            return Ok(EXIT_HELD);
        }
    }
    let me = Owner {
        holder: std::process::id(),
        ..info
    };
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(me.render().as_bytes()))
        .with_context(|| format!("writing {}/{OWNER}", dir.display()))?;
    if let Some(m) = manifest {
        write_atomic(dir, MANIFEST, m.as_bytes())?;
    }
    println!("ok");
    io::stdout().flush().ok();
    // Hold the lock until stdin ends or the heartbeat stops.
    let mut last = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if rc > 0 {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return Ok(EXIT_OK);
            }
            last = Instant::now();
        }
        if last.elapsed() > grace || !dir.exists() {
            return Ok(EXIT_OK);
        }
    }
}

/// `__chunk-sessions`: see the module doc.
pub fn sessions(scope: &Scope, remove_dead: bool, cancel: bool) -> Result<i32> {
    let mut out = io::stdout().lock();
    let (dirs, target): (Vec<PathBuf>, Option<&String>) = match scope {
        Scope::Dir(d) => (vec![PathBuf::from(d)], None),
        Scope::Tmpdir { tmpdir: t, target } => (
            match fs::read_dir(t) {
                Ok(rd) => rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| session_id_of(p).is_ok())
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e).with_context(|| format!("listing {t}")),
            },
            target.as_ref(),
        ),
    };
    let listing_tmpdir = matches!(scope, Scope::Tmpdir { .. });
    for dir in dirs {
        if check_session_dir(&dir).is_err() {
            continue;
        }
        let manifest = read_marker(&dir, MANIFEST).ok().flatten();
        let parsed = manifest.as_deref().and_then(|m| Manifest::parse(m).ok());
        if listing_tmpdir {
            // Only folders that say what they are, and name the target.
            let Some(m) = &parsed else { continue };
            if target.is_some_and(|t| *t != m.identity.target) {
                continue;
            }
        }
        if cancel {
            write_atomic(&dir, CANCEL, b"cancel\n")?;
        }
        let alive = is_session_locked(&dir).unwrap_or(true);
        let owner = owner_of(&dir);
        let pid = fs::read_to_string(dir.join(LOCK))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let age = fs::symlink_metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0, |d| d.as_secs());
        let Some(d) = dir.to_str() else { continue };
        out.write_all(&render_found(
            d,
            alive,
            pid,
            age,
            manifest.as_deref(),
            owner.as_deref(),
        ))?;
        // Listing a tmpdir, only receiver folders are removed: their owner
        // lock is taken before their manifest is written, while a sender's
        // folder has a manifest a moment before its helper locks it.
        let removable =
            !listing_tmpdir || parsed.as_ref().is_some_and(|m| m.role == Role::Receiver);
        if remove_dead && removable && !alive && owner.is_none() && remove_dead_folder(&dir)? {
            writeln!(out, "R {d}")?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// Removes a folder whose helper and owner locks are free, holding both
/// while it does; false if someone took one meanwhile.
fn remove_dead_folder(dir: &Path) -> Result<bool> {
    let owner = open_lockfile(dir, OWNER, true)?;
    let lock = open_lockfile(dir, LOCK, true)?;
    let (Some(owner), Some(lock)) = (owner, lock) else {
        return Ok(false);
    };
    if !try_lock(&owner) || !try_lock(&lock) {
        return Ok(false);
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}
