//! The vCPU loop: a small state machine around the one exit handler
//! ([`Devices::handle_exit`]).
//!
//! Every synchronous exit is a position. At each, in this order and always
//! on this thread with the vCPU stopped: the access is handled, output is
//! handed to the timeline, a state digest is taken if one is due, the
//! timeline's inputs are applied, and a pending interrupt is injected if
//! the guest can take it. The order is part of the replay contract: record
//! and replay both follow it. Output comes before the digest so that, in
//! verified-output mode, the digest logged at an output's exit checks the
//! state after that output (handing output over does not touch guest
//! memory, so the digest's value does not depend on the order).

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::bus::{self, Action, Devices, DevicesState};
use crate::kvm::{self, Exit, Vm};
use crate::memory::{self, DirtyPages, GuestMem, PAGE_SIZE};
use crate::timeline::record::{FINAL_DIGEST_TAG, PERIODIC_DIGEST_TAG};
use crate::timeline::{self, Ending, Input, Output, Position, StateDigest, Timeline};

/// Errors that stop the vCPU loop (as opposed to the guest stopping).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error(transparent)]
    Device(bus::Error),
    #[error(transparent)]
    Timeline(#[from] timeline::Error),
    /// [`Vcpu::take_dirty`] without [`Vcpu::start_dirty_tracking`].
    #[error("dirty page tracking is not on")]
    NotTracking,
    #[error("reading guest memory for a digest failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("the incremental memory digest {incremental:08x} differs from a full hash {full:08x}: the dirty log missed a write")]
    DigestSelfCheck { incremental: u32, full: u32 },
}

/// A timeline error raised inside a device access (a clock read, say) is
/// still a timeline error: divergence and a lost channel must look the same
/// wherever they are found.
impl From<bus::Error> for Error {
    fn from(e: bus::Error) -> Self {
        match e {
            bus::Error::Timeline(t) => Error::Timeline(t),
            other => Error::Device(other),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off through `duet-pv` with this code.
    PowerOff(u8),
    /// The run was stopped (operator signal, or the recorded stop point).
    Stopped,
    /// The guest crashed or halted for good.
    Crashed { reason: String, rip: u64 },
}

/// Where the loop is.
enum State {
    /// Run the guest to its next exit.
    Running,
    /// The guest waits for an interrupt at `at`.
    Idle(Position),
    /// Done.
    Stopped(Outcome),
}

/// Counters a benchmark or status page can read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub exits: u64,
    pub injections: u64,
    /// The state when the run ended (registers and memory), if it reached
    /// an end.
    pub final_digest: Option<StateDigest>,
}

/// The vCPU with the devices and the timeline it answers to.
pub struct Vcpu {
    vm: Vm,
    mem: GuestMem,
    devices: Devices,
    timeline: Box<dyn Timeline>,
    /// An interrupt was injected since the guest's last paravirtual wait.
    woke: bool,
    inputs: Vec<Input>,
    outputs: Vec<Output>,
    stats: Stats,
    /// Who reads the dirty log: a join's pre-copy, the digests, or both.
    dirty: DirtyLog,
    /// Every page's CRC, kept current through the dirty log, once the
    /// first digest was taken (see [`Vcpu::memory_digest`]).
    page_crcs: Option<Vec<u32>>,
    /// Where the guest waits while the loop is idle (part of the saved
    /// state); after a restore, where the run starts waiting.
    waiting: Option<Position>,
}

impl Vcpu {
    pub fn new(vm: Vm, mem: GuestMem, devices: Devices, timeline: Box<dyn Timeline>) -> Self {
        Vcpu {
            vm,
            mem,
            devices,
            timeline,
            woke: false,
            inputs: Vec::new(),
            outputs: Vec::new(),
            stats: Stats::default(),
            dirty: DirtyLog::default(),
            page_crcs: None,
            waiting: None,
        }
    }

    /// Replaces the timeline before the run starts (a backup builds its
    /// machine before it knows its primary).
    pub fn set_timeline(&mut self, timeline: Box<dyn Timeline>) {
        self.timeline = timeline;
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Runs until the guest powers off or crashes.
    pub fn run(&mut self) -> Result<Outcome, Error> {
        if let Err(e) = logchannel::sched::pin_vcpu_thread() {
            tracing::warn!("cannot pin the vCPU thread to its CPU: {e}");
        }
        // A restored machine whose guest was waiting resumes waiting.
        let mut state = match self.waiting.take() {
            Some(at) => State::Idle(at),
            None => State::Running,
        };
        loop {
            let next = match state {
                State::Running => self.step(),
                State::Idle(at) => self.idle(&at),
                State::Stopped(outcome) => return Ok(outcome),
            };
            state = match next {
                Ok(s) => s,
                Err(e) => {
                    if let Error::Timeline(t) = &e {
                        self.timeline.run_failed(t);
                    }
                    return Err(e);
                }
            };
        }
    }

    /// Runs to the next exit and handles it.
    fn step(&mut self) -> Result<State, Error> {
        if self.timeline.wants_machine() {
            self.attend_machine(None)?;
        }
        self.timeline.before_run(self.stats.exits + 1)?;
        let exit = self.vm.run()?;
        if !exit.is_synchronous() {
            return Ok(match exit {
                Exit::Interrupted => State::Running,
                Exit::Shutdown | Exit::Failed(_) => {
                    let rip = self.vm.full_regs().map(|(r, _)| r.rip).unwrap_or(0);
                    let reason = match exit {
                        Exit::Failed(why) => why,
                        _ => "the guest shut down (triple fault)".to_string(),
                    };
                    State::Stopped(Outcome::Crashed { reason, rip })
                }
                _ => State::Running,
            });
        }
        self.stats.exits += 1;
        let at = self.position(&exit);
        if self.timeline.stop_here(&at)? {
            return self.finish(&at, Ending::Stopped);
        }
        let action = self
            .devices
            .handle_exit(&exit, &at, self.timeline.as_mut())?;
        let mut idle = false;
        let mut requested_digest = None;
        match action {
            Action::Continue => {}
            Action::Read(bytes) => self.vm.complete_read(&bytes),
            Action::Idle => {
                // HLT always waits; the paravirtual wait returns at once if an
                // interrupt came since the last one (no lost wake-ups).
                idle = exit == Exit::Hlt || !self.woke;
                self.woke = false;
            }
            Action::Digest(tag) => requested_digest = Some(tag),
            Action::PowerOff(code) => {
                self.flush_output(&at)?;
                return self.finish(&at, Ending::PowerOff(code));
            }
            Action::Fatal(reason) => {
                return Ok(State::Stopped(Outcome::Crashed {
                    reason,
                    rip: at.rip,
                }))
            }
        }
        self.flush_output(&at)?;
        match requested_digest {
            Some(tag) => self.digest(&at, tag, true)?,
            None => self.digest(&at, PERIODIC_DIGEST_TAG, false)?,
        }
        self.devices.latch_irqs();
        // An interrupt injected here ends the wait before it starts. Replay
        // depends on this: it applies all of a position's inputs in the
        // first call, where the recording may have needed a blocking one.
        let injected = self.poll_and_inject(&at, false)?;
        Ok(if idle && !injected {
            State::Idle(at)
        } else {
            State::Running
        })
    }

    /// Ends the run at `at`: the final digest goes to the timeline, which
    /// logs or checks it and flushes everything.
    fn finish(&mut self, at: &Position, ending: Ending) -> Result<State, Error> {
        let digest = StateDigest {
            regs_crc: at.regs_crc,
            mem_crc: memory_crc(&self.mem),
            tag: FINAL_DIGEST_TAG,
        };
        self.stats.final_digest = Some(digest);
        self.timeline.finish(at, ending, &digest)?;
        Ok(State::Stopped(match ending {
            Ending::PowerOff(code) => Outcome::PowerOff(code),
            Ending::Stopped => Outcome::Stopped,
        }))
    }

    /// The guest waits at `at`: take inputs (blocking) until an interrupt
    /// can be injected.
    fn idle(&mut self, at: &Position) -> Result<State, Error> {
        if self.timeline.wants_machine() {
            self.attend_machine(Some(*at))?;
        }
        if !self.vm.ready_for_injection() {
            return Ok(State::Stopped(Outcome::Crashed {
                reason: "the guest halted with interrupts disabled".into(),
                rip: at.rip,
            }));
        }
        Ok(if self.poll_and_inject(at, true)? {
            State::Running
        } else {
            State::Idle(*at)
        })
    }

    /// Applies the timeline's inputs at `at` and injects the PIC's pending
    /// vector if the guest can take it. Returns whether it injected.
    fn poll_and_inject(&mut self, at: &Position, idle: bool) -> Result<bool, Error> {
        let demand = self.devices.demand(idle);
        self.inputs.clear();
        self.timeline.inputs(at, &demand, &mut self.inputs)?;
        for input in &self.inputs {
            self.devices.apply(input)?;
        }
        if !self.vm.ready_for_injection() {
            return Ok(false);
        }
        let Some(vector) = self.devices.acknowledge_interrupt() else {
            return Ok(false);
        };
        self.timeline.interrupt(at, vector)?;
        self.vm.inject(vector)?;
        self.woke = true;
        self.stats.injections += 1;
        Ok(true)
    }

    /// Lets the timeline work on the machine (see
    /// [`Timeline::attend_machine`]); `waiting`: the guest waits at this
    /// exit, which a saved state must say.
    fn attend_machine(&mut self, waiting: Option<Position>) -> Result<(), Error> {
        let mut timeline = std::mem::replace(&mut self.timeline, Box::new(Detached));
        self.waiting = waiting;
        let result = timeline.attend_machine(self);
        self.waiting = None;
        self.timeline = timeline;
        Ok(result?)
    }

    fn flush_output(&mut self, at: &Position) -> Result<(), Error> {
        self.devices.take_outputs(&mut self.outputs);
        for output in self.outputs.drain(..) {
            self.timeline.output(at, output)?;
        }
        Ok(())
    }

    fn digest(&mut self, at: &Position, tag: u64, requested: bool) -> Result<(), Error> {
        if !self.timeline.wants_digest(at, requested) {
            return Ok(());
        }
        let digest = StateDigest {
            regs_crc: at.regs_crc,
            mem_crc: self.memory_digest()?,
            tag,
        };
        self.timeline.digest(at, &digest)?;
        Ok(())
    }

    /// The memory half of a periodic or requested digest: a CRC over every
    /// page's CRC, where only the pages written since the last digest
    /// (KVM's dirty log and the VMM's own writes) are hashed again. The
    /// first digest hashes all of memory and turns the dirty log on; both
    /// sides of a pair take it at the same position, so they agree on the
    /// definition. A full hash every 50 ms would cost 2 ms per 64 MiB
    /// each time; this costs the written pages and 4 bytes per page.
    fn memory_digest(&mut self) -> Result<u32, Error> {
        if self.page_crcs.is_none() {
            self.dirty_log_on()?;
            self.dirty.digest = Some(self.empty_pages());
            self.page_crcs = Some(memory::page_crcs(&self.mem).map_err(Error::Memory)?);
        } else {
            self.collect_dirty()?;
        }
        let written = self.dirty.digest.replace(self.empty_pages());
        let (mem, crcs) = (&self.mem, self.page_crcs.get_or_insert_with(Vec::new));
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in written.iter().flat_map(|w| w.iter()) {
            if let Some(c) = crcs.get_mut(p as usize) {
                vm_memory::Bytes::read_slice(
                    mem,
                    &mut page,
                    vm_memory::GuestAddress(p * PAGE_SIZE),
                )
                .map_err(Error::Memory)?;
                *c = memory::page_crc(&page);
            }
        }
        let d = memory::digest_of_page_crcs(crcs);
        if DIGEST_SELF_CHECK.load(std::sync::atomic::Ordering::Relaxed) {
            let full = memory::page_digest(&self.mem).map_err(Error::Memory)?;
            if full != d {
                return Err(Error::DigestSelfCheck {
                    incremental: d,
                    full,
                });
            }
        }
        Ok(d)
    }

    /// Seeds the digests' page CRCs with a joiner's, which it computed
    /// from the memory it was given: its first digest then needs no pass
    /// over all of memory (most of which a fresh machine never touched).
    pub fn seed_page_crcs(&mut self, crcs: Vec<u32>) -> Result<(), Error> {
        self.dirty_log_on()?;
        memory::clear_vmm_writes(&self.mem);
        self.dirty.digest = Some(self.empty_pages());
        self.page_crcs = Some(crcs);
        Ok(())
    }

    fn empty_pages(&self) -> DirtyPages {
        DirtyPages::new(memory::mem_size(&self.mem).div_ceil(PAGE_SIZE))
    }

    /// Turns KVM's dirty log on if nobody had it on; the VMM's bitmap then
    /// counts from now.
    fn dirty_log_on(&mut self) -> Result<(), Error> {
        if !self.dirty.on {
            self.vm.set_dirty_logging(true)?;
            memory::clear_vmm_writes(&self.mem);
            self.dirty.on = true;
        }
        Ok(())
    }

    /// Moves what KVM and the VMM's bitmap logged into every reader's set.
    fn collect_dirty(&mut self) -> Result<(), Error> {
        if !self.dirty.on {
            return Ok(());
        }
        let mut d = self.empty_pages();
        self.vm.dirty_log(&mut d)?;
        d.union(&memory::take_vmm_writes(&self.mem));
        for set in [self.dirty.join.as_mut(), self.dirty.digest.as_mut()]
            .into_iter()
            .flatten()
        {
            set.union(&d);
        }
        Ok(())
    }

    fn position(&mut self, exit: &Exit) -> Position {
        let r = self.vm.regs();
        Position {
            exit: self.stats.exits,
            rip: r.rip,
            regs_crc: regs_crc(&r),
            kind: exit.kind_code(),
        }
    }
}

/// The whole machine at a point between two exits, except guest memory
/// (moved separately, in pre-copy rounds): with the same memory, a fresh
/// machine that restores this continues exactly where the saved one was.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub vcpu: kvm::VcpuState,
    pub devices: DevicesState,
    /// Synchronous exits so far: the position. The next exit after a
    /// restore is `exits + 1`, as it would have been on the saved machine.
    pub exits: u64,
    /// An interrupt was injected since the guest's last paravirtual wait
    /// (the loop's own state: the next wait returns at once).
    pub woke: bool,
    /// The guest was waiting for an interrupt at this exit (HLT or the
    /// paravirtual wait): a restored machine waits there too, taking the
    /// inputs logged at that position, instead of running on.
    pub waiting: Option<Position>,
}

/// Machine state, digests and dirty tracking, for re-protection: a new
/// backup joins a running guest by pre-copying its memory, then takes this
/// state at one position and replays the log from there.
impl Vcpu {
    /// Saves the machine (without memory). Call on the vCPU thread between
    /// exits, after an exit was handled and before the next run. The
    /// pending `in` or MMIO read is completed first, so the saved registers
    /// hold its result; the machine can go on running afterwards.
    pub fn save(&mut self) -> Result<MachineState, Error> {
        let vcpu = self.vm.save_state()?;
        Ok(MachineState {
            vcpu,
            devices: self.devices.state(),
            exits: self.stats.exits,
            woke: self.woke,
            waiting: self.waiting,
        })
    }

    /// Loads a saved machine into this fresh one, before [`Vcpu::run`]. Guest
    /// memory must already hold the saved machine's (see [`Vcpu::memory`]).
    /// A device state that does not fit (another NIC configuration, say) is
    /// refused before anything changes; a failure loading the vCPU leaves a
    /// machine that must not be run.
    pub fn restore(&mut self, s: &MachineState) -> Result<(), Error> {
        self.devices.restore(&s.devices)?;
        self.vm.restore_state(&s.vcpu)?;
        self.stats.exits = s.exits;
        self.woke = s.woke;
        self.waiting = s.waiting;
        Ok(())
    }

    /// The guest memory. A clone is a handle on the same mapping.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The digest a backup compares at the handover position: the CRC of
    /// the full registers after the pending exit completed (so both sides
    /// hash the same registers), and of all memory. Tagged as a periodic
    /// digest.
    pub fn state_digest(&mut self) -> Result<StateDigest, Error> {
        Ok(StateDigest {
            regs_crc: self.full_regs_crc()?,
            mem_crc: memory_crc(&self.mem),
            tag: PERIODIC_DIGEST_TAG,
        })
    }

    /// The register half of [`Vcpu::state_digest`].
    pub fn full_regs_crc(&mut self) -> Result<u32, Error> {
        self.vm.complete_pending()?;
        let (regs, _) = self.vm.full_regs()?;
        Ok(regs_crc(&regs))
    }

    /// Starts tracking written pages: KVM logs the guest's writes, and the
    /// VMM's own writes (kept by guest memory's bitmap) count from now.
    pub fn start_dirty_tracking(&mut self) -> Result<(), Error> {
        // The digests' reader keeps what was logged before.
        self.collect_dirty()?;
        self.dirty_log_on()?;
        self.dirty.join = Some(self.empty_pages());
        Ok(())
    }

    /// The pages written since the last call (or since tracking started),
    /// by the guest or by the VMM; both records are cleared. Between
    /// exits, on the vCPU thread, so no write is in flight.
    pub fn take_dirty(&mut self) -> Result<DirtyPages, Error> {
        if self.dirty.join.is_none() {
            return Err(Error::NotTracking);
        }
        self.collect_dirty()?;
        let fresh = self.empty_pages();
        Ok(self.dirty.join.replace(fresh).unwrap_or_default())
    }

    /// Ends a join's tracking; KVM's dirty log goes off unless the digests
    /// still read it (write-protection faults cost the guest time).
    pub fn stop_dirty_tracking(&mut self) -> Result<(), Error> {
        self.collect_dirty()?;
        self.dirty.join = None;
        if self.dirty.digest.is_none() && self.dirty.on {
            self.vm.set_dirty_logging(false)?;
            self.dirty.on = false;
        }
        Ok(())
    }

    /// The exits so far, as [`Stats::exits`]: the position of the last one.
    pub fn exits(&self) -> u64 {
        self.stats.exits
    }
}

/// When set, every incremental digest is checked against one computed
/// from all of memory (a test's check that the dirty log missed nothing;
/// it costs a full hash each time).
static DIGEST_SELF_CHECK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns [`DIGEST_SELF_CHECK`] on or off for this process.
pub fn set_digest_self_check(on: bool) {
    DIGEST_SELF_CHECK.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// KVM's dirty log, read by up to two parties: a join's pre-copy and the
/// incremental digests. Each fetch goes into every reader's own set, since
/// a fetch clears KVM's log.
#[derive(Default)]
struct DirtyLog {
    on: bool,
    join: Option<DirtyPages>,
    digest: Option<DirtyPages>,
}

/// What a timeline may do with the machine between exits, while the vCPU
/// is stopped (a backup joining this VM needs its memory and state). A
/// trait, so that the timeline sees the machine and not the loop.
pub trait MachineAccess {
    fn save(&mut self) -> Result<MachineState, Error>;
    fn state_digest(&mut self) -> Result<StateDigest, Error>;
    /// The CRC of the full registers after the pending exit completed,
    /// the register half of [`Vcpu::state_digest`].
    fn regs_crc(&mut self) -> Result<u32, Error>;
    fn memory(&self) -> &GuestMem;
    fn start_dirty_tracking(&mut self) -> Result<(), Error>;
    fn take_dirty(&mut self) -> Result<DirtyPages, Error>;
    fn stop_dirty_tracking(&mut self) -> Result<(), Error>;
}

impl MachineAccess for Vcpu {
    fn save(&mut self) -> Result<MachineState, Error> {
        Vcpu::save(self)
    }
    fn state_digest(&mut self) -> Result<StateDigest, Error> {
        Vcpu::state_digest(self)
    }
    fn regs_crc(&mut self) -> Result<u32, Error> {
        Vcpu::full_regs_crc(self)
    }
    fn memory(&self) -> &GuestMem {
        Vcpu::memory(self)
    }
    fn start_dirty_tracking(&mut self) -> Result<(), Error> {
        Vcpu::start_dirty_tracking(self)
    }
    fn take_dirty(&mut self) -> Result<DirtyPages, Error> {
        Vcpu::take_dirty(self)
    }
    fn stop_dirty_tracking(&mut self) -> Result<(), Error> {
        Vcpu::stop_dirty_tracking(self)
    }
}

/// Stands in for the timeline while it works on the machine
/// ([`Vcpu::attend_machine`]); the machine calls no timeline then, so
/// every answer is an error that cannot be reached.
struct Detached;

impl Timeline for Detached {
    fn clock_ns(&mut self, _: &Position) -> Result<u64, timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn wall_clock(&mut self, _: &Position) -> Result<i64, timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn entropy(&mut self, _: &Position) -> Result<u64, timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn inputs(
        &mut self,
        _: &Position,
        _: &timeline::Demand,
        _: &mut Vec<Input>,
    ) -> Result<(), timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn interrupt(&mut self, _: &Position, _: u8) -> Result<(), timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn wants_digest(&mut self, _: &Position, _: bool) -> bool {
        false
    }
    fn digest(&mut self, _: &Position, _: &StateDigest) -> Result<(), timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn output(&mut self, _: &Position, _: Output) -> Result<(), timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
    fn stop_here(&mut self, _: &Position) -> Result<bool, timeline::Error> {
        Ok(false)
    }
    fn finish(&mut self, _: &Position, _: Ending, _: &StateDigest) -> Result<(), timeline::Error> {
        Err(timeline::Error::OutputClosed)
    }
}

/// CRC-32 of the general registers, RIP and RFLAGS.
pub fn regs_crc(r: &kvm_bindings::kvm_regs) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}

/// CRC-32 of all guest memory.
pub fn memory_crc(mem: &GuestMem) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for region in mem.iter() {
        if let Ok(slice) =
            region.get_slice(vm_memory::MemoryRegionAddress(0), region.len() as usize)
        {
            // SAFETY: the vCPU is stopped (we are on its thread between
            // exits) and no other thread writes guest memory, so the bytes
            // are stable while we read them.
            let bytes =
                unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), slice.len()) };
            h.update(bytes);
        }
    }
    h.finalize()
}
