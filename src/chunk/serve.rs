//! The serve helper (`resync __chunk-serve --dir D --timeout SECS`) and its
//! client: the orchestrator's long-lived window into one session folder.
//! The orchestrator starts a few per side and connection (one for control,
//! one per parallel data channel) and speaks the framed protocol described
//! in `mod.rs` ("Serve protocol") over the process's stdin/stdout: list the
//! folder after applying deletions and marker writes, stream a chunk from a
//! byte offset, write a chunk from the byte offset its `.part` file has
//! reached. This module owns both ends of that protocol (frame codec,
//! server loop, [`Client`]); it trusts neither end: every frame is bounded
//! and checked, and a malformed one ends the conversation with an error.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::*;
use crate::host::{Child, Host};

/// First frame the server sends; a client refuses any other.
pub const HELLO_TEXT: &[u8] = b"resync-chunk-serve 1";
/// Largest data frame payload.
pub const DATA_MAX: usize = 256 << 10;
/// Largest frame payload of any kind (a poll may carry two markers).
pub const FRAME_MAX: usize = 2 * MARKER_MAX as usize + 64 * 1024;
/// Largest `.md5` file text a server sends or writes.
const MD5_TEXT_MAX: usize = 256;
/// A read touches its chunk file's mtime every this many bytes.
const TOUCH_EVERY: u64 = 8 << 20;
/// Most entries a client accepts in one listing.
const LIST_MAX: usize = 100_000;
/// Longest error text in an ERR frame (after its class byte).
const ERR_TEXT_MAX: usize = 4096;
/// Largest ERR payload: the class byte and the text. An ERR frame may come
/// wherever a reply is expected, so it is always read at this limit, however
/// small the expected reply is.
const ERR_MAX: usize = 1 + ERR_TEXT_MAX;

/// Frame kinds. Requests: POLL, READ, WRITE, DATA (inside a write), DONE
/// (ends a write). Replies: HELLO, GONE, the listing entries and LIST_END,
/// DATA and DONE (a read), OFFSET, OK, ERR.
pub mod kind {
    pub const POLL: u8 = b'L';
    pub const READ: u8 = b'R';
    pub const WRITE: u8 = b'W';
    pub const DATA: u8 = b'B';
    pub const DONE: u8 = b'Z';
    pub const SYNC: u8 = b'Y';
    pub const ACK: u8 = b'A';
    pub const HELLO: u8 = b'H';
    pub const GONE: u8 = b'G';
    pub const CHUNK: u8 = b'D';
    pub const PART: u8 = b'P';
    pub const MD5: u8 = b'S';
    pub const MARKER: u8 = b'M';
    pub const LIST_END: u8 = b'E';
    pub const OFFSET: u8 = b'O';
    pub const OK: u8 = b'K';
    pub const ERR: u8 = b'X';
}

/// Error classes in an ERR frame (its first payload byte).
const ERR_OTHER: u8 = 0;
const ERR_NO_SPACE: u8 = 1;

/// Markers a poll reports.
const LISTED_MARKERS: [&str; 6] = [END, ERROR, ABORT, PROGRESS, RESEND, RESULT];
/// Markers a poll may write.
const PUT_MARKERS: [&str; 4] = [END, ABORT, CANCEL, RESEND];

// ---------------------------------------------------------------------------
// Frames

/// Writes one frame: kind, payload length (u32 big-endian), payload.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|n| *n as usize <= FRAME_MAX)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Reads one frame into `buf`; Ok(None) on a clean end of input before a
/// frame. A payload over `max` bytes is an error, except that DATA frames
/// have their own limit (DATA_MAX) and ERR frames theirs (ERR_MAX).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>, max: usize) -> Result<Option<u8>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => bail!("the stream ended inside a frame header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow::Error::new(e).context("reading a frame")),
        }
    }
    let kind = head[0];
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let limit = match kind {
        kind::DATA => DATA_MAX,
        kind::ERR => ERR_MAX.max(max),
        _ => max,
    };
    if len > limit {
        bail!(
            "frame {:?} of {len} bytes is larger than {limit}",
            kind as char
        );
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            anyhow!("the stream ended inside a frame")
        } else {
            anyhow::Error::new(e).context("reading a frame")
        }
    })?;
    Ok(Some(kind))
}

/// Reads the fields of a payload in order; any shortfall or leftover is an
/// error.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Self {
        Fields { rest: b }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            bail!("truncated frame");
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u8-length-prefixed UTF-8 name.
    fn name(&mut self) -> Result<&'a str> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| anyhow!("name is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn end(&self) -> Result<()> {
        if !self.rest.is_empty() {
            bail!("{} unexpected bytes at the end of a frame", self.rest.len());
        }
        Ok(())
    }
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    // Names are our own short constants or chunk file names.
    let b = &name.as_bytes()[..name.len().min(255)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

// ---------------------------------------------------------------------------
// Requests and listings

/// An operation a poll applies before listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Remove a marker or chunk file (absent is fine).
    Rm(String),
    /// Write a marker (`.part`, then rename).
    Put(String, String),
}

fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Rm(name) => {
                out.push(b'r');
                push_name(&mut out, name);
            }
            Op::Put(name, text) => {
                out.push(b'p');
                push_name(&mut out, name);
                out.extend_from_slice(&(text.len() as u32).to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
    out
}

fn decode_ops(payload: &[u8]) -> Result<Vec<Op>> {
    let mut f = Fields::new(payload);
    let mut ops = Vec::new();
    while !f.rest.is_empty() {
        match f.u8()? {
            b'r' => {
                let name = f.name()?;
                let ok = LISTED_MARKERS.contains(&name)
                    || name == CANCEL
                    || parse_chunk_file_name(name.strip_suffix(PART).unwrap_or(name)).is_some();
                if !ok {
                    bail!("refusing to remove {name:?}");
                }
                ops.push(Op::Rm(name.to_string()));
            }
            b'p' => {
                let name = f.name()?;
                if !PUT_MARKERS.contains(&name) {
                    bail!("refusing to write {name:?}");
                }
                let len = f.u32()? as usize;
                if len as u64 > MARKER_MAX {
                    bail!("marker {name} of {len} bytes is too large");
                }
                let text = std::str::from_utf8(f.take(len)?)
                    .map_err(|_| anyhow!("marker {name} is not UTF-8"))?;
                ops.push(Op::Put(name.to_string(), text.to_string()));
            }
            other => bail!("unknown poll operation {other}"),
        }
    }
    Ok(ops)
}

/// A session folder as one poll saw it.
#[derive(Debug, Default)]
pub struct Folder {
    pub gone: bool,
    /// Complete chunk files: index -> (data size, `.md5` text).
    pub chunks: HashMap<u64, (Option<u64>, Option<String>)>,
    /// Sizes of `chunk-N.part` files (chunks being written).
    pub parts: HashMap<u64, u64>,
    pub markers: HashMap<String, String>,
}

impl Folder {
    /// Chunks with both files: (index, size, `.md5` text).
    pub fn complete(&self) -> impl Iterator<Item = (u64, u64, &str)> + '_ {
        self.chunks
            .iter()
            .filter_map(|(i, (size, md5))| match (size, md5) {
                (Some(s), Some(m)) => Some((*i, *s, m.as_str())),
                _ => None,
            })
    }

    pub fn has_md5(&self, index: u64) -> bool {
        self.chunks.get(&index).is_some_and(|(_, m)| m.is_some())
    }
}

// ---------------------------------------------------------------------------
// Server

/// `__chunk-serve` settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub timeout: Duration,
}

impl Config {
    pub fn from_args(a: HelperArgs) -> Result<Config> {
        if a.chunk_size.is_some()
            || a.window.is_some()
            || a.tmpdir.is_some()
            || a.min_age.is_some()
            || !a.argv.is_empty()
        {
            bail!("__chunk-serve takes --dir and --timeout");
        }
        let c = Config {
            dir: a.dir.ok_or_else(|| anyhow!("--dir is required"))?,
            timeout: a.timeout.ok_or_else(|| anyhow!("--timeout is required"))?,
        };
        session_id_of(&c.dir)?;
        Ok(c)
    }
}

/// Runs the server on stdin/stdout until the client closes stdin, or
/// nothing moves on either for `timeout`; returns the exit code.
pub fn run(c: Config) -> i32 {
    let input = TimedFd {
        fd: 0,
        timeout: c.timeout,
    };
    let output = TimedFd {
        fd: 1,
        timeout: c.timeout,
    };
    let mut r = BufReader::with_capacity(DATA_MAX + 5, input);
    let mut w = BufWriter::with_capacity(DATA_MAX + 5, output);
    match serve(&c.dir, &mut r, &mut w) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            log("serve", &c.dir, &format!("error: {e:#}"));
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
fn reply_err(w: &mut impl Write, e: &anyhow::Error) -> io::Result<()> {
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

// ---------------------------------------------------------------------------
// Client

/// A failure the server reported (an ERR frame).
#[derive(Debug)]
pub struct ServeError {
    pub no_space: bool,
    pub message: String,
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

/// Whether `e` is a server's report that its disk is full.
pub fn is_no_space_error(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<ServeError>().is_some_and(|s| s.no_space))
}

/// The orchestrator's end of one serve process.
pub struct Client {
    child: Option<Box<dyn Child>>,
    /// SYNC frames sent in the current write whose ACK we have not read.
    acks_due: u32,
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    buf: Vec<u8>,
}

impl Client {
    /// Starts `exe __chunk-serve` on `host` for `dir` and reads its HELLO.
    pub fn start(host: &dyn Host, exe: &str, dir: &str, timeout: Duration) -> Result<Client> {
        let argv = vec![
            exe.to_string(),
            "__chunk-serve".into(),
            "--dir".into(),
            dir.to_string(),
            "--timeout".into(),
            timeout.as_secs().max(1).to_string(),
        ];
        let mut child = host
            .spawn(&argv)
            .with_context(|| format!("starting the chunk server on {}", host.label()))?;
        let (Some(out), Some(inp)) = (child.take_stdout(), child.take_stdin()) else {
            child.kill();
            bail!("internal error: chunk server pipes are missing");
        };
        Client::greet(Some(child), out, inp)
    }

    #[cfg(test)]
    /// A client over any pipe pair (tests); reads the HELLO.
    pub fn from_io(r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) -> Result<Client> {
        Client::greet(None, r, w)
    }

    fn greet(
        child: Option<Box<dyn Child>>,
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
    ) -> Result<Client> {
        let mut c = Client {
            child,
            acks_due: 0,
            r: BufReader::with_capacity(DATA_MAX + 5, r),
            w: BufWriter::with_capacity(64 << 10, w),
            buf: Vec::new(),
        };
        match c.frame(FRAME_MAX)? {
            kind::HELLO if c.buf == HELLO_TEXT => Ok(c),
            _ => bail!("the chunk server did not greet us (a different resync version?)"),
        }
    }

    fn frame(&mut self, max: usize) -> Result<u8> {
        match read_frame(&mut self.r, &mut self.buf, max)? {
            Some(k) => Ok(k),
            None => bail!("the chunk server closed its output{}", self.exit_reason()),
        }
    }

    /// How the server process ended, with its last stderr line, if it
    /// tells within a moment (": exit 2: error: ...").
    fn exit_reason(&mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(Ok(exit)) => {
                let last = exit
                    .stderr
                    .trim_end()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_string();
                format!(" (exit {}): {last}", exit.status)
            }
            _ => String::new(),
        }
    }

    fn send(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        write_frame(&mut self.w, kind, payload).context("writing to the chunk server")
    }

    fn flush(&mut self) -> Result<()> {
        self.w.flush().context("writing to the chunk server")
    }

    /// The error in an ERR frame just read.
    fn server_error(&self) -> anyhow::Error {
        let (class, text) = match self.buf.split_first() {
            Some((c, t)) => (*c, String::from_utf8_lossy(t).into_owned()),
            None => (ERR_OTHER, String::new()),
        };
        anyhow::Error::new(ServeError {
            no_space: class == ERR_NO_SPACE,
            message: text,
        })
    }

    fn unexpected(&self, k: u8, what: &str) -> anyhow::Error {
        if k == kind::ERR {
            self.server_error()
        } else {
            anyhow!(
                "unexpected frame {:?} from the chunk server {what}",
                k as char
            )
        }
    }

    /// Applies `ops`, then lists the folder.
    pub fn poll(&mut self, ops: &[Op]) -> Result<Folder> {
        self.send(kind::POLL, &encode_ops(ops))?;
        self.flush()?;
        let mut f = Folder::default();
        let mut entries = 0usize;
        loop {
            let k = self.frame(FRAME_MAX)?;
            entries += 1;
            if entries > LIST_MAX {
                bail!("the chunk server listed more than {LIST_MAX} entries");
            }
            let mut p = Fields::new(&self.buf);
            match k {
                kind::GONE if entries == 1 => {
                    p.end()?;
                    f.gone = true;
                    return Ok(f);
                }
                kind::LIST_END => {
                    p.end()?;
                    return Ok(f);
                }
                kind::CHUNK | kind::PART => {
                    let (index, size) = (p.u64()?, p.u64()?);
                    p.end()?;
                    if k == kind::CHUNK {
                        f.chunks.entry(index).or_default().0 = Some(size);
                    } else {
                        f.parts.insert(index, size);
                    }
                }
                kind::MD5 => {
                    let index = p.u64()?;
                    let text = String::from_utf8_lossy(p.rest()).into_owned();
                    if text.len() > MD5_TEXT_MAX {
                        bail!("oversized .md5 in listing");
                    }
                    f.chunks.entry(index).or_default().1 = Some(text);
                }
                kind::MARKER => {
                    let name = p.name()?.to_string();
                    if !LISTED_MARKERS.contains(&name.as_str()) {
                        bail!("unexpected marker {name:?} in listing");
                    }
                    let text = std::str::from_utf8(p.rest())
                        .map_err(|_| anyhow!("marker {name} in listing is not UTF-8"))?
                        .to_string();
                    if f.markers.insert(name.clone(), text).is_some() {
                        bail!("marker {name} listed twice");
                    }
                }
                other => return Err(self.unexpected(other, "in a listing")),
            }
        }
    }

    /// Starts writing chunk `index` of `total` bytes; returns the offset to
    /// send from. Follow with [`Client::send_data`] and [`Client::end_write`].
    pub fn begin_write(&mut self, index: u64, total: u64, md5: &str) -> Result<u64> {
        let mut p = Vec::with_capacity(16 + md5.len());
        p.extend_from_slice(&index.to_be_bytes());
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&md5.as_bytes()[..md5.len().min(MD5_TEXT_MAX)]);
        self.send(kind::WRITE, &p)?;
        self.flush()?;
        match self.frame(64)? {
            kind::OFFSET => {
                let mut f = Fields::new(&self.buf);
                let off = f.u64()?;
                f.end()?;
                if off > total {
                    bail!("the chunk server offers offset {off} of a {total}-byte chunk");
                }
                Ok(off)
            }
            k => Err(self.unexpected(k, "for a write")),
        }
    }

    pub fn send_data(&mut self, data: &[u8]) -> Result<()> {
        for piece in data.chunks(DATA_MAX) {
            self.send(kind::DATA, piece)?;
        }
        Ok(())
    }

    /// Asks the server to confirm what it has written so far; with
    /// `in_flight` SYNCs or more unconfirmed, waits for the oldest ACK.
    /// This bounds the bytes a cut can lose between us and the disk.
    pub fn sync(&mut self, in_flight: u32) -> Result<()> {
        self.send(kind::SYNC, &[])?;
        self.flush()?;
        self.acks_due += 1;
        while self.acks_due > in_flight {
            self.await_ack()?;
        }
        Ok(())
    }

    fn await_ack(&mut self) -> Result<()> {
        let k = self.frame(ERR_MAX)?;
        if k != kind::ACK {
            return Err(self.unexpected(k, "for a sync"));
        }
        self.acks_due -= 1;
        Ok(())
    }

    /// Ends a write; Ok once the chunk (data, then `.md5`) is in place.
    pub fn end_write(&mut self) -> Result<()> {
        self.send(kind::DONE, &[])?;
        self.flush()?;
        while self.acks_due > 0 {
            self.await_ack()?;
        }
        match self.frame(ERR_MAX)? {
            kind::OK => Ok(()),
            k => Err(self.unexpected(k, "after a write")),
        }
    }

    /// Starts reading chunk `index` from `offset`; then [`Client::next_data`].
    pub fn begin_read(&mut self, index: u64, offset: u64) -> Result<()> {
        let mut p = index.to_be_bytes().to_vec();
        p.extend_from_slice(&offset.to_be_bytes());
        self.send(kind::READ, &p)?;
        self.flush()
    }

    /// The next piece of a read, or None at its end (with the byte count
    /// the server says it sent).
    pub fn next_data(&mut self) -> Result<Result<&[u8], u64>> {
        match self.frame(ERR_MAX)? {
            kind::DATA => Ok(Ok(&self.buf)),
            kind::DONE => {
                let mut f = Fields::new(&self.buf);
                let n = f.u64()?;
                f.end()?;
                Ok(Err(n))
            }
            k => Err(self.unexpected(k, "in a read")),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing stdin ends a healthy server; a stuck channel is closed.
        if let Some(mut child) = self.child.take() {
            child.kill();
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};
    use std::os::unix::net::UnixStream;

    /// A server thread on one end of a socket pair, a client on the other.
    fn pair(dir: &Path) -> (Client, std::thread::JoinHandle<Result<()>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let dir = dir.to_path_buf();
        let b2 = b.try_clone().unwrap();
        let server = std::thread::spawn(move || {
            let mut r = BufReader::new(b);
            let mut w = BufWriter::new(b2);
            serve(&dir, &mut r, &mut w)
        });
        let a2 = a.try_clone().unwrap();
        (Client::from_io(Box::new(a), Box::new(a2)).unwrap(), server)
    }

    fn session(tmp: &Path) -> PathBuf {
        let d = tmp.join("resync-0123456789abcdef");
        prepare_session_dir(&d).unwrap();
        d
    }

    fn md5_line(index: u64, data: &[u8]) -> String {
        render_md5(index, &Md5::digest(data).into())
    }

    #[test]
    fn poll_applies_ops_and_lists_chunks_parts_and_markers() {
        let tmp = tempfile::tempdir().unwrap();
        let d = session(tmp.path());
        fs::write(d.join(chunk_name(1)), b"hello").unwrap();
        fs::write(d.join(md5_name(1)), md5_line(1, b"hello")).unwrap();
        fs::write(d.join("chunk-000000000002.part"), b"abc").unwrap();
        fs::write(d.join(RESEND), b"index 0\nattempt 1\n").unwrap();
        fs::write(d.join("stray"), b"x").unwrap();
        let (mut c, _s) = pair(&d);
        let end = "chunks 1\nbytes 5\nstatus exit 0\n";
        let f = c
            .poll(&[Op::Rm(RESEND.into()), Op::Put(END.into(), end.into())])
            .unwrap();
        assert!(!f.gone);
        assert_eq!(f.chunks[&1], (Some(5), Some(md5_line(1, b"hello"))));
        assert_eq!(f.parts[&2], 3);
        assert_eq!(f.markers[END], end);
        assert!(!f.markers.contains_key(RESEND));
        // Hostile ops are refused and end the conversation.
        let (mut c2, s2) = pair(&d);
        assert!(c2.poll(&[Op::Rm("../../etc/passwd".into())]).is_err());
        assert!(s2.join().unwrap().is_err());
        assert!(c.poll(&[Op::Put(PROGRESS.into(), "x".into())]).is_err());
        fs::remove_dir_all(&d).unwrap();
        let (mut c3, _s3) = pair(&d);
        assert!(c3.poll(&[]).unwrap().gone);
    }

    #[test]
    fn a_chunk_crosses_and_resumes_from_its_part_size() {
        let tmp = tempfile::tempdir().unwrap();
        let src = session(tmp.path());
        let dst = tmp.path().join("resync-fedcba9876543210");
        prepare_session_dir(&dst).unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        fs::write(src.join(chunk_name(4)), &data).unwrap();
        let md5 = md5_line(4, &data);
        // An earlier copy got 300000 bytes across.
        fs::write(dst.join("chunk-000000000004.part"), &data[..300_000]).unwrap();
        let (mut s, _a) = pair(&src);
        let (mut r, _b) = pair(&dst);
        let off = r.begin_write(4, data.len() as u64, &md5).unwrap();
        assert_eq!(off, 300_000);
        s.begin_read(4, off).unwrap();
        let mut moved = 0u64;
        loop {
            match s.next_data().unwrap() {
                Ok(piece) => {
                    moved += piece.len() as u64;
                    let piece = piece.to_vec();
                    r.send_data(&piece).unwrap();
                    r.sync(1).unwrap();
                }
                Err(n) => {
                    assert_eq!(n, moved);
                    break;
                }
            }
        }
        r.end_write().unwrap();
        assert_eq!(moved, 400_000);
        assert_eq!(fs::read(dst.join(chunk_name(4))).unwrap(), data);
        assert_eq!(fs::read_to_string(dst.join(md5_name(4))).unwrap(), md5);
        assert!(!dst.join("chunk-000000000004.part").exists());
        // Writing it again accepts nothing and changes nothing.
        assert_eq!(r.begin_write(4, data.len() as u64, &md5).unwrap(), 700_000);
        r.end_write().unwrap();
        // A short write is refused and keeps what arrived for a resume.
        assert_eq!(r.begin_write(5, 10, "x\n").unwrap(), 0);
        r.send_data(b"12345").unwrap();
        let e = r.end_write().unwrap_err();
        assert!(format!("{e:#}").contains("5 of 10 bytes"), "{e:#}");
        assert_eq!(r.begin_write(5, 10, "x\n").unwrap(), 5);
        // Too much is refused too.
        r.send_data(b"1234567").unwrap();
        assert!(r.end_write().is_err());
        // Reading a missing chunk or past its end is an error reply.
        s.begin_read(9, 0).unwrap();
        assert!(s.next_data().is_err());
        s.begin_read(4, 700_001).unwrap();
        assert!(s.next_data().is_err());
        // The conversation goes on after error replies.
        assert!(!s.poll(&[]).unwrap().gone);
    }

    #[test]
    fn a_stale_writer_cannot_rename_a_newer_part() {
        let tmp = tempfile::tempdir().unwrap();
        let d = session(tmp.path());
        let (mut old, _a) = pair(&d);
        assert_eq!(old.begin_write(0, 4, "m\n").unwrap(), 0);
        old.send_data(b"ab").unwrap();
        old.flush().unwrap();
        // Meanwhile the chunk is rejected and a new copy starts.
        std::thread::sleep(Duration::from_millis(100));
        fs::remove_file(d.join("chunk-000000000000.part")).unwrap();
        let (mut new, _b) = pair(&d);
        assert_eq!(new.begin_write(0, 4, "m\n").unwrap(), 0);
        old.send_data(b"cd").unwrap();
        assert!(
            old.end_write().is_err(),
            "the old writer's file was replaced"
        );
        new.send_data(b"abcd").unwrap();
        new.end_write().unwrap();
        assert_eq!(fs::read(d.join(chunk_name(0))).unwrap(), b"abcd");
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let d = session(tmp.path());
        let mut bad: Vec<Vec<u8>> = vec![
            vec![kind::READ, 0, 0, 0, 3, 1, 2, 3],
            vec![kind::DATA, 0, 0, 0, 1, 0],
            vec![kind::POLL, 0xff, 0xff, 0xff, 0xff],
            vec![kind::POLL, 0, 0, 0, 2, b'p', 9],
            vec![kind::WRITE, 0, 0, 0, 1, 0],
            vec![kind::POLL, 0, 0, 0],
            vec![b'?', 0, 0, 0, 0],
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            bad.push(
                (0..len)
                    .map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8)
                    .collect(),
            );
        }
        for input in bad {
            let mut out = Vec::new();
            // Never a panic; at most an error.
            let _ = serve(&d, &mut &input[..], &mut out);
        }
        // And the client side: garbage instead of HELLO, oversized frames.
        let no_hello: Box<dyn Read + Send> = Box::new(io::Cursor::new(b"Hxxxxxx".to_vec()));
        assert!(Client::from_io(no_hello, Box::new(io::sink())).is_err());
        let mut huge = vec![kind::HELLO];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let huge: Box<dyn Read + Send> = Box::new(io::Cursor::new(huge));
        assert!(Client::from_io(huge, Box::new(io::sink())).is_err());
    }

    #[test]
    fn a_full_disk_is_reported_as_no_space() {
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC)).context("writing");
        let mut out = Vec::new();
        reply_err(&mut out, &e).unwrap();
        let mut buf = Vec::new();
        let k = read_frame(&mut &out[..], &mut buf, FRAME_MAX).unwrap();
        assert_eq!(k, Some(kind::ERR));
        assert_eq!(buf[0], ERR_NO_SPACE);
    }

    #[test]
    fn a_full_disk_on_a_write_request_is_no_space_not_a_framing_error() {
        // The server refuses a write at once (its `.part` cannot be
        // created): the ERR reply names the long path, far over the 8 bytes
        // an OFFSET reply has.
        let path = format!("/tmp/resync-{}/{}{PART}", "ab".repeat(16), chunk_name(3));
        let e = anyhow::Error::new(io::Error::from_raw_os_error(libc::ENOSPC))
            .context(format!("opening {path}"));
        let mut server = Vec::new();
        write_frame(&mut server, kind::HELLO, HELLO_TEXT).unwrap();
        reply_err(&mut server, &e).unwrap();
        let r: Box<dyn Read + Send> = Box::new(io::Cursor::new(server));
        let mut c = Client::from_io(r, Box::new(io::sink())).unwrap();
        let err = c.begin_write(3, 100, "").unwrap_err();
        assert!(is_no_space_error(&err), "{err:#}");
        assert!(format!("{err:#}").contains(&path), "{err:#}");
    }
}
