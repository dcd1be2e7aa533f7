//! The `duet-pv` MMIO device at 0xf000_0000: the guest's only sources of
//! time and entropy (RDTSC and RDRAND cannot be replayed), power-off, digest
//! requests, and `wait`, the ring-3 replacement for `sti; hlt`.
//!
//! Every register is an 8-byte access; each one is a VM exit.

use core::ptr::{read_volatile, write_volatile};

/// Guest-physical (= virtual) base of the device.
pub const BASE: usize = 0xf000_0000;
const CLOCK: usize = 0x00;
const ENTROPY: usize = 0x08;
const POWER_OFF: usize = 0x10;
const DIGEST: usize = 0x18;
const WAIT: usize = 0x20;
const MAGIC: usize = 0x28;

/// Value of the magic register ("DUET").
pub const MAGIC_VALUE: u64 = 0x5445_5544;

fn read(offset: usize) -> u64 {
    // SAFETY: BASE is identity-mapped and user-accessible (Guest ABI); the
    // register is 8-byte aligned and a read has no effect on guest memory.
    unsafe { read_volatile((BASE + offset) as *const u64) }
}

fn write(offset: usize, value: u64) {
    // SAFETY: as for `read`; the device consumes the write, memory is
    // untouched.
    unsafe { write_volatile((BASE + offset) as *mut u64, value) }
}

/// Monotonic nanoseconds since boot.
pub fn clock_ns() -> u64 {
    read(CLOCK)
}

/// Eight bytes of entropy.
pub fn entropy() -> u64 {
    read(ENTROPY)
}

/// Asks the VMM to hash registers and memory here; `tag` labels the digest.
pub fn digest_request(tag: u64) {
    write(DIGEST, tag)
}

/// Idles until an interrupt has been injected since the previous `wait`
/// (returns at once if one already was).
pub fn wait() {
    write(WAIT, 1)
}

/// True if the `duet-pv` device answers with its magic.
pub fn present() -> bool {
    read(MAGIC) == MAGIC_VALUE
}

/// Powers the VM off; `duet` exits with `code`.
pub fn power_off(code: u8) -> ! {
    loop {
        write(POWER_OFF, u64::from(code));
    }
}
