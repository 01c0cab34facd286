//! The orchestrator of `--chunked` mode: moves one `zfs send` stream from the
//! source host to the target host as chunk files, following the protocol in
//! `mod.rs`. It starts the sender helper beside `zfs send` and the receiver
//! helper beside `zfs receive` (detached, through `__chunk-start`), then polls
//! both session folders with one shell command per side per round (which
//! also applies the deletions and marker writes decided in the last round),
//! copies complete chunks over parallel exec channels (`cat` on the source
//! piped into a size-checking writer on the target, never a whole chunk in
//! memory), relays `end`/`error`, and acknowledges `result`. A lost SSH
//! connection is reconnected with backoff and the folders are simply read
//! again: a chunk cut mid-copy is copied again from its start.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::session;
use super::{
    chunk_name, md5_name, parse_chunk_file_name, parse_md5, render_md5, ChunkFile, End, Failure,
    Outcome, Progress, RecvResult, ABORT, CANCEL, END, ERROR, PROGRESS, RESEND, RESULT,
};
use crate::bwlimit::Limiter;
use crate::host::{is_connection_lost, stderr_tail, Host};
use crate::progress::Transfer;

/// Pause between polls right after something happened; it doubles while
/// nothing does, up to POLL_IDLE.
const POLL_BUSY: Duration = Duration::from_millis(20);
/// Pause before a poll that carries operations (deletions, markers).
const POLL_NOW: Duration = Duration::from_millis(2);
const POLL_IDLE: Duration = Duration::from_millis(200);
/// Longest pause between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Copies of one chunk that may fail (other than by a lost connection)
/// before the run gives up.
const COPY_FAILURES_MAX: u32 = 5;
/// Time without progress after which the helpers' locks are checked.
const HELPER_CHECK: Duration = Duration::from_secs(5);

/// Reads a session folder, after applying `rm NAME` / `put NAME CONTENT`
/// operations. Prints `gone` when the folder does not exist, else `ok`,
/// then `D name size` per complete data file, `S name md5-line` per `.md5`,
/// and `M name length` followed by that many bytes and a newline per marker.
const POLL_SCRIPT: &str = r#"export LC_ALL=C
d=$1; shift
cd "$d" 2>/dev/null || { echo gone; exit 0; }
while [ $# -ge 2 ]; do
  case $1 in
    rm) rm -f -- "$2"; shift 2;;
    put) printf '%s' "$3" > "$2.part" && mv -f -- "$2.part" "$2" || exit 1; shift 3;;
    *) echo "bad op $1" >&2; exit 2;;
  esac
done
echo ok
for f in chunk-*; do
  case $f in
    *.part) ;;
    *.md5) v=$(head -n 1 -- "$f" 2>/dev/null) && printf 'S %s %s\n' "$f" "$v";;
    *) s=$(wc -c < "$f" 2>/dev/null) && printf 'D %s %d\n' "$f" "$((s))";;
  esac
done
for m in end error abort progress resend result; do
  [ -f "$m" ] || continue
  v=$(cat -- "$m" 2>/dev/null && echo x) || continue
  v=${v%x}
  printf 'M %s %d\n' "$m" "${#v}"
  printf '%s\n' "$v"
done
"#;

/// Writes stdin to `$1/$2.part`, checks it has `$3` bytes, renames it to
/// `$2`, then writes `$4` as `$2.md5` the same way: data first, `.md5` last.
const WRITE_SCRIPT: &str = r#"cd "$1" || exit 1
cat > "$2.part" || exit 1
n=$(wc -c < "$2.part") || exit 1
if [ "$((n))" -ne "$3" ]; then rm -f -- "$2.part"; echo "short copy of $2: $((n)) of $3 bytes" >&2; exit 3; fi
mv -f -- "$2.part" "$2" && printf '%s' "$4" > "$2.md5.part" && mv -f -- "$2.md5.part" "$2.md5"
"#;

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
    /// Chunk bytes moved, including chunks copied again and copies cut
    /// short; `copied - bytes` is what outages and rejections cost.
    pub copied: u64,
    pub chunks: u64,
    pub reconnects: u32,
}

/// A side with its current connection and session folder.
struct Conn<'a> {
    host: &'a HostCell,
    reconnect: Reconnect<'a>,
    exe: String,
    dir: String,
    label: String,
}

impl Conn<'_> {
    fn get(&self) -> Arc<dyn Host> {
        self.host.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A session folder as one poll saw it.
#[derive(Debug, Default)]
struct Folder {
    gone: bool,
    /// Complete chunks: index -> (data size, md5 line), when both are there.
    chunks: HashMap<u64, (Option<u64>, Option<String>)>,
    markers: HashMap<String, String>,
}

impl Folder {
    fn complete(&self) -> impl Iterator<Item = (u64, u64, &str)> + '_ {
        self.chunks
            .iter()
            .filter_map(|(i, (size, md5))| match (size, md5) {
                (Some(s), Some(m)) => Some((*i, *s, m.as_str())),
                _ => None,
            })
    }

    fn has_md5(&self, index: u64) -> bool {
        self.chunks.get(&index).is_some_and(|(_, m)| m.is_some())
    }
}

/// Parses the output of [`POLL_SCRIPT`].
fn parse_poll(out: &[u8]) -> Result<Folder> {
    let mut f = Folder::default();
    let mut rest = out;
    let line = |rest: &mut &[u8]| -> Option<String> {
        let end = rest.iter().position(|b| *b == b'\n')?;
        let l = String::from_utf8_lossy(&rest[..end]).into_owned();
        *rest = &rest[end + 1..];
        Some(l)
    };
    match line(&mut rest).as_deref() {
        Some("gone") => {
            f.gone = true;
            return Ok(f);
        }
        Some("ok") => {}
        other => bail!("unexpected session folder listing {other:?}"),
    }
    while let Some(l) = line(&mut rest) {
        let mut it = l.splitn(3, ' ');
        let (kind, name, value) = (it.next(), it.next(), it.next());
        match (kind, name, value) {
            (Some("D"), Some(name), Some(size)) => {
                if let Some(ChunkFile::Data(i)) = parse_chunk_file_name(name) {
                    let size = size.parse().context("chunk size in listing")?;
                    f.chunks.entry(i).or_default().0 = Some(size);
                }
            }
            (Some("S"), Some(name), Some(md5)) => {
                if let Some(ChunkFile::Md5(i)) = parse_chunk_file_name(name) {
                    // A malformed .md5 is still copied verbatim-ish: the
                    // receiver rejects it and asks again.
                    let text = match parse_md5(&format!("{md5}\n"), i) {
                        Ok(d) => render_md5(i, &d),
                        Err(_) => format!("{md5}\n"),
                    };
                    f.chunks.entry(i).or_default().1 = Some(text);
                }
            }
            (Some("M"), Some(name), Some(len)) => {
                let len: usize = len.parse().context("marker length in listing")?;
                if rest.len() < len + 1 {
                    bail!("truncated marker {name} in listing");
                }
                let text = String::from_utf8_lossy(&rest[..len]).into_owned();
                rest = &rest[len + 1..];
                f.markers.insert(name.to_string(), text);
            }
            _ => bail!("unexpected line {l:?} in session folder listing"),
        }
    }
    Ok(f)
}

fn read(cell: &HostCell) -> Arc<dyn Host> {
    cell.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A random session id of 32 lowercase hex digits.
pub fn new_session_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a session id")?;
    Ok(super::hex(&bytes))
}

fn poll_argv(dir: &str, ops: &[String]) -> Vec<String> {
    let mut argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        POLL_SCRIPT.to_string(),
        "sh".to_string(),
        dir.to_string(),
    ];
    argv.extend(ops.iter().cloned());
    argv
}

fn poll(conn: &Conn, ops: &[String]) -> Result<Folder> {
    let host = conn.get();
    let out = host.run(&poll_argv(&conn.dir, ops))?;
    if !out.success() {
        bail!(
            "reading session folder {} on {} failed (exit {}): {}",
            conn.dir,
            conn.label,
            out.status,
            out.stderr.trim()
        );
    }
    parse_poll(out.stdout.as_bytes())
}

/// One chunk to copy.
struct Job {
    src: Arc<dyn Host>,
    dst: Arc<dyn Host>,
    sdir: String,
    rdir: String,
    index: u64,
    size: u64,
    md5: String,
    limit: Option<Arc<Mutex<Limiter>>>,
}

/// Copies chunk `index` (data, then its `.md5`) from the sender's folder to
/// the receiver's; returns the data bytes moved.
fn copy_chunk(job: Job, counter: &AtomicU64) -> Result<u64> {
    let Job {
        src,
        dst,
        sdir,
        rdir,
        index,
        size,
        md5,
        limit,
    } = job;
    let name = chunk_name(index);
    let mut reader = src
        .spawn(&["cat".into(), "--".into(), format!("{sdir}/{name}")])
        .with_context(|| format!("reading {name} on {}", src.label()))?;
    let write = vec![
        "sh".to_string(),
        "-c".to_string(),
        WRITE_SCRIPT.to_string(),
        "sh".to_string(),
        rdir,
        name.clone(),
        size.to_string(),
        md5,
    ];
    let mut writer = match dst.spawn(&write) {
        Ok(w) => w,
        Err(e) => {
            reader.kill();
            return Err(e.context(format!("writing {name} on {}", dst.label())));
        }
    };
    let (Some(out), Some(inp)) = (reader.take_stdout(), writer.take_stdin()) else {
        reader.kill();
        writer.kill();
        bail!("internal error: copy pipes are missing");
    };
    // One limiter for all copies: each waits for its bytes under the lock,
    // so together they average the rate.
    let pumped = crate::stream::pump(out, inp, None, &|n| {
        counter.fetch_add(n, Ordering::Relaxed);
        if let Some(l) = &limit {
            l.lock()
                .unwrap_or_else(|p| p.into_inner())
                .wait_for(n as usize);
        }
    });
    if pumped.is_err() {
        reader.kill();
        writer.kill();
    }
    let w = writer.wait();
    let r = reader.wait();
    let n = match pumped {
        Ok(n) => n,
        Err(crate::stream::PumpError::Read(e)) => {
            return Err(anyhow::Error::new(e).context(format!("reading {name}")))
        }
        Err(crate::stream::PumpError::Write(e)) => {
            return Err(anyhow::Error::new(e).context(format!("writing {name}")))
        }
    };
    r?.check(&format!("reading {name}"), src.label())?;
    w?.check(&format!("writing {name}"), dst.label())?;
    Ok(n)
}

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
    },
}

/// What a run tells the orchestrator to make its session findable and
/// owned (see `session.rs`): the stream's identity, written into both
/// folders' manifests, and a callback that learns the manifest once the
/// session exists.
pub struct Session<'a> {
    pub identity: session::Identity,
    /// Where the session replicates into, for messages (`host:dataset`).
    pub target_label: String,
    pub announce: &'a dyn Fn(&session::Manifest),
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
            format!("{tmp}/{}{}", super::SESSION_PREFIX, new_session_id()?),
            format!("{tmp}/{}{}", super::SESSION_PREFIX, new_session_id()?),
        ),
        Start::Attach {
            sender_dir,
            receiver_dir,
        } => (sender_dir.clone(), receiver_dir.clone()),
    };
    let s = Conn {
        label: read(src.host).label().to_string(),
        host: src.host,
        reconnect: src.reconnect,
        exe: src.exe,
        dir: sdir,
    };
    let r = Conn {
        label: read(dst.host).label().to_string(),
        host: dst.host,
        reconnect: dst.reconnect,
        exe: dst.exe,
        dir: rdir,
    };
    // The manifest, and the owner lock (taken before anything else exists,
    // so that a folder nobody owns and no helper locks is known dead).
    let manifest = sess.as_ref().map(|ss| {
        session::Manifest::ours(ss.identity.clone(), (&s.label, &s.dir), (&r.label, &r.dir))
    });
    let owner = match (&sess, &manifest) {
        (Some(ss), Some(m)) => {
            let me = session::Owner::ours(&m.session_id(), &new_session_id()?);
            let new = matches!(start, Start::New { .. });
            let own = session::Ownership::take(
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
        limit: opts.bwlimit.map(|r| Arc::new(Mutex::new(Limiter::new(r)))),
        owner: owner.as_ref(),
        checked: Instant::now(),
    };
    match o.run() {
        Ok(()) => Ok(o.stats),
        // Another orchestrator drives these helpers now: leave them be.
        Err(e) if session::is_held(&e) => Err(e),
        Err(e) => {
            cancel(&s);
            cancel(&r);
            // A sender helper that died does not read `cancel`: remove its
            // folder now if nothing holds it (the receiver's is owned by us
            // until we return; the next run's discovery removes it).
            if let Ok(l) = session::probe(&*s.get(), &s.exe, &s.dir, true, false) {
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
    manifest: Option<&session::Manifest>,
    opts: &Options,
    debug: &dyn Fn(&str),
) -> Result<()> {
    let secs = opts.timeout.as_secs().max(1).to_string();
    let mut recv_start = vec![
        r.exe.clone(),
        "__chunk-start".into(),
        "--dir".into(),
        r.dir.clone(),
        "--".into(),
        "__chunk-recv".into(),
        "--dir".into(),
        r.dir.clone(),
        "--timeout".into(),
        secs.clone(),
        "--".into(),
    ];
    recv_start.extend(recv.iter().cloned());
    let mut send_start = vec![
        s.exe.clone(),
        "__chunk-start".into(),
        "--dir".into(),
        s.dir.clone(),
        "--".into(),
        "__chunk-send".into(),
        "--dir".into(),
        s.dir.clone(),
        "--chunk-size".into(),
        opts.chunk_size.to_string(),
        "--window".into(),
        opts.window.to_string(),
        "--timeout".into(),
        secs,
        "--".into(),
    ];
    send_start.extend(send.iter().cloned());
    debug(&format!("[{}] chunk receiver in {}", r.label, r.dir));
    let pid = r
        .get()
        .run(&recv_start)?
        .check("starting the chunk receiver", &r.label)?;
    debug(&format!("[{}] receiver helper pid {}", r.label, pid.trim()));
    debug(&format!("[{}] chunk sender in {}", s.label, s.dir));
    if let Some(m) = manifest {
        let m = session::Manifest {
            role: session::Role::Sender,
            ..m.clone()
        };
        session::write_manifest(&*s.get(), &s.exe, &s.dir, &m)?;
    }
    let pid = s
        .get()
        .run(&send_start)
        .and_then(|o| o.check("starting the chunk sender", &s.label))?;
    debug(&format!("[{}] sender helper pid {}", s.label, pid.trim()));
    Ok(())
}

/// Best effort: asks a helper to stop (it kills zfs and removes its folder).
fn cancel(c: &Conn) {
    let _ = poll(c, &["put".into(), CANCEL.into(), "cancel\n".into()]);
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
    limit: Option<Arc<Mutex<Limiter>>>,
    /// Our hold on the session's owner lock, renewed after a reconnect.
    owner: Option<&'a session::Ownership>,
    /// When [`Orchestrator::check_helpers`] last looked.
    checked: Instant,
}

/// What a copy thread reports.
struct Copied {
    index: u64,
    result: Result<u64>,
}

impl Orchestrator<'_> {
    fn show_bytes(&mut self) {
        let now = self.counter.load(Ordering::Relaxed);
        self.stats.copied = now;
        if now > self.shown {
            self.bar.add(now - self.shown);
            self.shown = now;
        }
    }

    /// Replaces a broken connection, retrying with backoff until `deadline`.
    fn reconnect(&mut self, c: &Conn, deadline: Instant) -> Result<()> {
        self.bar.status("reconnecting");
        let mut pause = Duration::from_millis(250);
        loop {
            (self.debug)(&format!("reconnecting to {}", c.label));
            match (c.reconnect)() {
                Ok(h) => {
                    *c.host.write().unwrap_or_else(|p| p.into_inner()) = h;
                    match self.after_reconnect(c) {
                        Ok(()) => {
                            self.stats.reconnects += 1;
                            self.bar.status("");
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
                        return Err(e.context(format!(
                            "giving up after {} without progress: cannot reconnect to {}",
                            humantime::format_duration(self.opts.timeout),
                            c.label
                        )));
                    }
                    (self.debug)(&format!("reconnecting to {} failed: {e:#}", c.label));
                }
            }
            thread::sleep(pause);
            pause = (pause * 2).min(BACKOFF_MAX);
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
            session::probe(&*c.get(), &c.exe, &c.dir, false, false)
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
                    "the chunk {who} on {} died (its folder {} is not locked by a live helper); the next run starts this step over",
                    c.label,
                    c.dir
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
        let window = self.opts.window as usize;
        let (tx, rx) = mpsc::channel::<Copied>();
        let mut s_ops: Vec<String> = Vec::new();
        let mut r_ops: Vec<String> = Vec::new();
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
                r_ops.extend(["rm".into(), RESEND.into()]);
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
                            s_ops.extend(["rm".into(), chunk_name(*i)]);
                        }
                        if md5.is_some() {
                            s_ops.extend(["rm".into(), md5_name(*i)]);
                        }
                    }
                }
                if let Some(text) = sf.markers.get(END) {
                    let end =
                        End::parse(text).with_context(|| format!("on {} in {}", s.label, s.dir))?;
                    if rf.markers.get(END) != Some(text) {
                        r_ops.extend(["put".into(), END.into(), text.clone()]);
                    }
                    if progress.next >= end.chunks {
                        s_ops.extend(["rm".into(), END.into()]);
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
                        s_ops.extend(["rm".into(), ERROR.into()]);
                        end_acked = true;
                    } else {
                        r_ops.extend(["put".into(), ABORT.into(), text.clone()]);
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
                        src: s.get(),
                        dst: r.get(),
                        sdir: s.dir.clone(),
                        rdir: r.dir.clone(),
                        index,
                        size,
                        md5,
                        limit: self.limit.clone(),
                    };
                    let counter = self.counter.clone();
                    let tx = tx.clone();
                    thread::spawn(move || {
                        let result = copy_chunk(job, &counter);
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
            self.show_bytes();
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
        self.show_bytes();
        self.stats.bytes = res.bytes;
        self.stats.chunks = res.chunks;
        let mut s_ops: Vec<String> = Vec::new();
        if !sf.gone {
            for name in [END, ERROR] {
                if sf.markers.contains_key(name) {
                    s_ops.extend(["rm".into(), name.into()]);
                }
            }
            for (i, (size, md5)) in &sf.chunks {
                if size.is_some() {
                    s_ops.extend(["rm".into(), chunk_name(*i)]);
                }
                if md5.is_some() {
                    s_ops.extend(["rm".into(), md5_name(*i)]);
                }
            }
            let ended = sf.markers.contains_key(END) || sf.markers.contains_key(ERROR);
            if res.outcome != Outcome::Ok && !ended && !end_acked {
                // Still sending into a receiver that is gone: stop it.
                s_ops.extend(["put".into(), CANCEL.into(), "cancel\n".into()]);
            }
        }
        let deadline = Instant::now() + self.opts.timeout;
        for (c, ops) in [(r, vec!["rm".to_string(), RESULT.to_string()]), (s, s_ops)] {
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
            Outcome::Failed => bail!(
                "zfs receive failed on {} ({}): {}",
                r.label,
                res.status.render(),
                stderr_tail(&res.stderr)
            ),
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
    fn poll_output_parses_chunks_and_markers() {
        let md5 = format!("{}  chunk-000000000001", "ab".repeat(16));
        let out = format!(
            "ok\nD chunk-000000000001 1048576\nS chunk-000000000001.md5 {md5}\nD chunk-000000000002 5\nM progress 16\nnext 1\nbytes 99\n\nM result 5\na\n\nb\n\n"
        );
        let f = parse_poll(out.as_bytes()).unwrap();
        assert!(!f.gone);
        let complete: Vec<_> = f.complete().collect();
        assert_eq!(complete, vec![(1, 1 << 20, &*format!("{md5}\n"))]);
        assert!(f.has_md5(1) && !f.has_md5(2));
        assert_eq!(f.markers[PROGRESS], "next 1\nbytes 99\n");
        assert_eq!(f.markers[RESULT], "a\n\nb\n");
        assert!(parse_poll(b"gone\n").unwrap().gone);
        assert!(parse_poll(b"").is_err());
        assert!(parse_poll(b"ok\nM end 100\nshort\n").is_err());
        assert!(parse_poll(b"ok\nX y z\n").is_err());
    }

    #[test]
    fn poll_script_runs_ops_and_lists_a_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_str().unwrap();
        std::fs::write(tmp.path().join("chunk-000000000000"), b"hello").unwrap();
        std::fs::write(tmp.path().join("chunk-000000000000.part"), b"x").unwrap();
        std::fs::write(tmp.path().join("resend"), b"index 0\nattempt 1\n").unwrap();
        let ops: Vec<String> = [
            "rm",
            "resend",
            "put",
            "end",
            "chunks 1\nbytes 5\nstatus exit 0\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = std::process::Command::new("sh")
            .args(&poll_argv(d, &ops)[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f = parse_poll(&out.stdout).unwrap();
        assert_eq!(f.chunks.get(&0).unwrap().0, Some(5));
        assert!(!f.has_md5(0));
        assert!(!f.markers.contains_key(RESEND));
        assert_eq!(f.markers[END], "chunks 1\nbytes 5\nstatus exit 0\n");
        let gone = std::process::Command::new("sh")
            .args(&poll_argv(&format!("{d}/nope"), &[])[1..])
            .output()
            .unwrap();
        assert!(parse_poll(&gone.stdout).unwrap().gone);
    }

    #[test]
    fn write_script_refuses_short_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_str().unwrap();
        let run = |data: &[u8], size: &str| {
            use std::io::Write;
            let mut child = std::process::Command::new("sh")
                .args([
                    "-c",
                    WRITE_SCRIPT,
                    "sh",
                    d,
                    "chunk-000000000003",
                    size,
                    "md5 line\n",
                ])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(data).unwrap();
            child.wait().unwrap().success()
        };
        assert!(!run(b"abc", "4"));
        assert!(!tmp.path().join("chunk-000000000003").exists());
        assert!(!tmp.path().join("chunk-000000000003.part").exists());
        assert!(run(b"abcd", "4"));
        assert_eq!(
            std::fs::read(tmp.path().join("chunk-000000000003")).unwrap(),
            b"abcd"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("chunk-000000000003.md5")).unwrap(),
            "md5 line\n"
        );
    }

    #[test]
    fn session_ids_are_valid() {
        let a = new_session_id().unwrap();
        super::super::validate_session_id(&a).unwrap();
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
