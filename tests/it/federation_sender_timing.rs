//! The sender's timing on paused tokio time, with the real default
//! schedule: a peer back from an outage of up to 5 minutes is reached within
//! 5 s, never tried more often than every 2 s;
//! after long outages the wait never exceeds the cap; `PeerIsUp` sends at
//! once; `Retry-After` is honoured; idle tasks retire and come back. A
//! throttled ticker keeps virtual time from leaping over real socket waits.

use crate::support::counting_store;
use crate::support::fake_remote;
use crate::support::outbound_env;
use crate::support::sender_env;

use std::sync::Arc;
use std::time::Duration;

use fake_remote::Script;
use sender_env::{Harness, delivered, ids};
use tokio::time::Instant;

/// The real default schedule on paused time, for a peer that does not send
/// to us (no `PeerIsUp`, as Synapse): after an outage of `outage` it is
/// reached within 5 s of its return, and no two attempts are closer than the
/// 2 s first delay. Returns the attempts.
async fn reached_within_5s_after(outage: Duration) -> Vec<fake_remote::Received> {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| {
        c.retry_initial_ms = 2_000;
        c.retry_max_ms = 600_000;
        c.retry_multiplier = 2.0;
        c.retry_jitter = 0.2;
    })
    .await;
    let start = Instant::now();
    let back = start + outage;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            down_until: Some(back),
            ..Script::default()
        },
    );
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(3600), |r| r
                .iter()
                .any(|x| x.status == 200))
            .await
    );
    let sends = h.fake.received_for(&Harness::hostname(0));
    let ok = sends.iter().find(|r| r.status == 200).expect("delivered");
    let late = ok.at.saturating_duration_since(back);
    assert!(
        late <= Duration::from_secs(5),
        "{outage:?} outage: reached {late:?} after its return"
    );
    for pair in sends.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(1990),
            "{outage:?} outage: attempts {gap:?} apart"
        );
        // Within the quick phase no gap is longer than the 4 s ceiling plus
        // the ticker steps an attempt costs: the throttled ticker moves
        // paused time on while a loaded machine runs the attempt, so allow
        // up to the 5 s the promise is about.
        assert!(
            gap <= Duration::from_millis(5_000),
            "{outage:?} outage: a gap of {gap:?}"
        );
    }
    h.stop().await;
    sends
}

#[tokio::test(start_paused = true)]
async fn a_peer_back_after_7s_is_reached_within_5s() {
    let sends = reached_within_5s_after(Duration::from_secs(7)).await;
    assert!(sends.len() >= 3, "tried during the outage: {}", sends.len());
}

#[tokio::test(start_paused = true)]
async fn a_peer_back_after_60s_is_reached_within_5s() {
    let sends = reached_within_5s_after(Duration::from_secs(60)).await;
    assert!(
        sends.len() >= 15,
        "tried during the outage: {}",
        sends.len()
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_back_after_4_min_50_s_is_reached_within_5s() {
    let sends = reached_within_5s_after(Duration::from_secs(290)).await;
    // At most one attempt every 2 s, at least one every 4 s.
    assert!(
        (70..=146).contains(&sends.len()),
        "attempts during the outage: {}",
        sends.len()
    );
}

/// After a long outage the wait is bounded by the cap.
#[tokio::test(start_paused = true)]
async fn after_a_long_outage_the_wait_never_exceeds_the_cap() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(20));
    let mut h = Harness::new(|c| {
        c.retry_initial_ms = 2_000;
        c.retry_max_ms = 600_000;
        c.retry_jitter = 0.2;
    })
    .await;
    let back = Instant::now() + Duration::from_secs(3600);
    h.fake.script(
        &Harness::hostname(0),
        Script {
            down_until: Some(back),
            ..Script::default()
        },
    );
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(2 * 3600), |r| r
                .iter()
                .any(|x| x.status == 200))
            .await
    );
    let sends = h.fake.received_for(&Harness::hostname(0));
    let gaps: Vec<u64> = sends
        .windows(2)
        .map(|p| (p[1].at - p[0].at).as_secs())
        .collect();
    // An attempt's real socket waits still cost a little virtual time (in
    // 20 ms ticker steps, more on a loaded machine), hence the margin; the
    // exact schedule is unit-tested in federation::sender::backoff.
    let bound = 600 + 20;
    assert!(
        gaps.iter().all(|&g| g <= bound),
        "gap over the cap: {gaps:?}"
    );
    assert!(
        gaps.iter().filter(|&&g| g >= 480).count() >= 3,
        "the schedule reaches the cap: {gaps:?}"
    );
    // The documented growth (README, "Retry schedule"): at most 4 s apart
    // for the first 5 minutes, then doubling from there up to the cap.
    // (The first gap is left out: with this test's coarser 20 ms ticker the
    // first connection's real socket waits cost visible virtual time; the
    // short-outage tests above check every gap with a 10 ms ticker.)
    let t0 = sends[0].at;
    let first_long = sends
        .windows(2)
        .skip(1)
        .find(|p| p[1].at - p[0].at > Duration::from_millis(4_200))
        .map(|p| p[0].at - t0)
        .expect("the delays grow");
    assert!(
        first_long >= Duration::from_secs(300),
        "the quick phase ended after {first_long:?}: {gaps:?}"
    );
    assert!(
        gaps.iter().filter(|&&g| g > 5 && g < 480).count() >= 5,
        "the delays double towards the cap: {gaps:?}"
    );
    let ok = sends.iter().find(|r| r.status == 200).expect("delivered");
    assert!(ok.at.saturating_duration_since(back) <= Duration::from_secs(bound));
    h.stop().await;
}

/// `PeerIsUp` (an authenticated inbound request, or the wake RPC) resets the
/// backoff and sends at once.
#[tokio::test(start_paused = true)]
async fn peer_is_up_resets_the_backoff_and_sends_at_once() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| {
        c.retry_initial_ms = 2_000;
        c.retry_max_ms = 600_000;
    })
    .await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            fail_next: u32::MAX,
            ..Script::default()
        },
    );
    h.enqueue(0, 0..2, &[]).await;
    // Ten minutes down: the schedule has grown well past a minute.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let retry = h.store.retry_state(&h.dest(0)).await.expect("retry state");
    let scheduled_in = retry.retry_after_ms - courier::clock::now_ms();
    assert!(retry.failures > 5, "{retry:?}");
    h.fake.script(&Harness::hostname(0), Script::default());
    let asked = Instant::now();
    h.handle.peer_is_up(&h.dest(0));
    assert!(
        h.fake
            .wait_for(Duration::from_secs(3600), |r| r
                .iter()
                .any(|x| x.status == 200))
            .await
    );
    let sends = h.fake.received_for(&Harness::hostname(0));
    let ok = sends.iter().find(|r| r.status == 200).expect("delivered");
    let took = ok.at - asked;
    assert!(
        took < Duration::from_secs(3),
        "sent {took:?} after PeerIsUp; the schedule said {scheduled_in} ms (wall)"
    );
    h.wait_store_drained(Duration::from_secs(60)).await;
    let retry = h.store.retry_state(&h.dest(0)).await.expect("retry state");
    assert_eq!((retry.failures, retry.retry_after_ms), (0, 0));
    h.stop().await;
}

/// 429 with Retry-After: the same transaction again, not before the time.
#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| c.retry_max_ms = 600_000).await;
    h.fake.script(
        &Harness::hostname(0),
        Script {
            rate_limit_next: Some(7),
            ..Script::default()
        },
    );
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(600), |r| r
                .iter()
                .any(|x| x.status == 200))
            .await
    );
    let sends = h.fake.received_for(&Harness::hostname(0));
    assert_eq!(
        sends.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert_eq!(sends[0].txn_id, sends[1].txn_id);
    let gap = sends[1].at - sends[0].at;
    assert!(
        gap >= Duration::from_secs(7) && gap < Duration::from_secs(15),
        "{gap:?}"
    );
    h.stop().await;
}

/// Idle destination tasks end (no unbounded growth), and a destination
/// woken after its task ended gets a new one that delivers.
#[tokio::test(start_paused = true)]
async fn idle_tasks_retire_and_come_back_on_the_next_wake() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|_| {}).await;
    h.enqueue(0, 0..2, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(60), |r| delivered(r, "d0.fed.test")
                .len()
                == 2)
            .await
    );
    // Well past the idle exit: the task has retired.
    tokio::time::sleep(courier::federation::sender::destination::IDLE_EXIT * 3).await;
    h.enqueue(0, 2..4, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(60), |r| delivered(r, "d0.fed.test")
                .len()
                == 4)
            .await,
        "a new task picks the destination up"
    );
    assert_eq!(delivered(&h.fake.received(), "d0.fed.test"), ids(0..4));
    assert_eq!(h.fake.overlaps(), 0);
    h.stop().await;
}

/// F3: a destination whose discovery never answers fails at the discovery
/// deadline and backs off on its own persisted schedule (the failure
/// recorded like any other), while another destination is served at once.
#[tokio::test(start_paused = true)]
async fn an_unresolvable_destination_backs_off_alone_on_its_schedule() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| {
        c.discovery_timeout_ms = 10_000;
        c.retry_initial_ms = 2_000;
        c.retry_max_ms = 600_000;
        c.retry_jitter = 0.0;
    })
    .await;
    let hung = h.hanging_dest(0);
    h.enqueue_to(&hung, 0..1, &[]).await;
    let start = Instant::now();
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(5), |r| delivered(r, "d0.fed.test")
                .len()
                == 1)
            .await,
        "the healthy destination is not held up"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    // Two discovery deadlines and the backoff between them.
    let deadline = start + Duration::from_secs(120);
    let retry = loop {
        let retry = h.store.retry_state(&hung).await.expect("retry state");
        if retry.failures >= 2 || Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(retry.failures >= 2, "{retry:?}");
    let error = retry.last_error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    assert!(
        start.elapsed() >= Duration::from_secs(20),
        "each attempt waited its whole deadline: {:?}",
        start.elapsed()
    );
    assert!(h.fake.received_for("h0.hang.test").is_empty());
    h.stop().await;
}

/// F17: a persisted retry time far in the future (a clock that ran ahead,
/// then was set back) delays a restarted task by at most `retry.max`.
#[tokio::test(start_paused = true)]
async fn a_restarted_task_waits_at_most_the_cap_whatever_was_persisted() {
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| {
        c.retry_initial_ms = 2_000;
        c.retry_max_ms = 60_000;
    })
    .await;
    let dest = h.dest(0);
    let thirty_days_ms = 30 * 24 * 3600 * 1000;
    h.store
        .set_retry_state(
            &crate::support::lease_fence(&*h.store, &dest).await,
            &dest,
            &courier::store::RetryState {
                failures: 3,
                retry_after_ms: courier::clock::now_ms() + thirty_days_ms,
                last_success_ms: None,
                last_error: Some("before the clock jumped back".to_owned()),
            },
        )
        .await
        .expect("persist a far retry time");
    h.restart().await;
    let start = Instant::now();
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(600), |r| delivered(r, "d0.fed.test")
                .len()
                == 1)
            .await,
        "delivered after the cap, not after 30 days"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(55) && waited <= Duration::from_secs(75),
        "{waited:?}"
    );
    h.stop().await;
}

/// F18: wakes that pile up while a transaction is in flight are answered
/// by one look at the outbox, not one each. (Paused time: the final sleep
/// passes only once every queued signal has been served.)
#[tokio::test(start_paused = true)]
async fn wakes_queued_during_a_send_cost_one_outbox_read() {
    const WAKES: usize = 50;
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|_| {}).await;
    h.stop().await;
    let counting = Arc::new(counting_store::CountingStore::new(h.store.clone()));
    h.store = counting.clone();
    h.start_sender();
    h.fake.script(
        &Harness::hostname(0),
        Script {
            respond_after: Some(Duration::from_secs(2)),
            ..Script::default()
        },
    );
    h.enqueue(0, 0..1, &[]).await;
    assert!(
        h.fake
            .wait_for(Duration::from_secs(10), |r| !r.is_empty())
            .await
    );
    let dest = h.dest(0);
    for _ in 0..WAKES {
        h.handle.wake(&dest);
    }
    h.wait_store_drained(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let peeks = counting.peeks();
    // One read for the row, one finding the outbox empty after the ack,
    // one for all the queued wakes; one per wake would be over 50.
    assert!(peeks <= 4, "{peeks} outbox reads for {WAKES} queued wakes");
    assert_eq!(delivered(&h.fake.received(), "d0.fed.test"), ids(0..1));
    h.stop().await;
}
