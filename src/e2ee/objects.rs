//! Checks on the signed JSON objects of the device plane (SPEC-E2EE §1):
//! device keys, one-time and fallback key objects, cross-signing keys, and
//! the merge of separately stored signatures into an object on the way out.
//! Signatures are checked with `signing` over canonical JSON (without
//! `signatures` and `unsigned`). Pure functions: no store, no network.

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value};

use crate::canonical_json::to_canonical_string;
use crate::signing::{SigningError, decode_base64, decode_verify_key, signed_bytes, verify_json};
use crate::store::keys::CrossSigningKind;

use super::error::KeysRejected;

/// A `device_keys` object that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedDeviceKeys {
    /// The object as received, without `unsigned` (which no signature
    /// covers and which the server fills in itself when serving).
    pub object: Map<String, Value>,
    /// The device's ed25519 key, which signed the object.
    pub ed25519: VerifyingKey,
}

impl CheckedDeviceKeys {
    /// The object as canonical JSON text, for the store (so an identical
    /// re-upload is byte-identical whatever the client's key order).
    pub fn json(&self) -> Result<String, KeysRejected> {
        canonical_text(&Value::Object(self.object.clone()))
    }

    /// Canonical JSON of the `keys` map: the device's identity.
    pub fn identity(&self) -> Result<String, KeysRejected> {
        let keys = self.object.get("keys").cloned().unwrap_or(Value::Null);
        to_canonical_string(&keys).map_err(|e| KeysRejected::BadJson(e.to_string()))
    }
}

/// `value` as canonical JSON text (what the store keeps of every key).
pub fn canonical_text(value: &Value) -> Result<String, KeysRejected> {
    to_canonical_string(value)
        .map_err(|e| KeysRejected::BadJson(format!("not canonical JSON: {e}")))
}

fn bad(message: impl Into<String>) -> KeysRejected {
    KeysRejected::BadJson(message.into())
}

/// Maps a verification failure of `what` to the caller's error.
pub fn signature_error(error: SigningError, what: &str) -> KeysRejected {
    match error {
        SigningError::Canonical(cause) => bad(format!("{what} is not canonical JSON: {cause}")),
        SigningError::NotAnObject => bad(format!("{what} has malformed signatures")),
        SigningError::BadVerifyKey => {
            KeysRejected::InvalidParam(format!("{what}: not an ed25519 public key"))
        }
        SigningError::MissingSignature { entity, key_id } => KeysRejected::InvalidSignature(
            format!("{what} carries no signature by {entity} with {key_id}"),
        ),
        SigningError::BadBase64 | SigningError::BadSignature => {
            KeysRejected::InvalidSignature(format!("{what}: signature does not verify"))
        }
    }
}

fn string_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<&'a str, KeysRejected> {
    match object.get(field) {
        None => Err(KeysRejected::MissingParam(format!(
            "{what} lacks the required field {field}"
        ))),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(bad(format!("{what}.{field} must be a string"))),
    }
}

fn object_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<&'a Map<String, Value>, KeysRejected> {
    match object.get(field) {
        None => Err(KeysRejected::MissingParam(format!(
            "{what} lacks the required field {field}"
        ))),
        Some(Value::Object(inner)) => Ok(inner),
        Some(_) => Err(bad(format!("{what}.{field} must be an object"))),
    }
}

/// Whether `text` is unpadded-or-padded base64 of exactly 32 bytes.
/// A request body's required map field (`device_keys` of a query,
/// `one_time_keys` of a claim): absent is `M_MISSING_PARAM`, anything but an
/// object (`null` too) is `M_BAD_JSON`.
pub fn required_map<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a Map<String, Value>, KeysRejected> {
    match body.get(field) {
        None => Err(KeysRejected::MissingParam(format!("{field} is required"))),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(KeysRejected::BadJson(format!("{field} must be an object"))),
    }
}

fn is_base64_key(text: &str) -> bool {
    decode_base64(text).is_ok_and(|bytes| bytes.len() == 32)
}

/// Checks a device's `device_keys` upload (SPEC-E2EE §1.1): all five fields,
/// the caller's user and device IDs, `keys` named `<algorithm>:<device_id>`
/// with an ed25519 and a curve25519 key, and a self-signature by that
/// ed25519 key that verifies.
pub fn check_device_keys(
    value: &Value,
    user_id: &str,
    device_id: &str,
) -> Result<CheckedDeviceKeys, KeysRejected> {
    let what = "device_keys";
    let Value::Object(object) = value else {
        return Err(bad("device_keys must be an object"));
    };
    if string_field(object, "user_id", what)? != user_id {
        return Err(bad("device_keys.user_id must be the caller's user ID"));
    }
    if string_field(object, "device_id", what)? != device_id {
        return Err(bad("device_keys.device_id must be the caller's device ID"));
    }
    match object.get("algorithms") {
        None => {
            return Err(KeysRejected::MissingParam(format!(
                "{what} lacks algorithms"
            )));
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
        Some(_) => return Err(bad("device_keys.algorithms must be a list of strings")),
    }
    let keys = object_field(object, "keys", what)?;
    for (key_id, key) in keys {
        let (_, suffix) = split_key_id(key_id)
            .map_err(|_| bad(format!("device_keys.keys has a malformed key ID {key_id}")))?;
        if suffix != device_id {
            return Err(KeysRejected::InvalidParam(format!(
                "device_keys.keys.{key_id} must be named after the device"
            )));
        }
        if !key.is_string() {
            return Err(bad(format!("device_keys.keys.{key_id} must be a string")));
        }
    }
    let ed25519_id = format!("ed25519:{device_id}");
    let ed25519 = keys
        .get(&ed25519_id)
        .and_then(Value::as_str)
        .ok_or_else(|| {
            KeysRejected::InvalidParam(format!("device_keys.keys lacks {ed25519_id}"))
        })?;
    let ed25519 = decode_verify_key(ed25519).map_err(|e| signature_error(e, "device_keys"))?;
    let curve_id = format!("curve25519:{device_id}");
    match keys.get(&curve_id).and_then(Value::as_str) {
        Some(curve) if is_base64_key(curve) => {}
        Some(_) => {
            return Err(KeysRejected::InvalidParam(format!(
                "device_keys.keys.{curve_id} is not a curve25519 key"
            )));
        }
        None => {
            return Err(KeysRejected::InvalidParam(format!(
                "device_keys.keys lacks {curve_id}"
            )));
        }
    }
    object_field(object, "signatures", what)?;
    verify_json(value, user_id, &ed25519_id, &ed25519)
        .map_err(|e| signature_error(e, "device_keys"))?;
    let mut object = object.clone();
    object.remove("unsigned");
    Ok(CheckedDeviceKeys { object, ed25519 })
}

/// Splits `<algorithm>:<key_id>`: exactly one `:`, both parts non-empty.
pub fn split_key_id(key_id: &str) -> Result<(&str, &str), KeysRejected> {
    match key_id.split_once(':') {
        Some((algorithm, id)) if !algorithm.is_empty() && !id.is_empty() && !id.contains(':') => {
            Ok((algorithm, id))
        }
        _ => Err(bad(format!(
            "key ID {key_id} is not of the form <algorithm>:<key_id>"
        ))),
    }
}

/// Checks one one-time or fallback key (SPEC-E2EE §1.2): a bare string for
/// an unsigned algorithm, or a key object with `key` and a signature by the
/// device's ed25519 key (`device_key`; `None` when the device has none
/// yet). A fallback key object must say `"fallback": true`, inside the
/// signed part.
pub fn check_key_object(
    name: &str,
    algorithm: &str,
    value: &Value,
    user_id: &str,
    device_id: &str,
    device_key: Option<&VerifyingKey>,
    fallback: bool,
) -> Result<(), KeysRejected> {
    match value {
        Value::String(_) if !algorithm.starts_with("signed_") => Ok(()),
        Value::String(_) => Err(bad(format!("{name} must be a signed key object"))),
        Value::Object(object) => {
            let key = string_field(object, "key", name)?;
            if !is_base64_key(key) {
                return Err(KeysRejected::InvalidParam(format!(
                    "{name}.key is not a 32-byte base64 key"
                )));
            }
            object_field(object, "signatures", name)?;
            if fallback && object.get("fallback") != Some(&Value::Bool(true)) {
                return Err(bad(format!("{name} must carry \"fallback\": true")));
            }
            let device_key = device_key.ok_or_else(|| {
                KeysRejected::InvalidParam(format!(
                    "{name} is signed, but the device has no device keys to check it with"
                ))
            })?;
            verify_json(value, user_id, &format!("ed25519:{device_id}"), device_key)
                .map_err(|e| signature_error(e, name))
        }
        _ => Err(bad(format!("{name} must be a string or a key object"))),
    }
}

/// A cross-signing key that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedCrossSigningKey {
    pub kind: CrossSigningKind,
    /// Unpadded base64 as it appears in the key ID.
    pub public_key: String,
    pub verify_key: VerifyingKey,
    pub object: Map<String, Value>,
}

/// Checks a cross-signing key (SPEC-E2EE §1.3): the user's, with `kind` in
/// `usage`, and exactly one key `ed25519:<public key>` → `<public key>`.
pub fn check_cross_signing_key(
    value: &Value,
    user_id: &str,
    kind: CrossSigningKind,
) -> Result<CheckedCrossSigningKey, KeysRejected> {
    let what = format!("{}_key", kind.as_str());
    let invalid = |message: &str| KeysRejected::InvalidParam(format!("{what}: {message}"));
    let Value::Object(object) = value else {
        return Err(bad(format!("{what} must be an object")));
    };
    if string_field(object, "user_id", &what)? != user_id {
        return Err(invalid("user_id must be the caller's user ID"));
    }
    let usage_ok = match object.get("usage") {
        Some(Value::Array(usage)) => usage.iter().any(|u| u.as_str() == Some(kind.as_str())),
        _ => false,
    };
    if !usage_ok {
        return Err(invalid(&format!("usage must include {}", kind.as_str())));
    }
    let keys = object_field(object, "keys", &what)?;
    let mut entries = keys.iter();
    let (Some((key_id, key)), None) = (entries.next(), entries.next()) else {
        return Err(invalid("keys must hold exactly one key"));
    };
    let public_key = key_id
        .strip_prefix("ed25519:")
        .filter(|public_key| key.as_str() == Some(*public_key))
        .ok_or_else(|| invalid("keys must be {\"ed25519:<public key>\": \"<public key>\"}"))?;
    let verify_key =
        decode_verify_key(public_key).map_err(|_| invalid("not an ed25519 public key"))?;
    if let Some(signatures) = object.get("signatures")
        && !signatures.is_object()
    {
        return Err(bad(format!("{what}.signatures must be an object")));
    }
    Ok(CheckedCrossSigningKey {
        kind,
        public_key: public_key.to_owned(),
        verify_key,
        object: object.clone(),
    })
}

/// Whether two objects have the same signed content (everything but
/// `signatures` and `unsigned`).
pub fn same_signed_content(
    a: &Map<String, Value>,
    b: &Map<String, Value>,
) -> Result<bool, KeysRejected> {
    let a = signed_bytes(a).map_err(|e| signature_error(e, "key"))?;
    let b = signed_bytes(b).map_err(|e| signature_error(e, "key"))?;
    Ok(a == b)
}

/// Parses JSON text the store returned; `None` (logged) if it is not an
/// object, which only a damaged store could produce.
pub fn stored_object(json: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(object)) => Some(object),
        _ => {
            tracing::error!("stored key JSON is not an object; skipped");
            None
        }
    }
}

/// The public key of a stored cross-signing key object.
pub fn stored_public_key(object: &Map<String, Value>) -> Option<(String, VerifyingKey)> {
    let keys = object.get("keys")?.as_object()?;
    let (key_id, _) = keys.iter().next()?;
    let public_key = key_id.strip_prefix("ed25519:")?;
    Some((public_key.to_owned(), decode_verify_key(public_key).ok()?))
}

/// Adds each stored signature to `object.signatures[signer][key_id]` (the
/// store's builder of outbound device-list EDUs uses the same function).
pub use crate::store::device_lists::merge_signatures;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::encode_base64;
    use crate::store::keys::StoredSignature;
    use ed25519_dalek::{Signer, SigningKey};
    use serde_json::json;

    fn signed(mut value: Value, user: &str, key_id: &str, key: &SigningKey) -> Value {
        let bytes = value
            .as_object()
            .map(signed_bytes)
            .and_then(Result::ok)
            .unwrap_or_default();
        let signature = encode_base64(&key.sign(&bytes).to_bytes());
        value["signatures"] = json!({ user: { key_id: signature } });
        value
    }

    fn device_keys(key: &SigningKey) -> Value {
        json!({
            "user_id": "@a:x", "device_id": "D",
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {
                "ed25519:D": encode_base64(key.verifying_key().as_bytes()),
                "curve25519:D": encode_base64(&[7; 32]),
            },
        })
    }

    #[test]
    fn device_keys_need_a_self_signature_that_verifies() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let good = signed(device_keys(&key), "@a:x", "ed25519:D", &key);
        let mut with_unsigned = good.clone();
        with_unsigned["unsigned"] = json!({"device_display_name": "spoof"});
        let checked = check_device_keys(&with_unsigned, "@a:x", "D");
        assert!(
            checked
                .as_ref()
                .is_ok_and(|c| !c.object.contains_key("unsigned"))
        );
        assert!(matches!(
            check_device_keys(&good, "@b:x", "D"),
            Err(KeysRejected::BadJson(_))
        ));
        let other = SigningKey::from_bytes(&[2; 32]);
        let forged = signed(device_keys(&key), "@a:x", "ed25519:D", &other);
        assert!(matches!(
            check_device_keys(&forged, "@a:x", "D"),
            Err(KeysRejected::InvalidSignature(_))
        ));
        let mut tampered = good.clone();
        tampered["algorithms"] = json!([]);
        assert!(matches!(
            check_device_keys(&tampered, "@a:x", "D"),
            Err(KeysRejected::InvalidSignature(_))
        ));
    }

    #[test]
    fn key_objects_are_signed_by_the_device() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let vk = key.verifying_key();
        let object = signed(
            json!({"key": encode_base64(&[3; 32])}),
            "@a:x",
            "ed25519:D",
            &key,
        );
        let check = |value: &Value, fallback| {
            check_key_object(
                "k",
                "signed_curve25519",
                value,
                "@a:x",
                "D",
                Some(&vk),
                fallback,
            )
        };
        assert!(check(&object, false).is_ok());
        assert!(check(&object, true).is_err(), "a fallback key says so");
        let fallback = signed(
            json!({"key": encode_base64(&[3; 32]), "fallback": true}),
            "@a:x",
            "ed25519:D",
            &key,
        );
        assert!(check(&fallback, true).is_ok());
        assert!(check(&json!("bare"), false).is_err());
        assert!(
            check_key_object("k", "curve25519", &json!("bare"), "@a:x", "D", None, false).is_ok()
        );
        assert!(matches!(
            check_key_object("k", "signed_curve25519", &object, "@a:x", "D", None, false),
            Err(KeysRejected::InvalidParam(_))
        ));
    }

    #[test]
    fn cross_signing_keys_hold_one_ed25519_key_named_after_itself() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let public = encode_base64(key.verifying_key().as_bytes());
        let good = json!({"user_id": "@a:x", "usage": ["master"], "keys": { format!("ed25519:{public}"): public }});
        assert!(check_cross_signing_key(&good, "@a:x", CrossSigningKind::Master).is_ok());
        assert!(check_cross_signing_key(&good, "@a:x", CrossSigningKind::SelfSigning).is_err());
        assert!(check_cross_signing_key(&good, "@b:x", CrossSigningKind::Master).is_err());
        let mut misnamed = good.clone();
        misnamed["keys"] = json!({ "ed25519:other": public });
        assert!(check_cross_signing_key(&misnamed, "@a:x", CrossSigningKind::Master).is_err());
    }

    #[test]
    fn key_ids_need_exactly_one_colon() {
        assert_eq!(
            split_key_id("signed_curve25519:AAAA").ok(),
            Some(("signed_curve25519", "AAAA"))
        );
        for bad_id in ["nocolon", ":x", "x:", "a:b:c"] {
            assert!(split_key_id(bad_id).is_err(), "{bad_id}");
        }
    }

    #[test]
    fn stored_signatures_merge_beside_existing_ones() {
        let mut object = serde_json::json!({"signatures": {"@a:x": {"ed25519:D": "s1"}}})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let signature = StoredSignature {
            target_user_id: "@a:x".into(),
            target_key_id: "D".into(),
            signer_user_id: "@a:x".into(),
            signer_key_id: "ed25519:SSK".into(),
            signature: "s2".into(),
        };
        merge_signatures(&mut object, [&signature]);
        assert_eq!(
            Value::Object(object),
            serde_json::json!({"signatures": {"@a:x": {"ed25519:D": "s1", "ed25519:SSK": "s2"}}})
        );
    }
}
