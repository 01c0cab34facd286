//! The framed format of a compressed stream, and its decoders. Pure (no
//! I/O beyond the reader or writer it is handed); it trusts no input: every
//! length is bounded before anything is allocated, and a malformed frame is
//! an error (`InvalidData`), never a panic.
//!
//! A frame is a 9-byte header, `kind` (1 byte), `raw` (u32 big-endian: the
//! bytes it decodes to), `wire` (u32 big-endian: the payload bytes that
//! follow), then the payload:
//! - `R` raw: the payload is the data itself (`wire == raw`, 1..=BLOCK_MAX);
//! - `Z` zstd: one zstd frame that decodes to exactly `raw` bytes
//!   (`raw` 1..=BLOCK_MAX, `wire` 1..=BLOCK_MAX);
//! - `E` end: `raw` 0, `wire` 8, the payload is the total of decoded bytes
//!   (u64 big-endian); nothing may follow it.
//!
//! A default-mode stream is [`MAGIC`], frames, and an end frame: a stream
//! that stops before its end frame is truncated, whatever its last frame
//! was. In `--chunked` mode each chunk file is a run of whole frames (no
//! magic, no end frame: the sender's `end` marker carries the totals).

use std::io::{self, Read, Write};

/// First bytes of a framed default-mode stream.
pub const MAGIC: &[u8; 8] = b"RSYNCZ1\n";
/// Header bytes per frame.
pub const HEADER: usize = 9;
/// Largest `raw` or `wire` length a decoder accepts (encoders cut 2 MiB).
pub const BLOCK_MAX: usize = 4 << 20;

pub mod kind {
    pub const RAW: u8 = b'R';
    pub const ZSTD: u8 = b'Z';
    pub const END: u8 = b'E';
}

/// One frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub raw: u32,
    pub wire: u32,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Header {
    pub fn to_bytes(self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0] = self.kind;
        b[1..5].copy_from_slice(&self.raw.to_be_bytes());
        b[5..9].copy_from_slice(&self.wire.to_be_bytes());
        b
    }

    /// Parses and checks a header against the rules above.
    pub fn parse(b: &[u8; HEADER]) -> io::Result<Header> {
        let h = Header {
            kind: b[0],
            raw: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
            wire: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
        };
        let (raw, wire) = (h.raw as usize, h.wire as usize);
        let block = 1..=BLOCK_MAX;
        let ok = match h.kind {
            kind::RAW => block.contains(&raw) && wire == raw,
            kind::ZSTD => block.contains(&raw) && block.contains(&wire),
            kind::END => raw == 0 && wire == 8,
            _ => false,
        };
        if !ok {
            return Err(invalid(format!(
                "bad frame header: kind {:?}, {raw} raw bytes, {wire} on the wire",
                h.kind as char
            )));
        }
        Ok(h)
    }
}

/// Appends an end frame for a stream of `total` decoded bytes.
pub fn push_end(out: &mut Vec<u8>, total: u64) {
    out.extend_from_slice(
        &Header {
            kind: kind::END,
            raw: 0,
            wire: 8,
        }
        .to_bytes(),
    );
    out.extend_from_slice(&total.to_be_bytes());
}

/// Decodes frame payloads (one zstd context, reused).
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl Decoder {
    pub fn new() -> io::Result<Decoder> {
        Ok(Decoder {
            zstd: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Decodes a data frame's payload into `out` (replacing its contents).
    pub fn decode(&mut self, h: Header, payload: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        match h.kind {
            kind::RAW => out.extend_from_slice(payload),
            kind::ZSTD => {
                out.reserve_exact(h.raw as usize);
                let n = self
                    .zstd
                    .decompress_to_buffer(payload, out)
                    .map_err(|e| invalid(format!("bad zstd frame: {e}")))?;
                if n != h.raw as usize {
                    return Err(invalid(format!(
                        "a zstd frame decoded to {n} bytes; its header says {}",
                        h.raw
                    )));
                }
            }
            _ => return Err(invalid("not a data frame".into())),
        }
        Ok(())
    }
}

/// Whether a framed input starts with [`MAGIC`] and must end with an end
/// frame (a default-mode stream), or is bare frames (a chunk file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Stream,
    Bare,
}

/// Reads decoded bytes from a framed reader. With [`Framing::Stream`], the
/// end of input before the end frame is `UnexpectedEof`, and the end
/// frame's total must match what was decoded.
pub struct FrameReader<R> {
    inner: R,
    framing: Framing,
    decoder: Decoder,
    payload: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    started: bool,
    ended: bool,
    total: u64,
    /// Bytes of the current raw frame not read yet: a raw payload is
    /// handed on in pieces as it arrives, so that a reader feeding a pipe
    /// does not stop to gather a whole block first.
    raw_left: usize,
}

/// The most of a raw frame's payload handed on at once.
const RAW_PIECE: usize = 256 << 10;

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, framing: Framing) -> io::Result<FrameReader<R>> {
        Ok(FrameReader {
            inner,
            framing,
            decoder: Decoder::new()?,
            payload: Vec::new(),
            out: Vec::new(),
            pos: 0,
            started: framing == Framing::Bare,
            ended: false,
            total: 0,
            raw_left: 0,
        })
    }

    /// Decoded bytes so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The next decoded block, `None` at the end (checked as for `read`).
    pub fn next_block(&mut self) -> io::Result<Option<&[u8]>> {
        if self.pos == self.out.len() && !self.next_frame()? {
            return Ok(None);
        }
        let block = &self.out[self.pos..];
        self.pos = self.out.len();
        Ok(Some(block))
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of
    /// input before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the compressed stream ended inside a frame",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Decodes the next data frame into `out`; false at the end. A raw
    /// frame's payload comes a piece at a time.
    fn next_frame(&mut self) -> io::Result<bool> {
        match self.advance()? {
            Advance::End => Ok(false),
            Advance::Block => Ok(true),
            Advance::Raw => {
                let n = self.raw_left.min(RAW_PIECE);
                let mut out = std::mem::take(&mut self.out);
                out.resize(n, 0);
                let filled = self.fill(&mut out);
                self.out = out;
                if !filled? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the compressed stream ended inside a frame",
                    ));
                }
                self.raw_left -= n;
                self.pos = 0;
                self.total += n as u64;
                Ok(true)
            }
        }
    }

    /// Reads frame headers (and decodes a compressed frame into `out`)
    /// until there is data: a decoded block, or raw payload still to read
    /// from the input; or the checked end.
    fn advance(&mut self) -> io::Result<Advance> {
        if !self.started {
            let mut m = [0u8; MAGIC.len()];
            if !self.fill(&mut m)? || &m != MAGIC {
                return Err(invalid("not a resync compressed stream".into()));
            }
            self.started = true;
        }
        loop {
            if self.raw_left > 0 {
                return Ok(Advance::Raw);
            }
            if self.ended {
                let mut extra = [0u8; 1];
                if self.fill(&mut extra)? {
                    return Err(invalid("data after the end frame".into()));
                }
                return Ok(Advance::End);
            }
            let mut hb = [0u8; HEADER];
            if !self.fill(&mut hb)? {
                return match self.framing {
                    Framing::Bare => Ok(Advance::End),
                    Framing::Stream => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the compressed stream ended without its end frame",
                    )),
                };
            }
            let h = Header::parse(&hb)?;
            if h.kind == kind::RAW {
                self.raw_left = h.wire as usize;
                continue;
            }
            let mut payload = std::mem::take(&mut self.payload);
            payload.resize(h.wire as usize, 0);
            let filled = self.fill(&mut payload);
            self.payload = payload;
            if !filled? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the compressed stream ended inside a frame",
                ));
            }
            if h.kind == kind::END {
                if self.framing == Framing::Bare {
                    return Err(invalid("an end frame inside a chunk".into()));
                }
                let mut t = [0u8; 8];
                t.copy_from_slice(&self.payload);
                let said = u64::from_be_bytes(t);
                if said != self.total {
                    return Err(invalid(format!(
                        "the end frame says {said} bytes; {} were decoded",
                        self.total
                    )));
                }
                self.ended = true;
                continue;
            }
            self.decoder.decode(h, &self.payload, &mut self.out)?;
            self.pos = 0;
            self.total += self.out.len() as u64;
            return Ok(Advance::Block);
        }
    }

    /// Like [`FrameReader::next_block`], except that a raw frame's payload
    /// is left in the input as [`Part::Raw`] (its bytes still to come) for
    /// the caller to move itself (`splice`), reporting what it moved with
    /// [`FrameReader::raw_moved`]. Only for an input read without a buffer
    /// of its own (the reader never reads past what it needs).
    pub fn next_part(&mut self) -> io::Result<Option<Part<'_>>> {
        if self.pos == self.out.len() {
            match self.advance()? {
                Advance::End => return Ok(None),
                Advance::Raw => return Ok(Some(Part::Raw(self.raw_left))),
                Advance::Block => {}
            }
        }
        let block = &self.out[self.pos..];
        self.pos = self.out.len();
        Ok(Some(Part::Block(block)))
    }

    /// `n` bytes of the current raw frame's payload were moved from the
    /// input by the caller (at most what [`Part::Raw`] said).
    pub fn raw_moved(&mut self, n: usize) {
        let n = n.min(self.raw_left);
        self.raw_left -= n;
        self.total += n as u64;
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// What [`FrameReader::advance`] found.
enum Advance {
    Raw,
    Block,
    End,
}

/// A piece of a decoded stream ([`FrameReader::next_part`]).
pub enum Part<'a> {
    /// Decoded bytes.
    Block(&'a [u8]),
    /// This many bytes of a raw frame's payload, next in the input.
    Raw(usize),
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.out.len() && !self.next_frame()? {
            return Ok(0);
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A writer that takes a framed default-mode stream and writes what it
/// decodes to `inner`. [`DecodeWriter::finish`] says whether the end frame
/// came (and returns `inner`).
pub struct DecodeWriter<W: Write> {
    inner: W,
    decoder: Decoder,
    pending: Vec<u8>,
    out: Vec<u8>,
    started: bool,
    ended: bool,
    total: u64,
}

impl<W: Write> DecodeWriter<W> {
    pub fn new(inner: W) -> io::Result<DecodeWriter<W>> {
        Ok(DecodeWriter {
            inner,
            decoder: Decoder::new()?,
            pending: Vec::new(),
            out: Vec::new(),
            started: false,
            ended: false,
            total: 0,
        })
    }

    /// Decodes every complete frame in `pending`.
    fn drain(&mut self) -> io::Result<()> {
        let mut at = 0;
        if !self.started {
            if self.pending.len() < MAGIC.len() {
                return Ok(());
            }
            if &self.pending[..MAGIC.len()] != MAGIC {
                return Err(invalid("not a resync compressed stream".into()));
            }
            self.started = true;
            at = MAGIC.len();
        }
        let result = loop {
            let rest = &self.pending[at..];
            if rest.is_empty() {
                break Ok(());
            }
            if self.ended {
                break Err(invalid("data after the end frame".into()));
            }
            let Some(hb) = rest.first_chunk::<HEADER>() else {
                break Ok(());
            };
            let h = match Header::parse(hb) {
                Ok(h) => h,
                Err(e) => break Err(e),
            };
            let len = HEADER + h.wire as usize;
            if rest.len() < len {
                break Ok(());
            }
            let payload = &rest[HEADER..len];
            if h.kind == kind::END {
                let mut t = [0u8; 8];
                t.copy_from_slice(payload);
                let said = u64::from_be_bytes(t);
                if said != self.total {
                    break Err(invalid(format!(
                        "the end frame says {said} bytes; {} were decoded",
                        self.total
                    )));
                }
                self.ended = true;
            } else {
                let data = if h.kind == kind::RAW {
                    payload
                } else {
                    if let Err(e) = self.decoder.decode(h, payload, &mut self.out) {
                        break Err(e);
                    }
                    &self.out
                };
                if let Err(e) = self.inner.write_all(data) {
                    break Err(e);
                }
                self.total += data.len() as u64;
            }
            at += len;
        };
        self.pending.drain(..at);
        result
    }

    /// Decoded bytes written so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether the end frame came and nothing is left over.
    pub fn complete(&self) -> bool {
        self.ended && self.pending.is_empty()
    }
}

impl<W: Write> Write for DecodeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bounded: at most one frame waits, plus one write's worth.
        self.pending.extend_from_slice(buf);
        self.drain()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::encoder::Encoder;
    use crate::compress::testdata::random;
    use crate::compress::Compress;

    fn text(n: usize) -> Vec<u8> {
        let words = ["zfs ", "send ", "receive ", "snapshot ", "pool/", "tank\n"];
        let mut v = Vec::with_capacity(n);
        let mut i = 0usize;
        while v.len() < n {
            v.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        v.truncate(n);
        v
    }

    /// A whole default-mode stream of `data`, cut in 1 MiB blocks.
    fn stream(data: &[u8], c: Compress) -> Vec<u8> {
        let mut e = Encoder::new(c).unwrap();
        let mut out = MAGIC.to_vec();
        for block in data.chunks(1 << 20) {
            e.frame(block, &mut out).unwrap();
        }
        push_end(&mut out, data.len() as u64);
        out
    }

    fn read_all(framed: &[u8], framing: Framing) -> io::Result<Vec<u8>> {
        let mut r = FrameReader::new(framed, framing)?;
        let mut v = Vec::new();
        r.read_to_end(&mut v)?;
        Ok(v)
    }

    fn write_all(framed: &[u8], piece: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut w = DecodeWriter::new(Vec::new())?;
        for p in framed.chunks(piece) {
            w.write_all(p)?;
        }
        let complete = w.complete();
        Ok((w.inner, complete))
    }

    #[test]
    fn compressible_data_round_trips_smaller_through_both_decoders() {
        let data = text(3 << 20 | 12345);
        let framed = stream(&data, Compress::Adaptive);
        assert!(framed.len() < data.len() / 4, "{}", framed.len());
        assert!(read_all(&framed, Framing::Stream).unwrap() == data);
        for piece in [1, 7, 4096, 1 << 20, framed.len()] {
            let (out, complete) = write_all(&framed, piece).unwrap();
            assert!(out == data && complete, "piece {piece}");
        }
    }

    #[test]
    fn incompressible_data_passes_raw_with_only_the_headers_added() {
        let data = random(3 << 20, 7);
        let framed = stream(&data, Compress::Fixed { level: 3 });
        assert_eq!(
            framed.len(),
            MAGIC.len() + 3 * HEADER + data.len() + HEADER + 8
        );
        assert!(read_all(&framed, Framing::Stream).unwrap() == data);
    }

    /// `next_part` with the caller moving raw payloads itself (as the
    /// decoder's `splice` does): the same bytes, the end checked, and a
    /// stream cut inside a raw payload is an error.
    #[test]
    fn raw_payloads_moved_by_the_caller_decode_the_same_stream() {
        let mut data = text(3 << 20);
        data.extend(random(3 << 20, 7));
        data.extend(text(1 << 20));
        let framed = stream(&data, Compress::Adaptive);
        let decode = |framed: &[u8]| -> io::Result<(Vec<u8>, usize)> {
            let mut r = FrameReader::new(io::Cursor::new(framed), Framing::Stream)?;
            let (mut out, mut raw_parts) = (Vec::new(), 0);
            while let Some(part) = r.next_part()? {
                match part {
                    Part::Block(b) => out.extend_from_slice(b),
                    Part::Raw(left) => {
                        raw_parts += 1;
                        // Less than offered, as splice may move.
                        let n = left.min(100_000);
                        let mut buf = vec![0u8; n];
                        let cursor = &mut r.inner;
                        cursor.read_exact(&mut buf)?;
                        out.extend_from_slice(&buf);
                        r.raw_moved(n);
                    }
                }
            }
            Ok((out, raw_parts))
        };
        let (out, raw_parts) = decode(&framed).unwrap();
        assert_eq!(out, data);
        assert!(raw_parts > 0, "random data went raw");
        let raw_at = framed.len() - (1 << 20);
        assert!(decode(&framed[..raw_at]).is_err());
    }

    #[test]
    fn an_empty_stream_is_magic_and_an_end_frame() {
        let framed = stream(&[], Compress::Adaptive);
        assert!(read_all(&framed, Framing::Stream).unwrap().is_empty());
        assert!(write_all(&framed, 3).unwrap().1);
    }

    #[test]
    fn a_truncated_stream_is_an_error_wherever_it_stops() {
        let data = text(2 << 20);
        let framed = stream(&data, Compress::Adaptive);
        for cut in [
            0,
            3,
            MAGIC.len(),
            MAGIC.len() + 4,
            framed.len() / 2,
            framed.len() - 1,
        ] {
            assert!(
                read_all(&framed[..cut], Framing::Stream).is_err(),
                "cut {cut}"
            );
            // The writer cannot know the input ended: it is not complete.
            if let Ok((_, complete)) = write_all(&framed[..cut], 1000) {
                assert!(!complete, "cut {cut}");
            }
        }
    }

    #[test]
    fn hostile_headers_are_refused_before_any_allocation() {
        let bad = [
            Header {
                kind: b'Q',
                raw: 10,
                wire: 10,
            },
            Header {
                kind: kind::RAW,
                raw: 10,
                wire: 11,
            },
            Header {
                kind: kind::RAW,
                raw: 0,
                wire: 0,
            },
            Header {
                kind: kind::ZSTD,
                raw: u32::MAX,
                wire: 10,
            },
            Header {
                kind: kind::ZSTD,
                raw: 10,
                wire: u32::MAX,
            },
            Header {
                kind: kind::ZSTD,
                raw: 0,
                wire: 10,
            },
            Header {
                kind: kind::END,
                raw: 0,
                wire: 9,
            },
        ];
        for h in bad {
            assert!(Header::parse(&h.to_bytes()).is_err(), "{h:?}");
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&h.to_bytes());
            framed.extend_from_slice(&[0u8; 64]);
            assert!(read_all(&framed, Framing::Stream).is_err(), "{h:?}");
            assert!(write_all(&framed, 5).is_err(), "{h:?}");
        }
    }

    #[test]
    fn garbage_zstd_payloads_and_lying_lengths_are_errors() {
        let mut framed = MAGIC.to_vec();
        framed.extend_from_slice(
            &Header {
                kind: kind::ZSTD,
                raw: 100,
                wire: 16,
            }
            .to_bytes(),
        );
        framed.extend_from_slice(&random(16, 3));
        assert!(read_all(&framed, Framing::Stream).is_err());
        // A real zstd frame whose header claims more than it decodes to.
        let z = zstd::bulk::compress(&text(1000), 3).unwrap();
        let mut framed = MAGIC.to_vec();
        let h = Header {
            kind: kind::ZSTD,
            raw: 2000,
            wire: z.len() as u32,
        };
        framed.extend_from_slice(&h.to_bytes());
        framed.extend_from_slice(&z);
        assert!(read_all(&framed, Framing::Stream).is_err());
        // One that decodes to more than its header says.
        let mut framed = MAGIC.to_vec();
        let h = Header {
            kind: kind::ZSTD,
            raw: 500,
            wire: z.len() as u32,
        };
        framed.extend_from_slice(&h.to_bytes());
        framed.extend_from_slice(&z);
        assert!(read_all(&framed, Framing::Stream).is_err());
    }

    #[test]
    fn wrong_magic_wrong_total_and_trailing_bytes_are_errors() {
        let data = text(5000);
        let mut framed = stream(&data, Compress::Adaptive);
        framed[0] = b'X';
        assert!(read_all(&framed, Framing::Stream).is_err());
        assert!(write_all(&framed, 100).is_err());
        let mut framed = MAGIC.to_vec();
        framed.extend_from_slice(
            &Header {
                kind: kind::RAW,
                raw: 3,
                wire: 3,
            }
            .to_bytes(),
        );
        framed.extend_from_slice(b"abc");
        push_end(&mut framed, 4);
        assert!(read_all(&framed, Framing::Stream).is_err());
        assert!(write_all(&framed, 100).is_err());
        let mut framed = stream(&data, Compress::Adaptive);
        framed.push(0);
        assert!(read_all(&framed, Framing::Stream).is_err());
        assert!(write_all(&framed, 100).is_err());
    }

    #[test]
    fn bare_frames_decode_without_magic_and_refuse_an_end_frame() {
        let data = text(2 << 20);
        let mut e = Encoder::new(Compress::Adaptive).unwrap();
        let mut framed = Vec::new();
        for block in data.chunks(1 << 20) {
            e.frame(block, &mut framed).unwrap();
        }
        assert!(read_all(&framed, Framing::Bare).unwrap() == data);
        assert!(read_all(&framed[..framed.len() - 1], Framing::Bare).is_err());
        push_end(&mut framed, data.len() as u64);
        assert!(read_all(&framed, Framing::Bare).is_err());
    }
}
