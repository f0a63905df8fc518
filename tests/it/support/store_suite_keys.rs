//! The backend-generic conformance cases of `courier::store::KeyStore` (the
//! E2EE device plane): key uploads, counts, claims, key queries, signatures,
//! cross-signing keys, display names, device deletion and the device-list
//! change log. Like `store_suite`, each case takes a [`Harness`] with a
//! fresh store; a backend's test module expands `store_key_conformance_tests!`
//! with its constructor to get one `#[tokio::test]` per case.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use courier::store::keys::{
    ClaimWanted, ClaimedKey, CrossSigningKind, DeviceQuery, KeyCounts, KeysUpload,
    NewCrossSigningKey, NewKey, StoredSignature, UploadOutcome, UploadedDeviceKeys, UserDevices,
};
use courier::store::{Retention, Store};
use serde_json::json;

use super::store_suite::{Harness, send};

/// Expands to one `#[tokio::test]` per key-store case; the forms are those
/// of `store_conformance_tests!` (`optional` for a constructor returning
/// `Option<Harness>`).
#[allow(unused_macros)]
macro_rules! store_key_conformance_tests {
    ($make:path) => {
        store_key_conformance_tests!(@list [] $make);
    };
    (optional $make:path) => {
        store_key_conformance_tests!(@list [optional] $make);
    };
    (@list [$($opt:ident)?] $make:path) => {
        store_key_conformance_tests!(@cases [$($opt)?] $make;
            upload_then_identical_upload_changes_nothing,
            upload_for_an_unknown_device_writes_nothing,
            identity_change_is_refused_and_writes_nothing,
            one_time_key_conflict_is_refused_and_writes_nothing,
            claims_follow_upload_order_not_key_id_order,
            fallback_key_after_exhaustion,
            a_claimed_key_uploaded_again_is_never_handed_out,
            claims_for_missing_keys_get_nothing,
            user_devices_with_and_without_device_lists,
            signatures_are_merged_per_target,
            cross_signing_keys_are_replaced,
            display_names_are_set_and_cleared,
            delete_devices_removes_everything,
            store_delete_device_removes_keys_too,
            change_log_positions_and_stream_ids,
            reopen_keeps_every_key,
            concurrent_claims_hand_out_each_key_once,
            claimed_key_tombstones_expire,
            sync_read_answers_as_its_three_reads_do,
        );
    };
    (@cases [] $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make().await;
                $crate::support::store_suite_keys::$case(&harness).await;
                drop(harness);
            }
        )+
    };
    (@cases [optional] $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $make().await else { return };
                $crate::support::store_suite_keys::$case(&harness).await;
                drop(harness);
            }
        )+
    };
}

const NOW: i64 = 1_700_000_000_000;
const ALICE: &str = "@alice:local.test";
const BOB: &str = "@bob:local.test";
const OTK: &str = "signed_curve25519";

fn device_keys(user: &str, device: &str, ed25519: &str) -> UploadedDeviceKeys {
    let keys = json!({
        format!("curve25519:{device}"): format!("curve-{ed25519}"),
        format!("ed25519:{device}"): ed25519,
    });
    // A real upload's JSON, with a field the store must keep untouched.
    let object = json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": keys,
        "signatures": { user: { format!("ed25519:{device}"): "sig" } },
        "org.example.unknown": { "kept": true },
    });
    UploadedDeviceKeys {
        json: object.to_string(),
        identity: keys.to_string(),
    }
}

fn otk(key_id: &str, value: &str) -> NewKey {
    NewKey {
        algorithm: OTK.to_owned(),
        key_id: key_id.to_owned(),
        key_json: json!({ "key": value, "signatures": {} }).to_string(),
    }
}

fn fallback(key_id: &str, value: &str) -> NewKey {
    NewKey {
        algorithm: OTK.to_owned(),
        key_id: key_id.to_owned(),
        key_json: json!({ "key": value, "fallback": true }).to_string(),
    }
}

fn upload(user: &str, device: &str) -> KeysUpload {
    KeysUpload {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
        device_keys: None,
        one_time_keys: vec![],
        fallback_keys: vec![],
        now_ms: NOW,
    }
}

fn stored(counts: &[(&str, u64)], device_list_changed: bool) -> UploadOutcome {
    UploadOutcome::Stored {
        one_time_key_counts: counts.iter().map(|(a, n)| ((*a).to_owned(), *n)).collect(),
        device_list_changed,
    }
}

fn wanted(user: &str, device: &str) -> ClaimWanted {
    ClaimWanted {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
        algorithm: OTK.to_owned(),
    }
}

fn all_devices(user: &str) -> DeviceQuery {
    DeviceQuery {
        user_id: user.to_owned(),
        device_ids: vec![],
    }
}

async fn register(store: &dyn Store, user: &str, ids: &[&str]) {
    for id in ids {
        store.upsert_device(user, id, None).await.expect("device");
    }
}

async fn up(store: &dyn Store, upload: KeysUpload) -> UploadOutcome {
    store.upload_keys(upload).await.expect("upload")
}

async fn claim_one(store: &dyn Store, user: &str, device: &str) -> Option<ClaimedKey> {
    let mut got = store
        .claim_keys(vec![wanted(user, device)], NOW)
        .await
        .expect("claim");
    assert!(got.len() <= 1, "one wanted entry, at most one key: {got:?}");
    got.pop()
}

async fn one_user(store: &dyn Store, query: DeviceQuery) -> UserDevices {
    let mut answer = store.user_devices(vec![query]).await.expect("query");
    assert_eq!(answer.len(), 1);
    answer.remove(0)
}

async fn counts(store: &dyn Store, user: &str, device: &str) -> KeyCounts {
    store.key_counts(user, device).await.expect("counts")
}

async fn stream_id(store: &dyn Store, user: &str) -> i64 {
    one_user(store, all_devices(user)).await.stream_id
}

async fn position(store: &dyn Store) -> i64 {
    store.device_list_position().await.expect("position")
}

fn signature(target_user: &str, target: &str, signer_key: &str, sig: &str) -> StoredSignature {
    StoredSignature {
        target_user_id: target_user.to_owned(),
        target_key_id: target.to_owned(),
        signer_user_id: BOB.to_owned(),
        signer_key_id: format!("ed25519:{signer_key}"),
        signature: sig.to_owned(),
    }
}

fn cross_key(kind: CrossSigningKind, public_key: &str) -> NewCrossSigningKey {
    NewCrossSigningKey {
        kind,
        public_key: public_key.to_owned(),
        key_json: json!({
            "user_id": ALICE,
            "usage": [kind.as_str()],
            "keys": { format!("ed25519:{public_key}"): public_key },
        })
        .to_string(),
    }
}

// --- cases ----------------------------------------------------------------------

pub async fn upload_then_identical_upload_changes_nothing(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let keys = device_keys(ALICE, "A", "ed-a");
    let full = KeysUpload {
        device_keys: Some(keys.clone()),
        one_time_keys: vec![otk("k1", "v1"), otk("k2", "v2"), otk("k3", "v3")],
        fallback_keys: vec![fallback("f1", "fv1")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, full.clone()).await, stored(&[(OTK, 3)], true));
    let position_after_first = position(s).await;
    assert_eq!(stream_id(s, ALICE).await, 1);
    // The same upload again (a client retry): same counts, no change logged.
    assert_eq!(up(s, full).await, stored(&[(OTK, 3)], false));
    assert_eq!(position(s).await, position_after_first);
    assert_eq!(stream_id(s, ALICE).await, 1);
    let c = counts(s, ALICE, "A").await;
    assert_eq!(c.one_time, BTreeMap::from([(OTK.to_owned(), 3)]));
    assert_eq!(c.unused_fallback, vec![OTK.to_owned()]);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices.len(), 1);
    assert_eq!(
        user.devices[0].keys_json.as_deref(),
        Some(keys.json.as_str()),
        "device keys come back as uploaded, byte for byte"
    );
    // An upload with only one-time keys adds to them.
    let more = KeysUpload {
        one_time_keys: vec![otk("k4", "v4")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, more).await, stored(&[(OTK, 4)], false));
    // Same identity, other JSON (new algorithms list): stored, a change.
    let mut renewed = device_keys(ALICE, "A", "ed-a");
    renewed.json = renewed.json.replace("aes-sha2", "aes-sha2-v2");
    let again = KeysUpload {
        device_keys: Some(renewed.clone()),
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, again).await, stored(&[(OTK, 4)], true));
    assert_eq!(stream_id(s, ALICE).await, 2);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(
        user.devices[0].keys_json.as_deref(),
        Some(renewed.json.as_str())
    );
}

pub async fn upload_for_an_unknown_device_writes_nothing(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let ghost = KeysUpload {
        device_keys: Some(device_keys(ALICE, "GHOST", "ed-g")),
        one_time_keys: vec![otk("k1", "v1")],
        fallback_keys: vec![fallback("f1", "fv1")],
        ..upload(ALICE, "GHOST")
    };
    assert_eq!(up(s, ghost).await, UploadOutcome::UnknownDevice);
    // Another user's device of the same ID is no help either.
    let bob = KeysUpload {
        one_time_keys: vec![otk("k1", "v1")],
        ..upload(BOB, "A")
    };
    assert_eq!(up(s, bob).await, UploadOutcome::UnknownDevice);
    assert_eq!(counts(s, ALICE, "GHOST").await, KeyCounts::default());
    assert_eq!(counts(s, BOB, "A").await, KeyCounts::default());
    assert_eq!(claim_one(s, ALICE, "GHOST").await, None);
    assert_eq!(position(s).await, 0);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices.len(), 1);
    assert_eq!(user.devices[0].keys_json, None);
}

pub async fn identity_change_is_refused_and_writes_nothing(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let first = device_keys(ALICE, "A", "ed-a");
    let initial = KeysUpload {
        device_keys: Some(first.clone()),
        one_time_keys: vec![otk("k1", "v1")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, initial).await, stored(&[(OTK, 1)], true));
    let before = position(s).await;
    let changed = KeysUpload {
        device_keys: Some(device_keys(ALICE, "A", "ed-other")),
        one_time_keys: vec![otk("k2", "v2")],
        fallback_keys: vec![fallback("f1", "fv1")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, changed).await, UploadOutcome::IdentityChanged);
    // Nothing of the refused upload was written.
    let c = counts(s, ALICE, "A").await;
    assert_eq!(c.one_time, BTreeMap::from([(OTK.to_owned(), 1)]));
    assert!(c.unused_fallback.is_empty());
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(
        user.devices[0].keys_json.as_deref(),
        Some(first.json.as_str())
    );
    assert_eq!(user.stream_id, 1);
    assert_eq!(position(s).await, before);
    assert_eq!(
        claim_one(s, ALICE, "A").await.map(|k| k.key_id),
        Some("k1".into())
    );
}

pub async fn one_time_key_conflict_is_refused_and_writes_nothing(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let first = KeysUpload {
        one_time_keys: vec![otk("k1", "v1")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, first).await, stored(&[(OTK, 1)], false));
    let conflicting = KeysUpload {
        device_keys: Some(device_keys(ALICE, "A", "ed-a")),
        one_time_keys: vec![otk("k0", "v0"), otk("k1", "another value")],
        fallback_keys: vec![fallback("f1", "fv1")],
        ..upload(ALICE, "A")
    };
    assert_eq!(
        up(s, conflicting).await,
        UploadOutcome::OneTimeKeyConflict {
            algorithm: OTK.to_owned(),
            key_id: "k1".to_owned()
        }
    );
    // One key listed twice with two values in one upload is a conflict too.
    let twice = KeysUpload {
        one_time_keys: vec![otk("k5", "a"), otk("k5", "b")],
        ..upload(ALICE, "A")
    };
    assert!(matches!(
        up(s, twice).await,
        UploadOutcome::OneTimeKeyConflict { key_id, .. } if key_id == "k5"
    ));
    // All or nothing: k0, k5, the fallback and the device keys are absent.
    let c = counts(s, ALICE, "A").await;
    assert_eq!(c.one_time, BTreeMap::from([(OTK.to_owned(), 1)]));
    assert!(c.unused_fallback.is_empty());
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices[0].keys_json, None);
    assert_eq!(user.stream_id, 0);
    let k = claim_one(s, ALICE, "A").await.expect("k1");
    assert_eq!((k.key_id.as_str(), k.fallback), ("k1", false));
    assert_eq!(k.key_json, otk("k1", "v1").key_json);
    assert_eq!(claim_one(s, ALICE, "A").await, None);
    // The same key listed twice with one value is just stored once.
    let dup = KeysUpload {
        one_time_keys: vec![otk("k6", "x"), otk("k6", "x")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, dup).await, stored(&[(OTK, 1)], false));
}

pub async fn claims_follow_upload_order_not_key_id_order(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    let ids = ["AAAAAc", "AAAAAa", "AAAAAd", "AAAAAb"];
    let first = KeysUpload {
        one_time_keys: ids.iter().take(3).map(|id| otk(id, id)).collect(),
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, first).await, stored(&[(OTK, 3)], false));
    let second = KeysUpload {
        one_time_keys: vec![otk(ids[3], ids[3])],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, second).await, stored(&[(OTK, 4)], false));
    // Another device's keys and another algorithm do not interleave.
    let other = KeysUpload {
        one_time_keys: vec![otk("AAAAA0", "b0")],
        ..upload(ALICE, "B")
    };
    up(s, other).await;
    let curve = KeysUpload {
        one_time_keys: vec![NewKey {
            algorithm: "curve25519".to_owned(),
            key_id: "AAAAA0".to_owned(),
            key_json: "\"unsigned\"".to_owned(),
        }],
        ..upload(ALICE, "A")
    };
    assert_eq!(
        up(s, curve).await,
        stored(&[("curve25519", 1), (OTK, 4)], false)
    );
    let mut order = Vec::new();
    while let Some(k) = claim_one(s, ALICE, "A").await {
        assert!(!k.fallback);
        assert_eq!(k.key_json, otk(&k.key_id, &k.key_id).key_json);
        order.push(k.key_id);
    }
    assert_eq!(order, ids);
    assert_eq!(
        counts(s, ALICE, "A").await.one_time,
        BTreeMap::from([("curve25519".to_owned(), 1)])
    );
    assert_eq!(counts(s, ALICE, "B").await.one_time.get(OTK), Some(&1));
    // One claim may want several devices; it answers each.
    let both = s
        .claim_keys(
            vec![
                wanted(ALICE, "B"),
                ClaimWanted {
                    algorithm: "curve25519".to_owned(),
                    ..wanted(ALICE, "A")
                },
            ],
            NOW,
        )
        .await
        .expect("claim");
    let got: Vec<(&str, &str)> = both
        .iter()
        .map(|k| (k.device_id.as_str(), k.algorithm.as_str()))
        .collect();
    assert_eq!(got, vec![("B", OTK), ("A", "curve25519")]);
    assert_eq!(both[1].key_json, "\"unsigned\"");
}

pub async fn fallback_key_after_exhaustion(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let first = KeysUpload {
        one_time_keys: vec![otk("k1", "v1")],
        fallback_keys: vec![fallback("f1", "fv1")],
        ..upload(ALICE, "A")
    };
    up(s, first.clone()).await;
    assert_eq!(counts(s, ALICE, "A").await.unused_fallback, vec![OTK]);
    let k = claim_one(s, ALICE, "A").await.expect("one-time key");
    assert_eq!((k.key_id.as_str(), k.fallback), ("k1", false));
    assert_eq!(counts(s, ALICE, "A").await.unused_fallback, vec![OTK]);
    // None left: the fallback key, which stays (marked used).
    for _ in 0..2 {
        let f = claim_one(s, ALICE, "A").await.expect("fallback key");
        assert_eq!((f.key_id.as_str(), f.fallback), ("f1", true));
        assert_eq!(f.key_json, fallback("f1", "fv1").key_json);
    }
    assert!(counts(s, ALICE, "A").await.unused_fallback.is_empty());
    // The identical fallback key again keeps its used flag.
    let again = KeysUpload {
        one_time_keys: vec![],
        ..first
    };
    up(s, again).await;
    assert!(counts(s, ALICE, "A").await.unused_fallback.is_empty());
    // A new fallback key is unused and replaces the old one.
    let fresh = KeysUpload {
        fallback_keys: vec![fallback("f2", "fv2")],
        ..upload(ALICE, "A")
    };
    up(s, fresh).await;
    assert_eq!(counts(s, ALICE, "A").await.unused_fallback, vec![OTK]);
    let f = claim_one(s, ALICE, "A").await.expect("fallback key");
    assert_eq!((f.key_id.as_str(), f.fallback), ("f2", true));
    // One-time keys uploaded later are handed out before the fallback key.
    let more = KeysUpload {
        one_time_keys: vec![otk("k2", "v2")],
        ..upload(ALICE, "A")
    };
    up(s, more).await;
    let k = claim_one(s, ALICE, "A").await.expect("one-time key");
    assert_eq!((k.key_id.as_str(), k.fallback), ("k2", false));
}

pub async fn a_claimed_key_uploaded_again_is_never_handed_out(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let keys = KeysUpload {
        one_time_keys: vec![otk("k1", "v1"), otk("k2", "v2")],
        ..upload(ALICE, "A")
    };
    up(s, keys.clone()).await;
    let k1 = claim_one(s, ALICE, "A").await.expect("k1");
    assert_eq!(k1.key_id, "k1");
    // The client did not see its upload answered and retries it: k1 is
    // accepted but not stored again; k2 is still there once.
    assert_eq!(up(s, keys).await, stored(&[(OTK, 1)], false));
    // Even with another value, the claimed ID is accepted and ignored.
    let other_value = KeysUpload {
        one_time_keys: vec![otk("k1", "something else")],
        ..upload(ALICE, "A")
    };
    assert_eq!(up(s, other_value).await, stored(&[(OTK, 1)], false));
    assert_eq!(
        claim_one(s, ALICE, "A").await.map(|k| k.key_id),
        Some("k2".into())
    );
    assert_eq!(claim_one(s, ALICE, "A").await, None);
    assert_eq!(counts(s, ALICE, "A").await, KeyCounts::default());
}

pub async fn claims_for_missing_keys_get_nothing(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "EMPTY"]).await;
    up(
        s,
        KeysUpload {
            one_time_keys: vec![otk("k1", "v1")],
            ..upload(ALICE, "A")
        },
    )
    .await;
    let got = s
        .claim_keys(
            vec![
                wanted(ALICE, "EMPTY"),
                wanted(ALICE, "NOPE"),
                wanted(BOB, "A"),
                ClaimWanted {
                    algorithm: "curve25519".to_owned(),
                    ..wanted(ALICE, "A")
                },
                wanted(ALICE, "A"),
            ],
            NOW,
        )
        .await
        .expect("claim");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].device_id.as_str(), got[0].key_id.as_str()),
        ("A", "k1")
    );
    assert!(s.claim_keys(vec![], NOW).await.expect("claim").is_empty());
}

pub async fn user_devices_with_and_without_device_lists(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["C", "A", "B"]).await;
    register(s, BOB, &["A"]).await;
    let keys_a = device_keys(ALICE, "A", "ed-a");
    up(
        s,
        KeysUpload {
            device_keys: Some(keys_a.clone()),
            ..upload(ALICE, "A")
        },
    )
    .await;
    let all = one_user(s, all_devices(ALICE)).await;
    let ids: Vec<&str> = all.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["A", "B", "C"]);
    assert_eq!(
        all.devices[0].keys_json.as_deref(),
        Some(keys_a.json.as_str())
    );
    assert_eq!(all.devices[1].keys_json, None);
    assert_eq!(all.user_id, ALICE);
    assert_eq!(all.stream_id, 1);
    assert!(all.cross_signing.is_empty());
    // Wanted devices: sorted, unknown ones absent, duplicates once.
    let some = one_user(
        s,
        DeviceQuery {
            user_id: ALICE.to_owned(),
            device_ids: vec!["C".into(), "ZZZ".into(), "A".into(), "C".into()],
        },
    )
    .await;
    let ids: Vec<&str> = some.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["A", "C"]);
    // Several users in the order asked; one with nothing gets an empty entry.
    let answer = s
        .user_devices(vec![
            all_devices("@nobody:local.test"),
            all_devices(BOB),
            DeviceQuery {
                user_id: ALICE.to_owned(),
                device_ids: vec!["ZZZ".into()],
            },
        ])
        .await
        .expect("query");
    let users: Vec<&str> = answer.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(users, ["@nobody:local.test", BOB, ALICE]);
    assert!(answer[0].devices.is_empty() && answer[0].cross_signing.is_empty());
    assert_eq!(answer[0].stream_id, 0);
    assert_eq!(answer[1].devices.len(), 1);
    assert_eq!(
        answer[1].devices[0].keys_json, None,
        "Bob's A is not Alice's A"
    );
    assert!(answer[2].devices.is_empty());
    assert_eq!(answer[2].stream_id, 1);
    assert!(s.user_devices(vec![]).await.expect("query").is_empty());
}

pub async fn signatures_are_merged_per_target(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    s.put_cross_signing_keys(ALICE, vec![cross_key(CrossSigningKind::Master, "MPK")], NOW)
        .await
        .expect("cross-signing");
    assert_eq!(stream_id(s, ALICE).await, 1);
    let on_a = signature(ALICE, "A", "BOBDEV", "sig-a");
    let on_a2 = signature(ALICE, "A", "BOBUSK", "sig-a2");
    let on_master = signature(ALICE, "MPK", "BOBUSK", "sig-m");
    s.put_signatures(vec![on_a.clone(), on_master.clone(), on_a2.clone()], NOW)
        .await
        .expect("signatures");
    // One change for device A and one for the cross-signing keys.
    assert_eq!(stream_id(s, ALICE).await, 3);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(
        user.devices[0].signatures,
        vec![on_a.clone(), on_a2.clone()]
    );
    assert!(user.devices[1].signatures.is_empty());
    assert_eq!(user.cross_signing[0].signatures, vec![on_master.clone()]);
    // The identical signature again is skipped and logs nothing.
    s.put_signatures(vec![on_a.clone()], NOW)
        .await
        .expect("signatures");
    assert_eq!(stream_id(s, ALICE).await, 3);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices[0].signatures.len(), 2);
    // A new signature by the same key replaces the old one in its place.
    let renewed = signature(ALICE, "A", "BOBDEV", "sig-a-new");
    s.put_signatures(vec![renewed.clone()], NOW)
        .await
        .expect("signatures");
    assert_eq!(stream_id(s, ALICE).await, 4);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices[0].signatures, vec![renewed, on_a2]);
    // A query for Bob sees none of Alice's signatures.
    register(s, BOB, &["BOBDEV"]).await;
    let bob = one_user(s, all_devices(BOB)).await;
    assert!(bob.devices[0].signatures.is_empty());
}

pub async fn cross_signing_keys_are_replaced(harness: &Harness) {
    let s = &*harness.store;
    let user_signing = cross_key(CrossSigningKind::UserSigning, "UPK");
    let master = cross_key(CrossSigningKind::Master, "MPK");
    let self_signing = cross_key(CrossSigningKind::SelfSigning, "SPK");
    s.put_cross_signing_keys(
        ALICE,
        vec![user_signing.clone(), master.clone(), self_signing.clone()],
        NOW,
    )
    .await
    .expect("cross-signing");
    // One change for the three keys.
    assert_eq!(stream_id(s, ALICE).await, 1);
    let user = one_user(s, all_devices(ALICE)).await;
    let kinds: Vec<CrossSigningKind> = user.cross_signing.iter().map(|k| k.kind).collect();
    assert_eq!(
        kinds,
        [
            CrossSigningKind::Master,
            CrossSigningKind::SelfSigning,
            CrossSigningKind::UserSigning
        ]
    );
    assert_eq!(user.cross_signing[0].public_key, "MPK");
    assert_eq!(user.cross_signing[0].key_json, master.key_json);
    assert_eq!(user.cross_signing[2].key_json, user_signing.key_json);
    s.put_signatures(vec![signature(ALICE, "MPK", "BOBUSK", "sig")], NOW)
        .await
        .expect("signature");
    // A new master key replaces the old one; the old one's signatures go.
    let new_master = cross_key(CrossSigningKind::Master, "MPK2");
    s.put_cross_signing_keys(ALICE, vec![new_master.clone()], NOW)
        .await
        .expect("cross-signing");
    assert_eq!(stream_id(s, ALICE).await, 3);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.cross_signing.len(), 3);
    assert_eq!(user.cross_signing[0].public_key, "MPK2");
    assert_eq!(user.cross_signing[0].key_json, new_master.key_json);
    assert!(user.cross_signing[0].signatures.is_empty());
    assert_eq!(user.cross_signing[1].key_json, self_signing.key_json);
    // Bob has none; Alice's are not his.
    assert!(one_user(s, all_devices(BOB)).await.cross_signing.is_empty());
}

pub async fn display_names_are_set_and_cleared(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    assert!(
        s.set_display_name(ALICE, "A", Some("Alice's phone"), NOW)
            .await
            .expect("set")
    );
    assert_eq!(stream_id(s, ALICE).await, 1);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(
        user.devices[0].display_name.as_deref(),
        Some("Alice's phone")
    );
    assert!(
        s.set_display_name(ALICE, "A", Some("Laptop"), NOW)
            .await
            .expect("set")
    );
    assert_eq!(stream_id(s, ALICE).await, 2);
    assert!(
        s.set_display_name(ALICE, "A", None, NOW)
            .await
            .expect("clear")
    );
    assert_eq!(stream_id(s, ALICE).await, 3);
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices[0].display_name, None);
    // Unknown devices: false, nothing logged.
    assert!(
        !s.set_display_name(ALICE, "NOPE", Some("x"), NOW)
            .await
            .expect("set")
    );
    assert!(
        !s.set_display_name(BOB, "A", Some("x"), NOW)
            .await
            .expect("set")
    );
    assert_eq!(position(s).await, 3);
    // Re-registering a device keeps its name.
    s.set_display_name(ALICE, "A", Some("Phone"), NOW)
        .await
        .expect("set");
    s.upsert_device(ALICE, "A", Some("tok"))
        .await
        .expect("device");
    let user = one_user(s, all_devices(ALICE)).await;
    assert_eq!(user.devices[0].display_name.as_deref(), Some("Phone"));
}

/// Gives device `device` of Alice everything a device can have.
async fn furnish(s: &dyn Store, device: &str) {
    s.upsert_device(ALICE, device, Some(&format!("tok-{device}")))
        .await
        .expect("device");
    up(
        s,
        KeysUpload {
            device_keys: Some(device_keys(ALICE, device, &format!("ed-{device}"))),
            one_time_keys: vec![otk("k1", "v1"), otk("k2", "v2")],
            fallback_keys: vec![fallback("f1", "fv1")],
            ..upload(ALICE, device)
        },
    )
    .await;
    // k1 claimed: a tombstone.
    claim_one(s, ALICE, device).await.expect("claim");
    s.put_signatures(vec![signature(ALICE, device, "BOBDEV", "sig")], NOW)
        .await
        .expect("signature");
    s.set_display_name(ALICE, device, Some("name"), NOW)
        .await
        .expect("name");
    s.enqueue_send(send(&format!("t-{device}"), ALICE, device, 1))
        .await
        .expect("send");
}

/// Asserts that device `device` of Alice left nothing behind, and that a
/// device registered again under its ID starts empty (old key IDs can be
/// uploaded and claimed again: a new account reuses them).
async fn assert_gone(s: &dyn Store, device: &str) {
    assert_eq!(
        s.lookup_token(&format!("tok-{device}"))
            .await
            .expect("token"),
        None
    );
    assert_eq!(counts(s, ALICE, device).await, KeyCounts::default());
    assert_eq!(claim_one(s, ALICE, device).await, None);
    let user = one_user(
        s,
        DeviceQuery {
            user_id: ALICE.to_owned(),
            device_ids: vec![device.to_owned()],
        },
    )
    .await;
    assert!(user.devices.is_empty());
    s.upsert_device(ALICE, device, None).await.expect("device");
    let page = s.fetch_inbox(ALICE, device, 0, 10).await.expect("inbox");
    assert!(page.messages.is_empty(), "the inbox went with the device");
    let user = one_user(
        s,
        DeviceQuery {
            user_id: ALICE.to_owned(),
            device_ids: vec![device.to_owned()],
        },
    )
    .await;
    assert_eq!(user.devices[0].keys_json, None);
    assert_eq!(user.devices[0].display_name, None);
    assert!(user.devices[0].signatures.is_empty());
    let fresh = KeysUpload {
        device_keys: Some(device_keys(ALICE, device, "a new account")),
        one_time_keys: vec![otk("k1", "new v1")],
        ..upload(ALICE, device)
    };
    assert_eq!(up(s, fresh).await, stored(&[(OTK, 1)], true));
    let k = claim_one(s, ALICE, device).await.expect("new k1");
    assert_eq!(k.key_json, otk("k1", "new v1").key_json);
}

pub async fn delete_devices_removes_everything(harness: &Harness) {
    let s = &*harness.store;
    furnish(s, "A").await;
    furnish(s, "B").await;
    furnish(s, "KEEP").await;
    let before = stream_id(s, ALICE).await;
    let deleted = s
        .delete_devices(
            ALICE,
            &[
                "B".to_owned(),
                "NOPE".to_owned(),
                "A".to_owned(),
                "B".to_owned(),
            ],
            NOW,
        )
        .await
        .expect("delete");
    assert_eq!(deleted, ["B", "A"]);
    // One change per deleted device.
    assert_eq!(stream_id(s, ALICE).await, before + 2);
    let user = one_user(s, all_devices(ALICE)).await;
    let ids: Vec<&str> = user.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["KEEP"]);
    assert!(user.devices[0].keys_json.is_some());
    assert_eq!(user.devices[0].signatures.len(), 1);
    assert_eq!(counts(s, ALICE, "KEEP").await.one_time.get(OTK), Some(&1));
    assert!(
        s.delete_devices(ALICE, &["NOPE".to_owned()], NOW)
            .await
            .expect("delete")
            .is_empty()
    );
    assert_eq!(stream_id(s, ALICE).await, before + 2);
    assert_gone(s, "A").await;
    assert_gone(s, "B").await;
}

pub async fn store_delete_device_removes_keys_too(harness: &Harness) {
    let s = &*harness.store;
    furnish(s, "A").await;
    let before = stream_id(s, ALICE).await;
    let position_before = position(s).await;
    assert!(s.delete_device(ALICE, "A").await.expect("delete"));
    assert_eq!(stream_id(s, ALICE).await, before + 1);
    assert_eq!(position(s).await, position_before + 1);
    assert!(!s.delete_device(ALICE, "A").await.expect("delete"));
    assert_eq!(position(s).await, position_before + 1);
    assert_gone(s, "A").await;
}

pub async fn change_log_positions_and_stream_ids(harness: &Harness) {
    let s = &*harness.store;
    assert_eq!(position(s).await, 0);
    register(s, ALICE, &["A", "B"]).await;
    register(s, BOB, &["X"]).await;
    // Registering a device logs nothing by itself (its keys do).
    assert_eq!(position(s).await, 0);
    let mut positions = vec![];
    let mut changes: Vec<(&str, i64)> = vec![];
    let steps: Vec<(&str, &str)> = vec![(ALICE, "A"), (BOB, "X"), (ALICE, "B"), (ALICE, "A")];
    for (n, (user, device)) in steps.iter().enumerate() {
        s.set_display_name(user, device, Some(&format!("name {n}")), NOW)
            .await
            .expect("set");
        positions.push(position(s).await);
        changes.push((user, stream_id(s, user).await));
    }
    // The global position grows by one per change, from 1.
    assert_eq!(positions, [1, 2, 3, 4]);
    // The per-user stream_id grows by one per change of that user.
    assert_eq!(changes, [(ALICE, 1), (BOB, 1), (ALICE, 2), (ALICE, 3)]);
    let users = vec![
        BOB.to_owned(),
        ALICE.to_owned(),
        "@nobody:local.test".to_owned(),
    ];
    let window = |after, up_to| {
        let users = users.clone();
        async move {
            s.users_with_changes(users, after, up_to)
                .await
                .expect("changes")
                .users
        }
    };
    assert_eq!(window(0, 4).await, [ALICE, BOB]);
    assert_eq!(
        window(1, 2).await,
        [BOB],
        "after is exclusive, up_to inclusive"
    );
    assert_eq!(window(2, 4).await, [ALICE]);
    assert_eq!(window(0, 1).await, [ALICE]);
    assert!(window(4, 10).await.is_empty());
    assert!(window(3, 3).await.is_empty());
    // Only the users asked about are reported (and each once).
    let only_bob = s
        .users_with_changes(vec![BOB.to_owned(), BOB.to_owned()], 0, 4)
        .await
        .expect("changes");
    assert_eq!(only_bob.users, [BOB]);
    // Every kind of change counts once: keys, cross-signing, signatures,
    // deletion.
    up(
        s,
        KeysUpload {
            device_keys: Some(device_keys(BOB, "X", "ed-x")),
            ..upload(BOB, "X")
        },
    )
    .await;
    s.put_cross_signing_keys(BOB, vec![cross_key(CrossSigningKind::Master, "BM")], NOW)
        .await
        .expect("cross-signing");
    s.put_signatures(vec![signature(BOB, "X", "BOBUSK", "s")], NOW)
        .await
        .expect("signature");
    s.delete_devices(BOB, &["X".to_owned()], NOW)
        .await
        .expect("delete");
    assert_eq!(position(s).await, 8);
    assert_eq!(stream_id(s, BOB).await, 5);
    assert_eq!(window(4, 8).await, [BOB]);
}

pub async fn reopen_keeps_every_key(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    register(s, ALICE, &["A"]).await;
    let keys = device_keys(ALICE, "A", "ed-a");
    up(
        s,
        KeysUpload {
            device_keys: Some(keys.clone()),
            one_time_keys: vec![otk("k2", "v2"), otk("k1", "v1"), otk("k3", "v3")],
            fallback_keys: vec![fallback("f1", "fv1")],
            ..upload(ALICE, "A")
        },
    )
    .await;
    assert_eq!(
        claim_one(s, ALICE, "A").await.map(|k| k.key_id),
        Some("k2".into())
    );
    s.put_cross_signing_keys(ALICE, vec![cross_key(CrossSigningKind::Master, "MPK")], NOW)
        .await
        .expect("cross-signing");
    s.put_signatures(vec![signature(ALICE, "A", "BOBDEV", "sig")], NOW)
        .await
        .expect("signature");
    s.set_display_name(ALICE, "A", Some("phone"), NOW)
        .await
        .expect("name");
    let before = one_user(s, all_devices(ALICE)).await;
    let position_before = position(s).await;
    store.close().await.expect("close");
    drop(store);

    let store = (harness.reopen)().await;
    let s = &*store;
    assert_eq!(one_user(s, all_devices(ALICE)).await, before);
    assert_eq!(position(s).await, position_before);
    assert_eq!(counts(s, ALICE, "A").await.one_time.get(OTK), Some(&2));
    assert_eq!(counts(s, ALICE, "A").await.unused_fallback, vec![OTK]);
    // The tombstone survived: k2 uploaded again is not handed out.
    up(
        s,
        KeysUpload {
            one_time_keys: vec![otk("k2", "v2")],
            ..upload(ALICE, "A")
        },
    )
    .await;
    // Upload order survived too, and new changes continue the log.
    let order: Vec<String> = [
        claim_one(s, ALICE, "A").await,
        claim_one(s, ALICE, "A").await,
    ]
    .into_iter()
    .flatten()
    .map(|k| k.key_id)
    .collect();
    assert_eq!(order, ["k1", "k3"]);
    assert!(claim_one(s, ALICE, "A").await.expect("fallback").fallback);
    s.set_display_name(ALICE, "A", Some("tablet"), NOW)
        .await
        .expect("name");
    assert_eq!(position(s).await, position_before + 1);
    assert_eq!(stream_id(s, ALICE).await, before.stream_id + 1);
    store.close().await.expect("close");
}

pub async fn concurrent_claims_hand_out_each_key_once(harness: &Harness) {
    const KEYS: usize = 300;
    const TASKS: usize = 12;
    let first = harness.store.clone();
    register(&*first, ALICE, &["A"]).await;
    let ids: Vec<String> = (0..KEYS).map(|i| format!("key{i:04}")).collect();
    for chunk in ids.chunks(50) {
        up(
            &*first,
            KeysUpload {
                one_time_keys: chunk.iter().map(|id| otk(id, id)).collect(),
                ..upload(ALICE, "A")
            },
        )
        .await;
    }
    // Half the tasks claim through a second store instance on the same
    // database (another worker, or another process on the SQLite file).
    let second = (harness.reopen)().await;
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let store: Arc<dyn Store> = if task % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                // Two wanted entries for the same device: two keys per claim.
                let got = store
                    .claim_keys(vec![wanted(ALICE, "A"), wanted(ALICE, "A")], NOW)
                    .await
                    .expect("claim");
                if got.is_empty() {
                    break;
                }
                assert!(got.iter().all(|k| !k.fallback));
                mine.extend(got.into_iter().map(|k| k.key_id));
            }
            mine
        }));
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for h in handles {
        for id in h.await.expect("claim task") {
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<&String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(twice.is_empty(), "handed out more than once: {twice:?}");
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        ids.into_iter().collect::<BTreeSet<_>>(),
        "every key handed out"
    );
    assert_eq!(counts(&*first, ALICE, "A").await, KeyCounts::default());
    assert_eq!(counts(&*second, ALICE, "A").await, KeyCounts::default());
    second.close().await.expect("close second instance");
}

pub async fn claimed_key_tombstones_expire(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    let keys = KeysUpload {
        one_time_keys: vec![otk("k1", "v1"), otk("k2", "v2")],
        ..upload(ALICE, "A")
    };
    up(s, keys.clone()).await;
    let claimed_at = NOW;
    assert_eq!(
        claim_one(s, ALICE, "A").await.map(|k| k.key_id),
        Some("k1".into())
    );
    let retention = Retention::DEFAULT;
    assert_eq!(retention.claimed_key_ms, 7 * 24 * 3600 * 1000);
    // Younger than the retention: kept, and k1 uploaded again is ignored.
    let report = s
        .prune(claimed_at + retention.claimed_key_ms - 1, retention, 100)
        .await
        .expect("prune");
    assert_eq!(report.claimed_one_time_keys, 0);
    assert_eq!(up(s, keys.clone()).await, stored(&[(OTK, 1)], false));
    // Five tombstones (k1, k2 and x1 of A, x1 and x2 of B; A keeps x2), all
    // older than the retention: forgotten in batches, x2 untouched.
    register(s, ALICE, &["B"]).await;
    for device in ["A", "B"] {
        up(
            s,
            KeysUpload {
                one_time_keys: vec![otk("x1", "x"), otk("x2", "x")],
                ..upload(ALICE, device)
            },
        )
        .await;
        claim_one(s, ALICE, device).await.expect("claim");
        claim_one(s, ALICE, device).await.expect("claim");
    }
    let later = claimed_at + retention.claimed_key_ms + 1;
    let first = s.prune(later, retention, 2).await.expect("prune");
    assert_eq!(first.claimed_one_time_keys, 2);
    let second = s.prune(later, retention, 100).await.expect("prune");
    assert_eq!(second.claimed_one_time_keys, 3);
    let third = s.prune(later, retention, 100).await.expect("prune");
    assert_eq!(third.claimed_one_time_keys, 0);
    assert_eq!(counts(s, ALICE, "A").await.one_time.get(OTK), Some(&1));
    // Past the retention a re-upload of k1 and k2 stores them as new keys
    // (SPEC-E2EE §7.4 keeps tombstones for 7 days; clients never reuse IDs
    // that late): x2, k1, k2.
    assert_eq!(up(s, keys).await, stored(&[(OTK, 3)], false));
}

/// `Store::sync_read` gives what `fetch_inbox`, `device_list_position` and
/// `key_counts` give, read the same moment; with a `since` that
/// acknowledges rows it deletes them as `fetch_inbox` does.
pub async fn sync_read_answers_as_its_three_reads_do(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    up(
        s,
        KeysUpload {
            one_time_keys: vec![otk("k1", "v1"), otk("k2", "v2")],
            fallback_keys: vec![fallback("f1", "fv1")],
            ..upload(ALICE, "A")
        },
    )
    .await;
    assert!(
        s.set_display_name(ALICE, "B", Some("phone"), NOW)
            .await
            .expect("rename")
    );
    for n in 0..3 {
        s.enqueue_send(send(&format!("t{n}"), ALICE, "A", 1))
            .await
            .expect("send");
    }
    let read = s.sync_read(ALICE, "A", 0, 2).await.expect("sync read");
    assert_eq!(
        read.page,
        s.fetch_inbox(ALICE, "A", 0, 2).await.expect("fetch")
    );
    assert_eq!(read.page.messages.len(), 2);
    assert!(read.page.more);
    assert_eq!(read.device_list_position, position(s).await);
    assert!(read.device_list_position > 0);
    assert_eq!(read.key_counts, counts(s, ALICE, "A").await);
    assert_eq!(read.key_counts.one_time.get(OTK), Some(&2));
    assert_eq!(read.key_counts.unused_fallback, vec![OTK]);

    // Acknowledging the first page: its rows go, the rest is the page.
    claim_one(s, ALICE, "A").await.expect("a one-time key");
    let since = read.page.next_batch;
    let acked = s.sync_read(ALICE, "A", since, 100).await.expect("ack");
    assert_eq!(acked.page.messages.len(), 1);
    assert!(!acked.page.more);
    assert_eq!(acked.key_counts.one_time.get(OTK), Some(&1));
    let from_start = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    assert_eq!(from_start.messages, acked.page.messages);
    // Another device's read is its own.
    let other = s.sync_read(ALICE, "B", 0, 100).await.expect("sync read B");
    assert!(other.page.messages.is_empty());
    assert!(other.key_counts.one_time.is_empty());
    assert_eq!(other.device_list_position, read.device_list_position);
}
