//! A partition of the logging link between two hosts (network namespaces),
//! with the arbiter and the clients still reachable from both: exactly one
//! side wins the arbiter and goes on, the other halts with exit 5, and the
//! client never gets an answer from the loser after the cut.
//!
//! The processes run under `ip netns exec`; the test's own client and its
//! arbiter status queries use sockets made on a thread that entered the
//! client namespace (`Topology::in_namespace`), so that one connection can
//! be held across the cut and every reply attributed to it.
//!
//! Which side wins a plain partition is a race, so it runs several times,
//! and either outcome must satisfy every check. Two more runs make sure
//! both outcomes are exercised: one side is also unplugged from the switch
//! for a moment (a host that lost both its links), so the other side wins
//! the arbiter first; plugged back in, the isolated side claims, loses and
//! halts.

mod common;
mod twohost;

use std::time::{Duration, Instant};

use common::{resp, Reply};
use twohost::{check_acked, set_ok, Pair, Side};
use vmm::netns::Host;

const KEYS: usize = 20;

/// What goes wrong besides the logging link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Also {
    Nothing,
    /// This host is also unplugged from the service network until the
    /// other side has won.
    Unplug(Host),
}

fn partition_once(run: u32, also: Also) -> (Side, Duration) {
    let prefix = format!("fp{}r{run}", std::process::id());
    let mut pair = Pair::start(&prefix);
    let mut conn = pair.wait_for_service(Duration::from_secs(30));
    let limit = Duration::from_secs(5);
    let mut acked = Vec::new();
    for i in 0..KEYS {
        let (k, v) = (format!("before:{i}"), format!("b{run}-{i}"));
        set_ok(&mut conn, &k, &v, limit, || pair.logs());
        acked.push((k, v));
    }

    let cut = Instant::now();
    pair.topo.cut_logging_link().unwrap();
    if let Also::Unplug(host) = also {
        pair.topo.unplug(host).unwrap();
    }
    // Sent on the primary's connection during the partition: its reply is
    // held until someone wins.
    conn.send(&["SET", "during", "d"]).unwrap();
    if let Also::Unplug(host) = also {
        // The connected side wins; then the isolated one comes back.
        let winner = if host == Host::A {
            "backup: going live"
        } else {
            "continuing alone"
        };
        let side = if host == Host::A {
            &mut pair.backup
        } else {
            &mut pair.primary
        };
        assert!(
            side.wait_for_log(winner, Duration::from_secs(10)),
            "with {host} unplugged, the other side did not win\n{}",
            pair.logs()
        );
        assert!(
            pair.primary.status().is_none() && pair.backup.status().is_none(),
            "the unplugged side halted without reaching the arbiter\n{}",
            pair.logs()
        );
        pair.topo.plug(host).unwrap();
    }
    let (survivor, seen) = pair.outcome(Duration::from_secs(15));
    let decided = seen - cut;
    eprintln!("run {run}: the {survivor:?} won {decided:?} after the cut");

    let logs = pair.logs();
    let went_live = pair.backup.log_text().contains("backup: going live");
    match survivor {
        Side::Primary => {
            // The primary goes on alone and releases what it held.
            match conn.reply(limit) {
                Ok(Reply::Simple(s)) if s == "OK" => acked.push(("during".into(), "d".into())),
                other => {
                    panic!("the winning primary did not answer the held SET: {other:?}\n{logs}")
                }
            }
            assert!(!went_live, "the losing backup went live\n{logs}");
            assert_eq!(pair.topo.vip_holder().unwrap(), Some(Host::A), "{logs}");
        }
        Side::Backup => {
            // The loser must never release held output. It has exited, so
            // anything it sent is already on the way.
            match conn.reply(Duration::from_secs(1)) {
                Err(resp::Error::Timeout | resp::Error::Closed(_)) => {}
                Err(e @ resp::Error::Protocol(_)) => panic!("{e}\n{logs}"),
                Ok(r) => panic!("the losing primary answered after the cut: {r:?}\n{logs}"),
            }
            assert!(went_live, "the backup won but never went live\n{logs}");
            assert_eq!(pair.topo.vip_holder().unwrap(), Some(Host::B), "{logs}");
            conn = pair.wait_for_service(Duration::from_secs(15));
        }
    }
    pair.check_arbiter_names(survivor);

    // The survivor serves new writes, and has every acknowledged one.
    for i in 0..KEYS {
        let (k, v) = (format!("after:{i}"), format!("a{run}-{i}"));
        set_ok(&mut conn, &k, &v, limit, || pair.logs());
        acked.push((k, v));
    }
    check_acked(&mut conn, &acked, || pair.logs());
    assert!(
        pair.proc_of(survivor).status().is_none(),
        "the surviving {survivor:?} exited\n{}",
        pair.logs()
    );
    drop(conn);
    pair.shutdown();
    (survivor, decided)
}

#[test]
fn partition_of_the_logging_link_leaves_exactly_one_side() {
    if !common::kvm_available("failover_partition")
        || !twohost::netns_available("failover_partition")
    {
        return;
    }
    let started = Instant::now();
    let mut winners = Vec::new();
    let runs = [
        Also::Nothing,
        Also::Nothing,
        Also::Nothing,
        Also::Unplug(Host::B),
        Also::Unplug(Host::A),
    ];
    for (run, also) in (0..).zip(runs) {
        let t = Instant::now();
        let (side, decided) = partition_once(run, also);
        match also {
            Also::Unplug(Host::B) => assert_eq!(side, Side::Primary),
            Also::Unplug(_) => assert_eq!(side, Side::Backup),
            Also::Nothing => {}
        }
        eprintln!(
            "run {run} ({also:?}): {side:?} survived, the loser exited {decided:?} after the cut, run took {:?}",
            t.elapsed()
        );
        winners.push(side);
    }
    eprintln!("winners: {winners:?} in {:?}", started.elapsed());
}
