//! Keeps the broker's persistent sessions and retained messages in the store's `state` table.
//!
//! The broker sends its changes in order over an unbounded channel ([`StateBatch`]); this
//! task hands them to the store's writer in that same order (so they are applied in order,
//! group-committed with readings), gathering whatever has queued up into one submission, and
//! answers each batch's waiter once its transaction committed.

use outpost_protocols::Broker;
use outpost_protocols::broker::{RestoreReport, STATE_PREFIX, StateBatch, StateChange, StateSink};
use outpost_storage::{StateOp, Store, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Batches gathered into one store submission at most.
const GATHER_MAX: usize = 65_536;

/// Reads what the store kept for the broker, gives it back to the broker, and returns the
/// receiving end for [`run`].
pub async fn restore(
    broker: &Broker,
    store: &Store,
) -> Result<(RestoreReport, mpsc::UnboundedReceiver<StateBatch>), StoreError> {
    let entries = store.states_with_prefix(STATE_PREFIX).await?;
    let (tx, rx): (StateSink, _) = mpsc::unbounded_channel();
    Ok((broker.restore(tx, entries), rx))
}

fn op(change: StateChange) -> StateOp {
    match change {
        StateChange::Put { key, value } => StateOp::Put {
            key: key.into(),
            value: value.into(),
        },
        StateChange::Delete { key } => StateOp::Delete { key: key.into() },
    }
}

/// Applies the broker's changes until `stop`, then applies whatever is still queued (the
/// broker has stopped by then) and returns.
pub async fn run(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<StateBatch>,
    stop: CancellationToken,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            match rx.try_recv() {
                Ok(b) => b,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => b,
                    None => return,
                },
                () = stop.cancelled() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let mut ops = Vec::new();
        let mut waiters = Vec::new();
        let mut take = |b: StateBatch| {
            ops.extend(b.changes.into_iter().map(op));
            waiters.extend(b.committed);
        };
        take(first);
        for _ in 1..GATHER_MAX {
            match rx.try_recv() {
                Ok(b) => take(b),
                Err(_) => break,
            }
        }
        let committed = match store.submit_states(ops).await {
            Ok(committed) => committed,
            Err(e) => {
                answer(waiters, Err(e));
                continue;
            }
        };
        // Waiting here keeps one submission in flight at a time; later batches gather
        // meanwhile and go in the next, so the store sees them in order.
        answer(waiters, committed.await);
    }
}

fn answer(
    waiters: Vec<tokio::sync::oneshot::Sender<Result<(), String>>>,
    result: Result<(), StoreError>,
) {
    if let Err(e) = &result {
        tracing::error!(error = %e, "MQTT session state not written to the store");
    }
    for w in waiters {
        let _ = w.send(result.as_ref().map(|_| ()).map_err(ToString::to_string));
    }
}
