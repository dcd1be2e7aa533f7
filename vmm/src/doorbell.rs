//! A wake-up shared by every backend of a machine, so that an idle guest
//! waits on all of them at once (the serial listener today, a TAP device
//! next) without a thread per pair or a poll loop over channels.
//!
//! A backend thread rings after it has queued something for the vCPU
//! thread. The vCPU thread reads the bell's count before it looks at the
//! backends, and waits only while the count is unchanged, so a ring that
//! lands between the look and the wait is never lost.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// See the module documentation. Clones share the bell.
#[derive(Clone, Default)]
pub struct Doorbell(Arc<(Mutex<u64>, Condvar)>);

impl Doorbell {
    pub fn new() -> Self {
        Self::default()
    }

    /// Something was queued for the vCPU thread.
    pub fn ring(&self) {
        let (count, cv) = &*self.0;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        cv.notify_all();
    }

    /// How often the bell has rung so far; pass it to [`Doorbell::wait`].
    pub fn count(&self) -> u64 {
        *self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until the bell rings past `seen` or `limit` passes. Returns
    /// true if it rang.
    pub fn wait(&self, seen: u64, limit: Duration) -> bool {
        let (count, cv) = &*self.0;
        let guard = count.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, limit, |c| *c == seen)
            .unwrap_or_else(|e| e.into_inner());
        *guard != seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_ring_before_the_wait_is_not_lost() {
        let bell = Doorbell::new();
        let seen = bell.count();
        bell.ring();
        let start = Instant::now();
        assert!(bell.wait(seen, Duration::from_secs(5)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn waits_for_a_ring_from_another_thread_or_times_out() {
        let bell = Doorbell::new();
        assert!(!bell.wait(bell.count(), Duration::from_millis(10)));
        let seen = bell.count();
        let ringer = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            ringer.ring();
        });
        assert!(bell.wait(seen, Duration::from_secs(5)));
        t.join().unwrap();
    }
}
