//! Device-list updates (issue 16, DESIGN §7): the inbound
//! `m.device_list_update` / `m.signing_key_update` EDUs of other servers
//! (validated, origin-checked, signature-checked, gap-detected, then
//! applied to the persisted cache of tracked remote users), which servers
//! get a local user's updates (interest), and which users each local user
//! tracks. The outbound EDUs themselves are queued by the store in the
//! change's own transaction (`store::device_lists`); the resyncs a gap
//! causes run in `resync.rs`.
//!
//! BASE CONTRACT NOTE: the bodies here are placeholders for the lanes to
//! fill in; the signatures are the contract the edges call.

use serde_json::Value;

use crate::identifiers::{ServerName, UserId};
use crate::store::StoreError;
use crate::store::device_lists::Interest;

use super::E2ee;

/// One device-list EDU of an inbound transaction, by type, with its
/// `content` as received.
#[derive(Debug, Clone, PartialEq)]
pub enum InboundDeviceListEdu {
    /// `m.device_list_update`.
    DeviceListUpdate(Value),
    /// `m.signing_key_update` (or `org.matrix.signing_key_update`).
    SigningKeyUpdate(Value),
}

/// What became of a transaction's device-list EDUs (for logs; each is also
/// counted in metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceListEduReport {
    /// Applied to the cache.
    pub applied: u32,
    /// About a user nobody here tracks: ignored.
    pub untracked: u32,
    /// Not newer than the cache (a replay, or a stream going backwards).
    pub not_newer: u32,
    /// Malformed, spoofed (user not of the origin), or with keys that do
    /// not verify: dropped.
    pub dropped: u32,
    /// Users found with a gap (a resync was scheduled).
    pub gaps: u32,
}

impl E2ee {
    /// Handles the device-list EDUs of one transaction from `origin`. Called
    /// before the transaction's own store write, so that a crash before the
    /// `200` makes the peer's retry bring them again (and the replays are
    /// ignored as not newer). Never fails the transaction: a bad EDU is
    /// dropped and counted, and its neighbours are unaffected.
    pub async fn receive_device_list_edus(
        &self,
        origin: &ServerName,
        edus: Vec<InboundDeviceListEdu>,
    ) -> DeviceListEduReport {
        let _ = (origin, edus);
        DeviceListEduReport::default()
    }

    /// `origin` asked for these local users' keys or devices over
    /// federation: it gets their device-list updates for the configured
    /// window (`[e2ee] interest_window`). Best effort (a store error is
    /// logged).
    pub async fn record_remote_interest(&self, origin: &ServerName, users: &[String]) {
        let _ = (origin, users);
    }

    /// The homeserver names (`add`) or withdraws (`remove`) servers that
    /// share rooms with a local user. Returns the user's interests after
    /// the change.
    pub async fn set_device_list_servers(
        &self,
        user_id: &UserId,
        add: Vec<ServerName>,
        remove: Vec<ServerName>,
    ) -> Result<Vec<Interest>, StoreError> {
        let _ = (user_id, add, remove);
        Ok(Vec::new())
    }

    /// The homeserver says `tracker` (a local user) tracks, or no longer
    /// tracks, these users. Returns the users tracked after the change.
    pub async fn set_tracking(
        &self,
        tracker: &UserId,
        track: Vec<UserId>,
        untrack: Vec<UserId>,
    ) -> Result<Vec<String>, StoreError> {
        let _ = (tracker, track, untrack);
        Ok(Vec::new())
    }
}
