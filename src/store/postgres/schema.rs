//! Migrations of the PostgreSQL backend: the numbered SQL files in
//! `migrations/postgres/`, embedded at build time and tracked in
//! `schema_version`. All pending migrations are applied in one transaction
//! that first takes a transaction-level advisory lock, so several workers
//! starting together apply each migration exactly once. It does not know any
//! table beyond `schema_version`; the SQL files own the schema.

use deadpool_postgres::Object;

use crate::store::StoreError;

/// The migrations, in order. A version is applied at most once.
const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0001_init.sql"
        )),
    ),
    (
        2,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0002_destination_activity.sql"
        )),
    ),
    (
        3,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0003_workers.sql"
        )),
    ),
    (
        4,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0004_e2ee.sql"
        )),
    ),
    (
        5,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0005_device_lists.sql"
        )),
    ),
    (
        6,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0006_inbox_message_id.sql"
        )),
    ),
    (
        7,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0007_lease_epochs.sql"
        )),
    ),
    (
        8,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0008_refusals.sql"
        )),
    ),
    (
        9,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0009_retention.sql"
        )),
    ),
    (
        10,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0010_trace.sql"
        )),
    ),
    (
        11,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/postgres/0011_txn_by_reference.sql"
        )),
    ),
];

/// The schema version this build writes.
pub const LATEST_VERSION: u32 = 11;

/// The advisory lock key that serializes migrations ("courier" in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_6f75_7269_6572;

/// Applies every migration newer than the recorded version.
pub async fn migrate(client: &mut Object, now_ms: i64) -> Result<u32, StoreError> {
    let fail = |version: u32| {
        move |e: tokio_postgres::Error| StoreError::Migration {
            version,
            reason: match e.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            },
        }
    };
    let tx = client.transaction().await.map_err(fail(0))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(fail(0))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER NOT NULL PRIMARY KEY,
             applied_ts BIGINT NOT NULL
         )",
    )
    .await
    .map_err(fail(0))?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(fail(0))?
        .get(0);
    let current = current as u32;
    if current > LATEST_VERSION {
        return Err(StoreError::Migration {
            version: current,
            reason: format!(
                "the database has schema version {current}, newer than this build ({LATEST_VERSION})"
            ),
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(fail(version))?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ts) VALUES ($1, $2)",
            &[&(version as i32), &now_ms],
        )
        .await
        .map_err(fail(version))?;
        tracing::info!(version, "applied postgres migration");
    }
    tx.commit().await.map_err(fail(LATEST_VERSION))?;
    Ok(LATEST_VERSION)
}
