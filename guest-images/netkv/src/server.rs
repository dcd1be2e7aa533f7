//! The Redis connections: a fixed pool of TCP sockets listening on port
//! 6379, each with its own request and reply buffers, all sharing one
//! keyspace.
//!
//! smoltcp hands an incoming SYN to the first socket that listens on the
//! port, so a pool of [`SOCKETS`] listening sockets serves that many clients
//! at once; a socket whose connection ended listens again.

use alloc::vec;
use alloc::vec::Vec;

use duet_resp::{Db, Stop};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Duration;

/// The Redis port.
pub const PORT: u16 = 6379;
/// Connections served at once (redis-benchmark opens 50 by default).
pub const SOCKETS: usize = 128;
/// Per-socket receive buffer: the largest TCP window offered.
const SOCKET_RX: usize = 16 * 1024;
/// Per-socket send buffer.
const SOCKET_TX: usize = 16 * 1024;
/// Replies a connection may have waiting for room in its send buffer
/// before its further requests wait too (then TCP flow control pushes back
/// on the client).
const MAX_OUT: usize = 64 * 1024;
/// Idle connections are probed this often, and dropped when the peer has
/// not answered for [`PEER_TIMEOUT`], so vanished clients do not hold
/// sockets forever.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// One socket of the pool and what its current client left unanswered.
struct Conn {
    handle: SocketHandle,
    /// Received bytes that are not a whole request yet.
    input: Vec<u8>,
    /// Replies not yet taken by the socket.
    out: Vec<u8>,
    /// Bytes at the front of `out` already sent.
    out_sent: usize,
    /// QUIT or a protocol error: close once `out` is sent.
    closing: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.input.clear();
        self.out.clear();
        self.out_sent = 0;
        self.closing = false;
    }

    /// Moves as much of `out` into the socket as it takes.
    fn push_out(&mut self, socket: &mut tcp::Socket) {
        if self.out_sent < self.out.len() && socket.can_send() {
            // Errors mean the connection is gone; the state check in
            // `serve` cleans up next time.
            self.out_sent += socket.send_slice(&self.out[self.out_sent..]).unwrap_or(0);
        }
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() - self.out_sent
    }
}

/// The server: the keyspace and the connection pool.
pub struct Server {
    db: Db,
    conns: Vec<Conn>,
}

impl Server {
    /// Adds [`SOCKETS`] listening sockets to `sockets`.
    pub fn new(sockets: &mut SocketSet<'_>) -> Server {
        let conns = (0..SOCKETS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; SOCKET_RX]),
                    tcp::SocketBuffer::new(vec![0; SOCKET_TX]),
                );
                configure(&mut socket);
                socket.listen(PORT).expect("listen on a fresh socket");
                Conn {
                    handle: sockets.add(socket),
                    input: Vec::new(),
                    out: Vec::new(),
                    out_sent: 0,
                    closing: false,
                }
            })
            .collect();
        Server {
            db: Db::new(),
            conns,
        }
    }

    /// Serves every connection once: reads what arrived, answers each whole
    /// request (all of a pipelined batch, up to [`MAX_OUT`] of replies) and
    /// queues the replies in the sockets.
    pub fn serve(&mut self, sockets: &mut SocketSet<'_>) {
        for conn in &mut self.conns {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            if !socket.is_open() {
                // Closed, or in TIME-WAIT after our close: the next client
                // may have this socket.
                conn.reset();
                configure(socket);
                socket.listen(PORT).expect("listen on a closed socket");
                continue;
            }
            if !socket.is_active() {
                // Listening: nobody here yet.
                continue;
            }
            conn.push_out(socket);
            while !conn.closing {
                // Read only while replies have room, so that a client that
                // does not read its replies is stopped by TCP, not memory.
                let room = conn.pending_out() < MAX_OUT;
                let got = if room && socket.can_recv() {
                    socket
                        .recv(|data| {
                            conn.input.extend_from_slice(data);
                            (data.len(), data.len())
                        })
                        .unwrap_or(0)
                } else {
                    0
                };
                if room && !conn.input.is_empty() {
                    let served =
                        duet_resp::serve(&mut self.db, &conn.input, &mut conn.out, MAX_OUT);
                    conn.input.drain(..served.used);
                    if matches!(served.stop, Stop::Quit | Stop::ProtocolError) {
                        // Redis ignores whatever follows and hangs up.
                        conn.closing = true;
                        conn.input.clear();
                    }
                }
                conn.push_out(socket);
                if got == 0 {
                    break;
                }
            }
            // Close our side after the last reply: on QUIT or a protocol
            // error, or once the client has closed its side and nothing it
            // sent is left to answer.
            let peer_done = socket.state() == tcp::State::CloseWait && !socket.can_recv();
            if (conn.closing || peer_done) && conn.pending_out() == 0 {
                socket.close();
            }
        }
    }
}

/// Options for a socket about to listen (smoltcp resets some on close).
fn configure(socket: &mut tcp::Socket) {
    // Replies go out at once, like Redis's TCP_NODELAY; pipelined replies
    // are batched into one send anyway.
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(Some(KEEP_ALIVE));
    socket.set_timeout(Some(PEER_TIMEOUT));
}
