//! The virtio-net NIC as a smoltcp [`Device`]: virtio-drivers' MMIO
//! transport and `VirtIONetRaw` driver, with the guest owning the frame
//! buffers so that it decides when the device hears about them.
//!
//! Every device register access is a VM exit (about 26 µs from ring 3), so
//! the NIC spends them per batch, not per frame:
//! - received frames are found by reading the used ring in memory, never a
//!   register;
//! - queue notifications are deferred ([`DeferredTransport`]) and sent once
//!   per queue by [`Nic::flush`], after a whole poll of the stack;
//! - consumed receive buffers are handed back to the device in batches of
//!   [`RX_REPOST_BATCH`], so the receive queue is notified about once per
//!   that many frames;
//! - the interrupt status is read and acknowledged only when an interrupt
//!   was actually taken ([`Nic::ack_interrupt`]), and device interrupts are
//!   suppressed (a flag in memory) while the guest is busy anyway.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt;
use core::ptr::NonNull;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::hal::DuetHal;

/// Guest-physical (= virtual) base of the virtio-mmio window of the NIC.
pub const MMIO_BASE: usize = 0xf000_2000;
/// Size of that window (registers at 0..0x100, config space after).
pub const MMIO_SIZE: usize = 0x1000;
/// Descriptors per queue; the device offers up to 256.
pub const QUEUE_SIZE: usize = 256;
/// One frame buffer: the 12-byte virtio-net header plus a 1514-byte
/// Ethernet frame (no mergeable buffers, no offloads), rounded up.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame (without FCS) that fits the 1500-byte MTU.
const MAX_FRAME: usize = 1514;
/// Consumed receive buffers are re-posted once this many have gathered
/// (so at least `QUEUE_SIZE - RX_REPOST_BATCH` stay posted).
const RX_REPOST_BATCH: usize = QUEUE_SIZE / 8;

/// The queue indices of virtio-net.
const QUEUE_RX: u16 = 0;
const QUEUE_TX: u16 = 1;

type Buf = Box<[u8; BUF_LEN]>;

fn new_buf() -> Buf {
    Box::new([0; BUF_LEN])
}

/// The MMIO transport, shared between the driver (which owns a
/// [`DeferredTransport`]) and the [`Nic`] (which sends the deferred
/// notifications).
struct SharedTransport {
    mmio: RefCell<MmioTransport<'static>>,
    /// Bit `q` set: queue `q` has new available buffers the device has not
    /// been told about.
    pending: Cell<u32>,
}

/// A [`Transport`] that only records `notify` calls; everything else goes
/// straight to the MMIO transport. virtio-drivers notifies after each
/// buffer it adds, which would be one exit per frame.
pub struct DeferredTransport(Rc<SharedTransport>);

impl Transport for DeferredTransport {
    fn device_type(&self) -> DeviceType {
        self.0.mmio.borrow().device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.0.mmio.borrow_mut().read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.mmio.borrow_mut().write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.0.mmio.borrow_mut().max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        let pending = &self.0.pending;
        pending.set(pending.get() | 1 << queue);
    }
    fn get_status(&self) -> DeviceStatus {
        self.0.mmio.borrow().get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.0.mmio.borrow_mut().set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.0.mmio.borrow_mut().set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.0.mmio.borrow().requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0
            .mmio
            .borrow_mut()
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.0.mmio.borrow_mut().queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.mmio.borrow_mut().queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.0.mmio.borrow_mut().ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.0.mmio.borrow().read_config_generation()
    }
    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.0.mmio.borrow().read_config_space(offset)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.0.mmio.borrow_mut().write_config_space(offset, value)
    }
}

/// Why the NIC could not be brought up.
#[derive(Debug)]
pub enum NicError {
    /// No virtio-mmio device answers at [`MMIO_BASE`], or it is malformed.
    Transport(MmioError),
    /// A virtio device is there, but not a network card.
    NotNetwork(DeviceType),
    /// The driver refused the device (features, queue sizes, DMA).
    Driver(virtio_drivers::Error),
}

impl fmt::Display for NicError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            NicError::Transport(e) => write!(f, "no virtio-mmio device at {MMIO_BASE:#x}: {e}"),
            NicError::NotNetwork(t) => {
                write!(f, "the virtio device at {MMIO_BASE:#x} is {t:?}, not a NIC")
            }
            NicError::Driver(e) => write!(f, "virtio-net initialisation failed: {e}"),
        }
    }
}

type Net = VirtIONetRaw<DuetHal, DeferredTransport, QUEUE_SIZE>;

/// Driver state that both tokens of a received frame reach (smoltcp
/// transmits a reply from inside the receive token's closure).
struct Queues {
    net: Net,
    /// Receive buffers the device holds, by descriptor token.
    rx_posted: Vec<Option<Buf>>,
    /// Receive buffers consumed by the stack, to be posted again.
    rx_free: Vec<Buf>,
    /// Frames the device is sending, by token, with their lengths.
    tx_inflight: Vec<Option<(Buf, usize)>>,
    /// Transmit buffers ready for reuse.
    tx_free: Vec<Buf>,
}

impl Queues {
    /// Takes back the frames the device has finished sending (the used
    /// ring is memory: no exit).
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.net.poll_transmit() {
            let Some((buf, len)) = self.tx_inflight[usize::from(token)].take() else {
                panic!("virtio-net: device completed unknown TX token {token}");
            };
            // SAFETY: `buf[..len]` is exactly the buffer added with this
            // token by `transmit_begin`; it stayed alive and untouched.
            unsafe { self.net.transmit_complete(token, &buf[..len]) }
                .expect("virtio-net TX completion");
            self.tx_free.push(buf);
        }
    }

    /// Posts `buf` to the receive queue.
    fn post_rx(&mut self, mut buf: Buf) {
        // SAFETY: the buffer is boxed and kept in `rx_posted` under its
        // token until `receive_complete` pops it, so it stays valid and
        // unaccessed while the device owns it.
        match unsafe { self.net.receive_begin(&mut buf[..]) } {
            Ok(token) => self.rx_posted[usize::from(token)] = Some(buf),
            Err(e) => panic!("virtio-net: cannot post an RX buffer: {e}"),
        }
    }

    /// The next received frame: its buffer and where the frame lies in it.
    /// A frame the device got wrong comes back as an empty frame, which
    /// smoltcp skips.
    fn pop_rx(&mut self) -> Option<(Buf, usize, usize)> {
        let token = self.net.poll_receive()?;
        let Some(mut buf) = self.rx_posted[usize::from(token)].take() else {
            panic!("virtio-net: device used unknown RX token {token}");
        };
        // SAFETY: the same boxed buffer that `post_rx` added with this token.
        let frame = unsafe { self.net.receive_complete(token, &mut buf[..]) };
        Some(match frame {
            Ok((start, len)) => (buf, start, len.min(BUF_LEN - start)),
            Err(_) => (buf, 0, 0),
        })
    }
}

/// The NIC.
pub struct Nic {
    queues: RefCell<Queues>,
    transport: Rc<SharedTransport>,
    /// [`duet_rt::net_irqs`] when the device was last acknowledged.
    acked_irqs: u64,
}

impl Nic {
    /// Finds the device at [`MMIO_BASE`], negotiates features, sets up both
    /// queues and fills the receive queue.
    pub fn new() -> Result<Nic, NicError> {
        let header = NonNull::new(MMIO_BASE as *mut VirtIOHeader).expect("non-null");
        // SAFETY: the window is identity-mapped and user-accessible device
        // memory (Guest ABI), used by nothing else in this guest, and stays
        // mapped for the guest's lifetime.
        let mmio =
            unsafe { MmioTransport::new(header, MMIO_SIZE) }.map_err(NicError::Transport)?;
        if mmio.device_type() != DeviceType::Network {
            return Err(NicError::NotNetwork(mmio.device_type()));
        }
        let transport = Rc::new(SharedTransport {
            mmio: RefCell::new(mmio),
            pending: Cell::new(0),
        });
        let net = Net::new(DeferredTransport(transport.clone())).map_err(NicError::Driver)?;
        let mut queues = Queues {
            net,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            rx_free: Vec::with_capacity(QUEUE_SIZE),
            tx_inflight: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: Vec::with_capacity(QUEUE_SIZE),
        };
        for _ in 0..QUEUE_SIZE {
            queues.post_rx(new_buf());
        }
        let mut nic = Nic {
            queues: RefCell::new(queues),
            transport,
            acked_irqs: duet_rt::net_irqs(),
        };
        nic.flush();
        Ok(nic)
    }

    /// The MAC address from the device's config space.
    pub fn mac(&self) -> [u8; 6] {
        self.queues.borrow().net.mac_address()
    }

    /// Acknowledges the device's interrupt if one was taken since the last
    /// call (two exits then, none otherwise). Call before draining the
    /// queues, so that a frame arriving after the acknowledgement raises a
    /// new interrupt.
    pub fn ack_interrupt(&mut self) {
        let irqs = duet_rt::net_irqs();
        if irqs != self.acked_irqs {
            self.acked_irqs = irqs;
            self.queues.get_mut().net.ack_interrupt();
        }
    }

    /// True if an interrupt was taken since [`Nic::ack_interrupt`] last ran.
    pub fn interrupted(&self) -> bool {
        duet_rt::net_irqs() != self.acked_irqs
    }

    /// True if a received frame is waiting (a read of guest memory).
    pub fn rx_ready(&self) -> bool {
        self.queues.borrow().net.poll_receive().is_some()
    }

    /// Asks the device not to interrupt (busy: the guest polls anyway) or
    /// to interrupt again (about to wait). A flag in memory, no exit;
    /// after enabling, check [`Nic::rx_ready`] once more before waiting.
    pub fn set_interrupts(&mut self, on: bool) {
        let net = &mut self.queues.get_mut().net;
        if on {
            net.enable_interrupts()
        } else {
            net.disable_interrupts()
        }
    }

    /// Hands consumed receive buffers back (once a batch has gathered) and
    /// sends the notifications the driver deferred: at most one exit per
    /// queue.
    pub fn flush(&mut self) {
        let queues = self.queues.get_mut();
        if queues.rx_free.len() >= RX_REPOST_BATCH {
            while let Some(buf) = queues.rx_free.pop() {
                queues.post_rx(buf);
            }
        }
        let pending = self.transport.pending.replace(0);
        for queue in [QUEUE_RX, QUEUE_TX] {
            if pending & 1 << queue != 0 {
                self.transport.mmio.borrow_mut().notify(queue);
            }
        }
    }
}

impl Device for Nic {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (buf, start, len) = self.queues.get_mut().pop_rx()?;
        let queues = &self.queues;
        Some((
            RxToken {
                buf: Some(buf),
                start,
                len,
                queues,
            },
            TxToken { queues },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        let queues = self.queues.get_mut();
        queues.reclaim_tx();
        queues.net.can_send().then_some(TxToken {
            queues: &self.queues,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // No offloads were negotiated: smoltcp computes and checks every
        // checksum itself (the default).
        caps
    }
}

/// A received frame; its buffer goes back to the free list when consumed.
pub struct RxToken<'a> {
    buf: Option<Buf>,
    start: usize,
    len: usize,
    queues: &'a RefCell<Queues>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(mut self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let buf = self.buf.take().expect("consumed once");
        // No borrow of the queues is held while `f` runs: it may transmit.
        let result = f(&buf[self.start..self.start + self.len]);
        self.queues.borrow_mut().rx_free.push(buf);
        result
    }
}

impl Drop for RxToken<'_> {
    /// A token dropped unconsumed still returns its buffer.
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.queues.borrow_mut().rx_free.push(buf);
        }
    }
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    queues: &'a RefCell<Queues>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let (mut buf, header) = {
            let mut queues = self.queues.borrow_mut();
            queues.reclaim_tx();
            let mut buf = queues.tx_free.pop().unwrap_or_else(new_buf);
            let header = queues
                .net
                .fill_buffer_header(&mut buf[..])
                .expect("a buffer holds the header");
            (buf, header)
        };
        assert!(header + len <= BUF_LEN, "frame of {len} bytes exceeds the MTU");
        let result = f(&mut buf[header..header + len]);
        let total = header + len;
        let mut queues = self.queues.borrow_mut();
        // SAFETY: the buffer is boxed and kept in `tx_inflight` under its
        // token until `reclaim_tx` pops it, unmodified meanwhile.
        match unsafe { queues.net.transmit_begin(&buf[..total]) } {
            Ok(token) => queues.tx_inflight[usize::from(token)] = Some((buf, total)),
            // The queue is full: drop the frame, as a NIC would; TCP
            // retransmits.
            Err(_) => queues.tx_free.push(buf),
        }
        result
    }
}
