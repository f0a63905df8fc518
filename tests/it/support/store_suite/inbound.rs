//! Inbound transactions (`apply_inbound_txn`): a replayed transaction gets
//! its recorded response back, and a repeated message_id inside a new
//! transaction is not stored twice.

use courier::store::{DeviceTarget, InboundOutcome};

use super::{Harness, ALICE, msg, one, key, devices, inbox_ns, inbound, inbound_edu};

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

/// One inbound transaction of 70 EDUs (past the multi-row INSERT chunks of
/// the message-id records and inbox rows): an id seen in an earlier
/// transaction and an id repeated inside this one are each skipped, every
/// other EDU's rows are stored once, in the order received.
pub async fn seventy_edus_in_one_inbound_txn_dedupe_and_keep_order(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    devices(s, ALICE, &["A", "B"]).await;
    s.apply_inbound_txn(inbound(
        "remote.test",
        "before",
        vec![inbound_edu("m3", vec![msg(ALICE, one("A"), 3)])],
    ))
    .await
    .expect("apply");
    let mut edus: Vec<_> = (0..70u64)
        .map(|i| {
            let target = if i % 7 == 0 { DeviceTarget::All } else { one("A") };
            inbound_edu(&format!("m{i}"), vec![msg(ALICE, target, 1000 + i)])
        })
        .collect();
    edus[50] = inbound_edu("m10", vec![msg(ALICE, one("B"), 9999)]);
    match s
        .apply_inbound_txn(inbound("remote.test", "seventy", edus))
        .await
        .expect("apply")
    {
        InboundOutcome::Accepted {
            duplicate_message_ids,
            ..
        } => assert_eq!(duplicate_message_ids, 2),
        other => panic!("unexpected {other:?}"),
    }
    let mut expect_a = vec![3];
    expect_a.extend((0..70u64).filter(|i| *i != 3 && *i != 50).map(|i| 1000 + i));
    assert_eq!(inbox_ns(s, ALICE, "A").await, expect_a);
    let expect_b: Vec<u64> = (0..70u64).filter(|i| i % 7 == 0).map(|i| 1000 + i).collect();
    assert_eq!(inbox_ns(s, ALICE, "B").await, expect_b);
}
