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
//! caller's move (a new `SshHost::connect`).
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
//! Not supported: ProxyJump/ProxyCommand (ignored with a warning), Match
//! criteria other than `all`, `host`, `originalhost`, IdentitiesOnly,
//! passphrase-protected key files (use ssh-agent), password login.

use super::knownhosts::{self, HostKeyVerdict, KnownHostsFile};
use super::sshconfig::{ExpandContext, SshConfig};
use super::{push_capped, quote, signal_status, Child, CmdOutput, ConnectionLost, ExitInfo, Host};
use anyhow::{anyhow, bail, Context};
use ssh2::{BlockDirections, Channel, ErrorCode, MethodType, Session, Stream};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ciphers, fastest first in libssh2: it encrypts AES-GCM 16 bytes per call
/// (~45% of OpenSSH's speed), ChaCha20-Poly1305 in whole packets.
const CIPHERS: &str =
    "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";
/// Host key algorithms in OpenSSH's default order (libssh2's own order puts
/// ECDSA first, which would not match the ED25519 key OpenSSH recorded).
const HOST_KEY_ALGORITHMS: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
];
/// Our receive window per channel is sized to the link: libssh2's 2 MiB
/// default on a LAN (a bigger window makes the server buffer more and costs
/// CPU: on loopback 16 MiB read 235 MB/s against 375 MB/s), growing with
/// the round-trip time up to 16 MiB, which doubles single-stream reads at
/// 50 ms RTT (64 MiB was worse).
const MIN_WINDOW: u32 = 2 << 20;
const MAX_WINDOW: u32 = 16 << 20;
/// The rate a window should sustain, in bytes per microsecond of RTT
/// (320 MB/s).
const WINDOW_RATE: u64 = 320;
/// Longest `wait` after `kill`. Closing the channel ends a command that reads
/// its stdin (EOF) or writes output (SIGPIPE) at once, but OpenSSH keeps the
/// channel until the command exits, and libssh2 cannot send a signal request
/// through the ssh2 crate; an idle command runs on remotely after this.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Largest packet we accept (libssh2 rejects anything above 32 KiB).
const PACKET: u32 = 32768;
/// Bytes per message between the reactor and a stdout reader / stdin writer.
const CHUNK: usize = 64 << 10;
/// Chunks buffered per direction between the reactor and a handle.
const QUEUE: usize = 32;
/// Most bytes moved per channel and direction before the reactor looks at
/// the other channels.
const SLICE: usize = 4 << 20;

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
        }
    }
}

/// A connected remote host. Cheap to share (`&SshHost` across threads); the
/// session closes when the host and all its children are dropped.
pub struct SshHost {
    label: String,
    shared: Arc<Shared>,
}

impl SshHost {
    pub fn connect(spec: &SshSpec, opts: &SshOptions) -> anyhow::Result<SshHost> {
        let target = Target::resolve(spec, opts)?;
        let label = target.label();
        let tcp = connect_tcp(&target.hostname, target.port, opts.connect_timeout)?;
        tune_socket(&tcp, opts.io_timeout)
            .with_context(|| format!("cannot set socket options for {label}"))?;
        let fd = tcp.as_raw_fd();

        let known_hosts = KnownHostsSet::load(&opts.home);
        let mut sess = Session::new().context("cannot create an SSH session")?;
        sess.set_tcp_stream(tcp);
        sess.set_timeout(millis(opts.connect_timeout));
        sess.method_pref(MethodType::CryptCs, CIPHERS)
            .and_then(|()| sess.method_pref(MethodType::CryptSc, CIPHERS))
            .context("libssh2 supports none of our ciphers")?;
        let host_key_prefs = host_key_preference(&known_hosts.types_for(&target));
        sess.method_pref(MethodType::HostKey, &host_key_prefs)
            .context("libssh2 supports none of our host key algorithms")?;
        sess.handshake().map_err(|e| {
            anyhow!(
                "SSH handshake with {}:{} failed: {}",
                target.hostname,
                target.port,
                e.message()
            )
        })?;
        verify_host_key(&sess, &target, &known_hosts, opts)?;
        authenticate(&sess, &target, opts)?;

        let interval = (opts.io_timeout.as_secs() / 4).clamp(2, 15) as u32;
        sess.set_keepalive(false, interval);
        sess.set_blocking(false);

        let link = Arc::new(Link {
            label: label.clone(),
            waker: Waker::new()?,
            dead: Mutex::new(None),
        });
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let reactor = Reactor {
            sess,
            sock: fd,
            link: link.clone(),
            cmd_rx,
            commands_closed: false,
            opening: VecDeque::new(),
            chans: Vec::new(),
            kill_grace: opts.io_timeout.min(KILL_GRACE),
            window: window_for(round_trip_time(fd)),
            scratch: vec![0; CHUNK],
            open_limit: None,
        };
        std::thread::Builder::new()
            .name(format!("ssh {label}"))
            .spawn(move || reactor.run())
            .context("cannot start the SSH session thread")?;
        Ok(SshHost {
            label,
            shared: Arc::new(Shared {
                link,
                cmd_tx: Mutex::new(Some(cmd_tx)),
            }),
        })
    }
}

impl Host for SshHost {
    fn label(&self) -> &str {
        &self.label
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

// ---------------------------------------------------------------------------
// Connecting

/// Where and as whom to connect, after config and command line are merged.
struct Target {
    /// As typed (an alias, maybe).
    alias: String,
    /// The real host (HostName), used for TCP and known_hosts.
    hostname: String,
    port: u16,
    user: String,
    identity_files: Vec<PathBuf>,
}

impl Target {
    fn resolve(spec: &SshSpec, opts: &SshOptions) -> anyhow::Result<Target> {
        let local_user = local_user_name()?;
        let ssh_dir = opts.home.join(".ssh");
        let config_path = ssh_dir.join("config");
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => SshConfig::parse(
                &text,
                &config_path.display().to_string(),
                &ssh_dir,
                &opts.home,
                &|p| std::fs::read_to_string(p).ok(),
                &list_dir,
            )?,
            Err(_) => SshConfig::default(),
        };
        for ignored in config.ignored_for(&spec.host) {
            eprintln!("resync: ignoring {ignored} (not supported); connecting directly");
        }
        let resolved = config.resolve(
            &spec.host,
            &ExpandContext {
                home: &opts.home,
                local_user: &local_user,
                remote_user: spec.user.as_deref(),
            },
        );
        Ok(Target {
            alias: spec.host.clone(),
            hostname: resolved.hostname.unwrap_or_else(|| spec.host.clone()),
            port: opts.port.or(resolved.port).unwrap_or(22),
            user: spec.user.clone().or(resolved.user).unwrap_or(local_user),
            identity_files: resolved.identity_files,
        })
    }

    fn label(&self) -> String {
        if self.port == 22 {
            format!("{}@{}", self.user, self.alias)
        } else {
            format!("{}@{}:{}", self.user, self.alias, self.port)
        }
    }

    /// The ssh command that would accept this host's key.
    fn ssh_command(&self) -> String {
        if self.port == 22 {
            format!("ssh {}@{}", self.user, self.alias)
        } else {
            format!("ssh -p {} {}@{}", self.port, self.user, self.alias)
        }
    }
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// $USER, else $LOGNAME, else our uid's name in /etc/passwd (read directly:
/// getpwuid in a static glibc binary needs the NSS libraries at runtime).
fn local_user_name() -> anyhow::Result<String> {
    for var in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(var) {
            if !name.is_empty() {
                return Ok(name);
            }
        }
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id: u32 = fields.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_string())
        })
        .next()
        .ok_or_else(|| anyhow!("cannot tell the local user name (uid {uid}); give user@host"))
}

fn connect_tcp(host: &str, port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| anyhow!("cannot connect to {host}:{port}: {}", os_message(&e)))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    let reason = match last {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => {
            format!("no answer within {}", humantime::format_duration(timeout))
        }
        Some(e) => os_message(&e),
        None => "the name has no addresses".to_string(),
    };
    bail!("cannot connect to {host}:{port}: {reason}")
}

/// An io::Error's text without the " (os error N)" suffix.
fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

fn tune_socket(tcp: &TcpStream, io_timeout: Duration) -> io::Result<()> {
    let fd = tcp.as_raw_fd();
    let idle = (io_timeout.as_secs() / 3).clamp(1, 60) as libc::c_int;
    let user_timeout = io_timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    tcp.set_nodelay(true)?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, idle)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout)?;
    let sysctl = |path: &str| std::fs::read_to_string(path).ok();
    if let Some(size) = send_buffer_request(
        sysctl("/proc/sys/net/core/wmem_max").as_deref(),
        sysctl("/proc/sys/net/ipv4/tcp_wmem").as_deref(),
    ) {
        // Best effort: a refusal leaves autotuning in charge, as before.
        let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, size);
    }
    Ok(())
}

/// The `SO_SNDBUF` to ask for, or `None` to leave the kernel's autotuning in
/// charge. Everything we push travels over one TCP connection, whose data in
/// flight is capped by its send buffer: autotuning grows it up to
/// `net.ipv4.tcp_wmem`'s maximum (4 MiB by default, about 53 MB/s at 50 ms
/// RTT here), while an explicit `SO_SNDBUF` may go up to
/// `net.core.wmem_max`, which the kernel then doubles for its bookkeeping.
/// Setting it switches autotuning off, so only ask when the doubled maximum
/// beats autotuning's ceiling (on stock kernels wmem_max is 208 KiB and we
/// leave the socket alone). Capped at 16 MiB (32 MiB in flight: 320 MB/s at
/// 100 ms).
fn send_buffer_request(wmem_max: Option<&str>, tcp_wmem: Option<&str>) -> Option<libc::c_int> {
    const CAP: u64 = 16 << 20;
    let wmem_max: u64 = wmem_max?.trim().parse().ok()?;
    let autotune_max: u64 = tcp_wmem?.split_whitespace().nth(2)?.parse().ok()?;
    let request = wmem_max.min(CAP);
    (request.saturating_mul(2) > autotune_max).then_some(request as libc::c_int)
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: fd is an open socket; value lives across the call and its size
    // is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's smoothed round-trip time for a connected TCP socket.
fn round_trip_time(fd: RawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: fd is an open TCP socket, info and len are live and sized.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// The receive window for a link with this round-trip time.
fn window_for(rtt: Option<Duration>) -> u32 {
    let micros = rtt.map_or(0, |rtt| rtt.as_micros().min(u128::from(u32::MAX)) as u64);
    (micros * WINDOW_RATE).clamp(u64::from(MIN_WINDOW), u64::from(MAX_WINDOW)) as u32
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

/// The user's and the system's known_hosts files, read once.
struct KnownHostsSet {
    user_file: PathBuf,
    files: Vec<(String, String)>,
}

impl KnownHostsSet {
    fn load(home: &Path) -> KnownHostsSet {
        let user_file = home.join(".ssh/known_hosts");
        let candidates = [
            user_file.clone(),
            home.join(".ssh/known_hosts2"),
            PathBuf::from("/etc/ssh/ssh_known_hosts"),
            PathBuf::from("/etc/ssh/ssh_known_hosts2"),
        ];
        let files = candidates
            .iter()
            .filter_map(|p| Some((p.display().to_string(), std::fs::read_to_string(p).ok()?)))
            .collect();
        KnownHostsSet { user_file, files }
    }

    fn as_files(&self) -> Vec<KnownHostsFile<'_>> {
        self.files
            .iter()
            .map(|(path, text)| KnownHostsFile { path, text })
            .collect()
    }

    fn types_for(&self, target: &Target) -> Vec<String> {
        knownhosts::known_key_types(&self.as_files(), &target.hostname, target.port)
    }
}

/// Host key algorithms: the types already known for the host first (as
/// OpenSSH does), then OpenSSH's default order.
fn host_key_preference(known_types: &[String]) -> String {
    let mut algorithms: Vec<&str> = Vec::new();
    for key_type in known_types {
        let family: &[&str] = match key_type.as_str() {
            "ssh-rsa" => &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"],
            other => match HOST_KEY_ALGORITHMS.iter().find(|a| **a == other) {
                Some(a) => std::slice::from_ref(a),
                None => &[],
            },
        };
        algorithms.extend(family);
    }
    for a in HOST_KEY_ALGORITHMS {
        if !algorithms.contains(a) {
            algorithms.push(a);
        }
    }
    algorithms.join(",")
}

fn verify_host_key(
    sess: &Session,
    target: &Target,
    known_hosts: &KnownHostsSet,
    opts: &SshOptions,
) -> anyhow::Result<()> {
    let (blob, _) = sess
        .host_key()
        .ok_or_else(|| anyhow!("{} sent no host key", target.hostname))?;
    let key_type = knownhosts::key_type_of_blob(blob).unwrap_or("unknown");
    let fingerprint = sess
        .host_key_hash(ssh2::HashType::Sha256)
        .map(knownhosts::sha256_fingerprint)
        .unwrap_or_else(|| "SHA256:?".into());
    let shown = format!("{} {fingerprint}", knownhosts::key_type_label(key_type));
    let name = knownhosts::known_hosts_name(&target.hostname, target.port);
    let user_file = known_hosts.user_file.display();
    match knownhosts::check_host_key(&known_hosts.as_files(), &target.hostname, target.port, blob) {
        HostKeyVerdict::Known => Ok(()),
        HostKeyVerdict::Revoked { where_ } => {
            bail!(
                "host key for {name} ({shown}) is marked @revoked in {where_}; refusing to connect"
            )
        }
        HostKeyVerdict::Changed { where_ } => bail!(
            "HOST KEY FOR {name} HAS CHANGED: it now presents {shown}, but {where_} holds a \
             different {} key. Someone may be intercepting the connection, or the host was \
             reinstalled. Refusing to connect; if the change is expected, remove the old key \
             with: ssh-keygen -R '{name}'",
            knownhosts::key_type_label(key_type)
        ),
        HostKeyVerdict::Unknown if opts.accept_new_host_key => {
            let line = knownhosts::known_hosts_line(&target.hostname, target.port, blob)
                .ok_or_else(|| anyhow!("{} sent a malformed host key", target.hostname))?;
            append_known_host(&known_hosts.user_file, &line)
                .with_context(|| format!("cannot add the host key for {name} to {user_file}"))?;
            eprintln!("resync: added {shown} host key for {name} to {user_file}");
            Ok(())
        }
        HostKeyVerdict::Unknown => bail!(
            "host key for {name} is not in {user_file} ({shown}); connect once with {} to \
             accept it, or pass --accept-new-host-key",
            target.ssh_command()
        ),
    }
}

fn append_known_host(path: &Path, line: &str) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let needs_newline = std::fs::read(path)
        .map(|old| !old.is_empty() && !old.ends_with(b"\n"))
        .unwrap_or(false);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    if needs_newline {
        file.write_all(b"\n")?;
    }
    file.write_all(line.as_bytes())
}

fn authenticate(sess: &Session, target: &Target, opts: &SshOptions) -> anyhow::Result<()> {
    let user = &target.user;
    let where_ = format!("{}@{}:{}", user, target.hostname, target.port);
    let methods = sess
        .auth_methods(user)
        .map(str::to_string)
        .unwrap_or_default();
    if sess.authenticated() {
        return Ok(());
    }
    let mut tried: Vec<String> = Vec::new();

    if std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty()) {
        match agent_login(sess, user) {
            Ok(true) => return Ok(()),
            Ok(false) => tried.push("ssh-agent (no key accepted)".into()),
            Err(note) => tried.push(format!("ssh-agent ({note})")),
        }
    }

    let ssh_dir = opts.home.join(".ssh");
    let mut keys: Vec<(PathBuf, bool)> = Vec::new();
    let explicit = opts.key.iter().chain(&target.identity_files);
    for path in explicit {
        keys.push((path.clone(), true));
    }
    for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
        keys.push((ssh_dir.join(name), false));
    }
    let mut seen: Vec<PathBuf> = Vec::new();
    for (path, explicit) in keys {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let shown = path.display();
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if explicit {
                    tried.push(format!("{shown} (missing)"));
                }
                continue;
            }
            Err(e) => {
                tried.push(format!("{shown} ({})", os_message(&e)));
                continue;
            }
        };
        if knownhosts::private_key_is_encrypted(&text) {
            tried.push(format!(
                "{shown} (passphrase-protected: add it to ssh-agent)"
            ));
            continue;
        }
        match sess.userauth_pubkey_file(user, None, &path, None) {
            Ok(()) if sess.authenticated() => return Ok(()),
            Ok(()) => tried.push(format!("{shown} (rejected)")),
            Err(e) => match e.code() {
                ErrorCode::Session(-18) | ErrorCode::Session(-19) => {
                    tried.push(format!("{shown} (rejected)"))
                }
                ErrorCode::Session(code) if is_fatal(code) => {
                    bail!(
                        "the connection to {where_} broke during login: {}",
                        e.message()
                    )
                }
                _ => tried.push(format!("{shown} (unusable: {})", e.message())),
            },
        }
    }
    let tried = if tried.is_empty() {
        "no ssh-agent and no key files".to_string()
    } else {
        tried.join(", ")
    };
    let offered = if methods.is_empty() {
        String::new()
    } else {
        format!("; the server accepts: {methods}")
    };
    bail!("cannot log in to {where_}: tried {tried}{offered}")
}

/// Ok(true) when an agent key got us in, Ok(false) when none was accepted,
/// Err with a short note when the agent was unusable.
fn agent_login(sess: &Session, user: &str) -> Result<bool, String> {
    let mut agent = sess.agent().map_err(|e| e.message().to_string())?;
    agent.connect().map_err(|_| "not reachable".to_string())?;
    agent
        .list_identities()
        .map_err(|e| e.message().to_string())?;
    let identities = agent.identities().map_err(|e| e.message().to_string())?;
    if identities.is_empty() {
        let _ = agent.disconnect();
        return Err("no keys".into());
    }
    let ok = identities
        .iter()
        .any(|id| agent.userauth(user, id).is_ok() && sess.authenticated());
    let _ = agent.disconnect();
    Ok(ok)
}

/// libssh2 error codes that mean the session itself is gone.
fn is_fatal(code: libc::c_int) -> bool {
    matches!(
        code,
        -1 | -2 | -3 | -4 | -5 | -6 | -7 | -8 | -9 | -12 | -13 | -14 | -30 | -41 | -43 | -44 | -45
    )
}

// ---------------------------------------------------------------------------
// Handles shared between the caller's threads and the reactor

/// What every handle of one session shares with the reactor.
struct Link {
    label: String,
    waker: Waker,
    /// Why the session died, once it has.
    dead: Mutex<Option<String>>,
}

impl Link {
    fn lost(&self) -> ConnectionLost {
        let reason = self
            .dead
            .lock()
            .ok()
            .and_then(|d| d.clone())
            .unwrap_or_else(|| "the SSH session ended".into());
        ConnectionLost {
            host: self.label.clone(),
            reason,
        }
    }
}

/// The command queue into the reactor; when the last holder (the host and
/// its children) drops it, the reactor finishes its channels and ends.
struct Shared {
    link: Arc<Link>,
    cmd_tx: Mutex<Option<Sender<Cmd>>>,
}

impl Shared {
    fn send(&self, cmd: Cmd) -> anyhow::Result<()> {
        let sent = match self.cmd_tx.lock() {
            Ok(guard) => guard.as_ref().is_some_and(|tx| tx.send(cmd).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Err(self.link.lost().into());
        }
        self.link.waker.wake();
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.cmd_tx.lock() {
            guard.take();
        }
        self.link.waker.wake();
    }
}

/// A self-pipe that interrupts the reactor's poll; writes are coalesced.
struct Waker {
    read: OwnedFd,
    write: OwnedFd,
    pending: AtomicBool,
}

impl Waker {
    fn new() -> anyhow::Result<Waker> {
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

    fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // SAFETY: writes one byte from a live buffer to our pipe. A full
            // pipe (EAGAIN) already guarantees a wake-up.
            unsafe { libc::write(self.write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }

    /// Called by the reactor before it looks at its work.
    fn drain(&self) {
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
struct Flags {
    /// The stdout queue was full.
    stdout_full: AtomicBool,
    /// The stdin queue was empty.
    stdin_starved: AtomicBool,
}

/// Why a channel or the session failed, as it crosses threads.
#[derive(Debug, Clone)]
enum Failure {
    Lost(ConnectionLost),
    Other(String),
}

impl Failure {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            Failure::Lost(lost) => lost.into(),
            Failure::Other(msg) => anyhow!(msg),
        }
    }

    fn into_io(self) -> io::Error {
        match self {
            Failure::Lost(lost) => io::Error::new(io::ErrorKind::ConnectionAborted, lost),
            Failure::Other(msg) => io::Error::other(msg),
        }
    }
}

fn io_to_anyhow(e: io::Error, link: &Link) -> anyhow::Error {
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
enum Out {
    Data(Vec<u8>),
    Eof,
    Failed(Failure),
}

struct SshChild {
    id: u64,
    shared: Arc<Shared>,
    stdout: Option<SshStdout>,
    stdin: Option<SshStdin>,
    exit_rx: Receiver<Result<ExitInfo, Failure>>,
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
struct SshStdout {
    rx: Receiver<Out>,
    chunk: Vec<u8>,
    pos: usize,
    done: bool,
    flags: Arc<Flags>,
    link: Arc<Link>,
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
struct SshStdin {
    tx: Option<SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    flags: Arc<Flags>,
    link: Arc<Link>,
}

impl SshStdin {
    fn push(&mut self, data: Vec<u8>) -> io::Result<()> {
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

    fn closed(&self) -> io::Error {
        if self.link.dead.lock().is_ok_and(|d| d.is_some()) {
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

// ---------------------------------------------------------------------------
// The reactor

enum Cmd {
    Exec(Box<Pending>),
    Kill(u64),
}

/// The reactor's ends of one child's queues.
struct ChanIo {
    stdout: SyncSender<Out>,
    /// None once stdin is closed: the writer's next send fails.
    stdin: Option<Receiver<Vec<u8>>>,
    exit: Sender<Result<ExitInfo, Failure>>,
    flags: Arc<Flags>,
}

/// A command waiting for its channel to open and its exec to be accepted.
struct Pending {
    id: u64,
    command: String,
    io: ChanIo,
    reply: Sender<Result<(), Failure>>,
    channel: Option<Channel>,
}

enum Stdin {
    /// Writing `chunk[pos..]`, or waiting for the next chunk.
    Open {
        chunk: Vec<u8>,
        pos: usize,
    },
    /// The writer is gone and everything was written: send EOF.
    Eof,
    Closed,
}

enum Phase {
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
struct Chan {
    id: u64,
    channel: Channel,
    out: Stream,
    err: Stream,
    io: ChanIo,
    stdin: Stdin,
    /// The last stdin write or EOF returned EAGAIN and may have left its
    /// packet half-sent.
    send_pending: bool,
    /// Stop writing stdin as soon as nothing is in flight.
    abandon_stdin: bool,
    /// Stdout reached EOF (or reading it stopped) and the reader was told.
    stdout_eof: bool,
    /// A message that did not fit into the stdout queue yet.
    held: Option<Out>,
    /// The reader is gone: read and drop.
    discard: bool,
    stderr: Vec<u8>,
    killed: bool,
    phase: Phase,
    exit_sent: bool,
}

/// What a libssh2 call returned, sorted for the reactor.
enum Step<T> {
    Done(T),
    Blocked,
    /// This channel is broken (the message says how).
    Failed(String),
    /// The whole session is broken.
    Fatal(String),
}

struct Reactor {
    sess: Session,
    sock: RawFd,
    link: Arc<Link>,
    cmd_rx: Receiver<Cmd>,
    commands_closed: bool,
    opening: VecDeque<Box<Pending>>,
    chans: Vec<Chan>,
    /// How long a killed command's close may take before `wait` returns.
    kill_grace: Duration,
    /// Receive window for new channels.
    window: u32,
    /// Read buffer shared by all channels.
    scratch: Vec<u8>,
    /// The server refused another channel while this many were open.
    open_limit: Option<usize>,
}

impl Reactor {
    fn run(mut self) {
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

    fn take_commands(&mut self) -> bool {
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
    fn step_all(&mut self) -> Result<bool, String> {
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
    fn keepalive(&self) -> Result<(), String> {
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
    fn sleep(&self) -> Result<(), String> {
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
    fn die(mut self, reason: String) {
        if let Ok(mut dead) = self.link.dead.lock() {
            *dead = Some(reason.clone());
        }
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
fn is_session_limit(message: &str) -> bool {
    [
        "connect failed",
        "administratively prohibited",
        "resource shortage",
    ]
    .iter()
    .any(|reason| message.contains(reason))
}

fn outbound(sess: &Session) -> bool {
    matches!(
        sess.block_directions(),
        BlockDirections::Outbound | BlockDirections::Both
    )
}

/// Sort a libssh2 result: EAGAIN is Blocked, session-level codes are Fatal.
fn classify<T>(result: Result<T, ssh2::Error>) -> Step<T> {
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
fn classify_io<T>(sess: &Session, result: io::Result<T>) -> Step<T> {
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
fn fatal_reason(code: libc::c_int, errno: Option<i32>, message: &str) -> String {
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

fn open_step(sess: &Session, window: u32, pending: &mut Pending) -> Step<Channel> {
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
    fn new(id: u64, channel: Channel, io: ChanIo) -> Chan {
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

    fn kill(&mut self) {
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
    fn start_close(&mut self, outcome: Option<Result<ExitInfo, Failure>>) {
        self.abandon_stdin = true;
        self.phase = Phase::Closing {
            since: Instant::now(),
            outcome,
        };
    }

    /// Advance this channel as far as it goes without blocking.
    fn step(
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
    fn flush_held(&mut self) -> bool {
        match self.held.take() {
            Some(message) => {
                self.give_stdout(message);
                self.held.is_none()
            }
            None => false,
        }
    }

    /// Put a message on the stdout queue, or hold it if the queue is full.
    fn give_stdout(&mut self, message: Out) {
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

    fn close_stdin(&mut self) {
        self.stdin = Stdin::Closed;
        self.io.stdin = None;
        self.send_pending = false;
    }

    /// The next chunk from the writer: Some(chunk), or None when there is
    /// none yet (the flag asks the writer to wake us) or stdin is done.
    fn next_stdin_chunk(&mut self) -> Option<Vec<u8>> {
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

    fn pump_stdin(&mut self, sess: &Session) -> Result<bool, String> {
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

    fn pump_stdout(&mut self, sess: &Session, buf: &mut [u8]) -> Result<bool, String> {
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
    fn drain_stderr(&mut self, sess: &Session, buf: &mut [u8]) -> Result<bool, String> {
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
    fn check_remote_close(&mut self, sess: &Session, buf: &mut [u8]) -> Result<bool, String> {
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

    fn exit_status(&self) -> i32 {
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
    fn finish_close(&mut self, kill_grace: Duration) -> Result<bool, String> {
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

    fn send_exit(&mut self, outcome: Option<Result<ExitInfo, Failure>>) {
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
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Done(v) => Step::Done(f(v)),
            Step::Blocked => Step::Blocked,
            Step::Failed(m) => Step::Failed(m),
            Step::Fatal(m) => Step::Fatal(m),
        }
    }
}

fn signal_number(name: &str) -> Option<i32> {
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
    #[test]
    fn the_send_buffer_is_raised_only_past_autotunings_ceiling() {
        use super::send_buffer_request as req;
        // This machine: wmem_max 4 MiB, autotuning up to 4 MiB: ask for 4
        // (the kernel doubles it to 8).
        assert_eq!(
            req(Some("4194304\n"), Some("4096\t16384\t4194304\n")),
            Some(4 << 20)
        );
        // Stock kernel: wmem_max 208 KiB would shrink the buffer: leave it.
        assert_eq!(req(Some("212992"), Some("4096 16384 4194304")), None);
        // Generous admin settings are capped at 16 MiB.
        assert_eq!(
            req(Some("134217728"), Some("4096 16384 4194304")),
            Some(16 << 20)
        );
        // Autotuning already reaches further: leave it.
        assert_eq!(req(Some("4194304"), Some("4096 16384 67108864")), None);
        // Unreadable or nonsense sysctls: leave it.
        assert_eq!(req(None, Some("4096 16384 4194304")), None);
        assert_eq!(req(Some("4194304"), None), None);
        assert_eq!(req(Some("lots"), Some("4096 16384 4194304")), None);
        assert_eq!(req(Some("4194304"), Some("4096 16384")), None);
    }

    use super::*;

    #[test]
    fn spec_parses_user_and_host() {
        assert_eq!(
            SshSpec::parse("root@10.213.0.3"),
            SshSpec {
                user: Some("root".into()),
                host: "10.213.0.3".into()
            }
        );
        assert_eq!(
            SshSpec::parse("nas"),
            SshSpec {
                user: None,
                host: "nas".into()
            }
        );
    }

    #[test]
    fn known_key_types_come_first_in_host_key_preference() {
        assert_eq!(
            host_key_preference(&[]),
            "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,\
             rsa-sha2-512,rsa-sha2-256,ssh-rsa"
        );
        assert_eq!(
            host_key_preference(&["ssh-rsa".into(), "ecdsa-sha2-nistp256".into()]),
            "rsa-sha2-512,rsa-sha2-256,ssh-rsa,ecdsa-sha2-nistp256,ssh-ed25519,\
             ecdsa-sha2-nistp384,ecdsa-sha2-nistp521"
        );
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn command_line_overrides_config_and_config_overrides_defaults() {
        let home = tempfile::tempdir().unwrap();
        write(
            &home.path().join(".ssh/config"),
            "Host nas\n HostName 10.213.0.3\n User admin\n Port 2222\n IdentityFile ~/.ssh/nas\n",
        );
        let mut opts = SshOptions::with_home(home.path().to_path_buf());
        let t = Target::resolve(&SshSpec::parse("nas"), &opts).unwrap();
        assert_eq!(
            (t.hostname.as_str(), t.port, t.user.as_str()),
            ("10.213.0.3", 2222, "admin")
        );
        assert_eq!(t.identity_files, vec![home.path().join(".ssh/nas")]);
        assert_eq!(t.label(), "admin@nas:2222");

        opts.port = Some(22);
        let t = Target::resolve(&SshSpec::parse("root@nas"), &opts).unwrap();
        assert_eq!((t.port, t.user.as_str()), (22, "root"));
        assert_eq!(t.label(), "root@nas");
        assert_eq!(t.ssh_command(), "ssh root@nas");
    }

    #[test]
    fn without_config_the_local_user_and_port_22_are_used() {
        let home = tempfile::tempdir().unwrap();
        let opts = SshOptions::with_home(home.path().to_path_buf());
        let t = Target::resolve(&SshSpec::parse("10.213.0.9"), &opts).unwrap();
        assert_eq!(t.port, 22);
        assert_eq!(t.user, local_user_name().unwrap());
        assert_eq!(t.hostname, "10.213.0.9");
    }

    #[test]
    fn unreachable_port_is_a_one_line_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = connect_tcp("127.0.0.1", port, Duration::from_secs(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot connect to 127.0.0.1:{port}: Connection refused")
        );
    }

    #[test]
    fn window_grows_with_round_trip_time() {
        assert_eq!(window_for(None), 2 << 20);
        assert_eq!(window_for(Some(Duration::from_micros(60))), 2 << 20);
        assert_eq!(window_for(Some(Duration::from_millis(10))), 3_200_000);
        assert_eq!(window_for(Some(Duration::from_millis(50))), 16_000_000);
        assert_eq!(window_for(Some(Duration::from_millis(60))), 16 << 20);
        assert_eq!(window_for(Some(Duration::from_secs(1))), 16 << 20);
    }

    #[test]
    fn signal_names_map_to_numbers() {
        assert_eq!(signal_number("PIPE"), Some(13));
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("WINCH"), None);
    }

    /// A throwaway OpenSSH server on 127.0.0.1 with its own host key, and a
    /// HOME whose `.ssh` holds a client key and (optionally) known_hosts.
    /// Needs root and /usr/sbin/sshd, so the tests using it are `#[ignore]`:
    /// `cargo test --bin resync ssh::tests::live -- --ignored --test-threads=1`
    struct TestSshd {
        dir: tempfile::TempDir,
        server: std::process::Child,
        port: u16,
    }

    fn sh(cmd: &str) {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .unwrap();
        assert!(status.success(), "{cmd}");
    }

    impl TestSshd {
        fn start() -> TestSshd {
            TestSshd::start_with(&["MaxSessions=30"])
        }

        fn start_with(options: &[&str]) -> TestSshd {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display().to_string();
            sh(&format!(
                "mkdir -p {d}/home/.ssh /run/sshd && \
                 ssh-keygen -q -t ed25519 -N '' -f {d}/hostkey && \
                 ssh-keygen -q -t ed25519 -N '' -f {d}/home/.ssh/id_ed25519 && \
                 cp {d}/home/.ssh/id_ed25519.pub {d}/authorized_keys"
            ));
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let server = std::process::Command::new("/usr/sbin/sshd")
                .args(["-D", "-p", &port.to_string(), "-h", &format!("{d}/hostkey")])
                .args(["-o", "ListenAddress=127.0.0.1", "-o", "StrictModes=no"])
                .args(["-o", &format!("AuthorizedKeysFile={d}/authorized_keys")])
                .args(["-o", &format!("PidFile={d}/sshd.pid")])
                .args(["-o", "PasswordAuthentication=no"])
                .args(options.iter().flat_map(|o| ["-o", o]))
                .args(["-E", &format!("{d}/sshd.log")])
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "sshd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            let bed = TestSshd { dir, server, port };
            bed.trust_host_key();
            bed
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn host_key_line(&self) -> String {
            let public = std::fs::read_to_string(self.path("hostkey.pub")).unwrap();
            let mut fields = public.split_whitespace();
            format!(
                "[127.0.0.1]:{} {} {}\n",
                self.port,
                fields.next().unwrap(),
                fields.next().unwrap()
            )
        }

        fn trust_host_key(&self) {
            std::fs::write(self.path("home/.ssh/known_hosts"), self.host_key_line()).unwrap();
        }

        fn opts(&self) -> SshOptions {
            let mut opts = SshOptions::with_home(self.path("home"));
            opts.port = Some(self.port);
            opts.io_timeout = Duration::from_secs(6);
            opts
        }

        fn spec(&self) -> SshSpec {
            SshSpec::parse("root@127.0.0.1")
        }

        fn connect(&self) -> SshHost {
            std::env::remove_var("SSH_AUTH_SOCK");
            SshHost::connect(&self.spec(), &self.opts()).unwrap()
        }

        fn connect_err(&self, spec: &SshSpec, opts: &SshOptions) -> String {
            std::env::remove_var("SSH_AUTH_SOCK");
            match SshHost::connect(spec, opts) {
                Ok(_) => panic!("connected"),
                Err(e) => format!("{e:#}"),
            }
        }
    }

    impl Drop for TestSshd {
        fn drop(&mut self) {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
    }

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    #[ignore]
    fn live_run_returns_status_output_and_quoted_args() {
        let bed = TestSshd::start();
        let host = bed.connect();
        assert_eq!(host.label(), format!("root@127.0.0.1:{}", bed.port));
        let out = host
            .run(&argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(
            (out.status, out.stdout.as_str(), out.stderr.as_str()),
            (3, "out\n", "err\n")
        );
        let out = host
            .run(&argv(&[
                "printf",
                "%s|",
                "a b",
                "$(id)",
                "",
                "it's",
                "new\nline",
            ]))
            .unwrap();
        assert_eq!(out.stdout, "a b|$(id)||it's|new\nline|");
        let started = Instant::now();
        for _ in 0..20 {
            assert!(host.run(&argv(&["true"])).unwrap().success());
        }
        eprintln!("run(true): {:?} each", started.elapsed() / 20);
        let out = host.run(&argv(&["sh", "-c", "kill -9 $$"])).unwrap();
        assert_eq!(out.status, 137);
        let err = host
            .run(&argv(&["resync-no-such-cmd"]))
            .unwrap()
            .check("resync-no-such-cmd", host.label())
            .unwrap_err();
        assert!(err.to_string().contains("(exit 127)"), "{err}");
    }

    #[test]
    #[ignore]
    fn live_many_commands_in_parallel_share_one_session() {
        // More threads than the server allows channels: opens wait for a slot.
        let bed = TestSshd::start_with(&["MaxSessions=4"]);
        let host = bed.connect();
        std::thread::scope(|scope| {
            for i in 0..12 {
                let host = &host;
                scope.spawn(move || {
                    for j in 0..5 {
                        let text = format!("{i}-{j}");
                        let out = host.run(&argv(&["echo", &text])).unwrap();
                        assert_eq!(out.stdout.trim(), text);
                    }
                });
            }
        });
    }

    #[test]
    #[ignore]
    fn live_spawn_streams_between_threads_and_reports_exit() {
        let bed = TestSshd::start();
        let host = bed.connect();
        // 256 MiB in through stdin and back out through stdout.
        let mut child = host
            .spawn(&argv(&["sh", "-c", "cat; echo bye >&2; exit 5"]))
            .unwrap();
        let mut stdin = child.take_stdin().unwrap();
        let mut stdout = child.take_stdout().unwrap();
        let total: usize = 256 << 20;
        let writer = std::thread::spawn(move || {
            let mut block = vec![0u8; 1 << 20];
            for (i, b) in block.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            for _ in 0..total >> 20 {
                stdin.write_all(&block).unwrap();
            }
        });
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 100_000];
            let mut seen = 0usize;
            loop {
                let n = stdout.read(&mut buf).unwrap();
                if n == 0 {
                    return seen;
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, (((seen + k) % (1 << 20)) % 251) as u8);
                }
                seen += n;
            }
        });
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), total);
        let exit = child.wait().unwrap();
        assert_eq!((exit.status, exit.stderr.as_str()), (5, "bye\n"));
    }

    #[test]
    #[ignore]
    fn live_early_exit_breaks_the_writer_and_wait_tells_why() {
        let bed = TestSshd::start();
        let host = bed.connect();
        let mut child = host
            .spawn(&argv(&[
                "sh",
                "-c",
                "head -c 1000 >/dev/null; echo 'cannot receive: bad stream' >&2; exit 1",
            ]))
            .unwrap();
        let mut stdin = child.take_stdin().unwrap();
        let block = vec![1u8; 1 << 20];
        let mut err = None;
        for _ in 0..1000 {
            if let Err(e) = stdin.write_all(&block) {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("writes kept succeeding");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
        drop(stdin);
        let exit = child.wait().unwrap();
        assert_eq!(exit.status, 1);
        let failure = exit.check("zfs receive", host.label()).unwrap_err();
        assert_eq!(
            failure.to_string(),
            format!(
                "zfs receive failed on {} (exit 1): cannot receive: bad stream",
                host.label()
            )
        );
    }

    #[test]
    #[ignore]
    fn live_kill_ends_a_command_and_wait_returns() {
        let bed = TestSshd::start();
        let host = bed.connect();
        let mut child = host.spawn(&argv(&["sh", "-c", "cat /dev/zero"])).unwrap();
        let mut stdout = child.take_stdout().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        stdout.read_exact(&mut buf).unwrap();
        let started = Instant::now();
        child.kill();
        let exit = child.wait().unwrap();
        assert_ne!(exit.status, 0);
        assert!(started.elapsed() < Duration::from_secs(5));
        // The session still works afterwards.
        assert_eq!(host.run(&argv(&["echo", "ok"])).unwrap().stdout, "ok\n");
    }

    #[test]
    #[ignore]
    fn live_silent_command_outlives_io_timeout() {
        let bed = TestSshd::start();
        let host = bed.connect();
        // io_timeout is 6 s: a command that says nothing for 9 s is fine.
        let out = host
            .run(&argv(&["sh", "-c", "sleep 9; echo late"]))
            .unwrap();
        assert_eq!(out.stdout, "late\n");
    }

    #[test]
    #[ignore]
    fn live_server_dying_is_connection_lost() {
        let bed = TestSshd::start();
        let host = bed.connect();
        let mut child = host.spawn(&argv(&["sleep", "60"])).unwrap();
        // Kill every sshd serving this test server's connections.
        sh(&format!(
            "pkill -KILL -P {} sshd; sleep 0.2",
            bed.server.id()
        ));
        let err = child
            .take_stdout()
            .unwrap()
            .read(&mut [0u8; 10])
            .unwrap_err();
        eprintln!("server died: {err}");
        assert!(err.to_string().contains("was lost"), "{err}");
        let err = child.wait().unwrap_err();
        assert!(super::super::is_connection_lost(&err), "{err:#}");
        let err = host.run(&argv(&["true"])).unwrap_err();
        assert!(super::super::is_connection_lost(&err), "{err:#}");
    }

    #[test]
    #[ignore]
    fn live_cut_link_is_noticed_within_io_timeout() {
        let bed = TestSshd::start();
        let host = bed.connect();
        let mut child = host.spawn(&argv(&["sh", "-c", "cat /dev/zero"])).unwrap();
        let mut stdout = child.take_stdout().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        stdout.read_exact(&mut buf).unwrap();
        let rule = format!("INPUT -i lo -p tcp --sport {} -j DROP", bed.port);
        sh(&format!("iptables -I {rule}"));
        let started = Instant::now();
        let result = loop {
            match stdout.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) => break Err(e),
            }
        };
        sh(&format!("iptables -D {rule}"));
        let err = result.unwrap_err();
        let took = started.elapsed();
        assert!(err.to_string().contains("was lost"), "{err}");
        assert!(took < Duration::from_secs(20), "took {took:?}");
        eprintln!("cut noticed after {took:?}: {err}");
    }

    #[test]
    #[ignore]
    fn live_host_key_checks() {
        let bed = TestSshd::start();
        let kh = bed.path("home/.ssh/known_hosts");
        let port = bed.port;

        // Unknown: refused with instructions.
        std::fs::remove_file(&kh).unwrap();
        let err = bed.connect_err(&bed.spec(), &bed.opts());
        eprintln!("unknown: {err}");
        assert!(
            err.starts_with(&format!("host key for [127.0.0.1]:{port} is not in ")),
            "{err}"
        );
        assert!(
            err.contains(&format!("connect once with ssh -p {port} root@127.0.0.1")),
            "{err}"
        );

        // Accepted and recorded with --accept-new-host-key.
        let mut opts = bed.opts();
        opts.accept_new_host_key = true;
        drop(SshHost::connect(&bed.spec(), &opts).unwrap());
        assert_eq!(std::fs::read_to_string(&kh).unwrap(), bed.host_key_line());
        drop(bed.connect());

        // Hashed entry.
        sh(&format!(
            "ssh-keygen -q -H -f {} && rm -f {}.old",
            kh.display(),
            kh.display()
        ));
        assert!(std::fs::read_to_string(&kh).unwrap().starts_with("|1|"));
        drop(bed.connect());

        // Changed: refused, even with --accept-new-host-key.
        let other = "AAAAC3NzaC1lZDI1NTE5AAAAIHiD1HWOXk5VDyTvPiyInpDv/3sObNoM4vMKIK55zgWh";
        std::fs::write(&kh, format!("[127.0.0.1]:{port} ssh-ed25519 {other}\n")).unwrap();
        let err = bed.connect_err(&bed.spec(), &opts);
        eprintln!("changed: {err}");
        assert!(
            err.starts_with(&format!("HOST KEY FOR [127.0.0.1]:{port} HAS CHANGED")),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&kh).unwrap(),
            format!("[127.0.0.1]:{port} ssh-ed25519 {other}\n")
        );
    }

    #[test]
    #[ignore]
    fn live_config_alias_and_auth_failures() {
        let bed = TestSshd::start();
        let home = bed.path("home");
        // Alias with HostName, Port, User and IdentityFile from the config.
        sh(&format!(
            "cd {} && mv .ssh/id_ed25519 .ssh/bedkey && mv .ssh/id_ed25519.pub .ssh/bedkey.pub",
            home.display()
        ));
        std::fs::write(
            home.join(".ssh/config"),
            format!(
                "Host bed\n  HostName 127.0.0.1\n  Port {}\n  User root\n  IdentityFile ~/.ssh/bedkey\n",
                bed.port
            ),
        )
        .unwrap();
        let opts = SshOptions::with_home(home.clone());
        let host = SshHost::connect(&SshSpec::parse("bed"), &opts).unwrap();
        assert_eq!(host.label(), format!("root@bed:{}", bed.port));
        assert_eq!(host.run(&argv(&["echo", "hi"])).unwrap().stdout, "hi\n");
        drop(host);

        // A key the server does not know, given with --sshkey.
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {}/stranger",
            bed.path("").display()
        ));
        std::fs::remove_file(home.join(".ssh/config")).unwrap();
        let mut opts = bed.opts();
        opts.key = Some(bed.path("stranger"));
        let err = bed.connect_err(&bed.spec(), &opts);
        eprintln!("bad key: {err}");
        assert_eq!(
            err,
            format!(
                "cannot log in to root@127.0.0.1:{}: tried {} (rejected); the server accepts: publickey",
                bed.port,
                bed.path("stranger").display()
            )
        );

        // A passphrase-protected key and a missing one.
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N secret -f {}/locked",
            bed.path("").display()
        ));
        opts.key = Some(bed.path("locked"));
        let err = bed.connect_err(&bed.spec(), &opts);
        eprintln!("locked key: {err}");
        assert!(
            err.contains("(passphrase-protected: add it to ssh-agent)"),
            "{err}"
        );
        opts.key = Some(bed.path("nope"));
        let err = bed.connect_err(&bed.spec(), &opts);
        eprintln!("missing key: {err}");
        assert!(err.contains("nope (missing)"), "{err}");

        // Unreachable port.
        let mut opts = bed.opts();
        opts.port = Some(1);
        let err = bed.connect_err(&bed.spec(), &opts);
        assert_eq!(err, "cannot connect to 127.0.0.1:1: Connection refused");
    }

    fn mb_per_s(bytes: usize, took: Duration) -> f64 {
        bytes as f64 / took.as_secs_f64() / 1e6
    }

    #[test]
    #[ignore]
    fn live_bench_one_gib_each_way() {
        let bed = TestSshd::start();
        let host = bed.connect();
        let total: usize = 1 << 30;

        let mut child = host.spawn(&argv(&["sh", "-c", "cat > /dev/null"])).unwrap();
        let mut stdin = child.take_stdin().unwrap();
        let block = vec![0x5au8; 1 << 20];
        let started = Instant::now();
        let writer = std::thread::spawn(move || {
            for _ in 0..total >> 20 {
                stdin.write_all(&block).unwrap();
            }
        });
        writer.join().unwrap();
        let exit = child.wait().unwrap();
        let took = started.elapsed();
        assert_eq!(exit.status, 0);
        eprintln!("write 1 GiB: {:.0} MB/s", mb_per_s(total, took));

        let mut child = host
            .spawn(&argv(&["head", "-c", "1G", "/dev/zero"]))
            .unwrap();
        let mut stdout = child.take_stdout().unwrap();
        let started = Instant::now();
        let reader = std::thread::spawn(move || io::copy(&mut stdout, &mut io::sink()).unwrap());
        let got = reader.join().unwrap();
        let exit = child.wait().unwrap();
        let took = started.elapsed();
        assert_eq!((got as usize, exit.status), (total, 0));
        eprintln!("read 1 GiB: {:.0} MB/s", mb_per_s(total, took));
    }

    #[test]
    #[ignore]
    fn live_baseline_blocking_ssh2() {
        let bed = TestSshd::start();
        let connect = || {
            let tcp = TcpStream::connect(("127.0.0.1", bed.port)).unwrap();
            let mut sess = Session::new().unwrap();
            sess.set_tcp_stream(tcp);
            sess.method_pref(MethodType::CryptCs, CIPHERS).unwrap();
            sess.method_pref(MethodType::CryptSc, CIPHERS).unwrap();
            sess.handshake().unwrap();
            sess.userauth_pubkey_file("root", None, &bed.path("home/.ssh/id_ed25519"), None)
                .unwrap();
            sess
        };
        for window in [MIN_WINDOW, MAX_WINDOW] {
            let sess = connect();
            let mut ch = sess.channel_open("session", window, PACKET, None).unwrap();
            ch.exec("head -c 1G /dev/zero").unwrap();
            let started = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0usize;
            loop {
                let n = ch.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            eprintln!(
                "blocking read window {window}: {:.0} MB/s",
                mb_per_s(total, started.elapsed())
            );
        }
        let sess = connect();
        let mut ch = sess
            .channel_open("session", MIN_WINDOW, PACKET, None)
            .unwrap();
        ch.exec("cat >/dev/null").unwrap();
        let started = Instant::now();
        let block = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            ch.write_all(&block).unwrap();
        }
        ch.send_eof().unwrap();
        ch.wait_eof().unwrap();
        eprintln!(
            "blocking write: {:.0} MB/s",
            mb_per_s(1 << 30, started.elapsed())
        );
    }

    /// Source and target on the same host: both channels share the session,
    /// the pump's reader and writer run on different threads. 3 GiB also
    /// crosses OpenSSH's rekey limit for chacha20 (1 GiB) in both directions.
    #[test]
    #[ignore]
    fn live_pump_between_two_channels_of_one_session() {
        let bed = TestSshd::start();
        let host = bed.connect();
        let total: u64 = 3 << 30;
        let mut send = host
            .spawn(&argv(&[
                "sh",
                "-c",
                &format!("head -c {total} /dev/zero; echo sent >&2"),
            ]))
            .unwrap();
        let mut recv = host
            .spawn(&argv(&["sh", "-c", "wc -c; echo received >&2"]))
            .unwrap();
        let mut from = send.take_stdout().unwrap();
        let mut to = recv.take_stdin().unwrap();
        let started = Instant::now();
        let pump = std::thread::spawn(move || {
            let copied = io::copy(&mut from, &mut to).unwrap();
            drop(to);
            copied
        });
        let mut counted = String::new();
        recv.take_stdout()
            .unwrap()
            .read_to_string(&mut counted)
            .unwrap();
        assert_eq!(pump.join().unwrap(), total);
        let took = started.elapsed();
        let sent = send.wait().unwrap();
        let received = recv.wait().unwrap();
        assert_eq!(counted.trim(), total.to_string());
        assert_eq!((sent.status, sent.stderr.as_str()), (0, "sent\n"));
        assert_eq!(
            (received.status, received.stderr.as_str()),
            (0, "received\n")
        );
        eprintln!(
            "pump 3 GiB within one session: {:.0} MB/s",
            mb_per_s(total as usize, took)
        );
    }

    #[test]
    #[ignore]
    fn live_agent_key_is_tried_first() {
        let bed = TestSshd::start();
        let home = bed.path("home");
        let sock = bed.path("agent.sock");
        let _agent = Reaper(
            std::process::Command::new("ssh-agent")
                .args(["-D", "-a"])
                .arg(&sock)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The only usable key is in the agent; the key file is gone.
        sh(&format!(
            "SSH_AUTH_SOCK={} ssh-add -q {}/.ssh/id_ed25519 && rm {}/.ssh/id_ed25519*",
            sock.display(),
            home.display(),
            home.display()
        ));
        std::env::set_var("SSH_AUTH_SOCK", &sock);
        let host = SshHost::connect(&bed.spec(), &bed.opts());
        std::env::remove_var("SSH_AUTH_SOCK");
        let host = host.unwrap();
        assert_eq!(
            host.run(&argv(&["echo", "agent"])).unwrap().stdout,
            "agent\n"
        );
    }

    /// Kills and reaps a helper process when the test ends.
    struct Reaper(std::process::Child);

    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Killing a command while another thread writes into it: the writer
    /// gets an error, `wait` returns, the session stays usable. Once with a
    /// reader that never reads (the remote window shuts), once with one that
    /// keeps up (a packet is likely half-sent at the kill).
    #[test]
    #[ignore]
    fn live_kill_while_writing() {
        let bed = TestSshd::start();
        let host = bed.connect();
        for command in ["sleep 30", "cat > /dev/null"] {
            let mut child = host.spawn(&argv(&["sh", "-c", command])).unwrap();
            let mut stdin = child.take_stdin().unwrap();
            let writer = std::thread::spawn(move || {
                let block = vec![3u8; 1 << 20];
                loop {
                    if let Err(e) = stdin.write_all(&block) {
                        return e;
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(500));
            let started = Instant::now();
            child.kill();
            let exit = child.wait().unwrap();
            let err = writer.join().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{command}: {err}");
            assert_ne!(exit.status, 0, "{command}");
            assert!(started.elapsed() < Duration::from_secs(7), "{command}");
            assert_eq!(host.run(&argv(&["echo", "ok"])).unwrap().stdout, "ok\n");
        }
    }
}
