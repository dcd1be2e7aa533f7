//! `duet status` against a live pair, then against the same pair with the
//! primary killed: the dead side is a row that says "unreachable", the
//! survivor shows itself live and alone. The sides' event logs (`--events`)
//! tell the failover in order.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(20);

fn status(args: &[String]) -> std::process::Output {
    run_bounded(duet().arg("status").args(args), None, LIMIT)
}

/// The `event` fields of a JSON-lines event log, in order.
fn events(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            assert!(v["ts"].as_f64().is_some_and(|t| t > 1.6e9), "{l}");
            v["event"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn status_of_a_pair_and_of_its_survivor() {
    if !kvm_available("status_of_a_pair_and_of_its_survivor") {
        return;
    }
    let dir = tempdir("status");
    let (tas, chan, service) = (free_addr(), free_addr(), free_addr());
    let (m_primary, m_backup) = (free_addr(), free_addr());
    let _arbiter = Proc::spawn(
        "arbiter",
        Command::new(tas_server_bin())
            .args(["--listen", &tas.to_string()])
            .arg("--state")
            .arg(dir.path().join("tas.state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    wait_for_port(tas, LIMIT);
    let (ev_primary, ev_backup) = (dir.path().join("p.jsonl"), dir.path().join("b.jsonl"));
    let backup = launch(
        backup_cmd("kv", "st", chan)
            .args(["--tas", &tas.to_string()])
            .args(["--serial", &format!("tcp:{service}")])
            .args(["--metrics", &m_backup.to_string()])
            .arg("--events")
            .arg(&ev_backup),
        false,
    );
    let mut primary = launch(
        primary_cmd("kv", "st", chan)
            .args(["--tas", &tas.to_string()])
            .args(["--serial", &format!("tcp:{service}")])
            .args(["--metrics", &m_primary.to_string()])
            .arg("--events")
            .arg(&ev_primary),
        false,
    );
    wait_for_port(service, LIMIT);
    let mut c = connect(service, LIMIT);
    assert!(c.call(&["SET", "k", "v"], LIMIT).unwrap().is_ok());

    let both = [m_primary.to_string(), m_backup.to_string()];
    let o = status(&both);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{text}{}", stderr(&o));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("SIDE"), "{text}");
    let row = |addr: &str| lines.iter().find(|l| l.starts_with(addr)).copied().unwrap();
    let p = row(&both[0]);
    let b = row(&both[1]);
    assert!(p.contains(" primary ") && p.contains(" paired "), "{text}");
    assert!(b.contains(" backup ") && b.contains(" paired "), "{text}");

    primary.kill();
    // The backup goes live; wait until it says so.
    let end = Instant::now() + LIMIT;
    let text = loop {
        let o = status(&both);
        let text = stdout(&o);
        if text.contains(" alone ") || Instant::now() > end {
            assert_eq!(o.status.code(), Some(2), "{text}");
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines: Vec<&str> = text.lines().collect();
    let row = |addr: &str| lines.iter().find(|l| l.starts_with(addr)).copied().unwrap();
    assert!(row(&both[0]).contains("unreachable"), "{text}");
    let b = row(&both[1]);
    assert!(b.contains(" primary ") && b.contains(" alone "), "{text}");

    // --watch redraws until SIGTERM, and ends cleanly.
    let mut watch = launch(
        duet()
            .args(["status", "--watch", "--interval-ms", "100"])
            .args(&both),
        false,
    );
    std::thread::sleep(Duration::from_millis(600));
    watch.terminate().unwrap();
    let out = finish(watch, LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).matches("\x1b[H\x1b[2J").count() >= 2);
    assert!(stdout(&out).contains("unreachable"));

    assert_eq!(
        events(&ev_backup),
        ["paired", "peer_lost", "claim_sent", "claim_granted", "live"]
    );
    assert_eq!(events(&ev_primary), ["paired"]);
    drop(backup);
}

#[test]
fn status_without_addresses_or_with_a_bad_one_is_refused() {
    let o = run_bounded(duet().arg("status"), None, LIMIT);
    assert_ne!(o.status.code(), Some(0));
    let o = run_bounded(duet().args(["status", "nowhere"]), None, LIMIT);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
}
