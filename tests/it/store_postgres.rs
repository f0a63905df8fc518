//! Runs the backend-generic store conformance suite
//! (`tests/it/support/store_suite/`) against `PostgresStore` on a throwaway
//! cluster (`tests/it/support/pg.rs`), plus the checks that need the database
//! itself: schema version and hashed tokens, stream ids never reused after
//! reopening, orphan inbox rows, concurrent opens migrating once, leases,
//! and LISTEN/NOTIFY wake-ups between two store instances.

use crate::support::pg;
use crate::support::store_suite;

use std::sync::Arc;
use std::time::Duration;

use courier::store::postgres::{PostgresOptions, PostgresStore};
use courier::store::{DeviceKey, NewOutboxEdu, Retention, SendBatch, Store, StoreError, Wakeup};

async fn make_postgres() -> Option<store_suite::Harness> {
    let cluster = pg::shared()?;
    let conninfo = cluster.fresh_database().await;
    let store = PostgresStore::open(&conninfo)
        .await
        .expect("open postgres store");
    Some(store_suite::Harness {
        store: Arc::new(store),
        _guard: Box::new(()),
        reopen: Box::new(move || {
            let conninfo = conninfo.clone();
            Box::pin(async move {
                let store = PostgresStore::open(&conninfo).await.expect("reopen");
                Arc::new(store) as Arc<dyn courier::store::Store>
            })
        }),
    })
}

store_conformance_tests!(optional make_postgres);
store_key_conformance_tests!(optional make_postgres);
store_device_list_conformance_tests!(optional make_postgres);

/// A fresh database's connection string, or `None` when skipped.
async fn database() -> Option<String> {
    Some(pg::shared()?.fresh_database().await)
}

async fn raw(conninfo: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .expect("raw connect");
    tokio::spawn(connection);
    client
}

use store_suite::send;

fn remote_send(txn_id: &str, destination: &str) -> SendBatch {
    SendBatch {
        remote: vec![NewOutboxEdu {
            destination: destination.to_owned(),
            edu_json: "{\"edu_type\":\"m.direct_to_device\",\"content\":{}}".to_owned(),
            message_count: 1,
        }],
        local: vec![],
        ..send(txn_id, "@a:x", "A", 0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_version_is_recorded_and_tokens_are_hashed() {
    let Some(conninfo) = database().await else {
        return;
    };
    let store = PostgresStore::open(&conninfo).await.expect("open");
    store
        .upsert_device("@a:x", "A", Some("secret-token"))
        .await
        .expect("device");
    let client = raw(&conninfo).await;
    let version: i32 = client
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(
        u32::try_from(version).expect("positive"),
        crate::support::migration_files("postgres")
            .last()
            .copied()
            .unwrap_or(0)
    );
    let rows = client
        .query("SELECT token_hash FROM access_tokens", &[])
        .await
        .expect("hashes");
    assert_eq!(rows.len(), 1);
    let hash: String = rows[0].get(0);
    assert_eq!(hash, courier::store::hash_token("secret-token"));
    assert_eq!(hash.len(), 64);
    assert!(!hash.contains("secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_migrate_once() {
    let Some(conninfo) = database().await else {
        return;
    };
    let mut handles = Vec::new();
    for _ in 0..4 {
        let conninfo = conninfo.clone();
        handles.push(tokio::spawn(async move {
            PostgresStore::open(&conninfo).await.map(|_| ())
        }));
    }
    for h in handles {
        h.await.expect("task").expect("open while others open");
    }
    let client = raw(&conninfo).await;
    let applied: i64 = client
        .query_one("SELECT count(*) FROM schema_version", &[])
        .await
        .expect("count")
        .get(0);
    // Each migration, exactly once.
    assert_eq!(
        applied,
        crate::support::migration_files("postgres").len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_orphan_inbox_rows_in_batches() {
    let Some(conninfo) = database().await else {
        return;
    };
    let store = PostgresStore::open(&conninfo).await.expect("open");
    store
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    store
        .enqueue_send(send("t1", "@a:x", "A", 1))
        .await
        .expect("send");
    // Rows left behind by an older version or a manual device removal.
    let client = raw(&conninfo).await;
    client
        .batch_execute(
            "INSERT INTO device_inbox (user_id, device_id, sender, event_type, content_json)
             SELECT '@gone:x', 'G', '@s:x', 'm.test', '{}' FROM generate_series(1, 3)",
        )
        .await
        .expect("insert orphans");
    let first = store.prune(0, Retention::DEFAULT, 2).await.expect("prune");
    assert_eq!(first.orphan_inbox_rows, 2);
    let second = store.prune(0, Retention::DEFAULT, 2).await.expect("prune");
    assert_eq!(second.orphan_inbox_rows, 1);
    let page = store.fetch_inbox("@a:x", "A", 0, 10).await.expect("fetch");
    assert_eq!(page.messages.len(), 1);
}

/// Two stores (two workers) writing to one device at once: every row lands
/// once, and a reader paging with `since` while they write never skips a
/// row that commits late (stream ids become visible in order per device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_hide_rows_behind_since() {
    let Some(conninfo) = database().await else {
        return;
    };
    let a = Arc::new(PostgresStore::open(&conninfo).await.expect("open a"));
    let b = Arc::new(PostgresStore::open(&conninfo).await.expect("open b"));
    a.upsert_device("@a:x", "A", None).await.expect("device");
    const PER_TASK: u32 = 50;
    let mut writers = Vec::new();
    for task in 0..8u32 {
        let store = if task % 2 == 0 { a.clone() } else { b.clone() };
        writers.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                let n = task * 1000 + i;
                store
                    .enqueue_send(send(&format!("w{n}"), "@a:x", "A", n))
                    .await
                    .expect("send");
            }
        }));
    }
    let total = 8 * PER_TASK as usize;
    let mut seen = std::collections::BTreeSet::new();
    let mut since = 0;
    let reader = b.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < total {
        assert!(tokio::time::Instant::now() < deadline, "reader stalled");
        let page = reader
            .fetch_inbox("@a:x", "A", since, 7)
            .await
            .expect("fetch");
        for m in &page.messages {
            assert!(m.stream_id > since);
            assert!(seen.insert(m.content_json.clone()), "row delivered twice");
        }
        since = page.next_batch;
        if page.messages.is_empty() {
            tokio::task::yield_now().await;
        }
    }
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(seen.len(), total);
    assert!(
        reader
            .fetch_inbox("@a:x", "A", since, 100)
            .await
            .expect("fetch")
            .messages
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_give_each_destination_one_owner() {
    let Some(conninfo) = database().await else {
        return;
    };
    let store = PostgresStore::open(&conninfo).await.expect("open");
    const LEASE: i64 = 10_000;
    let t0 = 1_000_000;
    for (i, d) in ["a.test", "b.test", "c.test", "d.test"].iter().enumerate() {
        store
            .enqueue_send(remote_send(&format!("r{i}"), d))
            .await
            .expect("send");
    }
    // Two workers claim at the same moment, two destinations each at most.
    let (w1, w2) = tokio::join!(
        store.claim_destinations("w1", t0, LEASE, 2),
        store.claim_destinations("w2", t0, LEASE, 2)
    );
    let (w1, w2) = (w1.expect("claim w1"), w2.expect("claim w2"));
    let mut all: Vec<String> = w1.iter().chain(w2.iter()).cloned().collect();
    all.sort();
    assert_eq!(all, ["a.test", "b.test", "c.test", "d.test"]);
    for d in &w1 {
        assert!(store.holds_lease("w1", d, t0 + 1).await.expect("holds"));
        assert!(!store.holds_lease("w2", d, t0 + 1).await.expect("holds"));
        assert!(
            store
                .acquire_lease("w2", d, t0 + 1, LEASE)
                .await
                .expect("acquire")
                .is_none()
        );
    }
    // Nothing is left to claim; a held lease is not listed again.
    assert!(
        store
            .claim_destinations("w3", t0 + 1, LEASE, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    assert!(
        store
            .claim_destinations("w1", t0 + 1, LEASE, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    // w1 renews; w2 dies. After w2's lease lapses, w3 takes its
    // destinations and w1 keeps its own.
    assert_eq!(
        store
            .renew_leases("w1", t0 + LEASE / 2, LEASE)
            .await
            .expect("renew"),
        w1.len() as u64
    );
    let after = t0 + LEASE + 1;
    let taken = store
        .claim_destinations("w3", after, LEASE, 10)
        .await
        .expect("claim after lapse");
    assert_eq!(taken, w2);
    for d in &w1 {
        assert!(store.holds_lease("w1", d, after).await.expect("holds"));
    }
    // The dead worker cannot send any more; its renewals find nothing.
    for d in &w2 {
        assert!(!store.holds_lease("w2", d, after).await.expect("holds"));
    }
    assert_eq!(
        store.renew_leases("w2", after, LEASE).await.expect("renew"),
        0
    );
    // Releasing hands destinations over at once.
    store.release_leases("w1").await.expect("release");
    let taken = store
        .claim_destinations("w3", after + 1, LEASE, 10)
        .await
        .expect("claim released");
    assert_eq!(taken, w1);
    // A destination with nothing pending can still be acquired by the
    // worker that is about to send to it, and then by nobody else.
    assert!(
        store
            .acquire_lease("w1", "new.test", after, LEASE)
            .await
            .expect("acquire new")
            .is_some()
    );
    assert!(
        store
            .acquire_lease("w2", "new.test", after + 1, LEASE)
            .await
            .expect("acquire held")
            .is_none()
    );
    assert!(
        store
            .acquire_lease("w2", "new.test", after + LEASE, LEASE)
            .await
            .expect("acquire lapsed")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_share_a_destination() {
    let Some(conninfo) = database().await else {
        return;
    };
    let store = Arc::new(PostgresStore::open(&conninfo).await.expect("open"));
    for i in 0..60 {
        store
            .enqueue_send(remote_send(&format!("r{i}"), &format!("d{i:02}.test")))
            .await
            .expect("send");
    }
    let mut handles = Vec::new();
    for w in 0..6 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..5 {
                mine.extend(
                    store
                        .claim_destinations(&format!("w{w}"), 5_000, 60_000, 4)
                        .await
                        .expect("claim"),
                );
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("claimer"));
    }
    let count = all.len();
    all.sort();
    all.dedup();
    assert_eq!(count, all.len(), "a destination was claimed twice");
    assert_eq!(count, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_cross_store_instances() {
    let Some(conninfo) = database().await else {
        return;
    };
    let writer = PostgresStore::open(&conninfo).await.expect("open writer");
    let listener = PostgresStore::open(&conninfo).await.expect("open listener");
    let mut theirs = listener.subscribe_wakeups().expect("postgres has wake-ups");
    let mut own = writer.subscribe_wakeups().expect("postgres has wake-ups");
    writer
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    // The subscription is live once a probe published after it arrives.
    let probe = |n: u32| format!("probe{n}.test");
    let mut n = 0;
    'ready: loop {
        n += 1;
        writer.publish_peer_up(&probe(n));
        let deadline = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                w = theirs.recv() => if matches!(w, Some(Wakeup::PeerUp(_))) { break 'ready },
                _ = &mut deadline => break,
            }
        }
        assert!(n < 100, "listener never started");
    }
    let mut batch = send("t1", "@a:x", "A", 1);
    batch.remote = remote_send("x", "remote.test").remote;
    writer.enqueue_send(batch).await.expect("send");
    let mut got = Vec::new();
    while got.len() < 2 {
        let w = tokio::time::timeout(Duration::from_secs(10), theirs.recv())
            .await
            .expect("wake-up in time")
            .expect("listener alive");
        if !matches!(w, Wakeup::PeerUp(_)) {
            got.push(w);
        }
    }
    assert_eq!(
        got,
        vec![
            Wakeup::Devices(vec![DeviceKey {
                user_id: "@a:x".to_owned(),
                device_id: "A".to_owned()
            }]),
            Wakeup::Destination("remote.test".to_owned()),
        ]
    );
    // The writer's own subscription skips its own wake-ups: the first
    // thing it gets is the listener's later peer-up (one queue, in commit
    // order), not the writer's earlier ones.
    listener.publish_peer_up("from-listener.test");
    let first = tokio::time::timeout(Duration::from_secs(10), own.recv())
        .await
        .expect("wake-up in time")
        .expect("listener alive");
    assert_eq!(first, Wakeup::PeerUp("from-listener.test".to_owned()));
}

/// Waits for the next wake-up other than the liveness probes.
/// Publishes probes from `writer` until one arrives on `rx`: the LISTEN
/// subscription behind `rx` is live from then on. Fails after 100 probes.
async fn wait_until_listening(
    writer: &PostgresStore,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Wakeup>,
) {
    for n in 0..100 {
        writer.publish_peer_up(&format!("probe{n}.test"));
        let deadline = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                w = rx.recv() => if matches!(w, Some(Wakeup::PeerUp(_))) { return },
                _ = &mut deadline => break,
            }
        }
    }
    panic!("the LISTEN connection never received a wake-up");
}

async fn next_wakeup(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Wakeup>) -> Wakeup {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("wake-up in time")
        .expect("listener alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_txn_from_a_backing_off_origin_publishes_peer_up() {
    let Some(conninfo) = database().await else {
        return;
    };
    let writer = PostgresStore::open(&conninfo).await.expect("open writer");
    let listener = PostgresStore::open(&conninfo).await.expect("open listener");
    let mut rx = listener.subscribe_wakeups().expect("postgres has wake-ups");
    wait_until_listening(&writer, &mut rx).await;
    while rx.try_recv().is_ok() {}
    let inbound = |origin: &str, txn: &str| courier::store::InboundTxn {
        origin: origin.to_owned(),
        txn_id: txn.to_owned(),
        response_json: "{}".to_owned(),
        edus: vec![],
        now_ms: 0,
    };
    writer
        .set_retry_state(
            &crate::support::lease_fence(&writer, "failing.test").await,
            "failing.test",
            &courier::store::RetryState {
                failures: 3,
                retry_after_ms: 1_000,
                last_success_ms: None,
                last_error: Some("down".to_owned()),
            },
        )
        .await
        .expect("retry state");
    // A healthy origin first, then the failing one: only the latter is news.
    writer
        .apply_inbound_txn(inbound("healthy.test", "t1"))
        .await
        .expect("apply");
    writer
        .apply_inbound_txn(inbound("failing.test", "t2"))
        .await
        .expect("apply");
    assert_eq!(
        next_wakeup(&mut rx).await,
        Wakeup::PeerUp("failing.test".to_owned())
    );
}

/// F10: a worker name held by a live instance is refused to another; it is
/// free again once released or once its heartbeat is a lease old, and the
/// displaced holder learns it from its next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_name_is_refused_to_a_second_instance() {
    let Some(conninfo) = database().await else {
        return;
    };
    let a = PostgresStore::open(&conninfo).await.expect("open a");
    let b = PostgresStore::open(&conninfo).await.expect("open b");
    const LEASE: i64 = 1_000;
    let t = 1_700_000_000_000;
    a.claim_worker_name("w", t, LEASE).await.expect("a claims");
    let refused = b
        .claim_worker_name("w", t + 1, LEASE)
        .await
        .expect_err("b is refused");
    assert!(
        matches!(&refused, StoreError::WorkerNameTaken { name, heartbeat_age_ms: 1, .. } if name == "w"),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("[worker] name"), "{refused}");
    // Another name is no problem.
    b.claim_worker_name("v", t, LEASE)
        .await
        .expect("b claims v");
    // a heartbeats: still refused just under a lease after that beat...
    assert!(
        a.heartbeat_worker_name("w", t + 500, LEASE)
            .await
            .expect("beat")
    );
    assert!(b.claim_worker_name("w", t + 1_499, LEASE).await.is_err());
    // ...and free once the beat is a lease old (a stalled or died).
    b.claim_worker_name("w", t + 1_500, LEASE)
        .await
        .expect("b takes a lapsed name");
    assert!(
        !a.heartbeat_worker_name("w", t + 1_600, LEASE)
            .await
            .expect("beat"),
        "a learns that b holds the name now"
    );
    // a's release leaves b's claim alone; b's release frees the name.
    a.release_worker_name("w").await.expect("release by a");
    assert!(a.claim_worker_name("w", t + 1_700, LEASE).await.is_err());
    b.release_worker_name("w").await.expect("release by b");
    a.claim_worker_name("w", t + 1_800, LEASE)
        .await
        .expect("a claims a released name");
}

/// F10 at start-up: a holder whose heartbeat is recent but stops (a crash
/// just before a restart) is waited out, a holder that keeps beating is
/// refused, both within about one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_out_a_dead_holder_and_refuses_a_live_one() {
    let Some(conninfo) = database().await else {
        return;
    };
    let lease = Duration::from_millis(400);
    let lease_ms = 400;
    let dead = PostgresStore::open(&conninfo).await.expect("open");
    dead.claim_worker_name("w", courier::clock::now_ms(), lease_ms)
        .await
        .expect("claim");
    let live = Arc::new(PostgresStore::open(&conninfo).await.expect("open"));
    tokio::time::timeout(
        Duration::from_secs(20),
        courier::store::claim_worker_name_at_start(&*live, "w", lease),
    )
    .await
    .expect("bounded")
    .expect("the dead holder's name is taken after its heartbeat lapses");
    let beating = live.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            assert!(
                beating
                    .heartbeat_worker_name("w", courier::clock::now_ms(), lease_ms)
                    .await
                    .expect("beat")
            );
            tokio::time::sleep(lease / 3).await;
        }
    });
    let late = PostgresStore::open(&conninfo).await.expect("open");
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        courier::store::claim_worker_name_at_start(&late, "w", lease),
    )
    .await
    .expect("bounded");
    heartbeat.abort();
    assert!(
        matches!(refused, Err(StoreError::WorkerNameTaken { .. })),
        "{refused:?}"
    );
}

/// F12: with `sslmode=require` (or `verify-full`) the pool and the LISTEN
/// connection reach a TLS-only-over-TCP server encrypted, verifying its
/// certificate against the configured CA; without that CA the store does
/// not open, and `sslmode=disable` still connects in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_sslmode_require_verifies_and_encrypts() {
    courier::tls::install_crypto_provider();
    let ca = courier::tools::devcerts::DevCa::generate("Courier PG test CA").expect("ca");
    let leaf = ca.issue(&["localhost", "127.0.0.1"]).expect("leaf");
    let Some((cluster, port)) = pg::PgCluster::start_tls(&leaf.cert_pem, &leaf.key_pem) else {
        return;
    };
    let ca_path = cluster.dir().join("test-ca.crt");
    std::fs::write(&ca_path, &ca.cert_pem).expect("ca written");
    let url = |mode: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={mode}"
        )
    };
    let with_ca = || PostgresOptions {
        extra_ca: vec![ca_path.clone()],
        ..PostgresOptions::default()
    };
    let within = Duration::from_secs(30);
    let store = tokio::time::timeout(within, PostgresStore::open_with(&url("require"), with_ca()))
        .await
        .expect("bounded")
        .expect("open over TLS");
    store
        .upsert_device("@a:x", "A", Some("tok"))
        .await
        .expect("a write over TLS");
    // The server agrees the session is encrypted.
    let (pg_config, mode) =
        courier::store::postgres::tls::parse_conninfo(&url("verify-full")).expect("parse");
    assert_eq!(mode, courier::store::postgres::tls::TlsMode::Require);
    let connector =
        courier::store::postgres::tls::connector(std::slice::from_ref(&ca_path)).expect("tls");
    let (client, connection) = pg_config.connect(connector).await.expect("raw TLS connect");
    tokio::spawn(connection);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl);
    // The LISTEN connection uses TLS too (sslmode=require forbids anything
    // else): a wake-up from the other store arrives.
    let other = PostgresStore::open_with(&url("verify-full"), with_ca())
        .await
        .expect("open with verify-full");
    let mut wakeups = other.subscribe_wakeups().expect("postgres has wake-ups");
    wait_until_listening(&store, &mut wakeups).await;
    // An unknown issuer is refused, not downgraded.
    let refused = tokio::time::timeout(
        within,
        PostgresStore::open_with(&url("require"), PostgresOptions::default()),
    )
    .await
    .expect("bounded");
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA is refused"
    );
    // Plaintext when asked for.
    let plain = PostgresStore::open_with(&url("disable"), PostgresOptions::default())
        .await
        .expect("open without TLS");
    plain
        .lookup_token("tok")
        .await
        .expect("a read in plaintext")
        .expect("the token written over TLS");
}

/// Two workers (two store instances on one database) change two devices of
/// one user at once while a destination is interested: the change log's
/// lock serializes the queueing, so the outbox holds one coalesced row per
/// device with that device's latest state, in stream order and chained; a
/// row in the in-flight transaction survives later changes; and the other
/// instance hears the destination's wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_changing_one_users_devices_leave_one_chained_row_per_device() {
    use courier::store::device_lists::NewInterest;
    use courier::store::keys::DeviceQuery;
    use courier::store::{DeviceListStore, InFlightTxn, KeyStore};

    const USER: &str = "@alice:local.test";
    const DEST: &str = "remote.test";
    const NOW: i64 = 1_700_000_000_000;
    let Some(conninfo) = database().await else {
        return;
    };
    let a = PostgresStore::open(&conninfo).await.expect("open a");
    let b = PostgresStore::open(&conninfo).await.expect("open b");
    let mut heard_by_b = b.subscribe_wakeups().expect("postgres has wake-ups");
    wait_until_listening(&a, &mut heard_by_b).await;
    while heard_by_b.try_recv().is_ok() {}
    for device in ["D1", "D2"] {
        a.upsert_device(USER, device, None).await.expect("device");
    }
    a.add_device_list_interest(
        vec![NewInterest {
            user_id: USER.to_owned(),
            destination: DEST.to_owned(),
            expires_ts: None,
        }],
        NOW,
    )
    .await
    .expect("interest");

    // 2 workers × 2 devices × 10 renames, all at once.
    let storm = |round: &'static str| {
        let mut tasks = Vec::new();
        for (worker, store) in [("a", a.clone()), ("b", b.clone())] {
            for device in ["D1", "D2"] {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..10 {
                        let name = format!("{round}-{worker}-{device}-{i}");
                        let known = store
                            .set_display_name(USER, device, Some(&name), NOW)
                            .await
                            .expect("rename");
                        assert!(known);
                    }
                }));
            }
        }
        tasks
    };
    for task in storm("first") {
        task.await.expect("renames");
    }
    let check = |rows: &[courier::store::OutboxEdu], acked: Option<i64>| {
        let mut last: Option<i64> = acked;
        let mut names = std::collections::BTreeMap::new();
        for row in rows {
            let meta = row.device_list.clone().expect("a device-list row");
            assert_eq!(meta.user_id, USER);
            let stream = meta.stream_id.expect("a device update has a stream");
            assert_eq!(meta.prev_id, last, "chained in seq order");
            assert!(last.is_none_or(|l| l < stream), "stream ids grow");
            last = Some(stream);
            let edu: serde_json::Value = serde_json::from_str(&row.edu_json).expect("json");
            let content = &edu["content"];
            assert_eq!(content["stream_id"], stream);
            let device = content["device_id"].as_str().expect("device").to_owned();
            let name = content["device_display_name"].clone();
            assert!(names.insert(device, name).is_none(), "one row per device");
        }
        names
    };
    let current_names = || async {
        let answer = a
            .user_devices(vec![DeviceQuery {
                user_id: USER.to_owned(),
                device_ids: vec![],
            }])
            .await
            .expect("devices");
        answer[0]
            .devices
            .iter()
            .map(|d| (d.device_id.clone(), serde_json::json!(d.display_name)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let first = a.peek_outbox(DEST, 100, 1 << 20).await.expect("peek");
    assert_eq!(first.len(), 2, "one coalesced row per device: {first:?}");
    assert_eq!(check(&first, None), current_names().await);
    // The newest row carries the user's newest stream_id (40 changes).
    assert_eq!(
        first
            .iter()
            .filter_map(|r| r.device_list.as_ref()?.stream_id)
            .max(),
        Some(40)
    );

    // In flight, then another storm: the in-flight rows stay, and one new
    // row per device follows them.
    a.begin_txn(
        &crate::support::lease_fence(&a, DEST).await,
        InFlightTxn {
            destination: DEST.to_owned(),
            txn_id: "t1".to_owned(),
            seqs: first.iter().map(|r| r.seq).collect(),
            body: "{}".to_owned(),
        },
    )
    .await
    .expect("begin");
    for task in storm("second") {
        task.await.expect("renames");
    }
    let during = a.peek_outbox(DEST, 100, 1 << 20).await.expect("peek");
    assert_eq!(
        during.len(),
        4,
        "the in-flight rows and one new row per device"
    );
    assert_eq!(
        during[..2].iter().map(|r| r.seq).collect::<Vec<_>>(),
        first.iter().map(|r| r.seq).collect::<Vec<_>>()
    );
    b.ack_txn(
        &crate::support::lease_fence(&b, DEST).await,
        DEST,
        "t1",
        NOW,
    )
    .await
    .expect("ack");
    let after = a.peek_outbox(DEST, 100, 1 << 20).await.expect("peek");
    assert_eq!(after.len(), 2);
    assert_eq!(check(&after, Some(40)), current_names().await);

    // B heard A's destination wake-ups (its own are skipped by design).
    loop {
        if next_wakeup(&mut heard_by_b).await == Wakeup::Destination(DEST.to_owned()) {
            break;
        }
    }
}

/// Two workers receive the same remote updates at once (a peer's retried
/// transaction landing on both): the cached list's row lock makes them take
/// turns, so each update is applied exactly once and logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_applying_the_same_remote_updates_apply_each_once() {
    use courier::store::DeviceListStore;
    use courier::store::device_lists::{
        RemoteDeviceUpdate, RemoteSnapshot, SnapshotOutcome, TrackSource, TrackTarget,
    };
    use courier::store::keys::KeyStore;

    const REMOTE_USER: &str = "@bob:remote.test";
    const NOW: i64 = 1_700_000_000_000;
    let Some(conninfo) = database().await else {
        return;
    };
    let a = PostgresStore::open(&conninfo).await.expect("open a");
    let b = PostgresStore::open(&conninfo).await.expect("open b");
    let target = TrackTarget {
        user_id: REMOTE_USER.to_owned(),
        remote: true,
    };
    let stale = a
        .track_users("@alice:local.test", vec![target], TrackSource::Query, NOW)
        .await
        .expect("track");
    assert_eq!(stale, vec![REMOTE_USER.to_owned()]);
    let snapshot = RemoteSnapshot {
        user_id: REMOTE_USER.to_owned(),
        stream_id: 10,
        devices: vec![],
        master_key_json: None,
        self_signing_key_json: None,
    };
    let outcome = b
        .replace_remote_device_list(snapshot, NOW)
        .await
        .expect("snapshot");
    assert!(matches!(
        outcome,
        SnapshotOutcome::Stored {
            still_stale: false,
            ..
        }
    ));
    let before = a.device_list_position().await.expect("position");
    let updates: Vec<RemoteDeviceUpdate> = (11..=30)
        .map(|n| RemoteDeviceUpdate {
            stream_id: n,
            prev_ids: vec![n - 1],
            device_id: format!("D{}", n % 3),
            deleted: false,
            keys_json: None,
            display_name: Some(format!("name {n}")),
        })
        .collect();
    let mut tasks = Vec::new();
    for store in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let updates = updates.clone();
        tasks.push(tokio::spawn(async move {
            store
                .apply_remote_device_updates(REMOTE_USER, updates, NOW)
                .await
                .expect("apply")
        }));
    }
    let mut applied = 0;
    for task in tasks {
        let report = task.await.expect("task");
        assert!(report.tracked);
        assert!(!report.needs_resync, "a replay is no gap: {report:?}");
        assert_eq!(report.applied + report.not_newer, 20);
        applied += report.applied;
    }
    assert_eq!(applied, 20, "each update applied once over all workers");
    let after = a.device_list_position().await.expect("position");
    assert_eq!(after - before, 20, "one logged change per applied update");
    let lists = b
        .remote_device_lists(vec![REMOTE_USER.to_owned()])
        .await
        .expect("lists");
    assert_eq!(lists[0].stream_id, Some(30));
    assert!(!lists[0].stale);
    let names: Vec<Option<String>> = lists[0]
        .devices
        .iter()
        .map(|d| d.display_name.clone())
        .collect();
    assert_eq!(
        names,
        vec![
            Some("name 30".to_owned()),
            Some("name 28".to_owned()),
            Some("name 29".to_owned())
        ]
    );
}

/// A quarantined device-list row keeps its meta: released with a requeue,
/// it is peeked as a device-list row again (so the sender still finishes
/// it: prev_id, and no display name unless allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_device_list_row_keeps_its_meta() {
    use courier::store::device_lists::NewInterest;
    use courier::store::{DeviceListStore, KeyStore};

    const USER: &str = "@alice:local.test";
    const DEST: &str = "remote.test";
    const NOW: i64 = 1_700_000_000_000;
    let Some(conninfo) = database().await else {
        return;
    };
    let store = PostgresStore::open(&conninfo).await.expect("open");
    store.upsert_device(USER, "D1", None).await.expect("device");
    store
        .add_device_list_interest(
            vec![NewInterest {
                user_id: USER.to_owned(),
                destination: DEST.to_owned(),
                expires_ts: None,
            }],
            NOW,
        )
        .await
        .expect("interest");
    store
        .set_display_name(USER, "D1", Some("phone"), NOW)
        .await
        .expect("rename");
    let queued = store.peek_outbox(DEST, 10, 1 << 20).await.expect("peek");
    assert_eq!(queued.len(), 1);
    let meta = queued[0].device_list.clone().expect("a device-list row");
    store
        .quarantine_edu(
            &crate::support::lease_fence(&store, DEST).await,
            DEST,
            queued[0].seq,
            "refused alone",
            NOW,
        )
        .await
        .expect("quarantine");
    assert!(
        store
            .peek_outbox(DEST, 10, 1 << 20)
            .await
            .expect("peek")
            .is_empty()
    );
    assert!(
        store
            .release_quarantined(DEST, queued[0].seq, true)
            .await
            .expect("release")
    );
    let requeued = store.peek_outbox(DEST, 10, 1 << 20).await.expect("peek");
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].edu_json, queued[0].edu_json);
    assert_eq!(requeued[0].device_list, Some(meta));
    // And a later change of the device coalesces it like any queued row.
    store
        .set_display_name(USER, "D1", Some("tablet"), NOW)
        .await
        .expect("rename");
    let latest = store.peek_outbox(DEST, 10, 1 << 20).await.expect("peek");
    assert_eq!(latest.len(), 1);
    assert!(latest[0].edu_json.contains("tablet"));
}

/// The retention rules' `expired` journal row (`postgres::trace::record_expired`,
/// here in a transaction of its own) shows in the message's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_shows_in_its_trace() {
    let Some(conninfo) = database().await else {
        return;
    };
    let store = PostgresStore::open(&conninfo).await.expect("open");
    store
        .record_expired(
            "EXP1",
            "outbox of dead.test",
            "destination failing for 30 days",
            1_000,
        )
        .await
        .expect("record");
    let query = courier::store::trace::TraceQuery::Id("EXP1".into());
    let records = store.trace_journal(&query).await.expect("trace");
    let report = courier::trace::assemble("EXP1", &records, true);
    assert!(report.found);
    let end = &report.messages[0].ends[0];
    assert_eq!(end.kind, "expired");
    assert_eq!(end.ts, 1_000);
    assert_eq!(end.place.as_deref(), Some("outbox of dead.test"));
    assert_eq!(
        end.reason.as_deref(),
        Some("destination failing for 30 days")
    );
}
