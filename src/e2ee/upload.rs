//! `E2ee::upload_keys` (`POST /keys/upload`, SPEC-E2EE §2.1): checks a
//! device's device keys (its own IDs, both identity keys, a self-signature
//! that verifies), its one-time keys and fallback keys (bare strings for
//! unsigned algorithms, otherwise key objects signed by the device's
//! ed25519 key, from this upload or from the stored device keys), then
//! stores them in one `KeyStore::upload_keys` call and answers the counts.
//! Nothing is written unless every part passed.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value};

use crate::signing::decode_verify_key;
use crate::store::DeviceKey;
use crate::store::keys::{DeviceQuery, KeysUpload, NewKey, UploadOutcome, UploadedDeviceKeys};

use super::E2ee;
use super::error::KeysRejected;
use super::objects::{
    canonical_text, check_device_keys, check_key_object, split_key_id, stored_object,
};

/// The algorithm whose count every answer carries, 0 included (clients
/// read a missing count as 0 and would upload without end otherwise).
pub const SIGNED_CURVE25519: &str = "signed_curve25519";

fn count_upload(outcome: &'static str) {
    metrics::counter!("courier_e2ee_key_uploads_total", "outcome" => outcome).increment(1);
}

/// An optional map field; `null` counts as absent.
fn key_map<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, KeysRejected> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(keys)) => Ok(Some(keys)),
        Some(_) => Err(KeysRejected::BadJson(format!("{field} must be an object"))),
    }
}

impl E2ee {
    /// Stores the keys of `device` from a `/keys/upload` body and returns
    /// the unclaimed one-time key counts per algorithm.
    pub async fn upload_keys(
        &self,
        device: &DeviceKey,
        body: &Map<String, Value>,
    ) -> Result<BTreeMap<String, u64>, KeysRejected> {
        let result = self.upload_keys_inner(device, body).await;
        if let Err(error) = &result {
            count_upload(error.reason());
        }
        result
    }

    async fn upload_keys_inner(
        &self,
        device: &DeviceKey,
        body: &Map<String, Value>,
    ) -> Result<BTreeMap<String, u64>, KeysRejected> {
        let (user_id, device_id) = (device.user_id.as_str(), device.device_id.as_str());
        let device_keys = match body.get("device_keys") {
            None => None,
            Some(Value::Null) => {
                return Err(KeysRejected::BadJson("device_keys may not be null".into()));
            }
            Some(value) => Some(check_device_keys(value, user_id, device_id)?),
        };
        let one_time = key_map(body, "one_time_keys")?;
        let fallback = key_map(body, "fallback_keys")?;

        let needs_device_key = one_time
            .into_iter()
            .chain(fallback)
            .any(|keys| keys.values().any(Value::is_object));
        let device_key = match &device_keys {
            Some(checked) => Some(checked.ed25519),
            None if needs_device_key => self.stored_device_key(user_id, device_id).await?,
            None => None,
        };

        let mut one_time_keys = Vec::new();
        for (name, value) in one_time.into_iter().flatten() {
            one_time_keys.push(new_key(name, value, device, device_key.as_ref(), false)?);
        }
        let mut fallback_keys: Vec<NewKey> = Vec::new();
        for (name, value) in fallback.into_iter().flatten() {
            let key = new_key(name, value, device, device_key.as_ref(), true)?;
            if fallback_keys.iter().any(|k| k.algorithm == key.algorithm) {
                return Err(KeysRejected::InvalidParam(format!(
                    "at most one fallback key per algorithm ({})",
                    key.algorithm
                )));
            }
            fallback_keys.push(key);
        }
        let uploaded_one_time = one_time_keys.len() as u64;
        let device_keys = match device_keys {
            Some(checked) => Some(UploadedDeviceKeys {
                identity: checked.identity()?,
                json: checked.json()?,
            }),
            None => None,
        };

        let outcome = self
            .store
            .upload_keys(KeysUpload {
                user_id: user_id.to_owned(),
                device_id: device_id.to_owned(),
                device_keys,
                one_time_keys,
                fallback_keys,
                now_ms: crate::now_ms(),
            })
            .await?;
        match outcome {
            UploadOutcome::Stored {
                mut one_time_key_counts,
                device_list_changed,
            } => {
                count_upload("stored");
                metrics::counter!("courier_e2ee_one_time_keys_uploaded_total")
                    .increment(uploaded_one_time);
                if device_list_changed {
                    self.device_list_changed(user_id).await;
                }
                one_time_key_counts
                    .entry(SIGNED_CURVE25519.to_owned())
                    .or_insert(0);
                Ok(one_time_key_counts)
            }
            UploadOutcome::IdentityChanged => Err(KeysRejected::InvalidParam(
                "the device already has device keys with other identity keys".into(),
            )),
            UploadOutcome::OneTimeKeyConflict { algorithm, key_id } => {
                Err(KeysRejected::InvalidParam(format!(
                    "one-time key {algorithm}:{key_id} already exists with another value"
                )))
            }
            UploadOutcome::UnknownDevice => Err(KeysRejected::UnknownDevice),
        }
    }

    /// The ed25519 key of the stored device keys of a device, if any.
    async fn stored_device_key(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<Option<VerifyingKey>, KeysRejected> {
        let users = self
            .store
            .user_devices(vec![DeviceQuery {
                user_id: user_id.to_owned(),
                device_ids: vec![device_id.to_owned()],
            }])
            .await?;
        let key = users
            .iter()
            .flat_map(|user| &user.devices)
            .filter(|record| record.device_id == device_id)
            .filter_map(|record| record.keys_json.as_deref())
            .filter_map(stored_object)
            .find_map(|object| {
                let keys = object.get("keys")?;
                let key = keys.get(format!("ed25519:{device_id}"))?.as_str()?;
                decode_verify_key(key).ok()
            });
        Ok(key)
    }
}

fn new_key(
    name: &str,
    value: &Value,
    device: &DeviceKey,
    device_key: Option<&VerifyingKey>,
    fallback: bool,
) -> Result<NewKey, KeysRejected> {
    let (algorithm, key_id) = split_key_id(name)?;
    check_key_object(
        name,
        algorithm,
        value,
        &device.user_id,
        &device.device_id,
        device_key,
        fallback,
    )?;
    Ok(NewKey {
        algorithm: algorithm.to_owned(),
        key_id: key_id.to_owned(),
        key_json: canonical_text(value)?,
    })
}
