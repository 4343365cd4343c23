//! The local HTTP endpoint (loopback by default): `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! - `/healthz`: the process is alive and its runtime answers (200 `ok`).
//! - `/readyz`: 200 when the store accepts writes and the broker is listening, else 503 with the
//!   reasons as JSON: what a supervisor or load balancer should gate on.
//! - `/metrics`: Prometheus text exposition (0.0.4), every metric typed and with help text.
//! - `/status`: the same report as `outpost status --json`, live.
//!
//! axum serves it; the exposition format is written by `prometheus-client`. Metrics are gathered
//! per scrape from the counters the components already keep (no second set of counters to drift).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get as route_get;
use outpost_protocols::coap::{CoapHandle, CoapStats};
use outpost_protocols::{BrokerHandle, BrokerStats};
use outpost_storage::{Store, StoreStats};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{Metrics, UplinkState, get};
use crate::status::{self, Identity};

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub store: Store,
    pub db: PathBuf,
    pub metrics: Arc<Metrics>,
    pub broker: BrokerHandle,
    /// The CoAP endpoint, when it is on.
    pub coap: Option<CoapHandle>,
    pub identity: Identity,
    /// Extra metric families from components wired later (health checks, resources).
    pub extra: Arc<dyn ExtraMetrics>,
}

/// A source of additional metric families, encoded on each scrape.
pub trait ExtraMetrics: std::fmt::Debug + Send + std::marker::Sync + 'static {
    fn encode(&self, out: &mut Families<'_, '_>) -> Result<(), std::fmt::Error>;
    /// Extra sections for `/status`.
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Binds the endpoint now (a failed bind is a start-up error naming the address).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", route_get(healthz))
        .route("/readyz", route_get(readyz))
        .route("/metrics", route_get(metrics))
        .route("/status", route_get(status_json))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "status endpoint listening");
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "status endpoint stopped with an error");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    store_writable: bool,
    broker_listening: bool,
    reasons: Vec<String>,
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let mut reasons = Vec::new();
    let store_writable = match state.store.stats().await {
        Ok(stats) if stats.poisoned || state.store.is_poisoned() => {
            reasons.push(match &stats.health {
                outpost_storage::StoreHealth::Failing {
                    since_ms,
                    last_error,
                    retries,
                } => format!(
                    "store write failed ({last_error}) since {since_ms} (unix ms), {retries} attempts: refusing new readings and retrying; it resumes by itself when a write commits"
                ),
                outpost_storage::StoreHealth::Healthy => {
                    "store write failed: refusing new readings and retrying".to_owned()
                }
            });
            false
        }
        Ok(_) => true,
        Err(e) => {
            reasons.push(format!("store unavailable: {e}"));
            false
        }
    };
    let broker_listening = !state.identity.listeners.is_empty();
    if !broker_listening {
        reasons.push("broker has no listener".to_owned());
    }
    let ready = store_writable && broker_listening;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(Readiness {
            ready,
            store_writable,
            broker_listening,
            reasons,
        }),
    )
        .into_response()
}

async fn status_json(State(state): State<HttpState>) -> Response {
    match state.store.stats().await {
        Ok(stats) => {
            let runtime = status::snapshot(
                &state.identity,
                &state.metrics,
                &state.broker,
                state.coap.as_ref(),
            );
            let report = status::build_report(&state.db, &stats, Some(runtime), true);
            let mut value = serde_json::to_value(&report).unwrap_or(serde_json::Value::Null);
            if let serde_json::Value::Object(map) = &mut value {
                map.insert("health".to_owned(), state.extra.status());
            }
            axum::Json(value).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let stats = match state.store.stats().await {
        Ok(stats) => Some(stats),
        Err(e) => {
            warn!(error = %e, "metrics scrape without store stats");
            None
        }
    };
    let snapshot = Snapshot {
        stats,
        broker: state.broker.stats(),
        coap: state.coap.as_ref().map(CoapHandle::stats),
        metrics: Arc::clone(&state.metrics),
        identity: state.identity.clone(),
        extra: Arc::clone(&state.extra),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// Everything one scrape reports, gathered before encoding (encoding is synchronous).
#[derive(Debug)]
struct Snapshot {
    stats: Option<StoreStats>,
    broker: BrokerStats,
    coap: Option<CoapStats>,
    metrics: Arc<Metrics>,
    identity: Identity,
    extra: Arc<dyn ExtraMetrics>,
}

type Labels = Vec<(Cow<'static, str>, Cow<'static, str>)>;

/// Writes metric families; a thin layer over prometheus-client's descriptor encoder.
pub struct Families<'a, 'b> {
    encoder: &'a mut DescriptorEncoder<'b>,
}

impl std::fmt::Debug for Families<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Families")
    }
}

impl Families<'_, '_> {
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
        let m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value).encode(m)
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
        let m = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(value).encode(m)
    }

    /// One family with several label sets.
    pub fn labelled(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        series: Vec<(Labels, f64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self.encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in &series {
            let fm = m.encode_family(labels)?;
            match kind {
                MetricType::Counter => ConstCounter::new(*value).encode(fm)?,
                _ => ConstGauge::new(*value).encode(fm)?,
            }
        }
        Ok(())
    }
}

/// A label pair.
pub fn label(k: &'static str, v: impl Into<String>) -> (Cow<'static, str>, Cow<'static, str>) {
    (Cow::Borrowed(k), Cow::Owned(v.into()))
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = Families {
            encoder: &mut encoder,
        };
        let m = &self.metrics;
        let b = &self.broker;
        f.labelled(
            "outpost_info",
            "Build and identity of this gateway (value is always 1).",
            MetricType::Gauge,
            vec![(
                vec![
                    label("version", env!("CARGO_PKG_VERSION")),
                    label("node", self.identity.node.clone()),
                ],
                1.0,
            )],
        )?;
        f.gauge(
            "outpost_start_time_seconds",
            "Unix time when the gateway started.",
            self.identity.started_at_ms as f64 / 1000.0,
        )?;
        // Ingest.
        f.counter(
            "outpost_ingested",
            "Messages handed over by the local broker (any QoS).",
            get(&m.ingested),
        )?;
        f.counter(
            "outpost_ingested_local_only",
            "Messages routed local-only (delivered locally, not stored).",
            get(&m.ingested_local_only),
        )?;
        f.counter(
            "outpost_stored",
            "Readings committed to the store.",
            get(&m.stored),
        )?;
        f.counter(
            "outpost_ingest_refused",
            "Readings the store refused (publisher not acknowledged).",
            get(&m.ingest_refused),
        )?;
        f.counter(
            "outpost_unacknowledged_lost",
            "QoS 0 readings and wills the store refused (nobody could resend them).",
            get(&m.unacknowledged_lost),
        )?;
        // Bounds on what the network feeds (docs/ARCHITECTURE.md, "Bounds on what the network
        // feeds"): each buffer's fill, its bound, and what its policy dropped.
        let q = &m.qos0_inflight;
        f.counter(
            "outpost_qos0_dropped",
            "QoS 0 readings dropped because storage.qos0_inflight_bytes were already on their way to the store.",
            q.refused(),
        )?;
        f.counter(
            "outpost_qos0_dropped_bytes",
            "Accounted bytes (topic, payload, 64 per reading) of the QoS 0 readings dropped.",
            q.refused_bytes(),
        )?;
        f.gauge(
            "outpost_qos0_inflight_bytes",
            "Accounted bytes of QoS 0 readings between the broker and their commit.",
            q.used() as f64,
        )?;
        f.gauge(
            "outpost_qos0_inflight_limit_bytes",
            "storage.qos0_inflight_bytes: beyond it QoS 0 readings are dropped.",
            q.limit() as f64,
        )?;
        let dl = &m.dead_letter_queue;
        f.counter(
            "outpost_dead_lettered",
            "Payloads that did not decode as their declared format (queued as dead letters, or dropped).",
            get(&m.dead_lettered),
        )?;
        f.counter(
            "outpost_dead_letters_dropped",
            "Dead letters dropped because storage.dead_letter_queue_bytes were waiting to be written.",
            dl.refused(),
        )?;
        f.counter(
            "outpost_dead_letter_failures",
            "Dead letters the store could not write.",
            get(&m.dead_letter_failures),
        )?;
        f.gauge(
            "outpost_dead_letter_queue_bytes",
            "Accounted bytes of dead letters waiting to be written.",
            dl.used() as f64,
        )?;
        f.gauge(
            "outpost_dead_letter_queue_limit_bytes",
            "storage.dead_letter_queue_bytes: beyond it dead letters are dropped.",
            dl.limit() as f64,
        )?;
        // The device registry.
        f.labelled(
            "outpost_devices",
            "Devices in the registry, by status.",
            MetricType::Gauge,
            ["online", "stale", "offline"]
                .iter()
                .zip(&m.devices)
                .map(|(status, n)| (vec![label("status", *status)], get(n) as f64))
                .collect(),
        )?;
        f.gauge(
            "outpost_devices_max",
            "discovery.max_devices: new devices beyond it are refused.",
            get(&m.devices_max) as f64,
        )?;
        f.counter(
            "outpost_devices_refused",
            "New devices refused because the registry held discovery.max_devices (one per attempt).",
            get(&m.devices_refused),
        )?;
        f.gauge(
            "outpost_device_changes_pending",
            "Devices whose registry change waits to be written (coalesced: at most one per device).",
            get(&m.devices_pending_changes) as f64,
        )?;
        // Sync.
        f.counter(
            "outpost_synced",
            "Records the upstream acknowledged (then deleted from the store).",
            get(&m.sync_acked),
        )?;
        f.counter(
            "outpost_sync_published",
            "Records handed to the upstream client (includes resends).",
            get(&m.sync_published),
        )?;
        f.counter(
            "outpost_sync_rejected",
            "Upstream PUBACKs with an MQTT 5 failure reason code, transient or not.",
            get(&m.sync_rejected),
        )?;
        // Always the known reasons, so a dashboard sees 0 before the first refusal.
        let mut refused = m.refused_by_reason();
        for reason in [
            "packet_too_large",
            "not_authorized",
            "topic_name_invalid",
            "payload_format_invalid",
            "unspecified_error",
            "implementation_specific_error",
            "unencodable",
            "connection_closed_on_publish",
        ] {
            refused.entry(reason.to_owned()).or_insert(0);
        }
        f.labelled(
            "outpost_sync_refused",
            "Records the upstream refused for good, moved to the refused table, by reason.",
            MetricType::Counter,
            refused
                .into_iter()
                .map(|(reason, n)| (vec![label("reason", reason)], n as f64))
                .collect(),
        )?;
        f.counter(
            "outpost_sync_refusals_retried",
            "Records the upstream refused for now (quota exceeded, server busy), resent after a pause.",
            get(&m.sync_refusals_retried),
        )?;
        f.counter(
            "outpost_uplink_births",
            "Birth messages published upstream (one per real connection).",
            get(&m.births_published),
        )?;
        f.counter(
            "outpost_commands_refused",
            "Commands from the cloud refused (larger than broker.max_packet_size, malformed topic).",
            get(&m.commands_refused),
        )?;
        let uplink = m.uplink_info();
        f.gauge(
            "outpost_uplink_protocol_fallback",
            "1 when protocol = \"auto\" fell back to MQTT 3.1.1 because the broker refused MQTT 5.",
            f64::from(u8::from(uplink.fallback)),
        )?;
        if let Some(max) = uplink.max_packet_size {
            f.gauge(
                "outpost_uplink_max_packet_size_bytes",
                "The largest PUBLISH the current upstream connection may send.",
                max as f64,
            )?;
        }
        f.counter(
            "outpost_sync_bytes",
            "Topic and payload bytes sent upstream.",
            get(&m.sync_bytes),
        )?;
        f.counter(
            "outpost_uplink_reconnects",
            "Upstream connections established after the first.",
            get(&m.reconnects),
        )?;
        f.counter(
            "outpost_uplink_connection_errors",
            "Failed upstream connection attempts and dropped connections.",
            get(&m.connection_errors),
        )?;
        f.counter(
            "outpost_commands_forwarded",
            "Commands from the cloud published on the local broker.",
            get(&m.commands_forwarded),
        )?;
        f.counter(
            "outpost_commands_failed",
            "Commands from the cloud that could not be published locally.",
            get(&m.commands_failed),
        )?;
        f.counter(
            "outpost_ack_write_failures",
            "Batches of upstream acks that could not be written (records will be resent).",
            get(&m.ack_write_failures),
        )?;
        let state = m.uplink_state();
        f.gauge(
            "outpost_uplink_connected",
            "1 when the upstream connection is up.",
            f64::from(u8::from(state == UplinkState::Connected)),
        )?;
        f.labelled(
            "outpost_uplink_state",
            "Upstream connection state (1 for the current state).",
            MetricType::Gauge,
            [
                UplinkState::NotConfigured,
                UplinkState::Connecting,
                UplinkState::Connected,
                UplinkState::Stopped,
            ]
            .into_iter()
            .map(|s| {
                let name = serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                (vec![label("state", name)], f64::from(u8::from(s == state)))
            })
            .collect(),
        )?;
        f.gauge(
            "outpost_uplink_state_seconds",
            "Seconds the upstream connection has been in its current state.",
            crate::metrics::now_ms().saturating_sub(m.uplink_since_ms()) as f64 / 1000.0,
        )?;
        if let Some(rtt) = m.uplink_rtt() {
            f.gauge(
                "outpost_uplink_rtt_seconds",
                "Smoothed upstream round-trip time (publish to PUBACK).",
                rtt.as_secs_f64(),
            )?;
        }
        f.gauge(
            "outpost_sync_ack_rate",
            "Upstream acknowledgements per second over the last second.",
            m.ack_rate(),
        )?;
        // Store.
        if let Some(s) = &self.stats {
            let now = crate::metrics::now_ms();
            f.labelled(
                "outpost_backlog_records",
                "Records in the store not yet acknowledged upstream, by priority.",
                MetricType::Gauge,
                ["high", "normal", "low"]
                    .iter()
                    .zip(s.records_by_priority)
                    .map(|(p, n)| (vec![label("priority", *p)], n as f64))
                    .collect(),
            )?;
            f.gauge(
                "outpost_backlog_bytes",
                "Accounted bytes of the records in the store.",
                s.bytes as f64,
            )?;
            // Absent when the oldest record was stamped before the clock was set (its wall
            // clock age would read ~55 years).
            let lag = match s.oldest_ingested_at_ms {
                None => Some(0.0),
                Some(t) => crate::metrics::wall_age_ms(now, t).map(|ms| ms as f64 / 1000.0),
            };
            if let Some(lag) = lag {
                f.gauge(
                    "outpost_sync_lag_seconds",
                    "Age of the oldest record not yet acknowledged upstream (0 when empty; absent when it was stamped before the clock was set).",
                    lag,
                )?;
            }
            if let Some(eta) = m.drain_eta(s.records) {
                f.gauge(
                    "outpost_drain_eta_seconds",
                    "Seconds to drain the backlog at the current ack rate.",
                    eta,
                )?;
            }
            f.counter(
                "outpost_store_appended",
                "Records appended to the store.",
                s.appended_total,
            )?;
            f.counter(
                "outpost_store_acked",
                "Records deleted after the upstream acknowledged them.",
                s.acked_total,
            )?;
            f.labelled(
                "outpost_evicted",
                "Records evicted to stay within the quota (lowest priority, oldest first), by priority.",
                MetricType::Counter,
                ["high", "normal", "low"]
                    .iter()
                    .zip(s.evicted_by_priority)
                    .map(|(p, n)| (vec![label("priority", *p)], n as f64))
                    .collect(),
            )?;
            f.counter(
                "outpost_expired",
                "Records deleted because their TTL passed.",
                s.expired_total,
            )?;
            f.counter(
                "outpost_store_rejected_full",
                "Records refused because the store was full.",
                s.rejected_full_total,
            )?;
            f.counter(
                "outpost_store_commits",
                "Store transactions committed (group commits).",
                s.commits_total,
            )?;
            f.gauge(
                "outpost_refused_records",
                "Records the upstream refused for good, kept in the refused table.",
                s.refused_records as f64,
            )?;
            f.gauge(
                "outpost_refused_bytes",
                "Accounted bytes of the refused table.",
                s.refused_bytes as f64,
            )?;
            f.counter(
                "outpost_refused_evicted",
                "Refused records deleted beyond the refused table's bounds.",
                s.refused_evicted_total,
            )?;
            f.gauge(
                "outpost_store_last_seq",
                "Highest sequence number assigned.",
                s.last_seq as f64,
            )?;
        }
        if let Some(s) = &self.stats {
            f.counter(
                "outpost_store_commit_failures",
                "Store write transactions that failed and were rolled back (this process).",
                s.commit_failures_total,
            )?;
            f.counter(
                "outpost_store_recoveries",
                "Times the store became writable again after failed commits, without a restart.",
                s.recoveries_total,
            )?;
        }
        f.gauge(
            "outpost_store_poisoned",
            "1 when the store refuses writes after a failed commit.",
            f64::from(u8::from(self.stats.as_ref().is_some_and(|s| s.poisoned))),
        )?;
        // Broker.
        f.gauge(
            "outpost_broker_retained_messages",
            "Retained messages held (bounded by broker.max_retained).",
            b.retained_messages as f64,
        )?;
        f.gauge(
            "outpost_broker_retained_bytes",
            "Bytes of the retained messages held (bounded by broker.max_retained_bytes).",
            b.retained_bytes as f64,
        )?;
        f.gauge(
            "outpost_broker_persistent_sessions",
            "Persistent sessions kept (bounded by broker.max_sessions).",
            b.persistent_sessions as f64,
        )?;
        f.gauge(
            "outpost_broker_connections",
            "MQTT clients connected now.",
            b.connections_current as f64,
        )?;
        f.counter(
            "outpost_broker_connections_accepted",
            "MQTT connections accepted.",
            b.connections_total,
        )?;
        f.counter(
            "outpost_broker_connections_refused",
            "MQTT connections refused (limits, bad CONNECT).",
            b.connections_refused,
        )?;
        f.counter(
            "outpost_broker_malformed_packets",
            "Connections closed for a malformed packet or a protocol error (bad topic alias, second CONNECT, ...).",
            b.malformed_packets,
        )?;
        f.counter(
            "outpost_broker_oversized_packets",
            "Connections closed for a packet over the size limit.",
            b.oversized_packets,
        )?;
        f.counter(
            "outpost_broker_invalid_topics",
            "Publishes or wills with an invalid topic.",
            b.invalid_topics,
        )?;
        f.counter(
            "outpost_broker_publishes_received",
            "PUBLISH packets received from clients.",
            b.publishes_received,
        )?;
        f.counter(
            "outpost_broker_publishes_delivered",
            "Messages delivered to local subscribers.",
            b.publishes_delivered,
        )?;
        f.counter(
            "outpost_broker_ingest_refused",
            "Publishes the store refused (not acknowledged).",
            b.ingest_refused,
        )?;
        f.counter(
            "outpost_broker_dropped_queue_full",
            "Messages dropped from full per-client (and offline) queues.",
            b.dropped_queue_full,
        )?;
        f.counter(
            "outpost_broker_keepalive_timeouts",
            "Connections closed by keep-alive timeout.",
            b.keepalive_timeouts,
        )?;
        for (name, help, value) in [
            (
                "outpost_broker_messages_expired",
                "Queued or retained messages dropped because their MQTT 5 message expiry passed.",
                b.messages_expired,
            ),
            (
                "outpost_broker_sessions_expired",
                "Offline persistent sessions discarded when their expiry passed (MQTT 5 session expiry, capped at broker.max_session_expiry; 3.1.1: broker.session_expiry_311).",
                b.sessions_expired,
            ),
            (
                "outpost_broker_retained_refused",
                "New retained topics refused beyond broker.max_retained / max_retained_bytes (MQTT 5 QoS 1/2: 0x97; else delivered, not retained).",
                b.retained_refused,
            ),
            (
                "outpost_broker_sessions_refused",
                "Persistent sessions refused at CONNECT beyond broker.max_sessions.",
                b.sessions_refused,
            ),
            (
                "outpost_broker_state_invalid",
                "Persisted MQTT session or retained entries unreadable at start (discarded).",
                b.state_invalid,
            ),
            (
                "outpost_broker_state_write_failures",
                "Times MQTT session state could not be made durable before a client was answered.",
                b.state_write_failures,
            ),
            (
                "outpost_broker_auth_refused",
                "CONNECTs refused for bad credentials or anonymous where not allowed.",
                b.auth_refused,
            ),
            (
                "outpost_broker_publishes_denied",
                "Publishes the ACL refused (dropped, not stored).",
                b.publishes_denied,
            ),
            (
                "outpost_broker_subscriptions_denied",
                "Subscriptions the ACL refused.",
                b.subscriptions_denied,
            ),
            (
                "outpost_broker_deliveries_denied",
                "Messages not delivered to a subscriber the ACL does not let read them.",
                b.deliveries_denied,
            ),
            (
                "outpost_broker_tls_handshake_failures",
                "TLS handshakes that failed or timed out (that socket only).",
                b.tls_handshake_failures,
            ),
        ] {
            f.counter(name, help, value)?;
        }
        if let Some(c) = &self.coap {
            f.counter(
                "outpost_coap_requests",
                "Well-formed CoAP requests (duplicates included).",
                c.requests,
            )?;
            f.counter(
                "outpost_coap_duplicates",
                "Duplicate confirmable requests answered from the exchange cache.",
                c.duplicates,
            )?;
            f.counter(
                "outpost_coap_bad_requests",
                "Malformed CoAP datagrams dropped.",
                c.bad_requests,
            )?;
            f.counter("outpost_coap_stored", "CoAP readings committed.", c.stored)?;
            f.counter(
                "outpost_coap_refused",
                "CoAP readings refused (bad payload, store full or unavailable).",
                c.refused,
            )?;
            f.counter(
                "outpost_coap_overloaded",
                "CoAP readings answered 5.03 because too many were in flight.",
                c.overloaded,
            )?;
            f.gauge(
                "outpost_coap_observers",
                "Observers of the CoAP status resource.",
                c.observers as f64,
            )?;
            f.counter(
                "outpost_coap_notifications",
                "Observe notifications sent.",
                c.notifications,
            )?;
            f.counter(
                "outpost_coap_retransmissions",
                "Confirmable CoAP messages retransmitted.",
                c.retransmissions,
            )?;
        }
        self.extra.encode(&mut f)
    }
}
