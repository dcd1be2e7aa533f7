#![no_main]
//! Fuzzes the virtio-net model as a hostile driver drives it: the queue
//! configuration, the descriptor tables, the avail rings and the buffers
//! are the fuzzer's, and so is the order of notifications, received frames
//! and register accesses. The guest controls all of these on a real
//! machine, and the model walks them at every TX notification and every
//! received frame.
//!
//! Properties, besides not panicking:
//! - every transmitted frame is between `MIN_FRAME` and `MAX_FRAME` bytes,
//!   and one access yields at most `QUEUE_MAX` of them (a ring walk is
//!   bounded by the ring);
//! - the counters agree with what happened: `tx_frames` grows by the frames
//!   taken, a received frame is counted exactly once (delivered, runt, no
//!   buffer, too big or bad chain), and is never delivered while
//!   `rx_buffers()` said no buffer was posted (that number is what the
//!   timeline offers frames by, and what replay checks);
//! - an interrupt edge is only raised with the used-buffer bit set;
//! - allocation is bounded by the frames produced: a chain claiming
//!   gigabytes allocates nothing of its size;
//! - determinism: the same input run twice, and run once more with the
//!   device rebuilt from its state (`state()`/`from_state`) before every
//!   step, gives the same outputs, the same final state and the same guest
//!   memory, which is what replay and state transfer rely on.
//!
//! # Input
//!
//! Little-endian; a read past the end yields zeros.
//!
//! ```text
//! layout u8    memory: 64 KiB << (bits 0-1); bit 2: a second region of the
//!              same size after a hole of the same size
//! driver u8    bit 0 accept VERSION_1, bit 1 accept MAC, bit 2 also ask for
//!              an unknown feature, bit 3 RX ready, bit 4 TX ready, bit 5
//!              DRIVER_OK
//! 2 x queue    size u16, desc u32, avail u32, used u32 (RX, then TX)
//! steps        at most MAX_STEPS, each an op byte (mod 8) and its operands:
//!   0 mem      addr u32, n u8, n bytes: written into guest memory
//!   1 desc     q u8, index u16, addr u32, len u32, flags u16, next u16:
//!              descriptor `index` of queue q's table (at its header address)
//!   2 post     q u8, head u16: the next avail slot of queue q, idx + 1
//!   3 tx       notify TX
//!   4 rx       len u16, fill u8: a frame of len bytes offered to the device
//!   5 write    offset u16, width u8, value u64: an MMIO write
//!   6 read     offset u16, width u8: an MMIO read
//!   7 notify   value u32 written to QueueNotify
//! ```

// The allocation meter shared with the log channel's targets.
#[path = "../../../logchannel/fuzz/fuzz_targets/common/mod.rs"]
mod common;

use std::hash::{DefaultHasher, Hash, Hasher};

use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_mmio::*;
use virtio_dev::virtio_mmio::{INT_VRING, QUEUE_MAX};
use virtio_dev::virtio_net::{
    NetCounters, VirtioNet, VirtioNetState, MAX_FRAME, MIN_FRAME, NET_HDR_LEN, TX_QUEUE,
};
use virtio_dev::GuestMem;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[global_allocator]
static ALLOC: common::Counting = common::Counting;

/// Steps per input: enough for a driver's setup and a few rounds of
/// traffic, few enough that an input of 256 full-size TX chains per step
/// stays fast.
const MAX_STEPS: usize = 64;
/// What one step may allocate besides the frames it produces: the chain
/// walkers' descriptor lists (one entry per descriptor, at most a ring's
/// worth) and the frame list's growth.
const FIXED: usize = 64 << 10;

/// Reads operands; past the end of the input, zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn int<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    fn u8(&mut self) -> u8 {
        self.int::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.int())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.int())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.int())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct QueueConf {
    size: u16,
    desc: u64,
    avail: u64,
}

/// What a run produced, compared between runs.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// A hash of every frame, read value and interrupt edge, in order.
    trace: u64,
    state: VirtioNetState,
    memory: u64,
}

fn memory(layout: u8) -> GuestMem {
    let size = (64usize << 10) << (layout & 3);
    let mut ranges = vec![(GuestAddress(0), size)];
    if layout & 4 != 0 {
        ranges.push((GuestAddress(2 * size as u64), size));
    }
    GuestMem::from_ranges(&ranges).expect("a small guest memory")
}

fn write32(dev: &mut VirtioNet, reg: u32, v: u32) {
    dev.write(u64::from(reg), &v.to_le_bytes());
}

/// The driver's setup (virtio 1.x §3.1.1), as the header asks for it.
fn set_up(dev: &mut VirtioNet, driver: u8, queues: &[QueueConf; 2], raw: &[(u32, u32, u32); 2]) {
    write32(dev, VIRTIO_MMIO_STATUS, 0);
    write32(dev, VIRTIO_MMIO_STATUS, 1);
    write32(dev, VIRTIO_MMIO_STATUS, 3);
    let mut features = 0u64;
    if driver & 1 != 0 {
        features |= 1 << 32;
    }
    if driver & 2 != 0 {
        features |= 1 << 5;
    }
    if driver & 4 != 0 {
        features |= 1 << 10;
    }
    for sel in 0..2 {
        write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        write32(
            dev,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * sel)) as u32,
        );
    }
    write32(dev, VIRTIO_MMIO_STATUS, 3 | 8);
    for (q, conf) in queues.iter().enumerate() {
        let (desc, avail, used) = raw[q];
        write32(dev, VIRTIO_MMIO_QUEUE_SEL, q as u32);
        write32(dev, VIRTIO_MMIO_QUEUE_NUM, u32::from(conf.size));
        write32(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
        write32(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        write32(dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail);
        write32(dev, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        write32(dev, VIRTIO_MMIO_QUEUE_USED_LOW, used);
        write32(dev, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        if driver & (8 << q) != 0 {
            write32(dev, VIRTIO_MMIO_QUEUE_READY, 1);
        }
    }
    if driver & 32 != 0 {
        write32(dev, VIRTIO_MMIO_STATUS, 15);
    }
}

fn rx_total(c: &NetCounters) -> u64 {
    c.rx_frames + c.rx_runt + c.rx_no_buffer + c.rx_too_big + c.rx_bad_chain
}

/// Runs the input on a fresh device and memory; with `transfer`, the device
/// is rebuilt from its state before every step.
fn run(data: &[u8], transfer: bool) -> Outcome {
    let mut input = Input(data);
    let layout = input.u8();
    let driver = input.u8();
    let mut queues = [QueueConf::default(); 2];
    let mut raw = [(0, 0, 0); 2];
    for q in 0..2 {
        let (size, desc, avail, used) = (input.u16(), input.u32(), input.u32(), input.u32());
        queues[q] = QueueConf {
            size,
            desc: u64::from(desc),
            avail: u64::from(avail),
        };
        raw[q] = (desc, avail, used);
    }
    let mem = memory(layout);
    let mut dev = VirtioNet::new([0x52, 0x54, 0, 0x12, 0x34, 0x56], mem.clone());
    set_up(&mut dev, driver, &queues, &raw);

    let mut trace = DefaultHasher::new();
    for _ in 0..MAX_STEPS {
        if input.0.is_empty() {
            break;
        }
        if transfer {
            let state = dev.state();
            // A state the device itself gave must always restore.
            dev = VirtioNet::from_state(&state, mem.clone())
                .expect("the device's own state() did not restore");
            assert_eq!(dev.state(), state, "state() of a restored device differs");
        }
        let before = dev.counters();
        let op = input.u8() % 8;
        op.hash(&mut trace);
        let ((frames, irq, received), peak) = common::peak_during(|| {
            let mut received = None;
            match op {
                0 => {
                    let addr = GuestAddress(u64::from(input.u32()));
                    let n = usize::from(input.u8());
                    let _ = mem.write_slice(input.bytes(n), addr);
                }
                1 => {
                    let q = usize::from(input.u8() & 1);
                    let index = u64::from(input.u16());
                    let at = GuestAddress(queues[q].desc.wrapping_add(16 * index));
                    let mut d = [0u8; 16];
                    d[..8].copy_from_slice(&u64::from(input.u32()).to_le_bytes());
                    d[8..12].copy_from_slice(&input.u32().to_le_bytes());
                    d[12..14].copy_from_slice(&input.u16().to_le_bytes());
                    d[14..].copy_from_slice(&input.u16().to_le_bytes());
                    let _ = mem.write_slice(&d, at);
                }
                2 => {
                    let q = usize::from(input.u8() & 1);
                    let head = input.u16();
                    let QueueConf { size, avail, .. } = queues[q];
                    let idx_at = GuestAddress(avail.wrapping_add(2));
                    let idx: u16 = mem.read_obj(idx_at).unwrap_or(0);
                    let slot = u64::from(idx % size.max(1));
                    let _ = mem.write_obj(head, GuestAddress(avail.wrapping_add(4 + 2 * slot)));
                    let _ = mem.write_obj(idx.wrapping_add(1), idx_at);
                }
                3 => write32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE as u32),
                4 => {
                    let len = usize::from(input.u16());
                    let fill = input.u8();
                    let frame: Vec<u8> = (0..len).map(|i| fill ^ i as u8).collect();
                    let posted = dev.rx_buffers();
                    dev.receive(&frame);
                    received = Some((posted, len));
                }
                5 => {
                    let offset = u64::from(input.u16() & 0x1ff);
                    let width = 1usize << (input.u8() & 3);
                    let value = input.u64().to_le_bytes();
                    dev.write(offset, &value[..width]);
                }
                6 => {
                    let offset = u64::from(input.u16() & 0x1ff);
                    let width = 1usize << (input.u8() & 3);
                    dev.read(offset, width).hash(&mut trace);
                }
                _ => write32(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, input.u32()),
            }
            // What the bus does after every exit.
            (dev.take_tx(), dev.take_irq(), received)
        });

        let after = dev.counters();
        let produced: usize = frames.iter().map(|f| f.len() + NET_HDR_LEN).sum();
        assert!(
            peak <= FIXED + produced + received.map_or(0, |(_, len)| len),
            "op {op}: {peak} bytes allocated for {} frames of {produced} bytes",
            frames.len()
        );
        assert!(
            frames.len() <= usize::from(QUEUE_MAX),
            "{} frames",
            frames.len()
        );
        for f in &frames {
            assert!(
                (MIN_FRAME..=MAX_FRAME).contains(&f.len()),
                "a frame of {} bytes",
                f.len()
            );
        }
        assert_eq!(
            after.tx_frames - before.tx_frames,
            frames.len() as u64,
            "tx_frames does not count the frames taken"
        );
        let walked = (after.tx_frames + after.tx_dropped) - (before.tx_frames + before.tx_dropped);
        assert!(
            walked <= u64::from(QUEUE_MAX),
            "{walked} TX chains in one walk"
        );
        match received {
            Some((posted, len)) => {
                assert_eq!(
                    rx_total(&after),
                    rx_total(&before) + 1,
                    "a received frame counted {before:?} -> {after:?}"
                );
                if posted == 0 {
                    assert_eq!(
                        after.rx_frames, before.rx_frames,
                        "a frame was delivered while rx_buffers() was 0"
                    );
                }
                if len < MIN_FRAME {
                    assert_eq!(after.rx_runt, before.rx_runt + 1, "a runt of {len} bytes");
                }
            }
            None => assert_eq!(
                rx_total(&after),
                rx_total(&before),
                "RX counted without a frame"
            ),
        }
        if irq {
            assert_ne!(
                dev.interrupt_status() & INT_VRING,
                0,
                "an interrupt edge without the used-buffer bit"
            );
        }
        frames.hash(&mut trace);
        irq.hash(&mut trace);
    }

    let mut memory = DefaultHasher::new();
    for region in mem.iter() {
        let mut bytes = vec![0u8; region.len() as usize];
        mem.read_slice(&mut bytes, region.start_addr())
            .expect("a whole region reads");
        bytes.hash(&mut memory);
    }
    Outcome {
        trace: trace.finish(),
        state: dev.state(),
        memory: memory.finish(),
    }
}

fuzz_target!(|data: &[u8]| {
    let first = run(data, false);
    assert_eq!(run(data, false), first, "the same input ran differently");
    assert_eq!(
        run(data, true),
        first,
        "a device rebuilt from its state before every step ran differently"
    );
});
