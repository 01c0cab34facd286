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
//! File format (text, one record per line, rewritten whole each time):
//! `run PID UNIX_TIME TARGET` then `proc HOST_LABEL PID PPID` lines, and
//! in `--chunked` mode a `session ID on HOST` line.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};

/// A process a run started on some host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteProc {
    pub host: String,
    pub pid: u32,
    pub ppid: u32,
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
                let (Some(host), Some(pid), Some(ppid)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                if let (Ok(pid), Ok(ppid)) = (pid.parse(), ppid.parse()) {
                    // pid 0 and 1 are never ours to stop.
                    if pid > 1 && ppid > 1 {
                        rec.procs.push(RemoteProc {
                            host: host.to_string(),
                            pid,
                            ppid,
                        });
                    }
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
        s.push_str(&format!("proc {} {} {}\n", p.host, p.pid, p.ppid));
    }
    if let Some(sess) = &rec.session {
        s.push_str(&format!("session {}\n", sess.replace('\n', " ")));
    }
    s
}

/// Held for the whole run; the kernel releases it when the process dies.
pub struct RunLock {
    file: Mutex<File>,
    record: Mutex<Record>,
    leftovers: Vec<RemoteProc>,
}

/// Where lock files live: a runtime directory for root, else the user's.
fn lock_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RESYNC_LOCK_DIR") {
        return dir.into();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/resync");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("resync");
    }
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".cache/resync"),
        None => std::env::temp_dir().join(format!("resync-{}", unsafe { libc::geteuid() })),
    }
}

impl RunLock {
    /// Takes the lock for `target` (its display form, e.g.
    /// `root@backup:pool/vm`), or explains who holds it.
    pub fn acquire(target: &str) -> Result<RunLock> {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create lock directory {}", dir.display()))?;
        let digest = Md5::digest(target.as_bytes());
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("target-{name}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let mut text = String::new();
        file.read_to_string(&mut text).ok();
        let old = parse(&text);
        if rc != 0 {
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
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .procs
            .push(proc_);
        self.write()
    }

    /// Records the `--chunked` session this run drives now (`ID on HOST`),
    /// for the message that refuses a second run.
    pub fn note_session(&self, session: &str) -> Result<()> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .session = Some(session.to_string());
        self.write()
    }

    /// Forgets processes: they exited, or were stopped.
    pub fn forget(&self, done: &[RemoteProc]) -> Result<()> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .procs
            .retain(|p| !done.contains(p));
        self.write()
    }

    fn write(&self) -> Result<()> {
        let text = render(&self.record.lock().unwrap_or_else(|p| p.into_inner()));
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(text.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }
}

/// A POSIX sh script, run as `sh -c SCRIPT sh PID PPID` on the host that
/// ran the process: if PID is still a `zfs send`/`receive`, stop it and the
/// sshd session that runs it (PPID, or PPID's parent when PPID is the login
/// shell; never further up), whose open pipe would otherwise keep zfs-fuse's
/// daemon waiting; then wait up to 20 s for it to go. Prints `stopped` if it
/// stopped anything. Hosts without /proc are left alone.
pub const STOP_SCRIPT: &str = r#"pid=$1 ppid=$2
[ -r "/proc/$pid/cmdline" ] || exit 0
cmd=$(tr '\000' ' ' < "/proc/$pid/cmdline")
case "$cmd" in *zfs\ send*|*zfs\ receive*|*zfs\ recv*) ;; *) exit 0 ;; esac
kill "$pid" 2>/dev/null
p=$ppid
for level in 1 2; do
  [ -r "/proc/$p/comm" ] || break
  case "$(cat "/proc/$p/comm")" in
    sshd*) kill "$p" 2>/dev/null; break ;;
    sh|bash|dash|zsh|ksh|mksh|ash) p=$(cut -d' ' -f4 "/proc/$p/stat") || break ;;
    *) break ;;
  esac
done
n=0
while kill -0 "$pid" 2>/dev/null && [ $n -lt 20 ]; do sleep 1; n=$((n+1)); done
kill -9 "$pid" 2>/dev/null
echo stopped"#;

/// The argv that runs [`STOP_SCRIPT`] for one process.
pub fn stop_argv(p: &RemoteProc) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        STOP_SCRIPT.into(),
        "sh".into(),
        p.pid.to_string(),
        p.ppid.to_string(),
    ]
}

/// Wraps argv so that the process first prints `PID PPID` on a line of its
/// own (to stdout), then becomes the command: the pid we record.
pub fn announce_pid_argv(argv: &[String]) -> Vec<String> {
    let mut v = vec![
        "sh".into(),
        "-c".into(),
        r#"echo "$$ $PPID"; exec "$@""#.into(),
        "resync".into(),
    ];
    v.extend_from_slice(argv);
    v
}

/// Parses the `PID PPID` line [`announce_pid_argv`] prints.
pub fn parse_announcement(line: &str) -> Result<(u32, u32)> {
    let mut f = line.split_whitespace();
    match (f.next().map(str::parse), f.next().map(str::parse), f.next()) {
        (Some(Ok(pid)), Some(Ok(ppid)), None) => Ok((pid, ppid)),
        _ => bail!("unexpected first line from the remote command: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_ignored() {
        let rec = Record {
            run_pid: Some(42),
            started: Some(1_700_000_000),
            target: "root@b:pool/vm".into(),
            procs: vec![RemoteProc {
                host: "root@b".into(),
                pid: 100,
                ppid: 99,
            }],
            session: Some("0123456789abcdef on root@b".into()),
        };
        assert_eq!(parse(&render(&rec)), rec);
        let junk = parse("proc x y z\nproc h 1 2\nproc h 5\nwhat\nproc h 7 8\n");
        assert_eq!(junk.procs.len(), 1, "pid 1 and malformed lines are dropped");
        assert_eq!(junk.procs[0].pid, 7);
    }

    #[test]
    fn announcements_parse_strictly() {
        assert_eq!(parse_announcement("123 45\n").unwrap(), (123, 45));
        for bad in ["", "x 1", "1", "1 2 3", "-1 2"] {
            assert!(parse_announcement(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_second_lock_on_the_same_target_is_refused_and_names_the_first() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("RESYNC_LOCK_DIR", dir.path());
        let first = RunLock::acquire("root@b:pool/test-lock").unwrap();
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another process would.
        let err = RunLock::acquire("root@b:pool/test-lock")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        assert!(err.contains("root@b:pool/test-lock"), "{err}");
        first.note_session("0123456789abcdef on root@b").unwrap();
        let err = RunLock::acquire("root@b:pool/test-lock")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("refused: root@b:pool/test-lock is being replicated by session 0123456789abcdef on root@b (started "),
            "a chunked run's session is named: {err}"
        );
        first
            .record(RemoteProc {
                host: "root@b".into(),
                pid: 10,
                ppid: 9,
            })
            .unwrap();
        drop(first);
        let second = RunLock::acquire("root@b:pool/test-lock").unwrap();
        assert_eq!(
            second.leftovers().len(),
            1,
            "the dead run's processes are handed over"
        );
        second.forget(second.leftovers()).unwrap();
        drop(second);
        let third = RunLock::acquire("root@b:pool/test-lock").unwrap();
        assert!(third.leftovers().is_empty());
    }

    #[test]
    fn the_stop_script_stops_a_recorded_zfs_process_only() {
        // A process whose command line reads `.../zfs receive pool/x`, and
        // one that doesn't. Their "parent" is themselves: neither a shell nor
        // sshd, so the script stops nothing above them.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("zfs");
        std::fs::write(&fake, "#!/bin/sh\nsleep 60\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut victim = std::process::Command::new(&fake)
            .args(["receive", "pool/x"])
            .spawn()
            .unwrap();
        let mut bystander = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        for (child, expect_stopped) in [(&mut victim, true), (&mut bystander, false)] {
            let p = RemoteProc {
                host: "local".into(),
                pid: child.id(),
                ppid: child.id(),
            };
            let argv = stop_argv(&p);
            let out = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert_eq!(said.contains("stopped"), expect_stopped, "{said}");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(child.try_wait().unwrap().is_some(), expect_stopped);
        }
        let _ = bystander.kill();
        let _ = bystander.wait();
    }
}
