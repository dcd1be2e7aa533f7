//! The log channel over mutual TLS (`--tls-ca`, `--tls-cert`, `--tls-key`,
//! credentials from `duet certs`): a pair with the right credentials
//! serves kv and the backup replays it exactly; every wrong peer is refused
//! with a one-line reason on both sides, and a refused primary leaves the
//! backup waiting for the right one, which then pairs.
//!
//! Wrong peers: a primary without credentials, one with another CA's
//! certificate, one with another VM's certificate from the same CA, a
//! backup with another CA's certificate, a plaintext handshake captured
//! from a real primary and replayed, and a correctly credentialed primary
//! from an older epoch.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(30);
/// The VM id of every pair here; `other` is another VM of the same CA.
const VM: &str = "ft-tls";

/// A deployment's credentials (`duet certs`, for `VM` and `other`) and a
/// second deployment's (another CA, for `VM`).
struct Deployments {
    dir: tempfile::TempDir,
}

impl Deployments {
    fn new(test: &str) -> Deployments {
        let dir = tempdir(test);
        for (sub, vms) in [("ours", format!("{VM},other")), ("theirs", VM.to_string())] {
            let o = run_bounded(
                duet()
                    .args(["certs", "--vm-id", &vms, "--out"])
                    .arg(dir.path().join(sub)),
                None,
                LIMIT,
            );
            assert!(o.status.success(), "duet certs: {}", stderr(&o));
        }
        Deployments { dir }
    }

    fn path(&self, sub: &str, file: &str) -> PathBuf {
        self.dir.path().join(sub).join(file)
    }

    /// The TLS flags: the CA of `ca`, the certificate and key `stem` of
    /// `cert` ("ours" or "theirs").
    fn flags(&self, ca: &str, cert: &str, stem: &str) -> Vec<String> {
        let p = |sub: &str, f: &str| self.path(sub, f).display().to_string();
        vec![
            "--tls-ca".into(),
            p(ca, "ca.pem"),
            "--tls-cert".into(),
            p(cert, &format!("{stem}.pem")),
            "--tls-key".into(),
            p(cert, &format!("{stem}-key.pem")),
        ]
    }

    /// The right credentials for `VM`.
    fn good(&self) -> Vec<String> {
        self.flags("ours", "ours", VM)
    }
}

/// A backup of `hello` for `VM` with these extra flags, started.
fn start_backup(chan: SocketAddr, flags: &[String]) -> Proc {
    launch(backup_cmd("hello", VM, chan).args(flags), false)
}

/// Runs a `hello` primary for `VM` with these extra flags to the end.
fn run_primary(chan: SocketAddr, flags: &[String]) -> std::process::Output {
    run_bounded(
        primary_cmd("hello", VM, chan)
            .args(["--serial", "none"])
            .args(flags),
        None,
        LIMIT,
    )
}

/// Checks that a refused primary exited 1 with `why` on one line and ran
/// no guest; then that the backup, still waiting, pairs with a primary
/// with the right credentials (both finish with the same state) and
/// reported exactly one refusal, naming `backup_why`.
fn refused_then_paired(
    what: &str,
    d: &Deployments,
    chan: SocketAddr,
    mut backup: Proc,
    refused: std::process::Output,
    why: &str,
    backup_why: &str,
) {
    let err = stderr(&refused);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{what}: {:?}\n{err}",
        refused.status
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("duet: "))
        .unwrap_or_else(|| panic!("{what}: no error line:\n{err}"));
    assert!(line.contains(why), "{what}: expected {why:?} in {line:?}");
    assert!(
        !err.contains("final state"),
        "{what}: the guest ran:\n{err}"
    );
    assert!(
        backup.status().is_none(),
        "{what}: the backup gave up after the refusal"
    );
    let good = run_primary(chan, &d.good());
    assert_eq!(good.status.code(), Some(0), "{what}: {}", stderr(&good));
    let b = finish(backup, LIMIT);
    let berr = stderr(&b);
    assert_eq!(b.status.code(), Some(0), "{what}: backup: {berr}");
    assert_eq!(final_state(&good), final_state(&b), "{what}");
    let refusals: Vec<&str> = berr
        .lines()
        .filter(|l| l.starts_with("duet: refused a primary:"))
        .collect();
    assert_eq!(refusals.len(), 1, "{what}: backup stderr:\n{berr}");
    assert!(
        refusals[0].contains(backup_why),
        "{what}: expected {backup_why:?} in {:?}",
        refusals[0]
    );
}

#[test]
fn a_tls_pair_serves_kv_and_the_backup_replays_it() {
    if !kvm_available("a_tls_pair_serves_kv_and_the_backup_replays_it") {
        return;
    }
    let d = Deployments::new("ft_tls_kv");
    let (chan, serial) = (free_addr(), free_addr());
    let transcript = |side: &str| d.dir.path().join(format!("{side}.txt"));
    let backup = launch(
        backup_cmd("kv", VM, chan)
            .args(d.good())
            .arg("--transcript")
            .arg(transcript("backup")),
        false,
    );
    let mut primary = launch(
        primary_cmd("kv", VM, chan)
            .args(d.good())
            .args(["--serial", &format!("tcp:{serial}")])
            .args(["--digest-interval-ms", "100"])
            .arg("--transcript")
            .arg(transcript("primary")),
        false,
    );
    wait_for_port(serial, LIMIT);
    let cli = |args: &[&str]| {
        let o = redis_cli(serial, args, None, LIMIT);
        assert!(o.status.success(), "redis-cli {args:?}: {}", stderr(&o));
        stdout(&o).trim_end().to_string()
    };
    for i in 0..50 {
        assert_eq!(cli(&["SET", &format!("k{i}"), &format!("v{i}")]), "OK");
    }
    assert_eq!(cli(&["GET", "k7"]), "v7");
    assert_eq!(cli(&["INCR", "n"]), "1");
    assert_eq!(cli(&["DBSIZE"]), "51");

    primary.terminate().unwrap();
    let p = finish(primary, LIMIT);
    let b = finish(backup, LIMIT);
    assert_eq!(p.status.code(), Some(0), "primary: {}", stderr(&p));
    assert_eq!(b.status.code(), Some(0), "backup: {}", stderr(&b));
    assert_eq!(final_state(&p), final_state(&b));
    for (side, o) in [("primary", &p), ("backup", &b)] {
        assert!(
            !stderr(o).contains("unauthenticated"),
            "{side} warned of a plaintext channel:\n{}",
            stderr(o)
        );
    }
    let (pt, bt) = (
        std::fs::read(transcript("primary")).unwrap(),
        std::fs::read(transcript("backup")).unwrap(),
    );
    assert!(pt.windows(3).any(|w| w == b"+OK"), "{} bytes", pt.len());
    assert!(
        pt == bt,
        "transcripts differ: {} and {} bytes",
        pt.len(),
        bt.len()
    );
}

#[test]
fn a_primary_without_credentials_is_refused() {
    if !kvm_available("a_primary_without_credentials_is_refused") {
        return;
    }
    let d = Deployments::new("ft_tls_plain");
    let chan = free_addr();
    let backup = start_backup(chan, &d.good());
    let refused = run_primary(chan, &[]);
    refused_then_paired(
        "no credentials",
        &d,
        chan,
        backup,
        refused,
        "duet: the peer refused us: this backup requires mutual TLS and the primary spoke plaintext",
        "the primary did not speak TLS",
    );
}

#[test]
fn a_plaintext_pair_works_and_each_side_warns_once() {
    if !kvm_available("a_plaintext_pair_works_and_each_side_warns_once") {
        return;
    }
    let chan = free_addr();
    let backup = start_backup(chan, &[]);
    let p = run_primary(chan, &[]);
    let b = finish(backup, LIMIT);
    assert_eq!(p.status.code(), Some(0), "{}", stderr(&p));
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    assert_eq!(final_state(&p), final_state(&b));
    for (side, o) in [("primary", &p), ("backup", &b)] {
        let err = stderr(o);
        let warnings = err
            .lines()
            .filter(|l| l.contains("the log channel is unauthenticated and unencrypted"))
            .count();
        assert_eq!(warnings, 1, "{side}:\n{err}");
    }
}

#[test]
fn a_primary_with_another_cas_certificate_is_refused() {
    if !kvm_available("a_primary_with_another_cas_certificate_is_refused") {
        return;
    }
    let d = Deployments::new("ft_tls_ca");
    let chan = free_addr();
    let backup = start_backup(chan, &d.good());
    // It trusts our CA (so it accepts the backup) but presents theirs.
    let refused = run_primary(chan, &d.flags("ours", "theirs", VM));
    refused_then_paired(
        "another CA",
        &d,
        chan,
        backup,
        refused,
        "duet: TLS handshake with the backup failed: the backup rejected our certificate",
        "TLS handshake with the primary failed: the primary's certificate is not signed by this side's CA",
    );
}

#[test]
fn a_primary_with_another_vms_certificate_is_refused() {
    if !kvm_available("a_primary_with_another_vms_certificate_is_refused") {
        return;
    }
    let d = Deployments::new("ft_tls_vm");
    let chan = free_addr();
    let backup = start_backup(chan, &d.good());
    let refused = run_primary(chan, &d.flags("ours", "ours", "other"));
    refused_then_paired(
        "another VM",
        &d,
        chan,
        backup,
        refused,
        "duet: TLS handshake with the backup failed: the backup rejected our certificate",
        &format!(
            "the primary's certificate is for another name: {VM}.vm.duet was expected, it is only valid for other.vm.duet"
        ),
    );
}

#[test]
fn a_backup_with_another_cas_certificate_is_refused_by_the_primary() {
    if !kvm_available("a_backup_with_another_cas_certificate_is_refused_by_the_primary") {
        return;
    }
    let d = Deployments::new("ft_tls_backup_ca");
    let chan = free_addr();
    let mut backup = start_backup(chan, &d.flags("ours", "theirs", VM));
    let start = Instant::now();
    let refused = run_primary(chan, &d.good());
    let took = start.elapsed();
    let err = stderr(&refused);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "{:?}\n{err}",
        refused.status
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("duet: ")).collect();
    assert_eq!(lines.len(), 1, "one error line:\n{err}");
    assert!(
        lines[0].starts_with(
            "duet: TLS handshake with the backup failed: the backup's certificate is not signed by this side's CA"
        ),
        "{}",
        lines[0]
    );
    // No retrying a backup that cannot be trusted.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(backup.status().is_none(), "the backup gave up");
    backup.kill();
    let b = finish(backup, LIMIT);
    let berr = stderr(&b);
    assert!(
        berr.lines().any(|l| l.starts_with("duet: refused a primary: TLS handshake with the primary failed: the primary rejected our certificate")),
        "backup stderr:\n{berr}"
    );
}

/// The bytes a plaintext `duet primary` sends first (its Hello), captured
/// by a listener that plays the backup and says nothing.
fn captured_plaintext_hello() -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut primary = launch(
        primary_cmd("hello", VM, addr).args(["--serial", "none", "--epoch", "3"]),
        false,
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(5);
    // The Hello is one frame: its length prefix says when it is all here.
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if got.len() >= 8 {
            let len = u32::from_le_bytes(got[..4].try_into().unwrap()) as usize;
            if got.len() >= 8 + len {
                break;
            }
        }
    }
    primary.kill();
    assert!(got.len() > 8, "captured {} bytes", got.len());
    got
}

#[test]
fn a_replayed_plaintext_handshake_is_refused() {
    if !kvm_available("a_replayed_plaintext_handshake_is_refused") {
        return;
    }
    let d = Deployments::new("ft_tls_replay");
    let hello = captured_plaintext_hello();
    assert!(
        hello.windows(VM.len()).any(|w| w == VM.as_bytes()),
        "not a Hello: {hello:?}"
    );
    let chan = free_addr();
    let backup = start_backup(chan, &d.good());
    // Not wait_for_port: its probe would be one more (silent) primary.
    let end = Instant::now() + LIMIT;
    let mut s = loop {
        match TcpStream::connect(chan) {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => panic!("no backup at {chan}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello).unwrap();
    let mut answer = Vec::new();
    // The backup answers with a refusal and closes: bounded.
    let start = Instant::now();
    let _ = s.read_to_end(&mut answer);
    assert!(start.elapsed() < Duration::from_secs(5));
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("requires mutual TLS"),
        "the backup's answer: {text:?}"
    );
    // A partial set of flags is a usage error, before any connection.
    let partial = d.path("ours", "ca.pem").display().to_string();
    let refused = run_primary(chan, &["--tls-ca".to_string(), partial]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "a partial set is a usage error: {}",
        stderr(&refused)
    );
    let good = run_primary(chan, &d.good());
    assert_eq!(good.status.code(), Some(0), "{}", stderr(&good));
    let b = finish(backup, LIMIT);
    let berr = stderr(&b);
    assert_eq!(b.status.code(), Some(0), "{berr}");
    assert!(
        berr.lines().any(|l| l
            == "duet: refused a primary: the primary did not speak TLS (this side requires mutual TLS: is the primary running without --tls-ca, --tls-cert and --tls-key?)"),
        "backup stderr:\n{berr}"
    );
}

#[test]
fn an_old_epoch_with_valid_credentials_is_refused() {
    if !kvm_available("an_old_epoch_with_valid_credentials_is_refused") {
        return;
    }
    let d = Deployments::new("ft_tls_epoch");
    let chan = free_addr();
    let mut flags = d.good();
    flags.extend(["--epoch".to_string(), "7".to_string()]);
    let backup = start_backup(chan, &flags);
    let mut old = d.good();
    old.extend(["--epoch".to_string(), "6".to_string()]);
    let refused = run_primary(chan, &old);
    let err = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("duet: the peer refused us: epoch 6 does not match ours (7)"),
        "{err}"
    );
    assert!(!err.contains("final state"), "{err}");
    // The right epoch pairs; the backup reported the old one.
    let mut current = d.good();
    current.extend(["--epoch".to_string(), "7".to_string()]);
    let good = run_primary(chan, &current);
    assert_eq!(good.status.code(), Some(0), "{}", stderr(&good));
    let b = finish(backup, LIMIT);
    let berr = stderr(&b);
    assert_eq!(final_state(&good), final_state(&b));
    assert!(
        berr.lines().any(|l| l.starts_with(
            "duet: refused a primary: refused the peer: epoch 6 does not match ours (7)"
        )),
        "backup stderr:\n{berr}"
    );
}
