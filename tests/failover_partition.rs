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
//! halts. The scenario is `twohost::partition_once`, which
//! failover_partition_etcd.rs runs with etcd as the arbiter.

mod common;
mod twohost;

use std::time::Instant;

use twohost::{partition_once, Also, ArbiterKind, Side};
use vmm::netns::Host;

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
        let prefix = format!("fp{}r{run}", std::process::id());
        let (side, decided) = partition_once(&prefix, run, also, ArbiterKind::Tas);
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
