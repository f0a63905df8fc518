//! The device-list resync scheduler (issue 16, SPEC-E2EE §3.4.2, §4.3): one
//! task per relay that fetches stale remote users' lists with
//! `RemoteKeys::user_devices` and replaces the cache with the (re-verified)
//! snapshot, without ever turning a gap storm into a request storm:
//!
//! - single flight per user: a user scheduled again while its resync runs
//!   is resynced once more afterwards, and only if still stale (every
//!   resync first reads the stale flag and skips a fresh or untracked list);
//! - at most `resync_concurrency` requests in flight overall and
//!   `resync_per_server` to one server (keyed by normalized server name);
//! - per-server backoff: after a failed request the server waits
//!   `resync_retry × 2^(failures−1)`, capped at `resync_retry_max`; its
//!   users wait in the queue (and stay stale in the store);
//! - at start-up and every `resync_retry` it reads `stale_remote_users`
//!   and queues them, so a restart resumes and nothing stays stale forever.
//!
//! The stale flag lives in the store; this task's queue is only a cache of
//! it. It knows no HTTP: `RemoteKeys` is the outbound client (or a fake).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::E2eeConfig;
use crate::identifiers::{ServerName, UserId};
use crate::notify::Notifier;
use crate::store::Store;
use crate::store::device_lists::{RemoteDevice, RemoteSnapshot, SnapshotOutcome};
use crate::store::keys::CrossSigningKind;

use super::device_list_edus::{count_inbound, key_text, signed_by_master};
use super::objects::{check_cross_signing_key, check_device_keys, stored_object};
use super::remote::{RemoteKeys, RemoteUserDevices};

/// How many stale users one sweep reads per store call.
const SWEEP_PAGE: usize = 1_000;
/// The most users the scheduler keeps queued; the rest wait in the store
/// for a later sweep.
const MAX_QUEUED: usize = 100_000;

/// Schedules resyncs (cheap to clone; never blocks).
#[derive(Clone, Debug)]
pub struct ResyncHandle {
    commands: mpsc::UnboundedSender<Vec<String>>,
    progress: Arc<Progress>,
}

/// What the scheduler has taken in, for `ResyncHandle::is_idle`.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    /// Users queued, in flight, or due again.
    queued: AtomicUsize,
}

impl ResyncHandle {
    /// Queues resyncs of these remote users (their lists are stale in the
    /// store already). Users queued or in flight are not queued twice.
    pub fn schedule(&self, users: Vec<String>) {
        if !users.is_empty() {
            self.progress.sent.fetch_add(1, Ordering::SeqCst);
            if self.commands.send(users).is_err() {
                self.progress.sent.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Whether the scheduler has taken in everything scheduled so far and
    /// has nothing queued or in flight (users of a server in backoff count
    /// as queued). For tests and diagnostics.
    pub fn is_idle(&self) -> bool {
        let received = self.progress.received.load(Ordering::SeqCst);
        let queued = self.progress.queued.load(Ordering::SeqCst);
        self.progress.sent.load(Ordering::SeqCst) == received && queued == 0
    }

    /// Users queued, in flight, or due again.
    pub fn queued(&self) -> usize {
        self.progress.queued.load(Ordering::SeqCst)
    }
}

/// The scheduler task; `run` it once.
pub struct ResyncScheduler {
    ctx: Arc<Ctx>,
    commands: mpsc::UnboundedReceiver<Vec<String>>,
    progress: Arc<Progress>,
}

struct Ctx {
    store: Arc<dyn Store>,
    remote: Arc<dyn RemoteKeys>,
    config: E2eeConfig,
    notifier: Arc<Notifier>,
}

/// What one resync came to, for the scheduler's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Stored; `still_stale` when a newer update was seen meanwhile.
    Stored { still_stale: bool },
    /// The server gave no usable answer: back it off.
    Failed,
    /// Nothing asked (fresh, untracked) or a local failure: no backoff.
    Skipped,
}

struct ServerQueue {
    name: ServerName,
    pending: VecDeque<String>,
    in_flight: usize,
    failures: u32,
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    servers: HashMap<String, ServerQueue>,
    /// Users queued or in flight.
    known: HashSet<String>,
    in_flight: HashSet<String>,
    /// Users scheduled again while in flight.
    again: HashSet<String>,
    total_in_flight: usize,
}

impl ResyncScheduler {
    pub fn new(
        store: Arc<dyn Store>,
        remote: Arc<dyn RemoteKeys>,
        config: E2eeConfig,
        notifier: Arc<Notifier>,
    ) -> (ResyncHandle, ResyncScheduler) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
        let ctx = Arc::new(Ctx {
            store,
            remote,
            config,
            notifier,
        });
        (
            ResyncHandle {
                commands,
                progress: progress.clone(),
            },
            ResyncScheduler {
                ctx,
                commands: receiver,
                progress,
            },
        )
    }

    /// Runs until `shutdown`: a sweep at once, then scheduled users and a
    /// sweep every `resync_retry`. Resyncs in flight at shutdown are
    /// dropped (their users stay stale in the store for the next start).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let retry = self.ctx.config.resync_retry;
        let mut state = State::default();
        let mut tasks: JoinSet<(String, String, Outcome)> = JoinSet::new();
        let mut open = true;
        self.sweep(&mut state).await;
        let mut sweep_at = Instant::now() + retry;
        let mut taken = 0u64;
        loop {
            self.dispatch(&mut state, &mut tasks);
            // The count first, then what was taken in (`is_idle` reads them
            // the other way round).
            self.progress
                .queued
                .store(state.known.len() + state.again.len(), Ordering::SeqCst);
            self.progress.received.store(taken, Ordering::SeqCst);
            let wake_at = state
                .servers
                .values()
                .filter(|s| !s.pending.is_empty())
                .filter_map(|s| s.retry_at)
                .fold(sweep_at, Instant::min);
            tokio::select! {
                () = shutdown.cancelled() => break,
                command = self.commands.recv(), if open => match command {
                    Some(users) => {
                        taken += 1;
                        for user in users {
                            state.add(user);
                        }
                    }
                    None => open = false,
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => match joined {
                    Ok((user, server, outcome)) => state.complete(user, &server, outcome, &self.ctx.config),
                    Err(error) => tracing::error!(%error, "a device-list resync task failed"),
                },
                () = tokio::time::sleep_until(wake_at) => {
                    if Instant::now() >= sweep_at {
                        self.sweep(&mut state).await;
                        sweep_at = Instant::now() + retry;
                    }
                }
            }
        }
        metrics::gauge!("courier_device_list_resyncs_in_flight").set(0.0);
    }

    /// Queues the store's stale users, page by page (the longest stale
    /// first; those already queued come back and are skipped).
    async fn sweep(&self, state: &mut State) {
        loop {
            let limit = (state.known.len() + SWEEP_PAGE).min(MAX_QUEUED + SWEEP_PAGE);
            let users = match self
                .ctx
                .store
                .stale_remote_users(u32::try_from(limit).unwrap_or(u32::MAX))
                .await
            {
                Ok(users) => users,
                Err(error) => {
                    tracing::warn!(%error, "reading stale device lists");
                    return;
                }
            };
            let read = users.len();
            for user in users {
                state.add(user);
            }
            if read < limit || state.known.len() >= MAX_QUEUED {
                return;
            }
        }
    }

    /// Starts resyncs while the bounds allow.
    fn dispatch(&self, state: &mut State, tasks: &mut JoinSet<(String, String, Outcome)>) {
        let max_total = self.ctx.config.resync_concurrency.max(1);
        let per_server = self.ctx.config.resync_per_server.max(1);
        let now = Instant::now();
        loop {
            let mut started = false;
            for (key, server) in state.servers.iter_mut() {
                if state.total_in_flight >= max_total {
                    break;
                }
                if server.in_flight >= per_server || server.retry_at.is_some_and(|t| t > now) {
                    continue;
                }
                let Some(user) = server.pending.pop_front() else {
                    continue;
                };
                server.in_flight += 1;
                state.total_in_flight += 1;
                state.in_flight.insert(user.clone());
                let ctx = self.ctx.clone();
                let name = server.name.clone();
                let key = key.clone();
                tasks.spawn(async move {
                    let outcome = resync_one(&ctx, &user, &name).await;
                    (user, key, outcome)
                });
                started = true;
            }
            if !started || state.total_in_flight >= max_total {
                break;
            }
        }
        metrics::gauge!("courier_device_list_resyncs_in_flight").set(state.total_in_flight as f64);
    }
}

impl State {
    fn add(&mut self, user: String) {
        if self.in_flight.contains(&user) {
            self.again.insert(user);
            return;
        }
        if self.known.contains(&user) || self.known.len() >= MAX_QUEUED {
            return;
        }
        let Some(server) = UserId::parse(&user)
            .ok()
            .and_then(|u| ServerName::parse(u.server_name()).ok())
        else {
            tracing::warn!(user, "not resyncing a device list of a malformed user ID");
            return;
        };
        let queue = self
            .servers
            .entry(server.normalized())
            .or_insert_with(|| ServerQueue {
                name: server,
                pending: VecDeque::new(),
                in_flight: 0,
                failures: 0,
                retry_at: None,
            });
        queue.pending.push_back(user.clone());
        self.known.insert(user);
    }

    fn complete(&mut self, user: String, server: &str, outcome: Outcome, config: &E2eeConfig) {
        self.total_in_flight = self.total_in_flight.saturating_sub(1);
        self.in_flight.remove(&user);
        self.known.remove(&user);
        let again = self.again.remove(&user);
        if let Some(queue) = self.servers.get_mut(server) {
            queue.in_flight = queue.in_flight.saturating_sub(1);
            match outcome {
                Outcome::Failed => {
                    queue.failures = queue.failures.saturating_add(1);
                    let wait = backoff(config, queue.failures);
                    queue.retry_at = Some(Instant::now() + wait);
                    tracing::info!(
                        server,
                        failures = queue.failures,
                        ?wait,
                        "device-list resyncs of a server backed off"
                    );
                }
                Outcome::Stored { .. } => {
                    queue.failures = 0;
                    queue.retry_at = None;
                }
                Outcome::Skipped => {}
            }
            let idle = queue.pending.is_empty() && queue.in_flight == 0 && queue.failures == 0;
            if idle {
                self.servers.remove(server);
            }
        }
        let requeue = again
            || matches!(
                outcome,
                Outcome::Failed | Outcome::Stored { still_stale: true }
            );
        if requeue {
            self.add(user);
        }
    }
}

/// The wait after `failures` consecutive failures of a server.
fn backoff(config: &E2eeConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    config
        .resync_retry
        .saturating_mul(1u32 << doublings)
        .min(config.resync_retry_max.max(config.resync_retry))
}

fn count_resync(outcome: &'static str) {
    metrics::counter!("courier_device_list_resyncs_total", "outcome" => outcome).increment(1);
}

/// One resync of one user: skipped unless the cached list is stale.
async fn resync_one(ctx: &Ctx, user: &str, server: &ServerName) -> Outcome {
    let cached = match ctx.store.remote_device_lists(vec![user.to_owned()]).await {
        Ok(lists) => lists.into_iter().find(|list| list.user_id == user),
        Err(error) => {
            tracing::warn!(user, %error, "reading a cached device list before its resync");
            return Outcome::Skipped;
        }
    };
    let Some(cached) = cached.filter(|list| list.stale) else {
        return Outcome::Skipped;
    };
    let Ok(user_id) = UserId::parse(user) else {
        return Outcome::Skipped;
    };
    let answer = match ctx
        .remote
        .user_devices(server, &user_id, ctx.config.remote_timeout)
        .await
    {
        Ok(answer) => answer,
        Err(error) => {
            count_resync("failed");
            tracing::info!(%server, user, %error, "device-list resync failed");
            return Outcome::Failed;
        }
    };
    if answer.user_id != user {
        count_resync("discarded");
        tracing::info!(%server, user, answered = answer.user_id, "discarding a resync answer for another user");
        return Outcome::Failed;
    }
    let cached_master = cached.master_key_json.as_deref().and_then(stored_object);
    let snapshot = snapshot_of(answer, cached_master);
    match ctx
        .store
        .replace_remote_device_list(snapshot, crate::clock::now_ms())
        .await
    {
        Ok(SnapshotOutcome::Untracked) => {
            count_resync("discarded");
            Outcome::Skipped
        }
        Ok(SnapshotOutcome::Stored {
            changed,
            still_stale,
        }) => {
            count_resync("ok");
            if changed {
                wake_trackers(&*ctx.store, &ctx.notifier, vec![user.to_owned()]).await;
            }
            Outcome::Stored { still_stale }
        }
        Err(error) => {
            count_resync("failed");
            tracing::warn!(user, %error, "storing a device-list resync");
            Outcome::Skipped
        }
    }
}

/// A `/user/devices` answer as the cache keeps it, every device's keys
/// re-verified (a device whose keys fail is left out and counted as
/// `bad_signature`), and the cross-signing keys checked (the self-signing
/// key must be signed by the answer's master key, else the cached one).
pub fn snapshot_of(
    answer: RemoteUserDevices,
    cached_master: Option<serde_json::Map<String, Value>>,
) -> RemoteSnapshot {
    let user = answer.user_id.as_str();
    let mut devices: Vec<RemoteDevice> = Vec::with_capacity(answer.devices.len());
    for device in &answer.devices {
        let Some(device_id) = device.get("device_id").and_then(Value::as_str) else {
            count_inbound("malformed", 1);
            continue;
        };
        let keys_json = match device.get("keys") {
            None | Some(Value::Null) => None,
            Some(keys) => match check_device_keys(keys, user, device_id).and_then(|k| k.json()) {
                Ok(json) => Some(json),
                Err(error) => {
                    count_inbound("bad_signature", 1);
                    tracing::info!(user, device_id, %error, "leaving out a resynced device whose keys do not verify");
                    continue;
                }
            },
        };
        let display_name = device
            .get("device_display_name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if devices.iter().any(|d| d.device_id == device_id) {
            continue;
        }
        devices.push(RemoteDevice {
            device_id: device_id.to_owned(),
            keys_json,
            display_name,
        });
    }
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let master = answer
        .master_key
        .as_ref()
        .and_then(|v| check_cross_signing_key(v, user, CrossSigningKind::Master).ok());
    let self_signing = answer
        .self_signing_key
        .as_ref()
        .and_then(|v| check_cross_signing_key(v, user, CrossSigningKind::SelfSigning).ok())
        .filter(|key| signed_by_master(key, master.as_ref(), cached_master));
    RemoteSnapshot {
        user_id: answer.user_id.clone(),
        stream_id: answer.stream_id,
        devices,
        master_key_json: master.as_ref().and_then(key_text),
        self_signing_key_json: self_signing.as_ref().and_then(key_text),
    }
}

/// Wakes the long-polls of every local user tracking any of `users` (best
/// effort; shared with the resync scheduler).
pub async fn wake_trackers(store: &dyn Store, notifier: &Notifier, users: Vec<String>) {
    if users.is_empty() {
        return;
    }
    match store.tracker_devices(users).await {
        Ok(devices) => notifier.wake(&devices),
        Err(error) => {
            tracing::warn!(%error, "listing trackers' devices to wake after a device-list change");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_retry_and_is_capped() {
        let config = E2eeConfig {
            resync_retry: Duration::from_millis(100),
            resync_retry_max: Duration::from_millis(700),
            ..E2eeConfig::DEFAULTS
        };
        let waits: Vec<u128> = (1..=5).map(|f| backoff(&config, f).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 700, 700]);
        assert_eq!(backoff(&config, u32::MAX).as_millis(), 700);
    }

    #[test]
    fn a_user_scheduled_while_in_flight_is_queued_once_after() {
        let config = E2eeConfig::DEFAULTS;
        let mut state = State::default();
        state.add("@a:remote.example".to_owned());
        state.add("@a:remote.example".to_owned());
        assert_eq!(state.known.len(), 1);
        let key = "remote.example".to_owned();
        let user = state
            .servers
            .get_mut(&key)
            .and_then(|q| q.pending.pop_front())
            .unwrap_or_default();
        state.in_flight.insert(user.clone());
        state.total_in_flight = 1;
        if let Some(q) = state.servers.get_mut(&key) {
            q.in_flight = 1;
        }
        state.add(user.clone());
        state.add(user.clone());
        state.complete(
            user.clone(),
            &key,
            Outcome::Stored { still_stale: false },
            &config,
        );
        let queued: Vec<String> = state
            .servers
            .get(&key)
            .map(|q| q.pending.iter().cloned().collect())
            .unwrap_or_default();
        assert_eq!(queued, vec![user]);
    }

    #[test]
    fn a_failure_backs_the_server_off_and_keeps_the_user() {
        let config = E2eeConfig::DEFAULTS;
        let mut state = State::default();
        let key = "remote.example".to_owned();
        state.add("@a:remote.example".to_owned());
        let user = state
            .servers
            .get_mut(&key)
            .and_then(|q| q.pending.pop_front())
            .unwrap_or_default();
        state.in_flight.insert(user.clone());
        state.complete(user.clone(), &key, Outcome::Failed, &config);
        let queue = state.servers.get(&key);
        assert_eq!(queue.map(|q| q.failures), Some(1));
        assert!(queue.is_some_and(|q| q.retry_at.is_some()));
        assert!(state.known.contains(&user));
    }
}
