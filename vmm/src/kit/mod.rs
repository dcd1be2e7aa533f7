//! The test kit: what the end-to-end tests, the benchmarks and `duet demo`
//! need to drive real `duet` processes, kept once here instead of once per
//! caller.
//!
//! - [`process`]: a child process that is killed and reaped when its
//!   [`process::Proc`] drops, with bounded waits;
//! - [`resp`]: a RESP2 client whose every call is bounded and returns a
//!   `Result` (a timeout, a closed connection and a protocol error are told
//!   apart), so that a caller can reconnect instead of panicking;
//! - [`metrics`]: an HTTP scrape of `--metrics` and a parser of the
//!   Prometheus text exposition into `(name, labels) -> value`;
//! - [`ports`]: loopback ports handed out without the bind-drop-reuse race;
//! - [`certs`]: a CA and the certificates it signs, as PEM files, for the
//!   arbiter's mutual TLS;
//! - [`seed`]: a small seeded PRNG whose seed is printed and can be set with
//!   `DUET_SEED`, so that a failing randomized run can be repeated.
//!
//! Nothing here panics on a failure of the process under test; the tests
//! turn errors into panics where they want them.

pub mod certs;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod resp;
pub mod seed;
