//! SQL of the trace journal's writes in the SQLite backend (`store::trace`
//! holds the row kinds): the `record_*` functions run on the writer thread
//! inside the transaction of the event they record, so a journal row exists
//! exactly when its event committed. Reading is `trace_read.rs`.
//!
//! Whether the journal is on is `trace_settings.enabled`, mirrored in
//! memory by `Switch`: the store reads it at open and `set_enabled` changes
//! both on the writer thread, so every later write job sees the new value
//! (the same order as reading the table). The hot writes (client sends,
//! inbound transactions, `/sync` acknowledgements) take it from the
//! `Switch` and, when it is off, run no journal statement at all; they
//! write a batch's rows with multi-row INSERTs (`multirow`). The writes of
//! the outbox (transactions, attempts, quarantine) and of retention, one
//! per federation transaction or expired row, still read the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::{Connection, OptionalExtension};

use super::multirow;
use crate::store::trace::{Detail, delivered_detail};
use crate::store::{StoreError, TimestampMs};

/// The in-memory copy of `trace_settings.enabled`, shared by a store's
/// clones. Read and written only by write jobs on the writer thread (and
/// at open, before the writer takes jobs), so relaxed ordering suffices.
#[derive(Debug, Clone, Default)]
pub(super) struct Switch(Arc<AtomicBool>);

impl Switch {
    pub(super) fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(super) fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

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

/// Whether the journal is on, as stored (`Store::set_trace_journal`).
pub(super) fn enabled(conn: &Connection) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT enabled FROM trace_settings WHERE id = 1")?
        .query_row([], |row| row.get::<_, bool>(0))
        .optional()?
        .unwrap_or(false))
}

/// Stores the setting and, once the statement succeeded, mirrors it in
/// `switch` (a failed commit of the group is undone by the caller, which
/// reloads the switch from the table).
pub(super) fn set_enabled(conn: &Connection, switch: &Switch, on: bool) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO trace_settings (id, enabled) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET enabled = excluded.enabled",
    )?
    .execute([on])?;
    switch.set(on);
    Ok(())
}

/// Writes `rows` in order, at most 32 to a statement.
pub(super) fn insert_rows(conn: &Connection, rows: &[Row<'_>]) -> Result<(), StoreError> {
    multirow::insert(conn, &multirow::TRACE, rows, |stmt, chunk| {
        for (i, row) in chunk.iter().enumerate() {
            multirow::bind_row(
                stmt,
                i,
                &[
                    &row.ts,
                    &row.kind,
                    &row.message_id,
                    &row.txn_id,
                    &row.peer,
                    &row.user_id,
                    &row.device_id,
                    &row.first_id,
                    &row.last_id,
                    &row.detail,
                ],
            )?;
        }
        stmt.raw_execute()?;
        Ok(())
    })
}

pub(super) fn insert(conn: &Connection, row: &Row<'_>) -> Result<(), StoreError> {
    insert_rows(conn, std::slice::from_ref(row))
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
            detail: Detail::default()
                .str("outcome", outcome)
                .opt_str("reason", reason)
                .finish(),
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

/// Records a device's `/sync` acknowledgement: `rows` are the
/// `(stream_id, message_id)` pairs it deleted, by stream id (none: no row).
pub(super) fn record_delivered(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: i64,
    rows: &[(i64, String)],
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
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
            detail: delivered_detail(since, rows),
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
            detail: Detail::default()
                .str("reason", reason)
                .str("where", place)
                .finish(),
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

/// The journal of one client send, written after its rows: the `accepted`
/// row when the send has local recipients (`inbox_base`: the stream id
/// before its inbox rows, `rows`: how many were written, which may be 0
/// when no named device exists), then one `queued` row per remote EDU
/// (`seqs`: their outbox seqs, in order).
pub(super) fn record_send(
    conn: &Connection,
    batch: &crate::store::SendBatch,
    inbox_base: i64,
    rows: u64,
    seqs: &[i64],
) -> Result<(), StoreError> {
    let t = &batch.txn;
    let message_ids: Vec<Option<String>> = batch
        .remote
        .iter()
        .map(|edu| crate::store::trace::edu_message_id(&edu.edu_json))
        .collect();
    let mut journal: Vec<Row<'_>> = Vec::with_capacity(batch.remote.len() + 1);
    if let Some(first) = batch.local.first() {
        let (first_id, last_id) = span(inbox_base, rows);
        let recipients =
            crate::store::trace::recipients(batch.local.iter().map(|m| m.user_id.as_str()));
        journal.push(Row {
            ts: batch.now_ms,
            kind: "accepted",
            message_id: Some(&first.message_id),
            txn_id: Some(&t.txn_id),
            user_id: Some(&t.user_id),
            device_id: Some(&t.device_id),
            first_id,
            last_id,
            detail: Detail::default()
                .str("event_type", &t.event_type)
                .strs("recipients", &recipients)
                .int("rows", rows)
                .finish(),
            ..Row::default()
        });
    }
    for ((edu, seq), message_id) in batch.remote.iter().zip(seqs).zip(&message_ids) {
        journal.push(Row {
            ts: batch.now_ms,
            kind: "queued",
            message_id: message_id.as_deref(),
            txn_id: Some(&t.txn_id),
            peer: Some(&edu.destination),
            user_id: Some(&t.user_id),
            device_id: Some(&t.device_id),
            first_id: Some(*seq),
            detail: Detail::default()
                .str("event_type", &t.event_type)
                .int("messages", edu.message_count)
                .finish(),
            ..Row::default()
        });
    }
    insert_rows(conn, &journal)
}

/// The journal of one inbound federation transaction, written after its
/// rows: per EDU in order, `applied` with the writer's row counts before
/// and after it (`Some((before, after))`, stream ids after `inbox_base`)
/// or `deduped` (`None`), then the transaction's `received` row.
pub(super) fn record_inbound(
    conn: &Connection,
    txn: &crate::store::InboundTxn,
    inbox_base: i64,
    edu_rows: &[Option<(u64, u64)>],
    duplicates: u32,
) -> Result<(), StoreError> {
    let mut journal: Vec<Row<'_>> = Vec::with_capacity(txn.edus.len() + 1);
    for (edu, rows) in txn.edus.iter().zip(edu_rows) {
        let sender = edu.messages.first().map(|m| m.sender.as_str());
        let event_type = edu.messages.first().map(|m| m.event_type.as_str());
        let mut detail = Detail::default();
        detail.opt_str("event_type", event_type);
        let (kind, first_id, last_id) = match rows {
            Some((before, after)) => {
                let offset = i64::try_from(*before).unwrap_or(i64::MAX);
                let written = after.saturating_sub(*before);
                let (first_id, last_id) = span(inbox_base.saturating_add(offset), written);
                let recipients = crate::store::trace::recipients(
                    edu.messages.iter().map(|m| m.user_id.as_str()),
                );
                detail.strs("recipients", &recipients).int("rows", written);
                ("applied", first_id, last_id)
            }
            None => ("deduped", None, None),
        };
        journal.push(Row {
            ts: txn.now_ms,
            kind,
            message_id: Some(&edu.message_id),
            txn_id: Some(&txn.txn_id),
            peer: Some(&txn.origin),
            user_id: sender,
            first_id,
            last_id,
            detail: detail.finish(),
            ..Row::default()
        });
    }
    journal.push(Row {
        ts: txn.now_ms,
        kind: "received",
        txn_id: Some(&txn.txn_id),
        peer: Some(&txn.origin),
        detail: Detail::default()
            .int("duplicates", duplicates)
            .int("edus", txn.edus.len() as u64)
            .finish(),
        ..Row::default()
    });
    insert_rows(conn, &journal)
}

/// The `txn` row of a transaction recorded before its first send.
pub(super) fn record_txn(
    conn: &Connection,
    destination: &str,
    txn_id: &str,
    seqs: &[i64],
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
            txn_id: Some(txn_id),
            peer: Some(destination),
            first_id: seqs.first().copied(),
            last_id: seqs.last().copied(),
            detail: Detail::default().int("edus", seqs.len() as u64).finish(),
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
            detail: Detail::default()
                .str("reason", reason)
                .str("where", destination)
                .finish(),
            ..Row::default()
        },
    )
}
