//! Moving one `zfs send` stream into one `zfs receive`: a [`Mover`] takes a
//! [`Request`] (both argv, built by the caller from `zfs`; a label; the
//! session identity a `--chunked` manifest records) and returns the bytes
//! moved once both commands succeeded. [`pipe::Pipe`] streams through this
//! process (bandwidth limit, stall watchdog); [`chunked::Chunked`] is the
//! entry into the chunk orchestrator (helpers on both hosts, deployed with
//! retries); [`codec::Compression`] puts our binary where default mode
//! compresses; [`direct`] is `--insecure-direct-connection` (plain TCP
//! between this machine and the remote end, our binary listening or
//! connecting there). Neither knows what a plan or a dataset pair is.

pub mod chunked;
pub mod codec;
pub mod direct;
pub mod pipe;

use anyhow::Result;

use crate::chunk::session;
use crate::progress::Transfer;

/// One stream to move.
#[derive(Debug, Clone)]
pub struct Request {
    /// `zfs send ...` on the source host.
    pub send: Vec<String>,
    /// `zfs receive ...` on the target host.
    pub recv: Vec<String>,
    /// What the progress display calls the stream.
    pub label: String,
    /// Which step of which pair this is: written into a `--chunked`
    /// session's manifest so that a later run can tell whether the session
    /// still fits.
    pub session: session::Identity,
}

/// Moves a stream from `zfs send` to `zfs receive`.
pub trait Mover {
    /// Moves `req`'s stream, counting bytes on `bar` (and finishing it);
    /// returns the bytes moved. Both commands must exit 0.
    fn transfer(&self, req: &Request, bar: Box<dyn Transfer>) -> Result<u64>;
}
