//! `compute`: a CPU-bound guest, for measuring what FT costs when the guest
//! hardly exits. It fills a 4 MiB buffer deterministically and hashes it
//! [`ROUNDS`] times (about 2-4 s natively in ring 3), folding each round's
//! hash back into the buffer so no round can be skipped or reordered. It
//! reads `clock_ns()` once per round, which gives the VMM a steady trickle
//! of exits (and interrupt-injection points); the clock does not feed the
//! result, which is the same on every run.
//!
//! Output (PIT at 100 Hz):
//! ```text
//! compute result=<16 hex> rounds=<R> elapsed_ns=<n>
//! ```

#![no_std]
#![no_main]

use duet_rt::{clock_ns, println};

duet_rt::entry!(main, pit_hz = 100);

/// Buffer size in 64-bit words (4 MiB).
const WORDS: usize = 4 * 1024 * 1024 / 8;
/// Hash passes over the buffer: about 0.3-0.4 ms each in ring 3 on the
/// development machine, so about 3 s in all.
const ROUNDS: u64 = 8_000;

/// The work buffer, in .bss.
static mut BUFFER: [u64; WORDS] = [0; WORDS];

/// Fills `buf` from a xorshift64* sequence.
fn fill(buf: &mut [u64]) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for w in buf.iter_mut() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *w = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
}

/// One pass: four independent multiply-xorshift lanes, combined at the end.
fn hash(buf: &[u64], seed: u64) -> u64 {
    let mut lanes = [
        seed,
        seed ^ 0x9e37_79b9_7f4a_7c15,
        seed.rotate_left(21),
        !seed,
    ];
    for chunk in buf.chunks_exact(4) {
        for (lane, &w) in lanes.iter_mut().zip(chunk) {
            let h = (*lane ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd);
            *lane = h ^ (h >> 32);
        }
    }
    lanes.iter().fold(0u64, |acc, &l| {
        (acc ^ l)
            .wrapping_mul(0xc4ce_b9fe_1a85_ec53)
            .rotate_left(29)
    })
}

fn main() {
    let buffer = &raw mut BUFFER;
    // SAFETY: the only reference to BUFFER is this one, taken once in main.
    let buf = unsafe { &mut *buffer };
    fill(buf);
    let start = clock_ns();
    let mut result = 0u64;
    let mut end = start;
    for round in 0..ROUNDS {
        let h = hash(buf, result ^ round);
        buf[(h as usize) % WORDS] ^= h;
        result = result.rotate_left(7) ^ h;
        end = clock_ns();
    }
    println!(
        "compute result={:016x} rounds={} elapsed_ns={}",
        result,
        ROUNDS,
        end - start
    );
}
