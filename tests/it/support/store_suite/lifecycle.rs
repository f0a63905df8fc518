//! The store as a process resource: one instance claims, heartbeats and
//! releases its worker name, and a closed and reopened store keeps its data
//! and never repeats a stream id.


use super::{Harness, NOW, ALICE, msg, one, batch};

/// F10, the part every backend shares: one store instance may claim,
/// heartbeat, release and claim again its own worker name. (Refusing a
/// second live instance is PostgreSQL's: `tests/it/store_postgres.rs`.)
pub async fn worker_name_claims_by_one_instance(harness: &Harness) {
    let s = &*harness.store;
    s.claim_worker_name("w1", NOW, 1_000).await.expect("claim");
    s.claim_worker_name("w1", NOW + 10, 1_000)
        .await
        .expect("claiming its own name again");
    assert!(
        s.heartbeat_worker_name("w1", NOW + 20, 1_000)
            .await
            .expect("beat")
    );
    s.claim_worker_name("w2", NOW, 1_000)
        .await
        .expect("a second name");
    s.release_worker_name("w1").await.expect("release");
    s.release_worker_name("w1")
        .await
        .expect("a second release is a no-op");
    s.claim_worker_name("w1", NOW + 30, 1_000)
        .await
        .expect("claim after release");
    assert!(
        s.heartbeat_worker_name("w2", NOW + 40, 1_000)
            .await
            .expect("beat")
    );
}

pub async fn reopen_keeps_data_and_stream_ids_never_repeat(harness: &Harness) {
    let store = harness.store.clone();
    store
        .upsert_device(ALICE, "A", Some("tok"))
        .await
        .expect("device");
    store
        .enqueue_send(batch("t1", vec![msg(ALICE, one("A"), 1)], vec![]))
        .await
        .expect("send");
    let page = store.fetch_inbox(ALICE, "A", 0, 10).await.expect("fetch");
    let acked = page.next_batch;
    // Acknowledge the highest row: its id must not be handed out again.
    store.fetch_inbox(ALICE, "A", acked, 10).await.expect("ack");
    store.close().await.expect("close");
    assert!(
        store
            .enqueue_send(batch("t2", vec![msg(ALICE, one("A"), 2)], vec![]))
            .await
            .is_err(),
        "a closed store refuses writes"
    );
    drop(store);

    let store = (harness.reopen)().await;
    assert_eq!(
        store
            .lookup_token("tok")
            .await
            .expect("token")
            .map(|d| d.device_id),
        Some("A".to_owned())
    );
    store
        .enqueue_send(batch("t2", vec![msg(ALICE, one("A"), 2)], vec![]))
        .await
        .expect("send");
    let page = store
        .fetch_inbox(ALICE, "A", acked, 10)
        .await
        .expect("fetch");
    assert_eq!(page.messages.len(), 1);
    assert!(page.messages[0].stream_id > acked);
}
