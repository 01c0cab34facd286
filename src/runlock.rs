//! The run lock: one resync run per target at a time, and a record of the
//! remote processes a run started so that the next run can stop what an
//! interrupted one left behind.
//!
//! Why: when a link dies mid-stream, the remote `zfs receive` (and the sshd
//! session feeding it) lives on for hours, because sshd has no way to learn
//! that the client is gone. It keeps the target busy, and the next run would
//! see a half-received dataset. So every run holds an `flock` on a small
//! file named after its target, and writes into it the host, pid and parent
//! pid of each `zfs send`/`zfs receive` it starts. A later run that gets the
//! lock knows the writer is dead (the kernel released its lock), so the
//! recorded processes are orphans: it checks on their host that each pid is
//! still a `zfs send`/`receive`, stops it and its sshd session, and waits for
//! it to exit, before it plans anything. A run that cannot get the lock is
//! refused, naming the run that holds it.
//!
//! On a host where the user is not root, the recorded process is the
//! user's `sudo -n zfs ...` (its real uid is the user's): the stop script,
//! run as that user without sudo, may signal it, and sudo passes the signal
//! on to the root `zfs` it runs; the sshd session is the user's own.
//!
//! File format (text, one record per line, rewritten whole each time):
//! `run PID UNIX_TIME TARGET` then `proc HOST_LABEL PID PPID` lines, and
//! in `--chunked` mode a `session ID on HOST` line.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};

use crate::sys::{self, Unpoisoned};

/// A process a run started on some host, and what identifies it beyond its
/// pid (which the kernel reuses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteProc {
    pub host: String,
    pub pid: u32,
    pub ppid: u32,
    /// Its start time, in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start: u64,
    /// The argv it was started with.
    pub argv: Vec<String>,
}

/// What the lock file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Record {
    run_pid: Option<u32>,
    started: Option<u64>,
    target: String,
    procs: Vec<RemoteProc>,
    /// The `--chunked` session the run drives, e.g. `ID on HOST`.
    session: Option<String>,
}

fn parse(text: &str) -> Record {
    let mut rec = Record::default();
    for line in text.lines() {
        let mut f = line.split(' ');
        match f.next() {
            Some("run") => {
                rec.run_pid = f.next().and_then(|p| p.parse().ok());
                rec.started = f.next().and_then(|t| t.parse().ok());
                rec.target = f.collect::<Vec<_>>().join(" ");
            }
            Some("proc") => {
                let (Some(host), Some(pid), Some(ppid), Some(start), Some(argv), None) =
                    (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
                else {
                    continue;
                };
                let (Ok(pid), Ok(ppid), Ok(start), Some(argv)) =
                    (pid.parse(), ppid.parse(), start.parse(), decode_argv(argv))
                else {
                    continue;
                };
                // pid 0 and 1 are never ours to stop.
                if pid > 1 && ppid > 1 {
                    rec.procs.push(RemoteProc {
                        host: host.to_string(),
                        pid,
                        ppid,
                        start,
                        argv,
                    });
                }
            }
            Some("session") => {
                let rest = f.collect::<Vec<_>>().join(" ");
                rec.session = (!rest.is_empty()).then_some(rest);
            }
            _ => {}
        }
    }
    rec
}

fn render(rec: &Record) -> String {
    let mut s = format!(
        "run {} {} {}\n",
        rec.run_pid.unwrap_or(0),
        rec.started.unwrap_or(0),
        rec.target.replace('\n', " ")
    );
    for p in &rec.procs {
        s.push_str(&format!(
            "proc {} {} {} {} {}\n",
            p.host,
            p.pid,
            p.ppid,
            p.start,
            encode_argv(&p.argv)
        ));
    }
    if let Some(sess) = &rec.session {
        s.push_str(&format!("session {}\n", sess.replace('\n', " ")));
    }
    s
}

/// An argv as one word: its NUL-joined bytes in hex.
fn encode_argv(argv: &[String]) -> String {
    sys::hex(argv.join("\0").as_bytes())
}

fn decode_argv(word: &str) -> Option<Vec<String>> {
    if !word.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..word.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(word.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    Some(text.split('\0').map(str::to_string).collect())
}

/// Held for the whole run; the kernel releases it when the process dies.
pub struct RunLock {
    file: Mutex<File>,
    record: Mutex<Record>,
    leftovers: Vec<RemoteProc>,
}

/// Where lock files live: `$RESYNC_LOCK_DIR`, else a runtime directory for
/// root, else the user's runtime directory, else `~/.cache/resync`, else
/// `$TMPDIR/resync-UID` (which [`private_dir`] checks before use).
fn lock_dir(env: &dyn Fn(&str) -> Option<OsString>, euid: u32) -> PathBuf {
    if let Some(dir) = env("RESYNC_LOCK_DIR") {
        return dir.into();
    }
    if euid == 0 {
        return PathBuf::from("/run/resync");
    }
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("resync");
    }
    if let Some(home) = env("HOME") {
        return Path::new(&home).join(".cache/resync");
    }
    let tmp = env("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    tmp.join(format!("resync-{euid}"))
}

/// Makes sure `dir` is a private directory of ours: creates it with mode
/// 0700 (its parents as needed), and refuses one that is a symlink, not a
/// directory, owned by another user, or writable by group or others (in a
/// shared `/tmp` another user may have made it first, to read or replace
/// our lock files).
fn private_dir(dir: &Path, euid: u32) -> Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot create lock directory {}", dir.display()))
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect lock directory {}", dir.display()))?;
    let shown = dir.display();
    if meta.file_type().is_symlink() {
        bail!("refusing lock directory {shown}: it is a symbolic link");
    }
    if !meta.is_dir() {
        bail!("refusing lock directory {shown}: it is not a directory");
    }
    if meta.uid() != euid {
        bail!(
            "refusing lock directory {shown}: it belongs to uid {}, not to us (uid {euid})",
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "refusing lock directory {shown}: group or others may write to it (mode {:o})",
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// The name of the lock file for a target: the host after ssh config
/// resolution (`None` for this machine) and its port, and the dataset. How
/// the target was spelled (a user, an alias) does not change it.
fn lock_key(host: Option<(&str, u16)>, dataset: &str) -> String {
    let key = match host {
        Some((host, port)) => format!("ssh {} {port} {dataset}", host.to_ascii_lowercase()),
        None => format!("local {dataset}"),
    };
    format!("target-{}.lock", sys::hex(&Md5::digest(key.as_bytes())))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl RunLock {
    /// Takes the lock for the target dataset `dataset` on `host` (its
    /// resolved name and port; `None` for this machine), or explains who
    /// holds it. `target` is the target as the user gave it, for messages.
    pub fn for_target(host: Option<(&str, u16)>, dataset: &str, target: &str) -> Result<RunLock> {
        let euid = euid();
        let dir = lock_dir(&|var| std::env::var_os(var), euid);
        private_dir(&dir, euid)?;
        RunLock::acquire_at(&dir.join(lock_key(host, dataset)), target)
    }

    fn acquire_at(path: &Path, target: &str) -> Result<RunLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let locked =
            sys::try_flock(&file).with_context(|| format!("cannot lock {}", path.display()))?;
        let mut text = String::new();
        file.read_to_string(&mut text).ok();
        let old = parse(&text);
        if !locked {
            let age = old
                .started
                .and_then(|t| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .ok()
                        .map(|n| n.as_secs().saturating_sub(t))
                })
                .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string())
                .unwrap_or_else(|| "unknown time".into());
            let pid = old.run_pid.map_or("?".to_string(), |p| p.to_string());
            if let Some(sess) = &old.session {
                bail!(
                    "refused: {target} is being replicated by session {sess} (started {age} ago by resync pid {pid} on this host); wait for it or stop it"
                );
            }
            bail!(
                "another resync run (pid {pid}, started {age} ago) is replicating into {target}; wait for it to finish or stop it",
            );
        }
        let record = Record {
            run_pid: Some(std::process::id()),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
            target: target.to_string(),
            procs: old.procs.clone(),
            session: None,
        };
        let lock = RunLock {
            file: Mutex::new(file),
            record: Mutex::new(record),
            leftovers: old.procs,
        };
        lock.write()?;
        Ok(lock)
    }

    /// Processes recorded by an earlier run that did not finish.
    pub fn leftovers(&self) -> &[RemoteProc] {
        &self.leftovers
    }

    /// Records a process this run started.
    pub fn record(&self, proc_: RemoteProc) -> Result<()> {
        self.record.locked().procs.push(proc_);
        self.write()
    }

    /// Records the `--chunked` session this run drives now (`ID on HOST`),
    /// for the message that refuses a second run.
    pub fn note_session(&self, session: &str) -> Result<()> {
        self.record.locked().session = Some(session.to_string());
        self.write()
    }

    /// Forgets processes: they exited, or were stopped.
    pub fn forget(&self, done: &[RemoteProc]) -> Result<()> {
        self.record.locked().procs.retain(|p| !done.contains(p));
        self.write()
    }

    fn write(&self) -> Result<()> {
        let text = render(&self.record.locked());
        let mut file = self.file.locked();
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(text.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }
}

/// A POSIX sh script, run as `sh -c SCRIPT sh PID START ARGV...` on the
/// host that ran the process: if PID is still the process that was started
/// there (its start time is START and its command line is ARGV, where a
/// script's interpreter may stand before ARGV's program, whose name then
/// comes as a path), stop it and the sshd session that runs it (its parent,
/// or the parent's parent when the parent is the login shell; never further
/// up), whose open pipe would otherwise keep zfs-fuse's daemon waiting; then
/// wait up to 20 s for it to go, and SIGKILL it if it still is the same
/// process. Prints `stopped` if it stopped anything. A pid now used by
/// another process, and hosts without /proc, are left alone.
pub const STOP_SCRIPT: &str = r#"pid=$1 start=$2 name=${3##*/}
shift 3
nl='
'
info() {
  s=
  { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  set -f
  set -- $s
  set +f
  ppid=$2 started=${20}
}
same() { info "$pid" && [ "$started" = "$start" ]; }
same || exit 0
want=$(printf '%s\n' "$@")
have=$(tr '\000' '\n' < "/proc/$pid/cmdline") 2>/dev/null || exit 0
if [ -n "$want" ]; then
  case "$have" in *"$nl$want") head=${have%"$nl$want"} ;; *) exit 0 ;; esac
else
  head=$have
fi
[ "${head##*[/$nl]}" = "$name" ] || exit 0
kill "$pid" 2>/dev/null
p=$ppid
for level in 1 2; do
  [ -r "/proc/$p/comm" ] || break
  case "$(cat "/proc/$p/comm")" in
    sshd*) kill "$p" 2>/dev/null; break ;;
    sh|bash|dash|zsh|ksh|mksh|ash) info "$p" || break; p=$ppid ;;
    *) break ;;
  esac
done
n=0
while [ $n -lt 20 ] && same; do sleep 1; n=$((n+1)); done
same && kill -9 "$pid" 2>/dev/null
echo stopped"#;

/// The argv that runs [`STOP_SCRIPT`] for one process.
pub fn stop_argv(p: &RemoteProc) -> Vec<String> {
    let mut v = vec![
        "sh".into(),
        "-c".into(),
        STOP_SCRIPT.into(),
        "sh".into(),
        p.pid.to_string(),
        p.start.to_string(),
    ];
    v.extend(p.argv.iter().cloned());
    v
}

/// Wraps argv so that the process first prints `PID PPID START` on a line
/// of its own (to stdout; START is field 22 of its `/proc/PID/stat`, empty
/// without /proc), then becomes the command: the process we record.
pub fn announce_pid_argv(argv: &[String]) -> Vec<String> {
    let mut v = vec![
        "sh".into(),
        "-c".into(),
        ANNOUNCE_SCRIPT.into(),
        "resync".into(),
    ];
    v.extend_from_slice(argv);
    v
}

const ANNOUNCE_SCRIPT: &str = r#"st=
f() { [ $# -ge 20 ] && st=${20}; }
s=
{ read -r s < /proc/$$/stat; } 2>/dev/null
s=${s##*) }
set -f
f $s
set +f
echo "$$ $PPID $st"
exec "$@""#;

/// Parses the `PID PPID START` line [`announce_pid_argv`] prints.
pub fn parse_announcement(line: &str) -> Result<(u32, u32, Option<u64>)> {
    let mut f = line.split_whitespace();
    let fields = (f.next().map(str::parse), f.next().map(str::parse));
    let start = f.next().map(str::parse::<u64>);
    match (fields, start, f.next()) {
        ((Some(Ok(pid)), Some(Ok(ppid))), None, None) => Ok((pid, ppid, None)),
        ((Some(Ok(pid)), Some(Ok(ppid))), Some(Ok(start)), None) => Ok((pid, ppid, Some(start))),
        _ => bail!("unexpected first line from the remote command: {line:?}"),
    }
}

/// Reads the line a command wrapped by [`announce_pid_argv`] prints first,
/// leaving `out` at the first byte of the command's own output, and returns
/// the process to record: `argv` (as given to [`announce_pid_argv`]) on
/// `host`. `Ok(None)` when the host has no /proc to tell its start time:
/// such a process cannot be verified later, so it is not recorded.
pub fn read_announcement(
    out: &mut dyn Read,
    host: &str,
    argv: &[String],
) -> Result<Option<RemoteProc>> {
    let Some(line) = sys::read_line_exact(out, 64)? else {
        bail!("the command ended before it started; is sh there?");
    };
    let (pid, ppid, start) = parse_announcement(&line)?;
    Ok(start.map(|start| RemoteProc {
        host: host.to_string(),
        pid,
        ppid,
        start,
        argv: argv.to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn proc_(pid: u32, start: u64, argv: &[&str]) -> RemoteProc {
        RemoteProc {
            host: "root@b".into(),
            pid,
            ppid: 99,
            start,
            argv: argv.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn records_round_trip_and_garbage_is_ignored() {
        let rec = Record {
            run_pid: Some(42),
            started: Some(1_700_000_000),
            target: "root@b:pool/vm".into(),
            procs: vec![proc_(100, 123456, &["zfs", "receive", "-F", "pool/a b"])],
            session: Some("0123456789abcdef on root@b".into()),
        };
        assert_eq!(parse(&render(&rec)), rec);
        let junk = parse(
            "proc x y z 1 7a\nproc h 1 2 3 7a\nproc h 5\nwhat\nproc h 7 8 9 7a66\n\
             proc h 10 11\nproc h 12 13 14 7\n",
        );
        assert_eq!(
            junk.procs,
            vec![RemoteProc {
                host: "h".into(),
                pid: 7,
                ppid: 8,
                start: 9,
                argv: vec!["zf".into()]
            }],
            "pid 1, malformed lines and lines without start time and argv are dropped"
        );
    }

    #[test]
    fn announcements_parse_strictly() {
        assert_eq!(
            parse_announcement("123 45 6789\n").unwrap(),
            (123, 45, Some(6789))
        );
        assert_eq!(parse_announcement("123 45 \n").unwrap(), (123, 45, None));
        for bad in ["", "x 1", "1", "1 2 x", "1 2 3 4", "-1 2"] {
            assert!(parse_announcement(bad).is_err(), "{bad:?}");
        }
    }

    /// Field 22 of /proc/PID/stat, read the way the kernel documents it
    /// (after the last ')' of the command name).
    fn start_time(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(19).unwrap().parse().unwrap()
    }

    #[test]
    fn the_announcement_names_the_process_with_its_start_time_and_argv() {
        let argv: Vec<String> = ["sh", "-c", "echo 'real output'; sleep 1", "x y"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let wrapped = announce_pid_argv(&argv);
        let mut child = std::process::Command::new(&wrapped[0])
            .args(&wrapped[1..])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let p = read_announcement(&mut out, "local", &argv)
            .unwrap()
            .expect("this machine has /proc");
        assert_eq!(p.pid, child.id());
        assert_eq!(p.ppid, std::process::id());
        assert_eq!(p.start, start_time(child.id()));
        assert_eq!(p.argv, argv);
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "real output\n", "the reader is left at the output");
        child.wait().unwrap();
    }

    /// Runs the stop script for `p` here; true when it said it stopped it.
    fn stop(p: &RemoteProc) -> bool {
        let argv = stop_argv(p);
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).contains("stopped")
    }

    #[test]
    fn the_stop_script_stops_only_the_very_process_that_was_recorded() {
        // A fake `zfs` script: its command line reads
        // `/bin/sh DIR/zfs receive -F pool/x`, as a wrapper's would.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("zfs");
        std::fs::write(&fake, "#!/bin/sh\nsleep 60\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let fake = fake.to_str().unwrap().to_string();
        let mut victim = std::process::Command::new(&fake)
            .args(["receive", "-F", "pool/x"])
            .spawn()
            .unwrap();
        let mut bystander = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let (pid, start) = (victim.id(), start_time(victim.id()));
        let other = (bystander.id(), start_time(bystander.id()));

        // The pid was reused: another start time. The old check (is it a
        // `zfs receive`?) would have killed it.
        assert!(!stop(&proc_(
            pid,
            start + 1,
            &["zfs", "receive", "-F", "pool/x"]
        )));
        // Same process start, but another command line.
        assert!(!stop(&proc_(
            pid,
            start,
            &["zfs", "receive", "-F", "pool/y"]
        )));
        assert!(!stop(&proc_(pid, start, &["zfs", "send", "-F", "pool/x"])));
        assert!(!stop(&proc_(
            pid,
            start,
            &["zfsx", "receive", "-F", "pool/x"]
        )));
        // A bystander whose pid we recorded with a zfs argv.
        assert!(!stop(&proc_(
            other.0,
            other.1,
            &["zfs", "receive", "pool/x"]
        )));
        std::thread::sleep(Duration::from_millis(100));
        assert!(victim.try_wait().unwrap().is_none(), "nothing was killed");
        assert!(bystander.try_wait().unwrap().is_none());

        // The very process: stopped.
        assert!(stop(&proc_(
            pid,
            start,
            &[&fake, "receive", "-F", "pool/x"]
        )));
        let waited = std::time::Instant::now();
        while victim.try_wait().unwrap().is_none() {
            assert!(waited.elapsed() < Duration::from_secs(5), "still running");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Found through PATH, argv[0] is just the name.
        assert!(!stop(&proc_(
            pid,
            start,
            &["zfs", "receive", "-F", "pool/x"]
        )));
        let _ = bystander.kill();
        let _ = bystander.wait();
    }

    #[test]
    fn a_second_lock_on_the_same_target_is_refused_and_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(lock_key(Some(("b", 22)), "pool/test-lock"));
        let first = RunLock::acquire_at(&path, "root@b:pool/test-lock").unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another process would.
        let err = RunLock::acquire_at(&path, "root@b:pool/test-lock")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        assert!(err.contains("root@b:pool/test-lock"), "{err}");
        first.note_session("0123456789abcdef on root@b").unwrap();
        let err = RunLock::acquire_at(&path, "root@b:pool/test-lock")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("refused: root@b:pool/test-lock is being replicated by session 0123456789abcdef on root@b (started "),
            "a chunked run's session is named: {err}"
        );
        first
            .record(proc_(10, 5, &["zfs", "receive", "pool/x"]))
            .unwrap();
        drop(first);
        // Another test's child process may hold a copy of the lock's file
        // descriptor between its fork and its exec: give that a moment.
        let mut tries = 0;
        let second = loop {
            match RunLock::acquire_at(&path, "b:pool/test-lock") {
                Ok(lock) => break lock,
                Err(e) if tries < 20 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("{e:#}"),
            }
        };
        assert_eq!(
            second.leftovers(),
            &[proc_(10, 5, &["zfs", "receive", "pool/x"])],
            "the dead run's processes are handed over"
        );
        second.forget(second.leftovers()).unwrap();
        drop(second);
        let third = RunLock::acquire_at(&path, "b:pool/test-lock").unwrap();
        assert!(third.leftovers().is_empty());
    }

    #[test]
    fn every_spelling_of_a_target_shares_one_lock() {
        use crate::host::ssh::{resolve_address, SshOptions, SshSpec};
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
        std::fs::write(
            home.path().join(".ssh/config"),
            "Host vault\n    HostName Backup\nHost other-port\n    HostName backup\n    Port 2222\n",
        )
        .unwrap();
        let opts = SshOptions::with_home(home.path().to_path_buf());
        let key = |spelled: &str| {
            let (host, port) = resolve_address(&SshSpec::parse(spelled), &opts).unwrap();
            lock_key(Some((&host, port)), "pool/vm")
        };
        let root = key("root@backup");
        assert_eq!(key("backup"), root);
        assert_eq!(key("vault"), root, "an ssh alias of the same host");
        assert_eq!(key("admin@vault"), root);
        assert_ne!(key("other-port"), root, "another port is another sshd");
        assert_ne!(key("backup2"), root);
        assert_ne!(
            lock_key(None, "pool/vm"),
            root,
            "a local pool/vm is another"
        );
        assert_ne!(
            lock_key(Some(("backup", 22)), "pool/vm2"),
            lock_key(Some(("backup", 22)), "pool/vm")
        );
    }

    #[test]
    fn the_lock_directory_falls_back_to_tmpdir_per_user() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            lock_dir(&env(&[("TMPDIR", "/var/tmp")]), 1000),
            PathBuf::from("/var/tmp/resync-1000")
        );
        assert_eq!(lock_dir(&env(&[]), 1000), PathBuf::from("/tmp/resync-1000"));
        assert_eq!(
            lock_dir(&env(&[("HOME", "/home/a"), ("TMPDIR", "/x")]), 1000),
            PathBuf::from("/home/a/.cache/resync")
        );
        assert_eq!(
            lock_dir(&env(&[("HOME", "/root")]), 0),
            PathBuf::from("/run/resync")
        );
    }

    #[test]
    fn a_lock_directory_that_is_not_private_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let me = euid();
        let fresh = tmp.path().join("resync-new");
        private_dir(&fresh, me).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700, "created private");
        private_dir(&fresh, me).expect("ours and private: used again");

        let open = tmp.path().join("resync-open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = private_dir(&open, me).unwrap_err().to_string();
        assert!(
            err.contains("group or others may write to it (mode 777)"),
            "{err}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(private_dir(&open, me).is_err(), "group-writable");

        let link = tmp.path().join("resync-link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        let err = private_dir(&link, me).unwrap_err().to_string();
        assert!(err.ends_with("it is a symbolic link"), "{err}");

        let file = tmp.path().join("resync-file");
        std::fs::write(&file, "").unwrap();
        assert!(private_dir(&file, me).is_err());

        // Another user's directory: made with another owner (the suite runs
        // as root, which may chown), or checked against another uid.
        let theirs = tmp.path().join("resync-theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = private_dir(&theirs, me + 1).unwrap_err().to_string();
        assert!(err.contains("belongs to uid"), "{err}");
    }
}
