//! SQL of the inbox side of the SQLite backend: inbound federation
//! transactions (with their dedupe records), `*` expansion and the chunked
//! inbox insert (`InboxWriter`, which client sends in `send.rs` share), and
//! reading and acknowledging a device inbox. Every function here runs inside
//! a transaction its caller owns (the group transaction on the writer, or a
//! single statement on a reader).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::LazyLock;

use rusqlite::{CachedStatement, Connection, OptionalExtension};

use super::trace;

use crate::store::{
    DeviceKey, DeviceTarget, InboundOutcome, InboundTxn, InboxMessage, InboxPage, NewInboxMessage,
    StoreError, TimestampMs,
};

/// Rows per multi-row INSERT: fewer statement executions per row on the
/// hot path (7 parameters each, far below SQLite's parameter limit).
const CHUNK: usize = 32;

const INSERT_ONE: &str = "INSERT INTO device_inbox
    (user_id, device_id, sender, event_type, content_json, message_id, received_ts)
    VALUES (?, ?, ?, ?, ?, ?, ?)";

/// `INSERT ... VALUES (...), (...)` with `CHUNK` rows; rows get increasing
/// stream ids in the order of the VALUES list.
static INSERT_CHUNK: LazyLock<String> = LazyLock::new(|| {
    let mut sql = String::from(
        "INSERT INTO device_inbox \
         (user_id, device_id, sender, event_type, content_json, message_id, received_ts) \
         VALUES ",
    );
    for i in 0..CHUNK {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?)");
    }
    sql
});

/// Expands targets and inserts local messages in the order given, collecting
/// the woken devices. Lives for one operation: its device cache is only valid
/// inside the transaction it was filled in. Rows are buffered and written in
/// chunks; `finish` writes the rest and must be called before the result is
/// used.
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
            self.flush()?;
        }
        Ok(())
    }

    /// Inserts the buffered rows, full chunks first, the rest one by one.
    fn flush(&mut self) -> Result<(), StoreError> {
        let mut rows = self.pending.as_slice();
        while rows.len() >= CHUNK {
            let mut stmt = self.conn.prepare_cached(&INSERT_CHUNK)?;
            let mut index = 1;
            for (msg, device_id) in &rows[..CHUNK] {
                stmt.raw_bind_parameter(index, &msg.user_id)?;
                stmt.raw_bind_parameter(index + 1, &**device_id)?;
                stmt.raw_bind_parameter(index + 2, &msg.sender)?;
                stmt.raw_bind_parameter(index + 3, &msg.event_type)?;
                stmt.raw_bind_parameter(index + 4, &msg.content_json)?;
                stmt.raw_bind_parameter(index + 5, &msg.message_id)?;
                stmt.raw_bind_parameter(index + 6, self.now_ms)?;
                index += 7;
            }
            stmt.raw_execute()?;
            rows = &rows[CHUNK..];
        }
        if !rows.is_empty() {
            let mut stmt = self.conn.prepare_cached(INSERT_ONE)?;
            for (msg, device_id) in rows {
                stmt.execute((
                    &msg.user_id,
                    &**device_id,
                    &msg.sender,
                    &msg.event_type,
                    &msg.content_json,
                    &msg.message_id,
                    self.now_ms,
                ))?;
            }
        }
        self.pending.clear();
        Ok(())
    }

    /// Rows taken so far (written or still buffered).
    pub(super) fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes what is still buffered; returns the woken devices.
    pub(super) fn finish(mut self) -> Result<Vec<DeviceKey>, StoreError> {
        self.flush()?;
        Ok(self.woken.list)
    }
}

pub fn apply_inbound_txn(
    conn: &Connection,
    txn: &InboundTxn,
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
    let mut inbox = InboxWriter::new(conn, txn.now_ms)?;
    let mut duplicate_message_ids = 0u32;
    let journal = trace::InboundJournal::start(conn)?;
    for edu in &txn.edus {
        let fresh = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO inbound_message_ids (origin, message_id, received_ts)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute((&txn.origin, &edu.message_id, txn.now_ms))?;
        if fresh == 0 {
            duplicate_message_ids += 1;
            tracing::debug!(origin = %txn.origin, txn_id = %txn.txn_id, message_id = %edu.message_id, "deduped a message_id seen before");
            if let Some(journal) = &journal {
                journal.edu(conn, txn, edu, None)?;
            }
            continue;
        }
        let before = inbox.rows();
        for msg in &edu.messages {
            inbox.write(msg)?;
        }
        if let Some(journal) = &journal {
            journal.edu(conn, txn, edu, Some((before, inbox.rows())))?;
        }
    }
    if let Some(journal) = &journal {
        journal.finish(conn, txn, duplicate_message_ids)?;
    }
    Ok(InboundOutcome::Accepted {
        woken_devices: inbox.finish()?,
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

pub fn delete_acked(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    since: i64,
) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM device_inbox WHERE user_id = ?1 AND device_id = ?2 AND stream_id <= ?3",
        )?
        .execute((user_id, device_id, since))?)
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
