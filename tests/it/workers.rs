//! Several Courier workers on one PostgreSQL database (DESIGN §4), as real
//! `courier serve` child processes sharing one throwaway cluster
//! (`tests/it/support/pg.rs`), one server name and one signing key:
//!
//! - three workers, two remote servers (scriptable fake remotes over
//!   loopback TLS that record every `/send` and count overlapping ones):
//!   every message sent through the workers' RPC is delivered exactly once
//!   while workers are SIGKILLed and restarted during the run, and no two
//!   transactions for one destination are ever in flight at once;
//! - the same with two real Courier relays as the remote servers: every
//!   message reaches its device through `/sync` exactly once, and the
//!   receiving relays never saw two transactions from the workers' server
//!   in progress at once (their `overlapping_transactions` counter);
//! - a `/sync` long-poll on worker 2 wakes for a message accepted on
//!   worker 1 (LISTEN/NOTIFY), long before its timeout;
//! - a second worker started with the name of a live one exits at start-up
//!   with an error naming the conflict, and starts once the first stopped;
//! - fenced leases: a lease holder SIGSTOPped mid-send past its lease, while
//!   another worker takes the destination over and delivers, changes
//!   nothing in the outbox once resumed (its writes are fenced out).

use crate::support::child;
use crate::support::fake_remote;
use crate::support::http;
use crate::support::pg;
use crate::support::relay;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_remote::{FakeRemote, Received, Script, TestCa};
use http::HttpClient;
use serde_json::{Value, json};

const RPC_SECRET: &str = "workers-test-secret";

/// A free port below the kernel's ephemeral range, so that no outgoing
/// connection takes it while a killed worker is down and its restart can
/// bind it again. The tests of this binary run concurrently and a port is
/// only bound later by a child process, so ports are handed out from one
/// counter (starting at a random place): no two tests here get the same one.
fn free_port() -> u16 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next =
        NEXT.get_or_init(|| std::sync::atomic::AtomicU32::new(rand::random_range(0..18_000)));
    for _ in 0..1000 {
        let offset = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 18_000;
        let port = 12_000 + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// One request on a fresh client, so no pooled connection to a killed
/// worker is reused; `None` when the worker did not answer within 20 s.
async fn try_request(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Option<(u16, String)> {
    let client = courier::tools::plain_http::JsonClient::new(Duration::from_secs(20));
    let bytes = body.map(|b| hyper::body::Bytes::from(b.to_string()));
    let raw = client.request_raw(method, url, bearer, bytes).await.ok()?;
    Some((raw.status, String::from_utf8_lossy(&raw.body).into_owned()))
}

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// One `courier serve` process (or its config, while it is down).
struct Worker {
    name: String,
    config: PathBuf,
    log: PathBuf,
    client_url: String,
    rpc_url: String,
    child: Option<Child>,
}

impl Worker {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("worker log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.args(["serve", "--config"]).arg(&self.config);
        // Every COURIER_* variable is a config override: keep the test's
        // environment out of the worker's config.
        for (name, _) in std::env::vars() {
            if name.starts_with("COURIER_") {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .env("COURIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn courier serve");
        self.child = Some(child);
    }

    /// SIGTERM (a clean shutdown) and wait for the exit.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("send SIGTERM");
            assert!(status.success(), "kill -TERM failed");
            let _ = child.wait();
        }
    }

    /// Waits (at most `limit`) for the process to exit on its own.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("poll worker"))
            {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} still running after {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running process.
    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the worker is running");
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("send a signal");
        assert!(status.success(), "kill -{signal} failed");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL worker");
            let _ = child.wait();
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/_matrix/client/versions", self.client_url);
        loop {
            if matches!(try_request("GET", &url, None, None).await, Some((200, _))) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("poll worker"))
            {
                panic!(
                    "worker {} exited with {status} while starting:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "worker {} not ready", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Workers sharing one database, server name and signing key.
struct Workers {
    dir: tempfile::TempDir,
    server_name: String,
    workers: Vec<Worker>,
    http: HttpClient,
}

impl Workers {
    async fn start(
        count: usize,
        conninfo: &str,
        extra_ca: Option<&Path>,
        lease_ms: u64,
    ) -> Workers {
        let names = (0..count).map(|i| format!("worker{}", i + 1)).collect();
        let mut all = Workers::configure(names, conninfo, extra_ca, lease_ms);
        for w in &mut all.workers {
            w.spawn();
        }
        for w in &mut all.workers {
            w.wait_ready().await;
        }
        all
    }

    /// The configs of workers with these `[worker] name`s (each with its
    /// own ports and files), none started.
    fn configure(
        names: Vec<String>,
        conninfo: &str,
        extra_ca: Option<&Path>,
        lease_ms: u64,
    ) -> Workers {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = courier::keys::ServerSigningKey::generate("w");
        let key_path = dir.path().join("signing.key");
        std::fs::write(&key_path, key.to_file_contents()).expect("key written");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let first_fed = free_port();
        let server_name = format!("localhost:{first_fed}");
        let mut extra = vec![root.join("certs/dev-ca.crt").display().to_string()];
        extra.extend(extra_ca.map(|p| p.display().to_string()));
        let extra_ca = extra
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut workers = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            let file = format!("{name}-{i}");
            let fed = if i == 0 { first_fed } else { free_port() };
            let (client, rpc) = (free_port(), free_port());
            let text = format!(
                r#"
server_name = "{server_name}"
signing_key_path = "{key}"
[federation]
bind = "127.0.0.1:{fed}"
tls_cert = "{root}/certs/localhost.crt"
tls_key = "{root}/certs/localhost.key"
extra_ca = [{extra_ca}]
ip_allow = ["127.0.0.0/8", "::1/128"]
retry_initial_ms = 200
retry_max_ms = 1000
startup_stagger_ms = 0
[client]
bind = "127.0.0.1:{client}"
[rpc]
bind = "127.0.0.1:{rpc}"
secret = "{RPC_SECRET}"
[store]
postgres = "{conninfo}"
[worker]
name = "{name}"
lease_ms = {lease_ms}
"#,
                key = key_path.display(),
                root = root.display(),
            );
            let config = dir.path().join(format!("{file}.toml"));
            std::fs::write(&config, text).expect("config written");
            workers.push(Worker {
                log: dir.path().join(format!("{file}.log")),
                name,
                config,
                client_url: format!("http://127.0.0.1:{client}"),
                rpc_url: format!("http://127.0.0.1:{rpc}"),
                child: None,
            });
        }
        Workers {
            dir,
            server_name,
            workers,
            http: HttpClient::new(),
        }
    }

    async fn restart(&mut self, i: usize) {
        self.workers[i].spawn();
        self.workers[i].wait_ready().await;
    }

    fn user(&self, local: &str) -> String {
        format!("@{local}:{}", self.server_name)
    }

    async fn register(&self, i: usize, user: &str, device: &str, token: &str) {
        let url = format!(
            "{}/_courier/v1/devices/{}/{}",
            self.workers[i].rpc_url,
            encode(user),
            encode(device)
        );
        let r = self
            .http
            .put_json(&url, Some(RPC_SECRET), &json!({ "access_token": token }))
            .await;
        assert_eq!(r.status, 200, "register: {}", r.text);
    }

    /// `POST /_courier/v1/send_to_device` on worker `i`; the HTTP status,
    /// or `None` when the worker did not answer.
    async fn rpc_send(
        &self,
        i: usize,
        sender: &str,
        txn_id: &str,
        messages: &Value,
    ) -> Option<u16> {
        let url = format!("{}/_courier/v1/send_to_device", self.workers[i].rpc_url);
        let body = json!({
            "sender": sender,
            "type": "m.test",
            "txn_id": txn_id,
            "messages": messages,
        });
        try_request("POST", &url, Some(RPC_SECRET), Some(&body))
            .await
            .map(|(status, _)| status)
    }

    async fn sync(
        &self,
        i: usize,
        token: &str,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> http::Response {
        let mut url = format!(
            "{}/_matrix/client/v3/sync?timeout={timeout_ms}",
            self.workers[i].client_url
        );
        if let Some(since) = since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        self.http.get(&url, Some(token)).await
    }

    async fn metric(&self, i: usize, name: &str) -> f64 {
        let url = format!("{}/metrics", self.workers[i].rpc_url);
        let r = self.http.get(&url, Some(RPC_SECRET)).await;
        r.text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn logs(&self) -> String {
        self.workers
            .iter()
            .map(|w| {
                format!(
                    "--- {} ---\n{}",
                    w.name,
                    std::fs::read_to_string(&w.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
        let _ = self.dir.path();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_on_one_worker_wakes_for_a_send_on_another() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    courier::tls::install_crypto_provider();
    let conninfo = cluster.fresh_database().await;
    let workers = Workers::start(2, &conninfo, None, 3_000).await;
    let alice = workers.user("alice");
    let sender = workers.user("sender");
    workers.register(0, &alice, "PHONE", "tok-alice").await;
    workers.register(0, &sender, "S", "tok-sender").await;
    // Worker 2 knows the device and token through the shared database.
    let initial = workers.sync(1, "tok-alice", None, 0).await;
    assert_eq!(initial.status, 200, "initial sync: {}", initial.text);
    let mut since = initial.json["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned();
    let before = workers.metric(1, "courier_longpoll_wakeups_total").await;
    const TIMEOUT_MS: u64 = 30_000;
    for attempt in 0..3u32 {
        let poll = {
            let since = since.clone();
            let workers = &workers;
            async move { workers.sync(1, "tok-alice", Some(&since), TIMEOUT_MS).await }
        };
        let started = Instant::now();
        let send = async {
            // Give the long-poll a head start so that it is waiting (not
            // reading) when the message commits; the wake-up counter below
            // says whether it was.
            tokio::time::sleep(Duration::from_millis(300 * (attempt as u64 + 1))).await;
            let messages = json!({ alice.clone(): { "PHONE": { "n": attempt } } });
            let status = workers
                .rpc_send(0, &sender, &format!("t{attempt}"), &messages)
                .await;
            assert_eq!(status, Some(200), "send on worker 1");
        };
        let (r, ()) = tokio::join!(poll, send);
        let elapsed = started.elapsed();
        assert_eq!(r.status, 200, "long-poll: {}", r.text);
        let events = r.json["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(events.len(), 1, "{}", r.text);
        assert_eq!(events[0]["content"]["n"], json!(attempt));
        assert_eq!(events[0]["sender"], json!(sender));
        // Woken, not timed out: without the cross-worker wake-up worker 2
        // would answer only after the 30 s timeout.
        assert!(
            elapsed < Duration::from_millis(TIMEOUT_MS / 3),
            "took {elapsed:?}:\n{}",
            workers.logs()
        );
        since = r.json["next_batch"]
            .as_str()
            .expect("next_batch")
            .to_owned();
        let after = workers.metric(1, "courier_longpoll_wakeups_total").await;
        if after > before {
            return;
        }
    }
    panic!(
        "the long-poll on worker 2 was never woken while waiting:\n{}",
        workers.logs()
    );
}

/// The `n`s of the messages in one `/send` body, per EDU.
fn message_ns(body: &Value) -> Vec<u64> {
    let mut out = Vec::new();
    for edu in body["edus"].as_array().cloned().unwrap_or_default() {
        if let Some(messages) = edu["content"]["messages"].as_object() {
            for devices in messages.values() {
                for content in devices.as_object().into_iter().flat_map(|d| d.values()) {
                    if let Some(n) = content["n"].as_u64() {
                        out.push(n);
                    }
                }
            }
        }
    }
    out
}

/// Unique transactions (a retry keeps its txnId and body) and the `n`s
/// they carried, with how often each `n` was delivered.
fn delivered(received: &[Received]) -> BTreeMap<u64, usize> {
    let mut bodies: BTreeMap<String, String> = BTreeMap::new();
    for r in received.iter().filter(|r| r.status == 200) {
        match bodies.get(&r.txn_id) {
            Some(body) => assert_eq!(body, &r.body, "txn {} resent with other bytes", r.txn_id),
            None => {
                bodies.insert(r.txn_id.clone(), r.body.clone());
            }
        }
    }
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for body in bodies.values() {
        let v: Value = serde_json::from_str(body).expect("json body");
        for n in message_ns(&v) {
            *counts.entry(n).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_deliver_exactly_once_while_being_killed() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    courier::tls::install_crypto_provider();
    let conninfo = cluster.fresh_database().await;
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let ca_pem = ca.write_pem(ca_dir.path());
    let remotes = [
        FakeRemote::start(&ca, &["localhost"]).await,
        FakeRemote::start(&ca, &["localhost"]).await,
    ];
    for remote in &remotes {
        // Hold every answer a little, so that a second sender for the same
        // destination would be caught overlapping.
        remote.script_default(Script {
            respond_after: Some(Duration::from_millis(60)),
            ..Script::default()
        });
    }
    let destinations: Vec<String> = remotes
        .iter()
        .map(|r| format!("localhost:{}", r.port()))
        .collect();
    const LEASE_MS: u64 = 1_500;
    let mut workers = Workers::start(3, &conninfo, Some(&ca_pem), LEASE_MS).await;
    let sender = workers.user("sender");

    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 40;
    let started = Instant::now();
    let mut expected: [BTreeSet<u64>; 2] = Default::default();
    let mut kills = 0;
    let (db, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect to the workers' database");
    tokio::spawn(connection);
    for round in 0..ROUNDS {
        let mut victim = round % 3;
        for k in 0..PER_ROUND {
            let n = (round * PER_ROUND + k) as u64;
            if k == PER_ROUND / 2 {
                // SIGKILL, in the middle of the traffic, the worker that
                // holds a destination's lease (it is likely mid-send), so
                // that another worker must take the destination over.
                let owner: Option<String> = db
                    .query_opt(
                        "SELECT owner FROM destination_leases WHERE destination = $1",
                        &[&destinations[round % 2]],
                    )
                    .await
                    .expect("lease owner")
                    .map(|row| row.get(0));
                if let Some(i) = workers
                    .workers
                    .iter()
                    .position(|w| Some(&w.name) == owner.as_ref())
                {
                    victim = i;
                }
                workers.workers[victim].kill();
                kills += 1;
            }
            let d = (n % 2) as usize;
            let user = format!("@user{}:{}", n % 5, destinations[d]);
            let messages = json!({ user: { "DEV": { "n": n } } });
            let txn_id = format!("m{n}");
            // Any live worker; retry the same txn elsewhere until accepted.
            let mut accepted = false;
            for attempt in 0..12 {
                let i = (n as usize + attempt) % 3;
                if workers.workers[i].child.is_none() {
                    continue;
                }
                if workers.rpc_send(i, &sender, &txn_id, &messages).await == Some(200) {
                    accepted = true;
                    break;
                }
            }
            assert!(accepted, "message {n} not accepted:\n{}", workers.logs());
            expected[d].insert(n);
        }
        // With the victim still down, everything queued must drain: the
        // destinations it held are taken over once its leases lapse.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let queued: i64 = db
                .query_one(
                    "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM outbox_txn)",
                    &[],
                )
                .await
                .expect("queue depth")
                .get(0);
            if queued == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {queued} rows stuck with {} down:\n{}",
                workers.workers[victim].name,
                workers.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        workers.restart(victim).await;
    }

    // Everything accepted must reach its destination, exactly once.
    for (d, remote) in remotes.iter().enumerate() {
        let want = expected[d].clone();
        let done = remote
            .wait_for(Duration::from_secs(90), |received| {
                delivered(received).keys().copied().collect::<BTreeSet<_>>() == want
            })
            .await;
        assert!(
            done,
            "destination {d}: {} of {} delivered:\n{}",
            delivered(&remote.received()).len(),
            want.len(),
            workers.logs()
        );
    }
    for (d, remote) in remotes.iter().enumerate() {
        let counts = delivered(&remote.received());
        let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
        assert!(
            twice.is_empty(),
            "destination {d}: delivered twice: {twice:?}"
        );
        assert_eq!(counts.keys().copied().collect::<BTreeSet<_>>(), expected[d]);
        assert_eq!(
            remote.overlaps(),
            0,
            "destination {d}: two transactions in flight at once"
        );
    }
    // The destinations really moved between workers ("took destination
    // lease" / "claimed destination leases" in their logs).
    let logs = workers.logs();
    let claimers: BTreeSet<&str> = workers
        .workers
        .iter()
        .filter(|w| {
            std::fs::read_to_string(&w.log)
                .unwrap_or_default()
                .contains("destination lease")
        })
        .map(|w| w.name.as_str())
        .collect();
    assert!(claimers.len() >= 2, "claimers {claimers:?}:\n{logs}");
    eprintln!(
        "{} messages to 2 destinations through 3 workers, {kills} SIGKILLs, \
         {} /send requests, claimed by {claimers:?}, in {:?}",
        ROUNDS * PER_ROUND,
        remotes.iter().map(|r| r.received().len()).sum::<usize>(),
        started.elapsed()
    );
}

/// The value of a Prometheus counter in `text`, 0 when it was never set.
fn counter_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Set in the child process that runs
/// `three_workers_deliver_to_two_real_relays_exactly_once` alone.
const ALONE_ENV: &str = "IT_WORKERS_ALONE_CHILD";

/// Runs alone in a child process of this binary (`support::child`): it
/// reads the receiving relays' `overlapping_transactions` counter, and the
/// metrics recorder is process-wide, so in the shared `it` process other
/// modules' relays (which provoke overlaps on purpose) would count too.
#[test]
fn three_workers_deliver_to_two_real_relays_exactly_once() {
    if std::env::var_os(ALONE_ENV).is_none() {
        child::run_alone(
            module_path!(),
            "three_workers_deliver_to_two_real_relays_exactly_once",
            ALONE_ENV,
            Duration::from_secs(600),
        );
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(deliver_to_two_real_relays_exactly_once());
}

/// The test proper.
async fn deliver_to_two_real_relays_exactly_once() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    courier::tls::install_crypto_provider();
    let conninfo = cluster.fresh_database().await;
    let relays = [
        relay::TestRelay::spawn().await,
        relay::TestRelay::spawn().await,
    ];
    const USERS: usize = 4;
    let token = |r: &relay::TestRelay, u: usize| format!("tok-{u}-{}", r.federation_addr.port());
    for r in &relays {
        for u in 0..USERS {
            r.register_device(&format!("@user{u}:{}", r.server_name), "DEV", &token(r, u))
                .await;
        }
    }
    let mut workers = Workers::start(3, &conninfo, None, 1_500).await;
    let sender = workers.user("sender");

    const ROUNDS: usize = 3;
    const PER_ROUND: usize = 30;
    // expected[relay][user] = the `n`s that device must receive.
    let mut expected = vec![vec![BTreeSet::new(); USERS]; relays.len()];
    for round in 0..ROUNDS {
        let victim = round % 3;
        for k in 0..PER_ROUND {
            if k == PER_ROUND / 2 {
                workers.workers[victim].kill();
            }
            let n = (round * PER_ROUND + k) as u64;
            let (d, u) = ((n % 2) as usize, (n as usize / 2) % USERS);
            let user = format!("@user{u}:{}", relays[d].server_name);
            let messages = json!({ user: { "DEV": { "n": n } } });
            let txn_id = format!("r{n}");
            let mut accepted = false;
            for attempt in 0..12 {
                let i = (n as usize + attempt) % 3;
                if workers.workers[i].child.is_none() {
                    continue;
                }
                if workers.rpc_send(i, &sender, &txn_id, &messages).await == Some(200) {
                    accepted = true;
                    break;
                }
            }
            assert!(accepted, "message {n} not accepted:\n{}", workers.logs());
            expected[d][u].insert(n);
        }
        workers.restart(victim).await;
    }

    for (d, r) in relays.iter().enumerate() {
        for (u, want) in expected[d].iter().enumerate() {
            let (events, since) = r
                .sync_until(&token(r, u), None, want.len(), Duration::from_secs(120))
                .await;
            let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
            for event in &events {
                *counts
                    .entry(event["content"]["n"].as_u64().expect("n"))
                    .or_default() += 1;
            }
            let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
            assert!(
                twice.is_empty(),
                "relay {d} user {u}: delivered twice: {twice:?}"
            );
            assert_eq!(
                &counts.keys().copied().collect::<BTreeSet<_>>(),
                want,
                "relay {d} user {u}: delivered set\n{}",
                workers.logs()
            );
            let after = r.sync(&token(r, u), since.as_deref(), 0).await;
            assert!(
                after.json["to_device"]["events"]
                    .as_array()
                    .is_none_or(|e| e.is_empty()),
                "nothing more after the acknowledgement"
            );
        }
    }
    for r in &relays {
        let metrics = r
            .http
            .get(&format!("{}/metrics", r.rpc_url), Some(&r.rpc_secret))
            .await;
        assert_eq!(metrics.status, 200);
        assert_eq!(
            counter_value(
                &metrics.text,
                "courier_federation_overlapping_transactions_total"
            ),
            0.0,
            "a receiving relay saw two transactions from the workers in flight at once"
        );
    }
}

/// F10: two processes with one `[worker] name` would share every lease, so
/// the second is refused at start-up while the first is alive (after
/// waiting out at most one lease, in case the holder had just died), and may
/// start as soon as the first shut down cleanly and released the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_a_live_name_is_refused() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    courier::tls::install_crypto_provider();
    let conninfo = cluster.fresh_database().await;
    let names = vec!["same".to_owned(), "same".to_owned()];
    let mut workers = Workers::configure(names, &conninfo, None, 1_500);
    workers.workers[0].spawn();
    workers.workers[0].wait_ready().await;
    workers.workers[1].spawn();
    let status = workers.workers[1].wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "the duplicate must fail: {status}");
    let log = std::fs::read_to_string(&workers.workers[1].log).unwrap_or_default();
    assert!(
        log.contains("worker name \"same\" is held by a live worker"),
        "the error names the conflict:\n{log}"
    );
    // The first is unaffected: it still serves.
    let url = format!("{}/_matrix/client/versions", workers.workers[0].client_url);
    assert!(matches!(
        try_request("GET", &url, None, None).await,
        Some((200, _))
    ));
    // A clean shutdown releases the name: the second starts at once.
    workers.workers[0].terminate();
    workers.workers[1].spawn();
    workers.workers[1].wait_ready().await;
}

/// What the outbox holds for one destination, as a resumed stale worker's
/// writes could change it: queued and in-flight rows, quarantine, and the
/// retry state with its activity stamp.
async fn outbox_state(db: &tokio_postgres::Client, destination: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (table, sql) in [
        (
            "outbox",
            "SELECT seq::text || ' ' || refusals::text FROM outbox WHERE destination = $1
             ORDER BY seq",
        ),
        (
            "outbox_txn",
            "SELECT txn_id || ' ' || seqs::text FROM outbox_txn WHERE destination = $1",
        ),
        (
            "quarantine",
            "SELECT seq::text || ' ' || reason FROM quarantine WHERE destination = $1 ORDER BY seq",
        ),
        (
            "destinations",
            "SELECT concat_ws(' ', failures, retry_after_ts, last_success_ts, last_error, updated_ts)
             FROM destinations WHERE destination = $1",
        ),
    ] {
        for row in db.query(sql, &[&destination]).await.expect(table) {
            out.push(format!("{table}: {}", row.get::<_, String>(0)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_changes_nothing_after_takeover() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    courier::tls::install_crypto_provider();
    let conninfo = cluster.fresh_database().await;
    let ca = TestCa::new();
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let ca_pem = ca.write_pem(ca_dir.path());
    let remote = FakeRemote::start(&ca, &["localhost"]).await;
    let destination = format!("localhost:{}", remote.port());
    // The first /send is held for a while and then fails: its sender will
    // be paused meanwhile, and when it resumes it sees the failure and
    // would back off (a retry-state write) on a destination it lost.
    remote.script_default(Script {
        fail_next: 1,
        respond_after: Some(Duration::from_secs(2)),
        ..Script::default()
    });
    const LEASE_MS: u64 = 1_500;
    let workers = Workers::start(2, &conninfo, Some(&ca_pem), LEASE_MS).await;
    let sender = workers.user("sender");
    let (db, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect to the workers' database");
    tokio::spawn(connection);
    let message = |n: u64| json!({ format!("@user:{destination}"): { "DEV": { "n": n } } });

    assert_eq!(
        workers.rpc_send(0, &sender, "m0", &message(0)).await,
        Some(200)
    );
    assert!(
        remote
            .wait_for(Duration::from_secs(30), |r| !r.is_empty())
            .await,
        "no /send arrived:\n{}",
        workers.logs()
    );
    // Later sends get a 200 at once.
    remote.script_default(Script::default());
    // The sender holds the lease: pause it while its /send is in flight.
    let holder: String = db
        .query_one(
            "SELECT owner FROM destination_leases WHERE destination = $1",
            &[&destination],
        )
        .await
        .expect("lease owner")
        .get(0);
    let stale = workers
        .workers
        .iter()
        .position(|w| w.name == holder)
        .expect("the holder is one of the workers");
    let other = 1 - stale;
    workers.workers[stale].signal("STOP");
    const MESSAGES: u64 = 10;
    for n in 1..MESSAGES {
        assert_eq!(
            workers
                .rpc_send(other, &sender, &format!("m{n}"), &message(n))
                .await,
            Some(200)
        );
    }

    // The other worker takes over once the lease lapses, resends the
    // recorded transaction and delivers everything.
    let all: BTreeSet<u64> = (0..MESSAGES).collect();
    let done = remote
        .wait_for(Duration::from_secs(60), |received| {
            delivered(received).keys().copied().collect::<BTreeSet<_>>() == all
        })
        .await;
    assert!(done, "not all delivered:\n{}", workers.logs());
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let state = outbox_state(&db, &destination).await;
        // ("outbox" also matches the "outbox_txn" rows.)
        if !state.iter().any(|row| row.starts_with("outbox")) {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain: {state:?}\n{}",
            workers.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let owner: Option<(String, i64)> = db
        .query_opt(
            "SELECT owner, epoch FROM destination_leases WHERE destination = $1",
            &[&destination],
        )
        .await
        .expect("lease")
        .map(|row| (row.get(0), row.get(1)));
    assert!(
        owner.as_ref().is_none_or(|(o, _)| *o != holder),
        "the paused worker still holds the lease: {owner:?}"
    );

    // Resume the stale worker: it reads its failed /send and tries to
    // back off; the write is fenced out and changes nothing. (Unfenced, it
    // would overwrite the new holder's retry state.)
    workers.workers[stale].signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fenced = workers
            .metric(stale, "courier_lease_fenced_writes_total")
            .await;
        let state = outbox_state(&db, &destination).await;
        assert_eq!(
            state,
            before,
            "the stale worker changed the outbox:\n{}",
            workers.logs()
        );
        if fenced >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed worker made no fenced-out write:\n{}",
            workers.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        outbox_state(&db, &destination).await,
        before,
        "the stale worker changed the outbox after its fenced write:\n{}",
        workers.logs()
    );
    let stale_log = std::fs::read_to_string(&workers.workers[stale].log).unwrap_or_default();
    assert!(stale_log.contains("write fenced out"), "{stale_log}");

    // Every message once; nothing both delivered and quarantined; a txnId
    // that went out twice (the takeover's resend) carried the same bytes
    // (`delivered` checks that for the answered ones, this for all).
    let received = remote.received();
    let counts = delivered(&received);
    assert_eq!(counts.keys().copied().collect::<BTreeSet<_>>(), all);
    assert!(
        counts.values().all(|c| *c == 1),
        "delivered twice: {counts:?}"
    );
    assert!(
        !before.iter().any(|row| row.starts_with("quarantine")),
        "delivered rows in quarantine: {before:?}"
    );
    let mut bodies: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &received {
        let first = *bodies.entry(&r.txn_id).or_insert(&r.body);
        assert_eq!(first, r.body, "txn {} sent with other bytes", r.txn_id);
    }
    assert!(
        received.len() > bodies.len(),
        "the recorded transaction was resent by the new holder: {received:?}"
    );
}
