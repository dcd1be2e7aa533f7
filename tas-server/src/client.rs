//! A blocking client for the VMM's threads.
//!
//! Why blocking and std only: the VMM calls the arbiter from its failover
//! path on plain threads, rarely, and must not need a runtime for it. Each
//! call opens its own connection, so there is no connection state to go
//! stale across a partition; every step is bounded by the client's timeout.
//!
//! Retrying is the caller's business. [`ClientError::Unreachable`] means the
//! request was never sent; [`ClientError::Io`] means it may or may not have
//! been decided. Retrying `test_and_set` is safe after either, because the
//! holder asking again is granted again.
//!
//! With [`Client::with_tls`] every connection is mutual TLS: the arbiter
//! must prove it is `arbiter.duet` from the deployment's CA, and we present
//! our certificate. A TLS failure ([`ClientError::Tls`]: a certificate from
//! another CA, a server without TLS, no client certificate, a refused one)
//! is not retryable: a wrong credential stays wrong, and the pair must hear
//! about it rather than wait on it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

pub use crate::protocol::{Claim, ClaimOutcome, Status, VmStatus};
use crate::protocol::{Request, MAX_LINE};
use crate::tls::{self, ClientConfig, ARBITER_NAME};

/// Why a call did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed or timed out; nothing was sent.
    #[error("arbiter at {addr} unreachable")]
    Unreachable {
        /// The arbiter's address.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// Sending the request or reading the reply failed or timed out.
    #[error("arbiter I/O")]
    Io(#[from] io::Error),
    /// The reply is not what the protocol promises.
    #[error("bad reply from arbiter")]
    BadReply(#[from] ReplyError),
    /// A failure a caller reports in the client's terms; the client itself
    /// never returns it (it reports bad replies as [`ClientError::BadReply`]).
    #[error("bad reply from arbiter: {0}")]
    Protocol(String),
    /// The arbiter answered with an error; its one-line message.
    #[error("arbiter refused: {0}")]
    Server(String),
    /// The TLS handshake or a TLS record failed: a credential problem on
    /// one side or the other, never a network one.
    #[error("TLS with the arbiter at {addr} failed: {reason}")]
    Tls {
        /// The arbiter's address.
        addr: SocketAddr,
        /// What rustls said, with a hint at what to fix.
        reason: String,
    },
}

/// How a reply broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The arbiter closed the connection before replying.
    #[error("connection closed without a reply")]
    NoReply,
    /// The reply ended without a newline, or exceeded [`MAX_LINE`].
    #[error("reply cut short or longer than {MAX_LINE} bytes")]
    CutShort,
    /// The reply is not JSON.
    #[error("reply is not JSON")]
    NotJson(#[source] serde_json::Error),
    /// The reply lacks a boolean `ok`.
    #[error("reply lacks a boolean \"ok\"")]
    NoOk(#[source] serde_json::Error),
    /// `ok` is true but the rest does not fit the request.
    #[error("reply does not fit the request")]
    Shape(#[source] serde_json::Error),
    /// A claim reply about another epoch than the one claimed.
    #[error("claimed epoch {claimed}, reply is about epoch {replied}")]
    WrongEpoch {
        /// The epoch the request claimed.
        claimed: u64,
        /// The epoch the reply names.
        replied: u64,
    },
}

impl ClientError {
    /// Whether the same call may simply be tried again (the arbiter was not
    /// reached, or the exchange was cut off).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::Io(_))
    }
}

/// Talks to one arbiter.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    /// Mutual TLS, if given.
    tls: Option<Arc<ClientConfig>>,
}

#[derive(Deserialize)]
struct EpochReply {
    epoch: u64,
}

/// What every reply carries, read before the rest.
#[derive(Deserialize)]
struct ReplyHeader {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

impl Client {
    /// A client for the arbiter at `addr`; `timeout` bounds the connect, the
    /// send and the wait for the reply, each (at least 1 ms).
    pub fn new(addr: SocketAddr, timeout: Duration) -> Client {
        Client {
            addr,
            timeout: timeout.max(Duration::from_millis(1)),
            tls: None,
        }
    }

    /// The same client, speaking mutual TLS with `config` (from
    /// [`crate::tls::TlsFiles::client_config`]) and verifying that the
    /// arbiter is [`ARBITER_NAME`].
    pub fn with_tls(mut self, config: Arc<ClientConfig>) -> Client {
        self.tls = Some(config);
        self
    }

    /// The arbiter's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Claims `(vm_id, epoch)` for `claimant`. Only
    /// [`ClaimOutcome::Granted`] lets the caller go live.
    pub fn test_and_set(
        &self,
        vm_id: &str,
        epoch: u64,
        claimant: &str,
    ) -> Result<ClaimOutcome, ClientError> {
        let claim: Claim = self.call(&Request::TestAndSet {
            vm_id: vm_id.to_owned(),
            epoch,
            claimant: claimant.to_owned(),
        })?;
        check_epoch(claim, epoch)
    }

    /// Starts the next pairing epoch of `vm_id` and returns it.
    pub fn new_epoch(&self, vm_id: &str) -> Result<u64, ClientError> {
        let reply: EpochReply = self.call(&Request::NewEpoch {
            vm_id: vm_id.to_owned(),
        })?;
        Ok(reply.epoch)
    }

    /// Everything the arbiter has decided that this client may see (with
    /// TLS, the VMs its certificate names; all of them for an operator).
    pub fn status(&self) -> Result<Status, ClientError> {
        self.call(&Request::Status)
    }

    /// One exchange on a fresh connection.
    fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ClientError> {
        let tcp = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(|source| {
            ClientError::Unreachable {
                addr: self.addr,
                source,
            }
        })?;
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        tcp.set_nodelay(true)?;
        let Some(config) = &self.tls else {
            return self.exchange(tcp, request);
        };
        let name = ServerName::try_from(ARBITER_NAME).map_err(|e| ClientError::Tls {
            addr: self.addr,
            reason: e.to_string(),
        })?;
        let conn =
            ClientConnection::new(Arc::clone(config), name).map_err(|e| ClientError::Tls {
                addr: self.addr,
                reason: tls::explain(&e),
            })?;
        let mut stream = StreamOwned::new(conn, tcp);
        // The handshake on its own, so that its failure shows as such.
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| self.io_error(e))?;
        }
        self.exchange(stream, request)
    }

    /// Sends `request` on `stream` and reads one reply line.
    fn exchange<T: DeserializeOwned, S: Read + Write>(
        &self,
        mut stream: S,
        request: &Request,
    ) -> Result<T, ClientError> {
        stream
            .write_all(&request.to_line())
            .and_then(|()| stream.flush())
            .map_err(|e| self.io_error(e))?;
        let cap = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
        let mut reader = BufReader::new(stream.take(cap));
        let mut line = Vec::new();
        reader
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io_error(e))?;
        if line.pop() != Some(b'\n') {
            return Err(if line.is_empty() {
                ReplyError::NoReply
            } else {
                ReplyError::CutShort
            }
            .into());
        }
        parse_reply(&line)
    }

    /// An I/O failure as the client reports it: a TLS one if rustls is
    /// behind it (not retryable), else plain I/O.
    fn io_error(&self, e: io::Error) -> ClientError {
        match tls::tls_failure(&e) {
            Some(reason) => ClientError::Tls {
                addr: self.addr,
                reason,
            },
            None => ClientError::Io(e),
        }
    }
}

/// The outcome of `claim`, if it is about the `claimed` epoch.
fn check_epoch(claim: Claim, claimed: u64) -> Result<ClaimOutcome, ClientError> {
    if claim.epoch != claimed {
        return Err(ReplyError::WrongEpoch {
            claimed,
            replied: claim.epoch,
        }
        .into());
    }
    Ok(claim.outcome)
}

/// Checks `ok` and decodes the rest of a reply line (without its newline)
/// as `T` ([`Claim`], [`Status`], ...), as every call of the client does.
///
/// Public so that the fuzz target in `tas-server/fuzz` can feed it bytes a
/// hostile or broken arbiter might send, without a socket.
pub fn parse_reply<T: DeserializeOwned>(line: &[u8]) -> Result<T, ClientError> {
    let value: Value = serde_json::from_slice(line).map_err(ReplyError::NotJson)?;
    let header = ReplyHeader::deserialize(&value).map_err(ReplyError::NoOk)?;
    if !header.ok {
        return Err(ClientError::Server(
            header.error.unwrap_or_else(|| "(no message)".to_owned()),
        ));
    }
    Ok(T::deserialize(value).map_err(ReplyError::Shape)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn replies_decode_or_say_why_not() {
        let claim: Claim =
            parse_reply(br#"{"ok":true,"outcome":"held_by","holder":"a","epoch":3}"#)
                .expect("claim");
        assert_eq!(
            check_epoch(claim.clone(), 3).expect("same epoch"),
            ClaimOutcome::HeldBy { holder: "a".into() }
        );
        assert!(matches!(
            check_epoch(claim, 4),
            Err(ClientError::BadReply(ReplyError::WrongEpoch {
                claimed: 4,
                replied: 3
            }))
        ));
        let claim: Claim =
            parse_reply(br#"{"ok":true,"outcome":"superseded","current_epoch":9,"epoch":3}"#)
                .expect("claim");
        assert_eq!(claim.outcome, ClaimOutcome::Superseded { current_epoch: 9 });
        assert!(matches!(
            parse_reply::<Claim>(br#"{"ok":false,"error":"nope"}"#),
            Err(ClientError::Server(m)) if m == "nope"
        ));
        assert!(matches!(
            parse_reply::<Claim>(br#"{"ok":false}"#),
            Err(ClientError::Server(m)) if m == "(no message)"
        ));
        assert!(matches!(
            parse_reply::<Claim>(br#"{"ok":true,"outcome":"granted"}"#),
            Err(ClientError::BadReply(ReplyError::Shape(_)))
        ));
        // The earlier granted/holder shape is refused, not misread.
        assert!(matches!(
            parse_reply::<Claim>(br#"{"ok":true,"granted":true,"holder":"a","epoch":3}"#),
            Err(ClientError::BadReply(ReplyError::Shape(_)))
        ));
        assert!(matches!(
            parse_reply::<Claim>(b"\xff"),
            Err(ClientError::BadReply(ReplyError::NotJson(_)))
        ));
        assert!(matches!(
            parse_reply::<Claim>(br#"{"outcome":"granted","epoch":3}"#),
            Err(ClientError::BadReply(ReplyError::NoOk(_)))
        ));
        assert!(matches!(
            parse_reply::<Claim>(br#"{"ok":"yes"}"#),
            Err(ClientError::BadReply(ReplyError::NoOk(_)))
        ));
        let err = parse_reply::<Claim>(br#"{"ok":true}"#).expect_err("no claim");
        let message = crate::protocol::error_chain(&err);
        assert!(
            message.starts_with("bad reply from arbiter: reply does not fit the request: "),
            "{message}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_closed_port_is_unreachable() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let client = Client::new(addr, Duration::from_secs(2));
        let err = client.status().expect_err("nobody listens");
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
        assert!(err.is_retryable());
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = Client::new(
            listener.local_addr().expect("addr"),
            Duration::from_millis(200),
        );
        let err = client.new_epoch("kv1").expect_err("no reply comes");
        assert!(matches!(err, ClientError::Io(_)), "{err:?}");
        drop(listener);
    }
}
