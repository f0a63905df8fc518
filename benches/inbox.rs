//! The inbox read path of the SQLite store (`benches/store.rs` covers the
//! append path): `fetch_inbox` acknowledging the previous page and returning
//! the next 100 rows, as `/sync` does on every call. Rows are written first
//! (not timed), then drained page by page by 1 device, and by 64 devices
//! concurrently (64 long-polls syncing at once). Each page fetch with
//! `since > 0` also deletes the acknowledged rows, in the same transaction,
//! on a temp-file database with `synchronous=FULL`.
//!
//! Run: `cargo bench --bench inbox`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use courier::store::sqlite::SqliteStore;
use courier::store::{ClientTxnKey, DeviceTarget, NewInboxMessage, SendBatch, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Rows per page (the `/sync` limit).
const PAGE: u32 = 100;

static TXN: AtomicU64 = AtomicU64::new(0);

fn user(i: usize) -> String {
    format!("@user{i}:bench.test")
}

/// Writes `rows` inbox rows for each of `devices` devices, 100 per send.
async fn fill(store: &SqliteStore, devices: usize, rows: usize) {
    let content = format!("{{\"body\":\"{}\"}}", "x".repeat(200));
    for d in 0..devices {
        let mut left = rows;
        while left > 0 {
            let n = left.min(100);
            left -= n;
            let txn = TXN.fetch_add(1, Ordering::Relaxed);
            let batch = SendBatch {
                txn: ClientTxnKey {
                    user_id: "@sender:bench.test".to_owned(),
                    device_id: "SENDER".to_owned(),
                    event_type: "m.bench".to_owned(),
                    txn_id: format!("fill{txn}"),
                },
                local: (0..n)
                    .map(|_| NewInboxMessage {
                        user_id: user(d),
                        device: DeviceTarget::One("DEV".to_owned()),
                        message_id: format!("fill{txn}"),
                        sender: "@sender:bench.test".to_owned(),
                        event_type: "m.bench".to_owned(),
                        content_json: content.clone(),
                    })
                    .collect(),
                remote: vec![],
                now_ms: 1_700_000_000_000,
            };
            store.enqueue_send(batch).await.expect("fill write");
        }
    }
}

/// Drains one device's inbox page by page, acknowledging each page with the
/// next fetch; returns the rows read.
async fn drain(store: Arc<SqliteStore>, device: usize) -> u64 {
    let user = user(device);
    let mut since = 0;
    let mut read = 0u64;
    loop {
        let page = store
            .fetch_inbox(&user, "DEV", since, PAGE)
            .await
            .expect("fetch");
        if page.messages.is_empty() {
            return read;
        }
        read += page.messages.len() as u64;
        since = page.next_batch;
    }
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        runtime
            .block_on(SqliteStore::open(&dir.path().join("inbox.db")))
            .expect("store opens"),
    );
    runtime.block_on(async {
        for d in 0..64 {
            store
                .upsert_device(&user(d), "DEV", None)
                .await
                .expect("device registered");
        }
    });

    let mut group = c.benchmark_group("inbox_fetch");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for devices in [1usize, 64] {
        // 1,000 rows per device per iteration: 10 pages each.
        let rows = 1_000usize;
        group.throughput(Throughput::Elements((devices * rows) as u64));
        group.bench_with_input(
            BenchmarkId::new("devices", devices),
            &devices,
            |b, &devices| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        runtime.block_on(fill(&store, devices, rows));
                        let start = Instant::now();
                        let read: u64 = runtime.block_on(async {
                            let tasks: Vec<_> = (0..devices)
                                .map(|d| tokio::spawn(drain(store.clone(), d)))
                                .collect();
                            let mut read = 0;
                            for t in tasks {
                                read += t.await.expect("drain task");
                            }
                            read
                        });
                        total += start.elapsed();
                        assert_eq!(read, (devices * rows) as u64, "every row read once");
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

criterion_group!(inbox, benches);
criterion_main!(inbox);
