//! The outbound federation client's connection rules against real servers
//! on loopback: the TLS name and `Host` discovery chose, X-Matrix signing,
//! certificate verification that is never off, IPv6 and `localhost`, and the
//! denylist refusing private and metadata addresses before any connect.

use crate::support::fake_remote;
use crate::support::outbound_env;

use std::net::SocketAddr;

use courier::federation::outbound::client_error::ClientError;
use fake_remote::{FakeRemote, TestCa};
use outbound_env::{MapResolver, client, dns, name, setup, test_signing_key, well_known};

#[tokio::test]
async fn requests_reach_the_peer_with_the_discovered_tls_name_and_host() {
    let mut s = setup();
    let fake = FakeRemote::start(&s.ca, &["delegated.test", "origin-name.test", "127.0.0.1"]).await;
    s.config.well_known_port = fake.port();
    let port = fake.port();
    fake.set_well_known(
        "origin-name.test",
        well_known(&format!(r#"{{"m.server":"delegated.test:{port}"}}"#)),
    );
    let (client, _) = client(
        &s.config,
        MapResolver::default()
            .ip("origin-name.test", &["127.0.0.1"])
            .ip("delegated.test", &["127.0.0.1"]),
    );
    // Delegation: TLS name delegated.test (the cert has no origin-name.test).
    let answer = client
        .get_json(
            &name("origin-name.test"),
            "/_matrix/federation/v1/version",
            false,
        )
        .await
        .expect("reaches the delegate");
    assert_eq!(answer["server"]["name"], "fake");
    // IP literal with port: no SNI, certificate valid for the IP.
    client
        .get_json(
            &name(&format!("127.0.0.1:{port}")),
            "/_matrix/federation/v1/version?x=%40y",
            false,
        )
        .await
        .expect("reaches the IP literal");
    let requests = fake.other_requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].host.as_deref(),
        Some(format!("delegated.test:{port}").as_str())
    );
    assert_eq!(
        requests[1].host.as_deref(),
        Some(format!("127.0.0.1:{port}").as_str())
    );
    assert_eq!(requests[1].path, "/_matrix/federation/v1/version?x=%40y");
    assert!(
        requests.iter().all(|r| r.authorization.is_none()),
        "unsigned"
    );

    // Signed: X-Matrix over GET without content, destination = server name
    // (not the delegated host), uri = path and query as sent.
    let path = "/_matrix/key/v2/query/x%40y?minimum_valid_until_ts=5";
    client
        .get_json(&name("origin-name.test"), path, true)
        .await
        .expect_err("the fake answers 404 here");
    let requests = fake.other_requests();
    let signed = requests.last().expect("the signed request arrived");
    assert_eq!(signed.path, path);
    let header = courier::xmatrix::XMatrix::parse(signed.authorization.as_deref().expect("signed"))
        .expect("valid X-Matrix");
    assert_eq!(header.destination.as_deref(), Some("origin-name.test"));
    courier::xmatrix::verify_request(
        &header,
        &courier::xmatrix::RequestToSign {
            method: "GET",
            uri: path,
            origin: "origin.test",
            destination: "origin-name.test",
            content: None,
        },
        &test_signing_key().verifying_key(),
    )
    .expect("the signature verifies");
}
#[tokio::test]
async fn certificates_are_always_verified_and_tls_refusal_is_a_connect_error() {
    let mut s = setup();
    // The certificate is for another name.
    let fake = FakeRemote::start(&s.ca, &["someone-else.test"]).await;
    s.config.well_known_port = fake.port();
    let port = fake.port();
    let (client, _) = client(
        &s.config,
        MapResolver::default().ip("victim.test", &["127.0.0.1"]),
    );
    let error = client
        .get_json(
            &name(&format!("victim.test:{port}")),
            "/_matrix/federation/v1/version",
            false,
        )
        .await
        .expect_err("wrong certificate name");
    assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");

    // An untrusted CA.
    let other_ca = TestCa::new();
    let untrusted = FakeRemote::start(&other_ca, &["victim.test"]).await;
    let error = client
        .get_json(
            &name(&format!("victim.test:{}", untrusted.port())),
            "/_matrix/federation/v1/version",
            false,
        )
        .await
        .expect_err("untrusted CA");
    assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");

    // TLS refused outright.
    let good = FakeRemote::start(&s.ca, &["victim.test"]).await;
    good.refuse_tls(true);
    let error = client
        .get_json(
            &name(&format!("victim.test:{}", good.port())),
            "/_matrix/federation/v1/version",
            false,
        )
        .await
        .expect_err("tls refused");
    assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");
    good.refuse_tls(false);
    client
        .get_json(
            &name(&format!("victim.test:{}", good.port())),
            "/_matrix/federation/v1/version",
            false,
        )
        .await
        .expect("works once TLS is served");
}

#[tokio::test]
async fn ipv6_literal_end_to_end() {
    let s = setup();
    let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
        panic!("this test needs IPv6 loopback");
    };
    let fake = FakeRemote::start_on(listener, &s.ca, &["::1"]).await;
    let (client, _) = client(&s.config, MapResolver::default());
    let server = format!("[::1]:{}", fake.port());
    client
        .get_json(&name(&server), "/_matrix/federation/v1/version", false)
        .await
        .expect("reaches [::1]");
    assert_eq!(
        fake.other_requests()[0].host.as_deref(),
        Some(server.as_str())
    );
}
#[tokio::test]
async fn localhost_names_are_loopback_without_dns_and_still_denylisted() {
    let mut s = setup();
    let fake = FakeRemote::start(&s.ca, &["localhost"]).await;
    let (local, resolver) = client(&s.config, MapResolver::default());
    let server = format!("localhost:{}", fake.port());
    let endpoint = local.resolve(&name(&server)).await.expect("localhost");
    assert_eq!(
        endpoint.addrs,
        vec![
            SocketAddr::from(([127, 0, 0, 1], fake.port())),
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, fake.port())),
        ]
    );
    assert_eq!(endpoint.tls_name, dns("localhost"));
    assert!(resolver.lookups().is_empty(), "no DNS for localhost");
    local
        .get_json(&name(&server), "/_matrix/federation/v1/version", false)
        .await
        .expect("reaches localhost with ip_allow");
    let request = &fake.other_requests()[0];
    assert_eq!(request.host.as_deref(), Some(server.as_str()));

    s.config.ip_allow = vec![];
    let (strict, _) = client(&s.config, MapResolver::default());
    let error = strict
        .get_json(&name(&server), "/_matrix/federation/v1/version", false)
        .await
        .expect_err("loopback is denied by default");
    assert!(matches!(error, ClientError::Denied { .. }), "{error:?}");
}

/// No SSRF through `.well-known`: a delegation to a metadata or private
/// address is refused before connecting, even though the `.well-known`
/// host itself (loopback here, opened by `ip_allow`) was allowed.
#[tokio::test]
async fn well_known_cannot_delegate_into_denied_ranges() {
    let mut s = setup();
    s.config.ip_allow = vec!["127.0.0.0/8".to_owned()];
    let fake = FakeRemote::start(&s.ca, &["evil.test", "evil2.test"]).await;
    s.config.well_known_port = fake.port();
    fake.set_well_known(
        "evil.test",
        well_known(r#"{"m.server":"169.254.169.254:80"}"#),
    );
    fake.set_well_known(
        "evil2.test",
        well_known(r#"{"m.server":"inside.example:8448"}"#),
    );
    let (client, _) = client(
        &s.config,
        MapResolver::default()
            .ip("evil.test", &["127.0.0.1"])
            .ip("evil2.test", &["127.0.0.1"])
            .ip("inside.example", &["10.1.2.3", "fd00::5"]),
    );
    for server in ["evil.test", "evil2.test"] {
        let error = client
            .get_json(&name(server), "/_matrix/federation/v1/version", false)
            .await
            .expect_err(server);
        assert!(
            matches!(&error, ClientError::Denied { destination } if destination == server),
            "{server}: {error:?}"
        );
    }
    assert_eq!(
        fake.well_known_fetches("evil.test"),
        1,
        "the delegation was read"
    );
    assert!(
        fake.other_requests().is_empty(),
        "nothing but .well-known reached"
    );
}

/// A request that times out closes every connection to its authority at
/// once, including the pooled (idle or multiplexed) one, instead of leaving
/// it open for the pool's 90 s idle timeout.
#[tokio::test]
async fn a_timed_out_request_releases_the_hosts_pooled_connections() {
    let mut s = setup();
    let fake = FakeRemote::start(&s.ca, &["pool.test"]).await;
    s.config.request_timeout_ms = 1_000;
    let server = format!("pool.test:{}", fake.port());
    let (client, _) = client(
        &s.config,
        MapResolver::default().ip("pool.test", &["127.0.0.1"]),
    );
    client
        .get_json(&name(&server), "/_matrix/federation/v1/version", true)
        .await
        .expect("first request");
    assert!(
        fake.wait_for_connections(std::time::Duration::from_secs(10), |n| n == 1)
            .await,
        "one pooled connection: {}",
        fake.open_connections()
    );
    fake.script(
        "pool.test",
        fake_remote::Script {
            hang: true,
            ..fake_remote::Script::default()
        },
    );
    let body = br#"{"edus":[],"origin":"origin.test","origin_server_ts":1,"pdus":[]}"#;
    let error = client
        .send_transaction(&name(&server), "t1", body)
        .await
        .expect_err("hangs");
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    assert!(
        fake.wait_for_connections(std::time::Duration::from_secs(10), |n| n == 0)
            .await,
        "the host's connections are closed: {} open",
        fake.open_connections()
    );
    // The host is usable again: a new connection is opened.
    fake.script("pool.test", fake_remote::Script::default());
    client
        .send_transaction(&name(&server), "t2", body)
        .await
        .expect("a new connection");
}

/// A `200` to `/send` whose body is not a JSON object still means the peer
/// took the transaction; other requests still need a JSON object.
#[tokio::test]
async fn a_send_answered_200_with_a_non_json_body_is_delivered() {
    let s = setup();
    let fake = FakeRemote::start(&s.ca, &["lax.test"]).await;
    let server = format!("lax.test:{}", fake.port());
    let (client, _) = client(
        &s.config,
        MapResolver::default().ip("lax.test", &["127.0.0.1"]),
    );
    let body = br#"{"edus":[],"origin":"origin.test","origin_server_ts":1,"pdus":[]}"#;
    for (n, answer) in ["", "<html>ok</html>", "[1]"].into_iter().enumerate() {
        fake.script(
            "lax.test",
            fake_remote::Script {
                ok_body: Some(answer.to_owned()),
                ..fake_remote::Script::default()
            },
        );
        client
            .send_transaction(&name(&server), &format!("t{n}"), body)
            .await
            .unwrap_or_else(|e| panic!("{answer:?}: {e:?}"));
    }
}
