//! Parsing and validating the body of `PUT /_matrix/federation/v1/send/{txnId}`
//! (SPEC §2.1, §2.4–§2.6) into what the store applies: a pure function of
//! (authenticated origin, our server name, body), with no I/O, so that it can
//! be fuzzed (`fuzz/fuzz_targets/send_body.rs`) and tested on its own.
//!
//! What fails the whole transaction (400): a body that is not JSON
//! (`M_NOT_JSON`), not an object, without a `pdus` array, with a non-array
//! `edus`, with a body `origin` other than the authenticated one, or over the
//! limits (more than 50 PDUs or 100 EDUs) (`M_BAD_JSON`). `origin_server_ts`
//! is not checked: it is the sender's clock and nothing here depends on it,
//! and refusing a transaction for it would make the sender retry it for
//! ever. Everything inside a
//! well-formed transaction is judged per item: a bad EDU is skipped and
//! logged, never failing its neighbours (SPEC §2.4 rule 4).
//!
//! PDUs: Courier does not process room events. Each PDU that carries an
//! `event_id` string (room versions 1 and 2) is answered with an error entry
//! under that id. Later room versions have no `event_id` in the PDU (the id
//! is the event's reference hash); Courier does not compute it, so those PDUs
//! are simply absent from the response map. Senders treat a missing entry
//! like an unknown result; nothing is retried because of it.
//!
//! `m.direct_to_device` (SPEC §2.5, §2.6): `sender` must be a user ID of the
//! authenticated origin (else the EDU is dropped as spoofed); `type` a string
//! of at most 255 bytes; `message_id` a string of at most 32 code points;
//! `messages` an object. Inside `messages`, recipients that are not user IDs
//! of our server, non-object device maps and non-object contents are skipped
//! one by one with a warning. `*` becomes [`DeviceTarget::All`].
//! Other EDU types, and EDUs that are not objects or lack `edu_type`, are
//! ignored.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::MatrixError;
use crate::identifiers::{ServerName, UserId};
use crate::store::{DeviceTarget, InboundEdu, NewInboxMessage};

/// The most PDUs one transaction may carry (SPEC §9.4).
pub const MAX_PDUS: usize = 50;
/// The most EDUs one transaction may carry (SPEC §9.4).
pub const MAX_EDUS: usize = 100;
/// The longest `message_id`, in code points (SPEC §2.5).
pub const MAX_MESSAGE_ID_CHARS: usize = 32;
/// The longest to-device event type we accept, in bytes (SPEC §9.3).
pub const MAX_EVENT_TYPE_BYTES: usize = 255;
/// The error every PDU gets.
pub const PDU_ERROR: &str = "Courier does not process room events";
/// The EDU type Courier processes.
pub const DIRECT_TO_DEVICE: &str = "m.direct_to_device";

/// A validated transaction, ready for `Store::apply_inbound_txn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTxn {
    /// The `200` response body (`{"pdus": {...}}`), serialized.
    pub response_json: String,
    /// The accepted `m.direct_to_device` EDUs, in the order received.
    pub edus: Vec<InboundEdu>,
    pub report: EduReport,
}

/// What happened to the items of a transaction (for metrics and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EduReport {
    pub pdus: u32,
    /// `m.direct_to_device` EDUs accepted for the store.
    pub direct_to_device: u32,
    /// EDUs of other types (ignored).
    pub other: u32,
    /// EDUs dropped because they are malformed.
    pub invalid: u32,
    /// `m.direct_to_device` EDUs dropped because `sender` is not of the origin.
    pub spoofed: u32,
    /// Individual recipients skipped (not ours, malformed).
    pub skipped_recipients: u32,
}

/// Why one EDU was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EduRejection {
    Spoofed(String),
    Invalid(String),
}

/// Parses a `/send` body from raw bytes.
pub fn parse_transaction(
    origin: &ServerName,
    our_server_name: &ServerName,
    body: &[u8],
) -> Result<ParsedTxn, MatrixError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| MatrixError::not_json("The request body is not valid JSON"))?;
    parse_transaction_value(origin, our_server_name, &value)
}

/// Parses a `/send` body already decoded as JSON.
pub fn parse_transaction_value(
    origin: &ServerName,
    our_server_name: &ServerName,
    body: &Value,
) -> Result<ParsedTxn, MatrixError> {
    let object = body
        .as_object()
        .ok_or_else(|| MatrixError::bad_json("The transaction must be a JSON object"))?;
    match object.get("origin") {
        Some(Value::String(body_origin)) if body_origin == origin.as_str() => {}
        Some(Value::String(_)) => {
            return Err(MatrixError::bad_json(
                "The transaction's origin is not the authenticated origin",
            ));
        }
        _ => {
            return Err(MatrixError::bad_json(
                "The transaction's origin is missing or not a string",
            ));
        }
    }
    let pdus = match object.get("pdus") {
        Some(Value::Array(pdus)) => pdus,
        _ => {
            return Err(MatrixError::bad_json(
                "The transaction's pdus is missing or not an array",
            ));
        }
    };
    let edus: &[Value] = match object.get("edus") {
        None | Some(Value::Null) => &[],
        Some(Value::Array(edus)) => edus,
        Some(_) => {
            return Err(MatrixError::bad_json(
                "The transaction's edus is not an array",
            ));
        }
    };
    if pdus.len() > MAX_PDUS {
        return Err(MatrixError::bad_json(format!(
            "A transaction carries at most {MAX_PDUS} PDUs"
        )));
    }
    if edus.len() > MAX_EDUS {
        return Err(MatrixError::bad_json(format!(
            "A transaction carries at most {MAX_EDUS} EDUs"
        )));
    }

    let mut report = EduReport {
        pdus: pdus.len() as u32,
        ..EduReport::default()
    };
    let mut pdu_results = BTreeMap::new();
    for pdu in pdus {
        if let Some(event_id) = pdu.get("event_id").and_then(Value::as_str) {
            pdu_results.insert(
                event_id.to_owned(),
                serde_json::json!({ "error": PDU_ERROR }),
            );
        }
    }

    let mut accepted = Vec::new();
    for (index, edu) in edus.iter().enumerate() {
        let Some(edu) = edu.as_object() else {
            tracing::debug!(%origin, index, "ignoring an EDU that is not an object");
            report.invalid += 1;
            continue;
        };
        match edu.get("edu_type").and_then(Value::as_str) {
            Some(DIRECT_TO_DEVICE) => {}
            Some(_) => {
                report.other += 1;
                continue;
            }
            None => {
                tracing::debug!(%origin, index, "ignoring an EDU without an edu_type");
                report.invalid += 1;
                continue;
            }
        }
        match parse_direct_to_device(origin, our_server_name, edu.get("content"), &mut report) {
            Ok(parsed) => {
                report.direct_to_device += 1;
                accepted.push(parsed);
            }
            Err(EduRejection::Spoofed(sender)) => {
                tracing::warn!(%origin, index, sender, "dropping m.direct_to_device with a spoofed sender");
                report.spoofed += 1;
            }
            Err(EduRejection::Invalid(reason)) => {
                tracing::warn!(%origin, index, reason, "dropping an invalid m.direct_to_device");
                report.invalid += 1;
            }
        }
    }

    let response = serde_json::json!({ "pdus": pdu_results });
    Ok(ParsedTxn {
        response_json: response.to_string(),
        edus: accepted,
        report,
    })
}

fn parse_direct_to_device(
    origin: &ServerName,
    our_server_name: &ServerName,
    content: Option<&Value>,
    report: &mut EduReport,
) -> Result<InboundEdu, EduRejection> {
    let invalid = |reason: &str| EduRejection::Invalid(reason.to_owned());
    let content = content
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("content is missing or not an object"))?;
    let sender = string_field(content, "sender").ok_or_else(|| invalid("sender is missing"))?;
    let sender_id = UserId::parse(sender).map_err(|_| invalid("sender is not a user ID"))?;
    if sender_id.server_name() != origin.as_str()
        || sender_id.server_name() == our_server_name.as_str()
    {
        return Err(EduRejection::Spoofed(sender.to_owned()));
    }
    let event_type = string_field(content, "type").ok_or_else(|| invalid("type is missing"))?;
    if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES {
        return Err(invalid("type is empty or longer than 255 bytes"));
    }
    let message_id =
        string_field(content, "message_id").ok_or_else(|| invalid("message_id is missing"))?;
    if message_id.chars().count() > MAX_MESSAGE_ID_CHARS {
        return Err(invalid("message_id is longer than 32 code points"));
    }
    let messages = content
        .get("messages")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("messages is missing or not an object"))?;

    let mut out = Vec::new();
    for (recipient, by_device) in messages {
        let user = match UserId::parse(recipient) {
            Ok(user) if user.server_name() == our_server_name.as_str() => user,
            Ok(_) => {
                tracing::warn!(%origin, recipient, "skipping a recipient that is not local");
                report.skipped_recipients += 1;
                continue;
            }
            Err(_) => {
                tracing::warn!(%origin, recipient, "skipping a recipient that is not a user ID");
                report.skipped_recipients += 1;
                continue;
            }
        };
        let Some(by_device) = by_device.as_object() else {
            tracing::warn!(%origin, recipient, "skipping a recipient whose device map is not an object");
            report.skipped_recipients += 1;
            continue;
        };
        for (device_id, message) in by_device {
            if device_id.is_empty() || !message.is_object() {
                tracing::warn!(%origin, recipient, device_id, "skipping a malformed device message");
                report.skipped_recipients += 1;
                continue;
            }
            let device = if device_id == "*" {
                DeviceTarget::All
            } else {
                DeviceTarget::One(device_id.clone())
            };
            out.push(NewInboxMessage {
                user_id: user.as_str().to_owned(),
                device,
                sender: sender.to_owned(),
                event_type: event_type.to_owned(),
                content_json: message.to_string(),
            });
        }
    }
    Ok(InboundEdu {
        message_id: message_id.to_owned(),
        messages: out,
    })
}

fn string_field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    object.get(name).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names() -> (ServerName, ServerName) {
        (
            ServerName::parse("origin.example").expect("valid"),
            ServerName::parse("us.example").expect("valid"),
        )
    }

    fn parse(body: Value) -> Result<ParsedTxn, MatrixError> {
        let (origin, us) = names();
        parse_transaction(&origin, &us, body.to_string().as_bytes())
    }

    fn to_device(sender: &str, message_id: &str, messages: Value) -> Value {
        json!({"edu_type": "m.direct_to_device", "content": {
            "sender": sender, "type": "m.room.encrypted",
            "message_id": message_id, "messages": messages }})
    }

    #[test]
    fn an_edu_only_transaction_answers_empty_pdus() {
        let parsed = parse(json!({
            "origin": "origin.example", "origin_server_ts": 1, "pdus": [],
            "edus": [to_device("@a:origin.example", "m1",
                json!({"@b:us.example": {"D1": {"x": 1}, "*": {"y": 2}}}))]
        }))
        .expect("valid");
        assert_eq!(parsed.response_json, r#"{"pdus":{}}"#);
        assert_eq!(parsed.edus.len(), 1);
        let messages = &parsed.edus[0].messages;
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].device, DeviceTarget::All);
        assert_eq!(messages[1].device, DeviceTarget::One("D1".into()));
        assert_eq!(messages[1].content_json, r#"{"x":1}"#);
        assert_eq!(messages[1].sender, "@a:origin.example");
        assert_eq!(messages[1].event_type, "m.room.encrypted");
    }

    #[test]
    fn transaction_level_errors() {
        let (origin, us) = names();
        let not_json = parse_transaction(&origin, &us, b"{").expect_err("not json");
        assert_eq!(not_json.errcode, "M_NOT_JSON");
        for body in [
            json!([]),
            json!({"pdus": []}),
            json!({"origin": "other.example", "pdus": []}),
            json!({"origin": "origin.example"}),
            json!({"origin": "origin.example", "pdus": {}}),
            json!({"origin": "origin.example", "pdus": [], "edus": {}}),
            json!({"origin": "origin.example", "pdus": vec![json!({}); 51]}),
            json!({"origin": "origin.example", "pdus": [], "edus": vec![json!({}); 101]}),
        ] {
            let error = parse(body.clone()).expect_err("must fail");
            assert_eq!(error.errcode, "M_BAD_JSON", "{body}");
            assert_eq!(error.status.as_u16(), 400);
        }
    }

    #[test]
    fn pdus_get_an_error_each_when_they_have_an_event_id() {
        let mut pdus: Vec<Value> = (0..10)
            .map(|i| json!({"event_id": format!("$e{i}:origin.example")}))
            .collect();
        pdus.push(json!({"room_id": "!r:origin.example"}));
        pdus.push(json!("not an object"));
        let parsed = parse(json!({"origin": "origin.example", "pdus": pdus})).expect("valid");
        let response: Value = serde_json::from_str(&parsed.response_json).expect("json");
        let map = response["pdus"].as_object().expect("object");
        assert_eq!(map.len(), 10);
        for (_, result) in map {
            assert_eq!(result, &json!({"error": PDU_ERROR}));
        }
    }

    #[test]
    fn bad_edus_are_skipped_alone() {
        let parsed = parse(json!({
            "origin": "origin.example", "pdus": [],
            "edus": [
                "nonsense",
                {"content": {}},
                {"edu_type": "m.typing", "content": {}},
                to_device("@mallory:evil.example", "spoof", json!({"@b:us.example": {"D": {}}})),
                to_device("@mallory:us.example", "ours", json!({"@b:us.example": {"D": {}}})),
                to_device("not a user", "bad-sender", json!({})),
                to_device("@a:origin.example", &"x".repeat(33), json!({})),
                {"edu_type": "m.direct_to_device", "content": {"sender": "@a:origin.example",
                    "type": "t", "message_id": "m", "messages": []}},
                to_device("@a:origin.example", "good", json!({
                    "@b:us.example": {"D": {"k": "v"}, "E": "not an object", "": {}},
                    "@c:elsewhere.example": {"D": {}},
                    "bad": {"D": {}},
                    "@d:us.example": []
                })),
            ]
        }))
        .expect("valid");
        assert_eq!(parsed.edus.len(), 1);
        assert_eq!(parsed.edus[0].message_id, "good");
        assert_eq!(parsed.edus[0].messages.len(), 1);
        assert_eq!(parsed.report.spoofed, 2);
        assert_eq!(parsed.report.other, 1);
        assert_eq!(parsed.report.invalid, 5);
        assert_eq!(parsed.report.skipped_recipients, 5);
        assert_eq!(parsed.report.direct_to_device, 1);
    }

    #[test]
    fn message_id_limit_counts_code_points() {
        let id: String = "é".repeat(32);
        let parsed = parse(json!({"origin": "origin.example", "pdus": [],
            "edus": [to_device("@a:origin.example", &id, json!({}))]}))
        .expect("valid");
        assert_eq!(parsed.edus.len(), 1);
    }
}
