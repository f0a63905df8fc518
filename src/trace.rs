//! Message tracing (issue 18): turns the journal rows the store returns for
//! one query (`store::trace::TraceRecords`) into one story per message —
//! accepted (from which client send, or from which origin's transaction),
//! the EDU and the transactions that carried it with every attempt and its
//! outcome, the inboxes it reached and the `/sync` that acknowledged each,
//! or where it was quarantined or expired and why — and renders it as text
//! for `courier trace`. `TraceReport` is the wire type of `GET
//! /_courier/v1/trace` and what the CLI reads back.
//!
//! It holds no SQL and no I/O: `rpc` asks the store and calls `assemble`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::trace::{TraceEvent, TraceQuery, TraceRecords};

/// The ids that follow one client send through the logs and `courier
/// trace`: its local recipients' message_id and each EDU's, comma-joined.
pub fn send_message_ids(
    local: &[crate::store::NewInboxMessage],
    remote: &[crate::store::NewOutboxEdu],
) -> String {
    let ids: Vec<String> = local
        .first()
        .map(|m| m.message_id.clone())
        .into_iter()
        .chain(
            remote
                .iter()
                .filter_map(|e| crate::store::trace::edu_message_id(&e.edu_json)),
        )
        .collect();
    ids.join(",")
}

/// Why a trace query was refused before reaching the store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceQueryError {
    #[error("give a message_id, a txn_id or a user ID")]
    Empty,
    #[error("a device can only be given with a user ID (@user:server)")]
    DeviceWithoutUser,
    #[error("the query is longer than 255 bytes")]
    TooLong,
}

/// Parses what an operator typed: `@user:server` (with an optional device)
/// is a user, anything else a message_id or txn_id.
pub fn parse_query(target: &str, device: Option<&str>) -> Result<TraceQuery, TraceQueryError> {
    let target = target.trim();
    if target.is_empty() {
        return Err(TraceQueryError::Empty);
    }
    if target.len() > 255 || device.is_some_and(|d| d.len() > 255) {
        return Err(TraceQueryError::TooLong);
    }
    if target.starts_with('@') {
        return Ok(TraceQuery::User {
            user_id: target.to_owned(),
            device_id: device.filter(|d| !d.is_empty()).map(str::to_owned),
        });
    }
    if device.is_some_and(|d| !d.is_empty()) {
        return Err(TraceQueryError::DeviceWithoutUser);
    }
    Ok(TraceQuery::Id(target.to_owned()))
}

/// The answer to one trace query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    /// The query as given (the id, or the user and device).
    pub query: String,
    /// False when nothing is recorded about it.
    pub found: bool,
    pub messages: Vec<MessageTrace>,
    /// For a txn_id query: the transactions with that id (outbound with
    /// their attempts, inbound as received), also when no message is known.
    pub transactions: Vec<TxnTrace>,
}

/// One message's story.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageTrace {
    pub message_id: String,
    /// Accepted from a local client (or RPC) send.
    pub accepted: Option<ClientSend>,
    /// Received over federation (applied or deduped), per transaction.
    pub received: Vec<Received>,
    /// The EDUs that carry it to remote servers (one, for an EDU's id).
    pub edus: Vec<EduTrace>,
    /// The inboxes it reached here.
    pub inboxes: Vec<InboxTrace>,
    /// Quarantined or expired: where and why.
    pub ends: Vec<End>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSend {
    pub ts: i64,
    pub user_id: String,
    /// Empty for a send through the RPC.
    pub device_id: String,
    pub event_type: String,
    pub txn_id: String,
    /// Inbox rows written here (a device not registered gets none).
    pub local_rows: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub ts: i64,
    pub origin: String,
    pub txn_id: String,
    /// `applied` or `deduped` (seen before from this origin).
    pub outcome: String,
    pub sender: Option<String>,
    pub event_type: Option<String>,
    pub rows: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EduTrace {
    pub destination: String,
    pub seq: i64,
    pub queued_ts: i64,
    pub messages: Option<u64>,
    /// Still in the outbox (not yet acknowledged, not quarantined).
    pub still_queued: bool,
    /// Whether a transaction carrying it got the peer's 200.
    pub acknowledged: bool,
    pub transactions: Vec<TxnTrace>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnTrace {
    pub txn_id: String,
    /// `outbound` (recorded here, sent to `peer`) or `inbound` (from `peer`).
    pub direction: String,
    pub peer: String,
    pub ts: i64,
    pub edus: Option<u64>,
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub ts: i64,
    /// `ok`, `retry`, `rate_limited` or `refused`.
    pub outcome: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxTrace {
    pub user_id: String,
    pub device_id: String,
    pub stream_id: i64,
    /// `pending` (waiting for the device's next `/sync`) or `delivered`.
    pub state: String,
    /// The acknowledging `since` of the `/sync` that delivered it.
    pub since: Option<i64>,
    /// When that `/sync` acknowledged it.
    pub delivered_ts: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// `quarantined` or `expired`.
    pub kind: String,
    pub ts: i64,
    pub place: Option<String>,
    pub seq: Option<i64>,
    pub reason: Option<String>,
}

fn detail(event: &TraceEvent) -> Value {
    serde_json::from_str(&event.detail).unwrap_or(Value::Null)
}

fn detail_str(detail: &Value, key: &str) -> Option<String> {
    detail.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn detail_u64(detail: &Value, key: &str) -> Option<u64> {
    detail.get(key).and_then(Value::as_u64)
}

fn txn_trace(txn: &TraceEvent, events: &[TraceEvent]) -> TxnTrace {
    let peer = txn.peer.clone().unwrap_or_default();
    let txn_id = txn.txn_id.clone().unwrap_or_default();
    let d = detail(txn);
    let inbound = txn.kind == "received";
    let attempts = events
        .iter()
        .filter(|e| {
            !inbound
                && e.kind == "attempt"
                && e.txn_id.as_deref() == Some(txn_id.as_str())
                && e.peer.as_deref() == Some(peer.as_str())
        })
        .map(|e| {
            let a = detail(e);
            Attempt {
                ts: e.ts,
                outcome: detail_str(&a, "outcome").unwrap_or_default(),
                reason: detail_str(&a, "reason"),
            }
        })
        .collect();
    TxnTrace {
        direction: if inbound { "inbound" } else { "outbound" }.to_owned(),
        peer,
        txn_id,
        ts: txn.ts,
        edus: detail_u64(&d, "edus"),
        attempts,
    }
}

/// One story per message of `records`, for the query described as `query`.
pub fn assemble(query: &str, records: &TraceRecords, txn_query: bool) -> TraceReport {
    let events = &records.events;
    let mut messages = Vec::new();
    for m in &records.message_ids {
        let own: Vec<&TraceEvent> = events
            .iter()
            .filter(|e| e.message_id.as_deref() == Some(m.as_str()))
            .collect();
        let mut trace = MessageTrace {
            message_id: m.clone(),
            accepted: None,
            received: Vec::new(),
            edus: Vec::new(),
            inboxes: Vec::new(),
            ends: Vec::new(),
        };
        for e in &own {
            let d = detail(e);
            match e.kind.as_str() {
                "accepted" | "queued" => {
                    let local_rows = (e.kind == "accepted")
                        .then(|| detail_u64(&d, "rows"))
                        .flatten();
                    match &mut trace.accepted {
                        Some(send) if local_rows.is_some() => send.local_rows = local_rows,
                        Some(_) => {}
                        None => {
                            trace.accepted = Some(ClientSend {
                                ts: e.ts,
                                user_id: e.user_id.clone().unwrap_or_default(),
                                device_id: e.device_id.clone().unwrap_or_default(),
                                event_type: detail_str(&d, "event_type").unwrap_or_default(),
                                txn_id: e.txn_id.clone().unwrap_or_default(),
                                local_rows,
                            })
                        }
                    }
                    if e.kind == "queued" {
                        trace.edus.push(edu_trace(e, &d, records));
                    }
                }
                "applied" | "deduped" => trace.received.push(Received {
                    ts: e.ts,
                    origin: e.peer.clone().unwrap_or_default(),
                    txn_id: e.txn_id.clone().unwrap_or_default(),
                    outcome: e.kind.clone(),
                    sender: e.user_id.clone(),
                    event_type: detail_str(&d, "event_type"),
                    rows: detail_u64(&d, "rows"),
                }),
                "quarantined" | "expired" => trace.ends.push(End {
                    kind: e.kind.clone(),
                    ts: e.ts,
                    place: detail_str(&d, "where").or_else(|| e.peer.clone()),
                    seq: e.first_id,
                    reason: detail_str(&d, "reason"),
                }),
                _ => {}
            }
        }
        for e in events.iter().filter(|e| e.kind == "delivered") {
            let d = detail(e);
            let Some(rows) = d.get("rows").and_then(Value::as_array) else {
                continue;
            };
            for pair in rows {
                if pair.get(1).and_then(Value::as_str) != Some(m.as_str()) {
                    continue;
                }
                trace.inboxes.push(InboxTrace {
                    user_id: e.user_id.clone().unwrap_or_default(),
                    device_id: e.device_id.clone().unwrap_or_default(),
                    stream_id: pair.get(0).and_then(Value::as_i64).unwrap_or_default(),
                    state: "delivered".to_owned(),
                    since: d.get("since").and_then(Value::as_i64),
                    delivered_ts: Some(e.ts),
                });
            }
        }
        for row in records.pending.iter().filter(|p| &p.message_id == m) {
            trace.inboxes.push(InboxTrace {
                user_id: row.user_id.clone(),
                device_id: row.device_id.clone(),
                stream_id: row.stream_id,
                state: "pending".to_owned(),
                since: None,
                delivered_ts: None,
            });
        }
        trace.inboxes.sort_by_key(|i| i.stream_id);
        trace.inboxes.dedup();
        if !own.is_empty() || !trace.inboxes.is_empty() {
            messages.push(trace);
        }
    }
    let transactions: Vec<TxnTrace> = if txn_query {
        events
            .iter()
            .filter(|e| {
                (e.kind == "txn" || e.kind == "received") && e.txn_id.as_deref() == Some(query)
            })
            .map(|e| txn_trace(e, events))
            .collect()
    } else {
        Vec::new()
    };
    TraceReport {
        query: query.to_owned(),
        found: !messages.is_empty() || !transactions.is_empty(),
        messages,
        transactions,
    }
}

fn edu_trace(queued: &TraceEvent, d: &Value, records: &TraceRecords) -> EduTrace {
    let destination = queued.peer.clone().unwrap_or_default();
    let seq = queued.first_id.unwrap_or_default();
    let transactions: Vec<TxnTrace> = records
        .events
        .iter()
        .filter(|e| {
            e.kind == "txn"
                && e.peer.as_deref() == Some(destination.as_str())
                && e.first_id.is_some_and(|f| f <= seq)
                && e.last_id.is_some_and(|l| l >= seq)
        })
        .map(|e| txn_trace(e, &records.events))
        .collect();
    EduTrace {
        acknowledged: transactions
            .iter()
            .any(|t| t.attempts.iter().any(|a| a.outcome == "ok")),
        still_queued: records
            .queued
            .iter()
            .any(|q| q.destination == destination && q.seq == seq),
        destination,
        seq,
        queued_ts: queued.ts,
        messages: detail_u64(d, "messages"),
        transactions,
    }
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_ts(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

fn push_txn(out: &mut String, indent: &str, txn: &TxnTrace) {
    use std::fmt::Write;
    let edus = txn.edus.map(|n| format!(" ({n} EDUs)")).unwrap_or_default();
    let _ = match txn.direction.as_str() {
        "inbound" => writeln!(
            out,
            "{indent}txn {} from {} received {}{edus}",
            txn.txn_id,
            txn.peer,
            format_ts(txn.ts)
        ),
        _ => writeln!(
            out,
            "{indent}txn {} to {} recorded {}{edus}",
            txn.txn_id,
            txn.peer,
            format_ts(txn.ts)
        ),
    };
    for attempt in &txn.attempts {
        let reason = attempt
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{indent}  attempt {} {}{reason}",
            format_ts(attempt.ts),
            attempt.outcome
        );
    }
}

/// The report as `courier trace` prints it.
pub fn render_text(report: &TraceReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if !report.found {
        let _ = writeln!(out, "no record of {}", report.query);
        return out;
    }
    for m in &report.messages {
        let _ = writeln!(out, "message {}", m.message_id);
        if let Some(a) = &m.accepted {
            let rows = a
                .local_rows
                .map(|n| format!(", {n} local inbox rows"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  accepted {} from client send: user {} device {} type {} txnId {}{rows}",
                format_ts(a.ts),
                a.user_id,
                or_dash(&a.device_id),
                a.event_type,
                a.txn_id
            );
        }
        for r in &m.received {
            let _ = writeln!(
                out,
                "  {} {} from {} in txn {} (sender {}, type {}, {} inbox rows)",
                r.outcome,
                format_ts(r.ts),
                r.origin,
                r.txn_id,
                r.sender.as_deref().unwrap_or("-"),
                r.event_type.as_deref().unwrap_or("-"),
                r.rows.unwrap_or(0)
            );
        }
        for e in &m.edus {
            let state = if e.acknowledged {
                "acknowledged by the peer"
            } else if e.still_queued {
                "still queued"
            } else {
                "not queued"
            };
            let _ = writeln!(
                out,
                "  EDU to {} seq {} queued {} ({state})",
                e.destination,
                e.seq,
                format_ts(e.queued_ts)
            );
            for txn in &e.transactions {
                push_txn(&mut out, "    ", txn);
            }
        }
        for i in &m.inboxes {
            let _ = match (i.state.as_str(), i.since, i.delivered_ts) {
                ("delivered", Some(since), Some(ts)) => writeln!(
                    out,
                    "  inbox {}/{} stream {}: delivered by /sync since={since} at {}",
                    i.user_id,
                    i.device_id,
                    i.stream_id,
                    format_ts(ts)
                ),
                _ => writeln!(
                    out,
                    "  inbox {}/{} stream {}: pending (not yet acknowledged by /sync)",
                    i.user_id, i.device_id, i.stream_id
                ),
            };
        }
        for end in &m.ends {
            let _ = writeln!(
                out,
                "  {} {} at {}: {}",
                end.kind,
                format_ts(end.ts),
                end.place.as_deref().unwrap_or("-"),
                end.reason.as_deref().unwrap_or("-")
            );
        }
    }
    for txn in &report.transactions {
        push_txn(&mut out, "", txn);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_utc() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }

    #[test]
    fn queries_parse_by_their_shape() {
        assert_eq!(
            parse_query("@a:x", Some("D")),
            Ok(TraceQuery::User {
                user_id: "@a:x".into(),
                device_id: Some("D".into())
            })
        );
        assert_eq!(parse_query("abc", None), Ok(TraceQuery::Id("abc".into())));
        assert_eq!(parse_query(" ", None), Err(TraceQueryError::Empty));
        assert_eq!(
            parse_query("abc", Some("D")),
            Err(TraceQueryError::DeviceWithoutUser)
        );
    }

    #[test]
    fn an_unknown_id_says_so() {
        let report = assemble("nope", &TraceRecords::default(), true);
        assert!(!report.found);
        assert_eq!(render_text(&report), "no record of nope\n");
    }
}
