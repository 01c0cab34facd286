//! One run of resync: connect to both sides (as `endpoint`s), list the
//! source tree once, take every pair's sync snapshot at once, list both
//! trees once, then for each pair (`--jobs` at a time, a child after its
//! parent) ask the pure planner what to do from those listings, execute
//! its steps ([`execute`]: through `endpoint` for changes and `transfer`
//! for streams), and after success protect and prune ([`protect`]). After
//! executing a plan it lists the target again and plans again: a dataset
//! is done only when that listing shows what was received with the
//! source's GUIDs and the planner says it is up to date. `--chunked`
//! sessions an earlier run left are dealt with first ([`reattach`]). This
//! module only orchestrates: it runs no command itself.

use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Result};

use crate::chunk::session;
use crate::cli::Config;
use crate::endpoint::dryrun::DryRun;
use crate::endpoint::{self, Changes, Taken, ZfsHost};
use crate::host::reconnect::Reconnecting;
use crate::plan::syncsnap;
use crate::plan::{self, Plan, PlanOptions, Step};
use crate::plan::{SourceState, TargetState};
use crate::progress::{human_bytes, human_duration, human_rate, Progress, Stopwatch};
use crate::report::{DatasetReport, Reports, Status};
use crate::runlock::{self, RunLock};
use crate::sys::Unpoisoned;
use crate::transfer::chunked::{self, Chunked};
use crate::transfer::codec::Compression;
use crate::transfer::direct::Route;
use crate::zfs::{Dataset, Snapshot, Tree};

mod clones;
mod execute;
mod properties;
mod protect;
mod reattach;
mod snapshots;
#[cfg(test)]
mod tests;

/// How many gather-plan-execute rounds one dataset may take before we call it
/// a bug instead of looping (resume, then the rest, then "up to date").
const MAX_ROUNDS: usize = 4;

/// What a finished run reports back to `main`.
pub struct Outcome {
    pub replicated: usize,
    pub failed: Vec<(String, anyhow::Error)>,
}

struct Run<'a> {
    cfg: &'a Config,
    ui: &'a dyn Progress,
    src: &'a ZfsHost<'a>,
    dst: &'a ZfsHost<'a>,
    /// Where changes go: the endpoints themselves, or their dry-run wrappers.
    src_changes: &'a dyn Changes,
    dst_changes: &'a dyn Changes,
    /// This machine's name, as sync snapshot names carry it.
    hostname: String,
    /// Held for the whole run (not in a dry run, which changes nothing).
    lock: Option<&'a RunLock>,
    /// `--chunked`: the chunk orchestrator's entry.
    chunked: Option<Chunked<'a>>,
    /// Default mode's `--compress` (none with `--chunked`, whose helpers
    /// compress themselves).
    compression: Option<Compression>,
    /// `--insecure-direct-connection`, our binary deployed on the remote
    /// end (not in a dry run, which moves no stream).
    direct: Option<Route>,
    /// The target datasets of this run's pairs (see `--force-delete`).
    targets: OnceLock<Vec<Dataset>>,
    /// Each pair's result, for `--json`.
    reports: &'a Reports,
    /// syncoid's sync snapshots were pointed out (once per run).
    syncoid_noted: AtomicBool,
    /// Source clones whose origin's dataset is in this run, with the
    /// origin snapshot (`pool/ds@snap`); see `clones.rs`.
    clones: OnceLock<Vec<(Dataset, String)>>,
    /// Sync snapshots to prune on the source and on the target, queued per
    /// pair and destroyed batched at the end ([`Run::flush_prunes`]).
    prunes: (Mutex<Vec<Prune>>, Mutex<Vec<Prune>>),
    /// Targets this run destroyed (`--force-delete`): the run's listing of
    /// anything below them is stale.
    destroyed: Mutex<Vec<Dataset>>,
    /// The datasets of the latest listing of each side's tree (source,
    /// target) under the run's roots, where the run has one that is still
    /// true when pruning: a sync snapshot that every one of them prunes
    /// goes in one `zfs destroy -r`.
    last_listed: (Listed, Listed),
}

/// How a pair starts: its sync snapshot (if one was taken) and the bytes
/// a re-attached `--chunked` session already moved.
struct Start<'s> {
    sync_name: Option<&'s str>,
    attached: u64,
    /// Leave the verification to the run's one listing of the target
    /// tree (see [`Run::rounds`]).
    defer: bool,
}

/// How far [`Run::rounds`] took a pair.
enum Rounds {
    /// Up to date (or, in a dry run, planned).
    Done,
    /// Sent what should make it up to date; verified later from one
    /// listing of the whole target tree.
    Deferred,
}

/// A pair between its rounds: what it sent so far and what the next
/// listing of the target must show.
struct Pair {
    src: Dataset,
    dst: Dataset,
    sync_name: Option<String>,
    watch: Stopwatch,
    /// Its time until the stream ended, for a pair verified later.
    took: Option<Duration>,
    source: SourceState,
    bytes: u64,
    sent: Sent,
    /// Received snapshots the next listing must show, by GUID.
    received: Vec<Snapshot>,
    last_round_steps: Vec<Step>,
    /// The next round's number.
    round: usize,
    /// The last round sent everything its plan had (no resume, no
    /// discarding): the next listing should find the pair up to date.
    complete: bool,
}

/// The datasets of a side's tree listing, while the run can trust it.
type Listed = Mutex<Option<Vec<Dataset>>>;

/// A snapshot to prune: dataset, snapshot, this job's hold tag there.
type Prune = (Dataset, String, Option<String>);

/// Replicates according to `cfg`. An `Err` is a failure of the whole run
/// (exit 2); failures of single datasets in a recursive run are collected in
/// the `Outcome` (exit 1). Each pair's result also goes to `reports`.
pub fn run(cfg: &Config, ui: &dyn Progress, reports: &Reports) -> Result<Outcome> {
    let lock = match cfg.dry_run {
        true => None,
        false => Some(lock_target(cfg)?),
    };
    // Both sides connect and probe at once: each costs several round trips.
    let (src, dst) = if cfg.target.location == cfg.source.location {
        let src = open_side(
            endpoint::connect_reconnecting(&cfg.source.location, cfg)?,
            cfg,
            ui,
            Side::Source,
        )?;
        let dst_host =
            Reconnecting::new(src.host(), || endpoint::connect(&cfg.target.location, cfg));
        (src, open_side(dst_host, cfg, ui, Side::Target)?)
    } else {
        // Connecting stays sequential (two libssh2 handshakes at once
        // crashed a remote-to-remote run once); probing both at once.
        let src_host = endpoint::connect_reconnecting(&cfg.source.location, cfg)?;
        let dst_host = endpoint::connect_reconnecting(&cfg.target.location, cfg)?;
        std::thread::scope(|scope| {
            let dst = scope.spawn(|| open_side(dst_host, cfg, ui, Side::Target));
            let src = open_side(src_host, cfg, ui, Side::Source);
            let dst = dst
                .join()
                .unwrap_or_else(|_| Err(anyhow!("probing the target panicked")));
            Ok::<_, anyhow::Error>((src?, dst?))
        })?
    };
    let (src_dry, dst_dry) = (DryRun::new(&src), DryRun::new(&dst));
    let (src_changes, dst_changes): (&dyn Changes, &dyn Changes) = match cfg.dry_run {
        true => (&src_dry, &dst_dry),
        false => (&src, &dst),
    };
    let run = Run {
        cfg,
        ui,
        src: &src,
        dst: &dst,
        src_changes,
        dst_changes,
        hostname: local_hostname(),
        lock: lock.as_ref(),
        chunked: cfg.chunk_options().map(|opts| Chunked {
            src: chunked::Side::new(src.reconnecting(), &src.location),
            dst: chunked::Side::new(dst.reconnecting(), &dst.location),
            opts,
            lock: lock.as_ref(),
            ui,
            totals: Default::default(),
        }),
        compression: match cfg.chunk {
            Some(_) => None,
            None => Compression::new(
                cfg.compress,
                &cfg.tmpdir,
                src.location.clone(),
                dst.location.clone(),
            ),
        },
        direct: match (&cfg.direct, cfg.dry_run) {
            (Some(d), false) => Some(Route::deploy(
                d,
                [src.host(), dst.host()],
                [&src.location, &dst.location],
                &cfg.tmpdir,
                ui,
            )?),
            _ => None,
        },
        targets: OnceLock::new(),
        reports,
        syncoid_noted: AtomicBool::new(false),
        clones: OnceLock::new(),
        prunes: Default::default(),
        destroyed: Mutex::new(Vec::new()),
        last_listed: Default::default(),
    };
    if let (Some(c), false) = (&run.compression, cfg.dry_run) {
        c.prepare([src.host(), dst.host()], ui)?;
    }
    run.stop_leftovers()?;
    run.announce_missing_protection();
    run.announce_filtered_sync_snap();
    run.announce_preserve_fallback();
    let outcome = run.all();
    ui.debug(&format!("commands run: {}", commands_run()));
    outcome
}

/// `HOST N, HOST M`: the commands each host was asked to run so far (see
/// `--debug`; tests and the bench read it).
fn commands_run() -> String {
    crate::host::started_commands()
        .iter()
        .map(|(host, n)| format!("{host} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Target,
}

/// One side's endpoint: its ZFS probed on its pool.
fn open_side<'a>(
    host: Reconnecting<'a>,
    cfg: &'a Config,
    ui: &'a dyn Progress,
    side: Side,
) -> Result<ZfsHost<'a>> {
    let (address, what) = match side {
        Side::Source => (&cfg.source, "source"),
        Side::Target => (&cfg.target, "target"),
    };
    let label = host.get().label().to_string();
    ZfsHost::open(
        host,
        address.location.clone(),
        endpoint::privileges(&address.location, cfg)?,
        address.dataset.pool(),
        ui,
    )
    .map_err(|e| on_host(e, what, &label))
}

/// `err` in the context of the `side` host `label`, unless it says that
/// itself (a privilege refusal names its host).
fn on_host(err: anyhow::Error, side: &str, label: &str) -> anyhow::Error {
    match crate::zfs::elevate::is_refused(&err) {
        true => err,
        false => err.context(format!("on {side} host {label}")),
    }
}

/// The run lock for the target, keyed by the host it resolves to (ssh
/// config's HostName and Port) and the dataset, not by how it was spelled.
fn lock_target(cfg: &Config) -> Result<RunLock> {
    let address = endpoint::resolved_address(&cfg.target.location, cfg)?;
    RunLock::for_target(
        address.as_ref().map(|(host, port)| (host.as_str(), *port)),
        cfg.target.dataset.as_str(),
        &cfg.target.to_string(),
    )
}

/// This machine's name, as it appears in sync snapshot names ("" when the
/// kernel will not say, as before).
fn local_hostname() -> String {
    syncsnap::sanitize_hostname(&crate::sys::hostname().unwrap_or_default())
}

impl Run<'_> {
    /// Stops the `zfs send`/`receive` processes an interrupted earlier run
    /// left on our hosts (see `runlock`), so they neither hold the target
    /// busy nor look like a run in progress.
    fn stop_leftovers(&self) -> Result<()> {
        let Some(lock) = self.lock else {
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
            let out = host.run(&runlock::stop_argv(p))?;
            if out.stdout.contains("stopped") {
                self.ui.info(&format!(
                    "stopped a zfs process (pid {}) left running on {} by an interrupted run",
                    p.pid, p.host
                ));
            }
        }
        lock.forget(&leftovers)
    }

    /// Lists the source once, takes the sync snapshots of every pair at
    /// once, lists both sides once more, then replicates the pairs
    /// (`--jobs` at a time, a child after its parent) from those listings.
    fn all(&self) -> Result<Outcome> {
        // A run that takes sync snapshots will stream: OpenSSH's master
        // connections (about 170 ms each) come up while the trees are
        // listed and snapshotted, not in front of the first stream.
        let streams = !self.cfg.dry_run
            && self.chunked.is_none()
            && self.direct.is_none()
            && self.cfg.protection.sync_snap;
        std::thread::scope(|scope| {
            if streams {
                for side in [self.src, self.dst] {
                    scope.spawn(move || drop(side.host().bulk()));
                }
            }
            self.all_pairs()
        })
    }

    /// [`Run::all`]'s work.
    fn all_pairs(&self) -> Result<Outcome> {
        let root = &self.cfg.source.dataset;
        let Some(listed) = self.src.tree(root, self.cfg.recursive)? else {
            bail!("source dataset {} does not exist", self.src.label(root));
        };
        let mut pairs = self.dataset_pairs(listed.keys())?;
        self.order_clones(&mut pairs)?;
        if pairs.is_empty() {
            bail!(
                "nothing to replicate: every dataset under {} was excluded",
                self.cfg.source
            );
        }
        let _ = self
            .targets
            .set(pairs.iter().map(|(_, dst)| dst.clone()).collect());
        if self.cfg.dry_run && self.cfg.protection.sync_snap {
            self.ui.info("dry run: nothing will be changed");
        }
        // A session an interrupted chunked run left on a target: finish its
        // step first (or refuse, if someone is driving it), before any sync
        // snapshot is taken: a refused pair takes none.
        let attached: Vec<Mutex<Option<Result<u64>>>> = pairs
            .iter()
            .map(|(src, dst)| {
                Mutex::new(Some(match (&self.chunked, self.cfg.dry_run) {
                    (Some(chunked), false) => self.reattach(chunked, src, dst),
                    _ => Ok(0),
                }))
            })
            .collect();
        let go: Vec<usize> = (0..pairs.len())
            .filter(|&i| !matches!(attached[i].locked().as_ref(), Some(Err(_))))
            .collect();
        // The target is listed while the source takes and lists its sync
        // snapshots (the target does not change meanwhile).
        let (sync_names, src_tree, dst_tree) = std::thread::scope(|scope| {
            let dst_tree = scope.spawn(|| {
                self.dst
                    .tree(&self.cfg.target.dataset, self.cfg.recursive)
                    .map(Option::unwrap_or_default)
            });
            let source = (|| {
                let mut sync_names: Vec<Result<Option<String>>> =
                    pairs.iter().map(|_| Ok(None)).collect();
                if self.cfg.protection.sync_snap && !self.sync_snap_filtered_out() {
                    let subset: Vec<(Dataset, Dataset)> =
                        go.iter().map(|&i| pairs[i].clone()).collect();
                    let taken = self.take_sync_snapshots(&subset, subset.len() == listed.len())?;
                    for (&i, name) in go.iter().zip(taken) {
                        sync_names[i] = name;
                    }
                }
                // The new snapshots' GUIDs (a dry run's are pretended by
                // `pending`).
                let src_tree = match self.cfg.protection.sync_snap && !self.cfg.dry_run {
                    true => self.src.tree(root, self.cfg.recursive)?.unwrap_or_default(),
                    false => listed,
                };
                Ok::<_, anyhow::Error>((sync_names, src_tree))
            })();
            let dst_tree = dst_tree
                .join()
                .unwrap_or_else(|_| Err(anyhow!("listing the target panicked")));
            let (sync_names, src_tree) = source?;
            Ok::<_, anyhow::Error>((sync_names, src_tree, dst_tree?))
        })?;
        *self.last_listed.0.locked() = Some(src_tree.keys().cloned().collect());
        let sync_names = Mutex::new(sync_names.into_iter().map(Some).collect::<Vec<_>>());
        // With more than one pair, a pair's receive is verified from one
        // listing of the target tree after all have sent, not each by a
        // listing of its own (a remote command per dataset).
        let defer = pairs.len() > 1 && !self.cfg.dry_run;
        let deferred: Mutex<Vec<Option<Pair>>> = Mutex::new(pairs.iter().map(|_| None).collect());
        let mut outcome = self.run_pairs(&pairs, &|i| {
            let (src, dst) = &pairs[i];
            let sync_name = sync_names.locked()[i]
                .take()
                .unwrap_or_else(|| Err(anyhow!("sync snapshot taken twice")))?;
            let listed = |tree: &Tree, ds: &Dataset| tree.get(ds).cloned();
            let source = listed(&src_tree, src)
                .ok_or_else(|| anyhow!("{} vanished while listing", self.src.label(src)))?;
            let source = SourceState {
                dataset: src.to_string(),
                snapshots: source.snapshots,
                bookmarks: source.bookmarks,
            };
            let target = target_state(&dst_tree, dst);
            let attached = attached[i].locked().take().unwrap_or(Ok(0))?;
            let start = Start {
                sync_name: sync_name.as_deref(),
                attached,
                defer,
            };
            let pair = self.one(src, dst, start, source, target, &dst_tree)?;
            deferred.locked()[i] = pair;
            Ok(())
        })?;
        let deferred = deferred.into_inner().unwrap_or_else(|p| p.into_inner());
        if deferred.iter().any(Option::is_some) {
            self.finish(deferred, &mut outcome)?;
        }
        self.flush_prunes();
        Ok(outcome)
    }

    /// Verifies the pairs whose receives were deferred (`deferred[i]` for
    /// pair `i`) from one fresh listing of the target tree, and takes each
    /// on from there (protect and prune; more rounds where the listing
    /// shows they are needed), moving a pair that fails from the
    /// replicated to the failed in `outcome`.
    fn finish(&self, deferred: Vec<Option<Pair>>, outcome: &mut Outcome) -> Result<()> {
        let tree = self
            .dst
            .tree(&self.cfg.target.dataset, self.cfg.recursive)?
            .unwrap_or_default();
        *self.last_listed.1.locked() = Some(tree.keys().cloned().collect());
        let pairs: Vec<Pair> = deferred.into_iter().flatten().collect();
        let names: Vec<(Dataset, Dataset)> = pairs
            .iter()
            .map(|p| (p.src.clone(), p.dst.clone()))
            .collect();
        let cells: Vec<Mutex<Option<Pair>>> =
            pairs.into_iter().map(|p| Mutex::new(Some(p))).collect();
        let finished = self.run_pairs(&names, &|i| {
            let mut pair = cells[i]
                .locked()
                .take()
                .ok_or_else(|| anyhow!("a deferred pair was finished twice"))?;
            let listed = target_state(&tree, &pair.dst);
            match self.rounds(&mut pair, Some(listed), false)? {
                Rounds::Done => Ok(()),
                Rounds::Deferred => Err(anyhow!("internal error: a pair was deferred twice")),
            }
        })?;
        outcome.replicated -= names.len() - finished.replicated;
        outcome.failed.extend(finished.failed);
        Ok(())
    }

    /// Runs `work` for each pair, `--jobs` at a time, a pair only after the
    /// pair of its nearest replicated ancestor finished (a receive needs
    /// its parent); a failed pair's descendants are skipped with the
    /// reason. In a run that is not recursive, the one failure is the run's.
    fn run_pairs(
        &self,
        pairs: &[(Dataset, Dataset)],
        work: &(dyn Fn(usize) -> Result<()> + Sync),
    ) -> Result<Outcome> {
        #[derive(Clone, Copy, PartialEq)]
        enum State {
            Waiting,
            Running,
            Done { ok: bool },
        }
        let parent: Vec<Option<usize>> = (0..pairs.len())
            .map(|i| {
                (0..i).rev().find(|&j| {
                    pairs[i]
                        .0
                        .relative_to(&pairs[j].0)
                        .is_some_and(|r| !r.is_empty())
                })
            })
            .collect();
        // A clone is received after its origin's dataset, which need not
        // be its parent: runs with clones go one pair at a time. So do
        // runs over a direct connection: one port, one stream at a time.
        let has_clones = self.clones.get().is_some_and(|c| !c.is_empty());
        let jobs = match (&self.chunked, has_clones || self.cfg.direct.is_some()) {
            (Some(_), _) | (_, true) => 1,
            (None, false) => self.cfg.jobs.clamp(1, pairs.len()),
        };
        let shared = Mutex::new((
            vec![State::Waiting; pairs.len()],
            Outcome {
                replicated: 0,
                failed: Vec::new(),
            },
        ));
        let changed = Condvar::new();
        let worker = || loop {
            let next = {
                let mut guard = shared.locked();
                loop {
                    let (states, outcome) = &mut *guard;
                    let ready = (0..pairs.len()).find(|&i| {
                        states[i] == State::Waiting
                            && parent[i].is_none_or(|p| matches!(states[p], State::Done { .. }))
                    });
                    if let Some(i) = ready {
                        if let Some(p) =
                            parent[i].filter(|&p| states[p] == State::Done { ok: false })
                        {
                            let label = self.pair_label(&pairs[i].0, &pairs[i].1);
                            let err = anyhow!("skipped because its parent {} failed", pairs[p].0);
                            self.ui.warn(&format!("{label}: {err}"));
                            self.report_failed(&pairs[i].0, &pairs[i].1, Status::Skipped, &err);
                            outcome.failed.push((label, err));
                            states[i] = State::Done { ok: false };
                            continue;
                        }
                        states[i] = State::Running;
                        break Some(i);
                    }
                    if !states.contains(&State::Waiting) {
                        break None;
                    }
                    guard = changed.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Some(i) = next else {
                changed.notify_all();
                return;
            };
            let result = work(i);
            if let Err(e) = &result {
                self.report_failed(&pairs[i].0, &pairs[i].1, Status::Failed, e);
            }
            let mut guard = shared.locked();
            let (states, outcome) = &mut *guard;
            let label = self.pair_label(&pairs[i].0, &pairs[i].1);
            states[i] = State::Done { ok: result.is_ok() };
            match result {
                Ok(()) => outcome.replicated += 1,
                Err(e) => {
                    if self.cfg.recursive {
                        eprintln!("resync: {label}: {e:#}");
                    }
                    outcome.failed.push((label, e));
                }
            }
            changed.notify_all();
        };
        std::thread::scope(|scope| {
            for _ in 1..jobs {
                scope.spawn(worker);
            }
            worker();
        });
        let (_, mut outcome) = shared.into_inner().unwrap_or_else(|p| p.into_inner());
        if !self.cfg.recursive {
            if let Some((label, e)) = outcome.failed.pop() {
                return Err(e.context(label));
            }
        }
        Ok(outcome)
    }

    fn report_failed(&self, src: &Dataset, dst: &Dataset, status: Status, e: &anyhow::Error) {
        let mut r = DatasetReport::bare(self.src.label(src), self.dst.label(dst), status);
        r.error = Some(format!("{e:#}"));
        self.reports.push(r);
    }

    fn pair_label(&self, src: &Dataset, dst: &Dataset) -> String {
        format!("{} -> {}", self.src.label(src), self.dst.label(dst))
    }

    /// Source datasets to replicate (of those `listed`), each with its
    /// target name.
    fn dataset_pairs<'d>(
        &self,
        listed: impl Iterator<Item = &'d Dataset>,
    ) -> Result<Vec<(Dataset, Dataset)>> {
        let root = &self.cfg.source.dataset;
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
            pairs.push((ds.clone(), target));
        }
        Ok(pairs)
    }

    /// Replicates one dataset until the planner says it is up to date,
    /// starting from the run's listings of both sides (`source`, `target`).
    /// After a round that received, the next round's fresh listing of the
    /// target verifies every received snapshot by GUID before planning;
    /// with `defer`, a pair whose round should have brought it up to date
    /// stops there instead ([`Rounds::Deferred`]) and the run verifies it
    /// from one listing of the whole target tree later ([`Run::finish`]).
    fn one(
        &self,
        src: &Dataset,
        dst: &Dataset,
        start: Start<'_>,
        mut source: SourceState,
        target: TargetState,
        dst_tree: &Tree,
    ) -> Result<Option<Pair>> {
        let Start {
            sync_name,
            attached,
            defer,
        } = start;
        let watch = Stopwatch::start();
        self.check_target_parent(dst, dst_tree)?;
        // A re-attached session changed the target since it was listed;
        // an ancestor's `--force-delete` took it away.
        let gone = self
            .destroyed
            .locked()
            .iter()
            .any(|d| dst.relative_to(d).is_some());
        let listed = match self.chunked {
            _ if gone => None,
            Some(_) if !self.cfg.dry_run => None,
            _ => Some(target),
        };
        source.snapshots.extend(self.src_changes.pending(src));
        self.filter_source(src, &mut source)?;
        let mut pair = Pair {
            src: src.clone(),
            dst: dst.clone(),
            sync_name: sync_name.map(str::to_string),
            watch,
            took: None,
            source,
            bytes: attached,
            sent: Sent {
                first: None,
                resumed: attached > 0,
            },
            received: Vec::new(),
            last_round_steps: Vec::new(),
            round: 1,
            complete: false,
        };
        if let Some((n, first)) = self.send_as_clone(src, dst)? {
            pair.bytes += n;
            pair.sent.first = Some(first.name.clone());
            // The target exists now: the run's listing of it is stale.
            pair.received.push(first);
            self.rounds(&mut pair, None, false)?;
            return Ok(None);
        }
        Ok(match self.rounds(&mut pair, listed, defer)? {
            Rounds::Done => None,
            Rounds::Deferred => Some(pair),
        })
    }

    /// Gather-plan-execute rounds for `pair` from its round on, the first
    /// one planned from `listed` (else from a fresh listing of the target).
    /// With `defer`, a round that should have brought the pair up to date
    /// returns [`Rounds::Deferred`] instead of listing the target again.
    fn rounds(
        &self,
        pair: &mut Pair,
        mut listed: Option<TargetState>,
        defer: bool,
    ) -> Result<Rounds> {
        let (src, dst) = (&pair.src.clone(), &pair.dst.clone());
        let label = self.pair_label(src, dst);
        let sync_name = pair.sync_name.clone();
        let opts = PlanOptions {
            no_stream: self.cfg.no_stream,
            force_delete: self.cfg.force_delete,
            resume: self.cfg.resume && self.src.caps.resume_tokens && self.dst.caps.resume_tokens,
        };
        while pair.round <= MAX_ROUNDS {
            let round = pair.round;
            let target = match listed.take() {
                Some(target) => target,
                None if defer && pair.complete => {
                    pair.took = Some(pair.watch.elapsed());
                    return Ok(Rounds::Deferred);
                }
                None => self.dst.target_state(dst)?,
            };
            pair.round += 1;
            for to in pair.received.drain(..) {
                self.dst.verify_listed(dst, &target, &to)?;
            }
            let source = &pair.source;
            if round == 1 {
                self.dump_snapshots(src, dst, source, &target);
            }
            let mut planned = plan::plan(source, &target, &opts);
            if self.cfg.snap_filter.is_active() {
                planned = plan::one_at_a_time(planned, source);
            }
            match planned {
                // A dry run shows the plan and stops there.
                Plan::UpToDate { snapshot } if self.cfg.dry_run => {
                    println!("{label}: up to date at @{}", snapshot.name);
                    return Ok(Rounds::Done);
                }
                Plan::UpToDate { snapshot } => {
                    self.note_syncoid_snapshots(src, dst, source, &target);
                    self.protect(src, dst, source, &target, &snapshot)?;
                    self.prune(src, dst, sync_name.as_deref(), source, &target);
                    self.delete_stale_target_snapshots(src, dst, &snapshot);
                    self.set_preserved_properties(src, dst);
                    let took = pair.took.unwrap_or_else(|| pair.watch.elapsed());
                    self.report_done(src, dst, &pair.sent, pair.bytes, took, &snapshot);
                    let summary = if pair.bytes == 0 {
                        format!("{label}: up to date at @{}", snapshot.name)
                    } else {
                        format!(
                            "{label}: {} in {} ({}), now at @{}",
                            human_bytes(pair.bytes),
                            human_duration(took),
                            human_rate(pair.bytes, took),
                            snapshot.name
                        )
                    };
                    self.ui.info(&summary);
                    return Ok(Rounds::Done);
                }
                Plan::Conflict(conflict) => {
                    bail!("{conflict}");
                }
                Plan::Replicate(steps) if self.cfg.dry_run => {
                    for step in &steps {
                        println!("{label}: would {}", self.explain(dst, step)?);
                    }
                    return Ok(Rounds::Done);
                }
                Plan::Replicate(steps) => {
                    if round > 1 && steps == pair.last_round_steps {
                        bail!(
                            "the target did not change after executing the plan ({}); refusing to loop",
                            describe_all(&steps)
                        );
                    }
                    let mut discarded = false;
                    for step in &steps {
                        match self.execute(src, dst, step) {
                            Ok(n) => {
                                pair.bytes += n;
                                pair.sent.note(step, &pair.source);
                                pair.received.extend(step_target(step).cloned());
                            }
                            Err(e) if self.discarded_after(src, dst, step, &e)? => {
                                // The target changed: the same plan may
                                // rightly come again.
                                discarded = true;
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    // A round of sends only (no resume, no discarding) is
                    // expected to leave the pair up to date.
                    pair.complete = !discarded
                        && steps.iter().all(|s| {
                            !matches!(
                                s,
                                Step::Resume { .. }
                                    | Step::AbortPartial
                                    | Step::DiscardPartial { .. }
                            )
                        });
                    pair.last_round_steps = if discarded { Vec::new() } else { steps };
                }
            }
        }
        bail!(
            "still not up to date after {MAX_ROUNDS} rounds (last plan: {}); this is a bug, please report it",
            describe_all(&pair.last_round_steps)
        )
    }

    /// Takes this run's sync snapshot of every pair's source and returns
    /// each one's name (or why it could not be taken): `zfs snapshot -r`
    /// of the root when `whole_tree` (every dataset under it is a pair: one
    /// point in time), else one batched exec. Names have one-second
    /// resolution: where a run a moment ago took the same name, wait for
    /// the next second and take a fresh one there.
    fn take_sync_snapshots(
        &self,
        pairs: &[(Dataset, Dataset)],
        whole_tree: bool,
    ) -> Result<Vec<Result<Option<String>>>> {
        let id = self.cfg.protection.identifier.as_deref();
        let root = &self.cfg.source.dataset;
        let whole_tree = whole_tree && self.cfg.recursive;
        let mut names: Vec<Option<Result<Option<String>>>> = pairs.iter().map(|_| None).collect();
        let mut todo: Vec<usize> = (0..pairs.len()).collect();
        for _ in 0..3 {
            let name = syncsnap::new_name(id, &self.hostname, SystemTime::now());
            let datasets: Vec<Dataset> = todo.iter().map(|&i| pairs[i].0.clone()).collect();
            let whole = whole_tree && todo.len() == pairs.len();
            let taken = self
                .src_changes
                .snapshot_all(root, &datasets, whole, &name)?;
            let mut again = Vec::new();
            for (&i, result) in todo.iter().zip(taken) {
                match result {
                    Ok(Taken::Created) => names[i] = Some(Ok(Some(name.clone()))),
                    Ok(Taken::Exists) => again.push(i),
                    Err(e) => names[i] = Some(Err(e)),
                }
            }
            todo = again;
            if todo.is_empty() {
                break;
            }
            let into_second = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_nanos(
                1_000_000_000 - u64::from(into_second) + 10_000_000,
            ));
        }
        Ok(names
            .into_iter()
            .zip(pairs)
            .map(|(name, (src, _))| {
                name.unwrap_or_else(|| {
                    Err(anyhow!(
                        "cannot take a sync snapshot of {}: each name taken already exists",
                        self.src.label(src)
                    ))
                })
            })
            .collect())
    }

    /// A clear error instead of zfs receive's when the target's parent is
    /// missing. A parent in the run's listing of the target, or one of this
    /// run's targets (replicated before its children), needs no command.
    fn check_target_parent(&self, dst: &Dataset, dst_tree: &Tree) -> Result<()> {
        let Some((parent, _)) = dst.as_str().rsplit_once('/') else {
            return Ok(());
        };
        let parent = Dataset::parse(parent)?;
        // The pool itself: opening the target side found it.
        if !parent.as_str().contains('/') {
            return Ok(());
        }
        let ours = self.targets.get().is_some_and(|t| t.contains(&parent));
        if !dst_tree.contains_key(&parent) && !ours && !self.dst.exists(&parent)? {
            bail!(
                "the target's parent {} does not exist; create it first (zfs create -p {})",
                self.dst.label(&parent),
                parent
            );
        }
        Ok(())
    }
}

/// What one pair's rounds sent, for `--json`.
struct Sent {
    /// The first snapshot a stream carried.
    first: Option<String>,
    /// A resume token or an earlier run's chunk session was picked up.
    resumed: bool,
}

impl Sent {
    /// Notes an executed step; `source` is what the planner saw.
    fn note(&mut self, step: &Step, source: &plan::SourceState) {
        let first = match step {
            Step::Resume { .. } => {
                self.resumed = true;
                return;
            }
            Step::Full { to } | Step::FromBookmark { to, .. } => to,
            Step::Incremental {
                from,
                to,
                intermediates,
            } => match intermediates {
                // -I carries every snapshot after `from` up to `to`.
                true => source
                    .snapshots
                    .iter()
                    .filter(|s| s.createtxg > from.createtxg && s.createtxg <= to.createtxg)
                    .min_by_key(|s| s.createtxg)
                    .unwrap_or(to),
                false => to,
            },
            Step::AbortPartial
            | Step::DiscardPartial { .. }
            | Step::DestroyTarget
            | Step::DestroySnapshot { .. }
            | Step::Rollback { .. } => return,
        };
        if self.first.is_none() {
            self.first = Some(first.name.clone());
        }
    }
}

impl Run<'_> {
    /// A pair that is up to date at `snapshot` after this run.
    fn report_done(
        &self,
        src: &Dataset,
        dst: &Dataset,
        sent: &Sent,
        bytes: u64,
        took: Duration,
        snapshot: &crate::zfs::Snapshot,
    ) {
        let moved = bytes > 0 || sent.first.is_some() || sent.resumed;
        let status = match moved {
            true => Status::Replicated,
            false => Status::UpToDate,
        };
        let mut r = DatasetReport::bare(self.src.label(src), self.dst.label(dst), status);
        r.bytes = bytes;
        r.duration = took;
        r.first_snapshot = sent.first.clone();
        r.last_snapshot = moved.then(|| snapshot.name.clone());
        r.resumed = sent.resumed;
        if let Some(chunked) = &self.chunked {
            let (chunks, resent) = chunked.totals.of(dst.as_str()).unwrap_or((0, 0));
            r.chunks = Some(chunks);
            r.resent_bytes = Some(resent);
        }
        self.reports.push(r);
    }
}

/// `ds`'s state in a listing of the target tree (absent: not there).
fn target_state(tree: &Tree, ds: &Dataset) -> TargetState {
    match tree.get(ds) {
        Some(t) => TargetState {
            exists: true,
            snapshots: t.snapshots.clone(),
            resume_token: t.resume_token.clone(),
        },
        None => TargetState {
            exists: false,
            snapshots: Vec::new(),
            resume_token: None,
        },
    }
}

/// The stream a chunked session moves, as its manifest records it.
fn identity(src: &Dataset, dst: &Dataset, stream: session::Stream) -> session::Identity {
    session::Identity {
        source: src.to_string(),
        target: dst.to_string(),
        stream,
    }
}

/// The snapshot a step receives, which the next listing must show.
fn step_target(step: &Step) -> Option<&Snapshot> {
    match step {
        Step::Full { to } | Step::Incremental { to, .. } | Step::FromBookmark { to, .. } => {
            Some(to)
        }
        _ => None,
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
        Step::DestroySnapshot { snapshot } => format!(
            "destroy the target's @{} (guid {}): the source's @{} is another snapshot (--force-delete)",
            snapshot.name, snapshot.guid, snapshot.name
        ),
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
