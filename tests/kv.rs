//! The `kv` image serves Redis clients over the serial TCP listener: real
//! `redis-cli` commands, a pipelined batch of 1,000 commands, reconnects,
//! and a client that half-closes its connection after sending.

mod common;

use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use common::*;

/// Bound on one `redis-cli` run or one exchange of replies.
const LIMIT: Duration = Duration::from_secs(30);

/// Runs one `redis-cli --no-raw` command (typed output, so that integers,
/// errors and empty arrays can be told apart) and returns its trimmed
/// stdout.
fn cli(addr: SocketAddr, args: &[&str]) -> String {
    let mut all = vec!["--no-raw"];
    all.extend_from_slice(args);
    let o = redis_cli(addr, &all, None, LIMIT);
    assert!(
        o.status.success(),
        "redis-cli {args:?}: {:?}, stderr {}",
        o.status,
        stderr(&o)
    );
    stdout(&o).trim_end().to_string()
}

/// Starts `kv` with its serial port on a fresh loopback address.
fn start_kv() -> (Proc, SocketAddr) {
    let addr = free_addr();
    (start_tcp_guest("kv", addr), addr)
}

#[test]
fn redis_cli_commands() {
    if !kvm_available("redis_cli_commands") {
        return;
    }
    let (_vm, addr) = start_kv();
    assert_eq!(cli(addr, &["PING"]), "PONG");
    assert_eq!(cli(addr, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(cli(addr, &["GET", "greeting"]), "\"hello world\"");
    assert_eq!(cli(addr, &["GET", "missing"]), "(nil)");
    assert_eq!(cli(addr, &["INCR", "counter"]), "(integer) 1");
    assert_eq!(cli(addr, &["INCR", "counter"]), "(integer) 2");
    assert_eq!(cli(addr, &["INCRBY", "counter", "40"]), "(integer) 42");
    assert_eq!(cli(addr, &["INCRBY", "counter", "-50"]), "(integer) -8");
    assert_eq!(cli(addr, &["GET", "counter"]), "\"-8\"");
    assert_eq!(cli(addr, &["DBSIZE"]), "(integer) 2");
    assert_eq!(
        cli(addr, &["EXISTS", "greeting", "counter", "missing"]),
        "(integer) 2"
    );
    assert_eq!(cli(addr, &["DEL", "greeting", "missing"]), "(integer) 1");
    assert_eq!(cli(addr, &["EXISTS", "greeting"]), "(integer) 0");
    assert_eq!(cli(addr, &["DBSIZE"]), "(integer) 1");
    assert_eq!(cli(addr, &["ECHO", "duet says hi"]), "\"duet says hi\"");
    assert_eq!(cli(addr, &["CONFIG", "GET", "save"]), "(empty array)");
    let unknown = cli(addr, &["FLUSHEVERYTHING", "now"]);
    assert!(
        unknown.starts_with("(error) ERR unknown command"),
        "unknown command should be an error reply: {unknown:?}"
    );
    // The error did not break the server.
    assert_eq!(cli(addr, &["PING"]), "PONG");
}

#[test]
fn exact_replies_over_raw_tcp() {
    if !kvm_available("exact_replies_over_raw_tcp") {
        return;
    }
    let (_vm, addr) = start_kv();
    let mut s = connect(addr, LIMIT);
    let commands: [&[&[u8]]; 7] = [
        &[b"PING"],
        &[b"SET", b"k", b"v\r\n\0binary"],
        &[b"GET", b"k"],
        &[b"INCR", b"k"],
        &[b"CONFIG", b"GET", b"save"],
        &[b"NOPE"],
        &[b"ECHO", b""],
    ];
    for c in commands {
        s.send_raw(&resp::encode(c)).unwrap();
    }
    let r = read_replies(&mut s, commands.len(), LIMIT);
    assert_eq!(r[0], Reply::Simple("PONG".into()));
    assert_eq!(r[1], Reply::Simple("OK".into()));
    assert_eq!(r[2], Reply::Bulk(Some(b"v\r\n\0binary".to_vec())));
    assert!(
        matches!(&r[3], Reply::Error(e) if e.starts_with("ERR")),
        "{r:?}"
    );
    assert_eq!(r[4], Reply::Array(Some(vec![])));
    assert!(matches!(&r[5], Reply::Error(e) if e.starts_with("ERR unknown command")));
    assert_eq!(r[6], Reply::bulk(""));
}

/// 500 SETs of distinct keys and 500 INCRs of one counter.
fn batch_of_1000() -> Vec<u8> {
    let mut input = Vec::new();
    for i in 0..500 {
        let (key, value) = (format!("key:{i}"), format!("value-{i}"));
        input.extend(resp::encode(&[b"SET", key.as_bytes(), value.as_bytes()]));
        input.extend(resp::encode(&[b"INCR", b"counter"]));
    }
    input
}

#[test]
fn redis_cli_pipe_of_1000_commands() {
    if !kvm_available("redis_cli_pipe_of_1000_commands") {
        return;
    }
    let (_vm, addr) = start_kv();
    let o = redis_cli(addr, &["--pipe"], Some(&batch_of_1000()), LIMIT * 2);
    let out = stdout(&o);
    assert!(o.status.success(), "{:?}: {out} {}", o.status, stderr(&o));
    assert!(out.contains("errors: 0, replies: 1000"), "{out}");
    assert_eq!(cli(addr, &["GET", "counter"]), "\"500\"");
    assert_eq!(cli(addr, &["GET", "key:0"]), "\"value-0\"");
    assert_eq!(cli(addr, &["GET", "key:499"]), "\"value-499\"");
    assert_eq!(cli(addr, &["DBSIZE"]), "(integer) 501");
}

#[test]
fn raw_pipeline_of_1000_commands() {
    if !kvm_available("raw_pipeline_of_1000_commands") {
        return;
    }
    let (_vm, addr) = start_kv();
    let mut s = connect(addr, LIMIT);
    let input = batch_of_1000();
    // Write from another thread: the server may answer (and fill our
    // receive buffer) before it has read everything.
    let mut w = s.stream().try_clone().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut w, &input));
    let replies = read_replies(&mut s, 1000, LIMIT * 2);
    writer.join().unwrap().unwrap();
    for (i, pair) in replies.chunks(2).enumerate() {
        assert_eq!(pair[0], Reply::Simple("OK".into()), "SET #{i}");
        assert_eq!(pair[1], Reply::Integer(i as i64 + 1), "INCR #{i}");
    }
    let mut get = Vec::new();
    for i in [0, 250, 499] {
        get.extend(resp::encode(&[b"GET", format!("key:{i}").as_bytes()]));
    }
    s.send_raw(&get).unwrap();
    assert_eq!(
        read_replies(&mut s, 3, LIMIT),
        ["value-0", "value-250", "value-499"].map(Reply::bulk)
    );
}

#[test]
fn second_client_after_first_closes() {
    if !kvm_available("second_client_after_first_closes") {
        return;
    }
    let (_vm, addr) = start_kv();
    {
        let mut first = connect(addr, LIMIT);
        first.send(&["SET", "survivor", "yes"]).unwrap();
        assert_eq!(
            read_replies(&mut first, 1, LIMIT),
            [Reply::Simple("OK".into())]
        );
    }
    let mut second = connect(addr, LIMIT);
    second.send(&["GET", "survivor"]).unwrap();
    assert_eq!(read_replies(&mut second, 1, LIMIT), [Reply::bulk("yes")]);
    drop(second);
    // And a real client after that.
    assert_eq!(cli(addr, &["GET", "survivor"]), "\"yes\"");
}

#[test]
fn half_closed_client_still_gets_replies() {
    if !kvm_available("half_closed_client_still_gets_replies") {
        return;
    }
    let (_vm, addr) = start_kv();
    let mut s = connect(addr, LIMIT);
    let mut input = resp::encode(&[b"SET", b"h", b"1"]);
    input.extend(resp::encode(&[b"INCR", b"h"]));
    input.extend(resp::encode(&[b"PING"]));
    s.send_raw(&input).unwrap();
    s.stream().shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_replies(&mut s, 3, LIMIT),
        [
            Reply::Simple("OK".into()),
            Reply::Integer(2),
            Reply::Simple("PONG".into())
        ]
    );
    drop(s);
    // The server takes the next client as usual.
    assert_eq!(cli(addr, &["GET", "h"]), "\"2\"");
}
