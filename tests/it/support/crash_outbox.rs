//! The kill -9 test of the sender's store step, `Store::advance` (ack the
//! transaction in flight, record the next one, in one commit), shared by
//! both backends. A child process enqueues single-message EDUs for one
//! destination while a second task runs the sender's pipeline against the
//! store alone (no network: each recorded transaction is taken as
//! delivered at once), printing every committed enqueue and every
//! committed step. After each kill the parent reopens the store and checks
//! that no acknowledged row was lost or reordered, that only rows of
//! acknowledged transactions were deleted, and that the recorded
//! transaction (if any) is the last one reported or its successor, holds
//! the first queued rows, and has exactly the bytes its rows build.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::store::{
    ClientTxnKey, InFlightTxn, NewOutboxEdu, NextTxn, OutboxEdu, SendBatch, SendOutcome, Store,
};

pub const DESTINATION: &str = "pipeline.test";
const WORKER: &str = "crash-pipeline";

/// The body the child records for `rows`: a JSON array of their EDUs (the
/// record names the rows; reading it back puts them in).
fn build(rows: &mut [OutboxEdu]) -> String {
    let edus: Vec<&str> = rows.iter().map(|r| r.edu_json.as_str()).collect();
    format!("[{}]", edus.join(","))
}

fn edu_json(n: u64) -> String {
    format!("{{\"content\":{{\"n\":{n}}},\"edu_type\":\"m.direct_to_device\"}}")
}

fn n_of(edu_json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(edu_json).expect("stored EDU");
    v["content"]["n"].as_u64().expect("EDU names its n")
}

fn say(line: &str) {
    say_raw(&format!("ack {line}"));
}

fn say_raw(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        // The parent is gone.
        std::process::exit(0);
    }
}

/// The child: enqueues and advances for `run_for`, printing `ack q <n>`
/// after each committed enqueue, `ack r <txn> <n,…>` for a transaction an
/// earlier child left recorded, and `ack a <acked|-> <recorded|-> <n,…>`
/// after each committed step. With `tolerate_failures` a failed write ends
/// the task quietly (the server may be crashed under it).
pub async fn pipeline_until_killed(
    store: Arc<dyn Store>,
    run_for: Duration,
    tolerate_failures: bool,
) {
    // libtest has printed `test <name> ... ` without a newline (the child
    // runs with --nocapture): end that line, so the first report is a line
    // of its own.
    say_raw("");
    let deadline = Instant::now() + run_for;
    let pid = std::process::id();
    let enqueuer = {
        let store = store.clone();
        tokio::spawn(async move {
            // Increasing over every child of the test, which run one after
            // another: the microsecond clock, never repeated.
            let mut last = 0u64;
            while Instant::now() < deadline {
                let micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_micros();
                let n = u64::try_from(micros).expect("fits").max(last + 1);
                last = n;
                let batch = SendBatch {
                    txn: ClientTxnKey {
                        user_id: "@crash:local.test".to_owned(),
                        device_id: "PIPE".to_owned(),
                        event_type: "m.crash".to_owned(),
                        txn_id: format!("{pid}-{n}"),
                    },
                    local: vec![],
                    remote: vec![NewOutboxEdu {
                        destination: DESTINATION.to_owned(),
                        edu_json: edu_json(n),
                        message_count: 1,
                    }],
                    now_ms: courier::clock::now_ms(),
                };
                match store.enqueue_send(batch).await {
                    Ok(SendOutcome::Accepted { .. }) => say(&format!("q {n}")),
                    Ok(SendOutcome::Duplicate) => panic!("fresh send {n} was a duplicate"),
                    Err(_) if tolerate_failures => return,
                    Err(e) => panic!("enqueue failed: {e}"),
                }
            }
        })
    };
    let sender = tokio::spawn(async move {
        let now = courier::clock::now_ms();
        let fence = match store.acquire_lease(WORKER, DESTINATION, now, 600_000).await {
            Ok(Some(fence)) => fence,
            Ok(None) => panic!("the child's lease is held by another worker"),
            Err(_) if tolerate_failures => return,
            Err(e) => panic!("lease: {e}"),
        };
        // A transaction recorded by the last child is resent first.
        let mut current = match store.in_flight(DESTINATION).await {
            Ok(txn) => txn,
            Err(_) if tolerate_failures => return,
            Err(e) => panic!("in flight: {e}"),
        };
        if let Some(txn) = &current {
            let ns = ns_of_body(&txn.body);
            let ns: Vec<String> = ns.iter().map(u64::to_string).collect();
            say(&format!("r {} {}", txn.txn_id, ns.join(",")));
        }
        let mut counter = 0u64;
        while Instant::now() < deadline {
            counter += 1;
            let next = NextTxn::around(
                &format!("{pid}-{counter:08}"),
                rand::random_range(1..8),
                u64::MAX,
                "[",
                "]",
            );
            let acked = current
                .as_ref()
                .map(|t| (t.txn_id.as_str(), courier::clock::now_ms()));
            match store.advance(&fence, DESTINATION, acked, next).await {
                Ok(recorded) => {
                    let ns = recorded
                        .as_ref()
                        .map(|t| ns_of_body(&t.body))
                        .unwrap_or_default();
                    say(&format!(
                        "a {} {} {}",
                        current.as_ref().map_or("-", |t| t.txn_id.as_str()),
                        recorded.as_ref().map_or("-", |t| t.txn_id.as_str()),
                        ns.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
                    ));
                    if recorded.is_none() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    current = recorded;
                }
                Err(_) if tolerate_failures => return,
                Err(e) => panic!("advance failed: {e}"),
            }
        }
    });
    let (a, b) = (enqueuer.await, sender.await);
    assert!(
        tolerate_failures || (a.is_ok() && b.is_ok()),
        "child task failed"
    );
    if tolerate_failures {
        tokio::time::sleep_until((deadline + Duration::from_secs(30)).into()).await;
    }
}

fn ns_of_body(body: &str) -> Vec<u64> {
    let edus: Vec<serde_json::Value> = serde_json::from_str(body).expect("a recorded body");
    edus.iter()
        .map(|edu| edu["content"]["n"].as_u64().expect("EDU names its n"))
        .collect()
}

/// What the children reported, over every round.
#[derive(Default)]
pub struct Ledger {
    /// Every committed enqueue.
    enqueued: BTreeSet<u64>,
    /// Every reported recorded transaction's rows.
    recorded: BTreeMap<String, Vec<u64>>,
    /// Transactions reported acknowledged.
    acked: BTreeSet<String>,
    /// The last transaction reported recorded (`None` after a step that
    /// recorded nothing).
    last: Option<String>,
    pub steps: usize,
    lines: Vec<String>,
}

impl Ledger {
    /// Takes one round's `ack …` lines (as `crash::kill_round` returns
    /// them, prefix stripped).
    pub fn take(&mut self, lines: &[String]) {
        self.lines.extend(lines.iter().cloned());
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["q", n] => {
                    self.enqueued.insert(n.parse().expect("n"));
                }
                ["r", resumed, ns] => {
                    let ns = ns
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse().expect("n"))
                        .collect();
                    self.recorded.insert((*resumed).to_owned(), ns);
                    self.last = Some((*resumed).to_owned());
                }
                ["a", acked, recorded, ns] => {
                    self.steps += 1;
                    if *acked != "-" {
                        self.acked.insert((*acked).to_owned());
                    }
                    if *recorded == "-" {
                        self.last = None;
                    } else {
                        let ns = ns
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(|s| s.parse().expect("n"))
                            .collect();
                        self.recorded.insert((*recorded).to_owned(), ns);
                        self.last = Some((*recorded).to_owned());
                    }
                }
                other => panic!("unexpected child line {other:?}"),
            }
        }
    }

    /// Checks the reopened store against everything reported so far.
    pub async fn check(&self, store: &dyn Store) {
        let queued = store
            .peek_outbox(DESTINATION, u32::MAX, u64::MAX)
            .await
            .expect("peek");
        let queued_ns: Vec<u64> = queued.iter().map(|e| n_of(&e.edu_json)).collect();
        assert!(
            queued_ns.windows(2).all(|w| w[0] < w[1]),
            "queued rows out of order: {queued_ns:?}"
        );
        let still: BTreeSet<u64> = queued_ns.iter().copied().collect();
        let first_queued = queued_ns.first().copied().unwrap_or(u64::MAX);
        let in_any_recorded: BTreeSet<u64> = self.recorded.values().flatten().copied().collect();
        for &n in &self.enqueued {
            if !still.contains(&n) {
                assert!(
                    in_any_recorded.contains(&n),
                    "row {n} was deleted but no reported transaction carried it"
                );
                assert!(
                    n < first_queued,
                    "row {n} deleted ahead of row {first_queued}"
                );
            }
        }
        for id in &self.acked {
            let rows = self.recorded.get(id).unwrap_or_else(|| {
                let seen: Vec<&String> = self
                    .lines
                    .iter()
                    .filter(|l| l.contains(id.as_str()))
                    .collect();
                panic!("{id} acknowledged but never reported recorded: {seen:?}")
            });
            for n in rows {
                assert!(
                    !still.contains(n),
                    "row {n} of acknowledged {id} still queued"
                );
            }
        }
        let in_flight = store.in_flight(DESTINATION).await.expect("in flight");
        let last_acked = self
            .last
            .as_ref()
            .is_some_and(|id| self.recorded[id].iter().all(|n| !still.contains(n)));
        match (&in_flight, &self.last) {
            (Some(txn), Some(last)) if &txn.txn_id == last => {
                assert_eq!(
                    ns_of_body(&txn.body),
                    self.recorded[last],
                    "record of {last}"
                );
            }
            // The step after the last report committed unseen: the last
            // transaction was acknowledged and its successor recorded.
            (Some(txn), _) => assert!(
                self.last.is_none() || last_acked,
                "recorded {} while {:?} is still unacknowledged",
                txn.txn_id,
                self.last
            ),
            (None, Some(last)) => assert!(
                last_acked,
                "reported record {last} vanished without its rows being acknowledged"
            ),
            (None, None) => {}
        }
        if let Some(txn) = &in_flight {
            check_record(txn, &queued);
        }
    }
}

/// A record holds the first queued rows, with the bytes they build.
fn check_record(txn: &InFlightTxn, queued: &[OutboxEdu]) {
    assert!(!txn.seqs.is_empty(), "empty record {}", txn.txn_id);
    let head: Vec<i64> = queued.iter().take(txn.seqs.len()).map(|e| e.seq).collect();
    assert_eq!(
        txn.seqs, head,
        "record {} is not the queue's head",
        txn.txn_id
    );
    let mut rows = queued[..txn.seqs.len()].to_vec();
    assert_eq!(txn.body, build(&mut rows), "record {} bytes", txn.txn_id);
}
