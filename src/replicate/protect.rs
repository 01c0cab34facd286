//! After a pair is up to date: `--use-hold` moves this job's hold to the
//! newest common snapshot on both sides, `--create-bookmark` bookmarks it
//! on the source, and older sync snapshots of this job are pruned on both
//! sides (queued per pair, destroyed in one batched exec per side). Names
//! and policy come from `protect` (pure); every change goes through the
//! sides' [`Changes`](crate::endpoint::Changes). Failures here warn: the
//! data is already safe.

use anyhow::Result;

use super::Run;
use crate::cli::Location;
use crate::endpoint::{Changes, ZfsHost};
use crate::plan::protect::{self, HoldSide};
use crate::plan::syncsnap;
use crate::plan::{SourceState, TargetState};
use crate::sys::Unpoisoned;
use crate::zfs::{Dataset, Snapshot};

impl Run<'_> {
    /// One line per run for each protection the ZFS cannot give.
    pub(super) fn announce_missing_protection(&self) {
        if self.cfg.protection.use_hold {
            for (side, what) in [(self.src, "source"), (self.dst, "target")] {
                if !side.caps.holds {
                    self.ui.info(&format!(
                        "--use-hold: the {what}'s ZFS on {} has no holds (zfs hold); going on without them there",
                        side.host().label()
                    ));
                }
            }
        }
        if self.cfg.protection.create_bookmark && !self.src.caps.bookmarks {
            self.ui.info(&format!(
                "--create-bookmark: the source's ZFS on {} has no bookmarks; going on without them",
                self.src.host().label()
            ));
        }
    }

    /// This job's hold tag on one side of the pair `src -> dst`.
    fn hold_tag(&self, on: HoldSide, src: &Dataset, dst: &Dataset) -> String {
        let (peer, peer_ds) = match on {
            HoldSide::Source => (self.dst, dst),
            HoldSide::Target => (self.src, src),
        };
        let peer_host = match &peer.location {
            Location::Local => self.hostname.as_str(),
            Location::Remote { host, .. } => host.as_str(),
        };
        protect::hold_tag(
            self.cfg.protection.identifier.as_deref(),
            on,
            peer_host,
            peer_ds,
        )
    }

    /// `--use-hold`: holds a step's base and target snapshots on the source
    /// for the transfer. A failure warns; the transfer says what is wrong.
    pub(super) fn hold_for_step(&self, src: &Dataset, dst: &Dataset, snaps: &[&Snapshot]) {
        if !self.cfg.protection.use_hold || !self.src.caps.holds {
            return;
        }
        let tag = self.hold_tag(HoldSide::Source, src, dst);
        for s in snaps {
            if let Err(e) = self.src_changes.hold(src, &s.name, &tag) {
                self.ui.warn(&format!(
                    "holding {}@{}: {e:#}",
                    self.src.label(src),
                    s.name
                ));
            }
        }
    }

    /// After success: `--use-hold` keeps this job's hold on `newest` (by
    /// GUID) on both sides and releases it everywhere else (failures warn);
    /// `--create-bookmark` bookmarks it on the source, and a bookmark that
    /// cannot be made fails the dataset, as in syncoid: the next
    /// incremental's base is not protected as asked.
    pub(super) fn protect(
        &self,
        src: &Dataset,
        dst: &Dataset,
        source: &SourceState,
        target: &TargetState,
        newest: &Snapshot,
    ) -> Result<()> {
        let on = |snaps: &[Snapshot]| snaps.iter().find(|s| s.guid == newest.guid).cloned();
        let (on_src, on_dst) = (on(&source.snapshots), on(&target.snapshots));
        if self.cfg.protection.use_hold {
            for (on, side, changes, ds, keep) in [
                (HoldSide::Source, self.src, self.src_changes, src, &on_src),
                (HoldSide::Target, self.dst, self.dst_changes, dst, &on_dst),
            ] {
                if !side.caps.holds {
                    continue;
                }
                let tag = self.hold_tag(on, src, dst);
                if let Err(e) = self.move_hold(side, changes, ds, &tag, keep.as_ref()) {
                    self.ui
                        .warn(&format!("--use-hold on {}: {e:#}", side.label(ds)));
                }
            }
        }
        if let (true, true, Some(snap)) = (
            self.cfg.protection.create_bookmark,
            self.src.caps.bookmarks,
            &on_src,
        ) {
            self.bookmark(src, snap, &source.bookmarks).map_err(|e| {
                e.context(format!(
                    "replicated, but --create-bookmark failed on {}",
                    self.src.label(src)
                ))
            })?;
        }
        Ok(())
    }

    /// Holds `keep` with this job's tag and releases the tag from every
    /// other held snapshot of `ds`.
    fn move_hold(
        &self,
        side: &ZfsHost,
        changes: &dyn Changes,
        ds: &Dataset,
        tag: &str,
        keep: Option<&Snapshot>,
    ) -> Result<()> {
        if let Some(k) = keep {
            changes.hold(ds, &k.name, tag)?;
        }
        let refs = side.userrefs(ds)?;
        for name in protect::stale_holds(&refs, keep.map(|k| k.name.as_str())) {
            if let Err(e) = changes.release(ds, name, tag) {
                self.ui.warn(&format!(
                    "releasing hold {tag} on {}@{name}: {e:#}",
                    side.label(ds)
                ));
            }
        }
        Ok(())
    }

    /// Bookmarks `snap` on the source and destroys this job's older bookmarks.
    fn bookmark(&self, src: &Dataset, snap: &Snapshot, bookmarks: &[Snapshot]) -> Result<()> {
        let plan = protect::bookmark_plan(
            snap,
            bookmarks,
            self.cfg.protection.identifier.as_deref(),
            &self.hostname,
        )
        .map_err(anyhow::Error::msg)?;
        if let Some(name) = &plan.create {
            self.src_changes.bookmark(src, &snap.name, name)?;
            self.ui.debug(&format!(
                "bookmarked {}@{} as #{name}",
                self.src.label(src),
                snap.name
            ));
        }
        for name in &plan.destroy {
            self.src_changes.destroy_bookmark(src, name)?;
        }
        Ok(())
    }

    /// Queues older sync snapshots of this job (exact identifier and
    /// hostname) for destruction on both sides, from the listings that
    /// showed the pair up to date; [`Run::flush_prunes`] destroys them,
    /// batched per side, at the end of the run.
    pub(super) fn prune(
        &self,
        src: &Dataset,
        dst: &Dataset,
        sync_name: Option<&str>,
        source: &SourceState,
        target: &TargetState,
    ) {
        let Some(current) = sync_name else { return };
        if self.cfg.protection.keep_sync_snap {
            return;
        }
        let id = self.cfg.protection.identifier.as_deref();
        for (on, side, ds, snaps, queue) in [
            (
                HoldSide::Source,
                self.src,
                src,
                &source.snapshots,
                &self.prunes.0,
            ),
            (
                HoldSide::Target,
                self.dst,
                dst,
                &target.snapshots,
                &self.prunes.1,
            ),
        ] {
            if !snaps.iter().any(|s| s.name == current) {
                self.ui.warn(&format!(
                    "pruning sync snapshots on {}: @{current} is missing; not pruning",
                    side.label(ds)
                ));
                continue;
            }
            let tag = self.hold_tag(on, src, dst);
            let mut queue = queue.locked();
            for s in snaps
                .iter()
                .filter(|s| s.name != current && syncsnap::is_ours(&s.name, id, &self.hostname))
            {
                self.ui
                    .debug(&format!("pruning {}@{}", side.label(ds), s.name));
                queue.push((ds.clone(), s.name.clone(), Some(tag.clone())));
            }
        }
    }

    /// Destroys what [`Run::prune`] queued: both sides at once, each in
    /// up to `--jobs` batched execs running side by side (zfs-fuse takes
    /// about 40 ms per destroy). A failure warns; the data is safe.
    pub(super) fn flush_prunes(&self) {
        let lists = [
            (
                self.src,
                self.src_changes,
                std::mem::take(&mut *self.prunes.0.locked()),
                &self.cfg.source.dataset,
                self.last_listed.0.locked().take(),
            ),
            (
                self.dst,
                self.dst_changes,
                std::mem::take(&mut *self.prunes.1.locked()),
                &self.cfg.target.dataset,
                self.last_listed.1.locked().take(),
            ),
        ];
        let jobs = self.cfg.jobs.max(1);
        std::thread::scope(|scope| {
            for (side, changes, list, root, listed) in &lists {
                if list.is_empty() {
                    continue;
                }
                let (side, changes) = (*side, *changes);
                scope.spawn(move || {
                    let list = self.prune_trees(side, changes, list, root, listed.as_deref());
                    if list.is_empty() {
                        return;
                    }
                    std::thread::scope(|scope| {
                        for batch in list.chunks(list.len().div_ceil(jobs)) {
                            scope.spawn(move || {
                                let results = changes.destroy_snapshots(batch);
                                for ((ds, snap, _), result) in batch.iter().zip(results) {
                                    if let Err(e) = result {
                                        self.ui.warn(&format!(
                                            "pruning sync snapshot {}@{snap}: {e:#}",
                                            side.label(ds)
                                        ));
                                    }
                                }
                            });
                        }
                    });
                });
            }
        });
    }

    /// Prunes with one `zfs destroy -r root@snap` each sync snapshot that
    /// `list` prunes from every dataset of the side's latest listing
    /// (`listed`, the tree under `root`), unless `--use-hold` may have
    /// left a hold of ours to release first (a recursive run's usual case:
    /// one command, and one transaction on the pool, for the whole tree;
    /// on zfs-fuse 20 ms where 41 destroys take 460 ms); returns what is
    /// left to prune one by one (everything, where that fails).
    fn prune_trees(
        &self,
        side: &ZfsHost,
        changes: &dyn Changes,
        list: &[super::Prune],
        root: &Dataset,
        listed: Option<&[Dataset]>,
    ) -> Vec<super::Prune> {
        let Some(listed) = listed.filter(|l| l.len() > 1) else {
            return list.to_vec();
        };
        let mut names: Vec<&str> = list.iter().map(|(_, snap, _)| snap.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut whole: Vec<&str> = Vec::new();
        for name in names {
            let of_name = || list.iter().filter(|(_, snap, _)| snap == name);
            let covers = !self.cfg.protection.use_hold
                && listed
                    .iter()
                    .all(|ds| of_name().any(|(pruned, _, _)| pruned == ds))
                && listed.contains(root);
            if !covers {
                continue;
            }
            match changes.destroy_snapshot_tree(root, name) {
                Ok(()) => whole.push(name),
                Err(e) => self.ui.debug(&format!(
                    "pruning @{name} under {} in one command failed ({e:#}); one by one",
                    side.label(root)
                )),
            }
        }
        list.iter()
            .filter(|(_, snap, _)| !whole.contains(&snap.as_str()))
            .cloned()
            .collect()
    }
}
