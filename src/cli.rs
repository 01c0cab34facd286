//! The command line: every flag is defined here once, with its help text, and
//! checked here. Two stages, as in ripgrep: clap validates what was typed, then
//! [`Cli::resolve`] turns it into a [`Config`] (parsed addresses, validated
//! dataset names, compiled regexes, zfs option lists), grouped by concern:
//! [`SshSettings`], [`ChunkSettings`] (present only with `--chunked`) and
//! [`Protection`]. Like ripgrep's `HiArgs`, the `Config` builds the options
//! the layers below take ([`Config::ssh_options`], [`Config::chunk_options`]),
//! so the rules that derive them live beside the flags. No I/O happens here
//! ($HOME is passed in), so a bad argument is refused before any command runs
//! on any host.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use regex::Regex;

use crate::bwlimit;
use crate::chunk::orchestrator;
use crate::compress::{self, Compress};
use crate::host::ssh::sshconfig::{self, CommandLineOption};
use crate::host::ssh::{DataPath, SshOptions, SshOverrides};
use crate::plan::snapfilter::SnapFilter;
use crate::plan::syncsnap;
use crate::progress::Verbosity;
use crate::transfer::direct::Direct;
use crate::zfs::{self, Dataset};

const EXAMPLES: &str = "\
Examples:
  Push a dataset to a backup host (full the first time, incremental after):
    resync tank/vm root@backup:pool/vm

  Pull from a remote host to this machine:
    resync root@nas:tank/photos backup/photos

  A whole tree, children too, skipping scratch datasets:
    resync -r --exclude-datasets='/scratch$' tank/home root@backup:pool/home

  Remote to remote (this machine relays the stream):
    resync root@a:tank/db root@b:pool/db

  A cron line (quiet unless something fails; exit 1 = some datasets failed):
    17 * * * * /usr/local/bin/resync -r --quiet --identifier=hourly tank/vm root@backup:pool/vm

Man page and shell completions: resync generate man|bash|zsh|fish (see INSTALL.md).

Exit status: 0 all done, 1 some datasets failed in a recursive run, 2 error.";

/// resync replicates ZFS datasets between hosts, syncoid-style.
///
/// SOURCE and TARGET are each `pool/dataset` on this machine, or
/// `[user@]host:pool/dataset` on a remote host reached over SSH (host aliases
/// from ~/.ssh/config work). A side whose part before the first ':' contains
/// a '/' is local.
#[derive(Parser, Debug)]
#[command(name = "resync", version, about, long_about, after_help = EXAMPLES)]
pub struct Cli {
    /// Source dataset: pool/ds, host:pool/ds or user@host:pool/ds.
    #[arg(value_name = "SOURCE")]
    pub source: String,

    /// Target dataset: pool/ds, host:pool/ds or user@host:pool/ds.
    #[arg(value_name = "TARGET")]
    pub target: String,

    /// Also replicate all child datasets of SOURCE.
    #[arg(short = 'r', long)]
    pub recursive: bool,

    /// With -r, leave SOURCE itself out and replicate only its children.
    #[arg(long, requires = "recursive")]
    pub skip_parent: bool,

    /// Skip source datasets whose full name matches REGEX (repeatable).
    #[arg(long = "exclude-datasets", value_name = "REGEX")]
    pub exclude_datasets: Vec<String>,

    /// Old spelling of --exclude-datasets (syncoid's, deprecated there too);
    /// ignored when --exclude-datasets is given, as in syncoid.
    #[arg(long = "exclude", value_name = "REGEX")]
    pub exclude_old: Vec<String>,

    /// Send only snapshots whose name matches REGEX (repeatable; a name that
    /// also matches --exclude-snaps is left out).
    #[arg(long = "include-snaps", value_name = "REGEX")]
    pub include_snaps: Vec<String>,

    /// Don't send snapshots whose name matches REGEX (repeatable).
    #[arg(long = "exclude-snaps", value_name = "REGEX")]
    pub exclude_snaps: Vec<String>,

    /// After success, destroy target snapshots that no longer exist on the
    /// source (never the next incremental base, never one another job holds).
    #[arg(long)]
    pub delete_target_snapshots: bool,

    /// Print the snapshots of both sides of each dataset as the run sees them.
    #[arg(long)]
    pub dumpsnaps: bool,

    /// With -r, send clones in full instead of as clones of their origin's
    /// copy on the target (zfs send -i ORIGIN).
    #[arg(long)]
    pub no_clone_handling: bool,

    /// Set the source's locally set properties on the target, locally
    /// (zfs receive -o, or zfs set after it where receive cannot), as syncoid does.
    #[arg(long)]
    pub preserve_properties: bool,

    /// Set the source's recordsize on the target (filesystems), as syncoid does.
    #[arg(long)]
    pub preserve_recordsize: bool,

    /// Move the stream over plain TCP, UNENCRYPTED and uncompressed: the
    /// target listens on LISTEN_IP:PORT (default: the first address) for
    /// TIMEOUT seconds (default 60), the source connects to IP:PORT. One end
    /// must be this machine; not with --chunked.
    #[arg(long, value_name = "IP:PORT[,LISTEN_IP:PORT[,TIMEOUT[,mbuffer]]]")]
    pub insecure_direct_connection: Option<String>,

    /// Tag sync snapshots with ID so several jobs on one dataset don't prune each other's.
    #[arg(long, value_name = "ID")]
    pub identifier: Option<String>,

    /// Don't take a sync snapshot; replicate up to the newest existing snapshot.
    #[arg(long)]
    pub no_sync_snap: bool,

    /// Keep older sync snapshots instead of pruning them after success.
    #[arg(long)]
    pub keep_sync_snap: bool,

    /// Send only the newest snapshot (zfs send -i), not every snapshot in between (-I).
    #[arg(long)]
    pub no_stream: bool,

    /// Extra zfs send flags in syncoid's syntax, e.g. "Lc e" for -L -c -e.
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    pub sendoptions: Option<String>,

    /// Extra zfs receive flags in syncoid's syntax, e.g. "u o compression=lz4".
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    pub recvoptions: Option<String>,

    /// Don't resume an interrupted receive; discard its partial state and start the step again.
    #[arg(long)]
    pub no_resume: bool,

    /// Destroy target data that conflicts with the source (no common snapshot, diverged target).
    #[arg(long)]
    pub force_delete: bool,

    /// Receive without -F: fail instead of rolling back changes made on the target.
    #[arg(long)]
    pub no_rollback: bool,

    /// Replicate up to N datasets of a recursive run at once (a child after its parent;
    /// 1 with --chunked or --insecure-direct-connection).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,

    /// Hold the snapshots a transfer needs, and afterwards the last replicated snapshot on
    /// both sides (zfs hold), so other tools' pruning cannot break the next incremental.
    /// The tag names this job (--identifier and the other side); older holds of the job are released.
    #[arg(long)]
    pub use_hold: bool,

    /// Bookmark the last replicated snapshot on the source after success (zfs bookmark,
    /// same name), so the next run can send incrementally from it after the snapshot is gone.
    #[arg(long)]
    pub create_bookmark: bool,

    /// Run zfs directly on hosts where the user is not root, for users with `zfs allow`
    /// delegation; by default such hosts run zfs through `sudo -n`, as syncoid does.
    #[arg(long)]
    pub no_privilege_elevation: bool,

    /// Private key file for SSH (tried after ssh-agent).
    #[arg(long, value_name = "FILE")]
    pub sshkey: Option<PathBuf>,

    /// SSH port for remote hosts (overrides ~/.ssh/config).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub sshport: Option<u16>,

    /// Read this ssh_config(5) file instead of ~/.ssh/config (ssh -F).
    #[arg(long, value_name = "FILE")]
    pub sshconfig: Option<PathBuf>,

    /// The SSH ciphers to offer, comma-separated (ssh -c), e.g. aes128-gcm@openssh.com.
    #[arg(short = 'c', long, value_name = "CIPHER")]
    pub sshcipher: Option<String>,

    /// An ssh option KEY=VALUE (repeatable): Port, User, IdentityFile,
    /// IdentitiesOnly, ConnectTimeout, ServerAliveInterval,
    /// StrictHostKeyChecking, UserKnownHostsFile, HostKeyAlias.
    #[arg(short = 'o', long, value_name = "KEY=VALUE")]
    pub sshoption: Vec<String>,

    /// Add an unknown host key to ~/.ssh/known_hosts instead of refusing (a changed key is still refused).
    #[arg(long)]
    pub accept_new_host_key: bool,

    /// What carries the stream of default mode to and from a remote: `auto` runs it
    /// through the system's OpenSSH `ssh` when installed (one master connection per
    /// host per run, same host, user, keys and known_hosts; far less CPU per byte),
    /// falling back to libssh2, which carries everything else; `libssh2` never
    /// uses `ssh`.
    #[arg(long, value_name = "HOW", default_value = "auto", value_parser = ["auto", "libssh2"])]
    pub ssh_data: String,

    /// Limit the stream read from the source to RATE bytes/s, e.g. 800k, 10M, 1.5G
    /// (k/M/G/T are powers of 1024). resync moves the stream through one process, so
    /// --source-bwlimit and --target-bwlimit throttle the same stream: the smaller wins.
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub source_bwlimit: Option<u64>,

    /// Limit the stream written to the target to RATE bytes/s (same syntax and the
    /// same single stream as --source-bwlimit: the smaller of the two wins).
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub target_bwlimit: Option<u64>,

    /// Compress the stream on the wire: default (zstd at a level that follows the link,
    /// off while data does not shrink), none, or one of syncoid's names (lz4, lzo,
    /// zstd-fast, zstd-slow, gzip, pigz-fast, pigz-slow, xz, zstdmt-*), each mapped to a
    /// zstd level (see README). Runs our own binary on remote hosts in default mode.
    #[arg(long, value_name = "NAME", default_value = "default", value_parser = compress::parse_flag)]
    pub compress: Compress,

    /// Move each stream as MD5-verified chunk files through folders on both hosts,
    /// so that a broken link costs at most the chunks in flight (resumes by itself
    /// on reconnect). Runs our own binary on remote hosts (uploaded to --tmpdir).
    #[arg(long)]
    pub chunked: bool,

    /// With --chunked: bytes per chunk, e.g. 1M, 64M, 1G (powers of 1024; at most 1G).
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_chunk_size)]
    pub chunk_size: u64,

    /// With --chunked: chunks staged per side (copied in parallel, at most 6 at once).
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    pub chunk_window: u64,

    /// With --chunked: where session folders (and the uploaded binary) go on each host.
    #[arg(long, value_name = "DIR", default_value = "/tmp", value_parser = parse_tmpdir)]
    pub tmpdir: String,

    /// Give up after this long without progress, e.g. 30s, 10m, 1h.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Show the plan (snapshots to take, streams to send, snapshots to prune) and change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,

    /// Print only errors.
    #[arg(long, conflicts_with = "debug")]
    pub quiet: bool,

    /// Print every command run on every host.
    #[arg(long)]
    pub debug: bool,

    /// Write one JSON document about the run to stdout (schema in README);
    /// everything else goes to stderr as usual.
    #[arg(long, conflicts_with = "dry_run")]
    pub json: bool,

    /// syncoid's mbuffer size: no effect (resync buffers the stream itself).
    #[arg(long, value_name = "SIZE")]
    pub mbuffer_size: Option<String>,

    /// syncoid's pv options: no effect (resync draws its own progress).
    #[arg(long, value_name = "OPTIONS", allow_hyphen_values = true)]
    pub pv_options: Option<String>,

    /// syncoid's skip of its helper-command checks: no effect (resync runs no helper commands).
    #[arg(long)]
    pub no_command_checks: bool,

    /// syncoid's --monitor-version: no effect (it does nothing in syncoid either).
    #[arg(long)]
    pub monitor_version: bool,
}

/// The ciphers libssh2 (as built here) can offer, for `--sshcipher`.
const SSH_CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-cbc",
    "aes192-cbc",
    "aes256-cbc",
    "3des-cbc",
];

/// `--sshcipher`: a comma-separated list of ciphers libssh2 knows.
fn parse_ciphers(s: &str) -> Result<String> {
    let names: Vec<&str> = s.split(',').map(str::trim).collect();
    for name in &names {
        if !SSH_CIPHERS.contains(name) {
            bail!(
                "invalid --sshcipher {s:?}: {name:?} is not a cipher resync can offer ({})",
                SSH_CIPHERS.join(", ")
            );
        }
    }
    Ok(names.join(","))
}

/// A chunk size: a whole number of bytes with an optional k/M/G suffix
/// (powers of 1024) and optional `B`/`iB`, from 1 byte to 1 GiB.
fn parse_chunk_size(s: &str) -> Result<u64, String> {
    let hint = "use e.g. 1M, 64M, 1G (powers of 1024, at most 1G)";
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid chunk size {s:?}; {hint}"))?;
    let (shift, unit) = match suffix.chars().next() {
        Some('k' | 'K') => (10, &suffix[1..]),
        Some('m' | 'M') => (20, &suffix[1..]),
        Some('g' | 'G') => (30, &suffix[1..]),
        _ => (0, suffix),
    };
    let unit_ok = matches!(unit, "" | "B") || (unit == "iB" && shift > 0);
    if !unit_ok {
        return Err(format!("invalid chunk size {s:?}; {hint}"));
    }
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| (1..=crate::chunk::CHUNK_SIZE_MAX).contains(b))
        .ok_or_else(|| format!("chunk size {s:?} is out of range; {hint}"))?;
    Ok(bytes)
}

/// The tmpdir for session folders: an absolute path, no `..`.
fn parse_tmpdir(s: &str) -> Result<String, String> {
    let ok = s.starts_with('/')
        && !s.split('/').any(|c| c == "..")
        && !s.chars().any(|c| c.is_control());
    if !ok {
        return Err(format!(
            "--tmpdir {s:?} must be an absolute path without '..'"
        ));
    }
    Ok(s.to_string())
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. 30s, 10m, 1h"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("timeout {s:?} is too short; use at least 1s"));
    }
    Ok(d)
}

/// Compiles each REGEX given to `flag`; a bad one is a one-line error.
fn compile_all(flag: &str, patterns: &[String]) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .map(|r| {
            Regex::new(r).map_err(|e| {
                // regex's message draws a caret under the pattern on
                // several lines; its last line says what is wrong.
                let text = e.to_string();
                let why = text.lines().last().unwrap_or_default().trim().to_string();
                anyhow::anyhow!("invalid {flag} regex {r:?}: {why}")
            })
        })
        .collect()
}

/// Where a dataset lives: this machine, or a host reached over SSH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local,
    Remote { user: Option<String>, host: String },
}

/// Where one side of the replication is: a host and a dataset on it. (The
/// ZFS endpoint that runs commands there is `endpoint::ZfsHost`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub location: Location,
    pub dataset: Dataset,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            Location::Local => write!(f, "{}", self.dataset),
            Location::Remote {
                user: Some(u),
                host,
            } => write!(f, "{u}@{host}:{}", self.dataset),
            Location::Remote { user: None, host } => write!(f, "{host}:{}", self.dataset),
        }
    }
}

/// Parses `pool/ds`, `host:pool/ds`, `user@host:pool/ds` or `[v6addr]:pool/ds`.
/// ZFS allows ':' inside dataset names, so a side is remote only when the
/// part before the first ':' contains no '/'.
pub fn parse_address(arg: &str) -> Result<Address> {
    if arg.is_empty() {
        bail!("empty dataset argument");
    }
    let (location, dataset) = if let Some(rest) = arg.strip_prefix('[').or_else(|| {
        arg.find("@[")
            .map(|i| &arg[i + 1..])
            .and_then(|r| r.strip_prefix('['))
    }) {
        // IPv6 literal, optionally with user@ before the bracket.
        let user = arg.find("@[").map(|i| arg[..i].to_string());
        let close = rest
            .find(']')
            .with_context(|| format!("invalid endpoint {arg:?}: missing ']'"))?;
        let host = &rest[..close];
        let after = &rest[close + 1..];
        let ds = after
            .strip_prefix(':')
            .with_context(|| format!("invalid endpoint {arg:?}: expected ':' after ']'"))?;
        (remote(user, host, arg)?, ds)
    } else {
        match arg.split_once(':') {
            Some((before, after)) if !before.contains('/') => {
                let (user, host) = match before.rsplit_once('@') {
                    Some((u, h)) => (Some(u.to_string()), h),
                    None => (None, before),
                };
                (remote(user, host, arg)?, after)
            }
            _ => (Location::Local, arg),
        }
    };
    let dataset = Dataset::parse(dataset).with_context(|| format!("in {arg:?}"))?;
    Ok(Address { location, dataset })
}

fn remote(user: Option<String>, host: &str, arg: &str) -> Result<Location> {
    let host_ok = !host.is_empty()
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%'));
    if !host_ok {
        bail!("invalid host {host:?} in {arg:?}");
    }
    if let Some(u) = &user {
        let user_ok = !u.is_empty()
            && !u.starts_with('-')
            && u.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !user_ok {
            bail!("invalid user name {u:?} in {arg:?}");
        }
    }
    Ok(Location::Remote {
        user,
        host: host.to_string(),
    })
}

/// The resolved configuration of one run.
#[derive(Debug)]
pub struct Config {
    pub source: Address,
    pub target: Address,
    pub recursive: bool,
    pub skip_parent: bool,
    pub exclude: Vec<Regex>,
    /// `--include-snaps`/`--exclude-snaps`.
    pub snap_filter: SnapFilter,
    /// `--delete-target-snapshots`.
    pub delete_target_snapshots: bool,
    /// `--preserve-properties`, `--preserve-recordsize`.
    pub preserve: Preserve,
    /// `--dumpsnaps`.
    pub dumpsnaps: bool,
    /// Not `--no-clone-handling`: with `-r`, a clone whose origin is
    /// replicated in the run is sent as a clone.
    pub clone_handling: bool,
    /// Lines to print once at the start of the run: options that have no
    /// effect, or parts of an option that were left out, and why.
    pub notices: Vec<String>,
    pub no_stream: bool,
    pub send_options: Vec<String>,
    pub recv_options: Vec<String>,
    pub resume: bool,
    pub force_delete: bool,
    pub rollback: bool,
    /// `--no-privilege-elevation`: never `sudo -n zfs` (see `zfs::elevate`).
    pub no_privilege_elevation: bool,
    /// `--jobs`: datasets replicated at once.
    pub jobs: usize,
    /// Sync snapshots, holds and bookmarks.
    pub protection: Protection,
    /// How to reach remote hosts.
    pub ssh: SshSettings,
    /// `--chunked`: `None` for the plain pipe.
    pub chunk: Option<ChunkSettings>,
    /// The budget without progress, for the whole run: the stall watchdog of
    /// a transfer, the chunk orchestrator, reconnects, and (see
    /// [`Config::ssh_options`]) how long an SSH link may stay silent.
    pub timeout: Duration,
    /// Bytes per second, as given; see [`Config::bwlimit`].
    pub source_bwlimit: Option<u64>,
    pub target_bwlimit: Option<u64>,
    /// `--compress` (a named compressor that cannot run on a host is an
    /// error; the default falls back to none there).
    pub compress: Compress,
    /// `--insecure-direct-connection` (default mode, one end remote; no
    /// compression then).
    pub direct: Option<Direct>,
    /// `--tmpdir`: where our binary goes on remote hosts.
    pub tmpdir: String,
    pub dry_run: bool,
    /// `--json`: a report on stdout; `--dumpsnaps` goes to stderr then.
    pub json: bool,
    pub verbosity: Verbosity,
}

/// Which source properties are set on the target, as syncoid picks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preserve {
    Nothing,
    /// `--preserve-recordsize`: the recordsize of a filesystem.
    Recordsize,
    /// `--preserve-properties`: every locally set property but those
    /// syncoid leaves out (`zfs::parse_local_properties`).
    Properties,
}

/// What a run leaves behind so the next incremental has a base, and how it
/// names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protection {
    /// Take a sync snapshot (not `--no-sync-snap`).
    pub sync_snap: bool,
    /// `--keep-sync-snap`: don't prune older sync snapshots.
    pub keep_sync_snap: bool,
    /// `--identifier`: in sync snapshot names and hold tags.
    pub identifier: Option<String>,
    /// `--use-hold`.
    pub use_hold: bool,
    /// `--create-bookmark`.
    pub create_bookmark: bool,
}

/// How to reach remote hosts over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    /// `--sshkey`.
    pub key: Option<PathBuf>,
    /// `--sshport`.
    pub port: Option<u16>,
    /// `--accept-new-host-key`, or `-o StrictHostKeyChecking=accept-new`.
    pub accept_new_host_key: bool,
    /// `--ssh-data`.
    pub data_path: DataPath,
    /// `-o ConnectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `-o ServerAliveInterval`: the link counts as lost after three
    /// unanswered intervals, as with ssh's default ServerAliveCountMax.
    pub server_alive_interval: Option<Duration>,
    /// `--sshconfig`, `--sshcipher` and the rest of `--sshoption`.
    pub overrides: SshOverrides,
}

/// `--chunked` and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSettings {
    /// `--chunk-size`, bytes.
    pub size: u64,
    /// `--chunk-window`.
    pub window: u64,
    /// `--tmpdir`: absolute, no `..`.
    pub tmpdir: String,
}

/// How long an SSH connection may stall before it counts as lost in
/// `--chunked` mode; see [`Config::ssh_options`].
const CHUNKED_IO_TIMEOUT: Duration = Duration::from_secs(8);

/// TCP connect, and each step of handshake and login.
const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

impl Config {
    /// The rate the stream is held to: both limits act on the one stream
    /// this process pumps, so the smaller one.
    pub fn bwlimit(&self) -> Option<u64> {
        bwlimit::effective(self.source_bwlimit, self.target_bwlimit)
    }

    /// The SSH options the command line asked for; `home` is `$HOME`, where
    /// `.ssh/` lives (the caller reads it: no I/O here).
    ///
    /// A connection counts as lost after `--timeout` of silence, except in
    /// `--chunked` mode: there a lost connection is cheap (reconnect, read
    /// the folders again) while `--timeout` is the budget without progress
    /// for the whole transfer, so connections are declared dead much sooner.
    pub fn ssh_options(&self, home: PathBuf) -> SshOptions {
        let mut io_timeout = match self.chunk {
            Some(_) => self.timeout.min(CHUNKED_IO_TIMEOUT),
            None => self.timeout,
        };
        if let Some(interval) = self.ssh.server_alive_interval {
            io_timeout = io_timeout.min(interval * 3);
        }
        SshOptions {
            port: self.ssh.port,
            key: self.ssh.key.clone(),
            accept_new_host_key: self.ssh.accept_new_host_key,
            connect_timeout: self.ssh.connect_timeout.unwrap_or(SSH_CONNECT_TIMEOUT),
            io_timeout,
            home,
            data_path: self.ssh.data_path,
            overrides: self.ssh.overrides.clone(),
        }
    }

    /// The chunk orchestrator's options; `None` without `--chunked`.
    pub fn chunk_options(&self) -> Option<orchestrator::Options> {
        self.chunk.as_ref().map(|c| orchestrator::Options {
            chunk_size: c.size,
            window: c.window,
            timeout: self.timeout,
            tmpdir: c.tmpdir.clone(),
            bwlimit: self.bwlimit(),
            compress: self.compress,
        })
    }
}

impl Cli {
    /// Second stage: everything that needs more than clap's checks.
    pub fn resolve(self) -> Result<Config> {
        let source = parse_address(&self.source).context("invalid SOURCE")?;
        let target = parse_address(&self.target).context("invalid TARGET")?;
        if source == target {
            bail!("SOURCE and TARGET are the same dataset ({source})");
        }
        if source.location == target.location
            && (target.dataset.relative_to(&source.dataset).is_some()
                || (self.recursive && source.dataset.relative_to(&target.dataset).is_some()))
        {
            bail!("TARGET {target} overlaps SOURCE {source}; replicate into a separate tree");
        }
        let mut notices = Vec::new();
        let direct = match &self.insecure_direct_connection {
            Some(value) => {
                let d = Direct::parse(value).context("invalid --insecure-direct-connection")?;
                let remote = |l: &Location| matches!(l, Location::Remote { .. });
                match (remote(&source.location), remote(&target.location)) {
                    (true, true) => bail!(
                        "--insecure-direct-connection cannot relay between two remote hosts \
                         (as in syncoid); run resync on one of them"
                    ),
                    (false, false) => bail!(
                        "--insecure-direct-connection needs SOURCE or TARGET on a remote host; \
                         both are on this machine"
                    ),
                    _ => {}
                }
                if self.chunked {
                    bail!(
                        "--insecure-direct-connection and --chunked don't go together; \
                         pass only one"
                    );
                }
                if self.compress.is_on() {
                    notices.push(
                        "--insecure-direct-connection: the stream crosses plain TCP \
                         uncompressed and unencrypted (--compress does not apply)"
                            .to_string(),
                    );
                }
                if d.mbuffer {
                    notices.push(
                        "--insecure-direct-connection: mbuffer has no effect: resync \
                         buffers the stream itself and runs no mbuffer"
                            .to_string(),
                    );
                }
                Some(d)
            }
            None => None,
        };
        // As in syncoid, --preserve-properties includes the recordsize.
        let preserve = match (self.preserve_properties, self.preserve_recordsize) {
            (true, _) => Preserve::Properties,
            (false, true) => Preserve::Recordsize,
            (false, false) => Preserve::Nothing,
        };
        let (exclude_flag, exclude_datasets) = match (
            self.exclude_datasets.is_empty(),
            self.exclude_old.is_empty(),
        ) {
            (true, false) => {
                notices.push(
                    "--exclude is deprecated (in syncoid too); use --exclude-datasets".to_string(),
                );
                ("--exclude", &self.exclude_old)
            }
            (false, false) => {
                notices.push(
                    "--exclude is ignored because --exclude-datasets is given (as in syncoid)"
                        .to_string(),
                );
                ("--exclude-datasets", &self.exclude_datasets)
            }
            _ => ("--exclude-datasets", &self.exclude_datasets),
        };
        let exclude = compile_all(exclude_flag, exclude_datasets)?;
        if !exclude.is_empty() && !self.recursive {
            bail!("{exclude_flag} only makes sense with -r/--recursive");
        }
        let snap_filter = SnapFilter::new(
            compile_all("--include-snaps", &self.include_snaps)?,
            compile_all("--exclude-snaps", &self.exclude_snaps)?,
        );
        for (given, flag, why) in [
            (
                self.mbuffer_size.is_some(),
                "--mbuffer-size",
                "resync buffers the stream itself and runs no mbuffer",
            ),
            (
                self.pv_options.is_some(),
                "--pv-options",
                "resync draws its own progress and runs no pv",
            ),
            (
                self.no_command_checks,
                "--no-command-checks",
                "resync needs only zfs on each host and checks nothing else",
            ),
            (
                self.monitor_version,
                "--monitor-version",
                "it does nothing in syncoid either",
            ),
        ] {
            if given {
                notices.push(format!("{flag} has no effect: {why}"));
            }
        }
        if let Some(id) = &self.identifier {
            syncsnap::validate_identifier(id).context("invalid --identifier")?;
        }
        if self.no_sync_snap && self.keep_sync_snap {
            bail!("--keep-sync-snap has no effect with --no-sync-snap; pass only one");
        }
        let send_options = match &self.sendoptions {
            Some(s) => {
                zfs::parse_send_options(s, self.recursive).context("invalid --sendoptions")?
            }
            None => zfs::ParsedOptions::default(),
        };
        let recv_options = match &self.recvoptions {
            Some(s) => zfs::parse_recv_options(s).context("invalid --recvoptions")?,
            None => zfs::ParsedOptions::default(),
        };
        notices.extend(send_options.dropped);
        notices.extend(recv_options.dropped);
        let mut ssh = SshSettings {
            key: self.sshkey,
            port: self.sshport,
            accept_new_host_key: self.accept_new_host_key,
            data_path: match self.ssh_data.as_str() {
                "libssh2" => DataPath::Libssh2,
                _ => DataPath::Auto,
            },
            connect_timeout: None,
            server_alive_interval: None,
            overrides: SshOverrides {
                config_file: self.sshconfig,
                ciphers: self.sshcipher.as_deref().map(parse_ciphers).transpose()?,
                ..SshOverrides::default()
            },
        };
        for option in &self.sshoption {
            match sshconfig::parse_command_line_option(option)? {
                CommandLineOption::ConfigLine(line) => ssh.overrides.config_lines.push(line),
                CommandLineOption::IdentitiesOnly(on) => ssh.overrides.identities_only = on,
                CommandLineOption::ConnectTimeout(0) => {}
                CommandLineOption::ConnectTimeout(secs) => {
                    ssh.connect_timeout = Some(Duration::from_secs(secs));
                }
                CommandLineOption::ServerAliveInterval(0) => {}
                CommandLineOption::ServerAliveInterval(secs) => {
                    ssh.server_alive_interval = Some(Duration::from_secs(secs));
                }
                CommandLineOption::AcceptNewHostKey { on, narrowed } => {
                    if narrowed {
                        notices.push(format!(
                            "--sshoption {option}: resync accepts unknown host keys \
                             but still refuses a changed one"
                        ));
                    }
                    ssh.accept_new_host_key |= on;
                }
            }
        }
        let verbosity = if self.quiet {
            Verbosity::Quiet
        } else if self.debug {
            Verbosity::Debug
        } else {
            Verbosity::Normal
        };
        Ok(Config {
            source,
            target,
            recursive: self.recursive,
            skip_parent: self.skip_parent,
            exclude,
            snap_filter,
            delete_target_snapshots: self.delete_target_snapshots,
            preserve,
            dumpsnaps: self.dumpsnaps,
            clone_handling: !self.no_clone_handling,
            notices,
            no_stream: self.no_stream,
            send_options: send_options.argv,
            recv_options: recv_options.argv,
            resume: !self.no_resume,
            force_delete: self.force_delete,
            rollback: !self.no_rollback,
            no_privilege_elevation: self.no_privilege_elevation,
            jobs: usize::from(self.jobs),
            protection: Protection {
                sync_snap: !self.no_sync_snap,
                keep_sync_snap: self.keep_sync_snap,
                identifier: self.identifier,
                use_hold: self.use_hold,
                create_bookmark: self.create_bookmark,
            },
            ssh,
            chunk: self.chunked.then_some(ChunkSettings {
                size: self.chunk_size,
                window: self.chunk_window,
                tmpdir: self.tmpdir.clone(),
            }),
            timeout: self.timeout,
            source_bwlimit: self.source_bwlimit,
            target_bwlimit: self.target_bwlimit,
            compress: match direct {
                Some(_) => Compress::None,
                None => self.compress,
            },
            direct,
            tmpdir: self.tmpdir.clone(),
            dry_run: self.dry_run,
            json: self.json,
            verbosity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Config> {
        let mut argv = vec!["resync"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.resolve()
    }

    fn remote_addr(user: Option<&str>, host: &str, ds: &str) -> Address {
        Address {
            location: Location::Remote {
                user: user.map(str::to_string),
                host: host.to_string(),
            },
            dataset: Dataset::parse(ds).unwrap(),
        }
    }

    #[test]
    fn addresses_parse_local_remote_user_and_ipv6() {
        let local = parse_address("tank/vm").unwrap();
        assert_eq!(local.location, Location::Local);
        assert_eq!(local.dataset.as_str(), "tank/vm");
        assert_eq!(
            parse_address("backup:pool/vm").unwrap(),
            remote_addr(None, "backup", "pool/vm")
        );
        assert_eq!(
            parse_address("root@10.213.0.3:pool/a b").unwrap(),
            remote_addr(Some("root"), "10.213.0.3", "pool/a b")
        );
        assert_eq!(
            parse_address("root@[fd00::1]:pool/x").unwrap(),
            remote_addr(Some("root"), "fd00::1", "pool/x")
        );
        assert_eq!(
            parse_address("[::1]:pool").unwrap(),
            remote_addr(None, "::1", "pool")
        );
    }

    #[test]
    fn a_colon_inside_a_dataset_name_stays_local() {
        let ep = parse_address("tank/a:b").unwrap();
        assert_eq!(ep.location, Location::Local);
        assert_eq!(ep.dataset.as_str(), "tank/a:b");
    }

    #[test]
    fn hostile_names_are_refused_before_anything_runs() {
        for bad in [
            "tank/a;rm -rf /",
            "tank/$(reboot)",
            "tank/a'b",
            "tank/a\"b",
            "tank/a\nb",
            "tank/`id`",
            "-oProxyCommand=x:tank/a",
            "ro ot@host:tank/a",
            "host:",
            "",
            "[::1:tank",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn flags_resolve_into_config() {
        let c = cli(&[
            "-r",
            "--skip-parent",
            "--exclude-datasets=scratch$",
            "--exclude-datasets",
            "tmp",
            "--identifier=hourly",
            "--no-stream",
            "--no-resume",
            "--force-delete",
            "--no-rollback",
            "--no-privilege-elevation",
            "--sshport=2222",
            "--timeout=45s",
            "--dry-run",
            "--debug",
            "tank/a",
            "root@b:pool/a",
        ])
        .unwrap();
        assert!(c.recursive && c.skip_parent && c.no_stream && c.force_delete && c.dry_run);
        assert!(!c.resume && !c.rollback && c.protection.sync_snap);
        assert!(c.no_privilege_elevation);
        assert_eq!(c.exclude.len(), 2);
        assert_eq!(c.protection.identifier.as_deref(), Some("hourly"));
        assert_eq!(c.ssh.port, Some(2222));
        assert_eq!(c.timeout, Duration::from_secs(45));
        assert_eq!(c.verbosity, Verbosity::Debug);
    }

    #[test]
    fn bad_flag_values_are_one_line_errors() {
        for args in [
            vec!["--timeout=soon", "a/b", "c/d"],
            vec!["--timeout=0s", "a/b", "c/d"],
            vec!["--sshport=0", "a/b", "c/d"],
            vec!["--sshport=70000", "a/b", "c/d"],
            vec!["-r", "--exclude-datasets=(", "a/b", "c/d"],
            vec!["--exclude-datasets=x", "a/b", "c/d"],
            vec!["--skip-parent", "a/b", "c/d"],
            vec!["--identifier=a b", "a/b", "c/d"],
            vec!["--no-sync-snap", "--keep-sync-snap", "a/b", "c/d"],
            vec!["--quiet", "--debug", "a/b", "c/d"],
            vec!["a/b", "a/b"],
            vec!["a/b", "a/b/c"],
            vec!["a/b"],
        ] {
            assert!(cli(&args).is_err(), "{args:?} must be refused");
        }
    }

    #[test]
    fn protection_flags_are_off_unless_given() {
        let c = cli(&["a/b", "c/d"]).unwrap();
        assert!(!c.protection.use_hold && !c.protection.create_bookmark);
        let c = cli(&["--use-hold", "--create-bookmark", "a/b", "c/d"]).unwrap();
        assert!(c.protection.use_hold && c.protection.create_bookmark);
    }

    #[test]
    fn same_dataset_on_different_hosts_is_fine() {
        assert!(cli(&["tank/a", "root@b:tank/a"]).is_ok());
    }

    #[test]
    fn bwlimits_parse_and_the_smaller_one_wins() {
        let c = cli(&["a/b", "c/d"]).unwrap();
        assert_eq!(c.bwlimit(), None);
        let c = cli(&["--target-bwlimit=4M", "a/b", "c/d"]).unwrap();
        assert_eq!(c.target_bwlimit, Some(4 << 20));
        assert_eq!(c.bwlimit(), Some(4 << 20));
        let c = cli(&[
            "--source-bwlimit",
            "1.5G",
            "--target-bwlimit=800k",
            "a/b",
            "c/d",
        ])
        .unwrap();
        assert_eq!(c.source_bwlimit, Some(1536 << 20));
        assert_eq!(c.bwlimit(), Some(800 << 10));
        let c = cli(&[
            "--source-bwlimit=512KiB/s",
            "--target-bwlimit=1M",
            "a/b",
            "c/d",
        ])
        .unwrap();
        assert_eq!(c.bwlimit(), Some(512 << 10));
    }

    #[test]
    fn bad_bwlimits_are_usage_errors() {
        for flag in ["--source-bwlimit", "--target-bwlimit"] {
            for value in [
                "0", "-5M", "fast", "", "inf", "NaN", "1e9", "10Mb", "2000T", "1.2.3k",
            ] {
                let arg = format!("{flag}={value}");
                let err = Cli::try_parse_from(["resync", &arg, "a/b", "c/d"]).expect_err(&arg);
                assert_eq!(
                    err.kind(),
                    clap::error::ErrorKind::ValueValidation,
                    "{arg}: {err}"
                );
            }
            // A separate negative value is not taken for a value either.
            assert!(Cli::try_parse_from(["resync", flag, "-5M", "a/b", "c/d"]).is_err());
            assert!(Cli::try_parse_from(["resync", "a/b", "c/d", flag]).is_err());
        }
    }

    #[test]
    fn chunked_flags_parse_with_defaults() {
        let c = cli(&["a/b", "c/d"]).unwrap();
        assert_eq!(c.chunk, None);
        // The chunk flags are accepted without --chunked, and ignored.
        let c = cli(&["--chunk-size=1M", "--tmpdir=/var/tmp", "a/b", "c/d"]).unwrap();
        assert_eq!(c.chunk, None);
        let c = cli(&["--chunked", "a/b", "c/d"]).unwrap();
        assert_eq!(
            c.chunk,
            Some(ChunkSettings {
                size: 32 << 20,
                window: 8,
                tmpdir: "/tmp".into(),
            })
        );
        let c = cli(&[
            "--chunked",
            "--chunk-size=1M",
            "--chunk-window",
            "8",
            "--tmpdir=/var/tmp",
            "a/b",
            "c/d",
        ])
        .unwrap();
        assert_eq!(
            c.chunk,
            Some(ChunkSettings {
                size: 1 << 20,
                window: 8,
                tmpdir: "/var/tmp".into(),
            })
        );
        for (s, n) in [
            ("1", 1),
            ("512k", 512 << 10),
            ("2MiB", 2 << 20),
            ("1G", 1 << 30),
            ("7B", 7),
        ] {
            assert_eq!(parse_chunk_size(s), Ok(n), "{s}");
        }
    }

    #[test]
    fn bad_chunked_flags_are_usage_errors() {
        for bad in [
            &["--chunk-size=0", "a/b", "c/d"][..],
            &["--chunk-size=2G", "a/b", "c/d"],
            &["--chunk-size=lots", "a/b", "c/d"],
            &["--chunk-size=1.5M", "a/b", "c/d"],
            &["--chunk-size=-1", "a/b", "c/d"],
            &["--chunk-size=8Mb", "a/b", "c/d"],
            &["--chunk-window=0", "a/b", "c/d"],
            &["--chunk-window=x", "a/b", "c/d"],
            &["--tmpdir=relative", "a/b", "c/d"],
            &["--tmpdir=/tmp/../etc", "a/b", "c/d"],
        ] {
            let mut argv = vec!["resync"];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ssh_options_carry_the_flags_and_home() {
        let c = cli(&[
            "--sshkey=/k/id",
            "--sshport=2222",
            "--accept-new-host-key",
            "--timeout=45s",
            "a/b",
            "root@b:c/d",
        ])
        .unwrap();
        let o = c.ssh_options(PathBuf::from("/home/alice"));
        assert_eq!(o.port, Some(2222));
        assert_eq!(o.key, Some(PathBuf::from("/k/id")));
        assert!(o.accept_new_host_key);
        assert_eq!(o.home, PathBuf::from("/home/alice"));
        assert_eq!(o.connect_timeout, Duration::from_secs(15));
        assert_eq!(o.io_timeout, Duration::from_secs(45));
        let o = cli(&["a/b", "b:c/d"]).unwrap().ssh_options("/r".into());
        assert_eq!((o.port, o.key, o.accept_new_host_key), (None, None, false));
        assert_eq!(o.io_timeout, Duration::from_secs(600));
    }

    #[test]
    fn chunked_ssh_links_are_declared_dead_sooner_than_the_timeout() {
        let io = |args: &[&str]| cli(args).unwrap().ssh_options("/r".into()).io_timeout;
        assert_eq!(io(&["--chunked", "a/b", "b:c/d"]), Duration::from_secs(8));
        // --timeout below the chunked link timeout wins.
        assert_eq!(
            io(&["--chunked", "--timeout=3s", "a/b", "b:c/d"]),
            Duration::from_secs(3)
        );
        assert_eq!(
            io(&["--timeout=3s", "a/b", "b:c/d"]),
            Duration::from_secs(3)
        );
    }

    /// Splits a command line as sh would for these simple cases (double
    /// quotes group words; no escapes), dropping the leading `syncoid`.
    fn words(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let (mut quoted, mut any) = (false, false);
        for c in line.chars() {
            match c {
                '"' => {
                    quoted = !quoted;
                    any = true;
                }
                c if c.is_whitespace() && !quoted => {
                    if any {
                        out.push(std::mem::take(&mut cur));
                        any = false;
                    }
                }
                c => {
                    cur.push(c);
                    any = true;
                }
            }
        }
        if any {
            out.push(cur);
        }
        assert_eq!(out.first().map(String::as_str), Some("syncoid"), "{line}");
        out.remove(0);
        out
    }

    fn syncoid_line(line: &str) -> Result<Config> {
        let w = words(line);
        cli(&w.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// syncoid 2.3 command lines, from its README ("Syncoid" examples and
    /// "Syncoid Command Line Options") and its --help text, each with the
    /// meaning syncoid gives it, as resync's Config must hold it.
    #[test]
    fn syncoid_command_lines_mean_what_they_mean_to_syncoid() {
        type Check = fn(&Config) -> bool;
        let cases: &[(&str, Check)] = &[
            // README: a typical command (local to local).
            ("syncoid data/images/vm backup/images/vm", |c| {
                c.source.location == Location::Local
                    && c.target.dataset.as_str() == "backup/images/vm"
                    && c.protection.sync_snap
                    && !c.no_stream
                    && c.rollback
            }),
            // README: push over SSH.
            ("syncoid data/images/vm root@remotehost:backup/images/vm", |c| {
                c.target.location
                    == Location::Remote {
                        user: Some("root".into()),
                        host: "remotehost".into(),
                    }
            }),
            // README: pull over SSH.
            ("syncoid root@remotehost:data/images/vm backup/images/vm", |c| {
                matches!(&c.source.location, Location::Remote { host, .. } if host == "remotehost")
                    && c.target.location == Location::Local
            }),
            // --help: --sendoptions="Lc e" sets zfs send -L -c -e.
            ("syncoid --sendoptions=\"Lc e\" a/b c/d", |c| {
                c.send_options == ["-L", "-c", "-e"]
            }),
            // --help: --recvoptions="ux recordsize o compression=lz4".
            (
                "syncoid --recvoptions=\"ux recordsize o compression=lz4\" a/b c/d",
                |c| c.recv_options == ["-u", "-x", "recordsize", "-o", "compression=lz4"],
            ),
            ("syncoid --identifier=offsite a/b c/d", |c| {
                c.protection.identifier.as_deref() == Some("offsite")
            }),
            ("syncoid -r a/b c/d", |c| {
                c.recursive && !c.skip_parent && c.clone_handling
            }),
            ("syncoid --recursive --skip-parent a/b c/d", |c| {
                c.recursive && c.skip_parent
            }),
            // README: --source-bwlimit <limit t|g|m|k>.
            ("syncoid --source-bwlimit=10m a/b c/d", |c| {
                c.bwlimit() == Some(10 << 20)
            }),
            ("syncoid --target-bwlimit=512k a/b c/d", |c| {
                c.bwlimit() == Some(512 << 10)
            }),
            ("syncoid --no-stream a/b c/d", |c| c.no_stream),
            ("syncoid --no-sync-snap a/b c/d", |c| !c.protection.sync_snap),
            ("syncoid --keep-sync-snap a/b c/d", |c| {
                c.protection.keep_sync_snap
            }),
            ("syncoid --no-sync-snap --create-bookmark a/b c/d", |c| {
                c.protection.create_bookmark && !c.protection.sync_snap
            }),
            ("syncoid --use-hold --identifier=b1 a/b c/d", |c| {
                c.protection.use_hold && c.protection.identifier.as_deref() == Some("b1")
            }),
            ("syncoid --no-rollback a/b c/d", |c| !c.rollback),
            ("syncoid --delete-target-snapshots a/b c/d", |c| {
                c.delete_target_snapshots
            }),
            ("syncoid -r --exclude=scratch a/b c/d", |c| {
                c.exclude.len() == 1
                    && c.exclude[0].as_str() == "scratch"
                    && c.notices.iter().any(|n| n.contains("--exclude is deprecated"))
            }),
            // README: --exclude is ignored if --exclude-datasets is given.
            (
                "syncoid -r --exclude=old --exclude-datasets=tmp --exclude-datasets=cache a/b c/d",
                |c| {
                    c.exclude.iter().map(Regex::as_str).collect::<Vec<_>>() == ["tmp", "cache"]
                        && c.notices.iter().any(|n| n.contains("--exclude is ignored"))
                },
            ),
            ("syncoid --exclude-snaps=hourly a/b c/d", |c| {
                !c.snap_filter.includes("autosnap_2024-01-01_00:00:00_hourly")
                    && c.snap_filter.includes("autosnap_2024-01-01_00:00:00_daily")
            }),
            (
                "syncoid --include-snaps=daily --include-snaps=weekly --exclude-snaps=2023 a/b c/d",
                |c| {
                    c.snap_filter.includes("autosnap_2024-01-01_daily")
                        && c.snap_filter.includes("autosnap_2024-01-07_weekly")
                        && !c.snap_filter.includes("autosnap_2024-01-01_hourly")
                        && !c.snap_filter.includes("autosnap_2023-12-31_daily")
                },
            ),
            ("syncoid --no-resume a/b c/d", |c| !c.resume),
            ("syncoid --force-delete a/b c/d", |c| c.force_delete),
            ("syncoid -r --no-clone-handling a/b c/d", |c| !c.clone_handling),
            ("syncoid --dumpsnaps a/b c/d", |c| c.dumpsnaps),
            ("syncoid --preserve-recordsize a/b c/d", |c| {
                c.preserve == Preserve::Recordsize
            }),
            ("syncoid --preserve-properties a/b c/d", |c| {
                c.preserve == Preserve::Properties
            }),
            // syncoid: properties win (they include a local recordsize).
            ("syncoid --preserve-properties --preserve-recordsize a/b c/d", |c| {
                c.preserve == Preserve::Properties
            }),
            ("syncoid --sshport=2222 a/b root@h:c/d", |c| {
                c.ssh_options("/r".into()).port == Some(2222)
            }),
            ("syncoid --sshkey=/root/.ssh/backup a/b root@h:c/d", |c| {
                c.ssh.key.as_deref() == Some(std::path::Path::new("/root/.ssh/backup"))
            }),
            ("syncoid --sshcipher=aes128-gcm@openssh.com a/b h:c/d", |c| {
                c.ssh.overrides.ciphers.as_deref() == Some("aes128-gcm@openssh.com")
            }),
            ("syncoid -c chacha20-poly1305@openssh.com,aes128-ctr a/b h:c/d", |c| {
                c.ssh.overrides.ciphers.as_deref()
                    == Some("chacha20-poly1305@openssh.com,aes128-ctr")
            }),
            ("syncoid --sshconfig=/etc/backup/ssh_config a/b h:c/d", |c| {
                c.ssh.overrides.config_file.as_deref()
                    == Some(std::path::Path::new("/etc/backup/ssh_config"))
            }),
            (
                "syncoid --sshoption=StrictHostKeyChecking=accept-new -o ConnectTimeout=5 a/b h:c/d",
                |c| {
                    let o = c.ssh_options("/r".into());
                    o.accept_new_host_key && o.connect_timeout == Duration::from_secs(5)
                },
            ),
            (
                "syncoid -o Port=2200 -o User=backup -o IdentitiesOnly=yes a/b h:c/d",
                |c| {
                    c.ssh.overrides.config_lines == ["Port 2200", "User backup"]
                        && c.ssh.overrides.identities_only
                },
            ),
            ("syncoid -o ServerAliveInterval=2 a/b h:c/d", |c| {
                c.ssh_options("/r".into()).io_timeout == Duration::from_secs(6)
            }),
            ("syncoid --quiet a/b c/d", |c| c.verbosity == Verbosity::Quiet),
            ("syncoid --debug a/b c/d", |c| c.verbosity == Verbosity::Debug),
            // No effect in resync: one line each, saying why.
            ("syncoid --mbuffer-size=128M a/b c/d", |c| {
                c.notices == ["--mbuffer-size has no effect: resync buffers the stream itself and runs no mbuffer"]
            }),
            ("syncoid --pv-options=\"-p -t -e -r -b\" a/b c/d", |c| {
                c.notices.len() == 1 && c.notices[0].starts_with("--pv-options has no effect")
            }),
            ("syncoid --no-command-checks a/b c/d", |c| {
                c.notices.len() == 1 && c.notices[0].starts_with("--no-command-checks has no effect")
            }),
            ("syncoid --monitor-version a/b c/d", |c| {
                c.notices.len() == 1 && c.notices[0].starts_with("--monitor-version has no effect")
            }),
            // The example the issue names: syncoid filters -R, resync says so.
            ("syncoid --sendoptions=Rw a/b c/d", |c| {
                c.send_options == ["-w"] && c.notices[0].contains("leaving out -R")
            }),
            ("syncoid --sendoptions=\"w P\" --recvoptions=Fu a/b c/d", |c| {
                c.send_options == ["-w"] && c.recv_options == ["-u"] && c.notices.len() == 2
            }),
        ];
        assert!(cases.len() >= 25);
        for (line, check) in cases {
            let c = syncoid_line(line).unwrap_or_else(|e| panic!("{line}: {e:#}"));
            assert!(check(&c), "{line}: {c:#?}");
        }
    }

    /// syncoid lines resync refuses, with one line saying why.
    /// A direct connection: parsed, compression off with one notice.
    #[test]
    fn a_direct_connection_turns_compression_off_and_says_so() {
        let c = syncoid_line(
            "syncoid --insecure-direct-connection=192.168.1.2:1234,0.0.0.0:1234,5,mbuffer a/b h:c/d",
        )
        .unwrap();
        let d = c.direct.as_ref().unwrap();
        assert_eq!(d.connect.to_string(), "192.168.1.2:1234");
        assert_eq!(d.listen.to_string(), "0.0.0.0:1234");
        assert_eq!(d.timeout, Duration::from_secs(5));
        assert_eq!(c.compress, Compress::None);
        assert_eq!(c.notices.len(), 2, "{:?}", c.notices);
        assert!(c.notices[0].contains("uncompressed and unencrypted"));
        let c = syncoid_line(
            "syncoid --compress=none --insecure-direct-connection=1.2.3.4:5 h:a/b c/d",
        )
        .unwrap();
        assert!(c.notices.is_empty(), "{:?}", c.notices);
        assert!(cli(&["a/b", "c/d"]).unwrap().direct.is_none());
    }

    #[test]
    fn syncoid_lines_resync_cannot_honour_are_refused_in_one_line() {
        for (line, want) in [
            (
                "syncoid --insecure-direct-connection=192.168.1.2:1234 g:a/b h:c/d",
                "cannot relay between two remote hosts",
            ),
            (
                "syncoid --insecure-direct-connection=192.168.1.2:1234 a/b c/d",
                "both are on this machine",
            ),
            (
                "syncoid --insecure-direct-connection=nonsense a/b h:c/d",
                "invalid --insecure-direct-connection: \"nonsense\" is not IP:PORT",
            ),
            (
                "syncoid --insecure-direct-connection=10.0.0.1:0 a/b h:c/d",
                "port 0",
            ),
            (
                "syncoid --insecure-direct-connection=10.0.0.1:70000 a/b h:c/d",
                "is not IP:PORT",
            ),
            (
                "syncoid --insecure-direct-connection=1.2.3.4:1,1.2.3.4:1,5,mbuffer,x a/b h:c/d",
                "5 parts",
            ),
            (
                "syncoid --chunked --insecure-direct-connection=192.168.1.2:1234 a/b h:c/d",
                "--insecure-direct-connection and --chunked don't go together",
            ),
            (
                "syncoid -r --sendoptions=R a/b c/d",
                "-R and --recursive aren't compatible",
            ),
            (
                "syncoid -o ProxyJump=bastion a/b h:c/d",
                "ProxyJump is not supported",
            ),
            (
                "syncoid -o Compression=yes a/b h:c/d",
                "Compression is not supported",
            ),
            (
                "syncoid -c blowfish-cbc a/b h:c/d",
                "\"blowfish-cbc\" is not a cipher",
            ),
            (
                "syncoid --include-snaps=( a/b c/d",
                "invalid --include-snaps regex",
            ),
            (
                "syncoid --exclude=x a/b c/d",
                "--exclude only makes sense with -r",
            ),
        ] {
            let e = format!("{:#}", syncoid_line(line).unwrap_err());
            assert!(e.contains(want), "{line}: {e}");
            assert!(!e.contains('\n'), "{line}: {e}");
        }
    }

    #[test]
    fn chunk_options_exist_only_with_chunked() {
        assert!(cli(&["a/b", "c/d"]).unwrap().chunk_options().is_none());
        let o = cli(&[
            "--chunked",
            "--chunk-size=4M",
            "--chunk-window=3",
            "--tmpdir=/var/tmp",
            "--timeout=2m",
            "--source-bwlimit=10M",
            "--target-bwlimit=1M",
            "a/b",
            "c/d",
        ])
        .unwrap()
        .chunk_options()
        .unwrap();
        assert_eq!(o.chunk_size, 4 << 20);
        assert_eq!(o.window, 3);
        assert_eq!(o.tmpdir, "/var/tmp");
        assert_eq!(o.timeout, Duration::from_secs(120));
        assert_eq!(o.bwlimit, Some(1 << 20));
    }
}
