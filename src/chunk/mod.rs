//! `--chunked` mode: a `zfs send` stream crosses a link that may break as
//! MD5-verified chunk files moved between two session folders, so a dead
//! link only pauses the run. Read it top down:
//! - [`protocol`]: what both ends agree on (folder layout, markers, frames,
//!   manifests, the helper command lines); the protocol spec is its doc.
//! - [`helper`]: what runs on a host as hidden subcommands of our binary
//!   (sender, receiver, chunk server, session subcommands).
//! - [`driver`]: what runs in the orchestrator (the transfer loop, the chunk
//!   server client, sessions and the re-attach decision).
//!
//! `helper` and `driver` depend on `protocol` and never on each other. The
//! entry points the rest of the crate calls are re-exported here.

pub mod driver;
pub mod helper;
pub mod protocol;
#[cfg(test)]
mod serve_tests;

pub use helper::helper_main;
pub use protocol::command::SUBCOMMANDS;
pub use protocol::CHUNK_SIZE_MAX;

/// The orchestrator's entry (`replicate` runs a chunked transfer here).
pub mod orchestrator {
    pub use super::driver::orchestrator::{run_session, Options, Session, Side, Start, Stats};
}

/// Chunk sessions an earlier run left on a host, as `replicate` sees them
/// (discovery, probing, cancelling, the re-attach decision).
pub mod session {
    pub use super::driver::manifest::session_fits;
    pub use super::driver::sessions::{list, probe, Probe};
    pub use super::protocol::session::{
        ago, argv_md5, this_host, Found, Held, Identity, Manifest, Role, Stream,
    };
}
