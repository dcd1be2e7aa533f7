//! Client TCP connections to the `netkv` guest survive a failover: the
//! primary is SIGKILLed in the middle of the clients' traffic, the backup
//! goes live on host B with the guest's TCP state exactly as the primary's
//! guest had it (every frame it received was logged, every frame it sent
//! was held until the backup had the log up to it), announces the guest's
//! MAC with a gratuitous ARP, and the clients' connections carry on: the
//! guest retransmits what the client never got, the client retransmits
//! what the guest never acknowledged, and no connection is reset.
//!
//! - `redis-benchmark -t set,get,incr -n 20000 -c 4` runs through the kill
//!   and finishes with exit 0 and no error. redis-benchmark without
//!   reconnect options treats a reset or a closed connection as fatal
//!   ("Error: Connection reset by peer", exit 1), so its success means its
//!   four connections carried on across the failover.
//! - A checking client holds one connection (one [`Conn`], never
//!   re-established) and writes numbered SETs back to back through the
//!   kill, one of them in flight at the moment of the kill, then reads
//!   every acknowledged one back on the same connection.

mod common;
mod twohost;

use std::time::{Duration, Instant};

use common::*;
use twohost::Pair;
use vmm::netns::Host;

/// How long the backup may take to go live after the kill (it is usually
/// well under a second; this only bounds the wait).
const GO_LIVE_LIMIT: Duration = Duration::from_secs(15);

/// Waits for the backup's "going live" line; panics with the logs if it
/// never comes.
fn assert_went_live(pair: &mut Pair) {
    let live = pair
        .backup
        .wait_for_log("backup: going live", GO_LIVE_LIMIT);
    assert!(live, "the backup never went live\n{}", pair.logs());
    assert!(
        pair.backup.status().is_none(),
        "the backup exited after going live\n{}",
        pair.logs()
    );
}

#[test]
fn redis_benchmark_runs_through_a_primary_kill() {
    if !kvm_available("redis_benchmark_runs_through_a_primary_kill")
        || !twohost::netns_available("net_failover")
    {
        return;
    }
    let t = Instant::now();
    let mut pair = Pair::start_netkv(&format!("nfb{}", std::process::id()));
    drop(pair.wait_for_service(Duration::from_secs(30)));
    let addr = pair.service();
    let mut cmd = pair.topo.command(Host::Client, "redis-benchmark");
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", "set,get,incr", "-n", "20000", "-c", "4"]);
    let out_path = pair.dir.path().join("redis-benchmark.log");
    let mut bench =
        Proc::logged("redis-benchmark", &mut cmd, &out_path).unwrap_or_else(|e| panic!("{e:#}"));

    // Kill once the benchmark shows progress (its `rps=` lines), or after
    // a second whatever it shows: either way in the middle of its run.
    let started = Instant::now();
    while !bench.log_text().contains("rps=") && started.elapsed() < Duration::from_secs(1) {
        assert!(
            bench.status().is_none(),
            "redis-benchmark ended before the kill: {}\n{}",
            bench.log_text(),
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        bench.status().is_none(),
        "redis-benchmark ended before the kill: {}",
        bench.log_text()
    );
    pair.primary.kill();
    let killed = Instant::now();
    eprintln!(
        "killed the primary {:?} into the benchmark",
        started.elapsed()
    );

    let status = bench.wait_timeout(Duration::from_secs(120));
    let out = bench.log_text();
    assert_went_live(&mut pair);
    assert!(
        status.is_some_and(|s| s.success()),
        "redis-benchmark across the failover: {status:?}\n{out}\n{}",
        pair.logs()
    );
    for bad in ["Error", "error", "Connection reset", "Connection refused"] {
        assert!(
            !out.contains(bad),
            "redis-benchmark said {bad:?} across the failover:\n{out}\n{}",
            pair.logs()
        );
    }
    for test in ["SET", "GET", "INCR"] {
        assert!(
            out.contains(&format!("====== {test} ======")) || out.contains(&format!("{test}: ")),
            "no {test} results:\n{out}"
        );
    }
    eprintln!(
        "redis-benchmark finished {:?} after the kill; test took {:?}",
        killed.elapsed(),
        t.elapsed()
    );
    pair.shutdown();
}

/// SETs written before the kill, and in all.
const BEFORE_KILL: usize = 300;
const SETS: usize = 800;

#[test]
fn one_connection_keeps_every_acknowledged_write_across_a_primary_kill() {
    if !kvm_available("one_connection_keeps_every_acknowledged_write_across_a_primary_kill")
        || !twohost::netns_available("net_failover")
    {
        return;
    }
    let t = Instant::now();
    let mut pair = Pair::start_netkv(&format!("nfc{}", std::process::id()));
    // The one connection of this test: made once, in the client namespace,
    // and used for every command below. Any error on it fails the test, so
    // the test passes only if it was never reset or re-established.
    let mut conn = pair.wait_for_service(Duration::from_secs(30));
    let local = conn.stream().local_addr().unwrap();
    // The reply to the SET in flight at the kill waits for the failover.
    let limit = Duration::from_secs(20);
    let mut longest = Duration::ZERO;
    let mut killed = None;
    for i in 0..SETS {
        let (k, v) = (format!("n:{i}"), format!("value-{i}"));
        conn.send(&["SET", &k, &v])
            .unwrap_or_else(|e| panic!("sending SET #{i}: {e}\n{}", pair.logs()));
        let sent = Instant::now();
        if i == BEFORE_KILL {
            pair.primary.kill();
            killed = Some(Instant::now());
        }
        match conn.reply(limit) {
            Ok(r) if r.is_ok() => {}
            other => panic!(
                "SET #{i} (kill at #{BEFORE_KILL}) on the one connection got {other:?}\n{}",
                pair.logs()
            ),
        }
        longest = longest.max(sent.elapsed());
    }
    assert_went_live(&mut pair);
    // Every write was acknowledged on this connection; all are on the new
    // primary, read back on the same connection.
    for i in 0..SETS {
        let want = format!("value-{i}");
        match conn.call(&["GET", &format!("n:{i}")], Duration::from_secs(5)) {
            Ok(Reply::Bulk(Some(got))) if got == want.as_bytes() => {}
            other => panic!(
                "acknowledged SET n:{i} read back as {other:?} on the same connection\n{}",
                pair.logs()
            ),
        }
    }
    assert!(
        conn.pending().is_empty(),
        "stray bytes after the last reply"
    );
    assert_eq!(
        conn.stream().local_addr().unwrap(),
        local,
        "the connection changed"
    );
    eprintln!(
        "{SETS} SETs and GETs on one connection; longest SET {longest:?}; \
         {:?} since the kill; test took {:?}",
        killed.map(|k| k.elapsed()),
        t.elapsed()
    );
    drop(conn);
    pair.shutdown();
}
