//! `courier demo`: the first thing a newcomer runs. It starts the two
//! development relays of `config/dev/` in this process (real listeners on
//! loopback, real TLS federation between them, fresh stores and keys in a
//! temporary directory), registers demo devices over the RPC, sends
//! to-device messages both ways through the client API (one device, `*`,
//! local, and a batch of a few thousand), waits for every one to arrive
//! through `/sync`, and prints what was sent, delivered, and how long it took.
//! With the `demo-olm` feature (default) it also runs an Olm-encrypted
//! exchange between a client on each relay (`demo_olm.rs`): keys uploaded,
//! queried and claimed across the relays, a message and its reply decrypted
//! on the other side. Last, a device-list row (`demo_device_lists.rs`): a
//! device Alice adds on A and then deletes reaches Bob on B through his
//! `/sync` (`device_lists.changed`) and his `/keys/query`.
//! It fails, with the reason, if any message is missing, duplicated or
//! altered.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::tools::dev_pair::{
    DevPair, DevPairError, DevPairOptions, DevRelay, dev_token, register_device,
};
use crate::tools::plain_http::{JsonClient, encode_segment};

/// How long the demo waits for any one scenario to be delivered.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Pair(#[from] DevPairError),
    #[error(transparent)]
    Http(#[from] crate::tools::plain_http::HttpError),
    #[error("{0}")]
    Failed(String),
    #[cfg(feature = "demo-olm")]
    #[error(transparent)]
    Olm(#[from] crate::tools::demo_olm::OlmDemoError),
}

pub struct DemoOptions {
    pub config_a: PathBuf,
    pub config_b: PathBuf,
    /// Messages in the batch scenario.
    pub batch: usize,
}

/// One row of the final table.
pub struct ScenarioResult {
    pub name: String,
    pub sent: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub elapsed: Duration,
}

impl ScenarioResult {
    fn ok(&self) -> bool {
        self.sent == self.delivered && self.duplicates == 0
    }
}

/// A device that receives in a scenario, and what it must receive.
struct Receiver<'a> {
    relay: &'a DevRelay,
    token: String,
    /// Expected message ids.
    expect: Vec<String>,
}

pub async fn run_demo(options: DemoOptions) -> Result<Vec<ScenarioResult>, DemoError> {
    let pair = DevPair::start(&DevPairOptions {
        config_a: options.config_a,
        config_b: options.config_b,
        data_parent: None,
        worker_threads: 2,
        client_connections: None,
    })
    .await?;
    let outcome = drive(&pair.a, &pair.b, options.batch).await;
    pair.stop().await?;
    outcome
}

async fn drive(a: &DevRelay, b: &DevRelay, batch: usize) -> Result<Vec<ScenarioResult>, DemoError> {
    let http = JsonClient::new(Duration::from_secs(90));
    let alice = format!("@alice:{}", a.server_name);
    let bob = format!("@bob:{}", b.server_name);
    for device in ["ALICE1", "ALICE2"] {
        register(&http, a, &alice, device).await?;
    }
    for device in ["BOB1", "BOB2"] {
        register(&http, b, &bob, device).await?;
    }
    let batch_users: Vec<String> = (0..50)
        .map(|i| format!("@load{i:02}:{}", b.server_name))
        .collect();
    for user in &batch_users {
        register(&http, b, user, "LOAD").await?;
    }

    let mut results = Vec::new();
    let alice1 = token(&alice, "ALICE1");
    let bob1 = token(&bob, "BOB1");

    // A → B, one device.
    let id = "a-to-b-one".to_owned();
    let sends = vec![json!({ bob.clone(): { "BOB1": { "id": id } } })];
    let receivers = vec![Receiver {
        relay: b,
        token: token(&bob, "BOB1"),
        expect: vec![id],
    }];
    results.push(scenario(&http, "A → B, one device", a, &alice1, sends, receivers).await?);

    // A → B, every device (`*`).
    let id = "a-to-b-star".to_owned();
    let sends = vec![json!({ bob.clone(): { "*": { "id": id } } })];
    let receivers = ["BOB1", "BOB2"]
        .iter()
        .map(|d| Receiver {
            relay: b,
            token: token(&bob, d),
            expect: vec![id.clone()],
        })
        .collect();
    results.push(scenario(&http, "A → B, * (2 devices)", a, &alice1, sends, receivers).await?);

    // B → A, one device and `*`.
    let id = "b-to-a-one".to_owned();
    let sends = vec![json!({ alice.clone(): { "ALICE1": { "id": id } } })];
    let receivers = vec![Receiver {
        relay: a,
        token: token(&alice, "ALICE1"),
        expect: vec![id],
    }];
    results.push(scenario(&http, "B → A, one device", b, &bob1, sends, receivers).await?);
    let id = "b-to-a-star".to_owned();
    let sends = vec![json!({ alice.clone(): { "*": { "id": id } } })];
    let receivers = ["ALICE1", "ALICE2"]
        .iter()
        .map(|d| Receiver {
            relay: a,
            token: token(&alice, d),
            expect: vec![id.clone()],
        })
        .collect();
    results.push(scenario(&http, "B → A, * (2 devices)", b, &bob1, sends, receivers).await?);

    // Local: A → A.
    let id = "a-to-a-local".to_owned();
    let sends = vec![json!({ alice.clone(): { "ALICE2": { "id": id } } })];
    let receivers = vec![Receiver {
        relay: a,
        token: token(&alice, "ALICE2"),
        expect: vec![id],
    }];
    results.push(scenario(&http, "A → A, local device", a, &alice1, sends, receivers).await?);

    // A → B, a batch over 50 users, 50 recipients per request.
    let calls = batch.div_ceil(batch_users.len()).max(1);
    let mut expected: HashMap<&str, Vec<String>> = HashMap::new();
    let mut sends = Vec::with_capacity(calls);
    let mut n = 0usize;
    for call in 0..calls {
        let mut messages = serde_json::Map::new();
        for user in &batch_users {
            if n == batch {
                break;
            }
            let id = format!("batch-{call}-{n}");
            messages.insert(
                user.clone(),
                json!({ "LOAD": { "id": id, "padding": "x".repeat(64) } }),
            );
            expected.entry(user.as_str()).or_default().push(id);
            n += 1;
        }
        sends.push(Value::Object(messages));
    }
    let receivers = batch_users
        .iter()
        .map(|u| Receiver {
            relay: b,
            token: token(u, "LOAD"),
            expect: expected.remove(u.as_str()).unwrap_or_default(),
        })
        .collect();
    let name = format!("A → B, batch ({calls} requests × ≤50)");
    results.push(scenario(&http, &name, a, &alice1, sends, receivers).await?);
    #[cfg(feature = "demo-olm")]
    {
        let olm = crate::tools::demo_olm::encrypted_scenario(&http, a, b).await?;
        results.push(ScenarioResult {
            name: "A ⇄ B, Olm-encrypted (keys over federation)".to_owned(),
            sent: olm.sent,
            delivered: olm.delivered,
            duplicates: olm.duplicates,
            elapsed: olm.elapsed,
        });
    }
    let lists = crate::tools::demo_device_lists::device_list_scenario(&http, a, b)
        .await
        .map_err(|e| DemoError::Failed(format!("device lists: {e}")))?;
    results.push(ScenarioResult {
        name: "A → B, device list (device added, deleted)".to_owned(),
        sent: lists.sent,
        delivered: lists.delivered,
        duplicates: 0,
        elapsed: lists.elapsed,
    });
    Ok(results)
}

fn token(user: &str, device: &str) -> String {
    dev_token(user, device)
}

async fn register(
    http: &JsonClient,
    relay: &DevRelay,
    user: &str,
    device: &str,
) -> Result<(), DemoError> {
    register_device(http, relay, user, device).await?;
    Ok(())
}

/// Sends `sends` (each a `messages` object) from `from`, then syncs every
/// receiver until it has its expected messages or the deadline passes.
async fn scenario(
    http: &JsonClient,
    name: &str,
    from: &DevRelay,
    sender_token: &str,
    sends: Vec<Value>,
    receivers: Vec<Receiver<'_>>,
) -> Result<ScenarioResult, DemoError> {
    let sent: usize = receivers.iter().map(|r| r.expect.len()).sum();
    let started = Instant::now();
    let txn_prefix = format!("{}-{}", crate::clock::now_ms(), name.len());
    let mut in_flight = Vec::new();
    for (i, messages) in sends.into_iter().enumerate() {
        let url = format!(
            "{}/_matrix/client/v3/sendToDevice/{}/{}-{i}",
            from.client_url,
            encode_segment("org.example.courier.demo"),
            txn_prefix
        );
        let http = http.clone();
        let token = sender_token.to_owned();
        in_flight.push(tokio::spawn(async move {
            http.request(
                "PUT",
                &url,
                Some(&token),
                Some(&json!({ "messages": messages })),
            )
            .await
        }));
        // Keep at most 8 requests in flight.
        if in_flight.len() >= 8 {
            check_send(in_flight.remove(0).await, name)?;
        }
    }
    for handle in in_flight {
        check_send(handle.await, name)?;
    }

    let mut tasks = Vec::new();
    for receiver in receivers {
        let http = http.clone();
        let url = receiver.relay.client_url.clone();
        tasks.push(tokio::spawn(async move {
            receive(&http, &url, &receiver.token, &receiver.expect).await
        }));
    }
    let mut delivered = 0;
    let mut duplicates = 0;
    let mut last = started.elapsed();
    for task in tasks {
        let outcome = task
            .await
            .map_err(|e| DemoError::Failed(format!("{name}: receiver task failed: {e}")))??;
        delivered += outcome.delivered;
        duplicates += outcome.duplicates;
        if let Some(at) = outcome.completed_at {
            last = last.max(at.duration_since(started));
        }
    }
    Ok(ScenarioResult {
        name: name.to_owned(),
        sent,
        delivered,
        duplicates,
        elapsed: last,
    })
}

fn check_send(
    joined: Result<
        Result<crate::tools::plain_http::JsonResponse, crate::tools::plain_http::HttpError>,
        tokio::task::JoinError,
    >,
    name: &str,
) -> Result<(), DemoError> {
    let response =
        joined.map_err(|e| DemoError::Failed(format!("{name}: send task failed: {e}")))??;
    if response.status != 200 {
        return Err(DemoError::Failed(format!(
            "{name}: send answered {} {}",
            response.status, response.body
        )));
    }
    Ok(())
}

struct Received {
    delivered: usize,
    duplicates: usize,
    completed_at: Option<Instant>,
}

/// Syncs one device until every expected id arrived (or the deadline), then
/// acknowledges and checks that nothing more is pending.
async fn receive(
    http: &JsonClient,
    client_url: &str,
    token: &str,
    expect: &[String],
) -> Result<Received, DemoError> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut since: Option<String> = None;
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    let mut completed_at = None;
    loop {
        let done = expect.iter().all(|id| seen.contains_key(id));
        if done && completed_at.is_none() {
            completed_at = Some(Instant::now());
        }
        // After completion, one more sync with timeout 0 acknowledges the last
        // batch and shows whether anything unexpected is still queued.
        let timeout = if done { 0 } else { 5_000 };
        if !done && Instant::now() > deadline {
            break;
        }
        let mut url = format!("{client_url}/_matrix/client/v3/sync?timeout={timeout}");
        if let Some(since) = &since {
            url.push_str(&format!("&since={}", encode_segment(since)));
        }
        let r = http.request("GET", &url, Some(token), None).await?;
        if r.status != 200 {
            return Err(DemoError::Failed(format!(
                "sync answered {} {}",
                r.status, r.body
            )));
        }
        let events = r.body["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for event in &events {
            let id = event["content"]["id"]
                .as_str()
                .unwrap_or("<no id>")
                .to_owned();
            *seen.entry(id).or_default() += 1;
        }
        since = r.body["next_batch"].as_str().map(str::to_owned);
        if done && events.is_empty() {
            break;
        }
    }
    let delivered = expect.iter().filter(|id| seen.contains_key(*id)).count();
    let duplicates = seen.values().map(|n| n.saturating_sub(1)).sum::<usize>()
        + seen.keys().filter(|id| !expect.contains(id)).count();
    Ok(Received {
        delivered,
        duplicates,
        completed_at,
    })
}

/// Prints the results table; returns whether every scenario succeeded.
pub fn print_table(results: &[ScenarioResult]) -> bool {
    let width = results
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(10)
        .max(8);
    println!(
        "{:<width$}  {:>6}  {:>9}  {:>10}  {:>9}  result",
        "scenario", "sent", "delivered", "duplicates", "time"
    );
    let mut all_ok = true;
    for r in results {
        all_ok &= r.ok();
        println!(
            "{:<width$}  {:>6}  {:>9}  {:>10}  {:>6} ms  {}",
            r.name,
            r.sent,
            r.delivered,
            r.duplicates,
            r.elapsed.as_millis(),
            if r.ok() { "ok" } else { "FAILED" }
        );
    }
    all_ok
}
