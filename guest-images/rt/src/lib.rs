//! Runtime for Duet's bare-metal guest images: a tiny ring-0 kernel and the
//! ring-3 library an image's `main` uses.
//!
//! On the development platform ring 0 is emulated and slow while ring 3 runs
//! natively, so the kernel ([`boot`]) only sets up the machine and takes
//! interrupts; the application runs in ring 3 with IOPL=3 and talks to the
//! devices of docs/ARCHITECTURE.md ("Guest ABI") directly: port I/O for the
//! PIC, PIT, RTC and COM1, and the `duet-pv` MMIO page for time, entropy,
//! idling and power-off. Ring 3 cannot `hlt` or `int` here, so it idles with
//! [`wait`].
//!
//! An image is a `#![no_std] #![no_main]` binary that calls [`entry!`].

#![no_std]

pub mod boot;
#[cfg(feature = "alloc")]
mod heap;
mod mem;
pub mod port;
pub mod pv;
pub mod rtc;
pub mod serial;

use core::sync::atomic::{AtomicU16, AtomicU64, Ordering};

pub use pv::{clock_ns, digest_request, entropy, net_config, power_off, wait, Ipv4Config};
pub use serial::{serial_read, serial_try_read, serial_write};

extern "C" {
    /// PIT interrupts taken so far; incremented by the IRQ0 handler.
    static DUET_TICKS: AtomicU64;
    /// COM1 interrupts taken so far; incremented by the IRQ4 handler.
    static DUET_SERIAL_IRQS: AtomicU64;
    /// virtio-net interrupts taken so far; incremented by the IRQ5 handler.
    static DUET_NET_IRQS: AtomicU64;
    /// Guest memory size in bytes, as the VMM passed it in RDI.
    static DUET_MEM_SIZE: AtomicU64;
}

/// Timer interrupts (IRQ0) taken since boot.
pub fn ticks() -> u64 {
    // SAFETY: DUET_TICKS is an aligned quadword in .data defined by boot.rs;
    // only the IRQ0 handler writes it, with a single `incq`.
    unsafe { DUET_TICKS.load(Ordering::Relaxed) }
}

/// COM1 receive interrupts (IRQ4) taken since boot.
pub fn serial_irqs() -> u64 {
    // SAFETY: as for `ticks`; only the IRQ4 handler writes it.
    unsafe { DUET_SERIAL_IRQS.load(Ordering::Relaxed) }
}

/// virtio-net interrupts (IRQ5) taken since boot. A driver compares it
/// with the value at its last acknowledgement to skip the device's
/// interrupt-status registers (two exits) when nothing was raised.
pub fn net_irqs() -> u64 {
    // SAFETY: as for `ticks`; only the IRQ5 handler writes it.
    unsafe { DUET_NET_IRQS.load(Ordering::Relaxed) }
}

/// The PIC masks `_start` programs (master in the low byte, slave in the
/// high byte; a set bit masks the line), kept here so that unmasking costs
/// one port write and no read.
static PIC_MASKS: AtomicU16 = AtomicU16::new(0xffea);

/// Unmasks PIC line `irq` (0..=15), from ring 3. Only lines whose vectors
/// have handlers in [`boot`] may be opened: 0, 4 and 5 (2 is the cascade,
/// opened already); any other would arrive as a fatal vector.
pub fn enable_irq(irq: u8) {
    assert!(
        matches!(irq, 0 | 2 | 4 | 5),
        "IRQ {irq} has no handler in duet-rt"
    );
    let masks = PIC_MASKS.fetch_and(!(1u16 << irq), Ordering::Relaxed) & !(1u16 << irq);
    port::outb(0x21, masks as u8);
}

/// Guest memory size in bytes.
pub fn memory_size() -> u64 {
    // SAFETY: written once by `_start` before ring 3 runs.
    unsafe { DUET_MEM_SIZE.load(Ordering::Relaxed) }
}

/// PIT input clock in Hz.
pub const PIT_HZ: u32 = 1_193_182;

/// The PIT channel 0 reload value for `hz` interrupts per second.
pub const fn pit_divisor(hz: u32) -> u16 {
    assert!(hz >= 19 && hz <= PIT_HZ, "PIT rate out of range");
    ((PIT_HZ + hz / 2) / hz) as u16
}

/// Declares an image's entry point and timer rate.
///
/// ```ignore
/// duet_rt::entry!(main, pit_hz = 1000);
/// fn main() { duet_rt::println!("hi"); }
/// ```
///
/// `main` is `fn()` (the VM powers off with code 0 when it returns) or
/// `fn() -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path, pit_hz = $hz:expr) => {
        /// Read by `_start` to program PIT channel 0.
        #[no_mangle]
        pub static DUET_PIT_DIVISOR: u16 = $crate::pit_divisor($hz);

        /// Called by the runtime in ring 3 once the machine is set up.
        #[no_mangle]
        pub fn duet_main() -> ! {
            $main();
            #[allow(unreachable_code)]
            $crate::power_off(0)
        }
    };
}

/// Formats to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::print_fmt(::core::format_args!($($arg)*))
    };
}

/// Formats to COM1, followed by `\n`.
#[macro_export]
macro_rules! println {
    () => {
        $crate::serial::serial_write(b"\n")
    };
    ($($arg:tt)*) => {
        $crate::serial::print_fmt(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panic: {}", info);
    power_off(boot::exit_code::PANIC)
}
