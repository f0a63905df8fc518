//! Runs the backend-generic store conformance suite
//! (`tests/it/support/store_suite/`) against `SqliteStore`, plus the few
//! checks only SQLite can make (schema version, reopen, orphan rows written
//! behind the store's back, group commit actually grouping).

use crate::support::store_suite;

use std::sync::Arc;

use courier::store::sqlite::SqliteStore;
use courier::store::{Retention, SendBatch, SendOutcome, Store};

async fn make_sqlite() -> store_suite::Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nested/dir/courier.db");
    let store = SqliteStore::open(&path).await.expect("open sqlite store");
    store_suite::Harness {
        store: Arc::new(store),
        _guard: Box::new(dir),
        reopen: Box::new(move || {
            let path = path.clone();
            Box::pin(async move {
                let store = SqliteStore::open(&path).await.expect("reopen");
                Arc::new(store) as Arc<dyn courier::store::Store>
            })
        }),
    }
}

store_conformance_tests!(make_sqlite);
store_key_conformance_tests!(make_sqlite);
store_device_list_conformance_tests!(make_sqlite);

use store_suite::send;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_version_is_recorded_and_tokens_are_hashed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("courier.db");
    let store = SqliteStore::open(&path).await.expect("open");
    store
        .upsert_device("@a:x", "A", Some("secret-token"))
        .await
        .expect("device");
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    let version: u32 = conn
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(
        version,
        crate::support::migration_files("sqlite")
            .last()
            .copied()
            .unwrap_or(0)
    );
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal mode");
    assert_eq!(mode, "wal");
    let hash: String = conn
        .query_row("SELECT token_hash FROM access_tokens", [], |r| r.get(0))
        .expect("hash");
    assert_eq!(hash, courier::store::hash_token("secret-token"));
    assert_eq!(hash.len(), 64);
    assert!(!hash.contains("secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_orphan_inbox_rows_in_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("courier.db");
    let store = SqliteStore::open(&path).await.expect("open");
    store
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    store
        .enqueue_send(send("t1", "@a:x", "A", 1))
        .await
        .expect("send");
    {
        // Rows left behind by an older version or a manual device removal.
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        for _ in 0..3 {
            conn.execute(
                "INSERT INTO device_inbox (user_id, device_id, sender, event_type, content_json)
                 VALUES ('@gone:x', 'G', '@s:x', 'm.test', '{}')",
                [],
            )
            .expect("insert orphan");
        }
    }
    let first = store.prune(0, Retention::DEFAULT, 2).await.expect("prune");
    assert_eq!(first.orphan_inbox_rows, 2);
    let second = store.prune(0, Retention::DEFAULT, 2).await.expect("prune");
    assert_eq!(second.orphan_inbox_rows, 1);
    let page = store.fetch_inbox("@a:x", "A", 0, 10).await.expect("fetch");
    assert_eq!(page.messages.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("courier.db"))
        .await
        .expect("open");
    store
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    let before = store.commit_count();
    let mut handles = Vec::new();
    for i in 0..200u32 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store
                .enqueue_send(send(&format!("t{i}"), "@a:x", "A", i))
                .await
        }));
    }
    for h in handles {
        h.await.expect("task").expect("send");
    }
    let commits = store.commit_count() - before;
    assert!(commits >= 1);
    // 200 concurrent writers must not need 200 fsyncs.
    assert!(commits < 200, "commits: {commits}");
    let page = store
        .fetch_inbox("@a:x", "A", 0, 1000)
        .await
        .expect("fetch");
    assert_eq!(page.messages.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_rolls_back_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("courier.db"))
        .await
        .expect("open");
    store
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    let txn = courier::store::InFlightTxn {
        destination: "d.test".to_owned(),
        txn_id: "x1".to_owned(),
        seqs: vec![],
        body: "{}".to_owned(),
    };
    store
        .begin_txn(
            &crate::support::lease_fence(&store, &txn.destination).await,
            txn.clone(),
        )
        .await
        .expect("begin");
    // Many writes in flight together, one of which fails (second begin).
    let mut handles = Vec::new();
    for i in 0..50u32 {
        let store = store.clone();
        let txn = txn.clone();
        handles.push(tokio::spawn(async move {
            if i == 25 {
                store
                    .begin_txn(
                        &crate::support::lease_fence(&store, &txn.destination).await,
                        txn,
                    )
                    .await
                    .map(|_| false)
            } else {
                store
                    .enqueue_send(send(&format!("t{i}"), "@a:x", "A", i))
                    .await
                    .map(|_| true)
            }
        }));
    }
    let mut ok = 0;
    let mut failed = 0;
    for h in handles {
        match h.await.expect("task") {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    assert_eq!((ok, failed), (49, 1));
    let page = store
        .fetch_inbox("@a:x", "A", 0, 1000)
        .await
        .expect("fetch");
    assert_eq!(page.messages.len(), 49);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_fetches_stay_off_the_writer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("courier.db"))
        .await
        .expect("open");
    store
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    store
        .enqueue_send(send("t1", "@a:x", "A", 1))
        .await
        .expect("send");
    let page = store.fetch_inbox("@a:x", "A", 0, 10).await.expect("fetch");
    let before = store.write_count();
    // Re-reading without acknowledging anything needs no write.
    store.fetch_inbox("@a:x", "A", 0, 10).await.expect("fetch");
    assert_eq!(store.write_count(), before);
    // The acknowledgement is one write...
    store
        .fetch_inbox("@a:x", "A", page.next_batch, 10)
        .await
        .expect("ack");
    assert_eq!(store.write_count(), before + 1);
    // ...and the idle long-poll after it none.
    for _ in 0..5 {
        store
            .fetch_inbox("@a:x", "A", page.next_batch, 10)
            .await
            .expect("idle");
    }
    assert_eq!(store.write_count(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_scan_is_bounded_and_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("courier.db");
    let store = SqliteStore::open(&path).await.expect("open");
    store
        .upsert_device("@a:x", "A", None)
        .await
        .expect("device");
    {
        let mut conn = rusqlite::Connection::open(&path).expect("raw open");
        let tx = conn.transaction().expect("tx");
        // 12,000 live rows, then 5 orphans: more than one scan window.
        for (user, device, n) in [("@a:x", "A", 12_000), ("@gone:x", "G", 5)] {
            for _ in 0..n {
                tx.execute(
                    "INSERT INTO device_inbox (user_id, device_id, sender, event_type, content_json)
                     VALUES (?1, ?2, '@s:x', 'm.test', '{}')",
                    (user, device),
                )
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let passes: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let report = store
                .prune(0, Retention::DEFAULT, 100)
                .await
                .expect("prune");
            v.push(report.orphan_inbox_rows);
        }
        v
    };
    // The first window holds only live rows; the second finds the orphans;
    // then the scan wraps around and finds nothing more.
    assert_eq!(passes, vec![0, 5, 0, 0]);
    let page = store
        .fetch_inbox("@a:x", "A", 0, 20_000)
        .await
        .expect("fetch");
    assert_eq!(page.messages.len(), 12_000);
}

/// F4 through the periodic task itself: with 12,000 expired client txns
/// and 50,000 expired message ids (batch 5,000), the pruner's first pass,
/// run at start, leaves nothing expired. The interval is an hour, so no
/// second pass can have helped; the test polls (bounded) for the last
/// message id to be forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pruner_task_clears_a_backlog_in_its_first_pass() {
    use courier::store::pruner::Pruner;
    use courier::store::{ClientTxnKey, InboundEdu, InboundOutcome, InboundTxn};
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("courier.db"))
            .await
            .expect("open"),
    );
    // Received "long ago" (2023), against the pruner's wall clock.
    const THEN: i64 = 1_700_000_000_000;
    let txn = |i: u32| SendBatch {
        txn: ClientTxnKey {
            user_id: "@a:x".to_owned(),
            device_id: "D".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: format!("old-{i}"),
        },
        local: vec![],
        remote: vec![],
        now_ms: THEN,
    };
    let mut writers = Vec::new();
    for w in 0..16u32 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in (w..12_000).step_by(16) {
                store.enqueue_send(txn(i)).await.expect("send");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let inbound = |txn_id: &str, ids: std::ops::Range<u32>, now_ms: i64| InboundTxn {
        origin: "remote.test".to_owned(),
        txn_id: txn_id.to_owned(),
        response_json: "{}".to_owned(),
        edus: ids
            .map(|i| InboundEdu {
                message_id: format!("mid-{i}"),
                messages: vec![],
            })
            .collect(),
        now_ms,
    };
    store
        .apply_inbound_txn(inbound("in-0", 0..50_000, THEN))
        .await
        .expect("apply");
    let config = courier::config::PruneConfig {
        batch: 5_000,
        interval: Duration::from_secs(3600),
        destination_retention: Duration::from_secs(30 * 24 * 3600),
        trace_retention: Duration::from_secs(7 * 24 * 3600),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let pruner = tokio::spawn(Pruner::new(store.clone(), &config).run(shutdown.clone()));
    // The last message id written is the last one deleted (rowid order).
    // Each probe is a new inbound txn carrying it, received now: a
    // duplicate while it is still stored; once forgotten, the probe's own
    // fresh record (not expired) replaces it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for probe in 1.. {
        let outcome = store
            .apply_inbound_txn(inbound(
                &format!("probe-{probe}"),
                49_999..50_000,
                courier::clock::now_ms(),
            ))
            .await
            .expect("probe");
        match outcome {
            InboundOutcome::Accepted {
                duplicate_message_ids: 0,
                ..
            } => break,
            InboundOutcome::Accepted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first pass did not reach the last message id"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let later = THEN + Retention::DEFAULT.inbound_message_id_ms + 1;
    // The probe stops at the last message id, which the pass deletes one
    // batch before the last of the in-0 trace journal rows (those come
    // after the EDUs' rows), so the journal is not compared here; its
    // pruning has its own suite case.
    let left = store
        .prune(later, Retention::DEFAULT, 100_000)
        .await
        .expect("prune");
    assert_eq!(
        courier::store::PruneReport {
            trace_events: 0,
            ..left
        },
        Default::default(),
        "the first pass left expired rows behind"
    );
    assert!(
        matches!(
            store.enqueue_send(txn(11_999)).await.expect("send"),
            SendOutcome::Accepted { .. }
        ),
        "an expired txn key is forgotten"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), pruner)
        .await
        .expect("the pruner stops on shutdown")
        .expect("pruner task");
}

/// The retention rules' `expired` journal row (`sqlite::trace::record_expired`,
/// here through its own write) shows in the message's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_shows_in_its_trace() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("courier.db"))
        .await
        .expect("open");
    store
        .record_expired(
            "EXP1",
            "inbox of @a:x/A",
            "m.room_key_request older than 7 days",
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
    assert_eq!(end.place.as_deref(), Some("inbox of @a:x/A"));
    assert_eq!(
        end.reason.as_deref(),
        Some("m.room_key_request older than 7 days")
    );
    assert!(courier::trace::render_text(&report).contains(
        "expired 1970-01-01T00:00:01.000Z at inbox of @a:x/A: m.room_key_request older than 7 days"
    ));
}

/// A transaction `advance` records names its rows: the record keeps the
/// envelope alone, not a second copy of the queued EDUs (SQLite's file
/// shows it; `in_flight` puts the body back together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advanced_record_holds_no_copy_of_its_edus() {
    use courier::store::{ClientTxnKey, NewOutboxEdu, NextTxn};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("courier.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let padding = "x".repeat(10_000);
    let remote = (0..5)
        .map(|n| NewOutboxEdu {
            destination: "d.test".to_owned(),
            edu_json: serde_json::json!({ "content": { "n": n, "pad": padding } }).to_string(),
            message_count: 1,
        })
        .collect();
    let batch = SendBatch {
        txn: ClientTxnKey {
            user_id: "@s:x".to_owned(),
            device_id: "S".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: "t".to_owned(),
        },
        local: vec![],
        remote,
        now_ms: courier::clock::now_ms(),
    };
    store.enqueue_send(batch).await.expect("enqueue");
    let fence = crate::support::lease_fence(&store, "d.test").await;
    let next = NextTxn::around("tx", 100, u64::MAX, "{\"edus\":[", "],\"pdus\":[]}");
    let recorded = store
        .advance(&fence, "d.test", None, next)
        .await
        .expect("advance")
        .expect("recorded");
    assert!(recorded.body.len() > 50_000);
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    let (stored, edus_at): (i64, i64) = conn
        .query_row("SELECT length(body), edus_at FROM outbox_txn", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("the record");
    assert_eq!((stored, edus_at), (21, 9), "the envelope and the offset");
    assert_eq!(
        store.in_flight("d.test").await.expect("in flight"),
        Some(recorded)
    );
}
