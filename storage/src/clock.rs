//! Time as the store sees it: the wall clock only for what it reports, and for what it decides
//! (TTL expiry) the **store clock**, running time accumulated across restarts, which only moves
//! forward. See the crate docs ("Time") for the rule and why.
//!
//! The store clock is `clock_ms` in the counters row (persisted at every commit) plus the
//! monotonic time elapsed since [`crate::Store::open`]. Clock marks map it to seqs: a mark
//! `(t, s)` says that every seq up to `s` was assigned at store time `t` or earlier, so once
//! `t + ttl <= now` every record up to `s` is expired. Seqs grow with the store clock (both only
//! move forward, also across restarts), which is why a handful of marks is enough and why
//! expiry is a range on the primary key. See [`StoreClock`] for how marks are kept.

use std::fmt::Debug;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the store reads time. Injected in tests to jump the wall clock and move the monotonic
/// one by hand.
pub(crate) trait Clock: Send + Sync + Debug {
    /// Unix time in milliseconds: may be 1970 before NTP, may jump either way.
    fn wall_ms(&self) -> u64;
    /// Time since an arbitrary origin; never goes back (`CLOCK_MONOTONIC`).
    fn monotonic(&self) -> Duration;
}

/// The real clocks.
#[derive(Debug)]
pub(crate) struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub(crate) fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A record expires at most `ttl / MARKS_PER_TTL` late, never early; at most twice this many
/// closed marks cover a TTL (see [`StoreClock`]).
pub(crate) const MARKS_PER_TTL: u32 = 64;

/// The store clock and its marks, as the writer keeps them between commits.
///
/// The **open mark** is `(counters.last_seq_clock_ms, counters.last_seq)`: the store time of the
/// last commit that assigned seqs, and the last seq. It moves with every such commit (it is in
/// the counters row, written anyway). The **closed marks** are the `clock_marks` table: when a
/// commit assigns seqs at least `ttl / MARKS_PER_TTL` after the last closed mark, the open mark
/// is closed first (inserted) and a new one opens. Each mark carries the time of the last
/// assignment it covers, so every seq it covers was assigned at that time or earlier (never
/// early), and less than one interval before it (less than one interval late). A closed mark
/// is at least as late as the commit that closed the one before, which came at least an
/// interval after the one before that: at most two closed marks per interval, so the table
/// holds at most about `2 * MARKS_PER_TTL` marks younger than the TTL, and older ones are
/// pruned ([`StoreClock::prune`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreClock {
    /// `counters.clock_ms` when the store was opened.
    base_ms: u64,
    /// [`Clock::monotonic`] when the store was opened.
    opened: Duration,
    /// The closed marks `(clock_ms, last_seq)`, ascending in both.
    marks: Vec<(u64, u64)>,
    /// The open mark.
    open: (u64, u64),
}

impl StoreClock {
    pub(crate) fn new(
        base_ms: u64,
        opened: Duration,
        marks: Vec<(u64, u64)>,
        open: (u64, u64),
    ) -> StoreClock {
        StoreClock {
            base_ms,
            opened,
            marks,
            open,
        }
    }

    /// The store clock now: never less than at open, never going back.
    pub(crate) fn now_ms(&self, clock: &dyn Clock) -> u64 {
        self.base_ms
            .saturating_add(millis(clock.monotonic().saturating_sub(self.opened)))
    }

    /// Every seq up to the returned one is expired at store time `now_ms` (0: none is).
    pub(crate) fn expired_through(&self, ttl: Option<Duration>, now_ms: u64) -> u64 {
        let Some(cutoff) = ttl.and_then(|ttl| now_ms.checked_sub(millis(ttl))) else {
            return 0;
        };
        if self.open.0 <= cutoff {
            return self.open.1;
        }
        self.marks
            .iter()
            .rev()
            .find(|&&(t, _)| t <= cutoff)
            .map_or(0, |&(_, s)| s)
    }

    /// A commit at store time `now_ms` leaves `last_seq` as the last seq. If it assigned seqs,
    /// the open mark moves to `(now_ms, last_seq)`; returns the mark to close (insert into
    /// `clock_marks`) first, if the window rolled over.
    pub(crate) fn assigned(
        &mut self,
        ttl: Option<Duration>,
        now_ms: u64,
        last_seq: u64,
    ) -> Option<(u64, u64)> {
        if last_seq <= self.open.1 {
            return None;
        }
        let mut close = None;
        if let Some(ttl) = ttl {
            let (since, closed_seq) = self.marks.last().copied().unwrap_or((0, 0));
            if self.open.1 > closed_seq
                && now_ms.saturating_sub(since) >= millis(ttl / MARKS_PER_TTL)
            {
                close = Some(self.open);
                match self.marks.last_mut() {
                    // Same store time (a TTL under MARKS_PER_TTL ms): the later mark replaces it.
                    Some(last) if last.0 == self.open.0 => *last = self.open,
                    _ => self.marks.push(self.open),
                }
            }
        }
        self.open = (now_ms.max(self.open.0), last_seq);
        close
    }

    /// The store time of the open mark, for `counters.last_seq_clock_ms`.
    pub(crate) fn open_ms(&self) -> u64 {
        self.open.0
    }

    /// The marks as read back from the file.
    pub(crate) fn reload(&mut self, marks: Vec<(u64, u64)>, open: (u64, u64)) {
        self.marks = marks;
        self.open = open;
    }

    /// Closed marks older than the newest mark at or before the cutoff are of no use any more:
    /// returns the store time below which they can be deleted (and forgets them here), if any.
    pub(crate) fn prune(&mut self, ttl: Option<Duration>, now_ms: u64) -> Option<u64> {
        let cutoff = ttl.and_then(|ttl| now_ms.checked_sub(millis(ttl)))?;
        let keep_from = if self.open.0 <= cutoff {
            // Everything up to the open mark is expired: no closed mark is needed.
            self.marks.len()
        } else {
            self.marks.iter().rposition(|&(t, _)| t <= cutoff)?
        };
        if keep_from == 0 {
            return None;
        }
        // All of them (the last may share the open mark's time): below just after it.
        let below = self
            .marks
            .get(keep_from)
            .map_or(self.open.0.saturating_add(1), |&(t, _)| t);
        self.marks.drain(..keep_from);
        Some(below)
    }

    #[cfg(test)]
    pub(crate) fn marks(&self) -> &[(u64, u64)] {
        &self.marks
    }
}

/// A clock tests move by hand: the wall clock jumps wherever it is told, the monotonic one only
/// moves forward with [`TestClock::advance`].
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TestClock {
    state: std::sync::Mutex<(u64, Duration)>,
}

#[cfg(test)]
impl TestClock {
    /// Starts at `wall_ms`, monotonic 0.
    pub(crate) fn new(wall_ms: u64) -> std::sync::Arc<TestClock> {
        std::sync::Arc::new(TestClock {
            state: std::sync::Mutex::new((wall_ms, Duration::ZERO)),
        })
    }

    /// Both clocks move forward by `d`.
    pub(crate) fn advance(&self, d: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_add(millis(d));
        s.1 += d;
    }

    /// Only the wall clock moves, by `delta_ms` either way (NTP, a wrong RTC...).
    pub(crate) fn jump_wall(&self, delta_ms: i64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_add_signed(delta_ms);
    }
}

#[cfg(test)]
impl Clock for TestClock {
    fn wall_ms(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn monotonic(&self) -> Duration {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Option<Duration> = Some(Duration::from_secs(64));

    #[test]
    fn the_store_clock_continues_from_the_persisted_value_and_ignores_the_wall_clock() {
        let clock = TestClock::new(1_000);
        clock.advance(Duration::from_secs(5));
        let sc = StoreClock::new(40_000, clock.monotonic(), vec![], (0, 0));
        assert_eq!(sc.now_ms(&*clock), 40_000);
        clock.jump_wall(-365 * 24 * 3600 * 1000);
        clock.advance(Duration::from_millis(1500));
        clock.jump_wall(2 * 365 * 24 * 3600 * 1000);
        assert_eq!(sc.now_ms(&*clock), 41_500);
    }

    #[test]
    fn a_mark_expires_its_seqs_once_the_ttl_passed_on_the_store_clock() {
        let sc = StoreClock::new(0, Duration::ZERO, vec![(0, 2), (10_000, 5)], (20_000, 9));
        assert_eq!(sc.expired_through(TTL, 63_999), 0);
        assert_eq!(sc.expired_through(TTL, 64_000), 2);
        assert_eq!(sc.expired_through(TTL, 83_999), 5);
        assert_eq!(sc.expired_through(TTL, 84_000), 9);
        assert_eq!(sc.expired_through(None, u64::MAX), 0);
    }

    #[test]
    fn the_open_mark_follows_each_assignment_and_closes_once_per_interval() {
        // The interval is 64 s / 64 = 1 s.
        let mut sc = StoreClock::new(0, Duration::ZERO, vec![], (0, 0));
        assert_eq!(sc.assigned(TTL, 0, 0), None, "nothing assigned");
        assert_eq!(sc.assigned(TTL, 100, 2), None, "nothing to close yet");
        assert_eq!(sc.assigned(TTL, 900, 4), None);
        assert_eq!(sc.open_ms(), 900);
        // 1 s after the last closed mark (none: 0): the open one closes.
        assert_eq!(sc.assigned(TTL, 1_000, 6), Some((900, 4)));
        assert_eq!(sc.assigned(TTL, 1_800, 7), None);
        assert_eq!(sc.assigned(TTL, 1_900, 8), Some((1_800, 7)));
        assert_eq!(sc.marks(), &[(900, 4), (1_800, 7)]);
        // Seqs 1-4 count as assigned at 900 (they were, at 100 to 900): never early.
        assert_eq!(sc.expired_through(TTL, 64_899), 0);
        assert_eq!(sc.expired_through(TTL, 64_900), 4);
        assert_eq!(sc.expired_through(TTL, 65_900), 8);
        // Without a TTL only the open mark moves.
        assert_eq!(sc.assigned(None, 90_000, 9), None);
        assert_eq!((sc.open_ms(), sc.marks().len()), (90_000, 2));
    }

    #[test]
    fn pruning_keeps_the_newest_mark_at_or_before_the_cutoff() {
        let mut sc = StoreClock::new(
            0,
            Duration::ZERO,
            vec![(0, 0), (1_000, 3), (2_000, 7)],
            (3_000, 9),
        );
        assert_eq!(
            sc.prune(TTL, 64_500),
            None,
            "only the first is at the cutoff"
        );
        assert_eq!(sc.prune(TTL, 66_000), Some(2_000));
        assert_eq!(sc.marks(), &[(2_000, 7)]);
        assert_eq!(sc.expired_through(TTL, 66_000), 7);
        // Once the open mark is expired, no closed one is needed.
        assert_eq!(sc.prune(TTL, 67_000), Some(3_001));
        assert!(sc.marks().is_empty());
        assert_eq!(sc.expired_through(TTL, 67_000), 9);
    }
}
