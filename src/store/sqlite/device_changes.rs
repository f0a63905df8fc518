//! SQL of the SQLite backend's device changes (`KeyStore`, DESIGN §7):
//! display names, device deletion (also behind `Store::delete_device`),
//! cross-signing keys and signatures, and the device-list change log every
//! one of them appends to in the same transaction (`log_change`, which also
//! queues the change's device-list EDUs through `device_list_outbox`), with
//! its reads (a user's `stream_id`, `users_with_changes`) and the entries
//! that queue nothing (`append_change` for the remote cache, `log_left`).
//! Called from the `KeyStore` impl in `keys.rs` and from the
//! `DeviceListStore` impl, on the writer thread for every write.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension};

use super::device_list_outbox::queue_local_change;
use crate::store::keys::{DeviceListChanges, NewCrossSigningKey, StoredSignature};
use crate::store::{StoreError, TimestampMs};

// --- device changes -------------------------------------------------------------

/// Sets the name; logs a change only when the name is different.
pub fn set_display_name(
    conn: &Connection,
    user: &str,
    device: &str,
    name: Option<&str>,
    now_ms: TimestampMs,
) -> Result<bool, StoreError> {
    let current: Option<Option<String>> = conn
        .prepare_cached("SELECT display_name FROM devices WHERE user_id = ?1 AND device_id = ?2")?
        .query_row((user, device), |row| row.get(0))
        .optional()?;
    match current {
        None => Ok(false),
        Some(current) if current.as_deref() == name => Ok(true),
        Some(_) => {
            conn.prepare_cached(
                "UPDATE devices SET display_name = ?3 WHERE user_id = ?1 AND device_id = ?2",
            )?
            .execute((user, device, name))?;
            log_change(conn, user, Some(device), now_ms)?;
            Ok(true)
        }
    }
}

/// Deletes each listed device that exists with everything that hangs off it
/// and logs one change per deleted device. `Store::delete_device` uses it
/// too.
pub fn delete_devices(
    conn: &Connection,
    user: &str,
    device_ids: &[String],
    now_ms: TimestampMs,
) -> Result<Vec<String>, StoreError> {
    const DELETES: &[&str] = &[
        "DELETE FROM access_tokens WHERE user_id = ?1 AND device_id = ?2",
        "DELETE FROM device_inbox WHERE user_id = ?1 AND device_id = ?2",
        "DELETE FROM device_keys WHERE user_id = ?1 AND device_id = ?2",
        "DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2",
        "DELETE FROM claimed_one_time_keys WHERE user_id = ?1 AND device_id = ?2",
        "DELETE FROM fallback_keys WHERE user_id = ?1 AND device_id = ?2",
        "DELETE FROM e2ee_signatures WHERE target_user_id = ?1 AND target_key_id = ?2",
    ];
    let mut deleted: Vec<String> = Vec::new();
    for device in device_ids {
        if deleted.contains(device) {
            continue;
        }
        let n = conn
            .prepare_cached("DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2")?
            .execute((user, device))?;
        if n == 0 {
            continue;
        }
        for sql in DELETES {
            conn.prepare_cached(sql)?.execute((user, device))?;
        }
        log_change(conn, user, Some(device), now_ms)?;
        deleted.push(device.clone());
    }
    Ok(deleted)
}

/// Replaces each given kind; the signatures of a replaced public key go with
/// it. Logs one change when anything differed from what was stored.
pub fn put_cross_signing_keys(
    conn: &Connection,
    user: &str,
    keys: &[NewCrossSigningKey],
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    let mut changed = false;
    for key in keys {
        let kind = key.kind.as_str();
        let stored: Option<(String, String)> = conn
            .prepare_cached(
                "SELECT public_key, key_json FROM cross_signing_keys
                 WHERE user_id = ?1 AND kind = ?2",
            )?
            .query_row((user, kind), |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let Some((public_key, key_json)) = stored {
            if public_key == key.public_key && key_json == key.key_json {
                continue;
            }
            if public_key != key.public_key {
                conn.prepare_cached(
                    "DELETE FROM e2ee_signatures WHERE target_user_id = ?1 AND target_key_id = ?2",
                )?
                .execute((user, &public_key))?;
            }
        }
        conn.prepare_cached(
            "INSERT INTO cross_signing_keys (user_id, kind, public_key, key_json)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (user_id, kind) DO UPDATE SET
                 public_key = excluded.public_key, key_json = excluded.key_json",
        )?
        .execute((user, kind, &key.public_key, &key.key_json))?;
        changed = true;
    }
    if changed {
        log_change(conn, user, None, now_ms)?;
    }
    Ok(())
}

/// Stores new or changed signatures (one per signer key and target) and logs
/// one change per signed device or per user whose cross-signing keys got one.
pub fn put_signatures(
    conn: &Connection,
    signatures: &[StoredSignature],
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    let mut targets: Vec<(&str, Option<&str>)> = Vec::new();
    for s in signatures {
        let n = conn
            .prepare_cached(
                "INSERT INTO e2ee_signatures
                     (target_user_id, target_key_id, signer_user_id, signer_key_id, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (target_user_id, target_key_id, signer_user_id, signer_key_id)
                     DO UPDATE SET signature = excluded.signature
                     WHERE e2ee_signatures.signature <> excluded.signature",
            )?
            .execute((
                &s.target_user_id,
                &s.target_key_id,
                &s.signer_user_id,
                &s.signer_key_id,
                &s.signature,
            ))?;
        if n == 0 {
            continue;
        }
        let cross_signing = conn
            .prepare_cached(
                "SELECT 1 FROM cross_signing_keys WHERE user_id = ?1 AND public_key = ?2",
            )?
            .query_row((&s.target_user_id, &s.target_key_id), |_| Ok(()))
            .optional()?
            .is_some();
        let target = (
            s.target_user_id.as_str(),
            (!cross_signing).then_some(s.target_key_id.as_str()),
        );
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    for (user, device) in targets {
        log_change(conn, user, device, now_ms)?;
    }
    Ok(())
}

// --- the change log -------------------------------------------------------------

/// Appends one change of a local `user` (a device, or with `None` the
/// user's cross-signing keys) and queues its EDU for every interested
/// destination, in the same transaction (`device_list_outbox`). Returns the
/// change's stream_id.
pub fn log_change(
    conn: &Connection,
    user: &str,
    device: Option<&str>,
    now_ms: TimestampMs,
) -> Result<i64, StoreError> {
    let stream_id = append_change(conn, user, device, now_ms)?;
    queue_local_change(conn, user, device, stream_id, now_ms)?;
    Ok(stream_id)
}

/// Appends one change of `user` to the log, queueing nothing (the remote
/// cache logs its users' changes with it): the next global position and
/// the user's next stream_id, which it returns.
pub fn append_change(
    conn: &Connection,
    user: &str,
    device: Option<&str>,
    now_ms: TimestampMs,
) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(
            "INSERT INTO device_list_changes (user_id, stream_id, device_id, changed_ts)
             VALUES (?1, (SELECT coalesce(max(stream_id), 0) + 1 FROM device_list_changes
                          WHERE user_id = ?1 AND left_for IS NULL), ?2, ?3)
             RETURNING stream_id",
        )?
        .query_row((user, device, now_ms), |row| row.get(0))?)
}

/// Logs that `tracker` stopped tracking `user` (a `left` entry): the next
/// global position, and a negative stream_id (counting down per user) that
/// leaves the user's stream alone.
pub fn log_left(
    conn: &Connection,
    tracker: &str,
    user: &str,
    now_ms: TimestampMs,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO device_list_changes (user_id, stream_id, device_id, changed_ts, left_for)
         VALUES (?1, (SELECT min(coalesce(min(stream_id), 0), 0) - 1 FROM device_list_changes
                      WHERE user_id = ?1), NULL, ?3, ?2)",
    )?
    .execute((user, tracker, now_ms))?;
    Ok(())
}

pub fn stream_id(conn: &Connection, user: &str) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT coalesce(max(stream_id), 0) FROM device_list_changes
             WHERE user_id = ?1 AND left_for IS NULL",
        )?
        .query_row([user], |row| row.get(0))?)
}

pub fn users_with_changes(
    conn: &Connection,
    users: &[String],
    after: i64,
    up_to: i64,
) -> Result<DeviceListChanges, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT 1 FROM device_list_changes
         WHERE user_id = ?1 AND position > ?2 AND position <= ?3 AND left_for IS NULL
         LIMIT 1",
    )?;
    let mut changed = Vec::new();
    let unique: BTreeSet<&str> = users.iter().map(String::as_str).collect();
    for user in unique {
        if stmt
            .query_row((user, after, up_to), |_| Ok(()))
            .optional()?
            .is_some()
        {
            changed.push(user.to_owned());
        }
    }
    Ok(DeviceListChanges { users: changed })
}
