//! Opening the database, telling our file from others, migrations, the counters row and the read
//! queries shared by the writer thread and the read-only entry points.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::{
    DeadLetter, Durability, Priority, Record, RefusedRecord, StoreError, StoreSettings, StoreStats,
    StoredDeadLetter,
};

/// `PRAGMA application_id` of our files: "OUTP".
pub(crate) const APPLICATION_ID: i64 = 0x4F55_5450;
/// `PRAGMA user_version` this build writes and understands.
pub(crate) const SCHEMA_VERSION: i64 = 4;
/// How long a statement waits for a lock held by another connection (e.g. a checkpoint while
/// `outpost status` reads) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 1: records, counters, state. Frozen: a v1 file is upgraded by [`SCHEMA_V2`], never by
/// editing this.
const SCHEMA_V1: &str = "
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
INSERT INTO counters VALUES (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
";

/// Version 2: the dead-letter table and its counters. Frozen like [`SCHEMA_V1`]. Cheap on a big
/// store: DDL only, no row of
/// `records` is read or rewritten. `ADD COLUMN` with a constant default only edits the schema text
/// in SQLite (existing rows read the default), and `counters` has one row anyway.
const SCHEMA_V2: &str = "
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
";

/// Version 3: the refused table (records the upstream refused for good) and its counters. DDL
/// only, like [`SCHEMA_V2`]: no row of `records` is read or rewritten.
///
/// `id` is the refusal order (= `counters.refused_total` when inserted, never reused): listing
/// and eviction go by it, so a record refused again after a requeue counts as a new refusal.
/// `seq` is the record's own seq, unique: a seq is in `records` or in `refused`, never in both.
/// `record_size` is the record's accounted size (as in `records.size`, carried back on requeue);
/// `size` the accounted size in the refused table (`record_size` + reason bytes).
const SCHEMA_V3: &str = "
CREATE TABLE refused (
    id             INTEGER PRIMARY KEY,
    seq            INTEGER NOT NULL,
    stream         TEXT    NOT NULL,
    priority       INTEGER NOT NULL,
    ingested_at_ms INTEGER NOT NULL,
    record_size    INTEGER NOT NULL,
    size           INTEGER NOT NULL,
    payload        BLOB    NOT NULL,
    reason         TEXT    NOT NULL,
    refused_at_ms  INTEGER NOT NULL
);
CREATE UNIQUE INDEX refused_by_seq ON refused (seq);
ALTER TABLE counters ADD COLUMN refused_records       INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN refused_bytes         INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN refused_total         INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN refused_evicted_total INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN requeued_total        INTEGER NOT NULL DEFAULT 0;
";

/// Version 4: the store clock (running time across restarts, `counters.clock_ms`), the open
/// mark (`counters.last_seq_clock_ms`: when `last_seq` was assigned) and the closed marks
/// (`clock_marks`), which drive the TTL instead of the wall clock (see [`crate::clock`]). DDL
/// only, like [`SCHEMA_V2`]. The defaults make every record already stored count as stored at
/// store time 0: it ages from the upgrade on.
const SCHEMA_V4: &str = "
CREATE TABLE clock_marks (
    clock_ms INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
ALTER TABLE counters ADD COLUMN clock_ms          INTEGER NOT NULL DEFAULT 0;
ALTER TABLE counters ADD COLUMN last_seq_clock_ms INTEGER NOT NULL DEFAULT 0;
";

/// In-memory copy of the counters row; the writer changes it alongside the SQL and writes it back
/// in the same transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub records: u64,
    pub bytes: u64,
    pub records_by_priority: [u64; 3],
    pub last_seq: u64,
    pub appended_total: u64,
    pub acked_total: u64,
    pub evicted_total: u64,
    pub evicted_by_priority: [u64; 3],
    pub expired_total: u64,
    pub rejected_full_total: u64,
    pub commits_total: u64,
    pub dead_letters: u64,
    pub dead_letter_bytes: u64,
    /// Also the id of the last dead letter: ids are `1..=dead_lettered_total`, never reused.
    pub dead_lettered_total: u64,
    pub dead_letters_evicted_total: u64,
    pub refused_records: u64,
    pub refused_bytes: u64,
    /// Also the id of the last refusal: ids are `1..=refused_total`, never reused.
    pub refused_total: u64,
    pub refused_evicted_total: u64,
    pub requeued_total: u64,
    /// The store clock at the last commit (see [`crate::clock`]).
    pub clock_ms: u64,
    /// The store clock when `last_seq` was assigned: the open mark.
    pub last_seq_clock_ms: u64,
}

impl Counters {
    /// Accounts for one stored record going away.
    pub fn remove(&mut self, priority: usize, size: u64) {
        self.records = self.records.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
        if let Some(n) = self.records_by_priority.get_mut(priority) {
            *n = n.saturating_sub(1);
        }
    }

    /// The persisted part of the stats; the writer fills in its health.
    pub fn to_stats(&self, oldest_ingested_at_ms: Option<u64>) -> StoreStats {
        StoreStats {
            records: self.records,
            bytes: self.bytes,
            records_by_priority: self.records_by_priority,
            oldest_ingested_at_ms,
            last_seq: self.last_seq,
            appended_total: self.appended_total,
            acked_total: self.acked_total,
            evicted_total: self.evicted_total,
            evicted_by_priority: self.evicted_by_priority,
            expired_total: self.expired_total,
            rejected_full_total: self.rejected_full_total,
            commits_total: self.commits_total,
            dead_letters: self.dead_letters,
            dead_letter_bytes: self.dead_letter_bytes,
            dead_lettered_total: self.dead_lettered_total,
            dead_letters_evicted_total: self.dead_letters_evicted_total,
            refused_records: self.refused_records,
            refused_bytes: self.refused_bytes,
            refused_total: self.refused_total,
            refused_evicted_total: self.refused_evicted_total,
            requeued_total: self.requeued_total,
            ..StoreStats::default()
        }
    }
}

/// SQLite integers are signed; our values never come near `i64::MAX`, and saturating keeps a
/// corrupt value from wrapping.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) struct Opened {
    pub conn: Connection,
    pub counters: Counters,
    /// The clock marks, ascending.
    pub marks: Vec<(u64, u64)>,
}

/// Opens (creating if needed) the database for the writer: checks it is ours, sets WAL and the
/// durability, migrates, and loads the counters row (no scan of the records).
pub(crate) fn open_read_write(settings: &StoreSettings) -> Result<Opened, StoreError> {
    let path = settings.path.as_path();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // Identity first, before anything changes in the file.
    let version = check_identity(&conn, path, true)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "store could not switch to WAL mode");
    }
    let synchronous = match settings.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(open_err)?;
    if version < SCHEMA_VERSION {
        migrate(&mut conn, version).map_err(open_err)?;
    }
    let counters = load_counters(&conn).map_err(open_err)?;
    let marks = load_marks(&conn).map_err(open_err)?;
    Ok(Opened {
        conn,
        counters,
        marks,
    })
}

/// A read-only connection and the schema version of its file.
pub(crate) struct ReadOnly {
    pub conn: Connection,
    /// 1 to [`SCHEMA_VERSION`]: an older file is read as it is (read-only cannot migrate), so
    /// that `outpost status` works on a store the upgraded gateway has not opened yet.
    pub version: i64,
}

/// Opens an existing store read-only (SQLITE_OPEN_READ_ONLY), for another process.
pub(crate) fn open_read_only(path: &Path) -> Result<ReadOnly, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let version = check_identity(&conn, path, false)?;
    if version < 1 {
        // A file that was created but never initialised.
        return Err(StoreError::NotAStore {
            path: path.to_path_buf(),
        });
    }
    Ok(ReadOnly { conn, version })
}

/// Returns the schema version of a file that is ours (0 for a brand-new empty database when
/// `allow_new`), or the reason it is not usable.
fn check_identity(conn: &Connection, path: &Path, allow_new: bool) -> Result<i64, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    // Reading the header is what fails with "file is not a database" on a foreign file.
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(open_err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err)?;
    if app_id == APPLICATION_ID {
        if version > SCHEMA_VERSION {
            return Err(StoreError::UnsupportedSchema {
                path: path.to_path_buf(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        return Ok(version);
    }
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(open_err)?;
    if allow_new && app_id == 0 && version == 0 && objects == 0 {
        return Ok(0);
    }
    Err(StoreError::NotAStore {
        path: path.to_path_buf(),
    })
}

fn migrate(conn: &mut Connection, from: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    if from < 1 {
        tx.execute_batch(SCHEMA_V1)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    }
    if from < 2 {
        tx.execute_batch(SCHEMA_V2)?;
    }
    if from < 3 {
        tx.execute_batch(SCHEMA_V3)?;
    }
    if from < 4 {
        tx.execute_batch(SCHEMA_V4)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// Loads the counters row of a file at [`SCHEMA_VERSION`].
pub(crate) fn load_counters(conn: &Connection) -> rusqlite::Result<Counters> {
    load_counters_at(conn, SCHEMA_VERSION)
}

/// Loads the counters row of a file at `version` (columns added by a later version read 0).
pub(crate) fn load_counters_at(conn: &Connection, version: i64) -> rusqlite::Result<Counters> {
    let dead_letter_columns = if version >= 2 {
        "dead_letters, dead_letter_bytes, dead_lettered_total, dead_letters_evicted_total"
    } else {
        "0, 0, 0, 0"
    };
    let refused_columns = if version >= 3 {
        "refused_records, refused_bytes, refused_total, refused_evicted_total, requeued_total"
    } else {
        "0, 0, 0, 0, 0"
    };
    let clock_columns = if version >= 4 {
        "clock_ms, last_seq_clock_ms"
    } else {
        "0, 0"
    };
    conn.query_row(
        &format!(
            "SELECT records, bytes, records_high, records_normal, records_low, last_seq,
                appended_total, acked_total, evicted_total, evicted_high, evicted_normal,
                evicted_low, expired_total, rejected_full_total, commits_total,
                {dead_letter_columns}, {refused_columns}, {clock_columns}
         FROM counters WHERE id = 1"
        ),
        [],
        |row| {
            let get = |i: usize| row.get::<_, i64>(i).map(to_u64);
            Ok(Counters {
                records: get(0)?,
                bytes: get(1)?,
                records_by_priority: [get(2)?, get(3)?, get(4)?],
                last_seq: get(5)?,
                appended_total: get(6)?,
                acked_total: get(7)?,
                evicted_total: get(8)?,
                evicted_by_priority: [get(9)?, get(10)?, get(11)?],
                expired_total: get(12)?,
                rejected_full_total: get(13)?,
                commits_total: get(14)?,
                dead_letters: get(15)?,
                dead_letter_bytes: get(16)?,
                dead_lettered_total: get(17)?,
                dead_letters_evicted_total: get(18)?,
                refused_records: get(19)?,
                refused_bytes: get(20)?,
                refused_total: get(21)?,
                refused_evicted_total: get(22)?,
                requeued_total: get(23)?,
                clock_ms: get(24)?,
                last_seq_clock_ms: get(25)?,
            })
        },
    )
}

pub(crate) fn write_counters(conn: &Connection, c: &Counters) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "UPDATE counters SET records = ?1, bytes = ?2, records_high = ?3, records_normal = ?4,
            records_low = ?5, last_seq = ?6, appended_total = ?7, acked_total = ?8,
            evicted_total = ?9, evicted_high = ?10, evicted_normal = ?11, evicted_low = ?12,
            expired_total = ?13, rejected_full_total = ?14, commits_total = ?15,
            dead_letters = ?16, dead_letter_bytes = ?17, dead_lettered_total = ?18,
            dead_letters_evicted_total = ?19, refused_records = ?20, refused_bytes = ?21,
            refused_total = ?22, refused_evicted_total = ?23, requeued_total = ?24,
            clock_ms = ?25, last_seq_clock_ms = ?26
         WHERE id = 1",
    )?;
    let changed = stmt.execute(params![
        to_i64(c.records),
        to_i64(c.bytes),
        to_i64(c.records_by_priority[0]),
        to_i64(c.records_by_priority[1]),
        to_i64(c.records_by_priority[2]),
        to_i64(c.last_seq),
        to_i64(c.appended_total),
        to_i64(c.acked_total),
        to_i64(c.evicted_total),
        to_i64(c.evicted_by_priority[0]),
        to_i64(c.evicted_by_priority[1]),
        to_i64(c.evicted_by_priority[2]),
        to_i64(c.expired_total),
        to_i64(c.rejected_full_total),
        to_i64(c.commits_total),
        to_i64(c.dead_letters),
        to_i64(c.dead_letter_bytes),
        to_i64(c.dead_lettered_total),
        to_i64(c.dead_letters_evicted_total),
        to_i64(c.refused_records),
        to_i64(c.refused_bytes),
        to_i64(c.refused_total),
        to_i64(c.refused_evicted_total),
        to_i64(c.requeued_total),
        to_i64(c.clock_ms),
        to_i64(c.last_seq_clock_ms),
    ])?;
    if changed != 1 {
        // The row is created with the schema; without it the counters would silently not persist.
        return Err(rusqlite::Error::QueryReturnedNoRows);
    }
    Ok(())
}

/// The closed clock marks `(clock_ms, last_seq)`, ascending. A small table: the writer keeps
/// about [`crate::clock::MARKS_PER_TTL`] of them and deletes the older ones.
pub(crate) fn load_marks(conn: &Connection) -> rusqlite::Result<Vec<(u64, u64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT clock_ms, last_seq FROM clock_marks ORDER BY clock_ms")?;
    let rows = stmt.query_map([], |row| Ok((to_u64(row.get(0)?), to_u64(row.get(1)?))))?;
    rows.collect()
}

/// Index lookup on `records_by_ingested`, not a scan.
pub(crate) fn oldest_ingested_at(conn: &Connection) -> rusqlite::Result<Option<u64>> {
    let oldest: Option<i64> = conn
        .prepare_cached("SELECT min(ingested_at_ms) FROM records")?
        .query_row([], |row| row.get(0))?;
    Ok(oldest.map(to_u64))
}

/// Records of `priority` with `seq > after_seq`, ascending, at most `limit`. The writer hides
/// expired records by raising `after_seq` to the last expired seq.
pub(crate) fn read_after(
    conn: &Connection,
    priority: Priority,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<Record>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, stream, priority, payload, ingested_at_ms FROM records
         WHERE priority = ?1 AND seq > ?2
         ORDER BY seq LIMIT ?3",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![
        to_i64(priority.as_index() as u64),
        to_i64(after_seq),
        limit
    ])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(record_from_row(row)?);
    }
    Ok(out)
}

/// A [`Record`] from the columns `seq, stream, priority, payload, ingested_at_ms` (in that order,
/// first in the row), of `records` or `refused`.
fn record_from_row(row: &rusqlite::Row<'_>) -> Result<Record, StoreError> {
    let seq = to_u64(row.get(0)?);
    let stored_priority: i64 = row.get(2)?;
    let priority = usize::try_from(stored_priority)
        .ok()
        .and_then(Priority::from_index)
        .ok_or(StoreError::Corrupt {
            seq,
            what: "priority out of range",
        })?;
    Ok(Record {
        seq,
        stream: row.get(1)?,
        priority,
        payload: Bytes::from(row.get::<_, Vec<u8>>(3)?),
        ingested_at_ms: to_u64(row.get(4)?),
    })
}

/// Refused records, newest refusal first, at most `limit`. A file before version 3 has none.
pub(crate) fn read_refused(
    conn: &Connection,
    version: i64,
    limit: usize,
) -> Result<Vec<RefusedRecord>, StoreError> {
    if version < 3 || limit == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT seq, stream, priority, payload, ingested_at_ms, reason, refused_at_ms
         FROM refused ORDER BY id DESC LIMIT ?1",
    )?;
    let mut rows = stmt.query([i64::try_from(limit).unwrap_or(i64::MAX)])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(RefusedRecord {
            record: record_from_row(row)?,
            reason: row.get(5)?,
            refused_at_ms: to_u64(row.get(6)?),
        });
    }
    Ok(out)
}

pub(crate) fn get_state(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM state WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()
}

/// Every state entry whose key starts with `prefix`, in key order (a range scan on the primary
/// key, not a table scan).
pub(crate) fn states_with_prefix(
    conn: &Connection,
    prefix: &str,
) -> rusqlite::Result<Vec<(String, Vec<u8>)>> {
    // Keys in [prefix, prefix + U+10FFFF): every key with that prefix, in key order.
    let upper = format!("{prefix}\u{10FFFF}");
    let mut stmt = conn
        .prepare_cached("SELECT key, value FROM state WHERE key >= ?1 AND key < ?2 ORDER BY key")?;
    let rows = stmt.query_map([prefix, upper.as_str()], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?;
    rows.collect()
}

/// Dead letters, newest first, at most `limit`. A file at `version` 1 has none.
pub(crate) fn read_dead_letters(
    conn: &Connection,
    version: i64,
    limit: usize,
) -> Result<Vec<StoredDeadLetter>, StoreError> {
    if version < 2 || limit == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, topic, source, reason, content_format, payload, at_ms FROM dead_letters
         ORDER BY id DESC LIMIT ?1",
    )?;
    let mut rows = stmt.query([i64::try_from(limit).unwrap_or(i64::MAX)])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let id = to_u64(row.get(0)?);
        let content_format = match row.get::<_, Option<i64>>(4)? {
            None => None,
            Some(cf) => Some(u16::try_from(cf).map_err(|_| StoreError::Corrupt {
                seq: id,
                what: "dead letter content_format out of range",
            })?),
        };
        out.push(StoredDeadLetter {
            id,
            letter: DeadLetter {
                topic: row.get(1)?,
                source: row.get(2)?,
                reason: row.get(3)?,
                content_format,
                payload: Bytes::from(row.get::<_, Vec<u8>>(5)?),
                at_ms: to_u64(row.get(6)?),
            },
        });
    }
    Ok(out)
}
