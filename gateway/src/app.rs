//! The whole data path in one function: broker -> ingest -> store -> sync -> upstream.
//!
//! Shutdown order (each stage drains into the next): the broker stops accepting and finishes the
//! acks for what it already handed over; ingest commits everything the broker handed over; sync
//! gets a bounded grace period to collect PUBACKs for what is in flight; the status reporter
//! writes a last snapshot; the store commits, checkpoints and closes.

use std::sync::Arc;

use anyhow::Context;
use outpost_config::{Config, Durability, WhenFull};
use outpost_protocols::coap::{CoapObserver, CoapServer, CoapSettings, ObserveSettings};
use outpost_protocols::{Broker, BrokerSettings};
use outpost_storage::{DeadLetterLimits, Store, StoreSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker_state;
use crate::discovery;
use crate::health::{self, HealthState, checks::Checks};
use crate::http::{self, HttpState};
use crate::ingest::Ingest;
use crate::lifecycle::{Heartbeat, NodeIdentity};
use crate::metrics::{ByteBudget, Metrics, UplinkState, now_ms};
use crate::registry::{Registry, RegistrySettings};
use crate::route::{self, Router};
use crate::status::{self, Identity};
use crate::sync::{Lifecycle, Sync};

/// Bound of the broker -> ingest channel. When full, the broker stops reading from publishers
/// (their in-flight windows fill up): backpressure, never a drop. Ingest keeps draining it while
/// the store is slow (QoS 0 is then held within `storage.qos0_inflight_bytes` or dropped), so
/// it fills only while ingest holds back readings someone waits for
/// ([`crate::ingest::MAX_ACKED_PENDING`]).
const INGEST_CHANNEL: usize = 8192;

pub fn store_settings(config: &Config) -> StoreSettings {
    let s = &config.storage;
    StoreSettings {
        path: s.db_path(),
        quota_bytes: s.quota,
        ttl: s.ttl,
        when_full: match s.when_full {
            WhenFull::EvictLowestOldest => outpost_storage::WhenFull::EvictLowestOldest,
            WhenFull::RejectNew => outpost_storage::WhenFull::RejectNew,
        },
        batch_max_records: s.commit_batch_records,
        batch_max_delay: s.commit_interval,
        durability: match s.durability {
            Durability::Full => outpost_storage::Durability::Full,
            Durability::Normal => outpost_storage::Durability::Normal,
        },
        refused: outpost_storage::RefusedLimits {
            max_records: s.refused_max_records,
            max_bytes: s.refused_max_bytes,
        },
    }
}

pub fn registry_settings(config: &Config) -> RegistrySettings {
    let d = &config.discovery;
    RegistrySettings {
        announce_prefix: d.announce_prefix.clone(),
        stale_after: d.stale_after,
        offline_after: d.offline_after,
        implicit: d.implicit,
        implicit_coap: d.implicit_coap,
        max_devices: d.max_devices,
    }
}

/// The shared counters, with the byte bounds of what ingest holds in memory.
pub fn metrics(config: &Config) -> Metrics {
    Metrics::with_bounds(
        ByteBudget::new(config.storage.qos0_inflight_bytes),
        ByteBudget::new(config.storage.dead_letter_queue_bytes),
    )
}

/// Slack on top of a device's Max-Age before an observation counts as lapsed.
const OBSERVE_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

pub fn coap_settings(config: &Config) -> CoapSettings {
    let c = &config.coap;
    let mut s = CoapSettings::new(c.listeners.clone());
    s.ingest_path = c.ingest_path.clone();
    s.topic_prefix = c.topic_prefix.clone();
    s.max_payload = usize::try_from(c.max_payload).unwrap_or(usize::MAX);
    s.exchange_lifetime = c.exchange_lifetime;
    s.max_exchanges = c.max_exchanges;
    s.max_observers = c.max_observers;
    s
}

pub fn broker_settings(config: &Config) -> BrokerSettings {
    let b = &config.broker;
    BrokerSettings {
        listeners: b.listeners.clone(),
        max_connections: b.max_connections,
        max_packet_size: usize::try_from(b.max_packet_size).unwrap_or(usize::MAX),
        max_inflight: b.max_inflight,
        max_inbound_pending: b.max_inbound_pending,
        max_queued_messages: b.max_queued_messages,
        max_queued_bytes: usize::try_from(b.max_queued_bytes).unwrap_or(usize::MAX),
        // Retained messages and persistent sessions live in the store's state table, outside
        // storage.quota: these bound them (Config::warnings says when they are large).
        max_retained: b.max_retained,
        max_retained_bytes: usize::try_from(b.max_retained_bytes).unwrap_or(usize::MAX),
        max_sessions: b.max_sessions,
        session_expiry_311: b.session_expiry_311,
        max_session_expiry: b.max_session_expiry,
        connect_timeout: b.connect_timeout,
        // Who may connect, publish and subscribe: the password and ACL files parsed at load.
        auth: Some(Arc::new(outpost_protocols::Auth::from_config(b))),
        // Per listener: TLS certificate and key (and client CA) files, or plain TCP.
        tls: b.listener_settings.iter().map(|l| l.tls.clone()).collect(),
    }
}

/// Runs the gateway until `shutdown` is cancelled, then stops it in order.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    for w in config.warnings() {
        warn!(path = %w.path, "configuration: {}", w.message);
    }
    let settings = store_settings(&config);
    let db = settings.path.clone();
    let limits = DeadLetterLimits {
        max_records: config.storage.dead_letter_max_records,
        max_bytes: config.storage.dead_letter_max_bytes,
    };
    let store = tokio::task::spawn_blocking(move || Store::open_with(settings, limits))
        .await
        .context("store open task")?
        .with_context(|| format!("opening the store at {}", db.display()))?;
    let metrics = Arc::new(metrics(&config));
    let router = Arc::new(Router::new(&config));

    let broker = Broker::bind(broker_settings(&config))
        .await
        .context("starting the MQTT broker")?;
    broker.set_max_keep_alive(config.broker.max_keep_alive);
    // Persistent sessions and retained messages from before the restart, and from now on
    // every change to them, in the store.
    let (restored, state_rx) = broker_state::restore(&broker, &store)
        .await
        .context("reading the MQTT sessions and retained messages")?;
    info!(
        sessions = restored.sessions,
        messages = restored.messages,
        retained = restored.retained,
        unreadable = restored.invalid.len(),
        "MQTT state restored"
    );
    let state_stop = CancellationToken::new();
    let state_task = tokio::spawn(broker_state::run(
        store.clone(),
        state_rx,
        state_stop.clone(),
    ));
    let listeners: Vec<String> = broker.local_addrs().iter().map(|a| a.to_string()).collect();
    let broker_handle = broker.handle();
    info!(listeners = ?listeners, db = %db.display(), "outpost listening");

    // CoAP: bound now, like the broker, so a bad address is a start-up error.
    let coap = if config.coap.listeners.is_empty() {
        None
    } else {
        let server = CoapServer::bind(coap_settings(&config))
            .await
            .context("starting the CoAP endpoint")?;
        info!(listeners = ?server.local_addrs(), "CoAP endpoint listening");
        Some(server)
    };
    let mut observers = Vec::new();
    for o in &config.observe {
        let observer = CoapObserver::bind(ObserveSettings {
            target: o.target,
            path: o.path.clone(),
            topic: o.topic.clone(),
            margin: OBSERVE_MARGIN,
        })
        .await
        .with_context(|| format!("observing {}", o.uri))?;
        observers.push(observer);
    }

    // SIGHUP re-reads the password and ACL files without dropping any connection.
    {
        let handle = broker_handle.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { reload_on_sighup(handle, stop).await });
    }

    // The device registry sees every message ingest handles and keeps its changes in the store.
    let registry = Arc::new(
        Registry::load(registry_settings(&config), &store)
            .await
            .context("loading the device registry")?,
    );
    let registry_stop = CancellationToken::new();
    let registry_task = {
        let registry = Arc::clone(&registry);
        let store = store.clone();
        let stop = registry_stop.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move { registry.run(store, metrics, stop).await })
    };

    // Sources hand accepted readings to ingest; the channel closes when the last of them stops.
    let (ingest_tx, ingest_rx) = mpsc::channel(INGEST_CHANNEL);
    let mut sources = tokio::task::JoinSet::new();
    let coap_handle = coap.as_ref().map(CoapServer::handle);
    let coap_port = coap
        .as_ref()
        .and_then(|c| c.local_addrs().first().map(|a| a.port()));
    if let Some(server) = coap {
        let tx = ingest_tx.clone();
        let stop = shutdown.clone();
        sources.spawn(async move {
            if let Err(e) = server.run(tx, stop).await {
                tracing::error!(error = %e, "CoAP endpoint failed");
            }
        });
    }
    for observer in observers {
        let tx = ingest_tx.clone();
        let stop = shutdown.clone();
        sources.spawn(async move {
            if let Err(e) = observer.run(tx, stop).await {
                tracing::error!(error = %e, "CoAP observation failed");
            }
        });
    }
    discovery::start(
        &config,
        broker.local_addrs().first().map(|a| a.port()),
        coap_port,
        Arc::clone(&registry),
        ingest_tx.clone(),
        &mut sources,
        shutdown.clone(),
    )
    .await
    .context("starting discovery")?;
    let broker_task = tokio::spawn(broker.run(ingest_tx, shutdown.clone()));
    let ingest_task = tokio::spawn(
        Ingest::new(
            Arc::clone(&router),
            store.clone(),
            ingest_rx,
            Arc::clone(&metrics),
            broker_handle.clone(),
            Arc::clone(&registry),
        )
        .run(),
    );

    let identity = NodeIdentity {
        node: config.node.name.as_str().to_owned(),
        labels: config.node.labels.clone(),
        capabilities: config.node.capabilities.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at_ms: now_ms(),
    };

    // Health: checks of the services around the gateway, resource samples (both stored as the
    // gateway's own streams), their figures in /metrics, /status and the heartbeat.
    let health_stop = CancellationToken::new();
    let health_tasks = TaskTracker::new();
    let (change_tx, change_rx) = mpsc::channel(256);
    let health = Arc::new(HealthState {
        checks: Checks::spawn(
            config.checks.clone(),
            change_tx,
            health_stop.clone(),
            &health_tasks,
        ),
        resources: Default::default(),
    });
    health_tasks.spawn(health::record_check_changes(store.clone(), change_rx));
    health_tasks.spawn(health::sample_resources(
        config.storage.data_dir.clone(),
        config.health.clone(),
        route::storage_priority(config.health.resource_priority),
        store.clone(),
        Arc::clone(&health),
        health_stop.clone(),
    ));
    health_tasks.close();

    // Sync runs until ingest has drained, then gets its own grace period inside `Sync::run`.
    let sync_stop = CancellationToken::new();
    let sync_task = match &config.upstream {
        Some(upstream) => {
            let sync = Sync {
                upstream: upstream.clone(),
                settings: config.sync.clone(),
                node: config.node.name.as_str().to_owned(),
                store: store.clone(),
                router: Arc::clone(&router),
                broker: broker_handle.clone(),
                local_max_packet_size: config.broker.max_packet_size,
                metrics: Arc::clone(&metrics),
                lifecycle: Arc::new(lifecycle(
                    &config,
                    &identity,
                    Arc::clone(&metrics),
                    Arc::clone(&health),
                )),
            };
            Some(tokio::spawn(sync.run(sync_stop.clone())))
        }
        None => {
            metrics.set_uplink_state(UplinkState::NotConfigured);
            info!("no upstream configured: readings are kept until one is");
            None
        }
    };

    // The local status endpoint: bound now so a bad address is a start-up error.
    let http_stop = CancellationToken::new();
    let http_listener = match config.health.listen {
        Some(addr) => Some(
            http::bind(addr)
                .await
                .with_context(|| format!("binding the status endpoint on {addr}"))?,
        ),
        None => None,
    };

    let report_stop = CancellationToken::new();
    let identity = Identity {
        node: identity.node.clone(),
        started_at_ms: identity.started_at_ms,
        listeners,
        upstream: config.upstream.as_ref().map(|u| u.url.to_string()),
    };
    let http_task = http_listener.map(|listener| {
        let state = HttpState {
            store: store.clone(),
            db: db.clone(),
            metrics: Arc::clone(&metrics),
            broker: broker_handle.clone(),
            coap: coap_handle.clone(),
            identity: identity.clone(),
            extra: Arc::clone(&health) as Arc<dyn crate::http::ExtraMetrics>,
        };
        tokio::spawn(http::serve(listener, state, http_stop.clone()))
    });
    let report_task = tokio::spawn(status::report(
        store.clone(),
        identity,
        Arc::clone(&metrics),
        broker_handle,
        coap_handle,
        report_stop.clone(),
    ));

    let broker_result = broker_task.await.context("broker task")?;
    while sources.join_next().await.is_some() {}
    // The gateway's own sources stop with the broker; what they already handed over is stored.
    health_stop.cancel();
    if tokio::time::timeout(health::CHECK_STOP_GRACE, health_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("health tasks did not stop in time");
    }
    info!("broker stopped; committing what was accepted");
    ingest_task.await.context("ingest task")?;
    registry_stop.cancel();
    registry_task.await.context("registry task")?;
    sync_stop.cancel();
    if let Some(task) = sync_task {
        task.await.context("sync task")?;
    }
    // Nothing publishes into the broker any more: its last session changes go in.
    state_stop.cancel();
    state_task.await.context("MQTT state task")?;
    report_stop.cancel();
    report_task.await.context("status task")?;
    http_stop.cancel();
    if let Some(task) = http_task {
        task.await.context("status endpoint task")?;
    }
    store.close().await.context("closing the store")?;
    info!("outpost stopped cleanly");
    broker_result.context("MQTT broker")?;
    Ok(())
}

/// The gateway's own messages upstream: identity for birth, and the heartbeat's figures.
fn lifecycle(
    config: &Config,
    identity: &NodeIdentity,
    metrics: Arc<Metrics>,
    health: Arc<HealthState>,
) -> Lifecycle {
    let node = identity.node.clone();
    let started_at_ms = identity.started_at_ms;
    Lifecycle {
        identity: identity.clone(),
        heartbeat_interval: config.health.heartbeat_interval,
        heartbeat: Box::new(move |stats| {
            let now = now_ms();
            let resources = health.latest_resources();
            Heartbeat {
                node: node.clone(),
                at_ms: now,
                uptime_s: now.saturating_sub(started_at_ms) / 1000,
                backlog_records: stats.records,
                backlog_bytes: stats.bytes,
                oldest_unsynced_age_ms: stats
                    .oldest_ingested_at_ms
                    .and_then(|t| crate::metrics::wall_age_ms(now, t)),
                drain_eta_s: metrics.drain_eta(stats.records),
                uplink_rtt_ms: metrics.uplink_rtt().map(|d| d.as_secs_f64() * 1000.0),
                reconnects: crate::metrics::get(&metrics.reconnects),
                ingested: crate::metrics::get(&metrics.ingested),
                synced: crate::metrics::get(&metrics.sync_acked),
                store_poisoned: stats.poisoned,
                checks: health
                    .checks
                    .snapshot()
                    .into_iter()
                    .map(|c| (c.name, c.state.as_str().to_owned()))
                    .collect(),
                cpu_percent: resources.as_ref().map(|r| r.cpu_percent),
                memory_used: resources.as_ref().map(|r| r.memory_used),
                disk_available: resources
                    .as_ref()
                    .and_then(|r| r.disk.as_ref().map(|d| d.available)),
            }
        }),
    }
}

/// Reloads the broker's password and ACL files on every SIGHUP; a file that no longer parses
/// keeps the previous policy in force (logged), it never opens the broker up.
async fn reload_on_sighup(broker: outpost_protocols::BrokerHandle, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; auth files are not reloadable");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match broker.auth() {
            Some(current) => match current.reloaded() {
                Ok(auth) => {
                    broker.reload_auth(Some(Arc::new(auth)));
                    info!("SIGHUP: password and ACL files reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: reload failed; the previous password and ACL files stay in force")
                }
            },
            None => info!("SIGHUP: no password or ACL file configured; nothing to reload"),
        }
        match broker.reload_tls() {
            Ok(()) => info!("SIGHUP: TLS certificates reloaded for new connections"),
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: TLS reload failed; the previous certificates stay in force")
            }
        }
    }
}
