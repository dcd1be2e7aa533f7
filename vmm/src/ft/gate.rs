//! The output gate: the Output Rule as a small state machine. An output
//! produced when `needs` records existed may leave only once the backup has
//! acknowledged all of them; outputs leave in the order they were produced.
//! Once the pair is gone and we won the arbiter, nothing waits any more.
//!
//! The gate holds outputs already addressed by their backend
//! ([`Outgoing`]), so it knows nothing about devices. The thread that
//! drives it ([`super::primary`]) only moves outputs in and out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::timeline::world::Outgoing;

/// One held output.
#[derive(Debug)]
pub struct Held {
    /// Records that existed when it was produced.
    pub needs: u64,
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
        }
    }

    /// The next output that may leave, given `acked` acknowledged records.
    pub fn release(&mut self, acked: u64) -> Option<Held> {
        match self.held.front() {
            Some(h) if self.open || acked >= h.needs => self.held.pop_front(),
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
            out,
            since: Instant::now(),
        }
    }

    #[test]
    fn nothing_leaves_before_its_records_are_acknowledged() {
        let (outs, _w, _rx) = outputs(3);
        let mut gate = Gate::new();
        for (needs, out) in [5, 5, 9].into_iter().zip(outs) {
            gate.hold(held(needs, out));
        }
        assert!(gate.release(0).is_none());
        assert!(gate.release(4).is_none());
        assert_eq!(gate.waiting_for(), Some(5));
        assert_eq!(gate.release(5).map(|h| h.needs), Some(5));
        assert_eq!(gate.release(5).map(|h| h.needs), Some(5));
        assert!(gate.release(8).is_none());
        assert_eq!(gate.len(), 1);
        assert_eq!(gate.release(9).map(|h| h.needs), Some(9));
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
        while let Some(h) = gate.release(100) {
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
        assert!(gate.release(0).is_none());
        gate.open();
        assert_eq!(gate.waiting_for(), None);
        assert!(gate.release(0).is_some());
        assert!(gate.release(0).is_some());
        assert!(gate.release(0).is_none());
    }
}
