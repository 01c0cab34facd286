//! The orchestrator of `--chunked` mode: moves one `zfs send` stream from the
//! source host to the target host as chunk files, following the protocol in
//! `chunk::protocol`. It starts the sender helper beside `zfs send` and the receiver
//! helper beside `zfs receive` (detached, through `__chunk-start`), then
//! talks to each session folder through long-lived `__chunk-serve`
//! processes on exec channels of the one SSH session per host (child
//! processes locally): one control channel per side polls the folder (and
//! applies the deletions and marker writes decided in the last round), and
//! up to `window` data channels per side stream complete chunks from the
//! sender's folder into the receiver's, frame by frame, never a whole chunk
//! in memory. A copy resumes from the byte offset the receiver's `.part`
//! file has reached. A lost SSH connection is reconnected with backoff, the
//! channels are started again on the new connection, and the folders are
//! simply read again.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::client::{is_no_space_error, Client, ServeError};
use super::ownership::Ownership;
use super::sessions::{self, Probe};
use crate::bwlimit::Limiter;
use crate::chunk::protocol::command::HelperCommand;
use crate::chunk::protocol::folder::{chunk_name, md5_name};
use crate::chunk::protocol::frames::{Folder, Op};
use crate::chunk::protocol::markers::{End, Failure, Outcome, Progress, RecvResult};
use crate::chunk::protocol::session::{argv_md5, is_held, Identity, Manifest, Owner, Role};
use crate::chunk::protocol::{
    ABORT, CANCEL, END, ERROR, LOG, PART, PROGRESS, RESEND, RESULT, SESSION_PREFIX,
};
use crate::compress::Compress;
use crate::host::reconnect::Backoff;
use crate::host::{is_connection_lost, stderr_tail, ConnectionLost, Host};
use crate::progress::{human_bytes, Transfer};
use crate::sys::{Unpoisoned, UnpoisonedRw};
use crate::zfs::ZfsError;

/// Pause between polls right after something happened; it doubles while
/// nothing does, up to POLL_IDLE.
const POLL_BUSY: Duration = Duration::from_millis(20);
/// Pause before a poll that carries operations (deletions, markers).
const POLL_NOW: Duration = Duration::from_millis(2);
const POLL_IDLE: Duration = Duration::from_millis(200);
/// Copies of one chunk that may fail (other than by a lost connection)
/// before the run gives up.
const COPY_FAILURES_MAX: u32 = 5;
/// A copy asks the receiver's server to confirm its writes every this many
/// bytes, with at most SYNCS_IN_FLIGHT unconfirmed: what a cut can cost per
/// data channel (and what a channel can move per round trip).
const SYNC_EVERY: u64 = 1 << 20;
/// Most data channels per SSH connection. sshd's MaxSessions is 10 by
/// default; beside the data channels a connection carries a control channel
/// per side, the owner lock's channel (target) and a helper check per side:
/// 6 + 1 + 1 + 1 = 9 alone, and 2 * 2 + 2 + 1 + 2 = 9 when both sides share
/// one connection. More chunks may be staged, but no more are copied at once.
const DATA_CHANNELS_MAX: usize = 6;
const SYNCS_IN_FLIGHT: u32 = 2;
/// Time without progress after which the helpers' locks are checked.
const HELPER_CHECK: Duration = Duration::from_secs(5);

/// Settings of a chunked transfer.
#[derive(Debug, Clone)]
pub struct Options {
    pub chunk_size: u64,
    pub window: u64,
    /// Give up after this long without progress (helpers get it too).
    pub timeout: Duration,
    /// Absolute; session folders go here on both hosts.
    pub tmpdir: String,
    /// Bytes per second over all chunk copies together.
    pub bwlimit: Option<u64>,
    /// Compression of chunk files (by the sender helper; the receiver
    /// decodes).
    pub compress: Compress,
}

/// Opens a fresh connection to a side's host (after the old one broke).
pub type Reconnect<'a> = &'a (dyn Fn() -> Result<Arc<dyn Host>> + Sync);

/// A host connection that a reconnect replaces for everyone who reads it.
pub type HostCell = RwLock<Arc<dyn Host>>;

/// One side of a chunked transfer.
pub struct Side<'a> {
    pub host: &'a HostCell,
    pub reconnect: Reconnect<'a>,
    /// Path of our binary on that host.
    pub exe: String,
}

/// What a finished transfer did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Bytes the receiver gave to zfs receive.
    pub bytes: u64,
    /// Chunk bytes moved, including bytes sent again.
    pub copied: u64,
    /// Bytes sent again: after a cut, those between the receiver's `.part`
    /// size and what we had sent of that chunk; a rejected chunk in full.
    pub resent: u64,
    pub chunks: u64,
    pub reconnects: u32,
}

/// The serve processes of one side on its current connection: the control
/// channel and idle data channels. A reconnect bumps `gen` and drops them
/// all; a client of an older generation is never reused.
#[derive(Default)]
struct Pool {
    gen: u64,
    control: Option<Client>,
    /// Idle data channels and when they were last used.
    idle: Vec<(Client, Instant)>,
}

/// A side with its current connection and session folder.
struct Conn<'a> {
    host: &'a HostCell,
    reconnect: Reconnect<'a>,
    exe: String,
    dir: String,
    label: String,
    timeout: Duration,
    pool: Arc<Mutex<Pool>>,
}

impl Conn<'_> {
    fn get(&self) -> Arc<dyn Host> {
        read(self.host)
    }

    /// What a copy thread needs to use this side's data channels.
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.get(),
            pool: self.pool.clone(),
            gen: self.pool.locked().gen,
            exe: self.exe.clone(),
            dir: self.dir.clone(),
            label: self.label.clone(),
            timeout: self.timeout,
        }
    }

    /// Drops every channel of the old connection.
    fn reset_channels(&self) {
        let mut p = self.pool.locked();
        p.gen += 1;
        p.control = None;
        p.idle.clear();
    }
}

fn read(cell: &HostCell) -> Arc<dyn Host> {
    cell.read_now().clone()
}

/// One side's data channels as a copy thread sees them.
#[derive(Clone)]
struct Endpoint {
    host: Arc<dyn Host>,
    pool: Arc<Mutex<Pool>>,
    gen: u64,
    exe: String,
    dir: String,
    label: String,
    timeout: Duration,
}

impl Endpoint {
    /// An idle data channel of this connection, or a new one.
    fn take(&self) -> Result<Client> {
        {
            let mut p = self.pool.locked();
            if p.gen != self.gen {
                return Err(anyhow::Error::new(ConnectionLost {
                    host: self.label.clone(),
                    reason: "replaced by a new connection".into(),
                }));
            }
            // A server that idled for half its timeout may be about to quit.
            let fresh = self.timeout / 2;
            p.idle.retain(|(_, used)| used.elapsed() < fresh);
            if let Some((c, _)) = p.idle.pop() {
                return Ok(c);
            }
        }
        Client::start(&*self.host, &self.exe, &self.dir, self.timeout)
    }

    fn give(&self, c: Client) {
        let mut p = self.pool.locked();
        if p.gen == self.gen {
            p.idle.push((c, Instant::now()));
        }
    }
}

/// A random session id of 32 lowercase hex digits.
pub fn new_session_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a session id")?;
    Ok(crate::sys::hex(&bytes))
}

/// Applies `ops` in a side's folder and lists it, over its control channel
/// (started on first use and after a reconnect). A reused channel that
/// broke for another reason than the connection is replaced once.
fn poll(conn: &Conn, ops: &[Op]) -> Result<Folder> {
    let context = || format!("reading session folder {} on {}", conn.dir, conn.label);
    for attempt in 0..2 {
        let (gen, idle) = {
            let mut p = conn.pool.locked();
            (p.gen, p.control.take())
        };
        let reused = idle.is_some();
        let mut client = match idle {
            Some(c) => c,
            None => Client::start(&*conn.get(), &conn.exe, &conn.dir, conn.timeout)
                .with_context(context)?,
        };
        match client.poll(ops) {
            Ok(f) => {
                let mut p = conn.pool.locked();
                if p.gen == gen {
                    p.control = Some(client);
                }
                return Ok(f);
            }
            Err(e) => {
                let retry = reused
                    && attempt == 0
                    && !is_connection_lost(&e)
                    && e.downcast_ref::<ServeError>().is_none();
                if !retry && is_no_space_error(&e) {
                    // A marker that did not fit (a chunk's copy may have
                    // filled the folder first): the same advice as for a
                    // chunk.
                    bail!(
                        "no space left on {} in {}: free space there, or use a smaller --chunk-size or another --tmpdir ({})",
                        conn.label,
                        conn.dir,
                        e.root_cause()
                    );
                }
                if !retry {
                    return Err(e.context(context()));
                }
            }
        }
    }
    bail!("{}: the chunk server failed twice", context())
}

/// One chunk to copy.
struct Job {
    src: Endpoint,
    dst: Endpoint,
    index: u64,
    size: u64,
    md5: String,
    limit: Option<Arc<Mutex<Limiter>>>,
    /// Bytes forwarded, over all copies.
    counter: Arc<AtomicU64>,
    /// Per chunk, the furthest byte offset we forwarded (for re-sent bytes).
    sent: Arc<Mutex<HashMap<u64, u64>>>,
    resent: Arc<AtomicU64>,
}

/// Copies chunk `index` from the sender's folder to the receiver's over a
/// data channel of each side, from the offset the receiver's `.part` has;
/// the receiver's server renames it into place and writes the `.md5` last.
fn copy_chunk(job: &Job) -> Result<()> {
    let mut d = job.dst.take()?;
    let mut s = job.src.take()?;
    copy_with(job, &mut s, &mut d)?;
    job.src.give(s);
    job.dst.give(d);
    Ok(())
}

fn copy_with(job: &Job, s: &mut Client, d: &mut Client) -> Result<()> {
    let (index, size) = (job.index, job.size);
    let offset = d
        .begin_write(index, size, &job.md5)
        .with_context(|| format!("writing chunk {index} on {}", job.dst.label))?;
    {
        let sent = job.sent.locked();
        let before = sent.get(&index).copied().unwrap_or(0);
        job.resent
            .fetch_add(before.saturating_sub(offset), Ordering::Relaxed);
    }
    let mut pos = offset;
    let mut unsynced = 0u64;
    if offset < size {
        s.begin_read(index, offset)
            .with_context(|| format!("reading chunk {index} on {}", job.src.label))?;
        loop {
            let piece = s
                .next_data()
                .with_context(|| format!("reading chunk {index} on {}", job.src.label))?;
            let piece = match piece {
                Ok(p) => p,
                Err(n) if n == pos - offset => break,
                Err(n) => bail!(
                    "the chunk server on {} says it sent {n} bytes of chunk {index}; {} arrived",
                    job.src.label,
                    pos - offset
                ),
            };
            let n = piece.len() as u64;
            if pos + n > size {
                bail!(
                    "chunk {index} on {} is larger than its {size} bytes",
                    job.src.label
                );
            }
            d.send_data(piece)
                .with_context(|| format!("writing chunk {index} on {}", job.dst.label))?;
            pos += n;
            unsynced += n;
            if unsynced >= SYNC_EVERY {
                unsynced = 0;
                d.sync(SYNCS_IN_FLIGHT)
                    .with_context(|| format!("writing chunk {index} on {}", job.dst.label))?;
            }
            job.counter.fetch_add(n, Ordering::Relaxed);
            {
                let mut sent = job.sent.locked();
                let e = sent.entry(index).or_insert(0);
                *e = (*e).max(pos);
            }
            if let Some(l) = &job.limit {
                l.locked().wait_for(n as usize);
            }
        }
        if pos != size {
            bail!(
                "chunk {index} on {} has {pos} of its {size} bytes",
                job.src.label
            );
        }
    }
    d.end_write()
        .with_context(|| format!("writing chunk {index} on {}", job.dst.label))
}

#[cfg(test)]
/// Moves the stream of `send` (argv on the source) into `recv` (argv on the
/// target) as chunks; Ok once the receiver reports that zfs receive exited 0.
pub fn transfer(
    src: Side,
    dst: Side,
    send: &[String],
    recv: &[String],
    opts: &Options,
    bar: &dyn Transfer,
    debug: &dyn Fn(&str),
) -> Result<Stats> {
    run_session(src, dst, Start::New { send, recv }, None, opts, bar, debug)
}

/// How a chunked transfer gets its helpers.
pub enum Start<'a> {
    /// Start new helpers for this stream.
    New {
        send: &'a [String],
        recv: &'a [String],
    },
    /// Re-attach to the live helpers of a session an earlier orchestrator
    /// left (see `session.rs`).
    Attach {
        sender_dir: String,
        receiver_dir: String,
        /// The session's [`argv_md5`], as its manifest records it.
        argv_md5: String,
    },
}

/// What a run tells the orchestrator to make its session findable and
/// owned (see `session.rs`): the stream's identity, written into both
/// folders' manifests, and a callback that learns the manifest once the
/// session exists.
pub struct Session<'a> {
    pub identity: Identity,
    /// Where the session replicates into, for messages (`host:dataset`).
    pub target_label: String,
    pub announce: &'a dyn Fn(&Manifest),
}

/// [`transfer`], with helpers started anew or re-attached to, and with a
/// manifest and an owner lock when `sess` is given.
pub fn run_session(
    src: Side,
    dst: Side,
    start: Start,
    sess: Option<Session>,
    opts: &Options,
    bar: &dyn Transfer,
    debug: &dyn Fn(&str),
) -> Result<Stats> {
    let tmp = opts.tmpdir.trim_end_matches('/');
    let (sdir, rdir) = match &start {
        Start::New { .. } => (
            format!("{tmp}/{}{}", SESSION_PREFIX, new_session_id()?),
            format!("{tmp}/{}{}", SESSION_PREFIX, new_session_id()?),
        ),
        Start::Attach {
            sender_dir,
            receiver_dir,
            ..
        } => (sender_dir.clone(), receiver_dir.clone()),
    };
    // What the helpers run, fingerprinted into the manifest (a rerun with
    // other options must not re-attach to them).
    let argv = match &start {
        Start::New { send, recv } => argv_md5(send, recv),
        Start::Attach { argv_md5, .. } => argv_md5.clone(),
    };
    let s = Conn {
        label: read(src.host).label().to_string(),
        host: src.host,
        reconnect: src.reconnect,
        exe: src.exe,
        dir: sdir,
        timeout: opts.timeout,
        pool: Arc::default(),
    };
    let r = Conn {
        label: read(dst.host).label().to_string(),
        host: dst.host,
        reconnect: dst.reconnect,
        exe: dst.exe,
        dir: rdir,
        timeout: opts.timeout,
        pool: Arc::default(),
    };
    // Every line of ours names both folders' session ids, as every line of
    // each helper's log names its own: one grep finds a session's story.
    let tag = format!("[{} -> {}]", folder_id(&s.dir), folder_id(&r.dir));
    let tagged = |line: &str| debug(&format!("{tag} {line}"));
    let debug: &dyn Fn(&str) = &tagged;
    // The manifest, and the owner lock (taken before anything else exists,
    // so that a folder nobody owns and no helper locks is known dead).
    let manifest = sess.as_ref().map(|ss| {
        Manifest::ours(
            ss.identity.clone(),
            argv.clone(),
            (&s.label, &s.dir),
            (&r.label, &r.dir),
        )
    });
    let owner = match (&sess, &manifest) {
        (Some(ss), Some(m)) => {
            let me = Owner::ours(&m.session_id(), &new_session_id()?);
            let new = matches!(start, Start::New { .. });
            let own = Ownership::take(
                &*r.get(),
                &r.exe,
                &r.dir,
                &ss.target_label,
                me,
                new.then_some(m),
            )?;
            debug(&format!(
                "[{}] owner of session {}",
                r.label,
                m.session_id()
            ));
            Some(own)
        }
        _ => None,
    };
    if let Start::New { send, recv } = start {
        let started = start_helpers(&s, &r, send, recv, manifest.as_ref(), opts, debug);
        if let Err(e) = started {
            cancel(&r);
            return Err(e);
        }
    }
    if let (Some(ss), Some(m)) = (&sess, &manifest) {
        (ss.announce)(m);
    }
    let mut o = Orchestrator {
        s: &s,
        r: &r,
        opts,
        bar,
        debug,
        stats: Stats::default(),
        counter: Arc::new(AtomicU64::new(0)),
        shown: 0,
        decoded: 0,
        on_bar: 0,
        limit: opts.bwlimit.map(|r| Arc::new(Mutex::new(Limiter::new(r)))),
        sent: Arc::default(),
        resent: Arc::new(AtomicU64::new(0)),
        owner: owner.as_ref(),
        checked: Instant::now(),
    };
    match o.run() {
        Ok(()) => Ok(o.stats),
        // Another orchestrator drives these helpers now: leave them be.
        Err(e) if is_held(&e) => Err(e),
        Err(e) => {
            cancel(&s);
            cancel(&r);
            // A sender helper that died does not read `cancel`: remove its
            // folder now if nothing holds it (the receiver's is owned by us
            // until we return; the next run's discovery removes it).
            if let Ok(l) = sessions::probe(&*s.get(), &s.exe, &s.dir, Probe::RemoveIfDead) {
                for d in l.removed {
                    debug(&format!("[{}] removed {d} (its helper is gone)", s.label));
                }
            }
            Err(e)
        }
    }
}

/// Starts the receiver helper, then the sender helper (after writing the
/// sender's manifest, when there is one).
fn start_helpers(
    s: &Conn,
    r: &Conn,
    send: &[String],
    recv: &[String],
    manifest: Option<&Manifest>,
    opts: &Options,
    debug: &dyn Fn(&str),
) -> Result<()> {
    let recv_start = HelperCommand::Start {
        dir: r.dir.clone(),
        helper: Box::new(HelperCommand::Recv {
            dir: r.dir.clone(),
            timeout: opts.timeout,
            framed: opts.compress.is_on(),
            argv: recv.to_vec(),
        }),
    }
    .to_argv(&r.exe);
    let send_start = HelperCommand::Start {
        dir: s.dir.clone(),
        helper: Box::new(HelperCommand::Send {
            dir: s.dir.clone(),
            chunk_size: opts.chunk_size,
            window: opts.window,
            timeout: opts.timeout,
            compress: opts.compress,
            argv: send.to_vec(),
        }),
    }
    .to_argv(&s.exe);
    debug(&format!("[{}] chunk receiver in {}", r.label, r.dir));
    let pid = r
        .get()
        .run(&recv_start)?
        .check("starting the chunk receiver", &r.label)?;
    debug(&format!("[{}] receiver helper pid {}", r.label, pid.trim()));
    debug(&format!("[{}] chunk sender in {}", s.label, s.dir));
    if let Some(m) = manifest {
        let m = Manifest {
            role: Role::Sender,
            ..m.clone()
        };
        sessions::write_manifest(&*s.get(), &s.exe, &s.dir, &m)?;
    }
    let pid = s
        .get()
        .run(&send_start)
        .and_then(|o| o.check("starting the chunk sender", &s.label))?;
    debug(&format!("[{}] sender helper pid {}", s.label, pid.trim()));
    Ok(())
}

/// The session id part of a folder path (`.../resync-<id>`).
fn folder_id(dir: &str) -> &str {
    let name = dir.rsplit('/').next().unwrap_or(dir);
    name.strip_prefix(SESSION_PREFIX).unwrap_or(name)
}

/// Lines of a helper's log kept for an error message.
const LOG_TAIL_LINES: usize = 5;

/// Best effort: the last lines of a helper's log (`helper.log` in its
/// folder), as text to append to an error ("; its log ends: ..."), or
/// nothing when it cannot be read.
fn log_tail(c: &Conn) -> String {
    let argv = [
        "tail".to_string(),
        "-n".to_string(),
        LOG_TAIL_LINES.to_string(),
        "--".to_string(),
        format!("{}/{}", c.dir, LOG),
    ];
    match c.get().run(&argv) {
        Ok(out) if out.success() && !out.stdout.trim().is_empty() => {
            let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
            format!("; its log ends: {}", lines.join(" | "))
        }
        _ => String::new(),
    }
}

/// Best effort: asks a helper to stop (it kills zfs and removes its folder).
/// Partial chunks go first, so that a full disk has room for the marker.
fn cancel(c: &Conn) {
    let mut ops: Vec<Op> = match poll(c, &[]) {
        Ok(f) => f
            .parts
            .keys()
            .map(|i| Op::Rm(format!("{}{PART}", chunk_name(*i))))
            .collect(),
        Err(_) => Vec::new(),
    };
    ops.push(Op::Put(CANCEL.into(), "cancel\n".into()));
    let _ = poll(c, &ops);
}

struct Orchestrator<'a> {
    s: &'a Conn<'a>,
    r: &'a Conn<'a>,
    opts: &'a Options,
    bar: &'a dyn Transfer,
    debug: &'a dyn Fn(&str),
    stats: Stats,
    counter: Arc<AtomicU64>,
    shown: u64,
    /// With compression, the bar shows stream bytes (the receiver's
    /// `progress`), not chunk-file bytes.
    decoded: u64,
    on_bar: u64,
    limit: Option<Arc<Mutex<Limiter>>>,
    sent: Arc<Mutex<HashMap<u64, u64>>>,
    resent: Arc<AtomicU64>,
    /// Our hold on the session's owner lock, renewed after a reconnect.
    owner: Option<&'a Ownership>,
    /// When [`Orchestrator::check_helpers`] last looked.
    checked: Instant,
}

/// What a copy thread reports.
struct Copied {
    index: u64,
    result: Result<()>,
}

impl Orchestrator<'_> {
    /// Shows the bytes moved since the last call; true if there were any.
    fn show_bytes(&mut self) -> bool {
        let now = self.counter.load(Ordering::Relaxed);
        self.stats.copied = now;
        self.stats.resent = self.resent.load(Ordering::Relaxed);
        let bar = match self.opts.compress.is_on() {
            true => self.decoded,
            false => now,
        };
        if bar > self.on_bar {
            self.bar.add(bar - self.on_bar);
            self.on_bar = bar;
        }
        if now > self.shown {
            self.shown = now;
            return true;
        }
        false
    }

    /// Replaces a broken connection, retrying with backoff until `deadline`;
    /// the bar says for how long it has been trying.
    fn reconnect(&mut self, c: &Conn, deadline: Instant) -> Result<()> {
        let since = Instant::now();
        let mut backoff = Backoff::default();
        c.reset_channels();
        loop {
            let note = |bar: &dyn Transfer| {
                bar.status(&format!(
                    "reconnecting to {} ({}s)",
                    c.label,
                    since.elapsed().as_secs()
                ))
            };
            note(self.bar);
            (self.debug)(&format!("reconnecting to {}", c.label));
            // A connection attempt may take a while: keep the count moving.
            let attempt = thread::scope(|sc| {
                let h = sc.spawn(|| (c.reconnect)());
                while !h.is_finished() {
                    thread::sleep(Duration::from_millis(250));
                    note(self.bar);
                }
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("the reconnecting thread panicked")))
            });
            match attempt {
                Ok(h) => {
                    *c.host.write_now() = h;
                    c.reset_channels();
                    match self.after_reconnect(c) {
                        Ok(()) => {
                            self.stats.reconnects += 1;
                            self.bar.status("");
                            (self.debug)(&format!(
                                "reconnected to {} after {}s",
                                c.label,
                                since.elapsed().as_secs()
                            ));
                            return Ok(());
                        }
                        Err(e) if is_connection_lost(&e) && Instant::now() < deadline => {
                            (self.debug)(&format!("{}: {e:#}", c.label));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    if Instant::now() >= deadline {
                        self.bar.status("");
                        return Err(e.context(format!(
                            "giving up after {} without progress: cannot reconnect to {}",
                            humantime::format_duration(self.opts.timeout),
                            c.label
                        )));
                    }
                    (self.debug)(&format!("reconnecting to {} failed: {e:#}", c.label));
                }
            }
            // Sleep in steps of a second so the bar's count moves.
            let wake = Instant::now() + backoff.next_pause();
            while Instant::now() < wake {
                thread::sleep((wake - Instant::now()).min(Duration::from_secs(1)));
                note(self.bar);
            }
        }
    }

    /// After `HELPER_CHECK` without progress (and then every so often),
    /// makes sure both helpers live: a folder whose lock is free belongs to
    /// a helper that died (killed, its machine rebooted), and waiting for
    /// `--timeout` would only delay the next run, which starts the step
    /// over. A lost connection is no verdict here; the poll handles it.
    fn check_helpers(&mut self, last_progress: Instant) -> Result<()> {
        if last_progress.elapsed() < HELPER_CHECK || self.checked.elapsed() < HELPER_CHECK {
            return Ok(());
        }
        self.checked = Instant::now();
        let dead = |c: &Conn| {
            sessions::probe(&*c.get(), &c.exe, &c.dir, Probe::Look)
                .is_ok_and(|l| l.found.iter().any(|f| !f.helper_alive))
        };
        for (c, who) in [(self.s, "sender"), (self.r, "receiver")] {
            if !dead(c) {
                continue;
            }
            // Again a moment later: a helper that is removing its folder
            // has already deleted its lock file.
            thread::sleep(Duration::from_secs(1));
            if dead(c) {
                bail!(
                    "the chunk {who} on {} died (its folder {} is not locked by a live helper); the next run starts this step over{}",
                    c.label,
                    c.dir,
                    log_tail(c)
                );
            }
        }
        Ok(())
    }

    /// A new connection to the target: take the session's owner lock again
    /// (an error if another orchestrator took the session over meanwhile).
    fn after_reconnect(&self, c: &Conn) -> Result<()> {
        match self.owner {
            Some(own) if std::ptr::eq(c, self.r) => own.renew(&*c.get()),
            _ => Ok(()),
        }
    }

    fn run(&mut self) -> Result<()> {
        let (s, r) = (self.s, self.r);
        // Each parallel copy holds a data channel per side, beside one
        // control channel: stay within sshd's MaxSessions (10 by default per
        // connection), also when both sides share one connection.
        let shared = Arc::ptr_eq(&s.get(), &r.get());
        let window = (self.opts.window as usize).min(if shared {
            DATA_CHANNELS_MAX / 2 - 1
        } else {
            DATA_CHANNELS_MAX
        });
        let (tx, rx) = mpsc::channel::<Copied>();
        let mut s_ops: Vec<Op> = Vec::new();
        let mut r_ops: Vec<Op> = Vec::new();
        // Chunks copied and when; in flight; failures per chunk.
        let mut copied: HashMap<u64, Instant> = HashMap::new();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut failures: HashMap<u64, u32> = HashMap::new();
        let mut last_progress = Instant::now();
        let mut pause = POLL_BUSY;
        let mut progress = Progress { next: 0, bytes: 0 };
        let mut sender_failure: Option<String> = None;
        let mut end_acked = false;
        let mut newest_staged: Option<u64> = None;
        loop {
            let deadline = last_progress + self.opts.timeout;
            if Instant::now() >= deadline {
                bail!(
                    "no progress for {}: giving up (receiver at chunk {}, {} bytes)",
                    humantime::format_duration(self.opts.timeout),
                    progress.next,
                    progress.bytes
                );
            }
            self.check_helpers(last_progress)?;
            let started = Instant::now();
            let (sp, rp) = thread::scope(|sc| {
                let a = sc.spawn(|| poll(s, &s_ops));
                let b = poll(r, &r_ops);
                (
                    a.join()
                        .unwrap_or_else(|_| Err(anyhow!("poll thread panicked"))),
                    b,
                )
            });
            let mut lost = false;
            for (res, c) in [(&sp, s), (&rp, r)] {
                if let Err(e) = res {
                    if is_connection_lost(e) {
                        (self.debug)(&format!("{}: {e:#}", c.label));
                        self.reconnect(c, deadline)?;
                        lost = true;
                    }
                }
            }
            if lost {
                continue;
            }
            let (sf, rf) = (sp?, rp?);
            s_ops.clear();
            r_ops.clear();

            // The receiver's side: progress, resend, result.
            if rf.gone {
                bail!(
                    "the chunk receiver on {} stopped without a result (its folder {} is gone: timed out or cancelled)",
                    r.label,
                    r.dir
                );
            }
            if let Some(text) = rf.markers.get(PROGRESS) {
                let p = Progress::parse(text)
                    .with_context(|| format!("on {} in {}", r.label, r.dir))?;
                if p != progress {
                    last_progress = Instant::now();
                    progress = p;
                    self.decoded = progress.bytes;
                    self.sent.locked().retain(|i, _| *i >= progress.next);
                }
            }
            if let Some(text) = rf.markers.get(RESULT) {
                let res = RecvResult::parse(text)
                    .with_context(|| format!("on {} in {}", r.label, r.dir))?;
                return self.finish(res, &sf, sender_failure, end_acked);
            }
            if let Some(text) = rf.markers.get(RESEND) {
                (self.debug)(&format!(
                    "receiver asks for a chunk again: {}",
                    text.replace('\n', " ")
                ));
                r_ops.push(Op::Rm(RESEND.into()));
            }
            // Copies that finished before this poll started and whose chunk
            // is absent and not consumed were rejected: copy them again.
            copied.retain(|i, done| *i >= progress.next && (*done >= started || rf.has_md5(*i)));

            // The sender's side.
            if sf.gone {
                if !end_acked {
                    bail!(
                        "the chunk sender on {} stopped before its stream was complete (its folder {} is gone: timed out or cancelled)",
                        s.label,
                        s.dir
                    );
                }
            } else {
                for (i, (size, md5)) in &sf.chunks {
                    if *i < progress.next {
                        if size.is_some() {
                            s_ops.push(Op::Rm(chunk_name(*i)));
                        }
                        if md5.is_some() {
                            s_ops.push(Op::Rm(md5_name(*i)));
                        }
                    }
                }
                if let Some(text) = sf.markers.get(END) {
                    let end =
                        End::parse(text).with_context(|| format!("on {} in {}", s.label, s.dir))?;
                    if rf.markers.get(END) != Some(text) {
                        r_ops.push(Op::Put(END.into(), text.clone()));
                    }
                    if progress.next >= end.chunks {
                        s_ops.push(Op::Rm(END.into()));
                        end_acked = true;
                    }
                }
                if let Some(text) = sf.markers.get(ERROR) {
                    let f = Failure::parse(text)
                        .with_context(|| format!("on {} in {}", s.label, s.dir))?;
                    sender_failure = Some(format!(
                        "zfs send failed on {} ({}): {}",
                        s.label,
                        f.status.render(),
                        stderr_tail(&f.stderr)
                    ));
                    if rf.markers.get(ABORT) == Some(text) {
                        s_ops.push(Op::Rm(ERROR.into()));
                        end_acked = true;
                    } else {
                        r_ops.push(Op::Put(ABORT.into(), text.clone()));
                    }
                }
                let newest = sf.chunks.keys().max().copied();
                if newest > newest_staged {
                    newest_staged = newest;
                    last_progress = Instant::now();
                }
                // Start copies of complete chunks the receiver still needs.
                // (zfs receive may exit 0 on the last chunk before `end` is
                // relayed; the receiver then waits for `end` to confirm.)
                let mut todo: Vec<(u64, u64, String)> = sf
                    .complete()
                    .filter(|(i, _, _)| {
                        *i >= progress.next
                            && !in_flight.contains(i)
                            && !copied.contains_key(i)
                            && !rf.has_md5(*i)
                    })
                    .map(|(i, size, md5)| (i, size, md5.to_string()))
                    .collect();
                todo.sort();
                for (index, size, md5) in todo {
                    if in_flight.len() >= window {
                        break;
                    }
                    in_flight.insert(index);
                    let job = Job {
                        src: s.endpoint(),
                        dst: r.endpoint(),
                        index,
                        size,
                        md5,
                        limit: self.limit.clone(),
                        counter: self.counter.clone(),
                        sent: self.sent.clone(),
                        resent: self.resent.clone(),
                    };
                    let tx = tx.clone();
                    thread::spawn(move || {
                        let result = copy_chunk(&job);
                        let _ = tx.send(Copied { index, result });
                    });
                }
            }

            // Wait for a copy to finish (or a little while), then collect.
            // Poll again soon while things move, less often while idle.
            // Deletions and markers decided this round go out at once.
            pause = if !s_ops.is_empty() || !r_ops.is_empty() {
                POLL_NOW
            } else if last_progress.elapsed() < pause {
                POLL_BUSY
            } else {
                (pause * 2).min(POLL_IDLE)
            };
            let mut first = rx.recv_timeout(pause).ok();
            while let Some(c) = first.take().or_else(|| rx.try_recv().ok()) {
                in_flight.remove(&c.index);
                match c.result {
                    Ok(_) => {
                        copied.insert(c.index, Instant::now());
                        last_progress = Instant::now();
                    }
                    Err(e) if is_connection_lost(&e) => {
                        (self.debug)(&format!("copy of chunk {} cut: {e:#}", c.index));
                    }
                    Err(e) if is_no_space_error(&e) => {
                        let size = sf.chunks.get(&c.index).and_then(|(n, _)| *n).unwrap_or(0);
                        bail!(
                            "no space left on {} in {} for chunk {} ({}): free space there, or use a smaller --chunk-size or another --tmpdir ({})",
                            r.label,
                            r.dir,
                            c.index,
                            human_bytes(size),
                            e.root_cause()
                        );
                    }
                    Err(e) => {
                        let n = failures.entry(c.index).or_insert(0);
                        *n += 1;
                        if *n >= COPY_FAILURES_MAX {
                            return Err(
                                e.context(format!("copying chunk {} failed {n} times", c.index))
                            );
                        }
                        (self.debug)(&format!("copy of chunk {} failed: {e:#}", c.index));
                    }
                }
            }
            if self.show_bytes() {
                // Bytes flowing into a big chunk are progress too.
                last_progress = Instant::now();
            }
        }
    }

    /// The receiver wrote `result`: acknowledge it (and the sender's `end`),
    /// then report it.
    fn finish(
        &mut self,
        res: RecvResult,
        sf: &Folder,
        sender_failure: Option<String>,
        end_acked: bool,
    ) -> Result<()> {
        let (s, r) = (self.s, self.r);
        self.decoded = res.bytes;
        self.show_bytes();
        self.stats.bytes = res.bytes;
        self.stats.chunks = res.chunks;
        let mut s_ops: Vec<Op> = Vec::new();
        if !sf.gone {
            for name in [END, ERROR] {
                if sf.markers.contains_key(name) {
                    s_ops.push(Op::Rm(name.into()));
                }
            }
            for (i, (size, md5)) in &sf.chunks {
                if size.is_some() {
                    s_ops.push(Op::Rm(chunk_name(*i)));
                }
                if md5.is_some() {
                    s_ops.push(Op::Rm(md5_name(*i)));
                }
            }
            let ended = sf.markers.contains_key(END) || sf.markers.contains_key(ERROR);
            if res.outcome != Outcome::Ok && !ended && !end_acked {
                // Still sending into a receiver that is gone: stop it.
                s_ops.push(Op::Put(CANCEL.into(), "cancel\n".into()));
            }
        }
        let deadline = Instant::now() + self.opts.timeout;
        for (c, ops) in [(r, vec![Op::Rm(RESULT.into())]), (s, s_ops)] {
            if ops.is_empty() {
                continue;
            }
            loop {
                match poll(c, &ops) {
                    Ok(_) => break,
                    Err(e) if is_connection_lost(&e) => self.reconnect(c, deadline)?,
                    // The sender may be removing its folder as we write.
                    Err(e) if std::ptr::eq(c, s) => {
                        (self.debug)(&format!("cleaning up after the sender: {e:#}"));
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        match res.outcome {
            Outcome::Ok => Ok(()),
            Outcome::Aborted => Err(anyhow!(
                "{}",
                sender_failure.unwrap_or_else(|| format!(
                    "zfs send failed on {}: {}",
                    s.label,
                    stderr_tail(&res.stderr)
                ))
            )),
            // Typed, so the caller can tell a partial-state refusal.
            Outcome::Failed => {
                Err(ZfsError::new("zfs receive", &r.label, res.status.render(), &res.stderr).into())
            }
            Outcome::Corrupt => bail!(
                "the chunked stream to {} was corrupt; zfs receive was stopped: {}",
                r.label,
                stderr_tail(&res.stderr)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_ids_are_the_session_part_of_the_path() {
        assert_eq!(
            folder_id("/tmp/resync-0123abcd0123abcd"),
            "0123abcd0123abcd"
        );
        assert_eq!(folder_id("resync-ff00ff00ff00ff00"), "ff00ff00ff00ff00");
        assert_eq!(folder_id("/tmp/other"), "other");
    }

    #[test]
    fn session_ids_are_valid() {
        let a = new_session_id().unwrap();
        crate::chunk::protocol::folder::validate_session_id(&a).unwrap();
        assert_ne!(a, new_session_id().unwrap());
    }

    struct Silent;
    impl Transfer for Silent {
        fn add(&self, _bytes: u64) {}
        fn finish(&self) {}
    }

    fn helper_exe() -> String {
        let exe = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("resync");
        assert!(exe.exists(), "build the binary first: {}", exe.display());
        exe.to_str().unwrap().to_string()
    }

    /// Runs `send` into `recv` between two local "hosts" in a fresh tmpdir
    /// (as `$D` in both commands); returns the result, the tmpdir, and
    /// whether every session folder was removed.
    fn local(send: &str, recv: &str, chunk_size: u64) -> (Result<Stats>, tempfile::TempDir, bool) {
        local_with(send, recv, chunk_size, Compress::None)
    }

    fn local_with(
        send: &str,
        recv: &str,
        chunk_size: u64,
        compress: Compress,
    ) -> (Result<Stats>, tempfile::TempDir, bool) {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_str().unwrap().to_string();
        let host: Arc<dyn Host> = Arc::new(crate::host::LocalHost::new());
        let (hs, hr) = (RwLock::new(host.clone()), RwLock::new(host));
        let reconnect = || -> Result<Arc<dyn Host>> { Ok(Arc::new(crate::host::LocalHost::new())) };
        let exe = helper_exe();
        let sh = |c: &str| vec!["sh".to_string(), "-c".into(), c.replace("$D", &d)];
        let opts = Options {
            chunk_size,
            window: 3,
            timeout: Duration::from_secs(20),
            tmpdir: d.clone(),
            bwlimit: None,
            compress,
        };
        let res = transfer(
            Side {
                host: &hs,
                reconnect: &reconnect,
                exe: exe.clone(),
            },
            Side {
                host: &hr,
                reconnect: &reconnect,
                exe,
            },
            &sh(send),
            &sh(recv),
            &opts,
            &Silent,
            &|l| eprintln!("{l}"),
        );
        let left = || {
            std::fs::read_dir(&d)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("resync-"))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while left() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        (res, tmp, left() == 0)
    }

    /// The whole protocol with `head` standing in for zfs send and `cat` for
    /// zfs receive. Needs the resync binary next to the test binary's folder
    /// (`cargo build` first), hence ignored.
    #[test]
    #[ignore]
    fn local_transfer_moves_a_stream_through_chunks() {
        let (res, tmp, clean) = local(
            "head -c 5000000 /dev/urandom | tee $D/src",
            "cat > $D/dst",
            300_000,
        );
        let stats = res.unwrap();
        assert_eq!(stats.bytes, 5_000_000);
        assert_eq!(stats.chunks, 17);
        let p = |n: &str| tmp.path().join(n);
        assert_eq!(
            std::fs::read(p("src")).unwrap(),
            std::fs::read(p("dst")).unwrap()
        );
        assert!(clean, "session folders removed");
    }

    /// The same with compressed chunks: a compressible stream cut into
    /// chunks of 300000 stream bytes, moved as smaller framed files.
    #[test]
    #[ignore]
    fn local_transfer_moves_a_compressed_stream_through_smaller_chunks() {
        let (res, tmp, clean) = local_with(
            "seq 1 1000000 | tee $D/src",
            "cat > $D/dst",
            300_000,
            Compress::Adaptive,
        );
        let stats = res.unwrap();
        let p = |n: &str| tmp.path().join(n);
        let src = std::fs::read(p("src")).unwrap();
        assert_eq!(stats.bytes, src.len() as u64);
        assert_eq!(stats.chunks, (src.len() as u64).div_ceil(300_000));
        assert!(stats.copied < stats.bytes / 2, "{stats:?}");
        assert!(src == std::fs::read(p("dst")).unwrap());
        assert!(clean, "session folders removed");
    }

    /// A chunk server that cannot start says why (its exit and stderr).
    #[test]
    #[ignore]
    fn a_failing_chunk_server_reports_its_error() {
        let host = crate::host::LocalHost::new();
        let err = Client::start(
            &host,
            &helper_exe(),
            "/tmp/not-a-session",
            Duration::from_secs(5),
        )
        .err()
        .expect("a bad folder name is refused");
        let e = format!("{err:#}");
        assert!(
            e.contains("(exit 2)") && e.contains("not named resync-"),
            "{e}"
        );
    }

    #[test]
    #[ignore]
    fn local_sender_failure_is_reported() {
        let (res, _tmp, clean) = local(
            "head -c 1000000 /dev/urandom; echo boom >&2; exit 3",
            "cat > /dev/null",
            300_000,
        );
        let e = format!("{:#}", res.unwrap_err());
        assert!(e.contains("zfs send failed on local (exit 3): boom"), "{e}");
        assert!(clean, "session folders removed");
    }

    #[test]
    #[ignore]
    fn local_receiver_failure_is_reported() {
        let (res, _tmp, clean) = local(
            "head -c 3000000 /dev/urandom",
            "head -c 10 > /dev/null; echo nope >&2; exit 1",
            300_000,
        );
        let e = format!("{:#}", res.unwrap_err());
        assert!(
            e.contains("zfs receive failed on local") && e.contains("nope"),
            "{e}"
        );
        assert!(clean, "session folders removed");
    }

    /// Prints the local throughput of 200 MiB in 64 MiB chunks and of
    /// 32 MiB in 1 MiB chunks (no zfs).
    #[test]
    #[ignore]
    fn local_throughput() {
        for (total, chunk) in [(200u64 << 20, 64u64 << 20), (32 << 20, 1 << 20)] {
            let t = Instant::now();
            let (res, _tmp, clean) = local(
                &format!("head -c {total} /dev/zero"),
                "cat > /dev/null",
                chunk,
            );
            let stats = res.unwrap();
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "{} MiB in {} MiB chunks: {secs:.2}s, {:.0} MiB/s",
                total >> 20,
                chunk >> 20,
                stats.bytes as f64 / secs / (1 << 20) as f64
            );
            assert!(clean);
        }
    }
}
