//! Canonical JSON (SPEC §3.2): the one encoder used for everything Courier
//! signs or verifies. (Contract only; the crypto work fills it in.)

use serde_json::Value;

/// Why a value has no canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalJsonError {
    #[error("number {0} is not an integer in ±(2^53−1)")]
    BadNumber(String),
}

/// Encodes `value` as canonical JSON bytes.
pub fn to_canonical_bytes(value: &Value) -> Result<Vec<u8>, CanonicalJsonError> {
    let _ = value;
    todo!("crypto helper")
}

/// Encodes `value` as a canonical JSON string.
pub fn to_canonical_string(value: &Value) -> Result<String, CanonicalJsonError> {
    let _ = value;
    todo!("crypto helper")
}
