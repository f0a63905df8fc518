//! SQL of the SQLite backend's retention (`store::retention`): inbox rows
//! past their event type's TTL, rows beyond a device's inbox cap, and the
//! outbox rows of dead destinations, each kind at most one batch per call,
//! in the one write job (transaction) `expire` runs in; and the persisted
//! totals. Every expired row is deleted and counted in one place,
//! `retire_rows`.

use std::collections::HashSet;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params_from_iter};

use crate::store::retention::{
    EventTypePattern, ExpiredInboxMessage, ExpiredMessage, ExpiredOutboxEdu, ExpiryPolicy,
    ExpiryReason, ExpiryTotal, OutboxHold, outbox_edu_id, totals_of,
};
use crate::store::{StoreError, TimestampMs};

/// One batch of each rule of `policy` as of `now_ms`; returns what it
/// deleted.
pub fn expire(
    conn: &Connection,
    now_ms: TimestampMs,
    policy: &ExpiryPolicy,
    batch: u32,
) -> Result<Vec<ExpiredMessage>, StoreError> {
    let batch = u64::from(batch.max(1));
    let mut expired = Vec::new();
    let ttl = inbox_past_ttl(conn, now_ms, policy, batch)?;
    retire_rows(conn, now_ms, &ttl)?;
    expired.extend(ttl);
    if let Some(cap) = policy.inbox_cap {
        let over = inbox_over_cap(conn, cap, batch)?;
        retire_rows(conn, now_ms, &over)?;
        expired.extend(over);
    }
    if let Some(dead_ms) = policy.dead_destination_ms {
        let dead = dead_destination_rows(conn, now_ms.saturating_sub(dead_ms), batch)?;
        retire_rows(conn, now_ms, &dead)?;
        expired.extend(dead);
    }
    Ok(expired)
}

/// The one place an expired row leaves the store: deletes each row named
/// in `expired` and adds them to `expiry_totals`, in the caller's
/// transaction.
fn retire_rows(
    conn: &Connection,
    now_ms: TimestampMs,
    expired: &[ExpiredMessage],
) -> Result<(), StoreError> {
    let mut inbox = conn.prepare_cached("DELETE FROM device_inbox WHERE stream_id = ?1")?;
    let mut outbox =
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND seq = ?2")?;
    let mut quarantine =
        conn.prepare_cached("DELETE FROM quarantine WHERE destination = ?1 AND seq = ?2")?;
    for row in expired {
        match row {
            ExpiredMessage::Inbox(m) => inbox.execute([m.stream_id])?,
            ExpiredMessage::Outbox(e) if e.held == OutboxHold::Quarantined => {
                quarantine.execute((&e.destination, e.seq))?
            }
            ExpiredMessage::Outbox(e) => outbox.execute((&e.destination, e.seq))?,
        };
        // In the same transaction: `courier trace` shows why it went.
        if let Some((message_id, place, reason)) = row.trace_entry() {
            super::trace::record_expired(conn, now_ms, message_id, &place, reason)?;
        }
    }
    let mut add = conn.prepare_cached(
        "INSERT INTO expiry_totals (kind, reason, count) VALUES (?1, ?2, ?3)
         ON CONFLICT (kind, reason) DO UPDATE SET count = count + excluded.count",
    )?;
    for total in totals_of(expired) {
        add.execute((
            total.kind.as_str(),
            total.reason.as_str(),
            i64::try_from(total.count).unwrap_or(i64::MAX),
        ))?;
    }
    Ok(())
}

/// `event_type` matches `pattern`, binding its text as parameter `n`.
fn match_sql(pattern: &EventTypePattern, n: usize, params: &mut Vec<SqlValue>) -> String {
    match pattern {
        EventTypePattern::Exact(t) => {
            params.push(SqlValue::Text(t.clone()));
            format!("event_type = ?{n}")
        }
        EventTypePattern::Prefix(p) if p.is_empty() => "1".to_owned(),
        EventTypePattern::Prefix(p) => {
            params.push(SqlValue::Text(p.clone()));
            format!("substr(event_type, 1, length(?{n})) = ?{n}")
        }
    }
}

/// Inbox rows older than their type's TTL (the most specific rule's), at
/// most `batch` over all rules, oldest first per rule.
fn inbox_past_ttl(
    conn: &Connection,
    now_ms: TimestampMs,
    policy: &ExpiryPolicy,
    batch: u64,
) -> Result<Vec<ExpiredMessage>, StoreError> {
    let mut out = Vec::new();
    for plan in policy.ttl_plans() {
        let left = batch - out.len() as u64;
        if left == 0 {
            break;
        }
        let mut params = vec![
            SqlValue::Integer(now_ms.saturating_sub(plan.rule.ttl_ms)),
            SqlValue::Integer(i64::try_from(left).unwrap_or(i64::MAX)),
        ];
        let mut sql = String::from(
            "SELECT stream_id, message_id, user_id, device_id, sender, event_type, received_ts
             FROM device_inbox WHERE received_ts <= ?1 AND ",
        );
        sql.push_str(&match_sql(
            &plan.rule.pattern,
            params.len() + 1,
            &mut params,
        ));
        for unless in &plan.unless {
            let n = params.len() + 1;
            sql.push_str(&format!(" AND NOT ({})", match_sql(unless, n, &mut params)));
        }
        sql.push_str(" ORDER BY stream_id LIMIT ?2");
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(params), |row| {
            inbox_row(row, ExpiryReason::Ttl)
        })?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

fn inbox_row(row: &rusqlite::Row<'_>, reason: ExpiryReason) -> rusqlite::Result<ExpiredMessage> {
    Ok(ExpiredMessage::Inbox(ExpiredInboxMessage {
        reason,
        stream_id: row.get(0)?,
        message_id: row.get(1)?,
        user_id: row.get(2)?,
        device_id: row.get(3)?,
        sender: row.get(4)?,
        event_type: row.get(5)?,
        received_ts: row.get(6)?,
    }))
}

/// The oldest rows of devices holding more than `cap`, beyond the cap, at
/// most `batch` in all.
fn inbox_over_cap(
    conn: &Connection,
    cap: u32,
    batch: u64,
) -> Result<Vec<ExpiredMessage>, StoreError> {
    let cap = i64::from(cap);
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let over: Vec<(String, String, i64)> = conn
        .prepare_cached(
            "SELECT user_id, device_id, count(*) FROM device_inbox
             GROUP BY user_id, device_id HAVING count(*) > ?1 LIMIT ?2",
        )?
        .query_map((cap, batch), |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    let mut oldest = conn.prepare_cached(
        "SELECT stream_id, message_id, user_id, device_id, sender, event_type, received_ts
         FROM device_inbox WHERE user_id = ?1 AND device_id = ?2
         ORDER BY stream_id LIMIT ?3",
    )?;
    for (user_id, device_id, count) in over {
        let left = batch - out.len() as i64;
        if left <= 0 {
            break;
        }
        let excess = (count - cap).min(left);
        let rows = oldest.query_map((&user_id, &device_id, excess), |row| {
            inbox_row(row, ExpiryReason::InboxCap)
        })?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// Rows of destinations failing since at or before `cutoff`: queued and
/// in-flight outbox rows first, then quarantined ones, at most `batch`.
/// A destination's in-flight record goes with the first of its rows, or
/// once none of the queue is left.
fn dead_destination_rows(
    conn: &Connection,
    cutoff: TimestampMs,
    batch: u64,
) -> Result<Vec<ExpiredMessage>, StoreError> {
    let limit = i64::try_from(batch).unwrap_or(i64::MAX);
    let dead: Vec<(String, i64)> = conn
        .prepare_cached(
            "SELECT d.destination, d.failing_since_ts FROM destinations d
             WHERE d.failing_since_ts IS NOT NULL AND d.failing_since_ts <= ?1
               AND (EXISTS (SELECT 1 FROM outbox o WHERE o.destination = d.destination)
                    OR EXISTS (SELECT 1 FROM quarantine q WHERE q.destination = d.destination)
                    OR EXISTS (SELECT 1 FROM outbox_txn t WHERE t.destination = d.destination))
             ORDER BY d.failing_since_ts LIMIT ?2",
        )?
        .query_map((cutoff, limit), |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (destination, failing_since_ts) in dead {
        let left = limit - out.len() as i64;
        if left <= 0 {
            break;
        }
        let in_flight: HashSet<i64> = conn
            .prepare_cached("SELECT seqs_json FROM outbox_txn WHERE destination = ?1")?
            .query_row([&destination], |row| row.get::<_, String>(0))
            .optional()?
            .map(|seqs| serde_json::from_str::<Vec<i64>>(&seqs).unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let before = out.len();
        let mut queued = conn.prepare_cached(
            "SELECT seq, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream
             FROM outbox WHERE destination = ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = queued.query_map((&destination, left), |row| {
            let seq: i64 = row.get(0)?;
            let held = if in_flight.contains(&seq) {
                OutboxHold::InFlight
            } else {
                OutboxHold::Queued
            };
            outbox_row(row, &destination, held, failing_since_ts)
        })?;
        for row in rows {
            out.push(row?);
        }
        let fetched = (out.len() - before) as i64;
        // Short of the limit: every queued row of the destination is in
        // this batch, so its in-flight record names nothing that is left.
        let queue_done = fetched < left;
        let left = left - fetched;
        if left > 0 {
            let mut held = conn.prepare_cached(
                "SELECT seq, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream
                 FROM quarantine WHERE destination = ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = held.query_map((&destination, left), |row| {
                outbox_row(row, &destination, OutboxHold::Quarantined, failing_since_ts)
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        // The record goes with the first of its rows (one that names its
        // EDUs could not be sent again without them), or with the queue.
        let record_hit = out[before..]
            .iter()
            .any(|m| matches!(m, ExpiredMessage::Outbox(e) if e.held == OutboxHold::InFlight));
        if queue_done || record_hit {
            conn.prepare_cached("DELETE FROM outbox_txn WHERE destination = ?1")?
                .execute([&destination])?;
        }
    }
    Ok(out)
}

fn outbox_row(
    row: &rusqlite::Row<'_>,
    destination: &str,
    held: OutboxHold,
    failing_since_ts: TimestampMs,
) -> rusqlite::Result<ExpiredMessage> {
    let edu_json: String = row.get(1)?;
    let (edu_type, id) = outbox_edu_id(&edu_json, row.get(4)?, row.get(5)?, row.get(6)?);
    Ok(ExpiredMessage::Outbox(ExpiredOutboxEdu {
        destination: destination.to_owned(),
        seq: row.get(0)?,
        held,
        edu_type,
        id,
        message_count: row.get(2)?,
        queued_ts: row.get(3)?,
        failing_since_ts,
    }))
}

pub fn expiry_totals(conn: &Connection) -> Result<Vec<ExpiryTotal>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT reason, count FROM expiry_totals WHERE count > 0 ORDER BY kind, reason",
    )?;
    let rows = stmt.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (reason, count) = row?;
        let Some(reason) = ExpiryReason::parse(&reason) else {
            return Err(StoreError::Corrupt(format!(
                "expiry_totals: unknown reason {reason:?}"
            )));
        };
        out.push(ExpiryTotal {
            kind: reason.kind(),
            reason,
            count: u64::try_from(count).unwrap_or(0),
        });
    }
    Ok(out)
}
