//! The arbiter's central promise under contention: 16 claimants race for
//! the same (vm, epoch), 20 times over, and each time exactly one is granted
//! and every loser is told the same holder.

mod common;

use std::sync::{Arc, Barrier};

use common::{Server, TempDir};
use tas_server::ClaimOutcome;

const CLAIMANTS: usize = 16;
const EPOCHS: u64 = 20;

#[test]
fn exactly_one_winner_per_epoch_under_concurrent_claims() {
    let dir = TempDir::new("race");
    let server = Server::start(&dir.state());
    let client = server.client();

    for epoch in 1..=EPOCHS {
        let barrier = Arc::new(Barrier::new(CLAIMANTS));
        let threads: Vec<_> = (0..CLAIMANTS)
            .map(|i| {
                let client = client.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let me = format!("host-{i}");
                    barrier.wait();
                    let outcome = client
                        .test_and_set("kv1", epoch, &me)
                        .expect("claim answered");
                    (me, outcome)
                })
            })
            .collect();
        let results: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("claimant thread"))
            .collect();

        let winners: Vec<_> = results
            .iter()
            .filter(|(_, outcome)| outcome.is_granted())
            .collect();
        assert_eq!(winners.len(), 1, "epoch {epoch}: {results:?}");
        let winner = &winners[0].0;
        for (me, outcome) in &results {
            if me == winner {
                assert_eq!(outcome, &ClaimOutcome::Granted);
            } else {
                assert_eq!(
                    outcome,
                    &ClaimOutcome::HeldBy {
                        holder: winner.clone()
                    },
                    "epoch {epoch}: {me} saw another holder"
                );
            }
        }
        // The arbiter's own record agrees.
        let status = client.status().expect("status");
        assert_eq!(status.vms[0].holders.get(&epoch), Some(winner));
    }

    let status = client.status().expect("status");
    assert_eq!(status.vms.len(), 1);
    assert_eq!(status.vms[0].epoch, EPOCHS);
    assert_eq!(status.vms[0].holders.len(), EPOCHS as usize);
    // One durable record per decision, no more.
    let records = std::fs::read_to_string(dir.state()).expect("state file");
    assert_eq!(records.lines().count(), EPOCHS as usize);
    let log = server.stderr_text();
    assert_eq!(log.matches(" granted").count(), EPOCHS as usize, "{log}");
}
