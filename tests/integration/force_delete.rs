//! `--force-delete` on the real test bed (zfs-fuse): it replaces a target
//! that shares no snapshot with the source, but never takes datasets below
//! the target that are not part of the run (an excluded child, another
//! job's replica) with it.

use crate::bed::*;

/// A target `dst` that shares no snapshot with `src` (its own @old), and
/// a source with @s1.
fn diverged_pair(prefix: &str) -> (String, String) {
    let bed = Bed::get();
    let name = unique_name(prefix);
    let (src, dst) = (
        format!("{}/{name}", bed.pool_a),
        format!("{}/{name}", bed.pool_b),
    );
    create_dataset_with_data(&src, &[("a", 20_000)]);
    snapshot(&src, "s1");
    create_dataset_with_data(&dst, &[("mine", 10_000)]);
    snapshot(&dst, "old");
    (src, dst)
}

#[test]
fn force_delete_refuses_to_destroy_a_target_child_that_is_not_part_of_the_run() {
    let (src, dst) = diverged_pair("fdrefuse");
    let other = format!("{dst}/other-job");
    create_dataset_with_data(&other, &[("theirs", 10_000)]);
    snapshot(&other, "theirs1");
    let out = resync(&["--no-sync-snap", "--force-delete", &src, &dst]);
    out.assert_failure();
    assert!(out.stderr.contains(&other), "the refusal names it:\n{out}");
    assert!(exists(&other), "{other} was destroyed:\n{out}");
    assert!(exists(&format!("{other}@theirs1")));
    assert!(
        exists(&format!("{dst}@old")),
        "the target was touched:\n{out}"
    );
}

#[test]
fn force_delete_refuses_when_a_target_child_was_excluded_from_the_run() {
    let (src, dst) = diverged_pair("fdexcl");
    let (src_child, dst_child) = (format!("{src}/scratch"), format!("{dst}/scratch"));
    create_dataset_with_data(&src_child, &[("s", 1000)]);
    snapshot(&src_child, "s1");
    create_dataset_with_data(&dst_child, &[("kept", 1000)]);
    snapshot(&dst_child, "kept1");
    let out = resync(&[
        "--no-sync-snap",
        "--force-delete",
        "-r",
        "--exclude-datasets=scratch$",
        &src,
        &dst,
    ]);
    out.assert_failure();
    assert!(out.stderr.contains(&dst_child), "{out}");
    assert!(exists(&format!("{dst_child}@kept1")), "{out}");
}

#[test]
fn force_delete_replaces_a_target_whose_children_are_all_part_of_the_run() {
    let (src, dst) = diverged_pair("fdok");
    let (src_child, dst_child) = (format!("{src}/c"), format!("{dst}/c"));
    create_dataset_with_data(&src_child, &[("c", 1000)]);
    snapshot(&src_child, "s1");
    create_dataset_with_data(&dst_child, &[("x", 1000)]);
    snapshot(&dst_child, "x1");
    let out = resync(&["--no-sync-snap", "--force-delete", "-r", &src, &dst]);
    out.assert_success();
    assert!(
        out.stderr.contains(&format!("below it {dst_child}")),
        "the warning names what goes:\n{out}"
    );
    assert_replica(&src, &dst);
    assert_replica(&src_child, &dst_child);
    assert!(!exists(&format!("{dst}@old")));
}
