//! A crashed arbiter must not forget: after kill -9 and a restart on the
//! same state file, the loser still loses, the winner still wins, and
//! epochs continue where they were.

mod common;

use common::{Server, TempDir};

#[test]
fn a_restarted_arbiter_remembers_every_decision() {
    let dir = TempDir::new("restart");
    let server = Server::start(&dir.state());
    let client = server.client();
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 1);
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 2);
    assert!(
        client
            .test_and_set("kv1", 2, "host-b")
            .expect("claim")
            .granted
    );
    assert!(
        client
            .test_and_set("kv2", 4, "host-a")
            .expect("claim")
            .granted
    );
    let before = client.status().expect("status");
    server.kill9();

    // While it is down, calls fail as unreachable (the VMM's cue to retry).
    let err = client.status().expect_err("arbiter is down");
    assert!(err.is_retryable(), "{err:?}");

    let server = Server::start(&dir.state());
    let client = server.client();
    assert_eq!(client.status().expect("status"), before);
    let loser = client.test_and_set("kv1", 2, "host-a").expect("claim");
    assert!(!loser.granted);
    assert_eq!(loser.holder, "host-b");
    assert!(
        client
            .test_and_set("kv1", 2, "host-b")
            .expect("claim")
            .granted
    );
    assert_eq!(
        client
            .test_and_set("kv1", 1, "host-a")
            .expect("claim")
            .holder,
        "superseded by epoch 2"
    );
    assert!(
        !client
            .test_and_set("kv2", 4, "host-b")
            .expect("claim")
            .granted
    );
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 3);
    assert_eq!(client.new_epoch("kv2").expect("new epoch"), 5);
    assert!(
        client
            .test_and_set("kv1", 3, "host-a")
            .expect("claim")
            .granted
    );
    server.kill9();

    // And again, with the decisions made after the first restart.
    let server = Server::start(&dir.state());
    let client = server.client();
    let claim = client.test_and_set("kv1", 3, "host-b").expect("claim");
    assert_eq!(claim.holder, "host-a");
    assert!(!claim.granted);
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 4);
}
