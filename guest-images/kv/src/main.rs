//! `kv`: a small Redis-compatible key-value server whose connection is COM1.
//!
//! It is the service Duet makes fault tolerant in the end-to-end tests: a
//! client talks RESP2 to the VMM's serial TCP listener, and after a failover
//! the data must still be there. It speaks PING, ECHO, SET, GET, INCR,
//! INCRBY, DEL, EXISTS, DBSIZE, CONFIG GET (always empty) and QUIT, in
//! multibulk or inline form, pipelined or not, with binary-safe values.
//!
//! Nothing but RESP replies is ever written to the serial port. The PIT runs
//! at 100 Hz; the server idles with `wait()` when no byte is waiting. When
//! the line changes hands (delta-DCD), a partial request left by the last
//! client is dropped, as Redis drops a closed connection's buffer.

#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use duet_resp::{Db, Stop};
use duet_rt::{serial, wait};

duet_rt::entry!(main, pit_hz = 100);

/// Most bytes read from COM1 before the requests so far are answered.
const DRAIN_BATCH: usize = 16 * 1024;

fn main() {
    let mut db = Db::new();
    let mut rx: Vec<u8> = Vec::new();
    let mut tx: Vec<u8> = Vec::new();
    loop {
        // A new client: whatever the last one left half-sent is not a
        // request of this one's (checked before reading, see
        // `serial_hung_up`).
        if serial::serial_hung_up() {
            rx.clear();
        }
        // Take everything the UART has (up to a batch) before parsing, so a
        // pipelined batch is answered in one write.
        let got = serial::serial_drain(DRAIN_BATCH, |b| rx.push(b));
        if got == 0 {
            wait();
            continue;
        }
        // A QUIT cannot hang up a serial line: answer it and go on with
        // whatever follows.
        let mut used = 0;
        loop {
            let served = duet_resp::serve(&mut db, &rx[used..], &mut tx, usize::MAX);
            used += served.used;
            if served.stop != Stop::Quit {
                break;
            }
        }
        rx.drain(..used);
        if !tx.is_empty() {
            serial::serial_write(&tx);
            tx.clear();
        }
    }
}
