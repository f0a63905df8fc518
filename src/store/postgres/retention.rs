//! SQL of the PostgreSQL backend's retention (`store::retention`): inbox
//! rows past their event type's TTL, rows beyond a device's inbox cap, and
//! the outbox rows of dead destinations, each kind at most one batch per
//! call, in one transaction; and the persisted totals. Every expired row is
//! deleted and counted in one place, `retire_rows`, which keeps only the
//! rows its own `DELETE … RETURNING` removed, so two workers pruning at
//! once never count a row twice.

use std::collections::HashSet;

use deadpool_postgres::{Object, Transaction};
use tokio_postgres::types::ToSql;

use super::Fail;
use crate::store::TimestampMs;
use crate::store::retention::{
    EventTypePattern, ExpiredInboxMessage, ExpiredMessage, ExpiredOutboxEdu, ExpiryPolicy,
    ExpiryReason, ExpiryTotal, OutboxHold, outbox_edu_id, totals_of,
};

/// One batch of each rule of `policy` as of `now_ms`, in one transaction;
/// returns what it deleted.
pub async fn expire(
    c: &mut Object,
    now_ms: TimestampMs,
    policy: &ExpiryPolicy,
    batch: u32,
) -> Result<Vec<ExpiredMessage>, Fail> {
    let batch = i64::from(batch.max(1));
    let tx = c.transaction().await?;
    let mut expired = Vec::new();
    let ttl = inbox_past_ttl(&tx, now_ms, policy, batch).await?;
    expired.extend(retire_rows(&tx, now_ms, ttl).await?);
    if let Some(cap) = policy.inbox_cap {
        let over = inbox_over_cap(&tx, cap, batch).await?;
        expired.extend(retire_rows(&tx, now_ms, over).await?);
    }
    if let Some(dead_ms) = policy.dead_destination_ms {
        let dead = dead_destination_rows(&tx, now_ms.saturating_sub(dead_ms), batch).await?;
        expired.extend(retire_rows(&tx, now_ms, dead).await?);
    }
    tx.commit().await?;
    Ok(expired)
}

/// The one place an expired row leaves the store: deletes each row named
/// in `expired`, adds the ones it deleted to `expiry_totals` and returns
/// them (a row another worker deleted meanwhile is left out).
async fn retire_rows(
    tx: &Transaction<'_>,
    now_ms: TimestampMs,
    expired: Vec<ExpiredMessage>,
) -> Result<Vec<ExpiredMessage>, Fail> {
    if expired.is_empty() {
        return Ok(expired);
    }
    let mut inbox: Vec<i64> = Vec::new();
    let mut outbox: Vec<i64> = Vec::new();
    let mut quarantine: Vec<(String, i64)> = Vec::new();
    for row in &expired {
        match row {
            ExpiredMessage::Inbox(m) => inbox.push(m.stream_id),
            ExpiredMessage::Outbox(e) if e.held == OutboxHold::Quarantined => {
                quarantine.push((e.destination.clone(), e.seq))
            }
            ExpiredMessage::Outbox(e) => outbox.push(e.seq),
        }
    }
    let mut gone_inbox: HashSet<i64> = HashSet::new();
    if !inbox.is_empty() {
        let stmt = tx
            .prepare_cached(
                "DELETE FROM device_inbox WHERE stream_id = ANY($1) RETURNING stream_id",
            )
            .await?;
        for row in tx.query(&stmt, &[&inbox]).await? {
            gone_inbox.insert(row.get(0));
        }
    }
    let mut gone_outbox: HashSet<i64> = HashSet::new();
    if !outbox.is_empty() {
        let stmt = tx
            .prepare_cached("DELETE FROM outbox WHERE seq = ANY($1) RETURNING seq")
            .await?;
        for row in tx.query(&stmt, &[&outbox]).await? {
            gone_outbox.insert(row.get(0));
        }
    }
    let mut gone_quarantine: HashSet<(String, i64)> = HashSet::new();
    if !quarantine.is_empty() {
        let (destinations, seqs): (Vec<String>, Vec<i64>) = quarantine.into_iter().unzip();
        let stmt = tx
            .prepare_cached(
                "DELETE FROM quarantine q USING unnest($1::text[], $2::int8[]) AS k (d, s)
                 WHERE q.destination = k.d AND q.seq = k.s
                 RETURNING q.destination, q.seq",
            )
            .await?;
        for row in tx.query(&stmt, &[&destinations, &seqs]).await? {
            gone_quarantine.insert((row.get(0), row.get(1)));
        }
    }
    let deleted: Vec<ExpiredMessage> = expired
        .into_iter()
        .filter(|row| match row {
            ExpiredMessage::Inbox(m) => gone_inbox.contains(&m.stream_id),
            ExpiredMessage::Outbox(e) if e.held == OutboxHold::Quarantined => {
                gone_quarantine.contains(&(e.destination.clone(), e.seq))
            }
            ExpiredMessage::Outbox(e) => gone_outbox.contains(&e.seq),
        })
        .collect();
    // In the same transaction: `courier trace` shows why each went.
    for row in &deleted {
        if let Some((message_id, place, reason)) = row.trace_entry() {
            super::trace::record_expired(tx, now_ms, message_id, &place, reason).await?;
        }
    }
    let add = tx
        .prepare_cached(
            "INSERT INTO expiry_totals (kind, reason, count) VALUES ($1, $2, $3)
             ON CONFLICT (kind, reason)
             DO UPDATE SET count = expiry_totals.count + excluded.count",
        )
        .await?;
    for total in totals_of(&deleted) {
        let count = i64::try_from(total.count).unwrap_or(i64::MAX);
        tx.execute(
            &add,
            &[&total.kind.as_str(), &total.reason.as_str(), &count],
        )
        .await?;
    }
    Ok(deleted)
}

/// `event_type` matches `pattern`, binding its text as the next parameter.
fn match_sql(pattern: &EventTypePattern, texts: &mut Vec<String>, first: usize) -> String {
    match pattern {
        EventTypePattern::Exact(t) => {
            texts.push(t.clone());
            format!("event_type = ${}", first + texts.len())
        }
        EventTypePattern::Prefix(p) if p.is_empty() => "true".to_owned(),
        EventTypePattern::Prefix(p) => {
            texts.push(p.clone());
            let n = first + texts.len();
            format!("left(event_type, length(${n}::text)) = ${n}::text")
        }
    }
}

fn inbox_row(row: &tokio_postgres::Row, reason: ExpiryReason) -> ExpiredMessage {
    ExpiredMessage::Inbox(ExpiredInboxMessage {
        reason,
        stream_id: row.get(0),
        message_id: row.get(1),
        user_id: row.get(2),
        device_id: row.get(3),
        sender: row.get(4),
        event_type: row.get(5),
        received_ts: row.get(6),
    })
}

const INBOX_COLUMNS: &str =
    "stream_id, message_id, user_id, device_id, sender, event_type, received_ts";

/// Inbox rows older than their type's TTL (the most specific rule's), at
/// most `batch` over all rules, oldest first per rule.
async fn inbox_past_ttl(
    tx: &Transaction<'_>,
    now_ms: TimestampMs,
    policy: &ExpiryPolicy,
    batch: i64,
) -> Result<Vec<ExpiredMessage>, Fail> {
    let mut out = Vec::new();
    for plan in policy.ttl_plans() {
        let left = batch - out.len() as i64;
        if left <= 0 {
            break;
        }
        let cutoff = now_ms.saturating_sub(plan.rule.ttl_ms);
        let mut texts: Vec<String> = Vec::new();
        let mut sql = format!(
            "SELECT {INBOX_COLUMNS} FROM device_inbox WHERE received_ts <= $1 AND {}",
            match_sql(&plan.rule.pattern, &mut texts, 2)
        );
        for unless in &plan.unless {
            let clause = match_sql(unless, &mut texts, 2);
            sql.push_str(&format!(" AND NOT ({clause})"));
        }
        sql.push_str(" ORDER BY stream_id LIMIT $2");
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&cutoff, &left];
        params.extend(texts.iter().map(|t| t as &(dyn ToSql + Sync)));
        let stmt = tx.prepare_cached(&sql).await?;
        for row in tx.query(&stmt, &params).await? {
            out.push(inbox_row(&row, ExpiryReason::Ttl));
        }
    }
    Ok(out)
}

/// The oldest rows of devices holding more than `cap`, beyond the cap, at
/// most `batch` in all.
async fn inbox_over_cap(
    tx: &Transaction<'_>,
    cap: u32,
    batch: i64,
) -> Result<Vec<ExpiredMessage>, Fail> {
    let cap = i64::from(cap);
    let over = tx
        .prepare_cached(
            "SELECT user_id, device_id, count(*) FROM device_inbox
             GROUP BY user_id, device_id HAVING count(*) > $1 LIMIT $2",
        )
        .await?;
    let oldest = tx
        .prepare_cached(&format!(
            "SELECT {INBOX_COLUMNS} FROM device_inbox WHERE user_id = $1 AND device_id = $2
             ORDER BY stream_id LIMIT $3"
        ))
        .await?;
    let mut out = Vec::new();
    for device in tx.query(&over, &[&cap, &batch]).await? {
        let left = batch - out.len() as i64;
        if left <= 0 {
            break;
        }
        let (user_id, device_id, count): (String, String, i64) =
            (device.get(0), device.get(1), device.get(2));
        let excess = (count - cap).min(left);
        for row in tx.query(&oldest, &[&user_id, &device_id, &excess]).await? {
            out.push(inbox_row(&row, ExpiryReason::InboxCap));
        }
    }
    Ok(out)
}

const OUTBOX_COLUMNS: &str =
    "seq, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream";

fn outbox_row(
    row: &tokio_postgres::Row,
    destination: &str,
    held: OutboxHold,
    failing_since_ts: TimestampMs,
) -> ExpiredMessage {
    let edu_json: String = row.get(1);
    let (edu_type, id) = outbox_edu_id(&edu_json, row.get(4), row.get(5), row.get(6));
    ExpiredMessage::Outbox(ExpiredOutboxEdu {
        destination: destination.to_owned(),
        seq: row.get(0),
        held,
        edu_type,
        id,
        message_count: u32::try_from(row.get::<_, i32>(2)).unwrap_or(0),
        queued_ts: row.get(3),
        failing_since_ts,
    })
}

/// Rows of destinations failing since at or before `cutoff`: queued and
/// in-flight outbox rows first, then quarantined ones, at most `batch`.
/// A destination's in-flight record goes with the first of its rows, or
/// once none of the queue is left.
async fn dead_destination_rows(
    tx: &Transaction<'_>,
    cutoff: TimestampMs,
    batch: i64,
) -> Result<Vec<ExpiredMessage>, Fail> {
    let dead = tx
        .prepare_cached(
            "SELECT d.destination, d.failing_since_ts FROM destinations d
             WHERE d.failing_since_ts IS NOT NULL AND d.failing_since_ts <= $1
               AND (EXISTS (SELECT 1 FROM outbox o WHERE o.destination = d.destination)
                    OR EXISTS (SELECT 1 FROM quarantine q WHERE q.destination = d.destination)
                    OR EXISTS (SELECT 1 FROM outbox_txn t WHERE t.destination = d.destination))
             ORDER BY d.failing_since_ts LIMIT $2",
        )
        .await?;
    let in_flight = tx
        .prepare_cached("SELECT seqs FROM outbox_txn WHERE destination = $1")
        .await?;
    let queued = tx
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE destination = $1 ORDER BY seq LIMIT $2"
        ))
        .await?;
    let held = tx
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM quarantine WHERE destination = $1
             ORDER BY seq LIMIT $2"
        ))
        .await?;
    let drop_txn = tx
        .prepare_cached("DELETE FROM outbox_txn WHERE destination = $1")
        .await?;
    let mut out = Vec::new();
    for row in tx.query(&dead, &[&cutoff, &batch]).await? {
        let left = batch - out.len() as i64;
        if left <= 0 {
            break;
        }
        let (destination, failing_since_ts): (String, i64) = (row.get(0), row.get(1));
        let seqs: HashSet<i64> = tx
            .query_opt(&in_flight, &[&destination])
            .await?
            .map(|r| r.get::<_, Vec<i64>>(0))
            .unwrap_or_default()
            .into_iter()
            .collect();
        let rows = tx.query(&queued, &[&destination, &left]).await?;
        let fetched = rows.len() as i64;
        let mut record_hit = false;
        for row in &rows {
            let seq: i64 = row.get(0);
            let hold = if seqs.contains(&seq) {
                record_hit = true;
                OutboxHold::InFlight
            } else {
                OutboxHold::Queued
            };
            out.push(outbox_row(row, &destination, hold, failing_since_ts));
        }
        let left = left - fetched;
        if record_hit && left <= 0 {
            // Some of its rows go in this batch: so does the record (one
            // that names its EDUs could not be sent again without them).
            tx.execute(&drop_txn, &[&destination]).await?;
        }
        if left > 0 {
            for row in tx.query(&held, &[&destination, &left]).await? {
                out.push(outbox_row(
                    &row,
                    &destination,
                    OutboxHold::Quarantined,
                    failing_since_ts,
                ));
            }
            // Short of the limit: every queued row of the destination is
            // in this batch, so its in-flight record names nothing left.
            tx.execute(&drop_txn, &[&destination]).await?;
        }
    }
    Ok(out)
}

pub async fn expiry_totals(c: &Object) -> Result<Vec<ExpiryTotal>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT reason, count FROM expiry_totals WHERE count > 0 ORDER BY kind, reason",
        )
        .await?;
    let mut out = Vec::new();
    for row in c.query(&stmt, &[]).await? {
        let reason: String = row.get(0);
        let Some(reason) = ExpiryReason::parse(&reason) else {
            return Err(Fail::Store(crate::store::StoreError::Corrupt(format!(
                "expiry_totals: unknown reason {reason:?}"
            ))));
        };
        out.push(ExpiryTotal {
            kind: reason.kind(),
            reason,
            count: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        });
    }
    Ok(out)
}
