#![no_main]
//! Fuzzes the channel's wire decoder through
//! [`logchannel::channel::decode_message`], which runs the backup's socket
//! reader over a buffer: messages are decoded one after another, as from a
//! stream, with each batch's records numbered on from the last.
//!
//! Input: a mode byte, then the wire bytes. With bit 0 of the mode set, the
//! target first writes the right CRCs into each control message and each
//! record frame of a batch that the bytes' own lengths delimit, so that
//! mutations get past the CRCs to the decoding of messages and records.
//!
//! Properties, besides not panicking:
//! - a decoded message re-encodes ([`WireMessage::encode`]) to bytes that
//!   decode to the same message and that equal the decoded bytes or are
//!   shorter (postcard accepts over-long varints);
//! - a message decodes the same from a buffer that ends right after it, and
//!   a buffer that ends one byte earlier is a closed peer;
//! - a batch's records carry consecutive sequence numbers;
//! - a length prefix no message may have is refused with nothing allocated,
//!   and no decode allocates more than the largest message allowed plus a
//!   bound per input byte.

mod common;

use libfuzzer_sys::fuzz_target;
use logchannel::channel::{decode_message, LinkFailure, WireMessage, MAX_SEND};
use logchannel::{FRAME_PREFIX, MAX_FRAME};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

/// The batch body tag (a control message's first byte is never this).
const RECORDS_TAG: u8 = 3;
/// Above any length a reader accepts: control messages are at most
/// `MAX_FRAME`, batches a little more than `MAX_SEND`.
const NEVER: usize = 2 * MAX_SEND;
/// Bytes a decode may allocate whatever the input's size: the buffer for
/// the largest message accepted (sized from its prefix before the body is
/// read), serde's 1 MiB cap on what it reserves for a claimed sequence
/// length, and slack.
const FIXED: usize = NEVER + (1 << 20) + (64 << 10);
/// Bytes a decode may allocate per byte of input on top of [`FIXED`]: the
/// body, and a `Record` (64 bytes, doubled by `Vec` growth) per 14-byte
/// minimal record frame.
const PER_BYTE: usize = 32;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, wire)) = data.split_first() else {
        return;
    };
    let mut wire = wire.to_vec();
    if mode & 1 == 1 {
        fix_crcs(&mut wire);
    }
    check_stream(&wire);
});

fn u32_at(buf: &[u8], at: usize) -> Option<usize> {
    let b = buf.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Writes good CRCs into every control message and batched record frame
/// that fits in `wire`, walking the messages by their lengths.
fn fix_crcs(wire: &mut [u8]) {
    let mut at = 0;
    while let Some(len) = u32_at(wire, at) {
        let end = at + FRAME_PREFIX + len;
        if len == 0 || end > wire.len() {
            return;
        }
        let body = at + FRAME_PREFIX;
        if wire[body] == RECORDS_TAG {
            let mut frame = body + 1;
            while let Some(flen) = u32_at(&wire[..end], frame) {
                let fend = frame + FRAME_PREFIX + flen;
                if fend > end || frame + FRAME_PREFIX > end {
                    break;
                }
                let crc = crc32fast::hash(&wire[frame + FRAME_PREFIX..fend]);
                wire[frame + 4..frame + 8].copy_from_slice(&crc.to_le_bytes());
                frame = fend;
            }
        } else {
            let crc = crc32fast::hash(&wire[body..end]);
            wire[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        }
        at = end;
    }
}

/// Decodes the messages of `wire` in order until the end or an error.
fn check_stream(wire: &[u8]) {
    let mut at = 0;
    let mut next_seq = 0;
    while at < wire.len() {
        let buf = &wire[at..];
        let (result, peak) = common::peak_during(|| decode_message(buf, next_seq));
        let claimed = u32_at(buf, 0);
        let tag = buf.get(FRAME_PREFIX).copied();
        let never = match (claimed, tag) {
            (Some(len), Some(RECORDS_TAG)) => len > NEVER,
            (Some(len), Some(_)) => len > MAX_FRAME as usize,
            _ => false,
        };
        if never {
            assert_eq!(
                peak, 0,
                "a {claimed:?}-byte message was refused only after allocating"
            );
            assert!(
                matches!(&result, Err(LinkFailure::Corrupt { offset: 0, .. })),
                "{result:?}"
            );
            return;
        }
        assert!(
            peak <= FIXED + PER_BYTE * buf.len(),
            "{peak} bytes for {}",
            buf.len()
        );
        let (message, used) = match result {
            Ok(x) => x,
            Err(f) => {
                assert!(!f.to_string().is_empty());
                return;
            }
        };
        assert_eq!(Some(used), claimed.map(|len| FRAME_PREFIX + len));
        let again = message.encode().expect("a decoded message re-encodes");
        assert!(
            again == buf[..used] || again.len() < used,
            "{message:?} re-encodes to {again:?}, not {:?}",
            &buf[..used]
        );
        match decode_message(&again, next_seq) {
            Ok((m, n)) => assert_eq!((&m, n), (&message, again.len())),
            Err(f) => panic!("{message:?} re-encoded does not decode: {f:?}"),
        }
        match decode_message(&buf[..used], next_seq) {
            Ok((m, n)) => assert_eq!((&m, n), (&message, used)),
            Err(f) => panic!("{message:?} alone does not decode: {f:?}"),
        }
        assert!(
            matches!(
                decode_message(&buf[..used - 1], next_seq),
                Err(LinkFailure::PeerClosed { .. })
            ),
            "a message cut short"
        );
        if let WireMessage::Batch { records, .. } = &message {
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.seq, next_seq + i as u64);
            }
            next_seq += records.len() as u64;
        }
        at += used;
    }
}
