//! The checks on another server's answers to `/user/keys/query` and
//! `/user/keys/claim` (SPEC-E2EE §3.2, §3.3; `/user/devices` is checked in
//! `device_list_answer.rs` with the same rules and counts):
//! pure functions from what was asked and the parsed body to the validated
//! shapes of `e2ee::remote`, with a count of what was dropped and why.
//!
//! What is kept is only what was asked of that server, in the asked shape:
//! users that were asked and belong to the server; for a query naming
//! devices, only those devices; device objects whose `user_id` and
//! `device_id` equal their position and whose `keys` is an object;
//! cross-signing keys of asked users whose `user_id` matches, whose `usage`
//! names the key's role and whose `keys` is an object; per claimed device
//! at most one key, of the asked algorithm. Everything else in the body is
//! dropped, never passed on. A body that is not an object, or lacks the
//! map or field the answer is made of, is refused whole (`Err`, which the
//! caller reports as `RemoteError::BadResponse`).
//!
//! Values that are kept are moved out of the body untouched: their
//! signatures cover every field, unknown ones included. Signatures are not
//! verified here; the end-to-end client does that.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};

use crate::e2ee::remote::{RemoteClaim, RemoteClaimAnswer, RemoteQuery, RemoteQueryAnswer};
use crate::identifiers::{ServerName, UserId};

/// Why part of an answer was dropped (the metric's `reason` label).
pub mod reason {
    /// A user ID that is not of the server asked (or not a user ID).
    pub const OTHER_SERVER: &str = "other_server";
    /// A user that was not asked about.
    pub const UNASKED_USER: &str = "unasked_user";
    /// A device that was not asked about.
    pub const UNASKED_DEVICE: &str = "unasked_device";
    /// An object whose `user_id` or `device_id` differs from its position.
    pub const MISMATCHED_IDS: &str = "mismatched_ids";
    /// Not the shape the spec gives (not an object, a field missing or of
    /// the wrong type).
    pub const MALFORMED: &str = "malformed";
    /// A claimed key of another algorithm than the one asked.
    pub const WRONG_ALGORITHM: &str = "wrong_algorithm";
    /// More than one key for one claimed device: all of them are dropped.
    pub const SEVERAL_KEYS: &str = "several_keys";
    /// A device listed twice in `/user/devices`: the later ones.
    pub const DUPLICATE_DEVICE: &str = "duplicate_device";
}

/// What one check dropped, counted per reason.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped(BTreeMap<&'static str, u64>);

impl Dropped {
    pub(crate) fn add(&mut self, reason: &'static str) {
        self.add_n(reason, 1);
    }

    pub(crate) fn add_n(&mut self, reason: &'static str, n: u64) {
        *self.0.entry(reason).or_insert(0) += n;
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many items were dropped for `reason`.
    pub fn count(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Each reason with its count, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().map(|(reason, n)| (*reason, *n))
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (reason, n)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{reason}={n}")?;
        }
        Ok(())
    }
}

/// Whether `user_id` is a user ID of `server`.
pub fn belongs_to(user_id: &str, server: &ServerName) -> bool {
    UserId::parse(user_id).is_ok_and(|user| user.server_name() == server.as_str())
}

/// The validated answer to a key query of `server` for `query`.
pub fn check_query_answer(
    server: &ServerName,
    query: &RemoteQuery,
    body: Value,
) -> Result<(RemoteQueryAnswer, Dropped), String> {
    let mut top = into_object(body)?;
    let device_keys = required_map(&mut top, "device_keys")?;
    let mut dropped = Dropped::default();
    let mut answer = RemoteQueryAnswer::default();
    for (user_id, devices) in device_keys {
        let Some(asked) = query.device_keys.get(&user_id) else {
            dropped.add(unasked_user_reason(&user_id, server));
            continue;
        };
        if !belongs_to(&user_id, server) {
            dropped.add(reason::OTHER_SERVER);
            continue;
        }
        let Value::Object(devices) = devices else {
            dropped.add(reason::MALFORMED);
            continue;
        };
        let asked: BTreeSet<&str> = asked.iter().map(String::as_str).collect();
        let listed = devices.len();
        let mut kept = BTreeMap::new();
        for (device_id, keys) in devices {
            if !asked.is_empty() && !asked.contains(device_id.as_str()) {
                dropped.add(reason::UNASKED_DEVICE);
                continue;
            }
            match device_keys_fit(&keys, &user_id, &device_id) {
                Ok(()) => {
                    kept.insert(device_id, keys);
                }
                Err(why) => dropped.add(why),
            }
        }
        // A user all of whose listed devices were dropped is left out, not
        // shown without devices: a client reads "no devices" as "all of
        // them deleted" (SPEC-E2EE §7.5).
        if kept.is_empty() && listed > 0 {
            continue;
        }
        answer.device_keys.insert(user_id, kept);
    }
    let asked_user = |user_id: &str| query.device_keys.contains_key(user_id);
    answer.master_keys = cross_signing_map(
        server,
        &asked_user,
        top.remove("master_keys"),
        "master",
        &mut dropped,
    );
    answer.self_signing_keys = cross_signing_map(
        server,
        &asked_user,
        top.remove("self_signing_keys"),
        "self_signing",
        &mut dropped,
    );
    Ok((answer, dropped))
}

/// The validated answer to a key claim of `server` for `claim`.
pub fn check_claim_answer(
    server: &ServerName,
    claim: &RemoteClaim,
    body: Value,
) -> Result<(RemoteClaimAnswer, Dropped), String> {
    let mut top = into_object(body)?;
    let one_time_keys = required_map(&mut top, "one_time_keys")?;
    let mut dropped = Dropped::default();
    let mut answer = RemoteClaimAnswer::default();
    for (user_id, devices) in one_time_keys {
        let Some(asked) = claim.one_time_keys.get(&user_id) else {
            dropped.add(unasked_user_reason(&user_id, server));
            continue;
        };
        if !belongs_to(&user_id, server) {
            dropped.add(reason::OTHER_SERVER);
            continue;
        }
        let Value::Object(devices) = devices else {
            dropped.add(reason::MALFORMED);
            continue;
        };
        let mut kept = BTreeMap::new();
        for (device_id, keys) in devices {
            let Some(algorithm) = asked.get(&device_id) else {
                dropped.add(reason::UNASKED_DEVICE);
                continue;
            };
            if let Some(key) = one_claimed_key(algorithm, keys, &mut dropped) {
                kept.insert(device_id, key);
            }
        }
        if !kept.is_empty() {
            answer.one_time_keys.insert(user_id, kept);
        }
    }
    Ok((answer, dropped))
}

pub(crate) fn into_object(body: Value) -> Result<Map<String, Value>, String> {
    match body {
        Value::Object(top) => Ok(top),
        _ => Err("the body is not a JSON object".to_owned()),
    }
}

fn required_map(top: &mut Map<String, Value>, field: &str) -> Result<Map<String, Value>, String> {
    match top.remove(field) {
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(format!("`{field}` is not an object")),
        None => Err(format!("no `{field}`")),
    }
}

/// Why a user that was not asked is dropped: one of another server is
/// named as such (the worse offence), any other as unasked.
fn unasked_user_reason(user_id: &str, server: &ServerName) -> &'static str {
    if belongs_to(user_id, server) {
        reason::UNASKED_USER
    } else {
        reason::OTHER_SERVER
    }
}

/// A device keys object that sits at `[user_id][device_id]`.
pub(crate) fn device_keys_fit(
    keys: &Value,
    user_id: &str,
    device_id: &str,
) -> Result<(), &'static str> {
    let Some(object) = keys.as_object() else {
        return Err(reason::MALFORMED);
    };
    if !object.get("keys").is_some_and(Value::is_object) {
        return Err(reason::MALFORMED);
    }
    let field = |name: &str| object.get(name).and_then(Value::as_str);
    match (field("user_id"), field("device_id")) {
        (Some(u), Some(d)) if u == user_id && d == device_id => Ok(()),
        (Some(_), Some(_)) => Err(reason::MISMATCHED_IDS),
        _ => Err(reason::MALFORMED),
    }
}

/// A cross-signing key of `user_id` for `usage` (`master`, `self_signing`).
pub(crate) fn cross_signing_key_fits(
    key: &Value,
    user_id: &str,
    usage: &str,
) -> Result<(), &'static str> {
    let Some(object) = key.as_object() else {
        return Err(reason::MALFORMED);
    };
    let usage_fits = object
        .get("usage")
        .and_then(Value::as_array)
        .is_some_and(|list| list.iter().any(|u| u.as_str() == Some(usage)));
    if !usage_fits || !object.get("keys").is_some_and(Value::is_object) {
        return Err(reason::MALFORMED);
    }
    match object.get("user_id").and_then(Value::as_str) {
        Some(u) if u == user_id => Ok(()),
        Some(_) => Err(reason::MISMATCHED_IDS),
        None => Err(reason::MALFORMED),
    }
}

/// The cross-signing keys of one map of a query answer (`master_keys`,
/// `self_signing_keys`), kept for asked users of `server` only. The map is
/// optional (absent or `null`: none); one that is not an object is dropped.
fn cross_signing_map(
    server: &ServerName,
    asked_user: &dyn Fn(&str) -> bool,
    map: Option<Value>,
    usage: &str,
    dropped: &mut Dropped,
) -> BTreeMap<String, Value> {
    let mut kept = BTreeMap::new();
    let map = match map {
        None | Some(Value::Null) => return kept,
        Some(Value::Object(map)) => map,
        Some(_) => {
            dropped.add(reason::MALFORMED);
            return kept;
        }
    };
    for (user_id, key) in map {
        if !asked_user(&user_id) {
            dropped.add(unasked_user_reason(&user_id, server));
        } else if !belongs_to(&user_id, server) {
            dropped.add(reason::OTHER_SERVER);
        } else {
            match cross_signing_key_fits(&key, &user_id, usage) {
                Ok(()) => {
                    kept.insert(user_id, key);
                }
                Err(why) => dropped.add(why),
            }
        }
    }
    kept
}

/// The one key of `algorithm` in a claimed device's map, if there is
/// exactly one well-formed one; keys of other algorithms are dropped, and
/// when there are several of the asked one, all of them.
fn one_claimed_key(
    algorithm: &str,
    keys: Value,
    dropped: &mut Dropped,
) -> Option<BTreeMap<String, Value>> {
    let Value::Object(keys) = keys else {
        dropped.add(reason::MALFORMED);
        return None;
    };
    let mut fitting = BTreeMap::new();
    for (key_id, key) in keys {
        match key_id.split_once(':') {
            Some((prefix, id)) if prefix == algorithm && !id.is_empty() => {
                if one_time_key_fits(&key) {
                    fitting.insert(key_id, key);
                } else {
                    dropped.add(reason::MALFORMED);
                }
            }
            Some((prefix, _)) if prefix != algorithm => dropped.add(reason::WRONG_ALGORITHM),
            _ => dropped.add(reason::MALFORMED),
        }
    }
    if fitting.len() > 1 {
        dropped.add_n(reason::SEVERAL_KEYS, fitting.len() as u64);
        return None;
    }
    (!fitting.is_empty()).then_some(fitting)
}

/// A one-time or fallback key: a non-empty string (unsigned algorithms) or
/// a key object with a string `key` and an object `signatures`.
fn one_time_key_fits(key: &Value) -> bool {
    match key {
        Value::String(key) => !key.is_empty(),
        Value::Object(object) => {
            object.get("key").and_then(Value::as_str).is_some()
                && object.get("signatures").is_some_and(Value::is_object)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn server() -> ServerName {
        ServerName::parse("remote.test").expect("server name")
    }

    fn device(user: &str, device: &str) -> Value {
        json!({
            "user_id": user, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {format!("ed25519:{device}"): "k"},
            "signatures": {user: {format!("ed25519:{device}"): "s"}},
            "unsigned": {"device_display_name": "phone"},
        })
    }

    fn cross_signing(user: &str, usage: &str) -> Value {
        json!({"user_id": user, "usage": [usage], "keys": {"ed25519:P": "P"}})
    }

    fn query(users: &[(&str, &[&str])]) -> RemoteQuery {
        let device_keys = users
            .iter()
            .map(|(u, d)| (u.to_string(), d.iter().map(|d| d.to_string()).collect()))
            .collect();
        RemoteQuery { device_keys }
    }

    #[test]
    fn a_query_answer_keeps_only_asked_users_and_devices_of_the_server() {
        let q = query(&[("@a:remote.test", &["A1", "A2"]), ("@b:remote.test", &[])]);
        let body = json!({
            "device_keys": {
                "@a:remote.test": {
                    "A1": device("@a:remote.test", "A1"),
                    "A3": device("@a:remote.test", "A3"),
                },
                "@b:remote.test": {
                    "B1": device("@b:remote.test", "B1"),
                    "B2": device("@b:remote.test", "WRONG"),
                    "B3": device("@other:remote.test", "B3"),
                    "B4": {"user_id": "@b:remote.test", "device_id": "B4", "keys": []},
                    "B5": "not an object",
                },
                "@c:remote.test": {"C1": device("@c:remote.test", "C1")},
                "@a:elsewhere.test": {"E": device("@a:elsewhere.test", "E")},
            },
            "master_keys": {
                "@a:remote.test": cross_signing("@a:remote.test", "master"),
                "@b:remote.test": cross_signing("@x:remote.test", "master"),
                "@c:remote.test": cross_signing("@c:remote.test", "master"),
            },
            "self_signing_keys": {
                "@a:remote.test": cross_signing("@a:remote.test", "master"),
                "@b:remote.test": cross_signing("@b:remote.test", "self_signing"),
            },
            "user_signing_keys": {"@a:remote.test": cross_signing("@a:remote.test", "user_signing")},
        });
        let (answer, dropped) = check_query_answer(&server(), &q, body).expect("an answer");
        let a = &answer.device_keys["@a:remote.test"];
        assert_eq!(a.keys().collect::<Vec<_>>(), ["A1"]);
        assert_eq!(a["A1"], device("@a:remote.test", "A1"), "kept untouched");
        let b = &answer.device_keys["@b:remote.test"];
        assert_eq!(b.keys().collect::<Vec<_>>(), ["B1"]);
        assert_eq!(answer.device_keys.len(), 2);
        assert_eq!(
            answer.master_keys.keys().collect::<Vec<_>>(),
            ["@a:remote.test"]
        );
        assert_eq!(
            answer.self_signing_keys.keys().collect::<Vec<_>>(),
            ["@b:remote.test"]
        );
        assert_eq!(dropped.count(reason::UNASKED_DEVICE), 1);
        assert_eq!(dropped.count(reason::MISMATCHED_IDS), 3);
        assert_eq!(dropped.count(reason::MALFORMED), 3);
        assert_eq!(dropped.count(reason::UNASKED_USER), 2);
        assert_eq!(dropped.count(reason::OTHER_SERVER), 1);
        assert_eq!(dropped.total(), 10);
    }

    #[test]
    fn a_user_asked_of_the_wrong_server_is_dropped_even_when_asked() {
        let q = query(&[("@a:elsewhere.test", &[]), ("@n:remote.test", &[])]);
        let body = json!({"device_keys": {
            "@a:elsewhere.test": {"E": device("@a:elsewhere.test", "E")},
            "@n:remote.test": {},
        }});
        let (answer, dropped) = check_query_answer(&server(), &q, body).expect("an answer");
        assert_eq!(dropped.count(reason::OTHER_SERVER), 1);
        // A user the server says has no devices stays, without devices.
        assert_eq!(
            answer.device_keys.keys().collect::<Vec<_>>(),
            ["@n:remote.test"]
        );
        assert!(answer.device_keys["@n:remote.test"].is_empty());
    }

    #[test]
    fn a_user_whose_every_device_was_dropped_is_left_out() {
        let q = query(&[("@a:remote.test", &[])]);
        let body = json!({"device_keys": {"@a:remote.test": {"A": device("@a:remote.test", "B")}}});
        let (answer, dropped) = check_query_answer(&server(), &q, body).expect("an answer");
        assert!(answer.device_keys.is_empty());
        assert_eq!(dropped.count(reason::MISMATCHED_IDS), 1);
    }

    #[test]
    fn query_bodies_without_the_required_shape_are_refused() {
        let q = query(&[("@a:remote.test", &[])]);
        for body in [
            json!([]),
            json!("text"),
            json!({}),
            json!({"device_keys": []}),
            json!({"device_keys": null}),
        ] {
            assert!(
                check_query_answer(&server(), &q, body.clone()).is_err(),
                "{body}"
            );
        }
        let body = json!({"device_keys": {}, "master_keys": [], "self_signing_keys": null});
        let (answer, dropped) = check_query_answer(&server(), &q, body).expect("optional maps");
        assert_eq!(answer, RemoteQueryAnswer::default());
        assert_eq!(dropped.count(reason::MALFORMED), 1);
    }

    fn claim(entries: &[(&str, &str, &str)]) -> RemoteClaim {
        let mut claim = RemoteClaim::default();
        for (user, device, algorithm) in entries {
            claim
                .one_time_keys
                .entry(user.to_string())
                .or_default()
                .insert(device.to_string(), algorithm.to_string());
        }
        claim
    }

    fn signed_key() -> Value {
        json!({"key": "K", "signatures": {"@a:remote.test": {"ed25519:A1": "s"}}})
    }

    #[test]
    fn a_claim_answer_keeps_one_key_of_the_asked_algorithm_per_asked_device() {
        let c = claim(&[
            ("@a:remote.test", "A1", "signed_curve25519"),
            ("@a:remote.test", "A2", "signed_curve25519"),
            ("@a:remote.test", "A3", "signed_curve25519"),
            ("@a:remote.test", "A4", "curve25519"),
        ]);
        let body = json!({"one_time_keys": {
            "@a:remote.test": {
                "A1": {"signed_curve25519:AAAA": signed_key(), "curve25519:X": "x"},
                "A2": {"signed_curve25519:1": signed_key(), "signed_curve25519:2": signed_key()},
                "A3": {"signed_curve25519:1": {"key": 5}, "nocolon": "x"},
                "A4": {"curve25519:Z": "z"},
                "A5": {"signed_curve25519:1": signed_key()},
            },
            "@b:remote.test": {"B": {"signed_curve25519:1": signed_key()}},
            "@a:elsewhere.test": {"E": {"signed_curve25519:1": signed_key()}},
        }});
        let (answer, dropped) = check_claim_answer(&server(), &c, body).expect("an answer");
        let a = &answer.one_time_keys["@a:remote.test"];
        assert_eq!(a.keys().collect::<Vec<_>>(), ["A1", "A4"]);
        assert_eq!(a["A1"]["signed_curve25519:AAAA"], signed_key());
        assert_eq!(a["A1"].len(), 1);
        assert_eq!(a["A4"]["curve25519:Z"], "z");
        assert_eq!(answer.one_time_keys.len(), 1);
        assert_eq!(dropped.count(reason::WRONG_ALGORITHM), 1);
        assert_eq!(dropped.count(reason::SEVERAL_KEYS), 2);
        assert_eq!(dropped.count(reason::MALFORMED), 2);
        assert_eq!(dropped.count(reason::UNASKED_DEVICE), 1);
        assert_eq!(dropped.count(reason::UNASKED_USER), 1);
        assert_eq!(dropped.count(reason::OTHER_SERVER), 1);
        for body in [json!(7), json!({}), json!({"one_time_keys": "x"})] {
            assert!(
                check_claim_answer(&server(), &c, body.clone()).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn dropped_counts_render_in_reason_order() {
        let mut dropped = Dropped::default();
        dropped.add(reason::UNASKED_USER);
        dropped.add_n(reason::MALFORMED, 2);
        assert_eq!(dropped.to_string(), "malformed=2, unasked_user=1");
        assert_eq!(dropped.total(), 3);
    }
}
