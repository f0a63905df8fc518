//! The trace journal's part of the store contract (issue 18): the rows each
//! backend writes inside the transactions of the events they record, and
//! what `Store::trace_journal` reads back for one query. Assembling the rows
//! into one story per message is `crate::trace`'s job; this module holds no
//! SQL and no policy.
//!
//! The rows, by `kind` (columns not named are NULL):
//! - `accepted`: a client (or RPC) send with local recipients: `message_id`
//!   (minted for the send), `txn_id` (the client's txnId), `user_id` and
//!   `device_id` (the sender), `first_id..=last_id` (the stream ids of the
//!   inbox rows written), detail `event_type`, `rows`, `recipients`.
//! - `queued`: one remote EDU of a client send: `message_id`, `txn_id` (the
//!   client's txnId), `peer` (destination), `user_id`/`device_id` (sender),
//!   `first_id` (the outbox seq), detail `event_type`, `messages`.
//! - `txn`: a federation transaction recorded before it is sent: `txn_id`,
//!   `peer`, `first_id..=last_id` (its outbox seqs), detail `edus`.
//! - `attempt`: how one send of a transaction ended: `txn_id`, `peer`,
//!   detail `outcome` (`ok`, `retry`, `rate_limited`, `refused`), `reason`.
//! - `received`: an inbound federation transaction applied: `txn_id`,
//!   `peer` (origin), detail `edus`, `duplicates`.
//! - `applied` / `deduped`: one inbound EDU, stored or skipped as seen
//!   before: `message_id`, `txn_id`, `peer`, `user_id` (sender),
//!   `first_id..=last_id` (stream ids written), detail `event_type`, `rows`,
//!   `recipients`.
//! - `delivered`: one `/sync` acknowledgement of a device: `user_id`,
//!   `device_id`, `first_id..=last_id` (stream ids deleted), detail `since`
//!   and `rows` (`[stream_id, message_id]` pairs, at most
//!   `MAX_DELIVERED_PAIRS`).
//! - `quarantined` / `expired`: `message_id`, `peer` (or where), `first_id`
//!   (the outbox seq, if any), detail `reason` (and `where`).

/// The most `[stream_id, message_id]` pairs one `delivered` row lists; the
/// rest are counted in its `rows_total`.
pub const MAX_DELIVERED_PAIRS: usize = 1_000;

/// What an operator asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceQuery {
    /// A message_id (an EDU's, or one minted for a local send).
    MessageId(String),
    /// A client txnId or a federation transaction id (either direction).
    TxnId(String),
    /// Either of the two: what an operator types without saying which.
    Id(String),
    /// A local user as sender or recipient, optionally one device.
    User {
        user_id: String,
        device_id: Option<String>,
    },
}

/// One journal row, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    pub id: i64,
    /// Unix ms.
    pub ts: i64,
    pub kind: String,
    pub message_id: Option<String>,
    pub txn_id: Option<String>,
    pub peer: Option<String>,
    pub user_id: Option<String>,
    pub device_id: Option<String>,
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    /// A JSON object (see the module doc for its keys per kind).
    pub detail: String,
}

/// An inbox row still waiting for its device's `/sync` acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInboxRow {
    pub user_id: String,
    pub device_id: String,
    pub stream_id: i64,
    pub message_id: String,
}

/// An EDU still queued for its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEdu {
    pub destination: String,
    pub seq: i64,
}

/// Everything the journal and the live tables hold about a query's messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceRecords {
    /// The message ids the query matched, most recent first.
    pub message_ids: Vec<String>,
    /// Every journal row about them (and rows matching the query that name
    /// no message, e.g. a transaction whose EDUs' rows were pruned), by id.
    pub events: Vec<TraceEvent>,
    /// Their inbox rows not yet acknowledged.
    pub pending: Vec<PendingInboxRow>,
    /// Their EDUs still in the outbox.
    pub queued: Vec<QueuedEdu>,
}

/// The most messages one query traces (a user query: the most recent).
pub const MAX_TRACED_MESSAGES: usize = 20;

/// The `message_id` of a stored `m.direct_to_device` EDU. Courier's own
/// EDUs are canonical JSON that starts with it (`todevice::pack`), so this is
/// a prefix check; anything else is parsed.
pub fn edu_message_id(edu_json: &str) -> Option<String> {
    const HEAD: &str = "{\"content\":{\"message_id\":\"";
    if let Some(rest) = edu_json.strip_prefix(HEAD)
        && let Some(end) = rest.find('"')
        && !rest[..end].contains('\\')
    {
        return Some(rest[..end].to_owned());
    }
    let value: serde_json::Value = serde_json::from_str(edu_json).ok()?;
    value
        .get("content")?
        .get("message_id")?
        .as_str()
        .map(str::to_owned)
}

/// The detail of a `delivered` row: the acknowledging `since` and the
/// `(stream_id, message_id)` pairs deleted, at most `MAX_DELIVERED_PAIRS`.
pub fn delivered_detail(since: i64, rows: &[(i64, String)]) -> String {
    let mut detail = Detail::with_capacity(32 + rows.len().min(MAX_DELIVERED_PAIRS) * 32);
    detail.key("rows");
    detail.out.push('[');
    for (i, (stream_id, message_id)) in rows.iter().take(MAX_DELIVERED_PAIRS).enumerate() {
        if i > 0 {
            detail.out.push(',');
        }
        detail.out.push('[');
        detail.number(*stream_id);
        detail.out.push(',');
        detail.string(message_id);
        detail.out.push(']');
    }
    detail.out.push(']');
    detail.int("rows_total", rows.len() as u64);
    detail.int("since", since);
    detail.finish()
}

/// A journal row's `detail` object, written directly as the text
/// `serde_json` gives for the same object (its maps are sorted, so callers
/// add the keys in sorted order; the unit tests hold each row kind's detail
/// against `serde_json::json!`). The journal writes one per row, on the
/// writer's hot path, where building a `serde_json::Value` first cost an
/// allocation per key and value.
#[derive(Debug)]
pub struct Detail {
    out: String,
}

impl Default for Detail {
    fn default() -> Self {
        Detail::with_capacity(64)
    }
}

impl Detail {
    pub fn with_capacity(capacity: usize) -> Detail {
        let mut out = String::with_capacity(capacity);
        out.push('{');
        Detail { out }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        self.string(key);
        self.out.push(':');
    }

    fn number(&mut self, n: impl std::fmt::Display) {
        use std::fmt::Write as _;
        // Writing to a String cannot fail.
        let _ = write!(self.out, "{n}");
    }

    /// A JSON string, escaped as `serde_json` escapes it: `"`, `\` and
    /// the control characters below U+0020, nothing else.
    fn string(&mut self, s: &str) {
        self.out.push('"');
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            self.out.push_str(&s[start..i]);
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.out.push_str("\\u00");
                self.out.push(char::from(HEX[usize::from(b >> 4)]));
                self.out.push(char::from(HEX[usize::from(b & 0xf)]));
            } else {
                self.out.push_str(escape);
            }
            start = i + 1;
        }
        self.out.push_str(&s[start..]);
        self.out.push('"');
    }

    /// `"key":"value"`.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Detail {
        self.key(key);
        self.string(value);
        self
    }

    /// `"key":"value"`, or `"key":null`.
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Detail {
        match value {
            Some(value) => self.str(key, value),
            None => {
                self.key(key);
                self.out.push_str("null");
                self
            }
        }
    }

    /// `"key":n`.
    pub fn int(&mut self, key: &str, n: impl Into<i128>) -> &mut Detail {
        self.key(key);
        self.number(n.into());
        self
    }

    /// `"key":["a","b"]`.
    pub fn strs(&mut self, key: &str, values: &[&str]) -> &mut Detail {
        self.key(key);
        self.out.push('[');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.string(value);
        }
        self.out.push(']');
        self
    }

    /// The object's text.
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.out);
        out.push('}');
        out
    }
}

/// The distinct recipients of a list of local messages, sorted.
pub fn recipients<'a>(users: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut users: Vec<&str> = users.collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// The users named in an `accepted` or `applied` row's detail.
pub fn detail_recipients(detail: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(detail)
        .ok()
        .and_then(|v| {
            v.get("recipients").and_then(|r| r.as_array()).map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether a `delivered` row's detail lists `message_id`.
pub fn delivered_lists(detail: &str, message_id: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(detail)
        .ok()
        .and_then(|v| {
            v.get("rows").and_then(|r| r.as_array()).map(|rows| {
                rows.iter()
                    .any(|pair| pair.get(1).and_then(|m| m.as_str()) == Some(message_id))
            })
        })
        .unwrap_or(false)
}

/// The message ids a `delivered` row lists, in order, without repeats.
pub fn delivered_message_ids(detail: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(detail)
        && let Some(rows) = v.get("rows").and_then(|r| r.as_array())
    {
        for pair in rows {
            if let Some(m) = pair.get(1).and_then(|m| m.as_str())
                && !m.is_empty()
                && !out.iter().any(|o| o == m)
            {
                out.push(m.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_of_a_packed_edu_is_read_from_its_head() {
        let edu =
            r#"{"content":{"message_id":"AbC","messages":{}},"edu_type":"m.direct_to_device"}"#;
        assert_eq!(edu_message_id(edu).as_deref(), Some("AbC"));
        let other = r#"{"edu_type":"m.direct_to_device","content":{"message_id":"x\"y"}}"#;
        assert_eq!(edu_message_id(other).as_deref(), Some("x\"y"));
        assert_eq!(edu_message_id("{}"), None);
    }

    /// Every row kind's detail, as `Detail` writes it, is the text
    /// `serde_json::json!` gave for it (the journal's content did not
    /// change when the writers stopped building `Value`s).
    #[test]
    fn details_match_serde_json() {
        let odd = "m.t\"e\\s\nt\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}/é😀";
        let recipients = ["@a:x", odd];
        let pairs = [
            (
                Detail::default()
                    .str("event_type", odd)
                    .strs("recipients", &recipients)
                    .int("rows", 7u64)
                    .finish(),
                serde_json::json!({"event_type": odd, "rows": 7u64, "recipients": recipients}),
            ),
            (
                Detail::default()
                    .str("event_type", odd)
                    .int("messages", u32::MAX)
                    .finish(),
                serde_json::json!({"event_type": odd, "messages": u32::MAX}),
            ),
            (
                Detail::default()
                    .opt_str("event_type", None)
                    .strs("recipients", &[])
                    .int("rows", 0u64)
                    .finish(),
                serde_json::json!({"event_type": None::<&str>, "rows": 0, "recipients": Vec::<&str>::new()}),
            ),
            (
                Detail::default()
                    .int("duplicates", 3u32)
                    .int("edus", 100u64)
                    .finish(),
                serde_json::json!({"edus": 100, "duplicates": 3}),
            ),
            (
                Detail::default()
                    .str("outcome", "ok")
                    .opt_str("reason", Some(odd))
                    .finish(),
                serde_json::json!({"outcome": "ok", "reason": odd}),
            ),
            (
                Detail::default().int("edus", i64::MIN).finish(),
                serde_json::json!({"edus": i64::MIN}),
            ),
        ];
        for (written, expected) in pairs {
            assert_eq!(written, expected.to_string());
        }
        for c in (0u32..0x100).filter_map(char::from_u32) {
            let s = c.to_string();
            assert_eq!(
                Detail::default().str("k", &s).finish(),
                serde_json::json!({ "k": s }).to_string()
            );
        }
        let rows: Vec<(i64, String)> = (0..1_002).map(|i| (i, format!("m{i}{odd}"))).collect();
        let legacy = serde_json::json!({
            "since": -4,
            "rows": rows.iter().take(MAX_DELIVERED_PAIRS)
                .map(|(s, m)| serde_json::json!([s, m])).collect::<Vec<_>>(),
            "rows_total": rows.len(),
        });
        assert_eq!(delivered_detail(-4, &rows), legacy.to_string());
        assert_eq!(
            delivered_detail(1, &[]),
            serde_json::json!({"since": 1, "rows": [], "rows_total": 0}).to_string()
        );
    }

    #[test]
    fn a_delivered_detail_lists_its_pairs() {
        let detail = delivered_detail(9, &[(8, "m1".into()), (9, "m2".into())]);
        assert!(delivered_lists(&detail, "m2"));
        assert!(!delivered_lists(&detail, "m3"));
        assert_eq!(delivered_message_ids(&detail), vec!["m1", "m2"]);
    }
}
