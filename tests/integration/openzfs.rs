//! The real-OpenZFS tier: a QEMU guest running OpenZFS 2.x from Debian's
//! packages (scripts/openzfs-guest.sh, booted by scripts/test.sh and named
//! by $RESYNC_OPENZFS). zfs-fuse has no resume tokens, size estimates or
//! bookmarks; these tests exercise what only real OpenZFS can show.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::bed::*;

/// The guest, from the env file `openzfs-guest.sh up` wrote.
pub(crate) struct Guest {
    port: String,
    key: PathBuf,
    known_hosts: PathBuf,
    /// A HOME for resync holding the guest's key and known_hosts.
    home: PathBuf,
    /// The guest's state dir (console.log) and QEMU's pid, to tell a
    /// failed command from a guest that died.
    state: PathBuf,
    qemu_pid: String,
}

pub(crate) const POOL_S: &str = "ozs";
pub(crate) const POOL_T: &str = "ozt";

impl Guest {
    pub(crate) fn get() -> &'static Guest {
        static GUEST: OnceLock<Guest> = OnceLock::new();
        GUEST.get_or_init(|| {
            let path = std::env::var("RESYNC_OPENZFS").unwrap_or_else(|_| {
                panic!(
                    "OpenZFS guest not up: run scripts/test.sh (RESYNC_SKIP_OPENZFS=1 skips this tier)"
                )
            });
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            let env: BTreeMap<String, String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                .collect();
            let var = |k: &str| {
                env.get(k)
                    .cloned()
                    .unwrap_or_else(|| panic!("{path} lacks {k}"))
            };
            let state = PathBuf::from(var("GUEST_STATE_DIR"));
            let home = state.join("resync-home");
            std::fs::create_dir_all(home.join(".ssh")).expect("mkdir home");
            std::fs::copy(var("GUEST_KEY"), home.join(".ssh/id_ed25519")).expect("copy key");
            std::fs::copy(var("GUEST_KNOWN_HOSTS"), home.join(".ssh/known_hosts"))
                .expect("copy known_hosts");
            let guest = Guest {
                port: var("GUEST_SSH_PORT"),
                key: PathBuf::from(var("GUEST_KEY")),
                known_hosts: PathBuf::from(var("GUEST_KNOWN_HOSTS")),
                home,
                state: state.clone(),
                qemu_pid: var("GUEST_QEMU_PID"),
            };
            let disks: Vec<String> = var("GUEST_DISKS")
                .split_whitespace()
                .map(str::to_string)
                .collect();
            assert!(disks.len() >= 2, "the guest needs two pool disks: {disks:?}");
            for (pool, disk) in [(POOL_S, &disks[0]), (POOL_T, &disks[1])] {
                guest.sh(&format!(
                    "zpool list {pool} >/dev/null 2>&1 || zpool create -f {pool} {disk}"
                ));
            }
            guest
        })
    }

    /// `ssh ... root@GUEST` (OpenSSH); append the remote command.
    fn ssh_argv(&self) -> Vec<String> {
        let mut argv: Vec<String> = vec!["ssh".into(), "-i".into()];
        argv.push(self.key.display().to_string());
        argv.extend(["-p".into(), self.port.clone(), "-o".into()]);
        argv.push(format!("UserKnownHostsFile={}", self.known_hosts.display()));
        for opt in [
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "ConnectTimeout=10",
        ] {
            argv.extend(["-o".into(), opt.into()]);
        }
        argv.push("root@127.0.0.1".into());
        argv
    }

    /// Runs a shell command in the guest (OpenSSH), panicking on failure.
    pub(crate) fn sh(&self, cmd: &str) -> String {
        let argv = self.ssh_argv();
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .arg(cmd)
            .output()
            .expect("run ssh");
        assert!(
            out.status.success(),
            "guest command failed: {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stderr),
            self.death_notice()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Empty while QEMU lives; otherwise says so with the console's last
    /// lines (a guest kernel panic ends QEMU: `panic=-1`, `-no-reboot`).
    fn death_notice(&self) -> String {
        if std::path::Path::new(&format!("/proc/{}", self.qemu_pid)).exists() {
            return String::new();
        }
        let console = std::fs::read_to_string(self.state.join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "\nthe guest is gone (qemu pid {} exited); its console's last lines:\n{}",
            self.qemu_pid,
            tail.join("\n")
        )
    }

    pub(crate) fn endpoint(&self, ds: &str) -> String {
        format!("root@127.0.0.1:{ds}")
    }

    pub(crate) fn resync(&self, args: &[&str]) -> Resync {
        let mut all = vec!["--sshport", &self.port];
        all.extend_from_slice(args);
        Resync::new(&all)
            .env("HOME", self.home.to_str().expect("utf-8 path"))
            .timeout(Duration::from_secs(600))
    }

    /// (name, guid) of a dataset's snapshots, oldest first.
    pub(crate) fn snaps(&self, ds: &str) -> Vec<(String, u64)> {
        self.sh(&format!(
            "zfs list -Hp -t snapshot -o name,guid -s createtxg -d 1 {ds}"
        ))
        .lines()
        .filter_map(|l| {
            let (name, guid) = l.split_once('\t')?;
            Some((name.split_once('@')?.1.to_string(), guid.parse().ok()?))
        })
        .collect()
    }

    /// MD5 of every file in a mounted dataset, by relative path.
    pub(crate) fn md5s(&self, ds: &str) -> BTreeMap<String, String> {
        let mp = self.sh(&format!("zfs get -H -o value mountpoint {ds}"));
        self.sh(&format!(
            "cd {} && find . -type f -exec md5sum {{}} +",
            mp.trim()
        ))
        .lines()
        .filter_map(|l| {
            let (sum, path) = l.split_once("  ")?;
            Some((path.trim_start_matches("./").to_string(), sum.to_string()))
        })
        .collect()
    }

    fn receiving(&self) -> bool {
        self.sh("pgrep -f '[z]fs receive' >/dev/null && echo yes || true")
            .contains("yes")
    }
}

/// The byte count in a summary line "... : 21.18 MiB in 11.2s ...".
pub(crate) fn summary_bytes(stderr: &str) -> f64 {
    let line = stderr
        .lines()
        .find(|l| l.contains(" in ") && l.contains("now at @"))
        .unwrap_or_else(|| panic!("no summary line in {stderr}"));
    let before = line.split(" in ").next().unwrap_or_default();
    let mut words = before.rsplit(' ');
    let unit = words.next().unwrap_or_default();
    let value: f64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(-1.0);
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("no byte count in {line:?}"),
    };
    value * scale
}

#[test]
fn an_interrupted_incremental_resumes_from_the_token_and_sends_only_the_rest() {
    let g = Guest::get();
    let name = unique_name("resume");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 4M /dev/urandom > /{src}/base && zfs snapshot {src}@s1"
    ));
    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    g.resync(&["--no-sync-snap", &s, &d]).run().assert_success();
    g.sh(&format!(
        "head -c 24M /dev/urandom > /{src}/more && zfs snapshot {src}@s2"
    ));
    // Paced at 2 MiB/s and killed a few seconds into the stream (not
    // compressed: the pacing then counts stream bytes).
    let run = g
        .resync(&[
            "--no-sync-snap",
            "--compress=none",
            "--target-bwlimit=2M",
            &s,
            &d,
        ])
        .spawn();
    assert!(
        wait_until(Duration::from_secs(120), || g.receiving()),
        "the receive never started"
    );
    std::thread::sleep(Duration::from_secs(5));
    run.signal(libc::SIGKILL);
    assert!(!run.wait().success());
    assert!(
        wait_until(Duration::from_secs(60), || !g.receiving()),
        "the receive did not end with the killed run"
    );
    let token = g.sh(&format!("zfs get -H -o value receive_resume_token {dst}"));
    assert!(
        token.trim().starts_with("1-"),
        "a resume token was kept: {token:?}"
    );
    assert_eq!(g.snaps(&dst).len(), 1, "s2 is not on the target yet");

    let out = g
        .resync(&["--no-sync-snap", "--compress=none", &s, &d])
        .run();
    out.assert_success();
    assert!(
        out.stderr.contains("resuming an interrupted receive"),
        "{out}"
    );
    let sent = summary_bytes(&out.stderr);
    let increment = 24.0 * 1024.0 * 1024.0;
    assert!(
        sent > 0.0 && sent < 0.9 * increment,
        "resumed, not re-sent: {sent} bytes of a {increment}-byte increment\n{out}"
    );
    assert_eq!(g.snaps(&src), g.snaps(&dst));
    assert_eq!(g.md5s(&src), g.md5s(&dst));
    let token = g.sh(&format!("zfs get -H -o value receive_resume_token {dst}"));
    assert_eq!(token.trim(), "-", "no partial state left");
    g.sh(&format!("zfs destroy -r {src}; zfs destroy -r {dst}"));
}

#[test]
fn zfs_fuse_to_openzfs_and_back() {
    let bed = Bed::get();
    let g = Guest::get();
    let name = unique_name("cross");
    let local = format!("{}/{name}", bed.pool_a);
    let guest_ds = format!("{POOL_T}/{name}");
    let back = format!("{}/{name}-back", bed.pool_b);
    create_dataset_with_data(&local, &[("a.bin", 2 << 20), ("dir/b.bin", 50_000)]);
    snapshot(&local, "s1");

    // zfs-fuse (pool version 23) into OpenZFS 2.x.
    g.resync(&["--no-sync-snap", &local, &g.endpoint(&guest_ds)])
        .run()
        .assert_success();
    assert_eq!(
        snapshots(&local),
        g.snaps(&guest_ds),
        "same snapshots and GUIDs"
    );
    let local_md5: BTreeMap<String, String> = tree_checksums(&local);
    assert_eq!(local_md5, g.md5s(&guest_ds), "same files");

    // And back from OpenZFS into zfs-fuse.
    g.resync(&["--no-sync-snap", &g.endpoint(&guest_ds), &back])
        .run()
        .assert_success();
    assert_eq!(snapshots(&back), g.snaps(&guest_ds));
    assert_eq!(tree_checksums(&back), local_md5);
    g.sh(&format!("zfs destroy -r {guest_ds}"));
}

impl Guest {
    /// A real interrupted resumable receive: `SEND | head -c BYTES | zfs
    /// receive -s DST` in the guest. Returns the token it left.
    fn partial_receive(&self, send: &str, dst: &str, bytes: u64) -> String {
        self.sh(&format!(
            "{send} | head -c {bytes} | zfs receive -s {dst} 2>/dev/null; true"
        ));
        let token = self.token(dst);
        assert!(
            token.starts_with("1-"),
            "no resume token on {dst}: {token:?}"
        );
        token
    }

    fn token(&self, ds: &str) -> String {
        self.sh(&format!("zfs get -H -o value receive_resume_token {ds}"))
            .trim()
            .to_string()
    }

    /// Source and target hold the same snapshots (GUIDs) and files, and no
    /// partial receive is left on the target.
    fn assert_same(&self, src: &str, dst: &str) {
        assert_eq!(self.snaps(src), self.snaps(dst), "same snapshots and GUIDs");
        assert_eq!(self.md5s(src), self.md5s(dst), "same files");
        assert_eq!(self.token(dst), "-", "no partial state left on {dst}");
    }
}

/// The `zfs send` commands a `--debug` run logged that resume from a token
/// (not the size estimates, `zfs send -nvP -t`, which send nothing).
fn resumed_sends(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            l.starts_with("debug: [")
                && l.contains("zfs send")
                && l.contains(" -t 1-")
                && !l.contains(" -nvP ")
        })
        .collect()
}

/// The percentages of the `--debug` progress lines of streams labelled
/// `LABEL`, as (bytes shown, percent): "LABEL: 9.50 MiB of 16.20 MiB (58%)".
fn progress_percentages(stderr: &str, label: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{label}: ");
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (done, rest) = rest.split_once(" of ")?;
            let pct = rest.rsplit_once(" (")?.1.strip_suffix("%)")?;
            Some((human_to_bytes(done), pct.parse().ok()?))
        })
        .collect()
}

/// "9.50 MiB" -> bytes.
fn human_to_bytes(s: &str) -> f64 {
    let (value, unit) = s.split_once(' ').unwrap_or((s, "B"));
    let scale = match unit {
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    };
    value.parse::<f64>().unwrap_or(-1.0) * scale
}

const MIB: u64 = 1 << 20;

#[test]
fn a_full_send_cut_midway_resumes_and_sends_only_the_rest() {
    let g = Guest::get();
    let name = unique_name("fullresume");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 16M /dev/urandom > /{src}/big && zfs snapshot {src}@s1"
    ));
    let cut = 10 * MIB;
    g.partial_receive(&format!("zfs send {src}@s1"), &dst, cut);

    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let out = g
        .resync(&["--no-sync-snap", "--debug", "--target-bwlimit=3M", &s, &d])
        .run();
    out.assert_success();
    assert!(
        out.stderr.contains("resuming an interrupted receive"),
        "{out}"
    );
    assert_eq!(
        resumed_sends(&out.stderr).len(),
        1,
        "one zfs send -t\n{out}"
    );
    // Only what was missing crossed: the stream is ~16 MiB, 10 MiB had arrived.
    let sent = summary_bytes(&out.stderr);
    assert!(
        sent > 4.0 * MIB as f64 && sent < 8.0 * MIB as f64,
        "resumed, not re-sent: {sent} bytes\n{out}"
    );
    // The display started at the token's bytes and never passed 100%.
    let lines = progress_percentages(&out.stderr, &format!("{src} (resume)"));
    assert!(lines.len() >= 2, "progress lines with an estimate\n{out}");
    assert!(
        lines[0].0 > 9.0 * MIB as f64,
        "starts at the bytes already received: {lines:?}"
    );
    assert!(lines.iter().all(|(_, pct)| *pct <= 100), "{lines:?}");
    g.assert_same(&src, &dst);
    g.sh(&format!("zfs destroy -r {src}; zfs destroy -r {dst}"));
}

#[test]
fn a_stale_token_whose_snapshot_was_destroyed_is_discarded_automatically() {
    let g = Guest::get();
    let name = unique_name("stale");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 2M /dev/urandom > /{src}/a && zfs snapshot {src}@s1 \
         && zfs send {src}@s1 | zfs receive {dst} \
         && head -c 6M /dev/urandom > /{src}/b && zfs snapshot {src}@s2"
    ));
    g.partial_receive(&format!("zfs send -i @s1 {src}@s2"), &dst, 3 * MIB);
    g.sh(&format!(
        "zfs destroy {src}@s2 && head -c 1M /dev/urandom > /{src}/c && zfs snapshot {src}@s3"
    ));

    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let out = g.resync(&["--no-sync-snap", "--debug", &s, &d]).run();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!("names {src}@s2 (guid "))
            && out
                .stderr
                .contains("no longer exists on the source: discarding the partial receive"),
        "{out}"
    );
    assert!(resumed_sends(&out.stderr).is_empty(), "{out}");
    g.assert_same(&src, &dst);
    g.sh(&format!("zfs destroy -r {src}; zfs destroy -r {dst}"));
}

#[test]
fn a_partial_receive_from_another_dataset_is_refused_and_cleared() {
    let g = Guest::get();
    let name = unique_name("forged");
    let (src, other, dst) = (
        format!("{POOL_S}/{name}"),
        format!("{POOL_S}/{name}-other"),
        format!("{POOL_T}/{name}"),
    );
    g.sh(&format!(
        "zfs create {other} && head -c 6M /dev/urandom > /{other}/secret && zfs snapshot {other}@o \
         && zfs create {src} && head -c 2M /dev/urandom > /{src}/mine && zfs snapshot {src}@p"
    ));
    // A real partial receive of the other dataset into our target.
    g.partial_receive(&format!("zfs send {other}@o"), &dst, 3 * MIB);

    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let out = g.resync(&["--no-sync-snap", "--debug", &s, &d]).run();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!(
            ":{dst} names {other}@o, not {src}: discarding the partial receive"
        )),
        "{out}"
    );
    assert!(
        resumed_sends(&out.stderr).is_empty(),
        "nothing may be sent from the token\n{out}"
    );
    assert!(
        !out.stderr
            .lines()
            .any(|l| l.contains("zfs send") && l.contains(&other)),
        "{out}"
    );
    g.assert_same(&src, &dst);
    assert!(!g.md5s(&dst).contains_key("secret"));
    g.sh(&format!(
        "zfs destroy -r {src}; zfs destroy -r {other}; zfs destroy -r {dst}"
    ));
}

#[test]
fn a_token_for_a_destroyed_and_re_created_snapshot_is_refused_and_cleared() {
    let g = Guest::get();
    let name = unique_name("regen");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 6M /dev/urandom > /{src}/old && zfs snapshot {src}@s"
    ));
    let token_guid = g.snaps(&src)[0].1;
    g.partial_receive(&format!("zfs send {src}@s"), &dst, 3 * MIB);
    g.sh(&format!(
        "zfs destroy {src}@s && rm /{src}/old && head -c 2M /dev/urandom > /{src}/new \
         && zfs snapshot {src}@s"
    ));
    assert_ne!(
        g.snaps(&src)[0].1,
        token_guid,
        "a new GUID under the old name"
    );

    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let out = g.resync(&["--no-sync-snap", "--debug", &s, &d]).run();
    out.assert_success();
    assert!(
        out.stderr
            .contains(&format!("names {src}@s with guid {token_guid}"))
            && out
                .stderr
                .contains("(destroyed and re-created): discarding the partial receive"),
        "{out}"
    );
    assert!(resumed_sends(&out.stderr).is_empty(), "{out}");
    g.assert_same(&src, &dst);
    g.sh(&format!("zfs destroy -r {src}; zfs destroy -r {dst}"));
}

#[test]
fn no_resume_discards_a_resumable_partial_and_sends_the_step_again() {
    let g = Guest::get();
    let name = unique_name("noresume");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 4M /dev/urandom > /{src}/a && zfs snapshot {src}@s1"
    ));
    g.partial_receive(&format!("zfs send {src}@s1"), &dst, 2 * MIB);

    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let out = g
        .resync(&["--no-sync-snap", "--no-resume", "--debug", &s, &d])
        .run();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!(
            ":{dst}: discarding a partial receive (--no-resume)"
        )),
        "{out}"
    );
    assert!(resumed_sends(&out.stderr).is_empty(), "{out}");
    assert!(
        summary_bytes(&out.stderr) > 4.0 * MIB as f64,
        "sent again in full\n{out}"
    );
    g.assert_same(&src, &dst);
    g.sh(&format!("zfs destroy -r {src}; zfs destroy -r {dst}"));
}

#[test]
fn a_partial_from_a_source_without_resume_tokens_is_discarded_and_sent_again() {
    let bed = Bed::get();
    let g = Guest::get();
    let name = unique_name("fusepartial");
    let local = format!("{}/{name}", bed.pool_a);
    let dst = format!("{POOL_T}/{name}");
    create_dataset_with_data(&local, &[("a.bin", 3 << 20)]);
    snapshot(&local, "s1");
    // zfs-fuse's stream, cut, into a resumable receive on OpenZFS: the
    // target keeps a token, but zfs-fuse has no `send -t` to resume it.
    // (The test bed's paths have no spaces or shell metacharacters.)
    let ssh = g.ssh_argv().join(" ");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zfs send {local}@s1 | head -c {} | {ssh} 'zfs receive -s {dst}'; true",
            MIB
        ))
        .status()
        .expect("run sh");
    assert!(status.success());
    assert!(
        g.token(&dst).starts_with("1-"),
        "a partial receive with a token"
    );

    let out = g
        .resync(&["--no-sync-snap", &local, &g.endpoint(&dst)])
        .run();
    out.assert_success();
    assert!(
        out.stderr.contains(&format!(
            ":{dst}: discarding a partial receive (the source's ZFS cannot resume it"
        )),
        "{out}"
    );
    assert_eq!(snapshots(&local), g.snaps(&dst), "same snapshots and GUIDs");
    assert_eq!(tree_checksums(&local), g.md5s(&dst), "same files");
    assert_eq!(g.token(&dst), "-");
    g.sh(&format!("zfs destroy -r {dst}"));
    destroy(&local);
}

/// The tags of `zfs holds -H SNAP` (real OpenZFS lists them).
fn hold_tags(g: &Guest, snap: &str) -> Vec<String> {
    g.sh(&format!("zfs holds -H {snap}"))
        .lines()
        .filter_map(|l| l.split('\t').nth(1).map(str::to_string))
        .collect()
}

#[test]
fn create_bookmark_lets_the_next_run_send_from_the_bookmark_after_the_snapshot_is_gone() {
    let g = Guest::get();
    let name = unique_name("bookmark");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 3M /dev/urandom > /{src}/base && zfs snapshot {src}@s1"
    ));
    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let args = ["--no-sync-snap", "--create-bookmark", "--use-hold"];
    let run = |extra: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(extra);
        g.resync(&all).run()
    };
    run(&[&s, &d]).assert_success();
    let bookmarks = g.sh(&format!("zfs list -H -t bookmark -o name,guid {src}"));
    let s1 = g.snaps(&src)[0].clone();
    assert_eq!(
        bookmarks.trim(),
        format!("{src}#s1\t{}", s1.1),
        "s1 bookmarked with its GUID"
    );
    // Held on both sides, each with its job's tag.
    let src_tag = format!("resync_to_127.0.0.1:{dst}");
    let dst_tag = format!("resync_from_127.0.0.1:{src}");
    assert_eq!(hold_tags(g, &format!("{src}@s1")), [src_tag.as_str()]);
    assert_eq!(hold_tags(g, &format!("{dst}@s1")), [dst_tag.as_str()]);
    let refused = g.sh(&format!("zfs destroy {src}@s1 2>&1 || echo REFUSED"));
    assert!(refused.contains("REFUSED"), "held: {refused}");

    // Another tool prunes the common snapshot on the source; new data follows.
    g.sh(&format!(
        "zfs release {src_tag} {src}@s1 && zfs destroy {src}@s1 && \
         head -c 1M /dev/urandom > /{src}/more && zfs snapshot {src}@s2 && \
         head -c 64K /dev/urandom > /{src}/last && zfs snapshot {src}@s3"
    ));
    let target_before = g.snaps(&dst);
    let out = run(&["--debug", &s, &d]);
    out.assert_success();
    assert!(
        out.stderr.lines().any(|l| l.contains(" zfs send -i")
            && l.contains(&format!("{src}#s1"))
            && l.ends_with(&format!("{src}@s2"))),
        "sent from the bookmark:\n{out}"
    );
    assert!(
        !out.stderr.contains("destroy -r"),
        "nothing destroyed:\n{out}"
    );
    let sent = summary_bytes(&out.stderr);
    assert!(
        sent < 2.0 * 1024.0 * 1024.0,
        "incremental, not a full re-send of 4 MiB: {sent} bytes\n{out}"
    );
    let target_after = g.snaps(&dst);
    assert_eq!(target_after[0], target_before[0], "s1 kept with its GUID");
    let src_snaps = g.snaps(&src);
    assert_eq!(
        &target_after[1..],
        &src_snaps[..],
        "s2 and s3 with the source's GUIDs"
    );
    assert_eq!(g.md5s(&src), g.md5s(&dst));
    // The holds moved to s3; s3 is bookmarked too.
    assert_eq!(hold_tags(g, &format!("{src}@s3")), [src_tag.as_str()]);
    assert_eq!(hold_tags(g, &format!("{dst}@s3")), [dst_tag.as_str()]);
    assert!(
        hold_tags(g, &format!("{dst}@s1")).is_empty(),
        "old hold released"
    );
    assert!(hold_tags(g, &format!("{src}@s2")).is_empty());
    assert!(g
        .sh(&format!("zfs list -H -t bookmark -o name {src}"))
        .contains(&format!("{src}#s3")));

    // With sync snapshots each run bookmarks its own and destroys the job's
    // previous one; the user's bookmarks stay.
    for _ in 0..2 {
        g.resync(&["--create-bookmark", "--use-hold", &s, &d])
            .run()
            .assert_success();
    }
    let marks: Vec<String> = g
        .sh(&format!("zfs list -H -t bookmark -o name {src}"))
        .lines()
        .filter_map(|l| l.split_once('#').map(|(_, b)| b.to_string()))
        .collect();
    let sync: Vec<String> = g
        .snaps(&src)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("resync_"))
        .collect();
    assert_eq!(sync.len(), 1, "the older sync snapshot was pruned");
    assert_eq!(marks.len(), 3, "{marks:?}");
    assert!(marks.contains(&"s1".to_string()) && marks.contains(&"s3".to_string()));
    assert!(marks.contains(&sync[0]), "{marks:?} has {}", sync[0]);
    assert_eq!(g.snaps(&src).last(), g.snaps(&dst).last());

    g.sh(&format!(
        "for s in $(zfs list -H -o name -t snapshot {src} {dst}); do \
           zfs release {src_tag} $s 2>/dev/null; zfs release {dst_tag} $s 2>/dev/null; done; \
         zfs destroy -r {src}; zfs destroy -r {dst}"
    ));
}

/// `zfs receive -F` rolls the target back and destroys its snapshots newer
/// than the stream's base, including one a snapshotter took on the target
/// while the stream was on its way. Without changes on the target since
/// the base (`written@` is 0) the receive needs no -F, and the target's
/// own snapshot survives (the receive is refused instead).
#[test]
fn a_snapshot_taken_on_the_target_during_a_transfer_is_never_destroyed() {
    let g = Guest::get();
    let name = unique_name("tgtsnap");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 2M /dev/urandom > /{src}/base && zfs snapshot {src}@s1"
    ));
    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    g.resync(&["--no-sync-snap", &s, &d]).run().assert_success();
    g.sh(&format!(
        "head -c 16M /dev/urandom > /{src}/more && zfs snapshot {src}@s2"
    ));
    let run = g
        .resync(&["--no-sync-snap", "--target-bwlimit=2M", &s, &d])
        .spawn();
    assert!(
        wait_until(Duration::from_secs(120), || g.receiving()),
        "the receive never started"
    );
    std::thread::sleep(Duration::from_secs(2));
    g.sh(&format!("zfs snapshot {dst}@taken-by-a-snapshotter"));
    let out = run.wait();
    let on_target: Vec<String> = g.snaps(&dst).into_iter().map(|(n, _)| n).collect();
    assert!(
        on_target.iter().any(|n| n == "taken-by-a-snapshotter"),
        "the target's own snapshot was destroyed ({on_target:?}):\n{out}"
    );
    assert!(on_target.iter().any(|n| n == "s1"), "{on_target:?}");
    assert!(
        !out.stderr.contains("receiving with -F"),
        "an unchanged target needs no rollback:\n{out}"
    );
}

/// `--preserve-properties` on OpenZFS: the source's local properties go
/// through `zfs receive -o` (set locally on the target before any data, as
/// syncoid does), and later incremental receives keep them local.
#[test]
fn preserve_properties_goes_through_receive_o_on_openzfs() {
    let g = Guest::get();
    let name = unique_name("presprop");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create -o compression=lz4 -o recordsize=16K -o com.example:tag=kept {src} \
         && head -c 1M /dev/urandom > /{src}/a && zfs snapshot {src}@s1"
    ));
    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let out = g
        .resync(&["--debug", "--preserve-properties", &s, &d])
        .run();
    out.assert_success();
    assert!(
        out.stderr.contains("-o compression=lz4") && out.stderr.contains("-o recordsize=16K"),
        "receive -o carries the properties:\n{out}"
    );
    assert!(!out.stderr.contains("has no zfs receive -o"), "{out}");
    let props = |ds: &str| {
        g.sh(&format!(
            "zfs get -H -o property,value,source compression,recordsize,com.example:tag {ds}"
        ))
    };
    let got = props(&dst);
    for want in [
        "compression\tlz4\tlocal",
        "recordsize\t16K\tlocal",
        "com.example:tag\tkept\tlocal",
    ] {
        assert!(got.contains(want), "{want:?} in\n{got}");
    }
    // An incremental keeps them local.
    g.sh(&format!(
        "head -c 64K /dev/urandom > /{src}/b && zfs snapshot {src}@s2"
    ));
    g.resync(&["--preserve-properties", "--no-sync-snap", &s, &d])
        .run()
        .assert_success();
    assert_eq!(props(&dst), got);
    assert_eq!(g.md5s(&src), g.md5s(&dst));
    g.sh(&format!("zfs destroy -r {src} && zfs destroy -r {dst}"));
}

/// `--create-bookmark` when a bookmark of another snapshot has the name:
/// syncoid's fallback name (the name plus the GUID's first 6 digits); when
/// that is taken too, the dataset fails (exit 1 in a recursive run) instead
/// of warning and exiting 0.
#[test]
fn openzfs_create_bookmark_falls_back_like_syncoid_and_fails_when_it_cannot() {
    let g = Guest::get();
    let name = unique_name("bmfall");
    let (src, dst) = (format!("{POOL_S}/{name}"), format!("{POOL_T}/{name}"));
    g.sh(&format!(
        "zfs create {src} && head -c 1M /dev/urandom > /{src}/a && zfs snapshot {src}@other \
         && zfs bookmark {src}@other {src}#s2 && head -c 64K /dev/urandom > /{src}/b \
         && zfs snapshot {src}@s2"
    ));
    let (s, d) = (g.endpoint(&src), g.endpoint(&dst));
    let guid_of = |snap: &str| {
        g.sh(&format!("zfs get -H -o value guid {src}@{snap}"))
            .trim()
            .to_string()
    };
    let s2 = guid_of("s2");
    let out = g
        .resync(&["-r", "--no-sync-snap", "--create-bookmark", &s, &d])
        .run();
    out.assert_success();
    let fallback = format!("s2{}", &s2[..6]);
    let marks = g.sh(&format!("zfs list -H -t bookmark -o name,guid {src}"));
    assert!(
        marks.contains(&format!("{src}#{fallback}\t{s2}")),
        "#{fallback} bookmarks @s2:\n{marks}\n{out}"
    );

    // Both names of the next snapshot taken by bookmarks of @other.
    g.sh(&format!(
        "head -c 64K /dev/urandom > /{src}/c && zfs snapshot {src}@s3"
    ));
    let s3 = guid_of("s3");
    g.sh(&format!(
        "zfs bookmark {src}@other {src}#s3 && zfs bookmark {src}@other {src}#s3{}",
        &s3[..6]
    ));
    let out = g
        .resync(&["-r", "--no-sync-snap", "--create-bookmark", &s, &d])
        .run();
    assert_eq!(out.code(), Some(1), "the dataset failed:\n{out}");
    assert!(out.stderr.contains("--create-bookmark failed"), "{out}");
    assert!(out.stderr.contains("not protected"), "{out}");
    // The data arrived all the same.
    assert!(g.snaps(&dst).iter().any(|(n, _)| n == "s3"));
    g.sh(&format!("zfs destroy -r {src} && zfs destroy -r {dst}"));
}

impl Guest {
    /// MD5 of a zvol's whole device, once udev has made its link.
    fn zvol_md5(&self, ds: &str) -> String {
        self.sh(&format!(
            "for i in $(seq 50); do [ -e /dev/zvol/{ds} ] && break; udevadm settle; sleep 0.2; done; \
             md5sum < /dev/zvol/{ds}"
        ))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
    }

    fn volume_props(&self, ds: &str) -> String {
        self.sh(&format!(
            "zfs get -H -o value type,volsize,volblocksize {ds}"
        ))
    }
}

/// zvols replicate like filesystems: full, incremental and `--chunked`,
/// with the same volsize, volblocksize, snapshots (GUIDs) and bytes.
#[test]
fn openzfs_zvols_replicate_full_incremental_and_chunked() {
    let g = Guest::get();
    let name = unique_name("zvol");
    let src = format!("{POOL_S}/{name}");
    let (dst, dst_ck) = (format!("{POOL_T}/{name}"), format!("{POOL_T}/{name}-ck"));
    g.sh(&format!("zfs create -V 8M -o volblocksize=16K {src}"));
    let dev_write = |seek: u32, count: u32| {
        g.sh(&format!(
            "for i in $(seq 50); do [ -e /dev/zvol/{src} ] && break; udevadm settle; sleep 0.2; done; \
             dd if=/dev/urandom of=/dev/zvol/{src} bs=1M seek={seek} count={count} conv=fsync status=none"
        ));
    };
    dev_write(0, 4);
    g.sh(&format!("zfs snapshot {src}@s1"));
    let (s, d, dck) = (g.endpoint(&src), g.endpoint(&dst), g.endpoint(&dst_ck));

    // Full.
    g.resync(&["--no-sync-snap", &s, &d]).run().assert_success();
    assert_eq!(g.snaps(&src), g.snaps(&dst));
    assert_eq!(g.volume_props(&dst), g.volume_props(&src));
    assert!(g.volume_props(&dst).starts_with("volume\n8M\n16K"));
    assert_eq!(
        g.zvol_md5(&dst),
        g.zvol_md5(&src),
        "same bytes after the full"
    );

    // Incremental.
    dev_write(5, 2);
    g.sh(&format!("zfs snapshot {src}@s2"));
    let out = g.resync(&["--no-sync-snap", &s, &d]).run();
    out.assert_success();
    assert_eq!(g.snaps(&src), g.snaps(&dst));
    assert!(summary_bytes(&out.stderr) < 4.0 * 1024.0 * 1024.0, "{out}");
    assert_eq!(
        g.zvol_md5(&dst),
        g.zvol_md5(&src),
        "same bytes after the incremental"
    );

    // --chunked, full then incremental.
    g.resync(&["--no-sync-snap", "--chunked", "--chunk-size=1M", &s, &dck])
        .run()
        .assert_success();
    dev_write(1, 1);
    g.sh(&format!("zfs snapshot {src}@s3"));
    g.resync(&["--no-sync-snap", "--chunked", "--chunk-size=1M", &s, &dck])
        .run()
        .assert_success();
    assert_eq!(g.snaps(&src), g.snaps(&dst_ck));
    assert_eq!(g.volume_props(&dst_ck), g.volume_props(&src));
    assert_eq!(g.zvol_md5(&dst_ck), g.zvol_md5(&src), "same bytes chunked");
    g.sh(&format!(
        "zfs destroy -r {src} && zfs destroy -r {dst} && zfs destroy -r {dst_ck}"
    ));
}
