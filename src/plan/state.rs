//! What the planner sees of both sides: the source's snapshots and
//! bookmarks, the target's snapshots and resume token, as listed before a
//! run. Plain data; gathering it is the caller's job.

use crate::zfs::Snapshot;

/// The source dataset's snapshots, ascending by createtxg.
pub struct SourceState {
    /// The source dataset's name (`pool/ds`): a resume token must name it.
    pub dataset: String,
    pub snapshots: Vec<Snapshot>,
    /// Its bookmarks (the name after `#`, the snapshot's GUID and
    /// createtxg), any order; empty where the ZFS has none.
    pub bookmarks: Vec<Snapshot>,
}

/// The target dataset as found before the run.
pub struct TargetState {
    pub exists: bool,
    /// Ascending by createtxg; empty when the target does not exist.
    pub snapshots: Vec<Snapshot>,
    /// `receive_resume_token`, when a resumable receive was interrupted.
    pub resume_token: Option<String>,
}
