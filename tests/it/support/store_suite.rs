//! The backend-generic conformance suite of `courier::store::Store`: one
//! async function per case, each taking a [`Harness`] with a fresh, empty
//! store (and a way to open it again). It knows no backend; a backend's test file supplies a
//! constructor and expands `store_conformance_tests!` to get one `#[tokio::test]`
//! per case:
//!
//! ```ignore
//! #[macro_use]
//! #[path = "support/store_suite.rs"]
//! mod store_suite;
//! async fn make() -> store_suite::Harness { /* fresh store + its temp dir */ }
//! store_conformance_tests!(make);
//! ```

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use courier::store::pruner::{AfterBatch, PrunePass, PruneSettings};
use courier::store::{
    ClientTxnKey, DeviceKey, DeviceTarget, InFlightTxn, InboundEdu, InboundOutcome, InboundTxn,
    NewInboxMessage, NewOutboxEdu, Retention, RetryState, SendBatch, SendOutcome, Store,
    StoredServerKey,
};
use serde_json::json;

/// A fresh store and whatever must outlive it (a temp dir, a database).
pub struct Harness {
    pub store: Arc<dyn Store>,
    /// Kept alive (never read) until the case ends.
    pub _guard: Box<dyn Any + Send + Sync>,
    /// Opens the same backing store again (after `close`).
    pub reopen: Reopen,
}

/// Opens a backend's store again on the same file or database.
pub type Reopen = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Store>> + Send>>
        + Send
        + Sync,
>;

/// Expands to one `#[tokio::test]` per conformance case, each calling
/// `$make().await` for a fresh `Harness`.
#[allow(unused_macros)]
macro_rules! store_conformance_tests {
    ($make:path) => {
        store_conformance_tests!(@list [] $make);
    };
    // `$make` returns `Option<Harness>`; `None` skips the case (a backend
    // whose server is not installed; the constructor says so on stderr).
    (optional $make:path) => {
        store_conformance_tests!(@list [optional] $make);
    };
    (@list [$($opt:ident)?] $make:path) => {
        store_conformance_tests!(@cases [$($opt)?] $make;
            devices_and_tokens,
            delete_device_removes_tokens_and_inbox,
            inbox_order_and_next_batch,
            inbox_limit_pages_150_as_100_then_50,
            repeated_since_redelivers_same_rows,
            star_expands_at_write_time,
            unknown_devices_are_dropped,
            mixed_targets_keep_order_in_large_sends,
            client_txn_dedupe_writes_nothing,
            outbox_rows_and_destinations_in_order,
            inbound_txn_dedupe_replays_response,
            inbound_message_id_dedupe_inside_new_txn,
            peek_outbox_respects_limits,
            begin_ack_txn,
            refuse_txn_counts_refusals,
            quarantine_and_release,
            retry_state_round_trip,
            destination_statuses_report_queues,
            server_keys_round_trip,
            prune_expires_dedupe_records,
            prune_is_bounded_by_batch,
            prune_pass_clears_a_backlog_while_writes_proceed,
            idle_destinations_are_retired,
            worker_name_claims_by_one_instance,
            concurrent_writers_each_row_once,
            reopen_keeps_data_and_stream_ids_never_repeat,
        );
    };
    (@cases [] $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make().await;
                $crate::support::store_suite::$case(&harness).await;
                drop(harness);
            }
        )+
    };
    (@cases [optional] $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $make().await else { return };
                $crate::support::store_suite::$case(&harness).await;
                drop(harness);
            }
        )+
    };
}

const NOW: i64 = 1_700_000_000_000;
const ALICE: &str = "@alice:local.test";
const BOB: &str = "@bob:local.test";
const SENDER: &str = "@sender:local.test";

fn msg(user: &str, device: DeviceTarget, n: u64) -> NewInboxMessage {
    NewInboxMessage {
        user_id: user.to_owned(),
        device,
        sender: SENDER.to_owned(),
        event_type: "m.test".to_owned(),
        content_json: json!({ "n": n }).to_string(),
    }
}

/// A client send of one message `{"n": n}` from `user` to its own
/// `device`: the backend-specific tests' building block.
pub fn send(txn_id: &str, user: &str, device: &str, n: u32) -> SendBatch {
    SendBatch {
        txn: ClientTxnKey {
            user_id: user.to_owned(),
            device_id: "D".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: txn_id.to_owned(),
        },
        local: vec![NewInboxMessage {
            user_id: user.to_owned(),
            device: DeviceTarget::One(device.to_owned()),
            sender: user.to_owned(),
            event_type: "m.test".to_owned(),
            content_json: format!("{{\"n\":{n}}}"),
        }],
        remote: vec![],
        now_ms: 0,
    }
}

fn one(device: &str) -> DeviceTarget {
    DeviceTarget::One(device.to_owned())
}

fn edu(destination: &str, n: u64, messages: u32) -> NewOutboxEdu {
    NewOutboxEdu {
        destination: destination.to_owned(),
        edu_json: json!({ "edu_type": "m.direct_to_device", "content": { "n": n } }).to_string(),
        message_count: messages,
    }
}

fn batch(txn_id: &str, local: Vec<NewInboxMessage>, remote: Vec<NewOutboxEdu>) -> SendBatch {
    SendBatch {
        txn: ClientTxnKey {
            user_id: SENDER.to_owned(),
            device_id: "SENDERDEV".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: txn_id.to_owned(),
        },
        local,
        remote,
        now_ms: NOW,
    }
}

fn key(user: &str, device: &str) -> DeviceKey {
    DeviceKey {
        user_id: user.to_owned(),
        device_id: device.to_owned(),
    }
}

fn n_of(content_json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(content_json).expect("stored content is JSON");
    v["n"].as_u64().expect("content has n")
}

async fn devices(store: &dyn Store, user: &str, ids: &[&str]) {
    for id in ids {
        store
            .upsert_device(user, id, None)
            .await
            .expect("upsert device");
    }
}

async fn accepted(store: &dyn Store, b: SendBatch) -> (Vec<DeviceKey>, Vec<String>) {
    match store.enqueue_send(b).await.expect("enqueue") {
        SendOutcome::Accepted {
            woken_devices,
            destinations,
        } => (woken_devices, destinations),
        SendOutcome::Duplicate => panic!("unexpected duplicate"),
    }
}

/// Every message of a device (without acknowledging), as content `n`s.
async fn inbox_ns(store: &dyn Store, user: &str, device: &str) -> Vec<u64> {
    let page = store
        .fetch_inbox(user, device, 0, 100_000)
        .await
        .expect("fetch");
    page.messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect()
}

async fn queued_ns(store: &dyn Store, destination: &str) -> Vec<u64> {
    store
        .peek_outbox(destination, 100_000, u64::MAX)
        .await
        .expect("peek")
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.edu_json).expect("edu json");
            v["content"]["n"].as_u64().expect("edu has n")
        })
        .collect()
}

// --- cases ----------------------------------------------------------------------

pub async fn devices_and_tokens(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert_eq!(
        s.list_devices(ALICE).await.expect("list"),
        Vec::<String>::new()
    );
    s.upsert_device(ALICE, "B", Some("token-b"))
        .await
        .expect("upsert");
    s.upsert_device(ALICE, "A", Some("token-a1"))
        .await
        .expect("upsert");
    s.upsert_device(ALICE, "A", Some("token-a2"))
        .await
        .expect("upsert again");
    s.upsert_device(ALICE, "A", None)
        .await
        .expect("upsert without token");
    s.upsert_device(BOB, "X", None).await.expect("upsert");
    assert_eq!(s.list_devices(ALICE).await.expect("list"), vec!["A", "B"]);
    assert_eq!(s.list_devices(BOB).await.expect("list"), vec!["X"]);
    assert_eq!(
        s.lookup_token("token-a1").await.expect("lookup"),
        Some(key(ALICE, "A"))
    );
    assert_eq!(
        s.lookup_token("token-a2").await.expect("lookup"),
        Some(key(ALICE, "A"))
    );
    assert_eq!(
        s.lookup_token("token-b").await.expect("lookup"),
        Some(key(ALICE, "B"))
    );
    assert_eq!(s.lookup_token("nope").await.expect("lookup"), None);
    // A token re-registered for another device now names that device.
    s.upsert_device(BOB, "X", Some("token-b"))
        .await
        .expect("move token");
    assert_eq!(
        s.lookup_token("token-b").await.expect("lookup"),
        Some(key(BOB, "X"))
    );
}

pub async fn delete_device_removes_tokens_and_inbox(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    s.upsert_device(ALICE, "A", Some("tok"))
        .await
        .expect("upsert");
    devices(s, ALICE, &["B"]).await;
    accepted(
        s,
        batch(
            "t1",
            vec![msg(ALICE, one("A"), 1), msg(ALICE, one("B"), 2)],
            vec![],
        ),
    )
    .await;
    assert!(s.delete_device(ALICE, "A").await.expect("delete"));
    assert!(!s.delete_device(ALICE, "A").await.expect("delete twice"));
    assert_eq!(s.lookup_token("tok").await.expect("lookup"), None);
    assert_eq!(s.list_devices(ALICE).await.expect("list"), vec!["B"]);
    assert_eq!(inbox_ns(s, ALICE, "A").await, Vec::<u64>::new());
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![2]);
    // Re-registering the device does not resurrect its old messages.
    devices(s, ALICE, &["A"]).await;
    assert_eq!(inbox_ns(s, ALICE, "A").await, Vec::<u64>::new());
    let report = s.prune(NOW, Retention::DEFAULT, 1000).await.expect("prune");
    assert_eq!(report.orphan_inbox_rows, 0);
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![2]);
}

pub async fn inbox_order_and_next_batch(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let empty = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    assert!(empty.messages.is_empty());
    assert_eq!(empty.next_batch, 0);
    assert!(!empty.more);
    for i in 0..3u64 {
        let local = (0..4).map(|j| msg(ALICE, one("A"), i * 4 + j)).collect();
        let (woken, dests) = accepted(s, batch(&format!("t{i}"), local, vec![])).await;
        assert_eq!(woken, vec![key(ALICE, "A")]);
        assert!(dests.is_empty());
    }
    let page = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    let ns: Vec<u64> = page
        .messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect();
    assert_eq!(ns, (0..12).collect::<Vec<_>>());
    assert!(
        page.messages
            .windows(2)
            .all(|w| w[0].stream_id < w[1].stream_id)
    );
    assert_eq!(page.next_batch, page.messages[11].stream_id);
    assert!(!page.more);
    assert!(
        page.messages
            .iter()
            .all(|m| m.sender == SENDER && m.event_type == "m.test")
    );
    // Acknowledge everything: the next fetch is empty and keeps `since`.
    let after = s
        .fetch_inbox(ALICE, "A", page.next_batch, 100)
        .await
        .expect("fetch");
    assert!(after.messages.is_empty());
    assert_eq!(after.next_batch, page.next_batch);
    assert!(!after.more);
    // New messages get higher stream ids than any acknowledged one.
    accepted(s, batch("t9", vec![msg(ALICE, one("A"), 99)], vec![])).await;
    let next = s
        .fetch_inbox(ALICE, "A", page.next_batch, 100)
        .await
        .expect("fetch");
    assert_eq!(next.messages.len(), 1);
    assert!(next.messages[0].stream_id > page.next_batch);
    // Other devices' inboxes are separate.
    assert!(
        s.fetch_inbox(ALICE, "other", 0, 100)
            .await
            .expect("fetch")
            .messages
            .is_empty()
    );
}

pub async fn inbox_limit_pages_150_as_100_then_50(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let local = (0..150).map(|n| msg(ALICE, one("A"), n)).collect();
    accepted(s, batch("t", local, vec![])).await;
    let first = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch");
    assert_eq!(first.messages.len(), 100);
    assert!(first.more);
    let ns: Vec<u64> = first
        .messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect();
    assert_eq!(ns, (0..100).collect::<Vec<_>>());
    let second = s
        .fetch_inbox(ALICE, "A", first.next_batch, 100)
        .await
        .expect("fetch");
    assert_eq!(second.messages.len(), 50);
    assert!(!second.more);
    let ns: Vec<u64> = second
        .messages
        .iter()
        .map(|m| n_of(&m.content_json))
        .collect();
    assert_eq!(ns, (100..150).collect::<Vec<_>>());
    let third = s
        .fetch_inbox(ALICE, "A", second.next_batch, 100)
        .await
        .expect("fetch");
    assert!(third.messages.is_empty());
    assert!(!third.more);
    assert_eq!(third.next_batch, second.next_batch);
    // Exactly 100 pending: a full page with nothing more.
    let local = (0..100).map(|n| msg(ALICE, one("A"), n)).collect();
    accepted(s, batch("t2", local, vec![])).await;
    let full = s
        .fetch_inbox(ALICE, "A", third.next_batch, 100)
        .await
        .expect("fetch");
    assert_eq!(full.messages.len(), 100);
    assert!(!full.more);
}

pub async fn repeated_since_redelivers_same_rows(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let local = (0..10).map(|n| msg(ALICE, one("A"), n)).collect();
    accepted(s, batch("t", local, vec![])).await;
    let a = s.fetch_inbox(ALICE, "A", 0, 4).await.expect("fetch");
    let b = s.fetch_inbox(ALICE, "A", 0, 4).await.expect("fetch again");
    assert_eq!(a, b);
    assert!(a.more);
    let c = s
        .fetch_inbox(ALICE, "A", a.next_batch, 4)
        .await
        .expect("fetch next");
    let d = s
        .fetch_inbox(ALICE, "A", a.next_batch, 4)
        .await
        .expect("fetch next again");
    assert_eq!(c, d);
    assert_eq!(c.messages[0].stream_id, a.messages[3].stream_id + 1);
    // The acknowledged rows are gone: an old `since` no longer sees them.
    let old = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("fetch old");
    assert_eq!(old.messages.len(), 6);
    assert_eq!(old.messages[0], c.messages[0]);
}

pub async fn star_expands_at_write_time(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A", "B"]).await;
    devices(s, BOB, &["X"]).await;
    let (mut woken, _) = accepted(
        s,
        batch(
            "t",
            vec![
                msg(ALICE, DeviceTarget::All, 1),
                msg(ALICE, DeviceTarget::All, 2),
                msg(BOB, DeviceTarget::All, 3),
            ],
            vec![],
        ),
    )
    .await;
    woken.sort();
    assert_eq!(woken, vec![key(ALICE, "A"), key(ALICE, "B"), key(BOB, "X")]);
    devices(s, ALICE, &["C"]).await;
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2]);
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![1, 2]);
    assert_eq!(inbox_ns(s, BOB, "X").await, vec![3]);
    assert_eq!(inbox_ns(s, ALICE, "C").await, Vec::<u64>::new());
    // A user with no devices: `*` writes nothing and wakes nobody.
    let (woken, _) = accepted(
        s,
        batch(
            "t2",
            vec![msg("@nobody:local.test", DeviceTarget::All, 4)],
            vec![],
        ),
    )
    .await;
    assert!(woken.is_empty());
}

pub async fn unknown_devices_are_dropped(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let (woken, _) = accepted(
        s,
        batch(
            "t",
            vec![
                msg(ALICE, one("GHOST"), 1),
                msg(ALICE, one("A"), 2),
                msg(BOB, one("A"), 3),
            ],
            vec![],
        ),
    )
    .await;
    assert_eq!(woken, vec![key(ALICE, "A")]);
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![2]);
    assert_eq!(inbox_ns(s, ALICE, "GHOST").await, Vec::<u64>::new());
    assert_eq!(inbox_ns(s, BOB, "A").await, Vec::<u64>::new());
    // Registering the device later does not deliver the dropped message.
    devices(s, ALICE, &["GHOST"]).await;
    assert_eq!(inbox_ns(s, ALICE, "GHOST").await, Vec::<u64>::new());
}

pub async fn mixed_targets_keep_order_in_large_sends(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let ids = ["A", "B", "C"];
    devices(s, ALICE, &ids).await;
    devices(s, BOB, &["X"]).await;
    // 211 messages mixing `*`, known, unknown devices and two users, so
    // that any internal batching of rows is crossed at odd places.
    let mut local = Vec::new();
    let mut expected: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    for n in 0..211u64 {
        let (user, target) = match n % 7 {
            0 | 3 => (ALICE, DeviceTarget::All),
            1 => (ALICE, one(ids[(n % 3) as usize])),
            2 => (ALICE, one("GHOST")),
            4 => (BOB, DeviceTarget::All),
            5 => (BOB, one("X")),
            _ => (ALICE, one("C")),
        };
        let targets: Vec<&str> = match (&target, user) {
            (DeviceTarget::All, u) if u == ALICE => ids.to_vec(),
            (DeviceTarget::All, _) => vec!["X"],
            (DeviceTarget::One(d), u) if u == ALICE && ids.contains(&d.as_str()) => {
                vec![ids[ids.iter().position(|i| i == d).expect("known")]]
            }
            (DeviceTarget::One(d), _) if d == "X" => vec!["X"],
            _ => vec![],
        };
        for t in targets {
            expected.entry((user, t)).or_default().push(n);
        }
        local.push(msg(user, target, n));
    }
    let (woken, _) = accepted(s, batch("big", local, vec![])).await;
    assert_eq!(woken.len(), 4);
    for ((user, device), ns) in expected {
        assert_eq!(inbox_ns(s, user, device).await, ns, "{user} {device}");
    }
}

pub async fn client_txn_dedupe_writes_nothing(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let b = batch(
        "t1",
        vec![msg(ALICE, one("A"), 1)],
        vec![edu("remote.test", 1, 1)],
    );
    accepted(s, b.clone()).await;
    // The same key with a different body: still a duplicate, nothing written.
    let mut again = batch(
        "t1",
        vec![msg(ALICE, one("A"), 2)],
        vec![edu("remote.test", 2, 1)],
    );
    again.now_ms = NOW + 5;
    assert_eq!(
        s.enqueue_send(again).await.expect("enqueue"),
        SendOutcome::Duplicate
    );
    assert_eq!(
        s.enqueue_send(b.clone()).await.expect("enqueue"),
        SendOutcome::Duplicate
    );
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1]);
    assert_eq!(queued_ns(s, "remote.test").await, vec![1]);
    // Each part of the key matters.
    let mut other = b.clone();
    other.txn.event_type = "m.other".to_owned();
    accepted(s, other).await;
    let mut other = b.clone();
    other.txn.device_id = "OTHERDEV".to_owned();
    accepted(s, other).await;
    let mut other = b.clone();
    other.txn.user_id = BOB.to_owned();
    accepted(s, other).await;
    let mut other = b;
    other.txn.txn_id = "t2".to_owned();
    accepted(s, other).await;
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 1, 1, 1, 1]);
}

pub async fn outbox_rows_and_destinations_in_order(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let (woken, dests) = accepted(
        s,
        batch(
            "t",
            vec![],
            vec![
                edu("b.test", 1, 2),
                edu("a.test", 2, 1),
                edu("b.test", 3, 1),
                edu("c.test", 4, 5),
            ],
        ),
    )
    .await;
    assert!(woken.is_empty());
    assert_eq!(dests, vec!["b.test", "a.test", "c.test"]);
    accepted(s, batch("t2", vec![], vec![edu("b.test", 5, 1)])).await;
    assert_eq!(queued_ns(s, "b.test").await, vec![1, 3, 5]);
    assert_eq!(queued_ns(s, "a.test").await, vec![2]);
    let rows = s.peek_outbox("c.test", 10, u64::MAX).await.expect("peek");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].message_count, 5);
    assert_eq!(rows[0].queued_ts, NOW);
    assert_eq!(rows[0].refusals, 0);
    let seqs: Vec<i64> = s
        .peek_outbox("b.test", 10, u64::MAX)
        .await
        .expect("peek")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        s.destinations_with_pending().await.expect("pending"),
        vec!["a.test", "b.test", "c.test"]
    );
}

fn inbound(origin: &str, txn_id: &str, edus: Vec<InboundEdu>) -> InboundTxn {
    InboundTxn {
        origin: origin.to_owned(),
        txn_id: txn_id.to_owned(),
        response_json: json!({ "pdus": {}, "txn": txn_id }).to_string(),
        edus,
        now_ms: NOW,
    }
}

fn inbound_edu(message_id: &str, messages: Vec<NewInboxMessage>) -> InboundEdu {
    InboundEdu {
        message_id: message_id.to_owned(),
        messages,
    }
}

pub async fn inbound_txn_dedupe_replays_response(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A", "B"]).await;
    let txn = inbound(
        "remote.test",
        "txn1",
        vec![
            inbound_edu(
                "m1",
                vec![msg(ALICE, one("A"), 1), msg(ALICE, DeviceTarget::All, 2)],
            ),
            inbound_edu(
                "m2",
                vec![msg(ALICE, one("GHOST"), 3), msg(ALICE, one("B"), 4)],
            ),
        ],
    );
    assert_eq!(
        s.inbound_txn_response("remote.test", "txn1")
            .await
            .expect("resp"),
        None
    );
    match s.apply_inbound_txn(txn.clone()).await.expect("apply") {
        InboundOutcome::Accepted {
            mut woken_devices,
            duplicate_message_ids,
        } => {
            woken_devices.sort();
            assert_eq!(woken_devices, vec![key(ALICE, "A"), key(ALICE, "B")]);
            assert_eq!(duplicate_message_ids, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2]);
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![2, 4]);
    // The retransmission (even with a different body) writes nothing.
    let mut retry = inbound(
        "remote.test",
        "txn1",
        vec![inbound_edu("m9", vec![msg(ALICE, one("A"), 9)])],
    );
    retry.response_json = "{\"other\":true}".to_owned();
    assert_eq!(
        s.apply_inbound_txn(retry).await.expect("apply"),
        InboundOutcome::Duplicate {
            response_json: txn.response_json.clone()
        }
    );
    assert_eq!(
        s.inbound_txn_response("remote.test", "txn1")
            .await
            .expect("resp"),
        Some(txn.response_json.clone())
    );
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2]);
    // The same txn id from another origin is a different transaction.
    let other = inbound(
        "other.test",
        "txn1",
        vec![inbound_edu("m1", vec![msg(ALICE, one("A"), 5)])],
    );
    assert!(matches!(
        s.apply_inbound_txn(other).await.expect("apply"),
        InboundOutcome::Accepted {
            duplicate_message_ids: 0,
            ..
        }
    ));
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2, 5]);
}

pub async fn inbound_message_id_dedupe_inside_new_txn(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let first = inbound(
        "remote.test",
        "txn1",
        vec![inbound_edu("m1", vec![msg(ALICE, one("A"), 1)])],
    );
    s.apply_inbound_txn(first).await.expect("apply");
    let second = inbound(
        "remote.test",
        "txn2",
        vec![
            inbound_edu("m2", vec![msg(ALICE, one("A"), 2)]),
            inbound_edu("m1", vec![msg(ALICE, one("A"), 100)]),
            inbound_edu("m3", vec![msg(ALICE, one("A"), 3)]),
            // A repeat inside the same transaction is also a duplicate.
            inbound_edu("m3", vec![msg(ALICE, one("A"), 300)]),
        ],
    );
    match s.apply_inbound_txn(second).await.expect("apply") {
        InboundOutcome::Accepted {
            woken_devices,
            duplicate_message_ids,
        } => {
            assert_eq!(woken_devices, vec![key(ALICE, "A")]);
            assert_eq!(duplicate_message_ids, 2);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2, 3]);
    // A transaction of only duplicates is accepted and wakes nobody.
    let third = inbound(
        "remote.test",
        "txn3",
        vec![inbound_edu("m2", vec![msg(ALICE, one("A"), 7)])],
    );
    assert_eq!(
        s.apply_inbound_txn(third).await.expect("apply"),
        InboundOutcome::Accepted {
            woken_devices: vec![],
            duplicate_message_ids: 1
        }
    );
}

pub async fn peek_outbox_respects_limits(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert!(
        s.peek_outbox("d.test", 100, 1 << 20)
            .await
            .expect("peek")
            .is_empty()
    );
    let remote = (0..10).map(|n| edu("d.test", n, 1)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    let all = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    assert_eq!(all.len(), 10);
    let four = s.peek_outbox("d.test", 4, u64::MAX).await.expect("peek");
    assert_eq!(four, all[..4].to_vec());
    let len = all[0].edu_json.len() as u64;
    // Room for exactly three EDUs (all have the same length here).
    let three = s
        .peek_outbox("d.test", 100, 3 * len + len / 2)
        .await
        .expect("peek");
    assert_eq!(three, all[..3].to_vec());
    let exact = s.peek_outbox("d.test", 100, 3 * len).await.expect("peek");
    assert_eq!(exact.len(), 3);
    // Always at least one, even if it alone exceeds max_bytes.
    let at_least_one = s.peek_outbox("d.test", 100, 1).await.expect("peek");
    assert_eq!(at_least_one, all[..1].to_vec());
    // Peeking does not consume.
    assert_eq!(
        s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek"),
        all
    );
}

fn in_flight_for(destination: &str, txn_id: &str, seqs: Vec<i64>) -> InFlightTxn {
    InFlightTxn {
        destination: destination.to_owned(),
        txn_id: txn_id.to_owned(),
        body: json!({ "txn": txn_id, "seqs": &seqs }).to_string(),
        seqs,
    }
}

pub async fn begin_ack_txn(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let remote = (0..5).map(|n| edu("d.test", n, 1)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    accepted(s, batch("t2", vec![], vec![edu("e.test", 9, 1)])).await;
    s.set_retry_state(
        "d.test",
        &RetryState {
            failures: 3,
            retry_after_ms: NOW + 60_000,
            last_success_ms: Some(NOW - 1000),
            last_error: Some("connection refused".to_owned()),
        },
    )
    .await
    .expect("set retry");
    assert_eq!(s.in_flight("d.test").await.expect("in flight"), None);
    let rows = s.peek_outbox("d.test", 3, u64::MAX).await.expect("peek");
    let txn = in_flight_for("d.test", "tx-1", rows.iter().map(|e| e.seq).collect());
    s.begin_txn(txn.clone()).await.expect("begin");
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(txn.clone())
    );
    // A second transaction for the same destination is refused...
    assert!(
        s.begin_txn(in_flight_for("d.test", "tx-2", vec![]))
            .await
            .is_err()
    );
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(txn.clone())
    );
    // ...but other destinations are independent.
    s.begin_txn(in_flight_for("e.test", "tx-e", vec![]))
        .await
        .expect("begin other");
    // An ack of another txn id changes nothing.
    s.ack_txn("d.test", "tx-unknown", NOW)
        .await
        .expect("ack other");
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 1, 2, 3, 4]);
    s.ack_txn("d.test", "tx-1", NOW + 10).await.expect("ack");
    assert_eq!(queued_ns(s, "d.test").await, vec![3, 4]);
    assert_eq!(s.in_flight("d.test").await.expect("in flight"), None);
    let expected = RetryState {
        failures: 0,
        retry_after_ms: 0,
        last_success_ms: Some(NOW + 10),
        last_error: None,
    };
    assert_eq!(s.retry_state("d.test").await.expect("retry"), expected);
    // Acking twice is harmless.
    s.ack_txn("d.test", "tx-1", NOW + 20)
        .await
        .expect("ack twice");
    assert_eq!(queued_ns(s, "d.test").await, vec![3, 4]);
    assert_eq!(s.retry_state("d.test").await.expect("retry"), expected);
    // A new transaction can begin now.
    let rest = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    s.begin_txn(in_flight_for(
        "d.test",
        "tx-3",
        rest.iter().map(|e| e.seq).collect(),
    ))
    .await
    .expect("begin next");
    assert_eq!(
        s.destinations_with_pending().await.expect("pending"),
        vec!["d.test", "e.test"]
    );
    s.ack_txn("d.test", "tx-3", NOW + 30).await.expect("ack");
    assert_eq!(queued_ns(s, "d.test").await, Vec::<u64>::new());
    // e.test still has a queued row and an in-flight record.
    assert_eq!(
        s.destinations_with_pending().await.expect("pending"),
        vec!["e.test"]
    );
    s.ack_txn("e.test", "tx-e", NOW).await.expect("ack e");
    // tx-e carried no seqs: the row queued for e.test stays.
    assert_eq!(queued_ns(s, "e.test").await, vec![9]);
}

pub async fn refuse_txn_counts_refusals(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let remote = (0..4).map(|n| edu("d.test", n, 1)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    let rows = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    let first_two: Vec<i64> = rows[..2].iter().map(|e| e.seq).collect();
    s.begin_txn(in_flight_for("d.test", "tx-1", first_two.clone()))
        .await
        .expect("begin");
    s.refuse_txn("d.test", "tx-1").await.expect("refuse");
    assert_eq!(s.in_flight("d.test").await.expect("in flight"), None);
    s.begin_txn(in_flight_for("d.test", "tx-2", first_two[..1].to_vec()))
        .await
        .expect("begin");
    s.refuse_txn("d.test", "tx-2").await.expect("refuse");
    // Refusing an unknown txn changes nothing.
    s.refuse_txn("d.test", "tx-2").await.expect("refuse again");
    let after = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    let refusals: Vec<u32> = after.iter().map(|e| e.refusals).collect();
    assert_eq!(refusals, vec![2, 1, 0, 0]);
    assert_eq!(
        after.iter().map(|e| e.seq).collect::<Vec<_>>(),
        rows.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
}

pub async fn quarantine_and_release(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let remote = (0..3).map(|n| edu("d.test", n, 2)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    let rows = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    s.quarantine_edu("d.test", rows[0].seq, "refused 3 times", NOW + 1)
        .await
        .expect("quarantine");
    // Quarantining a row that does not exist is a no-op.
    s.quarantine_edu("d.test", 999_999, "nope", NOW)
        .await
        .expect("quarantine missing");
    assert_eq!(queued_ns(s, "d.test").await, vec![1, 2]);
    let q = s.list_quarantined(Some("d.test")).await.expect("list");
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].seq, rows[0].seq);
    assert_eq!(q[0].edu_json, rows[0].edu_json);
    assert_eq!(q[0].reason, "refused 3 times");
    assert_eq!(q[0].quarantined_ts, NOW + 1);
    assert_eq!(s.list_quarantined(None).await.expect("list"), q);
    assert!(
        s.list_quarantined(Some("other.test"))
            .await
            .expect("list")
            .is_empty()
    );
    let status = s.destination_statuses().await.expect("status");
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].quarantined, 1);
    assert_eq!(status[0].pending_edus, 2);
    assert_eq!(status[0].pending_messages, 4);
    // Requeue: at the end of the queue, with a new seq.
    assert!(
        s.release_quarantined("d.test", rows[0].seq, true)
            .await
            .expect("release")
    );
    assert!(
        !s.release_quarantined("d.test", rows[0].seq, true)
            .await
            .expect("release twice")
    );
    let after = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    assert_eq!(after.len(), 3);
    assert_eq!(after[2].edu_json, rows[0].edu_json);
    assert!(after[2].seq > rows[2].seq);
    assert_eq!(after[2].refusals, 0);
    assert!(s.list_quarantined(None).await.expect("list").is_empty());
    // Delete: gone for good.
    s.quarantine_edu("d.test", after[0].seq, "bad", NOW)
        .await
        .expect("quarantine");
    assert!(
        s.release_quarantined("d.test", after[0].seq, false)
            .await
            .expect("release")
    );
    assert!(s.list_quarantined(None).await.expect("list").is_empty());
    assert_eq!(queued_ns(s, "d.test").await, vec![2, 0]);
    // A destination whose only row is quarantined has nothing pending.
    accepted(s, batch("t2", vec![], vec![edu("q.test", 5, 1)])).await;
    let q_rows = s.peek_outbox("q.test", 1, u64::MAX).await.expect("peek");
    s.quarantine_edu("q.test", q_rows[0].seq, "bad", NOW)
        .await
        .expect("quarantine");
    assert_eq!(
        s.destinations_with_pending().await.expect("pending"),
        vec!["d.test"]
    );
    assert!(
        s.peek_outbox("q.test", 100, u64::MAX)
            .await
            .expect("peek")
            .is_empty()
    );
}

pub async fn retry_state_round_trip(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert_eq!(
        s.retry_state("d.test").await.expect("retry"),
        RetryState::default()
    );
    let state = RetryState {
        failures: 7,
        retry_after_ms: NOW + 3_600_000,
        last_success_ms: None,
        last_error: Some("tls handshake failed".to_owned()),
    };
    s.set_retry_state("d.test", &state).await.expect("set");
    assert_eq!(s.retry_state("d.test").await.expect("retry"), state);
    let state2 = RetryState {
        failures: 0,
        retry_after_ms: 0,
        last_success_ms: Some(NOW),
        last_error: None,
    };
    s.set_retry_state("d.test", &state2).await.expect("set");
    assert_eq!(s.retry_state("d.test").await.expect("retry"), state2);
    assert_eq!(
        s.retry_state("other.test").await.expect("retry"),
        RetryState::default()
    );
    // Retry state alone makes a destination visible in status, not pending.
    let status = s.destination_statuses().await.expect("status");
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].destination, "d.test");
    assert_eq!(status[0].retry, state2);
    assert_eq!(status[0].pending_edus, 0);
    assert_eq!(status[0].oldest_queued_ts, None);
    assert!(
        s.destinations_with_pending()
            .await
            .expect("pending")
            .is_empty()
    );
}

pub async fn destination_statuses_report_queues(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert!(s.destination_statuses().await.expect("status").is_empty());
    accepted(
        s,
        batch("t1", vec![], vec![edu("a.test", 1, 3), edu("b.test", 2, 1)]),
    )
    .await;
    let mut later = batch("t2", vec![], vec![edu("a.test", 3, 4)]);
    later.now_ms = NOW + 500;
    accepted(s, later).await;
    let failing = RetryState {
        failures: 2,
        retry_after_ms: NOW + 1000,
        last_success_ms: None,
        last_error: Some("timeout".to_owned()),
    };
    s.set_retry_state("b.test", &failing).await.expect("set");
    let status = s.destination_statuses().await.expect("status");
    let by_name: BTreeMap<&str, _> = status.iter().map(|d| (d.destination.as_str(), d)).collect();
    assert_eq!(by_name.len(), 2);
    let a = by_name["a.test"];
    assert_eq!(
        (a.pending_edus, a.pending_messages, a.oldest_queued_ts),
        (2, 7, Some(NOW))
    );
    assert_eq!(a.retry, RetryState::default());
    assert_eq!(a.quarantined, 0);
    let b = by_name["b.test"];
    assert_eq!(
        (b.pending_edus, b.pending_messages, b.oldest_queued_ts),
        (1, 1, Some(NOW))
    );
    assert_eq!(b.retry, failing);
}

fn server_key(server: &str, key_id: &str, valid_until_ts: i64) -> StoredServerKey {
    StoredServerKey {
        server_name: server.to_owned(),
        key_id: key_id.to_owned(),
        public_key: format!("pk-{server}-{key_id}-{valid_until_ts}"),
        valid_until_ts,
    }
}

pub async fn server_keys_round_trip(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert!(s.server_keys("a.test").await.expect("keys").is_empty());
    s.put_server_keys(vec![
        server_key("a.test", "ed25519:b", NOW + 10),
        server_key("a.test", "ed25519:a", NOW + 1000),
        server_key("b.test", "ed25519:a", NOW + 10),
    ])
    .await
    .expect("put");
    assert_eq!(
        s.server_keys("a.test").await.expect("keys"),
        vec![
            server_key("a.test", "ed25519:a", NOW + 1000),
            server_key("a.test", "ed25519:b", NOW + 10)
        ]
    );
    // Re-putting a key replaces it.
    s.put_server_keys(vec![server_key("a.test", "ed25519:b", NOW + 5000)])
        .await
        .expect("put");
    assert_eq!(
        s.server_keys("a.test").await.expect("keys")[1],
        server_key("a.test", "ed25519:b", NOW + 5000)
    );
    let report = s
        .prune(NOW + 2000, Retention::DEFAULT, 100)
        .await
        .expect("prune");
    assert_eq!(report.expired_server_keys, 2);
    assert_eq!(
        s.server_keys("a.test").await.expect("keys"),
        vec![server_key("a.test", "ed25519:b", NOW + 5000)]
    );
    assert!(s.server_keys("b.test").await.expect("keys").is_empty());
}

pub async fn prune_expires_dedupe_records(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A"]).await;
    let r = Retention::DEFAULT;
    accepted(s, batch("t1", vec![msg(ALICE, one("A"), 1)], vec![])).await;
    s.apply_inbound_txn(inbound(
        "remote.test",
        "txn1",
        vec![inbound_edu("m1", vec![msg(ALICE, one("A"), 2)])],
    ))
    .await
    .expect("apply");
    // Nothing has expired yet.
    assert_eq!(
        s.prune(NOW + 1000, r, 100).await.expect("prune"),
        Default::default()
    );
    assert_eq!(
        s.enqueue_send(batch("t1", vec![], vec![]))
            .await
            .expect("send"),
        SendOutcome::Duplicate
    );
    // After the txn retention (24 h), client and inbound txns expire, but
    // message ids (7 days) still dedupe.
    let day = NOW + r.client_txn_ms.max(r.inbound_txn_ms) + 1;
    let report = s.prune(day, r, 100).await.expect("prune");
    assert_eq!(
        (
            report.client_txns,
            report.inbound_txns,
            report.inbound_message_ids
        ),
        (1, 1, 0)
    );
    assert_eq!(
        s.inbound_txn_response("remote.test", "txn1")
            .await
            .expect("resp"),
        None
    );
    accepted(s, batch("t1", vec![msg(ALICE, one("A"), 3)], vec![])).await;
    let replay = inbound(
        "remote.test",
        "txn1",
        vec![inbound_edu("m1", vec![msg(ALICE, one("A"), 4)])],
    );
    assert_eq!(
        s.apply_inbound_txn(replay).await.expect("apply"),
        InboundOutcome::Accepted {
            woken_devices: vec![],
            duplicate_message_ids: 1
        }
    );
    let week = NOW + r.inbound_message_id_ms + 1;
    let report = s.prune(week, r, 100).await.expect("prune");
    // The two txns recorded just now (at NOW) and the message id expire.
    assert_eq!(
        (
            report.client_txns,
            report.inbound_txns,
            report.inbound_message_ids
        ),
        (1, 1, 1)
    );
    let replay = inbound(
        "remote.test",
        "txn1",
        vec![inbound_edu("m1", vec![msg(ALICE, one("A"), 5)])],
    );
    assert!(matches!(
        s.apply_inbound_txn(replay).await.expect("apply"),
        InboundOutcome::Accepted {
            duplicate_message_ids: 0,
            ..
        }
    ));
    // Inbox rows of existing devices are never pruned.
    assert_eq!(report.orphan_inbox_rows, 0);
    assert_eq!(inbox_ns(s, ALICE, "A").await, vec![1, 2, 3, 5]);
}

pub async fn prune_is_bounded_by_batch(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    for i in 0..5 {
        accepted(s, batch(&format!("t{i}"), vec![], vec![])).await;
    }
    let later = NOW + Retention::DEFAULT.client_txn_ms + 1;
    let counts: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                s.prune(later, Retention::DEFAULT, 2)
                    .await
                    .expect("prune")
                    .client_txns,
            );
        }
        v
    };
    assert_eq!(counts, vec![2, 2, 1, 0]);
}

/// F4: a backlog far above one batch (50,000 expired client txns and
/// 50,000 expired inbound message ids, batch 5,000) is gone after one pass,
/// and the pass holds nothing between its batches: a write made after the
/// first batch completes while most of the backlog is still there.
pub async fn prune_pass_clears_a_backlog_while_writes_proceed(harness: &Harness) {
    const ROWS: u64 = 50_000;
    const BATCH: u32 = 5_000;
    const WRITERS: u64 = 32;
    let store = harness.store.clone();
    devices(&*store, ALICE, &["A"]).await;
    // The backlog, written at NOW: client txns from concurrent writers (so
    // the backends group them), message ids in inbound transactions of
    // 5,000 EDUs each.
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in (w..ROWS).step_by(WRITERS as usize) {
                accepted(&*store, batch(&format!("old-{i}"), vec![], vec![])).await;
            }
        }));
    }
    for (t, chunk) in (0..ROWS).collect::<Vec<_>>().chunks(5_000).enumerate() {
        let edus = chunk
            .iter()
            .map(|i| inbound_edu(&format!("mid-{i}"), vec![]))
            .collect();
        store
            .apply_inbound_txn(inbound("remote.test", &format!("in-{t}"), edus))
            .await
            .expect("apply");
    }
    for h in handles {
        h.await.expect("writer task");
    }
    let retention = Retention::DEFAULT;
    let later = NOW + retention.inbound_message_id_ms + 1;
    let settings = PruneSettings {
        batch: BATCH,
        interval: std::time::Duration::from_secs(300),
        retention,
    };
    let s = &*store;
    let mut pass = PrunePass::new(s, later, settings);
    assert_eq!(
        pass.step().await.expect("first batch"),
        AfterBatch::Continue
    );
    assert_eq!(pass.total().client_txns, u64::from(BATCH));
    // Between batches the store serves writes at once (the bound is only a
    // guard against a hang), with 45,000 expired rows of each kind left.
    let fresh = |txn_id: &str| SendBatch {
        now_ms: later,
        ..batch(txn_id, vec![msg(ALICE, one("A"), 7)], vec![])
    };
    let written = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        s.enqueue_send(fresh("fresh-1")),
    )
    .await
    .expect("a write between two batches is not held up")
    .expect("write");
    assert!(matches!(written, SendOutcome::Accepted { .. }));
    // The rest of the pass, with writes going on beside it.
    let writes = async {
        for i in 2..12 {
            let outcome = s
                .enqueue_send(fresh(&format!("fresh-{i}")))
                .await
                .expect("write during the pass");
            assert!(matches!(outcome, SendOutcome::Accepted { .. }));
        }
    };
    let never = tokio_util::sync::CancellationToken::new();
    let (finished, ()) = tokio::join!(pass.finish(&never), writes);
    finished.expect("pass");
    let total = pass.total().clone();
    assert_eq!(
        (
            total.client_txns,
            total.inbound_message_ids,
            total.inbound_txns
        ),
        (ROWS, ROWS, ROWS / 5_000)
    );
    // Ten full batches, then one that came back short.
    assert_eq!(pass.batches(), 11);
    // Nothing expired is left: another batch finds nothing...
    assert_eq!(
        s.prune(later, retention, BATCH).await.expect("prune"),
        Default::default()
    );
    // ...old keys are accepted again, fresh ones still dedupe.
    accepted(s, batch("old-0", vec![], vec![])).await;
    accepted(s, batch(&format!("old-{}", ROWS - 1), vec![], vec![])).await;
    assert_eq!(
        s.enqueue_send(fresh("fresh-5")).await.expect("send"),
        SendOutcome::Duplicate
    );
    assert_eq!(inbox_ns(s, ALICE, "A").await.len(), 11);
}

/// F13: prune forgets the retry state of a destination only when nothing is
/// queued, in flight or quarantined for it and its last activity (update,
/// success, end of backoff) is older than `Retention::destination_ms`.
pub async fn idle_destinations_are_retired(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    // `set_retry_state` stamps the wall clock; the backoff ends a minute on.
    let now = courier::now_ms();
    let failing = RetryState {
        failures: 4,
        retry_after_ms: now + 60_000,
        last_success_ms: None,
        last_error: Some("connection refused".to_owned()),
    };
    for destination in ["idle.test", "queued.test", "flight.test", "held.test"] {
        s.set_retry_state(destination, &failing).await.expect("set");
    }
    accepted(
        s,
        batch(
            "t",
            vec![],
            vec![
                edu("queued.test", 1, 1),
                edu("flight.test", 2, 1),
                edu("held.test", 3, 1),
                edu("recent.test", 4, 1),
            ],
        ),
    )
    .await;
    let seq_of = |rows: Vec<courier::store::OutboxEdu>| rows[0].seq;
    let flight = seq_of(
        s.peek_outbox("flight.test", 1, u64::MAX)
            .await
            .expect("peek"),
    );
    s.begin_txn(in_flight_for("flight.test", "tx-f", vec![flight]))
        .await
        .expect("begin");
    let held = seq_of(s.peek_outbox("held.test", 1, u64::MAX).await.expect("peek"));
    s.quarantine_edu("held.test", held, "refused", now)
        .await
        .expect("quarantine");
    let retention = Retention::DEFAULT;
    let expiry = now + 60_000 + retention.destination_ms;
    // recent.test was delivered just before the expiry: still active.
    let recent = seq_of(
        s.peek_outbox("recent.test", 1, u64::MAX)
            .await
            .expect("peek"),
    );
    s.begin_txn(in_flight_for("recent.test", "tx-r", vec![recent]))
        .await
        .expect("begin");
    s.ack_txn("recent.test", "tx-r", expiry - 1000)
        .await
        .expect("ack");
    let names = |statuses: Vec<courier::store::DestinationStatus>| -> Vec<String> {
        statuses.into_iter().map(|d| d.destination).collect()
    };
    let all = vec![
        "flight.test",
        "held.test",
        "idle.test",
        "queued.test",
        "recent.test",
    ];
    assert_eq!(
        names(s.destination_statuses().await.expect("statuses")),
        all
    );
    // Until the backoff end plus the retention, every row stays.
    let report = s.prune(expiry - 1, retention, 100).await.expect("prune");
    assert_eq!(report.retired_destinations, 0);
    // Then only the idle one goes; the others have work or were active.
    let report = s.prune(expiry + 1, retention, 100).await.expect("prune");
    assert_eq!(report.retired_destinations, 1);
    assert_eq!(
        names(s.destination_statuses().await.expect("statuses")),
        all[..2]
            .iter()
            .chain(&all[3..])
            .copied()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.retry_state("idle.test").await.expect("state"),
        RetryState::default()
    );
    assert_eq!(s.retry_state("queued.test").await.expect("state"), failing);
    // A retired destination starts over when it is used again.
    s.set_retry_state("idle.test", &failing).await.expect("set");
    assert_eq!(s.retry_state("idle.test").await.expect("state"), failing);
    // The batch bounds retirements too.
    for i in 0..5 {
        s.set_retry_state(&format!("gone{i}.test"), &failing)
            .await
            .expect("set");
    }
    let far = expiry + retention.destination_ms;
    let counts: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(
                s.prune(far, retention, 2)
                    .await
                    .expect("prune")
                    .retired_destinations,
            );
        }
        v
    };
    // idle.test again, recent.test (idle by now) and the five.
    assert_eq!(counts, vec![2, 2, 2, 1, 0]);
}

/// F10, the part every backend shares: one store instance may claim,
/// heartbeat, release and claim again its own worker name. (Refusing a
/// second live instance is PostgreSQL's: `tests/it/store_postgres.rs`.)
pub async fn worker_name_claims_by_one_instance(harness: &Harness) {
    let s = &*harness.store;
    s.claim_worker_name("w1", NOW, 1_000).await.expect("claim");
    s.claim_worker_name("w1", NOW + 10, 1_000)
        .await
        .expect("claiming its own name again");
    assert!(
        s.heartbeat_worker_name("w1", NOW + 20, 1_000)
            .await
            .expect("beat")
    );
    s.claim_worker_name("w2", NOW, 1_000)
        .await
        .expect("a second name");
    s.release_worker_name("w1").await.expect("release");
    s.release_worker_name("w1")
        .await
        .expect("a second release is a no-op");
    s.claim_worker_name("w1", NOW + 30, 1_000)
        .await
        .expect("claim after release");
    assert!(
        s.heartbeat_worker_name("w2", NOW + 40, 1_000)
            .await
            .expect("beat")
    );
}

pub async fn concurrent_writers_each_row_once(harness: &Harness) {
    let store = harness.store.clone();
    const TASKS: u64 = 64;
    const SENDS: u64 = 10;
    devices(&*store, ALICE, &["A", "B"]).await;
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..SENDS {
                let n = task * 1000 + i;
                let b = batch(
                    &format!("c-{task}-{i}"),
                    vec![msg(ALICE, DeviceTarget::All, n), msg(ALICE, one("A"), n)],
                    vec![edu("d.test", n, 2)],
                );
                let (woken, dests) = accepted(&*store, b).await;
                assert_eq!(woken, vec![key(ALICE, "A"), key(ALICE, "B")]);
                assert_eq!(dests, vec!["d.test"]);
            }
        }));
    }
    for h in handles {
        h.await.expect("writer task");
    }
    let a = store
        .fetch_inbox(ALICE, "A", 0, 100_000)
        .await
        .expect("fetch");
    let b = store
        .fetch_inbox(ALICE, "B", 0, 100_000)
        .await
        .expect("fetch");
    for page in [&a, &b] {
        assert!(
            page.messages
                .windows(2)
                .all(|w| w[0].stream_id < w[1].stream_id)
        );
    }
    let expect_all: BTreeSet<u64> = (0..TASKS)
        .flat_map(|t| (0..SENDS).map(move |i| t * 1000 + i))
        .collect();
    let mut count_a: BTreeMap<u64, usize> = BTreeMap::new();
    for m in &a.messages {
        *count_a.entry(n_of(&m.content_json)).or_default() += 1;
    }
    assert_eq!(count_a.keys().copied().collect::<BTreeSet<_>>(), expect_all);
    assert!(
        count_a.values().all(|&c| c == 2),
        "each send gives device A two rows"
    );
    let b_ns: Vec<u64> = b.messages.iter().map(|m| n_of(&m.content_json)).collect();
    assert_eq!(b_ns.iter().copied().collect::<BTreeSet<_>>(), expect_all);
    assert_eq!(b_ns.len(), expect_all.len());
    // Each task's sends appear in the order it made them.
    for t in 0..TASKS {
        let mine: Vec<u64> = b_ns.iter().copied().filter(|n| n / 1000 == t).collect();
        assert_eq!(mine, (0..SENDS).map(|i| t * 1000 + i).collect::<Vec<_>>());
    }
    let queued = queued_ns(&*store, "d.test").await;
    assert_eq!(queued.len(), expect_all.len());
    assert_eq!(queued.into_iter().collect::<BTreeSet<_>>(), expect_all);
    // Replaying every txn concurrently writes nothing.
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let b = batch(
                &format!("c-{task}-0"),
                vec![msg(ALICE, one("A"), 0)],
                vec![],
            );
            assert_eq!(
                store.enqueue_send(b).await.expect("enqueue"),
                SendOutcome::Duplicate
            );
        }));
    }
    for h in handles {
        h.await.expect("replay task");
    }
    let again = store
        .fetch_inbox(ALICE, "A", 0, 100_000)
        .await
        .expect("fetch");
    assert_eq!(again.messages.len(), a.messages.len());
}

pub async fn reopen_keeps_data_and_stream_ids_never_repeat(harness: &Harness) {
    let store = harness.store.clone();
    store
        .upsert_device(ALICE, "A", Some("tok"))
        .await
        .expect("device");
    store
        .enqueue_send(batch("t1", vec![msg(ALICE, one("A"), 1)], vec![]))
        .await
        .expect("send");
    let page = store.fetch_inbox(ALICE, "A", 0, 10).await.expect("fetch");
    let acked = page.next_batch;
    // Acknowledge the highest row: its id must not be handed out again.
    store.fetch_inbox(ALICE, "A", acked, 10).await.expect("ack");
    store.close().await.expect("close");
    assert!(
        store
            .enqueue_send(batch("t2", vec![msg(ALICE, one("A"), 2)], vec![]))
            .await
            .is_err(),
        "a closed store refuses writes"
    );
    drop(store);

    let store = (harness.reopen)().await;
    assert_eq!(
        store
            .lookup_token("tok")
            .await
            .expect("token")
            .map(|d| d.device_id),
        Some("A".to_owned())
    );
    store
        .enqueue_send(batch("t2", vec![msg(ALICE, one("A"), 2)], vec![]))
        .await
        .expect("send");
    let page = store
        .fetch_inbox(ALICE, "A", acked, 10)
        .await
        .expect("fetch");
    assert_eq!(page.messages.len(), 1);
    assert!(page.messages[0].stream_id > acked);
}
