//! A session folder opened once (`O_DIRECTORY|O_NOFOLLOW`) and used only
//! through its descriptor: every file in it is opened, stat'ed, renamed and
//! removed with `openat`/`fstatat`/`renameat`/`unlinkat` relative to that
//! descriptor, never by a path that is resolved again. So a folder that is
//! swapped for a symlink (or another directory) after it was opened is not
//! followed: the chunk server keeps working in the folder it checked.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::chunk::protocol::{MARKER_MAX, PART};

/// An open session folder.
#[derive(Debug)]
pub struct DirFd {
    fd: OwnedFd,
    path: PathBuf,
}

fn c_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// What `fstat`/`fstatat` say about a file, as far as we need it.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub nlink: u64,
}

impl Stat {
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }

    fn from(st: &libc::stat) -> Stat {
        Stat {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mode: st.st_mode,
            uid: st.st_uid,
            nlink: st.st_nlink,
        }
    }
}

/// `fstat` of an open descriptor.
pub fn fstat(fd: &impl AsRawFd) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes one struct stat into `st`, which we own.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialized `st`.
    Ok(Stat::from(unsafe { &st.assume_init() }))
}

impl DirFd {
    /// Opens `path` as a directory without following a symlink, and checks
    /// it is ours with no group/other permissions (on the descriptor).
    pub fn open(path: &Path) -> io::Result<DirFd> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: open with a NUL-terminated path we own; the returned
        // descriptor is owned by the OwnedFd below and nowhere else.
        let fd = check(unsafe { libc::open(c.as_ptr(), flags) })?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let d = DirFd {
            fd,
            path: path.to_path_buf(),
        };
        d.check_owner()?;
        Ok(d)
    }

    /// `path/name`, for messages only.
    pub fn show(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    fn check_owner(&self) -> io::Result<()> {
        let st = fstat(&self.fd)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if st.uid != uid || st.mode & 0o077 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to uid {} with mode {:o}; expected ours ({uid}) and 0700",
                    self.path.display(),
                    st.uid,
                    st.mode & 0o777
                ),
            ));
        }
        Ok(())
    }

    /// True once the folder was removed (its helper finished or gave up).
    pub fn removed(&self) -> io::Result<bool> {
        Ok(fstat(&self.fd)?.nlink == 0)
    }

    /// `openat(name)` with `flags` (plus O_NOFOLLOW|O_CLOEXEC), mode 0600
    /// when created.
    pub fn open_file(&self, name: &str, flags: libc::c_int) -> io::Result<File> {
        let c = c_name(name)?;
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: openat on our directory descriptor with a NUL-terminated
        // name; the new descriptor is owned by the File below.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Opens `name` for reading.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        self.open_file(name, libc::O_RDONLY)
    }

    /// `fstatat(name)` without following a symlink; None if absent.
    pub fn stat(&self, name: &str) -> io::Result<Option<Stat>> {
        let c = c_name(name)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstatat writes one struct stat into `st`, which we own.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match check(rc) {
            // SAFETY: fstatat succeeded, so it initialized `st`.
            Ok(_) => Ok(Some(Stat::from(unsafe { &st.assume_init() }))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `renameat(from, to)` inside the folder.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (c_name(from)?, c_name(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: renameat with our descriptor and two NUL-terminated names.
        check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) }).map(drop)
    }

    /// `unlinkat(name)`; absent is fine.
    pub fn remove_if_present(&self, name: &str) -> Result<()> {
        let c = c_name(name)?;
        // SAFETY: unlinkat with our descriptor and a NUL-terminated name.
        match check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.show(name))),
        }
    }

    /// Writes `name` atomically: `name.part`, then rename.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let part = format!("{name}{PART}");
        let mut f = self
            .open_file(&part, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
            .with_context(|| format!("creating {}", self.show(&part)))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", self.show(&part)))?;
        drop(f);
        self.rename(&part, name)
            .with_context(|| format!("renaming into {}", self.show(name)))
    }

    /// Reads marker `name`: None if absent; an error if unreadable, larger
    /// than MARKER_MAX or not UTF-8.
    pub fn read_marker(&self, name: &str) -> Result<Option<String>> {
        let f = match self.open_read(name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.show(name))),
        };
        let mut buf = Vec::new();
        f.take(MARKER_MAX + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", self.show(name)))?;
        if buf.len() as u64 > MARKER_MAX {
            bail!("{} is larger than {MARKER_MAX} bytes", self.show(name));
        }
        let text =
            String::from_utf8(buf).map_err(|_| anyhow!("{} is not UTF-8", self.show(name)))?;
        Ok(Some(text))
    }

    /// The names in the folder (UTF-8 ones; `.` and `..` left out).
    pub fn names(&self) -> Result<Vec<String>> {
        let listing = || -> io::Result<Vec<String>> {
            // SAFETY: dup of our descriptor; fdopendir takes ownership of the
            // copy, and closedir below releases it.
            let dup = check(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
            // SAFETY: `dup` is a valid directory descriptor we own.
            let dir = unsafe { libc::fdopendir(dup) };
            if dir.is_null() {
                let e = io::Error::last_os_error();
                // SAFETY: fdopendir failed, so `dup` is still ours to close.
                unsafe { libc::close(dup) };
                return Err(e);
            }
            // A duplicate shares the offset: start from the beginning.
            // SAFETY: `dir` is a valid DIR stream.
            unsafe { libc::rewinddir(dir) };
            let mut names = Vec::new();
            let result = loop {
                // SAFETY: readdir on a valid DIR stream; errno tells an
                // error apart from the end.
                unsafe { *libc::__errno_location() = 0 };
                // SAFETY: as above.
                let ent = unsafe { libc::readdir(dir) };
                if ent.is_null() {
                    let e = io::Error::last_os_error();
                    break match e.raw_os_error() {
                        Some(0) | None => Ok(()),
                        Some(_) => Err(e),
                    };
                }
                // SAFETY: d_name of a dirent readdir returned is a
                // NUL-terminated string valid until the next readdir.
                let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
                if let Ok(n) = name.to_str() {
                    if n != "." && n != ".." {
                        names.push(n.to_string());
                    }
                }
            };
            // SAFETY: closes the stream (and `dup`) exactly once.
            unsafe { libc::closedir(dir) };
            result.map(|()| names)
        };
        listing().with_context(|| format!("listing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::helper::files::prepare_session_dir;
    use std::fs;

    #[test]
    fn a_folder_swapped_for_a_symlink_after_open_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("resync-0123456789abcdef");
        prepare_session_dir(&dir).unwrap();
        let d = DirFd::open(&dir).unwrap();
        // Someone moves the folder away and puts a symlink to a folder of
        // their choosing in its place.
        let moved = tmp.path().join("moved");
        let elsewhere = tmp.path().join("elsewhere");
        fs::rename(&dir, &moved).unwrap();
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        d.write_atomic("end", b"chunks 0\n").unwrap();
        assert_eq!(fs::read(moved.join("end")).unwrap(), b"chunks 0\n");
        assert!(!elsewhere.join("end").exists(), "followed the symlink");
        assert_eq!(d.names().unwrap(), vec!["end".to_string()]);
        assert_eq!(d.read_marker("end").unwrap().as_deref(), Some("chunks 0\n"));
        d.remove_if_present("end").unwrap();
        assert!(!moved.join("end").exists());
        // A symlink to a folder is refused at open.
        assert!(DirFd::open(&dir).is_err());
        // Names are plain names, never paths.
        assert!(d.open_read("../moved/end").is_err());
        // A folder removed under us says so.
        fs::remove_dir_all(&moved).unwrap();
        assert!(d.removed().unwrap());
    }

    #[test]
    fn a_folder_open_to_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("resync-0123456789abcdef");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(DirFd::open(&dir).is_err());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(DirFd::open(&dir).is_ok());
    }
}
