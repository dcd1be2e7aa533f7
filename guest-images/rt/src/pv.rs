//! The `duet-pv` MMIO device at 0xf000_0000: the guest's only sources of
//! time and entropy (RDTSC and RDRAND cannot be replayed), power-off, digest
//! requests, `wait` (the ring-3 replacement for `sti; hlt`), and the
//! network configuration of a guest with a NIC.
//!
//! Every register is an 8-byte access; each one is a VM exit.
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | read | monotonic nanoseconds since boot |
//! | 0x08 | read | 8 bytes of entropy |
//! | 0x10 | write | power off, low 8 bits are the exit code |
//! | 0x18 | write | digest request, the value is a tag |
//! | 0x20 | write | wait for an interrupt |
//! | 0x28 | read | magic 0x5445_5544 ("DUET") |
//! | 0x30 | read | guest IPv4 address (low 32 bits, `u32::from_be_bytes([a, b, c, d])`), prefix length in bits 32..40; 0: no network |
//! | 0x38 | read | gateway IPv4, same encoding; 0: none |

use core::ptr::{read_volatile, write_volatile};

/// Guest-physical (= virtual) base of the device.
pub const BASE: usize = 0xf000_0000;
const CLOCK: usize = 0x00;
const ENTROPY: usize = 0x08;
const POWER_OFF: usize = 0x10;
const DIGEST: usize = 0x18;
const WAIT: usize = 0x20;
const MAGIC: usize = 0x28;
const NET_ADDR: usize = 0x30;
const NET_GATEWAY: usize = 0x38;

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

/// A guest's IPv4 configuration, as the VMM hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Config {
    /// The guest's address, `a.b.c.d` as `[a, b, c, d]`.
    pub addr: [u8; 4],
    /// Network prefix length (0..=32).
    pub prefix_len: u8,
    /// The default gateway, if there is one.
    pub gateway: Option<[u8; 4]>,
}

/// An address register: `value & 0xffff_ffff` is `u32::from_be_bytes([a,
/// b, c, d])` for `a.b.c.d`; 0 means none, and so does all ones (the answer
/// of a VMM that does not know the register).
fn ipv4_register(value: u64) -> Option<[u8; 4]> {
    let addr = value as u32;
    (value != u64::MAX && addr != 0).then(|| addr.to_be_bytes())
}

/// The network configuration (offsets 0x30, address and prefix length in
/// bits 32..40; 0x38, gateway), or `None` when the VM has no network
/// configured (or the value is malformed).
pub fn net_config() -> Option<Ipv4Config> {
    let value = read(NET_ADDR);
    let addr = ipv4_register(value)?;
    let prefix_len = (value >> 32) as u8;
    if prefix_len > 32 {
        return None;
    }
    Some(Ipv4Config {
        addr,
        prefix_len,
        gateway: ipv4_register(read(NET_GATEWAY)),
    })
}
