//! The replaying timeline: every answer comes from the log, and nothing
//! touches the world. Each answer is checked against the position and the
//! kind of event the log has there; at the first mismatch replay stops with
//! the record's sequence number, the position, and both values.
//!
//! A log from a primary that verifies its outputs also has an
//! `OutputCheck` where each output was produced: replay compares its own
//! output's length and CRC with it, and a mismatch, or a check where replay
//! produced no output, is a divergence like any other.

use std::io::Write;

use logchannel::{Event, OutputKind, Record};

use super::record::FINAL_DIGEST_TAG;
use super::{Demand, Ending, Error, Input, Output, Position, StateDigest, Timeline};
use crate::ft::{self, LinkFailure};

/// How far a record source reaches, when asked to cover an exit.
#[derive(Debug, Clone)]
pub enum Horizon {
    /// Every event at or before the exit is known.
    Covered,
    /// The stream failed before it covered the exit: the peer is lost.
    /// What arrived before the failure is still there to replay.
    PeerLost(LinkFailure),
}

/// Where replayed records come from: a whole log file, or the stream from a
/// primary.
pub trait RecordSource {
    /// The next record that is not a horizon marker, or None at the end of
    /// the log. A streaming source blocks until one arrives.
    fn peek(&mut self) -> Result<Option<&Record>, Error>;
    /// Consumes the record `peek` returned.
    fn advance(&mut self);
    /// Blocks until every event at or before exit `exit` is known, or the
    /// stream fails. A file knows everything already.
    fn wait_horizon(&mut self, _exit: u64) -> Result<Horizon, Error> {
        Ok(Horizon::Covered)
    }
    /// The sequence number of the last record consumed.
    fn last_seq(&self) -> Option<u64>;
    /// True if every event at or before `exit` is known: when such a
    /// source has no record at `exit`, the recording had no event there,
    /// so a guest asking for one diverged (the log did not end). A file
    /// never says so: there, running out of records is a cut-short log.
    fn covers(&self, _exit: u64) -> bool {
        false
    }
}

/// A log read completely into memory before replay starts, so that a
/// truncated or corrupt file is reported before the guest runs at all.
pub struct LoadedLog {
    records: Vec<Record>,
    next: usize,
}

impl LoadedLog {
    /// Keeps the records except horizon markers, which only matter to a
    /// backup that is still receiving.
    pub fn new(records: Vec<Record>) -> Self {
        let records = records
            .into_iter()
            .filter(|r| r.event != Event::Horizon)
            .collect();
        LoadedLog { records, next: 0 }
    }
}

impl RecordSource for LoadedLog {
    fn peek(&mut self) -> Result<Option<&Record>, Error> {
        Ok(self.records.get(self.next))
    }

    fn advance(&mut self) {
        self.next += 1;
    }

    fn last_seq(&self) -> Option<u64> {
        self.next
            .checked_sub(1)
            .and_then(|i| self.records.get(i))
            .map(|r| r.seq)
    }
}

/// The replaying timeline.
pub struct Replay<S: RecordSource, O: Write> {
    source: S,
    output: O,
    /// Events applied so far, for reports.
    applied: u64,
    /// The last monotonic clock value the guest was given.
    last_clock_ns: u64,
}

fn describe(r: &Record) -> String {
    format!("{} at {}", describe_event(&r.event), r.pos)
}

fn describe_event(e: &Event) -> String {
    match e {
        Event::Interrupt { vector } => format!("interrupt {vector:#x}"),
        Event::Clock { ns } => format!("clock {ns}"),
        Event::WallClock { secs } => format!("wall clock {secs}"),
        Event::Entropy { value } => format!("entropy {value:#x}"),
        Event::SerialIn { bytes } => format!("serial input of {} bytes", bytes.len()),
        Event::NetFrame { bytes } => format!("network frame of {} bytes", bytes.len()),
        Event::Digest {
            regs_crc,
            mem_crc,
            tag,
        } => format!("digest regs {regs_crc:08x} mem {mem_crc:08x} tag {tag:#x}"),
        Event::PowerOff { code } => format!("power off {code}"),
        Event::OutputCheck { kind, len, crc } => format!("{kind} of {len} bytes (crc {crc:08x})"),
        other => other.name().to_string(),
    }
}

impl<S: RecordSource, O: Write> Replay<S, O> {
    /// Replays `source`; serial output goes to `output` (a transcript), never
    /// to a client.
    pub fn new(source: S, output: O) -> Self {
        Replay {
            source,
            output,
            applied: 0,
            last_clock_ns: 0,
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The last clock value replayed: a timeline that takes over must not
    /// let the guest's monotonic clock go backwards.
    /// A replay that starts mid-run (a backup that joined) knows the
    /// clock the guest last saw from the handover.
    pub fn resume_clock(&mut self, ns: u64) {
        self.last_clock_ns = ns;
    }

    pub fn last_clock_ns(&self) -> u64 {
        self.last_clock_ns
    }

    /// Flushes the transcript without checking the end of the log (the
    /// operator stopped the run early).
    pub fn flush_output(&mut self) -> Result<(), Error> {
        self.output.flush().map_err(Error::Transcript)
    }

    pub fn events_applied(&self) -> u64 {
        self.applied
    }

    fn divergence(&self, at: &Position, expected: String, seen: String) -> Error {
        Error::Divergence {
            seq: self.source.last_seq().map_or(0, |s| s + 1),
            at: *at,
            expected,
            seen,
        }
    }

    /// Takes the next record, which must be at `at` and satisfy `want`
    /// (named `what` in the error otherwise).
    fn expect(
        &mut self,
        at: &Position,
        what: &str,
        want: impl Fn(&Event) -> bool,
    ) -> Result<Event, Error> {
        let last_seq = self.source.last_seq();
        let covered = self.source.covers(at.exit);
        let Some(rec) = self.source.peek()? else {
            if covered {
                return Err(self.divergence(
                    at,
                    format!("no event at {at} (the recording's log covers it)"),
                    format!("{what} at {at}"),
                ));
            }
            return Err(Error::LogEnded { at: *at, last_seq });
        };
        if rec.pos != *at || !want(&rec.event) {
            let (seq, expected) = (rec.seq, describe(rec));
            return Err(Error::Divergence {
                seq,
                at: *at,
                expected,
                seen: format!("{what} at {at}"),
            });
        }
        let event = rec.event.clone();
        self.source.advance();
        self.applied += 1;
        Ok(event)
    }

    /// Before the guest runs to exit `next_exit`: a record left at an
    /// earlier exit was one the guest never asked for there (an output
    /// check where replay produced no output, say), so it diverged. Found
    /// here rather than at the next exit, since a backup reports each exit
    /// it leaves as replayed, and the primary releases verified output on
    /// that report.
    pub fn check_left_behind(&mut self, next_exit: u64) -> Result<(), Error> {
        let Some(rec) = self.source.peek()? else {
            return Ok(());
        };
        if rec.pos.exit >= next_exit {
            return Ok(());
        }
        let (seq, expected, at) = (rec.seq, describe(rec), rec.pos);
        Err(Error::Divergence {
            seq,
            at,
            expected,
            seen: format!("the guest left exit {} without it", at.exit),
        })
    }

    /// If the log has an output check here (the primary verifies outputs),
    /// compares `output` with it and consumes it.
    pub fn check_output(&mut self, at: &Position, output: &Output) -> Result<(), Error> {
        if let Some(Event::OutputCheck { .. }) = self.due_here(at)? {
            let seen = match output {
                Output::Serial(b) => Event::output_check(OutputKind::Serial, b),
                Output::Net(b) => Event::output_check(OutputKind::Net, b),
            };
            self.expect(at, &describe_event(&seen), |e| *e == seen)?;
        }
        Ok(())
    }

    /// The next record's exit, if it is at `at.exit` (and so due now).
    fn due_here(&mut self, at: &Position) -> Result<Option<&Event>, Error> {
        Ok(self
            .source
            .peek()?
            .filter(|r| r.pos.exit == at.exit)
            .map(|r| &r.event))
    }
}

impl<S: RecordSource, O: Write> Timeline for Replay<S, O> {
    fn clock_ns(&mut self, at: &Position) -> Result<u64, Error> {
        match self.expect(at, "a clock read", |e| matches!(e, Event::Clock { .. }))? {
            Event::Clock { ns } => {
                self.last_clock_ns = ns;
                Ok(ns)
            }
            _ => unreachable!("checked by expect"),
        }
    }

    fn wall_clock(&mut self, at: &Position) -> Result<i64, Error> {
        match self.expect(at, "a wall-clock read", |e| {
            matches!(e, Event::WallClock { .. })
        })? {
            Event::WallClock { secs } => Ok(secs),
            _ => unreachable!("checked by expect"),
        }
    }

    fn entropy(&mut self, at: &Position) -> Result<u64, Error> {
        match self.expect(at, "an entropy read", |e| {
            matches!(e, Event::Entropy { .. })
        })? {
            Event::Entropy { value } => Ok(value),
            _ => unreachable!("checked by expect"),
        }
    }

    fn inputs(
        &mut self,
        at: &Position,
        demand: &Demand,
        out: &mut Vec<Input>,
    ) -> Result<(), Error> {
        let first = out.len();
        let mut left = *demand;
        while let Some(input) = self.due_here(at)?.and_then(Input::from_event) {
            if !left.fits(&input) {
                let expected = format!("room for {}", describe_event(&input.to_event()));
                let seen = format!("{:?} {:?}", left.serial, left.net);
                return Err(self.divergence(at, expected, seen));
            }
            left.consume(&input);
            self.expect(at, "an input", |_| true)?;
            out.push(input);
        }
        if demand.idle && out.len() == first {
            let last_seq = self.source.last_seq();
            let covered = self.source.covers(at.exit);
            let expected = match self.source.peek()? {
                Some(r) => describe(r),
                None if covered => format!("no event at {at} (the recording's log covers it)"),
                None => return Err(Error::LogEnded { at: *at, last_seq }),
            };
            return Err(self.divergence(at, expected, format!("the guest idle at {at}")));
        }
        Ok(())
    }

    fn interrupt(&mut self, at: &Position, vector: u8) -> Result<(), Error> {
        self.expect(
            at,
            &format!("interrupt {vector:#x}"),
            |e| matches!(e, Event::Interrupt { vector: v } if *v == vector),
        )?;
        Ok(())
    }

    fn wants_digest(&mut self, at: &Position, requested: bool) -> bool {
        requested || matches!(self.due_here(at), Ok(Some(Event::Digest { .. })))
    }

    fn digest(&mut self, at: &Position, d: &StateDigest) -> Result<(), Error> {
        let seen = Event::Digest {
            regs_crc: d.regs_crc,
            mem_crc: d.mem_crc,
            tag: d.tag,
        };
        self.expect(at, &describe_event(&seen), |e| *e == seen)?;
        Ok(())
    }

    fn output(&mut self, at: &Position, output: Output) -> Result<(), Error> {
        self.check_output(at, &output)?;
        match output {
            Output::Serial(bytes) => self.output.write_all(&bytes).map_err(Error::Transcript),
            // A replay touches no outside device: a frame is dropped.
            Output::Net(_) => Ok(()),
        }
    }

    fn before_run(&mut self, next_exit: u64) -> Result<(), Error> {
        self.check_left_behind(next_exit)?;
        match self.source.wait_horizon(next_exit)? {
            Horizon::Covered => Ok(()),
            Horizon::PeerLost(failure) => Err(ft::Error::PeerLost {
                peer: ft::Peer::Primary,
                failure,
            }
            .into()),
        }
    }

    fn stop_here(&mut self, at: &Position) -> Result<bool, Error> {
        let Some(rec) = self.source.peek()? else {
            return Ok(false);
        };
        if rec.pos.exit < at.exit {
            // The guest went past a position where the log has an event.
            let (seq, expected) = (rec.seq, describe(rec));
            return Err(Error::Divergence {
                seq,
                at: *at,
                expected,
                seen: format!("the guest at exit {} without it", at.exit),
            });
        }
        Ok(rec.pos.exit == at.exit && rec.event == Event::Stop)
    }

    fn finish(&mut self, at: &Position, ending: Ending, d: &StateDigest) -> Result<(), Error> {
        let (what, want) = match ending {
            Ending::PowerOff(code) => (format!("power off {code}"), Event::PowerOff { code }),
            Ending::Stopped => ("stop".to_string(), Event::Stop),
        };
        self.expect(at, &what, |e| *e == want)?;
        self.digest(
            at,
            &StateDigest {
                tag: FINAL_DIGEST_TAG,
                ..*d
            },
        )?;
        if let Some(rec) = self.source.peek()? {
            let (seq, expected) = (rec.seq, describe(rec));
            return Err(Error::Divergence {
                seq,
                at: *at,
                expected,
                seen: "the end of the run".into(),
            });
        }
        self.output.flush().map_err(Error::Transcript)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::{SerialDemand, SerialInput};

    fn at(exit: u64) -> Position {
        Position {
            exit,
            rip: 0x1000 + exit,
            regs_crc: exit as u32 * 7,
            kind: 1,
        }
    }

    fn log(events: &[(u64, Event)]) -> Replay<LoadedLog, Vec<u8>> {
        let records = events
            .iter()
            .enumerate()
            .map(|(seq, (exit, event))| Record {
                seq: seq as u64,
                pos: at(*exit),
                event: event.clone(),
            })
            .collect();
        Replay::new(LoadedLog::new(records), Vec::new())
    }

    fn digest(tag: u64) -> StateDigest {
        StateDigest {
            regs_crc: 0xaa,
            mem_crc: 0xbb,
            tag,
        }
    }

    fn final_events(exit: u64) -> [(u64, Event); 2] {
        [
            (exit, Event::PowerOff { code: 0 }),
            (
                exit,
                Event::Digest {
                    regs_crc: 0xaa,
                    mem_crc: 0xbb,
                    tag: FINAL_DIGEST_TAG,
                },
            ),
        ]
    }

    fn room(n: usize) -> Demand {
        Demand {
            serial: SerialDemand {
                room: n,
                rx_empty: true,
            },
            ..Demand::default()
        }
    }

    /// Asserts a divergence naming record `seq`.
    fn diverged<T: std::fmt::Debug>(r: Result<T, Error>, seq: u64) {
        match r {
            Err(Error::Divergence { seq: s, .. }) => assert_eq!(s, seq, "wrong record"),
            other => panic!("expected a divergence at record {seq}, got {other:?}"),
        }
    }

    #[test]
    fn the_same_questions_get_the_logged_answers() {
        let mut events = vec![
            (3, Event::Clock { ns: 42 }),
            (3, Event::Entropy { value: 7 }),
            (
                5,
                Event::WallClock {
                    secs: 1_700_000_000,
                },
            ),
            (
                6,
                Event::SerialIn {
                    bytes: b"ab".to_vec(),
                },
            ),
            (6, Event::TimerTick),
            (6, Event::Interrupt { vector: 0x20 }),
        ];
        events.extend(final_events(9));
        let mut r = log(&events);
        assert!(!r.stop_here(&at(3)).unwrap());
        assert_eq!(r.clock_ns(&at(3)).unwrap(), 42);
        assert_eq!(r.entropy(&at(3)).unwrap(), 7);
        assert_eq!(r.last_clock_ns(), 42);
        assert_eq!(r.wall_clock(&at(5)).unwrap(), 1_700_000_000);
        let mut out = Vec::new();
        // Nothing is due at exit 5 (the wall clock was taken).
        r.inputs(&at(5), &room(16), &mut out).unwrap();
        assert!(out.is_empty());
        r.inputs(&at(6), &room(16), &mut out).unwrap();
        assert_eq!(
            out,
            [
                Input::Serial(SerialInput::Bytes(b"ab".to_vec())),
                Input::TimerTick
            ]
        );
        r.interrupt(&at(6), 0x20).unwrap();
        r.finish(&at(9), Ending::PowerOff(0), &digest(0)).unwrap();
        assert_eq!(r.events_applied(), 8);
    }

    #[test]
    fn a_read_at_another_position_diverges_at_its_record() {
        let mut r = log(&[
            (2, Event::Entropy { value: 1 }),
            (3, Event::Clock { ns: 5 }),
        ]);
        r.entropy(&at(2)).unwrap();
        diverged(r.clock_ns(&at(4)), 1);
        // Same exit, another RIP: still a divergence.
        let mut r = log(&[(3, Event::Clock { ns: 5 })]);
        let mut moved = at(3);
        moved.rip += 1;
        diverged(r.clock_ns(&moved), 0);
        // Same exit, other registers.
        let mut r = log(&[(3, Event::Clock { ns: 5 })]);
        let mut other = at(3);
        other.regs_crc ^= 1;
        diverged(r.clock_ns(&other), 0);
    }

    #[test]
    fn another_kind_of_event_diverges() {
        let mut r = log(&[(3, Event::Clock { ns: 5 })]);
        diverged(r.entropy(&at(3)), 0);
        let mut r = log(&[(3, Event::Interrupt { vector: 0x20 })]);
        diverged(r.interrupt(&at(3), 0x24), 0);
    }

    #[test]
    fn input_that_would_not_fit_diverges() {
        let mut r = log(&[(4, Event::SerialIn { bytes: vec![0; 10] })]);
        let mut out = Vec::new();
        diverged(r.inputs(&at(4), &room(9), &mut out), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn idle_with_nothing_logged_here_diverges_and_a_short_log_ends() {
        let mut r = log(&[(8, Event::TimerTick)]);
        let idle = Demand {
            idle: true,
            ..Demand::default()
        };
        diverged(r.inputs(&at(4), &idle, &mut Vec::new()), 0);
        let mut r = log(&[]);
        assert!(matches!(
            r.inputs(&at(4), &idle, &mut Vec::new()),
            Err(Error::LogEnded { .. })
        ));
        assert!(matches!(r.clock_ns(&at(4)), Err(Error::LogEnded { .. })));
    }

    #[test]
    fn running_past_a_logged_event_diverges() {
        let mut r = log(&[(3, Event::TimerTick)]);
        assert!(!r.stop_here(&at(3)).unwrap());
        diverged(r.stop_here(&at(4)), 0);
    }

    #[test]
    fn digests_must_match_and_nothing_may_follow_the_end() {
        let mut r = log(&[(
            3,
            Event::Digest {
                regs_crc: 0xaa,
                mem_crc: 0xbc,
                tag: 1,
            },
        )]);
        assert!(r.wants_digest(&at(3), false));
        diverged(r.digest(&at(3), &digest(1)), 0);

        let mut events = final_events(5).to_vec();
        events.push((6, Event::TimerTick));
        let mut r = log(&events);
        diverged(r.finish(&at(5), Ending::PowerOff(0), &digest(0)), 2);

        let mut r = log(&final_events(5));
        diverged(r.finish(&at(5), Ending::PowerOff(1), &digest(0)), 0);
    }

    #[test]
    fn the_recorded_stop_ends_the_run() {
        let mut r = log(&[
            (7, Event::Stop),
            (
                7,
                Event::Digest {
                    regs_crc: 0xaa,
                    mem_crc: 0xbb,
                    tag: FINAL_DIGEST_TAG,
                },
            ),
        ]);
        assert!(r.stop_here(&at(7)).unwrap());
        r.finish(&at(7), Ending::Stopped, &digest(0)).unwrap();
    }

    /// A stream that has told us everything through `covered` and holds
    /// no record: the recording had no event at those exits.
    struct Quiet {
        covered: u64,
    }

    impl RecordSource for Quiet {
        fn peek(&mut self) -> Result<Option<&Record>, Error> {
            Ok(None)
        }
        fn advance(&mut self) {}
        fn last_seq(&self) -> Option<u64> {
            Some(41)
        }
        fn covers(&self, exit: u64) -> bool {
            exit <= self.covered
        }
    }

    #[test]
    fn a_question_where_a_covering_stream_has_nothing_is_a_divergence() {
        let mut r = Replay::new(Quiet { covered: 10 }, Vec::new());
        // Within what the stream covers: the guest diverged (record 42 is
        // the one it would have needed).
        diverged(r.clock_ns(&at(9)), 42);
        let idle = Demand {
            idle: true,
            ..Demand::default()
        };
        diverged(r.inputs(&at(10), &idle, &mut Vec::new()), 42);
        // Beyond it, the log really ended.
        assert!(matches!(r.clock_ns(&at(11)), Err(Error::LogEnded { .. })));
    }

    fn check(bytes: &[u8]) -> Event {
        Event::output_check(OutputKind::Serial, bytes)
    }

    #[test]
    fn a_logged_output_check_matches_the_same_bytes() {
        let mut r = log(&[(4, check(b"tsc 1\n")), (4, Event::TimerTick)]);
        r.output(&at(4), Output::Serial(b"tsc 1\n".to_vec()))
            .unwrap();
        assert_eq!(r.output, b"tsc 1\n");
        assert_eq!(r.events_applied(), 1);
        // A frame is checked the same way (and dropped).
        let frame = vec![7u8; 60];
        let mut r = log(&[(2, Event::output_check(OutputKind::Net, &frame))]);
        r.output(&at(2), Output::Net(frame)).unwrap();
        r.check_left_behind(3).unwrap();
    }

    #[test]
    fn other_bytes_or_another_device_diverge_at_the_check() {
        let mut r = log(&[(4, check(b"tsc 1\n"))]);
        let err = r.output(&at(4), Output::Serial(b"tsc 2\n".to_vec()));
        match &err {
            Err(Error::Divergence { expected, seen, .. }) => {
                assert!(expected.contains("serial output of 6 bytes"), "{expected}");
                assert!(seen.contains("serial output of 6 bytes"), "{seen}");
                assert_ne!(expected, seen);
            }
            other => panic!("{other:?}"),
        }
        diverged(err, 0);
        // Nothing reached the transcript.
        assert!(r.output.is_empty());
        let mut r = log(&[(4, check(b"x"))]);
        diverged(r.output(&at(4), Output::Net(b"x".to_vec())), 0);
        // The same bytes at another position.
        let mut r = log(&[(4, check(b"x"))]);
        let mut moved = at(4);
        moved.regs_crc ^= 1;
        diverged(r.output(&moved, Output::Serial(b"x".to_vec())), 0);
    }

    #[test]
    fn a_check_where_replay_produced_no_output_diverges_before_running_on() {
        let mut r = log(&[(4, check(b"x")), (9, Event::TimerTick)]);
        // Exit 4 asked for nothing: the check is left behind.
        r.check_left_behind(4).unwrap();
        diverged(r.check_left_behind(5), 0);
        // Nor may a digest be taken over it.
        let mut r = log(&[
            (4, check(b"x")),
            (
                4,
                Event::Digest {
                    regs_crc: 0xaa,
                    mem_crc: 0xbb,
                    tag: u64::MAX,
                },
            ),
        ]);
        assert!(!r.wants_digest(&at(4), false));
        diverged(r.check_left_behind(5), 0);
    }

    #[test]
    fn output_goes_to_the_transcript_only() {
        let mut r = log(&[]);
        r.output(&at(1), Output::Serial(b"hi".to_vec())).unwrap();
        assert_eq!(r.output, b"hi");
    }
}
