//! The test bed as the integration tests see it: the env file that
//! `scripts/testbed.sh up` wrote (named by `$RESYNC_TESTBED`), and helpers
//! that act on the real thing — local `zfs` against zfs-fuse, OpenSSH into
//! the two namespace hosts, link cuts on their veth pairs, and the resync
//! binary under test. Nothing here is mocked and nothing is skipped: a test
//! that runs without a bed panics and says how to get one.
//!
//! Parallel tests share the bed. Datasets are kept apart by `unique_name`;
//! the network is kept consistent by a process-wide lock: `ssh`, `resync`
//! and `Resync::spawn` hold it shared while they run, `link_down` (or
//! `exclusive_network`) holds it exclusively, so no other test sees a cut it
//! did not make.
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

/// Default time limit for one resync run.
pub const RESYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time limit for one `ssh` helper call.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time limit for one local `zfs` call.
pub const ZFS_TIMEOUT: Duration = Duration::from_secs(120);

/// The bed described by the env file. Field names follow its keys
/// (`TB_POOL_A` -> `pool_a`).
#[derive(Debug)]
pub struct Bed {
    pub runid: String,
    /// State dir of the bed (`TB_DIR`).
    pub dir: PathBuf,
    /// Fake HOME with .ssh/{id_ed25519,known_hosts,config} (`TB_HOME`).
    pub home: PathBuf,
    /// Client private key (`TB_KEY`).
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    pub ssh_config: PathBuf,
    /// Sandbox pools, both served by the machine's one zfs-fuse daemon.
    pub pool_a: String,
    pub pool_b: String,
    /// Address of the root namespace on the bed's bridge (10.213.0.1).
    pub root_addr: String,
    /// Host addresses (10.213.0.2 and 10.213.0.3).
    pub host_a: String,
    pub host_b: String,
    /// ssh config alias that resolves to `alias_host` with user root.
    pub alias: String,
    pub alias_host: String,
    pub ns_a: String,
    pub ns_b: String,
    /// Root-side veth ends: `ip link set LINK down` cuts the host off.
    pub link_a: String,
    pub link_b: String,
    /// An address in the bed's subnet where nothing answers.
    pub unused_addr: String,
}

static BED: OnceLock<Bed> = OnceLock::new();

impl Bed {
    /// The bed named by `$RESYNC_TESTBED`, read once. Panics when there is
    /// none: these tests never skip.
    pub fn get() -> &'static Bed {
        BED.get_or_init(|| {
            let path = std::env::var_os("RESYNC_TESTBED").unwrap_or_else(|| {
                panic!(
                    "test bed not up: RESYNC_TESTBED is not set. Run scripts/test.sh \
                     (or `scripts/testbed.sh up` and export RESYNC_TESTBED=STATE_DIR/env)"
                )
            });
            let path = PathBuf::from(path);
            let text = fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "test bed not up: cannot read env file {} ({e}); run scripts/test.sh",
                    path.display()
                )
            });
            Bed::parse(&text, &path)
        })
    }

    fn parse(text: &str, path: &Path) -> Bed {
        let mut vars = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim_matches(|c| c == '"' || c == '\'');
                vars.insert(k.trim().to_string(), v.to_string());
            }
        }
        let get = |k: &str| -> String {
            vars.get(k).cloned().unwrap_or_else(|| {
                panic!(
                    "test bed env file {} lacks {k}: run scripts/test.sh",
                    path.display()
                )
            })
        };
        let bed = Bed {
            runid: get("TB_RUNID"),
            dir: get("TB_DIR").into(),
            home: get("TB_HOME").into(),
            key: get("TB_KEY").into(),
            known_hosts: get("TB_KNOWN_HOSTS").into(),
            ssh_config: get("TB_SSH_CONFIG").into(),
            pool_a: get("TB_POOL_A"),
            pool_b: get("TB_POOL_B"),
            root_addr: get("TB_ROOT_ADDR"),
            host_a: get("TB_HOST_A"),
            host_b: get("TB_HOST_B"),
            alias: get("TB_ALIAS"),
            alias_host: get("TB_ALIAS_HOST"),
            ns_a: get("TB_NS_A"),
            ns_b: get("TB_NS_B"),
            link_a: get("TB_LINK_A"),
            link_b: get("TB_LINK_B"),
            unused_addr: get("TB_UNUSED_ADDR"),
        };
        assert!(
            bed.dir.is_dir(),
            "test bed not up: state dir {} is gone; run scripts/test.sh",
            bed.dir.display()
        );
        bed
    }

    /// A fresh dataset name on pool A (not created).
    pub fn ds_a(&self, prefix: &str) -> String {
        format!("{}/{}", self.pool_a, unique_name(prefix))
    }

    /// A fresh dataset name on pool B (not created).
    pub fn ds_b(&self, prefix: &str) -> String {
        format!("{}/{}", self.pool_b, unique_name(prefix))
    }

    /// The root-side link of a host, given its address, `user@address`,
    /// the alias, or its netns name.
    pub fn link_of(&self, host: &str) -> &str {
        let h = host.rsplit('@').next().unwrap_or(host);
        if h == self.host_a || h == self.ns_a {
            &self.link_a
        } else if h == self.host_b || h == self.ns_b || h == self.alias {
            &self.link_b
        } else {
            panic!(
                "{host} is not a host of the test bed ({} / {})",
                self.host_a, self.host_b
            )
        }
    }
}

// ---------------------------------------------------------------------------
// Names and data

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique within this test run: `PREFIX-N-PID`. Valid in dataset and
/// snapshot names.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{n}-{}", std::process::id())
}

/// `root@HOST:DS`, as resync takes a remote dataset.
pub fn remote(host: &str, ds: &str) -> String {
    if host.contains('@') {
        format!("{host}:{ds}")
    } else {
        format!("root@{host}:{ds}")
    }
}

/// Creates `ds` (and missing parents), waits until it is mounted, writes
/// `files` (relative path, size in bytes) with pseudo-random content and
/// returns its mountpoint.
pub fn create_dataset_with_data(ds: &str, files: &[(&str, usize)]) -> PathBuf {
    zfs(&["create", "-p", ds]);
    let mp = mountpoint(ds);
    write_files(ds, files);
    mp
}

/// Writes (or overwrites) files under the mounted dataset `ds`, each with
/// fresh pseudo-random content: writing the same path twice changes it.
pub fn write_files(ds: &str, files: &[(&str, usize)]) {
    let mp = mountpoint(ds);
    for (rel, size) in files {
        let path = mp.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        let seed = COUNTER.fetch_add(1, Ordering::Relaxed)
            ^ fnv1a(ds.as_bytes())
            ^ fnv1a(rel.as_bytes()).rotate_left(17);
        let mut rng = XorShift(seed | 1);
        let mut f =
            fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let mut buf = vec![0u8; 1 << 16];
        let mut left = *size;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            left -= n;
        }
        f.sync_all()
            .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// ZFS

/// Runs local `zfs ARGS`; returns stdout, panics with stderr on failure.
#[track_caller]
pub fn zfs(args: &[&str]) -> String {
    let out = run(cmd("zfs", args), ZFS_TIMEOUT, None);
    if !out.success() {
        panic!("zfs {} failed:\n{out}", args.join(" "));
    }
    out.stdout
}

/// Runs local `zfs ARGS`; true if it exited 0.
pub fn zfs_ok(args: &[&str]) -> bool {
    run(cmd("zfs", args), ZFS_TIMEOUT, None).success()
}

/// Whether the dataset, snapshot or volume exists.
pub fn exists(name: &str) -> bool {
    zfs_ok(&["list", "-H", "-o", "name", name])
}

/// `zfs snapshot DS@NAME`.
#[track_caller]
pub fn snapshot(ds: &str, name: &str) {
    zfs(&["snapshot", &format!("{ds}@{name}")]);
}

/// The snapshots of `ds` (not of its children) as (short name, guid),
/// oldest first (by createtxg).
#[track_caller]
pub fn snapshots(ds: &str) -> Vec<(String, u64)> {
    let out = zfs(&[
        "get",
        "-Hp",
        "-d",
        "1",
        "-o",
        "name,property,value",
        "guid,createtxg",
        ds,
    ]);
    let prefix = format!("{ds}@");
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split('\t');
        let (Some(name), Some(prop), Some(value)) = (f.next(), f.next(), f.next()) else {
            panic!("unexpected zfs get line: {line:?}");
        };
        let Some(short) = name.strip_prefix(&prefix) else {
            continue;
        };
        let v: u64 = value
            .parse()
            .unwrap_or_else(|_| panic!("zfs get {prop} of {name}: not a number: {value:?}"));
        let e = by_name.entry(short.to_string()).or_default();
        match prop {
            "guid" => e.0 = v,
            "createtxg" => e.1 = v,
            _ => {}
        }
    }
    let mut v: Vec<(String, u64, u64)> = by_name.into_iter().map(|(n, (g, t))| (n, g, t)).collect();
    v.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
    v.into_iter().map(|(n, g, _)| (n, g)).collect()
}

/// Mountpoint of a mounted dataset; panics if it is not mounted.
#[track_caller]
pub fn mountpoint(ds: &str) -> PathBuf {
    let out = zfs(&["get", "-H", "-o", "value", "mountpoint,mounted", ds]);
    let mut lines = out.lines();
    let mp = lines.next().unwrap_or("").trim().to_string();
    let mounted = lines.next().unwrap_or("").trim().to_string();
    assert!(
        mp.starts_with('/'),
        "dataset {ds} has no usable mountpoint ({mp:?})"
    );
    assert_eq!(
        mounted, "yes",
        "dataset {ds} is not mounted (mountpoint {mp})"
    );
    PathBuf::from(mp)
}

/// `zfs destroy -r DS`, retried while zfs-fuse calls it busy (it does for
/// a moment after a dataset was mounted).
#[track_caller]
pub fn destroy(ds: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = run(cmd("zfs", &["destroy", "-r", ds]), ZFS_TIMEOUT, None);
        if out.success() {
            return;
        }
        if !out.stderr.contains("busy") || Instant::now() > deadline {
            panic!("zfs destroy -r {ds} failed:\n{out}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// MD5 (hex) of every regular file and symlink under the mounted dataset,
/// keyed by path relative to its mountpoint. Does not descend into `.zfs`
/// or into other mounts (child datasets): compare those on their own.
#[track_caller]
pub fn tree_checksums(ds: &str) -> BTreeMap<String, String> {
    let root = mountpoint(ds);
    let dev = fs::metadata(&root)
        .unwrap_or_else(|e| panic!("stat {}: {e}", root.display()))
        .dev();
    let mut out = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let path = entry.path();
            let rel = path
                .strip_prefix(&root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if rel == ".zfs" {
                continue;
            }
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path)
                    .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()));
                out.insert(rel, format!("symlink:{}", target.display()));
            } else if meta.is_dir() {
                if meta.dev() == dev {
                    stack.push(path);
                }
            } else if meta.is_file() {
                out.insert(rel, md5_file(&path));
            }
        }
    }
    out
}

fn md5_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Processes

/// What a finished (or killed) process left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code; None if killed by a signal (see `signal`) or timed out.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The time limit ran out and the process group was killed.
    pub timed_out: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn code(&self) -> Option<i32> {
        self.code
    }

    /// Panics (showing everything) unless the exit code was 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "expected success, got:\n{self}");
        self
    }

    /// Panics (showing everything) unless the process exited non-zero on
    /// its own (not killed, not timed out).
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a non-zero exit, got:\n{self}"
        );
        self
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match (self.timed_out, self.code, self.signal) {
            (true, _, _) => "TIMED OUT (killed)".to_string(),
            (_, Some(c), _) => format!("exit code {c}"),
            (_, None, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown status".to_string(),
        };
        writeln!(f, "--- {how} after {:.1?}", self.elapsed)?;
        writeln!(f, "--- stdout:\n{}", self.stdout)?;
        write!(f, "--- stderr:\n{}", self.stderr)
    }
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// A process started with piped output in its own process group, with a
/// time limit measured from its start.
pub struct Running {
    child: Child,
    out_rx: mpsc::Receiver<String>,
    err_rx: mpsc::Receiver<String>,
    started: Instant,
    timeout: Duration,
    _net: Option<NetShared>,
}

impl Running {
    fn start(mut c: Command, timeout: Duration, net: Option<NetShared>) -> Running {
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let started = Instant::now();
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", c.get_program()));
        let out_rx = reader(child.stdout.take());
        let err_rx = reader(child.stderr.take());
        Running {
            child,
            out_rx,
            err_rx,
            started,
            timeout,
            _net: net,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal to the whole process group.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), sig);
        }
    }

    /// Waits for exit (killing the group at the time limit) and collects
    /// the output.
    pub fn wait(mut self) -> Output {
        let deadline = self.started + self.timeout;
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    self.signal(libc::SIGKILL);
                    break self.child.wait().expect("wait for killed child");
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("wait: {e}"),
            }
        };
        let elapsed = self.started.elapsed();
        // A leftover grandchild may hold the pipes open: give it a moment,
        // then kill the group, then give up on the rest of the output.
        let collect = |rx: &mpsc::Receiver<String>, this: &Running| -> String {
            match rx.recv_timeout(Duration::from_secs(3)) {
                Ok(s) => s,
                Err(_) => {
                    this.signal(libc::SIGKILL);
                    rx.recv_timeout(Duration::from_secs(3)).unwrap_or_else(|_| {
                        "<output pipe held open by a leftover process>".to_string()
                    })
                }
            }
        };
        let stdout = collect(&self.out_rx, &self);
        let stderr = collect(&self.err_rx, &self);
        Output {
            code: if timed_out { None } else { status.code() },
            signal: status.signal(),
            stdout,
            stderr,
            elapsed,
            timed_out,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

fn run(c: Command, timeout: Duration, net: Option<NetShared>) -> Output {
    Running::start(c, timeout, net).wait()
}

// ---------------------------------------------------------------------------
// resync

/// Path of the resync binary under test (the debug build cargo test made).
pub fn resync_bin() -> &'static str {
    env!("CARGO_BIN_EXE_resync")
}

/// Runs resync with ARGS: HOME is the bed's fake home, SSH_AUTH_SOCK is
/// removed, stdin is /dev/null, time limit `RESYNC_TIMEOUT`.
pub fn resync(args: &[&str]) -> Output {
    Resync::new(args).run()
}

/// A resync invocation with more control: extra environment, time limit,
/// another copy of the binary, or started in the background (`spawn`) to cut
/// a link under it.
pub struct Resync {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    timeout: Duration,
    program: Option<PathBuf>,
}

impl Resync {
    pub fn new(args: &[&str]) -> Resync {
        Resync {
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: Vec::new(),
            timeout: RESYNC_TIMEOUT,
            program: None,
        }
    }

    /// Runs the executable at `path` (a copy of `resync_bin()`, say)
    /// instead of the one cargo built.
    pub fn program(mut self, path: &Path) -> Resync {
        self.program = Some(path.to_path_buf());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Resync {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Resync {
        self.timeout = t;
        self
    }

    fn command(&self) -> Command {
        let bed = Bed::get();
        let program = self
            .program
            .as_deref()
            .unwrap_or_else(|| Path::new(resync_bin()));
        let mut c = Command::new(program);
        c.args(&self.args)
            .env("HOME", &bed.home)
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_AGENT_PID");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    /// Starts resync in the background.
    pub fn spawn(self) -> Running {
        let c = self.command();
        Running::start(c, self.timeout, net_shared())
    }

    /// Runs resync to the end (or the time limit).
    pub fn run(self) -> Output {
        self.spawn().wait()
    }
}

// ---------------------------------------------------------------------------
// SSH

/// OpenSSH to a bed host with the bed's key, known_hosts and config (OpenSSH
/// takes ~ from the password database, not $HOME, so all are explicit).
/// `host` is an address (user root), `user@address` or the alias.
pub fn ssh_command(host: &str, remote_cmd: &str) -> Command {
    let bed = Bed::get();
    let target = if host.contains('@') || host == bed.alias {
        host.to_string()
    } else {
        format!("root@{host}")
    };
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(&bed.ssh_config)
        .arg("-i")
        .arg(&bed.key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", bed.known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "ServerAliveInterval=1",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(target)
        .arg("--")
        .arg(remote_cmd)
        .env_remove("SSH_AUTH_SOCK");
    c
}

/// Runs `remote_cmd` on a host; returns stdout, panics on failure.
#[track_caller]
pub fn ssh(host: &str, remote_cmd: &str) -> String {
    let out = ssh_output(host, remote_cmd);
    if !out.success() {
        panic!("ssh {host} {remote_cmd:?} failed:\n{out}");
    }
    out.stdout
}

/// Runs `remote_cmd` on a host and returns whatever happened.
pub fn ssh_output(host: &str, remote_cmd: &str) -> Output {
    run(ssh_command(host, remote_cmd), SSH_TIMEOUT, net_shared())
}

// ---------------------------------------------------------------------------
// Network: link cuts and the lock that keeps them from surprising others

static NET: RwLock<()> = RwLock::new(());

thread_local! {
    static EXCLUSIVE: Cell<bool> = const { Cell::new(false) };
    static SHARED: Cell<u32> = const { Cell::new(0) };
}

/// Shared hold on the network for one operation (none if this thread holds
/// it exclusively already).
pub struct NetShared {
    _guard: RwLockReadGuard<'static, ()>,
    _file: fs::File,
}

impl Drop for NetShared {
    fn drop(&mut self) {
        SHARED.with(|s| s.set(s.get().saturating_sub(1)));
    }
}

fn net_shared() -> Option<NetShared> {
    if EXCLUSIVE.with(|e| e.get()) {
        return None;
    }
    let guard = NET.read().unwrap_or_else(|e| e.into_inner());
    let file = net_file_lock(libc::LOCK_SH);
    SHARED.with(|s| s.set(s.get() + 1));
    Some(NetShared {
        _guard: guard,
        _file: file,
    })
}

/// Exclusive hold on the bed's network: waits until no other test is using
/// ssh or resync, and keeps them waiting until dropped. Take it before
/// spawning a resync that you will cut a link under.
pub struct NetExclusive {
    guard: Option<(RwLockWriteGuard<'static, ()>, fs::File)>,
}

impl Drop for NetExclusive {
    fn drop(&mut self) {
        if self.guard.take().is_some() {
            EXCLUSIVE.with(|e| e.set(false));
        }
    }
}

/// The same lock across processes: several `cargo test` runs may share one
/// bed (while developing), and a cut in one must not surprise another. An
/// flock on a file in the bed's state dir: shared for ssh/resync, exclusive
/// for a cut. The in-process RwLock comes first, so a process never waits on
/// its own shared holds.
fn net_file_lock(op: libc::c_int) -> fs::File {
    use std::os::unix::io::AsRawFd;
    let path = Bed::get().dir.join("net.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return file;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            panic!("flock {}: {err}", path.display());
        }
    }
}

#[track_caller]
pub fn exclusive_network() -> NetExclusive {
    if EXCLUSIVE.with(|e| e.get()) {
        return NetExclusive { guard: None };
    }
    assert_eq!(
        SHARED.with(|s| s.get()),
        0,
        "this thread still runs ssh/resync holding the network shared: call \
         bed::exclusive_network() before spawning it"
    );
    let guard = NET.write().unwrap_or_else(|e| e.into_inner());
    let file = net_file_lock(libc::LOCK_EX);
    EXCLUSIVE.with(|e| e.set(true));
    NetExclusive {
        guard: Some((guard, file)),
    }
}

/// A cut link; dropping it brings the link back up (also when the test
/// panics), then releases the network.
pub struct LinkGuard {
    link: String,
    _net: NetExclusive,
}

impl LinkGuard {
    pub fn link(&self) -> &str {
        &self.link
    }

    /// Brings the link up now (the guard keeps the network exclusive).
    pub fn restore(&self) {
        set_link(&self.link, "up");
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let out = run(
            cmd("ip", &["link", "set", &self.link, "up"]),
            ZFS_TIMEOUT,
            None,
        );
        if !out.success() {
            eprintln!(
                "WARNING: could not bring link {} back up:\n{out}",
                self.link
            );
        }
    }
}

/// Cuts `host` off (`ip link set LINK down` on its root-side veth).
/// Traffic in flight freezes; it does not reset.
#[track_caller]
pub fn link_down(host: &str) -> LinkGuard {
    let net = exclusive_network();
    let link = Bed::get().link_of(host).to_string();
    set_link(&link, "down");
    LinkGuard { link, _net: net }
}

/// Brings `host`'s link up.
#[track_caller]
pub fn link_up(host: &str) {
    set_link(Bed::get().link_of(host), "up");
}

#[track_caller]
fn set_link(link: &str, state: &str) {
    let out = run(cmd("ip", &["link", "set", link, state]), ZFS_TIMEOUT, None);
    if !out.success() {
        panic!("ip link set {link} {state} failed:\n{out}");
    }
}

/// The target must hold the source's newest snapshot, every snapshot the
/// two share by name with the same GUID, and the same files.
#[track_caller]
pub fn assert_replica(src: &str, dst: &str) {
    let s = snapshots(src);
    let d = snapshots(dst);
    let newest = s.last().expect("source has snapshots");
    assert!(d.contains(newest), "target {dst} lacks {newest:?}: {d:?}");
    for snap in &d {
        if let Some(same) = s.iter().find(|x| x.0 == snap.0) {
            assert_eq!(same.1, snap.1, "GUID of @{} differs", snap.0);
        }
    }
    assert_eq!(
        tree_checksums(src),
        tree_checksums(dst),
        "file contents differ"
    );
}

/// Is a `zfs receive` into `ds` running anywhere on this machine? The
/// namespace hosts share its process table, so this sees theirs too.
pub fn zfs_receive_running(ds: &str) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        args.contains(&&b"receive"[..]) && args.contains(&ds.as_bytes())
    })
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}
