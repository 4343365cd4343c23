//! The sync core against a model: random interleavings of appends, sends, PUBACKs (in and out
//! of order, with failure codes), retransmissions, disconnects, failed connects, evictions and
//! restarts, with a model of the store and of the client (a FIFO of handed-over publishes and a
//! map of packet ids on the wire, reused as rumqttc reuses them).
//!
//! Invariants:
//! - a record leaves the store only after a successful PUBACK for the packet id that carried
//!   *that* record, or an explicit refusal whose reason holds (too large for the limit in force,
//!   a permanent failure code, the head of repeated broken connections);
//! - a PUBACK for a birth deletes nothing;
//! - within one connection and priority class, records are offered in increasing seq order and
//!   none present in the store is skipped;
//! - after the run, one connection to a healthy broker drains everything: every record ever
//!   appended was delivered, refused or evicted, none twice deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use outpost_protocols::upstream::{PubAckCode, UpstreamError, UpstreamErrorKind};
use outpost_storage::Priority;
use proptest::prelude::*;

use super::core::{
    AckOutcome, ConnState, CoreSettings, Next, ProtocolChoice, Ready, Refusal, SentOutcome,
    SyncCore, SyncError,
};

#[derive(Debug, Clone)]
enum Op {
    Append {
        prio: usize,
        size: usize,
    },
    Connect {
        session_present: bool,
        announced: Option<u32>,
    },
    ConnectFail {
        rejected: bool,
    },
    Pump,
    Wire,
    Retransmit,
    Ack {
        pick: usize,
        code: u8,
    },
    Disconnect,
    Evict {
        pick: usize,
    },
    Tick {
        ms: u64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, prop_oneof![1usize..200, 900usize..1100]).prop_map(|(prio, size)| Op::Append { prio, size }),
        1 => (any::<bool>(), prop_oneof![Just(None), (500u32..2000).prop_map(Some)]).prop_map(|(session_present, announced)| Op::Connect { session_present, announced }),
        1 => any::<bool>().prop_map(|rejected| Op::ConnectFail { rejected }),
        4 => Just(Op::Pump),
        5 => Just(Op::Wire),
        1 => Just(Op::Retransmit),
        5 => (any::<usize>(), 0u8..20).prop_map(|(pick, code)| Op::Ack { pick, code }),
        1 => Just(Op::Disconnect),
        1 => any::<usize>().prop_map(|pick| Op::Evict { pick }),
        1 => (0u64..3000).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Restart),
    ]
}

fn code_of(n: u8) -> PubAckCode {
    match n {
        0..=11 => PubAckCode::Success,
        12 => PubAckCode::NoMatchingSubscribers,
        13 => PubAckCode::NotAuthorized,
        14 => PubAckCode::QuotaExceeded,
        15 => PubAckCode::PayloadFormatInvalid,
        16 => PubAckCode::ServerBusy,
        17 => PubAckCode::TopicNameInvalid,
        18 => PubAckCode::PacketIdentifierInUse,
        _ => PubAckCode::UnspecifiedError,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Birth,
    Record(u64),
}

struct Model {
    core: SyncCore<u64>,
    settings: CoreSettings,
    now: Instant,
    next_seq: u64,
    /// seq -> (priority index, wire size)
    store: BTreeMap<u64, (usize, usize)>,
    delivered: BTreeSet<u64>,
    refused: BTreeSet<u64>,
    evicted: BTreeSet<u64>,
    /// Handed to the client, not on the wire yet.
    queue: VecDeque<Item>,
    /// On the wire, by packet id.
    wire: HashMap<u16, Item>,
    /// Records sent on this connection, for poison checks.
    sent_this_conn: BTreeSet<u64>,
    /// Last seq offered per priority on this connection.
    last_offered: [u64; 3],
    limit: u32,
}

impl Model {
    fn new() -> Self {
        let settings = CoreSettings {
            window: 6,
            read_batch: 3,
            max_packet_size: 1000,
            protocol: ProtocolChoice::Auto,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            stable_after: Duration::from_secs(10),
        };
        Model {
            core: SyncCore::new(settings.clone()),
            settings,
            now: Instant::now(),
            next_seq: 1,
            store: BTreeMap::new(),
            delivered: BTreeSet::new(),
            refused: BTreeSet::new(),
            evicted: BTreeSet::new(),
            queue: VecDeque::new(),
            wire: HashMap::new(),
            sent_this_conn: BTreeSet::new(),
            last_offered: [0; 3],
            limit: 1000,
        }
    }

    fn connected(&self) -> bool {
        matches!(self.core.state(), ConnState::Connected { .. })
    }

    fn drop_connection(&mut self) {
        self.queue.clear();
        self.wire.clear();
        self.sent_this_conn.clear();
        self.last_offered = [0; 3];
    }

    fn refuse(&mut self, seq: u64, reason: &Refusal) {
        match reason {
            Refusal::PacketTooLarge { size, max } => {
                assert!(
                    *size > *max as usize,
                    "refused as too large but {size} <= {max}"
                );
                assert_eq!(*max, self.limit);
                if let Some((_, s)) = self.store.get(&seq) {
                    assert_eq!(s, size);
                }
            }
            Refusal::Broker(code) => {
                assert!(!code.is_success() && !super::core::is_transient(*code))
            }
            Refusal::ConnectionClosedOnPublish { .. } => {
                assert!(
                    self.sent_this_conn.contains(&seq),
                    "poisoned {seq} was not sent on the lost connection"
                );
            }
            Refusal::Unencodable(_) => panic!("the model never refuses to encode"),
        }
        if self.store.remove(&seq).is_some() {
            self.refused.insert(seq);
        }
    }

    fn pump(&mut self) {
        for _ in 0..100 {
            let Some(next) = self.core.poll_send(self.now) else {
                return;
            };
            match next {
                Next::Birth => self.queue.push_back(Item::Birth),
                Next::Read {
                    priority,
                    after,
                    limit,
                } => {
                    let i = priority.as_index();
                    let recs: Vec<Ready<u64>> = self
                        .store
                        .range(after + 1..)
                        .filter(|(_, (p, _))| *p == i)
                        .take(limit)
                        .map(|(&seq, &(_, size))| Ready {
                            seq,
                            wire_size: size,
                            item: seq,
                        })
                        .collect();
                    let full = recs.len() >= limit;
                    self.core.on_records(priority, recs, full);
                }
                Next::Refuse { seq, reason } => self.refuse(seq, &reason),
                Next::Publish { seq, item } => {
                    assert_eq!(seq, item);
                    if let Some((p, _)) = self.store.get(&seq) {
                        // In order within a class, nothing present skipped (retries excepted).
                        let p = *p;
                        if seq > self.last_offered[p] {
                            let skipped: Vec<u64> = self
                                .store
                                .range(self.last_offered[p] + 1..seq)
                                .filter(|(s, (q, _))| *q == p && !self.sent_this_conn.contains(s))
                                .map(|(s, _)| *s)
                                .collect();
                            assert!(skipped.is_empty(), "offered {seq} but skipped {skipped:?}");
                            self.last_offered[p] = seq;
                        }
                    }
                    self.queue.push_back(Item::Record(seq));
                }
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append { prio, size } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.store.insert(seq, (prio, size));
                self.core.on_committed();
            }
            Op::Connect {
                session_present,
                announced,
            } => {
                if self.connected() {
                    return;
                }
                self.drop_connection();
                self.core.begin_connect();
                self.core.on_connack(session_present, announced, self.now);
                self.limit = announced
                    .unwrap_or(u32::MAX)
                    .min(self.settings.max_packet_size);
            }
            Op::ConnectFail { rejected } => {
                if self.connected() {
                    return;
                }
                let version = self.core.begin_connect();
                let kind = if rejected {
                    UpstreamErrorKind::ProtocolRejected
                } else {
                    UpstreamErrorKind::Unreachable
                };
                let lost = self.core.on_connection_lost(
                    &SyncError::Connect {
                        version,
                        source: UpstreamError {
                            kind,
                            detail: String::new(),
                        },
                    },
                    self.now,
                );
                assert!(lost.poison.is_none());
            }
            Op::Pump => self.pump(),
            Op::Wire => {
                let Some(item) = self.queue.pop_front() else {
                    return;
                };
                let pkid = (1..=u16::MAX)
                    .find(|id| !self.wire.contains_key(id))
                    .unwrap_or(1);
                assert_eq!(self.core.on_sent(pkid, self.now), SentOutcome::Mapped);
                if let Item::Record(seq) = item {
                    self.sent_this_conn.insert(seq);
                }
                self.wire.insert(pkid, item);
            }
            Op::Retransmit => {
                if let Some(&pkid) = self.wire.keys().min() {
                    assert_eq!(
                        self.core.on_sent(pkid, self.now),
                        SentOutcome::Retransmission
                    );
                }
            }
            Op::Ack { pick, code } => {
                if self.wire.is_empty() {
                    return;
                }
                let mut ids: Vec<u16> = self.wire.keys().copied().collect();
                ids.sort_unstable();
                let pkid = ids[pick % ids.len()];
                let Some(item) = self.wire.remove(&pkid) else {
                    return;
                };
                let code = code_of(code);
                match self.core.on_puback(pkid, code, self.now) {
                    AckOutcome::Delete { seq, .. } => {
                        assert!(code.is_success());
                        assert_eq!(
                            item,
                            Item::Record(seq),
                            "PUBACK {pkid} deleted {seq} but carried {item:?}"
                        );
                        assert!(!self.delivered.contains(&seq) || !self.store.contains_key(&seq));
                        if self.store.remove(&seq).is_some() {
                            self.delivered.insert(seq);
                        }
                    }
                    AckOutcome::Lifecycle { .. } => assert_eq!(item, Item::Birth),
                    AckOutcome::Refuse { seq, reason } => {
                        assert_eq!(item, Item::Record(seq));
                        self.refuse(seq, &reason);
                    }
                    AckOutcome::Retry { seq, .. } => {
                        assert_eq!(item, Item::Record(seq));
                        assert!(super::core::is_transient(code));
                    }
                    AckOutcome::Unknown => panic!("PUBACK for {pkid} on the wire was unknown"),
                }
            }
            Op::Disconnect => {
                if !self.connected() {
                    return;
                }
                let lost = self.core.on_connection_lost(
                    &SyncError::Lost(UpstreamError {
                        kind: UpstreamErrorKind::Lost,
                        detail: String::new(),
                    }),
                    self.now,
                );
                if let Some((seq, reason)) = lost.poison {
                    self.refuse(seq, &reason);
                }
                self.drop_connection();
            }
            Op::Evict { pick } => {
                if self.store.is_empty() {
                    return;
                }
                let keys: Vec<u64> = self.store.keys().copied().collect();
                let seq = keys[pick % keys.len()];
                self.store.remove(&seq);
                self.evicted.insert(seq);
            }
            Op::Tick { ms } => self.now += Duration::from_millis(ms),
            Op::Restart => {
                self.core = SyncCore::new(self.settings.clone());
                self.drop_connection();
            }
        }
    }

    /// A healthy broker: connect and ack everything until nothing is left.
    fn drain(&mut self) {
        if self.connected() {
            self.apply(Op::Disconnect);
        }
        self.apply(Op::Connect {
            session_present: false,
            announced: None,
        });
        for _ in 0..100_000 {
            self.now += Duration::from_secs(60);
            self.pump();
            if self.queue.is_empty() && self.wire.is_empty() {
                break;
            }
            while !self.queue.is_empty() {
                self.apply(Op::Wire);
            }
            while !self.wire.is_empty() {
                self.apply(Op::Ack { pick: 0, code: 0 });
            }
        }
        assert!(
            self.store.is_empty(),
            "left after a healthy drain: {:?}",
            self.store
        );
        for seq in 1..self.next_seq {
            let places = [&self.delivered, &self.refused, &self.evicted]
                .iter()
                .filter(|set| set.contains(&seq))
                .count();
            assert_eq!(
                places, 1,
                "seq {seq} is in {places} of delivered/refused/evicted"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn sync_core_keeps_the_store_invariants(ops in proptest::collection::vec(op(), 1..200)) {
        let mut m = Model::new();
        for op in ops {
            m.apply(op);
        }
        m.drain();
    }
}

#[test]
fn priorities_are_read_highest_first() {
    // A fixed sanity case next to the random ones.
    let mut m = Model::new();
    m.apply(Op::Append { prio: 2, size: 10 });
    m.apply(Op::Append { prio: 0, size: 10 });
    m.apply(Op::Connect {
        session_present: false,
        announced: None,
    });
    m.pump();
    assert_eq!(
        m.queue.iter().copied().collect::<Vec<_>>(),
        vec![Item::Birth, Item::Record(2), Item::Record(1)]
    );
    let _ = Priority::ALL;
    m.drain();
}
