//! `E2ee::query_keys` (`POST /keys/query` for clients, SPEC-E2EE §2.2, and
//! `POST /user/keys/query` for other servers, §3.2): local users' device
//! keys and cross-signing keys from one `KeyStore::user_devices` call, with
//! their separately stored signatures merged back in and the display name
//! in `unsigned`; remote users' keys asked of their servers, one request per
//! server, concurrently and within the request's timeout. A server that
//! fails lands in `failures` and its users are left out (never `{user: {}}`:
//! clients would take that as "all devices deleted"). Remote answers are
//! passed on as received (their signatures cover them).
//!
//! Device lists (issue 16): a remote user that the asking local user tracks
//! and whose cached list is fresh (not stale, `stream_id` known) is answered
//! from the cache without asking its server; the others are asked live, and
//! afterwards the asker tracks every user it asked about (remote ones get a
//! cached list, created stale and resynced). Servers never track.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::identifiers::{ServerName, UserId};
use crate::store::device_lists::{RemoteDeviceList, TrackSource, TrackTarget};
use crate::store::keys::{CrossSigningKind, DeviceQuery, StoredSignature, UserDevices};

use super::E2ee;
use super::error::KeysRejected;
use super::fanout::ask_servers;
use super::objects::{merge_signatures, stored_object};
use super::remote::{RemoteQuery, RemoteQueryAnswer};

/// The `timeout` a client gets when it names none (SPEC-E2EE §2.2).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Who asks: a local user (through the client API) or another server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker<'a> {
    User(&'a str),
    Server,
}

/// A parsed key query: user → wanted device IDs (empty: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyQuery {
    pub users: BTreeMap<UserId, Vec<String>>,
    /// How long remote servers may take (capped by the configuration).
    pub timeout: Duration,
}

/// The answer, in the shape of the response body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryAnswer {
    pub device_keys: Map<String, Value>,
    pub master_keys: Map<String, Value>,
    pub self_signing_keys: Map<String, Value>,
    pub user_signing_keys: Map<String, Value>,
    pub failures: Map<String, Value>,
}

impl QueryAnswer {
    /// The client API's body: every map, `failures` included.
    pub fn into_client_json(self) -> Value {
        json!({
            "device_keys": self.device_keys,
            "master_keys": self.master_keys,
            "self_signing_keys": self.self_signing_keys,
            "user_signing_keys": self.user_signing_keys,
            "failures": self.failures,
        })
    }

    /// The federation body: no `failures`, no `user_signing_keys`.
    pub fn into_federation_json(self) -> Value {
        json!({
            "device_keys": self.device_keys,
            "master_keys": self.master_keys,
            "self_signing_keys": self.self_signing_keys,
        })
    }
}

/// A client's `timeout` in milliseconds from the body (or, as Synapse reads
/// it, the query string), capped at `cap`.
pub fn request_timeout(
    body: &Map<String, Value>,
    query_param: Option<u64>,
    cap: Duration,
) -> Result<Duration, KeysRejected> {
    let millis = match body.get("timeout") {
        None | Some(Value::Null) => query_param,
        Some(value) => Some(value.as_u64().ok_or_else(|| {
            KeysRejected::BadJson("timeout must be a non-negative integer".into())
        })?),
    };
    Ok(millis
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TIMEOUT)
        .min(cap))
}

/// Whether a stored signature may be shown to `asker` on a key of `owner`:
/// the owner's own signatures always, the asker's own to that asker.
fn visible(signature: &StoredSignature, owner: &str, asker: Asker<'_>) -> bool {
    signature.signer_user_id == owner || asker == Asker::User(&signature.signer_user_id)
}

impl E2ee {
    /// Parses `{"device_keys": {user: [device…]}}` and checks the size
    /// limit (a user with an empty list counts as one device here, and as
    /// its devices once they are known).
    pub fn parse_key_query(
        &self,
        body: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<KeyQuery, KeysRejected> {
        let wanted = super::objects::required_map(body, "device_keys")?;
        let mut users = BTreeMap::new();
        let mut named = 0usize;
        for (user, devices) in wanted {
            let user_id = UserId::parse(user)
                .map_err(|_| KeysRejected::InvalidParam(format!("{user} is not a user ID")))?;
            let Value::Array(devices) = devices else {
                return Err(KeysRejected::BadJson(format!(
                    "device_keys.{user} must be a list of device IDs"
                )));
            };
            let mut device_ids = Vec::with_capacity(devices.len());
            for device in devices {
                let device = device.as_str().ok_or_else(|| {
                    KeysRejected::BadJson(format!("device_keys.{user} must hold strings"))
                })?;
                if !device_ids.iter().any(|d: &String| d == device) {
                    device_ids.push(device.to_owned());
                }
            }
            named += device_ids.len().max(1);
            users.insert(user_id, device_ids);
        }
        self.check_query_size(named)?;
        Ok(KeyQuery { users, timeout })
    }

    fn check_query_size(&self, devices: usize) -> Result<(), KeysRejected> {
        let max = self.config.max_query_devices;
        if devices > max {
            return Err(KeysRejected::TooLarge(format!(
                "a key query may name at most {max} devices"
            )));
        }
        Ok(())
    }

    /// Answers a key query. A server asking about a user of another server
    /// is refused (`NotLocal`) before anything is read.
    pub async fn query_keys(
        &self,
        asker: Asker<'_>,
        query: KeyQuery,
    ) -> Result<QueryAnswer, KeysRejected> {
        let mut local = Vec::new();
        let mut remote: BTreeMap<ServerName, RemoteQuery> = BTreeMap::new();
        let mut targets: Vec<TrackTarget> = Vec::new();
        for (user, devices) in query.users {
            if let Asker::User(asker) = asker
                && asker != user.as_str()
            {
                targets.push(TrackTarget {
                    user_id: user.as_str().to_owned(),
                    remote: user.server_name() != self.server_name.as_str(),
                });
            }
            if user.server_name() == self.server_name.as_str() {
                local.push(DeviceQuery {
                    user_id: user.as_str().to_owned(),
                    device_ids: devices,
                });
            } else if asker == Asker::Server {
                return Err(KeysRejected::NotLocal(user.as_str().to_owned()));
            } else {
                let server = ServerName::parse(user.server_name()).map_err(|_| {
                    KeysRejected::InvalidParam(format!("{user} has no valid server name"))
                })?;
                remote
                    .entry(server)
                    .or_default()
                    .device_keys
                    .insert(user.as_str().to_owned(), devices);
            }
        }
        let mut answer = QueryAnswer::default();
        if !local.is_empty() {
            metrics::counter!("courier_e2ee_key_queries_total", "kind" => "local")
                .increment(local.len() as u64);
            let named: usize = local.iter().map(|q| q.device_ids.len()).sum();
            let all_devices: Vec<bool> = local.iter().map(|q| q.device_ids.is_empty()).collect();
            let users = self.store.user_devices(local).await?;
            let returned: usize = users
                .iter()
                .zip(&all_devices)
                .filter(|(_, all)| **all)
                .map(|(user, _)| user.devices.len())
                .sum();
            self.check_query_size(named + returned)?;
            for user in users {
                self.add_local_user(&mut answer, user, asker);
            }
        }
        let unconfirmed = match asker {
            Asker::User(asker) => {
                self.answer_from_cache(asker, &mut remote, &mut answer)
                    .await
            }
            Asker::Server => Vec::new(),
        };
        // Only an answer about all of a user's devices can show the cache
        // missed one.
        let unconfirmed: Vec<RemoteDeviceList> = unconfirmed
            .into_iter()
            .filter(|list| {
                remote.values().any(|q| {
                    q.device_keys
                        .get(&list.user_id)
                        .is_some_and(|devices| devices.is_empty())
                })
            })
            .collect();
        if !remote.is_empty() {
            metrics::counter!("courier_e2ee_key_queries_total", "kind" => "remote")
                .increment(remote.values().map(|q| q.device_keys.len() as u64).sum());
            let fanout = ask_servers(
                &self.remote,
                remote,
                query.timeout,
                self.config.remote_concurrency,
                "query",
                |remote, server, request, timeout| async move {
                    remote.query_keys(&server, request, timeout).await
                },
            )
            .await;
            for (_, remote_answer) in fanout.answers {
                add_remote_answer(&mut answer, remote_answer);
            }
            answer.failures = fanout.failures;
            self.resync_if_diverged(unconfirmed, &answer).await;
        }
        if let Asker::User(asker) = asker
            && !targets.is_empty()
        {
            self.track_queried(asker, targets).await;
        }
        Ok(answer)
    }

    /// Answers the users of `remote` that `asker` tracks and whose cached
    /// list is fresh and trusted (`cache_answers`) from the cache, and takes
    /// them out of `remote`. Returns the fresh lists that are not trusted
    /// (their users are asked live, and `resync_if_diverged` compares). A
    /// store error leaves everything to the live query.
    async fn answer_from_cache(
        &self,
        asker: &str,
        remote: &mut BTreeMap<ServerName, RemoteQuery>,
        answer: &mut QueryAnswer,
    ) -> Vec<RemoteDeviceList> {
        let mut unconfirmed = Vec::new();
        if remote.is_empty() {
            return unconfirmed;
        }
        let tracked = match self.store.tracked_users(asker).await {
            Ok(tracked) => tracked,
            Err(error) => {
                tracing::warn!(asker, %error, "reading tracked users for a key query");
                return unconfirmed;
            }
        };
        let candidates: Vec<String> = remote
            .values()
            .flat_map(|q| q.device_keys.keys())
            .filter(|user| tracked.binary_search(user).is_ok())
            .cloned()
            .collect();
        if candidates.is_empty() {
            return unconfirmed;
        }
        let lists = match self.store.remote_device_lists(candidates).await {
            Ok(lists) => lists,
            Err(error) => {
                tracing::warn!(asker, %error, "reading cached device lists for a key query");
                return unconfirmed;
            }
        };
        let now = crate::clock::now_ms();
        let mut served = 0u64;
        for list in lists {
            if list.stale || list.stream_id.is_none() {
                continue;
            }
            if !self.cache_answers(&list, now) {
                unconfirmed.push(list);
                continue;
            }
            let Some(query) = remote
                .values_mut()
                .find(|q| q.device_keys.contains_key(&list.user_id))
            else {
                continue;
            };
            let wanted = query.device_keys.remove(&list.user_id).unwrap_or_default();
            add_cached_user(answer, list, &wanted);
            served += 1;
        }
        remote.retain(|_, q| !q.device_keys.is_empty());
        if served > 0 {
            metrics::counter!("courier_e2ee_key_queries_total", "kind" => "cached")
                .increment(served);
        }
        unconfirmed
    }

    /// Whether a fresh cached list may answer by itself: its server pushes
    /// the user's updates to us (it sent one within half the interest
    /// window, so that our live queries renew its interest in time), or it
    /// was resynced within `remote_cache_ttl`. A server that shares no room
    /// with us (Synapse) never pushes, and its users are asked live.
    fn cache_answers(&self, list: &RemoteDeviceList, now: i64) -> bool {
        let within = |ts: Option<i64>, window: Duration| {
            let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
            ts.is_some_and(|ts| now.saturating_sub(ts) < window)
        };
        within(list.pushed_ts, self.config.interest_window / 2)
            || within(list.fetched_ts, self.config.remote_cache_ttl)
    }

    /// After a live answer for tracked users whose cache was not trusted:
    /// a user whose live device keys differ from the cached ones has a stale
    /// cache (its server did not push the change), so it is marked stale and
    /// resynced, and its trackers then see it in `device_lists.changed`.
    async fn resync_if_diverged(&self, unconfirmed: Vec<RemoteDeviceList>, answer: &QueryAnswer) {
        let diverged: Vec<String> = unconfirmed
            .into_iter()
            .filter(|list| match answer.device_keys.get(&list.user_id) {
                Some(Value::Object(live)) => !same_devices(list, live),
                _ => false,
            })
            .map(|list| list.user_id)
            .collect();
        if diverged.is_empty() {
            return;
        }
        tracing::info!(
            users = diverged.len(),
            "live key answers differ from cached device lists; resyncing"
        );
        match self
            .store
            .mark_remote_stale(diverged, crate::clock::now_ms())
            .await
        {
            Ok(stale) => self.resync.schedule(stale),
            Err(error) => tracing::warn!(%error, "marking diverged device lists stale"),
        }
    }

    /// After a local user's query: it tracks every user it asked about;
    /// remote ones left stale get a resync. Users it already tracks are
    /// skipped (a read, not a write, for the common repeated query; their
    /// stale lists are the scheduler's sweep's). Best effort.
    async fn track_queried(&self, asker: &str, mut targets: Vec<TrackTarget>) {
        match self.store.tracked_users(asker).await {
            Ok(tracked) => targets.retain(|t| tracked.binary_search(&t.user_id).is_err()),
            Err(error) => tracing::warn!(asker, %error, "reading tracked users for a key query"),
        }
        if targets.is_empty() {
            return;
        }
        match self
            .store
            .track_users(asker, targets, TrackSource::Query, crate::clock::now_ms())
            .await
        {
            Ok(stale) => self.resync.schedule(stale),
            Err(error) => tracing::warn!(asker, %error, "tracking the users of a key query"),
        }
    }

    fn add_local_user(&self, answer: &mut QueryAnswer, user: UserDevices, asker: Asker<'_>) {
        let owner = user.user_id.as_str();
        let names_allowed = asker != Asker::Server || self.config.device_names_over_federation;
        let mut devices = Map::new();
        for device in user.devices {
            let Some(mut object) = device.keys_json.as_deref().and_then(stored_object) else {
                continue;
            };
            merge_signatures(
                &mut object,
                device
                    .signatures
                    .iter()
                    .filter(|s| visible(s, owner, asker)),
            );
            let mut unsigned = Map::new();
            if let (Some(name), true) = (device.display_name, names_allowed) {
                unsigned.insert("device_display_name".to_owned(), Value::String(name));
            }
            object.insert("unsigned".to_owned(), Value::Object(unsigned));
            devices.insert(device.device_id, Value::Object(object));
        }
        answer
            .device_keys
            .insert(owner.to_owned(), Value::Object(devices));
        for key in user.cross_signing {
            let target = match key.kind {
                CrossSigningKind::Master => &mut answer.master_keys,
                CrossSigningKind::SelfSigning => &mut answer.self_signing_keys,
                CrossSigningKind::UserSigning if asker == Asker::User(owner) => {
                    &mut answer.user_signing_keys
                }
                CrossSigningKind::UserSigning => continue,
            };
            let Some(mut object) = stored_object(&key.key_json) else {
                continue;
            };
            merge_signatures(
                &mut object,
                key.signatures.iter().filter(|s| visible(s, owner, asker)),
            );
            target.insert(owner.to_owned(), Value::Object(object));
        }
    }
}

fn add_remote_answer(answer: &mut QueryAnswer, remote: RemoteQueryAnswer) {
    for (user, devices) in remote.device_keys {
        let devices: Map<String, Value> = devices.into_iter().collect();
        answer.device_keys.insert(user, Value::Object(devices));
    }
    answer.master_keys.extend(remote.master_keys);
    answer.self_signing_keys.extend(remote.self_signing_keys);
}

/// A tracked remote user's keys from its fresh cached list (`wanted`: the
/// device IDs asked for, empty for all).
fn add_cached_user(answer: &mut QueryAnswer, list: RemoteDeviceList, wanted: &[String]) {
    let mut devices = Map::new();
    for device in list.devices {
        if !wanted.is_empty() && !wanted.contains(&device.device_id) {
            continue;
        }
        let Some(mut object) = device.keys_json.as_deref().and_then(stored_object) else {
            continue;
        };
        let mut unsigned = Map::new();
        if let Some(name) = device.display_name {
            unsigned.insert("device_display_name".to_owned(), Value::String(name));
        }
        object.insert("unsigned".to_owned(), Value::Object(unsigned));
        devices.insert(device.device_id, Value::Object(object));
    }
    answer
        .device_keys
        .insert(list.user_id.clone(), Value::Object(devices));
    if let Some(master) = list.master_key_json.as_deref().and_then(stored_object) {
        answer
            .master_keys
            .insert(list.user_id.clone(), Value::Object(master));
    }
    if let Some(key) = list
        .self_signing_key_json
        .as_deref()
        .and_then(stored_object)
    {
        answer
            .self_signing_keys
            .insert(list.user_id, Value::Object(key));
    }
}

/// Whether a live answer's devices (device ID → its `keys` map) are the
/// cached list's devices with keys.
fn same_devices(list: &RemoteDeviceList, live: &Map<String, Value>) -> bool {
    let cached: BTreeMap<&str, Option<Value>> = list
        .devices
        .iter()
        .filter_map(|device| {
            let object = device.keys_json.as_deref().and_then(stored_object)?;
            Some((device.device_id.as_str(), object.get("keys").cloned()))
        })
        .collect();
    cached.len() == live.len()
        && live.iter().all(|(device_id, object)| {
            cached
                .get(device_id.as_str())
                .is_some_and(|keys| keys.as_ref() == object.get("keys"))
        })
}
