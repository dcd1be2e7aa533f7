//! Fault tolerance: the primary and backup roles.
//!
//! Neither role has a vCPU loop of its own. The primary is the recording
//! timeline with a [`primary::ChannelSink`] instead of a file; the backup is
//! the replaying timeline with a [`backup::StreamSource`] instead of a
//! loaded log. What makes them a pair is in `logchannel::channel`.

pub mod arbiter;
pub mod backup;
pub mod events;
pub mod gate;
pub mod join;
pub mod joiner;
pub mod lag;
pub mod metrics;
pub mod primary;

use std::fmt;

/// Why a link to the peer failed, as the log channel detected it.
pub use logchannel::channel::LinkFailure;

/// The failure a channel error from a link that was up stands for: after
/// any of them the `peer` can no longer be trusted to have our log (or we
/// its), so each is a lost peer.
pub(crate) fn failure_of(
    e: &logchannel::channel::Error,
    peer: logchannel::channel::Role,
) -> LinkFailure {
    match e.link_failure() {
        Some(f) => f.clone(),
        None => LinkFailure::Unexpected {
            from: peer,
            message: logchannel::channel::error_chain(e),
        },
    }
}

/// The other side of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Primary,
    Backup,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Primary => "primary",
            Peer::Backup => "backup",
        })
    }
}

/// Whom the arbiter gave the pair to, when it was not us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rival {
    /// The other claimant, by name.
    Claimant(String),
    /// Nobody of this pairing: a newer epoch exists, so this pair must not
    /// go live again.
    NewerEpoch(u64),
}

impl fmt::Display for Rival {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rival::Claimant(name) => write!(f, "{name:?}"),
            Rival::NewerEpoch(epoch) => write!(f, "a newer pairing (epoch {epoch})"),
        }
    }
}

/// Why an operator's hook command failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot run {command:?}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command:?} exited with {status}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
    },
}

/// Failures of the fault-tolerant roles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The link failed and no arbiter was given to decide who goes on.
    #[error("lost the {peer} and no arbiter was given (--tas)")]
    PeerLost {
        peer: Peer,
        #[source]
        failure: LinkFailure,
    },
    #[error("the arbiter gave {vm_id}/epoch {epoch} to {rival}: halting")]
    LostArbitration {
        vm_id: String,
        epoch: u64,
        rival: Rival,
    },
    #[error("the arbiter failed")]
    Arbiter(#[source] arbiter::BackendError),
    #[error("stopped by a signal while claiming at the arbiter")]
    StoppedClaiming,
    #[error("the go-live command failed")]
    GoLiveHook(#[source] HookError),
    #[error("cannot open the serial port to go live")]
    GoLiveSerial(#[source] crate::serial_backend::Error),
    #[error("cannot open the TAP to go live")]
    GoLiveNet(#[source] crate::tap_backend::Error),
    #[error("the log channel failed")]
    Channel(#[source] logchannel::channel::Error),
    #[error("cannot start the {0} thread")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error("cannot listen for joining backups")]
    JoinListen(#[source] logchannel::channel::Error),
    /// Verified-output mode: the backup could not reproduce an output (or
    /// the state after it), so the outputs held were never released and
    /// this primary halts rather than go on alone.
    #[error("the backup could not reproduce the execution at exit {exit} ({what}): {held} held outputs were not released")]
    BackupDiverged {
        exit: u64,
        what: String,
        held: usize,
    },
}

/// A Hello for unit tests that pair links on loopback.
#[cfg(test)]
pub(crate) fn test_hello(role: logchannel::channel::Role) -> logchannel::channel::Hello {
    logchannel::channel::Hello {
        protocol: logchannel::channel::PROTOCOL_VERSION,
        role,
        vm_id: "t".into(),
        image_hash: [3; 32],
        machine: "m".into(),
        epoch: 1,
        join: false,
    }
}
