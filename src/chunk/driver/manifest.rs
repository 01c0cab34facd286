//! Whether a chunk session found on the target can be finished by this run
//! (the re-attach decision, pure): it must have been started with the same
//! `zfs send` and `zfs receive` command lines this run would use for its
//! step (else a rerun with other `--recvoptions`, `--no-rollback` and the
//! like would finish the old helpers' receive), its snapshots must still be
//! on the source with the recorded GUIDs, and the target must still be
//! where the step starts.

use crate::chunk::protocol::session::{Manifest, Stream};
use crate::zfs::Snapshot;

/// Whether this run can finish the session `m`: `argv_md5` is the
/// fingerprint (`protocol::session::argv_md5`) of the command lines this
/// run would start for the session's step; `source` and `target` are the
/// listings in creation order, `target_token` the target's resume token.
/// Err says why not, for a message.
pub fn session_fits(
    m: &Manifest,
    argv_md5: &str,
    source: &[Snapshot],
    target: &[Snapshot],
    target_token: Option<&str>,
) -> Result<(), String> {
    if m.argv_md5 != argv_md5 {
        return Err(
            "it was started with other zfs send/receive options than this run's".to_string(),
        );
    }
    check_step(&m.identity.stream, source, target, target_token)
}

/// Whether the step of a session can still be finished: its snapshots
/// exist on the source with the recorded GUIDs and the target is still
/// where the step starts (at `from`, without `to`; or holding the recorded
/// resume token). Err says why not.
pub fn check_step(
    stream: &Stream,
    source: &[Snapshot],
    target: &[Snapshot],
    target_token: Option<&str>,
) -> Result<(), String> {
    let on =
        |list: &[Snapshot], s: &Snapshot| list.iter().any(|x| x.name == s.name && x.guid == s.guid);
    let (from, to) = match stream {
        Stream::Resume { token } => {
            return match target_token {
                Some(t) if t == token => Ok(()),
                Some(_) => Err("the target's resume token changed".into()),
                None => Err("the target no longer holds the resume token".into()),
            };
        }
        Stream::Full { to } => (None, to),
        Stream::Incremental { from, to, .. } => (Some(from), to),
    };
    if !on(source, to) {
        return Err(format!(
            "@{} (GUID {}) is no longer on the source",
            to.name, to.guid
        ));
    }
    if target.iter().any(|s| s.name == to.name) {
        return Err(format!("the target already has @{}", to.name));
    }
    match from {
        None if target.is_empty() => Ok(()),
        None => Err("the target has snapshots now; a full stream no longer fits".into()),
        Some(from) => {
            if !on(source, from) {
                return Err(format!("@{} is no longer on the source", from.name));
            }
            match target.last() {
                Some(s) if s.name == from.name && s.guid == from.guid => Ok(()),
                _ => Err(format!("the target is no longer at @{}", from.name)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::protocol::session::{argv_md5, Identity, Role};

    fn snap(name: &str, guid: u64) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid,
            createtxg: 0,
        }
    }

    fn list(v: &[(&str, u64)]) -> Vec<Snapshot> {
        v.iter().map(|(n, g)| snap(n, *g)).collect()
    }

    #[test]
    fn a_step_still_fits_only_where_it_started() {
        let inc = Stream::Incremental {
            from: snap("a", 1),
            to: snap("b", 2),
            intermediates: false,
        };
        let src = list(&[("a", 1), ("b", 2)]);
        let at_a = list(&[("a", 1)]);
        assert_eq!(check_step(&inc, &src, &at_a, None), Ok(()));
        assert!(check_step(&inc, &list(&[("a", 1), ("b", 3)]), &at_a, None).is_err());
        assert!(check_step(&inc, &list(&[("b", 2)]), &at_a, None).is_err());
        assert!(check_step(&inc, &src, &src, None).is_err());
        assert!(check_step(&inc, &src, &list(&[("a", 1), ("x", 5)]), None).is_err());
        assert!(check_step(&inc, &src, &list(&[("a", 9)]), None).is_err());
        assert!(check_step(&inc, &src, &[], None).is_err());
        let full = Stream::Full { to: snap("b", 2) };
        assert_eq!(check_step(&full, &src, &[], None), Ok(()));
        assert!(check_step(&full, &src, &at_a, None).is_err());
        let resume = Stream::Resume { token: "t1".into() };
        assert_eq!(check_step(&resume, &[], &[], Some("t1")), Ok(()));
        assert!(check_step(&resume, &[], &[], Some("t2")).is_err());
        assert!(check_step(&resume, &[], &[], None).is_err());
    }

    /// Fix 10 of issue 9: a rerun whose receive (or send) command line
    /// differs, e.g. `--no-rollback` drops `-F`, must not finish the old
    /// helpers' receive, even where the step itself still fits.
    #[test]
    fn a_session_started_with_other_command_lines_does_not_fit() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let send = w(&["zfs", "send", "tank/vm@b"]);
        let with_rollback = argv_md5(&send, &w(&["zfs", "receive", "-F", "backup/vm"]));
        let without = argv_md5(&send, &w(&["zfs", "receive", "backup/vm"]));
        let m = Manifest {
            role: Role::Receiver,
            identity: Identity {
                source: "tank/vm".into(),
                target: "backup/vm".into(),
                stream: Stream::Full { to: snap("b", 2) },
            },
            argv_md5: with_rollback.clone(),
            sender_host: "local".into(),
            sender_dir: "/tmp/resync-0123456789abcdef".into(),
            receiver_host: "root@backup".into(),
            receiver_dir: "/tmp/resync-fedcba9876543210".into(),
            host: "alpha".into(),
            pid: 1,
            started: 0,
        };
        let src = list(&[("b", 2)]);
        assert_eq!(session_fits(&m, &with_rollback, &src, &[], None), Ok(()));
        let why = session_fits(&m, &without, &src, &[], None).unwrap_err();
        assert!(why.contains("other zfs send/receive options"), "{why}");
        // The step's own checks still apply when the command lines match.
        assert!(session_fits(&m, &with_rollback, &src, &src, None).is_err());
    }
}
