//! The network edge of every listener (federation over TLS, client, RPC):
//! the accept loop, one task per connection, and a wrapper around the
//! listener's router for each request. It enforces [`ListenerLimits`]:
//!
//! - connections: caps per listener and per peer address (IPv6 per /64);
//!   past them a new socket is closed at once, and accepting goes on;
//! - deadlines: from accept to the first request head (TLS handshake and
//!   HTTP version preface included), hyper's HTTP/1.1 header timer, idle
//!   (no request in flight; HTTP/2 gets a GOAWAY), and the body (408, then
//!   the connection closes);
//! - requests: caps on requests in flight per listener and per peer, and a
//!   budget of body bytes being received; past them 503 `M_LIMIT_EXCEEDED`
//!   with Retry-After;
//! - bodies: a declared `Content-Length` over the listener's limit (GET and
//!   HEAD: 1 KiB) gets 413 before a byte is read, and a body without one
//!   fails once it passes the limit;
//! - HTTP/2: streams per connection, header list size, keep-alive pings.
//!
//! Refusals are counted in `courier_listener_refused_total{listener,reason}`,
//! deadlines that fired in `courier_listener_timeouts_total{listener,kind}`,
//! and failed accepts (out of descriptors: retried after a delay doubling up
//! to a second) in `courier_listener_accept_errors_total{listener}`.
//! On HTTP/1.x a body left unread when the answer goes out (413, 503, or a
//! handler that refused from the headers alone) is read and thrown away
//! until the body deadline, never kept, so the peer receives the answer
//! instead of a reset. On shutdown it stops accepting and gives open
//! connections a bounded drain. It knows nothing about routes: what a
//! request means is the router's business. Its parts: the per-listener and
//! per-peer counts (`caps.rs`) and the request body wrapper, size checks
//! and drain (`body.rs`).

mod body;
mod caps;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Request, StatusCode, Version, header};
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::ListenerLimits;
use crate::error::MatrixError;

pub use body::ListenerError;
use body::{CappedBody, body_cap, declared_length, discard_later};
use caps::{Admission, Budget, Refusal};

/// How long open connections may take to finish after shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds a caller refused for concurrency is told to wait.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// One bound listener and what it is allowed to hold.
pub struct Listener {
    /// `federation`, `client` or `rpc`: the `listener` label of metrics.
    pub name: &'static str,
    pub tcp: TcpListener,
    /// Present on the federation listener: TLS is terminated here.
    pub tls: Option<TlsAcceptor>,
    pub limits: ListenerLimits,
    /// The listener's largest request body, refused by `Content-Length`
    /// before it is read (the router's `DefaultBodyLimit` stays as well).
    pub max_body_bytes: usize,
}

/// What every connection task of one listener shares.
struct ListenerShared {
    name: &'static str,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: ListenerLimits,
    max_body_bytes: u64,
    requests: Arc<Budget>,
    /// Bytes of request bodies being received (`max_body_bytes_in_flight`).
    bodies: Arc<Semaphore>,
    /// The permits `bodies` started with.
    body_budget: u64,
    builder: auto::Builder<TokioExecutor>,
}

/// Accepts connections until `shutdown`, then gives open connections
/// `DRAIN_TIMEOUT` to finish their requests and closes what is left.
pub async fn serve(listener: Listener, app: Router, shutdown: CancellationToken) {
    let Listener {
        name,
        tcp,
        tls,
        limits,
        max_body_bytes,
    } = listener;
    let connections = Arc::new(Budget::new(
        limits.max_connections,
        limits.max_connections_per_ip,
    ));
    let body_budget = limits
        .max_body_bytes_in_flight
        .clamp(1, Semaphore::MAX_PERMITS);
    let shared = Arc::new(ListenerShared {
        name,
        app,
        tls,
        limits,
        max_body_bytes: u64::try_from(max_body_bytes).unwrap_or(u64::MAX),
        requests: Arc::new(Budget::new(
            limits.max_concurrent_requests,
            limits.max_concurrent_requests_per_ip,
        )),
        bodies: Arc::new(Semaphore::new(body_budget)),
        body_budget: body_budget as u64,
        builder: connection_builder(&limits),
    });
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let mut backoff = AcceptBackoff::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = tcp.accept() => match accepted {
                Ok(pair) => {
                    backoff.reset();
                    pair
                }
                Err(error) => {
                    // Usually EMFILE: the pending connection stays queued, so
                    // retrying at once would spin. Back off, up to a second.
                    let delay = backoff.next_delay();
                    metrics::counter!("courier_listener_accept_errors_total", "listener" => name)
                        .increment(1);
                    tracing::warn!(listener = name, %error, delay_ms = delay.as_millis() as u64, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        let admission = match connections.try_admit(peer.ip()) {
            Ok(admission) => admission,
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::Listener => "max_connections",
                    Refusal::Peer => "max_connections_per_ip",
                };
                count_refused(name, reason);
                tracing::debug!(listener = name, %peer, reason, "connection refused");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve_connection(
            shared.clone(),
            stream,
            peer,
            admission,
            shutdown.clone(),
            hard_stop.clone(),
        ));
    }
    drop(tcp);
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            open = tracker.len(),
            "connections still open after the drain timeout; closing them"
        );
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
}

/// The hyper builder with this listener's HTTP/1.1 and HTTP/2 settings.
fn connection_builder(limits: &ListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes);
    let mut http2 = builder.http2();
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.h2_keep_alive_interval);
    if let Some(interval) = limits.h2_keep_alive_interval {
        http2.keep_alive_timeout(interval);
    }
    builder
}

/// One connection from accept to close: TLS (if any), then hyper, watched
/// for the first-request and idle deadlines and for shutdown.
async fn serve_connection(
    shared: Arc<ListenerShared>,
    stream: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let _admission = admission;
    let limits = shared.limits;
    let accepted_at = Instant::now();
    let (activity, watch_activity) = watch::channel(Activity {
        in_flight: 0,
        requests: 0,
        idle_since: accepted_at,
    });
    let io = match &shared.tls {
        Some(acceptor) => {
            let handshake = tokio::time::timeout_at(
                accepted_at + limits.header_read_timeout,
                acceptor.accept(stream),
            );
            tokio::select! {
                _ = shutdown.cancelled() => return,
                done = handshake => match done {
                    Ok(Ok(tls)) => Either::Right(tls),
                    Ok(Err(error)) => {
                        tracing::debug!(listener = shared.name, %peer, %error, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        count_timeout(shared.name, "first_request");
                        tracing::debug!(listener = shared.name, %peer, "tls handshake timed out");
                        return;
                    }
                },
            }
        }
        None => Either::Left(stream),
    };
    let service = EdgeService {
        shared: shared.clone(),
        peer: peer.ip(),
        activity: Arc::new(activity),
    };
    let conn = shared.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            log_end(shared.name, peer, result);
            return;
        }
        _ = shutdown.cancelled() => {}
        kind = idle_deadline(watch_activity, &limits) => {
            count_timeout(shared.name, kind);
            tracing::debug!(listener = shared.name, %peer, kind, "closing a connection without requests");
        }
    }
    // Nothing new is accepted on this connection; what is in flight may end.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        result = conn.as_mut() => log_end(shared.name, peer, result),
        _ = hard_stop.cancelled() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {}
    }
}

fn log_end(
    listener: &'static str,
    peer: SocketAddr,
    result: Result<(), Box<dyn std::error::Error + Send + Sync>>,
) {
    if let Err(error) = result {
        tracing::debug!(listener, %peer, %error, "connection ended with an error");
    }
}

/// Requests of one connection, as its deadline watcher sees them.
#[derive(Debug, Clone, Copy)]
struct Activity {
    in_flight: usize,
    /// Requests started on this connection so far.
    requests: u64,
    /// When `in_flight` last became zero (or the connection was accepted).
    idle_since: Instant,
}

/// Resolves when the connection has had no request in flight for too long:
/// `header_read_timeout` from accept while no request ever arrived
/// (`"first_request"`), `idle_timeout` after the last one ended (`"idle"`).
async fn idle_deadline(
    mut activity: watch::Receiver<Activity>,
    limits: &ListenerLimits,
) -> &'static str {
    loop {
        let now = *activity.borrow_and_update();
        if now.in_flight > 0 {
            if activity.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            continue;
        }
        let (deadline, kind) = if now.requests == 0 {
            (now.idle_since + limits.header_read_timeout, "first_request")
        } else {
            (now.idle_since + limits.idle_timeout, "idle")
        };
        tokio::select! {
            changed = activity.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return kind,
        }
    }
}

/// Marks one request in flight on its connection until dropped.
struct InFlight {
    activity: Arc<watch::Sender<Activity>>,
}

impl InFlight {
    fn enter(activity: Arc<watch::Sender<Activity>>) -> InFlight {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.requests += 1;
        });
        InFlight { activity }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// The per-request wrapper hyper calls: request caps, declared size, body
/// deadline, then the router.
#[derive(Clone)]
struct EdgeService {
    shared: Arc<ListenerShared>,
    peer: IpAddr,
    activity: Arc<watch::Sender<Activity>>,
}

impl hyper::service::Service<Request<Incoming>> for EdgeService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        // Entered before the future first runs, so the idle watcher never
        // sees a connection with a request in hand as idle.
        let in_flight = InFlight::enter(self.activity.clone());
        let shared = self.shared.clone();
        let peer = self.peer;
        Box::pin(async move {
            let response = handle(&shared, peer, request).await;
            drop(in_flight);
            Ok(response)
        })
    }
}

async fn handle(shared: &ListenerShared, peer: IpAddr, request: Request<Incoming>) -> Response {
    let version = request.version();
    let body_deadline = Instant::now() + shared.limits.body_read_timeout;
    // HTTP/1.x: a body left unread when the answer goes out is read and
    // discarded until the body deadline, so that closing the socket does
    // not reset the connection under the answer while the peer is still
    // sending. HTTP/2 resets just the stream.
    let linger_until = (version < Version::HTTP_2).then_some(body_deadline);
    let _permit = match shared.requests.try_admit(peer) {
        Ok(permit) => permit,
        Err(refusal) => {
            let reason = match refusal {
                Refusal::Listener => "max_concurrent_requests",
                Refusal::Peer => "max_concurrent_requests_per_ip",
            };
            count_refused(shared.name, reason);
            tracing::debug!(listener = shared.name, %peer, reason, "request refused");
            discard_later(request.into_body(), linger_until);
            return busy().into_response();
        }
    };
    let cap = body_cap(request.method(), shared.max_body_bytes);
    let declared = declared_length(request.headers());
    if declared.is_some_and(|declared| declared > cap) {
        tracing::info!(listener = shared.name, %peer, cap, "declared request body over the limit");
        // Nothing of the body is kept; the connection ends after it.
        discard_later(request.into_body(), linger_until);
        return closing(
            MatrixError::too_large("The request body is too large").into_response(),
            version,
        );
    }
    let (parts, incoming) = request.into_parts();
    // The body's share of the listener's body budget, held until the
    // handler is done with it. A body larger than the whole budget is
    // admitted only alone.
    let reserve = match declared {
        _ if incoming.is_end_stream() => 0,
        Some(declared) => declared,
        None => cap,
    };
    let _body_permit = if reserve == 0 {
        None
    } else {
        let permits = u32::try_from(reserve.min(shared.body_budget)).unwrap_or(u32::MAX);
        match shared.bodies.clone().try_acquire_many_owned(permits) {
            Ok(permit) => Some(permit),
            Err(_) => {
                count_refused(shared.name, "max_body_bytes_in_flight");
                tracing::debug!(listener = shared.name, %peer, reserve, "request refused: body budget spent");
                discard_later(incoming, linger_until);
                return busy().into_response();
            }
        }
    };
    let finished = Arc::new(AtomicBool::new(incoming.is_end_stream()));
    let body = CappedBody {
        inner: Some(incoming),
        cap,
        received: 0,
        finished: finished.clone(),
        linger_until,
    };
    let response = shared
        .app
        .clone()
        .oneshot(Request::from_parts(parts, Body::new(body)));
    tokio::pin!(response);
    tokio::select! {
        result = response.as_mut() => return answered(result),
        _ = tokio::time::sleep_until(body_deadline) => {}
    }
    if finished.load(Ordering::Acquire) {
        // The body is in; how long the handler takes is its own business
        // (a `/sync` long-poll is bounded by its timeout).
        return answered(response.await);
    }
    count_timeout(shared.name, "body");
    tracing::info!(listener = shared.name, %peer, "request body not received in time");
    closing(
        MatrixError::new(
            StatusCode::REQUEST_TIMEOUT,
            "M_UNKNOWN",
            "The request body did not arrive in time",
        )
        .into_response(),
        version,
    )
}

fn answered(result: Result<Response, Infallible>) -> Response {
    match result {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// 503 `M_LIMIT_EXCEEDED` with Retry-After: too many requests, or too many
/// body bytes, in flight.
fn busy() -> MatrixError {
    MatrixError {
        retry_after_secs: Some(BUSY_RETRY_AFTER_SECS),
        ..MatrixError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_LIMIT_EXCEEDED",
            "Too many requests in flight; retry shortly",
        )
    }
}

/// Asks HTTP/1.x to close the connection after this response (HTTP/2 has no
/// such header; its stream is reset by hyper when the body is left unread).
fn closing(mut response: Response, version: Version) -> Response {
    if version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn count_refused(listener: &'static str, reason: &'static str) {
    metrics::counter!("courier_listener_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

fn count_timeout(listener: &'static str, kind: &'static str) {
    metrics::counter!("courier_listener_timeouts_total", "listener" => listener, "kind" => kind)
        .increment(1);
}

/// Delays between failed accepts: doubling from 5 ms to at most 1 s, back
/// to the start after an accept succeeds.
struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> AcceptBackoff {
        AcceptBackoff { next: Self::FIRST }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut backoff = AcceptBackoff::new();
        let delays: Vec<u64> = (0..10)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_watcher_waits_while_busy_and_fires_after_the_right_deadline() {
        let limits = ListenerLimits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            ..ListenerLimits::CLIENT_DEFAULTS
        };
        let start = Instant::now();
        let (tx, rx) = watch::channel(Activity {
            in_flight: 0,
            requests: 0,
            idle_since: start,
        });
        assert_eq!(idle_deadline(rx.clone(), &limits).await, "first_request");
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        let tx = Arc::new(tx);
        let request = InFlight::enter(tx.clone());
        let watcher = tokio::spawn({
            let rx = rx.clone();
            async move {
                let kind = idle_deadline(rx, &limits).await;
                (kind, Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!watcher.is_finished(), "a request in flight is not idle");
        drop(request);
        let ended = Instant::now();
        let (kind, fired) = watcher.await.expect("watcher task");
        assert_eq!(kind, "idle");
        assert_eq!(fired - ended, Duration::from_secs(5));
    }
}
