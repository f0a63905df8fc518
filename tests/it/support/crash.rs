//! The kill -9 crash test shared by every store backend (DESIGN §1.1): the
//! batches a child process writes until it is killed, the writer loop that
//! reports each acknowledged batch on stdout, and the check run after every
//! kill (every acknowledged batch present exactly once, none half written,
//! a retried acknowledged batch a duplicate), and one kill round of the
//! parent. Each backend's test module owns only how the store is opened and
//! what else happens around the kill.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use courier::store::{
    ClientTxnKey, DeviceTarget, NewInboxMessage, NewOutboxEdu, SendBatch, SendOutcome, Store,
};

pub const USER: &str = "@crash:local.test";
pub const DEVICES: [&str; 3] = ["D0", "D1", "D2"];
pub const DESTINATION: &str = "remote.test";
/// Inbox rows per device per batch: one addressed to the device, one `*`.
pub const ROWS_PER_DEVICE: usize = 2;
pub const EDUS_PER_BATCH: usize = 2;
pub const ROUNDS: usize = 24;
pub const WRITER_TASKS: usize = 8;

pub fn batch(txn_id: &str) -> SendBatch {
    let content = |part: usize| format!("{{\"txn\":\"{txn_id}\",\"part\":{part}}}");
    let mut local: Vec<NewInboxMessage> = DEVICES
        .iter()
        .enumerate()
        .map(|(part, device)| NewInboxMessage {
            user_id: USER.to_owned(),
            device: DeviceTarget::One((*device).to_owned()),
            message_id: format!("{txn_id}-{part}"),
            sender: USER.to_owned(),
            event_type: "m.crash".to_owned(),
            content_json: content(part),
        })
        .collect();
    local.push(NewInboxMessage {
        user_id: USER.to_owned(),
        device: DeviceTarget::All,
        message_id: format!("{txn_id}-all"),
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
        now_ms: courier::clock::now_ms(),
    }
}

pub fn txn_of(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).expect("stored JSON");
    let txn = v
        .get("content")
        .and_then(|c| c.get("txn"))
        .or_else(|| v.get("txn"))
        .and_then(|t| t.as_str())
        .expect("row names its txn");
    txn.to_owned()
}

/// The child's work: writes batches from several tasks for `run_for`,
/// printing `ack <txn>` (flushed) after each acknowledged one. With
/// `tolerate_failures` (the server may be crashed under it) a failed write
/// ends that task quietly: only acknowledged writes are promised.
pub async fn write_until_killed(store: Arc<dyn Store>, run_for: Duration, tolerate_failures: bool) {
    for device in DEVICES {
        store
            .upsert_device(USER, device, None)
            .await
            .expect("child device");
    }
    let pid = std::process::id();
    let deadline = Instant::now() + run_for;
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
                            // The parent is gone.
                            std::process::exit(0);
                        }
                    }
                    Ok(SendOutcome::Duplicate) => panic!("fresh txn {txn_id} was a duplicate"),
                    Err(_) if tolerate_failures => return,
                    Err(e) => panic!("child write failed: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        let joined = t.await;
        assert!(tolerate_failures || joined.is_ok(), "child task failed");
    }
    if tolerate_failures {
        // Writes failed (the server is down): wait for the kill, as a
        // process that would retry later would.
        tokio::time::sleep_until((deadline + Duration::from_secs(30)).into()).await;
    }
}

/// Rows per txn per device in the inbox, and outbox rows per txn.
type Snapshot = (
    BTreeMap<String, BTreeMap<&'static str, usize>>,
    BTreeMap<String, usize>,
);

async fn read_snapshot(store: &dyn Store) -> Snapshot {
    let mut inbox: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
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
    (inbox, outbox)
}

/// All or nothing: every batch that is visible at all is complete.
fn all_or_nothing((inbox, outbox): &Snapshot) -> Result<(), String> {
    for (txn, per_device) in inbox {
        for device in DEVICES {
            let rows = per_device.get(device).copied().unwrap_or(0);
            if rows != ROWS_PER_DEVICE {
                return Err(format!(
                    "txn {txn} device {device}: half-written batch ({rows} rows, not {ROWS_PER_DEVICE})"
                ));
            }
        }
        if outbox.get(txn).copied() != Some(EDUS_PER_BATCH) {
            return Err(format!("txn {txn}: inbox rows without their outbox rows"));
        }
    }
    for txn in outbox.keys() {
        if !inbox.contains_key(txn) {
            return Err(format!("txn {txn}: outbox rows without inbox rows"));
        }
    }
    Ok(())
}

/// Checks a reopened store against the batches acknowledged so far.
///
/// The snapshot is read with one query per device, so it is not one
/// point in time. On PostgreSQL a COMMIT the killed child sent just before
/// it died is still carried out by its server backend, possibly between
/// two of those reads: the batch then looks half-written although every
/// committed state is whole. So an incomplete snapshot is read again, for
/// up to 5 s; a batch that is really half-written stays so and fails.
pub async fn verify(store: &dyn Store, acked: &BTreeSet<String>, round_acks: &[String]) {
    let mut snapshot = read_snapshot(store).await;
    for _ in 0..10 {
        if all_or_nothing(&snapshot).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        snapshot = read_snapshot(store).await;
    }
    if let Err(problem) = all_or_nothing(&snapshot) {
        panic!("{problem}");
    }
    let (inbox, _outbox) = snapshot;
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
}

/// One kill round of the parent: re-executes this test binary as the
/// writing child (`test_name`, from `child::exact_test_name`, selected, `env` set so it knows it is the
/// child), waits for a random number of acknowledged batches (none every
/// sixth round: the kill then lands during open or migration), lets it run
/// a random moment longer, calls `before_kill`, kills it with SIGKILL and
/// returns every batch it acknowledged before dying.
pub fn kill_round(
    test_name: &str,
    env: (&str, &OsStr),
    round: usize,
    before_kill: impl FnOnce(),
) -> Vec<String> {
    let mut child = super::child::command(test_name)
        .env(env.0, env.1)
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
    let target: usize = if round.is_multiple_of(6) {
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
    before_kill();
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
    round_acks
}
