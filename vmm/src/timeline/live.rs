//! The solo timeline: every answer comes from the real world, nothing is
//! logged.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Demand, Error, Input, Position, StateDigest, Timeline};

/// The host side of COM1 as the vCPU thread sees it: bounded channels to and
/// from the serial backend's threads. Bounded, so that a full receive FIFO
/// pushes back on the client instead of dropping bytes.
pub struct SerialLink {
    pub input: Receiver<Vec<u8>>,
    pub output: SyncSender<Vec<u8>>,
}

/// Timer state shared by every timeline that takes time from the world.
#[derive(Debug, Default)]
pub struct TickClock {
    next_tick: Option<Instant>,
}

impl TickClock {
    /// Returns true if a tick is due at `now`, and schedules the next one.
    /// Ticks missed while the guest ran without exits are coalesced into one,
    /// as lost ticks are on real hardware.
    pub fn due(&mut self, period_ns: Option<u64>, now: Instant) -> bool {
        let Some(period) = period_ns.map(Duration::from_nanos) else {
            self.next_tick = None;
            return false;
        };
        let next = *self.next_tick.get_or_insert(now + period);
        if now < next {
            return false;
        }
        let mut following = next + period;
        if following <= now {
            following = now + period;
        }
        self.next_tick = Some(following);
        true
    }

    /// When the next tick is due, if a timer runs.
    pub fn deadline(&self) -> Option<Instant> {
        self.next_tick
    }
}

/// Host input waiting for room in the guest's FIFO, fed from the backend.
pub struct InputQueue {
    link: Receiver<Vec<u8>>,
    pending: VecDeque<u8>,
    closed: bool,
}

impl InputQueue {
    pub fn new(link: Receiver<Vec<u8>>) -> Self {
        InputQueue {
            link,
            pending: VecDeque::new(),
            closed: false,
        }
    }

    /// Takes up to `room` bytes without blocking. Reads more from the
    /// backend only when what is pending would not fill the room, so the
    /// backlog stays bounded and the channel back-pressures the client.
    pub fn take(&mut self, room: usize) -> Option<Vec<u8>> {
        while self.pending.len() < room && !self.closed {
            match self.link.try_recv() {
                Ok(chunk) => self.pending.extend(chunk),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
        let n = room.min(self.pending.len());
        (n > 0).then(|| self.pending.drain(..n).collect())
    }

    /// Blocks until input is pending or `deadline` passes. Returns false if
    /// the input is closed and nothing is pending (so waiting is pointless).
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        if !self.pending.is_empty() {
            return true;
        }
        if self.closed {
            if let Some(d) = deadline {
                std::thread::sleep(d.saturating_duration_since(Instant::now()));
                return true;
            }
            return false;
        }
        let got = match deadline {
            Some(d) => self
                .link
                .recv_timeout(d.saturating_duration_since(Instant::now())),
            None => self.link.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(chunk) => self.pending.extend(chunk),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                return deadline.is_some();
            }
        }
        true
    }
}

/// Reads entropy from the kernel.
pub fn host_entropy() -> Result<u64, Error> {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(Error::Entropy(std::io::Error::last_os_error()));
    }
    Ok(u64::from_le_bytes(buf))
}

/// Seconds since the Unix epoch from the host's wall clock.
pub fn host_wall_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Fills `out` from the world: a due tick and whatever input fits, blocking
/// first if the guest is idle. Shared by every timeline that runs live.
pub fn poll_world(
    ticks: &mut TickClock,
    input: &mut InputQueue,
    demand: &Demand,
    out: &mut Vec<Input>,
) -> Result<(), Error> {
    loop {
        let now = Instant::now();
        if ticks.due(demand.timer_period_ns, now) {
            out.push(Input::TimerTick);
        }
        if let Some(bytes) = input.take(demand.serial_room) {
            out.push(Input::Serial(bytes));
        }
        if !demand.idle || !out.is_empty() {
            return Ok(());
        }
        if !input.wait(ticks.deadline()) {
            return Err(Error::Deadlock);
        }
    }
}

/// The solo timeline.
pub struct Live {
    boot: Instant,
    ticks: TickClock,
    input: InputQueue,
    output: SyncSender<Vec<u8>>,
}

impl Live {
    pub fn new(serial: SerialLink) -> Self {
        Live {
            boot: Instant::now(),
            ticks: TickClock::default(),
            input: InputQueue::new(serial.input),
            output: serial.output,
        }
    }
}

impl Timeline for Live {
    fn clock_ns(&mut self, _at: &Position) -> Result<u64, Error> {
        Ok(self.boot.elapsed().as_nanos() as u64)
    }

    fn wall_clock(&mut self, _at: &Position) -> Result<i64, Error> {
        Ok(host_wall_clock())
    }

    fn entropy(&mut self, _at: &Position) -> Result<u64, Error> {
        host_entropy()
    }

    fn inputs(
        &mut self,
        _at: &Position,
        demand: &Demand,
        out: &mut Vec<Input>,
    ) -> Result<(), Error> {
        poll_world(&mut self.ticks, &mut self.input, demand, out)
    }

    fn interrupt(&mut self, _at: &Position, _vector: u8) -> Result<(), Error> {
        Ok(())
    }

    fn wants_digest(&mut self, _at: &Position, _requested: bool) -> bool {
        false
    }

    fn digest(&mut self, _at: &Position, _digest: &StateDigest) -> Result<(), Error> {
        Ok(())
    }

    fn serial_output(&mut self, _at: &Position, bytes: Vec<u8>) -> Result<(), Error> {
        self.output.send(bytes).map_err(|_| Error::OutputClosed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn tick_clock_fires_once_per_period_and_coalesces() {
        let mut t = TickClock::default();
        let start = Instant::now();
        let period = Some(1_000_000);
        assert!(!t.due(period, start));
        assert!(t.due(period, start + Duration::from_millis(1)));
        assert!(!t.due(period, start + Duration::from_micros(1500)));
        // Far behind: one tick, not ten.
        assert!(t.due(period, start + Duration::from_millis(12)));
        assert!(!t.due(period, start + Duration::from_micros(12500)));
        assert!(!t.due(None, start + Duration::from_millis(20)));
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn input_queue_never_exceeds_room_and_loses_nothing() {
        let (tx, rx) = sync_channel(4);
        let mut q = InputQueue::new(rx);
        tx.send(b"hello".to_vec()).unwrap();
        tx.send(b" world".to_vec()).unwrap();
        assert_eq!(q.take(3).unwrap(), b"hel");
        assert_eq!(q.take(0), None);
        assert_eq!(q.take(100).unwrap(), b"lo world");
        assert_eq!(q.take(100), None);
        drop(tx);
        assert!(!q.wait(None));
    }

    #[test]
    fn idle_poll_blocks_until_input() {
        let (tx, rx) = sync_channel(4);
        let (otx, _orx) = sync_channel(4);
        let mut live = Live::new(SerialLink {
            input: rx,
            output: otx,
        });
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(b"x".to_vec()).unwrap();
        });
        let mut out = Vec::new();
        let demand = Demand {
            timer_period_ns: None,
            serial_room: 16,
            idle: true,
        };
        live.inputs(&Position::default(), &demand, &mut out)
            .unwrap();
        assert_eq!(out, vec![Input::Serial(b"x".to_vec())]);
    }

    #[test]
    fn idle_with_no_source_is_a_deadlock_not_a_hang() {
        let (tx, rx) = sync_channel::<Vec<u8>>(1);
        drop(tx);
        let (otx, _orx) = sync_channel(4);
        let mut live = Live::new(SerialLink {
            input: rx,
            output: otx,
        });
        let demand = Demand {
            idle: true,
            ..Demand::default()
        };
        let mut out = Vec::new();
        assert!(matches!(
            live.inputs(&Position::default(), &demand, &mut out),
            Err(Error::Deadlock)
        ));
    }
}
