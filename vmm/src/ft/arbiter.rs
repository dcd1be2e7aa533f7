//! Asking the test-and-set arbiter who survives.
//!
//! When a side of the pair loses the other it claims (VM id, epoch). The
//! arbiter grants exactly one claim per pair; the winner goes live, the
//! loser halts. While the arbiter cannot be reached nobody goes live: the
//! claim is retried, and the wait shows in the logs and the status page.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tas_server::client::{ClaimOutcome, Client, ClientError};

use super::events::Event;
use super::metrics::{ArbiterState, Metrics};
use super::{Error, Rival};
use crate::stop;

/// How long one request to the arbiter may take.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between attempts while the arbiter is unreachable.
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// Who we are to the arbiter, and which pair we claim for.
#[derive(Debug, Clone)]
pub struct Arbiter {
    pub addr: SocketAddr,
    pub vm_id: String,
    pub epoch: u64,
    pub claimant: String,
}

impl Arbiter {
    fn client(&self) -> Client {
        Client::new(self.addr, REQUEST_TIMEOUT)
    }

    /// A fresh epoch for a new pair.
    pub fn new_epoch(&self) -> Result<u64, Error> {
        self.client().new_epoch(&self.vm_id).map_err(Error::Arbiter)
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
        let client = self.client();
        loop {
            match client.test_and_set(&self.vm_id, self.epoch, &self.claimant) {
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
                Err(ClientError::Unreachable { .. }) | Err(ClientError::Io(_)) => {
                    if last_report.elapsed() >= Duration::from_secs(1) {
                        last_report = Instant::now();
                        tracing::warn!(
                            "the arbiter at {} is unreachable; not going live, retrying ({} s so far)",
                            self.addr,
                            started.elapsed().as_secs()
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
