//! Reaching an SSH server: the TCP connection (every address of the name,
//! with a timeout and a one-line error), the socket tuning that makes a cut
//! link an error within the I/O timeout and lets one connection carry fast
//! pushes (keepalives, `TCP_USER_TIMEOUT`, the send buffer, a receive window
//! sized to the round-trip time), and the SSH handshake with our cipher and
//! host key algorithm preferences. Who we are and whether we trust the host
//! is `auth.rs`'s business.

use super::auth::Target;
use super::SshOptions;
use anyhow::{anyhow, bail, Context};
use ssh2::{MethodType, Session};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// Ciphers, cheapest first, chosen by measurement (`live_cipher_cost`,
/// release build, 1 GiB through one channel to a local sshd): libssh2's
/// AES-GCM costs the client 2.1 to 2.6 s of CPU per GiB, its portable
/// ChaCha20-Poly1305 2.9 s and AES-CTR 2.9 to 3.1 s; OpenSSH at the other
/// end does AES-GCM with AES-NI, far cheaper than its ChaCha20 too.
pub(super) const CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr";
/// Host key algorithms in OpenSSH's default order (libssh2's own order puts
/// ECDSA first, which would not match the ED25519 key OpenSSH recorded).
pub(super) const HOST_KEY_ALGORITHMS: &[&str] = &[
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
pub(super) const MIN_WINDOW: u32 = 2 << 20;
pub(super) const MAX_WINDOW: u32 = 16 << 20;
/// The rate a window should sustain, in bytes per microsecond of RTT
/// (320 MB/s).
pub(super) const WINDOW_RATE: u64 = 320;

pub(super) fn connect_tcp(host: &str, port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
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
pub(super) fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

pub(super) fn tune_socket(tcp: &TcpStream, io_timeout: Duration) -> io::Result<()> {
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
pub(super) fn send_buffer_request(
    wmem_max: Option<&str>,
    tcp_wmem: Option<&str>,
) -> Option<libc::c_int> {
    const CAP: u64 = 16 << 20;
    let wmem_max: u64 = wmem_max?.trim().parse().ok()?;
    let autotune_max: u64 = tcp_wmem?.split_whitespace().nth(2)?.parse().ok()?;
    let request = wmem_max.min(CAP);
    (request.saturating_mul(2) > autotune_max).then_some(request as libc::c_int)
}

pub(super) fn setsockopt(
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
pub(super) fn round_trip_time(fd: RawFd) -> Option<Duration> {
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
pub(super) fn window_for(rtt: Option<Duration>) -> u32 {
    let micros = rtt.map_or(0, |rtt| rtt.as_micros().min(u128::from(u32::MAX)) as u64);
    (micros * WINDOW_RATE).clamp(u64::from(MIN_WINDOW), u64::from(MAX_WINDOW)) as u32
}

pub(super) fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

/// Host key algorithms: the types already known for the host first (as
/// OpenSSH does), then OpenSSH's default order.
pub(super) fn host_key_preference(known_types: &[String]) -> String {
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

/// A TCP connection to the target, tuned, with the SSH handshake done
/// (ciphers and host key algorithms in our order, known key types first):
/// the session, not yet trusted nor logged in, and its socket.
pub(super) fn handshake(
    target: &Target,
    opts: &SshOptions,
    known_types: &[String],
) -> anyhow::Result<(Session, RawFd)> {
    let tcp = connect_tcp(&target.hostname, target.port, opts.connect_timeout)?;
    tune_socket(&tcp, opts.io_timeout)
        .with_context(|| format!("cannot set socket options for {}", target.label()))?;
    let fd = tcp.as_raw_fd();
    let mut sess = Session::new().context("cannot create an SSH session")?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(millis(opts.connect_timeout));
    let ciphers = opts.overrides.ciphers.as_deref().unwrap_or(CIPHERS);
    sess.method_pref(MethodType::CryptCs, ciphers)
        .and_then(|()| sess.method_pref(MethodType::CryptSc, ciphers))
        .with_context(|| format!("libssh2 supports none of the ciphers {ciphers}"))?;
    sess.method_pref(MethodType::HostKey, &host_key_preference(known_types))
        .context("libssh2 supports none of our host key algorithms")?;
    sess.handshake().map_err(|e| {
        anyhow!(
            "SSH handshake with {}:{} failed: {}",
            target.hostname,
            target.port,
            e.message()
        )
    })?;
    Ok((sess, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
