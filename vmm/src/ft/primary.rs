//! The primary's log sink: records are batched onto the log channel, a
//! horizon marker tells the backup how far it may execute, and output waits
//! in the [`Gate`] until the backup has acknowledged every record before it
//! (the Output Rule). The guest keeps running while output waits; only the
//! output is held.
//!
//! With `--verify-outputs` ([`ChannelSink::verify_outputs`]) an output is
//! also logged, as an `OutputCheck` (its length and CRC) at its position,
//! followed by a state digest at the same exit; it leaves only once the
//! backup reports that it replayed that exit, which it does only after
//! both matched (see [`super::gate`]). A backup that says it diverged
//! ([`LinkFailure::Diverged`]) then halts this primary with every held
//! output unreleased, whatever the arbiter would say: going on alone would
//! release output of an execution that nobody could reproduce.
//!
//! The sink is [`Mode::Paired`] or [`Mode::Alone`]. Everything that only
//! makes sense with a backup (the link, the batch, the horizon) lives in
//! [`Paired`], so being alone is not a flag every method must remember to
//! check.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logchannel::channel::{self, LinkCounters, LinkState, PrimaryLink};
use logchannel::{encode_frame, Event, OutputKind, Position, Record};

use super::arbiter::Arbiter;
use super::events::Event as StateEvent;
use super::gate::{GateHandle, GateMsg, Held, SharedGate};
use super::join::{self, JoinService, Request};
use super::lag::LagTracker;
use super::metrics::{ArbiterState, Metrics};
use super::{LinkFailure, Peer};
use crate::stop;
use crate::timeline::record::LogSink;
use crate::timeline::world::{Outgoing, Outlet, World};
use crate::timeline::{Error, Output};
use crate::vcpu::MachineAccess;

/// How long records may sit in the batch before they go out anyway. Also
/// bounds the execution lag a busy guest adds.
const FLUSH_EVERY: Duration = Duration::from_millis(1);
/// Flush early once a batch is this large.
const BATCH_BYTES: usize = 256 * 1024;
/// How long a finishing primary waits for the backup's last acks.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many exits the primary may run ahead of the backup's replay before
/// it waits. This bounds execution lag, and so the time a backup needs to
/// catch up before it can go live: about 100 ms at this platform's ~30k
/// exits per second. VMware FT slows the primary for the same reason.
const MAX_AHEAD_EXITS: u64 = 3_000;
/// The same bound in time, for guests that exit rarely (a compute loop
/// makes a few thousand exits a second): the primary waits once its guest
/// has executed this long (time it waited idle for a client does not
/// count) since the oldest position the backup has not reached was
/// flushed. Counting idle time too made a backup that paused for 5 ms
/// stop an idle primary's next request, though it had almost nothing to
/// catch up on.
///
/// Both sides execute the same guest at the same speed, so a backup that
/// fell behind (descheduled on a loaded host) catches up only while the
/// primary waits: over a run the primary waits about as long whatever the
/// bound, and a tight bound only pays the last deficit too. Measured with
/// `cargo bench -p vmm --bench ft` (compute): 50 ms gave a lag p99 of 52 ms
/// (the bound itself); 5 ms keeps it under 10 ms (see
/// `duet_throttle_seconds_total` for what it costs the primary). This is
/// the default; `--max-lag-ms` sets it ([`ChannelSink::max_lag`]).
const MAX_LAG: Duration = Duration::from_millis(5);
/// How long serial output may be gathered before its log goes out anyway.
///
/// A 16550 takes a byte per exit, so a reply of n bytes is n outputs at n
/// consecutive exits. Sending the log at each of them, as for any other
/// output, woke the channel thread (real-time, so it preempts the vCPU),
/// the backup and its ack once per byte: 13 preemptions of the vCPU
/// thread per PING, each dearer than the byte itself on a nested host.
/// So consecutive serial bytes for one client are held as one output,
/// and its log goes out at the first exit that adds no output (the
/// guest polling the line status, or going idle), or after this long.
/// A guest that computes without exits right after writing still waits
/// for its next exit, as every record does.
const GATHER_SERIAL: Duration = Duration::from_micros(200);

/// With a backup: the link and what is on its way over it.
struct Paired {
    link: PrimaryLink,
    state: Arc<LinkState>,
    batch: Vec<u8>,
    batch_records: u64,
    /// Last exit whose events are all appended, and the last one announced.
    horizon: u64,
    horizon_sent: u64,
    last_flush: Instant,
}

/// Whether the Output Rule still applies.
enum Mode {
    Paired(Box<Paired>),
    /// The backup is gone and we won the arbiter: we run as a primary
    /// without a backup, and nothing is logged or held.
    Alone,
}

/// The primary's sink: see the module documentation.
pub struct ChannelSink {
    mode: Mode,
    metrics: Arc<Metrics>,
    next_seq: u64,
    lag: Arc<LagTracker>,
    gate: Option<GateHandle>,
    gate_thread: Option<JoinHandle<()>>,
    /// Who to ask when the backup is lost; without one, losing it halts.
    arbiter: Option<Arbiter>,
    /// Lets a new backup join while we run alone (re-protection).
    join: Option<JoinService>,
    /// A backup just joined, or an output was verified: log a state
    /// digest at the next exit (for an output, the vCPU loop takes it at
    /// the output's own exit, since outputs come before the digest).
    digest_soon: bool,
    /// How long the guest has waited idle in all (see [`LogSink::idled`]).
    idle: Duration,
    /// Verified-output mode (see the module docs).
    verify: bool,
    /// An output waits for verification: the backup can replay its exit
    /// only once a horizon covers it, so the batch and the horizon go out
    /// as soon as the exit is complete, not at the next periodic flush.
    horizon_soon: bool,
    /// The exit of the last output held for verification: a finishing
    /// primary waits until the backup has replayed it.
    verify_through: u64,
    /// Serial output being gathered (see [`GATHER_SERIAL`]), and the exit
    /// that last added to it. It goes to the gate before any log is sent.
    gathered: Option<(Held, u64)>,
    /// The execution-lag bound in busy time (see [`MAX_LAG`]).
    max_lag: Duration,
    /// An output went to the gate since the last batch: the next batch
    /// asks the backup to acknowledge it at once. Other batches are
    /// acknowledged with the backup's next report (or at once if it had
    /// been quiet, `ChannelConfig::ack_late`), which spares a flush right
    /// behind another message a wake-up of this side's channel thread
    /// (and so a preemption of a vCPU).
    awaited: bool,
}

impl ChannelSink {
    /// Held output leaves through `outlet` once the gate releases it.
    pub fn new(
        link: PrimaryLink,
        metrics: Arc<Metrics>,
        outlet: Outlet,
        arbiter: Option<Arbiter>,
    ) -> Result<Self, super::Error> {
        let mut sink = Self::alone(metrics, outlet, arbiter, 0)?;
        sink.pair(link, 0).map_err(|_| {
            super::Error::Spawn(
                "output-gate",
                std::io::Error::other("the gate thread ended"),
            )
        })?;
        Ok(sink)
    }

    /// A sink with no backup yet: a backup that went live, whose log
    /// numbering goes on from `next_seq`. Nothing is held until a backup
    /// joins.
    pub fn alone(
        metrics: Arc<Metrics>,
        outlet: Outlet,
        arbiter: Option<Arbiter>,
        next_seq: u64,
    ) -> Result<Self, super::Error> {
        let (gate_tx, gate_body) = SharedGate::start(None, metrics.clone(), outlet);
        let gate_thread = std::thread::Builder::new()
            .name("output-gate".into())
            .spawn(move || {
                logchannel::sched::promote_current_thread();
                gate_body()
            })
            .map_err(|e| super::Error::Spawn("output-gate", e))?;
        Ok(ChannelSink {
            mode: Mode::Alone,
            metrics,
            next_seq,
            lag: Arc::new(LagTracker::new()),
            gate: Some(gate_tx),
            gate_thread: Some(gate_thread),
            arbiter,
            join: None,
            digest_soon: false,
            idle: Duration::ZERO,
            verify: false,
            horizon_soon: false,
            verify_through: 0,
            gathered: None,
            max_lag: MAX_LAG,
            awaited: false,
        })
    }

    /// Verified-output mode: see the module docs.
    pub fn verify_outputs(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }

    /// The execution-lag bound: how much busy time the guest may run past
    /// the oldest flush the backup has not executed through before it
    /// waits for the backup (default [`MAX_LAG`]). A test that freezes a
    /// backup on a loaded host, say, needs it long.
    pub fn max_lag(mut self, bound: Duration) -> Self {
        self.max_lag = bound;
        self
    }

    /// Lets backups join through `join` whenever this sink runs alone.
    pub fn with_join(mut self, join: JoinService) -> Self {
        join.desk().set_paired(matches!(self.mode, Mode::Paired(_)));
        self.join = Some(join);
        self
    }

    /// Takes `link` as the backup's, from exit `exit` on: the Output Rule
    /// applies again.
    fn pair(&mut self, mut link: PrimaryLink, exit: u64) -> Result<(), Error> {
        let state = link.state();
        link.set_stop_flag(stop::flag_handle());
        self.metrics.set_link(state.clone());
        self.lag = Arc::new(LagTracker::new());
        {
            let (lag, metrics) = (self.lag.clone(), self.metrics.clone());
            // The link has one progress hook: lag, then verified output.
            let gate = self.gate.as_ref().map(|g| g.progress_hook());
            state.on_progress(Box::new(move |exit| {
                if let Some(sample) = lag.replayed(exit, Instant::now()) {
                    metrics.record_lag(sample);
                }
                if let Some(release) = &gate {
                    release(exit);
                }
            }));
        }
        self.send_gate(GateMsg::Pair(state.clone()))?;
        self.mode = Mode::Paired(Box::new(Paired {
            link,
            state,
            batch: Vec::with_capacity(BATCH_BYTES),
            batch_records: 0,
            horizon: exit,
            horizon_sent: exit,
            last_flush: Instant::now(),
        }));
        if let Some(j) = &self.join {
            j.desk().set_paired(true);
        }
        Ok(())
    }

    /// Serves what the join service asked of the vCPU thread.
    fn serve_join(
        &mut self,
        machine: &mut dyn MachineAccess,
        world: &mut World,
    ) -> Result<(), Error> {
        let Some(request) = self.join.as_ref().and_then(|j| j.desk().take()) else {
            return Ok(());
        };
        let chain = |e: crate::vcpu::Error| logchannel::channel::error_chain(&e);
        match request {
            Request::StartTracking(reply) => {
                let r = machine
                    .start_dirty_tracking()
                    .map(|()| machine.memory().clone())
                    .map_err(chain);
                let _ = reply.send(r);
            }
            Request::TakeDirty(reply) => {
                let _ = reply.send(machine.take_dirty().map_err(chain));
            }
            Request::StopTracking => {
                let _ = machine.stop_dirty_tracking();
            }
            Request::Handover(job) => {
                let reply = job.reply.clone();
                if matches!(self.mode, Mode::Paired(_)) {
                    let _ = reply.send(Err("this VM already has a backup".into()));
                    return Ok(());
                }
                match join::hand_over(*job, machine, self.next_seq, world.clock_ns()) {
                    Ok((link, report)) => {
                        self.pair(link, report.exit)?;
                        // The handover digest covers what was sent; this
                        // one, from our own page CRCs, also checks that
                        // the pre-copy sent everything that changed.
                        self.digest_soon = true;
                        if let Some(a) = self.arbiter.as_mut() {
                            a.epoch = report.epoch;
                        }
                        self.metrics.set_epoch(report.epoch);
                        self.metrics.set_arbiter(ArbiterState::Paired);
                        self.metrics.event(StateEvent::Paired {
                            epoch: report.epoch,
                        });
                        let _ = reply.send(Ok(report));
                    }
                    Err(why) => {
                        let _ = machine.stop_dirty_tracking();
                        let _ = reply.send(Err(why));
                    }
                }
            }
        }
        Ok(())
    }

    /// The link failed: claim the pair at the arbiter; win and go on alone
    /// (held output is released at once), or lose and halt.
    fn lost_backup(&mut self, failure: LinkFailure) -> Result<(), Error> {
        if let (true, LinkFailure::Diverged { exit, what }) = (self.verify, &failure) {
            // Nothing held may leave, and nobody may go on: the gate
            // thread ends with the failed link, dropping what it holds.
            let held = self.gate.as_ref().map_or(0, |g| g.held());
            self.metrics.event(StateEvent::PeerLost {
                peer: Peer::Backup.to_string(),
                failure: failure.to_string(),
            });
            return Err(super::Error::BackupDiverged {
                exit: *exit,
                what: what.clone(),
                held,
            }
            .into());
        }
        let Some(arbiter) = &self.arbiter else {
            return Err(super::Error::PeerLost {
                peer: Peer::Backup,
                failure,
            }
            .into());
        };
        self.metrics.event(StateEvent::PeerLost {
            peer: Peer::Backup.to_string(),
            failure: failure.to_string(),
        });
        arbiter.claim(&format!("lost the backup ({failure})"), &self.metrics)?;
        self.hold_gathered()?;
        self.mode = Mode::Alone;
        if let Some(j) = &self.join {
            j.desk().set_paired(false);
        }
        self.metrics.event(StateEvent::Alone);
        self.send_gate(GateMsg::Open)?;
        tracing::warn!("primary: continuing alone; output is no longer held");
        Ok(())
    }

    fn send_gate(&self, msg: GateMsg) -> Result<(), Error> {
        match &self.gate {
            Some(g) => g.send(msg).map_err(|_| Error::OutputClosed),
            None => Err(Error::OutputClosed),
        }
    }

    fn push(paired: &mut Paired, seq: &mut u64, pos: Position, event: Event) -> Result<(), Error> {
        let rec = Record {
            seq: *seq,
            pos,
            event,
        };
        encode_frame(&rec, &mut paired.batch)?;
        *seq += 1;
        paired.batch_records += 1;
        Ok(())
    }

    /// Hands the gathered serial output to the gate, where it waits for
    /// the records it needs.
    fn hold_gathered(&mut self) -> Result<(), Error> {
        match self.gathered.take() {
            Some((held, _)) => self.hold(held),
            None => Ok(()),
        }
    }

    /// Hands `held` to the gate; the next batch asks for its ack at once.
    fn hold(&mut self, held: Held) -> Result<(), Error> {
        self.awaited = true;
        self.send_gate(GateMsg::Hold(held))
    }

    /// Starts gathering serial output with `out`, produced at `exit`.
    fn gather(&mut self, needs: u64, out: Outgoing, exit: u64) {
        self.metrics.outputs_held_inc();
        let held = Held {
            needs,
            verify_at: None,
            out,
            since: Instant::now(),
        };
        self.gathered = Some((held, exit));
    }

    /// Sends the batch (and the horizon) if paired. A failed link is
    /// handed to [`ChannelSink::lost_backup`].
    fn send_batch(&mut self) -> Result<(), Error> {
        self.hold_gathered()?;
        let ack_now = std::mem::take(&mut self.awaited);
        let Mode::Paired(p) = &mut self.mode else {
            return Ok(());
        };
        if p.horizon > p.horizon_sent {
            let pos = Position {
                exit: p.horizon,
                ..Position::default()
            };
            Self::push(p, &mut self.next_seq, pos, Event::Horizon)?;
            p.horizon_sent = p.horizon;
            self.metrics.set_seq(self.next_seq);
        }
        // With nothing new to send, an output may still wait on records
        // sent before, whose ack comes late unless asked for: an empty
        // batch asks.
        if p.batch_records == 0 && (!ack_now || p.state.snapshot().acked >= self.next_seq) {
            return Ok(());
        }
        let frames = std::mem::replace(&mut p.batch, Vec::with_capacity(BATCH_BYTES));
        let (n, bytes) = (p.batch_records, frames.len() as u64);
        p.batch_records = 0;
        p.last_flush = Instant::now();
        self.lag.flushed(p.horizon_sent, p.last_flush, self.idle);
        match p.link.send(frames, n, bytes, ack_now) {
            Ok(()) => Ok(()),
            Err(channel::Error::Interrupted) => Err(Error::Interrupted),
            Err(e) => self.lost_backup(super::failure_of(&e, channel::Role::Backup)),
        }
    }

    /// Flushes, then waits until the backup's replay satisfies `caught_up`,
    /// the link fails, or a stop is requested (the vCPU loop then stops at
    /// its next exit). The wait has no other limit: a backup that stops
    /// making progress is a failed backup, which the channel detects.
    /// Returns how long the guest waited.
    fn wait_for_backup(
        &mut self,
        caught_up: impl Fn(&LinkCounters) -> bool,
    ) -> Result<Duration, Error> {
        self.send_batch()?;
        let Mode::Paired(p) = &self.mode else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        loop {
            let c = p.state.wait_until(stop::SLICE, &caught_up);
            if caught_up(&c) || c.failure.is_some() || stop::requested() {
                return Ok(started.elapsed());
            }
        }
    }

    /// [`ChannelSink::wait_for_backup`] to bound the execution lag: what
    /// `duet_throttle_seconds_total` counts.
    fn throttle(&mut self, caught_up: impl Fn(&LinkCounters) -> bool) -> Result<(), Error> {
        let waited = self.wait_for_backup(caught_up)?;
        self.metrics.throttled(waited);
        Ok(())
    }
}

impl LogSink for ChannelSink {
    fn append(&mut self, pos: &Position, event: Event) -> Result<(), Error> {
        let Mode::Paired(p) = &mut self.mode else {
            return Ok(());
        };
        Self::push(p, &mut self.next_seq, *pos, event)?;
        self.metrics.set_seq(self.next_seq);
        if p.batch.len() >= BATCH_BYTES {
            self.send_batch()?;
        }
        Ok(())
    }

    fn output(&mut self, pos: &Position, output: Output, world: &mut World) -> Result<(), Error> {
        let paired = matches!(self.mode, Mode::Paired(_));
        let verify_at = (self.verify && paired).then_some(pos.exit);
        if verify_at.is_some() {
            let check = match &output {
                Output::Serial(b) => Event::output_check(OutputKind::Serial, b),
                Output::Net(b) => Event::output_check(OutputKind::Net, b),
            };
            self.append(pos, check)?;
            self.digest_soon = true;
            self.verify_through = pos.exit;
        }
        let needs = if paired { self.next_seq } else { 0 };
        let out = world.address(output)?;
        if paired && verify_at.is_none() && out.is_serial() {
            if let Some((held, exit)) = &mut self.gathered {
                match held.out.gather(out) {
                    Ok(()) => {
                        held.needs = needs;
                        *exit = pos.exit;
                        return Ok(());
                    }
                    // Another client's bytes: the first lot is complete.
                    Err(out) => {
                        self.hold_gathered()?;
                        self.gather(needs, out, pos.exit);
                    }
                }
            } else {
                self.gather(needs, out, pos.exit);
            }
            return Ok(());
        }
        // Outputs leave in the order they were produced.
        self.hold_gathered()?;
        let held = Held {
            needs,
            verify_at,
            out,
            since: Instant::now(),
        };
        self.metrics.outputs_held_inc();
        self.hold(held)?;
        if verify_at.is_some() {
            // The digest of the state after it (and maybe inputs) are still
            // to be logged at this exit: everything goes out with the
            // horizon once the exit is complete (complete_through).
            self.horizon_soon = true;
            return Ok(());
        }
        // An output is waiting: the log goes out at once.
        self.send_batch()
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.send_batch()
    }

    fn complete_through(&mut self, exit: u64) -> Result<(), Error> {
        let Mode::Paired(p) = &mut self.mode else {
            return Ok(());
        };
        p.horizon = exit;
        let gathered_done = self
            .gathered
            .as_ref()
            .is_some_and(|(held, last)| *last < exit || held.since.elapsed() >= GATHER_SERIAL);
        if p.last_flush.elapsed() >= FLUSH_EVERY
            || std::mem::take(&mut self.horizon_soon)
            || gathered_done
        {
            self.send_batch()?;
        }
        let Mode::Paired(p) = &self.mode else {
            return Ok(());
        };
        let replayed = p.state.snapshot().replayed_exit;
        if exit.saturating_sub(replayed) > MAX_AHEAD_EXITS {
            let floor = exit - MAX_AHEAD_EXITS;
            self.throttle(|c| c.replayed_exit >= floor)?;
        }
        if let Some((horizon, at, idle_then)) = self.lag.oldest_unreplayed() {
            // What the backup must catch up on is the guest's execution
            // since then, not the time it spent waiting for a client.
            let busy = at
                .elapsed()
                .saturating_sub(self.idle.saturating_sub(idle_then));
            if horizon > replayed && busy > self.max_lag {
                self.throttle(|c| c.replayed_exit >= horizon)?;
            }
        }
        self.attend()
    }

    fn needs_attention(&self) -> bool {
        match &self.mode {
            Mode::Paired(p) => p.state.failure().is_some(),
            Mode::Alone => false,
        }
    }

    fn is_logging(&self) -> bool {
        matches!(self.mode, Mode::Paired(_))
    }

    fn idled(&mut self, waited: Duration) {
        self.idle += waited;
    }

    fn take_digest_request(&mut self) -> bool {
        std::mem::take(&mut self.digest_soon)
    }

    fn wants_machine(&self) -> bool {
        self.join.as_ref().is_some_and(|j| j.desk().pending())
    }

    fn attend_machine(
        &mut self,
        machine: &mut dyn MachineAccess,
        world: &mut World,
    ) -> Result<(), Error> {
        self.serve_join(machine, world)
    }

    fn attend(&mut self) -> Result<(), Error> {
        let Mode::Paired(p) = &self.mode else {
            return Ok(());
        };
        match p.state.failure() {
            Some(failure) => self.lost_backup(failure),
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<(), Error> {
        // The link closes once everything is acknowledged: ask at once.
        self.awaited = true;
        self.send_batch()?;
        if self.verify {
            // Verified output leaves on the backup's progress, not on acks:
            // the link stays open until the backup has replayed the last
            // output (its final report comes after its own end checked).
            let through = self.verify_through;
            self.wait_for_backup(|c| c.replayed_exit >= through)?;
            self.attend()?;
        }
        let result = match std::mem::replace(&mut self.mode, Mode::Alone) {
            Mode::Paired(p) => p
                .link
                .close(CLOSE_TIMEOUT)
                .map_err(|e| Error::Ft(super::Error::Channel(e))),
            Mode::Alone => Ok(()),
        };
        // The gate releases what the final acks allow, then ends.
        self.gate.take();
        if let Some(t) = self.gate_thread.take() {
            let _ = t.join();
        }
        result
    }
}
