//! The check on another server's answer to `GET
//! /_matrix/federation/v1/user/devices/{userId}` (SPEC-E2EE §3.1), beside
//! the query and claim checks of `key_answers.rs`, whose field rules and
//! drop counts it shares: the answer is kept only if its `user_id` is the
//! asked user, its `stream_id` an integer ≥ 0 and its `devices` an array of
//! at most [`MAX_USER_DEVICES`]; each device needs a string `device_id`
//! (listed once), and its `keys`, when present, must be that device's keys
//! object. Devices without keys and `null` cross-signing keys are accepted,
//! as Synapse sends them.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::e2ee::remote::RemoteUserDevices;
use crate::federation::outbound::key_answers::{
    Dropped, cross_signing_key_fits, device_keys_fit, into_object, reason,
};
use crate::identifiers::UserId;

/// The most devices a `/user/devices` answer may list (Synapse ignores a
/// larger snapshot too); past it the whole answer is refused.
pub const MAX_USER_DEVICES: usize = 1_000;

/// The validated answer to `GET /user/devices/{user}`.
pub fn check_user_devices(
    user: &UserId,
    body: Value,
) -> Result<(RemoteUserDevices, Dropped), String> {
    let mut top = into_object(body)?;
    match top.get("user_id") {
        Some(Value::String(user_id)) if user_id == user.as_str() => {}
        Some(Value::String(_)) => return Err("the answer is for another user".to_owned()),
        _ => return Err("no string `user_id`".to_owned()),
    }
    let stream_id = top
        .get("stream_id")
        .and_then(Value::as_i64)
        .filter(|id| *id >= 0)
        .ok_or("`stream_id` is not an integer ≥ 0")?;
    let devices = match top.remove("devices") {
        Some(Value::Array(devices)) => devices,
        Some(_) => return Err("`devices` is not an array".to_owned()),
        None => return Err("no `devices`".to_owned()),
    };
    if devices.len() > MAX_USER_DEVICES {
        return Err(format!(
            "{} devices, more than {MAX_USER_DEVICES}",
            devices.len()
        ));
    }
    let mut dropped = Dropped::default();
    let mut seen = BTreeSet::new();
    let mut kept = Vec::with_capacity(devices.len());
    for device in devices {
        match listed_device_fits(&device, user.as_str()) {
            Ok(device_id) if seen.insert(device_id.to_owned()) => kept.push(device),
            Ok(_) => dropped.add(reason::DUPLICATE_DEVICE),
            Err(why) => dropped.add(why),
        }
    }
    let mut cross_signing = |field: &str, usage: &str| match top.remove(field) {
        None | Some(Value::Null) => None,
        Some(key) => match cross_signing_key_fits(&key, user.as_str(), usage) {
            Ok(()) => Some(key),
            Err(why) => {
                dropped.add(why);
                None
            }
        },
    };
    let master_key = cross_signing("master_key", "master");
    let self_signing_key = cross_signing("self_signing_key", "self_signing");
    let answer = RemoteUserDevices {
        user_id: user.as_str().to_owned(),
        stream_id,
        devices: kept,
        master_key,
        self_signing_key,
    };
    Ok((answer, dropped))
}

/// A `/user/devices` entry of `user_id`: an object with a non-empty string
/// `device_id`, its `keys` (absent or `null` allowed, as Synapse sends
/// devices without keys) a device keys object of that device, and its
/// `device_display_name` a string if present. Returns the device ID.
fn listed_device_fits<'a>(device: &'a Value, user_id: &str) -> Result<&'a str, &'static str> {
    let Some(object) = device.as_object() else {
        return Err(reason::MALFORMED);
    };
    let device_id = match object.get("device_id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => id,
        _ => return Err(reason::MALFORMED),
    };
    match object.get("keys") {
        None | Some(Value::Null) => {}
        Some(keys) => device_keys_fit(keys, user_id, device_id)?,
    }
    match object.get("device_display_name") {
        None | Some(Value::Null | Value::String(_)) => Ok(device_id),
        Some(_) => Err(reason::MALFORMED),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn device(user: &str, device: &str) -> Value {
        json!({
            "user_id": user, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {format!("ed25519:{device}"): "k"},
            "signatures": {user: {format!("ed25519:{device}"): "s"}},
        })
    }

    fn cross_signing(user: &str, usage: &str) -> Value {
        json!({"user_id": user, "usage": [usage], "keys": {"ed25519:P": "P"}})
    }

    fn alice() -> UserId {
        UserId::parse("@alice:remote.test").expect("user id")
    }

    #[test]
    fn user_devices_keeps_well_formed_devices_of_the_asked_user() {
        let user = "@alice:remote.test";
        let body = json!({
            "user_id": user, "stream_id": 5,
            "devices": [
                {"device_id": "D1", "keys": device(user, "D1"), "device_display_name": "phone"},
                {"device_id": "D2"},
                {"device_id": "D3", "keys": null, "device_display_name": null},
                {"device_id": "D1"},
                {"device_id": "D4", "keys": device(user, "OTHER")},
                {"device_id": "D5", "device_display_name": 5},
                {"device_id": ""},
                "text",
            ],
            "master_key": cross_signing(user, "master"),
            "self_signing_key": cross_signing("@bob:remote.test", "self_signing"),
        });
        let (answer, dropped) = check_user_devices(&alice(), body).expect("an answer");
        let ids: Vec<&str> = answer
            .devices
            .iter()
            .filter_map(|d| d["device_id"].as_str())
            .collect();
        assert_eq!(ids, ["D1", "D2", "D3"]);
        assert_eq!(answer.stream_id, 5);
        assert_eq!(answer.user_id, user);
        assert_eq!(answer.master_key, Some(cross_signing(user, "master")));
        assert_eq!(answer.self_signing_key, None);
        assert_eq!(dropped.count(reason::DUPLICATE_DEVICE), 1);
        assert_eq!(dropped.count(reason::MISMATCHED_IDS), 2);
        assert_eq!(dropped.count(reason::MALFORMED), 3);

        let nulls = json!({"user_id": user, "stream_id": 0, "devices": [],
            "master_key": null, "self_signing_key": null});
        let (answer, dropped) = check_user_devices(&alice(), nulls).expect("nulls accepted");
        assert!(answer.devices.is_empty() && answer.master_key.is_none());
        assert!(dropped.is_empty());
    }

    #[test]
    fn user_devices_without_the_required_fields_is_refused() {
        let user = "@alice:remote.test";
        let too_many: Vec<Value> = (0..=MAX_USER_DEVICES)
            .map(|i| json!({"device_id": format!("D{i}")}))
            .collect();
        for body in [
            json!([]),
            json!({"stream_id": 1, "devices": []}),
            json!({"user_id": "@bob:remote.test", "stream_id": 1, "devices": []}),
            json!({"user_id": user, "devices": []}),
            json!({"user_id": user, "stream_id": "5", "devices": []}),
            json!({"user_id": user, "stream_id": -1, "devices": []}),
            json!({"user_id": user, "stream_id": 1.5, "devices": []}),
            json!({"user_id": user, "stream_id": 1}),
            json!({"user_id": user, "stream_id": 1, "devices": {}}),
            json!({"user_id": user, "stream_id": 1, "devices": too_many}),
        ] {
            let shown = body.to_string().chars().take(80).collect::<String>();
            assert!(check_user_devices(&alice(), body).is_err(), "{shown}");
        }
    }
}
