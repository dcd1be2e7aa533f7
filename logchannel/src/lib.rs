//! Duet's replication channel between primary and backup.
//!
//! For now this crate holds the log record format ([`log`]): the records
//! that `duet record` writes to a file and `duet replay` reads back, framed
//! so that the same bytes can be streamed. The primary-to-backup transport
//! (streaming those frames over TCP, acknowledgements for the Output Rule,
//! heartbeats) will live here too; see docs/ARCHITECTURE.md.

pub mod log;

pub use log::{
    decode_frame, decode_header_frame, encode_frame, image_hash, Error, Event, Header, LogReader,
    LogWriter, Position, Record, Result, FORMAT_VERSION, FRAME_PREFIX, MAGIC, MAX_FRAME,
};
