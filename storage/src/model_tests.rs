//! Model-based property test: random operations run against the real store and against a plain
//! in-memory model of the documented semantics (seq assignment, quota policy, all-or-nothing
//! calls, acks, counters), compared after every step. The quota is small so eviction and refusals
//! happen often; reopening checks that everything, counters included, survives a restart.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use crate::{
    Durability, NewRecord, Priority, Record, Store, StoreError, StoreSettings, WhenFull,
    accounted_size,
};

const QUOTA: u64 = 1500;

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
    Reopen,
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
        1 => Just(Op::Reopen),
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
    /// Distinct ingest times make `oldest_ingested_at_ms` unambiguous.
    clock_ms: u64,
}

#[derive(Debug, PartialEq)]
enum Refusal {
    Full,
    TooLarge,
}

fn size_of(r: &Record) -> u64 {
    accounted_size(&r.stream, r.payload.len())
}

impl Model {
    fn count(&self, p: Priority) -> u64 {
        self.records.values().filter(|r| r.priority == p).count() as u64
    }

    fn append(&mut self, when_full: WhenFull, new: &[NewRecord]) -> Result<Vec<u64>, Refusal> {
        let n = new.len() as u64;
        if new
            .iter()
            .any(|r| accounted_size(&r.stream, r.payload.len()) > QUOTA)
        {
            self.rejected_full_total += n;
            return Err(Refusal::TooLarge);
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
                    return Err(Refusal::Full);
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
    prop_assert!(!stats.poisoned);
    Ok(())
}

async fn run(ops: Vec<Op>, when_full: WhenFull) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path().join("model.db"), when_full);
    let mut store = Store::open(s.clone()).unwrap();
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
                let expected = model.append(when_full, &records);
                let got = store.append(records).await;
                match (&expected, &got) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                    (Err(Refusal::Full), Err(StoreError::Full { .. })) => {}
                    (Err(Refusal::TooLarge), Err(StoreError::TooLarge { .. })) => {}
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
                let expected = model.ack(&seqs);
                prop_assert_eq!(store.ack(seqs).await.unwrap(), expected);
            }
            Op::Reopen => {
                if model.last_seq % 2 == 0 {
                    store.close().await.unwrap();
                } else {
                    drop(store);
                }
                store = Store::open(s.clone()).unwrap();
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
