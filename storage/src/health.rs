//! Whether the store can write, as the writer thread tracks it: the state machine behind
//! [`crate::StoreHealth`], the retry back-off, and the copy the handles read without asking the
//! thread. See the crate docs ("Failures and healing") for the rule.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::StoreHealth;

/// First retry this long after a failed commit...
pub const RETRY_MIN: Duration = Duration::from_millis(100);
/// ...doubling up to this.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// What the handles see: `failing` for [`crate::Store::is_poisoned`] without a lock, the details
/// for [`crate::Store::health`].
#[derive(Debug, Default)]
pub(crate) struct HealthCell {
    failing: AtomicBool,
    state: Mutex<StoreHealth>,
}

impl HealthCell {
    pub(crate) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    pub(crate) fn get(&self) -> StoreHealth {
        match self.state.lock() {
            Ok(state) => state.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, health: &StoreHealth) {
        match self.state.lock() {
            Ok(mut state) => *state = health.clone(),
            Err(poisoned) => *poisoned.into_inner() = health.clone(),
        }
        self.failing
            .store(!matches!(health, StoreHealth::Healthy), Ordering::Release);
    }
}

/// The writer's side: state, counters and back-off.
#[derive(Debug)]
pub(crate) struct Health {
    state: StoreHealth,
    pub(crate) commit_failures_total: u64,
    pub(crate) recoveries_total: u64,
    retry_min: Duration,
    retry_max: Duration,
    /// The wait before the next retry; doubles with every failure while failing.
    backoff: Duration,
    /// When the next retry is due (only while failing).
    next_retry: Option<Instant>,
    /// When the store last recovered: failing again within `retry_max` of that continues the
    /// back-off instead of starting over, so a disk that takes one small write but not the next
    /// batch is not hammered every `retry_min`.
    recovered_at: Option<Instant>,
    cell: std::sync::Arc<HealthCell>,
}

impl Health {
    pub(crate) fn new(
        retry_min: Duration,
        retry_max: Duration,
        cell: std::sync::Arc<HealthCell>,
    ) -> Health {
        let retry_min = retry_min.max(Duration::from_millis(1));
        Health {
            state: StoreHealth::Healthy,
            commit_failures_total: 0,
            recoveries_total: 0,
            retry_min,
            retry_max: retry_max.max(retry_min),
            backoff: retry_min,
            next_retry: None,
            recovered_at: None,
            cell,
        }
    }

    pub(crate) fn state(&self) -> &StoreHealth {
        &self.state
    }

    pub(crate) fn is_failing(&self) -> bool {
        !matches!(self.state, StoreHealth::Healthy)
    }

    /// When the next retry is due, while failing.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.next_retry
    }

    /// A commit (or the read before a retry) failed at `now`. Returns the wait before the next
    /// retry.
    pub(crate) fn failed(&mut self, now: Instant, wall_ms: u64, error: String) -> Duration {
        self.commit_failures_total += 1;
        match &mut self.state {
            StoreHealth::Failing {
                last_error,
                retries,
                ..
            } => {
                *last_error = error;
                *retries += 1;
                self.backoff = self.backoff.saturating_mul(2).min(self.retry_max);
            }
            StoreHealth::Healthy => {
                let relapse = self
                    .recovered_at
                    .is_some_and(|at| now.saturating_duration_since(at) < self.retry_max);
                self.backoff = if relapse {
                    self.backoff.saturating_mul(2).min(self.retry_max)
                } else {
                    self.retry_min
                };
                self.state = StoreHealth::Failing {
                    since_ms: wall_ms,
                    last_error: error,
                    retries: 0,
                };
            }
        }
        self.next_retry = Some(now + self.backoff);
        self.cell.set(&self.state);
        self.backoff
    }

    /// A commit succeeded at `now`. Returns the state it recovered from, if it was failing.
    pub(crate) fn succeeded(&mut self, now: Instant) -> Option<StoreHealth> {
        if !self.is_failing() {
            return None;
        }
        let was = std::mem::replace(&mut self.state, StoreHealth::Healthy);
        self.recoveries_total += 1;
        self.recovered_at = Some(now);
        self.next_retry = None;
        self.cell.set(&self.state);
        Some(was)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> (Health, std::sync::Arc<HealthCell>) {
        let cell = std::sync::Arc::new(HealthCell::default());
        let h = Health::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            std::sync::Arc::clone(&cell),
        );
        (h, cell)
    }

    #[test]
    fn retries_back_off_from_100_ms_doubling_to_5_s() {
        let (mut h, cell) = health();
        let t0 = Instant::now();
        let waits: Vec<u64> = (0..9)
            .map(|i| h.failed(t0, 7, format!("e{i}")).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        let failing = StoreHealth::Failing {
            since_ms: 7,
            last_error: "e8".into(),
            retries: 8,
        };
        assert_eq!(h.state(), &failing);
        assert_eq!(cell.get(), failing);
        assert!(cell.is_failing());
        assert_eq!(h.next_retry(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(h.commit_failures_total, 9);
    }

    #[test]
    fn a_success_heals_and_a_relapse_soon_after_keeps_backing_off() {
        let (mut h, cell) = health();
        let t0 = Instant::now();
        assert_eq!(h.succeeded(t0), None, "healthy stays healthy");
        h.failed(t0, 1, "full".into());
        h.failed(t0, 2, "full".into());
        let was = h.succeeded(t0);
        assert!(matches!(
            was,
            Some(StoreHealth::Failing {
                since_ms: 1,
                retries: 1,
                ..
            })
        ));
        assert!(!cell.is_failing());
        assert_eq!(cell.get(), StoreHealth::Healthy);
        assert_eq!(h.next_retry(), None);
        // Within RETRY_MAX of the recovery: the back-off goes on from 200 ms.
        assert_eq!(
            h.failed(t0 + Duration::from_secs(1), 3, "full".into())
                .as_millis(),
            400
        );
        h.succeeded(t0 + Duration::from_secs(1));
        // Long after: it starts over.
        assert_eq!(
            h.failed(t0 + Duration::from_secs(60), 4, "full".into())
                .as_millis(),
            100
        );
        assert_eq!((h.commit_failures_total, h.recoveries_total), (4, 2));
    }
}
