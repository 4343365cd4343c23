#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::TestClock;
use crate::{
    DEAD_LETTER_MIN_BYTES, DEAD_LETTER_OVERHEAD_BYTES, DeadLetter, DeadLetterLimits, Durability,
    NewRecord, Priority, RECORD_OVERHEAD_BYTES, RefusedLimits, StateOp, Store, StoreError,
    StoreSettings, StoreStats, StoredDeadLetter, Tuning, WhenFull, dead_letter_accounted_size,
    read_dead_letters, read_state, read_states_with_prefix, read_stats,
};

pub(crate) fn settings(dir: &Path, quota_bytes: u64) -> StoreSettings {
    StoreSettings {
        path: dir.join("sub").join("store.db"),
        quota_bytes,
        ttl: None,
        when_full: WhenFull::EvictLowestOldest,
        batch_max_records: 512,
        batch_max_delay: Duration::from_millis(2),
        durability: Durability::Normal,
        refused: RefusedLimits::default(),
    }
}

/// A record whose accounted size is exactly `size` (stream "s", 1 byte).
pub(crate) fn rec(priority: Priority, size: u64) -> NewRecord {
    let payload_len = size - 1 - RECORD_OVERHEAD_BYTES;
    NewRecord {
        stream: "s".into(),
        priority,
        payload: Bytes::from(vec![priority.as_index() as u8; payload_len as usize]),
        ingested_at_ms: now_ms(),
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Opens a store whose clocks the test moves by hand.
pub(crate) fn open_at(s: StoreSettings, clock: &Arc<TestClock>) -> Store {
    let tuning = Tuning {
        clock: Arc::clone(clock) as Arc<dyn crate::clock::Clock>,
        ..Tuning::default()
    };
    Store::open_tuned(s, DeadLetterLimits::default(), tuning).unwrap()
}

/// Opens a store that waits `retry_min` (doubling up to `retry_max`) before retrying after a
/// failed commit; a long one keeps it failing for as long as the test looks.
pub(crate) fn open_retrying(s: StoreSettings, retry_min: Duration, retry_max: Duration) -> Store {
    let tuning = Tuning {
        retry_min,
        retry_max,
        ..Tuning::default()
    };
    Store::open_tuned(s, DeadLetterLimits::default(), tuning).unwrap()
}

/// Long enough that no retry happens while a test looks at a failing store.
pub(crate) const NO_RETRY: Duration = Duration::from_secs(3600);

pub(crate) async fn seqs_of(store: &Store, priority: Priority) -> Vec<u64> {
    store
        .read_after(priority, 0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

#[tokio::test]
async fn append_read_ack_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    let records = vec![
        NewRecord {
            stream: "site/a".into(),
            priority: Priority::Normal,
            payload: Bytes::from_static(b"one"),
            ingested_at_ms: 10,
        },
        NewRecord {
            stream: "site/b".into(),
            priority: Priority::High,
            payload: Bytes::from_static(b"two"),
            ingested_at_ms: 11,
        },
        NewRecord {
            stream: "site/a".into(),
            priority: Priority::Normal,
            payload: Bytes::from_static(b"three"),
            ingested_at_ms: 12,
        },
    ];
    let seqs = store.append(records.clone()).await.unwrap();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(*store.committed_seq().borrow(), 3);

    let normal = store.read_after(Priority::Normal, 0, 10).await.unwrap();
    assert_eq!(normal.len(), 2);
    assert_eq!(normal[0].seq, 1);
    assert_eq!(normal[0].stream, "site/a");
    assert_eq!(normal[0].payload, Bytes::from_static(b"one"));
    assert_eq!(normal[0].ingested_at_ms, 10);
    assert_eq!(normal[1].payload, Bytes::from_static(b"three"));
    assert_eq!(
        store.read_after(Priority::Normal, 1, 10).await.unwrap()[0].seq,
        3
    );
    assert_eq!(
        store
            .read_after(Priority::Normal, 0, 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(seqs_of(&store, Priority::High).await, vec![2]);
    assert!(seqs_of(&store, Priority::Low).await.is_empty());

    let stats = store.stats().await.unwrap();
    let expected_bytes: u64 = records
        .iter()
        .map(|r| r.payload.len() as u64 + r.stream.len() as u64 + RECORD_OVERHEAD_BYTES)
        .sum();
    assert_eq!(stats.records, 3);
    assert_eq!(stats.bytes, expected_bytes);
    assert_eq!(stats.records_by_priority, [1, 2, 0]);
    assert_eq!(stats.oldest_ingested_at_ms, Some(10));
    assert_eq!(stats.appended_total, 3);

    // Unknown and repeated seqs are fine.
    assert_eq!(store.ack(vec![1, 2, 99, 1]).await.unwrap(), 2);
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![3]);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 1);
    assert_eq!(stats.records_by_priority, [0, 1, 0]);
    assert_eq!(stats.acked_total, 2);
    assert_eq!(stats.oldest_ingested_at_ms, Some(12));
    store.close().await.unwrap();
}

#[tokio::test]
async fn seq_is_monotonic_across_reopen_and_after_everything_was_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    let first = store
        .append(vec![rec(Priority::Low, 100), rec(Priority::Low, 100)])
        .await
        .unwrap();
    assert_eq!(first, vec![1, 2]);
    store.ack(first).await.unwrap();
    assert_eq!(store.stats().await.unwrap().records, 0);
    store.close().await.unwrap();

    let store = Store::open(s.clone()).unwrap();
    assert_eq!(*store.committed_seq().borrow(), 2);
    let next = store.append(vec![rec(Priority::High, 100)]).await.unwrap();
    assert_eq!(next, vec![3]);
    store.ack(next).await.unwrap();
    drop(store); // drop instead of close: must also persist and stop

    let store = Store::open(s).unwrap();
    assert_eq!(
        store
            .append(vec![rec(Priority::Normal, 100)])
            .await
            .unwrap(),
        vec![4]
    );
    assert_eq!(store.stats().await.unwrap().last_seq, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 30);
    s.batch_max_delay = Duration::from_millis(20);
    s.batch_max_records = 10_000;
    s.durability = Durability::Full;
    let store = Store::open(s).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for _ in 0..10 {
                seqs.extend(
                    store
                        .append(vec![rec(Priority::Normal, 100)])
                        .await
                        .unwrap(),
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a caller's seqs ascend"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 1000, "every seq is unique");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.appended_total, 1000);
    assert!(
        stats.commits_total <= 100,
        "1000 appends from 100 tasks took {} commits",
        stats.commits_total
    );
}

#[tokio::test]
async fn batch_closes_at_max_records_without_waiting_for_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 30);
    s.batch_max_delay = Duration::from_secs(30);
    s.batch_max_records = 3;
    let store = Store::open(s).unwrap();
    let appended = tokio::time::timeout(
        Duration::from_secs(10),
        store.append(vec![rec(Priority::Normal, 100); 3]),
    )
    .await
    .expect("a full batch commits at once");
    assert_eq!(appended.unwrap().len(), 3);
}

#[tokio::test]
async fn eviction_takes_lowest_priority_oldest_first_with_exact_counters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1000)).unwrap();
    // 2 high, 3 normal, 3 low, 100 bytes each: 800 of 1000.
    let mut seqs = Vec::new();
    for p in [
        Priority::Low,
        Priority::High,
        Priority::Normal,
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Low,
        Priority::Normal,
    ] {
        seqs.extend(store.append(vec![rec(p, 100)]).await.unwrap());
    }
    // A 400-byte normal record needs 200 bytes: the two oldest low records go.
    store
        .append(vec![rec(Priority::Normal, 400)])
        .await
        .unwrap();
    assert_eq!(seqs_of(&store, Priority::Low).await, vec![7]);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.bytes, 1000);
    assert_eq!(stats.evicted_total, 2);
    assert_eq!(stats.evicted_by_priority, [0, 0, 2]);

    // A 300-byte high record needs 300 more: the last low one, then the two oldest normal ones.
    store.append(vec![rec(Priority::High, 300)]).await.unwrap();
    assert!(seqs_of(&store, Priority::Low).await.is_empty());
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![8, 9]);
    assert_eq!(seqs_of(&store, Priority::High).await, vec![2, 6, 10]);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 5);
    assert_eq!(stats.bytes, 1000);
    assert_eq!(stats.records_by_priority, [3, 2, 0]);
    assert_eq!(stats.evicted_total, 5);
    assert_eq!(stats.evicted_by_priority, [0, 2, 3]);
    assert_eq!(stats.rejected_full_total, 0);
}

#[tokio::test]
async fn new_low_record_never_evicts_high_or_normal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 500)).unwrap();
    store
        .append(vec![rec(Priority::High, 200), rec(Priority::Normal, 200)])
        .await
        .unwrap();
    store.append(vec![rec(Priority::Low, 100)]).await.unwrap();
    // Low may evict an older low record...
    store.append(vec![rec(Priority::Low, 100)]).await.unwrap();
    assert_eq!(seqs_of(&store, Priority::Low).await, vec![4]);
    // ...but not normal or high ones.
    let err = store
        .append(vec![rec(Priority::Low, 200)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Full {
                needed: 200,
                quota: 500
            }
        ),
        "{err:?}"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(
        stats.records_by_priority,
        [1, 1, 1],
        "the failed call changed nothing"
    );
    assert_eq!(stats.evicted_by_priority, [0, 0, 1]);
    assert_eq!(stats.rejected_full_total, 1);
    // Normal may not evict high either, but may evict the low one and then... not enough: refused.
    let err = store
        .append(vec![rec(Priority::Normal, 400)])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Full { .. }));
    assert_eq!(seqs_of(&store, Priority::Low).await, vec![4], "rolled back");
    assert_eq!(store.stats().await.unwrap().evicted_total, 1);
}

#[tokio::test]
async fn a_call_with_one_record_that_cannot_fit_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 300)).unwrap();
    store.append(vec![rec(Priority::High, 200)]).await.unwrap();
    let err = store
        .append(vec![rec(Priority::Low, 100), rec(Priority::Low, 150)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Full {
                needed: 250,
                quota: 300
            }
        ),
        "{err:?}"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 1);
    assert_eq!(stats.appended_total, 1);
    assert_eq!(stats.rejected_full_total, 2);
    // The refused seqs were never handed out, so the next one continues without a gap.
    assert_eq!(
        store.append(vec![rec(Priority::Low, 100)]).await.unwrap(),
        vec![2]
    );
}

#[tokio::test]
async fn reject_new_refuses_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 300);
    s.when_full = WhenFull::RejectNew;
    let store = Store::open(s).unwrap();
    store
        .append(vec![rec(Priority::Low, 100), rec(Priority::Low, 100)])
        .await
        .unwrap();
    let err = store
        .append(vec![rec(Priority::High, 200)])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Full {
            needed: 200,
            quota: 300
        }
    ));
    store.append(vec![rec(Priority::High, 100)]).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 3);
    assert_eq!(stats.evicted_total, 0);
    assert_eq!(stats.rejected_full_total, 1);
}

#[tokio::test]
async fn record_larger_than_quota_is_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 300)).unwrap();
    store.append(vec![rec(Priority::Low, 100)]).await.unwrap();
    let err = store
        .append(vec![rec(Priority::High, 301)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                size: 301,
                quota: 300
            }
        ),
        "{err:?}"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 1, "nothing was evicted for it");
    assert_eq!(stats.rejected_full_total, 1);
}

#[tokio::test]
async fn reopen_keeps_records_state_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 500);
    let store = Store::open(s.clone()).unwrap();
    for p in [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Low,
    ] {
        store.append(vec![rec(p, 100)]).await.unwrap();
    }
    store.append(vec![rec(Priority::High, 200)]).await.unwrap(); // evicts seq 1
    store.ack(vec![3]).await.unwrap();
    let _ = store
        .append(vec![rec(Priority::Low, 600)])
        .await
        .unwrap_err();
    store.put_state("status", b"online".to_vec()).await.unwrap();
    let before = store.stats().await.unwrap();
    let contents = [
        store.read_after(Priority::High, 0, 100).await.unwrap(),
        store.read_after(Priority::Normal, 0, 100).await.unwrap(),
        store.read_after(Priority::Low, 0, 100).await.unwrap(),
    ];
    store.close().await.unwrap();

    let store = Store::open(s).unwrap();
    let after = store.stats().await.unwrap();
    assert_eq!(after, before);
    assert_eq!(
        (
            after.records,
            after.bytes,
            after.evicted_total,
            after.acked_total,
            after.rejected_full_total
        ),
        (3, 400, 1, 1, 1)
    );
    for (p, expected) in Priority::ALL.into_iter().zip(contents) {
        assert_eq!(store.read_after(p, 0, 100).await.unwrap(), expected);
    }
    assert_eq!(
        store.get_state("status").await.unwrap(),
        Some(b"online".to_vec())
    );
    assert_eq!(store.get_state("missing").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_stats_while_the_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    store
        .append(vec![rec(Priority::High, 100), rec(Priority::Low, 100)])
        .await
        .unwrap();
    store.put_state("status", b"ok".to_vec()).await.unwrap();
    let path = s.path.clone();
    let (stats, state) = tokio::task::spawn_blocking(move || {
        (
            read_stats(&path).unwrap(),
            read_state(&path, "status").unwrap(),
        )
    })
    .await
    .unwrap();
    let mut live = store.stats().await.unwrap();
    assert_eq!(stats, live);
    assert_eq!(state, Some(b"ok".to_vec()));

    // Keep writing while another connection reads repeatedly.
    let path = s.path.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut last = 0;
        for _ in 0..50 {
            let stats = read_stats(&path).unwrap();
            assert!(stats.appended_total >= last, "counters never go back");
            last = stats.appended_total;
        }
    });
    for _ in 0..50 {
        store
            .append(vec![rec(Priority::Normal, 100)])
            .await
            .unwrap();
    }
    reader.await.unwrap();
    live = store.stats().await.unwrap();
    let path = s.path.clone();
    let stats = tokio::task::spawn_blocking(move || read_stats(&path).unwrap())
        .await
        .unwrap();
    assert_eq!(stats, live);
}

#[tokio::test]
async fn close_makes_every_clone_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    let other = store.clone();
    store.close().await.unwrap();
    assert!(matches!(other.stats().await, Err(StoreError::Closed)));
    assert!(matches!(
        other.append(vec![rec(Priority::Low, 100)]).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.close().await, Err(StoreError::Closed)));
    // TRUNCATE checkpoint emptied the WAL.
    let wal = dir.path().join("sub").join("store.db-wal");
    assert!(
        std::fs::metadata(&wal)
            .map(|m| m.len() == 0)
            .unwrap_or(true)
    );
}

#[test]
fn files_that_are_not_our_store_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5Au8; 8192]).unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    s.path = garbage.clone();
    match Store::open(s.clone()) {
        Err(StoreError::Open { path, .. }) => assert_eq!(path, garbage),
        other => panic!("expected Open error, got {other:?}"),
    }
    assert!(matches!(read_stats(&garbage), Err(StoreError::Open { .. })));
    assert_eq!(
        std::fs::read(&garbage).unwrap(),
        vec![0x5Au8; 8192],
        "left untouched"
    );

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    s.path = foreign.clone();
    match Store::open(s.clone()) {
        Err(StoreError::NotAStore { path }) => assert_eq!(path, foreign),
        other => panic!("expected NotAStore, got {other:?}"),
    }

    // A store from a newer build is refused, not downgraded.
    s.path = dir.path().join("newer.db");
    drop(Store::open(s.clone()).unwrap());
    rusqlite::Connection::open(&s.path)
        .unwrap()
        .pragma_update(None, "user_version", 7)
        .unwrap();
    assert!(matches!(
        Store::open(s.clone()),
        Err(StoreError::UnsupportedSchema {
            found: 7,
            supported: 4,
            ..
        })
    ));
    assert!(matches!(
        read_stats(&dir.path().join("missing.db")),
        Err(StoreError::Open { .. })
    ));
}

#[tokio::test]
async fn committed_seq_wakes_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    let mut committed = store.committed_seq();
    assert_eq!(*committed.borrow_and_update(), 0);
    let writer = store.clone();
    tokio::spawn(async move { writer.append(vec![rec(Priority::Low, 100)]).await });
    tokio::time::timeout(Duration::from_secs(10), committed.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*committed.borrow(), 1);
}

#[test]
fn stats_default_is_empty() {
    assert_eq!(StoreStats::default().records, 0);
    assert_eq!(Priority::from_index(2), Some(Priority::Low));
    assert_eq!(Priority::from_index(3), None);
}

#[tokio::test]
async fn a_second_writer_on_the_same_file_is_refused_until_the_first_closes() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let first = Store::open(s.clone()).unwrap();
    match Store::open(s.clone()) {
        Err(StoreError::Locked { path, .. }) => assert_eq!(path, s.path),
        other => panic!("expected Locked, got {other:?}"),
    }
    // Status readers are not writers: they still work while the lock is held.
    read_stats(&s.path).unwrap();
    first.close().await.unwrap();
    let second = Store::open(s).unwrap();
    second.close().await.unwrap();
}

// ---- dead letters ----

/// A dead letter whose accounted size is exactly `size` (topic "t", source "coap", reason "bad").
pub(crate) fn letter(size: u64, byte: u8) -> DeadLetter {
    let text = 1 + 4 + 3;
    DeadLetter {
        topic: "t".into(),
        source: "coap".into(),
        reason: "bad".into(),
        content_format: Some(112),
        payload: Bytes::from(vec![
            byte;
            (size - text - DEAD_LETTER_OVERHEAD_BYTES) as usize
        ]),
        at_ms: 1_700_000_000_000 + u64::from(byte),
    }
}

fn ids(letters: &[StoredDeadLetter]) -> Vec<u64> {
    letters.iter().map(|l| l.id).collect()
}

#[tokio::test]
async fn dead_letters_are_listed_newest_first_and_are_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(settings(dir.path(), 1 << 20)).unwrap();
    let a = DeadLetter {
        topic: "sensors/a".into(),
        source: "mqtt".into(),
        reason: "invalid CBOR at byte 3".into(),
        content_format: None,
        payload: Bytes::from_static(b"\xff\x00"),
        at_ms: 5,
    };
    let b = letter(200, 2);
    let c = letter(300, 3);
    assert_eq!(store.dead_letter(a.clone()).await.unwrap(), 1);
    assert_eq!(store.dead_letter(b.clone()).await.unwrap(), 2);
    assert_eq!(store.dead_letter(c.clone()).await.unwrap(), 3);

    let all = store.dead_letters(10).await.unwrap();
    assert_eq!(ids(&all), vec![3, 2, 1]);
    assert_eq!(all[0].letter, c);
    assert_eq!(all[1].letter, b);
    assert_eq!(all[2].letter, a, "no content format round-trips as None");
    assert_eq!(ids(&store.dead_letters(2).await.unwrap()), vec![3, 2]);
    assert!(store.dead_letters(0).await.unwrap().is_empty());

    // Not data: no seq, nothing to sync, no quota use, sync not woken.
    for p in Priority::ALL {
        assert!(seqs_of(&store, p).await.is_empty());
    }
    assert_eq!(*store.committed_seq().borrow(), 0);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.records, stats.bytes, stats.appended_total),
        (0, 0, 0)
    );
    assert_eq!(stats.dead_letters, 3);
    assert_eq!(
        stats.dead_letter_bytes,
        dead_letter_accounted_size(&a) + 200 + 300
    );
    assert_eq!(stats.dead_lettered_total, 3);
    assert_eq!(stats.dead_letters_evicted_total, 0);
    // And records get their seqs as if no dead letter existed.
    assert_eq!(
        store.append(vec![rec(Priority::Low, 100)]).await.unwrap(),
        vec![1]
    );
}

#[tokio::test]
async fn dead_letters_share_the_group_commit_of_other_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    s.batch_max_delay = Duration::from_millis(200);
    let store = Store::open(s).unwrap();
    let (seqs, id) = tokio::join!(
        store.append(vec![rec(Priority::High, 100)]),
        store.dead_letter(letter(100, 1))
    );
    assert_eq!((seqs.unwrap(), id.unwrap()), (vec![1], 1));
    assert_eq!(store.stats().await.unwrap().commits_total, 1);
}

#[tokio::test]
async fn dead_letters_are_bounded_by_count_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DeadLetterLimits {
        max_records: 3,
        max_bytes: 1 << 20,
    };
    let store = Store::open_with(settings(dir.path(), 1 << 20), limits).unwrap();
    for i in 1..=5u8 {
        assert_eq!(
            store.dead_letter(letter(100, i)).await.unwrap(),
            u64::from(i)
        );
    }
    let kept = store.dead_letters(10).await.unwrap();
    assert_eq!(ids(&kept), vec![5, 4, 3]);
    assert_eq!(kept[2].letter, letter(100, 3));
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.dead_letters,
            stats.dead_letter_bytes,
            stats.dead_lettered_total,
            stats.dead_letters_evicted_total
        ),
        (3, 300, 5, 2)
    );
}

#[tokio::test]
async fn dead_letters_are_bounded_by_bytes_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DeadLetterLimits {
        max_records: 1000,
        max_bytes: 2000,
    };
    let store = Store::open_with(settings(dir.path(), 1 << 20), limits).unwrap();
    for i in 1..=3u8 {
        store.dead_letter(letter(600, i)).await.unwrap();
    }
    // 1800 + 600 > 2000: the oldest goes.
    store.dead_letter(letter(600, 4)).await.unwrap();
    assert_eq!(ids(&store.dead_letters(10).await.unwrap()), vec![4, 3, 2]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.dead_letters,
            stats.dead_letter_bytes,
            stats.dead_letters_evicted_total
        ),
        (3, 1800, 1)
    );
    // 1500 needs the bytes down to 500: all three go.
    store.dead_letter(letter(1500, 5)).await.unwrap();
    // Exactly filling the bound is fine: 1500 + 500 = 2000.
    store.dead_letter(letter(500, 6)).await.unwrap();
    assert_eq!(ids(&store.dead_letters(10).await.unwrap()), vec![6, 5]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.dead_letters,
            stats.dead_letter_bytes,
            stats.dead_lettered_total,
            stats.dead_letters_evicted_total
        ),
        (2, 2000, 6, 4)
    );
    // Dead letters never touch the records quota, and records never evict dead letters.
    assert_eq!((stats.records, stats.evicted_total), (0, 0));
}

#[tokio::test]
async fn an_oversized_dead_letter_is_truncated_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = DeadLetterLimits {
        max_records: 10,
        max_bytes: DEAD_LETTER_MIN_BYTES,
    };
    let store = Store::open_with(settings(dir.path(), 1 << 20), limits).unwrap();
    store.dead_letter(letter(200, 1)).await.unwrap();
    let big = DeadLetter {
        topic: "sensors/big".into(),
        source: "coap".into(),
        reason: "senml: unknown mandatory label bad_".into(),
        content_format: Some(112),
        payload: Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<u8>>()),
        at_ms: 42,
    };
    assert_eq!(store.dead_letter(big.clone()).await.unwrap(), 2);
    let kept = store.dead_letters(10).await.unwrap();
    assert_eq!(ids(&kept), vec![2], "the older one made room");
    let stored = &kept[0].letter;
    assert_eq!(
        stored.reason,
        "senml: unknown mandatory label bad_ (payload truncated from 5000 bytes)"
    );
    assert_eq!(
        (
            &stored.topic,
            &stored.source,
            stored.content_format,
            stored.at_ms
        ),
        (&big.topic, &big.source, big.content_format, big.at_ms)
    );
    assert!(big.payload.starts_with(&stored.payload), "a prefix is kept");
    assert_eq!(dead_letter_accounted_size(stored), DEAD_LETTER_MIN_BYTES);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.dead_letters,
            stats.dead_letter_bytes,
            stats.dead_letters_evicted_total
        ),
        (1, DEAD_LETTER_MIN_BYTES, 1)
    );

    // Limits below the minimum are raised to it, and absurdly long text is cut at a char
    // boundary rather than breaking the bound.
    drop(store);
    let tiny = DeadLetterLimits {
        max_records: 0,
        max_bytes: 1,
    };
    let store = Store::open_with(settings(dir.path(), 1 << 20), tiny).unwrap();
    let wordy = DeadLetter {
        topic: "é".repeat(700),
        source: "ü".repeat(700),
        reason: "ß".repeat(700),
        content_format: None,
        payload: Bytes::from(vec![7u8; 100]),
        at_ms: 1,
    };
    assert_eq!(store.dead_letter(wordy).await.unwrap(), 3);
    let kept = store.dead_letters(10).await.unwrap();
    assert_eq!(ids(&kept), vec![3], "max_records 0 is raised to 1");
    let stored = &kept[0].letter;
    assert!(dead_letter_accounted_size(stored) <= DEAD_LETTER_MIN_BYTES);
    assert!(
        stored
            .reason
            .ends_with(" (payload truncated from 100 bytes)")
    );
    assert!(stored.topic.starts_with('é') && stored.source.starts_with('ü'));
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.dead_letter_bytes, dead_letter_accounted_size(stored));
    assert_eq!(stats.dead_letters_evicted_total, 2);
}

#[tokio::test]
async fn dead_letters_and_their_counters_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let limits = DeadLetterLimits {
        max_records: 2,
        max_bytes: 1 << 20,
    };
    let store = Store::open_with(s.clone(), limits).unwrap();
    for i in 1..=3u8 {
        store.dead_letter(letter(150, i)).await.unwrap();
    }
    let before = store.stats().await.unwrap();
    let listed = store.dead_letters(10).await.unwrap();
    store.close().await.unwrap();

    let store = Store::open_with(s.clone(), limits).unwrap();
    assert_eq!(store.stats().await.unwrap(), before);
    assert_eq!(store.dead_letters(10).await.unwrap(), listed);
    assert_eq!(
        (
            before.dead_letters,
            before.dead_lettered_total,
            before.dead_letters_evicted_total
        ),
        (2, 3, 1)
    );
    // Ids continue after a restart.
    assert_eq!(store.dead_letter(letter(150, 4)).await.unwrap(), 4);
    store.close().await.unwrap();

    // Reopening with a lower bound: the next dead letter trims to it.
    let store = Store::open_with(
        s,
        DeadLetterLimits {
            max_records: 1,
            max_bytes: 1 << 20,
        },
    )
    .unwrap();
    let stats = store.stats().await.unwrap();
    // Letter 4 evicted letter 2 under the bound of 2.
    assert_eq!(
        (stats.dead_letters, stats.dead_letters_evicted_total),
        (2, 2)
    );
    store.dead_letter(letter(150, 5)).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.dead_letters,
            stats.dead_letter_bytes,
            stats.dead_letters_evicted_total
        ),
        (1, 150, 4)
    );
    assert_eq!(ids(&store.dead_letters(10).await.unwrap()), vec![5]);
}

/// The version 1 schema exactly as version 1 builds created it; frozen here on purpose so that a
/// change to the migration code cannot silently change what "a v1 file" means in this test.
pub(crate) const V1_SCHEMA: &str = "
CREATE TABLE records (
    seq            INTEGER PRIMARY KEY,
    stream         TEXT    NOT NULL,
    priority       INTEGER NOT NULL,
    ingested_at_ms INTEGER NOT NULL,
    size           INTEGER NOT NULL,
    payload        BLOB    NOT NULL
);
CREATE INDEX records_by_priority ON records (priority, seq);
CREATE INDEX records_by_ingested ON records (ingested_at_ms);
CREATE TABLE counters (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    records             INTEGER NOT NULL,
    bytes               INTEGER NOT NULL,
    records_high        INTEGER NOT NULL,
    records_normal      INTEGER NOT NULL,
    records_low         INTEGER NOT NULL,
    last_seq            INTEGER NOT NULL,
    appended_total      INTEGER NOT NULL,
    acked_total         INTEGER NOT NULL,
    evicted_total       INTEGER NOT NULL,
    evicted_high        INTEGER NOT NULL,
    evicted_normal      INTEGER NOT NULL,
    evicted_low         INTEGER NOT NULL,
    expired_total       INTEGER NOT NULL,
    rejected_full_total INTEGER NOT NULL,
    commits_total       INTEGER NOT NULL
);
CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
PRAGMA application_id = 0x4F555450;
PRAGMA user_version = 1;
";

#[tokio::test]
async fn a_version_1_store_is_read_as_is_and_migrated_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    std::fs::create_dir_all(s.path.parent().unwrap()).unwrap();
    {
        let conn = rusqlite::Connection::open(&s.path).unwrap();
        conn.execute_batch(V1_SCHEMA).unwrap();
        // Two records (seq 3 and 5; seqs 1, 2, 4 were acked), as a v1 gateway left them.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             INSERT INTO records VALUES (3, 's', 0, 10, 68, x'6869');
             INSERT INTO records VALUES (5, 's', 2, 11, 67, x'21');
             INSERT INTO counters VALUES (1, 2, 135, 1, 0, 1, 5, 5, 3, 0, 0, 0, 0, 0, 0, 4);
             INSERT INTO state VALUES ('status', x'6f6b');",
        )
        .unwrap();
    }

    // Read-only entry points cannot migrate: they read the v1 file as it is.
    let v1_stats = read_stats(&s.path).unwrap();
    assert_eq!(
        (
            v1_stats.records,
            v1_stats.bytes,
            v1_stats.last_seq,
            v1_stats.commits_total
        ),
        (2, 135, 5, 4)
    );
    assert_eq!(
        (
            v1_stats.dead_letters,
            v1_stats.dead_letter_bytes,
            v1_stats.dead_lettered_total,
            v1_stats.dead_letters_evicted_total
        ),
        (0, 0, 0, 0)
    );
    assert!(read_dead_letters(&s.path, 10).unwrap().is_empty());
    let version = |path: &Path| -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    };
    assert_eq!(version(&s.path), 1, "reading did not migrate");

    // The writer migrates it; everything of v1 is kept.
    let store = Store::open(s.clone()).unwrap();
    assert_eq!(version(&s.path), 4);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats, v1_stats);
    let high = store.read_after(Priority::High, 0, 10).await.unwrap();
    assert_eq!((high[0].seq, &high[0].payload[..]), (3, &b"hi"[..]));
    assert_eq!(seqs_of(&store, Priority::Low).await, vec![5]);
    assert_eq!(
        store.get_state("status").await.unwrap(),
        Some(b"ok".to_vec())
    );
    assert_eq!(
        store
            .append(vec![rec(Priority::Normal, 100)])
            .await
            .unwrap(),
        vec![6]
    );
    assert_eq!(store.dead_letter(letter(100, 1)).await.unwrap(), 1);
    store.close().await.unwrap();

    let stats = read_stats(&s.path).unwrap();
    assert_eq!((stats.records, stats.dead_letters), (3, 1));
    assert_eq!(ids(&read_dead_letters(&s.path, 10).unwrap()), vec![1]);
    // And a migrated file opens again as a current one.
    let store = Store::open(s).unwrap();
    assert_eq!(store.stats().await.unwrap().dead_lettered_total, 1);
}

#[tokio::test]
async fn a_failing_store_refuses_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    s.batch_max_delay = Duration::from_millis(200);
    let store = open_retrying(s, NO_RETRY, NO_RETRY);
    store.dead_letter(letter(100, 1)).await.unwrap();
    store.fail_next_commit();
    let (a, b) = tokio::join!(
        store.dead_letter(letter(100, 2)),
        store.append(vec![rec(Priority::High, 100)])
    );
    assert!(matches!(a, Err(StoreError::CommitFailed(_))), "{a:?}");
    assert!(matches!(b, Err(StoreError::CommitFailed(_))), "{b:?}");
    assert!(matches!(
        store.dead_letter(letter(100, 3)).await,
        Err(StoreError::Poisoned)
    ));
    // Reads keep working and show the committed state only.
    assert_eq!(ids(&store.dead_letters(10).await.unwrap()), vec![1]);
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.dead_letters, stats.dead_lettered_total), (1, 1));
    assert!(stats.poisoned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_dead_letters_while_the_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    for i in 1..=4u8 {
        store
            .dead_letter(letter(100 + u64::from(i), i))
            .await
            .unwrap();
    }
    let path = s.path.clone();
    let (listed, stats) = tokio::task::spawn_blocking(move || {
        (
            read_dead_letters(&path, 3).unwrap(),
            read_stats(&path).unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(listed, store.dead_letters(3).await.unwrap());
    assert_eq!(ids(&listed), vec![4, 3, 2]);
    assert_eq!(listed[0].letter, letter(104, 4));
    assert_eq!(stats, store.stats().await.unwrap());
    assert_eq!(stats.dead_letter_bytes, 101 + 102 + 103 + 104);
    // The read-only connection really is read-only: the store is untouched and still writable.
    assert_eq!(store.dead_letter(letter(100, 5)).await.unwrap(), 5);
}

#[tokio::test]
async fn state_entries_are_listed_by_prefix_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    for key in ["device/b", "device/a", "devices", "other", "device/\u{e9}"] {
        store.put_state(key, key.as_bytes().to_vec()).await.unwrap();
    }
    let listed = store.states_with_prefix("device/").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["device/a", "device/b", "device/\u{e9}"]);
    assert_eq!(listed[0].1, b"device/a");
    assert_eq!(read_states_with_prefix(&s.path, "device/").unwrap(), listed);
    assert!(
        store
            .states_with_prefix("nothing/")
            .await
            .unwrap()
            .is_empty()
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn state_batches_apply_in_submit_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1 << 20);
    let store = Store::open(s.clone()).unwrap();
    let put = |k: &str, v: &str| StateOp::Put {
        key: k.into(),
        value: v.as_bytes().into(),
    };
    let del = |k: &str| StateOp::Delete { key: k.into() };
    // Three batches in flight at once: a later batch's delete must see the earlier put, and
    // a put after a delete in the same batch must win.
    let first = store
        .submit_states(vec![put("s/a", "1"), put("s/b", "1")])
        .await
        .unwrap();
    let second = store
        .submit_states(vec![del("s/a"), put("s/b", "2"), del("s/missing")])
        .await
        .unwrap();
    let third = store
        .submit_states(vec![put("s/c", "1"), del("s/c"), put("s/c", "3")])
        .await
        .unwrap();
    first.await.unwrap();
    second.await.unwrap();
    third.await.unwrap();
    let expected = vec![
        ("s/b".to_owned(), b"2".to_vec()),
        ("s/c".to_owned(), b"3".to_vec()),
    ];
    assert_eq!(store.states_with_prefix("s/").await.unwrap(), expected);
    store
        .submit_states(Vec::new())
        .await
        .unwrap()
        .await
        .unwrap();
    store.close().await.unwrap();
    let store = Store::open(s).unwrap();
    assert_eq!(store.states_with_prefix("s/").await.unwrap(), expected);
    store.close().await.unwrap();
}
