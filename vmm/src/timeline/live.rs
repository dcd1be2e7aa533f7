//! The world as a timeline sees it (clock, wall clock, entropy, timer ticks,
//! serial input and output), and the solo timeline, which takes every answer
//! from it and logs nothing.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Demand, Ending, Error, Input, Position, StateDigest, Timeline};
use crate::serial_backend::{Chunk, SerialLink};

/// Longest single blocking wait while idle, so that a stop request is seen
/// even by a guest that programmed no timer.
const MAX_IDLE_WAIT: Duration = Duration::from_millis(20);

/// Set by SIGINT/SIGTERM; the vCPU loop ends the run at the next exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM end the run cleanly at the next exit (logs and
/// transcripts flushed) instead of killing the process.
pub fn install_stop_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; sigaction with a zeroed mask and no flags
        // beyond the handler is a valid configuration.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as usize;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// True once a stop signal arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Timer state for timelines that take time from the world.
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
    link: Receiver<Chunk>,
    /// Pending bytes, in order, each run tagged with its connection.
    pending: VecDeque<(u64, VecDeque<u8>)>,
    pending_len: usize,
    closed: bool,
    /// The connection of the last byte handed to the guest: its output is
    /// presumed to answer that connection.
    last_conn: u64,
}

impl InputQueue {
    pub fn new(link: Receiver<Chunk>) -> Self {
        InputQueue {
            link,
            pending: VecDeque::new(),
            pending_len: 0,
            closed: false,
            last_conn: 0,
        }
    }

    fn push(&mut self, (conn, bytes): Chunk) {
        self.pending_len += bytes.len();
        match self.pending.back_mut() {
            Some((c, run)) if *c == conn => run.extend(bytes),
            _ => self.pending.push_back((conn, bytes.into())),
        }
    }

    /// The next input for the guest, without blocking: up to `room` bytes
    /// of one connection, or a hang-up when the bytes that come next are
    /// from another connection than the last ones (offered only once the
    /// guest has read everything before and waits, `can_hang_up`, so that
    /// it can tell the two clients' bytes apart and has finished answering
    /// the first). Reads more from the backend only when
    /// what is pending would not fill the room, so the backlog stays
    /// bounded and the channel back-pressures the client.
    pub fn take(&mut self, room: usize, can_hang_up: bool) -> Option<Input> {
        while self.pending_len < room && !self.closed {
            match self.link.try_recv() {
                Ok(chunk) => self.push(chunk),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.closed = true,
            }
        }
        let conn = self.pending.front()?.0;
        if self.last_conn != 0 && conn != self.last_conn {
            if !can_hang_up {
                return None;
            }
            self.last_conn = conn;
            return Some(Input::SerialHangup);
        }
        let mut out = Vec::new();
        while out.len() < room {
            let Some((c, run)) = self.pending.front_mut() else {
                break;
            };
            if *c != conn {
                break;
            }
            let n = (room - out.len()).min(run.len());
            out.extend(run.drain(..n));
            if run.is_empty() {
                self.pending.pop_front();
            }
        }
        self.last_conn = conn;
        self.pending_len -= out.len();
        (!out.is_empty()).then_some(Input::Serial(out))
    }

    /// After a failover the guest may hold part of a request from a client
    /// of the dead primary: the first bytes from any client come after a
    /// hang-up.
    pub fn expect_new_client(&mut self) {
        self.last_conn = u64::MAX;
    }

    /// The connection whose input the guest read last (0: none yet).
    pub fn last_conn(&self) -> u64 {
        self.last_conn
    }

    /// Blocks until input is pending or `deadline` passes. Returns false if
    /// the input is closed, nothing is pending and there is no deadline (so
    /// waiting is pointless).
    pub fn wait(&mut self, deadline: Option<Instant>) -> bool {
        if self.pending_len > 0 {
            return true;
        }
        if self.closed {
            if let Some(d) = deadline {
                std::thread::sleep(d.saturating_duration_since(Instant::now()));
                return true;
            }
            return false;
        }
        let limit = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(MAX_IDLE_WAIT)
            .min(MAX_IDLE_WAIT);
        match self.link.recv_timeout(limit) {
            Ok(chunk) => self.push(chunk),
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

/// The output half of a [`SerialLink`].
struct SerialOutput {
    output: std::sync::mpsc::SyncSender<Chunk>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// Everything a live timeline takes from or gives to the outside world.
/// The solo, record and (after go-live) backup timelines share it.
pub struct World {
    boot: Instant,
    ticks: TickClock,
    input: InputQueue,
    output: Option<SerialOutput>,
    transcript: Option<BufWriter<File>>,
}

impl World {
    /// `transcript`, if given, receives a copy of all serial output.
    pub fn new(serial: SerialLink, transcript: Option<File>) -> Self {
        let SerialLink {
            input,
            output,
            writer,
        } = serial;
        World {
            boot: Instant::now(),
            ticks: TickClock::default(),
            input: InputQueue::new(input),
            output: Some(SerialOutput { output, writer }),
            transcript: transcript.map(BufWriter::new),
        }
    }

    pub fn clock_ns(&self) -> u64 {
        self.boot.elapsed().as_nanos() as u64
    }

    /// Makes the monotonic clock read `ns` now and go on from there (a
    /// backup going live continues the primary's clock).
    pub fn continue_clock_from(&mut self, ns: u64) {
        let now = Instant::now();
        self.boot = now.checked_sub(Duration::from_nanos(ns)).unwrap_or(now);
    }

    pub fn wall_clock(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    /// Fills `out` with a due tick and whatever input fits, blocking first
    /// if the guest is idle. Returns with nothing if a stop was requested or
    /// `wake` says something else needs the vCPU thread.
    pub fn poll(
        &mut self,
        demand: &Demand,
        out: &mut Vec<Input>,
        wake: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        loop {
            let now = Instant::now();
            if self.ticks.due(demand.timer_period_ns, now) {
                out.push(Input::TimerTick);
            }
            // The line changes hands only while the guest waits with
            // nothing unread: by then it has finished answering the last
            // client, so no reply is split between two clients.
            let can_hang_up = demand.serial_rx_empty && demand.idle;
            if let Some(input) = self.input.take(demand.serial_room, can_hang_up) {
                out.push(input);
            }
            if !demand.idle || !out.is_empty() || stop_requested() || wake() {
                return Ok(());
            }
            if !self.input.wait(self.ticks.deadline()) {
                return Err(Error::Deadlock);
            }
        }
    }

    /// Sends serial output to the world (and the transcript), addressed to
    /// the connection whose input the guest read last.
    pub fn output(&mut self, bytes: Vec<u8>) -> Result<(), Error> {
        self.write_transcript(&bytes)?;
        let chunk = (self.output_tag(), bytes);
        match self.output.as_ref() {
            Some(o) => o.output.send(chunk).map_err(|_| Error::OutputClosed),
            None => Err(Error::OutputClosed),
        }
    }

    /// The connection that output produced now is meant for.
    pub fn output_tag(&self) -> u64 {
        self.input.last_conn()
    }

    /// See [`InputQueue::expect_new_client`].
    pub fn expect_new_client(&mut self) {
        self.input.expect_new_client();
    }

    /// A sender for serial output to the world, for a thread that releases
    /// held output later (the Output Rule).
    pub fn output_sender(&self) -> Option<std::sync::mpsc::SyncSender<Chunk>> {
        self.output.as_ref().map(|o| o.output.clone())
    }

    /// Writes serial output to the transcript only, at once: the transcript
    /// shows what the guest produced when it produced it, even while the
    /// Output Rule still holds it back from the client.
    pub fn write_transcript(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if let Some(t) = self.transcript.as_mut() {
            t.write_all(bytes)
                .and_then(|_| t.flush())
                .map_err(Error::Transcript)?;
        }
        Ok(())
    }

    /// Flushes the transcript and waits until all output was written.
    pub fn close(&mut self) -> Result<(), Error> {
        if let Some(t) = self.transcript.as_mut() {
            t.flush().map_err(Error::Transcript)?;
        }
        if let Some(o) = self.output.take() {
            drop(o.output);
            if let Some(w) = o.writer {
                let _ = w.join();
            }
        }
        Ok(())
    }
}

/// The solo timeline.
pub struct Live {
    world: World,
}

impl Live {
    pub fn new(world: World) -> Self {
        Live { world }
    }
}

impl Timeline for Live {
    fn clock_ns(&mut self, _at: &Position) -> Result<u64, Error> {
        Ok(self.world.clock_ns())
    }

    fn wall_clock(&mut self, _at: &Position) -> Result<i64, Error> {
        Ok(self.world.wall_clock())
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
        self.world.poll(demand, out, &|| false)
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
        self.world.output(bytes)
    }

    fn stop_here(&mut self, _at: &Position) -> Result<bool, Error> {
        Ok(stop_requested())
    }

    fn finish(&mut self, _at: &Position, _: Ending, _: &StateDigest) -> Result<(), Error> {
        self.world.close()
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
        tx.send((1, b"hello".to_vec())).unwrap();
        tx.send((2, b" world".to_vec())).unwrap();
        let bytes = |b: &[u8]| Some(Input::Serial(b.to_vec()));
        assert_eq!(q.take(3, true), bytes(b"hel"));
        assert_eq!(q.last_conn(), 1);
        assert_eq!(q.take(0, true), None);
        // The first client's bytes only, then (once the guest has read
        // them) a hang-up, then the second client's.
        assert_eq!(q.take(100, false), bytes(b"lo"));
        assert_eq!(q.take(100, false), None);
        assert_eq!(q.take(100, true), Some(Input::SerialHangup));
        assert_eq!(q.take(100, false), bytes(b" world"));
        assert_eq!(q.last_conn(), 2);
        assert_eq!(q.take(100, true), None);
        drop(tx);
        assert!(!q.wait(None));
    }

    #[test]
    fn idle_poll_blocks_until_input() {
        let (link, tx, _out) = SerialLink::detached();
        let mut live = Live::new(World::new(link, None));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send((1, b"x".to_vec())).unwrap();
        });
        let mut out = Vec::new();
        let demand = Demand {
            timer_period_ns: None,
            serial_room: 16,
            serial_rx_empty: true,
            idle: true,
        };
        live.inputs(&Position::default(), &demand, &mut out)
            .unwrap();
        assert_eq!(out, vec![Input::Serial(b"x".to_vec())]);
    }

    #[test]
    fn idle_with_no_source_is_a_deadlock_not_a_hang() {
        let (link, tx, _out) = SerialLink::detached();
        drop(tx);
        let mut live = Live::new(World::new(link, None));
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

    #[test]
    fn output_reaches_link_and_transcript() {
        let (link, _tx, out_rx) = SerialLink::detached();
        let path = std::env::temp_dir().join(format!("duet-transcript-{}", std::process::id()));
        let mut world = World::new(link, Some(File::create(&path).unwrap()));
        world.output(b"abc".to_vec()).unwrap();
        assert_eq!(out_rx.recv().unwrap(), (0, b"abc".to_vec()));
        world.close().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        std::fs::remove_file(&path).ok();
    }
}
