//! The operator's stop request: SIGINT or SIGTERM ends a run cleanly at the
//! next exit (logs and transcripts flushed), and every blocking wait in the
//! VMM waits in short slices and gives up once a stop was requested, so no
//! wait outlives the request by more than a slice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The longest a wait may block between looks at the stop flag.
pub const SLICE: Duration = Duration::from_millis(20);

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn flag() -> &'static Arc<AtomicBool> {
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Errors installing the handlers.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGINT/SIGTERM handler")]
pub struct InstallError(#[source] std::io::Error);

/// Makes SIGINT and SIGTERM request a stop instead of killing the process.
pub fn install() -> Result<(), InstallError> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag().clone()).map_err(InstallError)?;
    }
    Ok(())
}

/// The flag itself, for code outside this crate that must give up its
/// waits on a stop (the log channel).
pub fn flag_handle() -> Arc<AtomicBool> {
    flag().clone()
}

/// True once a stop was requested.
pub fn requested() -> bool {
    flag().load(Ordering::SeqCst)
}

/// Requests a stop from inside the process (tests; a fatal condition on
/// another thread).
pub fn request() {
    flag().store(true, Ordering::SeqCst);
}

/// Waits in [`SLICE`]s until `done` returns true, `limit` passes, or a stop
/// is requested. Returns whether `done` held.
pub fn wait_until(limit: Duration, mut done: impl FnMut(Duration) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if done(left.min(SLICE)) {
            return true;
        }
        if left.is_zero() || requested() {
            return false;
        }
    }
}
