//! Device management and the E2EE part of `/sync` against a real relay on
//! loopback: `GET /devices`, `GET`/`PUT`/`DELETE /devices/{id}` and `POST
//! /delete_devices` on the caller's own devices only, the dummy UIA stage
//! before a deletion, deletion removing tokens, inbox, device keys,
//! one-time and fallback keys (checked in the relay's store through a
//! second handle and through `/keys/claim`), the bad-input table with nothing changed, the key counts
//! and `device_lists` in every `/sync` response, `changed: [self]` after a
//! rename, a deletion or a key upload, a long-poll answering early on a
//! device change, old `td_<n>` tokens, and the RPC's display names, device
//! states and deletion.

use std::time::Duration;

use crate::support::TestRelay;
use crate::support::http::Response;
use crate::support::relay::encode;
use courier::store::keys::{ClaimWanted, DeviceQuery, KeysUpload, NewKey, UploadedDeviceKeys};
use courier::store::sqlite::SqliteStore;
use courier::store::{KeyStore, Store};
use serde_json::{Value, json};

/// Registers `@{name}:{server}` / `device` with token `tok_{name}_{device}`
/// and returns (user ID, token).
async fn device(relay: &TestRelay, name: &str, device: &str) -> (String, String) {
    let user = format!("@{name}:{}", relay.server_name);
    let token = format!("tok_{name}_{device}");
    relay.register_device(&user, device, &token).await;
    (user, token)
}

fn url(relay: &TestRelay, path: &str) -> String {
    format!("{}/_matrix/client/v3{path}", relay.client_url)
}

fn device_url(relay: &TestRelay, device_id: &str) -> String {
    url(relay, &format!("/devices/{}", encode(device_id)))
}

async fn list_devices(relay: &TestRelay, token: &str) -> Value {
    let r = relay.http.get(&url(relay, "/devices"), Some(token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["devices"].clone()
}

async fn delete_device(relay: &TestRelay, token: &str, device_id: &str, body: Value) -> Response {
    relay
        .http
        .request(
            "DELETE",
            &device_url(relay, device_id),
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await
}

fn dummy_auth() -> Value {
    json!({ "auth": { "type": "m.login.dummy", "session": "anything" } })
}

fn assert_error(r: &Response, status: u16, errcode: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.json["errcode"], errcode, "{}", r.text);
}

/// The UIA challenge: one flow of the dummy stage and a session.
fn assert_challenge(r: &Response) {
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        r.json["flows"],
        json!([{ "stages": ["m.login.dummy"] }]),
        "{}",
        r.text
    );
    assert!(r.json["session"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(r.json["params"].is_object());
}

/// A second handle on the relay's SQLite store (WAL: both may write).
async fn store(relay: &TestRelay) -> SqliteStore {
    SqliteStore::open(&relay.db_path())
        .await
        .expect("second handle on the relay's store")
}

/// Uploads device keys, `otks` one-time keys and a fallback key for a
/// device, straight into the store (the keys API is another lane's).
async fn upload_keys(store: &SqliteStore, user_id: &str, device_id: &str, otks: usize) {
    let keys = json!({ format!("curve25519:{device_id}"): format!("curve-{device_id}"),
                       format!("ed25519:{device_id}"): format!("ed-{device_id}") });
    let device_keys = json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": keys,
        "signatures": { user_id: { format!("ed25519:{device_id}"): "sig" } },
    });
    let identity = String::from_utf8(
        courier::canonical_json::to_canonical_bytes(&keys).expect("canonical keys"),
    )
    .expect("UTF-8");
    let key = |id: String| NewKey {
        algorithm: "signed_curve25519".to_owned(),
        key_json: json!({ "key": format!("k-{id}"), "signatures": {} }).to_string(),
        key_id: id,
    };
    let outcome = store
        .upload_keys(KeysUpload {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            device_keys: Some(UploadedDeviceKeys {
                json: device_keys.to_string(),
                identity,
            }),
            one_time_keys: (0..otks).map(|n| key(format!("otk{n}"))).collect(),
            fallback_keys: vec![key("fb".to_owned())],
            now_ms: courier::clock::now_ms(),
        })
        .await
        .expect("upload");
    assert!(
        matches!(outcome, courier::store::keys::UploadOutcome::Stored { .. }),
        "{outcome:?}"
    );
}

fn next_batch(r: &Response) -> String {
    r.json["next_batch"]
        .as_str()
        .unwrap_or_else(|| panic!("next_batch in {}", r.text))
        .to_owned()
}

/// The E2EE fields every `/sync` response carries, checked for shape, and
/// `device_lists.changed`.
fn changed(r: &Response) -> Vec<String> {
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.json["device_one_time_keys_count"]["signed_curve25519"].is_u64(),
        "signed_curve25519 is always counted: {}",
        r.text
    );
    assert!(
        r.json["device_unused_fallback_key_types"].is_array(),
        "{}",
        r.text
    );
    assert_eq!(r.json["device_lists"]["left"], json!([]), "{}", r.text);
    serde_json::from_value(r.json["device_lists"]["changed"].clone())
        .unwrap_or_else(|_| panic!("device_lists.changed is a list: {}", r.text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_listed_read_and_renamed_for_their_owner_only() {
    let relay = TestRelay::spawn().await;
    let (_, alice_a) = device(&relay, "alice", "A").await;
    let (_, _alice_b) = device(&relay, "alice", "B").await;
    let (_, bob_c) = device(&relay, "bob", "C").await;

    assert_eq!(
        list_devices(&relay, &alice_a).await,
        json!([{ "device_id": "A" }, { "device_id": "B" }])
    );
    assert_eq!(
        list_devices(&relay, &bob_c).await,
        json!([{ "device_id": "C" }])
    );

    let r = relay
        .http
        .put_json(
            &device_url(&relay, "B"),
            Some(&alice_a),
            &json!({ "display_name": "Laptop" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({}));
    let r = relay
        .http
        .get(&device_url(&relay, "B"), Some(&alice_a))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json,
        json!({ "device_id": "B", "display_name": "Laptop" })
    );

    // The r0 paths are the same routes.
    let r = relay
        .http
        .get(
            &format!("{}/_matrix/client/r0/devices", relay.client_url),
            Some(&alice_a),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json["devices"],
        json!([{ "device_id": "A" }, { "device_id": "B", "display_name": "Laptop" }])
    );

    // Absent display_name: nothing changes; null clears it.
    let r = relay
        .http
        .put_json(&device_url(&relay, "B"), Some(&alice_a), &json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay
        .http
        .get(&device_url(&relay, "B"), Some(&alice_a))
        .await;
    assert_eq!(r.json["display_name"], "Laptop");
    let r = relay
        .http
        .put_json(
            &device_url(&relay, "B"),
            Some(&alice_a),
            &json!({ "display_name": null }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay
        .http
        .get(&device_url(&relay, "B"), Some(&alice_a))
        .await;
    assert_eq!(r.json, json!({ "device_id": "B" }));

    // Another user's device is as unknown as a missing one, for reading
    // and for renaming, and the rename changes nothing of it.
    for device_id in ["C", "NOPE"] {
        let r = relay
            .http
            .get(&device_url(&relay, device_id), Some(&alice_a))
            .await;
        assert_error(&r, 404, "M_NOT_FOUND");
        for body in [json!({ "display_name": "Mine now" }), json!({})] {
            let r = relay
                .http
                .put_json(&device_url(&relay, device_id), Some(&alice_a), &body)
                .await;
            assert_error(&r, 404, "M_NOT_FOUND");
        }
    }
    assert_eq!(
        list_devices(&relay, &bob_c).await,
        json!([{ "device_id": "C" }])
    );

    // No token, a wrong token.
    let r = relay.http.get(&url(&relay, "/devices"), None).await;
    assert_error(&r, 401, "M_MISSING_TOKEN");
    let r = relay.http.get(&url(&relay, "/devices"), Some("nope")).await;
    assert_error(&r, 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_long_names_are_refused_and_change_nothing() {
    let relay = TestRelay::spawn().await;
    let (_, token) = device(&relay, "alice", "A").await;
    let (_, _) = device(&relay, "alice", "B").await;
    let before = list_devices(&relay, &token).await;

    // 100 characters (200 bytes) is the longest name; 101 is refused.
    let longest = "é".repeat(100);
    let r = relay
        .http
        .put_json(
            &device_url(&relay, "A"),
            Some(&token),
            &json!({ "display_name": longest }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay
        .http
        .put_json(
            &device_url(&relay, "A"),
            Some(&token),
            &json!({ "display_name": "x".repeat(101) }),
        )
        .await;
    assert_error(&r, 400, "M_TOO_LARGE");
    let r = relay.http.get(&device_url(&relay, "A"), Some(&token)).await;
    assert_eq!(r.json["display_name"], longest.as_str(), "unchanged");

    let put = |body: &'static [u8]| {
        let url = device_url(&relay, "B");
        let token = token.clone();
        let relay = &relay;
        async move {
            relay
                .http
                .request("PUT", &url, Some(&token), Some(body.to_vec()))
                .await
        }
    };
    assert_error(&put(b"{\"display_name\": 5}").await, 400, "M_BAD_JSON");
    assert_error(
        &put(b"{\"display_name\": [\"x\"]}").await,
        400,
        "M_BAD_JSON",
    );
    assert_error(&put(b"not json").await, 400, "M_NOT_JSON");
    assert_error(&put(b"[1, 2]").await, 400, "M_BAD_JSON");

    let post = |body: Vec<u8>| {
        let url = url(&relay, "/delete_devices");
        let token = token.clone();
        let relay = &relay;
        async move {
            relay
                .http
                .request("POST", &url, Some(&token), Some(body))
                .await
        }
    };
    let with_auth = |devices: Value| {
        json!({ "devices": devices, "auth": { "type": "m.login.dummy" } })
            .to_string()
            .into_bytes()
    };
    assert_error(
        &post(
            json!({ "auth": { "type": "m.login.dummy" } })
                .to_string()
                .into_bytes(),
        )
        .await,
        400,
        "M_MISSING_PARAM",
    );
    assert_error(&post(with_auth(json!("B"))).await, 400, "M_BAD_JSON");
    assert_error(&post(with_auth(json!(["B", 7]))).await, 400, "M_BAD_JSON");
    let too_many: Vec<String> = (0..1001).map(|n| format!("D{n}")).collect();
    assert_error(&post(with_auth(json!(too_many))).await, 413, "M_TOO_LARGE");
    assert_error(&post(b"{not json".to_vec()).await, 400, "M_NOT_JSON");
    assert_error(&post(b"[\"B\"]".to_vec()).await, 400, "M_BAD_JSON");
    // A JSON body that is not an object is refused on DELETE too.
    let r = relay
        .http
        .request(
            "DELETE",
            &device_url(&relay, "B"),
            Some(&token),
            Some(b"[\"auth\"]".to_vec()),
        )
        .await;
    assert_error(&r, 400, "M_BAD_JSON");

    let after = list_devices(&relay, &token).await;
    assert_eq!(
        after.as_array().map(Vec::len),
        before.as_array().map(Vec::len),
        "no device was deleted: {after}"
    );
    let r = relay.http.get(&device_url(&relay, "B"), Some(&token)).await;
    assert_eq!(r.json, json!({ "device_id": "B" }), "B was not renamed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_needs_the_dummy_stage_then_removes_tokens_keys_and_inbox() {
    let relay = TestRelay::spawn().await;
    let (alice, alice_a) = device(&relay, "alice", "A").await;
    let (_, alice_b) = device(&relay, "alice", "B").await;
    let (bob, bob_c) = device(&relay, "bob", "C").await;
    let store = store(&relay).await;
    upload_keys(&store, &alice, "B", 3).await;
    upload_keys(&store, &bob, "C", 3).await;
    let r = relay
        .send_to_device(
            &bob_c,
            "m.test",
            "t1",
            json!({ alice.clone(): { "B": { "for": "B" } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let pending = store.fetch_inbox(&alice, "B", 0, 100).await.expect("inbox");
    assert_eq!(pending.messages.len(), 1);

    // Before the deletion, B's one-time keys can be claimed.
    let claim_url = url(&relay, "/keys/claim");
    let claim_body = json!({ "one_time_keys": { alice.clone(): { "B": "signed_curve25519" } } });
    let claim = || relay.http.post_json(&claim_url, Some(&bob_c), &claim_body);
    let r = claim().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.json["one_time_keys"][alice.as_str()]["B"].is_object(),
        "a key of B: {}",
        r.text
    );

    // Without auth (no body, `{}`, or a body that is not JSON): the
    // challenge, and nothing is deleted.
    for body in [None, Some(b"{}".to_vec()), Some(b"not json".to_vec())] {
        let r = relay
            .http
            .request("DELETE", &device_url(&relay, "B"), Some(&alice_a), body)
            .await;
        assert_challenge(&r);
    }
    // Another stage than the dummy one: the challenge with M_UNRECOGNIZED.
    let r = delete_device(
        &relay,
        &alice_a,
        "B",
        json!({ "auth": { "type": "m.login.password", "password": "x" } }),
    )
    .await;
    assert_challenge(&r);
    assert_eq!(r.json["errcode"], "M_UNRECOGNIZED");
    assert_eq!(
        list_devices(&relay, &alice_a)
            .await
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    let r = delete_device(&relay, &alice_a, "B", dummy_auth()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({}));
    assert_eq!(
        list_devices(&relay, &alice_a).await,
        json!([{ "device_id": "A" }])
    );
    // The token, the inbox, the keys, the one-time and fallback keys are gone.
    let r = relay.sync(&alice_b, None, 0).await;
    assert_error(&r, 401, "M_UNKNOWN_TOKEN");
    assert!(
        store
            .fetch_inbox(&alice, "B", 0, 100)
            .await
            .expect("inbox")
            .messages
            .is_empty()
    );
    let counts = store.key_counts(&alice, "B").await.expect("counts");
    assert!(counts.one_time.is_empty(), "{counts:?}");
    assert!(counts.unused_fallback.is_empty(), "{counts:?}");
    let queried = store
        .user_devices(vec![DeviceQuery {
            user_id: alice.clone(),
            device_ids: vec!["B".to_owned()],
        }])
        .await
        .expect("query");
    assert!(queried[0].devices.is_empty(), "{queried:?}");
    let claimed = store
        .claim_keys(
            vec![ClaimWanted {
                user_id: alice.clone(),
                device_id: "B".to_owned(),
                algorithm: "signed_curve25519".to_owned(),
            }],
            courier::clock::now_ms(),
        )
        .await
        .expect("claim");
    assert!(
        claimed.is_empty(),
        "nothing to claim of a deleted device: {claimed:?}"
    );
    let r = claim().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.json["one_time_keys"][alice.as_str()]["B"].is_null(),
        "/keys/claim finds nothing of B: {}",
        r.text
    );

    // Deleted already: the challenge, then 200 again.
    let r = delete_device(&relay, &alice_a, "B", json!({})).await;
    assert_challenge(&r);
    let r = delete_device(&relay, &alice_a, "B", dummy_auth()).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Another user's device: 200, as for any device the caller does not
    // have, and it stays with its keys.
    let r = delete_device(&relay, &alice_a, "C", dummy_auth()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        list_devices(&relay, &bob_c).await,
        json!([{ "device_id": "C" }])
    );
    let counts = store.key_counts(&bob, "C").await.expect("counts");
    assert_eq!(counts.one_time.get("signed_curve25519"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_devices_removes_the_listed_devices_of_the_caller() {
    let relay = TestRelay::spawn().await;
    let (_, alice_a) = device(&relay, "alice", "A").await;
    let (_, alice_b) = device(&relay, "alice", "B").await;
    let (_, _) = device(&relay, "alice", "C").await;
    let (_, bob_d) = device(&relay, "bob", "D").await;
    let delete_url = url(&relay, "/delete_devices");

    let body = json!({ "devices": ["B", "C", "D", "UNKNOWN", "B"] });
    let r = relay
        .http
        .post_json(&delete_url, Some(&alice_a), &body)
        .await;
    assert_challenge(&r);
    assert_eq!(
        list_devices(&relay, &alice_a)
            .await
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    let mut body = body;
    body["auth"] = json!({ "type": "m.login.dummy", "session": "s" });
    let r = relay
        .http
        .post_json(&delete_url, Some(&alice_a), &body)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({}));
    assert_eq!(
        list_devices(&relay, &alice_a).await,
        json!([{ "device_id": "A" }])
    );
    assert_error(&relay.sync(&alice_b, None, 0).await, 401, "M_UNKNOWN_TOKEN");
    // Bob's D, named in Alice's list, is Bob's still.
    assert_eq!(
        list_devices(&relay, &bob_d).await,
        json!([{ "device_id": "D" }])
    );
    // An empty list deletes nothing.
    let r = relay
        .http
        .post_json(
            &delete_url,
            Some(&alice_a),
            &json!({ "devices": [], "auth": { "type": "m.login.dummy" } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        list_devices(&relay, &alice_a)
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sync_carries_key_counts_and_device_lists() {
    let relay = TestRelay::spawn().await;
    let (alice, alice_a) = device(&relay, "alice", "A").await;
    let (_, alice_b) = device(&relay, "alice", "B").await;
    let (_, bob_c) = device(&relay, "bob", "C").await;
    let (_, _) = device(&relay, "alice", "D").await;

    // Initial sync: zero counts, no fallback types, nothing changed.
    let r = relay.sync(&alice_a, None, 0).await;
    assert_eq!(changed(&r), Vec::<String>::new());
    assert_eq!(
        r.json["device_one_time_keys_count"],
        json!({ "signed_curve25519": 0 })
    );
    assert_eq!(r.json["device_unused_fallback_key_types"], json!([]));
    let since_a = next_batch(&r);
    let since_bob = next_batch(&relay.sync(&bob_c, None, 0).await);

    // New device keys (and keys to count) for A: A's counts, and both of
    // Alice's devices hear that her device list changed; Bob does not.
    let store = store(&relay).await;
    upload_keys(&store, &alice, "A", 5).await;
    let r = relay.sync(&alice_a, Some(&since_a), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()]);
    assert_eq!(
        r.json["device_one_time_keys_count"],
        json!({ "signed_curve25519": 5 })
    );
    assert_eq!(
        r.json["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    let since_a = next_batch(&r);
    let r = relay.sync(&bob_c, Some(&since_bob), 0).await;
    assert_eq!(changed(&r), Vec::<String>::new());
    let since_bob = next_batch(&r);

    // Reported once: the next token is past the change.
    let r = relay.sync(&alice_a, Some(&since_a), 0).await;
    assert_eq!(changed(&r), Vec::<String>::new());
    let since_a = next_batch(&r);

    // A rename from another of her devices.
    let r = relay
        .http
        .put_json(
            &device_url(&relay, "B"),
            Some(&alice_b),
            &json!({ "display_name": "Tablet" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay.sync(&alice_a, Some(&since_a), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()]);
    let since_a = next_batch(&r);

    // A deletion.
    let r = delete_device(&relay, &alice_b, "D", dummy_auth()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay.sync(&alice_a, Some(&since_a), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()]);
    // A's counts are A's: B has none.
    let r = relay.sync(&alice_b, None, 0).await;
    assert_eq!(
        r.json["device_one_time_keys_count"],
        json!({ "signed_curve25519": 0 })
    );
    // Bob heard of none of it.
    let r = relay.sync(&bob_c, Some(&since_bob), 0).await;
    assert_eq!(changed(&r), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_early_when_a_device_of_the_user_changes() {
    let relay = TestRelay::spawn().await;
    let (alice, alice_a) = device(&relay, "alice", "A").await;
    let (_, alice_b) = device(&relay, "alice", "B").await;
    let (_, _) = device(&relay, "alice", "C").await;

    for change in ["rename", "delete"] {
        let since = next_batch(&relay.sync(&alice_a, None, 0).await);
        let poll_url = format!(
            "{}/_matrix/client/v3/sync?timeout=60000&since={}",
            relay.client_url,
            encode(&since)
        );
        let client = crate::support::http::HttpClient::new();
        let token = alice_a.clone();
        let mut poll = tokio::spawn(async move { client.get(&poll_url, Some(&token)).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut poll)
                .await
                .is_err(),
            "a long-poll with nothing new waits"
        );
        let r = match change {
            "rename" => {
                relay
                    .http
                    .put_json(
                        &device_url(&relay, "B"),
                        Some(&alice_b),
                        &json!({ "display_name": "new name" }),
                    )
                    .await
            }
            _ => delete_device(&relay, &alice_b, "C", dummy_auth()).await,
        };
        assert_eq!(r.status, 200, "{}", r.text);
        let response = tokio::time::timeout(Duration::from_secs(50), poll)
            .await
            .unwrap_or_else(|_| panic!("the long-poll answered well before 60 s on a {change}"))
            .expect("poll task");
        assert_eq!(changed(&response), vec![alice.clone()], "{change}");
        assert_eq!(response.json["to_device"]["events"], json!([]));
    }

    // A change already logged when the long-poll starts (written through
    // another store handle, so nothing wakes anyone) is answered at once,
    // not after the timeout: the first read checks the device-list log too.
    let since = next_batch(&relay.sync(&alice_a, None, 0).await);
    upload_keys(&store(&relay).await, &alice, "A", 1).await;
    let response = tokio::time::timeout(
        Duration::from_secs(50),
        relay.sync(&alice_a, Some(&since), 60_000),
    )
    .await
    .expect("a pending change answers well before the 60 s timeout");
    assert_eq!(changed(&response), vec![alice.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_td_tokens_stay_valid_and_the_rpc_inbox_keeps_the_device_list_part() {
    let relay = TestRelay::spawn().await;
    let (alice, alice_a) = device(&relay, "alice", "A").await;
    let (_, bob_b) = device(&relay, "bob", "B").await;
    let store = store(&relay).await;
    upload_keys(&store, &alice, "A", 1).await;
    let r = relay
        .send_to_device(
            &bob_b,
            "m.test",
            "t1",
            json!({ alice.clone(): { "A": { "n": 1 } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A token of the old form has device-list position 0: every change in
    // the log came after it, so the user's own change is reported once.
    let r = relay.sync(&alice_a, Some("td_0"), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()]);
    assert_eq!(
        r.json["to_device"]["events"].as_array().map(Vec::len),
        Some(1)
    );
    let token = next_batch(&r);
    assert!(
        token.starts_with("td_") && token.matches('_').count() == 2,
        "the new token carries a device-list position: {token}"
    );
    let r = relay.sync(&alice_a, Some(&token), 0).await;
    assert_eq!(changed(&r), Vec::<String>::new());
    assert_eq!(r.json["to_device"]["events"], json!([]));

    // Malformed tokens of either form.
    for bad in ["td_1_0", "td_1_", "td_x", "td_1_2_3"] {
        let r = relay.sync(&alice_a, Some(bad), 0).await;
        assert_error(&r, 400, "M_INVALID_PARAM");
    }

    // The RPC inbox takes both forms and passes the device-list part on.
    let inbox = |since: &str| {
        let url = format!(
            "{}/_courier/v1/inbox/{}/{}?since={}",
            relay.rpc_url,
            encode(&alice),
            "A",
            encode(since)
        );
        let relay = &relay;
        async move { relay.http.get(&url, Some(&relay.rpc_secret)).await }
    };
    let r = inbox("td_0").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        !next_batch(&r).contains("_0_") && next_batch(&r).matches('_').count() == 1,
        "an old token stays old: {}",
        r.text
    );
    let r = inbox(&token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let position = token.rsplit('_').next().expect("device-list part");
    assert!(
        next_batch(&r).ends_with(&format!("_{position}")),
        "{} keeps {position}",
        r.text
    );
    assert_error(&inbox("td_1_0").await, 400, "M_INVALID_PARAM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_names_devices_lists_their_key_state_and_deletes_their_keys() {
    let relay = TestRelay::spawn().await;
    let alice = format!("@alice:{}", relay.server_name);
    let (_, alice_a) = device(&relay, "alice", "A").await;
    let since = next_batch(&relay.sync(&alice_a, None, 0).await);
    let register = |device_id: &'static str, body: Value| {
        let url = format!(
            "{}/_courier/v1/devices/{}/{device_id}",
            relay.rpc_url,
            encode(&alice)
        );
        let relay = &relay;
        async move {
            relay
                .http
                .put_json(&url, Some(&relay.rpc_secret), &body)
                .await
        }
    };

    // Registration with a name, which is a device-list change.
    let r = register(
        "B",
        json!({ "access_token": "tok_b", "display_name": "Phone" }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay
        .http
        .get(&device_url(&relay, "B"), Some(&alice_a))
        .await;
    assert_eq!(r.json, json!({ "device_id": "B", "display_name": "Phone" }));
    let r = relay.sync(&alice_a, Some(&since), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()]);
    let since = next_batch(&r);
    // The same name again (a login): no change logged.
    let r = register(
        "B",
        json!({ "access_token": "tok_b2", "display_name": "Phone" }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay.sync(&alice_a, Some(&since), 0).await;
    assert_eq!(changed(&r), Vec::<String>::new());
    let since = next_batch(&r);

    // Bad names: nothing registered or renamed.
    let r = register("C", json!({ "display_name": "x".repeat(101) })).await;
    assert_error(&r, 400, "M_TOO_LARGE");
    let r = register("C", json!({ "display_name": 12 })).await;
    assert_error(&r, 400, "M_BAD_JSON");
    let r = register("B", json!({ "display_name": "y".repeat(101) })).await;
    assert_error(&r, 400, "M_TOO_LARGE");
    assert_eq!(
        list_devices(&relay, &alice_a).await,
        json!([{ "device_id": "A" }, { "device_id": "B", "display_name": "Phone" }])
    );

    // The device states.
    let store = store(&relay).await;
    upload_keys(&store, &alice, "B", 2).await;
    let states_url = format!(
        "{}/_courier/v1/users/{}/devices",
        relay.rpc_url,
        encode(&alice)
    );
    let r = relay.http.get(&states_url, Some(&relay.rpc_secret)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["user_id"], alice.as_str());
    assert!(
        r.json["stream_id"].as_i64().is_some_and(|n| n >= 2),
        "{}",
        r.text
    );
    assert_eq!(
        r.json["devices"],
        json!([
            { "device_id": "A", "display_name": null, "has_device_keys": false,
              "one_time_key_counts": { "signed_curve25519": 0 },
              "unused_fallback_key_types": [] },
            { "device_id": "B", "display_name": "Phone", "has_device_keys": true,
              "one_time_key_counts": { "signed_curve25519": 2 },
              "unused_fallback_key_types": ["signed_curve25519"] },
        ])
    );
    let r = relay
        .http
        .get(
            &format!(
                "{}/_courier/v1/users/{}/devices",
                relay.rpc_url,
                encode("@x:elsewhere.example")
            ),
            Some(&relay.rpc_secret),
        )
        .await;
    assert_error(&r, 400, "M_INVALID_PARAM");
    let r = relay.http.get(&states_url, None).await;
    assert_error(&r, 401, "M_MISSING_TOKEN");
    let r = relay.sync(&alice_a, Some(&since), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()], "the key upload");
    let since = next_batch(&r);

    // Deletion over the RPC removes the keys and is a change.
    let delete_url = format!("{}/_courier/v1/devices/{}/B", relay.rpc_url, encode(&alice));
    let r = relay
        .http
        .request("DELETE", &delete_url, Some(&relay.rpc_secret), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let counts = store.key_counts(&alice, "B").await.expect("counts");
    assert!(
        counts.one_time.is_empty() && counts.unused_fallback.is_empty(),
        "{counts:?}"
    );
    let r = relay.sync(&alice_a, Some(&since), 0).await;
    assert_eq!(changed(&r), vec![alice.clone()], "the deletion");
    let r = relay
        .http
        .request("DELETE", &delete_url, Some(&relay.rpc_secret), None)
        .await;
    assert_error(&r, 404, "M_NOT_FOUND");

    // Both kinds of change are counted.
    let r = relay
        .http
        .get(
            &format!("{}/metrics", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await;
    for series in [
        "courier_device_deletions_total{api=\"rpc\"}",
        "courier_device_renames_total{api=\"rpc\"}",
    ] {
        assert!(r.text.contains(series), "{series} in /metrics");
    }
}
