//! SQL of a client send in the PostgreSQL backend: the client transaction
//! record (its dedupe key), the local inbox rows and the outbox rows, in one
//! transaction on the connection given. A repeated client transaction rolls
//! back and writes nothing. The inbox rows go through `inbox::write_inbox`,
//! shared with inbound federation transactions, so they follow its
//! device-row locking order. The outbox rows are one multi-row INSERT
//! (`unnest` of arrays); with the journal on, its rows are one more.

use deadpool_postgres::Object;

use super::Fail;
use super::inbox::write_inbox;
use super::trace;
use crate::store::trace::Detail;
use crate::store::{NewInboxMessage, SendBatch, SendOutcome};

pub async fn enqueue_send(
    c: &mut Object,
    batch: &SendBatch,
    switch: &trace::Switch,
) -> Result<SendOutcome, Fail> {
    let journal_on = switch.on(&*c).await?;
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
    let (woken_devices, spans) = write_inbox(&tx, &local, batch.now_ms).await?;
    let mut journal = trace::Rows::default();
    let t = &batch.txn;
    if journal_on && let Some(first) = batch.local.first() {
        let span = spans.get(&first.message_id).copied();
        let recipients =
            crate::store::trace::recipients(batch.local.iter().map(|m| m.user_id.as_str()));
        journal.push(trace::Row {
            kind: "accepted",
            message_id: Some(&first.message_id),
            txn_id: Some(&t.txn_id),
            user_id: Some(&t.user_id),
            device_id: Some(&t.device_id),
            first_id: span.map(|s| s.0),
            last_id: span.map(|s| s.1),
            detail: Detail::default()
                .str("event_type", &t.event_type)
                .strs("recipients", &recipients)
                .int("rows", span.map_or(0, |s| s.2))
                .finish(),
            ..trace::Row::default()
        });
    }
    let ids: Vec<Option<String>> = if journal_on {
        batch
            .remote
            .iter()
            .map(|e| crate::store::trace::edu_message_id(&e.edu_json))
            .collect()
    } else {
        Vec::new()
    };
    let destinations = batch.destinations();
    if !batch.remote.is_empty() {
        let mut dests: Vec<&str> = Vec::with_capacity(batch.remote.len());
        let mut edus: Vec<&str> = Vec::with_capacity(batch.remote.len());
        let mut counts: Vec<i32> = Vec::with_capacity(batch.remote.len());
        for edu in &batch.remote {
            dests.push(&edu.destination);
            edus.push(&edu.edu_json);
            counts.push(i32::try_from(edu.message_count).unwrap_or(i32::MAX));
        }
        // All of a send's rows in one statement (no chunking: the arrays
        // are three parameters whatever their length).
        let insert = tx
            .prepare_cached(
                "INSERT INTO outbox (destination, edu_json, message_count, queued_ts)
                 SELECT d, e, n, $4
                 FROM unnest($1::text[], $2::text[], $3::int4[]) WITH ORDINALITY AS r (d, e, n, o)
                 ORDER BY o
                 RETURNING seq",
            )
            .await?;
        let seqs = tx
            .query(&insert, &[&dests, &edus, &counts, &batch.now_ms])
            .await?;
        // Identity values are taken in insertion order: sorted, they match
        // the EDUs in order.
        let mut seqs: Vec<i64> = seqs.iter().map(|r| r.get(0)).collect();
        seqs.sort_unstable();
        for ((edu, seq), id) in batch.remote.iter().zip(&seqs).zip(&ids) {
            journal.push(trace::Row {
                kind: "queued",
                message_id: id.as_deref(),
                txn_id: Some(&t.txn_id),
                peer: Some(&edu.destination),
                user_id: Some(&t.user_id),
                device_id: Some(&t.device_id),
                first_id: Some(*seq),
                detail: Detail::default()
                    .str("event_type", &t.event_type)
                    .int("messages", edu.message_count)
                    .finish(),
                ..trace::Row::default()
            });
        }
    }
    // Empty when the journal is off: then no statement runs.
    journal.write(&tx, batch.now_ms).await?;
    tx.commit().await?;
    Ok(SendOutcome::Accepted {
        woken_devices,
        destinations,
    })
}
