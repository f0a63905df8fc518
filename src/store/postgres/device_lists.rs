//! The PostgreSQL backend's `DeviceListStore` (issue 16, DESIGN §7): the
//! impl, and the SQL of interest (which servers get a local user's
//! updates) and tracking (which users each local user follows, with the
//! `left` entries of the change log). The remote cache's SQL is in
//! `remote_devices.rs`, the outbound EDUs in `device_list_outbox.rs`
//! (tables in `migrations/postgres/0005_device_lists.sql`). Each method is
//! one transaction (or one statement), answered after its commit; writes
//! that log changes publish wake-ups for the devices of the trackers on
//! other workers.

use std::collections::BTreeSet;

use deadpool_postgres::Object;

use super::Fail;
use super::device_changes::log_left;
use super::device_list_outbox::{destinations, woken_devices};
use super::remote_devices;
use crate::store::device_lists::{
    DeviceListStore, Interest, NewInterest, RemoteDeviceList, RemoteDeviceUpdate, RemoteSnapshot,
    RemoteUpdateReport, SnapshotOutcome, TrackSource, TrackTarget,
};
use crate::store::{DeviceKey, StoreFuture, TimestampMs, Wakeup};

/// Runs `$body` (with `$c: &mut Object`) through `PostgresStore::run`.
macro_rules! with_client {
    ($self:expr, |$c:ident| $body:expr) => {
        $self.run(move |$c: Object| async move {
            #[allow(unused_mut)]
            let mut $c = $c;
            let result = $body;
            ($c, result)
        })
    };
}

impl super::PostgresStore {
    /// Publishes a device wake-up for other workers, if there are devices.
    pub(super) fn wake_devices(&self, devices: Vec<DeviceKey>) {
        if !devices.is_empty() {
            self.publish(vec![Wakeup::Devices(devices)]);
        }
    }
}

impl DeviceListStore for super::PostgresStore {
    fn add_device_list_interest(
        &self,
        interests: Vec<NewInterest>,
        _now_ms: TimestampMs,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let interests = &interests;
            with_client!(self, |c| add_interest(&mut c, interests).await).await
        })
    }

    fn remove_device_list_interest<'a>(
        &'a self,
        user_id: &'a str,
        destinations: Vec<String>,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let destinations = &destinations;
            with_client!(self, |c| {
                async {
                    let stmt = c
                        .prepare_cached(
                            "DELETE FROM device_list_interest
                             WHERE user_id = $1 AND destination = ANY($2)",
                        )
                        .await?;
                    Ok(c.execute(&stmt, &[&user_id, destinations]).await?)
                }
                .await
            })
            .await
        })
    }

    fn device_list_interest<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<Interest>> {
        Box::pin(with_client!(self, |c| {
            async {
                let stmt = c
                    .prepare_cached(
                        "SELECT destination, expires_ts FROM device_list_interest
                         WHERE user_id = $1 ORDER BY destination",
                    )
                    .await?;
                Ok(c.query(&stmt, &[&user_id])
                    .await?
                    .iter()
                    .map(|r| Interest {
                        destination: r.get(0),
                        expires_ts: r.get(1),
                    })
                    .collect())
            }
            .await
        }))
    }

    fn device_list_destinations<'a>(
        &'a self,
        user_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(with_client!(self, |c| destinations(&c, user_id, now_ms).await))
    }

    fn track_users<'a>(
        &'a self,
        tracker: &'a str,
        targets: Vec<TrackTarget>,
        source: TrackSource,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let targets = &targets;
            with_client!(self, |c| track_users(
                &mut c, tracker, targets, source, now_ms
            )
            .await)
            .await
        })
    }

    fn untrack_users<'a>(
        &'a self,
        tracker: &'a str,
        users: Vec<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let users = &users;
            let (untracked, woken) =
                with_client!(self, |c| untrack_users(&mut c, tracker, users, now_ms)
                    .await)
                .await?;
            self.wake_devices(woken);
            Ok(untracked)
        })
    }

    fn tracked_users<'a>(&'a self, tracker: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(with_client!(self, |c| {
            async {
                let stmt = c
                    .prepare_cached(
                        "SELECT user_id FROM device_list_trackers WHERE tracker = $1
                         ORDER BY user_id",
                    )
                    .await?;
                Ok(c.query(&stmt, &[&tracker])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect())
            }
            .await
        }))
    }

    fn tracker_devices(&self, users: Vec<String>) -> StoreFuture<'_, Vec<DeviceKey>> {
        Box::pin(async move {
            let users = &users;
            with_client!(self, |c| {
                async {
                    let stmt = c
                        .prepare_cached(
                            "SELECT DISTINCT d.user_id, d.device_id FROM device_list_trackers t
                             JOIN devices d ON d.user_id = t.tracker
                             WHERE t.user_id = ANY($1)
                             ORDER BY 1, 2",
                        )
                        .await?;
                    Ok(c.query(&stmt, &[users])
                        .await?
                        .iter()
                        .map(|r| DeviceKey {
                            user_id: r.get(0),
                            device_id: r.get(1),
                        })
                        .collect())
                }
                .await
            })
            .await
        })
    }

    fn left_users<'a>(
        &'a self,
        tracker: &'a str,
        after: i64,
        up_to: i64,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(with_client!(self, |c| {
            async {
                let stmt = c
                    .prepare_cached(
                        "SELECT DISTINCT user_id FROM device_list_changes
                         WHERE left_for = $1 AND position > $2 AND position <= $3
                         ORDER BY user_id",
                    )
                    .await?;
                Ok(c.query(&stmt, &[&tracker, &after, &up_to])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect())
            }
            .await
        }))
    }

    fn remote_device_lists(&self, users: Vec<String>) -> StoreFuture<'_, Vec<RemoteDeviceList>> {
        Box::pin(async move {
            let users = &users;
            with_client!(self, |c| remote_devices::lists(&mut c, users).await).await
        })
    }

    fn apply_remote_device_updates<'a>(
        &'a self,
        user_id: &'a str,
        updates: Vec<RemoteDeviceUpdate>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, RemoteUpdateReport> {
        Box::pin(async move {
            let updates = &updates;
            let (report, woken) = with_client!(self, |c| remote_devices::apply_updates(
                &mut c, user_id, updates, now_ms
            )
            .await)
            .await?;
            self.wake_devices(woken);
            Ok(report)
        })
    }

    fn put_remote_cross_signing<'a>(
        &'a self,
        user_id: &'a str,
        master_key_json: Option<String>,
        self_signing_key_json: Option<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let keys = (master_key_json.as_deref(), self_signing_key_json.as_deref());
            let (changed, woken) = with_client!(self, |c| remote_devices::put_cross_signing(
                &mut c, user_id, keys, now_ms
            )
            .await)
            .await?;
            self.wake_devices(woken);
            Ok(changed)
        })
    }

    fn replace_remote_device_list(
        &self,
        snapshot: RemoteSnapshot,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, SnapshotOutcome> {
        Box::pin(async move {
            let snapshot = &snapshot;
            let (outcome, woken) =
                with_client!(self, |c| remote_devices::replace(&mut c, snapshot, now_ms)
                    .await)
                .await?;
            self.wake_devices(woken);
            Ok(outcome)
        })
    }

    fn mark_remote_stale(
        &self,
        users: Vec<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let users = &users;
            with_client!(self, |c| remote_devices::mark_stale(&c, users, now_ms)
                .await)
            .await
        })
    }

    fn stale_remote_users(&self, limit: u32) -> StoreFuture<'_, Vec<String>> {
        Box::pin(with_client!(self, |c| remote_devices::stale_users(
            &c, limit
        )
        .await))
    }
}

// --- interest -------------------------------------------------------------------

/// Upserts each interest: the later expiry wins, and none beats any time.
async fn add_interest(c: &mut Object, interests: &[NewInterest]) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    let upsert = tx
        .prepare_cached(
            "INSERT INTO device_list_interest (user_id, destination, expires_ts)
             VALUES ($1, $2, $3)
             ON CONFLICT (user_id, destination) DO UPDATE SET expires_ts =
                 CASE WHEN device_list_interest.expires_ts IS NULL
                           OR excluded.expires_ts IS NULL THEN NULL
                      ELSE greatest(device_list_interest.expires_ts, excluded.expires_ts)
                 END",
        )
        .await?;
    // In key order, so concurrent upserts of overlapping sets take their row
    // locks in one order.
    let mut sorted: Vec<&NewInterest> = interests.iter().collect();
    sorted.sort_by(|a, b| (&a.user_id, &a.destination).cmp(&(&b.user_id, &b.destination)));
    for i in sorted {
        tx.execute(&upsert, &[&i.user_id, &i.destination, &i.expires_ts])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

// --- tracking -------------------------------------------------------------------

async fn track_users(
    c: &mut Object,
    tracker: &str,
    targets: &[TrackTarget],
    source: TrackSource,
    now_ms: TimestampMs,
) -> Result<Vec<String>, Fail> {
    let source = match source {
        TrackSource::Query => "query",
        TrackSource::Homeserver => "homeserver",
    };
    let tx = c.transaction().await?;
    // A homeserver-named row stays homeserver-named; a refresh moves the time.
    let upsert = tx
        .prepare_cached(
            "INSERT INTO device_list_trackers (tracker, user_id, source, since_ts)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (tracker, user_id) DO UPDATE SET
                 source = CASE WHEN device_list_trackers.source = 'homeserver'
                               THEN 'homeserver' ELSE excluded.source END,
                 since_ts = greatest(device_list_trackers.since_ts, excluded.since_ts)",
        )
        .await?;
    // Creates the cached list, or locks the existing one: an untrack that
    // would drop it waits for this commit and then sees the new tracker.
    let list = tx
        .prepare_cached(
            "INSERT INTO remote_device_lists (user_id, stream_id, stale, stale_since_ts)
             VALUES ($1, NULL, true, $2)
             ON CONFLICT (user_id) DO UPDATE SET stale = remote_device_lists.stale
             RETURNING stale",
        )
        .await?;
    let mut sorted: Vec<&TrackTarget> = targets.iter().collect();
    sorted.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    sorted.dedup_by(|a, b| a.user_id == b.user_id);
    let mut stale_set: BTreeSet<&str> = BTreeSet::new();
    for target in sorted {
        if target.remote {
            let row = tx.query_one(&list, &[&target.user_id, &now_ms]).await?;
            if row.get::<_, bool>(0) {
                stale_set.insert(&target.user_id);
            }
        }
        tx.execute(&upsert, &[&tracker, &target.user_id, &source, &now_ms])
            .await?;
    }
    tx.commit().await?;
    // In the order given.
    let mut stale: Vec<String> = Vec::new();
    for target in targets {
        if stale_set.contains(target.user_id.as_str()) && !stale.contains(&target.user_id) {
            stale.push(target.user_id.clone());
        }
    }
    Ok(stale)
}

/// Returns the users that were tracked (in the order asked) and the
/// tracker's devices to wake.
async fn untrack_users(
    c: &mut Object,
    tracker: &str,
    users: &[String],
    now_ms: TimestampMs,
) -> Result<(Vec<String>, Vec<DeviceKey>), Fail> {
    let tx = c.transaction().await?;
    let sorted: Vec<&str> = users
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let delete = tx
        .prepare_cached(
            "DELETE FROM device_list_trackers WHERE tracker = $1 AND user_id = ANY($2)
             RETURNING user_id",
        )
        .await?;
    let gone: BTreeSet<String> = tx
        .query(&delete, &[&tracker, &sorted])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut untracked: Vec<String> = Vec::new();
    for user in users {
        if gone.contains(user) && !untracked.contains(user) {
            untracked.push(user.clone());
        }
    }
    if untracked.is_empty() {
        tx.rollback().await?;
        return Ok((untracked, Vec::new()));
    }
    // Lock the cached lists first (the order the remote cache's writers
    // take them: list, then the change log); a concurrent track of the user
    // holds its list's lock, so the statement after this one sees its
    // tracker row.
    let orphans: Vec<&str> = gone.iter().map(String::as_str).collect();
    let lock_lists = tx
        .prepare_cached(
            "SELECT user_id FROM remote_device_lists WHERE user_id = ANY($1)
             ORDER BY user_id FOR UPDATE",
        )
        .await?;
    tx.query(&lock_lists, &[&orphans]).await?;
    log_left(&tx, tracker, &untracked, now_ms).await?;
    let drop_lists = tx
        .prepare_cached(
            "DELETE FROM remote_device_lists l WHERE l.user_id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM device_list_trackers t WHERE t.user_id = l.user_id)
             RETURNING user_id",
        )
        .await?;
    let dropped: Vec<String> = tx
        .query(&drop_lists, &[&orphans])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !dropped.is_empty() {
        let drop_devices = tx
            .prepare_cached("DELETE FROM remote_devices WHERE user_id = ANY($1)")
            .await?;
        tx.execute(&drop_devices, &[&dropped]).await?;
    }
    let woken = woken_devices(&tx, &[tracker]).await?;
    tx.commit().await?;
    Ok((untracked, own_devices(woken, tracker)))
}

/// Keeps the devices of `user` only.
fn own_devices(devices: Vec<DeviceKey>, user: &str) -> Vec<DeviceKey> {
    devices.into_iter().filter(|d| d.user_id == user).collect()
}
