//! SQL of a client send in the SQLite backend: the client transaction
//! record (its dedupe key), the local inbox rows and the outbox rows, all in
//! the one transaction its caller owns (the group transaction on the
//! writer). A repeated client transaction writes nothing. The inbox rows go
//! through `inbox::InboxWriter`, shared with inbound federation transactions.

use rusqlite::Connection;

use super::inbox::InboxWriter;
use super::trace;
use crate::store::{SendBatch, SendOutcome, StoreError};

pub fn enqueue_send(conn: &Connection, batch: &SendBatch) -> Result<SendOutcome, StoreError> {
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
    let journal = trace::SendJournal::start(conn)?;
    let mut inbox = InboxWriter::new(conn, batch.now_ms)?;
    for msg in &batch.local {
        inbox.write(msg)?;
    }
    let rows = inbox.rows();
    let woken_devices = inbox.finish()?;
    if let Some(journal) = &journal {
        journal.accepted(conn, batch, rows)?;
    }
    let mut destinations: Vec<String> = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO outbox (destination, edu_json, message_count, queued_ts)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for edu in &batch.remote {
            stmt.execute((
                &edu.destination,
                &edu.edu_json,
                edu.message_count,
                batch.now_ms,
            ))?;
            if let Some(journal) = &journal {
                journal.queued(conn, batch, edu, conn.last_insert_rowid())?;
            }
            if !destinations.contains(&edu.destination) {
                destinations.push(edu.destination.clone());
            }
        }
    }
    Ok(SendOutcome::Accepted {
        woken_devices,
        destinations,
    })
}
