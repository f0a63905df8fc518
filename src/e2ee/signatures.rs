//! `E2ee::upload_signatures` (`POST /keys/signatures/upload`, SPEC-E2EE
//! §2.7): the caller's signatures of keys, each entry checked on its own.
//! Accepted: the caller's own device keys signed by their self-signing key,
//! the caller's master key signed by one of their devices, and another
//! user's master key signed by the caller's user-signing key (a local
//! user's from the store, a remote user's as their server answers now). The
//! signed object must match the known key apart from its signatures, and
//! the signature must verify. The good ones are stored in one
//! `KeyStore::put_signatures` call; each bad one is reported with its
//! reason and changes nothing.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value};

use crate::identifiers::{ServerName, UserId};
use crate::signing::{decode_verify_key, verify_json};
use crate::store::keys::{CrossSigningKind, DeviceQuery, StoredSignature, UserDevices};

use super::E2ee;
use super::error::KeysRejected;
use super::fanout::ask_servers;
use super::objects::stored_public_key;
use super::objects::{same_signed_content, signature_error, stored_object};
use super::remote::RemoteQuery;

/// One refused entry: target user, key ID, why.
pub type SignatureFailure = (String, String, KeysRejected);

/// A key someone may sign: its known object and its public key.
struct Known {
    object: Map<String, Value>,
    public_key: String,
    verify_key: VerifyingKey,
}

/// The caller's keys that signatures are checked against.
#[derive(Default)]
struct OwnKeys {
    /// Device ID → device keys.
    devices: BTreeMap<String, Known>,
    master: Option<Known>,
    self_signing: Option<Known>,
    user_signing: Option<Known>,
}

fn known_cross_signing(object: Map<String, Value>) -> Option<Known> {
    let (public_key, verify_key) = stored_public_key(&object)?;
    Some(Known {
        object,
        public_key,
        verify_key,
    })
}

fn own_keys(user: Option<UserDevices>) -> OwnKeys {
    let mut own = OwnKeys::default();
    let Some(user) = user else {
        return own;
    };
    for device in user.devices {
        let Some(object) = device.keys_json.as_deref().and_then(stored_object) else {
            continue;
        };
        let key = object
            .get("keys")
            .and_then(|keys| keys.get(format!("ed25519:{}", device.device_id)))
            .and_then(Value::as_str)
            .and_then(|key| decode_verify_key(key).ok().map(|vk| (key.to_owned(), vk)));
        if let Some((public_key, verify_key)) = key {
            own.devices.insert(
                device.device_id,
                Known {
                    object,
                    public_key,
                    verify_key,
                },
            );
        }
    }
    for key in user.cross_signing {
        let known = stored_object(&key.key_json).and_then(known_cross_signing);
        match key.kind {
            CrossSigningKind::Master => own.master = known,
            CrossSigningKind::SelfSigning => own.self_signing = known,
            CrossSigningKind::UserSigning => own.user_signing = known,
        }
    }
    own
}

fn unknown(key_id: &str) -> KeysRejected {
    KeysRejected::UnknownKey(format!("unknown key {key_id}"))
}

/// Checks that `object` is `target` re-signed by `signer_key_id` of
/// `signer` and returns that signature.
fn check_signed(
    object: &Map<String, Value>,
    target: &Known,
    signer: &str,
    signer_key_id: &str,
    signer_key: &VerifyingKey,
) -> Result<String, KeysRejected> {
    if !same_signed_content(object, &target.object)? {
        return Err(KeysRejected::InvalidSignature(
            "the signed object does not match the stored key".into(),
        ));
    }
    let value = Value::Object(object.clone());
    verify_json(&value, signer, signer_key_id, signer_key)
        .map_err(|e| signature_error(e, "signed object"))?;
    value
        .get("signatures")
        .and_then(|s| s.get(signer))
        .and_then(|s| s.get(signer_key_id))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| KeysRejected::InvalidSignature("no signature".into()))
}

impl E2ee {
    /// Checks and stores the caller's uploaded signatures; returns the
    /// entries that were refused.
    pub async fn upload_signatures(
        &self,
        user_id: &str,
        body: &Map<String, Value>,
    ) -> Result<Vec<SignatureFailure>, KeysRejected> {
        let mut entries = Vec::new();
        for (target_user, keys) in body {
            let Value::Object(keys) = keys else {
                return Err(KeysRejected::BadJson(format!(
                    "{target_user} must map key IDs to signed objects"
                )));
            };
            for (key_id, object) in keys {
                entries.push((target_user.clone(), key_id.clone(), object));
            }
        }
        let max = self.config.max_query_devices;
        if entries.len() > max {
            return Err(KeysRejected::TooLarge(format!(
                "at most {max} signed keys per upload"
            )));
        }
        let others = self.masters_of_others(user_id, &entries).await?;
        let own = self
            .store
            .user_devices(vec![DeviceQuery {
                user_id: user_id.to_owned(),
                device_ids: Vec::new(),
            }])
            .await?;
        let own = own_keys(own.into_iter().find(|u| u.user_id == user_id));

        let mut good = Vec::new();
        let mut failures = Vec::new();
        for (target_user, key_id, object) in entries {
            let result = match object {
                Value::Object(object) if target_user == user_id => {
                    check_own(user_id, &key_id, object, &own)
                }
                Value::Object(object) => match others.get(&target_user) {
                    Some(master) if master.public_key == key_id => match &own.user_signing {
                        Some(usk) => {
                            let signer_key_id = format!("ed25519:{}", usk.public_key);
                            check_signed(object, master, user_id, &signer_key_id, &usk.verify_key)
                                .map(|signature| {
                                    vec![StoredSignature {
                                        target_user_id: target_user.clone(),
                                        target_key_id: key_id.clone(),
                                        signer_user_id: user_id.to_owned(),
                                        signer_key_id,
                                        signature,
                                    }]
                                })
                        }
                        None => Err(KeysRejected::InvalidSignature(
                            "the caller has no user-signing key".into(),
                        )),
                    },
                    _ => Err(unknown(&key_id)),
                },
                _ => Err(KeysRejected::BadJson(format!(
                    "{key_id} must be a signed object"
                ))),
            };
            match result {
                Ok(signatures) => good.extend(signatures),
                Err(error) => {
                    metrics::counter!("courier_e2ee_signature_failures_total", "reason" => error.reason())
                        .increment(1);
                    failures.push((target_user, key_id, error));
                }
            }
        }
        if !good.is_empty() {
            let stored = good.len();
            self.store
                .put_signatures(good, crate::clock::now_ms())
                .await?;
            metrics::counter!("courier_e2ee_signatures_stored_total").increment(stored as u64);
            self.device_list_changed(user_id).await;
        }
        Ok(failures)
    }

    /// The master keys of the other users the entries sign: local users'
    /// from the store, remote users' from their servers.
    async fn masters_of_others(
        &self,
        user_id: &str,
        entries: &[(String, String, &Value)],
    ) -> Result<BTreeMap<String, Known>, KeysRejected> {
        let mut local = Vec::new();
        let mut remote: BTreeMap<ServerName, RemoteQuery> = BTreeMap::new();
        for (target, _, _) in entries {
            if target == user_id {
                continue;
            }
            let Ok(parsed) = UserId::parse(target) else {
                continue;
            };
            if parsed.server_name() == self.server_name.as_str() {
                if !local.iter().any(|q: &DeviceQuery| &q.user_id == target) {
                    local.push(DeviceQuery {
                        user_id: target.clone(),
                        device_ids: Vec::new(),
                    });
                }
            } else if let Ok(server) = ServerName::parse(parsed.server_name()) {
                remote
                    .entry(server)
                    .or_default()
                    .device_keys
                    .insert(target.clone(), Vec::new());
            }
        }
        let mut masters = BTreeMap::new();
        if !local.is_empty() {
            for user in self.store.user_devices(local).await? {
                let master = user
                    .cross_signing
                    .iter()
                    .find(|k| k.kind == CrossSigningKind::Master)
                    .and_then(|k| stored_object(&k.key_json))
                    .and_then(known_cross_signing);
                if let Some(master) = master {
                    masters.insert(user.user_id, master);
                }
            }
        }
        if !remote.is_empty() {
            let fanout = ask_servers(
                &self.remote,
                remote,
                self.config.remote_timeout,
                self.config.remote_concurrency,
                "signature_target",
                |remote, server, request, timeout| async move {
                    remote.query_keys(&server, request, timeout).await
                },
            )
            .await;
            for (_, answer) in fanout.answers {
                for (user, master) in answer.master_keys {
                    if let Value::Object(object) = master
                        && let Some(known) = known_cross_signing(object)
                    {
                        masters.insert(user, known);
                    }
                }
            }
        }
        Ok(masters)
    }
}

/// A signature of one of the caller's own keys: a device signed by the
/// self-signing key, or the master key signed by devices.
fn check_own(
    user_id: &str,
    key_id: &str,
    object: &Map<String, Value>,
    own: &OwnKeys,
) -> Result<Vec<StoredSignature>, KeysRejected> {
    if let Some(device) = own.devices.get(key_id) {
        let ssk = own.self_signing.as_ref().ok_or_else(|| {
            KeysRejected::InvalidSignature("the caller has no self-signing key".into())
        })?;
        let signer_key_id = format!("ed25519:{}", ssk.public_key);
        let signature = check_signed(object, device, user_id, &signer_key_id, &ssk.verify_key)?;
        return Ok(vec![StoredSignature {
            target_user_id: user_id.to_owned(),
            target_key_id: key_id.to_owned(),
            signer_user_id: user_id.to_owned(),
            signer_key_id,
            signature,
        }]);
    }
    let Some(master) = own.master.as_ref().filter(|m| m.public_key == key_id) else {
        return Err(unknown(key_id));
    };
    let mut signatures = Vec::new();
    let mut last_error = None;
    for (device_id, device) in &own.devices {
        let signer_key_id = format!("ed25519:{device_id}");
        let present = object
            .get("signatures")
            .and_then(|s| s.get(user_id))
            .and_then(|s| s.get(&signer_key_id))
            .is_some();
        if !present {
            continue;
        }
        match check_signed(object, master, user_id, &signer_key_id, &device.verify_key) {
            Ok(signature) => signatures.push(StoredSignature {
                target_user_id: user_id.to_owned(),
                target_key_id: key_id.to_owned(),
                signer_user_id: user_id.to_owned(),
                signer_key_id,
                signature,
            }),
            Err(error) => last_error = Some(error),
        }
    }
    if signatures.is_empty() {
        return Err(last_error.unwrap_or_else(|| {
            KeysRejected::InvalidSignature("no signature by one of the caller's devices".into())
        }));
    }
    Ok(signatures)
}
