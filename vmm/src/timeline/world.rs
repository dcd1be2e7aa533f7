//! The world as a timeline sees it: the clocks, entropy, timer ticks, and
//! the device backends (the serial port, and the TAP when the machine has a
//! NIC). The solo, record and
//! (after go-live) backup timelines share it; replay never builds one.
//!
//! The world waits on all of its backends at once through one
//! [`Doorbell`], so an idle guest wakes for whichever input comes first.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Demand, Error, Input, Output};
use crate::doorbell::Doorbell;
use crate::serial_backend::{Chunk, SerialPort, SerialSender};
use crate::stop;
use crate::tap_backend::NetPort;

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

/// An output addressed by its backend when it was produced (a serial
/// chunk knows its client), so that whoever holds it for the Output Rule
/// needs to know nothing about the device.
#[derive(Debug)]
pub struct Outgoing(Addressed);

impl Outgoing {
    /// Appends `next` to this output if both are serial bytes for the same
    /// client, so that a reply written a byte per exit can be held, sent
    /// and written to its client as one; hands `next` back otherwise.
    pub fn gather(&mut self, next: Outgoing) -> Result<(), Outgoing> {
        match (&mut self.0, next.0) {
            (Addressed::Serial((to, bytes)), Addressed::Serial((next_to, more)))
                if *to == next_to =>
            {
                bytes.extend_from_slice(&more);
                Ok(())
            }
            (_, other) => Err(Outgoing(other)),
        }
    }

    /// Serial bytes, which come a byte per exit and so are worth gathering.
    pub fn is_serial(&self) -> bool {
        matches!(self.0, Addressed::Serial(_))
    }
}

#[derive(Debug)]
enum Addressed {
    Serial(Chunk),
    /// A frame needs no address: the TAP is one wire.
    Net(Vec<u8>),
}

/// Where held outputs are released to, from any thread.
#[derive(Clone)]
pub struct Outlet {
    serial: SerialSender,
    /// None when the world has no TAP: frames are lost, as on a NIC with
    /// no cable.
    net: Option<SyncSender<Vec<u8>>>,
}

impl Outlet {
    /// Hands an output to its backend. Blocks while the backend is full
    /// (back-pressure); fails once the backend is gone.
    pub fn send(&self, out: Outgoing) -> Result<(), Error> {
        match out.0 {
            Addressed::Serial(chunk) => self.serial.send(chunk).map_err(|_| Error::OutputClosed),
            Addressed::Net(frame) => match &self.net {
                Some(net) => net.send(frame).map_err(|_| Error::OutputClosed),
                None => Ok(()),
            },
        }
    }
}

/// Why [`Outlet::try_send`] did not hand an output over.
#[derive(Debug)]
pub enum TrySendError {
    /// The backend is full: the output is given back, untouched, so that
    /// its holder can keep it first in line.
    Full(Outgoing),
    /// The backend is gone.
    Closed,
}

impl Outlet {
    /// Like [`Outlet::send`] but never blocks, for threads that must not
    /// wait on a slow client (the log channel's, which also reads
    /// heartbeats).
    pub fn try_send(&self, out: Outgoing) -> Result<(), TrySendError> {
        use std::sync::mpsc::TrySendError as E;
        match out.0 {
            Addressed::Serial(chunk) => self.serial.try_send(chunk).map_err(|e| match e {
                E::Full(chunk) => TrySendError::Full(Outgoing(Addressed::Serial(chunk))),
                E::Disconnected(_) => TrySendError::Closed,
            }),
            Addressed::Net(frame) => match &self.net {
                Some(net) => net.try_send(frame).map_err(|e| match e {
                    E::Full(frame) => TrySendError::Full(Outgoing(Addressed::Net(frame))),
                    E::Disconnected(_) => TrySendError::Closed,
                }),
                None => Ok(()),
            },
        }
    }
}

/// The live world: see the module documentation.
pub struct World {
    boot: Instant,
    ticks: TickClock,
    bell: Doorbell,
    serial: SerialPort,
    net: Option<NetPort>,
    transcript: Option<BufWriter<File>>,
}

impl World {
    /// `bell` is the one every backend rings; `transcript`, if given,
    /// receives a copy of all serial output.
    pub fn new(bell: Doorbell, serial: SerialPort, transcript: Option<File>) -> Self {
        World {
            boot: Instant::now(),
            ticks: TickClock::default(),
            bell,
            serial,
            net: None,
            transcript: transcript.map(BufWriter::new),
        }
    }

    /// Adds the NIC's backend; its reader must ring this world's bell.
    pub fn with_net(mut self, net: NetPort) -> Self {
        self.net = Some(net);
        self
    }

    /// The bell every backend of this world rings (so that another thread
    /// can wake an idle guest's wait too).
    pub fn bell(&self) -> Doorbell {
        self.bell.clone()
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

    /// This world takes over a guest that ran elsewhere (a backup going
    /// live): each backend adjusts (the serial line starts with a hang-up;
    /// the NIC announces the guest's MAC from this host).
    pub fn after_failover(&mut self) {
        self.serial.after_failover();
        self.announce();
    }

    /// The guest runs on this host from now on: the NIC (if any) tells the
    /// network where its MAC is. Called when a live world opens for a guest
    /// that boots here, and by [`World::after_failover`].
    pub fn announce(&mut self) {
        if let Some(net) = self.net.as_mut() {
            net.announce();
        }
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
            let rung = self.bell.count();
            let now = Instant::now();
            if self.ticks.due(demand.timer_period_ns, now) {
                out.push(Input::TimerTick);
            }
            if let Some(input) = self.serial.take(&demand.serial, demand.idle) {
                out.push(Input::Serial(input));
            }
            if let Some(net) = self.net.as_mut() {
                net.take(&demand.net, out);
            }
            if !demand.idle || !out.is_empty() || stop::requested() || wake() {
                return Ok(());
            }
            let deadline = self.ticks.deadline();
            let net_closed = self.net.as_ref().is_none_or(|n| n.input_closed());
            if deadline.is_none() && self.serial.input_closed() && net_closed {
                return Err(Error::Deadlock);
            }
            let limit = deadline
                .map_or(stop::SLICE, |d| d.saturating_duration_since(now))
                .min(stop::SLICE);
            self.bell.wait(rung, limit);
        }
    }

    /// Addresses an output produced now (see [`Outgoing`]) and copies it to
    /// the transcript at once: the transcript shows what the guest produced
    /// when it produced it, even while the Output Rule still holds it.
    pub fn address(&mut self, output: Output) -> Result<Outgoing, Error> {
        if let Some(bytes) = output.serial_bytes() {
            self.write_transcript(bytes)?;
        }
        Ok(Outgoing(match output {
            Output::Serial(bytes) => Addressed::Serial(self.serial.address(bytes)),
            Output::Net(frame) => Addressed::Net(frame),
        }))
    }

    /// Sends an output to the world now (nobody replicates it).
    pub fn output(&mut self, output: Output) -> Result<(), Error> {
        let out = self.address(output)?;
        self.outlet()?.send(out)
    }

    /// Where held outputs are released to, for a thread that releases them
    /// later (the Output Rule).
    pub fn outlet(&self) -> Result<Outlet, Error> {
        Ok(Outlet {
            serial: self.serial.sender().ok_or(Error::OutputClosed)?,
            net: self.net.as_ref().and_then(|n| n.sender()),
        })
    }

    fn write_transcript(&mut self, bytes: &[u8]) -> Result<(), Error> {
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
        self.serial.close();
        if let Some(net) = self.net.as_mut() {
            net.close();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net_config::{NetConfig, DEFAULT_MAC};
    use crate::timeline::{NetDemand, SerialDemand, SerialInput};

    fn world(serial: SerialPort) -> World {
        World::new(Doorbell::new(), serial, None)
    }

    #[test]
    fn only_serial_bytes_for_one_client_are_gathered() {
        let serial = |to: u64, b: &[u8]| Outgoing(Addressed::Serial((to, b.to_vec())));
        let mut reply = serial(3, b"+PO");
        assert!(reply.gather(serial(3, b"NG\r\n")).is_ok());
        // Another client's bytes, or a frame, start an output of their own.
        let other = reply.gather(serial(4, b"x")).unwrap_err();
        assert!(matches!(other.0, Addressed::Serial((4, ref b)) if b == b"x"));
        let frame = reply
            .gather(Outgoing(Addressed::Net(vec![1; 60])))
            .unwrap_err();
        assert!(!frame.is_serial());
        assert!(matches!(reply.0, Addressed::Serial((3, ref b)) if b == b"+PONG\r\n"));
    }

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
    fn idle_poll_blocks_until_a_backend_rings() {
        let bell = Doorbell::new();
        let (port, tx, _out) = SerialPort::detached();
        let mut w = World::new(bell.clone(), port, None);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            tx.send((1, b"x".to_vec())).unwrap();
            bell.ring();
            // Keep the input open until the test is done with it.
            std::thread::sleep(Duration::from_secs(2));
        });
        let demand = Demand {
            serial: SerialDemand {
                room: 16,
                rx_empty: true,
            },
            idle: true,
            ..Demand::default()
        };
        let mut out = Vec::new();
        w.poll(&demand, &mut out, &|| false).unwrap();
        assert_eq!(out, vec![Input::Serial(SerialInput::Bytes(b"x".to_vec()))]);
    }

    #[test]
    fn idle_with_no_source_is_a_deadlock_not_a_hang() {
        let (port, tx, _out) = SerialPort::detached();
        drop(tx);
        let mut w = world(port);
        let demand = Demand {
            idle: true,
            ..Demand::default()
        };
        let mut out = Vec::new();
        assert!(matches!(
            w.poll(&demand, &mut out, &|| false),
            Err(Error::Deadlock)
        ));
    }

    #[test]
    fn output_reaches_the_backend_and_the_transcript() {
        let (port, _tx, out_rx) = SerialPort::detached();
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut w = World::new(Doorbell::new(), port, Some(file.reopen().unwrap()));
        w.output(Output::Serial(b"abc".to_vec())).unwrap();
        assert_eq!(out_rx.recv().unwrap(), (0, b"abc".to_vec()));
        w.close().unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), b"abc");
    }

    #[test]
    fn held_output_keeps_the_client_it_was_produced_for() {
        let (port, tx, out_rx) = SerialPort::detached();
        let mut w = world(port);
        tx.send((3, b"q".to_vec())).unwrap();
        let demand = Demand {
            serial: SerialDemand {
                room: 16,
                rx_empty: true,
            },
            ..Demand::default()
        };
        let mut inputs = Vec::new();
        w.poll(&demand, &mut inputs, &|| false).unwrap();
        let held = w.address(Output::Serial(b"a".to_vec())).unwrap();
        let outlet = w.outlet().unwrap();
        outlet.send(held).unwrap();
        assert_eq!(out_rx.recv().unwrap(), (3, b"a".to_vec()));
    }

    fn net_config() -> NetConfig {
        NetConfig {
            mac: DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: None,
        }
    }

    #[test]
    fn an_idle_guest_wakes_for_a_frame_once_it_has_a_buffer() {
        let bell = Doorbell::new();
        let (serial, _stx, _sout) = SerialPort::detached();
        let (net, ntx, _nout) = NetPort::detached(net_config());
        let mut w = World::new(bell.clone(), serial, None).with_net(net);
        let frame = vec![7u8; 60];
        {
            let (frame, bell) = (frame.clone(), bell.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                ntx.send(frame).unwrap();
                bell.ring();
                std::thread::sleep(Duration::from_secs(2));
            });
        }
        let mut demand = Demand {
            idle: false,
            ..Demand::default()
        };
        let mut out = Vec::new();
        std::thread::sleep(Duration::from_millis(60));
        // No buffer posted: the frame waits.
        w.poll(&demand, &mut out, &|| false).unwrap();
        assert!(out.is_empty());
        demand.net = NetDemand { rx_buffers: 1 };
        demand.idle = true;
        w.poll(&demand, &mut out, &|| false).unwrap();
        assert_eq!(out, vec![Input::Net(frame)]);
    }

    #[test]
    fn frames_leave_through_the_outlet_and_not_the_transcript() {
        let (serial, _stx, _sout) = SerialPort::detached();
        let (net, _ntx, nout) = NetPort::detached(net_config());
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut w = World::new(Doorbell::new(), serial, Some(file.reopen().unwrap())).with_net(net);
        let held = w.address(Output::Net(vec![1; 60])).unwrap();
        w.outlet().unwrap().send(held).unwrap();
        assert_eq!(nout.recv().unwrap(), vec![1; 60]);
        w.after_failover();
        assert_eq!(nout.recv().unwrap()[12..14], [0x08, 0x06]);
        w.close().unwrap();
        assert!(std::fs::read(file.path()).unwrap().is_empty());
        // Without a TAP a frame is lost, not an error.
        let (serial, _stx, _sout) = SerialPort::detached();
        let mut bare = World::new(Doorbell::new(), serial, None);
        bare.output(Output::Net(vec![1; 60])).unwrap();
    }
}
