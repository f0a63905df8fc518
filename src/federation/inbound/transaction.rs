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
//! `m.device_list_update`, `m.signing_key_update` and its unstable name
//! `org.matrix.signing_key_update` (SPEC-E2EE §4.3): the content must be an
//! object (else the EDU counts as invalid); everything else about them
//! (origin, fields, signatures, gaps) is judged by
//! `E2ee::receive_device_list_edus`, which gets them as parsed here.
//! Other EDU types, and EDUs that are not objects or lack `edu_type`, are
//! ignored.
//!
//! The body is read straight from its bytes into borrowed structs, never into
//! a `serde_json::Value` tree: each device's message is stored as the JSON
//! text the sender wrote (numbers and escapes untouched, whitespace outside
//! strings dropped), so a 10,000-message transaction costs no per-message
//! re-serialization. Objects are read as `Value` reads them: keys unescaped
//! and sorted, the last of a repeated key kept.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::e2ee::device_lists::InboundDeviceListEdu;
use crate::error::MatrixError;
use crate::identifiers::{ServerName, UserId};
use crate::store::{DeviceTarget, InboundEdu, NewInboxMessage};

use super::json::{JsonBody, has_whitespace, minify};

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
/// The device-list EDU types handed to the E2EE core.
pub const DEVICE_LIST_UPDATE: &str = "m.device_list_update";
pub const SIGNING_KEY_UPDATE: &str = "m.signing_key_update";
/// The unstable name of `m.signing_key_update` some servers still send.
pub const UNSTABLE_SIGNING_KEY_UPDATE: &str = "org.matrix.signing_key_update";

/// A validated transaction, ready for `Store::apply_inbound_txn`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedTxn {
    /// The `200` response body (`{"pdus": {...}}`), serialized.
    pub response_json: String,
    /// The accepted `m.direct_to_device` EDUs, in the order received.
    pub edus: Vec<InboundEdu>,
    /// The device-list EDUs with an object `content`, in the order
    /// received, for `E2ee::receive_device_list_edus`.
    pub device_lists: Vec<InboundDeviceListEdu>,
    pub report: EduReport,
}

/// What happened to the items of a transaction (for metrics and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EduReport {
    pub pdus: u32,
    /// `m.direct_to_device` EDUs accepted for the store.
    pub direct_to_device: u32,
    /// `m.device_list_update` EDUs handed to the E2EE core.
    pub device_list_update: u32,
    /// `m.signing_key_update` (or `org.matrix.signing_key_update`) EDUs
    /// handed to the E2EE core.
    pub signing_key_update: u32,
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

/// Parses a `/send` body from raw bytes: first proven to be JSON exactly as
/// a `serde_json::Value` would judge it (else 400 `M_NOT_JSON`), then read
/// by [`parse_transaction_json`].
pub fn parse_transaction(
    origin: &ServerName,
    our_server_name: &ServerName,
    body: &[u8],
) -> Result<ParsedTxn, MatrixError> {
    let body = JsonBody::parse(body.to_vec())
        .map_err(|_| MatrixError::not_json("The request body is not valid JSON"))?;
    parse_transaction_json(origin, our_server_name, &body)
}

/// Parses a `/send` body already proven to be JSON, straight from its bytes:
/// serde into borrowed structs, each device's message kept as its raw JSON
/// text (minified only if it carries whitespace), no `Value` tree. Objects
/// are read as `Value` would read them: a repeated key keeps its last value,
/// keys are compared after unescaping, recipients and devices come out
/// sorted by key.
pub fn parse_transaction_json(
    origin: &ServerName,
    our_server_name: &ServerName,
    body: &JsonBody,
) -> Result<ParsedTxn, MatrixError> {
    // The body is valid JSON and every shape below accepts any JSON value,
    // so this cannot fail; the error is mapped all the same.
    let top: Field<TxnFields<'_>> = serde_json::from_slice(body.as_bytes())
        .map_err(|_| MatrixError::not_json("The request body is not valid JSON"))?;
    let Field::Is(top) = top else {
        return Err(MatrixError::bad_json(
            "The transaction must be a JSON object",
        ));
    };
    match &top.origin {
        Field::Is(body_origin) if body_origin == origin.as_str() => {}
        Field::Is(_) => {
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
    let Field::Is(pdus) = top.pdus else {
        return Err(MatrixError::bad_json(
            "The transaction's pdus is missing or not an array",
        ));
    };
    let edus = match top.edus {
        Field::Absent | Field::Null => Vec::new(),
        Field::Is(edus) => edus,
        Field::Mismatch => {
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
        if let Field::Is(PduFields {
            event_id: Field::Is(event_id),
        }) = pdu
        {
            pdu_results.insert(
                event_id.into_owned(),
                serde_json::json!({ "error": PDU_ERROR }),
            );
        }
    }

    let mut accepted = Vec::new();
    let mut device_lists = Vec::new();
    for (index, edu) in edus.into_iter().enumerate() {
        let Field::Is(edu) = edu else {
            tracing::debug!(%origin, index, "ignoring an EDU that is not an object");
            report.invalid += 1;
            continue;
        };
        match &edu.edu_type {
            Field::Is(edu_type) if edu_type == DIRECT_TO_DEVICE => {}
            Field::Is(edu_type) if is_device_list_type(edu_type) => {
                match device_list_edu(edu_type, edu.content) {
                    Some(parsed) => {
                        match parsed {
                            InboundDeviceListEdu::DeviceListUpdate(_) => {
                                report.device_list_update += 1
                            }
                            InboundDeviceListEdu::SigningKeyUpdate(_) => {
                                report.signing_key_update += 1
                            }
                        }
                        device_lists.push(parsed);
                    }
                    None => {
                        tracing::warn!(%origin, index, edu_type = edu_type.as_ref(), "dropping a device-list EDU whose content is not an object");
                        report.invalid += 1;
                    }
                }
                continue;
            }
            Field::Is(_) => {
                report.other += 1;
                continue;
            }
            _ => {
                tracing::debug!(%origin, index, "ignoring an EDU without an edu_type");
                report.invalid += 1;
                continue;
            }
        }
        let content = match edu.content {
            None => Field::Absent,
            // The raw text is valid JSON and the shape accepts any value,
            // so this cannot fail; a failure would count as invalid.
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or(Field::Mismatch),
        };
        match parse_direct_to_device(origin, our_server_name, content, &mut report) {
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

/// Whether an `edu_type` is one of the device-list EDUs.
pub fn is_device_list_type(edu_type: &str) -> bool {
    matches!(
        edu_type,
        DEVICE_LIST_UPDATE | SIGNING_KEY_UPDATE | UNSTABLE_SIGNING_KEY_UPDATE
    )
}

/// A device-list EDU for the E2EE core, or `None` when its `content` is not
/// an object.
fn device_list_edu(edu_type: &str, content: Option<&RawValue>) -> Option<InboundDeviceListEdu> {
    let content = serde_json::from_str::<serde_json::Value>(content?.get()).ok()?;
    if !content.is_object() {
        return None;
    }
    Some(if edu_type == DEVICE_LIST_UPDATE {
        InboundDeviceListEdu::DeviceListUpdate(content)
    } else {
        InboundDeviceListEdu::SigningKeyUpdate(content)
    })
}

fn parse_direct_to_device(
    origin: &ServerName,
    our_server_name: &ServerName,
    content: Field<ContentFields<'_>>,
    report: &mut EduReport,
) -> Result<InboundEdu, EduRejection> {
    let invalid = |reason: &str| EduRejection::Invalid(reason.to_owned());
    let Field::Is(content) = content else {
        return Err(invalid("content is missing or not an object"));
    };
    let sender = content
        .sender
        .into_is()
        .ok_or_else(|| invalid("sender is missing"))?;
    let sender_id = UserId::parse(&sender).map_err(|_| invalid("sender is not a user ID"))?;
    if sender_id.server_name() != origin.as_str()
        || sender_id.server_name() == our_server_name.as_str()
    {
        return Err(EduRejection::Spoofed(sender.into_owned()));
    }
    let event_type = content
        .event_type
        .into_is()
        .ok_or_else(|| invalid("type is missing"))?;
    if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES {
        return Err(invalid("type is empty or longer than 255 bytes"));
    }
    let message_id = content
        .message_id
        .into_is()
        .ok_or_else(|| invalid("message_id is missing"))?;
    if message_id.chars().count() > MAX_MESSAGE_ID_CHARS {
        return Err(invalid("message_id is longer than 32 code points"));
    }
    let messages = content
        .messages
        .into_is()
        .ok_or_else(|| invalid("messages is missing or not an object"))?;

    let mut out = Vec::new();
    // One log line for the first skipped recipient of this EDU and one
    // summary, not a line per recipient: an EDU may name thousands.
    let mut skipped = 0u32;
    let mut skip = |recipient: &str, device_id: &str, why: &'static str| {
        if skipped == 0 {
            tracing::info!(%origin, recipient, device_id, why, "skipping a recipient");
        }
        skipped += 1;
    };
    for (recipient, by_device) in messages {
        let recipient = recipient.as_ref();
        let user = match UserId::parse(recipient) {
            Ok(user) if user.server_name() == our_server_name.as_str() => user,
            Ok(_) => {
                skip(recipient, "", "not a local user");
                report.skipped_recipients += 1;
                continue;
            }
            Err(_) => {
                skip(recipient, "", "not a user ID");
                report.skipped_recipients += 1;
                continue;
            }
        };
        let Field::Is(by_device) = by_device else {
            skip(recipient, "", "the device map is not an object");
            report.skipped_recipients += 1;
            continue;
        };
        for (device_id, message) in by_device {
            // `RawValue` starts at the value's first byte, never whitespace.
            let message = message.get();
            if device_id.is_empty() || !message.starts_with('{') {
                skip(recipient, device_id.as_ref(), "malformed device message");
                report.skipped_recipients += 1;
                continue;
            }
            let device = if device_id == "*" {
                DeviceTarget::All
            } else {
                DeviceTarget::One(device_id.into_owned())
            };
            // Kept as sent (numbers and escapes untouched); whitespace from
            // a pretty-printing sender is dropped, not stored.
            let content_json = if has_whitespace(message) {
                minify(message)
            } else {
                message.to_owned()
            };
            out.push(NewInboxMessage {
                user_id: user.as_str().to_owned(),
                device,
                message_id: message_id.as_ref().to_owned(),
                sender: sender.as_ref().to_owned(),
                event_type: event_type.as_ref().to_owned(),
                content_json,
            });
        }
    }
    if skipped > 1 {
        tracing::info!(%origin, skipped, "skipped recipients of one m.direct_to_device");
    }
    Ok(InboundEdu {
        message_id: message_id.into_owned(),
        messages: out,
    })
}

// ---- the shapes read from the body ------------------------------------------
//
// Every shape accepts any JSON value (a value of another kind becomes
// `Field::Mismatch`), so that deserializing a valid body never fails and all
// judging happens above, in the same order as over a `Value` tree.

/// One JSON value where a `T` is expected.
#[derive(Debug, Default)]
enum Field<T> {
    /// The key is not in the object.
    #[default]
    Absent,
    Null,
    /// A value of another kind.
    Mismatch,
    Is(T),
}

impl<T> Field<T> {
    fn into_is(self) -> Option<T> {
        match self {
            Field::Is(value) => Some(value),
            _ => None,
        }
    }
}

/// What a JSON string, array or object becomes; `None` for the kinds that
/// are not `Self` (their contents are skipped).
trait Shape<'de>: Sized {
    fn from_str(_: Cow<'de, str>) -> Option<Self> {
        None
    }
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de, T: Shape<'de>> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<T>(PhantomData<T>);

fn matched<T>(value: Option<T>) -> Field<T> {
    value.map_or(Field::Mismatch, Field::Is)
}

impl<'de, T: Shape<'de>> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field<T>, E> {
        Ok(Field::Mismatch)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Field<T>, E> {
        Ok(Field::Mismatch)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Field<T>, E> {
        Ok(Field::Mismatch)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Field<T>, E> {
        Ok(Field::Mismatch)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Field<T>, E> {
        Ok(Field::Null)
    }
    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Field<T>, E> {
        Ok(matched(T::from_str(Cow::Borrowed(value))))
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<Field<T>, E> {
        Ok(matched(T::from_str(Cow::Owned(value.to_owned()))))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<T>, A::Error> {
        Ok(matched(T::from_seq(seq)?))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<T>, A::Error> {
        Ok(matched(T::from_map(map)?))
    }
}

impl<'de> Shape<'de> for Cow<'de, str> {
    fn from_str(value: Cow<'de, str>) -> Option<Self> {
        Some(value)
    }
}

impl<'de, T: Deserialize<'de>> Shape<'de> for Vec<T> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(Some(out))
    }
}

/// An object read as `Value` reads it: keys unescaped, sorted, the last of
/// a repeated key kept.
impl<'de, V: Deserialize<'de>> Shape<'de> for BTreeMap<Cow<'de, str>, V> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(Key(key)) = map.next_key()? {
            out.insert(key, map.next_value()?);
        }
        Ok(Some(out))
    }
}

/// An object key, borrowed from the body unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(value)))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(value.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Implements [`Shape::from_map`] for a struct of `Field`s: each named key
/// assigns its field (so the last of a repeated key wins), other keys are
/// skipped.
macro_rules! object_shape {
    ($name:ident { $($field:ident: $key:literal),* $(,)? }) => {
        impl<'de> Shape<'de> for $name<'de> {
            fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
                let mut out = $name::default();
                while let Some(Key(key)) = map.next_key()? {
                    match key.as_ref() {
                        $($key => out.$field = map.next_value()?,)*
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Some(out))
            }
        }
    };
}

#[derive(Default)]
struct TxnFields<'de> {
    origin: Field<Cow<'de, str>>,
    pdus: Field<Vec<Field<PduFields<'de>>>>,
    edus: Field<Vec<Field<EduFields<'de>>>>,
}
object_shape!(TxnFields {
    origin: "origin",
    pdus: "pdus",
    edus: "edus"
});

#[derive(Default)]
struct PduFields<'de> {
    event_id: Field<Cow<'de, str>>,
}
object_shape!(PduFields {
    event_id: "event_id"
});

#[derive(Default)]
struct EduFields<'de> {
    edu_type: Field<Cow<'de, str>>,
    /// Kept raw: which shape it is read into depends on `edu_type`, which
    /// may come after it. `None` when absent or null.
    content: Option<&'de RawValue>,
}
object_shape!(EduFields {
    edu_type: "edu_type",
    content: "content"
});

/// recipient → (device → message).
type Messages<'de> = BTreeMap<Cow<'de, str>, Field<BTreeMap<Cow<'de, str>, &'de RawValue>>>;

#[derive(Default)]
struct ContentFields<'de> {
    sender: Field<Cow<'de, str>>,
    event_type: Field<Cow<'de, str>>,
    message_id: Field<Cow<'de, str>>,
    messages: Field<Messages<'de>>,
}
object_shape!(ContentFields {
    sender: "sender",
    event_type: "type",
    message_id: "message_id",
    messages: "messages",
});

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

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
    fn device_list_edus_are_collected_and_non_object_contents_are_invalid() {
        let parsed = parse(json!({
            "origin": "origin.example", "pdus": [],
            "edus": [
                {"edu_type": "m.device_list_update", "content": {"user_id": "@a:origin.example"}},
                {"edu_type": "m.device_list_update", "content": [1]},
                {"edu_type": "m.device_list_update"},
                {"edu_type": "m.signing_key_update", "content": {"user_id": "@a:origin.example"}},
                {"content": {"user_id": "@a:origin.example"},
                    "edu_type": "org.matrix.signing_key_update"},
                {"edu_type": "org.matrix.signing_key_update", "content": null},
                to_device("@a:origin.example", "m", json!({"@b:us.example": {"D": {}}})),
            ]
        }))
        .expect("valid");
        assert_eq!(
            parsed.device_lists,
            vec![
                InboundDeviceListEdu::DeviceListUpdate(json!({"user_id": "@a:origin.example"})),
                InboundDeviceListEdu::SigningKeyUpdate(json!({"user_id": "@a:origin.example"})),
                InboundDeviceListEdu::SigningKeyUpdate(json!({"user_id": "@a:origin.example"})),
            ]
        );
        assert_eq!(parsed.report.device_list_update, 1);
        assert_eq!(parsed.report.signing_key_update, 2);
        assert_eq!(parsed.report.invalid, 3);
        assert_eq!(parsed.edus.len(), 1);
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

    fn parse_text(body: &str) -> Result<ParsedTxn, MatrixError> {
        let (origin, us) = names();
        parse_transaction(&origin, &us, body.as_bytes())
    }

    #[test]
    fn repeated_keys_keep_the_last_value_and_recipients_come_out_sorted() {
        let parsed = parse_text(
            r#"{"origin":"other.example","origin":"origin.example","pdus":{},"pdus":[],
            "edus":[{"edu_type":"m.direct_to_device","content":{
              "sender":"@a:origin.example","type":"t","message_id":"m1","message_id":"m2",
              "messages":{
                "@z:us.example":{"D":{"n":1}},
                "@b:us.example":{"Y":{"first":true},"X":{"x":1},"Y":{"second":true}},
                "@z:us.example":{"E":{"n":2}}}}}]}"#,
        )
        .expect("valid");
        assert_eq!(parsed.edus.len(), 1);
        let edu = &parsed.edus[0];
        assert_eq!(edu.message_id, "m2");
        let rows: Vec<(&str, &DeviceTarget, &str)> = edu
            .messages
            .iter()
            .map(|m| (m.user_id.as_str(), &m.device, m.content_json.as_str()))
            .collect();
        assert_eq!(
            rows,
            vec![
                (
                    "@b:us.example",
                    &DeviceTarget::One("X".into()),
                    r#"{"x":1}"#
                ),
                (
                    "@b:us.example",
                    &DeviceTarget::One("Y".into()),
                    r#"{"second":true}"#
                ),
                (
                    "@z:us.example",
                    &DeviceTarget::One("E".into()),
                    r#"{"n":2}"#
                ),
            ]
        );
        // A repeated key whose last value is of the wrong kind fails as that.
        let error = parse_text(r#"{"origin":"origin.example","pdus":[],"pdus":{}}"#)
            .expect_err("pdus is an object in the end");
        assert_eq!(error.errcode, "M_BAD_JSON");
    }

    #[test]
    fn escaped_keys_and_strings_are_unescaped_before_they_are_judged() {
        let parsed = parse_text(
            r#"{"orig\u0069n":"origin.example","pdus":[{"event_\u0069d":"$e\u0031"}],
            "edus":[{"edu_\u0074ype":"m.direct_to_devic\u0065","content":{
              "sender":"@\u0061:origin.example","type":"m.room.encrypted","message_id":"m",
              "messages":{"@\u0062:us.example":{"D\u0031":{"k":"\u00e9\n"}},
                          "@us\u0065r:us.example":{"D1":{"k":1}},
                          "@user:us.example":{"D2":{"k":2}}}}}]}"#,
        )
        .expect("valid");
        assert_eq!(
            parsed.response_json,
            format!(r#"{{"pdus":{{"$e1":{{"error":"{PDU_ERROR}"}}}}}}"#)
        );
        let messages = &parsed.edus[0].messages;
        // `@us\u0065r` and `@user` are one key: the last value is kept.
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].user_id, "@b:us.example");
        assert_eq!(messages[0].device, DeviceTarget::One("D1".into()));
        assert_eq!(messages[0].sender, "@a:origin.example");
        // The content is the sender's text, escapes and all.
        assert_eq!(messages[0].content_json, r#"{"k":"\u00e9\n"}"#);
        let content: Value = serde_json::from_str(&messages[0].content_json).expect("JSON");
        assert_eq!(content, json!({"k": "é\n"}));
        assert_eq!(messages[1].user_id, "@user:us.example");
        assert_eq!(messages[1].device, DeviceTarget::One("D2".into()));
        assert_eq!(messages[1].content_json, r#"{"k":2}"#);
    }

    #[test]
    fn non_object_messages_are_skipped_one_by_one() {
        let parsed = parse_text(
            r#"{"origin":"origin.example","pdus":[],"edus":[{"edu_type":"m.direct_to_device",
            "content":{"sender":"@a:origin.example","type":"t","message_id":"m","messages":{
              "@b:us.example":{"A":[1],"B":"x","C":null,"D":1.5,"E":true,"F":{"ok":1}},
              "@c:us.example":null}}}]}"#,
        )
        .expect("valid");
        let messages = &parsed.edus[0].messages;
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].device, DeviceTarget::One("F".into()));
        assert_eq!(parsed.report.skipped_recipients, 6);
    }

    #[test]
    fn whitespace_is_dropped_from_content_and_numbers_are_kept_as_sent() {
        let parsed = parse_text(
            "{ \"origin\" : \"origin.example\" , \"pdus\" : [ ] , \"edus\" : [ {\n\
             \"edu_type\" : \"m.direct_to_device\" , \"content\" : { \"sender\" : \
             \"@a:origin.example\" , \"type\" : \"t\" , \"message_id\" : \"m\" , \
             \"messages\" : { \"@b:us.example\" : { \"D\" :\n {\n\t\"text\" : \"a b\" ,\r\n \
             \"f\" : 1.50 , \"e\" : 1E2 , \"z\": -0 }\n } } } } ] }\n",
        )
        .expect("valid");
        let messages = &parsed.edus[0].messages;
        assert_eq!(messages.len(), 1);
        assert_eq!(
            messages[0].content_json,
            r#"{"text":"a b","f":1.50,"e":1E2,"z":-0}"#
        );
    }

    #[test]
    fn invalid_json_anywhere_is_not_json_even_in_skipped_parts() {
        let (origin, us) = names();
        for body in [
            r#"{"origin":"origin.example","pdus":[],"x":"\ud800"}"#,
            r#"{"origin":"origin.example","pdus":[],"x":1e400}"#,
            r#"{"origin":"other.example","pdus":[{"a":[1,]}]}"#,
            r#"{"origin":"origin.example","pdus":[]} x"#,
        ] {
            let error = parse_transaction(&origin, &us, body.as_bytes()).expect_err(body);
            assert_eq!(error.errcode, "M_NOT_JSON", "{body}");
        }
        let error = parse_transaction(&origin, &us, b"{\"origin\":\"\xff\",\"pdus\":[]}")
            .expect_err("bad UTF-8");
        assert_eq!(error.errcode, "M_NOT_JSON");
    }
}
