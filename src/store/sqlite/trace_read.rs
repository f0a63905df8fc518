//! SQL of the trace journal's reads in the SQLite backend: everything the
//! journal and the live tables hold about the messages one query names
//! (`store::trace::TraceRecords`), on a pooled reader inside one read
//! transaction. The PostgreSQL backend runs the same reads
//! (`postgres/trace.rs`).

use rusqlite::{Connection, Row as SqlRow};

use crate::store::StoreError;
use crate::store::trace::{
    MAX_TRACED_MESSAGES, PendingInboxRow, QueuedEdu, TraceEvent, TraceQuery, TraceRecords,
    delivered_lists, delivered_message_ids, detail_recipients,
};

const COLUMNS: &str =
    "id, ts, kind, message_id, txn_id, peer, user_id, device_id, first_id, last_id, detail";

fn event(row: &SqlRow<'_>) -> rusqlite::Result<TraceEvent> {
    Ok(TraceEvent {
        id: row.get(0)?,
        ts: row.get(1)?,
        kind: row.get(2)?,
        message_id: row.get(3)?,
        txn_id: row.get(4)?,
        peer: row.get(5)?,
        user_id: row.get(6)?,
        device_id: row.get(7)?,
        first_id: row.get(8)?,
        last_id: row.get(9)?,
        detail: row.get(10)?,
    })
}

fn select(
    conn: &Connection,
    filter: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<TraceEvent>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM trace_events WHERE {filter}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params, event)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn push_id(ids: &mut Vec<String>, id: &str) {
    if !id.is_empty() && !ids.iter().any(|i| i == id) {
        ids.push(id.to_owned());
    }
}

/// Everything about the messages `query` names (see `TraceRecords`).
pub(super) fn trace_journal(
    conn: &Connection,
    query: &TraceQuery,
) -> Result<TraceRecords, StoreError> {
    let mut out = TraceRecords::default();
    match query {
        TraceQuery::MessageId(m) => out.message_ids.push(m.clone()),
        TraceQuery::TxnId(t) | TraceQuery::Id(t) => {
            if matches!(query, TraceQuery::Id(_)) {
                out.message_ids.push(t.clone());
            }
            let rows = select(conn, "txn_id = ?1 ORDER BY id", [t])?;
            for row in &rows {
                if let Some(m) = &row.message_id {
                    push_id(&mut out.message_ids, m);
                }
                if row.kind == "txn" {
                    let carried = select(
                        conn,
                        "kind = 'queued' AND peer = ?1 AND first_id BETWEEN ?2 AND ?3
                         AND message_id IS NOT NULL
                         ORDER BY id",
                        (&row.peer, row.first_id, row.last_id),
                    )?;
                    for edu in carried {
                        if let Some(m) = &edu.message_id {
                            push_id(&mut out.message_ids, m);
                        }
                    }
                }
            }
            out.events.extend(rows);
        }
        TraceQuery::User { user_id, device_id } => {
            let rows = select(
                conn,
                "user_id = ?1 AND (?2 IS NULL OR device_id = ?2) ORDER BY id DESC LIMIT 200",
                (user_id, device_id),
            )?;
            let mut pending = conn.prepare_cached(
                "SELECT message_id FROM device_inbox
                 WHERE user_id = ?1 AND (?2 IS NULL OR device_id = ?2)
                 ORDER BY stream_id DESC LIMIT ?3",
            )?;
            let waiting: Vec<String> = pending
                .query_map((user_id, device_id, MAX_TRACED_MESSAGES as i64), |r| {
                    r.get(0)
                })?
                .collect::<Result<_, _>>()?;
            for m in &waiting {
                push_id(&mut out.message_ids, m);
            }
            for row in &rows {
                if let Some(m) = &row.message_id {
                    push_id(&mut out.message_ids, m);
                } else if row.kind == "delivered" {
                    for m in delivered_message_ids(&row.detail).iter().rev() {
                        push_id(&mut out.message_ids, m);
                    }
                }
            }
            out.message_ids.truncate(MAX_TRACED_MESSAGES);
        }
    }
    for m in out.message_ids.clone() {
        message_closure(conn, &m, &mut out)?;
    }
    out.events.sort_by_key(|e| e.id);
    out.events.dedup_by_key(|e| e.id);
    Ok(out)
}

/// Adds the rows about message `m`: its own, the transactions and attempts
/// of its EDU, the acknowledgements that deleted its inbox rows, the rows
/// still pending and whether its EDU is still queued.
fn message_closure(conn: &Connection, m: &str, out: &mut TraceRecords) -> Result<(), StoreError> {
    let own = select(conn, "message_id = ?1 ORDER BY id", [m])?;
    for row in &own {
        match row.kind.as_str() {
            "queued" => {
                let (Some(peer), Some(seq)) = (&row.peer, row.first_id) else {
                    continue;
                };
                let txns = select(
                    conn,
                    "kind = 'txn' AND peer = ?1 AND first_id <= ?2
                     ORDER BY first_id DESC LIMIT 32",
                    (peer, seq),
                )?;
                for txn in txns.into_iter().filter(|t| t.last_id >= Some(seq)) {
                    if let Some(t) = &txn.txn_id {
                        out.events.extend(select(
                            conn,
                            "txn_id = ?1 AND peer = ?2 AND kind = 'attempt' ORDER BY id",
                            (t, peer),
                        )?);
                    }
                    out.events.push(txn);
                }
                let still = conn
                    .prepare_cached("SELECT 1 FROM outbox WHERE destination = ?1 AND seq = ?2")?
                    .exists((peer, seq))?;
                if still {
                    out.queued.push(QueuedEdu {
                        destination: peer.clone(),
                        seq,
                    });
                }
            }
            "accepted" | "applied" => {
                if row.kind == "applied"
                    && let (Some(t), Some(peer)) = (&row.txn_id, &row.peer)
                {
                    out.events.extend(select(
                        conn,
                        "txn_id = ?1 AND peer = ?2 AND kind = 'received'",
                        (t, peer),
                    )?);
                }
                let (Some(a), Some(b)) = (row.first_id, row.last_id) else {
                    continue;
                };
                for user in detail_recipients(&row.detail) {
                    let acks = select(
                        conn,
                        "user_id = ?1 AND id > ?2 AND kind = 'delivered'
                         AND last_id >= ?3 AND first_id <= ?4 ORDER BY id",
                        (&user, row.id, a, b),
                    )?;
                    out.events
                        .extend(acks.into_iter().filter(|e| delivered_lists(&e.detail, m)));
                }
                let mut stmt = conn.prepare_cached(
                    "SELECT user_id, device_id, stream_id, message_id FROM device_inbox
                     WHERE stream_id BETWEEN ?1 AND ?2 AND message_id = ?3 ORDER BY stream_id",
                )?;
                let rows = stmt.query_map((a, b, m), |r| {
                    Ok(PendingInboxRow {
                        user_id: r.get(0)?,
                        device_id: r.get(1)?,
                        stream_id: r.get(2)?,
                        message_id: r.get(3)?,
                    })
                })?;
                for pending in rows {
                    out.pending.push(pending?);
                }
            }
            _ => {}
        }
    }
    out.events.extend(own);
    Ok(())
}
