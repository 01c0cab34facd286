//! `--compress` on the real test bed: compressible datasets pushed and
//! pulled in default mode (our binary encodes or decodes on the remote
//! host), `--compress=none`, `--chunked` with framed chunks through a link
//! cut, and bad values. Every test asserts what landed on the target
//! (snapshot GUIDs, file checksums) and that fewer bytes crossed the wire
//! than the stream holds, by resync's own summary line.

use std::path::Path;
use std::time::Duration;

use crate::bed::*;
use crate::chunked::{assert_no_sessions_left, cleanup, tmpdir};

/// Writes text files (about 3x compressible by zstd) under `ds`.
fn write_text(ds: &str, files: &[(&str, usize)]) {
    let mp = mountpoint(ds);
    for (i, (rel, size)) in files.iter().enumerate() {
        let mut text = String::with_capacity(*size + 100);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1) ^ fnv(ds);
        while text.len() < *size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(&format!(
                "{:08x} pool/dataset@snap-{} received {} bytes at {}\n",
                x as u32,
                x % 1000,
                x % 100_000,
                x % 86_400
            ));
        }
        text.truncate(*size);
        std::fs::write(mp.join(rel), text).unwrap_or_else(|e| panic!("write {rel}: {e}"));
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The numbers of resync's "compressed: X (N bytes) of stream in Y (M
/// bytes) ..." line: (N, M).
fn compressed(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("compressed: "))
        .unwrap_or_else(|| panic!("no compression summary in:\n{stderr}"));
    let numbers: Vec<u64> = line
        .split(['(', ')'])
        .filter_map(|part| part.strip_suffix(" bytes"))
        .filter_map(|n| n.parse().ok())
        .collect();
    match numbers.as_slice() {
        [raw, wire] => (*raw, *wire),
        _ => panic!("unexpected compression summary: {line}"),
    }
}

#[track_caller]
fn assert_fewer_bytes_on_the_wire(stderr: &str) {
    let (raw, wire) = compressed(stderr);
    assert!(raw > 8 << 20, "the stream was {raw} bytes: {stderr}");
    assert!(
        wire * 3 < raw * 2,
        "{wire} bytes on the wire for a {raw}-byte stream: {stderr}"
    );
}

fn text_dataset(ds: &str) {
    zfs(&["create", "-p", "-o", "compression=off", ds]);
    write_text(ds, &[("a.log", 9 << 20), ("b.log", 2 << 20)]);
    snapshot(ds, "first");
}

#[test]
fn default_compression_push_then_incremental_crosses_fewer_bytes_and_arrives_whole() {
    let bed = Bed::get();
    let src = bed.ds_a("zpush");
    let dst = bed.ds_b("zpush");
    text_dataset(&src);
    let out = resync(&[&src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert_fewer_bytes_on_the_wire(&out.stderr);
    assert_replica(&src, &dst);
    write_text(&src, &[("c.log", 10 << 20)]);
    snapshot(&src, "second");
    let out = resync(&[&src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert_fewer_bytes_on_the_wire(&out.stderr);
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

#[test]
fn default_compression_pull_crosses_fewer_bytes_and_arrives_whole() {
    let bed = Bed::get();
    let src = bed.ds_b("zpull");
    let dst = bed.ds_a("zpull");
    text_dataset(&src);
    let out = resync(&[&remote(&bed.host_b, &src), &dst]);
    out.assert_success();
    assert_fewer_bytes_on_the_wire(&out.stderr);
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

#[test]
fn named_compression_between_two_remote_hosts_arrives_whole() {
    let bed = Bed::get();
    let src = bed.ds_a("zr2r");
    let dst = bed.ds_b("zr2r");
    text_dataset(&src);
    let out = resync(&[
        "--compress=zstd-fast",
        &remote(&bed.host_a, &src),
        &remote(&bed.host_b, &dst),
    ]);
    out.assert_success();
    // This machine only relays frames: it counts the wire, not the stream.
    assert!(
        out.stderr.contains("on the wire, relayed"),
        "{}",
        out.stderr
    );
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

#[test]
fn compress_none_sends_the_plain_stream() {
    let bed = Bed::get();
    let src = bed.ds_a("znone");
    let dst = bed.ds_b("znone");
    text_dataset(&src);
    let out = resync(&[
        "--compress=none",
        "--debug",
        &src,
        &remote(&bed.host_b, &dst),
    ]);
    out.assert_success();
    assert!(!out.stderr.contains("compressed:"), "{}", out.stderr);
    assert!(!out.stderr.contains("__decode"), "{}", out.stderr);
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

#[test]
fn bad_compress_values_exit_2_with_one_line_and_change_nothing() {
    let bed = Bed::get();
    let src = bed.ds_a("zbad");
    let dst = bed.ds_b("zbad");
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    let target = remote(&bed.host_b, &dst);
    for flag in [
        "--compress=bzip2",
        "--compress=",
        "--compress=LZO",
        "--compress=zstd",
    ] {
        let out = resync(&[flag, &src, &target]);
        assert_eq!(out.code, Some(2), "{flag}: {out}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{flag}: {out}");
        assert!(out.stderr.contains("--compress"), "{flag}: {out}");
    }
    assert!(!exists(&dst), "a refused run must not replicate");
    assert!(snapshots(&src).is_empty(), "nor snapshot the source");
    destroy(&src);
}

/// `--chunked` with the default compression, its link cut past the SSH
/// timeouts mid-run: it reconnects, re-sends less than a chunk, the chunk
/// files carried fewer bytes than the stream, and the target is right.
#[test]
fn chunked_compressed_survives_a_link_cut_and_resends_less_than_a_chunk() {
    const CHUNK: u64 = 4 << 20;
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("zcut");
    let dst = bed.ds_b("zcut");
    zfs(&["create", "-p", "-o", "compression=off", &src]);
    write_text(&src, &[("a.log", 40 << 20)]);
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    let net = exclusive_network();
    let mut running = Resync::new(&[
        "--chunked",
        "--chunk-size=4M",
        "--chunk-window=2",
        "--timeout=90s",
        "--target-bwlimit=2M",
        &tmp_arg,
        &src,
        &remote(&bed.host_b, &dst),
    ])
    .timeout(Duration::from_secs(300))
    .spawn();
    let started = wait_until(Duration::from_secs(120), || {
        has_session(tmp.path()) || !running.is_running()
    });
    assert!(started && running.is_running(), "{}", running.wait());
    std::thread::sleep(Duration::from_secs(3));
    {
        let cut = link_down(&bed.host_b);
        std::thread::sleep(Duration::from_secs(14));
        cut.restore();
    }
    let out = running.wait();
    out.assert_success();
    drop(net);
    assert!(out.stderr.contains("reconnect"), "{}", out.stderr);
    let resent = out
        .stderr
        .lines()
        .find(|l| l.starts_with("chunked: "))
        .and_then(|l| l.split(" re-sent (").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no re-sent count in:\n{}", out.stderr));
    assert!(resent <= CHUNK, "re-sent {resent} bytes > one chunk");
    let (raw, wire) = compressed(&out.stderr);
    assert!(
        wire * 3 < raw * 2,
        "{wire} bytes of chunks for {raw}: {}",
        out.stderr
    );
    assert_replica(&src, &dst);
    assert_no_sessions_left(tmp.path());
    cleanup(&src);
    cleanup(&dst);
}

fn has_session(dir: &Path) -> bool {
    !crate::chunked::sessions(dir).is_empty()
}

/// Our binary cannot be put on the target (its --tmpdir does not exist
/// there): a named compressor is one line and exit 2 before anything runs
/// (no sync snapshot, no target); the default sends uncompressed after one
/// warning, and the target is right.
#[test]
fn a_host_that_cannot_run_our_binary_fails_a_named_compressor_and_the_default_falls_back() {
    let bed = Bed::get();
    let src = bed.ds_a("zfallback");
    let dst = bed.ds_b("zfallback");
    text_dataset(&src);
    let target = remote(&bed.host_b, &dst);
    let tmp = "--tmpdir=/nonexistent-resync-tmpdir";
    let out = resync(&["--compress=lzo", tmp, &src, &target]);
    assert_eq!(out.code, Some(2), "{out}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out}");
    assert!(out.stderr.contains("--compress needs resync on"), "{out}");
    assert!(!exists(&dst), "a refused run must not replicate");
    assert_eq!(snapshots(&src).len(), 1, "nor snapshot the source");
    let out = resync(&[tmp, &src, &target]);
    out.assert_success();
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("sending uncompressed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert!(!out.stderr.contains("compressed:"), "{}", out.stderr);
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}
