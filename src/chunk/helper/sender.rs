//! The sender helper (`resync __chunk-send`): runs `zfs send` (any argv, no
//! shell), cuts its stdout into chunk files of `--chunk-size` bytes in its
//! session folder, each with its `.md5`, never more than `--window` staged,
//! and ends with an `end` or `error` marker (see the protocol in `chunk::protocol`).
//! One thread reads zfs's pipe (cutting its blocks at chunk boundaries, and
//! with `--compress` encoding each block into one frame, `compress::frame`),
//! one hashes, the main thread writes files and watches the folder. A chunk
//! holds `--chunk-size` bytes of the zfs stream (the last one fewer); with
//! compression its file holds those bytes' frames, and its MD5 covers the
//! file, i.e. the bytes that travel.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::compress::encoder::{self, Encoder};
use crate::compress::Compress;

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
    pub compress: Compress,
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
        backlog: Arc::new(AtomicBool::new(false)),
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
    /// Half the window or more is staged: the link, not compression, is
    /// the bottleneck (the encoder's level follows it).
    backlog: Arc<AtomicBool>,
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
        let encoder = match self.c.compress {
            Compress::None => None,
            c => Some(Encoder::new(c).context("starting zstd")?),
        };
        let (tx, rx) = mpsc::sync_channel::<io::Result<Block>>(DEPTH);
        let (chunk_size, backlog) = (self.c.chunk_size, self.backlog.clone());
        let reader = thread::spawn(move || read_blocks(stdout, tx, chunk_size, encoder, &backlog));
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
    fn cut(&mut self, rx: &Receiver<io::Result<Block>>, htx: &SyncSender<HashJob>) -> Result<Cut> {
        let dir = self.c.dir.clone();
        let mut index = 0u64;
        let mut total = 0u64;
        // A block read before waiting on the window.
        let mut block: Option<Block> = None;
        loop {
            // Have data for the next chunk before waiting on the window, so
            // that a stream ending on a chunk boundary ends at once.
            if block.is_none() {
                match self.next_block(rx)? {
                    Next::Block(b) => block = Some(b),
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
                let b = match block.take() {
                    Some(b) => b,
                    None => match self.next_block(rx)? {
                        Next::Block(b) => b,
                        Next::Eof => {
                            eof = true;
                            break;
                        }
                        Next::Stopped(s) => return Ok(Cut::Stopped(s)),
                    },
                };
                // The reading thread cuts blocks at chunk boundaries.
                if in_chunk + b.raw > self.c.chunk_size {
                    return Err(anyhow!(
                        "internal error: a block crosses chunk {index}'s end"
                    ));
                }
                file.write_all(&b.data)
                    .with_context(|| format!("writing {}", part.display()))?;
                in_chunk += b.raw;
                let len = b.data.len();
                htx.send(HashJob::Data(Arc::new(b.data), 0, len))
                    .map_err(|_| anyhow!("the hashing thread died"))?;
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

    fn next_block(&mut self, rx: &Receiver<io::Result<Block>>) -> Result<Next> {
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
            self.backlog
                .store(count * 2 >= self.c.window.max(2), Ordering::Relaxed);
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
    Block(Block),
    Eof,
    Stopped(Stop),
}

/// What the reading thread hands on: `raw` bytes of the zfs stream, as
/// they go into the chunk file (themselves, or one frame of them).
struct Block {
    raw: u64,
    data: Vec<u8>,
}

/// Reads `r` into `tx` until EOF or error, in blocks of up to BLOCK bytes
/// (the encoder's block size with compression) that never cross a chunk
/// boundary; with `encoder`, each block is sent as one frame, and the
/// encoder told whether the link is the bottleneck: the queue was full, or
/// the staged chunks are a `backlog`.
fn read_blocks(
    mut r: impl Read,
    tx: SyncSender<io::Result<Block>>,
    chunk_size: u64,
    mut encoder: Option<Encoder>,
    backlog: &AtomicBool,
) {
    let most = match encoder {
        Some(_) => encoder::BLOCK,
        None => BLOCK,
    };
    let mut at = 0u64; // position in the current chunk
    loop {
        let want = (chunk_size - at).min(most as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        let res = loop {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break Ok(true),
                Ok(n) => {
                    filled += n;
                    if filled == want {
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
                    at = (at + filled as u64) % chunk_size;
                    let block = match encoder.as_mut() {
                        None => Block {
                            raw: filled as u64,
                            data: buf,
                        },
                        Some(enc) => {
                            let mut data = Vec::with_capacity(filled + 16);
                            if let Err(e) = enc.frame(&buf, &mut data) {
                                let _ = tx.send(Err(e));
                                return;
                            }
                            Block {
                                raw: filled as u64,
                                data,
                            }
                        }
                    };
                    match tx.try_send(Ok(block)) {
                        Ok(()) => {
                            if let Some(enc) = encoder.as_mut() {
                                enc.observe(backlog.load(Ordering::Relaxed));
                            }
                        }
                        Err(mpsc::TrySendError::Full(block)) => {
                            if let Some(enc) = encoder.as_mut() {
                                enc.observe(true);
                            }
                            if tx.send(block).is_err() {
                                return;
                            }
                        }
                        Err(mpsc::TrySendError::Disconnected(_)) => return,
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
