//! A partition of the logging link between two hosts (network namespaces),
//! with a real three-member etcd cluster as the arbiter: its members run
//! in the arbiter namespace on 198.18.0.3, which both hosts reach over the
//! service network while the A–B logging link is down. Exactly one side
//! wins at etcd and goes on, the other halts with its one-line message and
//! exit 5, the client (in the client namespace) keeps being served by the
//! winner with every acknowledged write, and etcd's keys for the VM show
//! one claim, the winner's, for the epoch.
//!
//! The scenario is the one failover_partition.rs runs against tas-server
//! (`twohost::partition_once`). A plain partition is a race, so it runs
//! twice; two more runs also unplug one host from the switch until the
//! other has won, so that both outcomes are exercised: the unplugged
//! host cannot reach etcd either, keeps retrying its claim without going
//! live, and once plugged back in finds the epoch held and halts.

mod common;
mod twohost;

use std::time::Instant;

use twohost::{partition_once, Also, ArbiterKind, Side};
use vmm::netns::Host;

#[test]
fn partition_with_etcd_as_the_arbiter_leaves_exactly_one_side() {
    let test = "failover_partition_etcd";
    if !common::kvm_available(test) || !twohost::netns_available(test) {
        return;
    }
    twohost::etcd::require_etcd(test);
    let started = Instant::now();
    let runs = [
        Also::Nothing,
        Also::Nothing,
        Also::Unplug(Host::B),
        Also::Unplug(Host::A),
    ];
    let mut winners = Vec::new();
    for (run, also) in (0..).zip(runs) {
        let t = Instant::now();
        let prefix = format!("fe{}r{run}", std::process::id());
        let (side, decided) = partition_once(&prefix, run, also, ArbiterKind::Etcd);
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
