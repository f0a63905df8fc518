//! Reading back the one in-flight transaction of a destination (SQLite):
//! its record as `begin_txn` or `advance` wrote it, the body joined again
//! from the rows a record names when it keeps only the envelope
//! (`store/txn_body.rs`). Runs on a pooled reader.

use rusqlite::{Connection, OptionalExtension};

use super::outbox::parse_seqs;
use crate::store::txn_body::splice;
use crate::store::{InFlightTxn, StoreError};

pub fn in_flight(conn: &Connection, destination: &str) -> Result<Option<InFlightTxn>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT txn_id, seqs_json, body, edus_at FROM outbox_txn WHERE destination = ?1",
        )?
        .query_row([destination], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<i64>>(3)?,
            ))
        })
        .optional()?;
    let Some((txn_id, seqs_json, body, edus_at)) = row else {
        return Ok(None);
    };
    let seqs = parse_seqs(&seqs_json)?;
    let body = match edus_at {
        None => body,
        Some(at) => {
            let edus = recorded_rows(conn, destination, &seqs)?;
            splice(
                &body,
                usize::try_from(at).unwrap_or(usize::MAX),
                edus.iter().map(String::as_str),
            )
        }
    };
    Ok(Some(InFlightTxn {
        destination: destination.to_owned(),
        txn_id,
        seqs,
        body,
    }))
}

/// The `edu_json` of the rows a record names, in its order, read in one
/// range scan (a quarantined row put back keeps its old seq, so the range
/// may hold rows the record does not name; they are skipped). Recorded
/// rows leave the queue only with their record (ack, or a dead
/// destination's expiry), so one missing means a damaged store.
fn recorded_rows(
    conn: &Connection,
    destination: &str,
    seqs: &[i64],
) -> Result<Vec<String>, StoreError> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Ok(Vec::new());
    };
    let mut stmt = conn.prepare_cached(
        "SELECT seq, edu_json FROM outbox
         WHERE destination = ?1 AND seq BETWEEN ?2 AND ?3 ORDER BY seq",
    )?;
    let mut rows = stmt.query((destination, first.min(last), first.max(last)))?;
    let mut found = std::collections::HashMap::with_capacity(seqs.len());
    while let Some(row) = rows.next()? {
        found.insert(row.get::<_, i64>(0)?, row.get::<_, String>(1)?);
    }
    seqs.iter()
        .map(|seq| {
            found.remove(seq).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "outbox row {seq} of the transaction in flight to {destination} is missing"
                ))
            })
        })
        .collect()
}
