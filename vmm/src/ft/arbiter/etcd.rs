//! Test-and-set on an etcd cluster: the production arbiter.
//!
//! Why etcd: `tas-server` is one process, so while it is down no pair can
//! fail over. etcd replicates every decision through Raft to a quorum of its
//! members (each fsyncs its log before acknowledging), so with three members
//! the arbiter survives one of them dying, and a decision once acknowledged
//! survives any member restarting.
//!
//! # Keys
//!
//! ```text
//! /duet/vms/{vm}/epoch            the VM's current epoch, decimal ("7")
//! /duet/vms/{vm}/claims/{epoch}   who holds that epoch, the claimant's name
//! ```
//!
//! `{vm}` is the VM id with every byte outside `A-Z a-z 0-9 . _ -` written
//! as `%XX`, so that no VM id can reach into another's keys (`a/claims/1`
//! is not a VM id's directory). Nothing here deletes or overwrites a claim
//! key, and none has a lease or a TTL: a decision is permanent for its
//! epoch, as the Output Rule needs (a loser that halted must never find the
//! pair free again). The keys stay until an operator removes a VM.
//!
//! # A claim, `test_and_set(vm, e, me)`
//!
//! 1. Read both keys in one transaction, so that both come from one
//!    revision: the current epoch `cur` (0 if absent) with its
//!    `mod_revision` `m` (0 if absent), and the holder of `e`, if any.
//! 2. Decide from that view, in the order of the reference protocol:
//!    `e < cur` is `Superseded { cur }` (even for the holder of `e`: a
//!    newer pairing exists); a holder of `e` gives `Granted` if it is `me`,
//!    else `HeldBy`.
//! 3. Otherwise nobody holds `e` and `e >= cur`: one transaction
//!    - if `create_revision(claim e) == 0` (the claim key has never
//!      existed) and `mod_revision(epoch) == m` (the epoch key is still as
//!      read),
//!    - then put `claim e = me` and, if `e > cur`, `epoch = e`: a claim
//!      for a newer epoch raises the current one atomically with the claim;
//!    - else read both keys again, which is step 1's view for another go at
//!      step 2 (bounded: [`MAX_RACES`]; only a stream of concurrent
//!      `new_epoch`s can keep a claim racing).
//!
//! # Why exactly one winner
//!
//! etcd applies transactions one at a time in its Raft log order, and every
//! request here is linearizable (no serializable reads, which a lagging or
//! partitioned member could answer from stale state).
//!
//! - The claim key of `(vm, e)` is written only by a transaction whose
//!   compare says it has never existed. Of any number of such transactions,
//!   the first applied creates it; every later one finds `create_revision`
//!   non-zero and fails. It is never deleted, so it is never created twice.
//! - A claimant hears `Granted` only from the transaction that wrote its
//!   name, or from a read that found its name there. So every `Granted` for
//!   `(vm, e)` names the one claimant that won, and two distinct claimants
//!   can never both hear it. (Two processes using the *same* name are one
//!   claimant, as with tas-server: give each side its own `--node`.)
//! - Not superseded: the writing transaction also requires the epoch key
//!   unchanged since the view in which `e >= cur` held, so at the revision
//!   of the grant `e` was not older than the current epoch. Without that
//!   compare a `new_epoch` applied between the read and the write would be
//!   followed by a grant of the older epoch. A re-grant from a read checks
//!   `cur` in the same revision as the holder.
//! - A lost reply: a transaction may commit and its answer be lost (a
//!   timeout, a member dying). Asking again then reads the claim key and
//!   finds our name, so the retry is `Granted` again, and the other side,
//!   reading the same key, hears `HeldBy`.
//!
//! # `new_epoch(vm)`
//!
//! A compare-and-swap loop: read `cur` and its `mod_revision` `m`, then put
//! `cur + 1` if `mod_revision(epoch) == m`, else retry with the value read
//! in the same transaction. A reply lost after the commit makes a retried
//! `new_epoch` skip one epoch number, which is harmless: epochs only have
//! to grow.
//!
//! # Unreachable, quorum lost
//!
//! Every attempt (all the requests of one claim) is bounded by
//! [`ATTEMPT_TIMEOUT`], every request by a gRPC deadline, and connecting by
//! its own timeout; HTTP/2 keep-alive pings (sent while a request runs,
//! see below) drop a connection to a member that stopped answering, so the
//! next attempt goes to another member. Requests carry etcd's "require leader" flag, so
//! a member cut off from its quorum refuses at once instead of waiting.
//! With every member down or no quorum, the claim times out or is refused
//! as unavailable, which the claim loop retries without anyone going live,
//! exactly as for an unreachable tas-server.
//!
//! # Mutual TLS and permissions
//!
//! With [`super::ArbiterTls`] the client speaks TLS to every member,
//! verifies that the member's certificate names `arbiter.duet` from the
//! deployment's CA, and presents the pair's certificate. An etcd started
//! with `--client-cert-auth` and with auth enabled takes the user name from
//! that certificate's common name (`V.vm.duet`), so the cluster's RBAC
//! decides what the pair may touch: give the user `V.vm.duet` a role with
//! readwrite on the key prefix [`vm_prefix`]`(V)` (`/duet/vms/V/`, the
//! trailing slash matters: `/duet/vms/kv1` would also cover `kv10`), and
//! nothing else. Another VM's certificate is then refused (permission
//! denied), which is not retried. A TLS failure (a member's certificate
//! from another CA, our certificate refused) is not retried either.
//!
//! # TLS on one side only
//!
//! etcd-client does not say why a connection failed when the two ends
//! disagree on TLS: a plaintext client of a TLS-only member, a TLS client
//! of a plaintext one, or a handshake the member refuses after it
//! completed on our side (TLS 1.3 sends that verdict later) all come back
//! as a dropped connection or a timeout, which looks like an outage and
//! would be retried for ever. So when a request fails that way, and no
//! member has yet been seen to speak our protocol, each member is probed
//! once ([`probe`]): a TCP connection, a TLS ClientHello, and a look at
//! the first bytes of the answer (a TLS record starts `15 03` or
//! `16 03`). A member that answers in TLS when we have no credentials, or
//! in anything else when we do, or that refuses the handshake, turns the
//! failure into [`EtcdError::SpeaksTls`], [`EtcdError::SpeaksPlaintext`]
//! or [`EtcdError::Tls`], which are not retried: this is a
//! misconfiguration, which only an operator can fix. A primary finds out
//! at start, when it asks etcd for its epoch, and exits 1 with the
//! message; a backup at its claim, and halts with it instead of waiting
//! for an arbiter that will never answer. A member that does not answer
//! the probe changes nothing (it may really be down), and once one member
//! has answered in our protocol no more probes are made, so an outage
//! costs at most one probe per failed attempt until then.
//!
//! # Why a runtime of its own
//!
//! etcd-client is async on tokio; the VMM's failover path is plain threads.
//! Each [`EtcdArbiter`] owns a small current-thread runtime and blocks on it
//! per call, so nothing runs in the background between calls and no thread
//! is added to the VMM.

use std::future::Future;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetResponse, Txn, TxnOp, TxnOpResponse,
};
use tas_server::tls::ClientConfig;
use tokio::runtime::Runtime;

use super::{Backend, BackendError, ClaimOutcome};

/// Where Duet keeps its keys.
pub const PREFIX: &str = "/duet/vms/";

/// The longest one claim attempt (or one `new_epoch`) may take, all its
/// requests together: the claim loop looks at stop requests between
/// attempts, and a failover must not wait on one stuck request.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
/// gRPC deadline of each request.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(800);
/// Connecting to one member.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// HTTP/2 keep-alive: ping this often, give up on the connection after
/// this long without an answer.
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_millis(300), Duration::from_millis(500));
/// How many lost compare-and-swap races one attempt tolerates.
pub const MAX_RACES: usize = 32;
/// The TLS probe's bound on each step with one member: connecting, and
/// each wait for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Why etcd gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot start the etcd client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("etcd at {endpoints} gave no answer within {after:?}")]
    TimedOut { endpoints: String, after: Duration },
    #[error("etcd at {endpoints} is unreachable or without quorum")]
    Unavailable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} refused the request")]
    Refused {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{key} holds {value:?}, which is not an epoch")]
    NotAnEpoch { key: String, value: String },
    #[error("the transaction on {key} lost {MAX_RACES} races in a row")]
    Contended { key: String },
    #[error("etcd answered a transaction without the reads it asked for")]
    ShortReply,
    #[error("TLS with etcd at {endpoints} failed: {reason}")]
    Tls { endpoints: String, reason: String },
    #[error(
        "etcd at {endpoint} speaks TLS and we do not: give --tls-ca, --tls-cert and --tls-key"
    )]
    SpeaksTls { endpoint: String },
    #[error(
        "etcd at {endpoint} does not speak TLS and we do (--tls-*): \
         start its members with --cert-file, --key-file, --trusted-ca-file and \
         --client-cert-auth, or drop the flags"
    )]
    SpeaksPlaintext { endpoint: String },
}

impl EtcdError {
    /// Whether asking again may succeed: etcd was not reached, had no
    /// quorum or leader, did not answer in time, or the attempt kept
    /// racing. The rest (a refusal such as a permission error, a key that
    /// does not hold what Duet writes) needs an operator.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            EtcdError::TimedOut { .. }
                | EtcdError::Unavailable { .. }
                | EtcdError::Contended { .. }
        )
    }
}

/// The TLS failure behind a client error, if any. etcd-client's error
/// gives no `source()`, so its transport variants are opened here.
pub fn tls_failure(error: &etcd_client::Error) -> Option<String> {
    use etcd_client::Error as E;
    use tas_server::tls::tls_failure as of;
    match error {
        E::GRpcStatus(s) => of(s),
        E::TransportError(t) => of(t),
        E::IoError(io) => of(io),
        _ => None,
    }
}

/// Sorts a client error into "try again" and "refused".
fn classify(endpoints: &str, source: etcd_client::Error) -> EtcdError {
    use etcd_client::Error as E;
    use tonic::Code;
    let endpoints = endpoints.to_owned();
    if let Some(reason) = tls_failure(&source) {
        return EtcdError::Tls { endpoints, reason };
    }
    let unavailable = match &source {
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) | E::Internal(_) => true,
        // etcd reports "no leader", "request timed out", "leader changed"
        // and a member shutting down as Unavailable; the transport's own
        // failures arrive as Unknown or Cancelled.
        E::GRpcStatus(s) => !matches!(
            s.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::Unimplemented
        ),
        _ => false,
    };
    if unavailable {
        EtcdError::Unavailable { endpoints, source }
    } else {
        EtcdError::Refused { endpoints, source }
    }
}

/// What a member did with our TLS ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It answered in TLS and, when we have credentials, completed the
    /// handshake and did not refuse our certificate.
    Tls,
    /// It answered with bytes that are not TLS, or closed the connection
    /// without a word (a TLS server answers a ClientHello).
    Plaintext,
    /// It speaks TLS, but the handshake failed: why, with a hint.
    TlsFailed(String),
    /// No answer: down, cut off or too slow. Says nothing about TLS.
    Silent,
}

/// Asks `endpoint` (`HOST:PORT`) whether it speaks TLS, by sending a
/// ClientHello: with `tls` (our credentials) the whole handshake is run
/// and the member's verdict on our certificate awaited; without, only the
/// first bytes of the answer are looked at. Bounded by [`PROBE_TIMEOUT`]
/// per step; blocking, so it runs outside the client's runtime.
pub fn probe(endpoint: &str, tls: Option<&Arc<ClientConfig>>) -> Probe {
    use rustls::pki_types::ServerName;
    let Some(addr) = endpoint.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return Probe::Silent;
    };
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
        return Probe::Silent;
    };
    if tcp.set_read_timeout(Some(PROBE_TIMEOUT)).is_err()
        || tcp.set_write_timeout(Some(PROBE_TIMEOUT)).is_err()
    {
        return Probe::Silent;
    }
    let config = match tls {
        Some(config) => Arc::clone(config),
        // Without credentials, a config that trusts nobody: the hello is
        // all that is sent.
        None => match certless_config() {
            Some(config) => config,
            None => return Probe::Silent,
        },
    };
    let name =
        ServerName::try_from(tas_server::tls::ARBITER_NAME).expect("arbiter.duet is a DNS name");
    let Ok(mut conn) = rustls::ClientConnection::new(config, name) else {
        return Probe::Silent;
    };
    while conn.wants_write() {
        if conn.write_tls(&mut tcp).is_err() {
            return Probe::Silent;
        }
    }
    let mut first = [0u8; 2];
    match tcp.peek(&mut first) {
        Ok(0) => return Probe::Plaintext,
        Ok(n) => {
            let record = matches!(first[0], 0x15 | 0x16) && (n < 2 || first[1] == 0x03);
            if !record {
                return Probe::Plaintext;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Probe::Plaintext,
        Err(_) => return Probe::Silent,
    }
    if tls.is_none() {
        return Probe::Tls;
    }
    let failed = |e: &std::io::Error| tas_server::tls::tls_failure(e).map(Probe::TlsFailed);
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            return failed(&e).unwrap_or(Probe::Silent);
        }
    }
    // TLS 1.3: the member checks our certificate after its Finished, and
    // says no with an alert; silence within the wait is a yes.
    let mut byte = [0u8; 1];
    match rustls::Stream::new(&mut conn, &mut tcp).read(&mut byte) {
        Err(e) => failed(&e).unwrap_or(Probe::Tls),
        // Data (the one byte asked for) or a clean close (none): the
        // member accepted the handshake either way.
        Ok(n) => {
            debug_assert!(n <= byte.len());
            Probe::Tls
        }
    }
}

/// A client config without roots or a certificate, for a ClientHello.
fn certless_config() -> Option<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Some(Arc::new(config))
}

/// Whether `error` is the kind of failure a TLS disagreement shows as: a
/// dropped or refused connection, a transport error, a timeout. etcd's own
/// answers (no leader, a permission refused) are not.
fn may_be_tls_mismatch(error: &EtcdError) -> bool {
    use etcd_client::Error as E;
    match error {
        EtcdError::TimedOut { .. } => true,
        EtcdError::Unavailable { source, .. } => match source {
            E::GRpcStatus(s) => !s.message().starts_with("etcdserver:"),
            _ => true,
        },
        _ => false,
    }
}

/// The prefix of every key of a VM, slash included: what a role for the
/// VM's pair must be granted (see the module doc).
pub fn vm_prefix(vm_id: &str) -> String {
    format!("{}/", vm_dir(vm_id))
}

/// The key of a VM's directory, its id escaped (see the module doc).
fn vm_dir(vm_id: &str) -> String {
    let mut dir = String::from(PREFIX);
    for b in vm_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            dir.push(char::from(b));
        } else {
            dir.push_str(&format!("%{b:02X}"));
        }
    }
    dir
}

/// The key holding a VM's current epoch.
pub fn epoch_key(vm_id: &str) -> String {
    format!("{}/epoch", vm_dir(vm_id))
}

/// The key holding who won `(vm_id, epoch)`.
pub fn claim_key(vm_id: &str, epoch: u64) -> String {
    format!("{}/claims/{epoch}", vm_dir(vm_id))
}

/// The state a claim decides on, read at one revision.
#[derive(Debug)]
struct View {
    /// The current epoch, 0 if the VM has none yet.
    current: u64,
    /// The epoch key's `mod_revision`, 0 if absent (what a compare on an
    /// absent key sees).
    current_rev: i64,
    /// Who holds the claimed epoch, if anyone.
    holder: Option<String>,
}

/// The current epoch and its `mod_revision` from a read of the epoch key.
fn epoch_of(key: &str, read: &GetResponse) -> Result<(u64, i64), EtcdError> {
    match read.kvs().first() {
        None => Ok((0, 0)),
        Some(kv) => {
            let value = String::from_utf8_lossy(kv.value());
            let epoch = value.parse().map_err(|_| EtcdError::NotAnEpoch {
                key: key.to_owned(),
                value: value.into_owned(),
            })?;
            Ok((epoch, kv.mod_revision()))
        }
    }
}

/// The two reads of a claim, epoch key first, in one transaction branch.
fn view_reads(epoch_key: &str, claim_key: &str) -> Vec<TxnOp> {
    vec![TxnOp::get(epoch_key, None), TxnOp::get(claim_key, None)]
}

/// The [`View`] from the answers to [`view_reads`].
fn view_of(epoch_key: &str, answers: &[TxnOpResponse]) -> Result<View, EtcdError> {
    let [TxnOpResponse::Get(epoch), TxnOpResponse::Get(claim)] = answers else {
        return Err(EtcdError::ShortReply);
    };
    let (current, current_rev) = epoch_of(epoch_key, epoch)?;
    let holder = claim
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
    Ok(View {
        current,
        current_rev,
        holder,
    })
}

/// An etcd cluster, reached through any of its members' client addresses.
pub struct EtcdArbiter {
    runtime: Runtime,
    client: Client,
    /// For messages: the endpoints as given.
    endpoints: String,
    /// Each endpoint, for the TLS probe.
    members: Vec<String>,
    /// Our TLS client config, for the probe.
    tls: Option<Arc<ClientConfig>>,
    /// A member answered the probe in our protocol: failures since are
    /// outages, not a TLS disagreement, and are not probed.
    agreed: AtomicBool,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdArbiter(etcd://{})", self.endpoints)
    }
}

impl EtcdArbiter {
    /// A client for the cluster at `endpoints` (`HOST:PORT` each). Nothing
    /// is sent yet, so this succeeds with every member down; the first
    /// request tells.
    pub fn connect(endpoints: &[String]) -> Result<EtcdArbiter, EtcdError> {
        Self::connect_with(endpoints, None)
    }

    /// Like [`EtcdArbiter::connect`], in mutual TLS with `tls`.
    pub fn connect_with(
        endpoints: &[String],
        tls: Option<&super::ArbiterTls>,
    ) -> Result<EtcdArbiter, EtcdError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        let joined = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let options = match tls {
            Some(tls) => options.with_tls(tls.etcd_options()),
            None => options,
        };
        // The balanced channel spawns its worker on the current runtime, so
        // it is built inside it.
        let client = runtime
            .block_on(Client::connect(endpoints, Some(options)))
            .map_err(|e| classify(&joined, e))?;
        Ok(EtcdArbiter {
            runtime,
            client,
            endpoints: joined,
            members: endpoints.to_vec(),
            tls: tls.map(|t| Arc::clone(&t.client)),
            agreed: AtomicBool::new(false),
        })
    }

    /// `error`, or the TLS disagreement behind it: see "TLS on one side
    /// only" in the module doc.
    fn diagnose(&self, error: EtcdError) -> EtcdError {
        if self.agreed.load(Ordering::Relaxed) || !may_be_tls_mismatch(&error) {
            return error;
        }
        for endpoint in &self.members {
            let endpoint = endpoint.clone();
            match (probe(&endpoint, self.tls.as_ref()), self.tls.is_some()) {
                (Probe::Tls, true) | (Probe::Plaintext, false) => {
                    self.agreed.store(true, Ordering::Relaxed);
                }
                (Probe::Tls, false) => return EtcdError::SpeaksTls { endpoint },
                (Probe::Plaintext, true) => return EtcdError::SpeaksPlaintext { endpoint },
                (Probe::TlsFailed(reason), _) => {
                    return EtcdError::Tls {
                        endpoints: endpoint,
                        reason,
                    }
                }
                (Probe::Silent, _) => {}
            }
        }
        error
    }

    /// Runs one attempt on the runtime, within [`ATTEMPT_TIMEOUT`].
    fn attempt<T>(&self, work: impl Future<Output = Result<T, EtcdError>>) -> Result<T, EtcdError> {
        self.runtime.block_on(async {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, work).await {
                Ok(result) => result,
                Err(_) => Err(EtcdError::TimedOut {
                    endpoints: self.endpoints.clone(),
                    after: ATTEMPT_TIMEOUT,
                }),
            }
        })
    }

    fn claim(&self, vm_id: &str, epoch: u64, claimant: &str) -> Result<ClaimOutcome, EtcdError> {
        self.claim_once(vm_id, epoch, claimant)
            .map_err(|e| self.diagnose(e))
    }

    fn claim_once(
        &self,
        vm_id: &str,
        epoch: u64,
        claimant: &str,
    ) -> Result<ClaimOutcome, EtcdError> {
        let (epoch_key, claim_key) = (epoch_key(vm_id), claim_key(vm_id, epoch));
        let mut client = self.client.clone();
        let endpoints = self.endpoints.as_str();
        self.attempt(async move {
            let read = Txn::new().and_then(view_reads(&epoch_key, &claim_key));
            let answer = client.txn(read).await.map_err(|e| classify(endpoints, e))?;
            let mut view = view_of(&epoch_key, &answer.op_responses())?;
            for _ in 0..MAX_RACES {
                if epoch < view.current {
                    return Ok(ClaimOutcome::Superseded {
                        current_epoch: view.current,
                    });
                }
                if let Some(holder) = view.holder {
                    return Ok(if holder == claimant {
                        ClaimOutcome::Granted
                    } else {
                        ClaimOutcome::HeldBy { holder }
                    });
                }
                let mut writes = vec![TxnOp::put(claim_key.as_str(), claimant, None)];
                if epoch > view.current {
                    writes.push(TxnOp::put(epoch_key.as_str(), epoch.to_string(), None));
                }
                let take = Txn::new()
                    .when([
                        Compare::create_revision(claim_key.as_str(), CompareOp::Equal, 0),
                        Compare::mod_revision(
                            epoch_key.as_str(),
                            CompareOp::Equal,
                            view.current_rev,
                        ),
                    ])
                    .and_then(writes)
                    .or_else(view_reads(&epoch_key, &claim_key));
                let answer = client.txn(take).await.map_err(|e| classify(endpoints, e))?;
                if answer.succeeded() {
                    return Ok(ClaimOutcome::Granted);
                }
                view = view_of(&epoch_key, &answer.op_responses())?;
            }
            Err(EtcdError::Contended { key: claim_key })
        })
    }

    fn next_epoch(&self, vm_id: &str) -> Result<u64, EtcdError> {
        self.next_epoch_once(vm_id).map_err(|e| self.diagnose(e))
    }

    fn next_epoch_once(&self, vm_id: &str) -> Result<u64, EtcdError> {
        let key = epoch_key(vm_id);
        let mut client = self.client.clone();
        let endpoints = self.endpoints.as_str();
        self.attempt(async move {
            let read = client
                .get(key.as_str(), None)
                .await
                .map_err(|e| classify(endpoints, e))?;
            let (mut current, mut rev) = epoch_of(&key, &read)?;
            for _ in 0..MAX_RACES {
                let next = current
                    .checked_add(1)
                    .ok_or_else(|| EtcdError::NotAnEpoch {
                        key: key.clone(),
                        value: current.to_string(),
                    })?;
                let swap = Txn::new()
                    .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key.as_str(), next.to_string(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let answer = client.txn(swap).await.map_err(|e| classify(endpoints, e))?;
                if answer.succeeded() {
                    return Ok(next);
                }
                let [TxnOpResponse::Get(read)] = &answer.op_responses()[..] else {
                    return Err(EtcdError::ShortReply);
                };
                (current, rev) = epoch_of(&key, read)?;
            }
            Err(EtcdError::Contended { key })
        })
    }

    /// What etcd has decided for `vm_id`: its current epoch (0 if none) and
    /// the holder of `epoch`, if any. For status pages and tests; a claim
    /// never relies on it.
    pub fn decision(
        &mut self,
        vm_id: &str,
        epoch: u64,
    ) -> Result<(u64, Option<String>), BackendError> {
        let (epoch_key, claim_key) = (epoch_key(vm_id), claim_key(vm_id, epoch));
        let mut client = self.client.clone();
        let endpoints = self.endpoints.as_str();
        self.attempt(async move {
            let read = Txn::new().and_then(view_reads(&epoch_key, &claim_key));
            let answer = client.txn(read).await.map_err(|e| classify(endpoints, e))?;
            let view = view_of(&epoch_key, &answer.op_responses())?;
            Ok((view.current, view.holder))
        })
        .map_err(BackendError::Etcd)
    }
}

impl Backend for EtcdArbiter {
    fn test_and_set(
        &mut self,
        vm_id: &str,
        epoch: u64,
        claimant: &str,
    ) -> Result<ClaimOutcome, BackendError> {
        self.claim(vm_id, epoch, claimant)
            .map_err(BackendError::Etcd)
    }

    fn new_epoch(&mut self, vm_id: &str) -> Result<u64, BackendError> {
        self.next_epoch(vm_id).map_err(BackendError::Etcd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_cannot_reach_into_each_others_keys() {
        assert_eq!(epoch_key("kv1"), "/duet/vms/kv1/epoch");
        assert_eq!(claim_key("kv-1.a_b", 7), "/duet/vms/kv-1.a_b/claims/7");
        assert_eq!(
            claim_key("a/claims/1", 2),
            "/duet/vms/a%2Fclaims%2F1/claims/2"
        );
        assert_eq!(epoch_key("é %"), "/duet/vms/%C3%A9%20%25/epoch");
        assert_ne!(vm_dir("a%2F"), vm_dir("a/"));
    }

    /// A listener on loopback that answers each of `answers` (one
    /// connection each) with its bytes once the client sent something,
    /// then closes.
    fn fake_member(answers: Vec<&'static [u8]>) -> String {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut hello = [0u8; 512];
                let _ = s.read(&mut hello);
                let _ = s.write_all(answer);
            }
        });
        addr
    }

    #[test]
    fn the_probe_tells_tls_from_plaintext_by_the_first_bytes() {
        // A TLS alert (protocol version) is TLS; an HTTP/1 answer, as a
        // plaintext etcd gives to a ClientHello, is not; nor is a close
        // without a word.
        let tls = fake_member(vec![b"\x15\x03\x03\x00\x02\x02\x46"]);
        assert_eq!(probe(&tls, None), Probe::Tls);
        let http = fake_member(vec![b"HTTP/1.1 400 Bad Request\r\n\r\n"]);
        assert_eq!(probe(&http, None), Probe::Plaintext);
        let closed = fake_member(vec![b""]);
        assert_eq!(probe(&closed, None), Probe::Plaintext);
        // Nobody listening says nothing about TLS.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert_eq!(probe(&gone, None), Probe::Silent);
    }

    #[test]
    fn only_transport_failures_are_probed() {
        let unavailable = |s: tonic::Status| EtcdError::Unavailable {
            endpoints: "x:1".into(),
            source: etcd_client::Error::GRpcStatus(s),
        };
        assert!(!may_be_tls_mismatch(&unavailable(
            tonic::Status::unavailable("etcdserver: no leader")
        )));
        assert!(may_be_tls_mismatch(&unavailable(tonic::Status::unknown(
            "transport error"
        ))));
        assert!(may_be_tls_mismatch(&EtcdError::TimedOut {
            endpoints: "x:1".into(),
            after: ATTEMPT_TIMEOUT
        }));
        let mismatch = EtcdError::SpeaksTls {
            endpoint: "x:1".into(),
        };
        assert!(!mismatch.is_unreachable());
        assert!(!mismatch.to_string().contains('\n'));
    }

    #[test]
    fn a_refusal_is_not_retried_and_an_outage_is() {
        let down = classify(
            "x:1",
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader")),
        );
        assert!(down.is_unreachable(), "{down:?}");
        let refused = classify(
            "x:1",
            etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("nope")),
        );
        assert!(!refused.is_unreachable(), "{refused:?}");
        assert!(EtcdError::TimedOut {
            endpoints: "x:1".into(),
            after: ATTEMPT_TIMEOUT
        }
        .is_unreachable());
    }
}
