//! Crash safety of `SqliteStore` (DESIGN §1.1): a child process writes
//! acknowledged batches as fast as it can while this test kills it with
//! SIGKILL at random moments. After every kill the store is reopened and
//! checked: every batch the child reported as acknowledged is present exactly
//! once, no batch is half written, and retrying an acknowledged batch is a
//! duplicate.
//!
//! The child is this same test binary, re-executed with `COURIER_CRASH_CHILD`
//! set to the database path and a filter selecting this test.

#[allow(dead_code)]
#[path = "support/crash.rs"]
mod crash;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crash::ROUNDS;

use courier::store::Store;
use courier::store::sqlite::SqliteStore;

const CHILD_ENV: &str = "COURIER_CRASH_CHILD";
const TEST_NAME: &str = "kill9_loses_no_acknowledged_write";
/// The child: writes batches from several tasks until killed.
fn child_main(db: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("child runtime");
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
    let exe = std::env::current_exe().expect("test binary path");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut total_kills_mid_write = 0;

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let (line_tx, line_rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of acknowledgements (sometimes none:
        // during open or migration), plus a random extra delay.
        let target: usize = if round % 6 == 0 {
            0
        } else {
            rand::random_range(1..200)
        };
        let mut round_acks: Vec<String> = Vec::new();
        while round_acks.len() < target {
            let line = line_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("child stopped acknowledging writes");
            if let Some(txn) = line.strip_prefix("ack ") {
                round_acks.push(txn.to_owned());
            }
        }
        std::thread::sleep(Duration::from_micros(rand::random_range(0..20_000)));
        child.kill().expect("SIGKILL child");
        let status = child.wait().expect("reap child");
        assert!(!status.success(), "child must die by the signal");
        reader.join().expect("reader thread");
        // Every ack printed before the kill counts.
        for line in line_rx.try_iter() {
            if let Some(txn) = line.strip_prefix("ack ") {
                round_acks.push(txn.to_owned());
            }
        }
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
