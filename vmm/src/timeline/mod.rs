//! The one door for nondeterminism.
//!
//! Everything the guest can observe that does not follow from its own state
//! is asked of a [`Timeline`] at a synchronous exit, on the vCPU thread,
//! while the vCPU is stopped: clock and wall-clock reads, entropy, timer
//! ticks, and device inputs. Every output that leaves the machine goes out
//! through it too, so that a replicating timeline can hold it (the Output
//! Rule) and a replaying one can drop it.
//!
//! The door is device-neutral: an [`Input`] and an [`Output`] have a
//! variant per device kind, and [`Demand`] says per device what the
//! machine can take now. A new device (the NIC did, a disk will) adds variants here
//! and a backend in [`world`]; the vCPU loop and the timelines do not change.
//!
//! The vCPU loop and the devices never ask "am I recording?". Solo, record
//! and replay are implementations of this trait; going live after a
//! failover is swapping one for another at a known [`Position`].

pub mod live;
pub mod record;
pub mod replay;
pub mod world;

use logchannel::Event;

/// Where in the guest's execution an event happens: the ordinal of the
/// synchronous exit since boot, cross-checked with RIP and a checksum of the
/// general registers (docs/ARCHITECTURE.md, Positions). The log format owns
/// the type, so that what is logged is exactly what the VMM compares.
pub use logchannel::Position;

/// An input from the world, applied to the devices at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The PIT's period elapsed: raise IRQ0.
    TimerTick,
    /// Something for COM1.
    Serial(SerialInput),
    /// One Ethernet frame for the NIC, written into the next RX buffer the
    /// guest posted; never offered unless [`NetDemand::rx_buffers`] > 0.
    Net(Vec<u8>),
}

/// What the serial line delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialInput {
    /// Bytes for the receive FIFO; never more than [`SerialDemand::room`].
    Bytes(Vec<u8>),
    /// The line changed hands (one client left, another's bytes come
    /// next); only offered while the guest waits with every byte read.
    Hangup,
}

impl Input {
    /// The log event that records this input. Record and replay both go
    /// through this pair of functions, so the mapping cannot drift.
    pub fn to_event(&self) -> Event {
        match self {
            Input::TimerTick => Event::TimerTick,
            Input::Serial(SerialInput::Bytes(bytes)) => Event::SerialIn {
                bytes: bytes.clone(),
            },
            Input::Serial(SerialInput::Hangup) => Event::SerialHangup,
            Input::Net(bytes) => Event::NetFrame {
                bytes: bytes.clone(),
            },
        }
    }

    /// The input a log event records, if it records one.
    pub fn from_event(event: &Event) -> Option<Input> {
        Some(match event {
            Event::TimerTick => Input::TimerTick,
            Event::SerialIn { bytes } => Input::Serial(SerialInput::Bytes(bytes.clone())),
            Event::SerialHangup => Input::Serial(SerialInput::Hangup),
            Event::NetFrame { bytes } => Input::Net(bytes.clone()),
            _ => return None,
        })
    }
}

/// An output bound for the world, produced by a device at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes COM1 transmitted.
    Serial(Vec<u8>),
    /// One Ethernet frame the NIC transmitted (without the virtio header).
    Net(Vec<u8>),
}

impl Output {
    /// The bytes of serial output, for transcripts (which show the serial
    /// line only; frames are not text).
    pub fn serial_bytes(&self) -> Option<&[u8]> {
        match self {
            Output::Serial(b) => Some(b),
            Output::Net(_) => None,
        }
    }
}

/// What COM1 can take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SerialDemand {
    /// Free slots in the receive FIFO.
    pub room: usize,
    /// The receive FIFO is empty (the guest read everything).
    pub rx_empty: bool,
}

/// What the NIC can take now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetDemand {
    /// Receive buffers the guest has posted and the device has not filled:
    /// one frame takes one. Read from guest memory at the exit, so both
    /// sides of a pair compute the same number.
    pub rx_buffers: usize,
}

/// What the machine can take at this exit, per device, from deterministic
/// device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// The PIT channel 0 period, when the guest programmed a periodic timer.
    pub timer_period_ns: Option<u64>,
    pub serial: SerialDemand,
    pub net: NetDemand,
    /// The guest is idle (HLT, or the paravirtual wait) and nothing is
    /// pending: block until at least one input arrives.
    pub idle: bool,
}

impl Demand {
    /// True if the machine can take `input` now.
    pub fn fits(&self, input: &Input) -> bool {
        match input {
            Input::TimerTick | Input::Serial(SerialInput::Hangup) => true,
            Input::Serial(SerialInput::Bytes(b)) => b.len() <= self.serial.room,
            Input::Net(_) => self.net.rx_buffers > 0,
        }
    }

    /// What is left once `input` is taken: a timeline that answers from
    /// two sources (a backup going live drains the log, then the world)
    /// offers the second only what the first left.
    pub fn consume(&mut self, input: &Input) {
        match input {
            Input::Serial(SerialInput::Bytes(b)) => {
                self.serial.room = self.serial.room.saturating_sub(b.len());
                self.serial.rx_empty &= b.is_empty();
            }
            Input::Net(_) => self.net.rx_buffers = self.net.rx_buffers.saturating_sub(1),
            Input::TimerTick | Input::Serial(SerialInput::Hangup) => {}
        }
    }
}

/// Registers plus a hash of all guest memory, for divergence checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateDigest {
    pub regs_crc: u32,
    pub mem_crc: u32,
    /// The guest's tag for a requested digest, or `u64::MAX` for a periodic one.
    pub tag: u64,
}

impl std::fmt::Display for StateDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "regs {:08x} mem {:08x}", self.regs_crc, self.mem_crc)
    }
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered off with this code.
    PowerOff(u8),
    /// The operator stopped the run (recording), or the log says the
    /// recording was stopped here (replay).
    Stopped,
}

/// Errors from a timeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("divergence at record {seq} ({at}): expected {expected}, saw {seen}")]
    Divergence {
        seq: u64,
        at: Position,
        expected: String,
        seen: String,
    },
    #[error("the log ends before {at} (after record {last_seq:?}); it was cut short")]
    LogEnded { at: Position, last_seq: Option<u64> },
    #[error(transparent)]
    Log(#[from] logchannel::Error),
    /// A fault-tolerant role failed (the peer, the arbiter, going live).
    #[error(transparent)]
    Ft(#[from] crate::ft::Error),
    #[error("writing the transcript failed")]
    Transcript(#[source] std::io::Error),
    #[error("the guest is idle with interrupts that can never arrive (no timer, input closed)")]
    Deadlock,
    #[error("reading entropy failed")]
    Entropy(#[source] std::io::Error),
    #[error("the output is closed")]
    OutputClosed,
    /// A stop signal arrived while the timeline waited (for the primary's
    /// log, say); the run ends without reaching a recorded end.
    #[error("stopped by a signal")]
    Interrupted,
}

/// The door. See the module documentation.
pub trait Timeline {
    /// Monotonic nanoseconds since boot.
    fn clock_ns(&mut self, at: &Position) -> Result<u64, Error>;
    /// Wall-clock time, seconds since the Unix epoch.
    fn wall_clock(&mut self, at: &Position) -> Result<i64, Error>;
    /// Eight bytes of entropy.
    fn entropy(&mut self, at: &Position) -> Result<u64, Error>;
    /// Inputs arriving at this exit, appended to `out`. When `demand.idle`,
    /// blocks until there is at least one.
    fn inputs(&mut self, at: &Position, demand: &Demand, out: &mut Vec<Input>)
        -> Result<(), Error>;
    /// An interrupt vector was delivered at this exit.
    fn interrupt(&mut self, at: &Position, vector: u8) -> Result<(), Error>;
    /// True if a state digest should be taken at this exit: `requested` when
    /// the guest asked for one; a recorder also takes periodic ones. Hashing
    /// memory is not free, so a solo run says no.
    fn wants_digest(&mut self, at: &Position, requested: bool) -> bool;
    /// A state digest taken at this exit.
    fn digest(&mut self, at: &Position, digest: &StateDigest) -> Result<(), Error>;
    /// An output a device produced at this exit, bound for the world.
    fn output(&mut self, at: &Position, output: Output) -> Result<(), Error>;
    /// Called before every KVM_RUN with the ordinal the next synchronous
    /// exit will have. A backup blocks here until the primary's horizon
    /// covers it, so that it never executes past what it knows.
    fn before_run(&mut self, _next_exit: u64) -> Result<(), Error> {
        Ok(())
    }
    /// True if the run ends at this exit, before it is handled: the
    /// operator stopped a recording, or replay reached the recorded stop.
    fn stop_here(&mut self, at: &Position) -> Result<bool, Error>;
    /// The run ends at `at` with the final state `digest`. Flushes logs and
    /// output.
    fn finish(&mut self, at: &Position, ending: Ending, digest: &StateDigest) -> Result<(), Error>;
    /// True when the timeline needs the machine itself (a backup joining
    /// this running VM wants its memory and state): the vCPU loop then
    /// calls [`Timeline::attend_machine`] before it runs the guest again.
    /// Read at every exit, so it must be cheap.
    fn wants_machine(&self) -> bool {
        false
    }
    /// The run ends with `error`, which one of the calls above returned: a
    /// backup whose replay diverged tells its primary here, before it
    /// exits, so that a primary verifying outputs releases none of those it
    /// holds.
    fn run_failed(&mut self, _error: &Error) {}
    /// Works on the machine between exits, with the vCPU stopped.
    fn attend_machine(
        &mut self,
        _machine: &mut dyn crate::vcpu::MachineAccess,
    ) -> Result<(), Error> {
        Ok(())
    }
}
