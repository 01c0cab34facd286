//! Hosts reached as a user who is not root, on the real test bed: the bed
//! gives host B the users rsbackup (sudo without a password for zfs and
//! zpool only), rspasswd (sudo that wants a password) and rsnosudo (no
//! sudo rights). resync must run `zfs` there through `sudo -n`, in both
//! modes, keep the chunk helpers and their files with the user, and turn
//! a refusal into one line that says what to configure.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::bed::*;
use crate::chunked::{assert_no_sessions_left, cleanup, tmpdir};

const SUDO_USER: &str = "rsbackup";
const PASSWD_USER: &str = "rspasswd";
const NOSUDO_USER: &str = "rsnosudo";

fn on_b(user: &str) -> String {
    format!("{user}@{}", Bed::get().host_b)
}

/// A `--tmpdir` both sides can use, as /tmp is: world-writable and sticky.
fn shared_tmpdir() -> tempfile::TempDir {
    let dir = tmpdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod 1777");
    dir
}

fn uid_of(user: &str) -> String {
    ssh(&on_b(user), "id -u").trim().to_string()
}

/// The lines of stderr that are not progress or warnings: the error.
fn error_lines(out: &Output) -> Vec<&str> {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("resync: error:"))
        .collect()
}

/// Full, then incremental, between `s_arg` and `d_arg`; `extra` options.
fn full_then_incremental(src: &str, dst: &str, s_arg: &str, d_arg: &str, extra: &[&str]) {
    create_dataset_with_data(src, &[("a.bin", 3 << 20), ("dir/b.bin", 200_000)]);
    snapshot(src, "first");
    let run = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend_from_slice(&[s_arg, d_arg]);
        resync(&args).assert_success();
    };
    run(extra);
    assert_replica(src, dst);
    write_files(src, &[("c.bin", 1 << 20)]);
    snapshot(src, "second");
    std::thread::sleep(Duration::from_millis(1100));
    run(extra);
    assert_replica(src, dst);
    assert!(snapshots(dst).iter().any(|(n, _)| n == "second"));
}

#[test]
fn sudo_push_to_a_non_root_user_replicates() {
    let bed = Bed::get();
    let src = bed.ds_a("sudopush");
    let dst = bed.ds_b("sudopush");
    let d_arg = remote(&on_b(SUDO_USER), &dst);
    full_then_incremental(&src, &dst, &src, &d_arg, &[]);
    cleanup(&src);
    cleanup(&dst);
}

#[test]
fn sudo_pull_from_a_non_root_user_replicates() {
    let bed = Bed::get();
    let src = bed.ds_b("sudopull");
    let dst = bed.ds_a("sudopull");
    let s_arg = remote(&on_b(SUDO_USER), &src);
    full_then_incremental(&src, &dst, &s_arg, &dst, &[]);
    cleanup(&src);
    cleanup(&dst);
}

/// The helpers on B run as the user: its binary goes to its own private
/// folder, and no session folder is left behind.
fn chunked_with_sudo(src: &str, dst: &str, s_arg: &str, d_arg: &str) {
    let tmp = shared_tmpdir();
    let tmp_arg = format!("--tmpdir={}", tmp.path().display());
    full_then_incremental(
        src,
        dst,
        s_arg,
        d_arg,
        &["--chunked", "--chunk-size=1M", &tmp_arg],
    );
    assert_no_sessions_left(tmp.path());
    let private = tmp.path().join(format!("resync-bin-{}", uid_of(SUDO_USER)));
    let owner = ssh(
        &on_b(SUDO_USER),
        &format!("stat -c %U {}", private.display()),
    );
    assert_eq!(
        owner.trim(),
        SUDO_USER,
        "{} belongs to the user",
        private.display()
    );
    cleanup(src);
    cleanup(dst);
}

#[test]
fn sudo_chunked_push_to_a_non_root_user_replicates() {
    let bed = Bed::get();
    let src = bed.ds_a("sudocpush");
    let dst = bed.ds_b("sudocpush");
    let d_arg = remote(&on_b(SUDO_USER), &dst);
    chunked_with_sudo(&src, &dst, &src, &d_arg);
}

#[test]
fn sudo_chunked_pull_from_a_non_root_user_replicates() {
    let bed = Bed::get();
    let src = bed.ds_b("sudocpull");
    let dst = bed.ds_a("sudocpull");
    let s_arg = remote(&on_b(SUDO_USER), &src);
    chunked_with_sudo(&src, &dst, &s_arg, &dst);
}

/// `user` on B cannot get zfs through `sudo -n`: one error line naming the
/// host, the command and the sudoers line; the target is untouched.
fn refused(user: &str) {
    let bed = Bed::get();
    let src = bed.ds_a("sudono");
    let dst = bed.ds_b("sudono");
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    snapshot(&src, "first");
    let out = resync(&[&src, &remote(&on_b(user), &dst)]);
    out.assert_failure();
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "one error line:\n{out}");
    let line = lines[0];
    for want in [
        &format!("on {}:", on_b(user)) as &str,
        "sudo wants a password to run zfs",
        &format!("'{user} ALL=(root) NOPASSWD: /usr/sbin/zfs, /usr/sbin/zpool'"),
        "--no-privilege-elevation",
    ] {
        assert!(line.contains(want), "{want:?} in:\n{out}");
    }
    assert!(!exists(&dst), "the target was not touched");
    cleanup(&src);
}

#[test]
fn sudo_user_without_sudo_rights_gets_one_line_and_the_target_is_untouched() {
    refused(NOSUDO_USER);
}

#[test]
fn sudo_that_wants_a_password_gets_one_line_and_the_target_is_untouched() {
    refused(PASSWD_USER);
}

/// `--no-privilege-elevation` runs zfs as the user itself: no command goes
/// through sudo, and zfs-fuse (no delegation; its socket is root's)
/// refuses, so the run fails before it changes anything.
#[test]
fn sudo_no_privilege_elevation_runs_zfs_as_the_user() {
    let bed = Bed::get();
    let src = bed.ds_a("sudonoelev");
    let dst = bed.ds_b("sudonoelev");
    create_dataset_with_data(&src, &[("a.bin", 100_000)]);
    snapshot(&src, "first");
    let out = resync(&[
        "--debug",
        "--no-privilege-elevation",
        &src,
        &remote(&on_b(SUDO_USER), &dst),
    ]);
    out.assert_failure();
    assert!(
        !out.stderr.contains("sudo -n"),
        "no command went through sudo:\n{out}"
    );
    assert!(!exists(&dst), "the target was not touched");
    cleanup(&src);
}

/// A cut link leaves `sudo -n zfs receive` running on B as the user's
/// orphan (sshd cannot tell the client is gone); the next run, as the same
/// user, stops it (the user may signal its own sudo, which passes the
/// signal on to zfs) and completes.
#[test]
fn sudo_a_cut_link_leaves_a_receive_that_the_next_run_stops() {
    let bed = Bed::get();
    let src = bed.ds_a("sudocut");
    let dst = bed.ds_b("sudocut");
    let d_arg = remote(&on_b(SUDO_USER), &dst);
    create_dataset_with_data(&src, &[("big", 40 << 20)]);
    let net = exclusive_network();
    // As in replication.rs: host B drops RSTs, so the orphan lives on.
    let _no_rst = crate::replication::DropRsts::on(&bed.ns_b);
    // The stream on libssh2 (TCP_USER_TIMEOUT): over OpenSSH, the closed
    // connection's FIN may reach host B after the cut and end the orphan
    // itself (see replication.rs's cut tests).
    // --debug: should the stream ever outrun its limit again (CI saw 40 MiB
    // cross in 1.0 s once), the failure shows the limit and the commands.
    let run = Resync::new(&[
        "--debug",
        "--timeout=5s",
        "--target-bwlimit=8M",
        "--ssh-data=libssh2",
        &src,
        &d_arg,
    ])
    .timeout(Duration::from_secs(90))
    .spawn();
    assert!(
        wait_until(Duration::from_secs(60), || zfs_receive_running(&dst)),
        "the receive never started"
    );
    let out = {
        let _cut = link_down(&bed.host_b);
        run.wait()
    };
    drop(net);
    assert_eq!(out.code, Some(2), "a cut run fails with exit 2: {out}");
    assert!(zfs_receive_running(&dst), "the orphaned receive lives on");
    let rerun = resync(&["--ssh-data=libssh2", &src, &d_arg]);
    rerun.assert_success();
    assert!(rerun.stderr.contains("stopped a zfs process"), "{rerun}");
    assert!(!zfs_receive_running(&dst));
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}

/// A local run by a user who is not root goes through sudo too, as
/// syncoid's does (this machine's sudoers is the bed's).
#[test]
fn sudo_a_local_run_as_a_non_root_user_runs_zfs_through_sudo() {
    let bed = Bed::get();
    let src = bed.ds_a("sudolocal");
    let dst = bed.ds_b("sudolocal");
    create_dataset_with_data(&src, &[("a.bin", 1 << 20)]);
    snapshot(&src, "first");
    let out = Resync::new(&["-u", SUDO_USER, "--", resync_bin(), "--debug", &src, &dst])
        .program(Path::new("/usr/sbin/runuser"))
        .run();
    out.assert_success();
    assert!(out.stderr.contains("[local] sudo -n zfs "), "{out}");
    assert_replica(&src, &dst);
    cleanup(&src);
    cleanup(&dst);
}
