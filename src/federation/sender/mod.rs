//! The sender: the dispatcher that owns every destination task. It spawns a
//! destination's task on first work (`Wake`), on `PeerIsUp`, and at start-up
//! for every destination with pending rows (staggered by
//! `federation.startup_stagger`); it forwards signals to running tasks and
//! retires tasks that went idle, so the number of tasks stays bounded by the
//! destinations with recent work. A replacement task waits for its
//! predecessor to end, so two tasks never send to one destination. Every
//! minute it also wakes every destination with pending rows, so a lost
//! wake-up costs a delay, never a message.
//!
//! Every 30 s it sets the per-destination gauges (pending EDUs, oldest
//! age) of the destinations with rows queued; one whose queue emptied is
//! set to zero once and then left to expire from `/metrics`.
//!
//! The sending itself (transactions, backoff, splitting) is in
//! `destination`; this module only manages task lifecycles and metrics.

pub mod backoff;
pub mod destination;
mod refusals;
pub mod transaction;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::federation::outbound::client::FederationClient;
use crate::federation::sender::destination::{DestinationTask, SenderShared, Signal};
use crate::federation::sender::transaction::TxnIds;
use crate::store::Store;

/// Sends in flight at once over all destinations (each destination has at
/// most one). A destination takes a permit only after its discovery
/// succeeded, so a hanging peer holds one for at most `request_timeout`
/// and a slow or unresolvable one holds none.
pub const MAX_CONCURRENT_SENDS: usize = 256;
/// How often pending-work gauges are refreshed from the store.
const GAUGE_INTERVAL: Duration = Duration::from_secs(30);
/// How often every destination with pending rows is woken, so that a lost
/// wake-up (or rows written by another process) costs at most this long.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How long shutdown waits for destination tasks to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What other parts of Courier tell the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderCommand {
    /// New outbox rows exist for this destination.
    Wake(String),
    /// An authenticated request arrived from this server, or an operator
    /// asked: reset its backoff and send now.
    PeerIsUp(String),
}

/// A cheap, cloneable handle for waking destinations.
#[derive(Clone, Debug)]
pub struct SenderHandle {
    commands: mpsc::UnboundedSender<SenderCommand>,
}

/// The E2EE core wakes the sender after a device-list change queued EDUs.
impl crate::e2ee::DestinationWaker for SenderHandle {
    fn wake(&self, destination: &str) {
        SenderHandle::wake(self, destination);
    }
}

impl SenderHandle {
    /// A handle and the receiver the `Sender` consumes.
    pub fn channel() -> (SenderHandle, mpsc::UnboundedReceiver<SenderCommand>) {
        let (commands, rx) = mpsc::unbounded_channel();
        (SenderHandle { commands }, rx)
    }

    pub fn wake(&self, destination: &str) {
        let _ = self
            .commands
            .send(SenderCommand::Wake(destination.to_owned()));
    }

    pub fn peer_is_up(&self, destination: &str) {
        let _ = self
            .commands
            .send(SenderCommand::PeerIsUp(destination.to_owned()));
    }
}

/// A running destination task as the dispatcher sees it.
struct Running {
    id: u64,
    signals: mpsc::UnboundedSender<Signal>,
    join: JoinHandle<()>,
}

/// Owns every destination task.
pub struct Sender {
    shared: Arc<SenderShared>,
    commands: mpsc::UnboundedReceiver<SenderCommand>,
}

impl Sender {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        client: Arc<FederationClient>,
        commands: mpsc::UnboundedReceiver<SenderCommand>,
    ) -> Self {
        let shared = Arc::new(SenderShared {
            config,
            store,
            client,
            txn_ids: TxnIds::new(crate::clock::now_ms()),
            send_permits: Semaphore::new(MAX_CONCURRENT_SENDS),
        });
        Sender { shared, commands }
    }

    /// Runs until `shutdown`: wakes every destination with pending rows
    /// (staggered), then serves commands.
    pub async fn run(self, shutdown: CancellationToken) {
        let Sender {
            shared,
            mut commands,
        } = self;
        let (startup_tx, mut startup_rx) = mpsc::unbounded_channel::<String>();
        let startup = tokio::spawn(wake_pending(
            shared.clone(),
            startup_tx,
            shutdown.child_token(),
        ));
        let (retire_tx, mut retire_rx) = mpsc::unbounded_channel::<(String, u64)>();
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut retiring: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut next_id: u64 = 0;
        // Destinations whose per-destination gauges the last refresh set.
        let reported: Arc<tokio::sync::Mutex<HashSet<String>>> = Arc::default();
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep =
            tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (sweep_tx, mut sweep_rx) = mpsc::unbounded_channel::<String>();

        loop {
            let (destination, signal) = tokio::select! {
                _ = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    Some(SenderCommand::Wake(d)) => (d, Signal::Wake),
                    Some(SenderCommand::PeerIsUp(d)) => (d, Signal::PeerIsUp),
                    None => break,
                },
                Some(d) = startup_rx.recv() => (d, Signal::Wake),
                Some(d) = sweep_rx.recv() => (d, Signal::Wake),
                Some((d, id)) = retire_rx.recv() => {
                    if running.get(&d).is_some_and(|r| r.id == id)
                        && let Some(r) = running.remove(&d)
                    {
                        // Dropping the signal sender lets the task end once
                        // it has served what is already queued.
                        retiring.insert(d, r.join);
                    }
                    retiring.retain(|_, join| !join.is_finished());
                    metrics::gauge!("courier_federation_destination_tasks").set(running.len() as f64);
                    continue;
                }
                _ = gauges.tick() => {
                    // Re-set so it outlives the exporter's gauge idle timeout.
                    metrics::gauge!("courier_federation_destination_tasks").set(running.len() as f64);
                    // Off the dispatcher's path: the scan may take a while.
                    tokio::spawn(refresh_gauges(shared.clone(), reported.clone()));
                    continue;
                }
                _ = sweep.tick() => {
                    // Listed off the dispatcher's path; the names come back
                    // through `sweep_rx` as wake-ups.
                    let store = shared.store.clone();
                    let tx = sweep_tx.clone();
                    tokio::spawn(async move {
                        match store.destinations_with_pending().await {
                            Ok(list) => list.into_iter().for_each(|d| { let _ = tx.send(d); }),
                            Err(error) => tracing::warn!(%error, "sweep: listing pending destinations failed"),
                        }
                    });
                    continue;
                }
            };
            if let Some(task) = running.get(&destination)
                && task.signals.send(signal).is_ok()
            {
                continue;
            }
            // No task (or it ended): spawn one after its predecessor.
            let predecessor = running
                .remove(&destination)
                .map(|r| r.join)
                .or_else(|| retiring.remove(&destination));
            next_id += 1;
            let (signals_tx, signals_rx) = mpsc::unbounded_channel();
            let _ = signals_tx.send(signal);
            let task = DestinationTask::new(
                destination.clone(),
                shared.clone(),
                signals_rx,
                retire_tx.clone(),
                next_id,
            );
            let token = shutdown.child_token();
            let join = tokio::spawn(async move {
                if let Some(previous) = predecessor {
                    let _ = previous.await;
                }
                task.run(token).await;
            });
            running.insert(
                destination,
                Running {
                    id: next_id,
                    signals: signals_tx,
                    join,
                },
            );
            metrics::gauge!("courier_federation_destination_tasks").set(running.len() as f64);
        }

        startup.abort();
        let joins = running
            .into_values()
            .map(|r| r.join)
            .chain(retiring.into_values());
        let all = futures_join_all(joins);
        if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
            tracing::warn!("some destination tasks did not stop in time");
        }
    }
}

/// Awaits every handle.
async fn futures_join_all(joins: impl Iterator<Item = JoinHandle<()>>) {
    for join in joins {
        let _ = join.await;
    }
}

/// Wakes every destination with pending rows, `startup_stagger` apart.
async fn wake_pending(
    shared: Arc<SenderShared>,
    wake: mpsc::UnboundedSender<String>,
    shutdown: CancellationToken,
) {
    let destinations = loop {
        match shared.store.destinations_with_pending().await {
            Ok(list) => break list,
            Err(error) => {
                tracing::warn!(%error, "listing pending destinations failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::info!(
        count = destinations.len(),
        "waking destinations with pending work"
    );
    let stagger = shared.config.federation.startup_stagger;
    for (i, destination) in destinations.into_iter().enumerate() {
        if i > 0 && !stagger.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(stagger) => {}
            }
        }
        if wake.send(destination).is_err() {
            return;
        }
    }
}

/// Pending EDUs and oldest age per destination, from the store, for the
/// destinations with something queued. A destination that has nothing
/// queued any more gets both gauges set to zero once and is then left
/// alone, so its series expires (`metrics::GAUGE_IDLE_TIMEOUT`) instead of
/// staying in `/metrics` forever. `reported` holds the destinations set
/// last time; the lock also keeps two refreshes from interleaving.
async fn refresh_gauges(
    shared: Arc<SenderShared>,
    reported: Arc<tokio::sync::Mutex<HashSet<String>>>,
) {
    let mut reported = reported.lock().await;
    match shared.store.destination_statuses().await {
        Ok(statuses) => {
            let now = crate::clock::now_ms();
            let refusing = statuses
                .iter()
                .filter(|status| status.refusing_since_ms.is_some())
                .count();
            metrics::gauge!("courier_federation_refusing_destinations").set(refusing as f64);
            let mut current = HashSet::new();
            for status in statuses {
                if status.pending_edus == 0 {
                    continue;
                }
                let destination = status.destination.clone();
                metrics::gauge!("courier_outbox_pending_edus", "destination" => destination.clone())
                    .set(status.pending_edus as f64);
                let age = status
                    .oldest_queued_ts
                    .map_or(0.0, |ts| (now.saturating_sub(ts).max(0) as f64) / 1000.0);
                metrics::gauge!("courier_outbox_oldest_age_seconds", "destination" => destination.clone())
                    .set(age);
                // The backoff state: consecutive failures, and how long
                // until the next attempt may go (0 when not backing off).
                metrics::gauge!("courier_federation_destination_failures", "destination" => destination.clone())
                    .set(f64::from(status.retry.failures));
                let wait = status.retry.retry_after_ms.saturating_sub(now).max(0) as f64 / 1000.0;
                metrics::gauge!("courier_federation_backoff_seconds", "destination" => destination.clone())
                    .set(wait);
                current.insert(destination);
            }
            for gone in reported.difference(&current) {
                metrics::gauge!("courier_outbox_pending_edus", "destination" => gone.clone())
                    .set(0.0);
                metrics::gauge!("courier_outbox_oldest_age_seconds", "destination" => gone.clone())
                    .set(0.0);
                metrics::gauge!("courier_federation_destination_failures", "destination" => gone.clone())
                    .set(0.0);
                metrics::gauge!("courier_federation_backoff_seconds", "destination" => gone.clone())
                    .set(0.0);
            }
            *reported = current;
        }
        Err(error) => tracing::warn!(%error, "reading destination statuses failed"),
    }
}
