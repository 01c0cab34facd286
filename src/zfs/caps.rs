//! Capabilities: what the ZFS on one host can do, found by running a few
//! read-only probe commands on a pool and reading their results. This
//! module builds the probes and reads the results; the caller runs them.
//!
//! Every capability degrades gracefully: when one is missing resync does
//! without, as syncoid does. zfs-fuse (pool version 23) has holds only;
//! OpenZFS 2.x has everything.

use super::error::{kind_of, ZfsErrorKind};
use super::zfs;

/// What the ZFS on one host can do. Each field degrades gracefully: when
/// false, resync does without (like syncoid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `receive -s`, `send -t`, `receive -A`, `receive_resume_token`.
    pub resume_tokens: bool,
    /// `zfs get -t snapshot`.
    pub get_type_filter: bool,
    /// `zfs list -p`.
    pub list_parsable: bool,
    pub bookmarks: bool,
    /// `zfs send -nvP` size estimates. Not probed directly (a dry-run send
    /// needs a snapshot): it arrived in the same OpenZFS generation as
    /// `list -p` and long before resume tokens, and zfs-fuse has none of the
    /// three, so either of those implies it.
    pub send_estimate: bool,
    /// `zfs hold` / `zfs release`. Not `zfs holds`: zfs-fuse implements that
    /// listing in a Python helper Debian does not ship.
    pub holds: bool,
    /// The `written` and `written@SNAP` properties (bytes written to a
    /// dataset since a snapshot; see `zfs::target_props_argv`). Both came in
    /// one change (pool version 28 era), so the probe reads `written`.
    /// OpenZFS has them; zfs-fuse (pool version 23) has neither.
    pub written_at: bool,
}

impl Capabilities {
    /// `zfs receive -o PROP=VALUE`. Not probed: it came with the same
    /// OpenZFS release (0.7) as the `receive_resume_token` property, so a
    /// ZFS with resume tokens has it; without them resync sets preserved
    /// properties after the receive (`zfs set`) instead, which zfs-fuse
    /// (no `receive -o`) needs.
    pub fn receive_sets_properties(&self) -> bool {
        self.resume_tokens
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    ResumeProperty,
    ResumeFeature,
    GetType,
    ListParsable,
    Bookmarks,
    Holds,
    Written,
}

/// Tag and snapshot the holds probe names; neither exists, so the probe
/// changes nothing.
const PROBE_TAG: &str = "resync-capability-probe";
const PROBE_SNAPSHOT: &str = "resync-capability-probe-nonexistent";

/// One read-only command per [`Probe`] for the pool `pool`; run them all
/// and pass the results to [`capabilities_from`].
pub fn capability_probes(pool: &str) -> Vec<(Probe, Vec<String>)> {
    let zpool = |args: &[&str]| -> Vec<String> {
        std::iter::once("zpool")
            .chain(args.iter().copied())
            .map(String::from)
            .collect()
    };
    let probe_snapshot = format!("{pool}@{PROBE_SNAPSHOT}");
    vec![
        (
            Probe::ResumeProperty,
            zfs(&["get", "-H", "-o", "value", "receive_resume_token", pool]),
        ),
        (
            Probe::ResumeFeature,
            zpool(&[
                "get",
                "-H",
                "-o",
                "value",
                "feature@extensible_dataset",
                pool,
            ]),
        ),
        (
            Probe::GetType,
            zfs(&["get", "-H", "-t", "filesystem", "-o", "value", "name", pool]),
        ),
        (
            Probe::ListParsable,
            zfs(&["list", "-Hp", "-o", "name", pool]),
        ),
        (
            Probe::Bookmarks,
            zpool(&["get", "-H", "-o", "value", "feature@bookmarks", pool]),
        ),
        (Probe::Holds, zfs(&["release", PROBE_TAG, &probe_snapshot])),
        (
            Probe::Written,
            zfs(&["get", "-H", "-o", "value", "written", pool]),
        ),
    ]
}

/// How one probe went.
pub struct ProbeResult<'a> {
    pub probe: Probe,
    pub status: i32,
    pub stdout: &'a str,
    pub stderr: &'a str,
}

/// Reads the probes' results; a probe that is missing or failed counts as
/// "not supported".
pub fn capabilities_from(results: &[ProbeResult]) -> Capabilities {
    let find = |probe: Probe| results.iter().find(|r| r.probe == probe);
    let succeeded = |probe: Probe| find(probe).is_some_and(|r| r.status == 0);
    let feature_on = |probe: Probe| {
        find(probe)
            .is_some_and(|r| r.status == 0 && matches!(r.stdout.trim(), "enabled" | "active"))
    };
    // The probe releases a hold on a snapshot that does not exist: a ZFS that
    // knows `release` says so; one that does not prints usage instead.
    let holds = find(Probe::Holds).is_some_and(|r| {
        r.status == 0
            || [r.stdout, r.stderr].iter().any(|out| {
                matches!(
                    kind_of(out),
                    ZfsErrorKind::DatasetMissing | ZfsErrorKind::NoSuchTag
                )
            })
    });
    let resume_tokens = succeeded(Probe::ResumeProperty) && feature_on(Probe::ResumeFeature);
    let list_parsable = succeeded(Probe::ListParsable);
    Capabilities {
        resume_tokens,
        get_type_filter: succeeded(Probe::GetType),
        list_parsable,
        bookmarks: feature_on(Probe::Bookmarks),
        send_estimate: resume_tokens || list_parsable,
        holds,
        written_at: succeeded(Probe::Written),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_read_only_commands_on_the_pool() {
        let probes = capability_probes("tank");
        let kinds: Vec<Probe> = probes.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            kinds,
            [
                Probe::ResumeProperty,
                Probe::ResumeFeature,
                Probe::GetType,
                Probe::ListParsable,
                Probe::Bookmarks,
                Probe::Holds,
                Probe::Written
            ]
        );
        let words: Vec<String> = probes.iter().map(|(_, argv)| argv.join(" ")).collect();
        assert_eq!(
            words,
            [
                "zfs get -H -o value receive_resume_token tank",
                "zpool get -H -o value feature@extensible_dataset tank",
                "zfs get -H -t filesystem -o value name tank",
                "zfs list -Hp -o name tank",
                "zpool get -H -o value feature@bookmarks tank",
                "zfs release resync-capability-probe tank@resync-capability-probe-nonexistent",
                "zfs get -H -o value written tank",
            ]
        );
    }

    // What zfs-fuse 0.7.0 printed for each probe on pool `corehelp` (usage
    // text after the first lines cut; the status codes are real).
    fn zfs_fuse_results() -> Vec<ProbeResult<'static>> {
        vec![
            ProbeResult {
                probe: Probe::ResumeProperty,
                status: 2,
                stdout: "",
                stderr: "bad property list: invalid property 'receive_resume_token'\nusage:\n\tget [-rHp] [-d max] [-o \"all\" | field[,...]] [-s source[,...]]\n",
            },
            ProbeResult {
                probe: Probe::ResumeFeature,
                status: 2,
                stdout: "",
                stderr: "bad property list: invalid property '-H'\nusage:\n\tget <\"all\" | property[,...]> <pool> ...\n",
            },
            ProbeResult {
                probe: Probe::GetType,
                status: 2,
                stdout: "",
                stderr: "invalid option 't'\nusage:\n\tget [-rHp] [-d max] [-o \"all\" | field[,...]] [-s source[,...]]\n",
            },
            ProbeResult {
                probe: Probe::ListParsable,
                status: 2,
                stdout: "",
                stderr: "invalid option 'p'\nusage:\n\tlist [-rH][-d max] [-o property[,...]] [-t type[,...]] [-s property] ...\n",
            },
            ProbeResult {
                probe: Probe::Bookmarks,
                status: 2,
                stdout: "",
                stderr: "bad property list: invalid property '-H'\nusage:\n\tget <\"all\" | property[,...]> <pool> ...\n",
            },
            ProbeResult {
                probe: Probe::Holds,
                status: 1,
                stdout: "",
                stderr: "cannot release 'resync-capability-probe' from 'corehelp@resync-capability-probe-nonexistent': dataset does not exist\n",
            },
            // zfs-fuse refuses properties it does not know with this
            // wording and status 2 (see ResumeProperty above).
            ProbeResult {
                probe: Probe::Written,
                status: 2,
                stdout: "",
                stderr: "bad property list: invalid property 'written'\nusage:\n\tget [-rHp] [-d max] [-o \"all\" | field[,...]] [-s source[,...]]\n",
            },
        ]
    }

    #[test]
    fn zfs_fuse_supports_holds_only() {
        assert_eq!(
            capabilities_from(&zfs_fuse_results()),
            Capabilities {
                holds: true,
                ..Capabilities::default()
            }
        );
    }

    #[test]
    fn holds_listing_failure_on_zfs_fuse_is_not_mistaken_for_support() {
        // zfs-fuse: zfs holds -H corehelp@resync-probe-nonexistent (status 255,
        // message on stdout): this is why the probe uses `release`.
        let r = [ProbeResult {
            probe: Probe::Holds,
            status: 255,
            stdout: "internal error: /usr/lib/zfs/pyzfs.py not found\n",
            stderr: "",
        }];
        assert!(!capabilities_from(&r).holds);
        // zfs-fuse: zfs frobnicate
        let r = [ProbeResult {
            probe: Probe::Holds,
            status: 2,
            stdout: "",
            stderr: "unrecognized command 'release'\nusage: zfs command args ...\n",
        }];
        assert!(!capabilities_from(&r).holds);
    }

    // OpenZFS 2.x, written from zpool-get.8 / zfs-get.8 / zfsprops.7 (the
    // token property reads "-" when no receive is partial) and libzfs's
    // zfs_release ("cannot release hold from snapshot '%s@%s'" + ENOENT).
    fn openzfs_results() -> Vec<ProbeResult<'static>> {
        vec![
            ProbeResult { probe: Probe::ResumeProperty, status: 0, stdout: "-\n", stderr: "" },
            ProbeResult { probe: Probe::ResumeFeature, status: 0, stdout: "active\n", stderr: "" },
            ProbeResult { probe: Probe::GetType, status: 0, stdout: "tank\n", stderr: "" },
            ProbeResult { probe: Probe::ListParsable, status: 0, stdout: "tank\n", stderr: "" },
            ProbeResult { probe: Probe::Bookmarks, status: 0, stdout: "enabled\n", stderr: "" },
            ProbeResult {
                probe: Probe::Holds,
                status: 1,
                stdout: "",
                stderr: "cannot release hold from snapshot 'tank@resync-capability-probe-nonexistent': dataset does not exist\n",
            },
            ProbeResult { probe: Probe::Written, status: 0, stdout: "0\n", stderr: "" },
        ]
    }

    #[test]
    fn openzfs_supports_everything() {
        assert_eq!(
            capabilities_from(&openzfs_results()),
            Capabilities {
                resume_tokens: true,
                get_type_filter: true,
                list_parsable: true,
                bookmarks: true,
                send_estimate: true,
                holds: true,
                written_at: true,
            }
        );
    }

    #[test]
    fn resume_needs_both_the_property_and_the_feature() {
        let mut r = openzfs_results();
        r[1].stdout = "disabled\n";
        let caps = capabilities_from(&r);
        assert!(!caps.resume_tokens);
        assert!(caps.send_estimate, "list -p still implies estimates");
        let r: Vec<ProbeResult> = openzfs_results()
            .into_iter()
            .filter(|r| r.probe != Probe::ResumeProperty)
            .collect();
        assert!(!capabilities_from(&r).resume_tokens);
        assert_eq!(capabilities_from(&[]), Capabilities::default());
    }
}
