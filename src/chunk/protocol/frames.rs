//! The frames of the serve protocol (see "Serve protocol" in the package
//! doc): the frame codec, the frame kinds and limits, the fields of a
//! payload, the poll operations and the folder listing a poll returns. Both
//! ends use it: the server in `helper/server.rs`, the client in
//! `driver/client.rs`. It trusts no input: every frame is bounded and
//! checked, and a malformed one is an error, never a panic.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use anyhow::{anyhow, bail, Result};

use super::folder::parse_chunk_file_name;
use super::{ABORT, CANCEL, END, ERROR, MARKER_MAX, PART, PROGRESS, RESEND, RESULT};

/// First frame the server sends; a client refuses any other.
pub const HELLO_TEXT: &[u8] = b"resync-chunk-serve 1";
/// Largest data frame payload.
pub const DATA_MAX: usize = 256 << 10;
/// Largest frame payload of any kind (a poll may carry two markers).
pub const FRAME_MAX: usize = 2 * MARKER_MAX as usize + 64 * 1024;
/// Largest `.md5` file text a server sends or writes.
pub const MD5_TEXT_MAX: usize = 256;
/// Most entries a client accepts in one listing.
pub const LIST_MAX: usize = 100_000;
/// Longest error text in an ERR frame (after its class byte).
pub const ERR_TEXT_MAX: usize = 4096;
/// Largest ERR payload: the class byte and the text. An ERR frame may come
/// wherever a reply is expected, so it is always read at this limit, however
/// small the expected reply is.
pub const ERR_MAX: usize = 1 + ERR_TEXT_MAX;

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
pub const ERR_OTHER: u8 = 0;
pub const ERR_NO_SPACE: u8 = 1;

/// Markers a poll reports.
pub const LISTED_MARKERS: [&str; 6] = [END, ERROR, ABORT, PROGRESS, RESEND, RESULT];
/// Markers a poll may write.
pub const PUT_MARKERS: [&str; 4] = [END, ABORT, CANCEL, RESEND];

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
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Fields { rest: b }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            bail!("truncated frame");
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u8-length-prefixed UTF-8 name.
    pub fn name(&mut self) -> Result<&'a str> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| anyhow!("name is not UTF-8"))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    pub fn end(&self) -> Result<()> {
        if !self.rest.is_empty() {
            bail!("{} unexpected bytes at the end of a frame", self.rest.len());
        }
        Ok(())
    }
}

pub fn push_name(out: &mut Vec<u8>, name: &str) {
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

pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
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

pub fn decode_ops(payload: &[u8]) -> Result<Vec<Op>> {
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
