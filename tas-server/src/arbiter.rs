//! The arbiter proper: the ledger of decisions plus the file that makes them
//! durable, answering one request at a time.
//!
//! Why one type: the order "decide, write and fsync, apply, reply" must hold
//! for every decision, and keeping the ledger and its file together behind
//! one `&mut self` (and so one mutex in the server) makes it the only order
//! possible. This is synchronous std code, so it is tested without a runtime
//! and the server runs it on a blocking thread.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::ledger::{ClaimDecision, Ledger, LedgerError, Record};
pub use crate::protocol::error_chain;
use crate::protocol::{Claim, ClaimOutcome, Request, Response};
use crate::store::{Store, StoreError};

/// Why the arbiter could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The state file could not be opened or read, or is corrupt.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record contradicts the ones before it.
    #[error("{path} line {line}: inconsistent record")]
    Inconsistent {
        /// The state file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The contradiction.
        source: LedgerError,
    },
}

/// Decisions in memory and on disk, always in step.
#[derive(Debug)]
pub struct Arbiter {
    ledger: Ledger,
    store: Store,
}

impl Arbiter {
    /// Loads every decision from the state file at `path` (created if
    /// missing). A torn last line is dropped with a warning.
    pub fn open(path: &Path) -> Result<Arbiter, OpenError> {
        let loaded = Store::open(path)?;
        if let Some(bytes) = loaded.torn_bytes {
            warn!(
                path = %path.display(),
                bytes,
                "dropped a torn last line from the state file (a write cut short by a crash; it was never acknowledged)"
            );
        }
        let mut ledger = Ledger::default();
        for (line, record) in &loaded.records {
            ledger
                .apply(record)
                .map_err(|source| OpenError::Inconsistent {
                    path: path.to_owned(),
                    line: *line,
                    source,
                })?;
        }
        info!(
            path = %path.display(),
            records = loaded.records.len(),
            vms = ledger.status().vms.len(),
            "state loaded"
        );
        Ok(Arbiter {
            ledger,
            store: loaded.store,
        })
    }

    /// Answers one request; a decision is durable before this returns.
    pub fn handle(&mut self, request: &Request) -> Response {
        match request {
            Request::TestAndSet {
                vm_id,
                epoch,
                claimant,
            } => self.test_and_set(vm_id, *epoch, claimant),
            Request::NewEpoch { vm_id } => self.new_epoch(vm_id),
            Request::Status => Response::Status(self.ledger.status()),
        }
    }

    fn test_and_set(&mut self, vm_id: &str, epoch: u64, claimant: &str) -> Response {
        match self.ledger.claim(vm_id, epoch, claimant) {
            ClaimDecision::Grant(record) => match self.record(&record) {
                Ok(()) => {
                    info!(vm_id, epoch, claimant, "granted");
                    Response::Claim(Claim {
                        outcome: ClaimOutcome::Granted,
                        epoch,
                    })
                }
                Err(response) => response,
            },
            ClaimDecision::Answer(outcome) => {
                match &outcome {
                    ClaimOutcome::Granted => info!(
                        vm_id,
                        epoch, claimant, "granted again (retry by the holder)"
                    ),
                    ClaimOutcome::HeldBy { holder } => {
                        info!(vm_id, epoch, claimant, holder, "denied: held by another");
                    }
                    ClaimOutcome::Superseded { current_epoch } => {
                        info!(vm_id, epoch, claimant, current_epoch, "denied: superseded");
                    }
                }
                Response::Claim(Claim { outcome, epoch })
            }
        }
    }

    fn new_epoch(&mut self, vm_id: &str) -> Response {
        let record = match self.ledger.new_epoch(vm_id) {
            Ok(record) => record,
            Err(e) => return Response::failure(&e),
        };
        let epoch = match &record {
            Record::NewEpoch { epoch, .. } | Record::Grant { epoch, .. } => *epoch,
        };
        match self.record(&record) {
            Ok(()) => {
                info!(vm_id, epoch, "new epoch");
                Response::NewEpoch(epoch)
            }
            Err(response) => response,
        }
    }

    /// Makes `record` durable, then applies it. On failure nothing changes
    /// and the returned error reply says so.
    fn record(&mut self, record: &Record) -> Result<(), Response> {
        if let Err(e) = self.store.append(record) {
            let message = error_chain(&e);
            tracing::error!(error = %message, "decision not recorded");
            return Err(Response::error(format!("not decided: {message}")));
        }
        // The ledger proposed this record from its current state, so it
        // applies; if it somehow did not, the file and memory would differ
        // and the arbiter must stop deciding.
        self.ledger.apply(record).map_err(|e| {
            tracing::error!(error = %e, "recorded decision does not apply");
            Response::error(format!("internal inconsistency: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn claim(arbiter: &mut Arbiter, epoch: u64, who: &str) -> ClaimOutcome {
        match arbiter.handle(&Request::TestAndSet {
            vm_id: "kv1".into(),
            epoch,
            claimant: who.into(),
        }) {
            Response::Claim(claim) => {
                assert_eq!(claim.epoch, epoch);
                claim.outcome
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn held_by(holder: &str) -> ClaimOutcome {
        ClaimOutcome::HeldBy {
            holder: holder.to_owned(),
        }
    }

    #[test]
    fn decisions_survive_a_restart() {
        let dir = TempDir::new();
        let path = dir.path().join("state.jsonl");
        let mut arbiter = Arbiter::open(&path).expect("open");
        assert_eq!(
            arbiter.handle(&Request::NewEpoch {
                vm_id: "kv1".into()
            }),
            Response::NewEpoch(1)
        );
        assert_eq!(claim(&mut arbiter, 1, "a"), ClaimOutcome::Granted);
        assert_eq!(claim(&mut arbiter, 1, "b"), held_by("a"));
        // Denials and retries are not decisions: only two records exist.
        assert_eq!(claim(&mut arbiter, 1, "a"), ClaimOutcome::Granted);
        drop(arbiter);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);

        let mut arbiter = Arbiter::open(&path).expect("reopen");
        assert_eq!(claim(&mut arbiter, 1, "a"), ClaimOutcome::Granted);
        assert_eq!(claim(&mut arbiter, 1, "b"), held_by("a"));
        assert_eq!(
            arbiter.handle(&Request::NewEpoch {
                vm_id: "kv1".into()
            }),
            Response::NewEpoch(2)
        );
        // The old epoch is superseded after the restart too, for its winner.
        assert_eq!(
            claim(&mut arbiter, 1, "a"),
            ClaimOutcome::Superseded { current_epoch: 2 }
        );
    }

    #[test]
    fn contradictory_files_do_not_load() {
        let dir = TempDir::new();
        let path = dir.path().join("state.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"v":1,"kind":"grant","vm_id":"kv1","epoch":1,"claimant":"a"}"#,
                "\n",
                r#"{"v":1,"kind":"grant","vm_id":"kv1","epoch":1,"claimant":"b"}"#,
                "\n",
            ),
        )
        .expect("write");
        let err = Arbiter::open(&path).expect_err("two winners");
        let message = error_chain(&err);
        assert!(
            message.contains("line 2: inconsistent record: second winner"),
            "{message}"
        );
    }
}
