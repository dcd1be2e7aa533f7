//! Verified-output mode (`duet primary --verify-outputs`): an output leaves
//! only once the backup has replayed up to it and found its own output
//! there the same bytes, and the state digest after it equal.
//!
//! - `tscecho` prints TSC values, which Duet cannot log: the backup prints
//!   other bytes at the same exits. With the flag, the client receives
//!   nothing that the backup did not print too (in practice nothing at
//!   all), the backup exits 4 having diverged, and the primary exits 4
//!   with its held outputs unreleased, although an arbiter would let it go
//!   on alone. Without the flag, the same pair hands the client lines that
//!   the backup never printed: that is the contrast.
//! - Deterministic guests (`hello`, `kv`) work as usual with the flag:
//!   every output arrives, and both sides end with the same state.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A tas-server on a fresh port, state in `dir`.
fn arbiter(dir: &Path) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let p = Proc::spawn(
        "arbiter",
        Command::new(tas_server_bin())
            .args(["--listen", &addr.to_string()])
            .arg("--state")
            .arg(dir.join("tas.state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    wait_for_port(addr, Duration::from_secs(10));
    (p, addr)
}

/// Waits until `p` (a primary) serves its serial line at `addr`; if it
/// ends or does not within `limit`, panics with what it said.
fn wait_for_serial(mut p: Proc, addr: SocketAddr, limit: Duration) -> Proc {
    let end = Instant::now() + limit;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return p;
        }
        if p.status().is_some() || Instant::now() >= end {
            p.kill();
            let o = finish(p, LIMIT);
            panic!(
                "the primary did not serve {addr}: {:?}: {}",
                o.status,
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to the guest's serial line, starts `tscecho` with one byte,
/// and reads until the primary closes the line (or `limit`).
fn read_serial(addr: SocketAddr, limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to the serial line");
    // wait_for_serial's probe connection was the first client; ours is
    // the newest one, which output produced before any input goes to.
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"g").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut got, end) = (Vec::new(), Instant::now() + limit);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    got
}

struct Run {
    client: Vec<u8>,
    backup_printed: Vec<u8>,
    primary: Output,
    backup: Output,
}

/// A `tscecho` pair with an arbiter, `--verify-outputs` if `verify`.
fn tscecho_pair(name: &str, verify: bool) -> Run {
    let dir = tempdir(name);
    let (_tas, tas) = arbiter(dir.path());
    let (chan, serial) = (free_addr(), free_addr());
    let transcript = dir.path().join("backup.txt");
    let backup = launch(
        backup_cmd("tscecho", name, chan)
            .args(["--tas", &tas.to_string()])
            .arg("--transcript")
            .arg(&transcript),
        false,
    );
    let mut cmd = primary_cmd("tscecho", name, chan);
    cmd.args(["--tas", &tas.to_string()])
        .args(["--serial", &format!("tcp:{serial}")]);
    if verify {
        cmd.arg("--verify-outputs");
    }
    let primary = wait_for_serial(launch(&mut cmd, false), serial, LIMIT);
    let client = read_serial(serial, LIMIT);
    let primary = finish(primary, LIMIT);
    let backup = finish(backup, LIMIT);
    let backup_printed = std::fs::read(&transcript).unwrap_or_default();
    for (who, o) in [("primary", &primary), ("backup", &backup)] {
        assert!(!stderr(o).contains("panicked"), "{who}: {}", stderr(o));
    }
    Run {
        client,
        backup_printed,
        primary,
        backup,
    }
}

#[test]
fn verified_output_holds_back_what_the_backup_cannot_reproduce() {
    if !kvm_available("verified_output_holds_back_what_the_backup_cannot_reproduce") {
        return;
    }
    let r = tscecho_pair("verify-tscecho", true);
    let (perr, berr) = (stderr(&r.primary), stderr(&r.backup));
    let client = String::from_utf8_lossy(&r.client);
    // Every byte the client got, the backup printed too, at the same place.
    assert!(
        r.backup_printed.starts_with(&r.client),
        "the client got {client:?}, the backup printed {:?}",
        String::from_utf8_lossy(&r.backup_printed)
    );
    // In practice the first value differs, so no line reaches the client.
    assert!(
        !client.contains('\n'),
        "the client got a whole line: {client:?}"
    );
    assert_eq!(
        r.backup.status.code(),
        Some(EXIT_DIVERGENCE),
        "backup: {berr}"
    );
    assert!(berr.contains("diverged from the primary"), "{berr}");
    assert_eq!(
        r.primary.status.code(),
        Some(EXIT_DIVERGENCE),
        "primary: {perr}"
    );
    assert!(
        perr.contains("the backup could not reproduce the execution at exit")
            && perr.contains("held outputs were not released"),
        "{perr}"
    );
    // It had an arbiter, and still did not go on alone.
    assert!(!perr.contains("continuing alone"), "{perr}");
}

#[test]
fn without_verification_the_client_sees_output_the_backup_did_not_produce() {
    if !kvm_available("without_verification_the_client_sees_output_the_backup_did_not_produce") {
        return;
    }
    let r = tscecho_pair("noverify-tscecho", false);
    let client = String::from_utf8_lossy(&r.client);
    let printed = String::from_utf8_lossy(&r.backup_printed);
    let lines: Vec<&str> = client.lines().filter(|l| l.starts_with("tsc ")).collect();
    assert!(!lines.is_empty(), "the client got no line: {client:?}");
    let unreproduced = lines.iter().filter(|l| !printed.contains(**l)).count();
    assert!(
        unreproduced > 0,
        "every line the client got was printed by the backup too:\n{client}"
    );
    // The primary went on (its backup diverged, or was lost) and finished.
    assert_eq!(
        r.primary.status.code(),
        Some(0),
        "primary: {}",
        stderr(&r.primary)
    );
    eprintln!(
        "without --verify-outputs: {} lines reached the client, {unreproduced} not printed by the backup (backup exit {:?})",
        lines.len(),
        r.backup.status.code()
    );
}

#[test]
fn a_deterministic_guest_runs_normally_with_verified_output() {
    if !kvm_available("a_deterministic_guest_runs_normally_with_verified_output") {
        return;
    }
    // hello: output up to its last exits, then power off.
    let chan = free_addr();
    let backup = launch(&mut backup_cmd("hello", "verify-hello", chan), false);
    let primary = launch(
        primary_cmd("hello", "verify-hello", chan)
            .args(["--serial", "stdio"])
            .arg("--verify-outputs"),
        false,
    );
    let p = finish(primary, LIMIT);
    let b = finish(backup, LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", stderr(&p));
    assert_eq!(b.status.code(), Some(0), "backup: {}", stderr(&b));
    let out = stdout(&p);
    assert!(out.contains("Hello from Duet"), "{out}");
    assert!(out.contains("clock_ns="), "{out}");
    assert!(out.contains("rtc="), "{out}");
    assert_eq!(final_state(&p), final_state(&b));

    // kv: request and reply, with serial input in the log.
    let (chan, serial) = (free_addr(), free_addr());
    let backup = launch(&mut backup_cmd("kv", "verify-kv", chan), false);
    let primary = launch(
        primary_cmd("kv", "verify-kv", chan)
            .args(["--serial", &format!("tcp:{serial}")])
            .arg("--verify-outputs"),
        false,
    );
    let mut primary = wait_for_serial(primary, serial, LIMIT);
    let mut c = connect(serial, LIMIT);
    let limit = Duration::from_secs(10);
    for i in 0..20 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        assert!(c.call(&["SET", &k, &v], limit).unwrap().is_ok());
        assert_eq!(c.call(&["GET", &k], limit).unwrap(), Reply::bulk(&v));
    }
    assert_eq!(
        c.call(&["DBSIZE"], limit).unwrap(),
        Reply::Integer(20),
        "every write must be there"
    );
    drop(c);
    primary.terminate().unwrap();
    let p = finish(primary, LIMIT);
    let b = finish(backup, LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", stderr(&p));
    assert_eq!(b.status.code(), Some(0), "backup: {}", stderr(&b));
    assert_eq!(final_state(&p), final_state(&b));
}

/// A backup that is lost (killed), not diverged, is handled as without the
/// flag: the primary wins the arbiter, goes on alone, and what it held
/// leaves.
#[test]
fn a_lost_backup_still_lets_a_verifying_primary_go_on_alone() {
    if !kvm_available("a_lost_backup_still_lets_a_verifying_primary_go_on_alone") {
        return;
    }
    let dir = tempdir("verify-kill-backup");
    let (_tas, tas) = arbiter(dir.path());
    let (chan, serial) = (free_addr(), free_addr());
    let mut backup = launch(
        backup_cmd("kv", "verify-kb", chan).args(["--tas", &tas.to_string()]),
        false,
    );
    let primary = launch(
        primary_cmd("kv", "verify-kb", chan)
            .args(["--tas", &tas.to_string()])
            .args(["--serial", &format!("tcp:{serial}")])
            .arg("--verify-outputs"),
        false,
    );
    let mut primary = wait_for_serial(primary, serial, LIMIT);
    let mut c = connect(serial, LIMIT);
    let limit = Duration::from_secs(10);
    assert!(c.call(&["SET", "before", "1"], limit).unwrap().is_ok());
    backup.signal(libc::SIGKILL).unwrap();
    for i in 0..10 {
        let k = format!("after{i}");
        assert!(c.call(&["SET", &k, "2"], limit).unwrap().is_ok(), "{k}");
    }
    assert_eq!(c.call(&["GET", "before"], limit).unwrap(), Reply::bulk("1"));
    drop(c);
    primary.terminate().unwrap();
    let p = finish(primary, LIMIT);
    let err = stderr(&p);
    assert_eq!(p.status.code(), Some(0), "primary: {err}");
    assert!(err.contains("continuing alone"), "{err}");
    let _ = finish(backup, LIMIT);
}
