//! A virtio network device (virtio 1.x §5.1) on the virtio-mmio transport.
//!
//! The model is deterministic and does no I/O. It reads and writes guest
//! memory (descriptors, rings, buffers) only when the vCPU loop calls it,
//! on the vCPU thread at a synchronous exit:
//! - a TX notification walks the TX queue at once, and every frame the
//!   guest queued becomes an output ([`VirtioNet::take_tx`]), which the
//!   timeline holds under the Output Rule or drops in replay;
//! - a received frame is an input (the VMM's timeline `Input::Net`), written
//!   into the next buffer the guest posted on the RX queue at the exit
//!   where the timeline delivers it. How many buffers are posted
//!   ([`VirtioNet::rx_buffers`]) is read from guest memory at the exit, so
//!   the recording and the replay agree on it without logging it.
//!
//! Features: `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC` only. Without
//! offloads or mergeable buffers the header is 12 bytes (the VERSION_1
//! layout with `num_buffers`), and every frame fits in one buffer chain or
//! is dropped.
//!
//! A misbehaving driver cannot crash the VMM or make it write outside guest
//! memory: virtio-queue checks every address against guest memory, and
//! what does not check out is dropped and counted in [`NetCounters`]. The
//! rules are deterministic, so a replay drops exactly what the recording
//! dropped.

use std::io::{Read, Write};
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};

use super::virtio_mmio::{Access, RestoreError, Transport, TransportState, INT_VRING};
use crate::GuestMem;

/// Guest-physical base of the device's MMIO window.
pub const NET_MMIO_BASE: u64 = 0xf000_2000;
/// Size of the window.
pub const NET_MMIO_SIZE: u64 = 0x1000;
/// The PIC input the device interrupts on (edge).
pub const NET_IRQ: u8 = 5;
/// `virtio_net_hdr_v1` without offloads: flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = 10;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// Destination, source and EtherType: anything shorter is not a frame.
pub const MIN_FRAME: usize = 14;
/// The largest frame the device transmits: what a TAP accepts in one
/// write. Larger chains are dropped without being read whole.
pub const MAX_FRAME: usize = 65_535;

/// What the device dropped, and why. Part of the device state: the
/// counts are deterministic, so they agree between primary and backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetCounters {
    pub rx_frames: u64,
    /// Shorter than an Ethernet header.
    pub rx_runt: u64,
    /// The guest had no buffer posted (the timeline should not offer a
    /// frame then; a replay of a log that does is counted here).
    pub rx_no_buffer: u64,
    /// Larger than the buffer posted next (the buffer stays posted).
    pub rx_too_big: u64,
    /// An RX chain pointing outside guest memory or otherwise unusable; it
    /// is returned to the guest empty.
    pub rx_bad_chain: u64,
    pub tx_frames: u64,
    /// A TX chain that is malformed, a runt, or larger than [`MAX_FRAME`].
    pub tx_dropped: u64,
}

/// The device's state, for state transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioNetState {
    pub transport: TransportState,
    pub mac: [u8; 6],
    pub counters: NetCounters,
    /// An interrupt edge not yet latched into the PIC.
    pub irq: bool,
    /// Transmitted frames not yet taken by the bus (empty between exits).
    pub tx: Vec<Vec<u8>>,
}

/// The device model: see the module documentation.
pub struct VirtioNet {
    transport: Transport,
    mac: [u8; 6],
    mem: GuestMem,
    counters: NetCounters,
    irq: bool,
    tx: Vec<Vec<u8>>,
}

impl VirtioNet {
    /// A device with this MAC over the guest's memory (a handle: the
    /// regions are shared, not copied).
    pub fn new(mac: [u8; 6], mem: GuestMem) -> Self {
        VirtioNet {
            transport: Transport::new(VIRTIO_ID_NET, 1 << VIRTIO_NET_F_MAC, 2),
            mac,
            mem,
            counters: NetCounters::default(),
            irq: false,
            tx: Vec::new(),
        }
    }

    pub fn state(&self) -> VirtioNetState {
        VirtioNetState {
            transport: self.transport.state(),
            mac: self.mac,
            counters: self.counters,
            irq: self.irq,
            tx: self.tx.clone(),
        }
    }

    /// Rebuilds a device from [`VirtioNet::state`] over `mem` (guest
    /// memory is transferred separately). The queues resume at their saved
    /// ring positions, so the guest's rings continue.
    pub fn from_state(state: &VirtioNetState, mem: GuestMem) -> Result<Self, RestoreError> {
        let mut dev = VirtioNet::new(state.mac, mem);
        dev.transport.restore(&state.transport)?;
        dev.counters = state.counters;
        dev.irq = state.irq;
        dev.tx = state.tx.clone();
        Ok(dev)
    }

    /// Loads a saved state in place, over this device's memory; on error
    /// the device is unchanged.
    pub fn restore(&mut self, state: &VirtioNetState) -> Result<(), RestoreError> {
        *self = VirtioNet::from_state(state, self.mem.clone())?;
        Ok(())
    }

    /// The MAC the guest reads from the config space.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// A guest read of `len` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, len: usize) -> u64 {
        match self.transport.read(offset, len) {
            (_, Access::ConfigRead(at)) => self.config_read(at, len),
            (v, _) => u64::from(v),
        }
    }

    /// The config space: `mac[6]`, then `status` (link up). Any width is
    /// allowed; bytes past the end read as 0.
    fn config_read(&self, at: u64, len: usize) -> u64 {
        let status = (VIRTIO_NET_S_LINK_UP as u16).to_le_bytes();
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..].copy_from_slice(&status);
        let mut out = [0u8; 8];
        for (i, b) in out.iter_mut().enumerate().take(len.min(8)) {
            *b = usize::try_from(at)
                .ok()
                .and_then(|a| a.checked_add(i))
                .and_then(|a| config.get(a))
                .copied()
                .unwrap_or(0);
        }
        u64::from_le_bytes(out)
    }

    /// A guest write at `offset` in the window. A TX notification sends
    /// what the guest queued; an RX notification needs nothing (the posted
    /// buffers are seen in [`VirtioNet::rx_buffers`] at every exit).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if self.transport.write(offset, data) == Access::Notify(TX_QUEUE as u16) {
            self.process_tx();
        }
    }

    /// How many buffer chains the guest has posted on the RX queue and the
    /// device has not used: how many frames it can take now.
    pub fn rx_buffers(&self) -> usize {
        let Some(q) = self.transport.live_queue_ref(RX_QUEUE) else {
            return 0;
        };
        let Ok(avail) = q.avail_idx(&self.mem, Ordering::Acquire) else {
            return 0;
        };
        let posted = (avail - Wrapping(q.next_avail())).0;
        // More than the ring holds is a driver bug; virtio-queue would
        // refuse to walk it, so the device takes nothing.
        if posted > q.size() {
            0
        } else {
            usize::from(posted)
        }
    }

    /// Writes a received frame into the next posted RX buffer and
    /// interrupts. Dropped (and counted) when it cannot be delivered.
    pub fn receive(&mut self, frame: &[u8]) {
        if frame.len() < MIN_FRAME {
            self.counters.rx_runt += 1;
            return;
        }
        let mem = &self.mem;
        let Some(q) = self.transport.live_queue(RX_QUEUE) else {
            self.counters.rx_no_buffer += 1;
            return;
        };
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            self.counters.rx_no_buffer += 1;
            return;
        };
        let head = chain.head_index();
        let used_len = match Writer::new(mem, chain) {
            Err(_) => {
                self.counters.rx_bad_chain += 1;
                0
            }
            Ok(w) if w.available_bytes() < NET_HDR_LEN + frame.len() => {
                // A bigger frame than the guest provisioned for: dropped,
                // as a NIC drops it, and the buffer waits for the next.
                q.go_to_previous_position();
                self.counters.rx_too_big += 1;
                return;
            }
            Ok(mut w) => {
                let mut header = [0u8; NET_HDR_LEN];
                header[NUM_BUFFERS_AT..].copy_from_slice(&1u16.to_le_bytes());
                if w.write_all(&header)
                    .and_then(|_| w.write_all(frame))
                    .is_ok()
                {
                    self.counters.rx_frames += 1;
                    w.bytes_written() as u32
                } else {
                    self.counters.rx_bad_chain += 1;
                    0
                }
            }
        };
        self.complete(RX_QUEUE, head, used_len);
    }

    /// Walks the TX queue: every chain becomes a frame (header removed) or
    /// is dropped, and goes back to the guest as used.
    fn process_tx(&mut self) {
        let mem = &self.mem;
        let mut done = Vec::new();
        {
            let Some(q) = self.transport.live_queue(TX_QUEUE) else {
                return;
            };
            // virtio-queue never yields more chains than the ring holds.
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let frame = Reader::new(mem, chain).ok().and_then(|mut r| {
                    let len = r.available_bytes();
                    if !(NET_HDR_LEN + MIN_FRAME..=NET_HDR_LEN + MAX_FRAME).contains(&len) {
                        return None;
                    }
                    let mut bytes = vec![0u8; len];
                    r.read_exact(&mut bytes).ok()?;
                    bytes.drain(..NET_HDR_LEN);
                    Some(bytes)
                });
                match frame {
                    Some(f) => {
                        self.counters.tx_frames += 1;
                        self.tx.push(f);
                    }
                    None => self.counters.tx_dropped += 1,
                }
                done.push(head);
            }
        }
        for head in done {
            self.complete(TX_QUEUE, head, 0);
        }
    }

    /// Returns a chain to the guest and interrupts unless it asked not to.
    fn complete(&mut self, queue: usize, head: u16, len: u32) {
        let mem = &self.mem;
        let Some(q) = self.transport.live_queue(queue) else {
            return;
        };
        if q.add_used(mem, head, len).is_err() {
            // The used ring is outside guest memory: nothing to tell.
            return;
        }
        if q.needs_notification(mem).unwrap_or(true) {
            self.transport.signal(INT_VRING);
            self.irq = true;
        }
    }

    /// Frames transmitted since the last call.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.tx)
    }

    /// True once per interrupt edge; the bus latches it into the PIC.
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq)
    }

    /// The interrupt status register (for tests and state).
    pub fn interrupt_status(&self) -> u32 {
        self.transport.interrupt_status()
    }

    /// The features the driver accepted.
    pub fn negotiated_features(&self) -> u64 {
        self.transport.negotiated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Address, Bytes, GuestAddress};

    const MEM: u64 = 0x10_0000;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    /// Ring layout: per queue, descriptors, avail and used rings.
    const QSIZE: u16 = 16;
    const BUFS: u64 = 0x8_0000;

    fn ring_base(q: usize) -> u64 {
        0x1_0000 + q as u64 * 0x1_0000
    }
    fn desc(q: usize) -> u64 {
        ring_base(q)
    }
    fn avail(q: usize) -> u64 {
        ring_base(q) + 0x1000
    }
    fn used(q: usize) -> u64 {
        ring_base(q) + 0x2000
    }

    struct Rig {
        dev: VirtioNet,
        mem: GuestMem,
        avail_idx: [u16; 2],
    }

    fn w32(dev: &mut VirtioNet, off: u32, v: u32) {
        dev.write(u64::from(off), &v.to_le_bytes());
    }
    fn r32(dev: &VirtioNet, off: u32) -> u32 {
        dev.read(u64::from(off), 4) as u32
    }

    /// A device set up the way a driver does it (§3.1.1, §4.2.3.2).
    fn rig() -> Rig {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let mut dev = VirtioNet::new(MAC, mem.clone());
        w32(&mut dev, VIRTIO_MMIO_STATUS, 0);
        w32(&mut dev, VIRTIO_MMIO_STATUS, 1);
        w32(&mut dev, VIRTIO_MMIO_STATUS, 3);
        w32(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r32(&dev, VIRTIO_MMIO_DEVICE_FEATURES);
        w32(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r32(&dev, VIRTIO_MMIO_DEVICE_FEATURES);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        assert_eq!(offered, (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC));
        w32(&mut dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w32(&mut dev, VIRTIO_MMIO_DRIVER_FEATURES, lo);
        w32(&mut dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w32(&mut dev, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        w32(&mut dev, VIRTIO_MMIO_STATUS, 3 | 8);
        assert_eq!(r32(&dev, VIRTIO_MMIO_STATUS), 11);
        for q in 0..2 {
            w32(&mut dev, VIRTIO_MMIO_QUEUE_SEL, q as u32);
            assert_eq!(r32(&dev, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
            assert_eq!(r32(&dev, VIRTIO_MMIO_QUEUE_READY), 0);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
            w32(&mut dev, VIRTIO_MMIO_QUEUE_DESC_LOW, desc(q) as u32);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail(q) as u32);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_USED_LOW, used(q) as u32);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            w32(&mut dev, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        w32(&mut dev, VIRTIO_MMIO_STATUS, 15);
        assert_eq!(
            dev.negotiated_features(),
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
        );
        Rig {
            dev,
            mem,
            avail_idx: [0; 2],
        }
    }

    impl Rig {
        /// Posts a chain of (addr, len, writable) descriptors starting at
        /// descriptor `first` on queue `q`.
        fn post(&mut self, q: usize, first: u16, descs: &[(u64, u32, bool)]) {
            for (i, &(addr, len, writable)) in descs.iter().enumerate() {
                let idx = first + i as u16;
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 } as u16;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let at = GuestAddress(desc(q) + 16 * u64::from(idx));
                self.mem.write_obj(addr, at).unwrap();
                self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
                self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
                self.mem.write_obj(idx + 1, at.unchecked_add(14)).unwrap();
            }
            let slot = self.avail_idx[q] % QSIZE;
            self.mem
                .write_obj(first, GuestAddress(avail(q) + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx[q], GuestAddress(avail(q) + 2))
                .unwrap();
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem.read_obj(GuestAddress(used(q) + 2)).unwrap()
        }

        /// (id, len) of used entry `n` of queue `q`.
        fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
            let at = used(q) + 4 + 8 * u64::from(n % QSIZE);
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let r = rig();
        assert_eq!(r32(&r.dev, VIRTIO_MMIO_DEVICE_ID), 1);
        for (i, b) in MAC.iter().enumerate() {
            assert_eq!(r.dev.read(0x100 + i as u64, 1), u64::from(*b));
        }
        assert_eq!(r.dev.read(0x106, 2), 1);
        assert_eq!(r.dev.read(0x100, 4), 0x1200_5452);
        assert_eq!(r.dev.read(0x108, 4), 0);
        assert_eq!(r.dev.read(0x1000_0000, 4), 0);
    }

    #[test]
    fn tx_of_a_frame_becomes_an_output_and_interrupts() {
        let mut r = rig();
        let f = frame(60);
        // Header and frame in two descriptors, as drivers often do.
        r.mem.write_slice(&[0u8; 12], GuestAddress(BUFS)).unwrap();
        r.mem.write_slice(&f, GuestAddress(BUFS + 0x100)).unwrap();
        r.post(TX_QUEUE, 0, &[(BUFS, 12, false), (BUFS + 0x100, 60, false)]);
        assert!(r.dev.take_tx().is_empty());
        w32(&mut r.dev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(r.dev.take_tx(), vec![f]);
        assert_eq!(r.used_idx(TX_QUEUE), 1);
        assert_eq!(r.used_elem(TX_QUEUE, 0), (0, 0));
        assert!(r.dev.take_irq());
        assert!(!r.dev.take_irq());
        assert_eq!(r32(&r.dev, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w32(&mut r.dev, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r32(&r.dev, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(r.dev.counters().tx_frames, 1);
    }

    #[test]
    fn rx_fills_the_posted_buffer() {
        let mut r = rig();
        assert_eq!(r.dev.rx_buffers(), 0);
        r.post(RX_QUEUE, 0, &[(BUFS, 1526, true)]);
        r.post(RX_QUEUE, 1, &[(BUFS + 0x1000, 1526, true)]);
        assert_eq!(r.dev.rx_buffers(), 2);
        // Garbage where the header goes: the device must zero it.
        r.mem.write_slice(&[0xee; 12], GuestAddress(BUFS)).unwrap();
        let f = frame(100);
        r.dev.receive(&f);
        assert_eq!(r.dev.rx_buffers(), 1);
        assert_eq!(r.used_idx(RX_QUEUE), 1);
        assert_eq!(r.used_elem(RX_QUEUE, 0), (0, 112));
        let mut got = vec![0u8; 112];
        r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        let mut header = [0u8; 12];
        header[10] = 1;
        assert_eq!(&got[..12], &header);
        assert_eq!(&got[12..], &f[..]);
        assert!(r.dev.take_irq());
        assert_eq!(r.dev.interrupt_status(), 1);
    }

    #[test]
    fn rx_with_no_buffer_drops_and_demands_nothing() {
        let mut r = rig();
        assert_eq!(r.dev.rx_buffers(), 0);
        r.dev.receive(&frame(60));
        assert_eq!(r.dev.counters().rx_no_buffer, 1);
        assert!(!r.dev.take_irq());
        // Before the driver is done, no buffers count either.
        let mem = r.mem.clone();
        let fresh = VirtioNet::new(MAC, mem);
        assert_eq!(fresh.rx_buffers(), 0);
    }

    #[test]
    fn oversize_and_runt_frames_are_dropped() {
        let mut r = rig();
        r.post(RX_QUEUE, 0, &[(BUFS, 12 + 64, true)]);
        r.dev.receive(&frame(65));
        assert_eq!(r.dev.counters().rx_too_big, 1);
        // The buffer is still there for a frame that fits.
        assert_eq!(r.dev.rx_buffers(), 1);
        r.dev.receive(&frame(13));
        assert_eq!(r.dev.counters().rx_runt, 1);
        assert_eq!(r.dev.rx_buffers(), 1);
        r.dev.receive(&frame(64));
        assert_eq!(r.dev.counters().rx_frames, 1);
        assert_eq!(r.dev.rx_buffers(), 0);
        // A TX runt and a chain too short for a header are dropped too.
        r.post(TX_QUEUE, 0, &[(BUFS, 12 + 13, false)]);
        r.post(TX_QUEUE, 1, &[(BUFS, 4, false)]);
        w32(&mut r.dev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(r.dev.take_tx().is_empty());
        assert_eq!(r.dev.counters().tx_dropped, 2);
        assert_eq!(r.used_idx(TX_QUEUE), 2);
    }

    #[test]
    fn descriptors_outside_memory_are_dropped_without_writing() {
        let mut r = rig();
        // Starts inside memory and runs past its end.
        r.post(RX_QUEUE, 0, &[(MEM - 16, 4096, true)]);
        r.post(RX_QUEUE, 1, &[(u64::MAX - 8, 4096, true)]);
        r.dev.receive(&frame(60));
        r.dev.receive(&frame(60));
        assert_eq!(r.dev.counters().rx_bad_chain, 2);
        assert_eq!(r.used_idx(RX_QUEUE), 2);
        assert_eq!(r.used_elem(RX_QUEUE, 0), (0, 0));
        let mut tail = [0u8; 16];
        r.mem.read_slice(&mut tail, GuestAddress(MEM - 16)).unwrap();
        assert_eq!(tail, [0; 16]);
        // TX from outside memory, and a chain that loops on itself.
        r.post(TX_QUEUE, 0, &[(MEM + 0x1000, 100, false)]);
        let at = GuestAddress(desc(TX_QUEUE) + 16 * 5);
        r.mem.write_obj(BUFS, at).unwrap();
        r.mem.write_obj(100u32, at.unchecked_add(8)).unwrap();
        r.mem
            .write_obj(VRING_DESC_F_NEXT as u16, at.unchecked_add(12))
            .unwrap();
        r.mem.write_obj(5u16, at.unchecked_add(14)).unwrap();
        r.mem
            .write_obj(5u16, GuestAddress(avail(TX_QUEUE) + 4 + 2))
            .unwrap();
        r.avail_idx[TX_QUEUE] += 1;
        r.mem
            .write_obj(r.avail_idx[TX_QUEUE], GuestAddress(avail(TX_QUEUE) + 2))
            .unwrap();
        w32(&mut r.dev, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        // The looping chain is cut at the queue size (16 * 100 bytes):
        // it is a well-formed if odd frame, or dropped; never a hang.
        let sent = r.dev.take_tx();
        assert!(sent.len() <= 1);
        assert_eq!(r.dev.counters().tx_dropped + sent.len() as u64, 2);
    }

    #[test]
    fn a_ring_index_beyond_the_ring_posts_nothing() {
        let mut r = rig();
        r.mem
            .write_obj(QSIZE + 1, GuestAddress(avail(RX_QUEUE) + 2))
            .unwrap();
        assert_eq!(r.dev.rx_buffers(), 0);
        r.dev.receive(&frame(60));
        assert_eq!(r.dev.counters().rx_frames, 0);
    }

    #[test]
    fn reset_and_state_round_trip() {
        let mut r = rig();
        r.post(RX_QUEUE, 0, &[(BUFS, 1526, true)]);
        r.post(RX_QUEUE, 1, &[(BUFS + 0x1000, 1526, true)]);
        r.dev.receive(&frame(60));
        let s = r.dev.state();
        assert_eq!(s.transport.queues[RX_QUEUE].next_avail, 1);
        // A copy over a copy of memory continues exactly as the original:
        // the next frame lands in the second buffer on both.
        let image = |mem: &GuestMem| {
            let mut bytes = vec![0u8; MEM as usize];
            mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
            bytes
        };
        let mem2 = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        mem2.write_slice(&image(&r.mem), GuestAddress(0)).unwrap();
        let bytes = postcard::to_stdvec(&s).unwrap();
        let moved: VirtioNetState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(moved, s);
        let mut copy = VirtioNet::from_state(&moved, mem2.clone()).unwrap();
        assert_eq!(copy.state(), s);
        assert_eq!(copy.rx_buffers(), 1);
        r.dev.receive(&frame(70));
        copy.receive(&frame(70));
        assert_eq!(copy.state(), r.dev.state());
        assert_eq!(copy.state().transport.queues[RX_QUEUE].next_used, 2);
        assert!(
            image(&mem2) == image(&r.mem),
            "memory after the copy's receive differs"
        );
        // A state for another transport is refused.
        let mut bad = s.clone();
        bad.transport.queues.truncate(1);
        assert!(VirtioNet::from_state(&bad, r.mem.clone()).is_err());
        w32(&mut r.dev, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r32(&r.dev, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r.dev.rx_buffers(), 0);
        assert_eq!(r.dev.interrupt_status(), 0);
    }
}
