//! Device-list updates end to end between two real relays (issue 16): user
//! `a` on relay A (in this process, `TestRelay`, display names allowed over
//! federation) and user `b` on relay B (a `courier serve` child process, so
//! that it can be SIGKILLed and restarted on the same database). `b`
//! queries `a`'s keys, so B tracks `a` and A records B's interest; then
//!
//! 1. with B stopped, `a` adds two devices, renames one and deletes one; B
//!    restarts;
//! 2. `a` adds a device, B is SIGKILLed at once, `a` renames, deletes and
//!    adds; B restarts on the same database;
//! 3. with B stopped and A's sender to B held in backoff behind a to-device
//!    message, one device of `a` is renamed 1,000 times; B restarts.
//!
//! After each, within a bounded wait, `b`'s `/sync` shows `a` in
//! `device_lists.changed` and B's `/keys/query` for `a` answers exactly A's
//! current device set: the same device IDs, keys and display names. In
//! (3), B received exactly one `m.device_list_update` after its restart
//! (B's own `courier_federation_edus_total`, read from the child's
//! `/metrics`, so no other test's relay counts).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::e2ee::TestDevice;
use crate::support::http::HttpClient;
use crate::support::relay::{encode, repo_root};
use crate::support::{TestRelay, TestRelayOptions};
use courier::keys::ServerSigningKey;
use serde_json::{Value, json};

/// The bound on every wait for B to catch up (not a timing assertion: the
/// waits end as soon as the state is right).
const WITHIN: Duration = Duration::from_secs(60);
const B_SECRET: &str = "dl-e2e-rpc-secret";

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("addr").port()
}

/// Relay B: `courier serve` in a child process over its own directory.
struct ChildRelay {
    server_name: String,
    client_url: String,
    rpc_url: String,
    config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<Child>,
    http: HttpClient,
}

impl ChildRelay {
    async fn start_new() -> ChildRelay {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().to_path_buf();
        let key = ServerSigningKey::generate("b");
        std::fs::write(path.join("signing.key"), key.to_file_contents()).expect("key written");
        let (fed, client, rpc) = (free_port(), free_port(), free_port());
        let server_name = format!("localhost:{fed}");
        let root = repo_root();
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
[client]
bind = "127.0.0.1:{client}"
[rpc]
bind = "127.0.0.1:{rpc}"
secret = "{B_SECRET}"
[store]
sqlite = "{dir}/courier.db"
[e2ee]
resync_retry_ms = 1000
resync_retry_max_ms = 4000
"#,
            dir = path.display(),
            root = root.display(),
        );
        let config_path = path.join("courier.toml");
        std::fs::write(&config_path, config).expect("config written");
        let mut relay = ChildRelay {
            server_name,
            client_url: format!("http://127.0.0.1:{client}"),
            rpc_url: format!("http://127.0.0.1:{rpc}"),
            config: config_path,
            log: path.join("courier.log"),
            _dir: dir,
            child: None,
            http: HttpClient::new(),
        };
        relay.start().await;
        relay
    }

    async fn start(&mut self) {
        assert!(self.child.is_none(), "B is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.args(["serve", "--config"]).arg(&self.config);
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
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/_matrix/client/versions", self.client_url);
        let probe = courier::tools::plain_http::JsonClient::new(Duration::from_secs(2));
        while probe.request("GET", &url, None, None).await.is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("B exited at start-up ({status}):\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "B not ready:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and wait for the exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("send SIGTERM");
            assert!(status.success(), "kill -TERM failed");
            let _ = child.wait();
        }
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL B");
            let _ = child.wait();
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metric(&self, prefix: &str) -> f64 {
        let r = self
            .http
            .get(&format!("{}/metrics", self.rpc_url), Some(B_SECRET))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.text
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a `/keys/query` answer says about one user's devices: device ID →
/// (the `keys` map, the display name).
type View = BTreeMap<String, (Value, Option<String>)>;

async fn query_view(http: &HttpClient, client_url: &str, token: &str, user: &str) -> View {
    let r = http
        .post_json(
            &format!("{client_url}/_matrix/client/v3/keys/query"),
            Some(token),
            &json!({"device_keys": {user: []}, "timeout": 5000}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["device_keys"][user]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, keys)| {
            let name = keys["unsigned"]["device_display_name"]
                .as_str()
                .map(str::to_owned);
            (id.clone(), (keys["keys"].clone(), name))
        })
        .collect()
}

struct Pair {
    a: TestRelay,
    b: ChildRelay,
    alice: TestDevice,
    bob_token: String,
    alice_id: String,
    /// b's last `/sync` token.
    since: String,
    /// The to-device contents b received, in order.
    received: Vec<Value>,
}

impl Pair {
    async fn new() -> Pair {
        let a = TestRelay::spawn_with(TestRelayOptions {
            e2ee_extra: "device_names_over_federation = true\n".to_owned(),
            ..TestRelayOptions::default()
        })
        .await;
        let b = ChildRelay::start_new().await;
        // a's control device (no keys, so in no key answer) drives the
        // changes and asks A for the truth; A1 is the first keyed device.
        let alice = TestDevice::register(&a, "alice", "CTRL", 9).await;
        let first = TestDevice::register(&a, "alice", "A1", 1).await;
        upload_keys(&a, &first).await;
        let alice_id = alice.user_id.clone();
        let bob = format!("@bob:{}", b.server_name);
        let bob_token = "tok-bob".to_owned();
        let r = b
            .http
            .put_json(
                &format!("{}/_courier/v1/devices/{}/B1", b.rpc_url, encode(&bob)),
                Some(B_SECRET),
                &json!({"access_token": bob_token}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let mut pair = Pair {
            a,
            b,
            alice,
            bob_token,
            alice_id,
            since: String::new(),
            received: Vec::new(),
        };
        let first = pair.b_sync(None, 0).await;
        pair.since = first["next_batch"].as_str().expect("token").to_owned();
        // b queries a's keys: B asks A live, tracks a; A records B.
        let view = pair.b_view().await;
        assert_eq!(view, pair.truth().await, "the first, live answer");
        pair
    }

    async fn b_sync(&self, since: Option<&str>, timeout_ms: u64) -> Value {
        let mut url = format!(
            "{}/_matrix/client/v3/sync?timeout={timeout_ms}",
            self.b.client_url
        );
        if let Some(since) = since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        let r = self.b.http.get(&url, Some(&self.bob_token)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json
    }

    async fn b_view(&self) -> View {
        query_view(
            &self.b.http,
            &self.b.client_url,
            &self.bob_token,
            &self.alice_id,
        )
        .await
    }

    /// A's own answer about a: the truth B must converge to.
    async fn truth(&self) -> View {
        query_view(
            &self.a.http,
            &self.a.client_url,
            &self.alice.token,
            &self.alice_id,
        )
        .await
    }

    async fn add_device(&self, device_id: &str, seed: u8) -> TestDevice {
        let device = TestDevice::register(&self.a, "alice", device_id, seed).await;
        upload_keys(&self.a, &device).await;
        device
    }

    async fn rename(&self, device_id: &str, name: &str) {
        let r = self
            .a
            .http
            .put_json(
                &format!(
                    "{}/_matrix/client/v3/devices/{device_id}",
                    self.a.client_url
                ),
                Some(&self.alice.token),
                &json!({"display_name": name}),
            )
            .await;
        assert_eq!(r.status, 200, "rename {device_id}: {}", r.text);
    }

    async fn delete(&self, device_id: &str) {
        let url = format!(
            "{}/_courier/v1/devices/{}/{device_id}",
            self.a.rpc_url,
            encode(&self.alice_id)
        );
        let r = self
            .a
            .http
            .request("DELETE", &url, Some(&self.a.rpc_secret), None)
            .await;
        assert_eq!(r.status, 200, "delete {device_id}: {}", r.text);
    }

    /// Waits until b's `/sync` has shown `a` in `device_lists.changed` and
    /// B's answer about a equals A's; returns the device IDs.
    async fn converge(&mut self, what: &str) -> Vec<String> {
        let truth = self.truth().await;
        let deadline = Instant::now() + WITHIN;
        let mut changed_seen = false;
        let mut view = View::new();
        while Instant::now() < deadline {
            let sync = self.b_sync(Some(&self.since.clone()), 1000).await;
            self.since = sync["next_batch"].as_str().expect("token").to_owned();
            for event in sync["to_device"]["events"].as_array().into_iter().flatten() {
                self.received.push(event["content"].clone());
            }
            let changed = sync["device_lists"]["changed"].as_array().cloned();
            if changed
                .unwrap_or_default()
                .iter()
                .any(|u| u == self.alice_id.as_str())
            {
                changed_seen = true;
            }
            view = self.b_view().await;
            if changed_seen && view == truth {
                return truth.keys().cloned().collect();
            }
        }
        panic!(
            "{what}: B did not converge within {WITHIN:?} (changed seen: {changed_seen})\n\
             truth {truth:?}\nB's view {view:?}\nB's log:\n{}",
            self.b.logs()
        );
    }
}

async fn upload_keys(relay: &TestRelay, device: &TestDevice) {
    let r = relay
        .http
        .post_json(
            &format!("{}/_matrix/client/v3/keys/upload", relay.client_url),
            Some(&device.token),
            &json!({"device_keys": device.device_keys()}),
        )
        .await;
    assert_eq!(r.status, 200, "upload {}: {}", device.device_id, r.text);
}

/// Waits until A has recorded a failed attempt to B.
async fn wait_for_failure(a: &TestRelay, destination: &str) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let r = a
            .http
            .get(
                &format!("{}/_courier/v1/destinations", a.rpc_url),
                Some(&a.rpc_secret),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let failed = r.json["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["destination"] == destination && d["failures"].as_u64().unwrap_or(0) >= 1);
        if failed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no failed attempt to {destination}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until A has nothing queued or in flight for `destination`.
async fn wait_for_empty_queue(a: &TestRelay, destination: &str) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let r = a
            .http
            .get(
                &format!("{}/_courier/v1/destinations", a.rpc_url),
                Some(&a.rpc_secret),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let pending: u64 = r.json["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["destination"] == destination)
            .map(|d| d["pending_edus"].as_u64().unwrap_or(0))
            .sum();
        if pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "A still holds {pending} EDUs for {destination}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_device_list_follows_changes_across_downtime_sigkill_and_coalescing() {
    let mut pair = Pair::new().await;

    // (1) B stopped: two devices added, one renamed, one deleted.
    pair.b.stop();
    pair.add_device("A2", 2).await;
    pair.add_device("A3", 3).await;
    pair.rename("A2", "second laptop").await;
    pair.delete("A1").await;
    pair.b.start().await;
    let devices = pair.converge("after B's downtime").await;
    assert_eq!(devices, vec!["A2", "A3"]);
    let view = pair.b_view().await;
    assert_eq!(view["A2"].1.as_deref(), Some("second laptop"));

    // (2) B SIGKILLed in the middle of the changes, restarted on the same
    // database.
    pair.add_device("A4", 4).await;
    pair.b.kill();
    pair.rename("A3", "tablet").await;
    pair.delete("A2").await;
    pair.add_device("A5", 5).await;
    pair.b.start().await;
    let devices = pair.converge("after B's SIGKILL").await;
    assert_eq!(devices, vec!["A3", "A4", "A5"]);

    // (3) B stopped once A holds nothing for it (every earlier update
    // acknowledged, so none is resent); A's sender to B held in backoff
    // behind a to-device message, so no device-list row is in flight;
    // 1,000 renames of A4.
    wait_for_empty_queue(&pair.a, &pair.b.server_name).await;
    pair.b.stop();
    let bob = format!("@bob:{}", pair.b.server_name);
    let r = pair
        .a
        .send_to_device(
            &pair.alice.token,
            "org.example.dl",
            "hold",
            json!({ bob: { "B1": { "id": "hold" } } }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    wait_for_failure(&pair.a, &pair.b.server_name).await;
    for n in 0..1000 {
        pair.rename("A4", &format!("name {n}")).await;
    }
    pair.b.start().await;
    pair.converge("after 1,000 renames").await;
    let view = pair.b_view().await;
    assert_eq!(view["A4"].1.as_deref(), Some("name 999"));
    let updates = pair
        .b
        .metric("courier_federation_edus_total{edu_type=\"m.device_list_update\"}")
        .await;
    assert_eq!(updates, 1.0, "one coalesced update after the restart");
    // The held message arrived too, once.
    let deadline = Instant::now() + WITHIN;
    while pair.received.is_empty() && Instant::now() < deadline {
        let sync = pair.b_sync(Some(&pair.since.clone()), 1000).await;
        pair.since = sync["next_batch"].as_str().expect("token").to_owned();
        for event in sync["to_device"]["events"].as_array().into_iter().flatten() {
            pair.received.push(event["content"].clone());
        }
    }
    let quiet = pair.b_sync(Some(&pair.since.clone()), 0).await;
    assert_eq!(quiet["to_device"]["events"], json!([]));
    assert_eq!(pair.received, vec![json!({"id": "hold"})]);
}
