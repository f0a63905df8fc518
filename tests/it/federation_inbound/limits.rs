//! Transaction limits (PDU and EDU counts, body size, the body's origin,
//! required fields, the route's forms) and the per-origin rate limit.

use std::sync::Arc;

use super::{FAKE_ORIGIN, Fixture, alice, bob, sign, to_device_edu, txn_body};
use crate::support::TestRelayOptions;
use courier::store::Store;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_limits_and_pdus() {
    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str("max_request_bytes = 65536\n");
    let f = Fixture::with(options).await;

    let pdus = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"event_id": format!("$event{i}:{FAKE_ORIGIN}"), "type": "m.room.message"}))
            .collect()
    };
    let reply = f.send_txn("pdus-51", &txn_body(vec![], pdus(51))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");
    f.assert_nothing_stored("pdus-51", "51 PDUs").await;

    let edus: Vec<Value> = (0..101)
        .map(|i| {
            to_device_edu(
                &alice(),
                &format!("m{i}"),
                json!({ bob(&f.relay): { "BOBPHONE": {} } }),
            )
        })
        .collect();
    let reply = f.send_txn("edus-101", &txn_body(edus, vec![])).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");
    f.assert_nothing_stored("edus-101", "101 EDUs").await;

    // Over the body limit: 413 with a Matrix error body, nothing stored.
    let big = txn_body(
        vec![to_device_edu(
            &alice(),
            "big",
            json!({ bob(&f.relay): { "BOBPHONE": {"pad": "x".repeat(70_000)} } }),
        )],
        vec![],
    );
    let reply = f.send_txn("too-big", &big).await;
    assert_eq!(reply.status, 413, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_TOO_LARGE");
    f.assert_nothing_stored("too-big", "oversized").await;

    let reply = f
        .send_txn(
            "pdus-10",
            &txn_body(
                vec![to_device_edu(
                    &alice(),
                    "with-pdus",
                    json!({ bob(&f.relay): { "BOBPHONE": {} } }),
                )],
                pdus(10),
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let results = reply.json["pdus"].as_object().expect("pdus map");
    assert_eq!(results.len(), 10);
    for i in 0..10 {
        let result = &results[&format!("$event{i}:{FAKE_ORIGIN}")];
        assert!(result["error"].is_string(), "{result}");
    }
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);

    // A body origin other than the authenticated one.
    let mut wrong_origin = txn_body(vec![], vec![]);
    wrong_origin["origin"] = json!("evil.example");
    let reply = f.send_txn("wrong-origin", &wrong_origin).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");

    // Missing `pdus`.
    let reply = f
        .send_txn("no-pdus", &json!({"origin": FAKE_ORIGIN, "edus": []}))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");

    // The trailing-slash form of the route.
    let target = "/_matrix/federation/v1/send/slash/";
    let body = txn_body(vec![], vec![]);
    let auth = sign(&f.key, FAKE_ORIGIN, f.us(), "PUT", target, Some(&body));
    let reply = f
        .fed
        .send("PUT", target, &[auth], Some(body.to_string().into_bytes()))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // Wrong method on a known path.
    let reply = f
        .fed
        .send("GET", "/_matrix/federation/v1/send/x", &[], None)
        .await;
    assert_eq!(reply.status, 405, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_UNRECOGNIZED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_over_its_rate_is_told_to_wait() {
    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str("inbound_rate_per_origin = 1\n");
    let f = Arc::new(Fixture::with(options).await);
    // Burst is 2 × rate = 2. Twelve requests sent at once can earn at most
    // a few refilled tokens while they are in flight, so most of them must
    // be limited, whatever the machine's speed.
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..12 {
        let f = f.clone();
        requests.spawn(async move {
            f.send_txn(&format!("rate-{i}"), &txn_body(vec![], vec![]))
                .await
        });
    }
    let mut accepted = 0;
    let mut limited = Vec::new();
    while let Some(reply) = requests.join_next().await {
        let reply = reply.expect("no panic");
        match reply.status {
            200 => accepted += 1,
            429 => limited.push(reply),
            other => panic!("unexpected {other}: {}", reply.text),
        }
    }
    assert!(accepted >= 2, "the burst is allowed: {accepted}");
    assert!(
        !limited.is_empty(),
        "twelve requests at 1/s were never limited"
    );
    for reply in &limited {
        assert_eq!(reply.json["errcode"], "M_LIMIT_EXCEEDED");
        let retry_after: u64 = reply
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After header");
        assert!((1..=2).contains(&retry_after), "{retry_after}");
        assert!(reply.json["retry_after_ms"].as_u64().is_some());
    }
    // Limited requests stored nothing.
    let mut recorded = 0;
    for i in 0..12 {
        if f.store
            .inbound_txn_response(FAKE_ORIGIN, &format!("rate-{i}"))
            .await
            .expect("readable")
            .is_some()
        {
            recorded += 1;
        }
    }
    assert_eq!(recorded, accepted);
}
