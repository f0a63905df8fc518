//! Federation scenarios between real relays on loopback over real TLS
//! (issue 7): good connectivity; the receiver down at send time and back
//! later; the receiver down and the sender restarted in between (so the
//! message can only come from the sender's store); and three relays sending
//! in all directions at once. Each delivery must happen within 30 s of the
//! receiver's return, with no extra message to nudge it, and exactly once.

use std::time::{Duration, Instant};

use crate::support::TestRelay;
use serde_json::{Value, json};

/// The promise under test: delivered within this long after the receiver
/// is back.
const WITHIN: Duration = Duration::from_secs(30);

fn user(relay: &TestRelay, name: &str) -> String {
    format!("@{name}:{}", relay.server_name)
}

/// Registers `@<name>:<relay>` with one device `D` and token `tok-<name>`.
async fn device(relay: &TestRelay, name: &str) -> String {
    let token = format!("tok-{name}-{}", relay.federation_addr.port());
    relay.register_device(&user(relay, name), "D", &token).await;
    token
}

/// Sends one message with a unique `id` from `token` on `from` to
/// `recipient`'s device `D`.
async fn send(from: &TestRelay, token: &str, recipient: &str, id: &str) {
    let r = from
        .send_to_device(
            token,
            "org.example.scenario",
            id,
            json!({ recipient: { "D": { "id": id } } }),
        )
        .await;
    assert_eq!(r.status, 200, "send {id}: {}", r.text);
}

/// Waits for exactly the ids in `want` on the device of `token`, then checks
/// that a further sync returns nothing (no duplicates).
async fn expect_exactly(relay: &TestRelay, token: &str, want: &[&str]) {
    let (events, since) = relay.sync_until(token, None, want.len(), WITHIN).await;
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["content"]["id"].as_str().unwrap_or("?").to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected, "delivered ids on {}", relay.server_name);
    for event in &events {
        assert_eq!(event["type"], "org.example.scenario");
        assert_eq!(
            event.as_object().map(|o| o.len()),
            Some(3),
            "exactly sender, type, content: {event}"
        );
    }
    let r = relay.sync(token, since.as_deref(), 0).await;
    let extra: &[Value] = r.json["to_device"]["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    assert!(
        extra.is_empty(),
        "nothing after the last acknowledgement: {extra:?}"
    );
}

/// Waits until `relay` has recorded a failed attempt to `destination` (so
/// the message is really queued behind a backoff, not already sent).
async fn wait_for_failure(relay: &TestRelay, destination: &str) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let r = relay
            .http
            .get(
                &format!("{}/_courier/v1/destinations", relay.rpc_url),
                Some(&relay.rpc_secret),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let failed = r.json["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["destination"] == destination && d["failures"].as_u64().unwrap_or(0) >= 1);
        if failed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no failed attempt to {destination} recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_connectivity_both_ways() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = device(&a, "alice").await;
    let bob = device(&b, "bob").await;
    send(&a, &alice, &user(&b, "bob"), "a1").await;
    send(&b, &bob, &user(&a, "alice"), "b1").await;
    expect_exactly(&b, &bob, &["a1"]).await;
    expect_exactly(&a, &alice, &["b1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_at_send_time_gets_it_after_its_return() {
    let a = TestRelay::spawn().await;
    let mut b = TestRelay::spawn().await;
    let alice = device(&a, "alice").await;
    let bob = device(&b, "bob").await;
    b.stop().await;
    send(&a, &alice, &user(&b, "bob"), "while-down-1").await;
    send(&a, &alice, &user(&b, "bob"), "while-down-2").await;
    wait_for_failure(&a, &b.server_name).await;
    b.restart().await;
    let back = Instant::now();
    expect_exactly(&b, &bob, &["while-down-1", "while-down-2"]).await;
    assert!(
        back.elapsed() < WITHIN,
        "delivered {:?} after the receiver's return",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_restarted_while_receiver_down_delivers_from_its_store() {
    let mut a = TestRelay::spawn().await;
    let mut b = TestRelay::spawn().await;
    let alice = device(&a, "alice").await;
    let bob = device(&b, "bob").await;
    b.stop().await;
    send(&a, &alice, &user(&b, "bob"), "from-store-1").await;
    send(&a, &alice, &user(&b, "bob"), "from-store-2").await;
    wait_for_failure(&a, &b.server_name).await;
    // The sender's memory is gone: only its store knows the messages.
    a.stop().await;
    a.restart().await;
    b.restart().await;
    let back = Instant::now();
    expect_exactly(&b, &bob, &["from-store-1", "from-store-2"]).await;
    assert!(
        back.elapsed() < WITHIN,
        "delivered {:?} after the receiver's return",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_all_directions_at_once() {
    let relays = [
        TestRelay::spawn().await,
        TestRelay::spawn().await,
        TestRelay::spawn().await,
    ];
    let mut tokens = Vec::new();
    for (i, relay) in relays.iter().enumerate() {
        tokens.push(device(relay, &format!("u{i}")).await);
    }
    // (sender index, recipient user, message id) for every ordered pair.
    let mut plan = Vec::new();
    for i in 0..relays.len() {
        for j in (0..relays.len()).filter(|j| *j != i) {
            for n in 0..5 {
                plan.push((
                    i,
                    user(&relays[j], &format!("u{j}")),
                    format!("{i}-to-{j}-{n}"),
                ));
            }
        }
    }
    let sends: Vec<_> = plan
        .iter()
        .map(|(i, to, id)| send(&relays[*i], &tokens[*i], to, id))
        .collect();
    futures_join_all(sends).await;
    for (j, relay) in relays.iter().enumerate() {
        let want: Vec<String> = (0..3)
            .filter(|i| *i != j)
            .flat_map(|i| (0..5).map(move |n| format!("{i}-to-{j}-{n}")))
            .collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        expect_exactly(relay, &tokens[j], &want).await;
    }
}

/// Runs the futures concurrently on this task.
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        pinned.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pinned.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Floats in content (accepted as Synapse accepts them) cross federation
/// unchanged: the sender signs them in the form Synapse verifies, the
/// receiver verifies that form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floats_cross_federation_unchanged() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = device(&a, "alice").await;
    let bob = device(&b, "bob").await;
    let content = json!({ "id": "f1", "f": 2.5, "big": 1e16, "small": 1e-5, "whole": 10.0 });
    let r = a
        .send_to_device(
            &alice,
            "org.example.scenario",
            "f1",
            json!({ user(&b, "bob"): { "D": content.clone() } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (events, _) = b.sync_until(&bob, None, 1, WITHIN).await;
    assert_eq!(events.len(), 1, "delivered once");
    assert_eq!(events[0]["content"], content);
}
