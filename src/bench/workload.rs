//! The workload itself, spoken over the standard client-server API only, so
//! it drives Courier and Synapse alike: `C` sender tasks each keep one
//! `PUT /sendToDevice` in flight with `K` recipients per call, a probe task
//! sends one message every interval to a separate device, and every
//! receiving device runs its own long-poll `GET /sync` loop that
//! acknowledges as it goes (the next `since`), counts each message id once
//! and flags duplicates. Every message carries the run id, its sequence
//! number, its intended recipient and the microsecond (since the run's
//! epoch) its send started, so latency is "send start → the receiver's
//! `/sync` returned it" measured on one clock.
//!
//! This module knows nothing of how the relays were started.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::stats::{Arrival, Tally};
use crate::plain_http::{JsonClient, encode_segment};

/// The long-poll timeout each receiver asks for.
const SYNC_TIMEOUT_MS: u64 = 30_000;
/// A filter that keeps homeservers (Synapse) from computing room, presence
/// and account-data sections the benchmark never reads. Courier ignores it.
const SYNC_FILTER: &str =
    r#"{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}"#;
/// Attempts per send call before it counts as failed.
const SEND_ATTEMPTS: u32 = 5;

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
    pub probes_sent: AtomicU64,
    pub probes_accepted: AtomicU64,
    pub probes_delivered: AtomicU64,
    /// Microseconds since `epoch` of the last accepted bulk send.
    pub last_accept_us: AtomicU64,
    /// Microseconds since `epoch` of the last first-time bulk delivery.
    pub last_delivery_us: AtomicU64,
    pub sending_done: AtomicBool,
    /// The first permanent send error, for the report.
    pub first_error: Mutex<Option<String>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            misdelivered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            probes_sent: AtomicU64::new(0),
            probes_accepted: AtomicU64::new(0),
            probes_delivered: AtomicU64::new(0),
            last_accept_us: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
            sending_done: AtomicBool::new(false),
            first_error: Mutex::new(None),
        }
    }

    fn note_error(&self, error: String) {
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

/// The run's recorder, shared by every receiver (or the sink).
pub struct Shared {
    run_id: String,
    tally: Tally,
    probe_tally: Mutex<BTreeMap<u64, u8>>,
    progress: Arc<Progress>,
    /// The run's time origin, set once every receiver is ready.
    epoch: OnceLock<Instant>,
    /// Latencies recorded by a sink, in microseconds.
    sink_samples: Mutex<Vec<u64>>,
}

/// A message as recorded.
enum Recorded {
    Bulk(u64),
    Probe(u64),
    Nothing,
}

impl Shared {
    /// A recorder for a run sending `total` bulk messages.
    pub fn new(run_id: &str, total: usize) -> Arc<Shared> {
        Arc::new(Shared {
            run_id: run_id.to_owned(),
            tally: Tally::new(total),
            probe_tally: Mutex::new(BTreeMap::new()),
            progress: Arc::new(Progress::new()),
            epoch: OnceLock::new(),
            sink_samples: Mutex::new(Vec::new()),
        })
    }

    /// The run's counters.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Microseconds since the epoch (0 before it is set).
    pub fn now_us(&self) -> u64 {
        self.epoch
            .get()
            .map(|e| e.elapsed().as_micros() as u64)
            .unwrap_or(0)
    }

    /// Records one arrival at the bulk receiver `index` (`None`: the probe
    /// device) and returns its latency if it is new.
    fn record(&self, index: Option<u64>, c: BenchContent, now_us: u64) -> Recorded {
        let progress = &self.progress;
        if c.run.as_deref() != Some(self.run_id.as_str()) {
            progress.stale.fetch_add(1, Ordering::Relaxed);
            return Recorded::Nothing;
        }
        let latency = now_us.saturating_sub(c.t.unwrap_or(now_us));
        match (c.seq, c.probe) {
            (Some(seq), None) if index.is_some() && c.r == index => match self.tally.record(seq) {
                Arrival::First => {
                    progress.delivered.fetch_add(1, Ordering::Relaxed);
                    progress
                        .last_delivery_us
                        .fetch_max(now_us, Ordering::Relaxed);
                    Recorded::Bulk(latency)
                }
                Arrival::Duplicate => {
                    progress.duplicates.fetch_add(1, Ordering::Relaxed);
                    Recorded::Nothing
                }
                Arrival::Unknown => {
                    progress.misdelivered.fetch_add(1, Ordering::Relaxed);
                    Recorded::Nothing
                }
            },
            (None, Some(n)) if index.is_none() => {
                let first = match self.probe_tally.lock() {
                    Ok(mut seen) => {
                        let count = seen.entry(n).or_default();
                        *count = count.saturating_add(1);
                        *count == 1
                    }
                    Err(_) => false,
                };
                if first {
                    progress.probes_delivered.fetch_add(1, Ordering::Relaxed);
                    Recorded::Probe(latency)
                } else {
                    progress.duplicates.fetch_add(1, Ordering::Relaxed);
                    Recorded::Nothing
                }
            }
            _ => {
                progress.misdelivered.fetch_add(1, Ordering::Relaxed);
                Recorded::Nothing
            }
        }
    }

    /// Records a message a sink received for the bulk receiver `index`, as
    /// parsed from the EDU: `content` is the message content's JSON.
    pub fn record_sink(&self, index: Option<u64>, content: &serde_json::Value) {
        let c: BenchContent = serde_json::from_value(content.clone()).unwrap_or_default();
        let now_us = self.now_us();
        if let Recorded::Bulk(latency) = self.record(index, c, now_us)
            && let Ok(mut samples) = self.sink_samples.lock()
        {
            samples.push(latency);
        }
    }

    /// Counts something a sink could not attribute to a receiver.
    pub fn record_misdelivered(&self) {
        self.progress.misdelivered.fetch_add(1, Ordering::Relaxed);
    }
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
    Http(#[from] crate::plain_http::HttpError),
}

/// Runs the workload. `on_tick` is called about every 100 ms with the shared
/// counters (for a progress bar). Receivers do an initial sync first, so
/// the clock starts with every long-poll in place.
pub async fn run(
    http: &JsonClient,
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
            http: http.clone(),
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
struct Clock {
    epoch: Instant,
}

impl Clock {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// One of the C senders: takes the next call number until none are left or
/// the deadline passes.
struct SenderTask {
    http: JsonClient,
    endpoints: Endpoints,
    workload: Workload,
    run_id: String,
    calls: u64,
    next_call: Arc<AtomicU64>,
    attempted: Arc<AtomicU64>,
    capped: Arc<AtomicBool>,
    deadline: Instant,
    progress: Arc<Progress>,
    clock: Clock,
}

impl SenderTask {
    async fn run(self) {
        let per_call = self.workload.per_call.max(1) as u64;
        let receivers = self.endpoints.receivers.len() as u64;
        let pad = "x".repeat(self.workload.payload_bytes.saturating_sub(80));
        let event_type = encode_segment(&self.workload.event_type);
        loop {
            let call = self.next_call.fetch_add(1, Ordering::Relaxed);
            if call >= self.calls {
                return;
            }
            if Instant::now() >= self.deadline {
                self.capped.store(true, Ordering::Relaxed);
                return;
            }
            let first = call * per_call;
            let last = (first + per_call).min(self.workload.messages);
            let count = last - first;
            self.attempted.fetch_add(count, Ordering::Relaxed);
            let started_us = self.clock.now_us();
            let recipients = (first..last).map(|seq| {
                let r = (seq % receivers) as usize;
                (seq, r, &self.endpoints.receivers[r])
            });
            let body = bulk_body(&self.run_id, recipients, started_us, &pad);
            let url = format!(
                "{}/_matrix/client/v3/sendToDevice/{event_type}/{}-{call}",
                self.endpoints.sender_url, self.run_id
            );
            match send_with_retries(&self.http, &url, &self.endpoints.sender_token, body).await {
                Ok(()) => {
                    self.progress.accepted.fetch_add(count, Ordering::Relaxed);
                    self.progress
                        .last_accept_us
                        .fetch_max(self.clock.now_us(), Ordering::Relaxed);
                }
                Err(error) => {
                    self.progress.failed.fetch_add(count, Ordering::Relaxed);
                    self.progress.note_error(error);
                }
            }
        }
    }
}

/// `PUT` with the same txnId until a 200, a refusal, or the attempts run out.
/// Transport errors, 429 and 5xx are retried (a client would do the same;
/// the txnId makes it safe).
async fn send_with_retries(
    http: &JsonClient,
    url: &str,
    token: &str,
    body: Bytes,
) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..SEND_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
        }
        match http
            .request_raw("PUT", url, Some(token), Some(body.clone()))
            .await
        {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) if r.status == 429 || r.status >= 500 => {
                last = format!("{} {}", r.status, String::from_utf8_lossy(&r.body));
            }
            Ok(r) => {
                return Err(format!(
                    "send refused: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            Err(error) => last = error.to_string(),
        }
    }
    Err(format!(
        "send failed after {SEND_ATTEMPTS} attempts: {last}"
    ))
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("serializing a string to JSON cannot fail")
}

/// The `sendToDevice` body for one bulk call: each recipient gets its own
/// content `{"run","seq","r","t","pad"}`; devices of one user share the
/// user's map.
fn bulk_body<'a>(
    run_id: &str,
    recipients: impl Iterator<Item = (u64, usize, &'a Recipient)>,
    started_us: u64,
    pad: &str,
) -> Bytes {
    let mut by_user: BTreeMap<&str, Vec<(&str, String)>> = BTreeMap::new();
    let run = json_str(run_id);
    for (seq, r, recipient) in recipients {
        let content =
            format!(r#"{{"run":{run},"seq":{seq},"r":{r},"t":{started_us},"pad":"{pad}"}}"#);
        by_user
            .entry(&recipient.user_id)
            .or_default()
            .push((&recipient.device_id, content));
    }
    let mut body = String::from(r#"{"messages":{"#);
    for (u, (user, devices)) in by_user.iter().enumerate() {
        if u > 0 {
            body.push(',');
        }
        body.push_str(&json_str(user));
        body.push_str(":{");
        for (d, (device, content)) in devices.iter().enumerate() {
            if d > 0 {
                body.push(',');
            }
            body.push_str(&json_str(device));
            body.push(':');
            body.push_str(content);
        }
        body.push('}');
    }
    body.push_str("}}");
    Bytes::from(body)
}

/// Sends one probe message every `interval` to the probe device, each in its
/// own task so a slow send does not delay the next tick.
struct ProbeTask {
    http: JsonClient,
    sender_url: String,
    sender_token: String,
    probe: Recipient,
    event_type: String,
    run_id: String,
    interval: Duration,
    progress: Arc<Progress>,
    clock: Clock,
}

impl ProbeTask {
    async fn run(self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight = JoinSet::new();
        let event_type = encode_segment(&self.event_type);
        let run = json_str(&self.run_id);
        let user = json_str(&self.probe.user_id);
        let device = json_str(&self.probe.device_id);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let started_us = self.clock.now_us();
            let body = Bytes::from(format!(
                r#"{{"messages":{{{user}:{{{device}:{{"run":{run},"probe":{n},"t":{started_us}}}}}}}}}"#
            ));
            let url = format!(
                "{}/_matrix/client/v3/sendToDevice/{event_type}/{}-probe-{n}",
                self.sender_url, self.run_id
            );
            self.progress.probes_sent.fetch_add(1, Ordering::Relaxed);
            let http = self.http.clone();
            let token = self.sender_token.clone();
            let progress = self.progress.clone();
            in_flight.spawn(async move {
                match send_with_retries(&http, &url, &token, body).await {
                    Ok(()) => {
                        progress.probes_accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => progress.note_error(format!("probe: {error}")),
                }
            });
            n += 1;
            // Reap finished sends so the set stays small.
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    }
}

/// Latency samples one receiver collected, in microseconds.
struct Samples {
    bulk: Vec<u64>,
    probe: Vec<u64>,
}

/// One receiving device's `/sync` loop.
struct ReceiverTask {
    http: JsonClient,
    recipient: Recipient,
    /// Index among bulk receivers; `None` for the probe device.
    index: Option<u64>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    epoch_set: Arc<tokio::sync::Notify>,
}

#[derive(Deserialize)]
struct SyncBody {
    next_batch: String,
    #[serde(default)]
    to_device: Option<ToDeviceBody>,
}

#[derive(Deserialize)]
struct ToDeviceBody {
    #[serde(default)]
    events: Vec<SyncEvent>,
}

#[derive(Deserialize)]
struct SyncEvent {
    #[serde(default)]
    content: BenchContent,
}

/// The fields of a benchmark message's content (others are ignored).
#[derive(Deserialize, Default)]
struct BenchContent {
    run: Option<String>,
    seq: Option<u64>,
    probe: Option<u64>,
    r: Option<u64>,
    t: Option<u64>,
}

impl ReceiverTask {
    async fn run(self, ready: tokio::sync::mpsc::Sender<Result<(), String>>) -> Samples {
        let mut samples = Samples {
            bulk: Vec::new(),
            probe: Vec::new(),
        };
        // The initial sync: find the current position; anything already
        // queued belongs to an earlier run.
        let since = match self.sync(None, 0).await {
            Ok(body) => {
                let stale = body.to_device.map(|t| t.events.len()).unwrap_or(0);
                self.shared
                    .progress
                    .stale
                    .fetch_add(stale as u64, Ordering::Relaxed);
                body.next_batch
            }
            Err(error) => {
                let _ = ready.send(Err(error)).await;
                return samples;
            }
        };
        // Register for the start signal before reporting ready, so it is not
        // missed.
        let started = self.epoch_set.notified();
        tokio::pin!(started);
        started.as_mut().enable();
        let _ = ready.send(Ok(())).await;
        drop(ready);
        let epoch = loop {
            if let Some(epoch) = self.shared.epoch.get() {
                break *epoch;
            }
            tokio::select! {
                _ = &mut started => {}
                _ = self.stop.cancelled() => return samples,
            }
        };
        let clock = Clock { epoch };
        let mut since = since;
        loop {
            let polled = tokio::select! {
                _ = self.stop.cancelled() => break,
                polled = self.sync(Some(&since), SYNC_TIMEOUT_MS) => polled,
            };
            match polled {
                Ok(body) => {
                    self.take(body.to_device, &clock, &mut samples);
                    since = body.next_batch;
                }
                Err(error) => {
                    self.shared.progress.note_error(error);
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
        // One last sync without waiting: acknowledges the final batch and
        // collects anything a cancelled long-poll left behind, or extras.
        if let Ok(body) = self.sync(Some(&since), 0).await {
            self.take(body.to_device, &clock, &mut samples);
            if let Ok(body) = self.sync(Some(&body.next_batch), 0).await {
                self.take(body.to_device, &clock, &mut samples);
            }
        }
        samples
    }

    async fn sync(&self, since: Option<&str>, timeout_ms: u64) -> Result<SyncBody, String> {
        let mut url = format!(
            "{}/_matrix/client/v3/sync?timeout={timeout_ms}&set_presence=offline&filter={}",
            self.recipient.client_url,
            encode_segment(SYNC_FILTER)
        );
        if let Some(since) = since {
            url.push_str("&since=");
            url.push_str(&encode_segment(since));
        }
        let r = self
            .http
            .request_raw("GET", &url, Some(&self.recipient.access_token), None)
            .await
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!(
                "sync for {} answered {} {}",
                self.recipient.user_id,
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("sync body: {e}"))
    }

    fn take(&self, to_device: Option<ToDeviceBody>, clock: &Clock, samples: &mut Samples) {
        let Some(to_device) = to_device else {
            return;
        };
        let now_us = clock.now_us();
        for event in to_device.events {
            match self.shared.record(self.index, event.content, now_us) {
                Recorded::Bulk(latency) => samples.bulk.push(latency),
                Recorded::Probe(latency) => samples.probe.push(latency),
                Recorded::Nothing => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(user: &str, device: &str) -> Recipient {
        Recipient {
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            access_token: String::new(),
            client_url: String::new(),
        }
    }

    #[test]
    fn bulk_body_groups_devices_by_user_and_tags_every_message() {
        let a1 = recipient("@a:hs", "D1");
        let a2 = recipient("@a:hs", "D2");
        let b = recipient("@b:hs", "\"odd\"");
        let body = bulk_body(
            "run-1",
            [(7, 0, &a1), (8, 1, &a2), (9, 2, &b)].into_iter(),
            1234,
            "xx",
        );
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        let messages = &value["messages"];
        assert_eq!(messages["@a:hs"]["D1"]["seq"], 7);
        assert_eq!(messages["@a:hs"]["D2"]["r"], 1);
        assert_eq!(messages["@b:hs"]["\"odd\""]["t"], 1234);
        assert_eq!(messages["@b:hs"]["\"odd\""]["run"], "run-1");
        assert_eq!(messages["@a:hs"]["D1"]["pad"], "xx");
        assert_eq!(messages.as_object().map(|m| m.len()), Some(2));
    }

    #[test]
    fn sync_bodies_parse_with_and_without_to_device() {
        let body: SyncBody = serde_json::from_str(
            r#"{"next_batch":"s1","rooms":{},"to_device":{"events":[
                {"sender":"@s:hs","type":"m.x","content":{"run":"r","seq":3,"r":0,"t":5,"pad":"x"}},
                {"sender":"@s:hs","type":"m.x","content":{"other":true}}]}}"#,
        )
        .expect("parses");
        let events = body.to_device.expect("to_device").events;
        assert_eq!(events[0].content.seq, Some(3));
        assert_eq!(events[1].content.run, None);
        let empty: SyncBody = serde_json::from_str(r#"{"next_batch":"s2"}"#).expect("parses");
        assert!(empty.to_device.is_none());
    }
}
