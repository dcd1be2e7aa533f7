//! The log channel: a framed binary protocol over TCP between a primary and
//! its backup, run on tokio in a thread of its own so that the vCPU thread
//! only ever touches plain blocking handles. The vCPU threads write the
//! primary's batches and the backup's progress reports themselves, through
//! a lock shared with the channel thread (see the `writer` module); the
//! channel thread reads, and writes everything else.
//!
//! ```text
//! message = len: u32 LE | word: u32 LE | body: `len` bytes
//!
//!   control message: exactly one log frame (crate::log), word = CRC-32 of
//!                    the body, body = postcard(Message), len <= MAX_FRAME
//!   record batch:    word = number of records | ACK_NOW (bits 30, 31),
//!                    body = RECORDS_TAG (3) | the records' own log frames,
//!                    each with its seq and CRC
//!
//! primary                                backup
//!    | ---- Hello {version, vm id, image, machine, epoch} ---> |
//!    | <--- Hello (its own) ---------------------------------- |  each side checks the other
//!    | <--- Welcome | Refuse {reason} ------------------------ |
//!    | ---- record batch {record frames...} -----------------> |
//!    | <--- Ack {highest contiguous seq, replayed exit} ------- |  at once if ACK_NOW,
//!    |                                                          |  else with the next report
//!    | <--> Heartbeat {replayed exit} ----------------------- |  both ways, every interval
//!    | ---- Bye (after the last record) ---------------------> |
//! ```
//!
//! Framing belongs to [`crate::log`]: a control message is encoded with
//! [`encode_frame`] and decoded with [`decode_frame`], and each record of a
//! batch with [`decode_record_frame`]. A reader tells the two kinds apart by
//! the body's first byte, which for a control message is its postcard tag;
//! tag 3 is reserved for batches. A batch has no CRC of its own: every byte
//! of its body but the tag is inside a record frame whose CRC covers it, so
//! each record is checksummed once when the primary encodes it and checked
//! once when the backup decodes it. What a batch CRC would add (catching a
//! corrupt `len` that still ends on a frame boundary, or a lost frame) the
//! record count in `word` and the sequence numbers catch.
//!
//! The backup acknowledges a batch marked ACK_NOW the moment it has
//! checked it: the primary marks the batches that an output waits on.
//! Any other batch is acknowledged with the backup's next message, a
//! progress report or a heartbeat (an Ack then takes that message's
//! place), unless the backup has said nothing for
//! [`ChannelConfig::ack_late`]: a flush right behind another message then
//! costs the primary's channel thread no wake-up, and a vCPU no
//! preemption.
//!
//! Flow control follows the VMware FT paper: the backup acknowledges on
//! receipt, but it reads from the socket only while its bounded queue of
//! records has room. When it lags, TCP pushes back, the socket fills, and
//! the primary's vCPU blocks in its write instead of growing memory. The primary also never has more than `max_unacked` records
//! unacknowledged.
//!
//! Any failure (a bad checksum, a sequence gap, a silent peer, a closed
//! socket without Bye) is reported, never skipped: the link records it as a
//! [`LinkFailure`] in [`LinkState::failure`] and stops.
//!
//! With [`Security::Tls`] the same messages flow inside a mutual TLS 1.3
//! session that is set up first (see [`crate::tls`]): the certificates say
//! who may pair, the Hellos (epoch included) still say whether they may
//! pair now. A backup tells a peer that does not speak what it expects
//! from a failed handshake by the first bytes, and every connection's
//! whole handshake is bounded by [`HANDSHAKE_TIMEOUT`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::log::{
    self, decode_frame, decode_record_frame, encode_frame, frame_len, Record, FRAME_PREFIX,
    MAX_FRAME,
};
use crate::tls::{self, TlsIdentity};
use crate::writer::SharedWriter;

/// The reading half of a link's stream: a TCP socket's, or a TLS session's
/// over one. Boxed so that the link's code is the same for both.
pub(crate) type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half; see [`Reader`].
pub(crate) type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// How long one connection's handshake (TLS, then the Hellos) may take
/// before it is given up: a peer that connects and says nothing must not
/// hold a backup, nor a primary, forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a link protects its bytes.
#[derive(Debug, Clone, Default)]
pub enum Security {
    /// Plain TCP: no authentication, no encryption (what the channel was
    /// before TLS; the tests that corrupt the stream in flight rely on it).
    #[default]
    Plaintext,
    /// Mutual TLS 1.3 with these credentials. The primary verifies that the
    /// backup's certificate names `V.vm.duet` ([`tls::vm_name`] of the
    /// Hello's VM id); the backup requires a client certificate from the
    /// same CA that names it too. TLS comes first; the Hellos (and so the
    /// epoch check) are exchanged inside it.
    Tls(TlsIdentity),
}

impl Security {
    /// True for [`Security::Tls`].
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }
}

/// Version of the channel protocol (independent of the log format's).
/// 2: record batches are raw record frames with a count, not a
/// checksummed `Records` message. 3: a Hello says whether it joins a
/// running VM, and the state-transfer messages of a join exist
/// ([`crate::join`]); a link may start at any sequence number. 4: a backup
/// that diverged says so ([`Message::Diverged`]) before it ends, and
/// records may carry `OutputCheck` (log format 3). 5: a batch says
/// whether it wants its ack at once ([`ACK_NOW`]); others are acked late.
pub const PROTOCOL_VERSION: u16 = 5;
/// The longest description a [`Message::Diverged`] carries; longer ones are
/// cut (at a character boundary) by the sender and by the receiver.
pub const MAX_DIVERGED_TEXT: usize = 1024;
/// Room a backup keeps in a batch message beyond one send's
/// [`MAX_SEND`]: primaries before the vCPU thread wrote its own batches
/// merged queued sends up to this many bytes.
const MAX_BATCH: usize = 1 << 20;
/// The most record-frame bytes one [`PrimaryLink::send`] may hand over: room
/// for a record of [`MAX_FRAME`] and more.
pub const MAX_SEND: usize = 2 * MAX_FRAME as usize;
/// The largest batch body a reader accepts: its tag, what merging may reach
/// before it stops, and one more batch.
const MAX_MESSAGE: usize = 1 + MAX_BATCH + MAX_SEND;
/// The first body byte of a record batch: the postcard tag that
/// [`Message::RecordsTag`] reserves.
const RECORDS_TAG: u8 = 3;
/// The bits of a batch's record count word that ask for its ack at once
/// (an output waits on it). No batch holds 2^30 records: MAX_MESSAGE bytes
/// hold fewer than 2^21 frames. No CRC covers the word, so the flag takes
/// two bits, and one of them alone is corrupt: a single flipped bit is
/// still noticed, as everywhere else on the wire.
const ACK_NOW: u32 = 0b11 << 30;

/// Errors of the log channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The primary could not reach the backup before its timeout.
    #[error("cannot connect to the backup at {addr}")]
    Connect {
        /// Where the backup was expected.
        addr: SocketAddr,
        /// The last attempt's error.
        source: io::Error,
    },
    /// The backup could not listen.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why not.
        source: io::Error,
    },
    /// The peer refused our Hello, for this reason (its words).
    #[error("the peer refused us: {0}")]
    Refused(String),
    /// We refused the peer's Hello, for this reason.
    #[error("refused the peer: {0}")]
    Mismatch(String),
    /// A batch handed to [`PrimaryLink::send`] is larger than [`MAX_SEND`];
    /// nothing was sent and the link goes on.
    #[error("a batch of {len} bytes of records is more than the {MAX_SEND} one send may carry")]
    TooLarge {
        /// Bytes in the batch.
        len: usize,
    },
    /// The link failed (or was already failed); match on the
    /// [`LinkFailure`] to tell why.
    #[error("log channel failed")]
    Failed(#[source] LinkFailure),
    /// Setting up the link (runtime, thread, socket options) failed.
    #[error("log channel I/O")]
    Io(#[from] io::Error),
    /// The caller's stop flag was raised while the link waited (see
    /// [`PrimaryLink::set_stop_flag`]); the link itself is fine.
    #[error("stopped while waiting on the log channel")]
    Interrupted,
    /// This side requires TLS and the peer sent something else (a plain
    /// Duet Hello, most likely).
    #[error(
        "the {peer} did not speak TLS (this side requires mutual TLS: is the {peer} running without --tls-ca, --tls-cert and --tls-key?)"
    )]
    PeerNotTls {
        /// The side that spoke plaintext.
        peer: Role,
    },
    /// The peer opened with a TLS handshake and this side has no
    /// credentials.
    #[error(
        "the {peer} speaks TLS but this side has no TLS credentials (give it --tls-ca, --tls-cert and --tls-key)"
    )]
    PeerSpeaksTls {
        /// The side that spoke TLS.
        peer: Role,
    },
    /// The TLS handshake failed (a certificate refused by either side, an
    /// alert), in the words of [`tls::explain`].
    #[error("TLS handshake with the {peer} failed: {reason}")]
    TlsHandshake {
        /// The other side.
        peer: Role,
        /// What went wrong.
        reason: String,
    },
    /// The credentials could not make a TLS configuration (or the VM id a
    /// TLS name).
    #[error("TLS setup")]
    TlsSetup(#[from] tls::Error),
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("the {peer} did not complete the handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout {
        /// The silent side.
        peer: Role,
    },
}

/// How long a blocking call waits between looks at the caller's stop flag.
const STOP_SLICE: Duration = Duration::from_millis(20);

impl Error {
    /// The link failure, if this error is one.
    pub fn link_failure(&self) -> Option<&LinkFailure> {
        match self {
            Error::Failed(f) => Some(f),
            _ => None,
        }
    }
}

/// Why a link failed: what the channel detected. Recorded once per link in
/// [`LinkCounters::failure`] (the first failure wins) and carried by
/// [`Error::Failed`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkFailure {
    /// Nothing arrived from the peer for longer than
    /// [`ChannelConfig::timeout`].
    #[error("the {peer} was silent for {for_ms} ms")]
    PeerSilent {
        /// The silent side.
        peer: Role,
        /// How long since it was last heard, in milliseconds.
        for_ms: u64,
    },
    /// The peer's end of the connection went away (end of stream, reset,
    /// broken pipe) without a Bye.
    #[error("the {peer} closed the connection without a goodbye")]
    PeerClosed {
        /// The side that went away.
        peer: Role,
    },
    /// Bytes from the peer failed their checksum, or passed it and still do
    /// not make sense.
    #[error("the log channel is corrupt: {cause} in {} at stream offset {offset}", What(*.seq))]
    Corrupt {
        /// Offset of the bad frame (or message) in the bytes read from the
        /// peer since the connection opened.
        offset: u64,
        /// The sequence number the bad record was expected to carry, or
        /// `None` if the bad frame was a control message.
        seq: Option<u64>,
        /// What was wrong.
        cause: Corruption,
    },
    /// A record arrived intact but out of order: the primary skipped or
    /// repeated records.
    #[error("record sequence gap: expected {expected}, got {got}")]
    SequenceGap {
        /// The next sequence number in order.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
    /// The peer sent a well-formed message that has no place here.
    #[error("unexpected message from the {from}: {message}")]
    Unexpected {
        /// Who sent it.
        from: Role,
        /// The message (debug form) and what was expected instead.
        message: String,
    },
    /// The backup had not acknowledged every record when
    /// [`PrimaryLink::close`] gave up.
    #[error("the backup acknowledged {acked} of {records} records before the timeout")]
    AckTimeout {
        /// Records acknowledged.
        acked: u64,
        /// Records sent.
        records: u64,
    },
    /// The link is closed at this end (its channel thread has ended
    /// without recording another failure).
    #[error("the log channel is closed")]
    Closed,
    /// The backup said it could not reproduce the primary's execution: its
    /// replay diverged at this exit (it ends right after saying so).
    #[error("the backup diverged at exit {exit}: {what}")]
    Diverged {
        /// The exit at which the backup's replay parted from the log.
        exit: u64,
        /// The backup's description of the divergence.
        what: String,
    },
    /// Reading or writing the socket failed in a way not covered above.
    #[error("log channel I/O")]
    Io(#[source] Arc<io::Error>),
}

/// What was wrong with bytes that [`LinkFailure::Corrupt`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    /// A frame's payload does not match its CRC.
    Checksum,
    /// A length prefix above the limit (a corrupt length, most likely).
    TooLarge {
        /// The length it claims.
        len: u64,
    },
    /// A record frame runs past the end of its batch.
    Truncated,
    /// A batch holds a different number of records than its prefix says.
    Count {
        /// The count in the prefix.
        announced: u32,
        /// Records found (at least this many, if more than announced).
        found: u32,
    },
    /// A frame passed its CRC but its payload does not decode.
    Undecodable(postcard::Error),
    /// A frame's payload decoded with bytes left over.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A message with no body at all.
    Empty,
    /// A batch's flag bits (the top two of its count word) are neither
    /// both clear nor both set ([`ACK_NOW`]): one flipped bit.
    Flags {
        /// The count word as read.
        word: u32,
    },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Checksum => f.write_str("checksum mismatch"),
            Corruption::TooLarge { len } => write!(f, "a length of {len} bytes, above the limit"),
            Corruption::Truncated => f.write_str("a frame cut short inside its batch"),
            Corruption::Flags { word } => {
                write!(
                    f,
                    "a batch count word {word:#010x} with one of its two flag bits"
                )
            }
            Corruption::Count { announced, found } => {
                write!(f, "{found} records in a batch announced with {announced}")
            }
            Corruption::Undecodable(e) => write!(f, "an undecodable frame ({e})"),
            Corruption::TrailingBytes { extra } => {
                write!(f, "a frame with {extra} bytes after its value")
            }
            Corruption::Empty => f.write_str("an empty message"),
        }
    }
}

/// Names the bad frame of a [`LinkFailure::Corrupt`]: "record 5" or "a
/// message".
struct What(Option<u64>);

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(seq) => write!(f, "record {seq}"),
            None => f.write_str("a message"),
        }
    }
}

impl LinkFailure {
    /// A failure of the stream to or from `peer`: the peer going away is
    /// [`LinkFailure::PeerClosed`], anything else [`LinkFailure::Io`].
    fn io(e: io::Error, peer: Role) -> LinkFailure {
        use io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                LinkFailure::PeerClosed { peer }
            }
            _ => LinkFailure::Io(Arc::new(e)),
        }
    }

    /// A frame that [`crate::log`] refused, at `offset` in the stream.
    fn corrupt(e: log::Error, offset: u64, seq: Option<u64>) -> LinkFailure {
        let cause = match e {
            log::Error::SequenceGap { expected, found } => {
                return LinkFailure::SequenceGap {
                    expected,
                    got: found,
                }
            }
            log::Error::Checksum { .. } => Corruption::Checksum,
            log::Error::TooLarge { len, .. } => Corruption::TooLarge { len },
            log::Error::Decode { source, .. } => Corruption::Undecodable(source),
            log::Error::TrailingBytes { extra, .. } => Corruption::TrailingBytes { extra },
            log::Error::Truncated { .. } => Corruption::Truncated,
            // Header, stream and writer errors: decoding one frame from a
            // buffer gives none of them.
            other => return LinkFailure::Io(Arc::new(io::Error::other(other))),
        };
        LinkFailure::Corrupt { offset, seq, cause }
    }
}

/// Which end of the channel a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Primary => Role::Backup,
            Role::Backup => Role::Primary,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        })
    }
}
/// What each side says about itself; the two must agree on everything but
/// the role before any record flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub role: Role,
    pub vm_id: String,
    pub image_hash: [u8; 32],
    pub machine: String,
    pub epoch: u64,
    /// The backup joins a VM that is already running (it receives the
    /// VM's state before the log), rather than booting with its primary.
    pub join: bool,
}

impl Hello {
    /// Why `theirs` cannot pair with `self`, if it cannot.
    pub fn mismatch(&self, theirs: &Hello) -> Option<String> {
        let short = |h: &[u8; 32]| {
            h[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        if theirs.protocol != self.protocol {
            return Some(format!(
                "protocol version {} is not ours ({})",
                theirs.protocol, self.protocol
            ));
        }
        if theirs.role == self.role {
            return Some(format!("the peer is also a {:?}", theirs.role));
        }
        if theirs.vm_id != self.vm_id {
            return Some(format!(
                "VM id {:?} does not match ours ({:?})",
                theirs.vm_id, self.vm_id
            ));
        }
        if theirs.image_hash != self.image_hash {
            return Some(format!(
                "image {} does not match ours ({})",
                short(&theirs.image_hash),
                short(&self.image_hash)
            ));
        }
        if theirs.machine != self.machine {
            return Some(format!(
                "machine {:?} does not match ours ({:?})",
                theirs.machine, self.machine
            ));
        }
        if theirs.join != self.join {
            let what = |j: bool| {
                if j {
                    "joins a running VM"
                } else {
                    "pairs from boot"
                }
            };
            return Some(format!(
                "the peer {} but this side {}",
                what(theirs.join),
                what(self.join)
            ));
        }
        // Epoch 0 on a backup means "adopt the primary's" (the primary got
        // it from the arbiter's new_epoch).
        if theirs.epoch != self.epoch && theirs.epoch != 0 && self.epoch != 0 {
            return Some(format!(
                "epoch {} does not match ours ({})",
                theirs.epoch, self.epoch
            ));
        }
        None
    }
}

/// Messages on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Message {
    Hello(Hello),
    Welcome,
    Refuse {
        reason: String,
    },
    /// Never encoded: its tag, [`RECORDS_TAG`], marks a record batch,
    /// which is not postcard (see the module docs). It keeps its place so
    /// that no control message has that tag.
    RecordsTag,
    /// `received`: the highest contiguous sequence number received.
    Ack {
        received: Option<u64>,
        replayed_exit: u64,
    },
    Heartbeat {
        replayed_exit: u64,
    },
    Bye,
    /// The rest are a join's ([`crate::join`]), survivor to joiner, before
    /// any record: the join is accepted and the pair will have this epoch.
    JoinOffer {
        epoch: u64,
    },
    /// Guest pages `first..`, 4 KiB each, back to back.
    Pages {
        first: u64,
        data: Vec<u8>,
    },
    /// Guest pages `first..first + count` are all zero.
    Zeros {
        first: u64,
        count: u64,
    },
    /// A pre-copy round ended after sending `pages` pages.
    Round {
        round: u32,
        pages: u64,
    },
    /// The last dirty pages were sent: this is the state to resume from.
    Handover(crate::join::Handover),
    /// Backup to primary, its last message: replay diverged at `exit`
    /// (`what`, at most [`MAX_DIVERGED_TEXT`] bytes). A primary that
    /// verifies outputs must then release none of those it holds.
    Diverged {
        exit: u64,
        what: String,
    },
}

/// `text` cut to at most [`MAX_DIVERGED_TEXT`] bytes, at a character
/// boundary.
fn bounded_text(text: &str) -> String {
    let mut end = text.len().min(MAX_DIVERGED_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Timing and buffer limits of a link.
#[derive(Debug, Clone, Copy)]
pub struct ChannelConfig {
    /// How often each side sends a heartbeat when it has nothing else to say.
    pub heartbeat: Duration,
    /// Silence longer than this is a failure of the peer.
    pub timeout: Duration,
    /// Records the primary may have unacknowledged before its vCPU waits.
    pub max_unacked: u64,
    /// Records the backup buffers before it stops reading the socket.
    pub backup_queue: usize,
    /// A batch that does not ask for its ack ([`ACK_NOW`]) is still acked
    /// at once if the backup has sent nothing for this long: acks are
    /// then what tells the primary how far the backup executed, which its
    /// lag bound (a few ms) waits on. A busy guest's 1 ms flushes are
    /// acked as before; what is saved is the ack of a flush right behind
    /// another message (the flush when a guest idles just after its reply
    /// went out, say).
    pub ack_late: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            max_unacked: 200_000,
            backup_queue: 65_536,
            ack_late: Duration::from_micros(500),
        }
    }
}

/// Shared, thread-safe view of a link: what it has sent, what is acked, how
/// far the backup has replayed, and whether it failed.
#[derive(Default)]
pub struct LinkState {
    inner: Mutex<LinkCounters>,
    changed: Condvar,
    /// Called on the channel thread whenever the backup reports progress,
    /// so that lag is measured when the report arrives, not when polled.
    on_progress: Mutex<Option<ProgressHook>>,
    /// Called on the primary's channel thread as soon as an ack raises
    /// [`LinkCounters::acked`], so that held output can leave from there
    /// instead of waiting for another thread to wake (see
    /// [`LinkState::on_ack`]).
    on_ack: Mutex<Option<AckHook>>,
    /// Called on the backup's channel thread with how long each ack took
    /// from its batch's last byte read to the ack written.
    on_ack_sent: Mutex<Option<TurnaroundHook>>,
    /// When the primary's channel thread finished writing each batch not
    /// yet acknowledged: (records sent through it, when), oldest first.
    written: Mutex<std::collections::VecDeque<(u64, Instant)>>,
    /// The longest wait for the peer's bytes so far.
    watch: Liveness,
    /// The backup's writer has written its [`Message::Diverged`].
    told_diverged: AtomicBool,
}

/// See [`LinkState::on_progress`].
pub type ProgressHook = Box<dyn Fn(u64) + Send>;
/// See [`LinkState::on_ack`]: the new acked count and when the ack was read.
pub type AckHook = Box<dyn Fn(u64, Instant) + Send>;
/// See [`LinkState::on_ack_sent`].
pub type TurnaroundHook = Box<dyn Fn(Duration) + Send>;

/// Batches remembered for [`LinkState::written_at`]: more unacknowledged
/// batches than this means the backup is far behind, and the oldest
/// timings are dropped rather than kept without bound.
const WRITTEN_HISTORY: usize = 4096;

impl std::fmt::Debug for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkState")
            .field("counters", &self.snapshot())
            .finish()
    }
}

/// A snapshot of a link's counters.
#[derive(Debug, Clone, Default)]
pub struct LinkCounters {
    /// Records acknowledged by the backup (highest contiguous seq + 1).
    pub acked: u64,
    /// Records sent (primary) or received (backup).
    pub records: u64,
    /// Bytes of record frames sent or received.
    pub record_bytes: u64,
    /// The backup's last reported executed exit.
    pub replayed_exit: u64,
    /// Why the link failed, if it did (the first failure noticed).
    pub failure: Option<LinkFailure>,
    /// When the failure was noticed, to report detection delays.
    pub failed_at: Option<Instant>,
    /// The peer said goodbye cleanly.
    pub closed: bool,
}

impl LinkState {
    fn update(&self, f: impl FnOnce(&mut LinkCounters)) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c);
        self.changed.notify_all();
    }

    fn fail(&self, why: LinkFailure) {
        self.update(|c| {
            if c.failure.is_none() && !c.closed {
                c.failure = Some(why);
                c.failed_at = Some(Instant::now());
            }
        });
    }

    /// Why nothing more can be written, if nothing can: the link failed,
    /// or it closed (a Bye).
    fn ended(&self) -> Option<LinkFailure> {
        let c = self.snapshot();
        c.failure.or(c.closed.then_some(LinkFailure::Closed))
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> LinkCounters {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The failure, if the link failed.
    pub fn failure(&self) -> Option<LinkFailure> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failure
            .clone()
    }

    /// Blocks until `pred` holds, the link fails, or `timeout` passes, and
    /// returns the counters at that moment; the caller tells which from
    /// them (`pred` again, [`LinkCounters::failure`]). `pred` is evaluated
    /// under the state's lock whenever the counters change, so it must be
    /// cheap and must not touch this `LinkState`.
    ///
    /// The wait ends early only for a change of the counters; nothing else
    /// (a stop request, a signal) wakes it. A caller that must stay
    /// responsive to such a request calls this in a loop with a short
    /// `timeout` (tens of milliseconds) and checks its own flag between
    /// calls: a timeout costs nothing but the wake-up.
    pub fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&LinkCounters) -> bool,
    ) -> LinkCounters {
        let deadline = Instant::now() + timeout;
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while !pred(&c) && c.failure.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            c = self
                .changed
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        c.clone()
    }

    /// The backup records how far it has executed; it goes out with the
    /// next ack or heartbeat.
    pub fn set_replayed_exit(&self, exit: u64) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.replayed_exit = exit;
    }

    /// Installs the hook called with the backup's executed exit each time
    /// it reports one (primary side).
    pub fn on_progress(&self, hook: ProgressHook) {
        *self.on_progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Installs the hook the primary's channel thread calls, with the new
    /// acked count and when that ack was read, each time an ack raises
    /// it. The hook runs on the thread that reads acks and sends
    /// heartbeats, so it must never block (it may take a lock that is
    /// only held briefly).
    pub fn on_ack(&self, hook: AckHook) {
        *self.on_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Installs the hook the backup's channel thread calls with each
    /// ack's turnaround (its batch fully read to the ack written).
    pub fn on_ack_sent(&self, hook: TurnaroundHook) {
        *self.on_ack_sent.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// When the primary's channel thread finished writing the batch that
    /// took the records sent to at least `records`, if it is still
    /// remembered (it is until an ack covers it).
    pub fn written_at(&self, records: u64) -> Option<Instant> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(through, _)| *through >= records)
            .map(|(_, at)| *at)
    }

    /// The longest this side has waited for the peer's next bytes since
    /// the link opened (see [`read_full`]): how close a healthy link came
    /// to [`ChannelConfig::timeout`].
    pub fn longest_wait(&self) -> Duration {
        Duration::from_micros(self.watch.longest_wait_us.load(Ordering::Relaxed))
    }

    fn batch_written(&self, through: u64, at: Instant) {
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() == WRITTEN_HISTORY {
            w.pop_front();
        }
        w.push_back((through, at));
    }

    /// An ack for `acked` records, read at `at`: counts it, then lets the
    /// hook release output, then forgets the batches it covers.
    fn acked(&self, acked: u64, at: Instant) {
        let mut raised = false;
        self.update(|c| {
            raised = acked > c.acked;
            c.acked = c.acked.max(acked);
        });
        if !raised {
            return;
        }
        if let Some(hook) = self
            .on_ack
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(acked, at);
        }
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        while w.front().is_some_and(|(through, _)| *through <= acked) {
            w.pop_front();
        }
    }

    fn ack_sent(&self, turnaround: Duration) {
        if let Some(hook) = self
            .on_ack_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(turnaround);
        }
    }

    fn progress(&self, exit: u64) {
        self.update(|c| c.replayed_exit = c.replayed_exit.max(exit));
        if let Some(hook) = self
            .on_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(exit);
        }
    }
}

/// Encodes a control message as one log frame into `buf` (cleared first).
fn control_message(m: &Message, buf: &mut Vec<u8>) -> Result<(), LinkFailure> {
    buf.clear();
    // Only a Hello or Refuse with megabytes of text can fail here.
    encode_frame(m, buf)
        .map_err(|e| LinkFailure::Io(Arc::new(io::Error::new(io::ErrorKind::InvalidInput, e))))
}

/// Starts a record batch in `buf` (cleared first); append record frames,
/// then [`finish_batch`].
fn start_batch(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; FRAME_PREFIX]);
    buf.push(RECORDS_TAG);
}

/// Writes the prefix of the batch in `buf` holding `count` records, which
/// the backup acknowledges at once if `ack_now`. No checksum: each record
/// frame carries its own.
fn finish_batch(buf: &mut [u8], count: u32, ack_now: bool) {
    let len = (buf.len() - FRAME_PREFIX) as u32;
    let word = count | if ack_now { ACK_NOW } else { 0 };
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..FRAME_PREFIX].copy_from_slice(&word.to_le_bytes());
}

pub(crate) async fn write_message(
    w: &mut (impl AsyncWrite + Unpin),
    m: &Message,
    buf: &mut Vec<u8>,
    peer: Role,
) -> Result<(), LinkFailure> {
    control_message(m, buf)?;
    write_bytes(w, buf, peer).await
}

/// Writes `bytes` and flushes them: a TLS session buffers what it is
/// given, and a message must leave when written (a no-op on a socket).
pub(crate) async fn write_bytes(
    w: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    peer: Role,
) -> Result<(), LinkFailure> {
    let io = |e| LinkFailure::io(e, peer);
    w.write_all(bytes).await.map_err(io)?;
    w.flush().await.map_err(io)
}

/// One message as read from the peer.
#[derive(Debug)]
enum Incoming {
    Control(Message),
    Batch(Batch),
}

/// The records of one batch, still encoded: [`Batch::next_record`] decodes
/// and checks them one at a time, each frame's CRC once.
#[derive(Debug)]
struct Batch {
    /// The record frames (the body after its tag).
    frames: Vec<u8>,
    /// Stream offset of `frames[0]`.
    offset: u64,
    /// Records the prefix announced.
    announced: u32,
    /// The primary wants the ack at once (see [`ACK_NOW`]).
    ack_now: bool,
    /// Records decoded so far.
    found: u32,
    /// Bytes of `frames` decoded so far.
    at: usize,
}

impl Batch {
    /// The next record, which must carry `*next_seq` (advanced past it), or
    /// `None` once every announced record was decoded.
    fn next_record(&mut self, next_seq: &mut u64) -> Result<Option<Record>, LinkFailure> {
        let offset = self.offset + self.at as u64;
        if self.at == self.frames.len() || self.found == self.announced {
            if self.at == self.frames.len() && self.found == self.announced {
                return Ok(None);
            }
            let found = self.found + u32::from(self.at < self.frames.len());
            return Err(LinkFailure::Corrupt {
                offset,
                seq: Some(*next_seq),
                cause: Corruption::Count {
                    announced: self.announced,
                    found,
                },
            });
        }
        match decode_record_frame(&self.frames[self.at..], *next_seq) {
            Ok(Some((rec, used))) => {
                self.at += used;
                self.found += 1;
                *next_seq += 1;
                Ok(Some(rec))
            }
            Ok(None) => Err(LinkFailure::Corrupt {
                offset,
                seq: Some(*next_seq),
                cause: Corruption::Truncated,
            }),
            Err(e) => Err(LinkFailure::corrupt(e, offset, Some(*next_seq))),
        }
    }

    /// Bytes of record frames in the batch.
    fn bytes(&self) -> u64 {
        self.frames.len() as u64
    }
}

/// Fills `buf` from `r`. With `silence`, each read waits at most that long
/// for the peer's next bytes: any byte that arrives counts as the peer
/// being alive, not only a whole message, so that a large batch still
/// arriving (a slow link, a congested one) is never mistaken for a silent
/// peer, and the limit can be short. The clock runs only while this side
/// is reading: a backup that stopped reading because its own queue is full
/// (flow control) does not blame the primary for the bytes it did not ask
/// for. A read that finds bytes already waiting (this thread was not
/// scheduled for a while, say) takes them before the limit is looked at.
async fn read_full(
    r: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
    from: Role,
    silence: Option<Duration>,
    watch: &Liveness,
) -> Result<(), LinkFailure> {
    let Some(limit) = silence else {
        return r
            .read_exact(buf)
            .await
            .map(|_| ())
            .map_err(|e| LinkFailure::io(e, from));
    };
    let mut at = 0;
    while at < buf.len() {
        let started = Instant::now();
        match tokio::time::timeout(limit, r.read(&mut buf[at..])).await {
            Err(_elapsed) => {
                return Err(LinkFailure::PeerSilent {
                    peer: from,
                    for_ms: started.elapsed().as_millis() as u64,
                })
            }
            Ok(Ok(0)) => return Err(LinkFailure::PeerClosed { peer: from }),
            Ok(Ok(n)) => {
                watch.heard(started.elapsed());
                at += n;
            }
            Ok(Err(e)) => return Err(LinkFailure::io(e, from)),
        }
    }
    Ok(())
}

/// The longest a reader waited for its peer's next bytes, so that an
/// operator (and the detection benchmark's soak) can see how close to the
/// timeout a healthy link came.
#[derive(Debug, Default)]
struct Liveness {
    longest_wait_us: std::sync::atomic::AtomicU64,
}

impl Liveness {
    fn heard(&self, waited: Duration) {
        self.longest_wait_us
            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Reads one message from `from`; `offset` counts bytes read so far, for
/// error messages. A control message's CRC is checked once, by
/// [`decode_frame`]; a batch's records are checked as they are taken.
/// `silence` bounds each wait for the peer's bytes (see [`read_full`]);
/// `None` waits forever (the handshake has its own bound, and
/// [`decode_message`] reads from memory, without a runtime's timers).
async fn read_message(
    r: &mut (impl AsyncRead + Unpin),
    offset: &mut u64,
    from: Role,
    silence: Option<Duration>,
    watch: &Liveness,
) -> Result<Incoming, LinkFailure> {
    let at = *offset;
    let mut prefix = [0u8; FRAME_PREFIX];
    read_full(r, &mut prefix, from, silence, watch).await?;
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let corrupt = |cause| LinkFailure::Corrupt {
        offset: at,
        seq: None,
        cause,
    };
    if len == 0 {
        return Err(corrupt(Corruption::Empty));
    }
    // The body's first byte tells the kind.
    let mut tag = [0u8; 1];
    read_full(r, &mut tag, from, silence, watch).await?;
    if tag[0] == RECORDS_TAG {
        if len > MAX_MESSAGE {
            return Err(corrupt(Corruption::TooLarge { len: len as u64 }));
        }
        let mut frames = vec![0u8; len - 1];
        read_full(r, &mut frames, from, silence, watch).await?;
        *offset += (FRAME_PREFIX + len) as u64;
        let word = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        let ack_now = match word & ACK_NOW {
            0 => false,
            ACK_NOW => true,
            _ => return Err(corrupt(Corruption::Flags { word })),
        };
        return Ok(Incoming::Batch(Batch {
            frames,
            offset: at + (FRAME_PREFIX + 1) as u64,
            announced: word & !ACK_NOW,
            ack_now,
            found: 0,
            at: 0,
        }));
    }
    let total = frame_len(&prefix).map_err(|e| LinkFailure::corrupt(e, at, None))?;
    let mut frame = Vec::with_capacity(total);
    frame.extend_from_slice(&prefix);
    frame.push(tag[0]);
    frame.resize(total, 0);
    read_full(r, &mut frame[FRAME_PREFIX + 1..], from, silence, watch).await?;
    *offset += total as u64;
    match decode_frame::<Message>(&frame) {
        // The reserved tag spelled as an over-long varint (0x83 0x00), which
        // postcard accepts: its first byte is not RECORDS_TAG, so it got
        // here, but no control message has that tag. Found by fuzzing.
        Ok(Some((Message::RecordsTag, _))) => Err(corrupt(Corruption::Undecodable(
            postcard::Error::DeserializeBadEnum,
        ))),
        Ok(Some((m, _))) => Ok(Incoming::Control(m)),
        // `frame` holds the whole frame, so this cannot happen.
        Ok(None) => Err(corrupt(Corruption::Truncated)),
        Err(e) => Err(LinkFailure::corrupt(e, at, None)),
    }
}

/// Reads one control message; a batch here is [`LinkFailure::Unexpected`].
pub(crate) async fn read_control(
    r: &mut (impl AsyncRead + Unpin),
    offset: &mut u64,
    from: Role,
    expected: &str,
) -> Result<Message, LinkFailure> {
    match read_message(r, offset, from, None, &Liveness::default()).await? {
        Incoming::Control(m) => Ok(m),
        Incoming::Batch(b) => Err(LinkFailure::Unexpected {
            from,
            message: format!("a batch of {} records ({expected} expected)", b.announced),
        }),
    }
}

/// One wire message as [`decode_message`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireMessage {
    /// A control message (Hello, Ack, Heartbeat, ...).
    Control(ControlMessage),
    /// A record batch, every record decoded and checked, and whether it
    /// asks for its ack at once.
    Batch { records: Vec<Record>, ack_now: bool },
}

/// A control message, opaque: the protocol's message types stay private,
/// and a caller outside the channel only compares or re-encodes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMessage(Message);

impl WireMessage {
    /// The bytes a sender puts on the wire for this message: a control
    /// message as one log frame, a batch as its prefix, tag and the
    /// records' frames. For every message [`decode_message`] returns this
    /// decodes to the same message; it equals the bytes decoded when they
    /// were canonical postcard (postcard also accepts over-long varints).
    pub fn encode(&self) -> log::Result<Vec<u8>> {
        let mut buf = Vec::new();
        match self {
            WireMessage::Control(ControlMessage(m)) => encode_frame(m, &mut buf)?,
            WireMessage::Batch { records, ack_now } => {
                start_batch(&mut buf);
                for r in records {
                    encode_frame(r, &mut buf)?;
                }
                finish_batch(&mut buf, records.len() as u32, *ack_now);
            }
        }
        Ok(buf)
    }
}

/// Decodes the wire message at the start of `buf` exactly as the backup's
/// reader decodes one from its socket (the same code runs, over the slice),
/// and for a batch checks each record, the first of which must carry
/// `next_seq`. Returns the message and the bytes it used. A `buf` that ends
/// inside the message gives [`LinkFailure::PeerClosed`], as a socket closing
/// there does.
///
/// The link itself does not call this: it is the pure entry point for the
/// fuzz target in `logchannel/fuzz`, so that the decoder of untrusted bytes
/// can be exercised without sockets or a runtime.
pub fn decode_message(buf: &[u8], next_seq: u64) -> Result<(WireMessage, usize), LinkFailure> {
    let mut input = buf;
    let mut offset = 0;
    let polled = {
        let watch = Liveness::default();
        let read = std::pin::pin!(read_message(
            &mut input,
            &mut offset,
            Role::Primary,
            None,
            &watch
        ));
        // Reading from a slice never waits, so one poll finishes the future.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(read, &mut cx)
    };
    let incoming = match polled {
        std::task::Poll::Ready(result) => result?,
        std::task::Poll::Pending => {
            return Err(LinkFailure::Io(Arc::new(io::Error::other(
                "reading from a slice was pending",
            ))))
        }
    };
    let used = buf.len() - input.len();
    let message = match incoming {
        Incoming::Control(m) => WireMessage::Control(ControlMessage(m)),
        Incoming::Batch(mut batch) => {
            let mut seq = next_seq;
            let mut records = Vec::new();
            while let Some(r) = batch.next_record(&mut seq)? {
                records.push(r);
            }
            WireMessage::Batch {
                records,
                ack_now: batch.ack_now,
            }
        }
    };
    Ok((message, used))
}

/// Exchanges Hellos; the backup side decides and answers Welcome/Refuse.
async fn handshake(
    rd: &mut Reader,
    wr: &mut Writer,
    ours: &Hello,
    offset: &mut u64,
) -> Result<Hello, Error> {
    let peer = ours.role.peer();
    let unexpected = |m: Message, expected: &str| {
        Error::Failed(LinkFailure::Unexpected {
            from: peer,
            message: format!("{m:?} ({expected} expected)"),
        })
    };
    let mut buf = Vec::new();
    write_message(wr, &Message::Hello(ours.clone()), &mut buf, peer)
        .await
        .map_err(Error::Failed)?;
    let theirs = match read_control(rd, offset, peer, "Hello")
        .await
        .map_err(Error::Failed)?
    {
        Message::Hello(h) => h,
        Message::Refuse { reason } => return Err(Error::Refused(reason)),
        other => return Err(unexpected(other, "Hello")),
    };
    let problem = ours.mismatch(&theirs);
    match ours.role {
        Role::Backup => {
            if let Some(reason) = problem {
                let refuse = Message::Refuse {
                    reason: reason.clone(),
                };
                let _ = write_message(wr, &refuse, &mut buf, peer).await;
                let _ = wr.shutdown().await;
                return Err(Error::Mismatch(reason));
            }
            write_message(wr, &Message::Welcome, &mut buf, peer)
                .await
                .map_err(Error::Failed)?;
            Ok(theirs)
        }
        Role::Primary => match read_control(rd, offset, peer, "Welcome")
            .await
            .map_err(Error::Failed)?
        {
            Message::Welcome => match problem {
                // The backup accepted a peer we do not accept: say so.
                Some(reason) => Err(Error::Mismatch(reason)),
                None => Ok(theirs),
            },
            Message::Refuse { reason } => Err(Error::Refused(reason)),
            other => Err(unexpected(other, "Welcome")),
        },
    }
}

/// The bytes a TLS connection opens with: a handshake record (22) of
/// version 3.x. `None`: too few bytes yet to tell.
///
/// A Duet control message opens with its length, little-endian: for these
/// three bytes to start one it would have to be 66,326 bytes long or
/// longer, which no Hello (nor any control message) is.
fn opens_like_tls(first: &[u8]) -> Option<bool> {
    const RECORD: [u8; 2] = [0x16, 0x03];
    let known = first.len().min(2);
    if first[..known] != RECORD[..known] {
        return Some(false);
    }
    first.get(2).map(|minor| (0x01..=0x04).contains(minor))
}

/// Waits for the peer's first bytes (a peer always speaks first to a
/// backup) and tells whether they open a TLS handshake, without consuming
/// them.
async fn peer_opens_with_tls(stream: &TcpStream, peer: Role) -> Result<bool, Error> {
    let mut first = [0u8; 3];
    loop {
        let n = stream
            .peek(&mut first)
            .await
            .map_err(|e| Error::Failed(LinkFailure::io(e, peer)))?;
        if n == 0 {
            return Err(Error::Failed(LinkFailure::PeerClosed { peer }));
        }
        if let Some(tls) = opens_like_tls(&first[..n]) {
            return Ok(tls);
        }
        // One or two bytes so far: the rest is on its way.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The TLS error inside an I/O error from tokio-rustls, if there is one.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A failed TLS handshake with `peer` as an [`Error`].
fn tls_failure(e: io::Error, peer: Role) -> Error {
    use io::ErrorKind::*;
    match rustls_error(&e) {
        // Bytes that are not TLS records at all.
        Some(rustls::Error::InvalidMessage(_)) => Error::PeerNotTls { peer },
        Some(r) => Error::TlsHandshake {
            peer,
            reason: tls::explain(r, &peer.to_string()),
        },
        None => Error::TlsHandshake {
            peer,
            reason: match e.kind() {
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                    format!("the {peer} closed the connection")
                }
                _ => e.to_string(),
            },
        },
    }
}

/// Over TLS, a read that failed on a TLS alert (the backup refusing our
/// certificate surfaces as one, after the client's side of the handshake
/// is done) is a TLS failure, not a broken link.
fn tls_alert(e: Error, peer: Role) -> Error {
    if let Error::Failed(LinkFailure::Io(io)) = &e {
        if let Some(r) = rustls_error(io) {
            return Error::TlsHandshake {
                peer,
                reason: tls::explain(r, &peer.to_string()),
            };
        }
    }
    e
}

/// How much of the peer's bytes one read takes into the reader's buffer.
///
/// A message is read as its prefix, its tag and its body; unbuffered that
/// was three `recvfrom` calls (and a fourth that found nothing) for every
/// ack, report and heartbeat, on the channel thread that preempts a vCPU
/// each time it wakes. Buffered, one read takes whatever has arrived.
const READ_BUFFER: usize = 64 * 1024;

/// The link's reading half, buffered (see [`READ_BUFFER`]).
fn buffered(r: impl AsyncRead + Unpin + Send + 'static) -> Reader {
    Box::new(tokio::io::BufReader::with_capacity(READ_BUFFER, r))
}

/// Splits a stream into the link's boxed halves.
fn halves<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(s: S) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(s);
    (buffered(r), Box::new(w))
}

/// A connected socket, made a link: TLS if `security` says so (the
/// backup's side first checks that the peer speaks what it expects), then
/// the Hellos. Returns the halves, the bytes read so far, and the peer's
/// Hello.
pub(crate) async fn establish(
    stream: TcpStream,
    hello: &Hello,
    security: &Security,
) -> Result<(Reader, Writer, u64, Hello), Error> {
    let peer = hello.role.peer();
    stream.set_nodelay(true)?;
    let backup = hello.role == Role::Backup;
    if backup {
        let tls = peer_opens_with_tls(&stream, peer).await?;
        match (security, tls) {
            (Security::Plaintext, true) => {
                // Plain bytes to a TLS client: it reports "not TLS".
                let mut stream = stream;
                let refuse = Message::Refuse {
                    reason: "this backup has no TLS credentials".into(),
                };
                let _ = write_message(&mut stream, &refuse, &mut Vec::new(), peer).await;
                let _ = stream.shutdown().await;
                return Err(Error::PeerSpeaksTls { peer });
            }
            (Security::Tls(_), false) => {
                // A plaintext primary reads this as a refusal, with why.
                let mut stream = stream;
                let refuse = Message::Refuse {
                    reason: "this backup requires mutual TLS and the primary spoke plaintext (give the primary --tls-ca, --tls-cert and --tls-key)".into(),
                };
                let _ = write_message(&mut stream, &refuse, &mut Vec::new(), peer).await;
                let _ = stream.shutdown().await;
                return Err(Error::PeerNotTls { peer });
            }
            _ => {}
        }
    }
    let (mut rd, mut wr) = match security {
        Security::Plaintext => {
            let (r, w) = stream.into_split();
            (buffered(r), Box::new(w) as Writer)
        }
        Security::Tls(id) => {
            let name = tls::vm_name(&hello.vm_id);
            if backup {
                let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config(&[&name])?);
                halves(
                    acceptor
                        .accept(stream)
                        .await
                        .map_err(|e| tls_failure(e, peer))?,
                )
            } else {
                let connector = tokio_rustls::TlsConnector::from(id.client_config()?);
                halves(
                    connector
                        .connect(tls::server_name(&name)?, stream)
                        .await
                        .map_err(|e| tls_failure(e, peer))?,
                )
            }
        }
    };
    let mut offset = 0;
    let theirs = handshake(&mut rd, &mut wr, hello, &mut offset)
        .await
        .map_err(|e| match security {
            Security::Tls(_) => tls_alert(e, peer),
            Security::Plaintext => e,
        })?;
    Ok((rd, wr, offset, theirs))
}

/// [`establish`] within [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn establish_bounded(
    stream: TcpStream,
    hello: &Hello,
    security: &Security,
) -> Result<(Reader, Writer, u64, Hello), Error> {
    establish_within(stream, hello, security, HANDSHAKE_TIMEOUT).await
}

/// [`establish`] within `limit`.
async fn establish_within(
    stream: TcpStream,
    hello: &Hello,
    security: &Security,
    limit: Duration,
) -> Result<(Reader, Writer, u64, Hello), Error> {
    let peer = hello.role.peer();
    tokio::time::timeout(limit, establish(stream, hello, security))
        .await
        .unwrap_or(Err(Error::HandshakeTimeout { peer }))
}

/// An error and its sources on one line ("a: b: c"), for places that keep
/// an error as text.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A batch of record frames on its way to the channel thread, with its
/// record count and whether it asks for its ack at once.
/// The primary's end: a blocking handle for the vCPU thread, which writes
/// its batches to the socket itself (see the `writer` module); the channel
/// thread reads acks and reports, and heartbeats.
pub struct PrimaryLink {
    writer: Arc<SharedWriter>,
    /// Dropped (by [`PrimaryLink::close`]) once the last batch is written:
    /// the channel thread then says Bye.
    closing: Option<tokio::sync::oneshot::Sender<()>>,
    state: Arc<LinkState>,
    config: ChannelConfig,
    thread: Option<JoinHandle<()>>,
    stop: Option<Arc<AtomicBool>>,
}

impl PrimaryLink {
    /// Connects to the backup (retrying until `connect_timeout`), and
    /// completes the handshake before returning, so that the guest does not
    /// start until the backup is there to receive record 0. Plaintext; see
    /// [`PrimaryLink::connect_with`].
    pub fn connect(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        connect_timeout: Duration,
    ) -> Result<PrimaryLink, Error> {
        Self::connect_with(addr, hello, config, connect_timeout, &Security::Plaintext)
    }

    /// Like [`PrimaryLink::connect`], protected as `security` says. Only
    /// reaching the backup is retried; a handshake that fails (TLS or
    /// Hello) is an error at once, and one that stalls ends after
    /// [`HANDSHAKE_TIMEOUT`].
    pub fn connect_with(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        connect_timeout: Duration,
        security: &Security,
    ) -> Result<PrimaryLink, Error> {
        let rt = runtime()?;
        let stream = rt.block_on(async {
            let deadline = Instant::now() + connect_timeout;
            loop {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Error::Connect { addr, source: e })
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })?;
        let (rd, wr, offset, _backup) = rt.block_on(establish_bounded(stream, &hello, security))?;
        Self::start(rt, (rd, wr, offset), config, 0)
    }

    /// Runs the link over an established stream (halves and bytes read so
    /// far), whose first record will carry `first_seq`: 0 for a pair that
    /// boots together, the next record's number for a backup that joined
    /// a running VM.
    pub(crate) fn start(
        rt: tokio::runtime::Runtime,
        (rd, wr, offset): (Reader, Writer, u64),
        config: ChannelConfig,
        first_seq: u64,
    ) -> Result<PrimaryLink, Error> {
        let state = Arc::new(LinkState::default());
        state.update(|c| {
            c.records = first_seq;
            c.acked = first_seq;
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let writer = SharedWriter::new(wr, Role::Backup);
        let (st, wr) = (state.clone(), writer.clone());
        let thread = std::thread::Builder::new()
            .name("logchannel-primary".into())
            .spawn(move || {
                crate::sched::promote_current_thread();
                rt.block_on(primary_io(rd, wr, rx, st, config, offset))
            })?;
        Ok(PrimaryLink {
            writer,
            closing: Some(tx),
            state,
            config,
            thread: Some(thread),
            stop: None,
        })
    }

    /// A flag that, once raised (an operator's SIGTERM, say), makes a
    /// [`PrimaryLink::send`] blocked on flow control return
    /// [`Error::Interrupted`] within a few tens of milliseconds.
    pub fn set_stop_flag(&mut self, stop: Arc<AtomicBool>) {
        self.stop = Some(stop);
    }

    /// Shared counters (for the Output Rule, metrics and failure checks).
    pub fn state(&self) -> Arc<LinkState> {
        self.state.clone()
    }

    /// Sends a batch of `records` record frames (made with
    /// [`encode_frame`], numbered on from the last batch's), `bytes` long
    /// for the counters; `ack_now`: something waits on its ack (an output),
    /// so the backup acknowledges it at once, not with its next report.
    /// It may hold no records, to ask for the ack of those sent before.
    /// Blocks while the send queue is full or too many
    /// records are unacknowledged: that is the flow control. The frames go
    /// on the wire as they are; their CRCs are not computed again.
    pub fn send(
        &self,
        frames: Vec<u8>,
        records: u64,
        bytes: u64,
        ack_now: bool,
    ) -> Result<(), Error> {
        if frames.len() > MAX_SEND {
            return Err(Error::TooLarge { len: frames.len() });
        }
        if let Some(f) = self.state.failure() {
            return Err(Error::Failed(f));
        }
        let sent = {
            let mut c = self.state.inner.lock().unwrap_or_else(|e| e.into_inner());
            c.records += records;
            c.record_bytes += bytes;
            c.records
        };
        let max = self.config.max_unacked;
        let room = |c: &LinkCounters| sent.saturating_sub(c.acked) <= max;
        loop {
            // No limit but the link's own failure detection: a backup that
            // stops acknowledging is a failed backup.
            let c = self.state.wait_until(STOP_SLICE, room);
            if let Some(f) = c.failure {
                return Err(Error::Failed(f));
            }
            if room(&c) {
                break;
            }
            if self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                return Err(Error::Interrupted);
            }
        }
        if let Some(why) = self.ended() {
            return Err(Error::Failed(why));
        }
        let mut msg = Vec::with_capacity(FRAME_PREFIX + 1 + frames.len());
        start_batch(&mut msg);
        msg.extend_from_slice(&frames);
        finish_batch(&mut msg, records as u32, ack_now);
        match self.writer.write_blocking(&msg, || self.ended()) {
            Ok(()) => {
                self.state.batch_written(sent, Instant::now());
                Ok(())
            }
            Err(why) => Err(Error::Failed(self.write_failed(why))),
        }
    }

    /// Why no batch can be written any more, if none can: the link failed,
    /// or it closed (at our end, or by the backup's Bye).
    fn ended(&self) -> Option<LinkFailure> {
        if self.closing.is_none() {
            return Some(LinkFailure::Closed);
        }
        self.state.ended()
    }

    /// A batch could not be written: the channel thread's reader decides
    /// why if it can (a backup that diverged said so just before closing
    /// its end, and that must win, since a verifying primary halts on it
    /// instead of going on alone); otherwise the write's own failure.
    fn write_failed(&self, why: LinkFailure) -> LinkFailure {
        let c = self
            .state
            .wait_until(LAST_WORDS * 2, |c| c.failure.is_some() || c.closed);
        match c.failure {
            Some(f) => f,
            None if c.closed => LinkFailure::Closed,
            None => {
                self.state.fail(why.clone());
                self.state.failure().unwrap_or(why)
            }
        }
    }

    /// Sends Bye after the last batch and waits (up to `timeout`) until the
    /// backup has acknowledged everything, so that it can finish its replay.
    pub fn close(mut self, timeout: Duration) -> Result<(), Error> {
        self.closing.take();
        let c = self.state.wait_until(timeout, |c| c.acked >= c.records);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match c.failure {
            Some(f) if c.acked < c.records => Err(Error::Failed(f)),
            _ if c.acked < c.records => Err(Error::Failed(LinkFailure::AckTimeout {
                acked: c.acked,
                records: c.records,
            })),
            _ => Ok(()),
        }
    }
}

pub(crate) async fn primary_io(
    mut rd: Reader,
    wr: Arc<SharedWriter>,
    mut closing: tokio::sync::oneshot::Receiver<()>,
    state: Arc<LinkState>,
    config: ChannelConfig,
    mut offset: u64,
) {
    const PEER: Role = Role::Backup;
    let reader_state = state.clone();
    let reader = async move {
        loop {
            let msg = read_message(
                &mut rd,
                &mut offset,
                PEER,
                Some(config.timeout),
                &reader_state.watch,
            )
            .await;
            let msg = match msg {
                Err(f) => return Err(f),
                Ok(Incoming::Control(m)) => m,
                Ok(Incoming::Batch(b)) => {
                    return Err(LinkFailure::Unexpected {
                        from: PEER,
                        message: format!("a batch of {} records", b.announced),
                    })
                }
            };
            match msg {
                Message::Ack {
                    received,
                    replayed_exit,
                } => {
                    // Output waits on this: release it before anything else.
                    reader_state.acked(received.map_or(0, |s| s + 1), Instant::now());
                    reader_state.progress(replayed_exit);
                }
                Message::Heartbeat { replayed_exit } => reader_state.progress(replayed_exit),
                Message::Bye => return Ok(()),
                Message::Diverged { exit, what } => {
                    return Err(LinkFailure::Diverged {
                        exit,
                        what: bounded_text(&what),
                    })
                }
                other => {
                    return Err(LinkFailure::Unexpected {
                        from: PEER,
                        message: format!("{other:?}"),
                    })
                }
            }
        }
    };
    let writer = async move {
        let mut buf = Vec::new();
        let mut tick = tokio::time::interval(config.heartbeat);
        let mut send = |m: Message| {
            let bytes = control_message(&m, &mut buf).map(|()| buf.clone());
            let wr = &wr;
            async move { wr.write(&bytes?).await }
        };
        // The vCPU thread writes the batches; until it is done, only
        // heartbeats come from here.
        loop {
            tokio::select! {
                _ = &mut closing => break,
                _ = tick.tick() => send(Message::Heartbeat { replayed_exit: 0 }).await?,
            }
        }
        send(Message::Bye).await?;
        // Keep heartbeating until the backup has acked everything and said
        // Bye, which ends the reader and so this whole task.
        loop {
            tick.tick().await;
            send(Message::Heartbeat { replayed_exit: 0 }).await?;
        }
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    let result: Result<(), LinkFailure> = tokio::select! {
        r = &mut reader => r,
        r = &mut writer => match r {
            // A backup that diverged sends Diverged and ends: a write of
            // ours may fail on its closed socket before the reader got to
            // that last message, which is still there to read. It must
            // win, since a verifying primary halts on it instead of going
            // on alone.
            Err(why) => match tokio::time::timeout(LAST_WORDS, &mut reader).await {
                Ok(Err(f @ LinkFailure::Diverged { .. })) => Err(f),
                _ => Err(why),
            },
            Ok(()) => Ok(()),
        },
    };
    match result {
        Ok(()) => state.update(|c| c.closed = true),
        Err(why) => state.fail(why),
    }
}

/// How long a primary whose write failed still reads, for a backup's
/// [`Message::Diverged`] sent just before it closed.
const LAST_WORDS: Duration = Duration::from_millis(200);

/// A message for the backup's writer, with when the batch it acknowledges
/// was read (for [`LinkState::on_ack_sent`]).
type Report = (Message, Option<Instant>);

/// What the backup's two writers share: the channel thread (acks asked
/// for, heartbeats, Bye, Diverged) and the vCPU thread, which writes its
/// progress reports itself (see the `writer` module: a report handed to the
/// channel thread was a wake-up, so a vCPU preempted, per report).
pub(crate) struct BackupOut {
    writer: Arc<SharedWriter>,
    /// Records received and checked (the next sequence number), set by
    /// the reader.
    received: AtomicU64,
    /// The next sequence number the primary was told we received; changed
    /// only under the writer's lock.
    acked: AtomicU64,
    /// When a message was last written, in µs since `epoch`.
    wrote_us: AtomicU64,
    epoch: Instant,
}

impl BackupOut {
    fn new(writer: Arc<SharedWriter>, first_seq: u64) -> Arc<Self> {
        Arc::new(BackupOut {
            writer,
            received: AtomicU64::new(first_seq),
            acked: AtomicU64::new(first_seq),
            wrote_us: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Encodes what `msg` becomes, given the records not acknowledged yet
    /// (called under the writer's lock, so that acks only count up): a
    /// report or heartbeat becomes their Ack (which says as much), and a
    /// Bye goes behind one. `replayed_exit`: the position a Bye's Ack says.
    fn encode(&self, mut msg: Message, replayed_exit: u64) -> Result<Vec<u8>, LinkFailure> {
        let (through, acked) = (
            self.received.load(Ordering::SeqCst),
            self.acked.load(Ordering::SeqCst),
        );
        let mut out = Vec::new();
        let mut buf = Vec::new();
        if through > acked {
            let ack = |replayed_exit| Message::Ack {
                received: through.checked_sub(1),
                replayed_exit,
            };
            if let Message::Heartbeat { replayed_exit } = msg {
                msg = ack(replayed_exit);
            } else if msg == Message::Bye {
                control_message(&ack(replayed_exit), &mut buf)?;
                out.extend_from_slice(&buf);
                self.acked.store(through, Ordering::SeqCst);
            }
        }
        if let Message::Ack {
            received: Some(r), ..
        } = msg
        {
            self.acked.fetch_max(r + 1, Ordering::SeqCst);
        }
        control_message(&msg, &mut buf)?;
        out.extend_from_slice(&buf);
        Ok(out)
    }

    fn wrote(&self) {
        let us = self.epoch.elapsed().as_micros() as u64;
        self.wrote_us.store(us, Ordering::SeqCst);
    }

    fn since_write(&self) -> Duration {
        let us = self.epoch.elapsed().as_micros() as u64;
        Duration::from_micros(us.saturating_sub(self.wrote_us.load(Ordering::SeqCst)))
    }
}

/// The backup's end: records arrive on a bounded queue; the vCPU thread
/// takes them with [`BackupLink::recv`].
pub struct BackupLink {
    records: mpsc::Receiver<Record>,
    /// A runtime of this thread's own, only to wait on `records` with a
    /// timeout ([`BackupLink::recv_timeout`]).
    waiter: tokio::runtime::Runtime,
    state: Arc<LinkState>,
    reports: mpsc::Sender<Report>,
    out: Arc<BackupOut>,
    peer: Hello,
    _thread: JoinHandle<()>,
}

impl BackupLink {
    /// Listens on `addr` and waits for a primary whose Hello matches ours.
    /// Mismatched peers are refused (both sides get the reason) and
    /// reported through `on_refused`; the backup keeps waiting for the right
    /// one.
    pub fn accept(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        on_refused: impl FnMut(&Error),
    ) -> Result<BackupLink, Error> {
        Self::accept_with(addr, hello, config, &Security::Plaintext, on_refused)
    }

    /// Like [`BackupLink::accept`], protected as `security` says. A
    /// primary that fails TLS (no credentials, another CA's, another VM's)
    /// is refused and reported like a mismatched Hello, and the backup
    /// keeps waiting.
    pub fn accept_with(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        security: &Security,
        on_refused: impl FnMut(&Error),
    ) -> Result<BackupLink, Error> {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
        Self::accept_on_with(listener, hello, config, security, on_refused)
    }

    /// Like [`BackupLink::accept`], on a listener the caller bound (to port
    /// 0, say, so that it can report the address before anyone connects).
    pub fn accept_on(
        listener: std::net::TcpListener,
        hello: Hello,
        config: ChannelConfig,
        on_refused: impl FnMut(&Error),
    ) -> Result<BackupLink, Error> {
        Self::accept_on_with(listener, hello, config, &Security::Plaintext, on_refused)
    }

    /// [`BackupLink::accept_on`] protected as `security` says.
    pub fn accept_on_with(
        listener: std::net::TcpListener,
        hello: Hello,
        config: ChannelConfig,
        security: &Security,
        mut on_refused: impl FnMut(&Error),
    ) -> Result<BackupLink, Error> {
        let rt = runtime()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (rd, wr, offset, peer) = rt.block_on(async {
            loop {
                let (stream, _peer) = listener.accept().await?;
                // One primary at a time: a would-be primary that stalls
                // holds the others back for HANDSHAKE_TIMEOUT at most.
                match establish_bounded(stream, &hello, security).await {
                    Ok(link) => return Ok::<_, Error>(link),
                    Err(e) => on_refused(&e),
                }
            }
        })?;
        Self::start(rt, (rd, wr, offset), peer, config, 0)
    }

    /// Runs the link over an established stream (see
    /// [`PrimaryLink::start`]); the first record must carry `first_seq`.
    pub(crate) fn start(
        rt: tokio::runtime::Runtime,
        (rd, wr, offset): (Reader, Writer, u64),
        peer: Hello,
        config: ChannelConfig,
        first_seq: u64,
    ) -> Result<BackupLink, Error> {
        // The backup's counters count this link's records (they are its
        // metrics); only the sequence check starts at `first_seq`.
        let state = Arc::new(LinkState::default());
        let (tx, rx) = mpsc::channel(config.backup_queue);
        let (out_tx, out_rx) = mpsc::channel::<Report>(64);
        let st = state.clone();
        let reports = out_tx.clone();
        let out = BackupOut::new(SharedWriter::new(wr, Role::Primary), first_seq);
        let io_out = out.clone();
        let thread = std::thread::Builder::new()
            .name("logchannel-backup".into())
            .spawn(move || {
                crate::sched::promote_current_thread();
                rt.block_on(backup_io(
                    rd,
                    io_out,
                    tx,
                    (out_tx, out_rx),
                    st,
                    config,
                    offset,
                ))
            })?;
        Ok(BackupLink {
            records: rx,
            waiter: runtime()?,
            state,
            reports,
            out,
            peer,
            _thread: thread,
        })
    }

    pub fn state(&self) -> Arc<LinkState> {
        self.state.clone()
    }

    /// What the primary said about itself (its epoch, notably).
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// Tells the primary at once how far this backup has executed (used
    /// when it catches up and is about to wait, so that lag is measured at
    /// that moment rather than at the next heartbeat).
    ///
    /// Written here, by the calling thread, not handed to the channel
    /// thread (see [`BackupOut`]). A write that fails is not reported: the
    /// channel thread's reader finds the link's failure.
    pub fn report_progress(&self, exit: u64) {
        self.state.set_replayed_exit(exit);
        let msg = Message::Heartbeat {
            replayed_exit: exit,
        };
        let out = &self.out;
        if self.state.ended().is_some() {
            return;
        }
        if out
            .writer
            .write_made_blocking(|| out.encode(msg, exit), || self.state.ended())
            .is_ok()
        {
            out.wrote();
        }
    }

    /// Tells the primary that this backup's replay diverged at `exit`
    /// (`what` is cut to [`MAX_DIVERGED_TEXT`] bytes), and waits up to
    /// `limit` until the message is written to the socket, since the backup
    /// ends right after. True if it was written; false if the link had
    /// failed already or the time ran out.
    pub fn report_divergence(&self, exit: u64, what: &str, limit: Duration) -> bool {
        let msg = Message::Diverged {
            exit,
            what: bounded_text(what),
        };
        if self.reports.try_send((msg, None)).is_err() {
            return false;
        }
        let told = &self.state.told_diverged;
        // An atomic, not a counter under the lock: wait_until's predicate
        // must not take the state's lock again.
        self.state
            .wait_until(limit, |_| told.load(Ordering::SeqCst));
        told.load(Ordering::SeqCst)
    }

    /// The next record, blocking until one arrives. `Ok(None)`: the primary
    /// said Bye and everything was delivered. An error: the link failed;
    /// every record that arrived intact before the failure was delivered
    /// first.
    pub fn recv(&mut self) -> Result<Option<Record>, Error> {
        match self.records.blocking_recv() {
            Some(r) => Ok(Some(r)),
            None => self.end(),
        }
    }

    /// Like [`BackupLink::recv`] but waits at most `limit`: `Ok(None)` also
    /// means "nothing yet"; check [`BackupLink::finished`]. Lets the
    /// caller look at its stop flag while the primary is quiet.
    pub fn recv_timeout(&mut self, limit: Duration) -> Result<Option<Record>, Error> {
        let next = self
            .waiter
            .block_on(async { tokio::time::timeout(limit, self.records.recv()).await });
        match next {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => self.end(),
            Err(_elapsed) => Ok(None),
        }
    }

    /// Like [`BackupLink::recv`] but never blocks: `Ok(None)` also means
    /// "nothing yet"; check [`BackupLink::finished`].
    pub fn try_recv(&mut self) -> Result<Option<Record>, Error> {
        match self.records.try_recv() {
            Ok(r) => Ok(Some(r)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => self.end(),
        }
    }

    fn end(&self) -> Result<Option<Record>, Error> {
        // The queue closes a moment before the channel thread records why.
        let c = self.state.wait_until(Duration::from_secs(2), |c| c.closed);
        match (c.failure, c.closed) {
            (Some(f), _) => Err(Error::Failed(f)),
            (None, true) => Ok(None),
            (None, false) => Err(Error::Failed(LinkFailure::Closed)),
        }
    }

    /// After a receive found nothing: `Ok(true)` once the queue is drained
    /// and the primary said Bye, `Ok(false)` while the link is open, and
    /// the failure if it ended without Bye. A drained, closed queue alone
    /// does not say which: a primary killed between a receive and this
    /// check closes it too, and taking that for Bye would let a backup
    /// believe it knew every event there would ever be.
    pub fn finished(&self) -> Result<bool, Error> {
        if !(self.records.is_closed() && self.records.is_empty()) {
            return Ok(false);
        }
        self.end().map(|_| true)
    }
}

pub(crate) async fn backup_io(
    mut rd: Reader,
    out: Arc<BackupOut>,
    records: mpsc::Sender<Record>,
    (out_tx, mut out_rx): (mpsc::Sender<Report>, mpsc::Receiver<Report>),
    state: Arc<LinkState>,
    config: ChannelConfig,
    mut offset: u64,
) {
    const PEER: Role = Role::Primary;
    let reader_state = state.clone();
    let reader_out = out.clone();
    let reader = async move {
        let mut next_seq = reader_out.received.load(Ordering::SeqCst);
        let mut decoded = Vec::new();
        loop {
            let msg = read_message(
                &mut rd,
                &mut offset,
                PEER,
                Some(config.timeout),
                &reader_state.watch,
            )
            .await?;
            let msg = match msg {
                Incoming::Batch(mut batch) => {
                    let read_at = Instant::now();
                    // Every record is checked before any is acknowledged;
                    // then the ack goes out at once, before the records
                    // join the replay queue: they are received (in this
                    // process's memory, as they would be in the queue), and
                    // the Output Rule waits on receipt, not on a queue that
                    // may be full while the vCPU catches up.
                    decoded.clear();
                    loop {
                        match batch.next_record(&mut next_seq) {
                            Ok(Some(rec)) => decoded.push(rec),
                            Ok(None) => break,
                            Err(f) => {
                                // The intact records before a bad one are
                                // still delivered (never acknowledged).
                                for rec in decoded.drain(..) {
                                    if records.send(rec).await.is_err() {
                                        break;
                                    }
                                }
                                return Err(f);
                            }
                        }
                    }
                    reader_state.update(|c| {
                        c.records += decoded.len() as u64;
                        c.record_bytes += batch.bytes();
                    });
                    reader_out.received.store(next_seq, Ordering::SeqCst);
                    if batch.ack_now || reader_out.since_write() >= config.ack_late {
                        let replayed_exit = reader_state.snapshot().replayed_exit;
                        let ack = Message::Ack {
                            received: next_seq.checked_sub(1),
                            replayed_exit,
                        };
                        if out_tx.send((ack, Some(read_at))).await.is_err() {
                            return Ok(());
                        }
                    }
                    for rec in decoded.drain(..) {
                        if records.send(rec).await.is_err() {
                            return Ok(());
                        }
                    }
                    continue;
                }
                Incoming::Control(m) => m,
            };
            match msg {
                Message::Heartbeat { .. } => {}
                Message::Bye => {
                    let _ = out_tx.send((Message::Bye, None)).await;
                    reader_state.update(|c| c.closed = true);
                    return Ok(());
                }
                other => {
                    return Err(LinkFailure::Unexpected {
                        from: PEER,
                        message: format!("{other:?}"),
                    })
                }
            }
        }
    };
    let writer_state = state.clone();
    let writer = async move {
        // The first heartbeat one period from now, not at once: it would
        // acknowledge whatever batch came first, asked or not.
        let start = tokio::time::Instant::now() + config.heartbeat;
        let mut tick = tokio::time::interval_at(start, config.heartbeat);
        loop {
            let (msg, read_at) = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return Ok(()) },
                _ = tick.tick() => (Message::Heartbeat { replayed_exit: writer_state.snapshot().replayed_exit }, None),
            };
            let bye = msg == Message::Bye;
            let diverged = matches!(msg, Message::Diverged { .. });
            let replayed_exit = writer_state.snapshot().replayed_exit;
            out.writer
                .write_made(|| out.encode(msg, replayed_exit))
                .await?;
            out.wrote();
            if diverged {
                writer_state.told_diverged.store(true, Ordering::SeqCst);
                // Wakes report_divergence, which waits on the counters.
                writer_state.update(|_| {});
            }
            if let Some(at) = read_at {
                writer_state.ack_sent(at.elapsed());
            }
            if bye {
                out.writer.shutdown().await;
                return Ok(());
            }
        }
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    tokio::select! {
        r = &mut reader => match r {
            Err(why) => state.fail(why),
            // Bye received and queued for the writer: let it say Bye back.
            Ok(()) => {
                if let Ok(Err(why)) = tokio::time::timeout(config.timeout, &mut writer).await {
                    state.fail(why);
                }
            }
        },
        w = &mut writer => {
            if let Err(why) = w {
                state.fail(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Event, Position};

    fn hello(role: Role) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            role,
            vm_id: "vm1".into(),
            image_hash: [7; 32],
            machine: "m".into(),
            epoch: 1,
            join: false,
        }
    }

    fn frames(from: u64, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in from..from + n {
            let rec = Record {
                seq,
                pos: Position {
                    exit: seq,
                    ..Position::default()
                },
                event: Event::Clock { ns: seq * 10 },
            };
            encode_frame(&rec, &mut out).unwrap();
        }
        out
    }

    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    #[test]
    fn records_flow_and_are_acked() {
        let addr = free_addr();
        let backup = std::thread::spawn(move || {
            let mut link =
                BackupLink::accept(addr, hello(Role::Backup), ChannelConfig::default(), |_| {})
                    .unwrap();
            let mut got = Vec::new();
            while let Some(r) = link.recv().unwrap() {
                got.push(r.seq);
            }
            got
        });
        let link = PrimaryLink::connect(
            addr,
            hello(Role::Primary),
            ChannelConfig::default(),
            Duration::from_secs(5),
        )
        .unwrap();
        link.send(frames(0, 10), 10, 0, false).unwrap();
        link.send(frames(10, 5), 5, 0, true).unwrap();
        let state = link.state();
        link.close(Duration::from_secs(5)).unwrap();
        assert_eq!(state.snapshot().acked, 15);
        assert_eq!(backup.join().unwrap(), (0..15).collect::<Vec<_>>());
    }

    /// A batch that asks for its ack gets it at once; any other is acked
    /// with the backup's next report (or heartbeat), which says so.
    #[test]
    fn only_a_batch_that_asks_is_acked_at_once() {
        let addr = free_addr();
        // No heartbeat within the test, and no ack for being quiet: only
        // reports and ACK_NOW ack.
        let quiet = ChannelConfig {
            heartbeat: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            ack_late: Duration::from_secs(30),
            ..ChannelConfig::default()
        };
        let (got_ten, report) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let backup = std::thread::spawn(move || {
            let mut link = BackupLink::accept(addr, hello(Role::Backup), quiet, |_| {}).unwrap();
            for _ in 0..10 {
                link.recv().unwrap().unwrap();
            }
            got_ten.0.send(()).unwrap();
            report.1.recv().unwrap();
            link.report_progress(7);
            while link.recv().unwrap().is_some() {}
        });
        let link = PrimaryLink::connect(addr, hello(Role::Primary), quiet, Duration::from_secs(5))
            .unwrap();
        let state = link.state();
        link.send(frames(0, 10), 10, 0, false).unwrap();
        got_ten.1.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(state.snapshot().acked, 0, "acked without being asked");
        report.0.send(()).unwrap();
        // The reader records the ack before the position it carries.
        let c = state.wait_until(Duration::from_secs(5), |c| {
            c.acked == 10 && c.replayed_exit == 7
        });
        assert_eq!((c.acked, c.replayed_exit), (10, 7), "the report acks");
        link.send(frames(10, 5), 5, 0, true).unwrap();
        let c = state.wait_until(Duration::from_secs(5), |c| c.acked == 15);
        assert_eq!(c.acked, 15, "an ACK_NOW batch is acked at once");
        link.close(Duration::from_secs(5)).unwrap();
        backup.join().unwrap();
    }

    #[test]
    fn mismatched_peers_are_refused_on_both_sides() {
        let addr = free_addr();
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let r2 = refusals.clone();
        std::thread::spawn(move || {
            let _ = BackupLink::accept(addr, hello(Role::Backup), ChannelConfig::default(), |e| {
                r2.lock().unwrap().push(e.to_string())
            });
        });
        let mut wrong = hello(Role::Primary);
        wrong.vm_id = "other".into();
        let err = PrimaryLink::connect(
            addr,
            wrong,
            ChannelConfig::default(),
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(
            matches!(err, Error::Refused(ref r) if r.contains("VM id")),
            "{err}"
        );
        let mut wrong = hello(Role::Primary);
        wrong.image_hash = [8; 32];
        let err = PrimaryLink::connect(
            addr,
            wrong,
            ChannelConfig::default(),
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("image"), "{err}");
        // The backup reports a refusal after sending it: give it a moment.
        let end = Instant::now() + Duration::from_secs(5);
        while refusals.lock().unwrap().len() < 2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = refusals.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].contains("VM id"));
    }

    #[test]
    fn a_silent_peer_is_a_failure() {
        let addr = free_addr();
        let config = ChannelConfig {
            heartbeat: Duration::from_secs(100),
            timeout: Duration::from_millis(200),
            ..ChannelConfig::default()
        };
        // The backup is patient; only the primary's timeout can fire.
        let patient = ChannelConfig {
            timeout: Duration::from_secs(10),
            ..config
        };
        std::thread::spawn(move || {
            let link = BackupLink::accept(addr, hello(Role::Backup), patient, |_| {}).unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(link);
        });
        let link = PrimaryLink::connect(addr, hello(Role::Primary), config, Duration::from_secs(5))
            .unwrap();
        let c = link
            .state()
            .wait_until(Duration::from_secs(2), |c| c.failure.is_some());
        let f = c.failure.unwrap();
        assert!(
            matches!(f, LinkFailure::PeerSilent { peer: Role::Backup, for_ms } if for_ms >= 200),
            "{f:?}"
        );
        assert!(f.to_string().contains("silent"), "{f}");
    }

    #[test]
    fn a_batch_arriving_slowly_is_not_silence_and_then_silence_is() {
        use std::io::Write;
        let addr = free_addr();
        let config = ChannelConfig {
            heartbeat: Duration::from_secs(100),
            timeout: Duration::from_millis(200),
            ..ChannelConfig::default()
        };
        let backup = std::thread::spawn(move || {
            BackupLink::accept(addr, hello(Role::Backup), config, |_| {}).unwrap()
        });
        let mut s = loop {
            match std::net::TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        fake_peer(Role::Primary, &mut s);
        let mut link = backup.join().unwrap();
        // One batch, in pieces 80 ms apart: 400 ms for the whole message,
        // twice the limit, but never 200 ms without a byte.
        let wire = batch_message(&frames(0, 5), 5);
        for piece in wire.chunks(wire.len().div_ceil(5)) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(80));
        }
        let mut got = Vec::new();
        let err = loop {
            match link.recv() {
                Ok(Some(r)) => got.push(r.seq),
                Ok(None) => panic!("clean end"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, (0..5).collect::<Vec<_>>());
        // Then nothing: that is silence.
        assert!(
            matches!(
                err.link_failure(),
                Some(LinkFailure::PeerSilent {
                    peer: Role::Primary,
                    ..
                })
            ),
            "{err:?}"
        );
        drop(s);
    }

    /// A whole batch message holding `frames` (`count` records).
    fn batch_message(frames: &[u8], count: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        start_batch(&mut buf);
        buf.extend_from_slice(frames);
        finish_batch(&mut buf, count, true);
        buf
    }

    /// Where each record's payload lies in the batch message of `frames`.
    fn payload_ranges(frames: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut payloads = Vec::new();
        let mut at = 0;
        while at < frames.len() {
            let len = frame_len(frames[at..at + FRAME_PREFIX].try_into().unwrap()).unwrap();
            payloads.push(FRAME_PREFIX + 1 + at + FRAME_PREFIX..FRAME_PREFIX + 1 + at + len);
            at += len;
        }
        payloads
    }

    fn control(m: &Message) -> Vec<u8> {
        let mut buf = Vec::new();
        control_message(m, &mut buf).unwrap();
        buf
    }

    /// Decodes every message in `bytes` as the backup's reader does,
    /// returning the records and the first failure (`None`: clean end).
    fn read_stream(bytes: &[u8]) -> (Vec<Record>, Option<LinkFailure>) {
        let rt = runtime().unwrap();
        let mut input = bytes;
        let mut offset = 0;
        let mut next_seq = 0;
        let mut got = Vec::new();
        while !input.is_empty() {
            match rt.block_on(read_message(
                &mut input,
                &mut offset,
                Role::Primary,
                None,
                &Liveness::default(),
            )) {
                Ok(Incoming::Control(_)) => {}
                Ok(Incoming::Batch(mut b)) => loop {
                    match b.next_record(&mut next_seq) {
                        Ok(Some(r)) => got.push(r),
                        Ok(None) => break,
                        Err(f) => return (got, Some(f)),
                    }
                },
                Err(f) => return (got, Some(f)),
            }
        }
        (got, None)
    }

    #[test]
    fn each_record_is_checksummed_once() {
        log::take_crc_count();
        let frames = frames(0, 50);
        assert_eq!(log::take_crc_count(), 50, "one CRC per record to encode");
        let mut wire = batch_message(&frames, 50);
        let hb = control(&Message::Heartbeat { replayed_exit: 9 });
        wire.extend_from_slice(&hb);
        assert_eq!(
            log::take_crc_count(),
            1,
            "none for the batch, one for the heartbeat"
        );
        let (got, failure) = read_stream(&wire);
        assert!(failure.is_none(), "{failure:?}");
        assert_eq!(got.len(), 50);
        assert!(got.iter().enumerate().all(|(i, r)| r.seq == i as u64));
        assert_eq!(
            log::take_crc_count(),
            51,
            "one CRC check per record and per control message"
        );
    }

    #[test]
    fn a_flipped_bit_in_a_record_is_corrupt_with_its_seq() {
        let frames = frames(0, 8);
        let payloads = payload_ranges(&frames);
        let wire = batch_message(&frames, 8);
        for bit in 0..wire.len() * 8 {
            let mut bad = wire.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            log::take_crc_count();
            let (got, failure) = read_stream(&bad);
            let checks = log::take_crc_count();
            let failure = failure.unwrap_or_else(|| panic!("bit {bit} went unnoticed"));
            assert!(got.iter().enumerate().all(|(i, r)| r.seq == i as u64));
            if let Some(k) = payloads.iter().position(|p| p.contains(&(bit / 8))) {
                assert!(
                    matches!(
                        failure,
                        LinkFailure::Corrupt {
                            seq: Some(s),
                            cause: Corruption::Checksum,
                            ..
                        } if s == k as u64
                    ),
                    "bit {bit}: {failure:?}"
                );
                assert_eq!(got.len(), k, "bit {bit}");
                assert_eq!(checks, k as u64 + 1, "bit {bit}: each frame checked once");
                let text = failure.to_string();
                assert!(
                    text.contains("checksum") && text.contains(&format!("record {k}")),
                    "{text}"
                );
            } else {
                // The prefixes: a corrupt length or count, a tag that makes
                // the batch a (badly checksummed) control message, or a
                // longer length that runs past the end of the input.
                assert!(
                    matches!(
                        failure,
                        LinkFailure::Corrupt { .. } | LinkFailure::PeerClosed { .. }
                    ),
                    "bit {bit}: {failure:?}"
                );
            }
        }
    }

    #[test]
    fn corrupt_control_messages_and_batches() {
        let mut hb = control(&Message::Heartbeat { replayed_exit: 1 });
        let last = hb.len() - 1;
        hb[last] ^= 1;
        let (_, f) = read_stream(&hb);
        assert!(
            matches!(
                f,
                Some(LinkFailure::Corrupt {
                    offset: 0,
                    seq: None,
                    cause: Corruption::Checksum
                })
            ),
            "{f:?}"
        );

        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 5]);
        for tag in [0, RECORDS_TAG] {
            huge[FRAME_PREFIX] = tag;
            let (_, f) = read_stream(&huge);
            assert!(
                matches!(
                    f,
                    Some(LinkFailure::Corrupt {
                        cause: Corruption::TooLarge { len },
                        ..
                    }) if len == u32::MAX as u64
                ),
                "{f:?}"
            );
        }

        let (_, f) = read_stream(&[0; 9]);
        assert!(
            matches!(
                f,
                Some(LinkFailure::Corrupt {
                    cause: Corruption::Empty,
                    ..
                })
            ),
            "{f:?}"
        );

        // Fewer or more records than announced.
        for (announced, found) in [(4, 3), (2, 3)] {
            let (got, f) = read_stream(&batch_message(&frames(0, 3), announced));
            assert!(
                matches!(
                    f,
                    Some(LinkFailure::Corrupt {
                        cause: Corruption::Count { announced: a, found: n },
                        ..
                    }) if a == announced && n == found
                ),
                "{f:?}"
            );
            assert_eq!(got.len(), 3.min(announced as usize));
        }

        // A frame cut short inside its batch.
        let f3 = frames(0, 3);
        let (got, f) = read_stream(&batch_message(&f3[..f3.len() - 1], 3));
        assert!(
            matches!(
                f,
                Some(LinkFailure::Corrupt {
                    seq: Some(2),
                    cause: Corruption::Truncated,
                    ..
                })
            ),
            "{f:?}"
        );
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn decode_message_reads_one_message_and_its_records() {
        let mut wire = batch_message(&frames(0, 3), 3);
        let batch_len = wire.len();
        let bye = control(&Message::Bye);
        wire.extend_from_slice(&bye);
        let (m, used) = decode_message(&wire, 0).unwrap();
        assert_eq!(used, batch_len);
        let WireMessage::Batch { records, ack_now } = &m else {
            panic!("{m:?}");
        };
        assert!(ack_now, "batch_message asks for the ack");
        assert!(records.iter().enumerate().all(|(i, r)| r.seq == i as u64));
        assert_eq!(m.encode().unwrap(), wire[..used]);
        let (m, used) = decode_message(&wire[batch_len..], 3).unwrap();
        assert_eq!(m, WireMessage::Control(ControlMessage(Message::Bye)));
        assert_eq!((used, m.encode().unwrap()), (bye.len(), bye));
        assert!(matches!(
            decode_message(&wire, 1),
            Err(LinkFailure::SequenceGap {
                expected: 1,
                got: 0
            })
        ));
        assert!(matches!(
            decode_message(&wire[..batch_len - 1], 0),
            Err(LinkFailure::PeerClosed { .. })
        ));
        // A 4 GiB length is refused from its prefix, with nothing read after.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 5]);
        assert!(matches!(
            decode_message(&huge, 0),
            Err(LinkFailure::Corrupt {
                cause: Corruption::TooLarge { .. },
                ..
            })
        ));
    }

    /// The seed inputs of the fuzz targets in `fuzz/` (run by tests/fuzz.sh):
    /// (target, file name, bytes).
    fn fuzz_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let header = log::Header::new(log::image_hash(b"guest"), 64 << 20, "1 vcpu");
        let records = [
            Event::Interrupt { vector: 0x20 },
            Event::SerialIn {
                bytes: b"hi\n".to_vec(),
            },
        ];
        let mut w = log::LogWriter::new(Vec::new(), &header).unwrap();
        for (i, e) in records.iter().enumerate() {
            let pos = Position {
                exit: i as u64 * 7,
                rip: 0x10_0000 + i as u64,
                regs_crc: 0xdead_beef,
                kind: 1,
            };
            w.append(pos, e.clone()).unwrap();
        }
        let log_bytes = w.into_inner();
        // The log target's other input form: each frame's payload behind
        // a u16 length, framed by the target.
        let mut payloads = Vec::new();
        let mut at = MAGIC_LEN;
        while at < log_bytes.len() {
            let len = frame_len(log_bytes[at..at + FRAME_PREFIX].try_into().unwrap()).unwrap();
            let payload = &log_bytes[at + FRAME_PREFIX..at + len];
            payloads.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            payloads.extend_from_slice(payload);
            at += len;
        }
        // A log whose first record claims 4 GiB.
        let header_end = MAGIC_LEN
            + frame_len(log_bytes[MAGIC_LEN..][..FRAME_PREFIX].try_into().unwrap()).unwrap();
        let mut huge = log_bytes[..header_end].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 5]);

        let mut handshake = vec![0];
        handshake.extend(control(&Message::Hello(hello(Role::Primary))));
        handshake.extend(control(&Message::Welcome));
        // A join's transfer, as the survivor sends it after the Hellos.
        let mut join = vec![0];
        let mut joiner = hello(Role::Primary);
        joiner.join = true;
        join.extend(control(&Message::Hello(joiner)));
        join.extend(control(&Message::Welcome));
        for m in [
            Message::JoinOffer { epoch: 2 },
            Message::Pages {
                first: 1,
                data: vec![0x5a; 64],
            },
            Message::Zeros { first: 2, count: 9 },
            Message::Round {
                round: 0,
                pages: 11,
            },
            Message::Handover(crate::join::Handover {
                exit: 7,
                first_seq: 3,
                clock_ns: 99,
                regs_crc: 1,
                mem_crc: 2,
                machine: vec![1, 2, 3],
            }),
        ] {
            join.extend(control(&m));
        }
        let after = [
            Message::Ack {
                received: Some(1),
                replayed_exit: 1,
            },
            Message::Heartbeat { replayed_exit: 1 },
            Message::Bye,
        ];
        // A batch of two records and what follows it; and the same with
        // every CRC zeroed and mode bit 0 set, for the target to write them.
        // A backup's last word.
        let mut diverged = vec![0];
        diverged.extend(control(&Message::Diverged {
            exit: 42,
            what: "expected interrupt 0x20, saw a clock read".into(),
        }));
        let mut batch = vec![0];
        let mut fix = vec![1];
        batch.extend(batch_message(&frames(0, 2), 2));
        let mut zeroed = Vec::new();
        for seq in 0..2 {
            let mut f = frames(seq, 1);
            f[4..FRAME_PREFIX].fill(0);
            zeroed.extend(f);
        }
        fix.extend(batch_message(&zeroed, 2));
        for m in &after {
            let c = control(m);
            batch.extend(&c);
            fix.extend(&c[..4]);
            fix.extend([0; 4]);
            fix.extend(&c[FRAME_PREFIX..]);
        }
        vec![
            ("log", "seed-log", log_bytes),
            ("log", "seed-payloads", payloads),
            ("log", "seed-4gib-record", huge),
            ("channel", "seed-handshake", handshake),
            ("channel", "seed-batch", batch),
            ("channel", "seed-batch-fix-crcs", fix),
            ("channel", "seed-join", join),
            ("channel", "seed-diverged", diverged),
        ]
    }

    const MAGIC_LEN: usize = log::MAGIC.len();

    /// The committed seeds are what [`fuzz_seeds`] makes, so that a format
    /// change cannot leave the fuzzers starting from stale inputs.
    /// `DUET_WRITE_FUZZ_SEEDS=1` (re)writes them.
    #[test]
    fn fuzz_seeds_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let write = std::env::var_os("DUET_WRITE_FUZZ_SEEDS").is_some();
        for (target, name, bytes) in fuzz_seeds() {
            assert!(bytes.len() < 4096, "{name}");
            let path = dir.join(target).join(name);
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == bytes,
                "{} is stale: rerun with DUET_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
        // The valid ones decode.
        let seeds = fuzz_seeds();
        let (mut r, _) = log::LogReader::open(&seeds[0].2[..]).unwrap();
        assert!(r.next_record().unwrap().is_some());
        assert!(r.next_record().unwrap().is_some());
        assert!(r.next_record().unwrap().is_none());
        for (i, records) in [(3, 0), (4, 2)] {
            let (got, failure) = read_stream(&seeds[i].2[1..]);
            assert!(failure.is_none(), "{}: {failure:?}", seeds[i].1);
            assert_eq!(got.len(), records, "{}", seeds[i].1);
        }
    }

    /// Found by the `channel` fuzz target: a control message whose tag is
    /// the over-long varint `83 00` decoded as the reserved `RecordsTag`,
    /// which re-encodes as a batch.
    #[test]
    fn an_over_long_records_tag_is_not_a_control_message() {
        let wire = [0x02, 0, 0, 0, 0x77, 0xd9, 0x77, 0x51, 0x83, 0x00];
        assert_eq!(
            u32::from_le_bytes(wire[4..8].try_into().unwrap()),
            crc32fast::hash(&wire[FRAME_PREFIX..])
        );
        let (got, f) = read_stream(&wire);
        assert!(got.is_empty());
        assert!(
            matches!(
                f,
                Some(LinkFailure::Corrupt {
                    offset: 0,
                    seq: None,
                    cause: Corruption::Undecodable(postcard::Error::DeserializeBadEnum)
                })
            ),
            "{f:?}"
        );
    }

    #[test]
    fn the_records_tag_is_reserved() {
        assert_eq!(control(&Message::RecordsTag)[FRAME_PREFIX], RECORDS_TAG);
        for m in [
            Message::Hello(hello(Role::Primary)),
            Message::Welcome,
            Message::Refuse { reason: "x".into() },
            Message::Ack {
                received: Some(3),
                replayed_exit: 3,
            },
            Message::Heartbeat { replayed_exit: 3 },
            Message::Bye,
            Message::Diverged {
                exit: 3,
                what: "x".into(),
            },
        ] {
            assert_ne!(control(&m)[FRAME_PREFIX], RECORDS_TAG, "{m:?}");
        }
    }

    /// Reads one message from a plain socket: `Some` control message, or
    /// `None` for a batch (skipped).
    fn read_sync(s: &mut std::net::TcpStream) -> std::io::Result<Option<Message>> {
        use std::io::Read;
        let mut prefix = [0u8; FRAME_PREFIX];
        s.read_exact(&mut prefix)?;
        let len = u32::from_le_bytes(prefix[..4].try_into().unwrap()) as usize;
        let mut frame = prefix.to_vec();
        frame.resize(FRAME_PREFIX + len, 0);
        s.read_exact(&mut frame[FRAME_PREFIX..])?;
        if frame[FRAME_PREFIX] == RECORDS_TAG {
            return Ok(None);
        }
        Ok(decode_frame::<Message>(&frame).unwrap().map(|(m, _)| m))
    }

    /// A hand-driven peer over a plain socket: it completes the handshake
    /// as `role` and then does what a test says.
    fn fake_peer(role: Role, s: &mut std::net::TcpStream) {
        use std::io::Write;
        s.write_all(&control(&Message::Hello(hello(role)))).unwrap();
        assert!(matches!(read_sync(s).unwrap(), Some(Message::Hello(_))));
        if role == Role::Backup {
            s.write_all(&control(&Message::Welcome)).unwrap();
        } else {
            assert_eq!(read_sync(s).unwrap(), Some(Message::Welcome));
        }
    }

    /// A backup link fed by a fake primary that, after the handshake,
    /// writes `then`; returns the records the backup received and its
    /// error.
    /// A backup link paired with a fake primary: the link, and the
    /// primary's socket.
    fn backup_paired() -> (BackupLink, std::net::TcpStream) {
        let addr = free_addr();
        let backup = std::thread::spawn(move || {
            BackupLink::accept(addr, hello(Role::Backup), ChannelConfig::default(), |_| {}).unwrap()
        });
        let mut s = loop {
            match std::net::TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        fake_peer(Role::Primary, &mut s);
        (backup.join().unwrap(), s)
    }

    /// A primary that vanishes leaves a drained, closed queue, just as one
    /// that says Bye does: `finished` must tell them apart, or a backup
    /// that checks between its receive and the close takes a dead primary
    /// for one that ended, and believes the log covers every exit.
    #[test]
    fn a_vanished_primary_is_a_failure_never_a_finish() {
        use std::io::Write;
        let (link, s) = backup_paired();
        assert!(matches!(link.finished(), Ok(false)));
        drop(s);
        let c = link
            .state()
            .wait_until(Duration::from_secs(5), |c| c.failure.is_some());
        assert!(c.failure.is_some(), "{c:?}");
        let end = Instant::now() + Duration::from_secs(5);
        while !link.records.is_closed() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let err = link.finished().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Failed(LinkFailure::PeerClosed {
                    peer: Role::Primary
                })
            ),
            "{err:?}"
        );

        // One that says Bye has finished.
        let (mut link, mut s) = backup_paired();
        s.write_all(&control(&Message::Bye)).unwrap();
        assert!(matches!(link.recv(), Ok(None)));
        assert!(matches!(link.finished(), Ok(true)));
    }

    fn backup_fed(then: Option<Vec<u8>>) -> (Vec<u64>, Error) {
        use std::io::Write;
        let (mut link, mut s) = backup_paired();
        match then {
            Some(bytes) => s.write_all(&bytes).unwrap(),
            None => drop(s.shutdown(std::net::Shutdown::Write)),
        }
        let mut got = Vec::new();
        let err = loop {
            match link.recv() {
                Ok(Some(r)) => got.push(r.seq),
                Ok(None) => panic!("clean end"),
                Err(e) => break e,
            }
        };
        // The socket stays open until the backup has failed.
        drop(s);
        (got, err)
    }

    #[test]
    fn the_backup_reports_each_failure_kind() {
        // A flipped bit in record 7's payload.
        let mut second = batch_message(&frames(5, 5), 5);
        let bad = payload_ranges(&frames(5, 5))[2].start;
        second[bad] ^= 0x10;
        let mut wire = batch_message(&frames(0, 5), 5);
        wire.extend_from_slice(&second);
        let (got, err) = backup_fed(Some(wire));
        assert!(
            matches!(
                err.link_failure(),
                Some(LinkFailure::Corrupt {
                    seq: Some(7),
                    cause: Corruption::Checksum,
                    ..
                })
            ),
            "{err:?}"
        );
        assert_eq!(got, (0..7).collect::<Vec<_>>());
        let text = error_chain(&err);
        assert!(
            text.starts_with("log channel failed: the log channel is corrupt: checksum mismatch"),
            "{text}"
        );

        let mut wire = batch_message(&frames(0, 3), 3);
        wire.extend_from_slice(&batch_message(&frames(5, 1), 1));
        let (got, err) = backup_fed(Some(wire));
        assert_eq!(got, [0, 1, 2]);
        assert!(
            matches!(
                err,
                Error::Failed(LinkFailure::SequenceGap {
                    expected: 3,
                    got: 5
                })
            ),
            "{err:?}"
        );

        let (got, err) = backup_fed(None);
        assert!(got.is_empty());
        assert!(
            matches!(
                err,
                Error::Failed(LinkFailure::PeerClosed {
                    peer: Role::Primary
                })
            ),
            "{err:?}"
        );

        let (_, err) = backup_fed(Some(control(&Message::Welcome)));
        assert!(
            matches!(
                err,
                Error::Failed(LinkFailure::Unexpected {
                    from: Role::Primary,
                    ..
                })
            ),
            "{err:?}"
        );
    }

    /// A primary link paired with a fake backup that runs `then` on its
    /// socket after the handshake (in a thread of its own).
    fn primary_with(
        config: ChannelConfig,
        then: impl FnOnce(std::net::TcpStream) + Send + 'static,
    ) -> PrimaryLink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            fake_peer(Role::Backup, &mut s);
            then(s);
        });
        PrimaryLink::connect(addr, hello(Role::Primary), config, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn the_primary_reports_each_failure_kind() {
        // The backup goes away.
        let link = primary_with(ChannelConfig::default(), drop);
        let c = link
            .state()
            .wait_until(Duration::from_secs(2), |c| c.failure.is_some());
        assert!(
            matches!(
                c.failure,
                Some(LinkFailure::PeerClosed { peer: Role::Backup })
            ),
            "{:?}",
            c.failure
        );
        let err = link.send(frames(0, 1), 1, 0, true).unwrap_err();
        assert!(
            matches!(err.link_failure(), Some(LinkFailure::PeerClosed { .. })),
            "{err:?}"
        );

        // The backup reads but never acknowledges.
        let patient = ChannelConfig {
            timeout: Duration::from_secs(5),
            ..ChannelConfig::default()
        };
        let link = primary_with(patient, |mut s| {
            let end = Instant::now() + Duration::from_millis(600);
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            while Instant::now() < end {
                let _ = read_sync(&mut s);
            }
        });
        link.send(frames(0, 3), 3, 0, true).unwrap();
        let err = link.close(Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Failed(LinkFailure::AckTimeout {
                    acked: 0,
                    records: 3
                })
            ),
            "{err:?}"
        );

        // The backup says Bye at once: the link is closed, not failed.
        let link = primary_with(ChannelConfig::default(), |mut s| {
            use std::io::Write;
            s.write_all(&control(&Message::Bye)).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let c = link
            .state()
            .wait_until(Duration::from_secs(2), |c| c.closed);
        assert!(c.closed && c.failure.is_none(), "{c:?}");
        std::thread::sleep(Duration::from_millis(100));
        let err = link.send(frames(0, 1), 1, 0, true).unwrap_err();
        assert!(matches!(err, Error::Failed(LinkFailure::Closed)), "{err:?}");
        assert!(matches!(
            link.send(vec![0; MAX_SEND + 1], 1, 0, true),
            Err(Error::TooLarge { .. })
        ));
    }

    /// One deployment's credentials for VM ids `vm1` and `vm2`, and
    /// another deployment's for `vm1`.
    struct Creds {
        _dirs: (tempfile::TempDir, tempfile::TempDir),
        ours: std::path::PathBuf,
        theirs: std::path::PathBuf,
    }

    fn creds() -> Creds {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tls::issue(a.path(), &["vm1".into(), "vm2".into()], &[]).unwrap();
        tls::issue(b.path(), &["vm1".into()], &[]).unwrap();
        Creds {
            ours: a.path().to_path_buf(),
            theirs: b.path().to_path_buf(),
            _dirs: (a, b),
        }
    }

    /// Credentials: the CA from `ca_dir`, the cert and key `stem` from
    /// `cert_dir`.
    fn tls_with(ca_dir: &std::path::Path, cert_dir: &std::path::Path, stem: &str) -> Security {
        Security::Tls(
            tls::TlsFiles {
                ca: ca_dir.join("ca.pem"),
                cert: cert_dir.join(format!("{stem}.pem")),
                key: cert_dir.join(format!("{stem}-key.pem")),
            }
            .load()
            .unwrap(),
        )
    }

    /// A backup with `backup_sec` that reports its refusals, and one
    /// primary with `primary_sec`: the primary's result and the backup's
    /// first refusal (if it refused within 5 s).
    fn tls_attempt(
        backup_sec: Security,
        primary_sec: Security,
    ) -> (Result<PrimaryLink, Error>, Option<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let backup = std::thread::spawn(move || {
            let tx2 = tx.clone();
            let link = BackupLink::accept_on_with(
                listener,
                hello(Role::Backup),
                ChannelConfig::default(),
                &backup_sec,
                move |e| {
                    let _ = tx2.send(Err(error_chain(e)));
                },
            );
            if let Ok(mut link) = link {
                let mut n = 0;
                while let Ok(Some(_)) = link.recv() {
                    n += 1;
                }
                let _ = tx.send(Ok(n));
            }
        });
        let primary = PrimaryLink::connect_with(
            addr,
            hello(Role::Primary),
            ChannelConfig::default(),
            Duration::from_secs(5),
            &primary_sec,
        );
        let refusal = match &primary {
            Ok(_) => None,
            Err(_) => match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Err(why)) => Some(why),
                other => panic!("the backup did not refuse: {other:?}"),
            },
        };
        if primary.is_err() {
            // The backup thread waits for the next primary; leave it.
            drop(backup);
        }
        (primary, refusal)
    }

    /// A backup's divergence reaches the primary as its link's failure,
    /// with the exit and a bounded description.
    #[test]
    fn a_backups_divergence_reaches_the_primary() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let backup = std::thread::spawn(move || {
            let link = BackupLink::accept_on_with(
                listener,
                hello(Role::Backup),
                ChannelConfig::default(),
                &Security::Plaintext,
                |_| {},
            )
            .unwrap();
            let long = "é".repeat(MAX_DIVERGED_TEXT);
            let told = link.report_divergence(17, &long, Duration::from_secs(5));
            tx.send(told).unwrap();
            // The backup process would end here; keep the link open a
            // moment so that the primary sees the message, not a close.
            std::thread::sleep(Duration::from_millis(200));
        });
        let primary = PrimaryLink::connect_with(
            addr,
            hello(Role::Primary),
            ChannelConfig::default(),
            Duration::from_secs(5),
            &Security::Plaintext,
        )
        .unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        let c = primary
            .state()
            .wait_until(Duration::from_secs(5), |c| c.failure.is_some());
        match c.failure {
            Some(LinkFailure::Diverged { exit: 17, what }) => {
                assert!(
                    what.len() <= MAX_DIVERGED_TEXT && what.starts_with('é'),
                    "{what}"
                );
            }
            other => panic!("{other:?}"),
        }
        backup.join().unwrap();
    }

    #[test]
    fn a_tls_pair_streams_records() {
        let c = creds();
        let (primary, _) = tls_attempt(
            tls_with(&c.ours, &c.ours, "vm1"),
            tls_with(&c.ours, &c.ours, "vm1"),
        );
        let link = primary.unwrap();
        link.send(frames(0, 10), 10, 0, false).unwrap();
        link.send(frames(10, 5), 5, 0, true).unwrap();
        let state = link.state();
        link.close(Duration::from_secs(5)).unwrap();
        assert_eq!(state.snapshot().acked, 15);
    }

    #[test]
    fn another_vms_certificate_is_refused() {
        let c = creds();
        let (primary, refusal) = tls_attempt(
            tls_with(&c.ours, &c.ours, "vm1"),
            tls_with(&c.ours, &c.ours, "vm2"),
        );
        // vm1's primary with vm2's certificate: the backup's name check
        // refuses it.
        let err = primary.err().unwrap();
        assert!(
            matches!(err, Error::TlsHandshake { peer: Role::Backup, ref reason } if reason.contains("rejected our certificate")),
            "{err}"
        );
        let refusal = refusal.unwrap();
        assert!(
            refusal.contains("TLS handshake with the primary failed")
                && refusal.contains("another name")
                && refusal.contains("vm1.vm.duet"),
            "{refusal}"
        );

        let c = creds();
        let backup = tls_with(&c.ours, &c.ours, "vm1");
        let mut h = hello(Role::Primary);
        h.vm_id = "vm2".into();
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let _ = BackupLink::accept_on_with(
                listener,
                hello(Role::Backup),
                ChannelConfig::default(),
                &backup,
                move |e| drop(tx.send(error_chain(e))),
            );
        });
        // vm2's pair dialling vm1's backup: the primary verifies the name
        // vm2.vm.duet, which vm1's certificate lacks, so it refuses first.
        let err = PrimaryLink::connect_with(
            addr,
            h,
            ChannelConfig::default(),
            Duration::from_secs(5),
            &tls_with(&c.ours, &c.ours, "vm2"),
        )
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .contains("TLS handshake with the backup failed"),
            "{err}"
        );
        let why = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            why.contains("TLS handshake with the primary failed"),
            "{why}"
        );
    }

    #[test]
    fn the_backup_checks_the_client_name() {
        let c = creds();
        let id = match tls_with(&c.ours, &c.ours, "vm1") {
            Security::Tls(id) => id,
            Security::Plaintext => unreachable!(),
        };
        let vm2 = match tls_with(&c.ours, &c.ours, "vm2") {
            Security::Tls(id) => id,
            Security::Plaintext => unreachable!(),
        };
        // vm2's client, told to expect vm1's backup name (so that only the
        // server's check can refuse), against vm1's server.
        let server = id.server_config(&[&tls::vm_name("vm1")]).unwrap();
        let client = vm2.client_config().unwrap();
        let rt = runtime().unwrap();
        let (server_err, client_err) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = async {
                let (s, _) = listener.accept().await.unwrap();
                tokio_rustls::TlsAcceptor::from(server)
                    .accept(s)
                    .await
                    .err()
            };
            let connect = async {
                let s = TcpStream::connect(addr).await.unwrap();
                let name = tls::server_name("vm1.vm.duet").unwrap();
                let mut t = tokio_rustls::TlsConnector::from(client)
                    .connect(name, s)
                    .await
                    .unwrap();
                let mut b = [0u8; 1];
                t.read(&mut b).await.err()
            };
            tokio::join!(accept, connect)
        });
        let server_err = tls_failure(server_err.unwrap(), Role::Primary).to_string();
        assert!(
            server_err.contains("another name") && server_err.contains("vm1.vm.duet"),
            "{server_err}"
        );
        let client_err = tls_failure(client_err.unwrap(), Role::Backup).to_string();
        assert!(
            client_err.contains("rejected our certificate"),
            "{client_err}"
        );
    }

    #[test]
    fn another_cas_certificate_is_refused_by_either_side() {
        let c = creds();
        // The primary trusts our CA but presents the other deployment's.
        let (primary, refusal) = tls_attempt(
            tls_with(&c.ours, &c.ours, "vm1"),
            tls_with(&c.ours, &c.theirs, "vm1"),
        );
        let err = primary.err().unwrap();
        assert!(
            err.to_string().contains("rejected our certificate"),
            "{err}"
        );
        let refusal = refusal.unwrap();
        assert!(
            refusal.contains("not signed by this side's CA"),
            "{refusal}"
        );
        // The backup presents the other deployment's.
        let (primary, refusal) = tls_attempt(
            tls_with(&c.ours, &c.theirs, "vm1"),
            tls_with(&c.ours, &c.ours, "vm1"),
        );
        let err = primary.err().unwrap();
        assert!(
            err.to_string()
                .contains("the backup's certificate is not signed by this side's CA"),
            "{err}"
        );
        assert!(refusal.unwrap().contains("rejected our certificate"));
    }

    #[test]
    fn tls_and_plaintext_refuse_each_other_clearly() {
        let c = creds();
        let (primary, refusal) =
            tls_attempt(tls_with(&c.ours, &c.ours, "vm1"), Security::Plaintext);
        let err = primary.err().unwrap();
        assert!(
            matches!(err, Error::Refused(ref r) if r.contains("requires mutual TLS")),
            "{err}"
        );
        assert!(refusal.unwrap().contains("the primary did not speak TLS"));

        let (primary, refusal) =
            tls_attempt(Security::Plaintext, tls_with(&c.ours, &c.ours, "vm1"));
        let err = primary.err().unwrap();
        assert!(
            matches!(err, Error::PeerNotTls { peer: Role::Backup }),
            "{err}"
        );
        assert!(refusal
            .unwrap()
            .contains("the primary speaks TLS but this side has no TLS credentials"));
    }

    #[test]
    fn a_tls_opening_is_told_from_a_hello() {
        assert_eq!(opens_like_tls(&[0x16, 0x03, 0x01]), Some(true));
        assert_eq!(opens_like_tls(&[0x16, 0x03, 0x03]), Some(true));
        assert_eq!(opens_like_tls(&[0x16]), None);
        assert_eq!(opens_like_tls(&[0x16, 0x03]), None);
        assert_eq!(opens_like_tls(&[0x16, 0x04]), Some(false));
        assert_eq!(opens_like_tls(&[0x16, 0x03, 0x00]), Some(false));
        let hello = control(&Message::Hello(hello(Role::Primary)));
        assert_eq!(opens_like_tls(&hello[..3]), Some(false));
    }

    #[test]
    fn a_silent_connection_does_not_hold_the_handshake_forever() {
        // Bounded by HANDSHAKE_TIMEOUT; checked here with a shorter limit.
        let rt = runtime().unwrap();
        let err = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let _silent = TcpStream::connect(addr).await.unwrap();
            let (s, _) = listener.accept().await.unwrap();
            establish_within(
                s,
                &hello(Role::Backup),
                &Security::Plaintext,
                Duration::from_millis(200),
            )
            .await
            .err()
            .unwrap()
        });
        assert!(
            matches!(
                err,
                Error::HandshakeTimeout {
                    peer: Role::Primary
                }
            ),
            "{err}"
        );
    }
}
