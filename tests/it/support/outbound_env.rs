//! The outbound test environment besides the fake remote: answers a test
//! injects instead of DNS (`MapResolver`), the test configuration builder,
//! the test signing key, and tickers that keep paused tokio time moving
//! while real sockets are waited on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use courier::federation::outbound::client::FederationClient;
use courier::identifiers::ServerName;
use rustls_pki_types::ServerName as TlsName;

use super::fake_remote::{TestCa, WellKnown};

/// Answers a test injects instead of DNS: exact names, `*.suffix`
/// wildcards, SRV records, and names whose lookups fail outright.
#[derive(Default)]
pub struct MapResolver {
    pub ips: HashMap<String, Vec<std::net::IpAddr>>,
    /// (suffix, answer): a name ending in `.suffix` resolves to the answer.
    pub wildcards: Vec<(String, Vec<std::net::IpAddr>)>,
    pub srv: HashMap<String, Vec<courier::federation::outbound::dns::SrvRecord>>,
    pub failing: Vec<String>,
    /// Suffixes whose lookups (SRV and address) never answer, as a name
    /// server that drops the queries.
    pub hanging: Vec<String>,
    /// Every name looked up, in order.
    pub lookups: Mutex<Vec<String>>,
}

impl MapResolver {
    pub fn ip(mut self, name: &str, ips: &[&str]) -> Self {
        let ips = ips.iter().map(|s| s.parse().expect("ip")).collect();
        self.ips.insert(name.to_owned(), ips);
        self
    }
    pub fn wildcard(mut self, suffix: &str, ips: &[&str]) -> Self {
        let ips = ips.iter().map(|s| s.parse().expect("ip")).collect();
        self.wildcards.push((suffix.to_owned(), ips));
        self
    }
    pub fn srv(mut self, name: &str, target: &str, port: u16) -> Self {
        self.srv.entry(name.to_owned()).or_default().push(
            courier::federation::outbound::dns::SrvRecord {
                priority: 10,
                weight: 10,
                port,
                target: target.to_owned(),
            },
        );
        self
    }
    pub fn fail(mut self, name: &str) -> Self {
        self.failing.push(name.to_owned());
        self
    }
    /// Lookups of `suffix` and of names ending in `.suffix` never answer.
    pub fn hang(mut self, suffix: &str) -> Self {
        self.hanging.push(suffix.to_owned());
        self
    }
    fn hangs(&self, name: &str) -> bool {
        self.hanging
            .iter()
            .any(|s| name == s || name.ends_with(&format!(".{s}")))
    }
    pub fn lookups(&self) -> Vec<String> {
        self.lookups.lock().expect("lock").clone()
    }
}

impl courier::federation::outbound::dns::DnsResolver for MapResolver {
    fn lookup_srv<'a>(
        &'a self,
        name: &'a str,
    ) -> courier::federation::outbound::dns::DnsFuture<
        'a,
        Vec<courier::federation::outbound::dns::SrvRecord>,
    > {
        use courier::federation::outbound::dns::DnsError;
        self.lookups
            .lock()
            .expect("lock")
            .push(format!("SRV {name}"));
        if self.hangs(name) {
            return Box::pin(std::future::pending());
        }
        let answer = if self.failing.iter().any(|f| f == name) {
            Err(DnsError::Failed {
                name: name.to_owned(),
                reason: "SERVFAIL".to_owned(),
            })
        } else {
            self.srv
                .get(name)
                .cloned()
                .ok_or_else(|| DnsError::NotFound(name.to_owned()))
        };
        Box::pin(async move { answer })
    }

    fn lookup_ip<'a>(
        &'a self,
        host: &'a str,
    ) -> courier::federation::outbound::dns::DnsFuture<'a, Vec<std::net::IpAddr>> {
        use courier::federation::outbound::dns::DnsError;
        self.lookups
            .lock()
            .expect("lock")
            .push(format!("IP {host}"));
        if self.hangs(host) {
            return Box::pin(std::future::pending());
        }
        let answer = if self.failing.iter().any(|f| f == host) {
            Err(DnsError::Failed {
                name: host.to_owned(),
                reason: "SERVFAIL".to_owned(),
            })
        } else if let Some(ips) = self.ips.get(host) {
            Ok(ips.clone())
        } else if let Some((_, ips)) = self
            .wildcards
            .iter()
            .find(|(suffix, _)| host.ends_with(&format!(".{suffix}")))
        {
            Ok(ips.clone())
        } else {
            Err(DnsError::NotFound(host.to_owned()))
        };
        Box::pin(async move { answer })
    }
}

/// Keeps paused tokio time moving in 1 ms steps while the runtime waits for
/// real sockets, so that auto-advance never leaps over a timeout while a
/// loopback connection is being set up. Returns the ticker's handle.
pub fn spawn_ticker() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Like `spawn_ticker`, but in `step`s with a 100 µs pause of the runtime
/// thread after each, so virtual time runs at most `step / 100 µs` times
/// faster than real time. That bounds how much virtual time passes while
/// the store's writer thread fsyncs or a TLS handshake completes (the
/// runtime is idle then, and auto-advance would otherwise leap to the next
/// timer), which keeps virtual-time measurements honest to within a few
/// steps.
pub fn spawn_throttled_ticker(step: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(step).await;
            std::thread::sleep(Duration::from_micros(100));
        }
    })
}

/// The knobs outbound tests turn; everything else is fixed.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub server_name: String,
    pub extra_ca: Option<PathBuf>,
    pub ip_allow: Vec<String>,
    pub nameservers: Vec<SocketAddr>,
    pub well_known_port: u16,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub discovery_timeout_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub retry_multiplier: f64,
    pub retry_jitter: f64,
    pub quarantine_after: u32,
    pub startup_stagger_ms: u64,
    /// More `[federation]` lines, verbatim (say, `refusing_after = 2`).
    pub federation_extra: String,
    pub sqlite: PathBuf,
}

impl TestConfig {
    pub fn new(extra_ca: Option<PathBuf>, sqlite: PathBuf) -> Self {
        TestConfig {
            server_name: "origin.test".to_owned(),
            extra_ca,
            ip_allow: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
            nameservers: Vec::new(),
            well_known_port: 443,
            connect_timeout_ms: 2_000,
            request_timeout_ms: 5_000,
            discovery_timeout_ms: 15_000,
            retry_initial_ms: 2_000,
            retry_max_ms: 600_000,
            retry_multiplier: 2.0,
            retry_jitter: 0.2,
            quarantine_after: 3,
            startup_stagger_ms: 0,
            federation_extra: String::new(),
            sqlite,
        }
    }

    pub fn build(&self) -> courier::config::Config {
        let list = |items: Vec<String>| {
            items
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let extra_ca = list(
            self.extra_ca
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        );
        let text = format!(
            r#"
server_name = {server_name:?}
signing_key_path = "unused-signing.key"
[federation]
bind = "127.0.0.1:0"
tls_cert = "unused.crt"
tls_key = "unused.key"
extra_ca = [{extra_ca}]
ip_allow = [{ip_allow}]
nameservers = [{nameservers}]
well_known_port = {well_known_port}
connect_timeout_ms = {connect}
request_timeout_ms = {request}
discovery_timeout_ms = {discovery}
retry_initial_ms = {initial}
retry_max_ms = {max}
retry_multiplier = {multiplier:?}
retry_jitter = {jitter:?}
quarantine_after = {quarantine}
startup_stagger_ms = {stagger}
{federation_extra}
[client]
bind = "127.0.0.1:0"
[rpc]
bind = "127.0.0.1:0"
secret = "outbound-test-secret"
[store]
sqlite = {sqlite:?}
"#,
            server_name = self.server_name,
            ip_allow = list(self.ip_allow.clone()),
            nameservers = list(self.nameservers.iter().map(|a| a.to_string()).collect()),
            well_known_port = self.well_known_port,
            connect = self.connect_timeout_ms,
            request = self.request_timeout_ms,
            discovery = self.discovery_timeout_ms,
            initial = self.retry_initial_ms,
            max = self.retry_max_ms,
            multiplier = self.retry_multiplier,
            jitter = self.retry_jitter,
            quarantine = self.quarantine_after,
            stagger = self.startup_stagger_ms,
            federation_extra = self.federation_extra,
            sqlite = self.sqlite.display().to_string(),
        );
        courier::config::Config::from_toml_str(&text, "test config", std::iter::empty())
            .expect("the test config is valid")
    }
}

/// The signing key tests use (the spec's test-vector seed).
pub fn test_signing_key() -> courier::keys::ServerSigningKey {
    courier::keys::ServerSigningKey::from_seed("1", [7u8; 32])
}

// ---- discovery and client test helpers ----------------------------------

pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub ca: TestCa,
    pub config: TestConfig,
}

pub fn setup() -> Setup {
    courier::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let ca_path = ca.write_pem(dir.path());
    let config = TestConfig::new(Some(ca_path), dir.path().join("unused.db"));
    Setup {
        _dir: dir,
        ca,
        config,
    }
}

pub fn client(config: &TestConfig, resolver: MapResolver) -> (FederationClient, Arc<MapResolver>) {
    let resolver = Arc::new(resolver);
    let client = FederationClient::with_resolver(
        Arc::new(config.build()),
        Arc::new(test_signing_key()),
        resolver.clone(),
    )
    .expect("client");
    (client, resolver)
}

pub fn name(s: &str) -> ServerName {
    ServerName::parse(s).expect("valid server name")
}

pub fn dns(s: &str) -> TlsName<'static> {
    TlsName::try_from(s.to_owned()).expect("dns name")
}

pub fn ip_name(s: &str) -> TlsName<'static> {
    TlsName::IpAddress(IpAddr::from_str(s).expect("ip").into())
}

pub fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter()
        .map(|s| s.parse().expect("socket addr"))
        .collect()
}

pub fn well_known(body: &str) -> WellKnown {
    WellKnown {
        status: 200,
        body: body.to_owned(),
        headers: vec![],
    }
}
