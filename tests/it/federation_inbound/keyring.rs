//! The key ring over a real SQLite store, with key documents (and notary
//! answers) served from memory: one fetch for concurrent lookups, caches in
//! memory and store, bad documents refused and failures cached, refetches
//! only after a while, notaries with both signatures checked, and the fetch
//! timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use courier::federation::keyring::{FetchFuture, KeyFetcher, KeyRing};
use courier::identifiers::ServerName;
use courier::keys::{ServerSigningKey, server_key_document};
use courier::store::Store;
use courier::store::sqlite::SqliteStore;
use serde_json::{Value, json};

/// Serves key documents (and notary answers) from memory and counts
/// fetches.
struct MemoryFetcher {
    documents: std::sync::Mutex<std::collections::HashMap<String, Value>>,
    /// (notary, server) → the notary's answer.
    notary_answers: std::sync::Mutex<std::collections::HashMap<(String, String), Value>>,
    fetches: AtomicUsize,
    delay: Duration,
}

impl MemoryFetcher {
    fn new(delay: Duration) -> Arc<MemoryFetcher> {
        Arc::new(MemoryFetcher {
            documents: Default::default(),
            notary_answers: Default::default(),
            fetches: AtomicUsize::new(0),
            delay,
        })
    }

    fn publish(&self, server_name: &str, document: Value) {
        self.documents
            .lock()
            .expect("not poisoned")
            .insert(server_name.to_owned(), document);
    }

    fn publish_notary_answer(&self, notary: &str, server_name: &str, answer: Value) {
        self.notary_answers
            .lock()
            .expect("not poisoned")
            .insert((notary.to_owned(), server_name.to_owned()), answer);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl KeyFetcher for MemoryFetcher {
    fn fetch_server_keys<'a>(&'a self, server_name: &'a ServerName) -> FetchFuture<'a> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.documents
                .lock()
                .expect("not poisoned")
                .get(server_name.as_str())
                .cloned()
                .ok_or_else(|| "unreachable".to_owned())
        })
    }

    fn query_notary<'a>(
        &'a self,
        notary: &'a ServerName,
        server_name: &'a ServerName,
    ) -> FetchFuture<'a> {
        Box::pin(async move {
            self.notary_answers
                .lock()
                .expect("not poisoned")
                .get(&(notary.to_string(), server_name.to_string()))
                .cloned()
                .ok_or_else(|| "notary unreachable".to_owned())
        })
    }
}

async fn temp_store() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("keys.db"))
        .await
        .expect("store");
    (dir, Arc::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_fetches_once_caches_in_memory_and_store_and_coalesces() {
    let (_dir, store) = temp_store().await;
    // The fetch takes a moment so that the concurrent lookups overlap it.
    let fetcher = MemoryFetcher::new(Duration::from_millis(200));
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    fetcher.publish(
        "remote.example",
        server_key_document(
            "remote.example",
            &key,
            &[],
            courier::clock::now_ms() + 86_400_000,
        ),
    );
    let ring = Arc::new(KeyRing::with_fetcher(
        store.clone(),
        fetcher.clone(),
        Duration::from_secs(5),
    ));
    let lookups = (0..8).map(|_| {
        let ring = ring.clone();
        tokio::spawn(async move { ring.verify_key("remote.example", "ed25519:a").await })
    });
    for lookup in lookups {
        let found = lookup.await.expect("no panic").expect("key found");
        assert_eq!(found, key.verifying_key());
    }
    assert_eq!(fetcher.fetches(), 1, "concurrent lookups share one fetch");

    let stored = store.server_keys("remote.example").await.expect("readable");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key_id, "ed25519:a");
    assert!(stored[0].valid_until_ts <= courier::clock::now_ms() + 7 * 86_400_000);

    // A fresh ring over the same store needs no fetch.
    let fresh = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    assert_eq!(
        fresh
            .verify_key("remote.example", "ed25519:a")
            .await
            .expect("from the store"),
        key.verifying_key()
    );
    assert_eq!(fetcher.fetches(), 1);

    // Right after a fetch, an unknown key id does not fetch again (the
    // refetch interval is tested with paused time below).
    assert!(
        ring.verify_key("remote.example", "ed25519:b")
            .await
            .is_err()
    );
    assert!(
        ring.verify_key("remote.example", "ed25519:c")
            .await
            .is_err()
    );
    assert_eq!(fetcher.fetches(), 1, "refetch is rate-limited per server");
    // The known key still works meanwhile.
    assert!(ring.verify_key("remote.example", "ed25519:a").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_rejects_bad_documents_and_caches_failures() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    let impostor = ServerSigningKey::from_seed("a", [2; 32]);
    let later = courier::clock::now_ms() + 86_400_000;
    // Names another server.
    fetcher.publish(
        "wrong-name.example",
        server_key_document("elsewhere.example", &key, &[], later),
    );
    // Signed by a key that is not the one it publishes.
    let mut forged = server_key_document("forged.example", &key, &[], later);
    forged["signatures"] =
        server_key_document("forged.example", &impostor, &[], later)["signatures"].clone();
    fetcher.publish("forged.example", forged);
    // Expired.
    fetcher.publish(
        "expired.example",
        server_key_document(
            "expired.example",
            &key,
            &[],
            courier::clock::now_ms() - 1000,
        ),
    );
    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    for server in [
        "wrong-name.example",
        "forged.example",
        "expired.example",
        "unreachable.example",
    ] {
        let before = fetcher.fetches();
        assert!(
            ring.verify_key(server, "ed25519:a").await.is_err(),
            "{server}"
        );
        assert_eq!(fetcher.fetches(), before + 1, "{server}");
        // The failure is cached: a flood of requests is not a flood of fetches.
        for _ in 0..5 {
            assert!(ring.verify_key(server, "ed25519:a").await.is_err());
        }
        assert_eq!(fetcher.fetches(), before + 1, "{server}: failure cached");
        assert!(
            store
                .server_keys(server)
                .await
                .expect("readable")
                .is_empty(),
            "{server}: nothing was stored"
        );
    }
    // Old verify keys never verify requests.
    let old = courier::keys::OldVerifyKey {
        key_id: "ed25519:old".to_owned(),
        public_key: impostor.public_key_base64(),
        expired_ts: later,
    };
    fetcher.publish(
        "rotated.example",
        server_key_document("rotated.example", &key, &[old], later),
    );
    assert!(
        ring.verify_key("rotated.example", "ed25519:old")
            .await
            .is_err()
    );
    assert!(
        ring.verify_key("rotated.example", "ed25519:a")
            .await
            .is_ok()
    );
}

/// Paused time: the store runs on its own threads and no timer is pending
/// while it works, so only the explicit `advance` calls move the clock.
#[tokio::test(start_paused = true)]
async fn keyring_refetches_unknown_keys_and_failed_servers_only_after_a_while() {
    use courier::federation::keyring::{FAILURE_TTL, REFETCH_INTERVAL};
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let old_key = ServerSigningKey::from_seed("a", [1; 32]);
    let new_key = ServerSigningKey::from_seed("b", [3; 32]);
    let later = courier::clock::now_ms() + 86_400_000;
    fetcher.publish(
        "rotating.example",
        server_key_document("rotating.example", &old_key, &[], later),
    );
    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    assert!(
        ring.verify_key("rotating.example", "ed25519:a")
            .await
            .is_ok()
    );
    assert_eq!(fetcher.fetches(), 1);

    // The server rotates to key b.
    fetcher.publish(
        "rotating.example",
        server_key_document("rotating.example", &new_key, &[], later),
    );
    assert!(
        ring.verify_key("rotating.example", "ed25519:b")
            .await
            .is_err()
    );
    assert_eq!(fetcher.fetches(), 1, "too soon to refetch");
    tokio::time::advance(REFETCH_INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(
        ring.verify_key("rotating.example", "ed25519:b")
            .await
            .expect("refetched"),
        new_key.verifying_key()
    );
    assert_eq!(fetcher.fetches(), 2);
    // Key a stays usable until its own expiry.
    assert!(
        ring.verify_key("rotating.example", "ed25519:a")
            .await
            .is_ok()
    );
    assert_eq!(fetcher.fetches(), 2);

    // An unreachable server: one fetch per FAILURE_TTL.
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_err());
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_err());
    assert_eq!(fetcher.fetches(), 3);
    tokio::time::advance(FAILURE_TTL + Duration::from_secs(1)).await;
    fetcher.publish(
        "down.example",
        server_key_document("down.example", &old_key, &[], later),
    );
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_ok());
    assert_eq!(fetcher.fetches(), 4);
}

/// `[federation] key_refetch_interval_ms` and `key_failure_cache_ms`, set
/// through `with_intervals`, replace the defaults.
#[tokio::test(start_paused = true)]
async fn keyring_intervals_are_configurable() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    let later = courier::clock::now_ms() + 86_400_000;
    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5))
        .with_intervals(Duration::from_secs(300), Duration::from_secs(2));
    // A failure is remembered for 2 s, not the default 30 s.
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_err());
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_err());
    assert_eq!(fetcher.fetches(), 1);
    tokio::time::advance(Duration::from_millis(2_100)).await;
    fetcher.publish(
        "down.example",
        server_key_document("down.example", &key, &[], later),
    );
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_ok());
    assert_eq!(fetcher.fetches(), 2);
    // An unknown key id is not fetched again after the default 60 s, only
    // after the configured 300 s.
    assert!(ring.verify_key("down.example", "ed25519:b").await.is_err());
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(ring.verify_key("down.example", "ed25519:b").await.is_err());
    assert_eq!(fetcher.fetches(), 2, "the configured interval holds");
    tokio::time::advance(Duration::from_secs(240)).await;
    assert!(ring.verify_key("down.example", "ed25519:b").await.is_err());
    assert_eq!(fetcher.fetches(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_falls_back_to_notaries_and_checks_both_signatures() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let later = courier::clock::now_ms() + 86_400_000;
    let notary_key = ServerSigningKey::from_seed("n", [9; 32]);
    let impostor = ServerSigningKey::from_seed("n", [10; 32]);
    // The notary answers for itself directly.
    fetcher.publish(
        "notary.example",
        server_key_document("notary.example", &notary_key, &[], later),
    );
    let origin_doc = |name: &str, seed: u8| {
        server_key_document(
            name,
            &ServerSigningKey::from_seed("a", [seed; 32]),
            &[],
            later,
        )
    };
    let notarised = |name: &str, seed: u8, by: &ServerSigningKey| {
        let mut document = origin_doc(name, seed);
        courier::signing::sign_json(&mut document, "notary.example", by).expect("signed");
        json!({ "server_keys": [document] })
    };
    // good.example is unreachable directly; the notary vouches for it.
    fetcher.publish_notary_answer(
        "notary.example",
        "good.example",
        notarised("good.example", 11, &notary_key),
    );
    // The notary's signature is made with a key that is not the notary's.
    fetcher.publish_notary_answer(
        "notary.example",
        "badnotary.example",
        notarised("badnotary.example", 12, &impostor),
    );
    // No notary signature at all.
    fetcher.publish_notary_answer(
        "notary.example",
        "unsigned.example",
        json!({ "server_keys": [origin_doc("unsigned.example", 13)] }),
    );
    // The origin's self-signature is broken (signed by another key).
    let mut broken = origin_doc("broken.example", 14);
    broken["signatures"] = origin_doc("broken.example", 15)["signatures"].clone();
    courier::signing::sign_json(&mut broken, "notary.example", &notary_key).expect("signed");
    fetcher.publish_notary_answer(
        "notary.example",
        "broken.example",
        json!({ "server_keys": [broken] }),
    );

    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5))
        .with_notaries(vec![
            ServerName::parse("down-notary.example").expect("valid"),
            ServerName::parse("notary.example").expect("valid"),
        ]);
    assert_eq!(
        ring.verify_key("good.example", "ed25519:a")
            .await
            .expect("vouched for by the notary"),
        ServerSigningKey::from_seed("a", [11; 32]).verifying_key()
    );
    assert_eq!(
        store
            .server_keys("good.example")
            .await
            .expect("readable")
            .len(),
        1
    );
    for server in ["badnotary.example", "unsigned.example", "broken.example"] {
        assert!(
            ring.verify_key(server, "ed25519:a").await.is_err(),
            "{server} must not be trusted"
        );
        assert!(
            store
                .server_keys(server)
                .await
                .expect("readable")
                .is_empty(),
            "{server}"
        );
    }
    // Without notaries the same lookup fails.
    let direct_only = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    assert!(
        direct_only
            .verify_key("other.example", "ed25519:a")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn keyring_times_out_a_slow_fetch() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::from_secs(3600));
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    fetcher.publish(
        "slow.example",
        server_key_document(
            "slow.example",
            &key,
            &[],
            courier::clock::now_ms() + 86_400_000,
        ),
    );
    let ring = KeyRing::with_fetcher(store, fetcher, Duration::from_millis(100));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        ring.verify_key("slow.example", "ed25519:a"),
    )
    .await
    .expect("the key ring's own timeout fires first");
    assert!(result.is_err());
}
