//! `netkv`: the Redis-compatible server of `kv` (the same RESP2 command
//! set, from `duet-resp`), on TCP port 6379 over a virtio-net NIC, with
//! smoltcp as the TCP/IP stack, all in ring 3.
//!
//! The NIC is virtio-mmio at 0xf000_2000 on PIC IRQ 5; the IPv4 address,
//! prefix and gateway come from the `duet-pv` device. Time for the stack is
//! `duet-pv`'s clock and its random seed is `duet-pv` entropy, so a run is
//! replayable. COM1 carries only start-up and fatal messages.
//!
//! The main loop is built around exits (each device access costs a VM exit,
//! about 26 µs from ring 3): one wake reads the clock once, acknowledges
//! the NIC only if it interrupted, lets smoltcp take every frame waiting in
//! the receive ring, answers every whole request on every connection,
//! lets smoltcp send the replies, then notifies the device once per queue.
//! It idles with `wait()` until the next interrupt, skipping even the clock
//! read on timer ticks that come before smoltcp's next deadline.

#![no_std]
#![no_main]

extern crate alloc;

mod hal;
mod nic;
mod server;

use alloc::vec::Vec;

use duet_rt::{println, Ipv4Config};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use nic::Nic;
use server::Server;

duet_rt::entry!(main, pit_hz = PIT_HZ);

/// The timer rate: smoltcp's shortest timer is the 10 ms delayed ACK, and
/// TCP's others are far longer, so 100 Hz is enough.
const PIT_HZ: u32 = 100;
const TICK: Duration = Duration::from_micros(1_000_000 / PIT_HZ as u64);

/// PIC line of the NIC.
const NIC_IRQ: u8 = 5;

/// Exit codes of a guest that cannot serve.
mod exit_code {
    /// `duet-pv` reports no IPv4 address: the VM has no network.
    pub const NO_NETWORK: u8 = 0x60;
    /// The network is configured but the NIC is missing or unusable.
    pub const NO_NIC: u8 = 0x61;
}

fn now() -> Instant {
    Instant::from_micros((duet_rt::clock_ns() / 1_000) as i64)
}

fn main() {
    let Some(net) = duet_rt::net_config() else {
        println!("netkv: no network configured (duet-pv has no IPv4 address); give the VM a NIC");
        duet_rt::power_off(exit_code::NO_NETWORK);
    };
    let mut nic = match Nic::new() {
        Ok(nic) => nic,
        Err(e) => {
            println!("netkv: {e}");
            duet_rt::power_off(exit_code::NO_NIC);
        }
    };
    let mac = nic.mac();
    let mut iface = interface(&mut nic, mac, &net);
    let mut sockets = SocketSet::new(Vec::with_capacity(server::SOCKETS));
    let mut server = Server::new(&mut sockets);
    print_config(mac, &net);
    duet_rt::enable_irq(NIC_IRQ);

    // The PIT tick by which smoltcp next needs a poll without new frames.
    let mut deadline_tick = 0;
    loop {
        // A wake with no NIC interrupt, no frame waiting and no timer due
        // costs only the wait itself.
        if !nic.interrupted() && !nic.rx_ready() && duet_rt::ticks() < deadline_tick {
            duet_rt::wait();
            continue;
        }
        // Busy: the device need not interrupt while this loop polls anyway.
        // Acknowledge first, so that a device that keeps its line raised
        // until then is not re-injected while the clock is read.
        nic.set_interrupts(false);
        nic.ack_interrupt();
        let timestamp = now();
        let tick = duet_rt::ticks();
        // Every frame waiting is taken (and answered at the stack level:
        // ACKs, SYN-ACKs), then every whole request on every connection is
        // answered, then the replies go out.
        iface.poll(timestamp, &mut nic, &mut sockets);
        server.serve(&mut sockets);
        iface.poll(timestamp, &mut nic, &mut sockets);
        nic.flush();

        let delay = iface.poll_delay(timestamp, &sockets);
        if delay == Some(Duration::ZERO) {
            deadline_tick = 0;
            continue;
        }
        deadline_tick = match delay {
            // Round up: waking a tick late is harmless to TCP's timers,
            // waking early only costs a poll.
            Some(d) => tick + d.total_micros().div_ceil(TICK.total_micros()),
            None => u64::MAX,
        };
        nic.set_interrupts(true);
        // A frame that arrived while interrupts were off raised none.
        if nic.rx_ready() {
            continue;
        }
        duet_rt::wait();
    }
}

/// The smoltcp interface with the address and route from `duet-pv`.
fn interface(nic: &mut Nic, mac: [u8; 6], net: &Ipv4Config) -> Interface {
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    // TCP initial sequence numbers and ephemeral ports derive from this;
    // duet-pv entropy is logged, so the backup draws the same.
    config.random_seed = duet_rt::entropy();
    let mut iface = Interface::new(config, nic, now());
    let addr = IpAddress::Ipv4(Ipv4Address::from(net.addr));
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(addr, net.prefix_len))
            .expect("room for one address");
    });
    if let Some(gateway) = net.gateway {
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(gateway))
            .expect("room for the default route");
    }
    iface
}

fn print_config(mac: [u8; 6], net: &Ipv4Config) {
    let [a, b, c, d] = net.addr;
    let m = mac;
    duet_rt::print!(
        "netkv: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip {a}.{b}.{c}.{d}/{}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        net.prefix_len
    );
    if let Some([a, b, c, d]) = net.gateway {
        duet_rt::print!(" gw {a}.{b}.{c}.{d}");
    }
    println!(" port {}", server::PORT);
}
