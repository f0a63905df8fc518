//! The SQLite backend's `DeviceListStore` (issue 16): the impl, and the SQL
//! of interest (which servers get a local user's device-list EDUs) and of
//! tracking (which users each local user follows, and the `left` entries of
//! the change log). The remote cache's SQL is in `remote_cache.rs`, the
//! outbound EDUs' in `device_list_outbox.rs`; tables in
//! `migrations/sqlite/0004_device_lists.sql`. Writes run on the writer
//! thread, each one transaction; reads on a pooled reader.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension};

use super::device_changes::log_left;
use super::device_list_outbox::destinations;
use super::remote_cache;
use crate::store::device_lists::{
    DeviceListStore, Interest, NewInterest, RemoteDeviceList, RemoteDeviceUpdate, RemoteSnapshot,
    RemoteUpdateReport, SnapshotOutcome, TrackSource, TrackTarget,
};
use crate::store::{DeviceKey, StoreError, StoreFuture, TimestampMs};

impl DeviceListStore for super::SqliteStore {
    fn add_device_list_interest(
        &self,
        interests: Vec<NewInterest>,
        _now_ms: TimestampMs,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c| add_interest(c, &interests)))
    }

    fn remove_device_list_interest<'a>(
        &'a self,
        user_id: &'a str,
        destinations: Vec<String>,
    ) -> StoreFuture<'a, u64> {
        let user_id = user_id.to_owned();
        Box::pin(self.write(move |c| remove_interest(c, &user_id, &destinations)))
    }

    fn device_list_interest<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<Interest>> {
        let user_id = user_id.to_owned();
        Box::pin(self.read(move |c| interests(c, &user_id)))
    }

    fn device_list_destinations<'a>(
        &'a self,
        user_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        let user_id = user_id.to_owned();
        Box::pin(self.read(move |c| destinations(c, &user_id, now_ms)))
    }

    fn track_users<'a>(
        &'a self,
        tracker: &'a str,
        targets: Vec<TrackTarget>,
        source: TrackSource,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        let tracker = tracker.to_owned();
        Box::pin(self.write(move |c| track_users(c, &tracker, &targets, source, now_ms)))
    }

    fn untrack_users<'a>(
        &'a self,
        tracker: &'a str,
        users: Vec<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        let tracker = tracker.to_owned();
        Box::pin(self.write(move |c| untrack_users(c, &tracker, &users, now_ms)))
    }

    fn tracked_users<'a>(&'a self, tracker: &'a str) -> StoreFuture<'a, Vec<String>> {
        let tracker = tracker.to_owned();
        Box::pin(self.read(move |c| tracked_users(c, &tracker)))
    }

    fn tracker_devices(&self, users: Vec<String>) -> StoreFuture<'_, Vec<DeviceKey>> {
        Box::pin(self.read(move |c| tracker_devices(c, &users)))
    }

    fn left_users<'a>(
        &'a self,
        tracker: &'a str,
        after: i64,
        up_to: i64,
    ) -> StoreFuture<'a, Vec<String>> {
        let tracker = tracker.to_owned();
        Box::pin(self.read(move |c| left_users(c, &tracker, after, up_to)))
    }

    fn remote_device_lists(&self, users: Vec<String>) -> StoreFuture<'_, Vec<RemoteDeviceList>> {
        Box::pin(self.read(move |c| {
            // One snapshot for the whole answer.
            let tx = c.unchecked_transaction()?;
            let lists = remote_cache::remote_device_lists(&tx, &users)?;
            tx.commit()?;
            Ok(lists)
        }))
    }

    fn apply_remote_device_updates<'a>(
        &'a self,
        user_id: &'a str,
        updates: Vec<RemoteDeviceUpdate>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, RemoteUpdateReport> {
        let user_id = user_id.to_owned();
        Box::pin(self.write(move |c| remote_cache::apply_updates(c, &user_id, &updates, now_ms)))
    }

    fn put_remote_cross_signing<'a>(
        &'a self,
        user_id: &'a str,
        master_key_json: Option<String>,
        self_signing_key_json: Option<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, bool> {
        let user_id = user_id.to_owned();
        Box::pin(self.write(move |c| {
            remote_cache::put_cross_signing(
                c,
                &user_id,
                master_key_json.as_deref(),
                self_signing_key_json.as_deref(),
                now_ms,
            )
        }))
    }

    fn replace_remote_device_list(
        &self,
        snapshot: RemoteSnapshot,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, SnapshotOutcome> {
        Box::pin(self.write(move |c| remote_cache::replace(c, &snapshot, now_ms)))
    }

    fn mark_remote_stale(
        &self,
        users: Vec<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.write(move |c| remote_cache::mark_stale(c, &users, now_ms)))
    }

    fn stale_remote_users(&self, limit: u32) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.read(move |c| remote_cache::stale_users(c, limit)))
    }
}

// --- interest --------------------------------------------------------------------

/// Upserts; the later expiry wins and no expiry (NULL) beats any time.
fn add_interest(conn: &Connection, interests: &[NewInterest]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO device_list_interest (user_id, destination, expires_ts)
         VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, destination) DO UPDATE SET expires_ts =
             CASE WHEN device_list_interest.expires_ts IS NULL OR excluded.expires_ts IS NULL
                  THEN NULL
                  ELSE max(device_list_interest.expires_ts, excluded.expires_ts) END",
    )?;
    for i in interests {
        stmt.execute((&i.user_id, &i.destination, i.expires_ts))?;
    }
    Ok(())
}

fn remove_interest(
    conn: &Connection,
    user: &str,
    destinations: &[String],
) -> Result<u64, StoreError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM device_list_interest WHERE user_id = ?1 AND destination = ?2",
    )?;
    let mut removed = 0u64;
    let unique: BTreeSet<&str> = destinations.iter().map(String::as_str).collect();
    for destination in unique {
        removed += stmt.execute((user, destination))? as u64;
    }
    Ok(removed)
}

fn interests(conn: &Connection, user: &str) -> Result<Vec<Interest>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT destination, expires_ts FROM device_list_interest
         WHERE user_id = ?1 ORDER BY destination",
    )?;
    let rows = stmt.query_map([user], |row| {
        Ok(Interest {
            destination: row.get(0)?,
            expires_ts: row.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// --- tracking --------------------------------------------------------------------

fn source_name(source: TrackSource) -> &'static str {
    match source {
        TrackSource::Query => "query",
        TrackSource::Homeserver => "homeserver",
    }
}

/// Upserts the tracking rows (a homeserver-named row stays one) and creates
/// a stale cached list for each remote target without one. Returns the
/// remote targets whose list is stale afterwards, in the order given.
fn track_users(
    conn: &Connection,
    tracker: &str,
    targets: &[TrackTarget],
    source: TrackSource,
    now_ms: TimestampMs,
) -> Result<Vec<String>, StoreError> {
    let mut track = conn.prepare_cached(
        "INSERT INTO device_list_trackers (tracker, user_id, source, since_ts)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tracker, user_id) DO UPDATE SET
             since_ts = excluded.since_ts,
             source = CASE WHEN device_list_trackers.source = 'homeserver'
                           THEN 'homeserver' ELSE excluded.source END",
    )?;
    let mut create = conn.prepare_cached(
        "INSERT INTO remote_device_lists (user_id, stale, stale_since_ts) VALUES (?1, 1, ?2)
         ON CONFLICT (user_id) DO NOTHING",
    )?;
    let mut is_stale =
        conn.prepare_cached("SELECT 1 FROM remote_device_lists WHERE user_id = ?1 AND stale = 1")?;
    let mut stale = Vec::new();
    for target in targets {
        track.execute((tracker, &target.user_id, source_name(source), now_ms))?;
        if !target.remote {
            continue;
        }
        create.execute((&target.user_id, now_ms))?;
        let needs = is_stale
            .query_row([&target.user_id], |_| Ok(()))
            .optional()?
            .is_some();
        if needs && !stale.contains(&target.user_id) {
            stale.push(target.user_id.clone());
        }
    }
    Ok(stale)
}

/// Deletes the tracking rows, logs a `left` entry per user that was
/// tracked, and drops the cached list of a user nobody tracks any more.
fn untrack_users(
    conn: &Connection,
    tracker: &str,
    users: &[String],
    now_ms: TimestampMs,
) -> Result<Vec<String>, StoreError> {
    let mut untrack = conn
        .prepare_cached("DELETE FROM device_list_trackers WHERE tracker = ?1 AND user_id = ?2")?;
    let mut still = conn.prepare_cached("SELECT 1 FROM device_list_trackers WHERE user_id = ?1")?;
    let mut was_tracked = Vec::new();
    for user in users {
        if was_tracked.contains(user) || untrack.execute((tracker, user))? == 0 {
            continue;
        }
        log_left(conn, tracker, user, now_ms)?;
        if still.query_row([user], |_| Ok(())).optional()?.is_none() {
            remote_cache::drop_list(conn, user)?;
        }
        was_tracked.push(user.clone());
    }
    Ok(was_tracked)
}

fn tracked_users(conn: &Connection, tracker: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM device_list_trackers WHERE tracker = ?1 ORDER BY user_id",
    )?;
    let rows = stmt.query_map([tracker], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn tracker_devices(conn: &Connection, users: &[String]) -> Result<Vec<DeviceKey>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.user_id, d.device_id FROM device_list_trackers t
         JOIN devices d ON d.user_id = t.tracker
         WHERE t.user_id = ?1",
    )?;
    let mut found: BTreeSet<(String, String)> = BTreeSet::new();
    for user in users {
        let rows = stmt.query_map([user], |row| Ok((row.get(0)?, row.get(1)?)))?;
        for row in rows {
            found.insert(row?);
        }
    }
    Ok(found
        .into_iter()
        .map(|(user_id, device_id)| DeviceKey { user_id, device_id })
        .collect())
}

fn left_users(
    conn: &Connection,
    tracker: &str,
    after: i64,
    up_to: i64,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT user_id FROM device_list_changes
         WHERE left_for = ?1 AND position > ?2 AND position <= ?3 ORDER BY user_id",
    )?;
    let rows = stmt.query_map((tracker, after, up_to), |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
