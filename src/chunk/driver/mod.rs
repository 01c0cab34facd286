//! What runs in the orchestrator (the resync the user started): the
//! transfer loop that moves chunks between the two session folders
//! (`orchestrator.rs`), its client of the chunk servers (`client.rs`), the
//! session subcommands it runs on a host (`sessions.rs`), its hold on a
//! session's owner lock (`ownership.rs`) and the re-attach decision
//! (`manifest.rs`). It depends on `chunk::protocol`, the `Host` trait and
//! `sys.rs`, never on `chunk::helper`: it reaches a host only through
//! helper command lines ([`HelperCommand`](crate::chunk::protocol::command::HelperCommand)).

pub mod client;
pub mod manifest;
pub mod orchestrator;
pub mod ownership;
pub mod sessions;
