//! The status snapshot: what `outpost status` prints.
//!
//! The running gateway writes a [`RuntimeStatus`] into the store's state table every second;
//! `outpost status` opens the database read-only (no writer, safe while the gateway runs) and joins
//! it with the store's own counters. Reading through SQLite keeps the status working when the
//! gateway is wedged or stopped: the last snapshot says when it was written.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_protocols::BrokerHandle;
use outpost_protocols::coap::CoapHandle;
use outpost_storage::{Store, StoreStats};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::{Metrics, UplinkState, get, now_ms};

/// The key under which the runtime snapshot is stored.
pub const STATE_KEY: &str = "runtime-status";
/// How often the snapshot is written.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Runtime counters of a running gateway, as written to the state table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub version: String,
    pub node: String,
    pub pid: u32,
    pub started_at_ms: u64,
    pub written_at_ms: u64,
    pub listeners: Vec<String>,
    pub upstream: Option<String>,
    pub uplink_state: UplinkState,
    pub uplink_since_ms: u64,
    pub uplink_last_error: Option<String>,
    pub reconnects: u64,
    pub connection_errors: u64,
    pub ingested: u64,
    pub ingested_local_only: u64,
    pub stored: u64,
    pub ingest_refused: u64,
    pub unacknowledged_lost: u64,
    pub sync_published: u64,
    pub sync_acked: u64,
    pub sync_rejected: u64,
    /// Records the upstream refused for good (moved to the refused table), and by reason.
    #[serde(default)]
    pub sync_refused: u64,
    #[serde(default)]
    pub sync_refused_by_reason: BTreeMap<String, u64>,
    /// Transient refusals (quota exceeded, server busy) resent after a pause.
    #[serde(default)]
    pub sync_refusals_retried: u64,
    /// "5" or "3.1.1": the version of the current or last upstream connection.
    #[serde(default)]
    pub uplink_protocol: Option<String>,
    /// `protocol = "auto"` fell back to 3.1.1 because the broker refused MQTT 5.
    #[serde(default)]
    pub uplink_protocol_fallback: bool,
    /// The largest PUBLISH the current connection may send (configured, or lower if announced).
    #[serde(default)]
    pub uplink_max_packet_size: Option<u64>,
    /// The record at the head of repeated connection failures, and the last error.
    #[serde(default)]
    pub uplink_failing_seq: Option<u64>,
    #[serde(default)]
    pub uplink_failing_reason: Option<String>,
    /// Birth messages published: one per real connection.
    #[serde(default)]
    pub births_published: u64,
    /// Commands from the cloud refused (too large for the local broker, malformed).
    #[serde(default)]
    pub commands_refused: u64,
    pub commands_forwarded: u64,
    pub commands_failed: u64,
    pub ack_write_failures: u64,
    pub dead_lettered: u64,
    pub payload_unsupported: u64,
    /// Devices in the registry: online, stale, offline.
    #[serde(default)]
    pub devices_online: u64,
    #[serde(default)]
    pub devices_stale: u64,
    #[serde(default)]
    pub devices_offline: u64,
    /// New devices refused because the registry held `discovery.max_devices`, and that bound.
    #[serde(default)]
    pub devices_refused: u64,
    #[serde(default)]
    pub devices_max: u64,
    /// Devices whose registry change waits to be written (at most one entry per device).
    #[serde(default)]
    pub devices_pending_changes: u64,
    /// QoS 0 readings dropped at `storage.qos0_inflight_bytes`, their bytes, and the bytes of
    /// QoS 0 readings on their way to the store now, against that bound.
    #[serde(default)]
    pub qos0_dropped: u64,
    #[serde(default)]
    pub qos0_dropped_bytes: u64,
    #[serde(default)]
    pub qos0_inflight_bytes: u64,
    #[serde(default)]
    pub qos0_inflight_limit_bytes: u64,
    /// Dead letters dropped at `storage.dead_letter_queue_bytes`, the bytes waiting to be
    /// written now against that bound, and the writes the store refused.
    #[serde(default)]
    pub dead_letters_dropped: u64,
    #[serde(default)]
    pub dead_letter_queue_bytes: u64,
    #[serde(default)]
    pub dead_letter_queue_limit_bytes: u64,
    #[serde(default)]
    pub dead_letter_failures: u64,
    pub sync_bytes: u64,
    pub uplink_rtt_ms: Option<f64>,
    pub ack_rate_per_s: f64,
    pub broker_connections: u64,
    pub broker_connections_total: u64,
    pub broker_connections_refused: u64,
    pub broker_malformed_packets: u64,
    pub broker_oversized_packets: u64,
    pub broker_invalid_topics: u64,
    pub broker_dropped_queue_full: u64,
    pub broker_keepalive_timeouts: u64,
    /// Retained messages and persistent sessions held, and what their bounds refused.
    #[serde(default)]
    pub broker_retained_messages: u64,
    #[serde(default)]
    pub broker_retained_bytes: u64,
    #[serde(default)]
    pub broker_retained_refused: u64,
    #[serde(default)]
    pub broker_persistent_sessions: u64,
    #[serde(default)]
    pub broker_sessions_refused: u64,
    #[serde(default)]
    pub broker_sessions_expired: u64,
    /// CoAP endpoint counters; None when CoAP is off.
    #[serde(default)]
    pub coap: Option<CoapCounters>,
}

/// The CoAP endpoint's counters, as the status shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoapCounters {
    pub requests: u64,
    pub duplicates: u64,
    pub bad_requests: u64,
    pub stored: u64,
    pub refused: u64,
    pub overloaded: u64,
    pub observers: u64,
    pub notifications: u64,
    pub observers_lost: u64,
    pub retransmissions: u64,
    pub block_uploads: u64,
}

/// Identity of the running process that goes into every snapshot.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: String,
    pub started_at_ms: u64,
    pub listeners: Vec<String>,
    pub upstream: Option<String>,
}

pub fn snapshot(
    identity: &Identity,
    metrics: &Metrics,
    broker: &BrokerHandle,
    coap: Option<&CoapHandle>,
) -> RuntimeStatus {
    let b = broker.stats();
    let uplink = metrics.uplink_info();
    let refused_by_reason = metrics.refused_by_reason();
    RuntimeStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node: identity.node.clone(),
        pid: std::process::id(),
        started_at_ms: identity.started_at_ms,
        written_at_ms: now_ms(),
        listeners: identity.listeners.clone(),
        upstream: identity.upstream.clone(),
        uplink_state: metrics.uplink_state(),
        uplink_since_ms: metrics.uplink_since_ms(),
        uplink_last_error: metrics.last_error(),
        reconnects: get(&metrics.reconnects),
        connection_errors: get(&metrics.connection_errors),
        ingested: get(&metrics.ingested),
        ingested_local_only: get(&metrics.ingested_local_only),
        stored: metrics.stored.load(Ordering::Relaxed),
        ingest_refused: get(&metrics.ingest_refused),
        unacknowledged_lost: get(&metrics.unacknowledged_lost),
        sync_published: get(&metrics.sync_published),
        sync_acked: get(&metrics.sync_acked),
        sync_rejected: get(&metrics.sync_rejected),
        sync_refused: refused_by_reason.values().sum(),
        sync_refused_by_reason: refused_by_reason,
        sync_refusals_retried: get(&metrics.sync_refusals_retried),
        uplink_protocol: uplink.protocol.map(str::to_owned),
        uplink_protocol_fallback: uplink.fallback,
        uplink_max_packet_size: uplink.max_packet_size,
        uplink_failing_seq: uplink.failing.as_ref().map(|f| f.0),
        uplink_failing_reason: uplink.failing.map(|f| f.1),
        births_published: get(&metrics.births_published),
        commands_refused: get(&metrics.commands_refused),
        commands_forwarded: get(&metrics.commands_forwarded),
        commands_failed: get(&metrics.commands_failed),
        ack_write_failures: get(&metrics.ack_write_failures),
        dead_lettered: get(&metrics.dead_lettered),
        payload_unsupported: get(&metrics.payload_unsupported),
        devices_online: get(&metrics.devices[0]),
        devices_stale: get(&metrics.devices[1]),
        devices_offline: get(&metrics.devices[2]),
        devices_refused: get(&metrics.devices_refused),
        devices_max: get(&metrics.devices_max),
        devices_pending_changes: get(&metrics.devices_pending_changes),
        qos0_dropped: metrics.qos0_inflight.refused(),
        qos0_dropped_bytes: metrics.qos0_inflight.refused_bytes(),
        qos0_inflight_bytes: metrics.qos0_inflight.used(),
        qos0_inflight_limit_bytes: metrics.qos0_inflight.limit(),
        dead_letters_dropped: metrics.dead_letter_queue.refused(),
        dead_letter_queue_bytes: metrics.dead_letter_queue.used(),
        dead_letter_queue_limit_bytes: metrics.dead_letter_queue.limit(),
        dead_letter_failures: get(&metrics.dead_letter_failures),
        sync_bytes: get(&metrics.sync_bytes),
        uplink_rtt_ms: metrics.uplink_rtt().map(|d| d.as_secs_f64() * 1000.0),
        ack_rate_per_s: metrics.ack_rate(),
        broker_connections: b.connections_current,
        broker_connections_total: b.connections_total,
        broker_connections_refused: b.connections_refused,
        broker_malformed_packets: b.malformed_packets,
        broker_oversized_packets: b.oversized_packets,
        broker_invalid_topics: b.invalid_topics,
        broker_dropped_queue_full: b.dropped_queue_full,
        broker_keepalive_timeouts: b.keepalive_timeouts,
        broker_retained_messages: b.retained_messages,
        broker_retained_bytes: b.retained_bytes,
        broker_retained_refused: b.retained_refused,
        broker_persistent_sessions: b.persistent_sessions,
        broker_sessions_refused: b.sessions_refused,
        broker_sessions_expired: b.sessions_expired,
        coap: coap.map(|c| {
            let c = c.stats();
            CoapCounters {
                requests: c.requests,
                duplicates: c.duplicates,
                bad_requests: c.bad_requests,
                stored: c.stored,
                refused: c.refused,
                overloaded: c.overloaded,
                observers: c.observers,
                notifications: c.notifications,
                observers_lost: c.observers_lost,
                retransmissions: c.retransmissions,
                block_uploads: c.block_uploads,
            }
        }),
    }
}

/// Writes the snapshot every [`INTERVAL`] until `stop`, and once more on the way out.
pub async fn report(
    store: Store,
    identity: Identity,
    metrics: Arc<Metrics>,
    broker: BrokerHandle,
    coap: Option<CoapHandle>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (std::time::Instant::now(), get(&metrics.sync_acked));
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let acked = get(&metrics.sync_acked);
        let elapsed = last.0.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            metrics.set_ack_rate(acked.saturating_sub(last.1) as f64 / elapsed);
        }
        last = (std::time::Instant::now(), acked);
        let status = snapshot(&identity, &metrics, &broker, coap.as_ref());
        match serde_json::to_vec(&status) {
            Ok(bytes) => {
                if let Some(coap) = &coap {
                    // The observable CoAP /status resource: notifies its observers.
                    coap.set_status(bytes.clone());
                }
                if let Err(e) = store.put_state(STATE_KEY, bytes).await {
                    warn!(error = %e, "could not write the status snapshot");
                }
            }
            Err(e) => warn!(error = %e, "could not encode the status snapshot"),
        }
        if stopping {
            break;
        }
    }
}

/// What `outpost status` prints.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub database: String,
    pub buffered_records: u64,
    pub buffered_bytes: u64,
    pub buffered_by_priority: BufferedByPriority,
    pub oldest_unsynced_age_ms: Option<u64>,
    /// Payloads kept in the dead-letter table (not synced; see `outpost dead-letters`).
    pub dead_letters: u64,
    pub dead_letter_bytes: u64,
    /// Records the upstream refused for good, kept whole (see `outpost refused`).
    pub refused_records: u64,
    pub refused_bytes: u64,
    /// Records ever refused, and refused records deleted beyond the table's bounds.
    pub refused_total: u64,
    pub refused_evicted_total: u64,
    /// Seconds to drain the backlog at the last measured upstream ack rate (None: not draining).
    pub drain_eta_s: Option<f64>,
    pub store: StoreCounters,
    pub runtime: Option<RuntimeStatus>,
    /// Whether the runtime snapshot is recent enough to say the gateway is running.
    pub gateway_running: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BufferedByPriority {
    pub high: u64,
    pub normal: u64,
    pub low: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StoreCounters {
    pub last_seq: u64,
    pub appended_total: u64,
    pub acked_total: u64,
    pub evicted_total: u64,
    pub evicted_high: u64,
    pub evicted_normal: u64,
    pub evicted_low: u64,
    pub expired_total: u64,
    pub rejected_full_total: u64,
    pub commits_total: u64,
    pub dead_lettered_total: u64,
    pub dead_letters_evicted_total: u64,
    pub poisoned: bool,
    /// Since when writes fail (unix ms), the last error and how many attempts: `None` when the
    /// store is healthy. The store retries by itself.
    #[serde(default)]
    pub failing_since_ms: Option<u64>,
    #[serde(default)]
    pub failing_error: Option<String>,
    #[serde(default)]
    pub commit_failures_total: u64,
    #[serde(default)]
    pub recoveries_total: u64,
}

pub fn read_report(db: &Path) -> anyhow::Result<StatusReport> {
    use anyhow::Context;
    let stats: StoreStats = outpost_storage::read_stats(db)
        .with_context(|| format!("reading the store at {}", db.display()))?;
    let runtime = outpost_storage::read_state(db, STATE_KEY)
        .with_context(|| format!("reading the runtime status at {}", db.display()))?
        .and_then(|bytes| serde_json::from_slice::<RuntimeStatus>(&bytes).ok());
    let now = now_ms();
    let running = runtime.as_ref().is_some_and(|r| {
        r.uplink_state != UplinkState::Stopped
            && now.saturating_sub(r.written_at_ms) < 5 * INTERVAL.as_millis() as u64
    });
    Ok(build_report(db, &stats, runtime, running))
}

/// Joins the store's counters with a runtime snapshot.
pub fn build_report(
    db: &Path,
    stats: &StoreStats,
    runtime: Option<RuntimeStatus>,
    gateway_running: bool,
) -> StatusReport {
    let now = now_ms();
    StatusReport {
        database: db.display().to_string(),
        buffered_records: stats.records,
        buffered_bytes: stats.bytes,
        buffered_by_priority: BufferedByPriority {
            high: stats.records_by_priority[0],
            normal: stats.records_by_priority[1],
            low: stats.records_by_priority[2],
        },
        oldest_unsynced_age_ms: stats
            .oldest_ingested_at_ms
            .and_then(|t| crate::metrics::wall_age_ms(now, t)),
        dead_letters: stats.dead_letters,
        dead_letter_bytes: stats.dead_letter_bytes,
        refused_records: stats.refused_records,
        refused_bytes: stats.refused_bytes,
        refused_total: stats.refused_total,
        refused_evicted_total: stats.refused_evicted_total,
        drain_eta_s: match (stats.records, runtime.as_ref().map(|r| r.ack_rate_per_s)) {
            (0, _) => Some(0.0),
            (n, Some(rate)) if rate > 0.0 => Some(n as f64 / rate),
            _ => None,
        },
        store: StoreCounters {
            last_seq: stats.last_seq,
            appended_total: stats.appended_total,
            acked_total: stats.acked_total,
            evicted_total: stats.evicted_total,
            evicted_high: stats.evicted_by_priority[0],
            evicted_normal: stats.evicted_by_priority[1],
            evicted_low: stats.evicted_by_priority[2],
            expired_total: stats.expired_total,
            rejected_full_total: stats.rejected_full_total,
            commits_total: stats.commits_total,
            dead_lettered_total: stats.dead_lettered_total,
            dead_letters_evicted_total: stats.dead_letters_evicted_total,
            poisoned: stats.poisoned,
            failing_since_ms: match &stats.health {
                outpost_storage::StoreHealth::Failing { since_ms, .. } => Some(*since_ms),
                outpost_storage::StoreHealth::Healthy => None,
            },
            failing_error: match &stats.health {
                outpost_storage::StoreHealth::Failing {
                    last_error,
                    retries,
                    ..
                } => Some(format!("{last_error} ({retries} attempts)")),
                outpost_storage::StoreHealth::Healthy => None,
            },
            commit_failures_total: stats.commit_failures_total,
            recoveries_total: stats.recoveries_total,
        },
        runtime,
        gateway_running,
    }
}

/// Human-readable rendering of the report.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: String| {
        out.push_str(&format!("{k:<26} {v}\n"));
    };
    line(&mut out, "database", report.database.clone());
    line(
        &mut out,
        "gateway",
        if report.gateway_running {
            "running"
        } else {
            "not running"
        }
        .to_owned(),
    );
    line(
        &mut out,
        "buffered records",
        format!(
            "{} (high {}, normal {}, low {})",
            report.buffered_records,
            report.buffered_by_priority.high,
            report.buffered_by_priority.normal,
            report.buffered_by_priority.low
        ),
    );
    line(
        &mut out,
        "buffered bytes",
        report.buffered_bytes.to_string(),
    );
    line(
        &mut out,
        "oldest unsynced age",
        report
            .oldest_unsynced_age_ms
            .map_or("-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
    );
    let s = &report.store;
    line(
        &mut out,
        "drain eta",
        report
            .drain_eta_s
            .map_or("- (not draining)".to_owned(), |s| format!("{s:.0} s")),
    );
    line(&mut out, "last seq", s.last_seq.to_string());
    line(
        &mut out,
        "appended / acked",
        format!("{} / {}", s.appended_total, s.acked_total),
    );
    line(
        &mut out,
        "evicted",
        format!(
            "{} (high {}, normal {}, low {})",
            s.evicted_total, s.evicted_high, s.evicted_normal, s.evicted_low
        ),
    );
    line(&mut out, "expired", s.expired_total.to_string());
    line(
        &mut out,
        "dead letters",
        format!(
            "{} kept ({} bytes), {} in all, {} evicted",
            report.dead_letters,
            report.dead_letter_bytes,
            s.dead_lettered_total,
            s.dead_letters_evicted_total
        ),
    );
    line(
        &mut out,
        "rejected (full)",
        s.rejected_full_total.to_string(),
    );
    line(
        &mut out,
        "refused upstream",
        format!(
            "{} kept ({} bytes), {} in all, {} evicted",
            report.refused_records,
            report.refused_bytes,
            report.refused_total,
            report.refused_evicted_total
        ),
    );
    line(
        &mut out,
        "store writes",
        match (&s.failing_since_ms, &s.failing_error) {
            (Some(since), Some(e)) => format!(
                "FAILING since {since} (unix ms): {e}; retrying, new readings refused ({} failures, {} recoveries in this process)",
                s.commit_failures_total, s.recoveries_total
            ),
            _ => format!(
                "ok ({} failures, {} recoveries in this process)",
                s.commit_failures_total, s.recoveries_total
            ),
        },
    );
    line(&mut out, "store poisoned", s.poisoned.to_string());
    if let Some(r) = &report.runtime {
        line(&mut out, "node", r.node.clone());
        line(
            &mut out,
            "upstream",
            r.upstream.clone().unwrap_or_else(|| "(none)".into()),
        );
        line(&mut out, "uplink state", format!("{:?}", r.uplink_state));
        line(
            &mut out,
            "uplink last error",
            r.uplink_last_error.clone().unwrap_or_else(|| "-".into()),
        );
        line(
            &mut out,
            "uplink protocol",
            match (&r.uplink_protocol, r.uplink_protocol_fallback) {
                (Some(p), true) => format!("MQTT {p} (the broker refused MQTT 5)"),
                (Some(p), false) => format!("MQTT {p}"),
                (None, _) => "-".to_owned(),
            },
        );
        if let Some(seq) = r.uplink_failing_seq {
            line(
                &mut out,
                "uplink failing on",
                format!(
                    "seq {seq}: {}",
                    r.uplink_failing_reason.as_deref().unwrap_or("-")
                ),
            );
        }
        line(&mut out, "reconnects", r.reconnects.to_string());
        if r.sync_refused > 0 || r.sync_refusals_retried > 0 {
            let reasons: Vec<String> = r
                .sync_refused_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            line(
                &mut out,
                "refused by upstream",
                format!(
                    "{} ({}); {} retried",
                    r.sync_refused,
                    reasons.join(", "),
                    r.sync_refusals_retried
                ),
            );
        }
        line(
            &mut out,
            "devices",
            format!(
                "{} online, {} stale, {} offline (at most {}; {} refused)",
                r.devices_online,
                r.devices_stale,
                r.devices_offline,
                r.devices_max,
                r.devices_refused
            ),
        );
        line(
            &mut out,
            "uplink rtt",
            r.uplink_rtt_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.1} ms")),
        );
        line(
            &mut out,
            "ingested / stored",
            format!("{} / {}", r.ingested, r.stored),
        );
        line(&mut out, "ingest refused", r.ingest_refused.to_string());
        line(
            &mut out,
            "qos 0 dropped",
            format!(
                "{} ({} bytes); in flight {} of {} bytes",
                r.qos0_dropped,
                r.qos0_dropped_bytes,
                r.qos0_inflight_bytes,
                r.qos0_inflight_limit_bytes
            ),
        );
        line(
            &mut out,
            "dead letters dropped",
            format!(
                "{}; queued {} of {} bytes, {} write failures",
                r.dead_letters_dropped,
                r.dead_letter_queue_bytes,
                r.dead_letter_queue_limit_bytes,
                r.dead_letter_failures
            ),
        );
        line(
            &mut out,
            "synced (published/acked)",
            format!("{} / {}", r.sync_published, r.sync_acked),
        );
        line(
            &mut out,
            "broker connections",
            format!(
                "{} now, {} total, {} refused",
                r.broker_connections, r.broker_connections_total, r.broker_connections_refused
            ),
        );
        line(
            &mut out,
            "broker bad input",
            format!(
                "{} malformed, {} oversized, {} invalid topics",
                r.broker_malformed_packets, r.broker_oversized_packets, r.broker_invalid_topics
            ),
        );
        line(
            &mut out,
            "broker state",
            format!(
                "{} retained ({} bytes), {} persistent sessions; refused {} retained, {} sessions; {} sessions expired",
                r.broker_retained_messages,
                r.broker_retained_bytes,
                r.broker_persistent_sessions,
                r.broker_retained_refused,
                r.broker_sessions_refused,
                r.broker_sessions_expired
            ),
        );
    }
    out
}

/// One dead letter as `outpost dead-letters` shows it.
#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    pub id: u64,
    pub at_ms: u64,
    pub topic: String,
    pub source: String,
    pub reason: String,
    pub content_format: Option<u16>,
    pub payload_bytes: usize,
    /// The payload, hex-encoded (it is by definition not valid in its declared format).
    pub payload_hex: String,
}

pub fn dead_letters(db: &Path, limit: usize) -> anyhow::Result<Vec<DeadLetterView>> {
    use anyhow::Context;
    let list = outpost_storage::read_dead_letters(db, limit)
        .with_context(|| format!("reading dead letters at {}", db.display()))?;
    Ok(list
        .into_iter()
        .map(|d| DeadLetterView {
            id: d.id,
            at_ms: d.letter.at_ms,
            topic: d.letter.topic,
            source: d.letter.source,
            reason: d.letter.reason,
            content_format: d.letter.content_format,
            payload_bytes: d.letter.payload.len(),
            payload_hex: d
                .letter
                .payload
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        })
        .collect())
}

/// A refused record as `outpost refused` shows it.
#[derive(Debug, Serialize)]
pub struct RefusedView {
    pub seq: u64,
    /// The local topic (the upstream topic is rendered from it at send time).
    pub topic: String,
    pub priority: &'static str,
    pub ingested_at_ms: u64,
    pub refused_at_ms: u64,
    pub reason: String,
    pub payload_bytes: usize,
}

/// Reads the refused table from the database (read-only: works while the gateway runs).
pub fn refused(db: &Path, limit: usize) -> anyhow::Result<Vec<RefusedView>> {
    use anyhow::Context;
    let list = outpost_storage::read_refused(db, limit)
        .with_context(|| format!("reading refused records at {}", db.display()))?;
    Ok(list
        .into_iter()
        .map(|r| RefusedView {
            seq: r.record.seq,
            topic: r.record.stream,
            priority: match r.record.priority {
                outpost_storage::Priority::High => "high",
                outpost_storage::Priority::Normal => "normal",
                outpost_storage::Priority::Low => "low",
            },
            ingested_at_ms: r.record.ingested_at_ms,
            refused_at_ms: r.refused_at_ms,
            reason: r.reason,
            payload_bytes: r.record.payload.len(),
        })
        .collect())
}

/// Asks a running gateway's status endpoint for `/status` (a JSON [`StatusReport`] plus a
/// `health` object). `Ok(None)` when nothing answers there: the caller falls back to the database.
pub async fn fetch_report(addr: std::net::SocketAddr) -> anyhow::Result<Option<serde_json::Value>> {
    use anyhow::Context;
    use http_body_util::{BodyExt, Empty};
    const LIMIT: Duration = Duration::from_secs(3);
    let addr = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    if addr.port() == 0 {
        return Ok(None);
    }
    let stream = match tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        // Not running, or not listening there: not an error for `status`.
        Ok(Err(_)) | Err(_) => return Ok(None),
    };
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<
            _,
            Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        .context("HTTP handshake with the status endpoint")?;
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .uri("/status")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::new())
            .context("building the status request")?;
        let response = sender
            .send_request(request)
            .await
            .context("asking the status endpoint")?;
        anyhow::ensure!(
            response.status().is_success(),
            "status endpoint at {addr} answered {}",
            response.status()
        );
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the status response")?
            .to_bytes();
        let value: serde_json::Value =
            serde_json::from_slice(&body).context("the status endpoint sent invalid JSON")?;
        Ok(Some(value))
    };
    tokio::time::timeout(LIMIT, exchange)
        .await
        .with_context(|| format!("status endpoint at {addr} did not answer within {LIMIT:?}"))?
}

/// The registry's devices as `outpost devices` shows them (read from the database).
pub fn devices(db: &Path) -> anyhow::Result<Vec<crate::registry::Device>> {
    use anyhow::Context;
    let entries = outpost_storage::read_states_with_prefix(db, crate::registry::STATE_PREFIX)
        .with_context(|| format!("reading the device registry at {}", db.display()))?;
    Ok(entries
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}
