//! A crashed arbiter must not forget: after kill -9 and a restart on the
//! same state file, the loser still loses, the winner still wins, and
//! epochs continue where they were.

mod common;

use common::{Server, TempDir};
use tas_server::ClaimOutcome;

fn held_by(holder: &str) -> ClaimOutcome {
    ClaimOutcome::HeldBy {
        holder: holder.to_owned(),
    }
}

#[test]
fn a_restarted_arbiter_remembers_every_decision() {
    let dir = TempDir::new("restart");
    let server = Server::start(&dir.state());
    let client = server.client();
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 1);
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 2);
    let claim = |client: &tas_server::Client, vm: &str, epoch, who: &str| {
        client.test_and_set(vm, epoch, who).expect("claim")
    };
    assert_eq!(claim(&client, "kv1", 2, "host-b"), ClaimOutcome::Granted);
    assert_eq!(claim(&client, "kv2", 4, "host-a"), ClaimOutcome::Granted);
    let before = client.status().expect("status");
    server.kill9();

    // While it is down, calls fail as unreachable (the VMM's cue to retry).
    let err = client.status().expect_err("arbiter is down");
    assert!(err.is_retryable(), "{err:?}");

    let server = Server::start(&dir.state());
    let client = server.client();
    assert_eq!(client.status().expect("status"), before);
    assert_eq!(claim(&client, "kv1", 2, "host-a"), held_by("host-b"));
    assert_eq!(claim(&client, "kv1", 2, "host-b"), ClaimOutcome::Granted);
    assert_eq!(
        claim(&client, "kv1", 1, "host-a"),
        ClaimOutcome::Superseded { current_epoch: 2 }
    );
    assert_eq!(claim(&client, "kv2", 4, "host-b"), held_by("host-a"));
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 3);
    assert_eq!(client.new_epoch("kv2").expect("new epoch"), 5);
    assert_eq!(claim(&client, "kv1", 3, "host-a"), ClaimOutcome::Granted);
    server.kill9();

    // And again, with the decisions made after the first restart.
    let server = Server::start(&dir.state());
    let client = server.client();
    assert_eq!(claim(&client, "kv1", 3, "host-b"), held_by("host-a"));
    assert_eq!(
        claim(&client, "kv1", 2, "host-b"),
        ClaimOutcome::Superseded { current_epoch: 3 }
    );
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 4);
}
