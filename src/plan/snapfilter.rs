//! Which snapshots a run touches beyond the plan. `--include-snaps` and
//! `--exclude-snaps`: which source snapshots a run may send, by name, as
//! syncoid decides (`snapisincluded`): a name that matches any exclude
//! pattern is out; otherwise, when include patterns are given, only a name
//! that matches one of them is in. The planner sees the filtered source
//! list, and with [`SnapFilter::is_active`] the caller sends filtered
//! snapshots one `-i` at a time (`plan::one_at_a_time`) instead of one `-I`
//! that would carry the left-out ones along. `--delete-target-snapshots`:
//! [`stale_on_target`]. Pure.

use regex::Regex;

use crate::zfs::Snapshot;

/// `--delete-target-snapshots`, after a successful run: the target's
/// snapshots whose name is not on the source (as syncoid compares: by
/// name), oldest first, split into those to destroy and those kept because
/// another job holds them (`holds`: name and hold count on the target).
/// Never `base` (the next incremental's base, by GUID), and, as in syncoid,
/// never a name the filter leaves out: the run does not see those.
pub fn stale_on_target(
    source: &[Snapshot],
    target: &[Snapshot],
    base: &Snapshot,
    holds: &[(String, u64)],
    filter: &SnapFilter,
) -> (Vec<Snapshot>, Vec<Snapshot>) {
    let mut stale: Vec<Snapshot> = target
        .iter()
        .filter(|t| t.guid != base.guid && filter.includes(&t.name))
        .filter(|t| !source.iter().any(|s| s.name == t.name))
        .cloned()
        .collect();
    stale.sort_by_key(|s| s.createtxg);
    stale.into_iter().partition(|t| {
        !holds
            .iter()
            .any(|(name, count)| name == &t.name && *count > 0)
    })
}

/// Compiled `--include-snaps`/`--exclude-snaps` patterns.
#[derive(Debug, Clone, Default)]
pub struct SnapFilter {
    include: Vec<Regex>,
    exclude: Vec<Regex>,
}

impl SnapFilter {
    pub fn new(include: Vec<Regex>, exclude: Vec<Regex>) -> SnapFilter {
        SnapFilter { include, exclude }
    }

    /// Some pattern was given.
    pub fn is_active(&self) -> bool {
        !self.include.is_empty() || !self.exclude.is_empty()
    }

    /// Whether the snapshot `name` (without `ds@`) may be sent.
    pub fn includes(&self, name: &str) -> bool {
        if self.exclude.iter().any(|re| re.is_match(name)) {
            return false;
        }
        self.include.is_empty() || self.include.iter().any(|re| re.is_match(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(include: &[&str], exclude: &[&str]) -> SnapFilter {
        let re = |v: &[&str]| v.iter().map(|r| Regex::new(r).unwrap()).collect();
        SnapFilter::new(re(include), re(exclude))
    }

    #[test]
    fn no_patterns_include_everything() {
        let f = filter(&[], &[]);
        assert!(!f.is_active());
        assert!(f.includes("autosnap_2024-01-01_00:00:00_hourly"));
    }

    #[test]
    fn include_patterns_keep_only_matches_and_exclude_wins() {
        // syncoid --help: "If a snapshot matches both the exclude-snaps and
        // include-snaps patterns, then it will be excluded."
        let f = filter(&["daily", "weekly"], &["_2023-"]);
        assert!(f.is_active());
        assert!(f.includes("autosnap_2024-01-01_00:00:00_daily"));
        assert!(f.includes("autosnap_2024-01-07_00:00:00_weekly"));
        assert!(!f.includes("autosnap_2024-01-01_01:00:00_hourly"));
        assert!(!f.includes("autosnap_2023-12-31_00:00:00_daily"));
    }

    fn snaps(spec: &str) -> Vec<Snapshot> {
        spec.split_whitespace()
            .enumerate()
            .map(|(i, n)| Snapshot {
                name: n.into(),
                guid: 100 + i as u64,
                createtxg: 10 * (i as u64 + 1),
            })
            .collect()
    }

    #[test]
    fn stale_target_snapshots_spare_the_base_held_and_filtered_ones() {
        let target = snaps("old1 held old2 keep_me daily1 base");
        let source = snaps("daily1 base");
        // The base by GUID, whatever its name.
        let base = target[5].clone();
        let holds = vec![("held".to_string(), 1), ("old2".to_string(), 0)];
        let filter = filter(&[], &["^keep_"]);
        let (gone, kept) = stale_on_target(&source, &target, &base, &holds, &filter);
        let names = |v: &[Snapshot]| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&gone), ["old1", "old2"]);
        assert_eq!(names(&kept), ["held"]);
        // Nothing stale: nothing to do.
        let (gone, kept) = stale_on_target(&target, &target, &base, &[], &SnapFilter::default());
        assert!(gone.is_empty() && kept.is_empty());
    }

    #[test]
    fn patterns_match_anywhere_in_the_name_as_perl_does() {
        let f = filter(&[], &["^syncoid_"]);
        assert!(!f.includes("syncoid_host_2024-01-01:00:00:00-GMT00:00"));
        assert!(f.includes("manual_syncoid_"));
    }
}
