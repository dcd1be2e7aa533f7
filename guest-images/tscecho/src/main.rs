//! `tscecho`: a guest whose output comes from the TSC, which never exits
//! and which Duet cannot log. Every line has the same length, so a replay
//! of it makes the same number of exits and the same port writes, only
//! with other bytes (and whatever registers the value passed through):
//! what verified-output mode (`duet primary --verify-outputs`) is for.
//! A client of a pair without it receives lines the backup never printed.
//!
//! It starts once a byte arrives on COM1 (so that a test's client is
//! connected before the first line), then prints `LINES_PER_TICK` lines
//! `tsc <16 hex>` after each of `TICKS` timer ticks (100 Hz), then powers
//! off with 0.

#![no_std]
#![no_main]

use duet_rt::{println, serial_read, wait};

duet_rt::entry!(main, pit_hz = 100);

/// Timer ticks (10 ms each) in one run.
const TICKS: u64 = 20;
/// Lines printed after each tick.
const LINES_PER_TICK: u64 = 3;

fn tsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter into edx:eax and has no
    // other effect; it is allowed in ring 3 unless CR4.TSD is set, which
    // Duet's VMM never sets.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn main() {
    serial_read();
    for _ in 0..TICKS {
        wait();
        for _ in 0..LINES_PER_TICK {
            println!("tsc {:016x}", tsc());
        }
    }
}
