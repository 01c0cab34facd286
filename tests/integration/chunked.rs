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

/// Starts a chunked run in the background and returns once its helpers
/// have created their session folders in `tmp` (the binary is deployed).
fn spawn_until_helpers_run(tmp: &Path, args: &[&str]) -> Running {
    let mut running = Resync::new(args).timeout(Duration::from_secs(300)).spawn();
    let started = wait_until(Duration::from_secs(120), || {
        !sessions(tmp).is_empty() || !running.is_running()
    });
    if !started || sessions(tmp).is_empty() {
        panic!(
            "the chunk helpers never started:
{}",
            running.wait()
        );
    }
    running
}

/// The target is a replica, no session folder is left, both datasets go.
#[track_caller]
fn replica_then_cleanup(tmp: &Path, src: &str, dst: &str) {
    assert_replica(src, dst);
    assert_no_sessions_left(tmp);
    cleanup(src);
    cleanup(dst);
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
    let running = spawn_until_helpers_run(
        tmp.path(),
        &[
            "--chunked",
            "--chunk-size=1M",
            "--timeout=60s",
            "--target-bwlimit=4M",
            "--debug",
            &tmp_arg,
            &src,
            &remote(&bed.host_b, &dst),
        ],
    );
    // Once the helpers run (the binary is uploaded), let chunks flow, then cut.
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
    // Every orchestrator line about the chunks names the session: both
    // folders' ids, as the helpers' logs name theirs.
    let tagged = regex_free_session_tag();
    let chunk_lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| {
            l.split("chunk ")
                .skip(1)
                .any(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect();
    assert!(!chunk_lines.is_empty(), "no chunk lines: {}", out.stderr);
    for l in chunk_lines {
        assert!(tagged(l), "a chunk line without the session ids: {l}");
    }
    assert_replica(&src, &dst);
    drop(_net);
    assert_no_sessions_left(tmp.path());
    cleanup(&src);
    cleanup(&dst);
}

/// The numbers of the run's summary line: "chunked: ... (N bytes) in C
/// chunks, R reconnects, ... re-sent (M bytes), ...": (N, C, R, M).
fn summary(stderr: &str) -> (u64, u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("chunked: "))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    let number_before = |word: &str| -> u64 {
        let at = line
            .find(word)
            .unwrap_or_else(|| panic!("{word:?} not in {line:?}"));
        line[..at]
            .trim_end()
            .rsplit([' ', '('])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {word:?} in {line:?}"))
    };
    let bytes = number_before(" bytes) in");
    let chunks = number_before(" chunks,");
    let reconnects = number_before(" reconnects,");
    let resent = number_before(" bytes),");
    (bytes, chunks, reconnects, resent)
}

/// Bytes the root side of `host`'s link sent towards it so far.
fn link_tx_bytes(host: &str) -> u64 {
    let link = Bed::get().link_of(host);
    let path = format!("/sys/class/net/{link}/statistics/tx_bytes");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .expect("tx_bytes")
}

/// Processes whose command line mentions `needle` (the helpers and chunk
/// servers of one test's tmpdir, on any bed host: they share /proc).
fn processes_with(needle: &str) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle) && c.contains("__chunk-"))
        .collect()
}

/// A cut longer than the SSH timeouts in the middle of a chunk: the run
/// reconnects by itself, every chunk cut mid-copy continues from the byte
/// offset the receiver stored, and the bytes sent again stay within one
/// chunk, by the summary and by the link's own byte counter.
#[test]
fn chunked_cut_resumes_mid_chunk_and_resends_less_than_a_chunk() {
    const CHUNK: u64 = 8 << 20;
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("cresume");
    let dst = bed.ds_b("cresume");
    create_dataset_with_data(&src, &[("a.bin", 40 << 20)]);
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    let net = exclusive_network();
    let running = spawn_until_helpers_run(
        tmp.path(),
        &[
            "--chunked",
            "--chunk-size=8M",
            "--chunk-window=2",
            "--timeout=90s",
            "--target-bwlimit=4M",
            &tmp_arg,
            &src,
            &remote(&bed.host_b, &dst),
        ],
    );
    // The binary is deployed; from here on the link carries the stream.
    let tx0 = link_tx_bytes(&bed.host_b);
    std::thread::sleep(Duration::from_secs(4));
    {
        let cut = link_down(&bed.host_b);
        // Longer than the chunked SSH timeout (8 s) plus keepalives.
        std::thread::sleep(Duration::from_secs(14));
        cut.restore();
    }
    let out = running.wait();
    out.assert_success();
    let tx = link_tx_bytes(&bed.host_b) - tx0;
    drop(net);
    let (bytes, chunks, reconnects, resent) = summary(&out.stderr);
    eprintln!(
        "stream {bytes} bytes in {chunks} chunks, {reconnects} reconnects, {resent} re-sent; the link carried {tx} bytes"
    );
    assert!(reconnects >= 1, "the cut was noticed: {}", out.stderr);
    assert!(resent <= CHUNK, "re-sent {resent} bytes > one chunk");
    // SSH and TCP framing cost a few percent; the rest must be the stream.
    let allowed = bytes + CHUNK + bytes / 10 + (1 << 20);
    assert!(
        tx <= allowed,
        "the link carried {tx} bytes for a {bytes}-byte stream (allowed {allowed})"
    );
    replica_then_cleanup(tmp.path(), &src, &dst);
}

/// A link that stays down past --timeout: the run fails naming the host
/// and the timeout; the helpers and chunk servers on both hosts give up by
/// themselves within that time and remove their folders; the next run
/// completes.
#[test]
fn chunked_link_down_past_timeout_fails_cleanly_and_the_rerun_completes() {
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("ctimeout");
    let dst = bed.ds_b("ctimeout");
    create_dataset_with_data(&src, &[("a.bin", 24 << 20)]);
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    let args = [
        "--chunked",
        "--chunk-size=2M",
        "--timeout=8s",
        "--target-bwlimit=2M",
        &tmp_arg,
        &src,
        &remote(&bed.host_b, &dst),
    ];
    let net = exclusive_network();
    // Deploy the binary and start the stream before the cut.
    let running = spawn_until_helpers_run(tmp.path(), &args);
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let out = {
        let _cut = link_down(&bed.host_b);
        running.wait()
    };
    drop(net);
    out.assert_failure();
    let e = out.stderr.to_lowercase();
    assert!(
        e.contains(&bed.host_b) && e.contains("8s"),
        "names the host and the timeout: {}",
        out.stderr
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "gave up in {:?}",
        t0.elapsed()
    );
    // Both sides clean up on their own (the receiver's side never heard
    // our cancel): no folder, no helper, no chunk server.
    let needle = tmp.path().to_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(30), || sessions(tmp.path()).is_empty()
            && processes_with(&needle).is_empty()),
        "left behind: folders {:?}, processes {:?}",
        sessions(tmp.path()),
        processes_with(&needle)
    );
    assert!(!zfs_receive_running(&dst), "zfs receive was stopped");
    resync(&args).assert_success();
    replica_then_cleanup(tmp.path(), &src, &dst);
}

/// The receiver's tmpdir has less room than a chunk (a small tmpfs in host
/// B's mount namespace; the deployed binary fits): one clear line naming
/// the host and "no space", the target keeps its snapshots, and once the
/// tmpfs grows the rerun completes.
#[test]
fn chunked_full_receiver_tmpdir_is_a_clear_error_and_the_rerun_completes() {
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("cnospace");
    let dst = bed.ds_b("cnospace");
    create_dataset_with_data(&src, &[("a.bin", 1 << 20)]);
    snapshot(&src, "first");
    let dir = tmp.path().to_str().unwrap().to_string();
    let tmp_arg = format!("--tmpdir={dir}");
    let target = remote(&bed.host_b, &dst);
    resync(&["--chunked", "--chunk-size=1M", &tmp_arg, &src, &target]).assert_success();
    let before = snapshots(&dst);
    write_files(&src, &[("b.bin", 12 << 20)]);
    snapshot(&src, "second");
    std::thread::sleep(Duration::from_millis(1100));
    // Room for the deployed binary plus 3 MiB, on host B only.
    let bin = std::fs::metadata(resync_bin()).expect("binary").len();
    let size_kib = bin / 1024 + 3 * 1024;
    ssh(
        &bed.host_b,
        &format!("mount -t tmpfs -o size={size_kib}k,mode=0700 tmpfs {dir}"),
    );
    struct Unmount<'a>(&'a str, String);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = ssh_output(self.0, &format!("umount -l {}", self.1));
        }
    }
    let _unmount = Unmount(&bed.host_b, dir.clone());
    let args = [
        "--chunked",
        "--chunk-size=8M",
        "--timeout=30s",
        &tmp_arg,
        &src,
        &target,
    ];
    let out = resync(&args);
    out.assert_failure();
    let err: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("resync: error"))
        .collect();
    assert_eq!(err.len(), 1, "one error line: {}", out.stderr);
    assert!(
        err[0].contains("no space") && err[0].contains(&bed.host_b),
        "names the host and the cause: {}",
        out.stderr
    );
    assert_eq!(snapshots(&dst), before, "the target is as it was");
    assert!(
        wait_until(Duration::from_secs(30), || processes_with(&dir).is_empty()),
        "helpers left: {:?}",
        processes_with(&dir)
    );
    ssh(
        &bed.host_b,
        &format!("mount -o remount,size={}k {dir}", size_kib + 64 * 1024),
    );
    resync(&args).assert_success();
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

/// Nonsense `--chunk-size`, `--chunk-window` and `--timeout` values are one
/// line on stderr, exit 2, and nothing happens.
#[test]
fn bad_chunked_values_exit_2_with_one_line_and_change_nothing() {
    let bed = Bed::get();
    let src = bed.ds_a("cbad");
    let dst = bed.ds_b("cbad");
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    let target = remote(&bed.host_b, &dst);
    for (flag, names) in [
        ("--chunk-size=0", "--chunk-size"),
        ("--chunk-size=-1M", "--chunk-size"),
        ("--chunk-size=2G", "--chunk-size"),
        ("--chunk-size=lots", "--chunk-size"),
        ("--chunk-size=99999999999999999999G", "--chunk-size"),
        ("--chunk-window=0", "--chunk-window"),
        ("--timeout=0s", "--timeout"),
        ("--timeout=-5s", "--timeout"),
        ("--timeout=soon", "--timeout"),
        ("--timeout=", "--timeout"),
    ] {
        let out = resync(&["--chunked", flag, &src, &target]);
        assert_eq!(out.code, Some(2), "{flag}: {out}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{flag}: {out}");
        assert!(out.stderr.contains(names), "{flag}: {out}");
    }
    assert!(!exists(&dst), "a refused run must not replicate");
    assert!(snapshots(&src).is_empty(), "nor snapshot the source");
    destroy(&src);
}

/// A chunk damaged in the receiver's folder while it arrives: the receiver
/// rejects it, resync sends it again in full (the summary counts it as
/// re-sent), and the target is correct.
#[test]
fn chunked_chunk_damaged_on_arrival_is_sent_again_and_the_target_is_right() {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 2 << 20;
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("cdamage");
    let dst = bed.ds_b("cdamage");
    create_dataset_with_data(&src, &[("a.bin", 12 << 20)]);
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    let running = spawn_until_helpers_run(
        tmp.path(),
        &[
            "--chunked",
            "--chunk-size=2M",
            "--target-bwlimit=4M",
            "--timeout=60s",
            &tmp_arg,
            &src,
            &remote(&bed.host_b, &dst),
        ],
    );
    // The receiver's folder is the one with `progress`; damage the first
    // chunk that is half-way there, in bytes that have already arrived.
    let damaged = wait_until(Duration::from_secs(60), || {
        sessions(tmp.path())
            .iter()
            .filter(|d| d.join("progress").exists())
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .filter(|e| e.file_name().to_string_lossy().starts_with("chunk-"))
            .any(|e| {
                let big = e.metadata().is_ok_and(|m| m.len() > CHUNK / 2);
                big && std::fs::OpenOptions::new()
                    .write(true)
                    .open(e.path())
                    .and_then(|f| f.write_all_at(&[0x5a; 4096], 1000))
                    .is_ok()
            })
    });
    assert!(damaged, "no chunk was caught arriving");
    let out = running.wait();
    out.assert_success();
    let (_, _, _, resent) = summary(&out.stderr);
    assert!(
        resent >= CHUNK,
        "the damaged chunk was sent again in full: re-sent {resent}"
    );
    replica_then_cleanup(tmp.path(), &src, &dst);
}

/// Source and target on one remote host share one SSH connection; a wide
/// window must not ask for more channels than sshd allows (MaxSessions).
#[test]
fn chunked_within_one_remote_host_with_a_wide_window() {
    let bed = Bed::get();
    let tmp = tmpdir();
    let src = bed.ds_a("csame");
    let dst = bed.ds_a("csame");
    create_dataset_with_data(&src, &[("a.bin", 12 << 20)]);
    // Slow copies, so that many chunks are staged and copied at once (26
    // channels without the cap: the run hung).
    chunked(
        tmp.path(),
        &remote(&bed.host_a, &src),
        &remote(&bed.host_a, &dst),
        &["--chunk-window=12", "--target-bwlimit=2M"],
    )
    .assert_success();
    replica_then_cleanup(tmp.path(), &src, &dst);
}

/// Whether a debug line carries `[<sender id> -> <receiver id>]` (16-32 hex
/// digits each), the orchestrator's session tag.
fn regex_free_session_tag() -> impl Fn(&str) -> bool {
    |line: &str| {
        let hex =
            |s: &str| (16..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
        line.split('[').skip(1).any(|rest| {
            rest.split_once(']')
                .and_then(|(tag, _)| tag.split_once(" -> "))
                .is_some_and(|(a, b)| hex(a) && hex(b))
        })
    }
}

/// Issue 9 fix 12: an upgrade that replaces resync's binary (by rename, as
/// a package manager does) while a chunked run is under way must not change
/// the binary its helpers run. Before the fix the local helpers started
/// from `current_exe()`, which after the rename names "<path> (deleted)" or
/// whatever now sits at the path; now they start from a copy of
/// `/proc/self/exe`, which stays the image the run was started with.
///
/// The run starts from a fresh copy P of the binary; P is replaced by a
/// script that records being run and exits 1 right after `spawn` returned
/// (the kernel has exec'd P by then), so before the run first looks for
/// its own binary (the helper copy is made once per run, when the first
/// step is planned; an upgrade after that could not reach the helpers of
/// either version). The helpers must still start (their session folders
/// appear), the run must succeed, the target must hold the source's
/// snapshot by GUID, and the script must never have run.
fn upgrade_mid_run(src: &str, dst: &str, s_arg: &str, d_arg: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tmpdir();
    let bin_dir = tempfile::Builder::new()
        .prefix("upgrade")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let p = bin_dir.path().join("resync");
    std::fs::copy(resync_bin(), &p).expect("copy the binary");
    let marker = bin_dir.path().join("wrong-binary-ran");
    let upgrade = bin_dir.path().join("resync.new");
    std::fs::write(
        &upgrade,
        format!(
            "#!/bin/sh\necho \"$0 $*\" >> '{}'\necho 'wrong binary' >&2\nexit 1\n",
            marker.display()
        ),
    )
    .expect("write the upgrade");
    for f in [&p, &upgrade] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    create_dataset_with_data(src, &[("a.bin", 12 << 20)]);
    snapshot(src, "first");
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    let mut running = Resync::new(&[
        "--chunked",
        "--chunk-size=1M",
        "--target-bwlimit=2M",
        "--timeout=60s",
        &tmp_arg,
        s_arg,
        d_arg,
    ])
    .program(&p)
    .spawn();
    // The upgrade: P now names another executable.
    std::fs::rename(&upgrade, &p).expect("replace the binary by rename");
    let helpers_ran = wait_until(Duration::from_secs(120), || {
        !sessions(tmp.path()).is_empty() || !running.is_running()
    }) && !sessions(tmp.path()).is_empty();
    let out = running.wait();
    let ran = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(
        ran.is_empty(),
        "the replacement at {} was run: {ran}\n{out}",
        p.display()
    );
    out.assert_success();
    assert!(
        helpers_ran,
        "no session folder appeared after the upgrade:\n{out}"
    );
    let first = snapshots(src)
        .into_iter()
        .find(|(n, _)| n == "first")
        .expect("source @first");
    assert!(
        snapshots(dst).contains(&first),
        "target {dst} lacks @first with GUID {}: {:?}",
        first.1,
        snapshots(dst)
    );
    replica_then_cleanup(tmp.path(), src, dst);
}

/// Local source to local target: both sides' helpers are local copies.
#[test]
fn an_upgrade_of_the_binary_mid_run_does_not_change_the_helpers() {
    let bed = Bed::get();
    let src = bed.ds_a("cupgrade");
    let dst = bed.ds_b("cupgrade");
    upgrade_mid_run(&src, &dst, &src, &dst);
}

/// Local source to a remote target: the local sender's helper is a local
/// copy, the receiver's an upload, both of the image that runs.
#[test]
fn an_upgrade_of_the_binary_mid_push_does_not_change_the_helpers() {
    let bed = Bed::get();
    let src = bed.ds_a("cupgradep");
    let dst = bed.ds_b("cupgradep");
    upgrade_mid_run(&src, &dst, &src, &remote(&bed.host_b, &dst));
}
