//! The host side of COM1: stdio, or a TCP listener that serves one client at
//! a time. It runs on its own threads and meets the vCPU thread only through
//! the bounded channels of a [`SerialPort`], so the device model never does
//! I/O and a slow consumer back-pressures instead of losing bytes.
//!
//! The serial policy lives here too, not in the timelines: which client
//! each byte came from, when the line changes hands (a hang-up the guest
//! sees), and which client an output answers. The rest of the VMM sees
//! [`SerialInput`]s and opaque addressed [`Chunk`]s.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SendError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread;

use crate::doorbell::Doorbell;
use crate::timeline::{SerialDemand, SerialInput};

/// Bytes tagged with the client connection they came from or go to (0:
/// none in particular). The guest never sees the tag.
pub type Chunk = (u64, Vec<u8>);

/// Chunks in flight between the backend and the vCPU thread, each direction.
const CHANNEL_DEPTH: usize = 16;
/// Largest chunk read from the host at once.
const CHUNK: usize = 4096;

/// Errors starting the serial backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad serial spec {0:?}: expected stdio, none or tcp:HOST:PORT")]
    Spec(String),
    #[error("cannot start a serial thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where COM1 is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// The process's stdin and stdout.
    Stdio,
    /// A TCP listener; one client at a time.
    Tcp(SocketAddr),
    /// Nothing: input never arrives, output is discarded.
    None,
}

impl FromStr for SerialSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            "none" => Ok(SerialSpec::None),
            _ => s
                .strip_prefix("tcp:")
                .and_then(|a| a.parse().ok())
                .map(SerialSpec::Tcp)
                .ok_or_else(|| Error::Spec(s.to_string())),
        }
    }
}

/// Host input waiting for room in the guest's FIFO, in order, each run
/// tagged with its connection.
struct Pending {
    link: Receiver<Chunk>,
    runs: VecDeque<(u64, VecDeque<u8>)>,
    len: usize,
    closed: bool,
    /// The connection of the last byte handed to the guest: its output is
    /// presumed to answer that connection.
    last_conn: u64,
}

impl Pending {
    fn push(&mut self, (conn, bytes): Chunk) {
        self.len += bytes.len();
        match self.runs.back_mut() {
            Some((c, run)) if *c == conn => run.extend(bytes),
            _ => self.runs.push_back((conn, bytes.into())),
        }
    }

    /// Reads from the backend only while what is pending would not fill
    /// `room`, so the backlog stays bounded and the channel back-pressures
    /// the client.
    fn fill(&mut self, room: usize) {
        while self.len < room && !self.closed {
            match self.link.try_recv() {
                Ok(chunk) => self.push(chunk),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
    }

    /// See [`SerialPort::take`].
    fn take(&mut self, room: usize, can_hang_up: bool) -> Option<SerialInput> {
        self.fill(room.max(1));
        let conn = self.runs.front()?.0;
        if self.last_conn != 0 && conn != self.last_conn {
            if !can_hang_up {
                return None;
            }
            self.last_conn = conn;
            return Some(SerialInput::Hangup);
        }
        let mut out = Vec::new();
        while out.len() < room {
            let Some((c, run)) = self.runs.front_mut() else {
                break;
            };
            if *c != conn {
                break;
            }
            let n = (room - out.len()).min(run.len());
            out.extend(run.drain(..n));
            if run.is_empty() {
                self.runs.pop_front();
            }
        }
        self.last_conn = conn;
        self.len -= out.len();
        (!out.is_empty()).then_some(SerialInput::Bytes(out))
    }
}

/// The clients of a TCP backend, shared by its writer thread and every
/// [`SerialSender`], which may write to them at once.
struct Clients {
    list: Mutex<Vec<(u64, TcpStream)>>,
    /// Chunks handed to the writer thread and not yet written: while there
    /// are any, nobody writes at once (output leaves in order).
    queued: AtomicUsize,
}

/// What became of a chunk written at once.
enum Written {
    /// All of it left (or it had nowhere to go, and was dropped as the
    /// writer thread drops it).
    Done,
    /// The client's socket is full: the rest goes through the writer.
    Rest(Chunk),
}

impl Clients {
    /// Which client `conn` means: the newest for 0.
    fn target(list: &[(u64, TcpStream)], conn: u64) -> Option<usize> {
        match conn {
            0 => list.len().checked_sub(1),
            c => list.iter().position(|(id, _)| *id == c),
        }
    }

    /// Writes what the client's socket takes now, without blocking.
    fn write_now(list: &mut Vec<(u64, TcpStream)>, (conn, bytes): Chunk) -> Written {
        let Some(i) = Self::target(list, conn) else {
            return Written::Done;
        };
        let fd = list[i].1.as_raw_fd();
        let mut off = 0;
        while off < bytes.len() {
            let rest = &bytes[off..];
            // SAFETY: `fd` is the open socket of `list[i]`, which the lock
            // keeps open, and `rest` is valid for `rest.len()` bytes.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                off += n as usize;
                continue;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => {
                    return Written::Rest((conn, bytes[off..].to_vec()));
                }
                _ => {
                    // Gone: as the writer thread does, forget the client.
                    list.remove(i);
                    return Written::Done;
                }
            }
        }
        Written::Done
    }
}

/// The sending end of COM1's output, for the vCPU thread and for whoever
/// releases held output (the Output Rule's gate, from the log channel's
/// thread). A TCP backend's chunk is written to its client at once when
/// nothing is queued before it and the socket takes it: handing every
/// reply to the writer thread was one more wake-up, and so on a busy
/// two-core host one more preempted vCPU, on the path of every output.
#[derive(Clone)]
pub struct SerialSender {
    queue: SyncSender<Chunk>,
    direct: Option<Arc<Clients>>,
}

impl SerialSender {
    fn queued(queue: SyncSender<Chunk>) -> Self {
        SerialSender {
            queue,
            direct: None,
        }
    }

    /// Writes `chunk` at once if it can, else hands it to the writer
    /// thread; `hand` does that (blocking or not). On a hand-over that
    /// fails, what is handed back is what was not written.
    fn deliver<E>(
        &self,
        chunk: Chunk,
        hand: impl FnOnce(&SyncSender<Chunk>, Chunk) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(c) = &self.direct else {
            return hand(&self.queue, chunk);
        };
        let chunk = match c.list.try_lock() {
            Ok(mut list) if c.queued.load(Ordering::SeqCst) == 0 => {
                match Clients::write_now(&mut list, chunk) {
                    Written::Done => return Ok(()),
                    // Counted while the lock is held, so that nobody
                    // writes at once behind it.
                    Written::Rest(rest) => {
                        c.queued.fetch_add(1, Ordering::SeqCst);
                        drop(list);
                        return hand(&self.queue, rest).inspect_err(|_| {
                            c.queued.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                }
            }
            // The writer thread is writing, or chunks wait for it.
            Ok(_) | Err(TryLockError::WouldBlock) | Err(TryLockError::Poisoned(_)) => chunk,
        };
        c.queued.fetch_add(1, Ordering::SeqCst);
        hand(&self.queue, chunk).inspect_err(|_| {
            c.queued.fetch_sub(1, Ordering::SeqCst);
        })
    }

    /// Blocks while the writer's queue is full (back-pressure).
    pub fn send(&self, chunk: Chunk) -> Result<(), SendError<Chunk>> {
        self.deliver(chunk, |q, c| q.send(c))
    }

    /// Never blocks: a full queue hands the chunk (what is left of it)
    /// back.
    pub fn try_send(&self, chunk: Chunk) -> Result<(), TrySendError<Chunk>> {
        self.deliver(chunk, |q, c| q.try_send(c))
    }
}

/// The host side of COM1 as the vCPU thread sees it: bounded channels to and
/// from the backend's threads (bounded, so that a full receive FIFO pushes
/// back on the client instead of dropping bytes), and the serial policy.
pub struct SerialPort {
    input: Pending,
    output: Option<SerialSender>,
    /// The thread writing output to the world, joined by [`SerialPort::close`].
    writer: Option<thread::JoinHandle<()>>,
    /// The bound address of a TCP listener (so a caller can ask for port 0).
    local_addr: Option<SocketAddr>,
}

impl SerialPort {
    fn new(
        input: Receiver<Chunk>,
        output: SerialSender,
        writer: Option<thread::JoinHandle<()>>,
    ) -> Self {
        SerialPort {
            input: Pending {
                link: input,
                runs: VecDeque::new(),
                len: 0,
                closed: false,
                last_conn: 0,
            },
            output: Some(output),
            writer,
            local_addr: None,
        }
    }

    /// The address a TCP listener was bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// A port not connected to anything, for tests: the returned sender
    /// feeds its input (ring `bell` after each send) and the receiver
    /// gets its output.
    pub fn detached() -> (SerialPort, SyncSender<Chunk>, Receiver<Chunk>) {
        let (in_tx, in_rx) = sync_channel(CHANNEL_DEPTH);
        let (out_tx, out_rx) = sync_channel(CHANNEL_DEPTH);
        (
            SerialPort::new(in_rx, SerialSender::queued(out_tx), None),
            in_tx,
            out_rx,
        )
    }

    /// The next input for the guest, without blocking: up to `demand.room`
    /// bytes of one connection, or a hang-up when the bytes that come next
    /// are from another connection than the last ones. The line changes
    /// hands only while the guest waits (`idle`) with nothing unread: by
    /// then it has finished answering the last client, so no reply is split
    /// between two clients, and it can tell the two clients' bytes apart.
    pub fn take(&mut self, demand: &SerialDemand, idle: bool) -> Option<SerialInput> {
        self.input.take(demand.room, demand.rx_empty && idle)
    }

    /// True if the input has ended and nothing of it is left.
    pub fn input_closed(&self) -> bool {
        self.input.closed && self.input.len == 0
    }

    /// Addresses output produced now to the connection whose input the
    /// guest read last.
    pub fn address(&self, bytes: Vec<u8>) -> Chunk {
        (self.input.last_conn, bytes)
    }

    /// A sender for addressed output, for a thread that releases held
    /// output later (the Output Rule).
    pub fn sender(&self) -> Option<SerialSender> {
        self.output.clone()
    }

    /// After a failover the guest may hold part of a request from a client
    /// of the dead primary: the first bytes from any client come after a
    /// hang-up.
    pub fn after_failover(&mut self) {
        self.input.last_conn = u64::MAX;
    }

    /// Closes the output and waits until all of it was written.
    pub fn close(&mut self) {
        self.output.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Starts the backend's threads and returns the vCPU side. Input threads
/// ring `bell` after each chunk they queue. A TCP address is bound here,
/// before the guest boots, so that an address in use is reported at once.
pub fn start(spec: &SerialSpec, bell: &Doorbell) -> Result<SerialPort, Error> {
    let (in_tx, in_rx) = sync_channel(CHANNEL_DEPTH);
    let (out_tx, out_rx) = sync_channel::<Chunk>(CHANNEL_DEPTH);
    let mut local_addr = None;
    let mut direct = None;
    let writer = match spec {
        SerialSpec::Stdio => {
            let bell = bell.clone();
            thread::Builder::new()
                .name("serial-in".into())
                .spawn(move || {
                    logchannel::sched::promote_io_thread();
                    pump_in(std::io::stdin().lock(), 1, &in_tx, &bell)
                })
                .map_err(Error::Spawn)?;
            thread::Builder::new()
                .name("serial-out".into())
                .spawn(move || {
                    logchannel::sched::promote_io_thread();
                    let mut out = std::io::stdout().lock();
                    while let Ok((_, bytes)) = out_rx.recv() {
                        if out.write_all(&bytes).and_then(|_| out.flush()).is_err() {
                            // stdout closed: keep draining so the guest runs on.
                            while out_rx.recv().is_ok() {}
                        }
                    }
                })
                .map_err(Error::Spawn)?
        }
        SerialSpec::Tcp(addr) => {
            let listener = TcpListener::bind(addr).map_err(|source| Error::Listen {
                addr: *addr,
                source,
            })?;
            let bound = listener.local_addr().unwrap_or(*addr);
            local_addr = Some(bound);
            tracing::info!("serial: listening on {bound}");
            let (writer, clients) = serve_tcp(listener, in_tx, out_rx, bell.clone())?;
            direct = Some(clients);
            writer
        }
        SerialSpec::None => {
            drop(in_tx);
            thread::Builder::new()
                .name("serial-out".into())
                .spawn(move || {
                    logchannel::sched::promote_io_thread();
                    while out_rx.recv().is_ok() {}
                })
                .map_err(Error::Spawn)?
        }
    };
    let out = SerialSender {
        queue: out_tx,
        direct,
    };
    let mut port = SerialPort::new(in_rx, out, Some(writer));
    port.local_addr = local_addr;
    Ok(port)
}

/// Copies a reader into the input channel until EOF, tagging every chunk
/// with the connection it came from; `send` blocks while the guest's FIFO
/// is full, which is the back-pressure.
fn pump_in(mut reader: impl Read, conn: u64, tx: &SyncSender<Chunk>, bell: &Doorbell) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                if tx.send((conn, buf[..n].to_vec())).is_err() {
                    return false;
                }
                bell.ring();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Connections whose replies may still be on their way.
const RECENT_CLIENTS: usize = 4;

/// Accepts one client at a time; the next is accepted when the last one has
/// closed its side.
///
/// The guest sees one serial line, but clients come and go: each output
/// chunk is tagged with the connection whose input the guest had read
/// last, and goes to that connection only. A reply to a client that left
/// is dropped instead of reaching the next one, and a client that only
/// half-closed (sent everything, still reading) gets its replies. Output
/// produced before any input goes to the newest client; with nobody
/// connected it is discarded, as on a serial line with nobody listening.
fn serve_tcp(
    listener: TcpListener,
    in_tx: SyncSender<Chunk>,
    out_rx: Receiver<Chunk>,
    bell: Doorbell,
) -> Result<(thread::JoinHandle<()>, Arc<Clients>), Error> {
    let shared = Arc::new(Clients {
        list: Mutex::new(Vec::new()),
        queued: AtomicUsize::new(0),
    });
    let writer_clients = shared.clone();
    let writer = thread::Builder::new()
        .name("serial-out".into())
        .spawn(move || {
            logchannel::sched::promote_io_thread();
            let c = writer_clients;
            while let Ok((conn, bytes)) = out_rx.recv() {
                let mut clients = c.list.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = Clients::target(&clients, conn) {
                    if clients[i].1.write_all(&bytes).is_err() {
                        clients.remove(i);
                    }
                }
                // Written (or dropped) while the lock is held: a sender
                // that sees no chunk queued may write at once after it.
                c.queued.fetch_sub(1, Ordering::SeqCst);
            }
        })
        .map_err(Error::Spawn)?;
    let clients = shared.clone();
    thread::Builder::new()
        .name("serial-accept".into())
        .spawn(move || {
            logchannel::sched::promote_io_thread();
            for (conn, stream) in (1..).zip(listener.incoming()) {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                let peer = stream.peer_addr().ok();
                tracing::debug!("serial: client {conn} {peer:?} connected");
                let Ok(writer) = stream.try_clone() else {
                    continue;
                };
                {
                    let mut clients = clients.list.lock().unwrap_or_else(|e| e.into_inner());
                    if clients.len() == RECENT_CLIENTS {
                        clients.remove(0);
                    }
                    clients.push((conn, writer));
                }
                let alive = pump_in(&stream, conn, &in_tx, &bell);
                tracing::debug!("serial: client {conn} {peer:?} finished sending");
                if !alive {
                    return;
                }
            }
        })
        .map_err(Error::Spawn)?;
    Ok((writer, shared))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const ROOM: SerialDemand = SerialDemand {
        room: 64,
        rx_empty: true,
    };

    /// The next input, waiting on the bell for at most five seconds.
    fn next(port: &mut SerialPort, bell: &Doorbell, idle: bool) -> Option<SerialInput> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = bell.count();
            if let Some(i) = port.take(&ROOM, idle) {
                return Some(i);
            }
            if Instant::now() > deadline {
                return None;
            }
            bell.wait(seen, Duration::from_millis(50));
        }
    }

    #[test]
    fn parses_specs() {
        assert_eq!("stdio".parse::<SerialSpec>().unwrap(), SerialSpec::Stdio);
        assert_eq!("none".parse::<SerialSpec>().unwrap(), SerialSpec::None);
        assert_eq!(
            "tcp:127.0.0.1:6380".parse::<SerialSpec>().unwrap(),
            SerialSpec::Tcp("127.0.0.1:6380".parse().unwrap())
        );
        assert!("tcp:nowhere".parse::<SerialSpec>().is_err());
        assert!("udp:1.2.3.4:5".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn address_in_use_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = SerialSpec::Tcp(taken.local_addr().unwrap());
        assert!(matches!(
            start(&spec, &Doorbell::new()),
            Err(Error::Listen { .. })
        ));
    }

    #[test]
    fn input_never_exceeds_room_and_loses_nothing() {
        let (mut port, tx, _out) = SerialPort::detached();
        tx.send((1, b"hello".to_vec())).unwrap();
        tx.send((2, b" world".to_vec())).unwrap();
        let bytes = |b: &[u8]| Some(SerialInput::Bytes(b.to_vec()));
        let room = |n| SerialDemand {
            room: n,
            rx_empty: true,
        };
        assert_eq!(port.take(&room(3), true), bytes(b"hel"));
        assert_eq!(port.address(vec![]).0, 1);
        assert_eq!(port.take(&room(0), true), None);
        // The first client's bytes only, then (once the guest has read
        // them and waits) a hang-up, then the second client's.
        assert_eq!(port.take(&room(100), false), bytes(b"lo"));
        assert_eq!(port.take(&room(100), false), None);
        assert_eq!(port.take(&room(100), true), Some(SerialInput::Hangup));
        assert_eq!(port.take(&room(100), false), bytes(b" world"));
        assert_eq!(port.address(vec![]).0, 2);
        assert_eq!(port.take(&room(100), true), None);
        assert!(!port.input_closed());
        drop(tx);
        assert_eq!(port.take(&room(100), true), None);
        assert!(port.input_closed());
    }

    #[test]
    fn after_a_failover_the_first_client_starts_with_a_hang_up() {
        let (mut port, tx, _out) = SerialPort::detached();
        port.after_failover();
        tx.send((7, b"x".to_vec())).unwrap();
        assert_eq!(port.take(&ROOM, true), Some(SerialInput::Hangup));
        assert_eq!(
            port.take(&ROOM, true),
            Some(SerialInput::Bytes(b"x".to_vec()))
        );
    }

    #[test]
    fn tcp_round_trip_and_reconnect() {
        let bell = Doorbell::new();
        let any = "127.0.0.1:0".parse().unwrap();
        let mut port = start(&SerialSpec::Tcp(any), &bell).unwrap();
        let addr = port.local_addr().unwrap();
        let out = port.sender().unwrap();
        for round in 0..2u8 {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&[round; 3]).unwrap();
            let mut got = next(&mut port, &bell, true);
            if got == Some(SerialInput::Hangup) {
                got = next(&mut port, &bell, true);
            }
            assert_eq!(got, Some(SerialInput::Bytes(vec![round; 3])));
            out.send(port.address(b"ok".to_vec())).unwrap();
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ok");
        }
    }

    #[test]
    fn replies_to_a_departed_client_do_not_reach_the_next() {
        let bell = Doorbell::new();
        let any = "127.0.0.1:0".parse().unwrap();
        let mut port = start(&SerialSpec::Tcp(any), &bell).unwrap();
        let addr = port.local_addr().unwrap();
        let out = port.sender().unwrap();
        let mut first = TcpStream::connect(addr).unwrap();
        first.write_all(b"q1").unwrap();
        assert!(next(&mut port, &bell, true).is_some());
        let late = port.address(b"late".to_vec());
        drop(first);
        let mut second = TcpStream::connect(addr).unwrap();
        second.write_all(b"q2").unwrap();
        assert_eq!(next(&mut port, &bell, true), Some(SerialInput::Hangup));
        assert!(next(&mut port, &bell, true).is_some());
        // The guest answers the first client late, then the second.
        out.send(late).unwrap();
        out.send(port.address(b"a2".to_vec())).unwrap();
        let mut buf = [0u8; 2];
        second.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a2");
    }

    /// Chunks written at once and chunks the writer thread writes (the
    /// client's socket was full, or chunks were queued) reach the client
    /// whole and in order, and a sender that must not block never does.
    #[test]
    fn written_at_once_or_queued_output_arrives_in_order() {
        let bell = Doorbell::new();
        let any = "127.0.0.1:0".parse().unwrap();
        let mut port = start(&SerialSpec::Tcp(any), &bell).unwrap();
        let addr = port.local_addr().unwrap();
        let out = port.sender().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(b"q").unwrap();
        assert!(next(&mut port, &bell, true).is_some());
        // 4 MiB in chunks of 1000 bytes, each chunk its own number's byte:
        // far more than the socket buffers hold, so the client's reader,
        // which starts late, forces every path.
        let chunks: Vec<Vec<u8>> = (0..4200u32).map(|i| vec![(i % 251) as u8; 1000]).collect();
        let expected: Vec<u8> = chunks.concat();
        let reader = thread::spawn(move || {
            thread::sleep(std::time::Duration::from_millis(200));
            let mut got = vec![0u8; 4200 * 1000];
            client.read_exact(&mut got).unwrap();
            got
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for (i, c) in chunks.into_iter().enumerate() {
            let mut chunk = port.address(c);
            if i % 3 == 0 {
                out.send(chunk).unwrap();
                continue;
            }
            // As the Output Rule's gate does: what comes back is kept and
            // offered again, first in line.
            loop {
                let started = std::time::Instant::now();
                let r = out.try_send(chunk);
                assert!(started.elapsed() < std::time::Duration::from_secs(1));
                match r {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) => {
                        chunk = back;
                        assert!(std::time::Instant::now() < deadline);
                        thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(TrySendError::Disconnected(_)) => panic!("writer gone"),
                }
            }
        }
        let got = reader.join().unwrap();
        assert!(got == expected, "output reordered or lost");
    }
}
