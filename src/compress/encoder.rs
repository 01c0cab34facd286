//! The encoder: one block in, one frame out (see `frame.rs`), and the
//! adaptive policy of the default compression. Pure: the caller reads the
//! blocks and tells it, per frame, whether the link was the bottleneck
//! ([`Encoder::observe`]: its queue toward the link was full).
//!
//! Policy (for [`Compress::Adaptive`]):
//! - Level: starts at [`ADAPTIVE_START`]; after every [`VOTE_WINDOW`]
//!   observations it goes up by one (to [`ADAPTIVE_MAX`]) when the link was
//!   the bottleneck for at least 3/4 of them (spare CPU: shrink more), and
//!   down by one (to [`ADAPTIVE_MIN`]) when it was for at most 1/4
//!   (compression is what holds the stream back).
//! - A block must shrink by at least 1/32 to go compressed; otherwise it
//!   goes raw (a miss). After [`MISSES_TO_SAMPLE`] misses in a row only
//!   every [`SAMPLE_EVERY`]th block is tried; the first one that shrinks
//!   ends sampling. Random or encrypted data thus costs one compression
//!   attempt in 16 blocks.
//!
//! A fixed level ([`Compress::Fixed`]) keeps its level; sampling applies
//! to it too.

use std::io;

use super::frame::{kind, Header};
use super::Compress;

/// Raw bytes per frame that encoders cut. Blocks are compressed
/// independently, so bigger ones shrink more (a tar of /usr at zstd 9:
/// 37.5% of its size in 1 MiB blocks, 34.6% in 2 MiB, 33.0% as one
/// stream); zstd's context grows with them (about 18 MiB at level 9 for
/// 2 MiB), which keeps a process under 64 MiB.
pub const BLOCK: usize = 2 << 20;
/// The adaptive level's range and start.
pub const ADAPTIVE_MIN: i32 = 1;
pub const ADAPTIVE_START: i32 = 3;
pub const ADAPTIVE_MAX: i32 = 9;
/// The levels a fixed spec may name (zstd's fast mode down to -5).
pub const LEVEL_FASTEST: i32 = -5;
pub const LEVEL_MAX: i32 = 19;
/// Observations per level decision.
pub const VOTE_WINDOW: u32 = 8;
/// Misses in a row before only sampling.
pub const MISSES_TO_SAMPLE: u32 = 4;
/// While sampling, one block in this many is tried.
pub const SAMPLE_EVERY: u32 = 16;

/// Bytes in and out so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub raw: u64,
    pub wire: u64,
    /// Frames sent compressed / raw.
    pub compressed: u64,
    pub stored: u64,
}

pub struct Encoder {
    adaptive: bool,
    level: i32,
    zstd: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
    misses: u32,
    since_sample: u32,
    votes: u32,
    link_bound: u32,
    pub stats: Stats,
}

impl Encoder {
    /// An encoder for `c` (`Compress::None` encodes raw frames only).
    pub fn new(c: Compress) -> io::Result<Encoder> {
        let (adaptive, level) = match c {
            Compress::Adaptive => (true, ADAPTIVE_START),
            Compress::Fixed { level } => (false, level),
            Compress::None => (false, 1),
        };
        Ok(Encoder {
            adaptive,
            level,
            zstd: zstd::bulk::Compressor::new(level)?,
            scratch: Vec::new(),
            misses: if c == Compress::None { u32::MAX } else { 0 },
            since_sample: 0,
            votes: 0,
            link_bound: 0,
            stats: Stats::default(),
        })
    }

    /// The zstd level in use.
    #[cfg(test)]
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Whether only every [`SAMPLE_EVERY`]th block is tried now.
    pub fn sampling(&self) -> bool {
        self.misses >= MISSES_TO_SAMPLE
    }

    /// Appends the frame for `raw` (1..=BLOCK_MAX bytes; empty input
    /// appends nothing) to `out`.
    pub fn frame(&mut self, raw: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if raw.is_empty() {
            return Ok(());
        }
        let h = self.header(raw)?;
        out.extend_from_slice(&h.to_bytes());
        match h.kind == kind::ZSTD {
            true => out.extend_from_slice(&self.scratch),
            false => out.extend_from_slice(raw),
        }
        Ok(())
    }

    /// The frame for the block in `buf` after [`super::frame::HEADER`]
    /// bytes of room (1..=BLOCK_MAX bytes): a block that goes raw gets its
    /// header written into that room and comes back as it is, without a
    /// copy.
    pub fn frame_in_place(&mut self, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        const ROOM: usize = super::frame::HEADER;
        if buf.len() <= ROOM {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty block"));
        }
        let h = self.header(&buf[ROOM..])?;
        if h.kind == kind::ZSTD {
            let mut out = Vec::with_capacity(ROOM + self.scratch.len());
            out.extend_from_slice(&h.to_bytes());
            out.extend_from_slice(&self.scratch);
            return Ok(out);
        }
        buf[..ROOM].copy_from_slice(&h.to_bytes());
        Ok(buf)
    }

    /// Decides how `raw` goes (compressed into `scratch`, or raw), counts
    /// it, and returns its frame's header.
    fn header(&mut self, raw: &[u8]) -> io::Result<Header> {
        let len = u32::try_from(raw.len())
            .ok()
            .filter(|n| *n as usize <= super::frame::BLOCK_MAX)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block too large"))?;
        let try_it = if self.misses == u32::MAX {
            false
        } else if self.sampling() {
            self.since_sample += 1;
            if self.since_sample >= SAMPLE_EVERY {
                self.since_sample = 0;
                true
            } else {
                false
            }
        } else {
            true
        };
        let shrunk = try_it && self.compress(raw);
        self.stats.raw += raw.len() as u64;
        let (kind, wire) = if shrunk {
            self.misses = 0;
            self.stats.compressed += 1;
            (kind::ZSTD, self.scratch.len())
        } else {
            if try_it {
                self.misses = self.misses.saturating_add(1);
            }
            self.stats.stored += 1;
            (kind::RAW, raw.len())
        };
        self.stats.wire += (super::frame::HEADER + wire) as u64;
        Ok(Header {
            kind,
            raw: len,
            wire: wire as u32,
        })
    }

    /// Compresses `raw` into `scratch`; true if it shrank by 1/32 or more.
    fn compress(&mut self, raw: &[u8]) -> bool {
        let room = raw.len() - raw.len() / 32;
        self.scratch.clear();
        self.scratch.reserve_exact(room);
        // A result that would not fit `room` is an error from zstd:
        // "did not shrink", the same as a large result.
        match self.zstd.compress_to_buffer(raw, &mut self.scratch) {
            Ok(n) => n > 0 && n < room,
            Err(_) => false,
        }
    }

    /// One observation: whether the link (not compression) held the
    /// stream back when this frame was queued.
    pub fn observe(&mut self, link_bound: bool) {
        if !self.adaptive || self.sampling() {
            return;
        }
        self.votes += 1;
        self.link_bound += u32::from(link_bound);
        if self.votes < VOTE_WINDOW {
            return;
        }
        let next = if self.link_bound * 4 >= VOTE_WINDOW * 3 {
            (self.level + 1).min(ADAPTIVE_MAX)
        } else if self.link_bound * 4 <= VOTE_WINDOW {
            (self.level - 1).max(ADAPTIVE_MIN)
        } else {
            self.level
        };
        (self.votes, self.link_bound) = (0, 0);
        if next != self.level && self.zstd.set_compression_level(next).is_ok() {
            self.level = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testdata::random;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| b"the quick brown fox jumps over the lazy dog\n"[i % 44])
            .collect()
    }

    fn kind_of(frame: &[u8]) -> u8 {
        frame[0]
    }

    #[test]
    fn random_blocks_switch_compression_to_sampling_and_text_switches_it_back() {
        let mut e = Encoder::new(Compress::Adaptive).unwrap();
        let noise = random(BLOCK, 1);
        for _ in 0..MISSES_TO_SAMPLE {
            let mut out = Vec::new();
            e.frame(&noise, &mut out).unwrap();
            assert_eq!(kind_of(&out), kind::RAW);
        }
        assert!(e.sampling());
        // While sampling, text goes raw until the sample point...
        let words = text(BLOCK);
        let mut kinds = Vec::new();
        for _ in 0..SAMPLE_EVERY {
            let mut out = Vec::new();
            e.frame(&words, &mut out).unwrap();
            kinds.push(kind_of(&out));
        }
        let raw = kinds.iter().filter(|k| **k == kind::RAW).count();
        assert_eq!(raw, SAMPLE_EVERY as usize - 1, "{kinds:?}");
        assert_eq!(*kinds.last().unwrap(), kind::ZSTD);
        // ...and from then on every block is compressed again.
        assert!(!e.sampling());
        let mut out = Vec::new();
        e.frame(&words, &mut out).unwrap();
        assert_eq!(kind_of(&out), kind::ZSTD);
    }

    /// A block framed in place is the same frame as one framed by copy,
    /// raw or compressed.
    #[test]
    fn framing_in_place_gives_the_same_frames() {
        for block in [text(1 << 20), random(1 << 20, 3)] {
            let mut copied = Vec::new();
            Encoder::new(Compress::Adaptive)
                .unwrap()
                .frame(&block, &mut copied)
                .unwrap();
            let mut buf = vec![0u8; crate::compress::frame::HEADER];
            buf.extend_from_slice(&block);
            let in_place = Encoder::new(Compress::Adaptive)
                .unwrap()
                .frame_in_place(buf)
                .unwrap();
            assert_eq!(in_place, copied);
        }
        let room = vec![0u8; crate::compress::frame::HEADER];
        assert!(Encoder::new(Compress::Adaptive)
            .unwrap()
            .frame_in_place(room)
            .is_err());
    }

    #[test]
    fn a_fixed_level_sends_noise_raw_too() {
        let mut e = Encoder::new(Compress::Fixed { level: 3 }).unwrap();
        let noise = random(BLOCK, 2);
        for _ in 0..2 * SAMPLE_EVERY {
            let mut out = Vec::new();
            e.frame(&noise, &mut out).unwrap();
            assert_eq!(kind_of(&out), kind::RAW);
        }
        // Named compressors sample too: no CPU wasted on noise.
        assert!(e.sampling());
        assert_eq!(e.stats.stored, 2 * SAMPLE_EVERY as u64);
        assert_eq!(e.stats.raw, 2 * SAMPLE_EVERY as u64 * BLOCK as u64);
    }

    #[test]
    fn the_level_follows_the_bottleneck_within_its_range() {
        let mut e = Encoder::new(Compress::Adaptive).unwrap();
        assert_eq!(e.level(), ADAPTIVE_START);
        for _ in 0..VOTE_WINDOW * 20 {
            e.observe(true);
        }
        assert_eq!(e.level(), ADAPTIVE_MAX);
        for _ in 0..VOTE_WINDOW * 20 {
            e.observe(false);
        }
        assert_eq!(e.level(), ADAPTIVE_MIN);
        // Half and half: stays.
        for i in 0..VOTE_WINDOW * 4 {
            e.observe(i % 2 == 0);
        }
        assert_eq!(e.level(), ADAPTIVE_MIN);
        let mut fixed = Encoder::new(Compress::Fixed { level: 7 }).unwrap();
        for _ in 0..VOTE_WINDOW * 4 {
            fixed.observe(false);
        }
        assert_eq!(fixed.level(), 7);
    }

    #[test]
    fn none_stores_every_block_and_counts_the_headers() {
        let mut e = Encoder::new(Compress::None).unwrap();
        let mut out = Vec::new();
        e.frame(&text(1000), &mut out).unwrap();
        e.frame(&[], &mut out).unwrap();
        assert_eq!(out.len(), super::super::frame::HEADER + 1000);
        assert_eq!(e.stats.wire, out.len() as u64);
        assert!(e.frame(&vec![0u8; (4 << 20) + 1], &mut out).is_err());
    }
}
