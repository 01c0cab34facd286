//! The orchestrator's view of the chunk sessions on a host: it runs the
//! session subcommands of `helper/owner.rs` there (built as
//! [`HelperCommand`]s) and reads their answers: list the sessions that
//! replicate into a target, probe or cancel one folder, write a sender
//! folder's manifest.

use anyhow::Result;

use crate::chunk::protocol::command::{HelperCommand, Scope};
use crate::chunk::protocol::session::{parse_listing, Listing, Manifest};
use crate::host::Host;

/// What a probe of one session folder does besides looking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Only report the folder.
    Look,
    /// Remove the folder if no helper and no owner holds it.
    RemoveIfDead,
    /// Write `cancel` into the folder (its helper stops, removing it).
    Cancel,
    /// Write `cancel`, and remove the folder at once if it is dead.
    CancelOrRemoveIfDead,
}

impl Probe {
    fn remove_dead(self) -> bool {
        matches!(self, Probe::RemoveIfDead | Probe::CancelOrRemoveIfDead)
    }

    fn cancel(self) -> bool {
        matches!(self, Probe::Cancel | Probe::CancelOrRemoveIfDead)
    }
}

fn run_sessions(host: &dyn Host, exe: &str, cmd: HelperCommand) -> Result<Listing> {
    let out = host.run(&cmd.to_argv(exe))?;
    let out = out.check("listing chunk sessions", host.label())?;
    parse_listing(out.as_bytes())
}

/// Session folders in `tmpdir` on `host` whose manifest names `target`;
/// dead receiver folders among them are removed (and listed as removed).
pub fn list(host: &dyn Host, exe: &str, tmpdir: &str, target: &str) -> Result<Listing> {
    let cmd = HelperCommand::Sessions {
        scope: Scope::Tmpdir {
            tmpdir: tmpdir.to_string(),
            target: Some(target.to_string()),
        },
        remove_dead: true,
        cancel: false,
    };
    run_sessions(host, exe, cmd)
}

/// One session folder on `host` (absent: an empty listing), with what
/// `how` asks for done to it.
pub fn probe(host: &dyn Host, exe: &str, dir: &str, how: Probe) -> Result<Listing> {
    let cmd = HelperCommand::Sessions {
        scope: Scope::Dir(dir.to_string()),
        remove_dead: how.remove_dead(),
        cancel: how.cancel(),
    };
    run_sessions(host, exe, cmd)
}

/// Creates `dir` on `host` and writes its manifest.
pub fn write_manifest(host: &dyn Host, exe: &str, dir: &str, m: &Manifest) -> Result<()> {
    let cmd = HelperCommand::Manifest {
        dir: dir.to_string(),
        manifest: m.render(),
    };
    let out = host.run(&cmd.to_argv(exe))?;
    out.check("writing the chunk session manifest", host.label())?;
    Ok(())
}
