//! A federation sink for the many-destination workloads: one TLS listener
//! per destination on 127.0.0.1 (server names `localhost:<port>`, so the
//! development certificate fits every one of them and no DNS is needed),
//! answering `PUT /_matrix/federation/v1/send/{txnId}` with `{"pdus":{}}`
//! and recording every to-device message of every `m.direct_to_device` EDU
//! with the run's recorder. It de-duplicates like a receiver must
//! ((destination, txnId) and (destination, message_id)), so a sender's
//! legitimate retry is not counted as a duplicate delivery.
//!
//! It measures the sender, so it deliberately does not verify X-Matrix
//! signatures (the two-relay workloads measure verification) and does not
//! store anything. Its ports can be chosen first and listened on later, for
//! a catch-up run where the destinations are down while messages queue.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::receiver::Shared;

/// The sink's ports are taken from here up to `EPHEMERAL_START`.
const FIRST_PORT: u16 = 12_000;
/// Linux's default `ip_local_port_range` starts here.
const EPHEMERAL_START: u16 = 32_768;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink listener on port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What the sink knows about the run: which recipient index each user is,
/// and the recorder.
struct SinkState {
    /// Recipient user ID → index among the run's receivers.
    users: std::collections::HashMap<String, u64>,
    shared: OnceLock<Arc<Shared>>,
    seen_txns: Mutex<HashSet<(u16, String)>>,
    seen_message_ids: Mutex<HashSet<(u16, String)>>,
    transactions: std::sync::atomic::AtomicU64,
}

/// The sink: its ports, and its listeners once open.
pub struct Sink {
    ports: Vec<u16>,
    state: Arc<SinkState>,
    tls: TlsAcceptor,
    /// Serve one request per connection (HTTP/1.1 only, no keep-alive).
    one_request_per_connection: bool,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Sink {
    /// Picks `count` free loopback ports (bound and released at once) and
    /// loads the TLS certificate; listens on nothing yet. With
    /// `one_request_per_connection` the sink offers only HTTP/1.1 and closes
    /// each connection after its response, so the sender keeps no idle
    /// connection per destination (thousands of destinations in one process
    /// otherwise exhaust its file descriptors).
    pub async fn reserve(
        count: usize,
        tls_cert: &std::path::Path,
        tls_key: &std::path::Path,
        one_request_per_connection: bool,
    ) -> Result<Sink, SinkError> {
        // Ports below the kernel's ephemeral range: while the sink is closed
        // (catch-up), the relay's own outgoing connections take ephemeral
        // ports, and one landing on a reserved port would keep the sink
        // from listening there (or even connect to itself).
        let mut held = Vec::with_capacity(count);
        for port in FIRST_PORT..EPHEMERAL_START {
            if held.len() == count {
                break;
            }
            if let Ok(listener) = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await
            {
                held.push(listener);
            }
        }
        if held.len() < count {
            return Err(SinkError::Bind {
                port: EPHEMERAL_START,
                source: std::io::Error::other(format!(
                    "only {} free ports below {EPHEMERAL_START}",
                    held.len()
                )),
            });
        }
        let ports = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
            .collect();
        drop(held);
        let mut tls = crate::tls::server_config(tls_cert, tls_key)?;
        if one_request_per_connection {
            let mut config = (*tls).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tls = Arc::new(config);
        }
        Ok(Sink {
            ports,
            state: Arc::new(SinkState {
                users: Default::default(),
                shared: OnceLock::new(),
                seen_txns: Mutex::new(HashSet::new()),
                seen_message_ids: Mutex::new(HashSet::new()),
                transactions: Default::default(),
            }),
            tls: TlsAcceptor::from(tls),
            one_request_per_connection,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// The destination server names, one per port.
    pub fn server_names(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("localhost:{p}"))
            .collect()
    }

    /// Tells the sink which user is which receiver index. Call before
    /// `attacher` is used.
    pub fn set_users(&mut self, users: impl IntoIterator<Item = (String, u64)>) {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.users = users.into_iter().collect();
        }
    }

    /// A closure handing the run's recorder to the sink.
    pub fn attacher(&self) -> Box<dyn FnOnce(Arc<Shared>) + Send> {
        let state = self.state.clone();
        Box::new(move |shared| {
            let _ = state.shared.set(shared);
        })
    }

    /// Transactions received (first copies only).
    pub fn transactions(&self) -> u64 {
        self.state
            .transactions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts listening on every port; fails with the first port that
    /// could not be bound, after trying all of them.
    pub async fn open(&self) -> Result<(), SinkError> {
        let mut first_error = None;
        for &port in &self.ports {
            let listener = match TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await {
                Ok(listener) => listener,
                Err(source) => {
                    first_error.get_or_insert(SinkError::Bind { port, source });
                    continue;
                }
            };
            self.tasks.spawn(accept_loop(
                listener,
                port,
                self.tls.clone(),
                self.state.clone(),
                self.shutdown.clone(),
                self.tasks.clone(),
                self.one_request_per_connection,
            ));
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Stops every listener and connection.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    tls: TlsAcceptor,
    state: Arc<SinkState>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    one_request_per_connection: bool,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    tracing::warn!(port, %error, "sink accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(request, port, &state).await) }
            });
            let io = TokioIo::new(stream);
            if one_request_per_connection {
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(io, service);
                tokio::select! {
                    _ = connection => {}
                    _ = shutdown.cancelled() => {}
                }
            } else {
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(io, service);
                tokio::select! {
                    _ = connection => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        });
    }
}

fn json_response(status: u16, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(request: Request<Incoming>, port: u16, state: &SinkState) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let Some(txn_id) = path
        .strip_prefix("/_matrix/federation/v1/send/")
        .map(|t| t.trim_end_matches('/').to_owned())
    else {
        return json_response(
            404,
            r#"{"errcode":"M_UNRECOGNIZED","error":"the benchmark sink only takes /send"}"#,
        );
    };
    if request.method() != hyper::Method::PUT {
        return json_response(405, r#"{"errcode":"M_UNRECOGNIZED","error":"PUT only"}"#);
    }
    let Ok(body) = request.into_body().collect().await else {
        return json_response(400, r#"{"errcode":"M_NOT_JSON","error":"unreadable body"}"#);
    };
    let Ok(txn) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return json_response(400, r#"{"errcode":"M_NOT_JSON","error":"not JSON"}"#);
    };
    let first_copy = state
        .seen_txns
        .lock()
        .map(|mut seen| seen.insert((port, txn_id)))
        .unwrap_or(false);
    if first_copy {
        state
            .transactions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        record(&txn, port, state);
    }
    json_response(200, r#"{"pdus":{}}"#)
}

/// Records every message of every to-device EDU of a transaction.
fn record(txn: &Value, port: u16, state: &SinkState) {
    let Some(shared) = state.shared.get() else {
        return;
    };
    let destination = format!("localhost:{port}");
    let edus = txn["edus"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for edu in edus {
        if edu["edu_type"] != "m.direct_to_device" {
            continue;
        }
        let content = &edu["content"];
        if let Some(message_id) = content["message_id"].as_str() {
            let new = state
                .seen_message_ids
                .lock()
                .map(|mut seen| seen.insert((port, message_id.to_owned())))
                .unwrap_or(false);
            if !new {
                continue;
            }
        }
        let Some(messages) = content["messages"].as_object() else {
            continue;
        };
        for (user, devices) in messages {
            let index = state.users.get(user).copied();
            let at_right_server = user
                .split_once(':')
                .is_some_and(|(_, server)| server == destination);
            let Some(devices) = devices.as_object() else {
                continue;
            };
            for message in devices.values() {
                if at_right_server && index.is_some() {
                    shared.record_sink(index, message);
                } else {
                    shared.record_misdelivered();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use serde_json::json;

    use super::*;

    fn state(shared: Arc<Shared>) -> SinkState {
        let state = SinkState {
            users: [
                ("@bench00000:localhost:7000".to_owned(), 0),
                ("@bench00000:localhost:7001".to_owned(), 1),
            ]
            .into_iter()
            .collect(),
            shared: OnceLock::new(),
            seen_txns: Mutex::new(HashSet::new()),
            seen_message_ids: Mutex::new(HashSet::new()),
            transactions: Default::default(),
        };
        let _ = state.shared.set(shared);
        state
    }

    fn edu(message_id: &str, user: &str, seq: u64, r: u64) -> Value {
        json!({
            "edu_type": "m.direct_to_device",
            "content": {
                "message_id": message_id,
                "sender": "@s:a",
                "type": "m.x",
                "messages": { user: { "BENCH": { "run": "run1", "seq": seq, "r": r, "t": 0 } } },
            },
        })
    }

    #[test]
    fn messages_are_counted_once_at_the_right_destination() {
        let shared = Shared::new("run1", 3);
        let state = state(shared.clone());
        let txn = json!({
            "origin": "a", "origin_server_ts": 1, "pdus": [],
            "edus": [
                edu("m1", "@bench00000:localhost:7000", 0, 0),
                { "edu_type": "m.typing", "content": {} },
            ],
        });
        record(&txn, 7000, &state);
        // The same message_id again (a new transaction re-sending it) is
        // dropped like a receiver drops it.
        record(&txn, 7000, &state);
        // A message for a user of another destination is a misdelivery.
        let wrong = json!({ "edus": [edu("m2", "@bench00000:localhost:7001", 1, 1)] });
        record(&wrong, 7000, &state);
        let p = shared.progress();
        assert_eq!(p.delivered.load(Ordering::Relaxed), 1);
        assert_eq!(p.duplicates.load(Ordering::Relaxed), 0);
        assert_eq!(p.misdelivered.load(Ordering::Relaxed), 1);
        // Another message id carrying an already counted seq is a duplicate.
        let again = json!({ "edus": [edu("m3", "@bench00000:localhost:7000", 0, 0)] });
        record(&again, 7000, &state);
        assert_eq!(p.duplicates.load(Ordering::Relaxed), 1);
    }
}
