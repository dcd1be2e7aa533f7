//! The TCP front end: one tokio task per connection, one line in, one line
//! out, in plaintext or in mutual TLS.
//!
//! Why this shape: connections are independent and cheap, so a slow or
//! hostile client ties up only its own task; decisions go through one mutex
//! around the [`Arbiter`], on a blocking thread because each one waits for
//! an fsync. Bad input is answered (where a reply is possible) and never
//! ends the server: lines are capped at [`MAX_LINE`] and idle connections
//! time out.
//!
//! With TLS ([`serve`] given a config) every client must present a
//! certificate from the deployment's CA; what it may ask is decided per
//! request by [`Peer::authorize`] and narrowed by [`Peer::narrow`], and
//! every refusal is logged. A client that speaks the other protocol (TLS
//! to a plaintext arbiter, plaintext to a TLS one) is told so in one JSON
//! error line, which the plaintext side reads as the arbiter's refusal and
//! the TLS side as a broken handshake; neither is left waiting.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::arbiter::Arbiter;
use crate::auth::{Identity, Peer};
use crate::protocol::{error_chain, ProtocolError, Request, Response, MAX_LINE};
use crate::tls::ServerConfig;

/// How long a connection may sit without sending a complete line.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long, and how many bytes, the server keeps reading after refusing an
/// over-long line, so that closing does not reset the connection before the
/// client has read the error reply.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: u64 = 4 * 1024 * 1024;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of every TLS connection (a handshake record); a JSON
/// request never starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plaintext arbiter answers a TLS client.
pub const NO_TLS_HERE: &str =
    "this arbiter does not speak TLS (it was started without --tls-ca, --tls-cert, --tls-key)";
/// What a TLS arbiter answers a plaintext client.
pub const TLS_REQUIRED: &str = "this arbiter requires TLS with a client certificate \
     (give --tls-ca, --tls-cert and --tls-key)";

/// Serves `arbiter` on `listener` until the runtime shuts down: in mutual
/// TLS with `tls` (which must require client certificates, as
/// [`crate::tls::TlsFiles::server_config`] does), else in plaintext.
pub async fn serve(listener: TcpListener, arbiter: Arbiter, tls: Option<Arc<ServerConfig>>) {
    let arbiter = Arc::new(Mutex::new(arbiter));
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                debug!(%peer, "connection");
                tokio::spawn(accept(
                    stream,
                    peer.to_string(),
                    acceptor.clone(),
                    Arc::clone(&arbiter),
                ));
            }
            Err(e) => {
                // Typically out of file descriptors: back off and go on.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What reading one line produced.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (newline stripped) followed by more input, or the final
    /// unterminated line before end of input (`last`).
    Line { last: bool },
    /// End of input and nothing read.
    Eof,
    /// The line exceeded the cap; the input stays unread past it.
    TooLong,
}

/// Reads one line into `buf` (cleared first), reading at most `max + 1`
/// bytes of it.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line { last: true }
            });
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + taken > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(available.get(..taken).unwrap_or_default());
        reader.consume(if done { taken + 1 } else { taken });
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(LineRead::Line { last: false });
        }
    }
}

/// Sorts a new connection by the protocol it speaks, runs the TLS
/// handshake if the arbiter has TLS, and serves it.
async fn accept(
    stream: TcpStream,
    peer: String,
    acceptor: Option<TlsAcceptor>,
    arbiter: Arc<Mutex<Arbiter>>,
) {
    let mut first = [0u8; 1];
    let speaks_tls = match tokio::time::timeout(IDLE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => first[0] == TLS_HANDSHAKE,
        // Closed, failed or idle before saying anything.
        _ => return,
    };
    match (acceptor, speaks_tls) {
        (None, false) => connection(stream, &peer, Peer::Anyone, arbiter).await,
        (None, true) => {
            warn!(%peer, "refused a TLS client: this arbiter runs without TLS");
            refuse(stream, NO_TLS_HERE).await;
        }
        (Some(_), false) => {
            warn!(%peer, "refused a plaintext client: this arbiter requires TLS");
            refuse(stream, TLS_REQUIRED).await;
        }
        (Some(acceptor), true) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Err(_) => warn!(%peer, "TLS handshake timed out"),
                Ok(Err(e)) => {
                    let reason = crate::tls::rustls_error(&e)
                        .map_or_else(|| e.to_string(), ToString::to_string);
                    warn!(%peer, "refused in the TLS handshake: {reason}");
                }
                Ok(Ok(tls)) => {
                    let names = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(crate::tls::dns_names)
                        .unwrap_or_default();
                    let identity = Identity::from_names(names);
                    info!(%peer, names = %identity.describe(), "TLS client");
                    connection(tls, &peer, Peer::Certified(identity), arbiter).await;
                }
            }
        }
    }
}

/// Answers one error line on a connection of the wrong protocol, then
/// closes it without resetting the reply away.
async fn refuse(stream: TcpStream, message: &str) {
    let (reader, mut writer) = stream.into_split();
    if writer
        .write_all(&Response::error(message).to_line())
        .await
        .is_ok()
    {
        drain_and_close(writer, BufReader::new(reader)).await;
    }
}

/// Shuts the write side, then reads and drops what the client still sends
/// (bounded), so that closing does not reset the connection before the
/// client has read the last reply.
async fn drain_and_close<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(mut writer: W, reader: R) {
    let _ = writer.shutdown().await;
    let mut sink = tokio::io::sink();
    let mut rest = reader.take(DRAIN_LIMIT);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, tokio::io::copy(&mut rest, &mut sink)).await;
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: &str,
    who: Peer,
    arbiter: Arc<Mutex<Arbiter>>,
) {
    let (reader, mut writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let read = tokio::time::timeout(
            IDLE_TIMEOUT,
            read_line_capped(&mut reader, &mut line, MAX_LINE),
        )
        .await;
        let last = match read {
            Err(_) => {
                debug!(%peer, "idle timeout");
                return;
            }
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "read failed");
                return;
            }
            Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::TooLong)) => {
                warn!(%peer, "request line too long; closing");
                let reply = Response::failure(&ProtocolError::LineTooLong).to_line();
                if writer.write_all(&reply).await.is_ok() {
                    drain_and_close(writer, reader).await;
                }
                return;
            }
            Ok(Ok(LineRead::Line { last })) => last,
        };
        let response = match Request::parse(&line) {
            Ok(request) => match who.authorize(&request) {
                Ok(()) => who.narrow(decide(&arbiter, request).await),
                Err(refusal) => {
                    warn!(%peer, "refused: {refusal}");
                    Response::failure(&refusal)
                }
            },
            Err(e) => {
                debug!(%peer, error = %error_chain(&e), "bad request");
                Response::failure(&e)
            }
        };
        if let Err(e) = writer.write_all(&response.to_line()).await {
            debug!(%peer, error = %e, "write failed");
            return;
        }
        if last {
            return;
        }
    }
}

/// Runs one request against the arbiter on a blocking thread (a decision
/// waits for an fsync) while holding the arbiter's mutex.
async fn decide(arbiter: &Arc<Mutex<Arbiter>>, request: Request) -> Response {
    let arbiter = Arc::clone(arbiter);
    let joined = tokio::task::spawn_blocking(move || match arbiter.lock() {
        Ok(mut arbiter) => arbiter.handle(&request),
        // A panic mid-decision may have left memory and file apart: refuse
        // to decide anything more rather than risk a second winner.
        Err(_) => Response::error("arbiter failed earlier; restart it"),
    })
    .await;
    joined.unwrap_or_else(|e| Response::error(format!("arbiter task failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(LineRead, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let read = read_line_capped(&mut reader, &mut buf, max)
                .await
                .expect("in-memory read");
            let stop = matches!(
                read,
                LineRead::Eof | LineRead::TooLong | LineRead::Line { last: true }
            );
            out.push((read, buf.clone()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn lines_are_split_and_capped() {
        assert_eq!(
            lines(b"ab\r\ncdefgh\n\nxyz", 8).await,
            vec![
                (LineRead::Line { last: false }, b"ab".to_vec()),
                (LineRead::Line { last: false }, b"cdefgh".to_vec()),
                (LineRead::Line { last: false }, b"".to_vec()),
                (LineRead::Line { last: true }, b"xyz".to_vec()),
            ]
        );
        assert_eq!(
            lines(b"12345678\n", 8).await,
            vec![
                (LineRead::Line { last: false }, b"12345678".to_vec()),
                (LineRead::Eof, b"".to_vec()),
            ]
        );
        let too_long = lines(b"123456789\n", 8).await;
        assert_eq!(too_long.last().map(|l| &l.0), Some(&LineRead::TooLong));
    }
}
