//! Real Redis clients reach the `netkv` guest over its virtio-net NIC,
//! from the client namespace across the switch and host A's bridge, the way
//! a client on the LAN reaches a bridged VM: `redis-cli` (PING, SET, GET,
//! INCR, and a 1000-command `--pipe`) and `redis-benchmark` with 50
//! connections at once, both solo (`duet run`) and under FT (primary on A,
//! backup on B, the arbiter on its own host).
//!
//! Only correctness is asserted (replies, exit status, no error reported):
//! two cores shared with other work make rates meaningless here; the
//! `net` benchmark measures them.

mod common;
mod twohost;

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use twohost::{Pair, Solo, SoloMode};
use vmm::netns::{Host, Topology};

/// Limit for one client run.
const CLIENT_LIMIT: Duration = Duration::from_secs(30);

/// Commands in the `--pipe` batch.
const PIPED: usize = 1000;

/// `redis-cli -h GUEST -p 6379 ARGS` from the client namespace.
fn cli(topo: &Topology, addr: SocketAddr, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = topo.command(Host::Client, "redis-cli");
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args);
    run_bounded(&mut cmd, stdin, CLIENT_LIMIT)
}

/// Runs `redis-cli ARGS` and insists on exit 0 and exactly `want` on
/// stdout.
fn cli_expect(
    topo: &Topology,
    addr: SocketAddr,
    args: &[&str],
    want: &str,
    logs: &dyn Fn() -> String,
) {
    let o = cli(topo, addr, args, None);
    assert!(
        o.status.success() && stdout(&o).trim_end() == want,
        "redis-cli {args:?}: status {}, stdout {:?} (want {want:?}), stderr {:?}\n{}",
        o.status,
        stdout(&o),
        stderr(&o),
        logs()
    );
}

/// Everything the clients check, against the guest at `addr`.
fn clients_agree(topo: &Topology, addr: SocketAddr, tag: &str, logs: &dyn Fn() -> String) {
    cli_expect(topo, addr, &["PING"], "PONG", logs);
    let key = format!("{tag}:greeting");
    cli_expect(
        topo,
        addr,
        &["SET", &key, "hello over virtio-net"],
        "OK",
        logs,
    );
    cli_expect(topo, addr, &["GET", &key], "hello over virtio-net", logs);
    let counter = format!("{tag}:counter");
    for want in ["1", "2", "3"] {
        cli_expect(topo, addr, &["INCR", &counter], want, logs);
    }

    // A pipelined batch: redis-cli --pipe sends it all and counts replies.
    let mut batch = Vec::new();
    for i in 0..PIPED {
        let (k, v) = (format!("{tag}:pipe:{i}"), format!("v{i}"));
        batch.extend(resp::encode_str(&["SET", &k, &v]));
    }
    let o = cli(topo, addr, &["--pipe"], Some(&batch));
    let out = stdout(&o);
    assert!(
        o.status.success() && out.contains(&format!("errors: 0, replies: {PIPED}")),
        "redis-cli --pipe: status {}, stdout {out:?}, stderr {:?}\n{}",
        o.status,
        stderr(&o),
        logs()
    );
    for i in [0, PIPED / 2, PIPED - 1] {
        cli_expect(
            topo,
            addr,
            &["GET", &format!("{tag}:pipe:{i}")],
            &format!("v{i}"),
            logs,
        );
    }

    // 50 connections at once, each pipelining nothing but keeping its own
    // request in flight.
    let mut bench = topo.command(Host::Client, "redis-benchmark");
    bench
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-c", "50", "-n", "5000", "-t", "set,get", "--csv"]);
    let o = run_bounded(&mut bench, None, Duration::from_secs(60));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        o.status.success() && !all.contains("Error") && !all.contains("error"),
        "redis-benchmark -c 50: status {}, output {all}\n{}",
        o.status,
        logs()
    );
    eprintln!("{tag}: redis-benchmark -c 50:\n{all}");
    for test in ["\"SET\"", "\"GET\""] {
        assert!(
            all.contains(test),
            "redis-benchmark reported no {test}: {all}"
        );
    }
}

#[test]
fn clients_reach_a_solo_netkv() {
    if !kvm_available("clients_reach_a_solo_netkv") || !twohost::netns_available("net_clients") {
        return;
    }
    let t = Instant::now();
    let mut solo = Solo::start(&format!("ncs{}", std::process::id()), SoloMode::Run);
    drop(solo.wait_for_service(Duration::from_secs(30)));
    clients_agree(&solo.topo, solo.service(), "solo", &|| solo.logs());
    assert!(
        solo.vm.status().is_none(),
        "the VM exited under load\n{}",
        solo.logs()
    );
    eprintln!("solo: {:?}", t.elapsed());
}

#[test]
fn clients_reach_a_fault_tolerant_netkv() {
    if !kvm_available("clients_reach_a_fault_tolerant_netkv")
        || !twohost::netns_available("net_clients")
    {
        return;
    }
    let t = Instant::now();
    let mut pair = Pair::start_netkv(&format!("ncf{}", std::process::id()));
    drop(pair.wait_for_service(Duration::from_secs(30)));
    clients_agree(&pair.topo, pair.service(), "ft", &|| pair.logs());
    assert!(
        pair.primary.status().is_none() && pair.backup.status().is_none(),
        "a side exited under load\n{}",
        pair.logs()
    );
    // Both sides stop cleanly and agree on the final state: the backup
    // replayed every frame the primary's guest received.
    pair.primary.terminate().unwrap();
    let (p, b) = (
        pair.primary.wait_timeout(Duration::from_secs(20)),
        pair.backup.wait_timeout(Duration::from_secs(20)),
    );
    let logs = pair.logs();
    assert!(
        p.is_some_and(|s| s.success()) && b.is_some_and(|s| s.success()),
        "primary {p:?}, backup {b:?} after SIGTERM\n{logs}"
    );
    let state = |text: String| {
        text.lines()
            .find(|l| l.starts_with("duet: final state "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no final state line\n{logs}"))
    };
    assert_eq!(
        state(pair.primary.log_text()),
        state(pair.backup.log_text()),
        "{logs}"
    );
    pair.shutdown();
    eprintln!("ft: {:?}", t.elapsed());
}
