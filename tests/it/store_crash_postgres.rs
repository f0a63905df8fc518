//! Crash safety of `PostgresStore` (DESIGN §1.1): a child process writes
//! acknowledged batches as fast as it can while this test kills it with
//! SIGKILL at random moments; every third round the PostgreSQL server is
//! crashed too (`pg_ctl -m immediate`, no shutdown checkpoint, so the next
//! start runs crash recovery from the fsynced WAL) while the child is still
//! writing. After every kill the store is reopened and checked: every batch
//! the child reported as acknowledged is present exactly once, no batch is
//! half written, and retrying an acknowledged batch is a duplicate. A
//! second test does the same to a child claiming one-time keys
//! (`support::crash_keys`): no key is ever handed out twice. A third kills
//! a child renaming devices and uploading device keys
//! (`support::crash_device_lists`): every committed change has its queued
//! `m.device_list_update` per interested destination, coalesced to the
//! newest, and nothing else is queued.
//!
//! The child is this same test binary, re-executed with `COURIER_CRASH_CHILD`
//! set to the connection string and `--exact
//! store_crash_postgres::<this test>` (`support::child`).

use crate::support::pg;

use crate::support::child;
use crate::support::crash;
use crate::support::crash_device_lists;
use crate::support::crash_keys;
use crate::support::crash_outbox;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crash::ROUNDS;

use courier::store::Store;
use courier::store::postgres::PostgresStore;

const CHILD_ENV: &str = "COURIER_CRASH_CHILD";
const TEST_FN: &str = "kill9_loses_no_acknowledged_write_on_postgres";
/// The child: writes batches from several tasks until killed.
fn child_main(conninfo: &str) {
    let runtime = child::runtime();
    runtime.block_on(async {
        let store: Arc<dyn Store> =
            Arc::new(PostgresStore::open(conninfo).await.expect("child open"));
        crash::write_until_killed(store, Duration::from_secs(60), true).await;
    });
}

#[test]
fn kill9_loses_no_acknowledged_write_on_postgres() {
    if let Ok(conninfo) = std::env::var(CHILD_ENV) {
        child_main(&conninfo);
        return;
    }
    let Some(cluster) = pg::PgCluster::start() else {
        return;
    };
    let started = Instant::now();
    let runtime = child::runtime();
    let conninfo = runtime.block_on(cluster.fresh_database());
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut kills_mid_write = 0;
    let mut server_crashes = 0;

    let test_name = child::exact_test_name(module_path!(), TEST_FN);
    for round in 0..ROUNDS {
        let crash_server = round % 3 == 1;
        let round_acks = crash::kill_round(
            &test_name,
            (CHILD_ENV, std::ffi::OsStr::new(&conninfo)),
            round,
            || {
                if crash_server {
                    // The server dies first, with the child's commits in
                    // flight.
                    cluster.crash_server();
                }
            },
        );
        if crash_server {
            server_crashes += 1;
        }
        if crash_server {
            cluster.start_server();
        }
        if !round_acks.is_empty() {
            kills_mid_write += 1;
        }
        acked.extend(round_acks.iter().cloned());
        runtime.block_on(verify(&conninfo, &acked, &round_acks));
    }
    assert!(kills_mid_write >= ROUNDS / 2);
    assert!(!acked.is_empty());
    eprintln!(
        "{ROUNDS} kills ({server_crashes} with a server crash), {} acknowledged batches verified in {:?}",
        acked.len(),
        started.elapsed()
    );
}

async fn verify(conninfo: &str, acked: &BTreeSet<String>, round_acks: &[String]) {
    let store = PostgresStore::open(conninfo)
        .await
        .expect("reopen after kill");
    crash::verify(&store, acked, round_acks).await;
}

const KEYS_CHILD_ENV: &str = "COURIER_CRASH_KEYS_CHILD";
const KEYS_TEST_FN: &str = "kill9_never_hands_out_a_key_twice_on_postgres";

/// One-time-key claims under kill -9 (`support::crash_keys`): no key is
/// printed twice, printed keys uploaded again are not stored, and none of
/// the keys the parent claims at the end was printed before. (The server
/// is not crashed here: restarting it after a crash timed out under load
/// on the shared test machine.)
#[test]
fn kill9_never_hands_out_a_key_twice_on_postgres() {
    if let Ok(conninfo) = std::env::var(KEYS_CHILD_ENV) {
        let runtime = child::runtime();
        runtime.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(PostgresStore::open(&conninfo).await.expect("child open"));
            crash_keys::claim_until_killed(store, Duration::from_secs(120), true).await;
        });
        return;
    }
    let Some(cluster) = pg::PgCluster::start() else {
        return;
    };
    let runtime = child::runtime();
    let conninfo = runtime.block_on(cluster.fresh_database());
    let mut ledger = crash_keys::Ledger::default();
    let test_name = child::exact_test_name(module_path!(), KEYS_TEST_FN);
    for round in 0..ROUNDS {
        runtime.block_on(async {
            let store = PostgresStore::open(&conninfo).await.expect("open");
            ledger.top_up(&store).await;
        });
        let round_keys = crash::kill_round(
            &test_name,
            (KEYS_CHILD_ENV, std::ffi::OsStr::new(&conninfo)),
            round,
            || {},
        );
        runtime.block_on(async {
            let store = PostgresStore::open(&conninfo)
                .await
                .expect("reopen after kill");
            ledger.check_round(&store, &round_keys).await;
        });
    }
    let rest = runtime.block_on(async {
        let store = PostgresStore::open(&conninfo).await.expect("reopen");
        ledger.claim_the_rest(&store).await
    });
    eprintln!(
        "{ROUNDS} kills: {} keys acknowledged by children, {rest} claimed after",
        ledger.printed()
    );
}

const DEVICE_LISTS_CHILD_ENV: &str = "COURIER_CRASH_DEVICE_LISTS_CHILD";
const DEVICE_LISTS_TEST_FN: &str =
    "kill9_keeps_device_changes_and_their_updates_together_on_postgres";

/// Waits until no other session of the database is running a statement or
/// inside a transaction: the killed child's server backends may still be
/// carrying out a COMMIT it sent before it died. Checking before that lands
/// would see a change vanish later, and the next child would continue from
/// a stale counter.
async fn wait_for_quiet_backends(conninfo: &str) {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect to watch the backends");
    let driver = tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND state IS DISTINCT FROM 'idle'",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        let busy: i64 = row.get(0);
        if busy == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} backends of the killed child still busy after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    let _ = driver.await;
}

/// Device renames and key uploads under kill -9
/// (`support::crash_device_lists`), as on
/// SQLite; only the child is killed, never the server.
#[test]
fn kill9_keeps_device_changes_and_their_updates_together_on_postgres() {
    if let Ok(conninfo) = std::env::var(DEVICE_LISTS_CHILD_ENV) {
        let runtime = child::runtime();
        runtime.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(PostgresStore::open(&conninfo).await.expect("child open"));
            crash_device_lists::change_until_killed(store, Duration::from_secs(120), true).await;
        });
        return;
    }
    let Some(cluster) = pg::PgCluster::start() else {
        return;
    };
    let started = Instant::now();
    let runtime = child::runtime();
    let conninfo = runtime.block_on(cluster.fresh_database());
    let mut ledger = crash_device_lists::Ledger::default();
    runtime.block_on(async {
        let store = PostgresStore::open(&conninfo).await.expect("open");
        ledger.setup(&store).await;
        store.close().await.expect("close");
    });
    let test_name = child::exact_test_name(module_path!(), DEVICE_LISTS_TEST_FN);
    for round in 0..ROUNDS {
        let round_acks = crash::kill_round(
            &test_name,
            (DEVICE_LISTS_CHILD_ENV, std::ffi::OsStr::new(&conninfo)),
            round,
            || {},
        );
        runtime.block_on(async {
            wait_for_quiet_backends(&conninfo).await;
            let store = PostgresStore::open(&conninfo)
                .await
                .expect("reopen after kill");
            ledger.check_round(&store, round, &round_acks).await;
            store.close().await.expect("close");
        });
    }
    eprintln!(
        "{ROUNDS} kills in {:?}: {}",
        started.elapsed(),
        ledger.summary()
    );
}

const PIPELINE_CHILD_ENV: &str = "COURIER_CRASH_PIPELINE_CHILD";
const PIPELINE_TEST_FN: &str = "kill9_keeps_the_sender_pipeline_exact_on_postgres";

/// The sender's store step under kill -9 (`support::crash_outbox`), with
/// the server crashed too every third round: no acknowledged row lost,
/// reordered or deleted unacknowledged; the recorded transaction is the
/// last one reported (same bytes) or its successor.
#[test]
fn kill9_keeps_the_sender_pipeline_exact_on_postgres() {
    if let Ok(conninfo) = std::env::var(PIPELINE_CHILD_ENV) {
        let runtime = child::runtime();
        runtime.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(PostgresStore::open(&conninfo).await.expect("child open"));
            crash_outbox::pipeline_until_killed(store, Duration::from_secs(60), true).await;
        });
        return;
    }
    let Some(cluster) = pg::PgCluster::start() else {
        return;
    };
    let runtime = child::runtime();
    let conninfo = runtime.block_on(cluster.fresh_database());
    let mut ledger = crash_outbox::Ledger::default();
    let test_name = child::exact_test_name(module_path!(), PIPELINE_TEST_FN);
    for round in 0..ROUNDS {
        let crash_server = round % 3 == 1;
        let lines = crash::kill_round(
            &test_name,
            (PIPELINE_CHILD_ENV, std::ffi::OsStr::new(&conninfo)),
            round,
            || {
                if crash_server {
                    cluster.crash_server();
                }
            },
        );
        if crash_server {
            cluster.start_server();
        }
        ledger.take(&lines);
        runtime.block_on(async {
            wait_for_quiet_backends(&conninfo).await;
            let store = PostgresStore::open(&conninfo)
                .await
                .expect("reopen after kill");
            ledger.check(&store).await;
            store.close().await.expect("close");
        });
    }
    assert!(ledger.steps > ROUNDS, "the children advanced the pipeline");
    eprintln!("{ROUNDS} kills, {} pipeline steps checked", ledger.steps);
}
