//! Retention end to end (issue 18, SECURITY-REVIEW F13): messages expired
//! by a pruning pass over a relay's store are counted in totals that the
//! destinations RPC and `courier status` show, across a restart; and a
//! clean stop closes the store (`Store::close`), leaving the SQLite WAL
//! checkpointed.

use std::time::Duration;

use courier::store::Retention;
use courier::store::pruner::{PrunePass, PruneSettings};
use courier::store::retention::{EventTypePattern, ExpiryPolicy, ExpiryReason, InboxTtl};
use courier::store::sqlite::SqliteStore;
use courier::tools::rpc_client::RpcClient;
use serde_json::json;

use crate::support::TestRelay;
use crate::support::relay::encode;

const DAY_MS: i64 = 24 * 3_600_000;

fn rpc(relay: &TestRelay) -> RpcClient {
    RpcClient::new(&relay.rpc_url, &relay.rpc_secret).expect("rpc client")
}

/// A device's inbox over the RPC, without acknowledging anything.
async fn rpc_inbox(relay: &TestRelay, user: &str, device: &str) -> serde_json::Value {
    let url = format!(
        "{}/_courier/v1/inbox/{}/{}",
        relay.rpc_url,
        encode(user),
        encode(device)
    );
    let r = relay.http.get(&url, Some(&relay.rpc_secret)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

/// The WAL file's size (0 when it is gone: nothing left to fold back).
fn wal_len(relay: &TestRelay) -> u64 {
    let mut wal = relay.db_path().into_os_string();
    wal.push("-wal");
    std::fs::metadata(wal).map_or(0, |m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_status_shows_expiry_totals_across_a_restart() {
    let mut relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let bob = format!("@bob:{}", relay.server_name);
    client
        .register_device(&bob, "B", None)
        .await
        .expect("register");
    let sender = format!("@alice:{}", relay.server_name);
    for (i, event_type) in [
        "m.room_key_request",
        "m.room_key_request",
        "m.room.encrypted",
    ]
    .into_iter()
    .enumerate()
    {
        client
            .send_to_device(
                &sender,
                event_type,
                &format!("txn{i}"),
                &json!({ bob.clone(): { "B": { "i": i } } }),
            )
            .await
            .expect("send");
    }
    relay.stop().await;

    // A pruning pass eight days later with a 7-day TTL for key requests.
    let store = SqliteStore::open(&relay.db_path()).await.expect("open");
    let policy = ExpiryPolicy::new(
        vec![InboxTtl {
            pattern: EventTypePattern::parse("m.room_key_request").expect("pattern"),
            ttl_ms: 7 * DAY_MS,
        }],
        None,
        Some(30 * DAY_MS),
    );
    let settings = PruneSettings {
        batch: 100,
        interval: Duration::from_secs(60),
        retention: Retention::DEFAULT,
    };
    let mut pass = PrunePass::new(&store, courier::clock::now_ms() + 8 * DAY_MS, settings)
        .with_expiry(&policy);
    pass.finish(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("pass");
    assert_eq!(pass.expired(ExpiryReason::Ttl), 2);
    store.close().await.expect("close");
    drop(store);

    relay.restart().await;
    let status = client.status().await.expect("status");
    let counts: Vec<(String, String, u64)> = status
        .expired
        .iter()
        .map(|r| (r.kind.clone(), r.reason.clone(), r.count))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("inbox".to_owned(), "ttl".to_owned(), 2),
            ("inbox".to_owned(), "inbox_cap".to_owned(), 0),
            ("outbox".to_owned(), "dead_destination".to_owned(), 0),
        ]
    );
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args([
            "status",
            "--rpc",
            &relay.rpc_url,
            "--secret",
            &relay.rpc_secret,
        ])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("courier status finished")
        .expect("courier status ran");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let row = |kind: &str, reason: &str| {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.len() == 3 && w[0] == kind && w[1] == reason)
            .map(|w| w[2].to_owned())
    };
    assert_eq!(row("inbox", "ttl"), Some("2".to_owned()), "{text}");
    assert_eq!(row("inbox", "inbox_cap"), Some("0".to_owned()), "{text}");
    assert_eq!(
        row("outbox", "dead_destination"),
        Some("0".to_owned()),
        "{text}"
    );
    // The pass counted into the process's recorder, which /metrics renders
    // (other tests in this process may have added to it: at least 2).
    let metrics = relay
        .http
        .get(
            &format!("{}/metrics", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await;
    let ttl_count = metrics
        .text
        .lines()
        .find_map(|l| {
            l.strip_prefix("courier_expired_messages_total{kind=\"inbox\",reason=\"ttl\"} ")
        })
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(ttl_count.is_some_and(|n| n >= 2.0), "{}", metrics.text);
    // The message no rule matches is still there for Bob.
    let page = rpc_inbox(&relay, &bob, "B").await;
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["events"][0]["type"], "m.room.encrypted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_closes_the_store_and_checkpoints_the_wal() {
    let mut relay = TestRelay::spawn().await;
    let client = rpc(&relay);
    let bob = format!("@bob:{}", relay.server_name);
    client
        .register_device(&bob, "B", None)
        .await
        .expect("register");
    client
        .send_to_device(
            &format!("@alice:{}", relay.server_name),
            "m.test",
            "t1",
            &json!({ bob.clone(): { "B": { "n": 1 } } }),
        )
        .await
        .expect("send");
    assert!(wal_len(&relay) > 0, "the writes are in the WAL");
    relay.stop().await;
    // `server::run` returned only after `Store::close`: the WAL is folded
    // into the database and truncated, with nothing left to recover.
    assert_eq!(wal_len(&relay), 0);
    relay.restart().await;
    let page = rpc_inbox(&relay, &bob, "B").await;
    assert_eq!(page["events"][0]["content"], json!({ "n": 1 }));
}
