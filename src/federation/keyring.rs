//! Remote server keys for verifying X-Matrix: a memory cache over the store's
//! cache (`server_keys`) over fetching `GET /_matrix/key/v2/server` from the
//! origin itself (SPEC §4.3 step 6, §5.2, §5.3).
//!
//! It owns when keys are fetched and how long they are trusted: a key is used
//! only until its effective expiry (`min(valid_until_ts, fetched + 7 days)`,
//! computed by [`validate_server_key_response`]); an unknown or expired
//! key id triggers at most one fetch per server per refetch interval; a
//! failed fetch is remembered for the failure cache time (both configured,
//! defaults `REFETCH_INTERVAL` and `FAILURE_TTL`) so that a flood of bad
//! requests does not become a flood of outbound fetches; concurrent lookups
//! for the same server share one fetch (single flight, through a per-server
//! async lock). It does not verify requests (the inbound extractor does) and
//! does not know HTTP: fetching goes through the [`KeyFetcher`] trait, which
//! the outbound [`FederationClient`] implements.
//!
//! Notaries (`federation.notary_servers`, optional): only when the origin
//! itself cannot be reached, each notary is asked in turn
//! (`GET /_matrix/key/v2/query/{serverName}`). Its answer is used only if the
//! origin's self-signature verifies (as for a direct fetch) **and** the
//! notary's own signature verifies with a notary key fetched directly from
//! the notary (SPEC §5.4). Direct fetches are always preferred (MSC4029).
//!
//! Architecture Invariant: only keys from a response that names the server
//! and is self-signed by it are ever cached; `old_verify_keys` never are.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::Config;
use crate::federation::outbound::client::FederationClient;
use crate::identifiers::ServerName;
use crate::keys::{KeyError, MAX_KEY_VALIDITY_MS};
use crate::signing::{decode_verify_key, encode_base64, verify_json};
use crate::store::{Store, StoredServerKey};

/// After a fetch, the same server is not fetched again for an unknown or
/// expired key id before this much time has passed (the default of
/// `[federation] key_refetch_interval_ms`).
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// After a failed fetch, lookups for that server fail at once for this long
/// (the default of `[federation] key_failure_cache_ms`).
pub const FAILURE_TTL: Duration = Duration::from_secs(30);
/// The most servers kept in memory; past it, entries without a usable key
/// are evicted (their keys, if any, stay in the store).
const MAX_SERVERS: usize = 10_000;
/// Key fetches in flight at once when the configuration does not say.
pub const DEFAULT_FETCH_CONCURRENCY: usize = 16;
/// The path of a server's own key document (SPEC §5.1).
pub const SERVER_KEY_PATH: &str = "/_matrix/key/v2/server";

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("no valid key {key_id} for {server_name}: {reason}")]
    Unavailable {
        server_name: String,
        key_id: String,
        reason: String,
    },
}

/// The future a [`KeyFetcher`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, String>> + Send + 'a>>;

/// Fetches a server's own key document (`GET /_matrix/key/v2/server`,
/// unsigned). The federation client is the production implementation; tests
/// may serve documents from memory.
pub trait KeyFetcher: Send + Sync + 'static {
    fn fetch_server_keys<'a>(&'a self, server_name: &'a ServerName) -> FetchFuture<'a>;

    /// Asks `notary` for `server_name`'s keys
    /// (`GET /_matrix/key/v2/query/{serverName}`, unsigned); the answer is
    /// `{"server_keys": [...]}` (SPEC §5.4).
    fn query_notary<'a>(
        &'a self,
        notary: &'a ServerName,
        server_name: &'a ServerName,
    ) -> FetchFuture<'a>;
}

impl KeyFetcher for FederationClient {
    fn fetch_server_keys<'a>(&'a self, server_name: &'a ServerName) -> FetchFuture<'a> {
        Box::pin(async move {
            self.get_json(server_name, SERVER_KEY_PATH, false)
                .await
                .map_err(|error| error.to_string())
        })
    }

    fn query_notary<'a>(
        &'a self,
        notary: &'a ServerName,
        server_name: &'a ServerName,
    ) -> FetchFuture<'a> {
        Box::pin(async move {
            let path = format!(
                "{NOTARY_QUERY_PATH}/{}",
                percent_encoding::utf8_percent_encode(server_name.as_str(), PATH_SEGMENT)
            );
            self.get_json(notary, &path, false)
                .await
                .map_err(|error| error.to_string())
        })
    }
}

/// The notary query path (SPEC §5.4); the server name follows as a segment.
pub const NOTARY_QUERY_PATH: &str = "/_matrix/key/v2/query";

/// Everything but RFC 3986 unreserved characters is encoded in a segment.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One usable key in memory.
#[derive(Clone)]
struct CachedKey {
    key: VerifyingKey,
    valid_until_ts: i64,
}

/// What memory knows about one server.
struct ServerEntry {
    keys: HashMap<String, CachedKey>,
    /// Serialises store reads and fetches for this server (single flight).
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
    /// Before this instant, a miss neither reads the store nor fetches.
    quiet_until: Option<Instant>,
    /// Why the last attempt did not produce the key, for the error text.
    last_failure: Option<String>,
}

impl ServerEntry {
    fn new() -> Self {
        ServerEntry {
            keys: HashMap::new(),
            fetch_lock: Arc::new(tokio::sync::Mutex::new(())),
            quiet_until: None,
            last_failure: None,
        }
    }

    fn usable(&self, key_id: &str, now_ms: i64) -> Option<VerifyingKey> {
        self.keys
            .get(key_id)
            .filter(|cached| cached.valid_until_ts > now_ms)
            .map(|cached| cached.key)
    }

    fn has_any_usable_key(&self, now_ms: i64) -> bool {
        self.keys.values().any(|k| k.valid_until_ts > now_ms)
    }
}

/// A failed lookup, remembered under the server's normalized name.
struct Failure {
    until: Instant,
    reason: String,
}

pub struct KeyRing {
    store: Arc<dyn Store>,
    fetcher: Arc<dyn KeyFetcher>,
    fetch_timeout: Duration,
    /// Asked, in order, when a server cannot be reached for its own keys.
    notaries: Vec<ServerName>,
    /// Exact server name → what memory knows (bounded by `max_servers`).
    servers: Mutex<HashMap<String, ServerEntry>>,
    /// Normalized name → last failure, so `EVIL.example` and
    /// `evil.example.` share one failure (bounded by `max_servers`).
    failures: Mutex<HashMap<String, Failure>>,
    /// Normalized names with a fetch in flight: one per host at a time,
    /// whatever spelling of its name the requests use.
    fetching: Mutex<HashSet<String>>,
    /// Fetches in flight over all servers (`key_fetch_concurrency`).
    fetch_permits: Semaphore,
    max_servers: usize,
    /// `REFETCH_INTERVAL` unless configured.
    refetch_interval: Duration,
    /// `FAILURE_TTL` unless configured.
    failure_ttl: Duration,
}

/// Removes a normalized name from `KeyRing::fetching` when its fetch ends,
/// however it ends.
struct FetchingGuard<'a> {
    fetching: &'a Mutex<HashSet<String>>,
    name: String,
}

impl Drop for FetchingGuard<'_> {
    fn drop(&mut self) {
        crate::sync::lock(self.fetching).remove(&self.name);
    }
}

impl KeyRing {
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>, client: Arc<FederationClient>) -> Self {
        Self::with_fetcher(store, client, config.federation.key_fetch_timeout)
            .with_notaries(config.federation.notary_servers.clone())
            .with_fetch_concurrency(config.federation.key_fetch_concurrency)
            .with_intervals(
                config.federation.key_refetch_interval,
                config.federation.key_failure_cache,
            )
    }

    /// Fetches a server again for an unknown key id at most once per
    /// `refetch`, and remembers a failed fetch for `failure_ttl`.
    pub fn with_intervals(mut self, refetch: Duration, failure_ttl: Duration) -> Self {
        self.refetch_interval = refetch;
        self.failure_ttl = failure_ttl;
        self
    }

    /// At most `permits` fetches in flight at once over all servers.
    pub fn with_fetch_concurrency(mut self, permits: usize) -> Self {
        self.fetch_permits = Semaphore::new(permits.max(1));
        self
    }

    /// Remembers at most `max` servers (tests use a small bound).
    pub fn with_max_servers(mut self, max: usize) -> Self {
        self.max_servers = max.max(1);
        self
    }

    /// `key_id` of `server_name` if it is in memory and valid now: the
    /// answer `verify_key` would give without a store read or outbound work.
    pub fn key_in_memory(&self, server_name: &str, key_id: &str) -> Option<VerifyingKey> {
        self.usable(server_name, key_id)
    }

    /// How many servers memory holds (tests and metrics).
    pub fn servers_in_memory(&self) -> usize {
        self.lock_servers().len()
    }

    /// Falls back to these notary servers when a server cannot be reached.
    pub fn with_notaries(mut self, notaries: Vec<ServerName>) -> Self {
        self.notaries = notaries;
        self
    }

    /// A key ring that fetches through `fetcher`.
    pub fn with_fetcher(
        store: Arc<dyn Store>,
        fetcher: Arc<dyn KeyFetcher>,
        fetch_timeout: Duration,
    ) -> Self {
        KeyRing {
            store,
            fetcher,
            fetch_timeout,
            notaries: Vec::new(),
            servers: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashSet::new()),
            fetch_permits: Semaphore::new(DEFAULT_FETCH_CONCURRENCY),
            max_servers: MAX_SERVERS,
            refetch_interval: REFETCH_INTERVAL,
            failure_ttl: FAILURE_TTL,
        }
    }

    /// The current verify key `key_id` of `server_name`, valid now.
    pub async fn verify_key(
        &self,
        server_name: &str,
        key_id: &str,
    ) -> Result<VerifyingKey, KeyRingError> {
        let unavailable = |reason: String| KeyRingError::Unavailable {
            server_name: server_name.to_owned(),
            key_id: key_id.to_owned(),
            reason,
        };
        let server = ServerName::parse(server_name).map_err(|e| unavailable(e.to_string()))?;
        let normalized = server.normalized();

        // 1. Memory, without waiting for anyone.
        let fetch_lock = {
            let mut servers = self.lock_servers();
            if let Some(entry) = servers.get(server_name)
                && let Some(key) = entry.usable(key_id, crate::clock::now_ms())
            {
                return Ok(key);
            }
            if let Some(reason) = self.recent_failure(&normalized) {
                return Err(unavailable(reason));
            }
            if !servers.contains_key(server_name) && servers.len() >= self.max_servers {
                evict(&mut servers, crate::clock::now_ms(), self.max_servers);
                if servers.len() >= self.max_servers {
                    // Every entry is being looked up right now: refuse a
                    // new server rather than grow past the bound.
                    metrics::counter!("courier_key_lookups_refused_total", "reason" => "full")
                        .increment(1);
                    return Err(unavailable(
                        "too many servers are being looked up; try again later".to_owned(),
                    ));
                }
            }
            servers
                .entry(server_name.to_owned())
                .or_insert_with(ServerEntry::new)
                .fetch_lock
                .clone()
        };

        // 2. One store read or fetch per server at a time; whoever waited
        // re-checks memory first, so concurrent misses share one fetch.
        let _flight = fetch_lock.lock().await;
        {
            let servers = self.lock_servers();
            if let Some(entry) = servers.get(server_name) {
                if let Some(key) = entry.usable(key_id, crate::clock::now_ms()) {
                    return Ok(key);
                }
                if entry
                    .quiet_until
                    .is_some_and(|until| Instant::now() < until)
                {
                    let reason = entry
                        .last_failure
                        .clone()
                        .unwrap_or_else(|| "key unknown; refetch is rate-limited".to_owned());
                    return Err(unavailable(reason));
                }
            }
        }

        // 3. The store (filled by an earlier fetch, by another worker, or by
        // an operator).
        match self.store.server_keys(server_name).await {
            Ok(stored) => {
                self.remember(server_name, &stored);
                if let Some(key) = self.usable(server_name, key_id) {
                    return Ok(key);
                }
            }
            Err(error) => {
                tracing::warn!(origin = server_name, %error, "reading cached server keys failed");
            }
        }

        // 4. The origin itself, then the notaries (if configured): one
        // fetch per host at a time, and at most `key_fetch_concurrency` over
        // all servers; a lookup waits for a slot at most `fetch_timeout`.
        // Neither refusal is remembered as the server's failure: it says
        // nothing about the server.
        let _fetching = {
            let mut fetching = crate::sync::lock(&self.fetching);
            if !fetching.insert(normalized.clone()) {
                metrics::counter!("courier_key_lookups_refused_total", "reason" => "host_busy")
                    .increment(1);
                return Err(unavailable(
                    "a key fetch for this host is already in progress".to_owned(),
                ));
            }
            FetchingGuard {
                fetching: &self.fetching,
                name: normalized.clone(),
            }
        };
        let Ok(Ok(_permit)) =
            tokio::time::timeout(self.fetch_timeout, self.fetch_permits.acquire()).await
        else {
            metrics::counter!("courier_key_lookups_refused_total", "reason" => "busy").increment(1);
            return Err(unavailable(
                "too many key fetches in progress; try again later".to_owned(),
            ));
        };
        let outcome = match self.fetch(&server).await {
            Ok(keys) => Ok(keys),
            Err(direct) if self.notaries.is_empty() => Err(direct),
            Err(direct) => self
                .fetch_from_notaries(&server)
                .await
                .map_err(|notaries| format!("{direct}; {notaries}")),
        };
        let now = Instant::now();
        match outcome {
            Ok(mut keys) => {
                let now_ms = crate::clock::now_ms();
                keys.retain(|key| key.valid_until_ts > now_ms);
                self.remember(server_name, &keys);
                if let Err(error) = self.store.put_server_keys(keys).await {
                    tracing::warn!(origin = server_name, %error, "storing fetched server keys failed");
                }
                let key = self.usable(server_name, key_id);
                let mut servers = self.lock_servers();
                let entry = servers
                    .entry(server_name.to_owned())
                    .or_insert_with(ServerEntry::new);
                entry.quiet_until = Some(now + self.refetch_interval);
                entry.last_failure = None;
                match key {
                    Some(key) => Ok(key),
                    None => {
                        tracing::info!(
                            origin = server_name,
                            key_id,
                            "the server does not publish this key"
                        );
                        Err(unavailable(
                            "the server does not publish this key".to_owned(),
                        ))
                    }
                }
            }
            Err(reason) => {
                tracing::info!(origin = server_name, %reason, "fetching server keys failed");
                metrics::counter!("courier_key_fetch_failures_total").increment(1);
                let mut servers = self.lock_servers();
                let entry = servers
                    .entry(server_name.to_owned())
                    .or_insert_with(ServerEntry::new);
                entry.quiet_until = Some(now + self.failure_ttl);
                entry.last_failure = Some(format!("fetching keys failed: {reason}"));
                drop(servers);
                self.record_failure(&normalized, format!("fetching keys failed: {reason}"));
                Err(unavailable(format!("fetching keys failed: {reason}")))
            }
        }
    }

    /// Fetches and validates the server's own key document.
    async fn fetch(&self, server: &ServerName) -> Result<Vec<StoredServerKey>, String> {
        metrics::counter!("courier_key_fetches_total").increment(1);
        let document =
            match tokio::time::timeout(self.fetch_timeout, self.fetcher.fetch_server_keys(server))
                .await
            {
                Ok(Ok(document)) => document,
                Ok(Err(reason)) => return Err(reason),
                Err(_) => return Err("timed out".to_owned()),
            };
        validate_server_key_response(server.as_str(), &document, crate::clock::now_ms())
            .map_err(|error| error.to_string())
    }

    /// Asks each notary in turn for `server`'s keys. A notary's answer counts
    /// only if every document in it is self-signed by `server` (checked as
    /// for a direct fetch) and signed by the notary with a key of the notary
    /// fetched directly from it (SPEC §5.4).
    async fn fetch_from_notaries(
        &self,
        server: &ServerName,
    ) -> Result<Vec<StoredServerKey>, String> {
        let mut reasons = Vec::new();
        for notary in &self.notaries {
            if notary == server {
                continue;
            }
            match self.fetch_from_notary(notary, server).await {
                Ok(keys) => {
                    tracing::info!(origin = %server, %notary, "got server keys from a notary");
                    return Ok(keys);
                }
                Err(reason) => {
                    tracing::info!(origin = %server, %notary, %reason, "notary key query failed");
                    reasons.push(format!("notary {notary}: {reason}"));
                }
            }
        }
        Err(reasons.join("; "))
    }

    async fn fetch_from_notary(
        &self,
        notary: &ServerName,
        server: &ServerName,
    ) -> Result<Vec<StoredServerKey>, String> {
        metrics::counter!("courier_key_notary_queries_total").increment(1);
        let answer = match tokio::time::timeout(
            self.fetch_timeout,
            self.fetcher.query_notary(notary, server),
        )
        .await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(reason)) => return Err(reason),
            Err(_) => return Err("timed out".to_owned()),
        };
        let documents = answer
            .get("server_keys")
            .and_then(Value::as_array)
            .ok_or_else(|| "the answer has no server_keys array".to_owned())?;
        let now_ms = crate::clock::now_ms();
        let mut keys = Vec::new();
        for document in documents {
            // The notary may return other servers' documents too.
            if document.get("server_name").and_then(Value::as_str) != Some(server.as_str()) {
                continue;
            }
            let found = validate_server_key_response(server.as_str(), document, now_ms)
                .map_err(|error| error.to_string())?;
            self.check_notary_signature(notary, document).await?;
            keys.extend(found);
        }
        if keys.is_empty() {
            return Err("the notary knows no keys for the server".to_owned());
        }
        Ok(keys)
    }

    /// At least one of the notary's signatures on `document` must verify
    /// with a key of the notary's; the notary's keys come only from the
    /// notary itself (memory, store, or a direct fetch), never from another
    /// notary. This takes no single-flight lock, so a notary that is also an
    /// origin being looked up cannot deadlock with it.
    async fn check_notary_signature(
        &self,
        notary: &ServerName,
        document: &Value,
    ) -> Result<(), String> {
        let key_ids: Vec<String> = document
            .get("signatures")
            .and_then(|signatures| signatures.get(notary.as_str()))
            .and_then(Value::as_object)
            .map(|by_key| by_key.keys().cloned().collect())
            .unwrap_or_default();
        if key_ids.is_empty() {
            return Err("the document is not signed by the notary".to_owned());
        }
        let mut fetched = false;
        for key_id in &key_ids {
            let mut key = self.usable(notary.as_str(), key_id);
            if key.is_none() && !fetched {
                fetched = true;
                if let Ok(stored) = self.store.server_keys(notary.as_str()).await {
                    self.remember(notary.as_str(), &stored);
                }
                key = self.usable(notary.as_str(), key_id);
                let notary_name = notary.normalized();
                if key.is_none() && self.recent_failure(&notary_name).is_none() {
                    match self.fetch(notary).await {
                        Ok(notary_keys) => self.keep_notary_keys(notary, notary_keys).await,
                        Err(reason) => self.record_failure(
                            &notary_name,
                            format!("fetching the notary's keys failed: {reason}"),
                        ),
                    }
                    key = self.usable(notary.as_str(), key_id);
                }
            }
            if let Some(key) = key {
                return crate::signing::verify_json(document, notary.as_str(), key_id, &key)
                    .map_err(|error| format!("the notary's signature {key_id} fails: {error}"));
            }
        }
        Err("no key of the notary to check its signature".to_owned())
    }

    /// Keeps a notary's own keys, fetched directly from it.
    async fn keep_notary_keys(&self, notary: &ServerName, mut notary_keys: Vec<StoredServerKey>) {
        let now_ms = crate::clock::now_ms();
        notary_keys.retain(|k| k.valid_until_ts > now_ms);
        self.remember(notary.as_str(), &notary_keys);
        if let Err(error) = self.store.put_server_keys(notary_keys).await {
            tracing::warn!(%notary, %error, "storing a notary's keys failed");
        }
    }

    /// The reason of a failure of `normalized` less than `FAILURE_TTL` ago.
    fn recent_failure(&self, normalized: &str) -> Option<String> {
        let failures = crate::sync::lock(&self.failures);
        failures
            .get(normalized)
            .filter(|failure| Instant::now() < failure.until)
            .map(|failure| failure.reason.clone())
    }

    /// Remembers a failed lookup of `normalized` for `FAILURE_TTL`; the map
    /// stays within `max_servers` (expired entries go first, then half).
    fn record_failure(&self, normalized: &str, reason: String) {
        let now = Instant::now();
        let mut failures = crate::sync::lock(&self.failures);
        if !failures.contains_key(normalized) && failures.len() >= self.max_servers {
            failures.retain(|_, failure| now < failure.until);
            if failures.len() >= self.max_servers {
                let mut keep = failures.len() / 2;
                failures.retain(|_, _| {
                    keep = keep.saturating_sub(1);
                    keep > 0
                });
            }
        }
        failures.insert(
            normalized.to_owned(),
            Failure {
                until: now + self.failure_ttl,
                reason,
            },
        );
    }

    /// Puts the still-valid keys among `keys` into memory.
    fn remember(&self, server_name: &str, keys: &[StoredServerKey]) {
        let now_ms = crate::clock::now_ms();
        let mut servers = self.lock_servers();
        let entry = servers
            .entry(server_name.to_owned())
            .or_insert_with(ServerEntry::new);
        for stored in keys {
            if stored.server_name != server_name || stored.valid_until_ts <= now_ms {
                continue;
            }
            match crate::signing::decode_verify_key(&stored.public_key) {
                Ok(key) => {
                    entry.keys.insert(
                        stored.key_id.clone(),
                        CachedKey {
                            key,
                            valid_until_ts: stored.valid_until_ts,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(origin = server_name, key_id = %stored.key_id, %error, "ignoring an undecodable cached key");
                }
            }
        }
    }

    fn usable(&self, server_name: &str, key_id: &str) -> Option<VerifyingKey> {
        self.lock_servers()
            .get(server_name)
            .and_then(|entry| entry.usable(key_id, crate::clock::now_ms()))
    }

    fn lock_servers(&self) -> std::sync::MutexGuard<'_, HashMap<String, ServerEntry>> {
        crate::sync::lock(&self.servers)
    }
}

/// Makes room in a full server map: drops entries without a usable key that
/// nobody is fetching for; if that frees nothing, drops every idle entry.
fn evict(servers: &mut HashMap<String, ServerEntry>, now_ms: i64, max_servers: usize) {
    let idle = |entry: &ServerEntry| Arc::strong_count(&entry.fetch_lock) == 1;
    servers.retain(|_, entry| !idle(entry) || entry.has_any_usable_key(now_ms));
    if servers.len() >= max_servers {
        servers.retain(|_, entry| !idle(entry));
    }
}

/// Most `verify_keys` (and signatures by the server) a key document may
/// carry. A server publishes one key, two during a rotation; a document
/// with thousands would cost a point decompression and a cache row each.
pub const MAX_VERIFY_KEYS: usize = 16;

/// Validates a `GET /_matrix/key/v2/server` response fetched directly from
/// `server_name` (SPEC §5.2) and returns its current keys with their
/// effective expiry `min(valid_until_ts, now + 7 days)` (SPEC §5.3).
///
/// The response must name `server_name`, carry at least one signature by
/// `server_name` with a key from its own `verify_keys`, and every such
/// signature must verify. Keys of unknown algorithms are skipped; an
/// `ed25519:` key that does not decode rejects the response. Keys from
/// `old_verify_keys` are never returned. A response whose expiry has already
/// passed still validates; callers compare `valid_until_ts` with now.
pub fn validate_server_key_response(
    server_name: &str,
    response: &Value,
    now_ms: i64,
) -> Result<Vec<StoredServerKey>, KeyError> {
    let reject = |reason: String| KeyError::BadKeyResponse {
        server_name: server_name.to_owned(),
        reason,
    };
    let object = response
        .as_object()
        .ok_or_else(|| reject("the response is not a JSON object".to_owned()))?;
    match object.get("server_name").and_then(Value::as_str) {
        Some(name) if name == server_name => {}
        Some(name) => return Err(reject(format!("it names server {name:?}"))),
        None => return Err(reject("server_name is missing".to_owned())),
    }
    let valid_until_ts = object
        .get("valid_until_ts")
        .and_then(Value::as_i64)
        .ok_or_else(|| reject("valid_until_ts is missing or not an integer".to_owned()))?;
    let verify_keys = object
        .get("verify_keys")
        .and_then(Value::as_object)
        .ok_or_else(|| reject("verify_keys is missing or not an object".to_owned()))?;
    if verify_keys.len() > MAX_VERIFY_KEYS {
        return Err(reject(format!(
            "it lists {} verify keys, more than the {MAX_VERIFY_KEYS} accepted",
            verify_keys.len()
        )));
    }

    let mut keys = Vec::new();
    let mut decoded = Vec::new();
    for (key_id, entry) in verify_keys {
        if !key_id.starts_with("ed25519:") {
            continue;
        }
        let text = entry
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| reject(format!("verify key {key_id:?} has no key string")))?;
        let verify_key = decode_verify_key(text)
            .map_err(|_| reject(format!("verify key {key_id:?} is not an ed25519 key")))?;
        decoded.push((key_id.as_str(), verify_key));
        keys.push(StoredServerKey {
            server_name: server_name.to_owned(),
            key_id: key_id.clone(),
            public_key: encode_base64(verify_key.as_bytes()),
            valid_until_ts: valid_until_ts.min(now_ms.saturating_add(MAX_KEY_VALIDITY_MS)),
        });
    }

    let signatures = object
        .get("signatures")
        .and_then(|signatures| signatures.get(server_name))
        .and_then(Value::as_object)
        .ok_or_else(|| reject("it is not signed by the server".to_owned()))?;
    if signatures.len() > MAX_VERIFY_KEYS {
        return Err(reject(format!(
            "it carries {} signatures by the server, more than the {MAX_VERIFY_KEYS} accepted",
            signatures.len()
        )));
    }
    let mut verified = 0usize;
    for key_id in signatures.keys() {
        let Some((_, verify_key)) = decoded.iter().find(|(id, _)| *id == key_id.as_str()) else {
            continue;
        };
        verify_json(response, server_name, key_id, verify_key)
            .map_err(|error| reject(format!("signature with {key_id:?} fails: {error}")))?;
        verified += 1;
    }
    if verified == 0 {
        return Err(reject(
            "no signature by a key from its own verify_keys".to_owned(),
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::keys::{ServerSigningKey, server_key_document};
    use crate::signing::sign_json;

    #[test]
    fn a_key_document_with_too_many_keys_is_refused_before_any_is_decoded() {
        let key = ServerSigningKey::from_seed("a", [3; 32]);
        let now = 1_700_000_000_000;
        let with_keys = |extra: usize| {
            let mut document = server_key_document("s.example", &key, &[], now + 3_600_000);
            let keys = document["verify_keys"].as_object_mut().expect("object");
            for i in 0..extra {
                let other = ServerSigningKey::from_seed("x", [i as u8; 32]);
                keys.insert(
                    format!("ed25519:k{i}"),
                    json!({"key": other.public_key_base64()}),
                );
            }
            if let Some(signatures) = document.as_object_mut() {
                signatures.remove("signatures");
            }
            sign_json(&mut document, "s.example", &key).expect("signable");
            document
        };
        let at_limit = with_keys(MAX_VERIFY_KEYS - 1);
        let keys = validate_server_key_response("s.example", &at_limit, now).expect("accepted");
        assert_eq!(keys.len(), MAX_VERIFY_KEYS);
        for extra in [MAX_VERIFY_KEYS, 10_000] {
            let error = validate_server_key_response("s.example", &with_keys(extra), now)
                .expect_err("refused");
            assert!(error.to_string().contains("verify keys"), "{error}");
        }
    }
}
