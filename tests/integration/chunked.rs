//! `--chunked` mode on the real test bed: the stream crosses as MD5-verified
//! chunk files moved by the orchestrator between session folders on the two
//! hosts. Every test asserts what landed on the target (snapshot GUIDs, file
//! checksums) and that no session folder is left behind. Each test uses its
//! own `--tmpdir` under /var/tmp (which the bed's hosts share; their /tmp is
//! private), so that it sees only its own folders.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bed::*;

/// A private tmpdir for one test's session folders (and uploaded binary).
pub(crate) fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("chunked")
        .tempdir_in("/var/tmp")
        .expect("tempdir")
}

/// Session folders (`resync-<hex>`) in `dir`; the uploaded binary's
/// `resync-bin-<uid>` is not one.
pub(crate) fn sessions(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read tmpdir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("resync-"))
                .is_some_and(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect()
}

#[track_caller]
pub(crate) fn assert_no_sessions_left(dir: &Path) {
    // The helpers remove their folders right after our acknowledgement.
    let clean = wait_until(Duration::from_secs(10), || sessions(dir).is_empty());
    assert!(clean, "session folders left: {:?}", sessions(dir));
}

/// Destroys a test's dataset; zfs-fuse sometimes keeps one "busy" for a
/// long while after a receive, which is no failure of the test.
pub(crate) fn cleanup(ds: &str) {
    let gone = wait_until(Duration::from_secs(30), || {
        zfs_ok(&["destroy", "-r", ds]) || !exists(ds)
    });
    if !gone {
        eprintln!("warning: could not destroy {ds} (zfs-fuse says busy)");
    }
}

pub(crate) fn chunked(tmp: &Path, src: &str, dst: &str, extra: &[&str]) -> Output {
    let tmp = format!("--tmpdir={}", tmp.display());
    let mut args = vec!["--chunked", "--chunk-size=1M", &tmp];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, dst]);
    resync(&args)
}

/// Full, then incremental, with 1 MiB chunks (so several dozen of them).
fn full_then_incremental(src: &str, dst: &str, s_arg: &str, d_arg: &str) {
    let tmp = tmpdir();
    create_dataset_with_data(src, &[("a.bin", 6 << 20), ("dir/b.bin", 300_000)]);
    snapshot(src, "first");
    chunked(tmp.path(), s_arg, d_arg, &[]).assert_success();
    assert_replica(src, dst);
    assert!(snapshots(dst).iter().any(|(n, _)| n == "first"));
    assert_no_sessions_left(tmp.path());

    write_files(src, &[("c.bin", 3 << 20)]);
    snapshot(src, "second");
    std::thread::sleep(Duration::from_millis(1100));
    chunked(tmp.path(), s_arg, d_arg, &["--chunk-window=2"]).assert_success();
    assert_replica(src, dst);
    assert!(snapshots(dst).iter().any(|(n, _)| n == "second"));
    assert_no_sessions_left(tmp.path());
    cleanup(src);
    cleanup(dst);
}

#[test]
fn chunked_push_full_then_incremental() {
    let bed = Bed::get();
    let src = bed.ds_a("cpush");
    let dst = bed.ds_b("cpush");
    full_then_incremental(&src, &dst, &src, &remote(&bed.host_b, &dst));
}

#[test]
fn chunked_pull_full_then_incremental() {
    let bed = Bed::get();
    let src = bed.ds_b("cpull");
    let dst = bed.ds_a("cpull");
    full_then_incremental(&src, &dst, &remote(&bed.host_b, &src), &dst);
}

#[test]
fn chunked_remote_to_remote_full_then_incremental() {
    let bed = Bed::get();
    let src = bed.ds_a("cr2r");
    let dst = bed.ds_b("cr2r");
    full_then_incremental(
        &src,
        &dst,
        &remote(&bed.host_a, &src),
        &remote(&bed.host_b, &dst),
    );
}

#[test]
fn chunked_receive_failure_is_reported_and_cleaned_up() {
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("cfail");
    let dst = bed.ds_b("cfail");
    create_dataset_with_data(&src, &[("a.bin", 2 << 20)]);
    // zfs receive refuses a property that does not exist, after the stream
    // has started to flow.
    let out = chunked(
        tmp.path(),
        &src,
        &remote(&bed.host_b, &dst),
        &["--recvoptions=o nosuchprop=1"],
    );
    out.assert_failure();
    assert!(
        out.stderr.contains("zfs receive failed"),
        "names the failing side: {}",
        out.stderr
    );
    assert!(!exists(&dst), "no target was created");
    assert_no_sessions_left(tmp.path());
    cleanup(&src);
}

/// A cut of the target's link for ~10 s in the middle of a chunked push:
/// resync reconnects and finishes by itself.
#[test]
fn chunked_push_survives_a_link_cut() {
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("ccut");
    let dst = bed.ds_b("ccut");
    create_dataset_with_data(&src, &[("a.bin", 40 << 20)]);
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    let _net = exclusive_network();
    let t0 = Instant::now();
    let running = Resync::new(&[
        "--chunked",
        "--chunk-size=1M",
        "--timeout=60s",
        "--target-bwlimit=4M",
        "--debug",
        &tmp_arg,
        &src,
        &remote(&bed.host_b, &dst),
    ])
    .timeout(Duration::from_secs(300))
    .spawn();
    // Once the helpers run (the binary is uploaded), let chunks flow, then cut.
    assert!(
        wait_until(Duration::from_secs(120), || !sessions(tmp.path())
            .is_empty()),
        "the chunk helpers never started"
    );
    std::thread::sleep(Duration::from_secs(3));
    {
        let cut = link_down(&bed.host_b);
        std::thread::sleep(Duration::from_secs(10));
        cut.restore();
    }
    let out = running.wait();
    out.assert_success();
    eprintln!(
        "link cut run took {:?}; its summary: {}",
        t0.elapsed(),
        out.stderr
            .lines()
            .filter(|l| l.contains("chunked:") || l.contains("reconnect"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(out.stderr.contains("reconnect"), "{}", out.stderr);
    assert_replica(&src, &dst);
    drop(_net);
    assert_no_sessions_left(tmp.path());
    cleanup(&src);
    cleanup(&dst);
}
