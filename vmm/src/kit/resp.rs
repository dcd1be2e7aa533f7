//! A RESP2 client for the `kv` guest: request encoding, an incremental
//! reply parser, and a connection whose every read is bounded.
//!
//! Written here rather than taken from the `redis` crate because the tests
//! need byte-level control that a full client hides: pipelined raw bytes,
//! inline commands, a half-closed socket, a request sent now and its reply
//! read after a network partition, and the bytes left after the last reply.
//! The `redis` crate also sends `CLIENT SETINFO` when it connects, which
//! would put commands nobody asked for into the guest's recorded input.
//!
//! Every failure is an [`Error`], never a panic: `duet demo` reconnects on
//! [`Error::Closed`], and a test tells a held reply ([`Error::Timeout`])
//! from a dropped connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A bulk string reply holding `s`.
    pub fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    /// A simple string reply holding `s`.
    pub fn simple(s: &str) -> Reply {
        Reply::Simple(s.to_string())
    }

    /// True for `+OK`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Simple(s) if s == "OK")
    }
}

/// Why a call got no reply.
#[derive(Debug)]
pub enum Error {
    /// No whole reply within the limit (the connection may still be fine).
    Timeout,
    /// The peer closed or reset the connection, or a write failed.
    Closed(String),
    /// Bytes that are not RESP2.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Timeout => write!(f, "no reply in time"),
            Error::Closed(why) => write!(f, "connection lost: {why}"),
            Error::Protocol(why) => write!(f, "not RESP2: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::Timeout,
            _ => Error::Closed(e.to_string()),
        }
    }
}

/// Encodes one command as a RESP2 multibulk request.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// [`encode`] for string arguments.
pub fn encode_str(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    encode(&args)
}

/// Parses one reply from the front of `buf`: the reply and the bytes it
/// took, or `None` if `buf` holds only the start of one.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, Error> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let bad = |what: &str| Error::Protocol(format!("{what} in {:?}", String::from_utf8_lossy(buf)));
    let line = std::str::from_utf8(&buf[1..line_end]).map_err(|_| bad("a line not UTF-8"))?;
    let after = line_end + 2;
    let number = || -> Result<i64, Error> { line.parse().map_err(|_| bad("a bad number")) };
    Ok(Some(match buf[0] {
        b'+' => (Reply::Simple(line.to_string()), after),
        b'-' => (Reply::Error(line.to_string()), after),
        b':' => (Reply::Integer(number()?), after),
        b'$' => {
            let Ok(n) = usize::try_from(number()?) else {
                return Ok(Some((Reply::Bulk(None), after)));
            };
            let end = after + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(bad("an unterminated bulk string"));
            }
            (Reply::Bulk(Some(buf[after..end].to_vec())), end + 2)
        }
        b'*' => {
            let Ok(n) = usize::try_from(number()?) else {
                return Ok(Some((Reply::Array(None), after)));
            };
            let mut items = Vec::with_capacity(n.min(1024));
            let mut used = after;
            for _ in 0..n {
                let Some((item, len)) = parse(&buf[used..])? else {
                    return Ok(None);
                };
                items.push(item);
                used += len;
            }
            (Reply::Array(Some(items)), used)
        }
        other => return Err(bad(&format!("first byte {other:#x}"))),
    }))
}

/// A connection to a RESP2 server.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to `addr` within `limit`, with Nagle off and writes bounded
    /// by `limit`.
    pub fn connect(addr: SocketAddr, limit: Duration) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, limit)?;
        stream.set_write_timeout(Some(limit))?;
        Conn::from_stream(stream)
    }

    /// Wraps a connected stream (one made in another network namespace,
    /// say).
    pub fn from_stream(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        if stream.write_timeout()?.is_none() {
            stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        }
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// The socket, for a shutdown or a writer thread's `try_clone`.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Bytes received and not yet taken by a reply.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Sends bytes as they are (a pipelined batch, an inline command).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.stream
            .write_all(bytes)
            .map_err(|e| Error::Closed(e.to_string()))
    }

    /// Sends one command without waiting for its reply.
    pub fn send(&mut self, args: &[&str]) -> Result<(), Error> {
        self.send_raw(&encode_str(args))
    }

    /// The next reply, or why none came within `limit`.
    pub fn reply(&mut self, limit: Duration) -> Result<Reply, Error> {
        let end = Instant::now() + limit;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| Error::Closed(e.to_string()))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Error::Closed("end of stream".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next `n` replies, all within `limit`.
    pub fn replies(&mut self, n: usize, limit: Duration) -> Result<Vec<Reply>, Error> {
        let end = Instant::now() + limit;
        (0..n)
            .map(|_| self.reply(end.saturating_duration_since(Instant::now())))
            .collect()
    }

    /// Sends one command and reads its reply within `limit`.
    pub fn call(&mut self, args: &[&str], limit: Duration) -> Result<Reply, Error> {
        self.send(args)?;
        self.reply(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_binary_arguments() {
        assert_eq!(
            encode(&[b"SET", b"k", b"a\r\nb"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n"
        );
    }

    #[test]
    fn parses_every_kind_and_waits_for_the_rest() {
        let all = b"+OK\r\n-ERR no\r\n:-7\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n:1\r\n$0\r\n\r\n*-1\r\n";
        let want = [
            Reply::simple("OK"),
            Reply::Error("ERR no".into()),
            Reply::Integer(-7),
            Reply::bulk("a\r\n"),
            Reply::Bulk(None),
            Reply::Array(Some(vec![Reply::Integer(1), Reply::bulk("")])),
            Reply::Array(None),
        ];
        let mut at = 0;
        for w in &want {
            // Every strict prefix of a reply is incomplete, not an error.
            let (got, used) = parse(&all[at..]).unwrap().unwrap();
            for cut in at..at + used {
                assert!(
                    parse(&all[at..cut]).unwrap().is_none(),
                    "{w:?} cut at {cut}"
                );
            }
            assert_eq!(&got, w);
            at += used;
        }
        assert_eq!(at, all.len());
    }

    #[test]
    fn rejects_what_is_not_resp() {
        assert!(matches!(parse(b"hello\r\n"), Err(Error::Protocol(_))));
        assert!(matches!(parse(b":12x\r\n"), Err(Error::Protocol(_))));
        assert!(matches!(parse(b"$1\r\nab\r\n"), Err(Error::Protocol(_))));
    }
}
