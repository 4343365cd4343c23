//! The whole data path in one function: broker -> ingest -> store -> sync -> upstream.
//!
//! Shutdown order (each stage drains into the next): the broker stops accepting and finishes the
//! acks for what it already handed over; ingest commits everything the broker handed over; sync
//! gets a bounded grace period to collect PUBACKs for what is in flight; the status reporter
//! writes a last snapshot; the store commits, checkpoints and closes.

use std::sync::Arc;

use anyhow::Context;
use outpost_config::{Config, Durability, WhenFull};
use outpost_protocols::{Broker, BrokerSettings};
use outpost_storage::{Store, StoreSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::ingest::Ingest;
use crate::metrics::{Metrics, UplinkState, now_ms};
use crate::route::Router;
use crate::status::{self, Identity};
use crate::sync::Sync;

/// Bound of the broker -> ingest channel. When full, the broker stops reading from publishers
/// (their in-flight windows fill up): backpressure, never a drop.
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
    }
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
        connect_timeout: b.connect_timeout,
    }
}

/// Runs the gateway until `shutdown` is cancelled, then stops it in order.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let settings = store_settings(&config);
    let db = settings.path.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(settings))
        .await
        .context("store open task")?
        .with_context(|| format!("opening the store at {}", db.display()))?;
    let metrics = Arc::new(Metrics::default());
    let router = Arc::new(Router::new(&config));

    let broker = Broker::bind(broker_settings(&config))
        .await
        .context("starting the MQTT broker")?;
    let listeners: Vec<String> = broker.local_addrs().iter().map(|a| a.to_string()).collect();
    let broker_handle = broker.handle();
    info!(listeners = ?listeners, db = %db.display(), "outpost listening");

    // Sources: the broker hands accepted messages to ingest; the channel closes when it stops.
    let (ingest_tx, ingest_rx) = mpsc::channel(INGEST_CHANNEL);
    let broker_task = tokio::spawn(broker.run(ingest_tx, shutdown.clone()));
    let ingest_task = tokio::spawn(
        Ingest::new(
            Arc::clone(&router),
            store.clone(),
            ingest_rx,
            Arc::clone(&metrics),
        )
        .run(),
    );

    // Sync runs until ingest has drained, then gets its own grace period inside `Sync::run`.
    let sync_stop = CancellationToken::new();
    let sync_task = match &config.upstream {
        Some(upstream) => {
            let sync = Sync::new(
                upstream.clone(),
                config.sync.clone(),
                config.node.name.as_str().to_owned(),
                store.clone(),
                Arc::clone(&router),
                broker_handle.clone(),
                Arc::clone(&metrics),
            );
            Some(tokio::spawn(sync.run(sync_stop.clone())))
        }
        None => {
            metrics.set_uplink_state(UplinkState::NotConfigured);
            info!("no upstream configured: readings are kept until one is");
            None
        }
    };

    let report_stop = CancellationToken::new();
    let identity = Identity {
        node: config.node.name.as_str().to_owned(),
        started_at_ms: now_ms(),
        listeners,
        upstream: config.upstream.as_ref().map(|u| u.url.to_string()),
    };
    let report_task = tokio::spawn(status::report(
        store.clone(),
        identity,
        Arc::clone(&metrics),
        broker_handle,
        report_stop.clone(),
    ));

    let broker_result = broker_task.await.context("broker task")?;
    info!("broker stopped; committing what was accepted");
    ingest_task.await.context("ingest task")?;
    sync_stop.cancel();
    if let Some(task) = sync_task {
        task.await.context("sync task")?;
    }
    report_stop.cancel();
    report_task.await.context("status task")?;
    store.close().await.context("closing the store")?;
    info!("outpost stopped cleanly");
    broker_result.context("MQTT broker")?;
    Ok(())
}
