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
//! # Files (in addition to the protocol's, see `mod.rs`)
//! | name | written by | meaning |
//! |---|---|---|
//! | `session` | the orchestrator, when it creates the folders (both sides) | [`Manifest`]: role, source and target dataset, the step (snapshot names and GUIDs, or the resume token), both folders and their hosts, the orchestrator's host, pid and start time |
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

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    check_session_dir, is_session_locked, parse_fields, parse_u64, prepare_session_dir,
    read_marker, session_id_of, write_atomic, CANCEL, EXIT_OK, LOCK,
};
use crate::host::Host;

/// The manifest's name in a session folder.
pub const MANIFEST: &str = "session";
/// The owner lock's name in the receiver's session folder.
pub const OWNER: &str = "owner";
/// `__chunk-own` gives the lock up after this long without a heartbeat.
pub const OWNER_GRACE: Duration = Duration::from_secs(15);
/// How often the orchestrator sends a heartbeat byte.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Exit code of `__chunk-own` when someone else holds the lock.
pub const EXIT_HELD: i32 = 5;
/// How long `__chunk-own` waits for an older holder of the same nonce to go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

fn now_secs() -> u64 {
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

/// A snapshot as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub name: String,
    pub guid: u64,
}

/// The step a session moves: `from`..`to` (full when `from` is None), or
/// the resume of an interrupted receive from `token`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub from: Option<Snap>,
    pub to: Option<Snap>,
    pub token: Option<String>,
}

/// What a run tells the orchestrator about the stream it moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub source: String,
    pub target: String,
    pub step: Step,
}

/// The `session` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub role: Role,
    pub identity: Identity,
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
    "token",
    "sender-host",
    "sender-dir",
    "receiver-host",
    "receiver-dir",
    "host",
    "pid",
    "started",
];

fn render_snap(s: &Option<Snap>) -> String {
    match s {
        Some(s) => format!("{} {}", s.name, s.guid),
        None => "-".into(),
    }
}

fn parse_snap(v: &str) -> Result<Option<Snap>> {
    if v == "-" {
        return Ok(None);
    }
    let (name, guid) = v
        .rsplit_once(' ')
        .ok_or_else(|| anyhow!("invalid snapshot {v:?}: expected NAME GUID"))?;
    if name.is_empty() {
        bail!("invalid snapshot {v:?}: no name");
    }
    Ok(Some(Snap {
        name: name.to_string(),
        guid: parse_u64(guid)?,
    }))
}

/// A value that goes on one manifest line.
fn one_line(v: &str) -> String {
    v.replace('\n', " ")
}

impl Manifest {
    /// The receiver's manifest of a session this process starts now
    /// between `sender` and `receiver` (host label, folder).
    pub fn ours(identity: Identity, sender: (&str, &str), receiver: (&str, &str)) -> Manifest {
        Manifest {
            role: Role::Receiver,
            identity,
            sender_host: sender.0.to_string(),
            sender_dir: sender.1.to_string(),
            receiver_host: receiver.0.to_string(),
            receiver_dir: receiver.1.to_string(),
            host: hostname(),
            pid: std::process::id(),
            started: now_secs(),
        }
    }

    pub fn render(&self) -> String {
        let id = &self.identity;
        format!(
            "role {}\nsource {}\ntarget {}\nfrom {}\nto {}\ntoken {}\nsender-host {}\nsender-dir {}\nreceiver-host {}\nreceiver-dir {}\nhost {}\npid {}\nstarted {}\n",
            self.role.as_str(),
            one_line(&id.source),
            one_line(&id.target),
            render_snap(&id.step.from),
            render_snap(&id.step.to),
            id.step.token.as_deref().map_or("-".into(), one_line),
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
        let (f, _) =
            parse_fields(text, MANIFEST_KEYS, false).context("invalid session manifest")?;
        let role = match f[0] {
            "sender" => Role::Sender,
            "receiver" => Role::Receiver,
            r => bail!("invalid session manifest: role {r:?}"),
        };
        let token = match f[5] {
            "-" => None,
            t => Some(t.to_string()),
        };
        let m = Manifest {
            role,
            identity: Identity {
                source: f[1].to_string(),
                target: f[2].to_string(),
                step: Step {
                    from: parse_snap(f[3]).context("invalid session manifest")?,
                    to: parse_snap(f[4]).context("invalid session manifest")?,
                    token,
                },
            },
            sender_host: f[6].to_string(),
            sender_dir: f[7].to_string(),
            receiver_host: f[8].to_string(),
            receiver_dir: f[9].to_string(),
            host: f[10].to_string(),
            pid: u32::try_from(parse_u64(f[11]).context("invalid session manifest")?)
                .map_err(|_| anyhow!("invalid session manifest: pid out of range"))?,
            started: parse_u64(f[12]).context("invalid session manifest")?,
        };
        if m.identity.step.to.is_none() && m.identity.step.token.is_none() {
            bail!("invalid session manifest: neither a snapshot nor a resume token");
        }
        Ok(m)
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
            host: hostname(),
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

/// This machine's host name (unsanitized), for messages.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
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
// Whether a step still makes sense

/// Whether the step of a session found on the target can still be finished:
/// its snapshots exist on the source with the recorded GUIDs and the target
/// is still where the step starts (at `from`, without `to`; or holding the
/// recorded resume token). `source` and `target` are (name, GUID) in
/// creation order. Err says why not, for a message.
pub fn check_step(
    step: &Step,
    source: &[(&str, u64)],
    target: &[(&str, u64)],
    target_token: Option<&str>,
) -> std::result::Result<(), String> {
    if let Some(token) = &step.token {
        return match target_token {
            Some(t) if t == token => Ok(()),
            Some(_) => Err("the target's resume token changed".into()),
            None => Err("the target no longer holds the resume token".into()),
        };
    }
    let on =
        |list: &[(&str, u64)], s: &Snap| list.iter().any(|(n, g)| *n == s.name && *g == s.guid);
    let Some(to) = &step.to else {
        return Err("the session names no snapshot".into());
    };
    if !on(source, to) {
        return Err(format!(
            "@{} (GUID {}) is no longer on the source",
            to.name, to.guid
        ));
    }
    if target.iter().any(|(n, _)| *n == to.name) {
        return Err(format!("the target already has @{}", to.name));
    }
    match &step.from {
        None if target.is_empty() => Ok(()),
        None => Err("the target has snapshots now; a full stream no longer fits".into()),
        Some(from) => {
            if !on(source, from) {
                return Err(format!("@{} is no longer on the source", from.name));
            }
            match target.last() {
                Some((n, g)) if *n == from.name && *g == from.guid => Ok(()),
                _ => Err(format!("the target is no longer at @{}", from.name)),
            }
        }
    }
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
fn render_found(
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

// ---------------------------------------------------------------------------
// Helper side: the subcommands

/// Options of this module's subcommands.
#[derive(Debug, Default)]
struct Args {
    dir: Option<PathBuf>,
    tmpdir: Option<PathBuf>,
    target: Option<String>,
    grace: Option<Duration>,
    info: Option<String>,
    manifest: Option<String>,
    remove_dead: bool,
    cancel: bool,
}

fn parse_args(args: &[OsString]) -> Result<Args> {
    let mut a = Args::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let key = arg
            .to_str()
            .ok_or_else(|| anyhow!("invalid option {arg:?}"))?;
        match key {
            "--remove-dead" => a.remove_dead = true,
            "--cancel" => a.cancel = true,
            _ => {
                let value = it
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or_else(|| anyhow!("option {key} needs a UTF-8 value"))?;
                let slot = match key {
                    "--dir" => a.dir.replace(value.into()).is_some(),
                    "--tmpdir" => a.tmpdir.replace(value.into()).is_some(),
                    "--target" => a.target.replace(value.into()).is_some(),
                    "--info" => a.info.replace(value.into()).is_some(),
                    "--manifest" => a.manifest.replace(value.into()).is_some(),
                    "--grace" => {
                        let n = parse_u64(value).with_context(|| format!("option {key}"))?;
                        if n == 0 {
                            bail!("--grace must be at least 1 second");
                        }
                        a.grace.replace(Duration::from_secs(n)).is_some()
                    }
                    _ => bail!("unknown option {key}"),
                };
                if slot {
                    bail!("option {key} given twice");
                }
            }
        }
    }
    Ok(a)
}

/// Entry point of `__chunk-own`, `__chunk-sessions` and `__chunk-manifest`.
pub fn main(sub: &str, args: &[OsString]) -> Result<i32> {
    let a = parse_args(args)?;
    match sub {
        "__chunk-own" => own(a),
        "__chunk-sessions" => sessions(a),
        "__chunk-manifest" => {
            let dir = a.dir.ok_or_else(|| anyhow!("--dir is required"))?;
            let text = a
                .manifest
                .ok_or_else(|| anyhow!("--manifest is required"))?;
            Manifest::parse(&text)?;
            prepare_session_dir(&dir)?;
            write_atomic(&dir, MANIFEST, text.as_bytes())?;
            Ok(EXIT_OK)
        }
        _ => bail!("unknown helper subcommand {sub}"),
    }
}

/// Opens `dir/name` for locking, O_NOFOLLOW; None if absent and not `create`.
fn open_lockfile(dir: &Path, name: &str, create: bool) -> Result<Option<File>> {
    let path = dir.join(name);
    match OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !create => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a valid, open descriptor.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn read_all(mut f: &File) -> String {
    let mut s = String::new();
    let _ = f.rewind();
    let _ = f.take(super::MARKER_MAX).read_to_string(&mut s);
    s
}

/// `__chunk-own`: see the module doc.
fn own(a: Args) -> Result<i32> {
    let dir = a.dir.ok_or_else(|| anyhow!("--dir is required"))?;
    let grace = a.grace.unwrap_or(OWNER_GRACE);
    let info = Owner::parse(&a.info.ok_or_else(|| anyhow!("--info is required"))?)?;
    if let Some(m) = &a.manifest {
        Manifest::parse(m)?;
        prepare_session_dir(&dir)?;
    } else if check_session_dir(&dir).is_err() || read_marker(&dir, MANIFEST)?.is_none() {
        println!("gone");
        return Ok(EXIT_OK);
    }
    let Some(mut file) = open_lockfile(&dir, OWNER, true)? else {
        bail!("cannot create {}/{OWNER}", dir.display());
    };
    if !try_lock(&file) {
        let holder = Owner::parse(&read_all(&file));
        let ours = holder.as_ref().is_ok_and(|h| h.nonce == info.nonce);
        let mut locked = false;
        if let (true, Ok(h)) = (ours, &holder) {
            // Our own older `__chunk-own`, on a connection that died.
            if h.holder > 1 {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(h.holder as libc::pid_t, libc::SIGTERM) };
            }
            let deadline = Instant::now() + TAKEOVER_WAIT;
            while !locked && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
                locked = try_lock(&file);
            }
        }
        if !locked {
            print!("held\n{}", read_all(&file));
            io::stdout().flush().ok();
            return Ok(EXIT_HELD);
        }
    }
    let me = Owner {
        holder: std::process::id(),
        ..info
    };
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(me.render().as_bytes()))
        .with_context(|| format!("writing {}/{OWNER}", dir.display()))?;
    if let Some(m) = &a.manifest {
        write_atomic(&dir, MANIFEST, m.as_bytes())?;
    }
    println!("ok");
    io::stdout().flush().ok();
    // Hold the lock until stdin ends or the heartbeat stops.
    let mut last = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if rc > 0 {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return Ok(EXIT_OK);
            }
            last = Instant::now();
        }
        if last.elapsed() > grace || !dir.exists() {
            return Ok(EXIT_OK);
        }
    }
}

/// Whether someone holds `dir/owner`; the holder's text if so.
fn owner_of(dir: &Path) -> Option<String> {
    let f = open_lockfile(dir, OWNER, false).ok()??;
    if try_lock(&f) {
        None
    } else {
        Some(read_all(&f))
    }
}

/// `__chunk-sessions`: see the module doc.
fn sessions(a: Args) -> Result<i32> {
    let mut out = io::stdout().lock();
    let dirs: Vec<PathBuf> = match (&a.dir, &a.tmpdir) {
        (Some(d), None) => vec![d.clone()],
        (None, Some(t)) => match fs::read_dir(t) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| session_id_of(p).is_ok())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("listing {}", t.display())),
        },
        _ => bail!("give either --dir or --tmpdir"),
    };
    for dir in dirs {
        if check_session_dir(&dir).is_err() {
            continue;
        }
        let manifest = read_marker(&dir, MANIFEST).ok().flatten();
        let parsed = manifest.as_deref().and_then(|m| Manifest::parse(m).ok());
        if a.tmpdir.is_some() {
            // Only folders that say what they are, and name the target.
            let Some(m) = &parsed else { continue };
            if a.target.as_ref().is_some_and(|t| *t != m.identity.target) {
                continue;
            }
        }
        if a.cancel {
            write_atomic(&dir, CANCEL, b"cancel\n")?;
        }
        let alive = is_session_locked(&dir).unwrap_or(true);
        let owner = owner_of(&dir);
        let pid = fs::read_to_string(dir.join(LOCK))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let age = fs::symlink_metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0, |d| d.as_secs());
        let Some(d) = dir.to_str() else { continue };
        out.write_all(&render_found(
            d,
            alive,
            pid,
            age,
            manifest.as_deref(),
            owner.as_deref(),
        ))?;
        // Listing a tmpdir, only receiver folders are removed: their owner
        // lock is taken before their manifest is written, while a sender's
        // folder has a manifest a moment before its helper locks it.
        let removable =
            a.dir.is_some() || parsed.as_ref().is_some_and(|m| m.role == Role::Receiver);
        if a.remove_dead && removable && !alive && owner.is_none() && remove_dead(&dir)? {
            writeln!(out, "R {d}")?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// Removes a folder whose helper and owner locks are free, holding both
/// while it does; false if someone took one meanwhile.
fn remove_dead(dir: &Path) -> Result<bool> {
    let owner = open_lockfile(dir, OWNER, true)?;
    let lock = open_lockfile(dir, LOCK, true)?;
    let (Some(owner), Some(lock)) = (owner, lock) else {
        return Ok(false);
    };
    if !try_lock(&owner) || !try_lock(&lock) {
        return Ok(false);
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}

/// Whether a live `__chunk-own` holds the owner lock of `dir` (for the
/// stale-folder cleanup, which must leave owned folders alone).
pub fn is_owned(dir: &Path) -> bool {
    owner_of(dir).is_some()
}

// ---------------------------------------------------------------------------
// Orchestrator side

fn run_ok(host: &dyn Host, argv: &[String], what: &str) -> Result<Vec<u8>> {
    let out = host.run(argv)?;
    Ok(out.check(what, host.label())?.into_bytes())
}

/// Session folders in `tmpdir` on `host` whose manifest names `target`;
/// with `remove_dead`, dead receiver folders are removed (and listed as
/// removed).
pub fn list(
    host: &dyn Host,
    exe: &str,
    tmpdir: &str,
    target: &str,
    remove_dead: bool,
) -> Result<Listing> {
    let args = ["--tmpdir", tmpdir, "--target", target];
    sessions_cmd(host, exe, &args, remove_dead, false)
}

/// One session folder on `host` (absent: an empty listing); `remove_dead`
/// removes it if no helper and no owner holds it, `cancel` writes `cancel`.
pub fn probe(
    host: &dyn Host,
    exe: &str,
    dir: &str,
    remove_dead: bool,
    cancel: bool,
) -> Result<Listing> {
    sessions_cmd(host, exe, &["--dir", dir], remove_dead, cancel)
}

/// Runs `__chunk-sessions ARGS [--remove-dead] [--cancel]` on `host`.
fn sessions_cmd(
    host: &dyn Host,
    exe: &str,
    args: &[&str],
    remove_dead: bool,
    cancel: bool,
) -> Result<Listing> {
    let mut argv = vec![exe.to_string(), "__chunk-sessions".into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    if remove_dead {
        argv.push("--remove-dead".into());
    }
    if cancel {
        argv.push("--cancel".into());
    }
    parse_listing(&run_ok(host, &argv, "listing chunk sessions")?)
}

/// Creates `dir` on `host` and writes its manifest.
pub fn write_manifest(host: &dyn Host, exe: &str, dir: &str, m: &Manifest) -> Result<()> {
    let argv = vec![
        exe.to_string(),
        "__chunk-manifest".into(),
        "--dir".into(),
        dir.to_string(),
        "--manifest".into(),
        m.render(),
    ];
    run_ok(host, &argv, "writing the chunk session manifest").map(drop)
}

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
        let mut argv = vec![
            self.exe.clone(),
            "__chunk-own".into(),
            "--dir".into(),
            self.dir.clone(),
            "--grace".into(),
            OWNER_GRACE.as_secs().to_string(),
            "--info".into(),
            self.owner.render(),
        ];
        if let Some(m) = manifest {
            argv.extend(["--manifest".into(), m.render()]);
        }
        let mut child = host
            .spawn(&argv)
            .with_context(|| format!("taking ownership of {} on {}", self.dir, host.label()))?;
        let Some(mut out) = child.take_stdout() else {
            child.kill();
            bail!("internal error: no stdout from __chunk-own");
        };
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 16 {
            match out.read(&mut byte) {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    child.kill();
                    return Err(anyhow::Error::new(e).context(format!(
                        "taking ownership of {} on {}",
                        self.dir,
                        host.label()
                    )));
                }
            }
        }
        match line.as_slice() {
            b"ok" => {}
            b"held" => {
                let mut rest = String::new();
                let _ = out.take(super::MARKER_MAX).read_to_string(&mut rest);
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
            b"gone" => {
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
                    String::from_utf8_lossy(&line),
                    host.label()
                );
            }
        }
        drop(out);
        let stop = Arc::new(AtomicBool::new(false));
        let old = self
            .beat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(stop.clone());
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
        if let Some(b) = self.beat.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            role: Role::Receiver,
            identity: Identity {
                source: "tank/vm".into(),
                target: "backup/vm".into(),
                step: Step {
                    from: Some(Snap {
                        name: "a".into(),
                        guid: 1,
                    }),
                    to: Some(Snap {
                        name: "b c".into(),
                        guid: 2,
                    }),
                    token: None,
                },
            },
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
                step: Step {
                    from: None,
                    to: None,
                    token: Some("1-abc-def".into()),
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
    fn a_step_still_fits_only_where_it_started() {
        let snap = |n: &str, g| {
            Some(Snap {
                name: n.into(),
                guid: g,
            })
        };
        let inc = Step {
            from: snap("a", 1),
            to: snap("b", 2),
            token: None,
        };
        let src = [("a", 1), ("b", 2)];
        assert_eq!(check_step(&inc, &src, &[("a", 1)], None), Ok(()));
        assert!(check_step(&inc, &[("a", 1), ("b", 3)], &[("a", 1)], None).is_err());
        assert!(check_step(&inc, &[("b", 2)], &[("a", 1)], None).is_err());
        assert!(check_step(&inc, &src, &[("a", 1), ("b", 2)], None).is_err());
        assert!(check_step(&inc, &src, &[("a", 1), ("x", 5)], None).is_err());
        assert!(check_step(&inc, &src, &[("a", 9)], None).is_err());
        assert!(check_step(&inc, &src, &[], None).is_err());
        let full = Step {
            from: None,
            to: snap("b", 2),
            token: None,
        };
        assert_eq!(check_step(&full, &src, &[], None), Ok(()));
        assert!(check_step(&full, &src, &[("a", 1)], None).is_err());
        let resume = Step {
            from: None,
            to: None,
            token: Some("t1".into()),
        };
        assert_eq!(check_step(&resume, &[], &[], Some("t1")), Ok(()));
        assert!(check_step(&resume, &[], &[], Some("t2")).is_err());
        assert!(check_step(&resume, &[], &[], None).is_err());
    }

    #[test]
    fn helper_options_parse() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let a = parse_args(&os(&[
            "--tmpdir",
            "/tmp",
            "--target",
            "p/x y",
            "--remove-dead",
        ]))
        .unwrap();
        assert_eq!(a.tmpdir.as_deref(), Some(Path::new("/tmp")));
        assert_eq!(a.target.as_deref(), Some("p/x y"));
        assert!(a.remove_dead && !a.cancel);
        for bad in [
            &["--dir"][..],
            &["--grace", "0"],
            &["--grace", "x"],
            &["--dir", "a", "--dir", "b"],
            &["--bogus", "1"],
        ] {
            assert!(parse_args(&os(bad)).is_err(), "{bad:?}");
        }
    }

    /// The owner lock as the listing and the stale cleanup see it.
    #[test]
    fn an_owner_lock_is_seen_while_held() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("resync-0123456789abcdef");
        prepare_session_dir(&dir).unwrap();
        assert!(!is_owned(&dir), "no owner file yet");
        let f = open_lockfile(&dir, OWNER, true).unwrap().unwrap();
        assert!(try_lock(&f));
        // flock is per open file description: a second open sees it held.
        assert!(is_owned(&dir));
        drop(f);
        assert!(!is_owned(&dir));
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
