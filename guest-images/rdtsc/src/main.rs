//! `rdtsc`: a guest that breaks the rules on purpose. It reads the TSC,
//! which never exits and which Duet cannot log, and lets the value decide
//! how many port writes it makes before each wait. A replay or a backup of
//! it must be reported as diverged (exit 4) at the first position where
//! the two executions part, never as a cut-short log or a hang.
//!
//! Output: `rdtsc done rounds=<n> writes=<n>`, then power off with 0.

#![no_std]
#![no_main]

use duet_rt::{port, println, wait};

duet_rt::entry!(main, pit_hz = 1000);

/// A port no device decodes: writes to it are plain exits.
const SCRATCH_PORT: u16 = 0x510;
/// Timer ticks (1 ms each) in one run.
const ROUNDS: u64 = 1500;

fn tsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads the time-stamp counter into edx:eax and has no
    // other effect; it is allowed in ring 3 unless CR4.TSD is set, which
    // Duet's VMM never sets.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn main() {
    let mut writes = 0u64;
    for _ in 0..ROUNDS {
        // 0 to 3 extra exits, as the clock's low bits say.
        for _ in 0..(tsc() >> 4) & 3 {
            port::outb(SCRATCH_PORT, 0);
            writes += 1;
        }
        wait();
    }
    println!("rdtsc done rounds={ROUNDS} writes={writes}");
}
