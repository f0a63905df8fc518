//! The SQL of every `Store` operation, as plain functions over a
//! `rusqlite::Connection`. Write functions run on the writer thread inside
//! the group transaction (each within its own savepoint); read functions run
//! on a pooled read connection. Nothing here spawns, blocks on a channel or
//! commits: `sqlite.rs` and `writer.rs` own those.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{
    DestinationStatus, DeviceKey, DeviceTarget, InFlightTxn, InboundOutcome, InboundTxn,
    InboxMessage, InboxPage, NewInboxMessage, OutboxEdu, PruneReport, QuarantinedEdu, Retention,
    RetryState, SendBatch, SendOutcome, StoreError, StoredServerKey, TimestampMs, hash_token,
};

// --- devices and tokens ------------------------------------------------------

pub fn upsert_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    token: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO devices (user_id, device_id) VALUES (?1, ?2)")?
        .execute((user_id, device_id))?;
    if let Some(token) = token {
        conn.prepare_cached(
            "INSERT INTO access_tokens (token_hash, user_id, device_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (token_hash) DO UPDATE SET user_id = excluded.user_id,
                                                    device_id = excluded.device_id",
        )?
        .execute((hash_token(token), user_id, device_id))?;
    }
    Ok(())
}

pub fn delete_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM access_tokens WHERE user_id = ?1 AND device_id = ?2")?
        .execute((user_id, device_id))?;
    conn.prepare_cached("DELETE FROM device_inbox WHERE user_id = ?1 AND device_id = ?2")?
        .execute((user_id, device_id))?;
    let n = conn
        .prepare_cached("DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2")?
        .execute((user_id, device_id))?;
    Ok(n > 0)
}

pub fn list_devices(conn: &Connection, user_id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT device_id FROM devices WHERE user_id = ?1 ORDER BY device_id")?;
    let rows = stmt.query_map([user_id], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn lookup_token(conn: &Connection, token: &str) -> Result<Option<DeviceKey>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?1")?
        .query_row([hash_token(token)], |row| {
            Ok(DeviceKey {
                user_id: row.get(0)?,
                device_id: row.get(1)?,
            })
        })
        .optional()?)
}

// --- inbox writes --------------------------------------------------------------

/// Expands and inserts local messages in order; collects woken devices.
struct InboxWriter<'c> {
    conn: &'c Connection,
    /// The devices of the last user `*` was expanded for (messages to one
    /// user usually come together).
    all_cache: Option<(String, Vec<String>)>,
    woken: Vec<DeviceKey>,
    woken_set: HashSet<(String, String)>,
}

impl<'c> InboxWriter<'c> {
    fn new(conn: &'c Connection) -> Self {
        InboxWriter {
            conn,
            all_cache: None,
            woken: Vec::new(),
            woken_set: HashSet::new(),
        }
    }

    fn write(&mut self, msg: &NewInboxMessage) -> Result<(), StoreError> {
        match &msg.device {
            DeviceTarget::One(device_id) => {
                let exists = self
                    .conn
                    .prepare_cached("SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2")?
                    .exists((&msg.user_id, device_id))?;
                if exists {
                    self.insert(msg, device_id)?;
                }
            }
            DeviceTarget::All => {
                let cached = matches!(&self.all_cache, Some((u, _)) if *u == msg.user_id);
                if !cached {
                    let devices = list_devices(self.conn, &msg.user_id)?;
                    self.all_cache = Some((msg.user_id.clone(), devices));
                }
                let devices = match self.all_cache.take() {
                    Some((_, devices)) => devices,
                    None => Vec::new(),
                };
                for device_id in &devices {
                    self.insert(msg, device_id)?;
                }
                self.all_cache = Some((msg.user_id.clone(), devices));
            }
        }
        Ok(())
    }

    fn insert(&mut self, msg: &NewInboxMessage, device_id: &str) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO device_inbox (user_id, device_id, sender, event_type, content_json)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute((
                &msg.user_id,
                device_id,
                &msg.sender,
                &msg.event_type,
                &msg.content_json,
            ))?;
        if !self
            .woken_set
            .contains(&(msg.user_id.clone(), device_id.to_owned()))
        {
            self.woken_set
                .insert((msg.user_id.clone(), device_id.to_owned()));
            self.woken.push(DeviceKey {
                user_id: msg.user_id.clone(),
                device_id: device_id.to_owned(),
            });
        }
        Ok(())
    }
}

pub fn enqueue_send(conn: &Connection, batch: &SendBatch) -> Result<SendOutcome, StoreError> {
    let t = &batch.txn;
    let recorded = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO client_txns (user_id, device_id, event_type, txn_id, received_ts)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute((&t.user_id, &t.device_id, &t.event_type, &t.txn_id, batch.now_ms))?;
    if recorded == 0 {
        return Ok(SendOutcome::Duplicate);
    }
    let mut inbox = InboxWriter::new(conn);
    for msg in &batch.local {
        inbox.write(msg)?;
    }
    let mut destinations: Vec<String> = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO outbox (destination, edu_json, message_count, queued_ts)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for edu in &batch.remote {
            stmt.execute((
                &edu.destination,
                &edu.edu_json,
                edu.message_count,
                batch.now_ms,
            ))?;
            if !destinations.contains(&edu.destination) {
                destinations.push(edu.destination.clone());
            }
        }
    }
    Ok(SendOutcome::Accepted {
        woken_devices: inbox.woken,
        destinations,
    })
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
    let mut inbox = InboxWriter::new(conn);
    let mut duplicate_message_ids = 0u32;
    for edu in &txn.edus {
        let fresh = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO inbound_message_ids (origin, message_id, received_ts)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute((&txn.origin, &edu.message_id, txn.now_ms))?;
        if fresh == 0 {
            duplicate_message_ids += 1;
            continue;
        }
        for msg in &edu.messages {
            inbox.write(msg)?;
        }
    }
    Ok(InboundOutcome::Accepted {
        woken_devices: inbox.woken,
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
        "SELECT stream_id, sender, event_type, content_json FROM device_inbox
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
        });
    }
    let next_batch = messages.last().map_or(since, |m| m.stream_id);
    Ok(InboxPage {
        messages,
        next_batch,
        more,
    })
}

// --- outbox ----------------------------------------------------------------------

pub fn in_flight(conn: &Connection, destination: &str) -> Result<Option<InFlightTxn>, StoreError> {
    let row = conn
        .prepare_cached("SELECT txn_id, seqs_json, body FROM outbox_txn WHERE destination = ?1")?
        .query_row([destination], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })
        .optional()?;
    match row {
        None => Ok(None),
        Some((txn_id, seqs_json, body)) => Ok(Some(InFlightTxn {
            destination: destination.to_owned(),
            txn_id,
            seqs: parse_seqs(&seqs_json)?,
            body,
        })),
    }
}

fn parse_seqs(seqs_json: &str) -> Result<Vec<i64>, StoreError> {
    serde_json::from_str(seqs_json)
        .map_err(|e| StoreError::Corrupt(format!("outbox_txn.seqs_json: {e}")))
}

pub fn peek_outbox(
    conn: &Connection,
    destination: &str,
    max_edus: u32,
    max_bytes: u64,
) -> Result<Vec<OutboxEdu>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, edu_json, message_count, queued_ts, refusals FROM outbox
         WHERE destination = ?1 ORDER BY seq LIMIT ?2",
    )?;
    let mut rows = stmt.query((destination, i64::from(max_edus)))?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    while let Some(row) = rows.next()? {
        let edu_json: String = row.get(1)?;
        let len = edu_json.len() as u64;
        if !out.is_empty() && bytes + len > max_bytes {
            break;
        }
        bytes += len;
        out.push(OutboxEdu {
            seq: row.get(0)?,
            edu_json,
            message_count: row.get(2)?,
            queued_ts: row.get(3)?,
            refusals: row.get(4)?,
        });
    }
    Ok(out)
}

pub fn begin_txn(conn: &Connection, txn: &InFlightTxn) -> Result<(), StoreError> {
    let seqs_json = serde_json::to_string(&txn.seqs)
        .map_err(|e| StoreError::Corrupt(format!("seqs not serializable: {e}")))?;
    // The primary key on destination makes a second in-flight txn fail.
    conn.prepare_cached(
        "INSERT INTO outbox_txn (destination, txn_id, seqs_json, body) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute((&txn.destination, &txn.txn_id, seqs_json, &txn.body))?;
    Ok(())
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
    let mut delete =
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND seq = ?2")?;
    for seq in seqs {
        delete.execute((destination, seq))?;
    }
    set_retry_state(
        conn,
        destination,
        &RetryState {
            failures: 0,
            retry_after_ms: 0,
            last_success_ms: Some(now_ms),
            last_error: None,
        },
    )
}

pub fn refuse_txn(conn: &Connection, destination: &str, txn_id: &str) -> Result<(), StoreError> {
    let Some(seqs) = take_in_flight(conn, destination, txn_id)? else {
        return Ok(());
    };
    let mut bump = conn.prepare_cached(
        "UPDATE outbox SET refusals = refusals + 1 WHERE destination = ?1 AND seq = ?2",
    )?;
    for seq in seqs {
        bump.execute((destination, seq))?;
    }
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
                 (destination, seq, edu_json, message_count, queued_ts, reason, quarantined_ts)
             SELECT destination, seq, edu_json, message_count, queued_ts, ?3, ?4
             FROM outbox WHERE destination = ?1 AND seq = ?2",
        )?
        .execute((destination, seq, reason, now_ms))?;
    if moved > 0 {
        conn.prepare_cached("DELETE FROM outbox WHERE destination = ?1 AND seq = ?2")?
            .execute((destination, seq))?;
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
            "INSERT INTO outbox (destination, edu_json, message_count, queued_ts, refusals)
             SELECT destination, edu_json, message_count, queued_ts, 0
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

pub fn set_retry_state(
    conn: &Connection,
    destination: &str,
    state: &RetryState,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO destinations (destination, failures, retry_after_ts, last_success_ts, last_error)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (destination) DO UPDATE SET
             failures = excluded.failures,
             retry_after_ts = excluded.retry_after_ts,
             last_success_ts = excluded.last_success_ts,
             last_error = excluded.last_error",
    )?
    .execute(params![
        destination,
        state.failures,
        state.retry_after_ms,
        state.last_success_ms,
        state.last_error
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
                d.last_error, coalesce(h.n, 0)
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
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// --- server keys ---------------------------------------------------------------

pub fn server_keys(
    conn: &Connection,
    server_name: &str,
) -> Result<Vec<StoredServerKey>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT server_name, key_id, public_key, valid_until_ts FROM server_keys
         WHERE server_name = ?1 ORDER BY key_id",
    )?;
    let rows = stmt.query_map([server_name], |row| {
        Ok(StoredServerKey {
            server_name: row.get(0)?,
            key_id: row.get(1)?,
            public_key: row.get(2)?,
            valid_until_ts: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn put_server_keys(conn: &Connection, keys: &[StoredServerKey]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO server_keys (server_name, key_id, public_key, valid_until_ts)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (server_name, key_id) DO UPDATE SET
             public_key = excluded.public_key,
             valid_until_ts = excluded.valid_until_ts",
    )?;
    for key in keys {
        stmt.execute((
            &key.server_name,
            &key.key_id,
            &key.public_key,
            key.valid_until_ts,
        ))?;
    }
    Ok(())
}

// --- housekeeping ------------------------------------------------------------------

pub fn prune(
    conn: &Connection,
    now_ms: TimestampMs,
    retention: Retention,
    batch: u32,
) -> Result<PruneReport, StoreError> {
    let limit = i64::from(batch);
    let expire = |sql: &str, cutoff: i64| -> Result<u64, StoreError> {
        Ok(conn.prepare_cached(sql)?.execute((cutoff, limit))? as u64)
    };
    Ok(PruneReport {
        client_txns: expire(
            "DELETE FROM client_txns WHERE rowid IN
                 (SELECT rowid FROM client_txns WHERE received_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.client_txn_ms),
        )?,
        inbound_txns: expire(
            "DELETE FROM inbound_txns WHERE rowid IN
                 (SELECT rowid FROM inbound_txns WHERE received_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.inbound_txn_ms),
        )?,
        inbound_message_ids: expire(
            "DELETE FROM inbound_message_ids WHERE rowid IN
                 (SELECT rowid FROM inbound_message_ids WHERE received_ts <= ?1 LIMIT ?2)",
            now_ms.saturating_sub(retention.inbound_message_id_ms),
        )?,
        expired_server_keys: expire(
            "DELETE FROM server_keys WHERE (server_name, key_id) IN
                 (SELECT server_name, key_id FROM server_keys WHERE valid_until_ts < ?1 LIMIT ?2)",
            now_ms,
        )?,
        orphan_inbox_rows: conn
            .prepare_cached(
                "DELETE FROM device_inbox WHERE stream_id IN
                     (SELECT i.stream_id FROM device_inbox i
                      WHERE NOT EXISTS (SELECT 1 FROM devices d
                                        WHERE d.user_id = i.user_id
                                          AND d.device_id = i.device_id)
                      LIMIT ?1)",
            )?
            .execute([limit])? as u64,
    })
}
