//! Throughput of the SQLite store's write path with group commit: inbox
//! appends per second with 1, 8 and 64 concurrent writers (one inbox row per
//! `enqueue_send`), and 100-recipient sends with 8 and 64 writers, on a
//! temp-file database with `synchronous=FULL`. Besides criterion's timings it
//! prints commits (fsyncs) per second and writes per commit from
//! `SqliteStore::commit_count`, which show the grouping at work.
//!
//! Run: `cargo bench --bench store -- --measurement-time 5`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use courier::store::sqlite::SqliteStore;
use courier::store::{ClientTxnKey, DeviceTarget, NewInboxMessage, SendBatch, SendOutcome, Store};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Distinct local users, each with one device.
const USERS: usize = 100;

static TXN: AtomicU64 = AtomicU64::new(0);

fn user(i: usize) -> String {
    format!("@user{i}:bench.test")
}

fn send(recipients: usize, first_user: usize) -> SendBatch {
    let txn = TXN.fetch_add(1, Ordering::Relaxed);
    SendBatch {
        txn: ClientTxnKey {
            user_id: "@sender:bench.test".to_owned(),
            device_id: "SENDER".to_owned(),
            event_type: "m.bench".to_owned(),
            txn_id: format!("t{txn}"),
        },
        local: (0..recipients)
            .map(|r| NewInboxMessage {
                user_id: user((first_user + r) % USERS),
                device: DeviceTarget::One("DEV".to_owned()),
                message_id: format!("t{txn}"),
                sender: "@sender:bench.test".to_owned(),
                event_type: "m.bench".to_owned(),
                content_json: format!(
                    "{{\"body\":\"a to-device message of a realistic small size\",\"txn\":{txn}}}"
                ),
            })
            .collect(),
        remote: vec![],
        now_ms: 1_700_000_000_000,
    }
}

/// Runs `total` sends split over `writers` tasks; returns the elapsed time.
async fn run(store: &Arc<SqliteStore>, writers: usize, total: u64, recipients: usize) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let store = store.clone();
        let share = total / writers as u64 + u64::from((w as u64) < total % writers as u64);
        tasks.push(tokio::spawn(async move {
            for i in 0..share {
                let outcome = store
                    .enqueue_send(send(recipients, w + i as usize))
                    .await
                    .expect("bench write");
                assert!(matches!(outcome, SendOutcome::Accepted { .. }));
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    start.elapsed()
}

struct Totals {
    sends: u64,
    commits: u64,
    elapsed: Duration,
    writer_cpu_ticks: u64,
}

/// CPU time (user + system, in clock ticks of 10 ms) used so far by the
/// store's writer thread, read from /proc: unlike wall time it barely
/// depends on what else the machine is doing.
fn writer_cpu_ticks() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut ticks = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // The kernel keeps 15 bytes of the thread name.
        if !comm.starts_with("courier-sqlite-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After the command name: state is field 3, utime 14, stime 15.
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += field(11) + field(12);
    }
    ticks
}

fn bench_group(c: &mut Criterion, name: &str, recipients: usize, writer_counts: &[usize]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir_in(
        std::env::var_os("COURIER_BENCH_DIR").unwrap_or_else(|| "target".into()),
    )
    .expect("temp dir");
    let store = Arc::new(
        runtime
            .block_on(SqliteStore::open(&dir.path().join("bench.db")))
            .expect("open"),
    );
    runtime.block_on(async {
        for i in 0..USERS {
            store
                .upsert_device(&user(i), "DEV", None)
                .await
                .expect("device");
        }
    });
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(recipients as u64));
    let mut report = Vec::new();
    for &writers in writer_counts {
        let mut totals = Totals {
            sends: 0,
            commits: 0,
            elapsed: Duration::ZERO,
            writer_cpu_ticks: 0,
        };
        group.bench_with_input(
            BenchmarkId::new("writers", writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|iters| {
                    let commits = store.commit_count();
                    let cpu = writer_cpu_ticks();
                    let elapsed = runtime.block_on(run(&store, writers, iters, recipients));
                    totals.writer_cpu_ticks += writer_cpu_ticks() - cpu;
                    totals.sends += iters;
                    totals.commits += store.commit_count() - commits;
                    totals.elapsed += elapsed;
                    elapsed
                })
            },
        );
        report.push((writers, totals));
    }
    group.finish();
    for (writers, t) in report {
        let secs = t.elapsed.as_secs_f64();
        eprintln!(
            "{name} writers={writers}: {:.0} rows/s, {:.0} sends/s, {:.0} commits/s, \
             {:.1} sends/commit, writer CPU {:.1} us/row",
            (t.sends * recipients as u64) as f64 / secs,
            t.sends as f64 / secs,
            t.commits as f64 / secs,
            t.sends as f64 / t.commits.max(1) as f64,
            t.writer_cpu_ticks as f64 * 10_000.0 / (t.sends * recipients as u64).max(1) as f64,
        );
    }
    runtime.block_on(store.close()).expect("close");
}

fn inbox_appends(c: &mut Criterion) {
    bench_group(c, "store/inbox_append", 1, &[1, 8, 64]);
}

fn fanout_100(c: &mut Criterion) {
    bench_group(c, "store/send_100_recipients", 100, &[1, 8, 64]);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = inbox_appends, fanout_100
}
criterion_main!(benches);
