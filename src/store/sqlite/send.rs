//! SQL of a client send in the SQLite backend: the client transaction
//! record (its dedupe key), the local inbox rows and the outbox rows, all in
//! the one transaction its caller owns (the group transaction on the
//! writer). A repeated client transaction writes nothing. The inbox rows go
//! through `inbox::InboxWriter`, shared with inbound federation
//! transactions; the outbox rows (and, with the journal on, the journal's
//! rows) are multi-row INSERTs (`multirow`), so a send to many
//! destinations runs a few statements, not one per EDU.

use rusqlite::Connection;

use super::inbox::InboxWriter;
use super::{multirow, trace};
use crate::store::{SendBatch, SendOutcome, StoreError};

/// `journal`: whether the trace journal is on (`trace::Switch`).
pub fn enqueue_send(
    conn: &Connection,
    batch: &SendBatch,
    journal: bool,
) -> Result<SendOutcome, StoreError> {
    let t = &batch.txn;
    let recorded = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO client_txns (user_id, device_id, event_type, txn_id, received_ts)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute((&t.user_id, &t.device_id, &t.event_type, &t.txn_id, batch.now_ms))?;
    if recorded == 0 {
        return Ok(SendOutcome::Duplicate);
    }
    let mut inbox = InboxWriter::new(conn, batch.now_ms)?;
    for msg in &batch.local {
        inbox.write(msg)?;
    }
    let written = inbox.finish()?;
    // The outbox seqs, for the journal: each statement's rows took
    // consecutive seqs in order (`multirow`).
    let mut seqs: Vec<i64> = Vec::with_capacity(if journal { batch.remote.len() } else { 0 });
    multirow::insert(conn, &multirow::OUTBOX, &batch.remote, |stmt, chunk| {
        for (i, edu) in chunk.iter().enumerate() {
            multirow::bind_row(
                stmt,
                i,
                &[
                    &edu.destination,
                    &edu.edu_json,
                    &edu.message_count,
                    &batch.now_ms,
                ],
            )?;
        }
        stmt.raw_execute()?;
        if journal {
            let first = multirow::first_rowid(conn, chunk.len());
            seqs.extend((0..chunk.len()).map(|i| first.saturating_add(i as i64)));
        }
        Ok(())
    })?;
    if journal {
        trace::record_send(conn, batch, written.base, written.rows, &seqs)?;
    }
    let destinations = batch.destinations();
    Ok(SendOutcome::Accepted {
        woken_devices: written.woken,
        destinations,
    })
}
