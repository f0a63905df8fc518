//! Per-destination retry state round trip and the destination statuses the
//! RPC reports.

use std::collections::BTreeMap;

use courier::store::RetryState;

use super::{Harness, NOW, edu, batch, accepted};

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
    s.set_retry_state(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        &state,
    )
    .await
    .expect("set");
    assert_eq!(s.retry_state("d.test").await.expect("retry"), state);
    let state2 = RetryState {
        failures: 0,
        retry_after_ms: 0,
        last_success_ms: Some(NOW),
        last_error: None,
    };
    s.set_retry_state(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        &state2,
    )
    .await
    .expect("set");
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
    s.set_retry_state(
        &crate::support::lease_fence(s, "b.test").await,
        "b.test",
        &failing,
    )
    .await
    .expect("set");
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
