//! Failover when a process of the pair dies, on loopback.
//!
//! - Kill the primary: `duet demo` itself (arbiter, primary and backup as
//!   processes, a checked SET/INCR workload) at several random moments.
//!   Every acknowledged SET must be on the new primary, the counter must lie
//!   between the acknowledged and the sent INCRs, and the backup must go
//!   live exactly once.
//! - Kill the backup: the primary wins the arbiter, continues alone, and its
//!   output flows without waiting for acknowledgements: the write in flight
//!   at the kill and the writes after it are answered, and every
//!   acknowledged write is there. (How fast it goes on is the failover
//!   benchmark's business, not a test's.)

mod common;

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
    let mut rng = seed::rng(
        "killing_the_primary_at_random_moments_loses_no_acknowledged_write",
        None,
    );
    let out_dir = tempdir("failover-kill-demo");
    for trial in 0..3 {
        let kill_after = 20 + rng.below(230);
        let o = run_bounded(
            duet()
                .args(["demo", "--serial", "--ops", "260"])
                .arg("--out")
                .arg(out_dir.path())
                .args([
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
        // Every SET before the kill went to a healthy pair, and the new
        // primary took more after it.
        let acked: u64 = acked.trim().parse().unwrap();
        assert!(
            acked > kill_after,
            "trial {trial}: {acked} SETs acknowledged, killed after {kill_after}:\n{out}"
        );
        assert!(field(&out, "counter").ends_with(": yes"), "{out}");
        assert_eq!(field(&out, "backup went live"), "1 time(s)", "{out}");
        let arb = field(&out, "arbiter state");
        assert!(
            arb.contains("backup@"),
            "the backup must hold the pair: {arb}"
        );
        let failover = field(&out, "failover time");
        assert!(
            failover.ends_with("from SIGKILL to the first reply from the new primary"),
            "trial {trial}: no reply from the new primary: {failover}"
        );
    }
}

/// Sets `key` to `value`; panics unless `+OK` comes within `limit`.
fn set_ok(c: &mut Conn, key: &str, value: &str, limit: Duration) {
    match c.call(&["SET", key, value], limit) {
        Ok(r) if r.is_ok() => {}
        other => panic!("SET {key} got {other:?}"),
    }
}

#[test]
fn killing_the_backup_leaves_the_primary_alone_and_unheld() {
    if !kvm_available("killing_the_backup_leaves_the_primary_alone_and_unheld") {
        return;
    }
    let dir = tempdir("kill-backup");
    let (tas_addr, chan, service, metrics) = (free_addr(), free_addr(), free_addr(), free_addr());
    let _tas = Proc::spawn(
        "arbiter",
        Command::new(tas_server_bin())
            .args(["--listen", &tas_addr.to_string()])
            .arg("--state")
            .arg(dir.path().join("tas.state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    wait_for_port(tas_addr, Duration::from_secs(10));
    let mut backup = launch(
        backup_cmd("kv", "kb", chan)
            .args(["--tas", &tas_addr.to_string()])
            .env("DUET_LOG", "info"),
        false,
    );
    let mut primary = launch(
        primary_cmd("kv", "kb", chan)
            .args(["--tas", &tas_addr.to_string()])
            .args(["--serial", &format!("tcp:{service}")])
            .args(["--metrics", &metrics.to_string()])
            .env("DUET_LOG", "info"),
        false,
    );
    wait_for_port(service, Duration::from_secs(20));
    let limit = Duration::from_secs(10);
    let mut c = connect(service, limit);
    let mut acked = Vec::new();
    for i in 0..10 {
        let (k, v) = (format!("before:{i}"), format!("b{i}"));
        set_ok(&mut c, &k, &v, limit);
        acked.push((k, v));
    }

    backup.signal(libc::SIGKILL).unwrap();
    // In flight at the kill: held until the primary has won the arbiter,
    // then released.
    set_ok(&mut c, "at-kill", "k", limit);
    acked.push(("at-kill".into(), "k".into()));
    let end = Instant::now() + limit;
    let m = loop {
        let m = scrape(metrics);
        if m.get("duet_arbiter_state") == Some(2.0) || Instant::now() >= end {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(m.get("duet_arbiter_state"), Some(2.0), "{m:?}");
    // Alone: writes go on, and no output waits for an acknowledgement.
    for i in 0..20 {
        let (k, v) = (format!("after:{i}"), format!("a{i}"));
        set_ok(&mut c, &k, &v, limit);
        acked.push((k, v));
    }
    assert_eq!(scrape(metrics).get("duet_outputs_held"), Some(0.0));
    for (k, v) in &acked {
        assert_eq!(
            c.call(&["GET", k], limit).unwrap(),
            Reply::bulk(v),
            "acknowledged {k}={v} is missing"
        );
    }
    let status = tas_server::client::Client::new(tas_addr, Duration::from_secs(2))
        .status()
        .unwrap();
    let holders: Vec<&String> = status.vms.iter().flat_map(|v| v.holders.values()).collect();
    assert_eq!(holders.len(), 1, "{status:?}");
    assert!(holders[0].starts_with("primary@"), "{status:?}");

    primary.terminate().unwrap();
    let o = finish(primary, Duration::from_secs(10));
    assert!(o.status.success(), "{:?} {}", o.status, stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("continuing alone"), "{err}");
}
