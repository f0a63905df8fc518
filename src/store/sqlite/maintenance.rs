//! SQL of the SQLite backend's remote server key cache and of pruning
//! (expired dedupe records, expired keys, orphan inbox rows), always in
//! bounded batches so that one pass never holds the writer for long.

use rusqlite::Connection;

use crate::store::{PruneReport, Retention, StoreError, StoredServerKey, TimestampMs};

pub fn server_keys(
    conn: &Connection,
    server_name: &str,
) -> Result<Vec<StoredServerKey>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT server_name, key_id, public_key, valid_until_ts FROM server_keys
         WHERE server_name = ?1 ORDER BY key_id",
    )?;
    let rows = stmt.query_map([server_name], |row| {
        Ok(StoredServerKey {
            server_name: row.get(0)?,
            key_id: row.get(1)?,
            public_key: row.get(2)?,
            valid_until_ts: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn put_server_keys(conn: &Connection, keys: &[StoredServerKey]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO server_keys (server_name, key_id, public_key, valid_until_ts)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (server_name, key_id) DO UPDATE SET
             public_key = excluded.public_key,
             valid_until_ts = excluded.valid_until_ts",
    )?;
    for key in keys {
        stmt.execute((
            &key.server_name,
            &key.key_id,
            &key.public_key,
            key.valid_until_ts,
        ))?;
    }
    Ok(())
}

// --- housekeeping ------------------------------------------------------------------

pub fn prune(
    conn: &Connection,
    now_ms: TimestampMs,
    retention: Retention,
    batch: u32,
) -> Result<PruneReport, StoreError> {
    let limit = i64::from(batch);
    let expire = |sql: &str, cutoff: i64| -> Result<u64, StoreError> {
        Ok(conn.prepare_cached(sql)?.execute((cutoff, limit))? as u64)
    };
    Ok(PruneReport {
        client_txns: expire(
            "DELETE FROM client_txns WHERE rowid IN
                 (SELECT rowid FROM client_txns WHERE received_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.client_txn_ms),
        )?,
        inbound_txns: expire(
            "DELETE FROM inbound_txns WHERE rowid IN
                 (SELECT rowid FROM inbound_txns WHERE received_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.inbound_txn_ms),
        )?,
        inbound_message_ids: expire(
            "DELETE FROM inbound_message_ids WHERE rowid IN
                 (SELECT rowid FROM inbound_message_ids WHERE received_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.inbound_message_id_ms),
        )?,
        expired_server_keys: expire(
            "DELETE FROM server_keys WHERE (server_name, key_id) IN
                 (SELECT server_name, key_id FROM server_keys WHERE valid_until_ts < ?1 LIMIT ?2)",
            now_ms,
        )?,
        orphan_inbox_rows: conn
            .prepare_cached(
                "DELETE FROM device_inbox WHERE stream_id IN
                     (SELECT i.stream_id FROM device_inbox i
                      WHERE NOT EXISTS (SELECT 1 FROM devices d
                                        WHERE d.user_id = i.user_id
                                          AND d.device_id = i.device_id)
                      LIMIT ?1)",
            )?
            .execute([limit])? as u64,
    })
}
