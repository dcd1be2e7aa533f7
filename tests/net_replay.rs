//! A recording of `netkv` serving real TCP clients replays bit for bit,
//! and the received frames in its log are what the replay depends on.
//!
//! `duet record` runs netkv on host A's TAP while `redis-benchmark` (8
//! connections) loads it from the client namespace, and is stopped with
//! SIGTERM. Then, outside any namespace and with no TAP (replay never
//! opens one):
//! - `duet replay --net --guest-ip ...` ends in the same final state
//!   (exits, registers, memory CRC) as the recording;
//! - the log holds the frames the guest received (`NetFrame` records,
//!   thousands of them to the guest's MAC);
//! - changing one byte of one logged TCP frame makes the replay diverge
//!   (exit 4) at a record after that frame's, and no later than the next
//!   digest. The frame's own record still matches (its position is where
//!   the frame is written, before the guest looks at it); the replayed
//!   guest's stack then drops the segment on its checksum where the
//!   recording accepted it, so its TCP state differs from there on. How
//!   soon a register check sees that depends on the guest's loop (its
//!   exits per pass do not depend on what a segment held); the memory CRC
//!   of the next digest sees it for certain.

mod common;
mod twohost;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use logchannel::Event;
use twohost::{Solo, SoloMode};
use vmm::netns::Host;

const LIMIT: Duration = Duration::from_secs(60);
/// Exit status of `duet replay` on divergence.
/// The default MAC of `--mac`.
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn replay(log: &Path) -> Output {
    run_bounded(
        duet()
            .args(["replay", "--image", "netkv", "--net", "--guest-ip"])
            .arg(twohost::guest_cidr())
            .args(["--output", "/dev/null", "--log"])
            .arg(log),
        None,
        LIMIT,
    )
}

/// The offset of the last TCP payload byte in an Ethernet frame carrying
/// IPv4/TCP with at least one payload byte; None for any other frame.
fn tcp_payload_end(f: &[u8]) -> Option<usize> {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 || f[23] != 6 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let tcp = 14 + ihl;
    let data_off = usize::from(*f.get(tcp + 12)? >> 4) * 4;
    let end = 14 + total;
    (end <= f.len() && end > tcp + data_off).then_some(end - 1)
}

#[test]
fn a_recording_under_redis_benchmark_replays_and_its_frames_matter() {
    if !kvm_available("net_replay") || !twohost::netns_available("net_replay") {
        return;
    }
    let t = Instant::now();
    let scratch = tempdir("net-replay");
    let log = scratch.path().join("netkv.log");
    let mut solo = Solo::start(
        &format!("nrp{}", std::process::id()),
        SoloMode::Record(log.clone()),
    );
    drop(solo.wait_for_service(Duration::from_secs(30)));
    let addr = solo.service();
    let mut bench = solo.topo.command(Host::Client, "redis-benchmark");
    bench
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-n", "2000", "-c", "8", "-t", "set,get,incr", "--csv"]);
    let o = run_bounded(&mut bench, None, LIMIT);
    assert!(
        o.status.success(),
        "redis-benchmark: {}: {}{}\n{}",
        o.status,
        stdout(&o),
        stderr(&o),
        solo.logs()
    );
    solo.vm.terminate().unwrap();
    let status = solo.vm.wait_timeout(LIMIT);
    let out = solo.vm.log_text();
    assert!(
        status.is_some_and(|s| s.success()),
        "record after SIGTERM: {status:?}\n{out}"
    );
    let recorded = final_state_in(&out);
    drop(solo);

    // The received frames are in the log.
    let (header, records) = read_log(&log);
    let frames: Vec<(u64, &[u8])> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::NetFrame { bytes } => Some((r.seq, bytes.as_slice())),
            _ => None,
        })
        .collect();
    // 6000 requests over 8 connections, plus their handshakes: thousands
    // of frames to the guest's MAC. (The TAP is a bridge port, so the guest
    // also gets what the bridge floods: broadcasts, multicast such as the
    // hosts' IGMP and MLD reports, unicast to addresses not learnt yet.)
    let to_guest = frames
        .iter()
        .filter(|(_, f)| f.len() >= 14 && f[..6] == GUEST_MAC)
        .count();
    assert!(
        to_guest >= 1000,
        "only {to_guest} frames to the guest's MAC among {} NetFrame records in {} records",
        frames.len(),
        records.len()
    );

    // Replay, with no TAP and outside the namespaces.
    let o = replay(&log);
    assert_eq!(o.status.code(), Some(0), "replay: {}", stderr(&o));
    assert_eq!(final_state(&o), recorded, "replay ended elsewhere");

    // One byte changed in one TCP segment (its last payload byte, inside
    // the IP length, so not Ethernet padding).
    let (target, at) = frames[frames.len() / 2..]
        .iter()
        .find_map(|(seq, f)| tcp_payload_end(f).map(|at| (*seq, at)))
        .expect("a logged TCP segment with payload");
    let mut edited = records.clone();
    match &mut edited[target as usize].event {
        Event::NetFrame { bytes } => bytes[at] ^= 0x01,
        _ => unreachable!(),
    }
    let edited_log = scratch.path().join("edited.log");
    write_log(&edited_log, &header, &edited);
    let o = replay(&edited_log);
    let seq = diverged_at(&o);
    let next = records[target as usize + 1..]
        .iter()
        .find(|r| r.pos.exit > records[target as usize].pos.exit)
        .map(|r| r.seq);
    eprintln!(
        "NetFrame record {target} edited at byte {at}; replay diverged at record {seq} \
         (first record at a later exit: {next:?}); stderr: {}",
        stderr(&o).trim()
    );
    assert!(
        seq > target,
        "divergence at record {seq}, not after the edited frame's record {target}: {}",
        stderr(&o)
    );
    // The memory CRC of the next digest would catch it at the latest.
    let next_digest = records[target as usize..]
        .iter()
        .find(|r| matches!(r.event, Event::Digest { .. }))
        .map_or(u64::MAX, |r| r.seq);
    assert!(
        seq <= next_digest,
        "divergence at record {seq}, after the next digest {next_digest}"
    );
    eprintln!("net_replay took {:?}", t.elapsed());
}
