//! `--chunked` runs that restart: the orchestrator killed with SIGKILL and
//! run again while its helpers live (it re-attaches and does not start
//! over), helpers killed (the next run starts the step over and never takes
//! a partial target for done), a second run while one is active (refused,
//! naming the session, its host and its age), and stale session folders
//! (removed by the next helper, unless a live process holds them). Session
//! folders live in a private `--tmpdir` under /var/tmp, which the bed's
//! hosts share with this process, so the test reads them directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bed::*;
use crate::chunked::{assert_no_sessions_left, cleanup, sessions, tmpdir};

/// A session folder's `role` (from its `session` manifest), if it has one.
fn role(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("session")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("role ").map(str::to_string))
}

/// The session folder of `role` in `tmp`, once there is one.
fn folder(tmp: &Path, which: &str) -> Option<PathBuf> {
    sessions(tmp)
        .into_iter()
        .find(|d| role(d).as_deref() == Some(which))
}

/// The receiver's `progress`: the next chunk it expects.
fn next_chunk(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("progress"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("next ").and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// The pid a helper wrote into its folder's `lock`.
fn helper_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("lock"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no helper pid in {}/lock", dir.display()))
}

fn alive(pid: u32) -> bool {
    // Zombies are dead too (the bed's init reaps them late).
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) with a pid we read from a helper's lock file.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pid)),
        "pid {pid} survived SIGKILL"
    );
}

/// Whether a process holds `path` locked (flock), asked with flock(1).
fn locked(path: &Path) -> bool {
    !std::process::Command::new("flock")
        .args(["-n", "-E", "99"])
        .arg(path)
        .arg("true")
        .status()
        .expect("flock(1)")
        .success()
}

/// The orchestrator is gone: its owner lock must be free soon (sshd closes
/// the channel of a client that is gone; `__chunk-own` sees EOF).
#[track_caller]
fn assert_owner_released(rdir: &Path) {
    assert!(
        wait_until(Duration::from_secs(20), || !locked(&rdir.join("owner"))),
        "the owner lock outlived the orchestrator"
    );
}

/// The session id of a folder `.../resync-ID`.
fn session_id(dir: &Path) -> String {
    let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
    name.strip_prefix("resync-")
        .expect("session folder")
        .to_string()
}

/// Waits until a chunked push has a receiver folder whose `progress` is at
/// chunk `n` or more; returns that folder.
fn wait_for_chunks(tmp: &Path, n: u64) -> PathBuf {
    let mut found = None;
    let ok = wait_until(Duration::from_secs(120), || {
        found = folder(tmp, "receiver").filter(|d| next_chunk(d) >= n);
        found.is_some()
    });
    assert!(ok, "the receiver never got {n} chunks: {:?}", sessions(tmp));
    found.expect("receiver folder")
}

/// A chunked push from pool A to host B with its own `--tmpdir`: a source
/// dataset with one file of `size` bytes, and the run's arguments.
struct Push {
    tmp: tempfile::TempDir,
    src: String,
    dst: String,
    args: Vec<String>,
}

impl Push {
    fn new(prefix: &str, size: usize, extra: &[&str]) -> Push {
        let bed = Bed::get();
        let tmp = tmpdir();
        let src = bed.ds_a(prefix);
        let dst = bed.ds_b(prefix);
        create_dataset_with_data(&src, &[("a.bin", size)]);
        let mut args: Vec<String> = ["--chunked", "--chunk-size=1M", "--debug"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(format!("--tmpdir={}", tmp.path().display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(src.clone());
        args.push(remote(&bed.host_b, &dst));
        Push {
            tmp,
            src,
            dst,
            args,
        }
    }

    fn resync(&self) -> Resync {
        let a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Resync::new(&a)
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The target is a replica, no session folder is left; then both
    /// datasets go.
    #[track_caller]
    fn finish(self) {
        assert_replica(&self.src, &self.dst);
        assert_no_sessions_left(self.dir());
        cleanup(&self.src);
        cleanup(&self.dst);
    }
}

/// The number after `key` in the rerun's "re-attached session" line.
fn reattached(stderr: &str, key: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains("re-attached session"))
        .unwrap_or_else(|| panic!("no re-attached line in:\n{stderr}"));
    line.split(key)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
}

#[test]
fn orchestrator_killed_mid_transfer_the_rerun_reattaches_and_does_not_start_over() {
    let p = Push::new(
        "rkill",
        12 << 20,
        &["--timeout=120s", "--target-bwlimit=3M"],
    );
    let first = p.resync().spawn();
    let rdir = wait_for_chunks(p.dir(), 3);
    let id = session_id(&rdir);
    let receiver = helper_pid(&rdir);
    first.signal(libc::SIGKILL);
    let out = first.wait();
    assert_eq!(out.signal, Some(libc::SIGKILL), "{out}");
    // The helpers live on; the owner lock goes with the orchestrator.
    assert!(
        alive(receiver),
        "the receiver helper died with the orchestrator"
    );
    assert_owner_released(&rdir);

    let second = p.resync().run();
    second.assert_success();
    assert!(
        second
            .stderr
            .contains(&format!("re-attaching to chunk session {id}")),
        "{second}"
    );
    assert_eq!(
        reattached(&second.stderr, "receiver helper pid "),
        u64::from(receiver),
        "the same receiver helper finished the stream"
    );
    let copied = reattached(&second.stderr, "copied ");
    let stream = reattached(&second.stderr, "stream ");
    eprintln!(
        "re-attached: copied {copied} of a {stream}-byte stream; rerun took {:?}:\n{}",
        second.elapsed, second.stderr
    );
    assert!(stream > 12 << 20, "the whole stream was received: {stream}");
    assert!(
        copied * 4 < stream * 3,
        "the rerun copied {copied} of {stream} bytes: it started over"
    );
    p.finish();
}

/// The rerun names another source for the same target: the live session
/// no longer fits, so it is cancelled with a line saying why, and the run
/// plans from scratch.
#[test]
fn a_session_that_no_longer_fits_is_cancelled_and_the_run_plans_from_scratch() {
    let p = Push::new("rfit", 10 << 20, &["--timeout=120s", "--target-bwlimit=2M"]);
    let first = p.resync().spawn();
    let rdir = wait_for_chunks(p.dir(), 1);
    let id = session_id(&rdir);
    let receiver = helper_pid(&rdir);
    first.signal(libc::SIGKILL);
    first.wait();
    assert_owner_released(&rdir);

    let other = Bed::get().ds_a("rfit-other");
    create_dataset_with_data(&other, &[("b.bin", 1 << 20)]);
    let mut args: Vec<&str> = p.args.iter().map(String::as_str).collect();
    let n = args.len();
    args[n - 2] = &other;
    let out = Resync::new(&args).run();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!(
            "cancelling chunk session {id}: it sends local:{}",
            p.src
        )),
        "{out}"
    );
    assert!(!out.stderr.contains("re-attaching"), "{out}");
    assert!(!alive(receiver), "the cancelled receiver helper is gone");
    assert_replica(&other, &p.dst);
    assert_no_sessions_left(p.dir());
    cleanup(&other);
    cleanup(&p.src);
    cleanup(&p.dst);
}

/// Fix 10 of issue 9: the rerun says `--recvoptions=v`, so its `zfs
/// receive` differs from the one the live session was started with. The
/// session's step still fits, but re-attaching would finish the old receive
/// with the old options: the session is cancelled with a line saying why,
/// and the run plans from scratch with its own options. (`--no-rollback`
/// no longer makes a difference here: a full stream never gets `-F`.)
#[test]
fn a_rerun_with_other_receive_options_cancels_the_old_session() {
    let p = Push::new(
        "rargv",
        10 << 20,
        &["--timeout=120s", "--target-bwlimit=2M"],
    );
    let first = p.resync().spawn();
    let rdir = wait_for_chunks(p.dir(), 1);
    let id = session_id(&rdir);
    let receiver = helper_pid(&rdir);
    first.signal(libc::SIGKILL);
    first.wait();
    assert_owner_released(&rdir);

    let mut args: Vec<&str> = p.args.iter().map(String::as_str).collect();
    args.insert(0, "--recvoptions=v");
    let out = Resync::new(&args).run();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!(
            "cancelling chunk session {id}: it was started with other zfs send/receive options"
        )),
        "{out}"
    );
    assert!(!out.stderr.contains("re-attaching"), "{out}");
    assert!(!alive(receiver), "the cancelled receiver helper is gone");
    p.finish();
}

#[test]
fn sender_helper_killed_the_run_stops_at_once_and_the_next_run_completes() {
    let p = Push::new(
        "rsend",
        10 << 20,
        // A window of 2 keeps the sender mid-stream when it is killed: with
        // the default 8 it may have staged all 10 chunks and `end` already,
        // and then the run rightly completes without it.
        &[
            "--timeout=60s",
            "--target-bwlimit=3M",
            "--no-sync-snap",
            "--chunk-window=2",
        ],
    );
    snapshot(&p.src, "only");
    let first = p.resync().spawn();
    wait_for_chunks(p.dir(), 2);
    let sdir = folder(p.dir(), "sender").expect("sender folder");
    kill9(helper_pid(&sdir));
    let killed = std::time::Instant::now();
    let out = first.wait();
    out.assert_failure();
    assert!(
        out.stderr.contains("the chunk sender on local died"),
        "{out}"
    );
    // The error ends with the dead helper's last log lines.
    assert!(
        out.stderr.contains("its log ends: resync sender ["),
        "no helper log in the error: {out}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "noticed the dead helper only after {:?}, not long before --timeout",
        killed.elapsed()
    );
    assert!(
        !has_snapshot(&p.dst, "only"),
        "a partial target shows the snapshot"
    );
    // The dead sender's folder was removed, the receiver was cancelled.
    assert_no_sessions_left(p.dir());

    p.resync().run().assert_success();
    p.finish();
}

/// Whether `ds@name` exists (a partial receive may vanish as we look).
fn has_snapshot(ds: &str, name: &str) -> bool {
    std::process::Command::new("zfs")
        .args(["list", "-H", "-o", "name"])
        .arg(format!("{ds}@{name}"))
        .output()
        .expect("zfs list")
        .status
        .success()
}

#[test]
fn all_processes_killed_with_chunks_staged_the_next_run_starts_the_step_over() {
    let p = Push::new(
        "rdead",
        10 << 20,
        &["--timeout=60s", "--target-bwlimit=2M", "--no-sync-snap"],
    );
    snapshot(&p.src, "only");
    let first = p.resync().spawn();
    let rdir = wait_for_chunks(p.dir(), 2);
    let sdir = folder(p.dir(), "sender").expect("sender folder");
    let id = session_id(&rdir);
    first.signal(libc::SIGKILL);
    first.wait();
    kill9(helper_pid(&rdir));
    kill9(helper_pid(&sdir));
    let staged = std::fs::read_dir(&sdir)
        .expect("sender folder")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("chunk-"))
        .count();
    assert!(staged > 0, "no chunks were left staged");
    assert!(
        wait_until(Duration::from_secs(30), || !zfs_receive_running(&p.dst)),
        "zfs receive outlived its helper"
    );
    assert!(
        !has_snapshot(&p.dst, "only"),
        "a partial target shows the snapshot"
    );
    assert_owner_released(&rdir);

    let second = p.resync().run();
    second.assert_success();
    assert!(
        second
            .stderr
            .contains(&format!("removed chunk session {id}"))
            && second.stderr.contains("the step starts over"),
        "{second}"
    );
    assert!(!rdir.exists() && !sdir.exists(), "dead folders are removed");
    p.finish();
}

#[test]
fn a_second_run_to_an_active_target_is_refused_naming_session_host_and_age() {
    let p = Push::new(
        "rtwice",
        10 << 20,
        &["--timeout=60s", "--target-bwlimit=2M"],
    );
    let target = remote(&Bed::get().host_b, &p.dst);
    // Three runs overlap: hold the network so that a link cut elsewhere
    // cannot hold the later ones back until the first is done.
    let net = exclusive_network();
    let first = p.resync().spawn();
    let rdir = wait_for_chunks(p.dir(), 1);
    let id = session_id(&rdir);
    let pid = first.pid();
    assert!(
        locked(&rdir.join("owner")),
        "the running orchestrator owns it"
    );

    // From this machine: its run lock refuses, and names the session.
    let same = p.resync().run();
    same.assert_failure();
    assert!(
        same.stderr
            .contains(&format!("is being replicated by session {id} on "))
            && same.stderr.contains(&format!("ago by resync pid {pid}")),
        "{same}"
    );
    // From another machine (which has its own run lock): the session's
    // owner lock on the target refuses.
    let other_locks = tempfile::tempdir().expect("tempdir");
    let other = p
        .resync()
        .env(
            "RESYNC_LOCK_DIR",
            other_locks.path().to_str().expect("utf-8"),
        )
        .run();
    other.assert_failure();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert!(
        other.stderr.contains(&format!(
            "refused: {target} is being replicated by session {id} (started "
        )) && other.stderr.contains(&format!(
            " ago by resync pid {pid} on host {}); wait for it or stop it",
            host.trim()
        )),
        "{other}"
    );
    assert_eq!(
        snapshots(&p.src).len(),
        1,
        "a refused run takes no sync snapshot"
    );
    first.wait().assert_success();
    drop(net);
    p.finish();
}

/// A folder `resync-ID` in `tmp`, private, with a `lock` and a chunk file,
/// last changed two hours ago unless `fresh`.
fn fake_session(tmp: &Path, id: &str, fresh: bool) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let d = tmp.join(format!("resync-{id}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&d)
        .expect("mkdir");
    std::fs::write(d.join("lock"), "1\n").expect("lock");
    std::fs::write(d.join("chunk-000000000000"), "x").expect("chunk");
    if !fresh {
        let ok = std::process::Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(&d)
            .status()
            .expect("touch")
            .success();
        assert!(ok);
    }
    d
}

#[test]
fn stale_session_folders_are_removed_by_the_next_helper_but_not_active_or_young_ones() {
    let p = Push::new("rstale", 1 << 20, &[]);
    let stale = fake_session(p.dir(), "5a1e000000000001", false);
    let active = fake_session(p.dir(), "ac71e00000000002", false);
    let young = fake_session(p.dir(), "0000000000000003", true);
    // Held by this process (a child holding it could outlive the test).
    let holder = std::fs::OpenOptions::new()
        .write(true)
        .open(active.join("lock"))
        .expect("open the active folder's lock");
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0, "flock {}", active.join("lock").display());
    }
    assert!(locked(&active.join("lock")));
    p.resync().run().assert_success();
    drop(holder);
    assert!(!stale.exists(), "a stale folder is removed");
    assert!(active.exists(), "a locked folder is left alone");
    assert!(
        young.exists(),
        "a folder younger than a minute is left alone"
    );
    assert_eq!(sessions(p.dir()).len(), 2, "{:?}", sessions(p.dir()));
    for d in [active, young] {
        std::fs::remove_dir_all(d).expect("remove test folder");
    }
    p.finish();
}

/// OpenZFS keeps a resume token when the receiver helper dies: the next
/// chunked run removes the dead session and resumes from the token
/// (`zfs send -t` into `zfs receive -s`, through new helpers) instead of
/// sending the increment again.
#[test]
fn openzfs_helpers_killed_the_next_chunked_run_resumes_from_the_token() {
    use crate::openzfs::{summary_bytes, Guest, POOL_S, POOL_T};
    let g = Guest::get();
    let name = unique_name("ctoken");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 2M /dev/urandom > /{src}/base && zfs snapshot {src}@s1"
    ));
    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let chunked = ["--chunked", "--chunk-size=1M", "--no-sync-snap", "--debug"];
    let with = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = chunked.iter().map(|a| a.to_string()).collect();
        v.extend(extra.iter().map(|a| a.to_string()));
        v.extend([s.clone(), d.clone()]);
        v
    };
    let run = |v: Vec<String>| {
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        g.resync(&a)
    };
    run(with(&[])).run().assert_success();
    g.sh(&format!(
        "head -c 16M /dev/urandom > /{src}/more && zfs snapshot {src}@s2"
    ));
    let first = run(with(&["--target-bwlimit=2M", "--timeout=120s"])).spawn();
    let helper = format!("[_]_chunk-recv .*{dst}");
    assert!(
        wait_until(Duration::from_secs(180), || g
            .sh(&format!(
                "pgrep -f '{helper}' >/dev/null && echo yes || true"
            ))
            .contains("yes")),
        "the receiver helper never started"
    );
    std::thread::sleep(Duration::from_secs(4));
    first.signal(libc::SIGKILL);
    first.wait();
    g.sh(&format!(
        "pkill -9 -f '[_]_chunk-(send|recv) .*{name}' ; true"
    ));
    assert!(
        wait_until(Duration::from_secs(60), || !g
            .sh(&format!(
                "pgrep -f '[z]fs receive.*{dst}' >/dev/null && echo yes || true"
            ))
            .contains("yes")),
        "zfs receive outlived its helper"
    );
    let token = g.sh(&format!("zfs get -H -o value receive_resume_token {dst}"));
    assert!(
        token.trim().starts_with("1-"),
        "a resume token was kept: {token:?}"
    );
    assert_eq!(g.snaps(&dst).len(), 1, "s2 is not on the target yet");

    let out = run(with(&[])).run();
    out.assert_success();
    assert!(
        out.stderr.contains("removed chunk session")
            && out.stderr.contains("resuming an interrupted receive"),
        "{out}"
    );
    let sent = summary_bytes(&out.stderr);
    let increment = 16.0 * 1024.0 * 1024.0;
    assert!(
        sent > 0.0 && sent < 0.9 * increment,
        "resumed, not re-sent: {sent} bytes of a {increment}-byte increment\n{out}"
    );
    assert_eq!(g.snaps(&src), g.snaps(&dst));
    assert_eq!(g.md5s(&src), g.md5s(&dst));
    g.sh(&format!("zfs destroy -r {src}; zfs destroy -r {dst}"));
}
