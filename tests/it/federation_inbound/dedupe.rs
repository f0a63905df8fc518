//! Exactly once: a transaction replayed, retried after a restart or sent as
//! concurrent copies is applied once, a repeated message_id in a new
//! transaction is not stored twice, and a message between two real relays
//! arrives once.

use std::time::Duration;

use super::{FAKE_ORIGIN, Fixture, alice, bob, to_device_edu, txn_body};
use crate::support::TestRelay;
use courier::store::Store;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_transaction_is_delivered_once_and_replays_change_nothing() {
    let f = Fixture::new().await;
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "msg-1",
            json!({ bob(&f.relay): { "BOBPHONE": {"n": 1}, "*": {"n": 2} } }),
        )],
        vec![],
    );
    let first = f.send_txn("txn-1", &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.json, json!({"pdus": {}}));
    assert_eq!(
        first
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    // `*` reached both devices, the named message only the phone, in order.
    let phone = f.inbox("BOBPHONE").await;
    assert_eq!(phone.len(), 2, "{phone:?}");
    assert_eq!(phone[0]["sender"], alice());
    assert_eq!(phone[0]["type"], "m.room.encrypted");
    assert_eq!(f.inbox("BOBLAPTOP").await.len(), 1);

    // The same transaction again: the same response, nothing new.
    let replay = f.send_txn("txn-1", &body).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.text, first.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 2);
    assert_eq!(f.inbox("BOBLAPTOP").await.len(), 1);

    // The same message_id inside a new transaction: accepted, not stored twice.
    let again = f.send_txn("txn-2", &body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json, json!({"pdus": {}}));
    assert_eq!(f.inbox("BOBPHONE").await.len(), 2);
    assert_eq!(f.inbox("BOBLAPTOP").await.len(), 1);
    assert!(
        f.store
            .inbound_txn_response(FAKE_ORIGIN, "txn-2")
            .await
            .expect("readable")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_retried_after_a_restart_is_still_a_duplicate() {
    let mut f = Fixture::new().await;
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "before-restart",
            json!({ bob(&f.relay): { "BOBPHONE": {"n": 1} } }),
        )],
        vec![],
    );
    let first = f.send_txn("restart-txn", &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    f.relay.stop().await;
    f.relay.restart().await;
    // A new process: its key ring reads the key from the store again, and
    // the dedupe records survived.
    let replay = f.send_txn("restart-txn", &body).await;
    assert_eq!(replay.status, 200, "{}", replay.text);
    assert_eq!(replay.text, first.text);
    let again = f.send_txn("restart-txn-2", &body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_of_a_transaction_are_applied_once() {
    let f = Fixture::new().await;
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "concurrent",
            json!({ bob(&f.relay): { "BOBPHONE": {"n": 1} } }),
        )],
        vec![],
    );
    let (a, b, c) = tokio::join!(
        f.send_txn("same", &body),
        f.send_txn("same", &body),
        f.send_txn("same", &body)
    );
    for reply in [&a, &b, &c] {
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json, json!({"pdus": {}}));
    }
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);
}

/// The whole path: a client of relay A sends to a device on relay B; B
/// fetches A's key over TLS, verifies the transaction and the device gets
/// the message through `/sync` on B, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_deliver_a_message_once_over_real_tls() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = format!("@alice:{}", a.server_name);
    let bob = format!("@bob:{}", b.server_name);
    a.register_device(&alice, "ALICEDEV", "alice-token").await;
    b.register_device(&bob, "BOBDEV", "bob-token").await;

    let sent = a
        .send_to_device(
            "alice-token",
            "m.room.encrypted",
            "client-txn-1",
            json!({ &bob: { "BOBDEV": {"ciphertext": "hello over federation"} } }),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text);

    let (events, since) = b
        .sync_until("bob-token", None, 1, Duration::from_secs(30))
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sender"], alice);
    assert_eq!(events[0]["type"], "m.room.encrypted");
    assert_eq!(
        events[0]["content"],
        json!({"ciphertext": "hello over federation"})
    );

    // Nothing more arrives: not a second copy, not a retry.
    let r = b.sync("bob-token", since.as_deref(), 1_000).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let more = r.json["to_device"]["events"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(more, 0, "{}", r.text);
}
