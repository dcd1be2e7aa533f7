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
//! # Why a runtime of its own
//!
//! etcd-client is async on tokio; the VMM's failover path is plain threads.
//! Each [`EtcdArbiter`] owns a small current-thread runtime and blocks on it
//! per call, so nothing runs in the background between calls and no thread
//! is added to the VMM.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetResponse, Txn, TxnOp, TxnOpResponse,
};
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
        })
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
