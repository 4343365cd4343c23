//! Outpost's store-and-forward buffer: opaque records keyed by stream, kept in SQLite until the
//! upstream broker has acknowledged them.
//!
//! The store knows nothing of MQTT or sensors. A record is a stream name (the gateway uses the
//! upstream topic), a [`Priority`], an ingest timestamp and payload bytes. The gateway appends
//! records, the sync engine reads them per priority in `seq` order, publishes them, and acks them
//! once the upstream has PUBACKed them.
//!
//! Beside the records the store keeps **dead letters** ([`DeadLetter`]): payloads that failed to
//! decode for a route that declared a format, kept with the reason, topic, source and time for
//! diagnostics (`outpost status`, metrics). They live in their own table, are never returned by
//! [`Store::read_after`] (so never synced as data), and have their own bounds
//! ([`DeadLetterLimits`]).
//!
//! And it keeps **refused records** ([`RefusedRecord`]): acknowledged readings the upstream
//! refused for good (larger than its maximum packet size, a topic it refuses, an MQTT 5 PUBACK
//! with a failure reason code). Sync hands them to [`Store::refuse`] so that one record never
//! blocks the link; they move, whole and with the reason, into their own table, out of the send
//! path, listable ([`Store::refused`], [`read_refused`]) and re-queueable once an operator fixed
//! the broker ([`Store::requeue_refused`]), within their own bounds ([`RefusedLimits`]).
//!
//! # Invariants
//!
//! - **A record is deleted only after it is acknowledged** ([`Store::ack`]), or when a documented
//!   bound removes it: TTL expiry (`expired_total`) or quota eviction (`evicted_total`). Every
//!   removal is counted; nothing disappears silently. Moving a record to the refused table
//!   (`refused_total`) is not a deletion: it is kept whole, and deleted from there only by the
//!   refused bounds (`refused_evicted_total`) or moved back (`requeued_total`).
//! - **A seq is in the records or in the refused table, never in both**, and moves between them
//!   in one transaction with the counters of both. A refused record keeps its seq; a requeued one
//!   gets it back (a requeue never assigns a seq).
//! - **Acknowledged means committed.** [`Store::append`] resolves only after the SQLite transaction
//!   holding the records has committed, so the gateway may PUBACK its own publishers then.
//! - **`seq` is monotonic and never reused**, also across restarts and after every record was
//!   deleted: the last assigned `seq` is persisted in the counters row in the same transaction as
//!   the insert, and new seqs continue from it.
//! - **Counters are exact and transactional.** Totals (records, bytes, per priority, every
//!   `*_total`, last seq) live in one `counters` row updated in the same transaction as the change
//!   they describe, so [`Store::open`] never scans the records table: restart cost does not grow
//!   with the backlog.
//! - **A failed commit changes nothing, and the store heals itself.** The transaction is rolled
//!   back, every waiter of that batch gets [`StoreError::CommitFailed`], and the store is
//!   failing ([`StoreHealth::Failing`]): new records are refused with [`StoreError::Poisoned`]
//!   (publishers are not acknowledged) while acks and TTL passes are still attempted and the
//!   writer retries with back-off. The first write that commits makes it healthy again, without
//!   a restart. Reads and stats keep working throughout. See "Failures and healing".
//! - **A dead letter is diagnostics, never data, and never fails ingest for being big.** It is not
//!   a record: no seq, not in the records quota, never read by sync. [`Store::dead_letter`] stores
//!   it (group-committed like every write, answered after the commit) within its own bounds: the
//!   oldest dead letters are deleted first to make room (`dead_letters_evicted_total`), and one
//!   larger than the byte bound is truncated, saying so in its reason, instead of refused. Its id
//!   is `dead_lettered_total` after it was stored: increasing, never reused.
//! - **A refused record is data on hold, never sent, never truncated.** [`Store::read_after`]
//!   never returns it and the [`Store::committed_seq`] watch never announces it; it is not in the
//!   records quota nor in `records`/`bytes`. It is kept byte for byte (unlike a dead letter) and
//!   bounded by deleting whole refusals, oldest refusal first.
//!
//! # Threading and group commit
//!
//! One dedicated thread (`outpost-store`) owns the read-write connection and takes commands from a
//! bounded channel ([`COMMAND_QUEUE`] commands; senders wait when it is full, which is how a slow
//! disk slows ingest down instead of dropping data). No SQLite call ever runs in async code.
//!
//! Writes (append, ack, put_state, dead_letter, refuse, requeue_refused) are gathered in memory
//! until `batch_max_records` records are pending or `batch_max_delay` has passed since the first
//! pending write, then applied in ONE transaction, after which every waiter is answered. Reads
//! and stats arriving while a batch is gathering are served immediately from the committed state
//! (no transaction is open while gathering), so read latency does not depend on the batch delay.
//!
//! # Failures and healing
//!
//! A commit can fail: the disk is full (`SQLITE_FULL`, [`StoreError::is_disk_full`]), an I/O
//! error, a failed fsync. Then:
//!
//! 1. **Roll back, and believe the file.** The transaction is rolled back (explicitly if a failed
//!    COMMIT left it open, as SQLite does on `SQLITE_FULL`), the in-memory counters and clock
//!    marks go back to their state before the batch, and the counters row is read back from the
//!    file: if it disagrees, the file wins. So the seqs, quota and totals never drift from what
//!    is stored, and a record acknowledged before is never lost (it was committed; a rollback
//!    cannot touch it). Every waiter of the batch gets [`StoreError::CommitFailed`].
//! 2. **Failing.** [`Store::is_poisoned`] is true and [`StoreStats::health`] /
//!    [`Store::health`] say since when (wall clock, for operators), the last error and how many
//!    retries failed; `commit_failures_total` counts every failed transaction. While failing,
//!    writes that add data (append, dead_letter, requeue_refused) are refused at once with
//!    [`StoreError::Poisoned`], without touching the disk: publishers are not acknowledged and
//!    retry. Writes that free space or record progress (ack, the TTL pass, refuse, state) are
//!    still attempted: on a disk something else filled they usually commit (see below).
//! 3. **Retry with back-off.** [`RETRY_MIN`] after the failure, then doubling up to
//!    [`RETRY_MAX`], the writer reads the counters and marks back from the file and commits a
//!    TTL pass (which writes the counters row, so it is a real write also without a TTL). A
//!    store that fails again within [`RETRY_MAX`] of recovering continues the back-off instead
//!    of starting over, so a disk that takes a tiny write but not the next batch is not hammered.
//! 4. **Healthy again** as soon as any write commits (a retry, an ack...): ingest resumes by
//!    itself, `recoveries_total` counts it. Health and its two counters describe this process
//!    and are not persisted ([`read_stats`] reports healthy).
//!
//! Why retrying is sound (earlier versions refused all writes until a restart): in WAL mode a
//! rolled-back transaction leaves the file as it was; its frames lie past the WAL's last commit
//! and the next commit overwrites them. After a failed fsync, that one transaction's outcome is
//! unknown: it may surface after a crash (its appends were not acknowledged, so at worst a
//! publisher's retry is stored twice: at-least-once; its acks were PUBACKed upstream anyway),
//! while everything committed before was synced. No `PRAGMA integrity_check` runs on recovery:
//! it reads the whole file, which on a big store on an SD card takes minutes (the same rule as
//! "no full scans on open"), and nothing in a rollback calls for it.
//!
//! What a full disk does to SQLite (measured on a tmpfs, see `full_disk_tests.rs`): a commit
//! needs room in the WAL; the WAL reuses its file from the beginning only after a checkpoint
//! copied it into the database file, and that checkpoint needs the database file to grow by
//! the pages appended since. So when the store's own growth filled the disk, **nothing commits,
//! deletes neither**, until space comes back from elsewhere; then the next retry commits
//! (within a few hundred ms here) and ingest resumes. When something else filled the disk,
//! deletes (acks) commit while the WAL file has room (thousands of records' worth with a WAL of
//! 1000 pages), and appends reuse the pages acks freed as long as the database file need not
//! grow. A store that closes on a full disk cannot checkpoint: it warns and leaves the WAL,
//! which the next open reads.
//!
//! # Time
//!
//! The TTL never trusts the wall clock. Boards without an RTC start in 1970 until NTP sets the
//! clock, which then jumps decades; a wrong RTC may jump a year either way. With expiry on the
//! wall clock a +1 year jump would delete everything at once and a -1 year jump keep everything
//! for a year. The rule:
//!
//! - **A record's age is the running time of the store since the record was stored**, on the
//!   **store clock**: monotonic time while the store is open, accumulated across restarts (the
//!   counters row holds it, updated at every commit, which with a TTL includes a TTL pass every
//!   few seconds and one at close). It only moves forward.
//! - A record expires once its age reaches the TTL: never earlier, whatever the wall clock does;
//!   and at most `ttl / 64` later (the granularity of the clock marks, see `clock.rs`), so
//!   nothing is kept forever either, also across restarts and crash loops.
//! - Time while the gateway is stopped does not count: the wall clock cannot be trusted to
//!   measure it (a reboot before NTP, a wrong RTC). A record stored 5 days before a week-long
//!   power cut with a 7-day TTL is kept 2 more days of running time. Trade-off: a backlog may be
//!   delivered older than the TTL says in calendar time (its `ingested_at_ms` tells consumers),
//!   rather than deleted by a clock that lied.
//! - `ingested_at_ms` is the caller's, stored and returned unchanged (for consumers, and for
//!   [`StoreStats::oldest_ingested_at_ms`]), even 1970: it decides nothing here. A wall-clock
//!   sanity floor is therefore not needed in the store; consumers that show ages should treat
//!   timestamps before the build date as "clock not set".
//! - Records stored before schema version 4 (wall-clock TTL) count as stored at the upgrade.
//!   Records stored while no TTL was set count as stored at the last append before a TTL was
//!   set (only the open mark moves without a TTL): later than they were, never earlier.
//!
//! How: seqs and the store clock grow together, so the store keeps **clock marks** `(t, s)`,
//! "every seq up to `s` was stored at store time `t` or earlier": the open mark (when the last
//! seq was assigned) in the counters row, and a closed mark per `ttl / 64` of running time in
//! the `clock_marks` table (at most ~130 rows, older ones deleted). Expired is then "seq up to
//! S", a range on the primary key: [`Store::read_after`] starts after S, and a TTL pass deletes
//! from the lowest seq. A requeued record keeps its seq, so its age counts from when it was
//! first stored.
//!
//! # On-disk format (schema version 4, `PRAGMA user_version`)
//!
//! ```sql
//! PRAGMA application_id = 0x4F555450;  -- "OUTP": tells our file apart from other SQLite files
//! CREATE TABLE records (
//!     seq            INTEGER PRIMARY KEY,  -- assigned by the writer from counters.last_seq
//!     stream         TEXT    NOT NULL,
//!     priority       INTEGER NOT NULL,     -- 0 high, 1 normal, 2 low
//!     ingested_at_ms INTEGER NOT NULL,     -- unix ms from the caller (does not drive the TTL)
//!     size           INTEGER NOT NULL,     -- accounted size, see RECORD_OVERHEAD_BYTES
//!     payload        BLOB    NOT NULL
//! );
//! CREATE INDEX records_by_priority ON records (priority, seq);   -- sync reads, eviction
//! CREATE INDEX records_by_ingested ON records (ingested_at_ms); -- oldest record
//! CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 1), records, bytes, ...,
//!     dead_letters, dead_letter_bytes, dead_lettered_total, dead_letters_evicted_total,
//!     refused_records, refused_bytes, refused_total, refused_evicted_total, requeued_total,
//!     clock_ms,            -- since version 4: the store clock at the last commit
//!     last_seq_clock_ms);  -- since version 4: the store clock when last_seq was assigned
//! CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
//! CREATE TABLE dead_letters (                -- since version 2
//!     id             INTEGER PRIMARY KEY,  -- = counters.dead_lettered_total when inserted
//!     at_ms          INTEGER NOT NULL,     -- unix ms, from the caller
//!     topic          TEXT    NOT NULL,
//!     source         TEXT    NOT NULL,     -- opaque: "mqtt", "coap", a client id...
//!     reason         TEXT    NOT NULL,
//!     content_format INTEGER,              -- CoAP content format, NULL if none was declared
//!     size           INTEGER NOT NULL,     -- accounted size, see dead_letter_accounted_size
//!     payload        BLOB    NOT NULL
//! );
//! CREATE TABLE refused (                     -- since version 3
//!     id             INTEGER PRIMARY KEY,  -- refusal order: = counters.refused_total when inserted
//!     seq            INTEGER NOT NULL,     -- the record's own seq
//!     stream         TEXT    NOT NULL,     -- stream, priority, ingested_at_ms, payload: the
//!     priority       INTEGER NOT NULL,     --   record as it was in `records`
//!     ingested_at_ms INTEGER NOT NULL,
//!     record_size    INTEGER NOT NULL,     -- records.size, carried back on requeue
//!     size           INTEGER NOT NULL,     -- record_size + reason bytes (refused_accounted_size)
//!     payload        BLOB    NOT NULL,
//!     reason         TEXT    NOT NULL,
//!     refused_at_ms  INTEGER NOT NULL      -- unix ms, from the caller
//! );
//! CREATE UNIQUE INDEX refused_by_seq ON refused (seq);  -- requeue by seq, the both-tables guard
//! CREATE TABLE clock_marks (                 -- since version 4: see "Time"
//!     clock_ms       INTEGER PRIMARY KEY,  -- store clock
//!     last_seq       INTEGER NOT NULL      -- every seq up to it was stored by then
//! );
//! ```
//!
//! Migrations run in one transaction when the writer opens the file. Versions 1 to 2, 2 to 3
//! and 3 to 4 are DDL only (`CREATE TABLE` and `ALTER TABLE counters ADD COLUMN ... DEFAULT 0`, which SQLite
//! applies by editing the schema text): no record is read or rewritten, so upgrading a big store
//! is instant. A version newer than this build's is refused ([`StoreError::UnsupportedSchema`]).
//! The read-only entry points ([`read_stats`], [`read_state`], [`read_dead_letters`],
//! [`read_refused`]) cannot migrate; they read an older file as it is (no dead letters before
//! version 2, no refused records before version 3, their counters 0).
//!
//! The database runs in WAL mode so that `outpost status` ([`read_stats`]) can read from another
//! process while the gateway writes. [`Durability::Full`] fsyncs the WAL at every commit (survives
//! power loss); [`Durability::Normal`] fsyncs only at checkpoints (survives a process crash, may lose
//! the last commits on power loss). Group commit makes `Full` affordable.
//!
//! # Bounds
//!
//! The accounted size of a record is `payload.len() + stream.len() + RECORD_OVERHEAD_BYTES`; the
//! quota bounds the sum over stored records. Before a record that would not fit is inserted,
//! expired records are removed first (they are dead anyway), then the `when_full` policy applies:
//!
//! - [`WhenFull::EvictLowestOldest`]: delete the oldest records of the lowest priority (low, then
//!   normal, then high) until the new record fits, but never a record of higher priority than the
//!   new one. Trade-off: ingest never blocks and fresh data wins, at the price of losing the oldest
//!   low-priority backlog (counted in `evicted_total` / `evicted_by_priority`). If the record cannot
//!   fit without evicting higher-priority data, it is refused with [`StoreError::Full`].
//! - [`WhenFull::RejectNew`]: refuse new records with [`StoreError::Full`] while full. Trade-off:
//!   the backlog is never touched (the oldest data is kept), but fresh data is refused and the
//!   publisher has to retry or drop it; during a long outage the gateway stops accepting.
//!
//! A record larger than the whole quota is refused with [`StoreError::TooLarge`]. Refusals count
//! every refused record in `rejected_full_total`. An append call is all-or-nothing: if any record of
//! the call cannot be stored, nothing of that call is stored (evictions it caused are rolled back
//! too) and the whole call gets the error.
//!
//! Dead letters are bounded separately by [`DeadLetterLimits`] (count and accounted bytes, default
//! 1000 and 4 MiB), not by the quota: they are diagnostics, small and few, and must not evict data
//! or be refused because data filled the quota (nor the other way round). The file is therefore
//! bounded by roughly `quota_bytes + max_bytes`. A new dead letter that would exceed either bound
//! first deletes the oldest dead letters (by id); one whose accounted size alone exceeds
//! `max_bytes` keeps only as much payload as fits, and its reason gets
//! `" (payload truncated from N bytes)"`. TTL does not apply to dead letters.
//!
//! Refused records are bounded the same way by [`RefusedLimits`] (count and accounted bytes,
//! default 1000 and 64 MiB), not by the quota, so the file is bounded by roughly
//! `quota_bytes + dead letters' max_bytes + refused max_bytes`. After the records of a
//! [`Store::refuse`] call moved, the oldest refusals (by refusal order, not by seq: a record
//! refused again after a requeue is a new refusal) are deleted until both bounds hold, counted in
//! `refused_evicted_total`. They are never truncated: a refused record whose accounted size alone
//! exceeds `max_bytes` makes everything older go and then goes itself (counted; it has left the
//! send path either way, which is the point: it must not block the link). Trade-off: during a
//! long misconfiguration of the upstream the oldest refused readings are lost first, but the
//! file stays bounded. TTL does not apply to refused records either: they are bounded by
//! [`RefusedLimits`], and an operator looking at them days later still finds them. A requeued
//! record is a record again, with its original seq and ingest time, and its age counts from when
//! it was first stored: if that is more than the TTL, it expires like any other
//! (`expired_total`). [`Store::requeue_refused`] is subject to the quota
//! but never evicts (see there): if the records do not fit, the call is refused with
//! [`StoreError::Full`] and they stay refused.
//!
//! TTL: expired records (see "Time") are never returned by [`Store::read_after`]; the writer
//! thread deletes them in bounded passes ([`EXPIRE_PASS_LIMIT`] records per transaction, oldest
//! seq first) every few seconds, counting `expired_total`.
//!
//! # Layout
//!
//! - `lib.rs`: public types and the [`Store`] handle (async API, talks to the thread).
//! - `schema.rs`: opening, identity checks, migrations, counters row, read queries.
//! - `writer.rs`: the writer thread: command loop, group commit, quota, TTL, refusals,
//!   rollback and retries.
//! - `health.rs`: the health state machine and the retry back-off.
//! - `clock.rs`: the clocks (injected in tests), the store clock and its marks.

#![forbid(unsafe_code)]

mod clock;
mod health;
mod schema;
mod writer;

#[cfg(test)]
mod full_disk_tests;
#[cfg(test)]
mod health_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod refused_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod time_tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::{Clock, SystemClock};
use crate::health::HealthCell;
use crate::writer::{Command, Read, Write};

pub use crate::health::{RETRY_MAX, RETRY_MIN};

/// Fixed per-record overhead added to the accounted size: an estimate of SQLite's row header,
/// the integer columns and the two index entries per record, so that a quota of N bytes bounds the
/// file size to roughly N even for tiny payloads.
pub const RECORD_OVERHEAD_BYTES: u64 = 64;

/// Fixed per-dead-letter overhead added to its accounted size (row header, integer columns); see
/// [`dead_letter_accounted_size`].
pub const DEAD_LETTER_OVERHEAD_BYTES: u64 = 64;

/// Smallest `max_bytes` of [`DeadLetterLimits`]; smaller values are raised to it so that a dead
/// letter with its topic, source and reason always fits.
pub const DEAD_LETTER_MIN_BYTES: u64 = 1024;

/// Smallest `max_bytes` of [`RefusedLimits`]; smaller values are raised to it. A typical refused
/// record is one larger than the upstream's maximum packet size (rumqttc's default is 10 KiB), so
/// a bound below a few of those would only ever keep the last one.
pub const REFUSED_MIN_BYTES: u64 = 64 << 10;

/// Bound of the command channel between the handles and the writer thread.
pub const COMMAND_QUEUE: usize = 1024;

/// Maximum number of records one TTL pass deletes in one transaction, so a large expired backlog
/// never stalls ingest for long.
pub const EXPIRE_PASS_LIMIT: usize = 1000;

/// Size of the disk reserve: a file of zeros kept beside the database (`<db>-reserve`) and
/// deleted on the first "disk full" so that acks (which shrink the backlog) and the TTL can still
/// commit: every SQLite commit needs room in the WAL, and a checkpoint needs room in the database
/// file, even to delete. New records are refused until the reserve can be written again.
pub const DISK_RESERVE_BYTES: u64 = 4 << 20;

/// Delivery class of a record. Sync sends higher priorities first; eviction removes lower ones
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    /// All priorities, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// 0 for high, 1 for normal, 2 for low: the stored value and the index into per-priority
    /// arrays of [`StoreStats`].
    pub fn as_index(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    /// Inverse of [`Priority::as_index`].
    pub fn from_index(index: usize) -> Option<Priority> {
        Priority::ALL.get(index).copied()
    }
}

/// What to do with a new record that does not fit in the quota. See the crate docs for the
/// trade-offs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest records of the lowest priority (never of a higher priority than the new
    /// record) to make room.
    EvictLowestOldest,
    /// Refuse new records with [`StoreError::Full`].
    RejectNew,
}

/// How hard a commit is pushed to disk. Both use WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `PRAGMA synchronous=FULL`: a committed record survives power loss.
    Full,
    /// `PRAGMA synchronous=NORMAL`: a committed record survives a process crash; the last commits
    /// may be lost on power loss.
    Normal,
}

/// Settings of one store.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Database file; parent directories are created.
    pub path: PathBuf,
    /// Bound on the sum of accounted record sizes (see [`RECORD_OVERHEAD_BYTES`]).
    pub quota_bytes: u64,
    /// Records stored longer than this expire, measured on the store clock (running time, see
    /// the crate docs: never by `ingested_at_ms`, never by the wall clock); `None` keeps them
    /// until acked.
    pub ttl: Option<Duration>,
    /// Policy when a new record does not fit in the quota.
    pub when_full: WhenFull,
    /// A group commit closes once this many records (or acked seqs) are pending...
    pub batch_max_records: usize,
    /// ...or this long after the first pending write, whichever comes first.
    pub batch_max_delay: Duration,
    /// How hard commits are pushed to disk.
    pub durability: Durability,
    /// Bounds of the refused table ([`Store::refuse`]), separate from the quota. Clamped, see
    /// [`RefusedLimits::clamped`]; lowered bounds apply from the next refusal on.
    pub refused: RefusedLimits,
}

/// One change to the `state` table (small values the gateway keeps by key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    /// Insert or replace the value under `key`.
    Put {
        /// The key.
        key: Box<str>,
        /// The new value.
        value: Box<[u8]>,
    },
    /// Remove `key` (nothing happens if it is absent).
    Delete {
        /// The key.
        key: Box<str>,
    },
}

/// A record to append.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Opaque stream key (the gateway uses the upstream topic).
    pub stream: String,
    pub priority: Priority,
    pub payload: Bytes,
    /// Unix time in milliseconds when the gateway received the data, for consumers. Stored and
    /// returned as given (1970 if the clock was not set yet); it does not drive the TTL.
    pub ingested_at_ms: u64,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Position in the store, unique and increasing; consumers use it to drop duplicates.
    pub seq: u64,
    pub stream: String,
    pub priority: Priority,
    pub payload: Bytes,
    pub ingested_at_ms: u64,
}

/// A payload that could not be decoded for a route that declared a format, kept for diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The topic the payload arrived on (or the one its route maps to; the gateway decides).
    pub topic: String,
    /// Where it came from, opaque to the store: "mqtt", "coap", a client id...
    pub source: String,
    /// Why it could not be decoded. The store may append `" (payload truncated from N bytes)"`.
    pub reason: String,
    /// The declared (CoAP) content format, if any.
    pub content_format: Option<u16>,
    pub payload: Bytes,
    /// Unix time in milliseconds when the gateway received it.
    pub at_ms: u64,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeadLetter {
    /// Increasing, never reused (the `dead_lettered_total` it was stored as).
    pub id: u64,
    pub letter: DeadLetter,
}

/// Bounds of the dead-letter table, separate from the records quota (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// At most this many dead letters are kept (at least 1).
    pub max_records: u64,
    /// Bound on the sum of their accounted sizes ([`dead_letter_accounted_size`]); at least
    /// [`DEAD_LETTER_MIN_BYTES`].
    pub max_bytes: u64,
}

impl Default for DeadLetterLimits {
    /// 1000 dead letters, 4 MiB.
    fn default() -> Self {
        DeadLetterLimits {
            max_records: 1000,
            max_bytes: 4 << 20,
        }
    }
}

impl DeadLetterLimits {
    /// The limits the store applies: `max_records` at least 1, `max_bytes` at least
    /// [`DEAD_LETTER_MIN_BYTES`].
    pub fn clamped(self) -> DeadLetterLimits {
        DeadLetterLimits {
            max_records: self.max_records.max(1),
            max_bytes: self.max_bytes.max(DEAD_LETTER_MIN_BYTES),
        }
    }
}

/// A record the upstream refused for good (larger than its maximum packet size, a topic it
/// refuses, an MQTT 5 PUBACK with a failure reason code...), with why. Input of [`Store::refuse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The record's seq.
    pub seq: u64,
    /// Why the upstream refused it, for the operator (e.g. "PUBACK 0x87 not authorized").
    pub reason: String,
    /// Unix time in milliseconds of the refusal, from the caller.
    pub at_ms: u64,
}

/// A refused record as stored: the original record, unchanged (same seq, stream, priority,
/// ingest time and payload), plus why and when it was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedRecord {
    pub record: Record,
    pub reason: String,
    pub refused_at_ms: u64,
}

/// Bounds of the refused table, separate from the records quota (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedLimits {
    /// At most this many refused records are kept (at least 1).
    pub max_records: u64,
    /// Bound on the sum of their accounted sizes ([`refused_accounted_size`]); at least
    /// [`REFUSED_MIN_BYTES`].
    pub max_bytes: u64,
}

impl Default for RefusedLimits {
    /// 1000 refused records, 64 MiB.
    fn default() -> Self {
        RefusedLimits {
            max_records: 1000,
            max_bytes: 64 << 20,
        }
    }
}

impl RefusedLimits {
    /// The limits the store applies: `max_records` at least 1, `max_bytes` at least
    /// [`REFUSED_MIN_BYTES`].
    pub fn clamped(self) -> RefusedLimits {
        RefusedLimits {
            max_records: self.max_records.max(1),
            max_bytes: self.max_bytes.max(REFUSED_MIN_BYTES),
        }
    }
}

/// Accounted size of a refused record: its accounted size as a record ([`accounted_size`]) plus
/// the length of the reason.
pub fn refused_accounted_size(stream: &str, payload_len: usize, reason: &str) -> u64 {
    accounted_size(stream, payload_len).saturating_add(reason.len() as u64)
}

/// Accounted size of a dead letter: payload, topic, source and reason lengths plus
/// [`DEAD_LETTER_OVERHEAD_BYTES`].
pub fn dead_letter_accounted_size(letter: &DeadLetter) -> u64 {
    [
        letter.payload.len(),
        letter.topic.len(),
        letter.source.len(),
        letter.reason.len(),
    ]
    .iter()
    .fold(DEAD_LETTER_OVERHEAD_BYTES, |acc, &n| {
        acc.saturating_add(n as u64)
    })
}

/// Whether the store can write. See the crate docs ("Failures and healing").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreHealth {
    /// The last write transaction committed.
    #[default]
    Healthy,
    /// The last write transaction failed and was rolled back; new records are refused with
    /// [`StoreError::Poisoned`] while the writer retries with back-off ([`RETRY_MIN`] doubling to
    /// [`RETRY_MAX`]). Acks, TTL passes, state writes and refusals are still attempted; the first
    /// write that commits makes the store healthy again.
    Failing {
        /// Wall-clock unix ms of the first failure of this episode (for operators; the wall clock
        /// may be wrong).
        since_ms: u64,
        /// The last failure, as SQLite reported it (e.g. "database or disk is full").
        last_error: String,
        /// Failed attempts since the first failure (retries and attempted writes).
        retries: u64,
    },
}

impl StoreHealth {
    pub fn is_healthy(&self) -> bool {
        matches!(self, StoreHealth::Healthy)
    }
}

/// Counters and gauges of the store. All but `oldest_ingested_at_ms`, `poisoned`, `health`,
/// `commit_failures_total` and `recoveries_total` are read from the counters row, which is
/// updated in the same transaction as the records; those five describe this process's writer and
/// are not persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Records currently stored.
    pub records: u64,
    /// Sum of accounted sizes of the stored records.
    pub bytes: u64,
    /// `records` split by [`Priority::as_index`].
    pub records_by_priority: [u64; 3],
    /// Ingest time of the oldest stored record.
    pub oldest_ingested_at_ms: Option<u64>,
    /// Last seq ever assigned (also when that record is gone).
    pub last_seq: u64,
    /// Records ever committed.
    pub appended_total: u64,
    /// Records deleted by [`Store::ack`].
    pub acked_total: u64,
    /// Records deleted to make room under the quota.
    pub evicted_total: u64,
    /// `evicted_total` split by [`Priority::as_index`].
    pub evicted_by_priority: [u64; 3],
    /// Records deleted because their TTL passed.
    pub expired_total: u64,
    /// Records refused with [`StoreError::Full`] or [`StoreError::TooLarge`].
    pub rejected_full_total: u64,
    /// Write transactions committed.
    pub commits_total: u64,
    /// The store refuses new records after a failed commit, until a write succeeds again: the
    /// same as `!health.is_healthy()`. Not persisted: [`read_stats`] reports `false`.
    pub poisoned: bool,
    /// Whether the store can write, since when not, and why. Not persisted: [`read_stats`]
    /// reports [`StoreHealth::Healthy`].
    pub health: StoreHealth,
    /// Write transactions that failed and were rolled back since the store was opened (retries
    /// included). Not persisted.
    pub commit_failures_total: u64,
    /// Times the store became healthy again by itself since it was opened. Not persisted.
    pub recoveries_total: u64,
    /// Dead letters currently stored.
    pub dead_letters: u64,
    /// Sum of accounted sizes of the stored dead letters ([`dead_letter_accounted_size`]).
    pub dead_letter_bytes: u64,
    /// Dead letters ever committed; also the id of the last one.
    pub dead_lettered_total: u64,
    /// Dead letters deleted to stay within [`DeadLetterLimits`].
    pub dead_letters_evicted_total: u64,
    /// Refused records currently stored ([`Store::refuse`]); not counted in `records`.
    pub refused_records: u64,
    /// Sum of accounted sizes of the stored refused records ([`refused_accounted_size`]).
    pub refused_bytes: u64,
    /// Records ever moved into the refused table (a record refused twice counts twice).
    pub refused_total: u64,
    /// Refused records deleted to stay within [`RefusedLimits`].
    pub refused_evicted_total: u64,
    /// Refused records moved back into the records by [`Store::requeue_refused`]. With the
    /// two above: `refused_records = refused_total - refused_evicted_total - requeued_total`.
    pub requeued_total: u64,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or set up; also what a file that is not an SQLite
    /// database gives.
    #[error("cannot open store database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A filesystem operation around the database failed (creating its directory, starting the
    /// writer thread).
    #[error("store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another `Store` in this one) has the store open for writing.
    #[error("store {path} is in use by another outpost process (lock file {lock} is held)")]
    Locked { path: PathBuf, lock: PathBuf },
    /// The file is a valid SQLite database, but not an Outpost store: refused rather than
    /// modified.
    #[error("{path} is an SQLite database but not an Outpost store")]
    NotAStore { path: PathBuf },
    /// The store was written by a newer Outpost with a schema this build does not know.
    #[error("{path} has store schema version {found}; this build supports up to {supported}")]
    UnsupportedSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// A stored row holds a value this build cannot interpret.
    #[error("corrupt store row seq {seq}: {what}")]
    Corrupt { seq: u64, what: &'static str },
    #[error("store database error")]
    Sqlite(#[from] rusqlite::Error),
    /// The batch this write belonged to failed to commit; nothing of it was stored (it was rolled
    /// back) and the store is failing ([`StoreHealth::Failing`]) until a write succeeds again.
    /// Shared by every waiter of the batch, hence the `Arc`.
    #[error("store commit failed; new records are refused until a write succeeds again")]
    CommitFailed(#[source] Arc<rusqlite::Error>),
    /// The store is failing ([`StoreHealth::Failing`]): an earlier commit failed and no write has
    /// succeeded since, so this write (new records, a dead letter, a requeue) was refused without
    /// touching the disk. The writer retries by itself; try again later.
    #[error(
        "store is failing after a failed commit and refuses new records until a write succeeds"
    )]
    Poisoned,
    /// The filesystem filled up: the store released its disk reserve ([`DISK_RESERVE_BYTES`]) so
    /// that acks and expiry can still commit, and refuses new records until it can set the
    /// reserve aside again (it tries every few seconds).
    #[error(
        "the disk is full: new records are refused until the store's disk reserve can be set aside again"
    )]
    DiskReserveReleased,
    /// The records do not fit in the quota under the `when_full` policy. `needed` is the
    /// accounted size of the refused append call.
    #[error("store full: {needed} bytes do not fit in the quota of {quota} bytes")]
    Full { needed: u64, quota: u64 },
    /// One record is larger than the whole quota.
    #[error("record of {size} bytes is larger than the store quota of {quota} bytes")]
    TooLarge { size: u64, quota: u64 },
    /// The store was closed.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether this is SQLite's "database or disk is full" (`SQLITE_FULL`): the filesystem is
    /// full, or the file reached its size limit.
    pub fn is_disk_full(&self) -> bool {
        let sqlite = match self {
            StoreError::CommitFailed(e) => &**e,
            StoreError::Sqlite(e) | StoreError::Open { source: e, .. } => e,
            _ => return false,
        };
        sqlite.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
    }
}

/// Accounted size of a record; see [`RECORD_OVERHEAD_BYTES`].
pub fn accounted_size(stream: &str, payload_len: usize) -> u64 {
    (payload_len as u64)
        .saturating_add(stream.len() as u64)
        .saturating_add(RECORD_OVERHEAD_BYTES)
}

/// Cheap clonable handle to a store. The writer thread stops when [`Store::close`] is called or
/// the last handle is dropped.
#[derive(Clone, Debug)]
pub struct Store {
    /// Field order matters: when the last handle drops, this sender goes first, which closes the
    /// channel and lets the thread finish, and only then `shared` joins the thread.
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Path, for messages.
    path: PathBuf,
    /// Last committed seq, published by the writer after each commit.
    committed: watch::Receiver<u64>,
    /// Set by the writer thread when a commit failed, cleared when one succeeded again.
    health: Arc<HealthCell>,
    /// Fault injection: this many next commits fail (through the real error path).
    fail_commits: Arc<AtomicU64>,
    /// The writer thread, joined by `close()` or when the last handle drops.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Exclusive lock on `<db>.lock`, held for the store's lifetime: a second gateway on the same
    /// file would interleave seqs with ours and poison both. Released after the thread is joined
    /// (fields drop after `Drop::drop`).
    lock: Mutex<Option<std::fs::File>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // All senders are gone by now (see `Store::tx`), so the thread commits what is pending
        // and exits; joining makes "all handles dropped" mean "database closed". This may block
        // for one commit when it happens inside async code, which is acceptable at shutdown.
        let handle = match self.thread.get_mut() {
            Ok(slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "store writer thread panicked");
        }
    }
}

impl Store {
    /// Opens or creates the store, migrates its schema and starts the writer thread. Blocking:
    /// call it before the runtime starts or from `spawn_blocking`.
    pub fn open(settings: StoreSettings) -> Result<Store, StoreError> {
        Store::open_with(settings, DeadLetterLimits::default())
    }

    /// [`Store::open`] with explicit dead-letter bounds (clamped, see
    /// [`DeadLetterLimits::clamped`]). Lowered bounds apply from the next dead letter on, which
    /// then deletes as many old ones as needed.
    pub fn open_with(
        settings: StoreSettings,
        dead_letter_limits: DeadLetterLimits,
    ) -> Result<Store, StoreError> {
        Store::open_tuned(settings, dead_letter_limits, Tuning::default())
    }

    /// [`Store::open_with`] with the clock and retry back-off tests need.
    pub(crate) fn open_tuned(
        settings: StoreSettings,
        dead_letter_limits: DeadLetterLimits,
        tuning: Tuning,
    ) -> Result<Store, StoreError> {
        let lock = lock_exclusive(&settings.path)?;
        let opened = schema::open_read_write(&settings)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (committed_tx, committed) = watch::channel(opened.counters.last_seq);
        let health = Arc::new(HealthCell::default());
        let fail_commits = Arc::new(AtomicU64::new(0));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|source| StoreError::Io {
                path: settings.path.clone(),
                source,
            })?;
        let writer = writer::Writer::new(
            opened,
            settings.clone(),
            dead_letter_limits,
            tuning,
            Arc::clone(&health),
            Arc::clone(&fail_commits),
            committed_tx,
        );
        let thread = std::thread::Builder::new()
            .name("outpost-store".into())
            .spawn(move || writer.run_thread(rx, runtime))
            .map_err(|source| StoreError::Io {
                path: settings.path.clone(),
                source,
            })?;
        Ok(Store {
            tx,
            shared: Arc::new(Shared {
                path: settings.path,
                committed,
                health,
                fail_commits,
                thread: Mutex::new(Some(thread)),
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Appends records; resolves only after the transaction containing them has committed, with
    /// their seqs in order. All-or-nothing per call (see the crate docs on quota).
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<u64>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.request(|reply| {
            Command::Write(Write::Append {
                records,
                reply,
                result: Ok(Vec::new()),
            })
        })
        .await
    }

    /// Like [`Store::append`], split in two: awaiting `submit` enqueues the records (waiting only
    /// for room in the command queue, which is the backpressure); the returned future resolves when
    /// their transaction committed. Records of successive `submit` calls from one task are
    /// committed in call order, so a caller can keep several batches in flight and still preserve
    /// order.
    pub async fn submit(
        &self,
        records: Vec<NewRecord>,
    ) -> Result<
        impl std::future::Future<Output = Result<Vec<u64>, StoreError>> + Send + 'static,
        StoreError,
    > {
        let (reply, answer) = oneshot::channel();
        if !records.is_empty() {
            self.tx
                .send(Command::Write(Write::Append {
                    records,
                    reply,
                    result: Ok(Vec::new()),
                }))
                .await
                .map_err(|_| StoreError::Closed)?;
        } else {
            let _ = reply.send(Ok(Vec::new()));
        }
        Ok(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    /// Unexpired records of `priority` with `seq > after_seq`, ascending, at most `limit`.
    pub async fn read_after(
        &self,
        priority: Priority,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.request(|reply| {
            Command::Read(Read::After {
                priority,
                after_seq,
                limit,
                reply,
            })
        })
        .await
    }

    /// Deletes these records (the upstream acknowledged them); returns how many existed. Unknown
    /// seqs (evicted or expired meanwhile) are ignored.
    pub async fn ack(&self, seqs: Vec<u64>) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        self.request(|reply| {
            Command::Write(Write::Ack {
                seqs,
                reply,
                existed: 0,
            })
        })
        .await
    }

    /// Current counters and gauges.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.request(|reply| Command::Read(Read::Stats { reply }))
            .await
    }

    /// Last committed seq; changes after every commit that appended records. The sync engine
    /// waits on it for new data. A commit that requeued refused records
    /// ([`Store::requeue_refused`]) also marks it changed, with the same value (no seq was
    /// assigned): a woken reader should not assume the value grew.
    pub fn committed_seq(&self) -> watch::Receiver<u64> {
        self.shared.committed.clone()
    }

    /// Whether the store is failing: a commit failed and no write has succeeded since, so new
    /// records are refused. Clears by itself once a write commits again.
    pub fn is_poisoned(&self) -> bool {
        self.shared.health.is_failing()
    }

    /// Whether the store can write, since when not, and why (as in [`StoreStats::health`], but
    /// without waiting for the writer thread).
    pub fn health(&self) -> StoreHealth {
        self.shared.health.get()
    }

    /// Stores a small value under `key` (gateway runtime status); committed with the next batch.
    pub async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let ops = vec![StateOp::Put {
            key: key.into(),
            value: value.into(),
        }];
        self.request(|reply| Command::Write(Write::States { ops, reply }))
            .await
    }

    /// Applies puts and deletes to the state table, in order, in one transaction (group-committed
    /// with the other writes). Like [`Store::submit`]: awaiting this enqueues (waiting only for
    /// room in the command queue); the returned future resolves when the transaction committed.
    /// Batches of successive calls from one task are applied in call order.
    pub async fn submit_states(
        &self,
        ops: Vec<StateOp>,
    ) -> Result<
        impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
        StoreError,
    > {
        let (reply, answer) = oneshot::channel();
        if ops.is_empty() {
            let _ = reply.send(Ok(()));
        } else {
            self.tx
                .send(Command::Write(Write::States { ops, reply }))
                .await
                .map_err(|_| StoreError::Closed)?;
        }
        Ok(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    /// The committed value under `key`, if any.
    pub async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.request(|reply| Command::Read(Read::State { key, reply }))
            .await
    }

    /// Every committed state entry whose key starts with `prefix`, in key order (for small
    /// collections the gateway keeps there, such as the device registry).
    pub async fn states_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = prefix.to_owned();
        self.request(|reply| Command::Read(Read::StatePrefix { prefix, reply }))
            .await
    }

    /// Keeps a payload that could not be decoded; resolves with its id after the transaction
    /// holding it committed (group-committed with the other writes). Within the dead-letter
    /// bounds the oldest dead letters make room; an oversized one is truncated, never refused.
    /// Fails only like every write does: [`StoreError::Poisoned`], [`StoreError::CommitFailed`],
    /// [`StoreError::Closed`].
    pub async fn dead_letter(&self, letter: DeadLetter) -> Result<u64, StoreError> {
        self.request(|reply| {
            Command::Write(Write::DeadLetter {
                letter,
                reply,
                id: 0,
            })
        })
        .await
    }

    /// Committed dead letters, newest first, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<StoredDeadLetter>, StoreError> {
        self.request(|reply| Command::Read(Read::DeadLetters { limit, reply }))
            .await
    }

    /// Moves each refused record from the records into the refused table, in ONE transaction
    /// (group-committed with the other writes, answered after the commit), counters included:
    /// it leaves `records`/`bytes`/`records_by_priority` and enters `refused_records`/
    /// `refused_bytes`/`refused_total`. From then on [`Store::read_after`] never returns it.
    ///
    /// A seq that is not in the records (acked, evicted or expired meanwhile, already refused,
    /// or never assigned) is skipped, not an error. Returns how many records moved. Then, beyond
    /// the [`RefusedLimits`], the oldest refusals are deleted (`refused_evicted_total`); a
    /// record whose accounted size alone exceeds `max_bytes` is therefore deleted right away
    /// (it still counts as moved: it left the send path). Fails only like every write does.
    pub async fn refuse(&self, refusals: Vec<Refusal>) -> Result<u64, StoreError> {
        if refusals.is_empty() {
            return Ok(0);
        }
        self.request(|reply| {
            Command::Write(Write::Refuse {
                refusals,
                reply,
                moved: 0,
            })
        })
        .await
    }

    /// Committed refused records, newest refusal first, at most `limit`.
    pub async fn refused(&self, limit: usize) -> Result<Vec<RefusedRecord>, StoreError> {
        self.request(|reply| Command::Read(Read::Refused { limit, reply }))
            .await
    }

    /// Moves refused records back into the records with their ORIGINAL seq, stream, priority,
    /// ingest time and payload, so that sync sends them again; returns how many moved. Seqs not
    /// in the refused table are skipped. All-or-nothing per call, group-committed like every
    /// write.
    ///
    /// The moved records count towards the quota again, but a requeue never evicts: if they do
    /// not fit (after expired records were dropped), nothing moves and the call gets
    /// [`StoreError::Full`] (not counted in `rejected_full_total`: nothing was lost, the records
    /// stay refused). An operator action should not destroy other data; requeue fewer, or later.
    ///
    /// The age is not reset: a requeued record keeps its seq, so its age counts from when it was
    /// first stored (see the crate docs, "Time"); one older than the TTL is expired like any
    /// other (hidden from [`Store::read_after`], deleted and counted in `expired_total`).
    ///
    /// When it takes effect: a requeued seq is usually lower than what sync already read, so a
    /// sync engine that reads forward from a cursor sends it from its next (re)connection, or
    /// whenever it re-reads from a lower cursor. A requeue that moved records also wakes the
    /// [`Store::committed_seq`] watchers (the value is unchanged: no seq was assigned).
    pub async fn requeue_refused(&self, seqs: Vec<u64>) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        self.request(|reply| {
            Command::Write(Write::Requeue {
                seqs,
                reply,
                result: Ok(0),
            })
        })
        .await
    }

    /// Runs TTL passes now until no expired record is left; returns how many were deleted. The
    /// writer does this on its own every few seconds; this is for tests and maintenance commands.
    #[doc(hidden)]
    pub async fn expire_now(&self) -> Result<u64, StoreError> {
        self.request(|reply| {
            Command::Write(Write::Expire {
                reply: Some(reply),
                expired: 0,
                exhaustive: true,
            })
        })
        .await
    }

    /// Fault injection for tests: the next commit fails inside its transaction (a real SQLite
    /// error), which rolls it back and makes the store failing until a write succeeds (the
    /// writer's own retry, a few hundred ms later at most, if nothing else writes).
    #[doc(hidden)]
    pub fn fail_next_commit(&self) {
        self.fail_next_commits(1);
    }

    /// Fault injection for tests: the next `n` commits fail (retries included), as
    /// [`Store::fail_next_commit`]. Replaces what was left of an earlier call.
    #[doc(hidden)]
    pub fn fail_next_commits(&self, n: u64) {
        self.shared.fail_commits.store(n, Ordering::Release);
    }

    /// Commits what is pending, checkpoints the WAL (TRUNCATE), closes the database and joins the
    /// thread. Later calls on any clone get [`StoreError::Closed`].
    pub async fn close(&self) -> Result<(), StoreError> {
        let result = self.request(|reply| Command::Close { reply }).await;
        // The thread answered after closing the connection; joining only waits for its exit.
        let handle = match self.shared.thread.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!(path = %self.shared.path.display(), "store writer thread panicked");
        }
        // The connection is closed: another process may have the file now.
        match self.shared.lock.lock() {
            Ok(mut slot) => drop(slot.take()),
            Err(poisoned) => drop(poisoned.into_inner().take()),
        }
        result
    }
}

/// What tests change about a store beyond its settings: the clocks and the retry back-off.
#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    pub clock: Arc<dyn Clock>,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            clock: Arc::new(SystemClock::new()),
            retry_min: RETRY_MIN,
            retry_max: RETRY_MAX,
        }
    }
}

/// Takes the exclusive writer lock next to the database (`<db>.lock`), creating the directory.
fn lock_exclusive(db: &Path) -> Result<std::fs::File, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let io = |source| StoreError::Io {
        path: lock_path.clone(),
        source,
    };
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: db.to_path_buf(),
            lock: lock_path,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(io(source)),
    }
}

/// Reads the stats of a store another process has open, through a read-only connection (for
/// `outpost status`). `poisoned` is always `false` here: it is not persisted.
pub fn read_stats(path: &Path) -> Result<StoreStats, StoreError> {
    let schema::ReadOnly { mut conn, version } = schema::open_read_only(path)?;
    let tx = conn.transaction()?;
    let counters = schema::load_counters_at(&tx, version)?;
    let oldest = schema::oldest_ingested_at(&tx)?;
    tx.finish()?;
    Ok(counters.to_stats(oldest))
}

/// Reads the state entries under `prefix` of a store another process has open (read-only).
pub fn read_states_with_prefix(
    path: &Path,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let ro = schema::open_read_only(path)?;
    Ok(schema::states_with_prefix(&ro.conn, prefix)?)
}

/// Reads one state value of a store another process has open, through a read-only connection.
pub fn read_state(path: &Path, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let ro = schema::open_read_only(path)?;
    Ok(schema::get_state(&ro.conn, key)?)
}

/// Reads the newest dead letters (at most `limit`, newest first) of a store another process may
/// have open, through a read-only connection (for `outpost status` or a CLI).
pub fn read_dead_letters(path: &Path, limit: usize) -> Result<Vec<StoredDeadLetter>, StoreError> {
    let ro = schema::open_read_only(path)?;
    schema::read_dead_letters(&ro.conn, ro.version, limit)
}

/// Reads the refused records (at most `limit`, newest refusal first) of a store another process
/// may have open, through a read-only connection (for `outpost status` or a CLI). A file older
/// than schema version 3 has none.
pub fn read_refused(path: &Path, limit: usize) -> Result<Vec<RefusedRecord>, StoreError> {
    let ro = schema::open_read_only(path)?;
    schema::read_refused(&ro.conn, ro.version, limit)
}
