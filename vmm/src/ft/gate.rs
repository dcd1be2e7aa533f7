//! The output gate: the Output Rule as a small state machine. An output
//! produced when `needs` records existed may leave only once the backup has
//! acknowledged all of them; outputs leave in the order they were produced.
//! Once the pair is gone and we won the arbiter, nothing waits any more.
//!
//! The gate holds outputs already addressed by their backend
//! ([`Outgoing`]), so it knows nothing about devices.
//!
//! In verified-output mode (`--verify-outputs`) an output also carries the
//! exit it was produced at ([`Held::verify_at`]), and it waits, besides the
//! acks, until the backup reports that it replayed that exit: that report
//! means the backup consumed every record at that exit, its own output's
//! check and the state digest after it included, and found them equal.
//! Those reports arrive as progress ([`LinkState::on_progress`]), on the
//! same channel thread as the acks, and release output the same way.
//!
//! [`SharedGate`] drives it from whichever thread learns first that an
//! output may leave: the log channel's thread, the moment it reads the ack
//! (through [`LinkState::on_ack`]), or the vCPU thread, for an output whose
//! records were all acknowledged already. Both only ever hand outputs over
//! without blocking; when a backend is full, the gate's own thread takes
//! over with blocking sends, so that a slow client never stalls the thread
//! that reads heartbeats. Before, every release waited for the gate thread
//! to wake on the ack: one thread hand-off (tens of µs here) on the path of
//! every output.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use logchannel::channel::LinkState;

use super::metrics::{Metrics, OutputStages};
use crate::stop;
use crate::timeline::world::{Outgoing, Outlet, TrySendError};

/// How often the gate thread logs the primary's one-line status.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Acks remembered to time releases (see [`Inner::acks`]).
const ACK_HISTORY: usize = 4096;

/// One held output.
#[derive(Debug)]
pub struct Held {
    /// Records that existed when it was produced.
    pub needs: u64,
    /// Verified-output mode: the exit it was produced at, which the
    /// backup must report replayed (and so checked) before it leaves.
    pub verify_at: Option<u64>,
    pub out: Outgoing,
    pub since: Instant,
}

/// Held outputs, oldest first.
#[derive(Debug, Default)]
pub struct Gate {
    held: VecDeque<Held>,
    /// The Output Rule no longer applies (we run alone).
    open: bool,
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds an output. Outputs must arrive in the order they were
    /// produced, so `needs` never decreases.
    pub fn hold(&mut self, held: Held) {
        debug_assert!(self.held.back().is_none_or(|b| b.needs <= held.needs));
        self.held.push_back(held);
    }

    /// From now on every output leaves at once.
    pub fn open(&mut self) {
        self.open = true;
    }

    /// A backup joined: from now on outputs wait for acknowledgements
    /// again. Whatever is held was produced while alone, so it still
    /// leaves at once.
    pub fn close(&mut self) {
        self.open = false;
        for h in &mut self.held {
            h.needs = 0;
            h.verify_at = None;
        }
    }

    /// True once [`Gate::open`] was called.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Puts back, first in line, an output that [`Gate::release`] gave
    /// and that could not be handed over yet.
    pub fn unrelease(&mut self, held: Held) {
        self.held.push_front(held);
    }

    /// The next output that may leave, given `acked` acknowledged records
    /// and the backup's last replayed exit `replayed`.
    pub fn release(&mut self, acked: u64, replayed: u64) -> Option<Held> {
        match self.held.front() {
            Some(h)
                if self.open
                    || (acked >= h.needs && h.verify_at.is_none_or(|at| replayed >= at)) =>
            {
                self.held.pop_front()
            }
            _ => None,
        }
    }

    /// The acknowledgements the oldest held output waits for, if it waits.
    pub fn waiting_for(&self) -> Option<u64> {
        if self.open {
            return None;
        }
        self.held.front().map(|h| h.needs)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// How long the oldest held output has waited.
    pub fn oldest_age(&self) -> Duration {
        self.held
            .front()
            .map_or(Duration::ZERO, |h| h.since.elapsed())
    }
}

/// What the primary's sink tells the gate.
pub enum GateMsg {
    Hold(Held),
    /// The backup is gone and we won the arbiter: nothing waits any more.
    Open,
    /// A backup joined (re-protection): outputs wait for this link's
    /// acknowledgements again.
    Pair(Arc<LinkState>),
}

/// The gate is gone (its backend closed): nothing can be delivered.
#[derive(Debug)]
pub struct GateClosed;

/// The gate and what its three threads share; see the module docs.
pub struct SharedGate {
    inner: Mutex<Inner>,
    /// Wakes the gate thread: a backend was full, the gate opened, or the
    /// sink is done.
    wake: Condvar,
    outlet: Outlet,
    metrics: Arc<Metrics>,
    /// The backup's link, whose acks release outputs: replaced when a new
    /// backup joins.
    link: Mutex<Arc<LinkState>>,
}

struct Inner {
    gate: Gate,
    /// Records the backup has acknowledged, as the channel reported.
    acked: u64,
    /// The backup's last replayed exit, as the channel reported.
    replayed: u64,
    /// Acks that may still time a release: (acked, when read), oldest
    /// first; the first one reaching an output's `needs` is the ack that
    /// let it go.
    acks: VecDeque<(u64, Instant)>,
    /// The gate thread is in a blocking send: nobody else releases until
    /// it is done, so that outputs leave in order.
    sending: bool,
    /// The sink is done: the gate thread ends once nothing is left that
    /// can still leave.
    closed: bool,
    /// The backend is gone.
    dead: bool,
}

/// The vCPU thread's end of a [`SharedGate`]: dropping it tells the gate
/// thread that no more output comes.
pub struct GateHandle(Arc<SharedGate>);

impl GateHandle {
    pub fn send(&self, msg: GateMsg) -> Result<(), GateClosed> {
        if let GateMsg::Pair(link) = &msg {
            self.0.listen(link);
        }
        self.0.take(msg)
    }

    /// What the link's progress hook calls with each replayed exit the
    /// backup reports (the link has one hook, which the sink also uses to
    /// measure lag, so the sink installs it and calls this).
    pub fn progress_hook(&self) -> impl Fn(u64) + Send + 'static {
        let weak: Weak<SharedGate> = Arc::downgrade(&self.0);
        move |exit| {
            if let Some(g) = weak.upgrade() {
                g.progressed(exit);
            }
        }
    }

    /// Outputs held now.
    pub fn held(&self) -> usize {
        self.0.lock().gate.len()
    }
}

impl Drop for GateHandle {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_all();
    }
}

impl SharedGate {
    /// A gate that releases into `outlet` as `link`'s acks arrive, and the
    /// body of its thread (to spawn, then join after dropping the handle).
    /// Without a link (a sink that starts alone) the gate is open until
    /// [`GateMsg::Pair`].
    pub fn start(
        link: Option<Arc<LinkState>>,
        metrics: Arc<Metrics>,
        outlet: Outlet,
    ) -> (GateHandle, impl FnOnce() + Send + 'static) {
        let open = link.is_none();
        let link = link.unwrap_or_default();
        let shared = Arc::new(SharedGate {
            inner: Mutex::new(Inner {
                gate: Gate::new(),
                acked: 0,
                replayed: 0,
                acks: VecDeque::new(),
                sending: false,
                closed: false,
                dead: false,
            }),
            wake: Condvar::new(),
            outlet,
            metrics,
            link: Mutex::new(link.clone()),
        });
        if open {
            shared.lock().gate.open();
        }
        shared.listen(&link);
        let thread = {
            let shared = shared.clone();
            move || shared.run()
        };
        (GateHandle(shared), thread)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases on `link`'s acks, from its channel thread.
    fn listen(self: &Arc<Self>, link: &LinkState) {
        // Weak: the link outlives the gate in the hook it keeps.
        let weak: Weak<SharedGate> = Arc::downgrade(self);
        link.on_ack(Box::new(move |acked, at| {
            if let Some(g) = weak.upgrade() {
                g.acked(acked, at);
            }
        }));
    }

    fn link(&self) -> Arc<LinkState> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn take(&self, msg: GateMsg) -> Result<(), GateClosed> {
        let mut inner = self.lock();
        if inner.dead {
            return Err(GateClosed);
        }
        match msg {
            GateMsg::Hold(h) => inner.gate.hold(h),
            GateMsg::Open => {
                inner.gate.open();
                self.wake.notify_all();
            }
            GateMsg::Pair(link) => {
                // The new link's acks count from its first record, which
                // follows everything held so far (all of it produced while
                // alone, so it still leaves at once).
                let c = link.snapshot();
                inner.acked = c.acked;
                inner.replayed = c.replayed_exit;
                inner.acks.clear();
                inner.gate.close();
                *self.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
            }
        }
        self.release_ready(&mut inner);
        Ok(())
    }

    /// The channel read an ack for `acked` records at `at`.
    fn acked(&self, acked: u64, at: Instant) {
        let mut inner = self.lock();
        inner.acked = inner.acked.max(acked);
        if inner.acks.len() == ACK_HISTORY {
            inner.acks.pop_front();
        }
        inner.acks.push_back((acked, at));
        self.release_ready(&mut inner);
    }

    /// The backup reported that it replayed through `exit`.
    fn progressed(&self, exit: u64) {
        let mut inner = self.lock();
        if exit <= inner.replayed {
            return;
        }
        inner.replayed = exit;
        self.release_ready(&mut inner);
    }

    /// Hands over, without blocking, every output that may leave; leaves
    /// the rest (and a backend that is full) to the gate thread.
    fn release_ready(&self, inner: &mut Inner) {
        if inner.sending || inner.dead {
            return;
        }
        while let Some(h) = inner.gate.release(inner.acked, inner.replayed) {
            let (needs, verify_at, since) = (h.needs, h.verify_at, h.since);
            let open = inner.gate.is_open();
            // Counted out before it leaves: a client that has the output
            // must never see it still counted as held.
            self.metrics.outputs_held_dec();
            match self.outlet.try_send(h.out) {
                Ok(()) => self.released(inner, needs, since, open),
                Err(TrySendError::Full(out)) => {
                    self.metrics.outputs_held_inc();
                    inner.gate.unrelease(Held {
                        needs,
                        verify_at,
                        out,
                        since,
                    });
                    self.wake.notify_all();
                    break;
                }
                Err(TrySendError::Closed) => {
                    inner.dead = true;
                    self.wake.notify_all();
                    break;
                }
            }
        }
        self.forget_acks(inner);
    }

    /// Times an output's stages once handed over, while the Output Rule
    /// applied to it.
    fn released(&self, inner: &Inner, needs: u64, since: Instant, open: bool) {
        if open {
            return;
        }
        let now = Instant::now();
        let acked_at = inner
            .acks
            .iter()
            .find(|(a, _)| *a >= needs)
            .map(|(_, at)| *at)
            // Covered by an ack that arrived before the output existed: it
            // waited for nothing but the hand-over.
            .filter(|at| *at > since);
        let stages = match (acked_at, self.link().written_at(needs)) {
            (Some(acked_at), Some(written)) => {
                let written = written.max(since).min(acked_at);
                Some(OutputStages {
                    log_write: written - since,
                    ack: acked_at - written,
                    release: now.saturating_duration_since(acked_at),
                })
            }
            _ => None,
        };
        self.metrics
            .record_output(now.saturating_duration_since(since), stages);
    }

    /// Drops the acks no held output can still be timed by.
    fn forget_acks(&self, inner: &mut Inner) {
        match inner.gate.held.front().map(|h| h.needs) {
            Some(needs) => {
                while inner.acks.len() > 1 && inner.acks[0].0 < needs {
                    inner.acks.pop_front();
                }
            }
            None => inner.acks.clear(),
        }
    }

    /// The gate thread: blocking hand-overs when a backend was full, the
    /// oldest-held gauge, the status line, and the end.
    fn run(&self) {
        let mut last_summary = Instant::now();
        let mut inner = self.lock();
        loop {
            if inner.dead {
                return;
            }
            let (acked, replayed) = (inner.acked, inner.replayed);
            if let Some(h) = inner.gate.release(acked, replayed) {
                let (needs, since, open) = (h.needs, h.since, inner.gate.is_open());
                inner.sending = true;
                drop(inner);
                self.metrics.outputs_held_dec();
                let sent = self.outlet.send(h.out);
                inner = self.lock();
                inner.sending = false;
                if sent.is_err() {
                    // The backend is gone (the process is ending).
                    inner.dead = true;
                    return;
                }
                self.released(&inner, needs, since, open);
                // Whatever queued behind it goes the quick way if it can.
                self.release_ready(&mut inner);
                continue;
            }
            self.metrics.set_oldest_held(inner.gate.oldest_age());
            if inner.closed {
                // Done once nothing is held, or what is held can never be
                // acknowledged (the link ended) and no won claim opened
                // the gate.
                let c = self.link().snapshot();
                let link_over = c.failure.is_some() || c.closed;
                if inner.gate.is_empty() || (link_over && inner.gate.waiting_for().is_some()) {
                    return;
                }
            }
            if last_summary.elapsed() >= SUMMARY_EVERY {
                last_summary = Instant::now();
                tracing::info!("primary: {}", self.metrics.summary());
            }
            inner = self
                .wake
                .wait_timeout(inner, stop::SLICE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::Doorbell;
    use crate::serial_backend::SerialPort;
    use crate::timeline::world::World;
    use crate::timeline::Output;

    type Released = std::sync::mpsc::Receiver<(u64, Vec<u8>)>;

    /// Outputs for the tests, addressed by a real (detached) world, and a
    /// receiver that shows what was released, in order.
    fn outputs(n: u8) -> (Vec<Outgoing>, World, Released) {
        let (port, _tx, rx) = SerialPort::detached();
        let mut world = World::new(Doorbell::new(), port, None);
        let outs = (0..n)
            .map(|i| world.address(Output::Serial(vec![i])).unwrap())
            .collect();
        (outs, world, rx)
    }

    fn held(needs: u64, out: Outgoing) -> Held {
        Held {
            needs,
            verify_at: None,
            out,
            since: Instant::now(),
        }
    }

    fn verified(needs: u64, exit: u64, out: Outgoing) -> Held {
        Held {
            verify_at: Some(exit),
            ..held(needs, out)
        }
    }

    #[test]
    fn a_verified_output_waits_for_the_ack_and_the_backups_replay() {
        let (outs, _w, _rx) = outputs(3);
        let mut gate = Gate::new();
        let mut outs = outs.into_iter();
        // (needs, exit): two outputs at exit 7, one at exit 12.
        gate.hold(verified(5, 7, outs.next().unwrap()));
        gate.hold(verified(6, 7, outs.next().unwrap()));
        gate.hold(verified(9, 12, outs.next().unwrap()));
        // Acknowledged but not replayed: nothing leaves.
        assert!(gate.release(100, 6).is_none());
        // Replayed but not acknowledged: nothing leaves either.
        assert!(gate.release(4, 100).is_none());
        // Both for the first, the ack only for the second.
        assert_eq!(gate.release(5, 7).map(|h| h.needs), Some(5));
        assert!(gate.release(5, 7).is_none());
        assert_eq!(gate.release(6, 7).map(|h| h.needs), Some(6));
        // The third is acknowledged; its exit is not replayed yet.
        assert!(gate.release(9, 11).is_none());
        assert_eq!(gate.release(9, 12).map(|h| h.verify_at), Some(Some(12)));
        assert!(gate.is_empty());
    }

    #[test]
    fn outputs_leave_in_order_in_verified_mode_too() {
        let (outs, _w, _rx) = outputs(2);
        let mut gate = Gate::new();
        let mut outs = outs.into_iter();
        gate.hold(verified(5, 20, outs.next().unwrap()));
        // Produced later, yet "replayed" already: it still waits its turn.
        gate.hold(held(5, outs.next().unwrap()));
        assert!(gate.release(100, 19).is_none());
        assert_eq!(gate.len(), 2);
        assert!(gate.release(100, 20).is_some());
        assert!(gate.release(100, 20).is_some());
    }

    #[test]
    fn a_pairing_forgets_what_was_produced_alone() {
        let (outs, _w, _rx) = outputs(1);
        let mut gate = Gate::new();
        gate.hold(verified(5, 20, outs.into_iter().next().unwrap()));
        gate.close();
        assert!(gate.release(0, 0).is_some());
    }

    #[test]
    fn nothing_leaves_before_its_records_are_acknowledged() {
        let (outs, _w, _rx) = outputs(3);
        let mut gate = Gate::new();
        for (needs, out) in [5, 5, 9].into_iter().zip(outs) {
            gate.hold(held(needs, out));
        }
        assert!(gate.release(0, 0).is_none());
        assert!(gate.release(4, 0).is_none());
        assert_eq!(gate.waiting_for(), Some(5));
        assert_eq!(gate.release(5, 0).map(|h| h.needs), Some(5));
        assert_eq!(gate.release(5, 0).map(|h| h.needs), Some(5));
        assert!(gate.release(8, 0).is_none());
        assert_eq!(gate.len(), 1);
        assert_eq!(gate.release(9, 0).map(|h| h.needs), Some(9));
        assert!(gate.is_empty());
        assert_eq!(gate.waiting_for(), None);
    }

    #[test]
    fn outputs_leave_in_order_even_when_later_ones_are_covered() {
        let (outs, world, rx) = outputs(2);
        let outlet = world.outlet().unwrap();
        let mut gate = Gate::new();
        let mut outs = outs.into_iter();
        gate.hold(held(10, outs.next().unwrap()));
        gate.hold(held(10, outs.next().unwrap()));
        // Acks beyond both release both, oldest first.
        while let Some(h) = gate.release(100, 0) {
            outlet.send(h.out).unwrap();
        }
        assert_eq!(rx.try_recv().unwrap().1, vec![0]);
        assert_eq!(rx.try_recv().unwrap().1, vec![1]);
    }

    #[test]
    fn an_open_gate_releases_everything_at_once() {
        let (outs, _w, _rx) = outputs(2);
        let mut gate = Gate::new();
        for out in outs {
            gate.hold(held(u64::MAX, out));
        }
        assert!(gate.release(0, 0).is_none());
        gate.open();
        assert_eq!(gate.waiting_for(), None);
        assert!(gate.release(0, 0).is_some());
        assert!(gate.release(0, 0).is_some());
        assert!(gate.release(0, 0).is_none());
    }
}
