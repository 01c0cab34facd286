//! syncoid 2.3's options on the real bed: `--include-snaps`/`--exclude-snaps`
//! (only the chosen snapshots arrive, with the source's GUIDs),
//! `--delete-target-snapshots` (what left the source goes, a held one and the
//! base stay), `--dumpsnaps`, the no-effect flags (one line each) and the SSH
//! options (`--sshconfig`, `-c`, `-o`) on a real sshd; options resync cannot
//! honour are refused before anything changes.

use crate::bed::*;

fn names(ds: &str) -> Vec<String> {
    snapshots(ds).into_iter().map(|(n, _)| n).collect()
}

/// GUID of `ds@name` on either side.
fn guid(ds: &str, name: &str) -> u64 {
    snapshots(ds)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, g)| g)
        .unwrap_or_else(|| panic!("{ds}@{name} does not exist"))
}

#[test]
fn include_and_exclude_snaps_send_only_the_chosen_snapshots() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("incl"), bed.ds_b("incl"));
    create_dataset_with_data(&src, &[("a.bin", 256 << 10)]);
    snapshot(&src, "daily-1");
    write_files(&src, &[("b.bin", 128 << 10)]);
    snapshot(&src, "hourly-1");
    write_files(&src, &[("c.bin", 128 << 10)]);
    snapshot(&src, "daily-2");
    write_files(&src, &[("d.bin", 64 << 10)]);
    snapshot(&src, "hourly-2");
    let target = remote(&bed.host_b, &dst);

    // The sync snapshot does not match "daily": none is taken, and the
    // newest included snapshot is the last one sent, one -i at a time.
    let out = resync(&["--include-snaps=daily", "--dumpsnaps", &src, &target]);
    out.assert_success();
    assert_eq!(names(&dst), ["daily-1", "daily-2"], "{out}");
    for s in ["daily-1", "daily-2"] {
        assert_eq!(guid(&src, s), guid(&dst, s), "@{s} is the source's");
    }
    assert!(
        names(&src).iter().all(|n| !n.starts_with("resync_")),
        "no sync snapshot was taken: {:?}",
        names(&src)
    );
    assert!(out.stderr.contains("leave out the sync snapshot"), "{out}");
    // --dumpsnaps shows the lists as the run sees them (filtered, as
    // syncoid's does).
    assert!(
        out.stdout
            .contains(&format!("source\t{src}@daily-1\t{}", guid(&src, "daily-1"))),
        "--dumpsnaps lists the source's snapshots:\n{out}"
    );
    assert!(!out.stdout.contains("hourly"), "{out}");

    // --exclude-snaps: everything but hourly; the sync snapshot goes too.
    write_files(&src, &[("e.bin", 64 << 10)]);
    snapshot(&src, "daily-3");
    snapshot(&src, "hourly-3");
    let out = resync(&["--exclude-snaps=hourly", &src, &target]);
    out.assert_success();
    let got = names(&dst);
    assert_eq!(&got[..3], ["daily-1", "daily-2", "daily-3"], "{out}");
    assert_eq!(got.len(), 4, "daily-1..3 and the sync snapshot: {got:?}");
    assert!(got[3].starts_with("resync_"), "{got:?}");
    assert!(got.iter().all(|n| !n.starts_with("hourly")), "{got:?}");
    assert_eq!(guid(&src, &got[3]), guid(&dst, &got[3]));
    assert_eq!(tree_checksums(&src), tree_checksums(&dst));
    destroy(&src);
    destroy(&dst);
}

#[test]
fn delete_target_snapshots_destroys_what_left_the_source_but_not_held_ones() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("deltgt"), bed.ds_b("deltgt"));
    create_dataset_with_data(&src, &[("a.bin", 128 << 10)]);
    for s in ["s1", "s2", "s3"] {
        write_files(&src, &[(s, 32 << 10)]);
        snapshot(&src, s);
    }
    resync(&["--no-sync-snap", &src, &dst]).assert_success();
    assert_eq!(names(&dst), ["s1", "s2", "s3"]);
    // The source's snapshotter prunes s1 and s2; another job holds s2 on
    // the target.
    zfs(&["destroy", &format!("{src}@s1")]);
    zfs(&["destroy", &format!("{src}@s2")]);
    zfs(&["hold", "other_job", &format!("{dst}@s2")]);
    write_files(&src, &[("s4", 32 << 10)]);
    snapshot(&src, "s4");

    let out = resync(&["--no-sync-snap", "--delete-target-snapshots", &src, &dst]);
    let released = zfs_ok(&["release", "other_job", &format!("{dst}@s2")]);
    out.assert_success();
    assert!(released, "the other job's hold is still there");
    assert_eq!(names(&dst), ["s2", "s3", "s4"], "{out}");
    assert_eq!(guid(&src, "s4"), guid(&dst, "s4"));
    assert!(out.stderr.contains("no longer on the source: @s1"), "{out}");
    assert!(
        out.stderr.contains("keeps @s2 (held by another job)"),
        "{out}"
    );

    // Up to date: the base (s4) stays even when the source drops all else.
    zfs(&["destroy", &format!("{src}@s3")]);
    let out = resync(&["--no-sync-snap", "--delete-target-snapshots", &src, &dst]);
    out.assert_success();
    assert_eq!(names(&dst), ["s4"], "{out}");
    assert_replica(&src, &dst);
    destroy(&src);
    destroy(&dst);
}

#[test]
fn syncoid_ssh_options_and_no_effect_flags_work_against_a_real_sshd() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("sshopt"), bed.ds_b("sshopt"));
    create_dataset_with_data(&src, &[("a.bin", 256 << 10)]);
    // A config file of its own (ssh -F): an alias only it knows.
    let dir = bed.dir.join(unique_name("sshcfg"));
    std::fs::create_dir_all(&dir).expect("config dir");
    let config = dir.join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host backupbox\n  HostName {}\n  UserKnownHostsFile {}\n",
            bed.host_b,
            bed.known_hosts.display()
        ),
    )
    .expect("write config");
    let sshconfig = format!("--sshconfig={}", config.display());
    let identity = format!("IdentityFile={}", bed.key.display());
    let target = format!("backupbox:{dst}");
    let out = resync(&[
        &sshconfig,
        "-o",
        "User=root",
        "-o",
        &identity,
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=5",
        "--sshoption=ServerAliveInterval=5",
        "-c",
        "aes128-ctr",
        "--mbuffer-size=128M",
        "--pv-options=-p -t -e -r -b",
        "--no-command-checks",
        "--monitor-version",
        "--sendoptions=p P",
        &src,
        &target,
    ]);
    out.assert_success();
    assert_replica(&src, &dst);
    for line in [
        "note: --mbuffer-size has no effect",
        "note: --pv-options has no effect",
        "note: --no-command-checks has no effect",
        "note: --monitor-version has no effect",
        "note: --sendoptions: leaving out -P: resync shows its own progress",
    ] {
        assert_eq!(out.stderr.matches(line).count(), 1, "{line}\n{out}");
    }

    // Without the config file the alias is unknown: the file was used.
    let out = resync(&["-o", &identity, &src, &target]);
    out.assert_failure();
    let _ = std::fs::remove_dir_all(&dir);
    destroy(&src);
    destroy(&dst);
}

#[test]
fn options_resync_cannot_honour_are_refused_before_anything_runs() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("refuse"), bed.ds_b("refuse"));
    create_dataset_with_data(&src, &[("a.bin", 64 << 10)]);
    let target = remote(&bed.host_b, &dst);
    for args in [
        vec!["-o", "ProxyJump=bastion"],
        vec!["-c", "blowfish-cbc"],
        vec!["-r", "--sendoptions=R"],
    ] {
        let mut argv = args.clone();
        argv.extend([src.as_str(), target.as_str()]);
        let out = resync(&argv);
        assert_eq!(out.code(), Some(2), "{args:?}\n{out}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "{args:?}\n{out}");
        assert!(!exists(&dst), "{args:?} created the target");
        assert!(names(&src).is_empty(), "{args:?} took a snapshot");
    }
    destroy(&src);
}

/// `value<TAB>source` of a property.
fn prop(ds: &str, name: &str) -> (String, String) {
    let out = zfs(&["get", "-H", "-o", "value,source", name, ds]);
    let (v, s) = out.trim_end().split_once('\t').expect("value and source");
    (v.to_string(), s.to_string())
}

#[test]
fn preserve_properties_sets_the_sources_local_properties_locally_on_zfs_fuse() {
    let bed = Bed::get();
    let (src, dst, dst2) = (
        bed.ds_a("presprop"),
        bed.ds_b("presprop"),
        bed.ds_b("presrs"),
    );
    create_dataset_with_data(&src, &[("a.bin", 128 << 10)]);
    zfs(&["set", "compression=on", &src]);
    zfs(&["set", "recordsize=16K", &src]);
    zfs(&["set", "com.example:tag=kept here", &src]);
    let target = remote(&bed.host_b, &dst);

    let out = resync(&["--preserve-properties", &src, &target]);
    out.assert_success();
    assert_replica(&src, &dst);
    // zfs-fuse's receive has no -o: set afterwards, and said once.
    assert_eq!(
        out.stderr.matches("has no zfs receive -o").count(),
        1,
        "{out}"
    );
    for (name, value) in [
        ("compression", "on"),
        ("recordsize", "16K"),
        ("com.example:tag", "kept here"),
    ] {
        assert_eq!(
            prop(&dst, name),
            (value.to_string(), "local".to_string()),
            "{name}\n{out}"
        );
    }

    // --preserve-recordsize: only the recordsize.
    let out = resync(&["--preserve-recordsize", &src, &dst2]);
    out.assert_success();
    assert_eq!(prop(&dst2, "recordsize"), ("16K".into(), "local".into()));
    assert_ne!(prop(&dst2, "compression").1, "local", "{out}");
    assert_eq!(prop(&dst2, "com.example:tag").0, "-", "{out}");
    destroy(&src);
    destroy(&dst);
    destroy(&dst2);
}

/// syncoid 2.3.0 as the project keeps it beside the repository.
fn syncoid_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/anchors/syncoid")
}

/// Runs syncoid (as root, so `--no-privilege-elevation`) and panics with
/// its output unless it succeeds.
fn syncoid(args: &[&str]) {
    let out = std::process::Command::new("perl")
        .arg(syncoid_script())
        .args(["--no-privilege-elevation", "--use-hold"])
        .args(args)
        .output()
        .expect("run syncoid");
    assert!(
        out.status.success(),
        "syncoid {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Releases syncoid's hold (`syncoid_HOSTNAME`) wherever it is on `ds`, so
/// the dataset can be destroyed.
fn release_syncoid_holds(ds: &str) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let tag = format!("syncoid_{}", host.trim());
    for (snap, _) in snapshots(ds) {
        let _ = zfs_ok(&["release", &tag, &format!("{ds}@{snap}")]);
    }
}

#[test]
fn a_target_syncoid_has_been_feeding_continues_incrementally_and_keeps_syncoids_snapshots() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("takeover"), bed.ds_b("takeover"));
    create_dataset_with_data(&src, &[("a.bin", 2 << 20)]);
    snapshot(&src, "daily-1");
    syncoid(&[&src, &dst]);
    write_files(&src, &[("b.bin", 64 << 10)]);
    // syncoid names its sync snapshots to the second: a second run within
    // the same second fails on its own "dataset already exists".
    std::thread::sleep(std::time::Duration::from_millis(1100));
    syncoid(&[&src, &dst]);
    let fed = snapshots(&dst);
    let theirs: Vec<(String, u64)> = fed
        .iter()
        .filter(|(n, _)| n.starts_with("syncoid_"))
        .cloned()
        .collect();
    assert!(
        !theirs.is_empty(),
        "syncoid left its sync snapshot: {fed:?}"
    );
    let held = &theirs[theirs.len() - 1].0;
    let userrefs = |ds: &str| {
        zfs(&[
            "get",
            "-H",
            "-o",
            "value",
            "userrefs",
            &format!("{ds}@{held}"),
        ])
        .trim()
        .to_string()
    };
    assert_eq!((userrefs(&src), userrefs(&dst)), ("1".into(), "1".into()));

    // resync takes over: one small incremental from syncoid's snapshot.
    write_files(&src, &[("c.bin", 128 << 10)]);
    let out = resync(&["--json", &src, &dst]);
    out.assert_success();
    assert_replica(&src, &dst);
    let doc: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    let bytes = doc["datasets"][0]["bytes"].as_u64().expect("bytes");
    assert!(
        bytes < 1 << 20,
        "incremental, not a full resend: {bytes} bytes\n{out}"
    );
    assert!(
        doc["datasets"][0]["first_snapshot"]
            .as_str()
            .is_some_and(|s| s.starts_with("resync_")),
        "{doc}"
    );
    // syncoid's snapshots and holds stay, and the run says once how to clean up.
    let now = snapshots(&dst);
    for snap in &theirs {
        assert!(now.contains(snap), "{snap:?} kept on the target: {now:?}");
    }
    assert!(snapshots(&src).iter().any(|(n, _)| n == held));
    assert_eq!((userrefs(&src), userrefs(&dst)), ("1".into(), "1".into()));
    assert_eq!(
        out.stderr.matches("hold syncoid's sync snapshots").count(),
        1,
        "{out}"
    );

    // And the next run is an ordinary incremental of resync's own.
    write_files(&src, &[("d.bin", 64 << 10)]);
    resync(&[&src, &dst]).assert_success();
    assert_replica(&src, &dst);
    release_syncoid_holds(&src);
    release_syncoid_holds(&dst);
    destroy(&src);
    destroy(&dst);
}

#[test]
fn force_delete_replaces_an_older_target_snapshot_that_has_a_source_snapshots_name() {
    let bed = Bed::get();
    let (src, dst) = (bed.ds_a("fdname"), bed.ds_b("fdname"));
    create_dataset_with_data(&src, &[("a.bin", 128 << 10)]);
    snapshot(&src, "a");
    write_files(&src, &[("b.bin", 64 << 10)]);
    snapshot(&src, "b");
    resync(&["--no-sync-snap", &src, &dst]).assert_success();
    // The target's old @a now goes by "weekly"; the source takes its own @weekly.
    zfs(&["rename", &format!("{dst}@a"), &format!("{dst}@weekly")]);
    let theirs = guid(&dst, "weekly");
    write_files(&src, &[("c.bin", 64 << 10)]);
    snapshot(&src, "weekly");

    let out = resync(&["--no-sync-snap", &src, &dst]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("is not the same snapshot"), "{out}");
    assert_eq!(
        guid(&dst, "weekly"),
        theirs,
        "nothing changed without --force-delete"
    );

    let out = resync(&["--no-sync-snap", "--force-delete", &src, &dst]);
    out.assert_success();
    assert!(out.stderr.contains("--force-delete: destroying"), "{out}");
    assert_eq!(names(&dst), ["b", "weekly"], "{out}");
    assert_eq!(guid(&dst, "weekly"), guid(&src, "weekly"));
    assert_replica(&src, &dst);
    destroy(&src);
    destroy(&dst);
}

#[test]
fn clones_under_r_arrive_as_clones_unless_no_clone_handling() {
    let bed = Bed::get();
    let (src, dst, dst2) = (bed.ds_a("clones"), bed.ds_b("clones"), bed.ds_b("noclones"));
    zfs(&["create", &src]);
    zfs(&["create", &dst]);
    zfs(&["create", &dst2]);
    let base = format!("{src}/base");
    create_dataset_with_data(&base, &[("big.bin", 2 << 20)]);
    snapshot(&base, "s1");
    // Named to sort before its origin: resync must send the origin first.
    let clone = format!("{src}/aclone");
    zfs(&["clone", &format!("{base}@s1"), &clone]);
    write_files(&clone, &[("small.bin", 32 << 10)]);
    snapshot(&clone, "c1");

    let out = resync(&["-r", "--skip-parent", "--no-sync-snap", &src, &dst]);
    out.assert_success();
    let origin = |ds: &str| {
        zfs(&["get", "-H", "-o", "value", "origin", ds])
            .trim()
            .to_string()
    };
    assert_eq!(
        origin(&format!("{dst}/aclone")),
        format!("{dst}/base@s1"),
        "{out}"
    );
    assert!(out.stderr.contains("as a clone of"), "{out}");
    assert_replica(&clone, &format!("{dst}/aclone"));
    assert_replica(&base, &format!("{dst}/base"));
    // The clone stream carried only what the clone added.
    let used: u64 = zfs(&[
        "get",
        "-Hp",
        "-o",
        "value",
        "used",
        &format!("{dst}/aclone"),
    ])
    .trim()
    .parse()
    .expect("used");
    assert!(
        used < 1 << 20,
        "a clone shares its origin's blocks: used {used}"
    );
    // An incremental onto the clone is an ordinary one.
    write_files(&clone, &[("more.bin", 16 << 10)]);
    snapshot(&clone, "c2");
    resync(&["-r", "--skip-parent", "--no-sync-snap", &src, &dst]).assert_success();
    assert_replica(&clone, &format!("{dst}/aclone"));

    let out = resync(&[
        "-r",
        "--skip-parent",
        "--no-sync-snap",
        "--no-clone-handling",
        &src,
        &dst2,
    ]);
    out.assert_success();
    assert_eq!(
        origin(&format!("{dst2}/aclone")),
        "-",
        "sent in full:\n{out}"
    );
    assert_replica(&clone, &format!("{dst2}/aclone"));
    // Clones before their origins' snapshots.
    destroy(&format!("{dst}/aclone"));
    destroy(&dst);
    destroy(&dst2);
    destroy(&clone);
    destroy(&src);
}
