//! `E2ee::claim_keys` (`POST /keys/claim` for clients, SPEC-E2EE §2.3, and
//! `POST /user/keys/claim` for other servers, §3.3): one key per wanted
//! (device, algorithm). Local devices' keys come from one
//! `KeyStore::claim_keys` call (a one-time key at most once, in upload
//! order, else the fallback key); remote ones from their servers, one
//! request per server, concurrently and within the timeout, failures
//! reported per server. A device with nothing to hand out is absent.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::identifiers::{ServerName, UserId};
use crate::store::keys::ClaimWanted;

use super::E2ee;
use super::error::KeysRejected;
use super::fanout::ask_servers;
use super::query::Asker;
use super::remote::{RemoteClaim, RemoteClaimAnswer};

/// A parsed claim: user → device → algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    pub wanted: BTreeMap<UserId, BTreeMap<String, String>>,
    pub timeout: Duration,
}

/// The answer, in the shape of the response body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClaimAnswer {
    /// user → device → `"<algorithm>:<key_id>"` → key.
    pub one_time_keys: Map<String, Value>,
    pub failures: Map<String, Value>,
}

impl ClaimAnswer {
    pub fn into_client_json(self) -> Value {
        json!({ "one_time_keys": self.one_time_keys, "failures": self.failures })
    }

    pub fn into_federation_json(self) -> Value {
        json!({ "one_time_keys": self.one_time_keys })
    }
}

fn count_claims(result: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!("courier_e2ee_key_claims_total", "result" => result).increment(n as u64);
    }
}

/// Inserts `key` at `out[user][device][name]`.
fn insert_key(
    out: &mut Map<String, Value>,
    user: String,
    device: String,
    name: String,
    key: Value,
) {
    let by_user = out.entry(user).or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(by_user) = by_user {
        let by_device = by_user
            .entry(device)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(by_device) = by_device {
            by_device.insert(name, key);
        }
    }
}

impl E2ee {
    /// Parses `{"one_time_keys": {user: {device: algorithm}}}` and checks
    /// the size limit.
    pub fn parse_key_claim(
        &self,
        body: &Map<String, Value>,
        timeout: Duration,
    ) -> Result<KeyClaim, KeysRejected> {
        let requested = super::objects::required_map(body, "one_time_keys")?;
        let mut wanted = BTreeMap::new();
        let mut pairs = 0usize;
        for (user, devices) in requested {
            let user_id = UserId::parse(user)
                .map_err(|_| KeysRejected::InvalidParam(format!("{user} is not a user ID")))?;
            let Value::Object(devices) = devices else {
                return Err(KeysRejected::BadJson(format!(
                    "one_time_keys.{user} must map device IDs to algorithms"
                )));
            };
            let mut by_device = BTreeMap::new();
            for (device, algorithm) in devices {
                let algorithm = algorithm
                    .as_str()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| {
                        KeysRejected::BadJson(format!(
                            "one_time_keys.{user}.{device} must be an algorithm name"
                        ))
                    })?;
                by_device.insert(device.clone(), algorithm.to_owned());
            }
            pairs += by_device.len();
            wanted.insert(user_id, by_device);
        }
        let max = self.config.max_claim_devices;
        if pairs > max {
            return Err(KeysRejected::TooLarge(format!(
                "a key claim may name at most {max} devices"
            )));
        }
        Ok(KeyClaim { wanted, timeout })
    }

    /// Claims the wanted keys. A server claiming for a user of another
    /// server is refused (`NotLocal`) before anything is claimed.
    pub async fn claim_keys(
        &self,
        asker: Asker<'_>,
        claim: KeyClaim,
    ) -> Result<ClaimAnswer, KeysRejected> {
        let mut local = Vec::new();
        let mut remote: BTreeMap<ServerName, RemoteClaim> = BTreeMap::new();
        for (user, devices) in claim.wanted {
            if user.server_name() == self.server_name.as_str() {
                local.extend(
                    devices
                        .into_iter()
                        .map(|(device_id, algorithm)| ClaimWanted {
                            user_id: user.as_str().to_owned(),
                            device_id,
                            algorithm,
                        }),
                );
            } else if asker == Asker::Server {
                return Err(KeysRejected::NotLocal(user.as_str().to_owned()));
            } else {
                let server = ServerName::parse(user.server_name()).map_err(|_| {
                    KeysRejected::InvalidParam(format!("{user} has no valid server name"))
                })?;
                remote
                    .entry(server)
                    .or_default()
                    .one_time_keys
                    .insert(user.as_str().to_owned(), devices);
            }
        }
        let mut answer = ClaimAnswer::default();
        if !local.is_empty() {
            let wanted = local.len();
            let claimed = self.store.claim_keys(local, crate::clock::now_ms()).await?;
            let fallback = claimed.iter().filter(|k| k.fallback).count();
            count_claims("one_time", claimed.len() - fallback);
            count_claims("fallback", fallback);
            count_claims("none", wanted.saturating_sub(claimed.len()));
            for key in claimed {
                let Ok(value) = serde_json::from_str::<Value>(&key.key_json) else {
                    tracing::error!(
                        user_id = key.user_id,
                        device_id = key.device_id,
                        "stored one-time key is not JSON; skipped"
                    );
                    continue;
                };
                let name = format!("{}:{}", key.algorithm, key.key_id);
                insert_key(
                    &mut answer.one_time_keys,
                    key.user_id,
                    key.device_id,
                    name,
                    value,
                );
            }
        }
        if !remote.is_empty() {
            count_claims(
                "remote",
                remote
                    .values()
                    .flat_map(|c| c.one_time_keys.values())
                    .map(BTreeMap::len)
                    .sum(),
            );
            let fanout = ask_servers(
                &self.remote,
                remote,
                claim.timeout,
                self.config.remote_concurrency,
                "claim",
                |remote, server, request, timeout| async move {
                    remote.claim_keys(&server, request, timeout).await
                },
            )
            .await;
            for (_, RemoteClaimAnswer { one_time_keys }) in fanout.answers {
                for (user, devices) in one_time_keys {
                    for (device, keys) in devices {
                        for (name, key) in keys {
                            insert_key(
                                &mut answer.one_time_keys,
                                user.clone(),
                                device.clone(),
                                name,
                                key,
                            );
                        }
                    }
                }
            }
            answer.failures = fanout.failures;
        }
        Ok(answer)
    }
}
