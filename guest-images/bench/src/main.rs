//! `bench`: measures, from inside the guest, what the VMM's basic paths
//! cost, timed with `clock_ns()`:
//!
//! - `pio_ns`: one ring-3 `out` to an unused port (0x80, the POST port,
//!   which the VMM ignores), i.e. one PIO exit round trip;
//! - `mmio_ns`: one read of the `duet-pv` magic register, i.e. one MMIO
//!   exit round trip that asks the timeline nothing (no `wait`, no clock);
//! - `irq_iter_ns`: with the PIT at [`IRQ_HZ`], one iteration of "wait for
//!   the next timer interrupt to be injected and handled" (the paravirtual
//!   wait, the injection, the ring-0 handler with its EOI exit). If the VMM
//!   keeps up this is the PIT period; if not, it is what one interrupt costs.
//!
//! IRQ0 is masked while the exit loops run, so no tick lands in them.
//!
//! Output (one line, parsed by `vmm/benches/solo.rs`; keep it stable):
//! ```text
//! bench pio_ns=<n> mmio_ns=<n> irq_iter_ns=<n> n=<N> irq_n=<N> irq_hz=<hz> irq_waits=<n>
//! ```

#![no_std]
#![no_main]

use duet_rt::port::outb;
use duet_rt::{clock_ns, pit_divisor, println, pv, ticks, wait};

duet_rt::entry!(main, pit_hz = 100);

/// Exits timed in each of the PIO and MMIO loops.
const N: u64 = 20_000;
/// Timer interrupts waited for in the interrupt loop.
const IRQ_N: u64 = 2_000;
/// PIT rate during the interrupt loop.
const IRQ_HZ: u32 = 20_000;
/// PIT rate the image boots with (see `entry!` above), restored at the end.
const BOOT_HZ: u32 = 100;
/// A port nothing decodes: the VMM treats writes to it as no-ops.
const UNUSED_PORT: u16 = 0x80;

/// Master PIC data port (interrupt mask register).
const PIC1_DATA: u16 = 0x21;
/// The runtime's mask (IRQ0, IRQ2, IRQ4 open) and the same with IRQ0 shut.
const MASK_ALL_OPEN: u8 = 0xea;
const MASK_NO_TIMER: u8 = 0xeb;

/// Reprograms PIT channel 0 (mode 2, lobyte/hibyte) to `hz`.
fn set_pit(hz: u32) {
    let divisor = pit_divisor(hz);
    outb(0x43, 0x34);
    outb(0x40, divisor as u8);
    outb(0x40, (divisor >> 8) as u8);
}

/// Nanoseconds per iteration of `f`, run `n` times.
fn per_iteration(n: u64, mut f: impl FnMut()) -> u64 {
    let start = clock_ns();
    for _ in 0..n {
        f();
    }
    (clock_ns() - start) / n
}

/// Waits (with the paravirtual wait) until the tick count moves past
/// `last`; returns the new count and how many waits it took.
fn next_tick(last: u64) -> (u64, u64) {
    let mut waits = 0;
    loop {
        let now = ticks();
        if now != last {
            return (now, waits);
        }
        wait();
        waits += 1;
    }
}

fn main() {
    outb(PIC1_DATA, MASK_NO_TIMER);
    let pio_ns = per_iteration(N, || outb(UNUSED_PORT, 0));
    let mmio_ns = per_iteration(N, || {
        core::hint::black_box(pv::present());
    });

    set_pit(IRQ_HZ);
    outb(PIC1_DATA, MASK_ALL_OPEN);
    // Line up with a tick, so the timed loop starts just after one.
    let (mut last, _) = next_tick(ticks());
    let start = clock_ns();
    let mut waits = 0;
    for _ in 0..IRQ_N {
        let (now, w) = next_tick(last);
        last = now;
        waits += w;
    }
    let irq_iter_ns = (clock_ns() - start) / IRQ_N;
    set_pit(BOOT_HZ);

    println!(
        "bench pio_ns={} mmio_ns={} irq_iter_ns={} n={} irq_n={} irq_hz={} irq_waits={}",
        pio_ns, mmio_ns, irq_iter_ns, N, IRQ_N, IRQ_HZ, waits
    );
}
