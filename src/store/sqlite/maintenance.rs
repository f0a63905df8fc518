//! SQL of the SQLite backend's remote server key cache and of pruning
//! (expired dedupe records, expired keys, orphan inbox rows, the retry state
//! of long-idle destinations, claimed-key tombstones, expired device-list
//! interests), always in bounded
//! batches so that one batch never holds the writer for long.

use std::sync::atomic::{AtomicI64, Ordering};

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
    orphan_cursor: &AtomicI64,
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
        orphan_inbox_rows: prune_orphans(conn, orphan_cursor, limit)?,
        retired_destinations: expire(
            RETIRE_DESTINATIONS,
            now_ms.saturating_sub(retention.destination_ms),
        )?,
        claimed_one_time_keys: expire(
            "DELETE FROM claimed_one_time_keys WHERE rowid IN
                 (SELECT rowid FROM claimed_one_time_keys WHERE claimed_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.claimed_key_ms),
        )?,
        expired_device_list_interest: expire(
            "DELETE FROM device_list_interest WHERE (user_id, destination) IN
                 (SELECT user_id, destination FROM device_list_interest
                  WHERE expires_ts < ?1 LIMIT ?2)",
            now_ms,
        )?,
        trace_events: super::trace::prune(conn, now_ms.saturating_sub(retention.trace_ms), limit)?,
    })
}

/// Deletes the retry state of destinations with nothing queued, in flight or
/// quarantined whose last activity (update, success, or the end of a
/// backoff) is at or before the cutoff `?1`, at most `?2` of them.
const RETIRE_DESTINATIONS: &str = "
    DELETE FROM destinations WHERE destination IN
        (SELECT d.destination FROM destinations d
         WHERE max(d.updated_ts, d.retry_after_ts, coalesce(d.last_success_ts, 0)) <= ?1
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.destination = d.destination)
           AND NOT EXISTS (SELECT 1 FROM outbox_txn t WHERE t.destination = d.destination)
           AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.destination = d.destination)
         LIMIT ?2)";

/// Inbox rows examined per pruning pass when looking for orphans.
const ORPHAN_SCAN_ROWS: i64 = 10_000;

/// Deletes up to `limit` inbox rows whose device no longer exists, looking
/// at most at `ORPHAN_SCAN_ROWS` rows after `cursor` (a stream id kept by the
/// caller between passes), so that a large inbox never stalls the writer.
/// The cursor moves past the window only when the window was cleaned
/// completely, and wraps to 0 at the end of the inbox.
fn prune_orphans(conn: &Connection, cursor: &AtomicI64, limit: i64) -> Result<u64, StoreError> {
    let from = cursor.load(Ordering::Relaxed);
    let (scanned, window_end): (i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT count(*), max(stream_id) FROM
                 (SELECT stream_id FROM device_inbox WHERE stream_id > ?1
                  ORDER BY stream_id LIMIT ?2)",
        )?
        .query_row((from, ORPHAN_SCAN_ROWS), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    let deleted = conn
        .prepare_cached(
            "DELETE FROM device_inbox WHERE stream_id IN
                 (SELECT i.stream_id FROM device_inbox i
                  WHERE i.stream_id > ?1 AND i.stream_id <= ?2
                    AND NOT EXISTS (SELECT 1 FROM devices d
                                    WHERE d.user_id = i.user_id
                                      AND d.device_id = i.device_id)
                  LIMIT ?3)",
        )?
        .execute((from, window_end.unwrap_or(from), limit))? as u64;
    let next = match window_end {
        // The batch limit stopped us: the window may hold more; stay.
        Some(_) if deleted as i64 >= limit => from,
        // A full window: continue after it next time.
        Some(end) if scanned == ORPHAN_SCAN_ROWS => end,
        // The end of the inbox: start over next time.
        _ => 0,
    };
    cursor.store(next, Ordering::Relaxed);
    Ok(deleted)
}
