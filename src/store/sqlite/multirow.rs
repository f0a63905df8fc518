//! The multi-row INSERTs of the SQLite backend's hot writes (inbox rows,
//! outbox rows, inbound message ids, trace journal rows): one statement
//! for up to `CHUNK` rows instead of one per row. Each table has six
//! statement shapes, for 32, 16, 8, 4, 2 and 1 rows, built at compile time;
//! `insert` takes the full chunks and then the rest by halves (70 rows are
//! 32 + 32 + 4 + 2), so a call runs at most `n / 32 + 5` statements and a
//! table keeps at most six entries in the connection's statement cache.
//!
//! Rows are inserted in the order given, and a statement's rows take
//! increasing rowids in the order of its VALUES list; on the writer thread
//! (the only inserter) the rowids of one call's rows are consecutive, which
//! is how the callers derive outbox seqs and inbox stream ids for the
//! trace journal (`last_insert_rowid` after each statement). It knows no
//! table beyond the SQL texts below.

use rusqlite::types::ToSql;
use rusqlite::{CachedStatement, Connection};

use crate::store::StoreError;

/// The most rows one statement inserts.
pub(super) const CHUNK: usize = 32;

/// The SQL of one multi-row INSERT for 32, 16, 8, 4, 2 and 1 rows.
pub(super) struct Shapes([&'static str; 6]);

/// `n` copies of the row literal `$row`, comma-separated (n a power of two).
macro_rules! rows {
    (1, $row:literal) => {
        $row
    };
    (2, $row:literal) => {
        concat!($row, ", ", $row)
    };
    (4, $row:literal) => {
        concat!(rows!(2, $row), ", ", rows!(2, $row))
    };
    (8, $row:literal) => {
        concat!(rows!(4, $row), ", ", rows!(4, $row))
    };
    (16, $row:literal) => {
        concat!(rows!(8, $row), ", ", rows!(8, $row))
    };
    (32, $row:literal) => {
        concat!(rows!(16, $row), ", ", rows!(16, $row))
    };
}

/// The six shapes of `$head VALUES $row, … $tail`.
macro_rules! shapes {
    ($head:literal, $row:literal, $tail:literal) => {
        Shapes([
            concat!($head, " VALUES ", rows!(32, $row), $tail),
            concat!($head, " VALUES ", rows!(16, $row), $tail),
            concat!($head, " VALUES ", rows!(8, $row), $tail),
            concat!($head, " VALUES ", rows!(4, $row), $tail),
            concat!($head, " VALUES ", rows!(2, $row), $tail),
            concat!($head, " VALUES ", rows!(1, $row), $tail),
        ])
    };
}

/// Inbox rows: 7 parameters each.
pub(super) const INBOX: Shapes = shapes!(
    "INSERT INTO device_inbox \
     (user_id, device_id, sender, event_type, content_json, message_id, received_ts)",
    "(?, ?, ?, ?, ?, ?, ?)",
    ""
);

/// Outbox rows of a client send: 4 parameters each.
pub(super) const OUTBOX: Shapes = shapes!(
    "INSERT INTO outbox (destination, edu_json, message_count, queued_ts)",
    "(?, ?, ?, ?)",
    ""
);

/// Inbound message ids: 3 parameters each; returns the ids recorded (not
/// those seen before, nor a repeat inside the statement), in no order.
pub(super) const MESSAGE_IDS: Shapes = shapes!(
    "INSERT OR IGNORE INTO inbound_message_ids (origin, message_id, received_ts)",
    "(?, ?, ?)",
    " RETURNING message_id"
);

/// Trace journal rows: 10 parameters each.
pub(super) const TRACE: Shapes = shapes!(
    "INSERT INTO trace_events \
     (ts, kind, message_id, txn_id, peer, user_id, device_id, first_id, last_id, detail)",
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    ""
);

impl Shapes {
    /// The largest shape for at most `rows` rows (at least 1), with its row count.
    fn largest(&self, rows: usize) -> (&'static str, usize) {
        let mut n = CHUNK;
        for sql in self.0 {
            if n <= rows {
                return (sql, n);
            }
            n /= 2;
        }
        (self.0[5], 1)
    }
}

/// Inserts `rows` in order with as few statements as the shapes allow:
/// `run` binds one statement's rows (`bind_row`) and executes it.
pub(super) fn insert<'r, T>(
    conn: &Connection,
    shapes: &Shapes,
    rows: &'r [T],
    mut run: impl FnMut(&mut CachedStatement<'_>, &'r [T]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut rest = rows;
    while !rest.is_empty() {
        let (sql, n) = shapes.largest(rest.len());
        let (chunk, tail) = rest.split_at(n);
        run(&mut conn.prepare_cached(sql)?, chunk)?;
        rest = tail;
    }
    Ok(())
}

/// Binds the parameters of the `index`-th row of a statement.
pub(super) fn bind_row(
    stmt: &mut CachedStatement<'_>,
    index: usize,
    params: &[&dyn ToSql],
) -> Result<(), StoreError> {
    let first = index * params.len() + 1;
    for (k, param) in params.iter().enumerate() {
        stmt.raw_bind_parameter(first + k, *param)?;
    }
    Ok(())
}

/// The rowid of the first of the `rows` rows the statement just executed
/// inserted (they took consecutive rowids, the last one last).
pub(super) fn first_rowid(conn: &Connection, rows: usize) -> i64 {
    let rows = i64::try_from(rows).unwrap_or(i64::MAX);
    conn.last_insert_rowid().saturating_sub(rows - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_halve_and_hold_their_row_counts() {
        for (i, sql) in INBOX.0.iter().enumerate() {
            assert_eq!(sql.matches('(').count() - 1, CHUNK >> i, "{sql}");
        }
        assert_eq!(INBOX.largest(70), (INBOX.0[0], 32));
        assert_eq!(INBOX.largest(6), (INBOX.0[3], 4));
        assert_eq!(INBOX.largest(1), (INBOX.0[5], 1));
        assert!(MESSAGE_IDS.0[5].ends_with("(?, ?, ?) RETURNING message_id"));
    }

    #[test]
    fn rows_keep_their_order_and_consecutive_rowids() {
        let conn = Connection::open_in_memory().expect("memory db");
        conn.execute_batch(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT,
             edu_json TEXT, message_count INTEGER, queued_ts INTEGER)",
        )
        .expect("schema");
        for total in [1usize, 31, 32, 70] {
            let rows: Vec<String> = (0..total).map(|i| format!("e{i}")).collect();
            let mut firsts = Vec::new();
            insert(&conn, &OUTBOX, &rows, |stmt, chunk| {
                for (i, edu) in chunk.iter().enumerate() {
                    bind_row(stmt, i, &[&"d", edu, &1, &0])?;
                }
                stmt.raw_execute()?;
                firsts.push((first_rowid(&conn, chunk.len()), chunk.to_vec()));
                Ok(())
            })
            .expect("insert");
            for (first, chunk) in firsts {
                for (offset, edu) in chunk.iter().enumerate() {
                    let stored: String = conn
                        .query_row(
                            "SELECT edu_json FROM outbox WHERE seq = ?1",
                            [first + offset as i64],
                            |r| r.get(0),
                        )
                        .expect("row");
                    assert_eq!(&stored, edu);
                }
            }
        }
    }
}
