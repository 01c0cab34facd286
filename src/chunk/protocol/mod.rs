//! The chunk protocol of `--chunked` mode: how a `zfs send` stream crosses a
//! link that may break, as MD5-verified files moved between two session
//! folders. This module owns what both ends must agree on and nothing that
//! runs: the folder layout and file names (`folder.rs`), the marker formats
//! and their parsers (`markers.rs`), the serve protocol's frames
//! (`frames.rs`), the session manifest, owner and listing formats
//! (`session.rs`) and the helper command lines ([`command::HelperCommand`]).
//! What runs on a host is in `chunk::helper`, what runs in the orchestrator
//! in `chunk::driver`; both depend on this module, it depends on neither
//! (nor on anything else in the crate but `sys.rs` and the pure
//! `compress` names).
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
//!   (`resync __chunk-serve`, `helper/server.rs`, its client in
//!   `driver/client.rs`) that it starts on exec channels of
//!   its SSH session (child processes locally): see "Serve protocol".
//!
//! Both helpers are started detached (`helper::spawn_detached`, usually through
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
//! | `session` | orchestrator, when it creates the folder: the manifest (what is sent where, by whom; see `protocol/session.rs`) | with the folder |
//! | `owner` | receiver's folder only: `__chunk-own`, which holds `flock` on it while the orchestrator lives and is connected (see `protocol/session.rs`) | with the folder |
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
//! # Compression
//! With `--compress` (not `none`) the sender helper gets `--compress SPEC`
//! and the receiver `--framed`. The sender still cuts the zfs stream every
//! `chunk-size` bytes, but writes each chunk as frames (`compress::frame`:
//! one per block of up to 2 MiB, never crossing a chunk boundary; no magic,
//! no end frame), so a chunk file is usually smaller than `chunk-size`.
//! Everything about a chunk *file* counts bytes of the file, i.e. what
//! travels: its `.md5`, the listing sizes, the `R`/`W` offsets and `O`/`A`
//! replies of the serve protocol, and so what a resumed copy re-sends.
//! Everything about the *stream* counts decoded bytes: `end`'s and
//! `progress`'s `bytes`, and `result`'s. The receiver checks the MD5 of the
//! file first, then decodes it into zfs's stdin; a chunk whose frames do
//! not decode fails the receive (outcome `failed`). The orchestrator never
//! looks inside a chunk, so it moves framed and plain chunks alike.
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
//! malformed frame. It never creates the folder; it opens it once, on the first
//! request that finds it, and from then on works only through that
//! descriptor (`openat`, `renameat`, `unlinkat`), so a folder swapped for a
//! symlink later is not followed. The orchestrator runs one
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
//! - `resync __chunk-send --dir D --chunk-size BYTES --window N --timeout SECS [--compress SPEC] -- zfs send ...`
//! - `resync __chunk-recv --dir D --timeout SECS [--framed] -- zfs receive ...`
//! - `resync __chunk-start --dir D -- __chunk-send|__chunk-recv ...`: creates
//!   D, starts the helper detached with its log in `D/helper.log`, prints its pid.
//! - `resync __chunk-clean [--tmpdir DIR] [--min-age SECS]`: removes stale
//!   session folders (default: the system tmpdir, 60 s), printing each.
//! - `resync __chunk-serve --dir D --timeout SECS`: see "Serve protocol".
//! - `resync __chunk-own`, `__chunk-sessions`, `__chunk-manifest`: the
//!   owner lock, listing/cancelling/clearing sessions, writing a manifest
//!   (see `protocol/session.rs`).
//!
//! The helpers run as the SSH user. On a host where that user is not root,
//! the `zfs send ...`/`zfs receive ...` after `--` arrives as `sudo -n zfs
//! ...` (`zfs::elevate`): the helper starts that argv as it is, so only
//! `zfs` is elevated, and the folders and the deployed binary stay the
//! user's. The manifest's argv fingerprint covers the prefix too.
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

pub mod command;
pub mod folder;
pub mod frames;
pub mod markers;
pub mod session;

use std::time::Duration;

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

/// Largest chunk size we accept (each chunk is hashed and copied whole).
pub const CHUNK_SIZE_MAX: u64 = 1 << 30;
