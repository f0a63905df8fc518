//! The receiving side of a run: the recorder every arrival is reported to
//! (`Shared`: each message id counted once in the tally, duplicates,
//! misdelivered and stale events flagged, latencies kept) and the
//! per-device long-poll `GET /sync` loops that feed it (`timeout=30000`,
//! each on the device's own keep-alive connection), acknowledging as they
//! go (the next `since`) and counting the bulk devices' answers, empty ones
//! included. A federation sink (`sink.rs`) reports to the same recorder.
//!
//! It does not send anything (`sender.rs`) and does not decide when the run
//! starts or ends (`workload.rs` sets the epoch and stops the loops).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::stats::{Arrival, Tally};
use super::workload::{Clock, Progress, Recipient};
use crate::tools::plain_http::{JsonClient, encode_segment};

/// The long-poll timeout each receiver asks for.
const SYNC_TIMEOUT_MS: u64 = 30_000;
/// A filter that keeps homeservers (Synapse) from computing room, presence
/// and account-data sections the benchmark never reads. Courier ignores it.
const SYNC_FILTER: &str =
    r#"{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}"#;

/// The run's recorder, shared by every receiver (or the sink).
pub struct Shared {
    run_id: String,
    tally: Tally,
    probe_tally: Mutex<BTreeMap<u64, u8>>,
    pub(super) progress: Arc<Progress>,
    /// The run's time origin, set once every receiver is ready.
    pub(super) epoch: OnceLock<Instant>,
    /// Latencies recorded by a sink, in microseconds.
    pub(super) sink_samples: Mutex<Vec<u64>>,
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
        if index.is_none()
            && c.run
                .as_deref()
                .and_then(|run| run.strip_prefix(self.run_id.as_str()))
                == Some("-warmup")
        {
            progress.warmed.fetch_add(1, Ordering::Relaxed);
            return Recorded::Nothing;
        }
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

/// Latency samples one receiver collected, in microseconds.
pub(super) struct Samples {
    pub(super) bulk: Vec<u64>,
    pub(super) probe: Vec<u64>,
}

/// One receiving device's `/sync` loop.
pub(super) struct ReceiverTask {
    /// This device's own client: one keep-alive connection, nobody else's.
    pub(super) http: JsonClient,
    pub(super) recipient: Recipient,
    /// Index among bulk receivers; `None` for the probe device.
    pub(super) index: Option<u64>,
    pub(super) shared: Arc<Shared>,
    pub(super) stop: CancellationToken,
    pub(super) epoch_set: Arc<tokio::sync::Notify>,
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
    pub(super) async fn run(self, ready: tokio::sync::mpsc::Sender<Result<(), String>>) -> Samples {
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
        let mut since = since;
        let epoch = loop {
            if let Some(epoch) = self.shared.epoch.get() {
                break *epoch;
            }
            if self.index.is_none() && self.shared.progress.warmed.load(Ordering::Relaxed) == 0 {
                // The probe device takes the warm-up message before the
                // clock starts (`sender::warm_up`); nothing is timed yet.
                let before_clock = Clock {
                    epoch: Instant::now(),
                };
                tokio::select! {
                    polled = self.sync(Some(&since), SYNC_TIMEOUT_MS) => match polled {
                        Ok(body) => {
                            self.take(body.to_device, &before_clock, &mut samples);
                            since = body.next_batch;
                        }
                        Err(error) => {
                            self.shared.progress.note_error(error);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                    _ = self.stop.cancelled() => return samples,
                }
                continue;
            }
            tokio::select! {
                _ = &mut started => {}
                _ = self.stop.cancelled() => return samples,
            }
        };
        let clock = Clock { epoch };
        loop {
            let polled = tokio::select! {
                _ = self.stop.cancelled() => break,
                polled = self.sync(Some(&since), SYNC_TIMEOUT_MS) => polled,
            };
            match polled {
                Ok(body) => {
                    if self.index.is_some() {
                        self.shared
                            .progress
                            .sync_responses
                            .fetch_add(1, Ordering::Relaxed);
                    }
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
