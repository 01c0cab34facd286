//! Smoke tests of the test bed itself: the hosts answer, see the pools and
//! datasets mounted after they started, keep their own /tmp, can be cut off
//! and brought back; the harness's ZFS helpers agree with a local send/recv;
//! the release binary runs alone in an empty chroot.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bed::{self, Bed};

#[test]
fn hosts_answer_over_ssh_and_see_both_pools() {
    let bed = Bed::get();
    for host in [&bed.host_a, &bed.host_b, &bed.alias] {
        let pools = bed::ssh(host, "zfs list -H -o name");
        let pools: Vec<&str> = pools.lines().collect();
        assert!(
            pools.contains(&bed.pool_a.as_str()) && pools.contains(&bed.pool_b.as_str()),
            "host {host} does not see both pools: {pools:?}"
        );
    }
    // The alias is host B, and the hosts are distinct machines on the net.
    let addr_b = bed::ssh(&bed.alias, "ip -4 -o addr show dev eth0");
    assert!(addr_b.contains(&format!("{}/", bed.host_b)), "{addr_b}");
    let addr_a = bed::ssh(&bed.host_a, "ip -4 -o addr show dev eth0");
    assert!(addr_a.contains(&format!("{}/", bed.host_a)), "{addr_a}");
    assert_eq!(bed::ssh(&bed.host_a, "hostname").trim(), "rs-host-a");
    assert_eq!(bed::ssh(&bed.host_b, "hostname").trim(), "rs-host-b");
}

#[test]
fn dataset_created_after_hosts_started_is_visible_inside_hosts() {
    let bed = Bed::get();
    let ds = bed.ds_a("visible");
    let mp = bed::create_dataset_with_data(&ds, &[("f.bin", 100_000), ("sub/g.bin", 5)]);
    let local = bed::tree_checksums(&ds);
    assert_eq!(local.len(), 2, "{local:?}");
    for host in [&bed.host_a, &bed.host_b] {
        let out = bed::ssh(
            host,
            &format!("cd '{}' && md5sum f.bin sub/g.bin", mp.display()),
        );
        for line in out.lines() {
            let (sum, name) = line.split_once("  ").expect("md5sum line");
            assert_eq!(
                Some(&sum.to_string()),
                local.get(name),
                "host {host}: {out}"
            );
        }
    }
    bed::destroy(&ds);
    assert!(!bed::exists(&ds));
}

#[test]
fn each_host_has_a_private_tmp() {
    let bed = Bed::get();
    let name = bed::unique_name("tmpprobe");
    bed::ssh(&bed.host_a, &format!("echo a > /tmp/{name}"));
    assert_eq!(
        bed::ssh(&bed.host_a, &format!("cat /tmp/{name}")).trim(),
        "a"
    );
    let on_b = bed::ssh(
        &bed.host_b,
        &format!("test -e /tmp/{name} && echo yes || echo no"),
    );
    assert_eq!(on_b.trim(), "no", "host B sees host A's /tmp");
    assert!(
        !PathBuf::from(format!("/tmp/{name}")).exists(),
        "the root namespace sees host A's /tmp"
    );
    bed::ssh(&bed.host_a, &format!("rm /tmp/{name}"));
}

#[test]
fn link_cut_makes_host_unreachable_and_link_up_restores_it() {
    let bed = Bed::get();
    bed::ssh(&bed.host_a, "true");
    let cut = bed::link_down(&bed.host_a);
    let t = Instant::now();
    let out = bed::ssh_output(&bed.host_a, "true");
    assert!(
        !out.success(),
        "host A still reachable with its link down:\n{out}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "noticing the cut took {:?}",
        t.elapsed()
    );
    // Only host A is cut off.
    bed::ssh(&bed.host_b, "true");
    drop(cut);
    let t = Instant::now();
    let back = bed::wait_until(Duration::from_secs(10), || {
        bed::ssh_output(&bed.host_a, "true").success()
    });
    assert!(back, "host A not reachable 10 s after link up");
    eprintln!("host A back {:?} after link up", t.elapsed());
}

#[test]
fn unused_address_is_unreachable() {
    let bed = Bed::get();
    let out = bed::ssh_output(&bed.unused_addr, "true");
    assert!(
        !out.success(),
        "something answers at {}:\n{out}",
        bed.unused_addr
    );
    assert!(out.elapsed < Duration::from_secs(10), "{out}");
}

#[test]
fn harness_zfs_helpers_agree_with_local_send_recv() {
    let bed = Bed::get();
    let src = bed.ds_a("helpers");
    let dst = bed.ds_b("helpers");
    bed::create_dataset_with_data(&src, &[("a", 70_000), ("d/b", 1), ("d/e/c", 0)]);
    bed::snapshot(&src, "s1");
    bed::write_files(&src, &[("a", 70_000), ("new", 3000)]);
    bed::snapshot(&src, "s2");
    let snaps = bed::snapshots(&src);
    let names: Vec<&str> = snaps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_ne!(snaps[0].1, snaps[1].1);

    let sh = format!("zfs send -R {src}@s2 | zfs receive -u {dst}");
    let st = Command::new("sh").arg("-c").arg(&sh).status().expect("sh");
    assert!(st.success(), "{sh}");
    assert_eq!(bed::snapshots(&dst), snaps, "guids differ after send/recv");
    bed::zfs(&["mount", &dst]);
    assert_eq!(bed::tree_checksums(&dst), bed::tree_checksums(&src));
    assert_eq!(bed::tree_checksums(&src).len(), 4);
    bed::destroy(&src);
    bed::destroy(&dst);
}

#[test]
fn resync_helper_runs_the_binary_under_test() {
    let out = bed::resync(&["--version"]);
    out.assert_success();
    assert!(!out.timed_out);
}

#[test]
fn release_binary_runs_alone_in_empty_chroot() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = target.join("x86_64-unknown-linux-gnu/release/resync");
    assert!(
        bin.is_file(),
        "{} missing: build it with `cargo build --release` (scripts/test.sh does)",
        bin.display()
    );
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    std::fs::copy(&bin, dir.path().join("resync")).expect("copy binary");
    let out = Command::new("chroot")
        .arg(dir.path())
        .args(["/resync", "--version"])
        .output()
        .expect("run chroot");
    assert!(
        out.status.success(),
        "static binary fails alone in a chroot: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
