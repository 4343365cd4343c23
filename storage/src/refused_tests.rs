//! The refused table: records the upstream refused for good, moved out of the send path, kept
//! whole within their own bounds, listable and re-queueable. Real SQLite files in tempdirs.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::TestClock;
use crate::tests::{
    NO_RETRY, V1_SCHEMA, letter, now_ms, open_at, open_retrying, rec, seqs_of, settings,
};
use crate::{
    NewRecord, Priority, REFUSED_MIN_BYTES, Record, Refusal, RefusedLimits, RefusedRecord, Store,
    StoreError, StoreSettings, accounted_size, read_dead_letters, read_refused, read_stats,
    refused_accounted_size,
};

fn refusal(seq: u64, reason: &str) -> Refusal {
    Refusal {
        seq,
        reason: reason.into(),
        at_ms: 1_700_000_000_000 + seq,
    }
}

fn seqs(list: &[RefusedRecord]) -> Vec<u64> {
    list.iter().map(|r| r.record.seq).collect()
}

/// Every record of the store, all priorities, by seq.
async fn all_records(store: &Store) -> Vec<Record> {
    let mut all = Vec::new();
    for p in Priority::ALL {
        all.extend(store.read_after(p, 0, usize::MAX).await.unwrap());
    }
    all.sort_by_key(|r| r.seq);
    all
}

fn with_limits(dir: &Path, quota_bytes: u64, refused: RefusedLimits) -> StoreSettings {
    StoreSettings {
        refused,
        ..settings(dir, quota_bytes)
    }
}

#[tokio::test]
async fn refuse_moves_records_out_of_the_send_path_with_their_counters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    let sent = vec![
        NewRecord {
            stream: "site/a".into(),
            priority: Priority::High,
            payload: Bytes::from_static(b"one"),
            ingested_at_ms: 10,
        },
        NewRecord {
            stream: "site/huge".into(),
            priority: Priority::Normal,
            payload: Bytes::from(vec![7u8; 20_000]),
            ingested_at_ms: 11,
        },
        NewRecord {
            stream: "site/denied".into(),
            priority: Priority::Low,
            payload: Bytes::from_static(b"three"),
            ingested_at_ms: 12,
        },
        rec(Priority::Normal, 100),
    ];
    assert_eq!(store.append(sent).await.unwrap(), vec![1, 2, 3, 4]);
    let before = all_records(&store).await;
    let stats_before = store.stats().await.unwrap();

    let reasons = [
        refusal(2, "larger than the upstream maximum packet size (10240)"),
        refusal(3, "PUBACK 0x87 not authorized"),
    ];
    assert_eq!(store.refuse(reasons.to_vec()).await.unwrap(), 2);

    // Out of the send path: read_after never returns them, in any priority.
    assert_eq!(seqs_of(&store, Priority::High).await, vec![1]);
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![4]);
    assert!(seqs_of(&store, Priority::Low).await.is_empty());
    assert_eq!(*store.committed_seq().borrow(), 4, "no seq was assigned");

    // Kept whole: the original record, unchanged, with why and when; newest refusal first.
    let refused = store.refused(10).await.unwrap();
    assert_eq!(
        refused,
        vec![
            RefusedRecord {
                record: before[2].clone(),
                reason: reasons[1].reason.clone(),
                refused_at_ms: reasons[1].at_ms,
            },
            RefusedRecord {
                record: before[1].clone(),
                reason: reasons[0].reason.clone(),
                refused_at_ms: reasons[0].at_ms,
            },
        ]
    );
    assert_eq!(refused[1].record.payload.len(), 20_000);
    assert_eq!(seqs(&store.refused(1).await.unwrap()), vec![3]);
    assert!(store.refused(0).await.unwrap().is_empty());

    // Counters moved in the same (one) transaction.
    let size = |r: &Record| accounted_size(&r.stream, r.payload.len());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.commits_total, stats_before.commits_total + 1);
    assert_eq!(stats.records, 2);
    assert_eq!(
        stats.bytes,
        stats_before.bytes - size(&before[1]) - size(&before[2])
    );
    assert_eq!(stats.records_by_priority, [1, 1, 0]);
    assert_eq!(stats.refused_records, 2);
    assert_eq!(
        stats.refused_bytes,
        refused_accounted_size(&before[1].stream, 20_000, &reasons[0].reason)
            + refused_accounted_size(&before[2].stream, 5, &reasons[1].reason)
    );
    assert_eq!(
        (
            stats.refused_total,
            stats.refused_evicted_total,
            stats.requeued_total
        ),
        (2, 0, 0)
    );
    // Leaving the send path is not an ack, an eviction or an expiry.
    assert_eq!(
        (
            stats.appended_total,
            stats.acked_total,
            stats.evicted_total,
            stats.expired_total
        ),
        (4, 0, 0, 0)
    );

    // Acking a refused seq (a late PUBACK) does not touch it.
    assert_eq!(store.ack(vec![2, 3]).await.unwrap(), 0);
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![3, 2]);
    // New records continue after the last seq.
    assert_eq!(
        store.append(vec![rec(Priority::Low, 100)]).await.unwrap(),
        vec![5]
    );
}

#[tokio::test]
async fn refusing_a_seq_that_is_not_in_the_records_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    store
        .append(vec![
            rec(Priority::High, 100),
            rec(Priority::High, 100),
            rec(Priority::Low, 100),
        ])
        .await
        .unwrap();
    store.ack(vec![1]).await.unwrap();
    assert_eq!(store.refuse(vec![refusal(2, "first")]).await.unwrap(), 1);
    let before = store.stats().await.unwrap();

    // Acked (1), already refused (2), never assigned (99), and 3 twice in one call.
    let moved = store
        .refuse(vec![
            refusal(1, "acked"),
            refusal(2, "again"),
            refusal(99, "unknown"),
            refusal(3, "once"),
            refusal(3, "twice"),
        ])
        .await
        .unwrap();
    assert_eq!(moved, 1);
    let refused = store.refused(10).await.unwrap();
    assert_eq!(seqs(&refused), vec![3, 2]);
    assert_eq!(refused[0].reason, "once");
    assert_eq!(
        refused[1].reason, "first",
        "a refused record is not refused again"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.records, stats.refused_records), (0, 2));
    assert_eq!(stats.refused_total, before.refused_total + 1);

    // A call where nothing is found changes nothing but the commit count.
    let before = store.stats().await.unwrap();
    assert_eq!(store.refuse(vec![refusal(42, "gone")]).await.unwrap(), 0);
    assert_eq!(store.refuse(Vec::new()).await.unwrap(), 0);
    let after = store.stats().await.unwrap();
    assert_eq!(
        after,
        crate::StoreStats {
            commits_total: before.commits_total + 1,
            ..before
        }
    );
}

#[tokio::test]
async fn refused_records_beyond_the_count_bound_evict_the_oldest_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RefusedLimits {
        max_records: 3,
        max_bytes: 1 << 20,
    };
    let store = Store::open(with_limits(dir.path(), 1 << 20, limits)).unwrap();
    store
        .append((0..6).map(|_| rec(Priority::Normal, 100)).collect())
        .await
        .unwrap();
    // Refusal order, not seq order, decides what is oldest.
    for seq in [4, 2, 6] {
        store
            .refuse(vec![refusal(seq, &format!("r{seq}"))])
            .await
            .unwrap();
    }
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![6, 2, 4]);
    // One call of two: both moved, the two oldest refusals (4, then 2) go.
    assert_eq!(
        store
            .refuse(vec![refusal(1, "r1"), refusal(5, "r5")])
            .await
            .unwrap(),
        2
    );
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![5, 1, 6]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.refused_records,
            stats.refused_total,
            stats.refused_evicted_total
        ),
        (3, 5, 2)
    );
    assert_eq!(stats.refused_bytes, 3 * (100 + 2));
    // Evicted refusals are gone from both tables; the rest of the records are untouched.
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![3]);
    assert_eq!(stats.records, 1);
    // Not a quota eviction.
    assert_eq!(stats.evicted_total, 0);
}

#[tokio::test]
async fn refused_records_beyond_the_byte_bound_evict_the_oldest_refusals() {
    let dir = tempfile::tempdir().unwrap();
    // Below the floor: clamped up to REFUSED_MIN_BYTES.
    let limits = RefusedLimits {
        max_records: 1000,
        max_bytes: 10,
    };
    assert_eq!(limits.clamped().max_bytes, REFUSED_MIN_BYTES);
    let store = Store::open(with_limits(dir.path(), 1 << 20, limits)).unwrap();
    let third = REFUSED_MIN_BYTES / 3;
    store
        .append(vec![
            rec(Priority::Low, third),
            rec(Priority::Low, third),
            rec(Priority::Low, third),
            rec(Priority::High, REFUSED_MIN_BYTES + 1),
        ])
        .await
        .unwrap();
    store
        .refuse(vec![refusal(1, "a"), refusal(2, "b")])
        .await
        .unwrap();
    assert_eq!(store.stats().await.unwrap().refused_bytes, 2 * (third + 1));
    // The third does not fit beside them (reasons count too): the oldest refusal goes.
    assert_eq!(store.refuse(vec![refusal(3, "c")]).await.unwrap(), 1);
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![3, 2]);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.refused_records, stats.refused_evicted_total), (2, 1));
    assert!(stats.refused_bytes <= REFUSED_MIN_BYTES);

    // A record larger than the whole bound: it leaves the send path (never blocks the link),
    // everything older makes room, and it is evicted itself. Counted, never silent.
    assert_eq!(store.refuse(vec![refusal(4, "huge")]).await.unwrap(), 1);
    assert!(store.refused(10).await.unwrap().is_empty());
    assert!(seqs_of(&store, Priority::High).await.is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.records,
            stats.refused_records,
            stats.refused_bytes,
            stats.refused_total,
            stats.refused_evicted_total
        ),
        (0, 0, 0, 4, 4)
    );
}

#[tokio::test]
async fn a_zero_count_bound_is_clamped_to_one() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RefusedLimits {
        max_records: 0,
        max_bytes: 0,
    };
    let store = Store::open(with_limits(dir.path(), 1 << 20, limits)).unwrap();
    store
        .append(vec![rec(Priority::Low, 100), rec(Priority::Low, 100)])
        .await
        .unwrap();
    store
        .refuse(vec![refusal(1, "a"), refusal(2, "b")])
        .await
        .unwrap();
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![2]);
    assert_eq!(store.stats().await.unwrap().refused_evicted_total, 1);
}

#[tokio::test]
async fn refused_records_and_their_counters_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    store
        .append(vec![
            rec(Priority::High, 100),
            rec(Priority::Normal, 200),
            rec(Priority::Low, 300),
        ])
        .await
        .unwrap();
    store
        .refuse(vec![refusal(3, "denied"), refusal(1, "too big")])
        .await
        .unwrap();
    store.requeue_refused(vec![1]).await.unwrap();
    let listed = store.refused(10).await.unwrap();
    let stats = store.stats().await.unwrap();
    let records = all_records(&store).await;
    store.close().await.unwrap();

    // Read-only, from the path, with no writer running.
    assert_eq!(read_refused(&s.path, 10).unwrap(), listed);
    assert_eq!(read_stats(&s.path).unwrap(), stats);

    let store = Store::open(s.clone()).unwrap();
    assert_eq!(store.refused(10).await.unwrap(), listed);
    assert_eq!(store.stats().await.unwrap(), stats);
    assert_eq!(all_records(&store).await, records);
    assert_eq!(
        (
            stats.refused_records,
            stats.refused_total,
            stats.requeued_total
        ),
        (1, 2, 1)
    );
    // Refusal ids continue: the next refusal is newer than the one kept.
    store.refuse(vec![refusal(2, "later")]).await.unwrap();
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![2, 3]);
    assert_eq!(store.stats().await.unwrap().refused_total, 3);
}

#[tokio::test]
async fn requeue_puts_records_back_with_their_original_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    store
        .append(vec![
            rec(Priority::Normal, 100),
            rec(Priority::Normal, 150),
            rec(Priority::Normal, 200),
            rec(Priority::High, 120),
        ])
        .await
        .unwrap();
    let original = all_records(&store).await;
    let stats_original = store.stats().await.unwrap();
    store
        .refuse(vec![refusal(2, "x"), refusal(4, "y"), refusal(1, "z")])
        .await
        .unwrap();
    // Sync has read past everything meanwhile (its cursor is at 3).
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![3]);
    let mut committed = store.committed_seq();
    committed.borrow_and_update();

    // Unknown (99) and still-stored (3) seqs are skipped; duplicates move once.
    assert_eq!(
        store.requeue_refused(vec![4, 99, 2, 3, 2]).await.unwrap(),
        2
    );
    assert!(committed.has_changed().unwrap(), "sync is woken");
    assert_eq!(*committed.borrow_and_update(), 4, "no new seq");

    // Same seq, stream, priority, payload and ingest time.
    assert_eq!(
        store.read_after(Priority::Normal, 0, 10).await.unwrap(),
        vec![original[1].clone(), original[2].clone()]
    );
    assert_eq!(
        store.read_after(Priority::High, 0, 10).await.unwrap(),
        vec![original[3].clone()]
    );
    // A cursor past them does not see them: they are sent after the next (re)connection.
    assert!(
        store
            .read_after(Priority::Normal, 3, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![1]);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 3);
    assert_eq!(stats.records_by_priority, [1, 2, 0]);
    assert_eq!(
        stats.bytes,
        stats_original.bytes - accounted_size(&original[0].stream, original[0].payload.len())
    );
    assert_eq!(
        (
            stats.refused_records,
            stats.refused_bytes,
            stats.refused_total,
            stats.requeued_total
        ),
        (1, 100 + 1, 3, 2)
    );
    assert_eq!(stats.appended_total, 4, "a requeue is not an append");

    // Nothing more to requeue: no wake-up.
    assert_eq!(store.requeue_refused(vec![2, 4]).await.unwrap(), 0);
    assert!(!committed.has_changed().unwrap());
    assert_eq!(store.requeue_refused(Vec::new()).await.unwrap(), 0);

    // Requeued records are records again: acked, or refused again (a new refusal).
    assert_eq!(store.ack(vec![2]).await.unwrap(), 1);
    assert_eq!(store.refuse(vec![refusal(4, "again")]).await.unwrap(), 1);
    let refused = store.refused(10).await.unwrap();
    assert_eq!(seqs(&refused), vec![4, 1]);
    assert_eq!(refused[0].record, original[3]);
    assert_eq!(store.stats().await.unwrap().refused_total, 4);
}

#[tokio::test]
async fn requeue_that_does_not_fit_moves_nothing_and_evicts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 500)).unwrap();
    store
        .append(vec![rec(Priority::High, 200), rec(Priority::High, 200)])
        .await
        .unwrap();
    store
        .refuse(vec![refusal(1, "a"), refusal(2, "b")])
        .await
        .unwrap();
    // The quota fills up with new (low priority) data.
    store
        .append(vec![rec(Priority::Low, 200), rec(Priority::Low, 200)])
        .await
        .unwrap();
    let before = store.stats().await.unwrap();

    match store.requeue_refused(vec![1, 2]).await {
        Err(StoreError::Full { needed, quota }) => assert_eq!((needed, quota), (400, 500)),
        other => panic!("expected Full, got {other:?}"),
    }
    // All or nothing, and an operator action never evicts data.
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![2, 1]);
    assert_eq!(seqs_of(&store, Priority::Low).await, vec![3, 4]);
    let after = store.stats().await.unwrap();
    assert_eq!(
        after,
        crate::StoreStats {
            commits_total: before.commits_total + 1,
            ..before
        },
        "not counted as rejected either: nothing was lost"
    );
    assert!(!store.is_poisoned());

    // What fits moves.
    store.ack(vec![3]).await.unwrap();
    assert_eq!(store.requeue_refused(vec![1]).await.unwrap(), 1);
    assert_eq!(seqs_of(&store, Priority::High).await, vec![1]);
}

#[tokio::test]
async fn refused_records_are_not_subject_to_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    s.ttl = Some(Duration::from_secs(60));
    let clock = TestClock::new(now_ms());
    let store = open_at(s, &clock);
    store
        .append(vec![rec(Priority::Normal, 100)])
        .await
        .unwrap();
    assert_eq!(store.refuse(vec![refusal(1, "denied")]).await.unwrap(), 1);
    clock.advance(Duration::from_secs(90));
    assert_eq!(store.expire_now().await.unwrap(), 0);
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![1]);

    // Back among the records, its age is the record's (from when it was first stored): older
    // than the TTL, it expires like any record, counted (by the periodic pass or this one,
    // whichever runs first).
    assert_eq!(store.requeue_refused(vec![1]).await.unwrap(), 1);
    assert!(seqs_of(&store, Priority::Normal).await.is_empty());
    store.expire_now().await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.records,
            stats.refused_records,
            stats.expired_total,
            stats.requeued_total
        ),
        (0, 0, 1, 1)
    );
}

#[tokio::test]
async fn a_failed_commit_leaves_records_where_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = open_retrying(s.clone(), NO_RETRY, NO_RETRY);
    store
        .append(vec![rec(Priority::High, 100), rec(Priority::Low, 100)])
        .await
        .unwrap();
    store.refuse(vec![refusal(2, "denied")]).await.unwrap();
    let records = all_records(&store).await;
    let refused = store.refused(10).await.unwrap();
    let stats = store.stats().await.unwrap();

    store.fail_next_commit();
    let got = store.refuse(vec![refusal(1, "lost?")]).await;
    assert!(matches!(got, Err(StoreError::CommitFailed(_))), "{got:?}");
    assert!(store.is_poisoned());
    // While failing, a requeue (records back into the quota) is refused without a try.
    assert!(matches!(
        store.requeue_refused(vec![2]).await,
        Err(StoreError::Poisoned)
    ));
    // Reads show the committed state: nothing moved, counters as before.
    assert_eq!(all_records(&store).await, records);
    assert_eq!(store.refused(10).await.unwrap(), refused);
    assert_eq!(
        store.stats().await.unwrap(),
        crate::StoreStats {
            poisoned: true,
            health: store.health(),
            commit_failures_total: 1,
            ..stats.clone()
        }
    );
    store.close().await.unwrap();

    // And on disk. Then a failed requeue, the other way round.
    let store = Store::open(s.clone()).unwrap();
    assert_eq!(all_records(&store).await, records);
    assert_eq!(store.refused(10).await.unwrap(), refused);
    assert_eq!(store.stats().await.unwrap(), stats);
    store.fail_next_commit();
    let got = store.requeue_refused(vec![2]).await;
    assert!(matches!(got, Err(StoreError::CommitFailed(_))), "{got:?}");
    store.close().await.unwrap();
    let store = Store::open(s).unwrap();
    assert_eq!(all_records(&store).await, records);
    assert_eq!(store.refused(10).await.unwrap(), refused);
    assert_eq!(store.stats().await.unwrap(), stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_refused_while_the_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    store
        .append((0..5).map(|_| rec(Priority::Normal, 100)).collect())
        .await
        .unwrap();
    store
        .refuse((1..=4).map(|seq| refusal(seq, "denied")).collect())
        .await
        .unwrap();
    let path = s.path.clone();
    let (listed, stats) = tokio::task::spawn_blocking(move || {
        (read_refused(&path, 3).unwrap(), read_stats(&path).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(listed, store.refused(3).await.unwrap());
    assert_eq!(seqs(&listed), vec![4, 3, 2]);
    assert_eq!(stats, store.stats().await.unwrap());
    assert_eq!(stats.refused_records, 4);
    assert!(read_refused(&s.path, 0).unwrap().is_empty());
    // The read-only connection changed nothing: the store still writes.
    assert_eq!(store.requeue_refused(vec![1]).await.unwrap(), 1);
    assert!(matches!(
        read_refused(&dir.path().join("missing.db"), 10),
        Err(StoreError::Open { .. })
    ));
}

/// Version 2 as version 2 builds created it: version 1 plus the dead letters. Frozen on purpose,
/// like [`V1_SCHEMA`].
const V2_ADDITIONS: &str = "
CREATE TABLE dead_letters (
    id             INTEGER PRIMARY KEY,
    at_ms          INTEGER NOT NULL,
    topic          TEXT    NOT NULL,
    source         TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    content_format INTEGER,
    size           INTEGER NOT NULL,
    payload        BLOB    NOT NULL
);
ALTER TABLE counters ADD COLUMN dead_letters               INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN dead_letter_bytes          INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN dead_lettered_total        INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN dead_letters_evicted_total INTEGER NOT NULL DEFAULT 0;
PRAGMA user_version = 2;
";

#[tokio::test]
async fn a_version_2_store_is_read_as_is_and_migrated_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    std::fs::create_dir_all(s.path.parent().unwrap()).unwrap();
    {
        let conn = rusqlite::Connection::open(&s.path).unwrap();
        conn.execute_batch(V1_SCHEMA).unwrap();
        conn.execute_batch(V2_ADDITIONS).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             INSERT INTO records VALUES (3, 's', 1, 10, 67, x'6869');
             INSERT INTO counters VALUES (1, 1, 67, 0, 1, 0, 3, 3, 2, 0, 0, 0, 0, 0, 0, 5,
                                          1, 100, 1, 0);
             INSERT INTO dead_letters VALUES (1, 7, 't', 'coap', 'bad', NULL, 100, x'00');",
        )
        .unwrap();
    }
    let version = |path: &Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    };

    // Read-only: as it is, no refused table, its counters 0.
    let v2_stats = read_stats(&s.path).unwrap();
    assert_eq!(
        (v2_stats.records, v2_stats.last_seq, v2_stats.dead_letters),
        (1, 3, 1)
    );
    assert_eq!(
        (
            v2_stats.refused_records,
            v2_stats.refused_bytes,
            v2_stats.refused_total,
            v2_stats.refused_evicted_total,
            v2_stats.requeued_total
        ),
        (0, 0, 0, 0, 0)
    );
    assert!(read_refused(&s.path, 10).unwrap().is_empty());
    assert_eq!(version(&s.path), 2, "reading did not migrate");

    // The writer migrates; everything of v2 is kept, and refusing works.
    let store = Store::open(s.clone()).unwrap();
    assert_eq!(version(&s.path), 4);
    assert_eq!(store.stats().await.unwrap(), v2_stats);
    assert_eq!(read_dead_letters(&s.path, 10).unwrap().len(), 1);
    assert_eq!(store.refuse(vec![refusal(3, "denied")]).await.unwrap(), 1);
    assert_eq!(seqs(&store.refused(10).await.unwrap()), vec![3]);
    assert_eq!(store.dead_letter(letter(100, 2)).await.unwrap(), 2);
    store.close().await.unwrap();
    assert_eq!(seqs(&read_refused(&s.path, 10).unwrap()), vec![3]);
    let stats = read_stats(&s.path).unwrap();
    assert_eq!(
        (stats.records, stats.refused_records, stats.refused_bytes),
        (0, 1, 67 + 6)
    );
}
