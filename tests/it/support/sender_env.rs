//! The sender test harness: a real `Sender` over a real `SqliteStore` (run
//! on blocking threads, see `inhibiting_store`) and the real federation
//! client, sending to the fake remote. Destinations are server names
//! `d<N>.fed.test:<port>` that an injected resolver maps to the fake, whose
//! certificate is valid for `*.fed.test`; names under `hang.test` are ones
//! whose DNS lookups never answer.

use std::sync::Arc;
use std::time::Duration;

use courier::federation::outbound::client::FederationClient;
use courier::federation::sender::{Sender, SenderHandle};
use courier::store::sqlite::SqliteStore;
use courier::store::{ClientTxnKey, NewOutboxEdu, SendBatch, Store};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fake_remote::{FakeRemote, Received, TestCa};
use super::outbound_env::{self, MapResolver, TestConfig};

/// The real SQLite store (behind the paused-time helper, see `inhibiting`).
pub async fn open_store(path: &std::path::Path) -> Arc<dyn Store> {
    let store = SqliteStore::open(path).await.expect("sqlite store");
    Arc::new(super::inhibiting_store::InhibitingStore(Arc::new(store)))
}

pub struct Harness {
    pub _dir: tempfile::TempDir,
    pub fake: FakeRemote,
    pub config: TestConfig,
    pub store: Arc<dyn Store>,
    pub handle: SenderHandle,
    pub shutdown: CancellationToken,
    pub sender: Option<JoinHandle<()>>,
    pub txn_counter: u64,
}

impl Harness {
    pub async fn new(tweak: impl FnOnce(&mut TestConfig)) -> Harness {
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

    pub fn start_sender(&mut self) {
        let config = Arc::new(self.config.build());
        let resolver = MapResolver::default()
            .wildcard("fed.test", &["127.0.0.1"])
            .hang("hang.test");
        let client = FederationClient::with_resolver(
            config.clone(),
            Arc::new(outbound_env::test_signing_key()),
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
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(join) = self.sender.take() {
            join.await.expect("sender task ends cleanly");
        }
    }

    /// A fresh store handle on the same file and a fresh sender over it.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.store = open_store(&self.config.sqlite).await;
        self.start_sender();
    }

    pub fn hostname(n: usize) -> String {
        format!("d{n}.fed.test")
    }

    pub fn dest(&self, n: usize) -> String {
        format!("{}:{}", Self::hostname(n), self.fake.port())
    }

    /// Queues EDUs `m<first>..m<last>` for destination `n` (one store
    /// transaction) and wakes it. Ids in `poison` carry a marker the fake
    /// can refuse.
    pub async fn enqueue(&mut self, n: usize, ids: std::ops::Range<usize>, poison: &[usize]) {
        let dest = self.dest(n);
        self.enqueue_to(&dest, ids, poison).await;
    }

    /// A destination whose discovery never answers (its DNS hangs).
    pub fn hanging_dest(&self, n: usize) -> String {
        format!("h{n}.hang.test:{}", self.fake.port())
    }

    /// As `enqueue`, for any destination name.
    pub async fn enqueue_to(&mut self, dest: &str, ids: std::ops::Range<usize>, poison: &[usize]) {
        let dest = dest.to_owned();
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
            now_ms: courier::clock::now_ms(),
        };
        self.store.enqueue_send(batch).await.expect("enqueue");
        self.handle.wake(&dest);
    }

    /// Waits until the store holds nothing pending for anyone.
    pub async fn wait_store_drained(&self, limit: Duration) {
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
pub fn delivered(received: &[Received], hostname: &str) -> Vec<String> {
    received
        .iter()
        .filter(|r| super::fake_remote::hostname_of(&r.host) == hostname && r.status == 200)
        .flat_map(|r| r.edu_contents())
        .map(|c| c["message_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

pub fn ids(range: impl Iterator<Item = usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}
