//! The outbox and its transactions: peek limits, begin and ack of the in-
//! flight transaction, refusal counts, and quarantine and release of refused
//! EDUs.

use courier::store::{NextTxn, OutboxEdu, RetryState};

use super::{Harness, NOW, edu, batch, accepted, queued_ns, in_flight_for};

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

pub async fn begin_ack_txn(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let remote = (0..5).map(|n| edu("d.test", n, 1)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    accepted(s, batch("t2", vec![], vec![edu("e.test", 9, 1)])).await;
    s.set_retry_state(
        &crate::support::lease_fence(s, "d.test").await,
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
    s.begin_txn(
        &crate::support::lease_fence(s, &txn.destination).await,
        txn.clone(),
    )
    .await
    .expect("begin");
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(txn.clone())
    );
    // A second transaction for the same destination is refused...
    assert!(
        s.begin_txn(
            &crate::support::lease_fence(s, "d.test").await,
            in_flight_for("d.test", "tx-2", vec![])
        )
        .await
        .is_err()
    );
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(txn.clone())
    );
    // ...but other destinations are independent.
    s.begin_txn(
        &crate::support::lease_fence(s, "e.test").await,
        in_flight_for("e.test", "tx-e", vec![]),
    )
    .await
    .expect("begin other");
    // An ack of another txn id changes nothing.
    s.ack_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-unknown",
        NOW,
    )
    .await
    .expect("ack other");
    assert_eq!(queued_ns(s, "d.test").await, vec![0, 1, 2, 3, 4]);
    s.ack_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-1",
        NOW + 10,
    )
    .await
    .expect("ack");
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
    s.ack_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-1",
        NOW + 20,
    )
    .await
    .expect("ack twice");
    assert_eq!(queued_ns(s, "d.test").await, vec![3, 4]);
    assert_eq!(s.retry_state("d.test").await.expect("retry"), expected);
    // A new transaction can begin now.
    let rest = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    s.begin_txn(
        &crate::support::lease_fence(s, "d.test").await,
        in_flight_for("d.test", "tx-3", rest.iter().map(|e| e.seq).collect()),
    )
    .await
    .expect("begin next");
    assert_eq!(
        s.destinations_with_pending().await.expect("pending"),
        vec!["d.test", "e.test"]
    );
    s.ack_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-3",
        NOW + 30,
    )
    .await
    .expect("ack");
    assert_eq!(queued_ns(s, "d.test").await, Vec::<u64>::new());
    // e.test still has a queued row and an in-flight record.
    assert_eq!(
        s.destinations_with_pending().await.expect("pending"),
        vec!["e.test"]
    );
    s.ack_txn(
        &crate::support::lease_fence(s, "e.test").await,
        "e.test",
        "tx-e",
        NOW,
    )
    .await
    .expect("ack e");
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
    s.begin_txn(
        &crate::support::lease_fence(s, "d.test").await,
        in_flight_for("d.test", "tx-1", first_two.clone()),
    )
    .await
    .expect("begin");
    s.refuse_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-1",
    )
    .await
    .expect("refuse");
    assert_eq!(s.in_flight("d.test").await.expect("in flight"), None);
    s.begin_txn(
        &crate::support::lease_fence(s, "d.test").await,
        in_flight_for("d.test", "tx-2", first_two[..1].to_vec()),
    )
    .await
    .expect("begin");
    s.refuse_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-2",
    )
    .await
    .expect("refuse");
    // Refusing an unknown txn changes nothing.
    s.refuse_txn(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        "tx-2",
    )
    .await
    .expect("refuse again");
    let after = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    // Only the refusal of the EDU alone counts (`OutboxEdu::refusals`).
    let refusals: Vec<u32> = after.iter().map(|e| e.refusals).collect();
    assert_eq!(refusals, vec![1, 0, 0, 0]);
    assert_eq!(s.edu_refusals("d.test", rows[0].seq).await.expect("count"), Some(1));
    assert_eq!(s.edu_refusals("d.test", rows[1].seq).await.expect("count"), Some(0));
    assert_eq!(s.edu_refusals("d.test", 999_999).await.expect("count"), None);
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
    s.quarantine_edu(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        rows[0].seq,
        "refused 3 times",
        NOW + 1,
    )
    .await
    .expect("quarantine");
    // Quarantining a row that does not exist is a no-op.
    s.quarantine_edu(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        999_999,
        "nope",
        NOW,
    )
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
    s.quarantine_edu(
        &crate::support::lease_fence(s, "d.test").await,
        "d.test",
        after[0].seq,
        "bad",
        NOW,
    )
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
    s.quarantine_edu(
        &crate::support::lease_fence(s, "q.test").await,
        "q.test",
        q_rows[0].seq,
        "bad",
        NOW,
    )
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

/// A `NextTxn` whose body lists the rows' EDUs, as the sender's does.
fn next_txn(txn_id: &str, max_edus: u32) -> NextTxn {
    NextTxn::around(txn_id, max_edus, u64::MAX, "{\"edus\":[", "]}")
}

/// The body `next_txn` makes of `rows`.
fn body_of(rows: &[OutboxEdu]) -> String {
    let parts: Vec<&str> = rows.iter().map(|e| e.edu_json.as_str()).collect();
    format!("{{\"edus\":[{}]}}", parts.join(","))
}

/// `advance` records a transaction by naming its rows; reading it back,
/// also from a reopened store, gives the same bytes, which the ack then
/// settles as usual.
pub async fn a_recorded_transaction_reads_back_byte_for_byte(harness: &Harness) {
    let store = harness.store.clone();
    let fence = crate::support::lease_fence(&*store, "d.test").await;
    let remote = (0..4).map(|n| edu("d.test", n, 1)).collect();
    accepted(&*store, batch("t", vec![], remote)).await;
    let rows = store.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");
    let recorded = store
        .advance(&fence, "d.test", None, next_txn("tx-r", 3))
        .await
        .expect("advance")
        .expect("recorded");
    assert_eq!(recorded.body, body_of(&rows[..3]));
    assert_eq!(
        store.in_flight("d.test").await.expect("in flight"),
        Some(recorded.clone())
    );
    store.close().await.expect("close");
    drop(store);

    let store = (harness.reopen)().await;
    assert_eq!(
        store.in_flight("d.test").await.expect("in flight after reopen"),
        Some(recorded.clone()),
        "the same txnId and bytes after a restart"
    );
    let fence = crate::support::lease_fence(&*store, "d.test").await;
    let next = store
        .advance(&fence, "d.test", Some(("tx-r", NOW)), next_txn("tx-s", 3))
        .await
        .expect("advance")
        .expect("the last row is recorded");
    assert_eq!(next.body, body_of(&rows[3..]));
    assert_eq!(queued_ns(&*store, "d.test").await, vec![3]);
}

pub async fn advance_acks_and_records_the_next_in_one_step(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    let fence = crate::support::lease_fence(s, "d.test").await;
    // Nothing queued: nothing recorded.
    assert_eq!(
        s.advance(&fence, "d.test", None, next_txn("tx-0", 3))
            .await
            .expect("advance on an empty queue"),
        None
    );
    assert_eq!(s.in_flight("d.test").await.expect("in flight"), None);

    let remote = (0..5).map(|n| edu("d.test", n, 1)).collect();
    accepted(s, batch("t", vec![], remote)).await;
    accepted(s, batch("t2", vec![], vec![edu("e.test", 9, 1)])).await;
    let failing = RetryState {
        failures: 3,
        retry_after_ms: NOW + 60_000,
        last_success_ms: None,
        last_error: Some("connection refused".to_owned()),
    };
    s.set_retry_state(&fence, "d.test", &failing)
        .await
        .expect("set retry");
    let rows = s.peek_outbox("d.test", 100, u64::MAX).await.expect("peek");

    // The first step records the oldest three rows, with build's body.
    let first = s
        .advance(&fence, "d.test", None, next_txn("tx-1", 3))
        .await
        .expect("advance")
        .expect("a transaction is recorded");
    let head = rows[..3].to_vec();
    assert_eq!(first.txn_id, "tx-1");
    assert_eq!(first.seqs, head.iter().map(|e| e.seq).collect::<Vec<_>>());
    assert_eq!(first.body, body_of(&head));
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(first.clone())
    );
    // Not acknowledged yet: the retry state stands.
    assert_eq!(s.retry_state("d.test").await.expect("retry"), failing);

    // Acking it and recording the rest is one step.
    let second = s
        .advance(&fence, "d.test", Some(("tx-1", NOW + 10)), next_txn("tx-2", 3))
        .await
        .expect("advance")
        .expect("the rest is recorded");
    assert_eq!(second.txn_id, "tx-2");
    assert_eq!(
        second.seqs,
        rows[3..].iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    assert_eq!(queued_ns(s, "d.test").await, vec![3, 4]);
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(second.clone())
    );
    let succeeded = RetryState {
        failures: 0,
        retry_after_ms: 0,
        last_success_ms: Some(NOW + 10),
        last_error: None,
    };
    assert_eq!(s.retry_state("d.test").await.expect("retry"), succeeded);

    // A stale ack while another transaction is recorded: the step fails
    // and changes nothing.
    assert!(
        s.advance(&fence, "d.test", Some(("tx-1", NOW + 20)), next_txn("tx-3", 3))
            .await
            .is_err()
    );
    assert_eq!(
        s.in_flight("d.test").await.expect("in flight"),
        Some(second.clone())
    );
    assert_eq!(queued_ns(s, "d.test").await, vec![3, 4]);
    assert_eq!(s.retry_state("d.test").await.expect("retry"), succeeded);

    // The last ack empties the queue and records nothing.
    assert_eq!(
        s.advance(&fence, "d.test", Some(("tx-2", NOW + 30)), next_txn("tx-4", 3))
            .await
            .expect("advance"),
        None
    );
    assert_eq!(queued_ns(s, "d.test").await, Vec::<u64>::new());
    assert_eq!(s.in_flight("d.test").await.expect("in flight"), None);
    assert_eq!(
        s.retry_state("d.test")
            .await
            .expect("retry")
            .last_success_ms,
        Some(NOW + 30)
    );
    // Other destinations are untouched.
    assert_eq!(queued_ns(s, "e.test").await, vec![9]);
    assert_eq!(s.in_flight("e.test").await.expect("in flight"), None);
}
