//! Asking the test-and-set arbiter who survives.
//!
//! When a side of the pair loses the other it claims (VM id, epoch). The
//! arbiter grants exactly one claim per pair; the winner goes live, the
//! loser halts. While the arbiter cannot be reached nobody goes live: the
//! claim is retried, and the wait shows in the logs and the status page.
//!
//! Two arbiters speak the same semantics (tas-server's protocol doc is the
//! reference: one winner per (VM id, epoch), the holder asking again is
//! granted again, an older epoch is superseded, a newer one raises the
//! current epoch, `new_epoch` is current + 1):
//!
//! - [`tas`]: the embedded `tas-server`, one process with a durable ledger.
//!   Simple, and what `duet demo` runs, but a single point of failure: while
//!   it is down no pair can fail over.
//! - [`etcd`]: an etcd cluster, for production. Decisions are replicated by
//!   Raft, so the arbiter survives the loss of a minority of its members.
//!
//! The claim loop below is the same for both; a [`Backend`] only answers
//! one attempt, and says whether a failure means "not reached" (retry, as
//! nobody may go live) or something retrying cannot fix.
//!
//! # Mutual TLS
//!
//! With `--tls-ca --tls-cert --tls-key` ([`ArbiterTls`]) both backends
//! speak mutual TLS: the same `--tas` value (`HOST:PORT`, `tas://`,
//! `etcd://`), TLS because the flags say so. The arbiter must prove it is
//! `arbiter.duet` from the given CA; we present the pair's certificate
//! (`V.vm.duet`), which is what lets the arbiter grant us VM `V` and nobody
//! else. A TLS failure or an authorization refusal is not "unreachable":
//! the claim loop does not retry it, and the side halts with the reason
//! instead of going live or waiting silently. The files are read when the
//! side starts, so a missing or broken one fails the start, not the
//! failover.

pub mod etcd;
pub mod tas;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tas_server::tls::{ClientConfig, TlsError, TlsFiles};

pub use tas_server::client::ClaimOutcome;

use super::events::Event;
use super::metrics::{ArbiterState, Metrics};
use super::{Error, Rival};
use crate::stop;

/// Pause between attempts while the arbiter is unreachable.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Which arbiter to ask, as given to `--tas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterAddr {
    /// A `tas-server`: `HOST:PORT` or `tas://HOST:PORT`.
    Tas(SocketAddr),
    /// An etcd cluster: `etcd://HOST:PORT[,HOST:PORT...]`, every member's
    /// client address, so that the client can go on with any of them.
    Etcd(Vec<String>),
}

/// Why a `--tas` value is not an arbiter address (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseArbiterError(String);

impl FromStr for ArbiterAddr {
    type Err = ParseArbiterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| ParseArbiterError(why);
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, s),
        };
        match scheme {
            Some("etcd") => {
                let mut endpoints = Vec::new();
                for ep in rest.split(',') {
                    check_host_port(ep).map_err(|why| {
                        bad(format!("etcd endpoint {ep:?} in {s:?}: {why} (expected etcd://HOST:PORT[,HOST:PORT...])"))
                    })?;
                    endpoints.push(ep.to_owned());
                }
                Ok(ArbiterAddr::Etcd(endpoints))
            }
            None | Some("tas") => {
                if let Ok(addr) = rest.parse::<SocketAddr>() {
                    return Ok(ArbiterAddr::Tas(addr));
                }
                check_host_port(rest).map_err(|why| {
                    bad(format!(
                        "{s:?}: {why} (expected HOST:PORT or tas://HOST:PORT for tas-server, \
                         etcd://HOST:PORT[,HOST:PORT...] for etcd)"
                    ))
                })?;
                let addr = rest
                    .to_socket_addrs()
                    .map_err(|e| bad(format!("cannot resolve {rest:?}: {e}")))?
                    .next()
                    .ok_or_else(|| bad(format!("{rest:?} resolves to no address")))?;
                Ok(ArbiterAddr::Tas(addr))
            }
            Some(other) => Err(bad(format!(
                "unknown arbiter scheme {other:?} in {s:?} (expected etcd:// or tas://)"
            ))),
        }
    }
}

/// Checks `HOST:PORT` (a bracketed IPv6 host allowed) without resolving it.
fn check_host_port(s: &str) -> Result<(), &'static str> {
    let (host, port) = s.rsplit_once(':').ok_or("no :PORT")?;
    if host.is_empty() || host == "[]" {
        return Err("no host");
    }
    if host.contains([',', '/', ' ']) || (host.contains(':') && !host.starts_with('[')) {
        return Err("not a host name or address");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port is not a number in 1..65535"),
    }
}

impl fmt::Display for ArbiterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Bare, as `--tas` has always taken it.
            ArbiterAddr::Tas(addr) => write!(f, "{addr}"),
            ArbiterAddr::Etcd(endpoints) => write!(f, "etcd://{}", endpoints.join(",")),
        }
    }
}

impl ArbiterAddr {
    /// A backend for one claim loop or one `new_epoch`. Connecting is lazy
    /// for both backends: an unreachable arbiter shows at the first request,
    /// where the claim loop can retry it.
    /// With `tls`, in mutual TLS.
    pub fn connect(&self, tls: Option<&ArbiterTls>) -> Result<Box<dyn Backend>, BackendError> {
        Ok(match self {
            ArbiterAddr::Tas(addr) => Box::new(tas::TasArbiter::new(
                *addr,
                tls.map(|t| Arc::clone(&t.client)),
            )),
            ArbiterAddr::Etcd(endpoints) => Box::new(
                etcd::EtcdArbiter::connect_with(endpoints, tls).map_err(BackendError::Etcd)?,
            ),
        })
    }
}

/// Why the arbiter's TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error(transparent)]
    Config(#[from] TlsError),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// This side's credentials for the arbiter, loaded and checked once.
#[derive(Clone)]
pub struct ArbiterTls {
    /// Where they came from.
    pub files: TlsFiles,
    /// For tas-server.
    client: Arc<ClientConfig>,
    /// For etcd, whose client (tonic) takes PEM.
    pem: [Vec<u8>; 3],
}

impl fmt::Debug for ArbiterTls {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArbiterTls({:?})", self.files)
    }
}

impl ArbiterTls {
    /// Reads and checks `files` (the CA, the certificate and its key).
    pub fn load(files: TlsFiles) -> Result<ArbiterTls, TlsLoadError> {
        let client = files.client_config()?;
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsLoadError::Read {
                path: path.clone(),
                source,
            })
        };
        let pem = [read(&files.ca)?, read(&files.cert)?, read(&files.key)?];
        Ok(ArbiterTls { files, client, pem })
    }

    /// etcd-client's TLS options: trust the CA, verify `arbiter.duet`,
    /// present our certificate.
    pub fn etcd_options(&self) -> etcd_client::TlsOptions {
        let [ca, cert, key] = &self.pem;
        etcd_client::TlsOptions::new()
            .domain_name(tas_server::tls::ARBITER_NAME)
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key))
    }
}

/// One arbiter, asked one question at a time. Each call is bounded in time
/// (about a second at most), so the claim loop can look at stop requests.
pub trait Backend {
    /// Claims `(vm_id, epoch)` for `claimant`; only
    /// [`ClaimOutcome::Granted`] lets the caller go live.
    fn test_and_set(
        &mut self,
        vm_id: &str,
        epoch: u64,
        claimant: &str,
    ) -> Result<ClaimOutcome, BackendError>;

    /// Makes `current + 1` the VM's current epoch, durably, and returns it.
    fn new_epoch(&mut self, vm_id: &str) -> Result<u64, BackendError>;
}

/// Why an arbiter gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("tas-server")]
    Tas(#[source] tas_server::client::ClientError),
    #[error("etcd")]
    Etcd(#[source] etcd::EtcdError),
}

impl BackendError {
    /// Whether the arbiter was not reached or not able to decide (the same
    /// request may simply be sent again), as opposed to a failure that
    /// retrying cannot fix.
    pub fn is_unreachable(&self) -> bool {
        match self {
            BackendError::Tas(e) => e.is_retryable(),
            BackendError::Etcd(e) => e.is_unreachable(),
        }
    }
}

/// Who we are to the arbiter, and which pair we claim for.
#[derive(Debug, Clone)]
pub struct Arbiter {
    pub addr: ArbiterAddr,
    pub vm_id: String,
    pub epoch: u64,
    pub claimant: String,
    /// Mutual TLS to the arbiter, if configured.
    pub tls: Option<ArbiterTls>,
}

impl Arbiter {
    /// A fresh epoch for a new pair.
    pub fn new_epoch(&self) -> Result<u64, Error> {
        let mut backend = self
            .addr
            .connect(self.tls.as_ref())
            .map_err(Error::Arbiter)?;
        backend.new_epoch(&self.vm_id).map_err(Error::Arbiter)
    }

    /// Claims the pair, retrying while the arbiter is unreachable. Returns
    /// Ok if we won; `Error::LostArbitration` if the other side holds it or
    /// a newer pairing superseded ours.
    pub fn claim(&self, why: &str, metrics: &Metrics) -> Result<(), Error> {
        metrics.set_arbiter(ArbiterState::Claiming);
        tracing::warn!(
            "{why}; claiming {}/epoch {} as {:?} at the arbiter {}",
            self.vm_id,
            self.epoch,
            self.claimant,
            self.addr
        );
        metrics.event(Event::ClaimSent {
            vm_id: self.vm_id.clone(),
            epoch: self.epoch,
        });
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut backend = self
            .addr
            .connect(self.tls.as_ref())
            .map_err(Error::Arbiter)?;
        loop {
            match backend.test_and_set(&self.vm_id, self.epoch, &self.claimant) {
                Ok(outcome) => {
                    let rival = match outcome {
                        ClaimOutcome::Granted => {
                            metrics.set_arbiter(ArbiterState::Won);
                            metrics.event(Event::ClaimGranted {
                                after_ms: started.elapsed().as_millis() as u64,
                            });
                            tracing::warn!(
                                "the arbiter granted {}/epoch {} to us after {} ms",
                                self.vm_id,
                                self.epoch,
                                started.elapsed().as_millis()
                            );
                            return Ok(());
                        }
                        ClaimOutcome::HeldBy { holder } => Rival::Claimant(holder),
                        ClaimOutcome::Superseded { current_epoch } => {
                            Rival::NewerEpoch(current_epoch)
                        }
                    };
                    metrics.set_arbiter(ArbiterState::Lost);
                    metrics.event(Event::ClaimLost {
                        rival: rival.to_string(),
                    });
                    return Err(Error::LostArbitration {
                        vm_id: self.vm_id.clone(),
                        epoch: self.epoch,
                        rival,
                    });
                }
                Err(e) if e.is_unreachable() => {
                    if last_report.elapsed() >= Duration::from_secs(1) {
                        last_report = Instant::now();
                        tracing::warn!(
                            "the arbiter at {} is unreachable; not going live, retrying ({} s so far): {}",
                            self.addr,
                            started.elapsed().as_secs(),
                            tas_server::protocol::error_chain(&e)
                        );
                    }
                    if stop::requested() {
                        return Err(Error::StoppedClaiming);
                    }
                    std::thread::sleep(RETRY_EVERY);
                }
                Err(e) => return Err(Error::Arbiter(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arbiter_addresses_parse_or_say_why_not() {
        let tas: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!("127.0.0.1:7000".parse(), Ok(ArbiterAddr::Tas(tas)));
        assert_eq!("tas://127.0.0.1:7000".parse(), Ok(ArbiterAddr::Tas(tas)));
        assert!(matches!(
            "localhost:7000".parse(),
            Ok(ArbiterAddr::Tas(a)) if a.port() == 7000
        ));
        assert_eq!(
            "etcd://127.0.0.1:2379,h2:2379,[::1]:2381".parse(),
            Ok(ArbiterAddr::Etcd(vec![
                "127.0.0.1:2379".into(),
                "h2:2379".into(),
                "[::1]:2381".into()
            ]))
        );
        let etcd: ArbiterAddr = "etcd://a:1,b:2".parse().unwrap();
        assert_eq!(etcd.to_string(), "etcd://a:1,b:2");
        assert_eq!(ArbiterAddr::Tas(tas).to_string(), "127.0.0.1:7000");
        for (bad, why) in [
            ("etcd://", "no :PORT"),
            ("etcd://a:1,", "no :PORT"),
            ("etcd://a:x", "the port is not a number"),
            ("etcd://:2379", "no host"),
            ("etcd://http://a:1", "not a host name"),
            ("zk://a:1", "unknown arbiter scheme \"zk\""),
            ("7000", "no :PORT"),
            ("tas://a:0", "the port is not a number"),
        ] {
            let e = bad.parse::<ArbiterAddr>().expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
    }
}
