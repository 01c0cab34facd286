//! A ZFS endpoint: one side of a run, a [`Host`] plus what its ZFS can do.
//! This is the only place that runs `zfs` (argv comes from `zfs`, output is
//! parsed there): reads are methods of [`ZfsHost`] (list, state, verify,
//! estimate, `written@`, descendants, holds), and every change to a pool
//! goes through the small [`Changes`] trait, whose operations are
//! idempotent where ZFS allows (a hold that exists, a release of a hold
//! that is gone: both fine). [`dryrun::DryRun`] implements `Changes` by
//! printing what it would do, so callers never branch on `--dry-run`.
//! The transfer of a stream itself is `transfer`'s job, not this one's.
//! Every `zfs` argv reaches its host through [`ZfsHost::command`], which
//! puts `sudo -n` in front on a host where the user is not root (see
//! `zfs::elevate`); a refusal for want of privilege becomes one line.

pub mod dryrun;

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use crate::cli::{Config, Location};
use crate::host::batch;
use crate::host::local::LocalHost;
use crate::host::quote::sh_join;
use crate::host::reconnect::Reconnecting;
use crate::host::ssh::{resolve_address, resolve_user, SshHost, SshOptions, SshSpec};
use crate::host::{CmdOutput, Host};
use crate::plan::{SourceState, TargetState};
use crate::progress::Progress;
use crate::zfs::{self, Capabilities, Dataset, Privileges, ProbeResult, Snapshot, ZfsErrorKind};

/// One side of a run: its host (swappable, since `--chunked` reconnects),
/// its ZFS capabilities and where it is.
pub struct ZfsHost<'a> {
    host: Reconnecting<'a>,
    pub caps: Capabilities,
    pub location: Location,
    /// As whom `zfs` runs there, and whether through sudo.
    pub privileges: Privileges,
    ui: &'a dyn Progress,
}

impl<'a> ZfsHost<'a> {
    /// An endpoint on an already connected host, whose `zfs` runs with
    /// `privileges`; probes its ZFS on `pool`.
    pub fn open(
        host: Reconnecting<'a>,
        location: Location,
        privileges: Privileges,
        pool: &str,
        ui: &'a dyn Progress,
    ) -> Result<ZfsHost<'a>> {
        let caps = detect(&*host.get(), &privileges, pool, ui)?;
        let mut zh = ZfsHost::with_caps(host, location, caps, ui);
        zh.privileges = privileges;
        Ok(zh)
    }

    /// An endpoint whose capabilities are known (tests, and [`ZfsHost::open`]).
    pub fn with_caps(
        host: Reconnecting<'a>,
        location: Location,
        caps: Capabilities,
        ui: &'a dyn Progress,
    ) -> ZfsHost<'a> {
        ZfsHost {
            host,
            caps,
            location,
            privileges: Privileges::decide("root", true, false),
            ui,
        }
    }

    /// `argv` (a `zfs` command) as it must run on this host: behind
    /// `sudo -n` where the user is not root.
    pub fn command(&self, argv: &[String]) -> Vec<String> {
        self.privileges.wrap(argv)
    }

    /// The one-line error for `argv` (unwrapped) that failed here with
    /// `stderr` for want of privilege, if that is why it failed.
    pub fn privilege_error(&self, argv: &[String], stderr: &str) -> Option<anyhow::Error> {
        self.privileges
            .explain(self.host().label(), argv, stderr)
            .map(|line| zfs::elevate::Refused(line).into())
    }

    /// The current connection.
    pub fn host(&self) -> Arc<dyn Host> {
        self.host.get()
    }

    /// The connection that carries a stream's data to or from this host:
    /// OpenSSH's master connection when the host has one (see
    /// `host::ssh::openssh`), else the connection itself.
    pub fn bulk_host(&self) -> Arc<dyn Host> {
        let host = self.host();
        match host.bulk() {
            Some(Ok(bulk)) => {
                self.ui
                    .debug(&format!("[{}] stream through OpenSSH's ssh", host.label()));
                bulk
            }
            Some(Err(why)) => {
                self.ui.debug(&format!(
                    "[{}] streams stay on libssh2: {why}",
                    host.label()
                ));
                host
            }
            None => host,
        }
    }

    /// The swappable connection and how to reconnect it (`--chunked`
    /// reconnects after a lost connection).
    pub fn reconnecting(&self) -> &Reconnecting<'a> {
        &self.host
    }

    /// `ds` as the user spells it: `host:ds` when remote.
    pub fn label(&self, ds: &Dataset) -> String {
        match &self.location {
            Location::Local => ds.to_string(),
            Location::Remote { .. } => format!("{}:{}", self.host().label(), ds),
        }
    }

    /// Runs argv, logging it with `--debug`.
    pub fn exec(&self, argv: &[String]) -> Result<CmdOutput> {
        exec(&*self.host(), &self.privileges, argv, self.ui)
    }

    /// Runs argv; a non-zero exit is an error carrying its stderr.
    fn exec_ok(&self, argv: &[String], what: &str) -> Result<String> {
        let host = self.host();
        exec(&*host, &self.privileges, argv, self.ui)?.check(what, host.label())
    }

    /// Like [`ZfsHost::exec_ok`], but retries while ZFS says the dataset is
    /// busy: right after a receive, zfs-fuse refuses destroy and rollback
    /// for a few seconds.
    fn exec_ok_when_idle(&self, argv: &[String], what: &str) -> Result<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let out = self.exec(argv)?;
            if out.success()
                || !zfs::is_busy_error(&out.stderr)
                || std::time::Instant::now() > deadline
            {
                return out.check(what, self.host().label());
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    /// Whether `ds` exists.
    pub fn exists(&self, ds: &Dataset) -> Result<bool> {
        let out = self.exec(&zfs::dataset_exists_argv(ds))?;
        if out.success() {
            return Ok(true);
        }
        if zfs::is_missing_dataset_error(&out.stderr) {
            return Ok(false);
        }
        out.check("zfs list", self.host().label())?;
        Ok(true)
    }

    /// `root` (and with `recursive` everything below it) with every
    /// snapshot, bookmark and resume token, from one listing; `None` when
    /// `root` does not exist.
    pub fn tree(&self, root: &Dataset, recursive: bool) -> Result<Option<zfs::Tree>> {
        let mut argv = zfs::list_tree_argv(root, &self.caps);
        if !recursive {
            // `-d 1`: the root, its snapshots (and its children, skipped).
            if let Some(r) = argv.iter().position(|a| a == "-r") {
                argv.splice(r..=r, ["-d".to_string(), "1".to_string()]);
            }
        }
        let out = self.exec(&argv)?;
        if !out.success() && zfs::is_missing_dataset_error(&out.stderr) {
            return Ok(None);
        }
        let listed = out
            .check("zfs get", self.host().label())
            .with_context(|| format!("listing {}", self.label(root)))?;
        let mut tree = zfs::parse_tree(root, &listed)?;
        if !recursive {
            tree.retain(|ds, _| ds == root);
        }
        Ok(Some(tree))
    }

    /// Runs several commands in one exec (see `host::batch`), each logged
    /// with `--debug`; one output per command, stdout and stderr together.
    fn exec_batch(&self, commands: &[Vec<String>]) -> Result<Vec<CmdOutput>> {
        let commands: Vec<Vec<String>> = commands.iter().map(|a| self.privileges.wrap(a)).collect();
        let commands = &commands[..];
        for argv in commands {
            self.ui.debug(&format!(
                "[{}] (batched) {}",
                self.host().label(),
                sh_join(argv)
            ));
        }
        let host = self.host();
        let out = host.run(&batch::script_argv(commands))?;
        if !out.success() {
            return Err(anyhow!(
                "batched commands failed on {} (exit {}): {}",
                host.label(),
                out.status,
                out.stderr.trim()
            ));
        }
        batch::parse_output(commands.len(), &out.stdout)
    }

    /// The file systems and volumes below `ds` (not `ds` itself): what
    /// `zfs destroy -r ds` would take with it besides `ds`.
    pub fn descendants(&self, ds: &Dataset) -> Result<Vec<Dataset>> {
        let out = self
            .exec_ok(&zfs::list_descendants_argv(ds), "zfs list")
            .with_context(|| self.label(ds))?;
        zfs::parse_descendants(ds, &out)
    }

    /// `ds`'s snapshots, oldest first.
    pub fn snapshots(&self, ds: &Dataset) -> Result<Vec<Snapshot>> {
        let out = self
            .exec_ok(
                &zfs::list_snapshots_argv(ds, &self.caps),
                "listing snapshots",
            )
            .with_context(|| self.label(ds))?;
        zfs::parse_snapshot_list(ds, &out)
    }

    /// Snapshots and bookmarks of a source dataset.
    pub fn source_state(&self, ds: &Dataset) -> Result<SourceState> {
        // Bookmarks come in the same listing where the ZFS has them.
        let argv = match self.caps.bookmarks {
            true => zfs::list_snapshots_and_bookmarks_argv(ds),
            false => zfs::list_snapshots_argv(ds, &self.caps),
        };
        let out = self
            .exec_ok(&argv, "listing snapshots")
            .with_context(|| format!("source {}", self.label(ds)))?;
        Ok(SourceState {
            dataset: ds.to_string(),
            snapshots: zfs::parse_snapshot_list(ds, &out)?,
            bookmarks: zfs::parse_bookmark_list(ds, &out)?,
        })
    }

    /// Whether a target dataset exists, its snapshots and its resume token.
    pub fn target_state(&self, ds: &Dataset) -> Result<TargetState> {
        let out = self.exec(&zfs::list_snapshots_argv(ds, &self.caps))?;
        if !out.success() && zfs::is_missing_dataset_error(&out.stderr) {
            return Ok(TargetState {
                exists: false,
                snapshots: Vec::new(),
                resume_token: None,
            });
        }
        let listing = out
            .check("listing snapshots", self.host().label())
            .with_context(|| format!("target {}", self.label(ds)))?;
        let snapshots = zfs::parse_snapshot_list(ds, &listing)?;
        let resume_token = if self.caps.resume_tokens {
            let out = self.exec_ok(&zfs::resume_token_argv(ds), "reading receive_resume_token")?;
            zfs::parse_resume_token(&out)
        } else {
            None
        };
        Ok(TargetState {
            exists: true,
            snapshots,
            resume_token,
        })
    }

    /// Bytes written to `ds` since its snapshot `snap` (`written@snap`);
    /// `None` where the ZFS cannot tell (zfs-fuse has no `written`).
    pub fn written_since(&self, ds: &Dataset, snap: &str) -> Result<Option<u64>> {
        if !self.caps.written_at {
            return Ok(None);
        }
        let out = self
            .exec_ok(
                &zfs::target_props_argv(ds, snap, &self.caps)?,
                "reading written@",
            )
            .with_context(|| self.label(ds))?;
        Ok(zfs::parse_target_props(snap, &out)?.written_since_base)
    }

    /// The target must list `to` with the source's GUID, whatever zfs
    /// receive said.
    pub fn verify(&self, ds: &Dataset, to: &Snapshot) -> Result<()> {
        self.verify_listed(ds, &self.target_state(ds)?, to)
    }

    /// [`ZfsHost::verify`] on a listing `target` of `ds` made after the receive.
    pub fn verify_listed(&self, ds: &Dataset, target: &TargetState, to: &Snapshot) -> Result<()> {
        match target.snapshots.iter().find(|s| s.name == to.name) {
            Some(s) if s.guid == to.guid => Ok(()),
            Some(s) => bail!(
                "verification failed: {}@{} has GUID {} but the source's has {}",
                self.label(ds),
                to.name,
                s.guid,
                to.guid
            ),
            None => bail!(
                "verification failed: zfs receive exited 0 but {}@{} is not on the target",
                self.label(ds),
                to.name
            ),
        }
    }

    /// The size of the stream `send` from `zfs send -nvP`, where the ZFS
    /// has it. An estimate that cannot be had is no error.
    pub fn estimate(&self, send: &[String]) -> Option<u64> {
        if !self.caps.send_estimate {
            return None;
        }
        let out = self.exec(&zfs::send_estimate_argv(send)).ok()?;
        out.success()
            .then(|| zfs::parse_send_estimate(&out.stdout))
            .flatten()
    }

    /// The clones under `root` (or `root` alone) and their origin snapshots.
    pub fn origins(&self, root: &Dataset, recursive: bool) -> Result<Vec<(Dataset, String)>> {
        let out = self.exec_ok(&zfs::origins_argv(root, recursive), "zfs get origin")?;
        zfs::parse_origins(&out)
    }

    /// The properties set locally on `ds` that `--preserve-properties` carries.
    pub fn local_properties(&self, ds: &Dataset) -> Result<Vec<(String, String)>> {
        let out = self.exec_ok(&zfs::local_properties_argv(ds), "zfs get")?;
        Ok(zfs::parse_local_properties(&out))
    }

    /// The values of `props` on `ds`, in the order given.
    pub fn properties(&self, ds: &Dataset, props: &[&str]) -> Result<Vec<(String, String)>> {
        let out = self.exec_ok(&zfs::get_properties_argv(ds, props), "zfs get")?;
        Ok(zfs::parse_property_values(&out))
    }

    /// Snapshots of `ds` with user holds, and how many each has.
    pub fn userrefs(&self, ds: &Dataset) -> Result<Vec<(String, u64)>> {
        let out = self.exec_ok(&zfs::userrefs_argv(ds, &self.caps), "listing holds")?;
        zfs::parse_userrefs(ds, &out)
    }
}

/// What `zfs snapshot` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Created,
    /// A snapshot of that name exists already.
    Exists,
}

/// Every change resync makes to a pool, apart from receiving a stream.
/// Implemented by [`ZfsHost`] (acting) and [`dryrun::DryRun`] (printing).
pub trait Changes: Sync {
    /// `zfs snapshot ds@name`.
    fn snapshot(&self, ds: &Dataset, name: &str) -> Result<Taken>;
    /// `zfs snapshot` of `name` on each of `datasets` (one result each):
    /// `zfs snapshot -r root@name` when `whole_tree` (the datasets are all
    /// of `root`'s tree: one command, one point in time), else one batched
    /// exec of a snapshot per dataset.
    fn snapshot_all(
        &self,
        root: &Dataset,
        datasets: &[Dataset],
        whole_tree: bool,
        name: &str,
    ) -> Result<Vec<Result<Taken>>>;
    /// [`Changes::destroy_snapshot`] of each `(ds, snap, our_tag)`, batched
    /// into one exec where nothing goes wrong; one result each.
    fn destroy_snapshots(&self, list: &[(Dataset, String, Option<String>)]) -> Vec<Result<()>> {
        list.iter()
            .map(|(ds, snap, tag)| self.destroy_snapshot(ds, snap, tag.as_deref()))
            .collect()
    }
    /// Snapshots this layer claims exist that a listing cannot show (a dry
    /// run's pretend snapshots); empty when acting.
    fn pending(&self, _ds: &Dataset) -> Vec<Snapshot> {
        Vec::new()
    }
    /// `zfs hold`, but an existing hold with `tag` is fine.
    fn hold(&self, ds: &Dataset, snap: &str, tag: &str) -> Result<()>;
    /// `zfs release`, but a missing hold is fine.
    fn release(&self, ds: &Dataset, snap: &str, tag: &str) -> Result<()>;
    /// `zfs bookmark ds@snap ds#bookmark`.
    fn bookmark(&self, ds: &Dataset, snap: &str, bookmark: &str) -> Result<()>;
    fn destroy_bookmark(&self, ds: &Dataset, bookmark: &str) -> Result<()>;
    /// `zfs destroy ds@snap`; a snapshot held by `our_tag` is released
    /// first (our own hold must not keep our own sync snapshot alive).
    fn destroy_snapshot(&self, ds: &Dataset, snap: &str, our_tag: Option<&str>) -> Result<()>;
    /// `zfs destroy -r ds`: the caller has checked what goes with it.
    fn destroy_recursive(&self, ds: &Dataset) -> Result<()>;
    /// `zfs destroy -r root@snap`: `snap` of `root` and of each descendant
    /// that has it; the caller has checked that each one is meant.
    fn destroy_snapshot_tree(&self, root: &Dataset, snap: &str) -> Result<()>;
    /// `zfs rollback -r ds@snap`.
    fn rollback(&self, ds: &Dataset, snap: &str) -> Result<()>;
    /// `zfs receive -A ds`: discards a partial receive.
    fn abort_partial(&self, ds: &Dataset) -> Result<()>;
    /// `zfs set prop=value ds` (set locally).
    fn set_property(&self, ds: &Dataset, prop: &str, value: &str) -> Result<()>;
}

impl Changes for ZfsHost<'_> {
    fn set_property(&self, ds: &Dataset, prop: &str, value: &str) -> Result<()> {
        self.exec_ok(&zfs::set_property_argv(ds, prop, value), "zfs set")
            .map(drop)
    }

    fn snapshot_all(
        &self,
        root: &Dataset,
        datasets: &[Dataset],
        whole_tree: bool,
        name: &str,
    ) -> Result<Vec<Result<Taken>>> {
        if whole_tree {
            let out = self.exec(&zfs::create_snapshot_recursive_argv(root, name))?;
            if !out.success() && zfs::error::kind_of(&out.stderr) == ZfsErrorKind::AlreadyExists {
                return Ok(datasets.iter().map(|_| Ok(Taken::Exists)).collect());
            }
            out.check("zfs snapshot -r", self.host().label())
                .with_context(|| format!("cannot take snapshots of {}", self.label(root)))?;
            return Ok(datasets.iter().map(|_| Ok(Taken::Created)).collect());
        }
        let argvs: Vec<Vec<String>> = datasets
            .iter()
            .map(|ds| zfs::create_snapshot_argv(ds, name))
            .collect();
        let outs = self.exec_batch(&argvs)?;
        Ok(outs
            .into_iter()
            .zip(datasets)
            .map(|(out, ds)| {
                if !out.success() && zfs::error::kind_of(&out.stderr) == ZfsErrorKind::AlreadyExists
                {
                    return Ok(Taken::Exists);
                }
                out.check("zfs snapshot", self.host().label())
                    .with_context(|| format!("cannot take snapshot {}", self.label(ds)))?;
                Ok(Taken::Created)
            })
            .collect())
    }

    fn destroy_snapshot_tree(&self, root: &Dataset, snap: &str) -> Result<()> {
        self.exec_ok(
            &zfs::destroy_snapshot_tree_argv(root, snap)?,
            "zfs destroy -r",
        )
        .map(drop)
    }

    fn destroy_snapshots(&self, list: &[(Dataset, String, Option<String>)]) -> Vec<Result<()>> {
        let argvs: Result<Vec<Vec<String>>> = list
            .iter()
            .map(|(ds, snap, _)| zfs::destroy_snapshot_argv(ds, snap))
            .collect();
        let outs = match argvs.and_then(|a| self.exec_batch(&a)) {
            Ok(outs) => outs,
            Err(e) => return list.iter().map(|_| Err(anyhow!("{e:#}"))).collect(),
        };
        // What the batch could not destroy (held by our tag, busy right
        // after a receive) goes the careful way, one at a time.
        outs.into_iter()
            .zip(list)
            .map(|(out, (ds, snap, tag))| match out.success() {
                true => Ok(()),
                false => self.destroy_snapshot(ds, snap, tag.as_deref()),
            })
            .collect()
    }

    fn snapshot(&self, ds: &Dataset, name: &str) -> Result<Taken> {
        let out = self.exec(&zfs::create_snapshot_argv(ds, name))?;
        if !out.success() && zfs::error::kind_of(&out.stderr) == ZfsErrorKind::AlreadyExists {
            return Ok(Taken::Exists);
        }
        out.check("zfs snapshot", self.host().label())
            .with_context(|| format!("cannot take snapshot {}", self.label(ds)))?;
        Ok(Taken::Created)
    }

    fn hold(&self, ds: &Dataset, snap: &str, tag: &str) -> Result<()> {
        let out = self.exec(&zfs::hold_argv(ds, snap, tag))?;
        if out.success() || zfs::is_tag_exists_error(&out.stderr) {
            return Ok(());
        }
        out.check("zfs hold", self.host().label()).map(drop)
    }

    fn release(&self, ds: &Dataset, snap: &str, tag: &str) -> Result<()> {
        let out = self.exec(&zfs::release_argv(ds, snap, tag))?;
        if out.success() || zfs::is_no_such_tag_error(&out.stderr) {
            return Ok(());
        }
        out.check("zfs release", self.host().label()).map(drop)
    }

    fn bookmark(&self, ds: &Dataset, snap: &str, bookmark: &str) -> Result<()> {
        self.exec_ok(&zfs::bookmark_argv(ds, snap, bookmark), "zfs bookmark")
            .map(drop)
    }

    fn destroy_bookmark(&self, ds: &Dataset, bookmark: &str) -> Result<()> {
        self.exec_ok(&zfs::destroy_bookmark_argv(ds, bookmark)?, "zfs destroy")
            .map(drop)
    }

    fn destroy_snapshot(&self, ds: &Dataset, snap: &str, our_tag: Option<&str>) -> Result<()> {
        let destroy = zfs::destroy_snapshot_argv(ds, snap)?;
        let out = self.exec(&destroy)?;
        if out.success() {
            return Ok(());
        }
        if let (true, true, Some(tag)) = (zfs::is_held_error(&out.stderr), self.caps.holds, our_tag)
        {
            if let Err(e) = self.release(ds, snap, tag) {
                self.ui.warn(&format!(
                    "releasing hold {tag} on {}@{snap}: {e:#}",
                    self.label(ds)
                ));
            }
        }
        self.exec_ok_when_idle(&destroy, "zfs destroy").map(drop)
    }

    fn destroy_recursive(&self, ds: &Dataset) -> Result<()> {
        self.exec_ok_when_idle(&zfs::destroy_recursive_argv(ds), "zfs destroy")
            .map(drop)
    }

    fn rollback(&self, ds: &Dataset, snap: &str) -> Result<()> {
        self.exec_ok_when_idle(&zfs::rollback_argv(ds, snap), "zfs rollback")
            .map(drop)
    }

    fn abort_partial(&self, ds: &Dataset) -> Result<()> {
        self.exec_ok(&zfs::abort_partial_argv(ds), "zfs receive -A")
            .map(drop)
    }
}

/// Connects to a side of the run (this machine, or over SSH).
pub fn connect(location: &Location, cfg: &Config) -> Result<Arc<dyn Host>> {
    match location {
        Location::Local => Ok(Arc::new(LocalHost::new())),
        Location::Remote { user, host } => {
            let spec = SshSpec {
                user: user.clone(),
                host: host.clone(),
            };
            Ok(Arc::new(SshHost::connect(&spec, &ssh_options(cfg)?)?))
        }
    }
}

/// A side of the run, connected, with the way to reconnect it.
pub fn connect_reconnecting<'a>(
    location: &'a Location,
    cfg: &'a Config,
) -> Result<Reconnecting<'a>> {
    let host = connect(location, cfg)?;
    Ok(Reconnecting::new(host, move || connect(location, cfg)))
}

/// As whom `zfs` runs on a side of the run, and whether through `sudo -n`:
/// as syncoid decides, by whether the user is root (the SSH user after
/// `~/.ssh/config`, or this process's user), unless
/// `--no-privilege-elevation`.
pub fn privileges(location: &Location, cfg: &Config) -> Result<Privileges> {
    let (user, is_root) = match location {
        Location::Local => {
            let user = std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| "this user".into());
            (user, crate::sys::is_root())
        }
        Location::Remote { user, host } => {
            let spec = SshSpec {
                user: user.clone(),
                host: host.clone(),
            };
            let user = resolve_user(&spec, &ssh_options(cfg)?)?;
            let is_root = user == "root";
            (user, is_root)
        }
    };
    Ok(Privileges::decide(
        &user,
        is_root,
        cfg.no_privilege_elevation,
    ))
}

/// The SSH options the command line asked for, with `$HOME` (where
/// `.ssh/` lives) read here: `cli` does no I/O.
fn ssh_options(cfg: &Config) -> Result<SshOptions> {
    let home = std::env::var_os("HOME")
        .map(Into::into)
        .ok_or_else(|| anyhow!("HOME is not set; cannot find ~/.ssh"))?;
    Ok(cfg.ssh_options(home))
}

/// Where a side of the run is on the network: the host and port its ssh
/// configuration resolves to (`None`: this machine). The run lock is keyed
/// by it, not by how the user spelled the host.
pub fn resolved_address(location: &Location, cfg: &Config) -> Result<Option<(String, u16)>> {
    match location {
        Location::Local => Ok(None),
        Location::Remote { user, host } => {
            let spec = SshSpec {
                user: user.clone(),
                host: host.clone(),
            };
            Ok(Some(resolve_address(&spec, &ssh_options(cfg)?)?))
        }
    }
}

/// Probes what the ZFS behind `host` supports, on `pool`, which must exist.
fn detect(
    host: &dyn Host,
    privileges: &Privileges,
    pool: &str,
    ui: &dyn Progress,
) -> Result<Capabilities> {
    let pool_ds = Dataset::parse(pool)?;
    let out = exec(host, privileges, &zfs::dataset_exists_argv(&pool_ds), ui)?;
    if !out.success() {
        if zfs::is_missing_dataset_error(&out.stderr) {
            bail!("pool {pool} does not exist on {}", host.label());
        }
        out.check("zfs list", host.label())?;
    }
    // The probes are independent: run them on parallel channels, since
    // each remote command costs a round trip and a fork on the server.
    let probes = zfs::capability_probes(pool);
    let outputs = std::thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter()
            .map(|(probe, argv)| {
                (
                    *probe,
                    scope.spawn(move || exec(host, privileges, argv, ui)),
                )
            })
            .collect();
        running
            .into_iter()
            .map(|(probe, handle)| match handle.join() {
                Ok(out) => out.map(|o| (probe, o)),
                Err(_) => Err(anyhow!("capability probe {probe:?} panicked")),
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let results: Vec<ProbeResult> = outputs
        .iter()
        .map(|(probe, o)| ProbeResult {
            probe: *probe,
            status: o.status,
            stdout: &o.stdout,
            stderr: &o.stderr,
        })
        .collect();
    let caps = zfs::capabilities_from(&results);
    ui.debug(&format!("{}: capabilities {caps:?}", host.label()));
    Ok(caps)
}

/// Runs a `zfs` argv on a host with `privileges`, logging it with
/// `--debug`. A refusal for want of privilege is an error of one line.
fn exec(
    host: &dyn Host,
    privileges: &Privileges,
    argv: &[String],
    ui: &dyn Progress,
) -> Result<CmdOutput> {
    let command = privileges.wrap(argv);
    ui.debug(&format!("[{}] {}", host.label(), sh_join(&command)));
    let out = host.run(&command)?;
    if !out.success() {
        if let Some(line) = privileges.explain(host.label(), argv, &out.stderr) {
            return Err(zfs::elevate::Refused(line).into());
        }
        let first = out
            .stderr
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        ui.debug(&format!("[{}] exit {}: {first}", host.label(), out.status));
    }
    Ok(out)
}
