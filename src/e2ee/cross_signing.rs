//! `E2ee::upload_cross_signing_keys` (`POST /keys/device_signing/upload`,
//! SPEC-E2EE §1.3, §2.7): checks each uploaded master, self-signing and
//! user-signing key (the caller's, the right `usage`, exactly one ed25519
//! key, not colliding with a device ID), checks that the self-signing and
//! user-signing keys are signed by the new or the stored master key, and
//! stores the keys that differ from the stored ones in one
//! `KeyStore::put_cross_signing_keys` call. The first upload and an
//! identical re-upload need no user-interactive authentication; anything
//! else once a master key is stored does (`KeysRejected::AuthRequired`).

use serde_json::{Map, Value};

use crate::canonical_json::to_canonical_bytes;
use crate::signing::verify_json;
use crate::store::keys::{CrossSigningKind, DeviceQuery, NewCrossSigningKey};

use super::E2ee;
use super::error::KeysRejected;
use super::objects::{
    CheckedCrossSigningKey, canonical_text, check_cross_signing_key, signature_error,
    stored_object, stored_public_key,
};

const FIELDS: [(&str, CrossSigningKind); 3] = [
    ("master_key", CrossSigningKind::Master),
    ("self_signing_key", CrossSigningKind::SelfSigning),
    ("user_signing_key", CrossSigningKind::UserSigning),
];

fn canonical(object: &Map<String, Value>) -> Result<Vec<u8>, KeysRejected> {
    to_canonical_bytes(&Value::Object(object.clone()))
        .map_err(|e| KeysRejected::BadJson(format!("cross-signing key is not canonical: {e}")))
}

impl E2ee {
    /// Stores the caller's cross-signing keys from the request body.
    /// `auth_done` says whether the body completed user-interactive
    /// authentication.
    pub async fn upload_cross_signing_keys(
        &self,
        user_id: &str,
        body: &Map<String, Value>,
        auth_done: bool,
    ) -> Result<(), KeysRejected> {
        let mut uploaded: Vec<CheckedCrossSigningKey> = Vec::new();
        for (field, kind) in FIELDS {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(value) => uploaded.push(check_cross_signing_key(value, user_id, kind)?),
            }
        }
        if uploaded.is_empty() {
            return Ok(());
        }
        let stored = self
            .store
            .user_devices(vec![DeviceQuery {
                user_id: user_id.to_owned(),
                device_ids: Vec::new(),
            }])
            .await?;
        let stored = stored.into_iter().find(|u| u.user_id == user_id);
        let stored_keys: Vec<(CrossSigningKind, Map<String, Value>)> = stored
            .iter()
            .flat_map(|u| &u.cross_signing)
            .filter_map(|k| Some((k.kind, stored_object(&k.key_json)?)))
            .collect();
        let stored_of = |kind: CrossSigningKind| {
            stored_keys
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, object)| object)
        };

        let master = match uploaded.iter().find(|k| k.kind == CrossSigningKind::Master) {
            Some(new) => Some((new.public_key.clone(), new.verify_key)),
            None => stored_of(CrossSigningKind::Master).and_then(stored_public_key),
        };
        for key in uploaded
            .iter()
            .filter(|k| k.kind != CrossSigningKind::Master)
        {
            let Some((master_key, master_verify)) = &master else {
                return Err(KeysRejected::MissingParam("No master key available".into()));
            };
            let what = format!("{}_key", key.kind.as_str());
            verify_json(
                &Value::Object(key.object.clone()),
                user_id,
                &format!("ed25519:{master_key}"),
                master_verify,
            )
            .map_err(|e| match signature_error(e, &what) {
                KeysRejected::InvalidSignature(m) | KeysRejected::InvalidParam(m) => {
                    KeysRejected::InvalidSignature(format!("{m} (by the master key)"))
                }
                other => other,
            })?;
        }
        for key in &uploaded {
            let in_use = stored
                .iter()
                .flat_map(|u| &u.devices)
                .any(|d| d.device_id == key.public_key);
            if in_use {
                return Err(KeysRejected::KeyIdInUse(format!(
                    "Key ID in use: {} is a device ID",
                    key.public_key
                )));
            }
        }

        let mut changed = Vec::new();
        for key in uploaded {
            let same = match stored_of(key.kind) {
                Some(stored) => canonical(stored)? == canonical(&key.object)?,
                None => false,
            };
            if !same {
                changed.push(key);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        if stored_of(CrossSigningKind::Master).is_some() && !auth_done {
            return Err(KeysRejected::AuthRequired);
        }
        let keys = changed
            .into_iter()
            .map(|key| {
                Ok(NewCrossSigningKey {
                    kind: key.kind,
                    public_key: key.public_key,
                    key_json: canonical_text(&Value::Object(key.object))?,
                })
            })
            .collect::<Result<Vec<_>, KeysRejected>>()?;
        let kinds = keys.len();
        self.store
            .put_cross_signing_keys(user_id, keys, crate::clock::now_ms())
            .await?;
        metrics::counter!("courier_e2ee_cross_signing_uploads_total").increment(kinds as u64);
        self.device_list_changed(user_id).await;
        Ok(())
    }
}
