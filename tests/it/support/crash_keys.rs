//! The kill -9 crash test of one-time-key claims, shared by every store
//! backend (DESIGN §7: no key is handed out twice, whatever the crashes): a
//! child process claims one key at a time from several tasks and prints
//! `ack <key_id>` (flushed) only after the claim future resolved, i.e.
//! after the commit; the parent kills it at random moments
//! (`crash::kill_round`), and between rounds checks that no key was printed
//! twice, that a printed key uploaded again is not stored again, and at
//! the end claims every key left: none of them was printed before.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::store::Store;
use courier::store::keys::{ClaimWanted, KeysUpload, NewKey, UploadOutcome};

pub const USER: &str = "@claims:local.test";
pub const DEVICE: &str = "CLAIMED";
const ALGORITHM: &str = "signed_curve25519";
const CLAIM_TASKS: usize = 4;
/// Keys kept available before each round: more than one round claims
/// (at most ~200 acknowledged before the kill, plus 20 ms more).
const LOW_WATER: u64 = 800;
const TOP_UP: usize = 1_200;

fn key(n: u64) -> NewKey {
    let key_id = format!("K{n:07}");
    NewKey {
        algorithm: ALGORITHM.to_owned(),
        key_json: format!("{{\"key\":\"value-{key_id}\"}}"),
        key_id,
    }
}

fn upload(keys: Vec<NewKey>) -> KeysUpload {
    KeysUpload {
        user_id: USER.to_owned(),
        device_id: DEVICE.to_owned(),
        device_keys: None,
        one_time_keys: keys,
        fallback_keys: vec![],
        now_ms: courier::clock::now_ms(),
    }
}

fn wanted() -> Vec<ClaimWanted> {
    vec![ClaimWanted {
        user_id: USER.to_owned(),
        device_id: DEVICE.to_owned(),
        algorithm: ALGORITHM.to_owned(),
    }]
}

async fn available(store: &dyn Store) -> u64 {
    store
        .key_counts(USER, DEVICE)
        .await
        .expect("counts")
        .one_time
        .get(ALGORITHM)
        .copied()
        .unwrap_or(0)
}

/// The parent's record of the run.
#[derive(Default)]
pub struct Ledger {
    /// The next key number to upload.
    next: u64,
    /// Every key printed by a child, with how often.
    printed: BTreeMap<String, usize>,
}

impl Ledger {
    /// Registers the device and uploads keys until at least `LOW_WATER`
    /// are available (the parent, between rounds).
    pub async fn top_up(&mut self, store: &dyn Store) {
        store
            .upsert_device(USER, DEVICE, None)
            .await
            .expect("device");
        if available(store).await >= LOW_WATER {
            return;
        }
        let keys: Vec<NewKey> = (self.next..self.next + TOP_UP as u64).map(key).collect();
        self.next += TOP_UP as u64;
        for chunk in keys.chunks(300) {
            let outcome = store
                .upload_keys(upload(chunk.to_vec()))
                .await
                .expect("upload");
            assert!(
                matches!(outcome, UploadOutcome::Stored { .. }),
                "{outcome:?}"
            );
        }
    }

    /// Records one round's printed keys and checks them: none printed
    /// before, and uploading them again stores nothing (their tombstones
    /// survived the kill).
    pub async fn check_round(&mut self, store: &dyn Store, round_keys: &[String]) {
        for k in round_keys {
            *self.printed.entry(k.clone()).or_default() += 1;
        }
        let twice: Vec<&String> = self
            .printed
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k)
            .collect();
        assert!(twice.is_empty(), "keys handed out twice: {twice:?}");
        let sample: Vec<NewKey> = round_keys
            .iter()
            .rev()
            .take(32)
            .map(|id| {
                let n: u64 = id[1..].parse().expect("key number");
                key(n)
            })
            .collect();
        if sample.is_empty() {
            return;
        }
        // On PostgreSQL a COMMIT the killed child sent just before it died
        // may still be carried out by its server backend, so the count may
        // drop meanwhile; it must never grow. (`claim_the_rest` then shows
        // that none of these keys is handed out again.)
        let before = available(store).await;
        let outcome = store.upload_keys(upload(sample)).await.expect("re-upload");
        assert!(
            matches!(outcome, UploadOutcome::Stored { .. }),
            "{outcome:?}"
        );
        let after = available(store).await;
        assert!(
            after <= before,
            "a claimed key uploaded again was stored again ({before} -> {after})"
        );
    }

    /// Claims every key left: none of them was printed by a child, and
    /// no key was handed out twice overall.
    pub async fn claim_the_rest(&self, store: &dyn Store) -> usize {
        let mut rest: BTreeSet<String> = BTreeSet::new();
        loop {
            let got = store
                .claim_keys(wanted(), courier::clock::now_ms())
                .await
                .expect("claim");
            let Some(k) = got.into_iter().next() else {
                break;
            };
            assert!(!k.fallback);
            assert!(
                !self.printed.contains_key(&k.key_id),
                "key {} handed out again after a kill",
                k.key_id
            );
            assert!(
                rest.insert(k.key_id.clone()),
                "key {} claimed twice",
                k.key_id
            );
        }
        assert_eq!(available(store).await, 0);
        assert!(
            self.printed.len() + rest.len() <= self.next as usize,
            "more keys handed out than uploaded"
        );
        assert!(!self.printed.is_empty(), "the children acknowledged claims");
        rest.len()
    }

    pub fn printed(&self) -> usize {
        self.printed.len()
    }
}

/// The child's work: claims from several tasks for `run_for`, printing
/// `ack <key_id>` after each claim resolved. With `tolerate_failures` (the
/// server may be crashed under it) a failed claim ends that task quietly.
pub async fn claim_until_killed(store: Arc<dyn Store>, run_for: Duration, tolerate_failures: bool) {
    let deadline = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for _ in 0..CLAIM_TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match store.claim_keys(wanted(), courier::clock::now_ms()).await {
                    Ok(got) => {
                        let mut out = std::io::stdout().lock();
                        for k in got {
                            if writeln!(out, "ack {}", k.key_id)
                                .and_then(|()| out.flush())
                                .is_err()
                            {
                                // The parent is gone.
                                std::process::exit(0);
                            }
                        }
                    }
                    Err(_) if tolerate_failures => return,
                    Err(e) => panic!("child claim failed: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        let joined = t.await;
        assert!(tolerate_failures || joined.is_ok(), "child task failed");
    }
    // Wait for the kill, as a process that would retry later would.
    tokio::time::sleep_until((deadline + Duration::from_secs(30)).into()).await;
}
