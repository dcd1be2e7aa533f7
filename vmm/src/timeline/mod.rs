//! The one door for nondeterminism.
//!
//! Everything the guest can observe that does not follow from its own state
//! is asked of a [`Timeline`] at a synchronous exit, on the vCPU thread,
//! while the vCPU is stopped: clock and wall-clock reads, entropy, timer
//! ticks, serial input. Every output that leaves the machine goes out
//! through it too, so that a replicating timeline can hold it (the Output
//! Rule) and a replaying one can drop it.
//!
//! The vCPU loop and the devices never ask "am I recording?". Solo, record
//! and replay are implementations of this trait; going live after a
//! failover is swapping one for another at a known [`Position`].

pub mod live;
pub mod record;
pub mod replay;

/// Where in the guest's execution an event happens: the ordinal of the
/// synchronous exit since boot, cross-checked with RIP and a checksum of the
/// general registers (DESIGN.md, Positions). The log format owns the type,
/// so that what is logged is exactly what the VMM compares.
pub use logchannel::Position;

/// An input from the world, applied to the devices at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The PIT's period elapsed: raise IRQ0.
    TimerTick,
    /// Bytes for COM1's receive FIFO; never more than [`Demand::serial_room`].
    Serial(Vec<u8>),
    /// The serial line changed hands; only offered when the guest waits
    /// with every byte of the client before read ([`Demand::serial_rx_empty`]).
    SerialHangup,
}

/// What the machine can take at this exit, from deterministic device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// The PIT channel 0 period, when the guest programmed a periodic timer.
    pub timer_period_ns: Option<u64>,
    /// Free slots in COM1's receive FIFO.
    pub serial_room: usize,
    /// COM1's receive FIFO is empty (the guest read everything).
    pub serial_rx_empty: bool,
    /// The guest is idle (HLT, or the paravirtual wait) and nothing is
    /// pending: block until at least one input arrives.
    pub idle: bool,
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
    #[error("log channel: {0}")]
    Channel(String),
    #[error("the arbiter gave {vm_id}/epoch {epoch} to {holder}: halting")]
    LostArbitration {
        vm_id: String,
        epoch: u64,
        holder: String,
    },
    #[error("arbiter: {0}")]
    Arbiter(String),
    #[error("writing the transcript failed")]
    Transcript(#[source] std::io::Error),
    #[error("the guest is idle with interrupts that can never arrive (no timer, input closed)")]
    Deadlock,
    #[error("reading entropy failed")]
    Entropy(#[source] std::io::Error),
    #[error("the serial output is closed")]
    OutputClosed,
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
    /// Serial bytes the guest transmitted at this exit, bound for the world.
    fn serial_output(&mut self, at: &Position, bytes: Vec<u8>) -> Result<(), Error>;
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
}
