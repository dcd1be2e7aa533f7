//! The virtio-mmio transport, version 2 (virtio 1.x, §4.2.2): the register
//! file a driver uses to negotiate features, set up its queues and take
//! interrupts, shared by any virtio device model Duet gets.
//!
//! Like every device model here it does no I/O. It decodes an access into
//! a [`Access`] the device acts on (a queue notification, a config-space
//! read) and keeps the transport's state as plain values, so that it is
//! part of the deterministic machine and its state can be transferred. The
//! rings themselves are rust-vmm's [`virtio_queue::Queue`]: this file only
//! programs them from the registers.
//!
//! Only "modern" drivers are served: `VIRTIO_F_VERSION_1` is offered and a
//! driver that does not accept it never sees FEATURES_OK, as the spec lets
//! a device refuse. The legacy registers (GuestPageSize, QueueAlign,
//! QueuePFN) are not decoded.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};

/// "virt" in little-endian ASCII.
pub const MAGIC: u32 = 0x7472_6976;
/// The non-legacy transport.
pub const VERSION: u32 = 2;
/// Duet's vendor ID: "DUET" read as a little-endian u32, as `duet-pv`'s
/// magic is. Drivers do not match on it.
pub const VENDOR_ID: u32 = 0x5445_5544;
/// The largest ring the device accepts. 256 entries is what Linux and
/// Firecracker use for a NIC: enough to absorb a burst, small enough that
/// a ring walk at one exit stays short.
pub const QUEUE_MAX: u16 = 256;
/// Interrupt status bit: the device used buffers.
pub const INT_VRING: u32 = VIRTIO_MMIO_INT_VRING;

/// What an access asks the device model to do beyond the register file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Handled by the transport.
    Done,
    /// The driver notified queue `n` (only after DRIVER_OK).
    Notify(u16),
    /// A read inside the device-specific config space at this offset.
    ConfigRead(u64),
}

/// A saved transport state that does not fit this device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("the saved state has {saved} queues, the device {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {queue} has a size of {size}, not a power of two up to {QUEUE_MAX}")]
    QueueSize { queue: usize, size: u16 },
}

/// A queue's registers and ring positions, as plain values for state
/// transfer (virtio-queue's own state struct is not serializable).
///
/// virtio-queue's `Queue` also counts entries added since the last
/// notification check (`num_added`), but only for `VIRTIO_F_EVENT_IDX`,
/// which this transport never offers, so the count is not state here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueRegs>,
}

/// The register file of one virtio-mmio device.
#[derive(Debug)]
pub struct Transport {
    device_id: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    queues: Vec<Queue>,
}

fn new_queue() -> Queue {
    // QUEUE_MAX is a power of two no larger than the spec's maximum.
    Queue::new(QUEUE_MAX).expect("QUEUE_MAX is a valid queue size")
}

impl Transport {
    /// A device of `device_id` offering `features` (VERSION_1 is added)
    /// with `queues` virtqueues.
    pub fn new(device_id: u32, features: u64, queues: usize) -> Self {
        Transport {
            device_id,
            device_features: features | (1 << VIRTIO_F_VERSION_1),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            queues: (0..queues).map(|_| new_queue()).collect(),
        }
    }

    /// The driver finished setting the device up (DRIVER_OK, after a
    /// successful feature negotiation).
    pub fn driver_ok(&self) -> bool {
        let want = VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK;
        self.status & want == want
    }

    /// Queue `n`, if the driver made it ready and the device is live.
    pub fn live_queue(&mut self, n: usize) -> Option<&mut Queue> {
        if !self.driver_ok() {
            return None;
        }
        self.queues.get_mut(n).filter(|q| q.ready())
    }

    /// Queue `n` for reading, with the same condition as
    /// [`Transport::live_queue`].
    pub fn live_queue_ref(&self, n: usize) -> Option<&Queue> {
        if !self.driver_ok() {
            return None;
        }
        self.queues.get(n).filter(|q| q.ready())
    }

    /// Sets interrupt status bits (the device used buffers).
    pub fn signal(&mut self, bits: u32) {
        self.interrupt_status |= bits;
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Reads a transport register. Registers are 32 bits wide and read
    /// whole; anything else reads as 0. Config space is left to the device.
    pub fn read(&self, offset: u64, len: usize) -> (u32, Access) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return (
                0,
                Access::ConfigRead(offset - u64::from(VIRTIO_MMIO_CONFIG)),
            );
        }
        if len != 4 {
            return (0, Access::Done);
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_id,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            // A selected queue that does not exist reports size 0: that
            // is how the driver learns how many queues there are.
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table() as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.map_or(0, |q| q.avail_ring() as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // The config space never changes after the machine is built.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        (v, Access::Done)
    }

    /// Writes a transport register (32-bit accesses only; others and
    /// config-space writes are ignored: the net config is read-only).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Access {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Access::Done;
        };
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return Access::Done;
        }
        let v = u32::from_le_bytes(bytes);
        // Queue registers may only change while the queue is not ready
        // (§4.2.2.2); a write that breaks the rule is ignored.
        let sel = self.queue_sel as usize;
        let configurable = self.queues.get(sel).is_some_and(|q| !q.ready());
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Features are fixed once FEATURES_OK was accepted.
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return Access::Done,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= u64::from(v) << shift;
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configurable => {
                // An invalid size (not a power of two, too large) is
                // refused by virtio-queue and leaves the old one.
                let _ = self.queues[sel].try_set_size(v.min(u32::from(u16::MAX)) as u16);
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if configurable => {
                self.queues[sel].set_desc_table_address(Some(v), None)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configurable => {
                self.queues[sel].set_desc_table_address(None, Some(v))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configurable => {
                self.queues[sel].set_avail_ring_address(Some(v), None)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configurable => {
                self.queues[sel].set_avail_ring_address(None, Some(v))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if configurable => {
                self.queues[sel].set_used_ring_address(Some(v), None)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if configurable => {
                self.queues[sel].set_used_ring_address(None, Some(v))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if self.driver_ok() && (v as usize) < self.queues.len() => {
                return Access::Notify(v as u16);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => {}
        }
        Access::Done
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly_features_ok =
            v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        if newly_features_ok {
            let unknown = self.driver_features & !self.device_features;
            let modern = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if unknown != 0 || !modern {
                // Refused: the driver reads the status back and sees it.
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        // Status bits are only ever added, except by a reset.
        self.status |= v;
    }

    /// Back to the state after power-on: the driver starts over.
    pub fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// The features both sides agreed on.
    pub fn negotiated(&self) -> u64 {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return 0;
        }
        self.driver_features & self.device_features
    }

    pub fn state(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegs {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        }
    }

    /// Rebuilds the register file of a device like this one from `state`,
    /// ring positions included, so that the driver's rings continue where
    /// they were. A state for another number of queues, or with a size the
    /// device would have refused, is an error and leaves the device reset.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        self.reset();
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        for (queue, r) in state.queues.iter().enumerate() {
            if r.size == 0 || r.size > QUEUE_MAX || !r.size.is_power_of_two() {
                return Err(RestoreError::QueueSize {
                    queue,
                    size: r.size,
                });
            }
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        for (q, r) in self.queues.iter_mut().zip(&state.queues) {
            // Checked above.
            let _ = q.try_set_size(r.size);
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (lo, hi) = split(r.desc);
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = split(r.avail);
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(r.used);
            q.set_used_ring_address(lo, hi);
            q.set_next_avail(r.next_avail);
            q.set_next_used(r.next_used);
            q.set_ready(r.ready);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};

    fn w(t: &mut Transport, off: u32, v: u32) -> Access {
        t.write(u64::from(off), &v.to_le_bytes())
    }

    fn r(t: &Transport, off: u32) -> u32 {
        t.read(u64::from(off), 4).0
    }

    #[test]
    fn identity_registers() {
        let t = Transport::new(1, 1 << 5, 2);
        assert_eq!(r(&t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&t, VIRTIO_MMIO_DEVICE_ID), 1);
        assert_eq!(r(&t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        // Narrow reads of registers read 0.
        assert_eq!(t.read(0, 1).0, 0);
    }

    #[test]
    fn a_driver_without_version_1_is_refused() {
        let mut t = Transport::new(1, 1 << 5, 2);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        w(&mut t, VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(!t.driver_ok());
        assert_eq!(w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1), Access::Done);
    }

    #[test]
    fn a_driver_asking_for_unoffered_features_is_refused() {
        let mut t = Transport::new(1, 1 << 5, 2);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 | 2);
        w(&mut t, VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(r(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn state_round_trip() {
        let mut t = Transport::new(1, 0, 2);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        // Ready queues refuse reconfiguration.
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        let s = t.state();
        assert_eq!(s.queues[1].size, 16);
        assert_eq!(s.queues[1].desc, 0x1_0000_1000);
        let mut u = Transport::new(1, 0, 2);
        u.restore(&s).unwrap();
        assert_eq!(u.state(), s);
        // Through postcard too.
        let bytes = postcard::to_stdvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<TransportState>(&bytes).unwrap(), s);
        // A queue that does not exist reads as absent.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn ring_positions_survive_a_restore_and_bad_states_are_refused() {
        let mut t = Transport::new(1, 0, 2);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 64);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        let mut s = t.state();
        s.queues[0].next_avail = 40_000;
        s.queues[0].next_used = 39_990;
        let mut u = Transport::new(1, 0, 2);
        u.restore(&s).unwrap();
        let q = &u.state().queues[0];
        assert_eq!((q.next_avail, q.next_used, q.ready), (40_000, 39_990, true));
        assert_eq!((q.size, q.avail), (64, 0x2000));

        let mut bad = s.clone();
        bad.queues[1].size = 48;
        assert_eq!(
            u.restore(&bad),
            Err(RestoreError::QueueSize { queue: 1, size: 48 })
        );
        assert_eq!(u.state(), Transport::new(1, 0, 2).state());
        bad.queues[1].size = 512;
        assert!(u.restore(&bad).is_err());
        bad.queues.pop();
        assert_eq!(
            u.restore(&bad),
            Err(RestoreError::QueueCount {
                saved: 1,
                device: 2
            })
        );
    }
}
