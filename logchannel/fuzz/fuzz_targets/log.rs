#![no_main]
//! Fuzzes the log decoder: [`LogReader`] over a stream, and
//! [`decode_header_frame`], [`decode_record_frame`] and [`decode_frame`]
//! over the same bytes as a buffer, which must agree with it.
//!
//! Input: a log stream when it starts with [`MAGIC`]. Otherwise a list of
//! payloads (`len: u16 LE`, then `len` bytes, the last one cut short by the
//! end of the input) that the target frames behind a magic with the right
//! lengths and CRCs, so that mutations get past the CRC to the decoding of
//! headers and records. Either way the input is also handed as is to the
//! buffer decoders, as one frame.
//!
//! Properties, besides not panicking:
//! - a decoded header or record re-encodes to a frame that decodes to the
//!   same value, and that equals the decoded bytes or is shorter (postcard
//!   accepts over-long varints, nothing else non-canonical);
//! - the stream reader and the buffer decoders find the same values, the
//!   same ends and the same errors at the same offsets;
//! - a length prefix above `MAX_FRAME` is refused with nothing allocated,
//!   and no decode allocates more than one frame's worth plus a bound per
//!   input byte.

mod common;

use std::fmt::Debug;
use std::mem::discriminant;

use libfuzzer_sys::fuzz_target;
use logchannel::log::Error;
use logchannel::{
    decode_frame, decode_header_frame, decode_record_frame, encode_frame, Header, LogReader,
    Record, FRAME_PREFIX, MAGIC, MAX_FRAME,
};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

/// Bytes a decode may allocate whatever the input's size: the reader's
/// frame buffer of up to `MAX_FRAME` (sized from the length prefix before
/// the payload is read), serde's 1 MiB cap on what it reserves for a
/// claimed sequence length, and slack.
const FIXED: usize = MAX_FRAME as usize + (1 << 20) + (64 << 10);
/// Bytes a decode may allocate per byte of input on top of [`FIXED`].
const PER_BYTE: usize = 32;

fuzz_target!(|data: &[u8]| {
    let stream = if data.starts_with(&MAGIC) {
        data.to_vec()
    } else {
        framed(data)
    };
    let ((), peak) = common::peak_during(|| check_stream(&stream));
    assert!(
        peak <= FIXED + PER_BYTE * stream.len(),
        "{peak} bytes allocated reading a {}-byte log",
        stream.len()
    );
    check_buffer(data);
});

/// MAGIC, then each payload of `data` in a frame with a good CRC.
fn framed(data: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        rest = tail;
    }
    out
}

/// The offset an error names, if it names one.
fn offset_of(e: &Error) -> Option<u64> {
    match e {
        Error::Truncated { offset, .. }
        | Error::Checksum { offset, .. }
        | Error::TooLarge { offset, .. }
        | Error::Decode { offset, .. }
        | Error::TrailingBytes { offset, .. } => Some(*offset),
        _ => None,
    }
}

/// The same error kind, at `at` in the stream for the reader and at 0 in
/// the buffer that starts there.
fn assert_same_error(from_reader: &Error, from_buffer: &Error, at: usize) {
    assert_eq!(
        discriminant(from_reader),
        discriminant(from_buffer),
        "reader: {from_reader:?}, buffer: {from_buffer:?}"
    );
    if let (Some(r), Some(b)) = (offset_of(from_reader), offset_of(from_buffer)) {
        assert_eq!((r, b), (at as u64, 0), "{from_reader:?} / {from_buffer:?}");
    }
    assert!(!from_reader.to_string().is_empty());
}

/// `value`, decoded from the frame `bytes`, re-encodes to a frame that
/// `decode` turns back into `value`.
fn assert_reencodes<T>(
    value: &T,
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> logchannel::Result<Option<(T, usize)>>,
) where
    T: serde::Serialize + PartialEq + Debug,
{
    let mut again = Vec::new();
    encode_frame(value, &mut again).expect("a decoded value re-encodes");
    assert!(
        again == bytes || again.len() < bytes.len(),
        "{value:?} re-encodes to {again:?}, not {bytes:?}"
    );
    match decode(&again) {
        Ok(Some((v, used))) => assert_eq!((&v, used), (value, again.len())),
        other => panic!("{value:?} re-encoded does not decode: {other:?}"),
    }
}

/// Reads `stream` with [`LogReader`] and with the buffer decoders side by side.
fn check_stream(stream: &[u8]) {
    let (mut reader, header) = match LogReader::open(stream) {
        Ok(x) => x,
        Err(e) => {
            if stream.len() >= MAGIC.len() && stream[..MAGIC.len()] == MAGIC {
                match decode_header_frame(&stream[MAGIC.len()..]) {
                    Ok(None) => assert!(matches!(e, Error::Truncated { .. }), "{e:?}"),
                    Ok(Some(h)) => panic!("the reader refused {h:?}: {e:?}"),
                    Err(b) => assert_same_error(&e, &b, MAGIC.len()),
                }
            }
            return;
        }
    };
    let end = reader.offset() as usize;
    match decode_header_frame(&stream[MAGIC.len()..]) {
        Ok(Some((h, used))) => assert_eq!((&h, MAGIC.len() + used), (&header, end)),
        other => panic!("the reader read {header:?}, the buffer decoder {other:?}"),
    }
    assert_reencodes(&header, &stream[MAGIC.len()..end], decode_header_frame);

    let mut at = end;
    loop {
        let seq = reader.next_seq();
        let buf = &stream[at..];
        match (reader.next_record(), decode_record_frame(buf, seq)) {
            (Ok(None), Ok(None)) => {
                assert_eq!(at, stream.len(), "a clean end only at the end");
                return;
            }
            (Ok(Some(r)), Ok(Some((b, used)))) => {
                assert_eq!(r, b);
                assert_eq!(r.seq, seq);
                match decode_frame::<Record>(buf) {
                    Ok(Some((f, n))) => assert_eq!((&f, n), (&r, used)),
                    other => panic!("decode_frame gave {other:?} for {r:?}"),
                }
                assert_reencodes(&r, &buf[..used], |b| decode_record_frame(b, seq));
                at += used;
                assert_eq!(reader.offset(), at as u64);
            }
            (Err(Error::Truncated { offset, seq: s }), Ok(None)) => {
                assert_eq!((offset, s), (at as u64, Some(seq)));
                assert!(at < stream.len());
                break;
            }
            (Err(r), Err(b)) => {
                assert_same_error(&r, &b, at);
                break;
            }
            (r, b) => panic!("at byte {at}: the reader gave {r:?}, the buffer decoder {b:?}"),
        }
    }
    assert!(matches!(reader.next_record(), Err(Error::Poisoned)));
}

/// `data` as one frame, for each buffer decoder.
fn check_buffer(data: &[u8]) {
    // The length a whole prefix claims (a shorter buffer is simply incomplete).
    let claimed = data
        .get(..FRAME_PREFIX)
        .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
    let ((header, record, any), peak) = common::peak_during(|| {
        (
            decode_header_frame(data),
            decode_record_frame(data, 0),
            decode_frame::<Record>(data),
        )
    });
    if let Some(len) = claimed.filter(|&len| len > MAX_FRAME) {
        assert_eq!(
            peak, 0,
            "a {len}-byte frame was refused only after allocating"
        );
        for e in [
            header.as_ref().err(),
            record.as_ref().err(),
            any.as_ref().err(),
        ] {
            assert!(
                matches!(e, Some(Error::TooLarge { offset: 0, len: l }) if *l == u64::from(len)),
                "{e:?}"
            );
        }
        return;
    }
    assert!(
        peak <= FIXED + PER_BYTE * data.len(),
        "{peak} bytes for {}",
        data.len()
    );
    let whole = claimed.map(|len| FRAME_PREFIX + len as usize);
    if let Ok(Some((h, used))) = &header {
        assert_eq!(Some(*used), whole);
        assert_reencodes::<Header>(h, &data[..*used], decode_header_frame);
    }
    if let Ok(Some((r, used))) = &record {
        assert_eq!(Some(*used), whole);
        assert_reencodes(r, &data[..*used], |b| decode_record_frame(b, 0));
    }
    match (&record, &any) {
        (Ok(Some(r)), Ok(Some(a))) => assert_eq!(r, a),
        (Ok(None), Ok(None)) | (Err(Error::SequenceGap { .. }), Ok(Some(_))) => {}
        (Err(r), Err(a)) => assert_eq!(discriminant(r), discriminant(a)),
        (r, a) => panic!("decode_record_frame gave {r:?}, decode_frame {a:?}"),
    }
}
