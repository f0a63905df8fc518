//! `RemoteKeys` for the outbound federation client against a fake remote
//! on loopback over real TLS: the three calls reach the peer signed, with
//! the right method, path and body; what the peer answers beyond the
//! question (users or devices not asked, users of another server, objects
//! whose IDs do not match, claimed keys of another algorithm or too many)
//! is dropped and the rest kept; a garbage, non-object or incomplete body
//! is a `BadResponse`, a 500 a `Refused`, a hanging peer or discovery a
//! `Timeout` (which leaves the host's other connections alone), a
//! denylisted destination `Unreachable` without a request;
//! and what was dropped is counted on `/metrics` (alone in a child
//! process, since the recorder is process-wide). Last, Courier to Courier:
//! this client, as one relay, asks another for a user's device keys,
//! cross-signing keys, one-time and fallback keys and device list.

use crate::support::child;
use crate::support::fake_remote;
use crate::support::outbound_env;

use std::time::Duration;

use courier::e2ee::remote::{RemoteClaim, RemoteError, RemoteKeys, RemoteQuery};
use courier::federation::outbound::client::FederationClient;
use courier::federation::outbound::user_keys::{CLAIM_PATH, DEVICES_PATH, QUERY_PATH};
use courier::identifiers::{ServerName, UserId};
use fake_remote::{Canned, FakeRemote, OtherRequest};
use outbound_env::{MapResolver, Setup, client, name, setup, test_signing_key};
use serde_json::{Value, json};

/// Long enough for a loopback TLS exchange on a loaded machine; the
/// hanging cases wait this long once.
const TIMEOUT: Duration = Duration::from_secs(3);

/// A client and a fake remote serving `remote.test:<port>`.
struct Peer {
    _setup: Setup,
    fake: FakeRemote,
    client: FederationClient,
    server: ServerName,
}

impl Peer {
    async fn start() -> Peer {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut outbound_env::TestConfig)) -> Peer {
        let mut s = setup();
        configure(&mut s.config);
        let fake = FakeRemote::start(&s.ca, &["remote.test"]).await;
        let server = name(&format!("remote.test:{}", fake.port()));
        let (client, _) = client(
            &s.config,
            MapResolver::default().ip("remote.test", &["127.0.0.1"]),
        );
        Peer {
            _setup: s,
            fake,
            client,
            server,
        }
    }

    /// `@<local>:remote.test:<port>`.
    fn user(&self, local: &str) -> String {
        format!("@{local}:{}", self.server)
    }

    fn only_request(&self) -> OtherRequest {
        let requests = self.fake.other_requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        requests[0].clone()
    }
}

fn device(user: &str, device: &str) -> Value {
    json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{device}"): "c", format!("ed25519:{device}"): "e"},
        "signatures": {user: {format!("ed25519:{device}"): "s"}},
        "unsigned": {"device_display_name": "phone"},
        "a_field_nobody_knows": [1, 2],
    })
}

fn cross_signing(user: &str, usage: &str) -> Value {
    json!({"user_id": user, "usage": [usage], "keys": {"ed25519:PUB": "PUB"}})
}

fn signed_key(user: &str, device: &str) -> Value {
    json!({"key": "OTK", "signatures": {user: {format!("ed25519:{device}"): "s"}}})
}

/// The request arrived signed by us for `server`, over `content`.
fn assert_signed(
    request: &OtherRequest,
    method: &str,
    server: &ServerName,
    content: Option<&Value>,
) {
    let header = courier::xmatrix::XMatrix::parse(
        request
            .authorization
            .as_deref()
            .expect("an X-Matrix header"),
    )
    .expect("a valid X-Matrix header");
    assert_eq!(header.destination.as_deref(), Some(server.as_str()));
    courier::xmatrix::verify_request(
        &header,
        &courier::xmatrix::RequestToSign {
            method,
            uri: &request.path,
            origin: "origin.test",
            destination: server.as_str(),
            content,
        },
        &test_signing_key().verifying_key(),
    )
    .expect("the signature verifies");
}

fn query(users: &[(&str, &[&str])]) -> RemoteQuery {
    RemoteQuery {
        device_keys: users
            .iter()
            .map(|(u, d)| (u.to_string(), d.iter().map(|d| d.to_string()).collect()))
            .collect(),
    }
}

#[tokio::test]
async fn a_key_query_is_signed_and_keeps_only_what_was_asked() {
    let p = Peer::start().await;
    let (alice, bob, carol) = (p.user("alice"), p.user("bob"), p.user("carol"));
    let stranger = "@eve:elsewhere.test";
    p.fake.answer(
        QUERY_PATH,
        Canned::json(
            200,
            json!({
                "device_keys": {
                    &alice: {"A1": device(&alice, "A1"), "A2": device(&alice, "A2")},
                    &bob: {
                        "B1": device(&bob, "B1"),
                        "B2": device(&bob, "B2"),
                        "B3": device(&bob, "B3"),
                    },
                    &carol: {"C1": device(&carol, "C1")},
                    stranger: {"E1": device(stranger, "E1")},
                },
                "master_keys": {
                    &alice: cross_signing(&alice, "master"),
                    &bob: cross_signing(&carol, "master"),
                    stranger: cross_signing(stranger, "master"),
                },
                "self_signing_keys": {&alice: cross_signing(&alice, "self_signing")},
                "user_signing_keys": {},
            }),
        ),
    );
    // Carol was not asked; Eve was, but she is of another server; Bob's
    // master key is Carol's.
    let answer = p
        .client
        .query_keys(
            &p.server,
            query(&[(&alice, &[]), (&bob, &["B1", "B2", "B3"]), (stranger, &[])]),
            TIMEOUT,
        )
        .await;
    let request = p.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, QUERY_PATH);
    let sent = request.json();
    assert_eq!(
        sent,
        json!({"device_keys": {&alice: [], &bob: ["B1", "B2", "B3"]}}),
        "only this server's users are asked"
    );
    assert_signed(&request, "POST", &p.server, Some(&sent));

    let answer = answer.expect("an answer");
    assert_eq!(answer.device_keys.len(), 2, "{answer:?}");
    let alices = &answer.device_keys[&alice];
    assert_eq!(alices.keys().collect::<Vec<_>>(), ["A1", "A2"]);
    assert_eq!(alices["A1"], device(&alice, "A1"), "passed on untouched");
    let bobs = &answer.device_keys[&bob];
    assert_eq!(bobs.keys().collect::<Vec<_>>(), ["B1", "B2", "B3"]);
    assert_eq!(answer.master_keys.keys().collect::<Vec<_>>(), [&alice]);
    assert_eq!(
        answer.self_signing_keys.keys().collect::<Vec<_>>(),
        [&alice]
    );
}

#[tokio::test]
async fn devices_that_were_not_asked_or_do_not_match_their_place_are_dropped() {
    let p = Peer::start().await;
    let bob = p.user("bob");
    let carol = p.user("carol");
    let mut renamed = device(&bob, "B2");
    renamed["device_id"] = json!("B9");
    p.fake.answer(
        QUERY_PATH,
        Canned::json(
            200,
            json!({"device_keys": {&bob: {
                "B1": device(&bob, "B1"),
                "B2": renamed,
                "B3": device(&carol, "B3"),
                "B4": device(&bob, "B4"),
                "B5": {"user_id": &bob, "device_id": "B5", "keys": "not a map"},
            }}}),
        ),
    );
    let answer = p
        .client
        .query_keys(
            &p.server,
            query(&[(&bob, &["B1", "B2", "B3", "B5"])]),
            TIMEOUT,
        )
        .await
        .expect("an answer");
    let bobs = &answer.device_keys[&bob];
    assert_eq!(bobs.keys().collect::<Vec<_>>(), ["B1"], "{answer:?}");
}

fn claim(entries: &[(&str, &str, &str)]) -> RemoteClaim {
    let mut claim = RemoteClaim::default();
    for (user, device, algorithm) in entries {
        claim
            .one_time_keys
            .entry(user.to_string())
            .or_default()
            .insert(device.to_string(), algorithm.to_string());
    }
    claim
}

#[tokio::test]
async fn a_claim_keeps_one_key_of_the_asked_algorithm_per_asked_device() {
    let p = Peer::start().await;
    let (alice, bob) = (p.user("alice"), p.user("bob"));
    p.fake.answer(
        CLAIM_PATH,
        Canned::json(
            200,
            json!({"one_time_keys": {
                &alice: {
                    "A1": {"signed_curve25519:AAAAHQ": signed_key(&alice, "A1")},
                    "A2": {"curve25519:X": "x"},
                    "A3": {
                        "signed_curve25519:1": signed_key(&alice, "A3"),
                        "signed_curve25519:2": signed_key(&alice, "A3"),
                    },
                    "A9": {"signed_curve25519:1": signed_key(&alice, "A9")},
                },
                &bob: {"B1": {"signed_curve25519:1": signed_key(&bob, "B1")}},
                "@eve:elsewhere.test": {"E": {"signed_curve25519:1": signed_key("@eve:elsewhere.test", "E")}},
            }}),
        ),
    );
    let asked = [
        (alice.as_str(), "A1", "signed_curve25519"),
        (alice.as_str(), "A2", "signed_curve25519"),
        (alice.as_str(), "A3", "signed_curve25519"),
    ];
    let answer = p.client.claim_keys(&p.server, claim(&asked), TIMEOUT).await;
    let request = p.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, CLAIM_PATH);
    let sent = request.json();
    assert_eq!(
        sent,
        json!({"one_time_keys": {&alice: {
            "A1": "signed_curve25519", "A2": "signed_curve25519", "A3": "signed_curve25519",
        }}})
    );
    assert_signed(&request, "POST", &p.server, Some(&sent));

    let answer = answer.expect("an answer");
    assert_eq!(answer.one_time_keys.len(), 1, "{answer:?}");
    let alices = &answer.one_time_keys[&alice];
    assert_eq!(alices.keys().collect::<Vec<_>>(), ["A1"]);
    assert_eq!(
        alices["A1"]["signed_curve25519:AAAAHQ"],
        signed_key(&alice, "A1")
    );
}

#[tokio::test]
async fn user_devices_is_a_signed_get_of_the_encoded_user_id() {
    let p = Peer::start().await;
    let alice = p.user("alice");
    let path = format!("{DEVICES_PATH}/%40alice%3Aremote.test%3A{}", p.fake.port());
    p.fake.answer(
        &path,
        Canned::json(
            200,
            json!({
                "user_id": &alice, "stream_id": 7,
                "devices": [
                    {"device_id": "A1", "keys": device(&alice, "A1"), "device_display_name": "phone"},
                    {"device_id": "A2"},
                    {"device_id": "A3", "keys": device(&p.user("bob"), "A3")},
                ],
                "master_key": cross_signing(&alice, "master"),
                "self_signing_key": null,
            }),
        ),
    );
    let user = UserId::parse(&alice).expect("user id");
    let answer = p
        .client
        .user_devices(&p.server, &user, TIMEOUT)
        .await
        .expect("an answer");
    let request = p.only_request();
    assert_eq!(request.method, "GET");
    assert_eq!(request.path, path);
    assert_signed(&request, "GET", &p.server, None);
    assert_eq!(answer.user_id, alice);
    assert_eq!(answer.stream_id, 7);
    let ids: Vec<&str> = answer
        .devices
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert_eq!(ids, ["A1", "A2"]);
    assert_eq!(answer.master_key, Some(cross_signing(&alice, "master")));
    assert_eq!(answer.self_signing_key, None);

    // An answer about somebody else is refused whole.
    p.fake.answer(
        &path,
        Canned::json(
            200,
            json!({"user_id": p.user("bob"), "stream_id": 1, "devices": []}),
        ),
    );
    let error = p
        .client
        .user_devices(&p.server, &user, TIMEOUT)
        .await
        .expect_err("another user's list");
    assert!(matches!(error, RemoteError::BadResponse(_)), "{error:?}");

    // A user of another server is never asked of this one.
    let stranger = UserId::parse("@eve:elsewhere.test").expect("user id");
    let error = p
        .client
        .user_devices(&p.server, &stranger, TIMEOUT)
        .await
        .expect_err("not this server's user");
    assert!(matches!(error, RemoteError::Unreachable(_)), "{error:?}");
    assert_eq!(p.fake.other_requests().len(), 2);
}

#[tokio::test]
async fn garbage_non_object_and_incomplete_bodies_are_bad_responses() {
    let p = Peer::start().await;
    let alice = p.user("alice");
    for body in [
        "not json at all",
        "[1, 2, 3]",
        "\"a string\"",
        "{}",
        r#"{"device_keys": []}"#,
    ] {
        p.fake.answer(QUERY_PATH, Canned::text(body));
        let error = p
            .client
            .query_keys(&p.server, query(&[(&alice, &[])]), TIMEOUT)
            .await
            .expect_err(body);
        assert!(
            matches!(error, RemoteError::BadResponse(_)),
            "{body}: {error:?}"
        );
    }
    p.fake
        .answer(CLAIM_PATH, Canned::text(r#"{"one_time_keys": 5}"#));
    let error = p
        .client
        .claim_keys(
            &p.server,
            claim(&[(&alice, "A1", "signed_curve25519")]),
            TIMEOUT,
        )
        .await
        .expect_err("not a map");
    assert!(matches!(error, RemoteError::BadResponse(_)), "{error:?}");
}

#[tokio::test]
async fn a_refusal_carries_its_status_and_errcode() {
    let p = Peer::start().await;
    let alice = p.user("alice");
    p.fake.answer(
        QUERY_PATH,
        Canned::json(500, json!({"errcode": "M_UNKNOWN", "error": "oops"})),
    );
    let error = p
        .client
        .query_keys(&p.server, query(&[(&alice, &[])]), TIMEOUT)
        .await
        .expect_err("a 500");
    assert_eq!(
        error,
        RemoteError::Refused {
            status: 500,
            errcode: Some("M_UNKNOWN".to_owned())
        }
    );
    // The claim endpoint is not there at all: the fake's 404.
    let error = p
        .client
        .claim_keys(
            &p.server,
            claim(&[(&alice, "A1", "signed_curve25519")]),
            TIMEOUT,
        )
        .await
        .expect_err("a 404");
    assert_eq!(
        error,
        RemoteError::Refused {
            status: 404,
            errcode: Some("M_UNRECOGNIZED".to_owned())
        }
    );
}

#[tokio::test]
async fn a_hanging_peer_or_discovery_is_a_timeout_within_the_callers_bound() {
    // The client's own request timeout is far longer than the caller's.
    let p = Peer::start_with(|c| c.request_timeout_ms = 600_000).await;
    let alice = p.user("alice");
    p.fake.answer(QUERY_PATH, Canned::hang());
    let error = p
        .client
        .query_keys(&p.server, query(&[(&alice, &[])]), TIMEOUT)
        .await
        .expect_err("the peer never answers");
    assert_eq!(error, RemoteError::Timeout);
    assert_eq!(p.only_request().path, QUERY_PATH, "it was asked");

    // Discovery that never ends (its own deadline is 15 s) is cut too.
    let mut s = setup();
    s.config.request_timeout_ms = 600_000;
    let (client, _) = client(&s.config, MapResolver::default().hang("slow.test"));
    let slow = name("slow.test");
    let user = UserId::parse("@alice:slow.test").expect("user id");
    let error = client
        .user_devices(&slow, &user, TIMEOUT)
        .await
        .expect_err("discovery never ends");
    assert_eq!(error, RemoteError::Timeout);
}

#[tokio::test]
async fn a_callers_timeout_does_not_close_the_hosts_other_connections() {
    let p = Peer::start_with(|c| c.request_timeout_ms = 600_000).await;
    let alice = p.user("alice");
    p.fake
        .answer(QUERY_PATH, Canned::json(200, json!({"device_keys": {}})));
    p.client
        .query_keys(&p.server, query(&[(&alice, &[])]), TIMEOUT)
        .await
        .expect("an answer");
    assert_eq!(p.fake.open_connections(), 1, "one pooled HTTP/2 connection");
    p.fake.answer(QUERY_PATH, Canned::hang());
    let error = p
        .client
        .query_keys(
            &p.server,
            query(&[(&alice, &[])]),
            Duration::from_millis(500),
        )
        .await
        .expect_err("the peer never answers");
    assert_eq!(error, RemoteError::Timeout);
    // Only the hung stream was given up: the connection (which a
    // transaction could be using) is not closed.
    let closed = p
        .fake
        .wait_for_connections(Duration::from_secs(1), |open| open == 0)
        .await;
    assert!(!closed, "the connection stays open");
    assert_eq!(p.fake.open_connections(), 1);
}

#[tokio::test]
async fn a_denylisted_destination_is_unreachable_and_never_asked() {
    let p = Peer::start_with(|c| c.ip_allow = Vec::new()).await;
    let alice = p.user("alice");
    p.fake
        .answer(QUERY_PATH, Canned::json(200, json!({"device_keys": {}})));
    let error = p
        .client
        .query_keys(&p.server, query(&[(&alice, &[])]), TIMEOUT)
        .await
        .expect_err("127.0.0.1 is denied");
    assert!(matches!(error, RemoteError::Unreachable(_)), "{error:?}");
    assert!(p.fake.other_requests().is_empty());
}

#[tokio::test]
async fn nobody_of_the_server_to_ask_sends_nothing() {
    let p = Peer::start().await;
    let answer = p
        .client
        .query_keys(&p.server, query(&[("@eve:elsewhere.test", &[])]), TIMEOUT)
        .await
        .expect("an empty answer");
    assert!(answer.device_keys.is_empty());
    let answer = p
        .client
        .claim_keys(&p.server, RemoteClaim::default(), TIMEOUT)
        .await
        .expect("an empty answer");
    assert!(answer.one_time_keys.is_empty());
    assert!(p.fake.other_requests().is_empty());
}

/// Set in the child process that runs the metrics test alone.
const METRICS_CHILD_ENV: &str = "IT_REMOTE_KEYS_METRICS_CHILD";

#[test]
fn requests_and_drops_are_counted_on_metrics() {
    if std::env::var_os(METRICS_CHILD_ENV).is_none() {
        child::run_alone(
            module_path!(),
            "requests_and_drops_are_counted_on_metrics",
            METRICS_CHILD_ENV,
            Duration::from_secs(300),
        );
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(drops_are_counted());
}

/// Whether `text` has a `name` series with every label of `labels` and
/// the value `value`.
fn has_value(text: &str, name: &str, labels: &[(&str, &str)], value: u64) -> bool {
    text.lines().any(|line| {
        line.starts_with(&format!("{name}{{"))
            && labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            && line.rsplit(' ').next() == Some(value.to_string().as_str())
    })
}

async fn drops_are_counted() {
    let metrics = courier::metrics::MetricsHandle::install();
    let p = Peer::start().await;
    let (alice, bob) = (p.user("alice"), p.user("bob"));
    p.fake.answer(
        QUERY_PATH,
        Canned::json(
            200,
            json!({"device_keys": {
                &alice: {"A1": device(&alice, "A1"), "A2": device(&alice, "A3")},
                &bob: {"B1": device(&bob, "B1")},
                "@eve:elsewhere.test": {},
            }}),
        ),
    );
    p.client
        .query_keys(&p.server, query(&[(&alice, &[])]), TIMEOUT)
        .await
        .expect("an answer");
    p.fake.answer(CLAIM_PATH, Canned::text("<html>"));
    p.client
        .claim_keys(
            &p.server,
            claim(&[(&alice, "A1", "signed_curve25519")]),
            TIMEOUT,
        )
        .await
        .expect_err("garbage");
    let text = metrics.render();
    let drops = "courier_remote_key_answer_drops_total";
    for (reason, n) in [
        ("unasked_user", 1),
        ("other_server", 1),
        ("mismatched_ids", 1),
    ] {
        assert!(
            has_value(
                &text,
                drops,
                &[("endpoint", "query"), ("reason", reason)],
                n
            ),
            "{reason}: {text}"
        );
    }
    let requests = "courier_remote_key_requests_total";
    assert!(
        has_value(
            &text,
            requests,
            &[("endpoint", "query"), ("outcome", "ok")],
            1
        ),
        "{text}"
    );
    assert!(
        has_value(
            &text,
            requests,
            &[("endpoint", "claim"), ("outcome", "bad_response")],
            1
        ),
        "{text}"
    );
}

/// Courier to Courier: this client, as relay A (its configuration and its
/// signing key, so relay B verifies the X-Matrix header against A's
/// published key), asks relay B for Bob's keys with all three calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_answers_all_three_calls_to_this_client() {
    use crate::support::TestRelay;
    use crate::support::e2ee::{TestDevice, cross_signing_key, key, public_key, sign};

    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let bob = TestDevice::register(&b, "bob", "BOBDEV", 2).await;
    let post = |path: &str, body: Value| {
        let url = format!("{}/_matrix/client/v3/{path}", b.client_url);
        let token = bob.token.clone();
        let http = &b.http;
        async move { http.post_json(&url, Some(&token), &body).await }
    };
    let r = post(
        "keys/upload",
        json!({
            "device_keys": bob.device_keys(),
            "one_time_keys": bob.one_time_keys([1]),
            "fallback_keys": {"signed_curve25519:FB": bob.key_object(200, true)},
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let master = cross_signing_key(&bob.user_id, "master", &key(30));
    let mut self_signing = cross_signing_key(&bob.user_id, "self_signing", &key(31));
    let master_id = format!("ed25519:{}", public_key(&key(30)));
    sign(&mut self_signing, &bob.user_id, &master_id, &key(30));
    let r = post(
        "keys/device_signing/upload",
        json!({"master_key": master, "self_signing_key": self_signing}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let a_key = courier::keys::ServerSigningKey::load(&a.dir.join("signing.key")).expect("A's key");
    let client = FederationClient::new(std::sync::Arc::new(a.config()), std::sync::Arc::new(a_key))
        .expect("client");
    let server = name(&b.server_name);
    let user = UserId::parse(&bob.user_id).expect("user id");

    let answer = client
        .query_keys(
            &server,
            query(&[(&bob.user_id, &[])]),
            Duration::from_secs(20),
        )
        .await
        .expect("B answers the query");
    let mut served = answer.device_keys[&bob.user_id]["BOBDEV"].clone();
    served.as_object_mut().expect("object").remove("unsigned");
    assert_eq!(served, bob.device_keys());
    assert_eq!(answer.master_keys[&bob.user_id], master);
    assert_eq!(answer.self_signing_keys[&bob.user_id], self_signing);

    let ask = claim(&[(&bob.user_id, "BOBDEV", "signed_curve25519")]);
    for expected in [
        ("signed_curve25519:AAAA001", bob.key_object(1, false)),
        ("signed_curve25519:FB", bob.key_object(200, true)),
    ] {
        let answer = client
            .claim_keys(&server, ask.clone(), Duration::from_secs(20))
            .await
            .expect("B answers the claim");
        let keys = &answer.one_time_keys[&bob.user_id]["BOBDEV"];
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(
            keys[expected.0], expected.1,
            "the one-time key, then the fallback key"
        );
    }

    let devices = client
        .user_devices(&server, &user, Duration::from_secs(20))
        .await
        .expect("B answers the device list");
    assert_eq!(devices.user_id, bob.user_id);
    assert_eq!(devices.devices.len(), 1, "{devices:?}");
    let listed = &devices.devices[0];
    assert_eq!(listed["device_id"], "BOBDEV");
    let mut listed_keys = listed["keys"].clone();
    if let Some(object) = listed_keys.as_object_mut() {
        object.remove("unsigned");
    }
    assert_eq!(listed_keys, bob.device_keys());
    assert_eq!(devices.master_key, Some(master));
    assert_eq!(devices.self_signing_key, Some(self_signing));
}
