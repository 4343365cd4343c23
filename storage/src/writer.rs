//! The writer thread: owns the read-write connection, gathers writes into group commits, applies
//! quota and TTL, moves records into and out of the refused table, and when a commit fails rolls
//! back, refuses new records and retries until a write succeeds again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::runtime::Runtime;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::{Clock, StoreClock};
use crate::health::{Health, HealthCell};
use crate::schema::{self, Counters, to_i64, to_u64};
use crate::{
    DEAD_LETTER_OVERHEAD_BYTES, DeadLetter, DeadLetterLimits, EXPIRE_PASS_LIMIT, NewRecord,
    Priority, Record, Refusal, RefusedLimits, RefusedRecord, StateOp, StoreError, StoreHealth,
    StoreSettings, StoreStats, StoredDeadLetter, Tuning, WhenFull, accounted_size,
    dead_letter_accounted_size,
};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// How many eviction candidates one query fetches.
const EVICT_CHUNK: i64 = 256;
/// Upper bound between two TTL passes.
const EXPIRE_INTERVAL_MAX: Duration = Duration::from_secs(5);
/// Lower bound between two TTL passes, for tiny TTLs.
const EXPIRE_INTERVAL_MIN: Duration = Duration::from_millis(50);

pub(crate) enum Command {
    Write(Write),
    Read(Read),
    Close { reply: Reply<()> },
}

/// A write waiting for its group commit. The outcome fields are filled while the batch is applied
/// and sent only once the transaction has committed.
pub(crate) enum Write {
    Append {
        records: Vec<NewRecord>,
        reply: Reply<Vec<u64>>,
        /// Seqs, or a refusal (full / too large) that does not fail the batch.
        result: Result<Vec<u64>, StoreError>,
    },
    Ack {
        seqs: Vec<u64>,
        reply: Reply<u64>,
        existed: u64,
    },
    /// Puts and deletes in the `state` table, applied in order.
    States { ops: Vec<StateOp>, reply: Reply<()> },
    DeadLetter {
        letter: DeadLetter,
        reply: Reply<u64>,
        id: u64,
    },
    /// Records the upstream refused, moved from `records` to `refused`.
    Refuse {
        refusals: Vec<Refusal>,
        reply: Reply<u64>,
        moved: u64,
    },
    /// Refused records moved back to `records`.
    Requeue {
        seqs: Vec<u64>,
        reply: Reply<u64>,
        /// How many moved, or a refusal (full) that does not fail the batch.
        result: Result<u64, StoreError>,
    },
    Expire {
        /// `None` for the periodic pass the thread schedules itself.
        reply: Option<Reply<u64>>,
        expired: u64,
        /// Loop until nothing expired is left instead of one bounded pass.
        exhaustive: bool,
    },
}

impl Write {
    /// How much this write counts towards `batch_max_records`.
    fn weight(&self) -> usize {
        match self {
            Write::Append { records, .. } => records.len(),
            Write::Ack { seqs, .. } => seqs.len(),
            Write::States { ops, .. } => ops.len(),
            Write::DeadLetter { .. } => 1,
            Write::Refuse { refusals, .. } => refusals.len(),
            Write::Requeue { seqs, .. } => seqs.len(),
            // A TTL pass closes the batch: it is maintenance, not worth waiting for company.
            Write::Expire { .. } => usize::MAX,
        }
    }

    /// Answers the waiter: the outcome after a commit, or the commit failure.
    fn finish(self, failure: Option<&Arc<rusqlite::Error>>) {
        let failed = || failure.map(|e| StoreError::CommitFailed(Arc::clone(e)));
        // A waiter that gave up (dropped its future) is not an error.
        match self {
            Write::Append { reply, result, .. } => {
                let _ = reply.send(failed().map_or(result, Err));
            }
            Write::Ack { reply, existed, .. } => {
                let _ = reply.send(failed().map_or(Ok(existed), Err));
            }
            Write::States { reply, .. } => {
                let _ = reply.send(failed().map_or(Ok(()), Err));
            }
            Write::DeadLetter { reply, id, .. } => {
                let _ = reply.send(failed().map_or(Ok(id), Err));
            }
            Write::Refuse { reply, moved, .. } => {
                let _ = reply.send(failed().map_or(Ok(moved), Err));
            }
            Write::Requeue { reply, result, .. } => {
                let _ = reply.send(failed().map_or(result, Err));
            }
            Write::Expire { reply, expired, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(failed().map_or(Ok(expired), Err));
                }
            }
        }
    }

    /// Whether this write adds data (records, a dead letter, requeued records): refused while
    /// the store is failing. The others (acks, TTL passes, state, refusals) free space or record
    /// progress, and are attempted.
    fn adds_data(&self) -> bool {
        matches!(
            self,
            Write::Append { .. } | Write::DeadLetter { .. } | Write::Requeue { .. }
        )
    }

    /// Refuses the write without touching the database.
    fn refuse(self, error: impl Fn() -> StoreError) {
        match self {
            Write::Append { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Write::Ack { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Write::States { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Write::DeadLetter { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Write::Refuse { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Write::Requeue { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Write::Expire { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error()));
                }
            }
        }
    }
}

pub(crate) enum Read {
    After {
        priority: Priority,
        after_seq: u64,
        limit: usize,
        reply: Reply<Vec<Record>>,
    },
    Stats {
        reply: Reply<StoreStats>,
    },
    State {
        key: String,
        reply: Reply<Option<Vec<u8>>>,
    },
    StatePrefix {
        prefix: String,
        reply: Reply<Vec<(String, Vec<u8>)>>,
    },
    DeadLetters {
        limit: usize,
        reply: Reply<Vec<StoredDeadLetter>>,
    },
    Refused {
        limit: usize,
        reply: Reply<Vec<RefusedRecord>>,
    },
}

pub(crate) struct Writer {
    conn: Connection,
    /// `refused` already clamped by [`RefusedLimits::clamped`].
    settings: StoreSettings,
    /// Already clamped by [`DeadLetterLimits::clamped`].
    dead_letter_limits: DeadLetterLimits,
    /// Mirrors the committed counters row between batches.
    counters: Counters,
    /// The store clock; its marks mirror the committed `clock_marks` table between batches.
    store_clock: StoreClock,
    time: Arc<dyn Clock>,
    health: Health,
    fail_commits: Arc<AtomicU64>,
    committed: watch::Sender<u64>,
    /// When the next periodic TTL pass is due (only with a TTL, while healthy).
    next_expiry: Instant,
    /// The disk reserve (see [`crate::DISK_RESERVE_BYTES`]).
    reserve: Reserve,
}

/// How often a released disk reserve is tried again.
const RESERVE_RETRY: Duration = Duration::from_secs(3);

/// The file set aside so that a full disk still lets acks and expiry commit.
struct Reserve {
    path: std::path::PathBuf,
    state: ReserveState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReserveState {
    /// It could not be made at open (too little room): the store runs without one.
    Absent,
    Present,
    /// Deleted on a full disk; new records are refused until it is written again.
    Released {
        next_attempt: Instant,
    },
}

impl Reserve {
    fn open(db: &std::path::Path) -> Reserve {
        let mut name = db.as_os_str().to_owned();
        name.push("-reserve");
        let path = std::path::PathBuf::from(name);
        let state = match std::fs::metadata(&path) {
            Ok(m) if m.len() >= crate::DISK_RESERVE_BYTES => ReserveState::Present,
            _ => match write_reserve(&path) {
                Ok(()) => ReserveState::Present,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "no room for the store's disk reserve; a full disk may then block acks until space is freed");
                    ReserveState::Absent
                }
            },
        };
        Reserve { path, state }
    }

    /// Whether new records must wait for the reserve to be set aside again.
    fn released(&self) -> bool {
        matches!(self.state, ReserveState::Released { .. })
    }

    fn next_attempt(&self) -> Option<Instant> {
        match self.state {
            ReserveState::Released { next_attempt } => Some(next_attempt),
            _ => None,
        }
    }

    /// The disk is full: frees the reserve (once).
    fn release(&mut self) {
        if self.state == ReserveState::Present {
            let _ = std::fs::remove_file(&self.path);
            self.state = ReserveState::Released {
                next_attempt: Instant::now() + RESERVE_RETRY,
            };
            tracing::warn!(path = %self.path.display(), bytes = crate::DISK_RESERVE_BYTES, "disk full: released the store's disk reserve so acks and expiry can still commit; new records are refused until it can be set aside again");
        }
    }

    /// Tries to set the reserve aside again; on success new records are taken again. Without
    /// room on the disk, records are taken again once the database itself has at least twice
    /// the reserve in free pages (acks freed them; SQLite reuses them without growing the file),
    /// and the store then runs without a reserve.
    fn retry(&mut self, free_pages_bytes: u64) {
        match write_reserve(&self.path) {
            Ok(()) => {
                self.state = ReserveState::Present;
                tracing::info!(path = %self.path.display(), "the disk has room again: disk reserve set aside, the store accepts records");
            }
            Err(_) if free_pages_bytes >= 2 * crate::DISK_RESERVE_BYTES => {
                self.state = ReserveState::Absent;
                tracing::info!(path = %self.path.display(), free_pages_bytes, "the disk is still full but acks freed room inside the database: the store accepts records again, without a disk reserve");
            }
            Err(_) => {
                self.state = ReserveState::Released {
                    next_attempt: Instant::now() + RESERVE_RETRY,
                };
            }
        }
    }
}

/// Bytes in the database's free pages (freed by deletes, reused before the file grows).
fn free_pages_bytes(conn: &Connection) -> u64 {
    let pragma = |name: &str| -> u64 {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
            .map_or(0, |v| u64::try_from(v).unwrap_or(0))
    };
    pragma("freelist_count").saturating_mul(pragma("page_size"))
}

/// Writes the reserve file (zeros, synced) through a temporary name; nothing is left on failure.
fn write_reserve(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let chunk = vec![0u8; 64 << 10];
        let mut left = crate::DISK_RESERVE_BYTES;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Why the command loop ended.
enum Exit {
    /// Every handle was dropped.
    Disconnected,
    /// `close()` was called; answer it once the database is closed.
    Close(Reply<()>),
}

impl Writer {
    pub(crate) fn new(
        opened: schema::Opened,
        settings: StoreSettings,
        dead_letter_limits: DeadLetterLimits,
        tuning: Tuning,
        health: Arc<HealthCell>,
        fail_commits: Arc<AtomicU64>,
        committed: watch::Sender<u64>,
    ) -> Writer {
        let settings = StoreSettings {
            refused: settings.refused.clamped(),
            ..settings
        };
        let settings_path = settings.path.clone();
        let store_clock = StoreClock::new(
            opened.counters.clock_ms,
            tuning.clock.monotonic(),
            opened.marks,
            (opened.counters.last_seq_clock_ms, opened.counters.last_seq),
        );
        Writer {
            conn: opened.conn,
            settings,
            dead_letter_limits: dead_letter_limits.clamped(),
            counters: opened.counters,
            store_clock,
            time: tuning.clock,
            health: Health::new(tuning.retry_min, tuning.retry_max, health),
            fail_commits,
            committed,
            next_expiry: Instant::now(),
            reserve: Reserve::open(&settings_path),
        }
    }

    /// Every seq up to this one is expired now (0: none is, or no TTL).
    fn expired_through(&self) -> u64 {
        let now = self.store_clock.now_ms(&*self.time);
        self.store_clock.expired_through(self.settings.ttl, now)
    }

    /// Body of the writer thread.
    pub(crate) fn run_thread(mut self, mut rx: mpsc::Receiver<Command>, runtime: Runtime) {
        let exit = self.run(&mut rx, &runtime);
        if self.settings.ttl.is_some() && !self.health.is_failing() {
            // A last TTL pass, which also persists the store clock: the running time since the
            // last commit counts after a restart too.
            let mut batch = vec![Write::Expire {
                reply: None,
                expired: 0,
                exhaustive: false,
            }];
            let failure = self.commit(&mut batch);
            for w in batch {
                w.finish(failure.as_ref());
            }
        }
        let result = self.shutdown();
        // Commands queued behind close() are answered `Closed` by dropping them with the channel,
        // before close() is answered, so nothing is accepted after close() returned.
        drop(rx);
        match exit {
            Exit::Close(reply) => {
                let _ = reply.send(result);
            }
            Exit::Disconnected => {
                if let Err(error) = result {
                    tracing::warn!(%error, "closing the store after the last handle dropped");
                }
            }
        }
    }

    fn shutdown(self) -> Result<(), StoreError> {
        // Readers in other processes may hold the WAL: a partial checkpoint is not an error. A
        // failed one (a full disk: the database file cannot grow) is not either: everything
        // committed is in the WAL, which the next open reads.
        if let Err(error) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(
                path = %self.settings.path.display(),
                %error,
                "store checkpoint at close failed; the WAL keeps what it holds"
            );
        }
        self.conn.close().map_err(|(_, e)| StoreError::Sqlite(e))
    }

    fn expire_interval(&self) -> Option<Duration> {
        self.settings
            .ttl
            .map(|ttl| (ttl / 2).clamp(EXPIRE_INTERVAL_MIN, EXPIRE_INTERVAL_MAX))
    }

    fn run(&mut self, rx: &mut mpsc::Receiver<Command>, runtime: &Runtime) -> Exit {
        let max_records = self.settings.batch_max_records.max(1);
        loop {
            if self
                .reserve
                .next_attempt()
                .is_some_and(|at| Instant::now() >= at)
            {
                let free = free_pages_bytes(&self.conn);
                self.reserve.retry(free);
            }
            if self.health.is_failing() {
                // The retry, when due: it is also the TTL pass while failing.
                if self
                    .health
                    .next_retry()
                    .is_some_and(|at| Instant::now() >= at)
                {
                    self.retry();
                }
            } else if let Some(interval) = self.expire_interval()
                && Instant::now() >= self.next_expiry
            {
                // Periodic TTL pass, as its own small transaction between batches.
                let mut batch = vec![Write::Expire {
                    reply: None,
                    expired: 0,
                    exhaustive: false,
                }];
                let failure = self.commit(&mut batch);
                let full_pass = matches!(
                    batch.first(),
                    Some(Write::Expire { expired, .. }) if *expired >= EXPIRE_PASS_LIMIT as u64
                );
                for w in batch {
                    w.finish(failure.as_ref());
                }
                // A full pass means more is expired: come back soon, but after serving commands.
                self.next_expiry =
                    Instant::now() + if full_pass { Duration::ZERO } else { interval };
            }

            // Idle: wait for the first command (waking up for the next retry or TTL pass).
            let wake = if self.health.is_failing() {
                self.health.next_retry()
            } else {
                self.expire_interval().map(|_| self.next_expiry)
            };
            let wake = match (wake, self.reserve.next_attempt()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = match wake {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    match runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                        Err(_elapsed) => continue,
                        Ok(None) => return Exit::Disconnected,
                        Ok(Some(cmd)) => cmd,
                    }
                }
                None => match rx.blocking_recv() {
                    None => return Exit::Disconnected,
                    Some(cmd) => cmd,
                },
            };

            let mut batch = Vec::new();
            let mut weight = 0usize;
            match first {
                Command::Read(read) => {
                    self.serve(read);
                    continue;
                }
                Command::Close { reply } => return Exit::Close(reply),
                Command::Write(write) => self.accept(write, &mut batch, &mut weight),
            }
            if batch.is_empty() {
                continue;
            }

            // Gather more writes until the batch is full or its deadline passed.
            let deadline = Instant::now() + self.settings.batch_max_delay;
            let mut exit = None;
            while weight < max_records {
                let cmd = match rx.try_recv() {
                    Ok(cmd) => cmd,
                    Err(TryRecvError::Disconnected) => {
                        exit = Some(Exit::Disconnected);
                        break;
                    }
                    Err(TryRecvError::Empty) => {
                        let wait = deadline.saturating_duration_since(Instant::now());
                        if wait.is_zero() {
                            break;
                        }
                        match runtime
                            .block_on(async { tokio::time::timeout(wait, rx.recv()).await })
                        {
                            Err(_elapsed) => break,
                            Ok(None) => {
                                exit = Some(Exit::Disconnected);
                                break;
                            }
                            Ok(Some(cmd)) => cmd,
                        }
                    }
                };
                match cmd {
                    Command::Read(read) => self.serve(read),
                    Command::Write(write) => self.accept(write, &mut batch, &mut weight),
                    Command::Close { reply } => {
                        exit = Some(Exit::Close(reply));
                        break;
                    }
                }
            }
            let failure = self.commit(&mut batch);
            for w in batch {
                w.finish(failure.as_ref());
            }
            if let Some(exit) = exit {
                return exit;
            }
        }
    }

    fn accept(&self, write: Write, batch: &mut Vec<Write>, weight: &mut usize) {
        if self.health.is_failing() && write.adds_data() {
            write.refuse(|| StoreError::Poisoned);
            return;
        }
        if self.reserve.released() && write.adds_data() {
            write.refuse(|| StoreError::DiskReserveReleased);
            return;
        }
        *weight = weight.saturating_add(write.weight());
        batch.push(write);
    }

    fn serve(&mut self, read: Read) {
        match read {
            Read::After {
                priority,
                after_seq,
                limit,
                reply,
            } => {
                let after_seq = after_seq.max(self.expired_through());
                let _ = reply.send(schema::read_after(&self.conn, priority, after_seq, limit));
            }
            Read::Stats { reply } => {
                let result = schema::oldest_ingested_at(&self.conn)
                    .map(|oldest| StoreStats {
                        poisoned: self.health.is_failing(),
                        health: self.health.state().clone(),
                        commit_failures_total: self.health.commit_failures_total,
                        recoveries_total: self.health.recoveries_total,
                        ..self.counters.to_stats(oldest)
                    })
                    .map_err(StoreError::from);
                let _ = reply.send(result);
            }
            Read::State { key, reply } => {
                let _ = reply.send(schema::get_state(&self.conn, &key).map_err(StoreError::from));
            }
            Read::StatePrefix { prefix, reply } => {
                let _ = reply.send(
                    schema::states_with_prefix(&self.conn, &prefix).map_err(StoreError::from),
                );
            }
            Read::DeadLetters { limit, reply } => {
                let _ = reply.send(schema::read_dead_letters(
                    &self.conn,
                    schema::SCHEMA_VERSION,
                    limit,
                ));
            }
            Read::Refused { limit, reply } => {
                let _ = reply.send(schema::read_refused(
                    &self.conn,
                    schema::SCHEMA_VERSION,
                    limit,
                ));
            }
        }
    }
}

impl Writer {
    /// Applies the batch in one transaction. On success the counters move forward, waiters get
    /// their outcomes, and a failing store is healthy again. On any SQL failure the transaction
    /// is rolled back, the in-memory counters and marks are restored and checked against the
    /// file, the store is failing (new records refused, a retry scheduled), and the failure is
    /// returned for every waiter.
    fn commit(&mut self, batch: &mut [Write]) -> Option<Arc<rusqlite::Error>> {
        if batch.is_empty() {
            return None;
        }
        let before = self.counters.clone();
        let clock_before = self.store_clock.clone();
        let inject_fault = self
            .fail_commits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        let now = self.store_clock.now_ms(&*self.time);
        match apply_batch(
            &mut self.conn,
            &self.settings,
            &self.dead_letter_limits,
            &mut self.counters,
            &mut self.store_clock,
            now,
            batch,
            inject_fault,
        ) {
            Ok(()) => {
                if let Some(StoreHealth::Failing {
                    since_ms, retries, ..
                }) = self.health.succeeded(Instant::now())
                {
                    tracing::info!(
                        path = %self.settings.path.display(),
                        since_ms,
                        retries,
                        "store write committed again; the store is healthy and accepts records"
                    );
                }
                let last_seq = self.counters.last_seq;
                // Requeued records are new data for sync too, though no seq was assigned.
                let requeued = batch
                    .iter()
                    .any(|w| matches!(w, Write::Requeue { result: Ok(n), .. } if *n > 0));
                self.committed.send_if_modified(|seq| {
                    let changed = *seq != last_seq;
                    *seq = last_seq;
                    changed || requeued
                });
                None
            }
            Err(error) => {
                self.counters = before;
                self.store_clock = clock_before;
                self.after_rollback();
                self.failed(&error);
                Some(Arc::new(error))
            }
        }
    }

    /// Makes sure nothing of a failed transaction is left open (rusqlite rolls back when the
    /// transaction is dropped; a failed COMMIT can leave it open, e.g. on SQLITE_FULL), then
    /// checks the restored counters against the file: the file is the truth.
    fn after_rollback(&mut self) {
        if !self.conn.is_autocommit()
            && let Err(error) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::warn!(%error, "store rollback after a failed commit");
        }
        match schema::load_counters(&self.conn) {
            Ok(on_disk) if on_disk != self.counters => {
                tracing::warn!(
                    path = %self.settings.path.display(),
                    "store counters differ from the file after a rollback; using the file's"
                );
                self.counters = on_disk;
            }
            Ok(_) => {}
            // The retry reads them again before writing.
            Err(error) => tracing::warn!(%error, "store counters unreadable after a rollback"),
        }
    }

    /// Takes a failure into the health state and says so.
    fn failed(&mut self, error: &rusqlite::Error) {
        if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            self.reserve.release();
        }
        let first = !self.health.is_failing();
        let retry_in = self
            .health
            .failed(Instant::now(), self.time.wall_ms(), error.to_string());
        let path = self.settings.path.display();
        if first {
            tracing::error!(
                %path,
                %error,
                ?retry_in,
                "store commit failed and was rolled back; refusing new records until a write \
                 succeeds"
            );
        } else if let StoreHealth::Failing { retries, .. } = self.health.state() {
            tracing::warn!(%path, %error, retries, ?retry_in, "store write still failing");
        }
    }

    /// While failing: reads the counters and marks back from the file, then commits a TTL pass
    /// (which writes the counters row, so it is a write even without a TTL). If that commits,
    /// the store is healthy again.
    fn retry(&mut self) {
        let reread = schema::load_counters(&self.conn)
            .and_then(|c| schema::load_marks(&self.conn).map(|m| (c, m)));
        match reread {
            Ok((counters, marks)) => {
                if counters != self.counters {
                    tracing::warn!(
                        path = %self.settings.path.display(),
                        "store counters differ from the file; using the file's"
                    );
                }
                let open = (counters.last_seq_clock_ms, counters.last_seq);
                self.counters = counters;
                self.store_clock.reload(marks, open);
            }
            Err(error) => {
                self.failed(&error);
                return;
            }
        }
        let mut batch = vec![Write::Expire {
            reply: None,
            expired: 0,
            exhaustive: false,
        }];
        let failure = self.commit(&mut batch);
        for w in batch {
            w.finish(failure.as_ref());
        }
        // Back to the regular TTL schedule once healthy.
        self.next_expiry = Instant::now();
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_batch(
    conn: &mut Connection,
    settings: &StoreSettings,
    dead_letter_limits: &DeadLetterLimits,
    counters: &mut Counters,
    store_clock: &mut StoreClock,
    now: u64,
    batch: &mut [Write],
    inject_fault: bool,
) -> rusqlite::Result<()> {
    // IMMEDIATE: take the write lock up front rather than fail upgrading it mid-batch.
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let expired_through = store_clock.expired_through(settings.ttl, now);
    for write in batch.iter_mut() {
        match write {
            Write::Append {
                records, result, ..
            } => {
                *result = append_call(&mut tx, settings, counters, records, expired_through)?;
            }
            Write::Ack { seqs, existed, .. } => *existed = ack(&tx, counters, seqs)?,
            Write::States { ops, .. } => {
                for op in ops.iter() {
                    match op {
                        StateOp::Put { key, value } => {
                            tx.prepare_cached(
                                "INSERT INTO state (key, value) VALUES (?1, ?2)
                                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            )?
                            .execute(params![&**key, &**value])?;
                        }
                        StateOp::Delete { key } => {
                            tx.prepare_cached("DELETE FROM state WHERE key = ?1")?
                                .execute(params![&**key])?;
                        }
                    }
                }
            }
            Write::DeadLetter { letter, id, .. } => {
                *id = dead_letter(&tx, dead_letter_limits, counters, letter)?;
            }
            Write::Refuse {
                refusals, moved, ..
            } => {
                *moved = refuse(&tx, &settings.refused, counters, refusals)?;
            }
            Write::Requeue { seqs, result, .. } => {
                *result = requeue(&tx, settings, counters, seqs, expired_through)?;
            }
            Write::Expire {
                expired,
                exhaustive,
                ..
            } => {
                if settings.ttl.is_some() {
                    loop {
                        let n = expire(&tx, counters, expired_through, EXPIRE_PASS_LIMIT)?;
                        *expired += n;
                        if !*exhaustive || n < EXPIRE_PASS_LIMIT as u64 {
                            break;
                        }
                    }
                }
            }
        }
    }
    counters.commits_total += 1;
    // The store clock never goes back.
    counters.clock_ms = counters.clock_ms.max(now);
    if let Some((clock_ms, last_seq)) =
        store_clock.assigned(settings.ttl, counters.clock_ms, counters.last_seq)
    {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO clock_marks (clock_ms, last_seq) VALUES (?1, ?2)",
        )?
        .execute(params![to_i64(clock_ms), to_i64(last_seq)])?;
    }
    counters.last_seq_clock_ms = store_clock.open_ms();
    if let Some(below) = store_clock.prune(settings.ttl, counters.clock_ms) {
        tx.prepare_cached("DELETE FROM clock_marks WHERE clock_ms < ?1")?
            .execute([to_i64(below)])?;
    }
    schema::write_counters(&tx, counters)?;
    if inject_fault {
        // A real statement failure inside the transaction, so the genuine error path runs.
        tx.execute_batch("INSERT INTO outpost_injected_fault VALUES (1)")?;
    }
    tx.commit()
}

/// One append call, all-or-nothing inside a savepoint. The outer error is an SQL failure (fails
/// the batch); the inner one a refusal of this call only (counted, batch goes on).
fn append_call(
    tx: &mut rusqlite::Transaction<'_>,
    settings: &StoreSettings,
    counters: &mut Counters,
    records: &[NewRecord],
    expired_through: u64,
) -> rusqlite::Result<Result<Vec<u64>, StoreError>> {
    let quota = settings.quota_bytes;
    let sizes: Vec<u64> = records
        .iter()
        .map(|r| accounted_size(&r.stream, r.payload.len()))
        .collect();
    let refused = records.len() as u64;
    if let Some(&size) = sizes.iter().find(|&&size| size > quota) {
        counters.rejected_full_total += refused;
        return Ok(Err(StoreError::TooLarge { size, quota }));
    }
    let call_start = counters.clone();
    let mut sp = tx.savepoint()?;
    let mut seqs = Vec::with_capacity(records.len());
    let mut expired_once = false;
    for (record, &size) in records.iter().zip(&sizes) {
        if counters.bytes.saturating_add(size) > quota {
            if settings.ttl.is_some() && !expired_once {
                // Expired records are dead weight: drop them before refusing or evicting.
                expired_once = true;
                expire(&sp, counters, expired_through, EXPIRE_PASS_LIMIT)?;
            }
            let fits = match settings.when_full {
                WhenFull::RejectNew => counters.bytes.saturating_add(size) <= quota,
                WhenFull::EvictLowestOldest => {
                    evict_for(&sp, counters, record.priority, size, quota)?
                }
            };
            if !fits {
                sp.rollback()?;
                sp.commit()?;
                *counters = call_start;
                counters.rejected_full_total += refused;
                let needed = sizes.iter().fold(0u64, |a, &s| a.saturating_add(s));
                return Ok(Err(StoreError::Full { needed, quota }));
            }
        }
        let seq = counters.last_seq + 1;
        sp.prepare_cached(
            "INSERT INTO records (seq, stream, priority, ingested_at_ms, size, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            to_i64(seq),
            record.stream,
            record.priority.as_index() as i64,
            to_i64(record.ingested_at_ms),
            to_i64(size),
            record.payload.as_ref(),
        ])?;
        let p = record.priority.as_index();
        counters.last_seq = seq;
        counters.records += 1;
        counters.bytes += size;
        counters.records_by_priority[p] += 1;
        counters.appended_total += 1;
        seqs.push(seq);
    }
    sp.commit()?;
    Ok(Ok(seqs))
}

/// Evicts the oldest records of the lowest priority, never of a higher priority than `priority`,
/// until `size` more bytes fit. Returns whether they fit.
fn evict_for(
    conn: &Connection,
    counters: &mut Counters,
    priority: Priority,
    size: u64,
    quota: u64,
) -> rusqlite::Result<bool> {
    let fits = |c: &Counters| c.bytes.saturating_add(size) <= quota;
    for victim in Priority::ALL.iter().rev() {
        if victim.as_index() < priority.as_index() {
            break;
        }
        let v = victim.as_index();
        while !fits(counters) && counters.records_by_priority[v] > 0 {
            let mut candidates = conn.prepare_cached(
                "SELECT seq, size FROM records WHERE priority = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut rows = candidates.query(params![v as i64, EVICT_CHUNK])?;
            let mut last = None;
            let mut freed = 0u64;
            while let Some(row) = rows.next()? {
                last = Some(row.get::<_, i64>(0)?);
                freed = freed.saturating_add(to_u64(row.get(1)?));
                if counters.bytes.saturating_sub(freed).saturating_add(size) <= quota {
                    break;
                }
            }
            drop(rows);
            let Some(last) = last else {
                // The counters claim records the table does not have; stop instead of looping.
                tracing::warn!(
                    priority = v,
                    "store counters disagree with the records table"
                );
                break;
            };
            let deleted = conn
                .prepare_cached("DELETE FROM records WHERE priority = ?1 AND seq <= ?2")?
                .execute(params![v as i64, last])? as u64;
            counters.records = counters.records.saturating_sub(deleted);
            counters.bytes = counters.bytes.saturating_sub(freed);
            counters.records_by_priority[v] =
                counters.records_by_priority[v].saturating_sub(deleted);
            counters.evicted_total += deleted;
            counters.evicted_by_priority[v] += deleted;
        }
    }
    Ok(fits(counters))
}

/// Takes a deleted record out of the totals, from a `RETURNING priority, size` row.
fn forget(counters: &mut Counters, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
    let priority: i64 = row.get(0)?;
    let size: i64 = row.get(1)?;
    counters.remove(
        usize::try_from(priority).unwrap_or(usize::MAX),
        to_u64(size),
    );
    Ok(())
}

/// Deletes the given records; returns how many existed.
fn ack(conn: &Connection, counters: &mut Counters, seqs: &[u64]) -> rusqlite::Result<u64> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM records WHERE seq = ?1 RETURNING priority, size")?;
    let mut existed = 0;
    for &seq in seqs {
        let mut rows = stmt.query([to_i64(seq)])?;
        if let Some(row) = rows.next()? {
            forget(counters, row)?;
            counters.acked_total += 1;
            existed += 1;
        }
    }
    Ok(existed)
}

/// One bounded TTL pass: deletes up to `limit` expired records (seq up to `expired_through`),
/// oldest first. A range on the primary key: no scan of what is not expired.
fn expire(
    conn: &Connection,
    counters: &mut Counters,
    expired_through: u64,
    limit: usize,
) -> rusqlite::Result<u64> {
    if expired_through == 0 {
        return Ok(0);
    }
    let mut stmt = conn.prepare_cached(
        "DELETE FROM records WHERE seq IN (
             SELECT seq FROM records WHERE seq <= ?1 ORDER BY seq LIMIT ?2)
         RETURNING priority, size",
    )?;
    let mut rows = stmt.query(params![
        to_i64(expired_through),
        i64::try_from(limit).unwrap_or(i64::MAX)
    ])?;
    let mut expired = 0;
    while let Some(row) = rows.next()? {
        forget(counters, row)?;
        counters.expired_total += 1;
        expired += 1;
    }
    Ok(expired)
}

/// Moves the refused records from `records` to `refused` (see [`crate::Store::refuse`]), then
/// trims the refused table to its bounds. Returns how many moved. Copies row to row inside
/// SQLite: the payload never passes through here.
fn refuse(
    conn: &Connection,
    limits: &RefusedLimits,
    counters: &mut Counters,
    refusals: &[Refusal],
) -> rusqlite::Result<u64> {
    // The NOT EXISTS keeps a seq out of both tables at once even if that invariant were broken
    // (the record then stays where it is) instead of failing the whole batch on the index.
    let mut copy = conn.prepare_cached(
        "INSERT INTO refused (id, seq, stream, priority, ingested_at_ms, record_size, size,
                              payload, reason, refused_at_ms)
         SELECT ?1, seq, stream, priority, ingested_at_ms, size, size + ?2, payload, ?3, ?4
         FROM records WHERE seq = ?5 AND NOT EXISTS (SELECT 1 FROM refused WHERE seq = ?5)
         RETURNING priority, record_size, size",
    )?;
    let mut delete = conn.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
    let mut moved = 0;
    for refusal in refusals {
        let id = counters.refused_total + 1;
        let inserted = copy
            .query_row(
                params![
                    to_i64(id),
                    to_i64(refusal.reason.len() as u64),
                    refusal.reason,
                    to_i64(refusal.at_ms),
                    to_i64(refusal.seq),
                ],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        to_u64(row.get(1)?),
                        to_u64(row.get(2)?),
                    ))
                },
            )
            .optional()?;
        // Not in the records (acked, evicted, expired, already refused): skipped.
        let Some((priority, record_size, size)) = inserted else {
            continue;
        };
        delete.execute([to_i64(refusal.seq)])?;
        counters.remove(usize::try_from(priority).unwrap_or(usize::MAX), record_size);
        counters.refused_total = id;
        counters.refused_records += 1;
        counters.refused_bytes = counters.refused_bytes.saturating_add(size);
        moved += 1;
    }
    trim_refused(conn, limits, counters)?;
    Ok(moved)
}

/// Deletes the oldest refusals (by id) until both bounds hold.
fn trim_refused(
    conn: &Connection,
    limits: &RefusedLimits,
    counters: &mut Counters,
) -> rusqlite::Result<()> {
    let within =
        |records: u64, bytes: u64| records <= limits.max_records && bytes <= limits.max_bytes;
    while !within(counters.refused_records, counters.refused_bytes) && counters.refused_records > 0
    {
        let mut candidates =
            conn.prepare_cached("SELECT id, size FROM refused ORDER BY id LIMIT ?1")?;
        let mut rows = candidates.query([EVICT_CHUNK])?;
        let mut last = None;
        let mut freed = 0u64;
        let mut count = 0u64;
        while let Some(row) = rows.next()? {
            last = Some(row.get::<_, i64>(0)?);
            freed = freed.saturating_add(to_u64(row.get(1)?));
            count += 1;
            if within(
                counters.refused_records.saturating_sub(count),
                counters.refused_bytes.saturating_sub(freed),
            ) {
                break;
            }
        }
        drop(rows);
        let Some(last) = last else {
            tracing::warn!("store refused counters disagree with the refused table");
            break;
        };
        let deleted = conn
            .prepare_cached("DELETE FROM refused WHERE id <= ?1")?
            .execute([last])? as u64;
        counters.refused_records = counters.refused_records.saturating_sub(deleted);
        counters.refused_bytes = counters.refused_bytes.saturating_sub(freed);
        counters.refused_evicted_total += deleted;
    }
    Ok(())
}

/// Moves refused records back to `records` with their original seq (see
/// [`crate::Store::requeue_refused`]): all or nothing, never evicting. The outer error is an SQL
/// failure (fails the batch); the inner one a refusal of this call only.
fn requeue(
    conn: &Connection,
    settings: &StoreSettings,
    counters: &mut Counters,
    seqs: &[u64],
    expired_through: u64,
) -> rusqlite::Result<Result<u64, StoreError>> {
    // Distinct, and moved in seq order. A seq also in `records` (a broken invariant) is left.
    let wanted: BTreeSet<u64> = seqs.iter().copied().collect();
    let mut lookup = conn.prepare_cached(
        "SELECT record_size FROM refused
         WHERE seq = ?1 AND NOT EXISTS (SELECT 1 FROM records WHERE seq = ?1)",
    )?;
    let mut found = Vec::new();
    let mut needed = 0u64;
    for &seq in &wanted {
        if let Some(size) = lookup
            .query_row([to_i64(seq)], |row| row.get::<_, i64>(0))
            .optional()?
        {
            found.push(seq);
            needed = needed.saturating_add(to_u64(size));
        }
    }
    if found.is_empty() {
        return Ok(Ok(0));
    }
    let quota = settings.quota_bytes;
    if counters.bytes.saturating_add(needed) > quota && settings.ttl.is_some() {
        // Expired records are dead weight: drop them before refusing.
        expire(conn, counters, expired_through, EXPIRE_PASS_LIMIT)?;
    }
    if counters.bytes.saturating_add(needed) > quota {
        return Ok(Err(StoreError::Full { needed, quota }));
    }
    let mut copy = conn.prepare_cached(
        "INSERT INTO records (seq, stream, priority, ingested_at_ms, size, payload)
         SELECT seq, stream, priority, ingested_at_ms, record_size, payload
         FROM refused WHERE seq = ?1
         RETURNING priority, size",
    )?;
    let mut delete = conn.prepare_cached("DELETE FROM refused WHERE seq = ?1 RETURNING size")?;
    let mut moved = 0;
    for seq in found {
        let Some((priority, record_size)) = copy
            .query_row([to_i64(seq)], |row| {
                Ok((row.get::<_, i64>(0)?, to_u64(row.get(1)?)))
            })
            .optional()?
        else {
            continue;
        };
        let size: i64 = delete.query_row([to_i64(seq)], |row| row.get(0))?;
        counters.records += 1;
        counters.bytes = counters.bytes.saturating_add(record_size);
        if let Some(n) = usize::try_from(priority)
            .ok()
            .and_then(|p| counters.records_by_priority.get_mut(p))
        {
            *n += 1;
        }
        counters.refused_records = counters.refused_records.saturating_sub(1);
        counters.refused_bytes = counters.refused_bytes.saturating_sub(to_u64(size));
        counters.requeued_total += 1;
        moved += 1;
    }
    Ok(Ok(moved))
}

/// Stores one dead letter (truncated to fit, see [`fit_dead_letter`]), first deleting the oldest
/// ones until both bounds hold with it. Returns its id.
fn dead_letter(
    conn: &Connection,
    limits: &DeadLetterLimits,
    counters: &mut Counters,
    letter: &DeadLetter,
) -> rusqlite::Result<u64> {
    let (letter, size) = fit_dead_letter(letter, limits.max_bytes);
    let fits = |c: &Counters| {
        c.dead_letters < limits.max_records
            && c.dead_letter_bytes.saturating_add(size) <= limits.max_bytes
    };
    while !fits(counters) && counters.dead_letters > 0 {
        let mut candidates =
            conn.prepare_cached("SELECT id, size FROM dead_letters ORDER BY id LIMIT ?1")?;
        let mut rows = candidates.query([EVICT_CHUNK])?;
        let mut last = None;
        let mut freed = 0u64;
        let mut count = 0u64;
        while let Some(row) = rows.next()? {
            last = Some(row.get::<_, i64>(0)?);
            freed = freed.saturating_add(to_u64(row.get(1)?));
            count += 1;
            if counters.dead_letters.saturating_sub(count) < limits.max_records
                && counters
                    .dead_letter_bytes
                    .saturating_sub(freed)
                    .saturating_add(size)
                    <= limits.max_bytes
            {
                break;
            }
        }
        drop(rows);
        let Some(last) = last else {
            tracing::warn!("store dead-letter counters disagree with the dead_letters table");
            break;
        };
        let deleted = conn
            .prepare_cached("DELETE FROM dead_letters WHERE id <= ?1")?
            .execute([last])? as u64;
        counters.dead_letters = counters.dead_letters.saturating_sub(deleted);
        counters.dead_letter_bytes = counters.dead_letter_bytes.saturating_sub(freed);
        counters.dead_letters_evicted_total += deleted;
    }
    let id = counters.dead_lettered_total + 1;
    conn.prepare_cached(
        "INSERT INTO dead_letters (id, at_ms, topic, source, reason, content_format, size, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        to_i64(id),
        to_i64(letter.at_ms),
        letter.topic,
        letter.source,
        letter.reason,
        letter.content_format,
        to_i64(size),
        letter.payload.as_ref(),
    ])?;
    counters.dead_lettered_total = id;
    counters.dead_letters += 1;
    counters.dead_letter_bytes += size;
    Ok(id)
}

/// Cuts a dead letter down so that its accounted size is at most `max_bytes` (which
/// [`DeadLetterLimits::clamped`] keeps at least [`crate::DEAD_LETTER_MIN_BYTES`]): the payload is
/// truncated and the reason says so. Only if the text fields alone do not fit (a topic or reason
/// of hundreds of bytes under a tiny limit) are they cut too, at char boundaries. Returns the
/// letter to store and its accounted size.
pub(crate) fn fit_dead_letter(letter: &DeadLetter, max_bytes: u64) -> (DeadLetter, u64) {
    let size = dead_letter_accounted_size(letter);
    if size <= max_bytes {
        return (letter.clone(), size);
    }
    let budget =
        usize::try_from(max_bytes.saturating_sub(DEAD_LETTER_OVERHEAD_BYTES)).unwrap_or(usize::MAX);
    let suffix = format!(" (payload truncated from {} bytes)", letter.payload.len());
    let mut fitted = letter.clone();
    let text = |l: &DeadLetter| l.topic.len() + l.source.len() + l.reason.len();
    if text(&fitted).saturating_add(suffix.len()) > budget {
        truncate_at_char(&mut fitted.topic, budget / 4);
        truncate_at_char(&mut fitted.source, budget / 4);
        let room = budget
            .saturating_sub(fitted.topic.len() + fitted.source.len())
            .saturating_sub(suffix.len());
        truncate_at_char(&mut fitted.reason, room);
    }
    let room = budget.saturating_sub(text(&fitted));
    if fitted.payload.len() > room {
        let room = room.saturating_sub(suffix.len());
        fitted.payload = fitted.payload.slice(..room);
        fitted.reason.push_str(&suffix);
    }
    let size = dead_letter_accounted_size(&fitted);
    debug_assert!(size <= max_bytes, "{size} > {max_bytes}");
    (fitted, size)
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
