//! The outbound device-list EDUs of the PostgreSQL backend (issue 16,
//! DESIGN §7): queueing them in the transaction of each local change,
//! coalescing a queued one that a newer change of the same device
//! supersedes, the `prev_id` chain that `peek_outbox` hands the sender, and
//! the per-destination acknowledged stream that `ack_txn` records.
//!
//! Concurrency: `log_local_changes` queues after `device_changes::log_changes`
//! took the change log's lock, which every change writer holds until its
//! commit. So the coalescing delete, the content read and the insert each
//! see every earlier writer's committed rows (READ COMMITTED: a snapshot
//! per statement): two workers changing one device in turn leave one row,
//! with the newer state and stream_id, and seqs of one user's rows grow
//! with their stream_ids. A row in the destination's in-flight transaction
//! is never deleted (its bytes may already be on the wire).
//!
//! Not here: the EDU JSON (`store::device_lists` builds it), sending.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::{GenericClient, Transaction};

use super::Fail;
use super::device_changes::{Change, log_changes};
use super::keys::{cross_signing_keys, user_devices};
use crate::store::device_lists::{
    OutboundDeviceList, device_list_update_edu, signing_key_update_edu,
};
use crate::store::keys::DeviceQuery;
use crate::store::{DeviceKey, TimestampMs, Wakeup};

/// What a change did beyond its own rows, to publish and count once it has
/// committed (a retried attempt's work is not counted twice).
#[derive(Debug, Default)]
pub struct Queued {
    /// Destinations that got a new outbox row, sorted.
    pub destinations: BTreeSet<String>,
    /// Devices to wake: those of the changed users and of their local
    /// trackers.
    pub devices: Vec<DeviceKey>,
    /// Rows inserted.
    pub queued: u64,
    /// Queued rows deleted as superseded.
    pub coalesced: u64,
}

impl Queued {
    /// The wake-ups for other workers.
    pub fn wakeups(&self) -> Vec<Wakeup> {
        let mut wakeups = Vec::new();
        if !self.devices.is_empty() {
            wakeups.push(Wakeup::Devices(self.devices.clone()));
        }
        wakeups.extend(self.destinations.iter().cloned().map(Wakeup::Destination));
        wakeups
    }
}

impl super::PostgresStore {
    /// After a committed change: counts its queued and coalesced rows and
    /// publishes its wake-ups.
    pub(super) fn settle(&self, queued: &Queued) {
        if queued.queued > 0 {
            metrics::counter!("courier_device_list_updates_total", "event" => "queued")
                .increment(queued.queued);
        }
        if queued.coalesced > 0 {
            metrics::counter!("courier_device_list_updates_total", "event" => "coalesced")
                .increment(queued.coalesced);
        }
        self.publish(queued.wakeups());
    }
}

/// Logs local `changes` (see `log_changes`) and queues, for each, one EDU
/// per destination interested in its user now, built from the state this
/// transaction sees.
pub async fn log_local_changes(
    tx: &Transaction<'_>,
    changes: &[Change<'_>],
    now_ms: TimestampMs,
) -> Result<Queued, Fail> {
    let streams = log_changes(tx, changes, now_ms).await?;
    let mut queued = Queued::default();
    if changes.is_empty() {
        return Ok(queued);
    }
    let mut users: BTreeSet<&str> = BTreeSet::new();
    for (change, stream_id) in changes.iter().zip(streams) {
        users.insert(change.user);
        queue_change(tx, change, stream_id, now_ms, &mut queued).await?;
    }
    let users: Vec<&str> = users.into_iter().collect();
    queued.devices = woken_devices(tx, &users).await?;
    Ok(queued)
}

/// The registered devices of `users` and of every local user tracking one
/// of them, sorted and unique.
pub async fn woken_devices(c: &impl GenericClient, users: &[&str]) -> Result<Vec<DeviceKey>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT user_id, device_id FROM devices WHERE user_id = ANY($1)
             UNION
             SELECT d.user_id, d.device_id FROM device_list_trackers t
             JOIN devices d ON d.user_id = t.tracker
             WHERE t.user_id = ANY($1)
             ORDER BY 1, 2",
        )
        .await?;
    Ok(c.query(&stmt, &[&users])
        .await?
        .iter()
        .map(|r| DeviceKey {
            user_id: r.get(0),
            device_id: r.get(1),
        })
        .collect())
}

/// The destinations interested in `user` at `now_ms`, sorted.
pub async fn destinations(
    c: &impl GenericClient,
    user: &str,
    now_ms: TimestampMs,
) -> Result<Vec<String>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT destination FROM device_list_interest
             WHERE user_id = $1 AND (expires_ts IS NULL OR expires_ts > $2)
             ORDER BY destination",
        )
        .await?;
    Ok(c.query(&stmt, &[&user, &now_ms])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn queue_change(
    tx: &Transaction<'_>,
    change: &Change<'_>,
    stream_id: i64,
    now_ms: TimestampMs,
    queued: &mut Queued,
) -> Result<(), Fail> {
    let dests = destinations(tx, change.user, now_ms).await?;
    if dests.is_empty() {
        return Ok(());
    }
    let (edu_json, dl_device, dl_stream) = match change.device {
        Some(device) => {
            let query = DeviceQuery {
                user_id: change.user.to_owned(),
                device_ids: vec![device.to_owned()],
            };
            let current = user_devices(tx, &query).await?;
            let record = current.devices.iter().find(|d| d.device_id == device);
            let edu = device_list_update_edu(change.user, device, stream_id, record);
            (edu, device, Some(stream_id))
        }
        None => {
            let keys = cross_signing_keys(tx, change.user).await?;
            (signing_key_update_edu(change.user, &keys), "", None)
        }
    };
    let coalesce = tx
        .prepare_cached(
            "WITH gone AS (
                 DELETE FROM outbox o
                 WHERE o.destination = ANY($1) AND o.dl_user = $2 AND o.dl_device = $3
                   AND NOT EXISTS (SELECT 1 FROM outbox_txn t
                                   WHERE t.destination = o.destination AND o.seq = ANY(t.seqs))
                 RETURNING 1
             )
             SELECT count(*) FROM gone",
        )
        .await?;
    let gone: i64 = tx
        .query_one(&coalesce, &[&dests, &change.user, &dl_device])
        .await?
        .get(0);
    let insert = tx
        .prepare_cached(
            "INSERT INTO outbox
                 (destination, edu_json, message_count, queued_ts, dl_user, dl_device, dl_stream)
             SELECT d, $2, 0, $3, $4, $5, $6
             FROM unnest($1::text[]) WITH ORDINALITY AS r (d, o) ORDER BY o",
        )
        .await?;
    let inserted = tx
        .execute(
            &insert,
            &[
                &dests,
                &edu_json,
                &now_ms,
                &change.user,
                &dl_device,
                &dl_stream,
            ],
        )
        .await?;
    queued.coalesced += gone.unsigned_abs();
    queued.queued += inserted;
    queued.destinations.extend(dests);
    Ok(())
}

/// Chains the device-list rows of one peek, in seq order: each
/// `m.device_list_update` gets as `prev_id` the stream_id of the previous
/// one of its user in this peek, else the destination's acknowledged
/// stream for the user (`acked`), else none.
#[derive(Debug, Default)]
pub struct PrevChain {
    last: BTreeMap<String, i64>,
}

impl PrevChain {
    /// The meta of a row with `dl_user` set.
    pub fn next(
        &mut self,
        user_id: String,
        stream_id: Option<i64>,
        acked: Option<i64>,
    ) -> OutboundDeviceList {
        let Some(stream) = stream_id else {
            return OutboundDeviceList {
                user_id,
                stream_id: None,
                prev_id: None,
            };
        };
        let prev_id = self.last.get(&user_id).copied().or(acked);
        self.last.insert(user_id.clone(), stream);
        OutboundDeviceList {
            user_id,
            stream_id: Some(stream),
            prev_id,
        }
    }
}

/// Before an acknowledged transaction's rows (`seqs`) are deleted: raises
/// the destination's acknowledged stream per user to the highest
/// stream_id among them. Returns how many device-list rows it carried.
pub async fn record_acked(
    tx: &Transaction<'_>,
    destination: &str,
    seqs: &[i64],
) -> Result<u64, Fail> {
    let upsert = tx
        .prepare_cached(
            "INSERT INTO device_list_acked (destination, user_id, stream_id)
             SELECT $1::text, dl_user, max(dl_stream) FROM outbox
             WHERE destination = $1 AND seq = ANY($2) AND dl_stream IS NOT NULL
             GROUP BY dl_user
             ON CONFLICT (destination, user_id) DO UPDATE SET
                 stream_id = greatest(device_list_acked.stream_id, excluded.stream_id)",
        )
        .await?;
    tx.execute(&upsert, &[&destination, &seqs]).await?;
    let count = tx
        .prepare_cached(
            "SELECT count(*) FROM outbox
             WHERE destination = $1 AND seq = ANY($2) AND dl_user IS NOT NULL",
        )
        .await?;
    let sent: i64 = tx.query_one(&count, &[&destination, &seqs]).await?.get(0);
    Ok(sent.unsigned_abs())
}
