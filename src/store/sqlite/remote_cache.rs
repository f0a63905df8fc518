//! SQL of the SQLite backend's cache of tracked remote users' device lists
//! (issue 16, `DeviceListStore`): reads, inbound updates with gap detection,
//! cross-signing keys from `m.signing_key_update`, resync snapshots and the
//! stale flag the resync scheduler reads back after a restart. Every change
//! of a cached list appends a change of the remote user to the change log
//! (`device_changes::append_change`, which queues nothing), so that
//! `users_with_changes` reports it to the users tracking it.

use rusqlite::{Connection, OptionalExtension};

use super::device_changes::append_change;
use crate::store::device_lists::{
    RemoteDevice, RemoteDeviceList, RemoteDeviceUpdate, RemoteSnapshot, RemoteUpdateReport,
    SnapshotOutcome,
};
use crate::store::{StoreError, TimestampMs};

/// The extremity and flags of one cached list.
struct ListState {
    stream_id: Option<i64>,
    stale: bool,
    seen_stream_id: Option<i64>,
    master_key_json: Option<String>,
    self_signing_key_json: Option<String>,
}

fn list_state(conn: &Connection, user: &str) -> Result<Option<ListState>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT stream_id, stale, seen_stream_id, master_key_json, self_signing_key_json
             FROM remote_device_lists WHERE user_id = ?1",
        )?
        .query_row([user], |row| {
            Ok(ListState {
                stream_id: row.get(0)?,
                stale: row.get(1)?,
                seen_stream_id: row.get(2)?,
                master_key_json: row.get(3)?,
                self_signing_key_json: row.get(4)?,
            })
        })
        .optional()?)
}

fn devices(conn: &Connection, user: &str) -> Result<Vec<RemoteDevice>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, keys_json, display_name FROM remote_devices
         WHERE user_id = ?1 ORDER BY device_id",
    )?;
    let rows = stmt.query_map([user], |row| {
        Ok(RemoteDevice {
            device_id: row.get(0)?,
            keys_json: row.get(1)?,
            display_name: row.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn remote_device_lists(
    conn: &Connection,
    users: &[String],
) -> Result<Vec<RemoteDeviceList>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT stream_id, stale, fetched_ts, master_key_json, self_signing_key_json, pushed_ts
         FROM remote_device_lists WHERE user_id = ?1",
    )?;
    let mut lists: Vec<RemoteDeviceList> = Vec::new();
    for user in users {
        if lists.iter().any(|l| &l.user_id == user) {
            continue;
        }
        let row = stmt
            .query_row([user], |row| {
                Ok(RemoteDeviceList {
                    user_id: user.clone(),
                    stream_id: row.get(0)?,
                    stale: row.get(1)?,
                    fetched_ts: row.get(2)?,
                    pushed_ts: row.get(5)?,
                    devices: Vec::new(),
                    master_key_json: row.get(3)?,
                    self_signing_key_json: row.get(4)?,
                })
            })
            .optional()?;
        if let Some(mut list) = row {
            list.devices = devices(conn, user)?;
            lists.push(list);
        }
    }
    Ok(lists)
}

/// Sets the stale flag (keeping an earlier `stale_since_ts`) and raises
/// `seen_stream_id` to `seen` if given.
fn set_stale(
    conn: &Connection,
    user: &str,
    seen: Option<i64>,
    now_ms: TimestampMs,
) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached(
            "UPDATE remote_device_lists SET
                 stale = 1,
                 stale_since_ts = CASE WHEN stale = 1 AND stale_since_ts IS NOT NULL
                                       THEN stale_since_ts ELSE ?3 END,
                 seen_stream_id = CASE WHEN ?2 IS NULL THEN seen_stream_id
                                       ELSE max(coalesce(seen_stream_id, ?2), ?2) END
             WHERE user_id = ?1",
        )?
        .execute((user, seen, now_ms))?)
}

/// Records that the user's server pushed an update about them
/// (`RemoteDeviceList::pushed_ts`).
fn mark_pushed(conn: &Connection, user: &str, now_ms: TimestampMs) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE remote_device_lists SET pushed_ts = ?2 WHERE user_id = ?1")?
        .execute((user, now_ms))?;
    Ok(())
}

/// See `DeviceListStore::apply_remote_device_updates`.
pub fn apply_updates(
    conn: &Connection,
    user: &str,
    updates: &[RemoteDeviceUpdate],
    now_ms: TimestampMs,
) -> Result<RemoteUpdateReport, StoreError> {
    let Some(state) = list_state(conn, user)? else {
        return Ok(RemoteUpdateReport::default());
    };
    mark_pushed(conn, user, now_ms)?;
    let mut report = RemoteUpdateReport {
        tracked: true,
        ..RemoteUpdateReport::default()
    };
    let highest = updates.iter().map(|u| u.stream_id).max();
    if state.stale {
        set_stale(conn, user, highest, now_ms)?;
        report.needs_resync = true;
        return Ok(report);
    }
    let mut extremity = state.stream_id;
    let mut applied: Vec<i64> = Vec::new();
    for (i, update) in updates.iter().enumerate() {
        if extremity.is_some_and(|e| update.stream_id <= e) {
            report.not_newer += 1;
            continue;
        }
        let known = |p: &i64| extremity.is_some_and(|e| *p <= e) || applied.contains(p);
        let gap = if update.prev_ids.is_empty() {
            extremity.is_some()
        } else {
            !update.prev_ids.iter().all(known)
        };
        if gap {
            let seen = updates[i..].iter().map(|u| u.stream_id).max();
            set_stale(conn, user, seen, now_ms)?;
            report.needs_resync = true;
            break;
        }
        if update.deleted {
            conn.prepare_cached(
                "DELETE FROM remote_devices WHERE user_id = ?1 AND device_id = ?2",
            )?
            .execute((user, &update.device_id))?;
        } else {
            conn.prepare_cached(
                "INSERT INTO remote_devices (user_id, device_id, keys_json, display_name)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET
                     keys_json = excluded.keys_json, display_name = excluded.display_name",
            )?
            .execute((
                user,
                &update.device_id,
                &update.keys_json,
                &update.display_name,
            ))?;
        }
        conn.prepare_cached(
            "UPDATE remote_device_lists SET stream_id = ?2,
                 seen_stream_id = max(coalesce(seen_stream_id, ?2), ?2)
             WHERE user_id = ?1",
        )?
        .execute((user, update.stream_id))?;
        append_change(conn, user, Some(&update.device_id), now_ms)?;
        extremity = Some(update.stream_id);
        applied.push(update.stream_id);
        report.applied += 1;
    }
    Ok(report)
}

/// See `DeviceListStore::put_remote_cross_signing`.
pub fn put_cross_signing(
    conn: &Connection,
    user: &str,
    master: Option<&str>,
    self_signing: Option<&str>,
    now_ms: TimestampMs,
) -> Result<bool, StoreError> {
    let Some(state) = list_state(conn, user)? else {
        return Ok(false);
    };
    mark_pushed(conn, user, now_ms)?;
    let master = master.map(str::to_owned).or(state.master_key_json.clone());
    let self_signing = self_signing
        .map(str::to_owned)
        .or(state.self_signing_key_json.clone());
    if master == state.master_key_json && self_signing == state.self_signing_key_json {
        return Ok(false);
    }
    conn.prepare_cached(
        "UPDATE remote_device_lists SET master_key_json = ?2, self_signing_key_json = ?3
         WHERE user_id = ?1",
    )?
    .execute((user, &master, &self_signing))?;
    append_change(conn, user, None, now_ms)?;
    Ok(true)
}

/// See `DeviceListStore::replace_remote_device_list`.
pub fn replace(
    conn: &Connection,
    snapshot: &RemoteSnapshot,
    now_ms: TimestampMs,
) -> Result<SnapshotOutcome, StoreError> {
    let user = snapshot.user_id.as_str();
    let Some(state) = list_state(conn, user)? else {
        return Ok(SnapshotOutcome::Untracked);
    };
    let mut wanted = snapshot.devices.clone();
    wanted.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    wanted.dedup_by(|a, b| a.device_id == b.device_id);
    let changed = devices(conn, user)? != wanted
        || state.master_key_json != snapshot.master_key_json
        || state.self_signing_key_json != snapshot.self_signing_key_json;
    let still_stale = state
        .seen_stream_id
        .is_some_and(|seen| seen > snapshot.stream_id);
    if changed {
        conn.prepare_cached("DELETE FROM remote_devices WHERE user_id = ?1")?
            .execute([user])?;
        let mut insert = conn.prepare_cached(
            "INSERT INTO remote_devices (user_id, device_id, keys_json, display_name)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for device in &wanted {
            insert.execute((
                user,
                &device.device_id,
                &device.keys_json,
                &device.display_name,
            ))?;
        }
        append_change(conn, user, None, now_ms)?;
    }
    conn.prepare_cached(
        "UPDATE remote_device_lists SET
             stream_id = ?2, fetched_ts = ?3, master_key_json = ?4, self_signing_key_json = ?5,
             stale = ?6,
             stale_since_ts = CASE WHEN ?6 THEN coalesce(stale_since_ts, ?3) ELSE NULL END
         WHERE user_id = ?1",
    )?
    .execute((
        user,
        snapshot.stream_id,
        now_ms,
        &snapshot.master_key_json,
        &snapshot.self_signing_key_json,
        still_stale,
    ))?;
    Ok(SnapshotOutcome::Stored {
        changed,
        still_stale,
    })
}

/// See `DeviceListStore::mark_remote_stale`.
pub fn mark_stale(
    conn: &Connection,
    users: &[String],
    now_ms: TimestampMs,
) -> Result<Vec<String>, StoreError> {
    let mut marked: Vec<String> = Vec::new();
    for user in users {
        if !marked.contains(user) && set_stale(conn, user, None, now_ms)? > 0 {
            marked.push(user.clone());
        }
    }
    Ok(marked)
}

/// See `DeviceListStore::stale_remote_users`.
pub fn stale_users(conn: &Connection, limit: u32) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM remote_device_lists WHERE stale = 1
         ORDER BY stale_since_ts, user_id LIMIT ?1",
    )?;
    let rows = stmt.query_map([i64::from(limit)], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Drops a cached list (nobody tracks the user any more).
pub fn drop_list(conn: &Connection, user: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM remote_devices WHERE user_id = ?1")?
        .execute([user])?;
    conn.prepare_cached("DELETE FROM remote_device_lists WHERE user_id = ?1")?
        .execute([user])?;
    Ok(())
}
