//! Configuration: one TOML file, overridden by `COURIER_*` environment
//! variables, parsed into a raw serde struct and then validated into a typed
//! `Config` with every problem reported at once (STYLE §9). Nothing else
//! reads the file or the environment.
//!
//! Environment overrides name a key by its path, upper-cased, sections joined
//! with a double underscore: `COURIER_SERVER_NAME`, `COURIER_RPC__SECRET`,
//! `COURIER_FEDERATION__BIND`. A value that parses as a TOML value (number,
//! boolean, array) is taken as that; anything else is a string.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::identifiers::ServerName;
use crate::keys::OldVerifyKey;
// The store's own settings live in `store` (which must not import this
// module); the configuration builds them and re-exports them.
pub use crate::store::{ExpiryPolicy, PruneConfig, StoreConfig};

use crate::store::retention::{EventTypePattern, InboxTtl};

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The OS error is in the message, not a `source()`, so printing the
    // error chain shows it once.
    #[error("cannot read config file {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("config file {path} is not valid TOML for Courier: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server_name: ServerName,
    pub signing_key_path: PathBuf,
    /// Retired keys still published under `old_verify_keys`.
    pub old_verify_keys: Vec<OldVerifyKey>,
    /// How far ahead our key document's `valid_until_ts` is set.
    pub key_validity: Duration,
    pub federation: FederationConfig,
    pub client: ClientConfig,
    pub rpc: RpcConfig,
    pub store: StoreConfig,
    /// The pruner's schedule (`[store] prune_*`, `destination_retention_hours`).
    pub pruning: PruneConfig,
    /// What the pruner expires of undelivered messages (`[retention]`).
    pub retention: ExpiryPolicy,
    pub worker: WorkerConfig,
    pub e2ee: E2eeConfig,
}

#[derive(Debug, Clone)]
pub struct FederationConfig {
    pub bind: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// CA certificates trusted for outbound TLS besides the public roots.
    pub extra_ca: Vec<PathBuf>,
    /// Exceptions to the outbound private-range denylist.
    pub ip_allow: Vec<IpNet>,
    /// Nameservers for SRV/A lookups instead of the system's (tests).
    pub nameservers: Vec<SocketAddr>,
    /// Port used for `.well-known` fetches (443 in production).
    pub well_known_port: u16,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Timeout for fetching a remote server's keys.
    pub key_fetch_timeout: Duration,
    /// Largest inbound request body.
    pub max_request_bytes: usize,
    /// If non-empty, only these origins may send to us.
    pub origin_allow: Vec<String>,
    /// Origins refused with 403.
    pub origin_deny: Vec<String>,
    /// Inbound requests per second per origin (0: no limit).
    pub inbound_rate_per_origin: u32,
    /// The burst window and the longest shaping wait of that limit.
    pub inbound_rate_shape: RateShape,
    /// An unknown or expired key id makes the key ring fetch a server's
    /// keys again at most once per this long.
    pub key_refetch_interval: Duration,
    /// A failed key fetch is remembered (lookups fail at once) this long.
    pub key_failure_cache: Duration,
    /// Notary servers tried when an origin cannot be reached for its keys.
    pub notary_servers: Vec<ServerName>,
    pub retry: RetryConfig,
    /// A lone EDU refused this many times is quarantined (once the peer is
    /// seen to accept other EDUs).
    pub quarantine_after: u32,
    /// How many EDUs refused alone may wait on probation (set aside before
    /// the peer is seen to accept anything); one more marks the destination
    /// refusing (`federation::sender::destination`).
    pub refusing_after: u32,
    /// Delay between waking successive destinations at start-up.
    pub startup_stagger: Duration,
    /// Idle pooled connections kept per destination.
    pub pool_idle_per_host: usize,
    /// Key fetches (direct or through notaries) in flight at once over all
    /// origins; a lookup waits at most `key_fetch_timeout` for a slot.
    pub key_fetch_concurrency: usize,
    /// Bound on one whole discovery (`.well-known` hops, SRV, A/AAAA).
    pub discovery_timeout: Duration,
    /// Timeouts and caps of the federation listener.
    pub listener: ListenerLimits,
}

/// The per-destination backoff schedule (persisted failures × this policy).
/// `federation::sender::backoff` turns it into delays: exponential from `initial`
/// by `multiplier`, held at `quick_return - send_margin` (jitter included)
/// during the first `quick_phase` of an outage so that a returning peer is
/// reached within `quick_return`, then growing to `max`, which jitter never
/// exceeds. No delay is shorter than `initial`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    pub initial: Duration,
    pub multiplier: f64,
    pub max: Duration,
    /// Relative jitter: a delay d becomes uniform in [d(1−j), d(1+j)]
    /// (and at least `initial`).
    pub jitter: f64,
    /// How long an outage counts as short (`retry_quick_phase_ms`).
    pub quick_phase: Duration,
    /// A peer back from a short outage is reached within this time
    /// (`retry_quick_return_ms`).
    pub quick_return: Duration,
    /// The part of `quick_return` left for connecting and sending
    /// (`retry_send_margin_ms`).
    pub send_margin: Duration,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub bind: SocketAddr,
    pub max_request_bytes: usize,
    /// Longest `/sync` long-poll honoured.
    pub max_sync_timeout: Duration,
    /// Limits on what one send may ask for.
    pub send_limits: SendLimits,
    /// Sends (`PUT /sendToDevice`) per second per user; 0 turns the limit
    /// off. The RPC is never limited.
    pub sends_per_user_per_sec: u32,
    /// The burst window and the longest shaping wait of that limit.
    pub send_rate_shape: RateShape,
    /// Timeouts and caps of the client listener.
    pub listener: ListenerLimits,
}

/// How a rate limit (a token bucket per origin or per user) treats bursts:
/// the bucket holds rate × `burst` tokens (at least one), and a request
/// that finds it empty waits for the next token if that comes within
/// `max_delay`, else it is refused with 429 `M_LIMIT_EXCEEDED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateShape {
    pub burst: Duration,
    pub max_delay: Duration,
}

impl RateShape {
    pub const DEFAULT: RateShape = RateShape {
        burst: Duration::from_secs(2),
        max_delay: Duration::from_millis(500),
    };
}

/// What one to-device send (client or RPC) may fan out to; past either
/// limit the send is refused whole with `M_TOO_LARGE` and nothing is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimits {
    /// Distinct remote destinations (server names) in one send.
    pub max_destinations: usize,
    /// Recipient devices (counting `*` once per user) in one send.
    pub max_recipients: usize,
}

#[derive(Debug, Clone)]
pub struct RpcConfig {
    pub bind: SocketAddr,
    pub secret: String,
    /// Timeouts and caps of the RPC listener.
    pub listener: ListenerLimits,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This worker's name (unique among workers sharing a database).
    pub name: String,
    /// How long a destination lease lasts without renewal.
    pub lease_duration: Duration,
    /// How often the lease loop renews this worker's leases, heartbeats its
    /// name and claims free destinations (`renew_ms`, below the lease).
    pub renew_interval: Duration,
    /// A destination task checks its lease again right before a send when
    /// resolving the peer and waiting for a send permit took longer than
    /// this since the last check (`recheck_ms`, below the lease).
    pub recheck_after: Duration,
    /// The most destinations one claim round takes (`claim_limit`), so that
    /// workers starting together spread the destinations between them.
    pub claim_limit: u32,
}

/// The E2EE device plane (`[e2ee]`, DESIGN §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2eeConfig {
    /// Whether other servers see local devices' display names in
    /// `/user/keys/query` and `/user/devices` (Synapse's
    /// `allow_device_name_lookup_over_federation`). Off by default.
    pub device_names_over_federation: bool,
    /// The most devices one key query may name or return per request
    /// (counting a user with an empty list once per returned device), for
    /// clients and for other servers.
    pub max_query_devices: usize,
    /// The most (user, device) pairs one key claim may name.
    pub max_claim_devices: usize,
    /// The longest a client's `/keys/query` or `/keys/claim` waits for
    /// remote servers (the client's `timeout` is capped at this).
    pub remote_timeout: Duration,
    /// How many remote servers one client request asks at once.
    pub remote_concurrency: usize,
    /// How long a server that queried a local user's keys (or devices) over
    /// federation keeps getting that user's device-list updates.
    pub interest_window: Duration,
    /// Device-list resyncs (`GET /user/devices`) in flight at once, over
    /// all servers.
    pub resync_concurrency: usize,
    /// Device-list resyncs in flight at once to one server.
    pub resync_per_server: usize,
    /// The first wait after a failed resync of a server's users (doubling
    /// per consecutive failure) and the interval of the sweep over stale
    /// lists.
    pub resync_retry: Duration,
    /// The longest wait between resync attempts to one server.
    pub resync_retry_max: Duration,
    /// How long a resynced remote list answers key queries by itself when
    /// its server does not push that user's updates to us (Synapse pushes
    /// only to servers it shares a room with); after that such a user is
    /// asked live. A list whose server pushed within half the interest
    /// window answers from the cache. Default 0: such users are always
    /// asked live, as Synapse does for users it shares no room with.
    pub remote_cache_ttl: Duration,
}

impl E2eeConfig {
    pub const DEFAULTS: E2eeConfig = E2eeConfig {
        device_names_over_federation: false,
        max_query_devices: 1_000,
        max_claim_devices: 1_000,
        remote_timeout: Duration::from_secs(10),
        remote_concurrency: 16,
        interest_window: Duration::from_secs(30 * 24 * 3600),
        resync_concurrency: 16,
        resync_per_server: 2,
        resync_retry: Duration::from_secs(30),
        resync_retry_max: Duration::from_secs(3600),
        remote_cache_ttl: Duration::ZERO,
    };
}

// ---- raw file shape ---------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server_name: Option<String>,
    signing_key_path: Option<PathBuf>,
    #[serde(default)]
    old_verify_keys: Vec<RawOldKey>,
    key_validity_hours: Option<u64>,
    federation: Option<RawFederation>,
    client: Option<RawClient>,
    rpc: Option<RawRpc>,
    store: Option<RawStore>,
    worker: Option<RawWorker>,
    e2ee: Option<RawE2ee>,
    retention: Option<RawRetention>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOldKey {
    key_id: String,
    key: String,
    expired_ts: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    bind: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    extra_ca: Vec<PathBuf>,
    #[serde(default)]
    ip_allow: Vec<String>,
    #[serde(default)]
    nameservers: Vec<String>,
    well_known_port: Option<u16>,
    connect_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    key_fetch_timeout_ms: Option<u64>,
    max_request_bytes: Option<usize>,
    #[serde(default)]
    origin_allow: Vec<String>,
    #[serde(default)]
    origin_deny: Vec<String>,
    inbound_rate_per_origin: Option<u32>,
    inbound_rate_burst_ms: Option<u64>,
    inbound_rate_max_delay_ms: Option<u64>,
    key_refetch_interval_ms: Option<u64>,
    key_failure_cache_ms: Option<u64>,
    #[serde(default)]
    notary_servers: Vec<String>,
    retry_initial_ms: Option<u64>,
    retry_multiplier: Option<f64>,
    retry_max_ms: Option<u64>,
    retry_jitter: Option<f64>,
    retry_quick_phase_ms: Option<u64>,
    retry_quick_return_ms: Option<u64>,
    retry_send_margin_ms: Option<u64>,
    quarantine_after: Option<u32>,
    refusing_after: Option<u32>,
    startup_stagger_ms: Option<u64>,
    pool_idle_per_host: Option<usize>,
    key_fetch_concurrency: Option<usize>,
    discovery_timeout_ms: Option<u64>,
    listener: Option<RawListenerLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    bind: Option<String>,
    max_request_bytes: Option<usize>,
    max_sync_timeout_ms: Option<u64>,
    max_destinations_per_send: Option<usize>,
    max_recipients_per_send: Option<usize>,
    sends_per_user_per_sec: Option<u32>,
    send_rate_burst_ms: Option<u64>,
    send_rate_max_delay_ms: Option<u64>,
    listener: Option<RawListenerLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRpc {
    bind: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    listener: Option<RawListenerLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    sqlite: Option<PathBuf>,
    postgres: Option<String>,
    // Pruning.
    prune_batch: Option<u32>,
    prune_interval_ms: Option<u64>,
    destination_retention_hours: Option<u64>,
    trace_retention_hours: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawE2ee {
    device_names_over_federation: Option<bool>,
    max_query_devices: Option<usize>,
    max_claim_devices: Option<usize>,
    remote_timeout_ms: Option<u64>,
    remote_concurrency: Option<usize>,
    interest_window_days: Option<u64>,
    resync_concurrency: Option<usize>,
    resync_per_server: Option<usize>,
    resync_retry_ms: Option<u64>,
    resync_retry_max_ms: Option<u64>,
    remote_cache_ttl_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: Option<String>,
    lease_ms: Option<u64>,
    renew_ms: Option<u64>,
    recheck_ms: Option<u64>,
    claim_limit: Option<u32>,
}

/// Default inbound body limit: Synapse's 200 × 64 KiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 200 * 65536;
/// Default cap on distinct destinations in one send. Clients send room keys
/// in batches of a few hundred devices (matrix-rust-sdk: 250 messages per
/// request), so this leaves room for a batch that reaches a server each.
pub const DEFAULT_MAX_DESTINATIONS: usize = 1_000;
/// Default cap on recipient devices in one send.
pub const DEFAULT_MAX_RECIPIENTS: usize = 10_000;

impl Config {
    /// Reads, overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_toml_str(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses `text`, applies `COURIER_*` overrides from `env`, validates.
    /// Relative paths in the file stay relative to the working directory.
    pub fn from_toml_str(
        text: &str,
        path_for_errors: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path_for_errors.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        apply_env_overrides(&mut table, env).map_err(parse_err)?;
        let raw: RawConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        validate(raw)
    }
}

fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), String> {
    for (name, value) in env {
        let Some(path) = name.strip_prefix("COURIER_") else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if !addresses_a_config_key(&keys) {
            // Other COURIER_* variables belong to tools (COURIER_CONFIG,
            // COURIER_LOG, COURIER_BIN, COURIER_RPC_URL, ...).
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let (last, sections) = keys
            .split_last()
            .ok_or_else(|| format!("bad variable {name}"))?;
        let mut cursor = &mut *table;
        for section in sections {
            let entry = cursor
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry
                .as_table_mut()
                .ok_or_else(|| format!("{name}: {section} is not a section"))?;
        }
        cursor.insert(last.clone(), parsed);
    }
    Ok(())
}

/// Top-level keys that take a plain value.
const TOP_LEVEL_KEYS: &[&str] = &["server_name", "signing_key_path", "key_validity_hours"];
/// The sections of the file.
const SECTIONS: &[&str] = &[
    "federation",
    "client",
    "rpc",
    "store",
    "worker",
    "retention",
];

/// Whether an override path names a config key: a known top-level key, or
/// anything inside a known section (a typo there is still reported, loudly,
/// as an unknown key of that section).
fn addresses_a_config_key(keys: &[String]) -> bool {
    match keys {
        [key] => TOP_LEVEL_KEYS.contains(&key.as_str()),
        [section, _, ..] => SECTIONS.contains(&section.as_str()),
        [] => false,
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut problems: Vec<String> = Vec::new();

    let server_name = match raw.server_name.as_deref() {
        Some(s) => ServerName::parse(s).map_err(|e| e.to_string()),
        None => Err("server_name is required".to_owned()),
    };
    let signing_key_path = raw.signing_key_path.clone();
    if signing_key_path.is_none() {
        problems.push("signing_key_path is required".to_owned());
    }
    let fed = raw.federation;
    let client = raw.client;
    let rpc = raw.rpc;
    let store = raw.store;
    if fed.is_none() {
        problems.push("[federation] is required".to_owned());
    }
    if client.is_none() {
        problems.push("[client] is required".to_owned());
    }
    if rpc.is_none() {
        problems.push("[rpc] is required".to_owned());
    }
    if store.is_none() {
        problems.push("[store] is required".to_owned());
    }
    let server_name = server_name.map_err(|e| problems.push(e)).ok();

    let bind = |section: &str, value: Option<&String>, problems: &mut Vec<String>| match value
        .map(|v| v.parse::<SocketAddr>())
    {
        Some(Ok(addr)) => Some(addr),
        Some(Err(e)) => {
            problems.push(format!("[{section}] bind: {e}"));
            None
        }
        None => {
            problems.push(format!("[{section}] bind is required"));
            None
        }
    };

    let old_verify_keys = raw
        .old_verify_keys
        .into_iter()
        .map(|k| OldVerifyKey {
            key_id: k.key_id,
            public_key: k.key,
            expired_ts: k.expired_ts,
        })
        .collect();
    let key_validity = Duration::from_secs(raw.key_validity_hours.unwrap_or(24) * 3600);
    if key_validity < Duration::from_secs(3600) || key_validity > Duration::from_secs(7 * 24 * 3600)
    {
        problems.push("key_validity_hours must be between 1 and 168".to_owned());
    }

    let federation = fed.map(|f| {
        let bind = bind("federation", f.bind.as_ref(), &mut problems);
        if f.tls_cert.is_none() {
            problems.push("[federation] tls_cert is required".to_owned());
        }
        if f.tls_key.is_none() {
            problems.push("[federation] tls_key is required".to_owned());
        }
        let ip_allow = f
            .ip_allow
            .iter()
            .filter_map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|e| problems.push(format!("[federation] ip_allow {s:?}: {e}")))
                    .ok()
            })
            .collect();
        let nameservers = f
            .nameservers
            .iter()
            .filter_map(|s| {
                s.parse::<SocketAddr>()
                    .map_err(|e| problems.push(format!("[federation] nameservers {s:?}: {e}")))
                    .ok()
            })
            .collect();
        let notary_servers = f
            .notary_servers
            .iter()
            .filter_map(|s| {
                ServerName::parse(s)
                    .map_err(|e| problems.push(format!("[federation] notary_servers: {e}")))
                    .ok()
            })
            .collect();
        let retry = RetryConfig {
            initial: Duration::from_millis(f.retry_initial_ms.unwrap_or(2_000)),
            multiplier: f.retry_multiplier.unwrap_or(2.0),
            max: Duration::from_millis(f.retry_max_ms.unwrap_or(600_000)),
            jitter: f.retry_jitter.unwrap_or(0.2),
            quick_phase: Duration::from_millis(f.retry_quick_phase_ms.unwrap_or(300_000)),
            quick_return: Duration::from_millis(f.retry_quick_return_ms.unwrap_or(5_000)),
            send_margin: Duration::from_millis(f.retry_send_margin_ms.unwrap_or(1_000)),
        };
        if retry.quick_phase > Duration::from_secs(24 * 3600) {
            problems.push("[federation] retry_quick_phase_ms must be at most 86400000".to_owned());
        }
        if retry.send_margin >= retry.quick_return {
            problems.push(
                "[federation] retry_send_margin_ms must be less than retry_quick_return_ms"
                    .to_owned(),
            );
        } else if retry.initial.as_secs_f64() * (1.0 + retry.jitter.clamp(0.0, 1.0))
            > (retry.quick_return - retry.send_margin).as_secs_f64()
        {
            problems.push(
                "[federation] retry_quick_return_ms - retry_send_margin_ms must be at least \
                 retry_initial_ms × (1 + retry_jitter), or the quick return cannot be kept"
                    .to_owned(),
            );
        }
        if !(retry.multiplier >= 1.0 && retry.multiplier <= 16.0) {
            problems.push("[federation] retry_multiplier must be in 1..=16".to_owned());
        }
        if !(0.0..1.0).contains(&retry.jitter) {
            problems.push("[federation] retry_jitter must be in 0..1".to_owned());
        }
        if retry.initial.is_zero() || retry.initial > retry.max {
            problems
                .push("[federation] retry_initial_ms must be > 0 and <= retry_max_ms".to_owned());
        }
        let key_fetch_concurrency = f.key_fetch_concurrency.unwrap_or(16);
        if key_fetch_concurrency == 0 {
            problems.push("[federation] key_fetch_concurrency must be at least 1".to_owned());
        }
        for (key, names) in [
            ("origin_allow", &f.origin_allow),
            ("origin_deny", &f.origin_deny),
        ] {
            for name in names {
                if let Err(error) = ServerName::parse(name.trim()) {
                    problems.push(format!("[federation] {key}: {error}"));
                }
            }
        }
        let quarantine_after = f.quarantine_after.unwrap_or(3);
        if quarantine_after == 0 {
            problems.push("[federation] quarantine_after must be at least 1".to_owned());
        }
        let inbound_rate_shape = rate_shape(
            "[federation] inbound_rate",
            f.inbound_rate_burst_ms,
            f.inbound_rate_max_delay_ms,
            &mut problems,
        );
        let key_refetch_interval = bounded_ms(
            "[federation] key_refetch_interval_ms",
            f.key_refetch_interval_ms,
            Duration::from_secs(60),
            1_000..=86_400_000,
            &mut problems,
        );
        let key_failure_cache = bounded_ms(
            "[federation] key_failure_cache_ms",
            f.key_failure_cache_ms,
            Duration::from_secs(30),
            1_000..=3_600_000,
            &mut problems,
        );
        let refusing_after = f.refusing_after.unwrap_or(1);
        if !(1..=1000).contains(&refusing_after) {
            problems.push("[federation] refusing_after must be in 1..=1000".to_owned());
        }
        let discovery_timeout = Duration::from_millis(f.discovery_timeout_ms.unwrap_or(15_000));
        if discovery_timeout.is_zero() || discovery_timeout > Duration::from_secs(600) {
            problems.push("[federation] discovery_timeout_ms must be in 1..=600000".to_owned());
        }
        FederationConfig {
            bind: bind.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            tls_cert: f.tls_cert.unwrap_or_default(),
            tls_key: f.tls_key.unwrap_or_default(),
            extra_ca: f.extra_ca,
            ip_allow,
            nameservers,
            well_known_port: f.well_known_port.unwrap_or(443),
            connect_timeout: Duration::from_millis(f.connect_timeout_ms.unwrap_or(10_000)),
            request_timeout: Duration::from_millis(f.request_timeout_ms.unwrap_or(60_000)),
            key_fetch_timeout: Duration::from_millis(f.key_fetch_timeout_ms.unwrap_or(10_000)),
            max_request_bytes: f.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
            origin_allow: f.origin_allow,
            origin_deny: f.origin_deny,
            inbound_rate_per_origin: f.inbound_rate_per_origin.unwrap_or(200),
            inbound_rate_shape,
            key_refetch_interval,
            key_failure_cache,
            notary_servers,
            retry,
            quarantine_after,
            refusing_after,
            startup_stagger: Duration::from_millis(f.startup_stagger_ms.unwrap_or(5)),
            pool_idle_per_host: f.pool_idle_per_host.unwrap_or(4),
            key_fetch_concurrency,
            discovery_timeout,
            listener: listener_limits(
                "federation",
                f.listener,
                ListenerLimits::FEDERATION_DEFAULTS,
                &mut problems,
            ),
        }
    });

    let client = client.map(|c| {
        let send_limits = SendLimits {
            max_destinations: c
                .max_destinations_per_send
                .unwrap_or(DEFAULT_MAX_DESTINATIONS),
            max_recipients: c.max_recipients_per_send.unwrap_or(DEFAULT_MAX_RECIPIENTS),
        };
        if send_limits.max_destinations == 0 || send_limits.max_recipients == 0 {
            problems.push(
                "[client] max_destinations_per_send and max_recipients_per_send must be at least 1"
                    .to_owned(),
            );
        }
        ClientConfig {
            bind: bind("client", c.bind.as_ref(), &mut problems)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            max_request_bytes: c.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
            max_sync_timeout: Duration::from_millis(c.max_sync_timeout_ms.unwrap_or(60_000)),
            send_limits,
            sends_per_user_per_sec: c.sends_per_user_per_sec.unwrap_or(0),
            send_rate_shape: rate_shape(
                "[client] send_rate",
                c.send_rate_burst_ms,
                c.send_rate_max_delay_ms,
                &mut problems,
            ),
            listener: listener_limits(
                "client",
                c.listener,
                ListenerLimits::CLIENT_DEFAULTS,
                &mut problems,
            ),
        }
    });

    let rpc = rpc.map(|r| {
        let bind = bind("rpc", r.bind.as_ref(), &mut problems)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let secret = rpc_secret(r.secret, r.secret_file.as_deref(), &mut problems);
        let listener = listener_limits(
            "rpc",
            r.listener,
            ListenerLimits::RPC_DEFAULTS,
            &mut problems,
        );
        RpcConfig {
            bind,
            secret,
            listener,
        }
    });

    let pruning = prune_config(store.as_ref(), &mut problems);
    let retention = expiry_policy(raw.retention, &mut problems);
    let store = store.and_then(|s| match (s.sqlite, s.postgres) {
        (Some(path), None) => Some(StoreConfig::Sqlite(path)),
        (None, Some(url)) => Some(StoreConfig::Postgres(url)),
        (Some(_), Some(_)) => {
            problems.push("[store] set exactly one of sqlite and postgres, not both".to_owned());
            None
        }
        (None, None) => {
            problems.push("[store] set one of sqlite or postgres".to_owned());
            None
        }
    });

    let worker = worker_config(raw.worker, &mut problems);

    let e2ee = raw.e2ee.map_or(E2eeConfig::DEFAULTS, |e| {
        let d = E2eeConfig::DEFAULTS;
        let config = E2eeConfig {
            device_names_over_federation: e
                .device_names_over_federation
                .unwrap_or(d.device_names_over_federation),
            max_query_devices: e.max_query_devices.unwrap_or(d.max_query_devices),
            max_claim_devices: e.max_claim_devices.unwrap_or(d.max_claim_devices),
            remote_timeout: e
                .remote_timeout_ms
                .map_or(d.remote_timeout, Duration::from_millis),
            remote_concurrency: e.remote_concurrency.unwrap_or(d.remote_concurrency),
            interest_window: e.interest_window_days.map_or(d.interest_window, |days| {
                Duration::from_secs(days.saturating_mul(24 * 3600))
            }),
            resync_concurrency: e.resync_concurrency.unwrap_or(d.resync_concurrency),
            resync_per_server: e.resync_per_server.unwrap_or(d.resync_per_server),
            resync_retry: e
                .resync_retry_ms
                .map_or(d.resync_retry, Duration::from_millis),
            resync_retry_max: e
                .resync_retry_max_ms
                .map_or(d.resync_retry_max, Duration::from_millis),
            remote_cache_ttl: e
                .remote_cache_ttl_ms
                .map_or(d.remote_cache_ttl, Duration::from_millis),
        };
        if config.max_query_devices == 0
            || config.max_claim_devices == 0
            || config.remote_concurrency == 0
            || config.remote_timeout.is_zero()
            || config.interest_window.is_zero()
            || config.resync_concurrency == 0
            || config.resync_per_server == 0
            || config.resync_retry.is_zero()
        {
            problems.push(
                "[e2ee] max_query_devices, max_claim_devices, remote_concurrency, \
                 remote_timeout_ms, interest_window_days, resync_concurrency, \
                 resync_per_server and resync_retry_ms must be at least 1"
                    .to_owned(),
            );
        }
        if config.resync_retry_max < config.resync_retry {
            problems.push("[e2ee] resync_retry_max_ms must be at least resync_retry_ms".to_owned());
        }
        config
    });

    if let (Some(name), Some(f)) = (&server_name, &federation)
        && !is_loopback_name(name)
        && f.extra_ca.iter().any(|path| is_development_ca(path))
    {
        problems.push(format!(
            "[federation] extra_ca trusts the development CA of certs/, whose private key is \
             public; only a relay named localhost may (server_name is {name})"
        ));
    }
    match (
        server_name,
        signing_key_path,
        federation,
        client,
        rpc,
        store,
    ) {
        (
            Some(server_name),
            Some(signing_key_path),
            Some(federation),
            Some(client),
            Some(rpc),
            Some(store),
        ) if problems.is_empty() => Ok(Config {
            server_name,
            signing_key_path,
            old_verify_keys,
            key_validity,
            federation,
            client,
            rpc,
            store,
            pruning,
            retention,
            worker,
            e2ee,
        }),
        _ => Err(ConfigError::Invalid(problems)),
    }
}

/// The example configuration's placeholder RPC secret, refused everywhere.
pub const PLACEHOLDER_RPC_SECRET: &str = "change-me-please";
/// The shortest RPC secret accepted, in bytes.
pub const MIN_RPC_SECRET_BYTES: usize = 16;

/// The RPC secret: `[rpc] secret`, or the contents of `[rpc] secret_file`
/// (trailing newline ignored), which must not be readable by group or
/// others. The placeholder of the example and secrets shorter than
/// [`MIN_RPC_SECRET_BYTES`] are refused. Each problem is pushed once.
fn rpc_secret(
    secret: Option<String>,
    secret_file: Option<&Path>,
    problems: &mut Vec<String>,
) -> String {
    let secret = match (secret, secret_file) {
        (Some(_), Some(_)) => {
            problems.push("[rpc] set exactly one of secret and secret_file, not both".to_owned());
            return String::new();
        }
        (None, None) => {
            problems.push("[rpc] secret (or secret_file) is required".to_owned());
            return String::new();
        }
        (Some(secret), None) => secret,
        (None, Some(path)) => match read_secret_file(path) {
            Ok(secret) => secret,
            Err(problem) => {
                problems.push(problem);
                return String::new();
            }
        },
    };
    if secret.trim() == PLACEHOLDER_RPC_SECRET {
        problems.push(format!(
            "[rpc] secret is the example's placeholder {PLACEHOLDER_RPC_SECRET:?}; replace it \
             with a random secret (e.g. `openssl rand -hex 32`)"
        ));
    } else if secret.len() < MIN_RPC_SECRET_BYTES {
        problems.push(format!(
            "[rpc] secret must be at least {MIN_RPC_SECRET_BYTES} bytes (it is {})",
            secret.len()
        ));
    }
    secret
}

/// Reads an RPC secret file, refusing one that group or others may read.
fn read_secret_file(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|e| format!("[rpc] secret_file {shown}: cannot read it: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "[rpc] secret_file {shown} is readable by group or others (mode {:o}); \
                 chmod 600 it",
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = metadata;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("[rpc] secret_file {shown}: cannot read it: {e}"))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// The development CA that `courier dev-certs` made for this repository;
/// its key is committed next to it.
const DEVELOPMENT_CA_PEM: &str = include_str!("../certs/dev-ca.crt");

/// Whether `path` holds the repository's development CA certificate. An
/// unreadable file is not judged here (loading the trust store reports it).
fn is_development_ca(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.trim() == DEVELOPMENT_CA_PEM.trim())
}

/// Names that only ever mean this machine: `localhost`, `*.localhost` and
/// loopback addresses.
fn is_loopback_name(name: &ServerName) -> bool {
    match name.host() {
        crate::identifiers::Host::Ipv4(ip) => ip.is_loopback(),
        crate::identifiers::Host::Ipv6(ip) => ip.is_loopback(),
        crate::identifiers::Host::Dns(host) => {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            host == "localhost" || host.ends_with(".localhost")
        }
    }
}

/// Default of `[store] prune_batch`.
pub const DEFAULT_PRUNE_BATCH: u32 = 5_000;
/// Default of `[store] prune_interval_ms` (5 minutes).
pub const DEFAULT_PRUNE_INTERVAL_MS: u64 = 300_000;
/// Default of `[store] destination_retention_hours` (30 days).
pub const DEFAULT_DESTINATION_RETENTION_HOURS: u64 = 30 * 24;
/// Default of `[store] trace_retention_hours` (7 days, as long as inbound
/// message_ids are remembered).
pub const DEFAULT_TRACE_RETENTION_HOURS: u64 = 7 * 24;

/// Default `[worker] lease_ms`.
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Default `[worker] claim_limit`.
pub const DEFAULT_CLAIM_LIMIT: u32 = 64;

/// `[worker]`: the name and the lease timings. `renew_ms` and `recheck_ms`
/// default to a third of the lease and must stay below it (a renewal period
/// as long as the lease would let every lease lapse between renewals).
fn worker_config(raw: Option<RawWorker>, problems: &mut Vec<String>) -> WorkerConfig {
    let (name, lease_ms, renew_ms, recheck_ms, claim_limit) = match raw {
        Some(w) => (w.name, w.lease_ms, w.renew_ms, w.recheck_ms, w.claim_limit),
        None => (None, None, None, None, None),
    };
    let lease_ms = lease_ms.unwrap_or(DEFAULT_LEASE_MS);
    if !(100..=3_600_000).contains(&lease_ms) {
        problems.push(format!(
            "[worker] lease_ms must be between 100 and 3600000 (1 hour), not {lease_ms}"
        ));
    }
    let third = (lease_ms / 3).max(10);
    let mut below_lease = |key: &str, value: Option<u64>| {
        let value = value.unwrap_or(third);
        if value < 10 || value >= lease_ms {
            problems.push(format!(
                "[worker] {key} must be at least 10 and less than lease_ms ({lease_ms}), not {value}"
            ));
        }
        Duration::from_millis(value.max(10))
    };
    let renew_interval = below_lease("renew_ms", renew_ms);
    let recheck_after = below_lease("recheck_ms", recheck_ms);
    let claim_limit = claim_limit.unwrap_or(DEFAULT_CLAIM_LIMIT);
    if !(1..=10_000).contains(&claim_limit) {
        problems.push(format!(
            "[worker] claim_limit must be between 1 and 10000, not {claim_limit}"
        ));
    }
    WorkerConfig {
        name: name.unwrap_or_else(|| "main".to_owned()),
        lease_duration: Duration::from_millis(lease_ms),
        renew_interval,
        recheck_after,
        claim_limit: claim_limit.max(1),
    }
}

fn prune_config(store: Option<&RawStore>, problems: &mut Vec<String>) -> PruneConfig {
    let batch = store
        .and_then(|s| s.prune_batch)
        .unwrap_or(DEFAULT_PRUNE_BATCH);
    if !(1..=1_000_000).contains(&batch) {
        problems.push(format!(
            "[store] prune_batch must be between 1 and 1000000, not {batch}"
        ));
    }
    let interval_ms = store
        .and_then(|s| s.prune_interval_ms)
        .unwrap_or(DEFAULT_PRUNE_INTERVAL_MS);
    if !(1_000..=86_400_000).contains(&interval_ms) {
        problems.push(format!(
            "[store] prune_interval_ms must be between 1000 (1 s) and 86400000 (1 day), not {interval_ms}"
        ));
    }
    let retention_hours = store
        .and_then(|s| s.destination_retention_hours)
        .unwrap_or(DEFAULT_DESTINATION_RETENTION_HOURS);
    if !(1..=24 * 3650).contains(&retention_hours) {
        problems.push(format!(
            "[store] destination_retention_hours must be between 1 and 87600 (10 years), not {retention_hours}"
        ));
    }
    let trace_hours = store
        .and_then(|s| s.trace_retention_hours)
        .unwrap_or(DEFAULT_TRACE_RETENTION_HOURS);
    if trace_hours > 24 * 365 {
        problems.push(format!(
            "[store] trace_retention_hours must be between 0 (journal off) and 8760 (1 year), not {trace_hours}"
        ));
    }
    PruneConfig {
        batch: batch.max(1),
        interval: Duration::from_millis(interval_ms),
        destination_retention: Duration::from_secs(retention_hours.saturating_mul(3600)),
        trace_retention: Duration::from_secs(trace_hours.min(24 * 365) * 3600),
    }
}

// ---- retention ------------------------------------------------------------------

// `[retention]`: what the pruner may expire of undelivered messages
// (`store::retention`), validated into an `ExpiryPolicy`:
//
//     [retention]
//     inbox_ttl_hours = { "m.room_key_request" = 168, "m.key.verification.*" = 24 }
//     inbox_max_per_device = 10000
//     dead_destination_days = 30

/// Default of `inbox_max_per_device`: 100 `/sync` pages.
pub const DEFAULT_INBOX_MAX_PER_DEVICE: u32 = 10_000;
/// The smallest cap accepted (one `/sync` page is 100 messages).
pub const MIN_INBOX_MAX_PER_DEVICE: u32 = 100;
/// Default of `dead_destination_days`.
pub const DEFAULT_DEAD_DESTINATION_DAYS: u64 = 30;
/// The longest TTL or dead-destination period accepted: 10 years.
const MAX_RETENTION_HOURS: u64 = 24 * 3650;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    /// Event type pattern → hours.
    #[serde(default)]
    inbox_ttl_hours: std::collections::BTreeMap<String, u64>,
    /// 0: no cap.
    inbox_max_per_device: Option<u32>,
    /// 0: never.
    dead_destination_days: Option<u64>,
}

/// The policy of `raw` (defaults when the section is absent); problems are
/// pushed to `problems`.
fn expiry_policy(raw: Option<RawRetention>, problems: &mut Vec<String>) -> ExpiryPolicy {
    let raw = raw.unwrap_or_default();
    let mut rules = Vec::new();
    for (pattern, hours) in raw.inbox_ttl_hours {
        let parsed = EventTypePattern::parse(&pattern)
            .map_err(|e| problems.push(format!("[retention] inbox_ttl_hours: {e}")))
            .ok();
        if !(1..=MAX_RETENTION_HOURS).contains(&hours) {
            problems.push(format!(
                "[retention] inbox_ttl_hours {pattern:?} must be between 1 and {MAX_RETENTION_HOURS} (10 years), not {hours}"
            ));
            continue;
        }
        if let Some(pattern) = parsed {
            rules.push(InboxTtl {
                pattern,
                ttl_ms: retention_hours_ms(hours),
            });
        }
    }
    let cap = raw
        .inbox_max_per_device
        .unwrap_or(DEFAULT_INBOX_MAX_PER_DEVICE);
    if cap != 0 && cap < MIN_INBOX_MAX_PER_DEVICE {
        problems.push(format!(
            "[retention] inbox_max_per_device must be 0 (no cap) or at least {MIN_INBOX_MAX_PER_DEVICE} (one /sync page), not {cap}"
        ));
    }
    let days = raw
        .dead_destination_days
        .unwrap_or(DEFAULT_DEAD_DESTINATION_DAYS);
    if days > MAX_RETENTION_HOURS / 24 {
        problems.push(format!(
            "[retention] dead_destination_days must be between 0 (never) and {} (10 years), not {days}",
            MAX_RETENTION_HOURS / 24
        ));
    }
    ExpiryPolicy::new(
        rules,
        (cap != 0).then_some(cap),
        (days != 0).then(|| retention_hours_ms(days.saturating_mul(24))),
    )
}

fn retention_hours_ms(hours: u64) -> i64 {
    i64::try_from(hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX)
}

// ---- listener limits ---------------------------------------------------------

/// Timeouts and caps of one listener (`[federation.listener]`,
/// `[client.listener]`, `[rpc.listener]`), enforced by `crate::listener`.
/// Each section has its own defaults (the `*_DEFAULTS` constants), chosen so
/// that the three connection caps together stay well under a 1,024-descriptor
/// limit with room for outbound federation and the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time from accept (TLS handshake included) to the first complete
    /// request head, and for HTTP/1.1 from waiting for a request head to
    /// having it (hyper's header timer, which also bounds the wait for the
    /// next request on a keep-alive connection).
    pub header_read_timeout: Duration,
    /// Time from a request head to the end of its body; past it, 408.
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections on this listener; past it a new one is closed.
    pub max_connections: usize,
    /// Open connections from one peer address (an IPv6 peer counts per /64).
    pub max_connections_per_ip: usize,
    /// Requests in flight on this listener; past it, 503 `M_LIMIT_EXCEEDED`.
    pub max_concurrent_requests: usize,
    /// Requests in flight from one peer address.
    pub max_concurrent_requests_per_ip: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings (a ping unanswered for this long
    /// closes the connection); `None` sends none.
    pub h2_keep_alive_interval: Option<Duration>,
    /// Largest request head: HTTP/2 header list size, HTTP/1.1 read buffer.
    pub max_header_bytes: usize,
    /// Request bodies being received at once on this listener, in bytes of
    /// their declared length (a body without one counts as the largest
    /// allowed); past it, 503 `M_LIMIT_EXCEEDED`. Bounds the memory that
    /// bodies buffered before authentication can take.
    pub max_body_bytes_in_flight: usize,
}

impl ListenerLimits {
    /// Remote servers: many peers, each with a few connections.
    pub const FEDERATION_DEFAULTS: ListenerLimits = ListenerLimits {
        header_read_timeout: Duration::from_secs(20),
        body_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        max_connections: 400,
        max_connections_per_ip: 32,
        max_concurrent_requests: 128,
        max_concurrent_requests_per_ip: 32,
        h2_max_concurrent_streams: 32,
        h2_keep_alive_interval: Some(Duration::from_secs(30)),
        max_header_bytes: 32 * 1024,
        max_body_bytes_in_flight: 128 * 1024 * 1024,
    };
    /// Clients, usually all behind one reverse proxy: the per-address caps
    /// equal the listener's; `/sync` long-polls hold a request each.
    pub const CLIENT_DEFAULTS: ListenerLimits = ListenerLimits {
        idle_timeout: Duration::from_secs(90),
        max_connections: 300,
        max_connections_per_ip: 300,
        max_concurrent_requests: 300,
        max_concurrent_requests_per_ip: 300,
        ..Self::FEDERATION_DEFAULTS
    };
    /// The homeserver: one peer, so the per-address caps equal the
    /// listener's.
    pub const RPC_DEFAULTS: ListenerLimits = ListenerLimits {
        idle_timeout: Duration::from_secs(90),
        max_connections: 64,
        max_connections_per_ip: 64,
        max_concurrent_requests: 128,
        max_concurrent_requests_per_ip: 128,
        ..Self::FEDERATION_DEFAULTS
    };
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenerLimits {
    header_read_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_concurrent_requests: Option<usize>,
    max_concurrent_requests_per_ip: Option<usize>,
    h2_max_concurrent_streams: Option<u32>,
    h2_keep_alive_interval_ms: Option<u64>,
    max_header_bytes: Option<usize>,
    max_body_bytes_in_flight: Option<usize>,
}

/// A duration key in milliseconds: `default` when absent; a value outside
/// `range` is a problem (and the default stands in for it).
fn bounded_ms(
    key: &str,
    value: Option<u64>,
    default: Duration,
    range: std::ops::RangeInclusive<u64>,
    problems: &mut Vec<String>,
) -> Duration {
    match value {
        None => default,
        Some(ms) if range.contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            problems.push(format!(
                "{key} must be in {}..={}",
                range.start(),
                range.end()
            ));
            default
        }
    }
}

/// `<prefix>_burst_ms` (100..=600000) and `<prefix>_max_delay_ms`
/// (0..=10000) of a rate limit.
fn rate_shape(
    prefix: &str,
    burst_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    problems: &mut Vec<String>,
) -> RateShape {
    RateShape {
        burst: bounded_ms(
            &format!("{prefix}_burst_ms"),
            burst_ms,
            RateShape::DEFAULT.burst,
            100..=600_000,
            problems,
        ),
        max_delay: bounded_ms(
            &format!("{prefix}_max_delay_ms"),
            max_delay_ms,
            RateShape::DEFAULT.max_delay,
            0..=10_000,
            problems,
        ),
    }
}

/// Validates one `[<section>.listener]` table over the section's defaults.
fn listener_limits(
    section: &str,
    raw: Option<RawListenerLimits>,
    defaults: ListenerLimits,
    problems: &mut Vec<String>,
) -> ListenerLimits {
    let Some(raw) = raw else {
        return defaults;
    };
    let mut positive_ms = |key: &str, value: Option<u64>, default: Duration| match value {
        Some(0) => {
            problems.push(format!("[{section}.listener] {key} must be at least 1"));
            default
        }
        Some(ms) => Duration::from_millis(ms),
        None => default,
    };
    let header_read_timeout = positive_ms(
        "header_read_timeout_ms",
        raw.header_read_timeout_ms,
        defaults.header_read_timeout,
    );
    let body_read_timeout = positive_ms(
        "body_read_timeout_ms",
        raw.body_read_timeout_ms,
        defaults.body_read_timeout,
    );
    let idle_timeout = positive_ms(
        "idle_timeout_ms",
        raw.idle_timeout_ms,
        defaults.idle_timeout,
    );
    let h2_keep_alive_interval = match raw.h2_keep_alive_interval_ms {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => defaults.h2_keep_alive_interval,
    };
    let limits = ListenerLimits {
        header_read_timeout,
        body_read_timeout,
        idle_timeout,
        max_connections: raw.max_connections.unwrap_or(defaults.max_connections),
        max_connections_per_ip: raw
            .max_connections_per_ip
            .unwrap_or(defaults.max_connections_per_ip),
        max_concurrent_requests: raw
            .max_concurrent_requests
            .unwrap_or(defaults.max_concurrent_requests),
        max_concurrent_requests_per_ip: raw
            .max_concurrent_requests_per_ip
            .unwrap_or(defaults.max_concurrent_requests_per_ip),
        h2_max_concurrent_streams: raw
            .h2_max_concurrent_streams
            .unwrap_or(defaults.h2_max_concurrent_streams),
        h2_keep_alive_interval,
        max_header_bytes: raw.max_header_bytes.unwrap_or(defaults.max_header_bytes),
        max_body_bytes_in_flight: raw
            .max_body_bytes_in_flight
            .unwrap_or(defaults.max_body_bytes_in_flight),
    };
    for (key, value, cap_key, cap) in [
        (
            "max_connections_per_ip",
            limits.max_connections_per_ip,
            "max_connections",
            limits.max_connections,
        ),
        (
            "max_concurrent_requests_per_ip",
            limits.max_concurrent_requests_per_ip,
            "max_concurrent_requests",
            limits.max_concurrent_requests,
        ),
    ] {
        if cap == 0 {
            problems.push(format!("[{section}.listener] {cap_key} must be at least 1"));
        }
        if value == 0 || value > cap {
            problems.push(format!(
                "[{section}.listener] {key} must be between 1 and {cap_key}"
            ));
        }
    }
    if limits.h2_max_concurrent_streams == 0 {
        problems.push(format!(
            "[{section}.listener] h2_max_concurrent_streams must be at least 1"
        ));
    }
    if limits.max_body_bytes_in_flight == 0 {
        problems.push(format!(
            "[{section}.listener] max_body_bytes_in_flight must be at least 1"
        ));
    }
    if !(8192..=1 << 20).contains(&limits.max_header_bytes) {
        problems.push(format!(
            "[{section}.listener] max_header_bytes must be between 8192 and 1048576"
        ));
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
server_name = "localhost:38448"
signing_key_path = "data/signing.key"
[federation]
bind = "127.0.0.1:38448"
tls_cert = "certs/localhost.crt"
tls_key = "certs/localhost.key"
extra_ca = ["certs/test-ca.crt"]
ip_allow = ["127.0.0.0/8", "::1/128"]
[client]
bind = "127.0.0.1:38008"
[rpc]
bind = "127.0.0.1:38009"
secret = "a-test-secret-of-24-bytes"
[store]
sqlite = "data/courier.db"
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_toml_str(text, "test.toml", env)
    }

    #[test]
    fn the_agreed_shape_parses_with_defaults() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(c.server_name.as_str(), "localhost:38448");
        assert_eq!(c.federation.ip_allow.len(), 2);
        assert_eq!(c.store, StoreConfig::Sqlite("data/courier.db".into()));
        assert_eq!(c.federation.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(c.federation.retry.max, Duration::from_secs(600));
    }

    #[test]
    fn pruning_has_defaults_and_checked_bounds() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(
            c.pruning,
            PruneConfig {
                batch: 5_000,
                interval: Duration::from_secs(300),
                destination_retention: Duration::from_secs(30 * 24 * 3600),
                trace_retention: Duration::from_secs(7 * 24 * 3600),
            }
        );
        let tuned = GOOD.replace(
            "sqlite = \"data/courier.db\"",
            "sqlite = \"data/courier.db\"\nprune_batch = 100\nprune_interval_ms = 2000\ndestination_retention_hours = 1\ntrace_retention_hours = 0",
        );
        let c = parse(&tuned, &[]).expect("valid config");
        assert_eq!(c.pruning.trace_retention, Duration::ZERO);
        assert_eq!(c.pruning.batch, 100);
        assert_eq!(c.pruning.interval, Duration::from_secs(2));
        assert_eq!(c.pruning.destination_retention, Duration::from_secs(3600));
        let bad = GOOD.replace(
            "sqlite = \"data/courier.db\"",
            "sqlite = \"data/courier.db\"\nprune_batch = 0\nprune_interval_ms = 10\ndestination_retention_hours = 0\ntrace_retention_hours = 9000",
        );
        match parse(&bad, &[]) {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 4, "{problems:?}");
                assert!(problems.iter().any(|p| p.contains("trace_retention_hours")));
                assert!(problems.iter().any(|p| p.contains("prune_batch")));
                assert!(problems.iter().any(|p| p.contains("prune_interval_ms")));
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains("destination_retention_hours"))
                );
            }
            other => panic!("expected three problems, got {other:?}"),
        }
    }

    #[test]
    fn worker_lease_timings_have_defaults_and_checked_bounds() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(c.worker.lease_duration, Duration::from_secs(30));
        assert_eq!(c.worker.renew_interval, Duration::from_secs(10));
        assert_eq!(c.worker.recheck_after, Duration::from_secs(10));
        assert_eq!(c.worker.claim_limit, DEFAULT_CLAIM_LIMIT);
        let tuned = format!(
            "{GOOD}[worker]\nname = \"w1\"\nlease_ms = 1500\nrenew_ms = 300\nrecheck_ms = 700\nclaim_limit = 8\n"
        );
        let c = parse(&tuned, &[]).expect("valid config");
        assert_eq!(c.worker.lease_duration, Duration::from_millis(1500));
        assert_eq!(c.worker.renew_interval, Duration::from_millis(300));
        assert_eq!(c.worker.recheck_after, Duration::from_millis(700));
        assert_eq!(c.worker.claim_limit, 8);
        // A lease of 1500 ms defaults the other two to a third of it.
        let short = format!("{GOOD}[worker]\nlease_ms = 1500\n");
        let c = parse(&short, &[]).expect("valid config");
        assert_eq!(c.worker.renew_interval, Duration::from_millis(500));
        let bad = format!(
            "{GOOD}[worker]\nlease_ms = 1000\nrenew_ms = 1000\nrecheck_ms = 5\nclaim_limit = 0\n"
        );
        match parse(&bad, &[]) {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 3, "{problems:?}");
                for key in ["renew_ms", "recheck_ms", "claim_limit"] {
                    assert!(
                        problems.iter().any(|p| p.contains(key)),
                        "{key}: {problems:?}"
                    );
                }
            }
            other => panic!("expected three problems, got {other:?}"),
        }
        let tiny = format!("{GOOD}[worker]\nlease_ms = 50\n");
        match parse(&tiny, &[]) {
            Err(ConfigError::Invalid(problems)) => {
                assert!(
                    problems.iter().any(|p| p.contains("lease_ms must be")),
                    "{problems:?}"
                );
            }
            other => panic!("expected a lease_ms problem, got {other:?}"),
        }
    }

    #[test]
    fn retention_has_defaults_and_every_bad_key_is_reported() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(c.retention.inbox_ttl(), &[]);
        assert_eq!(c.retention.inbox_cap, Some(DEFAULT_INBOX_MAX_PER_DEVICE));
        assert_eq!(c.retention.dead_destination_ms, Some(30 * 24 * 3_600_000));
        let tuned = format!(
            "{GOOD}\n[retention]\n\
             inbox_ttl_hours = {{ \"m.room_key_request\" = 168, \"m.key.verification.*\" = 24 }}\n\
             inbox_max_per_device = 0\ndead_destination_days = 0\n"
        );
        let c = parse(&tuned, &[]).expect("valid config");
        assert_eq!(
            c.retention.ttl_for("m.room_key_request"),
            Some(168 * 3_600_000)
        );
        assert_eq!(
            c.retention.ttl_for("m.key.verification.start"),
            Some(24 * 3_600_000)
        );
        assert_eq!(c.retention.ttl_for("m.room.encrypted"), None);
        assert_eq!(c.retention.inbox_cap, None);
        assert_eq!(c.retention.dead_destination_ms, None);
        // An override reaches the section like any other.
        let c = parse(GOOD, &[("COURIER_RETENTION__DEAD_DESTINATION_DAYS", "7")])
            .expect("valid config");
        assert_eq!(c.retention.dead_destination_ms, Some(7 * 24 * 3_600_000));

        let bad = format!(
            "{GOOD}\n[retention]\n\
             inbox_ttl_hours = {{ \"m.*.x\" = 24, \"\" = 1, \"m.ok\" = 0 }}\n\
             inbox_max_per_device = 5\ndead_destination_days = 4000\n"
        );
        match parse(&bad, &[]) {
            Err(ConfigError::Invalid(problems)) => {
                assert_eq!(problems.len(), 5, "{problems:?}");
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains("\"m.*.x\"") && p.contains("only at the end"))
                );
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains("empty event type pattern"))
                );
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains("\"m.ok\"") && p.contains("between 1 and"))
                );
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains("inbox_max_per_device") && p.contains("not 5"))
                );
                assert!(
                    problems
                        .iter()
                        .any(|p| p.contains("dead_destination_days") && p.contains("not 4000"))
                );
            }
            other => panic!("expected five problems, got {other:?}"),
        }
        let typo = format!("{GOOD}\n[retention]\ninbox_ttl = 3\n");
        assert!(matches!(parse(&typo, &[]), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn environment_overrides_keys_and_sections() {
        let c = parse(
            GOOD,
            &[
                ("COURIER_SERVER_NAME", "example.org"),
                ("COURIER_RPC__SECRET", "another-long-secret"),
                ("COURIER_FEDERATION__RETRY_MAX_MS", "5000"),
                ("UNRELATED", "x"),
                ("COURIER_BIN", "/usr/bin/courier"),
                ("COURIER_RPC_URL", "http://127.0.0.1:1"),
                ("COURIER_CONFIG", "elsewhere.toml"),
            ],
        )
        .expect("valid config");
        assert_eq!(c.server_name.as_str(), "example.org");
        assert_eq!(c.rpc.secret, "another-long-secret");
        assert_eq!(c.federation.retry.max, Duration::from_millis(5000));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
server_name = "bad name"
[federation]
bind = "nope"
ip_allow = ["300.0.0.0/8"]
[client]
bind = "127.0.0.1:1"
[rpc]
bind = "127.0.0.1:2"
secret = "x"
[store]
sqlite = "a"
postgres = "b"
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, &[]) else {
            panic!("expected an invalid config");
        };
        let all = problems.join("\n");
        for needle in [
            "server name",
            "signing_key_path",
            "[federation] bind",
            "tls_cert",
            "ip_allow",
            "[rpc] secret",
            "exactly one",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn quick_return_and_refusing_keys_have_defaults_and_are_checked_together() {
        let c = parse(GOOD, &[]).expect("valid config");
        let retry = c.federation.retry;
        assert_eq!(retry.quick_phase, Duration::from_secs(300));
        assert_eq!(retry.quick_return, Duration::from_secs(5));
        assert_eq!(retry.send_margin, Duration::from_secs(1));
        assert_eq!(c.federation.refusing_after, 1);
        let c = parse(
            GOOD,
            &[
                ("COURIER_FEDERATION__RETRY_QUICK_RETURN_MS", "10000"),
                ("COURIER_FEDERATION__REFUSING_AFTER", "3"),
            ],
        )
        .expect("valid config");
        assert_eq!(c.federation.retry.quick_return, Duration::from_secs(10));
        assert_eq!(c.federation.refusing_after, 3);
        // Three problems, all reported at once.
        let r = parse(
            GOOD,
            &[
                ("COURIER_FEDERATION__RETRY_QUICK_PHASE_MS", "90000000"),
                ("COURIER_FEDERATION__RETRY_SEND_MARGIN_MS", "5000"),
                ("COURIER_FEDERATION__REFUSING_AFTER", "0"),
            ],
        );
        let Err(ConfigError::Invalid(problems)) = r else {
            panic!("expected an invalid config, got {r:?}");
        };
        let all = problems.join("\n");
        for needle in [
            "retry_quick_phase_ms",
            "retry_send_margin_ms",
            "refusing_after",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        // A quick return the first delay (with jitter) cannot keep.
        let r = parse(
            GOOD,
            &[
                ("COURIER_FEDERATION__RETRY_INITIAL_MS", "4000"),
                ("COURIER_FEDERATION__RETRY_QUICK_RETURN_MS", "5000"),
            ],
        );
        let Err(ConfigError::Invalid(problems)) = r else {
            panic!("expected an invalid config, got {r:?}");
        };
        assert!(problems.iter().any(|p| p.contains("cannot be kept")));
    }

    #[test]
    fn the_discovery_deadline_defaults_to_15_s_and_is_bounded() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(c.federation.discovery_timeout, Duration::from_secs(15));
        let c = parse(
            GOOD,
            &[("COURIER_FEDERATION__DISCOVERY_TIMEOUT_MS", "2500")],
        )
        .expect("valid config");
        assert_eq!(c.federation.discovery_timeout, Duration::from_millis(2500));
        for bad in ["0", "600001"] {
            let r = parse(GOOD, &[("COURIER_FEDERATION__DISCOVERY_TIMEOUT_MS", bad)]);
            let Err(ConfigError::Invalid(problems)) = r else {
                panic!("{bad}: expected an invalid config, got {r:?}");
            };
            assert!(problems.iter().any(|p| p.contains("discovery_timeout_ms")));
        }
    }

    #[test]
    fn listener_limits_have_per_section_defaults_and_overrides() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(c.federation.listener, ListenerLimits::FEDERATION_DEFAULTS);
        assert_eq!(c.client.listener, ListenerLimits::CLIENT_DEFAULTS);
        assert_eq!(c.rpc.listener, ListenerLimits::RPC_DEFAULTS);
        assert_eq!(c.federation.listener.h2_max_concurrent_streams, 32);
        let total = ListenerLimits::FEDERATION_DEFAULTS.max_connections
            + ListenerLimits::CLIENT_DEFAULTS.max_connections
            + ListenerLimits::RPC_DEFAULTS.max_connections;
        assert!(total <= 800, "room under 1,024 descriptors: {total}");

        let text = format!(
            "{GOOD}\n[client.listener]\nheader_read_timeout_ms = 300\nmax_connections = 10\nmax_connections_per_ip = 4\nh2_keep_alive_interval_ms = 0\n"
        );
        let c = parse(
            &text,
            &[("COURIER_RPC__LISTENER__MAX_CONCURRENT_REQUESTS_PER_IP", "7")],
        )
        .expect("valid config");
        assert_eq!(
            c.client.listener.header_read_timeout,
            Duration::from_millis(300)
        );
        assert_eq!(c.client.listener.max_connections, 10);
        assert_eq!(c.client.listener.max_connections_per_ip, 4);
        assert_eq!(c.client.listener.h2_keep_alive_interval, None);
        assert_eq!(
            c.client.listener.body_read_timeout,
            ListenerLimits::CLIENT_DEFAULTS.body_read_timeout
        );
        assert_eq!(c.rpc.listener.max_concurrent_requests_per_ip, 7);
    }

    #[test]
    fn bad_listener_limits_are_all_reported() {
        let text = format!(
            "{GOOD}\n[federation.listener]\nidle_timeout_ms = 0\nmax_connections = 5\nmax_connections_per_ip = 6\nmax_concurrent_requests_per_ip = 0\nh2_max_concurrent_streams = 0\nmax_header_bytes = 100\nmax_body_bytes_in_flight = 0\n"
        );
        let Err(ConfigError::Invalid(problems)) = parse(&text, &[]) else {
            panic!("expected an invalid config");
        };
        let all = problems.join("\n");
        for needle in [
            "[federation.listener] idle_timeout_ms",
            "max_connections_per_ip must be between 1 and max_connections",
            "max_concurrent_requests_per_ip",
            "h2_max_concurrent_streams",
            "max_header_bytes",
            "max_body_bytes_in_flight",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let typo = format!("{GOOD}\n[rpc.listener]\nmax_conections = 1\n");
        assert!(matches!(parse(&typo, &[]), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn a_typo_inside_a_section_is_still_reported() {
        let r = parse(GOOD, &[("COURIER_FEDERATION__BIDN", "127.0.0.1:1")]);
        assert!(matches!(r, Err(ConfigError::Parse { .. })), "{r:?}");
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_errors() {
        assert!(matches!(
            parse("server_name = \"a\"\nbogus = 1\n", &[]),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            parse("server_name = ", &[]),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn only_a_localhost_relay_may_trust_the_development_ca() {
        let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-ca.crt");
        let text = GOOD.replace("certs/test-ca.crt", &ca.display().to_string());
        assert!(parse(&text, &[]).is_ok(), "localhost may");
        let public = text.replace(
            "server_name = \"localhost:38448\"",
            "server_name = \"matrix.example.org\"",
        );
        let error = parse(&public, &[]).expect_err("a public name may not");
        assert!(error.to_string().contains("development CA"), "{error}");
        for name in ["127.0.0.1:8448", "[::1]", "relay.localhost"] {
            let local = text.replace(
                "server_name = \"localhost:38448\"",
                &format!("server_name = \"{name}\""),
            );
            assert!(parse(&local, &[]).is_ok(), "{name}");
        }
    }

    #[test]
    fn client_send_limits_and_key_fetch_concurrency_have_defaults_and_bounds() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(
            c.client.send_limits.max_destinations,
            DEFAULT_MAX_DESTINATIONS
        );
        assert_eq!(c.client.send_limits.max_recipients, DEFAULT_MAX_RECIPIENTS);
        assert_eq!(c.client.sends_per_user_per_sec, 0);
        assert_eq!(c.federation.key_fetch_concurrency, 16);
        let error = parse(
            GOOD,
            &[
                ("COURIER_CLIENT__MAX_DESTINATIONS_PER_SEND", "0"),
                ("COURIER_FEDERATION__KEY_FETCH_CONCURRENCY", "0"),
                ("COURIER_FEDERATION__ORIGIN_DENY", "[\"not a name\"]"),
            ],
        )
        .expect_err("refused");
        let text = error.to_string();
        assert!(text.contains("max_destinations_per_send"), "{text}");
        assert!(text.contains("key_fetch_concurrency"), "{text}");
        assert!(text.contains("origin_deny"), "{text}");
    }

    #[test]
    fn rate_shapes_and_key_intervals_have_defaults_and_bounds() {
        let c = parse(GOOD, &[]).expect("valid config");
        assert_eq!(c.federation.inbound_rate_shape, RateShape::DEFAULT);
        assert_eq!(c.client.send_rate_shape, RateShape::DEFAULT);
        assert_eq!(c.federation.key_refetch_interval, Duration::from_secs(60));
        assert_eq!(c.federation.key_failure_cache, Duration::from_secs(30));
        let c = parse(
            GOOD,
            &[
                ("COURIER_FEDERATION__INBOUND_RATE_BURST_MS", "5000"),
                ("COURIER_FEDERATION__INBOUND_RATE_MAX_DELAY_MS", "0"),
                ("COURIER_CLIENT__SEND_RATE_BURST_MS", "1000"),
                ("COURIER_FEDERATION__KEY_REFETCH_INTERVAL_MS", "300000"),
                ("COURIER_FEDERATION__KEY_FAILURE_CACHE_MS", "5000"),
            ],
        )
        .expect("valid overrides");
        assert_eq!(
            c.federation.inbound_rate_shape,
            RateShape {
                burst: Duration::from_secs(5),
                max_delay: Duration::ZERO
            }
        );
        assert_eq!(c.client.send_rate_shape.burst, Duration::from_secs(1));
        assert_eq!(c.federation.key_refetch_interval, Duration::from_secs(300));
        assert_eq!(c.federation.key_failure_cache, Duration::from_secs(5));
        // Every bad value is reported, each once, in one error.
        let error = parse(
            GOOD,
            &[
                ("COURIER_FEDERATION__INBOUND_RATE_BURST_MS", "10"),
                ("COURIER_FEDERATION__INBOUND_RATE_MAX_DELAY_MS", "60000"),
                ("COURIER_CLIENT__SEND_RATE_MAX_DELAY_MS", "20000"),
                ("COURIER_FEDERATION__KEY_REFETCH_INTERVAL_MS", "0"),
                ("COURIER_FEDERATION__KEY_FAILURE_CACHE_MS", "999999999"),
            ],
        )
        .expect_err("refused");
        let text = error.to_string();
        for key in [
            "[federation] inbound_rate_burst_ms",
            "[federation] inbound_rate_max_delay_ms",
            "[client] send_rate_max_delay_ms",
            "[federation] key_refetch_interval_ms",
            "[federation] key_failure_cache_ms",
        ] {
            assert_eq!(text.matches(key).count(), 1, "{key} in {text}");
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The documented example and the dev configs must stay valid.
    #[test]
    fn shipped_configs_are_valid() {
        for path in [
            "config/courier.example.toml",
            "config/dev/relay-a.toml",
            "config/dev/relay-b.toml",
        ] {
            let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            let text = std::fs::read_to_string(&full).expect("shipped config exists");
            // The example's placeholder secret is refused on purpose (an
            // operator must replace it); with a real one the rest is valid.
            let placeholder = format!("secret = \"{PLACEHOLDER_RPC_SECRET}\"");
            let is_example = text.contains(&placeholder);
            let text = text.replace(
                &placeholder,
                "secret = \"a-real-secret-of-32-bytes-length\"",
            );
            let parsed = Config::from_toml_str(&text, path, std::iter::empty());
            assert!(parsed.is_ok(), "{path}: {:?}", parsed.err());
            assert_eq!(is_example, path.ends_with("example.toml"), "{path}");
        }
    }

    /// The example as shipped fails on its placeholder secret, and on that
    /// alone, named once.
    #[test]
    fn the_example_placeholder_secret_is_refused_once() {
        let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/courier.example.toml");
        let text = std::fs::read_to_string(&full).expect("example exists");
        let Err(ConfigError::Invalid(problems)) =
            Config::from_toml_str(&text, "example", std::iter::empty())
        else {
            panic!("the placeholder secret must be refused");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("placeholder"), "{problems:?}");
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    fn problems_for(secret: Option<&str>, file: Option<&Path>) -> Vec<String> {
        let mut problems = Vec::new();
        rpc_secret(secret.map(str::to_owned), file, &mut problems);
        problems
    }

    fn scratch_file(name: &str, contents: &str, mode: u32) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "courier-secret-{name}-{}-{}",
            std::process::id(),
            crate::keys::random_key_version()
        ));
        std::fs::write(&path, contents).expect("write scratch secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        #[cfg(not(unix))]
        let _ = mode;
        path
    }

    #[test]
    fn placeholder_and_short_secrets_are_refused_with_one_message_each() {
        assert!(problems_for(Some("sixteen-bytes-ok"), None).is_empty());
        let placeholder = problems_for(Some(PLACEHOLDER_RPC_SECRET), None);
        assert_eq!(placeholder.len(), 1, "{placeholder:?}");
        assert!(placeholder[0].contains("placeholder"));
        let short = problems_for(Some("fifteen-bytes-x"), None);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(
            short[0].contains("at least 16 bytes (it is 15)"),
            "{short:?}"
        );
        let missing = problems_for(None, None);
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].contains("required"));
    }

    #[test]
    fn a_secret_file_must_be_private_and_long_enough() {
        let good = scratch_file("good", "a-secret-read-from-a-file\n", 0o600);
        let mut problems = Vec::new();
        let secret = rpc_secret(None, Some(&good), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(secret, "a-secret-read-from-a-file");
        let both = problems_for(Some("sixteen-bytes-ok"), Some(&good));
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(both[0].contains("not both"));
        let short = scratch_file("short", "short\n", 0o600);
        let problems = problems_for(None, Some(&short));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("at least 16 bytes"));
        let missing = problems_for(None, Some(Path::new("/nonexistent/courier-secret")));
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].matches("No such file").count(), 1, "{missing:?}");
        #[cfg(unix)]
        {
            let open = scratch_file("open", "a-secret-read-from-a-file\n", 0o644);
            let problems = problems_for(None, Some(&open));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains("readable by group or others (mode 644)"));
            let _ = std::fs::remove_file(open);
        }
        for path in [good, short] {
            let _ = std::fs::remove_file(path);
        }
    }
}
