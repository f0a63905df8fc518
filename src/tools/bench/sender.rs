//! The sending side of a run: the `C` sender tasks, each keeping one
//! `PUT /sendToDevice` in flight with `K` recipients per call and taking the
//! next call number until none are left or the duration cap passes, the
//! probe task that sends one message every interval to a separate device,
//! and the retry of a call with the same txnId. Every message carries the
//! run id, its sequence number, its intended recipient and the microsecond
//! (since the run's epoch) its send started.
//!
//! It does not see deliveries (`receiver.rs`) and does not decide when the
//! run starts or ends (`workload.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::workload::{Clock, Endpoints, Progress, Recipient, Workload};
use crate::tools::plain_http::{JsonClient, encode_segment};

/// Attempts per send call before it counts as failed.
const SEND_ATTEMPTS: u32 = 5;

/// One of the C senders: takes the next call number until none are left or
/// the deadline passes.
pub(super) struct SenderTask {
    pub(super) http: JsonClient,
    pub(super) endpoints: Endpoints,
    pub(super) workload: Workload,
    pub(super) run_id: String,
    pub(super) calls: u64,
    pub(super) next_call: Arc<AtomicU64>,
    pub(super) attempted: Arc<AtomicU64>,
    pub(super) capped: Arc<AtomicBool>,
    pub(super) deadline: Instant,
    pub(super) progress: Arc<Progress>,
    pub(super) clock: Clock,
}

impl SenderTask {
    pub(super) async fn run(self) {
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

/// Sends the warm-up message to the probe device (its `run` is
/// `<run_id>-warmup`, which the receivers count apart) and waits up to
/// `wait` for it to arrive: the first message between two servers pays for
/// connections and key fetches, and the clock starts only after that.
pub(super) async fn warm_up(
    http: &JsonClient,
    endpoints: &Endpoints,
    event_type: &str,
    probe: &Recipient,
    run_id: &str,
    progress: &Progress,
    wait: Duration,
) -> Result<(), String> {
    let body = Bytes::from(format!(
        r#"{{"messages":{{{}:{{{}:{{"run":{}}}}}}}}}"#,
        json_str(&probe.user_id),
        json_str(&probe.device_id),
        json_str(&format!("{run_id}-warmup"))
    ));
    let url = format!(
        "{}/_matrix/client/v3/sendToDevice/{}/{run_id}-warmup",
        endpoints.sender_url,
        encode_segment(event_type)
    );
    send_with_retries(http, &url, &endpoints.sender_token, body)
        .await
        .map_err(|e| format!("warm-up: {e}"))?;
    let deadline = tokio::time::Instant::now() + wait;
    while progress.warmed.load(Ordering::Relaxed) == 0 {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "warm-up: the message did not reach the probe device within {} s",
                wait.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
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
pub(super) struct ProbeTask {
    pub(super) http: JsonClient,
    pub(super) sender_url: String,
    pub(super) sender_token: String,
    pub(super) probe: Recipient,
    pub(super) event_type: String,
    pub(super) run_id: String,
    pub(super) interval: Duration,
    pub(super) progress: Arc<Progress>,
    pub(super) clock: Clock,
}

impl ProbeTask {
    pub(super) async fn run(self, stop: CancellationToken) {
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
}
