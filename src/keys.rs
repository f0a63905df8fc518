//! Server signing keys: our own key (Synapse's key file format) and the key
//! document we serve at `GET /_matrix/key/v2/server` (SPEC §5.1, §5.5).
//!
//! It does not fetch, validate, cache or store other servers' keys
//! (`federation::keyring` and the store do), and it does not decide when to
//! rotate.

use std::fmt;
use std::path::Path;

use ed25519_dalek::Signer as _;
use serde_json::{Map, Value, json};

use crate::canonical_json::MAX_SAFE_INTEGER;
use crate::signing::{JsonSigningKey, decode_base64, encode_base64, sign_json};

/// The longest a fetched key is trusted without a re-fetch (SPEC §5.3).
pub const MAX_KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
    /// A key version outside `[A-Za-z0-9_]+`.
    #[error("key version {version:?} must be non-empty and use only [A-Za-z0-9_]")]
    BadVersion { version: String },
    /// A fetched `/_matrix/key/v2/server` response that must not be used.
    #[error("key response from {server_name} rejected: {reason}")]
    BadKeyResponse { server_name: String, reason: String },
}

/// An ed25519 signing key with its key id `ed25519:<version>`.
pub struct ServerSigningKey {
    key_id: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for ServerSigningKey {
    /// Prints the key id and public key, never the seed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSigningKey")
            .field("key_id", &self.key_id)
            .field("public_key", &self.public_key_base64())
            .finish()
    }
}

/// A retired key still listed under `old_verify_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldVerifyKey {
    pub key_id: String,
    /// Unpadded base64 public key.
    pub public_key: String,
    pub expired_ts: i64,
}

/// Whether `version` is a valid key version: `[A-Za-z0-9_]+`.
pub fn is_valid_key_version(version: &str) -> bool {
    !version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl ServerSigningKey {
    /// Loads a Synapse-format key file (`ed25519 <version> <seed>`).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let contents = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&contents, &shown)
    }

    /// Parses key file contents (first valid line).
    ///
    /// Blank lines are skipped; the first other line must be
    /// `ed25519 <version> <base64 seed>` and is the key. Later lines (Synapse
    /// allows several keys) are ignored. A malformed first key line is an
    /// error, not skipped, so a typo never silently changes the key.
    pub fn parse(contents: &str, path_for_errors: &str) -> Result<Self, KeyError> {
        let malformed = |reason: String| KeyError::Malformed {
            path: path_for_errors.to_owned(),
            reason,
        };
        let line = contents
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .ok_or_else(|| malformed("the file is empty".to_owned()))?;
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let [algorithm, version, seed] = fields[..] else {
            return Err(malformed(format!(
                "expected `ed25519 <version> <base64 seed>`, found {} fields",
                fields.len()
            )));
        };
        if algorithm != "ed25519" {
            return Err(malformed(format!(
                "unsupported algorithm {algorithm:?}, expected \"ed25519\""
            )));
        }
        if !is_valid_key_version(version) {
            return Err(malformed(format!(
                "key version {version:?} must use only [A-Za-z0-9_]"
            )));
        }
        let seed =
            decode_base64(seed).map_err(|_| malformed("the seed is not base64".to_owned()))?;
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| malformed(format!("the seed is {} bytes, expected 32", seed.len())))?;
        Ok(Self::from_seed(version, seed))
    }

    /// A fresh random key with the given version.
    ///
    /// The version is not checked here (the contract has no error path);
    /// use [`ServerSigningKey::try_generate`] for untrusted versions.
    pub fn generate(version: &str) -> Self {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        Self::from_seed(version, seed)
    }

    /// Like [`ServerSigningKey::generate`], but rejects a version outside
    /// `[A-Za-z0-9_]+`, which could not be written to and read back from a key
    /// file.
    pub fn try_generate(version: &str) -> Result<Self, KeyError> {
        if !is_valid_key_version(version) {
            return Err(KeyError::BadVersion {
                version: version.to_owned(),
            });
        }
        Ok(Self::generate(version))
    }

    pub fn from_seed(version: &str, seed: [u8; 32]) -> Self {
        ServerSigningKey {
            key_id: format!("ed25519:{version}"),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// `ed25519 <version> <unpadded base64 seed>\n`.
    pub fn to_file_contents(&self) -> String {
        format!(
            "ed25519 {} {}\n",
            self.version(),
            encode_base64(self.key.as_bytes())
        )
    }

    /// `ed25519:<version>`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The part of the key id after `ed25519:`.
    pub fn version(&self) -> &str {
        self.key_id
            .strip_prefix("ed25519:")
            .expect("key ids are built as ed25519:<version>")
    }

    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }

    /// Unpadded base64 of the public key.
    pub fn public_key_base64(&self) -> String {
        encode_base64(self.key.verifying_key().as_bytes())
    }

    /// Signs raw bytes; returns unpadded base64.
    pub fn sign_bytes(&self, bytes: &[u8]) -> String {
        encode_base64(&self.key.sign(bytes).to_bytes())
    }
}

impl JsonSigningKey for ServerSigningKey {
    fn key_id(&self) -> &str {
        ServerSigningKey::key_id(self)
    }

    fn sign_bytes(&self, bytes: &[u8]) -> String {
        ServerSigningKey::sign_bytes(self, bytes)
    }
}

/// The signed `GET /_matrix/key/v2/server` response.
///
/// `old_verify_keys` is always present (`{}` when empty), matching SPEC
/// §10.4(a). Timestamps beyond 2^53−1 (hundreds of thousands of years away)
/// are clamped to it so the document is always canonical.
pub fn server_key_document(
    server_name: &str,
    key: &ServerSigningKey,
    old_keys: &[OldVerifyKey],
    valid_until_ts: i64,
) -> Value {
    let clamp = |ts: i64| ts.clamp(0, MAX_SAFE_INTEGER);
    let mut old_verify_keys = Map::new();
    for old in old_keys {
        old_verify_keys.insert(
            old.key_id.clone(),
            json!({"key": old.public_key, "expired_ts": clamp(old.expired_ts)}),
        );
    }
    let mut document = json!({
        "server_name": server_name,
        "verify_keys": { key.key_id(): { "key": key.public_key_base64() } },
        "old_verify_keys": old_verify_keys,
        "valid_until_ts": clamp(valid_until_ts),
    });
    sign_json(&mut document, server_name, key)
        .expect("a document of strings and clamped integers is a canonical JSON object");
    document
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip() {
        let key = ServerSigningKey::from_seed("a_1", [7; 32]);
        let parsed = ServerSigningKey::parse(&key.to_file_contents(), "mem");
        let parsed = parsed.expect("our own output parses");
        assert_eq!(parsed.key_id(), "ed25519:a_1");
        assert_eq!(parsed.public_key_base64(), key.public_key_base64());
    }

    #[test]
    fn try_generate_checks_version() {
        assert!(ServerSigningKey::try_generate("a b").is_err());
        assert!(ServerSigningKey::try_generate("").is_err());
        let key = ServerSigningKey::try_generate("auto").expect("valid version");
        assert_eq!(key.key_id(), "ed25519:auto");
        assert!(!format!("{key:?}").contains(&encode_base64(key.key.as_bytes())));
    }
}
