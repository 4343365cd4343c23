//! Ingest: takes what the broker accepted, routes it, and commits it to the store before the
//! publisher is acknowledged.
//!
//! Order matters twice here. Records must reach the store in the order the broker handed them over
//! (per-topic order upstream depends on it), and the store must see many records at once to group
//! them into few commits. So this task drains everything queued (up to [`MAX_BATCH`]), submits it
//! to the store in order (one submission per priority class present, so a full class cannot make
//! another class's readings fail), and does *not* wait for the commit before taking the next batch:
//! a spawned waiter answers the broker when the commit lands. The broker only sends PUBACK/PUBREC
//! after that answer.
//!
//! Payload formats: a CoAP request's Content-Format, or else the route's declared `format`, says
//! what the payload must decode as. A payload that does not is kept in the dead-letter table with
//! the reason (committed before the sender is answered), counted, and refused with a diagnostic;
//! it is never synced as data. A CoAP request whose Content-Format differs from the route's, or
//! is one we do not know, is refused as unsupported. Routes with `store = "normalised"` store the
//! resolved SenML records (JSON) instead of the original bytes.
//!
//! Readings that arrive over CoAP are also published on the local broker (after the commit, or at
//! once for local-only routes), so local subscribers see CoAP sensors like MQTT ones.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use outpost_config::StoreMode;
use outpost_protocols::payload::{self, ContentFormat, Decoded};
use outpost_protocols::{BrokerHandle, Inbound, IngestRefusal, IngestReply, QoS, Source};
use outpost_storage::{DeadLetter, NewRecord, Priority, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::metrics::{Metrics, inc, now_ms};
use crate::registry::Registry;
use crate::route::{Decision, Router};

/// The most messages taken from the broker's channel for one round of submissions.
pub const MAX_BATCH: usize = 2048;

/// The ingest stage: broker -> route -> store.
#[derive(Debug)]
pub struct Ingest {
    /// Decides local-only vs cloud and the priority of each reading.
    router: Arc<Router>,
    /// Where cloud-bound readings are committed.
    store: Store,
    /// Accepted messages from the broker; closed when the broker has stopped.
    inbound: mpsc::Receiver<Inbound>,
    /// Shared counters.
    metrics: Arc<Metrics>,
    /// Where CoAP readings are republished for local subscribers.
    broker: BrokerHandle,
    /// Sees every message (announcements, implicit registration, counts).
    registry: Arc<Registry>,
}

/// A publisher waiting for its message to be committed (None for QoS 0 and wills).
type Waiter = Option<oneshot::Sender<IngestReply>>;

impl Ingest {
    pub fn new(
        router: Arc<Router>,
        store: Store,
        inbound: mpsc::Receiver<Inbound>,
        metrics: Arc<Metrics>,
        broker: BrokerHandle,
        registry: Arc<Registry>,
    ) -> Self {
        Self {
            router,
            store,
            inbound,
            metrics,
            broker,
            registry,
        }
    }

    /// Runs until the broker closes its side of the channel (it does so after it stopped
    /// accepting), so everything the broker handed over is submitted before this returns. Waits
    /// for the outstanding commits before returning.
    pub async fn run(mut self) {
        let mut buf = Vec::with_capacity(MAX_BATCH);
        let mut waiters = tokio::task::JoinSet::new();
        loop {
            buf.clear();
            if self.inbound.recv_many(&mut buf, MAX_BATCH).await == 0 {
                break;
            }
            let mut by_priority: [Batch; 3] = Default::default();
            let ingested_at_ms = now_ms();
            for mut msg in buf.drain(..) {
                inc(&self.metrics.ingested);
                self.registry.observe(&msg);
                match self.router.decide(&msg.topic) {
                    Decision::Local => {
                        inc(&self.metrics.ingested_local_only);
                        if msg.source == Source::Coap {
                            publish_locally(&self.broker, &msg.topic, msg.payload.clone());
                        }
                        if let Some(reply) = msg.reply {
                            // The publisher may have gone away; nothing to do then.
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Decision::Cloud {
                        priority,
                        format,
                        store,
                    } => {
                        let Some(payload) = self.check_payload(&mut msg, format, store) else {
                            continue;
                        };
                        let slot = &mut by_priority[priority.as_index()];
                        if msg.source == Source::Coap {
                            slot.local.push((msg.topic.clone(), payload.clone()));
                        }
                        slot.records.push(NewRecord {
                            stream: msg.topic,
                            priority,
                            payload,
                            ingested_at_ms,
                        });
                        slot.waiters.push(msg.reply);
                    }
                }
            }
            for priority in Priority::ALL {
                let Batch {
                    records,
                    waiters: replies,
                    local,
                } = std::mem::take(&mut by_priority[priority.as_index()]);
                if records.is_empty() {
                    continue;
                }
                let count = records.len();
                let metrics = Arc::clone(&self.metrics);
                let broker = self.broker.clone();
                match self.store.submit(records).await {
                    Ok(pending) => {
                        waiters.spawn(async move {
                            let result = pending.await.map(|_| ());
                            if result.is_ok() {
                                for (topic, payload) in local {
                                    publish_locally(&broker, &topic, payload);
                                }
                            }
                            answer(&metrics, result, replies, count);
                        });
                    }
                    Err(e) => answer(&metrics, Err(e), replies, count),
                }
            }
            // Reap finished waiters so the set stays small under sustained load.
            while waiters.try_join_next().is_some() {}
        }
        while waiters.join_next().await.is_some() {}
        debug!("ingest drained");
    }
}

/// One priority class's share of a round: records, their waiters, and CoAP readings to republish
/// locally once committed.
#[derive(Default)]
struct Batch {
    records: Vec<NewRecord>,
    waiters: Vec<Waiter>,
    local: Vec<(String, Bytes)>,
}

impl Ingest {
    /// The bytes to store for `msg`, or None when it was refused (the refusal is on its way: a
    /// dead letter is committed first, then the sender is answered).
    fn check_payload(
        &self,
        msg: &mut Inbound,
        route_format: Option<ContentFormat>,
        store: StoreMode,
    ) -> Option<Bytes> {
        let declared = match msg.content_format {
            None => None,
            Some(number) => match ContentFormat::from_coap(number) {
                Some(f) if route_format.is_none_or(|r| r == f) => Some(f),
                known => {
                    inc(&self.metrics.payload_unsupported);
                    warn!(topic = %msg.topic, content_format = number, expected = ?route_format.map(ContentFormat::name),
                        known = known.is_some(), "content format not accepted on this route");
                    if let Some(reply) = msg.reply.take() {
                        let _ = reply.send(Err(IngestRefusal::UnsupportedFormat));
                    }
                    return None;
                }
            },
        };
        let Some(format) = declared.or(route_format) else {
            return Some(msg.payload.clone());
        };
        match payload::validate(format, &msg.payload, SystemTime::now()) {
            Ok(Decoded::Senml(records)) if store == StoreMode::Normalised => {
                Some(Bytes::from(payload::normalised_json(&records)))
            }
            Ok(_) => Some(msg.payload.clone()),
            Err(e) => {
                let reason = e.to_string();
                inc(&self.metrics.dead_lettered);
                warn!(topic = %msg.topic, client = %msg.client_id, format = format.name(), %reason,
                    "payload does not decode; kept as a dead letter");
                let letter = DeadLetter {
                    topic: msg.topic.clone(),
                    source: source_label(msg),
                    reason: reason.clone(),
                    content_format: Some(format.as_coap()),
                    payload: msg.payload.clone(),
                    at_ms: now_ms(),
                };
                let store = self.store.clone();
                let metrics = Arc::clone(&self.metrics);
                let reply = msg.reply.take();
                tokio::spawn(async move {
                    if let Err(e) = store.dead_letter(letter).await {
                        inc(&metrics.dead_letter_failures);
                        warn!(error = %e, "dead letter could not be stored");
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(IngestRefusal::PayloadInvalid(reason)));
                    }
                });
                None
            }
        }
    }
}

/// `mqtt:<client id>` or `coap:<peer>` (the CoAP server's client ids already carry the prefix).
fn source_label(msg: &Inbound) -> String {
    let source = msg.source.as_str();
    match msg.client_id.strip_prefix(source) {
        Some(rest) if rest.starts_with(':') => msg.client_id.to_string(),
        _ => format!("{source}:{}", msg.client_id),
    }
}

/// Republishes a CoAP reading on the local broker (QoS 1, not retained, not ingested again).
fn publish_locally(broker: &BrokerHandle, topic: &str, payload: Bytes) {
    let broker = broker.clone();
    let topic = topic.to_owned();
    tokio::spawn(async move {
        if let Err(e) = broker
            .publish(&topic, payload, QoS::AtLeastOnce, false)
            .await
        {
            debug!(%topic, error = %e, "CoAP reading not republished locally");
        }
    });
}

fn refusal(e: &StoreError) -> IngestRefusal {
    match e {
        StoreError::Full { .. } | StoreError::TooLarge { .. } => IngestRefusal::QuotaExceeded,
        _ => IngestRefusal::StoreUnavailable,
    }
}

fn answer(metrics: &Metrics, result: Result<(), StoreError>, replies: Vec<Waiter>, count: usize) {
    match result {
        Ok(()) => {
            metrics
                .stored
                .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
            for reply in replies.into_iter().flatten() {
                let _ = reply.send(Ok(()));
            }
        }
        Err(e) => {
            warn!(error = %e, records = count, "store refused readings; publishers are not acknowledged");
            let why = refusal(&e);
            for reply in replies {
                inc(&metrics.ingest_refused);
                match reply {
                    Some(reply) => {
                        let _ = reply.send(Err(why.clone()));
                    }
                    // QoS 0 and wills: nobody can be told to send again, so it is counted as lost.
                    None => inc(&metrics.unacknowledged_lost),
                }
            }
        }
    }
}
