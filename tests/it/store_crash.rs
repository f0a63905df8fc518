//! Crash safety of `SqliteStore` (DESIGN §1.1): a child process writes
//! acknowledged batches as fast as it can while this test kills it with
//! SIGKILL at random moments. After every kill the store is reopened and
//! checked: every batch the child reported as acknowledged is present exactly
//! once, no batch is half written, and retrying an acknowledged batch is a
//! duplicate. A second test kills a child that claims one-time keys
//! (`support::crash_keys`): no key is ever handed out twice. A third kills
//! a child that renames devices and uploads device keys
//! (`support::crash_device_lists`): every committed change has its queued
//! `m.device_list_update` per interested destination, coalesced to the
//! newest, and nothing else is queued.
//!
//! The child is this same test binary, re-executed with `COURIER_CRASH_CHILD`
//! set to the database path and `--exact store_crash::<this test>`
//! (`support::child`).

use crate::support::child;
use crate::support::crash;
use crate::support::crash_device_lists;
use crate::support::crash_keys;
use crate::support::crash_outbox;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crash::ROUNDS;

use courier::store::Store;
use courier::store::sqlite::SqliteStore;

const CHILD_ENV: &str = "COURIER_CRASH_CHILD";
const TEST_FN: &str = "kill9_loses_no_acknowledged_write";
/// The child: writes batches from several tasks until killed.
fn child_main(db: &Path) {
    let runtime = child::runtime();
    runtime.block_on(async {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db).await.expect("child open"));
        crash::write_until_killed(store, Duration::from_secs(30), false).await;
    });
}

#[test]
fn kill9_loses_no_acknowledged_write() {
    if let Ok(db) = std::env::var(CHILD_ENV) {
        child_main(Path::new(&db));
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("crash.db");
    let runtime = child::runtime();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut total_kills_mid_write = 0;

    let test_name = child::exact_test_name(module_path!(), TEST_FN);
    for round in 0..ROUNDS {
        let round_acks = crash::kill_round(&test_name, (CHILD_ENV, db.as_os_str()), round, || {});
        if !round_acks.is_empty() {
            total_kills_mid_write += 1;
        }
        acked.extend(round_acks.iter().cloned());
        runtime.block_on(verify(&db, &acked, &round_acks));
    }
    assert!(total_kills_mid_write >= ROUNDS / 2);
    assert!(!acked.is_empty());
    eprintln!(
        "{} kills, {} acknowledged batches verified in {:?}",
        ROUNDS,
        acked.len(),
        started.elapsed()
    );
}

async fn verify(db: &Path, acked: &BTreeSet<String>, round_acks: &[String]) {
    let store = SqliteStore::open(db).await.expect("reopen after kill");
    crash::verify(&store, acked, round_acks).await;
    store.close().await.expect("close");
}

const KEYS_CHILD_ENV: &str = "COURIER_CRASH_KEYS_CHILD";
const KEYS_TEST_FN: &str = "kill9_never_hands_out_a_key_twice";

/// One-time-key claims under kill -9 (`support::crash_keys`): a child
/// claims and prints each key after its claim resolved; after every kill
/// no key was printed twice and printed keys uploaded again are not stored;
/// at the end the parent claims the rest, none of them printed before.
#[test]
fn kill9_never_hands_out_a_key_twice() {
    if let Ok(db) = std::env::var(KEYS_CHILD_ENV) {
        let runtime = child::runtime();
        runtime.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(SqliteStore::open(Path::new(&db)).await.expect("child open"));
            crash_keys::claim_until_killed(store, Duration::from_secs(120), false).await;
        });
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("claims.db");
    let runtime = child::runtime();
    let mut ledger = crash_keys::Ledger::default();
    let test_name = child::exact_test_name(module_path!(), KEYS_TEST_FN);
    for round in 0..ROUNDS {
        runtime.block_on(async {
            let store = SqliteStore::open(&db).await.expect("open");
            ledger.top_up(&store).await;
            store.close().await.expect("close");
        });
        let round_keys =
            crash::kill_round(&test_name, (KEYS_CHILD_ENV, db.as_os_str()), round, || {});
        runtime.block_on(async {
            let store = SqliteStore::open(&db).await.expect("reopen after kill");
            ledger.check_round(&store, &round_keys).await;
            store.close().await.expect("close");
        });
    }
    let rest = runtime.block_on(async {
        let store = SqliteStore::open(&db).await.expect("reopen");
        ledger.claim_the_rest(&store).await
    });
    eprintln!(
        "{ROUNDS} kills: {} keys acknowledged by children, {rest} claimed after",
        ledger.printed()
    );
}

const DEVICE_LISTS_CHILD_ENV: &str = "COURIER_CRASH_DEVICE_LISTS_CHILD";
const DEVICE_LISTS_TEST_FN: &str = "kill9_keeps_device_changes_and_their_updates_together";

/// Device renames and key uploads under kill -9
/// (`support::crash_device_lists`): after
/// every kill each destination's queue holds, per device, the update of
/// its stored state and stream (at most one row besides the in-flight
/// transaction), no acknowledged change is lost, nothing is queued that
/// was not written, and the `prev_id` chain follows what was acknowledged.
#[test]
fn kill9_keeps_device_changes_and_their_updates_together() {
    if let Ok(db) = std::env::var(DEVICE_LISTS_CHILD_ENV) {
        let runtime = child::runtime();
        runtime.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(SqliteStore::open(Path::new(&db)).await.expect("child open"));
            crash_device_lists::change_until_killed(store, Duration::from_secs(120), false).await;
        });
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("device_lists.db");
    let runtime = child::runtime();
    let mut ledger = crash_device_lists::Ledger::default();
    runtime.block_on(async {
        let store = SqliteStore::open(&db).await.expect("open");
        ledger.setup(&store).await;
        store.close().await.expect("close");
    });
    let test_name = child::exact_test_name(module_path!(), DEVICE_LISTS_TEST_FN);
    for round in 0..ROUNDS {
        let round_acks = crash::kill_round(
            &test_name,
            (DEVICE_LISTS_CHILD_ENV, db.as_os_str()),
            round,
            || {},
        );
        runtime.block_on(async {
            let store = SqliteStore::open(&db).await.expect("reopen after kill");
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
const PIPELINE_TEST_FN: &str = "kill9_keeps_the_sender_pipeline_exact";

/// The sender's store step under kill -9 (`support::crash_outbox`): a
/// child enqueues and advances (ack + next record in one commit) until
/// killed; after every kill no acknowledged row is lost, reordered or
/// deleted unacknowledged, and the recorded transaction is the last one
/// reported (same bytes) or, if its ack committed unseen, its successor.
#[test]
fn kill9_keeps_the_sender_pipeline_exact() {
    if let Ok(db) = std::env::var(PIPELINE_CHILD_ENV) {
        let runtime = child::runtime();
        runtime.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(SqliteStore::open(Path::new(&db)).await.expect("child open"));
            crash_outbox::pipeline_until_killed(store, Duration::from_secs(60), false).await;
        });
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("pipeline.db");
    let runtime = child::runtime();
    let mut ledger = crash_outbox::Ledger::default();
    let test_name = child::exact_test_name(module_path!(), PIPELINE_TEST_FN);
    for round in 0..ROUNDS {
        let lines = crash::kill_round(
            &test_name,
            (PIPELINE_CHILD_ENV, db.as_os_str()),
            round,
            || {},
        );
        ledger.take(&lines);
        runtime.block_on(async {
            let store = SqliteStore::open(&db).await.expect("reopen after kill");
            ledger.check(&store).await;
            store.close().await.expect("close");
        });
    }
    assert!(ledger.steps > ROUNDS, "the children advanced the pipeline");
    eprintln!("{ROUNDS} kills, {} pipeline steps checked", ledger.steps);
}
