//! SQL of destination leases (DESIGN §4): which worker may send to which
//! destination, until when. A lease row is claimed in a transaction with
//! `FOR UPDATE SKIP LOCKED`, so workers claiming at the same time split the
//! free destinations instead of queueing on each other; a single destination
//! is taken or extended with one conditional upsert. Times are milliseconds
//! since the epoch from the workers' clocks; a lease is held while
//! `expires_at > now`.
//!
//! Rows of destinations without pending work are deleted when their lease
//! lapses (or by their owner on renewal), so the table stays as small as the
//! set of busy destinations.
//!
//! Fencing (issue 18): each claim gives the lease row a new `epoch` from the
//! `lease_epochs` sequence (so epochs grow even across a deleted and
//! re-created row); renewal by the holder keeps it. `check_fence` is the
//! first statement of every fenced outbox write: it share-locks the lease
//! row if it still names the writer's worker and epoch, so a claim waits for
//! the write to commit, and fails the write otherwise.

use deadpool_postgres::{GenericClient, Object};

use super::Fail;
use super::outbox::PENDING_DESTINATIONS;
use crate::store::{Fence, StoreError};

/// Fails with `StoreError::Fenced` unless the lease row of `destination`
/// still carries `fence` (no claim since it was handed out, lapsed or not),
/// and otherwise locks the row (`FOR SHARE`) until the caller's transaction
/// ends. Call it first in the transaction of the write it guards.
pub async fn check_fence(
    c: &impl GenericClient,
    destination: &str,
    fence: &Fence,
) -> Result<(), Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT 1 FROM destination_leases
             WHERE destination = $1 AND owner = $2 AND epoch = $3
             FOR SHARE",
        )
        .await?;
    if c.query_opt(&stmt, &[&destination, &fence.worker, &fence.epoch])
        .await?
        .is_some()
    {
        return Ok(());
    }
    Err(Fail::Store(StoreError::Fenced {
        destination: destination.to_owned(),
        worker: fence.worker.clone(),
        epoch: fence.epoch,
    }))
}

pub async fn claim_destinations(
    c: &mut Object,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
    limit: u32,
) -> Result<Vec<String>, Fail> {
    let tx = c.transaction().await?;
    // Free lease rows for pending destinations that have none yet.
    let create = tx
        .prepare_cached(&format!(
            "INSERT INTO destination_leases (destination, owner, expires_at)
             SELECT destination, '', 0 FROM ({PENDING_DESTINATIONS}) p
             ON CONFLICT DO NOTHING"
        ))
        .await?;
    tx.execute(&create, &[]).await?;
    // Lapsed leases of destinations with nothing pending: forget them.
    let forget = tx
        .prepare_cached(&format!(
            "DELETE FROM destination_leases
             WHERE expires_at <= $1 AND destination NOT IN ({PENDING_DESTINATIONS})"
        ))
        .await?;
    tx.execute(&forget, &[&now_ms]).await?;
    let claim = tx
        .prepare_cached(
            "WITH free AS (
                 SELECT destination FROM destination_leases
                 WHERE expires_at <= $2
                 ORDER BY destination LIMIT $4
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE destination_leases l
             SET owner = $1, expires_at = $2::bigint + $3::bigint, epoch = nextval('lease_epochs')
             FROM free WHERE l.destination = free.destination
             RETURNING l.destination",
        )
        .await?;
    let mut claimed: Vec<String> = tx
        .query(&claim, &[&worker, &now_ms, &lease_ms, &i64::from(limit)])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit().await?;
    claimed.sort();
    if !claimed.is_empty() {
        tracing::info!(%worker, ?claimed, "claimed destination leases");
    }
    Ok(claimed)
}

pub async fn acquire_lease(
    c: &Object,
    worker: &str,
    destination: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<Option<Fence>, Fail> {
    // Extending our own unexpired lease keeps its epoch; taking a free,
    // lapsed or released one (ours after a lapse too) draws a new one.
    let stmt = c
        .prepare_cached(
            "WITH previous AS (
                 SELECT owner, expires_at, epoch FROM destination_leases WHERE destination = $2
             )
             INSERT INTO destination_leases AS l (destination, owner, expires_at, epoch)
             VALUES ($2::text, $1::text, $3::bigint + $4::bigint, nextval('lease_epochs'))
             ON CONFLICT (destination) DO UPDATE SET owner = $1, expires_at = $3 + $4,
                 epoch = CASE WHEN l.owner = $1 AND l.expires_at > $3 THEN l.epoch
                              ELSE excluded.epoch END
             WHERE l.owner = $1 OR l.expires_at <= $3
             RETURNING l.epoch, (SELECT owner FROM previous), (SELECT expires_at FROM previous),
                       (SELECT epoch FROM previous)",
        )
        .await?;
    let Some(row) = c
        .query_opt(&stmt, &[&worker, &destination, &now_ms, &lease_ms])
        .await?
    else {
        return Ok(None);
    };
    let epoch: i64 = row.get(0);
    let previous: Option<String> = row.get(1);
    let previous_expiry: Option<i64> = row.get(2);
    let previous_epoch: Option<i64> = row.get(3);
    if previous.as_deref() != Some(worker) {
        tracing::info!(
            %worker,
            %destination,
            epoch,
            previous_owner = previous.as_deref().unwrap_or(""),
            lapsed_ms_ago = previous_expiry.map_or(0, |e| (now_ms - e).max(0)),
            "took destination lease"
        );
    } else if previous_epoch != Some(epoch) {
        tracing::info!(%worker, %destination, epoch, "took back own lapsed destination lease");
    }
    Ok(Some(Fence {
        worker: worker.to_owned(),
        epoch,
    }))
}

pub async fn renew_leases(
    c: &mut Object,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<u64, Fail> {
    let tx = c.transaction().await?;
    // Give back destinations that have nothing left to send.
    let idle = tx
        .prepare_cached(&format!(
            "DELETE FROM destination_leases
             WHERE owner = $1 AND destination NOT IN ({PENDING_DESTINATIONS})"
        ))
        .await?;
    tx.execute(&idle, &[&worker]).await?;
    let renew = tx
        .prepare_cached(
            "UPDATE destination_leases SET expires_at = $2::bigint + $3::bigint
             WHERE owner = $1 AND expires_at > $2",
        )
        .await?;
    let held = tx.execute(&renew, &[&worker, &now_ms, &lease_ms]).await?;
    tx.commit().await?;
    Ok(held)
}

pub async fn release_leases(c: &Object, worker: &str) -> Result<(), Fail> {
    let stmt = c
        .prepare_cached("UPDATE destination_leases SET owner = '', expires_at = 0 WHERE owner = $1")
        .await?;
    c.execute(&stmt, &[&worker]).await?;
    Ok(())
}

pub async fn holds_lease(
    c: &Object,
    worker: &str,
    destination: &str,
    now_ms: i64,
) -> Result<bool, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT 1 FROM destination_leases
             WHERE destination = $1 AND owner = $2 AND expires_at > $3",
        )
        .await?;
    Ok(c.query_opt(&stmt, &[&destination, &worker, &now_ms])
        .await?
        .is_some())
}
