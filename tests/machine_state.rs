//! A running machine moves to a fresh one mid-run and both go on exactly
//! as the uninterrupted run did: the state layer live re-protection needs.
//!
//! Each scenario records a guest in-process (the `Record` timeline over a
//! world with detached serial and network ports, so no TAP is needed),
//! then replays that log three times:
//! - M0 straight through: the reference;
//! - M1 with dirty tracking on from boot, paused at exit P (between two
//!   exits) for a first pre-copy round of all memory into M2, then at exit
//!   N for the last round (only the pages written since, by the guest or by
//!   the VMM) and `save()`;
//! - M2, a fresh machine: the pre-copied memory, `restore()`, and the log
//!   from exit N + 1 on.
//!
//! M1 and M2 must then end where M0 did, and every digest in the log
//! (registers and all memory, every 20 ms of the recording) must match on
//! the way: a missing dirty page, a lost register or device field, or an
//! exit counter off by one makes the replay diverge. Memory is also
//! compared page by page at N. `ticker` covers the PIT, interrupts and
//! serial input; `netkv` the NIC, whose RX frames are written into guest
//! memory by the VMM (not in KVM's dirty log) and whose virtio queues must
//! continue at their ring positions.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use logchannel::{Event, Record as LogRecord};
use vm_memory::{Bytes, GuestAddress};
use vmm::doorbell::Doorbell;
use vmm::machine::{self, MachineConfig};
use vmm::memory::{self, DirtyPages, GuestMem, PAGE_SIZE};
use vmm::net_config::{NetConfig, DEFAULT_MAC};
use vmm::serial_backend::SerialPort;
use vmm::tap_backend::NetPort;
use vmm::timeline::record::{LogSink, Record};
use vmm::timeline::replay::{LoadedLog, Replay};
use vmm::timeline::world::World;
use vmm::timeline::{self, Demand, Ending, Input, Output, Position, StateDigest, Timeline};
use vmm::vcpu::{self, Outcome, Vcpu};

const MEM: u64 = 64 << 20;
/// Longest a recording may run before it is stopped.
const RECORD_LIMIT: Duration = Duration::from_secs(30);

fn config(image: &str, net: Option<NetConfig>) -> MachineConfig {
    MachineConfig {
        image: vmm::images::by_name(image)
            .expect("embedded image")
            .to_vec(),
        mem_size: MEM,
        kvm_path: "/dev/kvm".into(),
        net,
    }
}

fn guest_net() -> NetConfig {
    NetConfig {
        mac: DEFAULT_MAC,
        ip: Some("198.18.0.2/24".parse().unwrap()),
        gateway: Some("198.18.0.1".parse().unwrap()),
    }
}

/// A log sink that keeps the records in memory.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<LogRecord>>>);

impl LogSink for Collect {
    fn append(&mut self, pos: &Position, event: Event) -> Result<(), timeline::Error> {
        let mut v = self.0.lock().unwrap();
        let seq = v.len() as u64;
        v.push(LogRecord {
            seq,
            pos: *pos,
            event,
        });
        Ok(())
    }

    fn output(
        &mut self,
        _pos: &Position,
        output: Output,
        world: &mut World,
    ) -> Result<(), timeline::Error> {
        world.output(output)
    }

    fn flush(&mut self) -> Result<(), timeline::Error> {
        Ok(())
    }
}

/// A timeline passed through, with two test hooks: `stop` ends the run at
/// the next exit (a recording is stopped as by an operator), and each exit
/// in `pauses` makes the loop return (an `Interrupted` error) right before
/// the vCPU runs towards that exit, so exit `n - 1` is fully handled: the
/// point where re-protection saves a machine. Running again goes on.
struct Hooked {
    inner: Box<dyn Timeline>,
    stop: Arc<AtomicBool>,
    pauses: VecDeque<u64>,
}

impl Hooked {
    fn new(inner: Box<dyn Timeline>) -> Self {
        Hooked {
            inner,
            stop: Arc::default(),
            pauses: VecDeque::new(),
        }
    }
}

impl Timeline for Hooked {
    fn clock_ns(&mut self, at: &Position) -> Result<u64, timeline::Error> {
        self.inner.clock_ns(at)
    }
    fn wall_clock(&mut self, at: &Position) -> Result<i64, timeline::Error> {
        self.inner.wall_clock(at)
    }
    fn entropy(&mut self, at: &Position) -> Result<u64, timeline::Error> {
        self.inner.entropy(at)
    }
    fn inputs(
        &mut self,
        at: &Position,
        demand: &Demand,
        out: &mut Vec<Input>,
    ) -> Result<(), timeline::Error> {
        self.inner.inputs(at, demand, out)
    }
    fn interrupt(&mut self, at: &Position, vector: u8) -> Result<(), timeline::Error> {
        self.inner.interrupt(at, vector)
    }
    fn wants_digest(&mut self, at: &Position, requested: bool) -> bool {
        self.inner.wants_digest(at, requested)
    }
    fn digest(&mut self, at: &Position, digest: &StateDigest) -> Result<(), timeline::Error> {
        self.inner.digest(at, digest)
    }
    fn output(&mut self, at: &Position, output: Output) -> Result<(), timeline::Error> {
        self.inner.output(at, output)
    }
    fn before_run(&mut self, next_exit: u64) -> Result<(), timeline::Error> {
        if self.pauses.front() == Some(&next_exit) {
            self.pauses.pop_front();
            return Err(timeline::Error::Interrupted);
        }
        self.inner.before_run(next_exit)
    }
    fn stop_here(&mut self, at: &Position) -> Result<bool, timeline::Error> {
        if self.stop.load(Ordering::SeqCst) {
            return Ok(true);
        }
        self.inner.stop_here(at)
    }
    fn finish(
        &mut self,
        at: &Position,
        ending: Ending,
        digest: &StateDigest,
    ) -> Result<(), timeline::Error> {
        self.inner.finish(at, ending, digest)
    }
}

/// What feeds a recording from outside: serial bytes at once, then frames
/// from a thread; `stop` ends the run.
struct Feed {
    serial: Vec<u8>,
    frames: Vec<Vec<u8>>,
    /// Stop once all frames were sent and the guest transmitted this
    /// many; None: let the guest run until it powers off. Either way the
    /// run stops at [`RECORD_LIMIT`].
    stop_after_tx: Option<usize>,
}

/// Records `image` in-process and returns the log and the TX frame count.
fn record(config: &MachineConfig, feed: Feed) -> (Vec<LogRecord>, usize) {
    let bell = Doorbell::new();
    let (serial, serial_in, serial_out) = SerialPort::detached();
    let mut world = World::new(bell.clone(), serial, None);
    let mut net_in = None;
    let tx_frames = Arc::new(AtomicUsize::new(0));
    let mut drains = Vec::new();
    drains.push(std::thread::spawn(
        move || while serial_out.recv().is_ok() {},
    ));
    if let Some(net) = config.net {
        let (port, tx, out) = NetPort::detached(net);
        world = world.with_net(port);
        net_in = Some(tx);
        let count = tx_frames.clone();
        drains.push(std::thread::spawn(move || {
            while out.recv().is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    if !feed.serial.is_empty() {
        serial_in.send((1, feed.serial)).unwrap();
        bell.ring();
    }
    let sink = Collect::default();
    let rec = Record::new(world, sink.clone(), Some(Duration::from_millis(20)));
    let hooked = Hooked::new(Box::new(rec));
    let stop = hooked.stop.clone();
    let feeder = {
        let (stop, bell, count) = (stop.clone(), bell.clone(), tx_frames.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + RECORD_LIMIT;
            for frame in feed.frames {
                let tx = net_in.as_ref().expect("frames need a NIC");
                std::thread::sleep(Duration::from_millis(5));
                while tx.try_send(frame.clone()).is_err() && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
                bell.ring();
            }
            let done = || match feed.stop_after_tx {
                Some(want) => count.load(Ordering::SeqCst) >= want,
                None => false,
            };
            while !done() && !stop.load(Ordering::SeqCst) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            // A little idle time at the end, so the log ends with ticks.
            std::thread::sleep(Duration::from_millis(50));
            stop.store(true, Ordering::SeqCst);
            bell.ring();
            drop(serial_in);
        })
    };
    let mut vcpu = machine::build(config, Box::new(hooked)).expect("build the recording machine");
    let outcome = vcpu.run().expect("the recording runs");
    assert!(
        matches!(outcome, Outcome::PowerOff(0) | Outcome::Stopped),
        "recording ended with {outcome:?}"
    );
    stop.store(true, Ordering::SeqCst);
    feeder.join().unwrap();
    drop(vcpu);
    for d in drains {
        d.join().unwrap();
    }
    let records = std::mem::take(&mut *sink.0.lock().unwrap());
    (records, tx_frames.load(Ordering::SeqCst))
}

/// A machine that replays `records`, pausing before each exit in `pauses`.
fn replayer(config: &MachineConfig, records: Vec<LogRecord>, pauses: &[u64]) -> Vcpu {
    let replay = Replay::new(LoadedLog::new(records), std::io::sink());
    let mut hooked = Hooked::new(Box::new(replay));
    hooked.pauses = pauses.iter().copied().collect();
    machine::build(config, Box::new(hooked)).expect("build a replaying machine")
}

/// Runs until the next pause; panics unless that is where it stopped.
fn run_to_pause(vcpu: &mut Vcpu, exit: u64, who: &str) {
    match vcpu.run() {
        Err(vcpu::Error::Timeline(timeline::Error::Interrupted)) => {}
        other => panic!("{who} should pause before exit {}: {other:?}", exit + 1),
    }
    assert_eq!(vcpu.exits(), exit, "{who} paused at the wrong exit");
}

/// The first page where two memories differ.
fn first_difference(a: &GuestMem, b: &GuestMem) -> Option<u64> {
    let (mut pa, mut pb) = ([0u8; 4096], [0u8; 4096]);
    (0..MEM / PAGE_SIZE).find(|&p| {
        a.read_slice(&mut pa, GuestAddress(p * PAGE_SIZE)).unwrap();
        b.read_slice(&mut pb, GuestAddress(p * PAGE_SIZE)).unwrap();
        pa != pb
    })
}

struct Moved {
    /// Pages of the last pre-copy round.
    last_round: u64,
    save_us: u128,
    restore_us: u128,
    state_bytes: usize,
    state: vcpu::MachineState,
}

/// The three runs (see the module documentation) over `records`, saving at
/// exit `n` after a first round at exit `p`.
fn move_mid_run(config: &MachineConfig, records: &[LogRecord], p: u64, n: u64) -> Moved {
    assert!(0 < p && p < n, "pauses {p} and {n}");
    let mut m0 = replayer(config, records.to_vec(), &[]);
    let end0 = m0.run().expect("the reference replay");
    let stats0 = m0.stats();
    drop(m0);

    let mut m1 = replayer(config, records.to_vec(), &[p + 1, n + 1]);
    let rest: Vec<LogRecord> = records.iter().filter(|r| r.pos.exit > n).cloned().collect();
    let mut m2 = replayer(config, rest, &[]);

    m1.start_dirty_tracking().unwrap();
    run_to_pause(&mut m1, p, "M1");
    // Round 1: everything, while the guest could go on running.
    m1.take_dirty().unwrap();
    memory::copy_pages(m1.memory(), m2.memory(), &DirtyPages::all(MEM)).unwrap();
    run_to_pause(&mut m1, n, "M1");
    // Last round, with the guest stopped: what was written since.
    let dirty = m1.take_dirty().unwrap();
    memory::copy_pages(m1.memory(), m2.memory(), &dirty).unwrap();
    let t = Instant::now();
    let state = m1.save().unwrap();
    let save_us = t.elapsed().as_micros();
    let digest1 = m1.state_digest().unwrap();
    m1.stop_dirty_tracking().unwrap();
    assert_eq!(
        first_difference(m1.memory(), m2.memory()),
        None,
        "M2's memory after the last round ({} pages) differs from M1's",
        dirty.count()
    );
    assert_eq!(state.exits, n);
    let bytes = postcard::to_stdvec(&state).unwrap();
    let moved: vcpu::MachineState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(moved, state);

    let t = Instant::now();
    m2.restore(&moved).unwrap();
    let restore_us = t.elapsed().as_micros();
    assert_eq!(m2.exits(), n);
    assert_eq!(m2.state_digest().unwrap(), digest1, "M2 after restore");
    assert_eq!(m2.save().unwrap(), state, "M2 saves what it restored");

    let end1 = m1.run().expect("M1 after the save");
    let end2 = m2.run().expect("M2 after the restore");
    for (who, end, stats) in [("M1", &end1, m1.stats()), ("M2", &end2, m2.stats())] {
        assert_eq!(*end, end0, "{who} ended otherwise");
        assert_eq!(stats.exits, stats0.exits, "{who} exits");
        assert_eq!(stats.final_digest, stats0.final_digest, "{who} final state");
    }
    Moved {
        last_round: dirty.count(),
        save_us,
        restore_us,
        state_bytes: bytes.len(),
        state,
    }
}

fn report(guest: &str, m: &Moved, n: u64) {
    eprintln!(
        "{{\"guest\":\"{guest}\",\"save_at_exit\":{n},\"save_us\":{},\"restore_us\":{},\"state_bytes\":{},\"last_round_pages\":{}}}",
        m.save_us, m.restore_us, m.state_bytes, m.last_round
    );
}

#[test]
fn ticker_moves_mid_run_and_both_copies_end_like_the_original() {
    if !kvm_available("machine_state") {
        return;
    }
    let config = config("ticker", None);
    let (records, _) = record(
        &config,
        Feed {
            serial: b"ticks=300\nsome input to echo\n".to_vec(),
            frames: Vec::new(),
            stop_after_tx: None,
        },
    );
    let end = records.last().unwrap();
    assert!(
        matches!(end.event, Event::Digest { .. }),
        "the log ends with the final digest"
    );
    let interrupts: Vec<(u64, u8)> = records
        .iter()
        .filter_map(|r| match r.event {
            Event::Interrupt { vector } => Some((r.pos.exit, vector)),
            _ => None,
        })
        .collect();
    assert!(interrupts.len() > 100, "{} interrupts", interrupts.len());
    // Save right at an injection: the vector is queued in KVM, not yet
    // taken by the guest, so it must travel with the vCPU (KVM reports it
    // both in the events and in the special registers' interrupt bitmap).
    // And at a read exit (see the netkv scenario).
    let kind_at = |exit: u64| {
        records
            .iter()
            .find(|r| r.pos.exit == exit)
            .map(|r| r.pos.kind)
    };
    let (n, vector) = interrupts[interrupts.len() / 2..]
        .iter()
        .copied()
        .find(|&(e, _)| matches!(kind_at(e), Some(1 | 3)))
        .expect("an injection at a read exit");
    let moved = move_mid_run(&config, &records, n / 2, n);
    report("ticker", &moved, n);
    let ev = moved.state.vcpu.events;
    assert_eq!(
        (ev.interrupt[0], ev.interrupt[1]),
        (1, vector),
        "the timer vector injected at exit {n} is pending in the saved events"
    );
    assert!(moved.state.devices.pit.channels[0].load_ns.is_some());
    let pending = moved.state.vcpu.sregs.interrupt_bitmap[usize::from(vector / 64)];
    assert!(
        pending & (1 << (vector % 64)) != 0,
        "{vector:#x} not in the sregs bitmap"
    );
}

/// A 60-byte ARP request from `sender` for `target`.
fn arp_request(sender_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(sender_mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(sender_mac);
    f.extend(sender);
    f.extend([0; 6]);
    f.extend(target);
    f.resize(60, 0);
    f
}

#[test]
fn netkv_moves_mid_run_with_its_rings_and_received_frames() {
    if !kvm_available("machine_state") {
        return;
    }
    // Every digest of this test (received frames are the VMM's writes) is
    // also checked against a hash of all memory.
    vmm::vcpu::set_digest_self_check(true);
    let config = config("netkv", Some(guest_net()));
    let frames: Vec<Vec<u8>> = (0..120u8)
        .map(|i| {
            arp_request(
                [0x02, 0, 0, 0, 0, 10 + i],
                [198, 18, 0, 10 + i],
                [198, 18, 0, 2],
            )
        })
        .collect();
    let (records, tx) = record(
        &config,
        Feed {
            serial: Vec::new(),
            frames,
            stop_after_tx: Some(100),
        },
    );
    let frame_exits: Vec<u64> = records
        .iter()
        .filter(|r| matches!(r.event, Event::NetFrame { .. }))
        .map(|r| r.pos.exit)
        .collect();
    assert!(
        frame_exits.len() >= 100 && tx >= 100,
        "{} frames received, {tx} sent by the guest",
        frame_exits.len()
    );
    // Save after frames were written: the pages the VMM wrote between the
    // rounds (RX buffers, used ring) are not in KVM's log. And at a read
    // (an MMIO read or `in`, exit kinds 3 and 1), whose result KVM only
    // puts into the guest's registers at the next KVM_RUN: the save must
    // complete it first.
    let n = records
        .iter()
        .filter(|r| matches!(r.pos.kind, 1 | 3))
        .map(|r| r.pos.exit)
        .find(|&e| e > frame_exits[frame_exits.len() / 2])
        .expect("a read exit after the middle frame");
    let p = frame_exits[frame_exits.len() / 4];
    assert!(frame_exits.iter().any(|&e| p < e && e <= n));
    let moved = move_mid_run(&config, &records, p, n);
    report("netkv", &moved, n);
    let net = moved.state.devices.net.as_ref().expect("the NIC's state");
    let (rx, txq) = (&net.transport.queues[0], &net.transport.queues[1]);
    assert!(rx.ready && txq.ready);
    assert!(rx.next_used >= 50 && txq.next_used >= 50, "{rx:?} {txq:?}");
}

#[test]
fn dirty_tracking_sees_guest_and_vmm_writes_and_clears() {
    if !kvm_available("machine_state") {
        return;
    }
    let config = config("ticker", None);
    let (records, _) = record(
        &config,
        Feed {
            serial: b"ticks=100\n".to_vec(),
            frames: Vec::new(),
            stop_after_tx: None,
        },
    );
    let n = records[records.len() / 2].pos.exit;
    let mut m = replayer(&config, records, &[n + 1]);
    let before = memory_image(m.memory());
    m.start_dirty_tracking().unwrap();
    run_to_pause(&mut m, n, "the tracked machine");
    let after = memory_image(m.memory());
    // A VMM write, into a page the guest never touches.
    let vmm_page = MEM / PAGE_SIZE - 3;
    m.memory()
        .write_obj(0xdead_beefu32, GuestAddress(vmm_page * PAGE_SIZE + 100))
        .unwrap();
    let t = Instant::now();
    let dirty = m.take_dirty().unwrap();
    let first_us = t.elapsed().as_micros();
    let changed: Vec<u64> = (0..MEM / PAGE_SIZE)
        .filter(|&p| {
            let r = (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize;
            before[r.clone()] != after[r]
        })
        .collect();
    assert!(!changed.is_empty(), "the guest wrote nothing?");
    for p in &changed {
        assert!(
            dirty.contains(*p),
            "guest-written page {p:#x} not in the dirty set"
        );
    }
    assert!(
        dirty.contains(vmm_page),
        "the VMM's write is not in the dirty set"
    );
    assert!(!changed.contains(&vmm_page));
    // Cleared: nothing ran since.
    let t = Instant::now();
    let again = m.take_dirty().unwrap();
    let clean_us = t.elapsed().as_micros();
    assert!(again.is_empty(), "{} pages after a take", again.count());
    // Every page written by the VMM: the bitmap side fully dirty.
    let zeros = vec![0u8; PAGE_SIZE as usize];
    for p in 0..MEM / PAGE_SIZE {
        m.memory()
            .write_slice(&zeros[..8], GuestAddress(p * PAGE_SIZE + 8))
            .unwrap();
    }
    let t = Instant::now();
    let all = m.take_dirty().unwrap();
    let full_vmm_us = t.elapsed().as_micros();
    assert_eq!(all.count(), MEM / PAGE_SIZE);
    m.stop_dirty_tracking().unwrap();
    assert!(matches!(m.take_dirty(), Err(vcpu::Error::NotTracking)));
    eprintln!(
        "{{\"take_dirty_64MiB\":{{\"after_run_us\":{first_us},\"after_run_pages\":{},\"clean_us\":{clean_us},\"all_vmm_written_us\":{full_vmm_us}}}}}",
        dirty.count()
    );
}

fn memory_image(mem: &GuestMem) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}
