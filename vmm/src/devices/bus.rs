//! The machine's devices and the one exit handler that routes port and MMIO
//! accesses to them.
//!
//! Values from the world (time, entropy) are fetched from the timeline here,
//! only for the accesses that need them, and passed into the models, which
//! stay deterministic.

use crate::kvm::Exit;
use crate::timeline::{self, Demand, Input, Output, Position, SerialDemand, SerialInput, Timeline};

use super::pic::{Pic, PicState};
use super::pit::{Pit, PitState};
use super::pv::{PvDevice, PvRead, PvRequest, PvState, PV_BASE, PV_SIZE};
use super::rtc::{Rtc, RtcState};
use super::serial::{Com1, Com1State};
use super::virtio_mmio::RestoreError;
use super::virtio_net::{VirtioNet, VirtioNetState, NET_IRQ, NET_MMIO_BASE, NET_MMIO_SIZE};
use crate::net_config::MacAddr;
use crate::timeline::NetDemand;

const COM1_BASE: u16 = 0x3f8;
/// The IRQ lines the VMM drives.
const IRQ_TIMER: u8 = 0;
const IRQ_COM1: u8 = 4;

/// Errors from handling an exit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Timeline(#[from] timeline::Error),
    #[error("serial device")]
    Serial(#[source] super::serial::SerialError),
    /// A timeline offered more than [`Demand`] allowed: a bug, reported
    /// rather than losing bytes.
    #[error("{offered} serial bytes offered, the FIFO took {taken}")]
    SerialOverrun { offered: usize, taken: usize },
    /// A saved state from a machine with a NIC restored into one without,
    /// or the other way round.
    #[error(
        "the saved devices {} a NIC and this machine {}",
        if *.saved { "have" } else { "have no" },
        if *.here { "has one" } else { "has none" }
    )]
    NetPresence { saved: bool, here: bool },
    /// The NIC's MAC is configuration; the guest has read it already.
    #[error("the saved NIC has MAC {saved}, this machine's is {here}")]
    NetMac { saved: MacAddr, here: MacAddr },
    #[error("the saved NIC state does not fit this NIC")]
    NetRestore(#[source] RestoreError),
}

/// Every device model's state, for moving a running machine (re-protection).
/// Together with guest memory and the vCPU it is the whole machine.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub pic: PicState,
    pub pit: PitState,
    pub rtc: RtcState,
    pub com1: Com1State,
    pub pv: PvState,
    /// The NIC's, when the machine has one.
    pub net: Option<VirtioNetState>,
}

/// What the vCPU loop must do after an exit was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest.
    Continue,
    /// Resume with these bytes as the result of the read it exited on.
    Read(Vec<u8>),
    /// The guest is idle until an interrupt is injected.
    Idle,
    /// The guest asked for a state digest with this tag.
    Digest(u64),
    /// The guest powered off with this exit code.
    PowerOff(u8),
    /// The guest stopped in a way it cannot continue from.
    Fatal(String),
}

/// All device models of the machine. The vCPU loop reaches them only
/// through this bus: exits in, inputs in, outputs and interrupts out.
#[derive(Default)]
pub struct Devices {
    pic: Pic,
    pit: Pit,
    rtc: Rtc,
    com1: Com1,
    pv: PvDevice,
    /// The NIC, when the machine has one (`--tap`).
    net: Option<VirtioNet>,
}

impl Devices {
    /// The devices of a machine with this `duet-pv` configuration and,
    /// optionally, a NIC. `Devices::default()` is the machine without a
    /// network.
    pub fn new(pv: PvDevice, net: Option<VirtioNet>) -> Self {
        Devices {
            pv,
            net,
            ..Devices::default()
        }
    }

    /// Every device's state. Taken between exits, when outputs have been
    /// handed over and interrupt edges latched, so the transient parts
    /// (COM1's output, the NIC's TX list) are empty.
    pub fn state(&self) -> DevicesState {
        DevicesState {
            pic: self.pic.state(),
            pit: self.pit.state(),
            rtc: self.rtc.state(),
            com1: self.com1.state(),
            pv: self.pv.state(),
            net: self.net.as_ref().map(|n| n.state()),
        }
    }

    /// Loads a saved state into this machine's devices: all of them, or
    /// (on error) none. The machine must be configured as the saved one
    /// was: the same NIC or none, with the same MAC. `duet-pv`'s network
    /// registers are configuration and stay this machine's.
    pub fn restore(&mut self, s: &DevicesState) -> Result<(), Error> {
        match (&self.net, &s.net) {
            (Some(here), Some(saved)) if here.mac() != saved.mac => {
                return Err(Error::NetMac {
                    saved: MacAddr(saved.mac),
                    here: MacAddr(here.mac()),
                })
            }
            (Some(_), Some(_)) | (None, None) => {}
            (here, saved) => {
                return Err(Error::NetPresence {
                    saved: saved.is_some(),
                    here: here.is_some(),
                })
            }
        }
        let com1 = Com1::from_state(&s.com1).map_err(Error::Serial)?;
        if let (Some(net), Some(saved)) = (self.net.as_mut(), &s.net) {
            net.restore(saved).map_err(Error::NetRestore)?;
        }
        self.com1 = com1;
        self.pic = Pic::from_state(&s.pic);
        self.pit = Pit::from_state(&s.pit);
        self.rtc = Rtc::from_state(&s.rtc);
        self.pv = PvDevice::from_state(&s.pv, &self.pv);
        Ok(())
    }

    /// The NIC, for state and counters.
    pub fn net(&self) -> Option<&VirtioNet> {
        self.net.as_ref()
    }

    /// The exit handler: the only place that decides what an exit means.
    pub fn handle_exit(
        &mut self,
        exit: &Exit,
        at: &Position,
        tl: &mut dyn Timeline,
    ) -> Result<Action, Error> {
        Ok(match exit {
            Exit::IoIn { port, len } => {
                let mut bytes = vec![0xff; *len];
                for b in bytes.iter_mut() {
                    *b = self.pio_read(*port, at, tl)?;
                }
                Action::Read(bytes)
            }
            Exit::IoOut { port, size, data } => {
                // `rep outs` arrives as count * size bytes; byte-wide devices
                // take them one by one.
                for chunk in data.chunks((*size).max(1)) {
                    self.pio_write(*port, chunk[0], at, tl)?;
                }
                Action::Continue
            }
            Exit::MmioRead { addr, len } => {
                let value = if let Some(off) = self.pv_offset(*addr) {
                    match self.pv.read(off, *len) {
                        PvRead::Clock => tl.clock_ns(at)?,
                        PvRead::Entropy => tl.entropy(at)?,
                        PvRead::Value(v) => v,
                        PvRead::Unknown => u64::MAX,
                    }
                } else if let Some((net, off)) = self.net_at(*addr) {
                    net.read(off, *len)
                } else {
                    u64::MAX
                };
                Action::Read(value.to_le_bytes()[..(*len).min(8)].to_vec())
            }
            Exit::MmioWrite { addr, data } => {
                if let Some(off) = self.pv_offset(*addr) {
                    match self.pv.write(off, data) {
                        PvRequest::PowerOff(code) => Action::PowerOff(code),
                        PvRequest::Digest(tag) => Action::Digest(tag),
                        PvRequest::Wait => Action::Idle,
                        PvRequest::Ignored => Action::Continue,
                    }
                } else {
                    if let Some((net, off)) = self.net_at(*addr) {
                        net.write(off, data);
                    }
                    Action::Continue
                }
            }
            Exit::Hlt => Action::Idle,
            Exit::Interrupted => Action::Continue,
            Exit::Shutdown => Action::Fatal("the guest shut down (triple fault)".into()),
            Exit::Failed(why) => Action::Fatal(why.clone()),
        })
    }

    fn pv_offset(&self, addr: u64) -> Option<u64> {
        (PV_BASE..PV_BASE + PV_SIZE)
            .contains(&addr)
            .then(|| addr - PV_BASE)
    }

    /// The NIC and the offset in its window, if `addr` is there.
    fn net_at(&mut self, addr: u64) -> Option<(&mut VirtioNet, u64)> {
        let net = self.net.as_mut()?;
        (NET_MMIO_BASE..NET_MMIO_BASE + NET_MMIO_SIZE)
            .contains(&addr)
            .then(|| (net, addr - NET_MMIO_BASE))
    }

    fn pio_read(&mut self, port: u16, at: &Position, tl: &mut dyn Timeline) -> Result<u8, Error> {
        Ok(match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => self.pic.read(port),
            0x40..=0x43 | 0x61 => {
                let now = if self.pit.uses_clock(port, false) {
                    tl.clock_ns(at)?
                } else {
                    0
                };
                self.pit.read(port, now)
            }
            0x70 | 0x71 => {
                let wall = if self.rtc.wants_wall_clock(port, false) {
                    Some(tl.wall_clock(at)?)
                } else {
                    None
                };
                self.rtc.read(port, wall)
            }
            COM1_BASE..=0x3ff => self.com1.read((port - COM1_BASE) as u8),
            _ => 0xff,
        })
    }

    fn pio_write(
        &mut self,
        port: u16,
        value: u8,
        at: &Position,
        tl: &mut dyn Timeline,
    ) -> Result<(), Error> {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => self.pic.write(port, value),
            0x40..=0x43 | 0x61 => {
                let now = if self.pit.uses_clock(port, true) {
                    tl.clock_ns(at)?
                } else {
                    0
                };
                self.pit.write(port, value, now)
            }
            0x70 | 0x71 => {
                let wall = if self.rtc.wants_wall_clock(port, true) {
                    Some(tl.wall_clock(at)?)
                } else {
                    None
                };
                self.rtc.write(port, value, wall)
            }
            COM1_BASE..=0x3ff => self
                .com1
                .write((port - COM1_BASE) as u8, value)
                .map_err(Error::Serial)?,
            _ => {}
        }
        Ok(())
    }

    /// What the machine can take from the world now, per device. `idle`:
    /// the guest waits and no interrupt is pending, so the timeline may
    /// block for input.
    pub fn demand(&self, idle: bool) -> Demand {
        Demand {
            timer_period_ns: self.pit.channel0_period_ns(),
            serial: SerialDemand {
                room: self.com1.rx_room(),
                rx_empty: self.com1.rx_empty(),
            },
            net: NetDemand {
                rx_buffers: self.net.as_ref().map_or(0, |n| n.rx_buffers()),
            },
            idle: idle && !self.interrupt_pending(),
        }
    }

    /// Every device's output since the last call, in a fixed device order
    /// (part of the replay contract).
    pub fn take_outputs(&mut self, out: &mut Vec<Output>) {
        let serial = self.com1.take_output();
        if !serial.is_empty() {
            out.push(Output::Serial(serial));
        }
        if let Some(net) = self.net.as_mut() {
            out.extend(net.take_tx().into_iter().map(Output::Net));
        }
    }

    /// True if the PIC has an interrupt to deliver.
    pub fn interrupt_pending(&self) -> bool {
        self.pic.pending_vector().is_some()
    }

    /// Takes the PIC's highest-priority pending vector, as the CPU's
    /// interrupt acknowledge does.
    pub fn acknowledge_interrupt(&mut self) -> Option<u8> {
        self.pic.acknowledge()
    }

    /// Applies inputs from the timeline and latches the interrupts they
    /// raise into the PIC.
    pub fn apply(&mut self, input: &Input) -> Result<(), Error> {
        match input {
            Input::TimerTick => self.pic.raise_irq(IRQ_TIMER),
            Input::Serial(SerialInput::Bytes(bytes)) => {
                let taken = self.com1.enqueue(bytes).map_err(Error::Serial)?;
                if taken < bytes.len() {
                    return Err(Error::SerialOverrun {
                        offered: bytes.len(),
                        taken,
                    });
                }
            }
            Input::Serial(SerialInput::Hangup) => self.com1.hang_up(),
            // A machine without a NIC never demands frames, so a frame
            // here comes from a log of another machine: the header check
            // refuses those, and otherwise it is lost as on a dead NIC.
            Input::Net(frame) => {
                if let Some(net) = self.net.as_mut() {
                    net.receive(frame);
                }
            }
        }
        self.latch_irqs();
        Ok(())
    }

    /// Moves edge-triggered device interrupts (COM1, the NIC) into the PIC.
    pub fn latch_irqs(&mut self) {
        if self.com1.take_irq() {
            self.pic.raise_irq(IRQ_COM1);
        }
        if self.net.as_mut().is_some_and(|n| n.take_irq()) {
            self.pic.raise_irq(NET_IRQ);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::StateDigest;

    /// A timeline that answers from constants and records what it was asked.
    #[derive(Default)]
    struct Fake {
        asked: Vec<&'static str>,
    }

    impl Timeline for Fake {
        fn clock_ns(&mut self, _: &Position) -> Result<u64, timeline::Error> {
            self.asked.push("clock");
            Ok(0x1122_3344_5566_7788)
        }
        fn wall_clock(&mut self, _: &Position) -> Result<i64, timeline::Error> {
            self.asked.push("wall");
            Ok(1_700_000_000)
        }
        fn entropy(&mut self, _: &Position) -> Result<u64, timeline::Error> {
            self.asked.push("entropy");
            Ok(42)
        }
        fn inputs(
            &mut self,
            _: &Position,
            _: &Demand,
            _: &mut Vec<Input>,
        ) -> Result<(), timeline::Error> {
            Ok(())
        }
        fn interrupt(&mut self, _: &Position, _: u8) -> Result<(), timeline::Error> {
            Ok(())
        }
        fn wants_digest(&mut self, _at: &Position, _requested: bool) -> bool {
            false
        }
        fn digest(&mut self, _: &Position, _: &StateDigest) -> Result<(), timeline::Error> {
            Ok(())
        }
        fn output(&mut self, _: &Position, _: Output) -> Result<(), timeline::Error> {
            Ok(())
        }
        fn stop_here(&mut self, _: &Position) -> Result<bool, timeline::Error> {
            Ok(false)
        }
        fn finish(
            &mut self,
            _: &Position,
            _: timeline::Ending,
            _: &StateDigest,
        ) -> Result<(), timeline::Error> {
            Ok(())
        }
    }

    fn handle(d: &mut Devices, tl: &mut Fake, exit: Exit) -> Action {
        d.handle_exit(&exit, &Position::default(), tl).unwrap()
    }

    #[test]
    fn clock_and_entropy_come_from_the_timeline() {
        let mut d = Devices::default();
        let mut tl = Fake::default();
        let a = handle(
            &mut d,
            &mut tl,
            Exit::MmioRead {
                addr: PV_BASE,
                len: 8,
            },
        );
        assert_eq!(
            a,
            Action::Read(0x1122_3344_5566_7788u64.to_le_bytes().to_vec())
        );
        let a = handle(
            &mut d,
            &mut tl,
            Exit::MmioRead {
                addr: PV_BASE + 8,
                len: 8,
            },
        );
        assert_eq!(a, Action::Read(42u64.to_le_bytes().to_vec()));
        assert_eq!(tl.asked, ["clock", "entropy"]);
    }

    #[test]
    fn pv_writes_become_actions() {
        let mut d = Devices::default();
        let mut tl = Fake::default();
        let w = |off: u64, v: u64| Exit::MmioWrite {
            addr: PV_BASE + off,
            data: v.to_le_bytes().to_vec(),
        };
        assert_eq!(handle(&mut d, &mut tl, w(0x10, 3)), Action::PowerOff(3));
        assert_eq!(handle(&mut d, &mut tl, w(0x18, 9)), Action::Digest(9));
        assert_eq!(handle(&mut d, &mut tl, w(0x20, 0)), Action::Idle);
        assert_eq!(handle(&mut d, &mut tl, w(0x800, 0)), Action::Continue);
    }

    #[test]
    fn unknown_ports_and_fatal_exits() {
        let mut d = Devices::default();
        let mut tl = Fake::default();
        assert_eq!(
            handle(
                &mut d,
                &mut tl,
                Exit::IoIn {
                    port: 0x1234,
                    len: 2
                }
            ),
            Action::Read(vec![0xff, 0xff])
        );
        assert_eq!(
            handle(
                &mut d,
                &mut tl,
                Exit::IoOut {
                    port: 0x1234,
                    size: 1,
                    data: vec![1]
                }
            ),
            Action::Continue
        );
        assert!(matches!(
            handle(&mut d, &mut tl, Exit::Shutdown),
            Action::Fatal(_)
        ));
        assert_eq!(handle(&mut d, &mut tl, Exit::Hlt), Action::Idle);
        assert!(tl.asked.is_empty());
    }

    #[test]
    fn serial_output_and_input_through_the_bus() {
        let mut d = Devices::default();
        let mut tl = Fake::default();
        // rep outsb of "hi" to THR.
        handle(
            &mut d,
            &mut tl,
            Exit::IoOut {
                port: 0x3f8,
                size: 1,
                data: b"hi".to_vec(),
            },
        );
        let mut outputs = Vec::new();
        d.take_outputs(&mut outputs);
        assert_eq!(outputs, [Output::Serial(b"hi".to_vec())]);
        // Enable the RX interrupt, deliver input, and the PIC sees IRQ4.
        handle(
            &mut d,
            &mut tl,
            Exit::IoOut {
                port: 0x3f9,
                size: 1,
                data: vec![1],
            },
        );
        d.apply(&Input::Serial(SerialInput::Bytes(b"z".to_vec())))
            .unwrap();
        assert!(d.pic.irr() & (1 << IRQ_COM1) != 0 || d.interrupt_pending());
        assert_eq!(
            handle(
                &mut d,
                &mut tl,
                Exit::IoIn {
                    port: 0x3f8,
                    len: 1
                }
            ),
            Action::Read(b"z".to_vec())
        );
    }

    #[test]
    fn rtc_reads_ask_for_wall_clock_only_for_time_registers() {
        let mut d = Devices::default();
        let mut tl = Fake::default();
        handle(
            &mut d,
            &mut tl,
            Exit::IoOut {
                port: 0x70,
                size: 1,
                data: vec![0x0b],
            },
        );
        handle(&mut d, &mut tl, Exit::IoIn { port: 0x71, len: 1 });
        assert!(tl.asked.is_empty());
        handle(
            &mut d,
            &mut tl,
            Exit::IoOut {
                port: 0x70,
                size: 1,
                data: vec![0x00],
            },
        );
        handle(&mut d, &mut tl, Exit::IoIn { port: 0x71, len: 1 });
        assert_eq!(tl.asked, ["wall"]);
    }

    #[test]
    fn the_nic_is_reached_through_its_window_and_raises_irq5() {
        use crate::memory::GuestMem;
        use crate::net_config::{NetConfig, DEFAULT_MAC};
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let net = NetConfig {
            mac: DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: None,
        };
        let mut d = Devices::new(
            PvDevice::with_net(&net),
            Some(VirtioNet::new(net.mac.0, mem.clone())),
        );
        let mut tl = Fake::default();
        let read = |d: &mut Devices, tl: &mut Fake, off: u64, len| {
            handle(
                d,
                tl,
                Exit::MmioRead {
                    addr: NET_MMIO_BASE + off,
                    len,
                },
            )
        };
        let write = |d: &mut Devices, tl: &mut Fake, off: u64, v: u32| {
            handle(
                d,
                tl,
                Exit::MmioWrite {
                    addr: NET_MMIO_BASE + off,
                    data: v.to_le_bytes().to_vec(),
                },
            )
        };
        assert_eq!(
            read(&mut d, &mut tl, 0, 4),
            Action::Read(0x7472_6976u32.to_le_bytes().to_vec())
        );
        assert_eq!(
            read(&mut d, &mut tl, 0x100, 1),
            Action::Read(vec![DEFAULT_MAC.0[0]])
        );
        assert_eq!(
            handle(
                &mut d,
                &mut tl,
                Exit::MmioRead {
                    addr: PV_BASE + 0x30,
                    len: 8
                }
            ),
            Action::Read(0x18_c612_0002u64.to_le_bytes().to_vec())
        );
        // Bring the device up with one RX queue of 16 at 0x1_0000.
        for (off, v) in [(0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
            write(&mut d, &mut tl, off, v);
        }
        for (off, v) in [
            (0x30, 0),
            (0x38, 16),
            (0x80, 0x1_0000),
            (0x90, 0x1_1000),
            (0xa0, 0x1_2000),
            (0x44, 1),
            (0x70, 15),
        ] {
            write(&mut d, &mut tl, off, v);
        }
        assert_eq!(d.demand(false).net.rx_buffers, 0);
        // Post one writable 2 KiB buffer at 0x2_0000.
        mem.write_obj(0x2_0000u64, GuestAddress(0x1_0000)).unwrap();
        mem.write_obj(2048u32, GuestAddress(0x1_0008)).unwrap();
        mem.write_obj(2u16, GuestAddress(0x1_000c)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x1_1002)).unwrap();
        assert_eq!(d.demand(false).net.rx_buffers, 1);
        // Unmask IRQ5 in an initialised PIC, so the frame's interrupt shows.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0xdf),
        ] {
            d.pio_write(port, v, &Position::default(), &mut tl).unwrap();
        }
        d.apply(&Input::Net(vec![0xab; 60])).unwrap();
        assert_eq!(d.demand(false).net.rx_buffers, 0);
        assert_eq!(d.acknowledge_interrupt(), Some(0x25));
        assert_eq!(d.net().unwrap().counters().rx_frames, 1);
        let mut outputs = Vec::new();
        d.take_outputs(&mut outputs);
        assert!(outputs.is_empty());
        assert!(tl.asked.is_empty());
    }

    /// A machine whose every device holds state: an initialised PIC with a
    /// pending timer request, a counting PIT, a selected CMOS index, unread
    /// COM1 input, and a live NIC with two posted buffers, one used.
    fn busy_machine(mem: &crate::memory::GuestMem) -> Devices {
        use crate::net_config::{NetConfig, DEFAULT_MAC};
        use vm_memory::{Bytes, GuestAddress};
        let net = NetConfig {
            mac: DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: None,
        };
        let mut d = Devices::new(
            PvDevice::with_net(&net),
            Some(VirtioNet::new(net.mac.0, mem.clone())),
        );
        let mut tl = Fake::default();
        let at = Position::default();
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0xdc),
            (0x43, 0x34),
            (0x40, 0x9c),
            (0x40, 0x2e),
            (0x70, 0x0a),
            (0x3f9, 1),
        ] {
            d.pio_write(port, v, &at, &mut tl).unwrap();
        }
        let write = |d: &mut Devices, off: u64, v: u32| {
            handle(
                d,
                &mut Fake::default(),
                Exit::MmioWrite {
                    addr: NET_MMIO_BASE + off,
                    data: v.to_le_bytes().to_vec(),
                },
            );
        };
        for (off, v) in [(0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
            write(&mut d, off, v);
        }
        for (off, v) in [
            (0x30, 0),
            (0x38, 16),
            (0x80, 0x1_0000),
            (0x90, 0x1_1000),
            (0xa0, 0x1_2000),
            (0x44, 1),
            (0x70, 15),
        ] {
            write(&mut d, off, v);
        }
        for (i, addr) in [0x2_0000u64, 0x3_0000].into_iter().enumerate() {
            let desc = 0x1_0000 + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(desc)).unwrap();
            mem.write_obj(2048u32, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap();
            mem.write_obj(i as u16, GuestAddress(0x1_0004 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(2u16, GuestAddress(0x1_1002)).unwrap();
        d.apply(&Input::Net(vec![0xab; 60])).unwrap();
        d.apply(&Input::Serial(SerialInput::Bytes(b"xy".to_vec())))
            .unwrap();
        d.apply(&Input::TimerTick).unwrap();
        d
    }

    fn memory_copy(mem: &crate::memory::GuestMem) -> crate::memory::GuestMem {
        use vm_memory::{Bytes, GuestAddress};
        let mut bytes = vec![0u8; 0x10_0000];
        mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        let copy = crate::memory::GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        copy.write_slice(&bytes, GuestAddress(0)).unwrap();
        copy
    }

    #[test]
    fn devices_state_moves_through_postcard_and_continues_alike() {
        use crate::net_config::{NetConfig, DEFAULT_MAC};
        let mem = crate::memory::GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)])
            .unwrap();
        let mut d = busy_machine(&mem);
        let s = d.state();
        let net = s.net.as_ref().unwrap();
        assert_eq!(net.transport.queues[0].next_used, 1);
        assert_eq!(s.com1.serial.in_buffer, b"xy");
        assert_eq!(s.pic.master.irr & 1, 1);
        let bytes = postcard::to_stdvec(&s).unwrap();
        let moved: DevicesState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(moved, s);
        assert!(postcard::from_bytes::<DevicesState>(&bytes[..bytes.len() / 2]).is_err());

        // A fresh machine of the same configuration, over a copy of memory.
        let mem2 = memory_copy(&mem);
        let config = NetConfig {
            mac: DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: None,
        };
        let mut e = Devices::new(
            PvDevice::with_net(&config),
            Some(VirtioNet::new(config.mac.0, mem2.clone())),
        );
        e.restore(&moved).unwrap();
        assert_eq!(e.state(), s);
        // Both go on alike: the same interrupt, the same demand, and the
        // second frame lands in the second buffer on both.
        assert_eq!(e.demand(false), d.demand(false));
        assert_eq!(e.demand(false).net.rx_buffers, 1);
        assert_eq!(e.acknowledge_interrupt(), d.acknowledge_interrupt());
        d.apply(&Input::Net(vec![0xcd; 80])).unwrap();
        e.apply(&Input::Net(vec![0xcd; 80])).unwrap();
        assert_eq!(e.state(), d.state());
        let mut tl = Fake::default();
        let read = Exit::IoIn {
            port: 0x3f8,
            len: 1,
        };
        assert_eq!(
            handle(&mut e, &mut tl, read.clone()),
            handle(&mut d, &mut tl, read)
        );
        assert_eq!(e.state(), d.state());
    }

    #[test]
    fn a_nic_on_one_side_only_is_refused_and_changes_nothing() {
        use crate::net_config::MacAddr;
        let mem = crate::memory::GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)])
            .unwrap();
        let with_nic = busy_machine(&mem).state();
        let mut plain = Devices::default();
        let before = plain.state();
        assert!(matches!(
            plain.restore(&with_nic),
            Err(Error::NetPresence {
                saved: true,
                here: false
            })
        ));
        assert_eq!(plain.state(), before);
        let mut nic = busy_machine(&mem);
        let before = nic.state();
        assert!(matches!(
            nic.restore(&Devices::default().state()),
            Err(Error::NetPresence {
                saved: false,
                here: true
            })
        ));
        let mut other_mac = with_nic.clone();
        other_mac.net.as_mut().unwrap().mac = [2, 0, 0, 0, 0, 1];
        let err = nic.restore(&other_mac).unwrap_err();
        assert!(matches!(
            err,
            Error::NetMac {
                saved: MacAddr([2, 0, 0, 0, 0, 1]),
                ..
            }
        ));
        let mut bad_queue = with_nic.clone();
        bad_queue.net.as_mut().unwrap().transport.queues[0].size = 3;
        assert!(matches!(nic.restore(&bad_queue), Err(Error::NetRestore(_))));
        let mut bad_fifo = with_nic;
        bad_fifo.com1.serial.in_buffer = vec![0; 65];
        assert!(matches!(nic.restore(&bad_fifo), Err(Error::Serial(_))));
        assert_eq!(nic.state(), before);
        // A machine without a NIC restores its own kind.
        let mut p = Devices::default();
        p.restore(&Devices::default().state()).unwrap();
    }
}
