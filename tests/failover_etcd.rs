//! Failover with etcd as the arbiter, end to end: a `kv` pair on loopback
//! with `--tas etcd://...` against a real three-member cluster.
//!
//! - SIGKILL the primary: the backup wins at etcd, goes live on the
//!   service address, and every acknowledged write is there.
//! - Lose etcd's quorum first, then SIGKILL the primary: the backup does
//!   not go live (it says it is waiting for the arbiter, and nothing serves
//!   the service address) until the quorum returns; then it does, with
//!   every acknowledged write.

mod common;
mod etcd;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use etcd::Cluster;

struct Pair {
    primary: Proc,
    backup: Proc,
    service: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn start(test: &str, vm: &str, cluster: &Cluster) -> Pair {
        let dir = tempdir(test);
        let (chan, service) = (free_addr(), free_addr());
        let tas = cluster.tas_arg();
        let backup = Proc::logged(
            "backup",
            backup_cmd("kv", vm, chan)
                .args(["--tas", &tas])
                .args(["--serial", &format!("tcp:{service}")])
                .env("DUET_LOG", "info"),
            &dir.path().join("backup.log"),
        )
        .unwrap();
        let primary = Proc::logged(
            "primary",
            primary_cmd("kv", vm, chan)
                .args(["--tas", &tas])
                .args(["--serial", &format!("tcp:{service}")])
                .env("DUET_LOG", "info"),
            &dir.path().join("primary.log"),
        )
        .unwrap();
        let pair = Pair {
            primary,
            backup,
            service,
            _dir: dir,
        };
        wait_for_port(service, Duration::from_secs(30));
        pair
    }

    fn logs(&self) -> String {
        format!(
            "--- primary\n{}\n--- backup\n{}",
            self.primary.log_text(),
            self.backup.log_text()
        )
    }

    /// SETs `n` keys and returns them: each acknowledged with +OK.
    fn write(&self, conn: &mut Conn, prefix: &str, n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| {
                let (k, v) = (format!("{prefix}:{i}"), format!("v{i}"));
                match conn.call(&["SET", &k, &v], Duration::from_secs(10)) {
                    Ok(r) if r.is_ok() => {}
                    other => panic!("SET {k}: {other:?}\n{}", self.logs()),
                }
                (k, v)
            })
            .collect()
    }

    /// Connects to the service once the new primary serves it.
    fn wait_for_new_primary(&mut self, limit: Duration) -> Conn {
        let end = Instant::now() + limit;
        loop {
            if let Ok(mut c) = Conn::connect(self.service, Duration::from_millis(500)) {
                if matches!(c.call(&["PING"], Duration::from_secs(5)), Ok(Reply::Simple(ref s)) if s == "PONG")
                {
                    return c;
                }
            }
            assert!(
                self.backup.status().is_none(),
                "the backup exited: {:?}\n{}",
                self.backup.status(),
                self.logs()
            );
            assert!(
                Instant::now() < end,
                "no new primary on {} after {limit:?}\n{}",
                self.service,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every acknowledged write reads back.
fn check_acked(conn: &mut Conn, acked: &[(String, String)], logs: impl Fn() -> String) {
    for (k, v) in acked {
        let got = conn.call(&["GET", k], Duration::from_secs(10));
        assert_eq!(
            got.as_ref().ok(),
            Some(&Reply::bulk(v)),
            "acknowledged {k}={v} is missing ({got:?})\n{}",
            logs()
        );
    }
}

/// The holder etcd recorded for the VM's current epoch. Retried for a
/// while: right after members return, a read may find no leader yet.
fn holder(cluster: &Cluster, vm: &str) -> (u64, Option<String>) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let mut arb = cluster.arbiter();
        let read = arb
            .decision(vm, 0)
            .and_then(|(current, _)| arb.decision(vm, current));
        match read {
            Ok(d) => return d,
            Err(e) if Instant::now() < end => {
                eprintln!("reading the holder: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot read the holder of {vm}: {e}"),
        }
    }
}

#[test]
fn killing_the_primary_fails_over_through_etcd() {
    if !kvm_available("killing_the_primary_fails_over_through_etcd") {
        return;
    }
    let started = Instant::now();
    let cluster = Cluster::start("fo-etcd", 3);
    let mut pair = Pair::start("fo-etcd", "kv-etcd", &cluster);
    let mut conn = connect(pair.service, Duration::from_secs(10));
    let acked = pair.write(&mut conn, "before", 30);
    // One more in flight at the kill: it may or may not have been applied.
    conn.send(&["SET", "in-flight", "x"]).unwrap();
    pair.primary.signal(libc::SIGKILL).unwrap();
    let killed = Instant::now();
    let mut conn = pair.wait_for_new_primary(Duration::from_secs(30));
    eprintln!("the backup served {:?} after the SIGKILL", killed.elapsed());
    let logs = pair.logs();
    assert!(logs.contains("backup: going live"), "{logs}");
    assert!(
        logs.contains("the arbiter granted kv-etcd/epoch 1"),
        "{logs}"
    );
    check_acked(&mut conn, &acked, || pair.logs());
    let after = pair.write(&mut conn, "after", 5);
    check_acked(&mut conn, &after, || pair.logs());
    let (epoch, who) = holder(&cluster, "kv-etcd");
    assert_eq!(epoch, 1, "the primary's new_epoch made the first epoch");
    assert!(
        who.as_deref().is_some_and(|w| w.starts_with("backup@")),
        "etcd holds {who:?}"
    );
    drop(conn);
    pair.backup.terminate().unwrap();
    assert!(
        pair.backup.wait_timeout(Duration::from_secs(10)).is_some(),
        "the new primary did not stop on SIGTERM\n{}",
        pair.logs()
    );
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn with_etcd_quorum_lost_the_backup_waits_to_go_live() {
    if !kvm_available("with_etcd_quorum_lost_the_backup_waits_to_go_live") {
        return;
    }
    let started = Instant::now();
    let mut cluster = Cluster::start("fo-quorum", 3);
    let mut pair = Pair::start("fo-quorum", "kv-q", &cluster);
    let mut conn = connect(pair.service, Duration::from_secs(10));
    let acked = pair.write(&mut conn, "before", 20);

    cluster.kill(1);
    cluster.kill(2);
    // SIGKILL and reap, so that its listening socket is gone too.
    pair.primary.kill();
    drop(conn);
    // Three seconds without a quorum: nobody may go live.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        assert!(
            TcpStream::connect_timeout(&pair.service, Duration::from_millis(200)).is_err(),
            "something serves {} without an arbiter\n{}",
            pair.service,
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = pair.logs();
    assert!(pair.backup.status().is_none(), "the backup exited\n{logs}");
    assert!(
        !logs.contains("backup: going live"),
        "went live without a quorum\n{logs}"
    );
    assert!(
        logs.contains("is unreachable; not going live"),
        "the backup does not say it waits for the arbiter\n{logs}"
    );

    cluster.restart(1);
    cluster.restart(2);
    let back = Instant::now();
    let mut conn = pair.wait_for_new_primary(Duration::from_secs(30));
    eprintln!(
        "the backup served {:?} after the quorum came back",
        back.elapsed()
    );
    check_acked(&mut conn, &acked, || pair.logs());
    let (_, who) = holder(&cluster, "kv-q");
    assert!(
        who.as_deref().is_some_and(|w| w.starts_with("backup@")),
        "etcd holds {who:?}"
    );
    drop(conn);
    pair.backup.terminate().unwrap();
    let _ = pair.backup.wait_timeout(Duration::from_secs(10));
    eprintln!("took {:?}", started.elapsed());
}
