//! The primary's log sink: records are batched onto the log channel, a
//! horizon marker tells the backup how far it may execute, and output waits
//! in a gate until the backup has acknowledged every record before it (the
//! Output Rule). The guest keeps running while output waits; only the
//! output is held.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logchannel::channel::{LinkState, PrimaryLink};
use logchannel::{encode_frame, Event, Position, Record};

use super::arbiter::Arbiter;
use super::metrics::Metrics;
use crate::serial_backend::Chunk;
use crate::timeline::live::World;
use crate::timeline::record::LogSink;
use crate::timeline::Error;
use logchannel::channel::error_chain;

/// How long records may sit in the batch before they go out anyway. Also
/// bounds the execution lag a busy guest adds.
const FLUSH_EVERY: Duration = Duration::from_millis(1);
/// Flush early once a batch is this large.
const BATCH_BYTES: usize = 256 * 1024;
/// How long a finishing primary waits for the backup's last acks.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Flush history kept for lag measurement.
const HISTORY: usize = 65_536;
/// How many exits the primary may run ahead of the backup's replay before
/// it waits. This bounds execution lag, and so the time a backup needs to
/// catch up before it can go live: about 100 ms at this platform's ~30k
/// exits per second. VMware FT slows the primary for the same reason.
const MAX_AHEAD_EXITS: u64 = 3_000;
/// The same bound in time, for guests that exit rarely (a compute loop
/// makes a few thousand exits a second): the primary waits once the oldest
/// position the backup has not reached was flushed this long ago.
const MAX_LAG: Duration = Duration::from_millis(50);

/// What the gate is told.
enum GateMsg {
    Hold(Held),
    /// The backup is gone and we won the arbiter: nothing waits any more.
    ReleaseAll,
}

/// Output produced after `needs` records existed.
struct Held {
    needs: u64,
    /// The client connection it is for (see `serial_backend::Chunk`).
    conn: u64,
    bytes: Vec<u8>,
    since: Instant,
}

/// The primary's sink: see the module documentation.
pub struct ChannelSink {
    link: Option<PrimaryLink>,
    state: Arc<LinkState>,
    metrics: Arc<Metrics>,
    next_seq: u64,
    batch: Vec<u8>,
    batch_records: u64,
    /// Last exit whose events are all appended, and the last one announced.
    horizon: u64,
    horizon_sent: u64,
    last_flush: Instant,
    /// (horizon, when it was sent), for execution lag.
    history: Arc<Mutex<VecDeque<(u64, Instant)>>>,
    gate: Option<Sender<GateMsg>>,
    monitor: Option<JoinHandle<()>>,
    /// Who to ask when the backup is lost; without one, losing it halts.
    arbiter: Option<Arbiter>,
    /// The backup is gone and we won: run as a primary without a backup.
    alone: bool,
}

impl ChannelSink {
    /// `world_output` receives output once the gate releases it.
    pub fn new(
        link: PrimaryLink,
        metrics: Arc<Metrics>,
        world_output: SyncSender<Chunk>,
        arbiter: Option<Arbiter>,
    ) -> Self {
        let state = link.state();
        metrics.set_link(state.clone());
        let history = Arc::new(Mutex::new(VecDeque::new()));
        {
            let (history, metrics) = (history.clone(), metrics.clone());
            state.on_progress(Box::new(move |exit| sample_lag(&history, exit, &metrics)));
        }
        let (gate_tx, gate_rx) = channel();
        let monitor = {
            let (state, metrics) = (state.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("output-gate".into())
                .spawn(move || run_gate(gate_rx, state, metrics, world_output))
                .ok()
        };
        ChannelSink {
            link: Some(link),
            state,
            metrics,
            next_seq: 0,
            batch: Vec::with_capacity(BATCH_BYTES),
            batch_records: 0,
            horizon: 0,
            horizon_sent: 0,
            last_flush: Instant::now(),
            history,
            gate: Some(gate_tx),
            monitor,
            arbiter,
            alone: false,
        }
    }

    /// Waits until the backup's replay is within [`MAX_AHEAD_EXITS`] of
    /// `exit` (or the link fails). Everything is flushed first, so the
    /// backup has what it needs to catch up.
    fn throttle(&mut self, exit: u64) -> Result<(), Error> {
        self.flush()?;
        let floor = exit - MAX_AHEAD_EXITS;
        self.state.wait_until(Duration::from_secs(3600), |c| {
            c.replayed_exit >= floor || c.failure.is_some()
        });
        Ok(())
    }

    /// The link failed: claim the pair at the arbiter; win and go on alone
    /// (held output is released at once), or lose and halt.
    fn lost_backup(&mut self, why: String) -> Result<(), Error> {
        let Some(arbiter) = &self.arbiter else {
            return Err(Error::Channel(why));
        };
        arbiter.claim(&format!("lost the backup ({why})"), &self.metrics)?;
        self.alone = true;
        self.link.take();
        self.batch.clear();
        self.batch_records = 0;
        if let Some(g) = &self.gate {
            let _ = g.send(GateMsg::ReleaseAll);
        }
        tracing::warn!("primary: continuing alone; output is no longer held");
        Ok(())
    }

    fn push(&mut self, pos: Position, event: Event) -> Result<(), Error> {
        let rec = Record {
            seq: self.next_seq,
            pos,
            event,
        };
        encode_frame(&rec, &mut self.batch)?;
        self.next_seq += 1;
        self.batch_records += 1;
        self.metrics.set_seq(self.next_seq);
        Ok(())
    }

    fn link(&self) -> Result<&PrimaryLink, Error> {
        self.link
            .as_ref()
            .ok_or_else(|| Error::Channel("the link is closed".into()))
    }
}

impl LogSink for ChannelSink {
    fn append(&mut self, pos: &Position, event: Event) -> Result<(), Error> {
        if self.alone {
            return Ok(());
        }
        self.push(*pos, event)?;
        if self.batch.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn output(&mut self, _pos: &Position, bytes: Vec<u8>, world: &mut World) -> Result<(), Error> {
        world.write_transcript(&bytes)?;
        let held = Held {
            needs: if self.alone { 0 } else { self.next_seq },
            conn: world.output_tag(),
            bytes,
            since: Instant::now(),
        };
        self.metrics.outputs_held_inc();
        if let Some(g) = &self.gate {
            let _ = g.send(GateMsg::Hold(held));
        }
        // An output is waiting: the log goes out at once.
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.alone {
            return Ok(());
        }
        if self.horizon > self.horizon_sent {
            let pos = Position {
                exit: self.horizon,
                ..Position::default()
            };
            self.push(pos, Event::Horizon)?;
            self.horizon_sent = self.horizon;
        }
        if self.batch_records == 0 {
            return Ok(());
        }
        let frames = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_BYTES));
        let (n, bytes) = (self.batch_records, frames.len() as u64);
        self.batch_records = 0;
        self.last_flush = Instant::now();
        {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back((self.horizon_sent, self.last_flush));
        }
        match self.link()?.send(frames, n, bytes) {
            Ok(()) => Ok(()),
            Err(e) => self.lost_backup(error_chain(&e)),
        }
    }

    fn complete_through(&mut self, exit: u64) -> Result<(), Error> {
        if self.alone {
            return Ok(());
        }
        self.horizon = exit;
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        let replayed = self.state.snapshot().replayed_exit;
        if exit.saturating_sub(replayed) > MAX_AHEAD_EXITS {
            self.throttle(exit)?;
        }
        let oldest = {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            // Flushes of positions the backup had already passed when they
            // were made say nothing about lag.
            while h.front().is_some_and(|&(horizon, _)| horizon <= replayed) {
                h.pop_front();
            }
            h.front().copied()
        };
        if let Some((horizon, at)) = oldest {
            if at.elapsed() > MAX_LAG {
                self.flush()?;
                self.state.wait_until(Duration::from_secs(3600), |c| {
                    c.replayed_exit >= horizon || c.failure.is_some()
                });
            }
        }
        self.attend()
    }

    fn needs_attention(&self) -> bool {
        !self.alone && self.state.failure().is_some()
    }

    fn attend(&mut self) -> Result<(), Error> {
        match self.state.failure() {
            Some(why) if !self.alone => self.lost_backup(why),
            _ => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<(), Error> {
        self.flush()?;
        let result = match self.link.take() {
            Some(link) => link
                .close(CLOSE_TIMEOUT)
                .map_err(|e| Error::Channel(error_chain(&e))),
            None => Ok(()),
        };
        // The gate releases what the final acks allow, then ends.
        self.gate.take();
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        result
    }
}

/// The output gate: releases held output in order once the backup has
/// acknowledged every record that existed when it was produced.
fn run_gate(
    gate_rx: Receiver<GateMsg>,
    state: Arc<LinkState>,
    metrics: Arc<Metrics>,
    out: SyncSender<Chunk>,
) {
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut closed = false;
    let mut release_all = false;
    let mut last_summary = Instant::now();
    loop {
        let take = |m: GateMsg, held: &mut VecDeque<Held>, all: &mut bool| match m {
            GateMsg::Hold(h) => held.push_back(h),
            GateMsg::ReleaseAll => *all = true,
        };
        loop {
            match gate_rx.try_recv() {
                Ok(m) => take(m, &mut held, &mut release_all),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let c = match held.front() {
            Some(front) if !release_all => {
                let needs = front.needs;
                state.wait_until(Duration::from_millis(20), |c| c.acked >= needs)
            }
            Some(_) => state.snapshot(),
            None if closed => return,
            None => {
                match gate_rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(m) => take(m, &mut held, &mut release_all),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => closed = true,
                    Err(_) => {}
                }
                state.snapshot()
            }
        };
        while held
            .front()
            .is_some_and(|h| release_all || c.acked >= h.needs)
        {
            if let Some(h) = held.pop_front() {
                metrics.outputs_held_dec();
                if out.send((h.conn, h.bytes)).is_err() {
                    return;
                }
            }
        }
        metrics.set_oldest_held(held.front().map_or(Duration::ZERO, |h| h.since.elapsed()));
        // Once the sink is done: stop when nothing is held, or when what is
        // held can never be acknowledged (the link ended) and was not
        // released by a won claim.
        let link_over = c.failure.is_some() || c.closed;
        if closed && (held.is_empty() || (link_over && !release_all)) {
            return;
        }
        if last_summary.elapsed() >= Duration::from_secs(5) {
            last_summary = Instant::now();
            tracing::info!("primary: {}", metrics.summary());
        }
    }
}

/// The backup has executed through `replayed`: the primary executed that
/// position no later than the first flush whose horizon reached it.
fn sample_lag(history: &Mutex<VecDeque<(u64, Instant)>>, replayed: u64, metrics: &Metrics) {
    let mut h = history.lock().unwrap_or_else(|e| e.into_inner());
    let mut sample = None;
    while let Some(&(exit, at)) = h.front() {
        if exit > replayed {
            break;
        }
        sample = Some(at);
        h.pop_front();
    }
    if let Some(at) = sample {
        metrics.record_lag(at.elapsed());
    }
}
