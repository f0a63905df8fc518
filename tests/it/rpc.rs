//! The internal RPC against a real relay on loopback: the shared secret on
//! every route, device registration, listing and deletion (which drops the
//! pending inbox and the token), idempotent `send_to_device`, the inbox
//! drain/ack/long-poll, the destinations listing and wake, `/metrics`, and
//! the `courier send` / `courier status` commands.

use std::time::Duration;

use crate::support::TestRelay;
use crate::support::relay::encode;
use courier::tools::rpc_client::{RpcClient, RpcClientError};
use serde_json::{Value, json};

fn rpc(relay: &TestRelay) -> RpcClient {
    RpcClient::new(&relay.rpc_url, &relay.rpc_secret).expect("rpc client")
}

async fn inbox(relay: &TestRelay, user: &str, device: &str, query: &str) -> Value {
    let url = format!(
        "{}/_courier/v1/inbox/{}/{}?{query}",
        relay.rpc_url,
        encode(user),
        encode(device)
    );
    let r = relay.http.get(&url, Some(&relay.rpc_secret)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json["next_batch"].is_string(), "{}", r.text);
    r.json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_requires_the_secret() {
    let relay = TestRelay::spawn().await;
    let user = encode(&format!("@a:{}", relay.server_name));
    let routes = [
        ("PUT", format!("/_courier/v1/devices/{user}/D")),
        ("DELETE", format!("/_courier/v1/devices/{user}/D")),
        ("GET", format!("/_courier/v1/devices/{user}")),
        ("POST", "/_courier/v1/send_to_device".to_owned()),
        ("GET", format!("/_courier/v1/inbox/{user}/D")),
        ("GET", "/_courier/v1/destinations".to_owned()),
        (
            "POST",
            "/_courier/v1/destinations/example.org/wake".to_owned(),
        ),
        (
            "POST",
            "/_courier/v1/quarantine/example.org/requeue_all".to_owned(),
        ),
        ("GET", "/metrics".to_owned()),
    ];
    for (method, path) in &routes {
        let url = format!("{}{path}", relay.rpc_url);
        let r = relay
            .http
            .request(method, &url, None, Some(b"{}".to_vec()))
            .await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text);
        assert_eq!(r.json["errcode"], "M_MISSING_TOKEN", "{method} {path}");
        let r = relay
            .http
            .request(method, &url, Some("wrong-secret"), Some(b"{}".to_vec()))
            .await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text);
        assert_eq!(r.json["errcode"], "M_UNAUTHORIZED", "{method} {path}");
    }
    // A prefix of the secret is not the secret.
    let r = relay
        .http
        .get(&format!("{}/metrics", relay.rpc_url), Some("test-rpc"))
        .await;
    assert_eq!(r.status, 401);
    // Unknown paths (even without the secret) and wrong methods are Matrix
    // errors.
    for (path, secret, status) in [
        ("/_courier/v1/nope", None, 404),
        ("/_courier/v1/nope", Some(relay.rpc_secret.as_str()), 404),
        (
            "/_courier/v1/send_to_device",
            Some(relay.rpc_secret.as_str()),
            405,
        ),
    ] {
        let r = relay
            .http
            .get(&format!("{}{path}", relay.rpc_url), secret)
            .await;
        assert_eq!(
            (r.status, r.json["errcode"].as_str()),
            (status, Some("M_UNRECOGNIZED")),
            "GET {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_register_list_and_delete_with_their_inbox_and_token() {
    let relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let alice = format!("@alice:{}", relay.server_name);
    client
        .register_device(&alice, "D1", Some("tok_d1"))
        .await
        .expect("register D1");
    client
        .register_device(&alice, "D2", None)
        .await
        .expect("register D2 without a token");
    // Registering again is fine (idempotent).
    client
        .register_device(&alice, "D2", None)
        .await
        .expect("re-register D2");
    assert_eq!(
        client.list_devices(&alice).await.expect("list"),
        vec!["D1", "D2"]
    );

    let remote = client
        .register_device("@bob:elsewhere.example", "X", None)
        .await;
    assert!(
        matches!(&remote, Err(RpcClientError::Matrix { status, .. }) if *status == 400),
        "{remote:?}"
    );
    let bad_token = relay
        .http
        .put_json(
            &format!(
                "{}/_courier/v1/devices/{}/D3",
                relay.rpc_url,
                encode(&alice)
            ),
            Some(&relay.rpc_secret),
            &json!({ "access_token": 5 }),
        )
        .await;
    assert_eq!(
        (bad_token.status, bad_token.json["errcode"].as_str()),
        (400, Some("M_BAD_JSON"))
    );

    client
        .send_to_device(
            &alice,
            "m.test",
            "t1",
            &json!({ alice.clone(): { "D1": { "x": 1 } } }),
        )
        .await
        .expect("send");
    let whoami_url = format!("{}/_matrix/client/v3/account/whoami", relay.client_url);
    assert_eq!(
        relay.http.get(&whoami_url, Some("tok_d1")).await.status,
        200
    );

    client.delete_device(&alice, "D1").await.expect("delete D1");
    assert_eq!(client.list_devices(&alice).await.expect("list"), vec!["D2"]);
    let again = client.delete_device(&alice, "D1").await;
    assert!(
        matches!(&again, Err(RpcClientError::Matrix { status, errcode, .. })
            if *status == 404 && errcode == "M_NOT_FOUND"),
        "{again:?}"
    );
    let r = relay.http.get(&whoami_url, Some("tok_d1")).await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN"))
    );

    // The same device ID registered again starts with an empty inbox.
    client
        .register_device(&alice, "D1", Some("tok_d1_new"))
        .await
        .expect("register D1 again");
    assert_eq!(inbox(&relay, &alice, "D1", "").await["events"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_device_is_idempotent_and_the_inbox_drains_in_pages() {
    let relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let hs = format!("@hs:{}", relay.server_name);
    let bob = format!("@bob:{}", relay.server_name);
    client
        .register_device(&bob, "B", None)
        .await
        .expect("register");

    // Same (sender, type, txn_id) twice: one message; another type: a second.
    for _ in 0..2 {
        client
            .send_to_device(
                &hs,
                "m.a",
                "dup",
                &json!({ bob.clone(): { "B": { "v": "a" } } }),
            )
            .await
            .expect("send");
    }
    client
        .send_to_device(
            &hs,
            "m.b",
            "dup",
            &json!({ bob.clone(): { "B": { "v": "b" } } }),
        )
        .await
        .expect("send");
    let page = inbox(&relay, &bob, "B", "").await;
    assert_eq!(
        page["events"],
        json!([
            { "sender": hs, "type": "m.a", "content": { "v": "a" } },
            { "sender": hs, "type": "m.b", "content": { "v": "b" } },
        ])
    );
    let token = page["next_batch"].as_str().expect("token").to_owned();

    // Bad RPC sends.
    for (body, status, errcode) in [
        (
            json!({ "type": "m.a", "txn_id": "x", "messages": {} }),
            400,
            "M_MISSING_PARAM",
        ),
        (
            json!({ "sender": hs, "type": "m.a", "txn_id": "x" }),
            400,
            "M_MISSING_PARAM",
        ),
        (
            json!({ "sender": hs, "type": 1, "txn_id": "x", "messages": {} }),
            400,
            "M_BAD_JSON",
        ),
        (
            json!({ "sender": hs, "type": "m.a", "txn_id": "x", "messages": [] }),
            400,
            "M_BAD_JSON",
        ),
        (
            json!({ "sender": "@hs:elsewhere.example", "type": "m.a", "txn_id": "x", "messages": {} }),
            400,
            "M_INVALID_PARAM",
        ),
    ] {
        let r = relay
            .http
            .post_json(
                &format!("{}/_courier/v1/send_to_device", relay.rpc_url),
                Some(&relay.rpc_secret),
                &body,
            )
            .await;
        assert_eq!(
            (r.status, r.json["errcode"].as_str()),
            (status, Some(errcode)),
            "{body}"
        );
    }

    for n in 0..150u32 {
        client
            .send_to_device(
                &hs,
                "m.n",
                &format!("n{n}"),
                &json!({ bob.clone(): { "B": { "n": n } } }),
            )
            .await
            .expect("send");
    }
    // Acknowledge the first two, then page through the 150.
    let first = inbox(&relay, &bob, "B", &format!("since={token}&limit=10")).await;
    assert_eq!(first["events"].as_array().expect("events").len(), 10);
    assert_eq!(first["events"][0]["content"], json!({"n": 0}));
    // The same since again re-delivers the same page.
    let repeat = inbox(&relay, &bob, "B", &format!("since={token}&limit=10")).await;
    assert_eq!(repeat, first);
    let second = inbox(
        &relay,
        &bob,
        "B",
        &format!(
            "since={}&timeout=10000",
            first["next_batch"].as_str().expect("token")
        ),
    )
    .await;
    assert_eq!(second["events"].as_array().expect("events").len(), 100);
    assert_eq!(second["events"][0]["content"], json!({"n": 10}));
    let third = inbox(
        &relay,
        &bob,
        "B",
        &format!("since={}", second["next_batch"].as_str().expect("token")),
    )
    .await;
    assert_eq!(third["events"].as_array().expect("events").len(), 40);
    assert_eq!(third["events"][39]["content"], json!({"n": 149}));

    for query in [
        "limit=0",
        "limit=101",
        "limit=x",
        "since=bogus",
        "timeout=-1",
    ] {
        let url = format!(
            "{}/_courier/v1/inbox/{}/B?{query}",
            relay.rpc_url,
            encode(&bob)
        );
        let r = relay.http.get(&url, Some(&relay.rpc_secret)).await;
        assert_eq!(
            (r.status, r.json["errcode"].as_str()),
            (400, Some("M_INVALID_PARAM")),
            "{query}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_long_poll_wakes_on_a_new_message() {
    let relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let bob = format!("@bob:{}", relay.server_name);
    client
        .register_device(&bob, "B", None)
        .await
        .expect("register");
    let initial = inbox(&relay, &bob, "B", "timeout=10000").await;
    assert_eq!(initial["events"], json!([]), "no since: answered at once");
    let url = format!(
        "{}/_courier/v1/inbox/{}/B?timeout=10000&since={}",
        relay.rpc_url,
        encode(&bob),
        initial["next_batch"].as_str().expect("token")
    );
    let secret = relay.rpc_secret.clone();
    let http = crate::support::http::HttpClient::new();
    let mut poll = tokio::spawn(async move { http.get(&url, Some(&secret)).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut poll)
            .await
            .is_err(),
        "an empty long-poll must wait"
    );
    client
        .send_to_device(
            &bob,
            "m.test",
            "w",
            &json!({ bob.clone(): { "B": { "w": 1 } } }),
        )
        .await
        .expect("send");
    let response = tokio::time::timeout(Duration::from_secs(9), poll)
        .await
        .expect("returned well before the 10 s timeout")
        .expect("task");
    assert_eq!(response.status, 200, "{}", response.text);
    assert_eq!(response.json["events"][0]["content"], json!({"w": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_listed_and_woken_and_metrics_render() {
    let relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let hs = format!("@hs:{}", relay.server_name);
    assert!(client.destinations().await.expect("list").is_empty());
    client
        .send_to_device(
            &hs,
            "m.test",
            "remote",
            &json!({
                "@x:127.0.0.1:1": { "A": { "k": 1 }, "B": { "k": 2 } },
                "@y:127.0.0.1:1": { "*": { "k": 3 } },
            }),
        )
        .await
        .expect("send");
    let rows = client.destinations().await.expect("list");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].destination, "127.0.0.1:1");
    assert_eq!(rows[0].pending_edus, 1);
    assert_eq!(rows[0].pending_messages, 3);
    assert!(rows[0].oldest_pending_age_ms.is_some());
    assert_eq!(rows[0].quarantined, 0);

    client.wake_destination("127.0.0.1:1").await.expect("wake");
    let bad = client.wake_destination("not a server").await;
    assert!(
        matches!(&bad, Err(RpcClientError::Matrix { status, .. }) if *status == 400),
        "{bad:?}"
    );

    let metrics = relay
        .http
        .get(
            &format!("{}/metrics", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await;
    assert_eq!(metrics.status, 200);
    let content_type = metrics
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert!(
        metrics
            .text
            .lines()
            .any(|l| l.starts_with("courier_todevice_sends_total{outcome=\"accepted\"}")),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("# TYPE courier_todevice_messages_total counter")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_and_status_commands_call_the_rpc() {
    let relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let bob = format!("@bob:{}", relay.server_name);
    client
        .register_device(&bob, "B", None)
        .await
        .expect("register");
    let exe = env!("CARGO_BIN_EXE_courier");
    let output = tokio::process::Command::new(exe)
        .args([
            "send",
            "--rpc",
            &relay.rpc_url,
            "--sender",
            &format!("@cli:{}", relay.server_name),
            "--type",
            "m.cli",
            "--to",
            &format!("{bob}/B"),
            "--to",
            "@far:127.0.0.1:1/*",
            "--content",
            r#"{"from":"cli"}"#,
        ])
        .env("COURIER_RPC_SECRET", &relay.rpc_secret)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("courier send finished")
        .expect("courier send ran");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let page = inbox(&relay, &bob, "B", "").await;
    assert_eq!(page["events"][0]["content"], json!({"from": "cli"}));
    assert_eq!(page["events"][0]["type"], "m.cli");

    let output = tokio::process::Command::new(exe)
        .args([
            "status",
            "--rpc",
            &relay.rpc_url,
            "--secret",
            &relay.rpc_secret,
        ])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("courier status finished")
        .expect("courier status ran");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.starts_with("DESTINATION"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("127.0.0.1:1 ")),
        "{table}"
    );

    // A wrong secret is a failure with a message, not a panic.
    let output = tokio::process::Command::new(exe)
        .args(["status", "--rpc", &relay.rpc_url, "--secret", "wrong"])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("finished")
        .expect("ran");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("M_UNAUTHORIZED"));
}

/// Quarantined EDUs are listed, requeued and dropped through the RPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_edus_are_listed_retried_and_dropped() {
    use courier::store::{ClientTxnKey, NewOutboxEdu, SendBatch, Store};
    let relay = TestRelay::spawn().await;
    // A destination nothing answers on (loopback is allowed in tests).
    let destination = "127.0.0.1:9";
    let store = courier::store::sqlite::SqliteStore::open(&relay.db_path())
        .await
        .expect("the relay's store opens a second time");
    let edu = |n: u32| NewOutboxEdu {
        destination: destination.to_owned(),
        edu_json: format!(r#"{{"content":{{"n":{n}}},"edu_type":"m.direct_to_device"}}"#),
        message_count: 1,
    };
    let batch = SendBatch {
        txn: ClientTxnKey {
            user_id: format!("@q:{}", relay.server_name),
            device_id: String::new(),
            event_type: "t".to_owned(),
            txn_id: "quarantine-test".to_owned(),
        },
        local: Vec::new(),
        remote: vec![edu(1), edu(2)],
        now_ms: courier::clock::now_ms(),
    };
    store.enqueue_send(batch).await.expect("queued");
    let queued = store
        .peek_outbox(destination, 10, 1 << 20)
        .await
        .expect("peek");
    assert_eq!(queued.len(), 2);
    for row in &queued {
        store
            .quarantine_edu(
                &crate::support::lease_fence(&store, destination).await,
                destination,
                row.seq,
                "refused 3 times",
                courier::clock::now_ms(),
            )
            .await
            .expect("quarantined");
    }

    let url = |path: &str| format!("{}/_courier/v1/quarantine{path}", relay.rpc_url);
    let secret = Some(relay.rpc_secret.as_str());
    let listed = relay
        .http
        .get(&url(&format!("?destination={destination}")), secret)
        .await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let rows = listed.json["quarantined"]
        .as_array()
        .expect("a list")
        .clone();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["reason"], "refused 3 times");
    assert_eq!(rows[0]["edu"]["edu_type"], "m.direct_to_device");
    let first = rows[0]["seq"].as_i64().expect("seq");
    let second = rows[1]["seq"].as_i64().expect("seq");

    // Without the secret: refused, nothing changes.
    let r = relay
        .http
        .request(
            "DELETE",
            &url(&format!("/{destination}/{first}")),
            None,
            None,
        )
        .await;
    assert_eq!(r.status, 401);

    let r = relay
        .http
        .request(
            "DELETE",
            &url(&format!("/{destination}/{first}")),
            secret,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = relay
        .http
        .request(
            "DELETE",
            &url(&format!("/{destination}/{first}")),
            secret,
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json["errcode"].as_str()),
        (404, Some("M_NOT_FOUND"))
    );

    let r = relay
        .http
        .post_json(
            &url(&format!("/{destination}/{second}/retry")),
            secret,
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let listed = relay.http.get(&url(""), secret).await;
    assert_eq!(listed.json["quarantined"].as_array().map(Vec::len), Some(0));
    // The retried EDU is queued again (or in flight) for its destination.
    let requeued = store
        .peek_outbox(destination, 10, 1 << 20)
        .await
        .expect("peek");
    let in_flight = store.in_flight(destination).await.expect("in flight");
    assert!(
        requeued.iter().any(|e| e.edu_json.contains("\"n\":2"))
            || in_flight.is_some_and(|t| t.body.contains("\"n\":2")),
        "the retried EDU is pending again"
    );
    let r = relay
        .http
        .post_json(&url("/not%20a%20name/1/retry"), secret, &json!({}))
        .await;
    assert_eq!(r.status, 404);
}

/// Bulk requeue: `POST /_courier/v1/quarantine/{destination}/requeue_all`
/// (authenticated like the other quarantine routes) and `courier quarantine
/// requeue <destination>` put every quarantined EDU of the destination back
/// at the end of its queue, in their original order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_edus_are_requeued_in_bulk_in_order_at_the_end() {
    use courier::store::{ClientTxnKey, NewOutboxEdu, SendBatch, Store};
    let relay = TestRelay::spawn().await;
    // A destination nothing answers on: its rows stay queued.
    let destination = "127.0.0.1:9";
    let store = courier::store::sqlite::SqliteStore::open(&relay.db_path())
        .await
        .expect("the relay's store opens a second time");
    let edu = |n: u32| NewOutboxEdu {
        destination: destination.to_owned(),
        edu_json: format!(r#"{{"content":{{"n":{n}}},"edu_type":"m.direct_to_device"}}"#),
        message_count: 1,
    };
    let batch = SendBatch {
        txn: ClientTxnKey {
            user_id: format!("@q:{}", relay.server_name),
            device_id: String::new(),
            event_type: "t".to_owned(),
            txn_id: "requeue-all-test".to_owned(),
        },
        local: Vec::new(),
        remote: (1..=5).map(edu).collect(),
        now_ms: courier::clock::now_ms(),
    };
    store.enqueue_send(batch).await.expect("queued");
    let queued = store
        .peek_outbox(destination, 10, 1 << 20)
        .await
        .expect("peek");
    assert_eq!(queued.len(), 5);
    // Quarantine n = 3, then n = 1: the requeue follows the original order,
    // not the order of quarantine.
    for index in [2, 0] {
        store
            .quarantine_edu(
                &crate::support::lease_fence(&store, destination).await,
                destination,
                queued[index].seq,
                "refused",
                courier::clock::now_ms(),
            )
            .await
            .expect("quarantined");
    }
    let order = || async {
        store
            .peek_outbox(destination, 10, 1 << 20)
            .await
            .expect("peek")
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.edu_json).expect("json");
                v["content"]["n"].as_u64().expect("n")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(order().await, vec![2, 4, 5]);

    let url = format!(
        "{}/_courier/v1/quarantine/{destination}/requeue_all",
        relay.rpc_url
    );
    let r = relay.http.post_json(&url, None, &json!({})).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        order().await,
        vec![2, 4, 5],
        "nothing changed without the secret"
    );

    let exe = env!("CARGO_BIN_EXE_courier");
    let output = tokio::process::Command::new(exe)
        .args([
            "quarantine",
            "requeue",
            destination,
            "--rpc",
            &relay.rpc_url,
            "--secret",
            &relay.rpc_secret,
        ])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("courier quarantine requeue finished")
        .expect("courier quarantine requeue ran");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("requeued 2 quarantined EDUs"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        order().await,
        vec![2, 4, 5, 1, 3],
        "at the end, in original order"
    );
    assert!(
        store
            .list_quarantined(Some(destination))
            .await
            .expect("list")
            .is_empty()
    );
    // Nothing left to requeue: a count of 0, not an error.
    let r = relay
        .http
        .post_json(&url, Some(relay.rpc_secret.as_str()), &json!({}))
        .await;
    assert_eq!(
        (r.status, r.json["requeued"].as_u64()),
        (200, Some(0)),
        "{}",
        r.text
    );
}
