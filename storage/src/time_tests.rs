//! Time that does not lie: the TTL runs on the store clock (running time, persisted across
//! restarts), never on the wall clock, so clock jumps either way, a clock that was not set yet
//! (1970) and restarts neither expire a record early nor keep it forever. The clocks are
//! injected ([`TestClock`]) and moved by hand.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::TestClock;
use crate::tests::{open_at, rec, seqs_of, settings};
use crate::{Priority, Store, StoreSettings, WhenFull, read_stats};

const YEAR_MS: i64 = 365 * 24 * 3600 * 1000;
/// 2025-01-01, a wall clock that was set.
const WALL_2025: u64 = 1_735_689_600_000;
const TTL: Duration = Duration::from_secs(60);

fn with_ttl(dir: &Path) -> StoreSettings {
    let mut s = settings(dir, 64 << 20);
    s.ttl = Some(TTL);
    s
}

async fn all_seqs(store: &Store) -> Vec<u64> {
    let mut all = Vec::new();
    for p in Priority::ALL {
        all.extend(seqs_of(store, p).await);
    }
    all.sort_unstable();
    all
}

#[tokio::test]
async fn ttl_hides_expired_records_and_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(WALL_2025);
    let store = open_at(with_ttl(dir.path()), &clock);
    let old = store
        .append((0..3).map(|_| rec(Priority::Normal, 100)).collect())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30));
    let fresh = store
        .append(vec![rec(Priority::Normal, 100)])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(31));
    // 61 s and 31 s stored: the old ones are hidden before any pass deleted them...
    assert_eq!(seqs_of(&store, Priority::Normal).await, fresh);
    assert_eq!(store.stats().await.unwrap().records, 4);
    // ...then deleted and counted.
    assert_eq!(store.expire_now().await.unwrap(), 3);
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.records, stats.bytes, stats.expired_total),
        (1, 100, 3)
    );
    assert_eq!(store.ack(vec![old[0]]).await.unwrap(), 0, "already expired");
    store.close().await.unwrap();

    // The periodic pass, on the real clocks: a 100 ms TTL is swept every 50 ms unasked.
    let mut s = with_ttl(dir.path());
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
    assert_eq!(store.stats().await.unwrap().expired_total, 5);
}

#[tokio::test]
async fn expired_records_make_room_before_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = with_ttl(dir.path());
    s.quota_bytes = 300;
    s.when_full = WhenFull::RejectNew;
    let clock = TestClock::new(WALL_2025);
    let store = open_at(s, &clock);
    store.append(vec![rec(Priority::High, 200)]).await.unwrap();
    clock.advance(TTL + Duration::from_secs(1));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_jump_of_a_year_either_way_under_load_expires_nothing_early_or_never() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(WALL_2025);
    let store = open_at(with_ttl(dir.path()), &clock);
    // Ten rounds, one second of running time apart, while the wall clock jumps a year forward
    // and back, appenders stamp what the wall clock says and TTL passes run.
    for round in 0..10i64 {
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let store = store.clone();
            let clock = Arc::clone(&clock);
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let mut r = rec(Priority::Normal, 100);
                    r.ingested_at_ms = crate::clock::Clock::wall_ms(&*clock);
                    store.append(vec![r]).await.unwrap();
                }
            }));
        }
        clock.jump_wall(if round % 2 == 0 {
            YEAR_MS
        } else {
            -2 * YEAR_MS
        });
        assert_eq!(store.expire_now().await.unwrap(), 0);
        for t in tasks {
            t.await.unwrap();
        }
        clock.jump_wall(if round % 2 == 0 {
            -YEAR_MS
        } else {
            2 * YEAR_MS
        });
        clock.advance(Duration::from_secs(1));
    }
    assert_eq!(store.expire_now().await.unwrap(), 0);
    assert_eq!(all_seqs(&store).await.len(), 1000, "nothing expired early");

    // The first round was stored at 0 s of running time, the last at 9 s; now is 10 s. The
    // wall clock ends a year behind: it does not keep anything forever either.
    clock.jump_wall(-YEAR_MS);
    clock.advance(Duration::from_millis(49_900));
    assert_eq!(store.expire_now().await.unwrap(), 0, "59.9 s: not yet");
    clock.advance(Duration::from_millis(200));
    assert_eq!(
        store.expire_now().await.unwrap(),
        100,
        "60.1 s: the first round"
    );
    assert_eq!(all_seqs(&store).await.len(), 900);
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        store.expire_now().await.unwrap(),
        900,
        "70.1 s: all of them"
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.records, stats.expired_total), (0, 1000));
}

#[tokio::test]
async fn a_1970_ingest_time_is_stored_as_given_and_ages_from_when_it_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    // A board without an RTC before NTP: 5 s after the epoch.
    let clock = TestClock::new(5_000);
    let store = open_at(with_ttl(dir.path()), &clock);
    let mut r = rec(Priority::High, 100);
    r.ingested_at_ms = crate::clock::Clock::wall_ms(&*clock);
    store.append(vec![r]).await.unwrap();
    // NTP sets the clock: 55 years in one step.
    clock.jump_wall(i64::try_from(WALL_2025).unwrap());
    clock.advance(Duration::from_secs(59));
    assert_eq!(store.expire_now().await.unwrap(), 0);
    let got = store.read_after(Priority::High, 0, 10).await.unwrap();
    assert_eq!(
        got[0].ingested_at_ms, 5_000,
        "returned as given, for consumers"
    );
    assert_eq!(
        store.stats().await.unwrap().oldest_ingested_at_ms,
        Some(5_000)
    );
    clock.advance(Duration::from_secs(2));
    assert!(
        store
            .read_after(Priority::High, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.expire_now().await.unwrap(), 1);
}

#[tokio::test]
async fn records_age_by_running_time_across_restarts_and_not_while_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let s = with_ttl(dir.path());
    let clock = TestClock::new(WALL_2025);
    let store = open_at(s.clone(), &clock);
    let seqs = store
        .append(vec![rec(Priority::Normal, 100)])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(40));
    // close() persists the store clock: those 40 s count after the restart.
    store.close().await.unwrap();

    // A day later by the wall clock (the board was off), a new boot: the monotonic clock starts
    // over. Stopped time does not count: 40 s of running time so far.
    let clock = TestClock::new(WALL_2025 + 24 * 3600 * 1000);
    let store = open_at(s.clone(), &clock);
    assert_eq!(all_seqs(&store).await, seqs);
    clock.advance(Duration::from_secs(19));
    assert_eq!(store.expire_now().await.unwrap(), 0, "59 s of running time");
    // Dropping the last handle closes the store the same way.
    drop(store);

    let clock = TestClock::new(0);
    let store = open_at(s, &clock);
    assert_eq!(all_seqs(&store).await, seqs);
    clock.advance(Duration::from_secs(2));
    assert!(all_seqs(&store).await.is_empty(), "61 s of running time");
    assert_eq!(store.expire_now().await.unwrap(), 1);
}

#[tokio::test]
async fn records_of_a_store_before_version_4_age_from_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let s = with_ttl(dir.path());
    {
        let store = Store::open(settings(dir.path(), 64 << 20)).unwrap();
        let mut old = rec(Priority::Normal, 100);
        old.ingested_at_ms = WALL_2025 - 2 * YEAR_MS as u64;
        let mut unset = rec(Priority::Normal, 100);
        unset.ingested_at_ms = 12;
        store.append(vec![old, unset]).await.unwrap();
        store.close().await.unwrap();
    }
    // Back to version 3 as a version 3 build left it.
    rusqlite::Connection::open(&s.path)
        .unwrap()
        .execute_batch(
            "DROP TABLE clock_marks;
             ALTER TABLE counters DROP COLUMN clock_ms;
             ALTER TABLE counters DROP COLUMN last_seq_clock_ms;
             PRAGMA user_version = 3;",
        )
        .unwrap();
    assert_eq!(read_stats(&s.path).unwrap().records, 2);

    let clock = TestClock::new(WALL_2025);
    let store = open_at(s, &clock);
    assert_eq!(
        store.expire_now().await.unwrap(),
        0,
        "not by their wall-clock age"
    );
    assert_eq!(all_seqs(&store).await, vec![1, 2]);
    clock.advance(TTL);
    assert_eq!(
        store.expire_now().await.unwrap(),
        2,
        "a TTL after the upgrade"
    );
}

#[tokio::test]
async fn clock_marks_stay_few_over_a_long_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = with_ttl(dir.path());
    s.batch_max_delay = Duration::ZERO;
    let clock = TestClock::new(WALL_2025);
    let store = open_at(s.clone(), &clock);
    // 10 minutes of running time, a record every 300 ms, TTL 60 s.
    for _ in 0..2000 {
        store.append(vec![rec(Priority::Low, 100)]).await.unwrap();
        clock.advance(Duration::from_millis(300));
    }
    store.expire_now().await.unwrap();
    let stats = store.stats().await.unwrap();
    // The last 60 s of records are left: 199 (or a few more by the mark granularity, never
    // fewer: never early).
    assert!(
        (199..=203).contains(&stats.records),
        "{} records",
        stats.records
    );
    let marks: i64 = rusqlite::Connection::open(&s.path)
        .unwrap()
        .query_row("SELECT count(*) FROM clock_marks", [], |row| row.get(0))
        .unwrap();
    // At most two per TTL / MARKS_PER_TTL (see `StoreClock`), plus the one at the cutoff.
    assert!(
        marks <= 2 * i64::from(crate::clock::MARKS_PER_TTL) + 2,
        "{marks} marks"
    );
}
