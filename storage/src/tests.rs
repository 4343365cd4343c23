#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::{
    Durability, NewRecord, Priority, RECORD_OVERHEAD_BYTES, Store, StoreError, StoreSettings,
    StoreStats, WhenFull, read_state, read_stats,
};

fn settings(dir: &Path, quota_bytes: u64) -> StoreSettings {
    StoreSettings {
        path: dir.join("sub").join("store.db"),
        quota_bytes,
        ttl: None,
        when_full: WhenFull::EvictLowestOldest,
        batch_max_records: 512,
        batch_max_delay: Duration::from_millis(2),
        durability: Durability::Normal,
    }
}

/// A record whose accounted size is exactly `size` (stream "s", 1 byte).
fn rec(priority: Priority, size: u64) -> NewRecord {
    let payload_len = size - 1 - RECORD_OVERHEAD_BYTES;
    NewRecord {
        stream: "s".into(),
        priority,
        payload: Bytes::from(vec![priority.as_index() as u8; payload_len as usize]),
        ingested_at_ms: now_ms(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn seqs_of(store: &Store, priority: Priority) -> Vec<u64> {
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
async fn ttl_hides_expired_records_and_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    s.ttl = Some(Duration::from_secs(60));
    let store = Store::open(s.clone()).unwrap();
    let mut old = rec(Priority::Normal, 100);
    old.ingested_at_ms = now_ms() - 120_000;
    let mut fresh = rec(Priority::Normal, 100);
    fresh.ingested_at_ms = now_ms() - 1_000;
    let seqs = store
        .append(vec![old.clone(), fresh, old.clone()])
        .await
        .unwrap();
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![seqs[1]]);
    assert_eq!(store.expire_now().await.unwrap(), 2);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 1);
    assert_eq!(stats.bytes, 100);
    assert_eq!(stats.expired_total, 2);
    assert_eq!(
        store.ack(vec![seqs[0]]).await.unwrap(),
        0,
        "already expired"
    );
    store.close().await.unwrap();

    // The periodic pass: a 100 ms TTL is swept every 50 ms without being asked.
    s.ttl = Some(Duration::from_millis(100));
    let store = Store::open(s).unwrap();
    store.append(vec![rec(Priority::Low, 100)]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stats().await.unwrap().records > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "periodic TTL pass never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.stats().await.unwrap().expired_total, 4);
}

#[tokio::test]
async fn expired_records_make_room_before_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 300);
    s.ttl = Some(Duration::from_secs(60));
    s.when_full = WhenFull::RejectNew;
    let store = Store::open(s).unwrap();
    let mut old = rec(Priority::High, 200);
    old.ingested_at_ms = now_ms() - 120_000;
    store.append(vec![old]).await.unwrap();
    store.append(vec![rec(Priority::Low, 200)]).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.records,
            stats.expired_total,
            stats.rejected_full_total
        ),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn failed_commit_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    // Long enough that both writes below surely land in the same (failing) batch.
    s.batch_max_delay = Duration::from_millis(200);
    let store = Store::open(s.clone()).unwrap();
    store.append(vec![rec(Priority::High, 100)]).await.unwrap();
    store.put_state("k", b"before".to_vec()).await.unwrap();
    store.fail_next_commit();
    let (a, b) = tokio::join!(
        store.append(vec![rec(Priority::High, 100)]),
        store.put_state("k", b"after".to_vec())
    );
    assert!(matches!(a, Err(StoreError::CommitFailed(_))), "{a:?}");
    assert!(matches!(b, Err(StoreError::CommitFailed(_))), "{b:?}");
    assert!(store.is_poisoned());
    assert!(matches!(
        store.append(vec![rec(Priority::High, 100)]).await,
        Err(StoreError::Poisoned)
    ));
    assert!(matches!(
        store.ack(vec![1]).await,
        Err(StoreError::Poisoned)
    ));
    // Reads still work and show the last committed state.
    let stats = store.stats().await.unwrap();
    assert!(stats.poisoned);
    assert_eq!(
        (stats.records, stats.appended_total, stats.commits_total),
        (1, 1, 2)
    );
    assert_eq!(seqs_of(&store, Priority::High).await, vec![1]);
    assert_eq!(
        store.get_state("k").await.unwrap(),
        Some(b"before".to_vec())
    );
    store.close().await.unwrap();

    // Reopening starts clean from what was committed.
    let store = Store::open(s).unwrap();
    assert!(!store.is_poisoned());
    assert_eq!(
        store.append(vec![rec(Priority::High, 100)]).await.unwrap(),
        vec![2]
    );
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
            supported: 1,
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
