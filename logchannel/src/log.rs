//! The log record format: what `duet record` writes to a file and what the
//! primary later streams to the backup.
//!
//! A log is a byte stream that can be read one frame at a time from any
//! [`std::io::Read`], so the same code reads a file and a TCP connection.
//!
//! ```text
//!  stream:
//!  +----------------+--------------+--------------+--------------+-----
//!  | magic (8)      | header frame | record frame | record frame | ...
//!  | "DUETLOG\0"    | (seq: none)  | seq 0        | seq 1        |
//!  +----------------+--------------+--------------+--------------+-----
//!
//!  frame:
//!  +-------------+-------------+-------------------------------+
//!  | len: u32 LE | crc: u32 LE | payload: `len` bytes          |
//!  +-------------+-------------+-------------------------------+
//!    len <= MAX_FRAME (4 MiB), checked before anything is allocated
//!    crc  = CRC-32 (crc32fast, IEEE) of the payload
//!
//!  header payload (postcard):
//!  +------------------+----------------+----------------+----------------+
//!  | version: varint  | image_hash: 32 | mem_size:      | machine:       |
//!  | (u16)            | raw bytes      | varint (u64)   | varint len+UTF8|
//!  +------------------+----------------+----------------+----------------+
//!
//!  record payload (postcard):
//!  +--------------+---------------------------------------------+--------------+
//!  | seq: varint  | position: exit varint, rip varint,          | event: varint|
//!  |              |           regs_crc varint, kind 1 byte      | tag + fields |
//!  +--------------+---------------------------------------------+--------------+
//! ```
//!
//! Version rule: the frame prefix (`len`, `crc`) and the leading varint of
//! the header payload are the same in every format version. A reader
//! decodes that varint alone, before it checks the CRC or decodes anything
//! else, so a log from a newer Duet fails with [`Error::NewerVersion`]
//! however its later fields are laid out. Any other change to the layout
//! above, including a new [`Event`] variant or a reordered field, bumps
//! [`FORMAT_VERSION`].
//!
//! A stream that ends exactly at a frame boundary is a clean end: a log cut
//! between two frames reads as a shorter log. Ends that matter are marked in
//! the log itself ([`Event::PowerOff`], [`Event::Horizon`]). A stream that
//! ends inside a frame is [`Error::Truncated`].

use std::fmt;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The format version this build writes and the only one it reads.
/// 2: a periodic or requested digest's memory CRC is a CRC over the CRCs
/// of the pages (kept current through the dirty log), not one over all
/// of memory; a version 1 log's digests would all differ.
/// 3: [`Event::OutputCheck`] exists (verified-output mode). A version 2
/// log is still read: it has no such record, and its digests are the same.
pub const FORMAT_VERSION: u16 = 3;

/// The oldest format this build reads (see [`FORMAT_VERSION`]).
pub const OLDEST_READABLE_VERSION: u16 = 2;

/// The bytes every log starts with.
pub const MAGIC: [u8; 8] = *b"DUETLOG\0";

/// The largest payload a frame may carry, so a corrupt length cannot make a
/// reader allocate gigabytes.
pub const MAX_FRAME: u32 = 4 * 1024 * 1024;

/// Bytes before a frame's payload: `len` and `crc`.
pub const FRAME_PREFIX: usize = 8;

/// Why a log could not be written or read. Offsets are byte offsets of the
/// frame's start in the stream (the magic is at 0, the header frame at 8).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream held no bytes at all.
    #[error("log is empty")]
    Empty,
    /// The stream does not start with `DUETLOG\0`.
    #[error("not a Duet log: bad magic at byte 0")]
    BadMagic,
    /// The log was written by a newer Duet than this one.
    #[error("log format version {found} is newer than the {supported} this build reads")]
    NewerVersion {
        /// Version in the log's header.
        found: u16,
        /// [`FORMAT_VERSION`] of this build.
        supported: u16,
    },
    /// The log was written by an older Duet, whose digests this build
    /// computes differently.
    #[error("log format version {found} is older than the {supported} this build reads (its state digests are computed differently): record it again")]
    OlderVersion {
        /// Version in the log's header.
        found: u16,
        /// [`OLDEST_READABLE_VERSION`] of this build.
        supported: u16,
    },
    /// The header names a version that never existed (0).
    #[error("log format version {found} is unknown")]
    UnknownVersion {
        /// Version in the log's header.
        found: u16,
    },
    /// The stream ended inside a frame.
    #[error("log truncated inside the {} frame at byte {offset}", FrameName(*.seq))]
    Truncated {
        /// Start of the incomplete frame.
        offset: u64,
        /// Expected sequence number of the record, or `None` for the header.
        seq: Option<u64>,
    },
    /// A frame's payload does not match its CRC.
    #[error("checksum mismatch in the {} frame at byte {offset}", FrameName(*.seq))]
    Checksum {
        /// Start of the corrupt frame.
        offset: u64,
        /// Expected sequence number of the record, or `None` for the header
        /// (and for frames decoded with [`decode_frame`], which cannot know it).
        seq: Option<u64>,
    },
    /// A frame's length is above [`MAX_FRAME`].
    #[error("frame at byte {offset} is {len} bytes, more than the {MAX_FRAME} allowed")]
    TooLarge {
        /// Start of the frame.
        offset: u64,
        /// The length it claims (or would have, when writing).
        len: u64,
    },
    /// A frame passed its CRC but its payload is not a valid header/record.
    #[error("cannot decode the frame at byte {offset}")]
    Decode {
        /// Start of the frame.
        offset: u64,
        /// What postcard found wrong.
        source: postcard::Error,
    },
    /// A value could not be encoded (only for types postcard cannot encode).
    #[error("cannot encode a frame")]
    Encode(#[source] postcard::Error),
    /// A frame's payload decoded but left bytes over.
    #[error("frame at byte {offset} has {extra} bytes after its value")]
    TrailingBytes {
        /// Start of the frame.
        offset: u64,
        /// How many bytes were left.
        extra: usize,
    },
    /// Records are not numbered 0, 1, 2, ...
    #[error("record sequence gap: expected {expected}, found {found}")]
    SequenceGap {
        /// The next sequence number in order.
        expected: u64,
        /// The one in the log.
        found: u64,
    },
    /// An earlier error left the stream at an unknown point; the reader or
    /// writer refuses to go on.
    #[error("log stream unusable after an earlier error")]
    Poisoned,
    /// Reading or writing the underlying stream failed.
    #[error("log I/O")]
    Io(#[from] io::Error),
}

/// Shorthand for results in this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names a frame in error messages: "header" or "record 5".
struct FrameName(Option<u64>);

impl fmt::Display for FrameName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("header"),
            Some(seq) => write!(f, "record {seq}"),
        }
    }
}

/// Where in the guest's execution an event applies: the `exit`-th
/// synchronous VM exit since boot, cross-checked with RIP and a register
/// checksum (see "Positions" in the design notes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Ordinal of synchronous VM exits (PIO, MMIO, HLT) since boot.
    pub exit: u64,
    /// Guest RIP at that exit.
    pub rip: u64,
    /// Checksum of the general-purpose registers at that exit.
    pub regs_crc: u32,
    /// Code of the exit kind, assigned by the VMM.
    pub kind: u8,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {} rip {:#x} regs {:08x}",
            self.exit, self.rip, self.regs_crc
        )
    }
}

/// One nondeterministic input the guest observed, or a marker for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// An interrupt injected with this vector.
    Interrupt {
        /// IDT vector.
        vector: u8,
    },
    /// A monotonic clock read, in nanoseconds.
    Clock {
        /// Value returned to the guest.
        ns: u64,
    },
    /// A wall-clock read (RTC), in seconds since the Unix epoch.
    WallClock {
        /// Value returned to the guest.
        secs: i64,
    },
    /// Random bits handed to the guest.
    Entropy {
        /// Value returned to the guest.
        value: u64,
    },
    /// A timer tick delivered to the guest.
    TimerTick,
    /// Bytes that arrived on the serial port.
    SerialIn {
        /// The bytes, in order.
        bytes: Vec<u8>,
    },
    /// A network frame received by the guest.
    NetFrame {
        /// The whole frame.
        bytes: Vec<u8>,
    },
    /// Data read from disk into the guest.
    DiskData {
        /// The bytes read.
        bytes: Vec<u8>,
    },
    /// Nothing more happens through this record's position: the backup may
    /// execute up to it.
    Horizon,
    /// Periodic state digest, compared by the backup to detect divergence.
    Digest {
        /// Register checksum.
        regs_crc: u32,
        /// Checksum of guest memory.
        mem_crc: u32,
        /// Which digest this is (e.g. a counter), for messages.
        tag: u64,
    },
    /// The guest powered off with this exit code.
    PowerOff {
        /// Exit code the guest gave.
        code: u8,
    },
    /// The recording was stopped here by the operator (the guest was still
    /// running); replay ends at this position too.
    Stop,
    /// The serial line changed hands: one client left and another's bytes
    /// come next (the guest sees delta-DCD).
    SerialHangup,
    /// Verified-output mode only (`duet primary --verify-outputs`): the
    /// primary's device produced this output here. The backup, replaying,
    /// compares its own output at this position, and a digest of the state
    /// after it follows at the same exit; the primary releases the output
    /// only once the backup reports it replayed past both.
    OutputCheck {
        /// Which device produced it.
        kind: OutputKind,
        /// Its length in bytes.
        len: u32,
        /// CRC-32 of its bytes.
        crc: u32,
    },
}

/// The device an [`Event::OutputCheck`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputKind {
    /// Bytes COM1 transmitted.
    Serial,
    /// One Ethernet frame the NIC transmitted.
    Net,
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputKind::Serial => "serial output",
            OutputKind::Net => "network frame out",
        })
    }
}

impl Event {
    /// The [`Event::OutputCheck`] that stands for `bytes` of output of `kind`.
    pub fn output_check(kind: OutputKind, bytes: &[u8]) -> Event {
        Event::OutputCheck {
            kind,
            len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            crc: crc32fast::hash(bytes),
        }
    }
}

impl Event {
    /// Short lower-case name of the kind, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Interrupt { .. } => "interrupt",
            Event::Clock { .. } => "clock",
            Event::WallClock { .. } => "wall clock",
            Event::Entropy { .. } => "entropy",
            Event::TimerTick => "timer tick",
            Event::Stop => "stop",
            Event::SerialHangup => "serial hang-up",
            Event::SerialIn { .. } => "serial input",
            Event::NetFrame { .. } => "network frame",
            Event::DiskData { .. } => "disk data",
            Event::Horizon => "horizon",
            Event::Digest { .. } => "digest",
            Event::PowerOff { .. } => "power off",
            Event::OutputCheck { .. } => "output check",
        }
    }
}

/// One log entry: an event at a position, numbered from 0 with no gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number, 0 for the first record.
    pub seq: u64,
    /// Where the event applies.
    pub pos: Position,
    /// What happened.
    pub event: Event,
}

/// What a replay must match before it starts: written once, after the magic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Format version; must stay the first field (see the module docs).
    pub version: u16,
    /// SHA-256 of the guest ELF (see [`image_hash`]).
    pub image_hash: [u8; 32],
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Free-form description of the machine configuration; record and
    /// replay must agree on it exactly.
    pub machine: String,
}

impl Header {
    /// A header of the current [`FORMAT_VERSION`].
    pub fn new(image_hash: [u8; 32], mem_size: u64, machine: impl Into<String>) -> Self {
        Header {
            version: FORMAT_VERSION,
            image_hash,
            mem_size,
            machine: machine.into(),
        }
    }
}

/// SHA-256 of a guest ELF, so a replay can refuse a different image.
pub fn image_hash(elf: &[u8]) -> [u8; 32] {
    Sha256::digest(elf).into()
}

/// Appends one frame holding `value` to `out`. On error `out` is left as it
/// was. A payload above [`MAX_FRAME`] gives [`Error::TooLarge`] with the
/// offset `out.len()`.
pub fn encode_frame(value: &impl Serialize, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_PREFIX]);
    if let Err(source) = postcard::to_io(value, &mut *out) {
        // Only types postcard cannot encode fail here; ours never do.
        out.truncate(start);
        return Err(Error::Encode(source));
    }
    let len = out.len() - start - FRAME_PREFIX;
    if len > MAX_FRAME as usize {
        out.truncate(start);
        return Err(Error::TooLarge {
            offset: start as u64,
            len: len as u64,
        });
    }
    let crc = payload_crc(&out[start + FRAME_PREFIX..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The size of the whole frame (prefix included) that starts with
/// `prefix`: how many bytes a reader of a stream must gather before it can
/// hand the frame to [`decode_frame`]. Checks the length against
/// [`MAX_FRAME`] ([`Error::TooLarge`] with offset 0) and nothing else; the
/// CRC is left to the decode, so that it is checked once.
pub fn frame_len(prefix: &[u8; FRAME_PREFIX]) -> Result<usize> {
    let (len, _) = parse_prefix(prefix, 0)?;
    Ok(FRAME_PREFIX + len)
}

/// Decodes the frame at the start of `buf`, returning the value and the
/// bytes it used, or `None` if `buf` holds only part of a frame. The CRC is
/// checked once, before the payload is decoded. Error offsets are relative
/// to `buf`. For headers use [`decode_header_frame`], which checks the
/// version first, and for records [`decode_record_frame`], which checks
/// the sequence number and names it in errors.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>> {
    let Some((crc, payload)) = split_frame(buf)? else {
        return Ok(None);
    };
    check_crc(crc, payload, 0, None)?;
    let value = decode_payload(payload, 0)?;
    Ok(Some((value, FRAME_PREFIX + payload.len())))
}

/// Decodes the record frame at the start of `buf`, which must carry
/// sequence number `expected`, as [`LogReader::next_record`] does: the CRC
/// is checked once, then the payload decoded, then its `seq` compared
/// ([`Error::SequenceGap`]). Returns the record and the bytes it used, or
/// `None` if `buf` holds only part of a frame. Error offsets are relative
/// to `buf`; [`Error::Checksum`] names `seq: Some(expected)`.
pub fn decode_record_frame(buf: &[u8], expected: u64) -> Result<Option<(Record, usize)>> {
    let Some((crc, payload)) = split_frame(buf)? else {
        return Ok(None);
    };
    let record = decode_record(crc, payload, 0, expected)?;
    Ok(Some((record, FRAME_PREFIX + payload.len())))
}

/// [`decode_frame`] for a [`Header`], checking its version before anything
/// else as [`LogReader::open`] does.
pub fn decode_header_frame(buf: &[u8]) -> Result<Option<(Header, usize)>> {
    let Some((crc, payload)) = split_frame(buf)? else {
        return Ok(None);
    };
    let header = decode_header(crc, payload, 0)?;
    Ok(Some((header, FRAME_PREFIX + payload.len())))
}

/// Splits a whole frame off the front of `buf` into (crc, payload).
fn split_frame(buf: &[u8]) -> Result<Option<(u32, &[u8])>> {
    let Some(prefix) = buf.get(..FRAME_PREFIX) else {
        return Ok(None);
    };
    let (len, crc) = parse_prefix(prefix, 0)?;
    Ok(buf
        .get(FRAME_PREFIX..FRAME_PREFIX + len)
        .map(|payload| (crc, payload)))
}

/// Reads (len, crc) from the 8-byte frame prefix, enforcing [`MAX_FRAME`].
fn parse_prefix(prefix: &[u8], offset: u64) -> Result<(usize, u32)> {
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let crc = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if len > MAX_FRAME {
        return Err(Error::TooLarge {
            offset,
            len: len.into(),
        });
    }
    Ok((len as usize, crc))
}

/// The CRC of a frame's payload: the one place this module computes it, so
/// that tests can count how often each frame is checksummed.
fn payload_crc(payload: &[u8]) -> u32 {
    #[cfg(test)]
    CRC_COUNT.with(|n| n.set(n.get() + 1));
    crc32fast::hash(payload)
}

#[cfg(test)]
thread_local! {
    /// CRCs computed by [`payload_crc`] on this thread (tests only).
    pub(crate) static CRC_COUNT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Takes the count of CRCs computed on this thread since the last call
/// (tests only).
#[cfg(test)]
pub(crate) fn take_crc_count() -> u64 {
    CRC_COUNT.with(|n| n.replace(0))
}

fn check_crc(crc: u32, payload: &[u8], offset: u64, seq: Option<u64>) -> Result<()> {
    if payload_crc(payload) == crc {
        Ok(())
    } else {
        Err(Error::Checksum { offset, seq })
    }
}

/// Decodes a whole payload, refusing bytes left over.
fn decode_payload<T: DeserializeOwned>(payload: &[u8], offset: u64) -> Result<T> {
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|source| Error::Decode { offset, source })?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes {
            offset,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// CRC, then the payload, then the sequence number.
fn decode_record(crc: u32, payload: &[u8], offset: u64, expected: u64) -> Result<Record> {
    check_crc(crc, payload, offset, Some(expected))?;
    let record: Record = decode_payload(payload, offset)?;
    if record.seq != expected {
        return Err(Error::SequenceGap {
            expected,
            found: record.seq,
        });
    }
    Ok(record)
}

/// Version first (before the CRC), then CRC, then the rest.
fn decode_header(crc: u32, payload: &[u8], offset: u64) -> Result<Header> {
    if let Ok((found, _)) = postcard::take_from_bytes::<u16>(payload) {
        if found > FORMAT_VERSION {
            return Err(Error::NewerVersion {
                found,
                supported: FORMAT_VERSION,
            });
        }
    }
    check_crc(crc, payload, offset, None)?;
    let header: Header = decode_payload(payload, offset)?;
    if header.version == 0 {
        return Err(Error::UnknownVersion {
            found: header.version,
        });
    }
    if header.version < OLDEST_READABLE_VERSION {
        return Err(Error::OlderVersion {
            found: header.version,
            supported: OLDEST_READABLE_VERSION,
        });
    }
    Ok(header)
}

/// Writes a log: the magic and header at creation, then numbered records.
///
/// Nothing is buffered here beyond one frame; wrap a file in a
/// [`std::io::BufWriter`] and call [`LogWriter::flush`] when an output is
/// waiting on the log. If a write fails the stream may end in a partial
/// frame, and every later call returns [`Error::Poisoned`].
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    w: W,
    next_seq: u64,
    bytes_written: u64,
    scratch: Vec<u8>,
    poisoned: bool,
}

impl<W: Write> LogWriter<W> {
    /// Writes the magic and `header` to `w`.
    pub fn new(mut w: W, header: &Header) -> Result<Self> {
        let mut scratch = Vec::with_capacity(256);
        scratch.extend_from_slice(&MAGIC);
        encode_frame(header, &mut scratch)?;
        w.write_all(&scratch)?;
        Ok(LogWriter {
            w,
            next_seq: 0,
            bytes_written: scratch.len() as u64,
            scratch,
            poisoned: false,
        })
    }

    /// Appends `event` at `pos` as the next record and returns its sequence
    /// number.
    pub fn append(&mut self, pos: Position, event: Event) -> Result<u64> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let seq = self.next_seq;
        let record = Record { seq, pos, event };
        self.scratch.clear();
        encode_frame(&record, &mut self.scratch).map_err(|e| match e {
            Error::TooLarge { len, .. } => Error::TooLarge {
                offset: self.bytes_written,
                len,
            },
            other => other,
        })?;
        if let Err(e) = self.w.write_all(&self.scratch) {
            self.poisoned = true;
            return Err(e.into());
        }
        self.bytes_written += self.scratch.len() as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        self.w.flush()?;
        Ok(())
    }

    /// Bytes handed to the underlying writer so far, magic and header included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// The sequence number the next [`append`](Self::append) will assign.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Gives back the underlying writer, without flushing it.
    pub fn into_inner(self) -> W {
        self.w
    }
}

/// Reads a log one frame at a time from any [`Read`] (a file or a socket).
///
/// After an error the reader returns [`Error::Poisoned`] from then on.
#[derive(Debug)]
pub struct LogReader<R: Read> {
    r: R,
    offset: u64,
    next_seq: u64,
    buf: Vec<u8>,
    poisoned: bool,
}

impl<R: Read> LogReader<R> {
    /// Checks the magic and reads the header.
    pub fn open(mut r: R) -> Result<(Self, Header)> {
        let mut magic = [0u8; MAGIC.len()];
        let n = read_full(&mut r, &mut magic)?;
        if n == 0 {
            return Err(Error::Empty);
        }
        if magic[..n] != MAGIC[..n] {
            return Err(Error::BadMagic);
        }
        if n < MAGIC.len() {
            return Err(Error::Truncated {
                offset: 0,
                seq: None,
            });
        }
        let mut reader = LogReader {
            r,
            offset: MAGIC.len() as u64,
            next_seq: 0,
            buf: Vec::new(),
            poisoned: false,
        };
        let offset = reader.offset;
        let crc = reader
            .read_frame(None)?
            .ok_or(Error::Truncated { offset, seq: None })?;
        let header = decode_header(crc, &reader.buf, offset)?;
        reader.offset += (FRAME_PREFIX + reader.buf.len()) as u64;
        Ok((reader, header))
    }

    /// The next record, or `None` at a clean end (the stream ended exactly
    /// between two frames).
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let result = self.read_record();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Byte offset of the next frame in the stream.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The sequence number the next record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    fn read_record(&mut self) -> Result<Option<Record>> {
        let offset = self.offset;
        let expected = self.next_seq;
        let Some(crc) = self.read_frame(Some(expected))? else {
            return Ok(None);
        };
        let record = decode_record(crc, &self.buf, offset, expected)?;
        self.offset += (FRAME_PREFIX + self.buf.len()) as u64;
        self.next_seq += 1;
        Ok(Some(record))
    }

    /// Reads one frame's payload into `self.buf` and returns its CRC, or
    /// `None` if the stream ends before the frame starts.
    fn read_frame(&mut self, seq: Option<u64>) -> Result<Option<u32>> {
        let offset = self.offset;
        let mut prefix = [0u8; FRAME_PREFIX];
        match read_full(&mut self.r, &mut prefix)? {
            0 => return Ok(None),
            FRAME_PREFIX => {}
            _ => return Err(Error::Truncated { offset, seq }),
        }
        let (len, crc) = parse_prefix(&prefix, offset)?;
        self.buf.clear();
        self.buf.resize(len, 0);
        if read_full(&mut self.r, &mut self.buf)? < len {
            return Err(Error::Truncated { offset, seq });
        }
        Ok(Some(crc))
    }
}

/// Fills `buf` unless the stream ends first; returns how many bytes it got.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(exit: u64) -> Position {
        Position {
            exit,
            rip: 0xffff_8000_0010_0000 + exit,
            regs_crc: 0xdead_beef ^ exit as u32,
            kind: (exit % 4) as u8,
        }
    }

    fn header() -> Header {
        Header::new(
            image_hash(b"\x7fELF guest"),
            64 << 20,
            "1 vcpu, 64 MiB, uart 0x3f8",
        )
    }

    fn every_event() -> Vec<Event> {
        vec![
            Event::Interrupt { vector: 0x20 },
            Event::Clock { ns: 1_234_567_890 },
            Event::WallClock { secs: -5 },
            Event::Entropy { value: u64::MAX },
            Event::TimerTick,
            Event::SerialIn {
                bytes: b"hello\n".to_vec(),
            },
            Event::NetFrame {
                bytes: vec![0xff; 60],
            },
            Event::DiskData {
                bytes: (0..=255).collect(),
            },
            Event::Horizon,
            Event::Digest {
                regs_crc: 1,
                mem_crc: 2,
                tag: 3,
            },
            Event::PowerOff { code: 7 },
            Event::Stop,
            Event::SerialHangup,
            Event::OutputCheck {
                kind: OutputKind::Net,
                len: 60,
                crc: 0xfeed_f00d,
            },
        ]
    }

    fn write_log(events: &[Event]) -> Vec<u8> {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(w.append(pos(i as u64 * 3), e.clone()).unwrap(), i as u64);
        }
        w.flush().unwrap();
        let written = w.bytes_written();
        let bytes = w.into_inner();
        assert_eq!(written, bytes.len() as u64);
        bytes
    }

    /// Reads a whole log, returning the records read before the first error.
    fn read_all(bytes: &[u8]) -> (Vec<Record>, Result<()>) {
        let mut records = Vec::new();
        let (mut r, h) = match LogReader::open(bytes) {
            Ok(x) => x,
            Err(e) => return (records, Err(e)),
        };
        if h != header() {
            // A changed header that still decodes would be a silent change.
            panic!("header changed silently: {h:?}");
        }
        loop {
            match r.next_record() {
                Ok(Some(rec)) => records.push(rec),
                Ok(None) => return (records, Ok(())),
                Err(e) => return (records, Err(e)),
            }
        }
    }

    /// Byte offsets where frames end (after the header), i.e. clean cut points.
    fn frame_ends(bytes: &[u8]) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = MAGIC.len();
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            at += FRAME_PREFIX + len;
            ends.push(at);
        }
        ends
    }

    #[test]
    fn every_event_kind_round_trips() {
        let events = every_event();
        let bytes = write_log(&events);
        let (mut r, h) = LogReader::open(&bytes[..]).unwrap();
        assert_eq!(h, header());
        for (i, e) in events.iter().enumerate() {
            let rec = r.next_record().unwrap().unwrap();
            assert_eq!(
                rec,
                Record {
                    seq: i as u64,
                    pos: pos(i as u64 * 3),
                    event: e.clone()
                }
            );
            assert!(!rec.event.name().is_empty());
        }
        assert!(r.next_record().unwrap().is_none());
        assert_eq!(r.offset(), bytes.len() as u64);
        assert_eq!(r.next_seq(), events.len() as u64);
    }

    #[test]
    fn layout_matches_the_diagram() {
        let bytes = write_log(&[Event::TimerTick]);
        assert_eq!(&bytes[..8], b"DUETLOG\0");
        let hlen = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let hcrc = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
        let payload = &bytes[16..16 + hlen];
        assert_eq!(crc32fast::hash(payload), hcrc);
        assert_eq!(
            payload[0], FORMAT_VERSION as u8,
            "version is the first varint"
        );
        assert_eq!(&payload[1..33], &header().image_hash);
        let rec = &bytes[16 + hlen..];
        let rlen = u32::from_le_bytes(rec[..4].try_into().unwrap()) as usize;
        assert_eq!(rec.len(), FRAME_PREFIX + rlen);
        assert_eq!(rec[8], 0, "seq 0 is the first varint of a record");
    }

    #[test]
    fn position_display() {
        let p = Position {
            exit: 42,
            rip: 0x1000,
            regs_crc: 0xab,
            kind: 1,
        };
        assert_eq!(p.to_string(), "exit 42 rip 0x1000 regs 000000ab");
    }

    #[test]
    fn image_hash_is_sha256() {
        let h = image_hash(b"abc");
        assert_eq!(h[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(h[28..], [0xf2, 0x00, 0x15, 0xad]);
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bytes(&mut self) -> Vec<u8> {
            let len = match self.next() % 4 {
                0 => 0,
                1 => (self.next() % 16) as usize,
                2 => (self.next() % 2000) as usize,
                _ => (self.next() % 70_000) as usize,
            };
            (0..len).map(|_| self.next() as u8).collect()
        }

        fn event(&mut self) -> Event {
            match self.next() % 11 {
                0 => Event::Interrupt {
                    vector: self.next() as u8,
                },
                1 => Event::Clock { ns: self.next() },
                2 => Event::WallClock {
                    secs: self.next() as i64,
                },
                3 => Event::Entropy { value: self.next() },
                4 => Event::TimerTick,
                5 => Event::SerialIn {
                    bytes: self.bytes(),
                },
                6 => Event::NetFrame {
                    bytes: self.bytes(),
                },
                7 => Event::DiskData {
                    bytes: self.bytes(),
                },
                8 => Event::Horizon,
                9 => Event::Digest {
                    regs_crc: self.next() as u32,
                    mem_crc: self.next() as u32,
                    tag: self.next(),
                },
                _ => Event::PowerOff {
                    code: self.next() as u8,
                },
            }
        }

        fn position(&mut self) -> Position {
            let v = self.next();
            Position {
                exit: v >> (v % 64),
                rip: self.next(),
                regs_crc: self.next() as u32,
                kind: self.next() as u8,
            }
        }
    }

    #[test]
    fn random_records_round_trip() {
        for case in 0..20u64 {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ case.wrapping_mul(0x1234_5678_9abc));
            let h = Header::new(
                image_hash(&rng.next().to_le_bytes()),
                rng.next(),
                format!("case {case} ✓"),
            );
            let records: Vec<(Position, Event)> = (0..rng.next() % 200)
                .map(|_| (rng.position(), rng.event()))
                .collect();
            let mut w = LogWriter::new(Vec::new(), &h).unwrap();
            for (p, e) in &records {
                w.append(*p, e.clone()).unwrap();
            }
            assert_eq!(w.next_seq(), records.len() as u64);
            let bytes = w.into_inner();

            let (mut r, h2) = LogReader::open(&bytes[..]).unwrap();
            assert_eq!(h2, h);
            for (i, (p, e)) in records.iter().enumerate() {
                let rec = r.next_record().unwrap().unwrap();
                assert_eq!((rec.seq, &rec.pos, &rec.event), (i as u64, p, e));
            }
            assert!(r.next_record().unwrap().is_none());

            // The same frames decode one by one from the buffer.
            let (h3, mut at) = decode_header_frame(&bytes[8..]).unwrap().unwrap();
            assert_eq!(h3, h);
            at += 8;
            for (i, (p, e)) in records.iter().enumerate() {
                let (rec, used) = decode_frame::<Record>(&bytes[at..]).unwrap().unwrap();
                assert_eq!((rec.seq, &rec.pos, &rec.event), (i as u64, p, e));
                at += used;
            }
            assert_eq!(at, bytes.len());
        }
    }

    #[test]
    fn truncation_at_every_offset() {
        let events = every_event();
        let bytes = write_log(&events);
        let ends = frame_ends(&bytes);
        let header_end = ends[0];
        for cut in 0..bytes.len() {
            let (records, result) = read_all(&bytes[..cut]);
            if cut == 0 {
                assert!(matches!(result, Err(Error::Empty)), "cut {cut}: {result:?}");
            } else if cut < header_end {
                assert!(
                    matches!(result, Err(Error::Truncated { seq: None, .. })),
                    "cut {cut}: {result:?}"
                );
            } else if let Some(k) = ends.iter().position(|&e| e == cut) {
                // A cut between frames is a clean, shorter log.
                assert!(result.is_ok(), "cut {cut}: {result:?}");
                assert_eq!(records.len(), k);
            } else {
                let k = ends.iter().filter(|&&e| e < cut).count() - 1;
                assert_eq!(records.len(), k, "cut {cut}");
                match result {
                    Err(Error::Truncated { offset, seq }) => {
                        assert_eq!(offset, ends[k] as u64, "cut {cut}");
                        assert_eq!(seq, Some(k as u64), "cut {cut}");
                    }
                    other => panic!("cut {cut}: {other:?}"),
                }
            }
            for (i, rec) in records.iter().enumerate() {
                assert_eq!(rec.event, events[i]);
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let events = vec![
            Event::Interrupt { vector: 0x21 },
            Event::SerialIn {
                bytes: b"ab".to_vec(),
            },
            Event::Horizon,
            Event::PowerOff { code: 0 },
        ];
        let bytes = write_log(&events);
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let (records, result) = read_all(&bad);
            let err = match result {
                Ok(()) => panic!("bit {bit}: flip went unnoticed ({} records)", records.len()),
                Err(e) => e,
            };
            assert!(
                matches!(
                    err,
                    Error::BadMagic
                        | Error::Checksum { .. }
                        | Error::Truncated { .. }
                        | Error::TooLarge { .. }
                        | Error::NewerVersion { .. }
                        | Error::OlderVersion { .. }
                ),
                "bit {bit}: {err:?}"
            );
            assert!(!err.to_string().is_empty());
            for (i, rec) in records.iter().enumerate() {
                assert_eq!(rec.seq, i as u64, "bit {bit}");
                assert_eq!(rec.pos, pos(i as u64 * 3), "bit {bit}");
                assert_eq!(rec.event, events[i], "bit {bit}");
            }
        }
    }

    #[test]
    fn empty_input() {
        assert!(matches!(LogReader::open(&[][..]), Err(Error::Empty)));
        assert_eq!(Error::Empty.to_string(), "log is empty");
    }

    #[test]
    fn bad_magic() {
        assert!(matches!(
            LogReader::open(&b"ELF\x7f not a log"[..]),
            Err(Error::BadMagic)
        ));
    }

    /// A header frame claiming `version`, followed by `rest`, with a CRC that
    /// is right or wrong.
    fn header_frame(version: u16, rest: &[u8], good_crc: bool) -> Vec<u8> {
        let mut payload = postcard::to_allocvec(&version).unwrap();
        payload.extend_from_slice(rest);
        let mut crc = crc32fast::hash(&payload);
        if !good_crc {
            crc = !crc;
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn newer_version_is_reported_first() {
        let mut h = header();
        h.version = FORMAT_VERSION + 1;
        let mut w = LogWriter::new(Vec::new(), &h).unwrap();
        w.append(pos(0), Event::TimerTick).unwrap();
        let bytes = w.into_inner();
        let err = LogReader::open(&bytes[..]).unwrap_err();
        assert!(
            matches!(err, Error::NewerVersion { found, supported }
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "log format version 4 is newer than the 3 this build reads"
        );

        // A future header whose later fields we cannot decode, with a good or
        // a bad CRC (a newer format might checksum differently), and a huge
        // version that postcard writes as a three-byte varint.
        for (version, good) in [(4, true), (4, false), (u16::MAX, true)] {
            let bytes = header_frame(version, &[0xff, 0xff, 0xff], good);
            let err = LogReader::open(&bytes[..]).unwrap_err();
            assert!(
                matches!(err, Error::NewerVersion { found, .. } if found == version),
                "{err:?}"
            );
            let err = decode_header_frame(&bytes[8..]).unwrap_err();
            assert!(matches!(err, Error::NewerVersion { .. }), "{err:?}");
        }
    }

    /// Version 3 only added a record kind that a version 2 log never has.
    #[test]
    fn a_version_2_log_is_still_read() {
        let mut h = header();
        h.version = 2;
        let mut w = LogWriter::new(Vec::new(), &h).unwrap();
        w.append(pos(1), Event::TimerTick).unwrap();
        let bytes = w.into_inner();
        let (mut r, got) = LogReader::open(&bytes[..]).unwrap();
        assert_eq!(got.version, 2);
        assert_eq!(r.next_record().unwrap().unwrap().event, Event::TimerTick);
    }

    #[test]
    fn a_version_1_log_is_refused_as_older() {
        let mut h = header();
        h.version = 1;
        let bytes = LogWriter::new(Vec::new(), &h).unwrap().into_inner();
        let err = LogReader::open(&bytes[..]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OlderVersion {
                    found: 1,
                    supported: 2
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("record it again"), "{err}");
    }

    #[test]
    fn version_zero_is_unknown() {
        let mut h = header();
        h.version = 0;
        let bytes = LogWriter::new(Vec::new(), &h).unwrap().into_inner();
        assert!(matches!(
            LogReader::open(&bytes[..]),
            Err(Error::UnknownVersion { found: 0 })
        ));
    }

    #[test]
    fn garbage_with_a_valid_crc_is_a_decode_error() {
        let bytes = header_frame(FORMAT_VERSION, &[0xff; 3], true);
        assert!(matches!(
            LogReader::open(&bytes[..]),
            Err(Error::Decode { offset: 8, .. })
        ));
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_refused() {
        let mut payload = postcard::to_allocvec(&Record {
            seq: 0,
            pos: pos(0),
            event: Event::Horizon,
        })
        .unwrap();
        payload.push(0);
        let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        assert!(matches!(
            decode_frame::<Record>(&buf),
            Err(Error::TrailingBytes {
                offset: 0,
                extra: 1
            })
        ));
    }

    #[test]
    fn sequence_gap_is_reported() {
        let mut bytes = write_log(&[Event::TimerTick]);
        let mut frame = Vec::new();
        encode_frame(
            &Record {
                seq: 5,
                pos: pos(1),
                event: Event::Horizon,
            },
            &mut frame,
        )
        .unwrap();
        bytes.extend_from_slice(&frame);
        let (mut r, _) = LogReader::open(&bytes[..]).unwrap();
        assert_eq!(r.next_record().unwrap().unwrap().seq, 0);
        let err = r.next_record().unwrap_err();
        assert!(
            matches!(
                err,
                Error::SequenceGap {
                    expected: 1,
                    found: 5
                }
            ),
            "{err:?}"
        );
        assert!(matches!(r.next_record(), Err(Error::Poisoned)));
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut bytes = write_log(&[]);
        let at = bytes.len() as u64;
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let (mut r, _) = LogReader::open(&bytes[..]).unwrap();
        let err = r.next_record().unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { offset, len } if offset == at && len == u32::MAX as u64),
            "{err:?}"
        );
        assert!(matches!(
            decode_frame::<Record>(&bytes[at as usize..]),
            Err(Error::TooLarge { offset: 0, .. })
        ));

        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        let before = w.bytes_written();
        let err = w
            .append(
                pos(0),
                Event::DiskData {
                    bytes: vec![0; MAX_FRAME as usize],
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { offset, .. } if offset == before),
            "{err:?}"
        );
        // Nothing was written, and the writer goes on.
        assert_eq!(w.bytes_written(), before);
        assert_eq!(w.append(pos(1), Event::Horizon).unwrap(), 0);
    }

    #[test]
    fn decode_frame_waits_for_a_whole_frame() {
        let mut buf = Vec::new();
        let rec = Record {
            seq: 3,
            pos: pos(9),
            event: Event::NetFrame {
                bytes: vec![1, 2, 3, 4, 5],
            },
        };
        encode_frame(&rec, &mut buf).unwrap();
        encode_frame(&rec, &mut buf).unwrap();
        let one = buf.len() / 2;
        for cut in 0..one {
            assert!(
                decode_frame::<Record>(&buf[..cut]).unwrap().is_none(),
                "cut {cut}"
            );
            assert!(
                decode_header_frame(&buf[..cut]).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let (got, used) = decode_frame::<Record>(&buf).unwrap().unwrap();
        assert_eq!((got, used), (rec.clone(), one));
        let (got, used) = decode_frame::<Record>(&buf[one..]).unwrap().unwrap();
        assert_eq!((got, used), (rec, one));
    }

    #[test]
    fn decode_record_frame_checks_crc_once_and_the_seq() {
        let rec = Record {
            seq: 4,
            pos: pos(4),
            event: Event::Horizon,
        };
        let mut buf = Vec::new();
        encode_frame(&rec, &mut buf).unwrap();
        let prefix: [u8; FRAME_PREFIX] = buf[..FRAME_PREFIX].try_into().unwrap();
        assert_eq!(frame_len(&prefix).unwrap(), buf.len());
        take_crc_count();
        assert_eq!(
            decode_record_frame(&buf, 4).unwrap(),
            Some((rec.clone(), buf.len()))
        );
        assert_eq!(take_crc_count(), 1);
        assert!(decode_record_frame(&buf[..buf.len() - 1], 4)
            .unwrap()
            .is_none());
        assert!(matches!(
            decode_record_frame(&buf, 3),
            Err(Error::SequenceGap {
                expected: 3,
                found: 4
            })
        ));
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(matches!(
            decode_record_frame(&buf, 4),
            Err(Error::Checksum {
                offset: 0,
                seq: Some(4)
            })
        ));
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            frame_len(&huge[..].try_into().unwrap()),
            Err(Error::TooLarge { offset: 0, .. })
        ));
    }

    /// A writer that fails after a few bytes.
    struct Failing(usize);

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk full"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_poisons_the_writer() {
        let header_len = write_log(&[]).len();
        let mut w = LogWriter::new(Failing(header_len + 3), &header()).unwrap();
        assert!(matches!(
            w.append(pos(0), Event::TimerTick),
            Err(Error::Io(_))
        ));
        assert!(matches!(
            w.append(pos(0), Event::TimerTick),
            Err(Error::Poisoned)
        ));
        assert!(matches!(w.flush(), Err(Error::Poisoned)));
        assert_eq!(w.next_seq(), 0);
    }

    /// A reader that hands out one byte at a time, as a slow socket might.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((&b, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = b;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn reads_from_a_trickling_stream() {
        let events = every_event();
        let bytes = write_log(&events);
        let (mut r, h) = LogReader::open(Trickle(&bytes)).unwrap();
        assert_eq!(h, header());
        let mut n = 0;
        while let Some(rec) = r.next_record().unwrap() {
            assert_eq!(rec.event, events[n]);
            n += 1;
        }
        assert_eq!(n, events.len());
    }
}
