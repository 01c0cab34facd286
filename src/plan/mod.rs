//! The planner: from both sides' snapshot lists and the target's resume
//! state, decide the steps that bring the target up to the source's newest
//! snapshot, or say precisely why it cannot be done safely.
//!
//! Pure: it sees listings gathered beforehand and returns a value; the
//! caller executes the steps. Snapshots are matched by GUID, never by name
//! alone: a same-named snapshot with another GUID is a different snapshot.
//! Nothing here destroys target data unless `force_delete` is set; without
//! it, every situation that would need that is a [`Conflict`] whose message
//! lists both sides.
//!
//! Rules, in order:
//! 1. A resume token on the target: with `resume`, the plan is the lone
//!    [`Step::Resume`] when the token passes [`resume::check`] (it names a
//!    snapshot of this source that still has the token's GUID, from a base
//!    both sides hold), else the lone [`Step::DiscardPartial`] saying why;
//!    without `resume`, [`Step::AbortPartial`] comes first.
//! 2. No source snapshots: [`Conflict::NoSourceSnapshots`].
//! 3. No target: a full stream of the oldest source snapshot, then one
//!    incremental stream with intermediates to the newest (`no_stream`: a
//!    full stream of the newest only).
//! 4. A target without snapshots: [`Conflict::TargetHasNoSnapshots`]
//!    (`force_delete`: destroy it and send in full).
//! 5. The common snapshot is the newest source snapshot whose GUID is on the
//!    target. A source bookmark whose GUID is on the target is a base too (a
//!    bookmark keeps its snapshot's GUID and createtxg after the snapshot is
//!    destroyed): it is used when it is newer than the common snapshot, or
//!    when there is none; a snapshot wins over its own bookmark. No base:
//!    [`Conflict::GuidMismatch`] when names clash, else
//!    [`Conflict::NoCommonSnapshot`] (`force_delete`: destroy and send in full).
//! 6. Target snapshots newer than the base (by the target's createtxg)
//!    would make the incremental receive fail: GuidMismatch on a name clash,
//!    else [`Conflict::Diverged`] (`force_delete`: roll back to the base).
//! 7. The base is (or is newer than) the newest source snapshot: up to date.
//!    Otherwise one incremental stream from it to the newest (`-I`, or `-i`
//!    with `no_stream`). From a bookmark ZFS sends no intermediates, so
//!    [`Step::FromBookmark`] goes to the next source snapshot first, then `-I`
//!    to the newest (as syncoid does).
//!
//! A plan whose last step is `Resume` or `AbortPartial` changes the target's
//! state in a way the planner cannot foresee (a resumed or aborted receive
//! may create or remove the dataset): execute it, gather again and plan
//! again (`Plan::replan_after`).
//!
//! Beside the planner, each pure and below it only `zfs`: [`state`] (what
//! it sees of both sides), [`resume`] (whether a resume token fits the
//! plan), [`protect`] (hold tags and bookmarks that protect the next base)
//! and [`syncsnap`] (sync snapshot names and which are ours to prune).

use std::fmt;

use crate::zfs::Snapshot;

pub mod protect;
pub mod resume;
pub mod snapfilter;
mod state;
pub mod syncsnap;

pub use resume::Refusal;
pub use state::{SourceState, TargetState};

pub struct PlanOptions {
    /// Send only the newest snapshot (`-i`, or a full stream of it), not the
    /// ones in between.
    pub no_stream: bool,
    /// Allow destroying the target or rolling it back to resolve a conflict.
    pub force_delete: bool,
    /// Resuming is allowed: no `--no-resume`, and both sides support tokens.
    pub resume: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `zfs receive -A target`: clears a partial receive we won't resume.
    AbortPartial,
    /// `zfs send -t TOKEN | zfs receive -s target`; `received` is the
    /// token's count of stream bytes the target already has.
    Resume { token: String, received: u64 },
    /// `zfs receive -A target`: the token must not be sent (forged, for
    /// another dataset, or stale); `why` completes "resume token on X ...".
    DiscardPartial { why: Refusal },
    /// `zfs destroy -r target` (only with `force_delete`).
    DestroyTarget,
    /// `zfs rollback -r target@to` (only with `force_delete`): destroys the
    /// target's snapshots newer than `to`. `to` is the target's own entry
    /// (its name on the target, its createtxg there).
    Rollback { to: Snapshot },
    /// `zfs destroy target@name` (only with `force_delete`): a target
    /// snapshot older than the base that has the name of a source snapshot
    /// about to be sent, with another GUID (the receive would fail with
    /// "destination already exists"). `snapshot` is the target's entry.
    DestroySnapshot { snapshot: Snapshot },
    /// A full stream of the source snapshot `to`.
    Full { to: Snapshot },
    /// An incremental stream between two source snapshots (source names):
    /// `-I` with `intermediates`, else `-i`.
    Incremental {
        from: Snapshot,
        to: Snapshot,
        intermediates: bool,
    },
    /// `zfs send -i source#bookmark source@to`: the base snapshot is gone
    /// from the source but its bookmark is there (no intermediates).
    FromBookmark { bookmark: Snapshot, to: Snapshot },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The target already holds the source's newest snapshot (or, when only
    /// a bookmark of it is left on the source, a newer one: then `snapshot`
    /// is the target's entry of the bookmarked snapshot).
    UpToDate {
        snapshot: Snapshot,
    },
    Replicate(Vec<Step>),
    Conflict(Conflict),
}

impl Plan {
    #[cfg(test)]
    /// True when the caller must gather both sides again and plan again
    /// after executing this plan (it ends by resuming or aborting a partial
    /// receive).
    pub fn replan_after(&self) -> bool {
        matches!(
            self,
            Plan::Replicate(steps)
                if matches!(
                    steps.last(),
                    Some(Step::Resume { .. } | Step::AbortPartial | Step::DiscardPartial { .. })
                )
        )
    }
}

/// Why the planner refuses; nothing has been changed when one is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    NoSourceSnapshots,
    TargetHasNoSnapshots,
    NoCommonSnapshot {
        source: Vec<Snapshot>,
        target: Vec<Snapshot>,
    },
    /// A snapshot named alike on both sides is a different snapshot.
    GuidMismatch {
        name: String,
        source_guid: u64,
        target_guid: u64,
    },
    /// The target has snapshots newer than the last one both sides share.
    Diverged {
        common: Snapshot,
        /// The target's snapshots newer than `common` there, oldest first.
        target_only: Vec<Snapshot>,
    },
}

pub fn plan(source: &SourceState, target: &TargetState, opts: &PlanOptions) -> Plan {
    let mut steps = Vec::new();
    if let Some(token) = &target.resume_token {
        if opts.resume {
            let checked = resume::check(token, source, &target.snapshots);
            return Plan::Replicate(vec![match checked {
                Ok(t) => Step::Resume {
                    token: token.clone(),
                    received: t.bytes,
                },
                Err(why) => Step::DiscardPartial { why },
            }]);
        }
        steps.push(Step::AbortPartial);
    }

    let src = sorted(&source.snapshots);
    let (Some(oldest), Some(newest)) = (src.first(), src.last()) else {
        return Plan::Conflict(Conflict::NoSourceSnapshots);
    };
    let full_steps = |steps: &mut Vec<Step>| {
        if opts.no_stream || oldest == newest {
            steps.push(Step::Full { to: newest.clone() });
        } else {
            steps.push(Step::Full { to: oldest.clone() });
            steps.push(Step::Incremental {
                from: oldest.clone(),
                to: newest.clone(),
                intermediates: true,
            });
        }
    };

    if !target.exists {
        full_steps(&mut steps);
        return Plan::Replicate(steps);
    }

    let tgt = sorted(&target.snapshots);
    if tgt.is_empty() {
        if steps.contains(&Step::AbortPartial) {
            // Aborting may remove a dataset that only held the partial
            // receive, or leave an empty one: decide after looking again.
            return Plan::Replicate(steps);
        }
        if !opts.force_delete {
            return Plan::Conflict(Conflict::TargetHasNoSnapshots);
        }
        steps.push(Step::DestroyTarget);
        full_steps(&mut steps);
        return Plan::Replicate(steps);
    }

    let on_target = |s: &Snapshot| tgt.iter().find(|t| t.guid == s.guid);
    let common = src.iter().rev().find_map(|s| on_target(s).map(|t| (s, t)));
    let bookmark = sorted(&source.bookmarks)
        .into_iter()
        .rev()
        .find_map(|b| on_target(&b).map(|t| (b, t.clone())));
    if let Some((bookmark, on_tgt)) = bookmark {
        if common.is_none_or(|(c, _)| bookmark.createtxg > c.createtxg) {
            return from_bookmark(steps, &src, &tgt, bookmark, on_tgt, opts);
        }
    }
    let Some((common, common_on_target)) = common else {
        if !opts.force_delete {
            return Plan::Conflict(guid_mismatch(&src, &tgt).unwrap_or_else(|| {
                Conflict::NoCommonSnapshot {
                    source: src.clone(),
                    target: tgt.clone(),
                }
            }));
        }
        steps.push(Step::DestroyTarget);
        full_steps(&mut steps);
        return Plan::Replicate(steps);
    };

    if let Some(conflict) = divergence(&mut steps, &src, &tgt, common, common_on_target, opts) {
        return Plan::Conflict(conflict);
    }
    let sent: Vec<&Snapshot> = src
        .iter()
        .filter(|s| s.createtxg > common.createtxg && (!opts.no_stream || *s == newest))
        .collect();
    if let Some(conflict) = name_clashes(&mut steps, &sent, &tgt, common_on_target, opts) {
        return Plan::Conflict(conflict);
    }
    if common == newest {
        if steps.is_empty() {
            return Plan::UpToDate {
                snapshot: common.clone(),
            };
        }
        return Plan::Replicate(steps);
    }
    steps.push(Step::Incremental {
        from: common.clone(),
        to: newest.clone(),
        intermediates: !opts.no_stream,
    });
    Plan::Replicate(steps)
}

/// With `--include-snaps`/`--exclude-snaps` the source list the planner saw
/// is filtered, but a `-I` stream would carry every snapshot between its
/// ends, left-out ones too. So, as syncoid does, each `-I` step becomes one
/// `-i` step per pair of neighbouring listed snapshots.
pub fn one_at_a_time(plan: Plan, source: &SourceState) -> Plan {
    let Plan::Replicate(steps) = plan else {
        return plan;
    };
    let src = sorted(&source.snapshots);
    let mut out = Vec::new();
    for step in steps {
        match step {
            Step::Incremental {
                from,
                to,
                intermediates: true,
            } => {
                let chain: Vec<&Snapshot> = src
                    .iter()
                    .filter(|s| s.createtxg > from.createtxg && s.createtxg <= to.createtxg)
                    .collect();
                let mut prev = from;
                for next in chain {
                    out.push(Step::Incremental {
                        from: prev,
                        to: next.clone(),
                        intermediates: false,
                    });
                    prev = next.clone();
                }
            }
            other => out.push(other),
        }
    }
    Plan::Replicate(out)
}

/// Rules 6 and 7 when the base is a source bookmark whose GUID the target
/// holds as `on_target`.
fn from_bookmark(
    mut steps: Vec<Step>,
    src: &[Snapshot],
    tgt: &[Snapshot],
    bookmark: Snapshot,
    on_target: Snapshot,
    opts: &PlanOptions,
) -> Plan {
    if let Some(conflict) = divergence(&mut steps, src, tgt, &on_target, &on_target, opts) {
        return Plan::Conflict(conflict);
    }
    let newer: Vec<&Snapshot> = src
        .iter()
        .filter(|s| s.createtxg > bookmark.createtxg)
        .collect();
    let (Some(&next), Some(&newest)) = (newer.first(), newer.last()) else {
        if steps.is_empty() {
            return Plan::UpToDate {
                snapshot: on_target,
            };
        }
        return Plan::Replicate(steps);
    };
    let first = if opts.no_stream { newest } else { next };
    steps.push(Step::FromBookmark {
        bookmark,
        to: first.clone(),
    });
    if first != newest {
        steps.push(Step::Incremental {
            from: first.clone(),
            to: newest.clone(),
            intermediates: true,
        });
    }
    Plan::Replicate(steps)
}

/// Rule 6: target snapshots newer than the base (`on_target`, the target's
/// entry of it; `shared` names it in the message) are a conflict, or with
/// `force_delete` a rollback to the base, pushed onto `steps`.
fn divergence(
    steps: &mut Vec<Step>,
    src: &[Snapshot],
    tgt: &[Snapshot],
    shared: &Snapshot,
    on_target: &Snapshot,
    opts: &PlanOptions,
) -> Option<Conflict> {
    let newer_on_target: Vec<Snapshot> = tgt
        .iter()
        .filter(|t| t.createtxg > on_target.createtxg)
        .cloned()
        .collect();
    if newer_on_target.is_empty() {
        return None;
    }
    if !opts.force_delete {
        return Some(
            guid_mismatch(src, &newer_on_target).unwrap_or_else(|| Conflict::Diverged {
                common: shared.clone(),
                target_only: newer_on_target,
            }),
        );
    }
    steps.push(Step::Rollback {
        to: on_target.clone(),
    });
    None
}

/// Rule 6b: a target snapshot no newer than the base (newer ones are rule
/// 6's) whose name is that of a snapshot about to be sent (`sent`), with
/// another GUID, would make the receive fail ("destination already
/// exists"): a conflict, or with `force_delete` (as syncoid does) a step
/// that destroys that target snapshot first.
fn name_clashes(
    steps: &mut Vec<Step>,
    sent: &[&Snapshot],
    tgt: &[Snapshot],
    on_target: &Snapshot,
    opts: &PlanOptions,
) -> Option<Conflict> {
    for s in sent {
        let Some(t) = tgt
            .iter()
            .find(|t| t.name == s.name && t.guid != s.guid && t.createtxg <= on_target.createtxg)
        else {
            continue;
        };
        // The base itself is never destroyed: no incremental would apply.
        if !opts.force_delete || t.guid == on_target.guid {
            return Some(Conflict::GuidMismatch {
                name: s.name.clone(),
                source_guid: s.guid,
                target_guid: t.guid,
            });
        }
        steps.push(Step::DestroySnapshot {
            snapshot: t.clone(),
        });
    }
    None
}

/// Ascending by createtxg (then name), whatever order the caller gave.
fn sorted(snapshots: &[Snapshot]) -> Vec<Snapshot> {
    let mut v = snapshots.to_vec();
    v.sort_by(|a, b| (a.createtxg, &a.name).cmp(&(b.createtxg, &b.name)));
    v
}

/// The newest source snapshot whose name is on `target` with another GUID.
fn guid_mismatch(source: &[Snapshot], target: &[Snapshot]) -> Option<Conflict> {
    source.iter().rev().find_map(|s| {
        target
            .iter()
            .find(|t| t.name == s.name && t.guid != s.guid)
            .map(|t| Conflict::GuidMismatch {
                name: s.name.clone(),
                source_guid: s.guid,
                target_guid: t.guid,
            })
    })
}

/// How many snapshots a list shows before abbreviating: the first and last
/// `LIST_EDGE` of longer lists.
const LIST_EDGE: usize = 3;

struct SnapshotList<'a>(&'a [Snapshot]);

impl fmt::Display for SnapshotList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = self.0;
        if list.is_empty() {
            return f.write_str("(none)");
        }
        let one =
            |f: &mut fmt::Formatter<'_>, s: &Snapshot| write!(f, "@{} (guid {})", s.name, s.guid);
        let shown: Vec<&Snapshot> = if list.len() <= 2 * LIST_EDGE + 1 {
            list.iter().collect()
        } else {
            list[..LIST_EDGE]
                .iter()
                .chain(&list[list.len() - LIST_EDGE..])
                .collect()
        };
        for (i, s) in shown.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if i == LIST_EDGE && shown.len() < list.len() {
                write!(f, "... {} more ..., ", list.len() - shown.len())?;
            }
            one(f, s)?;
        }
        Ok(())
    }
}

const UNCHANGED: &str = "Nothing was changed.";

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::NoSourceSnapshots => write!(
                f,
                "the source has no snapshots, so there is nothing to send. {UNCHANGED} \
                 Create a snapshot on the source (resync makes one itself unless sync \
                 snapshots are turned off)."
            ),
            Conflict::TargetHasNoSnapshots => write!(
                f,
                "the target exists but has no snapshots, so no incremental stream can \
                 apply to it, and a full stream would overwrite what it holds. {UNCHANGED} \
                 --force-delete would destroy the target (with its snapshots and descendants) and send the source in full."
            ),
            Conflict::NoCommonSnapshot { source, target } => write!(
                f,
                "the source and the target have no snapshot in common (matched by GUID), \
                 so no incremental stream can apply.\n  source ({}): {}\n  target ({}): {}\n\
                 {UNCHANGED} --force-delete would destroy the target (with its snapshots and descendants) and send the source in full.",
                source.len(),
                SnapshotList(source),
                target.len(),
                SnapshotList(target),
            ),
            Conflict::GuidMismatch {
                name,
                source_guid,
                target_guid,
            } => write!(
                f,
                "snapshot @{name} exists on both sides but is not the same snapshot: \
                 guid {source_guid} on the source, guid {target_guid} on the target \
                 (created independently, or the target was rolled back and written).\n\
                 {UNCHANGED} --force-delete would replace the target's copy: roll it back \
                 to the last shared snapshot, or destroy and resend it if there is none."
            ),
            Conflict::Diverged {
                common,
                target_only,
            } => write!(
                f,
                "the target has diverged: it has {} snapshot(s) newer than @{} (guid {}), \
                 the last one it shares with the source.\n  shared: @{} (guid {})\n  \
                 target only: {}\n{UNCHANGED} --force-delete would roll the target back \
                 to @{}, destroying those snapshots.",
                target_only.len(),
                common.name,
                common.guid,
                common.name,
                common.guid,
                SnapshotList(target_only),
                common.name,
            ),
        }
    }
}

impl std::error::Error for Conflict {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zfs::token::tests::{FULL, INCREMENTAL};

    /// `"a:1:10 b:2:20"`: snapshots as name:guid:createtxg.
    fn snaps(spec: &str) -> Vec<Snapshot> {
        spec.split_whitespace()
            .map(|s| {
                let [name, guid, txg] = s.split(':').collect::<Vec<_>>()[..] else {
                    panic!("bad fixture {s:?}");
                };
                Snapshot {
                    name: name.into(),
                    guid: guid.parse().unwrap(),
                    createtxg: txg.parse().unwrap(),
                }
            })
            .collect()
    }

    fn snap(spec: &str) -> Snapshot {
        snaps(spec).remove(0)
    }

    fn source(spec: &str) -> SourceState {
        SourceState {
            dataset: "ozs/tokfix".into(),
            snapshots: snaps(spec),
            bookmarks: vec![],
        }
    }

    /// A source with snapshots `spec` and bookmarks `bookmarks`.
    fn source_bm(spec: &str, bookmarks: &str) -> SourceState {
        SourceState {
            dataset: "ozs/tokfix".into(),
            snapshots: snaps(spec),
            bookmarks: snaps(bookmarks),
        }
    }

    fn target(spec: &str) -> TargetState {
        TargetState {
            exists: true,
            snapshots: snaps(spec),
            resume_token: None,
        }
    }

    fn no_target() -> TargetState {
        TargetState {
            exists: false,
            snapshots: vec![],
            resume_token: None,
        }
    }

    const DEFAULT: PlanOptions = PlanOptions {
        no_stream: false,
        force_delete: false,
        resume: true,
    };
    const NO_STREAM: PlanOptions = PlanOptions {
        no_stream: true,
        ..DEFAULT
    };
    const FORCE: PlanOptions = PlanOptions {
        force_delete: true,
        ..DEFAULT
    };

    fn full(spec: &str) -> Step {
        Step::Full { to: snap(spec) }
    }

    #[test]
    fn an_older_target_snapshot_named_like_one_to_send_is_a_conflict_or_destroyed_with_force() {
        // The target kept an old "weekly" of its own; the source's new
        // "weekly" (another GUID) is about to be sent after the base b.
        let src = source("a:1:10 b:2:20 weekly:9:30");
        let tgt = target("weekly:5:4 a:1:5 b:2:6");
        assert_eq!(
            plan(&src, &tgt, &DEFAULT),
            Plan::Conflict(Conflict::GuidMismatch {
                name: "weekly".into(),
                source_guid: 9,
                target_guid: 5,
            })
        );
        assert_eq!(
            plan(&src, &tgt, &FORCE),
            Plan::Replicate(vec![
                Step::DestroySnapshot {
                    snapshot: snap("weekly:5:4")
                },
                incr("b:2:20", "weekly:9:30", true),
            ])
        );
        // The clash is the base itself (renamed on the target): never
        // destroyed, force or not.
        let src = source("a:1:10 b:2:20 weekly:9:30");
        let tgt = target("a:1:5 weekly:2:6");
        assert!(matches!(
            plan(&src, &tgt, &FORCE),
            Plan::Conflict(Conflict::GuidMismatch { .. })
        ));
        // --no-stream sends only the newest: an older clash does not matter.
        let src = source("a:1:10 old:3:15 b:2:20 c:4:30");
        let tgt = target("old:7:4 a:1:5 b:2:6");
        assert_eq!(
            plan(&src, &tgt, &NO_STREAM),
            Plan::Replicate(vec![incr("b:2:20", "c:4:30", false)])
        );
    }

    #[test]
    fn filtered_snapshots_go_one_incremental_at_a_time() {
        // The source as --include-snaps left it (b:2:20 was filtered out).
        let src = source("a:1:10 c:3:30 d:4:40");
        let p = one_at_a_time(plan(&src, &no_target(), &DEFAULT), &src);
        assert_eq!(
            p,
            Plan::Replicate(vec![
                full("a:1:10"),
                incr("a:1:10", "c:3:30", false),
                incr("c:3:30", "d:4:40", false),
            ])
        );
        let p = one_at_a_time(plan(&src, &target("a:1:10"), &DEFAULT), &src);
        assert_eq!(
            p,
            Plan::Replicate(vec![
                incr("a:1:10", "c:3:30", false),
                incr("c:3:30", "d:4:40", false),
            ])
        );
        // -i steps and up-to-date plans are left as they are.
        let p = plan(&src, &target("a:1:10"), &NO_STREAM);
        assert_eq!(one_at_a_time(p.clone(), &src), p);
        let p = plan(&src, &target("d:4:40"), &DEFAULT);
        assert_eq!(one_at_a_time(p.clone(), &src), p);
    }

    fn incr(from: &str, to: &str, intermediates: bool) -> Step {
        Step::Incremental {
            from: snap(from),
            to: snap(to),
            intermediates,
        }
    }

    fn replicate(steps: Vec<Step>) -> Plan {
        Plan::Replicate(steps)
    }

    const SRC: &str = "a:1:10 b:2:20 c:3:30";

    #[test]
    fn new_target_gets_the_oldest_in_full_then_the_rest_incrementally() {
        assert_eq!(
            plan(&source(SRC), &no_target(), &DEFAULT),
            replicate(vec![full("a:1:10"), incr("a:1:10", "c:3:30", true)])
        );
    }

    #[test]
    fn new_target_from_a_single_snapshot_gets_one_full_stream() {
        assert_eq!(
            plan(&source("a:1:10"), &no_target(), &DEFAULT),
            replicate(vec![full("a:1:10")])
        );
    }

    #[test]
    fn no_stream_sends_only_the_newest_in_full() {
        assert_eq!(
            plan(&source(SRC), &no_target(), &NO_STREAM),
            replicate(vec![full("c:3:30")])
        );
    }

    #[test]
    fn source_order_does_not_matter() {
        assert_eq!(
            plan(&source("c:3:30 a:1:10 b:2:20"), &no_target(), &DEFAULT),
            replicate(vec![full("a:1:10"), incr("a:1:10", "c:3:30", true)])
        );
    }

    #[test]
    fn source_without_snapshots_is_a_conflict() {
        assert_eq!(
            plan(&source(""), &no_target(), &DEFAULT),
            Plan::Conflict(Conflict::NoSourceSnapshots)
        );
        assert_eq!(
            plan(&source(""), &target("a:1:5"), &FORCE),
            Plan::Conflict(Conflict::NoSourceSnapshots)
        );
    }

    #[test]
    fn target_without_snapshots_needs_force_delete() {
        assert_eq!(
            plan(&source(SRC), &target(""), &DEFAULT),
            Plan::Conflict(Conflict::TargetHasNoSnapshots)
        );
        assert_eq!(
            plan(&source(SRC), &target(""), &FORCE),
            replicate(vec![
                Step::DestroyTarget,
                full("a:1:10"),
                incr("a:1:10", "c:3:30", true)
            ])
        );
        let force_no_stream = PlanOptions {
            no_stream: true,
            ..FORCE
        };
        assert_eq!(
            plan(&source(SRC), &target(""), &force_no_stream),
            replicate(vec![Step::DestroyTarget, full("c:3:30")])
        );
    }

    #[test]
    fn up_to_date_when_the_target_has_the_newest_source_snapshot() {
        // Target createtxgs differ from the source's; GUIDs decide.
        assert_eq!(
            plan(&source(SRC), &target("a:1:5 b:2:6 c:3:7"), &DEFAULT),
            Plan::UpToDate {
                snapshot: snap("c:3:30")
            }
        );
    }

    #[test]
    fn incremental_from_the_newest_common_snapshot() {
        assert_eq!(
            plan(&source(SRC), &target("a:1:5"), &DEFAULT),
            replicate(vec![incr("a:1:10", "c:3:30", true)])
        );
        assert_eq!(
            plan(&source(SRC), &target("a:1:5 b:2:6"), &DEFAULT),
            replicate(vec![incr("b:2:20", "c:3:30", true)])
        );
    }

    #[test]
    fn no_stream_incremental_skips_intermediates() {
        assert_eq!(
            plan(&source(SRC), &target("a:1:5"), &NO_STREAM),
            replicate(vec![incr("a:1:10", "c:3:30", false)])
        );
    }

    #[test]
    fn older_extra_snapshots_on_the_target_are_fine() {
        assert_eq!(
            plan(&source(SRC), &target("old:9:1 a:1:5 older:8:4"), &DEFAULT),
            replicate(vec![incr("a:1:10", "c:3:30", true)])
        );
    }

    #[test]
    fn snapshots_pruned_from_the_source_do_not_matter() {
        // The target kept x (gone from the source); b is common.
        assert_eq!(
            plan(
                &source("b:2:20 c:3:30"),
                &target("x:7:2 a:1:5 b:2:6"),
                &DEFAULT
            ),
            replicate(vec![incr("b:2:20", "c:3:30", true)])
        );
    }

    #[test]
    fn renamed_snapshot_matches_by_guid() {
        // Rollback uses the target's name, the incremental the source's.
        assert_eq!(
            plan(&source(SRC), &target("renamed:2:6 t:50:7"), &FORCE),
            replicate(vec![
                Step::Rollback {
                    to: snap("renamed:2:6")
                },
                incr("b:2:20", "c:3:30", true)
            ])
        );
    }

    #[test]
    fn same_names_with_other_guids_are_a_guid_mismatch() {
        let want = Plan::Conflict(Conflict::GuidMismatch {
            name: "c".into(),
            source_guid: 3,
            target_guid: 33,
        });
        assert_eq!(
            plan(&source(SRC), &target("a:11:5 b:22:6 c:33:7"), &DEFAULT),
            want
        );
        assert_eq!(
            plan(&source(SRC), &target("a:11:5 b:22:6 c:33:7"), &FORCE),
            replicate(vec![
                Step::DestroyTarget,
                full("a:1:10"),
                incr("a:1:10", "c:3:30", true)
            ])
        );
    }

    #[test]
    fn no_common_snapshot_lists_both_sides() {
        let want = Plan::Conflict(Conflict::NoCommonSnapshot {
            source: snaps(SRC),
            target: snaps("x:7:5 y:8:6"),
        });
        assert_eq!(plan(&source(SRC), &target("x:7:5 y:8:6"), &DEFAULT), want);
        assert_eq!(
            plan(&source(SRC), &target("x:7:5 y:8:6"), &FORCE),
            replicate(vec![
                Step::DestroyTarget,
                full("a:1:10"),
                incr("a:1:10", "c:3:30", true)
            ])
        );
    }

    #[test]
    fn newer_target_snapshots_mean_divergence() {
        let want = Plan::Conflict(Conflict::Diverged {
            common: snap("b:2:20"),
            target_only: snaps("t1:50:7 t2:51:8"),
        });
        assert_eq!(
            plan(
                &source(SRC),
                &target("a:1:5 b:2:6 t1:50:7 t2:51:8"),
                &DEFAULT
            ),
            want
        );
        assert_eq!(
            plan(&source(SRC), &target("a:1:5 b:2:6 t1:50:7 t2:51:8"), &FORCE),
            replicate(vec![
                Step::Rollback { to: snap("b:2:6") },
                incr("b:2:20", "c:3:30", true)
            ])
        );
    }

    #[test]
    fn newer_target_snapshot_named_like_a_source_one_is_a_guid_mismatch() {
        // The target wrote its own @c after b: same name, other data.
        assert_eq!(
            plan(&source(SRC), &target("a:1:5 b:2:6 c:33:7"), &DEFAULT),
            Plan::Conflict(Conflict::GuidMismatch {
                name: "c".into(),
                source_guid: 3,
                target_guid: 33
            })
        );
        assert_eq!(
            plan(&source(SRC), &target("a:1:5 b:2:6 c:33:7"), &FORCE),
            replicate(vec![
                Step::Rollback { to: snap("b:2:6") },
                incr("b:2:20", "c:3:30", true)
            ])
        );
    }

    #[test]
    fn divergence_at_the_newest_source_snapshot_rolls_back_only() {
        let tgt = target("a:1:5 b:2:6 c:3:7 t:50:8");
        assert!(matches!(
            plan(&source(SRC), &tgt, &DEFAULT),
            Plan::Conflict(Conflict::Diverged { .. })
        ));
        assert_eq!(
            plan(&source(SRC), &tgt, &FORCE),
            replicate(vec![Step::Rollback { to: snap("c:3:7") }])
        );
    }

    #[test]
    fn target_order_is_by_its_own_createtxg() {
        // Real zfs-fuse listing of corehelp/c (see zfs.rs): s2 was received
        // after s3 and `extra`, so s3 is common and both newer ones block.
        let src = source(
            "s1:15434711050884566143:16 s2:4703203791645338451:21 s3:4008992829936022921:32",
        );
        let tgt = target(
            "s1:15434711050884566143:45 s3:4008992829936022921:55 extra:9535134434245482847:68 s2:4703203791645338451:84",
        );
        assert_eq!(
            plan(&src, &tgt, &DEFAULT),
            Plan::Conflict(Conflict::Diverged {
                common: snap("s3:4008992829936022921:32"),
                target_only: snaps("extra:9535134434245482847:68 s2:4703203791645338451:84"),
            })
        );
    }

    fn from_bm(bookmark: &str, to: &str) -> Step {
        Step::FromBookmark {
            bookmark: snap(bookmark),
            to: snap(to),
        }
    }

    #[test]
    fn bookmark_is_the_base_when_the_common_snapshot_is_gone() {
        // b was replicated, bookmarked, then destroyed on the source.
        let src = source_bm("c:3:30 d:4:40", "b:2:20");
        let tgt = target("a:1:5 b:2:6");
        assert_eq!(
            plan(&src, &tgt, &DEFAULT),
            replicate(vec![
                from_bm("b:2:20", "c:3:30"),
                incr("c:3:30", "d:4:40", true)
            ])
        );
        // -i from the bookmark straight to the newest with no_stream.
        assert_eq!(
            plan(&src, &tgt, &NO_STREAM),
            replicate(vec![from_bm("b:2:20", "d:4:40")])
        );
        // One newer snapshot: one stream. Force-delete destroys nothing.
        let one = source_bm("c:3:30", "b:2:20");
        assert_eq!(
            plan(&one, &tgt, &FORCE),
            replicate(vec![from_bm("b:2:20", "c:3:30")])
        );
    }

    #[test]
    fn a_newer_bookmark_beats_an_older_common_snapshot() {
        // a is still on both sides, b only as a bookmark on the source: the
        // target's b is not divergence, it is the base.
        let src = source_bm("a:1:10 c:3:30", "a:1:10 b:2:20");
        assert_eq!(
            plan(&src, &target("a:1:5 b:2:6"), &DEFAULT),
            replicate(vec![from_bm("b:2:20", "c:3:30")])
        );
    }

    #[test]
    fn a_snapshot_is_preferred_over_its_bookmark() {
        let src = source_bm(SRC, "b:2:20");
        assert_eq!(
            plan(&src, &target("a:1:5 b:2:6"), &DEFAULT),
            replicate(vec![incr("b:2:20", "c:3:30", true)])
        );
        // Also when the snapshot is newer than the bookmark.
        let src = source_bm(SRC, "a:1:10");
        assert_eq!(
            plan(&src, &target("a:1:5 b:2:6"), &DEFAULT),
            replicate(vec![incr("b:2:20", "c:3:30", true)])
        );
    }

    #[test]
    fn a_bookmark_named_alike_with_another_guid_is_ignored() {
        let src = source_bm("c:3:30", "b:99:20");
        assert_eq!(
            plan(&src, &target("b:2:6"), &DEFAULT),
            Plan::Conflict(Conflict::NoCommonSnapshot {
                source: snaps("c:3:30"),
                target: snaps("b:2:6"),
            })
        );
    }

    #[test]
    fn without_a_bookmark_the_lost_base_is_still_a_conflict() {
        assert_eq!(
            plan(&source("c:3:30"), &target("a:1:5 b:2:6"), &DEFAULT),
            Plan::Conflict(Conflict::NoCommonSnapshot {
                source: snaps("c:3:30"),
                target: snaps("a:1:5 b:2:6"),
            })
        );
    }

    #[test]
    fn a_bookmark_base_still_checks_divergence() {
        let src = source_bm("c:3:30", "b:2:20");
        let tgt = target("b:2:6 t:50:7");
        assert_eq!(
            plan(&src, &tgt, &DEFAULT),
            Plan::Conflict(Conflict::Diverged {
                common: snap("b:2:6"),
                target_only: snaps("t:50:7"),
            })
        );
        assert_eq!(
            plan(&src, &tgt, &FORCE),
            replicate(vec![
                Step::Rollback { to: snap("b:2:6") },
                from_bm("b:2:20", "c:3:30")
            ])
        );
    }

    #[test]
    fn a_bookmark_newer_than_every_source_snapshot_is_up_to_date() {
        // The newest snapshot was replicated, bookmarked and destroyed.
        let src = source_bm("a:1:10", "b:2:20");
        assert_eq!(
            plan(&src, &target("a:1:5 b:2:6"), &DEFAULT),
            Plan::UpToDate {
                snapshot: snap("b:2:6")
            }
        );
    }

    fn with_token(mut t: TargetState) -> TargetState {
        t.resume_token = Some(FULL.into());
        t
    }

    // Snapshots named like the real tokens' (see token.rs): ozs/tokfix @s1
    // and @s2 with these GUIDs.
    const S1: &str = "s1:10045012655411321857:10";
    const S2: &str = "s2:11627777177197314544:20";

    #[test]
    fn a_sound_resume_token_is_resumed_alone() {
        let want = replicate(vec![Step::Resume {
            token: FULL.into(),
            received: 0xe1288,
        }]);
        // A partial first receive: the target has no snapshots yet.
        let got = plan(&source(S1), &with_token(target("")), &DEFAULT);
        assert_eq!(got, want);
        assert!(got.replan_after());
        let mut tgt = target("s1:10045012655411321857:5");
        tgt.resume_token = Some(INCREMENTAL.into());
        assert_eq!(
            plan(&source(&format!("{S1} {S2}")), &tgt, &DEFAULT),
            replicate(vec![Step::Resume {
                token: INCREMENTAL.into(),
                received: 0xa1000,
            }])
        );
    }

    #[test]
    fn an_unsound_resume_token_is_discarded_and_never_resumed() {
        let discard = |p: Plan| match p {
            Plan::Replicate(steps) => match &steps[..] {
                [Step::DiscardPartial { why }] => why.clone(),
                other => panic!("not a lone discard: {other:?}"),
            },
            other => panic!("not a discard: {other:?}"),
        };
        // Another dataset's token.
        let mut other = source(S1);
        other.dataset = "ozs/planned".into();
        let got = plan(&other, &with_token(target("")), &DEFAULT);
        assert!(got.replan_after());
        assert!(matches!(discard(got), Refusal::OtherDataset { .. }));
        // Its snapshot destroyed (stale), or destroyed and re-created.
        let got = plan(&source(S2), &with_token(target("")), &DEFAULT);
        assert!(matches!(discard(got), Refusal::Gone { .. }));
        let got = plan(&source("s1:77:30"), &with_token(target("")), &DEFAULT);
        assert!(matches!(discard(got), Refusal::Replaced { .. }));
        // No source snapshots at all: the token is stale, not a conflict.
        let got = plan(&source(""), &with_token(target("")), &DEFAULT);
        assert!(matches!(discard(got), Refusal::Gone { .. }));
        // Corrupt.
        let mut tgt = target("a:1:5");
        tgt.resume_token = Some("1-abc-def".into());
        let got = plan(&source(SRC), &tgt, &DEFAULT);
        assert!(matches!(discard(got), Refusal::Corrupt(_)));
        // An incremental whose base the target lacks.
        let mut tgt = target("x:5:5");
        tgt.resume_token = Some(INCREMENTAL.into());
        let got = plan(&source(&format!("{S1} {S2}")), &tgt, &DEFAULT);
        assert!(matches!(discard(got), Refusal::BaseNotOnTarget { .. }));
    }

    #[test]
    fn resume_token_is_aborted_first_when_resume_is_not_allowed() {
        let no_resume = PlanOptions {
            resume: false,
            ..DEFAULT
        };
        let got = plan(&source(SRC), &with_token(target("a:1:5")), &no_resume);
        assert_eq!(
            got,
            replicate(vec![Step::AbortPartial, incr("a:1:10", "c:3:30", true)])
        );
        assert!(!got.replan_after());
        // Up to date apart from the partial: just clear it.
        let got = plan(&source(SRC), &with_token(target("a:1:5 c:3:6")), &no_resume);
        assert_eq!(got, replicate(vec![Step::AbortPartial]));
        assert!(got.replan_after());
        // Force-delete rollback after the abort.
        let opts = PlanOptions {
            resume: false,
            ..FORCE
        };
        assert_eq!(
            plan(&source(SRC), &with_token(target("a:1:5 t:50:6")), &opts),
            replicate(vec![
                Step::AbortPartial,
                Step::Rollback { to: snap("a:1:5") },
                incr("a:1:10", "c:3:30", true)
            ])
        );
    }

    #[test]
    fn aborting_a_partial_first_receive_means_looking_again() {
        // A target holding only an interrupted full receive: after `-A` it
        // may be gone or empty; the caller re-plans instead of guessing.
        let no_resume = PlanOptions {
            resume: false,
            ..DEFAULT
        };
        let got = plan(&source(SRC), &with_token(target("")), &no_resume);
        assert_eq!(got, replicate(vec![Step::AbortPartial]));
        assert!(got.replan_after());
    }

    #[test]
    fn conflicts_do_not_carry_an_abort() {
        let no_resume = PlanOptions {
            resume: false,
            ..DEFAULT
        };
        assert!(matches!(
            plan(&source(SRC), &with_token(target("x:7:5")), &no_resume),
            Plan::Conflict(Conflict::NoCommonSnapshot { .. })
        ));
    }

    #[test]
    fn plain_plans_need_no_replan() {
        assert!(!plan(&source(SRC), &no_target(), &DEFAULT).replan_after());
        assert!(!plan(&source(SRC), &target("c:3:1"), &DEFAULT).replan_after());
    }

    #[test]
    fn conflict_messages_are_the_diagnosis() {
        let msg = Conflict::NoCommonSnapshot {
            source: snaps(SRC),
            target: snaps("x:7:5 y:8:6"),
        }
        .to_string();
        for want in [
            "no snapshot in common",
            "source (3): @a (guid 1), @b (guid 2), @c (guid 3)",
            "target (2): @x (guid 7), @y (guid 8)",
            "Nothing was changed.",
            "--force-delete",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }

        let msg = Conflict::GuidMismatch {
            name: "c".into(),
            source_guid: 3,
            target_guid: 33,
        }
        .to_string();
        for want in [
            "@c",
            "guid 3 on the source",
            "guid 33 on the target",
            "Nothing was changed.",
            "--force-delete",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }

        let msg = Conflict::Diverged {
            common: snap("b:2:20"),
            target_only: snaps("t1:50:7"),
        }
        .to_string();
        for want in [
            "diverged",
            "shared: @b (guid 2)",
            "target only: @t1 (guid 50)",
            "Nothing was changed.",
            "--force-delete",
            "roll the target back to @b",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }

        for c in [Conflict::NoSourceSnapshots, Conflict::TargetHasNoSnapshots] {
            assert!(c.to_string().contains("Nothing was changed."));
        }
        assert!(Conflict::TargetHasNoSnapshots
            .to_string()
            .contains("--force-delete"));
    }

    #[test]
    fn long_snapshot_lists_are_abbreviated() {
        let spec: Vec<String> = (1..=20).map(|i| format!("s{i}:{i}:{i}")).collect();
        let list = snaps(&spec.join(" "));
        let shown = SnapshotList(&list).to_string();
        assert_eq!(
            shown,
            "@s1 (guid 1), @s2 (guid 2), @s3 (guid 3), ... 14 more ..., \
             @s18 (guid 18), @s19 (guid 19), @s20 (guid 20)"
        );
        let seven = snaps(&spec[..7].join(" "));
        assert!(!SnapshotList(&seven).to_string().contains("more"));
        assert_eq!(SnapshotList(&[]).to_string(), "(none)");
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    fn snaps(n: u64, guid_base: u64) -> Vec<Snapshot> {
        (0..n)
            .map(|i| Snapshot {
                name: format!("s{i:05}"),
                guid: guid_base + i,
                createtxg: 10 + i,
            })
            .collect()
    }

    #[test]
    fn five_thousand_snapshots_on_both_sides_plan_within_two_seconds() {
        let source = SourceState {
            dataset: "p/d".into(),
            snapshots: snaps(5000, 1_000_000),
            bookmarks: Vec::new(),
        };
        let opts = PlanOptions {
            no_stream: false,
            force_delete: false,
            resume: false,
        };
        let start = std::time::Instant::now();
        // Up to date, and one -I step from the 1st when the target has one.
        let same = TargetState {
            exists: true,
            snapshots: snaps(5000, 1_000_000),
            resume_token: None,
        };
        assert!(matches!(plan(&source, &same, &opts), Plan::UpToDate { .. }));
        let first = TargetState {
            exists: true,
            snapshots: snaps(1, 1_000_000),
            resume_token: None,
        };
        match plan(&source, &first, &opts) {
            Plan::Replicate(steps) => assert_eq!(steps.len(), 1, "{steps:?}"),
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
