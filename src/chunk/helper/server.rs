//! The chunk server (`resync __chunk-serve --dir D --timeout SECS`): the
//! orchestrator's long-lived window into one session folder on this host.
//! It speaks the framed protocol of `protocol/frames.rs` ("Serve protocol"
//! in the package doc) over its stdin/stdout: list the folder after
//! applying deletions and marker writes, stream a chunk from a byte offset,
//! write a chunk from the byte offset its `.part` file has reached. It
//! trusts no client: every frame is bounded and checked, and a malformed
//! one ends the conversation with an error. The folder is opened once and
//! used through its descriptor only (`dirfd.rs`), so swapping it for a
//! symlink after it was checked leads nowhere.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::dirfd::{fstat, DirFd};
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
    let mut folder = Served::new(dir);
    write_frame(w, kind::HELLO, HELLO_TEXT)?;
    w.flush()?;
    while let Some(k) = read_frame(r, &mut buf, FRAME_MAX)? {
        match k {
            kind::POLL => {
                let ops = decode_ops(&buf)?;
                match poll(&mut folder, &ops) {
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
                read_chunk(&mut folder, index, offset, w, &mut buf)?;
            }
            kind::WRITE => {
                let mut f = Fields::new(&buf);
                let (index, total) = (f.u64()?, f.u64()?);
                let md5 = f.rest().to_vec();
                if md5.len() > MD5_TEXT_MAX || total > CHUNK_SIZE_MAX {
                    bail!("invalid write request for chunk {index}");
                }
                write_chunk(&mut folder, index, total, &md5, r, w, &mut buf)?;
            }
            other => bail!("unexpected request {:?}", other as char),
        }
        w.flush()?;
    }
    Ok(())
}

/// The session folder this server serves: opened once, on the first
/// request that finds it (the server may start before its helper created
/// it), and from then on used only through its descriptor (`dirfd.rs`).
struct Served {
    path: PathBuf,
    open: Option<DirFd>,
}

impl Served {
    fn new(path: &Path) -> Served {
        Served {
            path: path.to_path_buf(),
            open: None,
        }
    }

    /// The open folder; None while it does not exist yet, or once it was
    /// removed.
    fn get(&mut self) -> Result<Option<&DirFd>> {
        if self.open.is_none() {
            match DirFd::open(&self.path) {
                Ok(d) => self.open = Some(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "opening {} (a real directory of ours, mode 0700)",
                            self.path.display()
                        )
                    })
                }
            }
        }
        match &self.open {
            Some(d) if d.removed()? => Ok(None),
            other => Ok(other.as_ref()),
        }
    }

    /// The open folder, or an error naming it when it is not there.
    fn need(&mut self) -> Result<&DirFd> {
        let path = self.path.display().to_string();
        self.get()?.ok_or_else(|| anyhow!("{path} does not exist"))
    }
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

/// Applies `ops` in the folder, then lists it as frames.
fn poll(folder: &mut Served, ops: &[Op]) -> Result<Vec<(u8, Vec<u8>)>> {
    let Some(dir) = folder.get()? else {
        return Ok(vec![(kind::GONE, Vec::new())]);
    };
    for op in ops {
        match op {
            Op::Rm(name) => dir.remove_if_present(name)?,
            Op::Put(name, text) => dir.write_atomic(name, text.as_bytes())?,
        }
    }
    let mut out = Vec::new();
    for name in dir.names()? {
        let (part, base) = match name.strip_suffix(PART) {
            Some(b) => (true, b),
            None => (false, name.as_str()),
        };
        let Some(file) = parse_chunk_file_name(base) else {
            continue;
        };
        // Files may vanish while we list: skip those.
        let Ok(Some(meta)) = dir.stat(&name) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mut p = file.index().to_be_bytes().to_vec();
        match (file, part) {
            (ChunkFile::Data(_), false) => {
                p.extend_from_slice(&meta.size.to_be_bytes());
                out.push((kind::CHUNK, p));
            }
            (ChunkFile::Data(_), true) => {
                p.extend_from_slice(&meta.size.to_be_bytes());
                out.push((kind::PART, p));
            }
            (ChunkFile::Md5(_), false) => {
                let Ok(f) = dir.open_read(&name) else {
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
        let text = match dir.read_marker(name) {
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
    folder: &mut Served,
    index: u64,
    offset: u64,
    w: &mut impl Write,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let name = chunk_name(index);
    let path = folder.path.join(&name);
    let opened = folder
        .need()
        .and_then(|dir| {
            dir.open_read(&name)
                .with_context(|| format!("opening {}", path.display()))
        })
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
    folder: &mut Served,
    index: u64,
    total: u64,
    md5: &[u8],
    r: &mut impl Read,
    w: &mut impl Write,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let (data, part) = (chunk_name(index), format!("{}{PART}", chunk_name(index)));
    let dir = match folder.need() {
        Ok(d) => d,
        Err(e) => return Ok(reply_err(w, &e)?),
    };
    let started = (|| -> Result<(Start, u64)> {
        if dir.stat(&data)?.map(|m| m.size) == Some(total) {
            if dir.stat(&md5_name(index))?.is_some() {
                return Ok((Start::Complete, total));
            }
            return Ok((Start::Md5Only, total));
        }
        let f = dir
            .open_file(&part, libc::O_WRONLY | libc::O_CREAT)
            .with_context(|| format!("opening {}", dir.show(&part)))?;
        let mut size = f.metadata()?.len();
        if size > total {
            f.set_len(0)
                .with_context(|| format!("truncating {}", dir.show(&part)))?;
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
                                    .context(format!("writing {}", dir.show(&part))),
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
            Start::Md5Only => dir.write_atomic(&md5_name(index), md5),
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
    dir: &DirFd,
    index: u64,
    total: u64,
    f: &File,
    part: &str,
    data: &str,
    md5: &[u8],
) -> Result<()> {
    let ours = fstat(f)?;
    if ours.size != total {
        bail!(
            "{} has {} bytes, expected {total}",
            dir.show(part),
            ours.size
        );
    }
    let named = dir
        .stat(part)
        .with_context(|| format!("checking {}", dir.show(part)))?;
    if named.map(|n| (n.dev, n.ino)) != Some((ours.dev, ours.ino)) {
        bail!("{} was replaced while we wrote it", dir.show(part));
    }
    dir.rename(part, data)
        .with_context(|| format!("renaming {}", dir.show(part)))?;
    dir.write_atomic(&md5_name(index), md5)
}
