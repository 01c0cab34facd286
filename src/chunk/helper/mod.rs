//! What runs on a host, started by the orchestrator as hidden subcommands
//! of our own binary: [`helper_main`] parses the command line into a
//! [`HelperCommand`] and dispatches it to the sender (`sender.rs`), the
//! receiver (`receiver.rs`), the chunk server (`server.rs`) or the session
//! subcommands (`owner.rs`); this module also holds the steps they share
//! (entering a session folder, logging, the detached start, draining a
//! child's pipe). Files in a session folder are handled in `files.rs`. It
//! depends on `chunk::protocol` and `sys.rs`, never on `chunk::driver`.

pub mod dirfd;
pub mod files;
pub mod owner;
pub mod receiver;
pub mod sender;
pub mod server;

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::chunk::protocol::command::HelperCommand;
use crate::chunk::protocol::{
    EXIT_CANCELLED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, LOG, STALE_MIN_AGE, STDERR_MAX,
};
use files::{lock_session, prepare_session_dir, remove_stale_sessions, SessionLock};

/// Entry point of the hidden helper subcommands: `args` is the whole argv
/// after the program name, starting with the subcommand. Returns the exit
/// code (a usage error is one line on stderr and EXIT_USAGE).
pub fn helper_main(args: &[OsString]) -> i32 {
    let sub = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let result = HelperCommand::parse(args).and_then(run);
    match result {
        Ok(code) => code,
        Err(e) => {
            let who = if sub.is_empty() {
                "resync".into()
            } else {
                format!("resync {sub}")
            };
            eprintln!("{who}: error: {e:#}");
            EXIT_USAGE
        }
    }
}

fn run(cmd: HelperCommand) -> Result<i32> {
    match cmd {
        HelperCommand::Send {
            dir,
            chunk_size,
            window,
            timeout,
            compress,
            argv,
        } => Ok(sender::run(sender::Config {
            dir: dir.into(),
            chunk_size,
            window,
            timeout,
            compress,
            argv: argv.into_iter().map(OsString::from).collect(),
        })),
        HelperCommand::Recv {
            dir,
            timeout,
            framed,
            argv,
        } => Ok(receiver::run(receiver::Config {
            dir: dir.into(),
            timeout,
            framed,
            argv: argv.into_iter().map(OsString::from).collect(),
        })),
        HelperCommand::Start { dir, helper } => start(Path::new(&dir), &helper),
        HelperCommand::Clean { tmpdir, min_age } => {
            let tmpdir = tmpdir.map_or_else(std::env::temp_dir, PathBuf::from);
            for p in remove_stale_sessions(&tmpdir, min_age.unwrap_or(STALE_MIN_AGE))? {
                println!("{}", p.display());
            }
            Ok(EXIT_OK)
        }
        HelperCommand::Serve { dir, timeout } => Ok(server::run(Path::new(&dir), timeout)),
        HelperCommand::Own {
            dir,
            grace,
            info,
            manifest,
        } => owner::own(Path::new(&dir), grace, &info, manifest.as_deref()),
        HelperCommand::Sessions {
            scope,
            remove_dead,
            cancel,
        } => owner::sessions(&scope, remove_dead, cancel),
        HelperCommand::Manifest { dir, manifest } => {
            owner::write_manifest(Path::new(&dir), &manifest)
        }
    }
}

/// `__chunk-start --dir D -- HELPER...`: creates D, starts `resync HELPER...`
/// detached with its log in D, prints its pid.
fn start(dir: &Path, helper: &HelperCommand) -> Result<i32> {
    prepare_session_dir(dir)?;
    // The very image this process runs, even when the file at our path was
    // replaced meanwhile (an upgrade): the helper must speak our protocol.
    let exe = Path::new("/proc/self/exe");
    let args: Vec<OsString> = helper.args().into_iter().map(OsString::from).collect();
    let pid = spawn_detached(exe, &args, &dir.join(LOG))?;
    println!("{pid}");
    Ok(EXIT_OK)
}

/// Starts `program args` in a new session (setsid), stdin /dev/null,
/// stdout/stderr appended to `log_path` (created 0600, not through a
/// symlink), so that it outlives the SSH channel or process that started it.
/// Returns its pid. A thread reaps it if this process lives longer.
pub fn spawn_detached(program: &Path, args: &[OsString], log_path: &Path) -> Result<u32> {
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// Why a helper stopped waiting.
pub enum Stop {
    Timeout,
    Cancelled,
}

impl Stop {
    /// Ends a helper that stopped waiting: its folder goes (the other side
    /// and the orchestrator see it gone), the log says why and what was
    /// killed (`killed`: "zfs send"), and the exit code says which stop.
    pub fn give_up(self, role: &str, dir: &Path, timeout: Duration, killed: &str) -> i32 {
        let (code, why) = match self {
            Stop::Timeout => (
                EXIT_TIMEOUT,
                format!("no progress for {}s: giving up", timeout.as_secs()),
            ),
            Stop::Cancelled => (EXIT_CANCELLED, "cancelled".to_string()),
        };
        let _ = fs::remove_dir_all(dir);
        log(
            role,
            dir,
            &format!("{why}; {killed} killed, folder removed"),
        );
        code
    }
}

/// A helper's first step: create (or check) its session folder and take its
/// lock. On failure it logs why and returns the usage exit code.
pub fn enter_session(who: &str, dir: &Path) -> std::result::Result<SessionLock, i32> {
    let lock = prepare_session_dir(dir)
        .and_then(|()| lock_session(dir))
        .map_err(|e| {
            log(who, dir, &format!("error: {e:#}"));
            EXIT_USAGE
        })?;
    // Folders of helpers that died before cleaning up: ours is locked now,
    // and a folder being created is younger than STALE_MIN_AGE.
    if let Some(tmpdir) = dir.parent() {
        match remove_stale_sessions(tmpdir, STALE_MIN_AGE) {
            Ok(removed) => {
                for p in removed {
                    log(
                        who,
                        dir,
                        &format!("removed stale session folder {}", p.display()),
                    );
                }
            }
            Err(e) => log(who, dir, &format!("cleaning stale session folders: {e:#}")),
        }
    }
    Ok(lock)
}

pub fn log(who: &str, dir: &Path, msg: &str) {
    let id = dir
        .file_name()
        .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
        .unwrap_or_default();
    eprintln!("resync {who} [{id}]: {msg}");
}

/// Reads a child's pipe to the end on a thread, keeping at most STDERR_MAX
/// bytes.
pub fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut kept = Vec::new();
        let Some(mut p) = pipe else { return kept };
        let mut buf = [0u8; 8192];
        loop {
            match p.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = STDERR_MAX.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        kept
    })
}
