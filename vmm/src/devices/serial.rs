//! COM1, a 16550A UART at ports 0x3f8-0x3ff on IRQ4, over vm-superio's
//! `Serial`.
//!
//! The model does no I/O, so that a backup replaying the guest produces the
//! same device state without a terminal attached. Guest output collects in
//! a `Vec<u8>` that the VMM drains with [`Com1::take_output`] and moves to the
//! real world. Host input comes from the timeline: the VMM offers at most
//! [`Com1::rx_room`] bytes to [`Com1::enqueue`] and keeps whatever does not
//! fit, so input back-pressures instead of being dropped. The interrupt line
//! is a flag the VMM polls with [`Com1::take_irq`] and forwards to the PIC;
//! everything runs on the vCPU thread, hence `Rc<Cell<bool>>`.

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::rc::Rc;

use vm_superio::serial::{Error as SuperioError, NoEvents};
use vm_superio::{Serial, SerialState, Trigger};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of I/O ports (registers) COM1 decodes.
pub const COM1_LEN: u16 = 8;
/// The PIC input COM1 interrupts on.
pub const COM1_IRQ: u8 = 4;

/// Modem control register: loopback mode.
const MCR_LOOP: u8 = 0x10;

/// Errors from COM1.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output sink refused a byte (cannot happen with a `Vec<u8>`).
    #[error("writing guest output failed")]
    Write(#[source] io::Error),
    /// A state to restore holds more input than the FIFO can.
    #[error("receive FIFO overflow in restored state")]
    RestoreFifo,
}

/// Result of COM1 operations.
pub type Result<T> = std::result::Result<T, SerialError>;

fn map_err(e: SuperioError<Infallible>) -> SerialError {
    match e {
        SuperioError::Trigger(never) => match never {},
        SuperioError::IOError(e) => SerialError::Write(e),
        SuperioError::FullFifo => SerialError::RestoreFifo,
    }
}

/// The UART's interrupt output: a flag set when vm-superio raises the
/// interrupt, read and cleared by the VMM. Clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct IrqLine(Rc<Cell<bool>>);

impl IrqLine {
    /// A line that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the line fired since the last call; clears it.
    pub fn take(&self) -> bool {
        self.0.replace(false)
    }

    /// Whether the line fired since the last [`IrqLine::take`], without
    /// clearing it.
    pub fn is_raised(&self) -> bool {
        self.0.get()
    }

    fn set(&self, raised: bool) {
        self.0.set(raised);
    }
}

impl Trigger for IrqLine {
    type E = Infallible;

    fn trigger(&self) -> std::result::Result<(), Infallible> {
        self.0.set(true);
        Ok(())
    }
}

/// COM1's full state, for state transfer: the UART registers and FIFO,
/// whether the interrupt fired and was not yet taken, and output not yet
/// drained.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Com1State {
    /// vm-superio's register and receive-FIFO state.
    #[serde(with = "SerialStateDef")]
    pub serial: SerialState,
    /// The interrupt fired and the VMM has not taken it yet.
    pub irq_pending: bool,
    /// Guest output not yet taken by the VMM.
    pub output: Vec<u8>,
    /// The line was hung up (a client left) and the guest has not read
    /// MSR since: its delta-DCD bit reads 1 once.
    pub carrier_lost: bool,
}

/// vm-superio's `SerialState` as serde sees it (vm-superio has no serde
/// support of its own); the field list must match it exactly, which the
/// compiler checks.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Modem status register offset, and its delta-DCD bit.
const MSR: u8 = 6;
/// Modem control register offset.
const MCR: u8 = 4;
const MSR_DDCD: u8 = 0x08;
/// vm-superio's receive FIFO size.
const FIFO_BYTES: usize = 64;

/// The COM1 UART.
#[derive(Debug)]
pub struct Com1 {
    serial: Serial<IrqLine, NoEvents, Vec<u8>>,
    irq: IrqLine,
    carrier_lost: bool,
    /// MCR's loopback bit, mirrored from the guest's writes: `rx_room` is
    /// asked at every exit, and vm-superio only exposes MCR through a full
    /// state copy.
    loopback: bool,
}

impl Default for Com1 {
    fn default() -> Self {
        Self::new()
    }
}

impl Com1 {
    /// A UART in its power-on state, with no output and no interrupt.
    pub fn new() -> Self {
        let irq = IrqLine::new();
        Self {
            serial: Serial::new(irq.clone(), Vec::new()),
            irq,
            carrier_lost: false,
            loopback: false,
        }
    }

    /// Rebuilds a UART from a state taken with [`Com1::state`]. The
    /// interrupt flag is exactly as saved, even though vm-superio re-raises
    /// pending interrupts while restoring.
    pub fn from_state(state: &Com1State) -> Result<Self> {
        let irq = IrqLine::new();
        let serial = Serial::from_state(&state.serial, irq.clone(), NoEvents, state.output.clone())
            .map_err(map_err)?;
        irq.set(state.irq_pending);
        Ok(Self {
            loopback: state.serial.modem_control & MCR_LOOP != 0,
            serial,
            irq,
            carrier_lost: state.carrier_lost,
        })
    }

    /// The full state, for state transfer.
    pub fn state(&self) -> Com1State {
        Com1State {
            serial: self.serial.state(),
            irq_pending: self.irq.is_raised(),
            output: self.serial.writer().clone(),
            carrier_lost: self.carrier_lost,
        }
    }

    /// Handles a guest read of register `offset` (port minus
    /// [`COM1_BASE`]). Unknown offsets read 0.
    pub fn read(&mut self, offset: u8) -> u8 {
        let value = self.serial.read(offset);
        if offset == MSR && std::mem::take(&mut self.carrier_lost) {
            value | MSR_DDCD
        } else {
            value
        }
    }

    /// The host side of the line changed hands (one client left, another
    /// came): the next MSR read shows delta-DCD, so that a guest can drop a
    /// request the last client left half-sent. vm-superio keeps DCD itself
    /// asserted and has no delta bits, so the wrapper adds this one.
    pub fn hang_up(&mut self) {
        self.carrier_lost = true;
    }

    /// True when the guest has read every received byte.
    pub fn rx_empty(&self) -> bool {
        self.serial.fifo_capacity() == FIFO_BYTES
    }

    /// Handles a guest write of `value` to register `offset`. Any value is
    /// accepted; unknown offsets are ignored.
    pub fn write(&mut self, offset: u8, value: u8) -> Result<()> {
        self.serial.write(offset, value).map_err(map_err)?;
        if offset == MCR {
            self.loopback = value & MCR_LOOP != 0;
        }
        Ok(())
    }

    /// How many bytes [`Com1::enqueue`] will accept now: the free receive
    /// FIFO slots, or 0 in loopback mode (where the UART takes no input
    /// from outside).
    pub fn rx_room(&self) -> usize {
        if self.loopback {
            0
        } else {
            self.serial.fifo_capacity()
        }
    }

    /// Puts host input into the receive FIFO and returns how many bytes
    /// were taken: exactly `min(bytes.len(), rx_room())`, the leading part
    /// of `bytes`. The caller keeps the rest for later. Raises the
    /// interrupt if the guest enabled received-data interrupts.
    pub fn enqueue(&mut self, bytes: &[u8]) -> Result<usize> {
        let room = self.rx_room();
        if room == 0 || bytes.is_empty() {
            return Ok(0);
        }
        let take = room.min(bytes.len());
        self.serial
            .enqueue_raw_bytes(&bytes[..take])
            .map_err(map_err)
    }

    /// Drains the guest output collected since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.serial.writer_mut())
    }

    /// Whether the UART raised its interrupt since the last call; clears it.
    pub fn take_irq(&self) -> bool {
        self.irq.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u8 = 0;
    const RBR: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const MCR: u8 = 4;
    const LSR: u8 = 5;
    const LSR_DR: u8 = 0x01;
    const FIFO: usize = 64;

    #[test]
    fn thr_writes_become_output() {
        let mut com = Com1::new();
        for &b in b"hello\n" {
            com.write(THR, b).unwrap();
        }
        assert_eq!(com.take_output(), b"hello\n");
        assert_eq!(com.take_output(), b"");
        assert!(!com.take_irq(), "THR interrupt not enabled");
    }

    #[test]
    fn thr_empty_interrupt() {
        let mut com = Com1::new();
        com.write(IER, 0x02).unwrap();
        assert!(com.take_irq());
        assert!(!com.take_irq(), "take clears");
        assert_eq!(com.read(IIR) & 0x0f, 0x02);
    }

    #[test]
    fn enqueue_raises_irq_and_reads_back() {
        let mut com = Com1::new();
        com.write(IER, 0x01).unwrap();
        assert!(!com.take_irq());
        assert_eq!(com.read(LSR) & LSR_DR, 0);
        assert_eq!(com.enqueue(b"ab").unwrap(), 2);
        assert!(com.take_irq());
        assert_eq!(com.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(com.read(RBR), b'a');
        assert_eq!(com.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(com.read(RBR), b'b');
        assert_eq!(com.read(LSR) & LSR_DR, 0);
        assert_eq!(com.rx_room(), FIFO);
    }

    #[test]
    fn no_irq_without_ier() {
        let mut com = Com1::new();
        assert_eq!(com.enqueue(b"x").unwrap(), 1);
        assert!(!com.take_irq());
        assert_eq!(com.read(RBR), b'x');
    }

    #[test]
    fn full_fifo_refuses_without_loss() {
        let mut com = Com1::new();
        let input: Vec<u8> = (0..100u8).collect();
        assert_eq!(com.rx_room(), FIFO);
        assert_eq!(com.enqueue(&input[..10]).unwrap(), 10);
        assert_eq!(com.rx_room(), FIFO - 10);
        let taken = com.enqueue(&input[10..]).unwrap();
        assert_eq!(taken, FIFO - 10);
        assert_eq!(com.rx_room(), 0);
        assert_eq!(com.enqueue(&input[FIFO..]).unwrap(), 0, "refused");
        // The guest reads everything that was accepted, in order.
        let got: Vec<u8> = (0..FIFO).map(|_| com.read(RBR)).collect();
        assert_eq!(got, &input[..FIFO]);
        // Room again: the rest goes in.
        assert_eq!(com.enqueue(&input[FIFO..]).unwrap(), 100 - FIFO);
        let got: Vec<u8> = (FIFO..100).map(|_| com.read(RBR)).collect();
        assert_eq!(got, &input[FIFO..]);
        assert_eq!(com.enqueue(b"").unwrap(), 0);
    }

    #[test]
    fn loopback_takes_no_host_input() {
        let mut com = Com1::new();
        com.write(MCR, 0x10).unwrap();
        assert_eq!(com.rx_room(), 0);
        assert_eq!(com.enqueue(b"abc").unwrap(), 0);
        com.write(THR, b'z').unwrap();
        assert_eq!(com.read(RBR), b'z');
        assert_eq!(com.take_output(), b"");
    }

    #[test]
    fn divisor_latch() {
        let mut com = Com1::new();
        com.write(LCR, 0x83).unwrap();
        com.write(0, 0x01).unwrap();
        com.write(1, 0x00).unwrap();
        com.write(LCR, 0x03).unwrap();
        assert_eq!(com.state().serial.baud_divisor_low, 0x01);
        assert_eq!(com.take_output(), b"", "divisor writes are not output");
    }

    #[test]
    fn state_round_trip() {
        let mut com = Com1::new();
        com.write(IER, 0x01).unwrap();
        com.write(THR, b'o').unwrap();
        com.enqueue(b"in").unwrap();
        let state = com.state();
        assert!(state.irq_pending);
        let bytes = postcard::to_stdvec(&state).unwrap();
        assert_eq!(postcard::from_bytes::<Com1State>(&bytes).unwrap(), state);
        let mut copy = Com1::from_state(&state).unwrap();
        assert_eq!(copy.state(), state);
        assert!(copy.take_irq());
        assert_eq!(copy.take_output(), b"o");
        assert_eq!(copy.read(RBR), b'i');
        // A restored flag that was taken stays clear.
        com.take_irq();
        let copy = Com1::from_state(&com.state()).unwrap();
        assert!(!copy.take_irq());
        // Too much input is refused.
        let mut bad = com.state();
        bad.serial.in_buffer = vec![0; FIFO + 1];
        assert!(matches!(
            Com1::from_state(&bad),
            Err(SerialError::RestoreFifo)
        ));
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut com = Com1::new();
        let mut x: u32 = 0x2545_f491;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let offset = (x >> 8) as u8 % 10;
            let value = (x >> 16) as u8;
            match x % 4 {
                0 => com.write(offset, value).unwrap(),
                1 => {
                    com.read(offset);
                }
                2 => {
                    let room = com.rx_room();
                    let n = com.enqueue(&[value; 3]).unwrap();
                    assert_eq!(n, room.min(3));
                }
                _ => {
                    com.take_output();
                    com.take_irq();
                }
            }
        }
    }

    #[test]
    fn hang_up_shows_delta_dcd_once_and_survives_state_transfer() {
        let mut c = Com1::new();
        assert_eq!(c.read(MSR) & MSR_DDCD, 0);
        assert!(c.rx_empty());
        c.hang_up();
        let mut moved = Com1::from_state(&c.state()).unwrap();
        assert_ne!(moved.read(MSR) & MSR_DDCD, 0);
        assert_eq!(moved.read(MSR) & MSR_DDCD, 0, "delta bits clear on read");
        moved.write(1, 1).unwrap();
        moved.enqueue(b"x").unwrap();
        assert!(!moved.rx_empty());
    }
}
