//! The network edge of every listener (SECURITY-REVIEW F1), against real
//! relays on loopback: connections that send nothing, half a request line,
//! half an HTTP/2 preface or a trickled body are closed within the
//! configured deadlines on the federation (TLS), client and RPC listeners;
//! idle keep-alive connections (HTTP/1.1 and HTTP/2) are closed; floods past
//! the per-address and per-listener connection caps are closed at once while
//! other peers are still served; requests past the concurrency caps get 503
//! `M_LIMIT_EXCEEDED`; and `/send` answers a missing or garbled X-Matrix
//! header, or an oversized `Content-Length`, without reading the body.
//!
//! Peers are told apart by source address: every 127.0.0.0/8 address routes
//! to loopback on Linux, so a test binds its client sockets to 127.0.0.x.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{TestRelay, TestRelayOptions};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// A relay whose three listeners get the given `[*.listener]` lines. The
/// tables are appended after the `[federation]` keys; TOML allows a
/// super-table (`[client]`) to be defined after its sub-table.
async fn relay_with(federation: &str, client: &str, rpc: &str) -> TestRelay {
    let defaults = TestRelayOptions::default();
    TestRelay::spawn_with(TestRelayOptions {
        federation_extra: format!(
            "{}\n[federation.listener]\n{federation}\n[client.listener]\n{client}\n[rpc.listener]\n{rpc}\n",
            defaults.federation_extra
        ),
        ..defaults
    })
    .await
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .expect("listener URL is http://ip:port")
}

fn loopback(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// A TCP connection to `to` from `from` (any port).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind((from, 0).into())
        .expect("bind a loopback source");
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .expect("connect within 5 s")
        .expect("connect")
}

fn tls_connector(alpn: &[u8]) -> tokio_rustls::TlsConnector {
    courier::tls::install_crypto_provider();
    let ca = crate::support::relay::repo_root().join("certs/dev-ca.crt");
    let mut config = (*courier::tls::client_config(&[ca]).expect("client TLS config")).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// TLS to the federation listener from `from`, certificate checked for
/// `localhost`.
async fn tls_from(from: Ipv4Addr, to: SocketAddr) -> TlsStream<TcpStream> {
    let tcp = connect_from(from, to).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(
        Duration::from_secs(5),
        tls_connector(b"http/1.1").connect(name, tcp),
    )
    .await
    .expect("tls handshake within 5 s")
    .expect("tls handshake")
}

/// Reads until the peer closes; returns what arrived and how long it took.
/// Panics if the connection is still open after `within`.
async fn read_until_closed<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all)
        .await
        .unwrap_or_else(|_| panic!("connection still open after {within:?}"));
    (received, start.elapsed())
}

/// Asserts the connection stays open (no data, no close) for `period`.
async fn assert_still_open<S: AsyncRead + Unpin>(stream: &mut S, period: Duration, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(period, stream.read(&mut buf)).await {
        Err(_) => {}
        Ok(result) => panic!("{what}: expected an open, silent connection, got {result:?}"),
    }
}

/// One HTTP/1.1 request over `io`; status and JSON body.
async fn http1_request<I>(io: I, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, Value)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    try_http1_request(io, method, path, headers, Vec::new())
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
}

/// One HTTP/1.1 request with `body` over `io`, or why it got no answer
/// (10 s at most).
async fn try_http1_request<I>(
    io: I,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<(u16, Value), String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut request = hyper::Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no response: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}

/// Parses the status and JSON body of a raw HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Polls `GET path` over fresh connections from `from` until it answers 200
/// (a released slot is given back asynchronously); panics after 5 s.
async fn eventually_ok(from: Ipv4Addr, to: SocketAddr, tls: bool, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let headers = [("host", "localhost")];
        let attempt = if tls {
            let tcp = connect_from(from, to).await;
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
            match tls_connector(b"http/1.1").connect(name, tcp).await {
                Ok(stream) => try_http1_request(stream, "GET", path, &headers, Vec::new()).await,
                Err(error) => Err(format!("tls: {error}")),
            }
        } else {
            try_http1_request(
                connect_from(from, to).await,
                "GET",
                path,
                &headers,
                Vec::new(),
            )
            .await
        };
        if let Ok((200, body)) = attempt {
            return body;
        }
        assert!(Instant::now() < deadline, "GET {path} never succeeded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics_text(relay: &TestRelay) -> String {
    relay
        .http
        .get(
            &format!("{}/metrics", relay.rpc_url),
            Some(&relay.rpc_secret),
        )
        .await
        .text
}

const SHORT_HEADER: &str = "header_read_timeout_ms = 300\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_are_closed_on_every_listener() {
    let relay = relay_with(SHORT_HEADER, SHORT_HEADER, SHORT_HEADER).await;
    let half_sent: [(&str, &[u8]); 3] = [
        ("silent", b""),
        ("half a request line", b"GET /_matrix/client/versions HT"),
        ("half an HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
    ];
    // On the TLS listener: nothing, or a TLS record header announcing a
    // ClientHello that never comes.
    let half_handshake: [(&str, &[u8]); 2] = [
        ("silent", b""),
        ("half a ClientHello", &[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01]),
    ];
    let cases = [
        ("client", addr_of(&relay.client_url), &half_sent[..]),
        ("rpc", addr_of(&relay.rpc_url), &half_sent[..]),
        ("federation", relay.federation_addr, &half_handshake[..]),
    ];
    for (listener, addr, sends) in cases {
        for &(what, bytes) in sends {
            // The server's deadline starts after this instant, so the close
            // cannot come before it plus 300 ms.
            let start = Instant::now();
            let mut stream = connect_from(loopback(1), addr).await;
            stream.write_all(bytes).await.expect("write");
            read_until_closed(&mut stream, Duration::from_secs(5)).await;
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(300),
                "{listener}, {what}: closed after {took:?}, before the deadline"
            );
        }
    }

    // TLS completed, then nothing, or half a request line.
    for (what, bytes) in [
        ("tls then silent", &b""[..]),
        (
            "tls then half a line",
            &b"GET /_matrix/key/v2/server HT"[..],
        ),
    ] {
        let start = Instant::now();
        let mut stream = tls_from(loopback(1), relay.federation_addr).await;
        stream.write_all(bytes).await.expect("write");
        stream.flush().await.expect("flush");
        read_until_closed(&mut stream, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{what}: {took:?}");
    }

    // A prompt client is still served on each listener.
    let (status, _) = http1_request(
        connect_from(loopback(1), addr_of(&relay.client_url)).await,
        "GET",
        "/_matrix/client/versions",
        &[("host", "localhost")],
    )
    .await;
    assert_eq!(status, 200);
    let (status, doc) = http1_request(
        tls_from(loopback(1), relay.federation_addr).await,
        "GET",
        "/_matrix/key/v2/server",
        &[("host", relay.server_name.as_str())],
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    let bearer = format!("Bearer {}", relay.rpc_secret);
    let (status, _) = http1_request(
        connect_from(loopback(1), addr_of(&relay.rpc_url)).await,
        "GET",
        "/_courier/v1/destinations",
        &[("host", "localhost"), ("authorization", bearer.as_str())],
    )
    .await;
    assert_eq!(status, 200);

    let metrics = metrics_text(&relay).await;
    assert!(
        metrics.contains(
            "courier_listener_timeouts_total{listener=\"federation\",kind=\"first_request\"}"
        ),
        "{metrics}"
    );
}

/// Sends `head` (which declares `Content-Length: 1000000`) and then a byte
/// every 200 ms; returns the answer, read until the server closes.
async fn trickle<S>(stream: S, head: String) -> ((u16, Value), Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(stream);
    writer.write_all(head.as_bytes()).await.expect("head");
    writer.flush().await.expect("flush");
    let dribble = tokio::spawn(async move {
        for _ in 0..50 {
            if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (raw, _) = read_until_closed(&mut reader, Duration::from_secs(6)).await;
    dribble.abort();
    (parse_response(&raw), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_the_connection_closed() {
    let limits = "body_read_timeout_ms = 1000\nheader_read_timeout_ms = 5000\n";
    let relay = relay_with(limits, limits, limits).await;
    let alice = format!("@alice:{}", relay.server_name);
    relay.register_device(&alice, "ALICE", "alice-token").await;

    let client_head =
        "PUT /_matrix/client/v3/sendToDevice/m.test/t1 HTTP/1.1\r\nhost: localhost\r\n\
         authorization: Bearer alice-token\r\ncontent-type: application/json\r\n\
         content-length: 1000000\r\n\r\n{"
            .to_owned();
    let rpc_head = format!(
        "PUT /_courier/v1/devices/{}/BOB HTTP/1.1\r\nhost: localhost\r\n\
         authorization: Bearer {}\r\ncontent-type: application/json\r\n\
         content-length: 1000000\r\n\r\n{{",
        crate::support::relay::encode(&format!("@bob:{}", relay.server_name)),
        relay.rpc_secret
    );
    let sig = "A".repeat(86);
    let federation_head = format!(
        "PUT /_matrix/federation/v1/send/t1 HTTP/1.1\r\nhost: {us}\r\n\
         authorization: X-Matrix origin=\"remote.example\",destination=\"{us}\",key=\"ed25519:a\",sig=\"{sig}\"\r\n\
         content-type: application/json\r\ncontent-length: 1000000\r\n\r\n{{",
        us = relay.server_name
    );

    let client = connect_from(loopback(1), addr_of(&relay.client_url)).await;
    let rpc = connect_from(loopback(1), addr_of(&relay.rpc_url)).await;
    let federation = tls_from(loopback(1), relay.federation_addr).await;
    let answers = [
        ("client", trickle(client, client_head).await),
        ("rpc", trickle(rpc, rpc_head).await),
        ("federation", trickle(federation, federation_head).await),
    ];
    for (listener, ((status, body), took)) in answers {
        assert_eq!(status, 408, "{listener}: {body}");
        assert_eq!(body["errcode"], "M_UNKNOWN", "{listener}: {body}");
        // The deadline starts when the head arrives, after `start`.
        assert!(
            took >= Duration::from_millis(1000),
            "{listener}: answered after {took:?}, before the body deadline"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    // The header timer (5 s) is far off: what closes these is the idle timer.
    let limits = "idle_timeout_ms = 400\nheader_read_timeout_ms = 5000\n";
    let relay = relay_with(limits, limits, limits).await;
    let client = addr_of(&relay.client_url);

    // HTTP/1.1 keep-alive.
    let io = TokioIo::new(connect_from(loopback(1), client).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("http/1.1 handshake");
    let closed = tokio::spawn(conn);
    let request = hyper::Request::get("/_matrix/client/versions")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    // The connection goes idle after this instant: it cannot close before
    // it plus 400 ms.
    let asked = Instant::now();
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
    tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .expect("the idle HTTP/1.1 connection is closed within 3 s")
        .expect("connection task")
        .ok();
    assert!(asked.elapsed() >= Duration::from_millis(400));

    // HTTP/2 with prior knowledge: GOAWAY, then close.
    let io = TokioIo::new(connect_from(loopback(1), client).await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("h2 handshake");
    let closed = tokio::spawn(conn);
    let request = hyper::Request::get("http://localhost/_matrix/client/versions")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let asked = Instant::now();
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
    tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .expect("the idle HTTP/2 connection is closed within 3 s")
        .expect("connection task")
        .ok();
    assert!(asked.elapsed() >= Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_refused_while_others_are_served() {
    let limits =
        "max_connections = 20\nmax_connections_per_ip = 4\nheader_read_timeout_ms = 20000\n";
    let relay = relay_with(limits, limits, limits).await;
    let cases = [
        (
            "client",
            addr_of(&relay.client_url),
            false,
            "/_matrix/client/versions",
            loopback(10),
        ),
        (
            "federation",
            relay.federation_addr,
            true,
            "/_matrix/key/v2/server",
            loopback(12),
        ),
    ];
    for (listener, addr, tls, path, flooder) in cases {
        // Counted at accept: the flood need not even start TLS.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(connect_from(flooder, addr).await);
        }
        for n in 0..2 {
            let mut excess = connect_from(flooder, addr).await;
            let (bytes, _) = read_until_closed(&mut excess, Duration::from_secs(2)).await;
            assert!(
                bytes.is_empty(),
                "{listener}: excess connection {n} closed without an answer"
            );
        }
        // Another address is served while the flood is held open.
        let body = eventually_ok(loopback(11), addr, tls, path).await;
        assert!(body.is_object(), "{listener}: {body}");
        for (n, stream) in held.iter_mut().enumerate() {
            let what = format!("{listener}: held {n}");
            assert_still_open(stream, Duration::from_millis(100), &what).await;
        }

        // Once the flood goes, its address is served again.
        drop(held);
        eventually_ok(flooder, addr, tls, path).await;

        let metrics = metrics_text(&relay).await;
        let series = format!(
            "courier_listener_refused_total{{listener=\"{listener}\",reason=\"max_connections_per_ip\"}}"
        );
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tls_listener_closes_new_connections_and_recovers() {
    let federation =
        "max_connections = 5\nmax_connections_per_ip = 2\nheader_read_timeout_ms = 20000\n";
    let relay = relay_with(federation, "", "").await;
    let fed = relay.federation_addr;

    // Five connections from three addresses fill the listener.
    let mut held = Vec::new();
    for last in [20, 20, 21, 21, 22] {
        held.push(connect_from(loopback(last), fed).await);
    }
    // A sixth, from a fresh address, is closed at once: no TLS handshake.
    let tcp = connect_from(loopback(23), fed).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    let handshake = tokio::time::timeout(
        Duration::from_secs(2),
        tls_connector(b"http/1.1").connect(name, tcp),
    )
    .await
    .expect("refused within 2 s");
    assert!(handshake.is_err(), "a full listener must not serve a sixth");
    for (n, stream) in held.iter_mut().enumerate() {
        assert_still_open(stream, Duration::from_millis(100), &format!("held {n}")).await;
    }

    drop(held);
    let doc = eventually_ok(loopback(23), fed, true, "/_matrix/key/v2/server").await;
    assert_eq!(doc["server_name"], relay.server_name.as_str());

    let metrics = metrics_text(&relay).await;
    assert!(
        metrics.contains(
            "courier_listener_refused_total{listener=\"federation\",reason=\"max_connections\"}"
        ),
        "{metrics}"
    );
}

/// Starts a 30 s `/sync` long-poll from `from`.
fn long_poll(
    from: Ipv4Addr,
    client: SocketAddr,
    token: &'static str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    tokio::spawn(async move {
        let bearer = format!("Bearer {token}");
        // A poll that races the test's own requests for the last slot may be
        // refused; it asks again until it is admitted (10 s at most).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = http1_request(
                connect_from(from, client).await,
                "GET",
                "/_matrix/client/v3/sync?since=td_0&timeout=30000",
                &[("host", "localhost"), ("authorization", bearer.as_str())],
            )
            .await;
            if status != 503 || Instant::now() > deadline {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Polls `GET /versions` from `from` until it gets 503; returns that body.
async fn until_refused(from: Ipv4Addr, client: SocketAddr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http1_request(
            connect_from(from, client).await,
            "GET",
            "/_matrix/client/versions",
            &[("host", "localhost")],
        )
        .await;
        if status == 503 {
            return body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_concurrency_caps_get_503_limit_exceeded() {
    let client_limits = "max_concurrent_requests = 3\nmax_concurrent_requests_per_ip = 2\n";
    let relay = relay_with("", client_limits, "").await;
    let alice = format!("@alice:{}", relay.server_name);
    for (device, token) in [("A1", "token-a1"), ("A2", "token-a2"), ("A3", "token-a3")] {
        relay.register_device(&alice, device, token).await;
    }
    let client = addr_of(&relay.client_url);

    // Two long-polls from .30 fill that address's share.
    let polls = vec![
        long_poll(loopback(30), client, "token-a1"),
        long_poll(loopback(30), client, "token-a2"),
    ];
    let refused = until_refused(loopback(30), client).await;
    assert_eq!(refused["errcode"], "M_LIMIT_EXCEEDED", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().is_some(), "{refused}");

    // Another address still gets an answer, and then fills the listener.
    let (status, _) = http1_request(
        connect_from(loopback(31), client).await,
        "GET",
        "/_matrix/client/versions",
        &[("host", "localhost")],
    )
    .await;
    assert_eq!(status, 200);
    let mut polls = polls;
    polls.push(long_poll(loopback(31), client, "token-a3"));
    let refused = until_refused(loopback(32), client).await;
    assert_eq!(refused["errcode"], "M_LIMIT_EXCEEDED", "{refused}");

    // The retry header is on the raw answer too.
    let mut stream = connect_from(loopback(32), client).await;
    stream
        .write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let (raw, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 503"), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");

    // The admitted long-polls are answered when a message arrives (sent
    // through the RPC listener: the client listener is full).
    let r = relay
        .http
        .post_json(
            &format!("{}/_courier/v1/send_to_device", relay.rpc_url),
            Some(&relay.rpc_secret),
            &json!({
                "sender": alice,
                "type": "m.test",
                "txn_id": "wake",
                "messages": { alice.as_str(): { "*": { "n": 1 } } },
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for poll in polls {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), poll)
            .await
            .expect("woken within 10 s")
            .expect("long-poll task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["to_device"]["events"][0]["content"]["n"], 1, "{body}");
    }
    let (status, _) = http1_request(
        connect_from(loopback(32), client).await,
        "GET",
        "/_matrix/client/versions",
        &[("host", "localhost")],
    )
    .await;
    assert_eq!(status, 200, "slots come back once the long-polls end");

    let metrics = metrics_text(&relay).await;
    for reason in ["max_concurrent_requests", "max_concurrent_requests_per_ip"] {
        let series =
            format!("courier_listener_refused_total{{listener=\"client\",reason=\"{reason}\"}}");
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}

/// Writes `head` over TLS and reads the answer; the body is never sent.
async fn send_head_only(relay: &TestRelay, head: String) -> (u16, Value) {
    let mut stream = tls_from(loopback(1), relay.federation_addr).await;
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.flush().await.expect("flush");
    // The answer comes with `Connection: close` or the body stays unread:
    // either way it arrives long before the 60 s body deadline.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw);
                    if let Some((head, body)) = text.split_once("\r\n\r\n")
                        && serde_json::from_str::<Value>(body).is_ok()
                        && head.starts_with("HTTP/1.1")
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("answered within 5 s without the body");
    parse_response(&raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_is_refused_from_its_headers_before_the_body_is_read() {
    let relay = relay_with("body_read_timeout_ms = 60000\n", "", "").await;
    let us = relay.server_name.clone();
    let put = |auth: &str, length: u64| {
        format!(
            "PUT /_matrix/federation/v1/send/t1 HTTP/1.1\r\nhost: {us}\r\n{auth}\
             content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        )
    };
    let sig = "A".repeat(86);
    let good_syntax = format!(
        "authorization: X-Matrix origin=\"remote.example\",destination=\"{us}\",key=\"ed25519:a\",sig=\"{sig}\"\r\n"
    );

    // 10 MB declared (under the 12.5 MiB limit), nothing sent.
    let (status, body) = send_head_only(&relay, put("", 10_000_000)).await;
    assert_eq!(
        (status, body["errcode"].clone()),
        (401, json!("M_UNAUTHORIZED")),
        "{body}"
    );
    let (status, body) = send_head_only(
        &relay,
        put("authorization: X-Matrix garbage\r\n", 10_000_000),
    )
    .await;
    assert_eq!(
        (status, body["errcode"].clone()),
        (400, json!("M_UNAUTHORIZED")),
        "{body}"
    );
    // Over the limit: 413 at once, whatever the header says.
    let (status, body) = send_head_only(&relay, put(&good_syntax, 20_000_000)).await;
    assert_eq!(
        (status, body["errcode"].clone()),
        (413, json!("M_TOO_LARGE")),
        "{body}"
    );
    // A sender that does send its oversized body still reads the 413: the
    // rest is drained, not reset under the answer.
    let stream = tls_from(loopback(1), relay.federation_addr).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let auth = good_syntax
        .trim_start_matches("authorization: ")
        .trim_end()
        .to_owned();
    let request = hyper::Request::put("/_matrix/federation/v1/send/t2")
        .header("host", us.as_str())
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(vec![
            b' ';
            14_000_000
        ])))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
        .await
        .expect("answer within 20 s")
        .expect("an answer, not a reset");
    assert_eq!(response.status(), 413);

    // A GET takes no body: more than a little is refused too.
    let get = format!(
        "GET /_matrix/key/v2/server HTTP/1.1\r\nhost: {us}\r\ncontent-length: 5000\r\n\r\n"
    );
    let (status, body) = send_head_only(&relay, get).await;
    assert_eq!(
        (status, body["errcode"].clone()),
        (413, json!("M_TOO_LARGE")),
        "{body}"
    );
}

/// Sends the HTTP/2 client preface and an empty SETTINGS frame; returns the
/// parameters (id, value) of the server's first SETTINGS frame.
async fn server_h2_settings<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Vec<(u16, u32)> {
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    stream.flush().await.expect("flush");
    let read = async {
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await.expect("frame header");
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            stream
                .read_exact(&mut payload)
                .await
                .expect("frame payload");
            let (kind, flags) = (head[3], head[4]);
            if kind == 0x4 && flags & 0x1 == 0 {
                return payload
                    .chunks_exact(6)
                    .map(|p| {
                        (
                            u16::from_be_bytes([p[0], p[1]]),
                            u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                        )
                    })
                    .collect::<Vec<_>>();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("server SETTINGS within 5 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_carry_the_stream_and_header_limits_and_big_heads_are_refused() {
    let limits = "h2_max_concurrent_streams = 7\nmax_header_bytes = 16384\n";
    let relay = relay_with(limits, limits, "").await;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;

    let mut plain = connect_from(loopback(1), addr_of(&relay.client_url)).await;
    let settings = server_h2_settings(&mut plain).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(MAX_HEADER_LIST_SIZE, 16384)),
        "{settings:?}"
    );

    let tcp = connect_from(loopback(1), relay.federation_addr).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    let mut tls = tls_connector(b"h2")
        .connect(name, tcp)
        .await
        .expect("tls handshake with ALPN h2");
    let settings = server_h2_settings(&mut tls).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
        "{settings:?}"
    );

    // The default RPC listener offers 32 streams.
    let mut rpc = connect_from(loopback(1), addr_of(&relay.rpc_url)).await;
    let settings = server_h2_settings(&mut rpc).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 32)),
        "{settings:?}"
    );

    // An HTTP/1.1 head larger than the limit is refused, not buffered.
    let big = "x".repeat(40_000);
    let mut stream = connect_from(loopback(1), addr_of(&relay.client_url)).await;
    stream
        .write_all(
            format!(
                "GET /_matrix/client/versions HTTP/1.1\r\nhost: localhost\r\nx-big: {big}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let (raw, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_long_polls_and_closes_idle_connections() {
    let relay_limits = "header_read_timeout_ms = 60000\n";
    // One request per address on the client listener: a 503 from the
    // long-poll's address shows the long-poll is in flight.
    let client_limits = "header_read_timeout_ms = 60000\nmax_concurrent_requests_per_ip = 1\n";
    let mut relay = relay_with(relay_limits, client_limits, relay_limits).await;
    let alice = format!("@alice:{}", relay.server_name);
    relay.register_device(&alice, "A1", "token-a1").await;
    let client = addr_of(&relay.client_url);
    let poll = tokio::spawn(async move {
        http1_request(
            connect_from(loopback(40), client).await,
            "GET",
            "/_matrix/client/v3/sync?since=td_0&timeout=30000",
            &[("host", "localhost"), ("authorization", "Bearer token-a1")],
        )
        .await
    });
    let mut silent = connect_from(loopback(41), client).await;
    let mut silent_tls = tls_from(loopback(41), relay.federation_addr).await;
    until_refused(loopback(40), client).await;

    let started = Instant::now();
    relay.stop().await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long-poll is answered on shutdown")
        .expect("poll task");
    assert_eq!(status, 200, "{body}");
    read_until_closed(&mut silent, Duration::from_secs(5)).await;
    read_until_closed(&mut silent_tls, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "drained within the drain timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_body_budget_get_503_until_it_is_given_back() {
    let limits = "max_body_bytes_in_flight = 1000000\n";
    let relay = relay_with("", limits, "").await;
    let alice = format!("@alice:{}", relay.server_name);
    relay.register_device(&alice, "A1", "token-a1").await;
    let client = addr_of(&relay.client_url);
    let path = "/_matrix/client/v3/sendToDevice/m.test/{txn}";
    let headers = [
        ("host", "localhost"),
        ("authorization", "Bearer token-a1"),
        ("content-type", "application/json"),
    ];

    // A holds 600 kB of the budget: its head is in, its body never comes.
    let mut holder = connect_from(loopback(50), client).await;
    holder
        .write_all(
            b"PUT /_matrix/client/v3/sendToDevice/m.test/held HTTP/1.1\r\nhost: localhost\r\n\
              authorization: Bearer token-a1\r\ncontent-type: application/json\r\n\
              content-length: 600000\r\n\r\n{",
        )
        .await
        .expect("head");

    // Another 600 kB body, from another address, does not fit.
    let big = vec![b' '; 600_000];
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let (status, body) = try_http1_request(
            connect_from(loopback(51), client).await,
            "PUT",
            &path.replace("{txn}", "big"),
            &headers,
            big.clone(),
        )
        .await
        .expect("an answer");
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never refused: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused["errcode"], "M_LIMIT_EXCEEDED", "{refused}");

    // A small body still fits.
    let (status, body) = try_http1_request(
        connect_from(loopback(51), client).await,
        "PUT",
        &path.replace("{txn}", "small"),
        &headers,
        br#"{"messages":{}}"#.to_vec(),
    )
    .await
    .expect("an answer");
    assert_eq!(status, 200, "{body}");

    // Once A goes, its share comes back.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = try_http1_request(
            connect_from(loopback(51), client).await,
            "PUT",
            &path.replace("{txn}", "big2"),
            &headers,
            big.clone(),
        )
        .await
        .expect("an answer");
        if status != 503 {
            assert_eq!(body["errcode"], "M_NOT_JSON", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the budget never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = metrics_text(&relay).await;
    assert!(
        metrics.contains(
            "courier_listener_refused_total{listener=\"client\",reason=\"max_body_bytes_in_flight\"}"
        ),
        "{metrics}"
    );
}

/// A free loopback port (bound, read, released).
async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// Kills the child process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one keep-alive `GET /versions` on `stream`; true if the answer
/// arrived within `within`.
async fn answered_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream
        .write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write request");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    if raw.ends_with(b"}") && raw.starts_with(b"HTTP/1.1 200") {
                        return true;
                    }
                }
            }
        }
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

/// `courier serve` as a child process under `ulimit -n 48` (it needs about
/// 25 descriptors idle), so that held connections exhaust its descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off_and_recovers() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let key = courier::keys::ServerSigningKey::generate("test");
    std::fs::write(dir.path().join("signing.key"), key.to_file_contents()).expect("key written");
    let (fed, client, rpc) = (free_port().await, free_port().await, free_port().await);
    let root = crate::support::relay::repo_root();
    let config = format!(
        r#"
server_name = "localhost:{fed}"
signing_key_path = "{dir}/signing.key"
[federation]
bind = "127.0.0.1:{fed}"
tls_cert = "{root}/certs/localhost.crt"
tls_key = "{root}/certs/localhost.key"
[client]
bind = "127.0.0.1:{client}"
[client.listener]
header_read_timeout_ms = 60000
idle_timeout_ms = 60000
[rpc]
bind = "127.0.0.1:{rpc}"
secret = "emfile-test-secret"
[store]
sqlite = "{dir}/courier.db"
"#,
        dir = dir.path().display(),
        root = root.display(),
    );
    let config_path = dir.path().join("courier.toml");
    std::fs::write(&config_path, config).expect("config written");
    let log_path = dir.path().join("courier.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg(r#"ulimit -n 48 && exec "$0" serve --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_courier"))
        .arg(&config_path);
    for (name, _) in std::env::vars() {
        if name.starts_with("COURIER_") {
            command.env_remove(name);
        }
    }
    let _child = KillOnDrop(
        command
            .env("COURIER_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn courier serve"),
    );
    let client_addr: SocketAddr = ([127, 0, 0, 1], client).into();
    let rpc_addr: SocketAddr = ([127, 0, 0, 1], rpc).into();
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut probe) = TcpStream::connect(client_addr).await
            && answered_within(&mut probe, Duration::from_secs(2)).await
        {
            break;
        }
        assert!(
            Instant::now() < ready_by,
            "courier serve did not start:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Hold answered connections open until one is not answered: it waits
    // in the backlog because accept fails for want of a descriptor.
    let mut held = Vec::new();
    let mut stalled = None;
    for _ in 0..100 {
        let mut stream = connect_from(loopback(1), client_addr).await;
        if answered_within(&mut stream, Duration::from_secs(2)).await {
            held.push(stream);
        } else {
            stalled = Some(stream);
            break;
        }
    }
    let mut stalled = stalled.expect("48 descriptors ran out within 100 connections");
    assert!(
        held.len() >= 5,
        "only {} connections before running out",
        held.len()
    );

    // Closing the held connections frees descriptors: the stalled one is
    // accepted on a later retry and its request answered.
    let held_count = held.len();
    drop(held);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = async {
        while !(raw.starts_with(b"HTTP/1.1 200") && raw.ends_with(b"}")) {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("the stalled connection is served once descriptors are free");
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // The failed accepts were retried with backoff, not in a spin: the
    // stall of about two seconds allows about ten tries (5 ms doubling to
    // 1 s); a fixed 50 ms pause would make forty.
    let bearer = "Bearer emfile-test-secret";
    let metrics = try_http1_metrics(rpc_addr, bearer).await;
    let errors: u64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("courier_listener_accept_errors_total{listener=\"client\"} ")
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accept error counted:\n{metrics}"));
    assert!(
        (1..=25).contains(&errors),
        "{errors} failed accepts (after {held_count} connections)"
    );
}

/// `GET /metrics` as text (the JSON helpers drop non-JSON bodies).
async fn try_http1_metrics(rpc: SocketAddr, bearer: &str) -> String {
    let io = TokioIo::new(connect_from(loopback(1), rpc).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let request = hyper::Request::get("/metrics")
        .header("host", "localhost")
        .header("authorization", bearer)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("metrics within 10 s")
        .expect("metrics response");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("metrics body")
        .to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}
