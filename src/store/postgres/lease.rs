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

use deadpool_postgres::Object;

use super::Fail;
use super::outbox::PENDING_DESTINATIONS;

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
             UPDATE destination_leases l SET owner = $1, expires_at = $2::bigint + $3::bigint
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
) -> Result<bool, Fail> {
    let stmt = c
        .prepare_cached(
            "WITH previous AS (
                 SELECT owner, expires_at FROM destination_leases WHERE destination = $2
             )
             INSERT INTO destination_leases AS l (destination, owner, expires_at)
             VALUES ($2::text, $1::text, $3::bigint + $4::bigint)
             ON CONFLICT (destination) DO UPDATE SET owner = $1, expires_at = $3 + $4
             WHERE l.owner = $1 OR l.expires_at <= $3
             RETURNING (SELECT owner FROM previous), (SELECT expires_at FROM previous)",
        )
        .await?;
    let Some(row) = c
        .query_opt(&stmt, &[&worker, &destination, &now_ms, &lease_ms])
        .await?
    else {
        return Ok(false);
    };
    let previous: Option<String> = row.get(0);
    let previous_expiry: Option<i64> = row.get(1);
    if previous.as_deref() != Some(worker) {
        tracing::info!(
            %worker,
            %destination,
            previous_owner = previous.as_deref().unwrap_or(""),
            lapsed_ms_ago = previous_expiry.map_or(0, |e| (now_ms - e).max(0)),
            "took destination lease"
        );
    }
    Ok(true)
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
