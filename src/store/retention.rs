//! Retention of undelivered messages (SECURITY-REVIEW F13, DESIGN §8):
//! what the pruner may expire besides dedupe records, and the record of
//! what it expired. Three rules, each off unless configured (`[retention]`):
//!
//! - **TTL per event type** for inbox rows: a pattern is an exact event
//!   type or a prefix ending in `*` (`m.key.verification.*`; `*` alone
//!   matches every type). The most specific pattern that matches a type
//!   decides its TTL: an exact type over any wildcard, a longer prefix over
//!   a shorter one. A type no pattern matches is kept until delivered.
//! - **Inbox cap per device**: when a device holds more rows than the cap,
//!   the oldest beyond it are dropped (newest kept).
//! - **Dead destinations**: once a destination has failed continuously (no
//!   success since `failing_since`) for the configured period, its queued,
//!   in-flight and quarantined rows are deleted.
//!
//! Every expired row comes back as an `ExpiredMessage` (logged and counted
//! by `store::pruner`) and is added to the persisted totals
//! (`ExpiryTotal`, shown by `courier status`). The SQL is the backends'
//! (`sqlite/retention.rs`, `postgres/retention.rs`); this file holds the
//! policy, its pure rules and the types both backends return.

use serde::Deserialize;

/// Unix milliseconds (`store::TimestampMs`; this file imports nothing of
/// `store`, which re-exports it).
type TimestampMs = i64;

/// Which table an expired row left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExpiryKind {
    Inbox,
    Outbox,
}

impl ExpiryKind {
    /// The `kind` label of `courier_expired_messages_total` and the stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryKind::Inbox => "inbox",
            ExpiryKind::Outbox => "outbox",
        }
    }
}

/// Why a row was expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExpiryReason {
    /// Older than its event type's time-to-live.
    Ttl,
    /// Beyond the per-device inbox cap (the oldest go first).
    InboxCap,
    /// Its destination failed continuously for longer than the limit.
    DeadDestination,
}

impl ExpiryReason {
    /// Every reason, in the order `courier status` lists them.
    pub const ALL: [ExpiryReason; 3] = [
        ExpiryReason::Ttl,
        ExpiryReason::InboxCap,
        ExpiryReason::DeadDestination,
    ];

    /// The `reason` label of `courier_expired_messages_total` and the stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryReason::Ttl => "ttl",
            ExpiryReason::InboxCap => "inbox_cap",
            ExpiryReason::DeadDestination => "dead_destination",
        }
    }

    /// The table rows expired for this reason come from.
    pub fn kind(self) -> ExpiryKind {
        match self {
            ExpiryReason::Ttl | ExpiryReason::InboxCap => ExpiryKind::Inbox,
            ExpiryReason::DeadDestination => ExpiryKind::Outbox,
        }
    }

    /// The reason stored under `name` (`as_str`), if any.
    pub fn parse(name: &str) -> Option<ExpiryReason> {
        ExpiryReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// An event-type pattern of an inbox TTL rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventTypePattern {
    /// This type only.
    Exact(String),
    /// Every type starting with this prefix (the pattern without its
    /// trailing `*`; empty for `*`).
    Prefix(String),
}

impl EventTypePattern {
    /// Parses `m.room_key_request` or `m.key.verification.*`: non-empty, at
    /// most 255 bytes, and a `*` only as the last character.
    pub fn parse(pattern: &str) -> Result<EventTypePattern, String> {
        if pattern.is_empty() {
            return Err("an empty event type pattern matches nothing".to_owned());
        }
        if pattern.len() > 255 {
            return Err("an event type pattern is at most 255 bytes".to_owned());
        }
        match pattern.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err(format!(
                "{pattern:?}: `*` is allowed only at the end of a pattern"
            )),
            Some(prefix) => Ok(EventTypePattern::Prefix(prefix.to_owned())),
            None if pattern.contains('*') => Err(format!(
                "{pattern:?}: `*` is allowed only at the end of a pattern"
            )),
            None => Ok(EventTypePattern::Exact(pattern.to_owned())),
        }
    }

    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            EventTypePattern::Exact(t) => t == event_type,
            EventTypePattern::Prefix(p) => event_type.starts_with(p.as_str()),
        }
    }

    /// Higher is more specific: any exact type, then longer prefixes.
    fn specificity(&self) -> (bool, usize) {
        match self {
            EventTypePattern::Exact(t) => (true, t.len()),
            EventTypePattern::Prefix(p) => (false, p.len()),
        }
    }

    /// Whether some event type matches both patterns.
    fn overlaps(&self, other: &EventTypePattern) -> bool {
        match (self, other) {
            (EventTypePattern::Exact(a), b) | (b, EventTypePattern::Exact(a)) => b.matches(a),
            (EventTypePattern::Prefix(a), EventTypePattern::Prefix(b)) => {
                a.starts_with(b.as_str()) || b.starts_with(a.as_str())
            }
        }
    }
}

impl std::fmt::Display for EventTypePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventTypePattern::Exact(t) => f.write_str(t),
            EventTypePattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// One inbox TTL rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxTtl {
    pub pattern: EventTypePattern,
    /// A matching row older than this is expired.
    pub ttl_ms: i64,
}

/// A TTL rule as a backend runs it: the rows it expires match `rule` and
/// none of the more specific patterns in `unless` (which decide for those
/// rows themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlPlan<'a> {
    pub rule: &'a InboxTtl,
    pub unless: Vec<&'a EventTypePattern>,
}

/// What the pruner may expire (`[retention]`); `ExpiryPolicy::KEEP`
/// expires nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiryPolicy {
    /// Most specific first (see `ExpiryPolicy::new`).
    inbox_ttl: Vec<InboxTtl>,
    /// The most rows one device's inbox keeps (None: no cap).
    pub inbox_cap: Option<u32>,
    /// A destination failing continuously for this long loses its rows
    /// (None: never).
    pub dead_destination_ms: Option<i64>,
}

impl ExpiryPolicy {
    /// Keeps everything.
    pub const KEEP: ExpiryPolicy = ExpiryPolicy {
        inbox_ttl: Vec::new(),
        inbox_cap: None,
        dead_destination_ms: None,
    };

    /// A policy with these rules, sorted most specific first (a second rule
    /// with the same pattern is ignored: config rejects it before).
    pub fn new(
        mut inbox_ttl: Vec<InboxTtl>,
        inbox_cap: Option<u32>,
        dead_destination_ms: Option<i64>,
    ) -> ExpiryPolicy {
        inbox_ttl.sort_by_key(|r| {
            (
                std::cmp::Reverse(r.pattern.specificity()),
                r.pattern.to_string(),
            )
        });
        inbox_ttl.dedup_by(|a, b| a.pattern == b.pattern);
        ExpiryPolicy {
            inbox_ttl,
            inbox_cap,
            dead_destination_ms,
        }
    }

    /// The rules, most specific first.
    pub fn inbox_ttl(&self) -> &[InboxTtl] {
        &self.inbox_ttl
    }

    /// The TTL of an event type: that of the most specific matching rule.
    pub fn ttl_for(&self, event_type: &str) -> Option<i64> {
        self.inbox_ttl
            .iter()
            .find(|r| r.pattern.matches(event_type))
            .map(|r| r.ttl_ms)
    }

    /// Each rule with the more specific patterns that take precedence over
    /// it for some types, so that every row is judged by `ttl_for`'s rule.
    pub fn ttl_plans(&self) -> Vec<TtlPlan<'_>> {
        self.inbox_ttl
            .iter()
            .enumerate()
            .map(|(i, rule)| TtlPlan {
                rule,
                unless: self.inbox_ttl[..i]
                    .iter()
                    .map(|r| &r.pattern)
                    .filter(|p| **p != rule.pattern && p.overlaps(&rule.pattern))
                    .collect(),
            })
            .collect()
    }

    /// Whether any rule is on.
    pub fn expires_anything(&self) -> bool {
        !self.inbox_ttl.is_empty() || self.inbox_cap.is_some() || self.dead_destination_ms.is_some()
    }
}

/// Where an outbox row was when its destination was declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxHold {
    Queued,
    /// Part of the recorded in-flight transaction.
    InFlight,
    Quarantined,
}

impl OutboxHold {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxHold::Queued => "queued",
            OutboxHold::InFlight => "in_flight",
            OutboxHold::Quarantined => "quarantined",
        }
    }
}

/// What identifies an expired outbox EDU in logs and traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEduId {
    /// An `m.direct_to_device` EDU: its `message_id`.
    ToDevice { message_id: String },
    /// A device-list EDU: the local user, device (`""` for an
    /// `m.signing_key_update`) and its `stream_id`. The peer sees a gap in
    /// the `prev_id` chain of the next update and resyncs the user.
    DeviceList {
        user_id: String,
        device_id: String,
        stream_id: Option<i64>,
    },
    /// Anything else (an EDU without a `message_id`).
    Other,
}

impl std::fmt::Display for OutboxEduId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutboxEduId::ToDevice { message_id } => f.write_str(message_id),
            OutboxEduId::DeviceList {
                user_id,
                device_id,
                stream_id,
            } => match stream_id {
                Some(stream_id) => write!(f, "{user_id}/{device_id}/{stream_id}"),
                None => write!(f, "{user_id}/{device_id}"),
            },
            OutboxEduId::Other => f.write_str("-"),
        }
    }
}

/// The head of a stored EDU: its type and, for to-device EDUs, the
/// `message_id` (nothing else of the body is kept).
#[derive(Deserialize)]
struct EduHead {
    #[serde(default)]
    edu_type: String,
    #[serde(default)]
    content: Option<EduContentHead>,
}

#[derive(Deserialize)]
struct EduContentHead {
    #[serde(default)]
    message_id: Option<String>,
}

/// The EDU type and id of a stored outbox row: the device-list columns when
/// set (`dl_user`, `dl_device`, `dl_stream`), else the `message_id` in the
/// EDU's content. Never fails: a body that does not parse is `Other`.
pub fn outbox_edu_id(
    edu_json: &str,
    dl_user: Option<String>,
    dl_device: Option<String>,
    dl_stream: Option<i64>,
) -> (String, OutboxEduId) {
    let head = serde_json::from_str::<EduHead>(edu_json).ok();
    let edu_type = head
        .as_ref()
        .map(|h| h.edu_type.clone())
        .unwrap_or_default();
    if let Some(user_id) = dl_user {
        return (
            edu_type,
            OutboxEduId::DeviceList {
                user_id,
                device_id: dl_device.unwrap_or_default(),
                stream_id: dl_stream,
            },
        );
    }
    let id = match head.and_then(|h| h.content).and_then(|c| c.message_id) {
        Some(message_id) => OutboxEduId::ToDevice { message_id },
        None => OutboxEduId::Other,
    };
    (edu_type, id)
}

/// One inbox row the pruner expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredInboxMessage {
    /// `Ttl` or `InboxCap`.
    pub reason: ExpiryReason,
    pub stream_id: i64,
    /// As stored (`""` for rows older than the column).
    pub message_id: String,
    pub user_id: String,
    pub device_id: String,
    pub sender: String,
    pub event_type: String,
    pub received_ts: TimestampMs,
}

/// One outbox row (queued, in flight or quarantined) of a dead destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredOutboxEdu {
    pub destination: String,
    pub seq: i64,
    pub held: OutboxHold,
    pub edu_type: String,
    pub id: OutboxEduId,
    pub message_count: u32,
    pub queued_ts: TimestampMs,
    /// The first failure after the destination's last success.
    pub failing_since_ts: TimestampMs,
}

/// One expired row, as `Store::expire` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiredMessage {
    Inbox(ExpiredInboxMessage),
    Outbox(ExpiredOutboxEdu),
}

impl ExpiredMessage {
    /// What the trace journal records for this row, if it has a
    /// `message_id` to be traced by: the id, where it was, and why it went
    /// (`courier trace` shows it as expired).
    pub fn trace_entry(&self) -> Option<(&str, String, &'static str)> {
        match self {
            ExpiredMessage::Inbox(m) if !m.message_id.is_empty() => Some((
                m.message_id.as_str(),
                format!(
                    "inbox of {} {} (stream {})",
                    m.user_id, m.device_id, m.stream_id
                ),
                m.reason.as_str(),
            )),
            ExpiredMessage::Outbox(ExpiredOutboxEdu {
                id: OutboxEduId::ToDevice { message_id },
                destination,
                seq,
                held,
                ..
            }) => Some((
                message_id.as_str(),
                format!("outbox of {destination} (seq {seq}, {})", held.as_str()),
                ExpiryReason::DeadDestination.as_str(),
            )),
            _ => None,
        }
    }

    pub fn reason(&self) -> ExpiryReason {
        match self {
            ExpiredMessage::Inbox(m) => m.reason,
            ExpiredMessage::Outbox(_) => ExpiryReason::DeadDestination,
        }
    }

    pub fn kind(&self) -> ExpiryKind {
        self.reason().kind()
    }
}

/// How many of `expired` were expired for `reason`.
pub fn count_for(expired: &[ExpiredMessage], reason: ExpiryReason) -> u64 {
    expired.iter().filter(|m| m.reason() == reason).count() as u64
}

/// The persisted count of rows expired for one (kind, reason), since the
/// store was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryTotal {
    pub kind: ExpiryKind,
    pub reason: ExpiryReason,
    pub count: u64,
}

/// The totals to add for `expired`: one entry per reason present.
pub fn totals_of(expired: &[ExpiredMessage]) -> Vec<ExpiryTotal> {
    ExpiryReason::ALL
        .into_iter()
        .map(|reason| ExpiryTotal {
            kind: reason.kind(),
            reason,
            count: count_for(expired, reason),
        })
        .filter(|t| t.count > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, ttl_ms: i64) -> InboxTtl {
        InboxTtl {
            pattern: EventTypePattern::parse(pattern).expect("valid pattern"),
            ttl_ms,
        }
    }

    #[test]
    fn patterns_are_exact_or_a_trailing_wildcard() {
        assert_eq!(
            EventTypePattern::parse("m.room_key_request"),
            Ok(EventTypePattern::Exact("m.room_key_request".to_owned()))
        );
        assert_eq!(
            EventTypePattern::parse("m.key.verification.*"),
            Ok(EventTypePattern::Prefix("m.key.verification.".to_owned()))
        );
        assert_eq!(
            EventTypePattern::parse("*"),
            Ok(EventTypePattern::Prefix(String::new()))
        );
        for bad in ["", "m.*.x", "*m", "**", &"x".repeat(256)] {
            assert!(EventTypePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_most_specific_rule_decides_whatever_the_order() {
        let rules = vec![
            rule("*", 1),
            rule("m.key.*", 2),
            rule("m.key.verification.*", 3),
            rule("m.key.verification.done", 4),
        ];
        for order in [rules.clone(), rules.iter().rev().cloned().collect()] {
            let policy = ExpiryPolicy::new(order, None, None);
            assert_eq!(policy.ttl_for("m.key.verification.done"), Some(4));
            assert_eq!(policy.ttl_for("m.key.verification.start"), Some(3));
            assert_eq!(policy.ttl_for("m.key.other"), Some(2));
            assert_eq!(policy.ttl_for("m.room.encrypted"), Some(1));
        }
        let policy = ExpiryPolicy::new(vec![rule("m.room_key_request", 5)], None, None);
        assert_eq!(policy.ttl_for("m.room_key_request"), Some(5));
        assert_eq!(policy.ttl_for("m.room_key_request.x"), None);
        assert_eq!(policy.ttl_for("m.room.encrypted"), None);
    }

    #[test]
    fn each_plan_leaves_out_the_types_a_more_specific_rule_decides() {
        let policy = ExpiryPolicy::new(
            vec![
                rule("m.key.*", 2),
                rule("m.key.verification.done", 4),
                rule("m.room_key_request", 5),
            ],
            None,
            None,
        );
        let plans = policy.ttl_plans();
        let shown: Vec<(String, Vec<String>)> = plans
            .iter()
            .map(|p| {
                (
                    p.rule.pattern.to_string(),
                    p.unless.iter().map(|u| u.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("m.key.verification.done".to_owned(), vec![]),
                ("m.room_key_request".to_owned(), vec![]),
                (
                    "m.key.*".to_owned(),
                    vec!["m.key.verification.done".to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn outbox_ids_come_from_the_device_list_columns_or_the_message_id() {
        let to_device =
            r#"{"edu_type":"m.direct_to_device","content":{"message_id":"abc","messages":{}}}"#;
        assert_eq!(
            outbox_edu_id(to_device, None, None, None),
            (
                "m.direct_to_device".to_owned(),
                OutboxEduId::ToDevice {
                    message_id: "abc".to_owned()
                }
            )
        );
        let (edu_type, id) = outbox_edu_id(
            r#"{"edu_type":"m.device_list_update","content":{}}"#,
            Some("@a:x".to_owned()),
            Some("D".to_owned()),
            Some(7),
        );
        assert_eq!(edu_type, "m.device_list_update");
        assert_eq!(id.to_string(), "@a:x/D/7");
        assert_eq!(
            outbox_edu_id("not json", None, None, None),
            (String::new(), OutboxEduId::Other)
        );
    }
}
