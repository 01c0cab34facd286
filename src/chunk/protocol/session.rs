//! Chunk sessions across orchestrator restarts: the `session` manifest that
//! says what a pair of session folders is moving and for whom, the `owner`
//! lock that says whether an orchestrator is driving them right now, and the
//! hidden subcommands that list, probe, cancel and clear session folders on
//! a host. With these a rerun of the same command finds the live helpers of
//! an orchestrator that died (kill -9, its machine rebooted) and re-attaches
//! to them; a second run to a target that someone is replicating into is
//! refused, naming the session, its host and its age; folders of helpers
//! that died are removed instead of being mistaken for progress.
//!
//! This module owns the formats (manifest, owner file, listing) and the
//! [`Held`] error; `__chunk-own`/`__chunk-sessions`/`__chunk-manifest` run
//! in `helper/owner.rs`, the orchestrator's side (probing, listing,
//! `Ownership`) in `driver/`.
//!
//! # Files (in addition to the protocol's, see the package doc)
//! | name | written by | meaning |
//! |---|---|---|
//! | `session` | the orchestrator, when it creates the folders (both sides) | [`Manifest`]: role, source and target dataset, the stream (snapshot names and GUIDs, `-i` or `-I`, or the resume token), the MD5 of the `zfs send` and `zfs receive` command lines ([`argv_md5`]: a rerun whose command lines differ cancels the session instead of re-attaching), both folders and their hosts, the orchestrator's host, pid and start time |
//! | `owner` | `__chunk-own`, while it holds `flock` on it | [`Owner`]: the session id, the orchestrator's host, pid, start time and nonce, and the pid of the `__chunk-own` process |
//!
//! # Ownership
//! The orchestrator keeps one exec channel open on the target host running
//! `resync __chunk-own` in the receiver's folder. That process holds
//! `flock(owner)` and exits when its stdin reaches EOF (the orchestrator
//! died or closed it: sshd closes the channel at once when the client's TCP
//! connection goes away) or when no heartbeat byte arrived for
//! [`OWNER_GRACE`] (the link is cut). After a reconnect the orchestrator
//! takes ownership again; a `__chunk-own` of its own (same nonce) that still
//! holds the lock on a dead connection is stopped first. If someone else
//! holds it, the session was taken over and the orchestrator stops without
//! cancelling the helpers. A rerun that finds the owner lock free may take
//! the session over; one that finds it held is refused.
//!
//! # Order of creation (what makes discovery race-free)
//! A new session's receiver folder is created by `__chunk-own --manifest`,
//! which takes the owner lock before it writes `session`; only then is the
//! receiver helper started. So a folder with a `session` whose owner lock
//! and helper lock are both free belongs to nobody: it is dead, and
//! `__chunk-sessions --remove-dead` removes it while holding both locks.
//!
//! # Command lines
//! - `resync __chunk-own --dir D --grace SECS --info OWNER [--manifest TEXT]`:
//!   prints `ok` and holds the owner lock until EOF/grace; `held` and the
//!   holder's `owner` text if someone else holds it; `gone` if D (without
//!   `--manifest`) has no `session`. With `--manifest` it creates D first.
//! - `resync __chunk-sessions (--tmpdir T [--target DS] | --dir D) [--remove-dead] [--cancel]`:
//!   lists session folders (see [`parse_listing`]), removing dead ones
//!   (that name DS, with `--tmpdir`), or writing `cancel` into D.
//! - `resync __chunk-manifest --dir D --manifest TEXT`: creates D, writes `session`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use super::folder::session_id_of;
use super::markers::{parse_fields, parse_u64};
use crate::zfs::Snapshot;

/// The manifest's name in a session folder.
pub const MANIFEST: &str = "session";
/// The owner lock's name in the receiver's session folder.
pub const OWNER: &str = "owner";
/// `__chunk-own` gives the lock up after this long without a heartbeat.
pub const OWNER_GRACE: Duration = Duration::from_secs(15);
/// Exit code of `__chunk-own` when someone else holds the lock.
pub const EXIT_HELD: i32 = 5;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Manifest

/// Which helper a folder belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        }
    }
}

/// The stream a session moves, in the crate's own snapshot type (a
/// manifest records name and GUID; `createtxg` reads back as 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    /// A full stream of `to`.
    Full { to: Snapshot },
    /// `from`..`to`, with `-I` when `intermediates`, else `-i`.
    Incremental {
        from: Snapshot,
        to: Snapshot,
        intermediates: bool,
    },
    /// The resume of an interrupted receive from `token`.
    Resume { token: String },
}

impl Stream {
    /// The snapshot the stream ends at (None for a resume).
    pub fn to(&self) -> Option<&Snapshot> {
        match self {
            Stream::Full { to } | Stream::Incremental { to, .. } => Some(to),
            Stream::Resume { .. } => None,
        }
    }
}

/// What a run tells the orchestrator about the stream it moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub source: String,
    pub target: String,
    pub stream: Stream,
}

/// The `session` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub role: Role,
    pub identity: Identity,
    /// [`argv_md5`] of the `zfs send` and `zfs receive` command lines the
    /// helpers run: a rerun with other options does not re-attach.
    pub argv_md5: String,
    pub sender_host: String,
    pub sender_dir: String,
    pub receiver_host: String,
    pub receiver_dir: String,
    /// The orchestrator that created the session.
    pub host: String,
    pub pid: u32,
    pub started: u64,
}

const MANIFEST_KEYS: &[&str] = &[
    "role",
    "source",
    "target",
    "from",
    "to",
    "intermediates",
    "token",
    "argv-md5",
    "sender-host",
    "sender-dir",
    "receiver-host",
    "receiver-dir",
    "host",
    "pid",
    "started",
];

/// The MD5 (lower case hex) of a session's two command lines, each word
/// length-prefixed so that no two different argv pairs encode alike.
pub fn argv_md5(send: &[String], recv: &[String]) -> String {
    let mut bytes = Vec::new();
    for argv in [send, recv] {
        bytes.extend_from_slice(format!("{}\n", argv.len()).as_bytes());
        for word in argv {
            bytes.extend_from_slice(format!("{}:", word.len()).as_bytes());
            bytes.extend_from_slice(word.as_bytes());
        }
    }
    let (digest, _) = crate::sys::md5_reader(&mut &bytes[..]).unwrap_or(([0; 16], 0));
    crate::sys::hex(&digest)
}

fn render_snap(s: Option<&Snapshot>) -> String {
    match s {
        Some(s) => format!("{} {}", s.name, s.guid),
        None => "-".into(),
    }
}

fn parse_snap(v: &str) -> Result<Option<Snapshot>> {
    if v == "-" {
        return Ok(None);
    }
    let (name, guid) = v
        .rsplit_once(' ')
        .ok_or_else(|| anyhow!("invalid snapshot {v:?}: expected NAME GUID"))?;
    if name.is_empty() {
        bail!("invalid snapshot {v:?}: no name");
    }
    Ok(Some(Snapshot {
        name: name.to_string(),
        guid: parse_u64(guid)?,
        createtxg: 0,
    }))
}

/// A value that goes on one manifest line.
fn one_line(v: &str) -> String {
    v.replace('\n', " ")
}

impl Manifest {
    /// The receiver's manifest of a session this process starts now
    /// between `sender` and `receiver` (host label, folder).
    pub fn ours(
        identity: Identity,
        argv_md5: String,
        sender: (&str, &str),
        receiver: (&str, &str),
    ) -> Manifest {
        Manifest {
            role: Role::Receiver,
            identity,
            argv_md5,
            sender_host: sender.0.to_string(),
            sender_dir: sender.1.to_string(),
            receiver_host: receiver.0.to_string(),
            receiver_dir: receiver.1.to_string(),
            host: this_host(),
            pid: std::process::id(),
            started: now_secs(),
        }
    }

    pub fn render(&self) -> String {
        let id = &self.identity;
        let (from, to, intermediates, token) = match &id.stream {
            Stream::Full { to } => (None, Some(to), false, None),
            Stream::Incremental {
                from,
                to,
                intermediates,
            } => (Some(from), Some(to), *intermediates, None),
            Stream::Resume { token } => (None, None, false, Some(token.as_str())),
        };
        format!(
            "role {}\nsource {}\ntarget {}\nfrom {}\nto {}\nintermediates {}\ntoken {}\nargv-md5 {}\nsender-host {}\nsender-dir {}\nreceiver-host {}\nreceiver-dir {}\nhost {}\npid {}\nstarted {}\n",
            self.role.as_str(),
            one_line(&id.source),
            one_line(&id.target),
            render_snap(from),
            render_snap(to),
            u8::from(intermediates),
            token.map_or("-".into(), one_line),
            one_line(&self.argv_md5),
            one_line(&self.sender_host),
            one_line(&self.sender_dir),
            one_line(&self.receiver_host),
            one_line(&self.receiver_dir),
            one_line(&self.host),
            self.pid,
            self.started
        )
    }

    pub fn parse(text: &str) -> Result<Manifest> {
        let bad = "invalid session manifest";
        let (f, _) = parse_fields(text, MANIFEST_KEYS, false).context(bad)?;
        let role = match f[0] {
            "sender" => Role::Sender,
            "receiver" => Role::Receiver,
            r => bail!("{bad}: role {r:?}"),
        };
        let from = parse_snap(f[3]).context(bad)?;
        let to = parse_snap(f[4]).context(bad)?;
        let intermediates = match f[5] {
            "0" => false,
            "1" => true,
            v => bail!("{bad}: intermediates {v:?}"),
        };
        let token = match f[6] {
            "-" => None,
            t => Some(t.to_string()),
        };
        let stream = match (from, to, token) {
            (None, None, Some(token)) => Stream::Resume { token },
            (None, Some(to), None) if !intermediates => Stream::Full { to },
            (Some(from), Some(to), None) => Stream::Incremental {
                from,
                to,
                intermediates,
            },
            _ => bail!("{bad}: neither one snapshot, nor two, nor a resume token"),
        };
        let argv_md5 = f[7];
        if argv_md5.len() != 32 || !argv_md5.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{bad}: argv-md5 {argv_md5:?}");
        }
        Ok(Manifest {
            role,
            identity: Identity {
                source: f[1].to_string(),
                target: f[2].to_string(),
                stream,
            },
            argv_md5: argv_md5.to_string(),
            sender_host: f[8].to_string(),
            sender_dir: f[9].to_string(),
            receiver_host: f[10].to_string(),
            receiver_dir: f[11].to_string(),
            host: f[12].to_string(),
            pid: u32::try_from(parse_u64(f[13]).context(bad)?)
                .map_err(|_| anyhow!("{bad}: pid out of range"))?,
            started: parse_u64(f[14]).context(bad)?,
        })
    }

    /// The session id: the receiver folder's.
    pub fn session_id(&self) -> String {
        session_id_of(Path::new(&self.receiver_dir))
            .map(str::to_string)
            .unwrap_or_else(|_| self.receiver_dir.clone())
    }
}

// ---------------------------------------------------------------------------
// Owner

/// The `owner` file: who drives the session now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub session: String,
    /// The orchestrator's host name, pid and start time (Unix seconds).
    pub host: String,
    pub pid: u32,
    pub started: u64,
    /// Random per orchestrator run: tells its own older `__chunk-own` apart.
    pub nonce: String,
    /// Pid of the `__chunk-own` process (0 before it wrote the file).
    pub holder: u32,
}

const OWNER_KEYS: &[&str] = &["session", "host", "pid", "started", "nonce", "holder"];

impl Owner {
    /// This process as the owner of `session`.
    pub fn ours(session: &str, nonce: &str) -> Owner {
        Owner {
            session: session.to_string(),
            host: this_host(),
            pid: std::process::id(),
            started: now_secs(),
            nonce: nonce.to_string(),
            holder: 0,
        }
    }

    pub fn render(&self) -> String {
        format!(
            "session {}\nhost {}\npid {}\nstarted {}\nnonce {}\nholder {}\n",
            one_line(&self.session),
            one_line(&self.host),
            self.pid,
            self.started,
            one_line(&self.nonce),
            self.holder
        )
    }

    pub fn parse(text: &str) -> Result<Owner> {
        let (f, _) = parse_fields(text, OWNER_KEYS, false).context("invalid owner file")?;
        let num = |s: &str| -> Result<u32> {
            u32::try_from(parse_u64(s)?).map_err(|_| anyhow!("number out of range {s:?}"))
        };
        Ok(Owner {
            session: f[0].to_string(),
            host: f[1].to_string(),
            pid: num(f[2]).context("invalid owner file")?,
            started: parse_u64(f[3]).context("invalid owner file")?,
            nonce: f[4].to_string(),
            holder: num(f[5]).context("invalid owner file")?,
        })
    }

    /// How long ago the owner started, for messages.
    pub fn age(&self) -> String {
        age_text(now_secs().saturating_sub(self.started))
    }
}

/// How long ago `started` (Unix seconds) was, e.g. `4m12s`.
pub fn ago(started: u64) -> String {
    age_text(now_secs().saturating_sub(started))
}

fn age_text(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

/// This machine's host name for manifests and messages (`unknown` when it
/// has none: the name only helps people and the local-sender check).
pub fn this_host() -> String {
    crate::sys::hostname().unwrap_or_else(|_| "unknown".into())
}

/// Someone else owns the session (typed: the run refuses, or, after a
/// reconnect, stops without cancelling the helpers).
#[derive(Debug, Clone)]
pub struct Held {
    pub owner: Owner,
    /// Where the session replicates into, e.g. `root@backup:tank/vm`.
    pub target: String,
    /// True when we owned it before (a reconnect found it taken over).
    pub taken_over: bool,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.owner;
        if self.taken_over {
            write!(
                f,
                "session {} taken over by resync pid {} on host {} (started {} ago); stopping without touching its helpers",
                o.session, o.pid, o.host, o.age()
            )
        } else {
            write!(
                f,
                "refused: {} is being replicated by session {} (started {} ago by resync pid {} on host {}); wait for it or stop it",
                self.target, o.session, o.age(), o.pid, o.host
            )
        }
    }
}

impl std::error::Error for Held {}

/// True when `err` says another orchestrator owns the session.
pub fn is_held(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<Held>())
}

// ---------------------------------------------------------------------------
// Listing (what `__chunk-sessions` prints)

/// One session folder as `__chunk-sessions` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub dir: String,
    /// A helper holds the folder's `lock`.
    pub helper_alive: bool,
    /// The helper's pid, as it wrote it into `lock` (0 if unknown).
    pub helper_pid: u32,
    /// Seconds since the folder last changed.
    pub age: u64,
    pub manifest: Option<Manifest>,
    /// The holder, when the owner lock is held.
    pub owner: Option<Owner>,
}

/// What `__chunk-sessions` printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub found: Vec<Found>,
    /// Dead folders it removed.
    pub removed: Vec<String>,
}

/// Renders one folder: a header line `F <alive 0/1> <pid> <age> <manifest
/// bytes|-> <owner bytes|-> <dir>`, then the manifest and owner texts.
pub fn render_found(
    dir: &str,
    alive: bool,
    pid: u32,
    age: u64,
    m: Option<&str>,
    o: Option<&str>,
) -> Vec<u8> {
    let len = |t: Option<&str>| t.map_or("-".to_string(), |t| t.len().to_string());
    let mut out = format!(
        "F {} {pid} {age} {} {} {dir}\n",
        u8::from(alive),
        len(m),
        len(o)
    )
    .into_bytes();
    out.extend_from_slice(m.unwrap_or("").as_bytes());
    out.extend_from_slice(o.unwrap_or("").as_bytes());
    out
}

/// Parses the output of `__chunk-sessions`: `F` records (see
/// [`render_found`]) and, after the record of a dead folder it removed,
/// `R DIR`. A manifest or
/// owner text that does not parse is left out (None), not an error.
pub fn parse_listing(out: &[u8]) -> Result<Listing> {
    let mut l = Listing::default();
    let mut rest = out;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| anyhow!("truncated session listing"))?;
        let line = std::str::from_utf8(&rest[..end]).context("session listing is not UTF-8")?;
        rest = &rest[end + 1..];
        if let Some(dir) = line.strip_prefix("R ") {
            l.removed.push(dir.to_string());
            continue;
        }
        let f: Vec<&str> = line.splitn(7, ' ').collect();
        if f.len() != 7 || f[0] != "F" {
            bail!("unexpected line {line:?} in session listing");
        }
        let mut text = |len: &str| -> Result<Option<String>> {
            if len == "-" {
                return Ok(None);
            }
            let n: usize = len.parse().context("length in session listing")?;
            if rest.len() < n {
                bail!("truncated session listing");
            }
            let t = String::from_utf8_lossy(&rest[..n]).into_owned();
            rest = &rest[n..];
            Ok(Some(t))
        };
        let m = text(f[4])?;
        let o = text(f[5])?;
        l.found.push(Found {
            dir: f[6].to_string(),
            helper_alive: f[1] == "1",
            helper_pid: f[2].parse().unwrap_or(0),
            age: f[3].parse().unwrap_or(0),
            manifest: m.and_then(|t| Manifest::parse(&t).ok()),
            owner: o.and_then(|t| Owner::parse(&t).ok()),
        });
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, guid: u64) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid,
            createtxg: 0,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            role: Role::Receiver,
            identity: Identity {
                source: "tank/vm".into(),
                target: "backup/vm".into(),
                stream: Stream::Incremental {
                    from: snap("a", 1),
                    to: snap("b c", 2),
                    intermediates: true,
                },
            },
            argv_md5: argv_md5(&["zfs".into()], &["zfs".into()]),
            sender_host: "local".into(),
            sender_dir: "/tmp/resync-0123456789abcdef".into(),
            receiver_host: "root@backup".into(),
            receiver_dir: "/tmp/resync-fedcba9876543210".into(),
            host: "alpha".into(),
            pid: 4242,
            started: 1_700_000_000,
        }
    }

    #[test]
    fn manifest_round_trips_and_rejects_junk() {
        let m = manifest();
        assert_eq!(Manifest::parse(&m.render()).unwrap(), m);
        assert_eq!(m.session_id(), "fedcba9876543210");
        let resume = Manifest {
            identity: Identity {
                stream: Stream::Resume {
                    token: "1-abc-def".into(),
                },
                ..m.identity.clone()
            },
            role: Role::Sender,
            ..m.clone()
        };
        assert_eq!(Manifest::parse(&resume.render()).unwrap(), resume);
        let text = m.render();
        for bad in [
            String::new(),
            text.replace("role receiver", "role boss"),
            text.replace("pid 4242", "pid x"),
            text.replace("to b c 2", "to -"),
            text.replace("from a 1", "from a"),
            text.replace("started 1700000000\n", ""),
            text.replace("intermediates 1", "intermediates 2"),
            text.replace("argv-md5 ", "argv-md5 x"),
            text.replace("token -", "token t"),
            format!("{text}extra 1\n"),
        ] {
            assert!(Manifest::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn owner_round_trips_and_says_who_holds_the_target() {
        let o = Owner {
            session: "fedcba9876543210".into(),
            host: "alpha".into(),
            pid: 4242,
            started: now_secs() - 252,
            nonce: "n1".into(),
            holder: 77,
        };
        assert_eq!(Owner::parse(&o.render()).unwrap(), o);
        assert!(Owner::parse("session x\n").is_err());
        let held = Held {
            owner: o,
            target: "root@backup:tank/vm".into(),
            taken_over: false,
        };
        let msg = held.to_string();
        assert!(
            msg.starts_with("refused: root@backup:tank/vm is being replicated by session fedcba9876543210 (started 4m1"),
            "{msg}"
        );
        assert!(
            msg.ends_with("by resync pid 4242 on host alpha); wait for it or stop it"),
            "{msg}"
        );
        assert!(is_held(&anyhow::Error::new(held).context("x")));
    }

    #[test]
    fn listing_round_trips() {
        let m = manifest().render();
        let mut out = render_found("/tmp/resync-fedcba9876543210", true, 99, 12, Some(&m), None);
        out.extend_from_slice(b"R /tmp/resync-1111111111111111\n");
        out.extend(render_found(
            "/tmp/resync-2222222222222222",
            false,
            0,
            5,
            None,
            Some("junk"),
        ));
        let l = parse_listing(&out).unwrap();
        assert_eq!(l.removed, vec!["/tmp/resync-1111111111111111"]);
        assert_eq!(l.found.len(), 2);
        assert!(l.found[0].helper_alive);
        assert_eq!(l.found[0].helper_pid, 99);
        assert_eq!(l.found[0].manifest, Some(manifest()));
        assert!(l.found[0].owner.is_none());
        assert!(!l.found[1].helper_alive && l.found[1].manifest.is_none());
        assert!(parse_listing(b"F 1 2 3 40 - /x\nshort").is_err());
        assert!(parse_listing(b"X\n").is_err());
        assert!(parse_listing(b"").unwrap().found.is_empty());
    }

    #[test]
    fn the_argv_fingerprint_tells_command_lines_apart() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let base = argv_md5(
            &w(&["zfs", "send", "p@a"]),
            &w(&["zfs", "receive", "-F", "q"]),
        );
        assert_eq!(base.len(), 32);
        assert_eq!(
            base,
            argv_md5(
                &w(&["zfs", "send", "p@a"]),
                &w(&["zfs", "receive", "-F", "q"])
            )
        );
        for other in [
            argv_md5(&w(&["zfs", "send", "p@a"]), &w(&["zfs", "receive", "q"])),
            argv_md5(
                &w(&["zfs", "send", "p@a", "zfs"]),
                &w(&["receive", "-F", "q"]),
            ),
            argv_md5(&w(&["zfs", "send", "p@a"]), &w(&["zfs", "receive", "-Fq"])),
        ] {
            assert_ne!(base, other);
        }
    }
}
