//! Server signing keys: our own key (Synapse's key file format) and the key
//! document we serve at `GET /_matrix/key/v2/server` (SPEC §5.1, §5.5).
//!
//! It also holds the mechanics of `courier keygen`: fresh key ids in
//! Synapse's shape (`a_` + six random letters and digits), rotation (the old
//! key file kept aside, its public part listed under `old_verify_keys`), and
//! the start-up check that our key id never means two different keys.
//!
//! It does not fetch, validate, cache or store other servers' keys
//! (`federation::keyring` and the store do), and it does not decide when to
//! rotate.

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::Signer as _;
use rand::RngExt as _;
use serde_json::{Map, Value, json};

use crate::canonical_json::MAX_SAFE_INTEGER;
use crate::signing::{JsonSigningKey, decode_base64, encode_base64, sign_json};

/// The longest a fetched key is trusted without a re-fetch (SPEC §5.3).
pub const MAX_KEY_VALIDITY_MS: i64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    // The OS error is part of the message and deliberately not a
    // `source()`: a caller printing the error chain would show it twice.
    #[error("cannot read key file {path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// Writing a key file, or moving the old one aside, failed.
    #[error("cannot write key file {path}: {error}")]
    Write { path: String, error: std::io::Error },
    /// `keygen` refuses to overwrite a key file or a kept old key.
    #[error("{path} already exists; refusing to overwrite a signing key")]
    Exists { path: String },
    /// The same key id names two different public keys (a regenerated key
    /// that kept its id): peers that cached the old key would refuse every
    /// request signed with the new one.
    #[error(
        "signing key {key_id} ({public_key}) conflicts with {where_known}, which has a \
         different key under the same id; peers that cached that key would reject \
         everything we sign. Generate a key with a fresh id (`courier keygen --rotate`)"
    )]
    ReusedKeyId {
        key_id: String,
        public_key: String,
        where_known: String,
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
        let contents = std::fs::read_to_string(path).map_err(|error| KeyError::Io {
            path: shown.clone(),
            error,
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

/// The number of random characters after `a_` in a fresh key version.
pub const KEY_VERSION_RANDOM_LEN: usize = 6;

/// A fresh key version in Synapse's shape: `a_` and six random
/// `[A-Za-z0-9]`, so a regenerated key never reuses an id a peer may have
/// cached for the previous one.
pub fn random_key_version() -> String {
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(KEY_VERSION_RANDOM_LEN)
        .map(char::from)
        .collect();
    format!("a_{suffix}")
}

/// Refuses a signing key whose id is already known with other key material:
/// listed in `old_verify_keys`, or recorded in the store for our own server
/// name (`stored`: key id and unpadded base64 public key).
pub fn check_key_id_unique(
    key: &ServerSigningKey,
    old_keys: &[OldVerifyKey],
    stored: &[(String, String)],
) -> Result<(), KeyError> {
    let public_key = key.public_key_base64();
    let conflict = |where_known: String| KeyError::ReusedKeyId {
        key_id: key.key_id().to_owned(),
        public_key: public_key.clone(),
        where_known,
    };
    if let Some(old) = old_keys
        .iter()
        .find(|old| old.key_id == key.key_id() && old.public_key != public_key)
    {
        return Err(conflict(format!(
            "old_verify_keys entry {} ({})",
            old.key_id, old.public_key
        )));
    }
    if let Some((id, stored_key)) = stored
        .iter()
        .find(|(id, stored_key)| id == key.key_id() && *stored_key != public_key)
    {
        return Err(conflict(format!(
            "the store's key cache for our server ({id}: {stored_key})"
        )));
    }
    Ok(())
}

/// Writes a new key file, readable by its owner only, refusing to replace
/// an existing file.
pub fn write_new_key_file(path: &Path, key: &ServerSigningKey) -> Result<(), KeyError> {
    use std::io::Write as _;
    let shown = path.display().to_string();
    let write_err = |error: std::io::Error| KeyError::Write {
        path: shown.clone(),
        error,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: shown.clone(),
            }
        } else {
            write_err(error)
        }
    })?;
    file.write_all(key.to_file_contents().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)
}

/// What [`rotate_key_file`] did.
#[derive(Debug)]
pub struct Rotation {
    /// The key now in the key file.
    pub new_key_id: String,
    /// Where the previous key file (with its private key) was moved.
    pub kept_at: PathBuf,
    /// The previous key's public part, to publish under `old_verify_keys`.
    pub old: OldVerifyKey,
}

impl Rotation {
    /// The `[[old_verify_keys]]` entry to add to the configuration.
    pub fn config_entry(&self) -> String {
        format!(
            "[[old_verify_keys]]\nkey_id = \"{}\"\nkey = \"{}\"\nexpired_ts = {}\n",
            self.old.key_id, self.old.public_key, self.old.expired_ts
        )
    }
}

/// Replaces the key in `path` with `new_key`: the old file is moved to
/// `<path>.old-<old version>` (never overwritten; the private key is not
/// lost), and the old public key is returned to be listed under
/// `old_verify_keys` with `expired_ts = now_ms`. Refuses a new key with the
/// old key's id.
pub fn rotate_key_file(
    path: &Path,
    new_key: &ServerSigningKey,
    now_ms: i64,
) -> Result<Rotation, KeyError> {
    let old_key = ServerSigningKey::load(path)?;
    if old_key.key_id() == new_key.key_id() {
        return Err(KeyError::ReusedKeyId {
            key_id: new_key.key_id().to_owned(),
            public_key: new_key.public_key_base64(),
            where_known: format!("the key being rotated out of {}", path.display()),
        });
    }
    let mut kept_at = path.as_os_str().to_owned();
    kept_at.push(format!(".old-{}", old_key.version()));
    let kept_at = PathBuf::from(kept_at);
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".new-{}", new_key.version()));
    let staged = PathBuf::from(staged);
    if kept_at.exists() {
        return Err(KeyError::Exists {
            path: kept_at.display().to_string(),
        });
    }
    // Stage the new key first, so a failure leaves the old key in place.
    write_new_key_file(&staged, new_key)?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|error| KeyError::Write {
            path: to.display().to_string(),
            error,
        })
    };
    if let Err(error) = rename(path, &kept_at) {
        let _ = std::fs::remove_file(&staged);
        return Err(error);
    }
    rename(&staged, path)?;
    Ok(Rotation {
        new_key_id: new_key.key_id().to_owned(),
        kept_at,
        old: OldVerifyKey {
            key_id: old_key.key_id().to_owned(),
            public_key: old_key.public_key_base64(),
            expired_ts: now_ms,
        },
    })
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

    #[test]
    fn fresh_versions_have_synapse_shape_and_differ() {
        let versions: std::collections::HashSet<String> =
            (0..200).map(|_| random_key_version()).collect();
        assert_eq!(versions.len(), 200, "200 fresh versions are distinct");
        for version in &versions {
            let suffix = version.strip_prefix("a_").expect("starts with a_");
            assert_eq!(suffix.len(), KEY_VERSION_RANDOM_LEN, "{version}");
            assert!(
                suffix.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{version}"
            );
            assert!(is_valid_key_version(version));
        }
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "courier-keys-{name}-{}-{}",
            std::process::id(),
            random_key_version()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn rotation_keeps_the_old_key_and_lists_its_public_part() {
        let dir = scratch_dir("rotate");
        let path = dir.join("signing.key");
        let old = ServerSigningKey::from_seed("a_1", [3; 32]);
        write_new_key_file(&path, &old).expect("first key");
        assert!(matches!(
            write_new_key_file(&path, &old),
            Err(KeyError::Exists { .. })
        ));
        let new = ServerSigningKey::from_seed("a_Zx9Q2w", [4; 32]);
        let rotation = rotate_key_file(&path, &new, 1_700_000_000_000).expect("rotates");
        assert_eq!(rotation.new_key_id, "ed25519:a_Zx9Q2w");
        assert_eq!(
            rotation.old,
            OldVerifyKey {
                key_id: "ed25519:a_1".into(),
                public_key: old.public_key_base64(),
                expired_ts: 1_700_000_000_000,
            }
        );
        assert_eq!(rotation.kept_at, dir.join("signing.key.old-a_1"));
        let kept = ServerSigningKey::load(&rotation.kept_at).expect("old key kept");
        assert_eq!(kept.public_key_base64(), old.public_key_base64());
        let current = ServerSigningKey::load(&path).expect("new key in place");
        assert_eq!(current.public_key_base64(), new.public_key_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key file is private");
        }
        // The entry parses as the configuration's old_verify_keys.
        let entry: toml::Table = rotation.config_entry().parse().expect("TOML");
        let listed = &entry["old_verify_keys"][0];
        assert_eq!(listed["key_id"].as_str(), Some("ed25519:a_1"));
        assert_eq!(
            listed["key"].as_str(),
            Some(old.public_key_base64().as_str())
        );
        // Rotating to a key with the current id is refused; nothing moves.
        let same_id = ServerSigningKey::from_seed("a_Zx9Q2w", [5; 32]);
        assert!(matches!(
            rotate_key_file(&path, &same_id, 0),
            Err(KeyError::ReusedKeyId { .. })
        ));
        let still = ServerSigningKey::load(&path).expect("unchanged");
        assert_eq!(still.public_key_base64(), new.public_key_base64());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_id_known_with_other_material_is_refused() {
        let key = ServerSigningKey::from_seed("a_1", [1; 32]);
        let other = ServerSigningKey::from_seed("a_1", [2; 32]);
        let old = |k: &ServerSigningKey| OldVerifyKey {
            key_id: k.key_id().to_owned(),
            public_key: k.public_key_base64(),
            expired_ts: 0,
        };
        assert!(check_key_id_unique(&key, &[], &[]).is_ok());
        // The same material under the same id is the same key.
        assert!(check_key_id_unique(&key, &[old(&key)], &[]).is_ok());
        let error = check_key_id_unique(&key, &[old(&other)], &[]).expect_err("reused id");
        assert!(error.to_string().contains("old_verify_keys"), "{error}");
        let stored = vec![("ed25519:a_1".to_owned(), other.public_key_base64())];
        let error = check_key_id_unique(&key, &[], &stored).expect_err("reused id");
        assert!(error.to_string().contains("key cache"), "{error}");
        let unrelated = vec![("ed25519:a_2".to_owned(), other.public_key_base64())];
        assert!(check_key_id_unique(&key, &[], &unrelated).is_ok());
    }

    #[test]
    fn a_missing_key_file_names_its_os_error_once() {
        let error =
            ServerSigningKey::load(Path::new("/nonexistent/courier.key")).expect_err("missing");
        let chain = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    }
}
