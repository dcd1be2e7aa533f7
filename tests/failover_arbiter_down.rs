//! With the arbiter down, a partition must not make anyone go live: the
//! backup waits, the primary keeps holding output (a PING sent after the
//! cut gets no reply) and both keep running. Once the arbiter is back on
//! the same state file, exactly one side goes on and the other exits 5.
//!
//! Processes run under `ip netns exec` on two hosts made of network
//! namespaces; the test's client socket is made inside the client
//! namespace so that it can be held across the cut.

mod common;
mod twohost;

use std::time::{Duration, Instant};

use common::{resp, Reply};
use twohost::{check_acked, set_ok, Pair, Side};
use vmm::netns::Host;

#[test]
fn nobody_goes_live_while_the_arbiter_is_down() {
    if !common::kvm_available("failover_arbiter_down")
        || !twohost::netns_available("failover_arbiter_down")
    {
        return;
    }
    let started = Instant::now();
    let mut pair = Pair::start(&format!("fad{}", std::process::id()));
    let mut conn = pair.wait_for_service(Duration::from_secs(30));
    let limit = Duration::from_secs(5);
    let mut acked = Vec::new();
    for i in 0..10 {
        let (k, v) = (format!("before:{i}"), format!("v{i}"));
        set_ok(&mut conn, &k, &v, limit, || pair.logs());
        acked.push((k, v));
    }

    pair.arbiter.as_mut().unwrap().kill();
    pair.topo.cut_logging_link().unwrap();
    let cut = Instant::now();
    conn.send(&["PING"]).unwrap();
    // Two seconds of partition without an arbiter.
    let held = conn.reply(Duration::from_secs(2));
    let logs = pair.logs();
    match held {
        Err(resp::Error::Timeout) => {}
        Err(resp::Error::Closed(why)) => panic!("the primary closed the client ({why})\n{logs}"),
        Err(e @ resp::Error::Protocol(_)) => panic!("{e}\n{logs}"),
        Ok(r) => panic!("the primary released output with no arbiter: {r:?}\n{logs}"),
    }
    assert!(
        pair.primary.status().is_none() && pair.backup.status().is_none(),
        "a side exited while the arbiter was down: primary {:?}, backup {:?}\n{logs}",
        pair.primary.status(),
        pair.backup.status()
    );
    assert!(
        !pair.backup.log_text().contains("backup: going live"),
        "the backup went live without the arbiter\n{logs}"
    );
    assert_eq!(pair.topo.vip_holder().unwrap(), Some(Host::A), "{logs}");
    for p in [&pair.primary, &pair.backup] {
        assert!(
            p.log_text().contains("is unreachable; not going live"),
            "the {} does not say it is waiting for the arbiter\n{logs}",
            p.name()
        );
    }
    eprintln!("held for {:?} with the arbiter down", cut.elapsed());

    pair.start_arbiter();
    let back = Instant::now();
    let (survivor, seen) = pair.outcome(Duration::from_secs(15));
    let decided = seen - back;
    eprintln!("the {survivor:?} won {decided:?} after the arbiter came back");
    let logs = pair.logs();
    let went_live = pair.backup.log_text().contains("backup: going live");
    match survivor {
        Side::Primary => {
            match conn.reply(limit) {
                Ok(Reply::Simple(s)) if s == "PONG" => {}
                other => panic!("the winning primary did not release the PING: {other:?}\n{logs}"),
            }
            assert!(!went_live, "the losing backup went live\n{logs}");
            assert_eq!(pair.topo.vip_holder().unwrap(), Some(Host::A), "{logs}");
        }
        Side::Backup => {
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
    set_ok(&mut conn, "after", "x", limit, || pair.logs());
    acked.push(("after".into(), "x".into()));
    check_acked(&mut conn, &acked, || pair.logs());
    assert!(
        pair.proc_of(survivor).status().is_none(),
        "the surviving {survivor:?} exited\n{}",
        pair.logs()
    );
    drop(conn);
    pair.shutdown();
    eprintln!("took {:?}", started.elapsed());
}
