//! SQL of the SQLite backend's outbound device-list EDUs (issue 16): queueing
//! one `m.device_list_update` / `m.signing_key_update` per interested
//! destination in the transaction of a local change (with coalescing), the
//! `prev_id` meta `peek_outbox` attaches, and what `ack_txn` records. Also
//! the signatures and device reads both this module and `keys.rs` use, so
//! that the queued content is exactly what `user_devices` answers.
//!
//! Coalescing: a queued row for the same (destination, user, device) that is
//! not in the destination's in-flight transaction is deleted before the new
//! one is inserted, so a destination that is away gets one row per device
//! (the newest state, the newest `stream_id`). Rows go to the end of the
//! queue, so within a peek a user's rows are in `stream_id` order and each
//! `prev_id` names a `stream_id` sent before (or acknowledged).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};

use crate::store::device_lists::{
    OutboundDeviceList, device_list_update_edu, signing_key_update_edu,
};
use crate::store::keys::{CrossSigningKey, CrossSigningKind, DeviceRecord, StoredSignature};
use crate::store::{StoreError, TimestampMs};

/// The metric every queued, coalesced and acknowledged device-list row
/// counts in (label `event`).
const UPDATES_METRIC: &str = "courier_device_list_updates_total";

/// Queues the EDU of one local change (`device` `None`: the user's
/// cross-signing keys) for every destination interested in `user` at
/// `now_ms`, built from the state inside this transaction. Returns the
/// destinations that got a row.
pub fn queue_local_change(
    conn: &Connection,
    user: &str,
    device: Option<&str>,
    stream_id: i64,
    now_ms: TimestampMs,
) -> Result<Vec<String>, StoreError> {
    let destinations = destinations(conn, user, now_ms)?;
    if destinations.is_empty() {
        return Ok(destinations);
    }
    let (edu_json, dl_device, dl_stream) = match device {
        Some(device) => {
            let record = device_record(conn, user, device)?;
            let edu = device_list_update_edu(user, device, stream_id, record.as_ref());
            (edu, device, Some(stream_id))
        }
        None => {
            let keys = cross_signing_keys(conn, user)?;
            (signing_key_update_edu(user, &keys), "", None)
        }
    };
    let mut coalesce = conn.prepare_cached(
        "DELETE FROM outbox
         WHERE destination = ?1 AND dl_user = ?2 AND dl_device = ?3
           AND seq NOT IN (SELECT j.value FROM outbox_txn t, json_each(t.seqs_json) j
                           WHERE t.destination = ?1)",
    )?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO outbox
             (destination, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream)
         VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6)",
    )?;
    let mut coalesced = 0u64;
    for destination in &destinations {
        coalesced += coalesce.execute((destination, user, dl_device))? as u64;
        insert.execute((destination, &edu_json, now_ms, user, dl_device, dl_stream))?;
    }
    if coalesced > 0 {
        metrics::counter!(UPDATES_METRIC, "event" => "coalesced").increment(coalesced);
    }
    metrics::counter!(UPDATES_METRIC, "event" => "queued").increment(destinations.len() as u64);
    Ok(destinations)
}

/// The destinations that get `user`'s EDUs at `now_ms`, sorted.
pub fn destinations(
    conn: &Connection,
    user: &str,
    now_ms: TimestampMs,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT destination FROM device_list_interest
         WHERE user_id = ?1 AND (expires_ts IS NULL OR expires_ts > ?2)
         ORDER BY destination",
    )?;
    let rows = stmt.query_map((user, now_ms), |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Fills in the device-list meta of peeked rows, in queue order: a row's
/// `prev_id` is the `stream_id` of the user's previous update row in this
/// peek, else the destination's acknowledged one for the user.
pub struct PeekChain<'c> {
    conn: &'c Connection,
    destination: &'c str,
    last: BTreeMap<String, i64>,
}

impl<'c> PeekChain<'c> {
    pub fn new(conn: &'c Connection, destination: &'c str) -> Self {
        PeekChain {
            conn,
            destination,
            last: BTreeMap::new(),
        }
    }

    /// The meta of the next peeked device-list row of `user`.
    pub fn next(
        &mut self,
        user: String,
        stream_id: Option<i64>,
    ) -> Result<OutboundDeviceList, StoreError> {
        let Some(stream) = stream_id else {
            return Ok(OutboundDeviceList {
                user_id: user,
                stream_id: None,
                prev_id: None,
            });
        };
        let prev_id = match self.last.get(&user) {
            Some(prev) => Some(*prev),
            None => acked(self.conn, self.destination, &user)?,
        };
        self.last.insert(user.clone(), stream);
        Ok(OutboundDeviceList {
            user_id: user,
            stream_id: Some(stream),
            prev_id,
        })
    }
}

fn acked(conn: &Connection, destination: &str, user: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT stream_id FROM device_list_acked WHERE destination = ?1 AND user_id = ?2",
        )?
        .query_row((destination, user), |row| row.get(0))
        .optional()?)
}

/// Before an acknowledged transaction's rows are deleted: records the
/// highest acknowledged `stream_id` per user and counts the device-list
/// rows as sent.
pub fn record_acked(conn: &Connection, destination: &str, seqs: &[i64]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT dl_user, dl_stream FROM outbox
         WHERE destination = ?1 AND seq = ?2 AND dl_user IS NOT NULL",
    )?;
    let mut highest: BTreeMap<String, i64> = BTreeMap::new();
    let mut sent = 0u64;
    for seq in seqs {
        let row: Option<(String, Option<i64>)> = stmt
            .query_row((destination, seq), |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((user, stream)) = row else { continue };
        sent += 1;
        if let Some(stream) = stream {
            let entry = highest.entry(user).or_insert(stream);
            *entry = (*entry).max(stream);
        }
    }
    let mut upsert = conn.prepare_cached(
        "INSERT INTO device_list_acked (destination, user_id, stream_id) VALUES (?1, ?2, ?3)
         ON CONFLICT (destination, user_id) DO UPDATE SET
             stream_id = max(device_list_acked.stream_id, excluded.stream_id)",
    )?;
    for (user, stream) in &highest {
        upsert.execute((destination, user, stream))?;
    }
    if sent > 0 {
        metrics::counter!(UPDATES_METRIC, "event" => "sent").increment(sent);
    }
    Ok(())
}

// --- the current state, as user_devices reads it ----------------------------------

/// One local device with its keys and signatures, if it exists.
pub fn device_record(
    conn: &Connection,
    user: &str,
    device: &str,
) -> Result<Option<DeviceRecord>, StoreError> {
    let row: Option<(Option<String>, Option<String>)> = conn
        .prepare_cached(
            "SELECT d.display_name, k.key_json FROM devices d
             LEFT JOIN device_keys k ON k.user_id = d.user_id AND k.device_id = d.device_id
             WHERE d.user_id = ?1 AND d.device_id = ?2",
        )?
        .query_row((user, device), |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((display_name, keys_json)) = row else {
        return Ok(None);
    };
    Ok(Some(DeviceRecord {
        device_id: device.to_owned(),
        display_name,
        keys_json,
        signatures: signatures_of(conn, user, device)?,
    }))
}

/// A local user's cross-signing keys with their signatures, by kind.
pub fn cross_signing_keys(
    conn: &Connection,
    user: &str,
) -> Result<Vec<CrossSigningKey>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, public_key, key_json FROM cross_signing_keys WHERE user_id = ?1",
    )?;
    let keys = stmt
        .query_map([user], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(keys.len());
    for (kind, public_key, key_json) in keys {
        let kind = CrossSigningKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("cross-signing key kind {kind:?}")))?;
        let signatures = signatures_of(conn, user, &public_key)?;
        out.push(CrossSigningKey {
            kind,
            public_key,
            key_json,
            signatures,
        });
    }
    out.sort_by_key(|k| k.kind);
    Ok(out)
}

/// The stored signatures of one device or cross-signing key, in upload
/// order.
pub fn signatures_of(
    conn: &Connection,
    target_user: &str,
    target_key: &str,
) -> Result<Vec<StoredSignature>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT signer_user_id, signer_key_id, signature FROM e2ee_signatures
         WHERE target_user_id = ?1 AND target_key_id = ?2 ORDER BY seq",
    )?;
    let rows = stmt.query_map((target_user, target_key), |r| {
        Ok(StoredSignature {
            target_user_id: target_user.to_owned(),
            target_key_id: target_key.to_owned(),
            signer_user_id: r.get(0)?,
            signer_key_id: r.get(1)?,
            signature: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
