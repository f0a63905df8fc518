//! The fault-injection soak (issue 18): two relays, A and B, each a
//! `courier serve` child process on SQLite, federating through a
//! [`FaultProxy`] each (A's server name is the port of the proxy in front of
//! A's federation listener, so all of B's traffic to A, key fetches
//! included, crosses it; the same for B), under a steady to-device load in
//! both directions while
//!
//! - each proxy draws a fault per connection from the seed: added delay, a
//!   reset mid-request or mid-response, a truncated response, a `503`
//!   answered by the proxy, a stalled peer;
//! - either relay is SIGKILLed at random intervals and restarted on the
//!   same store and ports after a random pause;
//! - every device of both relays sends, one request at a time, to an
//!   explicit device or to `*` of a user on the other relay; a message
//!   carries its sender and a sequence number per (sender, recipient user),
//!   so each recipient device sees a rising sequence per sender; a send that
//!   failed (no answer, or not `200`) is retried with the same txnId until
//!   it gets `200`, and one in ten acknowledged sends is sent again with the
//!   same txnId (a client that lost the answer);
//! - every device long-polls `/sync` and acknowledges by the next `since`.
//!
//! After the storm, faults off and both relays up, the load stops and the
//! queues drain. Then: every acknowledged message was delivered to every
//! device it named, none twice, none that was not sent, in order per
//! (sender, device); and neither relay's RSS (`VmRSS`, sampled every half
//! second) passed [`RSS_LIMIT_KIB`].
//!
//! Two small tests keep the harness honest: the proxy passes TLS, answers
//! its own `503` and stalls when told to; the checker finds each kind of
//! problem in a made-up delivery.
//!
//! `COURIER_SOAK_SEED` replays a seed (it fixes the faults, the kills and
//! the load; the timing is the machine's); `COURIER_SOAK_MINUTES=N` makes the
//! storm last N minutes instead of [`SHORT_STORM`] (see README's "Tests").
//! The report line (seed, counts, faults by kind, maximum RSS) is printed
//! with `--nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier::keys::ServerSigningKey;
use courier::tools::plain_http::JsonClient;
use serde_json::{Value, json};

use crate::support::fault_proxy::{FaultProxy, SoakRng};
use crate::support::relay::{encode, repo_root};

/// The storm of the CI version.
const SHORT_STORM: Duration = Duration::from_secs(40);
/// The bound on the drain after the storm (it ends as soon as all arrived).
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// The bound on one send's retries (a relay down that long is a failure).
const SEND_LIMIT: Duration = Duration::from_secs(120);
/// Generous: a relay at rest holds far less (BENCHMARKS.md).
const RSS_LIMIT_KIB: u64 = 300 * 1024;
const RPC_SECRET: &str = "soak-rpc-secret-long";
const EVENT_TYPE: &str = "org.example.soak";
/// Users per relay, and devices per user.
const USERS: usize = 2;
const DEVICES: usize = 2;

/// Takes a lock even if a panicking task poisoned it (the panic is what
/// the test reports).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A free port below the kernel's ephemeral range (as in `workers`), so no
/// outgoing connection (the proxies make many) takes a killed relay's port
/// before its restart binds it again; handed out from one counter.
fn free_port() -> u16 {
    static NEXT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(rand::random_range(0..2_500)));
    for _ in 0..2_500 {
        let port = 30_000 + (next.fetch_add(1, Ordering::Relaxed) % 2_500) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 30000..32500");
}

/// One relay: a `courier serve` child (or its config, while it is down).
struct SoakRelay {
    name: &'static str,
    server_name: String,
    client_url: String,
    rpc_url: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The running child's pid (0 while down), for the RSS sampler.
    pid: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
}

impl SoakRelay {
    /// Writes the config of a relay named `localhost:<public_port>` whose
    /// federation listener is on `fed` (the proxy forwards one to the
    /// other), and starts it.
    async fn start_new(name: &'static str, public_port: u16, fed: u16) -> SoakRelay {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().to_path_buf();
        let key = ServerSigningKey::generate(name);
        std::fs::write(path.join("signing.key"), key.to_file_contents()).expect("key written");
        let (client, rpc) = (free_port(), free_port());
        let server_name = format!("localhost:{public_port}");
        let root = repo_root();
        // Short timeouts so that a stalled connection costs seconds, and
        // fast retries so that the drain is quick.
        let config = format!(
            r#"
server_name = "{server_name}"
signing_key_path = "{dir}/signing.key"
[federation]
bind = "127.0.0.1:{fed}"
tls_cert = "{root}/certs/localhost.crt"
tls_key = "{root}/certs/localhost.key"
extra_ca = ["{root}/certs/dev-ca.crt"]
ip_allow = ["127.0.0.0/8", "::1/128"]
retry_initial_ms = 200
retry_max_ms = 2000
connect_timeout_ms = 2000
request_timeout_ms = 5000
[client]
bind = "127.0.0.1:{client}"
[rpc]
bind = "127.0.0.1:{rpc}"
secret = "{RPC_SECRET}"
[store]
sqlite = "{dir}/courier.db"
"#,
            dir = path.display(),
            root = root.display(),
        );
        let config_path = path.join("courier.toml");
        std::fs::write(&config_path, config).expect("config written");
        let mut relay = SoakRelay {
            name,
            server_name,
            client_url: format!("http://127.0.0.1:{client}"),
            rpc_url: format!("http://127.0.0.1:{rpc}"),
            config: config_path,
            log: path.join("courier.log"),
            child: None,
            pid: Arc::new(AtomicU32::new(0)),
            _dir: dir,
        };
        relay.start().await;
        relay
    }

    async fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.args(["serve", "--config"]).arg(&self.config);
        // Every COURIER_* variable is a config override: keep the test's
        // (COURIER_SOAK_*) out of the relay's config.
        for (name, _) in std::env::vars() {
            if name.starts_with("COURIER_") {
                cmd.env_remove(name);
            }
        }
        let child = cmd
            .env("COURIER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn courier serve");
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/_matrix/client/versions", self.client_url);
        let probe = JsonClient::new(Duration::from_secs(2));
        while probe.request("GET", &url, None, None).await.is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited at start-up ({status}):\n{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.pid.store(0, Ordering::Relaxed);
            child.kill().expect("SIGKILL relay");
            let _ = child.wait();
        }
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    async fn register(&self, user: &str, device: &str, token: &str) {
        let url = format!(
            "{}/_courier/v1/devices/{}/{}",
            self.rpc_url,
            encode(user),
            encode(device)
        );
        let r = JsonClient::new(Duration::from_secs(20))
            .request(
                "PUT",
                &url,
                Some(RPC_SECRET),
                Some(&json!({ "access_token": token })),
            )
            .await
            .expect("register over the RPC");
        assert_eq!(r.status, 200, "register {user}/{device}: {}", r.body);
    }
}

impl Drop for SoakRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the run's parameters are, from the environment.
struct Plan {
    seed: u64,
    storm: Duration,
    /// Pause between two kills (uniform in this range, ms).
    kill_every_ms: (u64, u64),
    /// Downtime after a kill (ms).
    down_ms: (u64, u64),
    /// Pause between two sends of one device (ms).
    send_pause_ms: (u64, u64),
}

impl Plan {
    fn from_env() -> Plan {
        let seed = match std::env::var("COURIER_SOAK_SEED") {
            Ok(text) => text.trim().parse().expect("COURIER_SOAK_SEED is a u64"),
            Err(_) => rand::random(),
        };
        let storm = match std::env::var("COURIER_SOAK_MINUTES") {
            Ok(text) => {
                let minutes: f64 = text
                    .trim()
                    .parse()
                    .expect("COURIER_SOAK_MINUTES is a number");
                assert!(minutes > 0.0, "COURIER_SOAK_MINUTES must be positive");
                Duration::from_secs_f64(minutes * 60.0)
            }
            Err(_) => SHORT_STORM,
        };
        Plan {
            seed,
            storm,
            kill_every_ms: (3_000, 9_000),
            down_ms: (0, 1_500),
            send_pause_ms: (10, 120),
        }
    }
}

/// One device of the soak: who it is and where it lives.
#[derive(Clone, Debug)]
struct Device {
    relay: usize,
    user: String,
    device: String,
    token: String,
}

impl Device {
    /// `@user:server/DEVICE`: a message's `from` and a receiver's name.
    fn key(&self) -> String {
        format!("{}/{}", self.user, self.device)
    }
}

/// Whom one message was addressed to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Device(String),
    All,
}

/// One acknowledged message.
#[derive(Clone, Debug)]
struct Sent {
    from: String,
    to_user: String,
    target: Target,
    seq: u64,
}

/// Counters the clients share.
#[derive(Default)]
struct ClientCounts {
    sends: AtomicU64,
    failed_attempts: AtomicU64,
    repeated_txns: AtomicU64,
    syncs: AtomicU64,
    failed_syncs: AtomicU64,
}

/// One sending device: one request at a time, each retried with its txnId
/// until `200`; returns what was acknowledged.
async fn send_loop(
    me: Device,
    client_url: String,
    peers: Vec<Device>,
    mut rng: SoakRng,
    pause_ms: (u64, u64),
    stop: Arc<AtomicBool>,
    counts: Arc<ClientCounts>,
) -> Vec<Sent> {
    let http = JsonClient::new(Duration::from_secs(15));
    let users: Vec<String> = peers
        .iter()
        .map(|d| d.user.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut next_seq: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = Vec::new();
    let mut request = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let to_user = users[rng.range(0, users.len() as u64) as usize].clone();
        let target = if rng.percent(25) {
            Target::All
        } else {
            Target::Device(format!("D{}", rng.range(0, DEVICES as u64)))
        };
        let seq = next_seq.entry(to_user.clone()).or_insert(0);
        *seq += 1;
        let seq = *seq;
        request += 1;
        let txn_id = format!("{}-{request}", me.device);
        let device_key = match &target {
            Target::Device(d) => d.clone(),
            Target::All => "*".to_owned(),
        };
        let body = json!({ "messages": { &to_user: { device_key: {
            "from": me.key(), "seq": seq, "pad": "x".repeat(rng.range(0, 600) as usize),
        } } } });
        let url = format!(
            "{client_url}/_matrix/client/v3/sendToDevice/{EVENT_TYPE}/{}",
            encode(&txn_id)
        );
        put_until_ok(&http, &url, &me.token, &body, &counts).await;
        counts.sends.fetch_add(1, Ordering::Relaxed);
        sent.push(Sent {
            from: me.key(),
            to_user,
            target,
            seq,
        });
        if rng.percent(10) {
            // The answer "got lost": the same txnId again must not add a
            // message.
            put_until_ok(&http, &url, &me.token, &body, &counts).await;
            counts.repeated_txns.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(rng.range(pause_ms.0, pause_ms.1))).await;
    }
    sent
}

/// PUTs `body` until a `200`. A relay that is down (no answer) or busy
/// (`5xx`, `429`) is retried with the same txnId; anything else fails.
async fn put_until_ok(
    http: &JsonClient,
    url: &str,
    token: &str,
    body: &Value,
    counts: &ClientCounts,
) {
    let deadline = Instant::now() + SEND_LIMIT;
    loop {
        match http.request("PUT", url, Some(token), Some(body)).await {
            Ok(r) if r.status == 200 => return,
            Ok(r) if r.status >= 500 || r.status == 429 => {}
            Ok(r) => panic!("send {url} refused: {} {}", r.status, r.body),
            Err(_) => {}
        }
        counts.failed_attempts.fetch_add(1, Ordering::Relaxed);
        assert!(
            Instant::now() < deadline,
            "send {url} not acknowledged within {SEND_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// One receiving device: long-polls `/sync`, acknowledging by the next
/// `since`, recording `(from, seq)` of every soak event in order. After
/// `stop`, one last `/sync` with timeout 0, then it ends.
async fn sync_loop(
    me: Device,
    client_url: String,
    received: Arc<Mutex<Vec<(String, u64)>>>,
    stop: Arc<AtomicBool>,
    counts: Arc<ClientCounts>,
) {
    let http = JsonClient::new(Duration::from_secs(15));
    let mut since: Option<String> = None;
    let mut last = false;
    let mut last_failures = 0;
    loop {
        if stop.load(Ordering::Relaxed) {
            last = true;
        }
        let timeout = if last { 0 } else { 2_000 };
        let mut url = format!("{client_url}/_matrix/client/v3/sync?timeout={timeout}");
        if let Some(since) = &since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        counts.syncs.fetch_add(1, Ordering::Relaxed);
        let r = match http.request("GET", &url, Some(&me.token), None).await {
            Ok(r) if r.status == 200 => r,
            Ok(r) if r.status >= 500 || r.status == 429 => {
                counts.failed_syncs.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(r) => panic!("sync of {} refused: {} {}", me.key(), r.status, r.body),
            Err(_) => {
                counts.failed_syncs.fetch_add(1, Ordering::Relaxed);
                if last {
                    last_failures += 1;
                    assert!(last_failures < 5, "last sync of {} failed", me.key());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let events = r.body["to_device"]["events"].as_array().cloned();
        {
            let mut received = lock(&received);
            for event in events.into_iter().flatten() {
                assert_eq!(event["type"], EVENT_TYPE, "{event}");
                let from = event["content"]["from"].as_str().unwrap_or("?").to_owned();
                let seq = event["content"]["seq"].as_u64().unwrap_or(0);
                received.push((from, seq));
            }
        }
        since = r.body["next_batch"].as_str().map(str::to_owned);
        assert!(since.is_some(), "sync without next_batch: {}", r.body);
        if last {
            return;
        }
    }
}

/// Messages each device must have got, `(from, seq)` per device key.
fn expected(sent: &[Sent], devices: &[Device]) -> BTreeMap<String, BTreeSet<(String, u64)>> {
    let mut want: BTreeMap<String, BTreeSet<(String, u64)>> =
        devices.iter().map(|d| (d.key(), BTreeSet::new())).collect();
    for message in sent {
        for device in devices.iter().filter(|d| d.user == message.to_user) {
            let named = match &message.target {
                Target::All => true,
                Target::Device(id) => *id == device.device,
            };
            if named {
                want.entry(device.key())
                    .or_default()
                    .insert((message.from.clone(), message.seq));
            }
        }
    }
    want
}

/// Every problem in what the devices received, as lines (empty: none).
fn problems(
    want: &BTreeMap<String, BTreeSet<(String, u64)>>,
    got: &BTreeMap<String, Vec<(String, u64)>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (device, want) in want {
        let got = got.get(device).map(Vec::as_slice).unwrap_or(&[]);
        let mut seen = BTreeSet::new();
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (from, seq) in got {
            if !seen.insert((from.clone(), *seq)) {
                out.push(format!("{device}: duplicate {from} #{seq}"));
            } else if !want.contains(&(from.clone(), *seq)) {
                out.push(format!("{device}: never sent to it: {from} #{seq}"));
            }
            if let Some(prev) = last.insert(from, *seq)
                && prev >= *seq
            {
                out.push(format!("{device}: {from} #{seq} after #{prev}"));
            }
        }
        for (from, seq) in want.difference(&seen) {
            out.push(format!("{device}: lost {from} #{seq}"));
        }
    }
    out
}

/// `VmRSS` of `pid` in KiB, if it is running.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `relay` has nothing queued for any destination (`None`: no
/// answer).
async fn outbox_empty(http: &JsonClient, rpc_url: &str) -> Option<bool> {
    let r = http
        .request(
            "GET",
            &format!("{rpc_url}/_courier/v1/destinations"),
            Some(RPC_SECRET),
            None,
        )
        .await
        .ok()?;
    let rows = r.body["destinations"].as_array()?.clone();
    Some(
        rows.iter()
            .all(|d| d["pending_edus"].as_u64() == Some(0) && d["quarantined"].as_u64() == Some(0)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_faults_and_kills_lose_and_duplicate_nothing() {
    let plan = Plan::from_env();
    println!(
        "soak: seed {} (replay: COURIER_SOAK_SEED={}), storm {:?}",
        plan.seed, plan.seed, plan.storm
    );
    let started = Instant::now();
    let mut rng = SoakRng::new(plan.seed);

    // Proxies first: their ports are the relays' server names.
    let feds = [free_port(), free_port()];
    let proxies = [
        FaultProxy::start(([127, 0, 0, 1], feds[0]).into(), rng.next_u64()).await,
        FaultProxy::start(([127, 0, 0, 1], feds[1]).into(), rng.next_u64()).await,
    ];
    let mut relays = vec![
        SoakRelay::start_new("A", proxies[0].addr.port(), feds[0]).await,
        SoakRelay::start_new("B", proxies[1].addr.port(), feds[1]).await,
    ];
    let mut devices = Vec::new();
    for (r, relay) in relays.iter().enumerate() {
        for u in 0..USERS {
            let user = format!("@u{u}:{}", relay.server_name);
            for d in 0..DEVICES {
                let device = format!("D{d}");
                let token = format!("tok-{}-{u}-{d}", relay.name);
                relay.register(&user, &device, &token).await;
                devices.push(Device {
                    relay: r,
                    user: user.clone(),
                    device,
                    token,
                });
            }
        }
    }
    let client_urls: Vec<String> = relays.iter().map(|r| r.client_url.clone()).collect();
    let rpc_urls: Vec<String> = relays.iter().map(|r| r.rpc_url.clone()).collect();
    let pids: Vec<Arc<AtomicU32>> = relays.iter().map(|r| r.pid.clone()).collect();
    let counts = Arc::new(ClientCounts::default());

    // Receivers, then senders.
    let stop_sync = Arc::new(AtomicBool::new(false));
    let mut received = BTreeMap::new();
    let mut syncs = Vec::new();
    for device in &devices {
        let list = Arc::new(Mutex::new(Vec::new()));
        received.insert(device.key(), list.clone());
        syncs.push(tokio::spawn(sync_loop(
            device.clone(),
            client_urls[device.relay].clone(),
            list,
            stop_sync.clone(),
            counts.clone(),
        )));
    }
    let stop_send = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for device in &devices {
        let peers: Vec<Device> = devices
            .iter()
            .filter(|d| d.relay != device.relay)
            .cloned()
            .collect();
        senders.push(tokio::spawn(send_loop(
            device.clone(),
            client_urls[device.relay].clone(),
            peers,
            rng.fork(),
            plan.send_pause_ms,
            stop_send.clone(),
            counts.clone(),
        )));
    }
    let max_rss = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let stop_rss = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (max_rss, stop_rss, pids) = (max_rss.clone(), stop_rss.clone(), pids.clone());
        tokio::spawn(async move {
            while !stop_rss.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    let pid = pid.load(Ordering::Relaxed);
                    if let Some(kib) = (pid != 0).then(|| rss_kib(pid)).flatten() {
                        max_rss[i].fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Warm-up, faults off: each relay has fetched the other's key once
    // (it is stored, so later restarts need no fetch) when a message from
    // the other side has arrived at both.
    let warm_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let arrived = |relay: usize| {
            devices
                .iter()
                .filter(|d| d.relay == relay)
                .any(|d| !lock(&received[&d.key()]).is_empty())
        };
        if arrived(0) && arrived(1) {
            break;
        }
        assert!(
            Instant::now() < warm_deadline,
            "no message crossed both ways in the warm-up:\n{}\n{}",
            relays[0].logs(),
            relays[1].logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("soak: warm after {:?}", started.elapsed());

    // The storm: faults on, kills.
    for proxy in &proxies {
        proxy.set_faults(true);
    }
    let storm_end = Instant::now() + plan.storm;
    let mut kills = [0u64; 2];
    let mut kill_rng = rng.fork();
    let mut progress = Instant::now();
    loop {
        if progress.elapsed() >= Duration::from_secs(60) {
            progress = Instant::now();
            println!(
                "soak: {:.0} s, {} sends acknowledged, kills A {} B {}",
                started.elapsed().as_secs_f64(),
                counts.sends.load(Ordering::Relaxed),
                kills[0],
                kills[1]
            );
        }
        let pause =
            Duration::from_millis(kill_rng.range(plan.kill_every_ms.0, plan.kill_every_ms.1));
        if Instant::now() + pause >= storm_end {
            break;
        }
        tokio::time::sleep(pause).await;
        let victim = kill_rng.range(0, 2) as usize;
        relays[victim].kill();
        kills[victim] += 1;
        tokio::time::sleep(Duration::from_millis(
            kill_rng.range(plan.down_ms.0, plan.down_ms.1),
        ))
        .await;
        relays[victim].start().await;
    }
    tokio::time::sleep(storm_end.saturating_duration_since(Instant::now())).await;
    for proxy in &proxies {
        proxy.set_faults(false);
    }
    stop_send.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for sender in senders {
        sent.extend(sender.await.expect("sender task"));
    }
    let storm_over = Instant::now();
    println!(
        "soak: storm over after {:?}, {} messages acknowledged",
        started.elapsed(),
        sent.len()
    );

    // The drain: until every device has as many as it should and both
    // outboxes are empty (or the limit).
    let want = expected(&sent, &devices);
    let http = JsonClient::new(Duration::from_secs(10));
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < drain_deadline {
        let all_arrived = want
            .iter()
            .all(|(device, w)| lock(&received[device]).len() >= w.len());
        if all_arrived
            && outbox_empty(&http, &rpc_urls[0]).await == Some(true)
            && outbox_empty(&http, &rpc_urls[1]).await == Some(true)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = storm_over.elapsed();
    stop_sync.store(true, Ordering::Relaxed);
    for sync in syncs {
        sync.await.expect("sync task");
    }
    stop_rss.store(true, Ordering::Relaxed);
    sampler.await.expect("rss sampler");

    let got: BTreeMap<String, Vec<(String, u64)>> = received
        .iter()
        .map(|(k, v)| (k.clone(), lock(v).clone()))
        .collect();
    let delivered: usize = got.values().map(Vec::len).sum();
    let expected_total: usize = want.values().map(BTreeSet::len).sum();
    let faults = |i: usize| {
        proxies[i]
            .counts
            .snapshot()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let max_rss_kib = [
        max_rss[0].load(Ordering::Relaxed),
        max_rss[1].load(Ordering::Relaxed),
    ];
    println!(
        "soak report: seed={} storm_s={:.0} total_s={:.0} drain_s={:.1} sends_acked={} \
         repeated_txns={} failed_send_attempts={} deliveries_expected={expected_total} \
         delivered={delivered} syncs={} failed_syncs={} kills_a={} kills_b={} \
         max_rss_mib_a={:.1} max_rss_mib_b={:.1}\n  faults into A: {}\n  faults into B: {}",
        plan.seed,
        plan.storm.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        drained_in.as_secs_f64(),
        sent.len(),
        counts.repeated_txns.load(Ordering::Relaxed),
        counts.failed_attempts.load(Ordering::Relaxed),
        counts.syncs.load(Ordering::Relaxed),
        counts.failed_syncs.load(Ordering::Relaxed),
        kills[0],
        kills[1],
        max_rss_kib[0] as f64 / 1024.0,
        max_rss_kib[1] as f64 / 1024.0,
        faults(0),
        faults(1),
    );

    let found = problems(&want, &got);
    if !found.is_empty() {
        let shown: Vec<&String> = found.iter().take(40).collect();
        let mut queues = Vec::new();
        for url in &rpc_urls {
            let r = http
                .request(
                    "GET",
                    &format!("{url}/_courier/v1/destinations"),
                    Some(RPC_SECRET),
                    None,
                )
                .await;
            queues.push(r.map(|r| r.body.to_string()).unwrap_or_default());
        }
        panic!(
            "seed {}: {} problems (first {}):\n{}\nA's destinations: {}\nB's destinations: {}\n\
             A's log:\n{}\nB's log:\n{}",
            plan.seed,
            found.len(),
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            queues[0],
            queues[1],
            relays[0].logs(),
            relays[1].logs()
        );
    }
    assert!(sent.len() > 100, "the load ran: {} sends", sent.len());
    assert!(
        kills[0] + kills[1] > 0 || plan.storm < Duration::from_secs(10),
        "relays were killed"
    );
    for (i, relay) in relays.iter().enumerate() {
        assert!(
            max_rss_kib[i] > 0 && max_rss_kib[i] < RSS_LIMIT_KIB,
            "{}'s RSS peaked at {} KiB (limit {RSS_LIMIT_KIB} KiB)",
            relay.name,
            max_rss_kib[i]
        );
    }
    relays.clear();
}

/// The proxy itself, in front of a relay's federation listener: with faults
/// off the key document passes over TLS; a forced `503` is the proxy's own
/// answer over TLS (its body, not the relay's); a stalled connection gets
/// no answer within a second; after `force(None)` requests pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_proxy_passes_tls_and_answers_its_own_503() {
    use crate::support::fault_proxy::Fault;
    use crate::support::tls_client::https_get_json;
    let relay = crate::support::TestRelay::spawn().await;
    let proxy = FaultProxy::start(relay.federation_addr, 1).await;
    let get = || {
        https_get_json(
            proxy.addr,
            "localhost",
            &relay.server_name,
            "/_matrix/key/v2/server",
        )
    };
    let (status, doc) = get().await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["server_name"], relay.server_name.as_str());
    proxy.force(Some(Fault::Inject503));
    let (status, body) = get().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "injected by the soak's fault proxy");
    proxy.force(Some(Fault::Stall));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), get())
            .await
            .is_err(),
        "a stalled connection answers nothing"
    );
    proxy.force(None);
    let (status, _) = get().await;
    assert_eq!(status, 200);
    let counts: BTreeMap<&str, u64> = proxy.counts.snapshot().into_iter().collect();
    assert_eq!(
        (counts["passed"], counts["injected_503"], counts["stalled"]),
        (2, 1, 1)
    );
}

/// The checker itself: a loss, a duplicate, a message out of order and one
/// never sent to the device are each found; a clean run has no problem.
#[test]
fn the_checker_finds_loss_duplicates_disorder_and_strangers() {
    let devices: Vec<Device> = ["D0", "D1"]
        .iter()
        .map(|d| Device {
            relay: 1,
            user: "@u0:b".to_owned(),
            device: (*d).to_owned(),
            token: String::new(),
        })
        .collect();
    let sent: Vec<Sent> = [
        (1, Target::Device("D0".to_owned())),
        (2, Target::All),
        (3, Target::Device("D1".to_owned())),
        (4, Target::Device("D0".to_owned())),
    ]
    .into_iter()
    .map(|(seq, target)| Sent {
        from: "@s:a/S".to_owned(),
        to_user: "@u0:b".to_owned(),
        target,
        seq,
    })
    .collect();
    let want = expected(&sent, &devices);
    let s = |seq: u64| ("@s:a/S".to_owned(), seq);
    let clean = BTreeMap::from([
        ("@u0:b/D0".to_owned(), vec![s(1), s(2), s(4)]),
        ("@u0:b/D1".to_owned(), vec![s(2), s(3)]),
    ]);
    assert_eq!(problems(&want, &clean), Vec::<String>::new());
    let bad = BTreeMap::from([
        ("@u0:b/D0".to_owned(), vec![s(2), s(1), s(3), s(1)]),
        ("@u0:b/D1".to_owned(), vec![s(2)]),
    ]);
    assert_eq!(
        problems(&want, &bad),
        vec![
            "@u0:b/D0: @s:a/S #1 after #2",
            "@u0:b/D0: never sent to it: @s:a/S #3",
            "@u0:b/D0: duplicate @s:a/S #1",
            "@u0:b/D0: @s:a/S #1 after #3",
            "@u0:b/D0: lost @s:a/S #4",
            "@u0:b/D1: lost @s:a/S #3",
        ]
    );
}
