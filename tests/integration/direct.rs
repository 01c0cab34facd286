//! `--insecure-direct-connection` on the real test bed: the stream crosses
//! plain TCP between this machine (10.213.0.1 on the bed's bridge) and host
//! B, control stays on SSH. Pushed (host B's `__listen` feeds `zfs
//! receive`) and pulled (host B's `__connect` writes `zfs send` to our
//! listener), full and incremental; a listener that gets no connection
//! gives up within its timeout and leaves no `zfs receive` behind; bad
//! values and remote-to-remote are refused before anything runs. Each
//! asserts what landed on the target (snapshot GUIDs, file checksums).

use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use crate::bed::*;
use crate::chunked::cleanup;

/// A high port of this test process's own (tests run in parallel, and
/// several test binaries may share the bed over time).
fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 16;
    base + NEXT.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn direct_connection_push_full_then_incremental_arrives_whole() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("dpush"), bed.ds_b("dpush"));
    create_dataset_with_data(&src, &[("a.bin", 3 << 20), ("b.bin", 200_000)]);
    snapshot(&src, "first");
    let value = format!("--insecure-direct-connection={}:{}", bed.host_b, port());
    let out = resync(&["--debug", &value, &src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert!(out.stderr.contains("__listen"), "{}", out.stderr);
    assert!(
        out.stderr.contains("uncompressed and unencrypted"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("compressed:"), "{}", out.stderr);
    assert_replica(&src, &dst);

    write_files(&src, &[("d.bin", 500_000)]);
    snapshot(&src, "second");
    let value = format!("--insecure-direct-connection={}:{}", bed.host_b, port());
    let out = resync(&[&value, &src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

/// `-r`: every dataset crosses the same port, one stream at a time.
#[test]
fn direct_connection_recursive_push_reuses_the_port_for_each_dataset() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("drec"), bed.ds_b("drec"));
    create_dataset_with_data(&src, &[("a.bin", 300_000)]);
    for child in ["c1", "c2", "c2/g"] {
        create_dataset_with_data(&format!("{src}/{child}"), &[("x.bin", 200_000)]);
    }
    zfs(&["snapshot", "-r", &format!("{src}@first")]);
    let value = format!("--insecure-direct-connection={}:{}", bed.host_b, port());
    let out = resync(&["-r", "--jobs=4", &value, &src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    for child in ["", "/c1", "/c2", "/c2/g"] {
        assert_replica(&format!("{src}{child}"), &format!("{dst}{child}"));
    }
    cleanup(&src);
    cleanup(&dst);
}

#[test]
fn direct_connection_pull_listens_here_and_arrives_whole() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_b("dpull"), bed.ds_a("dpull"));
    create_dataset_with_data(&src, &[("a.bin", 2 << 20)]);
    snapshot(&src, "first");
    let value = format!("--insecure-direct-connection={}:{}", bed.root_addr, port());
    let out = resync(&["--debug", &value, &remote(&bed.host_b, &src), &dst]);
    out.assert_success();
    assert!(out.stderr.contains("__connect"), "{}", out.stderr);
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

/// Pull where the source connects to an address nobody listens on: our
/// listener gives up after its 3 s, stops the local `zfs receive`, and the
/// run fails without a target.
#[test]
fn direct_connection_listener_without_a_connection_fails_and_stops_zfs_receive() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_b("dnoconn"), bed.ds_a("dnoconn"));
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    snapshot(&src, "first");
    let p = port();
    let value = format!(
        "--insecure-direct-connection={}:{p},{}:{p},3",
        bed.unused_addr, bed.root_addr
    );
    let t = Instant::now();
    let out = resync(&[&value, &remote(&bed.host_b, &src), &dst]);
    out.assert_failure();
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        out.stderr.contains("no connection on") && out.stderr.contains("within 3s"),
        "{}",
        out.stderr
    );
    assert!(!zfs_receive_running(&dst), "zfs receive left running");
    assert!(!exists(&dst), "a failed run created the target");
    cleanup(&src);
}

/// Push where this machine connects to an address nobody listens on: it
/// gives up after 3 s, host B's `__listen` gets no connection in its 3 s and
/// stops its `zfs receive`, and the run fails without a target.
#[test]
fn direct_connection_remote_listener_without_a_connection_stops_zfs_receive() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("dnolisten"), bed.ds_b("dnolisten"));
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    snapshot(&src, "first");
    let p = port();
    let value = format!(
        "--insecure-direct-connection={}:{p},{}:{p},3",
        bed.unused_addr, bed.host_b
    );
    let out = resync(&[&value, &src, &remote(&bed.host_b, &dst)]);
    out.assert_failure();
    assert!(
        out.stderr.contains("cannot connect to") && out.stderr.contains("within 3s"),
        "{}",
        out.stderr
    );
    assert!(
        wait_until(Duration::from_secs(20), || !zfs_receive_running(&dst)),
        "zfs receive left running on host B"
    );
    assert!(!exists(&dst), "a failed run created the target");
    cleanup(&src);
}

#[test]
fn direct_connection_bad_values_and_remote_to_remote_are_refused_before_anything_runs() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("dbad"), bed.ds_b("dbad"));
    create_dataset_with_data(&src, &[("a.bin", 64 << 10)]);
    let target = remote(&bed.host_b, &dst);
    let r2r = remote(&bed.host_a, &src);
    for (flag, source, want) in [
        (
            "--insecure-direct-connection=nonsense",
            &src,
            "is not IP:PORT",
        ),
        ("--insecure-direct-connection=10.213.0.3:0", &src, "port 0"),
        (
            "--insecure-direct-connection=10.213.0.3:70000",
            &src,
            "is not IP:PORT",
        ),
        (
            "--insecure-direct-connection=10.213.0.3:9,10.213.0.3:9,5,mbuffer,x",
            &src,
            "5 parts",
        ),
        (
            "--insecure-direct-connection=10.213.0.3:9000",
            &r2r,
            "two remote hosts",
        ),
    ] {
        let out = resync(&[flag, source, &target]);
        assert_eq!(out.code, Some(2), "{flag}: {out}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{flag}: {out}");
        assert!(out.stderr.contains(want), "{flag}: {out}");
    }
    let out = resync(&[
        "--chunked",
        "--insecure-direct-connection=10.213.0.3:9000",
        &src,
        &target,
    ]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("--chunked"), "{out}");
    assert!(!exists(&dst), "a refused run must not replicate");
    assert!(snapshots(&src).is_empty(), "nor snapshot the source");
    destroy(&src);
}
