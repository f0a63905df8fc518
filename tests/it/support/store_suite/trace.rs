//! The trace journal (issue 18): rows written in the transactions of the
//! events they record — a remote message through its EDU, transaction,
//! attempts and ack; an inbound message through its inbox rows and the
//! `/sync` that acknowledged them (and a dedupe); a local send; a
//! quarantined EDU; the journal turned off; pruning by age — read back with
//! `Store::trace_journal` and assembled by `courier::trace::assemble`.

use courier::store::trace::TraceQuery;
use courier::store::{NewOutboxEdu, RetryState, Store};
use courier::trace::{TraceReport, assemble};

use super::{
    ALICE, BOB, Harness, NOW, SENDER, accepted, batch, devices, in_flight_for, inbound,
    inbound_edu, msg, one,
};

/// A to-device EDU as `todevice::pack` writes it (canonical, `message_id`
/// first).
fn packed_edu(destination: &str, message_id: &str) -> NewOutboxEdu {
    NewOutboxEdu {
        destination: destination.to_owned(),
        edu_json: format!(
            "{{\"content\":{{\"message_id\":\"{message_id}\",\"messages\":{{}},\"sender\":\"{SENDER}\",\"type\":\"m.test\"}},\"edu_type\":\"m.direct_to_device\"}}"
        ),
        message_count: 1,
    }
}

async fn trace(store: &dyn Store, query: TraceQuery) -> TraceReport {
    let described = match &query {
        TraceQuery::MessageId(q) | TraceQuery::TxnId(q) | TraceQuery::Id(q) => q.clone(),
        TraceQuery::User { user_id, .. } => user_id.clone(),
    };
    let txn_query = !matches!(query, TraceQuery::User { .. });
    let records = store.trace_journal(&query).await.expect("trace");
    assemble(&described, &records, txn_query)
}

pub async fn trace_follows_a_remote_message_through_attempts_and_ack(harness: &Harness) {
    let s = &*harness.store;
    accepted(s, batch("client-1", vec![], vec![packed_edu("d.test", "MID1")])).await;
    let rows = s.peek_outbox("d.test", 10, u64::MAX).await.expect("peek");
    let seq = rows[0].seq;
    s.begin_txn(&crate::support::lease_fence(s, "d.test").await, in_flight_for("d.test", "fed-1", vec![seq]))
        .await
        .expect("begin");
    // A failed attempt (the failure count grows), then one the peer asked
    // to wait for (it does not), then the 200.
    let failing = RetryState {
        failures: 1,
        retry_after_ms: NOW + 1000,
        last_success_ms: None,
        last_error: Some("connection refused".to_owned()),
    };
    s.set_retry_state(&crate::support::lease_fence(s, "d.test").await, "d.test", &failing).await.expect("retry");
    let waiting = RetryState {
        last_error: Some("429 rate limited".to_owned()),
        retry_after_ms: NOW + 2000,
        ..failing
    };
    s.set_retry_state(&crate::support::lease_fence(s, "d.test").await, "d.test", &waiting).await.expect("retry");
    s.ack_txn(&crate::support::lease_fence(s, "d.test").await, "d.test", "fed-1", NOW + 3000).await.expect("ack");

    let report = trace(s, TraceQuery::MessageId("MID1".into())).await;
    assert!(report.found);
    assert_eq!(report.messages.len(), 1);
    let m = &report.messages[0];
    assert_eq!(m.message_id, "MID1");
    let send = m.accepted.as_ref().expect("accepted from a client send");
    assert_eq!(send.user_id, SENDER);
    assert_eq!(send.device_id, "SENDERDEV");
    assert_eq!(send.event_type, "m.test");
    assert_eq!(send.txn_id, "client-1");
    assert_eq!(send.ts, NOW);
    assert_eq!(m.edus.len(), 1);
    let edu = &m.edus[0];
    assert_eq!((edu.destination.as_str(), edu.seq), ("d.test", seq));
    assert!(edu.acknowledged);
    assert!(!edu.still_queued);
    assert_eq!(edu.transactions.len(), 1);
    let txn = &edu.transactions[0];
    assert_eq!(txn.txn_id, "fed-1");
    assert_eq!(txn.edus, Some(1));
    let outcomes: Vec<(&str, Option<&str>)> = txn
        .attempts
        .iter()
        .map(|a| (a.outcome.as_str(), a.reason.as_deref()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("retry", Some("connection refused")),
            ("rate_limited", Some("429 rate limited")),
            ("ok", None),
        ]
    );
    assert_eq!(txn.attempts[2].ts, NOW + 3000);

    // The federation txn id and the client's txnId find the same message.
    for id in ["fed-1", "client-1"] {
        let by_txn = trace(s, TraceQuery::Id(id.into())).await;
        assert_eq!(by_txn.messages.len(), 1, "{id}");
        assert_eq!(by_txn.messages[0], *m, "{id}");
    }
    assert_eq!(
        trace(s, TraceQuery::Id("fed-1".into())).await.transactions,
        vec![txn.clone()]
    );
    // The sender's recent messages include it.
    let by_user = trace(
        s,
        TraceQuery::User {
            user_id: SENDER.into(),
            device_id: None,
        },
    )
    .await;
    assert_eq!(by_user.messages.len(), 1);
    assert_eq!(by_user.messages[0].message_id, "MID1");

    let unknown = trace(s, TraceQuery::Id("no-such-id".into())).await;
    assert!(!unknown.found);
    assert!(unknown.messages.is_empty());
}

pub async fn trace_follows_an_inbound_message_to_the_sync_that_acked_it(harness: &Harness) {
    let s = &*harness.store;
    devices(s, ALICE, &["A", "B"]).await;
    let mut m = msg(ALICE, one("A"), 1);
    m.message_id = "IN1".into();
    let mut m_b = msg(ALICE, one("B"), 2);
    m_b.message_id = "IN1".into();
    s.apply_inbound_txn(inbound(
        "remote.test",
        "in-txn-1",
        vec![inbound_edu("IN1", vec![m, m_b])],
    ))
    .await
    .expect("apply");
    let report = trace(s, TraceQuery::MessageId("IN1".into())).await;
    let t = &report.messages[0];
    assert_eq!(t.received.len(), 1);
    assert_eq!(t.received[0].origin, "remote.test");
    assert_eq!(t.received[0].txn_id, "in-txn-1");
    assert_eq!(t.received[0].outcome, "applied");
    assert_eq!(t.received[0].rows, Some(2));
    assert_eq!(t.received[0].sender.as_deref(), Some(SENDER));
    let states: Vec<(&str, &str)> = t
        .inboxes
        .iter()
        .map(|i| (i.device_id.as_str(), i.state.as_str()))
        .collect();
    assert_eq!(states, vec![("A", "pending"), ("B", "pending")]);
    let stream_a = t.inboxes[0].stream_id;

    // Device A reads, then acknowledges with the next `since`.
    let page = s.fetch_inbox(ALICE, "A", 0, 100).await.expect("read");
    assert_eq!(page.messages[0].stream_id, stream_a);
    s.fetch_inbox(ALICE, "A", page.next_batch, 100)
        .await
        .expect("ack");
    // The same message again from the origin, in a new transaction: deduped.
    s.apply_inbound_txn(inbound(
        "remote.test",
        "in-txn-2",
        vec![inbound_edu("IN1", vec![msg(ALICE, one("A"), 3)])],
    ))
    .await
    .expect("apply again");

    let report = trace(s, TraceQuery::MessageId("IN1".into())).await;
    let t = &report.messages[0];
    let received: Vec<(&str, &str)> = t
        .received
        .iter()
        .map(|r| (r.txn_id.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        received,
        vec![("in-txn-1", "applied"), ("in-txn-2", "deduped")]
    );
    assert_eq!(t.inboxes.len(), 2);
    let a = &t.inboxes[0];
    assert_eq!(
        (a.device_id.as_str(), a.stream_id, a.state.as_str()),
        ("A", stream_a, "delivered")
    );
    assert_eq!(a.since, Some(page.next_batch));
    assert!(a.delivered_ts.is_some());
    assert_eq!(
        (t.inboxes[1].device_id.as_str(), t.inboxes[1].state.as_str()),
        ("B", "pending")
    );
    // The inbound txn id finds it; so does the recipient's device.
    let by_txn = trace(s, TraceQuery::Id("in-txn-1".into())).await;
    assert_eq!(by_txn.messages[0].message_id, "IN1");
    assert_eq!(by_txn.transactions.len(), 1);
    assert_eq!(by_txn.transactions[0].direction, "inbound");
    assert_eq!(by_txn.transactions[0].peer, "remote.test");
    let by_device = trace(
        s,
        TraceQuery::User {
            user_id: ALICE.into(),
            device_id: Some("A".into()),
        },
    )
    .await;
    assert_eq!(by_device.messages.len(), 1);
    assert_eq!(by_device.messages[0].message_id, "IN1");
}

pub async fn trace_shows_local_sends_and_quarantined_edus(harness: &Harness) {
    let s = &*harness.store;
    devices(s, BOB, &["B1"]).await;
    let mut local = msg(BOB, one("B1"), 1);
    local.message_id = "LOCAL1".into();
    let mut lost = msg(BOB, one("NOPE"), 2);
    lost.message_id = "LOCAL1".into();
    accepted(
        s,
        batch("client-2", vec![local, lost], vec![packed_edu("q.test", "REM1")]),
    )
    .await;
    let report = trace(s, TraceQuery::MessageId("LOCAL1".into())).await;
    let t = &report.messages[0];
    let send = t.accepted.as_ref().expect("accepted");
    assert_eq!(send.txn_id, "client-2");
    // One row: the unregistered device got none.
    assert_eq!(send.local_rows, Some(1));
    assert_eq!(t.inboxes.len(), 1);
    assert_eq!(
        (t.inboxes[0].user_id.as_str(), t.inboxes[0].device_id.as_str()),
        (BOB, "B1")
    );

    let seq = s.peek_outbox("q.test", 10, u64::MAX).await.expect("peek")[0].seq;
    s.begin_txn(&crate::support::lease_fence(s, "q.test").await, in_flight_for("q.test", "fed-q", vec![seq]))
        .await
        .expect("begin");
    s.refuse_txn(&crate::support::lease_fence(s, "q.test").await, "q.test", "fed-q").await.expect("refuse");
    s.quarantine_edu(&crate::support::lease_fence(s, "q.test").await, "q.test", seq, "refused 3 times alone, last with 400", NOW + 5)
        .await
        .expect("quarantine");
    let report = trace(s, TraceQuery::MessageId("REM1".into())).await;
    let t = &report.messages[0];
    assert_eq!(t.edus[0].transactions[0].attempts[0].outcome, "refused");
    assert!(!t.edus[0].acknowledged);
    assert!(!t.edus[0].still_queued);
    assert_eq!(t.ends.len(), 1);
    let end = &t.ends[0];
    assert_eq!(end.kind, "quarantined");
    assert_eq!(end.ts, NOW + 5);
    assert_eq!(end.place.as_deref(), Some("q.test"));
    assert_eq!(end.seq, Some(seq));
    assert_eq!(
        end.reason.as_deref(),
        Some("refused 3 times alone, last with 400")
    );
}

pub async fn trace_journal_off_writes_nothing_and_prune_ages_it_out(harness: &Harness) {
    let s = &*harness.store;
    s.set_trace_journal(false).await.expect("off");
    accepted(s, batch("off-1", vec![], vec![packed_edu("d.test", "OFF1")])).await;
    assert!(!trace(s, TraceQuery::MessageId("OFF1".into())).await.found);
    s.set_trace_journal(true).await.expect("on");
    accepted(s, batch("on-1", vec![], vec![packed_edu("d.test", "ON1")])).await;
    assert!(trace(s, TraceQuery::MessageId("ON1".into())).await.found);
    // Kept within the retention, deleted past it, in bounded batches.
    let retention = courier::store::Retention::DEFAULT;
    let kept = s.prune(NOW + 1000, retention, 100).await.expect("prune");
    assert_eq!(kept.trace_events, 0);
    let later = NOW + retention.trace_ms + 1;
    let pruned = s.prune(later, retention, 100).await.expect("prune");
    assert_eq!(pruned.trace_events, 1);
    assert!(!trace(s, TraceQuery::MessageId("ON1".into())).await.found);
}
