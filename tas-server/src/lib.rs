//! Duet's test-and-set arbiter.
//!
//! When primary and backup lose each other, both ask the arbiter for
//! test-and-set on (VM id, pairing epoch); the one granted goes live and the
//! other halts. The arbiter exists so that a partition can never produce two
//! primaries, which means it grants each `(vm_id, epoch)` to exactly one
//! claimant, ever, across its own crashes and restarts.
//!
//! - [`protocol`]: the versioned JSON-lines wire protocol and its rules.
//! - [`ledger`]: the decisions in memory, with no I/O.
//! - [`store`]: the state file that makes each decision durable before it is
//!   acknowledged.
//! - [`arbiter`]: ledger and store together, one request at a time.
//! - [`server`]: the tokio TCP front end (`tas-server` binary).
//! - [`client`]: the blocking client the VMM uses.
//! - [`tls`]: mutual TLS credentials and the names in a certificate;
//!   [`auth`]: which VMs a certified peer may claim and see.

pub mod arbiter;
pub mod auth;
pub mod client;
pub mod ledger;
pub mod protocol;
pub mod server;
pub mod store;
pub mod tls;

#[cfg(test)]
mod testutil;

pub use arbiter::Arbiter;
pub use client::{Client, ClientError, ReplyError};
pub use protocol::{Claim, ClaimOutcome, Status, VmStatus, MAX_LINE, PROTOCOL_VERSION};
