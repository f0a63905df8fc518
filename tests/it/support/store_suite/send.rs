//! Client sends (`enqueue_send`): the client txn dedupe that writes nothing
//! on a duplicate, outbox rows and destinations in order, and concurrent
//! writers that each write every row once.

use std::collections::{BTreeMap, BTreeSet};

use courier::store::{DeviceTarget, SendOutcome};

use super::{Harness, NOW, ALICE, BOB, msg, one, edu, batch, key, n_of, devices, accepted, inbox_ns, queued_ns};

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

/// One call with 73 local rows and 70 remote EDUs: past the backends'
/// multi-row INSERT chunks (SQLite: 32 rows a statement, then halves), so
/// a row dropped, doubled or reordered at a chunk edge shows, and the
/// journal's `accepted` span and `queued` seqs match the rows stored.
pub async fn seventy_recipients_in_one_call_each_get_their_row_once_in_order(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let alice_devices = ["D0", "D1", "D2", "D3", "D4"];
    devices(s, ALICE, &alice_devices).await;
    devices(s, BOB, &["X", "Y", "Z"]).await;
    let mut local: Vec<_> = (0..70)
        .map(|i| msg(ALICE, one(alice_devices[i % 5]), i as u64))
        .collect();
    local.push(msg(BOB, DeviceTarget::All, 100));
    // A client send's local messages share the message_id minted for it.
    for m in &mut local {
        m.message_id = "SEVENTY".to_owned();
    }
    let remote: Vec<_> = (0..70)
        .map(|i| edu(["x.test", "y.test", "z.test"][i % 3], 1000 + i as u64, 1))
        .collect();
    let (woken, dests) = accepted(s, batch("seventy", local, remote)).await;
    assert_eq!(woken.len(), 8);
    assert_eq!(dests, vec!["x.test", "y.test", "z.test"]);
    let mut stream_ids = Vec::new();
    for (d, device) in alice_devices.iter().enumerate() {
        let expect: Vec<u64> = (0..70).filter(|i| i % 5 == d).map(|i| i as u64).collect();
        assert_eq!(inbox_ns(s, ALICE, device).await, expect, "{device}");
        let page = s.fetch_inbox(ALICE, device, 0, 1000).await.expect("fetch");
        stream_ids.extend(page.messages.iter().map(|m| m.stream_id));
    }
    for device in ["X", "Y", "Z"] {
        assert_eq!(inbox_ns(s, BOB, device).await, vec![100]);
        let page = s.fetch_inbox(BOB, device, 0, 1000).await.expect("fetch");
        stream_ids.extend(page.messages.iter().map(|m| m.stream_id));
    }
    stream_ids.sort_unstable();
    stream_ids.dedup();
    assert_eq!(stream_ids.len(), 73, "one row per recipient device");
    let mut seqs = std::collections::HashMap::new();
    for (k, destination) in ["x.test", "y.test", "z.test"].iter().enumerate() {
        let expect: Vec<u64> = (0..70u64).filter(|i| i % 3 == k as u64).map(|i| 1000 + i).collect();
        assert_eq!(queued_ns(s, destination).await, expect, "{destination}");
        let rows = s.peek_outbox(destination, 1000, u64::MAX).await.expect("peek");
        seqs.insert(destination.to_string(), rows.iter().map(|e| e.seq).collect::<Vec<_>>());
    }
    // The journal (on by default): its stream span covers exactly the rows
    // written, and each `queued` row names its EDU's seq, in order.
    let records = s
        .trace_journal(&courier::store::trace::TraceQuery::TxnId("seventy".into()))
        .await
        .expect("journal");
    let accepted_row = records
        .events
        .iter()
        .find(|e| e.kind == "accepted")
        .expect("accepted row");
    assert_eq!(accepted_row.first_id, stream_ids.first().copied());
    assert_eq!(accepted_row.last_id, stream_ids.last().copied());
    assert_eq!(accepted_row.last_id.zip(accepted_row.first_id).map(|(l, f)| l - f + 1), Some(73));
    let mut journaled: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for e in records.events.iter().filter(|e| e.kind == "queued") {
        let peer = e.peer.clone().expect("queued row names its destination");
        journaled
            .entry(peer)
            .or_default()
            .push(e.first_id.expect("queued row names its seq"));
    }
    assert_eq!(journaled, seqs);
}
