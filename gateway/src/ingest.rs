//! Ingest: takes what the broker accepted, routes it, and commits it to the store before the
//! publisher is acknowledged.
//!
//! Order matters twice here. Records must reach the store in the order the broker handed them over
//! (per-topic order upstream depends on it), and the store must see many records at once to group
//! them into few commits. So the ingest task runs three parts, concurrently, on one task:
//!
//! - the **receiver** drains everything the broker queued (up to [`MAX_BATCH`]), routes and
//!   checks each message, and admits it (see the bounds below) to the hand-off, in order;
//! - the **submitter** takes what was admitted, in order, and submits it to the store (one
//!   submission per priority class present, so a full class cannot make another class's readings
//!   fail). It does *not* wait for the commit before taking the next batch: a spawned waiter
//!   answers the broker when the commit lands. The broker only sends PUBACK/PUBREC after that
//!   answer;
//! - the **dead-letter writer** stores payloads that did not decode (see below), in batches.
//!
//! # Bounds (every buffer here is fed by the network)
//!
//! The receiver keeps reading the broker's channel while the store is slow, so that what is
//! waiting is held where it is bounded and counted, not in a channel bounded only by count:
//!
//! - **QoS 0** (publishes and QoS 0 wills: nobody waits for an ack, so nothing else slows those
//!   publishers) is admitted within `storage.qos0_inflight_bytes`, accounted like the store's
//!   quota (topic + payload + [`outpost_storage::RECORD_OVERHEAD_BYTES`]) from admission to the
//!   commit. What does not fit is dropped and counted (`outpost_qos0_dropped_total` and
//!   `_bytes_total`): a QoS 0 publisher was never promised anything.
//! - **Readings someone waits for** (QoS 1/2, CoAP requests and notifications, QoS 1/2 wills)
//!   are never dropped: at most [`MAX_ACKED_PENDING`] of them are between the receiver and
//!   their commit; beyond, the receiver waits, the broker's channel fills and the broker stops
//!   reading from publishers (their in-flight windows fill up): backpressure, as before.
//!   Their bytes are bounded by the broker's windows (`broker.max_inbound_pending` per client
//!   times `broker.max_packet_size`).
//! - **Dead letters** wait for the writer within `storage.dead_letter_queue_bytes` (accounted
//!   like the dead-letter table); beyond, a dead letter is dropped and counted
//!   (`outpost_dead_letters_dropped_total`) and its sender is still told the payload is invalid.
//!   One writer takes up to [`DEAD_LETTER_BATCH`] at a time and writes them together (they
//!   share one or two group commits), instead of a task per invalid payload.
//!
//! Log lines caused by messages (an invalid payload, a drop) are rate-limited
//! ([`LogLimiter`]): one line per interval, saying how many were held back; the counters have
//! the exact numbers.
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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::SystemTime;

use bytes::Bytes;
use outpost_config::StoreMode;
use outpost_protocols::payload::{self, ContentFormat, Decoded};
use outpost_protocols::{BrokerHandle, Inbound, IngestRefusal, IngestReply, QoS, Source};
use outpost_storage::{DeadLetter, NewRecord, Priority, Store, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, warn};

use crate::metrics::{BytePermit, LogLimiter, Metrics, inc, now_ms};
use crate::registry::Registry;
use crate::route::{Decision, Router};

/// The most messages taken from the broker's channel (and from the hand-off) for one round.
pub const MAX_BATCH: usize = 2048;
/// The most readings someone waits for (QoS 1/2, CoAP) between the receiver and their commit;
/// beyond, the receiver stops reading the broker's channel (backpressure). As many as that
/// channel holds, so the bound on what is waiting did not change when the receiver stopped
/// waiting for the store.
pub const MAX_ACKED_PENDING: usize = 8192;
/// Dead letters written together (one group commit).
pub const DEAD_LETTER_BATCH: usize = 64;

/// Log lines caused by messages: one per [`LogLimiter::EVERY`] per kind.
static INVALID_PAYLOAD_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static UNSUPPORTED_FORMAT_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static QOS0_DROPPED_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static DEAD_LETTER_DROPPED_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static DEAD_LETTER_FAILED_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);
static STORE_REFUSED_LOG: LogLimiter = LogLimiter::new(LogLimiter::EVERY);

/// The ingest stage: broker -> route -> store.
#[derive(Debug)]
pub struct Ingest {
    /// Decides local-only vs cloud and the priority of each reading.
    router: Arc<Router>,
    /// Where cloud-bound readings are committed.
    store: Store,
    /// Accepted messages from the broker; closed when the broker has stopped.
    inbound: mpsc::Receiver<Inbound>,
    /// Shared counters, and the byte budgets of QoS 0 readings and of queued dead letters.
    metrics: Arc<Metrics>,
    /// Where CoAP readings are republished for local subscribers.
    broker: BrokerHandle,
    /// Sees every message (announcements, implicit registration, counts).
    registry: Arc<Registry>,
}

/// A publisher waiting for its message to be committed (None for QoS 0 and wills).
type Waiter = Option<oneshot::Sender<IngestReply>>;

/// What keeps an admitted reading inside its bound until it is committed: never read, it gives
/// its share back when dropped (after the commit, or whatever else ends the reading).
#[derive(Debug)]
struct Hold {
    /// Bytes of the QoS 0 budget (QoS 0 readings).
    _qos0: Option<BytePermit>,
    /// A place among the readings someone waits for (all others).
    _acked: Option<OwnedSemaphorePermit>,
}

/// A reading admitted to the store, in the receiver's order.
#[derive(Debug)]
struct Admitted {
    record: NewRecord,
    reply: Waiter,
    /// A CoAP reading: republished on the local broker once committed.
    republish: bool,
    hold: Hold,
}

/// A dead letter waiting for the writer.
#[derive(Debug)]
struct QueuedLetter {
    letter: DeadLetter,
    /// The sender, answered (payload invalid) once the letter is written or failed.
    reply: Waiter,
    reason: String,
    /// Its bytes in the dead-letter queue's budget, until it is written.
    permit: BytePermit,
}

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
    /// for the outstanding commits and dead-letter writes before returning.
    pub async fn run(self) {
        // Both hand-offs are bounded by admission (a byte budget, or a semaphore), not by a
        // channel capacity: a full channel would stop the receiver, and with it QoS 0 drops.
        let (handoff_tx, handoff_rx) = mpsc::unbounded_channel();
        let (letters_tx, letters_rx) = mpsc::unbounded_channel();
        let receiver = Receiver {
            router: self.router,
            inbound: self.inbound,
            metrics: Arc::clone(&self.metrics),
            broker: self.broker.clone(),
            registry: self.registry,
            handoff: handoff_tx,
            letters: letters_tx,
            acked_slots: Arc::new(Semaphore::new(MAX_ACKED_PENDING)),
        };
        tokio::join!(
            receiver.run(),
            submit_in_order(
                self.store.clone(),
                handoff_rx,
                Arc::clone(&self.metrics),
                self.broker
            ),
            write_dead_letters(self.store, letters_rx, self.metrics),
        );
        debug!("ingest drained");
    }
}

/// Reads the broker's channel, routes, checks and admits.
struct Receiver {
    router: Arc<Router>,
    inbound: mpsc::Receiver<Inbound>,
    metrics: Arc<Metrics>,
    broker: BrokerHandle,
    registry: Arc<Registry>,
    /// To the submitter, in order. Dropped when the receiver ends, which ends the submitter.
    handoff: mpsc::UnboundedSender<Admitted>,
    /// To the dead-letter writer. Dropped when the receiver ends, which ends the writer.
    letters: mpsc::UnboundedSender<QueuedLetter>,
    /// Places for readings someone waits for ([`MAX_ACKED_PENDING`]).
    acked_slots: Arc<Semaphore>,
}

impl Receiver {
    async fn run(mut self) {
        let mut buf = Vec::with_capacity(MAX_BATCH);
        loop {
            buf.clear();
            if self.inbound.recv_many(&mut buf, MAX_BATCH).await == 0 {
                break;
            }
            let ingested_at_ms = now_ms();
            for msg in buf.drain(..) {
                self.handle(msg, ingested_at_ms).await;
            }
        }
    }

    async fn handle(&self, mut msg: Inbound, ingested_at_ms: u64) {
        inc(&self.metrics.ingested);
        self.registry.observe(&msg);
        let (priority, format, store) = match self.router.decide(&msg.topic) {
            Decision::Local => {
                inc(&self.metrics.ingested_local_only);
                if msg.source == Source::Coap {
                    publish_locally(&self.broker, &msg.topic, msg.payload.clone());
                }
                if let Some(reply) = msg.reply {
                    // The publisher may have gone away; nothing to do then.
                    let _ = reply.send(Ok(()));
                }
                return;
            }
            Decision::Cloud {
                priority,
                format,
                store,
            } => (priority, format, store),
        };
        let Some(payload) = self.check_payload(&mut msg, format, store) else {
            return;
        };
        let cost = outpost_storage::accounted_size(&msg.topic, payload.len());
        let hold = if msg.reply.is_none() && msg.qos == QoS::AtMostOnce {
            match self.metrics.qos0_inflight.try_acquire(cost) {
                Some(permit) => Hold {
                    _qos0: Some(permit),
                    _acked: None,
                },
                None => {
                    if let Some(held_back) = QOS0_DROPPED_LOG.allow() {
                        let budget = &self.metrics.qos0_inflight;
                        warn!(topic = %msg.topic, client = %msg.client_id, bytes = cost,
                            in_flight = budget.used(), limit = budget.limit(),
                            dropped_total = budget.refused(), held_back,
                            "QoS 0 reading dropped: storage.qos0_inflight_bytes is in flight to the store (one line per 10 s)");
                    }
                    return;
                }
            }
        } else {
            match Arc::clone(&self.acked_slots).acquire_owned().await {
                Ok(slot) => Hold {
                    _qos0: None,
                    _acked: Some(slot),
                },
                // The semaphore is never closed; were it, the sender is told to retry.
                Err(_) => {
                    if let Some(reply) = msg.reply {
                        let _ = reply.send(Err(IngestRefusal::StoreUnavailable));
                    }
                    return;
                }
            }
        };
        let admitted = Admitted {
            republish: msg.source == Source::Coap,
            record: NewRecord {
                stream: msg.topic,
                priority,
                payload,
                ingested_at_ms,
            },
            reply: msg.reply,
            hold,
        };
        if let Err(mpsc::error::SendError(a)) = self.handoff.send(admitted) {
            // The submitter is gone (only after a panic): not stored, so not acknowledged.
            answer(&self.metrics, Err(StoreError::Closed), vec![a.reply], 1);
        }
    }

    /// The bytes to store for `msg`, or None when it was refused (the refusal is on its way: a
    /// dead letter is queued first, then the sender is answered).
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
                    if let Some(held_back) = UNSUPPORTED_FORMAT_LOG.allow() {
                        warn!(topic = %msg.topic, content_format = number, expected = ?route_format.map(ContentFormat::name),
                            known = known.is_some(), held_back, "content format not accepted on this route (one line per 10 s)");
                    }
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
                if let Some(held_back) = INVALID_PAYLOAD_LOG.allow() {
                    warn!(topic = %msg.topic, client = %msg.client_id, format = format.name(), %reason,
                        held_back, "payload does not decode; kept as a dead letter (one line per 10 s)");
                }
                let letter = DeadLetter {
                    topic: msg.topic.clone(),
                    source: source_label(msg),
                    reason: reason.clone(),
                    content_format: Some(format.as_coap()),
                    payload: msg.payload.clone(),
                    at_ms: now_ms(),
                };
                self.dead_letter(letter, msg.reply.take(), reason);
                None
            }
        }
    }

    /// Queues `letter` for the writer if it fits the dead-letter queue's budget; otherwise drops
    /// it (counted) and answers the sender at once: the payload is invalid either way.
    fn dead_letter(&self, letter: DeadLetter, reply: Waiter, reason: String) {
        let cost = outpost_storage::dead_letter_accounted_size(&letter);
        let queue = &self.metrics.dead_letter_queue;
        let Some(permit) = queue.try_acquire(cost) else {
            if let Some(held_back) = DEAD_LETTER_DROPPED_LOG.allow() {
                warn!(topic = %letter.topic, bytes = cost, queued = queue.used(), limit = queue.limit(),
                    dropped_total = queue.refused(), held_back,
                    "dead letter dropped: storage.dead_letter_queue_bytes wait to be written (one line per 10 s)");
            }
            if let Some(reply) = reply {
                let _ = reply.send(Err(IngestRefusal::PayloadInvalid(reason)));
            }
            return;
        };
        let queued = QueuedLetter {
            letter,
            reply,
            reason,
            permit,
        };
        if let Err(mpsc::error::SendError(q)) = self.letters.send(queued) {
            // The writer is gone (only after a panic): the sender still learns why.
            if let Some(reply) = q.reply {
                let _ = reply.send(Err(IngestRefusal::PayloadInvalid(q.reason)));
            }
        }
    }
}

/// One priority class's share of a round: records, their waiters, what holds them in their
/// bounds, and CoAP readings to republish locally once committed.
#[derive(Default)]
struct Batch {
    records: Vec<NewRecord>,
    waiters: Vec<Waiter>,
    holds: Vec<Hold>,
    local: Vec<(String, Bytes)>,
}

/// Submits what the receiver admitted, in its order, grouped per priority class; a spawned
/// waiter per submission answers the publishers after the commit and releases their holds.
async fn submit_in_order(
    store: Store,
    mut handoff: mpsc::UnboundedReceiver<Admitted>,
    metrics: Arc<Metrics>,
    broker: BrokerHandle,
) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    let mut waiters = tokio::task::JoinSet::new();
    loop {
        buf.clear();
        if handoff.recv_many(&mut buf, MAX_BATCH).await == 0 {
            break;
        }
        let mut by_priority: [Batch; 3] = Default::default();
        for admitted in buf.drain(..) {
            let slot = &mut by_priority[admitted.record.priority.as_index()];
            if admitted.republish {
                slot.local.push((
                    admitted.record.stream.clone(),
                    admitted.record.payload.clone(),
                ));
            }
            slot.records.push(admitted.record);
            slot.waiters.push(admitted.reply);
            slot.holds.push(admitted.hold);
        }
        for priority in Priority::ALL {
            let Batch {
                records,
                waiters: replies,
                holds,
                local,
            } = std::mem::take(&mut by_priority[priority.as_index()]);
            if records.is_empty() {
                continue;
            }
            let count = records.len();
            let metrics = Arc::clone(&metrics);
            let broker = broker.clone();
            match store.submit(records).await {
                Ok(pending) => {
                    waiters.spawn(async move {
                        let result = pending.await.map(|_| ());
                        if result.is_ok() {
                            for (topic, payload) in local {
                                publish_locally(&broker, &topic, payload);
                            }
                        }
                        answer(&metrics, result, replies, count);
                        drop(holds);
                    });
                }
                Err(e) => answer(&metrics, Err(e), replies, count),
            }
        }
        // Reap finished waiters so the set stays small under sustained load.
        while waiters.try_join_next().is_some() {}
    }
    while waiters.join_next().await.is_some() {}
}

/// The one dead-letter writer: takes up to [`DEAD_LETTER_BATCH`] queued letters, writes them
/// together (enqueued at once, so they share the store's group commits), then answers their
/// senders and releases their bytes. Ends when the receiver is gone and the queue is empty.
async fn write_dead_letters(
    store: Store,
    mut letters: mpsc::UnboundedReceiver<QueuedLetter>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(DEAD_LETTER_BATCH);
    loop {
        batch.clear();
        if letters.recv_many(&mut batch, DEAD_LETTER_BATCH).await == 0 {
            break;
        }
        let mut rest = Vec::with_capacity(batch.len());
        let mut writes = Vec::with_capacity(batch.len());
        for q in batch.drain(..) {
            writes.push(store.dead_letter(q.letter));
            rest.push((q.reply, q.reason, q.permit));
        }
        let results = join_all(writes).await;
        for (result, (reply, reason, permit)) in results.into_iter().zip(rest) {
            if let Err(e) = result {
                inc(&metrics.dead_letter_failures);
                if let Some(held_back) = DEAD_LETTER_FAILED_LOG.allow() {
                    warn!(error = %e, held_back, "dead letter could not be stored (one line per 10 s)");
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(Err(IngestRefusal::PayloadInvalid(reason)));
            }
            drop(permit);
        }
    }
}

/// Drives every future to completion on the current task (no spawns) and returns their outputs
/// in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => done = false,
                }
            }
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().flatten().collect()
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
            if let Some(held_back) = STORE_REFUSED_LOG.allow() {
                warn!(error = %e, records = count, held_back,
                    "store refused readings; publishers are not acknowledged (one line per 10 s)");
            }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use outpost_config::{Config, Overrides};
    use outpost_protocols::Broker;

    use super::*;
    use crate::metrics::{ByteBudget, get};
    use crate::registry::Registry;

    /// A gateway's ingest around a real store in a temporary directory: every reading on
    /// `json/#` must be JSON; everything else is opaque.
    struct Rig {
        _dir: tempfile::TempDir,
        config: Config,
        store: Store,
        broker: BrokerHandle,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    }

    impl Rig {
        async fn new(qos0_inflight: u64, dead_letter_queue: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let text = format!(
                "[broker]\nlisteners = [\"127.0.0.1:0\"]\n[coap]\nlisteners = []\n\
                 [storage]\ndata_dir = {:?}\n[discovery]\nimplicit = false\n\
                 [[route]]\nfilter = \"json/#\"\nformat = \"json\"\n",
                dir.path().display().to_string()
            );
            let config = Config::load(
                Some(&text),
                &Overrides::default(),
                &BTreeMap::<String, String>::new(),
            )
            .unwrap();
            let store = Store::open_with(
                crate::app::store_settings(&config),
                outpost_storage::DeadLetterLimits {
                    max_records: config.storage.dead_letter_max_records,
                    max_bytes: config.storage.dead_letter_max_bytes,
                },
            )
            .unwrap();
            let broker = Broker::bind(crate::app::broker_settings(&config))
                .await
                .unwrap()
                .handle();
            let registry = Arc::new(
                Registry::load(crate::app::registry_settings(&config), &store)
                    .await
                    .unwrap(),
            );
            let metrics = Arc::new(Metrics::with_bounds(
                ByteBudget::new(qos0_inflight),
                ByteBudget::new(dead_letter_queue),
            ));
            Self {
                _dir: dir,
                config,
                store,
                broker,
                registry,
                metrics,
            }
        }

        fn ingest(&self, inbound: mpsc::Receiver<Inbound>) -> Ingest {
            Ingest::new(
                Arc::new(Router::new(&self.config)),
                self.store.clone(),
                inbound,
                Arc::clone(&self.metrics),
                self.broker.clone(),
                Arc::clone(&self.registry),
            )
        }

        /// Ingests `messages`, all queued before ingest starts (so one round sees them all,
        /// before any commit), and returns when ingest drained.
        async fn ingest_all(&self, messages: Vec<Inbound>) {
            let (tx, rx) = mpsc::channel(messages.len().max(1));
            for m in messages {
                tx.try_send(m).unwrap();
            }
            drop(tx);
            self.ingest(rx).run().await;
        }
    }

    fn message(topic: &str, payload: &'static [u8], qos: QoS, reply: Waiter) -> Inbound {
        Inbound {
            client_id: Arc::from("sensor-1"),
            topic: topic.to_owned(),
            payload: Bytes::from_static(payload),
            qos,
            retain: false,
            source: Source::Mqtt,
            content_format: None,
            reply,
        }
    }

    #[tokio::test]
    async fn qos0_beyond_the_inflight_budget_is_dropped_and_counted() {
        let one = outpost_storage::accounted_size("t/a", 10);
        let rig = Rig::new(10 * one, 1 << 20).await;
        let flood = (0..100)
            .map(|_| message("t/a", b"0123456789", QoS::AtMostOnce, None))
            .collect();
        rig.ingest_all(flood).await;
        let q = &rig.metrics.qos0_inflight;
        assert_eq!(q.refused(), 90, "what did not fit is dropped");
        assert_eq!(q.refused_bytes(), 90 * one);
        assert_eq!(q.used(), 0, "committed readings give their bytes back");
        let stats = rig.store.stats().await.unwrap();
        assert_eq!(stats.appended_total, 10, "what fitted is stored");
        assert_eq!(get(&rig.metrics.stored), 10);
    }

    #[tokio::test]
    async fn qos0_budget_is_free_again_once_readings_are_committed() {
        let one = outpost_storage::accounted_size("t/a", 10);
        let rig = Rig::new(10 * one, 1 << 20).await;
        for _ in 0..3 {
            let round = (0..10)
                .map(|_| message("t/a", b"0123456789", QoS::AtMostOnce, None))
                .collect();
            rig.ingest_all(round).await;
        }
        assert_eq!(rig.metrics.qos0_inflight.refused(), 0);
        assert_eq!(rig.store.stats().await.unwrap().appended_total, 30);
    }

    #[tokio::test]
    async fn qos1_is_never_dropped_by_the_qos0_budget() {
        let rig = Rig::new(1024, 1 << 20).await;
        let mut answers = Vec::new();
        let mut messages = Vec::new();
        for _ in 0..100 {
            let (tx, rx) = oneshot::channel();
            answers.push(rx);
            messages.push(message("t/a", &[b'x'; 600], QoS::AtLeastOnce, Some(tx)));
        }
        rig.ingest_all(messages).await;
        for rx in answers {
            assert!(matches!(rx.await, Ok(Ok(()))), "acknowledged once stored");
        }
        assert_eq!(rig.metrics.qos0_inflight.refused(), 0);
        assert_eq!(rig.store.stats().await.unwrap().appended_total, 100);
    }

    #[tokio::test]
    async fn dead_letters_beyond_the_queue_bound_are_dropped_counted_and_still_refused() {
        let letter = |n: usize| DeadLetter {
            topic: "json/a".into(),
            source: "mqtt:sensor-1".into(),
            reason: String::new(),
            content_format: None,
            payload: Bytes::from(vec![0; n]),
            at_ms: 0,
        };
        // Room for a few letters (their reason text adds a little to each).
        let at_least = outpost_storage::dead_letter_accounted_size(&letter(8));
        let bound = 3 * at_least + 300;
        let rig = Rig::new(1 << 20, bound).await;
        let mut answers = Vec::new();
        let mut messages = Vec::new();
        for _ in 0..50 {
            let (tx, rx) = oneshot::channel();
            answers.push(rx);
            messages.push(message("json/a", b"not json", QoS::AtLeastOnce, Some(tx)));
        }
        rig.ingest_all(messages).await;
        for rx in answers {
            assert!(
                matches!(rx.await, Ok(Err(IngestRefusal::PayloadInvalid(_)))),
                "every sender learns the payload is invalid, stored or dropped"
            );
        }
        let dropped = rig.metrics.dead_letter_queue.refused();
        let stats = rig.store.stats().await.unwrap();
        assert!(stats.dead_letters >= 1, "what fits is written");
        assert!(
            stats.dead_letters * at_least <= bound,
            "{} written: more than the queue holds",
            stats.dead_letters
        );
        assert_eq!(
            dropped + stats.dead_letters,
            50,
            "each one stored or dropped"
        );
        assert_eq!(get(&rig.metrics.dead_lettered), 50);
        assert_eq!(rig.metrics.dead_letter_queue.used(), 0);
        assert_eq!(stats.appended_total, 0, "never stored as readings");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_qos0_flood_of_invalid_payloads_stays_within_the_queue_bound_and_spawns_nothing() {
        let bound = 16 * 1024;
        let rig = Rig::new(1 << 20, bound).await;
        let (tx, rx) = mpsc::channel(8192);
        let ingest = tokio::spawn(rig.ingest(rx).run());
        let tasks_before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        let queue = Arc::clone(&rig.metrics.dead_letter_queue);
        let mut peak_tasks = 0;
        for i in 0..20_000 {
            tx.send(message("json/a", b"{\"t\": ", QoS::AtMostOnce, None))
                .await
                .unwrap();
            assert!(queue.used() <= bound);
            if i % 500 == 0 {
                peak_tasks = peak_tasks.max(
                    tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks(),
                );
            }
        }
        drop(tx);
        ingest.await.unwrap();
        let stats = rig.store.stats().await.unwrap();
        assert_eq!(
            queue.refused() + stats.dead_lettered_total,
            20_000,
            "each one written or dropped"
        );
        assert!(
            peak_tasks <= tasks_before + 4,
            "no task per invalid payload: {tasks_before} -> {peak_tasks}"
        );
        assert_eq!(queue.used(), 0);
    }

    #[tokio::test]
    async fn readings_reach_the_store_in_arrival_order_whatever_their_qos() {
        const PAYLOADS: [&[u8]; 6] = [b"0", b"1", b"2", b"3", b"4", b"5"];
        let rig = Rig::new(1 << 20, 1 << 20).await;
        let mut answers = Vec::new();
        let messages = PAYLOADS
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i % 2 == 0 {
                    message("t/a", p, QoS::AtMostOnce, None)
                } else {
                    let (tx, rx) = oneshot::channel();
                    answers.push(rx);
                    message("t/a", p, QoS::AtLeastOnce, Some(tx))
                }
            })
            .collect();
        rig.ingest_all(messages).await;
        for rx in answers {
            assert!(matches!(rx.await, Ok(Ok(()))));
        }
        let stored: Vec<Bytes> = rig
            .store
            .read_after(Priority::Normal, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(stored, PAYLOADS.map(Bytes::from_static));
    }

    #[tokio::test]
    async fn join_all_returns_outputs_in_order() {
        let futures: Vec<_> = (0..5u64)
            .map(|i| async move {
                tokio::time::sleep(std::time::Duration::from_millis(5 * (5 - i))).await;
                i
            })
            .collect();
        assert_eq!(join_all(futures).await, [0, 1, 2, 3, 4]);
    }
}
