//! The rules beyond the race: the winner may retry after a lost reply, a
//! new epoch supersedes older ones (even for their winners), and a claim
//! above the current epoch raises it.

mod common;

use common::{Raw, Server, TempDir};
use serde_json::json;
use tas_server::ClaimOutcome;

fn held_by(holder: &str) -> ClaimOutcome {
    ClaimOutcome::HeldBy {
        holder: holder.to_owned(),
    }
}

#[test]
fn winner_retries_and_old_epochs_are_superseded() {
    let dir = TempDir::new("rules");
    let server = Server::start(&dir.state());
    let client = server.client();
    let claim = |vm: &str, epoch, who: &str| client.test_and_set(vm, epoch, who).expect("claim");

    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 1);
    assert_eq!(claim("kv1", 1, "host-a"), ClaimOutcome::Granted);

    // The reply was "lost": the winner asks again and is granted again.
    for _ in 0..3 {
        assert_eq!(claim("kv1", 1, "host-a"), ClaimOutcome::Granted);
    }
    assert_eq!(claim("kv1", 1, "host-b"), held_by("host-a"));

    // A new pairing: claims for epoch 1 are now denied, even host-a's, and
    // the answer names the current epoch rather than a holder.
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 2);
    for who in ["host-a", "host-b", "host-c"] {
        assert_eq!(
            claim("kv1", 1, who),
            ClaimOutcome::Superseded { current_epoch: 2 },
            "{who}"
        );
    }
    assert_eq!(claim("kv1", 2, "host-b"), ClaimOutcome::Granted);

    // A claim above the current epoch is allowed and raises it.
    assert_eq!(claim("kv1", 9, "host-c"), ClaimOutcome::Granted);
    assert_eq!(
        claim("kv1", 5, "host-a"),
        ClaimOutcome::Superseded { current_epoch: 9 }
    );
    // Superseded wins over held: epoch 2 has a holder, but it is old now.
    assert_eq!(
        claim("kv1", 2, "host-a"),
        ClaimOutcome::Superseded { current_epoch: 9 }
    );
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 10);

    // Other VMs are untouched.
    assert_eq!(client.new_epoch("kv2").expect("new epoch"), 1);
    let status = client.status().expect("status");
    let ids: Vec<_> = status.vms.iter().map(|vm| vm.vm_id.as_str()).collect();
    assert_eq!(ids, ["kv1", "kv2"]);
    assert_eq!(status.vms[0].epoch, 10);
    assert_eq!(status.vms[0].holders.len(), 3);
    assert!(status.vms[1].holders.is_empty());
}

#[test]
fn claim_replies_on_the_wire_are_typed() {
    let dir = TempDir::new("wire");
    let server = Server::start(&dir.state());
    let mut raw = Raw::connect(server.addr);
    let claim = |epoch: u64, who: &str| {
        json!({"version":1,"op":"test_and_set","vm_id":"kv1","epoch":epoch,"claimant":who})
            .to_string()
    };
    assert_eq!(
        raw.ask(&claim(3, "host-a")),
        json!({"ok":true,"outcome":"granted","epoch":3})
    );
    assert_eq!(
        raw.ask(&claim(3, "host-b")),
        json!({"ok":true,"outcome":"held_by","holder":"host-a","epoch":3})
    );
    assert_eq!(
        raw.ask(r#"{"version":1,"op":"new_epoch","vm_id":"kv1"}"#),
        json!({"ok":true,"epoch":4})
    );
    assert_eq!(
        raw.ask(&claim(3, "host-a")),
        json!({"ok":true,"outcome":"superseded","current_epoch":4,"epoch":3})
    );
}
