//! A real full filesystem: a small tmpfs the test mounts (root here). Where mounting is refused
//! the tests fail when `CI=true` and skip otherwise, saying why.
//!
//! What they showed (SQLite in WAL mode, the bundled build): the error is `SQLITE_FULL`
//! ("database or disk is full"); when the store's own growth filled the disk, the WAL holds
//! frames that cannot be checkpointed (the database file cannot grow), so even deletes (acks)
//! fail until space comes back from elsewhere; once it does, the next write on the same
//! connection commits, and nothing committed before is lost. When something else filled the
//! disk while the WAL had room (a completed checkpoint lets it restart from its beginning),
//! deletes commit, and appends reuse the pages they freed.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::tests::settings;
use crate::{
    DeadLetterLimits, Durability, NewRecord, Priority, Store, StoreError, StoreHealth,
    StoreSettings, Tuning,
};

/// A tmpfs mounted for the test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (after saying why) where mounting is refused, unless `CI=true`.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output();
        let why = match out {
            Ok(out) if out.status.success() => return Some(Tmpfs(at.to_path_buf())),
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and a tmpfs cannot be mounted here: {why}"
        );
        eprintln!("SKIP: cannot mount a tmpfs here: {why}");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Opens the store with a retry back-off of 500 ms doubling to 2 s: long enough that the checks
/// of a failing store see it failing, short enough to heal within seconds.
fn open(s: StoreSettings) -> Store {
    let tuning = Tuning {
        retry_min: Duration::from_millis(500),
        retry_max: Duration::from_secs(2),
        ..Tuning::default()
    };
    Store::open_tuned(s, DeadLetterLimits::default(), tuning).unwrap()
}

fn on(fs: &Tmpfs) -> StoreSettings {
    StoreSettings {
        path: fs.0.join("store.db"),
        durability: Durability::Full,
        ..settings(&fs.0, 1 << 30)
    }
}

/// A record with a payload of `len` bytes that says which one it is.
fn numbered(n: u64, len: usize) -> NewRecord {
    let mut payload = n.to_le_bytes().repeat(len / 8 + 1);
    payload.truncate(len);
    NewRecord {
        stream: "line/1".into(),
        priority: Priority::Normal,
        payload: Bytes::from(payload),
        ingested_at_ms: n,
    }
}

fn sizes(dir: &Path) -> String {
    ["store.db", "store.db-wal", "filler"]
        .iter()
        .map(|n| {
            let len = std::fs::metadata(dir.join(n)).map_or(0, |m| m.len());
            format!("{n}={len}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fills the filesystem with a file until a write fails.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&[0]).is_ok() {}
}

/// Everything the store returns, by seq.
async fn contents(store: &Store) -> BTreeMap<u64, Bytes> {
    store
        .read_after(Priority::Normal, 0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.seq, r.payload))
        .collect()
}

#[tokio::test]
async fn a_full_disk_refuses_new_records_and_heals_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "2m") else {
        return;
    };
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![0u8; 384 << 10]).unwrap();
    let store = open(on(&fs));

    // Append until the disk is full; everything appended is what must survive.
    let mut stored = BTreeMap::new();
    let mut n = 0u64;
    let error = loop {
        assert!(n < 100_000, "2 MiB never filled up");
        let batch: Vec<NewRecord> = (n..n + 10).map(|i| numbered(i, 1000)).collect();
        n += 10;
        match store.append(batch.clone()).await {
            Ok(seqs) => stored.extend(seqs.into_iter().zip(batch.into_iter().map(|r| r.payload))),
            Err(e) => break e,
        }
    };
    assert!(error.is_disk_full(), "{error:?}");
    assert!(!stored.is_empty());
    let health = store.health();
    match &health {
        StoreHealth::Failing { last_error, .. } => {
            assert!(last_error.contains("full"), "{last_error}");
        }
        StoreHealth::Healthy => panic!("healthy after a failed commit"),
    }
    eprintln!(
        "full after {} records ({}): {error}",
        stored.len(),
        sizes(&fs.0)
    );

    // While full: an ack is attempted (it may fail: the WAL cannot grow); new records are not
    // stored, whatever the answer.
    let first: Vec<u64> = stored.keys().take(10).copied().collect();
    match store.ack(first.clone()).await {
        Ok(existed) => {
            eprintln!("ack while full committed ({existed} deleted)");
            for seq in &first {
                stored.remove(seq);
            }
        }
        Err(e) => eprintln!("ack while full: {e} (disk full: {})", e.is_disk_full()),
    }
    let refused = store.append(vec![numbered(n, 1000)]).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::Poisoned) | Err(StoreError::CommitFailed(_))
        ),
        "{refused:?}"
    );
    assert_eq!(contents(&store).await, stored, "reads work while failing");

    // Space comes back outside the database: the store heals by itself, same connection.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let seqs = loop {
        match store.append(vec![numbered(n, 1000)]).await {
            Ok(seqs) => break seqs,
            Err(StoreError::Poisoned) | Err(StoreError::CommitFailed(_)) => {
                assert!(
                    freed.elapsed() < Duration::from_secs(8),
                    "not healed: {:?}",
                    store.health()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    let took = freed.elapsed();
    eprintln!("appends accepted again {took:?} after space came back");
    assert!(took < Duration::from_secs(6), "healed after {took:?}");
    stored.insert(seqs[0], numbered(n, 1000).payload);
    assert!(store.health().is_healthy());

    // Nothing committed was lost, and acks work.
    assert_eq!(contents(&store).await, stored);
    let acked: Vec<u64> = stored.keys().take(100).copied().collect();
    assert_eq!(store.ack(acked.clone()).await.unwrap(), 100);
    for seq in &acked {
        stored.remove(seq);
    }
    assert_eq!(contents(&store).await, stored);
    let stats = store.stats().await.unwrap();
    assert!(!stats.poisoned);
    assert!(stats.commit_failures_total >= 1, "{stats:?}");
    assert!(stats.recoveries_total >= 1, "{stats:?}");
    assert_eq!(stats.records, stored.len() as u64);
    eprintln!(
        "{} commit failures, {} recoveries",
        stats.commit_failures_total, stats.recoveries_total
    );
    store.close().await.unwrap();

    // And on disk.
    let store = open(on(&fs));
    assert_eq!(contents(&store).await, stored);
    store.close().await.unwrap();
}

#[tokio::test]
async fn acks_commit_on_a_disk_something_else_filled_while_the_wal_has_room() {
    let dir = tempfile::tempdir().unwrap();
    // Room for the data, its WAL and the 4 MiB disk reserve, so that once the filler is gone
    // the reserve can be set aside again.
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "32m") else {
        return;
    };
    let store = open(on(&fs));
    // About 6 MB: past SQLite's automatic checkpoint (a WAL of 1000 pages), so the WAL file is
    // 4 MB, restarted from its beginning, and about half of it in use.
    let mut stored = BTreeMap::new();
    for i in 0..60u64 {
        let batch: Vec<NewRecord> = (i * 100..i * 100 + 100)
            .map(|n| numbered(n, 1000))
            .collect();
        let seqs = store.append(batch.clone()).await.unwrap();
        stored.extend(seqs.into_iter().zip(batch.into_iter().map(|r| r.payload)));
    }
    // Something else (logs...) fills the disk.
    let filler = fs.0.join("filler");
    fill(&filler);
    eprintln!("disk filled by another file: {}", sizes(&fs.0));

    // The sync engine acks the oldest records, 250 at a time: deletes commit on the full disk
    // while the WAL file has room. They cannot checkpoint (the records appended since the last
    // checkpoint need the database file to grow), so the room runs out: the first failure
    // makes the store failing.
    let oldest: Vec<u64> = stored.keys().take(5000).copied().collect();
    let mut pending = Vec::new();
    let mut acked = 0;
    for seqs in oldest.chunks(250) {
        if !pending.is_empty() {
            pending.extend_from_slice(seqs);
            continue;
        }
        match store.ack(seqs.to_vec()).await {
            Ok(n) => {
                assert_eq!(n, 250);
                acked += n;
                for seq in seqs {
                    stored.remove(seq);
                }
            }
            Err(e) => {
                assert!(e.is_disk_full(), "{e:?}");
                pending.extend_from_slice(seqs);
            }
        }
    }
    eprintln!("{acked} acked on the full disk before the WAL ran out of room");
    assert!(acked >= 250, "no ack committed on the full disk");
    assert_eq!(contents(&store).await, stored);

    // Space comes back: the store heals by itself and the rest of the acks commit.
    if !pending.is_empty() {
        assert!(store.is_poisoned());
        std::fs::remove_file(&filler).unwrap();
        let freed = Instant::now();
        while store.is_poisoned() {
            assert!(freed.elapsed() < Duration::from_secs(8), "not healed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("healthy again {:?} after space came back", freed.elapsed());
        assert_eq!(
            store.ack(pending.clone()).await.unwrap(),
            pending.len() as u64
        );
        for seq in &pending {
            stored.remove(seq);
        }
    }
    assert_eq!(contents(&store).await, stored);
    // New records wait until the disk reserve (released on the full disk) can be set aside
    // again, tried every few seconds: the disk needs room for it.
    let _ = std::fs::remove_file(&filler);
    let since = Instant::now();
    loop {
        match store.append(vec![numbered(99_999, 1000)]).await {
            Ok(_) => break,
            Err(StoreError::DiskReserveReleased) => {
                assert!(
                    since.elapsed() < Duration::from_secs(8),
                    "reserve never set aside again"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_disk_reserve_lets_acks_shrink_a_backlog_that_filled_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "24m") else {
        return;
    };
    let store = open(on(&fs));
    let reserve = fs.0.join("store.db-reserve");
    assert_eq!(
        std::fs::metadata(&reserve).map(|m| m.len()).ok(),
        Some(crate::DISK_RESERVE_BYTES),
        "the reserve is set aside at open"
    );

    // The backlog itself fills the disk (the uplink is down).
    let mut stored = Vec::new();
    let mut n = 0u64;
    loop {
        assert!(n < 1_000_000, "24 MiB never filled up");
        let batch: Vec<NewRecord> = (n..n + 50).map(|i| numbered(i, 1000)).collect();
        n += 50;
        match store.append(batch).await {
            Ok(seqs) => stored.extend(seqs),
            Err(e) => {
                assert!(e.is_disk_full(), "{e:?}");
                break;
            }
        }
    }
    assert!(
        !reserve.exists(),
        "the reserve was released on the full disk"
    );
    eprintln!("full after {} records ({})", stored.len(), sizes(&fs.0));

    // New readings are refused while the reserve is released...
    let refused = store.append(vec![numbered(n, 1000)]).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::DiskReserveReleased) | Err(StoreError::Poisoned)
        ),
        "{refused:?}"
    );
    // ...but the uplink's acks commit and shrink the backlog (without the reserve nothing
    // commits on a disk the store filled itself: every commit needs room in the WAL).
    let mut acked = 0;
    for chunk in stored.chunks(500) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store.ack(chunk.to_vec()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "acks do not commit on the full disk: {e} ({})",
                        sizes(&fs.0)
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        acked += chunk.len();
    }
    assert_eq!(store.stats().await.unwrap().records, 0, "{acked} acked");

    // Once acks freed room inside the database, readings are taken again by themselves.
    let freed = Instant::now();
    loop {
        match store.append(vec![numbered(n, 1000)]).await {
            Ok(_) => break,
            Err(StoreError::DiskReserveReleased) | Err(StoreError::Poisoned) => {
                assert!(
                    freed.elapsed() < Duration::from_secs(10),
                    "readings still refused after the backlog was acked"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    eprintln!(
        "appends accepted again {:?} after the backlog was acked",
        freed.elapsed()
    );
}
