//! A counting fake `RemoteKeys` for the device-list domain tests: it
//! answers `/user/devices` from a per-user script (or one keyless device at
//! stream 1), counts calls, records the most calls in flight at once overall
//! and per server, fails a server's next N calls, can hold calls until
//! released or delay them; and a `DestinationWaker` that records what it was
//! asked to wake.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier::e2ee::DestinationWaker;
use courier::e2ee::RemoteKeys;
use courier::e2ee::remote::{
    RemoteClaim, RemoteClaimAnswer, RemoteError, RemoteFuture, RemoteQuery, RemoteQueryAnswer,
    RemoteUserDevices,
};
use courier::identifiers::{ServerName, UserId};
use serde_json::json;
use tokio::sync::Semaphore;

/// A fake remote: answers `/user/devices` from a per-user script (or a
/// default of one keyless device at stream 1), counts calls, records the
/// most calls in flight at once overall and per server, fails a server's
/// next N calls, and can hold calls until released.
#[derive(Default)]
pub struct CountingRemote {
    pub answers: Mutex<HashMap<String, RemoteUserDevices>>,
    pub device_calls: AtomicUsize,
    pub query_calls: AtomicUsize,
    pub fail_next: Mutex<HashMap<String, usize>>,
    pub in_flight: Mutex<(usize, HashMap<String, usize>)>,
    pub max_overall: AtomicUsize,
    pub max_per_server: AtomicUsize,
    pub gate: Mutex<Option<Arc<Semaphore>>>,
    pub delay: Mutex<Duration>,
    /// What `query_keys` answers (empty when unset).
    pub query_answer: Mutex<RemoteQueryAnswer>,
}

impl CountingRemote {
    pub fn answer(&self, answer: RemoteUserDevices) {
        let mut answers = self.answers.lock().expect("answers");
        answers.insert(answer.user_id.clone(), answer);
    }

    pub fn calls(&self) -> usize {
        self.device_calls.load(Ordering::SeqCst)
    }

    fn enter(&self, server: &str) {
        let mut guard = self.in_flight.lock().expect("in flight");
        guard.0 += 1;
        let overall = guard.0;
        let per = guard.1.entry(server.to_owned()).or_default();
        *per += 1;
        let per = *per;
        drop(guard);
        self.max_overall.fetch_max(overall, Ordering::SeqCst);
        self.max_per_server.fetch_max(per, Ordering::SeqCst);
    }

    fn leave(&self, server: &str) {
        let mut guard = self.in_flight.lock().expect("in flight");
        guard.0 -= 1;
        if let Some(per) = guard.1.get_mut(server) {
            *per -= 1;
        }
    }
}

impl RemoteKeys for CountingRemote {
    fn query_keys<'a>(
        &'a self,
        _server: &'a ServerName,
        _query: RemoteQuery,
        _timeout: Duration,
    ) -> RemoteFuture<'a, RemoteQueryAnswer> {
        self.query_calls.fetch_add(1, Ordering::SeqCst);
        let answer = self.query_answer.lock().expect("query answer").clone();
        Box::pin(async move { Ok(answer) })
    }

    fn claim_keys<'a>(
        &'a self,
        _server: &'a ServerName,
        _claim: RemoteClaim,
        _timeout: Duration,
    ) -> RemoteFuture<'a, RemoteClaimAnswer> {
        Box::pin(async { Err(RemoteError::Unreachable("not in this test".into())) })
    }

    fn user_devices<'a>(
        &'a self,
        server: &'a ServerName,
        user: &'a UserId,
        _timeout: Duration,
    ) -> RemoteFuture<'a, RemoteUserDevices> {
        Box::pin(async move {
            self.device_calls.fetch_add(1, Ordering::SeqCst);
            let server = server.as_str().to_owned();
            self.enter(&server);
            let gate = self.gate.lock().expect("gate").clone();
            if let Some(gate) = gate {
                let _permit = gate.acquire().await.expect("gate open");
            }
            let delay = *self.delay.lock().expect("delay");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let fail = {
                let mut fail = self.fail_next.lock().expect("fail");
                match fail.get_mut(&server) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                }
            };
            self.leave(&server);
            if fail {
                return Err(RemoteError::Refused {
                    status: 500,
                    errcode: None,
                });
            }
            let scripted = self
                .answers
                .lock()
                .expect("answers")
                .get(user.as_str())
                .cloned();
            Ok(scripted.unwrap_or_else(|| RemoteUserDevices {
                user_id: user.as_str().to_owned(),
                stream_id: 1,
                devices: vec![json!({"device_id": "D"})],
                master_key: None,
                self_signing_key: None,
            }))
        })
    }
}

/// Records the destinations the domain wakes.
#[derive(Default)]
pub struct RecordingWaker(pub Mutex<Vec<String>>);

impl DestinationWaker for RecordingWaker {
    fn wake(&self, destination: &str) {
        self.0.lock().expect("woken").push(destination.to_owned());
    }
}
