//! SQL of a client send in the PostgreSQL backend: the client transaction
//! record (its dedupe key), the local inbox rows and the outbox rows, in one
//! transaction on the connection given. A repeated client transaction rolls
//! back and writes nothing. The inbox rows go through `inbox::write_inbox`,
//! shared with inbound federation transactions, so they follow its
//! device-row locking order.

use deadpool_postgres::Object;

use super::Fail;
use super::inbox::write_inbox;
use crate::store::{NewInboxMessage, SendBatch, SendOutcome};

pub async fn enqueue_send(c: &mut Object, batch: &SendBatch) -> Result<SendOutcome, Fail> {
    let tx = c.transaction().await?;
    let t = &batch.txn;
    let record = tx
        .prepare_cached(
            "INSERT INTO client_txns (user_id, device_id, event_type, txn_id, received_ts)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .await?;
    let recorded = tx
        .execute(
            &record,
            &[
                &t.user_id,
                &t.device_id,
                &t.event_type,
                &t.txn_id,
                &batch.now_ms,
            ],
        )
        .await?;
    if recorded == 0 {
        tx.rollback().await?;
        return Ok(SendOutcome::Duplicate);
    }
    let local: Vec<&NewInboxMessage> = batch.local.iter().collect();
    let woken_devices = write_inbox(&tx, &local, batch.now_ms).await?;
    let mut destinations: Vec<String> = Vec::new();
    if !batch.remote.is_empty() {
        let mut dests: Vec<&str> = Vec::with_capacity(batch.remote.len());
        let mut edus: Vec<&str> = Vec::with_capacity(batch.remote.len());
        let mut counts: Vec<i32> = Vec::with_capacity(batch.remote.len());
        for edu in &batch.remote {
            dests.push(&edu.destination);
            edus.push(&edu.edu_json);
            counts.push(i32::try_from(edu.message_count).unwrap_or(i32::MAX));
            if !destinations.contains(&edu.destination) {
                destinations.push(edu.destination.clone());
            }
        }
        let insert = tx
            .prepare_cached(
                "INSERT INTO outbox (destination, edu_json, message_count, queued_ts)
                 SELECT d, e, n, $4
                 FROM unnest($1::text[], $2::text[], $3::int4[]) WITH ORDINALITY AS r (d, e, n, o)
                 ORDER BY o",
            )
            .await?;
        tx.execute(&insert, &[&dests, &edus, &counts, &batch.now_ms])
            .await?;
    }
    tx.commit().await?;
    Ok(SendOutcome::Accepted {
        woken_devices,
        destinations,
    })
}
