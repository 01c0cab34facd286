//! What a `--chunked` run does, before it plans a dataset, with the chunk
//! sessions an earlier run left on the target host (see `chunk::session`).
//! A session that an orchestrator owns refuses the run (naming the session,
//! its host and its age). Dead sessions (no helper, no owner) are removed
//! on both hosts, so their staged chunks are never mistaken for progress;
//! the step starts over (or resumes from the target's token, where ZFS
//! keeps one). A live session whose step still fits (started with the same
//! zfs send/receive command lines this run would use, its snapshots on the
//! source with the same GUIDs, the target still where the step starts) is
//! re-attached to and finished without re-sending delivered chunks; one
//! that no longer fits is cancelled. Afterwards the run plans as usual.

use anyhow::{Context, Result};

use super::Run;
use crate::chunk::orchestrator;
use crate::chunk::session::{self, Found, Held, Manifest, Probe, Role, Stream};
use crate::transfer::chunked::{Chunked, End};
use crate::zfs::{self, Dataset, RecvArgs};

/// How long to wait for cancelled helpers to stop (zfs receive must let go
/// of the target before the run plans).
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Run<'_> {
    /// Deals with the sessions into `dst` on the target host; returns the
    /// bytes of a re-attached step (0 if none was).
    pub(super) fn reattach(&self, c: &Chunked, src: &Dataset, dst: &Dataset) -> Result<u64> {
        let dst_exe = c.helper_exe(End::Target)?;
        let target = self.dst.label(dst);
        let listing = session::list(&*self.dst.host(), &dst_exe, &c.opts.tmpdir, dst.as_str())
            .with_context(|| format!("looking for chunk sessions into {target}"))?;
        let removed = |f: &Found| listing.removed.contains(&f.dir);
        let owned = listing
            .found
            .iter()
            .filter(|f| !removed(f))
            .find_map(|f| f.owner.clone());
        if let Some(owner) = owned {
            return Err(Held {
                owner,
                target,
                taken_over: false,
            }
            .into());
        }
        let mut bytes = 0;
        let mut attached = false;
        for f in &listing.found {
            let Some(m) = f.manifest.as_ref().filter(|m| m.role == Role::Receiver) else {
                continue;
            };
            let id = m.session_id();
            if removed(f) {
                self.ui.info(&format!(
                    "{target}: removed chunk session {id} (started {} ago by resync pid {} on host {}): its helpers are gone; the step starts over",
                    session::ago(m.started),
                    m.pid,
                    m.host
                ));
                self.clear_sender(c, m);
                continue;
            }
            if !f.helper_alive {
                continue;
            }
            let fits = match attached {
                true => Err("another session was re-attached already".to_string()),
                false => self.step_fits(c, src, dst, m)?,
            };
            match fits {
                Ok(()) => {
                    bytes += self.attach(c, dst, f, m)?;
                    attached = true;
                }
                Err(why) => {
                    self.ui.info(&format!(
                        "{target}: cancelling chunk session {id}: {why}; planning from scratch"
                    ));
                    self.cancel_session(c, m)?;
                }
            }
        }
        Ok(bytes)
    }

    /// Whether this run can finish the session's step: Ok(Err(why)) if not.
    fn step_fits(
        &self,
        c: &Chunked,
        src: &Dataset,
        dst: &Dataset,
        m: &Manifest,
    ) -> Result<std::result::Result<(), String>> {
        let label = self.src.host().label().to_string();
        if m.sender_host != label || m.identity.source != src.as_str() {
            return Ok(Err(format!(
                "it sends {}:{}, not {label}:{src}",
                m.sender_host, m.identity.source
            )));
        }
        if label == "local" && m.host != session::this_host() {
            return Ok(Err(format!("its sender is local to host {}", m.host)));
        }
        let src_exe = c.helper_exe(End::Source)?;
        let probe = session::probe(&*self.src.host(), &src_exe, &m.sender_dir, Probe::Look)?;
        if !probe.found.iter().any(|f| f.helper_alive) {
            return Ok(Err("its sender helper is gone".into()));
        }
        let argv_md5 = self.step_argv_md5(src, dst, &m.identity.stream, &m.argv_md5);
        let target_ds = Dataset::parse(&m.identity.target)?;
        let source = self.src.source_state(src)?;
        let target = self.dst.target_state(&target_ds)?;
        Ok(session::session_fits(
            m,
            &argv_md5,
            &source.snapshots,
            &target.snapshots,
            target.resume_token.as_deref(),
        ))
    }

    /// The fingerprint of the `zfs send` and `zfs receive` command lines
    /// this run would start for `stream`, built as `Run::execute` builds
    /// them. Whether the receive has `-F` depends on what the target holds
    /// when the step starts (see `execute::Rollback`), so where `-F` is
    /// allowed both spellings are this run's own: the one the session
    /// recorded (`recorded`) is chosen when it is one of them.
    fn step_argv_md5(
        &self,
        src: &Dataset,
        dst: &Dataset,
        stream: &Stream,
        recorded: &str,
    ) -> String {
        let forces: &[bool] = match self.cfg.rollback {
            true => &[false, true],
            false => &[false],
        };
        let mut first = None;
        for &force in forces {
            let (send, recv) = self.step_argv(src, dst, stream, force);
            // As `execute` hands them to the mover: behind sudo where needed.
            let md5 = session::argv_md5(&self.src.command(&send), &self.dst.command(&recv));
            if md5 == recorded {
                return md5;
            }
            first.get_or_insert(md5);
        }
        first.unwrap_or_default()
    }

    /// The `zfs send` and `zfs receive` command lines for `stream`.
    fn step_argv(
        &self,
        src: &Dataset,
        dst: &Dataset,
        stream: &Stream,
        force: bool,
    ) -> (Vec<String>, Vec<String>) {
        // As `execute` builds them; when the source's properties cannot be
        // read, the command lines differ and the session is not re-attached.
        let options = self
            .receive_options(src)
            .unwrap_or_else(|_| self.cfg.recv_options.clone());
        let recv = RecvArgs {
            resumable: self.dst.caps.resume_tokens,
            force,
            options: &options,
        };
        match stream {
            Stream::Resume { token } => (
                zfs::send_resume_argv(token, &self.cfg.send_options),
                zfs::receive_argv(
                    dst,
                    &RecvArgs {
                        resumable: true,
                        ..recv
                    },
                ),
            ),
            Stream::Full { to } => (
                self.send_argv(src, None, to, false),
                zfs::receive_argv(dst, &recv),
            ),
            Stream::Incremental {
                from,
                to,
                intermediates,
            } => (
                self.send_argv(src, Some(from), to, *intermediates),
                zfs::receive_argv(dst, &recv),
            ),
        }
    }

    /// Finishes the step of a live session; then verifies its snapshot.
    fn attach(&self, c: &Chunked, dst: &Dataset, f: &Found, m: &Manifest) -> Result<u64> {
        let id = m.session_id();
        let stream = &m.identity.stream;
        self.ui.info(&format!(
            "{}: re-attaching to chunk session {id} (started {} ago by resync pid {} on host {}; receiver helper pid {})",
            self.dst.label(dst),
            session::ago(m.started),
            m.pid,
            m.host,
            f.helper_pid
        ));
        let label = match stream {
            Stream::Incremental { from, to, .. } => {
                format!("{}@{}..@{}", m.identity.source, from.name, to.name)
            }
            Stream::Full { to } => format!("{}@{}", m.identity.source, to.name),
            Stream::Resume { .. } => format!("{} (resume)", m.identity.source),
        };
        let stats = c.run(
            orchestrator::Start::Attach {
                sender_dir: m.sender_dir.clone(),
                receiver_dir: m.receiver_dir.clone(),
                argv_md5: m.argv_md5.clone(),
            },
            Some(m.identity.clone()),
            self.ui.transfer(&label, None),
        )?;
        self.ui.debug(&format!(
            "re-attached session {id}: copied {} bytes, stream {} bytes, receiver helper pid {}",
            stats.copied, stats.bytes, f.helper_pid
        ));
        if let Some(to) = stream.to() {
            self.dst.verify(dst, to)?;
        }
        Ok(stats.bytes)
    }

    /// Stops both helpers of a session and waits until the receiver's
    /// folder is gone (its zfs receive let go of the target).
    fn cancel_session(&self, c: &Chunked, m: &Manifest) -> Result<()> {
        let dst_exe = c.helper_exe(End::Target)?;
        if m.sender_host == self.src.host().label() {
            let src_exe = c.helper_exe(End::Source)?;
            let _ = session::probe(
                &*self.src.host(),
                &src_exe,
                &m.sender_dir,
                Probe::CancelOrRemoveIfDead,
            );
        }
        let deadline = std::time::Instant::now() + CANCEL_WAIT;
        let mut cancel = true;
        loop {
            let how = match cancel {
                true => Probe::CancelOrRemoveIfDead,
                false => Probe::RemoveIfDead,
            };
            let l = session::probe(&*self.dst.host(), &dst_exe, &m.receiver_dir, how)?;
            if l.found.is_empty() || !l.removed.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "cancelled chunk session {} on {} did not stop within {}",
                    m.session_id(),
                    m.receiver_host,
                    humantime::format_duration(CANCEL_WAIT)
                );
            }
            cancel = false;
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// The sender folder of a dead session: removed if its helper is gone
    /// too, else told to stop.
    fn clear_sender(&self, c: &Chunked, m: &Manifest) {
        if m.sender_host != self.src.host().label() {
            return;
        }
        let Ok(exe) = c.helper_exe(End::Source) else {
            return;
        };
        let host = self.src.host();
        match session::probe(&*host, &exe, &m.sender_dir, Probe::RemoveIfDead) {
            Ok(l) if l.found.iter().any(|f| f.helper_alive) => {
                let _ = session::probe(&*host, &exe, &m.sender_dir, Probe::Cancel);
            }
            Ok(l) => {
                for d in l.removed {
                    self.ui.debug(&format!(
                        "[{}] removed dead session folder {d}",
                        host.label()
                    ));
                }
            }
            Err(e) => self.ui.debug(&format!("clearing {}: {e:#}", m.sender_dir)),
        }
    }
}
