//! COM1 from ring 3: a 16550 at 0x3f8, set up by `_start` (115200 8N1,
//! FIFO on, interrupt on received data).
//!
//! Every port access is a VM exit (about 26 µs from ring 3), so transmit
//! checks THRE once per FIFO load (THRE set means the 16-byte transmit FIFO
//! is empty) rather than once per byte, and output is written in whole
//! buffers.

use core::fmt;

use crate::port::{inb, outb, outsb};
use crate::pv;

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const RBR: u16 = COM1;
const LSR: u16 = COM1 + 5;
const MSR: u16 = COM1 + 6;

const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
/// Delta data-carrier-detect: the line was hung up since the last read.
const MSR_DDCD: u8 = 0x08;

/// Bytes the 16550 transmit FIFO holds once THRE says it is empty.
const TX_FIFO: usize = 16;

/// Send each FIFO load with one `rep outsb` instead of one `out` per byte.
/// Off: on the development platform `rep outsb` from ring 3 works but still
/// exits once per byte (KVM reports count = 1 each time), so it saves
/// nothing, and plain `out` asks less of a VMM (no string I/O).
const USE_REP_OUTSB: bool = false;

/// True once after the line changed hands (the VMM's client left and
/// another's bytes come next). Duet signals this only when every byte of
/// the client before has been read, so a caller that checks it before
/// reading can drop a request the last client left half-sent.
pub fn serial_hung_up() -> bool {
    inb(MSR) & MSR_DDCD != 0
}

/// Writes `bytes` to COM1.
pub fn serial_write(bytes: &[u8]) {
    for chunk in bytes.chunks(TX_FIFO) {
        while inb(LSR) & LSR_THR_EMPTY == 0 {}
        if USE_REP_OUTSB {
            outsb(THR, chunk);
        } else {
            for &b in chunk {
                outb(THR, b);
            }
        }
    }
}

/// The next received byte, if one is waiting.
pub fn serial_try_read() -> Option<u8> {
    if inb(LSR) & LSR_DATA_READY != 0 {
        Some(inb(RBR))
    } else {
        None
    }
}

/// The next received byte, idling with [`pv::wait`] until one arrives.
///
/// No byte can be missed between the check and the wait: its IRQ4 makes
/// the wait return at once.
pub fn serial_read() -> u8 {
    loop {
        if let Some(b) = serial_try_read() {
            return b;
        }
        pv::wait();
    }
}

/// Passes the bytes already received, at most `max` of them, to `f`;
/// returns how many there were. (The VMM refills the receive FIFO as it is
/// read, so without a bound a fast sender could keep this going forever.)
pub fn serial_drain(max: usize, mut f: impl FnMut(u8)) -> usize {
    let mut n = 0;
    while n < max {
        let Some(b) = serial_try_read() else { break };
        f(b);
        n += 1;
    }
    n
}

/// Collects formatted output so that it goes out in large writes.
struct Buffered {
    buf: [u8; 256],
    len: usize,
}

impl Buffered {
    fn flush(&mut self) {
        serial_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Buffered {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Backs [`print!`](crate::print) and [`println!`](crate::println).
pub fn print_fmt(args: fmt::Arguments) {
    let mut out = Buffered {
        buf: [0; 256],
        len: 0,
    };
    // Buffered never fails; a failing Display impl just truncates.
    let _ = fmt::Write::write_fmt(&mut out, args);
    out.flush();
}
