//! ZFS vocabulary: dataset and snapshot types, name validation, argv builders
//! for every `zfs`/`zpool` command resync runs and parsers for their output.
//! Below it: [`caps`] (what a host's ZFS can do, and the probes that tell),
//! [`error`] (what a failed command's stderr means, as a [`ZfsErrorKind`]),
//! [`elevate`] (`sudo -n` for a non-root user, and what a refusal means),
//! [`options`] (the user's `--sendoptions`/`--recvoptions`)
//! and [`token`] (decoding resume tokens). It depends on nothing else in
//! resync.
//!
//! Names are checked wherever they enter: a dataset when it is parsed, and
//! every snapshot and bookmark name read from a listing, so a name ZFS
//! itself could not have made (`%` and `,` mean ranges and lists to `zfs
//! destroy`) stops the run with a one-line error instead of reaching a
//! command line. Destroy argvs check their names again.
//!
//! This module runs nothing. Building an argv is separate from running it (a
//! host does that), so every builder and parser here is a pure function with
//! table tests; parsers are tested on real output pasted from zfs-fuse (pool
//! version 23) with the producing command beside it, and on OpenZFS 2.x
//! fixtures written from its man pages and sources where this machine cannot
//! produce the output. Every argv starts with the program name (`zfs` or
//! `zpool`); arguments are separate elements, never shell text.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{anyhow, bail, Context, Result};

pub mod caps;
pub mod elevate;
pub mod error;
pub mod options;
pub mod token;
pub mod tree;

pub use caps::{capabilities_from, capability_probes, Capabilities, ProbeResult};
pub use elevate::Privileges;
pub use error::{ZfsError, ZfsErrorKind};
pub use options::{parse_recv_options, parse_send_options, ParsedOptions};
pub use tree::{list_tree_argv, parse_tree, Tree};

/// Longest name ZFS accepts, in bytes, exclusive (`ZFS_MAX_DATASET_NAME_LEN`).
const MAX_NAME_LEN: usize = 256;
/// Longest pool name, exclusive: 256 - 2 - 2 * len("$ORIGIN").
const MAX_POOL_NAME_LEN: usize = 240;
/// Deepest nesting ZFS accepts, exclusive (`zfs_max_dataset_nesting`).
const MAX_NESTING: usize = 50;

/// A filesystem or volume name (`pool/a/b`), validated by the rules of
/// OpenZFS's `zfs_namecheck.c` and `zpool_name_valid`. Never a snapshot or a
/// bookmark.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dataset(String);

/// Characters ZFS allows in any name component (`valid_char` in
/// `zfs_namecheck.c`).
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | ' ')
}

/// Why a character is refused, for the few that users actually type.
fn char_hint(c: char) -> &'static str {
    match c {
        '@' => " (that names a snapshot; give the dataset)",
        '#' => " (that names a bookmark; give the dataset)",
        '%' => " (ZFS reserves it for temporary receive clones)",
        _ => "",
    }
}

impl Dataset {
    /// Validates `s` as a dataset name. The error is one line naming the
    /// problem, e.g. `invalid dataset name "a;b": character ';' is not
    /// allowed`.
    pub fn parse(s: &str) -> Result<Dataset> {
        let bad = |why: String| anyhow!("invalid dataset name {s:?}: {why}");
        if s.is_empty() {
            return Err(bad("the name is empty".into()));
        }
        if s.len() >= MAX_NAME_LEN {
            return Err(bad(format!(
                "it is {} bytes long; ZFS allows at most {}",
                s.len(),
                MAX_NAME_LEN - 1
            )));
        }
        if let Some(c) = s.chars().find(|&c| c != '/' && !is_name_char(c)) {
            return Err(bad(format!(
                "character {c:?} is not allowed{}",
                char_hint(c)
            )));
        }
        if s.starts_with('/') {
            return Err(bad(
                "it starts with '/'; give pool/dataset, not a path".into()
            ));
        }
        if s.ends_with('/') {
            return Err(bad("it ends with '/'".into()));
        }
        for component in s.split('/') {
            match component {
                "" => return Err(bad("it has an empty component (\"//\")".into())),
                "." | ".." => return Err(bad(format!("component {component:?} is not allowed"))),
                _ => {}
            }
        }
        let depth = s.matches('/').count();
        if depth >= MAX_NESTING {
            return Err(bad(format!(
                "it is nested {depth} levels deep; ZFS allows at most {}",
                MAX_NESTING - 1
            )));
        }
        let pool = s.split('/').next().unwrap_or(s);
        check_pool_name(pool).map_err(bad)?;
        Ok(Dataset(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first component.
    pub fn pool(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// The path of `self` below `root`: `""` for `root` itself, `"c/d"` for
    /// `root/c/d`, `None` when `self` is not `root` or one of its descendants
    /// (`pool/ab` is not under `pool/a`).
    pub fn relative_to(&self, root: &Dataset) -> Option<&str> {
        let rest = self.0.strip_prefix(root.as_str())?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix('/')
        }
    }

    /// `self/rel`, validated; `rel == ""` returns `self`.
    pub fn join(&self, rel: &str) -> Result<Dataset> {
        if rel.is_empty() {
            return Ok(self.clone());
        }
        Dataset::parse(&format!("{}/{}", self.0, rel))
    }

    /// The full name of snapshot `snap` of this dataset: `ds@snap`.
    pub fn snapshot(&self, snap: &str) -> String {
        format!("{}@{}", self.0, snap)
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Pool name rules: a letter first, and not a name `zpool create` reserves
/// for vdev keywords (`zpool_name_valid` in libzfs, `pool_namecheck`).
fn check_pool_name(pool: &str) -> std::result::Result<(), String> {
    if !pool.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("pool name {pool:?} must start with a letter"));
    }
    let reserved_prefix = ["mirror", "raidz", "draid", "spare"]
        .iter()
        .any(|p| pool.starts_with(p));
    // Solaris disk names (c0t0d0): older libzfs refused them as pool names.
    let disk_like = pool
        .strip_prefix('c')
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    if reserved_prefix || pool == "log" || disk_like {
        return Err(format!("pool name {pool:?} is reserved by ZFS"));
    }
    // Room for "pool/$ORIGIN@$ORIGIN" (pool_namecheck).
    if pool.len() >= MAX_POOL_NAME_LEN {
        return Err(format!(
            "pool name is {} bytes long; ZFS allows at most {}",
            pool.len(),
            MAX_POOL_NAME_LEN - 1
        ));
    }
    Ok(())
}

/// Validates a snapshot's short name (the part after `@`) by ZFS's rules:
/// 1 to 255 bytes of letters, digits and `_-:. ` (`zfs_namecheck.c`).
/// Anything else cannot be a real snapshot, and some of it is dangerous on
/// a command line: `zfs destroy ds@a%b` destroys a range, `ds@a,b` a list.
/// A leading `-` is allowed, as by ZFS: the name never stands alone in an
/// argv (it follows `ds@`), so it cannot be taken for an option.
pub fn validate_snapshot_name(snap: &str) -> Result<()> {
    validate_short_name("snapshot", snap)
}

/// Validates a bookmark's short name (the part after `#`): the same rules
/// as [`validate_snapshot_name`].
pub fn validate_bookmark_name(bookmark: &str) -> Result<()> {
    validate_short_name("bookmark", bookmark)
}

fn validate_short_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("invalid {kind} name \"\": the name is empty");
    }
    if name.len() >= MAX_NAME_LEN {
        bail!(
            "invalid {kind} name {name:?}: it is {} bytes long; ZFS allows at most {}",
            name.len(),
            MAX_NAME_LEN - 1
        );
    }
    if let Some(c) = name.chars().find(|&c| !is_name_char(c)) {
        bail!("invalid {kind} name {name:?}: character {c:?} is not allowed");
    }
    Ok(())
}

/// One snapshot of one dataset, as `zfs get` reports it. Snapshots are the
/// same snapshot on two pools exactly when their GUIDs are equal; the name
/// alone proves nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The short name, after `@`.
    pub name: String,
    pub guid: u64,
    pub createtxg: u64,
}

fn zfs(args: &[&str]) -> Vec<String> {
    std::iter::once("zfs")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}

/// `zfs get -Hp -d 1 [-t snapshot] -o name,property,value guid,createtxg DS`.
/// Without `-t` (zfs-fuse) the output also holds the dataset itself and its
/// children; [`parse_snapshot_list`] skips those lines.
pub fn list_snapshots_argv(ds: &Dataset, caps: &Capabilities) -> Vec<String> {
    snapshot_props_argv(ds, caps, "guid,createtxg")
}

/// `zfs get -Hp -d 1 [-t snapshot] -o name,property,value PROPS DS`
fn snapshot_props_argv(ds: &Dataset, caps: &Capabilities, props: &str) -> Vec<String> {
    let mut argv = zfs(&["get", "-Hp", "-d", "1"]);
    if caps.get_type_filter {
        argv.extend(["-t".into(), "snapshot".into()]);
    }
    argv.extend(["-o", "name,property,value", props, ds.as_str()].map(String::from));
    argv
}

/// Parses the output of [`list_snapshots_argv`] into `ds`'s snapshots, sorted
/// by createtxg (then name). Every line must have three tab-separated
/// fields; lines about other datasets (and bookmarks) are skipped; each
/// snapshot of `ds` needs a valid name ([`validate_snapshot_name`]: the
/// whole listing is refused otherwise), exactly one `guid` and one
/// `createtxg`.
pub fn parse_snapshot_list(ds: &Dataset, stdout: &str) -> Result<Vec<Snapshot>> {
    parse_listing(ds, '@', stdout)
}

/// Parses the bookmarks (`ds#name`) out of the output of
/// [`list_snapshots_and_bookmarks_argv`], like [`parse_snapshot_list`]: a
/// bookmark keeps its snapshot's guid and createtxg, so it is returned as a
/// [`Snapshot`] whose name is the bookmark's (after `#`).
pub fn parse_bookmark_list(ds: &Dataset, stdout: &str) -> Result<Vec<Snapshot>> {
    parse_listing(ds, '#', stdout)
}

/// The entries `ds{sep}name` of a `zfs get -Hp ... guid,createtxg` listing.
fn parse_listing(ds: &Dataset, sep: char, stdout: &str) -> Result<Vec<Snapshot>> {
    let kind = if sep == '#' { "bookmark" } else { "snapshot" };
    let prefix = format!("{ds}{sep}");
    let mut props: BTreeMap<&str, (Option<u64>, Option<u64>)> = BTreeMap::new();
    for (n, line) in stdout.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, property, value] = fields[..] else {
            bail!(
                "unexpected line {} in {kind} listing of {ds}: {line:?} (want name, property and value separated by tabs)",
                n + 1
            );
        };
        let Some(snap) = name.strip_prefix(&prefix) else {
            continue;
        };
        validate_short_name(kind, snap)
            .with_context(|| format!("line {} of the {kind} listing of {ds}", n + 1))?;
        let parsed: u64 = value.parse().map_err(|_| {
            anyhow!(
                "{kind} {name}: {property} is {value:?}, not a number (line {})",
                n + 1
            )
        })?;
        let entry = props.entry(snap).or_default();
        let slot = match property {
            "guid" => &mut entry.0,
            "createtxg" => &mut entry.1,
            other => bail!("{kind} {name}: unexpected property {other:?} in listing"),
        };
        if slot.replace(parsed).is_some() {
            bail!("{kind} {name}: {property} listed twice");
        }
    }
    let mut snapshots = props
        .into_iter()
        .map(|(name, (guid, createtxg))| match (guid, createtxg) {
            (Some(guid), Some(createtxg)) => Ok(Snapshot {
                name: name.to_string(),
                guid,
                createtxg,
            }),
            _ => Err(anyhow!(
                "{kind} {ds}{sep}{name}: listing lacks its {}",
                if guid.is_none() { "guid" } else { "createtxg" }
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    snapshots.sort_by(|a, b| (a.createtxg, &a.name).cmp(&(b.createtxg, &b.name)));
    Ok(snapshots)
}

/// `zfs get -Hp -d 1 -t snapshot,bookmark -o name,property,value
/// guid,createtxg DS`: snapshots and bookmarks in one listing, for
/// [`parse_snapshot_list`] and [`parse_bookmark_list`]. Only where
/// [`Capabilities::bookmarks`] holds (every such ZFS has `get -t`).
pub fn list_snapshots_and_bookmarks_argv(ds: &Dataset) -> Vec<String> {
    zfs(&[
        "get",
        "-Hp",
        "-d",
        "1",
        "-t",
        "snapshot,bookmark",
        "-o",
        "name,property,value",
        "guid,createtxg",
        ds.as_str(),
    ])
}

/// `zfs list -H -o name -r -t filesystem,volume DS`: DS and every
/// filesystem and volume below it, for checking what `zfs destroy -r DS`
/// would take with it ([`parse_descendants`]).
pub fn list_descendants_argv(ds: &Dataset) -> Vec<String> {
    zfs(&[
        "list",
        "-H",
        "-o",
        "name",
        "-r",
        "-t",
        "filesystem,volume",
        ds.as_str(),
    ])
}

/// The descendants of `ds` (not `ds` itself) in [`list_descendants_argv`]'s
/// output, in listing order. Every name is validated; a line that is
/// neither `ds` nor below it is an error, since `-r` lists nothing else.
pub fn parse_descendants(ds: &Dataset, stdout: &str) -> Result<Vec<Dataset>> {
    let mut out = Vec::new();
    for line in stdout.lines().filter(|l| !l.is_empty()) {
        let child = Dataset::parse(line)
            .with_context(|| format!("unexpected line in the descendant listing of {ds}"))?;
        match child.relative_to(ds) {
            Some("") => {}
            Some(_) => out.push(child),
            None => bail!("the descendant listing of {ds} names {child}, which is not below it"),
        }
    }
    Ok(out)
}

/// What one `zfs get` tells about a receive target (see
/// [`target_props_argv`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetProps {
    /// `written@BASE`: bytes written to the target since the snapshot
    /// `BASE`, 0 when it is unchanged (then an incremental receive from
    /// `BASE` needs no rollback). `None` when ZFS printed `-`.
    pub written_since_base: Option<u64>,
    /// `receive_resume_token`, when it was asked for and a resumable
    /// receive was interrupted.
    pub resume_token: Option<String>,
}

/// `zfs get -Hp -o property,value written@BASE[,receive_resume_token] DS`:
/// whether the target changed since the snapshot BASE, and (with
/// [`Capabilities::resume_tokens`]) its resume token, in one call. Only
/// where [`Capabilities::written_at`] holds; `base` must pass
/// [`validate_snapshot_name`]. Parse with [`parse_target_props`].
pub fn target_props_argv(ds: &Dataset, base: &str, caps: &Capabilities) -> Result<Vec<String>> {
    validate_snapshot_name(base).with_context(|| format!("reading written@ of {ds}"))?;
    let mut props = format!("written@{base}");
    if caps.resume_tokens {
        props.push_str(",receive_resume_token");
    }
    Ok(zfs(&[
        "get",
        "-Hp",
        "-o",
        "property,value",
        &props,
        ds.as_str(),
    ]))
}

/// Parses [`target_props_argv`]'s output for the same `base`: one
/// `property<TAB>value` line per property, `written@BASE` required.
pub fn parse_target_props(base: &str, stdout: &str) -> Result<TargetProps> {
    let written = format!("written@{base}");
    let mut props = TargetProps::default();
    let mut seen_written = false;
    for line in stdout.lines().filter(|l| !l.is_empty()) {
        let Some((property, value)) = line.split_once('\t') else {
            bail!("unexpected line in zfs get output: {line:?} (want property and value separated by a tab)");
        };
        if property == written {
            if std::mem::replace(&mut seen_written, true) {
                bail!("{property} listed twice");
            }
            props.written_since_base = match value {
                "-" => None,
                v => Some(
                    v.parse()
                        .map_err(|_| anyhow!("{property} is {v:?}, not a number"))?,
                ),
            };
        } else if property == "receive_resume_token" {
            props.resume_token = parse_resume_token(value);
        } else {
            bail!("unexpected property {property:?} in zfs get output");
        }
    }
    if !seen_written {
        bail!("zfs get printed no {written}");
    }
    Ok(props)
}

/// `zfs list -H -o name DS`: exits 0 when DS exists; otherwise check
/// [`is_missing_dataset_error`].
pub fn dataset_exists_argv(ds: &Dataset) -> Vec<String> {
    zfs(&["list", "-H", "-o", "name", ds.as_str()])
}

// Shorthands for `error::kind_of(stderr) == ...`, for the checks callers
// make most; the classification itself lives in `error` only.

/// [`ZfsErrorKind::DatasetMissing`]: the dataset (or its pool) does not
/// exist.
pub fn is_missing_dataset_error(stderr: &str) -> bool {
    error::kind_of(stderr) == ZfsErrorKind::DatasetMissing
}

/// [`ZfsErrorKind::Busy`]: zfs-fuse says this for about a second after
/// receiving into a dataset it then mounts, so a destroy right after a
/// receive may need a retry.
pub fn is_busy_error(stderr: &str) -> bool {
    error::kind_of(stderr) == ZfsErrorKind::Busy
}

/// [`ZfsErrorKind::NoSuchTag`]: `zfs release` found no hold with that tag.
pub fn is_no_such_tag_error(stderr: &str) -> bool {
    error::kind_of(stderr) == ZfsErrorKind::NoSuchTag
}

/// `zfs get -H -o value receive_resume_token DS` (needs
/// [`Capabilities::resume_tokens`]).
pub fn resume_token_argv(ds: &Dataset) -> Vec<String> {
    zfs(&[
        "get",
        "-H",
        "-o",
        "value",
        "receive_resume_token",
        ds.as_str(),
    ])
}

/// The token from [`resume_token_argv`]'s output; `-` or nothing means no
/// interrupted receive.
pub fn parse_resume_token(stdout: &str) -> Option<String> {
    let token = stdout.trim();
    if token.is_empty() || token == "-" {
        None
    } else {
        Some(token.to_string())
    }
}

/// `zfs get -H -s local -o property,value all DS`: the properties set
/// locally on DS (syncoid's `getlocalzfsvalues`, for `--preserve-properties`).
pub fn local_properties_argv(ds: &Dataset) -> Vec<String> {
    zfs(&[
        "get",
        "-H",
        "-s",
        "local",
        "-o",
        "property,value",
        "all",
        ds.as_str(),
    ])
}

/// Properties `--preserve-properties` never copies, as syncoid 2.3 lists
/// them: read-only ones, those fixed at creation, and the target's own.
const NOT_PRESERVED: &[&str] = &[
    "available",
    "compressratio",
    "createtxg",
    "creation",
    "clones",
    "defer_destroy",
    "encryptionroot",
    "filesystem_count",
    "keystatus",
    "guid",
    "logicalreferenced",
    "logicalused",
    "mounted",
    "objsetid",
    "origin",
    "receive_resume_token",
    "redact_snaps",
    "referenced",
    "refcompressratio",
    "snapshot_count",
    "type",
    "used",
    "usedbychildren",
    "usedbydataset",
    "usedbyrefreservation",
    "usedbysnapshots",
    "userrefs",
    "snapshots_changed",
    "volblocksize",
    "written",
    "version",
    "volsize",
    "casesensitivity",
    "normalization",
    "utf8only",
    "encryption",
];

/// `property<TAB>value` lines (from `zfs get -H -o property,value`), in order.
pub fn parse_property_values(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect()
}

/// The locally set properties in [`local_properties_argv`]'s output that
/// `--preserve-properties` carries to the target.
pub fn parse_local_properties(stdout: &str) -> Vec<(String, String)> {
    parse_property_values(stdout)
        .into_iter()
        .filter(|(p, _)| !NOT_PRESERVED.contains(&p.as_str()))
        .collect()
}

/// `zfs get -H -o property,value PROPS DS`
pub fn get_properties_argv(ds: &Dataset, props: &[&str]) -> Vec<String> {
    zfs(&[
        "get",
        "-H",
        "-o",
        "property,value",
        &props.join(","),
        ds.as_str(),
    ])
}

/// `zfs set PROP=VALUE DS`
pub fn set_property_argv(ds: &Dataset, prop: &str, value: &str) -> Vec<String> {
    zfs(&["set", &format!("{prop}={value}"), ds.as_str()])
}

/// `zfs get -H -o name,value [-r] origin ROOT`: which datasets are clones
/// (of which snapshot); snapshots' lines are left out by the parser.
pub fn origins_argv(root: &Dataset, recursive: bool) -> Vec<String> {
    let mut argv = zfs(&["get", "-H", "-o", "name,value"]);
    if recursive {
        argv.push("-r".into());
    }
    argv.extend(["origin".into(), root.to_string()]);
    argv
}

/// [`origins_argv`]'s output: each clone and the full name of its origin
/// snapshot (`pool/ds@snap`); datasets that are not clones are left out.
pub fn parse_origins(stdout: &str) -> Result<Vec<(Dataset, String)>> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let Some((name, origin)) = line.split_once('\t') else {
            continue;
        };
        if name.contains('@') || origin == "-" || !origin.contains('@') {
            continue;
        }
        out.push((Dataset::parse(name)?, origin.to_string()));
    }
    Ok(out)
}

/// `zfs send OPTS -i ORIGIN_DS@SNAP DS@TO`: a clone's first stream, from
/// its origin snapshot; received where the origin is, it makes a clone.
pub fn send_clone_argv(ds: &Dataset, origin: &str, to: &str, options: &[String]) -> Vec<String> {
    let mut argv = zfs(&["send"]);
    argv.extend(options.iter().cloned());
    argv.extend(["-i".into(), origin.to_string(), ds.snapshot(to)]);
    argv
}

/// `zfs snapshot -r ROOT@SNAP`: ROOT and everything below it, atomically.
pub fn create_snapshot_recursive_argv(root: &Dataset, snap: &str) -> Vec<String> {
    zfs(&["snapshot", "-r", &root.snapshot(snap)])
}

/// `zfs snapshot DS@SNAP`
pub fn create_snapshot_argv(ds: &Dataset, snap: &str) -> Vec<String> {
    zfs(&["snapshot", &ds.snapshot(snap)])
}

/// `zfs destroy DS@SNAP`. `snap` must pass [`validate_snapshot_name`]: to
/// `zfs destroy`, `a%b` is a range of snapshots and `a,b` a list.
pub fn destroy_snapshot_argv(ds: &Dataset, snap: &str) -> Result<Vec<String>> {
    validate_snapshot_name(snap).with_context(|| format!("refusing to destroy {ds}@{snap}"))?;
    Ok(zfs(&["destroy", &ds.snapshot(snap)]))
}

/// `zfs destroy -r DS@SNAP`: the snapshot SNAP of DS and of every
/// descendant that has one, in one command.
pub fn destroy_snapshot_tree_argv(ds: &Dataset, snap: &str) -> Result<Vec<String>> {
    validate_snapshot_name(snap).with_context(|| format!("refusing to destroy {ds}@{snap}"))?;
    Ok(zfs(&["destroy", "-r", &ds.snapshot(snap)]))
}

/// `zfs destroy -r DS`: the dataset, its snapshots and its descendants.
pub fn destroy_recursive_argv(ds: &Dataset) -> Vec<String> {
    zfs(&["destroy", "-r", ds.as_str()])
}

/// `zfs rollback -r DS@SNAP`: also destroys DS's snapshots newer than SNAP.
pub fn rollback_argv(ds: &Dataset, snap: &str) -> Vec<String> {
    zfs(&["rollback", "-r", &ds.snapshot(snap)])
}

/// `zfs hold TAG DS@SNAP` (needs [`Capabilities::holds`]).
pub fn hold_argv(ds: &Dataset, snap: &str, tag: &str) -> Vec<String> {
    zfs(&["hold", tag, &ds.snapshot(snap)])
}

/// `zfs release TAG DS@SNAP`; a missing hold fails with
/// [`is_no_such_tag_error`].
pub fn release_argv(ds: &Dataset, snap: &str, tag: &str) -> Vec<String> {
    zfs(&["release", tag, &ds.snapshot(snap)])
}

/// `zfs bookmark DS@SNAP DS#BOOKMARK` (needs [`Capabilities::bookmarks`]).
pub fn bookmark_argv(ds: &Dataset, snap: &str, bookmark: &str) -> Vec<String> {
    zfs(&["bookmark", &ds.snapshot(snap), &format!("{ds}#{bookmark}")])
}

/// `zfs destroy DS#BOOKMARK`. `bookmark` must pass
/// [`validate_bookmark_name`].
pub fn destroy_bookmark_argv(ds: &Dataset, bookmark: &str) -> Result<Vec<String>> {
    validate_bookmark_name(bookmark)
        .with_context(|| format!("refusing to destroy {ds}#{bookmark}"))?;
    Ok(zfs(&["destroy", &format!("{ds}#{bookmark}")]))
}

/// `zfs get -Hp -d 1 [-t snapshot] -o name,property,value userrefs DS`: how
/// many holds each snapshot has (zfs-fuse lists them too, though its `zfs
/// holds` does not work). Parse with [`parse_userrefs`].
pub fn userrefs_argv(ds: &Dataset, caps: &Capabilities) -> Vec<String> {
    snapshot_props_argv(ds, caps, "userrefs")
}

/// `(snapshot name, hold count)` of `ds`'s snapshots from [`userrefs_argv`]'s
/// output; the dataset's own line (`-`) and other datasets are skipped.
pub fn parse_userrefs(ds: &Dataset, stdout: &str) -> Result<Vec<(String, u64)>> {
    let prefix = format!("{ds}@");
    let mut out = Vec::new();
    for line in stdout.lines().filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, "userrefs", value] = fields[..] else {
            bail!("unexpected line in userrefs listing of {ds}: {line:?}");
        };
        let Some(snap) = name.strip_prefix(&prefix) else {
            continue;
        };
        validate_snapshot_name(snap).with_context(|| format!("userrefs listing of {ds}"))?;
        let n = value
            .parse()
            .map_err(|_| anyhow!("snapshot {name}: userrefs is {value:?}, not a number"))?;
        out.push((snap.to_string(), n));
    }
    Ok(out)
}

/// `zfs destroy` refused because the snapshot is held:
/// [`ZfsErrorKind::Held`] on OpenZFS, [`ZfsErrorKind::Busy`] on zfs-fuse.
pub fn is_held_error(stderr: &str) -> bool {
    matches!(
        error::kind_of(stderr),
        ZfsErrorKind::Held | ZfsErrorKind::Busy
    )
}

/// [`ZfsErrorKind::TagExists`]: `zfs hold` found the tag already there, so
/// the snapshot is held as wanted.
pub fn is_tag_exists_error(stderr: &str) -> bool {
    error::kind_of(stderr) == ZfsErrorKind::TagExists
}

/// `zfs send OPTS -i DS#BOOKMARK DS@TO`: an incremental stream from a
/// bookmark. ZFS sends no intermediate snapshots from a bookmark (`-I` is
/// refused: "multiple snapshots cannot be sent from a bookmark"). Of the
/// options only those syncoid passes on with a bookmark go (`-L -c -e -w`:
/// `-p`, `-h`, `-b` describe a snapshot the bookmark no longer has).
pub fn send_from_bookmark_argv(
    ds: &Dataset,
    bookmark: &str,
    to: &str,
    options: &[String],
) -> Vec<String> {
    let mut argv = zfs(&["send"]);
    argv.extend(
        options
            .iter()
            .filter(|o| RESUME_SEND_FLAGS.contains(&o.as_str()))
            .cloned(),
    );
    argv.extend(["-i".into(), format!("{ds}#{bookmark}"), ds.snapshot(to)]);
    argv
}

/// What to send: a full stream of `to`, or an incremental one from `from`
/// (with every snapshot between them when `intermediates`, `-I`; else `-i`).
/// `options` come from [`parse_send_options`].
pub struct SendArgs<'a> {
    pub from: Option<&'a str>,
    pub to: &'a str,
    pub intermediates: bool,
    pub options: &'a [String],
}

/// `zfs send OPTS [-I|-i DS@FROM] DS@TO`
pub fn send_argv(ds: &Dataset, args: &SendArgs) -> Vec<String> {
    let mut argv = zfs(&["send"]);
    argv.extend(args.options.iter().cloned());
    if let Some(from) = args.from {
        argv.push(if args.intermediates { "-I" } else { "-i" }.into());
        argv.push(ds.snapshot(from));
    }
    argv.push(ds.snapshot(args.to));
    argv
}

/// Send flags that `zfs send -t` accepts. The token already records how the
/// stream was made; OpenZFS refuses `-p`, `-b`, `-h`, `-R` with `-t`
/// ("invalid flags combined with -t"), so only these pass through.
const RESUME_SEND_FLAGS: [&str; 4] = ["-L", "-c", "-e", "-w"];

/// `zfs send OPTS -t TOKEN`, keeping only the options `-t` accepts.
pub fn send_resume_argv(token: &str, options: &[String]) -> Vec<String> {
    let mut argv = zfs(&["send"]);
    argv.extend(
        options
            .iter()
            .filter(|o| RESUME_SEND_FLAGS.contains(&o.as_str()))
            .cloned(),
    );
    argv.extend(["-t".into(), token.to_string()]);
    argv
}

/// The dry-run form of a send argv (`zfs send -nvP ...`), which prints the
/// stream's estimated size instead of the stream. Only where
/// [`Capabilities::send_estimate`] holds.
pub fn send_estimate_argv(send_argv: &[String]) -> Vec<String> {
    let mut argv = send_argv.to_vec();
    let at = argv
        .iter()
        .position(|a| a == "send")
        .map_or(argv.len(), |i| i + 1);
    argv.insert(at, "-nvP".into());
    argv
}

/// The estimate from `zfs send -nvP` output: its `size` line (OpenZFS
/// prints one per stream, then a total `size` line last). `None` when
/// there is none or it does not parse; the caller then shows no total.
pub fn parse_send_estimate(stdout: &str) -> Option<u64> {
    stdout.lines().rev().find_map(|l| {
        let mut f = l.split('\t');
        match (f.next(), f.next()) {
            (Some("size"), Some(n)) => n.trim().parse::<u64>().ok(),
            _ => None,
        }
    })
}

/// How to receive: `resumable` adds `-s` (keep partial state on
/// interruption), `force` adds `-F` (roll the target back first). `options`
/// come from [`parse_recv_options`].
pub struct RecvArgs<'a> {
    pub resumable: bool,
    pub force: bool,
    pub options: &'a [String],
}

/// `zfs receive [-s] [-F] OPTS DS`
pub fn receive_argv(ds: &Dataset, args: &RecvArgs) -> Vec<String> {
    let mut argv = zfs(&["receive"]);
    if args.resumable {
        argv.push("-s".into());
    }
    if args.force {
        argv.push("-F".into());
    }
    argv.extend(args.options.iter().cloned());
    argv.push(ds.to_string());
    argv
}

/// `zfs receive -A DS`: discards an interrupted resumable receive.
pub fn abort_partial_argv(ds: &Dataset) -> Vec<String> {
    zfs(&["receive", "-A", ds.as_str()])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ds(s: &str) -> Dataset {
        Dataset::parse(s).unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn valid_dataset_names_parse() {
        for name in [
            "tank",
            "tank/a",
            "tank/a/b-c_d:e.f",
            "tank/with space",
            "tank/a/..b",
            "T0/x",
            "logs/x",
            "cpool/x",
            "my pool/x",
        ] {
            assert_eq!(ds(name).as_str(), name);
        }
    }

    #[test]
    fn invalid_dataset_names_say_why_in_one_line() {
        let cases = [
            (
                "a;b",
                r#"invalid dataset name "a;b": character ';' is not allowed"#,
            ),
            (
                "tank/a@snap",
                "character '@' is not allowed (that names a snapshot",
            ),
            ("tank/a#bm", "character '#' is not allowed"),
            ("tank/a%recv", "character '%' is not allowed"),
            ("tank/a\nb", r"character '\n' is not allowed"),
            ("tank/é", "character 'é' is not allowed"),
            ("", "the name is empty"),
            ("/tank/a", "starts with '/'"),
            ("tank/", "ends with '/'"),
            ("tank//a", "empty component"),
            ("tank/./a", "component \".\" is not allowed"),
            ("tank/..", "component \"..\" is not allowed"),
            ("1tank/a", "must start with a letter"),
            ("mirror", "reserved"),
            ("raidz2/a", "reserved"),
            ("draid1/a", "reserved"),
            ("spare/a", "reserved"),
            ("log/a", "reserved"),
            ("c0t0d0/a", "reserved"),
        ];
        for (name, want) in cases {
            let got = err(Dataset::parse(name));
            assert!(got.contains(want), "{name:?}: {got}");
            assert!(!got.contains('\n'), "{name:?}: {got}");
        }
    }

    #[test]
    fn dataset_names_have_length_and_depth_limits() {
        let long = format!("tank/{}", "x".repeat(260));
        assert!(ds(&long[..255]).as_str().len() == 255);
        assert!(err(Dataset::parse(&long[..256])).contains("at most 255"));
        let deep = format!("tank{}", "/d".repeat(50));
        assert!(err(Dataset::parse(&deep)).contains("nested 50 levels deep; ZFS allows at most 49"));
        ds(&format!("tank{}", "/d".repeat(49)));
        assert!(err(Dataset::parse(&"p".repeat(240))).contains("pool name is 240 bytes long"));
        ds(&"p".repeat(239));
    }

    #[test]
    fn dataset_paths_relate() {
        let root = ds("tank/a");
        assert_eq!(root.pool(), "tank");
        assert_eq!(ds("tank").pool(), "tank");
        assert_eq!(root.relative_to(&root), Some(""));
        assert_eq!(ds("tank/a/c/d").relative_to(&root), Some("c/d"));
        assert_eq!(ds("tank/ab").relative_to(&root), None);
        assert_eq!(ds("tank").relative_to(&root), None);
        assert_eq!(root.join("").unwrap(), root);
        assert_eq!(root.join("c/d").unwrap(), ds("tank/a/c/d"));
        assert!(root.join("c;d").is_err());
        assert!(root.join("../x").is_err());
        assert_eq!(root.snapshot("s1"), "tank/a@s1");
        assert_eq!(root.to_string(), "tank/a");
    }

    #[test]
    fn snapshot_names_validate() {
        validate_snapshot_name("resync_host_2026-11-21T23:20:48Z").unwrap();
        validate_snapshot_name("with space").unwrap();
        assert!(err(validate_snapshot_name("")).contains("empty"));
        assert!(err(validate_snapshot_name("a/b")).contains("character '/'"));
        assert!(err(validate_snapshot_name("a@b")).contains("character '@'"));
        assert!(err(validate_snapshot_name(&"x".repeat(256))).contains("at most 255"));
    }

    #[test]
    fn argv_builders() {
        let a = ds("tank/a b");
        let caps = Capabilities::default();
        let openzfs = Capabilities {
            get_type_filter: true,
            ..caps
        };
        let opts = strings(&["-L", "-c", "-p"]);
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                list_snapshots_argv(&a, &caps),
                "zfs get -Hp -d 1 -o name,property,value guid,createtxg|tank/a b",
            ),
            (
                list_snapshots_argv(&a, &openzfs),
                "zfs get -Hp -d 1 -t snapshot -o name,property,value guid,createtxg|tank/a b",
            ),
            (dataset_exists_argv(&a), "zfs list -H -o name|tank/a b"),
            (
                resume_token_argv(&a),
                "zfs get -H -o value receive_resume_token|tank/a b",
            ),
            (create_snapshot_argv(&a, "s1"), "zfs snapshot|tank/a b@s1"),
            (
                destroy_snapshot_argv(&a, "s1").unwrap(),
                "zfs destroy|tank/a b@s1",
            ),
            (destroy_recursive_argv(&a), "zfs destroy -r|tank/a b"),
            (rollback_argv(&a, "s1"), "zfs rollback -r|tank/a b@s1"),
            (hold_argv(&a, "s1", "resync"), "zfs hold resync|tank/a b@s1"),
            (
                release_argv(&a, "s1", "resync"),
                "zfs release resync|tank/a b@s1",
            ),
            (
                send_argv(
                    &a,
                    &SendArgs {
                        from: None,
                        to: "s2",
                        intermediates: true,
                        options: &[],
                    },
                ),
                "zfs send|tank/a b@s2",
            ),
            (
                send_argv(
                    &a,
                    &SendArgs {
                        from: Some("s1"),
                        to: "s2",
                        intermediates: true,
                        options: &opts,
                    },
                ),
                "zfs send -L -c -p -I|tank/a b@s1|tank/a b@s2",
            ),
            (
                send_argv(
                    &a,
                    &SendArgs {
                        from: Some("s1"),
                        to: "s2",
                        intermediates: false,
                        options: &[],
                    },
                ),
                "zfs send -i|tank/a b@s1|tank/a b@s2",
            ),
            (
                send_resume_argv("1-abc-def", &opts),
                "zfs send -L -c -t 1-abc-def",
            ),
            (
                receive_argv(
                    &a,
                    &RecvArgs {
                        resumable: false,
                        force: false,
                        options: &[],
                    },
                ),
                "zfs receive|tank/a b",
            ),
            (
                receive_argv(
                    &a,
                    &RecvArgs {
                        resumable: true,
                        force: true,
                        options: &strings(&["-u", "-o", "compression=lz4"]),
                    },
                ),
                "zfs receive -s -F -u -o compression=lz4|tank/a b",
            ),
            (abort_partial_argv(&a), "zfs receive -A|tank/a b"),
        ];
        for (argv, want) in cases {
            // `want`: space-separated words, then '|'-separated words that contain spaces.
            let mut parts = want.split('|');
            let mut expected: Vec<String> =
                parts.next().unwrap().split(' ').map(String::from).collect();
            expected.extend(parts.map(String::from));
            assert_eq!(argv, expected);
        }
    }

    // zfs-fuse 0.7.0, pool version 23:
    // zfs list -H -o name -t filesystem,volume -r corehelp
    const FUSE_DATASETS: &str = "corehelp\ncorehelp/a\ncorehelp/a/b\ncorehelp/a/with space\n";

    // zfs-fuse: zfs get -Hp -d 1 -o name,property,value guid,createtxg corehelp/a
    // (replicate's decision tests read it too)
    pub(crate) const FUSE_SNAPSHOTS: &str = "\
corehelp/a\tguid\t14892150305651023025
corehelp/a\tcreatetxg\t7
corehelp/a@s1\tguid\t15434711050884566143
corehelp/a@s1\tcreatetxg\t16
corehelp/a@s2\tguid\t4703203791645338451
corehelp/a@s2\tcreatetxg\t21
corehelp/a@s3\tguid\t4008992829936022921
corehelp/a@s3\tcreatetxg\t32
corehelp/a/b\tguid\t15066538972175158467
corehelp/a/b\tcreatetxg\t9
corehelp/a/with space\tguid\t10535632112476657855
corehelp/a/with space\tcreatetxg\t11
";

    // zfs-fuse, after receiving s1, s3, snapshotting `extra`, then `zfs send -I
    // corehelp/a@s1 corehelp/a@s3 | zfs receive -F corehelp/c` (zfs-fuse then
    // received s2 after the others):
    // zfs get -Hp -d 1 -o name,property,value guid,createtxg corehelp/c
    pub(crate) const FUSE_OUT_OF_ORDER: &str = "\
corehelp/c\tguid\t337123721809533565
corehelp/c\tcreatetxg\t41
corehelp/c@s1\tguid\t15434711050884566143
corehelp/c@s1\tcreatetxg\t45
corehelp/c@s3\tguid\t4008992829936022921
corehelp/c@s3\tcreatetxg\t55
corehelp/c@extra\tguid\t9535134434245482847
corehelp/c@extra\tcreatetxg\t68
corehelp/c@s2\tguid\t4703203791645338451
corehelp/c@s2\tcreatetxg\t84
";

    // OpenZFS 2.x (written from zfs-get.8; `-t snapshot` lists only
    // snapshots, names may contain spaces):
    // zfs get -Hp -d 1 -t snapshot -o name,property,value guid,createtxg tank/data
    const OPENZFS_SNAPSHOTS: &str = "\
tank/data@zfs-auto-snap_daily-2024-01-02\tguid\t9223372036854775809
tank/data@zfs-auto-snap_daily-2024-01-02\tcreatetxg\t1200
tank/data@before upgrade\tguid\t17
tank/data@before upgrade\tcreatetxg\t900
";

    pub(crate) fn snap(name: &str, guid: u64, createtxg: u64) -> Snapshot {
        Snapshot {
            name: name.into(),
            guid,
            createtxg,
        }
    }

    #[test]
    fn snapshot_list_parses_real_zfs_fuse_output() {
        assert_eq!(
            parse_snapshot_list(&ds("corehelp/a"), FUSE_SNAPSHOTS).unwrap(),
            vec![
                snap("s1", 15434711050884566143, 16),
                snap("s2", 4703203791645338451, 21),
                snap("s3", 4008992829936022921, 32),
            ]
        );
        // Children's lines and the dataset's own are not its snapshots.
        assert_eq!(
            parse_snapshot_list(&ds("corehelp/a/b"), FUSE_SNAPSHOTS).unwrap(),
            vec![]
        );
        assert_eq!(
            parse_snapshot_list(&ds("corehelp"), FUSE_SNAPSHOTS).unwrap(),
            vec![]
        );
    }

    #[test]
    fn snapshot_list_is_sorted_by_createtxg_not_by_output_order() {
        let got = parse_snapshot_list(&ds("corehelp/c"), FUSE_OUT_OF_ORDER).unwrap();
        let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["s1", "s3", "extra", "s2"]);
        let got = parse_snapshot_list(&ds("tank/data"), OPENZFS_SNAPSHOTS).unwrap();
        assert_eq!(
            got,
            vec![
                snap("before upgrade", 17, 900),
                snap("zfs-auto-snap_daily-2024-01-02", 9223372036854775809, 1200),
            ]
        );
    }

    #[test]
    fn malformed_snapshot_lists_are_errors() {
        let a = ds("tank/a");
        let cases = [
            ("tank/a@s\tguid\n", "unexpected line 1"),
            ("tank/a@s\tguid\t1\textra\n", "unexpected line 1"),
            (
                "tank/a@s\tguid\tabc\ntank/a@s\tcreatetxg\t1\n",
                "not a number",
            ),
            (
                "tank/a@s\tguid\t-1\ntank/a@s\tcreatetxg\t1\n",
                "not a number",
            ),
            ("tank/a@s\tguid\t1\n", "lacks its createtxg"),
            ("tank/a@s\tcreatetxg\t1\n", "lacks its guid"),
            (
                "tank/a@s\tguid\t1\ntank/a@s\tguid\t2\ntank/a@s\tcreatetxg\t1\n",
                "listed twice",
            ),
            ("tank/a@s\tused\t1\n", "unexpected property"),
            ("garbage\n", "unexpected line 1"),
        ];
        for (input, want) in cases {
            let got = err(parse_snapshot_list(&a, input));
            assert!(got.contains(want), "{input:?}: {got}");
        }
        assert_eq!(parse_snapshot_list(&a, "").unwrap(), vec![]);
    }

    #[test]
    fn error_recognisers_match_real_messages() {
        // zfs-fuse: zfs list -H -o name corehelp/nope
        assert!(is_missing_dataset_error(
            "cannot open 'corehelp/nope': dataset does not exist\n"
        ));
        // zfs-fuse: zfs list -H -o name nopool/x (missing pool, same wording)
        assert!(is_missing_dataset_error(
            "cannot open 'nopool/x': dataset does not exist\n"
        ));
        // zfs-fuse: zfs list -H -o name 'bad;name'
        assert!(!is_missing_dataset_error(
            "cannot open 'bad;name': invalid dataset name\n"
        ));
        // OpenZFS (libzfs_sendrecv.c, as reported by users of `zfs receive -s`):
        let partial = "cannot receive new filesystem stream: destination tank/b contains \
                       partially-complete state from \"zfs receive -s\".\n";
        assert_eq!(error::kind_of(partial), ZfsErrorKind::PartialState);
        assert!(!is_missing_dataset_error(partial));
        // zfs-fuse: zfs send corehelp/a@s1 | zfs receive corehelp/a
        assert_ne!(
            error::kind_of(
                "cannot receive new filesystem stream: destination 'corehelp/a' exists\nmust specify -F to overwrite it\n"
            ),
            ZfsErrorKind::PartialState
        );
        // zfs-fuse: zfs send corehelp/a@s1 | zfs receive corehelp/g; zfs destroy -r corehelp/g
        assert!(is_busy_error(
            "cannot destroy 'corehelp/g': dataset is busy\n"
        ));
        // zfs-fuse: zpool destroy corehelp (while a dataset was busy)
        assert!(is_busy_error("cannot destroy 'corehelp': pool is busy\n"));
        assert!(!is_busy_error(
            "cannot open 'corehelp/nope': dataset does not exist\n"
        ));
        // zfs-fuse: zfs release resync corehelp/a@s1 (second time)
        assert!(is_no_such_tag_error(
            "cannot release 'resync' from 'corehelp/a@s1': no such tag on this dataset\n"
        ));
    }

    #[test]
    fn resume_tokens_parse() {
        assert_eq!(parse_resume_token("-\n"), None);
        assert_eq!(parse_resume_token(""), None);
        assert_eq!(parse_resume_token("\n"), None);
        // OpenZFS token shape (zfs-receive.8: "1-" version, checksum, length, hex payload).
        assert_eq!(
            parse_resume_token("1-e604ea4bf-e0-789c63a2\n").as_deref(),
            Some("1-e604ea4bf-e0-789c63a2")
        );
    }

    // zfs-fuse 0.7.0: zfs set compression=on rsa/p; zfs set com.example:tag=x rsa/p
    //   $ zfs get -H -s local -o property,value all rsa/p
    const LOCAL_PROPS: &str = "compression\ton\nquota\t100M\nmountpoint\t/mnt/p\n\
                               volsize\t1G\ncom.example:tag\ta b\n";

    #[test]
    fn local_properties_leave_out_what_syncoid_never_preserves() {
        let d = ds("rsa/p");
        assert_eq!(
            local_properties_argv(&d),
            strings(&[
                "zfs",
                "get",
                "-H",
                "-s",
                "local",
                "-o",
                "property,value",
                "all",
                "rsa/p"
            ])
        );
        let got = parse_local_properties(LOCAL_PROPS);
        let want = [
            ("compression", "on"),
            ("quota", "100M"),
            ("mountpoint", "/mnt/p"),
            ("com.example:tag", "a b"),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(p, v)| (p.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            set_property_argv(&d, "com.example:tag", "a b"),
            strings(&["zfs", "set", "com.example:tag=a b", "rsa/p"])
        );
        assert_eq!(
            get_properties_argv(&d, &["type", "recordsize"]),
            strings(&[
                "zfs",
                "get",
                "-H",
                "-o",
                "property,value",
                "type,recordsize",
                "rsa/p"
            ])
        );
    }

    // zfs-fuse 0.7.0: zfs clone rsa/a@s1 rsa/c
    //   $ zfs get -H -o name,value -r origin rsa
    const ORIGINS: &str = "rsa\t-\nrsa/a\t-\nrsa/a@s1\t-\nrsa/c\trsa/a@s1\n";

    #[test]
    fn clones_and_their_origins_parse() {
        assert_eq!(
            origins_argv(&ds("rsa"), true),
            strings(&[
                "zfs",
                "get",
                "-H",
                "-o",
                "name,value",
                "-r",
                "origin",
                "rsa"
            ])
        );
        assert_eq!(
            parse_origins(ORIGINS).unwrap(),
            vec![(ds("rsa/c"), "rsa/a@s1".to_string())]
        );
        assert_eq!(
            send_clone_argv(&ds("rsa/c"), "rsa/a@s1", "s2", &strings(&["-p"])),
            strings(&["zfs", "send", "-p", "-i", "rsa/a@s1", "rsa/c@s2"])
        );
    }

    #[test]
    fn resume_send_keeps_only_flags_that_minus_t_accepts() {
        let opts = parse_send_options("L c e w p D h b", false).unwrap().argv;
        assert_eq!(
            send_resume_argv("tok", &opts),
            strings(&["zfs", "send", "-L", "-c", "-e", "-w", "-t", "tok"])
        );
    }

    // OpenZFS 2.x, from zfs-send.8's -P description and its dry-run output
    // format (not runnable on zfs-fuse):
    //   $ zfs send -nvP -I tank/a@s1 tank/a@s3
    //   incremental	s1	tank/a@s2	1024
    //   incremental	s2	tank/a@s3	20480
    //   size	21504
    #[test]
    fn send_estimates_come_from_the_last_size_line() {
        let out =
            "incremental\ts1\ttank/a@s2\t1024\nincremental\ts2\ttank/a@s3\t20480\nsize\t21504\n";
        assert_eq!(parse_send_estimate(out), Some(21504));
        assert_eq!(parse_send_estimate("full\ttank/a@s1\t5\n"), None);
        assert_eq!(parse_send_estimate("size\tlots\n"), None);
        assert_eq!(parse_send_estimate(""), None);
        let argv: Vec<String> = ["zfs", "send", "-L", "tank/a@s1"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            send_estimate_argv(&argv),
            ["zfs", "send", "-nvP", "-L", "tank/a@s1"]
        );
    }

    // Real OpenZFS 2.3.2 output, from the test guest (scripts/openzfs-guest.sh):
    //   $ zfs send -nvP ozgsrc/src@s1
    //   $ zfs send -nvP -I @s1 ozgsrc/src@s2
    //   $ zfs send -nvP -i '#b2' ozgsrc/src@s3
    //   $ zfs send -nvP -t 1-c47680813-b8-789c...
    #[test]
    fn send_estimates_parse_real_openzfs_output() {
        let full = "full\tozgsrc/src@s1\t50433136\nsize\t50433136\n";
        let incr = "incremental\ts1\tozgsrc/src@s2\t8411760\nsize\t8411760\n";
        let from_bookmark = "incremental\tozgsrc/src#b2\tozgsrc/src@s3\t8304\nsize\t8304\n";
        let resumed = "resume token contents:\nnvlist version: 0\n\tobject = 0x2\n\toffset = 0x12e0000\n\tbytes = 0x130c340\n\ttoguid = 0x9013c0376aa06c8\n\ttoname = ozgsrc/src@s1\nfull\tozgsrc/src@s1\t30460208\nsize\t30460208\n";
        assert_eq!(parse_send_estimate(full), Some(50_433_136));
        assert_eq!(parse_send_estimate(incr), Some(8_411_760));
        assert_eq!(parse_send_estimate(from_bookmark), Some(8_304));
        assert_eq!(parse_send_estimate(resumed), Some(30_460_208));
    }

    // Real OpenZFS 2.3.2: `zfs get -H -o value receive_resume_token ozgdst/dst`
    // after `zfs send ozgsrc/src@s1 | head -c 20000000 | zfs recv -s ozgdst/dst`,
    // and after the resumed receive completed.
    #[test]
    fn resume_tokens_parse_real_openzfs_output() {
        let token = "1-c47680813-b8-789c636064000310a500c4ec50360710e72765a52697303030419460caa7a515a7968064f41861f26c48f2499525a9c540dae1b0012336fd25f9e9a599290c0c27d8569531db30726a20c97382e5f312735381f654a5171725eb03b143b121d42d00d8a615bf";
        assert_eq!(
            parse_resume_token(&format!("{token}\n")).as_deref(),
            Some(token)
        );
        assert_eq!(parse_resume_token("-\n"), None);
    }

    // Real OpenZFS 2.3.2 (test guest), after `zfs snapshot ozs/hprobe@a`,
    // `zfs snapshot ozs/hprobe@b`, `zfs bookmark ozs/hprobe@a ozs/hprobe#a`:
    //   $ zfs get -Hp -d 1 -t snapshot,bookmark -o name,property,value guid,createtxg ozs/hprobe
    const OPENZFS_WITH_BOOKMARK: &str = "ozs/hprobe@a\tguid\t10186063056974338826
ozs/hprobe@a\tcreatetxg\t9
ozs/hprobe@b\tguid\t14018751822546509993
ozs/hprobe@b\tcreatetxg\t10
ozs/hprobe#a\tguid\t10186063056974338826
ozs/hprobe#a\tcreatetxg\t9
";

    #[test]
    fn bookmarks_parse_from_the_same_listing_as_snapshots() {
        let d = ds("ozs/hprobe");
        let snap = |name: &str, guid, createtxg| Snapshot {
            name: name.into(),
            guid,
            createtxg,
        };
        assert_eq!(
            parse_snapshot_list(&d, OPENZFS_WITH_BOOKMARK).unwrap(),
            vec![
                snap("a", 10186063056974338826, 9),
                snap("b", 14018751822546509993, 10)
            ]
        );
        assert_eq!(
            parse_bookmark_list(&d, OPENZFS_WITH_BOOKMARK).unwrap(),
            vec![snap("a", 10186063056974338826, 9)]
        );
        assert_eq!(
            list_snapshots_and_bookmarks_argv(&d).join(" "),
            "zfs get -Hp -d 1 -t snapshot,bookmark -o name,property,value guid,createtxg ozs/hprobe"
        );
        let got = err(parse_bookmark_list(&d, "ozs/hprobe#a\tguid\t1\n"));
        assert!(
            got.contains("bookmark ozs/hprobe#a: listing lacks its createtxg"),
            "{got}"
        );
    }

    #[test]
    fn hold_and_bookmark_commands() {
        let d = ds("tank/a b");
        assert_eq!(
            bookmark_argv(&d, "s1", "s1"),
            strings(&["zfs", "bookmark", "tank/a b@s1", "tank/a b#s1"])
        );
        assert_eq!(
            destroy_bookmark_argv(&d, "s1").unwrap(),
            strings(&["zfs", "destroy", "tank/a b#s1"])
        );
        assert_eq!(
            send_from_bookmark_argv(&d, "s1", "s3", &strings(&["-c"])),
            strings(&["zfs", "send", "-c", "-i", "tank/a b#s1", "tank/a b@s3"])
        );
        let fuse = Capabilities::default();
        assert_eq!(
            userrefs_argv(&d, &fuse).join(" "),
            "zfs get -Hp -d 1 -o name,property,value userrefs tank/a b"
        );
    }

    // zfs-fuse: after `zfs hold t1 rsacf96ab/hprobe@a; zfs hold t2 rsacf96ab/hprobe@a`:
    //   $ zfs get -Hp -d 1 -o name,property,value userrefs rsacf96ab/hprobe
    #[test]
    fn userrefs_parse_real_zfs_fuse_output() {
        let out = "rsacf96ab/hprobe\tuserrefs\t-\nrsacf96ab/hprobe@a\tuserrefs\t2\nrsacf96ab/hprobe@b\tuserrefs\t0\n";
        assert_eq!(
            parse_userrefs(&ds("rsacf96ab/hprobe"), out).unwrap(),
            vec![("a".to_string(), 2), ("b".to_string(), 0)]
        );
        assert!(parse_userrefs(&ds("rsacf96ab/hprobe"), "x\ty\n").is_err());
        assert!(parse_userrefs(&ds("p/h"), "p/h@a\tuserrefs\tmany\n").is_err());
    }

    #[test]
    fn held_snapshot_errors_are_recognised() {
        // OpenZFS 2.3.2: zfs destroy ozs/hprobe@a (held by t1)
        assert!(is_held_error(
            "cannot destroy snapshot ozs/hprobe@a: it's being held. Run 'zfs holds -r ozs/hprobe@a' to see holders.\n"
        ));
        // zfs-fuse: the same
        assert!(is_held_error(
            "cannot destroy 'rsacf96ab/hprobe@a': dataset is busy\n"
        ));
        // zfs-fuse and OpenZFS 2.3.2: zfs hold t1 on a snapshot already held by t1
        assert!(is_tag_exists_error(
            "cannot hold 'rsacf96ab/hprobe@a': tag already exists on this dataset\n"
        ));
        assert!(is_tag_exists_error(
            "cannot hold snapshot 'ozs/hprobe@a': tag already exists on this dataset\n"
        ));
        // OpenZFS 2.3.2: zfs release t3 ozs/hprobe@a
        assert!(is_no_such_tag_error(
            "cannot release hold from snapshot 'ozs/hprobe@a': no such tag on this dataset\n"
        ));
    }

    /// Names no ZFS can make, each reaching a listing as a hostile or broken
    /// `zfs` might print it: `%` and `,` would mean a range or a list to
    /// `zfs destroy`.
    const HOSTILE: &[&str] = &["a%b", "a,b", "a/b", "a@b", "a#b", "a;b", "a\rb", "é", ""];

    #[test]
    fn hostile_snapshot_names_in_a_listing_refuse_the_listing() {
        let a = ds("tank/a");
        for name in HOSTILE {
            let listing = format!("tank/a@{name}\tguid\t1\ntank/a@{name}\tcreatetxg\t2\n");
            let got = err(parse_snapshot_list(&a, &listing));
            assert!(
                got.contains(&format!("invalid snapshot name {name:?}")),
                "{name:?}: {got}"
            );
            assert!(!got.contains('\n'), "{got}");
            let listing = format!("tank/a#{name}\tguid\t1\ntank/a#{name}\tcreatetxg\t2\n");
            let got = err(parse_bookmark_list(&a, &listing));
            assert!(
                got.contains(&format!("invalid bookmark name {name:?}")),
                "{name:?}: {got}"
            );
            let refs = format!("tank/a@{name}\tuserrefs\t1\n");
            let got = err(parse_userrefs(&a, &refs));
            assert!(
                got.contains(&format!("invalid snapshot name {name:?}")),
                "{name:?}: {got}"
            );
        }
        // A newline inside a name splits its line: the halves do not parse.
        let got = err(parse_snapshot_list(
            &a,
            "tank/a@x\ny\tguid\t1\ntank/a@x\ny\tcreatetxg\t2\n",
        ));
        assert!(got.contains("unexpected line 1"), "{got}");
        // Names ZFS allows still parse: spaces, a leading '-', all of `_-:.`.
        let ok = "tank/a@-x\tguid\t1\ntank/a@-x\tcreatetxg\t2\n\
                  tank/a@with space\tguid\t3\ntank/a@with space\tcreatetxg\t4\n\
                  tank/a@a_b-c:d.e\tguid\t5\ntank/a@a_b-c:d.e\tcreatetxg\t6\n";
        let names: Vec<String> = parse_snapshot_list(&a, ok)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["-x", "with space", "a_b-c:d.e"]);
        // Hostile names of other datasets' entries are not ours to judge.
        assert_eq!(
            parse_snapshot_list(&a, "tank/b@a%b\tguid\t1\n").unwrap(),
            vec![]
        );
    }

    #[test]
    fn destroy_argvs_refuse_hostile_names() {
        let a = ds("tank/a");
        for name in HOSTILE {
            let got = err(destroy_snapshot_argv(&a, name));
            assert!(
                got.starts_with(&format!("refusing to destroy tank/a@{name}")),
                "{got}"
            );
            assert!(got.contains("invalid snapshot name"), "{got}");
            let got = err(destroy_bookmark_argv(&a, name));
            assert!(got.contains("invalid bookmark name"), "{got}");
        }
        assert!(destroy_snapshot_argv(&a, "a\nb").is_err());
        // A leading '-' is a name ZFS allows; it never stands alone in the
        // argv, so zfs cannot take it for an option.
        assert_eq!(
            destroy_snapshot_argv(&a, "-x").unwrap(),
            strings(&["zfs", "destroy", "tank/a@-x"])
        );
        assert_eq!(
            destroy_bookmark_argv(&a, "-r").unwrap(),
            strings(&["zfs", "destroy", "tank/a#-r"])
        );
    }

    #[test]
    fn short_names_follow_zfs_rules() {
        validate_bookmark_name("resync_h_2026-11-21T10:00:00Z").unwrap();
        assert!(err(validate_bookmark_name("a,b")).contains("character ','"));
        assert!(err(validate_snapshot_name("a%b")).contains("character '%'"));
        assert!(err(validate_snapshot_name("a b\n")).contains(r"character '\n'"));
        validate_snapshot_name(&"x".repeat(255)).unwrap();
    }

    // The real zfs-fuse listing of FUSE_DATASETS comes from the same command
    // with `-r` after `-t` (zfs orders no output by its flags).
    #[test]
    fn descendants_are_listed_below_the_dataset() {
        assert_eq!(
            list_descendants_argv(&ds("tank/a b")),
            strings(&[
                "zfs",
                "list",
                "-H",
                "-o",
                "name",
                "-r",
                "-t",
                "filesystem,volume",
                "tank/a b"
            ])
        );
        assert_eq!(
            parse_descendants(
                &ds("corehelp/a"),
                "corehelp/a\ncorehelp/a/b\ncorehelp/a/with space\n"
            )
            .unwrap(),
            vec![ds("corehelp/a/b"), ds("corehelp/a/with space")]
        );
        let all = parse_descendants(&ds("corehelp"), FUSE_DATASETS).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(
            parse_descendants(&ds("corehelp/a/b"), "corehelp/a/b\n").unwrap(),
            vec![]
        );
        let got = err(parse_descendants(
            &ds("corehelp/a"),
            "corehelp/a\ncorehelp/ab\n",
        ));
        assert!(
            got.contains("names corehelp/ab, which is not below it"),
            "{got}"
        );
        let got = err(parse_descendants(
            &ds("corehelp/a"),
            "corehelp/a\ncorehelp/a/x%y\n",
        ));
        assert!(got.contains("character '%'"), "{got}");
        assert!(!got.contains('\n'));
    }

    // OpenZFS 2.x, written from zfs-get.8 (`-o property,value` prints those
    // two columns, tab-separated with -H; -p prints exact numbers) and
    // zfsprops.7 (`written@snapshot`; `receive_resume_token` reads `-` when
    // no receive is partial). Not yet captured on the test guest:
    //   $ zfs get -Hp -o property,value written@s1,receive_resume_token ozgdst/dst
    const OPENZFS_TARGET_PROPS: &str = "written@s1\t0\nreceive_resume_token\t-\n";
    //   (after writing 12 KiB to ozgdst/dst and cutting a resumable receive)
    const OPENZFS_TARGET_CHANGED: &str =
        "written@s1\t12288\nreceive_resume_token\t1-e604ea4bf-e0-789c63a2\n";

    #[test]
    fn target_props_are_read_in_one_get() {
        let d = ds("ozgdst/dst");
        let openzfs = Capabilities {
            resume_tokens: true,
            written_at: true,
            ..Capabilities::default()
        };
        assert_eq!(
            target_props_argv(&d, "s1", &openzfs).unwrap().join(" "),
            "zfs get -Hp -o property,value written@s1,receive_resume_token ozgdst/dst"
        );
        let no_tokens = Capabilities {
            written_at: true,
            ..Capabilities::default()
        };
        assert_eq!(
            target_props_argv(&d, "s1", &no_tokens).unwrap().join(" "),
            "zfs get -Hp -o property,value written@s1 ozgdst/dst"
        );
        assert!(err(target_props_argv(&d, "a,b", &openzfs)).contains("invalid snapshot name"));
        assert_eq!(
            parse_target_props("s1", OPENZFS_TARGET_PROPS).unwrap(),
            TargetProps {
                written_since_base: Some(0),
                resume_token: None
            }
        );
        assert_eq!(
            parse_target_props("s1", OPENZFS_TARGET_CHANGED).unwrap(),
            TargetProps {
                written_since_base: Some(12288),
                resume_token: Some("1-e604ea4bf-e0-789c63a2".into())
            }
        );
        assert_eq!(
            parse_target_props("s1", "written@s1\t-\n").unwrap(),
            TargetProps::default()
        );
        for (out, want) in [
            ("", "printed no written@s1"),
            ("written@s2\t0\n", "unexpected property \"written@s2\""),
            ("written@s1\tlots\n", "not a number"),
            ("written@s1 0\n", "unexpected line"),
            ("written@s1\t0\nwritten@s1\t0\n", "listed twice"),
        ] {
            let got = err(parse_target_props("s1", out));
            assert!(got.contains(want), "{out:?}: {got}");
        }
    }
}
