//! Side effects on a machine. A [`Host`] runs an argv on this machine
//! ([`local::LocalHost`]) or on a remote one over one SSH session
//! ([`ssh::SshHost`]), either to completion ([`Host::run`]) or as a streaming
//! child ([`Host::spawn`]) whose stdout and stdin can be handed to other
//! threads. Nothing above this module knows how a command reaches its host.
//! [`reconnect::Reconnecting`] replaces a lost connection for everyone who
//! uses it, and [`deploy`] puts our own binary on a remote host.

pub mod batch;
pub mod deploy;
pub mod local;
pub mod quote;
pub mod reconnect;
pub mod ssh;

// Re-exported for the modules that will use hosts (unused until main calls them).
#[allow(unused_imports)]
pub use local::LocalHost;
#[allow(unused_imports)]
pub use quote::{sh_join, sh_quote};
#[allow(unused_imports)]
pub use reconnect::{Backoff, Reconnecting};
#[allow(unused_imports)]
pub use ssh::{SshHost, SshOptions, SshSpec};

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use crate::sys::Unpoisoned;

/// A machine that runs commands.
pub trait Host: Send + Sync {
    /// "local", or "user@host" (with ":port" when not 22), for messages.
    fn label(&self) -> &str;

    /// Run argv to completion with stdin empty, capturing stdout and stderr.
    /// Err only for transport problems (could not start, connection lost);
    /// a non-zero exit is `Ok(CmdOutput { status != 0 })`.
    fn run(&self, argv: &[String]) -> anyhow::Result<CmdOutput>;

    /// Start argv with piped stdin and stdout. Stderr is collected in the
    /// background and returned by [`Child::wait`].
    fn spawn(&self, argv: &[String]) -> anyhow::Result<Box<dyn Child>>;

    /// Another way to reach this host that carries bulk data (the two ends
    /// of a stream) more cheaply: `None` when there is none to try, `Err`
    /// saying why the one there is could not be used (`--debug`).
    fn bulk(&self) -> Option<Result<std::sync::Arc<dyn Host>, String>> {
        None
    }
}

/// What a finished command printed, and how it ended. `status` is the exit
/// code, `128 + signal` when a signal ended it, or -1 when unknown.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// The stdout of a successful command, or an error
    /// "{what} failed on {host} (exit N): {last lines of stderr}".
    pub fn check(self, what: &str, host: &str) -> anyhow::Result<String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(failure(what, host, self.status, &self.stderr))
        }
    }
}

/// A running command. Its stdout and stdin may be taken and moved to other
/// threads; `wait` collects the exit status and stderr afterwards. A stdout
/// that was never taken is read and discarded, so a chatty child cannot block.
/// Dropping a `Child` without `wait` does not kill it.
pub trait Child: Send {
    /// The process's stdout (once).
    fn take_stdout(&mut self) -> Option<Box<dyn std::io::Read + Send>>;
    /// The process's stdin (once); dropping it sends EOF. Writes may be
    /// buffered until `flush` or drop.
    fn take_stdin(&mut self) -> Option<Box<dyn std::io::Write + Send>>;
    /// Wait for the exit, after stdin was closed and/or stdout drained.
    /// Closes stdin if it was never taken.
    fn wait(self: Box<Self>) -> anyhow::Result<ExitInfo>;
    /// Best effort: SIGKILL locally. Over SSH the channel is closed: the
    /// command gets EOF on stdin and SIGPIPE on output, and `wait` returns
    /// within a few seconds even if the command ignores both.
    fn kill(&mut self);
}

/// How a spawned command ended (`status` as in [`CmdOutput`]).
#[derive(Debug, Clone)]
pub struct ExitInfo {
    pub status: i32,
    pub stderr: String,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// Ok for a zero exit, else the same error as [`CmdOutput::check`].
    pub fn check(&self, what: &str, host: &str) -> anyhow::Result<()> {
        if self.success() {
            Ok(())
        } else {
            Err(failure(what, host, self.status, &self.stderr))
        }
    }
}

/// The SSH connection to a host broke (or was found broken): retrying on a
/// fresh connection can help. Sits in the error chain, so callers test with
/// [`is_connection_lost`].
#[derive(Debug, Clone)]
pub struct ConnectionLost {
    pub host: String,
    pub reason: String,
}

impl fmt::Display for ConnectionLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the connection to {} was lost: {}",
            self.host, self.reason
        )
    }
}

impl std::error::Error for ConnectionLost {}

/// True when `err` (or anything in its chain, including an `io::Error` from a
/// child's stdout or stdin) is a [`ConnectionLost`].
pub fn is_connection_lost(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.is::<ConnectionLost>()
            || e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<ConnectionLost>())
    })
}

/// At most this much stderr is kept per command (the tail).
pub(crate) const STDERR_CAP: usize = 1 << 20;

/// Append to a stderr buffer, keeping only its last [`STDERR_CAP`] bytes.
pub(crate) fn push_capped(buf: &mut Vec<u8>, data: &[u8]) {
    buf.extend_from_slice(data);
    if buf.len() > STDERR_CAP {
        let cut = buf.len() - STDERR_CAP;
        buf.drain(..cut);
    }
}

fn failure(what: &str, host: &str, status: i32, stderr: &str) -> anyhow::Error {
    let tail = last_lines(stderr, 5);
    if tail.is_empty() {
        anyhow::anyhow!("{what} failed on {host} (exit {status})")
    } else {
        anyhow::anyhow!("{what} failed on {host} (exit {status}): {tail}")
    }
}

/// The last `n` non-blank lines of `text`, trimmed, joined with "; " when
/// there are several. Long output is cut from the front.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("; ")
}

/// Exit code for a status that may have ended by signal.
/// [`last_lines`] for a message that needs something to show.
pub(crate) fn stderr_tail(text: &str) -> String {
    let tail = last_lines(text, 3);
    if tail.is_empty() {
        "(no error output)".into()
    } else {
        tail
    }
}

pub(crate) fn signal_status(signal: i32) -> i32 {
    128 + signal
}

/// Commands started per host label since this process began (every
/// [`Host::run`] and [`Host::spawn`]): how a run's cost in round trips is
/// measured and reported with `--debug`.
static STARTED: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts one command started on the host labelled `label`.
pub(crate) fn count_started(label: &str) {
    let mut started = STARTED.locked();
    *started.entry(label.to_string()).or_default() += 1;
}

/// How many commands each host has been asked to run so far, by label.
pub fn started_commands() -> Vec<(String, u64)> {
    let started = STARTED.locked();
    started.iter().map(|(l, n)| (l.clone(), *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(status: i32, stderr: &str) -> CmdOutput {
        CmdOutput {
            status,
            stdout: "data\n".into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn check_returns_stdout_on_success() {
        assert_eq!(
            out(0, "noise").check("zfs list", "local").unwrap(),
            "data\n"
        );
    }

    #[test]
    fn check_names_command_host_status_and_stderr_tail() {
        let err = out(
            1,
            "  \nline1\nline2\n\ncannot open 'tank/x': dataset does not exist\n",
        )
        .check("zfs list", "root@nas")
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "zfs list failed on root@nas (exit 1): line1; line2; \
             cannot open 'tank/x': dataset does not exist"
        );
    }

    #[test]
    fn check_without_stderr_has_no_colon() {
        let err = out(2, "\n").check("zfs send", "local").unwrap_err();
        assert_eq!(err.to_string(), "zfs send failed on local (exit 2)");
    }

    #[test]
    fn check_keeps_only_last_five_lines() {
        let err = out(1, "1\n2\n3\n4\n5\n6\n7\n").check("x", "h").unwrap_err();
        assert_eq!(err.to_string(), "x failed on h (exit 1): 3; 4; 5; 6; 7");
    }

    #[test]
    fn connection_lost_is_found_in_chains_and_io_errors() {
        let lost = ConnectionLost {
            host: "root@nas".into(),
            reason: "timed out".into(),
        };
        let direct = anyhow::Error::new(lost.clone()).context("zfs send on root@nas");
        assert!(is_connection_lost(&direct));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, lost);
        let wrapped = anyhow::Error::new(io).context("copying stream");
        assert!(is_connection_lost(&wrapped));
        assert!(!is_connection_lost(&anyhow::anyhow!("other")));
    }

    #[test]
    fn push_capped_keeps_the_tail() {
        let mut buf = vec![b'a'; STDERR_CAP];
        push_capped(&mut buf, b"xyz");
        assert_eq!(buf.len(), STDERR_CAP);
        assert!(buf.ends_with(b"axyz"));
    }
}
