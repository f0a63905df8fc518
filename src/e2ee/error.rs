//! `KeysRejected`: why the E2EE core refused a request, as decisions the
//! HTTP edges map to Matrix errors (`error::MatrixError`'s
//! `From<KeysRejected>`), so the core names no HTTP type. The caller's
//! faults carry a message for the `error` field; a store failure is logged
//! and answered as a 500 by the edge.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum KeysRejected {
    /// A field has the wrong type or shape (`M_BAD_JSON`).
    #[error("{0}")]
    BadJson(String),
    /// A required field is absent (`M_MISSING_PARAM`).
    #[error("{0}")]
    MissingParam(String),
    /// A value is well-formed but not acceptable (`M_INVALID_PARAM`).
    #[error("{0}")]
    InvalidParam(String),
    /// A signature is missing or does not verify (`M_INVALID_SIGNATURE`).
    #[error("{0}")]
    InvalidSignature(String),
    /// The request names more devices than the configured limit
    /// (`M_TOO_LARGE`).
    #[error("{0}")]
    TooLarge(String),
    /// A cross-signing key's public key is one of the user's device IDs
    /// (`403 M_FORBIDDEN`, "Key ID in use").
    #[error("{0}")]
    KeyIdInUse(String),
    /// A signature upload names a key the server does not know
    /// (`M_NOT_FOUND`).
    #[error("{0}")]
    UnknownKey(String),
    /// A server asked about a user of another server (`M_INVALID_PARAM`).
    #[error("user {0} is not hosted on this server")]
    NotLocal(String),
    /// The caller's device was deleted while the request ran: its token
    /// no longer names a device (`M_UNKNOWN_TOKEN`).
    #[error("the device is not registered")]
    UnknownDevice,
    /// Replacing stored cross-signing keys needs user-interactive
    /// authentication, which the request did not complete.
    #[error("user-interactive authentication is required")]
    AuthRequired,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl KeysRejected {
    /// A label for the rejection metric.
    pub fn reason(&self) -> &'static str {
        match self {
            KeysRejected::BadJson(_) => "bad_json",
            KeysRejected::MissingParam(_) => "missing_param",
            KeysRejected::InvalidParam(_) => "invalid_param",
            KeysRejected::InvalidSignature(_) => "invalid_signature",
            KeysRejected::TooLarge(_) => "too_large",
            KeysRejected::KeyIdInUse(_) => "key_id_in_use",
            KeysRejected::UnknownKey(_) => "unknown_key",
            KeysRejected::NotLocal(_) => "not_local",
            KeysRejected::UnknownDevice => "unknown_device",
            KeysRejected::AuthRequired => "auth_required",
            KeysRejected::Store(_) => "store",
        }
    }
}
