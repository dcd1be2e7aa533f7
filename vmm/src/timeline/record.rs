//! The recording timeline: answers from the world, like the solo one, and
//! appends every answer to a log at the position it was given.
//!
//! Where the log goes is a [`LogSink`]: a file for `duet record`, the log
//! channel to the backup for a primary. The sink also decides when output
//! may leave (a primary holds it until the backup has acknowledged the log
//! up to it: the Output Rule).

use std::io::Write;
use std::time::{Duration, Instant};

use logchannel::{Event, LogWriter};

use super::world::{host_entropy, World};
use super::{Demand, Ending, Error, Input, Output, Position, StateDigest, Timeline};
use crate::stop;
use crate::vcpu::MachineAccess;

/// Tag of the digest taken when the run ends.
pub const FINAL_DIGEST_TAG: u64 = u64::MAX - 1;
/// Tag of a periodic digest (not requested by the guest).
pub const PERIODIC_DIGEST_TAG: u64 = u64::MAX;

/// Where a recording's events go.
pub trait LogSink {
    /// Appends one event at `pos`.
    fn append(&mut self, pos: &Position, event: Event) -> Result<(), Error>;
    /// An output produced at `pos`; the sink releases it to `world` when
    /// the Output Rule allows.
    fn output(&mut self, pos: &Position, output: Output, world: &mut World) -> Result<(), Error>;
    /// Sends or writes what was appended so far.
    fn flush(&mut self) -> Result<(), Error>;
    /// Every event at exits up to `exit` has been appended: a replicating
    /// sink may tell the backup it can execute that far (a horizon).
    fn complete_through(&mut self, _exit: u64) -> Result<(), Error> {
        Ok(())
    }
    /// True when the sink needs the vCPU thread (its channel failed), so
    /// that an idle wait returns early.
    fn needs_attention(&self) -> bool {
        false
    }
    /// Deals with whatever [`LogSink::needs_attention`] flagged.
    fn attend(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// The run ended: flush, and wait until what was appended is safe.
    fn finish(&mut self) -> Result<(), Error> {
        self.flush()
    }
    /// False while nobody receives the log (a primary running alone):
    /// periodic digests are then not worth taking.
    fn is_logging(&self) -> bool {
        true
    }
    /// True once when the sink wants a state digest logged now, whatever
    /// the period (a backup just joined: the first full digest checks what
    /// it was given).
    fn take_digest_request(&mut self) -> bool {
        false
    }
    /// The guest waited idle for `waited` (for an input or an interrupt):
    /// a replicating sink does not count that time as execution the
    /// backup must catch up on.
    fn idled(&mut self, _waited: Duration) {}
    /// See [`Timeline::wants_machine`].
    fn wants_machine(&self) -> bool {
        false
    }
    /// See [`Timeline::attend_machine`]; `world` gives the clock.
    fn attend_machine(
        &mut self,
        _machine: &mut dyn MachineAccess,
        _world: &mut World,
    ) -> Result<(), Error> {
        Ok(())
    }
}

/// A log file: output is released at once (nobody replicates it).
pub struct FileSink<W: Write> {
    writer: LogWriter<W>,
}

impl<W: Write> FileSink<W> {
    pub fn new(writer: LogWriter<W>) -> Self {
        FileSink { writer }
    }

    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }
}

impl<W: Write> LogSink for FileSink<W> {
    fn append(&mut self, pos: &Position, event: Event) -> Result<(), Error> {
        self.writer.append(*pos, event)?;
        Ok(())
    }

    fn output(&mut self, _pos: &Position, output: Output, world: &mut World) -> Result<(), Error> {
        world.output(output)
    }

    fn flush(&mut self) -> Result<(), Error> {
        Ok(self.writer.flush()?)
    }
}

/// The recording timeline.
pub struct Record<S: LogSink> {
    world: World,
    sink: S,
    digest_every: Option<Duration>,
    next_digest: Instant,
}

impl<S: LogSink> Record<S> {
    /// `digest_every`: how often to log a periodic state digest (None: only
    /// when the guest asks and at the end).
    pub fn new(world: World, sink: S, digest_every: Option<Duration>) -> Self {
        Record {
            world,
            sink,
            next_digest: Instant::now() + digest_every.unwrap_or_default(),
            digest_every,
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }
}

impl<S: LogSink> Timeline for Record<S> {
    fn clock_ns(&mut self, at: &Position) -> Result<u64, Error> {
        let ns = self.world.clock_ns();
        self.sink.append(at, Event::Clock { ns })?;
        Ok(ns)
    }

    fn wall_clock(&mut self, at: &Position) -> Result<i64, Error> {
        let secs = self.world.wall_clock();
        self.sink.append(at, Event::WallClock { secs })?;
        Ok(secs)
    }

    fn entropy(&mut self, at: &Position) -> Result<u64, Error> {
        let value = host_entropy()?;
        self.sink.append(at, Event::Entropy { value })?;
        Ok(value)
    }

    fn inputs(
        &mut self,
        at: &Position,
        demand: &Demand,
        out: &mut Vec<Input>,
    ) -> Result<(), Error> {
        let first = out.len();
        let waiting_since = demand.idle.then(Instant::now);
        if demand.idle {
            // The guest may wait a long time: everything so far goes out now.
            self.sink.flush()?;
        }
        loop {
            let sink = &self.sink;
            self.world.poll(demand, out, &|| {
                sink.needs_attention() || sink.wants_machine()
            })?;
            if self.sink.wants_machine() || !self.sink.needs_attention() {
                // The vCPU loop serves a machine request between exits.
                break;
            }
            self.sink.attend()?;
            if !demand.idle || out.len() > first || stop::requested() {
                break;
            }
        }
        if let Some(since) = waiting_since {
            self.sink.idled(since.elapsed());
        }
        for input in &out[first..] {
            self.sink.append(at, input.to_event())?;
        }
        Ok(())
    }

    fn interrupt(&mut self, at: &Position, vector: u8) -> Result<(), Error> {
        self.sink.append(at, Event::Interrupt { vector })
    }

    fn wants_digest(&mut self, _at: &Position, requested: bool) -> bool {
        if !self.sink.is_logging() {
            return false;
        }
        if self.sink.take_digest_request() {
            return true;
        }
        let Some(every) = self.digest_every else {
            return requested;
        };
        let now = Instant::now();
        if now >= self.next_digest {
            self.next_digest = now + every;
            return true;
        }
        requested
    }

    fn digest(&mut self, at: &Position, d: &StateDigest) -> Result<(), Error> {
        self.sink.append(
            at,
            Event::Digest {
                regs_crc: d.regs_crc,
                mem_crc: d.mem_crc,
                tag: d.tag,
            },
        )
    }

    fn output(&mut self, at: &Position, output: Output) -> Result<(), Error> {
        self.sink.output(at, output, &mut self.world)
    }

    fn before_run(&mut self, next_exit: u64) -> Result<(), Error> {
        self.sink.complete_through(next_exit - 1)
    }

    fn wants_machine(&self) -> bool {
        self.sink.wants_machine()
    }

    fn attend_machine(&mut self, machine: &mut dyn MachineAccess) -> Result<(), Error> {
        self.sink.attend_machine(machine, &mut self.world)
    }

    fn stop_here(&mut self, _at: &Position) -> Result<bool, Error> {
        Ok(stop::requested())
    }

    fn finish(&mut self, at: &Position, ending: Ending, d: &StateDigest) -> Result<(), Error> {
        // The ending first, then the final state: replay learns that the run
        // ends here before it would take the digest for a periodic one.
        let event = match ending {
            Ending::PowerOff(code) => Event::PowerOff { code },
            Ending::Stopped => Event::Stop,
        };
        self.sink.append(at, event)?;
        self.digest(at, d)?;
        self.sink.finish()?;
        self.world.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::Doorbell;
    use crate::serial_backend::SerialPort;
    use crate::timeline::replay::{LoadedLog, Replay};
    use crate::timeline::{SerialDemand, SerialInput};
    use logchannel::{Header, LogReader};

    fn at(exit: u64) -> Position {
        Position {
            exit,
            rip: 0x2000 + exit,
            regs_crc: exit as u32,
            kind: 2,
        }
    }

    type Recorded = Record<FileSink<Vec<u8>>>;
    type Chunks = (
        std::sync::mpsc::SyncSender<(u64, Vec<u8>)>,
        std::sync::mpsc::Receiver<(u64, Vec<u8>)>,
    );

    fn recorder() -> (Recorded, Chunks) {
        let (port, tx, rx) = SerialPort::detached();
        let world = World::new(Doorbell::new(), port, None);
        let header = Header::new([1; 32], 1 << 21, "test");
        let writer = LogWriter::new(Vec::new(), &header).unwrap();
        (Record::new(world, FileSink::new(writer), None), (tx, rx))
    }

    fn records(r: Recorded) -> Vec<logchannel::Record> {
        let bytes = r.sink.writer.into_inner();
        let (mut reader, _) = LogReader::open(&bytes[..]).unwrap();
        std::iter::from_fn(|| reader.next_record().unwrap()).collect()
    }

    #[test]
    fn every_answer_is_logged_at_its_position_and_replays() {
        let (mut r, (tx, out_rx)) = recorder();
        let clock = r.clock_ns(&at(1)).unwrap();
        let entropy = r.entropy(&at(1)).unwrap();
        let wall = r.wall_clock(&at(2)).unwrap();
        tx.send((1, b"xyz".to_vec())).unwrap();
        let demand = Demand {
            serial: SerialDemand {
                room: 2,
                rx_empty: true,
            },
            ..Demand::default()
        };
        let mut inputs = Vec::new();
        r.inputs(&at(3), &demand, &mut inputs).unwrap();
        assert_eq!(inputs, [Input::Serial(SerialInput::Bytes(b"xy".to_vec()))]);
        r.interrupt(&at(3), 0x24).unwrap();
        r.output(&at(4), Output::Serial(b"ok".to_vec())).unwrap();
        // A file recording releases output at once.
        assert_eq!(out_rx.try_recv().unwrap(), (1, b"ok".to_vec()));
        let d = StateDigest {
            regs_crc: 1,
            mem_crc: 2,
            tag: 9,
        };
        r.digest(&at(4), &d).unwrap();
        let end = StateDigest {
            tag: FINAL_DIGEST_TAG,
            ..d
        };
        r.finish(&at(5), Ending::PowerOff(3), &end).unwrap();

        let log = records(r);
        let kinds: Vec<_> = log
            .iter()
            .map(|rec| (rec.seq, rec.pos.exit, rec.event.name()))
            .collect();
        assert_eq!(
            kinds,
            [
                (0, 1, "clock"),
                (1, 1, "entropy"),
                (2, 2, "wall clock"),
                (3, 3, "serial input"),
                (4, 3, "interrupt"),
                (5, 4, "digest"),
                (6, 5, "power off"),
                (7, 5, "digest"),
            ]
        );
        assert_eq!(log[0].pos, at(1));
        assert_eq!(log[0].event, Event::Clock { ns: clock });
        assert_eq!(log[1].event, Event::Entropy { value: entropy });

        // Replaying the log gives the same answers.
        let mut replay = Replay::new(LoadedLog::new(log), Vec::new());
        assert_eq!(replay.clock_ns(&at(1)).unwrap(), clock);
        assert_eq!(replay.entropy(&at(1)).unwrap(), entropy);
        assert_eq!(replay.wall_clock(&at(2)).unwrap(), wall);
        let mut again = Vec::new();
        replay.inputs(&at(3), &demand, &mut again).unwrap();
        assert_eq!(again, inputs);
        replay.interrupt(&at(3), 0x24).unwrap();
        replay.digest(&at(4), &d).unwrap();
        replay.finish(&at(5), Ending::PowerOff(3), &end).unwrap();
    }

    #[test]
    fn periodic_digests_are_asked_for_on_schedule() {
        let (port, _tx, _rx) = SerialPort::detached();
        let world = World::new(Doorbell::new(), port, None);
        let header = Header::new([1; 32], 1 << 21, "test");
        let writer = LogWriter::new(Vec::new(), &header).unwrap();
        let mut r = Record::new(
            world,
            FileSink::new(writer),
            Some(Duration::from_millis(30)),
        );
        assert!(!r.wants_digest(&at(1), false));
        assert!(r.wants_digest(&at(1), true));
        std::thread::sleep(Duration::from_millis(40));
        assert!(r.wants_digest(&at(2), false));
        assert!(!r.wants_digest(&at(3), false));
    }
}
