//! syncoid's snapshot options around the plan: `--include-snaps` and
//! `--exclude-snaps` (the source list the planner sees, and whether the sync
//! snapshot is taken at all), `--dumpsnaps` (both sides' lists as the run
//! sees them) and `--delete-target-snapshots` (after success). Which
//! snapshots these pick is `plan::snapfilter`'s (pure); changes go through
//! the target's [`Changes`](crate::endpoint::Changes), so a dry run prints.

use std::time::SystemTime;

use anyhow::{bail, Result};

use super::Run;
use crate::plan::{snapfilter, syncsnap, SourceState, TargetState};
use crate::zfs::{Dataset, Snapshot};

impl Run<'_> {
    /// Whether this run's sync snapshot would pass `--include-snaps` and
    /// `--exclude-snaps` (syncoid then sends up to the newest included
    /// snapshot instead: so does resync, and it does not take one).
    pub(super) fn sync_snap_filtered_out(&self) -> bool {
        let name = syncsnap::new_name(
            self.cfg.protection.identifier.as_deref(),
            &self.hostname,
            SystemTime::now(),
        );
        self.cfg.protection.sync_snap && !self.cfg.snap_filter.includes(&name)
    }

    /// Says once per run that the sync snapshot is left out.
    pub(super) fn announce_filtered_sync_snap(&self) {
        if self.sync_snap_filtered_out() {
            self.ui.info(
                "--include-snaps/--exclude-snaps leave out the sync snapshot: not taking one; \
                 sending up to the newest included snapshot",
            );
        }
    }

    /// Keeps the source snapshots `--include-snaps`/`--exclude-snaps` let
    /// through; a source whose every snapshot is left out is an error that
    /// says so (not "no snapshots").
    pub(super) fn filter_source(&self, src: &Dataset, source: &mut SourceState) -> Result<()> {
        let filter = &self.cfg.snap_filter;
        if !filter.is_active() {
            return Ok(());
        }
        let before = source.snapshots.len();
        source.snapshots.retain(|s| filter.includes(&s.name));
        let gone = before - source.snapshots.len();
        if gone > 0 {
            self.ui.debug(&format!(
                "{}: {gone} of {before} snapshots left out by --include-snaps/--exclude-snaps",
                self.src.label(src)
            ));
        }
        if before > 0 && source.snapshots.is_empty() {
            bail!(
                "--include-snaps/--exclude-snaps leave none of the {before} snapshots of {} \
                 to send; nothing was changed",
                self.src.label(src)
            );
        }
        Ok(())
    }

    /// Says once per run, when a pair holds syncoid's sync snapshots (a
    /// target syncoid has been feeding), that resync leaves them and
    /// syncoid's holds alone, and how to remove them once syncoid is gone.
    pub(super) fn note_syncoid_snapshots(
        &self,
        src: &Dataset,
        dst: &Dataset,
        source: &SourceState,
        target: &TargetState,
    ) {
        let syncoid = |snaps: &[Snapshot]| snaps.iter().any(|s| s.name.starts_with("syncoid_"));
        if !(syncoid(&source.snapshots) || syncoid(&target.snapshots)) {
            return;
        }
        if self
            .syncoid_noted
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        self.ui.info(&format!(
            "{} and {} hold syncoid's sync snapshots (syncoid_*): resync leaves them and \
             syncoid's holds alone. Once syncoid no longer runs, remove them on each side with \
             `zfs list -H -o name -t snapshot -r DATASET | grep '@syncoid_' | xargs -n1 zfs destroy` \
             (a held one needs `zfs release TAG SNAPSHOT` first; `zfs holds SNAPSHOT` names the tag)",
            self.src.label(src),
            self.dst.label(dst)
        ));
    }

    /// `--dumpsnaps`: one line per snapshot and bookmark, tab-separated:
    /// side, name, guid, createtxg; on stdout (stderr with `--json`).
    pub(super) fn dump_snapshots(
        &self,
        src: &Dataset,
        dst: &Dataset,
        source: &SourceState,
        target: &TargetState,
    ) {
        if !self.cfg.dumpsnaps {
            return;
        }
        let mut lines = Vec::new();
        let mut line = |side: &str, name: String, s: &Snapshot| {
            lines.push(format!("{side}\t{name}\t{}\t{}", s.guid, s.createtxg));
        };
        for s in &source.snapshots {
            line("source", format!("{src}@{}", s.name), s);
        }
        for b in &source.bookmarks {
            line("source", format!("{src}#{}", b.name), b);
        }
        for s in &target.snapshots {
            line("target", format!("{dst}@{}", s.name), s);
        }
        if lines.is_empty() {
            lines.push(format!("{src}: no snapshots on either side"));
        }
        match self.cfg.json {
            true => eprintln!("{}", lines.join("\n")),
            false => println!("{}", lines.join("\n")),
        }
    }

    /// `--delete-target-snapshots`, after the pair is up to date at `base`:
    /// destroys the target snapshots no longer on the source (never `base`,
    /// never one held by another job) and lists them. Failures warn: the
    /// data is already safe.
    pub(super) fn delete_stale_target_snapshots(
        &self,
        src: &Dataset,
        dst: &Dataset,
        base: &Snapshot,
    ) {
        if !self.cfg.delete_target_snapshots {
            return;
        }
        let lists = self.src.snapshots(src).and_then(|source| {
            let target = self.dst.snapshots(dst)?;
            let holds = match self.dst.caps.holds {
                true => self.dst.userrefs(dst)?,
                false => Vec::new(),
            };
            Ok((source, target, holds))
        });
        let (source, target, holds) = match lists {
            Ok(lists) => lists,
            Err(e) => {
                self.ui.warn(&format!(
                    "--delete-target-snapshots: cannot list {}: {e:#}",
                    self.dst.label(dst)
                ));
                return;
            }
        };
        let (stale, held) =
            snapfilter::stale_on_target(&source, &target, base, &holds, &self.cfg.snap_filter);
        let names = |v: &[Snapshot]| {
            v.iter()
                .map(|s| format!("@{}", s.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !held.is_empty() {
            self.ui.info(&format!(
                "{}: --delete-target-snapshots keeps {} (held by another job)",
                self.dst.label(dst),
                names(&held)
            ));
        }
        let mut destroyed = Vec::new();
        for snap in &stale {
            match self.dst_changes.destroy_snapshot(dst, &snap.name, None) {
                Ok(()) => destroyed.push(snap.clone()),
                Err(e) => self.ui.warn(&format!(
                    "--delete-target-snapshots: {}@{}: {e:#}",
                    self.dst.label(dst),
                    snap.name
                )),
            }
        }
        if !destroyed.is_empty() && !self.cfg.dry_run {
            self.ui.info(&format!(
                "{}: destroyed {} target snapshot(s) no longer on the source: {}",
                self.dst.label(dst),
                destroyed.len(),
                names(&destroyed)
            ));
        }
    }
}
