//! The X-Matrix `Authorization` header (SPEC §4): parsing, printing, and
//! signing/verifying request objects. (Contract only; the crypto work fills
//! it in.)

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::keys::ServerSigningKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XMatrixError {
    #[error("not an X-Matrix header")]
    NotXMatrix,
    #[error("malformed X-Matrix header: {0}")]
    Malformed(String),
    #[error("X-Matrix header lacks {0}")]
    Missing(&'static str),
    #[error("signing: {0}")]
    Signing(#[from] crate::signing::SigningError),
}

/// One parsed `Authorization: X-Matrix ...` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XMatrix {
    pub origin: String,
    pub destination: Option<String>,
    pub key: String,
    pub sig: String,
}

impl XMatrix {
    /// Parses a header value (`X-Matrix origin="...",...`).
    pub fn parse(header_value: &str) -> Result<Self, XMatrixError> {
        let _ = header_value;
        todo!("crypto helper")
    }
    /// Prints the header value, every parameter quoted.
    pub fn to_header_value(&self) -> String {
        todo!("crypto helper")
    }
}

/// The request object that is signed (SPEC §4.1).
pub struct RequestToSign<'a> {
    pub method: &'a str,
    /// Raw request target (path and query as on the wire).
    pub uri: &'a str,
    pub origin: &'a str,
    pub destination: &'a str,
    /// The parsed body, only when the request has one.
    pub content: Option<&'a Value>,
}

/// Signs a request; returns the header to send.
pub fn sign_request(key: &ServerSigningKey, request: &RequestToSign<'_>) -> Result<XMatrix, XMatrixError> {
    let _ = (key, request);
    todo!("crypto helper")
}

/// Verifies `header.sig` over `request` with `verify_key`.
pub fn verify_request(
    header: &XMatrix,
    request: &RequestToSign<'_>,
    verify_key: &VerifyingKey,
) -> Result<(), XMatrixError> {
    let _ = (header, request, verify_key);
    todo!("crypto helper")
}
