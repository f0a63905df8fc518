//! Several workers on one database (DESIGN §4), as seen from one worker:
//! the lease loop that claims destinations with pending work, renews this
//! worker's leases every `[worker] renew_ms` (a third of the lease by
//! default) and wakes newly
//! claimed destinations; the forwarder that turns other workers' wake-ups
//! (`Store::subscribe_wakeups`) into local ones; and releasing every lease
//! on a clean shutdown. The lease loop also heartbeats this process's claim
//! on its worker name (`Store::claim_worker_name`, taken at start-up by
//! `store::open`), and a clean shutdown releases the name.
//!
//! The lease is only a permission: the destination task checks it
//! (`Store::acquire_lease`) right before each send, and a worker that lost
//! it simply stops sending there. Each claim gives the lease a new epoch
//! (its fence), which the task's outbox writes carry: a worker paused past
//! its lease can change nothing once another worker claimed it. With a single-process store (SQLite) the
//! store's defaults make this worker own everything, there is nothing to
//! forward, and both loops are cheap no-ops.
//!
//! Not here: SQL (the store), the sending itself (`federation::sender`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::federation::sender::SenderHandle;
use crate::notify::Notifier;
use crate::store::{Store, Wakeup};

/// Claims and renews leases until `shutdown`. Runs one round at once, then
/// every `worker.renew_interval`, claiming at most `worker.claim_limit`
/// destinations a round.
pub async fn run_leases(
    store: Arc<dyn Store>,
    worker: WorkerConfig,
    sender: SenderHandle,
    shutdown: CancellationToken,
) {
    let lease_ms = i64::try_from(worker.lease_duration.as_millis()).unwrap_or(i64::MAX);
    let period = worker.renew_interval.max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = crate::clock::now_ms();
        match store
            .heartbeat_worker_name(&worker.name, now, lease_ms)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Our heartbeat lapsed (a stall longer than the lease) and
                // another process took the name: both now act under it.
                tracing::error!(
                    worker = %worker.name,
                    "another live process holds this worker name; stop one of them"
                );
                metrics::counter!("courier_worker_name_lost_total").increment(1);
            }
            Err(error) => {
                tracing::warn!(worker = %worker.name, %error, "worker name heartbeat failed")
            }
        }
        if let Err(error) = store.renew_leases(&worker.name, now, lease_ms).await {
            tracing::warn!(worker = %worker.name, %error, "renewing leases failed");
        }
        match store
            .claim_destinations(&worker.name, now, lease_ms, worker.claim_limit)
            .await
        {
            Ok(claimed) => {
                for destination in &claimed {
                    tracing::debug!(worker = %worker.name, %destination, "claimed destination");
                    sender.wake(destination);
                }
                if !claimed.is_empty() {
                    metrics::counter!("courier_leases_claimed_total")
                        .increment(claimed.len() as u64);
                }
            }
            Err(error) => {
                tracing::warn!(worker = %worker.name, %error, "claiming destinations failed")
            }
        }
    }
}

/// Forwards other workers' wake-ups to this worker's long-polls and sender
/// until `shutdown` (returns at once when the store has no wake-ups).
pub async fn forward_wakeups(
    store: Arc<dyn Store>,
    notifier: Arc<Notifier>,
    sender: SenderHandle,
    shutdown: CancellationToken,
) {
    let Some(mut wakeups) = store.subscribe_wakeups() else {
        return;
    };
    loop {
        let wakeup = tokio::select! {
            _ = shutdown.cancelled() => return,
            w = wakeups.recv() => match w {
                Some(w) => w,
                None => return,
            },
        };
        match wakeup {
            Wakeup::Devices(devices) => notifier.wake(devices.iter()),
            Wakeup::Destination(destination) => sender.wake(&destination),
            Wakeup::PeerUp(origin) => sender.peer_is_up(&origin),
        }
    }
}

/// Gives up this worker's leases (after its sender stopped), so that other
/// workers take its destinations without waiting for the leases to lapse,
/// then its worker name, so that a successor may start at once.
pub async fn release(store: &dyn Store, worker: &WorkerConfig) {
    if let Err(error) = store.release_leases(&worker.name).await {
        tracing::warn!(worker = %worker.name, %error, "releasing leases failed");
    }
    if let Err(error) = store.release_worker_name(&worker.name).await {
        tracing::warn!(worker = %worker.name, %error, "releasing the worker name failed");
    }
}
