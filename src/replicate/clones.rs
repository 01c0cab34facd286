//! Clones under `-r`, as syncoid handles them: a source dataset that is a
//! clone of a snapshot of another dataset in the same run is replicated
//! after that dataset, and its first stream is sent from the origin
//! snapshot (`zfs send -i pool/origin@snap pool/clone@oldest`), so the
//! target's copy is a clone of the target's copy of the origin and shares
//! its blocks. When that cannot be done (the origin is not part of the run,
//! its snapshot is not on the target, the clone stream fails) the clone is
//! sent in full, as with `--no-clone-handling`, and the run says why.

use anyhow::Result;

use super::execute::Rollback;
use super::{identity, Run};
use crate::chunk::session::Stream;
use crate::transfer::Request;
use crate::zfs::{self, Dataset, Snapshot};

impl Run<'_> {
    /// With `-r` and clone handling: notes which of `pairs` are clones of a
    /// snapshot of another pair's source, and moves each clone after its
    /// origin's dataset.
    pub(super) fn order_clones(&self, pairs: &mut Vec<(Dataset, Dataset)>) -> Result<()> {
        if !(self.cfg.recursive && self.cfg.clone_handling) {
            let _ = self.clones.set(Vec::new());
            return Ok(());
        }
        let origins = self.src.origins(&self.cfg.source.dataset, true)?;
        let position = |pairs: &[(Dataset, Dataset)], ds: &str| {
            pairs.iter().position(|(s, _)| s.as_str() == ds)
        };
        let in_run: Vec<(Dataset, String)> = origins
            .into_iter()
            .filter(|(clone, origin)| {
                let origin_ds = origin.split('@').next().unwrap_or_default();
                position(pairs, clone.as_str()).is_some() && position(pairs, origin_ds).is_some()
            })
            .collect();
        // A clone of a clone needs its origin first too: repeat until stable.
        for _ in 0..=pairs.len() {
            let mut moved = false;
            for (clone, origin) in &in_run {
                let origin_ds = origin.split('@').next().unwrap_or_default();
                if let (Some(c), Some(o)) =
                    (position(pairs, clone.as_str()), position(pairs, origin_ds))
                {
                    if c < o {
                        let pair = pairs.remove(c);
                        pairs.insert(o, pair);
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
        let _ = self.clones.set(in_run);
        Ok(())
    }

    /// Before the first round of a clone whose target does not exist yet:
    /// sends its first snapshot from the origin snapshot when the target
    /// side holds that (by GUID), so the target's copy is a clone. Returns
    /// the bytes and the snapshot sent, or `None` when it does not apply or
    /// failed (then the planner sends it in full).
    pub(super) fn send_as_clone(
        &self,
        src: &Dataset,
        dst: &Dataset,
    ) -> Result<Option<(u64, Snapshot)>> {
        let Some((_, origin)) = self
            .clones
            .get()
            .and_then(|c| c.iter().find(|(clone, _)| clone == src))
        else {
            return Ok(None);
        };
        if self.dst.exists(dst)? {
            return Ok(None);
        }
        let Some((origin_ds, origin_snap)) = origin.split_once('@') else {
            return Ok(None);
        };
        let origin_ds = Dataset::parse(origin_ds)?;
        let Some(origin_guid) = self
            .src
            .snapshots(&origin_ds)?
            .into_iter()
            .find(|s| s.name == origin_snap)
            .map(|s| s.guid)
        else {
            return Ok(None);
        };
        let Some(rel) = origin_ds.relative_to(&self.cfg.source.dataset) else {
            return Ok(None);
        };
        let dst_origin = self.cfg.target.dataset.join(rel)?;
        let full = |why: String| {
            self.ui.info(&format!(
                "{} is a clone of {origin}, but {why}: sending it in full",
                self.src.label(src)
            ));
            Ok(None)
        };
        if !self.dst.exists(&dst_origin)?
            || !self
                .dst
                .snapshots(&dst_origin)?
                .iter()
                .any(|s| s.guid == origin_guid)
        {
            return full(format!(
                "{} does not hold @{origin_snap}",
                self.dst.label(&dst_origin)
            ));
        }
        let mut source = self.src.source_state(src)?;
        source.snapshots.extend(self.src_changes.pending(src));
        self.filter_source(src, &mut source)?;
        let pick = match self.cfg.no_stream {
            true => source.snapshots.iter().max_by_key(|s| s.createtxg),
            false => source.snapshots.iter().min_by_key(|s| s.createtxg),
        };
        let Some(to) = pick.cloned() else {
            return Ok(None);
        };
        if self.cfg.dry_run {
            println!(
                "{}: would send @{} as a clone of {} (zfs send -i {origin})",
                self.pair_label(src, dst),
                to.name,
                self.dst.label(&dst_origin)
            );
            return Ok(None);
        }
        self.ui.info(&format!(
            "{}: sending @{} as a clone of {}@{origin_snap}",
            self.pair_label(src, dst),
            to.name,
            self.dst.label(&dst_origin)
        ));
        let req = Request {
            send: zfs::send_clone_argv(src, origin, &to.name, &self.cfg.send_options),
            recv: self.receive_argv(src, dst, false, &Rollback::No)?,
            label: format!("{src}@{} (clone of {origin})", to.name),
            // A chunk session of this step never fits a later run's command
            // lines (the manifest has no clone stream): it is cancelled, not
            // re-attached.
            session: identity(src, dst, Stream::Full { to: to.clone() }),
        };
        match self
            .transfer(&req, 0)
            .and_then(|n| self.dst.verify(dst, &to).map(|()| n))
        {
            Ok(n) => Ok(Some((n, to))),
            Err(e) => full(format!("sending it as a clone failed ({e:#})")),
        }
    }
}
