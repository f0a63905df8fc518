//! The key endpoints other servers call, on a real relay over real TLS
//! (SPEC-E2EE §3.1–§3.3): `/user/keys/query`, `/user/keys/claim` and
//! `/user/devices/{userId}` answer for local users from X-Matrix-signed
//! requests, refuse unsigned requests, requests naming another server's
//! user, malformed and oversized bodies, and change nothing when they
//! refuse. Requests come from a fake origin whose key is put into the
//! relay's key cache, as in `federation_inbound`.

use crate::support::e2ee::{FedClient, TestDevice, cross_signing_key, key, public_key, sign};
use crate::support::{TestRelay, TestRelayOptions};
use courier::keys::ServerSigningKey;
use courier::store::sqlite::SqliteStore;
use courier::store::{KeyStore, Store, StoredServerKey};
use serde_json::{Value, json};

const FAKE_ORIGIN: &str = "127.0.0.1:1";

/// A refused request: what, target, body, signed, status, errcode.
type Case<'a> = (&'a str, &'a str, Option<Value>, bool, u16, &'a str);

struct Fixture {
    relay: TestRelay,
    store: SqliteStore,
    fed: FedClient,
    alice: TestDevice,
}

impl Fixture {
    async fn new(e2ee: &str) -> Fixture {
        let mut options = TestRelayOptions {
            e2ee_extra: format!("max_query_devices = 5\nmax_claim_devices = 5\n{e2ee}"),
            ..Default::default()
        };
        options
            .federation_extra
            .push_str("key_fetch_timeout_ms = 3000\n");
        let relay = TestRelay::spawn_with(options).await;
        let store = SqliteStore::open(&relay.db_path())
            .await
            .expect("second handle on the relay's store");
        let key = ServerSigningKey::from_seed("fake1", [42; 32]);
        store
            .put_server_keys(vec![StoredServerKey {
                server_name: FAKE_ORIGIN.to_owned(),
                key_id: key.key_id().to_owned(),
                public_key: key.public_key_base64(),
                valid_until_ts: courier::now_ms() + 3_600_000,
            }])
            .await
            .expect("test key stored");
        let fed = FedClient::new(&relay, FAKE_ORIGIN, key);
        let alice = TestDevice::register(&relay, "alice", "ALICEDEV", 1).await;
        let url = format!("{}/_matrix/client/v3/keys/upload", relay.client_url);
        let r = relay
            .http
            .post_json(
                &url,
                Some(&alice.token),
                &json!({
                    "device_keys": alice.device_keys(),
                    "one_time_keys": alice.one_time_keys([1, 2]),
                }),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        Fixture {
            relay,
            store,
            fed,
            alice,
        }
    }

    async fn otk_count(&self) -> u64 {
        self.store
            .key_counts(&self.alice.user_id, &self.alice.device_id)
            .await
            .expect("counts")
            .one_time
            .get("signed_curve25519")
            .copied()
            .unwrap_or(0)
    }

    fn claim_body(&self) -> Value {
        json!({"one_time_keys": {self.alice.user_id.clone(): {self.alice.device_id.clone(): "signed_curve25519"}}})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_keys_are_served_to_signed_requests() {
    let f = Fixture::new("").await;
    let alice = &f.alice;
    f.store
        .set_display_name(
            &alice.user_id,
            &alice.device_id,
            Some("Alice's phone"),
            courier::now_ms(),
        )
        .await
        .expect("display name set");

    let query = json!({"device_keys": {alice.user_id.clone(): []}});
    let r = f
        .fed
        .send(
            "POST",
            "/_matrix/federation/v1/user/keys/query",
            Some(&query),
            true,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let mut served = r.json["device_keys"][&alice.user_id][&alice.device_id].clone();
    assert_eq!(
        served["unsigned"],
        json!({}),
        "no display name over federation by default"
    );
    served.as_object_mut().expect("object").remove("unsigned");
    assert_eq!(served, alice.device_keys());
    assert!(r.json.get("failures").is_none());
    assert!(r.json.get("user_signing_keys").is_none());

    let r = f
        .fed
        .send(
            "GET",
            &format!(
                "/_matrix/federation/v1/user/devices/{}",
                crate::support::relay::encode(&alice.user_id)
            ),
            None,
            true,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["user_id"], json!(alice.user_id));
    assert!(
        r.json["stream_id"].as_i64().is_some_and(|id| id >= 1),
        "{}",
        r.json
    );
    assert_eq!(r.json["devices"].as_array().map(Vec::len), Some(1));
    assert_eq!(r.json["devices"][0]["device_id"], json!(alice.device_id));
    assert_eq!(r.json["devices"][0]["keys"], alice.device_keys());
    assert!(r.json["devices"][0].get("device_display_name").is_none());

    let r = f
        .fed
        .send(
            "POST",
            "/_matrix/federation/v1/user/keys/claim",
            Some(&f.claim_body()),
            true,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let keys = r.json["one_time_keys"][&alice.user_id][&alice.device_id]
        .as_object()
        .expect("a key");
    assert_eq!(keys.len(), 1);
    assert!(r.json.get("failures").is_none());
    assert_eq!(f.otk_count().await, 1);

    // A local user without devices: an empty list.
    let r = f
        .fed
        .send(
            "GET",
            &format!(
                "/_matrix/federation/v1/user/devices/{}",
                crate::support::relay::encode(&format!("@nobody:{}", f.relay.server_name))
            ),
            None,
            true,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["devices"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_names_go_out_only_when_configured() {
    let f = Fixture::new("device_names_over_federation = true\n").await;
    let alice = &f.alice;
    f.store
        .set_display_name(
            &alice.user_id,
            &alice.device_id,
            Some("Alice's phone"),
            courier::now_ms(),
        )
        .await
        .expect("display name set");
    let query = json!({"device_keys": {alice.user_id.clone(): [alice.device_id.clone()]}});
    let r = f
        .fed
        .send(
            "POST",
            "/_matrix/federation/v1/user/keys/query",
            Some(&query),
            true,
        )
        .await;
    assert_eq!(
        r.json["device_keys"][&alice.user_id][&alice.device_id]["unsigned"]["device_display_name"],
        "Alice's phone",
        "{}",
        r.json
    );
    let r = f
        .fed
        .send(
            "GET",
            &format!(
                "/_matrix/federation/v1/user/devices/{}",
                crate::support::relay::encode(&alice.user_id)
            ),
            None,
            true,
        )
        .await;
    assert_eq!(
        r.json["devices"][0]["device_display_name"], "Alice's phone",
        "{}",
        r.json
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_federation_key_requests_are_refused_and_claim_nothing() {
    let f = Fixture::new("").await;
    let alice = &f.alice;
    let remote_user = "@bob:elsewhere.example";
    let too_many: Vec<String> = (0..6).map(|i| format!("D{i}")).collect();
    let cases: Vec<Case> = vec![
        (
            "query, unsigned",
            "/_matrix/federation/v1/user/keys/query",
            Some(json!({"device_keys": {alice.user_id.clone(): []}})),
            false,
            401,
            "M_UNAUTHORIZED",
        ),
        (
            "claim, unsigned",
            "/_matrix/federation/v1/user/keys/claim",
            Some(f.claim_body()),
            false,
            401,
            "M_UNAUTHORIZED",
        ),
        (
            "query, remote user",
            "/_matrix/federation/v1/user/keys/query",
            Some(json!({"device_keys": {alice.user_id.clone(): [], remote_user: []}})),
            true,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "claim, remote user",
            "/_matrix/federation/v1/user/keys/claim",
            Some(
                json!({"one_time_keys": {alice.user_id.clone(): {alice.device_id.clone(): "signed_curve25519"}, remote_user: {"D": "signed_curve25519"}}}),
            ),
            true,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "query, oversized",
            "/_matrix/federation/v1/user/keys/query",
            Some(json!({"device_keys": {alice.user_id.clone(): too_many}})),
            true,
            413,
            "M_TOO_LARGE",
        ),
        (
            "query, malformed",
            "/_matrix/federation/v1/user/keys/query",
            Some(json!({"device_keys": [1]})),
            true,
            400,
            "M_BAD_JSON",
        ),
        (
            "claim, malformed",
            "/_matrix/federation/v1/user/keys/claim",
            Some(json!({"one_time_keys": {alice.user_id.clone(): []}})),
            true,
            400,
            "M_BAD_JSON",
        ),
        (
            "claim, no body",
            "/_matrix/federation/v1/user/keys/claim",
            None,
            true,
            400,
            "M_NOT_JSON",
        ),
    ];
    for (what, target, body, signed, status, errcode) in cases {
        let r = f.fed.send("POST", target, body.as_ref(), signed).await;
        assert_eq!(r.status, status, "{what}: {}", r.json);
        assert_eq!(r.json["errcode"], errcode, "{what}: {}", r.json);
        assert_eq!(f.otk_count().await, 2, "{what}: a key was claimed");
    }
    let mut oversized = serde_json::Map::new();
    for i in 0..6 {
        oversized.insert(format!("D{i}"), json!("signed_curve25519"));
    }
    oversized.insert(alice.device_id.clone(), json!("signed_curve25519"));
    let r = f
        .fed
        .send(
            "POST",
            "/_matrix/federation/v1/user/keys/claim",
            Some(&json!({"one_time_keys": {alice.user_id.clone(): oversized}})),
            true,
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.json);
    assert_eq!(f.otk_count().await, 2);

    for (user, signed, status, errcode) in [
        (remote_user.to_owned(), true, 400, "M_INVALID_PARAM"),
        ("not-a-user".to_owned(), true, 400, "M_INVALID_PARAM"),
        (alice.user_id.clone(), false, 401, "M_UNAUTHORIZED"),
    ] {
        let r = f
            .fed
            .send(
                "GET",
                &format!(
                    "/_matrix/federation/v1/user/devices/{}",
                    crate::support::relay::encode(&user)
                ),
                None,
                signed,
            )
            .await;
        assert_eq!(r.status, status, "{user}: {}", r.json);
        assert_eq!(r.json["errcode"], errcode, "{user}: {}", r.json);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_query_and_claim_each_others_keys() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = TestDevice::register(&a, "alice", "ALICEDEV", 1).await;
    let bob = TestDevice::register(&b, "bob", "BOBDEV", 2).await;
    for (relay, device) in [(&a, &alice), (&b, &bob)] {
        let url = format!("{}/_matrix/client/v3/keys/upload", relay.client_url);
        let r = relay
            .http
            .post_json(
                &url,
                Some(&device.token),
                &json!({
                    "device_keys": device.device_keys(),
                    "one_time_keys": device.one_time_keys([1]),
                    "fallback_keys": {"signed_curve25519:FB": device.key_object(200, true)},
                }),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for (relay, me, them) in [(&a, &alice, &bob), (&b, &bob, &alice)] {
        let query = format!("{}/_matrix/client/v3/keys/query", relay.client_url);
        let r = relay
            .http
            .post_json(
                &query,
                Some(&me.token),
                &json!({"device_keys": {them.user_id.clone(): []}, "timeout": 20000}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["failures"], json!({}), "{}", r.text);
        let mut served = r.json["device_keys"][&them.user_id][&them.device_id].clone();
        if let Some(object) = served.as_object_mut() {
            object.remove("unsigned");
        }
        assert_eq!(served, them.device_keys(), "{}", r.text);

        // The one-time key once, then the fallback key.
        let claim = format!("{}/_matrix/client/v3/keys/claim", relay.client_url);
        let body = json!({"one_time_keys": {them.user_id.clone(): {them.device_id.clone(): "signed_curve25519"}}, "timeout": 20000});
        let r = relay.http.post_json(&claim, Some(&me.token), &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.json["one_time_keys"][&them.user_id][&them.device_id]["signed_curve25519:AAAA001"],
            them.key_object(1, false),
            "{}",
            r.text
        );
        let r = relay.http.post_json(&claim, Some(&me.token), &body).await;
        assert_eq!(
            r.json["one_time_keys"][&them.user_id][&them.device_id]["signed_curve25519:FB"],
            them.key_object(200, true),
            "{}",
            r.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_users_master_key_is_served_and_signed_through_its_server() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = TestDevice::register(&a, "alice", "ALICEDEV", 1).await;
    let bob = TestDevice::register(&b, "bob", "BOBDEV", 2).await;
    // Both upload cross-signing keys: master, and the SSK/USK it signs.
    let (_, alice_usk) = upload_cross_signing(&a, &alice, 10).await;
    let (bob_keys, _) = upload_cross_signing(&b, &bob, 20).await;

    let query = format!("{}/_matrix/client/v3/keys/query", a.client_url);
    let r = a
        .http
        .post_json(
            &query,
            Some(&alice.token),
            &json!({"device_keys": {bob.user_id.clone(): []}, "timeout": 20000}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json["master_keys"][&bob.user_id], bob_keys["master_key"],
        "{}",
        r.text
    );
    assert_eq!(
        r.json["self_signing_keys"][&bob.user_id],
        bob_keys["self_signing_key"]
    );
    assert_eq!(
        r.json["user_signing_keys"],
        json!({}),
        "never another user's USK"
    );

    // Alice signs Bob's master key with her USK; A checks it against what
    // B serves. A key B does not know is refused.
    let usk_id = format!("ed25519:{}", public_key(&alice_usk));
    let mut signed = bob_keys["master_key"].clone();
    sign(&mut signed, &alice.user_id, &usk_id, &alice_usk);
    let master_pk = public_key(&key(20));
    let unknown = cross_signing_key(&bob.user_id, "master", &key(77));
    let url = format!("{}/_matrix/client/v3/keys/signatures/upload", a.client_url);
    let r = a
        .http
        .post_json(
            &url,
            Some(&alice.token),
            &json!({bob.user_id.clone(): {master_pk: signed, public_key(&key(77)): unknown}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let failures = r.json["failures"][&bob.user_id]
        .as_object()
        .expect("one failure")
        .clone();
    assert_eq!(failures.len(), 1, "{}", r.text);
    assert_eq!(failures[&public_key(&key(77))]["errcode"], "M_NOT_FOUND");
}

/// Uploads master, self-signing and user-signing keys (from seeds `seed`,
/// `seed + 1`, `seed + 2`) for `device`; returns the body and the USK.
async fn upload_cross_signing(
    relay: &TestRelay,
    device: &TestDevice,
    seed: u8,
) -> (Value, ed25519_dalek::SigningKey) {
    let (master, ssk, usk) = (key(seed), key(seed + 1), key(seed + 2));
    let master_id = format!("ed25519:{}", public_key(&master));
    let mut body = json!({
        "master_key": cross_signing_key(&device.user_id, "master", &master),
        "self_signing_key": cross_signing_key(&device.user_id, "self_signing", &ssk),
        "user_signing_key": cross_signing_key(&device.user_id, "user_signing", &usk),
    });
    for field in ["self_signing_key", "user_signing_key"] {
        sign(&mut body[field], &device.user_id, &master_id, &master);
    }
    let url = format!(
        "{}/_matrix/client/v3/keys/device_signing/upload",
        relay.client_url
    );
    let r = relay.http.post_json(&url, Some(&device.token), &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    (body, usk)
}
