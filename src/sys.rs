//! Small operating-system services that several layers need, written once:
//! this machine's host name, whether we run as root, a non-blocking `flock`, the MD5 of a file, lower
//! case hex, reading one line from a pipe without reading past it,
//! recovery from a poisoned lock, and the child-process plumbing of our
//! own stream filters (`__encode`/`__decode`, `__listen`/`__connect`). Each is a thin, documented wrapper: errors
//! are returned to the caller rather than replaced by a default, and every
//! `unsafe` block carries its SAFETY note.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};

/// This machine's host name as the kernel reports it (unsanitized, trimmed).
pub fn hostname() -> io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf, which we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the host name is empty",
        ));
    }
    Ok(name)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Tries to take an exclusive `flock` on `file` without waiting: `Ok(true)`
/// when taken, `Ok(false)` when another open file description holds it, and
/// an error for anything else (a file system without locks, a bad descriptor).
pub fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid descriptor that `file` owns for this call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Lower case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// MD5 of everything `reader` yields, and how many bytes that was.
pub fn md5_reader(reader: &mut dyn Read) -> io::Result<([u8; 16], u64)> {
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

/// Lower case hex MD5 of the file at `path`.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open {} to hash it", path.display()))?;
    let (digest, _) =
        md5_reader(&mut file).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&digest))
}

/// Reads one `\n`-terminated line of at most `max` bytes, one byte at a time,
/// so that the reader is left exactly at the first byte after it (the rest of
/// a pipe belongs to someone else). `Ok(None)` at end of input before any
/// newline; an error when the line is longer than `max`.
pub fn read_line_exact(reader: &mut dyn Read, max: usize) -> Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match reader.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into())),
            Ok(_) if line.len() >= max => bail!(
                "a line longer than {max} bytes: {:?}...",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Locks that keep working after a thread panicked while holding them. A
/// poisoned lock here guards plain data (a cached handle, counters) that is
/// never left half-written, so the value is taken as it is.
pub trait Unpoisoned<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Unpoisoned<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Read and write access to an `RwLock`, with the same poison recovery.
pub trait UnpoisonedRw<T> {
    fn read_now(&self) -> RwLockReadGuard<'_, T>;
    fn write_now(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> UnpoisonedRw<T> for RwLock<T> {
    fn read_now(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write_now(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A child's exit as a filter passes it on: its code, `128 + signal`, or 1.
pub fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code()
        .or_else(|| s.signal().map(|n| 128 + n))
        .unwrap_or(1)
}

/// Starts argv (a `zfs send`/`receive` a filter wraps) with the given
/// stdin and stdout; its stderr is ours.
pub fn spawn_filtered(
    argv: &[String],
    stdin: std::process::Stdio,
    stdout: std::process::Stdio,
) -> Result<std::process::Child> {
    let Some(program) = argv.first() else {
        bail!("empty command line");
    };
    std::process::Command::new(program)
        .args(&argv[1..])
        .stdin(stdin)
        .stdout(stdout)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {program:?}"))
}

/// Kills a child and reaps it (best effort).
pub fn stop(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hex_is_lower_case_and_two_digits_per_byte() {
        assert_eq!(hex(&[0, 1, 0xab, 0xff]), "0001abff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn md5_of_a_file_matches_the_known_digest() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"The quick brown fox jumps over the lazy dog")
            .unwrap();
        assert_eq!(
            md5_file(f.path()).unwrap(),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        assert!(md5_file(Path::new("/nonexistent/resync-sys-test")).is_err());
    }

    #[test]
    fn a_line_is_read_without_consuming_what_follows() {
        let mut input: &[u8] = b"123 456\nrest of the stream";
        let line = read_line_exact(&mut input, 64).unwrap();
        assert_eq!(line.as_deref(), Some("123 456"));
        assert_eq!(input, b"rest of the stream");
        let mut empty: &[u8] = b"no newline";
        assert_eq!(read_line_exact(&mut empty, 64).unwrap(), None);
        let mut long: &[u8] = b"0123456789\n";
        assert!(read_line_exact(&mut long, 4).is_err());
    }

    #[test]
    fn flock_is_exclusive_between_open_file_descriptions() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(f.path()).unwrap();
        let b = File::open(f.path()).unwrap();
        assert!(try_flock(&a).unwrap());
        assert!(!try_flock(&b).unwrap());
        drop(a);
        assert!(try_flock(&b).unwrap());
    }

    #[test]
    fn a_poisoned_mutex_still_hands_out_its_value() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), 7);
    }

    #[test]
    fn the_host_name_is_not_empty() {
        assert!(!hostname().unwrap().is_empty());
    }
}
