//! RESP2 request parsing: multibulk (`*N\r\n$len\r\n...\r\n`) and inline
//! (`PING\r\n`) commands, from a buffer that may hold several pipelined
//! requests or only part of one.

use alloc::vec::Vec;

/// Longest inline command or multibulk/bulk header line accepted.
const MAX_LINE: usize = 64 * 1024;
/// Most arguments in one multibulk request.
const MAX_ARGS: i64 = 1024 * 1024;
/// Largest bulk string (Redis's default `proto-max-bulk-len`).
const MAX_BULK: i64 = 512 * 1024 * 1024;

/// What the front of the buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command (possibly empty, which is to be ignored) that used
    /// this many bytes.
    Command(Vec<Vec<u8>>, usize),
    /// Not a whole command yet: read more.
    Incomplete,
    /// The client broke the protocol; Redis replies and drops the
    /// connection, so the caller should discard the buffer.
    Error(&'static str),
}

/// Index of the `\r\n` ending the line that starts at `from`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// A signed decimal from a header line.
fn parse_header_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if neg { -n } else { n })
}

/// Parses the first request in `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_multibulk(buf: &[u8]) -> Parsed {
    let Some(end) = find_crlf(buf, 1) else {
        return if buf.len() > MAX_LINE {
            Parsed::Error("Protocol error: too big mbulk count string")
        } else {
            Parsed::Incomplete
        };
    };
    let Some(count) = parse_header_int(&buf[1..end]) else {
        return Parsed::Error("Protocol error: invalid multibulk length");
    };
    if count > MAX_ARGS {
        return Parsed::Error("Protocol error: invalid multibulk length");
    }
    let mut pos = end + 2;
    if count <= 0 {
        return Parsed::Command(Vec::new(), pos);
    }
    let mut args = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        match buf.get(pos) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Error("Protocol error: expected '$'"),
        }
        let Some(end) = find_crlf(buf, pos + 1) else {
            return if buf.len() - pos > MAX_LINE {
                Parsed::Error("Protocol error: too big bulk count string")
            } else {
                Parsed::Incomplete
            };
        };
        let len = match parse_header_int(&buf[pos + 1..end]) {
            Some(len) if (0..=MAX_BULK).contains(&len) => len as usize,
            _ => return Parsed::Error("Protocol error: invalid bulk length"),
        };
        let start = end + 2;
        if buf.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk string not terminated by CRLF");
        }
        args.push(buf[start..start + len].to_vec());
        pos = start + len + 2;
    }
    Parsed::Command(args, pos)
}

/// An inline command: one line, arguments separated by spaces or tabs,
/// optionally quoted as Redis allows (`"a b\n"` with escapes, `'a b'`).
fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_LINE {
            Parsed::Error("Protocol error: too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
    match split_inline(line) {
        Some(args) => Parsed::Command(args, nl + 1),
        None => Parsed::Error("Protocol error: unbalanced quotes in request"),
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Splits an inline request into arguments; `None` if a quote is not
/// closed or a closing quote is not followed by a blank.
fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while line.get(i).copied().is_some_and(is_blank) {
            i += 1;
        }
        let Some(&first) = line.get(i) else {
            return Some(args);
        };
        let mut arg = Vec::new();
        if first == b'"' || first == b'\'' {
            i += 1;
            loop {
                let c = *line.get(i)?;
                i += 1;
                if c == first {
                    break;
                }
                if c != b'\\' {
                    arg.push(c);
                    continue;
                }
                let e = *line.get(i)?;
                i += 1;
                if first == b'\'' {
                    // Single quotes only escape the quote itself.
                    if e != b'\'' {
                        arg.push(b'\\');
                    }
                    arg.push(e);
                    continue;
                }
                let hex = (e == b'x')
                    .then(|| Some((hex_value(*line.get(i)?)?, hex_value(*line.get(i + 1)?)?)))
                    .flatten();
                arg.push(match (e, hex) {
                    (_, Some((hi, lo))) => {
                        i += 2;
                        hi << 4 | lo
                    }
                    (b'n', _) => b'\n',
                    (b'r', _) => b'\r',
                    (b't', _) => b'\t',
                    (b'b', _) => 0x08,
                    (b'a', _) => 0x07,
                    (other, _) => other,
                });
            }
            if line.get(i).is_some_and(|&b| !is_blank(b)) {
                return None;
            }
        } else {
            while let Some(&b) = line.get(i).filter(|&&b| !is_blank(b)) {
                arg.push(b);
                i += 1;
            }
        }
        args.push(arg);
    }
}
