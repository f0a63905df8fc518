//! SQL of the trace journal in the PostgreSQL backend (`store::trace` holds
//! the row kinds). Every journal write is a statement of the transaction it
//! records, or a data-modifying CTE of that transaction's one statement, so
//! it commits exactly when its event does; each is conditional on
//! `trace_settings.enabled`. `trace_journal` reads one query's rows back.
//!
//! The hot writes (client sends, inbound transactions, `/sync`
//! acknowledgements) first ask `Switch`, this worker's copy of the
//! setting: when it is off they run no journal statement (and build no
//! rows) at all. The worker that changes the setting (`set_enabled`)
//! updates its copy at once; every worker reloads its copy from the table
//! when it is older than `Switch::REFRESH_MS`, so after another worker
//! turns the journal on, this one journals those writes within 2 s (when
//! it is turned off, the table condition every statement keeps stops
//! them at once). The outbox's statements carry the condition in the same
//! statement and need no copy.

use std::time::Instant;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::Fail;
use crate::store::TimestampMs;
use crate::store::trace::{
    Detail, MAX_TRACED_MESSAGES, PendingInboxRow, QueuedEdu, TraceEvent, TraceQuery, TraceRecords,
    delivered_lists, delivered_message_ids, detail_recipients,
};

/// The condition every journal insert carries.
pub const ENABLED: &str = "(SELECT enabled FROM trace_settings WHERE id = 1)";

/// Deletes up to `$2` rows older than `$1`, looking only at the oldest
/// `$2` rows (ids grow with time).
pub const PRUNE: &str = "DELETE FROM trace_events WHERE id IN
     (SELECT id FROM (SELECT id, ts FROM trace_events ORDER BY id LIMIT $2) AS oldest
      WHERE ts <= $1)";

/// Removes the in-flight record `$1`/`$2`, returning its seqs, and writes
/// the attempt's journal row with `outcome` at `$3`, in one statement.
pub(super) fn take_in_flight(outcome: &str) -> String {
    format!(
        "WITH taken AS (
             DELETE FROM outbox_txn WHERE destination = $1 AND txn_id = $2 RETURNING seqs
         ),
         traced AS (
             INSERT INTO trace_events (ts, kind, txn_id, peer, detail)
             SELECT $3::int8, 'attempt', $2::text, $1::text,
                    json_build_object('outcome', '{outcome}'::text, 'reason', NULL::text)::text
             FROM taken WHERE {}
         )
         SELECT seqs FROM taken",
        ENABLED
    )
}

/// `begin_txn`'s statement: the record and its `txn` row (a CTE).
pub(super) fn begin_txn_sql() -> String {
    format!(
        "WITH traced AS (
                 INSERT INTO trace_events (ts, kind, txn_id, peer, first_id, last_id, detail)
                 SELECT $5::int8, 'txn', $2::text, $1::text, ($3::int8[])[1],
                        ($3::int8[])[cardinality($3::int8[])],
                        json_build_object('edus', cardinality($3::int8[]))::text
                 WHERE {}
             )
             INSERT INTO outbox_txn (destination, txn_id, seqs, body, edus_at)
             VALUES ($1, $2, $3, $4, $6)",
        ENABLED
    )
}

/// `set_retry_state`'s statement: `upsert` (`$1`..`$6`) and, when a
/// transaction is in flight and the state is a failure, its `attempt` row
/// (a CTE; `rate_limited` when the failure count did not grow).
pub(super) fn set_retry_state_sql(upsert: &str) -> String {
    format!(
        "WITH traced AS (
                 INSERT INTO trace_events (ts, kind, txn_id, peer, detail)
                 SELECT $6::int8, 'attempt', t.txn_id, $1::text,
                        json_build_object(
                            'outcome',
                            CASE WHEN $2::int4 > coalesce((SELECT failures FROM destinations
                                                     WHERE destination = $1), 0)
                                 THEN 'retry' ELSE 'rate_limited' END,
                            'reason', $5::text)::text
                 FROM outbox_txn t
                 WHERE t.destination = $1 AND $5::text IS NOT NULL AND $3::int8 > 0 AND {}
             )
             {upsert}",
        ENABLED
    )
}

/// This worker's copy of `trace_settings.enabled` (see the module doc).
#[derive(Debug)]
pub(super) struct Switch {
    state: std::sync::Mutex<SwitchState>,
}

#[derive(Debug)]
struct SwitchState {
    on: bool,
    /// When `on` was last read from the table or set here (None: never).
    checked: Option<Instant>,
    /// Counts `set` calls, so that a reload racing with one keeps its value.
    sets: u64,
}

impl Switch {
    /// How old the copy may get before the next write reloads it.
    pub(super) const REFRESH_MS: u64 = 2_000;

    pub(super) fn new() -> Switch {
        Switch {
            state: std::sync::Mutex::new(SwitchState {
                on: false,
                checked: None,
                sets: 0,
            }),
        }
    }

    /// Whether the journal is on, reloading the copy first (one statement
    /// on `c`, before the caller's transaction) when it is stale.
    pub(super) async fn on(&self, c: &impl GenericClient) -> Result<bool, Fail> {
        let refresh = std::time::Duration::from_millis(Self::REFRESH_MS);
        let sets = {
            let mut state = crate::sync::lock(&self.state);
            if state.checked.is_some_and(|at| at.elapsed() < refresh) {
                return Ok(state.on);
            }
            // Concurrent writes use the old copy meanwhile, not a second reload.
            state.checked = Some(Instant::now());
            state.sets
        };
        let stmt = c
            .prepare_cached("SELECT enabled FROM trace_settings WHERE id = 1")
            .await?;
        let on = c
            .query_opt(&stmt, &[])
            .await?
            .is_some_and(|row| row.get::<_, bool>(0));
        let mut state = crate::sync::lock(&self.state);
        if state.sets == sets {
            state.on = on;
        }
        Ok(state.on)
    }

    fn set(&self, on: bool) {
        let mut state = crate::sync::lock(&self.state);
        state.on = on;
        state.checked = Some(Instant::now());
        state.sets += 1;
    }
}

/// Journal rows to write with one statement.
#[derive(Debug, Default)]
pub(super) struct Rows<'a> {
    kind: Vec<&'a str>,
    message_id: Vec<Option<&'a str>>,
    txn_id: Vec<Option<&'a str>>,
    peer: Vec<Option<&'a str>>,
    user_id: Vec<Option<&'a str>>,
    device_id: Vec<Option<&'a str>>,
    first_id: Vec<Option<i64>>,
    last_id: Vec<Option<i64>>,
    detail: Vec<String>,
}

/// One journal row (see `Rows::push`).
#[derive(Debug, Default)]
pub(super) struct Row<'a> {
    pub kind: &'a str,
    pub message_id: Option<&'a str>,
    pub txn_id: Option<&'a str>,
    pub peer: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub device_id: Option<&'a str>,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    pub detail: String,
}

impl<'a> Rows<'a> {
    pub(super) fn push(&mut self, row: Row<'a>) {
        self.kind.push(row.kind);
        self.message_id.push(row.message_id);
        self.txn_id.push(row.txn_id);
        self.peer.push(row.peer);
        self.user_id.push(row.user_id);
        self.device_id.push(row.device_id);
        self.first_id.push(row.first_id);
        self.last_id.push(row.last_id);
        self.detail.push(row.detail);
    }

    /// Writes the rows, stamped `now_ms`, in the order pushed (if the
    /// journal is on).
    pub(super) async fn write(
        &self,
        c: &impl GenericClient,
        now_ms: TimestampMs,
    ) -> Result<(), Fail> {
        if self.kind.is_empty() {
            return Ok(());
        }
        let stmt = c
            .prepare_cached(&format!(
                "INSERT INTO trace_events
                     (ts, kind, message_id, txn_id, peer, user_id, device_id, first_id, last_id,
                      detail)
                 SELECT $1, k, m, t, p, u, d, f, l, x
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                             $7::text[], $8::int8[], $9::int8[], $10::text[])
                      WITH ORDINALITY AS r (k, m, t, p, u, d, f, l, x, o)
                 WHERE {ENABLED}
                 ORDER BY o"
            ))
            .await?;
        c.execute(
            &stmt,
            &[
                &now_ms,
                &self.kind,
                &self.message_id,
                &self.txn_id,
                &self.peer,
                &self.user_id,
                &self.device_id,
                &self.first_id,
                &self.last_id,
                &self.detail,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Records that a message (or the messages of an EDU) was dropped before
/// delivery: `place` names where it was (a destination's outbox, a
/// device's inbox), `reason` why. For the retention rules (inbox TTL and
/// cap, dead destinations), inside the caller's transaction.
pub(super) async fn record_expired(
    c: &impl GenericClient,
    now_ms: TimestampMs,
    message_id: &str,
    place: &str,
    reason: &str,
) -> Result<(), Fail> {
    let mut rows = Rows::default();
    rows.push(Row {
        kind: "expired",
        message_id: Some(message_id),
        peer: Some(place),
        detail: Detail::default()
            .str("reason", reason)
            .str("where", place)
            .finish(),
        ..Row::default()
    });
    rows.write(c, now_ms).await
}

/// Stores the setting (committed on return: the statement runs alone) and
/// updates this worker's copy.
pub(super) async fn set_enabled(
    c: &impl GenericClient,
    switch: &Switch,
    on: bool,
) -> Result<(), Fail> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO trace_settings (id, enabled) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET enabled = excluded.enabled",
        )
        .await?;
    c.execute(&stmt, &[&on]).await?;
    switch.set(on);
    Ok(())
}

// --- reading -------------------------------------------------------------------

const COLUMNS: &str =
    "id, ts, kind, message_id, txn_id, peer, user_id, device_id, first_id, last_id, detail";

async fn select(
    c: &impl GenericClient,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<TraceEvent>, Fail> {
    let stmt = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM trace_events WHERE {filter}"
        ))
        .await?;
    Ok(c.query(&stmt, params)
        .await?
        .iter()
        .map(|r| TraceEvent {
            id: r.get(0),
            ts: r.get(1),
            kind: r.get(2),
            message_id: r.get(3),
            txn_id: r.get(4),
            peer: r.get(5),
            user_id: r.get(6),
            device_id: r.get(7),
            first_id: r.get(8),
            last_id: r.get(9),
            detail: r.get(10),
        })
        .collect())
}

fn push_id(ids: &mut Vec<String>, id: &str) {
    if !id.is_empty() && !ids.iter().any(|i| i == id) {
        ids.push(id.to_owned());
    }
}

/// Everything about the messages `query` names (see `TraceRecords`); the
/// same reads as the SQLite backend's.
pub(super) async fn trace_journal(
    c: &impl GenericClient,
    query: &TraceQuery,
) -> Result<TraceRecords, Fail> {
    let mut out = TraceRecords::default();
    match query {
        TraceQuery::MessageId(m) => out.message_ids.push(m.clone()),
        TraceQuery::TxnId(t) | TraceQuery::Id(t) => {
            if matches!(query, TraceQuery::Id(_)) {
                out.message_ids.push(t.clone());
            }
            let rows = select(c, "txn_id = $1 ORDER BY id", &[t]).await?;
            for row in &rows {
                if let Some(m) = &row.message_id {
                    push_id(&mut out.message_ids, m);
                }
                if row.kind == "txn" {
                    let carried = select(
                        c,
                        "kind = 'queued' AND peer = $1 AND first_id BETWEEN $2 AND $3
                         AND message_id IS NOT NULL ORDER BY id",
                        &[&row.peer, &row.first_id, &row.last_id],
                    )
                    .await?;
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
                c,
                "user_id = $1 AND ($2::text IS NULL OR device_id = $2)
                 ORDER BY id DESC LIMIT 200",
                &[user_id, device_id],
            )
            .await?;
            let stmt = c
                .prepare_cached(
                    "SELECT message_id FROM device_inbox
                     WHERE user_id = $1 AND ($2::text IS NULL OR device_id = $2)
                     ORDER BY stream_id DESC LIMIT $3",
                )
                .await?;
            let limit = MAX_TRACED_MESSAGES as i64;
            for r in c.query(&stmt, &[user_id, device_id, &limit]).await? {
                push_id(&mut out.message_ids, r.get(0));
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
        message_closure(c, &m, &mut out).await?;
    }
    out.events.sort_by_key(|e| e.id);
    out.events.dedup_by_key(|e| e.id);
    Ok(out)
}

async fn message_closure(
    c: &impl GenericClient,
    m: &str,
    out: &mut TraceRecords,
) -> Result<(), Fail> {
    let own = select(c, "message_id = $1 ORDER BY id", &[&m]).await?;
    for row in &own {
        match row.kind.as_str() {
            "queued" => {
                let (Some(peer), Some(seq)) = (&row.peer, row.first_id) else {
                    continue;
                };
                let txns = select(
                    c,
                    "kind = 'txn' AND peer = $1 AND first_id <= $2
                     ORDER BY first_id DESC LIMIT 32",
                    &[peer, &seq],
                )
                .await?;
                for txn in txns.into_iter().filter(|t| t.last_id >= Some(seq)) {
                    if let Some(t) = &txn.txn_id {
                        out.events.extend(
                            select(
                                c,
                                "txn_id = $1 AND peer = $2 AND kind = 'attempt' ORDER BY id",
                                &[t, peer],
                            )
                            .await?,
                        );
                    }
                    out.events.push(txn);
                }
                let stmt = c
                    .prepare_cached("SELECT 1 FROM outbox WHERE destination = $1 AND seq = $2")
                    .await?;
                if c.query_opt(&stmt, &[peer, &seq]).await?.is_some() {
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
                    out.events.extend(
                        select(
                            c,
                            "txn_id = $1 AND peer = $2 AND kind = 'received'",
                            &[t, peer],
                        )
                        .await?,
                    );
                }
                let (Some(a), Some(b)) = (row.first_id, row.last_id) else {
                    continue;
                };
                for user in detail_recipients(&row.detail) {
                    let acks = select(
                        c,
                        "user_id = $1 AND id > $2 AND kind = 'delivered'
                         AND last_id >= $3 AND first_id <= $4 ORDER BY id",
                        &[&user, &row.id, &a, &b],
                    )
                    .await?;
                    out.events
                        .extend(acks.into_iter().filter(|e| delivered_lists(&e.detail, m)));
                }
                let stmt = c
                    .prepare_cached(
                        "SELECT user_id, device_id, stream_id, message_id FROM device_inbox
                         WHERE stream_id BETWEEN $1 AND $2 AND message_id = $3
                         ORDER BY stream_id",
                    )
                    .await?;
                for r in c.query(&stmt, &[&a, &b, &m]).await? {
                    out.pending.push(PendingInboxRow {
                        user_id: r.get(0),
                        device_id: r.get(1),
                        stream_id: r.get(2),
                        message_id: r.get(3),
                    });
                }
            }
            _ => {}
        }
    }
    out.events.extend(own);
    Ok(())
}
