//! The per-destination sender end to end, in real time with a fast retry
//! policy, waiting for events: order, one transaction in flight, the
//! 100-EDU limit, retries with the same txnId and bytes, restart, poison
//! quarantine, and no head-of-line blocking over 1,000 destinations. (The
//! timing tests on paused time are in `federation_sender_timing.rs`.)

use crate::support::fake_remote;
use crate::support::outbound_env;
use crate::support::sender_env;

use std::time::Duration;

use fake_remote::{Received, Script};
use sender_env::{Harness, delivered, ids};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_is_kept_one_transaction_in_flight_at_most_100_edus() {
    let mut h = Harness::new(|_| {}).await;
    h.fake.script_default(Script {
        respond_after: Some(Duration::from_millis(15)),
        ..Script::default()
    });
    // Three destinations, 250 EDUs each, queued in chunks while sending.
    for chunk in 0..5 {
        for n in 0..3 {
            h.enqueue(n, chunk * 50..(chunk + 1) * 50, &[]).await;
        }
    }
    let all = h
        .fake
        .wait_for(Duration::from_secs(60), |r| {
            (0..3).all(|n| delivered(r, &Harness::hostname(n)).len() >= 250)
        })
        .await;
    assert!(all, "every EDU arrives");
    let received = h.fake.received();
    for n in 0..3 {
        let hostname = Harness::hostname(n);
        assert_eq!(
            delivered(&received, &hostname),
            ids(0..250),
            "order for {hostname}"
        );
        let sends: Vec<&Received> = received
            .iter()
            .filter(|r| fake_remote::hostname_of(&r.host) == hostname)
            .collect();
        assert!(
            sends.len() >= 3,
            "250 EDUs need at least three transactions"
        );
        let mut txn_ids: Vec<&str> = sends.iter().map(|r| r.txn_id.as_str()).collect();
        txn_ids.dedup();
        assert_eq!(txn_ids.len(), sends.len(), "a new txnId per transaction");
        for send in &sends {
            let body = send.json();
            assert!(body["edus"].as_array().map_or(0, Vec::len) <= 100);
            assert_eq!(body["origin"], "origin.test");
            assert_eq!(body["pdus"], serde_json::json!([]));
            assert!(body["origin_server_ts"].is_i64());
            assert_eq!(send.content_type.as_deref(), Some("application/json"));
            let auth = send.authorization.as_deref().unwrap_or_default();
            assert!(auth.starts_with("X-Matrix "), "{auth}");
            // The signature covers exactly this request and body.
            let header = courier::xmatrix::XMatrix::parse(auth).expect("valid X-Matrix");
            let uri = format!("/_matrix/federation/v1/send/{}", send.txn_id);
            let dest = h.dest(n);
            courier::xmatrix::verify_request(
                &header,
                &courier::xmatrix::RequestToSign {
                    method: "PUT",
                    uri: &uri,
                    origin: "origin.test",
                    destination: &dest,
                    content: Some(&body),
                },
                &outbound_env::test_signing_key().verifying_key(),
            )
            .expect("the X-Matrix signature verifies");
            assert!(auth.contains("origin=\"origin.test\""), "{auth}");
            assert!(
                auth.contains(&format!("destination=\"{}\"", h.dest(n))),
                "{auth}"
            );
            assert!(
                send.txn_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
            );
        }
    }
    assert_eq!(
        h.fake.overlaps(),
        0,
        "one transaction in flight per destination"
    );
    h.wait_store_drained(Duration::from_secs(10)).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_failing_three_times_gets_the_same_transaction_until_it_answers_200() {
    let mut h = Harness::new(|_| {}).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            fail_next: 3,
            ..Script::default()
        },
    );
    h.enqueue(0, 0..5, &[]).await;
    let done = h
        .fake
        .wait_for(Duration::from_secs(30), |r| {
            r.iter().any(|x| x.status == 200)
        })
        .await;
    assert!(done, "delivered after the failures");
    let sends = h.fake.received_for(&Harness::hostname(0));
    let statuses: Vec<u16> = sends.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 500, 500, 200]);
    assert!(
        sends.iter().all(|r| r.txn_id == sends[0].txn_id),
        "same txnId"
    );
    assert!(sends.iter().all(|r| r.body == sends[0].body), "same bytes");
    assert_eq!(
        delivered(&sends, &Harness::hostname(0)),
        ids(0..5),
        "delivered once"
    );
    h.wait_store_drained(Duration::from_secs(10)).await;
    let retry = h.store.retry_state(&h.dest(0)).await.expect("retry state");
    assert_eq!(retry.failures, 0, "success resets the backoff");

    // The next batch is a new transaction.
    h.enqueue(0, 5..6, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| delivered(r, "d0.fed.test")
                .len()
                == 6)
            .await
    );
    let sends = h.fake.received_for(&Harness::hostname(0));
    assert_ne!(sends[4].txn_id, sends[0].txn_id);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_rows_survive_a_restart_and_go_out_without_a_nudge() {
    let mut h = Harness::new(|_| {}).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            fail_next: u32::MAX,
            ..Script::default()
        },
    );
    h.enqueue(0, 0..3, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| r.len() >= 2)
            .await,
        "the peer is tried while down"
    );
    // Shut down while the peer is down, then bring the peer back.
    h.stop().await;
    let before = h.fake.received_for(&Harness::hostname(0));
    h.fake.script(&Harness::hostname(0), Script::default());
    let retry = h.store.retry_state(&h.dest(0)).await.expect("retry state");
    // (The last failure may not be recorded if shutdown interrupted it.)
    assert!(retry.failures >= 1, "failures persisted: {retry:?}");
    assert!(retry.last_error.is_some());

    // A new sender over the reopened store; nobody calls wake.
    h.restart().await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| r
                .iter()
                .any(|x| x.status == 200))
            .await,
        "delivered after the restart without a nudge"
    );
    let after = h.fake.received_for(&Harness::hostname(0));
    let ok = after.iter().find(|r| r.status == 200).expect("a 200");
    assert_eq!(
        ok.txn_id, before[0].txn_id,
        "the recorded transaction is resent"
    );
    assert_eq!(ok.body, before[0].body, "byte for byte");
    assert_eq!(delivered(&after, "d0.fed.test"), ids(0..3));
    h.wait_store_drained(Duration::from_secs(10)).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_edu_is_quarantined_and_the_rest_still_arrive() {
    let mut h = Harness::new(|c| c.quarantine_after = 2).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            refuse_containing: vec!["POISON".to_owned()],
            ..Script::default()
        },
    );
    h.enqueue(0, 0..40, &[17]).await;
    let expected: Vec<String> = ids((0..40).filter(|&i| i != 17));
    assert!(
        h.fake
            .wait_for(Duration::from_secs(60), |r| delivered(r, "d0.fed.test")
                .len()
                >= 39)
            .await,
        "everything but the poison arrives"
    );
    let sends = h.fake.received_for(&Harness::hostname(0));
    assert_eq!(delivered(&sends, "d0.fed.test"), expected, "in order");
    assert!(
        sends
            .iter()
            .all(|r| r.status != 200 || !r.body.contains("POISON")),
        "the poison was never accepted"
    );
    let alone = sends
        .iter()
        .filter(|r| r.status == 400 && r.edu_contents().len() == 1)
        .count();
    assert_eq!(alone, 2, "refused alone quarantine_after times");
    assert!(sends.iter().all(|r| r.edu_contents().len() <= 100));
    h.wait_store_drained(Duration::from_secs(10)).await;
    let quarantined = h
        .store
        .list_quarantined(Some(&h.dest(0)))
        .await
        .expect("quarantine list");
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].edu_json.contains("POISON"));
    assert!(quarantined[0].edu_json.contains("\"m17\""));
    let statuses = h.store.destination_statuses().await.expect("statuses");
    let status = statuses
        .iter()
        .find(|s| s.destination == h.dest(0))
        .expect("status row");
    assert_eq!((status.pending_edus, status.quarantined), (0, 1));

    // Queued after the quarantine: still flows.
    h.enqueue(0, 40..42, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| delivered(r, "d0.fed.test")
                .len()
                == 41)
            .await
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_destinations_and_one_hanging_peer() {
    const COUNT: usize = 1000;
    let mut h = Harness::new(|_| {}).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            hang: true,
            ..Script::default()
        },
    );
    // The hanging destination gets its work first.
    for n in 0..COUNT {
        h.enqueue(n, n..n + 1, &[]).await;
    }
    let started = std::time::Instant::now();
    let all = h
        .fake
        .wait_for(Duration::from_secs(180), |r| {
            r.iter().filter(|x| x.status == 200).count() >= COUNT - 1
        })
        .await;
    assert!(all, "the other destinations finish");
    let received = h.fake.received();
    for n in 1..COUNT {
        assert_eq!(delivered(&received, &Harness::hostname(n)), ids(n..n + 1));
    }
    let hanging = h.fake.received_for(&Harness::hostname(0));
    assert_eq!(
        hanging.len(),
        1,
        "the hanging peer holds its one transaction"
    );
    assert_eq!(hanging[0].status, 0, "and is still hanging");
    assert_eq!(h.fake.overlaps(), 0);
    let pending = h.store.destinations_with_pending().await.expect("pending");
    assert!(pending.contains(&h.dest(0)));
    eprintln!(
        "{} destinations delivered in {:?}",
        COUNT - 1,
        started.elapsed()
    );
    h.stop().await;
}

/// F3: 300 destinations whose discovery hangs (their DNS never answers)
/// hold no send permit while they wait, so a healthy destination queued
/// after all of them is delivered at once, long before their 30 s
/// discovery deadline. (More hung destinations than there are permits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_destinations_with_hanging_discovery_and_one_healthy() {
    const HUNG: usize = 300;
    const _: () = assert!(HUNG > courier::federation::sender::MAX_CONCURRENT_SENDS);
    let mut h = Harness::new(|c| c.discovery_timeout_ms = 30_000).await;
    for n in 0..HUNG {
        let dest = h.hanging_dest(n);
        h.enqueue_to(&dest, n..n + 1, &[]).await;
    }
    let started = std::time::Instant::now();
    h.enqueue(0, 0..3, &[]).await;
    let delivered_in_time = h
        .fake
        .wait_for(Duration::from_secs(5), |r| {
            delivered(r, &Harness::hostname(0)).len() == 3
        })
        .await;
    assert!(
        delivered_in_time,
        "the healthy destination is served within 5 s, not after the hung ones' deadline"
    );
    eprintln!(
        "healthy destination delivered after {:?}",
        started.elapsed()
    );
    assert_eq!(delivered(&h.fake.received(), "d0.fed.test"), ids(0..3));
    // Its rows are acked; the hung destinations never reached anything and
    // still hold theirs.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let pending = loop {
        let pending = h.store.destinations_with_pending().await.expect("pending");
        if !pending.contains(&h.dest(0)) || std::time::Instant::now() > deadline {
            break pending;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(pending.len(), HUNG);
    assert!(pending.iter().all(|d| d.contains(".hang.test:")));
    assert!(
        h.fake
            .received()
            .iter()
            .all(|r| !r.host.contains("hang.test"))
    );
    h.stop().await;
}

/// F16: a peer that answers `200` to `/send` with an empty or HTML body
/// applied the transaction: its rows are acked and nothing is resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_with_a_body_that_is_not_json_counts_as_delivered() {
    let mut h = Harness::new(|_| {}).await;
    for (n, body) in ["", "<html><body>OK</body></html>"].into_iter().enumerate() {
        h.fake.script(
            &Harness::hostname(n),
            Script {
                ok_body: Some(body.to_owned()),
                ..Script::default()
            },
        );
        h.enqueue(n, 0..2, &[]).await;
    }
    h.wait_store_drained(Duration::from_secs(20)).await;
    for n in 0..2 {
        let sends = h.fake.received_for(&Harness::hostname(n));
        assert_eq!(sends.len(), 1, "sent once, never resent: {sends:?}");
        assert_eq!(sends[0].status, 200);
        let retry = h.store.retry_state(&h.dest(n)).await.expect("retry state");
        assert_eq!(retry.failures, 0);
    }
    h.stop().await;
}

/// F21: a recorded transaction with no EDUs (only a corrupt store has one)
/// that the peer refuses is dropped without a panic, and the rows queued
/// behind it still go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recorded_transaction_without_edus_does_not_stop_the_destination() {
    let mut h = Harness::new(|_| {}).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            refuse_containing: vec!["CORRUPT".to_owned()],
            ..Script::default()
        },
    );
    let dest = h.dest(0);
    h.store
        .begin_txn(&crate::support::lease_fence(&*h.store, &dest).await, courier::store::InFlightTxn {
            destination: dest.clone(),
            txn_id: "corrupt-1".to_owned(),
            seqs: vec![],
            body: r#"{"edus":[{"content":{"marker":"CORRUPT"},"edu_type":"m.x"}],"origin":"origin.test","origin_server_ts":1,"pdus":[]}"#.to_owned(),
        })
        .await
        .expect("record a transaction of no EDUs");
    h.enqueue(0, 0..3, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(20), |r| delivered(r, "d0.fed.test")
                .len()
                == 3)
            .await,
        "the queued rows are delivered after the refused empty transaction"
    );
    let sends = h.fake.received_for("d0.fed.test");
    assert_eq!(sends[0].txn_id, "corrupt-1");
    assert_eq!(sends[0].status, 400);
    assert_eq!(delivered(&sends, "d0.fed.test"), ids(0..3));
    h.wait_store_drained(Duration::from_secs(10)).await;
    h.stop().await;
}

/// A peer answering 401 about our signing key is recorded as that, not as
/// an outage, and gets the queue once it accepts the key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_rejecting_our_signing_key_is_named_in_last_error() {
    let mut h = Harness::new(|_| {}).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            reject_signing_key: true,
            ..Script::default()
        },
    );
    h.enqueue(0, 0..3, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(30), |r| r
                .iter()
                .any(|x| x.status == 401))
            .await,
        "the peer was asked"
    );
    // The failure is persisted after the answer; poll the store for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let last_error = loop {
        let retry = h.store.retry_state(&h.dest(0)).await.expect("retry state");
        if let Some(error) = retry.last_error {
            break error;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no last_error recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        last_error.starts_with("peer rejects our signing key"),
        "{last_error}"
    );
    let statuses = h.store.destination_statuses().await.expect("statuses");
    let status = statuses
        .iter()
        .find(|s| s.destination == h.dest(0))
        .expect("a status row");
    assert!(
        format!("{status:?}").contains("peer rejects our signing key"),
        "{status:?}"
    );
    h.fake.script(&Harness::hostname(0), Script::default());
    h.handle.peer_is_up(&h.dest(0));
    assert!(
        h.fake
            .wait_for(Duration::from_secs(60), |r| delivered(r, "d0.fed.test")
                .len()
                >= 3)
            .await,
        "delivered once the key is accepted"
    );
    h.stop().await;
}
