//! Message tracing end to end (issue 18): a message sent between two real
//! relays traced on both (accepted → EDU → transaction → acknowledged on
//! the sender; received → inbox → delivered by `/sync` on the receiver),
//! through the RPC and `courier trace`; a message the fake remote refuses
//! twice before taking it (each attempt with its outcome); a poison EDU
//! quarantined (where and why); and an unknown id ("no record of …",
//! exit code 1).

use std::time::Duration;

use courier::cli::{Cli, Command};
use courier::store::trace::TraceQuery;
use courier::tools::rpc_client::RpcClient;
use courier::trace::{TraceReport, assemble, render_text};
use serde_json::json;

use crate::support::TestRelay;
use crate::support::fake_remote::Script;
use crate::support::sender_env::{Harness, delivered};

fn rpc(relay: &TestRelay) -> RpcClient {
    RpcClient::new(&relay.rpc_url, &relay.rpc_secret).expect("rpc client")
}

async fn trace_of(relay: &TestRelay, target: &str) -> TraceReport {
    rpc(relay)
        .trace(target, None)
        .await
        .expect("trace call")
        .unwrap_or_else(|| panic!("{} has no record of {target}", relay.server_name))
}

/// The inbox position of a `since` token (`td_<inbox>` or `td_<inbox>_<n>`).
fn inbox_position(token: &str) -> i64 {
    token
        .strip_prefix("td_")
        .and_then(|rest| rest.split('_').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected since token {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_traced_on_both_relays() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = format!("@alice:{}", a.server_name);
    let bob = format!("@bob:{}", b.server_name);
    a.register_device(&alice, "ADEV", "tok-alice").await;
    b.register_device(&bob, "BDEV", "tok-bob").await;
    let r = a
        .send_to_device(
            "tok-alice",
            "m.room_key",
            "client-txn-1",
            json!({ &bob: { "BDEV": { "k": 1 } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (events, since) = b
        .sync_until("tok-bob", None, 1, Duration::from_secs(30))
        .await;
    assert_eq!(events.len(), 1);
    let since = since.expect("next_batch");
    // The next `/sync` acknowledges the message.
    let ack = b.sync("tok-bob", Some(&since), 0).await;
    assert_eq!(ack.status, 200);

    // The sender's side, by the client's txnId. B may hand the message to
    // its client before A has read B's 200 and acknowledged the
    // transaction: wait (bounded) until A's journal has the ack.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let sent = loop {
        let sent = trace_of(&a, "client-txn-1").await;
        let acked = sent
            .messages
            .first()
            .and_then(|m| m.edus.first())
            .is_some_and(|e| e.acknowledged);
        if acked || std::time::Instant::now() > deadline {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sent.messages.len(), 1);
    let m = &sent.messages[0];
    let send = m.accepted.as_ref().expect("accepted from a client send");
    assert_eq!(send.user_id, alice);
    assert_eq!(send.device_id, "ADEV");
    assert_eq!(send.event_type, "m.room_key");
    assert_eq!(send.txn_id, "client-txn-1");
    assert_eq!(m.edus.len(), 1);
    let edu = &m.edus[0];
    assert_eq!(edu.destination, b.server_name);
    assert!(edu.acknowledged, "{sent:?}");
    assert!(!edu.still_queued);
    let txn = edu.transactions.last().expect("a transaction");
    assert_eq!(txn.direction, "outbound");
    assert_eq!(txn.peer, b.server_name);
    assert_eq!(
        txn.attempts.last().map(|a| a.outcome.as_str()),
        Some("ok"),
        "{sent:?}"
    );
    let text = render_text(&sent);
    assert!(
        text.contains(&format!("message {}", m.message_id)),
        "{text}"
    );
    assert!(text.contains("txnId client-txn-1"), "{text}");
    assert!(text.contains("acknowledged by the peer"), "{text}");

    // The receiver's side, by the message_id and by the federation txn id.
    let got = trace_of(&b, &m.message_id).await;
    let r = &got.messages[0];
    assert_eq!(r.received.len(), 1);
    assert_eq!(r.received[0].origin, a.server_name);
    assert_eq!(r.received[0].txn_id, txn.txn_id);
    assert_eq!(r.received[0].outcome, "applied");
    assert_eq!(r.received[0].sender.as_deref(), Some(alice.as_str()));
    assert_eq!(r.inboxes.len(), 1);
    let inbox = &r.inboxes[0];
    assert_eq!(
        (inbox.user_id.as_str(), inbox.device_id.as_str()),
        (bob.as_str(), "BDEV")
    );
    assert_eq!(inbox.state, "delivered");
    assert_eq!(inbox.since, Some(inbox_position(&since)));
    assert_eq!(inbox.stream_id, inbox_position(&since));
    let by_txn = trace_of(&b, &txn.txn_id).await;
    assert_eq!(by_txn.messages[0].message_id, m.message_id);
    assert_eq!(by_txn.transactions[0].direction, "inbound");
    // The recipient's recent messages.
    let by_user = rpc(&b)
        .trace(&bob, Some("BDEV"))
        .await
        .expect("trace call")
        .expect("found");
    assert_eq!(by_user.messages[0].message_id, m.message_id);

    // An unknown id: the RPC says 404 "no record of …", the CLI exits 1.
    assert_eq!(rpc(&a).trace("no-such-id", None).await.expect("call"), None);
    let cli = Cli {
        log_json: false,
        command: Command::Trace {
            rpc: a.rpc_url.clone(),
            secret: a.rpc_secret.clone(),
            target: "no-such-id".to_owned(),
            device: None,
            json: false,
        },
    };
    match courier::cli::run(cli).await {
        Ok(()) => panic!("an unknown id must fail"),
        Err(failure) => {
            assert_eq!(failure.exit_code, 1);
            assert_eq!(failure.error.to_string(), "no record of no-such-id");
        }
    }
}

async fn trace_in_store(h: &Harness, id: &str) -> TraceReport {
    let records = h
        .store
        .trace_journal(&TraceQuery::Id(id.to_owned()))
        .await
        .expect("trace");
    assemble(id, &records, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_message_shows_each_attempt() {
    let mut h = Harness::new(|_| {}).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            fail_next: 2,
            ..Script::default()
        },
    );
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| !delivered(r, "d0.fed.test")
                .is_empty())
            .await,
        "delivered after two failures"
    );
    h.wait_store_drained(Duration::from_secs(10)).await;
    let report = trace_in_store(&h, "m0").await;
    let edu = &report.messages[0].edus[0];
    assert_eq!(edu.destination, h.dest(0));
    assert!(edu.acknowledged);
    assert_eq!(edu.transactions.len(), 1, "one txnId, resent: {report:?}");
    let attempts = &edu.transactions[0].attempts;
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["retry", "retry", "ok"], "{report:?}");
    for failed in &attempts[..2] {
        let reason = failed.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("500"),
            "the reason names the status: {reason}"
        );
    }
    assert!(attempts.windows(2).all(|w| w[0].ts <= w[1].ts));
    // Each attempt went out under that txnId.
    let sends = h.fake.received_for(&Harness::hostname(0));
    assert_eq!(sends.len(), 3);
    assert!(sends.iter().all(|s| s.txn_id == edu.transactions[0].txn_id));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_message_shows_where_and_why() {
    let mut h = Harness::new(|c| c.quarantine_after = 2).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            refuse_containing: vec!["POISON".to_owned()],
            ..Script::default()
        },
    );
    h.enqueue(0, 0..3, &[1]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| delivered(r, "d0.fed.test")
                .len()
                >= 2)
            .await,
        "the others arrive"
    );
    h.wait_store_drained(Duration::from_secs(10)).await;
    let report = trace_in_store(&h, "m1").await;
    let m = &report.messages[0];
    let end = m.ends.first().expect("an end");
    assert_eq!(end.kind, "quarantined");
    assert_eq!(end.place.as_deref(), Some(h.dest(0).as_str()));
    assert_eq!(end.seq, Some(m.edus[0].seq));
    let reason = end.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("refused 2 times alone, last with 400"),
        "{reason}"
    );
    assert!(!m.edus[0].acknowledged);
    let refused = m.edus[0]
        .transactions
        .iter()
        .flat_map(|t| &t.attempts)
        .filter(|a| a.outcome == "refused")
        .count();
    // The batch of three, its halves, then twice alone.
    assert!(refused >= 3, "{report:?}");
    assert!(render_text(&report).contains("quarantined"));
    // Its neighbour was delivered.
    assert!(trace_in_store(&h, "m0").await.messages[0].edus[0].acknowledged);
    h.stop().await;
}
