//! The HTTP edges of device-list updates (issue 16) on a real relay: the
//! RPC's `device_list/servers` and `device_list/tracking` routes (their
//! validation, and a round trip through the store), a federation key query
//! recording the asking server's interest, `GET /keys/changes` and its
//! parameters, and a `/send` transaction mixing a to-device EDU with a
//! malformed and a spoofed device-list EDU (answered 200, the message
//! delivered), and an untrack over the RPC showing in `/sync`
//! `device_lists.left` and `/keys/changes`. Federation requests come from a
//! fake origin whose key is put into the relay's key cache, as in
//! `e2ee_federation`.

use crate::support::e2ee::{FedClient, TestDevice};
use crate::support::relay::encode;
use crate::support::{TestRelay, TestRelayOptions};
use courier::keys::ServerSigningKey;
use courier::store::sqlite::SqliteStore;
use courier::store::{Store, StoredServerKey};
use serde_json::{Value, json};

const FAKE_ORIGIN: &str = "127.0.0.1:1";

struct Fixture {
    relay: TestRelay,
    fed: FedClient,
    alice: TestDevice,
}

impl Fixture {
    async fn new() -> Fixture {
        let relay = TestRelay::spawn_with(TestRelayOptions::default()).await;
        let store = SqliteStore::open(&relay.db_path())
            .await
            .expect("second handle on the relay's store");
        let key = ServerSigningKey::from_seed("fake1", [42; 32]);
        store
            .put_server_keys(vec![StoredServerKey {
                server_name: FAKE_ORIGIN.to_owned(),
                key_id: key.key_id().to_owned(),
                public_key: key.public_key_base64(),
                valid_until_ts: courier::clock::now_ms() + 3_600_000,
            }])
            .await
            .expect("test key stored");
        let fed = FedClient::new(&relay, FAKE_ORIGIN, key);
        let alice = TestDevice::register(&relay, "alice", "ALICEDEV", 1).await;
        Fixture { relay, fed, alice }
    }

    fn rpc_url(&self, user: &str, what: &str) -> String {
        format!(
            "{}/_courier/v1/users/{}/device_list/{what}",
            self.relay.rpc_url,
            encode(user)
        )
    }

    async fn rpc_put(&self, user: &str, what: &str, body: &Value) -> (u16, Value) {
        let r = self
            .relay
            .http
            .put_json(
                &self.rpc_url(user, what),
                Some(&self.relay.rpc_secret),
                body,
            )
            .await;
        (r.status, r.json)
    }

    async fn rpc_get(&self, user: &str, what: &str) -> Value {
        let r = self
            .relay
            .http
            .get(&self.rpc_url(user, what), Some(&self.relay.rpc_secret))
            .await;
        assert_eq!(r.status, 200, "GET {what}: {}", r.text);
        r.json
    }

    async fn key_changes(&self, query: &str) -> (u16, Value) {
        let url = format!(
            "{}/_matrix/client/v3/keys/changes{query}",
            self.relay.client_url
        );
        let r = self.relay.http.get(&url, Some(&self.alice.token)).await;
        (r.status, r.json)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_rpc_refuses_bad_input_and_changes_nothing() {
    let f = Fixture::new().await;
    let alice = f.alice.user_id.clone();
    let ours = f.relay.server_name.clone();
    let many: Vec<String> = (0..1001).map(|i| format!("s{i}.example")).collect();
    let many_users: Vec<String> = (0..1001).map(|i| format!("@u{i}:x.example")).collect();
    let cases: Vec<(&str, String, Value, &str)> = vec![
        (
            "servers",
            "@bob:elsewhere.example".into(),
            json!({"add": ["a.example"]}),
            "M_INVALID_PARAM",
        ),
        (
            "servers",
            "not-a-user".into(),
            json!({"add": ["a.example"]}),
            "M_INVALID_PARAM",
        ),
        (
            "servers",
            alice.clone(),
            json!({"add": ["bad server!"]}),
            "M_INVALID_PARAM",
        ),
        (
            "servers",
            alice.clone(),
            json!({"add": [ours]}),
            "M_INVALID_PARAM",
        ),
        (
            "servers",
            alice.clone(),
            json!({"add": "a.example"}),
            "M_BAD_JSON",
        ),
        ("servers", alice.clone(), json!({"add": [1]}), "M_BAD_JSON"),
        (
            "servers",
            alice.clone(),
            json!({"add": many}),
            "M_INVALID_PARAM",
        ),
        (
            "servers",
            alice.clone(),
            json!({"add": ["a.example"], "remove": ["a.example"]}),
            "M_INVALID_PARAM",
        ),
        ("servers", alice.clone(), json!([]), "M_BAD_JSON"),
        (
            "tracking",
            "@bob:elsewhere.example".into(),
            json!({"track": ["@c:a.example"]}),
            "M_INVALID_PARAM",
        ),
        (
            "tracking",
            alice.clone(),
            json!({"track": ["c:a.example"]}),
            "M_INVALID_PARAM",
        ),
        (
            "tracking",
            alice.clone(),
            json!({"untrack": {}}),
            "M_BAD_JSON",
        ),
        (
            "tracking",
            alice.clone(),
            json!({"track": many_users}),
            "M_INVALID_PARAM",
        ),
        (
            "tracking",
            alice.clone(),
            json!({"track": ["@c:a.example"], "untrack": ["@c:a.example"]}),
            "M_INVALID_PARAM",
        ),
    ];
    for (what, user, body, errcode) in &cases {
        let (status, json) = f.rpc_put(user, what, body).await;
        assert_eq!(status, 400, "{what} {user} {body}: {json}");
        assert_eq!(json["errcode"], *errcode, "{what} {user} {body}: {json}");
    }
    // Not JSON at all.
    let r = f
        .relay
        .http
        .request(
            "PUT",
            &f.rpc_url(&alice, "servers"),
            Some(&f.relay.rpc_secret),
            Some(b"{".to_vec()),
        )
        .await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (400, Some("M_NOT_JSON"))
    );
    // Every route needs the secret.
    for method in ["GET", "PUT"] {
        for what in ["servers", "tracking"] {
            let r = f
                .relay
                .http
                .request(method, &f.rpc_url(&alice, what), None, Some(b"{}".to_vec()))
                .await;
            assert_eq!(r.status, 401, "{method} {what}: {}", r.text);
        }
    }
    // A GET of a non-local user is refused the same way.
    let r = f
        .relay
        .http
        .get(
            &f.rpc_url("@bob:elsewhere.example", "servers"),
            Some(&f.relay.rpc_secret),
        )
        .await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM"))
    );
    // Nothing was stored by the refusals.
    assert_eq!(f.rpc_get(&alice, "servers").await, json!({"servers": []}));
    assert_eq!(f.rpc_get(&alice, "tracking").await, json!({"tracked": []}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_list_rpc_round_trips_and_a_federation_query_records_interest() {
    let f = Fixture::new().await;
    let alice = f.alice.user_id.clone();
    let (status, json) = f
        .rpc_put(
            &alice,
            "servers",
            &json!({"add": ["b.example", "a.example"]}),
        )
        .await;
    assert_eq!(status, 200, "{json}");
    let both = json!({"servers": [
        {"server_name": "a.example", "expires_ts": null},
        {"server_name": "b.example", "expires_ts": null},
    ]});
    assert_eq!(json, both);
    // The same body again changes nothing.
    let (_, again) = f
        .rpc_put(
            &alice,
            "servers",
            &json!({"add": ["b.example", "a.example"]}),
        )
        .await;
    assert_eq!(again, both);
    assert_eq!(f.rpc_get(&alice, "servers").await, both);
    let (status, json) = f
        .rpc_put(&alice, "servers", &json!({"remove": ["a.example"]}))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json,
        json!({"servers": [{"server_name": "b.example", "expires_ts": null}]})
    );

    // A federation key query from the fake origin makes it interested for
    // the configured window (30 days by default).
    let before = courier::clock::now_ms();
    let reply = f
        .fed
        .send(
            "POST",
            "/_matrix/federation/v1/user/keys/query",
            Some(&json!({"device_keys": {alice.clone(): []}})),
            true,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    let servers = f.rpc_get(&alice, "servers").await;
    let listed = servers["servers"].as_array().expect("array");
    assert_eq!(listed.len(), 2, "{servers}");
    let queried = listed
        .iter()
        .find(|s| s["server_name"] == FAKE_ORIGIN)
        .unwrap_or_else(|| panic!("{FAKE_ORIGIN} listed: {servers}"));
    let expires = queried["expires_ts"].as_i64().expect("an expiry");
    let window = 30 * 24 * 3_600_000;
    assert!(
        expires >= before + window && expires <= courier::clock::now_ms() + window,
        "{servers}"
    );

    // Tracking: local and remote users, sorted; untrack removes.
    let bob = "@bob:remote.example";
    let carol = format!("@carol:{}", f.relay.server_name);
    let (status, json) = f
        .rpc_put(&alice, "tracking", &json!({"track": [bob, carol]}))
        .await;
    assert_eq!(status, 200, "{json}");
    let mut want = vec![bob.to_owned(), carol.clone()];
    want.sort();
    assert_eq!(json, json!({"tracked": want}));
    assert_eq!(
        f.rpc_get(&alice, "tracking").await,
        json!({"tracked": want})
    );
    let (status, json) = f
        .rpc_put(&alice, "tracking", &json!({"untrack": [bob]}))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json, json!({"tracked": [carol]}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_changes_needs_two_tokens_and_reports_own_changes_between_them() {
    let f = Fixture::new().await;
    let first = f.relay.sync(&f.alice.token, None, 0).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let from = first.json["next_batch"].as_str().expect("token").to_owned();
    for (query, status, errcode) in [
        (String::new(), 400, "M_MISSING_PARAM"),
        (format!("?from={}", encode(&from)), 400, "M_MISSING_PARAM"),
        (format!("?to={}", encode(&from)), 400, "M_MISSING_PARAM"),
        (
            format!("?from=nonsense&to={}", encode(&from)),
            400,
            "M_INVALID_PARAM",
        ),
        (
            format!("?from={}&to=s72_1", encode(&from)),
            400,
            "M_INVALID_PARAM",
        ),
        (
            format!("?from={}&to=", encode(&from)),
            400,
            "M_INVALID_PARAM",
        ),
    ] {
        let (got, json) = f.key_changes(&query).await;
        assert_eq!(
            (got, json["errcode"].as_str()),
            (status, Some(errcode)),
            "{query}: {json}"
        );
    }
    // No access token, no answer (the r0 path is the same route).
    let r = f
        .relay
        .http
        .get(
            &format!(
                "{}/_matrix/client/r0/keys/changes?from={}&to={}",
                f.relay.client_url,
                encode(&from),
                encode(&from)
            ),
            None,
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);

    // Same token twice: nothing.
    let same = format!("?from={0}&to={0}", encode(&from));
    let (status, json) = f.key_changes(&same).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json, json!({"changed": [], "left": []}));

    // A rename of alice's own device is a change between the tokens.
    let url = format!(
        "{}/_matrix/client/v3/devices/{}",
        f.relay.client_url, f.alice.device_id
    );
    let r = f
        .relay
        .http
        .put_json(
            &url,
            Some(&f.alice.token),
            &json!({"display_name": "laptop"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let next = f.relay.sync(&f.alice.token, Some(&from), 0).await;
    let to = next.json["next_batch"].as_str().expect("token").to_owned();
    let between = format!("?from={}&to={}", encode(&from), encode(&to));
    let (status, json) = f.key_changes(&between).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"], json!([f.alice.user_id]), "{json}");
    assert_eq!(json["left"], json!([]), "{json}");
    // Backwards: nothing.
    let backwards = format!("?from={}&to={}", encode(&to), encode(&from));
    let (status, json) = f.key_changes(&backwards).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"], json!([]), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_with_bad_device_list_edus_still_delivers_its_to_device_message() {
    let f = Fixture::new().await;
    let alice = f.alice.user_id.clone();
    let body = json!({
        "origin": FAKE_ORIGIN,
        "origin_server_ts": 1,
        "pdus": [],
        "edus": [
            {"edu_type": "m.device_list_update", "content": "not an object"},
            {"edu_type": "m.device_list_update", "content": {
                "user_id": "@mallory:elsewhere.example", "device_id": "EVIL",
                "stream_id": 1, "deleted": true}},
            {"edu_type": "m.signing_key_update", "content": {
                "user_id": alice.clone(), "master_key": {}}},
            {"edu_type": "m.direct_to_device", "content": {
                "sender": format!("@remote:{FAKE_ORIGIN}"), "type": "m.test",
                "message_id": "mixed-1",
                "messages": {alice.clone(): {"ALICEDEV": {"hello": "mixed"}}}}},
        ]
    });
    let reply = f
        .fed
        .send(
            "PUT",
            "/_matrix/federation/v1/send/mixed-txn",
            Some(&body),
            true,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json, json!({"pdus": {}}));
    let (events, _) = f
        .relay
        .sync_until(&f.alice.token, None, 1, std::time::Duration::from_secs(10))
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["content"], json!({"hello": "mixed"}));
    // The spoofed updates reached nothing: nobody tracks mallory, and
    // alice's own list is unchanged.
    let r = f
        .relay
        .http
        .post_json(
            &format!("{}/_matrix/client/v3/keys/query", f.relay.client_url),
            Some(&f.alice.token),
            &json!({"device_keys": {alice.clone(): []}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json["master_keys"].get(&alice).is_none(), "{}", r.text);
    // The retransmitted transaction is answered from the store, the same.
    let reply = f
        .fed
        .send(
            "PUT",
            "/_matrix/federation/v1/send/mixed-txn",
            Some(&body),
            true,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json, json!({"pdus": {}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untracking_over_the_rpc_shows_in_sync_left_and_keys_changes() {
    let f = Fixture::new().await;
    let alice = f.alice.user_id.clone();
    let bob = "@bob:remote.example";
    let (status, json) = f
        .rpc_put(&alice, "tracking", &json!({"track": [bob]}))
        .await;
    assert_eq!(status, 200, "{json}");
    let first = f.relay.sync(&f.alice.token, None, 0).await;
    let from = first.json["next_batch"].as_str().expect("token").to_owned();
    // A long-poll from that token answers once bob is untracked.
    let poll = {
        let (url, token) = (
            format!(
                "{}/_matrix/client/v3/sync?timeout=20000&since={}",
                f.relay.client_url,
                encode(&from)
            ),
            f.alice.token.clone(),
        );
        let http = crate::support::http::HttpClient::new();
        tokio::spawn(async move { http.get(&url, Some(&token)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, json) = f
        .rpc_put(&alice, "tracking", &json!({"untrack": [bob]}))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json, json!({"tracked": []}));
    let polled = poll.await.expect("long-poll task");
    assert_eq!(polled.status, 200, "{}", polled.text);
    let mut next = polled.json;
    if next["device_lists"]["left"] == json!([]) {
        // The long-poll ended for another reason (or before the untrack
        // committed): a second sync from the same token must show it.
        next = f.relay.sync(&f.alice.token, Some(&from), 0).await.json;
    }
    assert_eq!(next["device_lists"]["left"], json!([bob]), "{next}");
    let to = next["next_batch"].as_str().expect("token").to_owned();
    let (status, json) = f
        .key_changes(&format!("?from={}&to={}", encode(&from), encode(&to)))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["left"], json!([bob]), "{json}");
    assert!(
        !json["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|u| u == bob)),
        "{json}"
    );
}
