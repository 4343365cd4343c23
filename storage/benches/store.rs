//! Store benchmarks (plain binary, `harness = false`):
//!
//! - append throughput with group commit (concurrent tasks, one record per call, like publishers
//!   waiting for their PUBACK) for both durabilities, against the one-transaction-per-record
//!   baseline (`batch_max_records = 1`, same code path) in the same run;
//! - drain rate (read_after + ack, as the sync engine does);
//! - `Store::open` time with an empty store and with a 1,000,000-record backlog.
//!
//! Run: `cargo bench -p outpost-storage --profile bench-fast`.
//! `OUTPOST_BENCH_RECORDS` overrides the 200,000 records of the group-commit runs.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use outpost_storage::{
    Durability, NewRecord, Priority, RefusedLimits, Store, StoreSettings, WhenFull,
};

const PAYLOAD: usize = 100;
const TASKS: usize = 10;
const BASELINE_RECORDS: usize = 5_000;
const BACKLOG: usize = 1_000_000;
/// Appends in flight per task in the main runs.
const WINDOW: usize = 100;
/// Records of the run where each task waits for every append before the next: it is bound by
/// `TASKS / batch_max_delay` commits, so fewer records keep the run short.
const SEQUENTIAL_RECORDS: usize = 10_000;

fn settings(path: PathBuf, durability: Durability, batch_max_records: usize) -> StoreSettings {
    StoreSettings {
        path,
        quota_bytes: 10 << 30,
        ttl: None,
        when_full: WhenFull::EvictLowestOldest,
        batch_max_records,
        batch_max_delay: Duration::from_millis(5),
        durability,
        refused: RefusedLimits::default(),
    }
}

fn record(i: usize) -> NewRecord {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    NewRecord {
        stream: format!("outpost/bench/sensor-{}", i % 16),
        priority: Priority::ALL[i % 3],
        payload: Bytes::from(vec![(i % 251) as u8; PAYLOAD]),
        ingested_at_ms: now,
    }
}

struct Row {
    name: String,
    records: usize,
    elapsed: Duration,
    commits: u64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

/// `records` appends of one record each, spread over `TASKS` concurrent tasks, each keeping up to
/// `window` appends in flight (like an MQTT publisher's in-flight window of unacked QoS 1).
async fn append_run(
    name: &str,
    path: &Path,
    durability: Durability,
    batch_max_records: usize,
    records: usize,
    window: usize,
) -> Row {
    let store = Store::open(settings(path.to_path_buf(), durability, batch_max_records)).unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        let per_task = records / TASKS;
        tasks.push(tokio::spawn(async move {
            let mut in_flight = tokio::task::JoinSet::new();
            for i in 0..per_task {
                if in_flight.len() >= window {
                    in_flight.join_next().await.unwrap().unwrap();
                }
                let store = store.clone();
                let record = record(t * per_task + i);
                in_flight.spawn(async move { store.append(vec![record]).await.unwrap() });
            }
            while let Some(done) = in_flight.join_next().await {
                done.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let stats = store.stats().await.unwrap();
    store.close().await.unwrap();
    Row {
        name: name.into(),
        records: stats.appended_total as usize,
        elapsed,
        commits: stats.commits_total,
    }
}

/// Drains a store the way the sync engine does: read a window per priority, ack it.
async fn drain_run(path: &Path) -> Row {
    let store = Store::open(settings(path.to_path_buf(), Durability::Full, 1000)).unwrap();
    let before = store.stats().await.unwrap();
    let start = Instant::now();
    let mut drained = 0;
    for p in Priority::ALL {
        let mut after = 0;
        loop {
            let window = store.read_after(p, after, 1000).await.unwrap();
            let Some(last) = window.last() else { break };
            after = last.seq;
            drained += window.len();
            store
                .ack(window.iter().map(|r| r.seq).collect())
                .await
                .unwrap();
        }
    }
    let elapsed = start.elapsed();
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.records, 0);
    store.close().await.unwrap();
    Row {
        name: "drain: read_after(1000) + ack, Full".into(),
        records: drained,
        elapsed,
        commits: stats.commits_total - before.commits_total,
    }
}

/// Builds the 1M-record backlog once (big calls, Normal durability) and times open().
async fn open_runs(dir: &Path) -> Vec<(String, Duration)> {
    let empty = dir.join("empty.db");
    drop(Store::open(settings(empty.clone(), Durability::Full, 1000)).unwrap());
    let backlog = dir.join("backlog.db");
    let build = Instant::now();
    {
        let store = Store::open(settings(backlog.clone(), Durability::Normal, 10_000)).unwrap();
        for chunk in 0..BACKLOG / 10_000 {
            let records = (0..10_000).map(|i| record(chunk * 10_000 + i)).collect();
            store.append(records).await.unwrap();
        }
        assert_eq!(store.stats().await.unwrap().records, BACKLOG as u64);
        store.close().await.unwrap();
    }
    let build = build.elapsed();
    let size = std::fs::metadata(&backlog).unwrap().len();
    let mut out = vec![(
        format!(
            "build 1M backlog ({} MiB file, 10k-record calls)",
            size >> 20
        ),
        build,
    )];
    for (name, path) in [
        ("empty store", &empty),
        ("1,000,000-record backlog", &backlog),
    ] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let store = Store::open(settings(path.to_path_buf(), Durability::Full, 1000)).unwrap();
            let elapsed = start.elapsed();
            let stats = store.stats().await.unwrap();
            times.push(elapsed);
            assert!(stats.last_seq > 0 || path == &empty);
            store.close().await.unwrap();
        }
        times.sort();
        out.push((format!("open(), {name} (median of 5)"), times[2]));
    }
    out
}

fn main() {
    let records: usize = std::env::var("OUTPOST_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    runtime.block_on(async {
        let w = WINDOW;
        let rows = [
            append_run("per-record tx, Full, window 100", &d.join("b1.db"), Durability::Full, 1, BASELINE_RECORDS, w).await,
            append_run("group commit, Full, window 100", &d.join("g1.db"), Durability::Full, 1000, records, w).await,
            append_run("per-record tx, Normal, window 100", &d.join("b2.db"), Durability::Normal, 1, BASELINE_RECORDS, w).await,
            append_run("group commit, Normal, window 100", &d.join("g2.db"), Durability::Normal, 1000, records, w).await,
            append_run("per-record tx, Full, window 1", &d.join("b3.db"), Durability::Full, 1, BASELINE_RECORDS, 1).await,
            append_run("group commit, Full, window 1", &d.join("g3.db"), Durability::Full, 1000, SEQUENTIAL_RECORDS, 1).await,
            drain_run(&d.join("g1.db")).await,
        ];
        println!(
            "\nappend: {TASKS} concurrent tasks, one {PAYLOAD}-byte record per call, each task with \
             `window` calls in flight; batch <= 1000 records / 5 ms\n"
        );
        println!(
            "{:<40} {:>9} {:>9} {:>11} {:>9} {:>11}",
            "scenario", "records", "seconds", "records/s", "commits", "vs per-rec"
        );
        for (i, row) in rows.iter().enumerate() {
            let baseline = match i {
                1 => Some(rows[0].rate()),
                3 => Some(rows[2].rate()),
                5 => Some(rows[4].rate()),
                _ => None,
            };
            println!(
                "{:<40} {:>9} {:>9.2} {:>11.0} {:>9} {:>11}",
                row.name,
                row.records,
                row.elapsed.as_secs_f64(),
                row.rate(),
                row.commits,
                baseline.map_or("".into(), |b| format!("{:.1}x", row.rate() / b)),
            );
        }
        println!();
        let opens = open_runs(d).await;
        let empty = opens[1].1;
        for (name, t) in &opens {
            println!(
                "{:<52} {:>10.2} ms",
                name,
                t.as_secs_f64() * 1000.0
            );
        }
        println!(
            "open() with 1M backlog vs empty: {:.2}x",
            opens[2].1.as_secs_f64() / empty.as_secs_f64()
        );
    });
}
