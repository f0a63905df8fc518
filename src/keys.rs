//! Our server signing key (Synapse's key file format) and the key document
//! served at `GET /_matrix/key/v2/server`. (Contract only; the crypto work
//! fills it in.)

use std::path::Path;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("key file {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
}

/// An ed25519 signing key with its key id `ed25519:<version>`.
pub struct ServerSigningKey {
    key_id: String,
    key: ed25519_dalek::SigningKey,
}

/// A retired key still listed under `old_verify_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldVerifyKey {
    pub key_id: String,
    /// Unpadded base64 public key.
    pub public_key: String,
    pub expired_ts: i64,
}

impl ServerSigningKey {
    /// Loads a Synapse-format key file (`ed25519 <version> <seed>`).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let _ = path;
        todo!("crypto helper")
    }
    /// Parses key file contents (first valid line).
    pub fn parse(contents: &str, path_for_errors: &str) -> Result<Self, KeyError> {
        let _ = (contents, path_for_errors);
        todo!("crypto helper")
    }
    /// A fresh random key with the given version.
    pub fn generate(version: &str) -> Self {
        let _ = version;
        todo!("crypto helper")
    }
    pub fn from_seed(version: &str, seed: [u8; 32]) -> Self {
        ServerSigningKey {
            key_id: format!("ed25519:{version}"),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }
    /// `ed25519 <version> <unpadded base64 seed>\n`.
    pub fn to_file_contents(&self) -> String {
        todo!("crypto helper")
    }
    /// `ed25519:<version>`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }
    /// Unpadded base64 of the public key.
    pub fn public_key_base64(&self) -> String {
        todo!("crypto helper")
    }
    /// Signs raw bytes; returns unpadded base64.
    pub fn sign_bytes(&self, bytes: &[u8]) -> String {
        let _ = bytes;
        todo!("crypto helper")
    }
}

/// The signed `GET /_matrix/key/v2/server` response.
pub fn server_key_document(
    server_name: &str,
    key: &ServerSigningKey,
    old_keys: &[OldVerifyKey],
    valid_until_ts: i64,
) -> Value {
    let _ = (server_name, key, old_keys, valid_until_ts);
    todo!("crypto helper")
}
