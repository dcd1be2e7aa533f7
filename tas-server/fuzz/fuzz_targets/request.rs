#![no_main]
//! Fuzzes the arbiter's request parser, [`Request::parse`], with any bytes
//! a client may send as one line.
//!
//! Properties, besides not panicking:
//! - a parsed request encodes ([`Request::to_line`]) to one line that
//!   parses to the same request and encodes to the same line again;
//! - a parsed request's strings are non-empty, as the protocol promises;
//! - a refused line's error reply is one line of bounded length (client
//!   input is echoed shortened, never whole), and the client's reply
//!   parser reads it back as that error message;
//! - parsing allocates at most a bound per input byte.

// The allocation meter and helpers shared with the log channel's targets.
#[path = "../../../logchannel/fuzz/fuzz_targets/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tas_server::client::parse_reply;
use tas_server::protocol::{error_chain, Request, Response};
use tas_server::{Claim, ClientError};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

/// Longest error reply: the fixed texts, a 64-character echo of the op
/// (up to 4 bytes each, escaped up to 12) and serde_json's positions.
const MAX_ERROR_REPLY: usize = 1024;
/// Bytes parsing may allocate per input byte (a JSON value tree), and
/// whatever the input's size.
const PER_BYTE: usize = 128;
const FIXED: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let (parsed, peak) = common::peak_during(|| Request::parse(data));
    assert!(
        peak <= FIXED + PER_BYTE * data.len(),
        "{peak} bytes for {}",
        data.len()
    );
    match parsed {
        Ok(request) => {
            match &request {
                Request::TestAndSet {
                    vm_id, claimant, ..
                } => assert!(!vm_id.is_empty() && !claimant.is_empty()),
                Request::NewEpoch { vm_id } => assert!(!vm_id.is_empty()),
                Request::Status => {}
            }
            let line = request.to_line();
            assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1));
            let again = Request::parse(&line[..line.len() - 1])
                .unwrap_or_else(|e| panic!("{request:?} encodes to a line it refuses: {e}"));
            assert_eq!(again, request);
            assert_eq!(again.to_line(), line);
        }
        Err(e) => {
            let reply = Response::failure(&e).to_line();
            assert!(reply.len() <= MAX_ERROR_REPLY, "{} bytes: {e}", reply.len());
            assert_eq!(
                reply.iter().position(|&b| b == b'\n'),
                Some(reply.len() - 1)
            );
            match parse_reply::<Claim>(&reply[..reply.len() - 1]) {
                Err(ClientError::Server(message)) => assert_eq!(message, error_chain(&e)),
                other => panic!("the error reply to {e} reads as {other:?}"),
            }
        }
    }
});
