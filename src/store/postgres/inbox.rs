//! SQL of the device and inbox side of the PostgreSQL backend: devices and
//! tokens, inbound federation transactions (with their dedupe records), `*`
//! expansion and the locked inbox insert (`write_inbox`, which client sends
//! in `send.rs` share), and reading and acknowledging a device inbox. Each
//! write function runs one transaction on the connection given.
//!
//! Ordering: a writer locks every device row of the users it writes to
//! (`FOR NO KEY UPDATE`, in key order, so writers never deadlock on each
//! other) before it takes stream ids, and holds the locks until commit. Two
//! writers to one device therefore take ids and commit in the same order,
//! so a reader that saw stream id N will never later find a row below N.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{Object, Transaction};
use tokio_postgres::types::ToSql;

use super::Fail;
use super::trace;
use crate::store::trace::Detail;
use crate::store::{
    DeviceKey, DeviceTarget, InboundOutcome, InboundTxn, InboxMessage, InboxPage, NewInboxMessage,
    TimestampMs, hash_token,
};

pub async fn upsert_device(
    c: &mut Object,
    user_id: &str,
    device_id: &str,
    token: Option<&str>,
) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO devices (user_id, device_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&insert, &[&user_id, &device_id]).await?;
    if let Some(token) = token {
        let upsert = tx
            .prepare_cached(
                "INSERT INTO access_tokens (token_hash, user_id, device_id) VALUES ($1, $2, $3)
                 ON CONFLICT (token_hash) DO UPDATE SET user_id = excluded.user_id,
                                                        device_id = excluded.device_id",
            )
            .await?;
        tx.execute(&upsert, &[&hash_token(token), &user_id, &device_id])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn list_devices(c: &Object, user_id: &str) -> Result<Vec<String>, Fail> {
    let stmt = c
        .prepare_cached("SELECT device_id FROM devices WHERE user_id = $1 ORDER BY device_id")
        .await?;
    Ok(c.query(&stmt, &[&user_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub async fn lookup_token(c: &Object, token: &str) -> Result<Option<DeviceKey>, Fail> {
    let stmt = c
        .prepare_cached("SELECT user_id, device_id FROM access_tokens WHERE token_hash = $1")
        .await?;
    Ok(c.query_opt(&stmt, &[&hash_token(token)])
        .await?
        .map(|r| DeviceKey {
            user_id: r.get(0),
            device_id: r.get(1),
        }))
}

/// Locks the device rows of every user named in `messages`, expands the
/// targets (dropping unknown devices) and inserts the rows in the order
/// given with one multi-row INSERT. Returns the devices that got a row, in
/// first-seen order, and the stream id range and row count written per
/// message_id (for the trace journal).
pub(super) async fn write_inbox(
    tx: &Transaction<'_>,
    messages: &[&NewInboxMessage],
    now_ms: TimestampMs,
) -> Result<(Vec<DeviceKey>, StreamSpans), Fail> {
    let mut spans = StreamSpans::new();
    if messages.is_empty() {
        return Ok((Vec::new(), spans));
    }
    let mut users: Vec<&str> = messages.iter().map(|m| m.user_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let lock = tx
        .prepare_cached(
            "SELECT user_id, device_id FROM devices WHERE user_id = ANY($1)
             ORDER BY user_id, device_id FOR NO KEY UPDATE",
        )
        .await?;
    let mut registered: HashMap<String, Vec<String>> = HashMap::new();
    for row in tx.query(&lock, &[&users]).await? {
        registered.entry(row.get(0)).or_default().push(row.get(1));
    }
    let mut cols: [Vec<&str>; 6] = Default::default();
    let mut woken: Vec<DeviceKey> = Vec::new();
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for msg in messages {
        let devices = registered
            .get(msg.user_id.as_str())
            .map_or(&[][..], Vec::as_slice);
        let targets: &[String] = match &msg.device {
            DeviceTarget::One(device_id) => {
                match devices.binary_search_by(|d| d.as_str().cmp(device_id.as_str())) {
                    Ok(i) => std::slice::from_ref(&devices[i]),
                    Err(_) => &[],
                }
            }
            DeviceTarget::All => devices,
        };
        for device_id in targets {
            if seen.insert((msg.user_id.as_str(), device_id.as_str())) {
                woken.push(DeviceKey {
                    user_id: msg.user_id.clone(),
                    device_id: device_id.clone(),
                });
            }
            cols[0].push(&msg.user_id);
            cols[1].push(device_id);
            cols[2].push(&msg.sender);
            cols[3].push(&msg.event_type);
            cols[4].push(&msg.content_json);
            cols[5].push(&msg.message_id);
        }
    }
    if !cols[0].is_empty() {
        let insert = tx
            .prepare_cached(
                "INSERT INTO device_inbox
                     (user_id, device_id, sender, event_type, content_json, message_id,
                      received_ts)
                 SELECT u, d, s, t, c, m, $7
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::text[])
                      WITH ORDINALITY AS r (u, d, s, t, c, m, o)
                 ORDER BY o
                 RETURNING stream_id, message_id",
            )
            .await?;
        let written = tx
            .query(
                &insert,
                &[
                    &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5], &now_ms,
                ],
            )
            .await?;
        for row in written {
            let (stream_id, message_id): (i64, String) = (row.get(0), row.get(1));
            let span = spans.entry(message_id).or_insert((stream_id, stream_id, 0));
            span.0 = span.0.min(stream_id);
            span.1 = span.1.max(stream_id);
            span.2 += 1;
        }
    }
    Ok((woken, spans))
}

/// Per message_id: the lowest and highest stream id written and the rows.
pub(super) type StreamSpans = HashMap<String, (i64, i64, u64)>;

/// The journal rows of an inbound transaction: one per EDU (`applied`
/// with its stream range, or `deduped`) and its `received` row.
async fn journal_inbound(
    tx: &Transaction<'_>,
    txn: &InboundTxn,
    applied: &HashSet<&str>,
    spans: &StreamSpans,
    duplicates: u32,
) -> Result<(), Fail> {
    let mut rows = trace::Rows::default();
    for edu in &txn.edus {
        let event_type = edu.messages.first().map(|m| m.event_type.as_str());
        let sender = edu.messages.first().map(|m| m.sender.as_str());
        let row = if applied.contains(edu.message_id.as_str()) {
            let span = spans.get(&edu.message_id).copied();
            let recipients =
                crate::store::trace::recipients(edu.messages.iter().map(|m| m.user_id.as_str()));
            trace::Row {
                kind: "applied",
                first_id: span.map(|s| s.0),
                last_id: span.map(|s| s.1),
                detail: Detail::default()
                    .opt_str("event_type", event_type)
                    .strs("recipients", &recipients)
                    .int("rows", span.map_or(0, |s| s.2))
                    .finish(),
                ..trace::Row::default()
            }
        } else {
            trace::Row {
                kind: "deduped",
                detail: Detail::default().opt_str("event_type", event_type).finish(),
                ..trace::Row::default()
            }
        };
        rows.push(trace::Row {
            message_id: Some(&edu.message_id),
            txn_id: Some(&txn.txn_id),
            peer: Some(&txn.origin),
            user_id: sender,
            ..row
        });
    }
    rows.push(trace::Row {
        kind: "received",
        txn_id: Some(&txn.txn_id),
        peer: Some(&txn.origin),
        detail: Detail::default()
            .int("duplicates", duplicates)
            .int("edus", txn.edus.len() as u64)
            .finish(),
        ..trace::Row::default()
    });
    rows.write(tx, txn.now_ms).await
}

/// Applies the transaction; also says whether the origin, as a destination,
/// is backing off (so that its owner should hear it is up).
pub async fn apply_inbound_txn(
    c: &mut Object,
    txn: &InboundTxn,
    switch: &trace::Switch,
) -> Result<(InboundOutcome, bool), Fail> {
    let journal_on = switch.on(&*c).await?;
    let tx = c.transaction().await?;
    let backoff = tx
        .prepare_cached(
            "SELECT 1 FROM destinations
             WHERE destination = $1 AND (failures > 0 OR retry_after_ts > 0)",
        )
        .await?;
    let backing_off = tx.query_opt(&backoff, &[&txn.origin]).await?.is_some();
    let record = tx
        .prepare_cached(
            "INSERT INTO inbound_txns (origin, txn_id, response_json, received_ts)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .await?;
    let recorded = tx
        .execute(
            &record,
            &[&txn.origin, &txn.txn_id, &txn.response_json, &txn.now_ms],
        )
        .await?;
    if recorded == 0 {
        let stmt = tx
            .prepare_cached(
                "SELECT response_json FROM inbound_txns WHERE origin = $1 AND txn_id = $2",
            )
            .await?;
        let response_json: String = tx
            .query_one(&stmt, &[&txn.origin, &txn.txn_id])
            .await?
            .get(0);
        tx.rollback().await?;
        return Ok((InboundOutcome::Duplicate { response_json }, backing_off));
    }
    // Record every message id at once; the ids inserted are the fresh ones.
    // A message id repeated inside the transaction is fresh only the first time.
    let ids: Vec<&str> = txn.edus.iter().map(|e| e.message_id.as_str()).collect();
    let mut fresh: HashSet<String> = HashSet::new();
    if !ids.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO inbound_message_ids (origin, message_id, received_ts)
                 SELECT $1, m, $3 FROM unnest($2::text[]) WITH ORDINALITY AS r (m, o)
                 ORDER BY o
                 ON CONFLICT DO NOTHING
                 RETURNING message_id",
            )
            .await?;
        for row in tx.query(&stmt, &[&txn.origin, &ids, &txn.now_ms]).await? {
            fresh.insert(row.get(0));
        }
    }
    let mut duplicate_message_ids = 0u32;
    let mut messages: Vec<&NewInboxMessage> = Vec::new();
    let mut applied: HashSet<&str> = HashSet::new();
    for edu in &txn.edus {
        if fresh.remove(&edu.message_id) {
            messages.extend(edu.messages.iter());
            applied.insert(&edu.message_id);
        } else {
            duplicate_message_ids += 1;
            tracing::debug!(origin = %txn.origin, txn_id = %txn.txn_id, message_id = %edu.message_id, "deduped a message_id seen before");
        }
    }
    let (woken_devices, spans) = write_inbox(&tx, &messages, txn.now_ms).await?;
    if journal_on {
        journal_inbound(&tx, txn, &applied, &spans, duplicate_message_ids).await?;
    }
    tx.commit().await?;
    let outcome = InboundOutcome::Accepted {
        woken_devices,
        duplicate_message_ids,
    };
    Ok((outcome, backing_off))
}

pub async fn inbound_txn_response(
    c: &Object,
    origin: &str,
    txn_id: &str,
) -> Result<Option<String>, Fail> {
    let stmt = c
        .prepare_cached("SELECT response_json FROM inbound_txns WHERE origin = $1 AND txn_id = $2")
        .await?;
    Ok(c.query_opt(&stmt, &[&origin, &txn_id])
        .await?
        .map(|r| r.get(0)))
}

/// Deletes the rows at or below `since` and reads the next page, in one
/// statement (so one snapshot and one round trip).
pub async fn fetch_inbox(
    c: &Object,
    user_id: &str,
    device_id: &str,
    since: i64,
    limit: u32,
    now_ms: i64,
    switch: &trace::Switch,
) -> Result<InboxPage, Fail> {
    let rows_limit = i64::from(limit) + 1;
    let rows = if switch.on(c).await? {
        let stmt = c.prepare_cached(&fetch_inbox_journaled_sql()).await?;
        let params: [&(dyn ToSql + Sync); 5] = [&user_id, &device_id, &since, &rows_limit, &now_ms];
        c.query(&stmt, &params).await?
    } else {
        let stmt = c.prepare_cached(FETCH_INBOX).await?;
        c.query(&stmt, &[&user_id, &device_id, &since, &rows_limit])
            .await?
    };
    let more = rows.len() > limit as usize;
    let messages: Vec<InboxMessage> = rows
        .iter()
        .take(limit as usize)
        .map(|r| InboxMessage {
            stream_id: r.get(0),
            sender: r.get(1),
            event_type: r.get(2),
            content_json: r.get(3),
            message_id: r.get(4),
        })
        .collect();
    let next_batch = messages.last().map_or(since, |m| m.stream_id);
    Ok(InboxPage {
        messages,
        next_batch,
        more,
    })
}

/// `fetch_inbox`'s statement with the journal off: the acknowledgement and
/// the next page (a data-modifying CTE runs whether or not it is read).
const FETCH_INBOX: &str = "WITH acked AS (
         DELETE FROM device_inbox
         WHERE user_id = $1 AND device_id = $2 AND stream_id <= $3
     )
     SELECT stream_id, sender, event_type, content_json, message_id FROM device_inbox
     WHERE user_id = $1 AND device_id = $2 AND stream_id > $3
     ORDER BY stream_id LIMIT $4";

/// `fetch_inbox`'s statement with the journal on: the acknowledgement's
/// journal row (`delivered`) is a CTE of the same statement, listing the
/// (stream id, message_id) pairs deleted.
fn fetch_inbox_journaled_sql() -> String {
    format!(
        "WITH acked AS (
             DELETE FROM device_inbox
             WHERE user_id = $1 AND device_id = $2 AND stream_id <= $3
             RETURNING stream_id, message_id
         ),
         traced AS (
             INSERT INTO trace_events (ts, kind, user_id, device_id, first_id, last_id, detail)
             SELECT $5::int8, 'delivered', $1::text, $2::text, min(stream_id), max(stream_id),
                    json_build_object(
                        'since', $3::int8,
                        'rows', (SELECT coalesce(json_agg(json_build_array(a.stream_id,
                                                                           a.message_id)
                                                          ORDER BY a.stream_id), '[]')
                                 FROM (SELECT stream_id, message_id FROM acked
                                       ORDER BY stream_id LIMIT {pairs}) a),
                        'rows_total', count(*))::text
             FROM acked
             HAVING count(*) > 0 AND {enabled}
         )
         SELECT stream_id, sender, event_type, content_json, message_id FROM device_inbox
         WHERE user_id = $1 AND device_id = $2 AND stream_id > $3
         ORDER BY stream_id LIMIT $4",
        pairs = crate::store::trace::MAX_DELIVERED_PAIRS,
        enabled = trace::ENABLED,
    )
}
