//! Where default mode's compression runs: for each remote end our binary
//! must be on that host (deployed once per run, `host/deploy.rs`) to
//! encode or decode there; this machine's end is done by the pump itself.
//! [`Compression`] finds or uploads it at most once per host, and decides
//! what happens when it cannot: a named `--compress` is an error (checked
//! before anything runs, [`Compression::prepare`]), the default falls back
//! to the plain stream with one warning.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};

use super::pipe::Codec;
use crate::cli::Location;
use crate::compress::Compress;
use crate::host::{deploy, Host};
use crate::progress::Progress;
use crate::sys::Unpoisoned;

pub struct Compression {
    compress: Compress,
    tmpdir: String,
    src: Location,
    dst: Location,
    /// Decided once: the codec, or none (fallen back), or why a named
    /// compressor cannot run.
    decided: Mutex<Option<Result<Option<Codec>, String>>>,
}

impl Compression {
    /// `None` when nothing is compressed: `--compress=none`, or both ends
    /// on this machine (no link to save).
    pub fn new(
        compress: Compress,
        tmpdir: &str,
        src: Location,
        dst: Location,
    ) -> Option<Compression> {
        let remote = |l: &Location| matches!(l, Location::Remote { .. });
        if !compress.is_on() || !(remote(&src) || remote(&dst)) {
            return None;
        }
        Some(Compression {
            compress,
            tmpdir: tmpdir.to_string(),
            src,
            dst,
            decided: Mutex::new(None),
        })
    }

    /// Deploys now when a named compressor was asked for, so that a host
    /// that cannot run it fails the run before anything changes.
    pub fn prepare(&self, hosts: [Arc<dyn Host>; 2], ui: &dyn Progress) -> Result<()> {
        if matches!(self.compress, Compress::Fixed { .. }) {
            self.codec(hosts, ui)?;
        }
        Ok(())
    }

    /// The codec for the next stream between the source's and the
    /// target's host (deploying on first use).
    pub fn codec(&self, hosts: [Arc<dyn Host>; 2], ui: &dyn Progress) -> Result<Option<Codec>> {
        let mut decided = self.decided.locked();
        if decided.is_none() {
            *decided = Some(self.decide(hosts, ui));
        }
        match decided.as_ref() {
            Some(Ok(c)) => Ok(c.clone()),
            Some(Err(e)) => Err(anyhow!("{e}")),
            None => Ok(None),
        }
    }

    fn decide(
        &self,
        hosts: [Arc<dyn Host>; 2],
        ui: &dyn Progress,
    ) -> Result<Option<Codec>, String> {
        let mut exes = Vec::new();
        for (location, host) in [&self.src, &self.dst].into_iter().zip(hosts) {
            if !matches!(location, Location::Remote { .. }) {
                exes.push(None);
                continue;
            }
            match deploy::deploy(&*host, &self.tmpdir) {
                Ok(d) => {
                    if d.uploaded {
                        ui.debug(&format!("uploaded resync to {}:{}", host.label(), d.path));
                    }
                    exes.push(Some(d.path));
                }
                Err(e) if self.compress == Compress::Adaptive => {
                    ui.warn(&format!(
                        "cannot run resync on {} to compress there ({e:#}); sending uncompressed",
                        host.label()
                    ));
                    return Ok(None);
                }
                Err(e) => {
                    return Err(format!(
                        "--compress needs resync on {}, which failed: {e:#}",
                        host.label()
                    ))
                }
            }
        }
        let dst_exe = exes.pop().flatten();
        let src_exe = exes.pop().flatten();
        Ok(Some(Codec {
            compress: self.compress,
            src_exe,
            dst_exe,
        }))
    }
}
