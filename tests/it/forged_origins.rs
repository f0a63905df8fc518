//! Forged X-Matrix origins cost bounded work: requests in the name of
//! servers whose keys Courier does not hold reach at most
//! `key_fetch_concurrency` outbound connections at once, one claimed name
//! pays its key-lookup rate before any fetch and is fetched once, spelling
//! variants of a name share its failure and its `origin_deny` entry, and a
//! request with more X-Matrix headers than a sender needs is refused before
//! any key is looked up. The "remote servers" are a tarpit on loopback that
//! accepts TCP connections, counts them and never answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{TestRelay, TestRelayOptions};
use hyper::body::Bytes;
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// A TCP listener that holds every connection open without a byte of reply.
struct Tarpit {
    port: u16,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

impl Tarpit {
    async fn start() -> Tarpit {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tarpit");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (o, a) = (open.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                tokio::spawn(async move {
                    let mut sink = [0u8; 1024];
                    // Until the relay gives up and closes (or 60 s).
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                    })
                    .await;
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Tarpit {
            port,
            open,
            accepted,
        }
    }
}

struct Reply {
    status: u16,
    json: Value,
}

/// `PUT /_matrix/federation/v1/send/{txn}` over TLS with the given
/// `Authorization` header values and a small JSON body.
async fn put_send(relay: &TestRelay, txn: &str, authorization: &[String]) -> Reply {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    headers.extend(authorization.iter().map(|v| ("Authorization", v.clone())));
    let (status, json) = crate::support::tls_client::https_request(
        relay.federation_addr,
        "localhost",
        &relay.server_name,
        "PUT",
        &format!("/_matrix/federation/v1/send/{txn}"),
        &headers,
        Some(Bytes::from_static(br#"{"pdus":[],"edus":[]}"#)),
    )
    .await;
    Reply { status, json }
}

fn forged(origin: &str, destination: &str) -> String {
    format!(
        "X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"ed25519:a\",sig=\"c2lnbmF0dXJl\""
    )
}

/// Test relay options with `extra` in `[federation]`. All test requests
/// come from 127.0.0.1, so the per-address caps of the federation listener
/// are raised to the listener's (its own test is `listener_limits`).
fn options(extra: &str) -> TestRelayOptions {
    let mut options = TestRelayOptions::default();
    options.federation_extra.push_str(extra);
    options.federation_extra.push_str(
        "[federation.listener]\nmax_connections_per_ip = 400\nmax_concurrent_requests_per_ip = 128\n",
    );
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_origins_reach_at_most_the_fetch_concurrency_in_outbound_connections() {
    let tarpit = Tarpit::start().await;
    let relay = Arc::new(
        TestRelay::spawn_with(options(
            "key_fetch_concurrency = 4\nkey_fetch_timeout_ms = 4000\n",
        ))
        .await,
    );
    // 40 requests at once, each in the name of another server, all of
    // which resolve to the tarpit.
    let requests: Vec<_> = (0..40)
        .map(|i| {
            let relay = relay.clone();
            let origin = format!("r{i}.localhost:{}", tarpit.port);
            tokio::spawn(async move {
                let header = forged(&origin, &relay.server_name);
                put_send(&relay, &format!("t{i}"), &[header]).await
            })
        })
        .collect();
    // The first four fetches hang in the tarpit for 4 s; while they do, no
    // other lookup may open a connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tarpit.accepted.load(Ordering::SeqCst) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fetches never reached the tarpit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        tarpit.accepted.load(Ordering::SeqCst),
        4,
        "while four fetches hang, the other 36 lookups wait"
    );
    assert_eq!(tarpit.open.load(Ordering::SeqCst), 4);

    for request in requests {
        let reply = request.await.expect("no panic");
        assert_eq!(reply.status, 401, "{}", reply.json);
        assert_eq!(reply.json["errcode"], "M_UNAUTHORIZED");
    }
    let total = tarpit.accepted.load(Ordering::SeqCst);
    assert!(
        total < 20,
        "{total} connections for 40 forged origins: lookups that found no slot in time must not fetch"
    );
    // The relay gave its connections up; nothing is left open.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tarpit.open.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tarpit connections still open",
            tarpit.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forged_name_pays_its_lookup_rate_first_and_is_fetched_once() {
    let tarpit = Tarpit::start().await;
    let relay = Arc::new(
        TestRelay::spawn_with(options(
            "inbound_rate_per_origin = 5\nkey_fetch_timeout_ms = 1000\n",
        ))
        .await,
    );
    let origin = format!("flood.localhost:{}", tarpit.port);
    let started = tokio::time::Instant::now();
    let requests = (0..30).map(|i| {
        let relay = relay.clone();
        let header = forged(&origin, &relay.server_name);
        tokio::spawn(async move { put_send(&relay, &format!("f{i}"), &[header]).await })
    });
    let requests: Vec<_> = requests.collect();
    let mut limited = 0;
    for request in requests {
        let reply = request.await.expect("no panic");
        match reply.status {
            429 => {
                assert_eq!(reply.json["errcode"], "M_LIMIT_EXCEEDED");
                limited += 1;
            }
            401 => assert_eq!(reply.json["errcode"], "M_UNAUTHORIZED"),
            other => panic!("unexpected {other}: {}", reply.json),
        }
    }
    // Burst 10, about 3 more held within the half-second shaping window,
    // then 5 a second for as long as the requests took to arrive.
    let admitted = 30 - limited;
    let allowed = 13 + (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(limited > 0, "30 lookups at once exceed the burst of 10");
    assert!(
        admitted <= allowed,
        "{admitted} admitted, at most {allowed}"
    );
    assert_eq!(
        tarpit.accepted.load(Ordering::SeqCst),
        1,
        "one fetch for one name"
    );

    // Spellings of the same host share its failure: no new fetch.
    for (i, variant) in [
        format!("FLOOD.localhost:{}", tarpit.port),
        format!("flood.localhost.:{}", tarpit.port),
    ]
    .iter()
    .enumerate()
    {
        let reply = put_send(
            &relay,
            &format!("v{i}"),
            &[forged(variant, &relay.server_name)],
        )
        .await;
        assert!(
            reply.status == 401 || reply.status == 429,
            "{variant}: {}",
            reply.status
        );
    }
    assert_eq!(
        tarpit.accepted.load(Ordering::SeqCst),
        1,
        "variants of the name are not fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_denied_origin_is_denied_and_extra_headers_are_refused() {
    let relay = TestRelay::spawn_with(options("origin_deny = [\"fake.example\"]\n")).await;
    for origin in [
        "fake.example",
        "FAKE.example",
        "fake.example.",
        "fake.example:8448",
        "Fake.Example.:9000",
    ] {
        let reply = put_send(&relay, "d", &[forged(origin, &relay.server_name)]).await;
        assert_eq!(reply.status, 403, "{origin}: {}", reply.json);
        assert_eq!(reply.json["errcode"], "M_FORBIDDEN");
    }
    // Another server is not denied (it fails on its key instead).
    let reply = put_send(
        &relay,
        "d",
        &[forged("other.invalid:1", &relay.server_name)],
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.json);

    // Five X-Matrix headers: malformed (400) before any key is looked up.
    let header = forged("other.invalid:1", &relay.server_name);
    let reply = put_send(&relay, "h", &vec![header; 5]).await;
    assert_eq!(reply.status, 400, "{}", reply.json);
    assert_eq!(reply.json["errcode"], "M_UNAUTHORIZED");
}

/// A key fetcher whose fetches never finish (until the ring's timeout).
struct HangingFetcher {
    started: AtomicUsize,
}

impl courier::federation::keyring::KeyFetcher for HangingFetcher {
    fn fetch_server_keys<'a>(
        &'a self,
        _server_name: &'a courier::identifiers::ServerName,
    ) -> courier::federation::keyring::FetchFuture<'a> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Err("unreachable".to_owned())
        })
    }

    fn query_notary<'a>(
        &'a self,
        _notary: &'a courier::identifiers::ServerName,
        _server_name: &'a courier::identifiers::ServerName,
    ) -> courier::federation::keyring::FetchFuture<'a> {
        Box::pin(async { Err("no notaries here".to_owned()) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_ring_stays_within_its_bound_even_while_every_entry_is_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = courier::store::sqlite::SqliteStore::open(&dir.path().join("keys.db"))
        .await
        .expect("store");
    let fetcher = Arc::new(HangingFetcher {
        started: AtomicUsize::new(0),
    });
    let ring = Arc::new(
        courier::federation::keyring::KeyRing::with_fetcher(
            Arc::new(store),
            fetcher.clone(),
            Duration::from_secs(30),
        )
        .with_fetch_concurrency(100)
        .with_max_servers(8),
    );
    // Eight lookups hang in flight and hold their entries.
    let hanging: Vec<_> = (0..8)
        .map(|i| {
            let ring = ring.clone();
            tokio::spawn(
                async move { ring.verify_key(&format!("h{i}.example"), "ed25519:a").await },
            )
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fetcher.started.load(Ordering::SeqCst) < 8 {
        assert!(tokio::time::Instant::now() < deadline, "fetches started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A ninth server is refused at once instead of growing the map.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        ring.verify_key("new.example", "ed25519:a"),
    )
    .await
    .expect("answered at once")
    .expect_err("no room");
    assert!(
        refused.to_string().contains("too many servers"),
        "{refused}"
    );
    assert_eq!(ring.servers_in_memory(), 8);
    assert_eq!(fetcher.started.load(Ordering::SeqCst), 8, "no fetch for it");
    for lookup in hanging {
        lookup.abort();
    }
}
