//! syncoid's `--insecure-direct-connection`: default mode's stream crosses
//! one plain TCP connection (no encryption, no compression) instead of SSH,
//! while control stays on SSH. The value is
//! `IP:PORT[,LISTEN_IP:PORT[,TIMEOUT[,mbuffer]]]` ([`Direct::parse`], pure):
//! the target listens on the second address (default: the first), the
//! source connects to the first, and a listener that gets no connection
//! within TIMEOUT (default 60 s) fails and stops `zfs receive`. Exactly one
//! end is remote; this machine's end is the pump (`transfer/pipe.rs`), the
//! remote end our deployed binary as a hidden subcommand (argv, no shell):
//! - `resync __listen ADDR:PORT SECS -- zfs receive ...` binds, starts
//!   `zfs receive`, accepts one connection and feeds it to `zfs receive`;
//! - `resync __connect ADDR:PORT SECS -- zfs send ...` starts `zfs send`,
//!   connects (retrying for SECS) and writes its output to the connection.
//!
//! Both pass the zfs command's stderr and stdout through and exit with its
//! status (128 + signal), 1 when the connection failed (the zfs command is
//! stopped first), 2 on a bad command line.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;

use crate::sys::{exit_code, spawn_filtered as spawn, stop};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::Location;
use crate::host::{deploy, Host};
use crate::progress::Progress;

pub const LISTEN: &str = "__listen";
pub const CONNECT: &str = "__connect";
/// The hidden subcommands `main` dispatches here.
pub const SUBCOMMANDS: [&str; 2] = [LISTEN, CONNECT];
/// syncoid's default time for the listener to get its connection.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The parsed `--insecure-direct-connection` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direct {
    /// Where the source connects.
    pub connect: SocketAddr,
    /// Where the target listens.
    pub listen: SocketAddr,
    /// How long the listener waits for its connection (and the source
    /// retries connecting).
    pub timeout: Duration,
    /// syncoid's fourth part, `mbuffer`: accepted, without effect.
    pub mbuffer: bool,
}

impl Direct {
    /// `IP:PORT[,LISTEN_IP:PORT[,TIMEOUT[,mbuffer]]]`, as syncoid reads it
    /// (IPv6 as `[ADDR]:PORT`).
    pub fn parse(value: &str) -> Result<Direct> {
        let parts: Vec<&str> = value.split(',').collect();
        if parts.len() > 4 {
            bail!(
                "{value:?} has {} parts; expected IP:PORT[,LISTEN_IP:PORT[,TIMEOUT[,mbuffer]]]",
                parts.len()
            );
        }
        let connect = parse_addr(parts[0])?;
        let listen = match parts.get(1) {
            Some(p) => parse_addr(p)?,
            None => connect,
        };
        let timeout = match parts.get(2) {
            Some(t) => match t.trim().parse::<u64>() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => bail!("timeout {t:?} is not a whole number of seconds above 0"),
            },
            None => DEFAULT_TIMEOUT,
        };
        let mbuffer = match parts.get(3).map(|p| p.trim()) {
            Some("mbuffer") => true,
            Some(other) => bail!("fourth part {other:?}: only \"mbuffer\" is known"),
            None => false,
        };
        Ok(Direct {
            connect,
            listen,
            timeout,
            mbuffer,
        })
    }
}

/// A direct connection as one run uses it: the value, and our deployed
/// binary on the remote end (exactly one end is remote; `None` is this
/// machine, where the pump holds the socket).
#[derive(Debug, Clone)]
pub struct Route {
    pub direct: Direct,
    pub src_exe: Option<String>,
    pub dst_exe: Option<String>,
}

impl Route {
    /// Puts our binary on the remote end (once per run, before anything
    /// changes), so that a host that cannot run it fails the run at once.
    pub fn deploy(
        direct: &Direct,
        hosts: [Arc<dyn Host>; 2],
        locations: [&Location; 2],
        tmpdir: &str,
        ui: &dyn Progress,
    ) -> Result<Route> {
        let mut exes = Vec::new();
        for (location, host) in locations.into_iter().zip(hosts) {
            if !matches!(location, Location::Remote { .. }) {
                exes.push(None);
                continue;
            }
            let d = deploy::deploy(&*host, tmpdir).with_context(|| {
                format!(
                    "--insecure-direct-connection needs resync on {}",
                    host.label()
                )
            })?;
            if d.uploaded {
                ui.debug(&format!("uploaded resync to {}:{}", host.label(), d.path));
            }
            exes.push(Some(d.path));
        }
        let dst_exe = exes.pop().flatten();
        let src_exe = exes.pop().flatten();
        if src_exe.is_some() == dst_exe.is_some() {
            bail!("--insecure-direct-connection needs exactly one remote end");
        }
        Ok(Route {
            direct: direct.clone(),
            src_exe,
            dst_exe,
        })
    }

    /// `zfs send` as it runs: behind `__connect` on a remote source.
    pub fn send_argv(&self, send: &[String]) -> Vec<String> {
        match &self.src_exe {
            Some(exe) => connect_argv(exe, self.direct.connect, self.direct.timeout, send),
            None => send.to_vec(),
        }
    }

    /// `zfs receive` as it runs: behind `__listen` on a remote target.
    pub fn recv_argv(&self, recv: &[String]) -> Vec<String> {
        match &self.dst_exe {
            Some(exe) => listen_argv(exe, self.direct.listen, self.direct.timeout, recv),
            None => recv.to_vec(),
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| anyhow!("{s:?} is not IP:PORT (an IP address and a port from 1 to 65535)"))?;
    if addr.port() == 0 {
        bail!("{s:?}: port 0 is not a port to listen on or connect to");
    }
    Ok(addr)
}

/// `exe __listen ADDR SECS -- recv...`
pub fn listen_argv(exe: &str, addr: SocketAddr, timeout: Duration, recv: &[String]) -> Vec<String> {
    helper_argv(exe, LISTEN, addr, timeout, recv)
}

/// `exe __connect ADDR SECS -- send...`
pub fn connect_argv(
    exe: &str,
    addr: SocketAddr,
    timeout: Duration,
    send: &[String],
) -> Vec<String> {
    helper_argv(exe, CONNECT, addr, timeout, send)
}

fn helper_argv(
    exe: &str,
    sub: &str,
    addr: SocketAddr,
    timeout: Duration,
    argv: &[String],
) -> Vec<String> {
    let mut v = vec![
        exe.to_string(),
        sub.to_string(),
        addr.to_string(),
        timeout.as_secs().max(1).to_string(),
        "--".into(),
    ];
    v.extend_from_slice(argv);
    v
}

/// Binds the listener (before anything is started, so that an address
/// this host does not have fails at once).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))
}

/// Accepts exactly one connection within `timeout`; the listener is
/// closed when it is dropped, so a second one is refused.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> Result<TcpStream> {
    let addr = listener.local_addr().context("listener address")?;
    listener
        .set_nonblocking(true)
        .context("setting the listener non-blocking")?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _peer)) => {
                stream
                    .set_nonblocking(false)
                    .context("setting the connection blocking")?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!(
                        "no connection on {addr} within {} (--insecure-direct-connection); \
                         stopped zfs receive",
                        humantime::format_duration(timeout)
                    );
                }
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow!(e).context(format!("accepting on {addr}"))),
        }
    }
}

/// Connects to `addr`, retrying every second for `timeout` (the listener
/// may not be up yet, as syncoid's `socat ... retry`).
pub fn connect_within(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(
            &addr,
            left.clamp(Duration::from_millis(100), Duration::from_secs(5)),
        ) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() + Duration::from_secs(1) < deadline => {
                thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "cannot connect to {addr} within {} (--insecure-direct-connection)",
                    humantime::format_duration(timeout)
                )))
            }
        }
    }
}

/// A helper's command line, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Listen(SocketAddr, Duration, Vec<String>),
    Connect(SocketAddr, Duration, Vec<String>),
}

fn parse(args: &[OsString]) -> Result<Cmd> {
    let args: Vec<&str> = args
        .iter()
        .map(|a| a.to_str().ok_or_else(|| anyhow!("invalid argument {a:?}")))
        .collect::<Result<_>>()?;
    let usage = || anyhow!("usage: {LISTEN}|{CONNECT} ADDR:PORT SECS -- ARGV");
    let [sub, addr, secs, "--", argv @ ..] = args.as_slice() else {
        return Err(usage());
    };
    if argv.is_empty() {
        return Err(usage());
    }
    let addr = parse_addr(addr)?;
    let timeout = match secs.parse::<u64>() {
        Ok(s) if s > 0 => Duration::from_secs(s),
        _ => bail!("invalid timeout {secs:?}"),
    };
    let argv = argv.iter().map(|a| a.to_string()).collect();
    match *sub {
        LISTEN => Ok(Cmd::Listen(addr, timeout, argv)),
        CONNECT => Ok(Cmd::Connect(addr, timeout, argv)),
        _ => Err(usage()),
    }
}

/// Runs a helper subcommand; returns the exit code.
pub fn main(args: &[OsString]) -> i32 {
    let cmd = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            return 2;
        }
    };
    let result = match cmd {
        Cmd::Listen(addr, timeout, argv) => listen(addr, timeout, &argv),
        Cmd::Connect(addr, timeout, argv) => connect(addr, timeout, &argv),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            1
        }
    }
}

/// `__listen`: one connection into `zfs receive`. A connection that ends
/// early closes `zfs receive`'s input, which then fails on the truncated
/// stream (the target keeps its state).
fn listen(addr: SocketAddr, timeout: Duration, argv: &[String]) -> Result<i32> {
    let listener = bind(addr)?;
    let mut child = spawn(argv, Stdio::piped(), Stdio::inherit())?;
    let Some(mut zfs_in) = child.stdin.take() else {
        stop(&mut child);
        bail!("zfs receive has no stdin pipe");
    };
    let mut stream = match accept_within(&listener, timeout) {
        Ok(s) => s,
        Err(e) => {
            stop(&mut child);
            return Err(e);
        }
    };
    drop(listener);
    let copied = io::copy(&mut stream, &mut zfs_in).and_then(|_| zfs_in.flush());
    drop(zfs_in);
    let status = child.wait().context("waiting for zfs receive")?;
    if let Err(e) = copied {
        if status.success() {
            return Err(anyhow!(e).context("reading the direct connection"));
        }
    }
    Ok(exit_code(status))
}

/// `__connect`: `zfs send` into one connection, closed (EOF to the
/// listener) once `zfs send` exited; a failed `zfs send` leaves a truncated
/// stream, which `zfs receive` rejects, and its status fails the run.
fn connect(addr: SocketAddr, timeout: Duration, argv: &[String]) -> Result<i32> {
    let mut child = spawn(argv, Stdio::null(), Stdio::piped())?;
    let Some(mut zfs_out) = child.stdout.take() else {
        stop(&mut child);
        bail!("zfs send has no stdout pipe");
    };
    let mut stream = match connect_within(addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            stop(&mut child);
            return Err(e);
        }
    };
    let copied = io::copy(&mut zfs_out, &mut stream).and_then(|_| stream.flush());
    if let Err(e) = copied {
        stop(&mut child);
        return Err(anyhow!(e).context("writing the direct connection"));
    }
    let status = child.wait().context("waiting for zfs send")?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn values_parse_as_syncoid_reads_them() {
        let secs = Duration::from_secs;
        for (value, connect, listen, timeout, mbuffer) in [
            (
                "10.0.0.2:9000",
                "10.0.0.2:9000",
                "10.0.0.2:9000",
                secs(60),
                false,
            ),
            (
                "10.0.0.2:9000,0.0.0.0:9001",
                "10.0.0.2:9000",
                "0.0.0.0:9001",
                secs(60),
                false,
            ),
            (
                "10.0.0.2:9000,0.0.0.0:9000,5",
                "10.0.0.2:9000",
                "0.0.0.0:9000",
                secs(5),
                false,
            ),
            (
                "10.0.0.2:9000,10.0.0.2:9000,30,mbuffer",
                "10.0.0.2:9000",
                "10.0.0.2:9000",
                secs(30),
                true,
            ),
            (
                "[fd00::2]:65535",
                "[fd00::2]:65535",
                "[fd00::2]:65535",
                secs(60),
                false,
            ),
        ] {
            let d = Direct::parse(value).unwrap_or_else(|e| panic!("{value}: {e:#}"));
            assert_eq!(
                d,
                Direct {
                    connect: sa(connect),
                    listen: sa(listen),
                    timeout,
                    mbuffer
                },
                "{value}"
            );
        }
    }

    #[test]
    fn bad_values_are_refused_in_one_line() {
        for (value, want) in [
            ("nonsense", "is not IP:PORT"),
            ("", "is not IP:PORT"),
            ("10.0.0.2", "is not IP:PORT"),
            ("host.example:9000", "is not IP:PORT"),
            ("10.0.0.2:0", "port 0"),
            ("10.0.0.2:65536", "is not IP:PORT"),
            ("10.0.0.2:-1", "is not IP:PORT"),
            ("10.0.0.2:9000,nonsense", "is not IP:PORT"),
            ("10.0.0.2:9000,10.0.0.2:0", "port 0"),
            ("10.0.0.2:9000,10.0.0.2:9000,0", "timeout"),
            ("10.0.0.2:9000,10.0.0.2:9000,soon", "timeout"),
            ("10.0.0.2:9000,10.0.0.2:9000,5,pv", "only \"mbuffer\""),
            ("1.2.3.4:1,1.2.3.4:1,5,mbuffer,x", "5 parts"),
        ] {
            let e = format!("{:#}", Direct::parse(value).unwrap_err());
            assert!(e.contains(want), "{value}: {e}");
            assert!(!e.contains('\n'), "{value}: {e}");
        }
    }

    #[test]
    fn helper_command_lines_round_trip() {
        let recv = vec![
            "zfs".to_string(),
            "receive".into(),
            "-s".into(),
            "p/x".into(),
        ];
        let argv = listen_argv(
            "/tmp/resync",
            sa("0.0.0.0:9000"),
            Duration::from_secs(7),
            &recv,
        );
        assert_eq!(
            argv[..5],
            ["/tmp/resync", "__listen", "0.0.0.0:9000", "7", "--"]
        );
        let os: Vec<OsString> = argv[1..].iter().map(OsString::from).collect();
        assert_eq!(
            parse(&os).unwrap(),
            Cmd::Listen(sa("0.0.0.0:9000"), Duration::from_secs(7), recv.clone())
        );
        let argv = connect_argv("r", sa("10.0.0.1:9"), Duration::from_secs(60), &recv);
        let os: Vec<OsString> = argv[1..].iter().map(OsString::from).collect();
        assert_eq!(
            parse(&os).unwrap(),
            Cmd::Connect(sa("10.0.0.1:9"), Duration::from_secs(60), recv)
        );
        for bad in [
            vec!["__listen"],
            vec!["__listen", "0.0.0.0:9000", "7", "--"],
            vec!["__listen", "0.0.0.0:9000", "0", "--", "zfs"],
            vec!["__other", "0.0.0.0:9000", "7", "--", "zfs"],
        ] {
            let os: Vec<OsString> = bad.iter().map(OsString::from).collect();
            assert!(parse(&os).is_err(), "{bad:?}");
        }
    }

    /// A listener nobody connects to gives up within its time, in one line.
    #[test]
    fn a_listener_without_a_connection_gives_up() {
        let l = bind(sa("127.0.0.1:0")).unwrap();
        let t = Instant::now();
        let e = format!(
            "{:#}",
            accept_within(&l, Duration::from_millis(300)).unwrap_err()
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(e.contains("no connection on 127.0.0.1:"), "{e}");
    }
}
