//! `--chunked`: the entry into the chunk orchestrator. The stream moves as
//! chunk files between session folders on both hosts (see
//! `chunk::orchestrator`); both helpers must report success, like both zfs
//! commands in the plain pipe. This module finds our binary on each host
//! (a copy of the running image locally, a deployed copy remotely, with
//! reconnects while deploying), hands the orchestrator the swappable host
//! handles and a way to reconnect, and records each session in the run
//! lock. Re-attaching to a session an earlier run left is [`Chunked::run`]
//! with [`orchestrator::Start::Attach`].

use std::sync::{Arc, Mutex};

use crate::sys::Unpoisoned;
use anyhow::{Context, Result};

use super::{Mover, Request};
use crate::chunk::{orchestrator, session};
use crate::cli::Location;
use crate::host::deploy;
use crate::host::local::LocalHost;
use crate::host::quote::sh_join;
use crate::host::reconnect::Reconnecting;
use crate::host::Host;
use crate::progress::{human_bytes, human_duration, human_rate, Progress, Stopwatch, Transfer};
use crate::runlock::RunLock;
use crate::zfs::Dataset;

/// One host of a chunked transfer.
pub struct Side<'a> {
    pub host: &'a Reconnecting<'a>,
    pub location: &'a Location,
    /// Our binary on this host (found or uploaded once).
    helper: Mutex<Option<String>>,
}

impl<'a> Side<'a> {
    pub fn new(host: &'a Reconnecting<'a>, location: &'a Location) -> Side<'a> {
        Side {
            host,
            location,
            helper: Mutex::new(None),
        }
    }

    pub fn host(&self) -> Arc<dyn Host> {
        self.host.get()
    }
}

/// Which host of the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Target,
}

/// The chunk orchestrator as a [`super::Mover`].
pub struct Chunked<'a> {
    pub src: Side<'a>,
    pub dst: Side<'a>,
    /// From [`crate::cli::Config::chunk_options`]: chunk size, window,
    /// tmpdir, timeout, bandwidth limit.
    pub opts: orchestrator::Options,
    pub lock: Option<&'a RunLock>,
    pub ui: &'a dyn Progress,
    /// Chunks moved and bytes re-sent, per target dataset, for `--json`.
    pub totals: ChunkTotals,
}

/// Chunk counts summed per target dataset over a run's sessions.
#[derive(Debug, Default)]
pub struct ChunkTotals(Mutex<Vec<(String, u64, u64)>>);

impl ChunkTotals {
    fn add(&self, target: &str, stats: &orchestrator::Stats) {
        let mut all = self.0.locked();
        match all.iter_mut().find(|(t, _, _)| t == target) {
            Some((_, chunks, resent)) => {
                *chunks += stats.chunks;
                *resent += stats.resent;
            }
            None => all.push((target.to_string(), stats.chunks, stats.resent)),
        }
    }

    /// `(chunks, bytes re-sent)` of the sessions into `target`, if any ran.
    pub fn of(&self, target: &str) -> Option<(u64, u64)> {
        self.0
            .locked()
            .iter()
            .find(|(t, _, _)| t == target)
            .map(|&(_, chunks, resent)| (chunks, resent))
    }
}

impl Chunked<'_> {
    fn side(&self, end: End) -> &Side<'_> {
        match end {
            End::Source => &self.src,
            End::Target => &self.dst,
        }
    }

    /// Our binary on a side's host: locally a copy of the running image
    /// (by MD5, under `--tmpdir`), else a copy deployed there.
    pub fn helper_exe(&self, end: End) -> Result<String> {
        let side = self.side(end);
        let mut cached = side.helper.locked();
        if let Some(path) = &*cached {
            return Ok(path.clone());
        }
        let path = match side.location {
            Location::Local => local_helper(&self.opts.tmpdir)?,
            Location::Remote { .. } => {
                let d = self.deploy_retrying(side)?;
                if d.uploaded {
                    self.ui.debug(&format!(
                        "uploaded resync to {}:{}",
                        side.host().label(),
                        d.path
                    ));
                }
                d.path
            }
        };
        *cached = Some(path.clone());
        Ok(path)
    }

    /// Deploys our binary to a side's host; a lost connection is replaced
    /// (with backoff) until `--timeout` passes.
    fn deploy_retrying(&self, side: &Side) -> Result<deploy::Deployed> {
        let deadline = std::time::Instant::now() + self.opts.timeout;
        side.host
            .retrying(deadline, &|note| self.ui.debug(note), |host| {
                deploy::deploy(host, &self.opts.tmpdir)
                    .with_context(|| format!("installing resync on {}", host.label()))
            })
    }

    /// Runs the chunk orchestrator for the step `identity` (recorded in the
    /// session's manifest), with new helpers or re-attached to live ones.
    pub fn run(
        &self,
        start: orchestrator::Start,
        identity: Option<session::Identity>,
        bar: Box<dyn Transfer>,
    ) -> Result<orchestrator::Stats> {
        let src_exe = self.helper_exe(End::Source)?;
        let dst_exe = self.helper_exe(End::Target)?;
        let announce = |m: &session::Manifest| {
            let text = format!("{} on {}", m.session_id(), m.receiver_host);
            self.ui.debug(&format!("chunk session {text}"));
            if let Some(lock) = self.lock {
                if let Err(e) = lock.note_session(&text) {
                    self.ui
                        .debug(&format!("recording the session in the run lock: {e:#}"));
                }
            }
        };
        let target = identity.as_ref().map(|i| i.target.clone());
        let sess = identity.map(|identity| orchestrator::Session {
            target_label: match (Dataset::parse(&identity.target), self.dst.location) {
                (Ok(ds), Location::Remote { .. }) => {
                    format!("{}:{ds}", self.dst.host().label())
                }
                _ => identity.target.clone(),
            },
            identity,
            announce: &announce,
        });
        let debug = |line: &str| self.ui.debug(line);
        let watch = Stopwatch::start();
        let result = orchestrator::run_session(
            orchestrator::Side {
                host: self.src.host.cell(),
                reconnect: self.src.host.connector(),
                exe: src_exe,
            },
            orchestrator::Side {
                host: self.dst.host.cell(),
                reconnect: self.dst.host.connector(),
                exe: dst_exe,
            },
            start,
            sess,
            &self.opts,
            &*bar,
            &debug,
        );
        bar.finish();
        let stats = result?;
        if let Some(target) = target {
            self.totals.add(&target, &stats);
        }
        let took = watch.elapsed();
        self.ui.info(&format!(
            "chunked: {} ({} bytes) in {} chunks, {} reconnects, {} re-sent ({} bytes), {} ({})",
            human_bytes(stats.bytes),
            stats.bytes,
            stats.chunks,
            stats.reconnects,
            human_bytes(stats.resent),
            stats.resent,
            human_duration(took),
            human_rate(stats.bytes, took)
        ));
        if self.opts.compress.is_on() {
            self.ui.info(&format!(
                "compressed: {} ({} bytes) of stream in {} ({} bytes) of chunk files ({:.2}x)",
                human_bytes(stats.bytes),
                stats.bytes,
                human_bytes(stats.copied),
                stats.copied,
                stats.bytes as f64 / stats.copied.max(1) as f64
            ));
        }
        Ok(stats)
    }
}

impl Mover for Chunked<'_> {
    fn transfer(&self, req: &Request, bar: Box<dyn Transfer>) -> Result<u64> {
        for (side, argv) in [(&self.src, &req.send), (&self.dst, &req.recv)] {
            self.ui.debug(&format!(
                "[{}] {} (chunked)",
                side.host().label(),
                sh_join(argv)
            ));
        }
        let start = orchestrator::Start::New {
            send: &req.send,
            recv: &req.recv,
        };
        Ok(self.run(start, Some(req.session.clone()), bar)?.bytes)
    }
}

/// The helper binary on this machine: a copy of the image this process
/// runs (read through `/proc/self/exe`, which stays that image even when
/// an upgrade replaced the file at our path), kept by MD5 under `tmpdir`.
/// `current_exe()` would name the path, i.e. the new binary after an
/// upgrade mid-run, whose helpers might not speak our protocol.
fn local_helper(tmpdir: &str) -> Result<String> {
    let d = deploy::deploy(&LocalHost::new(), tmpdir)
        .context("copying our own binary for the local chunk helpers")?;
    Ok(d.path)
}
