//! SQL of the outbox side of the SQLite backend: queued EDUs per
//! destination, the one in-flight transaction record, quarantine, and the
//! persisted retry state and status of destinations. Device-list rows
//! (`device_list_outbox.rs`) get their `prev_id` meta on peek and their
//! acknowledged `stream_id` recorded on ack. Write functions run on
//! the writer thread inside the group transaction; reads on a pooled reader.

use rusqlite::{Connection, OptionalExtension, params};

use super::device_list_outbox::{PeekChain, record_acked};
use super::trace;
use crate::store::{
    DestinationStatus, InFlightTxn, NextTxn, OutboxEdu, QuarantinedEdu, RecordedTxn, RefusalState,
    RetryState, StoreError, TimestampMs,
};

pub(super) fn parse_seqs(seqs_json: &str) -> Result<Vec<i64>, StoreError> {
    serde_json::from_str(seqs_json)
        .map_err(|e| StoreError::Corrupt(format!("outbox_txn.seqs_json: {e}")))
}

const PEEK_SQL: &str =
    "SELECT seq, edu_json, message_count, queued_ts, refusals, dl_user, dl_stream
     FROM outbox WHERE destination = ?1 ORDER BY seq LIMIT ?2";

pub fn peek_outbox(
    conn: &Connection,
    destination: &str,
    max_edus: u32,
    max_bytes: u64,
) -> Result<Vec<OutboxEdu>, StoreError> {
    let mut stmt = conn.prepare_cached(PEEK_SQL)?;
    let mut rows = stmt.query((destination, i64::from(max_edus)))?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut chain = PeekChain::new(conn, destination);
    while let Some(row) = rows.next()? {
        let edu_json: String = row.get(1)?;
        let len = edu_json.len() as u64;
        if !out.is_empty() && bytes + len > max_bytes {
            break;
        }
        bytes += len;
        let device_list = match row.get::<_, Option<String>>(5)? {
            Some(user) => Some(chain.next(user, row.get(6)?)?),
            None => None,
        };
        out.push(OutboxEdu {
            seq: row.get(0)?,
            edu_json,
            message_count: row.get(2)?,
            queued_ts: row.get(3)?,
            refusals: row.get(4)?,
            device_list,
        });
    }
    Ok(out)
}

pub fn begin_txn(conn: &Connection, txn: &InFlightTxn) -> Result<(), StoreError> {
    insert_record(
        conn,
        &txn.destination,
        &txn.txn_id,
        &txn.seqs,
        (&txn.body, None),
    )
}

/// Inserts the in-flight record: `stored` is the body, or the envelope and
/// the offset of the EDUs (`RecordedTxn::stored`).
fn insert_record(
    conn: &Connection,
    destination: &str,
    txn_id: &str,
    seqs: &[i64],
    stored: (&str, Option<i64>),
) -> Result<(), StoreError> {
    let seqs_json = serde_json::to_string(seqs)
        .map_err(|e| StoreError::Corrupt(format!("seqs not serializable: {e}")))?;
    // The primary key on destination makes a second in-flight txn fail.
    conn.prepare_cached(
        "INSERT INTO outbox_txn (destination, txn_id, seqs_json, body, edus_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute((destination, txn_id, seqs_json, stored.0, stored.1))?;
    trace::record_txn(conn, destination, txn_id, seqs, crate::clock::now_ms())
}

/// The seqs of the recorded txn if it is `txn_id`; removes the record.
fn take_in_flight(
    conn: &Connection,
    destination: &str,
    txn_id: &str,
) -> Result<Option<Vec<i64>>, StoreError> {
    let seqs_json: Option<String> = conn
        .prepare_cached("SELECT seqs_json FROM outbox_txn WHERE destination = ?1 AND txn_id = ?2")?
        .query_row((destination, txn_id), |row| row.get(0))
        .optional()?;
    let Some(seqs_json) = seqs_json else {
        return Ok(None);
    };
    conn.prepare_cached("DELETE FROM outbox_txn WHERE destination = ?1")?
        .execute([destination])?;
    Ok(Some(parse_seqs(&seqs_json)?))
}

pub fn ack_txn(
    conn: &Connection,
    destination: &str,
    txn_id: &str,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    // A second ack of the same txn finds no record and changes nothing.
    let Some(seqs) = take_in_flight(conn, destination, txn_id)? else {
        return Ok(());
    };
    trace::record_attempt(conn, destination, txn_id, now_ms, "ok", None)?;
    record_acked(conn, destination, &seqs)?;
    delete_rows(conn, destination, &seqs)?;
    set_retry_state(
        conn,
        destination,
        &RetryState {
            failures: 0,
            retry_after_ms: 0,
            last_success_ms: Some(now_ms),
            last_error: None,
        },
        now_ms,
    )
}

/// `Store::advance` in the writer's transaction: the ack, the peek and the
/// new record in one commit. The body is put together by the caller.
pub fn advance(
    conn: &Connection,
    destination: &str,
    acked: Option<(&str, TimestampMs)>,
    next: NextTxn,
) -> Result<Option<RecordedTxn>, StoreError> {
    if let Some((txn_id, now_ms)) = acked {
        ack_txn(conn, destination, txn_id, now_ms)?;
    }
    let edus = peek_outbox(conn, destination, next.max_edus, next.max_bytes)?;
    if edus.is_empty() {
        return Ok(None);
    }
    let txn = next.draft(destination, edus);
    insert_record(conn, destination, &txn.txn_id, &txn.seqs, txn.stored())?;
    Ok(Some(txn))
}

/// Deletes the acknowledged rows: one range statement when their seqs are
/// consecutive (as the rows of one busy destination are), else one
/// statement per row.
fn delete_rows(conn: &Connection, destination: &str, seqs: &[i64]) -> Result<(), StoreError> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Ok(());
    };
    let consecutive = seqs.windows(2).all(|w| w[1] == w[0] + 1);
    if consecutive && seqs.len() > 1 {
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND seq BETWEEN ?2 AND ?3")?
            .execute((destination, first, last))?;
        return Ok(());
    }
    let mut delete =
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND seq = ?2")?;
    for seq in seqs {
        delete.execute((destination, seq))?;
    }
    Ok(())
}

pub fn refuse_txn(conn: &Connection, destination: &str, txn_id: &str) -> Result<(), StoreError> {
    let Some(seqs) = take_in_flight(conn, destination, txn_id)? else {
        return Ok(());
    };
    trace::record_attempt(
        conn,
        destination,
        txn_id,
        crate::clock::now_ms(),
        "refused",
        None,
    )?;
    // Only a refusal of the EDU alone counts (`OutboxEdu::refusals`).
    if let [seq] = seqs.as_slice() {
        conn.prepare_cached(
            "UPDATE outbox SET refusals = refusals + 1 WHERE destination = ?1 AND seq = ?2",
        )?
        .execute((destination, seq))?;
    }
    Ok(())
}

pub fn edu_refusals(
    conn: &Connection,
    destination: &str,
    seq: i64,
) -> Result<Option<u32>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT refusals FROM outbox WHERE destination = ?1 AND seq = ?2")?
        .query_row((destination, seq), |row| row.get(0))
        .optional()?)
}

pub fn restore_quarantined(
    conn: &Connection,
    destination: &str,
    seq: i64,
    refusals: u32,
) -> Result<bool, StoreError> {
    // The seq is kept: AUTOINCREMENT never hands it out again, so the row
    // goes back to its old place in the queue.
    let moved = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO outbox (seq, destination, edu_json, message_count, queued_ts,
                                           refusals, dl_user, dl_device, dl_stream)
             SELECT seq, destination, edu_json, message_count, queued_ts, ?3,
                    dl_user, dl_device, dl_stream
             FROM quarantine WHERE destination = ?1 AND seq = ?2",
        )?
        .execute((destination, seq, refusals))?;
    let n = conn
        .prepare_cached("DELETE FROM quarantine WHERE destination = ?1 AND seq = ?2")?
        .execute((destination, seq))?;
    Ok(moved > 0 || n > 0)
}

pub fn requeue_quarantined(conn: &Connection, destination: &str) -> Result<u64, StoreError> {
    // Fresh seqs, assigned in the old seqs' order: the end of the queue, in
    // the original order.
    conn.prepare_cached(
        "INSERT INTO outbox (destination, edu_json, message_count, queued_ts, refusals,
                             dl_user, dl_device, dl_stream)
         SELECT destination, edu_json, message_count, queued_ts, 0,
                dl_user, dl_device, dl_stream
         FROM quarantine WHERE destination = ?1 ORDER BY seq",
    )?
    .execute([destination])?;
    let n = conn
        .prepare_cached("DELETE FROM quarantine WHERE destination = ?1")?
        .execute([destination])?;
    Ok(n as u64)
}

pub fn refusal_state(conn: &Connection, destination: &str) -> Result<RefusalState, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT split_limit, split_upto, split_accepted, refusing_since_ts, probation_seqs
             FROM destinations WHERE destination = ?1",
        )?
        .query_row([destination], |row| {
            Ok((
                RefusalState {
                    split_limit: row.get(0)?,
                    split_upto: row.get(1)?,
                    split_accepted: row.get(2)?,
                    refusing_since_ms: row.get(3)?,
                    probation_seqs: Vec::new(),
                },
                row.get::<_, String>(4)?,
            ))
        })
        .optional()?;
    match row {
        None => Ok(RefusalState::default()),
        Some((mut state, probation)) => {
            state.probation_seqs = serde_json::from_str(&probation)
                .map_err(|e| StoreError::Corrupt(format!("destinations.probation_seqs: {e}")))?;
            Ok(state)
        }
    }
}

pub fn set_refusal_state(
    conn: &Connection,
    destination: &str,
    state: &RefusalState,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    let probation = serde_json::to_string(&state.probation_seqs)
        .map_err(|e| StoreError::Corrupt(format!("seqs not serializable: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO destinations
             (destination, split_limit, split_upto, split_accepted, refusing_since_ts,
              probation_seqs, updated_ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (destination) DO UPDATE SET
             split_limit = excluded.split_limit,
             split_upto = excluded.split_upto,
             split_accepted = excluded.split_accepted,
             refusing_since_ts = excluded.refusing_since_ts,
             probation_seqs = excluded.probation_seqs,
             updated_ts = max(updated_ts, excluded.updated_ts)",
    )?
    .execute(params![
        destination,
        state.split_limit,
        state.split_upto,
        state.split_accepted,
        state.refusing_since_ms,
        probation,
        now_ms
    ])?;
    Ok(())
}

pub fn quarantine_edu(
    conn: &Connection,
    destination: &str,
    seq: i64,
    reason: &str,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    let moved = conn
        .prepare_cached(
            "INSERT OR REPLACE INTO quarantine
                 (destination, seq, edu_json, message_count, queued_ts, reason, quarantined_ts,
                  dl_user, dl_device, dl_stream)
             SELECT destination, seq, edu_json, message_count, queued_ts, ?3, ?4,
                    dl_user, dl_device, dl_stream
             FROM outbox WHERE destination = ?1 AND seq = ?2",
        )?
        .execute((destination, seq, reason, now_ms))?;
    if moved > 0 {
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND seq = ?2")?
            .execute((destination, seq))?;
        trace::record_quarantined(conn, destination, seq, reason, now_ms)?;
    }
    Ok(())
}

pub fn list_quarantined(
    conn: &Connection,
    destination: Option<&str>,
) -> Result<Vec<QuarantinedEdu>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT destination, seq, edu_json, reason, quarantined_ts FROM quarantine
         WHERE ?1 IS NULL OR destination = ?1 ORDER BY destination, seq",
    )?;
    let rows = stmt.query_map([destination], |row| {
        Ok(QuarantinedEdu {
            destination: row.get(0)?,
            seq: row.get(1)?,
            edu_json: row.get(2)?,
            reason: row.get(3)?,
            quarantined_ts: row.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn release_quarantined(
    conn: &Connection,
    destination: &str,
    seq: i64,
    requeue: bool,
) -> Result<bool, StoreError> {
    if requeue {
        // A fresh seq puts it at the end of the queue; refusals start over.
        conn.prepare_cached(
            "INSERT INTO outbox (destination, edu_json, message_count, queued_ts, refusals,
                                 dl_user, dl_device, dl_stream)
             SELECT destination, edu_json, message_count, queued_ts, 0,
                    dl_user, dl_device, dl_stream
             FROM quarantine WHERE destination = ?1 AND seq = ?2",
        )?
        .execute((destination, seq))?;
    }
    let n = conn
        .prepare_cached("DELETE FROM quarantine WHERE destination = ?1 AND seq = ?2")?
        .execute((destination, seq))?;
    Ok(n > 0)
}

// --- destinations ---------------------------------------------------------------

pub fn retry_state(conn: &Connection, destination: &str) -> Result<RetryState, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT failures, retry_after_ts, last_success_ts, last_error
             FROM destinations WHERE destination = ?1",
        )?
        .query_row([destination], |row| {
            Ok(RetryState {
                failures: row.get(0)?,
                retry_after_ms: row.get(1)?,
                last_success_ms: row.get(2)?,
                last_error: row.get(3)?,
            })
        })
        .optional()?
        .unwrap_or_default())
}

/// Writes a destination's retry state, stamped `now_ms` as its last
/// activity (see `maintenance::retire_destinations`). It also keeps
/// `failing_since_ts`, the first failure after the last success (for the
/// dead-destination expiry, `retention.rs`): a newer `last_success_ts`
/// clears it, a failure (`failures > 0`) sets it if unset, anything else
/// (a backoff reset because the peer talked to us) leaves it.
pub fn set_retry_state(
    conn: &Connection,
    destination: &str,
    state: &RetryState,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    trace::record_failed_attempt(
        conn,
        destination,
        state.failures,
        state.retry_after_ms,
        state.last_error.as_deref(),
        now_ms,
    )?;
    conn.prepare_cached(
        "INSERT INTO destinations
             (destination, failures, retry_after_ts, last_success_ts, last_error, updated_ts,
              failing_since_ts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?2 > 0 THEN ?6 END)
         ON CONFLICT (destination) DO UPDATE SET
             failures = excluded.failures,
             retry_after_ts = excluded.retry_after_ts,
             last_success_ts = excluded.last_success_ts,
             last_error = excluded.last_error,
             updated_ts = max(updated_ts, excluded.updated_ts),
             failing_since_ts = CASE
                 WHEN excluded.last_success_ts > coalesce(last_success_ts, -1) THEN NULL
                 WHEN excluded.failures > 0 THEN coalesce(failing_since_ts, excluded.updated_ts)
                 ELSE failing_since_ts
             END",
    )?
    .execute(params![
        destination,
        state.failures,
        state.retry_after_ms,
        state.last_success_ms,
        state.last_error,
        now_ms
    ])?;
    Ok(())
}

pub fn destinations_with_pending(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT destination FROM outbox UNION SELECT destination FROM outbox_txn ORDER BY 1",
    )?;
    let rows = stmt.query_map([], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn destination_statuses(conn: &Connection) -> Result<Vec<DestinationStatus>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "WITH names (destination) AS (
             SELECT destination FROM outbox
             UNION SELECT destination FROM quarantine
             UNION SELECT destination FROM destinations
             UNION SELECT destination FROM outbox_txn
         ),
         queued AS (
             SELECT destination, count(*) AS edus, sum(message_count) AS messages,
                    min(queued_ts) AS oldest
             FROM outbox GROUP BY destination
         ),
         held AS (SELECT destination, count(*) AS n FROM quarantine GROUP BY destination)
         SELECT n.destination, coalesce(q.edus, 0), coalesce(q.messages, 0), q.oldest,
                coalesce(d.failures, 0), coalesce(d.retry_after_ts, 0), d.last_success_ts,
                d.last_error, coalesce(h.n, 0), d.refusing_since_ts
         FROM names n
         LEFT JOIN queued q ON q.destination = n.destination
         LEFT JOIN held h ON h.destination = n.destination
         LEFT JOIN destinations d ON d.destination = n.destination
         ORDER BY n.destination",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok(DestinationStatus {
            destination: row.get(0)?,
            pending_edus: row.get::<_, i64>(1)? as u64,
            pending_messages: row.get::<_, i64>(2)? as u64,
            oldest_queued_ts: row.get(3)?,
            retry: RetryState {
                failures: row.get(4)?,
                retry_after_ms: row.get(5)?,
                last_success_ms: row.get(6)?,
                last_error: row.get(7)?,
            },
            quarantined: row.get::<_, i64>(8)? as u64,
            refusing_since_ms: row.get(9)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::StatementStatus;

    /// With SQLite's STAT4 (on in the bundled build) a cached statement
    /// whose plan may depend on a bound value is re-compiled whenever the
    /// value changes, i.e. on every call; the connection setup turns on the
    /// query planner stability guarantee so the hot reads are compiled once.
    #[test]
    fn peeking_reuses_the_compiled_statement() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("courier.db");
        let mut writer =
            super::super::schema::open_writer(&path, std::time::Duration::from_secs(1))
                .expect("open");
        super::super::schema::migrate(&mut writer, 0).expect("migrate");
        let reader = super::super::schema::open_reader(&path, std::time::Duration::from_secs(1))
            .expect("open reader");
        for i in 0..50 {
            writer
                .execute(
                    "INSERT INTO outbox (destination, edu_json, message_count, queued_ts)
                     VALUES (?1, '{}', 1, 0)",
                    [format!("d{}.example", i % 5)],
                )
                .expect("insert");
            let limit = if i % 2 == 0 { 100 } else { 3 };
            let rows = peek_outbox(&reader, &format!("d{}.example", i % 5), limit, u64::MAX)
                .expect("peek");
            assert_eq!(rows.len(), (i / 5 + 1).min(limit as usize));
        }
        let stmt = reader.prepare_cached(PEEK_SQL).expect("cached");
        assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0);
    }
}
