//! `TestRelay`: a real Courier relay on loopback for integration tests. It
//! binds three listeners on 127.0.0.1 port 0, names itself
//! `localhost:<federation port>`, serves federation over TLS with the
//! repository's development certificates (`certs/`), and keeps its SQLite
//! store and signing key in a temporary directory that survives `stop()`, so
//! `restart()` brings the same relay back on the same ports and store.

use std::path::PathBuf;
use std::time::Duration;

use courier::config::Config;
use courier::keys::ServerSigningKey;
use courier::server::{Listeners, run};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::http::{HttpClient, Response};

/// Knobs a test may turn; `Default` gives fast retries suitable for tests.
#[derive(Clone, Debug)]
pub struct TestRelayOptions {
    /// Extra TOML lines appended to the `[federation]` section.
    pub federation_extra: String,
    /// Use `127.0.0.1:<port>` as the server name instead of `localhost:<port>`.
    pub ip_server_name: bool,
    /// Extra TOML lines appended to the `[client]` section.
    pub client_extra: String,
    /// TOML lines of the `[e2ee]` section.
    pub e2ee_extra: String,
}

impl Default for TestRelayOptions {
    fn default() -> Self {
        TestRelayOptions {
            federation_extra: "retry_initial_ms = 200\nretry_max_ms = 2000\n".to_owned(),
            ip_server_name: false,
            client_extra: String::new(),
            e2ee_extra: String::new(),
        }
    }
}

pub struct TestRelay {
    pub server_name: String,
    pub federation_addr: std::net::SocketAddr,
    pub client_url: String,
    pub rpc_url: String,
    pub rpc_secret: String,
    pub dir: PathBuf,
    pub http: HttpClient,
    options: TestRelayOptions,
    ports: (u16, u16, u16),
    _tempdir: Option<tempfile::TempDir>,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

/// The repository root (where `certs/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl TestRelay {
    pub async fn spawn() -> TestRelay {
        Self::spawn_with(TestRelayOptions::default()).await
    }

    pub async fn spawn_with(options: TestRelayOptions) -> TestRelay {
        courier::tls::install_crypto_provider();
        let tempdir = tempfile::tempdir().expect("temporary directory");
        let dir = tempdir.path().to_path_buf();
        let key = ServerSigningKey::generate("test");
        std::fs::write(dir.join("signing.key"), key.to_file_contents()).expect("key written");
        let listeners = bind_listeners(0, 0, 0).await;
        let ports = (
            listeners.federation.local_addr().expect("addr").port(),
            listeners.client.local_addr().expect("addr").port(),
            listeners.rpc.local_addr().expect("addr").port(),
        );
        let mut relay = TestRelay {
            server_name: if options.ip_server_name {
                format!("127.0.0.1:{}", ports.0)
            } else {
                format!("localhost:{}", ports.0)
            },
            federation_addr: ([127, 0, 0, 1], ports.0).into(),
            client_url: format!("http://127.0.0.1:{}", ports.1),
            rpc_url: format!("http://127.0.0.1:{}", ports.2),
            rpc_secret: "test-rpc-secret-long".to_owned(),
            dir,
            http: HttpClient::new(),
            options,
            ports,
            _tempdir: Some(tempdir),
            running: None,
        };
        relay.start_on(listeners).await;
        relay
    }

    /// The configuration this relay runs with.
    pub fn config(&self) -> Config {
        let root = repo_root();
        let text = format!(
            r#"
server_name = "{server_name}"
signing_key_path = "{dir}/signing.key"
[federation]
bind = "127.0.0.1:{fed}"
tls_cert = "{root}/certs/localhost.crt"
tls_key = "{root}/certs/localhost.key"
extra_ca = ["{root}/certs/dev-ca.crt"]
ip_allow = ["127.0.0.0/8", "::1/128"]
{extra}
[client]
bind = "127.0.0.1:{client}"
{client_extra}
[rpc]
bind = "127.0.0.1:{rpc}"
secret = "{secret}"
[store]
sqlite = "{dir}/courier.db"
[e2ee]
{e2ee_extra}
"#,
            server_name = self.server_name,
            dir = self.dir.display(),
            root = root.display(),
            fed = self.ports.0,
            client = self.ports.1,
            rpc = self.ports.2,
            secret = self.rpc_secret,
            extra = self.options.federation_extra,
            client_extra = self.options.client_extra,
            e2ee_extra = self.options.e2ee_extra,
        );
        Config::from_toml_str(&text, "test relay", std::iter::empty()).expect("valid test config")
    }

    /// Path of the relay's SQLite database.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("courier.db")
    }

    async fn start_on(&mut self, listeners: Listeners) {
        let shutdown = CancellationToken::new();
        let config = self.config();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            if let Err(error) = run(config, listeners, token).await {
                panic!("test relay failed: {error}");
            }
        });
        self.running = Some((shutdown, handle));
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let probe = courier::tools::plain_http::JsonClient::new(Duration::from_secs(2));
        let url = format!("{}/_matrix/client/versions", self.client_url);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // Any HTTP answer means the listener is serving.
        while probe.request("GET", &url, None, None).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the relay (as on SIGTERM) and waits for it to finish. The store
    /// and key stay for `restart`.
    pub async fn stop(&mut self) {
        if let Some((shutdown, handle)) = self.running.take() {
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("relay stopped within 30 s")
                .expect("relay task did not panic");
        }
    }

    /// Starts the stopped relay again on the same ports, store and key.
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "restart() needs a stopped relay");
        let listeners = bind_listeners(self.ports.0, self.ports.1, self.ports.2).await;
        self.start_on(listeners).await;
    }

    // ---- convenience calls --------------------------------------------------

    /// Registers a device with an access token over the RPC.
    pub async fn register_device(&self, user_id: &str, device_id: &str, token: &str) {
        let url = format!(
            "{}/_courier/v1/devices/{}/{}",
            self.rpc_url,
            encode(user_id),
            encode(device_id)
        );
        let r = self
            .http
            .put_json(
                &url,
                Some(&self.rpc_secret),
                &json!({ "access_token": token }),
            )
            .await;
        assert_eq!(r.status, 200, "register {user_id}/{device_id}: {}", r.text);
    }

    /// `PUT /sendToDevice` as the device owning `token`.
    pub async fn send_to_device(
        &self,
        token: &str,
        event_type: &str,
        txn_id: &str,
        messages: Value,
    ) -> Response {
        let url = format!(
            "{}/_matrix/client/v3/sendToDevice/{}/{}",
            self.client_url,
            encode(event_type),
            encode(txn_id)
        );
        self.http
            .put_json(&url, Some(token), &json!({ "messages": messages }))
            .await
    }

    /// `GET /sync` with optional `since` and `timeout` (ms).
    pub async fn sync(&self, token: &str, since: Option<&str>, timeout_ms: u64) -> Response {
        let mut url = format!(
            "{}/_matrix/client/v3/sync?timeout={timeout_ms}",
            self.client_url
        );
        if let Some(since) = since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        self.http.get(&url, Some(token)).await
    }

    /// Syncs until `want` to-device events arrived in total or `deadline`
    /// passed, acknowledging as it goes. Returns the events and the last
    /// `next_batch`.
    pub async fn sync_until(
        &self,
        token: &str,
        since: Option<String>,
        want: usize,
        deadline: Duration,
    ) -> (Vec<Value>, Option<String>) {
        let end = tokio::time::Instant::now() + deadline;
        let mut since = since;
        let mut events = Vec::new();
        while events.len() < want && tokio::time::Instant::now() < end {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let timeout = left.as_millis().min(5_000) as u64;
            let r = self.sync(token, since.as_deref(), timeout).await;
            assert_eq!(r.status, 200, "sync: {}", r.text);
            if let Some(batch) = r.json["to_device"]["events"].as_array() {
                events.extend(batch.iter().cloned());
            }
            since = r.json["next_batch"].as_str().map(str::to_owned);
        }
        (events, since)
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some((shutdown, _)) = &self.running {
            shutdown.cancel();
        }
    }
}

async fn bind_listeners(fed: u16, client: u16, rpc: u16) -> Listeners {
    let bind = |port: u16| async move {
        // A just-closed port can take a moment to come back.
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)).await {
                return listener;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot bind 127.0.0.1:{port}");
    };
    Listeners {
        federation: bind(fed).await,
        client: bind(client).await,
        rpc: bind(rpc).await,
    }
}

/// Percent-encodes a path segment.
pub fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}
