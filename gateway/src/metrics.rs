//! Counters and runtime state shared by the gateway's components.
//!
//! Everything here is a plain atomic or a small mutex-guarded value so that the hot paths (ingest,
//! sync) never wait on each other to count. A snapshot is serialised to the store's state table by
//! the status reporter so that `outpost status` can read it from another process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where the upstream connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkState {
    /// No upstream is configured: readings are kept until one is.
    NotConfigured,
    /// Trying to connect (or waiting out the backoff before the next attempt).
    Connecting,
    /// CONNACK received; records are flowing.
    Connected,
    /// Shutting down.
    Stopped,
}

impl UplinkState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Connecting,
            2 => Self::Connected,
            3 => Self::Stopped,
            _ => Self::NotConfigured,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            Self::NotConfigured => 0,
            Self::Connecting => 1,
            Self::Connected => 2,
            Self::Stopped => 3,
        }
    }
}

/// Gateway-level counters. Broker and store keep their own; the status snapshot joins them.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages handed over by the broker (any QoS).
    pub ingested: AtomicU64,
    /// Messages whose route says local-only: delivered to local subscribers, not stored.
    pub ingested_local_only: AtomicU64,
    /// Messages committed to the store.
    pub stored: AtomicU64,
    /// Messages the store refused (full, poisoned, closed): the publisher was not acknowledged.
    pub ingest_refused: AtomicU64,
    /// QoS 0 messages and wills the store refused: nobody could be told to send them again.
    pub unacknowledged_lost: AtomicU64,
    /// Payloads that did not decode as their declared format, kept as dead letters.
    pub dead_lettered: AtomicU64,
    /// Dead letters that could not be written (store refused).
    pub dead_letter_failures: AtomicU64,
    /// QoS 0 readings (publishes and QoS 0 wills: nobody waits for their ack) in memory
    /// between the broker's hand-over and their commit, in accounted bytes; a QoS 0 reading
    /// that does not fit is dropped (its refusals are `outpost_qos0_dropped_total`).
    pub qos0_inflight: Arc<ByteBudget>,
    /// Dead letters waiting for the dead-letter writer, in accounted bytes; one that does not
    /// fit is dropped (`outpost_dead_letters_dropped_total`).
    pub dead_letter_queue: Arc<ByteBudget>,
    /// Devices the registry refused because it held `discovery.max_devices` (set by the
    /// registry, like `devices`).
    pub devices_refused: AtomicU64,
    /// `discovery.max_devices`, for the status (set by the registry).
    pub devices_max: AtomicU64,
    /// Devices whose change waits to be written (coalesced: one entry per device).
    pub devices_pending_changes: AtomicU64,
    /// CoAP requests whose content format the route does not take.
    pub payload_unsupported: AtomicU64,
    /// Devices in the registry by status: online, stale, offline (set by the registry).
    pub devices: [AtomicU64; 3],
    /// Records handed to the upstream client.
    pub sync_published: AtomicU64,
    /// Records the upstream acknowledged (and that were then deleted).
    pub sync_acked: AtomicU64,
    /// Upstream PUBACKs with a failure reason code (MQTT 5), transient or not.
    pub sync_rejected: AtomicU64,
    /// Transient refusals (quota exceeded, server busy): the record was resent after a pause.
    pub sync_refusals_retried: AtomicU64,
    /// Birth messages published: one per real connection.
    pub births_published: AtomicU64,
    /// Commands from the cloud refused: too large for the local broker, or a malformed topic.
    pub commands_refused: AtomicU64,
    /// Records the upstream refused for good (moved to the refused table), by reason.
    sync_refused: Mutex<BTreeMap<String, u64>>,
    /// What the current (or last) upstream connection negotiated.
    uplink: Mutex<UplinkInfo>,
    /// Successful upstream connections after the first one.
    pub reconnects: AtomicU64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: AtomicU64,
    /// Commands received from the cloud and published on the local broker.
    pub commands_forwarded: AtomicU64,
    /// Commands that could not be published locally.
    pub commands_failed: AtomicU64,
    /// Batches of acknowledgements that could not be written to the store.
    pub ack_write_failures: AtomicU64,
    /// Topic + payload bytes handed to the upstream client.
    pub sync_bytes: AtomicU64,
    /// Smoothed upstream round-trip time (publish on the wire -> PUBACK), microseconds; 0 = none yet.
    uplink_rtt_us: AtomicU64,
    /// Upstream acks per second over the last status interval, times 1000.
    ack_rate_milli: AtomicU64,
    uplink_state: AtomicU8,
    /// Unix milliseconds when the current uplink state began.
    uplink_since_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What the sync engine reports about its connection beyond the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkInfo {
    /// "5" or "3.1.1": the version of the current or last connection.
    pub protocol: Option<&'static str>,
    /// `protocol = "auto"` fell back to 3.1.1 because the broker refused MQTT 5.
    pub fallback: bool,
    /// The largest PUBLISH the current connection may send.
    pub max_packet_size: Option<u64>,
    /// The record at the head of repeated connection failures, and why.
    pub failing: Option<(u64, String)>,
}

impl Metrics {
    /// Counters at zero, with these bounds on QoS 0 readings in flight and on queued dead
    /// letters (`Metrics::default()` has none).
    pub fn with_bounds(qos0_inflight: ByteBudget, dead_letter_queue: ByteBudget) -> Self {
        Self {
            qos0_inflight: Arc::new(qos0_inflight),
            dead_letter_queue: Arc::new(dead_letter_queue),
            ..Self::default()
        }
    }

    /// Counts one record refused for good, under its reason's label.
    pub fn count_refused(&self, reason: &str) {
        if let Ok(mut map) = self.sync_refused.lock() {
            *map.entry(reason.to_owned()).or_insert(0) += 1;
        }
    }

    /// Records refused for good, by reason.
    pub fn refused_by_reason(&self) -> BTreeMap<String, u64> {
        self.sync_refused
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn set_uplink_info(&self, info: UplinkInfo) {
        if let Ok(mut slot) = self.uplink.lock() {
            *slot = info;
        }
    }

    pub fn uplink_info(&self) -> UplinkInfo {
        self.uplink.lock().map(|i| i.clone()).unwrap_or_default()
    }

    pub fn uplink_state(&self) -> UplinkState {
        UplinkState::from_u8(self.uplink_state.load(Ordering::Relaxed))
    }

    pub fn set_uplink_state(&self, state: UplinkState) {
        let previous = self.uplink_state.swap(state.as_u8(), Ordering::Relaxed);
        if previous != state.as_u8() {
            self.uplink_since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    pub fn uplink_since_ms(&self) -> u64 {
        self.uplink_since_ms.load(Ordering::Relaxed)
    }

    pub fn set_last_error(&self, error: String) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(error);
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|slot| slot.clone())
    }

    /// Folds one PUBACK latency into the smoothed RTT (EWMA, 1/8 weight like TCP's SRTT).
    pub fn observe_rtt(&self, rtt: Duration) {
        let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .uplink_rtt_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    old - old / 8 + sample / 8
                })
            });
    }

    /// Smoothed upstream RTT, if any PUBACK was seen.
    pub fn uplink_rtt(&self) -> Option<Duration> {
        match self.uplink_rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn set_ack_rate(&self, per_second: f64) {
        let milli = (per_second.max(0.0) * 1000.0) as u64;
        self.ack_rate_milli.store(milli, Ordering::Relaxed);
    }

    /// Upstream acks per second over the last status interval.
    pub fn ack_rate(&self) -> f64 {
        self.ack_rate_milli.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Seconds until `backlog` records are drained at the current ack rate; None when not draining.
    pub fn drain_eta(&self, backlog: u64) -> Option<f64> {
        let rate = self.ack_rate();
        if backlog == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            Some(backlog as f64 / rate)
        } else {
            None
        }
    }
}

/// A bound in bytes on what waits in memory, shared by whoever admits and whoever releases.
///
/// [`ByteBudget::try_acquire`] admits `n` bytes only if the total stays within the limit, and
/// returns a [`BytePermit`] that gives them back when dropped (after the commit, on an error,
/// at shutdown: whatever path the item takes). What does not fit is refused and counted here,
/// so the caller's policy (drop) and its counter cannot drift apart.
#[derive(Debug)]
pub struct ByteBudget {
    /// The bound; `u64::MAX` means none.
    limit: u64,
    /// Bytes admitted and not yet released.
    used: AtomicU64,
    /// Items refused because they did not fit, and their bytes.
    refused: AtomicU64,
    refused_bytes: AtomicU64,
}

impl Default for ByteBudget {
    /// No bound (tests; the gateway always sets one from the configuration).
    fn default() -> Self {
        Self::new(u64::MAX)
    }
}

impl ByteBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_bytes: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` if `used + bytes <= limit`; otherwise counts a refusal and returns None.
    pub fn try_acquire(self: &Arc<Self>, bytes: u64) -> Option<BytePermit> {
        let admitted = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if admitted {
            Some(BytePermit {
                budget: Arc::clone(self),
                bytes,
            })
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.refused_bytes.fetch_add(bytes, Ordering::Relaxed);
            None
        }
    }

    /// The bound in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes admitted and not yet released.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Items refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Bytes of the items refused so far.
    pub fn refused_bytes(&self) -> u64 {
        self.refused_bytes.load(Ordering::Relaxed)
    }
}

/// Bytes held in a [`ByteBudget`]; given back on drop.
#[derive(Debug)]
pub struct BytePermit {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl Drop for BytePermit {
    fn drop(&mut self) {
        let bytes = self.bytes;
        let _ = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// Lets a log line through at most once per interval, and says how many were held back: a
/// flood of hostile input must not become a flood of log lines (one per message would fill the
/// journal of a board faster than the flood fills its memory).
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    /// When the last line went out, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    /// How often a rate-limited line may be logged by default.
    pub const EVERY: Duration = Duration::from_secs(10);

    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` when a line may be logged now, else None (and
    /// this one is counted as held back).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let held_back = std::mem::take(&mut state.1);
                state.0 = Some(now);
                Some(held_back)
            }
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(Self::EVERY)
    }
}

/// Increment a counter by one.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Read a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// 2020-01-01T00:00:00Z in Unix milliseconds: a reading stamped earlier was ingested before the
/// board's clock was set (no RTC, no NTP yet), so its wall-clock age means nothing.
pub const CLOCK_SET_FLOOR_MS: u64 = 1_577_836_800_000;

/// How old a reading stamped `ingested_at_ms` is, by the wall clock; `None` when it was stamped
/// before the clock was set ([`CLOCK_SET_FLOOR_MS`]). Display only: the store's TTL runs on its
/// own clock that only moves forward.
pub fn wall_age_ms(now_ms: u64, ingested_at_ms: u64) -> Option<u64> {
    (ingested_at_ms >= CLOCK_SET_FLOOR_MS).then(|| now_ms.saturating_sub(ingested_at_ms))
}

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970 (a board without RTC at boot).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_budget_admits_up_to_its_limit_and_counts_what_it_refuses() {
        let budget = Arc::new(ByteBudget::new(100));
        let a = budget.try_acquire(60);
        assert!(a.is_some());
        let b = budget.try_acquire(40);
        assert!(b.is_some(), "exactly the limit fits");
        assert_eq!(budget.used(), 100);
        assert!(budget.try_acquire(1).is_none(), "one byte over does not");
        assert!(budget.try_acquire(500).is_none());
        assert_eq!((budget.refused(), budget.refused_bytes()), (2, 501));
        assert_eq!(budget.used(), 100, "a refusal takes nothing");
        drop(a);
        assert_eq!(budget.used(), 40, "a dropped permit gives its bytes back");
        assert!(budget.try_acquire(60).is_some());
        assert_eq!(budget.used(), 40, "and that permit was dropped at once");
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn byte_budget_never_exceeds_its_limit_under_concurrent_use() {
        let budget = Arc::new(ByteBudget::new(1000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = Arc::clone(&budget);
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..10_000u64 {
                        if let Some(p) = budget.try_acquire(1 + i % 97) {
                            held.push(p);
                        }
                        assert!(budget.used() <= 1000);
                        // ~30 permits of ~49 bytes: more than the limit even for one thread
                        // alone, so refusals happen whatever the interleaving.
                        if held.len() > 30 {
                            held.remove(0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(budget.used(), 0, "every permit was given back");
        assert!(budget.refused() > 0);
    }

    #[test]
    fn log_limiter_lets_one_line_through_per_interval_and_counts_the_rest() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.allow_at(t0), Some(0), "the first line goes out");
        for i in 1..1000u64 {
            assert_eq!(
                limiter.allow_at(t0 + Duration::from_millis(i)),
                None,
                "held back within the interval"
            );
        }
        assert_eq!(
            limiter.allow_at(t0 + Duration::from_secs(10)),
            Some(999),
            "the next line says how many were held back"
        );
        assert_eq!(limiter.allow_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(limiter.allow_at(t0 + Duration::from_secs(25)), Some(1));
    }

    #[test]
    fn wall_age_is_unknown_for_readings_stamped_before_the_clock_was_set() {
        let now = CLOCK_SET_FLOOR_MS + 10_000;
        assert_eq!(wall_age_ms(now, 0), None, "1970: board without RTC");
        assert_eq!(wall_age_ms(now, CLOCK_SET_FLOOR_MS - 1), None);
        assert_eq!(wall_age_ms(now, CLOCK_SET_FLOOR_MS), Some(10_000));
        assert_eq!(
            wall_age_ms(now, now + 5),
            Some(0),
            "a reading from the future is age 0"
        );
    }
}
