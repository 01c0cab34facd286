//! The chunk server (`resync __chunk-serve --dir D --timeout SECS`): the
//! orchestrator's long-lived window into one session folder on this host.
//! It speaks the framed protocol of `protocol/frames.rs` ("Serve protocol"
//! in the package doc) over its stdin/stdout: list the folder after
//! applying deletions and marker writes, stream a chunk from a byte offset,
//! write a chunk from the byte offset its `.part` file has reached. It
//! trusts no client: every frame is bounded and checked, and a malformed
//! one ends the conversation with an error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::RawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::files::{
    check_session_dir, exists_nofollow, open_nofollow, read_marker, remove_if_present, write_atomic,
};
use super::log;
use crate::chunk::protocol::folder::{chunk_name, md5_name, parse_chunk_file_name, ChunkFile};
use crate::chunk::protocol::frames::{
    decode_ops, kind, push_name, read_frame, write_frame, Fields, Op, DATA_MAX, ERR_NO_SPACE,
    ERR_OTHER, ERR_TEXT_MAX, FRAME_MAX, HELLO_TEXT, LISTED_MARKERS, MD5_TEXT_MAX,
};
use crate::chunk::protocol::{CHUNK_SIZE_MAX, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, PART};

/// A reader touches the chunk it streams every this many bytes, so that the
/// sender helper sees a long copy as progress.
const TOUCH_EVERY: u64 = 8 << 20;

/// Runs the server on stdin/stdout until the client closes stdin, or
/// nothing moves on either for `timeout`; returns the exit code.
pub fn run(dir: &Path, timeout: Duration) -> i32 {
    let input = TimedFd { fd: 0, timeout };
    let output = TimedFd { fd: 1, timeout };
    let mut r = BufReader::with_capacity(DATA_MAX + 5, input);
    let mut w = BufWriter::with_capacity(DATA_MAX + 5, output);
    match serve(dir, &mut r, &mut w) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            log("serve", dir, &format!("error: {e:#}"));
            if is_timeout(&e) {
                EXIT_TIMEOUT
            } else {
                EXIT_USAGE
            }
        }
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
    })
}

/// A pipe end whose reads and writes give up (TimedOut) after `timeout`
/// without readiness: a client that vanished behind a dead link must not
/// keep a server alive for hours.
struct TimedFd {
    fd: RawFd,
    timeout: Duration,
}

impl TimedFd {
    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        let ms = libc::c_int::try_from(self.timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            let mut p = libc::pollfd {
                fd: self.fd,
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut p, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no activity for {}s", self.timeout.as_secs()),
                ));
            }
            return Ok(());
        }
    }
}

impl Read for TimedFd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.wait(libc::POLLIN)?;
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for TimedFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wait(libc::POLLOUT)?;
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::write(self.fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server loop: HELLO, then one reply per request until end of input.
pub fn serve(dir: &Path, r: &mut impl Read, w: &mut impl Write) -> Result<()> {
    let mut buf = Vec::new();
    write_frame(w, kind::HELLO, HELLO_TEXT)?;
    w.flush()?;
    while let Some(k) = read_frame(r, &mut buf, FRAME_MAX)? {
        match k {
            kind::POLL => {
                let ops = decode_ops(&buf)?;
                match poll(dir, &ops) {
                    Ok(entries) => {
                        for (k, payload) in entries {
                            write_frame(w, k, &payload)?;
                        }
                    }
                    Err(e) => reply_err(w, &e)?,
                }
            }
            kind::READ => {
                let mut f = Fields::new(&buf);
                let (index, offset) = (f.u64()?, f.u64()?);
                f.end()?;
                read_chunk(dir, index, offset, w, &mut buf)?;
            }
            kind::WRITE => {
                let mut f = Fields::new(&buf);
                let (index, total) = (f.u64()?, f.u64()?);
                let md5 = f.rest().to_vec();
                if md5.len() > MD5_TEXT_MAX || total > CHUNK_SIZE_MAX {
                    bail!("invalid write request for chunk {index}");
                }
                write_chunk(dir, index, total, &md5, r, w, &mut buf)?;
            }
            other => bail!("unexpected request {:?}", other as char),
        }
        w.flush()?;
    }
    Ok(())
}

/// An ERR frame for `e`, marked "no space" when the disk is full.
pub fn reply_err(w: &mut impl Write, e: &anyhow::Error) -> io::Result<()> {
    let class = if is_no_space(e) {
        ERR_NO_SPACE
    } else {
        ERR_OTHER
    };
    let mut payload = vec![class];
    let text = format!("{e:#}");
    payload.extend_from_slice(&text.as_bytes()[..text.len().min(ERR_TEXT_MAX)]);
    write_frame(w, kind::ERR, &payload)
}

fn is_no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|n| n == libc::ENOSPC || n == libc::EDQUOT)
    })
}

/// Applies `ops` in `dir`, then lists it as frames.
fn poll(dir: &Path, ops: &[Op]) -> Result<Vec<(u8, Vec<u8>)>> {
    if !exists_nofollow(dir) {
        return Ok(vec![(kind::GONE, Vec::new())]);
    }
    check_session_dir(dir)?;
    for op in ops {
        match op {
            Op::Rm(name) => remove_if_present(dir, name)?,
            Op::Put(name, text) => write_atomic(dir, name, text.as_bytes())?,
        }
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let (part, base) = match name.strip_suffix(PART) {
            Some(b) => (true, b),
            None => (false, name.as_str()),
        };
        let Some(file) = parse_chunk_file_name(base) else {
            continue;
        };
        // Files may vanish while we list: skip those.
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        let mut p = file.index().to_be_bytes().to_vec();
        match (file, part) {
            (ChunkFile::Data(_), false) => {
                p.extend_from_slice(&meta.len().to_be_bytes());
                out.push((kind::CHUNK, p));
            }
            (ChunkFile::Data(_), true) => {
                p.extend_from_slice(&meta.len().to_be_bytes());
                out.push((kind::PART, p));
            }
            (ChunkFile::Md5(_), false) => {
                let Ok(f) = open_nofollow(&entry.path()) else {
                    continue;
                };
                let mut text = Vec::new();
                if f.take(MD5_TEXT_MAX as u64).read_to_end(&mut text).is_err() {
                    continue;
                }
                p.extend_from_slice(&text);
                out.push((kind::MD5, p));
            }
            (ChunkFile::Md5(_), true) => {}
        }
    }
    for name in LISTED_MARKERS {
        // An unreadable marker is listed empty: its parser then says why.
        let text = match read_marker(dir, name) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(_) => String::new(),
        };
        let mut p = Vec::new();
        push_name(&mut p, name);
        p.extend_from_slice(text.as_bytes());
        out.push((kind::MARKER, p));
    }
    out.push((kind::LIST_END, Vec::new()));
    Ok(out)
}

/// READ: streams chunk `index` from `offset` as DATA frames, then DONE with
/// the byte count; ERR instead if it cannot be read.
fn read_chunk(
    dir: &Path,
    index: u64,
    offset: u64,
    w: &mut impl Write,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let path = dir.join(chunk_name(index));
    let opened = open_nofollow(&path)
        .with_context(|| format!("opening {}", path.display()))
        .and_then(|mut f| {
            let size = f.metadata()?.len();
            if offset > size {
                bail!(
                    "offset {offset} is past the end of {} ({size} bytes)",
                    path.display()
                );
            }
            f.seek(SeekFrom::Start(offset))?;
            Ok(f)
        });
    let mut file = match opened {
        Ok(f) => f,
        Err(e) => return Ok(reply_err(w, &e)?),
    };
    let mut sent = 0u64;
    buf.clear();
    buf.resize(DATA_MAX, 0);
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("reading {}", path.display()));
                return Ok(reply_err(w, &e)?);
            }
        };
        write_frame(w, kind::DATA, &buf[..n])?;
        sent += n as u64;
        if sent % TOUCH_EVERY < n as u64 {
            // The sender helper sees a long copy as progress (mod.rs).
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }
    write_frame(w, kind::DONE, &sent.to_be_bytes())?;
    Ok(())
}

/// Where a write starts.
enum Start {
    /// Data and `.md5` are there already: accept nothing, change nothing.
    Complete,
    /// The data file is complete; only its `.md5` is missing.
    Md5Only,
    /// Append to the `.part` file, from its size.
    Part(File),
}

/// WRITE: replies OFFSET (the size its `.part` file has), takes DATA frames
/// up to DONE, writing each at its byte offset; when the file is complete,
/// renames it into place and writes the `.md5` last; replies OK or ERR.
fn write_chunk(
    dir: &Path,
    index: u64,
    total: u64,
    md5: &[u8],
    r: &mut impl Read,
    w: &mut impl Write,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let data = dir.join(chunk_name(index));
    let part = dir.join(format!("{}{PART}", chunk_name(index)));
    let size_of = |p: &Path| fs::symlink_metadata(p).ok().map(|m| m.len());
    let started = (|| -> Result<(Start, u64)> {
        check_session_dir(dir)?;
        if size_of(&data) == Some(total) {
            if exists_nofollow(&dir.join(md5_name(index))) {
                return Ok((Start::Complete, total));
            }
            return Ok((Start::Md5Only, total));
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        let mut size = f.metadata()?.len();
        if size > total {
            f.set_len(0)
                .with_context(|| format!("truncating {}", part.display()))?;
            size = 0;
        }
        Ok((Start::Part(f), size))
    })();
    let (start, offset) = match started {
        Ok(s) => s,
        Err(e) => return Ok(reply_err(w, &e)?),
    };
    write_frame(w, kind::OFFSET, &offset.to_be_bytes())?;
    w.flush()?;
    // Take DATA up to DONE; after a failed write keep reading (and
    // dropping) until DONE, then report the failure.
    let mut pos = offset;
    let mut failed: Option<anyhow::Error> = None;
    loop {
        match read_frame(r, buf, DATA_MAX)? {
            Some(kind::DATA) => {
                let n = buf.len() as u64;
                if failed.is_none() {
                    if pos + n > total {
                        failed = Some(anyhow!("chunk {index}: more than {total} bytes sent"));
                    } else if let Start::Part(f) = &start {
                        if let Err(e) = f.write_all_at(buf, pos) {
                            failed = Some(
                                anyhow::Error::new(e)
                                    .context(format!("writing {}", part.display())),
                            );
                        }
                    } else {
                        failed = Some(anyhow!("chunk {index} is complete already"));
                    }
                }
                pos += n;
            }
            Some(kind::SYNC) => {
                match &failed {
                    Some(e) => reply_err(w, e)?,
                    None => write_frame(w, kind::ACK, &pos.to_be_bytes())?,
                }
                w.flush()?;
            }
            Some(kind::DONE) => break,
            Some(other) => bail!("unexpected frame {:?} inside a write", other as char),
            None => bail!("the client went away inside a write of chunk {index}"),
        }
    }
    let finished = match failed {
        Some(e) => Err(e),
        None if pos != total => Err(anyhow!(
            "chunk {index}: {pos} of {total} bytes arrived before the end"
        )),
        None => match start {
            Start::Complete => Ok(()),
            Start::Md5Only => write_atomic(dir, &md5_name(index), md5),
            Start::Part(f) => finish_part(dir, index, total, &f, &part, &data, md5),
        },
    };
    match finished {
        Ok(()) => write_frame(w, kind::OK, &total.to_be_bytes())?,
        Err(e) => reply_err(w, &e)?,
    }
    Ok(())
}

/// A complete `.part`: rename it into place (only if the name still is our
/// file: a stale writer must not rename someone else's), then the `.md5`.
fn finish_part(
    dir: &Path,
    index: u64,
    total: u64,
    f: &File,
    part: &Path,
    data: &Path,
    md5: &[u8],
) -> Result<()> {
    let ours = f.metadata()?;
    if ours.len() != total {
        bail!(
            "{} has {} bytes, expected {total}",
            part.display(),
            ours.len()
        );
    }
    let named =
        fs::symlink_metadata(part).with_context(|| format!("checking {}", part.display()))?;
    if (named.dev(), named.ino()) != (ours.dev(), ours.ino()) {
        bail!("{} was replaced while we wrote it", part.display());
    }
    fs::rename(part, data).with_context(|| format!("renaming {}", part.display()))?;
    write_atomic(dir, &md5_name(index), md5)
}
