//! The virtio-net NIC as far as it can be checked without a guest that
//! drives it (the `netkv` guest does that end to end):
//! - `--tap` creates the TAP and brings it up, the guest boots and runs as
//!   it does without a NIC, and frames arriving on the TAP while the guest
//!   has posted no receive buffer wait (they are not logged, so a replay
//!   still matches);
//! - the NIC and the guest's identity are part of the machine: a replay
//!   must name the same NIC, and a backup with another MAC is refused at
//!   the handshake.
//!
//! Everything runs inside network namespaces the test makes (and removes),
//! with addresses from 198.18.0.0/15.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A network namespace that is deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("duettest-nd{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot create network namespace {name} (needs root and iproute2)"
        );
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `cmd` run inside the namespace.
    fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    fn duet(&self) -> Command {
        self.exec(env!("CARGO_BIN_EXE_duet"))
    }

    /// Runs `ip ARGS` in the namespace; returns its stdout, or None if it
    /// failed.
    fn ip(&self, args: &[&str]) -> Option<String> {
        let o = self.exec("ip").args(args).output().ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn assert_ok(o: &std::process::Output, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: status {:?}, stderr: {}",
        o.status,
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{what}: {}", stderr(o));
}

#[test]
fn a_tap_backed_nic_records_and_replays() {
    if !kvm_available("a_tap_backed_nic_records_and_replays") {
        return;
    }
    let ns = Netns::new("rec");
    let dir = tempdir("net-device");
    let log = dir.path().join("kv.log");
    let net = ["--guest-ip", "198.18.0.2/24", "--gateway", "198.18.0.1"];
    let mut rec = ns.duet();
    rec.args([
        "record", "--image", "kv", "--serial", "none", "--tap", "dn0",
    ])
    .args(net)
    .arg("--log")
    .arg(&log);
    let mut running = launch(&mut rec, false);
    // The TAP appears, up, while the guest runs.
    let end = Instant::now() + Duration::from_secs(20);
    let link = loop {
        match ns.ip(&["-o", "link", "show", "dn0"]) {
            Some(l) if l.contains(",UP") || l.contains("<UP") => break l,
            _ if Instant::now() > end => panic!("no TAP dn0 came up in {:?}", ns.ip(&["link"])),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(link.contains("dn0"), "{link}");
    // Traffic from the host side: ARP requests for the guest reach the
    // TAP. The guest has no RX buffer posted, so they wait and nothing is
    // logged for them.
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "dn0"])
        .expect("address on dn0");
    for _ in 0..3 {
        let _ = ns
            .exec("ip")
            .args(["neigh", "flush", "dev", "dn0"])
            .status();
        // A datagram to the guest makes the kernel ARP for it.
        let _ = ns
            .exec("bash")
            .args(["-c", "echo x > /dev/udp/198.18.0.2/9 2>/dev/null || true"])
            .status();
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    running.terminate().unwrap();
    let o = finish(running, LIMIT);
    assert_ok(&o, "record with --tap");
    let recorded = final_state(&o);

    let (header, records) = read_log(&log);
    assert!(
        header.machine.contains(
            "net=virtio-net-mmio/2@0xf0002000,irq5 mac=52:54:00:12:34:56 ip=198.18.0.2/24 gw=198.18.0.1"
        ),
        "{}",
        header.machine
    );
    assert!(
        !records
            .iter()
            .any(|r| matches!(r.event, logchannel::Event::NetFrame { .. })),
        "a frame was logged although the guest posted no buffer"
    );

    // Replay opens no TAP: it runs outside the namespace.
    let replay = |extra: &[&str]| {
        let mut cmd = duet();
        cmd.args(["replay", "--image", "kv", "--output", "/dev/null", "--log"])
            .arg(&log)
            .args(extra);
        run_bounded(&mut cmd, None, LIMIT)
    };
    let o = replay(&["--net"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("different machine"), "{}", stderr(&o));
    let o = replay(&[]);
    assert!(stderr(&o).contains("different machine"), "{}", stderr(&o));
    let mut other_mac = net.to_vec();
    other_mac.extend(["--mac", "02:00:00:00:00:01"]);
    let o = replay(&other_mac);
    assert!(stderr(&o).contains("different machine"), "{}", stderr(&o));
    let o = replay(&net);
    assert_ok(&o, "replay with the same NIC");
    assert_eq!(final_state(&o), recorded);
}

#[test]
fn a_backup_with_another_mac_is_refused() {
    if !kvm_available("a_backup_with_another_mac_is_refused") {
        return;
    }
    let ns = Netns::new("pair");
    let listen: std::net::SocketAddr = "127.0.0.1:7411".parse().unwrap();
    let mut backup = ns.duet();
    backup
        .args(["backup", "--image", "kv", "--vm-id", "nd", "--listen"])
        .arg(listen.to_string())
        .args(["--tap", "dnb0", "--mac", "02:00:00:00:00:02"]);
    let backup = launch(&mut backup, false);
    let mut primary = ns.duet();
    primary
        .args([
            "primary", "--image", "kv", "--vm-id", "nd", "--serial", "none",
        ])
        .args([
            "--backup",
            &listen.to_string(),
            "--connect-timeout-ms",
            "10000",
        ])
        .args(["--tap", "dnp0", "--mac", "02:00:00:00:00:01"]);
    let o = run_bounded(&mut primary, None, LIMIT);
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("refused"), "{err}");
    assert!(
        err.contains("02:00:00:00:00:0"),
        "the reason names the NIC: {err}"
    );
    // The refused primary never opened its TAP, and the backup never does
    // before it goes live.
    assert!(ns.ip(&["link", "show", "dnp0"]).is_none());
    assert!(ns.ip(&["link", "show", "dnb0"]).is_none());
    drop(backup);
}
