//! Inbound federation against real relays on loopback over real TLS:
//! X-Matrix authentication (every way a request can be forged or damaged is
//! refused and stores nothing), transaction and message_id dedupe, spoofed
//! senders, transaction limits, rate limiting, and end-to-end delivery
//! between two relays, bodies verified over their raw bytes or through the
//! canonical re-encoding. Also the key ring over a real SQLite store, the
//! `send_body` fuzz corpus through the parser, and the parser against the
//! `Value`-tree parser it replaced (kept here as a reference) over the corpus
//! and generated bodies.
//!
//! Requests from a fake origin are signed here with a test key that is put
//! into the receiving relay's `server_keys` table (the key ring's store
//! cache, a real verification path). The fake origin is `127.0.0.1:1`, so if
//! the relay ever tries to fetch its keys, the connection is refused at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{TestRelay, TestRelayOptions};
use courier::federation::keyring::{FetchFuture, KeyFetcher, KeyRing};
use courier::identifiers::ServerName;
use courier::keys::{ServerSigningKey, server_key_document};
use courier::store::sqlite::SqliteStore;
use courier::store::{Store, StoredServerKey};
use courier::xmatrix::{RequestToSign, sign_request};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName as TlsName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const FAKE_ORIGIN: &str = "127.0.0.1:1";

// ---- a federation client for tests: raw request targets over real TLS -------

struct Reply {
    status: u16,
    json: Value,
    text: String,
    headers: hyper::HeaderMap,
}

struct FedClient {
    connector: TlsConnector,
    addr: std::net::SocketAddr,
}

impl FedClient {
    fn new(relay: &TestRelay) -> FedClient {
        courier::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let ca = crate::support::relay::repo_root().join("certs/dev-ca.crt");
        for cert in CertificateDer::pem_file_iter(&ca).expect("dev CA readable") {
            roots
                .add(cert.expect("dev CA parses"))
                .expect("dev CA added");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        FedClient {
            connector: TlsConnector::from(Arc::new(config)),
            addr: relay.federation_addr,
        }
    }

    /// Sends `method target` exactly as given (no re-encoding of the target)
    /// with the given `Authorization` header values.
    async fn send(
        &self,
        method: &str,
        target: &str,
        authorization: &[String],
        body: Option<Vec<u8>>,
    ) -> Reply {
        let tcp = TcpStream::connect(self.addr).await.expect("tcp connect");
        let tls = self
            .connector
            .connect(TlsName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("TLS handshake with the relay");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http handshake");
        tokio::spawn(connection);
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header("Host", "localhost");
        for value in authorization {
            builder = builder.header("Authorization", value.as_str());
        }
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .expect("answer within 30 s")
            .expect("answer");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Reply {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            text,
            headers,
        }
    }
}

/// Signs `method target` with `body` as `origin` for `destination`; returns
/// the header value.
fn sign(
    key: &ServerSigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    target: &str,
    body: Option<&Value>,
) -> String {
    sign_request(
        key,
        &RequestToSign {
            method,
            uri: target,
            origin,
            destination,
            content: body,
        },
    )
    .expect("signable")
    .to_header_value()
}

/// A relay plus a handle on its store and a test origin whose key it trusts.
struct Fixture {
    relay: TestRelay,
    store: SqliteStore,
    fed: FedClient,
    key: ServerSigningKey,
}

const BOB: &str = "@bob:";

impl Fixture {
    async fn new() -> Fixture {
        Self::with(TestRelayOptions::default()).await
    }

    async fn with(mut options: TestRelayOptions) -> Fixture {
        options
            .federation_extra
            .push_str("key_fetch_timeout_ms = 3000\n");
        let relay = TestRelay::spawn_with(options).await;
        let store = SqliteStore::open(&relay.db_path())
            .await
            .expect("second handle on the relay's store");
        let key = ServerSigningKey::from_seed("fake1", [42; 32]);
        store
            .put_server_keys(vec![StoredServerKey {
                server_name: FAKE_ORIGIN.to_owned(),
                key_id: key.key_id().to_owned(),
                public_key: key.public_key_base64(),
                valid_until_ts: courier::now_ms() + 3_600_000,
            }])
            .await
            .expect("test key stored");
        for device in ["BOBPHONE", "BOBLAPTOP"] {
            store
                .upsert_device(&bob(&relay), device, None)
                .await
                .expect("device registered");
        }
        let fed = FedClient::new(&relay);
        Fixture {
            relay,
            store,
            fed,
            key,
        }
    }

    fn us(&self) -> &str {
        &self.relay.server_name
    }

    /// Signs and sends a transaction from the fake origin.
    async fn send_txn(&self, txn_id: &str, body: &Value) -> Reply {
        let target = format!("/_matrix/federation/v1/send/{txn_id}");
        let auth = sign(
            &self.key,
            FAKE_ORIGIN,
            self.us(),
            "PUT",
            &target,
            Some(body),
        );
        self.fed
            .send("PUT", &target, &[auth], Some(body.to_string().into_bytes()))
            .await
    }

    /// Every message in a device's inbox (read without acknowledging).
    async fn inbox(&self, device: &str) -> Vec<Value> {
        let page = self
            .store
            .fetch_inbox(&bob(&self.relay), device, 0, 1000)
            .await
            .expect("inbox readable");
        page.messages
            .iter()
            .map(|m| {
                json!({
                    "sender": m.sender,
                    "type": m.event_type,
                    "content": serde_json::from_str::<Value>(&m.content_json).expect("json"),
                })
            })
            .collect()
    }

    async fn assert_nothing_stored(&self, txn_id: &str, case: &str) {
        assert_eq!(
            self.store
                .inbound_txn_response(FAKE_ORIGIN, txn_id)
                .await
                .expect("readable"),
            None,
            "{case}: a transaction was recorded"
        );
        for device in ["BOBPHONE", "BOBLAPTOP"] {
            assert!(
                self.inbox(device).await.is_empty(),
                "{case}: inbox rows were written"
            );
        }
    }
}

fn bob(relay: &TestRelay) -> String {
    format!("{BOB}{}", relay.server_name)
}

fn to_device_edu(sender: &str, message_id: &str, messages: Value) -> Value {
    json!({"edu_type": "m.direct_to_device", "content": {
        "sender": sender, "type": "m.room.encrypted", "message_id": message_id,
        "messages": messages }})
}

fn txn_body(edus: Vec<Value>, pdus: Vec<Value>) -> Value {
    json!({"origin": FAKE_ORIGIN, "origin_server_ts": courier::now_ms(), "pdus": pdus, "edus": edus})
}

fn alice() -> String {
    format!("@alice:{FAKE_ORIGIN}")
}

/// (case, target sent, `Authorization` values, body sent, expected status).
type Case = (&'static str, String, Vec<String>, Vec<u8>, u16);

// ---- the tests ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_transaction_is_delivered_once_and_replays_change_nothing() {
    let f = Fixture::new().await;
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "msg-1",
            json!({ bob(&f.relay): { "BOBPHONE": {"n": 1}, "*": {"n": 2} } }),
        )],
        vec![],
    );
    let first = f.send_txn("txn-1", &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.json, json!({"pdus": {}}));
    assert_eq!(
        first
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    // `*` reached both devices, the named message only the phone, in order.
    let phone = f.inbox("BOBPHONE").await;
    assert_eq!(phone.len(), 2, "{phone:?}");
    assert_eq!(phone[0]["sender"], alice());
    assert_eq!(phone[0]["type"], "m.room.encrypted");
    assert_eq!(f.inbox("BOBLAPTOP").await.len(), 1);

    // The same transaction again: the same response, nothing new.
    let replay = f.send_txn("txn-1", &body).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.text, first.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 2);
    assert_eq!(f.inbox("BOBLAPTOP").await.len(), 1);

    // The same message_id inside a new transaction: accepted, not stored twice.
    let again = f.send_txn("txn-2", &body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json, json!({"pdus": {}}));
    assert_eq!(f.inbox("BOBPHONE").await.len(), 2);
    assert_eq!(f.inbox("BOBLAPTOP").await.len(), 1);
    assert!(
        f.store
            .inbound_txn_response(FAKE_ORIGIN, "txn-2")
            .await
            .expect("readable")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_retried_after_a_restart_is_still_a_duplicate() {
    let mut f = Fixture::new().await;
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "before-restart",
            json!({ bob(&f.relay): { "BOBPHONE": {"n": 1} } }),
        )],
        vec![],
    );
    let first = f.send_txn("restart-txn", &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    f.relay.stop().await;
    f.relay.restart().await;
    // A new process: its key ring reads the key from the store again, and
    // the dedupe records survived.
    let replay = f.send_txn("restart-txn", &body).await;
    assert_eq!(replay.status, 200, "{}", replay.text);
    assert_eq!(replay.text, first.text);
    let again = f.send_txn("restart-txn-2", &body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_of_a_transaction_are_applied_once() {
    let f = Fixture::new().await;
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "concurrent",
            json!({ bob(&f.relay): { "BOBPHONE": {"n": 1} } }),
        )],
        vec![],
    );
    let (a, b, c) = tokio::join!(
        f.send_txn("same", &body),
        f.send_txn("same", &body),
        f.send_txn("same", &body)
    );
    for reply in [&a, &b, &c] {
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json, json!({"pdus": {}}));
    }
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);
}

/// A header signed by the test origin over `body`'s bytes exactly as given,
/// spliced into the request object as `content` (what a sender that sends
/// canonical JSON signs), for `destination` and `target`.
fn sign_raw(key: &ServerSigningKey, destination: &str, target: &str, body: &[u8]) -> String {
    let request = RequestToSign {
        method: "PUT",
        uri: target,
        origin: FAKE_ORIGIN,
        destination,
        content: None,
    };
    courier::xmatrix::XMatrix {
        origin: FAKE_ORIGIN.to_owned(),
        destination: Some(destination.to_owned()),
        key: key.key_id().to_owned(),
        sig: key.sign_bytes(&request.raw_content_bytes(Some(body))),
    }
    .to_header_value()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_re_encoded_bodies_verify_and_changed_bytes_do_not() {
    let f = Fixture::new().await;
    let us = f.us().to_owned();
    let bob = bob(&f.relay);

    // A canonical body, signed as Courier's sender signs it.
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "canonical",
            json!({ &bob: { "BOBPHONE": {"n": 1} } }),
        )],
        vec![],
    );
    let canonical = courier::canonical_json::to_canonical_bytes(&body).expect("canonical");
    let target = "/_matrix/federation/v1/send/raw-1";
    let reply = f
        .fed
        .send(
            "PUT",
            target,
            &[sign(&f.key, FAKE_ORIGIN, &us, "PUT", target, Some(&body))],
            Some(canonical.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);

    // The same bytes with one byte of a message changed after signing.
    let text = String::from_utf8(canonical).expect("UTF-8");
    let tampered = text.replace(r#"{"n":1}"#, r#"{"n":2}"#);
    assert_ne!(tampered, text);
    let target = "/_matrix/federation/v1/send/raw-2";
    let header = sign_raw(&f.key, &us, target, text.as_bytes());
    let reply = f
        .fed
        .send(
            "PUT",
            target,
            std::slice::from_ref(&header),
            Some(tampered.into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_UNAUTHORIZED");
    // The untouched bytes under the same header verify.
    let reply = f
        .fed
        .send("PUT", target, &[header], Some(text.clone().into_bytes()))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // The same body signed for another uri, and for another destination
    // (the header still naming us): refused.
    let target = "/_matrix/federation/v1/send/raw-3";
    for header in [
        sign_raw(
            &f.key,
            &us,
            "/_matrix/federation/v1/send/raw-4",
            text.as_bytes(),
        ),
        sign_raw(&f.key, "other.example", target, text.as_bytes()).replace(
            "destination=\"other.example\"",
            &format!("destination=\"{us}\""),
        ),
    ] {
        let reply = f
            .fed
            .send("PUT", target, &[header], Some(text.clone().into_bytes()))
            .await;
        assert_eq!(reply.status, 401, "{}", reply.text);
    }
    assert_eq!(
        f.store
            .inbound_txn_response(FAKE_ORIGIN, "raw-3")
            .await
            .expect("readable"),
        None
    );

    // A body that is not canonical (keys out of order, whitespace, an
    // escaped key) signed over its canonical form: verified through the
    // re-encoding, and the message stored without the whitespace.
    let pretty = format!(
        "{{\n  \"pdus\": [],\n  \"origin\": \"{FAKE_ORIGIN}\",\n  \"edus\": [ {{\n    \
         \"content\": {{ \"type\": \"m.room.encrypted\", \"sender\": \"{}\",\n      \
         \"message_id\": \"pretty\",\n      \"mess\\u0061ges\": {{ \"{bob}\": {{ \
         \"BOBLAPTOP\": {{ \"b\": [ 1, 2 ],\n \"a\": \"x y\" }} }} }} }},\n    \
         \"edu_type\": \"m.direct_to_device\" }} ]\n}}\n",
        alice()
    );
    let parsed: Value = serde_json::from_str(&pretty).expect("JSON");
    let target = "/_matrix/federation/v1/send/pretty";
    let reply = f
        .fed
        .send(
            "PUT",
            target,
            &[sign(&f.key, FAKE_ORIGIN, &us, "PUT", target, Some(&parsed))],
            Some(pretty.into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let page = f
        .store
        .fetch_inbox(&bob, "BOBLAPTOP", 0, 10)
        .await
        .expect("inbox readable");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].content_json, r#"{"b":[1,2],"a":"x y"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_damaged_requests_are_refused_and_store_nothing() {
    let f = Fixture::new().await;
    let us = f.us().to_owned();
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "forged",
            json!({ bob(&f.relay): { "BOBPHONE": {"secret": true} } }),
        )],
        vec![],
    );
    let bytes = body.to_string().into_bytes();
    let target = "/_matrix/federation/v1/send/t1";
    let good = sign(&f.key, FAKE_ORIGIN, &us, "PUT", target, Some(&body));

    let mut tampered = body.clone();
    tampered["edus"][0]["content"]["messages"][bob(&f.relay)]["BOBPHONE"]["secret"] = json!(false);
    let other_key = ServerSigningKey::from_seed("fake1", [7; 32]);
    let unknown_key = ServerSigningKey::from_seed("nope", [42; 32]);
    let cases: Vec<Case> = vec![
        (
            "tampered body",
            target.to_owned(),
            vec![good.clone()],
            tampered.to_string().into_bytes(),
            401,
        ),
        (
            "tampered uri",
            "/_matrix/federation/v1/send/t2".to_owned(),
            vec![good.clone()],
            bytes.clone(),
            401,
        ),
        (
            "added query",
            format!("{target}?x=1"),
            vec![good.clone()],
            bytes.clone(),
            401,
        ),
        (
            "tampered query",
            format!("{target}?x=2"),
            vec![sign(
                &f.key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                &format!("{target}?x=1"),
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "percent-decoded target",
            "/_matrix/federation/v1/send/a%3Ab".to_owned(),
            vec![sign(
                &f.key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                "/_matrix/federation/v1/send/a:b",
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "wrong method",
            target.to_owned(),
            vec![sign(&f.key, FAKE_ORIGIN, &us, "POST", target, Some(&body))],
            bytes.clone(),
            401,
        ),
        (
            "wrong destination in the header",
            target.to_owned(),
            vec![sign(
                &f.key,
                FAKE_ORIGIN,
                "other.example",
                "PUT",
                target,
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "signed for another destination, header without destination",
            target.to_owned(),
            vec![
                sign(
                    &f.key,
                    FAKE_ORIGIN,
                    "other.example",
                    "PUT",
                    target,
                    Some(&body),
                )
                .replace(",destination=\"other.example\"", ""),
            ],
            bytes.clone(),
            401,
        ),
        (
            "unknown key id",
            target.to_owned(),
            vec![sign(
                &unknown_key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                target,
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "signature by a different key under the trusted key id",
            target.to_owned(),
            vec![sign(
                &other_key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                target,
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "one good and one bad signature",
            target.to_owned(),
            vec![
                good.clone(),
                sign(&other_key, FAKE_ORIGIN, &us, "PUT", target, Some(&body)),
            ],
            bytes.clone(),
            401,
        ),
        (
            "origin not the key's owner",
            target.to_owned(),
            vec![sign(&f.key, "127.0.0.1:2", &us, "PUT", target, Some(&body))],
            bytes.clone(),
            401,
        ),
        (
            "missing header",
            target.to_owned(),
            vec![],
            bytes.clone(),
            401,
        ),
        (
            "another scheme",
            target.to_owned(),
            vec!["Bearer abcdef".to_owned()],
            bytes.clone(),
            401,
        ),
        (
            "garbage X-Matrix header",
            target.to_owned(),
            vec!["X-Matrix garbage".to_owned()],
            bytes.clone(),
            400,
        ),
        (
            "X-Matrix header without sig",
            target.to_owned(),
            vec![format!(
                "X-Matrix origin=\"{FAKE_ORIGIN}\",destination=\"{us}\",key=\"ed25519:fake1\""
            )],
            bytes.clone(),
            400,
        ),
        (
            "garbage signature",
            target.to_owned(),
            vec![format!(
                "X-Matrix origin=\"{FAKE_ORIGIN}\",destination=\"{us}\",key=\"ed25519:fake1\",sig=\"!!!\""
            )],
            bytes.clone(),
            401,
        ),
        (
            "invalid JSON body",
            target.to_owned(),
            vec![good.clone()],
            b"{not json".to_vec(),
            400,
        ),
    ];
    for (case, sent_target, headers, sent_body, expected) in cases {
        let reply = f
            .fed
            .send("PUT", &sent_target, &headers, Some(sent_body))
            .await;
        assert_eq!(reply.status, expected, "{case}: {}", reply.text);
        let errcode = reply.json["errcode"].as_str().unwrap_or_default();
        if case == "invalid JSON body" {
            assert_eq!(errcode, "M_NOT_JSON", "{case}");
        } else {
            assert_eq!(errcode, "M_UNAUTHORIZED", "{case}: {}", reply.text);
        }
        assert!(reply.json["error"].is_string(), "{case}: {}", reply.text);
        for txn in ["t1", "t2", "a:b", "a%3Ab"] {
            f.assert_nothing_stored(txn, case).await;
        }
    }

    // The genuine request still works afterwards, so the refusals above were
    // about the damage, not the setup.
    let reply = f
        .fed
        .send("PUT", target, std::slice::from_ref(&good), Some(bytes))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);

    // The raw (percent-encoded) target is what is verified.
    let encoded = "/_matrix/federation/v1/send/b%3Ac";
    let body2 = txn_body(vec![], vec![]);
    let auth = sign(&f.key, FAKE_ORIGIN, &us, "PUT", encoded, Some(&body2));
    let reply = f
        .fed
        .send(
            "PUT",
            encoded,
            &[auth],
            Some(body2.to_string().into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_sender_is_dropped_and_its_neighbours_delivered() {
    let f = Fixture::new().await;
    let body = txn_body(
        vec![
            to_device_edu(
                &alice(),
                "before",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "before"} } }),
            ),
            to_device_edu(
                "@mallory:evil.example",
                "spoofed",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "spoofed"} } }),
            ),
            to_device_edu(
                &bob(&f.relay),
                "claims-local",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "local"} } }),
            ),
            json!({"edu_type": "m.typing", "content": {"room_id": "!r:x", "user_id": alice(), "typing": true}}),
            json!({"edu_type": "m.direct_to_device", "content": {"sender": alice()}}),
            to_device_edu(
                &alice(),
                "after",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "after"} } }),
            ),
        ],
        vec![],
    );
    let reply = f.send_txn("spoof-txn", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let phone = f.inbox("BOBPHONE").await;
    let contents: Vec<&Value> = phone.iter().map(|m| &m["content"]["n"]).collect();
    assert_eq!(contents, vec!["before", "after"], "{phone:?}");
    assert!(phone.iter().all(|m| m["sender"] == alice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_limits_and_pdus() {
    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str("max_request_bytes = 65536\n");
    let f = Fixture::with(options).await;

    let pdus = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"event_id": format!("$event{i}:{FAKE_ORIGIN}"), "type": "m.room.message"}))
            .collect()
    };
    let reply = f.send_txn("pdus-51", &txn_body(vec![], pdus(51))).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");
    f.assert_nothing_stored("pdus-51", "51 PDUs").await;

    let edus: Vec<Value> = (0..101)
        .map(|i| {
            to_device_edu(
                &alice(),
                &format!("m{i}"),
                json!({ bob(&f.relay): { "BOBPHONE": {} } }),
            )
        })
        .collect();
    let reply = f.send_txn("edus-101", &txn_body(edus, vec![])).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");
    f.assert_nothing_stored("edus-101", "101 EDUs").await;

    // Over the body limit: 413 with a Matrix error body, nothing stored.
    let big = txn_body(
        vec![to_device_edu(
            &alice(),
            "big",
            json!({ bob(&f.relay): { "BOBPHONE": {"pad": "x".repeat(70_000)} } }),
        )],
        vec![],
    );
    let reply = f.send_txn("too-big", &big).await;
    assert_eq!(reply.status, 413, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_TOO_LARGE");
    f.assert_nothing_stored("too-big", "oversized").await;

    let reply = f
        .send_txn(
            "pdus-10",
            &txn_body(
                vec![to_device_edu(
                    &alice(),
                    "with-pdus",
                    json!({ bob(&f.relay): { "BOBPHONE": {} } }),
                )],
                pdus(10),
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let results = reply.json["pdus"].as_object().expect("pdus map");
    assert_eq!(results.len(), 10);
    for i in 0..10 {
        let result = &results[&format!("$event{i}:{FAKE_ORIGIN}")];
        assert!(result["error"].is_string(), "{result}");
    }
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);

    // A body origin other than the authenticated one.
    let mut wrong_origin = txn_body(vec![], vec![]);
    wrong_origin["origin"] = json!("evil.example");
    let reply = f.send_txn("wrong-origin", &wrong_origin).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");

    // Missing `pdus`.
    let reply = f
        .send_txn("no-pdus", &json!({"origin": FAKE_ORIGIN, "edus": []}))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_BAD_JSON");

    // The trailing-slash form of the route.
    let target = "/_matrix/federation/v1/send/slash/";
    let body = txn_body(vec![], vec![]);
    let auth = sign(&f.key, FAKE_ORIGIN, f.us(), "PUT", target, Some(&body));
    let reply = f
        .fed
        .send("PUT", target, &[auth], Some(body.to_string().into_bytes()))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // Wrong method on a known path.
    let reply = f
        .fed
        .send("GET", "/_matrix/federation/v1/send/x", &[], None)
        .await;
    assert_eq!(reply.status, 405, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_UNRECOGNIZED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_over_its_rate_is_told_to_wait() {
    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str("inbound_rate_per_origin = 1\n");
    let f = Arc::new(Fixture::with(options).await);
    // Burst is 2 × rate = 2. Twelve requests sent at once can earn at most
    // a few refilled tokens while they are in flight, so most of them must
    // be limited, whatever the machine's speed.
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..12 {
        let f = f.clone();
        requests.spawn(async move {
            f.send_txn(&format!("rate-{i}"), &txn_body(vec![], vec![]))
                .await
        });
    }
    let mut accepted = 0;
    let mut limited = Vec::new();
    while let Some(reply) = requests.join_next().await {
        let reply = reply.expect("no panic");
        match reply.status {
            200 => accepted += 1,
            429 => limited.push(reply),
            other => panic!("unexpected {other}: {}", reply.text),
        }
    }
    assert!(accepted >= 2, "the burst is allowed: {accepted}");
    assert!(
        !limited.is_empty(),
        "twelve requests at 1/s were never limited"
    );
    for reply in &limited {
        assert_eq!(reply.json["errcode"], "M_LIMIT_EXCEEDED");
        let retry_after: u64 = reply
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("Retry-After header");
        assert!((1..=2).contains(&retry_after), "{retry_after}");
        assert!(reply.json["retry_after_ms"].as_u64().is_some());
    }
    // Limited requests stored nothing.
    let mut recorded = 0;
    for i in 0..12 {
        if f.store
            .inbound_txn_response(FAKE_ORIGIN, &format!("rate-{i}"))
            .await
            .expect("readable")
            .is_some()
        {
            recorded += 1;
        }
    }
    assert_eq!(recorded, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_origins_get_403() {
    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str(&format!("origin_deny = [\"{FAKE_ORIGIN}\"]\n"));
    let f = Fixture::with(options).await;
    let reply = f.send_txn("denied", &txn_body(vec![], vec![])).await;
    assert_eq!(reply.status, 403, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_FORBIDDEN");
    f.assert_nothing_stored("denied", "denied origin").await;

    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str("origin_allow = [\"friend.example\"]\n");
    let f = Fixture::with(options).await;
    let reply = f.send_txn("not-allowed", &txn_body(vec![], vec![])).await;
    assert_eq!(reply.status, 403, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_FORBIDDEN");
}

/// The whole path: a client of relay A sends to a device on relay B; B
/// fetches A's key over TLS, verifies the transaction and the device gets
/// the message through `/sync` on B, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_deliver_a_message_once_over_real_tls() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = format!("@alice:{}", a.server_name);
    let bob = format!("@bob:{}", b.server_name);
    a.register_device(&alice, "ALICEDEV", "alice-token").await;
    b.register_device(&bob, "BOBDEV", "bob-token").await;

    let sent = a
        .send_to_device(
            "alice-token",
            "m.room.encrypted",
            "client-txn-1",
            json!({ &bob: { "BOBDEV": {"ciphertext": "hello over federation"} } }),
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text);

    let (events, since) = b
        .sync_until("bob-token", None, 1, Duration::from_secs(30))
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sender"], alice);
    assert_eq!(events[0]["type"], "m.room.encrypted");
    assert_eq!(
        events[0]["content"],
        json!({"ciphertext": "hello over federation"})
    );

    // Nothing more arrives: not a second copy, not a retry.
    let r = b.sync("bob-token", since.as_deref(), 1_000).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let more = r.json["to_device"]["events"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(more, 0, "{}", r.text);
}

// ---- the key ring over a real store ----------------------------------------

/// Serves key documents (and notary answers) from memory and counts
/// fetches.
struct MemoryFetcher {
    documents: std::sync::Mutex<std::collections::HashMap<String, Value>>,
    /// (notary, server) → the notary's answer.
    notary_answers: std::sync::Mutex<std::collections::HashMap<(String, String), Value>>,
    fetches: AtomicUsize,
    delay: Duration,
}

impl MemoryFetcher {
    fn new(delay: Duration) -> Arc<MemoryFetcher> {
        Arc::new(MemoryFetcher {
            documents: Default::default(),
            notary_answers: Default::default(),
            fetches: AtomicUsize::new(0),
            delay,
        })
    }

    fn publish(&self, server_name: &str, document: Value) {
        self.documents
            .lock()
            .expect("not poisoned")
            .insert(server_name.to_owned(), document);
    }

    fn publish_notary_answer(&self, notary: &str, server_name: &str, answer: Value) {
        self.notary_answers
            .lock()
            .expect("not poisoned")
            .insert((notary.to_owned(), server_name.to_owned()), answer);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl KeyFetcher for MemoryFetcher {
    fn fetch_server_keys<'a>(&'a self, server_name: &'a ServerName) -> FetchFuture<'a> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.documents
                .lock()
                .expect("not poisoned")
                .get(server_name.as_str())
                .cloned()
                .ok_or_else(|| "unreachable".to_owned())
        })
    }

    fn query_notary<'a>(
        &'a self,
        notary: &'a ServerName,
        server_name: &'a ServerName,
    ) -> FetchFuture<'a> {
        Box::pin(async move {
            self.notary_answers
                .lock()
                .expect("not poisoned")
                .get(&(notary.to_string(), server_name.to_string()))
                .cloned()
                .ok_or_else(|| "notary unreachable".to_owned())
        })
    }
}

async fn temp_store() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("keys.db"))
        .await
        .expect("store");
    (dir, Arc::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_fetches_once_caches_in_memory_and_store_and_coalesces() {
    let (_dir, store) = temp_store().await;
    // The fetch takes a moment so that the concurrent lookups overlap it.
    let fetcher = MemoryFetcher::new(Duration::from_millis(200));
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    fetcher.publish(
        "remote.example",
        server_key_document("remote.example", &key, &[], courier::now_ms() + 86_400_000),
    );
    let ring = Arc::new(KeyRing::with_fetcher(
        store.clone(),
        fetcher.clone(),
        Duration::from_secs(5),
    ));
    let lookups = (0..8).map(|_| {
        let ring = ring.clone();
        tokio::spawn(async move { ring.verify_key("remote.example", "ed25519:a").await })
    });
    for lookup in lookups {
        let found = lookup.await.expect("no panic").expect("key found");
        assert_eq!(found, key.verifying_key());
    }
    assert_eq!(fetcher.fetches(), 1, "concurrent lookups share one fetch");

    let stored = store.server_keys("remote.example").await.expect("readable");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key_id, "ed25519:a");
    assert!(stored[0].valid_until_ts <= courier::now_ms() + 7 * 86_400_000);

    // A fresh ring over the same store needs no fetch.
    let fresh = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    assert_eq!(
        fresh
            .verify_key("remote.example", "ed25519:a")
            .await
            .expect("from the store"),
        key.verifying_key()
    );
    assert_eq!(fetcher.fetches(), 1);

    // Right after a fetch, an unknown key id does not fetch again (the
    // refetch interval is tested with paused time below).
    assert!(
        ring.verify_key("remote.example", "ed25519:b")
            .await
            .is_err()
    );
    assert!(
        ring.verify_key("remote.example", "ed25519:c")
            .await
            .is_err()
    );
    assert_eq!(fetcher.fetches(), 1, "refetch is rate-limited per server");
    // The known key still works meanwhile.
    assert!(ring.verify_key("remote.example", "ed25519:a").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_rejects_bad_documents_and_caches_failures() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    let impostor = ServerSigningKey::from_seed("a", [2; 32]);
    let later = courier::now_ms() + 86_400_000;
    // Names another server.
    fetcher.publish(
        "wrong-name.example",
        server_key_document("elsewhere.example", &key, &[], later),
    );
    // Signed by a key that is not the one it publishes.
    let mut forged = server_key_document("forged.example", &key, &[], later);
    forged["signatures"] =
        server_key_document("forged.example", &impostor, &[], later)["signatures"].clone();
    fetcher.publish("forged.example", forged);
    // Expired.
    fetcher.publish(
        "expired.example",
        server_key_document("expired.example", &key, &[], courier::now_ms() - 1000),
    );
    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    for server in [
        "wrong-name.example",
        "forged.example",
        "expired.example",
        "unreachable.example",
    ] {
        let before = fetcher.fetches();
        assert!(
            ring.verify_key(server, "ed25519:a").await.is_err(),
            "{server}"
        );
        assert_eq!(fetcher.fetches(), before + 1, "{server}");
        // The failure is cached: a flood of requests is not a flood of fetches.
        for _ in 0..5 {
            assert!(ring.verify_key(server, "ed25519:a").await.is_err());
        }
        assert_eq!(fetcher.fetches(), before + 1, "{server}: failure cached");
        assert!(
            store
                .server_keys(server)
                .await
                .expect("readable")
                .is_empty(),
            "{server}: nothing was stored"
        );
    }
    // Old verify keys never verify requests.
    let old = courier::keys::OldVerifyKey {
        key_id: "ed25519:old".to_owned(),
        public_key: impostor.public_key_base64(),
        expired_ts: later,
    };
    fetcher.publish(
        "rotated.example",
        server_key_document("rotated.example", &key, &[old], later),
    );
    assert!(
        ring.verify_key("rotated.example", "ed25519:old")
            .await
            .is_err()
    );
    assert!(
        ring.verify_key("rotated.example", "ed25519:a")
            .await
            .is_ok()
    );
}

/// Paused time: the store runs on its own threads and no timer is pending
/// while it works, so only the explicit `advance` calls move the clock.
#[tokio::test(start_paused = true)]
async fn keyring_refetches_unknown_keys_and_failed_servers_only_after_a_while() {
    use courier::federation::keyring::{FAILURE_TTL, REFETCH_INTERVAL};
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let old_key = ServerSigningKey::from_seed("a", [1; 32]);
    let new_key = ServerSigningKey::from_seed("b", [3; 32]);
    let later = courier::now_ms() + 86_400_000;
    fetcher.publish(
        "rotating.example",
        server_key_document("rotating.example", &old_key, &[], later),
    );
    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    assert!(
        ring.verify_key("rotating.example", "ed25519:a")
            .await
            .is_ok()
    );
    assert_eq!(fetcher.fetches(), 1);

    // The server rotates to key b.
    fetcher.publish(
        "rotating.example",
        server_key_document("rotating.example", &new_key, &[], later),
    );
    assert!(
        ring.verify_key("rotating.example", "ed25519:b")
            .await
            .is_err()
    );
    assert_eq!(fetcher.fetches(), 1, "too soon to refetch");
    tokio::time::advance(REFETCH_INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(
        ring.verify_key("rotating.example", "ed25519:b")
            .await
            .expect("refetched"),
        new_key.verifying_key()
    );
    assert_eq!(fetcher.fetches(), 2);
    // Key a stays usable until its own expiry.
    assert!(
        ring.verify_key("rotating.example", "ed25519:a")
            .await
            .is_ok()
    );
    assert_eq!(fetcher.fetches(), 2);

    // An unreachable server: one fetch per FAILURE_TTL.
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_err());
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_err());
    assert_eq!(fetcher.fetches(), 3);
    tokio::time::advance(FAILURE_TTL + Duration::from_secs(1)).await;
    fetcher.publish(
        "down.example",
        server_key_document("down.example", &old_key, &[], later),
    );
    assert!(ring.verify_key("down.example", "ed25519:a").await.is_ok());
    assert_eq!(fetcher.fetches(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_falls_back_to_notaries_and_checks_both_signatures() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::ZERO);
    let later = courier::now_ms() + 86_400_000;
    let notary_key = ServerSigningKey::from_seed("n", [9; 32]);
    let impostor = ServerSigningKey::from_seed("n", [10; 32]);
    // The notary answers for itself directly.
    fetcher.publish(
        "notary.example",
        server_key_document("notary.example", &notary_key, &[], later),
    );
    let origin_doc = |name: &str, seed: u8| {
        server_key_document(
            name,
            &ServerSigningKey::from_seed("a", [seed; 32]),
            &[],
            later,
        )
    };
    let notarised = |name: &str, seed: u8, by: &ServerSigningKey| {
        let mut document = origin_doc(name, seed);
        courier::signing::sign_json(&mut document, "notary.example", by).expect("signed");
        json!({ "server_keys": [document] })
    };
    // good.example is unreachable directly; the notary vouches for it.
    fetcher.publish_notary_answer(
        "notary.example",
        "good.example",
        notarised("good.example", 11, &notary_key),
    );
    // The notary's signature is made with a key that is not the notary's.
    fetcher.publish_notary_answer(
        "notary.example",
        "badnotary.example",
        notarised("badnotary.example", 12, &impostor),
    );
    // No notary signature at all.
    fetcher.publish_notary_answer(
        "notary.example",
        "unsigned.example",
        json!({ "server_keys": [origin_doc("unsigned.example", 13)] }),
    );
    // The origin's self-signature is broken (signed by another key).
    let mut broken = origin_doc("broken.example", 14);
    broken["signatures"] = origin_doc("broken.example", 15)["signatures"].clone();
    courier::signing::sign_json(&mut broken, "notary.example", &notary_key).expect("signed");
    fetcher.publish_notary_answer(
        "notary.example",
        "broken.example",
        json!({ "server_keys": [broken] }),
    );

    let ring = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5))
        .with_notaries(vec![
            ServerName::parse("down-notary.example").expect("valid"),
            ServerName::parse("notary.example").expect("valid"),
        ]);
    assert_eq!(
        ring.verify_key("good.example", "ed25519:a")
            .await
            .expect("vouched for by the notary"),
        ServerSigningKey::from_seed("a", [11; 32]).verifying_key()
    );
    assert_eq!(
        store
            .server_keys("good.example")
            .await
            .expect("readable")
            .len(),
        1
    );
    for server in ["badnotary.example", "unsigned.example", "broken.example"] {
        assert!(
            ring.verify_key(server, "ed25519:a").await.is_err(),
            "{server} must not be trusted"
        );
        assert!(
            store
                .server_keys(server)
                .await
                .expect("readable")
                .is_empty(),
            "{server}"
        );
    }
    // Without notaries the same lookup fails.
    let direct_only = KeyRing::with_fetcher(store.clone(), fetcher.clone(), Duration::from_secs(5));
    assert!(
        direct_only
            .verify_key("other.example", "ed25519:a")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn keyring_times_out_a_slow_fetch() {
    let (_dir, store) = temp_store().await;
    let fetcher = MemoryFetcher::new(Duration::from_secs(3600));
    let key = ServerSigningKey::from_seed("a", [1; 32]);
    fetcher.publish(
        "slow.example",
        server_key_document("slow.example", &key, &[], courier::now_ms() + 86_400_000),
    );
    let ring = KeyRing::with_fetcher(store, fetcher, Duration::from_millis(100));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        ring.verify_key("slow.example", "ed25519:a"),
    )
    .await
    .expect("the key ring's own timeout fires first");
    assert!(result.is_err());
}

// ---- the fuzz corpus ---------------------------------------------------------

#[test]
fn every_send_body_corpus_file_parses_without_panicking() {
    let dir: PathBuf = crate::support::relay::repo_root().join("fuzz/corpus/send_body");
    let origin = ServerName::parse("origin.example").expect("valid");
    let us = ServerName::parse("us.example").expect("valid");
    let mut files = 0;
    let mut accepted = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("corpus file");
        files += 1;
        match courier::federation::inbound::parse_transaction(&origin, &us, &bytes) {
            Ok(parsed) => {
                accepted += 1;
                let response: Value =
                    serde_json::from_str(&parsed.response_json).expect("response is JSON");
                assert!(response["pdus"].is_object(), "{}", path.display());
            }
            Err(error) => {
                assert_eq!(error.status.as_u16(), 400, "{}: {error}", path.display());
                assert!(
                    ["M_NOT_JSON", "M_BAD_JSON"].contains(&error.errcode),
                    "{}: {error}",
                    path.display()
                );
            }
        }
    }
    assert!(files >= 10, "the seed corpus has {files} files");
    assert!(accepted >= 3, "the seed corpus has valid transactions too");
}

// ---- the parser against the Value-tree reference ----------------------------

/// The `/send` body parser as it was before it read bodies straight from
/// their bytes (over a `serde_json::Value` tree, one `to_string()` per
/// message), kept here verbatim as the reference the new parser must match.
mod value_tree_reference {
    use std::collections::BTreeMap;

    use courier::error::MatrixError;
    use courier::federation::inbound::ParsedTxn;
    use courier::federation::inbound::transaction::{
        DIRECT_TO_DEVICE, EduReport, MAX_EDUS, MAX_EVENT_TYPE_BYTES, MAX_MESSAGE_ID_CHARS,
        MAX_PDUS, PDU_ERROR,
    };
    use courier::identifiers::{ServerName, UserId};
    use courier::store::{DeviceTarget, InboundEdu, NewInboxMessage};
    use serde_json::{Map, Value};

    enum EduRejection {
        Spoofed(String),
        Invalid(String),
    }

    /// Parses a `/send` body already decoded as JSON.
    pub fn parse_transaction_value(
        origin: &ServerName,
        our_server_name: &ServerName,
        body: &Value,
    ) -> Result<ParsedTxn, MatrixError> {
        let object = body
            .as_object()
            .ok_or_else(|| MatrixError::bad_json("The transaction must be a JSON object"))?;
        match object.get("origin") {
            Some(Value::String(body_origin)) if body_origin == origin.as_str() => {}
            Some(Value::String(_)) => {
                return Err(MatrixError::bad_json(
                    "The transaction's origin is not the authenticated origin",
                ));
            }
            _ => {
                return Err(MatrixError::bad_json(
                    "The transaction's origin is missing or not a string",
                ));
            }
        }
        let pdus = match object.get("pdus") {
            Some(Value::Array(pdus)) => pdus,
            _ => {
                return Err(MatrixError::bad_json(
                    "The transaction's pdus is missing or not an array",
                ));
            }
        };
        let edus: &[Value] = match object.get("edus") {
            None | Some(Value::Null) => &[],
            Some(Value::Array(edus)) => edus,
            Some(_) => {
                return Err(MatrixError::bad_json(
                    "The transaction's edus is not an array",
                ));
            }
        };
        if pdus.len() > MAX_PDUS {
            return Err(MatrixError::bad_json(format!(
                "A transaction carries at most {MAX_PDUS} PDUs"
            )));
        }
        if edus.len() > MAX_EDUS {
            return Err(MatrixError::bad_json(format!(
                "A transaction carries at most {MAX_EDUS} EDUs"
            )));
        }

        let mut report = EduReport {
            pdus: pdus.len() as u32,
            ..EduReport::default()
        };
        let mut pdu_results = BTreeMap::new();
        for pdu in pdus {
            if let Some(event_id) = pdu.get("event_id").and_then(Value::as_str) {
                pdu_results.insert(
                    event_id.to_owned(),
                    serde_json::json!({ "error": PDU_ERROR }),
                );
            }
        }

        let mut accepted = Vec::new();
        for (index, edu) in edus.iter().enumerate() {
            let Some(edu) = edu.as_object() else {
                tracing::debug!(%origin, index, "ignoring an EDU that is not an object");
                report.invalid += 1;
                continue;
            };
            match edu.get("edu_type").and_then(Value::as_str) {
                Some(DIRECT_TO_DEVICE) => {}
                Some(_) => {
                    report.other += 1;
                    continue;
                }
                None => {
                    tracing::debug!(%origin, index, "ignoring an EDU without an edu_type");
                    report.invalid += 1;
                    continue;
                }
            }
            match parse_direct_to_device(origin, our_server_name, edu.get("content"), &mut report) {
                Ok(parsed) => {
                    report.direct_to_device += 1;
                    accepted.push(parsed);
                }
                Err(EduRejection::Spoofed(sender)) => {
                    tracing::warn!(%origin, index, sender, "dropping m.direct_to_device with a spoofed sender");
                    report.spoofed += 1;
                }
                Err(EduRejection::Invalid(reason)) => {
                    tracing::warn!(%origin, index, reason, "dropping an invalid m.direct_to_device");
                    report.invalid += 1;
                }
            }
        }

        let response = serde_json::json!({ "pdus": pdu_results });
        Ok(ParsedTxn {
            response_json: response.to_string(),
            edus: accepted,
            report,
        })
    }

    fn parse_direct_to_device(
        origin: &ServerName,
        our_server_name: &ServerName,
        content: Option<&Value>,
        report: &mut EduReport,
    ) -> Result<InboundEdu, EduRejection> {
        let invalid = |reason: &str| EduRejection::Invalid(reason.to_owned());
        let content = content
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("content is missing or not an object"))?;
        let sender = string_field(content, "sender").ok_or_else(|| invalid("sender is missing"))?;
        let sender_id = UserId::parse(sender).map_err(|_| invalid("sender is not a user ID"))?;
        if sender_id.server_name() != origin.as_str()
            || sender_id.server_name() == our_server_name.as_str()
        {
            return Err(EduRejection::Spoofed(sender.to_owned()));
        }
        let event_type = string_field(content, "type").ok_or_else(|| invalid("type is missing"))?;
        if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES {
            return Err(invalid("type is empty or longer than 255 bytes"));
        }
        let message_id =
            string_field(content, "message_id").ok_or_else(|| invalid("message_id is missing"))?;
        if message_id.chars().count() > MAX_MESSAGE_ID_CHARS {
            return Err(invalid("message_id is longer than 32 code points"));
        }
        let messages = content
            .get("messages")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid("messages is missing or not an object"))?;

        let mut out = Vec::new();
        for (recipient, by_device) in messages {
            let user = match UserId::parse(recipient) {
                Ok(user) if user.server_name() == our_server_name.as_str() => user,
                Ok(_) => {
                    tracing::warn!(%origin, recipient, "skipping a recipient that is not local");
                    report.skipped_recipients += 1;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%origin, recipient, "skipping a recipient that is not a user ID");
                    report.skipped_recipients += 1;
                    continue;
                }
            };
            let Some(by_device) = by_device.as_object() else {
                tracing::warn!(%origin, recipient, "skipping a recipient whose device map is not an object");
                report.skipped_recipients += 1;
                continue;
            };
            for (device_id, message) in by_device {
                if device_id.is_empty() || !message.is_object() {
                    tracing::warn!(%origin, recipient, device_id, "skipping a malformed device message");
                    report.skipped_recipients += 1;
                    continue;
                }
                let device = if device_id == "*" {
                    DeviceTarget::All
                } else {
                    DeviceTarget::One(device_id.clone())
                };
                out.push(NewInboxMessage {
                    user_id: user.as_str().to_owned(),
                    device,
                    sender: sender.to_owned(),
                    event_type: event_type.to_owned(),
                    content_json: message.to_string(),
                });
            }
        }
        Ok(InboundEdu {
            message_id: message_id.to_owned(),
            messages: out,
        })
    }

    fn string_field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
        object.get(name).and_then(Value::as_str)
    }
}

/// One generated JSON value, rendered with or without whitespace and with
/// or without `\u` escapes; objects are pair lists, so keys can repeat.
#[derive(Debug, Clone)]
enum J {
    Raw(&'static str),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn render_str(text: &str, escape: bool, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            'e' | 'u' | '@' | '*' if escape => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn render(value: &J, escape: bool, space: &str, out: &mut String) {
    match value {
        J::Raw(raw) => out.push_str(raw),
        J::Str(text) => render_str(text, escape, out),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(space);
                render(item, escape, space, out);
            }
            out.push_str(space);
            out.push(']');
        }
        J::Obj(pairs) => {
            out.push('{');
            for (i, (key, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(space);
                render_str(key, escape, out);
                out.push_str(space);
                out.push(':');
                out.push_str(space);
                render(item, escape, space, out);
            }
            out.push_str(space);
            out.push('}');
        }
    }
}

mod generated {
    use super::J;
    use proptest::prelude::*;

    fn scalar() -> impl Strategy<Value = J> {
        prop_oneof![
            prop::sample::select(vec![
                "null",
                "true",
                "1",
                "-0",
                "1.50",
                "1e2",
                "2.5",
                "9007199254740993"
            ])
            .prop_map(J::Raw),
            prop::sample::select(vec![
                "",
                "x y",
                "m.room.encrypted",
                "origin.example",
                "é\n\"q\\"
            ])
            .prop_map(|s| J::Str(s.to_owned())),
        ]
    }

    fn any_value() -> impl Strategy<Value = J> {
        scalar().prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(J::Arr),
                prop::collection::vec((prop::sample::select(vec!["a", "b", "a b"]), inner), 0..3)
                    .prop_map(|pairs| J::Obj(
                        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
            ]
        })
    }

    /// An object with each of `fields` present most of the time (its value
    /// of the wrong kind now and then), plus repeated or unknown keys, in
    /// any order.
    fn object(fields: Vec<(&'static str, BoxedStrategy<J>)>) -> BoxedStrategy<J> {
        let parts: Vec<BoxedStrategy<Option<(String, J)>>> = fields
            .iter()
            .map(|(key, value)| {
                let key = *key;
                proptest::option::weighted(
                    0.95,
                    prop_oneof![15 => value.clone(), 1 => any_value()]
                        .prop_map(move |v| (key.to_owned(), v)),
                )
                .boxed()
            })
            .collect();
        let mut extra: Vec<BoxedStrategy<(String, J)>> = fields
            .into_iter()
            .map(|(key, value)| {
                prop_oneof![3 => value, 1 => any_value()]
                    .prop_map(move |v| (key.to_owned(), v))
                    .boxed()
            })
            .collect();
        extra.push(any_value().prop_map(|v| ("x".to_owned(), v)).boxed());
        (
            parts,
            prop::collection::vec(prop::strategy::Union::new(extra), 0..2),
        )
            .prop_map(|(parts, extra)| {
                let mut pairs: Vec<(String, J)> = parts.into_iter().flatten().collect();
                pairs.extend(extra);
                pairs
            })
            .prop_shuffle()
            .prop_map(J::Obj)
            .boxed()
    }

    /// One of `values`, the first (the valid one) three times in four.
    fn string_of(values: Vec<&'static str>) -> BoxedStrategy<J> {
        let first = values[0];
        prop_oneof![
            3 => Just(J::Str(first.to_owned())),
            1 => prop::sample::select(values).prop_map(|s| J::Str(s.to_owned())),
        ]
        .boxed()
    }

    fn message() -> BoxedStrategy<J> {
        prop_oneof![3 => any_value().prop_map(|v| J::Obj(vec![("k".to_owned(), v)])), 1 => any_value()].boxed()
    }

    fn devices() -> BoxedStrategy<J> {
        prop_oneof![
            5 => prop::collection::vec((prop::sample::select(vec!["D", "E", "*", ""]), message()), 0..4)
                .prop_map(|pairs| J::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            1 => any_value(),
        ]
        .boxed()
    }

    fn messages() -> BoxedStrategy<J> {
        let recipients = vec![
            "@b:us.example",
            "@user:us.example",
            "@c:elsewhere.example",
            "bad",
            "@b:us.example",
        ];
        prop_oneof![
            5 => prop::collection::vec((prop::sample::select(recipients), devices()), 0..4)
                .prop_map(|pairs| J::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            1 => any_value(),
        ]
        .boxed()
    }

    fn content() -> BoxedStrategy<J> {
        object(vec![
            (
                "sender",
                string_of(vec![
                    "@a:origin.example",
                    "@m:evil.example",
                    "@m:us.example",
                    "nope",
                ]),
            ),
            ("type", string_of(vec!["m.room.encrypted", ""])),
            (
                "message_id",
                string_of(vec!["m1", "m2", "0123456789012345678901234567890123"]),
            ),
            ("messages", messages()),
        ])
    }

    fn edu() -> BoxedStrategy<J> {
        prop_oneof![
            8 => object(vec![
                ("edu_type", string_of(vec!["m.direct_to_device", "m.direct_to_device", "m.typing"])),
                ("content", content()),
            ]),
            1 => any_value(),
        ]
        .boxed()
    }

    fn pdu() -> BoxedStrategy<J> {
        object(vec![("event_id", string_of(vec!["$1", "$2", "$é"]))])
    }

    pub fn body() -> BoxedStrategy<J> {
        object(vec![
            (
                "origin",
                string_of(vec!["origin.example", "origin.example", "other.example"]),
            ),
            (
                "pdus",
                prop::collection::vec(pdu(), 0..3).prop_map(J::Arr).boxed(),
            ),
            (
                "edus",
                prop::collection::vec(edu(), 0..4).prop_map(J::Arr).boxed(),
            ),
        ])
    }
}

/// The new parser's answer equals the reference's: the same error, or the
/// same response, report and rows, each stored content the same JSON value
/// (the new parser keeps the sender's text, the reference re-serialized it)
/// without whitespace outside strings.
/// Returns how many messages were accepted, `None` for a refused body.
fn assert_matches_reference(bytes: &[u8]) -> Option<usize> {
    let origin = ServerName::parse("origin.example").expect("valid");
    let us = ServerName::parse("us.example").expect("valid");
    let new = courier::federation::inbound::parse_transaction(&origin, &us, bytes);
    let reference = match serde_json::from_slice::<Value>(bytes) {
        Err(_) => Err(courier::error::MatrixError::not_json(
            "The request body is not valid JSON",
        )),
        Ok(value) => value_tree_reference::parse_transaction_value(&origin, &us, &value),
    };
    let text = String::from_utf8_lossy(bytes);
    match (new, reference) {
        (Err(new), Err(reference)) => {
            assert_eq!(
                (new.status, new.errcode, new.message),
                (reference.status, reference.errcode, reference.message),
                "{text}"
            );
            None
        }
        (Ok(new), Ok(reference)) => {
            assert_eq!(new.response_json, reference.response_json, "{text}");
            assert_eq!(new.report, reference.report, "{text}");
            assert_eq!(new.edus.len(), reference.edus.len(), "{text}");
            for (new, reference) in new.edus.iter().zip(&reference.edus) {
                assert_eq!(new.message_id, reference.message_id, "{text}");
                assert_eq!(new.messages.len(), reference.messages.len(), "{text}");
                for (new, reference) in new.messages.iter().zip(&reference.messages) {
                    assert_eq!(
                        (&new.user_id, &new.device, &new.sender, &new.event_type),
                        (
                            &reference.user_id,
                            &reference.device,
                            &reference.sender,
                            &reference.event_type
                        ),
                        "{text}"
                    );
                    let new_content: Value = serde_json::from_str(&new.content_json).expect("JSON");
                    let reference_content: Value =
                        serde_json::from_str(&reference.content_json).expect("JSON");
                    assert_eq!(new_content, reference_content, "{text}");
                    assert!(new_content.is_object());
                    assert!(
                        !new.content_json.contains(['\n', '\t', '\r'])
                            && !new.content_json.contains(": ")
                            && !new.content_json.contains(", "),
                        "{}",
                        new.content_json
                    );
                }
            }
            Some(new.edus.iter().map(|edu| edu.messages.len()).sum())
        }
        (new, reference) => panic!("{text}: new {new:?}, reference {reference:?}"),
    }
}

#[test]
fn the_send_body_corpus_parses_as_the_value_tree_reference_did() {
    let dir: PathBuf = crate::support::relay::repo_root().join("fuzz/corpus/send_body");
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("corpus file");
        let _ = assert_matches_reference(&bytes);
    }
}

#[test]
fn generated_send_bodies_parse_as_the_value_tree_reference_did() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRunner};
    let strategy = (
        generated::body(),
        proptest::prelude::any::<bool>(),
        proptest::sample::select(vec!["", " ", "\n\t "]),
    );
    let mut runner = TestRunner::new(Config::default());
    let (mut with_messages, mut refused) = (0, 0);
    for _ in 0..3000 {
        let (body, escape, space) = strategy
            .new_tree(&mut runner)
            .expect("a generated body")
            .current();
        let mut text = String::new();
        render(&body, escape, space, &mut text);
        match assert_matches_reference(text.as_bytes()) {
            Some(0) => {}
            Some(_) => with_messages += 1,
            None => refused += 1,
        }
    }
    // The generator reaches both outcomes, and messages, often enough.
    assert!(with_messages >= 100, "{with_messages} bodies with messages");
    assert!(refused >= 100, "{refused} refused bodies");
}
