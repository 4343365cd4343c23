//! Model-based property test: random operations run against the real store and against a plain
//! in-memory model of the documented semantics (seq assignment, quota policy, all-or-nothing
//! calls, acks, the refused table with its bound and requeue, counters), compared after every
//! step. The quota and the refused bound are small so eviction, refusals and requeues that do
//! not fit happen often; reopening checks that everything, counters included, survives a
//! restart. Injected commit failures check that a failed batch changes nothing, that a failing
//! store refuses new data but attempts acks and refusals, and that the first of those that
//! commits heals it (the writer's own timed retry is switched off here to keep it
//! deterministic).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use crate::tests::{NO_RETRY, open_retrying};
use crate::{
    Durability, NewRecord, Priority, Record, Refusal, RefusedLimits, RefusedRecord, Store,
    StoreError, StoreSettings, WhenFull, accounted_size, refused_accounted_size,
};

const QUOTA: u64 = 1500;
/// Small enough that refusals evict often (the byte bound is far above what fits in QUOTA).
const REFUSED_MAX_RECORDS: u64 = 4;

#[derive(Debug, Clone)]
enum Op {
    /// (priority index, accounted size) per record of one call.
    Append(Vec<(usize, u64)>),
    Read {
        priority: usize,
        after_seq: u64,
        limit: usize,
    },
    /// Raw numbers, mapped onto the range of seqs handed out so far (plus unknown ones).
    Ack(Vec<u64>),
    /// Raw numbers as for `Ack`, each with the length of its reason.
    Refuse(Vec<(u64, usize)>),
    /// Raw numbers as for `Ack`.
    Requeue(Vec<u64>),
    Reopen,
    /// The next commit fails.
    FailNextCommit,
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        20 => 65u64..500,
        1 => (QUOTA - 100)..(QUOTA + 100),
    ];
    prop_oneof![
        5 => prop::collection::vec((0usize..3, size), 1..4).prop_map(Op::Append),
        2 => (0usize..3, 0u64..60, 1usize..8).prop_map(|(priority, after_seq, limit)| Op::Read {
            priority,
            after_seq,
            limit
        }),
        3 => prop::collection::vec(any::<u64>(), 1..6).prop_map(Op::Ack),
        2 => prop::collection::vec((any::<u64>(), 0usize..40), 1..4).prop_map(Op::Refuse),
        2 => prop::collection::vec(any::<u64>(), 1..5).prop_map(Op::Requeue),
        1 => Just(Op::Reopen),
        1 => Just(Op::FailNextCommit),
    ]
}

#[derive(Debug, Clone, Default)]
struct Model {
    records: BTreeMap<u64, Record>,
    bytes: u64,
    last_seq: u64,
    appended_total: u64,
    acked_total: u64,
    evicted_total: u64,
    evicted_by_priority: [u64; 3],
    rejected_full_total: u64,
    /// Refused records in refusal order (oldest first).
    refused: Vec<RefusedRecord>,
    refused_total: u64,
    refused_evicted_total: u64,
    requeued_total: u64,
    /// Distinct ingest times make `oldest_ingested_at_ms` unambiguous.
    clock_ms: u64,
    /// A commit failure is injected and not yet used by a commit.
    fail_pending: bool,
    /// The store is failing: new data is refused.
    failing: bool,
    /// Since the last (re)open, like the store's.
    commit_failures_total: u64,
    recoveries_total: u64,
}

/// What happens to a write, by the health rules alone.
#[derive(Debug, PartialEq)]
enum Gate {
    /// Refused untried: `Poisoned`.
    Refused,
    /// Tried, and the commit failed: `CommitFailed`, nothing changed.
    Failed,
    /// Tried and committed: the usual outcome.
    Committed,
}

#[derive(Debug, PartialEq)]
enum Rejection {
    Full,
    TooLarge,
}

impl Model {
    /// A write is about to reach the store; `adds_data` for appends and requeues.
    fn gate(&mut self, adds_data: bool) -> Gate {
        if self.failing && adds_data {
            return Gate::Refused;
        }
        if self.fail_pending {
            self.fail_pending = false;
            self.failing = true;
            self.commit_failures_total += 1;
            return Gate::Failed;
        }
        if self.failing {
            self.failing = false;
            self.recoveries_total += 1;
        }
        Gate::Committed
    }
}

/// The store's answer fits a gate that did not commit.
fn gated<T: std::fmt::Debug>(
    gate: &Gate,
    got: &Result<T, StoreError>,
) -> Result<(), TestCaseError> {
    match (gate, got) {
        (Gate::Refused, Err(StoreError::Poisoned))
        | (Gate::Failed, Err(StoreError::CommitFailed(_))) => Ok(()),
        _ => Err(TestCaseError::fail(format!(
            "gate {gate:?} vs store {got:?}"
        ))),
    }
}

fn size_of(r: &Record) -> u64 {
    accounted_size(&r.stream, r.payload.len())
}

fn refused_size_of(r: &RefusedRecord) -> u64 {
    refused_accounted_size(&r.record.stream, r.record.payload.len(), &r.reason)
}

impl Model {
    fn count(&self, p: Priority) -> u64 {
        self.records.values().filter(|r| r.priority == p).count() as u64
    }

    fn append(&mut self, when_full: WhenFull, new: &[NewRecord]) -> Result<Vec<u64>, Rejection> {
        let n = new.len() as u64;
        if new
            .iter()
            .any(|r| accounted_size(&r.stream, r.payload.len()) > QUOTA)
        {
            self.rejected_full_total += n;
            return Err(Rejection::TooLarge);
        }
        let before = self.clone();
        let mut seqs = Vec::new();
        for r in new {
            let size = accounted_size(&r.stream, r.payload.len());
            while self.bytes + size > QUOTA {
                let victim = match when_full {
                    WhenFull::RejectNew => None,
                    WhenFull::EvictLowestOldest => Priority::ALL
                        .iter()
                        .rev()
                        .filter(|v| v.as_index() >= r.priority.as_index())
                        .find_map(|&v| {
                            self.records
                                .values()
                                .find(|rec| rec.priority == v)
                                .map(|rec| rec.seq)
                        }),
                };
                let Some(victim) = victim else {
                    *self = before;
                    self.rejected_full_total += n;
                    return Err(Rejection::Full);
                };
                let gone = self.records.remove(&victim).unwrap();
                self.bytes -= size_of(&gone);
                self.evicted_total += 1;
                self.evicted_by_priority[gone.priority.as_index()] += 1;
            }
            self.last_seq += 1;
            let record = Record {
                seq: self.last_seq,
                stream: r.stream.clone(),
                priority: r.priority,
                payload: r.payload.clone(),
                ingested_at_ms: r.ingested_at_ms,
            };
            self.bytes += size;
            self.appended_total += 1;
            self.records.insert(record.seq, record);
            seqs.push(self.last_seq);
        }
        Ok(seqs)
    }

    fn ack(&mut self, seqs: &[u64]) -> u64 {
        let mut existed = 0;
        for seq in seqs {
            if let Some(r) = self.records.remove(seq) {
                self.bytes -= size_of(&r);
                self.acked_total += 1;
                existed += 1;
            }
        }
        existed
    }

    fn refuse(&mut self, refusals: &[Refusal]) -> u64 {
        let mut moved = 0;
        for refusal in refusals {
            if let Some(record) = self.records.remove(&refusal.seq) {
                self.bytes -= size_of(&record);
                self.refused.push(RefusedRecord {
                    record,
                    reason: refusal.reason.clone(),
                    refused_at_ms: refusal.at_ms,
                });
                self.refused_total += 1;
                moved += 1;
            }
        }
        while self.refused.len() as u64 > REFUSED_MAX_RECORDS {
            self.refused.remove(0);
            self.refused_evicted_total += 1;
        }
        moved
    }

    /// All or nothing, never evicting: `None` when the records do not fit.
    fn requeue(&mut self, seqs: &[u64]) -> Option<u64> {
        let wanted: BTreeSet<u64> = seqs.iter().copied().collect();
        let needed: u64 = self
            .refused
            .iter()
            .filter(|r| wanted.contains(&r.record.seq))
            .map(|r| size_of(&r.record))
            .sum();
        if self.bytes + needed > QUOTA {
            return None;
        }
        let (back, kept): (Vec<RefusedRecord>, Vec<RefusedRecord>) =
            std::mem::take(&mut self.refused)
                .into_iter()
                .partition(|r| wanted.contains(&r.record.seq));
        self.refused = kept;
        for r in &back {
            self.bytes += size_of(&r.record);
            self.records.insert(r.record.seq, r.record.clone());
        }
        self.requeued_total += back.len() as u64;
        Some(back.len() as u64)
    }

    fn read(&self, p: Priority, after_seq: u64, limit: usize) -> Vec<Record> {
        self.records
            .range(after_seq + 1..)
            .map(|(_, r)| r)
            .filter(|r| r.priority == p)
            .take(limit)
            .cloned()
            .collect()
    }
}

fn settings(path: std::path::PathBuf, when_full: WhenFull) -> StoreSettings {
    StoreSettings {
        path,
        quota_bytes: QUOTA,
        ttl: None,
        when_full,
        batch_max_records: 64,
        batch_max_delay: Duration::ZERO,
        durability: Durability::Normal,
        refused: RefusedLimits {
            max_records: REFUSED_MAX_RECORDS,
            ..RefusedLimits::default()
        },
    }
}

async fn check(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    for p in Priority::ALL {
        let stored = store.read_after(p, 0, usize::MAX).await.unwrap();
        prop_assert_eq!(stored, model.read(p, 0, usize::MAX), "contents of {:?}", p);
    }
    let stats = store.stats().await.unwrap();
    prop_assert_eq!(stats.records, model.records.len() as u64);
    prop_assert_eq!(stats.bytes, model.bytes);
    prop_assert!(stats.bytes <= QUOTA);
    prop_assert_eq!(
        stats.records_by_priority,
        Priority::ALL.map(|p| model.count(p))
    );
    prop_assert_eq!(
        stats.oldest_ingested_at_ms,
        model.records.values().map(|r| r.ingested_at_ms).min()
    );
    prop_assert_eq!(stats.last_seq, model.last_seq);
    prop_assert_eq!(stats.appended_total, model.appended_total);
    prop_assert_eq!(stats.acked_total, model.acked_total);
    prop_assert_eq!(stats.evicted_total, model.evicted_total);
    prop_assert_eq!(stats.evicted_by_priority, model.evicted_by_priority);
    prop_assert_eq!(stats.rejected_full_total, model.rejected_full_total);
    prop_assert_eq!(stats.expired_total, 0);
    prop_assert_eq!(stats.poisoned, model.failing);
    prop_assert_eq!(stats.health.is_healthy(), !model.failing);
    prop_assert_eq!(stats.commit_failures_total, model.commit_failures_total);
    prop_assert_eq!(stats.recoveries_total, model.recoveries_total);
    let refused: Vec<RefusedRecord> = model.refused.iter().rev().cloned().collect();
    prop_assert_eq!(&store.refused(usize::MAX).await.unwrap(), &refused);
    prop_assert_eq!(stats.refused_records, refused.len() as u64);
    prop_assert_eq!(
        stats.refused_bytes,
        refused.iter().map(refused_size_of).sum::<u64>()
    );
    prop_assert_eq!(stats.refused_total, model.refused_total);
    prop_assert_eq!(stats.refused_evicted_total, model.refused_evicted_total);
    prop_assert_eq!(stats.requeued_total, model.requeued_total);
    Ok(())
}

async fn run(ops: Vec<Op>, when_full: WhenFull) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path().join("model.db"), when_full);
    let open = || open_retrying(s.clone(), NO_RETRY, NO_RETRY);
    let mut store = open();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(spec) => {
                let records: Vec<NewRecord> = spec
                    .iter()
                    .map(|&(p, size)| {
                        model.clock_ms += 1;
                        NewRecord {
                            stream: "t".into(),
                            priority: Priority::from_index(p).unwrap(),
                            payload: Bytes::from(vec![model.clock_ms as u8; (size - 65) as usize]),
                            ingested_at_ms: model.clock_ms,
                        }
                    })
                    .collect();
                let gate = model.gate(true);
                if gate != Gate::Committed {
                    gated(&gate, &store.append(records).await)?;
                    check(&store, &model).await?;
                    continue;
                }
                let expected = model.append(when_full, &records);
                let got = store.append(records).await;
                match (&expected, &got) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                    (Err(Rejection::Full), Err(StoreError::Full { .. })) => {}
                    (Err(Rejection::TooLarge), Err(StoreError::TooLarge { .. })) => {}
                    _ => prop_assert!(false, "model {:?} vs store {:?}", expected, got),
                }
            }
            Op::Read {
                priority,
                after_seq,
                limit,
            } => {
                let p = Priority::from_index(priority).unwrap();
                let got = store.read_after(p, after_seq, limit).await.unwrap();
                prop_assert_eq!(got, model.read(p, after_seq, limit));
            }
            Op::Ack(raw) => {
                let seqs: Vec<u64> = raw.iter().map(|r| r % (model.last_seq + 3)).collect();
                let gate = model.gate(false);
                if gate != Gate::Committed {
                    gated(&gate, &store.ack(seqs).await)?;
                    check(&store, &model).await?;
                    continue;
                }
                let expected = model.ack(&seqs);
                prop_assert_eq!(store.ack(seqs).await.unwrap(), expected);
            }
            Op::Refuse(raw) => {
                let refusals: Vec<Refusal> = raw
                    .iter()
                    .map(|&(r, reason_len)| {
                        model.clock_ms += 1;
                        Refusal {
                            seq: r % (model.last_seq + 3),
                            reason: "r".repeat(reason_len),
                            at_ms: model.clock_ms,
                        }
                    })
                    .collect();
                let gate = model.gate(false);
                if gate != Gate::Committed {
                    gated(&gate, &store.refuse(refusals).await)?;
                    check(&store, &model).await?;
                    continue;
                }
                let expected = model.refuse(&refusals);
                prop_assert_eq!(store.refuse(refusals).await.unwrap(), expected);
            }
            Op::Requeue(raw) => {
                let seqs: Vec<u64> = raw.iter().map(|r| r % (model.last_seq + 3)).collect();
                let gate = model.gate(true);
                if gate != Gate::Committed {
                    gated(&gate, &store.requeue_refused(seqs).await)?;
                    check(&store, &model).await?;
                    continue;
                }
                let expected = model.requeue(&seqs);
                let got = store.requeue_refused(seqs).await;
                match (expected, &got) {
                    (Some(a), Ok(b)) => prop_assert_eq!(a, *b),
                    (None, Err(StoreError::Full { .. })) => {}
                    _ => prop_assert!(false, "model {:?} vs store {:?}", expected, got),
                }
            }
            Op::Reopen => {
                if model.last_seq % 2 == 0 {
                    store.close().await.unwrap();
                } else {
                    drop(store);
                }
                store = open();
                model.fail_pending = false;
                model.failing = false;
                model.commit_failures_total = 0;
                model.recoveries_total = 0;
            }
            Op::FailNextCommit => {
                store.fail_next_commit();
                model.fail_pending = true;
            }
        }
        check(&store, &model).await?;
    }
    store.close().await.unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(
        ops in prop::collection::vec(op(), 1..40),
        evict in any::<bool>(),
    ) {
        let when_full = if evict { WhenFull::EvictLowestOldest } else { WhenFull::RejectNew };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops, when_full))?;
    }
}
