//! Crash safety of `PostgresStore` (DESIGN §1.1): a child process writes
//! acknowledged batches as fast as it can while this test kills it with
//! SIGKILL at random moments; every third round the PostgreSQL server is
//! crashed too (`pg_ctl -m immediate`, no shutdown checkpoint, so the next
//! start runs crash recovery from the fsynced WAL) while the child is still
//! writing. After every kill the store is reopened and checked: every batch
//! the child reported as acknowledged is present exactly once, no batch is
//! half written, and retrying an acknowledged batch is a duplicate.
//!
//! The child is this same test binary, re-executed with `COURIER_CRASH_CHILD`
//! set to the connection string and a filter selecting this test.

#[path = "support/pg.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use courier::store::postgres::PostgresStore;
use courier::store::{
    ClientTxnKey, DeviceTarget, NewInboxMessage, NewOutboxEdu, SendBatch, SendOutcome, Store,
};

const CHILD_ENV: &str = "COURIER_CRASH_CHILD";
const TEST_NAME: &str = "kill9_loses_no_acknowledged_write_on_postgres";
const USER: &str = "@crash:local.test";
const DEVICES: [&str; 3] = ["D0", "D1", "D2"];
const DESTINATION: &str = "remote.test";
/// Inbox rows per device per batch: one addressed to the device, one `*`.
const ROWS_PER_DEVICE: usize = 2;
const EDUS_PER_BATCH: usize = 2;
const ROUNDS: usize = 24;
const WRITER_TASKS: usize = 8;

fn batch(txn_id: &str) -> SendBatch {
    let content = |part: usize| format!("{{\"txn\":\"{txn_id}\",\"part\":{part}}}");
    let mut local: Vec<NewInboxMessage> = DEVICES
        .iter()
        .enumerate()
        .map(|(part, device)| NewInboxMessage {
            user_id: USER.to_owned(),
            device: DeviceTarget::One((*device).to_owned()),
            sender: USER.to_owned(),
            event_type: "m.crash".to_owned(),
            content_json: content(part),
        })
        .collect();
    local.push(NewInboxMessage {
        user_id: USER.to_owned(),
        device: DeviceTarget::All,
        sender: USER.to_owned(),
        event_type: "m.crash".to_owned(),
        content_json: content(99),
    });
    let remote = (0..EDUS_PER_BATCH)
        .map(|part| NewOutboxEdu {
            destination: DESTINATION.to_owned(),
            edu_json: format!(
                "{{\"edu_type\":\"m.direct_to_device\",\"content\":{}}}",
                content(part)
            ),
            message_count: 1,
        })
        .collect();
    SendBatch {
        txn: ClientTxnKey {
            user_id: USER.to_owned(),
            device_id: "CRASHER".to_owned(),
            event_type: "m.crash".to_owned(),
            txn_id: txn_id.to_owned(),
        },
        local,
        remote,
        now_ms: courier::now_ms(),
    }
}

fn txn_of(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("stored JSON");
    let txn = v
        .get("content")
        .and_then(|c| c.get("txn"))
        .or_else(|| v.get("txn"))
        .and_then(|t| t.as_str())
        .expect("row names its txn");
    txn.to_owned()
}

/// The child: writes batches from several tasks until killed. A failed
/// write (the server was crashed under it) ends that task quietly: only
/// acknowledged writes are promised.
fn child_main(conninfo: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("child runtime");
    runtime.block_on(async {
        let store = Arc::new(PostgresStore::open(conninfo).await.expect("child open"));
        for device in DEVICES {
            store
                .upsert_device(USER, device, None)
                .await
                .expect("child device");
        }
        let pid = std::process::id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tasks = Vec::new();
        for task in 0..WRITER_TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let txn_id = format!("{pid}-{task}-{n}");
                    n += 1;
                    match store.enqueue_send(batch(&txn_id)).await {
                        Ok(SendOutcome::Accepted { .. }) => {
                            let mut out = std::io::stdout().lock();
                            if writeln!(out, "ack {txn_id}")
                                .and_then(|()| out.flush())
                                .is_err()
                            {
                                std::process::exit(0);
                            }
                        }
                        Ok(SendOutcome::Duplicate) => panic!("fresh txn {txn_id} was a duplicate"),
                        Err(_) => return,
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Writes failed (the server is down): wait for the kill, as a
        // process that would retry later would.
        tokio::time::sleep_until((deadline + Duration::from_secs(30)).into()).await;
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
    let exe = std::env::current_exe().expect("test binary path");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let conninfo = runtime.block_on(cluster.fresh_database());
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut kills_mid_write = 0;
    let mut server_crashes = 0;

    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &conninfo)
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
        // during connect or migration), plus a random extra delay.
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
        let crash_server = round % 3 == 1;
        if crash_server {
            // The server dies first, with the child's commits in flight.
            cluster.crash_server();
            server_crashes += 1;
        }
        child.kill().expect("SIGKILL child");
        let status = child.wait().expect("reap child");
        assert!(!status.success(), "child must die by the signal");
        reader.join().expect("reader thread");
        for line in line_rx.try_iter() {
            if let Some(txn) = line.strip_prefix("ack ") {
                round_acks.push(txn.to_owned());
            }
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
    let mut inbox: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for device in DEVICES {
        let page = store
            .fetch_inbox(USER, device, 0, u32::MAX - 1)
            .await
            .expect("fetch");
        assert!(!page.more);
        assert!(
            page.messages
                .windows(2)
                .all(|w| w[0].stream_id < w[1].stream_id)
        );
        for m in &page.messages {
            *inbox
                .entry(txn_of(&m.content_json))
                .or_default()
                .entry(device)
                .or_default() += 1;
        }
    }
    let mut outbox: BTreeMap<String, usize> = BTreeMap::new();
    for edu in store
        .peek_outbox(DESTINATION, u32::MAX, u64::MAX)
        .await
        .expect("peek")
    {
        *outbox.entry(txn_of(&edu.edu_json)).or_default() += 1;
    }
    // All or nothing: every batch that is visible at all is complete.
    for (txn, per_device) in &inbox {
        for device in DEVICES {
            assert_eq!(
                per_device.get(device).copied().unwrap_or(0),
                ROWS_PER_DEVICE,
                "txn {txn} device {device}: half-written batch"
            );
        }
        assert_eq!(
            outbox.get(txn).copied(),
            Some(EDUS_PER_BATCH),
            "txn {txn}: inbox rows without their outbox rows"
        );
    }
    for txn in outbox.keys() {
        assert!(
            inbox.contains_key(txn),
            "txn {txn}: outbox rows without inbox rows"
        );
    }
    // Nothing acknowledged is lost (and by the counts above, none doubled).
    for txn in acked {
        assert!(inbox.contains_key(txn), "acknowledged txn {txn} lost");
    }
    // Retrying acknowledged batches is a duplicate and writes nothing.
    let sample: Vec<&String> = round_acks.iter().rev().take(16).collect();
    for txn in &sample {
        assert_eq!(
            store.enqueue_send(batch(txn)).await.expect("retry"),
            SendOutcome::Duplicate,
            "retried acknowledged txn {txn}"
        );
    }
    store.close().await.expect("close");
}
