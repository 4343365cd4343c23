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

use std::sync::Arc;

use bytes::Bytes;
use outpost_protocols::{Inbound, IngestRefusal, IngestReply};
use outpost_storage::{NewRecord, Priority, Store, StoreError};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::metrics::{Metrics, inc, now_ms};
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
}

/// A publisher waiting for its message to be committed (None for QoS 0 and wills).
type Waiter = Option<oneshot::Sender<IngestReply>>;

impl Ingest {
    pub fn new(
        router: Arc<Router>,
        store: Store,
        inbound: mpsc::Receiver<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            router,
            store,
            inbound,
            metrics,
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
            let mut by_priority: [(Vec<NewRecord>, Vec<Waiter>); 3] = Default::default();
            let ingested_at_ms = now_ms();
            for msg in buf.drain(..) {
                inc(&self.metrics.ingested);
                match self.router.decide(&msg.topic) {
                    Decision::Local => {
                        inc(&self.metrics.ingested_local_only);
                        if let Some(reply) = msg.reply {
                            // The publisher may have gone away; nothing to do then.
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Decision::Cloud { priority } => {
                        let slot = &mut by_priority[priority.as_index()];
                        slot.0.push(NewRecord {
                            stream: msg.topic,
                            priority,
                            payload: Bytes::clone(&msg.payload),
                            ingested_at_ms,
                        });
                        slot.1.push(msg.reply);
                    }
                }
            }
            for priority in Priority::ALL {
                let (records, replies) = std::mem::take(&mut by_priority[priority.as_index()]);
                if records.is_empty() {
                    continue;
                }
                let count = records.len();
                let metrics = Arc::clone(&self.metrics);
                match self.store.submit(records).await {
                    Ok(pending) => {
                        waiters.spawn(async move {
                            let result = pending.await;
                            answer(&metrics, result.map(|_| ()), replies, count);
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
