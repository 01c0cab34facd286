//! The orchestrator's hold on a session's owner lock (see "Ownership" in
//! `protocol/session.rs`): [`Ownership`] keeps `__chunk-own` running on an
//! exec channel of the target host and feeds it a heartbeat; dropping it
//! ends the heartbeat, which releases the lock.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::chunk::protocol::command::HelperCommand;
use crate::chunk::protocol::session::{Held, Manifest, Owner, OWNER, OWNER_GRACE};
use crate::chunk::protocol::MARKER_MAX;
use crate::host::Host;
use crate::sys::{read_line_exact, Unpoisoned};

/// How often the orchestrator sends a heartbeat byte.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The orchestrator's hold on a session's owner lock (see the module doc).
/// Dropping it ends the heartbeat, which releases the lock.
pub struct Ownership {
    exe: String,
    dir: String,
    target: String,
    owner: Owner,
    beat: Mutex<Option<Arc<AtomicBool>>>,
}

impl Ownership {
    /// Takes the owner lock of `dir` on `host`; with `manifest`, creates the
    /// folder and writes the manifest once the lock is ours. Err([`Held`])
    /// if another orchestrator holds it.
    pub fn take(
        host: &dyn Host,
        exe: &str,
        dir: &str,
        target: &str,
        owner: Owner,
        manifest: Option<&Manifest>,
    ) -> Result<Ownership> {
        let o = Ownership {
            exe: exe.to_string(),
            dir: dir.to_string(),
            target: target.to_string(),
            owner,
            beat: Mutex::new(None),
        };
        o.start(host, manifest, false)?;
        Ok(o)
    }

    /// Takes the lock again on a new connection (after a reconnect); a
    /// folder that is gone meanwhile is no error here.
    pub fn renew(&self, host: &dyn Host) -> Result<()> {
        self.start(host, None, true)
    }

    fn start(&self, host: &dyn Host, manifest: Option<&Manifest>, again: bool) -> Result<()> {
        let argv = HelperCommand::Own {
            dir: self.dir.clone(),
            grace: Some(OWNER_GRACE),
            info: self.owner.render(),
            manifest: manifest.map(Manifest::render),
        }
        .to_argv(&self.exe);
        let mut child = host
            .spawn(&argv)
            .with_context(|| format!("taking ownership of {} on {}", self.dir, host.label()))?;
        let Some(mut out) = child.take_stdout() else {
            child.kill();
            bail!("internal error: no stdout from __chunk-own");
        };
        // One short line (`ok`, `held`, `gone`): the rest of the pipe is
        // the holder's text after `held`.
        let line = match read_line_exact(&mut out, 16) {
            Ok(l) => l.unwrap_or_default(),
            Err(e) => {
                child.kill();
                return Err(e.context(format!(
                    "taking ownership of {} on {}",
                    self.dir,
                    host.label()
                )));
            }
        };
        match line.as_str() {
            "ok" => {}
            "held" => {
                let mut rest = String::new();
                let _ = out.take(MARKER_MAX).read_to_string(&mut rest);
                let _ = child.wait();
                let owner = Owner::parse(&rest).with_context(|| {
                    format!(
                        "{}/{OWNER} on {} is held by someone",
                        self.dir,
                        host.label()
                    )
                })?;
                return Err(Held {
                    owner,
                    target: self.target.clone(),
                    taken_over: again,
                }
                .into());
            }
            "gone" => {
                let _ = child.wait();
                // After a reconnect: the receiver finished and removed its
                // folder (or gave up); the transfer loop sees which.
                if again {
                    return Ok(());
                }
                bail!("chunk session {} on {} is gone", self.dir, host.label());
            }
            _ => {
                drop(out);
                let info = child.wait()?;
                info.check("taking ownership of the chunk session", host.label())?;
                bail!(
                    "unexpected answer {:?} from __chunk-own on {}",
                    line,
                    host.label()
                );
            }
        }
        drop(out);
        let stop = Arc::new(AtomicBool::new(false));
        let old = self.beat.locked().replace(stop.clone());
        if let Some(old) = old {
            old.store(true, Ordering::SeqCst);
        }
        let Some(mut stdin) = child.take_stdin() else {
            child.kill();
            bail!("internal error: no stdin for __chunk-own");
        };
        thread::spawn(move || {
            'beat: while !stop.load(Ordering::SeqCst) {
                if stdin.write_all(b".").and_then(|()| stdin.flush()).is_err() {
                    break;
                }
                let t = Instant::now();
                while t.elapsed() < HEARTBEAT {
                    if stop.load(Ordering::SeqCst) {
                        break 'beat;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
            drop(stdin);
            let _ = child.wait();
        });
        Ok(())
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        if let Some(b) = self.beat.locked().take() {
            b.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::helper::files::{is_owned, prepare_session_dir, read_marker};
    use crate::chunk::protocol::session::{argv_md5, Identity, Role, Stream, MANIFEST};
    use crate::zfs::Snapshot;
    use std::fs;

    fn manifest() -> Manifest {
        Manifest {
            role: Role::Receiver,
            identity: Identity {
                source: "tank/vm".into(),
                target: "backup/vm".into(),
                stream: Stream::Full {
                    to: Snapshot {
                        name: "b".into(),
                        guid: 2,
                        createtxg: 0,
                    },
                },
            },
            argv_md5: argv_md5(&[], &[]),
            sender_host: "local".into(),
            sender_dir: "/tmp/resync-0123456789abcdef".into(),
            receiver_host: "root@backup".into(),
            receiver_dir: "/tmp/resync-fedcba9876543210".into(),
            host: "alpha".into(),
            pid: 4242,
            started: 1_700_000_000,
        }
    }

    /// Our binary, built next to the test binary's folder.
    fn built_exe() -> String {
        let exe = std::env::current_exe().unwrap();
        let exe = exe.parent().unwrap().parent().unwrap().join("resync");
        assert!(exe.exists(), "build the binary first: {}", exe.display());
        exe.to_str().unwrap().to_string()
    }

    /// The orchestrator side of ownership against real `__chunk-own`
    /// processes on this machine: exclusive, renewable by its own nonce,
    /// lost to another owner once it lapsed, released on drop. Needs the
    /// resync binary (`cargo build` first), hence ignored.
    #[test]
    #[ignore]
    fn ownership_is_exclusive_renewable_and_lost_to_a_takeover() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("resync-0123456789abcdef");
        let dir = path.to_str().unwrap();
        let host = crate::host::LocalHost::new();
        let exe = built_exe();
        let m = Manifest {
            receiver_dir: dir.to_string(),
            ..manifest()
        };
        let take = |nonce: &str, m: Option<&Manifest>| {
            Ownership::take(
                &host,
                &exe,
                dir,
                "root@b:tank/vm",
                Owner::ours("s1", nonce),
                m,
            )
        };
        let a = take("nonce-a", Some(&m)).unwrap();
        assert!(is_owned(&path));
        assert_eq!(
            Manifest::parse(&read_marker(&path, MANIFEST).unwrap().unwrap()).unwrap(),
            m
        );
        let refused = take("nonce-b", None).err().unwrap();
        let held = refused.downcast_ref::<Held>().unwrap();
        assert!(!held.taken_over);
        assert_eq!(held.owner.nonce, "nonce-a");
        assert_eq!(held.owner.pid, std::process::id());
        assert!(refused.to_string().starts_with("refused: root@b:tank/vm"));
        // Our own older holder is replaced (as after a reconnect).
        let first = Owner::parse(&fs::read_to_string(path.join(OWNER)).unwrap()).unwrap();
        a.renew(&host).unwrap();
        let second = Owner::parse(&fs::read_to_string(path.join(OWNER)).unwrap()).unwrap();
        assert_ne!(first.holder, second.holder);
        assert!(is_owned(&path));
        // Our holder lapses (a cut link); someone else takes the session.
        // SAFETY: kill(2) on the `__chunk-own` we started.
        unsafe { libc::kill(second.holder as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_owned(&path) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let b = take("nonce-b", None).unwrap();
        let lost = a.renew(&host).err().unwrap();
        assert!(lost.downcast_ref::<Held>().unwrap().taken_over, "{lost:#}");
        assert!(lost.to_string().contains("taken over"), "{lost}");
        // Dropping the owner releases the lock within a heartbeat.
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_owned(&path) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_owned(&path), "the owner lock outlived its Ownership");
        // Without a manifest, a folder that has none is `gone`: an error
        // when attaching, not after a reconnect (the receiver finished).
        let empty = tmp.path().join("resync-fedcba9876543210");
        prepare_session_dir(&empty).unwrap();
        let own = Owner::ours("s2", "n");
        let late = Ownership {
            exe: exe.clone(),
            dir: empty.to_str().unwrap().to_string(),
            target: "t".into(),
            owner: own,
            beat: Mutex::new(None),
        };
        late.renew(&host).unwrap();
        let gone = Ownership::take(
            &host,
            &exe,
            empty.to_str().unwrap(),
            "t",
            Owner::ours("s2", "n"),
            None,
        );
        assert!(gone.err().unwrap().to_string().contains("is gone"));
    }
}
