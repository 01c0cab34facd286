//! The receiver helper (`resync __chunk-recv`): runs `zfs receive` (any
//! argv, no shell), takes chunks from its session folder in index order,
//! verifies each one's MD5 before a byte of it reaches zfs's stdin, records
//! `progress`, asks for a bad chunk again (`resend`), and ends with a
//! `result` marker (see the protocol in `chunk::protocol`). With `--framed`
//! a verified chunk file is a run of frames (`compress::frame`), decoded
//! into zfs's stdin; `progress` and `end` count the decoded bytes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::files::{
    exists_nofollow, list_chunk_files, open_nofollow, read_marker, remove_if_present, write_atomic,
    CopyActivity,
};
use super::{drain, enter_session, log, Stop};
use crate::chunk::protocol::folder::{chunk_name, md5_name, ChunkFile};
use crate::chunk::protocol::markers::{
    cap_stderr, parse_md5, End, Failure, Outcome, Progress, RecvResult, Resend, Status,
};
use crate::chunk::protocol::{
    ABORT, ABORT_GRACE, CANCEL, END, EXIT_OK, EXIT_ZFS_FAILED, MAX_ATTEMPTS, POLL, PROGRESS,
    RESEND, RESULT,
};
use crate::compress::frame::{FrameReader, Framing};
use crate::sys::{hex, md5_reader};

/// What the helper's command line says.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub timeout: Duration,
    /// `--framed`: chunk files hold frames.
    pub framed: bool,
    pub argv: Vec<OsString>,
}

/// Runs the receiver helper; returns its exit code.
pub fn run(c: Config) -> i32 {
    let dir = c.dir.clone();
    let _lock = match enter_session("receiver", &dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut r = Receiver {
        c,
        last_activity: Instant::now(),
        next: 0,
        bytes: 0,
        attempts: HashMap::new(),
        ahead: None,
        copies: CopyActivity::default(),
    };
    let result = match r.receive() {
        Ok(Ok(result)) => result,
        Ok(Err(stop)) => return r.give_up(stop),
        Err(e) => {
            log("receiver", &dir, &format!("error: {e:#}"));
            RecvResult {
                outcome: Outcome::Failed,
                status: Status::Helper,
                chunks: r.next,
                bytes: r.bytes,
                stderr: format!("resync receiver helper: {e:#}\n"),
            }
        }
    };
    let ok = result.outcome == Outcome::Ok;
    log(
        "receiver",
        &dir,
        &format!(
            "zfs receive ended: {} ({}); {} chunks, {} bytes",
            result.outcome.as_str(),
            result.status,
            result.chunks,
            result.bytes
        ),
    );
    if let Err(e) = write_atomic(&dir, RESULT, result.render().as_bytes()) {
        log(
            "receiver",
            &dir,
            &format!("error: cannot write result: {e:#}"),
        );
        let _ = fs::remove_dir_all(&dir);
        return EXIT_ZFS_FAILED;
    }
    match r.wait_ack() {
        Ok(()) => {
            let _ = fs::remove_dir_all(&dir);
            log("receiver", &dir, "acknowledged; folder removed");
            if ok {
                EXIT_OK
            } else {
                EXIT_ZFS_FAILED
            }
        }
        Err(stop) => r.give_up(stop),
    }
}

struct Zfs {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl Zfs {
    /// Closes stdin and waits (killing it after `grace`, if given); returns
    /// its status and stderr.
    fn finish(mut self, grace: Option<Duration>) -> Result<(Status, String)> {
        drop(self.stdin.take());
        let status = match grace {
            None => self.child.wait().context("waiting for zfs receive")?,
            Some(grace) => {
                let deadline = Instant::now() + grace;
                loop {
                    if let Some(s) = self.child.try_wait().context("waiting for zfs receive")? {
                        break s;
                    }
                    if Instant::now() >= deadline {
                        let _ = self.child.kill();
                        break self.child.wait().context("waiting for zfs receive")?;
                    }
                    thread::sleep(POLL);
                }
            }
        };
        let _ = self.stdout.join();
        let stderr = self.stderr.join().unwrap_or_default();
        Ok((Status::from_exit(status), cap_stderr(&stderr)))
    }

    fn kill(mut self) -> (Status, String) {
        let _ = self.child.kill();
        self.finish(None).unwrap_or((Status::Helper, String::new()))
    }
}

struct Receiver {
    c: Config,
    last_activity: Instant,
    next: u64,
    bytes: u64,
    attempts: HashMap<u64, u32>,
    /// Chunk `next + 1` being hashed while chunk `next` streams.
    ahead: Option<(u64, JoinHandle<Result<Hashed>>)>,
    copies: CopyActivity,
}

/// What the folder holds for the receiver right now.
struct Scan {
    md5: bool,
    data: bool,
}

impl Receiver {
    /// zfs receive exited 0 before the end marker arrived. It is a success
    /// only if `end` then confirms that every chunk was given to it; another
    /// chunk arriving, a mismatching `end` or an abort means it stopped
    /// before the stream did. Cancel and the inactivity timeout still apply.
    fn after_early_exit(
        &mut self,
        status: Status,
        stderr: String,
    ) -> Result<Result<RecvResult, Stop>> {
        let dir = self.c.dir.clone();
        let early =
            |why: &str| format!("zfs receive ended before the stream did ({why})\n{stderr}");
        loop {
            if exists_nofollow(&dir.join(CANCEL)) || !exists_nofollow(&dir) {
                return Ok(Err(Stop::Cancelled));
            }
            if exists_nofollow(&dir.join(ABORT)) {
                let text = early("the sender failed");
                return Ok(Ok(self.result(Outcome::Aborted, Status::Helper, text)));
            }
            if self.scan()?.md5 {
                let text = early(&format!("chunk {} arrived after it exited", self.next));
                return Ok(Ok(self.result(Outcome::Corrupt, Status::Helper, text)));
            }
            if let Some(text) = read_marker(&dir, END).unwrap_or(Some(String::new())) {
                return Ok(Ok(match End::parse(&text) {
                    Ok(end) if end.chunks == self.next && end.bytes == self.bytes => {
                        self.result(Outcome::Ok, status, stderr.clone())
                    }
                    Ok(end) => {
                        let why = format!(
                            "the end marker says {} chunks of {} bytes; it was given {} chunks of {} bytes",
                            end.chunks, end.bytes, self.next, self.bytes
                        );
                        self.result(Outcome::Corrupt, Status::Helper, early(&why))
                    }
                    Err(e) => {
                        self.result(Outcome::Corrupt, Status::Helper, early(&format!("{e:#}")))
                    }
                }));
            }
            if self.last_activity.elapsed() >= self.c.timeout {
                return Ok(Err(Stop::Timeout));
            }
            thread::sleep(POLL);
        }
    }

    fn result(&self, outcome: Outcome, status: Status, stderr: String) -> RecvResult {
        RecvResult {
            outcome,
            status,
            chunks: self.next,
            bytes: self.bytes,
            stderr,
        }
    }

    fn receive(&mut self) -> Result<std::result::Result<RecvResult, Stop>> {
        let dir = self.c.dir.clone();
        write_atomic(
            &dir,
            PROGRESS,
            Progress { next: 0, bytes: 0 }.render().as_bytes(),
        )?;
        let mut child = match Command::new(&self.c.argv[0])
            .args(&self.c.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(ch) => ch,
            Err(e) => {
                return Ok(Ok(self.result(
                    Outcome::Failed,
                    Status::Helper,
                    format!("cannot start {:?}: {e}\n", self.c.argv[0]),
                )))
            }
        };
        log(
            "receiver",
            &dir,
            &format!("started {:?} (pid {})", self.c.argv, child.id()),
        );
        let mut zfs = Zfs {
            stdin: child.stdin.take(),
            stdout: drain(child.stdout.take()),
            stderr: drain(child.stderr.take()),
            child,
        };
        loop {
            if exists_nofollow(&dir.join(CANCEL)) || !exists_nofollow(&dir) {
                zfs.kill();
                return Ok(Err(Stop::Cancelled));
            }
            if let Some(text) = read_marker(&dir, ABORT).unwrap_or(Some(String::new())) {
                let why = match Failure::parse(&text) {
                    Ok(f) => format!("the sender failed ({}): {}", f.status, f.stderr.trim_end()),
                    Err(e) => format!("the sender failed (unreadable abort marker: {e:#})"),
                };
                log("receiver", &dir, &format!("aborting: {why}"));
                let (status, stderr) = zfs.finish(Some(ABORT_GRACE))?;
                let stderr = format!("aborted: {why}\n{stderr}");
                // zfs may exit 0 on an empty stream; aborted is never success.
                let status = if status.success() {
                    Status::Helper
                } else {
                    status
                };
                return Ok(Ok(self.result(Outcome::Aborted, status, stderr)));
            }
            let scan = self.scan()?;
            if scan.md5 {
                self.last_activity = Instant::now();
                if !scan.data {
                    self.reject("its .md5 arrived without its data")?;
                } else if let Some(file) = self.verify()? {
                    self.hash_ahead();
                    let stdin = zfs
                        .stdin
                        .as_mut()
                        .ok_or_else(|| anyhow!("zfs receive's stdin is closed"))?;
                    match stream(file, stdin, self.c.framed) {
                        Ok(n) => {
                            self.consumed(n)?;
                            continue;
                        }
                        Err(e) => {
                            log(
                                "receiver",
                                &dir,
                                &format!("writing to zfs receive failed: {e}"),
                            );
                            let (status, stderr) = zfs.finish(None)?;
                            let status = if status.success() {
                                Status::Helper
                            } else {
                                status
                            };
                            return Ok(Ok(self.result(Outcome::Failed, status, stderr)));
                        }
                    }
                }
                if self.attempts.get(&self.next).copied().unwrap_or(0) >= MAX_ATTEMPTS {
                    let (status, mut stderr) = zfs.kill();
                    stderr.insert_str(
                        0,
                        &format!(
                            "chunk {} failed MD5 verification {MAX_ATTEMPTS} times\n",
                            self.next
                        ),
                    );
                    let status = if status.success() {
                        Status::Helper
                    } else {
                        status
                    };
                    return Ok(Ok(self.result(Outcome::Corrupt, status, stderr)));
                }
                continue;
            }
            if let Some(text) = read_marker(&dir, END).unwrap_or(Some(String::new())) {
                let end = End::parse(&text);
                match end {
                    Ok(end) if end.chunks > self.next => {}
                    Ok(end) if end.chunks == self.next && end.bytes == self.bytes => {
                        log(
                            "receiver",
                            &dir,
                            "all chunks given; waiting for zfs receive",
                        );
                        let (status, stderr) = zfs.finish(None)?;
                        let outcome = if status.success() {
                            Outcome::Ok
                        } else {
                            Outcome::Failed
                        };
                        return Ok(Ok(self.result(outcome, status, stderr)));
                    }
                    other => {
                        let why = match other {
                            Ok(end) => format!(
                                "the end marker says {} chunks of {} bytes; received {} chunks of {} bytes",
                                end.chunks, end.bytes, self.next, self.bytes
                            ),
                            Err(e) => format!("{e:#}"),
                        };
                        let (status, stderr) = zfs.kill();
                        let status = if status.success() {
                            Status::Helper
                        } else {
                            status
                        };
                        return Ok(Ok(self.result(
                            Outcome::Corrupt,
                            status,
                            format!("{why}\n{stderr}"),
                        )));
                    }
                }
            }
            if let Some(status) = zfs.child.try_wait().context("checking on zfs receive")? {
                let status = Status::from_exit(status);
                let (_, stderr) = zfs.finish(None)?;
                if status.success() {
                    // zfs receive may exit 0 as soon as it has read the
                    // stream's last byte, before the sender's `end` reached
                    // this folder: wait for `end` and check the counts.
                    return self.after_early_exit(status, stderr);
                }
                let stderr = format!("zfs receive ended before the stream did\n{stderr}");
                return Ok(Ok(self.result(Outcome::Failed, status, stderr)));
            }
            if self.copies.moved(&dir) {
                self.last_activity = Instant::now();
            }
            if self.last_activity.elapsed() >= self.c.timeout {
                zfs.kill();
                return Ok(Err(Stop::Timeout));
            }
            thread::sleep(POLL);
        }
    }

    /// Lists the folder: removes chunk files below `next` (copies of
    /// consumed chunks), reports what there is of chunk `next`.
    fn scan(&self) -> Result<Scan> {
        let mut scan = Scan {
            md5: false,
            data: false,
        };
        for f in list_chunk_files(&self.c.dir)? {
            match f {
                _ if f.index() < self.next => {
                    let name = match f {
                        ChunkFile::Data(i) => chunk_name(i),
                        ChunkFile::Md5(i) => md5_name(i),
                    };
                    remove_if_present(&self.c.dir, &name)?;
                }
                ChunkFile::Data(i) if i == self.next => scan.data = true,
                ChunkFile::Md5(i) if i == self.next => scan.md5 = true,
                _ => {}
            }
        }
        Ok(scan)
    }

    /// Hashes chunk `next` through one descriptor; returns it rewound if the
    /// digest matches its `.md5`, else deletes the chunk and asks for it
    /// again.
    fn verify(&mut self) -> Result<Option<File>> {
        let dir = &self.c.dir;
        let expected = match read_marker(dir, &md5_name(self.next))
            .and_then(|t| t.ok_or_else(|| anyhow!("vanished")))
            .and_then(|t| parse_md5(&t, self.next))
        {
            Ok(d) => d,
            Err(e) => {
                self.reject(&format!("its .md5 is unusable: {e:#}"))?;
                return Ok(None);
            }
        };
        let path = dir.join(chunk_name(self.next));
        // Hashed ahead while the previous chunk streamed, or now.
        let hashed = match self.ahead.take() {
            Some((i, h)) if i == self.next => h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the hashing thread panicked"))),
            _ => hash_file(&path),
        };
        let (mut file, actual) = hashed?;
        if actual != expected {
            self.reject(&format!(
                "MD5 mismatch: expected {}, got {}",
                hex(&expected),
                hex(&actual)
            ))?;
            return Ok(None);
        }
        file.seek(SeekFrom::Start(0))
            .with_context(|| format!("rewinding {}", path.display()))?;
        Ok(Some(file))
    }

    /// Starts hashing chunk `next + 1` on its own thread if it is complete,
    /// so that its check overlaps chunk `next` streaming into zfs. The
    /// descriptor it hashed is the one streamed later: what reaches zfs is
    /// what was verified.
    fn hash_ahead(&mut self) {
        let i = self.next + 1;
        let dir = &self.c.dir;
        if self.ahead.is_some()
            || !exists_nofollow(&dir.join(md5_name(i)))
            || !exists_nofollow(&dir.join(chunk_name(i)))
        {
            return;
        }
        let path = dir.join(chunk_name(i));
        self.ahead = Some((i, thread::spawn(move || hash_file(&path))));
    }

    /// Deletes chunk `next` and writes `resend`.
    fn reject(&mut self, why: &str) -> Result<()> {
        let dir = &self.c.dir;
        let attempt = self.attempts.entry(self.next).or_insert(0);
        *attempt += 1;
        let attempt = *attempt;
        log(
            "receiver",
            dir,
            &format!("chunk {} rejected (attempt {attempt}): {why}", self.next),
        );
        remove_if_present(dir, &chunk_name(self.next))?;
        remove_if_present(dir, &md5_name(self.next))?;
        if attempt < MAX_ATTEMPTS {
            let r = Resend {
                index: self.next,
                attempt,
            };
            write_atomic(dir, RESEND, r.render().as_bytes())?;
        }
        Ok(())
    }

    /// Chunk `next` went to zfs in full: record it, then delete it.
    fn consumed(&mut self, n: u64) -> Result<()> {
        let dir = &self.c.dir;
        let index = self.next;
        self.next += 1;
        self.bytes += n;
        let p = Progress {
            next: self.next,
            bytes: self.bytes,
        };
        write_atomic(dir, PROGRESS, p.render().as_bytes())?;
        remove_if_present(dir, &chunk_name(index))?;
        remove_if_present(dir, &md5_name(index))?;
        self.last_activity = Instant::now();
        Ok(())
    }

    /// Waits until the orchestrator deletes `result`.
    fn wait_ack(&mut self) -> std::result::Result<(), Stop> {
        self.last_activity = Instant::now();
        loop {
            if !exists_nofollow(&self.c.dir.join(RESULT)) {
                return Ok(());
            }
            if exists_nofollow(&self.c.dir.join(CANCEL)) {
                return Err(Stop::Cancelled);
            }
            if self.last_activity.elapsed() >= self.c.timeout {
                return Err(Stop::Timeout);
            }
            thread::sleep(POLL);
        }
    }

    fn give_up(&self, stop: Stop) -> i32 {
        stop.give_up("receiver", &self.c.dir, self.c.timeout, "zfs receive")
    }
}

/// A chunk file's descriptor (at its end) and the MD5 of what it read.
type Hashed = (File, [u8; 16]);

/// Opens `path` and hashes it through that descriptor, which is returned
/// (its position at the end) with the digest.
fn hash_file(path: &Path) -> Result<Hashed> {
    let mut file = open_nofollow(path).with_context(|| format!("opening {}", path.display()))?;
    let (digest, _) =
        md5_reader(&mut file).with_context(|| format!("reading {}", path.display()))?;
    Ok((file, digest))
}

/// Copies a verified chunk into zfs's stdin (decoding its frames when
/// `framed`); returns the bytes zfs got.
fn stream(mut file: File, stdin: &mut ChildStdin, framed: bool) -> io::Result<u64> {
    if !framed {
        return io::copy(&mut file, stdin);
    }
    let mut frames = FrameReader::new(io::BufReader::with_capacity(1 << 20, file), Framing::Bare)?;
    while let Some(block) = frames.next_block()? {
        stdin.write_all(block)?;
    }
    Ok(frames.total())
}
