//! Recursive runs over many datasets: each side listed once per run, the
//! remote commands growing only with the datasets that have something to
//! send, `--jobs` replicating several at once with a child after its
//! parent, and one dataset's failure skipping its children while the
//! others finish. Outcomes are checked on the target (snapshots, GUIDs,
//! files); the command counts come from `--debug`'s last line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::bed::*;

/// The sum of `commands run: HOST N, HOST M` (resync's `--debug`).
#[track_caller]
fn commands_run(out: &Output) -> u64 {
    commands_by_host(out).iter().map(|(_, n)| n).sum()
}

/// The commands the host whose label ends in `host` ran (0 if none).
fn commands_on(out: &Output, host: &str) -> u64 {
    commands_by_host(out)
        .iter()
        .filter(|(label, _)| label.ends_with(host))
        .map(|(_, n)| n)
        .sum()
}

/// `--debug`'s "commands run: HOST N, ..." as (HOST, N).
fn commands_by_host(out: &Output) -> Vec<(String, u64)> {
    let line = out
        .stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once("commands run: ").map(|(_, c)| c.to_string()))
        .unwrap_or_else(|| panic!("no command count in:\n{out}"));
    line.split(", ")
        .map(|host| {
            host.rsplit_once(' ')
                .and_then(|(h, n)| Some((h.to_string(), n.parse::<u64>().ok()?)))
                .unwrap_or_else(|| panic!("unreadable command count {line:?}"))
        })
        .collect()
}

/// `root` with `children` below it, every fourth with a child of its own
/// (so children wait for parents); each with a small file. Returns the
/// datasets, parents first.
fn tree(root: &str, children: usize) -> Vec<String> {
    let mut all = vec![root.to_string()];
    create_dataset_with_data(root, &[("f", 4_000)]);
    for i in 0..children {
        let child = format!("{root}/d{i:02}");
        create_dataset_with_data(&child, &[("f", 4_000)]);
        all.push(child.clone());
        if i % 4 == 0 {
            let grandchild = format!("{child}/g");
            create_dataset_with_data(&grandchild, &[("f", 4_000)]);
            all.push(grandchild);
        }
    }
    all
}

/// `assert_replica`, given zfs-fuse a moment to remount the target: it
/// unmounts and remounts a dataset shortly after a `receive -F` returned,
/// so a check right after the run can find it unmounted, or its mountpoint
/// empty. Retried for up to 15 s, then asserted once more for the message.
#[track_caller]
fn assert_replica_of(src: &str, dst: &str) {
    wait_until(Duration::from_secs(15), || {
        std::panic::catch_unwind(|| assert_replica(src, dst)).is_ok()
    });
    assert_replica(src, dst);
}

/// Every snapshot of `src` is on `dst` with the same GUID, and no other.
#[track_caller]
fn assert_same_snapshots(src: &str, dst: &str) {
    assert_eq!(snapshots(src), snapshots(dst), "{src} -> {dst}");
}

/// The files too, where zfs-fuse has the target mounted (see above).
#[track_caller]
fn assert_files_where_mounted(src: &str, dst: &str) {
    if zfs(&["get", "-H", "-o", "value", "mounted", dst]).trim() == "yes" {
        assert_replica_of(src, dst);
    }
}

fn target_of(ds: &str, src_root: &str, dst_root: &str) -> String {
    format!("{dst_root}{}", &ds[src_root.len()..])
}

#[test]
fn a_recursive_push_of_many_datasets_verifies_each_and_costs_commands_only_for_changes() {
    let bed = Bed::get();
    let root = format!("{}/{}", bed.pool_a, unique_name("scale"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("scale"));
    let all = tree(&root, 20);
    assert!(all.len() >= 25, "{} datasets", all.len());
    let target = remote(&bed.host_b, &dst);

    // First run: every dataset sent in full (default --jobs), then verified.
    let first = resync(&["-r", "--debug", &root, &target]);
    first.assert_success();
    for ds in &all {
        assert_replica_of(ds, &target_of(ds, &root, &dst));
    }

    // Nothing to send: a constant number of commands, whatever the tree's size.
    let idle = resync(&["-r", "--debug", "--no-sync-snap", &root, &target]);
    idle.assert_success();
    let idle_commands = commands_run(&idle);
    assert!(
        idle_commands <= 20,
        "{idle_commands} commands for {} datasets with nothing to send:\n{idle}",
        all.len()
    );

    // Five datasets with a new snapshot: on the target host, one command
    // (the receive) for each, on top of the idle run and a constant: the
    // one listing of the target tree that verifies every receive, and the
    // check (if need be the upload) of the binary that decodes
    // compression there. Locally, a send for each.
    let changed: Vec<&String> = all.iter().step_by(5).take(5).collect();
    for ds in &changed {
        write_files(ds, &[("new", 3_000)]);
        snapshot(ds, "more");
    }
    let some = resync(&["-r", "--debug", "--no-sync-snap", &root, &target]);
    some.assert_success();
    let remote_extra =
        commands_on(&some, &bed.host_b).saturating_sub(commands_on(&idle, &bed.host_b));
    assert!(
        remote_extra <= changed.len() as u64 + 3,
        "{remote_extra} more commands on {} for {} datasets with something to send:\n{some}",
        bed.host_b,
        changed.len()
    );
    let extra = commands_run(&some).saturating_sub(idle_commands);
    assert!(
        extra <= 2 * changed.len() as u64 + 4,
        "{extra} more commands for {} datasets with something to send:\n{some}",
        changed.len()
    );
    // By GUID everywhere; files where the target is mounted: after an
    // incremental `receive -F` into a parent, zfs-fuse can leave the
    // target's children unmounted (the code before this change does the
    // same in this scenario on this bed).
    for ds in &all {
        assert_same_snapshots(ds, &target_of(ds, &root, &dst));
    }
    for ds in &changed {
        assert_files_where_mounted(ds, &target_of(ds, &root, &dst));
    }

    // With sync snapshots (one `zfs snapshot -r`), one at a time: the same
    // replicas, and each pair's older sync snapshot pruned on both sides.
    // The older sync snapshots of the whole tree go in one `zfs destroy
    // -r` per side.
    std::thread::sleep(Duration::from_millis(1100));
    let synced = resync(&["-r", "--jobs=1", "--debug", &root, &target]);
    synced.assert_success();
    for side in [
        format!("[local] zfs destroy -r {root}@"),
        format!("] zfs destroy -r {dst}@"),
    ] {
        assert!(synced.stderr.contains(&side), "{side}:\n{synced}");
    }
    for ds in &all {
        let dst_ds = target_of(ds, &root, &dst);
        assert_same_snapshots(ds, &dst_ds);
        assert_files_where_mounted(ds, &dst_ds);
        for side in [ds.as_str(), dst_ds.as_str()] {
            let sync: Vec<String> = snapshots(side)
                .into_iter()
                .map(|(name, _)| name)
                .filter(|n| n.starts_with("resync_"))
                .collect();
            assert_eq!(
                sync.len(),
                1,
                "{side}: older sync snapshots pruned: {sync:?}"
            );
        }
    }
}

/// Pruning a tree in one `zfs destroy -r` is only for a sync snapshot
/// that every dataset listed under the root prunes: a dataset left out of
/// the run (`--exclude-datasets`) keeps its older sync snapshot on both
/// sides.
#[test]
fn pruning_spares_the_sync_snapshots_of_datasets_outside_the_run() {
    let bed = Bed::get();
    let root = format!("{}/{}", bed.pool_a, unique_name("prunex"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("prunex"));
    let all = tree(&root, 3);
    let target = remote(&bed.host_b, &dst);
    resync(&["-r", &root, &target]).assert_success();
    let sync_snaps = |ds: &str| -> Vec<String> {
        snapshots(ds)
            .into_iter()
            .map(|(name, _)| name)
            .filter(|n| n.starts_with("resync_"))
            .collect()
    };
    let first = sync_snaps(&root);
    assert_eq!(first.len(), 1, "{first:?}");
    let left_out = format!("{root}/d01");
    std::thread::sleep(Duration::from_millis(1100));
    let run = resync(&["-r", "--debug", "--exclude-datasets=d01$", &root, &target]);
    run.assert_success();
    for ds in &all {
        for side in [ds.clone(), target_of(ds, &root, &dst)] {
            let sync = sync_snaps(&side);
            if *ds == left_out {
                assert_eq!(sync, first, "{side} was left out of the run:\n{run}");
            } else {
                assert_eq!(sync.len(), 1, "{side}: {sync:?}\n{run}");
                assert_ne!(sync, first, "{side}: the older one pruned\n{run}");
            }
        }
    }
    assert!(
        !run.stderr.contains(&format!("zfs destroy -r {root}@")),
        "{run}"
    );
    crate::chunked::cleanup(&dst);
    crate::chunked::cleanup(&root);
}

#[test]
fn a_failing_dataset_skips_its_children_and_the_others_finish() {
    let bed = Bed::get();
    let root = format!("{}/{}", bed.pool_a, unique_name("fail"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("fail"));
    for ds in ["", "/a", "/bad", "/bad/child", "/z", "/z/deep"] {
        create_dataset_with_data(&format!("{root}{ds}"), &[("f", 5_000)]);
    }
    // A wrapper around the real zfs: a receive into */bad fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let real = ["/usr/sbin/zfs", "/sbin/zfs", "/usr/bin/zfs"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("zfs is installed");
    let wrapper = dir.path().join("zfs");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in\n  receive*/bad) cat >/dev/null; echo 'injected failure' >&2; exit 1 ;;\nesac\nexec {real} \"$@\"\n"
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for jobs in ["--jobs=1", "--jobs=3"] {
        let out = Resync::new(&["-r", jobs, &root, &dst])
            .env("PATH", &path)
            .run();
        assert_eq!(out.code, Some(1), "{jobs}: some datasets failed:\n{out}");
        assert!(out.stderr.contains("injected failure"), "{out}");
        assert!(
            out.stderr
                .contains(&format!("skipped because its parent {root}/bad failed")),
            "{jobs}: the child is skipped with the reason:\n{out}"
        );
        assert!(out.stderr.contains("2 of 6 datasets failed"), "{out}");
        for ds in ["", "/a", "/z", "/z/deep"] {
            assert_replica_of(&format!("{root}{ds}"), &format!("{dst}{ds}"));
        }
        assert!(!exists(&format!("{dst}/bad/child")));
        std::thread::sleep(Duration::from_millis(1100));
    }
}

/// On a terminal, `--jobs` streams each get a bar of their own
/// (indicatif's MultiProgress) and messages are printed above the bars:
/// each dataset's summary line arrives whole and once, and the run ends
/// with its totals line. Run under `script`, which gives it a pty.
#[test]
fn on_a_terminal_parallel_streams_keep_every_message_line_whole() {
    let bed = Bed::get();
    let root = format!("{}/{}", bed.pool_a, unique_name("pty"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("pty"));
    create_dataset_with_data(&root, &[("f", 4_000)]);
    let mut all = vec![root.clone()];
    for i in 0..6 {
        let child = format!("{root}/d{i}");
        create_dataset_with_data(&child, &[("f", 2 << 20)]);
        all.push(child);
    }
    let target = remote(&bed.host_b, &dst);
    // Slow enough that the four bars are drawn side by side for a while.
    let command = format!(
        "{} -r --jobs=4 --target-bwlimit=4M {root} {target}",
        resync_bin()
    );
    let out = Resync::new(&["-qec", &command, "/dev/null"])
        .program(Path::new("/usr/bin/script"))
        .run();
    out.assert_success();
    // What the terminal was sent, without escape sequences, as lines.
    let mut text = String::new();
    let mut chars = out.stdout.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => text.push('\n'),
            c => text.push(c),
        }
    }
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    assert!(
        lines.iter().any(|l| l.contains('⠁') || l.contains("B/s")),
        "no progress bars were drawn:\n{text}"
    );
    for ds in &all {
        let head = format!(
            "{ds} -> {}: ",
            remote(&bed.host_b, &target_of(ds, &root, &dst))
        );
        let summaries: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&head) && l.contains(", now at @"))
            .collect();
        assert_eq!(summaries.len(), 1, "{head}:\n{text}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("7 datasets in ") && l.contains(": 7 replicated (")),
        "the totals line:\n{text}"
    );
    for ds in &all {
        assert_replica_of(ds, &target_of(ds, &root, &dst));
    }
    crate::chunked::cleanup(&dst);
    crate::chunked::cleanup(&root);
}
