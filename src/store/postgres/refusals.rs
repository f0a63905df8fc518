//! SQL of the PostgreSQL backend for a destination's refusal history
//! (`store::RefusalState`, columns of `destinations`, migration 0008), the
//! solo refusal count of a queued EDU, quarantine itself (moving an EDU
//! there, listing and releasing quarantined EDUs), and the two ways
//! quarantined EDUs go back to the queue: under their own seq, and in bulk
//! at the end. Each
//! write function is one transaction (or one statement); the two a
//! destination task makes (`restore_quarantined`, `set_refusal_state`)
//! check its lease fence first, in that transaction.

use deadpool_postgres::{Object, Transaction};

use super::Fail;
use super::lease::check_fence;
use super::trace;
use crate::store::{Fence, QuarantinedEdu, RefusalState, TimestampMs};

fn to_u32(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub async fn edu_refusals(c: &Object, destination: &str, seq: i64) -> Result<Option<u32>, Fail> {
    let stmt = c
        .prepare_cached("SELECT refusals FROM outbox WHERE destination = $1 AND seq = $2")
        .await?;
    Ok(c.query_opt(&stmt, &[&destination, &seq])
        .await?
        .map(|r| to_u32(r.get(0))))
}

pub async fn restore_quarantined(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    seq: i64,
    refusals: u32,
) -> Result<bool, Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    // One statement. The seq is kept (an identity column hands out only
    // larger values), so the row goes back to its old place in the queue.
    let stmt = tx
        .prepare_cached(
            "WITH moved AS (
                 DELETE FROM quarantine WHERE destination = $1 AND seq = $2
                 RETURNING destination, seq, edu_json, message_count, queued_ts,
                           dl_user, dl_device, dl_stream
             ), restored AS (
                 INSERT INTO outbox (seq, destination, edu_json, message_count, queued_ts,
                                     refusals, dl_user, dl_device, dl_stream)
                 OVERRIDING SYSTEM VALUE
                 SELECT seq, destination, edu_json, message_count, queued_ts, $3,
                        dl_user, dl_device, dl_stream
                 FROM moved
                 ON CONFLICT (seq) DO NOTHING
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM moved)::bigint",
        )
        .await?;
    let row = tx
        .query_one(&stmt, &[&destination, &seq, &to_i32(refusals)])
        .await?;
    tx.commit().await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Queues a row taken from quarantine (`seq, edu_json, message_count,
/// queued_ts, dl_user, dl_device, dl_stream`) again under a fresh seq, at
/// the end of the destination's queue, its refusals at 0. A device-list row
/// keeps its meta, so it is finished when sent.
async fn append_to_queue(
    tx: &Transaction<'_>,
    destination: &str,
    row: &tokio_postgres::Row,
) -> Result<(), Fail> {
    let (edu_json, count, queued_ts): (String, i32, i64) = (row.get(1), row.get(2), row.get(3));
    let (dl_user, dl_device, dl_stream): (Option<String>, Option<String>, Option<i64>) =
        (row.get(4), row.get(5), row.get(6));
    let insert = tx
        .prepare_cached(
            "INSERT INTO outbox (destination, edu_json, message_count, queued_ts, refusals,
                                 dl_user, dl_device, dl_stream)
             VALUES ($1, $2, $3, $4, 0, $5, $6, $7)",
        )
        .await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
        &destination,
        &edu_json,
        &count,
        &queued_ts,
        &dl_user,
        &dl_device,
        &dl_stream,
    ];
    tx.execute(&insert, &params).await?;
    Ok(())
}

pub async fn requeue_quarantined(c: &mut Object, destination: &str) -> Result<u64, Fail> {
    let tx = c.transaction().await?;
    // Fresh seqs, assigned in the old seqs' order: the end of the queue, in
    // the original order.
    let take = tx
        .prepare_cached(
            "DELETE FROM quarantine WHERE destination = $1
             RETURNING seq, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream",
        )
        .await?;
    let mut rows = tx.query(&take, &[&destination]).await?;
    rows.sort_by_key(|r| r.get::<_, i64>(0));
    for row in &rows {
        append_to_queue(&tx, destination, row).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

pub async fn refusal_state(c: &Object, destination: &str) -> Result<RefusalState, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT split_limit, split_upto, split_accepted, refusing_since_ts, probation_seqs
             FROM destinations WHERE destination = $1",
        )
        .await?;
    Ok(c.query_opt(&stmt, &[&destination])
        .await?
        .map(|r| RefusalState {
            split_limit: r.get::<_, Option<i32>>(0).map(to_u32),
            split_upto: r.get(1),
            split_accepted: r.get(2),
            refusing_since_ms: r.get(3),
            probation_seqs: r.get(4),
        })
        .unwrap_or_default())
}

pub async fn set_refusal_state(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    state: &RefusalState,
    now_ms: TimestampMs,
) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO destinations
                 (destination, split_limit, split_upto, split_accepted, refusing_since_ts,
                  probation_seqs, updated_ts)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (destination) DO UPDATE SET
                 split_limit = excluded.split_limit,
                 split_upto = excluded.split_upto,
                 split_accepted = excluded.split_accepted,
                 refusing_since_ts = excluded.refusing_since_ts,
                 probation_seqs = excluded.probation_seqs,
                 updated_ts = greatest(destinations.updated_ts, excluded.updated_ts)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &destination,
            &state.split_limit.map(to_i32),
            &state.split_upto,
            &state.split_accepted,
            &state.refusing_since_ms,
            &state.probation_seqs,
            &now_ms,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn quarantine_edu(
    c: &mut Object,
    fence: &Fence,
    destination: &str,
    seq: i64,
    reason: &str,
    now_ms: TimestampMs,
) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    check_fence(&tx, destination, fence).await?;
    // One statement: the move and its journal row.
    let stmt = tx
        .prepare_cached(&format!(
            "WITH moved AS (
                 DELETE FROM outbox WHERE destination = $1 AND seq = $2
                 RETURNING destination, seq, edu_json, message_count, queued_ts,
                           dl_user, dl_device, dl_stream
             ),
             traced AS (
                 INSERT INTO trace_events (ts, kind, message_id, peer, first_id, detail)
                 SELECT $4::int8, 'quarantined',
                        substring(edu_json from '^\\{{\"content\":\\{{\"message_id\":\"([^\"\\\\]*)\"'),
                        destination, seq,
                        json_build_object('where', destination, 'reason', $3::text)::text
                 FROM moved WHERE {enabled}
             )
             INSERT INTO quarantine
                 (destination, seq, edu_json, message_count, queued_ts, reason, quarantined_ts,
                  dl_user, dl_device, dl_stream)
             SELECT destination, seq, edu_json, message_count, queued_ts, $3, $4,
                    dl_user, dl_device, dl_stream
             FROM moved
             ON CONFLICT (destination, seq) DO UPDATE SET
                 edu_json = excluded.edu_json, message_count = excluded.message_count,
                 queued_ts = excluded.queued_ts, reason = excluded.reason,
                 quarantined_ts = excluded.quarantined_ts, dl_user = excluded.dl_user,
                 dl_device = excluded.dl_device, dl_stream = excluded.dl_stream",
            enabled = trace::ENABLED,
        ))
        .await?;
    tx.execute(&stmt, &[&destination, &seq, &reason, &now_ms])
        .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn list_quarantined(
    c: &Object,
    destination: Option<&str>,
) -> Result<Vec<QuarantinedEdu>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT destination, seq, edu_json, reason, quarantined_ts FROM quarantine
             WHERE $1::text IS NULL OR destination = $1 ORDER BY destination, seq",
        )
        .await?;
    Ok(c.query(&stmt, &[&destination])
        .await?
        .iter()
        .map(|r| QuarantinedEdu {
            destination: r.get(0),
            seq: r.get(1),
            edu_json: r.get(2),
            reason: r.get(3),
            quarantined_ts: r.get(4),
        })
        .collect())
}

pub async fn release_quarantined(
    c: &mut Object,
    destination: &str,
    seq: i64,
    requeue: bool,
) -> Result<bool, Fail> {
    let tx = c.transaction().await?;
    let take = tx
        .prepare_cached(
            "DELETE FROM quarantine WHERE destination = $1 AND seq = $2
             RETURNING seq, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream",
        )
        .await?;
    let Some(row) = tx.query_opt(&take, &[&destination, &seq]).await? else {
        tx.rollback().await?;
        return Ok(false);
    };
    if requeue {
        // A fresh seq puts it at the end of the queue; refusals start over.
        append_to_queue(&tx, destination, &row).await?;
    }
    tx.commit().await?;
    Ok(true)
}

// --- destinations -----------------------------------------------------------------
