//! SQL of the outbox side of the PostgreSQL backend: queued EDUs per
//! destination, the one in-flight transaction record, quarantine, the
//! persisted retry state and status of destinations, the remote server key
//! cache, and pruning in bounded batches (also of expired device-list
//! interests). Each write function is one transaction (or one statement) on
//! the connection given; a destination task's writes first check its lease
//! fence in that transaction (`lease::check_fence`).

use std::sync::atomic::{AtomicI64, Ordering};

use deadpool_postgres::{GenericClient, Object, Transaction};

use super::Fail;
use super::device_list_outbox::{PrevChain, record_acked};
use super::lease::check_fence;
use super::trace;
use crate::store::txn_body::splice;
use crate::store::{
    DestinationStatus, Fence, InFlightTxn, NextTxn, OutboxEdu, PruneReport, RecordedTxn, Retention,
    RetryState, StoreError, TimestampMs,
};

/// Destinations with queued EDUs, found by skipping through the
/// `(destination, seq)` index one destination at a time (a loose index
/// scan), plus destinations with an in-flight record.
pub const PENDING_DESTINATIONS: &str = "
    WITH RECURSIVE queued (destination) AS (
        (SELECT destination FROM outbox ORDER BY destination LIMIT 1)
        UNION ALL
        SELECT (SELECT o.destination FROM outbox o WHERE o.destination > q.destination
                ORDER BY o.destination LIMIT 1)
        FROM queued q WHERE q.destination IS NOT NULL
    )
    SELECT destination FROM queued WHERE destination IS NOT NULL
    UNION SELECT destination FROM outbox_txn";

fn to_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub async fn in_flight(c: &Object, destination: &str) -> Result<Option<InFlightTxn>, Fail> {
    // A record that names its EDUs (`edus_at` set) gets its rows' JSON in
    // the record's order; a missing row comes back as NULL.
    let stmt = c
        .prepare_cached(
            "SELECT t.txn_id, t.seqs, t.body, t.edus_at,
                    CASE WHEN t.edus_at IS NOT NULL THEN
                        (SELECT array_agg(o.edu_json ORDER BY k.ord)
                         FROM unnest(t.seqs) WITH ORDINALITY AS k (seq, ord)
                         LEFT JOIN outbox o ON o.destination = t.destination AND o.seq = k.seq)
                    END
             FROM outbox_txn t WHERE t.destination = $1",
        )
        .await?;
    let Some(row) = c.query_opt(&stmt, &[&destination]).await? else {
        return Ok(None);
    };
    let seqs: Vec<i64> = row.get(1);
    let mut body: String = row.get(2);
    if let Some(at) = row.get::<_, Option<i64>>(3) {
        let edus: Vec<Option<String>> = row
            .get::<_, Option<Vec<Option<String>>>>(4)
            .unwrap_or_default();
        // Recorded rows leave the queue only with their record (ack, or a
        // dead destination's expiry): one missing means a damaged store.
        let edus = edus
            .into_iter()
            .collect::<Option<Vec<String>>>()
            .filter(|edus| edus.len() == seqs.len())
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "an outbox row of the transaction in flight to {destination} is missing"
                ))
            })?;
        body = splice(
            &body,
            usize::try_from(at).unwrap_or(usize::MAX),
            edus.iter().map(String::as_str),
        );
    }
    Ok(Some(InFlightTxn {
        destination: destination.to_owned(),
        txn_id: row.get(0),
        seqs,
        body,
    }))
}

pub async fn peek_outbox(
    c: &impl GenericClient,
    destination: &str,
    max_edus: u32,
    max_bytes: u64,
) -> Result<Vec<OutboxEdu>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT o.seq, o.edu_json, o.message_count, o.queued_ts, o.refusals,
                    o.dl_user, o.dl_stream,
                    (SELECT a.stream_id FROM device_list_acked a
                     WHERE a.destination = o.destination AND a.user_id = o.dl_user)
             FROM outbox o
             WHERE o.destination = $1 ORDER BY o.seq LIMIT $2",
        )
        .await?;
    let rows = c
        .query(&stmt, &[&destination, &i64::from(max_edus)])
        .await?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut chain = PrevChain::default();
    for row in rows {
        let edu_json: String = row.get(1);
        let len = edu_json.len() as u64;
        if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(len);
        let device_list = row
            .get::<_, Option<String>>(5)
            .map(|user| chain.next(user, row.get(6), row.get(7)));
        out.push(OutboxEdu {
            seq: row.get(0),
            edu_json,
            message_count: to_u32(row.get(2)),
            queued_ts: row.get(3),
            refusals: to_u32(row.get(4)),
            device_list,
        });
    }
    Ok(out)
}

pub async fn begin_txn(c: &mut Object, fence: &Fence, txn: &InFlightTxn) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, &txn.destination, fence).await?;
    record_txn(
        &tx,
        &txn.destination,
        &txn.txn_id,
        &txn.seqs,
        (&txn.body, None),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Inserts the in-flight record (and its journal row): `stored` is the
/// body, or the envelope and the offset of the EDUs (`RecordedTxn::stored`).
async fn record_txn(
    tx: &Transaction<'_>,
    destination: &str,
    txn_id: &str,
    seqs: &[i64],
    stored: (&str, Option<i64>),
) -> Result<(), Fail> {
    // The primary key on destination makes a second in-flight txn fail.
    let stmt = tx.prepare_cached(&trace::begin_txn_sql()).await?;
    tx.execute(
        &stmt,
        &[
            &destination,
            &txn_id,
            &seqs,
            &stored.0,
            &crate::clock::now_ms(),
            &stored.1,
        ],
    )
    .await?;
    Ok(())
}

/// `Store::advance` as one transaction: the fence check, the ack, the peek
/// and the new record. Returns the new record (its body put together by the
/// caller) and how many device-list rows the acknowledged transaction
/// carried.
pub async fn advance(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    acked: Option<(&str, TimestampMs)>,
    next: &NextTxn,
) -> Result<(Option<RecordedTxn>, u64), Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    let mut sent = 0;
    if let Some((txn_id, now_ms)) = acked {
        sent = ack_in(&tx, destination, txn_id, now_ms).await?.unwrap_or(0);
    }
    let edus = peek_outbox(&tx, destination, next.max_edus, next.max_bytes).await?;
    let txn = if edus.is_empty() {
        None
    } else {
        let txn = next.draft(destination, edus);
        record_txn(&tx, destination, &txn.txn_id, &txn.seqs, txn.stored()).await?;
        Some(txn)
    };
    tx.commit().await?;
    Ok((txn, sent))
}

/// Returns how many device-list rows the acknowledged transaction carried
/// (0 for a second ack).
pub async fn ack_txn(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    txn_id: &str,
    now_ms: TimestampMs,
) -> Result<u64, Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    match ack_in(&tx, destination, txn_id, now_ms).await? {
        Some(sent) => {
            tx.commit().await?;
            Ok(sent)
        }
        None => {
            tx.rollback().await?;
            Ok(0)
        }
    }
}

/// The ack inside the caller's transaction: `None` if `txn_id` is not the
/// recorded transaction (a second ack), which changes nothing.
async fn ack_in(
    tx: &Transaction<'_>,
    destination: &str,
    txn_id: &str,
    now_ms: TimestampMs,
) -> Result<Option<u64>, Fail> {
    let take = tx.prepare_cached(&trace::take_in_flight("ok")).await?;
    let Some(row) = tx
        .query_opt(&take, &[&destination, &txn_id, &now_ms])
        .await?
    else {
        return Ok(None);
    };
    let seqs: Vec<i64> = row.get(0);
    let device_list_rows = record_acked(tx, destination, &seqs).await?;
    let delete = tx
        .prepare_cached("DELETE FROM outbox WHERE destination = $1 AND seq = ANY($2)")
        .await?;
    tx.execute(&delete, &[&destination, &seqs]).await?;
    // Success resets the retry state.
    let upsert = tx.prepare_cached(UPSERT_RETRY_STATE).await?;
    let (failures, retry_after, error) = (0i32, 0i64, None::<String>);
    tx.execute(
        &upsert,
        &[
            &destination,
            &failures,
            &retry_after,
            &Some(now_ms),
            &error,
            &now_ms,
        ],
    )
    .await?;
    Ok(Some(device_list_rows))
}

pub async fn refuse_txn(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    txn_id: &str,
) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    let take = tx.prepare_cached(&trace::take_in_flight("refused")).await?;
    let now_ms = crate::clock::now_ms();
    let Some(row) = tx
        .query_opt(&take, &[&destination, &txn_id, &now_ms])
        .await?
    else {
        tx.rollback().await?;
        return Ok(());
    };
    let seqs: Vec<i64> = row.get(0);
    // Only a refusal of the EDU alone counts (`OutboxEdu::refusals`).
    if let [seq] = seqs.as_slice() {
        let bump = tx
            .prepare_cached(
                "UPDATE outbox SET refusals = refusals + 1 WHERE destination = $1 AND seq = $2",
            )
            .await?;
        tx.execute(&bump, &[&destination, seq]).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn retry_state(c: &Object, destination: &str) -> Result<RetryState, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT failures, retry_after_ts, last_success_ts, last_error
             FROM destinations WHERE destination = $1",
        )
        .await?;
    Ok(c.query_opt(&stmt, &[&destination])
        .await?
        .map(|r| RetryState {
            failures: to_u32(r.get(0)),
            retry_after_ms: r.get(1),
            last_success_ms: r.get(2),
            last_error: r.get(3),
        })
        .unwrap_or_default())
}

/// Writes a destination's retry state; `$6` stamps its last activity (see
/// `RETIRE_DESTINATIONS`). It also keeps `failing_since_ts`, the first
/// failure after the last success (for the dead-destination expiry,
/// `retention.rs`): a newer `last_success_ts` clears it, a failure
/// (`failures > 0`) sets it if unset, anything else (a backoff reset
/// because the peer talked to us) leaves it.
const UPSERT_RETRY_STATE: &str = "INSERT INTO destinations
         (destination, failures, retry_after_ts, last_success_ts, last_error, updated_ts,
          failing_since_ts)
     VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $2::int4 > 0 THEN $6::int8 END)
     ON CONFLICT (destination) DO UPDATE SET
         failures = excluded.failures,
         retry_after_ts = excluded.retry_after_ts,
         last_success_ts = excluded.last_success_ts,
         last_error = excluded.last_error,
         updated_ts = greatest(destinations.updated_ts, excluded.updated_ts),
         failing_since_ts = CASE
             WHEN excluded.last_success_ts > coalesce(destinations.last_success_ts, -1) THEN NULL
             WHEN excluded.failures > 0
                 THEN coalesce(destinations.failing_since_ts, excluded.updated_ts)
             ELSE destinations.failing_since_ts
         END";

pub async fn set_retry_state(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    state: &RetryState,
    now_ms: TimestampMs,
) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    // With its `attempt` row, if a failure ends one (`trace.rs`).
    let stmt = tx
        .prepare_cached(&trace::set_retry_state_sql(UPSERT_RETRY_STATE))
        .await?;
    tx.execute(
        &stmt,
        &[
            &destination,
            &to_i32(state.failures),
            &state.retry_after_ms,
            &state.last_success_ms,
            &state.last_error,
            &now_ms,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn destinations_with_pending(c: &Object) -> Result<Vec<String>, Fail> {
    let stmt = c
        .prepare_cached(&format!("{PENDING_DESTINATIONS} ORDER BY 1"))
        .await?;
    Ok(c.query(&stmt, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub async fn destination_statuses(c: &Object) -> Result<Vec<DestinationStatus>, Fail> {
    let stmt = c
        .prepare_cached(
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
             SELECT n.destination, coalesce(q.edus, 0)::bigint, coalesce(q.messages, 0)::bigint,
                    q.oldest, coalesce(d.failures, 0), coalesce(d.retry_after_ts, 0),
                    d.last_success_ts, d.last_error, coalesce(h.n, 0)::bigint,
                    d.refusing_since_ts
             FROM names n
             LEFT JOIN queued q ON q.destination = n.destination
             LEFT JOIN held h ON h.destination = n.destination
             LEFT JOIN destinations d ON d.destination = n.destination
             ORDER BY n.destination",
        )
        .await?;
    Ok(c.query(&stmt, &[])
        .await?
        .iter()
        .map(|r| DestinationStatus {
            destination: r.get(0),
            pending_edus: r.get::<_, i64>(1).max(0) as u64,
            pending_messages: r.get::<_, i64>(2).max(0) as u64,
            oldest_queued_ts: r.get(3),
            retry: RetryState {
                failures: to_u32(r.get(4)),
                retry_after_ms: r.get(5),
                last_success_ms: r.get(6),
                last_error: r.get(7),
            },
            quarantined: r.get::<_, i64>(8).max(0) as u64,
            refusing_since_ms: r.get(9),
        })
        .collect())
}

// --- housekeeping -------------------------------------------------------------------

pub async fn prune(
    c: &Object,
    now_ms: TimestampMs,
    retention: Retention,
    batch: u32,
    orphan_cursor: &AtomicI64,
) -> Result<PruneReport, Fail> {
    let limit = i64::from(batch);
    async fn expire(c: &Object, sql: &str, cutoff: i64, limit: i64) -> Result<u64, Fail> {
        let stmt = c.prepare_cached(sql).await?;
        Ok(c.execute(&stmt, &[&cutoff, &limit]).await?)
    }
    Ok(PruneReport {
        client_txns: expire(
            c,
            "DELETE FROM client_txns WHERE (user_id, device_id, event_type, txn_id) IN
                 (SELECT user_id, device_id, event_type, txn_id FROM client_txns
                  WHERE received_ts <= $1 LIMIT $2)",
            now_ms.saturating_sub(retention.client_txn_ms),
            limit,
        )
        .await?,
        inbound_txns: expire(
            c,
            "DELETE FROM inbound_txns WHERE (origin, txn_id) IN
                 (SELECT origin, txn_id FROM inbound_txns WHERE received_ts <= $1 LIMIT $2)",
            now_ms.saturating_sub(retention.inbound_txn_ms),
            limit,
        )
        .await?,
        inbound_message_ids: expire(
            c,
            "DELETE FROM inbound_message_ids WHERE (origin, message_id) IN
                 (SELECT origin, message_id FROM inbound_message_ids
                  WHERE received_ts <= $1 LIMIT $2)",
            now_ms.saturating_sub(retention.inbound_message_id_ms),
            limit,
        )
        .await?,
        expired_server_keys: expire(
            c,
            "DELETE FROM server_keys WHERE (server_name, key_id) IN
                 (SELECT server_name, key_id FROM server_keys WHERE valid_until_ts < $1 LIMIT $2)",
            now_ms,
            limit,
        )
        .await?,
        orphan_inbox_rows: prune_orphans(c, orphan_cursor, limit).await?,
        retired_destinations: expire(
            c,
            RETIRE_DESTINATIONS,
            now_ms.saturating_sub(retention.destination_ms),
            limit,
        )
        .await?,
        claimed_one_time_keys: expire(
            c,
            "DELETE FROM claimed_one_time_keys
             WHERE (user_id, device_id, algorithm, key_id) IN
                 (SELECT user_id, device_id, algorithm, key_id FROM claimed_one_time_keys
                  WHERE claimed_ts <= $1 LIMIT $2)",
            now_ms.saturating_sub(retention.claimed_key_ms),
            limit,
        )
        .await?,
        expired_device_list_interest: expire(
            c,
            "DELETE FROM device_list_interest WHERE (user_id, destination) IN
                 (SELECT user_id, destination FROM device_list_interest
                  WHERE expires_ts < $1 LIMIT $2)
               AND expires_ts < $1",
            now_ms,
            limit,
        )
        .await?,
        trace_events: expire(
            c,
            super::trace::PRUNE,
            now_ms.saturating_sub(retention.trace_ms),
            limit,
        )
        .await?,
    })
}

/// Deletes the retry state of destinations with nothing queued, in flight or
/// quarantined whose last activity (update, success, or the end of a
/// backoff) is at or before the cutoff `$1`, at most `$2` of them. The
/// activity test is repeated on the row itself, so a row updated while the
/// statement waited for its lock is kept (READ COMMITTED rechecks it).
const RETIRE_DESTINATIONS: &str = "
    DELETE FROM destinations WHERE destination IN
        (SELECT d.destination FROM destinations d
         WHERE greatest(d.updated_ts, d.retry_after_ts, coalesce(d.last_success_ts, 0)) <= $1
           AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.destination = d.destination)
           AND NOT EXISTS (SELECT 1 FROM outbox_txn t WHERE t.destination = d.destination)
           AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.destination = d.destination)
         LIMIT $2)
      AND greatest(updated_ts, retry_after_ts, coalesce(last_success_ts, 0)) <= $1";

/// Inbox rows examined per pruning pass when looking for orphans.
const ORPHAN_SCAN_ROWS: i64 = 10_000;

/// Deletes up to `limit` inbox rows whose device no longer exists, looking
/// at most at `ORPHAN_SCAN_ROWS` rows after `cursor` (a stream id kept by the
/// store between passes). The cursor moves past the window only when the
/// window was cleaned completely, and wraps to 0 at the end of the inbox.
async fn prune_orphans(c: &Object, cursor: &AtomicI64, limit: i64) -> Result<u64, Fail> {
    let from = cursor.load(Ordering::Relaxed);
    let window = c
        .prepare_cached(
            "SELECT count(*), max(stream_id) FROM
                 (SELECT stream_id FROM device_inbox WHERE stream_id > $1
                  ORDER BY stream_id LIMIT $2) w",
        )
        .await?;
    let row = c.query_one(&window, &[&from, &ORPHAN_SCAN_ROWS]).await?;
    let scanned: i64 = row.get(0);
    let window_end: Option<i64> = row.get(1);
    let delete = c
        .prepare_cached(
            "DELETE FROM device_inbox WHERE stream_id IN
                 (SELECT i.stream_id FROM device_inbox i
                  WHERE i.stream_id > $1 AND i.stream_id <= $2
                    AND NOT EXISTS (SELECT 1 FROM devices d
                                    WHERE d.user_id = i.user_id
                                      AND d.device_id = i.device_id)
                  LIMIT $3)",
        )
        .await?;
    let deleted = c
        .execute(&delete, &[&from, &window_end.unwrap_or(from), &limit])
        .await?;
    let next = match window_end {
        Some(_) if deleted as i64 >= limit => from,
        Some(end) if scanned == ORPHAN_SCAN_ROWS => end,
        _ => 0,
    };
    cursor.store(next, Ordering::Relaxed);
    Ok(deleted)
}
