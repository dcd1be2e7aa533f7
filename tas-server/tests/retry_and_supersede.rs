//! The rules beyond the race: the winner may retry after a lost reply, a
//! new epoch supersedes older ones (even for their winners), and a claim
//! above the current epoch raises it.

mod common;

use common::{Server, TempDir};

#[test]
fn winner_retries_and_old_epochs_are_superseded() {
    let dir = TempDir::new("rules");
    let server = Server::start(&dir.state());
    let client = server.client();

    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 1);
    let won = client.test_and_set("kv1", 1, "host-a").expect("claim");
    assert!(won.granted);
    assert_eq!(won.holder, "host-a");

    // The reply was "lost": the winner asks again and is granted again.
    for _ in 0..3 {
        let retry = client.test_and_set("kv1", 1, "host-a").expect("retry");
        assert!(retry.granted);
        assert_eq!(retry.holder, "host-a");
    }
    let lost = client.test_and_set("kv1", 1, "host-b").expect("claim");
    assert!(!lost.granted);
    assert_eq!(lost.holder, "host-a");

    // A new pairing: claims for epoch 1 are now denied, even host-a's.
    assert_eq!(client.new_epoch("kv1").expect("new epoch"), 2);
    for who in ["host-a", "host-b", "host-c"] {
        let old = client.test_and_set("kv1", 1, who).expect("claim");
        assert!(!old.granted, "{who} won a superseded epoch");
        assert_eq!(old.holder, "superseded by epoch 2");
        assert_eq!(old.epoch, 1);
    }
    assert!(
        client
            .test_and_set("kv1", 2, "host-b")
            .expect("claim")
            .granted
    );

    // A claim above the current epoch is allowed and raises it.
    assert!(
        client
            .test_and_set("kv1", 9, "host-c")
            .expect("claim")
            .granted
    );
    let stale = client.test_and_set("kv1", 5, "host-a").expect("claim");
    assert_eq!(stale.holder, "superseded by epoch 9");
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
