//! `FaultProxy`: a loopback TCP proxy that sits in front of one relay's
//! federation listener and injects faults into the connections it carries,
//! for the soak (`tests/it/soak.rs`). It forwards raw bytes, so the relays'
//! TLS (and HTTP/2 inside it) passes through untouched; each fault acts on
//! byte counts and timing, never on parsed HTTP, with one exception: an
//! injected `503` is answered by the proxy itself, which terminates TLS with
//! the development certificate (offering only HTTP/1.1), reads the request
//! head, answers, closes, and never forwards the request.
//!
//! A fault is drawn per accepted connection from a seeded [`SoakRng`], so a
//! seed fixes the sequence of faults (not the timing, which the relays
//! decide). While faults are off ([`FaultProxy::set_faults`]) every
//! connection is passed through as is. What it does not do: look inside
//! TLS for anything but the `503`, or bind anything outside 127.0.0.1.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::relay::repo_root;

/// A small deterministic PRNG (SplitMix64): the soak's schedule of faults,
/// kills and sends comes from one seed, independently of `rand`'s version.
#[derive(Clone, Debug)]
pub struct SoakRng(u64);

impl SoakRng {
    pub fn new(seed: u64) -> SoakRng {
        SoakRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }

    /// A fresh generator for a sub-schedule (a connection, a client).
    pub fn fork(&mut self) -> SoakRng {
        SoakRng(self.next_u64())
    }
}

/// What the proxy does to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Passed through unchanged.
    None,
    /// Every chunk, in both directions, waits this long before it is
    /// forwarded.
    Delay(Duration),
    /// The client's bytes are forwarded up to this count, then both sides
    /// get a TCP reset (a request cut mid-way, TLS handshake included).
    ResetRequest(u64),
    /// The relay's answer is forwarded up to this count, then both sides
    /// get a reset.
    ResetResponse(u64),
    /// The relay's answer is forwarded up to this count, then both sides
    /// are closed cleanly (FIN): a truncated response.
    TruncateResponse(u64),
    /// The proxy answers `503` itself over TLS; nothing is forwarded.
    Inject503,
    /// Accepted, then nothing: no byte read is forwarded, none is sent,
    /// until the client gives up (or [`STALL_MAX`]).
    Stall,
}

/// The longest a stalled connection is held.
pub const STALL_MAX: Duration = Duration::from_secs(30);

/// How many connections got each fault.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub connections: AtomicU64,
    pub passed: AtomicU64,
    pub delayed: AtomicU64,
    pub reset_request: AtomicU64,
    pub reset_response: AtomicU64,
    pub truncated_response: AtomicU64,
    pub injected_503: AtomicU64,
    pub stalled: AtomicU64,
    /// Connections whose upstream (the relay) refused: it was down.
    pub upstream_down: AtomicU64,
    /// Mid-stream faults of otherwise passed (or delayed) connections.
    pub chunk_reset: AtomicU64,
    pub chunk_truncate: AtomicU64,
    pub chunk_stall: AtomicU64,
}

impl FaultCounts {
    fn count(&self, fault: Fault) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let counter = match fault {
            Fault::None => &self.passed,
            Fault::Delay(_) => &self.delayed,
            Fault::ResetRequest(_) => &self.reset_request,
            Fault::ResetResponse(_) => &self.reset_response,
            Fault::TruncateResponse(_) => &self.truncated_response,
            Fault::Inject503 => &self.injected_503,
            Fault::Stall => &self.stalled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(kind, count)` for every kind, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("connections", get(&self.connections)),
            ("passed", get(&self.passed)),
            ("delayed", get(&self.delayed)),
            ("reset_request", get(&self.reset_request)),
            ("reset_response", get(&self.reset_response)),
            ("truncated_response", get(&self.truncated_response)),
            ("injected_503", get(&self.injected_503)),
            ("stalled", get(&self.stalled)),
            ("upstream_down", get(&self.upstream_down)),
            ("chunk_reset", get(&self.chunk_reset)),
            ("chunk_truncate", get(&self.chunk_truncate)),
            ("chunk_stall", get(&self.chunk_stall)),
        ]
    }
}

/// Draws a fault: half the connections pass, the rest share the faults.
/// A byte budget is drawn on a log scale (up to 256 KiB), so cuts land in
/// the TLS handshake, in the first request or in a later one on a pooled
/// connection.
fn draw_fault(rng: &mut SoakRng) -> Fault {
    let budget = |rng: &mut SoakRng| {
        let bits = rng.range(6, 19);
        rng.range(0, 1 << bits)
    };
    match rng.range(0, 100) {
        0..50 => Fault::None,
        50..64 => Fault::Delay(Duration::from_millis(rng.range(20, 400))),
        64..73 => Fault::ResetRequest(budget(rng)),
        73..82 => Fault::ResetResponse(budget(rng)),
        82..89 => Fault::TruncateResponse(budget(rng)),
        89..95 => Fault::Inject503,
        _ => Fault::Stall,
    }
}

/// A running proxy: 127.0.0.1:<port> → `upstream`.
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub counts: Arc<FaultCounts>,
    faults_on: Arc<AtomicBool>,
    /// A fault for every new connection instead of the drawn one (tests of
    /// the proxy itself).
    forced: Arc<Mutex<Option<Fault>>>,
    shutdown: CancellationToken,
}

impl FaultProxy {
    /// Binds 127.0.0.1:0 and forwards to `upstream` (which need not be
    /// listening yet), faults off. `seed` fixes the faults drawn.
    pub async fn start(upstream: SocketAddr, seed: u64) -> FaultProxy {
        assert!(upstream.ip().is_loopback(), "loopback only");
        courier::tls::install_crypto_provider();
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let root = repo_root();
        let mut tls = (*courier::tls::server_config(
            &root.join("certs/localhost.crt"),
            &root.join("certs/localhost.key"),
        )
        .expect("development certificate"))
        .clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let proxy = FaultProxy {
            addr,
            counts: Arc::new(FaultCounts::default()),
            faults_on: Arc::new(AtomicBool::new(false)),
            forced: Arc::new(Mutex::new(None)),
            shutdown: CancellationToken::new(),
        };
        let forced = proxy.forced.clone();
        let counts = proxy.counts.clone();
        let faults_on = proxy.faults_on.clone();
        let shutdown = proxy.shutdown.clone();
        tokio::spawn(async move {
            let mut rng = SoakRng::new(seed);
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = shutdown.cancelled() => return,
                };
                let Ok((inbound, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Drawn whether or not faults are on, so the sequence
                // depends only on the seed and the connection count.
                let drawn = draw_fault(&mut rng);
                let forced = *forced.lock().unwrap_or_else(PoisonError::into_inner);
                let fault = match forced {
                    Some(fault) => fault,
                    None if faults_on.load(Ordering::Relaxed) => drawn,
                    None => Fault::None,
                };
                counts.count(fault);
                let connection = Connection {
                    upstream,
                    fault,
                    faults_on: faults_on.clone(),
                    rng: rng.fork(),
                    acceptor: acceptor.clone(),
                    counts: counts.clone(),
                    shutdown: shutdown.child_token(),
                };
                tokio::spawn(connection.run(inbound));
            }
        });
        proxy
    }

    /// Turns fault injection on or off for connections accepted from now
    /// on (connections already open keep the fault they got).
    pub fn set_faults(&self, on: bool) {
        self.faults_on.store(on, Ordering::Relaxed);
    }

    /// Gives every connection accepted from now on `fault` (`None`: back to
    /// drawing). The draws go on, so the seed's sequence is kept.
    pub fn force(&self, fault: Option<Fault>) {
        *self.forced.lock().unwrap_or_else(PoisonError::into_inner) = fault;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Connection {
    upstream: SocketAddr,
    fault: Fault,
    /// The proxy's switch, read again for each mid-stream fault.
    faults_on: Arc<AtomicBool>,
    rng: SoakRng,
    acceptor: tokio_rustls::TlsAcceptor,
    counts: Arc<FaultCounts>,
    shutdown: CancellationToken,
}

/// How one direction of a proxied connection ended.
#[derive(Debug, PartialEq, Eq)]
enum PumpEnd {
    /// The source closed; the close was passed on.
    Eof,
    /// The fault's byte budget ran out.
    Budget,
    /// A read or write failed.
    Error,
}

impl Connection {
    async fn run(self, inbound: TcpStream) {
        let shutdown = self.shutdown.clone();
        tokio::select! {
            _ = self.serve(inbound) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    async fn serve(self, inbound: TcpStream) {
        match self.fault {
            Fault::Stall => stall(inbound).await,
            Fault::Inject503 => inject_503(&self.acceptor, inbound).await,
            fault => {
                let connect =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.upstream));
                let Ok(Ok(upstream)) = connect.await else {
                    self.counts.upstream_down.fetch_add(1, Ordering::Relaxed);
                    let _ = inbound.set_zero_linger();
                    return;
                };
                forward(
                    inbound,
                    upstream,
                    fault,
                    self.faults_on.clone(),
                    self.rng,
                    self.counts.clone(),
                )
                .await;
            }
        }
    }
}

/// Holds the connection without answering, discarding what arrives, until
/// the client closes it or [`STALL_MAX`] passes.
async fn stall(mut inbound: TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(STALL_MAX, async {
        while matches!(inbound.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

const INJECTED_BODY: &str =
    r#"{"errcode":"M_UNKNOWN","error":"injected by the soak's fault proxy"}"#;

/// Terminates TLS, reads the request head, answers `503`, closes.
async fn inject_503(acceptor: &tokio_rustls::TlsAcceptor, inbound: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let Ok(mut tls) = acceptor.accept(inbound).await else {
            return;
        };
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match tls.read(&mut chunk).await {
                Ok(n) if n > 0 => head.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{INJECTED_BODY}",
            INJECTED_BODY.len()
        );
        let _ = tls.write_all(answer.as_bytes()).await;
        let _ = tls.shutdown().await;
    })
    .await;
}

/// How often, in percent of forwarded chunks, a connection that got no
/// byte-budget fault (faults on or not when it was opened) is cut or
/// stalled mid-stream while faults are on, so
/// that long-lived (pooled, HTTP/2) connections see faults per request
/// and not only when they are opened.
const CHUNK_FAULT_PERCENT: u64 = 4;

/// What one direction of a connection does.
struct Direction {
    /// Bytes forwarded before the connection is cut.
    budget: Option<u64>,
    /// Whether the cut at the budget is a reset (else a clean close).
    reset_at_budget: bool,
    delay: Duration,
    /// Percent of chunks that cut or stall the connection mid-stream,
    /// while `faults_on`.
    chunk_percent: u64,
    faults_on: Arc<AtomicBool>,
    /// Whether this is the answering direction (a mid-stream cut may then
    /// be a clean close: a truncated response).
    response: bool,
    rng: SoakRng,
}

/// Forwards both directions with `fault` applied. A clean end in one
/// direction is passed on as a half-close; any other end (a budget, an
/// error) ends both, with a reset unless it is a truncation.
async fn forward(
    inbound: TcpStream,
    upstream: TcpStream,
    fault: Fault,
    faults_on: Arc<AtomicBool>,
    mut rng: SoakRng,
    counts: Arc<FaultCounts>,
) {
    let chunk_percent = match fault {
        Fault::None | Fault::Delay(_) => CHUNK_FAULT_PERCENT,
        _ => 0,
    };
    let mut request = Direction {
        budget: None,
        reset_at_budget: true,
        delay: Duration::ZERO,
        chunk_percent,
        faults_on,
        response: false,
        rng: rng.fork(),
    };
    let mut response = Direction {
        budget: None,
        reset_at_budget: true,
        delay: Duration::ZERO,
        chunk_percent,
        faults_on: request.faults_on.clone(),
        response: true,
        rng: rng.fork(),
    };
    match fault {
        Fault::Delay(delay) => {
            request.delay = delay;
            response.delay = delay;
        }
        Fault::ResetRequest(n) => request.budget = Some(n),
        Fault::ResetResponse(n) => response.budget = Some(n),
        Fault::TruncateResponse(n) => {
            response.budget = Some(n);
            response.reset_at_budget = false;
        }
        _ => {}
    }
    let _ = inbound.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = inbound.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let up = pump(client_read, upstream_write, request, &counts);
    let down = pump(upstream_read, client_write, response, &counts);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            end = &mut up, if !up_done => {
                if end != PumpEnd::Eof { return; }
                up_done = true;
            }
            end = &mut down, if !down_done => {
                if end != PumpEnd::Eof { return; }
                down_done = true;
            }
        }
    }
}

/// Makes both sockets of a connection end with a reset when dropped.
fn arm_reset(from: &OwnedReadHalf, to: &OwnedWriteHalf) {
    let _ = from.as_ref().set_zero_linger();
    let _ = to.as_ref().set_zero_linger();
}

/// Copies `from` to `to` as `plan` says.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut plan: Direction,
    counts: &FaultCounts,
) -> PumpEnd {
    let mut left = plan.budget.unwrap_or(u64::MAX);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return PumpEnd::Eof;
            }
            Ok(n) => n,
            Err(_) => return PumpEnd::Error,
        };
        if plan.chunk_percent > 0
            && plan.faults_on.load(Ordering::Relaxed)
            && plan.rng.percent(plan.chunk_percent)
        {
            match plan.rng.range(0, 3) {
                0 => {
                    counts.chunk_stall.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(STALL_MAX).await;
                }
                1 if plan.response => {
                    // Part of this chunk, then a clean close.
                    counts.chunk_truncate.fetch_add(1, Ordering::Relaxed);
                    let part = plan.rng.range(0, n as u64) as usize;
                    let _ = to.write_all(&buf[..part]).await;
                    let _ = to.flush().await;
                }
                _ => {
                    counts.chunk_reset.fetch_add(1, Ordering::Relaxed);
                    arm_reset(&from, &to);
                }
            }
            return PumpEnd::Budget;
        }
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let take = usize::try_from(left).unwrap_or(usize::MAX).min(n);
        if to.write_all(&buf[..take]).await.is_err() {
            return PumpEnd::Error;
        }
        left -= take as u64;
        if take < n || (plan.budget.is_some() && left == 0) {
            let _ = to.flush().await;
            if plan.reset_at_budget {
                arm_reset(&from, &to);
            }
            return PumpEnd::Budget;
        }
    }
}
