//! Re-protection on loopback: a new backup joins a running VM by live state
//! transfer, and the pair it forms survives the next failure like any pair.
//!
//! - Chained failover: A primary, B backup; kill A, B goes live; C joins B;
//!   kill B, C goes live. Every acknowledged write survives both failovers,
//!   and C's state digest at the handover equals B's.
//! - A join while a client writes loses nothing; the client's worst reply
//!   gap during the join is printed.
//! - Bad joins leave the survivor serving: another image, another memory
//!   size, a VM that already has a backup, a joiner killed halfway.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

/// The processes of one test: an arbiter, and `duet` sides by name, each
/// logging to a file in `dir`.
struct Lab {
    dir: tempfile::TempDir,
    tas: SocketAddr,
    service: SocketAddr,
    _arbiter: Proc,
}

impl Lab {
    fn new(test: &str) -> Lab {
        let dir = tempdir(test);
        let tas = free_addr();
        let arbiter = Proc::logged(
            "arbiter",
            Command::new(tas_server_bin())
                .args(["--listen", &tas.to_string()])
                .arg("--state")
                .arg(dir.path().join("tas.state")),
            &dir.path().join("arbiter.log"),
        )
        .unwrap();
        wait_for_port(tas, Duration::from_secs(10));
        Lab {
            dir,
            tas,
            service: free_addr(),
            _arbiter: arbiter,
        }
    }

    fn log(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Proc {
        cmd.args(["--tas", &self.tas.to_string()])
            .args(["--node", name])
            .args(["--heartbeat-ms", "50", "--timeout-ms", "500"]);
        Proc::logged(name, &mut cmd, &self.log(name)).unwrap()
    }

    /// A backup that serves on the shared service address once live.
    fn backup(&self, name: &str, listen: SocketAddr, join: Option<SocketAddr>) -> Proc {
        let mut cmd = backup_cmd("kv", "rj", listen);
        cmd.args(["--serial", &format!("tcp:{}", self.service)]);
        if let Some(j) = join {
            cmd.args(["--join", &j.to_string()]);
        }
        self.spawn(name, cmd)
    }

    fn primary(&self, name: &str, backup: SocketAddr, join_listen: SocketAddr) -> Proc {
        let mut cmd = primary_cmd("kv", "rj", backup);
        cmd.args(["--serial", &format!("tcp:{}", self.service)])
            .args(["--join-listen", &join_listen.to_string()]);
        self.spawn(name, cmd)
    }

    fn text(&self, name: &str) -> String {
        std::fs::read_to_string(self.log(name)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        for p in names {
            all.push_str(&format!(
                "--- {}\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            ));
        }
        all
    }
}

fn wait_log(p: &mut Proc, needle: &str, lab: &Lab) {
    assert!(
        p.wait_for_log(needle, LIMIT),
        "{} never logged {needle:?}:\n{}",
        p.name(),
        lab.logs()
    );
}

/// Writes `n` SETs under `prefix`, reconnecting (bounded) when the service
/// moves, and returns the acknowledged ones.
fn write_some(lab: &Lab, c: &mut Option<Conn>, prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut acked = Vec::new();
    for i in 0..n {
        let (k, v) = (format!("{prefix}:{i}"), format!("v{i}"));
        let end = Instant::now() + LIMIT;
        loop {
            if c.is_none() {
                *c = Conn::connect(lab.service, Duration::from_secs(2)).ok();
            }
            if let Some(conn) = c.as_mut() {
                match conn.call(&["SET", &k, &v], Duration::from_secs(5)) {
                    Ok(r) if r.is_ok() => break,
                    _ => *c = None,
                }
            }
            assert!(
                Instant::now() < end,
                "SET {k} never answered:\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        acked.push((k, v));
    }
    acked
}

fn check_all(lab: &Lab, c: &mut Option<Conn>, acked: &[(String, String)]) {
    let end = Instant::now() + LIMIT;
    for (k, v) in acked {
        loop {
            if c.is_none() {
                *c = Conn::connect(lab.service, Duration::from_secs(2)).ok();
            }
            if let Some(conn) = c.as_mut() {
                match conn.call(&["GET", k], Duration::from_secs(5)) {
                    Ok(r) => {
                        assert_eq!(r, Reply::bulk(v), "acknowledged {k}={v} is missing");
                        break;
                    }
                    Err(_) => *c = None,
                }
            }
            assert!(
                Instant::now() < end,
                "GET {k} never answered:\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The digest a survivor logged at its handover, and the one its joiner
/// restored: "regs X mem Y" each.
fn handover_digests(survivor: &str, joiner: &str) -> (String, String) {
    let pick = |text: &str, after: &str, before: &str| -> Option<String> {
        let line = text.lines().find(|l| l.contains(after))?;
        let rest = &line[line.find(after)? + after.len()..];
        Some(rest[..rest.find(before)?].trim().to_string())
    };
    (
        pick(survivor, "digest ", ", paused").unwrap_or_default(),
        pick(joiner, "state digest ", " equals").unwrap_or_default(),
    )
}

fn exit_of(text: &str, after: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains(after))?;
    let rest = &line[line.find(after)? + after.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn chained_failover_through_a_joined_backup_keeps_every_acknowledged_write() {
    if !kvm_available("chained_failover_through_a_joined_backup_keeps_every_acknowledged_write") {
        return;
    }
    let lab = Lab::new("rejoin-chain");
    let (b_listen, c_listen, a_join) = (free_addr(), free_addr(), free_addr());
    let mut b = lab.backup("b", b_listen, None);
    let mut a = lab.primary("a", b_listen, a_join);
    wait_for_port(lab.service, LIMIT);
    let mut c = None;
    let mut acked = write_some(&lab, &mut c, "a", 30);

    a.signal(libc::SIGKILL).unwrap();
    wait_log(&mut b, "going live", &lab);
    acked.extend(write_some(&lab, &mut c, "b-alone", 20));

    let mut cj = lab.backup("c", c_listen, Some(b_listen));
    wait_log(&mut cj, "joined the VM", &lab);
    wait_log(&mut b, "protected again", &lab);
    acked.extend(write_some(&lab, &mut c, "b-paired", 30));

    b.signal(libc::SIGKILL).unwrap();
    wait_log(&mut cj, "going live", &lab);
    acked.extend(write_some(&lab, &mut c, "c", 20));
    check_all(&lab, &mut c, &acked);

    let (theirs, ours) = handover_digests(&lab.text("b"), &lab.text("c"));
    assert!(!theirs.is_empty(), "no handover digest:\n{}", lab.logs());
    assert_eq!(theirs, ours, "{}", lab.logs());
    let b_exit = exit_of(&lab.text("b"), "handover at exit ");
    let c_exit = exit_of(&lab.text("c"), "after exit ");
    assert!(b_exit.is_some() && b_exit == c_exit, "{}", lab.logs());
    eprintln!(
        "chained failover: {} writes kept; handover at exit {} with digest {theirs}",
        acked.len(),
        b_exit.unwrap()
    );
    // C won the arbiter for the epoch that B took for their pairing.
    let c_log = lab.text("c");
    assert!(c_log.contains("claiming rj/epoch"), "{c_log}");
}

#[test]
fn a_join_while_a_client_writes_loses_nothing() {
    if !kvm_available("a_join_while_a_client_writes_loses_nothing") {
        return;
    }
    let lab = Lab::new("rejoin-load");
    let (b_listen, c_listen, a_join) = (free_addr(), free_addr(), free_addr());
    let mut b = lab.backup("b", b_listen, None);
    let mut a = lab.primary("a", b_listen, a_join);
    wait_for_port(lab.service, LIMIT);
    let mut conn = None;
    let mut acked = write_some(&lab, &mut conn, "paired", 10);
    // The backup dies: the primary goes on alone, and can be joined.
    b.signal(libc::SIGKILL).unwrap();
    wait_log(&mut a, "continuing alone", &lab);

    // Writes run in a thread while C joins; the worst gap between two
    // replies is what a client saw of the join.
    // The serial line has one client at a time: the writer takes ours.
    let mut c = conn.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        let end = Instant::now() + Duration::from_secs(4);
        let mut i = 0;
        while Instant::now() < end {
            let (k, v) = (format!("load:{i}"), format!("w{i}"));
            match c.call(&["SET", &k, &v], Duration::from_secs(10)) {
                Ok(r) if r.is_ok() => acked.push((k, v)),
                other => panic!("SET {k} during the join: {other:?}"),
            }
            worst = worst.max(last.elapsed());
            last = Instant::now();
            i += 1;
        }
        (acked, worst, c)
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut cj = lab.backup("c", c_listen, Some(a_join));
    wait_log(&mut cj, "joined the VM", &lab);
    wait_log(&mut a, "protected again", &lab);
    let (load, worst, c) = writer.join().unwrap();
    conn = Some(c);
    assert!(
        load.len() > 20,
        "only {} writes during the join",
        load.len()
    );
    eprintln!(
        "join during load: {} writes, worst reply gap {} ms",
        load.len(),
        worst.as_millis()
    );
    acked.extend(load);
    // The new pair protects: kill the primary, and C serves everything.
    a.signal(libc::SIGKILL).unwrap();
    wait_log(&mut cj, "going live", &lab);
    check_all(&lab, &mut conn, &acked);
}

/// Runs a joiner to its end and returns its exit code and log.
fn failed_join(
    lab: &Lab,
    name: &str,
    image: &str,
    join: SocketAddr,
    more: &[&str],
) -> (Option<i32>, String) {
    let mut cmd = backup_cmd(image, "rj", free_addr());
    cmd.args(["--join", &join.to_string(), "--serial", "none"])
        .args(more);
    let mut p = lab.spawn(name, cmd);
    let status = p.wait_timeout(LIMIT);
    assert!(status.is_some(), "{name} did not end:\n{}", lab.logs());
    (status.and_then(|s| s.code()), lab.text(name))
}

#[test]
fn bad_joins_are_refused_and_leave_the_survivor_serving() {
    if !kvm_available("bad_joins_are_refused_and_leave_the_survivor_serving") {
        return;
    }
    let lab = Lab::new("rejoin-bad");
    let (b_listen, a_join) = (free_addr(), free_addr());
    let mut b = lab.backup("b", b_listen, None);
    let mut a = lab.primary("a", b_listen, a_join);
    wait_for_port(lab.service, LIMIT);
    let mut conn = None;
    let mut acked = write_some(&lab, &mut conn, "start", 5);

    // Paired: a joiner is refused.
    let (code, text) = failed_join(&lab, "paired-join", "kv", a_join, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("already has a backup"), "{text}");
    acked.extend(write_some(&lab, &mut conn, "after-paired-join", 5));

    b.signal(libc::SIGKILL).unwrap();
    wait_log(&mut a, "continuing alone", &lab);

    // Another image, and another memory size: refused by the Hellos.
    let (code, text) = failed_join(&lab, "other-image", "hello", a_join, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("image"), "{text}");
    let (code, text) = failed_join(&lab, "other-mem", "kv", a_join, &["--mem", "128M"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("machine"), "{text}");
    acked.extend(write_some(&lab, &mut conn, "after-mismatch", 5));

    // A joiner that dies halfway through the transfer.
    let mut half = lab.spawn("half", {
        let mut cmd = backup_cmd("kv", "rj", free_addr());
        cmd.args(["--join", &a_join.to_string(), "--serial", "none"]);
        cmd
    });
    wait_log(&mut half, "receiving its memory", &lab);
    // Frozen, then killed: the survivor either gives the transfer up, or
    // (if it had already handed over) loses its new backup and wins the
    // arbiter again; either way it goes on alone.
    half.signal(libc::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    half.signal(libc::SIGKILL).unwrap();
    acked.extend(write_some(&lab, &mut conn, "after-half", 5));
    let end = Instant::now() + LIMIT;
    loop {
        let t = lab.text("a");
        if t.contains("the join failed") || t.matches("continuing alone").count() >= 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the survivor never gave the half join up:\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The survivor still serves, and a good joiner still protects it.
    let c_listen = free_addr();
    let mut cj = lab.backup("c", c_listen, Some(a_join));
    wait_log(&mut cj, "joined the VM", &lab);
    acked.extend(write_some(&lab, &mut conn, "after-join", 5));
    a.signal(libc::SIGKILL).unwrap();
    wait_log(&mut cj, "going live", &lab);
    check_all(&lab, &mut conn, &acked);
    assert!(Path::new(&lab.log("a")).exists());
}
