//! The command set: what each request does to the keyspace and the reply
//! it appends, byte for byte as Redis would answer.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// The keyspace.
pub type Db = BTreeMap<Vec<u8>, Vec<u8>>;

fn simple(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'+');
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn error(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(b"-ERR ");
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'$');
    push_decimal(out, s.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

fn null_bulk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

fn push_decimal(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    let mut v = n.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Parses a value the way Redis's `string2ll` does: optional `-`, no `+`,
/// no spaces, no leading zeros, must fit in an i64.
fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, s),
    };
    match digits {
        [] => return None,
        [b'0'] => return (!neg).then_some(0),
        [b'0', ..] => return None,
        _ => {}
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        n = n.checked_mul(10)?;
        n = if neg {
            n.checked_sub(d)?
        } else {
            n.checked_add(d)?
        };
    }
    Some(n)
}

fn wrong_arity(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(b"' command\r\n");
}

/// Runs one command and appends its reply to `out`.
pub fn execute(db: &mut Db, args: &[Vec<u8>], out: &mut Vec<u8>) {
    let name = &args[0];
    let mut upper = [0u8; 16];
    let cmd = if name.len() <= upper.len() {
        upper[..name.len()].copy_from_slice(name);
        upper[..name.len()].make_ascii_uppercase();
        &upper[..name.len()]
    } else {
        &[][..]
    };
    let argc = args.len();
    let arity_ok = match cmd {
        b"PING" => argc <= 2,
        b"ECHO" | b"GET" | b"INCR" => argc == 2,
        b"SET" => argc >= 3,
        b"INCRBY" => argc == 3,
        b"DEL" | b"EXISTS" | b"CONFIG" => argc >= 2,
        b"DBSIZE" | b"QUIT" => argc == 1,
        _ => {
            out.extend_from_slice(b"-ERR unknown command '");
            out.extend_from_slice(name);
            out.extend_from_slice(b"'\r\n");
            return;
        }
    };
    if !arity_ok {
        wrong_arity(out, name);
        return;
    }
    match cmd {
        b"PING" if argc == 2 => bulk(out, &args[1]),
        b"PING" => simple(out, b"PONG"),
        b"ECHO" => bulk(out, &args[1]),
        b"SET" if argc > 3 => error(out, b"syntax error"),
        b"SET" => {
            db.insert(args[1].clone(), args[2].clone());
            simple(out, b"OK");
        }
        b"GET" => match db.get(&args[1]) {
            Some(v) => bulk(out, v),
            None => null_bulk(out),
        },
        b"INCR" => incr_by(db, &args[1], Some(1), out),
        b"INCRBY" => incr_by(db, &args[1], parse_i64(&args[2]), out),
        b"DEL" => {
            let n = args[1..].iter().filter(|k| db.remove(*k).is_some()).count();
            integer(out, n as i64);
        }
        b"EXISTS" => {
            let n = args[1..].iter().filter(|k| db.contains_key(*k)).count();
            integer(out, n as i64);
        }
        b"DBSIZE" => integer(out, db.len() as i64),
        b"CONFIG" if args[1].eq_ignore_ascii_case(b"GET") => out.extend_from_slice(b"*0\r\n"),
        b"CONFIG" => {
            out.extend_from_slice(b"-ERR unknown subcommand '");
            out.extend_from_slice(&args[1]);
            out.extend_from_slice(b"'\r\n");
        }
        b"QUIT" => simple(out, b"OK"),
        _ => unreachable!("arity table and dispatch disagree"),
    }
}

/// INCR and INCRBY. `by` is `None` when the increment itself was not an
/// integer.
fn incr_by(db: &mut Db, key: &[u8], by: Option<i64>, out: &mut Vec<u8>) {
    const NOT_INT: &[u8] = b"value is not an integer or out of range";
    let Some(by) = by else {
        return error(out, NOT_INT);
    };
    let current = match db.get(key) {
        None => 0,
        Some(v) => match parse_i64(v) {
            Some(n) => n,
            None => return error(out, NOT_INT),
        },
    };
    let Some(new) = current.checked_add(by) else {
        return error(out, b"increment or decrement would overflow");
    };
    let mut text = Vec::new();
    push_decimal(&mut text, new);
    db.insert(key.to_vec(), text);
    integer(out, new);
}
