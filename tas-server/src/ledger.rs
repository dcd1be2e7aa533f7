//! The arbiter's decisions, in memory, with no I/O.
//!
//! Why separate from the file and the network: the rule "exactly one winner
//! per (vm_id, epoch)" lives here alone, so it can be unit-tested directly,
//! and the same [`Ledger::apply`] both replays the state file at startup and
//! records live decisions, so a restarted arbiter decides exactly as before.
//!
//! Deciding is split in two so that durability comes first: [`Ledger::claim`]
//! and [`Ledger::new_epoch`] only *propose* a [`Record`]; the caller makes it
//! durable and only then calls [`Ledger::apply`] and replies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::{ClaimOutcome, Status, VmStatus};

/// One decision, exactly as it is stored in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// `claimant` won `(vm_id, epoch)`.
    Grant {
        /// The VM.
        vm_id: String,
        /// The epoch won.
        epoch: u64,
        /// The winner.
        claimant: String,
    },
    /// `epoch` became `vm_id`'s current epoch.
    NewEpoch {
        /// The VM.
        vm_id: String,
        /// Its new current epoch.
        epoch: u64,
    },
}

/// A record that contradicts earlier ones: found only in a damaged or
/// hand-edited state file, since live decisions come from [`Ledger`] itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// A second, different winner for the same `(vm_id, epoch)`.
    #[error("second winner {claimant:?} for {vm_id:?} epoch {epoch} (already held by {holder:?})")]
    ConflictingGrant {
        /// The VM.
        vm_id: String,
        /// The epoch.
        epoch: u64,
        /// The recorded winner.
        holder: String,
        /// The contradicting one.
        claimant: String,
    },
    /// A grant for an epoch already superseded when it was recorded.
    #[error("grant for {vm_id:?} epoch {epoch} below current epoch {current}")]
    SupersededGrant {
        /// The VM.
        vm_id: String,
        /// The epoch granted.
        epoch: u64,
        /// The current epoch at that point.
        current: u64,
    },
    /// A new epoch that does not advance the current one.
    #[error("new epoch {epoch} for {vm_id:?} does not exceed current epoch {current}")]
    EpochNotIncreasing {
        /// The VM.
        vm_id: String,
        /// The recorded new epoch.
        epoch: u64,
        /// The current epoch at that point.
        current: u64,
    },
    /// `new_epoch` when the current epoch is already `u64::MAX`.
    #[error("epochs of {0:?} are exhausted")]
    EpochsExhausted(String),
}

/// What a claim leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimDecision {
    /// A new winner: persist this record, apply it, then reply
    /// [`ClaimOutcome::Granted`].
    Grant(Record),
    /// Nothing to record; reply with this outcome (granted again to the
    /// holder, held by another claimant, or superseded).
    Answer(ClaimOutcome),
}

#[derive(Debug, Clone, Default)]
struct Vm {
    current: u64,
    holders: BTreeMap<u64, String>,
}

/// Every decision so far, per VM.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    vms: BTreeMap<String, Vm>,
}

impl Ledger {
    /// Decides a claim of `(vm_id, epoch)` by `claimant` without changing
    /// anything (see the protocol module for the rules).
    pub fn claim(&self, vm_id: &str, epoch: u64, claimant: &str) -> ClaimDecision {
        let vm = self.vms.get(vm_id);
        let current = vm.map_or(0, |vm| vm.current);
        if epoch < current {
            return ClaimDecision::Answer(ClaimOutcome::Superseded {
                current_epoch: current,
            });
        }
        match vm.and_then(|vm| vm.holders.get(&epoch)) {
            Some(holder) if holder == claimant => ClaimDecision::Answer(ClaimOutcome::Granted),
            Some(holder) => ClaimDecision::Answer(ClaimOutcome::HeldBy {
                holder: holder.clone(),
            }),
            None => ClaimDecision::Grant(Record::Grant {
                vm_id: vm_id.to_owned(),
                epoch,
                claimant: claimant.to_owned(),
            }),
        }
    }

    /// Proposes the next epoch of `vm_id` (1 for a VM never seen).
    pub fn new_epoch(&self, vm_id: &str) -> Result<Record, LedgerError> {
        let current = self.vms.get(vm_id).map_or(0, |vm| vm.current);
        let epoch = current
            .checked_add(1)
            .ok_or_else(|| LedgerError::EpochsExhausted(vm_id.to_owned()))?;
        Ok(Record::NewEpoch {
            vm_id: vm_id.to_owned(),
            epoch,
        })
    }

    /// Applies a decision, refusing one that contradicts earlier decisions.
    /// A repeated identical grant is accepted and changes nothing.
    pub fn apply(&mut self, record: &Record) -> Result<(), LedgerError> {
        match record {
            Record::Grant {
                vm_id,
                epoch,
                claimant,
            } => {
                let vm = self.vms.entry(vm_id.clone()).or_default();
                if *epoch < vm.current {
                    return Err(LedgerError::SupersededGrant {
                        vm_id: vm_id.clone(),
                        epoch: *epoch,
                        current: vm.current,
                    });
                }
                if let Some(holder) = vm.holders.get(epoch) {
                    if holder != claimant {
                        return Err(LedgerError::ConflictingGrant {
                            vm_id: vm_id.clone(),
                            epoch: *epoch,
                            holder: holder.clone(),
                            claimant: claimant.clone(),
                        });
                    }
                }
                vm.holders.insert(*epoch, claimant.clone());
                vm.current = *epoch;
            }
            Record::NewEpoch { vm_id, epoch } => {
                let vm = self.vms.entry(vm_id.clone()).or_default();
                if *epoch <= vm.current {
                    return Err(LedgerError::EpochNotIncreasing {
                        vm_id: vm_id.clone(),
                        epoch: *epoch,
                        current: vm.current,
                    });
                }
                vm.current = *epoch;
            }
        }
        Ok(())
    }

    /// Everything decided so far, sorted by VM id.
    pub fn status(&self) -> Status {
        Status {
            vms: self
                .vms
                .iter()
                .map(|(vm_id, vm)| VmStatus {
                    vm_id: vm_id.clone(),
                    epoch: vm.current,
                    holders: vm.holders.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims and, if granted anew, applies; returns the outcome.
    fn claim(ledger: &mut Ledger, vm: &str, epoch: u64, who: &str) -> ClaimOutcome {
        match ledger.claim(vm, epoch, who) {
            ClaimDecision::Grant(record) => {
                ledger.apply(&record).expect("fresh grant applies");
                ClaimOutcome::Granted
            }
            ClaimDecision::Answer(outcome) => outcome,
        }
    }

    fn held_by(holder: &str) -> ClaimOutcome {
        ClaimOutcome::HeldBy {
            holder: holder.to_owned(),
        }
    }

    fn bump(ledger: &mut Ledger, vm: &str) -> u64 {
        let record = ledger.new_epoch(vm).expect("epoch available");
        ledger.apply(&record).expect("new epoch applies");
        match record {
            Record::NewEpoch { epoch, .. } => epoch,
            Record::Grant { .. } => unreachable!(),
        }
    }

    #[test]
    fn first_claim_wins_and_winner_may_retry() {
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.claim("kv1", 3, "a"),
            ClaimDecision::Grant(Record::Grant {
                vm_id: "kv1".into(),
                epoch: 3,
                claimant: "a".into()
            })
        );
        assert_eq!(claim(&mut ledger, "kv1", 3, "a"), ClaimOutcome::Granted);
        assert_eq!(claim(&mut ledger, "kv1", 3, "b"), held_by("a"));
        // The holder's retry is answered without a new record.
        assert_eq!(
            ledger.claim("kv1", 3, "a"),
            ClaimDecision::Answer(ClaimOutcome::Granted)
        );
        // Another VM and another epoch are independent.
        assert_eq!(claim(&mut ledger, "kv2", 3, "b"), ClaimOutcome::Granted);
        assert_eq!(claim(&mut ledger, "kv1", 4, "b"), ClaimOutcome::Granted);
    }

    #[test]
    fn epochs_start_at_one_and_supersede_older_claims() {
        let mut ledger = Ledger::default();
        assert_eq!(bump(&mut ledger, "kv1"), 1);
        assert_eq!(bump(&mut ledger, "kv1"), 2);
        assert_eq!(bump(&mut ledger, "kv2"), 1);
        assert_eq!(
            claim(&mut ledger, "kv1", 1, "a"),
            ClaimOutcome::Superseded { current_epoch: 2 }
        );
        assert_eq!(claim(&mut ledger, "kv1", 2, "a"), ClaimOutcome::Granted);
        // Even the winner of an older epoch is denied once it is superseded.
        assert_eq!(bump(&mut ledger, "kv1"), 3);
        assert_eq!(
            claim(&mut ledger, "kv1", 2, "a"),
            ClaimOutcome::Superseded { current_epoch: 3 }
        );
        assert_eq!(
            claim(&mut ledger, "kv1", 2, "b"),
            ClaimOutcome::Superseded { current_epoch: 3 }
        );
    }

    #[test]
    fn a_higher_epoch_claim_raises_the_current_epoch() {
        let mut ledger = Ledger::default();
        assert_eq!(claim(&mut ledger, "kv1", 7, "a"), ClaimOutcome::Granted);
        assert_eq!(
            claim(&mut ledger, "kv1", 6, "b"),
            ClaimOutcome::Superseded { current_epoch: 7 }
        );
        assert_eq!(bump(&mut ledger, "kv1"), 8);
        assert_eq!(ledger.status().vms[0].epoch, 8);
        assert_eq!(ledger.status().vms[0].holders[&7], "a");
    }

    #[test]
    fn epochs_can_run_out_without_panicking() {
        let mut ledger = Ledger::default();
        assert_eq!(
            claim(&mut ledger, "kv1", u64::MAX, "a"),
            ClaimOutcome::Granted
        );
        assert_eq!(
            ledger.new_epoch("kv1"),
            Err(LedgerError::EpochsExhausted("kv1".into()))
        );
    }

    #[test]
    fn contradicting_records_are_refused() {
        let mut ledger = Ledger::default();
        let grant = |epoch, who: &str| Record::Grant {
            vm_id: "kv1".into(),
            epoch,
            claimant: who.into(),
        };
        ledger.apply(&grant(2, "a")).expect("first grant");
        ledger.apply(&grant(2, "a")).expect("identical repeat");
        assert!(matches!(
            ledger.apply(&grant(2, "b")),
            Err(LedgerError::ConflictingGrant { .. })
        ));
        assert!(matches!(
            ledger.apply(&grant(1, "b")),
            Err(LedgerError::SupersededGrant { current: 2, .. })
        ));
        let epoch = |epoch| Record::NewEpoch {
            vm_id: "kv1".into(),
            epoch,
        };
        assert!(matches!(
            ledger.apply(&epoch(2)),
            Err(LedgerError::EpochNotIncreasing { .. })
        ));
        ledger.apply(&epoch(5)).expect("epochs may jump");
    }
}
