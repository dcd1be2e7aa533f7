//! The host side of COM1: stdio, or a TCP listener that serves one client at
//! a time. It runs on its own threads and meets the vCPU thread only through
//! the bounded channels of a [`SerialLink`], so the device model never does
//! I/O and a slow consumer back-pressures instead of losing bytes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;

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

/// The host side of COM1 as the vCPU thread sees it: bounded channels to and
/// from the backend's threads. Bounded, so that a full receive FIFO pushes
/// back on the client instead of dropping bytes.
pub struct SerialLink {
    pub input: Receiver<Chunk>,
    pub output: SyncSender<Chunk>,
    /// The thread writing output to the world, joined by [`SerialLink::close`].
    pub writer: Option<thread::JoinHandle<()>>,
}

impl SerialLink {
    /// A link not connected to anything, for tests and replay.
    pub fn detached() -> (SerialLink, SyncSender<Chunk>, Receiver<Chunk>) {
        let (in_tx, in_rx) = sync_channel(CHANNEL_DEPTH);
        let (out_tx, out_rx) = sync_channel(CHANNEL_DEPTH);
        (
            SerialLink {
                input: in_rx,
                output: out_tx,
                writer: None,
            },
            in_tx,
            out_rx,
        )
    }
}

/// Starts the backend's threads and returns the vCPU side of the link.
/// A TCP address is bound here, before the guest boots, so that an address
/// in use is reported at once.
pub fn start(spec: &SerialSpec) -> Result<SerialLink, Error> {
    let (in_tx, in_rx) = sync_channel(CHANNEL_DEPTH);
    let (out_tx, out_rx) = sync_channel::<Chunk>(CHANNEL_DEPTH);
    let writer = match spec {
        SerialSpec::Stdio => {
            thread::Builder::new()
                .name("serial-in".into())
                .spawn(move || pump_in(std::io::stdin().lock(), 1, &in_tx))
                .map_err(Error::Spawn)?;
            thread::Builder::new()
                .name("serial-out".into())
                .spawn(move || {
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
            tracing::info!(
                "serial: listening on {}",
                listener.local_addr().unwrap_or(*addr)
            );
            serve_tcp(listener, in_tx, out_rx)?
        }
        SerialSpec::None => {
            drop(in_tx);
            thread::Builder::new()
                .name("serial-out".into())
                .spawn(move || while out_rx.recv().is_ok() {})
                .map_err(Error::Spawn)?
        }
    };
    Ok(SerialLink {
        input: in_rx,
        output: out_tx,
        writer: Some(writer),
    })
}

/// Copies a reader into the input channel until EOF, tagging every chunk
/// with the connection it came from; `send` blocks while the guest's FIFO
/// is full, which is the back-pressure.
fn pump_in(mut reader: impl Read, conn: u64, tx: &SyncSender<Chunk>) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                if tx.send((conn, buf[..n].to_vec())).is_err() {
                    return false;
                }
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
) -> Result<thread::JoinHandle<()>, Error> {
    let clients: Arc<Mutex<Vec<(u64, TcpStream)>>> = Arc::new(Mutex::new(Vec::new()));
    let writer_clients = clients.clone();
    let writer = thread::Builder::new()
        .name("serial-out".into())
        .spawn(move || {
            while let Ok((conn, bytes)) = out_rx.recv() {
                let mut clients = writer_clients.lock().unwrap_or_else(|e| e.into_inner());
                let target = match conn {
                    0 => clients.len().checked_sub(1),
                    c => clients.iter().position(|(id, _)| *id == c),
                };
                if let Some(i) = target {
                    if clients[i].1.write_all(&bytes).is_err() {
                        clients.remove(i);
                    }
                }
            }
        })
        .map_err(Error::Spawn)?;
    thread::Builder::new()
        .name("serial-accept".into())
        .spawn(move || {
            for (conn, stream) in (1..).zip(listener.incoming()) {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                let peer = stream.peer_addr().ok();
                tracing::debug!("serial: client {conn} {peer:?} connected");
                let Ok(writer) = stream.try_clone() else {
                    continue;
                };
                {
                    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
                    if clients.len() == RECENT_CLIENTS {
                        clients.remove(0);
                    }
                    clients.push((conn, writer));
                }
                let alive = pump_in(&stream, conn, &in_tx);
                tracing::debug!("serial: client {conn} {peer:?} finished sending");
                if !alive {
                    return;
                }
            }
        })
        .map_err(Error::Spawn)?;
    Ok(writer)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(start(&spec), Err(Error::Listen { .. })));
    }

    #[test]
    fn tcp_round_trip_and_reconnect() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let link = start(&SerialSpec::Tcp(addr)).unwrap();
        for round in 0..2u8 {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&[round; 3]).unwrap();
            let (conn, got) = link.input.recv().unwrap();
            assert_eq!(got, vec![round; 3]);
            link.output.send((conn, b"ok".to_vec())).unwrap();
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ok");
        }
    }

    #[test]
    fn replies_to_a_departed_client_do_not_reach_the_next() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let link = start(&SerialSpec::Tcp(addr)).unwrap();
        let mut first = TcpStream::connect(addr).unwrap();
        first.write_all(b"q1").unwrap();
        let (c1, _) = link.input.recv().unwrap();
        drop(first);
        let mut second = TcpStream::connect(addr).unwrap();
        second.write_all(b"q2").unwrap();
        let (c2, _) = link.input.recv().unwrap();
        assert_ne!(c1, c2);
        // The guest answers the first client late, then the second.
        link.output.send((c1, b"late".to_vec())).unwrap();
        link.output.send((c2, b"a2".to_vec())).unwrap();
        let mut buf = [0u8; 2];
        second.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a2");
    }
}
