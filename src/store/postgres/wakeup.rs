//! Cross-worker wake-ups over LISTEN/NOTIFY (DESIGN §4). After a write
//! commits, the store publishes what it touched (devices with new inbox rows,
//! destinations with new outbox rows, a peer seen up) on one channel, as
//! small JSON payloads naming the publishing store instance. Each worker's
//! subscription holds one dedicated connection that LISTENs, turns
//! notifications from other instances into `Wakeup`s, and reconnects after
//! a failure.
//!
//! Wake-ups are hints, not data: a lost one (a crash between commit and
//! publish, a listener reconnecting) only delays a long-poll until its
//! timeout or a destination until the next lease claim round. So publishing
//! commits with `synchronous_commit = off` and never holds the data
//! transaction's commit behind the NOTIFY queue lock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::{DeviceKey, Wakeup};

/// The NOTIFY channel.
pub const CHANNEL: &str = "courier_wakeups";
/// Payloads stay below PostgreSQL's 8000-byte limit.
const MAX_PAYLOAD: usize = 7000;
/// Wait before reconnecting a failed listener.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The wire form of one notification.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Payload {
    /// The publishing store instance.
    from: String,
    /// Devices with new inbox rows, as `[user_id, device_id]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    devices: Vec<(String, String)>,
    /// Destinations with new outbox rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    destinations: Vec<String>,
    /// Servers seen up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    peers_up: Vec<String>,
}

impl Payload {
    fn len_estimate(&self) -> usize {
        self.from.len()
            + 64
            + self
                .devices
                .iter()
                .map(|(u, d)| u.len() + d.len() + 8)
                .sum::<usize>()
            + self.destinations.iter().map(|d| d.len() + 4).sum::<usize>()
            + self.peers_up.iter().map(|d| d.len() + 4).sum::<usize>()
    }
}

/// Packs `wakeups` into as few payloads as fit the size limit.
fn payloads(instance: &str, wakeups: &[Wakeup]) -> Vec<String> {
    let fresh = || Payload {
        from: instance.to_owned(),
        ..Payload::default()
    };
    let mut out = Vec::new();
    let mut current = fresh();
    let mut push = |current: &mut Payload, item_len: usize| {
        if current.len_estimate() + item_len > MAX_PAYLOAD {
            let full = std::mem::replace(current, fresh());
            out.push(serde_json::to_string(&full).expect("a payload always serializes"));
        }
    };
    for wakeup in wakeups {
        match wakeup {
            Wakeup::Devices(devices) => {
                for DeviceKey { user_id, device_id } in devices {
                    push(&mut current, user_id.len() + device_id.len() + 8);
                    current.devices.push((user_id.clone(), device_id.clone()));
                }
            }
            Wakeup::Destination(d) => {
                push(&mut current, d.len() + 4);
                current.destinations.push(d.clone());
            }
            Wakeup::PeerUp(origin) => {
                push(&mut current, origin.len() + 4);
                current.peers_up.push(origin.clone());
            }
        }
    }
    if !(current.devices.is_empty()
        && current.destinations.is_empty()
        && current.peers_up.is_empty())
    {
        out.push(serde_json::to_string(&current).expect("a payload always serializes"));
    }
    out
}

/// Sends the wake-ups in one transaction that does not wait for its fsync.
pub async fn publish(
    client: &mut deadpool_postgres::Object,
    instance: &str,
    wakeups: &[Wakeup],
) -> Result<(), tokio_postgres::Error> {
    let payloads = payloads(instance, wakeups);
    if payloads.is_empty() {
        return Ok(());
    }
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await?;
    let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
    for payload in &payloads {
        tx.query(&notify, &[&CHANNEL, payload]).await?;
    }
    tx.commit().await
}

/// The most wake-ups one NOTIFY transaction carries.
const MAX_BATCH: usize = 1024;

/// Starts the publisher task: it takes wake-ups from the returned channel
/// and publishes whatever has queued up in one transaction, so concurrent
/// writes share one NOTIFY commit. It ends when the channel's senders are
/// dropped (with the store).
pub fn spawn_publisher(
    pool: deadpool_postgres::Pool,
    instance: String,
) -> mpsc::UnboundedSender<Wakeup> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Wakeup>();
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.clear();
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            batch.dedup();
            let result = match pool.get().await {
                Ok(mut client) => publish(&mut client, &instance, &batch)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = result {
                // Best effort: the other workers' timers cover a lost one.
                tracing::warn!(%error, lost = batch.len(), "publishing wake-ups failed");
            }
        }
    });
    tx
}

/// Starts a listener task; it ends when the receiver is dropped.
pub fn subscribe(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    instance: String,
) -> mpsc::UnboundedReceiver<Wakeup> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match listen_once(&config, &tls, &instance, &tx).await {
                Ok(()) => {}
                Err(error) => tracing::warn!(%error, "wake-up listener failed; reconnecting"),
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
    });
    rx
}

/// One listener connection, until it fails or nobody listens any more.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    instance: &str,
    tx: &mpsc::UnboundedSender<Wakeup>,
) -> Result<(), tokio_postgres::Error> {
    // The same sslmode and trust store as the pool.
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let (msg_tx, mut msg_rx) = mpsc::unbounded_channel::<AsyncMessage>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(message)) => {
                    if msg_tx.send(message).is_err() {
                        return Ok(());
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    tracing::debug!("listening for wake-ups");
    loop {
        tokio::select! {
            message = msg_rx.recv() => match message {
                Some(AsyncMessage::Notification(n)) => {
                    for wakeup in parse(n.payload(), instance) {
                        if tx.send(wakeup).is_err() {
                            driver.abort();
                            return Ok(());
                        }
                    }
                }
                Some(_) => {}
                None => break,
            },
            _ = tx.closed() => {
                driver.abort();
                return Ok(());
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// The wake-ups in one payload, unless this instance published it.
fn parse(payload: &str, instance: &str) -> Vec<Wakeup> {
    let Ok(p) = serde_json::from_str::<Payload>(payload) else {
        tracing::debug!(payload, "ignoring a malformed wake-up");
        return Vec::new();
    };
    if p.from == instance {
        return Vec::new();
    }
    let mut out = Vec::new();
    if !p.devices.is_empty() {
        out.push(Wakeup::Devices(
            p.devices
                .into_iter()
                .map(|(user_id, device_id)| DeviceKey { user_id, device_id })
                .collect(),
        ));
    }
    out.extend(p.destinations.into_iter().map(Wakeup::Destination));
    out.extend(p.peers_up.into_iter().map(Wakeup::PeerUp));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_split_under_the_limit_and_round_trip() {
        let devices: Vec<DeviceKey> = (0..500)
            .map(|i| DeviceKey {
                user_id: format!("@user{i}:example.org"),
                device_id: format!("DEVICE{i}"),
            })
            .collect();
        let wakeups = vec![
            Wakeup::Devices(devices.clone()),
            Wakeup::Destination("remote.test".to_owned()),
            Wakeup::PeerUp("peer.test".to_owned()),
        ];
        let out = payloads("me", &wakeups);
        assert!(out.len() > 1);
        assert!(out.iter().all(|p| p.len() < 8000));
        let mut seen_devices = Vec::new();
        let mut rest = Vec::new();
        for p in &out {
            for w in parse(p, "other") {
                match w {
                    Wakeup::Devices(d) => seen_devices.extend(d),
                    other => rest.push(other),
                }
            }
            assert!(parse(p, "me").is_empty(), "own wake-ups are skipped");
        }
        assert_eq!(seen_devices, devices);
        assert_eq!(rest, wakeups[1..].to_vec());
    }
}
