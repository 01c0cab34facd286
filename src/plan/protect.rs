//! Protecting the next incremental's base (`--use-hold`, `--create-bookmark`):
//! the names we give holds and bookmarks, and which of them are ours to
//! release or destroy. Pure; `replicate` runs the commands.
//!
//! Holds. One tag per job and side. On the source it names the target
//! (`resync_to_HOST:pool/ds`), on the target the source
//! (`resync_from_HOST:pool/ds`), with `--identifier` after `resync_` when
//! given; HOST is the host as typed on the command line, or this machine's
//! name for a local side, so a push and the equivalent pull make the same
//! tags. Syncoid's `--use-hold` names its hold `syncoid_[ID_]LOCALHOST`
//! only: two jobs on one machine that replicate one dataset to two targets
//! share the tag and release each other's holds unless the user gives each
//! its own identifier. Naming the peer makes that impossible. During a
//! step the base and target snapshots are held on the source; after
//! success the last replicated snapshot is held on both sides and the tag
//! is released from every other snapshot of the dataset, so a stale hold
//! of the same job (an interrupted run, a re-created target) never lingers.
//!
//! Bookmarks. After success the last replicated snapshot is bookmarked on
//! the source under its own name (syncoid's `--create-bookmark` does the
//! same); when that name is taken by a bookmark of another snapshot, the
//! GUID is appended. Older bookmarks named like this job's sync snapshots
//! are destroyed, so one bookmark per job remains; other bookmarks are
//! never touched.

use crate::plan::syncsnap;
use crate::zfs::{Dataset, Snapshot};

/// Longest tag we create. ZFS refuses tags of 256 bytes and more
/// (`ZFS_MAX_DATASET_NAME_LEN`); longer peers are replaced by a hash.
const MAX_TAG_LEN: usize = 200;

/// Which side a hold is placed on; its tag names the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldSide {
    /// On the source; the tag names the target.
    Source,
    /// On the target; the tag names the source.
    Target,
}

/// The hold tag of one job on one side: `resync_[ID_]to_PEERHOST:PEERDS`
/// on the source, `resync_[ID_]from_...` on the target.
pub fn hold_tag(
    identifier: Option<&str>,
    side: HoldSide,
    peer_host: &str,
    peer_ds: &Dataset,
) -> String {
    let id = identifier.map(|i| format!("{i}_")).unwrap_or_default();
    let dir = match side {
        HoldSide::Source => "to",
        HoldSide::Target => "from",
    };
    let peer = format!("{peer_host}:{peer_ds}");
    let tag = format!("resync_{id}{dir}_{peer}");
    if tag.len() <= MAX_TAG_LEN {
        return tag;
    }
    format!("resync_{id}{dir}_{:016x}", fnv1a(peer.as_bytes()))
}

/// 64-bit FNV-1a: a stable short name for a long peer (not security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The snapshots whose hold with our tag must go: every held one except
/// `keep` (`userrefs` from `zfs::parse_userrefs`). Whether a snapshot
/// holds our tag is not listed (zfs-fuse's `zfs holds` does not work), so
/// the caller releases and ignores "no such tag".
pub fn stale_holds<'a>(userrefs: &'a [(String, u64)], keep: Option<&str>) -> Vec<&'a str> {
    userrefs
        .iter()
        .filter(|(name, n)| *n > 0 && Some(name.as_str()) != keep)
        .map(|(name, _)| name.as_str())
        .collect()
}

/// What `--create-bookmark` does on the source after success.
#[derive(Debug, PartialEq, Eq)]
pub struct BookmarkPlan {
    /// The bookmark to create for the replicated snapshot, `None` when one
    /// with its GUID is already there.
    pub create: Option<String>,
    /// This job's older bookmarks, to destroy once `create` exists.
    pub destroy: Vec<String>,
}

/// Bookmarks `snap` (the newest replicated source snapshot), given the
/// source's `bookmarks`; `identifier` and `hostname` say which bookmarks
/// carry this job's sync snapshot names. When a bookmark of another
/// snapshot has the name already, the fallback is syncoid's: the name plus
/// the first 6 digits of the GUID. When that is taken too, the next
/// incremental base cannot be protected: an error naming both.
pub fn bookmark_plan(
    snap: &Snapshot,
    bookmarks: &[Snapshot],
    identifier: Option<&str>,
    hostname: &str,
) -> Result<BookmarkPlan, String> {
    let existing = bookmarks.iter().find(|b| b.guid == snap.guid);
    let taken = |name: &str| bookmarks.iter().any(|b| b.name == name);
    let create = match existing {
        Some(_) => None,
        None if taken(&snap.name) => {
            let guid = snap.guid.to_string();
            let fallback = format!("{}{}", snap.name, &guid[..guid.len().min(6)]);
            if taken(&fallback) {
                return Err(format!(
                    "cannot bookmark @{}: #{} and #{fallback} are bookmarks of other snapshots; \
                     the next incremental base is not protected",
                    snap.name, snap.name
                ));
            }
            Some(fallback)
        }
        None => Some(snap.name.clone()),
    };
    let keep = existing.map_or(create.as_deref(), |b| Some(b.name.as_str()));
    let destroy = bookmarks
        .iter()
        .filter(|b| Some(b.name.as_str()) != keep && b.guid != snap.guid)
        .filter(|b| syncsnap::is_ours(&b.name, identifier, hostname))
        .map(|b| b.name.clone())
        .collect();
    Ok(BookmarkPlan { create, destroy })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(s: &str) -> Dataset {
        Dataset::parse(s).unwrap()
    }

    #[test]
    fn hold_tags_name_the_job_and_the_other_side() {
        let b = ds("pool/vm");
        assert_eq!(
            hold_tag(None, HoldSide::Source, "backup", &b),
            "resync_to_backup:pool/vm"
        );
        assert_eq!(
            hold_tag(Some("hourly"), HoldSide::Target, "nas", &ds("tank/vm")),
            "resync_hourly_from_nas:tank/vm"
        );
        // Two targets of one source: two tags, even without identifiers.
        assert_ne!(
            hold_tag(None, HoldSide::Source, "backup", &b),
            hold_tag(None, HoldSide::Source, "backup2", &b)
        );
        assert_ne!(
            hold_tag(None, HoldSide::Source, "backup", &b),
            hold_tag(Some("x"), HoldSide::Source, "backup", &b)
        );
    }

    #[test]
    fn long_peers_are_hashed_into_a_bounded_tag() {
        let long = ds(&format!("pool/{}", "d".repeat(240)));
        let tag = hold_tag(Some("id"), HoldSide::Source, "backup.example.org", &long);
        assert!(tag.starts_with("resync_id_to_"), "{tag}");
        assert_eq!(tag.len(), "resync_id_to_".len() + 16);
        let other = ds(&format!("pool/{}", "e".repeat(240)));
        assert_ne!(
            tag,
            hold_tag(Some("id"), HoldSide::Source, "backup.example.org", &other)
        );
        assert_eq!(
            tag,
            hold_tag(Some("id"), HoldSide::Source, "backup.example.org", &long)
        );
    }

    #[test]
    fn every_held_snapshot_but_the_kept_one_is_released() {
        let refs = vec![
            ("a".to_string(), 1),
            ("b".to_string(), 0),
            ("c".to_string(), 2),
            ("d".to_string(), 1),
        ];
        assert_eq!(stale_holds(&refs, Some("d")), ["a", "c"]);
        assert_eq!(stale_holds(&refs, None), ["a", "c", "d"]);
        assert!(stale_holds(&[], Some("d")).is_empty());
    }

    fn snap(name: &str, guid: u64) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid,
            createtxg: guid,
        }
    }

    const OLD: &str = "resync_h_2026-11-21T10:00:00Z";
    const NEW: &str = "resync_h_2026-11-21T11:00:00Z";

    #[test]
    fn the_replicated_snapshot_is_bookmarked_and_older_sync_bookmarks_go() {
        let other_job = "resync_x_h_2026-11-21T09:00:00Z";
        let marks = vec![snap(OLD, 1), snap("manual", 2), snap(other_job, 3)];
        assert_eq!(
            bookmark_plan(&snap(NEW, 9), &marks, None, "h").unwrap(),
            BookmarkPlan {
                create: Some(NEW.into()),
                destroy: vec![OLD.into()],
            }
        );
    }

    #[test]
    fn an_existing_bookmark_of_the_snapshot_is_kept() {
        let marks = vec![snap(OLD, 1), snap(NEW, 9)];
        assert_eq!(
            bookmark_plan(&snap(NEW, 9), &marks, None, "h").unwrap(),
            BookmarkPlan {
                create: None,
                destroy: vec![OLD.into()],
            }
        );
        // Under another name (created by hand): still no second one.
        let marks = vec![snap("by-hand", 9)];
        assert_eq!(
            bookmark_plan(&snap("s2", 9), &marks, None, "h").unwrap(),
            BookmarkPlan {
                create: None,
                destroy: vec![],
            }
        );
    }

    #[test]
    fn a_name_taken_by_another_snapshots_bookmark_gets_six_guid_digits_as_in_syncoid() {
        let marks = vec![snap("s1", 1)];
        let plan = bookmark_plan(&snap("s1", 12345678901), &marks, None, "h").unwrap();
        assert_eq!(plan.create, Some("s1123456".into()));
        // Both names taken: an error, not a silent success.
        let marks = vec![snap("s1", 1), snap("s1123456", 2)];
        let e = bookmark_plan(&snap("s1", 12345678901), &marks, None, "h").unwrap_err();
        assert!(e.contains("#s1 and #s1123456"), "{e}");
        assert!(e.contains("not protected"), "{e}");
    }
}
