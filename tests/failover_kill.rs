//! Failover when a process of the pair dies, on loopback.
//!
//! - Kill the primary: `duet demo` itself (arbiter, primary and backup as
//!   processes, a checked SET/INCR workload) at several random moments.
//!   Every acknowledged SET must be on the new primary, the counter must lie
//!   between the acknowledged and the sent INCRs, and the backup must go
//!   live exactly once.
//! - Kill the backup: the primary wins the arbiter, continues alone, and its
//!   output flows without waiting for acknowledgements.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
        .trim()
}

#[test]
fn killing_the_primary_at_random_moments_loses_no_acknowledged_write() {
    if !kvm_available("killing_the_primary_at_random_moments_loses_no_acknowledged_write") {
        return;
    }
    let tas = tas_server_bin();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed | 1);
    for trial in 0..3 {
        let kill_after = 20 + rng.below(230);
        let o = run_bounded(
            duet().args(["demo", "--ops", "260"]).args([
                "--kill-after",
                &kill_after.to_string(),
                "--tas-server",
                tas.to_str().unwrap(),
            ]),
            None,
            Duration::from_secs(120),
        );
        let out = stdout(&o);
        assert!(
            o.status.success(),
            "trial {trial} (kill after {kill_after}) failed: {:?}\n{out}\n{}",
            o.status,
            stderr(&o)
        );
        // The demo checks; the test re-reads its account so that a demo that
        // stopped checking would fail here.
        let writes = field(&out, "writes acknowledged");
        let (acked, rest) = writes
            .split_once(" SETs; verified present on the new primary: ")
            .unwrap();
        assert_eq!(acked.trim(), rest.trim(), "trial {trial}: {writes}");
        assert!(acked.trim().parse::<u64>().unwrap() >= 250, "{writes}");
        assert!(field(&out, "counter").ends_with(": yes"), "{out}");
        assert_eq!(field(&out, "backup went live"), "1 time(s)", "{out}");
        let arb = field(&out, "arbiter state");
        assert!(
            arb.contains("backup@"),
            "the backup must hold the pair: {arb}"
        );
        assert!(out.contains("failover time"), "{out}");
    }
}

/// Sends one RESP command and reads one line of reply, bounded.
fn ping(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 64];
    while !reply.ends_with(b"\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn killing_the_backup_leaves_the_primary_alone_and_unheld() {
    if !kvm_available("killing_the_backup_leaves_the_primary_alone_and_unheld") {
        return;
    }
    let dir = TempDir::new("kill-backup");
    let (tas_addr, chan, service, metrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let tas = Guard(
        Command::new(tas_server_bin())
            .args(["--listen", &tas_addr.to_string()])
            .arg("--state")
            .arg(dir.join("tas.state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(tas_addr, Duration::from_secs(10));
    let backup = Running::start(
        backup_cmd("kv", "kb", chan)
            .args(["--tas", &tas_addr.to_string()])
            .env("DUET_LOG", "info"),
        false,
    );
    let primary = Running::start(
        primary_cmd("kv", "kb", chan)
            .args(["--tas", &tas_addr.to_string()])
            .args(["--serial", &format!("tcp:{service}")])
            .args(["--metrics", &metrics.to_string()])
            .env("DUET_LOG", "info"),
        false,
    );
    wait_for_port(service, Duration::from_secs(20));
    let mut c = connect(service, Duration::from_secs(5));
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ping(&mut c).unwrap(), "+PONG\r\n");

    send_signal(backup.pid(), libc::SIGKILL);
    let killed = Instant::now();
    // The primary notices, wins the arbiter and goes on alone: replies keep
    // coming, and soon none waits for an acknowledgement that cannot come.
    let mut replies = 0;
    while killed.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            ping(&mut c).unwrap(),
            "+PONG\r\n",
            "the primary stopped answering"
        );
        replies += 1;
    }
    assert!(
        replies > 50,
        "only {replies} replies in 3 s after the backup died"
    );
    let text = scrape_metrics(metrics).expect("metrics");
    assert_eq!(metric(&text, "duet_arbiter_state"), Some(2.0), "{text}");
    assert_eq!(metric(&text, "duet_outputs_held"), Some(0.0), "{text}");
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(ping(&mut c).unwrap(), "+PONG\r\n");
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "20 PINGs took {:?} with nobody to wait for",
        t.elapsed()
    );
    let status = tas_server::client::Client::new(tas_addr, Duration::from_secs(2))
        .status()
        .unwrap();
    let holders: Vec<&String> = status.vms.iter().flat_map(|v| v.holders.values()).collect();
    assert_eq!(holders.len(), 1, "{status:?}");
    assert!(holders[0].starts_with("primary@"), "{status:?}");

    primary.terminate();
    let o = primary.finish(Duration::from_secs(10));
    assert!(o.status.success(), "{:?} {}", o.status, stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("continuing alone"), "{err}");
    drop(backup);
    drop(tas);
}
