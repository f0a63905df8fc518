//! The E2EE keys endpoints on a real relay (SPEC-E2EE §2.1–§2.3, §2.7), with
//! real ed25519 signatures made here: key upload, query, claim (exactly once
//! across concurrent claimers, then the fallback key), cross-signing and
//! signature uploads. Every bad input gets its Matrix error and changes
//! nothing, which is checked on the relay's store through a second handle.

use std::collections::BTreeSet;

use crate::support::e2ee::{TestDevice, cross_signing_key, key, public_key, sign};
use crate::support::http::Response;
use crate::support::{TestRelay, TestRelayOptions};
use courier::store::KeyStore;
use courier::store::keys::{DeviceQuery, UserDevices};
use courier::store::sqlite::SqliteStore;
use serde_json::{Value, json};

struct Fixture {
    relay: TestRelay,
    store: SqliteStore,
    alice: TestDevice,
    bob: TestDevice,
}

impl Fixture {
    async fn new() -> Fixture {
        let relay = TestRelay::spawn_with(TestRelayOptions {
            e2ee_extra: "max_query_devices = 10\nmax_claim_devices = 10\n".to_owned(),
            ..Default::default()
        })
        .await;
        let store = SqliteStore::open(&relay.db_path())
            .await
            .expect("second handle on the relay's store");
        let alice = TestDevice::register(&relay, "alice", "ALICEDEV", 1).await;
        let bob = TestDevice::register(&relay, "bob", "BOBDEV", 2).await;
        Fixture {
            relay,
            store,
            alice,
            bob,
        }
    }

    async fn post(&self, device: &TestDevice, path: &str, body: &Value) -> Response {
        let url = format!("{}/_matrix/client/v3/{path}", self.relay.client_url);
        self.relay
            .http
            .post_json(&url, Some(&device.token), body)
            .await
    }

    async fn upload(&self, device: &TestDevice, body: &Value) -> Response {
        self.post(device, "keys/upload", body).await
    }

    /// The store's view of one user.
    async fn stored(&self, user_id: &str) -> UserDevices {
        self.store
            .user_devices(vec![DeviceQuery {
                user_id: user_id.to_owned(),
                device_ids: Vec::new(),
            }])
            .await
            .expect("store read")
            .pop()
            .expect("an entry per user")
    }

    async fn otk_count(&self, device: &TestDevice) -> u64 {
        self.store
            .key_counts(&device.user_id, &device.device_id)
            .await
            .expect("counts")
            .one_time
            .get("signed_curve25519")
            .copied()
            .unwrap_or(0)
    }
}

fn assert_error(response: &Response, status: u16, errcode: &str) {
    assert_eq!(response.status, status, "{}", response.text);
    assert_eq!(response.json["errcode"], errcode, "{}", response.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_uploaded_queried_and_claimed_once_then_the_fallback_key() {
    let f = Fixture::new().await;
    let alice = &f.alice;
    let fallback = alice.key_object(200, true);
    let r = f
        .upload(
            alice,
            &json!({
                "device_keys": alice.device_keys(),
                "one_time_keys": alice.one_time_keys([1, 2, 3]),
                "fallback_keys": { "signed_curve25519:FB": fallback },
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json,
        json!({"one_time_key_counts": {"signed_curve25519": 3}})
    );
    // A repeated upload of the same keys is accepted and adds nothing.
    let r = f
        .upload(
            alice,
            &json!({ "one_time_keys": alice.one_time_keys([1, 2]) }),
        )
        .await;
    assert_eq!(
        r.json["one_time_key_counts"]["signed_curve25519"], 3,
        "{}",
        r.text
    );

    // Bob queries Alice: her keys as uploaded, plus `unsigned`.
    let r = f
        .post(
            &f.bob,
            "keys/query",
            &json!({"device_keys": {alice.user_id.clone(): []}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut served = r.json["device_keys"][&alice.user_id][&alice.device_id].clone();
    assert_eq!(served["unsigned"], json!({}));
    served.as_object_mut().expect("object").remove("unsigned");
    assert_eq!(served, alice.device_keys());
    assert_eq!(r.json["failures"], json!({}));

    // Three one-time keys, each once, then the fallback key (which stays).
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let r = f
            .post(
                &f.bob,
                "keys/claim",
                &json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let keys = r.json["one_time_keys"][&alice.user_id][&alice.device_id]
            .as_object()
            .expect("a key")
            .clone();
        assert_eq!(keys.len(), 1);
        let (name, value) = keys.into_iter().next().expect("one key");
        assert!(name.starts_with("signed_curve25519:AAAA"), "{name}");
        assert_eq!(value.get("fallback"), None);
        assert!(seen.insert(name), "a one-time key was handed out twice");
    }
    assert_eq!(f.otk_count(alice).await, 0);
    for _ in 0..2 {
        let r = f
            .post(
                &f.bob,
                "keys/claim",
                &json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}}}),
            )
            .await;
        assert_eq!(
            r.json["one_time_keys"][&alice.user_id][&alice.device_id]["signed_curve25519:FB"],
            fallback,
            "{}",
            r.text
        );
    }
    let r = f.upload(alice, &json!({})).await;
    assert_eq!(
        r.json,
        json!({"one_time_key_counts": {"signed_curve25519": 0}})
    );
    // Counted (the recorder is process-wide, so only presence is checked).
    let metrics = f
        .relay
        .http
        .get(
            &format!("{}/metrics", f.relay.rpc_url),
            Some(&f.relay.rpc_secret),
        )
        .await;
    for series in [
        "courier_e2ee_key_uploads_total{outcome=\"stored\"}",
        "courier_e2ee_key_claims_total{result=\"one_time\"}",
        "courier_e2ee_key_claims_total{result=\"fallback\"}",
        "courier_e2ee_key_queries_total{kind=\"local\"}",
    ] {
        assert!(metrics.text.contains(series), "{series} on /metrics");
    }
    // An unknown device and an unknown algorithm are absent, not failures.
    let r = f
        .post(
            &f.bob,
            "keys/claim",
            &json!({"one_time_keys": {alice.user_id.clone(): {"NOSUCH": "signed_curve25519"}, f.bob.user_id.clone(): {f.bob.device_id.clone(): "signed_curve25519"}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({"one_time_keys": {}, "failures": {}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_uploads_are_refused_and_store_nothing() {
    let f = Fixture::new().await;
    let alice = &f.alice;
    let other_key = key(99);
    let resigned = |mut keys: Value| {
        keys.as_object_mut().expect("object").remove("signatures");
        sign(
            &mut keys,
            &alice.user_id,
            &alice.ed25519_id(),
            &alice.ed25519,
        );
        keys
    };
    let mut wrong_user = alice.device_keys_unsigned();
    wrong_user["user_id"] = json!(f.bob.user_id);
    let mut wrong_device = alice.device_keys_unsigned();
    wrong_device["device_id"] = json!("OTHER");
    let mut bad_signature = alice.device_keys_unsigned();
    sign(
        &mut bad_signature,
        &alice.user_id,
        &alice.ed25519_id(),
        &other_key,
    );
    let mut no_curve = alice.device_keys_unsigned();
    no_curve["keys"]
        .as_object_mut()
        .expect("keys")
        .remove(&format!("curve25519:{}", alice.device_id));
    let mut no_ed25519 = alice.device_keys_unsigned();
    no_ed25519["keys"]
        .as_object_mut()
        .expect("keys")
        .remove(&alice.ed25519_id());
    let mut no_algorithms = alice.device_keys_unsigned();
    no_algorithms
        .as_object_mut()
        .expect("object")
        .remove("algorithms");
    let mut tampered = alice.device_keys();
    tampered["algorithms"] = json!(["m.megolm.v1.aes-sha2"]);
    let mut bad_otk = alice.key_object(5, false);
    bad_otk["key"] = json!(courier::signing::encode_base64(&[6; 32]));

    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "wrong user",
            json!({"device_keys": resigned(wrong_user)}),
            400,
            "M_BAD_JSON",
        ),
        (
            "wrong device",
            json!({"device_keys": resigned(wrong_device)}),
            400,
            "M_BAD_JSON",
        ),
        (
            "bad signature",
            json!({"device_keys": bad_signature}),
            400,
            "M_INVALID_SIGNATURE",
        ),
        (
            "tampered after signing",
            json!({"device_keys": tampered}),
            400,
            "M_INVALID_SIGNATURE",
        ),
        (
            "no signature",
            json!({"device_keys": alice.device_keys_unsigned()}),
            400,
            "M_MISSING_PARAM",
        ),
        (
            "no curve25519 key",
            json!({"device_keys": resigned(no_curve)}),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "no ed25519 key",
            json!({"device_keys": no_ed25519}),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "no algorithms",
            json!({"device_keys": resigned(no_algorithms)}),
            400,
            "M_MISSING_PARAM",
        ),
        (
            "null device keys",
            json!({"device_keys": null}),
            400,
            "M_BAD_JSON",
        ),
        (
            "device keys not an object",
            json!({"device_keys": [1]}),
            400,
            "M_BAD_JSON",
        ),
        (
            "badly signed one-time key with good device keys",
            json!({"device_keys": alice.device_keys(), "one_time_keys": {"signed_curve25519:X": bad_otk}}),
            400,
            "M_INVALID_SIGNATURE",
        ),
        (
            "one-time key signed, but no device keys anywhere",
            json!({"one_time_keys": alice.one_time_keys([7])}),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "unsigned string under a signed algorithm",
            json!({"one_time_keys": {"signed_curve25519:X": "abc"}}),
            400,
            "M_BAD_JSON",
        ),
        (
            "malformed key ID",
            json!({"one_time_keys": {"signed_curve25519": alice.key_object(8, false)}}),
            400,
            "M_BAD_JSON",
        ),
        (
            "fallback key without fallback: true",
            json!({"device_keys": alice.device_keys(), "fallback_keys": {"signed_curve25519:F": alice.key_object(9, false)}}),
            400,
            "M_BAD_JSON",
        ),
        (
            "one_time_keys not an object",
            json!({"one_time_keys": []}),
            400,
            "M_BAD_JSON",
        ),
    ];
    for (what, body, status, errcode) in cases {
        let r = f.upload(alice, &body).await;
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert_eq!(r.json["errcode"], errcode, "{what}: {}", r.text);
        let stored = f.stored(&alice.user_id).await;
        assert!(
            stored.devices.iter().all(|d| d.keys_json.is_none()),
            "{what}: device keys stored"
        );
        assert_eq!(f.otk_count(alice).await, 0, "{what}: one-time keys stored");
    }
    let r = f
        .relay
        .http
        .request(
            "POST",
            &format!("{}/_matrix/client/v3/keys/upload", f.relay.client_url),
            Some(&alice.token),
            Some(b"{not json".to_vec()),
        )
        .await;
    assert_error(&r, 400, "M_NOT_JSON");
    let r = f
        .relay
        .http
        .post_json(
            &format!("{}/_matrix/client/v3/keys/upload", f.relay.client_url),
            Some("no-such-token"),
            &json!({"device_keys": alice.device_keys()}),
        )
        .await;
    assert_error(&r, 401, "M_UNKNOWN_TOKEN");

    // Stored keys: an identity change and a conflicting one-time key are
    // refused, and what is stored stays.
    let r = f
        .upload(
            alice,
            &json!({"device_keys": alice.device_keys(), "one_time_keys": alice.one_time_keys([1])}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = f.stored(&alice.user_id).await;
    let mut changed = alice.device_keys_unsigned();
    changed["keys"][format!("curve25519:{}", alice.device_id)] =
        json!(courier::signing::encode_base64(&[77; 32]));
    let r = f
        .upload(
            alice,
            &json!({"device_keys": resigned(changed), "one_time_keys": alice.one_time_keys([2])}),
        )
        .await;
    assert_error(&r, 400, "M_INVALID_PARAM");
    let mut conflicting = serde_json::Map::new();
    conflicting.insert(
        "signed_curve25519:AAAA001".to_owned(),
        alice.key_object(50, false),
    );
    let r = f
        .upload(alice, &json!({"one_time_keys": conflicting, "fallback_keys": {"signed_curve25519:F": alice.key_object(9, true)}}))
        .await;
    assert_error(&r, 400, "M_INVALID_PARAM");
    assert_eq!(f.stored(&alice.user_id).await, before);
    assert_eq!(f.otk_count(alice).await, 1);
    let counts = f
        .store
        .key_counts(&alice.user_id, &alice.device_id)
        .await
        .expect("counts");
    assert!(counts.unused_fallback.is_empty(), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_claims_are_checked_and_bounded() {
    let f = Fixture::new().await;
    let alice = &f.alice;
    let eleven: Vec<String> = (0..11).map(|i| format!("D{i}")).collect();
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "keys/query",
            "too many devices",
            json!({"device_keys": {alice.user_id.clone(): eleven}}),
            413,
            "M_TOO_LARGE",
        ),
        (
            "keys/query",
            "no device_keys",
            json!({}),
            400,
            "M_MISSING_PARAM",
        ),
        (
            "keys/query",
            "not a user ID",
            json!({"device_keys": {"alice": []}}),
            400,
            "M_INVALID_PARAM",
        ),
        (
            "keys/query",
            "devices not a list",
            json!({"device_keys": {alice.user_id.clone(): "X"}}),
            400,
            "M_BAD_JSON",
        ),
        (
            "keys/query",
            "bad timeout",
            json!({"device_keys": {}, "timeout": "soon"}),
            400,
            "M_BAD_JSON",
        ),
        (
            "keys/claim",
            "no one_time_keys",
            json!({}),
            400,
            "M_MISSING_PARAM",
        ),
        (
            "keys/claim",
            "algorithm not a string",
            json!({"one_time_keys": {alice.user_id.clone(): {"D": 1}}}),
            400,
            "M_BAD_JSON",
        ),
        (
            "keys/claim",
            "not a user ID",
            json!({"one_time_keys": {"x": {"D": "signed_curve25519"}}}),
            400,
            "M_INVALID_PARAM",
        ),
    ];
    for (path, what, body, status, errcode) in cases {
        let r = f.post(&f.bob, path, &body).await;
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert_eq!(r.json["errcode"], errcode, "{what}: {}", r.text);
    }

    // An oversized claim claims nothing.
    let r = f
        .upload(
            alice,
            &json!({"device_keys": alice.device_keys(), "one_time_keys": alice.one_time_keys([1])}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut devices = serde_json::Map::new();
    devices.insert(alice.device_id.clone(), json!("signed_curve25519"));
    for i in 0..10 {
        devices.insert(format!("D{i}"), json!("signed_curve25519"));
    }
    let r = f
        .post(
            &f.bob,
            "keys/claim",
            &json!({"one_time_keys": {alice.user_id.clone(): devices}}),
        )
        .await;
    assert_error(&r, 413, "M_TOO_LARGE");
    assert_eq!(f.otk_count(alice).await, 1);

    // A user with no keys gets an empty entry; an unreachable server is a
    // failure and its user is absent (never an empty entry).
    let unreachable = "@carol:127.0.0.1:1";
    let r = f
        .post(
            &f.bob,
            "keys/query",
            &json!({"device_keys": {f.bob.user_id.clone(): [], unreachable: []}, "timeout": 3000}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["device_keys"], json!({ f.bob.user_id.clone(): {} }));
    assert_eq!(
        r.json["failures"]["127.0.0.1:1"]["status"], 503,
        "{}",
        r.text
    );
    let r = f
        .post(
            &f.bob,
            "keys/claim",
            &json!({"one_time_keys": {unreachable: {"X": "signed_curve25519"}}, "timeout": 3000}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["one_time_keys"], json!({}));
    assert!(r.json["failures"]["127.0.0.1:1"].is_object(), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_over_http_never_share_a_key() {
    let f = Fixture::new().await;
    let alice = &f.alice;
    let r = f
        .upload(
            alice,
            &json!({
                "device_keys": alice.device_keys(),
                "one_time_keys": alice.one_time_keys(1..=12),
                "fallback_keys": { "signed_curve25519:FB": alice.key_object(200, true) },
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}}});
    let url = format!("{}/_matrix/client/v3/keys/claim", f.relay.client_url);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (url, body, token) = (url.clone(), body.clone(), f.bob.token.clone());
        tasks.spawn(async move {
            crate::support::http::HttpClient::new()
                .post_json(&url, Some(&token), &body)
                .await
        });
    }
    let mut one_time = Vec::new();
    let mut fallback = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("claimer task");
        assert_eq!(r.status, 200, "{}", r.text);
        let keys = r.json["one_time_keys"][&alice.user_id][&alice.device_id]
            .as_object()
            .expect("every claim gets a key")
            .clone();
        for name in keys.keys() {
            if name == "signed_curve25519:FB" {
                fallback += 1;
            } else {
                one_time.push(name.clone());
            }
        }
    }
    let distinct: BTreeSet<&String> = one_time.iter().collect();
    assert_eq!(
        one_time.len(),
        12,
        "every one-time key handed out: {one_time:?}"
    );
    assert_eq!(distinct.len(), 12, "no one-time key handed out twice");
    assert_eq!(fallback, 8);
    assert_eq!(f.otk_count(alice).await, 0);
}

/// Cross-signing keys of a user: master, self-signing and user-signing,
/// the last two signed by the master.
struct CrossSigning {
    master: ed25519_dalek::SigningKey,
    ssk: ed25519_dalek::SigningKey,
    usk: ed25519_dalek::SigningKey,
}

impl CrossSigning {
    fn new(seed: u8) -> CrossSigning {
        CrossSigning {
            master: key(seed),
            ssk: key(seed + 1),
            usk: key(seed + 2),
        }
    }

    fn master_id(&self) -> String {
        format!("ed25519:{}", public_key(&self.master))
    }

    fn signed_by_master(&self, user_id: &str, usage: &str, k: &ed25519_dalek::SigningKey) -> Value {
        let mut object = cross_signing_key(user_id, usage, k);
        sign(&mut object, user_id, &self.master_id(), &self.master);
        object
    }

    fn body(&self, user_id: &str) -> Value {
        json!({
            "master_key": cross_signing_key(user_id, "master", &self.master),
            "self_signing_key": self.signed_by_master(user_id, "self_signing", &self.ssk),
            "user_signing_key": self.signed_by_master(user_id, "user_signing", &self.usk),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_signing_keys_need_uia_only_to_replace_them() {
    let f = Fixture::new().await;
    let alice = &f.alice;
    let keys = CrossSigning::new(10);
    let user = alice.user_id.clone();

    // Refused uploads store nothing.
    let mut bad_ssk = keys.body(&user);
    sign(
        &mut bad_ssk["self_signing_key"],
        &user,
        &keys.master_id(),
        &key(55),
    );
    let mut wrong_usage = keys.body(&user);
    wrong_usage["master_key"]["usage"] = json!(["self_signing"]);
    let mut wrong_user = keys.body(&user);
    wrong_user["master_key"]["user_id"] = json!(f.bob.user_id);
    let mut two_keys = keys.body(&user);
    two_keys["master_key"]["keys"]["ed25519:AAAA"] = json!("AAAA");
    let ssk_alone =
        json!({"self_signing_key": keys.signed_by_master(&user, "self_signing", &keys.ssk)});
    let device_named = json!({"master_key": cross_signing_key(&user, "master", &key(44))});
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "SSK not signed by the master",
            bad_ssk,
            400,
            "M_INVALID_SIGNATURE",
        ),
        ("wrong usage", wrong_usage, 400, "M_INVALID_PARAM"),
        ("wrong user", wrong_user, 400, "M_INVALID_PARAM"),
        ("two keys", two_keys, 400, "M_INVALID_PARAM"),
        ("no master key anywhere", ssk_alone, 400, "M_MISSING_PARAM"),
        (
            "not an object",
            json!({"master_key": "x"}),
            400,
            "M_BAD_JSON",
        ),
    ];
    for (what, body, status, errcode) in cases {
        let r = f.post(alice, "keys/device_signing/upload", &body).await;
        assert_eq!(r.status, status, "{what}: {}", r.text);
        assert_eq!(r.json["errcode"], errcode, "{what}: {}", r.text);
        assert!(f.stored(&user).await.cross_signing.is_empty(), "{what}");
    }
    // A key whose public key is a device ID of the user.
    let colliding = TestDevice::register(&f.relay, "alice", &public_key(&key(44)), 44).await;
    let r = f
        .post(&colliding, "keys/device_signing/upload", &device_named)
        .await;
    assert_error(&r, 403, "M_FORBIDDEN");

    // The first upload needs no UIA; neither does an identical one.
    for _ in 0..2 {
        let r = f
            .post(alice, "keys/device_signing/upload", &keys.body(&user))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(f.stored(&user).await.cross_signing.len(), 3);
    let r = f
        .post(
            alice,
            "keys/query",
            &json!({"device_keys": {user.clone(): []}}),
        )
        .await;
    assert_eq!(r.json["master_keys"][&user], keys.body(&user)["master_key"]);
    assert_eq!(
        r.json["self_signing_keys"][&user],
        keys.body(&user)["self_signing_key"]
    );
    assert_eq!(
        r.json["user_signing_keys"][&user],
        keys.body(&user)["user_signing_key"]
    );
    let r = f
        .post(
            &f.bob,
            "keys/query",
            &json!({"device_keys": {user.clone(): []}}),
        )
        .await;
    assert!(r.json["master_keys"][&user].is_object());
    assert_eq!(
        r.json["user_signing_keys"],
        json!({}),
        "the USK is for its owner only"
    );

    // Replacing them needs the dummy stage.
    let new_keys = CrossSigning::new(20);
    let before = f.stored(&user).await;
    let r = f
        .post(alice, "keys/device_signing/upload", &new_keys.body(&user))
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.json["flows"], json!([{"stages": ["m.login.dummy"]}]));
    assert_eq!(f.stored(&user).await, before);
    let mut with_auth = new_keys.body(&user);
    with_auth["auth"] = json!({"type": "m.login.dummy", "session": r.json["session"]});
    let r = f
        .post(alice, "keys/device_signing/upload", &with_auth)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = f
        .post(
            alice,
            "keys/query",
            &json!({"device_keys": {user.clone(): []}}),
        )
        .await;
    assert_eq!(
        r.json["master_keys"][&user],
        new_keys.body(&user)["master_key"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_one_by_one_and_served_merged() {
    let f = Fixture::new().await;
    let (alice, bob) = (&f.alice, &f.bob);
    for device in [alice, bob] {
        let r = f
            .upload(device, &json!({"device_keys": device.device_keys()}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let alice_cs = CrossSigning::new(30);
    let bob_cs = CrossSigning::new(40);
    for (device, cs) in [(alice, &alice_cs), (bob, &bob_cs)] {
        let r = f
            .post(
                device,
                "keys/device_signing/upload",
                &cs.body(&device.user_id),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let ssk_id = format!("ed25519:{}", public_key(&alice_cs.ssk));
    let usk_id = format!("ed25519:{}", public_key(&alice_cs.usk));
    let bob_master_pk = public_key(&bob_cs.master);
    let mut device_signed = alice.device_keys();
    sign(&mut device_signed, &alice.user_id, &ssk_id, &alice_cs.ssk);
    let mut bob_master_signed = cross_signing_key(&bob.user_id, "master", &bob_cs.master);
    sign(
        &mut bob_master_signed,
        &alice.user_id,
        &usk_id,
        &alice_cs.usk,
    );
    let mut forged = alice.device_keys();
    sign(&mut forged, &alice.user_id, &ssk_id, &key(66));
    let mut altered = alice.device_keys();
    altered["algorithms"] = json!(["x"]);
    sign(&mut altered, &alice.user_id, &ssk_id, &alice_cs.ssk);

    let r = f
        .post(
            alice,
            "keys/signatures/upload",
            &json!({
                alice.user_id.clone(): { alice.device_id.clone(): device_signed },
                bob.user_id.clone(): { bob_master_pk.clone(): bob_master_signed },
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({"failures": {}}));
    let before = f.stored(&alice.user_id).await;
    let r = f
        .post(
            alice,
            "keys/signatures/upload",
            &json!({ alice.user_id.clone(): { alice.device_id.clone(): forged, "NOSUCHKEY": {"a": 1} } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let failures = &r.json["failures"][&alice.user_id];
    assert_eq!(
        failures[&alice.device_id]["errcode"], "M_INVALID_SIGNATURE",
        "{}",
        r.text
    );
    assert_eq!(
        failures["NOSUCHKEY"]["errcode"], "M_NOT_FOUND",
        "{}",
        r.text
    );
    let r = f
        .post(
            alice,
            "keys/signatures/upload",
            &json!({ alice.user_id.clone(): { alice.device_id.clone(): altered } }),
        )
        .await;
    assert_eq!(
        r.json["failures"][&alice.user_id][&alice.device_id]["errcode"],
        "M_INVALID_SIGNATURE"
    );
    assert_eq!(
        f.stored(&alice.user_id).await,
        before,
        "refused signatures stored nothing"
    );

    // Bob sees Alice's device signed by her SSK; Alice sees her signature
    // on Bob's master key, Bob's own query does not.
    let r = f
        .post(
            bob,
            "keys/query",
            &json!({"device_keys": {alice.user_id.clone(): []}}),
        )
        .await;
    assert!(
        r.json["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id]
            [&ssk_id]
            .is_string(),
        "{}",
        r.text
    );
    let r = f
        .post(
            alice,
            "keys/query",
            &json!({"device_keys": {bob.user_id.clone(): []}}),
        )
        .await;
    assert!(
        r.json["master_keys"][&bob.user_id]["signatures"][&alice.user_id][&usk_id].is_string(),
        "{}",
        r.text
    );
    let r = f
        .post(
            bob,
            "keys/query",
            &json!({"device_keys": {bob.user_id.clone(): []}}),
        )
        .await;
    assert!(r.json["master_keys"][&bob.user_id]["signatures"][&alice.user_id].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_server_that_never_answers_is_a_failure_within_the_timeout() {
    let f = Fixture::new().await;
    // Accepts connections and never says anything (not even TLS).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let silent_server = format!("localhost:{port}");
    let silent_user = format!("@dave:{silent_server}");
    for (path, body) in [
        (
            "keys/query",
            json!({"device_keys": {f.bob.user_id.clone(): [], silent_user.clone(): []}, "timeout": 1500}),
        ),
        (
            "keys/claim",
            json!({"one_time_keys": {silent_user.clone(): {"D": "signed_curve25519"}}, "timeout": 1500}),
        ),
    ] {
        let r = f.post(&f.alice, path, &body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(
            r.json["failures"][&silent_server]["status"], 503,
            "{path}: {}",
            r.text
        );
        assert!(
            r.json.to_string().matches(&silent_user).count() == 0,
            "{path}: the silent server's user is absent: {}",
            r.text
        );
        if path == "keys/query" {
            assert_eq!(
                r.json["device_keys"][&f.bob.user_id],
                json!({}),
                "{}",
                r.text
            );
        }
    }
    holder.abort();
}
