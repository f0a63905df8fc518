//! The to-device client API against a real relay on loopback: delivery of
//! exactly `{sender, type, content}` to the right devices, acknowledgement
//! by the next `since`, txnId idempotency, long-poll wake-up, `*`
//! expansion at acceptance time, the 100-event page, the bad-input table
//! with no stored change, and remote recipients packed into outbox EDUs of
//! at most 64 KiB.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::TestRelay;
use courier::store::Store;
use serde_json::{Value, json};

/// Registers `@{name}:{server}` / `device` with token `tok_{name}_{device}`
/// and returns (user ID, token).
async fn device(relay: &TestRelay, name: &str, device: &str) -> (String, String) {
    let user = format!("@{name}:{}", relay.server_name);
    let token = format!("tok_{name}_{device}");
    relay.register_device(&user, device, &token).await;
    (user, token)
}

fn events(response: &crate::support::http::Response) -> Vec<Value> {
    assert_eq!(response.status, 200, "{}", response.text);
    assert!(
        response.json["next_batch"].is_string(),
        "next_batch is always present: {}",
        response.text
    );
    response.json["to_device"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn next_batch(response: &crate::support::http::Response) -> String {
    response.json["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_put_to_two_local_users_gives_each_only_its_own_content() {
    let relay = TestRelay::spawn().await;
    let (carol, carol_tok) = device(&relay, "carol", "C").await;
    let (alice, alice_tok) = device(&relay, "alice", "A").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;

    let r = relay
        .send_to_device(
            &carol_tok,
            "m.room_key_request",
            "txn1",
            json!({
                alice.clone(): { "A": { "for": "alice", "n": [1, 2] } },
                bob.clone(): { "B": { "for": "bob" } },
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({}));

    let got = events(&relay.sync(&alice_tok, None, 0).await);
    assert_eq!(
        got,
        vec![
            json!({"sender": carol, "type": "m.room_key_request", "content": {"for": "alice", "n": [1, 2]}})
        ]
    );
    let got = events(&relay.sync(&bob_tok, None, 0).await);
    assert_eq!(
        got,
        vec![json!({"sender": carol, "type": "m.room_key_request", "content": {"for": "bob"}})]
    );
    // The sender's own device got nothing.
    assert!(events(&relay.sync(&carol_tok, None, 0).await).is_empty());

    let whoami = relay
        .http
        .get(
            &format!("{}/_matrix/client/v3/account/whoami", relay.client_url),
            Some(&alice_tok),
        )
        .await;
    assert_eq!(whoami.json, json!({"user_id": alice, "device_id": "A"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stay_until_the_next_since_acknowledges_them() {
    let relay = TestRelay::spawn().await;
    let (_, sender_tok) = device(&relay, "sender", "S").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    let send = |n: u32| {
        let relay = &relay;
        let sender_tok = sender_tok.clone();
        let bob = bob.clone();
        async move {
            let r = relay
                .send_to_device(
                    &sender_tok,
                    "m.test",
                    &format!("t{n}"),
                    json!({ bob: { "B": { "n": n } } }),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    };

    send(1).await;
    let first = relay.sync(&bob_tok, None, 0).await;
    assert_eq!(events(&first).len(), 1);
    // No since: nothing acknowledged, the same message again.
    let again = relay.sync(&bob_tok, None, 0).await;
    assert_eq!(events(&again), events(&first));
    let token1 = next_batch(&first);

    send(2).await;
    let second = relay.sync(&bob_tok, Some(&token1), 0).await;
    let got = events(&second);
    assert_eq!(got.len(), 1, "message 1 was acknowledged");
    assert_eq!(got[0]["content"], json!({"n": 2}));
    // The response was "lost": the same since re-delivers message 2.
    let repeat = relay.sync(&bob_tok, Some(&token1), 0).await;
    assert_eq!(events(&repeat), got);
    assert_eq!(next_batch(&repeat), next_batch(&second));

    send(3).await;
    let third = relay.sync(&bob_tok, Some(&next_batch(&second)), 0).await;
    let got = events(&third);
    assert_eq!(got.len(), 1, "message 3 arrives alone: {got:?}");
    assert_eq!(got[0]["content"], json!({"n": 3}));
    // Acknowledging everything leaves an empty inbox and a stable token.
    let empty = relay.sync(&bob_tok, Some(&next_batch(&third)), 0).await;
    assert!(events(&empty).is_empty());
    assert_eq!(next_batch(&empty), next_batch(&third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_txn_id_is_delivered_once_but_another_event_type_is_new() {
    let relay = TestRelay::spawn().await;
    let (_, sender_tok) = device(&relay, "sender", "S").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    let messages = json!({ bob.clone(): { "B": { "k": "v" } } });
    for _ in 0..2 {
        let r = relay
            .send_to_device(&sender_tok, "m.a", "same", messages.clone())
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json, json!({}));
    }
    let r = relay
        .send_to_device(&sender_tok, "m.b", "same", messages.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Another device of the same user has its own txn scope.
    let (_, other_tok) = device(&relay, "sender", "S2").await;
    let r = relay
        .send_to_device(&other_tok, "m.a", "same", messages.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    let got = events(&relay.sync(&bob_tok, None, 0).await);
    let types: Vec<&str> = got.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, vec!["m.a", "m.b", "m.a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_returns_as_soon_as_a_message_arrives() {
    let relay = TestRelay::spawn().await;
    let (_, sender_tok) = device(&relay, "sender", "S").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    let initial = relay.sync(&bob_tok, None, 0).await;
    let since = next_batch(&initial);

    let url = format!(
        "{}/_matrix/client/v3/sync?timeout=10000&since={since}&filter=%7B%7D&set_presence=offline",
        relay.client_url
    );
    let client = crate::support::http::HttpClient::new();
    let token = bob_tok.clone();
    let mut poll = tokio::spawn(async move { client.get(&url, Some(&token)).await });
    // With nothing pending the request is held open.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut poll)
            .await
            .is_err(),
        "an empty long-poll must wait"
    );

    let r = relay
        .send_to_device(
            &sender_tok,
            "m.test",
            "wake",
            json!({ bob: { "B": { "hello": 1 } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let response = tokio::time::timeout(Duration::from_secs(9), poll)
        .await
        .expect("the long-poll returned well before its 10 s timeout")
        .expect("task");
    let got = events(&response);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["content"], json!({"hello": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn star_reaches_the_devices_registered_at_acceptance_only() {
    let relay = TestRelay::spawn().await;
    let (_, sender_tok) = device(&relay, "sender", "S").await;
    let (bob, bob1) = device(&relay, "bob", "D1").await;
    let (_, bob2) = device(&relay, "bob", "D2").await;
    let r = relay
        .send_to_device(
            &sender_tok,
            "m.test",
            "star",
            json!({ bob: { "*": { "all": true } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, bob3) = device(&relay, "bob", "D3").await;

    for token in [&bob1, &bob2] {
        let got = events(&relay.sync(token, None, 0).await);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["content"], json!({"all": true}));
    }
    assert!(events(&relay.sync(&bob3, None, 0).await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_150_comes_in_pages_of_100_then_50_without_waiting() {
    let relay = TestRelay::spawn().await;
    let (_, sender_tok) = device(&relay, "sender", "S").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    for n in 0..150u32 {
        let r = relay
            .send_to_device(
                &sender_tok,
                "m.test",
                &format!("t{n}"),
                json!({ bob.clone(): { "B": { "n": n } } }),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let deadline = Duration::from_secs(9);
    let first = tokio::time::timeout(deadline, relay.sync(&bob_tok, None, 10_000))
        .await
        .expect("pending messages are returned at once");
    let page1 = events(&first);
    assert_eq!(page1.len(), 100);
    let second = tokio::time::timeout(
        deadline,
        relay.sync(&bob_tok, Some(&next_batch(&first)), 10_000),
    )
    .await
    .expect("the rest is returned at once");
    let page2 = events(&second);
    assert_eq!(page2.len(), 50);
    let order: Vec<u64> = page1
        .iter()
        .chain(page2.iter())
        .filter_map(|e| e["content"]["n"].as_u64())
        .collect();
    assert_eq!(order, (0..150).collect::<Vec<u64>>(), "order of arrival");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_errcode_and_changes_nothing() {
    let relay = TestRelay::spawn().await;
    let (_, sender_tok) = device(&relay, "sender", "S").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    let url = |txn: &str| {
        format!(
            "{}/_matrix/client/v3/sendToDevice/m.test/{txn}",
            relay.client_url
        )
    };
    let good = json!({ "messages": { bob.clone(): { "B": { "k": 1 } } } }).to_string();
    let big =
        json!({ "messages": { bob.clone(): { "B": { "k": "x".repeat(70_000) } } } }).to_string();
    // (name, url, bearer token, body, status, errcode)
    type Case<'a> = (&'a str, String, Option<&'a str>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no token",
            url("a"),
            None,
            good.clone(),
            401,
            "M_MISSING_TOKEN",
        ),
        (
            "unknown token",
            url("b"),
            Some("nope"),
            good.clone(),
            401,
            "M_UNKNOWN_TOKEN",
        ),
        (
            "query token only",
            format!("{}?access_token={sender_tok}", url("c")),
            None,
            good.clone(),
            401,
            "M_MISSING_TOKEN",
        ),
        (
            "not JSON",
            url("d"),
            Some(&sender_tok),
            "{nope".into(),
            400,
            "M_NOT_JSON",
        ),
        (
            "not an object",
            url("e"),
            Some(&sender_tok),
            "[1]".into(),
            400,
            "M_BAD_JSON",
        ),
        (
            "messages missing",
            url("f"),
            Some(&sender_tok),
            "{}".into(),
            400,
            "M_MISSING_PARAM",
        ),
        (
            "messages not an object",
            url("g"),
            Some(&sender_tok),
            json!({"messages": [1]}).to_string(),
            400,
            "M_BAD_JSON",
        ),
        (
            "devices not an object",
            url("h"),
            Some(&sender_tok),
            json!({"messages": { bob.clone(): "x" }}).to_string(),
            400,
            "M_BAD_JSON",
        ),
        (
            "content not an object",
            url("i"),
            Some(&sender_tok),
            json!({"messages": { bob.clone(): { "B": 5 } }}).to_string(),
            400,
            "M_BAD_JSON",
        ),
        (
            "oversized content",
            url("j"),
            Some(&sender_tok),
            big,
            413,
            "M_TOO_LARGE",
        ),
    ];
    for (name, url, token, body, status, errcode) in &cases {
        let r = relay
            .http
            .request("PUT", url, *token, Some(body.clone().into_bytes()))
            .await;
        assert_eq!(r.status, *status, "{name}: {}", r.text);
        assert_eq!(r.json["errcode"], *errcode, "{name}: {}", r.text);
        assert!(r.json["error"].is_string(), "{name}: {}", r.text);
    }

    // Method, path and query errors.
    let r = relay.http.get(&url("k"), Some(&sender_tok)).await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (405, Some("M_UNRECOGNIZED"))
    );
    let r = relay
        .http
        .get(
            &format!("{}/_matrix/client/v3/rooms", relay.client_url),
            Some(&sender_tok),
        )
        .await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (404, Some("M_UNRECOGNIZED"))
    );
    let r = relay.sync(&bob_tok, Some("s72595_4483_1934"), 0).await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (400, Some("M_INVALID_PARAM"))
    );
    let r = relay
        .http
        .get(
            &format!(
                "{}/_matrix/client/v3/sync?access_token={bob_tok}",
                relay.client_url
            ),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );

    // An unknown local device and an unparsable user are dropped silently.
    let r = relay
        .send_to_device(
            &sender_tok,
            "m.test",
            "unknown-device",
            json!({ bob.clone(): { "NOPE": { "k": 2 } }, "not a user": { "X": {} }, "@empty:x.org": {} }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Nothing above was queued, for the local device or for any destination.
    assert!(events(&relay.sync(&bob_tok, None, 0).await).is_empty());
    let destinations = relay
        .http
        .get(
            &format!("{}/_courier/v1/destinations", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await;
    assert_eq!(
        destinations.json["destinations"],
        json!([]),
        "{}",
        destinations.text
    );

    // The txn ids of refused requests were not used up.
    let r = relay
        .send_to_device(
            &sender_tok,
            "m.test",
            "j",
            json!({ bob: { "B": { "k": 3 } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let got = events(&relay.sync(&bob_tok, None, 0).await);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["content"], json!({"k": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_recipients_become_outbox_edus_of_at_most_64_kib_per_destination() {
    let mut relay = TestRelay::spawn().await;
    let (alice, alice_tok) = device(&relay, "alice", "A").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    // Two unreachable destinations (connections are refused), so the rows
    // stay queued.
    let far = "127.0.0.1:1";
    let near = "127.0.0.1:2";
    let blob = "z".repeat(9_000);
    let mut messages = serde_json::Map::new();
    let mut expected: BTreeSet<(String, String, String)> = BTreeSet::new();
    for i in 0..30 {
        let user = format!("@user{i:02}:{far}");
        messages.insert(user.clone(), json!({ "DEV": { "blob": blob, "i": i } }));
        expected.insert((far.to_owned(), user, "DEV".to_owned()));
    }
    let mut many = serde_json::Map::new();
    for d in 0..40 {
        many.insert(format!("D{d:02}"), json!({ "blob": blob, "d": d }));
        expected.insert((far.to_owned(), format!("@many:{far}"), format!("D{d:02}")));
    }
    messages.insert(format!("@many:{far}"), Value::Object(many));
    messages.insert(format!("@carl:{near}"), json!({ "*": { "hi": 1 } }));
    expected.insert((near.to_owned(), format!("@carl:{near}"), "*".to_owned()));
    messages.insert(bob.clone(), json!({ "B": { "local": true } }));

    let r = relay
        .send_to_device(
            &alice_tok,
            "m.room.encrypted",
            "fan-out",
            Value::Object(messages),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let got = events(&relay.sync(&bob_tok, None, 0).await);
    assert_eq!(
        got,
        vec![json!({"sender": alice, "type": "m.room.encrypted", "content": {"local": true}})]
    );

    let listing = relay
        .http
        .get(
            &format!("{}/_courier/v1/destinations", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await;
    assert_eq!(listing.status, 200, "{}", listing.text);
    let rows = listing.json["destinations"]
        .as_array()
        .expect("rows")
        .clone();
    let by_name: BTreeMap<&str, &Value> = rows
        .iter()
        .filter_map(|row| Some((row["destination"].as_str()?, row)))
        .collect();
    assert_eq!(by_name.keys().copied().collect::<Vec<_>>(), vec![far, near]);
    assert_eq!(by_name[far]["pending_messages"], 70);
    assert_eq!(by_name[near]["pending_messages"], 1);
    assert_eq!(by_name[near]["pending_edus"], 1);

    // Read the queued EDUs straight from the relay's store.
    relay.stop().await;
    let store = courier::store::sqlite::SqliteStore::open(&relay.db_path())
        .await
        .expect("store opens");
    let mut seen = Vec::new();
    let mut message_ids = BTreeSet::new();
    for destination in [far, near] {
        let edus = store
            .peek_outbox(destination, 1000, u64::MAX)
            .await
            .expect("outbox");
        if destination == far {
            assert!(
                edus.len() >= 10,
                "70 × 9 KB needs at least 10 EDUs, got {}",
                edus.len()
            );
        } else {
            assert_eq!(edus.len(), 1);
        }
        assert_eq!(
            by_name[destination]["pending_edus"],
            edus.len(),
            "listing and store agree"
        );
        for edu in edus {
            let value: Value = serde_json::from_str(&edu.edu_json).expect("EDU is JSON");
            let canonical = courier::canonical_json::to_canonical_bytes(&value).expect("canonical");
            assert!(canonical.len() <= 65536, "EDU is {} bytes", canonical.len());
            assert_eq!(value["edu_type"], "m.direct_to_device");
            let content = &value["content"];
            assert_eq!(content["sender"], alice.as_str());
            assert_eq!(content["type"], "m.room.encrypted");
            let id = content["message_id"].as_str().expect("message_id");
            assert!(
                message_ids.insert(id.to_owned()),
                "fresh message_id per EDU"
            );
            let mut count = 0;
            for (user, devices) in content["messages"].as_object().expect("messages") {
                assert!(
                    user.ends_with(destination),
                    "{user} belongs to {destination}"
                );
                for (device, _) in devices.as_object().expect("devices") {
                    seen.push((destination.to_owned(), user.clone(), device.clone()));
                    count += 1;
                }
            }
            assert_eq!(edu.message_count, count);
        }
    }
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no message twice");
    assert_eq!(unique, expected, "every message present");
}

/// Floats are not canonical JSON, but Synapse accepts them in to-device
/// content from clients, so Courier does too and delivers them unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_with_floats_is_delivered_unchanged() {
    let relay = TestRelay::spawn().await;
    let alice = format!("@alice:{}", relay.server_name);
    let bob = format!("@bob:{}", relay.server_name);
    relay.register_device(&alice, "A", "tok-alice-floats").await;
    relay.register_device(&bob, "B", "tok-bob-floats").await;
    let content = json!({ "f": 2.5, "big": 1e16, "small": 1e-5, "whole": 10.0, "n": [1, -0.5] });
    let r = relay
        .send_to_device(
            "tok-alice-floats",
            "org.example.floats",
            "t1",
            json!({ bob.clone(): { "B": content.clone() } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (events, _) = relay
        .sync_until(
            "tok-bob-floats",
            None,
            1,
            std::time::Duration::from_secs(20),
        )
        .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["content"], content);
}

/// The destinations the relay's RPC lists.
async fn destinations(relay: &TestRelay) -> Vec<Value> {
    let listing = relay
        .http
        .get(
            &format!("{}/_courier/v1/destinations", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await;
    assert_eq!(listing.status, 200, "{}", listing.text);
    listing.json["destinations"]
        .as_array()
        .expect("rows")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_past_the_fan_out_limits_is_refused_whole_and_stores_nothing() {
    let relay = TestRelay::spawn_with(crate::support::relay::TestRelayOptions {
        client_extra: "max_destinations_per_send = 5\nmax_recipients_per_send = 20\n".to_owned(),
        ..Default::default()
    })
    .await;
    let (_alice, alice_tok) = device(&relay, "alice", "A").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;

    // Six servers (one more than allowed), plus a local recipient: nothing
    // of it is kept, the local message included.
    let mut messages = serde_json::Map::new();
    for i in 0..6 {
        messages.insert(format!("@u:h{i}.example"), json!({ "D": { "i": i } }));
    }
    messages.insert(bob.clone(), json!({ "B": { "local": true } }));
    let r = relay
        .send_to_device(&alice_tok, "m.x", "too-wide", Value::Object(messages))
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.json["errcode"], "M_TOO_LARGE", "{}", r.text);
    assert!(
        r.json["error"]
            .as_str()
            .is_some_and(|e| e.contains("limit of 5")),
        "{}",
        r.text
    );

    // 21 devices of one remote user: over the recipient limit.
    let many: serde_json::Map<String, Value> =
        (0..21).map(|d| (format!("D{d}"), json!({}))).collect();
    let r = relay
        .send_to_device(
            &alice_tok,
            "m.x",
            "too-many",
            json!({ "@u:h0.example": Value::Object(many) }),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.json["errcode"], "M_TOO_LARGE");

    assert!(
        destinations(&relay).await.is_empty(),
        "no destination created"
    );
    assert!(
        events(&relay.sync(&bob_tok, None, 0).await).is_empty(),
        "no local message stored"
    );

    // At the limits exactly, the send goes through; the refused txn ids
    // were not recorded, so they can be used again.
    let mut messages = serde_json::Map::new();
    for i in 0..5 {
        messages.insert(format!("@u:h{i}.example"), json!({ "D": { "i": i } }));
    }
    let r = relay
        .send_to_device(&alice_tok, "m.x", "too-wide", Value::Object(messages))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(destinations(&relay).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_send_rate_gets_429_and_others_are_not_affected() {
    let relay = TestRelay::spawn_with(crate::support::relay::TestRelayOptions {
        client_extra: "sends_per_user_per_sec = 1\n".to_owned(),
        ..Default::default()
    })
    .await;
    let (_alice, alice_tok) = device(&relay, "alice", "A").await;
    let (_carol, carol_tok) = device(&relay, "carol", "C").await;
    let (bob, bob_tok) = device(&relay, "bob", "B").await;
    let send = |token: String, txn: String| {
        let relay = &relay;
        let bob = bob.clone();
        async move {
            relay
                .send_to_device(&token, "m.x", &txn, json!({ bob: { "B": { "t": txn } } }))
                .await
        }
    };
    // Burst 2 × rate; a third request in the same instant would wait about
    // a second, more than the half second the limiter holds a request.
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(send(alice_tok.clone(), format!("a{i}")).await);
    }
    let refused: Vec<_> = statuses.iter().filter(|r| r.status == 429).collect();
    assert!(!refused.is_empty(), "the burst is two sends");
    for r in &refused {
        assert_eq!(r.json["errcode"], "M_LIMIT_EXCEEDED", "{}", r.text);
        assert!(r.json["retry_after_ms"].as_u64().is_some(), "{}", r.text);
    }
    let accepted = statuses.iter().filter(|r| r.status == 200).count();
    // Another user has a bucket of their own.
    let r = send(carol_tok.clone(), "c0".to_owned()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Exactly the accepted sends were delivered.
    let got = events(&relay.sync(&bob_tok, None, 0).await);
    assert_eq!(got.len(), accepted + 1, "{got:?}");
}
