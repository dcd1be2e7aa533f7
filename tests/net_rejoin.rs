//! Chained failover with re-protection on two hosts, with client TCP
//! connections that must carry on through all of it: A (host A) is the
//! primary and B (host B) the backup of `netkv`; A is SIGKILLed and B goes
//! live; C starts on host A as `duet backup --join <B's --listen>` and
//! joins B while the clients write; B is SIGKILLed and C goes live, on
//! host A again, opening the TAP that A held. The same client connections
//! are used from the first write to the last check: the test counts the
//! connections it had to make again (it expects none) instead of stopping
//! at the first error, so that a failure says how bad it was.
//!
//! Also checked: every acknowledged write is on C, read back on the
//! connection that wrote it; C's restored state digest equals B's at the
//! handover position; C won the arbiter for the epoch B took for their
//! pairing; the survivor and the joiner wrote their `protected` and
//! `joined` events.

mod common;
mod twohost;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use twohost::{Guest, Pair, CHANNEL_PORT, VM_ID};
use vmm::netns::{Host, Topology};

/// Client connections, each writing its own keys.
const CONNECTIONS: usize = 4;
/// Bounds every wait for a side's log line.
const LIMIT: Duration = Duration::from_secs(30);
/// How long one reply may take: the reply to a SET in flight at a kill
/// waits for the failover.
const REPLY_LIMIT: Duration = Duration::from_secs(20);

/// One client connection, made once in the client namespace.
struct Client {
    conn: Conn,
    /// The connection's own address when it was first made.
    local: SocketAddr,
    /// How often it had to be made again (the test expects 0).
    reconnects: u32,
    /// What this connection was told was written.
    acked: Vec<(String, String)>,
}

/// The clients, and what they saw.
struct Clients {
    clients: Vec<Client>,
    /// The longest time one SET took, per phase.
    worst: Vec<(String, Duration)>,
    next: usize,
}

impl Clients {
    fn open(pair: &mut Pair) -> Clients {
        let clients = (0..CONNECTIONS)
            .map(|_| {
                let conn = pair.wait_for_service(LIMIT);
                let local = conn.stream().local_addr().unwrap();
                Client {
                    conn,
                    local,
                    reconnects: 0,
                    acked: Vec::new(),
                }
            })
            .collect();
        Clients {
            clients,
            worst: Vec::new(),
            next: 0,
        }
    }

    /// Writes one checked SET on the next connection, round robin. A
    /// failed call is counted as a reconnect and the SET is tried again on
    /// a new connection (bounded), so that the test goes on and reports.
    /// `between`: runs after the SET is sent and before its reply is read
    /// (a kill lands while the SET is in flight).
    fn set(
        &mut self,
        topo: &Topology,
        phase: &str,
        between: impl FnOnce(),
        logs: &dyn Fn() -> String,
    ) {
        let i = self.next % CONNECTIONS;
        self.next += 1;
        let c = &mut self.clients[i];
        let n = c.acked.len();
        let (k, v) = (format!("{phase}:{i}:{n}"), format!("{phase}-{i}-{n}"));
        let started = Instant::now();
        let mut between = Some(between);
        let end = Instant::now() + LIMIT;
        loop {
            let sent = c.conn.send(&["SET", &k, &v]);
            if let Some(f) = between.take() {
                f();
            }
            let reply = sent.and_then(|()| c.conn.reply(REPLY_LIMIT));
            match reply {
                Ok(r) if r.is_ok() => break,
                Ok(other) => panic!("SET {k} got {other:?}\n{}", logs()),
                Err(e) => {
                    eprintln!("connection {i}: SET {k} failed ({e}); reconnecting");
                    c.reconnects += 1;
                    assert!(
                        Instant::now() < end,
                        "SET {k} never answered on connection {i}\n{}",
                        logs()
                    );
                    if let Ok(conn) =
                        twohost::connect_from_client(topo, Guest::NetKv.service_addr())
                    {
                        c.conn = conn;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        c.acked.push((k, v));
        let took = started.elapsed();
        match self.worst.iter_mut().find(|(p, _)| p == phase) {
            Some((_, w)) => *w = (*w).max(took),
            None => self.worst.push((phase.to_string(), took)),
        }
    }

    fn write(&mut self, topo: &Topology, phase: &str, n: usize, logs: &dyn Fn() -> String) {
        for _ in 0..n {
            self.set(topo, phase, || {}, logs);
        }
    }

    fn acked(&self) -> usize {
        self.clients.iter().map(|c| c.acked.len()).sum()
    }

    fn reconnects(&self) -> u32 {
        self.clients.iter().map(|c| c.reconnects).sum()
    }
}

/// The digest a survivor logged at its handover, and the one its joiner
/// restored ("regs X mem Y" each), and the handover's exit on each side.
fn handover(survivor: &str, joiner: &str) -> (String, String, Option<u64>, Option<u64>) {
    let after = |text: &str, from: &str, to: &str| -> Option<String> {
        let line = text.lines().find(|l| l.contains(from))?;
        let rest = &line[line.find(from)? + from.len()..];
        Some(rest[..rest.find(to)?].trim().to_string())
    };
    let number = |s: Option<String>| -> Option<u64> {
        s?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    (
        after(survivor, "digest ", ", paused").unwrap_or_default(),
        after(joiner, "state digest ", " equals").unwrap_or_default(),
        number(after(survivor, "handover at exit ", ":")),
        number(after(joiner, "after exit ", ",")),
    )
}

/// The named events in a side's event log.
fn events(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["event"].as_str().map(str::to_string))
        .collect()
}

/// Seconds since the Unix epoch, the clock of the event logs.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Milliseconds from `since` (Unix seconds) to the first `name` event in
/// a side's event log; NaN if there is none.
fn event_ms_after(text: &str, name: &str, since: f64) -> f64 {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == name)
        .and_then(|v| v["ts"].as_f64())
        .map_or(f64::NAN, |ts| (ts - since) * 1e3)
}

#[test]
fn chained_failover_with_a_joined_backup_keeps_client_connections_and_writes() {
    if !kvm_available("chained_failover_with_a_joined_backup_keeps_client_connections_and_writes")
        || !twohost::netns_available("net_rejoin")
    {
        return;
    }
    let t = Instant::now();
    let mut pair = Pair::start_netkv(&format!("nrj{}", std::process::id()));
    let b_listen = SocketAddr::from((Host::B.log_ip().unwrap(), CHANNEL_PORT));
    let c_listen = SocketAddr::from((Host::A.log_ip().unwrap(), CHANNEL_PORT));
    let c_events = pair.dir.path().join("c.events");
    let c_log = pair.dir.path().join("c.log");
    let mut clients = Clients::open(&mut pair);
    let logs = |pair: &Pair, c: &Option<Proc>| {
        let mut all = pair.logs();
        if let Some(c) = c {
            all.push_str(&format!("----- {} -----\n{}\n", c.name(), c.log_text()));
        }
        all
    };

    // A and B paired; the kill lands while a SET is in flight.
    let (mut killed_a, mut killed_b) = (0.0, 0.0);
    clients.write(&pair.topo, "ab", 40, &|| pair.logs());
    {
        let primary = &mut pair.primary;
        let topo = &pair.topo;
        let killed = &mut killed_a;
        clients.set(
            topo,
            "kill-a",
            || {
                primary.kill();
                *killed = unix_now();
            },
            &String::new,
        );
    }
    assert!(
        pair.backup.wait_for_log("backup: going live", LIMIT),
        "B never went live\n{}",
        pair.logs()
    );
    eprintln!(
        "B went live {:.0} ms after the kill (its live event)",
        event_ms_after(&pair.events(twohost::Side::Backup), "live", killed_a)
    );
    clients.write(&pair.topo, "b-alone", 40, &|| pair.logs());

    // C joins B from host A, with the pair's NIC flags: it opens host A's
    // tap0 (free since A died) only if it goes live.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
    cmd.args(["backup", "--image", "netkv", "--vm-id", VM_ID])
        .args(["--tas", &Pair::tas_addr().to_string()])
        .args(["--timeout-ms", "300", "--heartbeat-ms", "50"])
        .args(["--join", &b_listen.to_string()])
        .args(["--listen", &c_listen.to_string()])
        .arg("--events")
        .arg(&c_events)
        .args(twohost::netkv_args())
        .args(["--serial", "none"])
        .env("DUET_LOG", "info");
    let join_started = Instant::now();
    // Declared after the pair, so dropped (killed) before its namespaces.
    let mut c = Some(
        Proc::logged("joiner C", &mut pair.topo.exec(Host::A, &cmd), &c_log)
            .unwrap_or_else(|e| panic!("{e:#}")),
    );
    // The clients keep writing while C joins.
    let end = Instant::now() + LIMIT;
    let mut last_check = Instant::now();
    let (mut joined, mut protected) = (false, false);
    while !(joined && protected) {
        clients.set(&pair.topo, "join", || {}, &|| logs(&pair, &c));
        if last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            let cp = c.as_mut().unwrap();
            joined = cp.log_text().contains("backup: joined the VM at");
            protected = pair.backup.log_text().contains("protected again");
            assert!(
                cp.status().is_none(),
                "C exited during the join\n{}",
                logs(&pair, &c)
            );
            assert!(
                Instant::now() < end,
                "C did not join B within {LIMIT:?} (joined: {joined}, protected: {protected})\n{}",
                logs(&pair, &c)
            );
        }
    }
    eprintln!(
        "C joined B and B is protected again {:?} after C started",
        join_started.elapsed()
    );
    clients.write(&pair.topo, "bc", 40, &|| logs(&pair, &c));

    // B and C paired: kill B with a SET in flight; C goes live on host A.
    {
        let backup = &mut pair.backup;
        let topo = &pair.topo;
        let killed = &mut killed_b;
        clients.set(
            topo,
            "kill-b",
            || {
                backup.kill();
                *killed = unix_now();
            },
            &String::new,
        );
    }
    let cp = c.as_mut().unwrap();
    assert!(
        cp.wait_for_log("backup: going live", LIMIT),
        "C never went live\n{}",
        logs(&pair, &c)
    );
    eprintln!(
        "C went live {:.0} ms after the kill (its live event)",
        event_ms_after(
            &std::fs::read_to_string(&c_events).unwrap_or_default(),
            "live",
            killed_b
        )
    );
    clients.write(&pair.topo, "c", 40, &|| logs(&pair, &c));

    // Every acknowledged write, on the connection that wrote it.
    for (i, client) in clients.clients.iter_mut().enumerate() {
        for (k, v) in &client.acked {
            match client.conn.call(&["GET", k], Duration::from_secs(5)) {
                Ok(Reply::Bulk(Some(got))) if got == v.as_bytes() => {}
                other => panic!(
                    "acknowledged {k}={v} read back as {other:?} on connection {i}\n{}",
                    logs(&pair, &c)
                ),
            }
        }
    }
    let changed: Vec<usize> = clients
        .clients
        .iter()
        .enumerate()
        .filter(|(_, cl)| cl.conn.stream().local_addr().ok() != Some(cl.local))
        .map(|(i, _)| i)
        .collect();
    let reconnects = clients.reconnects();
    eprintln!(
        "{} writes acknowledged and read back over {CONNECTIONS} connections; \
         reconnects {reconnects}; worst SET per phase {:?}",
        clients.acked(),
        clients.worst
    );
    assert_eq!(
        reconnects,
        0,
        "the clients had to reconnect {reconnects} time(s) (connections changed: {changed:?})\n{}",
        logs(&pair, &c)
    );

    // C restored exactly B's state at the handover.
    let c_text = c.as_ref().unwrap().log_text();
    let (theirs, ours, b_exit, c_exit) = handover(&pair.backup.log_text(), &c_text);
    assert!(
        !theirs.is_empty(),
        "no handover digest\n{}",
        logs(&pair, &c)
    );
    assert_eq!(theirs, ours, "C's digest is not B's\n{}", logs(&pair, &c));
    assert!(
        b_exit.is_some() && b_exit == c_exit,
        "handover exits {b_exit:?} (B) and {c_exit:?} (C)\n{}",
        logs(&pair, &c)
    );
    assert!(
        c_text.contains(&format!("claiming {VM_ID}/epoch")),
        "C went live without claiming\n{c_text}"
    );
    let b_events = events(&pair.events(twohost::Side::Backup));
    let c_ev = events(&std::fs::read_to_string(&c_events).unwrap_or_default());
    assert!(
        b_events.iter().any(|e| e == "protected"),
        "B wrote no protected event: {b_events:?}"
    );
    assert!(
        c_ev.iter().any(|e| e == "joined") && c_ev.iter().any(|e| e == "live"),
        "C's events: {c_ev:?}"
    );
    assert!(
        c.as_mut().unwrap().status().is_none(),
        "C exited after going live\n{}",
        logs(&pair, &c)
    );
    let line = |text: &str, needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_string()
    };
    eprintln!(
        "B: {}\nC: {}",
        line(&pair.backup.log_text(), "protected again"),
        line(&c_text, "joined the VM at")
    );
    eprintln!(
        "chained failover on two hosts: handover at exit {} with digest {theirs}; test took {:?}",
        b_exit.unwrap(),
        t.elapsed()
    );
    drop(clients);
    if let Some(mut c) = c.take() {
        c.kill();
    }
    pair.shutdown();
}
