//! A bit flipped on the wire is caught by the channel's checksums: a proxy
//! between primary and backup passes the handshake untouched, then flips
//! one bit inside a later `Records` message. The backup must stop at once
//! with exit 1 and a one-line error naming the corruption, not hang and not
//! call it a divergence.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(20);
/// Bytes before a frame's payload: `len: u32 LE | crc: u32 LE`.
const PREFIX: usize = 8;
/// The postcard tag of `Message::Records` (Hello, Welcome, Refuse, Records).
const RECORDS_TAG: u8 = 3;
/// Frames from the primary passed untouched (its Hello is the first).
const CLEAN_FRAMES: usize = 4;

/// What the proxy did to the stream from the primary.
struct Flipped {
    frame: usize,
    payload_len: usize,
    byte: usize,
}

/// Accepts one primary on `listener`, connects it to `backup`, and copies
/// both ways; in the first `Records` frame after `CLEAN_FRAMES`, flips one
/// bit of the payload and reports it on `done`.
fn proxy(listener: TcpListener, backup: SocketAddr, done: mpsc::Sender<Flipped>) {
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + LIMIT;
    let from_primary = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("no primary reached the proxy: {e}"),
        }
    };
    from_primary.set_nonblocking(false).unwrap();
    let to_backup = TcpStream::connect(backup).unwrap();
    let (mut back_rd, mut prim_wr) = (
        to_backup.try_clone().unwrap(),
        from_primary.try_clone().unwrap(),
    );
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut back_rd, &mut prim_wr);
        let _ = prim_wr.shutdown(std::net::Shutdown::Both);
    });
    let (mut rd, mut wr) = (from_primary, to_backup);
    let mut flipped = false;
    for frame in 0.. {
        let mut prefix = [0u8; PREFIX];
        if rd.read_exact(&mut prefix).is_err() {
            break;
        }
        let len = u32::from_le_bytes(prefix[..4].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if rd.read_exact(&mut payload).is_err() {
            break;
        }
        if !flipped && frame >= CLEAN_FRAMES && len > 16 && payload[0] == RECORDS_TAG {
            let byte = len / 2;
            payload[byte] ^= 0x10;
            flipped = true;
            let _ = done.send(Flipped {
                frame,
                payload_len: len,
                byte,
            });
        }
        if wr.write_all(&prefix).is_err() || wr.write_all(&payload).is_err() {
            break;
        }
    }
    let _ = wr.shutdown(std::net::Shutdown::Both);
}

#[test]
fn flipped_bit_stops_the_backup() {
    if !kvm_available("flipped_bit_stops_the_backup") {
        return;
    }
    let chan = free_addr();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let via = listener.local_addr().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || proxy(listener, chan, done_tx));

    let backup = launch(&mut backup_cmd("kv", "ft-corrupt", chan), false);
    let primary = launch(
        primary_cmd("kv", "ft-corrupt", via).args(["--serial", "none"]),
        false,
    );
    let flipped = done_rx
        .recv_timeout(LIMIT)
        .expect("the proxy saw no Records frame to corrupt");
    let at = Instant::now();
    eprintln!(
        "flipped a bit in byte {} of the {}-byte payload of frame {}",
        flipped.byte, flipped.payload_len, flipped.frame
    );

    let b = finish(backup, Duration::from_secs(10));
    eprintln!("backup stopped {:?} after the flip", at.elapsed());
    let err = stderr(&b);
    assert_eq!(b.status.code(), Some(1), "backup: {:?}\n{err}", b.status);
    let line = err
        .lines()
        .find(|l| l.starts_with("duet: lost the primary"))
        .unwrap_or_else(|| panic!("no 'lost the primary' line:\n{err}"));
    assert!(
        line.contains("corrupt") || line.contains("checksum"),
        "the error should name the corruption: {line:?}"
    );
    assert!(!err.contains("diverged"), "not a divergence:\n{err}");
    assert!(
        !err.contains("final state"),
        "the backup must not finish normally:\n{err}"
    );

    // The primary loses its backup and, with no arbiter to ask (no --tas),
    // must stop with exit 1 and say so, not hang, not panic and not claim
    // a clean finish.
    let p = finish(primary, LIMIT);
    let err = stderr(&p);
    assert_eq!(p.status.code(), Some(1), "primary: {:?}\n{err}", p.status);
    assert!(!err.contains("panicked"), "the primary panicked:\n{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("duet: lost the backup") && l.contains("no arbiter")),
        "the primary should say it lost the backup with no arbiter:\n{err}"
    );
    assert!(
        !err.contains("final state"),
        "the primary must not finish normally:\n{err}"
    );
}
