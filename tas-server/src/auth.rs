//! Who may ask what: the arbiter's authorization rule, as pure functions of
//! the peer's verified identity and its request.
//!
//! # The rule
//!
//! A peer's identity is the set of DNS names in the subjectAltName of the
//! client certificate it proved in the TLS handshake (see [`crate::tls`]):
//! `V.vm.duet` makes it a member of VM `V`'s pair, `operator.duet` an
//! operator. Other names count for nothing.
//!
//! - `test_and_set` for VM `V`: members of `V` only. An operator may not
//!   claim: a claim decides which side of a pair survives, and nobody else
//!   has a reason to make that choice.
//! - `new_epoch` for VM `V`: members of `V`, and operators. A new epoch
//!   fences off the current pair (both sides lose their next claim, as
//!   superseded), which an operator retiring or replacing a pair may need.
//! - `status`: the VMs the peer is a member of; every VM for an operator.
//!
//! The VM id must match the name exactly (bytes, not case-folded), as it
//! does in the etcd backend's permissions. Without TLS there is no identity
//! and the arbiter answers everyone ([`Peer::Anyone`]), as it always has.

use crate::protocol::{Request, Response, Status};
use crate::tls::{OPERATOR_NAME, VM_SUFFIX};

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A plaintext arbiter: no identity, everything allowed.
    Anyone,
    /// A verified certificate with these DNS names.
    Certified(Identity),
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Every DNS name of the certificate, for messages.
    pub names: Vec<String>,
    /// The VM ids whose pair the holder belongs to.
    pub vms: Vec<String>,
    /// Whether the certificate names `operator.duet`.
    pub operator: bool,
}

impl Identity {
    /// The identity of a certificate with these DNS names.
    pub fn from_names(names: Vec<String>) -> Identity {
        let vms = names
            .iter()
            .filter_map(|n| n.strip_suffix(VM_SUFFIX))
            .filter(|vm| !vm.is_empty())
            .map(str::to_owned)
            .collect();
        let operator = names.iter().any(|n| n == OPERATOR_NAME);
        Identity {
            names,
            vms,
            operator,
        }
    }

    fn member_of(&self, vm_id: &str) -> bool {
        self.vms.iter().any(|v| v == vm_id)
    }

    /// The names, for "your certificate names ...".
    pub fn describe(&self) -> String {
        if self.names.is_empty() {
            "no DNS name".to_owned()
        } else {
            self.names.join(", ")
        }
    }
}

/// Why a request was refused; the message is the error reply's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not authorized {what}: your certificate names {names}")]
pub struct Refusal {
    what: String,
    names: String,
}

impl Peer {
    /// Whether the peer may send `request` (a `status` is always allowed;
    /// its reply is narrowed by [`Peer::narrow`]).
    pub fn authorize(&self, request: &Request) -> Result<(), Refusal> {
        let Peer::Certified(id) = self else {
            return Ok(());
        };
        let (allowed, what) = match request {
            Request::TestAndSet { vm_id, .. } => (id.member_of(vm_id), format!("for VM {vm_id}")),
            Request::NewEpoch { vm_id } => (
                id.member_of(vm_id) || id.operator,
                format!("for VM {vm_id}"),
            ),
            Request::Status => (true, String::new()),
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal {
                what,
                names: id.describe(),
            })
        }
    }

    /// `response` as this peer may see it: a status keeps only the VMs
    /// the peer is a member of, unless it is an operator.
    pub fn narrow(&self, response: Response) -> Response {
        match (self, response) {
            (Peer::Certified(id), Response::Status(status)) if !id.operator => {
                Response::Status(Status {
                    vms: status
                        .vms
                        .into_iter()
                        .filter(|vm| id.member_of(&vm.vm_id))
                        .collect(),
                })
            }
            (_, response) => response,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::VmStatus;

    fn peer(names: &[&str]) -> Peer {
        Peer::Certified(Identity::from_names(
            names.iter().map(|n| (*n).to_owned()).collect(),
        ))
    }

    fn claim(vm: &str) -> Request {
        Request::TestAndSet {
            vm_id: vm.into(),
            epoch: 1,
            claimant: "x".into(),
        }
    }

    #[test]
    fn a_pair_claims_only_its_own_vm() {
        let kv2 = peer(&["kv2.vm.duet"]);
        assert_eq!(kv2.authorize(&claim("kv2")), Ok(()));
        let refused = kv2.authorize(&claim("kv1")).expect_err("not its VM");
        assert_eq!(
            refused.to_string(),
            "not authorized for VM kv1: your certificate names kv2.vm.duet"
        );
        // A suffix match is not membership.
        assert!(peer(&["xkv1.vm.duet"]).authorize(&claim("kv1")).is_err());
        assert!(peer(&[".vm.duet"]).authorize(&claim("")).is_err());
        assert!(peer(&[]).authorize(&claim("kv1")).is_err());
        assert_eq!(Peer::Anyone.authorize(&claim("kv1")), Ok(()));
    }

    #[test]
    fn an_operator_may_fence_and_look_but_not_claim() {
        let op = peer(&["operator.duet"]);
        assert!(op.authorize(&claim("kv1")).is_err());
        assert_eq!(
            op.authorize(&Request::NewEpoch {
                vm_id: "kv1".into()
            }),
            Ok(())
        );
        assert_eq!(op.authorize(&Request::Status), Ok(()));
    }

    #[test]
    fn status_shows_members_their_vms_and_operators_all() {
        let vm = |id: &str| VmStatus {
            vm_id: id.into(),
            epoch: 1,
            holders: Default::default(),
        };
        let all = Response::Status(Status {
            vms: vec![vm("kv1"), vm("kv2")],
        });
        let ids = |r: Response| match r {
            Response::Status(s) => s.vms.into_iter().map(|v| v.vm_id).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ids(peer(&["kv1.vm.duet"]).narrow(all.clone())), ["kv1"]);
        assert_eq!(
            ids(peer(&["x.duet"]).narrow(all.clone())),
            Vec::<String>::new()
        );
        assert_eq!(
            ids(peer(&["operator.duet"]).narrow(all.clone())),
            ["kv1", "kv2"]
        );
        assert_eq!(ids(Peer::Anyone.narrow(all)), ["kv1", "kv2"]);
    }
}
