//! SQL of the inbox side of the SQLite backend: inbound federation
//! transactions (with their dedupe records, recorded with multi-row
//! INSERTs), `*` expansion and the chunked inbox insert (`InboxWriter`,
//! which client sends in `send.rs` share), and reading and acknowledging a
//! device inbox. Every function here runs inside
//! a transaction its caller owns (the group transaction on the writer, or a
//! single statement on a reader).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use rusqlite::{CachedStatement, Connection, OptionalExtension};

use super::multirow::{self, CHUNK};
use super::trace;

use crate::store::{
    DeviceKey, DeviceTarget, InboundOutcome, InboundTxn, InboxMessage, InboxPage, NewInboxMessage,
    StoreError, TimestampMs,
};

/// Expands targets and inserts local messages in the order given, collecting
/// the woken devices. Lives for one operation: its device cache is only valid
/// inside the transaction it was filled in. Rows are buffered and written
/// with multi-row INSERTs (`multirow`), full chunks as they fill; `finish`
/// writes the rest and must be called before the result is used.
pub(super) struct InboxWriter<'c, 'm> {
    conn: &'c Connection,
    list: CachedStatement<'c>,
    /// The rows' `received_ts` (for the inbox TTL).
    now_ms: TimestampMs,
    /// Registered devices per user (sorted), loaded on first use.
    devices: HashMap<&'m str, Vec<Rc<str>>>,
    /// Rows not yet inserted, in order.
    pending: Vec<(&'m NewInboxMessage, Rc<str>)>,
    woken: Woken,
    /// Rows taken so far (written or buffered), in order: the trace journal
    /// derives each message's stream ids from it.
    rows: u64,
    /// The stream id before the first row written (known once one is).
    base: Option<i64>,
}

/// What an `InboxWriter` wrote.
pub(super) struct Written {
    /// Devices that got a row, in first-seen order.
    pub woken: Vec<DeviceKey>,
    /// The rows written.
    pub rows: u64,
    /// The stream id before the first row: the rows took the ids after it,
    /// consecutively and in order (only the writer thread inserts). 0 when
    /// no row was written.
    pub base: i64,
}

/// Devices that got a row, in first-seen order, without repeats.
#[derive(Default)]
struct Woken {
    list: Vec<DeviceKey>,
    seen: HashMap<String, HashSet<String>>,
}

impl Woken {
    fn add(&mut self, user_id: &str, device_id: &str) {
        let fresh = match self.seen.get_mut(user_id) {
            Some(devices) if devices.contains(device_id) => false,
            Some(devices) => devices.insert(device_id.to_owned()),
            None => {
                self.seen
                    .insert(user_id.to_owned(), HashSet::from([device_id.to_owned()]));
                true
            }
        };
        if fresh {
            self.list.push(DeviceKey {
                user_id: user_id.to_owned(),
                device_id: device_id.to_owned(),
            });
        }
    }
}

impl<'c, 'm> InboxWriter<'c, 'm> {
    pub(super) fn new(conn: &'c Connection, now_ms: TimestampMs) -> Result<Self, StoreError> {
        Ok(InboxWriter {
            conn,
            now_ms,
            list: conn.prepare_cached(
                "SELECT device_id FROM devices WHERE user_id = ?1 ORDER BY device_id",
            )?,
            devices: HashMap::new(),
            pending: Vec::with_capacity(CHUNK),
            woken: Woken::default(),
            rows: 0,
            base: None,
        })
    }

    pub(super) fn write(&mut self, msg: &'m NewInboxMessage) -> Result<(), StoreError> {
        if !self.devices.contains_key(msg.user_id.as_str()) {
            let registered = self
                .list
                .query_map([&msg.user_id], |row| {
                    row.get_ref(0)?
                        .as_str()
                        .map(Rc::<str>::from)
                        .map_err(Into::into)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            self.devices.insert(msg.user_id.as_str(), registered);
        }
        let registered: &[Rc<str>] = self
            .devices
            .get(msg.user_id.as_str())
            .map_or(&[], Vec::as_slice);
        match &msg.device {
            DeviceTarget::One(device_id) => {
                // Unregistered devices are dropped silently.
                if let Ok(i) = registered.binary_search_by(|d| (**d).cmp(device_id.as_str())) {
                    self.woken.add(&msg.user_id, device_id);
                    self.pending.push((msg, registered[i].clone()));
                    self.rows += 1;
                }
            }
            DeviceTarget::All => {
                for device_id in registered {
                    self.woken.add(&msg.user_id, device_id);
                    self.pending.push((msg, device_id.clone()));
                    self.rows += 1;
                }
            }
        }
        if self.pending.len() >= CHUNK {
            self.flush(self.pending.len() / CHUNK * CHUNK)?;
        }
        Ok(())
    }

    /// Inserts the first `count` buffered rows, in order.
    fn flush(&mut self, count: usize) -> Result<(), StoreError> {
        let (conn, now_ms, base) = (self.conn, self.now_ms, &mut self.base);
        multirow::insert(
            conn,
            &multirow::INBOX,
            &self.pending[..count],
            |stmt, chunk| {
                for (i, (msg, device_id)) in chunk.iter().enumerate() {
                    multirow::bind_row(
                        stmt,
                        i,
                        &[
                            &msg.user_id,
                            &&**device_id,
                            &msg.sender,
                            &msg.event_type,
                            &msg.content_json,
                            &msg.message_id,
                            &now_ms,
                        ],
                    )?;
                }
                stmt.raw_execute()?;
                if base.is_none() {
                    *base = Some(multirow::first_rowid(conn, chunk.len()) - 1);
                }
                Ok(())
            },
        )?;
        self.pending.drain(..count);
        Ok(())
    }

    /// Rows taken so far (written or still buffered).
    pub(super) fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes what is still buffered.
    pub(super) fn finish(mut self) -> Result<Written, StoreError> {
        self.flush(self.pending.len())?;
        Ok(Written {
            woken: self.woken.list,
            rows: self.rows,
            base: self.base.unwrap_or(0),
        })
    }
}

/// The inbound message ids of `txn` recorded now, i.e. not seen before
/// (a repeat inside `txn` is recorded once), with multi-row INSERTs.
fn record_message_ids(conn: &Connection, txn: &InboundTxn) -> Result<HashSet<String>, StoreError> {
    let mut fresh = HashSet::with_capacity(txn.edus.len());
    multirow::insert(conn, &multirow::MESSAGE_IDS, &txn.edus, |stmt, chunk| {
        for (i, edu) in chunk.iter().enumerate() {
            multirow::bind_row(stmt, i, &[&txn.origin, &edu.message_id, &txn.now_ms])?;
        }
        let mut recorded = stmt.raw_query();
        while let Some(row) = recorded.next()? {
            fresh.insert(row.get(0)?);
        }
        Ok(())
    })?;
    Ok(fresh)
}

pub fn apply_inbound_txn(
    conn: &Connection,
    txn: &InboundTxn,
    journal: bool,
) -> Result<InboundOutcome, StoreError> {
    let recorded = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO inbound_txns (origin, txn_id, response_json, received_ts)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute((&txn.origin, &txn.txn_id, &txn.response_json, txn.now_ms))?;
    if recorded == 0 {
        let response_json =
            inbound_txn_response(conn, &txn.origin, &txn.txn_id)?.ok_or_else(|| {
                StoreError::Corrupt("inbound txn vanished inside a transaction".into())
            })?;
        return Ok(InboundOutcome::Duplicate { response_json });
    }
    let mut fresh = record_message_ids(conn, txn)?;
    let mut inbox = InboxWriter::new(conn, txn.now_ms)?;
    let mut duplicate_message_ids = 0u32;
    // Per EDU, for the journal: the writer's row counts before and after
    // it, or `None` when it was deduped.
    let mut edu_rows: Vec<Option<(u64, u64)>> = Vec::with_capacity(txn.edus.len());
    for edu in &txn.edus {
        if !fresh.remove(&edu.message_id) {
            duplicate_message_ids += 1;
            tracing::debug!(origin = %txn.origin, txn_id = %txn.txn_id, message_id = %edu.message_id, "deduped a message_id seen before");
            edu_rows.push(None);
            continue;
        }
        let before = inbox.rows();
        for msg in &edu.messages {
            inbox.write(msg)?;
        }
        edu_rows.push(Some((before, inbox.rows())));
    }
    let written = inbox.finish()?;
    if journal {
        trace::record_inbound(conn, txn, written.base, &edu_rows, duplicate_message_ids)?;
    }
    Ok(InboundOutcome::Accepted {
        woken_devices: written.woken,
        duplicate_message_ids,
    })
}

pub fn inbound_txn_response(
    conn: &Connection,
    origin: &str,
    txn_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT response_json FROM inbound_txns WHERE origin = ?1 AND txn_id = ?2")?
        .query_row((origin, txn_id), |row| row.get(0))
        .optional()?)
}

// --- inbox reads ---------------------------------------------------------------

/// Whether the device has rows at or below `since` (an acknowledgement to apply).
pub fn inbox_has_acked(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: i64,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM device_inbox
             WHERE user_id = ?1 AND device_id = ?2 AND stream_id <= ?3 LIMIT 1",
        )?
        .exists((user_id, device_id, since))?)
}

/// Deletes the device's rows at or below `since` (its `/sync`
/// acknowledgement) and, with the journal on, records the `delivered` row
/// from the same statement's `RETURNING` (no second read).
pub fn acknowledge(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: i64,
    now_ms: TimestampMs,
    journal: bool,
) -> Result<(), StoreError> {
    if !journal {
        conn.prepare_cached(
            "DELETE FROM device_inbox WHERE user_id = ?1 AND device_id = ?2 AND stream_id <= ?3",
        )?
        .execute((user_id, device_id, since))?;
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "DELETE FROM device_inbox WHERE user_id = ?1 AND device_id = ?2 AND stream_id <= ?3
         RETURNING stream_id, message_id",
    )?;
    let mut deleted: Vec<(i64, String)> = stmt
        .query_map((user_id, device_id, since), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    // RETURNING yields rows in no promised order; the journal lists them
    // by stream id.
    deleted.sort_unstable_by_key(|row| row.0);
    trace::record_delivered(conn, user_id, device_id, since, &deleted, now_ms)
}

pub fn inbox_page(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: i64,
    limit: u32,
) -> Result<InboxPage, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream_id, sender, event_type, content_json, message_id FROM device_inbox
         WHERE user_id = ?1 AND device_id = ?2 AND stream_id > ?3
         ORDER BY stream_id LIMIT ?4",
    )?;
    let mut rows = stmt.query((user_id, device_id, since, i64::from(limit) + 1))?;
    let mut messages = Vec::new();
    let mut more = false;
    while let Some(row) = rows.next()? {
        if messages.len() == limit as usize {
            more = true;
            break;
        }
        messages.push(InboxMessage {
            stream_id: row.get(0)?,
            sender: row.get(1)?,
            event_type: row.get(2)?,
            content_json: row.get(3)?,
            message_id: row.get(4)?,
        });
    }
    let next_batch = messages.last().map_or(since, |m| m.stream_id);
    Ok(InboxPage {
        messages,
        next_batch,
        more,
    })
}
