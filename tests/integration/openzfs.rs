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

    /// Runs a shell command in the guest (OpenSSH), panicking on failure.
    pub(crate) fn sh(&self, cmd: &str) -> String {
        let out = Command::new("ssh")
            .args(["-i"])
            .arg(&self.key)
            .args(["-p", &self.port, "-o"])
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "ConnectTimeout=10",
                "root@127.0.0.1",
                cmd,
            ])
            .output()
            .expect("run ssh");
        assert!(
            out.status.success(),
            "guest command failed: {cmd}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
    // Paced at 2 MiB/s and killed a few seconds into the stream.
    let run = g
        .resync(&["--no-sync-snap", "--target-bwlimit=2M", &s, &d])
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

    let out = g.resync(&["--no-sync-snap", &s, &d]).run();
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
