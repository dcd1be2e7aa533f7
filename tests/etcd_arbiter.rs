//! The etcd arbiter against a real three-member etcd cluster on loopback
//! (no KVM): one winner per (VM, epoch) among concurrent claimants, with a
//! member killed in the middle of the race too; the reference semantics
//! (re-claim, superseded, raised epoch, new_epoch); durability across
//! restarts; and, with quorum lost, bounded failed attempts and nobody
//! granted until the quorum is back.

mod etcd;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use etcd::Cluster;
use vmm::ft::arbiter::etcd::{EtcdArbiter, ATTEMPT_TIMEOUT};
use vmm::ft::arbiter::{Arbiter, ArbiterAddr, Backend, ClaimOutcome};

/// Attempts that failed as unreachable, in this test binary: shows that a
/// kill landed in the middle of a race.
static RETRIES: AtomicUsize = AtomicUsize::new(0);

/// Claims, retrying while etcd is unreachable, for at most `limit`.
fn claim(arb: &mut EtcdArbiter, vm: &str, epoch: u64, who: &str, limit: Duration) -> ClaimOutcome {
    let end = Instant::now() + limit;
    loop {
        match arb.test_and_set(vm, epoch, who) {
            Ok(outcome) => return outcome,
            Err(e) if e.is_unreachable() && Instant::now() < end => {
                RETRIES.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{who} claiming {vm}/{epoch}: {e:?}"),
        }
    }
}

/// When [`race`] calls its hook for an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the claimants are released.
    Before,
    /// Right after, while they race.
    Racing,
}

/// `claimants` threads claim each of `epochs` together (a barrier per
/// epoch); `between` runs on this thread just before each epoch's race and
/// again as it starts. Returns, per epoch, every claimant's outcome.
fn race(
    endpoints: &[String],
    vm: &str,
    claimants: usize,
    epochs: u64,
    mut between: impl FnMut(u64, Phase),
) -> Vec<Vec<(String, ClaimOutcome)>> {
    let start = Arc::new(Barrier::new(claimants + 1));
    let threads: Vec<_> = (0..claimants)
        .map(|c| {
            let endpoints = endpoints.to_vec();
            let start = start.clone();
            let vm = vm.to_owned();
            std::thread::spawn(move || {
                let mut arb = EtcdArbiter::connect(&endpoints).expect("client");
                let who = format!("claimant-{c}");
                (1..=epochs)
                    .map(|epoch| {
                        start.wait();
                        let outcome = claim(&mut arb, &vm, epoch, &who, Duration::from_secs(30));
                        (who.clone(), outcome)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for epoch in 1..=epochs {
        between(epoch, Phase::Before);
        start.wait();
        between(epoch, Phase::Racing);
    }
    let per_thread: Vec<Vec<_>> = threads
        .into_iter()
        .map(|t| t.join().expect("claimant thread"))
        .collect();
    (0..epochs as usize)
        .map(|e| per_thread.iter().map(|t| t[e].clone()).collect())
        .collect()
}

/// Exactly one `Granted` per epoch, everyone else `HeldBy` that winner (no
/// `Superseded`: the next epoch's claims start only once all of this one's
/// are answered). Returns the winners.
fn one_winner_each(
    results: &[Vec<(String, ClaimOutcome)>],
    logs: impl Fn() -> String,
) -> Vec<String> {
    let mut winners = Vec::new();
    for (i, outcomes) in results.iter().enumerate() {
        let epoch = i as u64 + 1;
        let granted: Vec<&String> = outcomes
            .iter()
            .filter(|(_, o)| *o == ClaimOutcome::Granted)
            .map(|(w, _)| w)
            .collect();
        assert_eq!(granted.len(), 1, "epoch {epoch}: {outcomes:?}\n{}", logs());
        for (who, o) in outcomes {
            match o {
                ClaimOutcome::Granted => {}
                ClaimOutcome::HeldBy { holder } => {
                    assert_eq!(holder, granted[0], "epoch {epoch}, {who}: {outcomes:?}")
                }
                ClaimOutcome::Superseded { .. } => {
                    panic!("epoch {epoch}, {who} superseded: {outcomes:?}")
                }
            }
        }
        winners.push(granted[0].clone());
    }
    winners
}

#[test]
fn one_winner_among_concurrent_claimants_and_the_decision_stands() {
    let started = Instant::now();
    let mut cluster = Cluster::start("race", 3);
    let results = race(&cluster.endpoints(), "race-vm", 16, 5, |_, _| {});
    let winners = one_winner_each(&results, || cluster.logs());
    eprintln!("winners: {winners:?} after {:?}", started.elapsed());

    // Asking again: on the current epoch (5) the winner is granted again
    // and anyone else sees it held; the winner of an older one is now
    // superseded.
    let mut arb = cluster.arbiter();
    let t = Duration::from_secs(10);
    assert_eq!(
        claim(&mut arb, "race-vm", 5, &winners[4], t),
        ClaimOutcome::Granted
    );
    assert_eq!(
        claim(&mut arb, "race-vm", 5, "someone-else", t),
        ClaimOutcome::HeldBy {
            holder: winners[4].clone()
        }
    );
    assert_eq!(
        claim(&mut arb, "race-vm", 1, &winners[0], t),
        ClaimOutcome::Superseded { current_epoch: 5 }
    );

    // The decisions survive one member's restart, read from that member
    // alone, and a restart of the whole cluster.
    cluster.kill(0);
    cluster.restart(0);
    cluster.wait_healthy(Duration::from_secs(30));
    let mut m0 = cluster.arbiter_of(0);
    for (i, winner) in winners.iter().enumerate() {
        let (current, holder) = m0.decision("race-vm", i as u64 + 1).expect("read");
        assert_eq!(current, 5);
        assert_eq!(holder.as_ref(), Some(winner), "epoch {}", i + 1);
    }
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_healthy(Duration::from_secs(30));
    let mut arb = cluster.arbiter();
    assert_eq!(
        claim(&mut arb, "race-vm", 5, "late", t),
        ClaimOutcome::HeldBy {
            holder: winners[4].clone()
        },
        "{}",
        cluster.logs()
    );
    assert_eq!(
        claim(&mut arb, "race-vm", 5, &winners[4], t),
        ClaimOutcome::Granted
    );
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn claims_follow_the_reference_semantics() {
    let cluster = Cluster::start("semantics", 3);
    let mut arb = cluster.arbiter();
    let t = Duration::from_secs(10);
    let vm = "sem/vm 1"; // escaped into its own directory
                         // new_epoch counts from 1, durably, one more each time.
    assert_eq!(arb.new_epoch(vm).unwrap(), 1);
    assert_eq!(arb.new_epoch(vm).unwrap(), 2);
    assert_eq!(arb.new_epoch(vm).unwrap(), 3);
    assert_eq!(arb.decision(vm, 3).unwrap(), (3, None));
    // First claim wins; the same claimant again is granted; another is not.
    assert_eq!(claim(&mut arb, vm, 3, "a", t), ClaimOutcome::Granted);
    assert_eq!(claim(&mut arb, vm, 3, "a", t), ClaimOutcome::Granted);
    assert_eq!(
        claim(&mut arb, vm, 3, "b", t),
        ClaimOutcome::HeldBy { holder: "a".into() }
    );
    // An older epoch is superseded, whoever asks.
    assert_eq!(
        claim(&mut arb, vm, 2, "b", t),
        ClaimOutcome::Superseded { current_epoch: 3 }
    );
    // A newer epoch may be claimed without new_epoch and raises the
    // current one with it; new_epoch goes on from there.
    assert_eq!(claim(&mut arb, vm, 7, "b", t), ClaimOutcome::Granted);
    assert_eq!(arb.decision(vm, 7).unwrap(), (7, Some("b".into())));
    assert_eq!(
        claim(&mut arb, vm, 3, "a", t),
        ClaimOutcome::Superseded { current_epoch: 7 }
    );
    assert_eq!(arb.new_epoch(vm).unwrap(), 8);
    // Now even the holder of 7 is superseded: a newer pairing exists.
    assert_eq!(
        claim(&mut arb, vm, 7, "b", t),
        ClaimOutcome::Superseded { current_epoch: 8 }
    );
    // Another VM is untouched, even one whose id looks like a key path.
    assert_eq!(arb.decision("sem", 3).unwrap(), (0, None));
    assert_eq!(arb.new_epoch("sem").unwrap(), 1);

    // Concurrent new_epoch calls each get their own number.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let endpoints = cluster.endpoints();
            std::thread::spawn(move || {
                let mut arb = EtcdArbiter::connect(&endpoints).unwrap();
                (0..5)
                    .map(|_| arb.new_epoch("counted").unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=40).collect::<Vec<_>>());
}

#[test]
fn killing_a_member_during_the_race_still_gives_one_winner() {
    let started = Instant::now();
    let mut cluster = Cluster::start("kill-member", 3);
    let endpoints = cluster.endpoints();
    let mut killed = None;
    let mut victims = Vec::new();
    let mut leader = None;
    let results = race(&endpoints, "kill-vm", 16, 6, |epoch, phase| match phase {
        // Bring the last victim back, so that a quorum remains, and find
        // the leader before the claimants go.
        Phase::Before => {
            if let Some(prev) = killed.take() {
                cluster.restart(prev);
                cluster.wait_healthy(Duration::from_secs(30));
            }
            leader = cluster.leader();
        }
        // Kill a member as the claims get under way: the leader in odd
        // epochs (proposals in flight may be lost, or committed by the
        // next leader), a follower in even ones.
        Phase::Racing => {
            let victim = match leader {
                Some(l) if epoch % 2 == 1 => l,
                Some(l) => (l + 1) % 3,
                None => epoch as usize % 3,
            };
            std::thread::sleep(Duration::from_millis(epoch % 3));
            cluster.kill(victim);
            killed = Some(victim);
            victims.push((victim, leader == Some(victim)));
        }
    });
    eprintln!(
        "killed (member, was leader): {victims:?}; {} attempts failed as unreachable",
        RETRIES.load(Ordering::Relaxed)
    );
    let winners = one_winner_each(&results, || cluster.logs());
    eprintln!(
        "winners {winners:?} with members killed, after {:?}",
        started.elapsed()
    );
    // Every decision reads back the same from a fresh client, and holds.
    let prev = killed.expect("a member was killed");
    cluster.restart(prev);
    cluster.wait_healthy(Duration::from_secs(30));
    let mut arb = EtcdArbiter::connect(&endpoints).unwrap();
    for (i, w) in winners.iter().enumerate() {
        assert_eq!(
            arb.decision("kill-vm", i as u64 + 1).unwrap().1.as_ref(),
            Some(w)
        );
    }
}

#[test]
fn with_quorum_lost_claims_fail_in_bounded_time_then_succeed() {
    let mut cluster = Cluster::start("quorum", 3);
    let mut arb = cluster.arbiter();
    assert_eq!(arb.new_epoch("q").unwrap(), 1);
    cluster.kill(1);
    cluster.kill(2);

    // Each attempt fails as unreachable, within about the attempt bound.
    for _ in 0..4 {
        let t = Instant::now();
        let e = arb
            .test_and_set("q", 1, "backup")
            .expect_err("granted without a quorum");
        let took = t.elapsed();
        assert!(e.is_unreachable(), "{e:?}");
        assert!(
            took < ATTEMPT_TIMEOUT + Duration::from_millis(500),
            "an attempt took {took:?}: {e:?}"
        );
        eprintln!("attempt failed after {took:?}: {}", error_chain(&e));
    }

    // The real claim loop waits, neither winning nor giving up, until the
    // quorum returns.
    let arbiter = Arbiter {
        addr: ArbiterAddr::Etcd(cluster.endpoints()),
        vm_id: "q".into(),
        epoch: 1,
        claimant: "backup".into(),
        tls: None,
    };
    let (done_tx, done) = std::sync::mpsc::channel();
    let claimer = std::thread::spawn(move || {
        let metrics = vmm::ft::metrics::Metrics::new(vmm::ft::metrics::Role::Backup, 1);
        let result = arbiter.claim("test", &metrics);
        let _ = done_tx.send(result.is_ok());
    });
    assert!(
        done.recv_timeout(Duration::from_secs(3)).is_err(),
        "the claim loop returned without a quorum"
    );
    cluster.restart(1);
    let back = Instant::now();
    let won = done
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "no decision 30 s after the quorum returned\n{}",
                cluster.logs()
            )
        });
    assert!(won, "the only claimant lost");
    eprintln!("granted {:?} after the quorum returned", back.elapsed());
    claimer.join().unwrap();
    assert_eq!(
        claim(&mut arb, "q", 1, "primary", Duration::from_secs(10)),
        ClaimOutcome::HeldBy {
            holder: "backup".into()
        }
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    tas_server::protocol::error_chain(e)
}
