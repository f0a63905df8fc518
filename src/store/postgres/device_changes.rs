//! SQL of the PostgreSQL backend's device changes (`KeyStore`, DESIGN §7):
//! display names, device deletion (also behind `Store::delete_device`),
//! cross-signing keys and signatures, and the device-list change log that
//! each of them appends to in its own transaction (`log_changes`; a local
//! change through `device_list_outbox::log_local_changes`, which also
//! queues its outbound EDUs), with its reads (`stream_id`, `position`,
//! `users_with_changes`, which skips `left` entries) and the `left` entries
//! of untracking (`log_left`).
//!
//! Ordering: `log_changes` takes a transaction-level advisory lock before it
//! reads the newest position, and it runs as the last step of a write (after
//! any device-row lock; only the outbound queueing follows it), so
//! change-log writers commit in position order and a reader that saw
//! position N never later finds a change at or below N.

use std::collections::BTreeSet;

use deadpool_postgres::{GenericClient, Object, Transaction};

use super::Fail;
use super::device_list_outbox::{Queued, log_local_changes};
use crate::store::TimestampMs;
use crate::store::keys::{DeviceListChanges, NewCrossSigningKey, StoredSignature};

/// The advisory lock that serializes change-log appends ("devlists").
const CHANGE_LOG_LOCK: i64 = 0x6465_766c_6973_7473;

/// One logged change: a device of a user, or (`device: None`) the user's
/// cross-signing keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    pub user: &'a str,
    pub device: Option<&'a str>,
}

impl<'a> Change<'a> {
    pub fn device(user: &'a str, device: &'a str) -> Self {
        Change {
            user,
            device: Some(device),
        }
    }
}

/// Appends `changes` in order: each the next global position and its user's
/// next stream_id. Returns the stream_ids, in order.
pub async fn log_changes(
    tx: &Transaction<'_>,
    changes: &[Change<'_>],
    now_ms: TimestampMs,
) -> Result<Vec<i64>, Fail> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    lock_change_log(tx).await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO device_list_changes (position, user_id, stream_id, device_id, changed_ts)
             VALUES ((SELECT coalesce(max(position), 0) + 1 FROM device_list_changes),
                     $1::text,
                     (SELECT coalesce(max(stream_id), 0) + 1 FROM device_list_changes
                      WHERE user_id = $1::text),
                     $2::text, $3::bigint)
             RETURNING stream_id",
        )
        .await?;
    let mut streams = Vec::with_capacity(changes.len());
    for change in changes {
        let row = tx
            .query_one(&insert, &[&change.user, &change.device, &now_ms])
            .await?;
        streams.push(row.get(0));
    }
    Ok(streams)
}

/// Takes the change log's lock for the rest of the transaction. Everything
/// a writer reads after it sees every earlier writer's commit (READ
/// COMMITTED takes a new snapshot per statement), which is what makes the
/// outbound coalescing and the remote cache's gap checks race-free.
pub async fn lock_change_log(tx: &Transaction<'_>) -> Result<(), Fail> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK])
        .await?;
    Ok(())
}

/// Appends one `left` entry per user: `tracker` stopped tracking it. It
/// takes a position but no stream_id.
pub async fn log_left(
    tx: &Transaction<'_>,
    tracker: &str,
    users: &[String],
    now_ms: TimestampMs,
) -> Result<(), Fail> {
    if users.is_empty() {
        return Ok(());
    }
    lock_change_log(tx).await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO device_list_changes
                 (position, user_id, stream_id, device_id, changed_ts, left_for)
             VALUES ((SELECT coalesce(max(position), 0) + 1 FROM device_list_changes),
                     $1::text, NULL, NULL, $2::bigint, $3::text)",
        )
        .await?;
    for user in users {
        tx.execute(&insert, &[user, &now_ms, &tracker]).await?;
    }
    Ok(())
}

pub async fn stream_id(c: &impl GenericClient, user: &str) -> Result<i64, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT coalesce(max(stream_id), 0)::bigint FROM device_list_changes
             WHERE user_id = $1",
        )
        .await?;
    Ok(c.query_one(&stmt, &[&user]).await?.get(0))
}

pub async fn position(c: &Object) -> Result<i64, Fail> {
    let stmt = c
        .prepare_cached("SELECT coalesce(max(position), 0)::bigint FROM device_list_changes")
        .await?;
    Ok(c.query_one(&stmt, &[]).await?.get(0))
}

pub async fn users_with_changes(
    c: &Object,
    users: &[String],
    after: i64,
    up_to: i64,
) -> Result<DeviceListChanges, Fail> {
    let unique: Vec<&str> = users
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stmt = c
        .prepare_cached(
            "SELECT u FROM unnest($1::text[]) AS u
             WHERE EXISTS (SELECT 1 FROM device_list_changes
                           WHERE user_id = u AND position > $2 AND position <= $3
                             AND left_for IS NULL)
             ORDER BY u",
        )
        .await?;
    let rows = c.query(&stmt, &[&unique, &after, &up_to]).await?;
    Ok(DeviceListChanges {
        users: rows.iter().map(|r| r.get(0)).collect(),
    })
}

/// Sets the name; logs a change only when the name is different.
pub async fn set_display_name(
    c: &mut Object,
    user: &str,
    device: &str,
    name: Option<&str>,
    now_ms: TimestampMs,
) -> Result<(bool, Queued), Fail> {
    let tx = c.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "SELECT display_name FROM devices WHERE user_id = $1 AND device_id = $2
             FOR NO KEY UPDATE",
        )
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&user, &device]).await? else {
        return Ok((false, Queued::default()));
    };
    let mut queued = Queued::default();
    if row.get::<_, Option<&str>>(0) != name {
        let update = tx
            .prepare_cached(
                "UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2",
            )
            .await?;
        tx.execute(&update, &[&user, &device, &name]).await?;
        queued = log_local_changes(&tx, &[Change::device(user, device)], now_ms).await?;
    }
    tx.commit().await?;
    Ok((true, queued))
}

/// Deletes each listed device that exists with everything that hangs off it
/// and logs one change per deleted device, in the order listed.
pub async fn delete_devices(
    c: &mut Object,
    user: &str,
    device_ids: &[String],
    now_ms: TimestampMs,
) -> Result<(Vec<String>, Queued), Fail> {
    const DELETES: &[&str] = &[
        "DELETE FROM access_tokens WHERE user_id = $1 AND device_id = ANY($2)",
        "DELETE FROM device_inbox WHERE user_id = $1 AND device_id = ANY($2)",
        "DELETE FROM device_keys WHERE user_id = $1 AND device_id = ANY($2)",
        "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = ANY($2)",
        "DELETE FROM claimed_one_time_keys WHERE user_id = $1 AND device_id = ANY($2)",
        "DELETE FROM fallback_keys WHERE user_id = $1 AND device_id = ANY($2)",
        "DELETE FROM e2ee_signatures WHERE target_user_id = $1 AND target_key_id = ANY($2)",
    ];
    let tx = c.transaction().await?;
    let mut sorted: Vec<&str> = device_ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    // The device rows first, in key order like the inbox writers: this waits
    // for writers holding their locks, so the deletes below (new snapshots)
    // see their rows, and later writers no longer find the devices.
    let stmt = tx
        .prepare_cached(
            "DELETE FROM devices WHERE (user_id, device_id) IN
                 (SELECT user_id, device_id FROM devices
                  WHERE user_id = $1 AND device_id = ANY($2)
                  ORDER BY device_id FOR UPDATE)
             RETURNING device_id",
        )
        .await?;
    let existed: BTreeSet<String> = tx
        .query(&stmt, &[&user, &sorted])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut deleted: Vec<String> = Vec::new();
    for device in device_ids {
        if existed.contains(device) && !deleted.contains(device) {
            deleted.push(device.clone());
        }
    }
    let mut queued = Queued::default();
    if !deleted.is_empty() {
        for sql in DELETES {
            let stmt = tx.prepare_cached(sql).await?;
            tx.execute(&stmt, &[&user, &deleted]).await?;
        }
        let changes: Vec<Change<'_>> = deleted.iter().map(|d| Change::device(user, d)).collect();
        queued = log_local_changes(&tx, &changes, now_ms).await?;
    }
    tx.commit().await?;
    Ok((deleted, queued))
}

/// Replaces each given kind; the signatures of a replaced public key go with
/// it. Logs one change when anything differed from what was stored.
pub async fn put_cross_signing_keys(
    c: &mut Object,
    user: &str,
    keys: &[NewCrossSigningKey],
    now_ms: TimestampMs,
) -> Result<Queued, Fail> {
    let tx = c.transaction().await?;
    let select = tx
        .prepare_cached(
            "SELECT public_key, key_json FROM cross_signing_keys
             WHERE user_id = $1 AND kind = $2 FOR UPDATE",
        )
        .await?;
    let drop_signatures = tx
        .prepare_cached(
            "DELETE FROM e2ee_signatures WHERE target_user_id = $1 AND target_key_id = $2",
        )
        .await?;
    let upsert = tx
        .prepare_cached(
            "INSERT INTO cross_signing_keys (user_id, kind, public_key, key_json)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, kind) DO UPDATE SET
                 public_key = excluded.public_key, key_json = excluded.key_json",
        )
        .await?;
    let mut changed = false;
    for key in keys {
        let kind = key.kind.as_str();
        if let Some(row) = tx.query_opt(&select, &[&user, &kind]).await? {
            let (public_key, key_json): (&str, &str) = (row.get(0), row.get(1));
            if public_key == key.public_key && key_json == key.key_json {
                continue;
            }
            if public_key != key.public_key {
                tx.execute(&drop_signatures, &[&user, &public_key]).await?;
            }
        }
        tx.execute(&upsert, &[&user, &kind, &key.public_key, &key.key_json])
            .await?;
        changed = true;
    }
    let mut queued = Queued::default();
    if changed {
        queued = log_local_changes(&tx, &[Change { user, device: None }], now_ms).await?;
    }
    tx.commit().await?;
    Ok(queued)
}

/// Stores new or changed signatures (one per signer key and target) and logs
/// one change per signed device or per user whose cross-signing keys got one.
pub async fn put_signatures(
    c: &mut Object,
    signatures: &[StoredSignature],
    now_ms: TimestampMs,
) -> Result<Queued, Fail> {
    let tx = c.transaction().await?;
    let upsert = tx
        .prepare_cached(
            "INSERT INTO e2ee_signatures
                 (target_user_id, target_key_id, signer_user_id, signer_key_id, signature)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (target_user_id, target_key_id, signer_user_id, signer_key_id)
                 DO UPDATE SET signature = excluded.signature
                 WHERE e2ee_signatures.signature <> excluded.signature",
        )
        .await?;
    let is_cross_signing = tx
        .prepare_cached("SELECT 1 FROM cross_signing_keys WHERE user_id = $1 AND public_key = $2")
        .await?;
    let mut changes: Vec<Change<'_>> = Vec::new();
    for s in signatures {
        let n = tx
            .execute(
                &upsert,
                &[
                    &s.target_user_id,
                    &s.target_key_id,
                    &s.signer_user_id,
                    &s.signer_key_id,
                    &s.signature,
                ],
            )
            .await?;
        if n == 0 {
            continue;
        }
        let cross_signing = tx
            .query_opt(&is_cross_signing, &[&s.target_user_id, &s.target_key_id])
            .await?
            .is_some();
        let change = Change {
            user: &s.target_user_id,
            device: (!cross_signing).then_some(s.target_key_id.as_str()),
        };
        if !changes.contains(&change) {
            changes.push(change);
        }
    }
    let queued = log_local_changes(&tx, &changes, now_ms).await?;
    tx.commit().await?;
    Ok(queued)
}
