//! SQL of the trace journal's writes in the SQLite backend (`store::trace`
//! holds the row kinds): the `record_*` functions and the two journals run
//! on the writer thread inside the transaction of the event they record, so
//! a journal row exists exactly when its event committed. Nothing is
//! written while `trace_settings.enabled` is 0. Reading is `trace_read.rs`.

use rusqlite::{Connection, OptionalExtension};

use crate::store::trace::delivered_detail;
use crate::store::{StoreError, TimestampMs};

/// One journal row to write.
#[derive(Debug, Default)]
pub(super) struct Row<'a> {
    pub ts: TimestampMs,
    pub kind: &'a str,
    pub message_id: Option<&'a str>,
    pub txn_id: Option<&'a str>,
    pub peer: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub device_id: Option<&'a str>,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    pub detail: String,
}

/// Whether the journal is on (`Store::set_trace_journal`).
pub(super) fn enabled(conn: &Connection) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT enabled FROM trace_settings WHERE id = 1")?
        .query_row([], |row| row.get::<_, bool>(0))
        .optional()?
        .unwrap_or(false))
}

pub(super) fn set_enabled(conn: &Connection, on: bool) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO trace_settings (id, enabled) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET enabled = excluded.enabled",
    )?
    .execute([on])?;
    Ok(())
}

pub(super) fn insert(conn: &Connection, row: &Row<'_>) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO trace_events
             (ts, kind, message_id, txn_id, peer, user_id, device_id, first_id, last_id, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(rusqlite::params![
        row.ts,
        row.kind,
        row.message_id,
        row.txn_id,
        row.peer,
        row.user_id,
        row.device_id,
        row.first_id,
        row.last_id,
        row.detail,
    ])?;
    Ok(())
}

/// The highest inbox stream id ever taken (`AUTOINCREMENT`'s counter): the
/// rows a writer inserts next get the ids after it, contiguously, because
/// only the writer thread inserts.
pub(super) fn inbox_stream_head(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'device_inbox'")?
        .query_row([], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// A stream range `(after, after + rows]`, or none when no row was written.
pub(super) fn span(after: i64, rows: u64) -> (Option<i64>, Option<i64>) {
    if rows == 0 {
        (None, None)
    } else {
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        (Some(after + 1), Some(after.saturating_add(rows)))
    }
}

/// Records that a transaction was attempted and how it ended (`ack_txn`,
/// `refuse_txn`, or a failure written by `set_retry_state`).
pub(super) fn record_attempt(
    conn: &Connection,
    destination: &str,
    txn_id: &str,
    now_ms: TimestampMs,
    outcome: &str,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    if !enabled(conn)? {
        return Ok(());
    }
    insert(
        conn,
        &Row {
            ts: now_ms,
            kind: "attempt",
            txn_id: Some(txn_id),
            peer: Some(destination),
            detail: serde_json::json!({"outcome": outcome, "reason": reason}).to_string(),
            ..Row::default()
        },
    )
}

/// Records a failed attempt of the destination's in-flight transaction,
/// if it has one (a retry-state write with an error and a wait is the end
/// of an attempt; a reset is not). `rate_limited` when the failure count
/// did not grow (the peer asked to wait), else `retry`.
pub(super) fn record_failed_attempt(
    conn: &Connection,
    destination: &str,
    failures: u32,
    retry_after_ms: TimestampMs,
    reason: Option<&str>,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    let Some(reason) = reason else {
        return Ok(());
    };
    if retry_after_ms <= 0 || !enabled(conn)? {
        return Ok(());
    }
    let txn_id: Option<String> = conn
        .prepare_cached("SELECT txn_id FROM outbox_txn WHERE destination = ?1")?
        .query_row([destination], |row| row.get(0))
        .optional()?;
    let Some(txn_id) = txn_id else {
        return Ok(());
    };
    let previous: u32 = conn
        .prepare_cached("SELECT failures FROM destinations WHERE destination = ?1")?
        .query_row([destination], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    let outcome = if failures > previous {
        "retry"
    } else {
        "rate_limited"
    };
    record_attempt(conn, destination, &txn_id, now_ms, outcome, Some(reason))
}

/// Records a device's `/sync` acknowledgement: the rows at or below
/// `since` about to be deleted.
pub(super) fn record_delivered(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: i64,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    if !enabled(conn)? {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT stream_id, message_id FROM device_inbox
         WHERE user_id = ?1 AND device_id = ?2 AND stream_id <= ?3 ORDER BY stream_id",
    )?;
    let rows: Vec<(i64, String)> = stmt
        .query_map((user_id, device_id, since), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(());
    };
    insert(
        conn,
        &Row {
            ts: now_ms,
            kind: "delivered",
            user_id: Some(user_id),
            device_id: Some(device_id),
            first_id: Some(first.0),
            last_id: Some(last.0),
            detail: delivered_detail(since, &rows),
            ..Row::default()
        },
    )
}

/// Records that a message (or the messages of an EDU) was dropped before
/// delivery: `place` names where it was (a destination's outbox, a
/// device's inbox), `reason` why. For the retention rules (inbox TTL and
/// cap, dead destinations), inside the caller's transaction on the writer.
pub fn record_expired(
    conn: &Connection,
    now_ms: TimestampMs,
    message_id: &str,
    place: &str,
    reason: &str,
) -> Result<(), StoreError> {
    if !enabled(conn)? {
        return Ok(());
    }
    insert(
        conn,
        &Row {
            ts: now_ms,
            kind: "expired",
            message_id: Some(message_id),
            peer: Some(place),
            detail: serde_json::json!({"where": place, "reason": reason}).to_string(),
            ..Row::default()
        },
    )
}

/// Deletes journal rows older than `cutoff`, looking only at the oldest
/// `limit` rows (ids grow with time, so the scan stops at once when nothing
/// is expired).
pub(super) fn prune(conn: &Connection, cutoff: TimestampMs, limit: i64) -> Result<u64, StoreError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM trace_events WHERE id IN
                 (SELECT id FROM (SELECT id, ts FROM trace_events ORDER BY id LIMIT ?2)
                  WHERE ts <= ?1)",
        )?
        .execute((cutoff, limit))? as u64)
}

// --- the journal of the two write paths ------------------------------------------

/// The journal of one client send, started before its inbox rows are
/// taken (`None`: the journal is off).
pub(super) struct SendJournal {
    /// The stream head before the send's rows.
    base: i64,
}

impl SendJournal {
    pub(super) fn start(conn: &Connection) -> Result<Option<SendJournal>, StoreError> {
        if !enabled(conn)? {
            return Ok(None);
        }
        Ok(Some(SendJournal {
            base: inbox_stream_head(conn)?,
        }))
    }

    /// The `accepted` row, when the send has local recipients (`rows`:
    /// inbox rows taken, which may be 0 when no named device exists).
    pub(super) fn accepted(
        &self,
        conn: &Connection,
        batch: &crate::store::SendBatch,
        rows: u64,
    ) -> Result<(), StoreError> {
        let Some(first) = batch.local.first() else {
            return Ok(());
        };
        let t = &batch.txn;
        let (first_id, last_id) = span(self.base, rows);
        let recipients =
            crate::store::trace::recipients(batch.local.iter().map(|m| m.user_id.as_str()));
        insert(
            conn,
            &Row {
                ts: batch.now_ms,
                kind: "accepted",
                message_id: Some(&first.message_id),
                txn_id: Some(&t.txn_id),
                user_id: Some(&t.user_id),
                device_id: Some(&t.device_id),
                first_id,
                last_id,
                detail: serde_json::json!({
                    "event_type": t.event_type,
                    "rows": rows,
                    "recipients": recipients,
                })
                .to_string(),
                ..Row::default()
            },
        )
    }

    /// The `queued` row of one remote EDU, given its outbox seq.
    pub(super) fn queued(
        &self,
        conn: &Connection,
        batch: &crate::store::SendBatch,
        edu: &crate::store::NewOutboxEdu,
        seq: i64,
    ) -> Result<(), StoreError> {
        let t = &batch.txn;
        let message_id = crate::store::trace::edu_message_id(&edu.edu_json);
        insert(
            conn,
            &Row {
                ts: batch.now_ms,
                kind: "queued",
                message_id: message_id.as_deref(),
                txn_id: Some(&t.txn_id),
                peer: Some(&edu.destination),
                user_id: Some(&t.user_id),
                device_id: Some(&t.device_id),
                first_id: Some(seq),
                detail: serde_json::json!({
                    "event_type": t.event_type,
                    "messages": edu.message_count,
                })
                .to_string(),
                ..Row::default()
            },
        )
    }
}

/// The journal of one inbound federation transaction, started before its
/// inbox rows are taken (`None`: the journal is off).
pub(super) struct InboundJournal {
    base: i64,
}

impl InboundJournal {
    pub(super) fn start(conn: &Connection) -> Result<Option<InboundJournal>, StoreError> {
        if !enabled(conn)? {
            return Ok(None);
        }
        Ok(Some(InboundJournal {
            base: inbox_stream_head(conn)?,
        }))
    }

    /// The row of one EDU: `applied` with the writer's row counts before
    /// and after it, or `deduped` (`None`).
    pub(super) fn edu(
        &self,
        conn: &Connection,
        txn: &crate::store::InboundTxn,
        edu: &crate::store::InboundEdu,
        rows: Option<(u64, u64)>,
    ) -> Result<(), StoreError> {
        let sender = edu.messages.first().map(|m| m.sender.as_str());
        let event_type = edu.messages.first().map(|m| m.event_type.as_str());
        let (kind, first_id, last_id, detail) = match rows {
            Some((before, after)) => {
                let offset = i64::try_from(before).unwrap_or(i64::MAX);
                let (first_id, last_id) = span(self.base.saturating_add(offset), after - before);
                let recipients = crate::store::trace::recipients(
                    edu.messages.iter().map(|m| m.user_id.as_str()),
                );
                let detail = serde_json::json!({
                    "event_type": event_type,
                    "rows": after - before,
                    "recipients": recipients,
                });
                ("applied", first_id, last_id, detail)
            }
            None => (
                "deduped",
                None,
                None,
                serde_json::json!({"event_type": event_type}),
            ),
        };
        insert(
            conn,
            &Row {
                ts: txn.now_ms,
                kind,
                message_id: Some(&edu.message_id),
                txn_id: Some(&txn.txn_id),
                peer: Some(&txn.origin),
                user_id: sender,
                first_id,
                last_id,
                detail: detail.to_string(),
                ..Row::default()
            },
        )
    }

    /// The transaction's `received` row.
    pub(super) fn finish(
        &self,
        conn: &Connection,
        txn: &crate::store::InboundTxn,
        duplicates: u32,
    ) -> Result<(), StoreError> {
        insert(
            conn,
            &Row {
                ts: txn.now_ms,
                kind: "received",
                txn_id: Some(&txn.txn_id),
                peer: Some(&txn.origin),
                detail: serde_json::json!({"edus": txn.edus.len(), "duplicates": duplicates})
                    .to_string(),
                ..Row::default()
            },
        )
    }
}

/// The `txn` row of a transaction recorded before its first send.
pub(super) fn record_txn(
    conn: &Connection,
    txn: &crate::store::InFlightTxn,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    if !enabled(conn)? {
        return Ok(());
    }
    insert(
        conn,
        &Row {
            ts: now_ms,
            kind: "txn",
            txn_id: Some(&txn.txn_id),
            peer: Some(&txn.destination),
            first_id: txn.seqs.first().copied(),
            last_id: txn.seqs.last().copied(),
            detail: serde_json::json!({"edus": txn.seqs.len()}).to_string(),
            ..Row::default()
        },
    )
}

/// The `quarantined` row of an EDU moved to quarantine.
pub(super) fn record_quarantined(
    conn: &Connection,
    destination: &str,
    seq: i64,
    reason: &str,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    if !enabled(conn)? {
        return Ok(());
    }
    let edu_json: Option<String> = conn
        .prepare_cached("SELECT edu_json FROM quarantine WHERE destination = ?1 AND seq = ?2")?
        .query_row((destination, seq), |row| row.get(0))
        .optional()?;
    let message_id = edu_json
        .as_deref()
        .and_then(crate::store::trace::edu_message_id);
    insert(
        conn,
        &Row {
            ts: now_ms,
            kind: "quarantined",
            message_id: message_id.as_deref(),
            peer: Some(destination),
            first_id: Some(seq),
            detail: serde_json::json!({"where": destination, "reason": reason}).to_string(),
            ..Row::default()
        },
    )
}
