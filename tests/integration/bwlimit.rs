//! `--source-bwlimit` / `--target-bwlimit` on the real test bed: a limited
//! run takes at least about bytes/rate (the limiter works; this is not a
//! speed target), still lands a verified replica, and a bad rate is a
//! one-line usage error that touches nothing.

use std::time::Duration;

use crate::bed::*;

const MIB: usize = 1 << 20;

/// Bytes moved, from the summary line "LABEL: 24.06 MiB in 6.2s (...)".
fn summary_bytes(stderr: &str) -> Option<f64> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains(" in ") && l.contains("now at @"))?;
    let after = line.rsplit_once(": ")?.1;
    let mut words = after.split_whitespace();
    let value: f64 = words.next()?.parse().ok()?;
    let unit = match words.next()? {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(value * unit)
}

/// Runs a limited replication and checks it took at least 80% of
/// `min_bytes / rate`; returns (stream bytes, elapsed) for the record.
fn limited_run(args: &[&str], min_bytes: usize, rate: usize) -> (f64, Duration) {
    let out = Resync::new(args).timeout(Duration::from_secs(300)).run();
    out.assert_success();
    let floor = 0.8 * min_bytes as f64 / rate as f64;
    let took = out.elapsed.as_secs_f64();
    assert!(
        took >= floor,
        "{args:?} moved at least {min_bytes} bytes at {rate} B/s in {took:.2}s, under the {floor:.2}s floor:\n{out}"
    );
    // Not a speed target, but a limiter that sleeps many times too long is
    // broken too.
    let ceiling = 4.0 * min_bytes as f64 / rate as f64 + 60.0;
    assert!(took < ceiling, "{args:?} took {took:.2}s:\n{out}");
    let bytes = summary_bytes(&out.stderr).unwrap_or(min_bytes as f64);
    eprintln!(
        "bwlimit: {args:?}: {bytes:.0} bytes in {took:.2}s = {:.0} B/s (requested {rate} B/s)",
        bytes / took
    );
    (bytes, out.elapsed)
}

#[test]
fn target_bwlimit_holds_a_push_to_the_rate_and_the_replica_verifies() {
    let bed = Bed::get();
    let src = bed.ds_a("bwl");
    let dst = bed.ds_b("bwl");
    create_dataset_with_data(
        &src,
        &[
            ("a.bin", 16 * MIB),
            ("b.bin", 6 * MIB),
            ("d/c.bin", 2 * MIB),
        ],
    );
    snapshot(&src, "first");
    let target = remote(&bed.host_b, &dst);
    limited_run(&["--target-bwlimit=4M", &src, &target], 24 * MIB, 4 * MIB);
    assert_replica(&src, &dst);

    // Incremental, both limits given: the smaller (the source's) wins.
    write_files(&src, &[("e.bin", 6 * MIB)]);
    snapshot(&src, "second");
    std::thread::sleep(Duration::from_millis(1100));
    limited_run(
        &[
            "--source-bwlimit=2MiB/s",
            "--target-bwlimit=1G",
            &src,
            &target,
        ],
        6 * MIB,
        2 * MIB,
    );
    assert_replica(&src, &dst);
    destroy(&dst);
    destroy(&src);
}

#[test]
fn bad_bwlimits_exit_2_with_one_line_and_change_nothing() {
    let bed = Bed::get();
    let src = bed.ds_a("bwlbad");
    let dst = bed.ds_b("bwlbad");
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    let target = remote(&bed.host_b, &dst);
    for flag in [
        "--source-bwlimit=0",
        "--source-bwlimit=-5M",
        "--source-bwlimit=fast",
        "--target-bwlimit=0k",
        "--target-bwlimit=10Mb",
        "--target-bwlimit=",
        "--target-bwlimit=nan",
    ] {
        let out = resync(&[flag, &src, &target]);
        assert_eq!(out.code, Some(2), "{flag}: {out}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{flag}: {out}");
        assert!(out.stderr.contains("bwlimit"), "{flag}: {out}");
    }
    assert!(!exists(&dst), "a refused run must not replicate");
    assert!(
        snapshots(&src).is_empty(),
        "a refused run must not snapshot the source"
    );
    destroy(&src);
}
