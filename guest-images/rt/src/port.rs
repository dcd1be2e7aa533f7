//! Port I/O. Works in ring 3 because the guest runs with IOPL=3 (and on
//! the development platform CPL3 `in`/`out` work regardless).

use core::arch::asm;

/// Reads one byte from `port`.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port reads have no memory effects; the ports Duet guests use
    // are all side-effect-free or owned by this runtime.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags));
    }
    value
}

/// Writes one byte to `port`.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`; a port write touches no guest memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Writes every byte of `bytes` to `port` with one `rep outsb`.
#[inline(always)]
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: `rep outsb` reads exactly `bytes.len()` bytes from
    // `bytes.as_ptr()` (DF is clear per the ABI), writes nothing to memory.
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(readonly, nostack, preserves_flags)
        );
    }
}
