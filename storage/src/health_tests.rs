//! Failures and healing: a failed commit rolls back, new records are refused while acks and TTL
//! passes are still attempted, the writer retries with back-off, and the first write that
//! commits makes the store healthy again, without a restart and without losing anything that was
//! committed. Faults come from `fail_next_commits` (a real SQLite error inside the transaction);
//! the real full disk is in `full_disk_tests`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::TestClock;
use crate::tests::{NO_RETRY, letter, open_retrying, rec, seqs_of, settings};
use crate::{DeadLetterLimits, Priority, Store, StoreError, StoreHealth, Tuning};

/// Polls until `done` holds, at most 10 s; returns how long it took.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_failed_commit_refuses_new_records_then_heals_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    // Long enough that both writes below surely land in the same (failing) batch.
    s.batch_max_delay = Duration::from_millis(200);
    let clock = TestClock::new(1_700_000_000_000);
    let tuning = Tuning {
        clock: Arc::clone(&clock) as Arc<dyn crate::clock::Clock>,
        // Long enough for the checks below to see the failing store even on a loaded machine.
        retry_min: Duration::from_secs(1),
        retry_max: Duration::from_secs(2),
    };
    let store = Store::open_tuned(s.clone(), DeadLetterLimits::default(), tuning).unwrap();
    store.append(vec![rec(Priority::High, 100)]).await.unwrap();
    store.put_state("k", b"before".to_vec()).await.unwrap();
    store.fail_next_commit();
    let (a, b) = tokio::join!(
        store.append(vec![rec(Priority::High, 100)]),
        store.put_state("k", b"after".to_vec())
    );
    assert!(matches!(a, Err(StoreError::CommitFailed(_))), "{a:?}");
    assert!(matches!(b, Err(StoreError::CommitFailed(_))), "{b:?}");

    // Failing: says since when and why; new records and dead letters are refused untried.
    assert!(store.is_poisoned());
    let health = store.health();
    match &health {
        StoreHealth::Failing {
            since_ms,
            last_error,
            retries,
        } => {
            assert_eq!(*since_ms, 1_700_000_000_000);
            assert!(
                last_error.contains("outpost_injected_fault"),
                "{last_error}"
            );
            assert_eq!(*retries, 0);
        }
        StoreHealth::Healthy => panic!("healthy right after a failed commit"),
    }
    assert!(matches!(
        store.append(vec![rec(Priority::High, 100)]).await,
        Err(StoreError::Poisoned)
    ));
    assert!(matches!(
        store.dead_letter(letter(100, 1)).await,
        Err(StoreError::Poisoned)
    ));
    // Reads keep working and show the last committed state.
    let stats = store.stats().await.unwrap();
    assert!(stats.poisoned);
    assert_eq!(stats.health, health);
    assert_eq!(
        (
            stats.records,
            stats.appended_total,
            stats.commits_total,
            stats.rejected_full_total,
            stats.commit_failures_total,
            stats.recoveries_total
        ),
        (1, 1, 2, 0, 1, 0)
    );
    assert_eq!(seqs_of(&store, Priority::High).await, vec![1]);
    assert_eq!(
        store.get_state("k").await.unwrap(),
        Some(b"before".to_vec())
    );

    // The writer's retry commits: healthy again, no restart, and the seqs go on.
    let took = wait_until("healthy again", || !store.is_poisoned()).await;
    assert!(took < Duration::from_secs(5), "healed after {took:?}");
    assert_eq!(store.health(), StoreHealth::Healthy);
    assert_eq!(
        store.append(vec![rec(Priority::High, 100)]).await.unwrap(),
        vec![2]
    );
    let stats = store.stats().await.unwrap();
    assert!(!stats.poisoned);
    assert_eq!(
        (
            stats.records,
            stats.appended_total,
            stats.commits_total,
            stats.commit_failures_total,
            stats.recoveries_total
        ),
        (2, 2, 4, 1, 1),
        "the retry and the append committed"
    );
    store.close().await.unwrap();

    // On disk: what was committed, nothing of the failed batch.
    let store = Store::open(s).unwrap();
    assert_eq!(seqs_of(&store, Priority::High).await, vec![1, 2]);
    assert_eq!(
        store.get_state("k").await.unwrap(),
        Some(b"before".to_vec())
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.commit_failures_total, stats.recoveries_total),
        (0, 0),
        "not persisted"
    );
}

#[tokio::test]
async fn while_failing_acks_are_attempted_and_the_first_that_commits_heals() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_retrying(settings(dir.path(), 1 << 20), NO_RETRY, NO_RETRY);
    store
        .append((0..3).map(|_| rec(Priority::Normal, 100)).collect())
        .await
        .unwrap();
    store.fail_next_commits(2);
    let got = store.append(vec![rec(Priority::Normal, 100)]).await;
    assert!(matches!(got, Err(StoreError::CommitFailed(_))), "{got:?}");
    // Attempted (a refusal would be `Poisoned`), and failed by the second injected fault.
    let got = store.ack(vec![1]).await;
    assert!(matches!(got, Err(StoreError::CommitFailed(_))), "{got:?}");
    assert!(matches!(
        store.health(),
        StoreHealth::Failing { retries: 1, .. }
    ));
    assert!(matches!(
        store.append(vec![rec(Priority::Normal, 100)]).await,
        Err(StoreError::Poisoned)
    ));
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![1, 2, 3]);

    // The next ack commits: the record is gone, and the store is healthy again by that alone.
    assert_eq!(store.ack(vec![1]).await.unwrap(), 1);
    assert!(!store.is_poisoned());
    assert_eq!(
        store
            .append(vec![rec(Priority::Normal, 100)])
            .await
            .unwrap(),
        vec![4]
    );
    assert_eq!(seqs_of(&store, Priority::Normal).await, vec![2, 3, 4]);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (
            stats.records,
            stats.acked_total,
            stats.appended_total,
            stats.commit_failures_total,
            stats.recoveries_total
        ),
        (3, 1, 4, 2, 1)
    );
}

#[tokio::test]
async fn retries_back_off_doubling_and_are_counted_until_one_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_retrying(
        settings(dir.path(), 1 << 20),
        Duration::from_millis(50),
        Duration::from_millis(400),
    );
    store.append(vec![rec(Priority::Low, 100)]).await.unwrap();
    // The append, then the retries at +50, +150 and +350 ms fail; the one at +750 ms commits.
    store.fail_next_commits(4);
    let start = Instant::now();
    let got = store.append(vec![rec(Priority::Low, 100)]).await;
    assert!(matches!(got, Err(StoreError::CommitFailed(_))), "{got:?}");
    let mut most_retries = 0;
    wait_until("healthy again", || {
        if let StoreHealth::Failing { retries, .. } = store.health() {
            most_retries = most_retries.max(retries);
        }
        !store.is_poisoned()
    })
    .await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "healed after {took:?}"
    );
    assert_eq!(most_retries, 3);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.commit_failures_total, stats.recoveries_total),
        (4, 1)
    );
    assert_eq!(
        store.append(vec![rec(Priority::Low, 100)]).await.unwrap(),
        vec![2]
    );
}

#[tokio::test]
async fn a_failed_ttl_pass_fails_the_store_and_it_heals_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1 << 20);
    // A periodic pass every 50 ms.
    s.ttl = Some(Duration::from_millis(100));
    let store = Store::open(s).unwrap();
    store.fail_next_commit();
    let start = Instant::now();
    loop {
        let stats = store.stats().await.unwrap();
        if stats.recoveries_total > 0 {
            assert_eq!(stats.commit_failures_total, 1);
            assert!(!stats.poisoned);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.append(vec![rec(Priority::High, 100)]).await.unwrap();
}
