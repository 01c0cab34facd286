//! `--chunked`: the entry into the chunk orchestrator. The stream moves as
//! chunk files between session folders on both hosts (see
//! `chunk::orchestrator`); both helpers must report success, like both zfs
//! commands in the plain pipe. This module finds our binary on each host
//! (a copy of the running image locally, a deployed copy remotely, with
//! reconnects while deploying), hands the orchestrator the swappable host
//! handles and a way to reconnect, and records each session in the run
//! lock. Re-attaching to a session an earlier run left is [`Chunked::run`]
//! with [`orchestrator::Start::Attach`].

use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};

use super::{Mover, Request};
use crate::chunk::{orchestrator, session};
use crate::cli::{Config, Location};
use crate::deploy;
use crate::endpoint;
use crate::host::local::LocalHost;
use crate::host::quote::sh_join;
use crate::host::{is_connection_lost, Host};
use crate::progress::{human_bytes, human_duration, human_rate, Progress, Stopwatch, Transfer};
use crate::runlock::RunLock;
use crate::zfs::Dataset;

/// One host of a chunked transfer.
pub struct Side<'a> {
    pub host: &'a RwLock<Arc<dyn Host>>,
    pub location: &'a Location,
    /// Our binary on this host (found or uploaded once).
    helper: Mutex<Option<String>>,
}

impl<'a> Side<'a> {
    pub fn new(host: &'a RwLock<Arc<dyn Host>>, location: &'a Location) -> Side<'a> {
        Side {
            host,
            location,
            helper: Mutex::new(None),
        }
    }

    pub fn host(&self) -> Arc<dyn Host> {
        self.host.read().unwrap_or_else(|p| p.into_inner()).clone()
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
    pub cfg: &'a Config,
    pub lock: Option<&'a RunLock>,
    pub ui: &'a dyn Progress,
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
        let mut cached = side.helper.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &*cached {
            return Ok(path.clone());
        }
        let path = match side.location {
            Location::Local => local_helper(&self.cfg.tmpdir)?,
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
    // MERGE: the backoff loop moves to host/reconnect.rs.
    fn deploy_retrying(&self, side: &Side) -> Result<deploy::Deployed> {
        let deadline = std::time::Instant::now() + self.cfg.timeout;
        let mut pause = std::time::Duration::from_millis(250);
        loop {
            let host = side.host();
            let err = match deploy::deploy(&*host, &self.cfg.tmpdir) {
                Ok(d) => return Ok(d),
                Err(e) => e.context(format!("installing resync on {}", host.label())),
            };
            if !is_connection_lost(&err) || std::time::Instant::now() >= deadline {
                return Err(err);
            }
            self.ui.debug(&format!("{err:#}; reconnecting"));
            loop {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(4));
                match endpoint::connect(side.location, self.cfg) {
                    Ok(h) => {
                        *side.host.write().unwrap_or_else(|p| p.into_inner()) = h;
                        break;
                    }
                    Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                    Err(e) => self.ui.debug(&format!("reconnecting failed: {e:#}")),
                }
            }
        }
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
        let reconnect_src = || endpoint::connect(self.src.location, self.cfg);
        let reconnect_dst = || endpoint::connect(self.dst.location, self.cfg);
        let opts = orchestrator::Options {
            chunk_size: self.cfg.chunk_size,
            window: self.cfg.chunk_window,
            timeout: self.cfg.timeout,
            tmpdir: self.cfg.tmpdir.clone(),
            bwlimit: self.cfg.bwlimit(),
        };
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
                host: self.src.host,
                reconnect: &reconnect_src,
                exe: src_exe,
            },
            orchestrator::Side {
                host: self.dst.host,
                reconnect: &reconnect_dst,
                exe: dst_exe,
            },
            start,
            sess,
            &opts,
            &*bar,
            &debug,
        );
        bar.finish();
        let stats = result?;
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
