//! Fenced leases on `PostgresStore` (issue 18, SECURITY-REVIEW F15): every
//! claim of a destination gives its lease a higher epoch, renewal keeps it,
//! and each outbox write of a destination task (`begin_txn`, `ack_txn`,
//! `refuse_txn`, `quarantine_edu`, `set_retry_state`, `advance`) made under
//! a fence that another claim superseded changes nothing (rows, in-flight
//! record, quarantine, retry state) and fails with `StoreError::Fenced`,
//! while the current holder's writes go through.

use crate::support::pg;
use crate::support::store_suite::send;

use courier::store::postgres::PostgresStore;
use courier::store::{
    Fence, InFlightTxn, NewOutboxEdu, NextTxn, OutboxEdu, QuarantinedEdu, RetryState, SendBatch,
    Store, StoreError,
};

const LEASE: i64 = 10_000;
const T0: i64 = 1_000_000;

/// A client send queueing `count` EDUs for `destination`.
fn queue(txn_id: &str, destination: &str, count: u32) -> SendBatch {
    SendBatch {
        remote: (0..count)
            .map(|n| NewOutboxEdu {
                destination: destination.to_owned(),
                edu_json: format!(
                    "{{\"edu_type\":\"m.direct_to_device\",\"content\":{{\"n\":{n}}}}}"
                ),
                message_count: 1,
            })
            .collect(),
        local: vec![],
        ..send(txn_id, "@a:x", "A", 0)
    }
}

/// Everything a destination task's writes can change for `destination`.
#[derive(Debug, PartialEq)]
struct Snapshot {
    queued: Vec<OutboxEdu>,
    in_flight: Option<InFlightTxn>,
    quarantined: Vec<QuarantinedEdu>,
    retry: RetryState,
}

async fn snapshot(store: &PostgresStore, destination: &str) -> Snapshot {
    Snapshot {
        queued: store
            .peek_outbox(destination, 1000, u64::MAX)
            .await
            .expect("peek"),
        in_flight: store.in_flight(destination).await.expect("in flight"),
        quarantined: store
            .list_quarantined(Some(destination))
            .await
            .expect("quarantined"),
        retry: store.retry_state(destination).await.expect("retry state"),
    }
}

async fn acquire(store: &PostgresStore, worker: &str, destination: &str, now: i64) -> Fence {
    store
        .acquire_lease(worker, destination, now, LEASE)
        .await
        .expect("acquire")
        .unwrap_or_else(|| panic!("{worker} should get the lease on {destination}"))
}

fn assert_fenced(result: Result<(), StoreError>, what: &str, stale: &Fence) {
    match result {
        Err(StoreError::Fenced { worker, epoch, .. }) => {
            assert_eq!(
                (worker.as_str(), epoch),
                (stale.worker.as_str(), stale.epoch)
            );
        }
        other => panic!("{what} under a superseded fence: {other:?}, not Fenced"),
    }
}

/// A next transaction of every queued row, its body their EDUs.
fn body_of_rows(txn_id: &str) -> NextTxn {
    NextTxn::around(txn_id, 50, u64::MAX, "{\"edus\":[", "]}")
}

fn failing(failures: u32) -> RetryState {
    RetryState {
        failures,
        retry_after_ms: T0 + 60_000,
        last_success_ms: None,
        last_error: Some(format!("failure {failures}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_writes_change_nothing_once_another_worker_claimed() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    let conninfo = cluster.fresh_database().await;
    let store = PostgresStore::open(&conninfo).await.expect("open");
    const D: &str = "fenced.test";
    store.enqueue_send(queue("q1", D, 4)).await.expect("queue");
    let seqs: Vec<i64> = snapshot(&store, D)
        .await
        .queued
        .iter()
        .map(|e| e.seq)
        .collect();

    // w1 holds the lease, records a transaction and a failure.
    let stale = acquire(&store, "w1", D, T0).await;
    let txn = InFlightTxn {
        destination: D.to_owned(),
        txn_id: "t1".to_owned(),
        seqs: seqs[..2].to_vec(),
        body: "{\"edus\":[]}".to_owned(),
    };
    store
        .begin_txn(&stale, txn.clone())
        .await
        .expect("begin under the lease");
    store
        .set_retry_state(&stale, D, &failing(1))
        .await
        .expect("retry state under the lease");

    // w1 stalls past its lease; w2 claims the destination: a higher epoch.
    let current = acquire(&store, "w2", D, T0 + LEASE + 1).await;
    assert!(current.epoch > stale.epoch, "{current:?} after {stale:?}");
    let before = snapshot(&store, D).await;
    assert_eq!(before.in_flight.as_ref(), Some(&txn));

    // Every write w1 would make now changes nothing and says so.
    assert_fenced(store.ack_txn(&stale, D, "t1", T0).await, "ack_txn", &stale);
    assert_eq!(snapshot(&store, D).await, before, "after a stale ack");
    assert_fenced(
        store.refuse_txn(&stale, D, "t1").await,
        "refuse_txn",
        &stale,
    );
    assert_eq!(snapshot(&store, D).await, before, "after a stale refusal");
    assert_fenced(
        store.quarantine_edu(&stale, D, seqs[0], "stale", T0).await,
        "quarantine_edu",
        &stale,
    );
    assert_fenced(
        store.quarantine_edu(&stale, D, seqs[3], "stale", T0).await,
        "quarantine_edu",
        &stale,
    );
    assert_eq!(
        snapshot(&store, D).await,
        before,
        "after a stale quarantine"
    );
    assert_fenced(
        store.set_retry_state(&stale, D, &failing(7)).await,
        "set_retry_state",
        &stale,
    );
    assert_eq!(
        snapshot(&store, D).await,
        before,
        "after a stale retry state"
    );
    for acked in [Some(("t1", T0)), None] {
        assert_fenced(
            store
                .advance(&stale, D, acked, body_of_rows("t9"))
                .await
                .map(|_| ()),
            "advance",
            &stale,
        );
        assert_eq!(snapshot(&store, D).await, before, "after a stale advance");
    }

    // The holder's writes work: it resends and acks w1's transaction,
    // quarantines one row and records its own failure.
    store
        .ack_txn(&current, D, "t1", T0 + LEASE + 2)
        .await
        .expect("ack by the holder");
    let acked = snapshot(&store, D).await;
    assert_eq!(acked.in_flight, None);
    assert_eq!(
        acked.queued.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[2..].to_vec()
    );
    assert_eq!(acked.retry.failures, 0);
    store
        .quarantine_edu(&current, D, seqs[2], "refused", T0 + LEASE + 3)
        .await
        .expect("quarantine by the holder");
    store
        .set_retry_state(&current, D, &failing(2))
        .await
        .expect("retry state by the holder");
    let after = snapshot(&store, D).await;
    assert_eq!(
        after.quarantined.iter().map(|q| q.seq).collect::<Vec<_>>(),
        vec![seqs[2]]
    );
    assert_eq!(after.queued.len(), 1);
    assert_eq!(after.retry, failing(2));

    // begin_txn under the stale fence records nothing.
    assert_fenced(
        store
            .begin_txn(
                &stale,
                InFlightTxn {
                    txn_id: "t2".to_owned(),
                    seqs: vec![seqs[3]],
                    ..txn.clone()
                },
            )
            .await,
        "begin_txn",
        &stale,
    );
    assert_eq!(snapshot(&store, D).await, after, "after a stale begin_txn");
    store
        .begin_txn(
            &current,
            InFlightTxn {
                txn_id: "t3".to_owned(),
                seqs: vec![seqs[3]],
                ..txn
            },
        )
        .await
        .expect("begin by the holder");
    assert_eq!(
        store
            .in_flight(D)
            .await
            .expect("in flight")
            .map(|t| t.txn_id),
        Some("t3".to_owned())
    );
    // A fence of another destination's lease does not open this one.
    let elsewhere = acquire(&store, "w1", "other.test", T0 + LEASE + 1).await;
    assert_fenced(
        store.set_retry_state(&elsewhere, D, &failing(9)).await,
        "set_retry_state with another destination's fence",
        &elsewhere,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_grow_on_every_claim_and_stay_on_renewal() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    let conninfo = cluster.fresh_database().await;
    let store = PostgresStore::open(&conninfo).await.expect("open");
    const D: &str = "epochs.test";
    store.enqueue_send(queue("q1", D, 1)).await.expect("queue");

    // The lease loop's claim draws an epoch; the task's acquire_lease
    // extends that lease and learns the same epoch.
    let claimed = store
        .claim_destinations("w1", T0, LEASE, 10)
        .await
        .expect("claim");
    assert_eq!(claimed, [D]);
    let first = acquire(&store, "w1", D, T0 + 1).await;
    // Renewal (by the task or the lease loop) keeps it, and so does a
    // write made after the renewal.
    assert_eq!(acquire(&store, "w1", D, T0 + LEASE / 2).await, first);
    assert_eq!(
        store
            .renew_leases("w1", T0 + LEASE - 1, LEASE)
            .await
            .expect("renew"),
        1
    );
    assert_eq!(acquire(&store, "w1", D, T0 + LEASE).await, first);
    store
        .set_retry_state(&first, D, &failing(1))
        .await
        .expect("write after renewals");

    // A lapsed lease nobody claimed still admits its holder's writes.
    let lapsed = T0 + 3 * LEASE;
    store
        .set_retry_state(&first, D, &failing(2))
        .await
        .expect("write on a lapsed, unclaimed lease");

    // The holder's own claim after a lapse is a new epoch: its old fence
    // is dead too.
    let again = acquire(&store, "w1", D, lapsed).await;
    assert!(again.epoch > first.epoch, "{again:?} after {first:?}");
    assert_fenced(
        store.set_retry_state(&first, D, &failing(3)).await,
        "set_retry_state",
        &first,
    );

    // Released and claimed by another worker: higher again.
    store.release_leases("w1").await.expect("release");
    let taken = store
        .claim_destinations("w2", lapsed + 1, LEASE, 10)
        .await
        .expect("claim released");
    assert_eq!(taken, [D]);
    let second = acquire(&store, "w2", D, lapsed + 2).await;
    assert!(second.epoch > again.epoch, "{second:?} after {again:?}");
    assert_fenced(
        store.set_retry_state(&again, D, &failing(4)).await,
        "set_retry_state",
        &again,
    );

    // A destination with nothing pending loses its lease row once the
    // lease lapses; the next claim still gets a higher epoch (a sequence,
    // not a per-row counter), so no old fence comes back to life.
    const IDLE: &str = "idle.test";
    let idle_first = acquire(&store, "w1", IDLE, T0).await;
    store
        .claim_destinations("w3", T0 + 2 * LEASE, LEASE, 10)
        .await
        .expect("claim round forgets lapsed idle leases");
    let idle_next = acquire(&store, "w1", IDLE, T0 + 2 * LEASE).await;
    assert!(
        idle_next.epoch > idle_first.epoch,
        "{idle_next:?} after {idle_first:?}"
    );
    assert!(idle_next.epoch > second.epoch);
}
