//! The arbiter authenticates both ends and authorizes per VM.
//!
//! Against a real `tas-server` in mutual TLS (no KVM): a client without
//! credentials is refused, plaintext or TLS, with the reason on both sides;
//! another VM's certificate cannot claim (and the rightful claim still
//! wins); status shows a pair only its VM and an operator everything; a
//! client trusting another CA refuses the server, and a server refuses a
//! certificate from another CA; a TLS client of a plaintext arbiter is told
//! why; and the real claim loop, given the wrong credentials, gives up at
//! once with the reason instead of retrying. The same against etcd with
//! `--client-cert-auth` and RBAC by certificate CN. End to end (KVM): a
//! `kv` pair with a TLS arbiter fails over when the primary is SIGKILLed,
//! and a backup holding another VM's certificate halts with the reason
//! instead of going live.

mod common;
mod etcd;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tas_server::client::{Client, ClientError};
use tas_server::tls::TlsFiles;
use tas_server::ClaimOutcome;
use vmm::ft::arbiter::{Arbiter, ArbiterAddr, ArbiterTls, Backend};
use vmm::kit::certs::{self, Authority};

/// A deployment's credentials, and an unrelated CA's.
struct Pki {
    dir: tempfile::TempDir,
    arbiter: TlsFiles,
    kv1: TlsFiles,
    kv2: TlsFiles,
    operator: TlsFiles,
    root: TlsFiles,
    /// A certificate for kv1 from another CA, which trusts only that CA.
    stranger: TlsFiles,
}

fn pki(test: &str) -> Pki {
    let dir = tempdir(test);
    let ca = Authority::new(dir.path(), "deployment").unwrap();
    // Another deployment's CA, its files apart (same names, other keys).
    let stranger_dir = dir.path().join("other");
    std::fs::create_dir(&stranger_dir).unwrap();
    let other = Authority::new(&stranger_dir, "other").unwrap();
    Pki {
        arbiter: ca.issue(certs::ARBITER_NAME, true).unwrap(),
        kv1: ca.issue(&certs::vm_name("kv1"), false).unwrap(),
        kv2: ca.issue(&certs::vm_name("kv2"), false).unwrap(),
        operator: ca.issue(certs::OPERATOR_NAME, false).unwrap(),
        root: ca.issue("root", false).unwrap(),
        stranger: other.issue(&certs::vm_name("kv1"), false).unwrap(),
        dir,
    }
}

/// A running tas-server, its log kept for assertions.
struct Tas {
    proc: Proc,
    addr: SocketAddr,
}

impl Tas {
    fn start(dir: &std::path::Path, name: &str, tls: Option<&TlsFiles>) -> Tas {
        let addr = free_addr();
        let mut cmd = Command::new(tas_server_bin());
        cmd.args(["--listen", &addr.to_string()])
            .arg("--state")
            .arg(dir.join(format!("{name}.state")));
        if let Some(files) = tls {
            cmd.args(certs::args(files));
        }
        let mut proc = Proc::logged(name, &mut cmd, &dir.join(format!("{name}.log"))).unwrap();
        assert!(
            proc.wait_for_log("listening on", Duration::from_secs(10)),
            "tas-server did not start: {}",
            proc.log_text()
        );
        Tas { proc, addr }
    }

    fn client(&self, files: Option<&TlsFiles>) -> Client {
        let client = Client::new(self.addr, Duration::from_secs(2));
        match files {
            Some(f) => client.with_tls(f.client_config().unwrap()),
            None => client,
        }
    }

    /// Waits until the server's log contains `needle`.
    fn logged(&mut self, needle: &str) -> String {
        assert!(
            self.proc.wait_for_log(needle, Duration::from_secs(5)),
            "tas-server never logged {needle:?}:\n{}",
            self.proc.log_text()
        );
        self.proc.log_text()
    }
}

/// A TLS config that trusts the deployment's CA but presents no
/// certificate.
fn certless(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn message(e: &ClientError) -> String {
    tas_server::protocol::error_chain(e)
}

#[test]
fn a_claim_without_credentials_is_refused_with_the_reason() {
    let pki = pki("auth-nocred");
    let mut tas = Tas::start(pki.dir.path(), "tas", Some(&pki.arbiter));

    let plain = tas.client(None).test_and_set("kv1", 1, "a").unwrap_err();
    assert!(!plain.is_retryable(), "{plain:?}");
    let m = message(&plain);
    assert!(m.contains("requires TLS with a client certificate"), "{m}");
    assert!(!m.contains('\n'), "{m}");
    tas.logged("refused a plaintext client");

    let certless =
        Client::new(tas.addr, Duration::from_secs(2)).with_tls(certless(&pki.arbiter.ca));
    let e = certless.test_and_set("kv1", 1, "a").unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
    assert!(!e.is_retryable());
    let m = message(&e);
    assert!(m.contains("requires a client certificate"), "{m}");
    let log = tas.logged("refused in the TLS handshake");
    assert!(log.contains("certificate"), "{log}");

    // Nothing was decided.
    let status = tas.client(Some(&pki.operator)).status().unwrap();
    assert!(status.vms.is_empty(), "{status:?}");
}

#[test]
fn another_vms_certificate_cannot_claim_and_the_pair_still_wins() {
    let pki = pki("auth-wrongvm");
    let mut tas = Tas::start(pki.dir.path(), "tas", Some(&pki.arbiter));
    let kv2 = tas.client(Some(&pki.kv2));
    let e = kv2.test_and_set("kv1", 1, "intruder").unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert_eq!(
        message(&e),
        "arbiter refused: not authorized for VM kv1: your certificate names kv2.vm.duet"
    );
    let e = kv2.new_epoch("kv1").unwrap_err();
    assert!(message(&e).contains("not authorized for VM kv1"), "{e:?}");
    tas.logged("refused: not authorized for VM kv1: your certificate names kv2.vm.duet");

    let kv1 = tas.client(Some(&pki.kv1));
    assert_eq!(
        kv1.test_and_set("kv1", 1, "backup").unwrap(),
        ClaimOutcome::Granted
    );
    assert_eq!(
        kv1.test_and_set("kv1", 1, "primary").unwrap(),
        ClaimOutcome::HeldBy {
            holder: "backup".into()
        }
    );
    // An operator may fence a pair, but not claim for it.
    let op = tas.client(Some(&pki.operator));
    assert!(op.test_and_set("kv1", 2, "op").is_err());
    assert_eq!(op.new_epoch("kv1").unwrap(), 2);
}

#[test]
fn status_shows_a_pair_its_vm_and_an_operator_all() {
    let pki = pki("auth-status");
    let tas = Tas::start(pki.dir.path(), "tas", Some(&pki.arbiter));
    let (kv1, kv2) = (tas.client(Some(&pki.kv1)), tas.client(Some(&pki.kv2)));
    assert!(kv1.test_and_set("kv1", 1, "a").unwrap().is_granted());
    assert!(kv2.test_and_set("kv2", 3, "b").unwrap().is_granted());
    let ids = |c: &Client| {
        c.status()
            .unwrap()
            .vms
            .into_iter()
            .map(|v| v.vm_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&kv1), ["kv1"]);
    assert_eq!(ids(&kv2), ["kv2"]);
    assert_eq!(ids(&tas.client(Some(&pki.operator))), ["kv1", "kv2"]);
    // A certificate of the CA that names no VM sees nothing.
    assert!(ids(&tas.client(Some(&pki.root))).is_empty());
}

#[test]
fn another_cas_certificates_are_refused_both_ways() {
    let pki = pki("auth-otherca");
    let mut tas = Tas::start(pki.dir.path(), "tas", Some(&pki.arbiter));
    // The client trusts another CA: it refuses the server.
    let e = tas
        .client(Some(&pki.stranger))
        .test_and_set("kv1", 1, "a")
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. }) && !e.is_retryable(),
        "{e:?}"
    );
    assert!(message(&e).contains("not from our CA"), "{e:?}");
    // The client trusts the right CA but its certificate is another's:
    // the server refuses it.
    let mixed = TlsFiles {
        ca: pki.arbiter.ca.clone(),
        ..pki.stranger.clone()
    };
    let e = tas
        .client(Some(&mixed))
        .test_and_set("kv1", 1, "a")
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. }) && !e.is_retryable(),
        "{e:?}"
    );
    assert!(
        message(&e).contains("does not accept our certificate"),
        "{e:?}"
    );
    tas.logged("refused in the TLS handshake");
    assert!(tas
        .client(Some(&pki.operator))
        .status()
        .unwrap()
        .vms
        .is_empty());
}

#[test]
fn a_plaintext_arbiter_warns_and_tells_a_tls_client() {
    let pki = pki("auth-plain");
    let mut tas = Tas::start(pki.dir.path(), "tas", None);
    tas.logged("anyone who reaches");
    let e = tas
        .client(Some(&pki.kv1))
        .test_and_set("kv1", 1, "a")
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Tls { .. }) && !e.is_retryable(),
        "{e:?}"
    );
    assert!(message(&e).contains("did not answer in TLS"), "{e:?}");
    tas.logged("refused a TLS client");
}

#[test]
fn the_claim_loop_gives_up_at_once_on_a_refusal() {
    let pki = pki("auth-loop");
    let tas = Tas::start(pki.dir.path(), "tas", Some(&pki.arbiter));
    let claim = |files: Option<&TlsFiles>| {
        let arbiter = Arbiter {
            addr: ArbiterAddr::Tas(tas.addr),
            vm_id: "kv1".into(),
            epoch: 1,
            claimant: "backup".into(),
            tls: files.map(|f| ArbiterTls::load(f.clone()).unwrap()),
        };
        let metrics = vmm::ft::metrics::Metrics::new(vmm::ft::metrics::Role::Backup, 1);
        let started = Instant::now();
        let result = arbiter.claim("test", &metrics);
        (result, started.elapsed())
    };
    for (files, why) in [
        (Some(&pki.kv2), "not authorized for VM kv1"),
        (None, "requires TLS"),
        (Some(&pki.stranger), "not from our CA"),
    ] {
        let (result, took) = claim(files);
        let e = result.expect_err(why);
        let m = tas_server::protocol::error_chain(&e);
        assert!(m.starts_with("the arbiter failed: tas-server: "), "{m}");
        assert!(m.contains(why), "{m}");
        assert!(took < Duration::from_secs(3), "took {took:?}: {m}");
    }
    let (result, _) = claim(Some(&pki.kv1));
    result.expect("kv1's own claim wins");
}

#[test]
fn etcd_grants_a_vm_only_to_its_certificate() {
    let pki = pki("auth-etcd");
    let cluster = etcd::Cluster::start_tls("auth-etcd", 1, pki.arbiter.clone(), pki.root.clone());
    cluster.enable_rbac(&["kv1", "kv2"]);
    let eps = cluster.endpoints();
    let connect = |files: &TlsFiles| {
        vmm::ft::arbiter::etcd::EtcdArbiter::connect_with(
            &eps,
            Some(&ArbiterTls::load(files.clone()).unwrap()),
        )
        .unwrap()
    };
    let refused = |r: Result<ClaimOutcome, vmm::ft::arbiter::BackendError>, why: &str| {
        let e = r.expect_err(why);
        let m = tas_server::protocol::error_chain(&e);
        assert!(!e.is_unreachable(), "{m}");
        assert!(m.contains(why), "{m}");
        eprintln!("refused as expected: {m}");
        m
    };
    // Another VM's certificate: permission denied, not retried.
    refused(
        connect(&pki.kv2).test_and_set("kv1", 1, "intruder"),
        "permission denied",
    );
    // The right one.
    assert_eq!(
        connect(&pki.kv1).test_and_set("kv1", 1, "backup").unwrap(),
        ClaimOutcome::Granted
    );
    assert!(connect(&pki.kv2)
        .test_and_set("kv2", 1, "b")
        .unwrap()
        .is_granted());
    // The operator may read, not claim.
    refused(
        connect(&pki.operator).test_and_set("kv1", 2, "op"),
        "permission denied",
    );
    // No client certificate: refused in the handshake, as a TLS failure.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = std::fs::read(&pki.arbiter.ca).unwrap();
    let options = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(2))
        .with_tls(
            etcd_client::TlsOptions::new()
                .domain_name(certs::ARBITER_NAME)
                .ca_certificate(etcd_client::Certificate::from_pem(ca)),
        );
    let e = runtime
        .block_on(async {
            let mut c = etcd_client::Client::connect(&eps, Some(options)).await?;
            c.get("/duet/vms/kv1/epoch", None).await
        })
        .expect_err("no client certificate");
    // etcd refuses in TLS 1.3 after the client's side of the handshake is
    // done; the alert then reaches the request, or hyper only reports the
    // connection closed or a broken pipe (a race inside etcd-client's
    // transport). Any of them is a refusal: no data was served.
    match vmm::ft::arbiter::etcd::tls_failure(&e) {
        Some(reason) => assert!(
            reason.contains("does not accept our certificate"),
            "{reason}"
        ),
        None => assert!(
            matches!(&e, etcd_client::Error::GRpcStatus(s)
                if s.code() == tonic::Code::Cancelled
                    || (s.code() == tonic::Code::Unknown && s.message() == "transport error")),
            "neither a TLS failure nor a closed connection: {e:?}"
        ),
    }
    // A client of another CA refuses the members.
    refused(
        connect(&pki.stranger).test_and_set("kv1", 1, "x"),
        "not from our CA",
    );
    // Plaintext to a TLS-only member: see the next test.
}

/// Fails `what` unless it is refused at once (well within a claim
/// attempt's bound and the probe's), not as unreachable, with `why` in a
/// one-line message.
fn refused_at_once<T: std::fmt::Debug>(
    what: &str,
    why: &str,
    f: impl FnOnce() -> Result<T, vmm::ft::arbiter::BackendError>,
) -> String {
    let t = Instant::now();
    let e = f().expect_err(what);
    let took = t.elapsed();
    let m = tas_server::protocol::error_chain(&e);
    eprintln!("{what}: refused after {took:?}: {m}");
    assert!(!e.is_unreachable(), "{what}: retried as unreachable: {m}");
    assert!(m.contains(why), "{what}: {m}");
    assert!(!m.contains('\n'), "{what}: {m}");
    assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
    m
}

#[test]
fn etcd_with_tls_on_one_side_only_is_a_clear_error_not_an_outage() {
    use vmm::ft::arbiter::etcd::EtcdArbiter;
    let pki = pki("tls-mismatch");
    let tls_only =
        etcd::Cluster::start_tls("tls-mismatch", 1, pki.arbiter.clone(), pki.root.clone());
    let plain = etcd::Cluster::start("tls-mismatch-plain", 1);
    let creds = |files: &TlsFiles| ArbiterTls::load(files.clone()).unwrap();

    // A plaintext client of a TLS-only member, for a claim and for an
    // epoch.
    refused_at_once(
        "a plaintext claim at TLS etcd",
        "speaks TLS and we do not",
        || {
            EtcdArbiter::connect(&tls_only.endpoints())
                .unwrap()
                .test_and_set("kv1", 1, "x")
        },
    );
    refused_at_once(
        "a plaintext new_epoch at TLS etcd",
        "speaks TLS and we do not",
        || {
            EtcdArbiter::connect(&tls_only.endpoints())
                .unwrap()
                .new_epoch("kv1")
        },
    );
    // A TLS client of a plaintext member.
    refused_at_once(
        "a TLS claim at plaintext etcd",
        "does not speak TLS",
        || {
            EtcdArbiter::connect_with(&plain.endpoints(), Some(&creds(&pki.kv1)))
                .unwrap()
                .test_and_set("kv1", 1, "x")
        },
    );
    // A certificate from another CA, presented by a client that trusts
    // the member: the member refuses the handshake.
    let foreign = TlsFiles {
        ca: pki.arbiter.ca.clone(),
        cert: pki.stranger.cert.clone(),
        key: pki.stranger.key.clone(),
    };
    refused_at_once("a foreign certificate at TLS etcd", "TLS with etcd", || {
        EtcdArbiter::connect_with(&tls_only.endpoints(), Some(&creds(&foreign)))
            .unwrap()
            .test_and_set("kv1", 1, "x")
    });
    // A member that is down stays an outage (retried), TLS or not.
    let mut gone = etcd::Cluster::start("tls-mismatch-gone", 1);
    let eps = gone.endpoints();
    gone.kill(0);
    let e = EtcdArbiter::connect(&eps)
        .unwrap()
        .test_and_set("kv1", 1, "x")
        .expect_err("granted by a dead member");
    assert!(e.is_unreachable(), "{e:?}");

    // The real claim loop gives up at once instead of retrying for ever.
    let arbiter = Arbiter {
        addr: ArbiterAddr::Etcd(tls_only.endpoints()),
        vm_id: "kv1".into(),
        epoch: 1,
        claimant: "backup".into(),
        tls: None,
    };
    let metrics = vmm::ft::metrics::Metrics::new(vmm::ft::metrics::Role::Backup, 1);
    let t = Instant::now();
    let e = arbiter
        .claim("test", &metrics)
        .expect_err("a claim won in plaintext");
    let m = tas_server::protocol::error_chain(&e);
    eprintln!("the claim loop gave up after {:?}: {m}", t.elapsed());
    assert!(m.contains("speaks TLS and we do not"), "{m}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A primary without --tls-* fails at start, when it asks for its
    // epoch: exit 1 with the message on one line, not a wait.
    let out = run_bounded(
        primary_cmd("kv", "kv1", free_addr())
            .args(["--tas", &tls_only.tas_arg()])
            .args(["--serial", "none"]),
        None,
        Duration::from_secs(20),
    );
    let err = stderr(&out);
    eprintln!("the primary: {}: {err}", out.status);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("speaks TLS and we do not"))
        .unwrap_or_else(|| panic!("no TLS message: {err}"));
    assert!(line.contains("cannot get a pairing epoch"), "{line}");
}

/// A `kv` pair of VM kv1 with `--tas` at a TLS tas-server; the backup
/// presents `backup_creds`. Returns the pair, the service address and the
/// directory of their logs.
fn tls_pair(test: &str, tas: &Tas, pki: &Pki, backup_creds: &TlsFiles) -> (Proc, Proc, SocketAddr) {
    let (chan, service) = (free_addr(), free_addr());
    let dir = pki.dir.path();
    let backup = Proc::logged(
        "backup",
        backup_cmd("kv", "kv1", chan)
            .args(["--tas", &tas.addr.to_string()])
            .args(certs::args(backup_creds))
            .args(["--serial", &format!("tcp:{service}")])
            .env("DUET_LOG", "info"),
        &dir.join(format!("{test}-backup.log")),
    )
    .unwrap();
    let primary = Proc::logged(
        "primary",
        primary_cmd("kv", "kv1", chan)
            .args(["--tas", &tas.addr.to_string()])
            .args(certs::args(&pki.kv1))
            .args(["--serial", &format!("tcp:{service}")])
            .env("DUET_LOG", "info"),
        &dir.join(format!("{test}-primary.log")),
    )
    .unwrap();
    wait_for_port(service, Duration::from_secs(30));
    (primary, backup, service)
}

fn set_ok(c: &mut Conn, key: &str, value: &str) {
    match c.call(&["SET", key, value], Duration::from_secs(10)) {
        Ok(r) if r.is_ok() => {}
        other => panic!("SET {key} got {other:?}"),
    }
}

#[test]
fn a_tls_pair_fails_over_and_a_wrongly_certified_backup_halts() {
    if !kvm_available("a_tls_pair_fails_over_and_a_wrongly_certified_backup_halts") {
        return;
    }
    let pki = pki("auth-kvm");
    let tas = Tas::start(pki.dir.path(), "tas", Some(&pki.arbiter));

    // The rightful backup wins and goes live with every acknowledged write.
    let (mut primary, mut backup, service) = tls_pair("good", &tas, &pki, &pki.kv1);
    let mut c = connect(service, Duration::from_secs(10));
    for i in 0..10 {
        set_ok(&mut c, &format!("k{i}"), &format!("v{i}"));
    }
    primary.signal(libc::SIGKILL).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        if let Ok(mut c) = Conn::connect(service, Duration::from_millis(500)) {
            if matches!(c.call(&["PING"], Duration::from_secs(5)), Ok(Reply::Simple(ref s)) if s == "PONG")
            {
                break c;
            }
        }
        assert!(
            Instant::now() < end && backup.status().is_none(),
            "the backup did not go live: {:?}\n{}",
            backup.status(),
            backup.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for i in 0..10 {
        assert_eq!(
            c.call(&["GET", &format!("k{i}")], Duration::from_secs(10))
                .unwrap(),
            Reply::bulk(&format!("v{i}"))
        );
    }
    assert!(
        backup.log_text().contains("granted kv1/epoch"),
        "{}",
        backup.log_text()
    );
    let status = tas.client(Some(&pki.kv1)).status().unwrap();
    let holders: Vec<&String> = status.vms.iter().flat_map(|v| v.holders.values()).collect();
    assert!(
        holders.len() == 1 && holders[0].starts_with("backup@"),
        "{status:?}"
    );
    drop(c);
    backup.kill();

    // A backup holding kv2's certificate for kv1 cannot even pair: the
    // primary checks the backup's name on the log channel and refuses it
    // (so it never gets as far as claiming kv1 at the arbiter, which would
    // refuse it too: see another_vms_certificate_cannot_claim_...).
    let dir = pki.dir.path();
    let (chan, service) = (free_addr(), free_addr());
    let mut backup = Proc::logged(
        "backup",
        backup_cmd("kv", "kv1", chan)
            .args(["--tas", &tas.addr.to_string()])
            .args(certs::args(&pki.kv2))
            .args(["--serial", &format!("tcp:{service}")]),
        &dir.join("wrong-backup.log"),
    )
    .unwrap();
    let mut primary = Proc::logged(
        "primary",
        primary_cmd("kv", "kv1", chan)
            .args(["--tas", &tas.addr.to_string()])
            .args(certs::args(&pki.kv1))
            .args(["--serial", &format!("tcp:{service}")]),
        &dir.join("wrong-primary.log"),
    )
    .unwrap();
    let status = primary.wait_timeout(Duration::from_secs(20));
    let log = primary.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the primary must refuse the backup: {status:?}\n{log}"
    );
    assert!(log.contains("kv1.vm.duet"), "{log}");
    assert!(backup.status().is_none(), "the backup keeps waiting");
    assert!(!backup.log_text().contains("going live"));
    assert!(
        std::net::TcpStream::connect_timeout(&service, Duration::from_millis(300)).is_err(),
        "nothing may serve {service}"
    );
    backup.kill();
}
