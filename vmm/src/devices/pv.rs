//! Decoding of the `duet-pv` paravirtual MMIO device (4 KiB at
//! 0xf000_0000), through which a ring-3 guest reads the clock and entropy,
//! powers off, asks for a digest and waits for interrupts.
//!
//! The device only decodes: it turns an access into a request and lets the
//! VMM act on it, because every answer it gives (the clock, entropy) comes
//! from the timeline and every action (power off, digest, wait) belongs to
//! the vCPU loop. Register map (offsets from [`PV_BASE`], 8-byte accesses
//! only, see docs/ARCHITECTURE.md):
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | read | monotonic nanoseconds since boot |
//! | 0x08 | read | 8 bytes of entropy |
//! | 0x10 | write | power off, low 8 bits are the exit code |
//! | 0x18 | write | digest request, the value is a tag |
//! | 0x20 | write | wait for an interrupt |
//! | 0x28 | read | magic 0x5445_5544 ("DUET") |
//! | 0x30 | read | guest IPv4 address: bits 0..32 the address as a number (first octet in bits 24..32), bits 32..40 the prefix length; 0 = no network configured |
//! | 0x38 | read | IPv4 gateway, the same way; 0 = none |
//!
//! The network registers are machine configuration (`--guest-ip`,
//! `--gateway`), fixed when the machine is built, so they need no timeline.
//!
//! Any other access (another size, another offset, the wrong direction)
//! is ignored; by convention an ignored read returns all ones, as a read
//! of an unclaimed bus does.

/// Guest-physical base address of the device.
pub const PV_BASE: u64 = 0xf000_0000;
/// Size of the device's MMIO window in bytes.
pub const PV_SIZE: u64 = 0x1000;
/// The value of the magic register: "DUET" in little-endian ASCII.
pub const PV_MAGIC: u64 = 0x5445_5544;
/// What the VMM returns for a [`PvRead::Unknown`] read: all ones.
pub const PV_UNKNOWN_READ: u64 = u64::MAX;

const CLOCK: u64 = 0x00;
const ENTROPY: u64 = 0x08;
const POWER_OFF: u64 = 0x10;
const DIGEST: u64 = 0x18;
const WAIT: u64 = 0x20;
const MAGIC: u64 = 0x28;
const NET_IP: u64 = 0x30;
const NET_GATEWAY: u64 = 0x38;
/// Every register is 8 bytes wide and must be accessed whole.
const ACCESS_LEN: usize = 8;

/// What a guest read of the device asks the VMM for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvRead {
    /// Monotonic nanoseconds since boot, from the timeline.
    Clock,
    /// Eight bytes of entropy, from the timeline.
    Entropy,
    /// A value the device knows itself.
    Value(u64),
    /// Not a readable register or not an 8-byte access: the VMM fills the
    /// guest's buffer with all ones ([`PV_UNKNOWN_READ`]).
    Unknown,
}

/// What a guest write to the device asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvRequest {
    /// Power off; `duet` exits with this code.
    PowerOff(u8),
    /// Hash registers and memory, labelled with this tag.
    Digest(u64),
    /// Block until an interrupt, unless one was injected since the last wait.
    Wait,
    /// Not a writable register or not an 8-byte access: do nothing.
    Ignored,
}

/// The device's state for state transfer. It has none: it is here so that
/// every device offers the same `state()`/`from_state()` pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PvState {}

/// The `duet-pv` register decoder, with the machine's network
/// configuration (register values, see the table above).
#[derive(Clone, Debug, Default)]
pub struct PvDevice {
    net_ip: u64,
    net_gateway: u64,
}

impl PvDevice {
    /// A decoder for a machine without network configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that reports this network configuration.
    pub fn with_net(net: &crate::net_config::NetConfig) -> Self {
        PvDevice {
            net_ip: net.pv_ip_register(),
            net_gateway: net.pv_gateway_register(),
        }
    }

    /// Rebuilds a device from a state taken with [`PvDevice::state`]; the
    /// network registers are configuration, not state, and come from
    /// `config` (the machine the state is restored into).
    pub fn from_state(_state: &PvState, config: &PvDevice) -> Self {
        config.clone()
    }

    /// The device's (empty) state, for state transfer.
    pub fn state(&self) -> PvState {
        PvState {}
    }

    /// Decodes a guest read of `len` bytes at `offset` from [`PV_BASE`].
    pub fn read(&self, offset: u64, len: usize) -> PvRead {
        if len != ACCESS_LEN {
            return PvRead::Unknown;
        }
        match offset {
            CLOCK => PvRead::Clock,
            ENTROPY => PvRead::Entropy,
            MAGIC => PvRead::Value(PV_MAGIC),
            NET_IP => PvRead::Value(self.net_ip),
            NET_GATEWAY => PvRead::Value(self.net_gateway),
            _ => PvRead::Unknown,
        }
    }

    /// Decodes a guest write of `data` (little-endian) at `offset` from
    /// [`PV_BASE`].
    pub fn write(&self, offset: u64, data: &[u8]) -> PvRequest {
        let Ok(bytes) = <[u8; ACCESS_LEN]>::try_from(data) else {
            return PvRequest::Ignored;
        };
        let value = u64::from_le_bytes(bytes);
        match offset {
            POWER_OFF => PvRequest::PowerOff(value as u8),
            DIGEST => PvRequest::Digest(value),
            WAIT => PvRequest::Wait,
            _ => PvRequest::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_registers() {
        let pv = PvDevice::new();
        assert_eq!(pv.read(0x00, 8), PvRead::Clock);
        assert_eq!(pv.read(0x08, 8), PvRead::Entropy);
        assert_eq!(pv.read(0x28, 8), PvRead::Value(0x5445_5544));
        assert_eq!(&PV_MAGIC.to_le_bytes()[..4], b"DUET");
    }

    #[test]
    fn writable_registers() {
        let pv = PvDevice::new();
        let le = |v: u64| v.to_le_bytes();
        assert_eq!(pv.write(0x10, &le(0x1_0203)), PvRequest::PowerOff(3));
        assert_eq!(
            pv.write(0x18, &le(u64::MAX - 1)),
            PvRequest::Digest(u64::MAX - 1)
        );
        assert_eq!(pv.write(0x20, &le(0)), PvRequest::Wait);
    }

    #[test]
    fn wrong_direction_is_ignored() {
        let pv = PvDevice::new();
        for off in [0x10, 0x18, 0x20] {
            assert_eq!(pv.read(off, 8), PvRead::Unknown);
        }
        for off in [0x00, 0x08, 0x28] {
            assert_eq!(pv.write(off, &[0; 8]), PvRequest::Ignored);
        }
    }

    #[test]
    fn wrong_size_or_offset_is_ignored() {
        let pv = PvDevice::new();
        for len in [0, 1, 2, 4, 7, 9, 16, usize::MAX] {
            assert_eq!(pv.read(0x00, len), PvRead::Unknown);
            assert_eq!(pv.read(0x28, len), PvRead::Unknown);
        }
        for data in [&[][..], &[1], &[1, 2, 3, 4], &[0; 16]] {
            assert_eq!(pv.write(0x10, data), PvRequest::Ignored);
        }
        for off in [0x04, 0x11, 0x40, 0xff8, PV_SIZE, u64::MAX] {
            assert_eq!(pv.read(off, 8), PvRead::Unknown);
            assert_eq!(pv.write(off, &[0; 8]), PvRequest::Ignored);
        }
    }

    /// Every access the guest can make, as (offset, length, write data).
    fn accesses() -> Vec<(u64, usize, Vec<u8>)> {
        let mut v = Vec::new();
        for off in (0..0x40).chain([0xff8, PV_SIZE - 8, PV_SIZE]) {
            for len in [1, 2, 4, 8, 16] {
                let data: Vec<u8> = (0..len as u8)
                    .map(|b| b.wrapping_mul(37) ^ off as u8)
                    .collect();
                v.push((off, len, data));
            }
        }
        v
    }

    /// After real writes (a digest request, a wait, a power-off request, an
    /// ignored write), the state taken and restored gives a device that
    /// answers every read and write exactly like the one it was taken from,
    /// and whose own state is the same again.
    #[test]
    fn state_round_trip_after_writes() {
        let pv = PvDevice::with_net(&crate::net_config::NetConfig {
            mac: crate::net_config::DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: None,
        });
        let le = |v: u64| v.to_le_bytes();
        assert_eq!(
            pv.write(0x18, &le(0xdead_beef)),
            PvRequest::Digest(0xdead_beef)
        );
        assert_eq!(pv.write(0x20, &le(1)), PvRequest::Wait);
        assert_eq!(pv.write(0x10, &le(7)), PvRequest::PowerOff(7));
        assert_eq!(pv.write(0x30, &le(9)), PvRequest::Ignored);
        let state = pv.state();
        let restored = PvDevice::from_state(&state, &pv);
        assert_eq!(restored.state(), state);
        for (off, len, data) in accesses() {
            assert_eq!(
                restored.read(off, len),
                pv.read(off, len),
                "read {off:#x}/{len}"
            );
            assert_eq!(
                restored.write(off, &data),
                pv.write(off, &data),
                "write {off:#x} {data:?}"
            );
        }
        // The decoder keeps nothing from the writes (its configuration is
        // the machine's, not state): a backup that restores it cannot
        // disagree with a primary that never wrote.
        assert_eq!(state, PvDevice::new().state());
        let bytes = postcard::to_stdvec(&state).unwrap();
        assert_eq!(postcard::from_bytes::<PvState>(&bytes).unwrap(), state);
        assert_eq!(restored.read(0x30, 8), pv.read(0x30, 8));
    }

    #[test]
    fn network_registers() {
        assert_eq!(PvDevice::new().read(0x30, 8), PvRead::Value(0));
        assert_eq!(PvDevice::new().read(0x38, 8), PvRead::Value(0));
        let net = crate::net_config::NetConfig {
            mac: crate::net_config::DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: Some("198.18.0.1".parse().unwrap()),
        };
        let pv = PvDevice::with_net(&net);
        assert_eq!(pv.read(0x30, 8), PvRead::Value(0x18_c612_0002));
        assert_eq!(pv.read(0x38, 8), PvRead::Value(0xc612_0001));
        assert_eq!(pv.read(0x30, 4), PvRead::Unknown);
        assert_eq!(pv.write(0x30, &[0; 8]), PvRequest::Ignored);
    }
}
