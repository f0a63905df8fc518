//! SQL of the PostgreSQL backend's cache of tracked remote users' device
//! lists (`DeviceListStore`, issue 16): reads, inbound updates with gap
//! detection, cross-signing keys, resync snapshots and the stale flag.
//!
//! Each writer locks the user's `remote_device_lists` row first (FOR
//! UPDATE), so one user's updates, snapshots and untracking take turns and
//! each sees the extremity the previous one left; a change it logs for the
//! remote user goes through `device_changes::log_changes` last (row lock,
//! then the change log's lock: the order every writer uses). A missing row
//! means nobody tracks the user: nothing is stored.
//!
//! Not here: validating what arrives (`e2ee` does, before calling), or
//! scheduling resyncs (`e2ee::resync` reads `stale_users`).

use std::collections::BTreeSet;

use deadpool_postgres::{GenericClient, Object, Transaction};

use super::Fail;
use super::device_changes::{Change, log_changes};
use super::device_list_outbox::woken_devices;
use crate::store::device_lists::{
    RemoteDevice, RemoteDeviceList, RemoteDeviceUpdate, RemoteSnapshot, RemoteUpdateReport,
    SnapshotOutcome,
};
use crate::store::{DeviceKey, TimestampMs};

/// The stored head of one cached list.
struct Head {
    stream_id: Option<i64>,
    stale: bool,
    seen_stream_id: Option<i64>,
    stale_since_ts: Option<i64>,
    fetched_ts: Option<i64>,
    pushed_ts: Option<i64>,
    master_key_json: Option<String>,
    self_signing_key_json: Option<String>,
}

const HEAD_COLUMNS: &str = "stream_id, stale, seen_stream_id, stale_since_ts, fetched_ts,
                            master_key_json, self_signing_key_json, pushed_ts";

async fn head(c: &impl GenericClient, user: &str, for_update: bool) -> Result<Option<Head>, Fail> {
    let sql = format!(
        "SELECT {HEAD_COLUMNS} FROM remote_device_lists WHERE user_id = $1{}",
        if for_update { " FOR UPDATE" } else { "" }
    );
    let stmt = c.prepare_cached(&sql).await?;
    Ok(c.query_opt(&stmt, &[&user]).await?.map(|r| Head {
        stream_id: r.get(0),
        stale: r.get(1),
        seen_stream_id: r.get(2),
        stale_since_ts: r.get(3),
        fetched_ts: r.get(4),
        master_key_json: r.get(5),
        self_signing_key_json: r.get(6),
        pushed_ts: r.get(7),
    }))
}

async fn write_head(tx: &Transaction<'_>, user: &str, h: &Head) -> Result<(), Fail> {
    let stmt = tx
        .prepare_cached(
            "UPDATE remote_device_lists SET stream_id = $2, stale = $3, seen_stream_id = $4,
                 stale_since_ts = $5, fetched_ts = $6, master_key_json = $7,
                 self_signing_key_json = $8, pushed_ts = $9
             WHERE user_id = $1",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &user,
            &h.stream_id,
            &h.stale,
            &h.seen_stream_id,
            &h.stale_since_ts,
            &h.fetched_ts,
            &h.master_key_json,
            &h.self_signing_key_json,
            &h.pushed_ts,
        ],
    )
    .await?;
    Ok(())
}

/// A user's cached devices, sorted by device ID.
async fn devices(c: &impl GenericClient, user: &str) -> Result<Vec<RemoteDevice>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT device_id, keys_json, display_name FROM remote_devices
             WHERE user_id = $1 ORDER BY device_id",
        )
        .await?;
    Ok(c.query(&stmt, &[&user])
        .await?
        .iter()
        .map(|r| RemoteDevice {
            device_id: r.get(0),
            keys_json: r.get(1),
            display_name: r.get(2),
        })
        .collect())
}

/// The cached lists of those of `users` that have one, in the order asked,
/// read in one snapshot.
pub async fn lists(c: &mut Object, users: &[String]) -> Result<Vec<RemoteDeviceList>, Fail> {
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut out = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    for user in users {
        if !done.insert(user) {
            continue;
        }
        let Some(h) = head(&tx, user, false).await? else {
            continue;
        };
        out.push(RemoteDeviceList {
            user_id: user.clone(),
            stream_id: h.stream_id,
            stale: h.stale,
            fetched_ts: h.fetched_ts,
            pushed_ts: h.pushed_ts,
            devices: devices(&tx, user).await?,
            master_key_json: h.master_key_json,
            self_signing_key_json: h.self_signing_key_json,
        });
    }
    tx.commit().await?;
    Ok(out)
}

/// Applies updates in the order given (see
/// `DeviceListStore::apply_remote_device_updates` for the gap rules).
/// Returns the report and the trackers' devices to wake.
pub async fn apply_updates(
    c: &mut Object,
    user: &str,
    updates: &[RemoteDeviceUpdate],
    now_ms: TimestampMs,
) -> Result<(RemoteUpdateReport, Vec<DeviceKey>), Fail> {
    let tx = c.transaction().await?;
    let Some(mut h) = head(&tx, user, true).await? else {
        tx.rollback().await?;
        return Ok((RemoteUpdateReport::default(), Vec::new()));
    };
    let upsert = tx
        .prepare_cached(
            "INSERT INTO remote_devices (user_id, device_id, keys_json, display_name)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id, device_id) DO UPDATE SET
                 keys_json = excluded.keys_json, display_name = excluded.display_name",
        )
        .await?;
    let delete = tx
        .prepare_cached("DELETE FROM remote_devices WHERE user_id = $1 AND device_id = $2")
        .await?;
    h.pushed_ts = Some(now_ms);
    let mut report = RemoteUpdateReport {
        tracked: true,
        ..RemoteUpdateReport::default()
    };
    let mut changes: Vec<Change<'_>> = Vec::new();
    if h.stale {
        // Nothing applies until the resync; remember what was seen.
        raise_seen(&mut h, updates.iter().map(|u| u.stream_id));
        if h.stale_since_ts.is_none() {
            h.stale_since_ts = Some(now_ms);
        }
    }
    for (i, u) in updates.iter().enumerate() {
        if h.stale {
            break;
        }
        if h.stream_id
            .is_some_and(|extremity| u.stream_id <= extremity)
        {
            report.not_newer += 1;
            continue;
        }
        // Updates applied earlier in this call are at most the extremity.
        let gap = match h.stream_id {
            Some(extremity) => {
                u.prev_ids.is_empty() || u.prev_ids.iter().any(|prev| *prev > extremity)
            }
            None => !u.prev_ids.is_empty(),
        };
        if gap {
            h.stale = true;
            h.stale_since_ts = Some(now_ms);
            raise_seen(&mut h, updates[i..].iter().map(|u| u.stream_id));
            break;
        }
        if u.deleted {
            tx.execute(&delete, &[&user, &u.device_id]).await?;
        } else {
            tx.execute(
                &upsert,
                &[&user, &u.device_id, &u.keys_json, &u.display_name],
            )
            .await?;
        }
        h.stream_id = Some(u.stream_id);
        raise_seen(&mut h, [u.stream_id]);
        report.applied += 1;
        changes.push(Change::device(user, &u.device_id));
    }
    report.needs_resync = h.stale;
    write_head(&tx, user, &h).await?;
    log_changes(&tx, &changes, now_ms).await?;
    let woken = if changes.is_empty() {
        Vec::new()
    } else {
        woken_devices(&tx, &[user]).await?
    };
    tx.commit().await?;
    Ok((report, woken))
}

/// Raises the highest stream_id seen to the highest of `streams`.
fn raise_seen(h: &mut Head, streams: impl IntoIterator<Item = i64>) {
    for stream in streams {
        h.seen_stream_id = Some(h.seen_stream_id.map_or(stream, |s| s.max(stream)));
    }
}

/// Stores cross-signing keys (`None` keeps the cached one). Returns whether
/// the user is tracked and something changed.
pub async fn put_cross_signing(
    c: &mut Object,
    user: &str,
    (master, self_signing): (Option<&str>, Option<&str>),
    now_ms: TimestampMs,
) -> Result<(bool, Vec<DeviceKey>), Fail> {
    let tx = c.transaction().await?;
    let Some(mut h) = head(&tx, user, true).await? else {
        tx.rollback().await?;
        return Ok((false, Vec::new()));
    };
    let new_master = master.map(str::to_owned).or(h.master_key_json.clone());
    let new_self_signing = self_signing
        .map(str::to_owned)
        .or(h.self_signing_key_json.clone());
    h.pushed_ts = Some(now_ms);
    if new_master == h.master_key_json && new_self_signing == h.self_signing_key_json {
        write_head(&tx, user, &h).await?;
        tx.commit().await?;
        return Ok((false, Vec::new()));
    }
    h.master_key_json = new_master;
    h.self_signing_key_json = new_self_signing;
    write_head(&tx, user, &h).await?;
    log_changes(&tx, &[Change { user, device: None }], now_ms).await?;
    let woken = woken_devices(&tx, &[user]).await?;
    tx.commit().await?;
    Ok((true, woken))
}

/// Replaces a cached list with a resync's snapshot.
pub async fn replace(
    c: &mut Object,
    snapshot: &RemoteSnapshot,
    now_ms: TimestampMs,
) -> Result<(SnapshotOutcome, Vec<DeviceKey>), Fail> {
    let user = snapshot.user_id.as_str();
    let tx = c.transaction().await?;
    let Some(mut h) = head(&tx, user, true).await? else {
        tx.rollback().await?;
        return Ok((SnapshotOutcome::Untracked, Vec::new()));
    };
    let mut fresh: Vec<&RemoteDevice> = snapshot.devices.iter().collect();
    fresh.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    fresh.dedup_by(|a, b| a.device_id == b.device_id);
    let before = devices(&tx, user).await?;
    let changed = before.len() != fresh.len()
        || before.iter().zip(&fresh).any(|(a, b)| a != *b)
        || h.master_key_json != snapshot.master_key_json
        || h.self_signing_key_json != snapshot.self_signing_key_json;
    if changed {
        let clear = tx
            .prepare_cached("DELETE FROM remote_devices WHERE user_id = $1")
            .await?;
        tx.execute(&clear, &[&user]).await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO remote_devices (user_id, device_id, keys_json, display_name)
                 VALUES ($1, $2, $3, $4)",
            )
            .await?;
        for d in &fresh {
            tx.execute(
                &insert,
                &[&user, &d.device_id, &d.keys_json, &d.display_name],
            )
            .await?;
        }
    }
    let still_stale = h
        .seen_stream_id
        .is_some_and(|seen| seen > snapshot.stream_id);
    h.stale_since_ts = match (still_stale, h.stale) {
        (false, _) => None,
        (true, true) => h.stale_since_ts.or(Some(now_ms)),
        (true, false) => Some(now_ms),
    };
    h.stale = still_stale;
    h.stream_id = Some(snapshot.stream_id);
    raise_seen(&mut h, [snapshot.stream_id]);
    h.fetched_ts = Some(now_ms);
    h.master_key_json = snapshot.master_key_json.clone();
    h.self_signing_key_json = snapshot.self_signing_key_json.clone();
    write_head(&tx, user, &h).await?;
    let mut woken = Vec::new();
    if changed {
        log_changes(&tx, &[Change { user, device: None }], now_ms).await?;
        woken = woken_devices(&tx, &[user]).await?;
    }
    tx.commit().await?;
    Ok((
        SnapshotOutcome::Stored {
            changed,
            still_stale,
        },
        woken,
    ))
}

/// Marks cached lists stale (keeping the time of an earlier mark). Returns
/// those of `users` with a cached list, in the order asked.
pub async fn mark_stale(
    c: &Object,
    users: &[String],
    now_ms: TimestampMs,
) -> Result<Vec<String>, Fail> {
    let stmt = c
        .prepare_cached(
            "UPDATE remote_device_lists SET stale = true,
                 stale_since_ts = CASE WHEN stale THEN coalesce(stale_since_ts, $2) ELSE $2 END
             WHERE user_id = ANY($1)
             RETURNING user_id",
        )
        .await?;
    let marked: BTreeSet<String> = c
        .query(&stmt, &[&users, &now_ms])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for user in users {
        if marked.contains(user) && !out.contains(user) {
            out.push(user.clone());
        }
    }
    Ok(out)
}

/// Up to `limit` stale users, longest stale first.
pub async fn stale_users(c: &Object, limit: u32) -> Result<Vec<String>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT user_id FROM remote_device_lists WHERE stale
             ORDER BY stale_since_ts, user_id LIMIT $1",
        )
        .await?;
    Ok(c.query(&stmt, &[&i64::from(limit)])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
