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
use crate::host::ssh::SshOptions;
use crate::plan::syncsnap;
use crate::progress::Verbosity;
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
    /// 1 with --chunked).
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

    /// Private key file for SSH (tried after ssh-agent).
    #[arg(long, value_name = "FILE")]
    pub sshkey: Option<PathBuf>,

    /// SSH port for remote hosts (overrides ~/.ssh/config).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub sshport: Option<u16>,

    /// Add an unknown host key to ~/.ssh/known_hosts instead of refusing (a changed key is still refused).
    #[arg(long)]
    pub accept_new_host_key: bool,

    /// Limit the stream read from the source to RATE bytes/s, e.g. 800k, 10M, 1.5G
    /// (k/M/G/T are powers of 1024). resync moves the stream through one process, so
    /// --source-bwlimit and --target-bwlimit throttle the same stream: the smaller wins.
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub source_bwlimit: Option<u64>,

    /// Limit the stream written to the target to RATE bytes/s (same syntax and the
    /// same single stream as --source-bwlimit: the smaller of the two wins).
    #[arg(long, value_name = "RATE", value_parser = bwlimit::parse_rate)]
    pub target_bwlimit: Option<u64>,

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
    pub no_stream: bool,
    pub send_options: Vec<String>,
    pub recv_options: Vec<String>,
    pub resume: bool,
    pub force_delete: bool,
    pub rollback: bool,
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
    pub dry_run: bool,
    pub verbosity: Verbosity,
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
    /// `--accept-new-host-key`.
    pub accept_new_host_key: bool,
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
        let io_timeout = match self.chunk {
            Some(_) => self.timeout.min(CHUNKED_IO_TIMEOUT),
            None => self.timeout,
        };
        SshOptions {
            port: self.ssh.port,
            key: self.ssh.key.clone(),
            accept_new_host_key: self.ssh.accept_new_host_key,
            connect_timeout: SSH_CONNECT_TIMEOUT,
            io_timeout,
            home,
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
        let exclude = self
            .exclude_datasets
            .iter()
            .map(|r| {
                Regex::new(r)
                    .map_err(|e| anyhow::anyhow!("invalid --exclude-datasets regex {r:?}: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if !exclude.is_empty() && !self.recursive {
            bail!("--exclude-datasets only makes sense with -r/--recursive");
        }
        if let Some(id) = &self.identifier {
            syncsnap::validate_identifier(id).context("invalid --identifier")?;
        }
        if self.no_sync_snap && self.keep_sync_snap {
            bail!("--keep-sync-snap has no effect with --no-sync-snap; pass only one");
        }
        let send_options = match &self.sendoptions {
            Some(s) => zfs::parse_send_options(s).context("invalid --sendoptions")?,
            None => Vec::new(),
        };
        let recv_options = match &self.recvoptions {
            Some(s) => zfs::parse_recv_options(s).context("invalid --recvoptions")?,
            None => Vec::new(),
        };
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
            no_stream: self.no_stream,
            send_options,
            recv_options,
            resume: !self.no_resume,
            force_delete: self.force_delete,
            rollback: !self.no_rollback,
            jobs: usize::from(self.jobs),
            protection: Protection {
                sync_snap: !self.no_sync_snap,
                keep_sync_snap: self.keep_sync_snap,
                identifier: self.identifier,
                use_hold: self.use_hold,
                create_bookmark: self.create_bookmark,
            },
            ssh: SshSettings {
                key: self.sshkey,
                port: self.sshport,
                accept_new_host_key: self.accept_new_host_key,
            },
            chunk: self.chunked.then_some(ChunkSettings {
                size: self.chunk_size,
                window: self.chunk_window,
                tmpdir: self.tmpdir,
            }),
            timeout: self.timeout,
            source_bwlimit: self.source_bwlimit,
            target_bwlimit: self.target_bwlimit,
            dry_run: self.dry_run,
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
