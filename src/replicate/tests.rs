//! The decisions of a run, against a fake [`Host`] that replays real
//! (pasted) zfs output and records every argv it is given, in order: which
//! commands run for a full send, an incremental, a resume from a real
//! OpenZFS resume token, a diverged target, `--force-delete` and a dry run.

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use super::Run;
use crate::cli::{Cli, Config, Location};
use crate::endpoint::dryrun::DryRun;
use crate::endpoint::{Changes, ZfsHost};
use crate::host::reconnect::Reconnecting;
use crate::host::{Child, CmdOutput, ExitInfo, Host};
use crate::progress::{Progress, Transfer};
use crate::zfs::{Capabilities, Privileges};
use clap::Parser;

/// Every command either fake host was given, as `label: argv`.
type Log = Arc<Mutex<Vec<String>>>;

/// A host whose `zfs` answers from a script: each argv (joined by spaces)
/// has a queue of replies, the last of which repeats. Unknown commands
/// fail, like a zfs that does not know them. Spawned commands (`zfs send`,
/// `zfs receive`) print the pid announcement, then (send) a few bytes.
struct FakeHost {
    label: &'static str,
    replies: Mutex<HashMap<String, Vec<CmdOutput>>>,
    log: Log,
}

impl FakeHost {
    fn new(label: &'static str, log: &Log) -> FakeHost {
        FakeHost {
            label,
            replies: Mutex::new(HashMap::new()),
            log: log.clone(),
        }
    }

    /// `argv` answers `stdouts` in turn (exit 0), the last one from then on.
    fn replies(self, argv: &str, stdouts: &[&str]) -> FakeHost {
        let outs = stdouts
            .iter()
            .map(|s| CmdOutput {
                status: 0,
                stdout: s.to_string(),
                stderr: String::new(),
            })
            .collect();
        self.replies.lock().unwrap().insert(argv.to_string(), outs);
        self
    }

    /// `argv` answers first `missing` (exit 1, "dataset does not exist"),
    /// then `then` in turn.
    fn missing_then(self, argv: &str, ds: &str, then: &[&str]) -> FakeHost {
        let mut outs = vec![CmdOutput {
            status: 1,
            stdout: String::new(),
            stderr: format!("cannot open '{ds}': dataset does not exist\n"),
        }];
        outs.extend(then.iter().map(|s| CmdOutput {
            status: 0,
            stdout: s.to_string(),
            stderr: String::new(),
        }));
        self.replies.lock().unwrap().insert(argv.to_string(), outs);
        self
    }
}

impl Host for FakeHost {
    fn label(&self) -> &str {
        self.label
    }

    fn run(&self, argv: &[String]) -> anyhow::Result<CmdOutput> {
        let key = argv.join(" ");
        self.log
            .lock()
            .unwrap()
            .push(format!("{}: {key}", self.label));
        let mut replies = self.replies.lock().unwrap();
        Ok(match replies.get_mut(&key) {
            Some(q) if q.len() > 1 => q.remove(0),
            Some(q) => q[0].clone(),
            None => CmdOutput {
                status: 2,
                stdout: String::new(),
                stderr: format!("fake zfs: no reply for {key}\n"),
            },
        })
    }

    fn spawn(&self, argv: &[String]) -> anyhow::Result<Box<dyn Child>> {
        // Strip the pid announcement wrapper (`sh -c SCRIPT resync ...`).
        let real = &argv[4..];
        let key = real.join(" ");
        self.log
            .lock()
            .unwrap()
            .push(format!("{}: spawn {key}", self.label));
        let mut out = b"4242 1\n".to_vec();
        if real.get(1).map(String::as_str) == Some("send") {
            out.extend_from_slice(&[7u8; 5000]);
        }
        Ok(Box::new(FakeChild { stdout: Some(out) }))
    }
}

struct FakeChild {
    stdout: Option<Vec<u8>>,
}

impl Child for FakeChild {
    fn take_stdout(&mut self) -> Option<Box<dyn Read + Send>> {
        self.stdout
            .take()
            .map(|b| Box::new(Cursor::new(b)) as Box<dyn Read + Send>)
    }
    fn take_stdin(&mut self) -> Option<Box<dyn Write + Send>> {
        Some(Box::new(std::io::sink()))
    }
    fn wait(self: Box<Self>) -> anyhow::Result<ExitInfo> {
        Ok(ExitInfo {
            status: 0,
            stderr: String::new(),
        })
    }
    fn kill(&mut self) {}
}

/// Collects what the run says.
#[derive(Default)]
struct Said(Mutex<Vec<String>>);

impl Progress for Said {
    fn info(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }
    fn warn(&self, line: &str) {
        self.0.lock().unwrap().push(format!("warning: {line}"));
    }
    fn debug(&self, _: &str) {}
    fn transfer(&self, _: &str, _: Option<u64>) -> Box<dyn Transfer> {
        Box::new(NoBar)
    }
}

struct NoBar;
impl Transfer for NoBar {
    fn add(&self, _: u64) {}
    fn finish(&self) {}
}

fn config(args: &[&str]) -> Config {
    let mut argv = vec!["resync"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap().resolve().unwrap()
}

/// zfs-fuse 0.7.0: no `-t` for `zfs get`, no resume, no bookmarks, holds.
const FUSE: Capabilities = Capabilities {
    resume_tokens: false,
    get_type_filter: false,
    list_parsable: false,
    bookmarks: false,
    send_estimate: false,
    holds: true,
    written_at: false,
};

/// OpenZFS 2.x (estimates left out: the fake would have to answer them).
const OPENZFS: Capabilities = Capabilities {
    resume_tokens: true,
    get_type_filter: true,
    list_parsable: true,
    bookmarks: true,
    send_estimate: false,
    holds: true,
    written_at: false,
};

/// Runs `cfg` over the two fake hosts (`written`: the target's ZFS has
/// `written@`); returns the run's result and what it said.
fn run(
    cfg: &Config,
    caps: Capabilities,
    written: bool,
    src: FakeHost,
    dst: FakeHost,
) -> (anyhow::Result<super::Outcome>, Vec<String>, Vec<String>) {
    run_as(cfg, caps, written, src, dst, Privileges::root())
}

/// [`run`] with the target's `zfs` run with `dst_privileges`.
fn run_as(
    cfg: &Config,
    caps: Capabilities,
    written: bool,
    src: FakeHost,
    dst: FakeHost,
    dst_privileges: Privileges,
) -> (anyhow::Result<super::Outcome>, Vec<String>, Vec<String>) {
    let said = Said::default();
    let fixed = |host: FakeHost| {
        Reconnecting::new(Arc::new(host), || {
            anyhow::bail!("a fake host cannot reconnect")
        })
    };
    let dst_caps = Capabilities {
        written_at: written,
        ..caps
    };
    let src = ZfsHost::with_caps(fixed(src), Location::Local, caps, &said);
    let mut dst = ZfsHost::with_caps(fixed(dst), Location::Local, dst_caps, &said);
    dst.privileges = dst_privileges;
    let (src_dry, dst_dry) = (DryRun::new(&src), DryRun::new(&dst));
    let (src_changes, dst_changes): (&dyn Changes, &dyn Changes) = match cfg.dry_run {
        true => (&src_dry, &dst_dry),
        false => (&src, &dst),
    };
    let reports = crate::report::Reports::default();
    let r = Run {
        cfg,
        ui: &said,
        src: &src,
        dst: &dst,
        src_changes,
        dst_changes,
        hostname: "testhost".into(),
        lock: None,
        chunked: None,
        compression: None,
        direct: None,
        targets: OnceLock::new(),
        reports: &reports,
        syncoid_noted: Default::default(),
        clones: OnceLock::new(),
        prunes: Default::default(),
        destroyed: Default::default(),
        last_listed: Default::default(),
    };
    let result = r.all();
    let mut recorded = src_dry.recorded();
    recorded.extend(dst_dry.recorded());
    let said = said.0.lock().unwrap().clone();
    (result, said, recorded)
}

/// The commands that change a pool or move a stream, in order.
fn changes(log: &Log) -> Vec<String> {
    const CHANGING: [&str; 8] = [
        "spawn ",
        "zfs snapshot",
        "zfs destroy",
        "zfs rollback",
        "zfs receive -A",
        "zfs hold",
        "zfs release",
        "zfs bookmark",
    ];
    log.lock()
        .unwrap()
        .iter()
        .filter(|l| {
            let argv = l.split_once(": ").map_or("", |(_, argv)| argv);
            CHANGING.iter().any(|w| argv.starts_with(w))
        })
        .cloned()
        .collect()
}

// zfs-fuse listings of corehelp/a and of a diverged corehelp/c: the ones
// zfs/'s parser tests read.
use crate::zfs::tests::{FUSE_OUT_OF_ORDER as FUSE_C_DIVERGED, FUSE_SNAPSHOTS as FUSE_A};

/// The target `corehelp/c` as zfs-fuse lists it after receiving `snaps` of
/// corehelp/a (the GUIDs of FUSE_A, createtxgs from the diverged listing).
fn fuse_c(snaps: &[&str]) -> String {
    let mut out = String::from("corehelp/c\tguid\t337123721809533565\ncorehelp/c\tcreatetxg\t41\n");
    for (name, guid, txg) in [
        ("s1", "15434711050884566143", 45),
        ("s2", "4703203791645338451", 50),
        ("s3", "4008992829936022921", 55),
    ] {
        if snaps.contains(&name) {
            out +=
                &format!("corehelp/c@{name}\tguid\t{guid}\ncorehelp/c@{name}\tcreatetxg\t{txg}\n");
        }
    }
    out
}

const FUSE_LIST_A: &str = "zfs get -Hp -d 1 -o name,property,value guid,createtxg corehelp/a";
const FUSE_LIST_C: &str = "zfs get -Hp -d 1 -o name,property,value guid,createtxg corehelp/c";

fn fuse_source(log: &Log) -> FakeHost {
    FakeHost::new("src", log).replies(FUSE_LIST_A, &[FUSE_A])
}

#[test]
fn a_full_send_receives_without_rollback_then_sends_the_rest_incrementally() {
    let log = Log::default();
    let dst = FakeHost::new("dst", &log)
        .replies("zfs list -H -o name corehelp", &["corehelp\n"])
        .missing_then(
            FUSE_LIST_C,
            "corehelp/c",
            // The run's listing, then the one after both receives, which
            // verifies them.
            &[&fuse_c(&["s1", "s2", "s3"])],
        );
    let cfg = config(&["--no-sync-snap", "corehelp/a", "corehelp/c"]);
    let (result, _, _) = run(&cfg, FUSE, false, fuse_source(&log), dst);
    assert_eq!(result.unwrap().replicated, 1);
    assert_eq!(
        changes(&log),
        [
            // A new dataset: nothing to roll back, so no -F.
            "dst: spawn zfs receive corehelp/c",
            "src: spawn zfs send corehelp/a@s1",
            // zfs-fuse cannot say whether the target changed since @s1
            // (no written@): -F, as before.
            "dst: spawn zfs receive -F corehelp/c",
            "src: spawn zfs send -I corehelp/a@s1 corehelp/a@s3",
        ]
    );
}

#[test]
fn a_target_reached_as_a_non_root_user_runs_every_zfs_command_through_sudo() {
    let log = Log::default();
    let sudo = |argv: &str| format!("sudo -n {argv}");
    let dst = FakeHost::new("dst", &log)
        .replies(&sudo("zfs list -H -o name corehelp"), &["corehelp\n"])
        .missing_then(
            &sudo(FUSE_LIST_C),
            "corehelp/c",
            &[&fuse_c(&["s1", "s2", "s3"])],
        );
    let cfg = config(&["--no-sync-snap", "corehelp/a", "corehelp/c"]);
    let backup = Privileges::decide("backup", false, false);
    let (result, _, _) = run_as(&cfg, FUSE, false, fuse_source(&log), dst, backup);
    assert_eq!(result.unwrap().replicated, 1);
    assert_eq!(
        changes(&log),
        [
            "dst: spawn sudo -n zfs receive corehelp/c",
            "src: spawn zfs send corehelp/a@s1",
            "dst: spawn sudo -n zfs receive -F corehelp/c",
            "src: spawn zfs send -I corehelp/a@s1 corehelp/a@s3",
        ]
    );
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("dst: "))
            .all(|l| l.starts_with("dst: sudo -n zfs ") || l.starts_with("dst: spawn sudo -n zfs ")),
        "every target command through sudo: {log:?}"
    );
}

#[test]
fn a_diverged_target_is_refused_and_nothing_is_destroyed_or_received() {
    let log = Log::default();
    let dst = FakeHost::new("dst", &log)
        .replies("zfs list -H -o name corehelp", &["corehelp\n"])
        .replies(FUSE_LIST_C, &[FUSE_C_DIVERGED]);
    let cfg = config(&["--no-sync-snap", "corehelp/a", "corehelp/c"]);
    let (result, _, _) = run(&cfg, FUSE, false, fuse_source(&log), dst);
    let err = format!("{:#}", result.err().expect("a conflict"));
    assert!(
        err.contains("extra"),
        "the refusal names the target's own snapshot: {err}"
    );
    assert_eq!(changes(&log), Vec::<String>::new());
}

#[test]
fn a_dry_run_runs_no_command_that_changes_anything() {
    let log = Log::default();
    let dst = FakeHost::new("dst", &log)
        .replies("zfs list -H -o name corehelp", &["corehelp\n"])
        .missing_then(FUSE_LIST_C, "corehelp/c", &[]);
    let cfg = config(&["--dry-run", "corehelp/a", "corehelp/c"]);
    let (result, _, recorded) = run(&cfg, FUSE, false, fuse_source(&log), dst);
    assert_eq!(result.unwrap().replicated, 1);
    assert_eq!(changes(&log), Vec::<String>::new());
    // The sync snapshot it would take is what it would have sent.
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert!(
        recorded[0].starts_with("would snapshot corehelp/a@resync_testhost_"),
        "{recorded:?}"
    );
}

// The OpenZFS 2.3.2 test guest (token.rs's fixtures): ozs/tokfix@s1 (guid
// 10045012655411321857) and @s2 (guid 11627777177197314544).
// zfs get -Hp -d 1 -t snapshot,bookmark -o name,property,value guid,createtxg ozs/tokfix
const OZ_SOURCE: &str = "\
ozs/tokfix@s1\tguid\t10045012655411321857
ozs/tokfix@s1\tcreatetxg\t2214
ozs/tokfix@s2\tguid\t11627777177197314544
ozs/tokfix@s2\tcreatetxg\t2220
";
// zfs get -Hp -d 1 -t snapshot -o name,property,value guid,createtxg ozt/tokfix
const OZ_TARGET_S1: &str = "\
ozt/tokfix@s1\tguid\t10045012655411321857
ozt/tokfix@s1\tcreatetxg\t2231
";
const OZ_TARGET_S2: &str = "\
ozt/tokfix@s1\tguid\t10045012655411321857
ozt/tokfix@s1\tcreatetxg\t2231
ozt/tokfix@s2\tguid\t11627777177197314544
ozt/tokfix@s2\tcreatetxg\t2240
";
/// `zfs send -c -i @s1 ozs/tokfix@s2 | head -c 700000 | zfs receive -s
/// ozt/tokfix; zfs get -H -o value receive_resume_token ozt/tokfix`
const OZ_TOKEN: &str = "1-dad37d1d4-100-789c636064000310a501c49c50360710a715e5e7a69766a6304001638c84d029def46e05209b1d495d7e52566a7209030333541d867c5a5a716a09039407916743924faa2c492d0649087061d55f920f71c58746dbbc3d9a710b3590e439c1f27989b9a9407baa8af54bf2b3d3322b1c8a8da0e670c3dc0ec4c9f9b90545a9c5c5f9d90c700000df0520b3";

const OZ_LIST_SRC: &str = "zfs get -Hp -d 1 -t filesystem,volume,snapshot,bookmark -o name,property,value guid,createtxg,receive_resume_token ozs/tokfix";
/// The run's one listing of the target (`ZfsHost::tree`).
const OZ_TREE_DST: &str = "zfs get -Hp -d 1 -t filesystem,volume,snapshot,bookmark -o name,property,value guid,createtxg,receive_resume_token ozt/tokfix";
const OZ_LIST_DST: &str =
    "zfs get -Hp -d 1 -t snapshot -o name,property,value guid,createtxg ozt/tokfix";
const OZ_TOKEN_DST: &str = "zfs get -H -o value receive_resume_token ozt/tokfix";
const OZ_WRITTEN: &str = "zfs get -Hp -o property,value written@s1,receive_resume_token ozt/tokfix";

/// The target's tree listing: `snapshots` and the resume token (`-`: none).
fn oz_tree(snapshots: &str, token: &str) -> String {
    format!("ozt/tokfix\treceive_resume_token\t{token}\n{snapshots}")
}

fn oz_source(log: &Log) -> FakeHost {
    FakeHost::new("src", log).replies(OZ_LIST_SRC, &[OZ_SOURCE])
}

/// An OpenZFS target at @s1, with `written@s1` answering `written`.
fn oz_target(log: &Log, written: &str) -> FakeHost {
    FakeHost::new("dst", log)
        .replies("zfs list -H -o name ozt", &["ozt\n"])
        .replies(OZ_TREE_DST, &[&oz_tree(OZ_TARGET_S1, "-")])
        // written@'s base, then the listing that verifies the receive.
        .replies(OZ_LIST_DST, &[OZ_TARGET_S1, OZ_TARGET_S2])
        .replies(OZ_TOKEN_DST, &["-\n"])
        .replies(
            OZ_WRITTEN,
            &[&format!("written@s1\t{written}\nreceive_resume_token\t-\n")],
        )
}

#[test]
fn an_unmodified_target_receives_an_incremental_without_rollback() {
    let log = Log::default();
    let cfg = config(&["--no-sync-snap", "ozs/tokfix", "ozt/tokfix"]);
    let (result, _, _) = run(&cfg, OPENZFS, true, oz_source(&log), oz_target(&log, "0"));
    assert_eq!(result.unwrap().replicated, 1);
    assert_eq!(
        changes(&log),
        [
            "dst: spawn zfs receive -s ozt/tokfix",
            "src: spawn zfs send -I ozs/tokfix@s1 ozs/tokfix@s2",
        ]
    );
}

#[test]
fn a_target_written_since_the_base_is_rolled_back_and_the_log_says_so() {
    let log = Log::default();
    let cfg = config(&["--no-sync-snap", "ozs/tokfix", "ozt/tokfix"]);
    let (result, said, _) = run(
        &cfg,
        OPENZFS,
        true,
        oz_source(&log),
        oz_target(&log, "1183744"),
    );
    assert_eq!(result.unwrap().replicated, 1);
    assert_eq!(
        changes(&log),
        [
            "dst: spawn zfs receive -s -F ozt/tokfix",
            "src: spawn zfs send -I ozs/tokfix@s1 ozs/tokfix@s2",
        ]
    );
    assert!(
        said.iter()
            .any(|l| l.contains("changed since @s1") && l.contains("-F")),
        "{said:?}"
    );
}

#[test]
fn no_rollback_means_no_dash_f_even_on_a_written_target() {
    let log = Log::default();
    let cfg = config(&[
        "--no-sync-snap",
        "--no-rollback",
        "ozs/tokfix",
        "ozt/tokfix",
    ]);
    let _ = run(
        &cfg,
        OPENZFS,
        true,
        oz_source(&log),
        oz_target(&log, "1183744"),
    );
    assert_eq!(changes(&log)[0], "dst: spawn zfs receive -s ozt/tokfix");
}

#[test]
fn an_interrupted_receive_resumes_from_its_token() {
    let log = Log::default();
    let dst = FakeHost::new("dst", &log)
        .replies("zfs list -H -o name ozt", &["ozt\n"])
        .replies(OZ_TREE_DST, &[&oz_tree(OZ_TARGET_S1, OZ_TOKEN)])
        .replies(OZ_LIST_DST, &[OZ_TARGET_S1, OZ_TARGET_S1, OZ_TARGET_S2])
        .replies(OZ_TOKEN_DST, &["-\n"])
        .replies(OZ_WRITTEN, &["written@s1\t0\nreceive_resume_token\t-\n"]);
    let cfg = config(&["--no-sync-snap", "ozs/tokfix", "ozt/tokfix"]);
    let (result, said, _) = run(&cfg, OPENZFS, true, oz_source(&log), dst);
    assert_eq!(result.unwrap().replicated, 1);
    assert_eq!(
        changes(&log),
        [
            "dst: spawn zfs receive -s ozt/tokfix".to_string(),
            format!("src: spawn zfs send -t {OZ_TOKEN}"),
        ]
    );
    assert!(said.iter().any(|l| l.contains("resuming")), "{said:?}");
}

/// Source corehelp/a; the target has no snapshot in common (a
/// re-created source), so `--force-delete` plans to destroy it; below it
/// `zfs list -r` shows `below`.
fn force_delete_target(log: &Log, below: &str) -> FakeHost {
    FakeHost::new("dst", log)
        .replies("zfs list -H -o name corehelp", &["corehelp\n"])
        .replies(
            FUSE_LIST_C,
            &[
                "corehelp/c\tguid\t337123721809533565\ncorehelp/c\tcreatetxg\t41\n\
                 corehelp/c@old\tguid\t9535134434245482847\ncorehelp/c@old\tcreatetxg\t68\n",
            ],
        )
        .replies(
            "zfs list -H -o name -r -t filesystem,volume corehelp/c",
            &[below],
        )
}

#[test]
fn force_delete_refuses_when_the_target_has_children_outside_the_run() {
    let log = Log::default();
    let dst = force_delete_target(&log, "corehelp/c\ncorehelp/c/other-job\n");
    let cfg = config(&[
        "--no-sync-snap",
        "--force-delete",
        "corehelp/a",
        "corehelp/c",
    ]);
    let (result, _, _) = run(&cfg, FUSE, false, fuse_source(&log), dst);
    let err = format!("{:#}", result.err().expect("a refusal"));
    assert!(err.contains("corehelp/c/other-job"), "{err}");
    assert_eq!(changes(&log), Vec::<String>::new());
}

#[test]
fn force_delete_destroys_a_target_without_children_and_names_it() {
    let log = Log::default();
    let dst = force_delete_target(&log, "corehelp/c\n");
    let cfg = config(&[
        "--no-sync-snap",
        "--force-delete",
        "corehelp/a",
        "corehelp/c",
    ]);
    let (_, said, _) = run(&cfg, FUSE, false, fuse_source(&log), dst);
    assert_eq!(
        changes(&log).first().map(String::as_str),
        Some("dst: zfs destroy -r corehelp/c")
    );
    assert!(
        said.iter()
            .any(|l| l.contains("--force-delete: destroying corehelp/c")),
        "{said:?}"
    );
}
