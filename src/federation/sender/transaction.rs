//! Federation transactions as the sender builds and judges them: the
//! transaction id scheme, the request body assembled from stored EDU JSON
//! (verbatim, by concatenation, never re-serialized), the limits, and the
//! `TxnFailure` enum whose variants are the sender's decisions.
//!
//! Also what a destination task records next (`next_txn`: the body builder
//! `Store::advance` runs on the rows it peeks) and the message ids a body
//! carries, for the log. Nothing here does I/O; the destination task does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::federation::outbound::client_error::ClientError;
use crate::store::device_lists::finish_outbound_edu;
use crate::store::{NextTxn, OutboxEdu, TimestampMs};

/// EDUs per transaction (spec limit).
pub const MAX_EDUS: u32 = 100;
/// Total stored EDU bytes per transaction: well under the 12.5 MiB body
/// limit receivers apply (SPEC §9.4), leaving room for the envelope.
pub const MAX_EDU_BYTES: u64 = 12 * 1024 * 1024;

/// Issues transaction ids `<startup_ms>-<nonce>-<counter>`, URL-safe.
///
/// The receiver dedupes on (origin, txnId) for a day, so an id reused for
/// different EDUs would make it drop them as a retransmission. The start
/// time alone is not enough: several workers share one origin and can
/// start in the same millisecond (or a worker restarts within one), so a
/// random 64-bit nonce per process tells them apart.
#[derive(Debug)]
pub struct TxnIds {
    prefix: String,
    counter: AtomicU64,
}

impl TxnIds {
    pub fn new(startup_ms: TimestampMs) -> Self {
        Self::with_nonce(startup_ms, rand::random())
    }

    fn with_nonce(startup_ms: TimestampMs, nonce: u64) -> Self {
        TxnIds {
            prefix: format!("{startup_ms}-{nonce:016x}-"),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
}

/// The transaction body: `{"edus":[…],"origin","origin_server_ts","pdus":[]}`
/// with each stored `edu_json` copied in verbatim. The keys are in
/// canonical order and every stored EDU is canonical JSON (the to-device
/// packer writes it so), so the whole body is canonical JSON and the
/// request can be signed over it as it is ([`is_canonical_layout`]).
pub fn build_body(origin: &str, origin_server_ts: TimestampMs, edus: &[OutboxEdu]) -> String {
    let origin_json =
        serde_json::to_string(origin).expect("serializing a string to JSON cannot fail");
    let capacity =
        96 + origin_json.len() + edus.iter().map(|e| e.edu_json.len() + 1).sum::<usize>();
    let mut body = String::with_capacity(capacity);
    body.push_str(CANONICAL_PREFIX);
    for (i, edu) in edus.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&edu.edu_json);
    }
    body.push_str("],\"origin\":");
    body.push_str(&origin_json);
    body.push_str(",\"origin_server_ts\":");
    body.push_str(&origin_server_ts.to_string());
    body.push_str(",\"pdus\":[]}");
    body
}

/// How every body [`build_body`] writes starts.
const CANONICAL_PREFIX: &str = "{\"edus\":[";

/// Whether a stored transaction body was written by [`build_body`] in its
/// canonical layout. Bodies recorded by older versions (keys not in
/// canonical order) are signed over their parsed form instead.
pub fn is_canonical_layout(body: &[u8]) -> bool {
    body.starts_with(CANONICAL_PREFIX.as_bytes())
}

/// What `Store::advance` records next for a destination: at most `limit`
/// of its oldest rows under a fresh txnId, in the envelope `build_body`
/// writes (device-list EDUs finished first) with this moment as
/// `origin_server_ts`, so the same rows always give the same bytes.
pub fn next_txn(config: &Config, txn_ids: &TxnIds, limit: u32) -> NextTxn {
    let names_over_federation = config.e2ee.device_names_over_federation;
    NextTxn {
        txn_id: txn_ids.next(),
        max_edus: limit,
        max_bytes: MAX_EDU_BYTES,
        envelope: build_body(config.server_name.as_str(), crate::clock::now_ms(), &[]),
        edus_at: CANONICAL_PREFIX.len(),
        finish: Box::new(move |edus: &mut [OutboxEdu]| {
            finish_device_list_edus(edus, names_over_federation);
        }),
    }
}

/// Gives each device-list EDU of a peek its `prev_id` and the display-name
/// rule (`store::device_lists::finish_outbound_edu`), before the body is
/// built and recorded: a retry resends these exact bytes.
pub fn finish_device_list_edus(edus: &mut [OutboxEdu], names_over_federation: bool) {
    for edu in edus.iter_mut() {
        if let Some(meta) = &edu.device_list {
            edu.edu_json = finish_outbound_edu(&edu.edu_json, meta, names_over_federation);
        }
    }
}

/// The `message_id`s of the to-device EDUs in a transaction body, in order
/// (for the log line of each attempt; device-list EDUs have none). A body
/// that does not parse (only a corrupt store records one) names none.
pub fn carried_message_ids(body: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        edus: Vec<Edu>,
    }
    #[derive(serde::Deserialize)]
    struct Edu {
        #[serde(default)]
        content: Content,
    }
    #[derive(serde::Deserialize, Default)]
    struct Content {
        message_id: Option<String>,
    }
    serde_json::from_str::<Body>(body)
        .map(|b| {
            b.edus
                .into_iter()
                .filter_map(|e| e.content.message_id)
                .collect()
        })
        .unwrap_or_default()
}

/// What a failed send means for the destination task.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TxnFailure {
    /// The peer or the path to it failed: back off by the schedule, then
    /// resend the same transaction.
    #[error("retryable: {reason}")]
    Retry { reason: String },
    /// The peer asked us to wait this long (429): then resend the same
    /// transaction. Not counted as a failure of the peer.
    #[error("rate limited for {after:?}: {reason}")]
    RetryAfter { after: Duration, reason: String },
    /// The peer refused this payload (400/413): split the batch; a single
    /// EDU refused often enough is quarantined.
    #[error("refused with {status}: {reason}")]
    Refused { status: u16, reason: String },
}

impl TxnFailure {
    /// The decision for a client error. A 401/403 naming `our_key_id` is
    /// retried like any failure, with a reason saying the peer rejects our
    /// signing key (it is not an outage: the peer holds another key under
    /// that id, or none).
    pub fn from_client(error: &ClientError, our_key_id: &str) -> TxnFailure {
        if rejects_our_key(error, our_key_id) {
            let body = match error {
                ClientError::Status { body, .. } => short(body),
                other => other.to_string(),
            };
            return TxnFailure::Retry {
                reason: format!("{KEY_REJECTED}: {body}"),
            };
        }
        match error {
            ClientError::Status {
                status: status @ (400 | 413),
                body,
                ..
            } => TxnFailure::Refused {
                status: *status,
                reason: short(body),
            },
            ClientError::Status {
                status: 429,
                retry_after_ms,
                body,
                ..
            } => match retry_after_ms {
                Some(ms) => TxnFailure::RetryAfter {
                    after: Duration::from_millis(*ms),
                    reason: format!("429 {}", short(body)),
                },
                None => TxnFailure::Retry {
                    reason: format!("429 {}", short(body)),
                },
            },
            ClientError::Status { status, body, .. } => TxnFailure::Retry {
                reason: format!("{status} {}", short(body)),
            },
            other => TxnFailure::Retry {
                reason: other.to_string(),
            },
        }
    }

    /// A label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            TxnFailure::Retry { .. } => "retry",
            TxnFailure::RetryAfter { .. } => "rate_limited",
            TxnFailure::Refused { .. } => "refused",
        }
    }
}

/// How a failure reason of a peer that refuses our signing key starts.
pub const KEY_REJECTED: &str = "peer rejects our signing key";

/// Whether `error` is a 401 or 403 whose body names `our_key_id` (Synapse:
/// `Invalid signature for server X with key ed25519:a_1: ...`). The id must
/// stand alone: `ed25519:a_1` is not named by `ed25519:a_12`.
pub fn rejects_our_key(error: &ClientError, our_key_id: &str) -> bool {
    let ClientError::Status {
        status: 401 | 403,
        body,
        ..
    } = error
    else {
        return false;
    };
    body.match_indices(our_key_id).any(|(at, _)| {
        !body[at + our_key_id.len()..]
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

fn short(text: &str) -> String {
    let mut s: String = text.chars().take(200).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edu(seq: i64, json: &str) -> OutboxEdu {
        OutboxEdu {
            seq,
            edu_json: json.to_owned(),
            message_count: 1,
            queued_ts: 0,
            refusals: 0,
            device_list: None,
        }
    }

    #[test]
    fn body_is_the_stored_json_verbatim() {
        let a = r#"{"edu_type":"m.direct_to_device","content":{"b":1,"a":"é"}}"#;
        let b = r#"{"content":{},"edu_type":"m.direct_to_device"}"#;
        let body = build_body("origin.example:8448", 1700, &[edu(1, a), edu(2, b)]);
        assert_eq!(
            body,
            format!(
                r#"{{"edus":[{a},{b}],"origin":"origin.example:8448","origin_server_ts":1700,"pdus":[]}}"#
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(parsed["edus"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            build_body("o", 1, &[]),
            r#"{"edus":[],"origin":"o","origin_server_ts":1,"pdus":[]}"#
        );
        assert!(is_canonical_layout(body.as_bytes()));
        assert!(!is_canonical_layout(
            br#"{"origin":"o","origin_server_ts":1,"pdus":[],"edus":[]}"#
        ));
    }

    /// Signing the stored body as it is must give the bytes a receiver
    /// rebuilds from the parsed body, for every kind of content the packer
    /// stores: escapes, non-ASCII, big integers and the Python float forms
    /// Synapse signs.
    #[test]
    fn a_body_of_canonical_edus_signs_like_its_parsed_form() {
        use crate::canonical_json::{NumberStyle, to_canonical_bytes_with};
        use crate::xmatrix::RequestToSign;
        let contents = [
            serde_json::json!({"z": 1, "a": "é\n\u{1}\"", "m": [1, {"y": 2, "b": null}]}),
            serde_json::json!({"big": 9007199254740993_u64, "neg": -5}),
            serde_json::json!({"f": 1.5, "g": 1e30, "h": -0.0, "i": 10.0}),
            serde_json::json!({}),
        ];
        for content in contents {
            let value = serde_json::json!({
                "content": {
                    "message_id": "m",
                    "messages": {"@u:d": {"D": content}},
                    "sender": "@s:o",
                    "type": "t",
                },
                "edu_type": "m.direct_to_device",
            });
            let stored = String::from_utf8(
                to_canonical_bytes_with(&value, NumberStyle::Python).expect("encodable"),
            )
            .expect("utf-8");
            let body = build_body("o.example", 1700, &[edu(1, &stored), edu(2, &stored)]);
            let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
            let uri = "/_matrix/federation/v1/send/1-0";
            let expected = RequestToSign {
                method: "PUT",
                uri,
                origin: "o.example",
                destination: "d.example",
                content: Some(&parsed),
            }
            .signing_bytes()
            .expect("signable");
            let direct = RequestToSign {
                method: "PUT",
                uri,
                origin: "o.example",
                destination: "d.example",
                content: None,
            }
            .raw_content_bytes(Some(body.as_bytes()));
            assert_eq!(
                String::from_utf8_lossy(&direct),
                String::from_utf8_lossy(&expected),
                "{stored}"
            );
        }
    }

    #[test]
    fn txn_ids_are_distinct_and_url_safe() {
        let ids = TxnIds::with_nonce(1_700_000_000_000, 0xab);
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a, "1700000000000-00000000000000ab-0");
        assert!(
            b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._~-".contains(&c))
        );
    }

    #[test]
    fn processes_started_in_the_same_millisecond_mint_different_ids() {
        // Two workers of one origin, or a worker restarted within a
        // millisecond: their first ids must differ or the receiver would
        // drop the second transaction as a retransmission.
        let first = TxnIds::new(1_700_000_000_000);
        let second = TxnIds::new(1_700_000_000_000);
        assert_ne!(first.next(), second.next());
    }

    const KEY: &str = "ed25519:a_Zx9Q2w";

    #[test]
    fn a_401_naming_our_key_is_a_rejected_key_not_an_outage() {
        let status = |status: u16, body: &str| ClientError::Status {
            destination: "d".into(),
            status,
            body: body.into(),
            retry_after_ms: None,
        };
        let synapse = r#"{"errcode":"M_UNAUTHORIZED","error":"Invalid signature for server localhost:38448 with key ed25519:a_Zx9Q2w: Unable to verify signature for localhost:38448"}"#;
        for code in [401, 403] {
            assert!(rejects_our_key(&status(code, synapse), KEY), "{code}");
            let TxnFailure::Retry { reason } = TxnFailure::from_client(&status(code, synapse), KEY)
            else {
                panic!("a rejected key is retried");
            };
            assert!(reason.starts_with(KEY_REJECTED), "{reason}");
        }
        // Other statuses, other keys, a longer id, no key named: not ours.
        assert!(!rejects_our_key(&status(500, synapse), KEY));
        assert!(!rejects_our_key(&status(401, synapse), "ed25519:a_1"));
        assert!(!rejects_our_key(
            &status(401, "with key ed25519:a_Zx9Q2wX"),
            KEY
        ));
        assert!(!rejects_our_key(
            &status(401, r#"{"errcode":"M_UNAUTHORIZED"}"#),
            KEY
        ));
        let TxnFailure::Retry { reason } = TxnFailure::from_client(&status(401, "{}"), KEY) else {
            panic!("a 401 is retried");
        };
        assert!(!reason.starts_with(KEY_REJECTED), "{reason}");
    }

    #[test]
    fn client_errors_map_to_decisions() {
        let status = |status: u16, retry_after_ms: Option<u64>| ClientError::Status {
            destination: "d".into(),
            status,
            body: "{}".into(),
            retry_after_ms,
        };
        assert!(matches!(
            TxnFailure::from_client(&status(400, None), KEY),
            TxnFailure::Refused { status: 400, .. }
        ));
        assert!(matches!(
            TxnFailure::from_client(&status(413, None), KEY),
            TxnFailure::Refused { status: 413, .. }
        ));
        assert_eq!(
            TxnFailure::from_client(&status(429, Some(1500)), KEY),
            TxnFailure::RetryAfter {
                after: Duration::from_millis(1500),
                reason: "429 {}".into()
            }
        );
        assert!(matches!(
            TxnFailure::from_client(&status(500, None), KEY),
            TxnFailure::Retry { .. }
        ));
        assert!(matches!(
            TxnFailure::from_client(&status(401, None), KEY),
            TxnFailure::Retry { .. }
        ));
        assert!(matches!(
            TxnFailure::from_client(
                &ClientError::Timeout {
                    destination: "d".into()
                },
                KEY
            ),
            TxnFailure::Retry { .. }
        ));
        assert!(matches!(
            TxnFailure::from_client(
                &ClientError::Denied {
                    destination: "d".into()
                },
                KEY
            ),
            TxnFailure::Retry { .. }
        ));
    }
}
