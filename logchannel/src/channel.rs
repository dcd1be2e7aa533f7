//! The log channel: a framed binary protocol over TCP between a primary and
//! its backup, run on tokio in a thread of its own so that the vCPU thread
//! only ever touches plain blocking handles.
//!
//! ```text
//! message frame = len: u32 LE | crc: u32 LE | postcard(Message)   (as in the log file)
//!
//! primary                                backup
//!    | ---- Hello {version, vm id, image, machine, epoch} ---> |
//!    | <--- Hello (its own) ---------------------------------- |  each side checks the other
//!    | <--- Welcome | Refuse {reason} ------------------------ |
//!    | ---- Records {record frames...} ----------------------> |  the log's own frames, each
//!    | <--- Ack {highest contiguous seq, replayed exit} ------- |  with its seq and CRC
//!    | <--> Heartbeat {replayed exit} ----------------------- |  both ways, every interval
//!    | ---- Bye (after the last record) ---------------------> |
//! ```
//!
//! Flow control follows the VMware FT paper: the backup acknowledges on
//! receipt, but it reads from the socket only while its bounded queue of
//! records has room. When it lags, TCP pushes back, the primary's bounded
//! send queue fills, and the primary's vCPU blocks instead of growing
//! memory. The primary also never has more than `max_unacked` records
//! unacknowledged.
//!
//! Any failure (a bad checksum, a sequence gap, a silent peer, a closed
//! socket without Bye) is reported, never skipped: the link records it in
//! [`LinkState::failure`] and stops.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::log::{self, decode_frame, encode_frame, Record, FRAME_PREFIX, MAX_FRAME};

/// Version of the channel protocol (independent of the log format's).
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest batch of record frames sent in one message.
const MAX_BATCH: usize = 1 << 20;

/// Errors of the log channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the backup at {addr}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the peer refused us: {0}")]
    Refused(String),
    #[error("refused the peer: {0}")]
    Mismatch(String),
    #[error("log channel failed: {0}")]
    Failed(String),
    #[error("log channel I/O")]
    Io(#[from] std::io::Error),
}

/// Which end of the channel a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Backup,
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
enum Message {
    Hello(Hello),
    Welcome,
    Refuse {
        reason: String,
    },
    /// Concatenated log record frames.
    Records {
        frames: Vec<u8>,
    },
    /// `received`: the highest contiguous sequence number received.
    Ack {
        received: Option<u64>,
        replayed_exit: u64,
    },
    Heartbeat {
        replayed_exit: u64,
    },
    Bye,
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
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            max_unacked: 200_000,
            backup_queue: 65_536,
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
}

/// See [`LinkState::on_progress`].
pub type ProgressHook = Box<dyn Fn(u64) + Send>;

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
    /// Why the link failed, if it did.
    pub failure: Option<String>,
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

    fn fail(&self, why: String) {
        self.update(|c| {
            if c.failure.is_none() && !c.closed {
                c.failure = Some(why);
                c.failed_at = Some(Instant::now());
            }
        });
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> LinkCounters {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The failure, if the link failed.
    pub fn failure(&self) -> Option<String> {
        self.snapshot().failure
    }

    /// Blocks until `pred` holds, the link fails, or `timeout` passes.
    /// Returns the counters at that moment.
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

async fn write_message(
    w: &mut OwnedWriteHalf,
    m: &Message,
    buf: &mut Vec<u8>,
) -> Result<(), Error> {
    buf.clear();
    encode_frame(m, buf).map_err(|e| Error::Failed(e.to_string()))?;
    w.write_all(buf).await?;
    Ok(())
}

/// Reads one message; `offset` counts bytes read so far for error messages.
async fn read_message(r: &mut OwnedReadHalf, offset: &mut u64) -> Result<Message, Error> {
    let mut prefix = [0u8; FRAME_PREFIX];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Error::Failed("the peer closed the connection".into()))
        }
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(prefix[..4].try_into().unwrap_or_default());
    if len > MAX_FRAME {
        return Err(Error::Failed(format!(
            "frame of {len} bytes at offset {offset} is larger than {MAX_FRAME}: the stream is corrupt"
        )));
    }
    let mut frame = prefix.to_vec();
    frame.resize(FRAME_PREFIX + len as usize, 0);
    r.read_exact(&mut frame[FRAME_PREFIX..]).await?;
    let at = *offset;
    *offset += frame.len() as u64;
    let crc = u32::from_le_bytes(prefix[4..].try_into().unwrap_or_default());
    if crc32fast::hash(&frame[FRAME_PREFIX..]) != crc {
        return Err(Error::Failed(format!(
            "checksum mismatch in the message at stream offset {at}: the channel is corrupt"
        )));
    }
    match decode_frame::<Message>(&frame) {
        Ok(Some((m, _))) => Ok(m),
        Ok(None) => Err(Error::Failed(format!(
            "short message at stream offset {at}"
        ))),
        Err(e) => Err(Error::Failed(format!(
            "undecodable message at stream offset {at}: {e}"
        ))),
    }
}

/// Exchanges Hellos; the backup side decides and answers Welcome/Refuse.
async fn handshake(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    ours: &Hello,
    offset: &mut u64,
) -> Result<Hello, Error> {
    let mut buf = Vec::new();
    write_message(wr, &Message::Hello(ours.clone()), &mut buf).await?;
    let theirs = match read_message(rd, offset).await? {
        Message::Hello(h) => h,
        Message::Refuse { reason } => return Err(Error::Refused(reason)),
        other => return Err(Error::Failed(format!("expected Hello, got {other:?}"))),
    };
    let problem = ours.mismatch(&theirs);
    match ours.role {
        Role::Backup => {
            if let Some(reason) = problem {
                let refuse = Message::Refuse {
                    reason: reason.clone(),
                };
                let _ = write_message(wr, &refuse, &mut buf).await;
                let _ = wr.shutdown().await;
                return Err(Error::Mismatch(reason));
            }
            write_message(wr, &Message::Welcome, &mut buf).await?;
            Ok(theirs)
        }
        Role::Primary => match read_message(rd, offset).await? {
            Message::Welcome => match problem {
                // The backup accepted a peer we do not accept: say so.
                Some(reason) => Err(Error::Mismatch(reason)),
                None => Ok(theirs),
            },
            Message::Refuse { reason } => Err(Error::Refused(reason)),
            other => Err(Error::Failed(format!("expected Welcome, got {other:?}"))),
        },
    }
}

/// The message of an error without the "log channel failed" prefix, for
/// recording as the link's failure (which is wrapped again when reported).
fn plain(e: Error) -> String {
    match e {
        Error::Failed(why) => why,
        other => error_chain(&other),
    }
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

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The primary's end: a blocking handle for the vCPU thread.
pub struct PrimaryLink {
    batches: Option<mpsc::Sender<Vec<u8>>>,
    state: Arc<LinkState>,
    config: ChannelConfig,
    thread: Option<JoinHandle<()>>,
}

impl PrimaryLink {
    /// Connects to the backup (retrying until `connect_timeout`), and
    /// completes the handshake before returning, so that the guest does not
    /// start until the backup is there to receive record 0.
    pub fn connect(
        addr: SocketAddr,
        hello: Hello,
        config: ChannelConfig,
        connect_timeout: Duration,
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
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let mut offset = 0;
        rt.block_on(handshake(&mut rd, &mut wr, &hello, &mut offset))?;
        let state = Arc::new(LinkState::default());
        let (tx, rx) = mpsc::channel(64);
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("logchannel-primary".into())
            .spawn(move || rt.block_on(primary_io(rd, wr, rx, st, config, offset)))?;
        Ok(PrimaryLink {
            batches: Some(tx),
            state,
            config,
            thread: Some(thread),
        })
    }

    /// Shared counters (for the Output Rule, metrics and failure checks).
    pub fn state(&self) -> Arc<LinkState> {
        self.state.clone()
    }

    /// Sends a batch of record frames whose last record has `last_seq`.
    /// Blocks while the send queue is full or too many records are
    /// unacknowledged: that is the flow control.
    pub fn send(&self, frames: Vec<u8>, records: u64, bytes: u64) -> Result<(), Error> {
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
        let c = self.state.wait_until(Duration::from_secs(3600), |c| {
            sent.saturating_sub(c.acked) <= max
        });
        if let Some(f) = c.failure {
            return Err(Error::Failed(f));
        }
        let tx = self
            .batches
            .as_ref()
            .ok_or_else(|| Error::Failed("link closed".into()))?;
        tx.blocking_send(frames).map_err(|_| {
            Error::Failed(self.state.failure().unwrap_or_else(|| "link closed".into()))
        })
    }

    /// Sends Bye after the last batch and waits (up to `timeout`) until the
    /// backup has acknowledged everything, so that it can finish its replay.
    pub fn close(mut self, timeout: Duration) -> Result<(), Error> {
        self.batches.take();
        let c = self.state.wait_until(timeout, |c| c.acked >= c.records);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match c.failure {
            Some(f) if c.acked < c.records => Err(Error::Failed(f)),
            _ if c.acked < c.records => Err(Error::Failed(format!(
                "the backup acknowledged {} of {} records before the timeout",
                c.acked, c.records
            ))),
            _ => Ok(()),
        }
    }
}

async fn primary_io(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut batches: mpsc::Receiver<Vec<u8>>,
    state: Arc<LinkState>,
    config: ChannelConfig,
    mut offset: u64,
) {
    let reader_state = state.clone();
    let reader = async move {
        let mut last_heard = Instant::now();
        loop {
            let msg =
                tokio::time::timeout(config.timeout, read_message(&mut rd, &mut offset)).await;
            let msg = match msg {
                Err(_) => {
                    return Err(format!(
                        "the backup was silent for {} ms",
                        last_heard.elapsed().as_millis()
                    ))
                }
                Ok(Err(e)) => return Err(plain(e)),
                Ok(Ok(m)) => m,
            };
            last_heard = Instant::now();
            match msg {
                Message::Ack {
                    received,
                    replayed_exit,
                } => {
                    reader_state.update(|c| {
                        c.acked = c.acked.max(received.map_or(0, |s| s + 1));
                    });
                    reader_state.progress(replayed_exit);
                }
                Message::Heartbeat { replayed_exit } => reader_state.progress(replayed_exit),
                Message::Bye => return Ok(()),
                other => return Err(format!("unexpected message from the backup: {other:?}")),
            }
        }
    };
    let writer = async move {
        let mut buf = Vec::new();
        let mut tick = tokio::time::interval(config.heartbeat);
        loop {
            tokio::select! {
                batch = batches.recv() => {
                    let Some(mut frames) = batch else { break };
                    while frames.len() < MAX_BATCH {
                        match batches.try_recv() {
                            Ok(more) => frames.extend_from_slice(&more),
                            Err(_) => break,
                        }
                    }
                    write_message(&mut wr, &Message::Records { frames }, &mut buf).await.map_err(plain)?;
                    tick.reset();
                }
                _ = tick.tick() => {
                    write_message(&mut wr, &Message::Heartbeat { replayed_exit: 0 }, &mut buf).await.map_err(plain)?;
                }
            }
        }
        write_message(&mut wr, &Message::Bye, &mut buf)
            .await
            .map_err(plain)?;
        // Keep heartbeating until the backup has acked everything and said
        // Bye, which ends the reader and so this whole task.
        loop {
            tick.tick().await;
            if let Err(e) =
                write_message(&mut wr, &Message::Heartbeat { replayed_exit: 0 }, &mut buf).await
            {
                return Err::<(), String>(plain(e));
            }
        }
    };
    let result = tokio::select! {
        r = reader => r,
        r = writer => r,
    };
    match result {
        Ok(()) => state.update(|c| c.closed = true),
        Err(why) => state.fail(why),
    }
}

/// The backup's end: records arrive on a bounded queue; the vCPU thread
/// takes them with [`BackupLink::recv`].
pub struct BackupLink {
    records: mpsc::Receiver<Record>,
    state: Arc<LinkState>,
    reports: mpsc::Sender<Message>,
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
        mut on_refused: impl FnMut(&Error),
    ) -> Result<BackupLink, Error> {
        let rt = runtime()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|source| Error::Listen { addr, source })?;
        let (rd, wr, offset, peer) = rt.block_on(async {
            loop {
                let (stream, _peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let (mut rd, mut wr) = stream.into_split();
                let mut offset = 0;
                match handshake(&mut rd, &mut wr, &hello, &mut offset).await {
                    Ok(peer) => return Ok::<_, Error>((rd, wr, offset, peer)),
                    Err(e) => on_refused(&e),
                }
            }
        })?;
        let state = Arc::new(LinkState::default());
        let (tx, rx) = mpsc::channel(config.backup_queue);
        let (out_tx, out_rx) = mpsc::channel::<Message>(64);
        let st = state.clone();
        let reports = out_tx.clone();
        let thread = std::thread::Builder::new()
            .name("logchannel-backup".into())
            .spawn(move || {
                rt.block_on(backup_io(rd, wr, tx, (out_tx, out_rx), st, config, offset))
            })?;
        Ok(BackupLink {
            records: rx,
            state,
            reports,
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
    pub fn report_progress(&self, exit: u64) {
        self.state.set_replayed_exit(exit);
        let _ = self.reports.try_send(Message::Heartbeat {
            replayed_exit: exit,
        });
    }

    /// The next record, blocking until one arrives. `Ok(None)`: the primary
    /// said Bye and everything was delivered. An error: the link failed.
    pub fn recv(&mut self) -> Result<Option<Record>, Error> {
        match self.records.blocking_recv() {
            Some(r) => Ok(Some(r)),
            None => self.end(),
        }
    }

    /// Like [`BackupLink::recv`] but never blocks: `Ok(None)` also means
    /// "nothing yet"; check [`BackupLink::is_finished`].
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
            (None, false) => Err(Error::Failed(
                "the log channel ended without a goodbye".into(),
            )),
        }
    }

    /// True once the queue is drained and the link ended (cleanly or not).
    pub fn is_finished(&self) -> bool {
        self.records.is_closed() && self.records.is_empty()
    }
}

async fn backup_io(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    records: mpsc::Sender<Record>,
    (out_tx, mut out_rx): (mpsc::Sender<Message>, mpsc::Receiver<Message>),
    state: Arc<LinkState>,
    config: ChannelConfig,
    mut offset: u64,
) {
    let reader_state = state.clone();
    let reader = async move {
        let mut next_seq = 0u64;
        loop {
            let msg = match tokio::time::timeout(config.timeout, read_message(&mut rd, &mut offset))
                .await
            {
                Err(_) => {
                    return Err(format!(
                        "the primary was silent for {} ms",
                        config.timeout.as_millis()
                    ))
                }
                Ok(Err(e)) => return Err(plain(e)),
                Ok(Ok(m)) => m,
            };
            match msg {
                Message::Records { frames } => {
                    let mut at = 0;
                    let bytes = frames.len() as u64;
                    let mut n = 0;
                    while at < frames.len() {
                        let (rec, used) = match decode_frame::<Record>(&frames[at..]) {
                            Ok(Some(x)) => x,
                            Ok(None) => {
                                return Err(format!(
                                    "record {next_seq} is cut short inside a batch"
                                ))
                            }
                            Err(e) => return Err(format!("record {next_seq}: {e}")),
                        };
                        if rec.seq != next_seq {
                            return Err(log::Error::SequenceGap {
                                expected: next_seq,
                                found: rec.seq,
                            }
                            .to_string());
                        }
                        next_seq += 1;
                        n += 1;
                        at += used;
                        if records.send(rec).await.is_err() {
                            return Ok(());
                        }
                    }
                    reader_state.update(|c| {
                        c.records += n;
                        c.record_bytes += bytes;
                    });
                    let replayed_exit = reader_state.snapshot().replayed_exit;
                    let ack = Message::Ack {
                        received: next_seq.checked_sub(1),
                        replayed_exit,
                    };
                    if out_tx.send(ack).await.is_err() {
                        return Ok(());
                    }
                }
                Message::Heartbeat { .. } => {}
                Message::Bye => {
                    let _ = out_tx.send(Message::Bye).await;
                    reader_state.update(|c| c.closed = true);
                    return Ok(());
                }
                other => return Err(format!("unexpected message from the primary: {other:?}")),
            }
        }
    };
    let writer_state = state.clone();
    let writer = async move {
        let mut buf = Vec::new();
        let mut tick = tokio::time::interval(config.heartbeat);
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return Ok(()) },
                _ = tick.tick() => Message::Heartbeat { replayed_exit: writer_state.snapshot().replayed_exit },
            };
            let bye = msg == Message::Bye;
            write_message(&mut wr, &msg, &mut buf)
                .await
                .map_err(plain)?;
            if bye {
                let _ = wr.shutdown().await;
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
        link.send(frames(0, 10), 10, 0).unwrap();
        link.send(frames(10, 5), 5, 0).unwrap();
        let state = link.state();
        link.close(Duration::from_secs(5)).unwrap();
        assert_eq!(state.snapshot().acked, 15);
        assert_eq!(backup.join().unwrap(), (0..15).collect::<Vec<_>>());
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
        assert!(c.failure.unwrap().contains("silent"));
    }
}
