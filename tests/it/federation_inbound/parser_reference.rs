//! The `/send` body parser (`federation::inbound::parse_transaction`) on
//! its own: every file of the `send_body` fuzz corpus parses without a
//! panic, and over the corpus and generated bodies it answers exactly as the
//! `Value`-tree parser it replaced (kept here as the reference).

use std::path::PathBuf;

use courier::identifiers::ServerName;
use serde_json::Value;

#[test]
fn every_send_body_corpus_file_parses_without_panicking() {
    let dir: PathBuf = crate::support::relay::repo_root().join("fuzz/corpus/send_body");
    let origin = ServerName::parse("origin.example").expect("valid");
    let us = ServerName::parse("us.example").expect("valid");
    let mut files = 0;
    let mut accepted = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("corpus file");
        files += 1;
        match courier::federation::inbound::parse_transaction(&origin, &us, &bytes) {
            Ok(parsed) => {
                accepted += 1;
                let response: Value =
                    serde_json::from_str(&parsed.response_json).expect("response is JSON");
                assert!(response["pdus"].is_object(), "{}", path.display());
            }
            Err(error) => {
                assert_eq!(error.status.as_u16(), 400, "{}: {error}", path.display());
                assert!(
                    ["M_NOT_JSON", "M_BAD_JSON"].contains(&error.errcode),
                    "{}: {error}",
                    path.display()
                );
            }
        }
    }
    assert!(files >= 10, "the seed corpus has {files} files");
    assert!(accepted >= 3, "the seed corpus has valid transactions too");
}

// ---- the parser against the Value-tree reference ----------------------------

/// The `/send` body parser as it was before it read bodies straight from
/// their bytes (over a `serde_json::Value` tree, one `to_string()` per
/// message), kept here verbatim as the reference the new parser must match,
/// plus the device-list EDUs of issue 16 (content an object, else invalid).
mod value_tree_reference {
    use std::collections::BTreeMap;

    use courier::e2ee::device_lists::InboundDeviceListEdu;
    use courier::error::MatrixError;
    use courier::federation::inbound::ParsedTxn;
    use courier::federation::inbound::transaction::{
        DEVICE_LIST_UPDATE, DIRECT_TO_DEVICE, EduReport, MAX_EDUS, MAX_EVENT_TYPE_BYTES,
        MAX_MESSAGE_ID_CHARS, MAX_PDUS, PDU_ERROR, is_device_list_type,
    };
    use courier::identifiers::{ServerName, UserId};
    use courier::store::{DeviceTarget, InboundEdu, NewInboxMessage};
    use serde_json::{Map, Value};

    enum EduRejection {
        Spoofed(String),
        Invalid(String),
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
        let mut device_lists = Vec::new();
        for (index, edu) in edus.iter().enumerate() {
            let Some(edu) = edu.as_object() else {
                tracing::debug!(%origin, index, "ignoring an EDU that is not an object");
                report.invalid += 1;
                continue;
            };
            match edu.get("edu_type").and_then(Value::as_str) {
                Some(DIRECT_TO_DEVICE) => {}
                Some(edu_type) if is_device_list_type(edu_type) => {
                    match edu.get("content") {
                        Some(content) if content.is_object() => {
                            if edu_type == DEVICE_LIST_UPDATE {
                                report.device_list_update += 1;
                                device_lists
                                    .push(InboundDeviceListEdu::DeviceListUpdate(content.clone()));
                            } else {
                                report.signing_key_update += 1;
                                device_lists
                                    .push(InboundDeviceListEdu::SigningKeyUpdate(content.clone()));
                            }
                        }
                        _ => report.invalid += 1,
                    }
                    continue;
                }
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
            device_lists,
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
                    message_id: message_id.to_owned(),
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
}

/// One generated JSON value, rendered with or without whitespace and with
/// or without `\u` escapes; objects are pair lists, so keys can repeat.
#[derive(Debug, Clone)]
enum J {
    Raw(&'static str),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn render_str(text: &str, escape: bool, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            'e' | 'u' | '@' | '*' if escape => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn render(value: &J, escape: bool, space: &str, out: &mut String) {
    match value {
        J::Raw(raw) => out.push_str(raw),
        J::Str(text) => render_str(text, escape, out),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(space);
                render(item, escape, space, out);
            }
            out.push_str(space);
            out.push(']');
        }
        J::Obj(pairs) => {
            out.push('{');
            for (i, (key, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(space);
                render_str(key, escape, out);
                out.push_str(space);
                out.push(':');
                out.push_str(space);
                render(item, escape, space, out);
            }
            out.push_str(space);
            out.push('}');
        }
    }
}

mod generated {
    use super::J;
    use proptest::prelude::*;

    fn scalar() -> impl Strategy<Value = J> {
        prop_oneof![
            prop::sample::select(vec![
                "null",
                "true",
                "1",
                "-0",
                "1.50",
                "1e2",
                "2.5",
                "9007199254740993"
            ])
            .prop_map(J::Raw),
            prop::sample::select(vec![
                "",
                "x y",
                "m.room.encrypted",
                "origin.example",
                "é\n\"q\\"
            ])
            .prop_map(|s| J::Str(s.to_owned())),
        ]
    }

    fn any_value() -> impl Strategy<Value = J> {
        scalar().prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(J::Arr),
                prop::collection::vec((prop::sample::select(vec!["a", "b", "a b"]), inner), 0..3)
                    .prop_map(|pairs| J::Obj(
                        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
            ]
        })
    }

    /// An object with each of `fields` present most of the time (its value
    /// of the wrong kind now and then), plus repeated or unknown keys, in
    /// any order.
    fn object(fields: Vec<(&'static str, BoxedStrategy<J>)>) -> BoxedStrategy<J> {
        let parts: Vec<BoxedStrategy<Option<(String, J)>>> = fields
            .iter()
            .map(|(key, value)| {
                let key = *key;
                proptest::option::weighted(
                    0.95,
                    prop_oneof![15 => value.clone(), 1 => any_value()]
                        .prop_map(move |v| (key.to_owned(), v)),
                )
                .boxed()
            })
            .collect();
        let mut extra: Vec<BoxedStrategy<(String, J)>> = fields
            .into_iter()
            .map(|(key, value)| {
                prop_oneof![3 => value, 1 => any_value()]
                    .prop_map(move |v| (key.to_owned(), v))
                    .boxed()
            })
            .collect();
        extra.push(any_value().prop_map(|v| ("x".to_owned(), v)).boxed());
        (
            parts,
            prop::collection::vec(prop::strategy::Union::new(extra), 0..2),
        )
            .prop_map(|(parts, extra)| {
                let mut pairs: Vec<(String, J)> = parts.into_iter().flatten().collect();
                pairs.extend(extra);
                pairs
            })
            .prop_shuffle()
            .prop_map(J::Obj)
            .boxed()
    }

    /// One of `values`, the first (the valid one) three times in four.
    fn string_of(values: Vec<&'static str>) -> BoxedStrategy<J> {
        let first = values[0];
        prop_oneof![
            3 => Just(J::Str(first.to_owned())),
            1 => prop::sample::select(values).prop_map(|s| J::Str(s.to_owned())),
        ]
        .boxed()
    }

    fn message() -> BoxedStrategy<J> {
        prop_oneof![3 => any_value().prop_map(|v| J::Obj(vec![("k".to_owned(), v)])), 1 => any_value()].boxed()
    }

    fn devices() -> BoxedStrategy<J> {
        prop_oneof![
            5 => prop::collection::vec((prop::sample::select(vec!["D", "E", "*", ""]), message()), 0..4)
                .prop_map(|pairs| J::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            1 => any_value(),
        ]
        .boxed()
    }

    fn messages() -> BoxedStrategy<J> {
        let recipients = vec![
            "@b:us.example",
            "@user:us.example",
            "@c:elsewhere.example",
            "bad",
            "@b:us.example",
        ];
        prop_oneof![
            5 => prop::collection::vec((prop::sample::select(recipients), devices()), 0..4)
                .prop_map(|pairs| J::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            1 => any_value(),
        ]
        .boxed()
    }

    fn content() -> BoxedStrategy<J> {
        object(vec![
            (
                "sender",
                string_of(vec![
                    "@a:origin.example",
                    "@m:evil.example",
                    "@m:us.example",
                    "nope",
                ]),
            ),
            ("type", string_of(vec!["m.room.encrypted", ""])),
            (
                "message_id",
                string_of(vec!["m1", "m2", "0123456789012345678901234567890123"]),
            ),
            ("messages", messages()),
        ])
    }

    fn edu() -> BoxedStrategy<J> {
        prop_oneof![
            8 => object(vec![
                ("edu_type", string_of(vec!["m.direct_to_device", "m.direct_to_device", "m.typing"])),
                ("content", content()),
            ]),
            1 => any_value(),
        ]
        .boxed()
    }

    fn pdu() -> BoxedStrategy<J> {
        object(vec![("event_id", string_of(vec!["$1", "$2", "$é"]))])
    }

    pub fn body() -> BoxedStrategy<J> {
        object(vec![
            (
                "origin",
                string_of(vec!["origin.example", "origin.example", "other.example"]),
            ),
            (
                "pdus",
                prop::collection::vec(pdu(), 0..3).prop_map(J::Arr).boxed(),
            ),
            (
                "edus",
                prop::collection::vec(edu(), 0..4).prop_map(J::Arr).boxed(),
            ),
        ])
    }
}

/// The new parser's answer equals the reference's: the same error, or the
/// same response, report and rows, each stored content the same JSON value
/// (the new parser keeps the sender's text, the reference re-serialized it)
/// without whitespace outside strings.
/// Returns how many messages were accepted, `None` for a refused body.
fn assert_matches_reference(bytes: &[u8]) -> Option<usize> {
    let origin = ServerName::parse("origin.example").expect("valid");
    let us = ServerName::parse("us.example").expect("valid");
    let new = courier::federation::inbound::parse_transaction(&origin, &us, bytes);
    let reference = match serde_json::from_slice::<Value>(bytes) {
        Err(_) => Err(courier::error::MatrixError::not_json(
            "The request body is not valid JSON",
        )),
        Ok(value) => value_tree_reference::parse_transaction_value(&origin, &us, &value),
    };
    let text = String::from_utf8_lossy(bytes);
    match (new, reference) {
        (Err(new), Err(reference)) => {
            assert_eq!(
                (new.status, new.errcode, new.message),
                (reference.status, reference.errcode, reference.message),
                "{text}"
            );
            None
        }
        (Ok(new), Ok(reference)) => {
            assert_eq!(new.response_json, reference.response_json, "{text}");
            assert_eq!(new.report, reference.report, "{text}");
            assert_eq!(new.device_lists, reference.device_lists, "{text}");
            assert_eq!(new.edus.len(), reference.edus.len(), "{text}");
            for (new, reference) in new.edus.iter().zip(&reference.edus) {
                assert_eq!(new.message_id, reference.message_id, "{text}");
                assert_eq!(new.messages.len(), reference.messages.len(), "{text}");
                for (new, reference) in new.messages.iter().zip(&reference.messages) {
                    assert_eq!(
                        (&new.user_id, &new.device, &new.sender, &new.event_type),
                        (
                            &reference.user_id,
                            &reference.device,
                            &reference.sender,
                            &reference.event_type
                        ),
                        "{text}"
                    );
                    let new_content: Value = serde_json::from_str(&new.content_json).expect("JSON");
                    let reference_content: Value =
                        serde_json::from_str(&reference.content_json).expect("JSON");
                    assert_eq!(new_content, reference_content, "{text}");
                    assert!(new_content.is_object());
                    assert!(
                        !new.content_json.contains(['\n', '\t', '\r'])
                            && !new.content_json.contains(": ")
                            && !new.content_json.contains(", "),
                        "{}",
                        new.content_json
                    );
                }
            }
            Some(new.edus.iter().map(|edu| edu.messages.len()).sum())
        }
        (new, reference) => panic!("{text}: new {new:?}, reference {reference:?}"),
    }
}

#[test]
fn the_send_body_corpus_parses_as_the_value_tree_reference_did() {
    let dir: PathBuf = crate::support::relay::repo_root().join("fuzz/corpus/send_body");
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("corpus file");
        let _ = assert_matches_reference(&bytes);
    }
}

#[test]
fn generated_send_bodies_parse_as_the_value_tree_reference_did() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRunner};
    let strategy = (
        generated::body(),
        proptest::prelude::any::<bool>(),
        proptest::sample::select(vec!["", " ", "\n\t "]),
    );
    let mut runner = TestRunner::new(Config::default());
    let (mut with_messages, mut refused) = (0, 0);
    for _ in 0..3000 {
        let (body, escape, space) = strategy
            .new_tree(&mut runner)
            .expect("a generated body")
            .current();
        let mut text = String::new();
        render(&body, escape, space, &mut text);
        match assert_matches_reference(text.as_bytes()) {
            Some(0) => {}
            Some(_) => with_messages += 1,
            None => refused += 1,
        }
    }
    // The generator reaches both outcomes, and messages, often enough.
    assert!(with_messages >= 100, "{with_messages} bodies with messages");
    assert!(refused >= 100, "{refused} refused bodies");
}
