//! The plain stream (default mode): `zfs send` on the source host piped
//! through this process into `zfs receive` on the target host. [`Pipe`]
//! starts both commands (each announcing its pid for the run lock), moves
//! the bytes with [`pump`] (two threads, so reading on one side overlaps
//! writing on the other; with a [`Limiter`] the writing side waits for the
//! bucket, `--source/target-bwlimit`), drains the receiver's own output
//! (`--recvoptions v` prints there), and bounds the whole by `--timeout`: a
//! stream on which no byte moves for that long, or a command that does not
//! exit that long after its stream ended, is stopped and reported, whether
//! the hung process is local or remote.
//!
//! With a [`Codec`] (`--compress`, not `none`) the stream crosses the link
//! framed (`compress::frame`): a local `zfs send` is encoded by the pump's
//! reading thread, a remote one by our deployed binary around it
//! (`__encode`); a local `zfs receive` gets what the pump's writer decodes,
//! a remote one is fed by `__decode`. Both remote: this process relays
//! frames it does not open. The summary line counts both sizes.
//!
//! With a [`Route`] (`--insecure-direct-connection`, never with a codec)
//! the remote end's data crosses one TCP connection instead of SSH: the
//! pump writes to the target's `__listen`, or reads what the source's
//! `__connect` sends to our listener; both zfs commands still start, and
//! are waited for and checked, over SSH.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::direct::{self, Route};
use super::{Mover, Request};
use crate::bwlimit::Limiter;
use crate::compress::encoder::Encoder;
use crate::compress::filter::{self, decode_argv, encode_argv, encode_blocks};
use crate::compress::frame::{self, DecodeWriter};
use crate::compress::Compress;
use crate::host::quote::sh_join;
use crate::host::{Child, ExitInfo, Host};
use crate::progress::{human_bytes, Progress, Transfer};
use crate::runlock::{self, RemoteProc, RunLock};
use crate::zfs::ZfsError;

/// Size of one buffer handed from the reading thread to the writing one.
const BUF: usize = 256 * 1024;
/// Buffers in flight between the threads (bounds memory to BUF * DEPTH).
const DEPTH: usize = 16;

/// Which end of the pump failed.
#[derive(Debug)]
pub enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpError::Read(e) => write!(f, "reading the send stream failed: {e}"),
            PumpError::Write(e) => write!(f, "writing the receive stream failed: {e}"),
        }
    }
}

impl std::error::Error for PumpError {}

/// Copies `reader` to `writer` until EOF, calling `on_bytes` after each write.
/// Returns the byte count. With `limit`, writes are split into the limiter's
/// chunk size and each waits for its tokens first, so the stream averages the
/// limiter's rate; the throttled writer slows the reader in turn, through the
/// bounded queue and then the producer's pipe. The writer is flushed and
/// dropped (EOF to its process) before returning, on success and on failure
/// alike. If writing
/// fails the reading thread is left to end when its reader does: the caller
/// kills the producing process so that it does.
/// With `encode`, the reading thread encodes what it reads into a framed
/// stream (magic, frames, end frame), and its counter counts the bytes read
/// before encoding.
pub fn pump(
    mut reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    limit: Option<Limiter>,
    encode: Option<(Encoder, Arc<AtomicU64>)>,
    on_bytes: &dyn Fn(u64),
) -> Result<u64, PumpError> {
    let depth = if encode.is_some() {
        filter::DEPTH
    } else {
        DEPTH
    };
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(depth);
    if let Some((mut enc, raw)) = encode {
        let reading = thread::spawn(move || {
            if tx.send(Ok(frame::MAGIC.to_vec())).is_err() {
                return;
            }
            let mut counted = CountingReader {
                inner: &mut reader,
                raw,
            };
            if let Ok(stats) = encode_blocks(&mut counted, &mut enc, &tx) {
                let mut end = Vec::new();
                frame::push_end(&mut end, stats.raw);
                let _ = tx.send(Ok(end));
            }
        });
        return write_side(rx, writer, limit, on_bytes, reading);
    }
    let reading = thread::spawn(move || loop {
        let mut buf = vec![0u8; BUF];
        let mut filled = 0;
        // Fill the buffer as far as the reader gives without blocking twice on
        // a slow producer: stop at the first short read after some data.
        let result = loop {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == BUF || filled >= BUF / 4 {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) if filled == 0 => return,
            Ok(()) => {
                buf.truncate(filled);
                if tx.send(Ok(buf)).is_err() {
                    return;
                }
            }
            Err(e) => {
                if filled > 0 {
                    buf.truncate(filled);
                    let _ = tx.send(Ok(buf));
                }
                let _ = tx.send(Err(e));
                return;
            }
        }
    });

    write_side(rx, writer, limit, on_bytes, reading)
}

/// Counts the bytes read through it.
struct CountingReader<'a> {
    inner: &'a mut Box<dyn Read + Send>,
    raw: Arc<AtomicU64>,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.raw.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The writing half of the pump: takes buffers off `rx` until the reading
/// thread ends.
fn write_side(
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    mut writer: Box<dyn Write + Send>,
    mut limit: Option<Limiter>,
    on_bytes: &dyn Fn(u64),
    reading: thread::JoinHandle<()>,
) -> Result<u64, PumpError> {
    let mut total = 0u64;
    let outcome = loop {
        match rx.recv() {
            Ok(Ok(buf)) => {
                let chunk = limit.as_ref().map_or(buf.len(), Limiter::chunk).max(1);
                let written = buf.chunks(chunk).try_for_each(|piece| {
                    if let Some(l) = limit.as_mut() {
                        l.wait_for(piece.len());
                    }
                    writer.write_all(piece)?;
                    total += piece.len() as u64;
                    on_bytes(piece.len() as u64);
                    Ok(())
                });
                if let Err(e) = written {
                    break Err(PumpError::Write(e));
                }
            }
            Ok(Err(e)) => break Err(PumpError::Read(e)),
            Err(mpsc::RecvError) => break Ok(total),
        }
    };
    let outcome = match outcome {
        Ok(n) => writer.flush().map(|()| n).map_err(PumpError::Write),
        Err(e) => Err(e),
    };
    drop(writer);
    drop(rx);
    if outcome.is_ok() {
        let _ = reading.join();
    }
    outcome
}

/// The plain stream between two hosts, as a [`Mover`].
pub struct Pipe<'a> {
    pub src: Arc<dyn Host>,
    pub dst: Arc<dyn Host>,
    /// Records the running zfs processes (not in tests).
    pub lock: Option<&'a RunLock>,
    /// Bytes per second (`--source/target-bwlimit`).
    pub bwlimit: Option<u64>,
    /// `--timeout`: how long nothing may move before the stream counts as hung.
    pub stall: Duration,
    pub ui: &'a dyn Progress,
    /// Compression on the wire; `None` for the plain stream.
    pub codec: Option<Codec>,
    /// `--insecure-direct-connection`: the stream crosses plain TCP between
    /// this machine and the remote end (no codec then).
    pub direct: Option<Route>,
}

/// How a compressed stream is encoded and decoded: our binary on each
/// remote end (`None` for this machine, where the pump does it). At least
/// one end is remote.
#[derive(Debug, Clone)]
pub struct Codec {
    pub compress: Compress,
    pub src_exe: Option<String>,
    pub dst_exe: Option<String>,
}

impl Codec {
    fn send_argv(&self, send: &[String]) -> Vec<String> {
        match &self.src_exe {
            Some(exe) => encode_argv(exe, self.compress, send),
            None => send.to_vec(),
        }
    }

    fn recv_argv(&self, recv: &[String]) -> Vec<String> {
        match &self.dst_exe {
            Some(exe) => decode_argv(exe, recv),
            None => recv.to_vec(),
        }
    }
}

/// The local `zfs receive`'s stdin behind a decoder. `flush` is called
/// once, when the pump has written everything: a stream that lacked its
/// end frame fails there.
struct Decoding {
    inner: DecodeWriter<Box<dyn Write + Send>>,
    raw: Arc<AtomicU64>,
}

impl Write for Decoding {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.raw.store(self.inner.total(), Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        if !self.inner.complete() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the compressed stream ended without its end frame",
            ));
        }
        Ok(())
    }
}

/// No byte moved, or a command did not exit, for `--timeout`.
#[derive(Debug)]
pub struct Stalled {
    pub what: String,
    pub after: Duration,
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} for {} (--timeout); stopped both zfs commands",
            self.what,
            humantime::format_duration(self.after)
        )
    }
}

impl std::error::Error for Stalled {}

impl Mover for Pipe<'_> {
    fn transfer(&self, req: &Request, bar: Box<dyn Transfer>) -> Result<u64> {
        let (sh, th) = (&*self.src, &*self.dst);
        let (send, recv) = match (&self.direct, &self.codec) {
            (Some(r), _) => (r.send_argv(&req.send), r.recv_argv(&req.recv)),
            (None, Some(c)) => (c.send_argv(&req.send), c.recv_argv(&req.recv)),
            (None, None) => (req.send.clone(), req.recv.clone()),
        };
        // Pulling over a direct connection: this machine listens, bound
        // before the remote `zfs send` starts to connect.
        let listener = match &self.direct {
            Some(r) if r.dst_exe.is_none() => Some(direct::bind(r.direct.listen)?),
            _ => None,
        };
        self.ui
            .debug(&format!("[{}] {}", sh.label(), sh_join(&send)));
        self.ui
            .debug(&format!("[{}] {}", th.label(), sh_join(&recv)));
        // Both commands announce their pid first, for the run lock's record.
        let mut receiver = th
            .spawn(&runlock::announce_pid_argv(&recv))
            .context("cannot start zfs receive")?;
        let mut sender = match sh.spawn(&runlock::announce_pid_argv(&send)) {
            Ok(s) => s,
            Err(e) => {
                receiver.kill();
                return Err(e.context("cannot start zfs send"));
            }
        };
        let (Some(mut reader), Some(writer), Some(mut recv_out)) = (
            sender.take_stdout(),
            receiver.take_stdin(),
            receiver.take_stdout(),
        ) else {
            sender.kill();
            receiver.kill();
            bail!("internal error: zfs send/receive pipes are missing");
        };
        let mut started = Vec::new();
        for (host, out, argv) in [(th, &mut recv_out, &recv), (sh, &mut reader, &send)] {
            match runlock::read_announcement(&mut **out, host.label(), argv) {
                Ok(p) => started.extend(p.map(|p| (host, p))),
                Err(e) => {
                    sender.kill();
                    receiver.kill();
                    return Err(e.context(format!("starting zfs on {}", host.label())));
                }
            }
        }
        let procs: Vec<RemoteProc> = started.iter().map(|(_, p)| p.clone()).collect();
        if let Some(lock) = self.lock {
            for p in &procs {
                lock.record(p.clone())?;
            }
        }
        // Bytes of the zfs stream itself, where this process sees them
        // (it encodes or decodes); the bar counts those.
        let raw = Arc::new(AtomicU64::new(0));
        let ends =
            self.direct_ends(listener, reader, writer)
                .and_then(|(reader, writer, control)| {
                    let (encode, writer, raw_seen) = self.framing(writer, &raw)?;
                    Ok((reader, writer, control, encode, raw_seen))
                });
        let (reader, writer, _control_stdin, encode, raw_seen) = match ends {
            Ok(ends) => ends,
            Err(e) => {
                sender.kill();
                receiver.kill();
                if let Some(lock) = self.lock {
                    lock.forget(&procs)?;
                }
                return Err(e);
            }
        };
        // The receiver's own output (`zfs receive -v`) must be read, or it
        // dies of SIGPIPE; it is shown once the receive is done.
        let recv_lines = drain(recv_out);
        if let Some(rate) = self.bwlimit {
            self.ui
                .debug(&format!("bandwidth limit: {}/s", human_bytes(rate)));
        }
        let limit = self.bwlimit.map(Limiter::new);
        let bar: Arc<dyn Transfer> = Arc::from(bar);
        let moved = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = mpsc::channel();
        {
            let (bar, moved, raw) = (bar.clone(), moved.clone(), raw.clone());
            thread::spawn(move || {
                let shown = AtomicU64::new(0);
                let pumped = pump(reader, writer, limit, encode, &|n| {
                    moved.fetch_add(n, Ordering::Relaxed);
                    if raw_seen {
                        let now = raw.load(Ordering::Relaxed);
                        let before = shown.swap(now, Ordering::Relaxed);
                        bar.add(now.saturating_sub(before));
                    } else {
                        bar.add(n);
                    }
                });
                let _ = done_tx.send(pumped);
            });
        }
        // Bytes read before encoding count as movement too: a slow `zfs
        // send` fills a 2 MiB block long before the block crosses.
        let pumped = match self.watch_stream(&done_rx, &[&moved, &raw]) {
            Ok(p) => p,
            Err(stalled) => {
                bar.finish();
                sender.kill();
                receiver.kill();
                // Killing a remote command only closes its end of the
                // connection; over a dead link the process lives on. It stays
                // recorded, and the next run stops it (its record names the
                // exact process, so one that did exit is left alone).
                return Err(anyhow!(Stalled {
                    what: format!(
                        "no data moved between zfs send on {} and zfs receive on {}",
                        sh.label(),
                        th.label()
                    ),
                    after: stalled,
                }));
            }
        };
        bar.finish();
        if pumped.is_err() {
            sender.kill();
        }
        // The receiver saw EOF (or a broken stream); its verdict comes first,
        // since "cannot receive: ..." explains more than a broken pipe does.
        let recv_exit = self.wait_bounded(receiver, "zfs receive", th, &started)?;
        let send_exit = self.wait_bounded(sender, "zfs send", sh, &started)?;
        if let Some(lock) = self.lock {
            lock.forget(&procs)?;
        }
        if let Ok(lines) = recv_lines.recv_timeout(Duration::from_secs(1)) {
            for line in lines.lines().filter(|l| !l.trim().is_empty()) {
                self.ui.info(&format!("[{}] {line}", th.label()));
            }
        }
        // Typed, so that the caller can tell a partial-state refusal.
        for (exit, what, host) in [
            (&recv_exit, "zfs receive", th.label()),
            (&send_exit, "zfs send", sh.label()),
        ] {
            if !exit.success() {
                return Err(ZfsError::exited(what, host, exit.status, &exit.stderr).into());
            }
        }
        match pumped {
            Ok(wire) if self.codec.is_some() => {
                let raw = raw.load(Ordering::Relaxed);
                self.ui.info(&match raw_seen {
                    true => format!(
                        "compressed: {} ({raw} bytes) of stream in {} ({wire} bytes) on the wire ({:.2}x)",
                        human_bytes(raw),
                        human_bytes(wire),
                        raw as f64 / wire.max(1) as f64
                    ),
                    false => format!(
                        "compressed: {} ({wire} bytes) on the wire, relayed between the hosts' encoder and decoder",
                        human_bytes(wire)
                    ),
                });
                Ok(if raw_seen { raw } else { wire })
            }
            Ok(n) => Ok(n),
            Err(e) => {
                Err(anyhow!(e).context("the stream broke although both zfs commands exited 0"))
            }
        }
    }
}

/// What the pump does about compression: the encoder of its reading side
/// (with the counter of bytes it reads), the writer it writes to (behind a
/// decoder when the receiver is local), and whether it sees the stream's
/// own bytes (false when both ends are remote: it only relays frames).
type Framing = (
    Option<(Encoder, Arc<AtomicU64>)>,
    Box<dyn Write + Send>,
    bool,
);

/// The pump's ends with a direct connection in place, and the remote
/// receiver's SSH stdin, held open until the pipe is done.
type DirectEnds = (
    Box<dyn Read + Send>,
    Box<dyn Write + Send>,
    Option<Box<dyn Write + Send>>,
);

impl Pipe<'_> {
    /// With a direct connection, the TCP stream replaces the remote end's
    /// SSH channel: pushing, this machine connects to the target's
    /// `__listen`; pulling, it accepts the source's `__connect` on
    /// `listener`. Each waits at most the connection's timeout.
    fn direct_ends(
        &self,
        listener: Option<TcpListener>,
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
    ) -> Result<DirectEnds> {
        let Some(r) = &self.direct else {
            return Ok((reader, writer, None));
        };
        let d = &r.direct;
        match listener {
            Some(l) => {
                self.ui.debug(&format!(
                    "waiting on {} for the source's direct connection",
                    d.listen
                ));
                let stream = direct::accept_within(&l, d.timeout)?;
                // The remote `__connect` writes nothing more on SSH.
                let _ = drain(reader);
                Ok((Box::new(stream), writer, None))
            }
            None => {
                self.ui
                    .debug(&format!("connecting to {} (direct connection)", d.connect));
                let stream = direct::connect_within(d.connect, d.timeout)?;
                Ok((reader, Box::new(stream), Some(writer)))
            }
        }
    }

    fn framing(&self, writer: Box<dyn Write + Send>, raw: &Arc<AtomicU64>) -> Result<Framing> {
        let Some(c) = &self.codec else {
            return Ok((None, writer, false));
        };
        let encode = match c.src_exe {
            None => Some((
                Encoder::new(c.compress).context("starting zstd")?,
                raw.clone(),
            )),
            Some(_) => None,
        };
        let writer: Box<dyn Write + Send> = match c.dst_exe {
            None => Box::new(Decoding {
                inner: DecodeWriter::new(writer).context("starting zstd")?,
                raw: raw.clone(),
            }),
            Some(_) => writer,
        };
        Ok((encode, writer, c.src_exe.is_none() || c.dst_exe.is_none()))
    }

    /// Waits for the pump; `Err(how long)` when no byte moved for `stall`.
    fn watch_stream(
        &self,
        done: &mpsc::Receiver<Result<u64, PumpError>>,
        moved: &[&AtomicU64],
    ) -> Result<Result<u64, PumpError>, Duration> {
        let tick = (self.stall / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let (mut seen, mut since) = (0, Instant::now());
        loop {
            match done.recv_timeout(tick) {
                Ok(pumped) => return Ok(pumped),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Ok(Err(PumpError::Read(io::Error::other(
                        "the stream's thread ended without a result",
                    ))))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now: u64 = moved.iter().map(|m| m.load(Ordering::Relaxed)).sum();
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= self.stall {
                return Err(since.elapsed());
            }
        }
    }

    /// Waits for a command to exit, at most `--timeout` after its stream
    /// ended; a command that hangs there is stopped by its recorded pid.
    fn wait_bounded(
        &self,
        child: Box<dyn Child>,
        what: &str,
        host: &dyn Host,
        started: &[(&dyn Host, RemoteProc)],
    ) -> Result<ExitInfo> {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(self.stall) {
            Ok(exit) => exit.with_context(|| format!("waiting for {what}")),
            Err(_) => {
                for (h, p) in started {
                    let _ = h.run(&runlock::stop_argv(p));
                }
                if let Some(lock) = self.lock {
                    let procs: Vec<_> = started.iter().map(|(_, p)| p.clone()).collect();
                    lock.forget(&procs)?;
                }
                Err(anyhow!(Stalled {
                    what: format!(
                        "{what} on {} did not exit after its stream ended",
                        host.label()
                    ),
                    after: self.stall,
                }))
            }
        }
    }
}

/// Reads `out` to its end on a thread (its last [`DRAIN_CAP`] bytes kept);
/// the text arrives on the channel at EOF.
fn drain(mut out: Box<dyn Read + Send>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > DRAIN_CAP {
                        kept.drain(..kept.len() - DRAIN_CAP);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
    });
    rx
}

/// How much of the receiver's own output is kept for display.
const DRAIN_CAP: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "receiver died"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct FailAfter(usize);
    impl Read for FailAfter {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("sender died"));
            }
            let n = b.len().min(self.0).min(1000);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn copies_every_byte_in_order_and_counts_them() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let out = Arc::new(Mutex::new(Vec::new()));
        let counted = AtomicU64::new(0);
        let n = pump(
            Box::new(io::Cursor::new(data.clone())),
            Box::new(Sink(out.clone())),
            None,
            None,
            &|b| {
                counted.fetch_add(b, Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(counted.load(Ordering::Relaxed), n);
        assert!(*out.lock().unwrap() == data);
    }

    #[test]
    fn a_dead_writer_is_a_write_error() {
        let r = pump(
            Box::new(io::repeat(1).take(1 << 20)),
            Box::new(Broken),
            None,
            None,
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Write(_))));
    }

    #[test]
    fn a_dead_reader_is_a_read_error_after_its_data() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let r = pump(
            Box::new(FailAfter(5000)),
            Box::new(Sink(out.clone())),
            None,
            None,
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Read(_))));
        assert_eq!(out.lock().unwrap().len(), 5000);
    }

    #[test]
    fn a_limited_pump_copies_everything_at_about_the_rate() {
        // 1.5 MiB at 2 MiB/s after a 104 KiB burst: about 0.7 s.
        let data: Vec<u8> = (0..1_572_864u32).map(|i| (i * 13 % 241) as u8).collect();
        let out = Arc::new(Mutex::new(Vec::new()));
        let calls = AtomicU64::new(0);
        let start = std::time::Instant::now();
        let n = pump(
            Box::new(io::Cursor::new(data.clone())),
            Box::new(Sink(out.clone())),
            Some(Limiter::new(2 << 20)),
            None,
            &|_| {
                calls.fetch_add(1, Ordering::Relaxed);
            },
        )
        .unwrap();
        let took = start.elapsed().as_secs_f64();
        assert_eq!(n, data.len() as u64);
        assert!(*out.lock().unwrap() == data);
        let ideal = (data.len() as f64 - (2 << 20) as f64 / 20.0) / (2 << 20) as f64;
        assert!(
            took >= ideal * 0.95 && took < ideal + 1.0,
            "{took}s, ideal {ideal}s"
        );
        // Writes were split: no more than a twentieth of a second's worth each.
        assert!(calls.load(Ordering::Relaxed) >= 15);
    }

    #[test]
    fn a_dead_writer_under_a_limit_is_still_a_write_error() {
        let r = pump(
            Box::new(io::repeat(1).take(1 << 20)),
            Box::new(Broken),
            Some(Limiter::new(1 << 30)),
            None,
            &|_| {},
        );
        assert!(matches!(r, Err(PumpError::Write(_))));
    }

    /// Collects info lines; transfers count into nothing.
    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);
    impl Progress for Lines {
        fn info(&self, line: &str) {
            self.0.lock().unwrap().push(line.to_string());
        }
        fn warn(&self, line: &str) {
            self.0.lock().unwrap().push(line.to_string());
        }
        fn debug(&self, _: &str) {}
        fn transfer(&self, _: &str, _: Option<u64>) -> Box<dyn Transfer> {
            Box::new(NoBar)
        }
    }
    struct NoBar;
    impl Transfer for NoBar {
        fn add(&self, _: u64) {}
        fn finish(&self) {}
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    fn request(send: &str, recv: &str) -> Request {
        Request {
            send: sh(send),
            recv: sh(recv),
            label: "test".into(),
            session: crate::chunk::session::Identity {
                source: "a/b".into(),
                target: "c/d".into(),
                stream: crate::chunk::session::Stream::Resume {
                    token: "1-0-0".into(),
                },
            },
        }
    }

    fn local_pipe(ui: &Lines, stall: Duration) -> Pipe<'_> {
        let local: Arc<dyn Host> = Arc::new(crate::host::local::LocalHost::new());
        Pipe {
            src: local.clone(),
            dst: local,
            lock: None,
            bwlimit: None,
            stall,
            ui,
            codec: None,
            direct: None,
        }
    }

    /// Our binary, built beside the test binary (as the chunk tests use it).
    fn our_exe() -> String {
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

    /// A compressible stream through the pump and our binary's filters, in
    /// each arrangement of where encoding and decoding happen: the bytes
    /// arrive whole and the summary says the wire carried fewer.
    #[test]
    fn a_compressed_stream_arrives_whole_wherever_it_is_encoded_and_decoded() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("in");
        let text: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| format!("line {} of the stream\n", i % 5000).into_bytes())
            .take(3 << 20)
            .collect();
        std::fs::write(&input, &text).unwrap();
        let exe = our_exe();
        for (n, (src_exe, dst_exe)) in [
            (None, Some(exe.clone())),
            (Some(exe.clone()), None),
            (Some(exe.clone()), Some(exe.clone())),
        ]
        .into_iter()
        .enumerate()
        {
            let out = tmp.path().join(format!("out{n}"));
            let ui = Lines::default();
            let mut pipe = local_pipe(&ui, Duration::from_secs(30));
            let raw_seen = src_exe.is_none() || dst_exe.is_none();
            pipe.codec = Some(Codec {
                compress: Compress::Adaptive,
                src_exe,
                dst_exe,
            });
            let req = request(
                &format!("cat {}", input.display()),
                &format!("cat > {}", out.display()),
            );
            let moved = pipe.transfer(&req, Box::new(NoBar)).unwrap();
            assert!(std::fs::read(&out).unwrap() == text, "arrangement {n}");
            let lines = ui.0.lock().unwrap();
            assert!(
                lines.iter().any(|l| l.starts_with("compressed: ")),
                "{lines:?}"
            );
            if raw_seen {
                assert_eq!(moved, text.len() as u64);
            } else {
                assert!(moved < text.len() as u64 / 4, "{moved}");
            }
        }
    }

    #[test]
    fn a_remote_sender_that_fails_fails_the_transfer_even_compressed() {
        let ui = Lines::default();
        let mut pipe = local_pipe(&ui, Duration::from_secs(30));
        pipe.codec = Some(Codec {
            compress: Compress::Adaptive,
            src_exe: Some(our_exe()),
            dst_exe: None,
        });
        // The decoder sees no end frame; the sender's status says why.
        let req = request("head -c 100000 /dev/zero; exit 3", "cat >/dev/null");
        let err = pipe.transfer(&req, Box::new(NoBar)).unwrap_err();
        assert!(format!("{err:#}").contains("zfs send"), "{err:#}");
    }

    #[test]
    fn a_receiver_that_prints_is_drained_and_shown() {
        // Like `zfs receive -v`: it prints while it reads. With its stdout
        // dropped it died of SIGPIPE (exit 141) and the transfer failed.
        let ui = Lines::default();
        let pipe = local_pipe(&ui, Duration::from_secs(30));
        let req = request(
            "head -c 300000 /dev/zero",
            "sleep 0.2; yes received | head -n 20; cat >/dev/null; echo done",
        );
        let n = pipe.transfer(&req, Box::new(NoBar)).unwrap();
        assert_eq!(n, 300_000);
        let lines = ui.0.lock().unwrap();
        assert_eq!(lines.len(), 21, "{lines:?}");
        assert_eq!(lines[20], "[local] done");
    }

    #[test]
    fn a_sender_that_hangs_is_stopped_after_the_timeout() {
        let ui = Lines::default();
        let pipe = local_pipe(&ui, Duration::from_secs(1));
        let req = request("head -c 1000; exec sleep 60", "cat >/dev/null");
        let started = Instant::now();
        let err = pipe.transfer(&req, Box::new(NoBar)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.is::<Stalled>(), "{err:#}");
    }

    #[test]
    fn a_receiver_that_stops_reading_is_stopped_after_the_timeout() {
        let ui = Lines::default();
        let pipe = local_pipe(&ui, Duration::from_secs(1));
        let req = request(
            "exec cat /dev/zero",
            "head -c 100000 >/dev/null; exec sleep 60",
        );
        let started = Instant::now();
        let err = pipe.transfer(&req, Box::new(NoBar)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.is::<Stalled>(), "{err:#}");
    }

    #[test]
    fn a_receiver_that_never_exits_is_stopped_after_the_timeout() {
        let ui = Lines::default();
        let pipe = local_pipe(&ui, Duration::from_secs(1));
        let req = request("head -c 1000", "cat >/dev/null; exec sleep 60");
        let started = Instant::now();
        let err = pipe.transfer(&req, Box::new(NoBar)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.is::<Stalled>(), "{err:#}");
    }
}
