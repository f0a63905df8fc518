//! Refusal history (SECURITY-REVIEW F6, F14) through the real sender, store
//! and fake peer on paused time: solo refusal counts and the narrowing of a
//! refused batch survive a restart; a peer that refuses everything gets
//! nothing quarantined, is shown refusing, backs off, and gets the whole
//! queue in order once it accepts again.

use crate::support::fake_remote;
use crate::support::outbound_env;
use crate::support::sender_env;

use std::time::Duration;

use fake_remote::{Received, Script};
use sender_env::{Harness, delivered, ids};

/// The real default schedule (2 s first delay, 600 s cap, 20 % jitter).
fn real_schedule(c: &mut outbound_env::TestConfig) {
    c.retry_initial_ms = 2_000;
    c.retry_max_ms = 600_000;
    c.retry_multiplier = 2.0;
    c.retry_jitter = 0.2;
    c.quarantine_after = 3;
}

/// Transactions refused with exactly one EDU, `m<n>`.
fn refused_alone(sends: &[Received], n: usize) -> usize {
    let id = format!("m{n}");
    sends
        .iter()
        .filter(|r| r.status == 400)
        .filter(|r| {
            let contents = r.edu_contents();
            contents.len() == 1 && contents[0]["message_id"] == id.as_str()
        })
        .count()
}

/// Waits until the store has counted `count` solo refusals of `m<n>` and
/// holds no transaction in flight (the fake records a refusal before the
/// sender has counted it).
async fn wait_counted(h: &Harness, n: usize, count: u32) {
    let id = format!("\"m{n}\"");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rows = h
            .store
            .peek_outbox(&h.dest(0), 100, u64::MAX)
            .await
            .expect("peek");
        let counted = rows
            .iter()
            .find(|e| e.edu_json.contains(&id))
            .map(|e| e.refusals);
        let in_flight = h.store.in_flight(&h.dest(0)).await.expect("in flight");
        if counted == Some(count) && in_flight.is_none() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "m{n}: {counted:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// F14: an EDU refused alone twice (quarantine_after = 3) before a restart
/// is quarantined at its next solo refusal after it, and the narrowed batch
/// size is resumed (the first transaction after the restart carries that
/// EDU alone, not the whole queue again).
#[tokio::test(start_paused = true)]
async fn solo_refusals_and_the_split_survive_a_restart() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(real_schedule).await;
    let host = Harness::hostname(0);
    h.fake.script(
        &host,
        Script {
            refuse_containing: vec!["POISON".to_owned()],
            ..Script::default()
        },
    );
    // [m0..m7] refused, [m0..m3] refused, [m0, m1] accepted (the peer takes
    // other EDUs), [m2, m3] refused, then m2 alone: refused, refused.
    h.enqueue(0, 0..8, &[2]).await;
    wait_counted(&h, 2, 2).await;
    h.restart().await;
    let before = h.fake.received_for(&host).len();
    assert_eq!(refused_alone(&h.fake.received_for(&host), 2), 2);

    h.wait_store_drained(Duration::from_secs(120)).await;
    let sends = h.fake.received_for(&host);
    let after_restart = &sends[before..];
    assert_eq!(
        after_restart[0].edu_contents().len(),
        1,
        "the narrowing resumed: m2 alone first"
    );
    assert_eq!(
        refused_alone(&sends, 2),
        3,
        "quarantined at the third solo refusal, counting the two before the restart"
    );
    assert_eq!(
        delivered(&sends, &host),
        ids((0..8).filter(|&i| i != 2)),
        "the rest in order"
    );
    let quarantined = h
        .store
        .list_quarantined(Some(&h.dest(0)))
        .await
        .expect("quarantine list");
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].edu_json.contains("\"m2\""));
    assert!(
        !quarantined[0].reason.contains("probation"),
        "quarantined for good: {}",
        quarantined[0].reason
    );
    let refusals = h.store.refusal_state(&h.dest(0)).await.expect("state");
    assert_eq!(refusals, courier::store::RefusalState::default());
    h.stop().await;
}

/// F14, the probation path: an EDU at the head of the queue, refused alone
/// twice with nothing accepted yet, then a restart: the third solo refusal
/// sets it aside and the EDUs behind it, once accepted, leave it
/// quarantined.
#[tokio::test(start_paused = true)]
async fn a_bad_head_edu_is_quarantined_once_the_edus_behind_it_are_accepted_across_a_restart() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(real_schedule).await;
    let host = Harness::hostname(0);
    h.fake.script(
        &host,
        Script {
            refuse_containing: vec!["POISON".to_owned()],
            ..Script::default()
        },
    );
    h.enqueue(0, 0..4, &[0]).await;
    wait_counted(&h, 0, 2).await;
    h.restart().await;
    h.wait_store_drained(Duration::from_secs(120)).await;
    let sends = h.fake.received_for(&host);
    assert_eq!(refused_alone(&sends, 0), 3);
    assert_eq!(delivered(&sends, &host), ids(1..4));
    let quarantined = h
        .store
        .list_quarantined(Some(&h.dest(0)))
        .await
        .expect("quarantine list");
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].edu_json.contains("\"m0\""));
    let state = h.store.refusal_state(&h.dest(0)).await.expect("state");
    assert!(state.probation_seqs.is_empty(), "confirmed: {state:?}");
    h.stop().await;
}

/// F6: a peer that answers 400 to everything. Over three minutes of
/// backoffs at most one EDU is ever set aside, none stays quarantined, the
/// destination is shown refusing and its attempts are spaced by the
/// backoff; once the peer accepts again all 20 EDUs arrive, in order.
#[tokio::test(start_paused = true)]
async fn a_peer_refusing_everything_gets_nothing_quarantined_then_everything_in_order() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(real_schedule).await;
    let host = Harness::hostname(0);
    let dest = h.dest(0);
    h.fake.script(
        &host,
        Script {
            refuse_containing: vec!["m.direct_to_device".to_owned()],
            ..Script::default()
        },
    );
    h.enqueue(0, 0..20, &[]).await;
    let start = tokio::time::Instant::now();
    let mut most_quarantined = 0;
    while start.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let quarantined = h
            .store
            .list_quarantined(Some(&dest))
            .await
            .expect("quarantine list")
            .len();
        most_quarantined = most_quarantined.max(quarantined);
    }
    assert!(
        most_quarantined <= 1,
        "{most_quarantined} EDUs quarantined at once"
    );
    let status = h
        .store
        .destination_statuses()
        .await
        .expect("statuses")
        .into_iter()
        .find(|s| s.destination == dest)
        .expect("a status row");
    assert!(
        status.refusing_since_ms.is_some(),
        "shown refusing: {status:?}"
    );
    assert_eq!((status.quarantined, status.pending_edus), (0, 20));
    assert!(
        status
            .retry
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("refusing")),
        "{status:?}"
    );
    let sends = h.fake.received_for(&host);
    assert!(sends.iter().all(|r| r.status == 400));
    // Once refusing, the whole head of the queue is resent on the backoff
    // schedule: never closer than the first delay (2 s).
    let whole: Vec<&Received> = sends
        .iter()
        .filter(|r| r.edu_contents().len() == 20)
        .skip(1)
        .collect();
    assert!(whole.len() >= 10, "{} whole-queue attempts", whole.len());
    for pair in whole.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= Duration::from_millis(1990),
            "attempts {:?} apart",
            pair[1].at - pair[0].at
        );
    }
    assert!(sends.len() <= 180 / 2 + 30, "{} attempts", sends.len());

    h.fake.script(&host, Script::default());
    h.wait_store_drained(Duration::from_secs(30)).await;
    let sends = h.fake.received_for(&host);
    assert_eq!(delivered(&sends, &host), ids(0..20), "all, in order");
    let status = h
        .store
        .destination_statuses()
        .await
        .expect("statuses")
        .into_iter()
        .find(|s| s.destination == dest)
        .expect("a status row");
    assert_eq!((status.refusing_since_ms, status.quarantined), (None, 0));
    h.stop().await;
}
