//! Device-list updates (issue 16, DESIGN §7): the inbound
//! `m.device_list_update` / `m.signing_key_update` EDUs of other servers
//! (validated, origin-checked, signature-checked, gap-detected, then
//! applied to the persisted cache of tracked remote users), which servers
//! get a local user's updates (interest), and which users each local user
//! tracks. The outbound EDUs themselves are queued by the store in the
//! change's own transaction (`store::device_lists`); the resyncs a gap
//! causes run in `resync.rs`; the strict parse of the EDUs is
//! `device_list_edus.rs`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::identifiers::{ServerName, UserId};
use crate::store::StoreError;
use crate::store::device_lists::{
    Interest, NewInterest, RemoteDeviceUpdate, TrackSource, TrackTarget,
};
use crate::store::{DeviceKey, TimestampMs};

use super::E2ee;
use super::device_list_edus::{
    Dropped, ParsedSigningKeyUpdate, count_inbound, key_text, parse_device_update,
    parse_signing_key_update, signed_by_master,
};
use super::objects::stored_object;

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
        let mut report = DeviceListEduReport::default();
        let mut updates: BTreeMap<String, Vec<RemoteDeviceUpdate>> = BTreeMap::new();
        let mut signing = Vec::new();
        for edu in edus {
            match edu {
                InboundDeviceListEdu::DeviceListUpdate(content) => {
                    match parse_device_update(&content, origin, &self.server_name) {
                        Ok(parsed) => updates
                            .entry(parsed.user_id)
                            .or_default()
                            .push(parsed.update),
                        Err(dropped) => self.count_dropped(origin, &dropped, &mut report),
                    }
                }
                InboundDeviceListEdu::SigningKeyUpdate(content) => {
                    match parse_signing_key_update(&content, origin, &self.server_name) {
                        Ok(parsed) => signing.push(parsed),
                        Err(dropped) => self.count_dropped(origin, &dropped, &mut report),
                    }
                }
            }
        }
        let now = crate::clock::now_ms();
        let mut changed = Vec::new();
        let mut stale = Vec::new();
        for (user_id, mut batch) in updates {
            batch.sort_by_key(|update| update.stream_id);
            let count = batch.len() as u32;
            match self
                .store
                .apply_remote_device_updates(&user_id, batch, now)
                .await
            {
                Ok(result) if !result.tracked => {
                    count_inbound("untracked", count);
                    report.untracked += count;
                }
                Ok(result) => {
                    count_inbound("applied", result.applied);
                    count_inbound("not_newer", result.not_newer);
                    report.applied += result.applied;
                    report.not_newer += result.not_newer;
                    if result.applied > 0 {
                        changed.push(user_id.clone());
                    }
                    if result.needs_resync {
                        metrics::counter!("courier_device_list_gaps_total").increment(1);
                        tracing::info!(%origin, user_id, "device-list gap; resync scheduled");
                        report.gaps += 1;
                        stale.push(user_id);
                    }
                }
                Err(error) => {
                    tracing::warn!(%origin, user_id, %error, "storing device-list updates");
                    report.dropped += count;
                }
            }
        }
        for update in signing {
            let user_id = update.user_id.clone();
            if self
                .receive_signing_key_update(origin, update, now, &mut report)
                .await
            {
                changed.push(user_id);
            }
        }
        self.resync.schedule(stale);
        self.wake_trackers(changed).await;
        report
    }

    fn count_dropped(
        &self,
        origin: &ServerName,
        dropped: &Dropped,
        report: &mut DeviceListEduReport,
    ) {
        count_inbound(dropped.outcome, 1);
        report.dropped += 1;
        tracing::info!(
            %origin,
            user_id = dropped.user_id.as_deref().unwrap_or("?"),
            outcome = dropped.outcome,
            reason = %dropped.reason,
            "dropping a device-list EDU"
        );
    }

    /// Stores one parsed `m.signing_key_update` for a tracked user; true
    /// when the cache changed.
    async fn receive_signing_key_update(
        &self,
        origin: &ServerName,
        mut update: ParsedSigningKeyUpdate,
        now: TimestampMs,
        report: &mut DeviceListEduReport,
    ) -> bool {
        let user_id = update.user_id.clone();
        let cached = match self.store.remote_device_lists(vec![user_id.clone()]).await {
            Ok(lists) => lists.into_iter().find(|list| list.user_id == user_id),
            Err(error) => {
                tracing::warn!(%origin, user_id, %error, "reading the cached device list");
                report.dropped += 1;
                return false;
            }
        };
        let cached_master = cached
            .as_ref()
            .and_then(|list| list.master_key_json.as_deref())
            .and_then(stored_object);
        if let Some(self_signing) = update.self_signing_key.take() {
            match signed_by_master(&self_signing, update.master_key.as_ref(), cached_master) {
                true => update.self_signing_key = Some(self_signing),
                false => update.refused.push(Dropped {
                    outcome: "bad_signature",
                    user_id: Some(user_id.clone()),
                    reason: "self_signing_key is not signed by the master key".to_owned(),
                }),
            }
        }
        let refused = std::mem::take(&mut update.refused);
        for dropped in &refused {
            self.count_dropped(origin, dropped, report);
        }
        let master = update.master_key.as_ref().and_then(key_text);
        let self_signing = update.self_signing_key.as_ref().and_then(key_text);
        if master.is_none() && self_signing.is_none() {
            return false;
        }
        if cached.is_none() {
            count_inbound("untracked", 1);
            report.untracked += 1;
            return false;
        }
        match self
            .store
            .put_remote_cross_signing(&user_id, master, self_signing, now)
            .await
        {
            Ok(true) => {
                count_inbound("applied", 1);
                report.applied += 1;
                true
            }
            Ok(false) => {
                count_inbound("not_newer", 1);
                report.not_newer += 1;
                false
            }
            Err(error) => {
                tracing::warn!(%origin, user_id, %error, "storing remote cross-signing keys");
                report.dropped += 1;
                false
            }
        }
    }

    /// `origin` asked for these local users' keys or devices over
    /// federation: it gets their device-list updates for the configured
    /// window (`[e2ee] interest_window`). Best effort (a store error is
    /// logged).
    pub async fn record_remote_interest(&self, origin: &ServerName, users: &[String]) {
        let now = crate::clock::now_ms();
        let window = i64::try_from(self.config.interest_window.as_millis()).unwrap_or(i64::MAX);
        let expires = now.saturating_add(window);
        let interests: Vec<NewInterest> = users
            .iter()
            .filter(|user| self.is_local(user))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|user| NewInterest {
                user_id: user.clone(),
                destination: origin.as_str().to_owned(),
                expires_ts: Some(expires),
            })
            .collect();
        if interests.is_empty() {
            return;
        }
        if let Err(error) = self.store.add_device_list_interest(interests, now).await {
            tracing::warn!(%origin, %error, "recording a server's device-list interest");
        }
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
        let user = user_id.as_str();
        let now = crate::clock::now_ms();
        let remove: BTreeSet<String> = remove.iter().map(|s| s.as_str().to_owned()).collect();
        if !remove.is_empty() {
            self.store
                .remove_device_list_interest(user, remove.iter().cloned().collect())
                .await?;
        }
        let add: Vec<NewInterest> = add
            .iter()
            .map(|s| s.as_str().to_owned())
            .filter(|s| !remove.contains(s) && s != self.server_name.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|destination| NewInterest {
                user_id: user.to_owned(),
                destination,
                expires_ts: None,
            })
            .collect();
        if !add.is_empty() {
            self.store.add_device_list_interest(add, now).await?;
        }
        self.store.device_list_interest(user).await
    }

    /// The homeserver says `tracker` (a local user) tracks, or no longer
    /// tracks, these users. Returns the users tracked after the change.
    /// Newly tracked remote users without a fresh cached list get a resync;
    /// untracked ones are listed in the tracker's next `device_lists.left`.
    pub async fn set_tracking(
        &self,
        tracker: &UserId,
        track: Vec<UserId>,
        untrack: Vec<UserId>,
    ) -> Result<Vec<String>, StoreError> {
        let tracker_id = tracker.as_str();
        let now = crate::clock::now_ms();
        let untrack: BTreeSet<String> = untrack.iter().map(|u| u.as_str().to_owned()).collect();
        let targets: Vec<TrackTarget> = track
            .iter()
            .map(|u| u.as_str().to_owned())
            .filter(|u| !untrack.contains(u) && u != tracker_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|user_id| TrackTarget {
                remote: !self.is_local(&user_id),
                user_id,
            })
            .collect();
        if !targets.is_empty() {
            let stale = self
                .store
                .track_users(tracker_id, targets, TrackSource::Homeserver, now)
                .await?;
            self.resync.schedule(stale);
        }
        if !untrack.is_empty() {
            let left = self
                .store
                .untrack_users(tracker_id, untrack.into_iter().collect(), now)
                .await?;
            if !left.is_empty() {
                self.wake_user(tracker_id).await;
            }
        }
        self.store.tracked_users(tracker_id).await
    }

    /// Whether `user_id` is of this server.
    pub(crate) fn is_local(&self, user_id: &str) -> bool {
        UserId::parse(user_id).is_ok_and(|u| u.server_name() == self.server_name.as_str())
    }

    /// Wakes the long-polls of one local user's devices.
    pub(crate) async fn wake_user(&self, user_id: &str) {
        match self.store.list_devices(user_id).await {
            Ok(devices) => {
                let devices: Vec<DeviceKey> = devices
                    .into_iter()
                    .map(|device_id| DeviceKey {
                        user_id: user_id.to_owned(),
                        device_id,
                    })
                    .collect();
                self.notifier.wake(&devices);
            }
            Err(error) => tracing::warn!(user_id, %error, "listing devices to wake"),
        }
    }
}
