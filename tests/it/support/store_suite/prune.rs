//! Pruning: dedupe records expire, a pass is bounded by its batch, a pass
//! clears a backlog while writes proceed, and idle destinations are retired.

use courier::store::pruner::{AfterBatch, PrunePass, PruneSettings};
use courier::store::{InboundOutcome, Retention, RetryState, SendBatch, SendOutcome};

use super::{Harness, NOW, ALICE, msg, one, edu, batch, devices, accepted, inbox_ns, inbound, inbound_edu, in_flight_for};

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
    let now = courier::clock::now_ms();
    let failing = RetryState {
        failures: 4,
        retry_after_ms: now + 60_000,
        last_success_ms: None,
        last_error: Some("connection refused".to_owned()),
    };
    for destination in ["idle.test", "queued.test", "flight.test", "held.test"] {
        s.set_retry_state(
            &crate::support::lease_fence(s, destination).await,
            destination,
            &failing,
        )
        .await
        .expect("set");
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
    s.begin_txn(
        &crate::support::lease_fence(s, "flight.test").await,
        in_flight_for("flight.test", "tx-f", vec![flight]),
    )
    .await
    .expect("begin");
    let held = seq_of(s.peek_outbox("held.test", 1, u64::MAX).await.expect("peek"));
    s.quarantine_edu(
        &crate::support::lease_fence(s, "held.test").await,
        "held.test",
        held,
        "refused",
        now,
    )
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
    s.begin_txn(
        &crate::support::lease_fence(s, "recent.test").await,
        in_flight_for("recent.test", "tx-r", vec![recent]),
    )
    .await
    .expect("begin");
    s.ack_txn(
        &crate::support::lease_fence(s, "recent.test").await,
        "recent.test",
        "tx-r",
        expiry - 1000,
    )
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
    s.set_retry_state(
        &crate::support::lease_fence(s, "idle.test").await,
        "idle.test",
        &failing,
    )
    .await
    .expect("set");
    assert_eq!(s.retry_state("idle.test").await.expect("state"), failing);
    // The batch bounds retirements too.
    for i in 0..5 {
        s.set_retry_state(
            &crate::support::lease_fence(s, &format!("gone{i}.test")).await,
            &format!("gone{i}.test"),
            &failing,
        )
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
