//! One run of resync in the default (streaming) mode: connect to both sides,
//! detect what each ZFS supports, list the datasets, take the sync snapshot,
//! then for each dataset gather both sides' state, ask the pure planner what
//! to do, execute its steps (send | receive through this process), verify
//! that the target really holds what was sent, and prune old sync snapshots.
//! After executing a plan it gathers and plans again: a dataset is done only
//! when the planner, on fresh listings, says it is up to date.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};

use crate::bwlimit::Limiter;
use crate::chunk::{orchestrator, session};
use crate::cli::{Config, Endpoint, Location};
use crate::host::deploy;
use crate::host::local::LocalHost;
use crate::host::quote::sh_join;
use crate::host::reconnect::Reconnecting;
use crate::host::ssh::{resolve_address, SshHost, SshOptions, SshSpec};
use crate::host::{is_connection_lost, CmdOutput, Host};
use crate::plan::protect::{self, HoldSide};
use crate::plan::resume;
use crate::plan::syncsnap;
use crate::plan::{self, Plan, PlanOptions, SourceState, Step, TargetState};
use crate::progress::{human_bytes, human_duration, human_rate, Progress, Stopwatch, Transfer};
use crate::runlock::{self, RunLock};
use crate::stream::{self, PumpError};
use crate::zfs::{
    self, Capabilities, Dataset, ProbeResult, RecvArgs, SendArgs, Snapshot, ZfsError, ZfsErrorKind,
};

/// How many gather-plan-execute rounds one dataset may take before we call it
/// a bug instead of looping (resume, then the rest, then "up to date").
const MAX_ROUNDS: usize = 4;

mod reattach;

/// What a finished run reports back to `main`.
pub struct Outcome {
    pub replicated: usize,
    pub failed: Vec<(String, anyhow::Error)>,
}

/// One side of the run: where it is, and what its ZFS can do.
struct Side<'a> {
    /// Replaced when `--chunked` mode reconnects after a lost connection.
    host: Reconnecting<'a>,
    /// Our binary on this host, for `--chunked` (found or uploaded once).
    helper: Mutex<Option<String>>,
    caps: Capabilities,
    endpoint: Endpoint,
}

impl Side<'_> {
    fn host(&self) -> Arc<dyn Host> {
        self.host.get()
    }

    fn label(&self, ds: &Dataset) -> String {
        match &self.endpoint.location {
            Location::Local => ds.to_string(),
            Location::Remote { .. } => format!("{}:{}", self.host().label(), ds),
        }
    }
}

struct Run<'a> {
    cfg: &'a Config,
    ui: &'a dyn Progress,
    src: Side<'a>,
    dst: Side<'a>,
    hostname: String,
    /// Held for the whole run (not in a dry run, which changes nothing).
    lock: Option<RunLock>,
    /// The step being executed, for `--chunked` session manifests.
    chunk_step: Mutex<Option<session::Identity>>,
}

/// Replicates according to `cfg`. An `Err` is a failure of the whole run
/// (exit 2); failures of single datasets in a recursive run are collected in
/// the `Outcome` (exit 1).
pub fn run(cfg: &Config, ui: &dyn Progress) -> Result<Outcome> {
    let lock = if cfg.dry_run {
        None
    } else {
        Some(lock_target(cfg)?)
    };
    let src_host = connect(&cfg.source.location, cfg)?;
    let dst_host = if cfg.target.location == cfg.source.location {
        src_host.clone()
    } else {
        connect(&cfg.target.location, cfg)?
    };
    let src_caps = detect(&*src_host, cfg.source.dataset.pool(), ui)
        .with_context(|| format!("on source host {}", src_host.label()))?;
    let dst_caps = detect(&*dst_host, cfg.target.dataset.pool(), ui)
        .with_context(|| format!("on target host {}", dst_host.label()))?;
    let run = Run {
        cfg,
        ui,
        src: Side {
            host: Reconnecting::new(src_host, || connect(&cfg.source.location, cfg)),
            helper: Mutex::new(None),
            caps: src_caps,
            endpoint: cfg.source.clone(),
        },
        dst: Side {
            host: Reconnecting::new(dst_host, || connect(&cfg.target.location, cfg)),
            helper: Mutex::new(None),
            caps: dst_caps,
            endpoint: cfg.target.clone(),
        },
        hostname: local_hostname(),
        lock,
        chunk_step: Mutex::new(None),
    };
    run.stop_leftovers()?;
    run.announce_missing_protection();
    run.all()
}

fn connect(location: &Location, cfg: &Config) -> Result<Arc<dyn Host>> {
    match location {
        Location::Local => Ok(Arc::new(LocalHost::new())),
        Location::Remote { user, host } => {
            let spec = SshSpec {
                user: user.clone(),
                host: host.clone(),
            };
            Ok(Arc::new(SshHost::connect(&spec, &ssh_options(cfg)?)?))
        }
    }
}

fn ssh_options(cfg: &Config) -> Result<SshOptions> {
    let home = std::env::var_os("HOME")
        .map(Into::into)
        .ok_or_else(|| anyhow!("HOME is not set; cannot find ~/.ssh"))?;
    Ok(SshOptions {
        port: cfg.ssh_port,
        key: cfg.ssh_key.clone(),
        accept_new_host_key: cfg.accept_new_host_key,
        connect_timeout: std::time::Duration::from_secs(15),
        io_timeout: io_timeout(cfg),
        home,
    })
}

/// The run lock for the target, keyed by the host it resolves to (ssh
/// config's HostName and Port), not by how it was spelled.
fn lock_target(cfg: &Config) -> Result<RunLock> {
    let address = match &cfg.target.location {
        Location::Local => None,
        Location::Remote { user, host } => {
            let spec = SshSpec {
                user: user.clone(),
                host: host.clone(),
            };
            Some(resolve_address(&spec, &ssh_options(cfg)?)?)
        }
    };
    RunLock::for_target(
        address.as_ref().map(|(host, port)| (host.as_str(), *port)),
        &cfg.target.dataset.to_string(),
        &cfg.target.to_string(),
    )
}

/// How long an SSH connection may stall before it counts as lost. In
/// `--chunked` mode a lost connection is cheap (reconnect, read the folders
/// again) while `--timeout` is the budget without progress for the whole
/// transfer, so connections are declared dead much sooner.
fn io_timeout(cfg: &Config) -> std::time::Duration {
    if cfg.chunked {
        cfg.timeout.min(CHUNKED_IO_TIMEOUT)
    } else {
        cfg.timeout
    }
}

/// See [`io_timeout`].
const CHUNKED_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);

/// Probes what the ZFS behind `host` supports, on `pool`, which must exist.
fn detect(host: &dyn Host, pool: &str, ui: &dyn Progress) -> Result<Capabilities> {
    let pool_ds = Dataset::parse(pool)?;
    let out = exec(host, &zfs::dataset_exists_argv(&pool_ds), ui)?;
    if !out.success() {
        if zfs::is_missing_dataset_error(&out.stderr) {
            bail!("pool {pool} does not exist on {}", host.label());
        }
        out.check("zfs list", host.label())?;
    }
    // The probes are independent: run them on parallel channels, since
    // each remote command costs a round trip and a fork on the server.
    let probes = zfs::capability_probes(pool);
    let outputs = std::thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter()
            .map(|(probe, argv)| (*probe, scope.spawn(move || exec(host, argv, ui))))
            .collect();
        running
            .into_iter()
            .map(|(probe, handle)| match handle.join() {
                Ok(out) => out.map(|o| (probe, o)),
                Err(_) => Err(anyhow!("capability probe {probe:?} panicked")),
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let results: Vec<ProbeResult> = outputs
        .iter()
        .map(|(probe, o)| ProbeResult {
            probe: *probe,
            status: o.status,
            stdout: &o.stdout,
            stderr: &o.stderr,
        })
        .collect();
    let caps = zfs::capabilities_from(&results);
    ui.debug(&format!("{}: capabilities {caps:?}", host.label()));
    Ok(caps)
}

/// Runs argv on a host, logging it with `--debug`.
fn exec(host: &dyn Host, argv: &[String], ui: &dyn Progress) -> Result<CmdOutput> {
    ui.debug(&format!("[{}] {}", host.label(), sh_join(argv)));
    let out = host.run(argv)?;
    if !out.success() {
        let first = out
            .stderr
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        ui.debug(&format!("[{}] exit {}: {first}", host.label(), out.status));
    }
    Ok(out)
}

/// Runs argv and turns a non-zero exit into an error carrying its stderr.
fn exec_ok(host: &dyn Host, argv: &[String], what: &str, ui: &dyn Progress) -> Result<String> {
    exec(host, argv, ui)?.check(what, host.label())
}

/// Like [`exec_ok`], but retries while ZFS says the dataset is busy: right
/// after a receive, zfs-fuse refuses destroy and rollback for a few seconds.
fn exec_ok_when_idle(
    host: &dyn Host,
    argv: &[String],
    what: &str,
    ui: &dyn Progress,
) -> Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = exec(host, argv, ui)?;
        if out.success() || !zfs::is_busy_error(&out.stderr) || std::time::Instant::now() > deadline
        {
            return out.check(what, host.label());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

impl Run<'_> {
    /// Stops the `zfs send`/`receive` processes an interrupted earlier run
    /// left on our hosts (see `runlock`), so they neither hold the target
    /// busy nor look like a run in progress.
    fn stop_leftovers(&self) -> Result<()> {
        let Some(lock) = &self.lock else {
            return Ok(());
        };
        let leftovers = lock.leftovers().to_vec();
        for p in &leftovers {
            let host = [self.src.host(), self.dst.host()]
                .into_iter()
                .find(|h| h.label() == p.host);
            let Some(host) = host else {
                self.ui.debug(&format!(
                    "leftover process on {} not on this run's hosts",
                    p.host
                ));
                continue;
            };
            let out = exec(&*host, &runlock::stop_argv(p), self.ui)?;
            if out.stdout.contains("stopped") {
                self.ui.info(&format!(
                    "stopped a zfs process (pid {}) left running on {} by an interrupted run",
                    p.pid, p.host
                ));
            }
        }
        lock.forget(&leftovers)
    }

    fn all(&self) -> Result<Outcome> {
        let pairs = self.dataset_pairs()?;
        if pairs.is_empty() {
            bail!(
                "nothing to replicate: every dataset under {} was excluded",
                self.cfg.source
            );
        }
        if self.cfg.dry_run && self.cfg.sync_snap {
            self.ui.info("dry run: nothing will be changed");
        }
        let mut outcome = Outcome {
            replicated: 0,
            failed: Vec::new(),
        };
        let mut failed_sources: Vec<Dataset> = Vec::new();
        for (src, dst) in &pairs {
            let label = format!("{} -> {}", self.src.label(src), self.dst.label(dst));
            if let Some(parent) = failed_sources
                .iter()
                .find(|f| src.relative_to(f).is_some_and(|r| !r.is_empty()))
            {
                let err = anyhow!("skipped because its parent {parent} failed");
                self.ui.warn(&format!("{label}: {err}"));
                outcome.failed.push((label, err));
                failed_sources.push(src.clone());
                continue;
            }
            match self.one(src, dst) {
                Ok(()) => outcome.replicated += 1,
                Err(e) if !self.cfg.recursive => return Err(e.context(label)),
                Err(e) => {
                    eprintln!("resync: {label}: {e:#}");
                    outcome.failed.push((label, e));
                    failed_sources.push(src.clone());
                }
            }
        }
        Ok(outcome)
    }

    /// Source datasets to replicate, each with its target name.
    fn dataset_pairs(&self) -> Result<Vec<(Dataset, Dataset)>> {
        let root = &self.cfg.source.dataset;
        let out = exec(
            &*self.src.host(),
            &zfs::list_datasets_argv(root, self.cfg.recursive),
            self.ui,
        )?;
        if !out.success() && zfs::is_missing_dataset_error(&out.stderr) {
            bail!("source dataset {} does not exist", self.src.label(root));
        }
        let listed = zfs::parse_dataset_list(&out.check("zfs list", self.src.host().label())?)?;
        let mut pairs = Vec::new();
        for ds in listed {
            let Some(rel) = ds.relative_to(root) else {
                continue;
            };
            if self.cfg.skip_parent && rel.is_empty() {
                continue;
            }
            if let Some(re) = self.cfg.exclude.iter().find(|re| re.is_match(ds.as_str())) {
                self.ui.debug(&format!(
                    "{ds}: excluded by --exclude-datasets {}",
                    re.as_str()
                ));
                continue;
            }
            let target = self.cfg.target.dataset.join(rel)?;
            pairs.push((ds, target));
        }
        Ok(pairs)
    }

    /// Replicates one dataset until the planner says it is up to date.
    fn one(&self, src: &Dataset, dst: &Dataset) -> Result<()> {
        let label = format!("{} -> {}", self.src.label(src), self.dst.label(dst));
        let watch = Stopwatch::start();
        self.check_target_parent(dst)?;
        // A session an interrupted chunked run left on the target: finish
        // its step first (or refuse, if someone is driving it).
        let attached = match self.cfg.chunked && !self.cfg.dry_run {
            true => self.reattach(src, dst)?,
            false => 0,
        };
        let sync_name = match self.cfg.sync_snap {
            true => Some(self.take_sync_snapshot(src)?),
            false => None,
        };
        let sync_name = sync_name.as_deref();
        let opts = PlanOptions {
            no_stream: self.cfg.no_stream,
            force_delete: self.cfg.force_delete,
            resume: self.cfg.resume && self.src.caps.resume_tokens && self.dst.caps.resume_tokens,
        };
        let mut bytes = attached;
        let mut last_round_steps: Vec<Step> = Vec::new();
        for round in 1..=MAX_ROUNDS {
            let mut source = self.source_state(src)?;
            if self.cfg.dry_run {
                if let Some(name) = sync_name {
                    source.snapshots.push(Snapshot {
                        name: name.to_string(),
                        guid: 0,
                        createtxg: u64::MAX,
                    });
                }
            }
            let target = self.target_state(dst)?;
            match plan::plan(&source, &target, &opts) {
                Plan::UpToDate { snapshot } => {
                    if self.cfg.dry_run {
                        println!("{label}: up to date at @{}", snapshot.name);
                        return Ok(());
                    }
                    self.protect(src, dst, &source, &target, &snapshot);
                    self.prune(src, dst, sync_name);
                    let summary = if bytes == 0 {
                        format!("{label}: up to date at @{}", snapshot.name)
                    } else {
                        format!(
                            "{label}: {} in {} ({}), now at @{}",
                            human_bytes(bytes),
                            human_duration(watch.elapsed()),
                            human_rate(bytes, watch.elapsed()),
                            snapshot.name
                        )
                    };
                    self.ui.info(&summary);
                    return Ok(());
                }
                Plan::Conflict(conflict) => {
                    bail!("{conflict}");
                }
                Plan::Replicate(steps) => {
                    if self.cfg.dry_run {
                        for step in &steps {
                            println!("{label}: would {}", describe(step));
                        }
                        return Ok(());
                    }
                    if round > 1 && steps == last_round_steps {
                        bail!(
                            "the target did not change after executing the plan ({}); refusing to loop",
                            describe_all(&steps)
                        );
                    }
                    let mut discarded = false;
                    for step in &steps {
                        match self.execute(src, dst, step) {
                            Ok(n) => bytes += n,
                            Err(e) if self.discarded_after(src, dst, step, &e)? => {
                                // The target changed: the same plan may
                                // rightly come again.
                                discarded = true;
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    last_round_steps = if discarded { Vec::new() } else { steps };
                }
            }
        }
        bail!(
            "still not up to date after {MAX_ROUNDS} rounds (last plan: {}); this is a bug, please report it",
            describe_all(&last_round_steps)
        )
    }

    /// Takes this run's sync snapshot on `src` and returns its name. Names
    /// have one-second resolution: if a run a moment ago took the same name,
    /// wait for the next second and take a fresh one.
    fn take_sync_snapshot(&self, src: &Dataset) -> Result<String> {
        let id = self.cfg.identifier.as_deref();
        let mut attempt = 0;
        loop {
            let name = syncsnap::new_name(id, &self.hostname, SystemTime::now());
            if self.cfg.dry_run {
                println!("would snapshot {}@{name}", self.src.label(src));
                return Ok(name);
            }
            let out = exec(
                &*self.src.host(),
                &zfs::create_snapshot_argv(src, &name),
                self.ui,
            )?;
            attempt += 1;
            if !out.success()
                && zfs::error::kind_of(&out.stderr) == ZfsErrorKind::AlreadyExists
                && attempt < 3
            {
                let into_second = SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_nanos(
                    1_000_000_000 - u64::from(into_second) + 10_000_000,
                ));
                continue;
            }
            out.check("zfs snapshot", self.src.host().label())
                .with_context(|| format!("cannot take sync snapshot {}", src.snapshot(&name)))?;
            return Ok(name);
        }
    }

    /// A clear error instead of zfs receive's when the target's parent is missing.
    fn check_target_parent(&self, dst: &Dataset) -> Result<()> {
        let Some((parent, _)) = dst.as_str().rsplit_once('/') else {
            return Ok(());
        };
        let parent = Dataset::parse(parent)?;
        let out = exec(
            &*self.dst.host(),
            &zfs::dataset_exists_argv(&parent),
            self.ui,
        )?;
        if !out.success() {
            if zfs::is_missing_dataset_error(&out.stderr) {
                bail!(
                    "the target's parent {} does not exist; create it first (zfs create -p {})",
                    self.dst.label(&parent),
                    parent
                );
            }
            out.check("zfs list", self.dst.host().label())?;
        }
        Ok(())
    }

    fn source_state(&self, ds: &Dataset) -> Result<SourceState> {
        // Bookmarks come in the same listing where the ZFS has them.
        let argv = match self.src.caps.bookmarks {
            true => zfs::list_snapshots_and_bookmarks_argv(ds),
            false => zfs::list_snapshots_argv(ds, &self.src.caps),
        };
        let out = exec_ok(&*self.src.host(), &argv, "listing snapshots", self.ui)
            .with_context(|| format!("source {}", self.src.label(ds)))?;
        Ok(SourceState {
            dataset: ds.to_string(),
            snapshots: zfs::parse_snapshot_list(ds, &out)?,
            bookmarks: zfs::parse_bookmark_list(ds, &out)?,
        })
    }

    fn target_state(&self, ds: &Dataset) -> Result<TargetState> {
        let host = self.dst.host();
        let host = &*host;
        let out = exec(host, &zfs::list_snapshots_argv(ds, &self.dst.caps), self.ui)?;
        if !out.success() && zfs::is_missing_dataset_error(&out.stderr) {
            return Ok(TargetState {
                exists: false,
                snapshots: Vec::new(),
                resume_token: None,
            });
        }
        let listing = out
            .check("listing snapshots", host.label())
            .with_context(|| format!("target {}", self.dst.label(ds)))?;
        let snapshots = zfs::parse_snapshot_list(ds, &listing)?;
        let resume_token = if self.dst.caps.resume_tokens {
            let out = exec_ok(
                host,
                &zfs::resume_token_argv(ds),
                "reading receive_resume_token",
                self.ui,
            )?;
            zfs::parse_resume_token(&out)
        } else {
            None
        };
        Ok(TargetState {
            exists: true,
            snapshots,
            resume_token,
        })
    }

    /// Executes one planned step; returns the bytes streamed.
    fn execute(&self, src: &Dataset, dst: &Dataset, step: &Step) -> Result<u64> {
        let recv = RecvArgs {
            resumable: self.dst.caps.resume_tokens,
            force: self.cfg.rollback,
            options: &self.cfg.recv_options,
        };
        match step {
            Step::AbortPartial => {
                let why = if self.cfg.resume {
                    "the source's ZFS cannot resume it (no send -t)"
                } else {
                    "--no-resume"
                };
                self.abort_partial(
                    dst,
                    &format!(
                        "{}: discarding a partial receive ({why})",
                        self.dst.label(dst)
                    ),
                )?;
                Ok(0)
            }
            Step::DestroyTarget => {
                self.ui.warn(&format!(
                    "--force-delete: destroying {} and its snapshots",
                    self.dst.label(dst)
                ));
                exec_ok_when_idle(
                    &*self.dst.host(),
                    &zfs::destroy_recursive_argv(dst),
                    "zfs destroy",
                    self.ui,
                )?;
                Ok(0)
            }
            Step::Rollback { to } => {
                self.ui.warn(&format!(
                    "--force-delete: rolling {} back to @{}, destroying newer target snapshots",
                    self.dst.label(dst),
                    to.name
                ));
                exec_ok_when_idle(
                    &*self.dst.host(),
                    &zfs::rollback_argv(dst, &to.name),
                    "zfs rollback",
                    self.ui,
                )?;
                Ok(0)
            }
            Step::DiscardPartial { why } => {
                self.discard_partial(dst, &why.to_string())?;
                Ok(0)
            }
            Step::Resume { token, received } => {
                self.ui.info(&format!(
                    "{}: resuming an interrupted receive ({} already there)",
                    self.dst.label(dst),
                    human_bytes(*received)
                ));
                let send = zfs::send_resume_argv(token, &self.cfg.send_options);
                self.note_step(
                    src,
                    dst,
                    session::Stream::Resume {
                        token: token.clone(),
                    },
                );
                let recv = RecvArgs {
                    resumable: true,
                    ..recv
                };
                let n = self.transfer(
                    &send,
                    &zfs::receive_argv(dst, &recv),
                    &format!("{src} (resume)"),
                    *received,
                )?;
                Ok(n)
            }
            Step::Full { to } => self.send_step(src, dst, None, to, false, &recv),
            Step::Incremental {
                from,
                to,
                intermediates,
            } => self.send_step(src, dst, Some(from), to, *intermediates, &recv),
            Step::FromBookmark { bookmark, to } => {
                self.hold_for_step(src, dst, &[to]);
                let send = zfs::send_from_bookmark_argv(
                    src,
                    &bookmark.name,
                    &to.name,
                    &self.cfg.send_options,
                );
                let label = format!("{src}#{}..@{}", bookmark.name, to.name);
                let n = self.transfer(&send, &zfs::receive_argv(dst, &recv), &label, 0)?;
                self.verify(dst, to)?;
                Ok(n)
            }
        }
    }

    /// Sends `to` (in full, or from `from`), then verifies that the target
    /// holds it with the source's GUID.
    fn send_step(
        &self,
        src: &Dataset,
        dst: &Dataset,
        from: Option<&Snapshot>,
        to: &Snapshot,
        intermediates: bool,
        recv: &RecvArgs,
    ) -> Result<u64> {
        self.hold_for_step(src, dst, &from.into_iter().chain([to]).collect::<Vec<_>>());
        let send = zfs::send_argv(
            src,
            &SendArgs {
                from: from.map(|f| f.name.as_str()),
                to: &to.name,
                intermediates,
                options: &self.cfg.send_options,
            },
        );
        let label = match from {
            Some(f) => format!("{src}@{}..@{}", f.name, to.name),
            None => format!("{src}@{}", to.name),
        };
        let stream = match from {
            Some(from) => session::Stream::Incremental {
                from: from.clone(),
                to: to.clone(),
                intermediates,
            },
            None => session::Stream::Full { to: to.clone() },
        };
        self.note_step(src, dst, stream);
        let n = self.transfer(&send, &zfs::receive_argv(dst, recv), &label, 0)?;
        self.verify(dst, to)?;
        Ok(n)
    }

    /// `resume token on X <why>: discarding the partial receive`, then
    /// `zfs receive -A`. Only the interrupted receive's state goes.
    fn discard_partial(&self, dst: &Dataset, why: &str) -> Result<()> {
        self.abort_partial(
            dst,
            &format!(
                "resume token on {} {why}: discarding the partial receive",
                self.dst.label(dst)
            ),
        )
    }

    /// Prints `line`, then `zfs receive -A` on the target.
    fn abort_partial(&self, dst: &Dataset, line: &str) -> Result<()> {
        self.ui.info(line);
        exec_ok(
            &*self.dst.host(),
            &zfs::abort_partial_argv(dst),
            "zfs receive -A",
            self.ui,
        )?;
        Ok(())
    }

    /// After `step` failed with `err`: was it because of a partial receive
    /// that must go? A receive refused for "partially-complete state", or a
    /// resume whose token no longer passes [`resume::check`] on a fresh
    /// source listing (its snapshot destroyed meanwhile). Then the partial
    /// receive is discarded and the caller plans again (true). Anything
    /// else, a lost connection above all, keeps the partial state for the
    /// next attempt (false).
    fn discarded_after(
        &self,
        src: &Dataset,
        dst: &Dataset,
        step: &Step,
        err: &anyhow::Error,
    ) -> Result<bool> {
        if is_connection_lost(err) {
            return Ok(false);
        }
        if zfs::error::kind_in(err) == Some(ZfsErrorKind::PartialState) {
            self.discard_partial(
                dst,
                "blocks the receive (\"contains partially-complete state\")",
            )?;
            return Ok(true);
        }
        if !matches!(step, Step::Resume { .. }) {
            return Ok(false);
        }
        let source = self.source_state(src)?;
        let target = self.target_state(dst)?;
        let Some(token) = &target.resume_token else {
            return Ok(false);
        };
        match resume::check(token, &source, &target.snapshots) {
            Ok(_) => Ok(false),
            Err(why) => {
                self.ui.warn(&format!("resuming failed: {err:#}"));
                self.discard_partial(dst, &why.to_string())?;
                Ok(true)
            }
        }
    }

    /// The display for one stream: its estimate from `zfs send -nvP`, plus
    /// `already` bytes a resumed stream had received before (where it starts).
    fn bar(&self, label: &str, send: &[String], already: u64) -> Box<dyn Transfer> {
        let total = self.estimate(send).map(|n| n.saturating_add(already));
        let bar = self.ui.transfer(label, total);
        if already > 0 {
            bar.resume_at(already);
        }
        bar
    }

    /// `zfs send` on the source, piped through this process into `zfs receive`
    /// on the target. Both exit statuses must be zero. `already`: see [`Run::bar`].
    fn transfer(&self, send: &[String], recv: &[String], label: &str, already: u64) -> Result<u64> {
        if self.cfg.chunked {
            return self.transfer_chunked(send, recv, label, already);
        }
        let (sh, th) = (self.src.host(), self.dst.host());
        let (sh, th) = (&*sh, &*th);
        self.ui
            .debug(&format!("[{}] {}", sh.label(), sh_join(send)));
        self.ui
            .debug(&format!("[{}] {}", th.label(), sh_join(recv)));
        // Both commands announce their pid first, for the run lock's record.
        let mut receiver = th
            .spawn(&runlock::announce_pid_argv(recv))
            .context("cannot start zfs receive")?;
        let mut sender = match sh.spawn(&runlock::announce_pid_argv(send)) {
            Ok(s) => s,
            Err(e) => {
                receiver.kill();
                return Err(e.context("cannot start zfs send"));
            }
        };
        let (Some(mut reader), Some(writer), Some(mut recv_out)) = (
            sender.take_stdout(),
            receiver.take_stdin(),
            receiver.take_stdout(),
        ) else {
            sender.kill();
            receiver.kill();
            bail!("internal error: zfs send/receive pipes are missing");
        };
        let mut started = Vec::new();
        for (host, out, argv) in [(th, &mut recv_out, recv), (sh, &mut reader, send)] {
            match runlock::read_announcement(&mut **out, host.label(), argv) {
                Ok(p) => started.extend(p),
                Err(e) => {
                    sender.kill();
                    receiver.kill();
                    return Err(e.context(format!("starting zfs on {}", host.label())));
                }
            }
        }
        drop(recv_out);
        if let Some(lock) = &self.lock {
            for p in &started {
                lock.record(p.clone())?;
            }
        }
        let bar = self.bar(label, send, already);
        if let Some(rate) = self.cfg.bwlimit() {
            self.ui
                .debug(&format!("bandwidth limit: {}/s", human_bytes(rate)));
        }
        let limit = self.cfg.bwlimit().map(Limiter::new);
        let pumped = stream::pump(reader, writer, limit, &|n| bar.add(n));
        bar.finish();
        if pumped.is_err() {
            sender.kill();
        }
        // The receiver saw EOF (or a broken stream); its verdict comes first,
        // since "cannot receive: ..." explains more than a broken pipe does.
        let recv_exit = receiver.wait().context("waiting for zfs receive")?;
        let send_exit = sender.wait().context("waiting for zfs send")?;
        if let Some(lock) = &self.lock {
            lock.forget(&started)?;
        }
        // Typed, so that `discarded_after` can tell a partial-state refusal.
        for (exit, what, host) in [
            (&recv_exit, "zfs receive", th.label()),
            (&send_exit, "zfs send", sh.label()),
        ] {
            if !exit.success() {
                return Err(ZfsError::exited(what, host, exit.status, &exit.stderr).into());
            }
        }
        match pumped {
            Ok(n) => Ok(n),
            Err(e @ (PumpError::Read(_) | PumpError::Write(_))) => {
                Err(anyhow!(e).context("the stream broke although both zfs commands exited 0"))
            }
        }
    }

    /// `--chunked`: the stream moves as chunk files between session folders
    /// on both hosts (see `chunk::orchestrator`); both helpers must report
    /// success, like both zfs commands in [`Run::transfer`].
    fn transfer_chunked(
        &self,
        send: &[String],
        recv: &[String],
        label: &str,
        already: u64,
    ) -> Result<u64> {
        self.ui.debug(&format!(
            "[{}] {} (chunked)",
            self.src.host().label(),
            sh_join(send)
        ));
        self.ui.debug(&format!(
            "[{}] {} (chunked)",
            self.dst.host().label(),
            sh_join(recv)
        ));
        let bar = self.bar(label, send, already);
        let stats = self.chunked(orchestrator::Start::New { send, recv }, bar)?;
        Ok(stats.bytes)
    }

    /// Runs the chunk orchestrator for the step noted by [`Run::note_step`],
    /// with new helpers or re-attached to live ones.
    fn chunked(
        &self,
        start: orchestrator::Start,
        bar: Box<dyn Transfer>,
    ) -> Result<orchestrator::Stats> {
        let src_exe = self.helper_exe(&self.src)?;
        let dst_exe = self.helper_exe(&self.dst)?;
        let opts = orchestrator::Options {
            chunk_size: self.cfg.chunk_size,
            window: self.cfg.chunk_window,
            timeout: self.cfg.timeout,
            tmpdir: self.cfg.tmpdir.clone(),
            bwlimit: self.cfg.bwlimit(),
        };
        let identity = self
            .chunk_step
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let announce = |m: &session::Manifest| {
            let text = format!("{} on {}", m.session_id(), m.receiver_host);
            self.ui.debug(&format!("chunk session {text}"));
            if let Some(lock) = &self.lock {
                if let Err(e) = lock.note_session(&text) {
                    self.ui
                        .debug(&format!("recording the session in the run lock: {e:#}"));
                }
            }
        };
        let sess = identity.map(|identity| orchestrator::Session {
            target_label: match Dataset::parse(&identity.target) {
                Ok(ds) => self.dst.label(&ds),
                Err(_) => identity.target.clone(),
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

    /// Notes the stream about to be sent, for a chunked session's manifest.
    fn note_step(&self, src: &Dataset, dst: &Dataset, stream: session::Stream) {
        *self.chunk_step.lock().unwrap_or_else(|p| p.into_inner()) = Some(session::Identity {
            source: src.to_string(),
            target: dst.to_string(),
            stream,
        });
    }

    /// Our binary on a side's host: this very file locally, else a copy
    /// deployed (by MD5) under `--tmpdir`.
    fn helper_exe(&self, side: &Side) -> Result<String> {
        let mut cached = side.helper.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &*cached {
            return Ok(path.clone());
        }
        let path = match side.endpoint.location {
            Location::Local => {
                let exe = std::env::current_exe().context("finding our own binary")?;
                exe.to_str()
                    .ok_or_else(|| anyhow!("our binary's path {} is not UTF-8", exe.display()))?
                    .to_string()
            }
            Location::Remote { .. } => {
                let d = self.deploy_retrying(side)?;
                let host = side.host();
                if d.uploaded {
                    self.ui
                        .debug(&format!("uploaded resync to {}:{}", host.label(), d.path));
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
        let deadline = std::time::Instant::now() + self.cfg.timeout;
        side.host
            .retrying(deadline, &|note| self.ui.debug(note), |host| {
                deploy::deploy(host, &self.cfg.tmpdir)
                    .with_context(|| format!("installing resync on {}", host.label()))
            })
    }

    /// The stream's size from `zfs send -nvP`, where the source's ZFS has it.
    /// An estimate that cannot be had is no error: the bar shows bytes and rate.
    fn estimate(&self, send: &[String]) -> Option<u64> {
        if !self.src.caps.send_estimate {
            return None;
        }
        let out = exec(&*self.src.host(), &zfs::send_estimate_argv(send), self.ui).ok()?;
        out.success()
            .then(|| zfs::parse_send_estimate(&out.stdout))
            .flatten()
    }

    /// The target must list `to` with the source's GUID, whatever zfs receive said.
    fn verify(&self, dst: &Dataset, to: &Snapshot) -> Result<()> {
        let target = self.target_state(dst)?;
        match target.snapshots.iter().find(|s| s.name == to.name) {
            Some(s) if s.guid == to.guid => Ok(()),
            Some(s) => bail!(
                "verification failed: {}@{} has GUID {} but the source's has {}",
                self.dst.label(dst),
                to.name,
                s.guid,
                to.guid
            ),
            None => bail!(
                "verification failed: zfs receive exited 0 but {}@{} is not on the target",
                self.dst.label(dst),
                to.name
            ),
        }
    }

    /// Destroys older sync snapshots of this job (exact identifier and
    /// hostname) on both sides. Failures warn; the data is already safe.
    fn prune(&self, src: &Dataset, dst: &Dataset, sync_name: Option<&str>) {
        let Some(current) = sync_name else { return };
        if self.cfg.keep_sync_snap {
            return;
        }
        for (on, side, ds) in [
            (HoldSide::Source, &self.src, src),
            (HoldSide::Target, &self.dst, dst),
        ] {
            let tag = self.hold_tag(on, src, dst);
            if let Err(e) = self.prune_side(side, ds, current, &tag) {
                self.ui.warn(&format!(
                    "pruning sync snapshots on {}: {e:#}",
                    side.label(ds)
                ));
            }
        }
    }

    /// `tag`: this job's hold tag there, released from a snapshot we prune.
    fn prune_side(&self, side: &Side, ds: &Dataset, current: &str, tag: &str) -> Result<()> {
        let out = exec_ok(
            &*side.host(),
            &zfs::list_snapshots_argv(ds, &side.caps),
            "listing snapshots",
            self.ui,
        )?;
        let snaps = zfs::parse_snapshot_list(ds, &out)?;
        if !snaps.iter().any(|s| s.name == current) {
            bail!("@{current} is missing; not pruning");
        }
        let id = self.cfg.identifier.as_deref();
        for s in snaps
            .iter()
            .filter(|s| s.name != current && syncsnap::is_ours(&s.name, id, &self.hostname))
        {
            self.ui
                .debug(&format!("pruning {}@{}", side.label(ds), s.name));
            let destroy = zfs::destroy_snapshot_argv(ds, &s.name)?;
            let out = exec(&*side.host(), &destroy, self.ui)?;
            if out.success() {
                continue;
            }
            if zfs::is_held_error(&out.stderr) && side.caps.holds {
                // Our own hold (this job's, from an earlier --use-hold run)
                // must not keep our own sync snapshot alive.
                self.release(side, ds, &s.name, tag);
            }
            exec_ok_when_idle(&*side.host(), &destroy, "zfs destroy", self.ui)?;
        }
        Ok(())
    }
}

/// `--use-hold` and `--create-bookmark` (names and policy in `protect`).
impl Run<'_> {
    /// One line per run for each protection the ZFS cannot give.
    fn announce_missing_protection(&self) {
        if self.cfg.use_hold {
            for (side, what) in [(&self.src, "source"), (&self.dst, "target")] {
                if !side.caps.holds {
                    self.ui.info(&format!(
                        "--use-hold: the {what}'s ZFS on {} has no holds (zfs hold); going on without them there",
                        side.host().label()
                    ));
                }
            }
        }
        if self.cfg.create_bookmark && !self.src.caps.bookmarks {
            self.ui.info(&format!(
                "--create-bookmark: the source's ZFS on {} has no bookmarks; going on without them",
                self.src.host().label()
            ));
        }
    }

    /// This job's hold tag on one side of the pair `src -> dst`.
    fn hold_tag(&self, on: HoldSide, src: &Dataset, dst: &Dataset) -> String {
        let (peer, peer_ds) = match on {
            HoldSide::Source => (&self.dst, dst),
            HoldSide::Target => (&self.src, src),
        };
        let peer_host = match &peer.endpoint.location {
            Location::Local => self.hostname.as_str(),
            Location::Remote { host, .. } => host.as_str(),
        };
        protect::hold_tag(self.cfg.identifier.as_deref(), on, peer_host, peer_ds)
    }

    /// Holds `snap` of `ds` with `tag`; an existing hold with it is fine.
    fn hold(&self, side: &Side, ds: &Dataset, snap: &str, tag: &str) -> Result<()> {
        let out = exec(&*side.host(), &zfs::hold_argv(ds, snap, tag), self.ui)?;
        if out.success() || zfs::is_tag_exists_error(&out.stderr) {
            return Ok(());
        }
        out.check("zfs hold", side.host().label()).map(drop)
    }

    /// Releases `tag` from `snap` of `ds`; a missing hold is fine, a failure warns.
    fn release(&self, side: &Side, ds: &Dataset, snap: &str, tag: &str) {
        let result =
            exec(&*side.host(), &zfs::release_argv(ds, snap, tag), self.ui).and_then(|out| {
                if out.success() || zfs::is_no_such_tag_error(&out.stderr) {
                    Ok(())
                } else {
                    out.check("zfs release", side.host().label()).map(drop)
                }
            });
        if let Err(e) = result {
            self.ui.warn(&format!(
                "releasing hold {tag} on {}@{snap}: {e:#}",
                side.label(ds)
            ));
        }
    }

    /// `--use-hold`: holds a step's base and target snapshots on the source
    /// for the transfer. A failure warns; the transfer says what is wrong.
    fn hold_for_step(&self, src: &Dataset, dst: &Dataset, snaps: &[&Snapshot]) {
        if !self.cfg.use_hold || !self.src.caps.holds {
            return;
        }
        let tag = self.hold_tag(HoldSide::Source, src, dst);
        for s in snaps {
            if let Err(e) = self.hold(&self.src, src, &s.name, &tag) {
                self.ui.warn(&format!(
                    "holding {}@{}: {e:#}",
                    self.src.label(src),
                    s.name
                ));
            }
        }
    }

    /// After success: `--use-hold` keeps this job's hold on `newest` (by
    /// GUID) on both sides and releases it everywhere else;
    /// `--create-bookmark` bookmarks it on the source. Failures warn; the
    /// data is already safe.
    fn protect(
        &self,
        src: &Dataset,
        dst: &Dataset,
        source: &SourceState,
        target: &TargetState,
        newest: &Snapshot,
    ) {
        let on = |snaps: &[Snapshot]| snaps.iter().find(|s| s.guid == newest.guid).cloned();
        let (on_src, on_dst) = (on(&source.snapshots), on(&target.snapshots));
        if self.cfg.use_hold {
            for (on, side, ds, keep) in [
                (HoldSide::Source, &self.src, src, &on_src),
                (HoldSide::Target, &self.dst, dst, &on_dst),
            ] {
                if !side.caps.holds {
                    continue;
                }
                let tag = self.hold_tag(on, src, dst);
                if let Err(e) = self.move_hold(side, ds, &tag, keep.as_ref()) {
                    self.ui
                        .warn(&format!("--use-hold on {}: {e:#}", side.label(ds)));
                }
            }
        }
        if let (true, true, Some(snap)) =
            (self.cfg.create_bookmark, self.src.caps.bookmarks, &on_src)
        {
            if let Err(e) = self.bookmark(src, snap, &source.bookmarks) {
                self.ui.warn(&format!(
                    "--create-bookmark on {}: {e:#}",
                    self.src.label(src)
                ));
            }
        }
    }

    /// Holds `keep` with this job's tag and releases the tag from every
    /// other held snapshot of `ds`.
    fn move_hold(
        &self,
        side: &Side,
        ds: &Dataset,
        tag: &str,
        keep: Option<&Snapshot>,
    ) -> Result<()> {
        if let Some(k) = keep {
            self.hold(side, ds, &k.name, tag)?;
        }
        let out = exec_ok(
            &*side.host(),
            &zfs::userrefs_argv(ds, &side.caps),
            "listing holds",
            self.ui,
        )?;
        let refs = zfs::parse_userrefs(ds, &out)?;
        for name in protect::stale_holds(&refs, keep.map(|k| k.name.as_str())) {
            self.release(side, ds, name, tag);
        }
        Ok(())
    }

    /// Bookmarks `snap` on the source and destroys this job's older bookmarks.
    fn bookmark(&self, src: &Dataset, snap: &Snapshot, bookmarks: &[Snapshot]) -> Result<()> {
        let plan = protect::bookmark_plan(
            snap,
            bookmarks,
            self.cfg.identifier.as_deref(),
            &self.hostname,
        );
        let host = self.src.host();
        if let Some(name) = &plan.create {
            exec_ok(
                &*host,
                &zfs::bookmark_argv(src, &snap.name, name),
                "zfs bookmark",
                self.ui,
            )?;
            self.ui.debug(&format!(
                "bookmarked {}@{} as #{name}",
                self.src.label(src),
                snap.name
            ));
        }
        for name in &plan.destroy {
            exec_ok(
                &*host,
                &zfs::destroy_bookmark_argv(src, name)?,
                "zfs destroy",
                self.ui,
            )?;
        }
        Ok(())
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::AbortPartial => "discard the partial receive on the target".into(),
        Step::Resume { .. } => "resume the interrupted receive from its token".into(),
        Step::DiscardPartial { why } => {
            format!("discard the partial receive (its resume token {why})")
        }
        Step::DestroyTarget => "destroy the target (--force-delete)".into(),
        Step::Rollback { to } => format!("roll the target back to @{} (--force-delete)", to.name),
        Step::Full { to } => format!("send @{} in full", to.name),
        Step::Incremental {
            from,
            to,
            intermediates,
        } => format!(
            "send @{}..@{} incrementally ({})",
            from.name,
            to.name,
            if *intermediates { "-I" } else { "-i" }
        ),
        Step::FromBookmark { bookmark, to } => format!(
            "send #{}..@{} incrementally from the bookmark (-i)",
            bookmark.name, to.name
        ),
    }
}

fn describe_all(steps: &[Step]) -> String {
    steps
        .iter()
        .map(describe)
        .collect::<Vec<_>>()
        .join(", then ")
}

/// This machine's name, as it appears in sync snapshot names.
fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    syncsnap::sanitize_hostname(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_describe_themselves() {
        let s = |n: &str| Snapshot {
            name: n.into(),
            guid: 1,
            createtxg: 1,
        };
        assert_eq!(describe(&Step::Full { to: s("a") }), "send @a in full");
        assert_eq!(
            describe(&Step::Incremental {
                from: s("a"),
                to: s("b"),
                intermediates: true
            }),
            "send @a..@b incrementally (-I)"
        );
        assert_eq!(
            describe(&Step::FromBookmark {
                bookmark: s("a"),
                to: s("b")
            }),
            "send #a..@b incrementally from the bookmark (-i)"
        );
    }
}
