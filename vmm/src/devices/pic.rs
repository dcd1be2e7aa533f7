//! The i8259A programmable interrupt controller pair (master on ports
//! 0x20/0x21, slave on 0xa0/0xa1, slave cascaded on master IRQ2).
//!
//! Duet has no in-kernel irqchip: the VMM injects interrupts itself with
//! `KVM_INTERRUPT` at synchronous exits, so it needs a model that answers
//! "which vector would the guest take now?" ([`Pic::pending_vector`]) and
//! performs the INTA cycle ([`Pic::acknowledge`]). The model is a pure
//! function of the guest's port accesses and the interrupt requests the VMM
//! raises, which is what makes replay exact.
//!
//! Modelled: the ICW1-ICW4 initialisation sequence (single/cascade mode,
//! ICW4 presence, vector base, auto-EOI), OCW1 (interrupt mask), OCW2
//! non-specific and specific EOI, OCW3 IRR/ISR read select, edge-triggered
//! inputs and fixed priority (IRQ0 highest) with nesting through the ISR.
//!
//! Not modelled (accepted and ignored, never a panic): priority rotation
//! (the rotate OCW2 commands still perform their EOI part), special mask
//! mode, poll mode, level-triggered mode, special fully nested mode and the
//! ICW3 slave wiring (the slave is always on master IRQ2).
//!
//! Two choices differ from bare silicon, both to keep a guest that has not
//! programmed the PIC from taking interrupts on exception vectors: at power-on
//! every input is masked (IMR = 0xff; ICW1 clears it, as the datasheet says),
//! and a chip in the middle of its ICW sequence delivers nothing.

/// I/O port of the master's command register (ICW1, OCW2, OCW3; reads IRR/ISR).
pub const MASTER_CMD: u16 = 0x20;
/// I/O port of the master's data register (ICW2-4, OCW1; reads IMR).
pub const MASTER_DATA: u16 = 0x21;
/// I/O port of the slave's command register.
pub const SLAVE_CMD: u16 = 0xa0;
/// I/O port of the slave's data register.
pub const SLAVE_DATA: u16 = 0xa1;

/// The master input the slave's INT output is wired to.
const CASCADE_IRQ: u8 = 2;

/// ICW1 bit 4: this command-port write starts initialisation.
const ICW1_INIT: u8 = 0x10;
/// ICW1 bit 1: single mode (no cascade, no ICW3).
const ICW1_SINGLE: u8 = 0x02;
/// ICW1 bit 0: an ICW4 follows.
const ICW1_IC4: u8 = 0x01;
/// ICW4 bit 1: automatic end of interrupt.
const ICW4_AEOI: u8 = 0x02;
/// OCW3 bit 3: distinguishes OCW3 from OCW2.
const OCW3_SELECT: u8 = 0x08;
/// OCW3 bit 1: the read-register command is valid.
const OCW3_RR: u8 = 0x02;
/// OCW3 bit 0: read ISR (set) or IRR (clear).
const OCW3_RIS: u8 = 0x01;

/// Where a chip is in its initialisation sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InitStep {
    /// Initialised; data-port writes are OCW1.
    #[default]
    Ready,
    /// ICW1 seen; the next data-port write is ICW2.
    Icw2,
    /// The next data-port write is ICW3.
    Icw3,
    /// The next data-port write is ICW4.
    Icw4,
}

/// The registers of one i8259A, as moved by state transfer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicChipState {
    /// Interrupt request register: latched edges not yet acknowledged.
    pub irr: u8,
    /// In-service register: acknowledged, not yet EOI'd.
    pub isr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// Vector of input 0 (ICW2 with the low three bits cleared).
    pub vector_base: u8,
    /// Automatic EOI at acknowledge (ICW4 bit 1).
    pub auto_eoi: bool,
    /// Single mode (ICW1 bit 1): no cascade.
    pub single: bool,
    /// ICW1 announced an ICW4.
    pub expect_icw4: bool,
    /// The ICW3 value as written (stored, not interpreted).
    pub icw3: u8,
    /// Command-port reads return ISR (set) or IRR (clear).
    pub read_isr: bool,
    /// Position in the ICW sequence.
    pub init_step: InitStep,
}

impl Default for PicChipState {
    fn default() -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0xff,
            vector_base: 0,
            auto_eoi: false,
            single: false,
            expect_icw4: false,
            icw3: 0,
            read_isr: false,
            init_step: InitStep::Ready,
        }
    }
}

/// The state of both chips, as moved by state transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicState {
    /// The master chip (IRQ 0-7).
    pub master: PicChipState,
    /// The slave chip (IRQ 8-15).
    pub slave: PicChipState,
}

impl PicChipState {
    /// The highest-priority input that this chip would signal, given the
    /// extra request lines in `extra_irr` (the cascade input), or `None`.
    fn highest_unblocked(&self, extra_irr: u8) -> Option<u8> {
        if self.init_step != InitStep::Ready {
            return None;
        }
        let requests = (self.irr | extra_irr) & !self.imr;
        if requests == 0 {
            return None;
        }
        let line = requests.trailing_zeros() as u8;
        // Blocked by an in-service input of equal or higher priority
        // (lower or equal number under fixed priority).
        let blocking = self.isr & (((1u16 << (line + 1)) - 1) as u8);
        if blocking != 0 {
            None
        } else {
            Some(line)
        }
    }

    /// Marks `line` as acknowledged: clears its request and sets it in
    /// service unless in auto-EOI mode.
    fn ack_line(&mut self, line: u8) {
        let bit = 1u8 << line;
        self.irr &= !bit;
        if !self.auto_eoi {
            self.isr |= bit;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1_INIT != 0 {
            // ICW1: restart initialisation. The datasheet clears the IMR and
            // the edge-sense latches; pending requests go with them.
            self.irr = 0;
            self.isr = 0;
            self.imr = 0;
            self.read_isr = false;
            self.auto_eoi = false;
            self.single = value & ICW1_SINGLE != 0;
            self.expect_icw4 = value & ICW1_IC4 != 0;
            self.init_step = InitStep::Icw2;
        } else if value & OCW3_SELECT != 0 {
            if value & OCW3_RR != 0 {
                self.read_isr = value & OCW3_RIS != 0;
            }
        } else {
            // OCW2: bits 7-5 are R, SL, EOI.
            match value >> 5 {
                // Non-specific EOI, and rotate on non-specific EOI.
                0b001 | 0b101 => {
                    // Clear the lowest set bit: the highest priority in service.
                    self.isr &= self.isr.wrapping_sub(1);
                }
                // Specific EOI, and rotate on specific EOI.
                0b011 | 0b111 => self.isr &= !(1u8 << (value & 7)),
                // Rotation and priority commands: not modelled.
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            InitStep::Ready => self.imr = value,
            InitStep::Icw2 => {
                self.vector_base = value & 0xf8;
                self.init_step = if !self.single {
                    InitStep::Icw3
                } else if self.expect_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw3 => {
                self.icw3 = value;
                self.init_step = if self.expect_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                self.auto_eoi = value & ICW4_AEOI != 0;
                self.init_step = InitStep::Ready;
            }
        }
    }
}

/// The i8259A master/slave pair of a PC.
///
/// The VMM raises device interrupts with [`Pic::raise_irq`], asks
/// [`Pic::pending_vector`] at each synchronous exit whether to inject, and
/// calls [`Pic::acknowledge`] when it actually injects.
#[derive(Clone, Debug, Default)]
pub struct Pic {
    state: PicState,
}

impl Pic {
    /// A pair in its power-on state: all inputs masked, vector base 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a pair from a state taken with [`Pic::state`].
    pub fn from_state(state: &PicState) -> Self {
        Self {
            state: state.clone(),
        }
    }

    /// The full register state, for state transfer.
    pub fn state(&self) -> PicState {
        self.state.clone()
    }

    /// Whether the slave is cascaded into master IRQ2 (master not in single
    /// mode).
    fn cascaded(&self) -> bool {
        !self.state.master.single
    }

    /// The master's IRQ2 request line as driven by the slave's INT output.
    fn cascade_line(&self) -> u8 {
        if self.cascaded() && self.state.slave.highest_unblocked(0).is_some() {
            1 << CASCADE_IRQ
        } else {
            0
        }
    }

    /// Handles a guest read of one of the four PIC ports. Command ports
    /// return IRR or ISR (as selected by OCW3), data ports return the IMR;
    /// any other port reads 0xff.
    pub fn read(&self, port: u16) -> u8 {
        match port {
            MASTER_CMD => {
                let m = &self.state.master;
                if m.read_isr {
                    m.isr
                } else {
                    m.irr | self.cascade_line()
                }
            }
            MASTER_DATA => self.state.master.imr,
            SLAVE_CMD => {
                let s = &self.state.slave;
                if s.read_isr {
                    s.isr
                } else {
                    s.irr
                }
            }
            SLAVE_DATA => self.state.slave.imr,
            _ => 0xff,
        }
    }

    /// Handles a guest write to one of the four PIC ports. Any value is
    /// accepted; writes to other ports are ignored.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => self.state.master.write_command(value),
            MASTER_DATA => self.state.master.write_data(value),
            SLAVE_CMD => self.state.slave.write_command(value),
            SLAVE_DATA => self.state.slave.write_data(value),
            _ => {}
        }
    }

    /// The latched requests of both chips as IRQ numbers: bit n is IRQ n
    /// (master in the low byte, slave in the high byte). For tests and
    /// diagnostics; unlike a guest read it does not include the cascade line.
    pub fn irr(&self) -> u16 {
        u16::from_le_bytes([self.state.master.irr, self.state.slave.irr])
    }

    /// Latches a rising edge on input `irq` (0-15). Masked inputs are still
    /// latched in the IRR, as on the real chip. Numbers above 15 are ignored,
    /// and so is IRQ2 while the slave is cascaded there (that input carries
    /// the slave; ISA IRQ2 devices belong on IRQ9).
    pub fn raise_irq(&mut self, irq: u8) {
        match irq {
            CASCADE_IRQ if self.cascaded() => {}
            0..=7 => self.state.master.irr |= 1 << irq,
            8..=15 => self.state.slave.irr |= 1 << (irq - 8),
            _ => {}
        }
    }

    /// The vector the guest would take if the VMM injected now, or `None`
    /// if no unmasked request is waiting or every waiting one is blocked by
    /// an in-service interrupt of equal or higher priority.
    pub fn pending_vector(&self) -> Option<u8> {
        let master = &self.state.master;
        let line = master.highest_unblocked(self.cascade_line())?;
        if line == CASCADE_IRQ && self.cascaded() {
            let slave = &self.state.slave;
            let sline = slave.highest_unblocked(0)?;
            Some(slave.vector_base.wrapping_add(sline))
        } else {
            Some(master.vector_base.wrapping_add(line))
        }
    }

    /// Performs the INTA cycle for the interrupt the VMM is injecting:
    /// moves it from IRR to ISR (unless the chip is in auto-EOI mode) on the
    /// master and, for IRQ 8-15, on the slave too, and returns its vector.
    /// Returns `None` and changes nothing if nothing is pending.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let cascade = self.cascade_line();
        let line = self.state.master.highest_unblocked(cascade)?;
        if line == CASCADE_IRQ && self.cascaded() {
            let sline = self.state.slave.highest_unblocked(0)?;
            self.state.slave.ack_line(sline);
            self.state.master.ack_line(CASCADE_IRQ);
            Some(self.state.slave.vector_base.wrapping_add(sline))
        } else {
            self.state.master.ack_line(line);
            Some(self.state.master.vector_base.wrapping_add(line))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Programs both chips the way Linux and the Duet guests do: cascade,
    /// ICW4, master base 0x20, slave base 0x28, then unmasks everything.
    fn programmed(aeoi: bool) -> Pic {
        let mut pic = Pic::new();
        let icw4 = if aeoi { 0x03 } else { 0x01 };
        pic.write(MASTER_CMD, 0x11);
        pic.write(MASTER_DATA, 0x20);
        pic.write(MASTER_DATA, 0x04);
        pic.write(MASTER_DATA, icw4);
        pic.write(SLAVE_CMD, 0x11);
        pic.write(SLAVE_DATA, 0x28);
        pic.write(SLAVE_DATA, 0x02);
        pic.write(SLAVE_DATA, icw4);
        pic.write(MASTER_DATA, 0x00);
        pic.write(SLAVE_DATA, 0x00);
        pic
    }

    #[test]
    fn power_on_delivers_nothing() {
        let mut pic = Pic::new();
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.read(MASTER_DATA), 0xff);
    }

    #[test]
    fn init_then_irq0_gives_vector_0x20() {
        let mut pic = programmed(false);
        assert_eq!(pic.pending_vector(), None);
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), Some(0x20));
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.state().master.isr, 0x01);
    }

    #[test]
    fn mid_init_delivers_nothing() {
        let mut pic = programmed(false);
        pic.write(MASTER_CMD, 0x11);
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), None);
        pic.write(MASTER_DATA, 0x40);
        pic.write(MASTER_DATA, 0x04);
        pic.write(MASTER_DATA, 0x01);
        assert_eq!(pic.pending_vector(), Some(0x40));
    }

    #[test]
    fn init_without_icw4_and_single_mode() {
        let mut pic = Pic::new();
        // Single mode, no ICW4: ICW2 is the last word.
        pic.write(MASTER_CMD, 0x12);
        pic.write(MASTER_DATA, 0x30);
        assert_eq!(pic.state().master.init_step, InitStep::Ready);
        pic.raise_irq(2); // not a cascade in single mode
        assert_eq!(pic.pending_vector(), Some(0x32));
        // The next data write is OCW1.
        pic.write(MASTER_DATA, 0xff);
        assert_eq!(pic.pending_vector(), None);
    }

    #[test]
    fn masked_irq_is_latched_and_delivered_on_unmask() {
        let mut pic = programmed(false);
        pic.write(MASTER_DATA, 0x01);
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.read(MASTER_CMD), 0x01, "IRR still latches");
        pic.write(MASTER_DATA, 0x00);
        assert_eq!(pic.pending_vector(), Some(0x20));
    }

    #[test]
    fn priority_and_nesting() {
        let mut pic = programmed(false);
        pic.raise_irq(4);
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21), "IRQ1 beats IRQ4");
        // IRQ4 is blocked by IRQ1 in service.
        assert_eq!(pic.pending_vector(), None);
        // A higher-priority IRQ0 nests.
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert_eq!(pic.state().master.isr, 0x03);
        // Equal priority does not nest.
        pic.raise_irq(0);
        assert_eq!(pic.pending_vector(), None);
        // Non-specific EOI releases the highest in service (IRQ0).
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(pic.state().master.isr, 0x02);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.write(MASTER_CMD, 0x20);
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(pic.state().master.isr, 0);
        assert_eq!(pic.acknowledge(), Some(0x24));
    }

    #[test]
    fn specific_eoi_releases_that_line() {
        let mut pic = programmed(false);
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.raise_irq(5);
        assert_eq!(pic.pending_vector(), None);
        pic.write(MASTER_CMD, 0x60 | 5); // wrong line: no effect
        assert_eq!(pic.pending_vector(), None);
        pic.write(MASTER_CMD, 0x60 | 3);
        assert_eq!(pic.pending_vector(), Some(0x25));
    }

    #[test]
    fn slave_irqs_via_cascade() {
        let mut pic = programmed(false);
        for n in 8..16u8 {
            pic.raise_irq(n);
            assert_eq!(pic.pending_vector(), Some(0x28 + n - 8));
            assert_eq!(pic.acknowledge(), Some(0x28 + n - 8));
            assert_eq!(pic.state().master.isr, 0x04);
            assert_eq!(pic.state().slave.isr, 1 << (n - 8));
            pic.write(SLAVE_CMD, 0x20);
            pic.write(MASTER_CMD, 0x20);
            assert_eq!(pic.state().master.isr, 0);
            assert_eq!(pic.state().slave.isr, 0);
        }
    }

    #[test]
    fn slave_priority_sits_at_irq2() {
        let mut pic = programmed(false);
        pic.raise_irq(3);
        pic.raise_irq(12);
        assert_eq!(pic.acknowledge(), Some(0x2c), "IRQ12 (via IRQ2) beats IRQ3");
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21), "IRQ1 nests over IRQ2");
        // IRQ2 cascade line reads in the master IRR only while the slave asserts.
        pic.raise_irq(9);
        assert_eq!(pic.read(SLAVE_CMD), 0x02);
        // Master IRQ2 is in service, so the slave's request waits.
        assert_eq!(pic.state().slave.isr, 0x10);
        pic.write(MASTER_CMD, 0x20); // EOI IRQ1
        assert_eq!(
            pic.pending_vector(),
            None,
            "IRQ2 still in service on master"
        );
        pic.write(SLAVE_CMD, 0x20);
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x29));
        // IRQ3 has waited all along.
        pic.write(SLAVE_CMD, 0x20);
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x23));
    }

    #[test]
    fn masked_slave_or_cascade_blocks() {
        let mut pic = programmed(false);
        pic.raise_irq(8);
        pic.write(MASTER_DATA, 0x04);
        assert_eq!(pic.pending_vector(), None);
        pic.write(MASTER_DATA, 0x00);
        pic.write(SLAVE_DATA, 0x01);
        assert_eq!(pic.pending_vector(), None);
        assert_eq!(pic.read(MASTER_CMD), 0x00);
        pic.write(SLAVE_DATA, 0x00);
        assert_eq!(pic.read(MASTER_CMD), 0x04);
        assert_eq!(pic.acknowledge(), Some(0x28));
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = programmed(true);
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        assert_eq!(pic.state().master.isr, 0);
        pic.raise_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20), "no EOI needed");
        pic.raise_irq(10);
        assert_eq!(pic.acknowledge(), Some(0x2a));
        assert_eq!(pic.state().master.isr, 0);
        assert_eq!(pic.state().slave.isr, 0);
    }

    #[test]
    fn reads_imr_irr_isr() {
        let mut pic = programmed(false);
        pic.write(MASTER_DATA, 0xb8);
        pic.write(SLAVE_DATA, 0x5a);
        assert_eq!(pic.read(MASTER_DATA), 0xb8);
        assert_eq!(pic.read(SLAVE_DATA), 0x5a);
        pic.raise_irq(1);
        pic.raise_irq(6);
        assert_eq!(pic.read(MASTER_CMD), 0x42, "IRR by default");
        pic.acknowledge();
        pic.write(MASTER_CMD, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read(MASTER_CMD), 0x02);
        pic.write(MASTER_CMD, 0x0a); // OCW3: read IRR
        assert_eq!(pic.read(MASTER_CMD), 0x40);
        pic.write(MASTER_CMD, 0x09); // RR clear: selection unchanged
        assert_eq!(pic.read(MASTER_CMD), 0x40);
        pic.write(SLAVE_CMD, 0x0b);
        assert_eq!(pic.read(SLAVE_CMD), 0x00);
        assert_eq!(pic.read(0x22), 0xff);
    }

    #[test]
    fn invalid_irqs_are_ignored() {
        let mut pic = programmed(false);
        let before = pic.state();
        pic.raise_irq(16);
        pic.raise_irq(255);
        pic.raise_irq(2); // cascade input
        assert_eq!(pic.state(), before);
    }

    #[test]
    fn state_round_trip() {
        let mut pic = programmed(false);
        pic.raise_irq(5);
        pic.raise_irq(11);
        pic.acknowledge();
        let bytes = postcard::to_stdvec(&pic.state()).unwrap();
        let copy = Pic::from_state(&postcard::from_bytes(&bytes).unwrap());
        assert_eq!(copy.state(), pic.state());
        assert_eq!(copy.pending_vector(), pic.pending_vector());
    }

    #[test]
    fn garbage_writes_do_not_panic() {
        let mut pic = Pic::new();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let port =
                [MASTER_CMD, MASTER_DATA, SLAVE_CMD, SLAVE_DATA, 0x22][(x >> 8) as usize % 5];
            let value = (x >> 16) as u8;
            match (x >> 28) % 4 {
                0 => pic.raise_irq(value % 20),
                1 => {
                    pic.acknowledge();
                }
                2 => {
                    pic.read(port);
                    pic.pending_vector();
                }
                _ => pic.write(port, value),
            }
        }
    }
}
