//! Compression on the wire (`--compress=NAME`): which names we accept and
//! what each becomes ([`Compress`]), the framed format both ends speak
//! ([`frame`], pure), the adaptive encoder that picks a zstd level and turns
//! itself off for data that does not shrink ([`encoder`], pure), and the
//! hidden subcommands that run on a remote host around `zfs send`/`zfs
//! receive` in default mode ([`filter`]). Everything is in-process zstd
//! (static libzstd, built by the `zstd` crate): the remote needs no
//! compressor installed, only our deployed binary (`host/deploy.rs`).
//!
//! Names: every value syncoid 2.3 accepts, each mapped to a zstd level near
//! the tool it names in ratio (one codec to build, audit and test):
//!
//! | `--compress=` | resync does | because |
//! |---|---|---|
//! | `default` (or no flag) | adaptive zstd, level 1..=9 | level rises while the link is the bottleneck, falls while compression is; after 4 blocks that do not shrink it only tries every 16th block |
//! | `none` | no framing: the stream as before | |
//! | `lz4` | zstd level -1 | zstd's fast mode is in lz4's class of speed |
//! | `lzo` | zstd level 1 | lzop (lzo1x-1) is fast with a modest ratio; zstd 1 is as fast and shrinks more |
//! | `zstd-fast`, `zstdmt-fast` | zstd level 3 | syncoid runs `zstd -3` |
//! | `gzip`, `pigz-fast` | zstd level 3 | syncoid runs `gzip -3`/`pigz -3`; zstd 3 shrinks at least as much, much faster |
//! | `pigz-slow` | zstd level 9 | `pigz -9`; zstd 9 shrinks more |
//! | `zstd-slow`, `zstdmt-slow` | zstd level 19 | syncoid runs `zstd -19` |
//! | `xz` | zstd level 19 | the zstd level nearest xz's default ratio |
//!
//! A named compressor keeps its level. Either way a block that does not
//! shrink goes raw (a flagged frame, no cost to the receiver), and after a
//! few such blocks only every 16th is tried.

pub mod encoder;
pub mod filter;
pub mod frame;

use anyhow::{bail, Result};

/// What `--compress` resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    /// `--compress=none`: the stream goes unframed, as without compression.
    None,
    /// The default: zstd at a level that follows the link; sampling only
    /// while blocks do not shrink.
    Adaptive,
    /// A named compressor: zstd at a fixed level.
    Fixed { level: i32 },
}

/// Every name syncoid 2.3 accepts, with the zstd level it maps to
/// (`None`: no compression; `Some(None)`: adaptive).
const NAMES: &[(&str, Option<Option<i32>>)] = &[
    ("default", Some(None)),
    ("none", None),
    ("lz4", Some(Some(-1))),
    ("lzo", Some(Some(1))),
    ("zstd-fast", Some(Some(3))),
    ("zstdmt-fast", Some(Some(3))),
    ("gzip", Some(Some(3))),
    ("pigz-fast", Some(Some(3))),
    ("pigz-slow", Some(Some(9))),
    ("zstd-slow", Some(Some(19))),
    ("zstdmt-slow", Some(Some(19))),
    ("xz", Some(Some(19))),
];

impl Compress {
    /// Parses a `--compress` value (syncoid's names).
    pub fn parse(name: &str) -> Result<Compress> {
        match NAMES.iter().find(|(n, _)| *n == name) {
            Some((_, None)) => Ok(Compress::None),
            Some((_, Some(None))) => Ok(Compress::Adaptive),
            Some((_, Some(Some(level)))) => Ok(Compress::Fixed { level: *level }),
            None => {
                let names: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
                bail!(
                    "unknown compression {name:?}; use one of {}",
                    names.join(", ")
                )
            }
        }
    }

    /// Whether the stream is framed at all.
    pub fn is_on(self) -> bool {
        self != Compress::None
    }

    /// The form a helper's command line carries: `adaptive` or `zstd:N`.
    pub fn spec(self) -> String {
        match self {
            Compress::None => "none".into(),
            Compress::Adaptive => "adaptive".into(),
            Compress::Fixed { level } => format!("zstd:{level}"),
        }
    }

    /// Parses [`Compress::spec`]'s output.
    pub fn parse_spec(s: &str) -> Result<Compress> {
        match s {
            "none" => Ok(Compress::None),
            "adaptive" => Ok(Compress::Adaptive),
            _ => {
                let level = s
                    .strip_prefix("zstd:")
                    .and_then(|l| l.parse::<i32>().ok())
                    .filter(|l| (encoder::LEVEL_FASTEST..=encoder::LEVEL_MAX).contains(l));
                match level {
                    Some(level) => Ok(Compress::Fixed { level }),
                    None => bail!("invalid compression spec {s:?}"),
                }
            }
        }
    }
}

/// clap's value parser for `--compress`.
pub fn parse_flag(s: &str) -> Result<Compress, String> {
    Compress::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_syncoid_name_is_accepted() {
        for name in [
            "gzip",
            "pigz-fast",
            "pigz-slow",
            "zstd-fast",
            "zstdmt-fast",
            "zstd-slow",
            "zstdmt-slow",
            "lz4",
            "xz",
            "lzo",
            "default",
            "none",
        ] {
            Compress::parse(name).unwrap();
        }
        assert_eq!(Compress::parse("none").unwrap(), Compress::None);
        assert_eq!(Compress::parse("default").unwrap(), Compress::Adaptive);
        assert_eq!(
            Compress::parse("zstd-slow").unwrap(),
            Compress::Fixed { level: 19 }
        );
    }

    #[test]
    fn unknown_names_are_one_line_errors() {
        for bad in ["", "zstd", "LZO", "bzip2", "zstd-fast "] {
            let e = Compress::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("unknown compression") && !e.contains('\n'),
                "{e}"
            );
        }
    }

    #[test]
    fn specs_round_trip_and_bad_ones_are_refused() {
        for c in [
            Compress::None,
            Compress::Adaptive,
            Compress::Fixed { level: -1 },
            Compress::Fixed { level: 19 },
        ] {
            assert_eq!(Compress::parse_spec(&c.spec()).unwrap(), c);
        }
        for bad in ["zstd:", "zstd:x", "zstd:99", "zstd:-100", "lz4", ""] {
            assert!(Compress::parse_spec(bad).is_err(), "{bad}");
        }
    }
}

/// Test data shared by the encoder's and the frame format's tests.
#[cfg(test)]
pub(crate) mod testdata {
    /// `n` bytes of xorshift noise (incompressible), from `seed`.
    pub fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }
}
