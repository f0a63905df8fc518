//! The sender's per-destination gauges on `/metrics` (rendered from the
//! process's recorder, as the RPC listener does): a destination's series
//! is there while it has rows queued and goes away once it has none,
//! instead of staying forever. The test runs alone in a child process of
//! this binary (`support::child`), because the recorder is process-wide
//! (every relay of the `it` binary shares it) and is installed here, first
//! in its process, with a short gauge idle timeout.

use crate::support::child;
use crate::support::fake_remote;
use crate::support::outbound_env;
use crate::support::sender_env;

use std::time::Duration;

use courier::metrics::MetricsHandle;
use fake_remote::Script;
use sender_env::{Harness, delivered};
use tokio::time::Instant;

/// Whether the rendered text has a `name` series for `destination`.
fn has_series(text: &str, name: &str, destination: &str) -> bool {
    let label = format!("destination=\"{destination}\"");
    text.lines()
        .any(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label))
}

/// The value of the series `name` for `destination`, if present.
fn series_value(text: &str, name: &str, destination: &str) -> Option<f64> {
    let label = format!("destination=\"{destination}\"");
    text.lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Set in the child process that runs the test alone.
const CHILD_ENV: &str = "IT_SENDER_METRICS_CHILD";

#[test]
fn per_destination_series_retire_when_nothing_is_queued() {
    if std::env::var_os(CHILD_ENV).is_none() {
        child::run_alone(
            module_path!(),
            "per_destination_series_retire_when_nothing_is_queued",
            CHILD_ENV,
            Duration::from_secs(600),
        );
        return;
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("paused runtime")
        .block_on(series_retire_when_nothing_is_queued());
}

/// The test proper, first to install the recorder in its process.
async fn series_retire_when_nothing_is_queued() {
    // Real (not tokio) time: the exporter's idle clock.
    let metrics = MetricsHandle::install_with_gauge_idle_timeout(Duration::from_secs(1));
    let _ticker = outbound_env::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| {
        c.retry_initial_ms = 1_000;
        c.retry_max_ms = 10_000;
    })
    .await;
    let start = Instant::now();
    // d0 is down for 45 s, d1 for good.
    h.fake.script(
        &Harness::hostname(0),
        Script {
            down_until: Some(start + Duration::from_secs(45)),
            ..Script::default()
        },
    );
    h.fake.script(
        &Harness::hostname(1),
        Script {
            down_until: Some(start + Duration::from_secs(24 * 3600)),
            ..Script::default()
        },
    );
    h.enqueue(0, 0..2, &[]).await;
    h.enqueue(1, 0..1, &[]).await;
    let (d0, d1) = (h.dest(0), h.dest(1));

    // While queued: both destinations have both series.
    let seen = loop {
        let text = metrics.render();
        let both = [&d0, &d1].iter().all(|d| {
            has_series(&text, "courier_outbox_pending_edus", d)
                && has_series(&text, "courier_outbox_oldest_age_seconds", d)
                && has_series(&text, "courier_federation_destination_failures", d)
                && has_series(&text, "courier_federation_backoff_seconds", d)
        });
        if both || start.elapsed() > Duration::from_secs(44) {
            break both;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(seen, "the 30 s refresh reports both queued destinations");
    assert!(
        h.fake
            .wait_for(Duration::from_secs(120), |r| delivered(r, "d0.fed.test")
                .len()
                == 2)
            .await,
        "d0 delivers once it is back"
    );

    // Once d0 has nothing queued its series go; d1's stay.
    let deadline = start + Duration::from_secs(3600);
    let retired = loop {
        let text = metrics.render();
        let d0_gone = !has_series(&text, "courier_outbox_pending_edus", &d0)
            && !has_series(&text, "courier_outbox_oldest_age_seconds", &d0)
            && !has_series(&text, "courier_federation_destination_failures", &d0)
            && !has_series(&text, "courier_federation_backoff_seconds", &d0);
        if d0_gone && has_series(&text, "courier_outbox_pending_edus", &d1) {
            break true;
        }
        if Instant::now() > deadline {
            eprintln!("{text}");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        retired,
        "d0's series retired while d1 (still queued) keeps its own"
    );
    // d1, down for good, shows its backoff state: failures counted and a
    // wait until its next attempt.
    let text = metrics.render();
    assert!(
        series_value(&text, "courier_federation_destination_failures", &d1)
            .is_some_and(|failures| failures >= 1.0),
        "{text}"
    );
    assert!(
        series_value(&text, "courier_federation_backoff_seconds", &d1)
            .is_some_and(|wait| (0.0..=10.0).contains(&wait)),
        "{text}"
    );
    h.stop().await;
}
