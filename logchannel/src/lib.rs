//! Duet's replication channel between primary and backup.
//!
//! - [`log`]: the log record format. `duet record` writes it to a file and
//!   `duet replay` reads it back; the primary streams exactly these frames.
//! - [`channel`]: the transport that streams them over TCP (handshake,
//!   batching, acknowledgements for the Output Rule, heartbeats, flow
//!   control).
//! - [`tls`]: mutual TLS credentials and the name conventions that the
//!   channel and the arbiter share, and the issuing of certificates.
//! - [`sched`]: real-time scheduling of the channel threads, which carry
//!   liveness and acknowledgements.
//! - `writer`: the link's writing half, shared between the channel thread
//!   and the primary's vCPU thread, which writes its batches itself.

pub mod channel;
pub mod join;
pub mod log;
pub mod sched;
pub mod tls;
mod writer;

pub use log::{
    decode_frame, decode_header_frame, decode_record_frame, encode_frame, frame_len, image_hash,
    Error, Event, Header, LogReader, LogWriter, OutputKind, Position, Record, Result,
    FORMAT_VERSION, FRAME_PREFIX, MAGIC, MAX_FRAME,
};
