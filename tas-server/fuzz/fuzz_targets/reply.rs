#![no_main]
//! Fuzzes the client's reply parser, [`parse_reply`], with any line an
//! arbiter (or something posing as one) may send, as a claim reply and as
//! a status reply.
//!
//! Properties, besides not panicking:
//! - a reply accepted as a [`Claim`] or a [`Status`] is the same value
//!   after the server encodes it ([`Response::to_line`]) and the client
//!   parses that again;
//! - an error reply's message survives the same round trip;
//! - both readings agree on whether the line is an error reply and on its
//!   message, since `ok` and `error` are checked before the rest;
//! - parsing allocates at most a bound per input byte.

// The allocation meter and helpers shared with the log channel's targets.
#[path = "../../../logchannel/fuzz/fuzz_targets/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tas_server::client::parse_reply;
use tas_server::protocol::Response;
use tas_server::{Claim, ClientError, Status};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

/// Bytes parsing may allocate per input byte (a JSON value tree), and
/// whatever the input's size.
const PER_BYTE: usize = 128;
const FIXED: usize = 64 << 10;

/// The line `response` is sent as, without its newline, checked to be one line.
fn sent(response: &Response) -> Vec<u8> {
    let mut line = response.to_line();
    assert_eq!(line.pop(), Some(b'\n'));
    assert!(!line.contains(&b'\n'), "{response:?}");
    line
}

fn server_message(r: &Result<impl Sized, ClientError>) -> Option<&str> {
    match r {
        Err(ClientError::Server(m)) => Some(m),
        _ => None,
    }
}

fn assert_error_round_trips(message: &str) {
    let line = sent(&Response::Error(message.to_owned()));
    let again = parse_reply::<Claim>(&line);
    assert_eq!(server_message(&again), Some(message), "{again:?}");
}

fuzz_target!(|data: &[u8]| {
    let ((claim, status), peak) =
        common::peak_during(|| (parse_reply::<Claim>(data), parse_reply::<Status>(data)));
    assert!(
        peak <= FIXED + 2 * PER_BYTE * data.len(),
        "{peak} bytes for {}",
        data.len()
    );
    assert_eq!(server_message(&claim), server_message(&status));
    match &claim {
        Ok(c) => {
            let line = sent(&Response::Claim(c.clone()));
            assert_eq!(parse_reply::<Claim>(&line).ok().as_ref(), Some(c));
        }
        Err(ClientError::Server(m)) => assert_error_round_trips(m),
        Err(_) => {}
    }
    if let Ok(s) = &status {
        let line = sent(&Response::Status(s.clone()));
        assert_eq!(parse_reply::<Status>(&line).ok().as_ref(), Some(s));
    }
});
