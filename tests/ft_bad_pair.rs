//! Bad input to `duet primary` and `duet backup` gets a one-line error and
//! a non-zero exit, never a hang or a panic: an unreachable arbiter, an
//! unreachable backup, a backup address already in use.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

fn one_line_error(o: &std::process::Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "status {:?}, stderr {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    assert!(lines[0].starts_with("duet: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {err}");
    }
}

#[test]
fn unreachable_arbiter_at_start_is_an_error() {
    if !kvm_available("unreachable_arbiter_at_start_is_an_error") {
        return;
    }
    let (arbiter, backup) = (free_addr(), free_addr());
    let o = run_bounded(
        primary_cmd("kv", "bad", backup).args(["--tas", &arbiter.to_string()]),
        None,
        LIMIT,
    );
    one_line_error(&o, &["arbiter", &arbiter.to_string(), "refused"]);
}

#[test]
fn unreachable_backup_is_an_error() {
    if !kvm_available("unreachable_backup_is_an_error") {
        return;
    }
    let backup = free_addr();
    let o = run_bounded(
        primary_cmd("kv", "bad", backup).args(["--connect-timeout-ms", "300"]),
        None,
        LIMIT,
    );
    one_line_error(&o, &["cannot connect to the backup", &backup.to_string()]);
}

#[test]
fn backup_listen_address_in_use_is_an_error() {
    if !kvm_available("backup_listen_address_in_use_is_an_error") {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let o = run_bounded(&mut backup_cmd("kv", "bad", addr), None, LIMIT);
    one_line_error(&o, &["cannot listen on", "in use"]);
}
