//! The per-destination sender end to end: a real `Sender` over a real
//! `SqliteStore` and the real federation client, sending over loopback TLS
//! to the scriptable fake remote. Many destinations are many server names
//! (`d<N>.fed.test:<port>`) that an injected resolver maps to the fake, whose
//! certificate is valid for `*.fed.test`; the fake keys its scripts and
//! records by hostname.
//!
//! Tests about timing run on paused tokio time (with a throttled ticker so
//! that real socket and fsync waits cost little virtual time); the others
//! run in real time with a fast retry policy and wait for events.

#[path = "support/fake_remote.rs"]
mod fake_remote;

use std::sync::Arc;
use std::time::Duration;

use courier::federation::client::FederationClient;
use courier::federation::sender::{Sender, SenderHandle};
use courier::store::sqlite::SqliteStore;
use courier::store::{ClientTxnKey, NewOutboxEdu, SendBatch, Store};
use fake_remote::{FakeRemote, MapResolver, Received, Script, TestCa, TestConfig};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The real SQLite store (behind the paused-time helper, see `inhibiting`).
async fn open_store(path: &std::path::Path) -> Arc<dyn Store> {
    let store = SqliteStore::open(path).await.expect("sqlite store");
    Arc::new(inhibiting::InhibitingStore(Arc::new(store)))
}

struct Harness {
    _dir: tempfile::TempDir,
    fake: FakeRemote,
    config: TestConfig,
    store: Arc<dyn Store>,
    handle: SenderHandle,
    shutdown: CancellationToken,
    sender: Option<JoinHandle<()>>,
    txn_counter: u64,
}

impl Harness {
    async fn new(tweak: impl FnOnce(&mut TestConfig)) -> Harness {
        courier::tls::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let ca_path = ca.write_pem(dir.path());
        let fake = FakeRemote::start(&ca, &["*.fed.test"]).await;
        let mut config = TestConfig::new(Some(ca_path), dir.path().join("courier.db"));
        // Fast by default; timing tests put the real defaults back.
        config.retry_initial_ms = 20;
        config.retry_max_ms = 400;
        config.request_timeout_ms = 60_000;
        config.connect_timeout_ms = 60_000;
        tweak(&mut config);
        let store = open_store(&config.sqlite).await;
        let (handle, _) = SenderHandle::channel();
        let mut harness = Harness {
            _dir: dir,
            fake,
            config,
            store,
            handle,
            shutdown: CancellationToken::new(),
            sender: None,
            txn_counter: 0,
        };
        harness.start_sender();
        harness
    }

    fn start_sender(&mut self) {
        let config = Arc::new(self.config.build());
        let resolver = MapResolver::default().wildcard("fed.test", &["127.0.0.1"]);
        let client = FederationClient::with_resolver(
            config.clone(),
            Arc::new(fake_remote::test_signing_key()),
            Arc::new(resolver),
        )
        .expect("client");
        let (handle, commands) = SenderHandle::channel();
        let sender = Sender::new(config, self.store.clone(), Arc::new(client), commands);
        self.shutdown = CancellationToken::new();
        self.sender = Some(tokio::spawn(sender.run(self.shutdown.clone())));
        self.handle = handle;
    }

    /// Stops the sender and closes the store, as a relay shutting down.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(join) = self.sender.take() {
            join.await.expect("sender task ends cleanly");
        }
    }

    /// A fresh store handle on the same file and a fresh sender over it.
    async fn restart(&mut self) {
        self.stop().await;
        self.store = open_store(&self.config.sqlite).await;
        self.start_sender();
    }

    fn hostname(n: usize) -> String {
        format!("d{n}.fed.test")
    }

    fn dest(&self, n: usize) -> String {
        format!("{}:{}", Self::hostname(n), self.fake.port())
    }

    /// Queues EDUs `m<first>..m<last>` for destination `n` (one store
    /// transaction) and wakes it. Ids in `poison` carry a marker the fake
    /// can refuse.
    async fn enqueue(&mut self, n: usize, ids: std::ops::Range<usize>, poison: &[usize]) {
        let dest = self.dest(n);
        let remote = ids
            .map(|i| {
                let marker = if poison.contains(&i) { "POISON" } else { "ok" };
                let edu = serde_json::json!({
                    "edu_type": "m.direct_to_device",
                    "content": {
                        "sender": "@alice:origin.test",
                        "type": "m.test",
                        "message_id": format!("m{i}"),
                        "messages": { format!("@bob:{dest}"): { "DEV": { "i": i, "marker": marker } } }
                    }
                });
                NewOutboxEdu {
                    destination: dest.clone(),
                    edu_json: edu.to_string(),
                    message_count: 1,
                }
            })
            .collect();
        self.txn_counter += 1;
        let batch = SendBatch {
            txn: ClientTxnKey {
                user_id: "@alice:origin.test".to_owned(),
                device_id: "DEV".to_owned(),
                event_type: "m.test".to_owned(),
                txn_id: format!("t{}", self.txn_counter),
            },
            local: vec![],
            remote,
            now_ms: courier::now_ms(),
        };
        self.store.enqueue_send(batch).await.expect("enqueue");
        self.handle.wake(&dest);
    }

    /// Waits until the store holds nothing pending for anyone.
    async fn wait_store_drained(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let pending = self
                .store
                .destinations_with_pending()
                .await
                .expect("pending list");
            if pending.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "still pending: {pending:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Message ids delivered (answered 200) to `hostname`, in arrival order.
fn delivered(received: &[Received], hostname: &str) -> Vec<String> {
    received
        .iter()
        .filter(|r| fake_remote::hostname_of(&r.host) == hostname && r.status == 200)
        .flat_map(|r| r.edu_contents())
        .map(|c| c["message_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn ids(range: impl Iterator<Item = usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

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
                &fake_remote::test_signing_key().verifying_key(),
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

/// The real default schedule on paused time: a 5-minute outage, then the
/// peer is reached within 30 s of its return.
#[tokio::test(start_paused = true)]
async fn defaults_reach_a_peer_within_30s_after_a_5_minute_outage() {
    let _ticker = fake_remote::spawn_throttled_ticker(Duration::from_millis(10));
    let mut h = Harness::new(|c| {
        c.retry_initial_ms = 2_000;
        c.retry_max_ms = 600_000;
        c.retry_multiplier = 2.0;
        c.retry_jitter = 0.2;
    })
    .await;
    let start = Instant::now();
    let back = start + Duration::from_secs(300);
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
        late <= Duration::from_secs(30),
        "reached {late:?} after its return"
    );
    assert!(
        sends.len() >= 10,
        "tried throughout the outage: {}",
        sends.len()
    );
    // No gap during the outage was longer than the 30 s promise either.
    for pair in sends.windows(2) {
        assert!(pair[1].at - pair[0].at <= Duration::from_secs(31));
    }
    h.stop().await;
}

/// After a long outage the wait is bounded by the cap.
#[tokio::test(start_paused = true)]
async fn after_a_long_outage_the_wait_never_exceeds_the_cap() {
    let _ticker = fake_remote::spawn_throttled_ticker(Duration::from_millis(20));
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
    // exact schedule is unit-tested in federation::backoff.
    let bound = 600 + 20;
    assert!(
        gaps.iter().all(|&g| g <= bound),
        "gap over the cap: {gaps:?}"
    );
    assert!(
        gaps.iter().filter(|&&g| g >= 480).count() >= 3,
        "the schedule reaches the cap: {gaps:?}"
    );
    let ok = sends.iter().find(|r| r.status == 200).expect("delivered");
    assert!(ok.at.saturating_duration_since(back) <= Duration::from_secs(bound));
    h.stop().await;
}

/// `PeerIsUp` (an authenticated inbound request, or the wake RPC) resets the
/// backoff and sends at once.
#[tokio::test(start_paused = true)]
async fn peer_is_up_resets_the_backoff_and_sends_at_once() {
    let _ticker = fake_remote::spawn_throttled_ticker(Duration::from_millis(10));
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
    let scheduled_in = retry.retry_after_ms - courier::now_ms();
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
    let _ticker = fake_remote::spawn_throttled_ticker(Duration::from_millis(10));
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
    let _ticker = fake_remote::spawn_throttled_ticker(Duration::from_millis(10));
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
    tokio::time::sleep(courier::federation::destination::IDLE_EXIT * 3).await;
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

/// The real store, with each call run on a blocking thread. Tokio does not
/// auto-advance paused time while a `spawn_blocking` task runs, so an fsync
/// on the store's writer thread costs no virtual time in the paused tests.
/// Every call still goes to the real `SqliteStore`.
mod inhibiting {
    use std::future::Future;
    use std::sync::Arc;

    use courier::store::*;

    pub struct InhibitingStore(pub Arc<dyn Store>);

    fn blocking<T: Send + 'static>(
        work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let handle = tokio::runtime::Handle::current();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || handle.block_on(work))
                .await
                .map_err(|_| StoreError::Closed)?
        })
    }

    macro_rules! owned {
        ($($name:ident),*) => { $(let $name = $name.to_owned();)* };
    }

    impl Store for InhibitingStore {
        fn upsert_device<'a>(
            &'a self,
            user_id: &'a str,
            device_id: &'a str,
            access_token: Option<&'a str>,
        ) -> StoreFuture<'a, ()> {
            self.0.upsert_device(user_id, device_id, access_token)
        }
        fn delete_device<'a>(
            &'a self,
            user_id: &'a str,
            device_id: &'a str,
        ) -> StoreFuture<'a, bool> {
            self.0.delete_device(user_id, device_id)
        }
        fn list_devices<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<String>> {
            self.0.list_devices(user_id)
        }
        fn lookup_token<'a>(&'a self, access_token: &'a str) -> StoreFuture<'a, Option<DeviceKey>> {
            self.0.lookup_token(access_token)
        }
        fn enqueue_send(&self, batch: SendBatch) -> StoreFuture<'_, SendOutcome> {
            let s = self.0.clone();
            blocking(async move { s.enqueue_send(batch).await })
        }
        fn apply_inbound_txn(&self, txn: InboundTxn) -> StoreFuture<'_, InboundOutcome> {
            self.0.apply_inbound_txn(txn)
        }
        fn inbound_txn_response<'a>(
            &'a self,
            origin: &'a str,
            txn_id: &'a str,
        ) -> StoreFuture<'a, Option<String>> {
            self.0.inbound_txn_response(origin, txn_id)
        }
        fn fetch_inbox<'a>(
            &'a self,
            user_id: &'a str,
            device_id: &'a str,
            since: i64,
            limit: u32,
        ) -> StoreFuture<'a, InboxPage> {
            self.0.fetch_inbox(user_id, device_id, since, limit)
        }
        fn in_flight<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, Option<InFlightTxn>> {
            let s = self.0.clone();
            owned!(destination);
            blocking(async move { s.in_flight(&destination).await })
        }
        fn peek_outbox<'a>(
            &'a self,
            destination: &'a str,
            max_edus: u32,
            max_bytes: u64,
        ) -> StoreFuture<'a, Vec<OutboxEdu>> {
            let s = self.0.clone();
            owned!(destination);
            blocking(async move { s.peek_outbox(&destination, max_edus, max_bytes).await })
        }
        fn begin_txn(&self, txn: InFlightTxn) -> StoreFuture<'_, ()> {
            let s = self.0.clone();
            blocking(async move { s.begin_txn(txn).await })
        }
        fn ack_txn<'a>(
            &'a self,
            destination: &'a str,
            txn_id: &'a str,
            now_ms: TimestampMs,
        ) -> StoreFuture<'a, ()> {
            let s = self.0.clone();
            owned!(destination, txn_id);
            blocking(async move { s.ack_txn(&destination, &txn_id, now_ms).await })
        }
        fn refuse_txn<'a>(&'a self, destination: &'a str, txn_id: &'a str) -> StoreFuture<'a, ()> {
            let s = self.0.clone();
            owned!(destination, txn_id);
            blocking(async move { s.refuse_txn(&destination, &txn_id).await })
        }
        fn quarantine_edu<'a>(
            &'a self,
            destination: &'a str,
            seq: i64,
            reason: &'a str,
            now_ms: TimestampMs,
        ) -> StoreFuture<'a, ()> {
            let s = self.0.clone();
            owned!(destination, reason);
            blocking(async move { s.quarantine_edu(&destination, seq, &reason, now_ms).await })
        }
        fn list_quarantined<'a>(
            &'a self,
            destination: Option<&'a str>,
        ) -> StoreFuture<'a, Vec<QuarantinedEdu>> {
            self.0.list_quarantined(destination)
        }
        fn release_quarantined<'a>(
            &'a self,
            destination: &'a str,
            seq: i64,
            requeue: bool,
        ) -> StoreFuture<'a, bool> {
            self.0.release_quarantined(destination, seq, requeue)
        }
        fn retry_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RetryState> {
            let s = self.0.clone();
            owned!(destination);
            blocking(async move { s.retry_state(&destination).await })
        }
        fn set_retry_state<'a>(
            &'a self,
            destination: &'a str,
            state: &'a RetryState,
        ) -> StoreFuture<'a, ()> {
            let s = self.0.clone();
            owned!(destination);
            let state = state.clone();
            blocking(async move { s.set_retry_state(&destination, &state).await })
        }
        fn destinations_with_pending(&self) -> StoreFuture<'_, Vec<String>> {
            let s = self.0.clone();
            blocking(async move { s.destinations_with_pending().await })
        }
        fn destination_statuses(&self) -> StoreFuture<'_, Vec<DestinationStatus>> {
            let s = self.0.clone();
            blocking(async move { s.destination_statuses().await })
        }
        fn server_keys<'a>(
            &'a self,
            server_name: &'a str,
        ) -> StoreFuture<'a, Vec<StoredServerKey>> {
            self.0.server_keys(server_name)
        }
        fn put_server_keys(&self, keys: Vec<StoredServerKey>) -> StoreFuture<'_, ()> {
            self.0.put_server_keys(keys)
        }
        fn prune(
            &self,
            now_ms: TimestampMs,
            retention: Retention,
            batch: u32,
        ) -> StoreFuture<'_, PruneReport> {
            self.0.prune(now_ms, retention, batch)
        }
    }
}
