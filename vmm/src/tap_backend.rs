//! The host side of the NIC: a TAP device, read and written by threads of
//! its own. It meets the vCPU thread only through bounded channels held by
//! a [`NetPort`], so the device model never does I/O and a frame is handed
//! to the guest only at an exit where the guest has a buffer for it.
//!
//! Receive: the reader thread queues up to [`RX_QUEUE_FRAMES`] frames and
//! rings the machine's [`Doorbell`]. Beyond that it drops frames and counts
//! them, as a NIC whose ring is full does: an Ethernet peer expects loss,
//! and blocking the reader would only move the queue into the kernel.
//! Frames wait in the queue while the guest has no RX buffer posted.
//!
//! Transmit: the writer thread writes each frame the Output Rule released.
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI` (raw Ethernet frames, no
//! packet-info prefix and no virtio header), created if it does not exist,
//! and brought up (IFF_UP) so that `--tap NAME` is all an operator needs;
//! putting it in a bridge or giving the host side an address is left to
//! the operator, as it depends on the network.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread;

use crate::doorbell::Doorbell;
use crate::net_config::{MacAddr, NetConfig};
use crate::timeline::{Input, NetDemand};

/// Frames the reader thread queues for the guest before it drops.
pub const RX_QUEUE_FRAMES: usize = 256;
/// Frames waiting for the writer thread.
const TX_QUEUE_FRAMES: usize = 256;
/// Most frames handed to the guest at one exit, so that one exit's log
/// record batch and device work stay small; the rest go at the next exits.
const MAX_FRAMES_PER_EXIT: usize = 32;
/// A read buffer for the largest frame a TAP delivers.
const READ_BUF: usize = 65_536;

/// Errors opening the TAP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad TAP name {0:?}: 1 to 15 bytes, no '/' or NUL")]
    Name(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to TAP {name:?} (TUNSETIFF; creating one needs CAP_NET_ADMIN)")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot start a TAP thread")]
    Spawn(#[source] std::io::Error),
}

/// Drops the backend made that the device model never saw.
#[derive(Debug, Default)]
pub struct TapCounters {
    /// Frames dropped because the guest had not taken the queued ones.
    pub rx_queue_full: AtomicU64,
    pub tx_errors: AtomicU64,
}

/// The NIC's host side as the vCPU thread sees it.
pub struct NetPort {
    rx: Receiver<Vec<u8>>,
    rx_closed: bool,
    tx: Option<SyncSender<Vec<u8>>>,
    writer: Option<thread::JoinHandle<()>>,
    config: NetConfig,
    counters: Arc<TapCounters>,
}

impl NetPort {
    fn new(
        rx: Receiver<Vec<u8>>,
        tx: SyncSender<Vec<u8>>,
        writer: Option<thread::JoinHandle<()>>,
        config: NetConfig,
        counters: Arc<TapCounters>,
    ) -> Self {
        NetPort {
            rx,
            rx_closed: false,
            tx: Some(tx),
            writer,
            config,
            counters,
        }
    }

    /// A port with no TAP behind it, for tests: the returned sender plays
    /// the reader thread, the receiver shows what was transmitted.
    pub fn detached(config: NetConfig) -> (NetPort, SyncSender<Vec<u8>>, Receiver<Vec<u8>>) {
        let (in_tx, in_rx) = sync_channel(RX_QUEUE_FRAMES);
        let (out_tx, out_rx) = sync_channel(TX_QUEUE_FRAMES);
        let port = NetPort::new(in_rx, out_tx, None, config, Arc::default());
        (port, in_tx, out_rx)
    }

    /// Appends queued frames for the guest, one per posted RX buffer.
    pub fn take(&mut self, demand: &NetDemand, out: &mut Vec<Input>) {
        for _ in 0..demand.rx_buffers.min(MAX_FRAMES_PER_EXIT) {
            match self.rx.try_recv() {
                Ok(frame) => out.push(Input::Net(frame)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.rx_closed = true;
                    break;
                }
            }
        }
    }

    /// True once the reader thread has stopped and nothing it queued is
    /// left (an idle guest then waits for nothing from the network).
    pub fn input_closed(&self) -> bool {
        self.rx_closed
    }

    /// A sender for frames, for a thread that releases held output later.
    pub fn sender(&self) -> Option<SyncSender<Vec<u8>>> {
        self.tx.clone()
    }

    pub fn counters(&self) -> &TapCounters {
        &self.counters
    }

    /// This host now carries the guest (it boots here, or a backup went
    /// live here): announce its MAC with a gratuitous ARP, so that switches
    /// learn the port at once instead of when the guest next transmits (a
    /// guest that only answers would otherwise stay unreachable behind a
    /// stale switch entry). Without an IPv4 address there is nothing to
    /// announce in ARP; the guest's next frame teaches the switch. The
    /// frames are the VMM's, not the guest's: nothing is logged.
    pub fn announce(&mut self) {
        let Some(ip) = self.config.ip else {
            return;
        };
        let Some(tx) = &self.tx else { return };
        for op in [ARP_REQUEST, ARP_REPLY] {
            let _ = tx.send(gratuitous_arp(self.config.mac, ip.addr, op));
        }
        tracing::info!(
            "net: announced {} at {} (gratuitous ARP)",
            ip.addr,
            self.config.mac
        );
    }

    /// Closes the output and waits until every frame was written.
    pub fn close(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// A broadcast ARP announcement of `ip` at `mac` (RFC 5227 §2.4 for the
/// request; some switches and hosts only update on a reply, so both are
/// sent). Sender and target protocol address are both `ip`.
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr, op: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip.octets());
    let target_mac = if op == ARP_REPLY { [0xff; 6] } else { [0; 6] };
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&ip.octets());
    // Pad to the Ethernet minimum (without FCS).
    f.resize(60, 0);
    f
}

/// Opens (or creates) the TAP `name`, brings it up, and starts its threads.
/// Reader threads ring `bell` after each frame they queue.
pub fn start(name: &str, config: NetConfig, bell: &Doorbell) -> Result<NetPort, Error> {
    let tap = open_tap(name)?;
    if let Err(e) = set_up(name) {
        tracing::warn!(
            "net: cannot bring TAP {name:?} up ({e}); do it with `ip link set {name} up`"
        );
    }
    let reader = tap.try_clone().map_err(Error::OpenTun)?;
    let (in_tx, in_rx) = sync_channel(RX_QUEUE_FRAMES);
    let (out_tx, out_rx) = sync_channel::<Vec<u8>>(TX_QUEUE_FRAMES);
    let counters = Arc::new(TapCounters::default());
    {
        let (bell, counters) = (bell.clone(), counters.clone());
        thread::Builder::new()
            .name("tap-in".into())
            .spawn(move || {
                logchannel::sched::promote_io_thread();
                pump_in(reader, &in_tx, &bell, &counters)
            })
            .map_err(Error::Spawn)?;
    }
    let writer = {
        let counters = counters.clone();
        let mut tap = tap;
        thread::Builder::new()
            .name("tap-out".into())
            .spawn(move || {
                logchannel::sched::promote_io_thread();
                while let Ok(frame) = out_rx.recv() {
                    // A TAP that is down, or whose queue is full, refuses
                    // frames: lost on the wire, as Ethernet allows.
                    if tap.write(&frame).is_err() {
                        counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .map_err(Error::Spawn)?
    };
    tracing::info!("net: TAP {name:?} attached, guest MAC {}", config.mac);
    Ok(NetPort::new(in_rx, out_tx, Some(writer), config, counters))
}

/// Reads frames until the TAP fails or the port is gone.
fn pump_in(mut tap: File, tx: &SyncSender<Vec<u8>>, bell: &Doorbell, counters: &TapCounters) {
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match tap.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => match tx.try_send(buf[..n].to_vec()) {
                Ok(()) => bell.ring(),
                Err(TrySendError::Full(_)) => {
                    counters.rx_queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => return,
            },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("net: reading the TAP failed: {e}");
                return;
            }
        }
    }
}

/// An `ifreq` naming `name`, or an error if the name cannot be one.
fn ifreq(name: &str) -> Result<libc::ifreq, Error> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) || name.contains('/')
    {
        return Err(Error::Name(name.to_string()));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of
    // integers, addresses and a pointer); all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// Attaches to the TAP `name` through /dev/net/tun.
fn open_tap(name: &str) -> Result<File, Error> {
    let mut req = ifreq(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(Error::OpenTun)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
    // is and which lives across the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(Error::Attach {
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Sets IFF_UP on interface `name` (SIOCGIFFLAGS, then SIOCSIFFLAGS).
fn set_up(name: &str) -> std::io::Result<()> {
    let mut req = ifreq(name).map_err(std::io::Error::other)?;
    // SAFETY: socket() has no memory effects; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; File closes it.
    let sock = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`, which
    // `req` is and which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just filled `ifru_flags`, the union member that
    // SIOCGIFFLAGS writes.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net_config::DEFAULT_MAC;

    fn config() -> NetConfig {
        NetConfig {
            mac: DEFAULT_MAC,
            ip: Some("198.18.0.2/24".parse().unwrap()),
            gateway: None,
        }
    }

    #[test]
    fn frames_are_offered_only_for_posted_buffers() {
        let (mut port, tx, _out) = NetPort::detached(config());
        for i in 0..3u8 {
            tx.send(vec![i; 60]).unwrap();
        }
        let mut out = Vec::new();
        port.take(&NetDemand { rx_buffers: 0 }, &mut out);
        assert!(out.is_empty());
        port.take(&NetDemand { rx_buffers: 2 }, &mut out);
        assert_eq!(out, vec![Input::Net(vec![0; 60]), Input::Net(vec![1; 60])]);
        out.clear();
        port.take(&NetDemand { rx_buffers: 5 }, &mut out);
        assert_eq!(out, vec![Input::Net(vec![2; 60])]);
        assert!(!port.input_closed());
        drop(tx);
        port.take(&NetDemand { rx_buffers: 5 }, &mut Vec::new());
        assert!(port.input_closed());
    }

    #[test]
    fn failover_announces_the_mac() {
        let (mut port, _tx, out) = NetPort::detached(config());
        port.announce();
        let req = out.try_recv().unwrap();
        assert_eq!(req.len(), 60);
        assert_eq!(&req[..6], &[0xff; 6]);
        assert_eq!(&req[6..12], &DEFAULT_MAC.0);
        assert_eq!(&req[12..14], &[0x08, 0x06]);
        assert_eq!(&req[20..22], &[0, 1]);
        assert_eq!(&req[28..32], &[198, 18, 0, 2]);
        assert_eq!(&req[38..42], &[198, 18, 0, 2]);
        let reply = out.try_recv().unwrap();
        assert_eq!(&reply[20..22], &[0, 2]);
        // No address, nothing to announce.
        let (mut port, _tx, out) = NetPort::detached(NetConfig {
            ip: None,
            ..config()
        });
        port.announce();
        assert!(out.try_recv().is_err());
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "a/b", "sixteen-bytes-xx", "nul\0"] {
            assert!(matches!(ifreq(bad), Err(Error::Name(_))), "{bad:?}");
        }
        assert!(ifreq("tap0").is_ok());
    }
}
