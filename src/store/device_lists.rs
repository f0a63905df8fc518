//! The device-list part of the store contract (DESIGN §7, issue 16):
//! which servers are interested in a local user's device list (and so get
//! its `m.device_list_update` / `m.signing_key_update` EDUs through the
//! outbox), which users each local user tracks (and so sees in
//! `device_lists.changed` / `left`), and the persisted cache of tracked
//! remote users' device lists with its gap detection and stale flag.
//!
//! `DeviceListStore` is a supertrait of `Store`, like `KeyStore`. Every
//! method is one atomic transaction, durable when its future resolves.
//!
//! Outbound EDUs: every `KeyStore` write that appends to the change log
//! (keys uploaded with changed device keys, a display name, a deletion, new
//! cross-signing keys, a new signature) also queues, in the same
//! transaction, one EDU per interested destination (see
//! `device_list_destinations`) into the ordinary outbox: an
//! `m.device_list_update` for a device (its current state, built with
//! `device_list_update_edu`) or an `m.signing_key_update` for the user's
//! cross-signing keys (`signing_key_update_edu`). A queued row that a later
//! change of the same (destination, user, device) supersedes, and that is
//! not in the destination's in-flight transaction, is deleted in that same
//! transaction (coalescing): a destination away for a week gets one update
//! per device. The stored EDU has no `prev_id`; `Store::peek_outbox` fills
//! `OutboxEdu::device_list` with the `prev_id` that keeps the chain right
//! (the last `stream_id` the destination acknowledged for the user, then
//! the previous row of the same peek), and the sender finishes the EDU
//! with `finish_outbound_edu` before recording the transaction, so a retry
//! resends the same bytes. `Store::ack_txn` records, per (destination,
//! user), the highest acknowledged `stream_id`.

use serde_json::{Map, Value};

use super::keys::{CrossSigningKey, CrossSigningKind, DeviceRecord, StoredSignature};
use super::{DeviceKey, StoreFuture, TimestampMs};

/// The EDU types the device-list outbox rows carry.
pub const DEVICE_LIST_UPDATE: &str = "m.device_list_update";
pub const SIGNING_KEY_UPDATE: &str = "m.signing_key_update";

/// A server's interest in a local user's device list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInterest {
    pub user_id: String,
    pub destination: String,
    /// `None`: until removed (named by the homeserver over the RPC).
    /// `Some(t)`: until `t` (the server queried the user's keys; the caller
    /// adds the configured window to now). An upsert keeps the later expiry,
    /// and `None` beats any time.
    pub expires_ts: Option<TimestampMs>,
}

/// One stored interest, as the RPC lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    pub destination: String,
    pub expires_ts: Option<TimestampMs>,
}

/// The device-list meta of a peeked outbox row (`OutboxEdu::device_list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundDeviceList {
    /// The local user the EDU is about.
    pub user_id: String,
    /// The row's `stream_id` (`None` for an `m.signing_key_update`).
    pub stream_id: Option<i64>,
    /// The `prev_id` to send: the previous `stream_id` of this user sent to
    /// this destination (acknowledged, or earlier in the same peek), `None`
    /// for the first. Always `None` for an `m.signing_key_update`.
    pub prev_id: Option<i64>,
}

/// A user a local user starts to track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackTarget {
    pub user_id: String,
    /// True for a user of another server: the store keeps a cached device
    /// list for it, created stale (needing a resync) if there is none.
    pub remote: bool,
}

/// Why a tracking row exists (a homeserver-named one is not removed by a
/// query's expiry, and vice versa).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackSource {
    /// The local user queried the target's keys.
    Query,
    /// The homeserver said so over the RPC.
    Homeserver,
}

/// A remote device as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDevice {
    pub device_id: String,
    /// The device keys object as received (signatures checked), if any.
    pub keys_json: Option<String>,
    pub display_name: Option<String>,
}

/// The cached device list of one tracked remote user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDeviceList {
    pub user_id: String,
    /// The last `stream_id` applied (the extremity); `None` until the first
    /// resync.
    pub stream_id: Option<i64>,
    /// A resync is needed (a gap, or never fetched). A stale list is not
    /// used to answer queries.
    pub stale: bool,
    pub fetched_ts: Option<TimestampMs>,
    /// The last time the user's server sent an update about them
    /// (`apply_remote_device_updates` or `put_remote_cross_signing` on a
    /// tracked user, whatever the outcome): that server pushes this user's
    /// changes to us, so the cache follows them. `None`: it never did (a
    /// server that shares no room with us, like Synapse, only answers
    /// queries), and the cache is only as new as its last resync.
    pub pushed_ts: Option<TimestampMs>,
    /// Sorted by device ID.
    pub devices: Vec<RemoteDevice>,
    pub master_key_json: Option<String>,
    pub self_signing_key_json: Option<String>,
}

/// One validated inbound `m.device_list_update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDeviceUpdate {
    pub stream_id: i64,
    pub prev_ids: Vec<i64>,
    pub device_id: String,
    pub deleted: bool,
    pub keys_json: Option<String>,
    pub display_name: Option<String>,
}

/// What `apply_remote_device_updates` did with one user's updates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteUpdateReport {
    /// False: no local user tracks this user; nothing was stored.
    pub tracked: bool,
    /// Updates applied to the cache (each logged as a change).
    pub applied: u32,
    /// Updates whose `stream_id` is not above the extremity (a replay, or a
    /// stream going backwards): ignored.
    pub not_newer: u32,
    /// The list is stale now (a gap was found, or it already was): the
    /// caller schedules a resync. The updates from the gap on were not
    /// applied; the highest `stream_id` seen is remembered, and a snapshot
    /// older than it leaves the list stale.
    pub needs_resync: bool,
}

/// A validated `/user/devices` answer for a tracked remote user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSnapshot {
    pub user_id: String,
    pub stream_id: i64,
    pub devices: Vec<RemoteDevice>,
    pub master_key_json: Option<String>,
    pub self_signing_key_json: Option<String>,
}

/// What `replace_remote_device_list` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Nobody tracks the user (any more): nothing stored.
    Untracked,
    /// Stored; `changed` when it differs from what was cached before (then
    /// a change was logged), `still_stale` when an update newer than the
    /// snapshot was seen meanwhile (another resync is needed).
    Stored { changed: bool, still_stale: bool },
}

/// The device-list part of the durable store.
pub trait DeviceListStore: Send + Sync {
    // --- interest (outbound) ------------------------------------------------

    /// Upserts interests (see `NewInterest::expires_ts`).
    fn add_device_list_interest(
        &self,
        interests: Vec<NewInterest>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, ()>;

    /// Removes the interests of these destinations in a user (whatever
    /// their source). Returns how many existed.
    fn remove_device_list_interest<'a>(
        &'a self,
        user_id: &'a str,
        destinations: Vec<String>,
    ) -> StoreFuture<'a, u64>;

    /// A user's interests, sorted by destination (expired ones included).
    fn device_list_interest<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<Interest>>;

    /// The destinations that get a user's device-list EDUs now: interests
    /// with no expiry or one after `now_ms`, sorted. The change methods use
    /// the same rule inside their transaction; callers use this to wake the
    /// sender after a change.
    fn device_list_destinations<'a>(
        &'a self,
        user_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>>;

    // --- tracking (local users → users whose lists they follow) -----------

    /// Starts (or refreshes) `tracker`'s tracking of `targets`. Returns the
    /// remote targets whose cached list is stale after the call (newly
    /// created ones, and ones still waiting for a resync), for the caller
    /// to schedule.
    fn track_users<'a>(
        &'a self,
        tracker: &'a str,
        targets: Vec<TrackTarget>,
        source: TrackSource,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>>;

    /// Stops `tracker`'s tracking of `users`; logs one `left` entry for the
    /// tracker per user that was tracked (so `left_users` reports it), and
    /// drops the cached list of a remote user nobody tracks any more.
    /// Returns the users that were tracked.
    fn untrack_users<'a>(
        &'a self,
        tracker: &'a str,
        users: Vec<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>>;

    /// The users `tracker` tracks, sorted.
    fn tracked_users<'a>(&'a self, tracker: &'a str) -> StoreFuture<'a, Vec<String>>;

    /// The registered devices of every local user who tracks any of
    /// `users` (to wake their long-polls after a change), sorted, unique.
    fn tracker_devices(&self, users: Vec<String>) -> StoreFuture<'_, Vec<DeviceKey>>;

    /// The users `tracker` stopped tracking with a `left` entry in
    /// `(after, up_to]` of the change log's positions, sorted.
    fn left_users<'a>(
        &'a self,
        tracker: &'a str,
        after: i64,
        up_to: i64,
    ) -> StoreFuture<'a, Vec<String>>;

    // --- the remote cache ---------------------------------------------------

    /// The cached lists of those of `users` that have one, in the order
    /// asked.
    fn remote_device_lists(&self, users: Vec<String>) -> StoreFuture<'_, Vec<RemoteDeviceList>>;

    /// Applies a remote user's validated updates in the order given (the
    /// caller sorts them by `stream_id`), with gap detection in the same
    /// transaction: an update is applied when its `stream_id` is above the
    /// extremity and every `prev_id` is at most the extremity (or an update
    /// applied earlier in this call); an empty `prev_id` with a known
    /// extremity, or an unknown `prev_id`, is a gap, which marks the list
    /// stale. A stale list applies nothing (its resync will bring it). Each
    /// applied update (`deleted` removes the device) sets the extremity
    /// and logs one change for the remote user.
    fn apply_remote_device_updates<'a>(
        &'a self,
        user_id: &'a str,
        updates: Vec<RemoteDeviceUpdate>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, RemoteUpdateReport>;

    /// Stores a tracked remote user's cross-signing keys from an
    /// `m.signing_key_update` (`None` keeps the cached one). Returns true
    /// when the user is tracked and something changed (then a change was
    /// logged).
    fn put_remote_cross_signing<'a>(
        &'a self,
        user_id: &'a str,
        master_key_json: Option<String>,
        self_signing_key_json: Option<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, bool>;

    /// Replaces a tracked remote user's cached list with a resync's
    /// snapshot: devices, cross-signing keys and the extremity (the
    /// snapshot's `stream_id`); clears the stale flag unless an update newer
    /// than the snapshot was seen.
    fn replace_remote_device_list(
        &self,
        snapshot: RemoteSnapshot,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, SnapshotOutcome>;

    /// Marks cached lists stale (a defensive resync). Returns the users
    /// that have a cached list.
    fn mark_remote_stale(
        &self,
        users: Vec<String>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, Vec<String>>;

    /// Up to `limit` stale remote users, longest stale first (the resync
    /// scheduler reads them at start-up and on its sweep).
    fn stale_remote_users(&self, limit: u32) -> StoreFuture<'_, Vec<String>>;
}

// --- the outbound EDUs (pure; both backends and the sender use them) -------

/// The stored `m.device_list_update` EDU of a local device (without
/// `prev_id`), as canonical JSON: `deleted: true` when `device` is `None`
/// (the device no longer exists), else its display name (if any) and its
/// device keys (if any) with the stored signatures merged in.
pub fn device_list_update_edu(
    user_id: &str,
    device_id: &str,
    stream_id: i64,
    device: Option<&DeviceRecord>,
) -> String {
    let mut content = Map::new();
    content.insert("user_id".into(), Value::String(user_id.to_owned()));
    content.insert("device_id".into(), Value::String(device_id.to_owned()));
    content.insert("stream_id".into(), Value::from(stream_id));
    match device {
        None => {
            content.insert("deleted".into(), Value::Bool(true));
        }
        Some(device) => {
            if let Some(name) = &device.display_name {
                content.insert("device_display_name".into(), Value::String(name.clone()));
            }
            if let Some(keys) = device.keys_json.as_deref().and_then(parse_object) {
                let mut keys = keys;
                merge_signatures(&mut keys, &device.signatures);
                content.insert("keys".into(), Value::Object(keys));
            }
        }
    }
    edu(DEVICE_LIST_UPDATE, content)
}

/// The stored `m.signing_key_update` EDU of a user (master and
/// self-signing keys with their stored signatures; never the user-signing
/// key), as canonical JSON.
pub fn signing_key_update_edu(user_id: &str, keys: &[CrossSigningKey]) -> String {
    let mut content = Map::new();
    content.insert("user_id".into(), Value::String(user_id.to_owned()));
    for key in keys {
        let field = match key.kind {
            CrossSigningKind::Master => "master_key",
            CrossSigningKind::SelfSigning => "self_signing_key",
            CrossSigningKind::UserSigning => continue,
        };
        if let Some(mut object) = parse_object(&key.key_json) {
            merge_signatures(&mut object, &key.signatures);
            content.insert(field.into(), Value::Object(object));
        }
    }
    edu(SIGNING_KEY_UPDATE, content)
}

/// The EDU as sent: `prev_id` set from the peeked meta (`[n]`, or left out
/// for the first of a user), and `device_display_name` removed unless names
/// may cross federation. Canonical JSON. A stored EDU that does not parse
/// (never written by this build) is returned unchanged.
pub fn finish_outbound_edu(
    edu_json: &str,
    meta: &OutboundDeviceList,
    names_over_federation: bool,
) -> String {
    let Some(mut edu) = parse_object(edu_json) else {
        return edu_json.to_owned();
    };
    if let Some(Value::Object(content)) = edu.get_mut("content") {
        if let Some(prev) = meta.prev_id {
            content.insert("prev_id".into(), Value::Array(vec![Value::from(prev)]));
        }
        if !names_over_federation {
            content.remove("device_display_name");
        }
    }
    canonical(&Value::Object(edu))
}

/// Adds each of `signatures` to `object.signatures[signer][key_id]`.
pub fn merge_signatures<'a>(
    object: &mut Map<String, Value>,
    signatures: impl IntoIterator<Item = &'a StoredSignature>,
) {
    for signature in signatures {
        let all = object
            .entry("signatures")
            .or_insert_with(|| Value::Object(Map::new()));
        if !all.is_object() {
            *all = Value::Object(Map::new());
        }
        if let Value::Object(all) = all {
            let by_signer = all
                .entry(signature.signer_user_id.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(by_signer) = by_signer {
                by_signer.insert(
                    signature.signer_key_id.clone(),
                    Value::String(signature.signature.clone()),
                );
            }
        }
    }
}

fn parse_object(json: &str) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    }
}

fn edu(edu_type: &str, content: Map<String, Value>) -> String {
    let mut edu = Map::new();
    edu.insert("content".into(), Value::Object(content));
    edu.insert("edu_type".into(), Value::String(edu_type.to_owned()));
    canonical(&Value::Object(edu))
}

fn canonical(value: &Value) -> String {
    crate::canonical_json::to_canonical_string(value).unwrap_or_else(|_| value.to_string())
}
