//! Server discovery (SPEC §6) and the outbound connection rules, against
//! real servers on loopback: the fake remote over TLS for `.well-known` and
//! requests, an in-process hickory DNS server for SRV, and injected answers
//! for names that must never be contacted (the denylist refuses them before
//! any socket is opened).

use crate::support::dns_server;
use crate::support::fake_remote;
use crate::support::outbound_env;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use courier::federation::outbound::client::FederationClient;
use courier::federation::outbound::client_error::ClientError;
use courier::federation::outbound::connector::Endpoint;
use fake_remote::{FakeRemote, WellKnown};
use outbound_env::{
    MapResolver, addrs, client, dns, ip_name, name, setup, test_signing_key, well_known,
};

#[tokio::test]
async fn ip_literals_connect_directly_without_sni() {
    let s = setup();
    let (client, resolver) = client(&s.config, MapResolver::default());
    let table = [
        ("1.2.3.4", "1.2.3.4:8448", "1.2.3.4", "1.2.3.4"),
        ("1.2.3.4:99", "1.2.3.4:99", "1.2.3.4", "1.2.3.4:99"),
        (
            "[2001:db8::1]",
            "[2001:db8::1]:8448",
            "2001:db8::1",
            "[2001:db8::1]",
        ),
        (
            "[2001:db8::1]:443",
            "[2001:db8::1]:443",
            "2001:db8::1",
            "[2001:db8::1]:443",
        ),
    ];
    for (server, addr, tls_ip, host) in table {
        let endpoint = client.resolve(&name(server)).await.expect(server);
        assert_eq!(
            endpoint,
            Endpoint {
                addrs: addrs(&[addr]),
                tls_name: ip_name(tls_ip),
                host_header: host.to_owned(),
            },
            "{server}"
        );
    }
    assert!(resolver.lookups().is_empty(), "IP literals need no DNS");
}

#[tokio::test]
async fn explicit_port_uses_address_records_and_the_hostname() {
    let s = setup();
    let (client, resolver) = client(
        &s.config,
        MapResolver::default().ip("host.test", &["192.0.2.10", "2001:db8::10"]),
    );
    let endpoint = client
        .resolve(&name("host.test:1234"))
        .await
        .expect("resolves");
    assert_eq!(
        endpoint,
        Endpoint {
            addrs: addrs(&["192.0.2.10:1234", "[2001:db8::10]:1234"]),
            tls_name: dns("host.test"),
            host_header: "host.test:1234".to_owned(),
        }
    );
    // No .well-known and no SRV for an explicit port.
    assert_eq!(resolver.lookups(), vec!["IP host.test".to_owned()]);
}

#[tokio::test]
async fn well_known_delegation_table() {
    let mut s = setup();
    let fake = FakeRemote::start(
        &s.ca,
        &[
            "withport.test",
            "noport.test",
            "legacy.test",
            "plain.test",
            "toip.test",
        ],
    )
    .await;
    s.config.well_known_port = fake.port();
    fake.set_well_known(
        "withport.test",
        well_known(r#"{"m.server":"delegated.test:4321"}"#),
    );
    fake.set_well_known("noport.test", well_known(r#"{"m.server":"deleg2.test"}"#));
    fake.set_well_known("legacy.test", well_known(r#"{"m.server":"deleg3.test"}"#));
    fake.set_well_known("plain.test", well_known(r#"{"m.server":"deleg4.test"}"#));
    fake.set_well_known(
        "toip.test",
        well_known(r#"{"m.server":"[2001:db8::7]:99"}"#),
    );
    let resolver = MapResolver::default()
        .wildcard("test", &["127.0.0.1"])
        .ip("delegated.test", &["192.0.2.1"])
        .srv("_matrix-fed._tcp.deleg2.test", "target2.example", 7000)
        .ip("target2.example", &["192.0.2.2"])
        .srv("_matrix._tcp.deleg3.test", "target3.example", 7001)
        .ip("target3.example", &["192.0.2.3"])
        .ip("deleg4.test", &["192.0.2.4"])
        // These must be ignored: no recursion into the original's SRV.
        .srv("_matrix-fed._tcp.withport.test", "wrong.example", 1)
        .srv("_matrix-fed._tcp.noport.test", "wrong.example", 1);
    let (client, _) = client(&s.config, resolver);

    let table = [
        // 3.2: delegated hostname with port.
        (
            "withport.test",
            &["192.0.2.1:4321"][..],
            dns("delegated.test"),
            "delegated.test:4321",
        ),
        // 3.3: delegated hostname, SRV _matrix-fed._tcp.
        (
            "noport.test",
            &["192.0.2.2:7000"][..],
            dns("deleg2.test"),
            "deleg2.test",
        ),
        // 3.4: delegated hostname, deprecated SRV _matrix._tcp.
        (
            "legacy.test",
            &["192.0.2.3:7001"][..],
            dns("deleg3.test"),
            "deleg3.test",
        ),
        // 3.5: delegated hostname, no SRV: 8448.
        (
            "plain.test",
            &["192.0.2.4:8448"][..],
            dns("deleg4.test"),
            "deleg4.test",
        ),
        // 3.1: delegated to an IP literal.
        (
            "toip.test",
            &["[2001:db8::7]:99"][..],
            ip_name("2001:db8::7"),
            "[2001:db8::7]:99",
        ),
    ];
    for (server, want_addrs, tls_name, host) in table {
        let endpoint = client.resolve(&name(server)).await.expect(server);
        assert_eq!(
            endpoint,
            Endpoint {
                addrs: addrs(want_addrs),
                tls_name,
                host_header: host.to_owned(),
            },
            "{server}"
        );
    }
}

#[tokio::test]
async fn well_known_failures_fall_through_to_srv_then_8448_and_are_cached() {
    let mut s = setup();
    let names = [
        "nowk.test",
        "badjson.test",
        "badname.test",
        "loop.test",
        "loop2.test",
    ];
    let fake = FakeRemote::start(&s.ca, &names).await;
    s.config.well_known_port = fake.port();
    // 404 (no answer scripted), invalid JSON, a bad m.server, a redirect loop.
    fake.set_well_known("badjson.test", well_known("{not json"));
    fake.set_well_known("badname.test", well_known(r#"{"m.server":"bad name!"}"#));
    let port = fake.port();
    fake.set_well_known(
        "loop.test",
        WellKnown {
            status: 302,
            body: String::new(),
            headers: vec![(
                "location".to_owned(),
                format!("https://loop2.test:{port}/.well-known/matrix/server"),
            )],
        },
    );
    fake.set_well_known(
        "loop2.test",
        WellKnown {
            status: 301,
            body: String::new(),
            headers: vec![(
                "location".to_owned(),
                "/.well-known/matrix/server?again".to_owned(),
            )],
        },
    );
    let resolver = MapResolver::default()
        .wildcard("test", &["127.0.0.1"])
        .srv("_matrix-fed._tcp.nowk.test", "t1.example", 8001)
        .ip("t1.example", &["192.0.2.11"])
        .srv("_matrix._tcp.badjson.test", "t2.example", 8002)
        .ip("t2.example", &["192.0.2.12"])
        .ip("badname.test", &["192.0.2.13"])
        .ip("loop.test", &["127.0.0.1"]);
    let (client, _) = client(&s.config, resolver);

    // Step 4: SRV _matrix-fed._tcp on the original hostname.
    let endpoint = client.resolve(&name("nowk.test")).await.expect("nowk");
    assert_eq!(endpoint.addrs, addrs(&["192.0.2.11:8001"]));
    assert_eq!(endpoint.tls_name, dns("nowk.test"));
    assert_eq!(endpoint.host_header, "nowk.test");
    // Step 5: deprecated SRV.
    let endpoint = client
        .resolve(&name("badjson.test"))
        .await
        .expect("badjson");
    assert_eq!(endpoint.addrs, addrs(&["192.0.2.12:8002"]));
    assert_eq!(endpoint.host_header, "badjson.test");
    // Step 6: no SRV: the hostname's addresses on 8448, Host without port.
    let endpoint = client
        .resolve(&name("badname.test"))
        .await
        .expect("badname");
    assert_eq!(endpoint.addrs, addrs(&["192.0.2.13:8448"]));
    assert_eq!(endpoint.tls_name, dns("badname.test"));
    assert_eq!(endpoint.host_header, "badname.test");
    // A redirect loop is a failure, not a hang.
    let endpoint = client.resolve(&name("loop.test")).await.expect("loop");
    assert_eq!(endpoint.addrs, addrs(&["127.0.0.1:8448"]));
    assert!(
        fake.well_known_fetches("loop2.test") >= 1,
        "the redirect was followed"
    );

    // Failures are cached: resolving again fetches nothing.
    let before = fake.well_known_fetches("badjson.test");
    assert_eq!(before, 1);
    client
        .resolve(&name("badjson.test"))
        .await
        .expect("badjson again");
    assert_eq!(fake.well_known_fetches("badjson.test"), 1);
}

#[tokio::test(start_paused = true)]
async fn well_known_answers_are_cached_per_their_headers() {
    let mut s = setup();
    let _ticker = outbound_env::spawn_ticker();
    s.config.request_timeout_ms = 60_000;
    // Paused time jumps to the next timer while a socket is set up: no
    // deadline may be near enough to fire during a fetch.
    s.config.discovery_timeout_ms = 600_000;
    s.config.connect_timeout_ms = 60_000;
    let fake = FakeRemote::start(&s.ca, &["short.test", "default.test"]).await;
    s.config.well_known_port = fake.port();
    fake.set_well_known(
        "short.test",
        WellKnown {
            status: 200,
            body: r#"{"m.server":"a.test:1"}"#.to_owned(),
            headers: vec![("cache-control".to_owned(), "max-age=600".to_owned())],
        },
    );
    fake.set_well_known("default.test", well_known(r#"{"m.server":"b.test:1"}"#));
    let (client, _) = client(
        &s.config,
        MapResolver::default().wildcard("test", &["127.0.0.1"]),
    );
    for server in ["short.test", "default.test"] {
        client.resolve(&name(server)).await.expect("first");
    }
    // (Virtual time also moves a little while sockets are set up, hence the
    // margins.)
    tokio::time::advance(Duration::from_secs(450)).await;
    for server in ["short.test", "default.test"] {
        client.resolve(&name(server)).await.expect("cached");
    }
    assert_eq!(fake.well_known_fetches("short.test"), 1);
    tokio::time::advance(Duration::from_secs(300)).await;
    client
        .resolve(&name("short.test"))
        .await
        .expect("refetched");
    assert_eq!(
        fake.well_known_fetches("short.test"),
        2,
        "max-age=600 expired"
    );
    // Without headers: 24 hours.
    tokio::time::advance(Duration::from_secs(22 * 3600)).await;
    client.resolve(&name("default.test")).await.expect("cached");
    assert_eq!(fake.well_known_fetches("default.test"), 1);
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    client
        .resolve(&name("default.test"))
        .await
        .expect("refetched");
    assert_eq!(fake.well_known_fetches("default.test"), 2);
}

#[tokio::test]
async fn a_hard_dns_failure_is_a_discovery_error() {
    let s = setup();
    let (client, _) = client(
        &s.config,
        MapResolver::default().fail("_matrix-fed._tcp.broken.test"),
    );
    // The .well-known fetch fails too (broken.test has no address), then
    // the SRV lookup SERVFAILs: that is an error, not "no SRV".
    let error = client
        .resolve(&name("broken.test"))
        .await
        .expect_err("fails");
    assert!(matches!(error, ClientError::Discovery { .. }), "{error:?}");
}

#[tokio::test]
async fn the_denylist_refuses_private_and_metadata_addresses_before_connecting() {
    let mut s = setup();
    // No exceptions: loopback is denied too.
    s.config.ip_allow = vec![];
    let (client, _) = client(
        &s.config,
        MapResolver::default()
            .ip("private.test", &["10.0.0.1"])
            .ip("metadata.test", &["169.254.169.254"])
            .ip("mixed.test", &["10.0.0.1", "fe80::1"])
            .srv("_matrix-fed._tcp.srv-private.test", "inside.example", 8448)
            .ip("inside.example", &["192.168.1.1"]),
    );
    for server in [
        "private.test:8448",
        "metadata.test:80",
        "mixed.test:8448",
        "srv-private.test",
        "10.0.0.1",
        "169.254.169.254:80",
        "127.0.0.1:8448",
        "[::1]:8448",
    ] {
        let started = std::time::Instant::now();
        let error = client
            .get_json(&name(server), "/_matrix/federation/v1/version", false)
            .await
            .expect_err(server);
        assert!(
            matches!(&error, ClientError::Denied { destination } if destination == server),
            "{server}: {error:?}"
        );
        // Refused at once: no connect attempt to a blackholed address.
        assert!(started.elapsed() < Duration::from_secs(1), "{server}");
    }
}

#[tokio::test]
async fn srv_records_from_a_real_dns_server() {
    use dns_server::Entry;
    let mut s = setup();
    let fake = FakeRemote::start(
        &s.ca,
        &["fed.srv.test", "legacy.srv.test", "plain.srv.test"],
    )
    .await;
    let port = fake.port();
    let (dns_addr, _server) = dns_server::start(&[
        Entry::Srv("_matrix-fed._tcp.fed.srv.test.", port, "target.srv.test."),
        Entry::Srv("_matrix._tcp.legacy.srv.test.", port, "target.srv.test."),
        // A _matrix._tcp record that must lose to _matrix-fed._tcp.
        Entry::Srv("_matrix._tcp.fed.srv.test.", 1, "wrong.srv.test."),
        Entry::A("target.srv.test.", std::net::Ipv4Addr::LOCALHOST),
        Entry::A("wrong.srv.test.", std::net::Ipv4Addr::new(192, 0, 2, 99)),
        Entry::A("plain.srv.test.", std::net::Ipv4Addr::new(192, 0, 2, 50)),
        Entry::A("fed.srv.test.", std::net::Ipv4Addr::new(192, 0, 2, 51)),
        Entry::A("legacy.srv.test.", std::net::Ipv4Addr::new(192, 0, 2, 52)),
        Entry::A("private.srv.test.", std::net::Ipv4Addr::new(10, 0, 0, 1)),
        Entry::A(
            "metadata.srv.test.",
            std::net::Ipv4Addr::new(169, 254, 169, 254),
        ),
    ])
    .await;
    s.config.nameservers = vec![dns_addr];
    // .well-known is looked for on a port nothing listens on.
    s.config.well_known_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    // The real resolver, pointed at the test DNS server by config.
    let client = FederationClient::new(Arc::new(s.config.build()), Arc::new(test_signing_key()))
        .expect("client");

    let endpoint = client.resolve(&name("fed.srv.test")).await.expect("fed");
    assert_eq!(
        endpoint,
        Endpoint {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            tls_name: dns("fed.srv.test"),
            host_header: "fed.srv.test".to_owned(),
        }
    );
    let endpoint = client
        .resolve(&name("legacy.srv.test"))
        .await
        .expect("legacy");
    assert_eq!(
        endpoint.addrs,
        vec![SocketAddr::from(([127, 0, 0, 1], port))]
    );
    assert_eq!(endpoint.host_header, "legacy.srv.test");
    let endpoint = client
        .resolve(&name("plain.srv.test"))
        .await
        .expect("plain");
    assert_eq!(endpoint.addrs, addrs(&["192.0.2.50:8448"]));
    assert_eq!(endpoint.tls_name, dns("plain.srv.test"));
    let error = client
        .resolve(&name("missing.srv.test"))
        .await
        .expect_err("nxdomain");
    assert!(matches!(error, ClientError::Discovery { .. }), "{error:?}");

    // A whole request over the SRV answer: TLS name and Host are the server
    // name, the connection goes to the SRV target's port.
    client
        .get_json(
            &name("fed.srv.test"),
            "/_matrix/federation/v1/version",
            false,
        )
        .await
        .expect("request over SRV");
    assert_eq!(
        fake.other_requests()[0].host.as_deref(),
        Some("fed.srv.test")
    );

    // The denylist applies to what real DNS returns.
    let mut strict = s.config.clone();
    strict.ip_allow = vec![];
    let strict = FederationClient::new(Arc::new(strict.build()), Arc::new(test_signing_key()))
        .expect("client");
    for server in [
        "private.srv.test:8448",
        "metadata.srv.test:80",
        "fed.srv.test",
    ] {
        let error = strict
            .get_json(&name(server), "/_matrix/federation/v1/version", false)
            .await
            .expect_err(server);
        assert!(
            matches!(error, ClientError::Denied { .. }),
            "{server}: {error:?}"
        );
    }
}

/// A name server that never answers (a bound UDP socket nobody reads): the
/// whole discovery ends at `discovery_timeout_ms` with a discovery error,
/// not after the resolver's own retries over every step.
#[tokio::test]
async fn a_silent_name_server_is_cut_off_by_the_discovery_deadline() {
    let mut s = setup();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    s.config.nameservers = vec![silent.local_addr().expect("addr")];
    s.config.discovery_timeout_ms = 1_000;
    let client = FederationClient::new(Arc::new(s.config.build()), Arc::new(test_signing_key()))
        .expect("client");
    let started = std::time::Instant::now();
    let error = client
        .resolve(&name("silent.example"))
        .await
        .expect_err("no answer");
    let elapsed = started.elapsed();
    assert!(
        matches!(&error, ClientError::Discovery { reason, .. } if reason.contains("timed out")),
        "{error:?}"
    );
    // The deadline must fire; this bound is only generous slack over 1 s.
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    drop(silent);
}

/// DNS that never answers, on paused time: every kind of lookup is bounded
/// by the one deadline, and a request (discovery + exchange) fails with it.
#[tokio::test(start_paused = true)]
async fn hanging_lookups_end_at_the_deadline_on_every_path() {
    let mut s = setup();
    s.config.discovery_timeout_ms = 30_000;
    let (client, _) = client(&s.config, MapResolver::default().hang("hang.test"));
    for server in ["a.hang.test", "b.hang.test:8448"] {
        let started = tokio::time::Instant::now();
        let error = client.resolve(&name(server)).await.expect_err(server);
        assert!(
            matches!(&error, ClientError::Discovery { reason, .. } if reason.contains("timed out")),
            "{server}: {error:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30), "{server}");
        let error = client
            .get_json(&name(server), "/_matrix/federation/v1/version", false)
            .await
            .expect_err(server);
        assert!(matches!(error, ClientError::Discovery { .. }), "{error:?}");
    }
}

/// A `.well-known` that accepts the request and never answers gets half
/// the deadline in total; discovery then goes on to SRV / 8448, and the
/// failure is cached so the next resolution does not wait again.
#[tokio::test]
async fn a_stalled_well_known_costs_half_the_deadline_once() {
    let mut s = setup();
    let fake = FakeRemote::start(&s.ca, &["stall.test"]).await;
    s.config.well_known_port = fake.port();
    s.config.discovery_timeout_ms = 1_000;
    fake.stall_well_known("stall.test");
    let (client, _) = client(
        &s.config,
        MapResolver::default().ip("stall.test", &["127.0.0.1"]),
    );
    let started = std::time::Instant::now();
    let endpoint = client
        .resolve(&name("stall.test"))
        .await
        .expect("falls through");
    assert_eq!(endpoint.addrs, addrs(&["127.0.0.1:8448"]));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.well_known_fetches("stall.test"), 1);
    client
        .resolve(&name("stall.test"))
        .await
        .expect("cached failure");
    assert_eq!(
        fake.well_known_fetches("stall.test"),
        1,
        "not fetched again"
    );
}

/// SRV targets: at most `MAX_SRV_TARGETS` are looked up, all at once, and
/// targets whose lookups hang are skipped in favour of those that answer,
/// in SRV priority order.
#[tokio::test(start_paused = true)]
async fn srv_targets_are_capped_resolved_concurrently_and_hung_ones_skipped() {
    use courier::federation::outbound::discovery::MAX_SRV_TARGETS;
    use courier::federation::outbound::dns::SrvRecord;
    let mut s = setup();
    s.config.discovery_timeout_ms = 8_000;
    let mut resolver = MapResolver::default().hang("hang.test");
    let mut records = Vec::new();
    for priority in 1..=12u16 {
        // The two most preferred targets hang.
        let target = if priority <= 2 {
            format!("t{priority}.hang.test")
        } else {
            format!("t{priority}.ok.test")
        };
        resolver = resolver.ip(
            &format!("t{priority}.ok.test"),
            &[&format!("192.0.2.{priority}")],
        );
        records.push(SrvRecord {
            priority,
            weight: 0,
            port: 9000 + priority,
            target,
        });
    }
    resolver
        .srv
        .insert("_matrix-fed._tcp.many.test".to_owned(), records);
    let (client, resolver) = client(&s.config, resolver);
    let started = tokio::time::Instant::now();
    let endpoint = client.resolve(&name("many.test")).await.expect("resolved");
    let expected: Vec<SocketAddr> = (3..=MAX_SRV_TARGETS as u16)
        .map(|p| format!("192.0.2.{p}:{}", 9000 + p).parse().expect("addr"))
        .collect();
    assert_eq!(endpoint.addrs, expected);
    assert_eq!(endpoint.host_header, "many.test");
    // Concurrent: the hung targets cost one wait (three quarters of the
    // deadline), not one each.
    assert_eq!(started.elapsed(), Duration::from_secs(6));
    let lookups = resolver.lookups();
    for priority in MAX_SRV_TARGETS as u16 + 1..=12 {
        let target = format!("IP t{priority}.ok.test");
        assert!(
            !lookups.contains(&target),
            "{target} looked up: {lookups:?}"
        );
    }
}

/// The `well_known` fuzz target's seed corpus (the inputs that used to
/// panic among them) through the same calls, on stable.
#[test]
fn the_well_known_fuzz_corpus_is_handled_without_panics() {
    use courier::federation::outbound::well_known::{
        MAX_CACHE, MIN_CACHE, cache_period, parse_body, parse_http_date,
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/well_known");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("corpus file");
        let _ = parse_body(&bytes);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let first = text.lines().next().unwrap_or_default();
        let _ = parse_http_date(first);
        for name in [http::header::EXPIRES, http::header::CACHE_CONTROL] {
            if let Ok(value) = http::HeaderValue::from_str(first) {
                let mut headers = http::HeaderMap::new();
                headers.insert(name, value);
                let period = cache_period(&headers, std::time::SystemTime::now());
                assert!((MIN_CACHE..=MAX_CACHE).contains(&period), "{period:?}");
            }
        }
        files += 1;
    }
    assert!(files >= 5, "{files} corpus files");
    assert_eq!(
        parse_http_date("Mon, 01 Jan 400000000000 00:00:00 GMT"),
        None,
        "the F5 input"
    );
}
