//! Default-mode replication on the real test bed: zfs-fuse pools, OpenSSH
//! hosts in network namespaces. Every test asserts what landed on the target
//! (snapshot names with GUIDs, file checksums), not what resync printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bed::*;

fn write_file(ds: &str, name: &str, size: usize) {
    write_files(ds, &[(name, size)]);
}

/// This machine's hostname as resync puts it into sync snapshot names.
fn local_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    raw.trim().replace('_', "-")
}

fn resync_with_home(home: &Path, args: &[&str]) -> Output {
    Resync::new(args)
        .env("HOME", home.to_str().expect("utf-8 path"))
        .run()
}

fn resync_with_env(envs: &[(&str, &str)], args: &[&str]) -> Output {
    envs.iter()
        .fold(Resync::new(args), |r, (k, v)| r.env(k, v))
        .run()
}

/// A copy of the bed's HOME with some files of .ssh/ left out.
fn home_copy_without(leave_out: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let bed = Bed::get();
    let dir = tempfile::tempdir().expect("tempdir");
    let ssh = dir.path().join(".ssh");
    std::fs::create_dir(&ssh).expect("mkdir .ssh");
    for entry in std::fs::read_dir(bed.home.join(".ssh")).expect("read .ssh") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && !leave_out.contains(&name.as_str()) {
            std::fs::copy(entry.path(), ssh.join(&name)).expect("copy");
        }
    }
    let home = dir.path().to_path_buf();
    (dir, home)
}

fn receiving(ds: &str) -> bool {
    zfs_receive_running(ds)
}

/// An iptables rule in a host's namespace that drops incoming TCP RSTs,
/// removed on drop.
pub(crate) struct DropRsts(String);

impl DropRsts {
    const RULE: [&'static str; 8] = [
        "INPUT",
        "-p",
        "tcp",
        "--tcp-flags",
        "RST",
        "RST",
        "-j",
        "DROP",
    ];

    pub(crate) fn on(ns: &str) -> DropRsts {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "iptables", "-I"])
            .args(Self::RULE)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot add the RST-dropping rule in {ns}");
        DropRsts(ns.to_string())
    }
}

impl Drop for DropRsts {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables", "-D"])
            .args(Self::RULE)
            .status();
    }
}

fn wait_for_receive_of(ds: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || receiving(ds)),
        "zfs receive into {ds} never started"
    );
    // Let some of the stream flow.
    std::thread::sleep(Duration::from_millis(700));
}

fn wait_until_no_receive_of(ds: &str) {
    assert!(
        wait_until(Duration::from_secs(120), || !receiving(ds)),
        "a zfs receive into {ds} is still running"
    );
}

/// Snapshots of `ds` as (name, guid), oldest first.
fn snaps(ds: &str) -> Vec<(String, u64)> {
    snapshots(ds)
}

fn names(ds: &str) -> Vec<String> {
    snaps(ds).into_iter().map(|(n, _)| n).collect()
}

fn sync_snaps(ds: &str) -> Vec<String> {
    names(ds)
        .into_iter()
        .filter(|n| n.starts_with("resync_"))
        .collect()
}

/// Where `ssh` is installed, default mode's streams go through OpenSSH's
/// master connection (both directions), and arrive whole.
#[test]
fn streams_go_through_openssh_in_both_directions() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("ossh"));
    let mid = format!("{}/{}", bed.pool_b, unique_name("ossh"));
    let back = format!("{}/{}", bed.pool_a, unique_name("ossh"));
    create_dataset_with_data(&src, &[("a.bin", 3 << 20)]);
    let push = resync(&["--debug", &src, &remote(&bed.host_b, &mid)]);
    push.assert_success();
    assert!(
        push.stderr.contains("stream through OpenSSH's ssh"),
        "{push}"
    );
    assert_replica(&src, &mid);
    let pull = resync(&["--debug", &remote(&bed.host_b, &mid), &back]);
    pull.assert_success();
    assert!(
        pull.stderr.contains("stream through OpenSSH's ssh"),
        "{pull}"
    );
    assert_replica(&mid, &back);
    let other = format!("{}/{}", bed.pool_b, unique_name("ossh"));
    let forced = resync(&[
        "--debug",
        "--ssh-data=libssh2",
        &src,
        &remote(&bed.host_b, &other),
    ]);
    forced.assert_success();
    assert!(!forced.stderr.contains("OpenSSH"), "{forced}");
    assert_replica(&src, &other);
}

#[test]
fn push_full_then_incremental_over_ssh() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("push"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("push"));
    create_dataset_with_data(&src, &[("a.bin", 3 << 20), ("dir/b.bin", 100_000)]);
    snapshot(&src, "first");
    let out = resync(&[&src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert_replica(&src, &dst);
    assert!(names(&dst).contains(&"first".to_string()));
    let first_sync = sync_snaps(&dst);
    assert_eq!(
        first_sync.len(),
        1,
        "one sync snapshot on the target: {first_sync:?}"
    );

    write_file(&src, "c.bin", 2 << 20);
    snapshot(&src, "second");
    std::thread::sleep(Duration::from_millis(1100));
    let out = resync(&[&src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert_replica(&src, &dst);
    assert!(
        names(&dst).contains(&"second".to_string()),
        "-I sends intermediates"
    );
    let now = sync_snaps(&dst);
    assert_eq!(now.len(), 1, "the older sync snapshot was pruned: {now:?}");
    assert_ne!(now, first_sync);
    assert_eq!(
        sync_snaps(&src),
        now,
        "source keeps only the newest sync snapshot"
    );
}

#[test]
fn pull_full_then_incremental_over_ssh() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_b, unique_name("pull"));
    let dst = format!("{}/{}", bed.pool_a, unique_name("pull"));
    create_dataset_with_data(&src, &[("x.bin", 1 << 20)]);
    resync(&[&remote(&bed.host_b, &src), &dst]).assert_success();
    assert_replica(&src, &dst);
    write_file(&src, "y.bin", 500_000);
    std::thread::sleep(Duration::from_millis(1100));
    resync(&[&remote(&bed.host_b, &src), &dst]).assert_success();
    assert_replica(&src, &dst);
}

#[test]
fn remote_to_remote_relays_through_the_orchestrator() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("r2r"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("r2r"));
    create_dataset_with_data(&src, &[("x.bin", 2 << 20)]);
    let (s, d) = (remote(&bed.host_a, &src), remote(&bed.host_b, &dst));
    resync(&[&s, &d]).assert_success();
    assert_replica(&src, &dst);
    write_file(&src, "y.bin", 300_000);
    std::thread::sleep(Duration::from_millis(1100));
    resync(&[&s, &d]).assert_success();
    assert_replica(&src, &dst);
}

/// `zfs receive -v` prints as it receives; with its stdout not read it
/// died of SIGPIPE and a local target failed.
#[test]
fn recvoptions_v_with_a_local_target_succeeds_and_shows_what_zfs_received() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("recvv"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("recvv"));
    create_dataset_with_data(&src, &[("x.bin", 300_000)]);
    snapshot(&src, "s1");
    let out = resync(&["--no-sync-snap", "--recvoptions=v", &src, &dst]);
    out.assert_success();
    assert_replica(&src, &dst);
    assert!(
        out.stderr.contains(&format!("into {dst}@s1")),
        "zfs receive -v's own lines are shown:\n{out}"
    );
}

#[test]
fn local_to_local_full_then_incremental() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("l2l"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("l2l"));
    create_dataset_with_data(&src, &[("x.bin", 1 << 20)]);
    resync(&[&src, &dst]).assert_success();
    assert_replica(&src, &dst);
    write_file(&src, "y.bin", 300_000);
    std::thread::sleep(Duration::from_millis(1100));
    resync(&[&src, &dst]).assert_success();
    assert_replica(&src, &dst);
    let again = resync(&[&src, &dst, "--no-sync-snap"]);
    again.assert_success();
    assert!(again.stderr.contains("up to date"), "{}", again.stderr);
}

#[test]
fn recursive_with_skip_parent_and_exclude() {
    let bed = Bed::get();
    let root = format!("{}/{}", bed.pool_a, unique_name("rec"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("rec"));
    create_dataset_with_data(&root, &[("root.bin", 10_000)]);
    create_dataset_with_data(&format!("{root}/keep"), &[("k.bin", 50_000)]);
    create_dataset_with_data(&format!("{root}/keep/deep"), &[("d.bin", 20_000)]);
    create_dataset_with_data(&format!("{root}/scratch"), &[("s.bin", 20_000)]);

    // Whole tree except scratch.
    resync(&[
        "-r",
        "--exclude-datasets=/scratch$",
        &root,
        &remote(&bed.host_b, &dst),
    ])
    .assert_success();
    assert_replica(&root, &dst);
    assert_replica(&format!("{root}/keep"), &format!("{dst}/keep"));
    assert_replica(&format!("{root}/keep/deep"), &format!("{dst}/keep/deep"));
    assert!(
        !zfs_ok(&["list", &format!("{dst}/scratch")]),
        "scratch was excluded"
    );

    // Children only, into a fresh parent that exists but holds nothing.
    let dst2 = format!("{}/{}", bed.pool_b, unique_name("skip"));
    zfs(&["create", &dst2]);
    resync(&["-r", "--skip-parent", &root, &dst2]).assert_success();
    assert!(snaps(&dst2).is_empty(), "the parent itself was skipped");
    assert_replica(&format!("{root}/keep"), &format!("{dst2}/keep"));
    assert_replica(&format!("{root}/scratch"), &format!("{dst2}/scratch"));
}

#[test]
fn no_sync_snap_sends_up_to_the_newest_existing_snapshot() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("nosync"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("nosync"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    snapshot(&src, "s1");
    write_file(&src, "b", 10_000);
    snapshot(&src, "s2");
    resync(&["--no-sync-snap", &src, &remote(&bed.host_b, &dst)]).assert_success();
    assert_eq!(names(&dst), vec!["s1", "s2"]);
    assert!(sync_snaps(&src).is_empty(), "no sync snapshot was taken");
    assert_eq!(snaps(&src), snaps(&dst));
}

#[test]
fn no_stream_sends_only_the_newest_snapshot() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("nostream"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("nostream"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    snapshot(&src, "s1");
    snapshot(&src, "s2");
    resync(&["--no-sync-snap", "--no-stream", &src, &dst]).assert_success();
    assert_eq!(names(&dst), vec!["s2"], "full send of the newest only");
    snapshot(&src, "s3");
    snapshot(&src, "s4");
    resync(&["--no-sync-snap", "--no-stream", &src, &dst]).assert_success();
    assert_eq!(names(&dst), vec!["s2", "s4"], "-i skips s3");
    assert_replica(&src, &dst);
}

#[test]
fn sync_snapshot_pruning_matches_the_hostname_exactly() {
    let bed = Bed::get();
    let host = local_hostname();
    let src = format!("{}/{}", bed.pool_a, unique_name("prune"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("prune"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    let ours_old = format!("resync_{host}_2020-01-01T00:00:00Z");
    let other_host = format!("resync_{host}2_2020-01-01T00:00:00Z");
    let other_job = format!("resync_nightly_{host}_2020-01-01T00:00:00Z");
    snapshot(&src, &ours_old);
    snapshot(&src, &other_host);
    snapshot(&src, &other_job);
    resync(&[&src, &remote(&bed.host_b, &dst)]).assert_success();
    for ds in [&src, &dst] {
        let n = names(ds);
        assert!(
            !n.contains(&ours_old),
            "our old sync snapshot is pruned on {ds}: {n:?}"
        );
        assert!(
            n.contains(&other_host),
            "{host}2's snapshot survives on {ds}: {n:?}"
        );
        assert!(
            n.contains(&other_job),
            "another identifier's survives on {ds}: {n:?}"
        );
        assert_eq!(sync_snaps(ds).len(), 3, "{n:?}");
    }
}

#[test]
fn a_dataset_name_with_spaces_replicates() {
    let bed = Bed::get();
    let src = format!("{}/{} with space", bed.pool_a, unique_name("sp"));
    let dst = format!("{}/{} also spaced", bed.pool_b, unique_name("sp"));
    create_dataset_with_data(&src, &[("f", 20_000)]);
    resync(&[&src, &remote(&bed.host_b, &dst)]).assert_success();
    assert_replica(&src, &dst);
    resync(&[&remote(&bed.host_b, &dst), &format!("{src} back")]).assert_success();
    assert_replica(&dst, &format!("{src} back"));
}

#[test]
fn hostile_dataset_names_are_refused_before_any_command_runs() {
    let bed = Bed::get();
    // The host is unreachable: had resync tried to connect, it would say so.
    let host = &bed.unused_addr;
    for bad in [
        "pool/a;touch /tmp/pwned",
        "pool/$(touch /tmp/pwned)",
        "pool/a'b",
        "pool/a\"b",
        "pool/a\nb",
        "pool/`id`",
    ] {
        let out = resync(&[bad, &remote(host, "pool/ok")]);
        assert_eq!(out.code, Some(2), "{bad:?}: {}", out.stderr);
        assert!(out.stderr.contains("invalid"), "{bad:?}: {}", out.stderr);
        assert!(
            !out.stderr.contains("connect"),
            "nothing was contacted: {}",
            out.stderr
        );
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
        let out = resync(&[&remote(host, "pool/ok"), bad]);
        assert_eq!(out.code, Some(2), "{bad:?}: {}", out.stderr);
    }
    assert!(!std::path::Path::new("/tmp/pwned").exists());
}

#[test]
fn an_unrelated_target_is_refused_untouched_then_force_delete_replaces_it() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("unrel"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("unrel"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    create_dataset_with_data(&dst, &[("precious", 12_345)]);
    snapshot(&dst, "theirs");
    let before = (snaps(&dst), tree_checksums(&dst));
    let out = resync(&[&src, &remote(&bed.host_b, &dst)]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--force-delete"),
        "names the flag: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("theirs"),
        "lists the target side: {}",
        out.stderr
    );
    assert_eq!(
        (snaps(&dst), tree_checksums(&dst)),
        before,
        "target untouched"
    );

    resync(&["--force-delete", &src, &remote(&bed.host_b, &dst)]).assert_success();
    assert_replica(&src, &dst);
    assert!(!names(&dst).contains(&"theirs".to_string()));
}

#[test]
fn a_same_named_snapshot_with_another_guid_is_a_conflict() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("guid"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("guid"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    snapshot(&src, "daily");
    create_dataset_with_data(&dst, &[("b", 10_000)]);
    snapshot(&dst, "daily");
    let before = snaps(&dst);
    let out = resync(&["--no-sync-snap", &src, &dst]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("GUID") || out.stderr.contains("guid"),
        "{}",
        out.stderr
    );
    assert_eq!(snaps(&dst), before);
}

#[test]
fn a_diverged_target_is_refused_and_force_delete_rolls_it_back() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("div"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("div"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    snapshot(&src, "s1");
    resync(&["--no-sync-snap", &src, &dst]).assert_success();
    snapshot(&dst, "target-only");
    snapshot(&src, "s2");
    let out = resync(&["--no-sync-snap", &src, &dst]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("target-only"), "{}", out.stderr);
    assert_eq!(names(&dst), vec!["s1", "target-only"], "nothing destroyed");
    resync(&["--no-sync-snap", "--force-delete", &src, &dst]).assert_success();
    assert_eq!(names(&dst), vec!["s1", "s2"]);
    assert_replica(&src, &dst);
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("dry"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("dry"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    snapshot(&src, "s1");
    let before = snaps(&src);
    let out = resync(&["--dry-run", &src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert!(out.stdout.contains("would"), "{}", out.stdout);
    assert!(out.stdout.contains("in full"), "{}", out.stdout);
    assert_eq!(snaps(&src), before, "no sync snapshot taken");
    assert!(!zfs_ok(&["list", &dst]), "target not created");
}

#[test]
fn an_unknown_host_key_is_refused_with_a_way_to_accept_it() {
    let bed = Bed::get();
    let (_keep, home) = home_copy_without(&["known_hosts"]);
    let out = resync_with_home(&home, &["tank/x", &remote(&bed.host_b, "pool/y")]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("known_hosts"), "{}", out.stderr);
    assert!(
        out.stderr.contains("--accept-new-host-key"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

#[test]
fn an_ssh_config_alias_is_honoured() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("alias"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("alias"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    // backup-alias -> HostName host B, User root, IdentityFile the bed's key.
    resync(&[&src, &format!("backup-alias:{dst}")]).assert_success();
    assert_replica(&src, &dst);
}

#[test]
fn clear_errors_for_missing_source_unreachable_host_and_wrong_key() {
    let bed = Bed::get();
    let missing = format!("{}/{}", bed.pool_a, unique_name("missing"));
    let out = resync(&[&missing, &format!("{}/x", bed.pool_b)]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    let out = resync(&[
        "--timeout=5s",
        &format!("{}/x", bed.pool_a),
        &remote(&bed.unused_addr, "p/x"),
    ]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("connect"), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    let (_keep, home) = home_copy_without(&["id_ed25519", "id_ed25519.pub"]);
    let wrong = home.join("wrong_key");
    std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&wrong)
        .status()
        .expect("ssh-keygen");
    let out = resync_with_home(
        &home,
        &[
            "--sshkey",
            wrong.to_str().unwrap(),
            &format!("{}/x", bed.pool_a),
            &remote(&bed.host_b, "p/x"),
        ],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot log in"), "{}", out.stderr);
    assert!(
        out.stderr.contains("wrong_key"),
        "names the key it tried: {}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    for args in [
        vec!["onlyone"],
        vec!["--timeout=never", "a/b", "c/d"],
        vec!["--bogus", "a/b", "c/d"],
    ] {
        let out = resync(&args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
    }
    let help = resync(&["--help"]);
    help.assert_success();
    for word in ["Push", "Pull", "cron"] {
        assert!(help.stdout.contains(word), "--help shows a {word} example");
    }
}

#[test]
fn a_zfs_receive_that_lies_about_success_is_caught() {
    // A wrapper around the real zfs that swallows the stream and exits 0 on
    // `receive`: resync must not report success on the empty target.
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("liar"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("liar"));
    create_dataset_with_data(&src, &[("a", 100_000)]);
    let dir = tempfile::tempdir().unwrap();
    let real = which::which("zfs").unwrap();
    let wrapper = dir.path().join("zfs");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = receive ]; then cat >/dev/null; exit 0; fi\nexec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = resync_with_env(&[("PATH", &path)], &[&src, &dst]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("verification failed"), "{}", out.stderr);
    assert!(!zfs_ok(&["list", &dst]));
}

#[test]
fn a_killed_transfer_leaves_a_target_the_next_run_completes() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("kill"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("kill"));
    create_dataset_with_data(&src, &[("a", 1 << 20)]);
    resync(&[&src, &remote(&bed.host_b, &dst)]).assert_success();
    let before = snaps(&dst);
    // A big incremental, killed while it streams.
    write_file(&src, "big", 40 << 20);
    std::thread::sleep(Duration::from_millis(1100));
    // Paced, so the kill always lands mid-stream.
    let run = Resync::new(&["--target-bwlimit=8M", &src, &remote(&bed.host_b, &dst)]).spawn();
    wait_for_receive_of(&dst);
    run.signal(libc::SIGKILL);
    let out = run.wait();
    assert!(!out.success(), "a killed run never reports success: {out}");
    // The partial incremental was not taken for a finished one.
    wait_until_no_receive_of(&dst);
    assert_eq!(
        snaps(&dst),
        before,
        "the target is at its old snapshot, not a partial one"
    );
    resync(&[&src, &remote(&bed.host_b, &dst)]).assert_success();
    assert_replica(&src, &dst);
}

/// The control connection (libssh2, with `TCP_USER_TIMEOUT`) carries the
/// stream: its orphaned receive lives on after the cut, as it would for
/// hours after a real cut whose client machine rebooted, and the next run
/// must stop it by itself.
#[test]
fn a_cut_link_fails_the_run_and_the_next_run_completes() {
    cut_link_then_rerun("--ssh-data=libssh2");
}

/// The same cut with the stream on OpenSSH's master connection (the
/// default where `ssh` is installed): the run fails the same way, leaves
/// nothing partial, its orphan stays recorded, and the next run stops it
/// and completes.
#[test]
fn a_cut_link_under_openssh_fails_the_run_and_the_next_run_completes() {
    cut_link_then_rerun("--ssh-data=auto");
}

fn cut_link_then_rerun(data_path: &str) {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("cut"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("cut"));
    create_dataset_with_data(&src, &[("big", 40 << 20)]);
    let net = exclusive_network();
    // Once the link is back, host B's sshd would get a RST for the dead
    // connection and end the orphan by itself, racing the rerun. Host B
    // drops incoming RSTs while this test runs (it holds the network), so
    // the orphan lives until the rerun stops it, as it would for hours
    // after a real cut whose client machine rebooted.
    let _no_rst = DropRsts::on(&bed.ns_b);
    // Paced at 8 MiB/s, so the cut always lands mid-stream.
    let run = Resync::new(&[
        "--timeout=5s",
        "--target-bwlimit=8M",
        data_path,
        &src,
        &remote(&bed.host_b, &dst),
    ])
    .timeout(Duration::from_secs(90))
    .spawn();
    wait_for_receive_of(&dst);
    let out = {
        let _cut = link_down(&bed.host_b);
        run.wait()
    };
    drop(net);
    assert!(!out.timed_out, "resync gave up by itself: {out}");
    assert_eq!(out.code, Some(2), "a cut run fails with exit 2: {out}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out}");
    assert!(
        !snaps(&dst).iter().any(|(n, _)| n.starts_with("resync_")),
        "no partial snapshot on the target"
    );
    // The remote zfs receive outlives the dead connection (sshd cannot
    // tell); the next run must stop it by itself and then complete. Under
    // OpenSSH, whose socket has no user timeout, the closed connection's
    // FIN may still reach host B once the link is back (or the kernel gives
    // up on it first): then sshd ends the receive itself. Either way the
    // next run completes; give that FIN its chance first.
    let orphan_stays = match data_path {
        "--ssh-data=libssh2" => true,
        _ => {
            std::thread::sleep(Duration::from_secs(10));
            receiving(&dst)
        }
    };
    assert_eq!(
        receiving(&dst),
        orphan_stays,
        "the orphaned receive is still there before the rerun"
    );
    let rerun = resync(&[data_path, &src, &remote(&bed.host_b, &dst)]);
    rerun.assert_success();
    assert_eq!(
        rerun.stderr.contains("stopped a zfs process"),
        orphan_stays,
        "{rerun}"
    );
    assert!(!receiving(&dst));
    assert_replica(&src, &dst);
}

#[test]
fn a_second_run_to_the_same_target_is_refused_while_the_first_runs() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("twice"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("twice"));
    create_dataset_with_data(&src, &[("big", 40 << 20)]);
    let first = Resync::new(&["--target-bwlimit=8M", &src, &remote(&bed.host_b, &dst)]).spawn();
    wait_for_receive_of(&dst);
    let second = resync(&[&src, &remote(&bed.host_b, &dst)]);
    assert_eq!(second.code, Some(2), "{second}");
    assert!(
        second
            .stderr
            .contains(&format!("another resync run (pid {}", first.pid())),
        "names the running one: {second}"
    );
    assert_eq!(second.stderr.trim().lines().count(), 1, "{second}");
    first.wait().assert_success();
    assert_replica(&src, &dst);
}

#[test]
fn a_recursive_run_with_one_failing_dataset_exits_1_and_replicates_the_rest() {
    let bed = Bed::get();
    let root = format!("{}/{}", bed.pool_a, unique_name("part"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("part"));
    create_dataset_with_data(&root, &[("r", 10_000)]);
    create_dataset_with_data(&format!("{root}/good"), &[("g", 10_000)]);
    create_dataset_with_data(&format!("{root}/bad"), &[("b", 10_000)]);
    create_dataset_with_data(&format!("{root}/bad/child"), &[("c", 10_000)]);
    create_dataset_with_data(&format!("{root}/later"), &[("l", 10_000)]);
    // The target holds the root already, and an unrelated `bad`: a conflict
    // for that one (and so its child) only.
    resync(&[&root, &remote(&bed.host_b, &dst)]).assert_success();
    create_dataset_with_data(&format!("{dst}/bad"), &[("theirs", 5_000)]);
    snapshot(&format!("{dst}/bad"), "theirs");
    let out = resync(&["-r", &root, &remote(&bed.host_b, &dst)]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("2 of 5 datasets failed"), "{out}");
    assert!(
        out.stderr.contains("/bad/child") && out.stderr.contains("parent"),
        "{out}"
    );
    assert_replica(&root, &dst);
    assert_replica(&format!("{root}/good"), &format!("{dst}/good"));
    assert_replica(&format!("{root}/later"), &format!("{dst}/later"));
    assert_eq!(
        names(&format!("{dst}/bad")),
        vec!["theirs"],
        "the conflicting one is untouched"
    );
}

#[test]
fn quiet_prints_nothing_on_success_and_the_error_on_failure() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("quiet"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("quiet"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    let out = resync(&["--quiet", &src, &remote(&bed.host_b, &dst)]);
    out.assert_success();
    assert_eq!(out.stderr, "", "{out}");
    assert_eq!(out.stdout, "", "{out}");
    assert_replica(&src, &dst);
    let out = resync(&[
        "--quiet",
        &format!("{src}-missing"),
        &remote(&bed.host_b, &dst),
    ]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("does not exist"), "{out}");
}

#[test]
fn no_rollback_refuses_to_discard_changes_made_on_the_target() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("norb"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("norb"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    resync(&[&src, &dst]).assert_success();
    write_file(&dst, "local-change", 1_000);
    write_file(&src, "b", 10_000);
    std::thread::sleep(Duration::from_millis(1100));
    let out = resync(&["--no-rollback", &src, &dst]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("zfs receive failed"), "{out}");
    assert!(
        tree_checksums(&dst).contains_key("local-change"),
        "the change survives"
    );
    // Without --no-rollback, -F discards it (syncoid's default too).
    resync(&[&src, &dst]).assert_success();
    assert_replica(&src, &dst);
}

#[test]
fn a_sync_snapshot_name_already_taken_this_second_is_not_an_error() {
    let bed = Bed::get();
    let src = format!("{}/{}", bed.pool_a, unique_name("collide"));
    let dst = format!("{}/{}", bed.pool_b, unique_name("collide"));
    create_dataset_with_data(&src, &[("a", 10_000)]);
    // Take the names a run would use this second and the next.
    let host = local_hostname();
    let now = std::time::SystemTime::now();
    let taken: Vec<String> = [0, 1]
        .iter()
        .map(|s| {
            let t = now + Duration::from_secs(*s);
            format!("resync_{host}_{}", humantime::format_rfc3339_seconds(t))
        })
        .collect();
    for name in &taken {
        snapshot(&src, name);
    }
    let out = resync(&[&src, &dst]);
    out.assert_success();
    let ours = sync_snaps(&dst);
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert!(
        !taken.contains(&ours[0]),
        "a fresh name: {ours:?} vs {taken:?}"
    );
    assert_replica(&src, &dst);
}
