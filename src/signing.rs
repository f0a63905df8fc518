//! JSON signing and verification (SPEC §3.1, §3.3, §3.4) and unpadded base64.
//! (Contract only; the crypto work fills it in.)

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::keys::ServerSigningKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("not canonical JSON: {0}")]
    Canonical(#[from] crate::canonical_json::CanonicalJsonError),
    #[error("the value to sign is not a JSON object")]
    NotAnObject,
    #[error("no signature by {entity} with key {key_id}")]
    MissingSignature { entity: String, key_id: String },
    #[error("signature is not valid base64")]
    BadBase64,
    #[error("signature does not verify")]
    BadSignature,
}

/// Unpadded standard base64.
pub fn encode_base64(bytes: &[u8]) -> String {
    let _ = bytes;
    todo!("crypto helper")
}

/// Lenient base64: padded or not, trailing bits allowed.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, SigningError> {
    let _ = text;
    todo!("crypto helper")
}

/// Signs `value` in place as `entity` (merging into existing `signatures`).
pub fn sign_json(value: &mut Value, entity: &str, key: &ServerSigningKey) -> Result<(), SigningError> {
    let _ = (value, entity, key);
    todo!("crypto helper")
}

/// Checks `signatures[entity][key_id]` of `value` with `verify_key`.
pub fn verify_json(
    value: &Value,
    entity: &str,
    key_id: &str,
    verify_key: &VerifyingKey,
) -> Result<(), SigningError> {
    let _ = (value, entity, key_id, verify_key);
    todo!("crypto helper")
}

/// Parses an unpadded-base64 ed25519 public key.
pub fn decode_verify_key(text: &str) -> Result<VerifyingKey, SigningError> {
    let _ = text;
    todo!("crypto helper")
}
