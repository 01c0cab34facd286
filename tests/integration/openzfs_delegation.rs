//! `zfs allow` delegation on the real OpenZFS guest (zfs-fuse has no
//! delegation): a user who is not root, with `--no-privilege-elevation`,
//! replicates with exactly the permissions README lists, and a missing
//! permission is one line naming the host, the command and the `zfs allow`
//! that fixes it. The user is made at test time, over SSH as root.

use crate::bed::*;
use crate::openzfs::{Guest, POOL_S, POOL_T};

const USER: &str = "ozdeleg";

/// The delegated user in the guest: root's key, not locked, and `zfs` in
/// its PATH (Debian keeps zfs in /usr/sbin, outside a user's PATH).
fn user(g: &Guest) {
    // Once: tests run in parallel, and two useradds race.
    static MADE: std::sync::Once = std::sync::Once::new();
    MADE.call_once(|| make_user(g));
}

fn make_user(g: &Guest) {
    g.sh(&format!(
        "id {USER} >/dev/null 2>&1 || useradd --create-home --shell /bin/sh {USER}; \
         usermod -p '*' {USER} && \
         install -d -m 700 -o {USER} -g {USER} /home/{USER}/.ssh && \
         install -m 600 -o {USER} -g {USER} /root/.ssh/authorized_keys /home/{USER}/.ssh/ && \
         ln -sf /usr/sbin/zfs /usr/local/bin/zfs && ln -sf /usr/sbin/zpool /usr/local/bin/zpool"
    ));
}

fn at(ds: &str) -> String {
    format!("{USER}@127.0.0.1:{ds}")
}

/// A source with a snapshot, the user's permissions on it, and a target
/// parent (unmounted: on Linux only root may mount) with `target_perms`.
fn setup(g: &Guest, name: &str, target_perms: &str) -> (String, String) {
    user(g);
    let src = format!("{POOL_S}/{name}");
    let parent = format!("{POOL_T}/{name}");
    g.sh(&format!(
        "zfs create {src} && head -c 2M /dev/urandom > /{src}/f && zfs snapshot {src}@s1 && \
         zfs allow -u {USER} send,snapshot,destroy,mount,hold,release,bookmark {src} && \
         zfs create -o mountpoint=none {parent} && \
         zfs allow -u {USER} {target_perms} {parent}"
    ));
    (src, format!("{parent}/copy"))
}

#[test]
fn openzfs_delegation_with_no_privilege_elevation_replicates() {
    let g = Guest::get();
    let name = unique_name("deleg");
    let (src, dst) = setup(
        g,
        &name,
        "receive,create,mount,destroy,rollback,hold,release",
    );
    for _ in 0..2 {
        g.resync(&["--no-privilege-elevation", "--debug", &at(&src), &at(&dst)])
            .run()
            .assert_success();
        let (s, d) = (g.snaps(&src), g.snaps(&dst));
        let newest = s.last().expect("source snapshots");
        assert!(d.contains(newest), "target {dst} lacks {newest:?}: {d:?}");
        assert!(d.iter().any(|x| x.0 == "s1" && s.contains(x)), "{d:?}");
        g.sh(&format!("head -c 1M /dev/urandom > /{src}/g"));
    }
    g.sh(&format!(
        "zfs destroy -r {src}; zfs destroy -r {POOL_T}/{name}"
    ));
}

#[test]
fn openzfs_delegation_missing_a_permission_is_one_line_and_the_target_is_untouched() {
    let g = Guest::get();
    let name = unique_name("delegno");
    // No `receive` on the target.
    let (src, dst) = setup(g, &name, "create,mount,destroy,rollback,hold,release");
    let out = g
        .resync(&["--no-privilege-elevation", &at(&src), &at(&dst)])
        .run();
    out.assert_failure();
    // A failed dataset, reported under the run's summary: one line.
    let refusals: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("was refused"))
        .collect();
    assert_eq!(refusals.len(), 1, "one line:\n{out}");
    let want = format!(
        "zfs receive was refused to {USER} (permission denied); run \
         'zfs allow -u {USER} receive,create,mount {POOL_T}/{name}' there as root"
    );
    assert!(refusals[0].contains(&want), "{want:?} in:\n{out}");
    assert!(
        refusals[0].contains(&format!("on {USER}@127.0.0.1")),
        "the host is named:\n{out}"
    );
    let listed = g.sh(&format!("zfs list -H -o name -r {POOL_T}/{name}"));
    assert_eq!(
        listed.trim(),
        format!("{POOL_T}/{name}"),
        "nothing received"
    );
    g.sh(&format!(
        "zfs destroy -r {src}; zfs destroy -r {POOL_T}/{name}"
    ));
}
