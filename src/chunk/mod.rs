//! The chunk protocol of `--chunked` mode: how a `zfs send` stream crosses a
//! link that may break, as MD5-verified files moved between two session
//! folders. This module owns the protocol (folder layout, file names, marker
//! formats and their parsers, the session lock, stale-folder cleanup,
//! detached start) and dispatches the hidden helper subcommands; the sender
//! helper is in `sender.rs`, the receiver helper in `receiver.rs`, and what
//! lets a session outlive its orchestrator (manifest, owner lock, discovery,
//! re-attach) in `session.rs`. It depends on nothing else in the crate but
//! the `Host` trait (in `session.rs` and `orchestrator.rs`).
//!
//! # Parties
//! - The **sender helper** (`resync __chunk-send`) runs beside `zfs send` and
//!   cuts its stdout into chunk files in the sender's session folder.
//! - The **receiver helper** (`resync __chunk-recv`) runs beside
//!   `zfs receive`, verifies each chunk and writes it to zfs's stdin.
//! - The **orchestrator** (the resync the user started) moves chunk files
//!   and markers from the sender's folder to the receiver's folder. It may
//!   die or lose its link at any moment and start again from what it finds.
//!   It reaches each folder only through **serve** processes
//!   (`resync __chunk-serve`, `serve.rs`) that it starts on exec channels of
//!   its SSH session (child processes locally): see "Serve protocol".
//!
//! Both helpers are started detached (`spawn_detached`, usually through
//! `resync __chunk-start`), so they outlive the SSH channel that started them.
//!
//! # Session folder
//! `<tmpdir>/resync-<session id>/`; the session id is 16 to 32 lowercase hex
//! digits. It is created mode 0700; an existing one is accepted only if it is
//! a real directory (checked with `symlink_metadata`, never followed), owned
//! by our effective uid, and has no group/other permission bits. Every file
//! in it is opened with `O_NOFOLLOW`. On one machine the sender and the
//! receiver use different folders (different tmpdirs or session ids).
//!
//! # Files
//! | name | written by | deleted by |
//! |---|---|---|
//! | `lock` | each helper creates it and holds `flock(LOCK_EX)` on it while alive; it writes its pid into it | with the folder |
//! | `session` | orchestrator, when it creates the folder: the manifest (what is sent where, by whom; see `session.rs`) | with the folder |
//! | `owner` | receiver's folder only: `__chunk-own`, which holds `flock` on it while the orchestrator lives and is connected (see `session.rs`) | with the folder |
//! | `helper.log` | the helper's stdout/stderr (`spawn_detached`) | with the folder |
//! | `chunk-<index:012>` | data: sender (own folder), orchestrator (receiver's folder) | orchestrator (sender's folder, once the receiver's `progress` is past it); receiver (own folder, once consumed) |
//! | `chunk-<index:012>.md5` | `<32 hex>  chunk-<index:012>\n` (md5sum format), same writers | same deleters |
//! | `end` | sender when `zfs send` exited 0: `chunks N`, `bytes N`, `status exit 0`; the orchestrator copies it verbatim to the receiver's folder | orchestrator, in the sender's folder, as acknowledgement |
//! | `error` | sender when `zfs send` failed or the helper itself did: `status exit N`/`signal N`/`helper`, a blank line, stderr | orchestrator, as acknowledgement |
//! | `abort` | orchestrator, in the receiver's folder: a copy of the sender's `error` (same format) | with the folder |
//! | `progress` | receiver: `next N` (next index it expects), `bytes N` (bytes given to zfs so far) | with the folder |
//! | `resend` | receiver, after a chunk failed MD5: `index N`, `attempt K`; the chunk files were deleted | orchestrator, after it copied that chunk again |
//! | `result` | receiver, when `zfs receive` ended: `outcome ok/failed/aborted/corrupt`, `status ...`, `chunks N`, `bytes N`, a blank line, zfs's stderr (or the reason) | orchestrator, as acknowledgement |
//! | `cancel` | orchestrator, to stop a helper: it kills zfs and removes its folder | with the folder |
//!
//! Every file is first written under its name plus `.part` and then renamed
//! into place, so a reader never sees half a file; a leftover `*.part` is
//! ignored by readers and overwritten (`O_TRUNC`) by the next writer of that
//! name, except `chunk-<index>.part` in the receiver's folder: a serve
//! process resumes it from its size (see "Serve protocol"). Markers are `key value` lines, then optionally one blank line and a
//! free-text body; parsers reject unknown, duplicate or missing keys,
//! non-UTF-8 and anything over `MARKER_MAX` bytes, with an error, never a
//! panic.
//!
//! # Chunks
//! A chunk is complete when its `.md5` exists: every writer renames the data
//! into place first and the `.md5` last. The sender stages at most `window`
//! complete chunks (it waits, before starting chunk N, while its folder holds
//! `window` or more chunk indices). The receiver takes chunks strictly in
//! index order: it reads the `.md5`, hashes the data file through one open
//! descriptor, and only if the digest matches does it seek back and stream
//! that descriptor into zfs's stdin (never more than one chunk buffered, and
//! not a byte of a bad chunk). While chunk N streams, a thread already
//! opens and hashes chunk N+1 if it is complete; that descriptor is the one
//! streamed next, so the check still covers exactly the bytes zfs gets. Then it writes `progress` (`next` = N+1) and
//! deletes the data, then the `.md5`. A digest mismatch (or an unreadable
//! `.md5`, or a `.md5` without data) deletes both files and writes `resend`;
//! after `MAX_ATTEMPTS` failures of one index the receiver gives up
//! (`result` with outcome `corrupt`, zfs receive killed).
//!
//! # Ending
//! The orchestrator copies `end` to the receiver once it has seen it; the
//! receiver, when `next == chunks` and its byte count equals `bytes`, closes
//! zfs's stdin, waits for it and writes `result`. If the sender wrote
//! `error`, the orchestrator copies it as `abort`: the receiver closes zfs's
//! stdin (a truncated stream makes `zfs receive` fail and discard what it
//! received), waits for it (killing it after `ABORT_GRACE`), and writes
//! `result` with outcome `aborted`: the target is left as before the run. A
//! helper whose marker (`end`/`error`, `result`) the orchestrator deleted
//! removes its folder and exits: 0 if zfs succeeded, 1 otherwise. The
//! orchestrator deletes the sender's `end` only after the receiver consumed
//! every chunk.
//!
//! # Timeouts
//! A helper gives up after `--timeout` seconds without progress by the
//! orchestrator while it waits on it: the sender when no staged chunk was
//! consumed (the clock restarts on every chunk written or consumed; a slow
//! `zfs send` does not count), the receiver when no chunk arrived; either
//! when its final marker is not acknowledged. A chunk file or chunk `.part`
//! whose modification time moves counts as progress too (a copy of one big
//! chunk on a slow link). It then kills zfs, removes its
//! folder and exits 3. `cancel` (or the folder vanishing) does the same at
//! once, exit 4.
//!
//! # Serve protocol
//! `resync __chunk-serve --dir D --timeout SECS` serves one session folder
//! over its stdin (requests) and stdout (replies) until stdin ends; it exits
//! 3 when neither moves for SECS (a client behind a dead link), 2 on a
//! malformed frame. It never creates the folder. The orchestrator runs one
//! per side for control and up to `window` per side for data (at most 6, or
//! 2 when both sides share one SSH connection: sshd's MaxSessions of 10
//! must also fit the control, owner and helper-check channels), each for the
//! life of an SSH connection (a reconnect starts new ones); an idle data
//! server is reused for the next chunk, one idle for half its timeout is
//! dropped. Every frame is `kind` (1 byte), `length` (u32 big-endian), then
//! `length` payload bytes; integers are u64 big-endian; a name is a length
//! byte and UTF-8. DATA frames carry at most `DATA_MAX` (256 KiB), others
//! at most `FRAME_MAX` (2 MiB + 64 KiB); an unknown kind, an oversized or
//! short frame, or leftover payload bytes end the conversation with an
//! error on either side (a listing of more than 100000 entries too).
//! - The server first sends `H "resync-chunk-serve 1"`.
//! - `L ops` (poll): ops are `r name` (remove: a marker in the listed set,
//!   `cancel`, a chunk file or a chunk `.part`) and `p name u32-len text`
//!   (write `end`, `abort`, `cancel` or `resend` atomically); anything else
//!   is refused. Then the reply lists the folder: `G` alone when it does not
//!   exist; else `D index size` per complete data file, `P index size` per
//!   data `.part`, `S index text` per `.md5` (its first 256 bytes), `M name
//!   text` per marker among `end error abort progress resend result` (empty
//!   when unreadable: its parser says why), then `E`. A failed op or an
//!   unusable folder replies `X`.
//! - `R index offset` (read): `B bytes` frames of chunk `index` from
//!   `offset`, then `Z count`; `X` instead when it cannot be opened or read
//!   or `offset` is past its end.
//! - `W index total md5-text` (write): replies `O offset`, the size its
//!   `chunk-<index>.part` already has (created empty if absent, emptied if
//!   larger than `total`), or `total` when the data file is complete (then
//!   only the `.md5` is written if it is missing). The client then sends `B`
//!   frames from that offset and `Z`; each `B` is written at its own byte
//!   offset (`pwrite`), so a stale server of a dead connection that still
//!   writes the same bytes at the same offsets does no harm. On `Z`, if the
//!   file has exactly `total` bytes and the `.part` name is still the file
//!   it wrote, it is renamed into place and the `.md5` written last (the
//!   order of "Chunks"); reply `K total`. A write error (`X` with the "no
//!   space" class when the disk is full), too many or too few bytes reply
//!   `X` after `Z` (the data in between is read and dropped). Between `B`
//!   frames the client may send `Y`; the server replies `A offset` once
//!   everything before it is written (or `X` if a write failed). The
//!   orchestrator sends one every `SYNC_EVERY` (1 MiB) and keeps at most
//!   two unanswered, so a cut loses at most about 2 MiB per channel. No fsync: a
//!   lost page shows up as an MD5 mismatch and the chunk is sent again.
//! - `X class text`: class 1 is "no space left" (ENOSPC/EDQUOT), 0 other.
//!   After `X` the conversation goes on.
//!
//! The orchestrator copies a chunk by sending `W` to the receiver's server,
//! then `R index offset` to the sender's with the offset it got, and
//! forwarding each `B` frame as it arrives. Bytes re-sent after a cut are
//! only those the receiver's `.part` had not yet stored.
//!
//! # Command lines (hidden subcommands, exit 0 ok, 1 zfs failed, 2 usage)
//! - `resync __chunk-send --dir D --chunk-size BYTES --window N --timeout SECS -- zfs send ...`
//! - `resync __chunk-recv --dir D --timeout SECS -- zfs receive ...`
//! - `resync __chunk-start --dir D -- __chunk-send|__chunk-recv ...`: creates
//!   D, starts the helper detached with its log in `D/helper.log`, prints its pid.
//! - `resync __chunk-clean [--tmpdir DIR] [--min-age SECS]`: removes stale
//!   session folders (default: the system tmpdir, 60 s), printing each.
//! - `resync __chunk-serve --dir D --timeout SECS`: see "Serve protocol".
//! - `resync __chunk-own`, `__chunk-sessions`, `__chunk-manifest`: the
//!   owner lock, listing/cancelling/clearing sessions, writing a manifest
//!   (see `session.rs`).
//!
//! # Stale folders
//! Every helper, once it holds its own lock, removes the session folders in
//! its tmpdir that are stale: ours (uid, mode), unchanged for
//! `STALE_MIN_AGE` (a folder being created is not locked yet), and neither
//! locked by a helper nor owned by an orchestrator. An active one never is.
//!
//! # Why every step is idempotent
//! - Helper dies between any two steps: its zfs process dies with its pipe
//!   (`zfs send` gets EPIPE; `zfs receive` gets a truncated stream and
//!   discards it, or keeps a resume token with `-s`), so the step restarts
//!   from scratch (or from the token); its lock is free, and the next run's
//!   discovery (or `remove_stale_sessions`) deletes the folder; staged
//!   chunks of a dead session are never taken for progress.
//! - Orchestrator dies (kill -9, reboot): the helpers wait up to
//!   `--timeout`; its owner lock goes at once (EOF) or after `OWNER_GRACE`
//!   (cut link). The same command run again finds the receiver's folder by
//!   its manifest, takes the owner lock and re-attaches: the loop reads both
//!   folders from scratch anyway, so no delivered chunk is sent again.
//! - Orchestrator (or its link) dies while copying a chunk: only
//!   `chunk-<index>.part` is left, which the next copy continues from its
//!   size; between the data rename and the `.md5` rename: the next copy
//!   finds the data complete and writes only the `.md5`. A marker's `.part`
//!   is overwritten by its next writer. A copy of
//!   a chunk the receiver had consumed meanwhile has an index below `next`:
//!   the receiver deletes such files whenever it polls.
//! - Orchestrator dies before deleting a consumed chunk at the sender: on its
//!   return it reads the receiver's `progress` and deletes every sender chunk
//!   below `next` (in any order: a lone data file or `.md5` below `next` is
//!   garbage).
//! - Receiver dies between streaming a chunk and writing `progress`, or
//!   between `progress` and deleting the chunk: see the first point; the
//!   receiver's own stale files are removed on its next poll if it lives.
//! - Orchestrator dies before deleting `resend`: the chunk is absent at the
//!   receiver and below-or-at `next`, so it is copied again anyway; a
//!   `resend` whose chunk is present is just deleted.
//! - Orchestrator dies before acknowledging `end`/`error`/`result`: it reads
//!   them again when it returns; copying `end`/`abort` again replaces them
//!   with the same content.

pub mod orchestrator;
pub mod receiver;
pub mod sender;
pub mod serve;
pub mod session;

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};

pub const LOCK: &str = "lock";
pub const LOG: &str = "helper.log";
pub const END: &str = "end";
pub const ERROR: &str = "error";
pub const ABORT: &str = "abort";
pub const PROGRESS: &str = "progress";
pub const RESEND: &str = "resend";
pub const RESULT: &str = "result";
pub const CANCEL: &str = "cancel";
/// Suffix of a file being written; renamed away when complete.
pub const PART: &str = ".part";
/// Prefix of session folders in the tmpdir.
pub const SESSION_PREFIX: &str = "resync-";
/// Largest marker we read (markers carry zfs's stderr, capped at STDERR_MAX).
pub const MARKER_MAX: u64 = 1 << 20;
/// zfs stderr kept in `error`/`result` markers.
pub const STDERR_MAX: usize = 64 * 1024;
/// MD5 failures of one chunk index before the receiver gives up.
pub const MAX_ATTEMPTS: u32 = 5;
/// How long the receiver waits for `zfs receive` to exit after an abort.
pub const ABORT_GRACE: Duration = Duration::from_secs(30);
/// Session folders younger than this are never removed as stale (one being
/// created is not locked yet).
pub const STALE_MIN_AGE: Duration = Duration::from_secs(60);
/// How often helpers look at their folder.
pub const POLL: Duration = Duration::from_millis(10);

/// Exit codes of the helpers.
pub const EXIT_OK: i32 = 0;
pub const EXIT_ZFS_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_TIMEOUT: i32 = 3;
pub const EXIT_CANCELLED: i32 = 4;

// ---------------------------------------------------------------------------
// Names

/// Checks a session id: 16 to 32 lowercase hex digits.
pub fn validate_session_id(id: &str) -> Result<()> {
    let ok = (16..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        bail!("invalid chunk session id {id:?}: expected 16 to 32 lowercase hex digits");
    }
    Ok(())
}

#[cfg(test)]
/// `<tmpdir>/resync-<id>`.
pub fn session_dir(tmpdir: &Path, id: &str) -> Result<PathBuf> {
    validate_session_id(id)?;
    Ok(tmpdir.join(format!("{SESSION_PREFIX}{id}")))
}

/// The session id of a folder named `resync-<id>`, if its name is one.
pub fn session_id_of(dir: &Path) -> Result<&str> {
    let name = dir
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| anyhow!("chunk session folder {} has no name", dir.display()))?;
    let id = name.strip_prefix(SESSION_PREFIX).ok_or_else(|| {
        anyhow!(
            "chunk session folder {} is not named {SESSION_PREFIX}<id>",
            dir.display()
        )
    })?;
    validate_session_id(id)?;
    Ok(id)
}

pub fn chunk_name(index: u64) -> String {
    format!("chunk-{index:012}")
}

pub fn md5_name(index: u64) -> String {
    format!("chunk-{index:012}.md5")
}

/// A complete (not `.part`) chunk file name in a session folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFile {
    Data(u64),
    Md5(u64),
}

impl ChunkFile {
    pub fn index(self) -> u64 {
        match self {
            ChunkFile::Data(i) | ChunkFile::Md5(i) => i,
        }
    }
}

/// Parses `chunk-NNNNNNNNNNNN` or `chunk-NNNNNNNNNNNN.md5`; anything else
/// (including `.part` files) is None.
pub fn parse_chunk_file_name(name: &str) -> Option<ChunkFile> {
    let rest = name.strip_prefix("chunk-")?;
    let (digits, md5) = match rest.strip_suffix(".md5") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index = digits.parse().ok()?;
    Some(if md5 {
        ChunkFile::Md5(index)
    } else {
        ChunkFile::Data(index)
    })
}

/// The complete chunk files in `dir`.
pub fn list_chunk_files(dir: &Path) -> Result<Vec<ChunkFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Some(f) = entry.file_name().to_str().and_then(parse_chunk_file_name) {
            out.push(f);
        }
    }
    out.sort_by_key(|f| (f.index(), matches!(f, ChunkFile::Md5(_))));
    Ok(out)
}

/// Watches the modification times of the chunk files and chunk `.part`
/// files in a folder: chunk servers write `.part` files (in the receiver's
/// folder) and touch the chunks they read (in the sender's) every few MiB,
/// so a helper counts a long copy of one big chunk as progress.
#[derive(Debug, Default)]
pub struct CopyActivity {
    newest: Option<SystemTime>,
}

impl CopyActivity {
    /// True if some chunk file changed since the last call.
    pub fn moved(&mut self, dir: &Path) -> bool {
        let Ok(entries) = fs::read_dir(dir) else {
            return false;
        };
        let newest = entries
            .flatten()
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| {
                    parse_chunk_file_name(n.strip_suffix(PART).unwrap_or(n)).is_some()
                })
            })
            .filter_map(|e| e.metadata().and_then(|m| m.modified()).ok())
            .max();
        if newest > self.newest {
            self.newest = newest;
            return true;
        }
        false
    }
}

/// Indices that have any complete chunk file in `dir` (what the sender
/// counts against its window).
pub fn staged_indices(dir: &Path) -> Result<BTreeSet<u64>> {
    Ok(list_chunk_files(dir)?
        .into_iter()
        .map(ChunkFile::index)
        .collect())
}

// ---------------------------------------------------------------------------
// Markers

/// How a process ended, as markers record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    /// The helper failed on its own (zfs did not start, a write failed).
    Helper,
}

impl Status {
    pub fn from_exit(s: ExitStatus) -> Status {
        match (s.code(), s.signal()) {
            (Some(c), _) => Status::Exited(c),
            (None, Some(sig)) => Status::Signaled(sig),
            (None, None) => Status::Helper,
        }
    }

    pub fn success(self) -> bool {
        self == Status::Exited(0)
    }

    pub fn render(self) -> String {
        match self {
            Status::Exited(c) => format!("exit {c}"),
            Status::Signaled(s) => format!("signal {s}"),
            Status::Helper => "helper".to_string(),
        }
    }

    pub fn parse(s: &str) -> Result<Status> {
        let mut it = s.split(' ');
        let status = match (it.next(), it.next(), it.next()) {
            (Some("exit"), Some(n), None) => Status::Exited(parse_i32(n)?),
            (Some("signal"), Some(n), None) => Status::Signaled(parse_i32(n)?),
            (Some("helper"), None, None) => Status::Helper,
            _ => bail!("invalid status {s:?}"),
        };
        Ok(status)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Exited(c) => write!(f, "exit status {c}"),
            Status::Signaled(s) => write!(f, "killed by signal {s}"),
            Status::Helper => write!(f, "helper failure"),
        }
    }
}

fn parse_u64(s: &str) -> Result<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        bail!("invalid number {s:?}");
    }
    s.parse().map_err(|_| anyhow!("number out of range {s:?}"))
}

fn parse_i32(s: &str) -> Result<i32> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!("invalid number {s:?}");
    }
    s.parse().map_err(|_| anyhow!("number out of range {s:?}"))
}

/// Splits a marker into its `key value` fields (exactly the `keys`, each
/// once) and its body (text after the first blank line; None if there is
/// none). `body` says whether a body is allowed.
fn parse_fields<'a>(
    text: &'a str,
    keys: &[&str],
    body: bool,
) -> Result<(Vec<&'a str>, Option<&'a str>)> {
    let (head, rest) = match text.split_once("\n\n") {
        Some((h, r)) => (h, Some(r)),
        None => (text.strip_suffix('\n').unwrap_or(text), None),
    };
    if rest.is_some() && !body {
        bail!("unexpected text after the fields");
    }
    let mut values: Vec<Option<&str>> = vec![None; keys.len()];
    for line in head.split('\n') {
        let (k, v) = line
            .split_once(' ')
            .ok_or_else(|| anyhow!("malformed line {line:?}"))?;
        let i = keys
            .iter()
            .position(|key| *key == k)
            .ok_or_else(|| anyhow!("unknown field {k:?}"))?;
        if values[i].replace(v).is_some() {
            bail!("field {k:?} given twice");
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for (k, v) in keys.iter().zip(values) {
        out.push(v.ok_or_else(|| anyhow!("field {k:?} missing"))?);
    }
    Ok((out, rest))
}

/// The `.md5` file of chunk `index`: its digest. The name in the file must
/// be that chunk's.
pub fn parse_md5(text: &str, index: u64) -> Result<[u8; 16]> {
    let line = text
        .strip_suffix('\n')
        .ok_or_else(|| anyhow!("md5 file of chunk {index} does not end in a newline"))?;
    let (hex, name) = line
        .split_once("  ")
        .ok_or_else(|| anyhow!("md5 file of chunk {index} is not `DIGEST  NAME`"))?;
    if name != chunk_name(index) {
        bail!("md5 file of chunk {index} names {name:?}");
    }
    parse_hex_digest(hex).with_context(|| format!("md5 file of chunk {index}"))
}

pub fn render_md5(index: u64, digest: &[u8; 16]) -> String {
    format!("{}  {}\n", hex(digest), chunk_name(index))
}

fn parse_hex_digest(s: &str) -> Result<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("invalid MD5 digest {s:?}");
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| anyhow!("invalid MD5 digest {s:?}"))?;
    }
    Ok(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `end`: the sender's stream is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub chunks: u64,
    pub bytes: u64,
    pub status: Status,
}

impl End {
    pub fn parse(text: &str) -> Result<End> {
        let (f, _) = parse_fields(text, &["chunks", "bytes", "status"], false)
            .context("invalid end marker")?;
        let end = End {
            chunks: parse_u64(f[0]).context("invalid end marker")?,
            bytes: parse_u64(f[1]).context("invalid end marker")?,
            status: Status::parse(f[2]).context("invalid end marker")?,
        };
        if !end.status.success() {
            bail!("invalid end marker: status {} is not success", f[2]);
        }
        if (end.chunks == 0) != (end.bytes == 0) {
            bail!(
                "invalid end marker: {} chunks of {} bytes",
                end.chunks,
                end.bytes
            );
        }
        Ok(end)
    }

    pub fn render(&self) -> String {
        format!(
            "chunks {}\nbytes {}\nstatus {}\n",
            self.chunks,
            self.bytes,
            self.status.render()
        )
    }
}

/// `error` (sender) and `abort` (its copy in the receiver's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: Status,
    pub stderr: String,
}

impl Failure {
    pub fn parse(text: &str) -> Result<Failure> {
        let (f, body) = parse_fields(text, &["status"], true).context("invalid error marker")?;
        let status = Status::parse(f[0]).context("invalid error marker")?;
        if status.success() {
            bail!("invalid error marker: status is success");
        }
        Ok(Failure {
            status,
            stderr: body.unwrap_or("").to_string(),
        })
    }

    pub fn render(&self) -> String {
        format!("status {}\n\n{}", self.status.render(), self.stderr)
    }
}

/// `progress`: the receiver expects chunk `next` and has given `bytes` to zfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub next: u64,
    pub bytes: u64,
}

impl Progress {
    pub fn parse(text: &str) -> Result<Progress> {
        let (f, _) =
            parse_fields(text, &["next", "bytes"], false).context("invalid progress marker")?;
        Ok(Progress {
            next: parse_u64(f[0]).context("invalid progress marker")?,
            bytes: parse_u64(f[1]).context("invalid progress marker")?,
        })
    }

    pub fn render(&self) -> String {
        format!("next {}\nbytes {}\n", self.next, self.bytes)
    }
}

/// `resend`: chunk `index` failed verification `attempt` times; copy it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    pub index: u64,
    pub attempt: u32,
}

impl Resend {
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Resend> {
        let (f, _) =
            parse_fields(text, &["index", "attempt"], false).context("invalid resend marker")?;
        let attempt = parse_u64(f[1]).context("invalid resend marker")?;
        Ok(Resend {
            index: parse_u64(f[0]).context("invalid resend marker")?,
            attempt: u32::try_from(attempt)
                .map_err(|_| anyhow!("invalid resend marker: attempt {attempt} too large"))?,
        })
    }

    pub fn render(&self) -> String {
        format!("index {}\nattempt {}\n", self.index, self.attempt)
    }
}

/// How the receiver's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every chunk verified and given to zfs receive, which exited 0.
    Ok,
    /// zfs receive failed (or could not start).
    Failed,
    /// The orchestrator relayed the sender's failure; zfs receive was ended.
    Aborted,
    /// A chunk kept failing MD5, or the stream disagreed with `end`.
    Corrupt,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::Corrupt => "corrupt",
        }
    }

    fn parse(s: &str) -> Result<Outcome> {
        Ok(match s {
            "ok" => Outcome::Ok,
            "failed" => Outcome::Failed,
            "aborted" => Outcome::Aborted,
            "corrupt" => Outcome::Corrupt,
            _ => bail!("invalid outcome {s:?}"),
        })
    }
}

/// `result`: what the receiver's zfs receive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvResult {
    pub outcome: Outcome,
    pub status: Status,
    pub chunks: u64,
    pub bytes: u64,
    /// zfs receive's stderr, or the reason for `corrupt`.
    pub stderr: String,
}

impl RecvResult {
    pub fn parse(text: &str) -> Result<RecvResult> {
        let (f, body) = parse_fields(text, &["outcome", "status", "chunks", "bytes"], true)
            .context("invalid result marker")?;
        let r = RecvResult {
            outcome: Outcome::parse(f[0]).context("invalid result marker")?,
            status: Status::parse(f[1]).context("invalid result marker")?,
            chunks: parse_u64(f[2]).context("invalid result marker")?,
            bytes: parse_u64(f[3]).context("invalid result marker")?,
            stderr: body.unwrap_or("").to_string(),
        };
        if (r.outcome == Outcome::Ok) != r.status.success() {
            bail!(
                "invalid result marker: outcome {} with status {}",
                f[0],
                f[1]
            );
        }
        Ok(r)
    }

    pub fn render(&self) -> String {
        format!(
            "outcome {}\nstatus {}\nchunks {}\nbytes {}\n\n{}",
            self.outcome.as_str(),
            self.status.render(),
            self.chunks,
            self.bytes,
            self.stderr
        )
    }
}

/// Keeps at most STDERR_MAX bytes of a process's stderr, as text.
pub fn cap_stderr(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(STDERR_MAX)];
    String::from_utf8_lossy(cut).into_owned()
}

// ---------------------------------------------------------------------------
// Files in a session folder

/// Opens `dir/name` for reading without following a symlink.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates (or truncates) `path` for writing, mode 0600, not through a symlink.
pub fn create_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads marker `name` in `dir`: None if absent; an error if unreadable,
/// larger than MARKER_MAX or not UTF-8.
pub fn read_marker(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    let f = match open_nofollow(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut buf = Vec::new();
    f.take(MARKER_MAX + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > MARKER_MAX {
        bail!("{} is larger than {MARKER_MAX} bytes", path.display());
    }
    let text = String::from_utf8(buf).map_err(|_| anyhow!("{} is not UTF-8", path.display()))?;
    Ok(Some(text))
}

/// Writes `dir/name` atomically: `name.part`, then rename.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let part = dir.join(format!("{name}{PART}"));
    let path = dir.join(name);
    let mut f = create_nofollow(&part).with_context(|| format!("creating {}", part.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", part.display()))?;
    drop(f);
    fs::rename(&part, &path).with_context(|| format!("renaming into {}", path.display()))
}

/// Removes `dir/name`; absent is fine.
pub fn remove_if_present(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

pub fn exists_nofollow(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Creates the session folder `dir` (mode 0700) or accepts an existing one
/// that is a real directory, ours, with no group/other bits.
pub fn prepare_session_dir(dir: &Path) -> Result<()> {
    session_id_of(dir)?;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    check_session_dir(dir)
}

/// Checks that `dir` is a real directory (not a symlink), owned by our
/// effective uid, without group/other permissions.
pub fn check_session_dir(dir: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    if !meta.file_type().is_dir() {
        bail!("{} is not a directory (symlink?)", dir.display());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        bail!(
            "{} belongs to uid {}, not to us ({uid})",
            dir.display(),
            meta.uid()
        );
    }
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} has mode {:o}; expected 0700",
            dir.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Lock

/// The `lock` file of a session folder, flocked exclusively while held.
#[derive(Debug)]
pub struct SessionLock {
    _file: File,
}

fn open_lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Tries to lock `file`; Ok(false) if another open file description holds it.
fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid, open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Takes the session's lock; an error if another process holds it.
pub fn lock_session(dir: &Path) -> Result<SessionLock> {
    let mut file = open_lock(dir)?;
    if !try_flock(&file).with_context(|| format!("locking {}/{LOCK}", dir.display()))? {
        bail!("{} is in use by another helper", dir.display());
    }
    // Our pid, for people and `__chunk-sessions` (the lock is what counts).
    let _ = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(SessionLock { _file: file })
}

/// Whether a live process holds the session's lock.
pub fn is_session_locked(dir: &Path) -> Result<bool> {
    let path = dir.join(LOCK);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    Ok(!try_flock(&file).with_context(|| format!("locking {}", path.display()))?)
}

/// Removes `resync-<id>` folders in `tmpdir` that are ours and whose lock no
/// live helper holds, if they were last modified at least `min_age` ago (a
/// helper being started has created its folder but not yet taken the lock).
/// The lock is held while the folder is removed. Returns what was removed.
pub fn remove_stale_sessions(tmpdir: &Path, min_age: Duration) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = fs::read_dir(tmpdir).with_context(|| format!("listing {}", tmpdir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", tmpdir.display()))?;
        let path = entry.path();
        if session_id_of(&path).is_err() || check_session_dir(&path).is_err() {
            continue;
        }
        let age = fs::symlink_metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO);
        if age < min_age {
            continue;
        }
        let lock = match open_lock(&path) {
            Ok(f) => f,
            Err(_) => continue,
        };
        if !try_flock(&lock).unwrap_or(false) || session::is_owned(&path) {
            continue;
        }
        fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------
// Detached start

/// Starts `program args` in a new session (setsid), stdin /dev/null,
/// stdout/stderr appended to `log_path` (created 0600, not through a
/// symlink), so that it outlives the SSH channel or process that started it.
/// Returns its pid. A thread reaps it if this process lives longer.
pub fn spawn_detached(program: &Path, args: &[OsString], log_path: &Path) -> Result<u32> {
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // SAFETY: setsid is async-signal-safe; nothing else runs in the child
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

// ---------------------------------------------------------------------------
// Helper command lines

/// Hidden subcommands that `main` hands to `helper_main`.
pub const SUBCOMMANDS: &[&str] = &[
    "__chunk-send",
    "__chunk-recv",
    "__chunk-start",
    "__chunk-clean",
    "__chunk-serve",
    "__chunk-own",
    "__chunk-sessions",
    "__chunk-manifest",
];

/// Options of the helper subcommands, then the program's argv after `--`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperArgs {
    pub dir: Option<PathBuf>,
    pub chunk_size: Option<u64>,
    pub window: Option<u64>,
    pub timeout: Option<Duration>,
    pub tmpdir: Option<PathBuf>,
    pub min_age: Option<Duration>,
    pub argv: Vec<OsString>,
}

/// Largest chunk size we accept (each chunk is hashed and copied whole).
pub const CHUNK_SIZE_MAX: u64 = 1 << 30;

/// Parses `--key value` options up to `--` (everything after it is argv).
pub fn parse_helper_args(args: &[OsString]) -> Result<HelperArgs> {
    let mut out = HelperArgs {
        dir: None,
        chunk_size: None,
        window: None,
        timeout: None,
        tmpdir: None,
        min_age: None,
        argv: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let key = arg
            .to_str()
            .ok_or_else(|| anyhow!("invalid option {arg:?}"))?;
        if key == "--" {
            out.argv = it.cloned().collect();
            break;
        }
        let value = it
            .next()
            .ok_or_else(|| anyhow!("option {key} needs a value"))?;
        let text = || {
            value
                .to_str()
                .ok_or_else(|| anyhow!("invalid value for {key}: {value:?}"))
        };
        let number =
            || -> Result<u64> { parse_u64(text()?).with_context(|| format!("option {key}")) };
        let dup = |set: bool| -> Result<()> {
            if set {
                bail!("option {key} given twice");
            }
            Ok(())
        };
        match key {
            "--dir" => {
                dup(out.dir.is_some())?;
                out.dir = Some(PathBuf::from(value));
            }
            "--tmpdir" => {
                dup(out.tmpdir.is_some())?;
                out.tmpdir = Some(PathBuf::from(value));
            }
            "--chunk-size" => {
                dup(out.chunk_size.is_some())?;
                let n = number()?;
                if !(1..=CHUNK_SIZE_MAX).contains(&n) {
                    bail!("--chunk-size {n}: must be 1 to {CHUNK_SIZE_MAX} bytes");
                }
                out.chunk_size = Some(n);
            }
            "--window" => {
                dup(out.window.is_some())?;
                let n = number()?;
                if !(1..=1_000_000).contains(&n) {
                    bail!("--window {n}: must be 1 to 1000000 chunks");
                }
                out.window = Some(n);
            }
            "--timeout" => {
                dup(out.timeout.is_some())?;
                let n = number()?;
                if !(1..=30 * 24 * 3600).contains(&n) {
                    bail!("--timeout {n}: must be 1 to 2592000 seconds");
                }
                out.timeout = Some(Duration::from_secs(n));
            }
            "--min-age" => {
                dup(out.min_age.is_some())?;
                out.min_age = Some(Duration::from_secs(number()?));
            }
            _ => bail!("unknown option {key}"),
        }
    }
    Ok(out)
}

/// Entry point of the hidden helper subcommands: `args` is the whole argv
/// after the program name, starting with the subcommand. Returns the exit
/// code.
pub fn helper_main(args: &[OsString]) -> i32 {
    let Some(sub) = args.first().and_then(|a| a.to_str()) else {
        eprintln!("resync: error: missing helper subcommand");
        return EXIT_USAGE;
    };
    if matches!(sub, "__chunk-own" | "__chunk-sessions" | "__chunk-manifest") {
        return session::main(sub, &args[1..]).unwrap_or_else(|e| {
            eprintln!("resync {sub}: error: {e:#}");
            EXIT_USAGE
        });
    }
    let parsed = match parse_helper_args(&args[1..]) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("resync {sub}: error: {e:#}");
            return EXIT_USAGE;
        }
    };
    let result = match sub {
        "__chunk-send" => sender::Config::from_args(parsed).map(sender::run),
        "__chunk-recv" => receiver::Config::from_args(parsed).map(receiver::run),
        "__chunk-start" => start(parsed),
        "__chunk-clean" => clean(parsed),
        "__chunk-serve" => serve::Config::from_args(parsed).map(serve::run),
        _ => Err(anyhow!("unknown helper subcommand {sub}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("resync {sub}: error: {e:#}");
            EXIT_USAGE
        }
    }
}

/// `__chunk-start --dir D -- SUBCOMMAND ARGS...`: creates D, starts
/// `resync SUBCOMMAND ARGS...` detached with its log in D, prints its pid.
fn start(a: HelperArgs) -> Result<i32> {
    let dir = a.dir.ok_or_else(|| anyhow!("--dir is required"))?;
    let sub = a.argv.first().and_then(|s| s.to_str()).unwrap_or("");
    if sub != "__chunk-send" && sub != "__chunk-recv" {
        bail!("__chunk-start starts __chunk-send or __chunk-recv, not {sub:?}");
    }
    prepare_session_dir(&dir)?;
    let exe = std::env::current_exe().context("finding our own binary")?;
    let pid = spawn_detached(&exe, &a.argv, &dir.join(LOG))?;
    println!("{pid}");
    Ok(EXIT_OK)
}

/// `__chunk-clean --tmpdir DIR [--min-age SECS]`: removes stale session
/// folders, printing each.
fn clean(a: HelperArgs) -> Result<i32> {
    let tmpdir = a.tmpdir.unwrap_or_else(std::env::temp_dir);
    let min_age = a.min_age.unwrap_or(STALE_MIN_AGE);
    for p in remove_stale_sessions(&tmpdir, min_age)? {
        println!("{}", p.display());
    }
    Ok(EXIT_OK)
}

/// Log line of a helper (its stderr goes to `helper.log`).
/// Why a helper stopped waiting.
pub(crate) enum Stop {
    Timeout,
    Cancelled,
}

/// A helper's first step: create (or check) its session folder and take its
/// lock. On failure it logs why and returns the usage exit code.
pub(crate) fn enter_session(who: &str, dir: &Path) -> std::result::Result<SessionLock, i32> {
    let lock = prepare_session_dir(dir)
        .and_then(|()| lock_session(dir))
        .map_err(|e| {
            log(who, dir, &format!("error: {e:#}"));
            EXIT_USAGE
        })?;
    // Folders of helpers that died before cleaning up: ours is locked now,
    // and a folder being created is younger than STALE_MIN_AGE.
    if let Some(tmpdir) = dir.parent() {
        match remove_stale_sessions(tmpdir, STALE_MIN_AGE) {
            Ok(removed) => {
                for p in removed {
                    log(
                        who,
                        dir,
                        &format!("removed stale session folder {}", p.display()),
                    );
                }
            }
            Err(e) => log(who, dir, &format!("cleaning stale session folders: {e:#}")),
        }
    }
    Ok(lock)
}

pub(crate) fn log(who: &str, dir: &Path, msg: &str) {
    let id = dir
        .file_name()
        .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
        .unwrap_or_default();
    eprintln!("resync {who} [{id}]: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn session_ids_are_16_to_32_lowercase_hex() {
        assert!(validate_session_id("0123456789abcdef").is_ok());
        assert!(validate_session_id(&"a".repeat(32)).is_ok());
        for bad in [
            "",
            "0123456789abcde",
            &"a".repeat(33),
            "0123456789ABCDEF",
            "../../etc/passwd0",
            "0123456789abcdeg",
            "0123456789abcde/",
        ] {
            assert!(validate_session_id(bad).is_err(), "{bad:?}");
        }
        let d = session_dir(Path::new("/tmp"), "0123456789abcdef").unwrap();
        assert_eq!(d, Path::new("/tmp/resync-0123456789abcdef"));
        assert_eq!(session_id_of(&d).unwrap(), "0123456789abcdef");
        assert!(session_id_of(Path::new("/tmp/other-0123456789abcdef")).is_err());
        assert!(session_id_of(Path::new("/")).is_err());
    }

    #[test]
    fn chunk_names_round_trip_and_parts_are_ignored() {
        assert_eq!(chunk_name(7), "chunk-000000000007");
        assert_eq!(md5_name(7), "chunk-000000000007.md5");
        assert_eq!(
            parse_chunk_file_name("chunk-000000000007"),
            Some(ChunkFile::Data(7))
        );
        assert_eq!(
            parse_chunk_file_name("chunk-999999999999.md5"),
            Some(ChunkFile::Md5(999_999_999_999))
        );
        for bad in [
            "chunk-000000000007.part",
            "chunk-000000000007.md5.part",
            "chunk-7",
            "chunk-0000000000007",
            "chunk-00000000000a",
            "chunk--00000000001",
            "end",
            "chunk-+00000000001",
            "xchunk-000000000001",
        ] {
            assert_eq!(parse_chunk_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn md5_file_parses_and_rejects_hostile_content() {
        let d = [0xabu8; 16];
        let text = render_md5(3, &d);
        assert_eq!(text, format!("{}  chunk-000000000003\n", "ab".repeat(16)));
        assert_eq!(parse_md5(&text, 3).unwrap(), d);
        assert!(parse_md5(&text, 4).is_err(), "name of another chunk");
        for bad in [
            "",
            "\n",
            "abababababababababababababababab  chunk-000000000003",
            "abababababababababababababababab chunk-000000000003\n",
            "ababababababababababababababab  chunk-000000000003\n",
            "zzababababababababababababababab  chunk-000000000003\n",
            "ababababababababababababababababab  chunk-000000000003\n",
            "+bababababababababababababababab  chunk-000000000003\n",
            "abababababababababababababababé  chunk-000000000003\n",
            "abababababababababababababababab  chunk-000000000003\nextra\n",
        ] {
            assert!(parse_md5(bad, 3).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Exited(0),
            Status::Exited(1),
            Status::Exited(-1),
            Status::Signaled(9),
            Status::Helper,
        ] {
            assert_eq!(Status::parse(&s.render()).unwrap(), s);
        }
        for bad in [
            "",
            "exit",
            "exit x",
            "exit 1 2",
            "signal",
            "helper 1",
            "exit 99999999999",
            "exit +1",
            "EXIT 1",
            "exit  1",
        ] {
            assert!(Status::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn end_marker_parses_and_rejects_corrupt_ones() {
        let e = End {
            chunks: 3,
            bytes: 10_000,
            status: Status::Exited(0),
        };
        assert_eq!(End::parse(&e.render()).unwrap(), e);
        let empty = End {
            chunks: 0,
            bytes: 0,
            status: Status::Exited(0),
        };
        assert_eq!(End::parse(&empty.render()).unwrap(), empty);
        // Field order does not matter; the trailing newline is optional.
        assert_eq!(
            End::parse("status exit 0\nbytes 10000\nchunks 3").unwrap(),
            e
        );
        for bad in [
            "",
            "chunks 3\nbytes 10000\n",
            "chunks 3\nbytes 10000\nstatus exit 1\n",
            "chunks 3\nchunks 3\nbytes 10000\nstatus exit 0\n",
            "chunks 3\nbytes 10000\nstatus exit 0\nextra 1\n",
            "chunks -3\nbytes 10000\nstatus exit 0\n",
            "chunks 3\nbytes 99999999999999999999999\nstatus exit 0\n",
            "chunks 3\nbytes 10000\nstatus exit 0\n\nbody\n",
            "chunks 0\nbytes 5\nstatus exit 0\n",
            "chunks 3\r\nbytes 10000\r\nstatus exit 0\r\n",
            "chunks3\nbytes 10000\nstatus exit 0\n",
            "\u{0}\u{0}\u{0}",
        ] {
            assert!(End::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_marker_carries_stderr_verbatim() {
        let f = Failure {
            status: Status::Exited(1),
            stderr: "cannot open 'p/x@s': dataset does not exist\n\nmore\n".into(),
        };
        assert_eq!(Failure::parse(&f.render()).unwrap(), f);
        let no_body = Failure::parse("status signal 9\n").unwrap();
        assert_eq!(
            no_body,
            Failure {
                status: Status::Signaled(9),
                stderr: String::new()
            }
        );
        assert_eq!(
            Failure::parse("status helper\n\n").unwrap().status,
            Status::Helper
        );
        for bad in [
            "",
            "status exit 0\n\n",
            "status\n\nx",
            "stat exit 1\n\nx",
            "status exit 1\nstatus exit 2\n\n",
        ] {
            assert!(Failure::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn progress_and_resend_markers_round_trip_and_reject_junk() {
        let p = Progress {
            next: 12,
            bytes: 123_456,
        };
        assert_eq!(Progress::parse(&p.render()).unwrap(), p);
        let r = Resend {
            index: 4,
            attempt: 2,
        };
        assert_eq!(Resend::parse(&r.render()).unwrap(), r);
        for bad in [
            "",
            "next 1\n",
            "next 1\nbytes x\n",
            "next 1\nbytes 2\nnext 3\n",
            "next 1 \nbytes 2\n",
            "next 1\nbytes 2\n\n",
        ] {
            assert!(Progress::parse(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "index 1\n",
            "index 1\nattempt 4294967296\n",
            "index 1\nattempt 2\nfoo bar\n",
        ] {
            assert!(Resend::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn result_marker_round_trips_and_checks_consistency() {
        let r = RecvResult {
            outcome: Outcome::Failed,
            status: Status::Exited(1),
            chunks: 2,
            bytes: 77,
            stderr: "cannot receive: destination exists\n".into(),
        };
        assert_eq!(RecvResult::parse(&r.render()).unwrap(), r);
        let ok = RecvResult {
            outcome: Outcome::Ok,
            status: Status::Exited(0),
            chunks: 5,
            bytes: 9,
            stderr: String::new(),
        };
        assert_eq!(RecvResult::parse(&ok.render()).unwrap(), ok);
        for bad in [
            "outcome ok\nstatus exit 1\nchunks 0\nbytes 0\n",
            "outcome failed\nstatus exit 0\nchunks 0\nbytes 0\n",
            "outcome maybe\nstatus exit 1\nchunks 0\nbytes 0\n",
            "outcome failed\nstatus exit 1\nchunks 0\n",
            "",
        ] {
            assert!(RecvResult::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parsers() {
        // A small deterministic fuzz over marker-like and random inputs.
        let seeds = [
            "chunks 1\nbytes 2\nstatus exit 0\n",
            "status exit 1\n\nerr",
            "next 1\nbytes 2\n",
            "outcome ok\nstatus exit 0\nchunks 1\nbytes 1\n\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bytes = seeds[round % seeds.len()].as_bytes().to_vec();
            let pos = (x as usize) % (bytes.len() + 1);
            match x % 4 {
                0 => bytes.insert(pos, (x >> 8) as u8),
                1 if pos < bytes.len() => {
                    bytes.remove(pos);
                }
                2 if pos < bytes.len() => bytes[pos] = (x >> 16) as u8,
                _ => bytes.truncate(pos),
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = End::parse(&text);
            let _ = Failure::parse(&text);
            let _ = Progress::parse(&text);
            let _ = Resend::parse(&text);
            let _ = RecvResult::parse(&text);
            let _ = parse_md5(&text, 1);
            let _ = parse_chunk_file_name(&text);
            let _ = Status::parse(&text);
        }
    }

    #[test]
    fn helper_args_parse_and_validate() {
        let a = parse_helper_args(&os(&[
            "--dir",
            "/tmp/resync-0123456789abcdef",
            "--chunk-size",
            "8388608",
            "--window",
            "4",
            "--timeout",
            "60",
            "--",
            "zfs",
            "send",
            "p/x@s",
        ]))
        .unwrap();
        assert_eq!(
            a.dir.as_deref(),
            Some(Path::new("/tmp/resync-0123456789abcdef"))
        );
        assert_eq!(a.chunk_size, Some(8 << 20));
        assert_eq!(a.window, Some(4));
        assert_eq!(a.timeout, Some(Duration::from_secs(60)));
        assert_eq!(a.argv, os(&["zfs", "send", "p/x@s"]));
        // Options after `--` belong to the program.
        let b = parse_helper_args(&os(&["--", "zfs", "--dir", "x"])).unwrap();
        assert_eq!(b.argv, os(&["zfs", "--dir", "x"]));
        for bad in [
            &["--dir"][..],
            &["--chunk-size", "0"],
            &["--chunk-size", "1073741825"],
            &["--window", "0"],
            &["--timeout", "0"],
            &["--timeout", "-1"],
            &["--dir", "a", "--dir", "b"],
            &["--bogus", "1"],
            &["zfs"],
        ] {
            assert!(parse_helper_args(&os(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_dir_is_created_private_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("resync-0123456789abcdef");
        prepare_session_dir(&dir).unwrap();
        let mode = fs::symlink_metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare_session_dir(&dir).unwrap();
        // A symlink in place of the folder is refused, even to a good folder.
        let link = tmp.path().join("resync-fedcba9876543210");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(prepare_session_dir(&link).is_err());
        // So is a folder others can read.
        let open = tmp.path().join("resync-00000000000000001");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(prepare_session_dir(&open).is_err());
        assert!(prepare_session_dir(&tmp.path().join("notasession")).is_err());
        // Markers are not read through symlinks either.
        std::os::unix::fs::symlink("/etc/passwd", dir.join(END)).unwrap();
        assert!(read_marker(&dir, END).is_err());
        assert!(read_marker(&dir, PROGRESS).unwrap().is_none());
        write_atomic(&dir, PROGRESS, b"next 1\nbytes 2\n").unwrap();
        assert_eq!(
            read_marker(&dir, PROGRESS).unwrap().as_deref(),
            Some("next 1\nbytes 2\n")
        );
        assert!(!dir.join("progress.part").exists());
    }

    #[test]
    fn copy_activity_sees_chunk_files_and_parts_move_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let mut a = CopyActivity::default();
        assert!(!a.moved(d), "an empty folder");
        fs::write(d.join("chunk-000000000001.part"), b"x").unwrap();
        assert!(a.moved(d));
        assert!(!a.moved(d), "nothing changed since");
        let later = SystemTime::now() + Duration::from_secs(5);
        let f = File::options()
            .append(true)
            .open(d.join("chunk-000000000001.part"))
            .unwrap();
        f.set_modified(later).unwrap();
        assert!(a.moved(d), "a .part written to");
        fs::write(d.join(PROGRESS), b"next 1\nbytes 1\n").unwrap();
        let m = File::options().append(true).open(d.join(PROGRESS)).unwrap();
        m.set_modified(later + Duration::from_secs(5)).unwrap();
        assert!(!a.moved(d), "markers do not count");
    }

    #[test]
    fn stale_cleanup_removes_unlocked_folders_only() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("resync-1111111111111111");
        let dead = tmp.path().join("resync-2222222222222222");
        let young = tmp.path().join("resync-3333333333333333");
        let other = tmp.path().join("resync-not-a-session");
        for d in [&live, &dead, &young] {
            prepare_session_dir(d).unwrap();
        }
        fs::create_dir(&other).unwrap();
        let _held = lock_session(&live).unwrap();
        assert!(lock_session(&live).is_err(), "a held lock is exclusive");
        assert!(is_session_locked(&live).unwrap());
        drop(lock_session(&dead).unwrap());
        assert!(!is_session_locked(&dead).unwrap());
        let removed = remove_stale_sessions(tmp.path(), Duration::ZERO).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(live.exists() && other.exists());
        assert!(!dead.exists() && !young.exists());
        // A folder younger than min_age is left alone even when unlocked.
        prepare_session_dir(&young).unwrap();
        assert!(remove_stale_sessions(tmp.path(), Duration::from_secs(3600))
            .unwrap()
            .is_empty());
        assert!(young.exists());
    }
}
