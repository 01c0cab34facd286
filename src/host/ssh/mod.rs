//! A remote machine over one SSH session (ssh2/libssh2) for the whole run.
//!
//! Connecting behaves the way OpenSSH users expect: `~/.ssh/config` supplies
//! HostName, User, Port and IdentityFile; keys come from ssh-agent, then
//! `--sshkey`, then the config, then `~/.ssh/id_{ed25519,ecdsa,rsa}`; the host
//! key is checked against known_hosts (unknown: refuse, or append with
//! `--accept-new-host-key`; changed: always refuse).
//!
//! After login the session belongs to one reactor thread, the only code that
//! touches libssh2. libssh2 is not safe to drive from several threads at once
//! (a blocking read holds the session while it waits, and a half-sent packet
//! must be finished by the call that started it), so the reactor runs the
//! session non-blocking and moves bytes between the SSH channels and plain
//! in-process channels: a child's stdout reader and stdin writer are ordinary
//! `Send` objects that other threads own, and `wait` receives the exit status
//! and stderr from the reactor. The reactor sleeps in `poll` on the socket and
//! a wake-up pipe that the handles write to when they need it.
//!
//! Liveness: TCP keepalive plus `TCP_USER_TIMEOUT = io_timeout` on the socket
//! and SSH keepalives (every io_timeout/4, at least 2 s) while channels are
//! open, so a cut link turns into an error within about io_timeout plus one
//! keepalive interval (the kernel gives up on unacknowledged data), while a
//! command that is silent for hours (a `zfs receive` finishing) is never cut
//! short: there is no per-call timeout. A broken session fails every open
//! channel and every later call with [`ConnectionLost`]; reconnecting is the
//! caller's move (a new `SshHost::connect`, see `host::reconnect`).
//!
//! Throughput: ChaCha20-Poly1305 first (libssh2's AES-GCM is much slower),
//! 32 KiB packets, a receive window sized to the round-trip time, and a
//! socket send buffer as large as the system allows when that is more than
//! TCP's autotuning would reach (see [`send_buffer_request`]: one TCP
//! connection carries every channel, and at 50 ms RTT the autotuned 4 MiB
//! caps a push at about 53 MB/s, an 8 MiB buffer at about 100). When
//! the server refuses another channel (MaxSessions), the open waits for one
//! of ours to close instead of failing.
//!
//! Where it lives: `connect.rs` (TCP, socket tuning, handshake), `auth.rs`
//! (ssh config, host key check, login) over the pure parsers `sshconfig.rs`
//! and `knownhosts.rs`, `reactor.rs` (the session thread) and `child.rs`
//! (the handles the caller's threads own). This file holds the public face:
//! [`SshSpec`], [`SshOptions`] and [`SshHost`].
//!
//! Not supported: ProxyJump/ProxyCommand (ignored with a warning), Match
//! criteria other than `all`, `host`, `originalhost`, IdentitiesOnly,
//! passphrase-protected key files (use ssh-agent), password login.

mod auth;
mod child;
mod connect;
pub mod knownhosts;
pub mod openssh;
mod reactor;
pub mod sshconfig;

use self::auth::{KnownHostsSet, Target};
use self::child::{io_to_anyhow, Flags, Shared, SshChild, SshStdin, SshStdout};
pub use self::openssh::DataPath;
use self::openssh::OpenSsh;
use self::reactor::{ChanIo, Cmd, Pending, QUEUE};
use super::{quote, Child, CmdOutput, Host};
use anyhow::{bail, Context};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

/// `user@host` from the command line (user optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSpec {
    pub user: Option<String>,
    pub host: String,
}

impl SshSpec {
    /// "user@host" or "host".
    #[cfg(test)]
    pub fn parse(text: &str) -> SshSpec {
        match text.rsplit_once('@') {
            Some((user, host)) if !user.is_empty() => SshSpec {
                user: Some(user.to_string()),
                host: host.to_string(),
            },
            _ => SshSpec {
                user: None,
                host: text.trim_start_matches('@').to_string(),
            },
        }
    }
}

/// How to connect; the command line fills this in.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// `--sshport`, overrides the config's Port.
    pub port: Option<u16>,
    /// `--sshkey`, tried after ssh-agent and before the config's keys.
    pub key: Option<PathBuf>,
    pub accept_new_host_key: bool,
    /// TCP connect, and each step of handshake and login.
    pub connect_timeout: Duration,
    /// How long the link may stay silent (unacknowledged) before the
    /// connection counts as lost.
    pub io_timeout: Duration,
    /// `$HOME`, where `.ssh/` lives.
    pub home: PathBuf,
    /// `--ssh-data`: what carries the streams of default mode.
    pub data_path: DataPath,
    /// `--sshconfig`, `--sshcipher` and `--sshoption`.
    pub overrides: SshOverrides,
}

/// What syncoid's `--sshconfig`, `--sshcipher` and `--sshoption` ask for
/// (checked in `cli.rs`; the options that only tune timeouts or host key
/// acceptance are folded into [`SshOptions`]' own fields there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SshOverrides {
    /// `--sshconfig=FILE`: read this instead of `~/.ssh/config` (ssh -F).
    pub config_file: Option<PathBuf>,
    /// `--sshoption` lines in ssh_config syntax (`Port 2222`), read before
    /// the config file, so they win as on ssh's command line.
    pub config_lines: Vec<String>,
    /// `--sshcipher`: the cipher list to offer, instead of ours.
    pub ciphers: Option<String>,
    /// `-o IdentitiesOnly=yes`: don't use ssh-agent's keys.
    pub identities_only: bool,
}

impl SshOptions {
    #[cfg(test)]
    /// Defaults: no port or key override, refuse unknown host keys, 15 s to
    /// connect, 30 s of silence before a connection counts as lost.
    pub fn with_home(home: PathBuf) -> SshOptions {
        SshOptions {
            port: None,
            key: None,
            accept_new_host_key: false,
            connect_timeout: Duration::from_secs(15),
            io_timeout: Duration::from_secs(30),
            home,
            data_path: DataPath::Auto,
            overrides: SshOverrides::default(),
        }
    }
}

/// The host name and port `spec` connects to after `~/.ssh/config`
/// (HostName, Port) and the command line are merged: what names the machine
/// however it was spelled (a user, an alias), without connecting.
pub fn resolve_address(spec: &SshSpec, opts: &SshOptions) -> anyhow::Result<(String, u16)> {
    let target = Target::resolve_with(spec, opts, false)?;
    Ok((target.hostname, target.port))
}

/// The user `spec` logs in as after `~/.ssh/config` (User) and the local
/// user name, without connecting.
pub fn resolve_user(spec: &SshSpec, opts: &SshOptions) -> anyhow::Result<String> {
    Ok(Target::resolve_with(spec, opts, false)?.user)
}

/// A connected remote host. Cheap to share (`&SshHost` across threads); the
/// session closes when the host and all its children are dropped.
pub struct SshHost {
    label: String,
    shared: Arc<Shared>,
    /// What `bulk` needs to start OpenSSH's master connection.
    target: Target,
    opts: SshOptions,
    openssh: OnceLock<Result<Arc<dyn Host>, String>>,
}

impl SshHost {
    pub fn connect(spec: &SshSpec, opts: &SshOptions) -> anyhow::Result<SshHost> {
        let target = Target::resolve(spec, opts)?;
        let label = target.label();
        let known_hosts = KnownHostsSet::load(&target);
        let (sess, fd) = connect::handshake(&target, opts, &known_hosts.types_for(&target))?;
        auth::verify_host_key(&sess, &target, &known_hosts, opts)?;
        auth::authenticate(&sess, &target, opts)?;
        let shared = reactor::start(sess, fd, &label, opts.io_timeout)?;
        Ok(SshHost {
            label,
            shared,
            target,
            opts: opts.clone(),
            openssh: OnceLock::new(),
        })
    }
}

impl Host for SshHost {
    fn label(&self) -> &str {
        &self.label
    }

    fn bulk(&self) -> Option<Result<Arc<dyn Host>, String>> {
        if self.opts.data_path == DataPath::Libssh2 {
            return None;
        }
        let started = self.openssh.get_or_init(|| {
            OpenSsh::start(&self.label, &self.target, &self.opts)
                .map(|o| Arc::new(o) as Arc<dyn Host>)
        });
        Some(started.clone())
    }

    fn run(&self, argv: &[String]) -> anyhow::Result<CmdOutput> {
        let mut child = self.spawn(argv)?;
        drop(child.take_stdin());
        let mut stdout = Vec::new();
        if let Some(mut out) = child.take_stdout() {
            out.read_to_end(&mut stdout)
                .map_err(|e| io_to_anyhow(e, &self.shared.link))
                .with_context(|| format!("reading the output of {} on {}", argv[0], self.label))?;
        }
        let exit = child.wait()?;
        Ok(CmdOutput {
            status: exit.status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: exit.stderr,
        })
    }

    fn spawn(&self, argv: &[String]) -> anyhow::Result<Box<dyn Child>> {
        if argv.is_empty() {
            bail!("empty command line for {}", self.label);
        }
        super::count_started(&self.label);
        let link = &self.shared.link;
        let (stdout_tx, stdout_rx) = mpsc::sync_channel(QUEUE);
        let (stdin_tx, stdin_rx) = mpsc::sync_channel(QUEUE);
        let (exit_tx, exit_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let flags = Arc::new(Flags::default());
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let cmd = Cmd::Exec(Box::new(Pending {
            id,
            command: quote::sh_join(argv),
            io: ChanIo {
                stdout: stdout_tx,
                stdin: Some(stdin_rx),
                exit: exit_tx,
                flags: flags.clone(),
            },
            reply: reply_tx,
            channel: None,
        }));
        self.shared.send(cmd)?;
        match reply_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => {
                return Err(failure.into_anyhow())
                    .with_context(|| format!("cannot start {} on {}", argv[0], self.label))
            }
            Err(_) => return Err(link.lost().into()),
        }
        Ok(Box::new(SshChild {
            id,
            shared: self.shared.clone(),
            stdout: Some(SshStdout {
                rx: stdout_rx,
                chunk: Vec::new(),
                pos: 0,
                done: false,
                flags: flags.clone(),
                link: link.clone(),
            }),
            stdin: Some(SshStdin {
                tx: Some(stdin_tx),
                buf: Vec::new(),
                flags,
                link: link.clone(),
            }),
            exit_rx,
        }))
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[cfg(test)]
mod tests;
