//! Retention (`Store::expire`, `store::retention`): inbox rows past their
//! event type's TTL (the most specific pattern decides, an unmatched type
//! is kept), rows beyond a device's inbox cap (oldest first), the queued,
//! in-flight and quarantined rows of a dead destination (a destination that
//! succeeded recently, or failed only recently, is untouched), each reason
//! bounded by the batch and counted in totals that survive a reopen.

use courier::store::pruner::{PrunePass, PruneSettings};
use courier::store::retention::{
    EventTypePattern, ExpiredInboxMessage, ExpiredMessage, ExpiryPolicy, ExpiryReason,
    ExpiryTotal, InboxTtl, OutboxEduId, OutboxHold,
};
use courier::store::{
    ClientTxnKey, ExpiryKind, NewInboxMessage, NewOutboxEdu, Retention, RetryState,
    SendBatch, Store,
};
use serde_json::json;

use super::{ALICE, BOB, Harness, NOW, SENDER, accepted, devices, in_flight_for, one};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn typed(user: &str, device: &str, event_type: &str, message_id: &str) -> NewInboxMessage {
    NewInboxMessage {
        user_id: user.to_owned(),
        device: one(device),
        message_id: message_id.to_owned(),
        sender: SENDER.to_owned(),
        event_type: event_type.to_owned(),
        content_json: json!({ "id": message_id }).to_string(),
    }
}

/// A send of `local` and `remote` accepted at `now_ms`.
fn send_at(
    txn_id: &str,
    now_ms: i64,
    local: Vec<NewInboxMessage>,
    remote: Vec<NewOutboxEdu>,
) -> SendBatch {
    SendBatch {
        txn: ClientTxnKey {
            user_id: SENDER.to_owned(),
            device_id: "SENDERDEV".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: txn_id.to_owned(),
        },
        local,
        remote,
        now_ms,
    }
}

fn rule(pattern: &str, ttl_ms: i64) -> InboxTtl {
    InboxTtl {
        pattern: EventTypePattern::parse(pattern).expect("valid pattern"),
        ttl_ms,
    }
}

fn ids(expired: &[ExpiredMessage]) -> Vec<String> {
    expired
        .iter()
        .map(|m| match m {
            ExpiredMessage::Inbox(m) => m.message_id.clone(),
            ExpiredMessage::Outbox(e) => e.id.to_string(),
        })
        .collect()
}

fn total(totals: &[ExpiryTotal], reason: ExpiryReason) -> u64 {
    totals
        .iter()
        .filter(|t| t.reason == reason)
        .map(|t| t.count)
        .sum()
}

async fn inbox_ids(store: &dyn Store, user: &str, device: &str) -> Vec<String> {
    store
        .fetch_inbox(user, device, 0, 10_000)
        .await
        .expect("fetch")
        .messages
        .into_iter()
        .map(|m| m.message_id)
        .collect()
}

pub async fn inbox_ttl_per_pattern_keeps_unmatched_types(harness: &Harness) {
    let s = &*harness.store;
    devices(s, ALICE, &["A"]).await;
    accepted(
        s,
        send_at(
            "t1",
            NOW,
            vec![
                typed(ALICE, "A", "m.room_key_request", "req"),
                typed(ALICE, "A", "m.key.verification.start", "start"),
                typed(ALICE, "A", "m.key.verification.done", "done"),
                typed(ALICE, "A", "m.room.encrypted", "olm"),
            ],
            vec![],
        ),
    )
    .await;
    let policy = ExpiryPolicy::new(
        vec![
            rule("m.room_key_request", 7 * DAY),
            rule("m.key.verification.*", DAY),
            // More specific than the wildcard: it decides for its type.
            rule("m.key.verification.done", 10 * DAY),
        ],
        None,
        None,
    );
    assert_eq!(
        s.expire(NOW + DAY - 1, &policy, 100).await.expect("expire"),
        vec![],
        "nothing has reached its TTL yet"
    );
    let expired = s.expire(NOW + DAY, &policy, 100).await.expect("expire");
    assert_eq!(
        expired,
        vec![ExpiredMessage::Inbox(ExpiredInboxMessage {
            reason: ExpiryReason::Ttl,
            stream_id: match &expired[0] {
                ExpiredMessage::Inbox(m) => m.stream_id,
                ExpiredMessage::Outbox(_) => -1,
            },
            message_id: "start".to_owned(),
            user_id: ALICE.to_owned(),
            device_id: "A".to_owned(),
            sender: SENDER.to_owned(),
            event_type: "m.key.verification.start".to_owned(),
            received_ts: NOW,
        })]
    );
    assert_eq!(inbox_ids(s, ALICE, "A").await, vec!["req", "done", "olm"]);
    // The trace journal says where it was and why it went, written in the
    // expiry's own transaction.
    let query = courier::store::trace::TraceQuery::Id("start".into());
    let records = s.trace_journal(&query).await.expect("trace");
    let report = courier::trace::assemble("start", &records, true);
    assert!(report.found);
    let ends = &report.messages[0].ends;
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0].kind, "expired");
    assert_eq!(ends[0].ts, NOW + DAY);
    assert_eq!(ends[0].reason.as_deref(), Some("ttl"));
    assert!(
        ends[0]
            .place
            .as_deref()
            .is_some_and(|p| p.starts_with(&format!("inbox of {ALICE} A"))),
        "{ends:?}"
    );
    let expired = s
        .expire(NOW + 7 * DAY + 1, &policy, 100)
        .await
        .expect("expire");
    assert_eq!(ids(&expired), vec!["req"]);
    let expired = s
        .expire(NOW + 10 * DAY + 1, &policy, 100)
        .await
        .expect("expire");
    assert_eq!(ids(&expired), vec!["done"]);
    // No pattern matches m.room.encrypted: kept however old.
    let expired = s
        .expire(NOW + 3650 * DAY, &policy, 100)
        .await
        .expect("expire");
    assert_eq!(expired, vec![]);
    assert_eq!(inbox_ids(s, ALICE, "A").await, vec!["olm"]);
    let totals = s.expiry_totals().await.expect("totals");
    assert_eq!(
        totals,
        vec![ExpiryTotal {
            kind: ExpiryKind::Inbox,
            reason: ExpiryReason::Ttl,
            count: 3
        }]
    );

    // Batches are bounded, and a pruning pass runs them until none is full.
    let many: Vec<NewInboxMessage> = (0..5)
        .map(|i| typed(ALICE, "A", "m.room_key_request", &format!("r{i}")))
        .collect();
    accepted(s, send_at("t2", NOW, many, vec![])).await;
    let later = NOW + 8 * DAY;
    let first = s.expire(later, &policy, 2).await.expect("expire");
    assert_eq!(ids(&first), vec!["r0", "r1"]);
    let settings = PruneSettings {
        batch: 2,
        interval: std::time::Duration::from_secs(60),
        retention: Retention::DEFAULT,
    };
    let mut pass = PrunePass::new(s, later, settings).with_expiry(&policy);
    pass.finish(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("pass");
    assert_eq!(pass.expired(ExpiryReason::Ttl), 3);
    assert_eq!(inbox_ids(s, ALICE, "A").await, vec!["olm"]);
    let totals = s.expiry_totals().await.expect("totals");
    assert_eq!(total(&totals, ExpiryReason::Ttl), 8);
}

pub async fn inbox_cap_drops_the_oldest_beyond_it(harness: &Harness) {
    let s = &*harness.store;
    devices(s, ALICE, &["A"]).await;
    devices(s, BOB, &["B"]).await;
    let mut local: Vec<NewInboxMessage> = (1..=5)
        .map(|i| typed(ALICE, "A", "m.room.encrypted", &format!("a{i}")))
        .collect();
    local.extend((1..=2).map(|i| typed(BOB, "B", "m.room.encrypted", &format!("b{i}"))));
    accepted(s, send_at("t1", NOW, local, vec![])).await;
    let policy = ExpiryPolicy::new(vec![], Some(3), None);
    let first = s.expire(NOW, &policy, 1).await.expect("expire");
    assert_eq!(ids(&first), vec!["a1"]);
    assert_eq!(first[0].reason(), ExpiryReason::InboxCap);
    let second = s.expire(NOW, &policy, 100).await.expect("expire");
    assert_eq!(ids(&second), vec!["a2"]);
    assert_eq!(s.expire(NOW, &policy, 100).await.expect("expire"), vec![]);
    // The newest three stay; a device under the cap is untouched.
    assert_eq!(inbox_ids(s, ALICE, "A").await, vec!["a3", "a4", "a5"]);
    assert_eq!(inbox_ids(s, BOB, "B").await, vec!["b1", "b2"]);
    let totals = s.expiry_totals().await.expect("totals");
    assert_eq!(total(&totals, ExpiryReason::InboxCap), 2);
    assert_eq!(total(&totals, ExpiryReason::Ttl), 0);
}

fn to_device(destination: &str, message_id: &str) -> NewOutboxEdu {
    NewOutboxEdu {
        destination: destination.to_owned(),
        edu_json: json!({
            "edu_type": "m.direct_to_device",
            "content": { "message_id": message_id, "sender": SENDER, "type": "m.test", "messages": {} }
        })
        .to_string(),
        message_count: 1,
    }
}

fn failing(failures: u32) -> RetryState {
    RetryState {
        failures,
        retry_after_ms: 0,
        last_success_ms: None,
        last_error: Some("connection refused".to_owned()),
    }
}

pub async fn dead_destinations_lose_queued_in_flight_and_quarantined_rows(harness: &Harness) {
    let s = &*harness.store;
    // `set_retry_state` stamps the wall clock: the failing-since time.
    let t0 = courier::clock::now_ms();
    let dead = "dead.test";
    let young = "young.test";
    let revived = "revived.test";
    let mut remote = Vec::new();
    for i in 1..=4 {
        remote.push(to_device(dead, &format!("dead{i}")));
    }
    for d in [young, revived] {
        remote.push(to_device(d, &format!("{d}-1")));
    }
    accepted(s, send_at("t1", t0, vec![], remote)).await;
    let seqs: Vec<i64> = s
        .peek_outbox(dead, 100, u64::MAX)
        .await
        .expect("peek")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs.len(), 4);
    // Two rows in flight, one quarantined, one queued.
    s.begin_txn(&crate::support::lease_fence(s, dead).await, in_flight_for(dead, "txn-dead", seqs[..2].to_vec()))
        .await
        .expect("begin");
    s.quarantine_edu(&crate::support::lease_fence(s, dead).await, dead, seqs[2], "refused", t0)
        .await
        .expect("quarantine");
    for d in [dead, young, revived] {
        s.set_retry_state(&crate::support::lease_fence(s, d).await, d, &failing(1)).await.expect("failing");
    }
    // A backoff reset (the peer talked to us) is no success: dead keeps
    // failing since its first failure.
    s.set_retry_state(&crate::support::lease_fence(s, dead).await, dead, &failing(0)).await.expect("reset");
    s.set_retry_state(&crate::support::lease_fence(s, dead).await, dead, &failing(2)).await.expect("failing");
    // revived: delivered just before the deadline, then queued more.
    let revived_seq = s.peek_outbox(revived, 10, u64::MAX).await.expect("peek")[0].seq;
    s.begin_txn(&crate::support::lease_fence(s, revived).await, in_flight_for(revived, "txn-rev", vec![revived_seq]))
        .await
        .expect("begin");
    s.ack_txn(&crate::support::lease_fence(s, revived).await, revived, "txn-rev", t0 + 30 * DAY - HOUR)
        .await
        .expect("ack");
    accepted(
        s,
        send_at(
            "t2",
            t0 + 30 * DAY - HOUR,
            vec![],
            vec![to_device(revived, "revived-2")],
        ),
    )
    .await;

    let policy = ExpiryPolicy::new(vec![], None, Some(30 * DAY));
    let now = t0 + 30 * DAY + HOUR;
    // young: evaluated at a time it has failed only for a day.
    assert_eq!(
        s.expire(t0 + DAY, &policy, 100).await.expect("expire"),
        vec![]
    );
    let expired = s.expire(now, &policy, 100).await.expect("expire");
    let mut seen: Vec<(String, String, OutboxHold)> = expired
        .iter()
        .map(|m| match m {
            ExpiredMessage::Outbox(e) => {
                assert_eq!(e.edu_type, "m.direct_to_device");
                assert!(e.failing_since_ts >= t0 && e.failing_since_ts < t0 + DAY);
                (e.destination.clone(), e.id.to_string(), e.held)
            }
            ExpiredMessage::Inbox(_) => panic!("no inbox rule is on: {m:?}"),
        })
        .collect();
    seen.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        seen,
        vec![
            (dead.to_owned(), "dead1".to_owned(), OutboxHold::InFlight),
            (dead.to_owned(), "dead2".to_owned(), OutboxHold::InFlight),
            (dead.to_owned(), "dead3".to_owned(), OutboxHold::Quarantined),
            (dead.to_owned(), "dead4".to_owned(), OutboxHold::Queued),
            (
                young.to_owned(),
                "young.test-1".to_owned(),
                OutboxHold::Queued
            ),
        ]
    );
    assert!(
        expired.iter().all(|m| matches!(m, ExpiredMessage::Outbox(e)
            if matches!(e.id, OutboxEduId::ToDevice { .. })))
    );
    assert_eq!(s.in_flight(dead).await.expect("in flight"), None);
    assert_eq!(s.peek_outbox(dead, 100, u64::MAX).await.expect("peek"), vec![]);
    assert_eq!(
        s.list_quarantined(Some(dead)).await.expect("quarantine"),
        vec![]
    );
    assert!(
        !s.destinations_with_pending()
            .await
            .expect("pending")
            .contains(&dead.to_owned())
    );
    // Succeeded an hour before the deadline: untouched.
    assert_eq!(
        s.peek_outbox(revived, 10, u64::MAX)
            .await
            .expect("peek")
            .len(),
        1
    );
    assert_eq!(s.expire(now, &policy, 100).await.expect("expire"), vec![]);
    let totals = s.expiry_totals().await.expect("totals");
    assert_eq!(
        totals,
        vec![ExpiryTotal {
            kind: ExpiryKind::Outbox,
            reason: ExpiryReason::DeadDestination,
            count: 5
        }]
    );
}

pub async fn dead_destination_expiry_is_bounded_by_batch(harness: &Harness) {
    let s = &*harness.store;
    let t0 = courier::clock::now_ms();
    let dead = "dead.test";
    let remote: Vec<NewOutboxEdu> = (1..=5)
        .map(|i| to_device(dead, &format!("m{i}")))
        .collect();
    accepted(s, send_at("t1", t0, vec![], remote)).await;
    let seqs: Vec<i64> = s
        .peek_outbox(dead, 100, u64::MAX)
        .await
        .expect("peek")
        .iter()
        .map(|e| e.seq)
        .collect();
    s.begin_txn(&crate::support::lease_fence(s, dead).await, in_flight_for(dead, "txn", seqs.clone()))
        .await
        .expect("begin");
    s.set_retry_state(&crate::support::lease_fence(s, dead).await, dead, &failing(3)).await.expect("failing");
    let policy = ExpiryPolicy::new(vec![], None, Some(DAY));
    let now = t0 + 2 * DAY;
    let mut batches = Vec::new();
    for _ in 0..4 {
        batches.push(ids(&s.expire(now, &policy, 2).await.expect("expire")));
        // The record goes with the first of its rows: never one naming
        // rows that are gone.
        assert_eq!(s.in_flight(dead).await.expect("in flight"), None);
    }
    assert_eq!(
        batches,
        vec![
            vec!["m1".to_owned(), "m2".to_owned()],
            vec!["m3".to_owned(), "m4".to_owned()],
            vec!["m5".to_owned()],
            vec![],
        ]
    );
    assert_eq!(s.in_flight(dead).await.expect("in flight"), None);
    let totals = s.expiry_totals().await.expect("totals");
    assert_eq!(total(&totals, ExpiryReason::DeadDestination), 5);
}

pub async fn expiry_totals_survive_reopen(harness: &Harness) {
    let store = harness.store.clone();
    devices(&*store, ALICE, &["A"]).await;
    let local: Vec<NewInboxMessage> = (1..=3)
        .map(|i| typed(ALICE, "A", "m.room_key_request", &format!("r{i}")))
        .collect();
    accepted(&*store, send_at("t1", NOW, local, vec![])).await;
    let policy = ExpiryPolicy::new(vec![rule("*", HOUR)], Some(100), None);
    let expired = store
        .expire(NOW + 2 * HOUR, &policy, 2)
        .await
        .expect("expire");
    assert_eq!(expired.len(), 2);
    store.close().await.expect("close");
    drop(store);

    let store = (harness.reopen)().await;
    let totals = store.expiry_totals().await.expect("totals");
    assert_eq!(total(&totals, ExpiryReason::Ttl), 2);
    let expired = store
        .expire(NOW + 2 * HOUR, &policy, 2)
        .await
        .expect("expire");
    assert_eq!(ids(&expired), vec!["r3"]);
    let totals = store.expiry_totals().await.expect("totals");
    assert_eq!(total(&totals, ExpiryReason::Ttl), 3);
    assert_eq!(total(&totals, ExpiryReason::InboxCap), 0);
}
