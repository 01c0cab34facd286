//! Live tests of the SSH transport against a throwaway sshd on loopback
//! (`#[ignore]`: they need root and /usr/sbin/sshd), and the spec parser.

use super::connect::{CIPHERS, MAX_WINDOW, MIN_WINDOW};
use super::reactor::{CHUNK, PACKET};
use super::*;
use ssh2::{MethodType, Session};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
fn live_host_key_alias_and_known_hosts_files_from_the_config() {
    let bed = TestSshd::start();
    let home = bed.path("home");
    std::fs::remove_file(home.join(".ssh/known_hosts")).unwrap();
    std::fs::write(
        home.join(".ssh/config"),
        format!(
            "Host vault\n HostName 127.0.0.1\n Port {}\n HostKeyAlias vault-key\n \
             UserKnownHostsFile ~/kh/first ~/kh/second\n GlobalKnownHostsFile ~/kh/global\n",
            bed.port
        ),
    )
    .unwrap();
    std::fs::create_dir_all(home.join("kh")).unwrap();
    let key = bed.host_key_line();
    let key = key.split_once(' ').unwrap().1;
    let mut opts = bed.opts();
    opts.port = None;
    let vault = SshSpec::parse("root@vault");

    // The key under the alias in the global file: known.
    std::fs::write(home.join("kh/global"), format!("vault-key {key}")).unwrap();
    std::env::remove_var("SSH_AUTH_SOCK");
    let host = SshHost::connect(&vault, &opts).unwrap();
    assert_eq!(host.run(&argv(&["echo", "ok"])).unwrap().stdout, "ok\n");
    drop(host);

    // Another key under the alias in the second user file: changed, and
    // --accept-new-host-key does not accept it.
    let other = "AAAAC3NzaC1lZDI1NTE5AAAAIHiD1HWOXk5VDyTvPiyInpDv/3sObNoM4vMKIK55zgWh";
    std::fs::remove_file(home.join("kh/global")).unwrap();
    std::fs::write(
        home.join("kh/second"),
        format!("vault-key ssh-ed25519 {other}\n"),
    )
    .unwrap();
    opts.accept_new_host_key = true;
    let err = bed.connect_err(&vault, &opts);
    assert!(
        err.starts_with("HOST KEY FOR vault-key HAS CHANGED"),
        "{err}"
    );
    assert!(!home.join("kh/first").exists(), "nothing was written");

    // Unknown: accepted into the first user file, under the alias.
    std::fs::remove_file(home.join("kh/second")).unwrap();
    drop(SshHost::connect(&vault, &opts).unwrap());
    assert_eq!(
        std::fs::read_to_string(home.join("kh/first")).unwrap(),
        format!("vault-key {key}")
    );
    opts.accept_new_host_key = false;
    drop(SshHost::connect(&vault, &opts).unwrap());
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

/// What each cipher costs the client: 1 GiB read through one channel,
/// wall speed and this thread's CPU time (getrusage RUSAGE_THREAD), so the
/// preference in `CIPHERS` is chosen by measurement.
#[test]
#[ignore]
fn live_cipher_cost() {
    let bed = TestSshd::start();
    for cipher in [
        "chacha20-poly1305@openssh.com",
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-ctr",
    ] {
        for (what, cmd) in [
            ("read", "head -c 1G /dev/zero"),
            ("write", "cat >/dev/null"),
        ] {
            let tcp = TcpStream::connect(("127.0.0.1", bed.port)).unwrap();
            let mut sess = Session::new().unwrap();
            sess.set_tcp_stream(tcp);
            sess.method_pref(MethodType::CryptCs, cipher).unwrap();
            sess.method_pref(MethodType::CryptSc, cipher).unwrap();
            sess.handshake().unwrap();
            sess.userauth_pubkey_file("root", None, &bed.path("home/.ssh/id_ed25519"), None)
                .unwrap();
            let mut ch = sess
                .channel_open("session", MAX_WINDOW, PACKET, None)
                .unwrap();
            ch.exec(cmd).unwrap();
            let cpu0 = thread_cpu();
            let started = Instant::now();
            let mut buf = vec![0u8; CHUNK];
            if what == "read" {
                while ch.read(&mut buf).unwrap() > 0 {}
            } else {
                for _ in 0..(1usize << 30) / CHUNK {
                    ch.write_all(&buf).unwrap();
                }
                ch.send_eof().unwrap();
                ch.wait_eof().unwrap();
            }
            let took = started.elapsed();
            eprintln!(
                "{cipher} {what}: {:.0} MB/s, client CPU {:.2} s/GiB",
                mb_per_s(1 << 30, took),
                thread_cpu() - cpu0
            );
        }
    }
}

fn thread_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6
}
