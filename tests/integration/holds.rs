//! `--use-hold` and `--create-bookmark` on zfs-fuse (holds yes, bookmarks
//! no). zfs-fuse's `zfs holds` needs a Python helper Debian does not ship,
//! so holds are read from the `userrefs` property and a tag is proven
//! present by releasing it (and putting it back).

use crate::bed::*;

/// This machine's hostname as resync puts it into tags and sync snapshot names.
fn local_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    raw.trim().replace('_', "-")
}

/// How many holds a snapshot has.
fn userrefs(snap: &str) -> u64 {
    zfs(&["get", "-H", "-o", "value", "userrefs", snap])
        .trim()
        .parse()
        .expect("userrefs is a number")
}

/// Whether `snap` is held with `tag`: releasing it succeeds (then the hold
/// is put back, so the snapshot ends as it was).
fn held_by(snap: &str, tag: &str) -> bool {
    if !zfs_ok(&["release", tag, snap]) {
        return false;
    }
    zfs(&["hold", tag, snap]);
    true
}

/// `zfs destroy SNAP` fails while the snapshot is held (zfs-fuse says
/// "dataset is busy"); the snapshot is still there afterwards.
#[track_caller]
fn assert_destroy_refused(snap: &str) {
    assert!(
        !zfs_ok(&["destroy", snap]),
        "{snap} was destroyed although held"
    );
    assert!(exists(snap), "{snap} is gone");
}

/// Datasets to release (from the given tags) and destroy when the test
/// ends, passed or failed, so held snapshots do not pile up in the bed.
struct Cleanup(Vec<(String, Vec<String>)>);

impl Cleanup {
    fn add(&mut self, ds: &str, tags: &[&str]) {
        let tags = tags.iter().map(|t| t.to_string()).collect();
        self.0.push((ds.to_string(), tags));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (ds, tags) in &self.0 {
            if !exists(ds) {
                continue;
            }
            // Not the panicking harness helpers: this may run while unwinding.
            let listing = std::process::Command::new("zfs")
                .args(["get", "-H", "-d", "1", "-o", "name", "userrefs", ds])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for snap in listing.lines().filter(|l| l.contains('@')) {
                for tag in tags {
                    let _ = zfs_ok(&["release", tag, snap]);
                }
            }
            if !std::thread::panicking() {
                destroy(ds);
            } else {
                let _ = zfs_ok(&["destroy", "-r", ds]);
            }
        }
    }
}

#[test]
fn use_hold_pins_the_base_on_both_sides_and_moves_forward() {
    let bed = Bed::get();
    let host = local_hostname();
    let (src, dst, dst2) = (bed.ds_a("hold"), bed.ds_b("hold"), bed.ds_b("hold2"));
    let target = remote(&bed.host_b, &dst);
    let src_tag = format!("resync_to_{}:{dst}", bed.host_b);
    let dst_tag = format!("resync_from_{host}:{src}");
    let other_tag = format!("resync_other_to_{host}:{dst2}");
    let mut cleanup = Cleanup(vec![]);
    cleanup.add(&src, &[&src_tag, &other_tag]);
    cleanup.add(&dst, &[&dst_tag]);
    cleanup.add(&dst2, &[&format!("resync_other_from_{host}:{src}")]);
    create_dataset_with_data(&src, &[("a.bin", 1 << 20)]);
    snapshot(&src, "s1");

    resync(&["--use-hold", "--no-sync-snap", &src, &target]).assert_success();
    let (src1, dst1) = (format!("{src}@s1"), format!("{dst}@s1"));
    assert!(held_by(&src1, &src_tag), "source base held by {src_tag}");
    assert!(held_by(&dst1, &dst_tag), "target base held by {dst_tag}");
    assert_eq!((userrefs(&src1), userrefs(&dst1)), (1, 1));
    assert_destroy_refused(&src1);
    assert_destroy_refused(&dst1);

    // A second job from the same source, another identifier and target.
    resync(&[
        "--use-hold",
        "--no-sync-snap",
        "--identifier=other",
        &src,
        &dst2,
    ])
    .assert_success();
    assert!(held_by(&src1, &other_tag), "second job's hold {other_tag}");
    assert_eq!(userrefs(&src1), 2);

    write_files(&src, &[("b.bin", 512 << 10)]);
    snapshot(&src, "s2");
    let out = resync(&["--use-hold", "--no-sync-snap", &src, &target]);
    out.assert_success();
    assert_replica(&src, &dst);
    let (src2, dst2s) = (format!("{src}@s2"), format!("{dst}@s2"));
    assert!(
        held_by(&src2, &src_tag),
        "hold moved to the new source base"
    );
    assert!(
        held_by(&dst2s, &dst_tag),
        "hold moved to the new target base"
    );
    assert_eq!((userrefs(&src2), userrefs(&dst2s)), (1, 1));
    assert_eq!(userrefs(&dst1), 0, "old target hold released\n{out}");
    assert!(!held_by(&src1, &src_tag), "old source hold released");
    // The other job's hold on s1 is untouched: its next incremental is safe.
    assert!(held_by(&src1, &other_tag), "the other job keeps its hold");
    assert_eq!(userrefs(&src1), 1);
    assert_destroy_refused(&src1);
    // Unheld now, the old target snapshot can go.
    assert!(
        zfs_ok(&["destroy", &dst1]) || {
            // zfs-fuse may call a just-received dataset busy for a moment.
            std::thread::sleep(std::time::Duration::from_secs(2));
            zfs_ok(&["destroy", &dst1])
        }
    );
}

#[test]
fn held_sync_snapshots_are_still_pruned_by_their_own_job() {
    let bed = Bed::get();
    let host = local_hostname();
    let (src, dst) = (bed.ds_a("holdprune"), bed.ds_b("holdprune"));
    let src_tag = format!("resync_to_{host}:{dst}");
    let dst_tag = format!("resync_from_{host}:{src}");
    let mut cleanup = Cleanup(vec![]);
    cleanup.add(&src, &[&src_tag]);
    cleanup.add(&dst, &[&dst_tag]);
    create_dataset_with_data(&src, &[("a.bin", 256 << 10)]);
    let sync_snaps = |ds: &str| -> Vec<String> {
        snapshots(ds)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with("resync_"))
            .collect()
    };

    resync(&["--use-hold", &src, &dst]).assert_success();
    let first = sync_snaps(&src);
    assert_eq!(first.len(), 1);
    assert!(held_by(&format!("{src}@{}", first[0]), &src_tag));
    assert!(held_by(&format!("{dst}@{}", first[0]), &dst_tag));

    // The next run holds its new sync snapshot and prunes the old one,
    // which it held itself.
    write_files(&src, &[("b.bin", 64 << 10)]);
    resync(&["--use-hold", &src, &dst]).assert_success();
    let second = sync_snaps(&src);
    assert_eq!(second.len(), 1, "the old sync snapshot was pruned");
    assert_ne!(second, first);
    assert_eq!(sync_snaps(&dst), second);
    assert!(held_by(&format!("{src}@{}", second[0]), &src_tag));
    assert!(held_by(&format!("{dst}@{}", second[0]), &dst_tag));

    // Without --use-hold the job still prunes what it held before.
    write_files(&src, &[("c.bin", 64 << 10)]);
    let out = resync(&[&src, &dst]);
    out.assert_success();
    let third = sync_snaps(&src);
    assert_eq!(third.len(), 1, "{out}");
    assert_ne!(third, second);
    assert_eq!(sync_snaps(&dst), third, "{out}");
    assert!(
        !out.stderr.contains("pruning"),
        "no pruning warning:\n{out}"
    );
    assert_replica(&src, &dst);
}

#[test]
fn create_bookmark_without_bookmarks_says_so_once_and_replicates() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("nobm"), bed.ds_b("nobm"));
    create_dataset_with_data(&src, &[("a.bin", 128 << 10)]);
    create_dataset_with_data(&format!("{src}/child"), &[("c.bin", 64 << 10)]);
    let out = resync(&["-r", "--create-bookmark", &src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    let notices = out
        .stderr
        .lines()
        .filter(|l| l.contains("no bookmarks"))
        .count();
    assert_eq!(notices, 1, "one line per run:\n{out}");
    assert_replica(&src, &dst);
    assert_replica(&format!("{src}/child"), &format!("{dst}/child"));
    destroy(&src);
    destroy(&dst);
}
