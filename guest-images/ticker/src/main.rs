//! `ticker`: the determinism torture test.
//!
//! It mixes everything a replay must reproduce: timer interrupts landing in
//! the middle of ring-3 compute, clock reads, entropy, and serial input.
//! Two rolling FNV-1a digests summarise the run: `input` over the serial
//! bytes only (equal across any two runs fed the same input), and `all` over
//! everything observed (equal only between a recording and its replay).
//!
//! Every serial byte received is echoed. A line `ticks=<n>` sets the run
//! length to `n` ticks (default [`DEFAULT_TICKS`]).
//!
//! Output (PIT at 1000 Hz):
//! ```text
//! tick=<ticks> input=<16 hex> all=<16 hex>          every REPORT_EVERY ticks
//! ticker done ticks=<ticks> input=<16 hex> all=<16 hex>
//! ```

#![no_std]
#![no_main]

use duet_rt::{clock_ns, digest_request, entropy, println, serial, ticks};

duet_rt::entry!(main, pit_hz = 1000);

/// Ticks to run for unless serial input says otherwise.
const DEFAULT_TICKS: u64 = 2000;
/// A progress line (and a digest request) every this many ticks.
const REPORT_EVERY: u64 = 100;
/// Integer-mixing rounds per loop iteration, between device reads.
const COMPUTE_ROUNDS: u32 = 4000;

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn word(&mut self, w: u64) {
        for b in w.to_le_bytes() {
            self.byte(b);
        }
    }
}

/// Recognises `ticks=<n>` lines in the input stream.
struct LineParser {
    line: [u8; 32],
    len: usize,
}

impl LineParser {
    /// Feeds one byte; returns `n` when a `ticks=<n>` line ends.
    fn feed(&mut self, b: u8) -> Option<u64> {
        if b == b'\n' || b == b'\r' {
            let n = parse_ticks_line(&self.line[..self.len]);
            self.len = 0;
            return n;
        }
        if self.len < self.line.len() {
            self.line[self.len] = b;
            self.len += 1;
        }
        None
    }
}

fn parse_ticks_line(line: &[u8]) -> Option<u64> {
    let digits = line.strip_prefix(b"ticks=")?;
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Ring-3 work between exits, so interrupts land at varied points.
fn compute(seed: u64) -> u64 {
    let mut x = seed;
    for i in 0..COMPUTE_ROUNDS {
        x ^= x >> 31;
        x = x
            .wrapping_mul(0x7fb5_d329_728e_a185)
            .wrapping_add(u64::from(i));
        x ^= x >> 27;
        x = x.rotate_left(17);
    }
    // Keep the optimiser from precomputing or shortening the loop.
    core::hint::black_box(x)
}

fn main() {
    let mut limit = DEFAULT_TICKS;
    let mut input = Fnv::new();
    let mut all = Fnv::new();
    let mut parser = LineParser {
        line: [0; 32],
        len: 0,
    };
    let mut next_report = REPORT_EVERY;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut echo = [0u8; 64];

    loop {
        state = compute(state);
        all.word(state);

        let now = ticks();
        all.word(now);
        all.word(clock_ns());
        all.word(entropy());

        // Drain the receive FIFO, echoing in whole buffers.
        let mut n = 0;
        while let Some(b) = serial::serial_try_read() {
            input.byte(b);
            all.byte(b);
            if let Some(t) = parser.feed(b) {
                limit = t;
            }
            echo[n] = b;
            n += 1;
            if n == echo.len() {
                serial::serial_write(&echo);
                n = 0;
            }
        }
        serial::serial_write(&echo[..n]);

        if now >= next_report {
            println!("tick={} input={:016x} all={:016x}", now, input.0, all.0);
            digest_request(now);
            next_report = (now / REPORT_EVERY + 1) * REPORT_EVERY;
        }
        if now >= limit {
            println!(
                "ticker done ticks={} input={:016x} all={:016x}",
                now, input.0, all.0
            );
            return;
        }
    }
}
