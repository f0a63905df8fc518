//! The E2EE device plane's part of the store contract (DESIGN §7): device
//! keys, one-time and fallback keys, cross-signing keys and signatures,
//! device display names, and the log of local device-list changes that
//! `/sync` (`device_lists.changed`) and federation (`stream_id`) read.
//!
//! `KeyStore` is a supertrait of `Store`, so `Arc<dyn Store>` callers reach
//! these methods; it lives in its own file because it is its own domain.
//! As with the rest of the store, every method is one atomic transaction and
//! returns only once it is durable. Key material is stored as the JSON text
//! received (the signatures cover it) and returned unchanged; the store never
//! parses or rewrites it. Validation (user and device IDs, signatures, sizes)
//! is the caller's (`e2ee`); the store only keeps the rules that need a
//! transaction: identity keys never change, a one-time key is handed out at
//! most once, and every change to a device appends to the change log in the
//! same transaction.

use std::collections::BTreeMap;

use super::{StoreFuture, TimestampMs};

/// One key upload of one local device (`POST /keys/upload`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysUpload {
    pub user_id: String,
    pub device_id: String,
    /// The signed `device_keys` object as received (serialized JSON), if the
    /// upload carries one.
    pub device_keys: Option<UploadedDeviceKeys>,
    /// In the order the client listed them (the order becomes upload order,
    /// which claims follow).
    pub one_time_keys: Vec<NewKey>,
    /// At most one per algorithm.
    pub fallback_keys: Vec<NewKey>,
    pub now_ms: TimestampMs,
}

/// A device's `device_keys` object and the part of it that may never change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedDeviceKeys {
    /// The whole object as serialized JSON.
    pub json: String,
    /// Canonical JSON of its `keys` map: the device's identity. Once a
    /// device has keys, an upload whose identity differs is refused.
    pub identity: String,
}

/// A one-time or fallback key: `"<algorithm>:<key_id>"` split, and its value
/// (a signed key object, or a bare string for unsigned algorithms) as
/// serialized JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub algorithm: String,
    pub key_id: String,
    pub key_json: String,
}

/// What a key upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    Stored {
        /// Unclaimed one-time keys per algorithm after the upload.
        one_time_key_counts: BTreeMap<String, u64>,
        /// True when the device keys were new or changed (so the upload
        /// appended to the device-list change log).
        device_list_changed: bool,
    },
    /// The device already has device keys with another identity: nothing
    /// was written.
    IdentityChanged,
    /// A one-time key with this algorithm and ID is stored (unclaimed) with
    /// another value: nothing was written. (A key that was claimed before is
    /// remembered for `Retention::claimed_key_ms`; uploading it again is
    /// accepted and ignored, so it is never handed out twice.)
    OneTimeKeyConflict { algorithm: String, key_id: String },
    /// The device is not registered: nothing was written.
    UnknownDevice,
}

/// What `/sync` reports about a device's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Unclaimed one-time keys per algorithm (algorithms with none left are
    /// absent; the caller adds `signed_curve25519: 0`).
    pub one_time: BTreeMap<String, u64>,
    /// Algorithms whose fallback key has not been handed out, sorted.
    pub unused_fallback: Vec<String>,
}

/// One wanted key of a claim: a device and an algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimWanted {
    pub user_id: String,
    pub device_id: String,
    pub algorithm: String,
}

/// One key handed out by a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    pub user_id: String,
    pub device_id: String,
    pub algorithm: String,
    pub key_id: String,
    pub key_json: String,
    /// True when no one-time key was left and this is the fallback key (it
    /// stays stored, now marked used).
    pub fallback: bool,
}

/// Which devices of a user a query wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceQuery {
    pub user_id: String,
    /// Empty: every device of the user.
    pub device_ids: Vec<String>,
}

/// A signature uploaded through `POST /keys/signatures/upload`, kept apart
/// from the signed object (whose stored JSON never changes) and merged into
/// its `signatures` on the way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSignature {
    /// The user whose key is signed.
    pub target_user_id: String,
    /// The signed key: a device ID, or the unpadded base64 public key of a
    /// cross-signing key.
    pub target_key_id: String,
    /// The user who signed.
    pub signer_user_id: String,
    /// `"ed25519:<device ID or public key>"`.
    pub signer_key_id: String,
    /// Unpadded base64.
    pub signature: String,
}

/// One registered device of a local user, with its E2EE state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub display_name: Option<String>,
    /// The `device_keys` object as uploaded, if any.
    pub keys_json: Option<String>,
    /// Uploaded signatures of this device's keys, in upload order.
    pub signatures: Vec<StoredSignature>,
}

/// Which cross-signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CrossSigningKind {
    Master,
    SelfSigning,
    UserSigning,
}

impl CrossSigningKind {
    /// The name stored and used in `usage`: `master`, `self_signing`,
    /// `user_signing`.
    pub fn as_str(self) -> &'static str {
        match self {
            CrossSigningKind::Master => "master",
            CrossSigningKind::SelfSigning => "self_signing",
            CrossSigningKind::UserSigning => "user_signing",
        }
    }

    pub fn parse(s: &str) -> Option<CrossSigningKind> {
        match s {
            "master" => Some(CrossSigningKind::Master),
            "self_signing" => Some(CrossSigningKind::SelfSigning),
            "user_signing" => Some(CrossSigningKind::UserSigning),
            _ => None,
        }
    }
}

/// A cross-signing key of a local user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossSigningKey {
    pub kind: CrossSigningKind,
    /// The unpadded base64 ed25519 public key (the key's ID).
    pub public_key: String,
    /// The key object as uploaded.
    pub key_json: String,
    /// Uploaded signatures of this key, in upload order.
    pub signatures: Vec<StoredSignature>,
}

/// A cross-signing key to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCrossSigningKey {
    pub kind: CrossSigningKind,
    /// The unpadded base64 ed25519 public key.
    pub public_key: String,
    /// The key object as uploaded (serialized JSON).
    pub key_json: String,
}

/// Everything a key query needs of one local user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDevices {
    pub user_id: String,
    /// The user's device-list `stream_id`: how many changes the log holds
    /// for them (0 before the first change).
    pub stream_id: i64,
    /// The wanted devices that exist, sorted by device ID (unknown wanted
    /// IDs are absent).
    pub devices: Vec<DeviceRecord>,
    /// Sorted by kind.
    pub cross_signing: Vec<CrossSigningKey>,
}

/// What `users_with_changes` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListChanges {
    /// The users among those asked about with a change in (after, up_to],
    /// sorted.
    pub users: Vec<String>,
}

/// The E2EE part of the durable store. Every method that changes a device
/// (new or changed device keys, a display name, a deletion, new
/// cross-signing keys, a new signature) appends one entry per changed device
/// (or one for the user's cross-signing keys) to the device-list change log
/// in the same transaction: a global position (for `/sync` tokens) and a
/// per-user `stream_id`.
pub trait KeyStore: Send + Sync {
    /// Stores device keys, one-time keys and fallback keys of one device,
    /// atomically (all or nothing). One-time keys already stored with the
    /// same value are skipped; a fallback key replaces the algorithm's
    /// previous one and is unused, unless it is the same key again, which
    /// keeps its used flag.
    fn upload_keys(&self, upload: KeysUpload) -> StoreFuture<'_, UploadOutcome>;

    /// The counts `/sync` reports for a device.
    fn key_counts<'a>(&'a self, user_id: &'a str, device_id: &'a str)
    -> StoreFuture<'a, KeyCounts>;

    /// Hands out one key per wanted (device, algorithm), atomically: the
    /// oldest-uploaded unclaimed one-time key, deleted (and remembered as
    /// claimed) in the same transaction, or when none is left the fallback
    /// key, marked used. Wanted entries with neither get nothing. No key is
    /// ever returned by two claims, whatever the concurrency or crashes.
    fn claim_keys(
        &self,
        wanted: Vec<ClaimWanted>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, Vec<ClaimedKey>>;

    /// Devices, keys, signatures and cross-signing keys of local users, in
    /// the order asked. A user with no devices and no cross-signing keys
    /// still gets an entry (empty).
    fn user_devices(&self, queries: Vec<DeviceQuery>) -> StoreFuture<'_, Vec<UserDevices>>;

    /// Sets (or with `None` clears) a device's display name. Returns false
    /// when the device is not registered. A change is logged when the name
    /// differs from the stored one (setting the same name logs nothing).
    fn set_display_name<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        display_name: Option<&'a str>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, bool>;

    /// Deletes devices of one user with their tokens, inbox, device keys,
    /// one-time and fallback keys and the signatures of their keys. Returns
    /// the IDs that existed (each logged as a change).
    fn delete_devices<'a>(
        &'a self,
        user_id: &'a str,
        device_ids: &'a [String],
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>>;

    /// Stores the given cross-signing keys of a user (each replacing the
    /// stored key of its kind) and logs one change for the user's
    /// cross-signing keys, atomically (nothing is logged when every key is
    /// identical to the stored one). The signatures of a replaced public key
    /// are deleted with it. The caller has decided that the replacement is
    /// allowed.
    fn put_cross_signing_keys<'a>(
        &'a self,
        user_id: &'a str,
        keys: Vec<NewCrossSigningKey>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()>;

    /// Stores verified signatures (an identical one again is skipped; a new
    /// one by the same signer key replaces the old in its place) and logs a
    /// change for each device and each user's cross-signing keys that got a
    /// new signature.
    fn put_signatures(
        &self,
        signatures: Vec<StoredSignature>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, ()>;

    /// The position of the newest entry of the device-list change log (0
    /// when it is empty).
    fn device_list_position(&self) -> StoreFuture<'_, i64>;

    /// Which of `users` have a logged change with a position in
    /// `(after, up_to]`.
    fn users_with_changes(
        &self,
        users: Vec<String>,
        after: i64,
        up_to: i64,
    ) -> StoreFuture<'_, DeviceListChanges>;
}
