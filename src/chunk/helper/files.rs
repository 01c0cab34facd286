//! Files in a session folder as the helpers on a host handle them: listing
//! chunk files, watching copies move, opening without following symlinks,
//! atomic writes, the folder's checks (a real directory, ours, mode 0700),
//! the helper's `lock` and the owner lock as seen from outside, and the
//! removal of stale session folders.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

use crate::chunk::protocol::folder::{parse_chunk_file_name, session_id_of, ChunkFile};
use crate::chunk::protocol::session::OWNER;
use crate::chunk::protocol::{LOCK, MARKER_MAX, PART};
use crate::sys::try_flock;

/// The complete chunk files in `dir`.
pub fn list_chunk_files(dir: &Path) -> Result<Vec<ChunkFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(f) = entry.file_name().to_str().and_then(parse_chunk_file_name) {
            out.push(f);
        }
    }
    out.sort_by_key(|f| (f.index(), matches!(f, ChunkFile::Md5(_))));
    Ok(out)
}

/// Watches the modification times of the chunk files and chunk `.part`
/// files in a folder: chunk servers write `.part` files (in the receiver's
/// folder) and touch the chunks they read (in the sender's) every few MiB,
/// so a helper counts a long copy of one big chunk as progress.
#[derive(Debug, Default)]
pub struct CopyActivity {
    newest: Option<SystemTime>,
}

impl CopyActivity {
    /// True if some chunk file changed since the last call.
    pub fn moved(&mut self, dir: &Path) -> bool {
        let Ok(entries) = fs::read_dir(dir) else {
            return false;
        };
        let newest = entries
            .flatten()
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| {
                    parse_chunk_file_name(n.strip_suffix(PART).unwrap_or(n)).is_some()
                })
            })
            .filter_map(|e| e.metadata().and_then(|m| m.modified()).ok())
            .max();
        if newest > self.newest {
            self.newest = newest;
            return true;
        }
        false
    }
}

/// Indices that have any complete chunk file in `dir` (what the sender
/// counts against its window).
pub fn staged_indices(dir: &Path) -> Result<BTreeSet<u64>> {
    Ok(list_chunk_files(dir)?
        .into_iter()
        .map(ChunkFile::index)
        .collect())
}

/// Opens `dir/name` for reading without following a symlink.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates (or truncates) `path` for writing, mode 0600, not through a symlink.
pub fn create_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads marker `name` in `dir`: None if absent; an error if unreadable,
/// larger than MARKER_MAX or not UTF-8.
pub fn read_marker(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    let f = match open_nofollow(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut buf = Vec::new();
    f.take(MARKER_MAX + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > MARKER_MAX {
        bail!("{} is larger than {MARKER_MAX} bytes", path.display());
    }
    let text = String::from_utf8(buf).map_err(|_| anyhow!("{} is not UTF-8", path.display()))?;
    Ok(Some(text))
}

/// Writes `dir/name` atomically: `name.part`, then rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let part = dir.join(format!("{name}{PART}"));
    let path = dir.join(name);
    let mut f = create_nofollow(&part).with_context(|| format!("creating {}", part.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", part.display()))?;
    drop(f);
    fs::rename(&part, &path).with_context(|| format!("renaming into {}", path.display()))
}

/// Removes `dir/name`; absent is fine.
pub fn remove_if_present(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

pub fn exists_nofollow(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Creates the session folder `dir` (mode 0700) or accepts an existing one
/// that is a real directory, ours, with no group/other bits.
pub fn prepare_session_dir(dir: &Path) -> Result<()> {
    session_id_of(dir)?;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    check_session_dir(dir)
}

/// Checks that `dir` is a real directory (not a symlink), owned by our
/// effective uid, without group/other permissions.
pub fn check_session_dir(dir: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    if !meta.file_type().is_dir() {
        bail!("{} is not a directory (symlink?)", dir.display());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        bail!(
            "{} belongs to uid {}, not to us ({uid})",
            dir.display(),
            meta.uid()
        );
    }
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} has mode {:o}; expected 0700",
            dir.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Lock

/// The `lock` file of a session folder, flocked exclusively while held.
#[derive(Debug)]
pub struct SessionLock {
    _file: File,
}

fn open_lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Takes the session's lock; an error if another process holds it.
pub fn lock_session(dir: &Path) -> Result<SessionLock> {
    let mut file = open_lock(dir)?;
    if !try_flock(&file).with_context(|| format!("locking {}/{LOCK}", dir.display()))? {
        bail!("{} is in use by another helper", dir.display());
    }
    // Our pid, for people and `__chunk-sessions` (the lock is what counts).
    let _ = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(SessionLock { _file: file })
}

/// Whether a live process holds the session's lock.
pub fn is_session_locked(dir: &Path) -> Result<bool> {
    let path = dir.join(LOCK);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    Ok(!try_flock(&file).with_context(|| format!("locking {}", path.display()))?)
}

/// Removes `resync-<id>` folders in `tmpdir` that are ours and whose lock no
/// live helper holds, if they were last modified at least `min_age` ago (a
/// helper being started has created its folder but not yet taken the lock).
/// The lock is held while the folder is removed. Returns what was removed.
pub fn remove_stale_sessions(tmpdir: &Path, min_age: Duration) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = fs::read_dir(tmpdir).with_context(|| format!("listing {}", tmpdir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", tmpdir.display()))?;
        let path = entry.path();
        if session_id_of(&path).is_err() || check_session_dir(&path).is_err() {
            continue;
        }
        let age = fs::symlink_metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO);
        if age < min_age {
            continue;
        }
        let lock = match open_lock(&path) {
            Ok(f) => f,
            Err(_) => continue,
        };
        if !try_flock(&lock).unwrap_or(false) || is_owned(&path) {
            continue;
        }
        fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Opens `dir/name` for locking, O_NOFOLLOW; None if absent and not `create`.
pub fn open_lockfile(dir: &Path, name: &str, create: bool) -> Result<Option<File>> {
    let path = dir.join(name);
    match OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !create => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

/// Whether this process could lock `f` now (errors count as "no").
pub fn try_lock(f: &File) -> bool {
    try_flock(f).unwrap_or(false)
}

/// Up to MARKER_MAX bytes of `f` from its start, as text (empty if not).
pub fn read_all(mut f: &File) -> String {
    let mut s = String::new();
    let _ = f.rewind();
    let _ = f.take(MARKER_MAX).read_to_string(&mut s);
    s
}

/// Whether someone holds `dir/owner`; the holder's text if so.
pub fn owner_of(dir: &Path) -> Option<String> {
    let f = open_lockfile(dir, OWNER, false).ok()??;
    if try_lock(&f) {
        None
    } else {
        Some(read_all(&f))
    }
}

/// Whether a live `__chunk-own` holds the owner lock of `dir` (for the
/// stale-folder cleanup, which must leave owned folders alone).
pub fn is_owned(dir: &Path) -> bool {
    owner_of(dir).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::protocol::{END, PROGRESS};

    /// The owner lock as the listing and the stale cleanup see it.
    #[test]
    fn an_owner_lock_is_seen_while_held() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("resync-0123456789abcdef");
        prepare_session_dir(&dir).unwrap();
        assert!(!is_owned(&dir), "no owner file yet");
        let f = open_lockfile(&dir, OWNER, true).unwrap().unwrap();
        assert!(try_lock(&f));
        // flock is per open file description: a second open sees it held.
        assert!(is_owned(&dir));
        drop(f);
        assert!(!is_owned(&dir));
    }

    #[test]
    fn session_dir_is_created_private_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("resync-0123456789abcdef");
        prepare_session_dir(&dir).unwrap();
        let mode = fs::symlink_metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare_session_dir(&dir).unwrap();
        // A symlink in place of the folder is refused, even to a good folder.
        let link = tmp.path().join("resync-fedcba9876543210");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(prepare_session_dir(&link).is_err());
        // So is a folder others can read.
        let open = tmp.path().join("resync-00000000000000001");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_session_dir(&open).is_err());
        assert!(prepare_session_dir(&tmp.path().join("notasession")).is_err());
        // Markers are not read through symlinks either.
        std::os::unix::fs::symlink("/etc/passwd", dir.join(END)).unwrap();
        assert!(read_marker(&dir, END).is_err());
        assert!(read_marker(&dir, PROGRESS).unwrap().is_none());
        write_atomic(&dir, PROGRESS, b"next 1\nbytes 2\n").unwrap();
        assert_eq!(
            read_marker(&dir, PROGRESS).unwrap().as_deref(),
            Some("next 1\nbytes 2\n")
        );
        assert!(!dir.join("progress.part").exists());
    }

    #[test]
    fn copy_activity_sees_chunk_files_and_parts_move_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut a = CopyActivity::default();
        assert!(!a.moved(d), "an empty folder");
        fs::write(d.join("chunk-000000000001.part"), b"x").unwrap();
        assert!(a.moved(d));
        assert!(!a.moved(d), "nothing changed since");
        let later = SystemTime::now() + Duration::from_secs(5);
        let f = File::options()
            .append(true)
            .open(d.join("chunk-000000000001.part"))
            .unwrap();
        f.set_modified(later).unwrap();
        assert!(a.moved(d), "a .part written to");
        fs::write(d.join(PROGRESS), b"next 1\nbytes 1\n").unwrap();
        let m = File::options().append(true).open(d.join(PROGRESS)).unwrap();
        m.set_modified(later + Duration::from_secs(5)).unwrap();
        assert!(!a.moved(d), "markers do not count");
    }

    #[test]
    fn stale_cleanup_removes_unlocked_folders_only() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("resync-1111111111111111");
        let dead = tmp.path().join("resync-2222222222222222");
        let young = tmp.path().join("resync-3333333333333333");
        let other = tmp.path().join("resync-not-a-session");
        for d in [&live, &dead, &young] {
            prepare_session_dir(d).unwrap();
        }
        fs::create_dir(&other).unwrap();
        let _held = lock_session(&live).unwrap();
        assert!(lock_session(&live).is_err(), "a held lock is exclusive");
        assert!(is_session_locked(&live).unwrap());
        drop(lock_session(&dead).unwrap());
        assert!(!is_session_locked(&dead).unwrap());
        let removed = remove_stale_sessions(tmp.path(), Duration::ZERO).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(live.exists() && other.exists());
        assert!(!dead.exists() && !young.exists());
        // A folder younger than min_age is left alone even when unlocked.
        prepare_session_dir(&young).unwrap();
        assert!(remove_stale_sessions(tmp.path(), Duration::from_secs(3600))
            .unwrap()
            .is_empty());
        assert!(young.exists());
    }
}
