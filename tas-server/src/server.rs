//! The TCP front end: one tokio task per connection, one line in, one line
//! out.
//!
//! Why this shape: connections are independent and cheap, so a slow or
//! hostile client ties up only its own task; decisions go through one mutex
//! around the [`Arbiter`], on a blocking thread because each one waits for
//! an fsync. Bad input is answered (where a reply is possible) and never
//! ends the server: lines are capped at [`MAX_LINE`] and idle connections
//! time out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::arbiter::Arbiter;
use crate::protocol::{error_chain, ProtocolError, Request, Response, MAX_LINE};

/// How long a connection may sit without sending a complete line.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long, and how many bytes, the server keeps reading after refusing an
/// over-long line, so that closing does not reset the connection before the
/// client has read the error reply.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: u64 = 4 * 1024 * 1024;

/// Serves `arbiter` on `listener` until the runtime shuts down.
pub async fn serve(listener: TcpListener, arbiter: Arbiter) {
    let arbiter = Arc::new(Mutex::new(arbiter));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                debug!(%peer, "connection");
                tokio::spawn(connection(stream, Arc::clone(&arbiter)));
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

async fn connection(stream: TcpStream, arbiter: Arc<Mutex<Arbiter>>) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let (reader, mut writer) = stream.into_split();
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
                    let _ = writer.shutdown().await;
                    let mut sink = tokio::io::sink();
                    let mut rest = reader.take(DRAIN_LIMIT);
                    let _ =
                        tokio::time::timeout(DRAIN_TIMEOUT, tokio::io::copy(&mut rest, &mut sink))
                            .await;
                }
                return;
            }
            Ok(Ok(LineRead::Line { last })) => last,
        };
        let response = match Request::parse(&line) {
            Ok(request) => decide(&arbiter, request).await,
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
