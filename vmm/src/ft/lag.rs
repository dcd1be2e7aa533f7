//! Execution lag: how far the backup's replay trails the primary, in time.
//!
//! The primary notes when each flush of the log went out and how far it
//! reached (its horizon): by then the primary had executed through that
//! exit. When the backup reports that it has executed through exit `e`,
//! the newest flush whose horizon `e` covers is the one it just caught up
//! with, and the time since that flush went out is the lag sample. The
//! vCPU thread adds flushes and peeks at the oldest
//! one not yet replayed (to throttle itself); only the backup's progress
//! reports remove them, so every sample is taken in one place.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Flushes remembered for lag measurement; older ones are forgotten (the
/// lag they would show is already far beyond any bound).
const HISTORY: usize = 65_536;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct LagTracker {
    /// (horizon, when flushed, the primary's idle time until then).
    flushes: Mutex<VecDeque<(u64, Instant, Duration)>>,
}

impl LagTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A flush that reached `horizon` went out at `at`, when the primary's
    /// guest had waited idle for `idle` in all.
    pub fn flushed(&self, horizon: u64, at: Instant, idle: Duration) {
        let mut f = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
        if f.back().is_some_and(|&(h, _, _)| h >= horizon) {
            return;
        }
        if f.len() == HISTORY {
            f.pop_front();
        }
        f.push_back((horizon, at, idle));
    }

    /// The backup executed through `replayed` at `now`: the lag sample, if
    /// this report covers a flush not covered before.
    pub fn replayed(&self, replayed: u64, now: Instant) -> Option<Duration> {
        let mut f = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
        let mut sample = None;
        while let Some(&(horizon, at, _)) = f.front() {
            if horizon > replayed {
                break;
            }
            sample = Some(now.saturating_duration_since(at));
            f.pop_front();
        }
        sample
    }

    /// The oldest flush the backup has not executed through yet: (horizon,
    /// when, the primary's idle time until then).
    pub fn oldest_unreplayed(&self) -> Option<(u64, Instant, Duration)> {
        self.flushes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_the_age_of_the_first_flush_a_report_covers() {
        let t = LagTracker::new();
        let t0 = Instant::now();
        t.flushed(10, t0, Duration::ZERO);
        t.flushed(20, t0 + Duration::from_millis(5), Duration::ZERO);
        t.flushed(30, t0 + Duration::from_millis(9), Duration::ZERO);
        // Covers the first two flushes: the lag is measured from the newer
        // one, the last the backup caught up with.
        let now = t0 + Duration::from_millis(12);
        assert_eq!(t.replayed(25, now), Some(Duration::from_millis(7)));
        assert_eq!(
            t.oldest_unreplayed(),
            Some((30, t0 + Duration::from_millis(9), Duration::ZERO))
        );
        // A report that covers nothing new is no sample.
        assert_eq!(t.replayed(26, now), None);
        assert_eq!(t.replayed(30, now), Some(Duration::from_millis(3)));
        assert_eq!(t.oldest_unreplayed(), None);
    }

    #[test]
    fn flushes_that_reach_no_further_are_not_new_samples() {
        let t = LagTracker::new();
        let t0 = Instant::now();
        t.flushed(10, t0, Duration::ZERO);
        t.flushed(10, t0 + Duration::from_millis(50), Duration::ZERO);
        assert_eq!(
            t.replayed(10, t0 + Duration::from_millis(60)),
            Some(Duration::from_millis(60))
        );
    }
}
