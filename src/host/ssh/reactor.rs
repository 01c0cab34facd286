//! The reactor: the one thread that owns the libssh2 session after login.
//! It runs the session non-blocking, opens exec channels for queued
//! commands (waiting for a free one when the server's MaxSessions is
//! reached), moves bytes between each channel and its handles' in-process
//! queues, sends keepalives, and sleeps in `poll` on the socket and the
//! wake-up pipe. When the session breaks it fails every channel with the
//! reason. The libssh2 rules it follows are written at [`Chan`].

use super::child::{Failure, Flags, Link, Out, Shared, Waker};
use super::connect::{round_trip_time, window_for};
use crate::host::{push_capped, signal_status, ConnectionLost, ExitInfo};
use crate::sys::Unpoisoned;
use anyhow::Context;
use ssh2::{BlockDirections, Channel, ErrorCode, Session, Stream};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest `wait` after `kill`. Closing the channel ends a command that reads
/// its stdin (EOF) or writes output (SIGPIPE) at once, but OpenSSH keeps the
/// channel until the command exits, and libssh2 cannot send a signal request
/// through the ssh2 crate; an idle command runs on remotely after this.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(5);
/// Largest packet we accept (libssh2 rejects anything above 32 KiB).
pub(super) const PACKET: u32 = 32768;
/// Bytes per message between the reactor and a stdout reader / stdin writer.
pub(super) const CHUNK: usize = 64 << 10;
/// Chunks buffered per direction between the reactor and a handle.
pub(super) const QUEUE: usize = 32;
/// Most bytes moved per channel and direction before the reactor looks at
/// the other channels.
pub(super) const SLICE: usize = 4 << 20;

/// libssh2 error codes that mean the session itself is gone.
pub(super) fn is_fatal(code: libc::c_int) -> bool {
    matches!(
        code,
        -1 | -2 | -3 | -4 | -5 | -6 | -7 | -8 | -9 | -12 | -13 | -14 | -30 | -41 | -43 | -44 | -45
    )
}

/// Hands a logged-in session to a new reactor thread: keepalives on,
/// non-blocking from now on. Returns the queue into it.
pub(super) fn start(
    sess: Session,
    sock: RawFd,
    label: &str,
    io_timeout: Duration,
) -> anyhow::Result<Arc<Shared>> {
    let interval = (io_timeout.as_secs() / 4).clamp(2, 15) as u32;
    sess.set_keepalive(false, interval);
    sess.set_blocking(false);
    let link = Arc::new(Link {
        label: label.to_string(),
        waker: Waker::new()?,
        dead: Mutex::new(None),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let reactor = Reactor {
        sess,
        sock,
        link: link.clone(),
        cmd_rx,
        commands_closed: false,
        opening: VecDeque::new(),
        chans: Vec::new(),
        kill_grace: io_timeout.min(KILL_GRACE),
        window: window_for(round_trip_time(sock)),
        scratch: vec![0; CHUNK],
        open_limit: None,
    };
    std::thread::Builder::new()
        .name(format!("ssh {label}"))
        .spawn(move || reactor.run())
        .context("cannot start the SSH session thread")?;
    Ok(Arc::new(Shared {
        link,
        cmd_tx: Mutex::new(Some(cmd_tx)),
    }))
}

pub(super) enum Cmd {
    Exec(Box<Pending>),
    Kill(u64),
}

/// The reactor's ends of one child's queues.
pub(super) struct ChanIo {
    pub(super) stdout: SyncSender<Out>,
    /// None once stdin is closed: the writer's next send fails.
    pub(super) stdin: Option<Receiver<Vec<u8>>>,
    pub(super) exit: Sender<Result<ExitInfo, Failure>>,
    pub(super) flags: Arc<Flags>,
}

/// A command waiting for its channel to open and its exec to be accepted.
pub(super) struct Pending {
    pub(super) id: u64,
    pub(super) command: String,
    pub(super) io: ChanIo,
    pub(super) reply: Sender<Result<(), Failure>>,
    pub(super) channel: Option<Channel>,
}

pub(super) enum Stdin {
    /// Writing `chunk[pos..]`, or waiting for the next chunk.
    Open {
        chunk: Vec<u8>,
        pos: usize,
    },
    /// The writer is gone and everything was written: send EOF.
    Eof,
    Closed,
}

pub(super) enum Phase {
    Running,
    /// Our close is under way; `outcome` goes to `wait` when it finishes
    /// (or earlier, for a killed command whose close hangs).
    Closing {
        since: Instant,
        outcome: Option<Result<ExitInfo, Failure>>,
    },
    Done,
}

/// One exec channel.
///
/// libssh2 rule this follows: once a call that sends has returned EAGAIN
/// with its packet half-sent, the same call (same packet buffer) must be
/// repeated until it finishes; until then every other send on the session
/// gets EAGAIN. So stdin is never abandoned while its last write or EOF is
/// pending (`send_pending`), every stage is retried on every pass, and stdout
/// and stderr are read with the same buffer size (a pending window adjust is
/// resumed by whichever of them runs next and must compute the same size).
pub(super) struct Chan {
    pub(super) id: u64,
    pub(super) channel: Channel,
    pub(super) out: Stream,
    pub(super) err: Stream,
    pub(super) io: ChanIo,
    pub(super) stdin: Stdin,
    /// The last stdin write or EOF returned EAGAIN and may have left its
    /// packet half-sent.
    pub(super) send_pending: bool,
    /// Stop writing stdin as soon as nothing is in flight.
    pub(super) abandon_stdin: bool,
    /// Stdout reached EOF (or reading it stopped) and the reader was told.
    pub(super) stdout_eof: bool,
    /// A message that did not fit into the stdout queue yet.
    pub(super) held: Option<Out>,
    /// The reader is gone: read and drop.
    pub(super) discard: bool,
    pub(super) stderr: Vec<u8>,
    pub(super) killed: bool,
    pub(super) phase: Phase,
    pub(super) exit_sent: bool,
}

/// What a libssh2 call returned, sorted for the reactor.
pub(super) enum Step<T> {
    Done(T),
    Blocked,
    /// This channel is broken (the message says how).
    Failed(String),
    /// The whole session is broken.
    Fatal(String),
}

pub(super) struct Reactor {
    pub(super) sess: Session,
    pub(super) sock: RawFd,
    pub(super) link: Arc<Link>,
    pub(super) cmd_rx: Receiver<Cmd>,
    pub(super) commands_closed: bool,
    pub(super) opening: VecDeque<Box<Pending>>,
    pub(super) chans: Vec<Chan>,
    /// How long a killed command's close may take before `wait` returns.
    pub(super) kill_grace: Duration,
    /// Receive window for new channels.
    pub(super) window: u32,
    /// Read buffer shared by all channels.
    pub(super) scratch: Vec<u8>,
    /// The server refused another channel while this many were open.
    pub(super) open_limit: Option<usize>,
}

impl Reactor {
    pub(super) fn run(mut self) {
        let mut idle_spins = 0u32;
        loop {
            self.link.waker.drain();
            let mut progress = self.take_commands();
            if self.commands_closed && self.opening.is_empty() && self.chans.is_empty() {
                break;
            }
            match self.step_all() {
                Ok(moved) => progress |= moved,
                Err(reason) => return self.die(reason),
            }
            if let Err(reason) = self.keepalive() {
                return self.die(reason);
            }
            if progress {
                idle_spins = 0;
                continue;
            }
            let started = Instant::now();
            if let Err(reason) = self.sleep() {
                return self.die(reason);
            }
            // A safety net against a socket that polls ready while libssh2
            // has nothing to do with it.
            if started.elapsed() < Duration::from_micros(100) {
                idle_spins += 1;
                if idle_spins > 100 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            } else {
                idle_spins = 0;
            }
        }
        self.sess.set_blocking(true);
        self.sess.set_timeout(2000);
        let _ = self.sess.disconnect(None, "resync finished", None);
    }

    pub(super) fn take_commands(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.cmd_rx.try_recv() {
                Ok(Cmd::Exec(pending)) => {
                    self.opening.push_back(pending);
                    any = true;
                }
                Ok(Cmd::Kill(id)) => {
                    any = true;
                    if let Some(chan) = self.chans.iter_mut().find(|c| c.id == id) {
                        chan.kill();
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.commands_closed = true;
                    break;
                }
            }
        }
        any
    }

    /// One pass over the pending opens and every channel. Ok(true) when
    /// anything moved; Err when the session broke.
    pub(super) fn step_all(&mut self) -> Result<bool, String> {
        let mut progress = false;
        while let Some(pending) = self.opening.front_mut() {
            if self.open_limit.is_some_and(|open| self.chans.len() >= open) {
                break;
            }
            self.open_limit = None;
            match open_step(&self.sess, self.window, pending) {
                Step::Blocked => break,
                Step::Failed(msg) if is_session_limit(&msg) && !self.chans.is_empty() => {
                    // The server's MaxSessions: wait until a channel closes.
                    self.open_limit = Some(self.chans.len());
                    break;
                }
                Step::Done(channel) => {
                    progress = true;
                    let Some(pending) = self.opening.pop_front() else {
                        break;
                    };
                    let _ = pending.reply.send(Ok(()));
                    self.chans.push(Chan::new(pending.id, channel, pending.io));
                }
                Step::Failed(msg) => {
                    progress = true;
                    if let Some(pending) = self.opening.pop_front() {
                        let _ = pending.reply.send(Err(Failure::Other(msg)));
                        if let Some(channel) = pending.channel {
                            // Exec was refused on an open channel: close it
                            // properly, never just free it.
                            let mut chan = Chan::new(pending.id, channel, pending.io);
                            chan.exit_sent = true;
                            chan.start_close(None);
                            self.chans.push(chan);
                        }
                    }
                }
                Step::Fatal(msg) => return Err(msg),
            }
        }
        for chan in &mut self.chans {
            progress |= chan.step(&self.sess, self.kill_grace, &mut self.scratch)?;
        }
        self.chans.retain(|c| !matches!(c.phase, Phase::Done));
        Ok(progress)
    }

    /// libssh2 sends a keepalive when its interval has passed. It ignores
    /// EAGAIN from a keepalive but leaves the packet half-sent, stalling every
    /// other send until the next interval, so we only let it try while the
    /// socket's send queue is empty (a busy link needs no keepalive: its own
    /// unacknowledged data trips TCP_USER_TIMEOUT just the same).
    pub(super) fn keepalive(&self) -> Result<(), String> {
        if self.chans.is_empty() && self.opening.is_empty() {
            return Ok(());
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int into `queued`.
        let rc = unsafe { libc::ioctl(self.sock, libc::TIOCOUTQ, &mut queued) };
        if rc != 0 || queued != 0 || outbound(&self.sess) {
            return Ok(());
        }
        match self.sess.keepalive_send() {
            Ok(_) => Ok(()),
            Err(e) => match e.code() {
                ErrorCode::Session(code) if is_fatal(code) => Err(e.message().to_string()),
                _ => Ok(()),
            },
        }
    }

    /// Wait for the socket (in the direction libssh2 needs), the wake-up
    /// pipe, or one second.
    pub(super) fn sleep(&self) -> Result<(), String> {
        let busy = !self.chans.is_empty() || !self.opening.is_empty();
        let mut events: libc::c_short = 0;
        if busy {
            events |= libc::POLLIN;
            if outbound(&self.sess) {
                events |= libc::POLLOUT;
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: self.link.waker.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if busy { self.sock } else { -1 },
                events,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of two pollfd structs.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(format!("poll failed: {e}"));
            }
        }
        Ok(())
    }

    /// The session broke: every waiter learns why, then the thread ends.
    pub(super) fn die(mut self, reason: String) {
        *self.link.dead.locked() = Some(reason.clone());
        let lost = ConnectionLost {
            host: self.link.label.clone(),
            reason,
        };
        for pending in self.opening.drain(..) {
            let _ = pending.reply.send(Err(Failure::Lost(lost.clone())));
        }
        for chan in self.chans.drain(..) {
            let _ = chan
                .io
                .stdout
                .try_send(Out::Failed(Failure::Lost(lost.clone())));
            if !chan.exit_sent {
                let _ = chan.io.exit.send(Err(Failure::Lost(lost.clone())));
            }
        }
    }
}

/// A channel refused because the server allows no more (OpenSSH's
/// MaxSessions, 10 by default, answers "connect failed").
pub(super) fn is_session_limit(message: &str) -> bool {
    [
        "connect failed",
        "administratively prohibited",
        "resource shortage",
    ]
    .iter()
    .any(|reason| message.contains(reason))
}

pub(super) fn outbound(sess: &Session) -> bool {
    matches!(
        sess.block_directions(),
        BlockDirections::Outbound | BlockDirections::Both
    )
}

/// Sort a libssh2 result: EAGAIN is Blocked, session-level codes are Fatal.
pub(super) fn classify<T>(result: Result<T, ssh2::Error>) -> Step<T> {
    match result {
        Ok(v) => Step::Done(v),
        Err(e) => {
            let errno = io::Error::last_os_error().raw_os_error();
            match e.code() {
                ErrorCode::Session(-37) => Step::Blocked,
                ErrorCode::Session(code) if is_fatal(code) => {
                    Step::Fatal(fatal_reason(code, errno, e.message()))
                }
                _ => Step::Failed(e.message().to_string()),
            }
        }
    }
}

/// Same for Stream I/O, whose io::Error has lost the libssh2 code: ask the
/// session for it.
pub(super) fn classify_io<T>(sess: &Session, result: io::Result<T>) -> Step<T> {
    match result {
        Ok(v) => Step::Done(v),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Blocked,
        Err(e) => {
            let errno = io::Error::last_os_error().raw_os_error();
            match ssh2::Error::last_session_error(sess).map(|l| l.code()) {
                Some(ErrorCode::Session(-37)) => Step::Blocked,
                Some(ErrorCode::Session(code)) if is_fatal(code) => {
                    Step::Fatal(fatal_reason(code, errno, &e.to_string()))
                }
                _ => Step::Failed(e.to_string()),
            }
        }
    }
}

/// Words for a session failure. libssh2 only says "transport read"; the
/// socket's errno (still set right after the failed call) says more. A read
/// of 0 bytes (the peer closed) leaves errno as it was, usually EAGAIN.
pub(super) fn fatal_reason(code: libc::c_int, errno: Option<i32>, message: &str) -> String {
    match (code, errno) {
        (-13, _) | (-43, None | Some(0 | libc::EAGAIN)) => {
            "the remote host closed the connection".into()
        }
        (-43 | -7, Some(libc::ETIMEDOUT)) => "no response from the remote host (timed out)".into(),
        (-43 | -7, Some(libc::ECONNRESET | libc::EPIPE)) => "the connection was reset".into(),
        (-43 | -7, Some(libc::EHOSTUNREACH | libc::ENETUNREACH)) => {
            "the remote host became unreachable".into()
        }
        _ => message.to_string(),
    }
}

pub(super) fn open_step(sess: &Session, window: u32, pending: &mut Pending) -> Step<Channel> {
    if pending.channel.is_none() {
        match classify(sess.channel_open("session", window, PACKET, None)) {
            Step::Done(channel) => pending.channel = Some(channel),
            Step::Blocked => return Step::Blocked,
            Step::Failed(msg) => return Step::Failed(format!("cannot open an SSH channel: {msg}")),
            Step::Fatal(msg) => return Step::Fatal(msg),
        }
    }
    let Some(channel) = pending.channel.as_mut() else {
        return Step::Blocked;
    };
    match classify(channel.exec(&pending.command)) {
        Step::Done(()) => match pending.channel.take() {
            Some(channel) => Step::Done(channel),
            None => Step::Blocked,
        },
        Step::Blocked => Step::Blocked,
        Step::Failed(msg) => Step::Failed(format!("the server refused to run the command: {msg}")),
        Step::Fatal(msg) => Step::Fatal(msg),
    }
}

impl Chan {
    pub(super) fn new(id: u64, channel: Channel, io: ChanIo) -> Chan {
        Chan {
            id,
            out: channel.stream(0),
            err: channel.stderr(),
            channel,
            io,
            stdin: Stdin::Open {
                chunk: Vec::new(),
                pos: 0,
            },
            send_pending: false,
            abandon_stdin: false,
            stdout_eof: false,
            held: None,
            discard: false,
            stderr: Vec::new(),
            killed: false,
            phase: Phase::Running,
            exit_sent: false,
        }
    }

    pub(super) fn kill(&mut self) {
        if matches!(self.phase, Phase::Running) {
            self.killed = true;
            self.held = None;
            if !self.stdout_eof {
                self.stdout_eof = true;
                self.give_stdout(Out::Eof);
            }
            self.start_close(None);
        }
    }

    /// Stop reading, stop writing once nothing is in flight, then close.
    pub(super) fn start_close(&mut self, outcome: Option<Result<ExitInfo, Failure>>) {
        self.abandon_stdin = true;
        self.phase = Phase::Closing {
            since: Instant::now(),
            outcome,
        };
    }

    /// Advance this channel as far as it goes without blocking.
    pub(super) fn step(
        &mut self,
        sess: &Session,
        kill_grace: Duration,
        buf: &mut [u8],
    ) -> Result<bool, String> {
        let mut progress = self.pump_stdin(sess)?;
        match self.phase {
            Phase::Running => {
                progress |= self.flush_held();
                progress |= self.pump_stdout(sess, buf)?;
                progress |= self.drain_stderr(sess, buf)?;
                progress |= self.check_remote_close(sess, buf)?;
            }
            Phase::Closing { .. } => {
                progress |= self.drain_stderr(sess, buf)?;
                progress |= self.finish_close(kill_grace)?;
            }
            Phase::Done => {}
        }
        Ok(progress)
    }

    /// Offer the held stdout message again. True when it went out.
    pub(super) fn flush_held(&mut self) -> bool {
        match self.held.take() {
            Some(message) => {
                self.give_stdout(message);
                self.held.is_none()
            }
            None => false,
        }
    }

    /// Put a message on the stdout queue, or hold it if the queue is full.
    pub(super) fn give_stdout(&mut self, message: Out) {
        if self.discard {
            return;
        }
        let flags = &self.io.flags;
        match self.io.stdout.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => {
                flags.stdout_full.store(true, Ordering::SeqCst);
                // The reader may have made room before it saw the flag.
                match self.io.stdout.try_send(message) {
                    Ok(()) => flags.stdout_full.store(false, Ordering::SeqCst),
                    Err(TrySendError::Full(message)) => self.held = Some(message),
                    Err(TrySendError::Disconnected(_)) => self.discard = true,
                }
            }
            Err(TrySendError::Disconnected(_)) => self.discard = true,
        }
    }

    pub(super) fn close_stdin(&mut self) {
        self.stdin = Stdin::Closed;
        self.io.stdin = None;
        self.send_pending = false;
    }

    /// The next chunk from the writer: Some(chunk), or None when there is
    /// none yet (the flag asks the writer to wake us) or stdin is done.
    pub(super) fn next_stdin_chunk(&mut self) -> Option<Vec<u8>> {
        let rx = self.io.stdin.as_ref()?;
        match rx.try_recv() {
            Ok(data) => return Some(data),
            Err(TryRecvError::Disconnected) => {
                self.stdin = Stdin::Eof;
                return None;
            }
            Err(TryRecvError::Empty) => {}
        }
        self.io.flags.stdin_starved.store(true, Ordering::SeqCst);
        match rx.try_recv() {
            Ok(data) => {
                self.io.flags.stdin_starved.store(false, Ordering::SeqCst);
                Some(data)
            }
            Err(TryRecvError::Disconnected) => {
                self.stdin = Stdin::Eof;
                None
            }
            Err(TryRecvError::Empty) => None,
        }
    }

    pub(super) fn pump_stdin(&mut self, sess: &Session) -> Result<bool, String> {
        if self.abandon_stdin && !self.send_pending && !matches!(self.stdin, Stdin::Closed) {
            self.close_stdin();
            return Ok(true);
        }
        let mut progress = false;
        let mut moved = 0usize;
        loop {
            let step = match &mut self.stdin {
                Stdin::Closed => return Ok(progress),
                Stdin::Eof => classify(self.channel.send_eof()).map(|()| usize::MAX),
                Stdin::Open { chunk, pos } => {
                    if *pos == chunk.len() {
                        match self.next_stdin_chunk() {
                            Some(data) => {
                                self.stdin = Stdin::Open {
                                    chunk: data,
                                    pos: 0,
                                };
                            }
                            None => {
                                if matches!(self.stdin, Stdin::Open { .. }) {
                                    return Ok(progress);
                                }
                            }
                        }
                        continue;
                    }
                    if moved >= SLICE {
                        return Ok(progress);
                    }
                    classify_io(sess, self.out.write(&chunk[*pos..]))
                }
            };
            match step {
                Step::Done(usize::MAX) => {
                    // EOF is out.
                    self.close_stdin();
                    return Ok(true);
                }
                Step::Done(0) => {
                    // libssh2 says 0 when the remote window is shut.
                    self.send_pending = false;
                    return Ok(progress);
                }
                Step::Done(n) => {
                    self.send_pending = false;
                    if let Stdin::Open { pos, .. } = &mut self.stdin {
                        *pos += n;
                    }
                    moved += n;
                    progress = true;
                    if self.abandon_stdin {
                        self.close_stdin();
                        return Ok(true);
                    }
                }
                Step::Blocked => {
                    // EAGAIN may leave our packet half-sent (then it must be
                    // retried), or mean the remote window is shut: then the
                    // write never started and may be abandoned.
                    self.send_pending = match self.stdin {
                        Stdin::Eof => true,
                        _ => self.channel.write_window().remaining > 0,
                    };
                    if self.abandon_stdin && !self.send_pending {
                        self.close_stdin();
                        return Ok(true);
                    }
                    return Ok(progress);
                }
                Step::Failed(_) => {
                    // The remote side stopped reading (exited or closed);
                    // the writer learns it on its next send, `wait` why.
                    self.close_stdin();
                    return Ok(true);
                }
                Step::Fatal(msg) => return Err(msg),
            }
        }
    }

    pub(super) fn pump_stdout(&mut self, sess: &Session, buf: &mut [u8]) -> Result<bool, String> {
        let mut progress = false;
        let mut moved = 0usize;
        while !self.stdout_eof && self.held.is_none() && moved < SLICE {
            match classify_io(sess, self.out.read(buf)) {
                Step::Done(0) => {
                    self.stdout_eof = true;
                    self.give_stdout(Out::Eof);
                    progress = true;
                }
                Step::Done(n) => {
                    moved += n;
                    progress = true;
                    self.give_stdout(Out::Data(buf[..n].to_vec()));
                }
                Step::Blocked => break,
                Step::Failed(msg) => {
                    self.stdout_eof = true;
                    let failure = Failure::Other(format!("reading output failed: {msg}"));
                    self.give_stdout(Out::Failed(failure.clone()));
                    self.start_close(Some(Err(failure)));
                    return Ok(true);
                }
                Step::Fatal(msg) => return Err(msg),
            }
        }
        Ok(progress)
    }

    /// `buf` is the same size as for stdout: see the note on `Chan`.
    pub(super) fn drain_stderr(&mut self, sess: &Session, buf: &mut [u8]) -> Result<bool, String> {
        let mut progress = false;
        loop {
            match classify_io(sess, self.err.read(buf)) {
                Step::Done(0) | Step::Blocked | Step::Failed(_) => return Ok(progress),
                Step::Done(n) => {
                    push_capped(&mut self.stderr, &buf[..n]);
                    progress = true;
                }
                Step::Fatal(msg) => return Err(msg),
            }
        }
    }

    /// After stdout's EOF, wait for the server to close the channel (it does
    /// so once the command has exited), then collect the exit status.
    pub(super) fn check_remote_close(
        &mut self,
        sess: &Session,
        buf: &mut [u8],
    ) -> Result<bool, String> {
        if !self.stdout_eof || self.held.is_some() {
            return Ok(false);
        }
        match classify(self.channel.wait_close()) {
            Step::Done(()) => {
                self.drain_stderr(sess, buf)?;
                let status = self.exit_status();
                let stderr = String::from_utf8_lossy(&self.stderr).into_owned();
                self.start_close(Some(Ok(ExitInfo { status, stderr })));
                Ok(true)
            }
            Step::Blocked => Ok(false),
            Step::Failed(msg) => {
                self.start_close(Some(Err(Failure::Other(msg))));
                Ok(true)
            }
            Step::Fatal(msg) => Err(msg),
        }
    }

    pub(super) fn exit_status(&self) -> i32 {
        let signal = self
            .channel
            .exit_signal()
            .ok()
            .and_then(|s| s.exit_signal)
            .map(|name| signal_number(&name));
        match signal {
            Some(Some(number)) => signal_status(number),
            Some(None) => -1,
            None if self.killed => signal_status(libc::SIGKILL),
            None => self.channel.exit_status().unwrap_or(-1),
        }
    }

    /// Send our close once stdin is settled; done when the server's close
    /// has arrived too.
    pub(super) fn finish_close(&mut self, kill_grace: Duration) -> Result<bool, String> {
        let Phase::Closing { since, outcome } = &mut self.phase else {
            return Ok(false);
        };
        let since = *since;
        if !matches!(self.stdin, Stdin::Closed) {
            return Ok(false);
        }
        match classify(self.channel.close()) {
            Step::Blocked => {
                if self.killed && !self.exit_sent && since.elapsed() > kill_grace {
                    let outcome = outcome.take();
                    self.send_exit(outcome);
                    return Ok(true);
                }
                Ok(false)
            }
            Step::Done(()) | Step::Failed(_) => {
                let outcome = outcome.take();
                self.send_exit(outcome);
                self.phase = Phase::Done;
                Ok(true)
            }
            Step::Fatal(msg) => Err(msg),
        }
    }

    pub(super) fn send_exit(&mut self, outcome: Option<Result<ExitInfo, Failure>>) {
        if self.exit_sent {
            return;
        }
        self.exit_sent = true;
        let outcome = outcome.unwrap_or_else(|| {
            Ok(ExitInfo {
                status: self.exit_status(),
                stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            })
        });
        if !self.stdout_eof {
            self.stdout_eof = true;
            self.held = None;
            self.give_stdout(Out::Eof);
        }
        let _ = self.io.exit.send(outcome);
    }
}

impl<T> Step<T> {
    pub(super) fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Done(v) => Step::Done(f(v)),
            Step::Blocked => Step::Blocked,
            Step::Failed(m) => Step::Failed(m),
            Step::Fatal(m) => Step::Fatal(m),
        }
    }
}

pub(super) fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim_start_matches("SIG");
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "ABRT" => libc::SIGABRT,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "SEGV" => libc::SIGSEGV,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_map_to_numbers() {
        assert_eq!(signal_number("PIPE"), Some(13));
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("WINCH"), None);
    }
}
