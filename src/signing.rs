//! JSON signing and verification (SPEC §3.1, §3.3, §3.4) and unpadded base64.
//!
//! It owns the signing algorithm: which bytes are signed (the canonical JSON
//! of the object without its top-level `signatures` and `unsigned`), where
//! the signature goes, and how one is checked. It does not fetch or cache
//! keys (the key fetcher does) and does not decide which entity must have
//! signed (callers pass it).
//!
//! Verification uses ed25519-dalek's `verify_strict`, deliberately stricter
//! than ruma (which uses `verify`). The two differ only for weak (small
//! order) public keys and small-order `R` components, which no honest signer
//! produces; accepting them lets one signature verify for several messages or
//! keys. libsodium, which Synapse uses through PyNaCl, rejects those cases
//! as well, so strict verification matches the servers we talk to. The spec
//! vectors and ruma-made signatures verify under both (see tests/it/crypto.rs).

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::{Map, Value};

use crate::canonical_json::write_canonical_excluding;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("not canonical JSON: {0}")]
    Canonical(#[from] crate::canonical_json::CanonicalJsonError),
    /// The value (or its `signatures` / `signatures[entity]` member) is not
    /// a JSON object.
    #[error("the value to sign is not a JSON object")]
    NotAnObject,
    #[error("no signature by {entity} with key {key_id}")]
    MissingSignature { entity: String, key_id: String },
    #[error("signature is not valid base64")]
    BadBase64,
    #[error("signature does not verify")]
    BadSignature,
    /// A public key that is not valid base64 of a 32-byte ed25519 point.
    #[error("verify key is not an unpadded-base64 ed25519 public key")]
    BadVerifyKey,
}

/// The top-level keys that are not part of the signed bytes (SPEC §3.3).
const UNSIGNED_KEYS: [&str; 2] = ["signatures", "unsigned"];

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_encode_padding(false)
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
/// Standard alphabet, padding optional, non-zero trailing bits allowed (the
/// spec's own seed vector has them, SPEC §10.1).
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
/// The same for the URL-safe alphabet, which some key files in the wild use.
const LENIENT_URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// Unpadded standard base64.
pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// Lenient base64: padded or not, trailing bits allowed. URL-safe input
/// (`-`, `_`) is accepted too; mixing both alphabets is not.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, SigningError> {
    lenient_engine(text)
        .decode(text)
        .map_err(|_| SigningError::BadBase64)
}

fn lenient_engine(text: &str) -> &'static GeneralPurpose {
    if text.bytes().any(|b| b == b'-' || b == b'_') {
        &LENIENT_URL_SAFE
    } else {
        &LENIENT_STANDARD
    }
}

/// Decodes into a fixed-size array; wrong length or bad base64 is `None`.
fn decode_base64_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    // Room for one extra byte, so over-long input is detected as such.
    let mut buffer = [0u8; 128];
    if text.len() > (N + 3) / 3 * 4 + 2 || N >= buffer.len() {
        return None;
    }
    let written = lenient_engine(text).decode_slice(text, &mut buffer).ok()?;
    if written != N {
        return None;
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&buffer[..N]);
    Some(out)
}

/// The bytes that are signed for `object`: its canonical JSON without the
/// top-level `signatures` and `unsigned` (SPEC §3.3 steps 1–2).
pub fn signed_bytes(object: &Map<String, Value>) -> Result<Vec<u8>, SigningError> {
    let mut out = Vec::with_capacity(256);
    write_canonical_excluding(object, &UNSIGNED_KEYS, &mut out)?;
    Ok(out)
}

/// A key that signs JSON: its key id (`ed25519:<version>`) and a signature
/// over raw bytes. `keys::ServerSigningKey` implements it; this module
/// needs nothing else of a key, so it does not depend on `keys`.
pub trait JsonSigningKey {
    /// The key id the signature is filed under.
    fn key_id(&self) -> &str;
    /// The unpadded-base64 signature of `bytes`.
    fn sign_bytes(&self, bytes: &[u8]) -> String;
}

/// Signs `value` in place as `entity` (merging into existing `signatures`).
pub fn sign_json(
    value: &mut Value,
    entity: &str,
    key: &impl JsonSigningKey,
) -> Result<(), SigningError> {
    let object = value.as_object_mut().ok_or(SigningError::NotAnObject)?;
    let signature = key.sign_bytes(&signed_bytes(object)?);
    let signatures = object
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or(SigningError::NotAnObject)?;
    let by_entity = signatures
        .entry(entity)
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or(SigningError::NotAnObject)?;
    by_entity.insert(key.key_id().to_owned(), Value::String(signature));
    Ok(())
}

/// Checks `signatures[entity][key_id]` of `value` with `verify_key`.
pub fn verify_json(
    value: &Value,
    entity: &str,
    key_id: &str,
    verify_key: &VerifyingKey,
) -> Result<(), SigningError> {
    let object = value.as_object().ok_or(SigningError::NotAnObject)?;
    let missing = || SigningError::MissingSignature {
        entity: entity.to_owned(),
        key_id: key_id.to_owned(),
    };
    let signature = object
        .get("signatures")
        .and_then(|signatures| signatures.get(entity))
        .and_then(|by_entity| by_entity.get(key_id))
        .ok_or_else(missing)?
        .as_str()
        .ok_or(SigningError::BadBase64)?;
    verify_bytes(&signed_bytes(object)?, signature, verify_key)
}

/// Checks an unpadded-base64 ed25519 `signature` over `bytes` (strictly; see
/// the module comment).
pub fn verify_bytes(
    bytes: &[u8],
    signature: &str,
    verify_key: &VerifyingKey,
) -> Result<(), SigningError> {
    let signature: [u8; 64] = decode_base64_array(signature).ok_or(SigningError::BadBase64)?;
    verify_key
        .verify_strict(bytes, &Signature::from_bytes(&signature))
        .map_err(|_| SigningError::BadSignature)
}

/// Parses an unpadded-base64 ed25519 public key.
pub fn decode_verify_key(text: &str) -> Result<VerifyingKey, SigningError> {
    let bytes: [u8; 32] = decode_base64_array(text).ok_or(SigningError::BadVerifyKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| SigningError::BadVerifyKey)
}
