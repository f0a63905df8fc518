//! A scriptable fake remote homeserver for outbound federation tests: axum
//! over tokio-rustls on 127.0.0.1 with a certificate from a per-test CA
//! (rcgen). One fake serves many server names; behaviour is scripted per
//! hostname (the `Host` header without port): fail the next N `/send`s with
//! 500, be down until a given (tokio) instant, hang, refuse transactions
//! whose body contains a marker with 400, or refuse TLS altogether. It
//! records every `/send` with its txnId, body, arrival time, `Authorization`
//! header and whether another `/send` for the same host was in progress
//! (the overlap counter), and serves scripted `/.well-known/matrix/server`
//! answers (or stalls them). It also counts its open connections. Any other
//! request is recorded with its method and body, and answered with the
//! answer canned for its path if there is one (the E2EE key endpoints),
//! else 404 (or the `/version` document).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A per-test certificate authority.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Courier test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa { cert, key, params }
    }

    /// Writes the CA certificate as PEM into `dir`; the path for `extra_ca`.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.crt");
        std::fs::write(&path, self.cert.pem()).expect("write CA pem");
        path
    }

    /// A leaf certificate for `names` (DNS names, wildcards or IP strings).
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake remote");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key_der)
    }
}

/// How the fake treats `/send` for one hostname.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Answer 500 to this many more `/send`s.
    pub fail_next: u32,
    /// Answer 500 until this instant.
    pub down_until: Option<Instant>,
    /// Never answer.
    pub hang: bool,
    /// Answer 400 to a transaction whose body contains any of these.
    pub refuse_containing: Vec<String>,
    /// Answer 429 with this Retry-After (seconds) to the next `/send`.
    pub rate_limit_next: Option<u64>,
    /// Hold every answer this long (tokio time) before sending it.
    pub respond_after: Option<Duration>,
    /// The body of a 200 answer instead of `{"pdus":{}}` (say, empty or
    /// HTML).
    pub ok_body: Option<String>,
    /// Answer 401 as Synapse does when it holds another key under the id
    /// our request was signed with (`... with key ed25519:<id>`).
    pub reject_signing_key: bool,
}

/// One `/send` the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `Host` header as sent.
    pub host: String,
    pub txn_id: String,
    pub body: String,
    pub at: Instant,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// The status the fake answered (0 while hanging).
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a /send body is JSON")
    }
    /// The `content` of every EDU, in order.
    pub fn edu_contents(&self) -> Vec<serde_json::Value> {
        self.json()["edus"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|edu| edu["content"].clone())
            .collect()
    }
}

/// A request other than `/send` or `.well-known`.
#[derive(Debug, Clone)]
pub struct OtherRequest {
    /// Path and query as received.
    pub path: String,
    pub host: Option<String>,
    pub authorization: Option<String>,
    pub method: String,
    /// The body as received (lossy UTF-8).
    pub body: String,
}

impl OtherRequest {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("the request body is JSON")
    }
}

/// The answer the fake gives to every request for one path.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub body: String,
    /// Never answer (the request is still recorded).
    pub hang: bool,
}

impl Canned {
    pub fn json(status: u16, body: serde_json::Value) -> Canned {
        Canned {
            status,
            body: body.to_string(),
            hang: false,
        }
    }
    /// A 200 with `body` as it is (not necessarily JSON).
    pub fn text(body: &str) -> Canned {
        Canned {
            status: 200,
            body: body.to_owned(),
            hang: false,
        }
    }
    pub fn hang() -> Canned {
        Canned {
            status: 200,
            body: String::new(),
            hang: true,
        }
    }
}

/// A scripted `.well-known` answer.
#[derive(Debug, Clone)]
pub struct WellKnown {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
struct Inner {
    default_script: Script,
    scripts: HashMap<String, Script>,
    received: Vec<Received>,
    in_progress: HashMap<String, u32>,
    overlaps: u32,
    well_known: HashMap<String, WellKnown>,
    well_known_fetches: HashMap<String, u32>,
    other_requests: Vec<OtherRequest>,
    /// Path (without query) → the answer to other requests for it.
    canned: HashMap<String, Canned>,
    refuse_tls: bool,
    /// Hostnames whose `.well-known` request never gets an answer.
    stalled_well_known: std::collections::HashSet<String>,
    /// TLS connections currently open.
    open_connections: u32,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<Notify>,
}

/// A running fake remote.
pub struct FakeRemote {
    pub addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Drop for FakeRemote {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The hostname part of a Host header.
pub fn hostname_of(host: &str) -> String {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default();
    }
    host.split(':').next().unwrap_or_default().to_owned()
}

impl FakeRemote {
    /// Starts on 127.0.0.1:0 with a certificate from `ca` for `names`.
    pub async fn start(ca: &TestCa, names: &[&str]) -> FakeRemote {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, ca, names).await
    }

    pub async fn start_on(listener: TcpListener, ca: &TestCa, names: &[&str]) -> FakeRemote {
        let addr = listener.local_addr().expect("local addr");
        let (certs, key) = ca.issue(names);
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner::default())),
            changed: Arc::new(Notify::new()),
        };
        let app = Router::new()
            .route("/_matrix/federation/v1/send/{txn_id}", put(send_route))
            .route("/.well-known/matrix/server", get(well_known_route))
            .fallback(other_route)
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let accept_shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                if accept_shared.inner.lock().expect("lock").refuse_tls {
                    drop(tcp);
                    continue;
                }
                let acceptor = acceptor.clone();
                let app = app.clone();
                let token = token.clone();
                let conn_shared = accept_shared.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    conn_shared.inner.lock().expect("lock").open_connections += 1;
                    conn_shared.changed.notify_waiters();
                    let _open = OpenConnection(conn_shared);
                    let service = TowerToHyperService::new(app);
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        FakeRemote { addr, shared, stop }
    }

    /// `.well-known` requests for `hostname` are received (and counted)
    /// but never answered.
    pub fn stall_well_known(&self, hostname: &str) {
        self.shared
            .inner
            .lock()
            .expect("lock")
            .stalled_well_known
            .insert(hostname.to_owned());
    }

    /// TLS connections open right now.
    pub fn open_connections(&self) -> u32 {
        self.shared.inner.lock().expect("lock").open_connections
    }

    /// Waits up to `limit` (tokio time) until `done(open connections)`.
    pub async fn wait_for_connections(&self, limit: Duration, done: impl Fn(u32) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self.open_connections()) {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return done(self.open_connections()),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Scripts `/send` for `hostname` (the Host header without port).
    pub fn script(&self, hostname: &str, script: Script) {
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.scripts.insert(hostname.to_owned(), script);
    }

    /// Scripts `/send` for every hostname without its own script.
    pub fn script_default(&self, script: Script) {
        self.shared.inner.lock().expect("lock").default_script = script;
    }

    pub fn set_well_known(&self, hostname: &str, answer: WellKnown) {
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.well_known.insert(hostname.to_owned(), answer);
    }

    pub fn well_known_fetches(&self, hostname: &str) -> u32 {
        let inner = self.shared.inner.lock().expect("lock");
        inner.well_known_fetches.get(hostname).copied().unwrap_or(0)
    }

    /// Drops TLS connections right after accepting them.
    pub fn refuse_tls(&self, refuse: bool) {
        self.shared.inner.lock().expect("lock").refuse_tls = refuse;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.inner.lock().expect("lock").received.clone()
    }

    /// `/send`s for one hostname, in arrival order.
    pub fn received_for(&self, hostname: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| hostname_of(&r.host) == hostname)
            .collect()
    }

    /// Answers every other request for `path` (without query) with
    /// `canned`, instead of 404.
    pub fn answer(&self, path: &str, canned: Canned) {
        let mut inner = self.shared.inner.lock().expect("lock");
        inner.canned.insert(path.to_owned(), canned);
    }

    /// Requests other than `/send` and `.well-known`.
    pub fn other_requests(&self) -> Vec<OtherRequest> {
        self.shared
            .inner
            .lock()
            .expect("lock")
            .other_requests
            .clone()
    }

    /// How many `/send`s arrived while another for the same host was open.
    pub fn overlaps(&self) -> u32 {
        self.shared.inner.lock().expect("lock").overlaps
    }

    /// Waits (bounded by `limit`, in tokio time) until `done` holds over the
    /// received `/send`s; returns whether it did.
    pub async fn wait_for(
        &self,
        limit: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.shared.inner.lock().expect("lock").received) {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return done(&self.shared.inner.lock().expect("lock").received);
                }
            }
        }
    }
}

/// The Host header, or the authority of an HTTP/2 request.
fn host_of(headers: &HeaderMap, uri: &axum::http::Uri) -> String {
    header(headers, "host")
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default()
}

async fn send_route(
    State(shared): State<Shared>,
    UrlPath(txn_id): UrlPath<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let host = host_of(&headers, &uri);
    let hostname = hostname_of(&host);
    let body = String::from_utf8_lossy(&body).into_owned();
    let (decision, respond_after, ok_body) = {
        let mut inner = shared.inner.lock().expect("lock");
        let open = inner.in_progress.entry(hostname.clone()).or_insert(0);
        let overlapped = *open > 0;
        *open += 1;
        if overlapped {
            inner.overlaps += 1;
        }
        let mut script = match inner.scripts.get(&hostname) {
            Some(s) => s.clone(),
            None => inner.default_script.clone(),
        };
        let decision = if script.hang {
            None
        } else if script.reject_signing_key {
            Some((401, None))
        } else if let Some(seconds) = script.rate_limit_next.take() {
            Some((429, Some(seconds)))
        } else if script.fail_next > 0 {
            script.fail_next -= 1;
            Some((500, None))
        } else if script
            .down_until
            .is_some_and(|until| Instant::now() < until)
        {
            Some((500, None))
        } else if script
            .refuse_containing
            .iter()
            .any(|marker| body.contains(marker.as_str()))
        {
            Some((400, None))
        } else {
            Some((200, None))
        };
        let respond_after = script.respond_after;
        let ok_body = script.ok_body.clone();
        if inner.scripts.contains_key(&hostname) {
            inner.scripts.insert(hostname.clone(), script);
        } else {
            inner.default_script = script;
        }
        inner.received.push(Received {
            host: host.clone(),
            txn_id: txn_id.clone(),
            body: body.clone(),
            at: Instant::now(),
            authorization: header(&headers, "authorization"),
            content_type: header(&headers, "content-type"),
            status: decision.map_or(0, |(s, _)| s),
        });
        (decision, respond_after, ok_body)
    };
    shared.changed.notify_waiters();
    // Until dropped, this /send counts as in progress for its hostname (also
    // when the client gives up and the connection is dropped).
    let guard = InProgress {
        shared: shared.clone(),
        hostname,
    };
    let Some((status, retry_after)) = decision else {
        std::future::pending::<()>().await;
        unreachable!("pending never resolves");
    };
    if let Some(delay) = respond_after {
        tokio::time::sleep(delay).await;
    }
    drop(guard);
    let status = StatusCode::from_u16(status).expect("valid status");
    let mut response = match status.as_u16() {
        401 => {
            let key_id = header(&headers, "authorization")
                .and_then(|auth| {
                    let start = auth.find("key=\"")? + 5;
                    let len = auth[start..].find('"')?;
                    Some(auth[start..start + len].to_owned())
                })
                .unwrap_or_default();
            let error = format!(
                "Invalid signature for server {host} with key {key_id}: Unable to verify \
                 signature for {host}"
            );
            let body = serde_json::json!({"errcode": "M_UNAUTHORIZED", "error": error});
            (status, body.to_string()).into_response()
        }
        200 => match ok_body {
            Some(body) => (status, body).into_response(),
            None => (status, r#"{"pdus":{}}"#).into_response(),
        },
        400 => (
            status,
            r#"{"errcode":"M_BAD_JSON","error":"refused by script"}"#,
        )
            .into_response(),
        429 => (
            status,
            r#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down"}"#,
        )
            .into_response(),
        _ => (
            status,
            r#"{"errcode":"M_UNKNOWN","error":"scripted failure"}"#,
        )
            .into_response(),
    };
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(
            "retry-after",
            HeaderValue::from_str(&seconds.to_string()).expect("digits"),
        );
    }
    response
}

/// Counts one open connection until dropped.
struct OpenConnection(Shared);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.0.inner.lock() {
            inner.open_connections = inner.open_connections.saturating_sub(1);
        }
        self.0.changed.notify_waiters();
    }
}

struct InProgress {
    shared: Shared,
    hostname: String,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.shared.inner.lock()
            && let Some(open) = inner.in_progress.get_mut(&self.hostname)
        {
            *open = open.saturating_sub(1);
        }
        self.shared.changed.notify_waiters();
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn well_known_route(
    State(shared): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let host = host_of(&headers, &uri);
    let hostname = hostname_of(&host);
    let answer = {
        let mut inner = shared.inner.lock().expect("lock");
        *inner
            .well_known_fetches
            .entry(hostname.clone())
            .or_insert(0) += 1;
        let stalled = inner.stalled_well_known.contains(&hostname);
        (inner.well_known.get(&hostname).cloned(), stalled)
    };
    shared.changed.notify_waiters();
    let (answer, stalled) = answer;
    if stalled {
        std::future::pending::<()>().await;
    }
    let Some(answer) = answer else {
        return (StatusCode::NOT_FOUND, "{}").into_response();
    };
    let mut response = (
        StatusCode::from_u16(answer.status).expect("valid status"),
        answer.body,
    )
        .into_response();
    for (name, value) in answer.headers {
        response.headers_mut().append(
            axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(&value).expect("header value"),
        );
    }
    response
}

async fn other_route(State(shared): State<Shared>, request: axum::extract::Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let headers = request.headers().clone();
    let host = Some(host_of(&headers, request.uri()));
    let method = request.method().as_str().to_owned();
    let bare_path = request.uri().path().to_owned();
    let body = axum::body::to_bytes(request.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let canned = {
        let mut inner = shared.inner.lock().expect("lock");
        inner.other_requests.push(OtherRequest {
            path: path.clone(),
            host,
            authorization: header(&headers, "authorization"),
            method,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        inner.canned.get(&bare_path).cloned()
    };
    shared.changed.notify_waiters();
    if let Some(canned) = canned {
        if canned.hang {
            std::future::pending::<()>().await;
        }
        let status = StatusCode::from_u16(canned.status).expect("valid status");
        let mut response = (status, canned.body).into_response();
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        return response;
    }
    if path.starts_with("/_matrix/federation/v1/version") {
        return (
            StatusCode::OK,
            r#"{"server":{"name":"fake","version":"0"}}"#,
        )
            .into_response();
    }
    (StatusCode::NOT_FOUND, r#"{"errcode":"M_UNRECOGNIZED"}"#).into_response()
}
