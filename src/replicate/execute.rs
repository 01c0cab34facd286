//! Executing one planned step: changes go to the target's (or source's)
//! [`Changes`](crate::endpoint::Changes), streams to a
//! [`Mover`](crate::transfer::Mover) with an explicit [`Request`]. Two
//! safety rules live here. `zfs receive -F` is used only when the target
//! changed since the stream's base (`written@base` > 0, where the ZFS can
//! tell; where it cannot, zfs-fuse, `-F` is used as before unless
//! `--no-rollback`), since a forced receive also destroys target snapshots
//! newer than the base. `--force-delete` destroys a target only when every
//! file system below it is one of this run's targets, and names all of
//! them first.

use anyhow::{bail, Result};

use super::{describe, identity, Run};
use crate::chunk::session::Stream;
use crate::host::is_connection_lost;
use crate::plan::resume;
use crate::plan::Step;
use crate::progress::human_bytes;
use crate::sys::Unpoisoned;
use crate::transfer::pipe::Pipe;
use crate::transfer::{Mover, Request};
use crate::zfs::{self, Dataset, RecvArgs, SendArgs, Snapshot, ZfsError, ZfsErrorKind};

/// Why a receive rolls the target back (`-F`), for the plan and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rollback {
    /// No `-F`: the target is unchanged since the base, or has no base.
    No,
    /// `-F`: `written@base` says the target changed since the base.
    Changed { base: String, written: u64 },
    /// `-F`: the ZFS cannot tell (no `written@`, zfs-fuse); as before.
    Unknown,
}

impl Run<'_> {
    /// Executes one planned step; returns the bytes streamed.
    pub(super) fn execute(&self, src: &Dataset, dst: &Dataset, step: &Step) -> Result<u64> {
        match step {
            Step::AbortPartial => {
                let why = if self.cfg.resume {
                    "the source's ZFS cannot resume it (no send -t)"
                } else {
                    "--no-resume"
                };
                self.abort_partial(
                    dst,
                    &format!(
                        "{}: discarding a partial receive ({why})",
                        self.dst.label(dst)
                    ),
                )?;
                Ok(0)
            }
            Step::DestroyTarget => {
                let below = self.check_force_delete(dst)?;
                self.ui.warn(&format!(
                    "--force-delete: destroying {}",
                    destroy_list(&self.dst.label(dst), &below)
                ));
                self.dst_changes.destroy_recursive(dst)?;
                self.destroyed.locked().push(dst.clone());
                Ok(0)
            }
            Step::DestroySnapshot { snapshot } => {
                self.ui.warn(&format!(
                    "--force-delete: destroying {}@{} (guid {}): the source's @{} is another snapshot",
                    self.dst.label(dst),
                    snapshot.name,
                    snapshot.guid,
                    snapshot.name
                ));
                self.dst_changes
                    .destroy_snapshot(dst, &snapshot.name, None)?;
                Ok(0)
            }
            Step::Rollback { to } => {
                self.ui.warn(&format!(
                    "--force-delete: rolling {} back to @{}, destroying newer target snapshots",
                    self.dst.label(dst),
                    to.name
                ));
                self.dst_changes.rollback(dst, &to.name)?;
                Ok(0)
            }
            Step::DiscardPartial { why } => {
                self.discard_partial(dst, &why.to_string())?;
                Ok(0)
            }
            Step::Resume { token, received } => {
                self.ui.info(&format!(
                    "{}: resuming an interrupted receive ({} already there)",
                    self.dst.label(dst),
                    human_bytes(*received)
                ));
                let base = self.dst.snapshots(dst)?.last().map(|s| s.guid);
                let force = self.rollback_for(dst, base)?;
                let req = Request {
                    send: zfs::send_resume_argv(token, &self.cfg.send_options),
                    recv: self.receive_argv(src, dst, true, &force)?,
                    label: format!("{src} (resume)"),
                    session: identity(
                        src,
                        dst,
                        Stream::Resume {
                            token: token.clone(),
                        },
                    ),
                };
                self.transfer(&req, *received)
            }
            Step::Full { to } => self.send_step(src, dst, None, to, false),
            Step::Incremental {
                from,
                to,
                intermediates,
            } => self.send_step(src, dst, Some(from), to, *intermediates),
            Step::FromBookmark { bookmark, to } => {
                self.hold_for_step(src, dst, &[to]);
                let force = self.rollback_for(dst, Some(bookmark.guid))?;
                let req = Request {
                    send: zfs::send_from_bookmark_argv(
                        src,
                        &bookmark.name,
                        &to.name,
                        &self.cfg.send_options,
                    ),
                    recv: self.receive_argv(src, dst, self.dst.caps.resume_tokens, &force)?,
                    label: format!("{src}#{}..@{}", bookmark.name, to.name),
                    // The manifest has no bookmark stream: a session of
                    // this step never fits a later run's command lines, so
                    // it is cancelled rather than re-attached.
                    session: identity(src, dst, Stream::Full { to: to.clone() }),
                };
                // Verified on the next round's listing (see `Run::one`).
                self.transfer(&req, 0)
            }
        }
    }

    /// Sends `to` (in full, or from `from`). The caller verifies that the
    /// target holds it with the source's GUID on its next listing.
    fn send_step(
        &self,
        src: &Dataset,
        dst: &Dataset,
        from: Option<&Snapshot>,
        to: &Snapshot,
        intermediates: bool,
    ) -> Result<u64> {
        self.hold_for_step(src, dst, &from.into_iter().chain([to]).collect::<Vec<_>>());
        let force = self.rollback_for(dst, from.map(|f| f.guid))?;
        let send = self.send_argv(src, from, to, intermediates);
        let label = match from {
            Some(f) => format!("{src}@{}..@{}", f.name, to.name),
            None => format!("{src}@{}", to.name),
        };
        let req = Request {
            send,
            recv: self.receive_argv(src, dst, self.dst.caps.resume_tokens, &force)?,
            label,
            session: identity(
                src,
                dst,
                match from {
                    Some(from) => Stream::Incremental {
                        from: from.clone(),
                        to: to.clone(),
                        intermediates,
                    },
                    None => Stream::Full { to: to.clone() },
                },
            ),
        };
        self.transfer(&req, 0)
    }

    /// `zfs send [-i|-I @from] OPTS src@to`.
    pub(super) fn send_argv(
        &self,
        src: &Dataset,
        from: Option<&Snapshot>,
        to: &Snapshot,
        intermediates: bool,
    ) -> Vec<String> {
        zfs::send_argv(
            src,
            &SendArgs {
                from: from.map(|f| f.name.as_str()),
                to: &to.name,
                intermediates,
                options: &self.cfg.send_options,
            },
        )
    }

    /// `zfs receive [-s] [-F] OPTS dst`, `-F` as `rollback` says; OPTS
    /// include `--preserve-properties`' `-o PROP=VALUE`.
    pub(super) fn receive_argv(
        &self,
        src: &Dataset,
        dst: &Dataset,
        resumable: bool,
        rollback: &Rollback,
    ) -> Result<Vec<String>> {
        Ok(zfs::receive_argv(
            dst,
            &RecvArgs {
                resumable,
                force: *rollback != Rollback::No,
                options: &self.receive_options(src)?,
            },
        ))
    }

    /// Whether a receive onto the target snapshot with GUID `base` must
    /// roll the target back, and says so when it must. No base (a full
    /// stream into a new dataset): never.
    pub(super) fn rollback_for(&self, dst: &Dataset, base: Option<u64>) -> Result<Rollback> {
        let r = self.rollback_needed(dst, base)?;
        match &r {
            Rollback::No => {}
            Rollback::Changed { base, written } => self.ui.info(&format!(
                "{}: the target changed since @{base} ({} written there); receiving with -F rolls that back",
                self.dst.label(dst),
                human_bytes(*written)
            )),
            Rollback::Unknown => self.ui.debug(&format!(
                "{}: the target's ZFS cannot tell whether it changed (no written@); receiving with -F",
                self.dst.label(dst)
            )),
        }
        Ok(r)
    }

    fn rollback_needed(&self, dst: &Dataset, base: Option<u64>) -> Result<Rollback> {
        let Some(base) = base else {
            return Ok(Rollback::No);
        };
        if !self.cfg.rollback {
            return Ok(Rollback::No);
        }
        if !self.dst.caps.written_at {
            return Ok(Rollback::Unknown);
        }
        let snaps = self.dst.snapshots(dst)?;
        let Some(on_target) = snaps.iter().find(|s| s.guid == base) else {
            // The base is not there (any more): zfs receive refuses the
            // stream, and -F would not help it.
            return Ok(Rollback::No);
        };
        match self.dst.written_since(dst, &on_target.name)? {
            Some(0) => Ok(Rollback::No),
            Some(written) => Ok(Rollback::Changed {
                base: on_target.name.clone(),
                written,
            }),
            None => Ok(Rollback::Unknown),
        }
    }

    /// What a step would do, for a dry run's plan: with the rollback a
    /// receive needs, and refusing a `--force-delete` that would take
    /// datasets of others.
    pub(super) fn explain(&self, dst: &Dataset, step: &Step) -> Result<String> {
        let base = match step {
            Step::Incremental { from, .. } => Some(from.guid),
            Step::FromBookmark { bookmark, .. } => Some(bookmark.guid),
            Step::DestroyTarget => {
                let below = self.check_force_delete(dst)?;
                return Ok(format!(
                    "destroy {} (--force-delete)",
                    destroy_list(&self.dst.label(dst), &below)
                ));
            }
            _ => None,
        };
        Ok(match self.rollback_needed(dst, base)? {
            Rollback::No => describe(step),
            Rollback::Changed { base, written } => format!(
                "{}, rolling the target back (-F: {} written there since @{base})",
                describe(step),
                human_bytes(written)
            ),
            Rollback::Unknown => format!(
                "{} (with -F: the target's ZFS cannot tell whether it changed)",
                describe(step)
            ),
        })
    }

    /// `--force-delete` is about to `zfs destroy -r` the target: every file
    /// system or volume below it must be one of this run's targets (they
    /// are sent again after it); returns them. Anything else below it (an
    /// excluded dataset, another job's replica) is a refusal naming it.
    fn check_force_delete(&self, dst: &Dataset) -> Result<Vec<Dataset>> {
        let below = self.dst.descendants(dst)?;
        let ours = self.targets.get().map(Vec::as_slice).unwrap_or(&[]);
        let foreign: Vec<String> = below
            .iter()
            .filter(|d| !ours.contains(d))
            .map(|d| self.dst.label(d))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "--force-delete would destroy {} with everything below it, and {} below it {} not part of this run: {}; refusing (replicate {} too, or move {} away first)",
                self.dst.label(dst),
                if foreign.len() == 1 { "this dataset" } else { "these datasets" },
                if foreign.len() == 1 { "is" } else { "are" },
                foreign.join(", "),
                if foreign.len() == 1 { "it" } else { "them" },
                if foreign.len() == 1 { "it" } else { "them" },
            );
        }
        Ok(below)
    }

    /// Moves one stream with the run's mover, with a progress display from
    /// the source's estimate; `already`: bytes a resumed stream had
    /// received before (where its display starts).
    pub(super) fn transfer(&self, req: &Request, already: u64) -> Result<u64> {
        let total = self
            .src
            .estimate(&req.send)
            .map(|n| n.saturating_add(already));
        let bar = self.ui.transfer(&req.label, total);
        if already > 0 {
            bar.resume_at(already);
        }
        // Both commands as they run on their hosts (behind sudo where the
        // user is not root); a chunk session's manifest records these.
        let elevated = Request {
            send: self.src.command(&req.send),
            recv: self.dst.command(&req.recv),
            ..req.clone()
        };
        let moved = match &self.chunked {
            Some(chunked) => chunked.transfer(&elevated, bar),
            None => Pipe {
                src: self.src.bulk_host(),
                dst: self.dst.bulk_host(),
                lock: self.lock,
                bwlimit: self.cfg.bwlimit(),
                stall: self.cfg.timeout,
                ui: self.ui,
                codec: match &self.compression {
                    Some(c) => c.codec([self.src.host(), self.dst.host()], self.ui)?,
                    None => None,
                },
                direct: self.direct.clone(),
            }
            .transfer(&elevated, bar),
        };
        moved.map_err(|e| self.privilege_error(e, req))
    }

    /// A transfer's failure for want of privilege (a `zfs send` or
    /// `receive` that sudo or a missing delegation refused) as one line;
    /// any other error as it is. `req` holds the commands as built.
    fn privilege_error(&self, err: anyhow::Error, req: &Request) -> anyhow::Error {
        let Some(failed) = err.chain().find_map(|e| e.downcast_ref::<ZfsError>()) else {
            return err;
        };
        let (side, argv) = match failed.command == "zfs receive" {
            true => (self.dst, &req.recv),
            false => (self.src, &req.send),
        };
        match side.privilege_error(argv, &failed.stderr) {
            Some(line) => line,
            None => err,
        }
    }

    /// `resume token on X <why>: discarding the partial receive`, then
    /// `zfs receive -A`. Only the interrupted receive's state goes.
    fn discard_partial(&self, dst: &Dataset, why: &str) -> Result<()> {
        self.abort_partial(
            dst,
            &format!(
                "resume token on {} {why}: discarding the partial receive",
                self.dst.label(dst)
            ),
        )
    }

    /// Prints `line`, then `zfs receive -A` on the target.
    fn abort_partial(&self, dst: &Dataset, line: &str) -> Result<()> {
        self.ui.info(line);
        self.dst_changes.abort_partial(dst)
    }

    /// After `step` failed with `err`: was it because of a partial receive
    /// that must go? A receive refused for "partially-complete state", or a
    /// resume whose token no longer passes [`resume::check`] on a fresh
    /// source listing (its snapshot destroyed meanwhile). Then the partial
    /// receive is discarded and the caller plans again (true). Anything
    /// else, a lost connection above all, keeps the partial state for the
    /// next attempt (false).
    pub(super) fn discarded_after(
        &self,
        src: &Dataset,
        dst: &Dataset,
        step: &Step,
        err: &anyhow::Error,
    ) -> Result<bool> {
        if is_connection_lost(err) {
            return Ok(false);
        }
        if zfs::error::kind_in(err) == Some(ZfsErrorKind::PartialState) {
            self.discard_partial(
                dst,
                "blocks the receive (\"contains partially-complete state\")",
            )?;
            return Ok(true);
        }
        if !matches!(step, Step::Resume { .. }) {
            return Ok(false);
        }
        let source = self.src.source_state(src)?;
        let target = self.dst.target_state(dst)?;
        let Some(token) = &target.resume_token else {
            return Ok(false);
        };
        match resume::check(token, &source, &target.snapshots) {
            Ok(_) => Ok(false),
            Err(why) => {
                self.ui.warn(&format!("resuming failed: {err:#}"));
                self.discard_partial(dst, &why.to_string())?;
                Ok(true)
            }
        }
    }
}

/// `pool/t` or `pool/t and below it pool/t/a, pool/t/b`.
fn destroy_list(label: &str, below: &[Dataset]) -> String {
    if below.is_empty() {
        return format!("{label} and its snapshots");
    }
    let names: Vec<&str> = below.iter().map(Dataset::as_str).collect();
    format!(
        "{label} and its snapshots, and below it {}",
        names.join(", ")
    )
}
