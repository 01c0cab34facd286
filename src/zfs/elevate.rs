//! Running `zfs` with enough privilege, as syncoid does: on a host where
//! the user resync runs as (the SSH user, or this process's user locally)
//! is not root, every `zfs` command goes through `sudo -n` unless
//! `--no-privilege-elevation` says the user has `zfs allow` delegation.
//! `zpool` (the capability probes) goes the same way, as syncoid's
//! `zpool get` does, so sudoers must allow both.
//! [`Privileges`] decides that once per host and wraps argv
//! ([`Privileges::wrap`]); every place that turns a `zfs` argv into a host
//! command (the endpoint's commands, a transfer's send and receive, and so
//! the chunk helpers' command lines) calls it. Elevation is only ever for
//! `zfs` itself: the chunk helpers, their folders and the run lock's stop
//! script stay with the user (a user may signal its own `sudo`, which
//! passes the signal on to `zfs`).
//!
//! When a command fails for want of privilege, [`Privileges::explain`]
//! turns its stderr into one line naming the host, the command and what to
//! configure there. Like `error.rs` for ZFS's own messages, this is the one
//! place that reads sudo's wording (sudo 1.9: `sudo: a password is
//! required`, `Sorry, user U is not allowed to execute ...`, `U is not in
//! the sudoers file`) and libzfs's `permission denied`. `sudo -n` cannot
//! tell a user without sudo rights from one whose rule wants a password
//! (it asks for the password before it looks at the rules), so one message
//! covers both.

/// A command refused for want of privilege: its message is the whole
/// story (host, command, what to configure), so callers add no context.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `err` is (or wraps) a [`Refused`].
pub fn is_refused(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<Refused>())
}

/// How `zfs` runs on one host, and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// The user the commands run as ("root", "backup").
    pub user: String,
    /// `sudo -n zfs ...` instead of `zfs ...`.
    pub sudo: bool,
}

/// The prefix that elevates one command: non-interactive, so a sudo that
/// wants a password fails at once instead of waiting on a terminal.
const SUDO: [&str; 2] = ["sudo", "-n"];

impl Privileges {
    /// As syncoid decides: root runs `zfs` directly, anyone else through
    /// sudo, unless `no_elevation` (`--no-privilege-elevation`).
    pub fn decide(user: &str, is_root: bool, no_elevation: bool) -> Privileges {
        Privileges {
            user: user.to_string(),
            sudo: !is_root && !no_elevation,
        }
    }

    /// Root, no elevation (tests, and what a root run is).
    #[cfg(test)]
    pub fn root() -> Privileges {
        Privileges::decide("root", true, false)
    }

    /// `argv` as it must run on the host: behind `sudo -n` when elevated.
    pub fn wrap(&self, argv: &[String]) -> Vec<String> {
        match self.sudo {
            true => SUDO
                .iter()
                .map(|s| s.to_string())
                .chain(argv.iter().cloned())
                .collect(),
            false => argv.to_vec(),
        }
    }

    /// The one-line error for a `zfs` command (`argv`, as built, without
    /// the sudo prefix) that failed on `host` with `stderr` for want of
    /// privilege; `None` when the failure has another cause.
    pub fn explain(&self, host: &str, argv: &[String], stderr: &str) -> Option<String> {
        let folded = stderr
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        let user = &self.user;
        let command = command_name(argv);
        let sudoers = format!(
            "'{user} ALL=(root) NOPASSWD: /usr/sbin/zfs, /usr/sbin/zpool' (their paths there)"
        );
        if self.sudo {
            if folded.contains("sudo: a password is required")
                || folded.contains("sudo: a terminal is required")
            {
                return Some(format!(
                    "on {host}: sudo wants a password to run {command} as root ({user} may also \
                     have no sudo rights for zfs); add {sudoers} to sudoers there, or use \
                     --no-privilege-elevation with zfs allow"
                ));
            }
            if folded.contains("is not allowed to execute")
                || folded.contains("is not in the sudoers file")
                || folded.contains("may not run sudo")
            {
                return Some(format!(
                    "on {host}: {user} may not run {command} through sudo; add {sudoers} to \
                     sudoers there, or use --no-privilege-elevation with zfs allow"
                ));
            }
            if folded.contains("sudo: not found")
                || folded.contains("sudo: command not found")
                || folded.contains("sudo: no such file or directory")
            {
                return Some(format!(
                    "on {host}: sudo is not installed, and {user} is not root; install sudo and \
                     add {sudoers} to sudoers there, or use --no-privilege-elevation with zfs allow"
                ));
            }
            return None;
        }
        if folded.contains("permission denied") && user != "root" {
            let perms = permissions_for(argv);
            let on = dataset_for(argv);
            return Some(match (perms, on) {
                (Some(perms), Some(on)) => format!(
                    "on {host}: {command} was refused to {user} (permission denied); run \
                     'zfs allow -u {user} {perms} {on}' there as root, or leave out \
                     --no-privilege-elevation to run zfs through sudo"
                ),
                _ => format!(
                    "on {host}: {command} was refused to {user} (permission denied); delegate it \
                     with zfs allow there, or leave out --no-privilege-elevation to run zfs \
                     through sudo"
                ),
            });
        }
        None
    }
}

/// `zfs receive` for `["zfs", "receive", "-F", "p/x"]`.
fn command_name(argv: &[String]) -> String {
    argv.iter()
        .take(2)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `zfs allow` permissions a `zfs` subcommand needs (OpenZFS's
/// zfs-allow(8): receive creates and mounts, snapshot, destroy and
/// rollback mount).
fn permissions_for(argv: &[String]) -> Option<&'static str> {
    Some(match argv.get(1)?.as_str() {
        "send" => "send",
        "receive" | "recv" => "receive,create,mount",
        "snapshot" => "snapshot,mount",
        "destroy" => "destroy,mount",
        "rollback" => "rollback,mount",
        "hold" => "hold",
        "release" => "release",
        "bookmark" => "bookmark",
        _ => return None,
    })
}

/// Where the permission must be given: the dataset the command acts on
/// (its last argument without `@snapshot`/`#bookmark`; a receive's parent,
/// since the received dataset may not exist yet).
fn dataset_for(argv: &[String]) -> Option<String> {
    let last = argv.iter().skip(2).rfind(|a| !a.starts_with('-'))?;
    let ds = last.split(['@', '#']).next()?;
    let receive = matches!(argv.get(1).map(String::as_str), Some("receive" | "recv"));
    match (receive, ds.rsplit_once('/')) {
        (true, Some((parent, _))) => Some(parent.to_string()),
        _ => Some(ds.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_a_non_root_user_without_the_flag_is_elevated() {
        assert!(!Privileges::decide("root", true, false).sudo);
        assert!(Privileges::decide("backup", false, false).sudo);
        assert!(!Privileges::decide("backup", false, true).sudo);
        let argv = w(&["zfs", "list", "a b"]);
        assert_eq!(
            Privileges::decide("backup", false, false).wrap(&argv),
            w(&["sudo", "-n", "zfs", "list", "a b"])
        );
        assert_eq!(Privileges::root().wrap(&argv), argv);
    }

    #[test]
    fn sudo_refusals_are_one_line_naming_host_command_and_sudoers() {
        let p = Privileges::decide("backup", false, false);
        let list = w(&["zfs", "list", "-H", "tank"]);
        // sudo 1.9.13, `sudo -n zfs list` by a user without a NOPASSWD rule
        // (and by one without any rule: sudo asks first).
        let msg = p
            .explain("backup@nas", &list, "sudo: a password is required\n")
            .unwrap();
        assert_eq!(
            msg,
            "on backup@nas: sudo wants a password to run zfs list as root (backup may also have \
             no sudo rights for zfs); add 'backup ALL=(root) NOPASSWD: /usr/sbin/zfs, \
             /usr/sbin/zpool' (their paths there) to sudoers there, or use \
             --no-privilege-elevation with zfs allow"
        );
        assert!(!msg.contains('\n'));
        let msg = p
            .explain(
                "nas",
                &list,
                "Sorry, user backup is not allowed to execute '/usr/sbin/zfs list -H tank' as root on nas.\n",
            )
            .unwrap();
        assert!(msg.starts_with("on nas: backup may not run zfs list through sudo;"));
        let msg = p.explain("nas", &list, "sh: 1: sudo: not found\n").unwrap();
        assert!(msg.contains("sudo is not installed"), "{msg}");
        assert_eq!(
            p.explain("nas", &list, "cannot open 'tank': dataset does not exist\n"),
            None
        );
    }

    #[test]
    fn a_missing_delegation_names_the_permissions_and_the_dataset() {
        let p = Privileges::decide("backup", false, true);
        // OpenZFS 2.3.2, `zfs snapshot` without the snapshot permission.
        let msg = p
            .explain(
                "backup@oz",
                &w(&["zfs", "snapshot", "tank/a@s1"]),
                "cannot create snapshots : permission denied\n",
            )
            .unwrap();
        assert_eq!(
            msg,
            "on backup@oz: zfs snapshot was refused to backup (permission denied); run \
             'zfs allow -u backup snapshot,mount tank/a' there as root, or leave out \
             --no-privilege-elevation to run zfs through sudo"
        );
        let msg = p
            .explain(
                "oz",
                &w(&["zfs", "receive", "-s", "-F", "tank/b/c"]),
                "cannot receive new filesystem stream: permission denied\n",
            )
            .unwrap();
        assert!(
            msg.contains("'zfs allow -u backup receive,create,mount tank/b'"),
            "{msg}"
        );
        let msg = p
            .explain(
                "oz",
                &w(&["zfs", "hold", "tag", "tank/a@s"]),
                "permission denied",
            )
            .unwrap();
        assert!(msg.contains("'zfs allow -u backup hold tank/a'"), "{msg}");
        // Root is never told to delegate; sudo's own words are not read
        // when sudo was not used.
        let root = Privileges::root();
        assert_eq!(
            root.explain("h", &w(&["zfs", "send", "a@b"]), "permission denied"),
            None
        );
        assert_eq!(
            p.explain("h", &w(&["zfs", "list"]), "sudo: a password is required"),
            None
        );
    }
}
