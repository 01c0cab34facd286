//! Names of the sync snapshots resync creates on the source before each
//! transfer, and the test for "is this one ours to prune".
//!
//! A name is `resync_` + optional `IDENTIFIER_` + `HOST_` + a UTC timestamp
//! `2026-11-21T23:20:48Z`. Ownership is an exact match of that whole shape:
//! syncoid matches by prefix, so host `nas` prunes host `nas2`'s snapshots;
//! resync must not. For the match to be unambiguous the host part never
//! contains `_` (the field separator): [`sanitize_hostname`] maps it to `-`,
//! and [`prefix`] applies it, so `id a` + host `b` and host `a_b` differ.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};

const TAG: &str = "resync_";
/// Longest identifier we accept; keeps names well below ZFS's 255 bytes.
const MAX_IDENTIFIER_LEN: usize = 64;
/// Longest host part; FQDNs can be 253 bytes.
const MAX_HOST_LEN: usize = 64;
/// `YYYY-MM-DDTHH:MM:SSZ`
const TIMESTAMP_LEN: usize = 20;
/// 9999-12-31T23:59:59Z, the last instant the timestamp format can hold.
const MAX_UNIX_SECONDS: u64 = 253_402_300_799;

fn is_snapshot_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')
}

/// Checks a user-chosen identifier: 1 to 64 of `[A-Za-z0-9_\-:.]`.
pub fn validate_identifier(id: &str) -> Result<()> {
    if id.is_empty() {
        bail!("invalid identifier \"\": it is empty");
    }
    if id.len() > MAX_IDENTIFIER_LEN {
        bail!(
            "invalid identifier {id:?}: it is {} bytes long; at most {MAX_IDENTIFIER_LEN} allowed",
            id.len()
        );
    }
    if let Some(c) = id.chars().find(|&c| !is_snapshot_char(c)) {
        bail!("invalid identifier {id:?}: character {c:?} is not allowed (use letters, digits and _-:.)");
    }
    Ok(())
}

/// `resync_` + `ID_` + `HOST_`, the host sanitized.
pub fn prefix(identifier: Option<&str>, hostname: &str) -> String {
    let host = sanitize_hostname(hostname);
    match identifier {
        Some(id) => format!("{TAG}{id}_{host}_"),
        None => format!("{TAG}{host}_"),
    }
}

/// A new sync snapshot name for `now` (UTC, to the second). Clocks before
/// 1970 or after 9999 are clamped rather than panicking.
pub fn new_name(identifier: Option<&str>, hostname: &str, now: SystemTime) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().min(MAX_UNIX_SECONDS))
        .unwrap_or(0);
    let now = UNIX_EPOCH + Duration::from_secs(secs);
    format!(
        "{}{}",
        prefix(identifier, hostname),
        humantime::format_rfc3339_seconds(now)
    )
}

/// Whether `snap` is exactly a sync snapshot name of this identifier and
/// host: the prefix followed by a valid timestamp and nothing else.
pub fn is_ours(snap: &str, identifier: Option<&str>, hostname: &str) -> bool {
    timestamp(snap, identifier, hostname).is_some()
}

/// The creation time encoded in one of our names, `None` when not ours.
pub fn timestamp(snap: &str, identifier: Option<&str>, hostname: &str) -> Option<SystemTime> {
    let rest = snap.strip_prefix(&prefix(identifier, hostname))?;
    parse_timestamp(rest)
}

/// Strictly `YYYY-MM-DDTHH:MM:SSZ`, a real calendar instant.
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let shape = s.len() == TIMESTAMP_LEN
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            19 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
    if !shape {
        return None;
    }
    humantime::parse_rfc3339(s).ok()
}

/// A host name usable inside a snapshot name: characters ZFS allows are
/// kept, others (and `_`, our separator) become `-`; at most 64 bytes;
/// empty becomes `localhost`. Idempotent.
pub fn sanitize_hostname(raw: &str) -> String {
    let host: String = raw
        .trim()
        .chars()
        .map(|c| {
            if is_snapshot_char(c) && c != '_' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_HOST_LEN)
        .collect();
    if host.is_empty() {
        "localhost".to_string()
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    // 2026-11-21T23:20:48Z
    const T: u64 = 1_795_303_248;

    #[test]
    fn names_have_the_documented_shape() {
        assert_eq!(
            new_name(None, "nas", at(T)),
            "resync_nas_2026-11-21T23:20:48Z"
        );
        assert_eq!(
            new_name(Some("offsite"), "nas", at(T)),
            "resync_offsite_nas_2026-11-21T23:20:48Z"
        );
        assert_eq!(prefix(None, "nas"), "resync_nas_");
        assert_eq!(prefix(Some("id"), "nas"), "resync_id_nas_");
        let name = new_name(Some("a.b:c-d_e"), "host.example.com", at(T));
        crate::zfs::validate_snapshot_name(&name).unwrap();
    }

    #[test]
    fn impossible_clocks_are_clamped() {
        let before_epoch = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(
            new_name(None, "h", before_epoch),
            "resync_h_1970-01-01T00:00:00Z"
        );
        let far = at(MAX_UNIX_SECONDS + 1_000_000);
        assert_eq!(new_name(None, "h", far), "resync_h_9999-12-31T23:59:59Z");
    }

    #[test]
    fn our_names_are_recognised_with_their_time() {
        let name = new_name(None, "nas", at(T));
        assert!(is_ours(&name, None, "nas"));
        assert_eq!(timestamp(&name, None, "nas"), Some(at(T)));
        let name = new_name(Some("x"), "nas", at(T));
        assert!(is_ours(&name, Some("x"), "nas"));
    }

    #[test]
    fn another_hosts_snapshots_are_not_ours() {
        let nas2 = new_name(None, "nas2", at(T));
        assert!(!is_ours(&nas2, None, "nas"));
        assert!(!is_ours(&new_name(None, "nas", at(T)), None, "nas2"));
        assert!(!is_ours(&new_name(None, "nas.lan", at(T)), None, "nas"));
        assert!(!is_ours(&new_name(None, "nas-2", at(T)), None, "nas"));
    }

    #[test]
    fn identifier_and_no_identifier_never_match_each_other() {
        let with_id = new_name(Some("offsite"), "nas", at(T));
        let without = new_name(None, "nas", at(T));
        assert!(!is_ours(&with_id, None, "nas"));
        assert!(!is_ours(&without, Some("offsite"), "nas"));
        assert!(!is_ours(&with_id, Some("offsite2"), "nas"));
        assert!(!is_ours(&with_id, Some("off"), "nas"));
    }

    #[test]
    fn identifier_and_host_cannot_collide() {
        // id "a" + host "b" and host "a_b" would both be resync_a_b_…; the
        // host's '_' is sanitized so they differ.
        let id_a_host_b = new_name(Some("a"), "b", at(T));
        let host_a_b = new_name(None, "a_b", at(T));
        assert_ne!(id_a_host_b, host_a_b);
        assert!(!is_ours(&id_a_host_b, None, "a_b"));
        assert!(!is_ours(&host_a_b, Some("a"), "b"));
        // id "a_b" + host "c" vs id "a" + host "b_c" (sanitized to b-c).
        assert!(!is_ours(
            &new_name(Some("a_b"), "c", at(T)),
            Some("a"),
            "b_c"
        ));
    }

    #[test]
    fn garbage_after_the_prefix_is_not_ours() {
        for suffix in [
            "",
            "2026-11-21T23:20:48",
            "2026-11-21T23:20:48Zx",
            "2026-11-21T23:20:48.5Z",
            "2026-11-21 23:20:48Z",
            "2026-13-21T23:20:48Z",
            "2026-02-30T23:20:48Z",
            "2026-11-21T23:20:48+00:00",
            "x2026-11-21T23:20:48Z",
            "manual",
        ] {
            let snap = format!("resync_nas_{suffix}");
            assert!(!is_ours(&snap, None, "nas"), "{snap}");
        }
        assert!(!is_ours("syncoid_nas_2026-11-21:23:20:48", None, "nas"));
        assert!(!is_ours("resync_nas_2026-11-21T23:20:48Z", None, ""));
    }

    #[test]
    fn hostnames_are_sanitized() {
        assert_eq!(sanitize_hostname("nas.example.com"), "nas.example.com");
        assert_eq!(sanitize_hostname("my_host"), "my-host");
        assert_eq!(sanitize_hostname("häst/ 1"), "h-st--1");
        assert_eq!(sanitize_hostname(" nas\n"), "nas");
        assert_eq!(sanitize_hostname(""), "localhost");
        assert_eq!(sanitize_hostname("  "), "localhost");
        assert_eq!(sanitize_hostname(&"x".repeat(300)).len(), 64);
        for raw in ["my_host", "häst/ 1", "", "a@b#c"] {
            let once = sanitize_hostname(raw);
            assert_eq!(sanitize_hostname(&once), once);
        }
        // prefix sanitizes too, so a raw name can't smuggle in separators.
        assert_eq!(prefix(None, "a_b"), "resync_a-b_");
        assert_eq!(prefix(None, ""), "resync_localhost_");
    }

    #[test]
    fn identifiers_are_validated() {
        validate_identifier("offsite-1:a.b_c").unwrap();
        validate_identifier(&"x".repeat(64)).unwrap();
        for (id, want) in [
            ("", "empty"),
            ("a b", "character ' '"),
            ("a/b", "character '/'"),
            ("a@b", "character '@'"),
            ("é", "character 'é'"),
        ] {
            let got = validate_identifier(id).unwrap_err().to_string();
            assert!(got.contains(want), "{id:?}: {got}");
        }
        assert!(validate_identifier(&"x".repeat(65)).is_err());
    }
}
