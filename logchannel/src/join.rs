//! Joining a running VM: the state transfer that comes before the log.
//!
//! A new backup restores redundancy by connecting to the side that runs the
//! VM alone (a primary whose backup died, or a backup that went live), the
//! *survivor*. The connection is a log channel link like any other (TLS,
//! then Hellos, with `join` set on both), except that the joiner dialled
//! it. Before the first record the survivor sends the VM's state:
//!
//! ```text
//! survivor (primary role)                joiner (backup role, connected)
//!    | ---- Hello {join} -----------------------------------> |
//!    | <--- Hello {join} / Welcome | Refuse ------------------ |  as for any pair
//!    | ---- JoinOffer {epoch} | Refuse {reason} ------------> |  "already has a backup"
//!    | ---- Pages {first, data} | Zeros {first, count} ... --> |  pre-copy round 0: all memory
//!    | ---- Round {0, pages} --------------------------------> |
//!    | ---- Pages ... Round {k, pages} ----------------------> |  rounds: what the guest dirtied
//!    | ---- Handover {exit, seq, digest, machine state} -----> |  the guest paused for this only
//!    | ---- record batch {first_seq...} ---------------------> |  the log, from the handover on
//!    | <--- Ack ... ------------------------------------------ |  (the joiner starts reading once
//! ```                                                             it has restored and checked)
//!
//! Every message is a control message: one checksummed log frame. The
//! machine state travels as opaque bytes: its meaning belongs to the VMM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::channel::{
    establish_bounded, read_control, runtime, write_message, BackupLink, ChannelConfig, Error,
    Hello, LinkFailure, Message, PrimaryLink, Reader, Role, Security, Writer,
};

/// Bytes of one guest page as the transfer counts them.
pub const PAGE_SIZE: usize = 4096;
/// The most pages one [`Message::Pages`] carries (256 KiB): well inside a
/// frame, and small enough that the survivor's sender never holds much.
pub const PAGES_PER_MESSAGE: usize = 64;
/// How long the joiner waits for the survivor's next transfer message
/// before it gives up on the survivor.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// The state the joiner resumes from, sent at the end of the transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The last exit the survivor executed before the state was taken: the
    /// joiner's next synchronous exit is `exit + 1` (or `exit` again, if
    /// the guest waits there; the machine state says).
    pub exit: u64,
    /// The sequence number of the first record that follows.
    pub first_seq: u64,
    /// The monotonic clock (ns) at the handover: a joiner that goes live
    /// before the guest reads the clock again continues from it.
    pub clock_ns: u64,
    /// The survivor's state digest at the handover: the joiner's own,
    /// after restoring, must be equal.
    pub regs_crc: u32,
    pub mem_crc: u32,
    /// The VMM's machine state (vCPU, devices, the loop's own), encoded by
    /// the VMM.
    pub machine: Vec<u8>,
}

/// One step of the transfer, as the joiner receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transfer {
    /// Pages `first..`, back to back ([`PAGE_SIZE`] bytes each).
    Pages { first: u64, data: Vec<u8> },
    /// Pages `first..first + count` are zero.
    Zeros { first: u64, count: u64 },
    /// A pre-copy round ended.
    Round { round: u32, pages: u64 },
    /// The last message before the log.
    Handover(Handover),
}

/// Where a survivor waits for joiners.
pub struct JoinListener {
    rt: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl JoinListener {
    /// Listens on `addr` (port 0: any; see [`JoinListener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> Result<JoinListener, Error> {
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let rt = runtime()?;
        let listener = {
            let _entered = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        Ok(JoinListener { rt, listener, addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `limit` for a joiner and completes the handshake with
    /// it. `Ok(None)`: nobody came; `Err`: somebody came and the handshake
    /// failed (refused either way, TLS, a stall), which the caller reports
    /// before it waits again.
    pub fn accept(
        &self,
        hello: &Hello,
        security: &Security,
        limit: Duration,
    ) -> Result<Option<JoinSession>, Error> {
        let accepted = self.rt.block_on(async {
            match tokio::time::timeout(limit, self.listener.accept()).await {
                Err(_) => Ok(None),
                Ok(Err(e)) => Err(Error::Io(e)),
                Ok(Ok((stream, _))) => Ok(Some(stream.into_std()?)),
            }
        })?;
        let Some(stream) = accepted else {
            return Ok(None);
        };
        // The session's runtime drives its socket from here on (a socket
        // belongs to the runtime it was registered with).
        let rt = runtime()?;
        let (rd, wr, offset, peer) = rt.block_on(async {
            let stream = TcpStream::from_std(stream)?;
            establish_bounded(stream, hello, security).await
        })?;
        Ok(Some(JoinSession {
            rt,
            rd,
            wr,
            offset,
            peer,
            buf: Vec::new(),
            sent_bytes: 0,
        }))
    }
}

/// The survivor's end of one join, from the handshake to the handover.
pub struct JoinSession {
    rt: tokio::runtime::Runtime,
    rd: Reader,
    wr: Writer,
    offset: u64,
    peer: Hello,
    buf: Vec<u8>,
    sent_bytes: u64,
}

impl JoinSession {
    /// The joiner's Hello.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// Bytes of transfer messages sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    fn send(&mut self, m: &Message) -> Result<(), Error> {
        let (wr, buf) = (&mut self.wr, &mut self.buf);
        self.rt
            .block_on(write_message(wr, m, buf, Role::Backup))
            .map_err(Error::Failed)?;
        self.sent_bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Tells the joiner why it may not join, and ends the session.
    pub fn refuse(mut self, reason: &str) {
        let _ = self.send(&Message::Refuse {
            reason: reason.to_string(),
        });
        let wr = &mut self.wr;
        let _ = self.rt.block_on(wr.shutdown());
    }

    /// Accepts the join; the pair will have `epoch`.
    pub fn offer(&mut self, epoch: u64) -> Result<(), Error> {
        self.send(&Message::JoinOffer { epoch })
    }

    /// Sends pages `first..`, `data` holding whole pages (at most
    /// [`PAGES_PER_MESSAGE`] of them).
    pub fn send_pages(&mut self, first: u64, data: Vec<u8>) -> Result<(), Error> {
        self.send(&Message::Pages { first, data })
    }

    /// Says that pages `first..first + count` are zero.
    pub fn send_zeros(&mut self, first: u64, count: u64) -> Result<(), Error> {
        self.send(&Message::Zeros { first, count })
    }

    /// Ends a pre-copy round.
    pub fn send_round(&mut self, round: u32, pages: u64) -> Result<(), Error> {
        self.send(&Message::Round { round, pages })
    }

    /// Sends the handover and makes the session a primary's link whose
    /// first record is `handover.first_seq`.
    pub fn hand_over(
        mut self,
        handover: Handover,
        config: ChannelConfig,
    ) -> Result<PrimaryLink, Error> {
        let first_seq = handover.first_seq;
        self.send(&Message::Handover(handover))?;
        PrimaryLink::start(self.rt, (self.rd, self.wr, self.offset), config, first_seq)
    }
}

/// The joiner's end, from the handshake to the handover.
pub struct Joiner {
    rt: tokio::runtime::Runtime,
    rd: Reader,
    wr: Writer,
    offset: u64,
    peer: Hello,
    epoch: u64,
    received_bytes: u64,
}

impl Joiner {
    /// Connects to the survivor at `addr` (retrying until
    /// `connect_timeout`), completes the handshake and reads its answer:
    /// the join is accepted, or refused with the survivor's reason
    /// ([`Error::Refused`]).
    pub fn connect(
        addr: SocketAddr,
        hello: &Hello,
        security: &Security,
        connect_timeout: Duration,
    ) -> Result<Joiner, Error> {
        let rt = runtime()?;
        let (mut rd, wr, mut offset, peer) = rt.block_on(async {
            let deadline = Instant::now() + connect_timeout;
            let stream = loop {
                match TcpStream::connect(addr).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Error::Connect { addr, source: e })
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            establish_bounded(stream, hello, security).await
        })?;
        let answer = rt.block_on(async {
            tokio::time::timeout(
                TRANSFER_TIMEOUT,
                read_control(&mut rd, &mut offset, Role::Primary, "JoinOffer"),
            )
            .await
        });
        let epoch = match answer {
            Err(_) => {
                return Err(Error::Failed(LinkFailure::PeerSilent {
                    peer: Role::Primary,
                    for_ms: TRANSFER_TIMEOUT.as_millis() as u64,
                }))
            }
            Ok(Err(f)) => return Err(Error::Failed(f)),
            Ok(Ok(Message::JoinOffer { epoch })) => epoch,
            Ok(Ok(Message::Refuse { reason })) => return Err(Error::Refused(reason)),
            Ok(Ok(other)) => {
                return Err(Error::Failed(LinkFailure::Unexpected {
                    from: Role::Primary,
                    message: format!("{other:?} (JoinOffer expected)"),
                }))
            }
        };
        Ok(Joiner {
            rt,
            rd,
            wr,
            offset,
            peer,
            epoch,
            received_bytes: 0,
        })
    }

    /// The survivor's Hello.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// The epoch the pair will have.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes of transfer messages received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// The next step of the transfer, waiting at most [`TRANSFER_TIMEOUT`]
    /// (a survivor that stops sending has died, or given the join up), or
    /// until `stop` is raised.
    pub fn next(&mut self, stop: &AtomicBool) -> Result<Transfer, Error> {
        let (rd, offset) = (&mut self.rd, &mut self.offset);
        let before = *offset;
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        let msg = self.rt.block_on(async {
            let read = read_control(rd, offset, Role::Primary, "a transfer message");
            tokio::pin!(read);
            loop {
                let slice = tokio::time::sleep(Duration::from_millis(20));
                tokio::select! {
                    m = &mut read => return m.map_err(Error::Failed),
                    _ = slice => {
                        if stop.load(Ordering::SeqCst) {
                            return Err(Error::Interrupted);
                        }
                        if Instant::now() >= deadline {
                            return Err(Error::Failed(LinkFailure::PeerSilent {
                                peer: Role::Primary,
                                for_ms: TRANSFER_TIMEOUT.as_millis() as u64,
                            }));
                        }
                    }
                }
            }
        })?;
        self.received_bytes += self.offset - before;
        let unexpected = |m: Message| {
            Error::Failed(LinkFailure::Unexpected {
                from: Role::Primary,
                message: format!("{m:?} (a transfer message expected)"),
            })
        };
        Ok(match msg {
            Message::Pages { first, data } => {
                if data.is_empty() || data.len() % PAGE_SIZE != 0 {
                    return Err(unexpected(Message::Pages {
                        first,
                        data: Vec::new(),
                    }));
                }
                Transfer::Pages { first, data }
            }
            Message::Zeros { first, count } => Transfer::Zeros { first, count },
            Message::Round { round, pages } => Transfer::Round { round, pages },
            Message::Handover(h) => Transfer::Handover(h),
            Message::Refuse { reason } => return Err(Error::Refused(reason)),
            other => return Err(unexpected(other)),
        })
    }

    /// Tells the survivor we are alive (a heartbeat), while we restore:
    /// its link counts silence from the handover on.
    pub fn keepalive(&mut self) -> Result<(), Error> {
        let (wr, mut buf) = (&mut self.wr, Vec::new());
        self.rt
            .block_on(write_message(
                wr,
                &Message::Heartbeat { replayed_exit: 0 },
                &mut buf,
                Role::Primary,
            ))
            .map_err(Error::Failed)
    }

    /// After the handover: the link that carries the log, whose first
    /// record must be `first_seq`. Reading (and acknowledging) starts now,
    /// so a joiner calls this only once its state is restored and checked.
    pub fn into_link(self, config: ChannelConfig, first_seq: u64) -> Result<BackupLink, Error> {
        BackupLink::start(
            self.rt,
            (self.rd, self.wr, self.offset),
            self.peer,
            config,
            first_seq,
        )
    }
}

/// A flag that is never raised, for callers without a stop request.
pub fn never() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{encode_frame, Event, Position, Record};

    fn hello(role: Role) -> Hello {
        Hello {
            protocol: crate::channel::PROTOCOL_VERSION,
            role,
            vm_id: "vm1".into(),
            image_hash: [7; 32],
            machine: "m".into(),
            epoch: if role == Role::Primary { 4 } else { 0 },
            join: true,
        }
    }

    fn handover(first_seq: u64) -> Handover {
        Handover {
            exit: 100,
            first_seq,
            clock_ns: 5,
            regs_crc: 1,
            mem_crc: 2,
            machine: vec![9; 10],
        }
    }

    /// The survivor's side of one join: waits for the joiner's handshake.
    fn accept_one(listener: &JoinListener) -> JoinSession {
        loop {
            if let Some(s) = listener
                .accept(
                    &hello(Role::Primary),
                    &Security::Plaintext,
                    Duration::from_secs(5),
                )
                .unwrap()
            {
                return s;
            }
        }
    }

    #[test]
    fn a_join_transfers_state_then_the_log_resumes_at_its_sequence_number() {
        let listener = JoinListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let survivor = std::thread::spawn(move || {
            let mut s = accept_one(&listener);
            s.offer(5).unwrap();
            s.send_pages(3, vec![1; 2 * PAGE_SIZE]).unwrap();
            s.send_zeros(5, 10).unwrap();
            s.send_round(0, 12).unwrap();
            let link = s.hand_over(handover(40), ChannelConfig::default()).unwrap();
            let mut frames = Vec::new();
            for seq in 40..43 {
                let rec = Record {
                    seq,
                    pos: Position {
                        exit: 100 + seq,
                        ..Position::default()
                    },
                    event: Event::TimerTick,
                };
                encode_frame(&rec, &mut frames).unwrap();
            }
            let n = frames.len() as u64;
            link.send(frames, 3, n, true).unwrap();
            let state = link.state();
            link.close(Duration::from_secs(5)).unwrap();
            state.snapshot().acked
        });
        let stop = never();
        let mut j = Joiner::connect(
            addr,
            &hello(Role::Backup),
            &Security::Plaintext,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(j.epoch(), 5);
        assert_eq!(
            j.next(&stop).unwrap(),
            Transfer::Pages {
                first: 3,
                data: vec![1; 2 * PAGE_SIZE]
            }
        );
        assert_eq!(
            j.next(&stop).unwrap(),
            Transfer::Zeros {
                first: 5,
                count: 10
            }
        );
        assert_eq!(
            j.next(&stop).unwrap(),
            Transfer::Round {
                round: 0,
                pages: 12
            }
        );
        assert_eq!(j.next(&stop).unwrap(), Transfer::Handover(handover(40)));
        assert!(j.received_bytes() > 2 * PAGE_SIZE as u64);
        let mut link = j.into_link(ChannelConfig::default(), 40).unwrap();
        let mut seqs = Vec::new();
        while let Some(r) = link.recv().unwrap() {
            seqs.push(r.seq);
        }
        assert_eq!(seqs, vec![40, 41, 42]);
        assert_eq!(survivor.join().unwrap(), 43);
    }

    #[test]
    fn a_refused_join_says_why_and_a_mismatched_joiner_is_refused_by_hello() {
        let listener = JoinListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let survivor = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut served = 0;
            while served < 2 {
                match listener.accept(
                    &hello(Role::Primary),
                    &Security::Plaintext,
                    Duration::from_secs(5),
                ) {
                    Ok(Some(s)) => {
                        s.refuse("this VM already has a backup");
                        served += 1;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        errors.push(e.to_string());
                        served += 1;
                    }
                }
            }
            errors
        });
        let err = Joiner::connect(
            addr,
            &hello(Role::Backup),
            &Security::Plaintext,
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(
            matches!(&err, Error::Refused(r) if r.contains("already has a backup")),
            "{err}"
        );
        let mut other = hello(Role::Backup);
        other.machine = "another memory size".into();
        let err = Joiner::connect(addr, &other, &Security::Plaintext, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(err.to_string().contains("machine"), "{err}");
        let errors = survivor.join().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("machine"), "{errors:?}");
    }

    #[test]
    fn a_survivor_that_goes_silent_mid_transfer_is_given_up() {
        let listener = JoinListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr();
        let survivor = std::thread::spawn(move || {
            let mut s = accept_one(&listener);
            s.offer(5).unwrap();
            s.send_pages(0, vec![1; PAGE_SIZE]).unwrap();
            // Dies here: the connection closes without a handover.
            drop(s);
        });
        let stop = never();
        let mut j = Joiner::connect(
            addr,
            &hello(Role::Backup),
            &Security::Plaintext,
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(matches!(j.next(&stop).unwrap(), Transfer::Pages { .. }));
        let err = j.next(&stop).err().unwrap();
        assert!(
            matches!(
                err,
                Error::Failed(LinkFailure::PeerClosed {
                    peer: Role::Primary
                })
            ),
            "{err}"
        );
        survivor.join().unwrap();
    }
}
