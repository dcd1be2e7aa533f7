//! The backup's side of the pair.
//!
//! [`StreamSource`] feeds replay from the primary's stream, and never lets
//! the vCPU run past the last position the primary has declared complete
//! (by a horizon marker, or by a record at a later exit).
//! [`BackupTimeline`] is replay until the primary is lost and the arbiter
//! grants us the pair; then it replays what was received and goes live.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use logchannel::channel::{self, BackupLink};
use logchannel::{Event, Record};

use super::arbiter::Arbiter;
use super::events::Event as StateEvent;
use super::join::{JoinPlan, JoinService};
use super::metrics::{self, Metrics};
use super::primary::ChannelSink;
use super::{LinkFailure, Peer};
use crate::stop;
use crate::timeline::record;
use crate::timeline::replay::{Horizon, RecordSource, Replay};
use crate::timeline::world::World;
use crate::timeline::{Demand, Ending, Error, Input, Output, Position, StateDigest, Timeline};
use logchannel::channel::Role;

/// How often (in exits) a backup that is behind looks at whether to report
/// its progress: every exit, so that a guest that exits rarely (`compute`,
/// a few thousand exits a second) is not reported up to 16 exits (~5 ms)
/// late, which the primary's lag bound then counts as lag and waits on.
const PROGRESS_EVERY: u64 = 1;
/// ... and at most this often, so a fast replay does not flood the
/// channel: a small heartbeat every 500 µs at most.
///
/// A backup that is behind reports only once it has passed a horizon the
/// primary sent (see [`StreamSource::horizons`]): the primary measures lag,
/// and waits on its lag bound, from the horizons it flushed, so a report
/// between two of them told it nothing it acts on. Reporting every 500 µs
/// instead cost `compute` about 2000 messages a second, each a wake-up of
/// both channel threads, which preempt a vCPU whenever both cores are busy.
const PROGRESS_PERIOD: Duration = Duration::from_micros(500);
/// A backup that caught up and has waited this long for the next horizon
/// reports its progress in a message of its own (see
/// [`StreamSource::wait_horizon`]); about one timer tick here.
const REPORT_AFTER: Duration = Duration::from_millis(1);
/// Most horizons [`StreamSource::horizons`] keeps: with one per flush
/// (every millisecond or so), far more than a backup within the lag bound
/// is ever behind by.
const MAX_HORIZONS: usize = 4096;
/// How often the backup logs its one-line status.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Network frames the backup produced while replaying records that arrived
/// this long before the primary's last record are re-sent when it goes
/// live (see [`BackupTimeline`]): the primary releases a held output a
/// millisecond or two after the backup's ack, so anything older has left.
/// Measured with a client pinging back to back through a SIGKILL: 10 ms
/// took the worst reply gap from about a second (the guest's TCP
/// retransmission timer) to tens of ms; 200 ms re-sent hundreds of stale
/// frames whose duplicate ACKs made things worse.
const RESEND_MARGIN: Duration = Duration::from_millis(10);
/// At most this many frames are kept for that.
const RESEND_MAX: usize = 1024;
/// How long a backup whose primary verifies outputs waits, once its replay
/// ended, for the primary to take its last progress report and close.
const FINAL_REPORT_WAIT: Duration = Duration::from_secs(5);
/// How long a diverged backup waits for its last word to be written.
const DIVERGED_REPORT_WAIT: Duration = Duration::from_secs(1);

/// Records received but not yet replayed, and how far they reach.
pub struct StreamSource {
    link: BackupLink,
    metrics: Arc<Metrics>,
    buffered: VecDeque<Record>,
    /// Every event at exits up to this one has been received.
    known_exit: u64,
    last_seq: Option<u64>,
    /// The link failed; surfaced when the backup needs more than it has.
    failed: Option<LinkFailure>,
    /// We won the arbiter: what is buffered is all there will ever be.
    promoted: bool,
    last_report: Instant,
    last_summary: Instant,
    /// When the last record (of any kind) arrived.
    last_record_at: Option<Instant>,
    /// An output check was consumed since the last progress report: the
    /// primary holds that output until it hears, so the next report is
    /// not rate-limited.
    report_now: bool,
    /// The log has output checks: the primary verifies outputs.
    verified: bool,
    /// Horizons received (in order) that no progress report has passed
    /// yet: a backup that is behind reports when its replay passes the
    /// first of them (see [`PROGRESS_PERIOD`]).
    horizons: VecDeque<u64>,
}

impl StreamSource {
    pub fn new(link: BackupLink, metrics: Arc<Metrics>) -> Self {
        metrics.set_link(link.state());
        StreamSource {
            link,
            metrics,
            buffered: VecDeque::new(),
            known_exit: 0,
            last_seq: None,
            failed: None,
            promoted: false,
            last_report: Instant::now(),
            last_summary: Instant::now(),
            last_record_at: None,
            report_now: false,
            verified: false,
            horizons: VecDeque::new(),
        }
    }

    /// For a backup that joined a running VM: the log starts at record
    /// `first_seq`, and the state it restored was taken at exit `exit`.
    /// Only the exits before it are known to be complete: a guest that
    /// waited there takes inputs at that same exit from the log.
    pub fn resume_at(mut self, first_seq: u64, exit: u64) -> Self {
        self.last_seq = first_seq.checked_sub(1);
        self.known_exit = exit.saturating_sub(1);
        self.link.state().set_replayed_exit(exit);
        self
    }

    /// After winning the arbiter: replay what is buffered, then nothing.
    pub fn promote(&mut self) {
        self.promoted = true;
        self.known_exit = u64::MAX;
    }

    /// True once promoted and every buffered record is replayed: from here
    /// on the answers come from the world.
    pub fn exhausted(&self) -> bool {
        self.promoted && self.buffered.is_empty()
    }

    /// Records replayed so far.
    pub fn replayed(&self) -> u64 {
        self.last_seq.map_or(0, |s| s + 1)
    }

    /// Tells the primary that every exit through `done` was executed.
    fn report(&mut self, done: u64) {
        self.last_report = Instant::now();
        self.link.report_progress(done);
        self.passed(done);
    }

    /// Forgets the horizons at or before `done`: the primary has been (or
    /// is about to be) told that the replay passed them.
    fn passed(&mut self, done: u64) {
        while self.passed_unreported(done) {
            self.horizons.pop_front();
        }
    }

    /// True if the replay, done through `done`, passed a horizon that no
    /// report has announced.
    fn passed_unreported(&self, done: u64) -> bool {
        self.horizons.front().is_some_and(|&h| h <= done)
    }

    /// Exit `done` was handled: if it consumed an output check, the
    /// primary holds that output until it hears so, so say it now, before
    /// the guest runs on (the next exit may be far off).
    fn report_verified(&mut self, done: u64) {
        if std::mem::take(&mut self.report_now) && !self.promoted {
            self.report(done);
        }
    }

    fn take(&mut self, rec: Record) {
        self.last_record_at = Some(Instant::now());
        if rec.event == Event::Horizon {
            self.known_exit = self.known_exit.max(rec.pos.exit);
            // A backup far behind needs only the last horizons it passes;
            // the queue is bounded by what the primary may send ahead.
            if self.horizons.len() == MAX_HORIZONS {
                self.horizons.pop_front();
            }
            self.horizons.push_back(rec.pos.exit);
        } else {
            // Records come in position order: one at exit N means the
            // primary finished every exit before N.
            self.known_exit = self.known_exit.max(rec.pos.exit.saturating_sub(1));
            self.buffered.push_back(rec);
        }
    }

    /// A receive that found nothing: if the primary said Bye, everything
    /// is known; if the link failed instead, the failure.
    fn finished_if_none(
        &mut self,
        received: Option<Record>,
    ) -> Result<Option<Record>, channel::Error> {
        if received.is_none() && self.link.finished()? {
            self.known_exit = u64::MAX;
        }
        Ok(received)
    }

    /// Moves whatever has arrived into the buffer, without blocking. A
    /// failed link is remembered, not reported: what arrived before the
    /// failure is still replayed first.
    fn drain(&mut self) {
        if self.failed.is_some() || self.promoted {
            return;
        }
        loop {
            match self.link.try_recv().and_then(|r| self.finished_if_none(r)) {
                Ok(Some(rec)) => self.take(rec),
                Ok(None) => return,
                Err(e) => {
                    self.failed = Some(super::failure_of(&e, Role::Primary));
                    return;
                }
            }
        }
    }
}

impl RecordSource for StreamSource {
    fn peek(&mut self) -> Result<Option<&Record>, Error> {
        if self.buffered.is_empty() {
            self.drain();
        }
        Ok(self.buffered.front())
    }

    fn advance(&mut self) {
        if let Some(r) = self.buffered.pop_front() {
            // Replay consumes a record only once it matched: a digest
            // consumed is a digest that agreed.
            if matches!(r.event, Event::Digest { .. }) {
                self.metrics.digest_matched();
            }
            if matches!(r.event, Event::OutputCheck { .. }) {
                self.report_now = true;
                self.verified = true;
            }
            self.last_seq = Some(r.seq);
            self.metrics.replayed_inc();
        }
    }

    fn wait_horizon(&mut self, exit: u64) -> Result<Horizon, Error> {
        if exit.is_multiple_of(PROGRESS_EVERY) && self.last_summary.elapsed() >= SUMMARY_EVERY {
            self.last_summary = Instant::now();
            tracing::info!("backup: {}", self.metrics.summary());
        }
        // A verified output waits on this report: not rate-limited.
        let urgent = std::mem::take(&mut self.report_now);
        if self.known_exit >= exit {
            // Running behind: still tell the primary now and then, since it
            // throttles itself on our progress (bounded execution lag).
            if exit.is_multiple_of(PROGRESS_EVERY)
                && !self.promoted
                && (urgent
                    || (self.passed_unreported(exit - 1)
                        && self.last_report.elapsed() >= PROGRESS_PERIOD))
            {
                self.report(exit - 1);
            }
            return Ok(Horizon::Covered);
        }
        // Caught up. If an output waits, the ack of the batch that brings
        // the horizon carries this position to the primary anyway (acks
        // say how far we executed); a report of its own goes only if the
        // next batch is slow to come, since the primary may be waiting on
        // us (its lag bound). Reporting at once on every catch-up cost a
        // message, and a wake-up of both channel threads (which preempt a
        // vCPU), per exit. Batches no output waits on are acknowledged by
        // these reports (see logchannel's ACK_NOW).
        self.link.state().set_replayed_exit(exit - 1);
        // The ack of the next batch, or a report below, carries this.
        self.passed(exit - 1);
        let mut reported = urgent;
        if urgent {
            self.report(exit - 1);
        }
        while self.known_exit < exit {
            if let Some(failure) = &self.failed {
                return Ok(Horizon::PeerLost(failure.clone()));
            }
            if stop::requested() {
                return Err(Error::Interrupted);
            }
            let slice = if reported { stop::SLICE } else { REPORT_AFTER };
            match self
                .link
                .recv_timeout(slice)
                .and_then(|r| self.finished_if_none(r))
            {
                Ok(Some(rec)) => self.take(rec),
                Ok(None) if self.known_exit >= exit => {}
                Ok(None) if !reported => {
                    self.report(exit - 1);
                    reported = true;
                }
                Ok(None) => {}
                Err(e) => self.failed = Some(super::failure_of(&e, Role::Primary)),
            }
        }
        self.link.state().set_replayed_exit(exit - 1);
        Ok(Horizon::Covered)
    }

    fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    fn covers(&self, exit: u64) -> bool {
        // After promotion `known_exit` is u64::MAX, but what is buffered is
        // all there is: running out then means the live world takes over.
        !self.promoted && self.known_exit >= exit
    }
}

/// What a backup needs to take over when it loses its primary.
pub struct Takeover {
    /// Without an arbiter, losing the primary halts the backup.
    pub arbiter: Option<Arbiter>,
    pub metrics: Arc<Metrics>,
    /// Opens the world (the serial service address) at go-live; never
    /// before, since a backup touches no outside device while it replays.
    pub open_world: Box<dyn FnMut() -> Result<World, super::Error>>,
    /// Once live, let a new backup join here (re-protection).
    pub join: Option<JoinPlan>,
    /// Periodic digests once a joined backup receives our log.
    pub digest_every: Option<Duration>,
    /// Once live, verify outputs with the backup that joins.
    pub verify_outputs: bool,
    /// Once live, the execution-lag bound with the backup that joins.
    pub max_lag: Duration,
}

/// The timeline of a backup that went live: a recording one with no
/// backup yet, so that a new backup can join it.
type LiveTimeline = record::Record<ChannelSink>;

/// The backup's timeline: replay from the stream until the primary is lost
/// and the arbiter grants us the pair; then replay what was received and go
/// live, answering from the world as a primary without a backup. Going
/// live is this swap of one door for another at a known position; the
/// vCPU loop does not know it happened.
pub struct BackupTimeline<O: Write> {
    replay: Replay<StreamSource, O>,
    live: Option<LiveTimeline>,
    takeover: Takeover,
    /// The operator stopped the backup: the run ends short of the
    /// primary's end, which is not a divergence.
    stopped: bool,
    /// Network frames replay produced lately (dropped, as a backup's
    /// outputs are), with when.
    recent_frames: VecDeque<(Instant, Vec<u8>)>,
}

impl<O: Write> BackupTimeline<O> {
    /// Going live: sends again the network frames that replay produced
    /// from the primary's last [`RESEND_MARGIN`] of records. The primary may
    /// have died holding them under the Output Rule; the guest, whose state
    /// says they were sent, would otherwise resend them only when its TCP
    /// retransmission timer fires (a second, with smoltcp). Every one of
    /// them is backed by the log this backup has, so the Output Rule allows
    /// them; one that the primary did release is a duplicate frame, which
    /// TCP absorbs (VMware FT relies on the same). Serial output is never
    /// sent twice: a byte stream has no duplicates to absorb.
    fn resend_recent_frames(&mut self, world: &mut World) -> Result<(), Error> {
        let Some(last) = self.replay.source().last_record_at else {
            return Ok(());
        };
        let cutoff = last.checked_sub(RESEND_MARGIN).unwrap_or(last);
        let mut sent = 0;
        for (at, frame) in self.recent_frames.drain(..) {
            if at >= cutoff {
                world.output(Output::Net(frame))?;
                sent += 1;
            }
        }
        if sent > 0 {
            tracing::warn!("backup: re-sent {sent} recent frames the primary may have held");
        }
        Ok(())
    }

    /// Remembers a frame replay produced, for [`Self::resend_recent_frames`].
    fn remember(&mut self, frame: &[u8]) {
        let now = Instant::now();
        while self.recent_frames.len() >= RESEND_MAX
            || self
                .recent_frames
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            self.recent_frames.pop_front();
        }
        self.recent_frames.push_back((now, frame.to_vec()));
    }

    pub fn new(replay: Replay<StreamSource, O>, takeover: Takeover) -> Self {
        BackupTimeline {
            replay,
            live: None,
            takeover,
            stopped: false,
            recent_frames: VecDeque::new(),
        }
    }

    /// The live timeline, once promoted and the received log is used up.
    fn live_now(&mut self) -> Option<&mut LiveTimeline> {
        if self.replay.source().exhausted() {
            self.live.as_mut()
        } else {
            None
        }
    }

    fn go_live(&mut self, next_exit: u64, failure: LinkFailure) -> Result<(), Error> {
        let Some(arbiter) = &self.takeover.arbiter else {
            return Err(super::Error::PeerLost {
                peer: Peer::Primary,
                failure,
            }
            .into());
        };
        let noticed = self
            .replay
            .source()
            .link
            .state()
            .snapshot()
            .failed_at
            .map_or(0, |t| t.elapsed().as_millis());
        self.takeover.metrics.event(StateEvent::PeerLost {
            peer: Peer::Primary.to_string(),
            failure: failure.to_string(),
        });
        arbiter.claim(
            &format!("lost the primary ({failure}; the channel noticed {noticed} ms ago)"),
            &self.takeover.metrics,
        )?;
        let mut world = (self.takeover.open_world)()?;
        world.continue_clock_from(self.replay.last_clock_ns());
        world.after_failover();
        self.resend_recent_frames(&mut world)?;
        // The log numbering goes on after the last record received, which
        // replay consumes before the live world answers.
        let source = self.replay.source();
        let next_seq = source
            .buffered
            .back()
            .map(|r| r.seq)
            .or(source.last_seq)
            .map_or(0, |s| s + 1);
        let (outlet, bell) = (world.outlet()?, world.bell());
        let metrics = self.takeover.metrics.clone();
        let mut sink = ChannelSink::alone(
            metrics.clone(),
            outlet,
            self.takeover.arbiter.clone(),
            next_seq,
        )?
        .verify_outputs(self.takeover.verify_outputs)
        .max_lag(self.takeover.max_lag);
        if let Some(plan) = self.takeover.join.take() {
            let epoch = metrics.epoch();
            // Serving comes first: a join address that cannot be bound
            // leaves the VM unprotected, not down.
            match JoinService::start(plan, bell, metrics, epoch, false) {
                Ok(join) => sink = sink.with_join(join),
                Err(e) => tracing::warn!(
                    "backup: going live, but no new backup can join: {}",
                    logchannel::channel::error_chain(&e)
                ),
            }
        }
        self.replay.source_mut().promote();
        self.live = Some(record::Record::new(world, sink, self.takeover.digest_every));
        self.takeover.metrics.set_role(metrics::Role::Primary);
        self.takeover
            .metrics
            .event(StateEvent::Live { exit: next_exit });
        tracing::warn!(
            "backup: going live before exit {next_exit}, after replaying {} records ({} still buffered)",
            self.replay.source().replayed(),
            self.replay.source().buffered.len()
        );
        Ok(())
    }
}

impl<O: Write> Timeline for BackupTimeline<O> {
    fn clock_ns(&mut self, at: &Position) -> Result<u64, Error> {
        match self.live_now() {
            Some(l) => l.clock_ns(at),
            None => self.replay.clock_ns(at),
        }
    }

    fn wall_clock(&mut self, at: &Position) -> Result<i64, Error> {
        match self.live_now() {
            Some(l) => l.wall_clock(at),
            None => self.replay.wall_clock(at),
        }
    }

    fn entropy(&mut self, at: &Position) -> Result<u64, Error> {
        match self.live_now() {
            Some(l) => l.entropy(at),
            None => self.replay.entropy(at),
        }
    }

    fn inputs(
        &mut self,
        at: &Position,
        demand: &Demand,
        out: &mut Vec<Input>,
    ) -> Result<(), Error> {
        if self.live.is_none() {
            // A joined backup resumes a guest that waits at the handover
            // exit before anything says that exit is complete.
            if !self.replay.source().covers(at.exit) {
                if let Horizon::PeerLost(failure) =
                    self.replay.source_mut().wait_horizon(at.exit)?
                {
                    self.go_live(at.exit, failure)?;
                }
            }
        }
        if self.live.is_none() {
            return self.replay.inputs(at, demand, out);
        }
        // Promoted: what is still buffered at this exit first, then the world.
        let first = out.len();
        if !self.replay.source().exhausted() {
            let replay_demand = Demand {
                idle: false,
                ..*demand
            };
            self.replay.inputs(at, &replay_demand, out)?;
        }
        let Some(live) = self.live_now() else {
            return Ok(());
        };
        let mut left = *demand;
        for input in &out[first..] {
            left.consume(input);
        }
        left.idle = demand.idle && out.len() == first;
        live.inputs(at, &left, out)
    }

    fn interrupt(&mut self, at: &Position, vector: u8) -> Result<(), Error> {
        match self.live_now() {
            Some(l) => l.interrupt(at, vector),
            None => self.replay.interrupt(at, vector),
        }
    }

    fn wants_digest(&mut self, at: &Position, requested: bool) -> bool {
        match self.live_now() {
            Some(l) => l.wants_digest(at, requested),
            None => self.replay.wants_digest(at, requested),
        }
    }

    fn digest(&mut self, at: &Position, digest: &StateDigest) -> Result<(), Error> {
        match self.live_now() {
            Some(l) => l.digest(at, digest),
            None => self.replay.digest(at, digest),
        }
    }

    fn output(&mut self, at: &Position, output: Output) -> Result<(), Error> {
        if let Some(l) = self.live_now() {
            return l.output(at, output);
        }
        if let Output::Net(frame) = &output {
            match self.live.as_mut() {
                // Promoted, replaying what was received: these frames come
                // from the primary's very last records, which it is the
                // likeliest to have died holding (see resend_recent_frames).
                // A verifying primary's check of it is still in the log.
                Some(l) => {
                    self.replay.check_output(at, &output)?;
                    return l.output(at, output);
                }
                None => self.remember(frame),
            }
        }
        self.replay.output(at, output)
    }

    /// The guest runs on to its next exit without waiting for the primary
    /// to get there: what happens between two exits depends only on the
    /// state at the first, and everything the log says happens at an exit
    /// is applied at that exit, so the backup executes in parallel with the
    /// primary instead of a step behind it. It waits for the log at the
    /// exit ([`Timeline::stop_here`], the first thing the loop asks there).
    /// Before, it waited here until the primary had finished the next exit,
    /// so a guest that exits rarely was always at least one exit's worth
    /// of execution behind.
    fn before_run(&mut self, next_exit: u64) -> Result<(), Error> {
        if let Some(l) = self.live_now() {
            return l.before_run(next_exit);
        }
        if self.live.is_none() {
            self.replay.check_left_behind(next_exit)?;
            self.replay.source_mut().report_verified(next_exit - 1);
        }
        Ok(())
    }

    fn stop_here(&mut self, at: &Position) -> Result<bool, Error> {
        if let Some(l) = self.live_now() {
            return l.stop_here(at);
        }
        if self.live.is_none() {
            if stop::requested() {
                self.stopped = true;
                return Ok(true);
            }
            if let Horizon::PeerLost(failure) = self.replay.source_mut().wait_horizon(at.exit)? {
                // The primary never finished this exit: we go live before
                // handling it, with what arrived of it replayed first.
                self.go_live(at.exit, failure)?;
                if let Some(l) = self.live_now() {
                    return l.stop_here(at);
                }
            }
        }
        self.replay.stop_here(at)
    }

    fn wants_machine(&self) -> bool {
        self.replay.source().exhausted() && self.live.as_ref().is_some_and(|l| l.wants_machine())
    }

    fn attend_machine(
        &mut self,
        machine: &mut dyn crate::vcpu::MachineAccess,
    ) -> Result<(), Error> {
        match self.live_now() {
            Some(l) => l.attend_machine(machine),
            None => Ok(()),
        }
    }

    fn finish(&mut self, at: &Position, ending: Ending, digest: &StateDigest) -> Result<(), Error> {
        match self.live.as_mut() {
            Some(l) => l.finish(at, ending, digest),
            None if self.stopped => self.replay.flush_output(),
            None => {
                self.replay.finish(at, ending, digest)?;
                let source = self.replay.source();
                if source.verified {
                    // An output at this last exit is released on this
                    // report, which no next exit will carry: send it, and
                    // stay until the primary has closed (or is gone).
                    source.link.report_progress(at.exit);
                    source
                        .link
                        .state()
                        .wait_until(FINAL_REPORT_WAIT, |c| c.closed);
                }
                Ok(())
            }
        }
    }

    fn run_failed(&mut self, error: &Error) {
        let Error::Divergence { at, .. } = error else {
            return;
        };
        if self.live.is_some() {
            return;
        }
        let told = self.replay.source().link.report_divergence(
            at.exit,
            &error.to_string(),
            DIVERGED_REPORT_WAIT,
        );
        if !told {
            tracing::warn!("backup: could not tell the primary that replay diverged");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logchannel::channel::{ChannelConfig, LinkFailure, PrimaryLink, Role as LinkRole};
    use logchannel::encode_frame;
    use std::time::Duration;

    use crate::ft::test_hello as hello;

    fn at(exit: u64) -> Position {
        Position {
            exit,
            ..Position::default()
        }
    }

    /// A primary link and the backup's stream source on loopback. The
    /// backup treats 300 ms of silence as a lost primary, and the primary
    /// sends no heartbeats of its own in that time unless asked to.
    fn pair(primary_heartbeat: Duration) -> (PrimaryLink, StreamSource) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backup_cfg = ChannelConfig {
            heartbeat: Duration::from_millis(20),
            timeout: Duration::from_millis(300),
            ..ChannelConfig::default()
        };
        let backup = std::thread::spawn(move || {
            BackupLink::accept_on(listener, hello(LinkRole::Backup), backup_cfg, |_| {}).unwrap()
        });
        let primary_cfg = ChannelConfig {
            heartbeat: primary_heartbeat,
            timeout: Duration::from_secs(10),
            ..ChannelConfig::default()
        };
        let primary = PrimaryLink::connect(
            addr,
            hello(LinkRole::Primary),
            primary_cfg,
            Duration::from_secs(5),
        )
        .unwrap();
        let link = backup.join().unwrap();
        let metrics = Metrics::new(metrics::Role::Backup, 1);
        (primary, StreamSource::new(link, metrics))
    }

    fn send(primary: &PrimaryLink, records: &[(u64, u64, Event)]) {
        let mut frames = Vec::new();
        for (seq, exit, event) in records {
            let rec = Record {
                seq: *seq,
                pos: at(*exit),
                event: event.clone(),
            };
            encode_frame(&rec, &mut frames).unwrap();
        }
        let len = frames.len() as u64;
        primary
            .send(frames, records.len() as u64, len, true)
            .unwrap();
    }

    #[test]
    fn the_horizon_bounds_execution_and_records_come_in_order() {
        let (primary, mut source) = pair(Duration::from_millis(20));
        send(
            &primary,
            &[
                (0, 2, Event::Clock { ns: 5 }),
                (1, 4, Event::TimerTick),
                (2, 6, Event::Horizon),
            ],
        );
        // A record at exit 4 says every exit before it is complete, the
        // horizon says exit 6 is.
        assert!(matches!(source.wait_horizon(3).unwrap(), Horizon::Covered));
        assert_eq!(source.peek().unwrap().map(|r| r.seq), Some(0));
        source.advance();
        assert_eq!(source.peek().unwrap().map(|r| r.seq), Some(1));
        source.advance();
        assert!(matches!(source.wait_horizon(6).unwrap(), Horizon::Covered));
        // Horizon markers are never handed to replay.
        assert!(source.peek().unwrap().is_none());
        assert_eq!(source.last_seq(), Some(1));
        assert_eq!(source.replayed(), 2);
        // The primary says goodbye: everything is known from then on.
        primary.close(Duration::from_secs(5)).unwrap();
        assert!(matches!(
            source.wait_horizon(1000).unwrap(),
            Horizon::Covered
        ));
    }

    /// A verified output waits on the backup's progress report: once its
    /// check is consumed, the next report is not held back by the rate
    /// limit that applies while the backup is behind.
    #[test]
    fn a_consumed_output_check_is_reported_at_once() {
        let (primary, mut source) = pair(Duration::from_millis(20));
        let check = Event::output_check(logchannel::OutputKind::Serial, b"x");
        send(&primary, &[(0, 2, check), (1, 9, Event::TimerTick)]);
        // Behind (the record at exit 9 covers 8): this report may go out,
        // and it restarts the rate limit.
        assert!(matches!(source.wait_horizon(2).unwrap(), Horizon::Covered));
        source.peek().unwrap();
        source.advance();
        // Within the rate limit, yet reported: exit 2 was replayed.
        assert!(matches!(source.wait_horizon(3).unwrap(), Horizon::Covered));
        let state = primary.state();
        let c = state.wait_until(Duration::from_secs(2), |c| c.replayed_exit >= 2);
        assert_eq!(c.replayed_exit, 2, "{c:?}");
    }

    /// A backup that is behind reports when its replay passes a horizon
    /// the primary sent, not at exits between two of them: the primary
    /// measures lag and waits on its bound from those horizons only.
    #[test]
    fn a_backup_behind_reports_on_passing_a_horizon() {
        let (primary, mut source) = pair(Duration::from_millis(20));
        send(
            &primary,
            &[
                (0, 3, Event::TimerTick),
                (1, 5, Event::Horizon),
                (2, 9, Event::TimerTick),
                (3, 12, Event::Horizon),
            ],
        );
        // Everything has arrived (so the backup is behind from exit 1 on),
        // and the rate limit has passed, so only the horizon decides.
        for _ in 0..2000 {
            source.drain();
            if source.known_exit >= 12 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(source.known_exit, 12);
        std::thread::sleep(PROGRESS_PERIOD * 2);
        // Behind (exit 12 is known), short of the first horizon (5).
        assert!(matches!(source.wait_horizon(3).unwrap(), Horizon::Covered));
        assert!(matches!(source.wait_horizon(5).unwrap(), Horizon::Covered));
        // Several of the backup's heartbeats later, the primary has heard
        // of no progress.
        std::thread::sleep(Duration::from_millis(100));
        let state = primary.state();
        assert_eq!(state.snapshot().replayed_exit, 0);
        // Exit 6 runs: everything through 5, the horizon, is done.
        assert!(matches!(source.wait_horizon(7).unwrap(), Horizon::Covered));
        let c = state.wait_until(Duration::from_secs(2), |c| c.replayed_exit >= 6);
        assert_eq!(c.replayed_exit, 6, "{c:?}");
    }

    #[test]
    fn a_silent_primary_is_lost_after_what_it_sent_is_replayed() {
        let (primary, mut source) = pair(Duration::from_secs(60));
        send(
            &primary,
            &[(0, 2, Event::Clock { ns: 5 }), (1, 3, Event::Horizon)],
        );
        assert!(matches!(source.wait_horizon(3).unwrap(), Horizon::Covered));
        // Nothing more comes: the backup gives up on the primary.
        let lost = source.wait_horizon(4).unwrap();
        assert!(
            matches!(lost, Horizon::PeerLost(LinkFailure::PeerSilent { .. })),
            "{lost:?}"
        );
        // What arrived before is still there to replay.
        assert_eq!(source.peek().unwrap().map(|r| r.seq), Some(0));
        source.promote();
        assert!(!source.exhausted());
        source.advance();
        assert!(source.exhausted());
        assert!(matches!(
            source.wait_horizon(10_000).unwrap(),
            Horizon::Covered
        ));
        drop(primary);
    }
}
