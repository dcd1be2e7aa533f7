//! The primary's log sink: records are batched onto the log channel, a
//! horizon marker tells the backup how far it may execute, and output waits
//! in a gate until the backup has acknowledged every record before it (the
//! Output Rule). The guest keeps running while output waits; only the
//! output is held.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logchannel::channel::{LinkState, PrimaryLink};
use logchannel::{encode_frame, Event, Position, Record};

use super::metrics::Metrics;
use crate::timeline::live::World;
use crate::timeline::record::LogSink;
use crate::timeline::Error;

/// How long records may sit in the batch before they go out anyway. Also
/// bounds the execution lag a busy guest adds.
const FLUSH_EVERY: Duration = Duration::from_millis(1);
/// Flush early once a batch is this large.
const BATCH_BYTES: usize = 256 * 1024;
/// How long a finishing primary waits for the backup's last acks.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Flush history kept for lag measurement.
const HISTORY: usize = 65_536;

/// Output produced after `needs` records existed.
struct Held {
    needs: u64,
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
    gate: Option<Sender<Held>>,
    monitor: Option<JoinHandle<()>>,
}

impl ChannelSink {
    /// `world_output` receives output once the gate releases it.
    pub fn new(
        link: PrimaryLink,
        metrics: Arc<Metrics>,
        world_output: SyncSender<Vec<u8>>,
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
        }
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
        self.metrics.seq.store(self.next_seq, Ordering::Relaxed);
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
        self.push(*pos, event)?;
        if self.batch.len() >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn output(&mut self, _pos: &Position, bytes: Vec<u8>, world: &mut World) -> Result<(), Error> {
        world.write_transcript(&bytes)?;
        let held = Held {
            needs: self.next_seq,
            bytes,
            since: Instant::now(),
        };
        self.metrics.outputs_held.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = &self.gate {
            let _ = g.send(held);
        }
        // An output is waiting: the log goes out at once.
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Error> {
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
        self.link()?
            .send(frames, n, bytes)
            .map_err(|e| Error::Channel(e.to_string()))
    }

    fn complete_through(&mut self, exit: u64) -> Result<(), Error> {
        self.horizon = exit;
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        if let Some(f) = self.state.failure() {
            return Err(Error::Channel(f));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Error> {
        self.flush()?;
        let result = match self.link.take() {
            Some(link) => link
                .close(CLOSE_TIMEOUT)
                .map_err(|e| Error::Channel(e.to_string())),
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
    held_rx: Receiver<Held>,
    state: Arc<LinkState>,
    metrics: Arc<Metrics>,
    out: SyncSender<Vec<u8>>,
) {
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut closed = false;
    let mut last_summary = Instant::now();
    loop {
        loop {
            match held_rx.try_recv() {
                Ok(h) => held.push_back(h),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let c = if let Some(front) = held.front() {
            let needs = front.needs;
            state.wait_until(Duration::from_millis(20), |c| c.acked >= needs)
        } else if closed {
            return;
        } else {
            match held_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(h) => held.push_back(h),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => closed = true,
                Err(_) => {}
            }
            state.snapshot()
        };
        while held.front().is_some_and(|h| c.acked >= h.needs) {
            if let Some(h) = held.pop_front() {
                metrics.outputs_held.fetch_sub(1, Ordering::Relaxed);
                if out.send(h.bytes).is_err() {
                    return;
                }
            }
        }
        metrics.oldest_held_us.store(
            held.front()
                .map_or(0, |h| h.since.elapsed().as_micros() as u64),
            Ordering::Relaxed,
        );
        if closed && (held.is_empty() || c.failure.is_some() || c.closed) {
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
