//! The workload itself, spoken over the standard client-server API only, so
//! it drives Courier and Synapse alike: who sends and who receives
//! (`Endpoints`), the shape of the load (`Workload`), the counters every task
//! shares (`Progress`), and `run`, which starts the receivers, starts the
//! clock once every long-poll is in place, runs the senders and the probe
//! (`sender.rs`), waits for the deliveries the receivers or the sink record
//! (`receiver.rs`), and sums up the `Outcome`. Latency is "send start → the
//! receiver's `/sync` returned it" (or the sink received it), measured on one
//! clock.
//!
//! The connections have the shape real clients give them: every receiving
//! device (and the probe device) has its own client holding one HTTP/1.1
//! keep-alive connection for its own long-poll loop, and the senders share
//! a pool of their own, so no sender and no other device ever rides on a
//! receiver's connection.
//!
//! This module knows nothing of how the relays were started.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::receiver::{ReceiverTask, Shared};
use super::sender::{ProbeTask, SenderTask, warm_up};
use crate::tools::plain_http::JsonClient;

/// The bound on every request of a run; a long-poll asks for 30 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the warm-up message may take to reach the probe device.
const WARM_UP_WAIT: Duration = Duration::from_secs(30);

/// One receiving device and how to reach it.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub user_id: String,
    pub device_id: String,
    pub access_token: String,
    /// Base URL of the homeserver's client API.
    pub client_url: String,
}

/// Who sends and who receives.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub sender_url: String,
    pub sender_token: String,
    pub receivers: Vec<Recipient>,
    pub probe: Option<Recipient>,
}

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Total bulk messages (N); 0 runs the probe alone for `duration`.
    pub messages: u64,
    /// Recipients per send call (K), distinct devices.
    pub per_call: usize,
    /// Send calls in flight (C).
    pub concurrency: usize,
    /// Approximate bytes of each message's content JSON.
    pub payload_bytes: usize,
    /// Cap on the sending phase; also the probe-only run length.
    pub duration: Duration,
    /// Probe period; `None` disables the probe.
    pub probe_interval: Option<Duration>,
    /// How long to wait for deliveries after the last send.
    pub drain_timeout: Duration,
    pub event_type: String,
}

/// Counters shared by every task of a run.
pub struct Progress {
    pub accepted: AtomicU64,
    pub failed: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    /// A message of this run arrived at a device it was not sent to.
    pub misdelivered: AtomicU64,
    /// Events without this run's id (left over from earlier runs).
    pub stale: AtomicU64,
    /// The warm-up message reached the probe device (before the clock).
    pub warmed: AtomicU64,
    pub probes_sent: AtomicU64,
    pub probes_accepted: AtomicU64,
    pub probes_delivered: AtomicU64,
    /// `/sync` answers the bulk receivers' long-poll loops got after the
    /// clock started, empty ones included (not the initial sync before it,
    /// nor the closing syncs after the receivers are stopped).
    pub sync_responses: AtomicU64,
    /// Microseconds since `epoch` of the last accepted bulk send.
    pub last_accept_us: AtomicU64,
    /// Microseconds since `epoch` of the last first-time bulk delivery.
    pub last_delivery_us: AtomicU64,
    pub sending_done: AtomicBool,
    /// The first permanent send error, for the report.
    pub first_error: Mutex<Option<String>>,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress {
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            misdelivered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            warmed: AtomicU64::new(0),
            probes_sent: AtomicU64::new(0),
            probes_accepted: AtomicU64::new(0),
            probes_delivered: AtomicU64::new(0),
            sync_responses: AtomicU64::new(0),
            last_accept_us: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
            sending_done: AtomicBool::new(false),
            first_error: Mutex::new(None),
        }
    }

    pub(super) fn note_error(&self, error: String) {
        if let Ok(mut slot) = self.first_error.lock() {
            slot.get_or_insert(error);
        }
    }
}

/// Runs once every send is accepted, before the wait for deliveries.
pub type AfterSend = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How messages are seen arriving.
pub enum Delivery {
    /// Each receiving device long-polls `/sync` (and the probe too).
    Sync,
    /// A federation sink receives the transactions itself: `attach` hands it
    /// the run's recorder; `after_send` (opening the sink, for a catch-up
    /// run) runs when sending is done. No probe.
    Sink {
        attach: Box<dyn FnOnce(Arc<Shared>) + Send>,
        after_send: Option<AfterSend>,
    },
}

/// What a finished run measured.
pub struct Outcome {
    /// Bulk messages the senders attempted (N, or fewer at the duration cap).
    pub attempted: u64,
    pub accepted: u64,
    pub failed: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub misdelivered: u64,
    pub stale: u64,
    /// Accepted bulk messages that never arrived.
    pub undelivered: u64,
    pub probes_sent: u64,
    pub probes_accepted: u64,
    pub probes_delivered: u64,
    /// `/sync` answers of the bulk receivers' long-poll loops (see
    /// `Progress::sync_responses`); `None` when a sink received instead.
    pub sync_responses: Option<u64>,
    /// First send start → last accepted send.
    pub accept_span: Duration,
    /// First send start → last first-time delivery.
    pub delivery_span: Duration,
    /// Whether the duration cap cut the sending phase short.
    pub capped: bool,
    /// Whether the drain timeout ended the wait for deliveries.
    pub drain_timed_out: bool,
    /// When the `after_send` hook started (the sink opening), since the
    /// first send.
    pub resumed_at: Option<Duration>,
    /// Bulk latencies in microseconds.
    pub latencies_us: Vec<u64>,
    /// Probe latencies in microseconds.
    pub probe_latencies_us: Vec<u64>,
    pub first_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Http(#[from] crate::tools::plain_http::HttpError),
}

/// Runs the workload. `on_tick` is called about every 100 ms with the shared
/// counters (for a progress bar). Receivers do an initial sync first, so
/// the clock starts with every long-poll in place. The run opens its own
/// connections (see the module doc).
pub async fn run(
    endpoints: &Endpoints,
    workload: &Workload,
    run_id: &str,
    delivery: Delivery,
    on_tick: &(dyn Fn(&Progress) + Sync),
) -> Result<Outcome, WorkloadError> {
    if workload.messages > 0 && workload.per_call > endpoints.receivers.len() {
        return Err(WorkloadError::Setup(format!(
            "{} recipients per call need at least that many receiving devices, have {}",
            workload.per_call,
            endpoints.receivers.len()
        )));
    }
    let total = usize::try_from(workload.messages)
        .map_err(|_| WorkloadError::Setup("too many messages for this machine".into()))?;
    let shared = Shared::new(run_id, total);
    let progress = shared.progress.clone();
    let stop_receivers = CancellationToken::new();

    // Receivers: initial sync, then long-poll until stopped. A sink receives
    // on its own (it is told about `shared` here).
    let mut receivers = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(16);
    let (sink, mut after_send) = match delivery {
        Delivery::Sync => (None, None),
        Delivery::Sink { attach, after_send } => (Some(attach), after_send),
    };
    let syncing = sink.is_none();
    let receiving: Vec<(Option<u64>, Recipient)> = match sink {
        None => endpoints
            .receivers
            .iter()
            .enumerate()
            .map(|(i, r)| (Some(i as u64), r.clone()))
            .chain(endpoints.probe.iter().map(|p| (None, p.clone())))
            .collect(),
        Some(attach) => {
            attach(shared.clone());
            Vec::new()
        }
    };

    let receiver_count = receiving.len();
    // The clock starts once every receiver is in place; receivers learn the
    // epoch through `shared.epoch`.
    let epoch_set = Arc::new(tokio::sync::Notify::new());
    for (index, recipient) in receiving {
        let task = ReceiverTask {
            http: JsonClient::one_connection(REQUEST_TIMEOUT),
            recipient,
            index,
            shared: shared.clone(),
            stop: stop_receivers.clone(),
            epoch_set: epoch_set.clone(),
        };
        let ready = ready_tx.clone();
        receivers.spawn(task.run(ready));
    }
    drop(ready_tx);
    for _ in 0..receiver_count {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                stop_receivers.cancel();
                return Err(WorkloadError::Setup(error));
            }
            None => break,
        }
    }

    // The senders' pool, shared by the C senders and the probe's sends.
    let http = JsonClient::new(REQUEST_TIMEOUT);

    // One message to the probe device first, outside the figures: the
    // first contact between the servers (connections, key fetches) is not
    // what a run measures.
    if let (Some(probe), true) = (&endpoints.probe, syncing) {
        let warmed = warm_up(
            &http,
            endpoints,
            &workload.event_type,
            probe,
            run_id,
            &progress,
            WARM_UP_WAIT,
        )
        .await;
        if let Err(error) = warmed {
            stop_receivers.cancel();
            return Err(WorkloadError::Setup(error));
        }
    }

    // Start the clock.
    let epoch = *shared.epoch.get_or_init(Instant::now);
    epoch_set.notify_waiters();
    let clock = Clock { epoch };
    let send_deadline = epoch + workload.duration;
    let calls = workload.messages.div_ceil(workload.per_call.max(1) as u64);
    let next_call = Arc::new(AtomicU64::new(0));
    let attempted = Arc::new(AtomicU64::new(0));
    let capped = Arc::new(AtomicBool::new(false));
    let mut senders = JoinSet::new();
    if workload.messages > 0 {
        for _ in 0..workload.concurrency.max(1) {
            let sender = SenderTask {
                http: http.clone(),
                endpoints: endpoints.clone(),
                workload: workload.clone(),
                run_id: run_id.to_owned(),
                calls,
                next_call: next_call.clone(),
                attempted: attempted.clone(),
                capped: capped.clone(),
                deadline: send_deadline,
                progress: progress.clone(),
                clock,
            };
            senders.spawn(sender.run());
        }
    }
    let stop_probe = CancellationToken::new();
    let probe_handle = match (&endpoints.probe, workload.probe_interval, syncing) {
        (Some(probe), Some(interval), true) => Some(tokio::spawn(
            ProbeTask {
                http: http.clone(),
                sender_url: endpoints.sender_url.clone(),
                sender_token: endpoints.sender_token.clone(),
                probe: probe.clone(),
                event_type: workload.event_type.clone(),
                run_id: run_id.to_owned(),
                interval,
                progress: progress.clone(),
                clock,
            }
            .run(stop_probe.clone()),
        )),
        _ => None,
    };

    // Watch: sending, then draining.
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_deadline: Option<Instant> = None;
    let mut drain_timed_out = false;
    let mut resumed_us = None;
    loop {
        tokio::select! {
            joined = senders.join_next(), if !senders.is_empty() => {
                if let Some(Err(error)) = joined {
                    progress.note_error(format!("sender task failed: {error}"));
                }
                continue;
            }
            _ = ticker.tick() => {}
        }
        on_tick(&progress);
        let now = Instant::now();
        if !senders.is_empty() {
            continue;
        }
        if workload.messages == 0 && now < send_deadline {
            continue;
        }
        if !progress.sending_done.swap(true, Ordering::Relaxed) {
            if let Some(hook) = after_send.take() {
                resumed_us = Some(clock.now_us());
                hook.await;
            }
            drain_deadline = Some(Instant::now() + workload.drain_timeout);
        }
        let bulk_done =
            progress.delivered.load(Ordering::Relaxed) >= progress.accepted.load(Ordering::Relaxed);
        if bulk_done {
            break;
        }
        if drain_deadline.is_some_and(|d| now >= d) {
            drain_timed_out = true;
            break;
        }
    }

    // Stop the probe, then wait for its last messages.
    stop_probe.cancel();
    if let Some(handle) = probe_handle
        && let Err(error) = handle.await
    {
        progress.note_error(format!("probe task failed: {error}"));
    }
    let probe_deadline = Instant::now() + Duration::from_secs(10).min(workload.drain_timeout);
    while progress.probes_delivered.load(Ordering::Relaxed)
        < progress.probes_accepted.load(Ordering::Relaxed)
        && Instant::now() < probe_deadline
    {
        ticker.tick().await;
        on_tick(&progress);
    }

    stop_receivers.cancel();
    let mut latencies_us = Vec::new();
    let mut probe_latencies_us = Vec::new();
    while let Some(joined) = receivers.join_next().await {
        match joined {
            Ok(samples) => {
                latencies_us.extend(samples.bulk);
                probe_latencies_us.extend(samples.probe);
            }
            Err(error) => progress.note_error(format!("receiver task failed: {error}")),
        }
    }
    if let Ok(mut sink_samples) = shared.sink_samples.lock() {
        latencies_us.append(&mut sink_samples);
    }
    on_tick(&progress);

    let accepted = progress.accepted.load(Ordering::Relaxed);
    let delivered = progress.delivered.load(Ordering::Relaxed);
    let first_error = progress.first_error.lock().ok().and_then(|e| e.clone());
    Ok(Outcome {
        attempted: attempted.load(Ordering::Relaxed),
        accepted,
        failed: progress.failed.load(Ordering::Relaxed),
        delivered,
        duplicates: progress.duplicates.load(Ordering::Relaxed),
        misdelivered: progress.misdelivered.load(Ordering::Relaxed),
        stale: progress.stale.load(Ordering::Relaxed),
        undelivered: accepted.saturating_sub(delivered),
        probes_sent: progress.probes_sent.load(Ordering::Relaxed),
        probes_accepted: progress.probes_accepted.load(Ordering::Relaxed),
        probes_delivered: progress.probes_delivered.load(Ordering::Relaxed),
        sync_responses: syncing.then(|| progress.sync_responses.load(Ordering::Relaxed)),
        accept_span: Duration::from_micros(progress.last_accept_us.load(Ordering::Relaxed)),
        delivery_span: Duration::from_micros(progress.last_delivery_us.load(Ordering::Relaxed)),
        capped: capped.load(Ordering::Relaxed),
        drain_timed_out,
        resumed_at: resumed_us.map(Duration::from_micros),
        latencies_us,
        probe_latencies_us,
        first_error,
    })
}

/// The run's time origin, shared by senders and receivers.
#[derive(Clone, Copy)]
pub(super) struct Clock {
    pub(super) epoch: Instant,
}

impl Clock {
    pub(super) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}
