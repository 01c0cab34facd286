//! The sender helper (`resync __chunk-send`): runs `zfs send` (any argv, no
//! shell), cuts its stdout into chunk files of `--chunk-size` bytes in its
//! session folder, each with its `.md5`, never more than `--window` staged,
//! and ends with an `end` or `error` marker (see the protocol in `chunk::protocol`).
//! One thread reads zfs's pipe, one hashes, the main thread writes files and
//! watches the folder.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use md5::{Digest, Md5};

use super::files::{create_nofollow, exists_nofollow, staged_indices, write_atomic, CopyActivity};
use super::{drain, enter_session, log, Stop};
use crate::chunk::protocol::folder::{chunk_name, md5_name};
use crate::chunk::protocol::markers::{cap_stderr, render_md5, End, Failure, Status};
use crate::chunk::protocol::{CANCEL, END, ERROR, EXIT_OK, EXIT_ZFS_FAILED, PART, POLL};

/// Bytes handed from the reading thread at a time.
const BLOCK: usize = 1 << 20;
/// Blocks in flight between the reading thread and the writer.
const DEPTH: usize = 8;

/// What the helper's command line says.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub chunk_size: u64,
    pub window: u64,
    pub timeout: Duration,
    pub argv: Vec<OsString>,
}

/// Runs the sender helper; returns its exit code.
pub fn run(c: Config) -> i32 {
    let dir = c.dir.clone();
    let _lock = match enter_session("sender", &dir) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut s = Sender {
        c,
        last_activity: Instant::now(),
        copies: CopyActivity::default(),
    };
    let (marker, success) = match s.transfer() {
        Ok(Done::End(end)) => (write_atomic(&dir, END, end.render().as_bytes()), true),
        Ok(Done::Failed(f)) => (write_atomic(&dir, ERROR, f.render().as_bytes()), false),
        Ok(Done::Stopped(stop)) => return s.give_up(stop),
        Err(e) => {
            log("sender", &dir, &format!("error: {e:#}"));
            let f = Failure {
                status: Status::Helper,
                stderr: format!("resync sender helper: {e:#}\n"),
            };
            (write_atomic(&dir, ERROR, f.render().as_bytes()), false)
        }
    };
    if let Err(e) = marker {
        log(
            "sender",
            &dir,
            &format!("error: cannot write the final marker: {e:#}"),
        );
        let _ = fs::remove_dir_all(&dir);
        return EXIT_ZFS_FAILED;
    }
    let name = if success { END } else { ERROR };
    log(
        "sender",
        &dir,
        &format!("wrote {name}; waiting for acknowledgement"),
    );
    match s.wait_ack(name) {
        Ok(()) => {
            let _ = fs::remove_dir_all(&dir);
            log("sender", &dir, "acknowledged; folder removed");
            if success {
                EXIT_OK
            } else {
                EXIT_ZFS_FAILED
            }
        }
        Err(stop) => s.give_up(stop),
    }
}

enum Done {
    End(End),
    Failed(Failure),
    Stopped(Stop),
}

/// Work for the hashing thread.
enum HashJob {
    Data(Arc<Vec<u8>>, usize, usize),
    Finish(SyncSender<[u8; 16]>),
}

struct Sender {
    c: Config,
    last_activity: Instant,
    copies: CopyActivity,
}

impl Sender {
    fn transfer(&mut self) -> Result<Done> {
        let dir = self.c.dir.clone();
        let mut child = match Command::new(&self.c.argv[0])
            .args(&self.c.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(ch) => ch,
            Err(e) => {
                return Ok(Done::Failed(Failure {
                    status: Status::Helper,
                    stderr: format!("cannot start {:?}: {e}\n", self.c.argv[0]),
                }))
            }
        };
        log(
            "sender",
            &dir,
            &format!("started {:?} (pid {})", self.c.argv, child.id()),
        );
        let stderr = drain(child.stderr.take());
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("zfs send has no stdout pipe"))?;
        let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(DEPTH);
        let reader = thread::spawn(move || read_blocks(stdout, tx));
        let (htx, hrx) = mpsc::sync_channel::<HashJob>(DEPTH * 2);
        let hasher = thread::spawn(move || hash_jobs(hrx));

        let outcome = self.cut(&rx, &htx);
        drop(htx);
        let _ = hasher.join();
        match outcome {
            Ok(Cut::Eof { chunks, bytes }) => {
                let status = child.wait().context("waiting for zfs send")?;
                let _ = reader.join();
                let stderr = stderr.join().unwrap_or_default();
                let status = Status::from_exit(status);
                log(
                    "sender",
                    &dir,
                    &format!("zfs send ended: {status}; {chunks} chunks, {bytes} bytes"),
                );
                if status.success() {
                    Ok(Done::End(End {
                        chunks,
                        bytes,
                        status,
                    }))
                } else {
                    Ok(Done::Failed(Failure {
                        status,
                        stderr: cap_stderr(&stderr),
                    }))
                }
            }
            Ok(Cut::Stopped(stop)) => {
                let _ = child.kill();
                let _ = child.wait();
                drop(rx);
                let _ = reader.join();
                Ok(Done::Stopped(stop))
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                drop(rx);
                let _ = reader.join();
                Err(e)
            }
        }
    }

    /// Cuts the stream into chunks until EOF (or a stop).
    fn cut(
        &mut self,
        rx: &Receiver<io::Result<Vec<u8>>>,
        htx: &SyncSender<HashJob>,
    ) -> Result<Cut> {
        let dir = self.c.dir.clone();
        let mut index = 0u64;
        let mut total = 0u64;
        // The current block and how far into it we are.
        let mut block: Option<(Arc<Vec<u8>>, usize)> = None;
        loop {
            // Have data for the next chunk before waiting on the window, so
            // that a stream ending on a chunk boundary ends at once.
            if block.is_none() {
                match self.next_block(rx)? {
                    Next::Block(b) => block = Some((Arc::new(b), 0)),
                    Next::Eof => {
                        return Ok(Cut::Eof {
                            chunks: index,
                            bytes: total,
                        })
                    }
                    Next::Stopped(s) => return Ok(Cut::Stopped(s)),
                }
            }
            if let Err(stop) = self.wait_window() {
                return Ok(Cut::Stopped(stop));
            }
            let part = dir.join(format!("{}{PART}", chunk_name(index)));
            let mut file = io::BufWriter::with_capacity(
                BLOCK,
                create_nofollow(&part).with_context(|| format!("creating {}", part.display()))?,
            );
            let mut in_chunk = 0u64;
            let mut eof = false;
            while in_chunk < self.c.chunk_size {
                let (b, off) = match block.take() {
                    Some(x) => x,
                    None => match self.next_block(rx)? {
                        Next::Block(b) => (Arc::new(b), 0),
                        Next::Eof => {
                            eof = true;
                            break;
                        }
                        Next::Stopped(s) => return Ok(Cut::Stopped(s)),
                    },
                };
                let want = (self.c.chunk_size - in_chunk).min((b.len() - off) as u64) as usize;
                file.write_all(&b[off..off + want])
                    .with_context(|| format!("writing {}", part.display()))?;
                htx.send(HashJob::Data(Arc::clone(&b), off, off + want))
                    .map_err(|_| anyhow!("the hashing thread died"))?;
                in_chunk += want as u64;
                if off + want < b.len() {
                    block = Some((b, off + want));
                }
            }
            file.flush()
                .with_context(|| format!("writing {}", part.display()))?;
            drop(file);
            let (dtx, drx) = mpsc::sync_channel(1);
            htx.send(HashJob::Finish(dtx))
                .map_err(|_| anyhow!("the hashing thread died"))?;
            let digest = drx.recv().map_err(|_| anyhow!("the hashing thread died"))?;
            // in_chunk > 0: we only start a chunk holding a block.
            fs::rename(&part, dir.join(chunk_name(index)))
                .with_context(|| format!("renaming {}", part.display()))?;
            write_atomic(
                &dir,
                &md5_name(index),
                render_md5(index, &digest).as_bytes(),
            )?;
            index += 1;
            total += in_chunk;
            self.last_activity = Instant::now();
            if eof {
                return Ok(Cut::Eof {
                    chunks: index,
                    bytes: total,
                });
            }
        }
    }

    fn next_block(&mut self, rx: &Receiver<io::Result<Vec<u8>>>) -> Result<Next> {
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(b)) => return Ok(Next::Block(b)),
                Ok(Err(e)) => return Err(e).context("reading zfs send's output"),
                Err(RecvTimeoutError::Disconnected) => return Ok(Next::Eof),
                Err(RecvTimeoutError::Timeout) => {
                    // zfs is slow, not the orchestrator: only honour cancel.
                    if self.cancelled() {
                        return Ok(Next::Stopped(Stop::Cancelled));
                    }
                }
            }
        }
    }

    fn cancelled(&self) -> bool {
        exists_nofollow(&self.c.dir.join(CANCEL)) || !exists_nofollow(&self.c.dir)
    }

    /// Waits while `window` or more chunks are staged. Consumption restarts
    /// the inactivity clock.
    fn wait_window(&mut self) -> std::result::Result<(), Stop> {
        let mut last_count = None;
        loop {
            if self.cancelled() {
                return Err(Stop::Cancelled);
            }
            let count = match staged_indices(&self.c.dir) {
                Ok(s) => s.len() as u64,
                Err(_) => return Err(Stop::Cancelled),
            };
            if last_count.is_some_and(|l| count < l) {
                self.last_activity = Instant::now();
            }
            last_count = Some(count);
            if count < self.c.window {
                return Ok(());
            }
            if self.copies.moved(&self.c.dir) {
                self.last_activity = Instant::now();
            }
            if self.last_activity.elapsed() >= self.c.timeout {
                return Err(Stop::Timeout);
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until the orchestrator deletes marker `name`.
    fn wait_ack(&mut self, name: &str) -> std::result::Result<(), Stop> {
        let mut last_count = None;
        loop {
            if !exists_nofollow(&self.c.dir.join(name)) {
                return Ok(());
            }
            if exists_nofollow(&self.c.dir.join(CANCEL)) {
                return Err(Stop::Cancelled);
            }
            let count = staged_indices(&self.c.dir).map(|s| s.len()).unwrap_or(0);
            if last_count.is_some_and(|l| count < l) {
                self.last_activity = Instant::now();
            }
            last_count = Some(count);
            if self.copies.moved(&self.c.dir) {
                self.last_activity = Instant::now();
            }
            if self.last_activity.elapsed() >= self.c.timeout {
                return Err(Stop::Timeout);
            }
            thread::sleep(POLL);
        }
    }

    fn give_up(&self, stop: Stop) -> i32 {
        stop.give_up("sender", &self.c.dir, self.c.timeout, "zfs send")
    }
}

enum Cut {
    Eof { chunks: u64, bytes: u64 },
    Stopped(Stop),
}

enum Next {
    Block(Vec<u8>),
    Eof,
    Stopped(Stop),
}

/// Reads `r` in blocks of up to BLOCK bytes into `tx` until EOF or error.
fn read_blocks(mut r: impl Read, tx: SyncSender<io::Result<Vec<u8>>>) {
    loop {
        let mut buf = vec![0u8; BLOCK];
        let mut filled = 0;
        let res = loop {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break Ok(true),
                Ok(n) => {
                    filled += n;
                    if filled == BLOCK {
                        break Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match res {
            Ok(eof) => {
                if filled > 0 {
                    buf.truncate(filled);
                    if tx.send(Ok(buf)).is_err() {
                        return;
                    }
                }
                if eof {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

fn hash_jobs(rx: Receiver<HashJob>) {
    let mut h = Md5::new();
    for job in rx {
        match job {
            HashJob::Data(b, from, to) => h.update(&b[from..to]),
            HashJob::Finish(reply) => {
                let digest: [u8; 16] = std::mem::take(&mut h).finalize().into();
                let _ = reply.send(digest);
            }
        }
    }
}
