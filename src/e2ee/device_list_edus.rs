//! The strict parse of inbound device-list EDU contents (SPEC-E2EE §3.4,
//! §3.5): `m.device_list_update` into a `RemoteDeviceUpdate` and
//! `m.signing_key_update` into checked cross-signing keys, each refused
//! with the outcome it is counted under (`malformed`, `spoofed`,
//! `bad_signature`). The user must be of the origin (compared in normalized
//! form) and not of this server; integers may arrive as decimal strings (as
//! Synapse may send them); device keys must be that device's and carry a
//! self-signature that verifies. Unknown fields (such as
//! `org.matrix.opentracing_context`) are ignored. Pure functions: no store.

use serde_json::{Map, Value};

use crate::identifiers::{ServerName, UserId};
use crate::store::device_lists::RemoteDeviceUpdate;
use crate::store::keys::CrossSigningKind;

use crate::signing::verify_json;

use super::objects::{
    CheckedCrossSigningKey, canonical_text, check_cross_signing_key, check_device_keys,
    stored_public_key,
};

/// Why an inbound EDU was dropped: the `outcome` label it is counted under
/// and a reason for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub outcome: &'static str,
    pub user_id: Option<String>,
    pub reason: String,
}

impl Dropped {
    fn malformed(user_id: Option<&str>, reason: impl Into<String>) -> Dropped {
        Dropped {
            outcome: "malformed",
            user_id: user_id.map(str::to_owned),
            reason: reason.into(),
        }
    }

    fn bad_signature(user_id: &str, reason: impl Into<String>) -> Dropped {
        Dropped {
            outcome: "bad_signature",
            user_id: Some(user_id.to_owned()),
            reason: reason.into(),
        }
    }
}

/// A parsed `m.device_list_update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDeviceUpdate {
    pub user_id: String,
    pub update: RemoteDeviceUpdate,
}

/// A parsed `m.signing_key_update`: each key passed its own checks (the
/// self-signing key's signature by a master key is checked by the caller,
/// which knows the cached master key).
#[derive(Debug, Clone)]
pub struct ParsedSigningKeyUpdate {
    pub user_id: String,
    pub master_key: Option<CheckedCrossSigningKey>,
    pub self_signing_key: Option<CheckedCrossSigningKey>,
    /// Keys present but refused (each counted as `bad_signature`).
    pub refused: Vec<Dropped>,
}

/// The `user_id` of a content: a valid user ID of `origin` (normalized
/// compare), not of `ours`.
fn origin_user(
    content: &Map<String, Value>,
    origin: &ServerName,
    ours: &ServerName,
) -> Result<String, Dropped> {
    let Some(Value::String(user)) = content.get("user_id") else {
        return Err(Dropped::malformed(
            None,
            "user_id is missing or not a string",
        ));
    };
    let parsed = UserId::parse(user)
        .map_err(|_| Dropped::malformed(Some(user), "user_id is not a user ID"))?;
    let server = ServerName::parse(parsed.server_name())
        .map_err(|_| Dropped::malformed(Some(user), "user_id has no valid server name"))?;
    if server.normalized() != origin.normalized() || server.normalized() == ours.normalized() {
        return Err(Dropped {
            outcome: "spoofed",
            user_id: Some(user.clone()),
            reason: "the user is not of the origin".to_owned(),
        });
    }
    Ok(user.clone())
}

/// A non-negative integer, or a decimal string of one.
pub fn stream_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().filter(|n| *n >= 0),
        Value::String(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            text.parse::<i64>().ok()
        }
        _ => None,
    }
}

/// Parses one `m.device_list_update` content.
pub fn parse_device_update(
    content: &Value,
    origin: &ServerName,
    ours: &ServerName,
) -> Result<ParsedDeviceUpdate, Dropped> {
    let Value::Object(content) = content else {
        return Err(Dropped::malformed(None, "content is not an object"));
    };
    let user_id = origin_user(content, origin, ours)?;
    let user = Some(user_id.as_str());
    let device_id = match content.get("device_id") {
        Some(Value::String(device)) if !device.is_empty() => device.clone(),
        _ => {
            return Err(Dropped::malformed(
                user,
                "device_id is missing or not a string",
            ));
        }
    };
    let stream_id = content
        .get("stream_id")
        .and_then(stream_int)
        .ok_or_else(|| Dropped::malformed(user, "stream_id is not a non-negative integer"))?;
    let prev_ids = match content.get("prev_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(stream_int)
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| Dropped::malformed(user, "prev_id holds a non-integer"))?,
        Some(_) => return Err(Dropped::malformed(user, "prev_id is not a list")),
    };
    let deleted = match content.get("deleted") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(deleted)) => *deleted,
        Some(_) => return Err(Dropped::malformed(user, "deleted is not a boolean")),
    };
    let display_name = match content.get("device_display_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(_) => {
            return Err(Dropped::malformed(
                user,
                "device_display_name is not a string",
            ));
        }
    };
    let keys_json = match content.get("keys") {
        _ if deleted => None,
        None | Some(Value::Null) => None,
        Some(keys) => {
            let checked = check_device_keys(keys, &user_id, &device_id)
                .map_err(|e| Dropped::bad_signature(&user_id, format!("keys: {e}")))?;
            Some(
                checked
                    .json()
                    .map_err(|e| Dropped::bad_signature(&user_id, format!("keys: {e}")))?,
            )
        }
    };
    Ok(ParsedDeviceUpdate {
        user_id,
        update: RemoteDeviceUpdate {
            stream_id,
            prev_ids,
            device_id,
            deleted,
            keys_json,
            display_name: if deleted { None } else { display_name },
        },
    })
}

/// Parses one `m.signing_key_update` content. A key that fails its checks
/// is left out and listed in `refused`; a `user_signing_key` is ignored.
pub fn parse_signing_key_update(
    content: &Value,
    origin: &ServerName,
    ours: &ServerName,
) -> Result<ParsedSigningKeyUpdate, Dropped> {
    let Value::Object(content) = content else {
        return Err(Dropped::malformed(None, "content is not an object"));
    };
    let user_id = origin_user(content, origin, ours)?;
    let mut refused = Vec::new();
    let mut key = |field: &str, kind: CrossSigningKind| match content.get(field) {
        None | Some(Value::Null) => None,
        Some(value) => match check_cross_signing_key(value, &user_id, kind) {
            Ok(checked) => Some(checked),
            Err(error) => {
                refused.push(Dropped::bad_signature(
                    &user_id,
                    format!("{field}: {error}"),
                ));
                None
            }
        },
    };
    let master_key = key("master_key", CrossSigningKind::Master);
    let self_signing_key = key("self_signing_key", CrossSigningKind::SelfSigning);
    Ok(ParsedSigningKeyUpdate {
        user_id,
        master_key,
        self_signing_key,
        refused,
    })
}

/// Counts `n` inbound device-list EDUs under `outcome`.
pub fn count_inbound(outcome: &'static str, n: u32) {
    if n > 0 {
        metrics::counter!("courier_device_list_inbound_total", "outcome" => outcome)
            .increment(u64::from(n));
    }
}

/// A checked cross-signing key as the canonical text the cache keeps.
pub fn key_text(key: &CheckedCrossSigningKey) -> Option<String> {
    canonical_text(&Value::Object(key.object.clone())).ok()
}

/// Whether `self_signing` carries a valid signature by the user's master
/// key: the given one, else the cached one.
pub fn signed_by_master(
    self_signing: &CheckedCrossSigningKey,
    master: Option<&CheckedCrossSigningKey>,
    cached_master: Option<serde_json::Map<String, Value>>,
) -> bool {
    let master = match master {
        Some(master) => Some((master.public_key.clone(), master.verify_key)),
        None => cached_master.as_ref().and_then(stored_public_key),
    };
    let Some((public_key, verify_key)) = master else {
        return false;
    };
    let user_id = self_signing
        .object
        .get("user_id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    verify_json(
        &Value::Object(self_signing.object.clone()),
        user_id,
        &format!("ed25519:{public_key}"),
        &verify_key,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names() -> (ServerName, ServerName) {
        (
            ServerName::parse("remote.example").unwrap_or_else(|_| unreachable!()),
            ServerName::parse("us.example").unwrap_or_else(|_| unreachable!()),
        )
    }

    #[test]
    fn integers_may_be_decimal_strings_but_nothing_else() {
        assert_eq!(stream_int(&json!(7)), Some(7));
        assert_eq!(stream_int(&json!("12")), Some(12));
        assert_eq!(stream_int(&json!(-1)), None);
        assert_eq!(stream_int(&json!("-1")), None);
        assert_eq!(stream_int(&json!("1e3")), None);
        assert_eq!(stream_int(&json!(1.5)), None);
        assert_eq!(stream_int(&json!("")), None);
        assert_eq!(stream_int(&json!(null)), None);
    }

    #[test]
    fn a_deletion_parses_and_unknown_fields_are_ignored() {
        let (origin, ours) = names();
        let parsed = parse_device_update(
            &json!({"user_id": "@a:REMOTE.example", "device_id": "D", "stream_id": "5",
                    "prev_id": [4, "3"], "deleted": true,
                    "org.matrix.opentracing_context": "{}"}),
            &origin,
            &ours,
        );
        let parsed = parsed.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(parsed.user_id, "@a:REMOTE.example");
        assert_eq!(parsed.update.stream_id, 5);
        assert_eq!(parsed.update.prev_ids, vec![4, 3]);
        assert!(parsed.update.deleted);
    }

    #[test]
    fn spoofed_and_malformed_updates_are_told_apart() {
        let (origin, ours) = names();
        let outcome = |content: Value| match parse_device_update(&content, &origin, &ours) {
            Ok(_) => "ok",
            Err(dropped) => dropped.outcome,
        };
        assert_eq!(
            outcome(json!({"user_id": "@a:evil.example", "device_id": "D", "stream_id": 1})),
            "spoofed"
        );
        assert_eq!(
            outcome(json!({"user_id": "@a:us.example", "device_id": "D", "stream_id": 1})),
            "spoofed"
        );
        assert_eq!(
            outcome(json!({"user_id": "@a:remote.example", "device_id": "D"})),
            "malformed"
        );
        assert_eq!(
            outcome(
                json!({"user_id": "@a:remote.example", "device_id": "D", "stream_id": 1,
                           "prev_id": 0})
            ),
            "malformed"
        );
        assert_eq!(
            outcome(json!({"user_id": "@a:remote.example", "device_id": 3, "stream_id": 1})),
            "malformed"
        );
        assert_eq!(
            outcome(
                json!({"user_id": "@a:remote.example", "device_id": "D", "stream_id": 1,
                           "keys": {"user_id": "@a:remote.example"}})
            ),
            "bad_signature"
        );
        assert_eq!(outcome(json!("not an object")), "malformed");
        assert_eq!(
            outcome(
                json!({"user_id": "@a:remote.example", "device_id": "D", "stream_id": 1,
                           "device_display_name": "Phone"})
            ),
            "ok"
        );
    }

    #[test]
    fn a_bad_cross_signing_key_is_refused_alone() {
        let (origin, ours) = names();
        let parsed = parse_signing_key_update(
            &json!({"user_id": "@a:remote.example", "master_key": {"user_id": "@a:remote.example"}}),
            &origin,
            &ours,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(parsed.master_key.is_none());
        assert_eq!(parsed.refused.len(), 1);
        assert_eq!(parsed.refused[0].outcome, "bad_signature");
    }
}
