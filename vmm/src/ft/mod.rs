//! Fault tolerance: the primary and backup roles.
//!
//! Neither role has a vCPU loop of its own. The primary is the recording
//! timeline with a [`primary::ChannelSink`] instead of a file; the backup is
//! the replaying timeline with a [`backup::StreamSource`] instead of a
//! loaded log. What makes them a pair is in `logchannel::channel`.

pub mod arbiter;
pub mod backup;
pub mod metrics;
pub mod primary;
