//! SQL of worker names: which live process holds which
//! `[worker] name`. Destination leases are owned by name, so a second
//! process started with the same name would share every lease; the
//! `workers` table gives each name one holder, a random store instance id,
//! kept alive by a heartbeat from the lease loop. A name is free when it has
//! no row, when its holder released it on a clean shutdown, or when the
//! holder's heartbeat is at least the lease duration old (the holder is dead
//! or stalled for as long as its leases would last).
//!
//! Not here: when to heartbeat (`cluster`), what to do on refusal (start-up
//! fails with `StoreError::WorkerNameTaken`).

use deadpool_postgres::Object;

use super::Fail;
use crate::store::{StoreError, TimestampMs};

/// Takes `name` for `instance` if it is free, already `instance`'s, or its
/// holder's heartbeat is at least `lease_ms` old, stamping the heartbeat
/// `now_ms`. Otherwise returns the live holder and its heartbeat age.
async fn try_claim(
    c: &Object,
    name: &str,
    instance: &str,
    now_ms: TimestampMs,
    lease_ms: i64,
) -> Result<Option<(String, i64)>, Fail> {
    let claim = c
        .prepare_cached(
            "INSERT INTO workers AS w (name, instance, heartbeat_at, started_at)
             VALUES ($1, $2, $3, $3)
             ON CONFLICT (name) DO UPDATE SET
                 instance = excluded.instance,
                 heartbeat_at = excluded.heartbeat_at,
                 started_at = CASE WHEN w.instance = excluded.instance
                                   THEN w.started_at ELSE excluded.started_at END
             WHERE w.instance = excluded.instance OR w.heartbeat_at <= $3 - $4::bigint
             RETURNING 1",
        )
        .await?;
    if c.query_opt(&claim, &[&name, &instance, &now_ms, &lease_ms])
        .await?
        .is_some()
    {
        return Ok(None);
    }
    let holder = c
        .prepare_cached("SELECT instance, heartbeat_at FROM workers WHERE name = $1")
        .await?;
    Ok(match c.query_opt(&holder, &[&name]).await? {
        Some(row) => {
            let heartbeat_at: i64 = row.get(1);
            Some((row.get(0), now_ms.saturating_sub(heartbeat_at)))
        }
        // Released between the two statements: free now, but say so as a
        // refusal only if the retry below fails too.
        None => Some((String::new(), -1)),
    })
}

/// The start-up claim: `Ok` or `StoreError::WorkerNameTaken`.
pub async fn claim(
    c: &Object,
    name: &str,
    instance: &str,
    now_ms: TimestampMs,
    lease_ms: i64,
) -> Result<(), Fail> {
    let mut refusal = None;
    for _ in 0..2 {
        match try_claim(c, name, instance, now_ms, lease_ms).await? {
            None => {
                tracing::info!(worker = %name, %instance, "claimed worker name");
                return Ok(());
            }
            // The holder released it meanwhile: try once more.
            Some((holder, _)) if holder.is_empty() => continue,
            Some(taken) => {
                refusal = Some(taken);
                break;
            }
        }
    }
    let (holder, heartbeat_age_ms) = refusal.unwrap_or_default();
    Err(Fail::Store(StoreError::WorkerNameTaken {
        name: name.to_owned(),
        holder,
        heartbeat_age_ms,
    }))
}

/// The lease loop's heartbeat: whether `instance` still holds `name` (it
/// re-takes a name nobody else took, e.g. after its heartbeat lapsed).
pub async fn heartbeat(
    c: &Object,
    name: &str,
    instance: &str,
    now_ms: TimestampMs,
    lease_ms: i64,
) -> Result<bool, Fail> {
    Ok(try_claim(c, name, instance, now_ms, lease_ms)
        .await?
        .is_none())
}

/// Deletes `instance`'s claim on `name` (another instance's is left alone).
pub async fn release(c: &Object, name: &str, instance: &str) -> Result<(), Fail> {
    let stmt = c
        .prepare_cached("DELETE FROM workers WHERE name = $1 AND instance = $2")
        .await?;
    c.execute(&stmt, &[&name, &instance]).await?;
    Ok(())
}
