//! Connection setup and migrations of the SQLite backend: the PRAGMAs every
//! connection gets, and the numbered SQL files in `migrations/sqlite/`,
//! embedded at build time and tracked in `schema_version`. It does not know
//! any table beyond `schema_version`; the SQL files own the schema.

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::store::StoreError;

/// The migrations, in order. A version is applied at most once.
const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0001_init.sql"
        )),
    ),
    (
        2,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0002_destination_activity.sql"
        )),
    ),
    (
        3,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0003_e2ee.sql"
        )),
    ),
    (
        4,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0004_device_lists.sql"
        )),
    ),
    (
        5,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0005_inbox_message_id.sql"
        )),
    ),
    (
        6,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0006_refusals.sql"
        )),
    ),
    (
        7,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0007_retention.sql"
        )),
    ),
    (
        8,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0008_trace.sql"
        )),
    ),
    (
        9,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0009_txn_by_reference.sql"
        )),
    ),
];

/// The schema version this build writes.
pub const LATEST_VERSION: u32 = 9;

/// Opens the writer connection: creates the file, switches to WAL and sets
/// the per-connection durability PRAGMAs.
pub fn open_writer(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // journal_mode answers with the resulting mode; anything but "wal" means
    // the file system refused WAL, and the durability reasoning below fails.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "journal_mode=WAL refused (got {mode})"
        )));
    }
    common_pragmas(&conn)?;
    // A larger page cache for the writer (32 MiB); automatic checkpoints
    // every 8192 pages (32 MiB of WAL) instead of 1000, so a page the queue
    // rewrites often (outbox and inbox index pages) is copied back to the
    // database once per checkpoint rather than many times (about a tenth
    // less writer CPU under load, no change to durability: every commit is
    // still fsynced in the WAL); and a WAL file cut back to 64 MiB after a
    // checkpoint instead of keeping its peak size.
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.query_row("PRAGMA journal_size_limit = 67108864", [], |_| Ok(()))?;
    conn.query_row("PRAGMA wal_autocheckpoint = 8192", [], |_| Ok(()))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Opens a read-only connection for the reader pool.
pub fn open_reader(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    common_pragmas(&conn)?;
    conn.pragma_update(None, "query_only", true)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn common_pragmas(conn: &Connection) -> Result<(), StoreError> {
    // FULL: WAL with NORMAL may lose the last commits on power loss, and a
    // commit here is a promise to a peer (DESIGN §1.1).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // The bundled SQLite is built with STAT4, under which a cached statement
    // whose plan could depend on a bound value (`destination = ?1 ORDER BY
    // seq`, a bound LIMIT) is compiled again every time that value changes,
    // i.e. on nearly every call: half the cost of the sender's reads. One
    // plan per statement is what we want anyway (the schema has no ANALYZE
    // statistics to choose between plans).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // The writer runs every job of a group under its own SAVEPOINT, whose
    // statement journal is a temporary file by default: written for every
    // page a job touches. It only serves rolling back a job inside the open
    // transaction, never recovery, so it can live in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

/// Applies every migration newer than the recorded version, each in its own
/// `BEGIN IMMEDIATE` transaction together with its `schema_version` row.
pub fn migrate(conn: &mut Connection, now_ms: i64) -> Result<u32, StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER NOT NULL PRIMARY KEY,
             applied_ts INTEGER NOT NULL
         )",
    )?;
    let current: u32 = conn.query_row(
        "SELECT coalesce(max(version), 0) FROM schema_version",
        [],
        |row| row.get(0),
    )?;
    if current > LATEST_VERSION {
        return Err(StoreError::Migration {
            version: current,
            reason: format!(
                "the database has schema version {current}, newer than this build ({LATEST_VERSION})"
            ),
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let fail = |e: rusqlite::Error| StoreError::Migration {
            version,
            reason: e.to_string(),
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        tx.execute_batch(sql).map_err(fail)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ts) VALUES (?1, ?2)",
            (version, now_ms),
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)?;
        tracing::info!(version, "applied sqlite migration");
    }
    Ok(LATEST_VERSION)
}
