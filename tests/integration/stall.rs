//! `--timeout` bounds a hung local `zfs send` or `zfs receive` in default
//! mode, not only the network: a wrapper put first on resync's PATH runs
//! the real zfs, but stalls it for the test's dataset (a receive that
//! never reads, a send that stops writing mid-stream). The run must end
//! with an error well before the stall would, not hang a cron job.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::bed::*;

/// How long the wrapped zfs sleeps: far longer than the test lets resync run.
const STALL_SECS: u64 = 90;

/// A directory holding `zfs`: a wrapper that runs the real zfs, except
/// that a command whose arguments match `pattern` (a shell `case`
/// pattern) does `stall` instead.
fn wrapper(pattern: &str, stall: &str) -> (tempfile::TempDir, String) {
    let real = which_zfs();
    let dir = tempfile::tempdir().expect("tempdir");
    let script = format!(
        "#!/bin/sh\ncase \"$*\" in\n  {pattern}) {stall} ;;\nesac\nexec {} \"$@\"\n",
        real.display()
    );
    let path = dir.path().join("zfs");
    std::fs::write(&path, script).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let search = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (dir, search)
}

fn which_zfs() -> PathBuf {
    ["/usr/sbin/zfs", "/sbin/zfs", "/usr/bin/zfs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("zfs is installed")
}

fn pair(prefix: &str) -> (String, String) {
    let bed = Bed::get();
    let name = unique_name(prefix);
    let src = format!("{}/{name}", bed.pool_a);
    create_dataset_with_data(&src, &[("a", 2_000_000)]);
    snapshot(&src, "s1");
    (src, format!("{}/{name}", bed.pool_b))
}

#[track_caller]
fn assert_stopped_in_time(out: &Output) {
    assert!(!out.timed_out, "resync hung:\n{out}");
    out.assert_failure();
    assert!(
        out.elapsed < Duration::from_secs(STALL_SECS / 2),
        "took {:?}:\n{out}",
        out.elapsed
    );
    assert!(out.stderr.contains("--timeout"), "{out}");
}

#[test]
fn a_local_zfs_receive_that_never_reads_is_stopped_after_the_timeout() {
    let (src, dst) = pair("stallrecv");
    let (_keep, path) = wrapper(
        &format!("receive*{dst}"),
        &format!("sleep {STALL_SECS}; exit 1"),
    );
    let out = Resync::new(&["--no-sync-snap", "--timeout=3s", &src, &dst])
        .env("PATH", &path)
        .timeout(Duration::from_secs(STALL_SECS + 30))
        .run();
    assert_stopped_in_time(&out);
    assert!(!exists(&format!("{dst}@s1")));
}

#[test]
fn a_local_zfs_send_that_stops_mid_stream_is_stopped_after_the_timeout() {
    let (src, dst) = pair("stallsend");
    let real = which_zfs();
    let (_keep, path) = wrapper(
        &format!("send*{src}@*"),
        &format!(
            "{} \"$@\" | head -c 200000; sleep {STALL_SECS}; exit 0",
            real.display()
        ),
    );
    let out = Resync::new(&["--no-sync-snap", "--timeout=3s", &src, &dst])
        .env("PATH", &path)
        .timeout(Duration::from_secs(STALL_SECS + 30))
        .run();
    assert_stopped_in_time(&out);
    assert!(!exists(&format!("{dst}@s1")));
}
