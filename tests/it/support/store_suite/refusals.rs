//! A destination's persisted refusal history (`RefusalState`) and the two
//! ways quarantined EDUs go back to the queue: to their own place
//! (`restore_quarantined`, probation ended) and in bulk at the end
//! (`requeue_quarantined`, the operator's requeue).

use courier::store::{RefusalState, RetryState};

use super::{Harness, NOW, accepted, batch, edu, in_flight_for, queued_ns};

pub async fn refusal_state_round_trips_beside_the_retry_state(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert_eq!(
        s.refusal_state("d.test").await.expect("state"),
        RefusalState::default()
    );
    let state = RefusalState {
        split_limit: Some(12),
        split_upto: 4_000_000_000,
        split_accepted: true,
        refusing_since_ms: Some(NOW),
        probation_seqs: vec![7, 3_000_000_000],
    };
    s.set_refusal_state(&crate::support::lease_fence(s, "d.test").await, "d.test", &state, NOW)
        .await
        .expect("set");
    assert_eq!(s.refusal_state("d.test").await.expect("state"), state);
    // The retry state and the refusal history are written independently.
    let retry = RetryState {
        failures: 4,
        retry_after_ms: NOW + 1000,
        last_success_ms: None,
        last_error: Some("refusing: 400".to_owned()),
    };
    s.set_retry_state(&crate::support::lease_fence(s, "d.test").await, "d.test", &retry).await.expect("retry");
    assert_eq!(s.refusal_state("d.test").await.expect("state"), state);
    assert_eq!(s.retry_state("d.test").await.expect("retry"), retry);
    let statuses = s.destination_statuses().await.expect("statuses");
    let row = statuses
        .iter()
        .find(|r| r.destination == "d.test")
        .expect("a row");
    assert_eq!(row.refusing_since_ms, Some(NOW));
    assert_eq!(row.retry, retry);
    // An ack resets the retry state, not the history (the sender does that).
    accepted(s, batch("t", vec![], vec![edu("d.test", 1, 1)])).await;
    let rows = s.peek_outbox("d.test", 10, u64::MAX).await.expect("peek");
    s.begin_txn(&crate::support::lease_fence(s, "d.test").await, in_flight_for("d.test", "tx", vec![rows[0].seq]))
        .await
        .expect("begin");
    s.ack_txn(&crate::support::lease_fence(s, "d.test").await, "d.test", "tx", NOW + 5).await.expect("ack");
    assert_eq!(s.refusal_state("d.test").await.expect("state"), state);
    s.set_refusal_state(&crate::support::lease_fence(s, "d.test").await, "d.test", &RefusalState::default(), NOW + 6)
        .await
        .expect("clear");
    assert_eq!(
        s.refusal_state("d.test").await.expect("state"),
        RefusalState::default()
    );
    let statuses = s.destination_statuses().await.expect("statuses");
    assert!(statuses.iter().all(|r| r.refusing_since_ms.is_none()));
    // Another destination's history is its own.
    assert_eq!(
        s.refusal_state("e.test").await.expect("state"),
        RefusalState::default()
    );
}

pub async fn restore_quarantined_returns_an_edu_to_its_place(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let remote = (0..4).map(|n| edu("d.test", n, 1)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    let rows = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    s.quarantine_edu(&crate::support::lease_fence(s, "d.test").await, "d.test", rows[1].seq, "on probation", NOW)
        .await
        .expect("quarantine");
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 2, 3]);
    // Queued meanwhile: after the others, whatever happens to n = 1.
    accepted(s, batch("t2", vec![], vec![edu("d.test", 4, 1)])).await;
    assert!(
        s.restore_quarantined(&crate::support::lease_fence(s, "d.test").await, "d.test", rows[1].seq, 3)
            .await
            .expect("restore")
    );
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 1, 2, 3, 4]);
    let after = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    assert_eq!(after[1].seq, rows[1].seq, "its own seq");
    assert_eq!(after[1].refusals, 3);
    assert!(s.list_quarantined(None).await.expect("list").is_empty());
    // Not quarantined (any more): nothing to restore.
    assert!(
        !s.restore_quarantined(&crate::support::lease_fence(s, "d.test").await, "d.test", rows[1].seq, 3)
            .await
            .expect("restore twice")
    );
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 1, 2, 3, 4]);
}

pub async fn requeue_quarantined_puts_all_back_in_order_at_the_end(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let remote = (0..6).map(|n| edu("d.test", n, 2)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    accepted(s, batch("t2", vec![], vec![edu("e.test", 9, 1)])).await;
    let rows = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    let e_rows = s.peek_outbox("e.test", 100, u64::MAX).await.expect("peek");
    // Quarantined out of order: 4, then 1, then 2; and e.test's one row.
    for index in [4, 1, 2] {
        s.quarantine_edu(&crate::support::lease_fence(s, "d.test").await, "d.test", rows[index].seq, "refused", NOW)
            .await
            .expect("quarantine");
    }
    s.quarantine_edu(&crate::support::lease_fence(s, "e.test").await, "e.test", e_rows[0].seq, "refused", NOW)
        .await
        .expect("quarantine");
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 3, 5]);
    assert_eq!(s.requeue_quarantined("d.test").await.expect("requeue"), 3);
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 3, 5, 1, 2, 4]);
    let after = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    assert!(after.iter().all(|e| e.refusals == 0 && e.message_count == 2));
    // Only that destination's EDUs moved.
    let left = s.list_quarantined(None).await.expect("list");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].destination, "e.test");
    assert_eq!(s.requeue_quarantined("d.test").await.expect("again"), 0);
    let statuses = s.destination_statuses().await.expect("statuses");
    let d = statuses
        .iter()
        .find(|r| r.destination == "d.test")
        .expect("row");
    assert_eq!((d.pending_edus, d.quarantined), (6, 0));
}
