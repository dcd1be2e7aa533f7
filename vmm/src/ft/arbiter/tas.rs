//! The embedded `tas-server` as an arbiter backend: a thin adapter over its
//! blocking client, which already speaks the reference semantics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tas_server::client::Client;
use tas_server::tls::ClientConfig;

use super::{Backend, BackendError, ClaimOutcome};

/// How long one request to the arbiter may take (connect, send and reply,
/// each), so that a dead or partitioned server costs a claim attempt at
/// most this.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// A `tas-server` at one address. Holds no connection: the client opens a
/// fresh one per request, so nothing goes stale across a partition.
#[derive(Debug, Clone)]
pub struct TasArbiter {
    client: Client,
}

impl TasArbiter {
    /// With `tls`, every request is mutual TLS.
    pub fn new(addr: SocketAddr, tls: Option<Arc<ClientConfig>>) -> TasArbiter {
        let client = Client::new(addr, REQUEST_TIMEOUT);
        TasArbiter {
            client: match tls {
                Some(config) => client.with_tls(config),
                None => client,
            },
        }
    }
}

impl Backend for TasArbiter {
    fn test_and_set(
        &mut self,
        vm_id: &str,
        epoch: u64,
        claimant: &str,
    ) -> Result<ClaimOutcome, BackendError> {
        self.client
            .test_and_set(vm_id, epoch, claimant)
            .map_err(BackendError::Tas)
    }

    fn new_epoch(&mut self, vm_id: &str) -> Result<u64, BackendError> {
        self.client.new_epoch(vm_id).map_err(BackendError::Tas)
    }
}
