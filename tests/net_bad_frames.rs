//! Frames no well-behaved stack sends, straight onto the wire at the
//! guest's MAC from the client namespace (a raw `AF_PACKET` socket on its
//! service interface), while `duet record` runs `netkv`:
//!
//! - malformed frames: unknown and local-experimental ethertypes, IPv4
//!   headers cut short, with a bad version, IHL or total length, a bad
//!   header checksum, fragments, a TCP header cut short, a TCP segment to
//!   port 6379 with a bad checksum, short ARP, a VLAN tag, IPv6;
//! - runts: the kernel refuses to send an Ethernet frame shorter than its
//!   14-byte header (`EINVAL`: `dev_validate_header`), so the shortest that
//!   can reach the guest is a bare 14-byte header, and neither the veth
//!   pairs, the bridges nor the TAP pad it to 60 bytes; those are sent, and
//!   the refusals of 0..13 bytes are checked to be the kernel's;
//! - oversize frames: the service network's MTU is raised to 4000 first
//!   (the bridges would drop anything above an egress port's MTU), so
//!   frames of 2036 bytes (exactly the guest's receive buffer less the
//!   12-byte virtio-net header), 2037, 3000 and 4014 (the MTU's limit)
//!   reach the device, which takes the first and drops the others;
//! - a flood of 20,000 frames sent as fast as the socket takes them
//!   (bounded at 20 s), more than the TAP's 256-frame queue holds.
//!
//! Afterwards the guest still answers `redis-cli`, the VMM has not exited,
//! stops with exit 0 on SIGTERM, and the recorded log replays to the same
//! final state: every frame the guest was handed is in the log, oversize
//! ones included (the device drops those deterministically, in replay
//! too), and nothing the backend dropped is.

mod common;
mod twohost;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use logchannel::Event;
use twohost::{Solo, SoloMode};
use vmm::netns::{self, Host, Topology};

const LIMIT: Duration = Duration::from_secs(60);
/// The guest's MAC (`--mac`'s default).
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// A locally administered source MAC that nobody else uses.
const SRC_MAC: [u8; 6] = [0x02, 0xd0, 0xe7, 0x00, 0x00, 0x04];
/// IEEE 802 local experimental ethertype: marks the flood's frames.
const ETH_EXPERIMENTAL: u16 = 0x88b5;
/// The service network's MTU during this test.
const MTU: usize = 4000;
/// The largest frame the guest's 2048-byte receive buffers take.
const RX_FRAME_MAX: usize = 2048 - 12;
/// Frames in the flood.
const FLOOD: usize = 20_000;
/// Longest the flood may take.
const FLOOD_LIMIT: Duration = Duration::from_secs(20);
/// The service interface inside each host namespace (`vmm::netns`).
const SERVICE_IF: &str = "svc0";

/// A raw Ethernet socket bound to nothing: it sends whole frames, built
/// here, out of one interface, and receives none (protocol 0).
struct RawLink {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawLink {
    /// Opens one on `ifname` of the calling thread's network namespace.
    fn open(ifname: &str) -> std::io::Result<RawLink> {
        // SAFETY: socket(2) takes plain integers and returns a new
        // descriptor or -1; nothing of ours is touched.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor socket(2) just returned, owned by
        // nobody else; OwnedFd closes it once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = CString::new(ifname).map_err(std::io::Error::other)?;
        // SAFETY: if_nametoindex(3) reads the NUL-terminated string `name`
        // holds, alive for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawLink {
            fd,
            ifindex: i32::try_from(ifindex).map_err(std::io::Error::other)?,
        })
    }

    /// Sends `frame` (Ethernet header included) as it is.
    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // With SOCK_RAW the frame carries its own header, so the kernel
        // does not use this address; it is the guest's for the record.
        let mut sll_addr = [0u8; 8];
        sll_addr[..6].copy_from_slice(&GUEST_MAC);
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: 0,
            sll_ifindex: self.ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr,
        };
        // SAFETY: sendto(2) reads `frame.len()` bytes at `frame` and one
        // `sockaddr_ll` at `addr`, both borrowed for the call, through a
        // descriptor we own.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        match usize::try_from(n) {
            Ok(sent) if sent == frame.len() => Ok(()),
            Ok(sent) => Err(std::io::Error::other(format!(
                "sent {sent} of {} bytes",
                frame.len()
            ))),
            Err(_) => Err(std::io::Error::last_os_error()),
        }
    }
}

/// An Ethernet frame to the guest from [`SRC_MAC`].
fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(GUEST_MAC);
    f.extend(SRC_MAC);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// The one's-complement sum of RFC 1071 over `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options) from the client to the guest, with a
/// correct checksum unless the caller breaks it.
fn ipv4_header(protocol: u8, payload_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&Host::Client.service_ip().octets());
    h[16..20].copy_from_slice(&netns::GUEST_IP.octets());
    let sum = inet_checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

/// The malformed frames, each with what is wrong with it.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![
        ("unknown ethertype", ether(0x1234, &[0xa5; 46])),
        (
            "experimental ethertype",
            ether(ETH_EXPERIMENTAL, b"duet bad frame"),
        ),
        ("ethertype 0", ether(0x0000, &[0; 46])),
        ("IPv4, 1 byte", ether(0x0800, &[0x45])),
        (
            "IPv4, 10 bytes of header",
            ether(0x0800, &ipv4_header(6, 0)[..10]),
        ),
        ("ARP, 8 bytes", ether(0x0806, &[0, 1, 8, 0, 6, 4, 0, 1])),
        ("VLAN tag", ether(0x8100, &[0, 5, 0x08, 0x00, 0x45, 0])),
        ("IPv6 header only", ether(0x86dd, &[0x60; 40])),
    ];
    let with = |f: fn(&mut [u8; 20]), protocol: u8, payload: &[u8]| {
        let mut h = ipv4_header(protocol, payload.len());
        f(&mut h);
        let mut p = h.to_vec();
        p.extend(payload);
        ether(0x0800, &p)
    };
    v.push(("IPv4 version 6", with(|h| h[0] = 0x65, 17, &[0; 8])));
    v.push(("IPv4 IHL 2", with(|h| h[0] = 0x42, 17, &[0; 8])));
    v.push((
        "IPv4 IHL 15 in 20 bytes",
        with(|h| h[0] = 0x4f, 17, &[0; 8]),
    ));
    v.push((
        "IPv4 total length past the frame",
        with(
            |h| h[2..4].copy_from_slice(&1400u16.to_be_bytes()),
            17,
            &[0; 8],
        ),
    ));
    v.push((
        "IPv4 total length inside the header",
        with(
            |h| h[2..4].copy_from_slice(&8u16.to_be_bytes()),
            17,
            &[0; 8],
        ),
    ));
    v.push((
        "IPv4 bad header checksum",
        with(|h| h[10] ^= 0xff, 17, &[0; 8]),
    ));
    v.push(("IPv4 fragment", with(|h| h[6] = 0x20, 17, &[0; 8])));
    v.push((
        "TCP header cut at 5 bytes",
        with(|_| {}, 6, &[0x30, 0x39, 0x18, 0xeb, 0]),
    ));
    // A SYN to 6379 whose TCP checksum is left zero (wrong).
    let mut syn = [0u8; 20];
    syn[0..2].copy_from_slice(&40000u16.to_be_bytes());
    syn[2..4].copy_from_slice(&6379u16.to_be_bytes());
    syn[12] = 0x50;
    syn[13] = 0x02;
    syn[14..16].copy_from_slice(&1024u16.to_be_bytes());
    v.push(("TCP SYN to 6379, bad checksum", with(|_| {}, 6, &syn)));
    v.push((
        "UDP with a length past the packet",
        with(|_| {}, 17, &[0, 9, 0, 9, 0xff, 0xff, 0, 0]),
    ));
    v
}

/// What the client namespace managed to send.
#[derive(Debug, Default)]
struct Sent {
    malformed: usize,
    runts_refused: Vec<(usize, String)>,
    headers_only: usize,
    oversize: Vec<usize>,
    flood: usize,
    flood_errors: usize,
    flood_time: Duration,
}

fn send_everything() -> std::io::Result<Sent> {
    let link = RawLink::open(SERVICE_IF)?;
    let mut sent = Sent::default();
    for (what, frame) in malformed() {
        link.send(&frame)
            .map_err(|e| std::io::Error::other(format!("{what}: {e}")))?;
        sent.malformed += 1;
    }
    // Runts: the kernel itself refuses anything shorter than the header.
    for len in 0..14 {
        let frame = &ether(0x1234, &[])[..len];
        match link.send(frame) {
            Ok(()) => panic!("the kernel sent a {len}-byte frame"),
            Err(e) => sent.runts_refused.push((len, e.to_string())),
        }
    }
    for ethertype in [0x0800, 0x0806, ETH_EXPERIMENTAL] {
        link.send(&ether(ethertype, &[]))?;
        sent.headers_only += 1;
    }
    for len in [RX_FRAME_MAX, RX_FRAME_MAX + 1, 3000, MTU + 14] {
        link.send(&ether(ETH_EXPERIMENTAL, &vec![0x5a; len - 14]))?;
        sent.oversize.push(len);
    }
    // The flood: numbered frames, as fast as the socket takes them.
    let start = Instant::now();
    let mut payload = vec![0u8; 46];
    payload[..10].copy_from_slice(b"duet flood");
    for i in 0..FLOOD {
        if start.elapsed() > FLOOD_LIMIT {
            break;
        }
        payload[10..14].copy_from_slice(&(i as u32).to_be_bytes());
        match link.send(&ether(ETH_EXPERIMENTAL, &payload)) {
            Ok(()) => sent.flood += 1,
            Err(_) => sent.flood_errors += 1,
        }
    }
    sent.flood_time = start.elapsed();
    Ok(sent)
}

#[test]
fn bad_frames_and_a_flood_leave_the_guest_serving_and_the_log_whole() {
    if !kvm_available("net_bad_frames") || !twohost::netns_available("net_bad_frames") {
        return;
    }
    let t = Instant::now();
    let scratch = tempdir("net-bad-frames");
    let log = scratch.path().join("netkv.log");
    let topo = Topology::up(&format!("nbf{}", std::process::id()))
        .unwrap_or_else(|e| panic!("netns up: {e}"));
    topo.set_service_mtu(MTU as u32).unwrap();
    let mut solo = Solo::start_in(topo, SoloMode::Record(log.clone()));
    drop(solo.wait_for_service(Duration::from_secs(30)));

    let sent = solo
        .topo
        .in_namespace(Host::Client, send_everything)
        .unwrap()
        .unwrap_or_else(|e| panic!("sending raw frames: {e}\n{}", solo.logs()));
    eprintln!("sent: {sent:?}");
    for (len, e) in &sent.runts_refused {
        assert!(e.contains("Invalid argument"), "a {len}-byte runt: {e}");
    }
    assert_eq!(
        sent.flood + sent.flood_errors,
        FLOOD,
        "the flood stopped at its time bound"
    );
    assert!(
        sent.flood > FLOOD / 2,
        "most of the flood was refused: {sent:?}"
    );

    // The guest still serves, on a fresh connection and with real clients.
    let mut conn = solo.wait_for_service(Duration::from_secs(20));
    for i in 0..20 {
        let (k, v) = (format!("after-flood:{i}"), format!("v{i}"));
        twohost::set_ok(&mut conn, &k, &v, Duration::from_secs(5), || solo.logs());
    }
    twohost::check_acked(
        &mut conn,
        &(0..20)
            .map(|i| (format!("after-flood:{i}"), format!("v{i}")))
            .collect::<Vec<_>>(),
        || solo.logs(),
    );
    drop(conn);
    let addr = solo.service();
    let o = run_bounded(
        solo.topo
            .command(Host::Client, "redis-cli")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["GET", "after-flood:19"]),
        None,
        LIMIT,
    );
    assert_eq!(
        stdout(&o).trim(),
        "v19",
        "redis-cli: {}{}",
        stdout(&o),
        stderr(&o)
    );

    assert!(
        solo.vm.status().is_none(),
        "the VMM exited\n{}",
        solo.logs()
    );
    solo.vm.terminate().unwrap();
    let status = solo.vm.wait_timeout(LIMIT);
    let out = solo.vm.log_text();
    assert!(
        status.is_some_and(|s| s.success()),
        "record after SIGTERM: {status:?}\n{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
    let recorded = final_state_in(&out);
    drop(solo);

    // What reached the guest is in the log: some of the flood (the TAP's
    // queue holds 256 frames, the rest is dropped before the log), the
    // bare headers, and the oversize frames, which the device dropped.
    let (_, records) = read_log(&log);
    let frames: Vec<&[u8]> = records
        .iter()
        .filter_map(|r| match &r.event {
            Event::NetFrame { bytes } => Some(bytes.as_slice()),
            _ => None,
        })
        .collect();
    let flood_logged = frames
        .iter()
        .filter(|f| f.len() == 60 && f[14..24] == *b"duet flood")
        .count();
    let logged_len = |len: usize| frames.iter().any(|f| f.len() == len);
    eprintln!(
        "log: {} records, {} frames, {flood_logged} of the flood; oversize logged: {:?}",
        records.len(),
        frames.len(),
        sent.oversize
            .iter()
            .map(|&l| (l, logged_len(l)))
            .collect::<Vec<_>>()
    );
    assert!(flood_logged > 0, "no frame of the flood reached the guest");
    assert!(flood_logged <= sent.flood);
    assert!(logged_len(14), "no bare 14-byte header reached the guest");
    for len in &sent.oversize {
        assert!(
            logged_len(*len),
            "the {len}-byte frame never reached the device"
        );
    }

    let o = run_bounded(
        duet()
            .args(["replay", "--image", "netkv", "--net", "--guest-ip"])
            .arg(twohost::guest_cidr())
            .args(["--output", "/dev/null", "--log"])
            .arg(&log),
        None,
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(0), "replay: {}", stderr(&o));
    assert_eq!(final_state(&o), recorded, "replay ended elsewhere");
    eprintln!("net_bad_frames took {:?}", t.elapsed());
}
