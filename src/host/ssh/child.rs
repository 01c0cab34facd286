//! The caller's side of a remote command: the handles other threads own
//! (the child, its stdout reader and stdin writer), what they share with the
//! reactor (the command queue, the wake-up pipe, the reason the session
//! died) and how a failure crosses from the reactor to them (as
//! [`ConnectionLost`] when the session broke). No libssh2 call happens here.

use super::reactor::{Cmd, CHUNK};
use crate::host::{Child, ConnectionLost, ExitInfo};
use crate::sys::Unpoisoned;
use anyhow::{anyhow, Context};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

/// What every handle of one session shares with the reactor.
pub(super) struct Link {
    pub(super) label: String,
    pub(super) waker: Waker,
    /// Why the session died, once it has.
    pub(super) dead: Mutex<Option<String>>,
}

impl Link {
    pub(super) fn lost(&self) -> ConnectionLost {
        let reason = self
            .dead
            .locked()
            .clone()
            .unwrap_or_else(|| "the SSH session ended".into());
        ConnectionLost {
            host: self.label.clone(),
            reason,
        }
    }
}

/// The command queue into the reactor; when the last holder (the host and
/// its children) drops it, the reactor finishes its channels and ends.
pub(super) struct Shared {
    pub(super) link: Arc<Link>,
    pub(super) cmd_tx: Mutex<Option<Sender<Cmd>>>,
}

impl Shared {
    pub(super) fn send(&self, cmd: Cmd) -> anyhow::Result<()> {
        let sent = self
            .cmd_tx
            .locked()
            .as_ref()
            .is_some_and(|tx| tx.send(cmd).is_ok());
        if !sent {
            return Err(self.link.lost().into());
        }
        self.link.waker.wake();
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.cmd_tx.locked().take();
        self.link.waker.wake();
    }
}

/// A self-pipe that interrupts the reactor's poll; writes are coalesced.
pub(super) struct Waker {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
    pub(super) pending: AtomicBool,
}

impl Waker {
    pub(super) fn new() -> anyhow::Result<Waker> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("cannot create a pipe");
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Waker {
            read,
            write,
            pending: AtomicBool::new(false),
        })
    }

    pub(super) fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // SAFETY: writes one byte from a live buffer to our pipe. A full
            // pipe (EAGAIN) already guarantees a wake-up.
            unsafe { libc::write(self.write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Called by the reactor before it looks at its work.
    pub(super) fn drain(&self) {
        self.pending.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live local buffer of the given size.
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
        }
    }
}

/// Hand-shake flags between the reactor and one child's stdout/stdin: the
/// reactor sets one when it has to wait for the handle, the handle clears it
/// and wakes the reactor.
#[derive(Default)]
pub(super) struct Flags {
    /// The stdout queue was full.
    pub(super) stdout_full: AtomicBool,
    /// The stdin queue was empty.
    pub(super) stdin_starved: AtomicBool,
}

/// Why a channel or the session failed, as it crosses threads.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    Lost(ConnectionLost),
    Other(String),
}

impl Failure {
    pub(super) fn into_anyhow(self) -> anyhow::Error {
        match self {
            Failure::Lost(lost) => lost.into(),
            Failure::Other(msg) => anyhow!(msg),
        }
    }

    pub(super) fn into_io(self) -> io::Error {
        match self {
            Failure::Lost(lost) => io::Error::new(io::ErrorKind::ConnectionAborted, lost),
            Failure::Other(msg) => io::Error::other(msg),
        }
    }
}

pub(super) fn io_to_anyhow(e: io::Error, link: &Link) -> anyhow::Error {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<ConnectionLost>())
    {
        anyhow::Error::new(e)
    } else if e.kind() == io::ErrorKind::ConnectionAborted {
        link.lost().into()
    } else {
        anyhow::Error::new(e)
    }
}

/// A message on a child's stdout queue.
pub(super) enum Out {
    Data(Vec<u8>),
    Eof,
    Failed(Failure),
}

pub(super) struct SshChild {
    pub(super) id: u64,
    pub(super) shared: Arc<Shared>,
    pub(super) stdout: Option<SshStdout>,
    pub(super) stdin: Option<SshStdin>,
    pub(super) exit_rx: Receiver<Result<ExitInfo, Failure>>,
}

impl Child for SshChild {
    fn take_stdout(&mut self) -> Option<Box<dyn Read + Send>> {
        self.stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>)
    }

    fn take_stdin(&mut self) -> Option<Box<dyn Write + Send>> {
        self.stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>)
    }

    fn wait(mut self: Box<Self>) -> anyhow::Result<ExitInfo> {
        drop(self.stdin.take());
        drop(self.stdout.take());
        match self.exit_rx.recv() {
            Ok(Ok(info)) => Ok(info),
            Ok(Err(failure)) => Err(failure.into_anyhow()),
            Err(_) => Err(self.shared.link.lost().into()),
        }
    }

    fn kill(&mut self) {
        let _ = self.shared.send(Cmd::Kill(self.id));
    }
}

/// A remote command's stdout, readable from any thread.
pub(super) struct SshStdout {
    pub(super) rx: Receiver<Out>,
    pub(super) chunk: Vec<u8>,
    pub(super) pos: usize,
    pub(super) done: bool,
    pub(super) flags: Arc<Flags>,
    pub(super) link: Arc<Link>,
}

impl Read for SshStdout {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            let message = self.rx.recv();
            if self.flags.stdout_full.swap(false, Ordering::SeqCst) {
                self.link.waker.wake();
            }
            match message {
                Ok(Out::Data(data)) => {
                    self.chunk = data;
                    self.pos = 0;
                }
                Ok(Out::Eof) => self.done = true,
                Ok(Out::Failed(failure)) => {
                    self.done = true;
                    return Err(failure.into_io());
                }
                Err(_) => {
                    self.done = true;
                    return Err(Failure::Lost(self.link.lost()).into_io());
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for SshStdout {
    fn drop(&mut self) {
        // The reactor may be waiting for room that will now never come.
        self.link.waker.wake();
    }
}

/// A remote command's stdin, writable from any thread. Writes are gathered
/// into 64 KiB messages; `flush` or drop sends the rest, drop then sends EOF.
pub(super) struct SshStdin {
    pub(super) tx: Option<SyncSender<Vec<u8>>>,
    pub(super) buf: Vec<u8>,
    pub(super) flags: Arc<Flags>,
    pub(super) link: Arc<Link>,
}

impl SshStdin {
    pub(super) fn push(&mut self, data: Vec<u8>) -> io::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(self.closed());
        };
        if tx.send(data).is_err() {
            self.tx = None;
            return Err(self.closed());
        }
        if self.flags.stdin_starved.swap(false, Ordering::SeqCst) {
            self.link.waker.wake();
        }
        Ok(())
    }

    pub(super) fn closed(&self) -> io::Error {
        if self.link.dead.locked().is_some() {
            return Failure::Lost(self.link.lost()).into_io();
        }
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            format!(
                "the remote command on {} no longer reads its input",
                self.link.label
            ),
        )
    }
}

impl Write for SshStdin {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= CHUNK {
            let n = data.len().min(2 * CHUNK);
            self.push(data[..n].to_vec())?;
            return Ok(n);
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.push(full)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let rest = std::mem::take(&mut self.buf);
        self.push(rest)
    }
}

impl Drop for SshStdin {
    fn drop(&mut self) {
        let _ = self.flush();
        self.tx = None;
        self.link.waker.wake();
    }
}
