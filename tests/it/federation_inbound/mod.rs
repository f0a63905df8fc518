//! Inbound federation against real relays on loopback over real TLS, one
//! file per topic: X-Matrix authentication, spoofed senders and origin
//! policy (`auth`); transaction and message_id dedupe, restarts and
//! delivery between two relays (`dedupe`); transaction limits and rate
//! limiting (`limits`); the key ring over a real SQLite store (`keyring`);
//! the `send_body` fuzz corpus through the parser and the parser against the
//! `Value`-tree parser it replaced (`parser_reference`).
//!
//! This file holds what the relay tests share. Requests from a fake origin
//! are signed here with a test key that is put into the receiving relay's
//! `server_keys` table (the key ring's store cache, a real verification
//! path). The fake origin is `127.0.0.1:1`, so if the relay ever tries to
//! fetch its keys, the connection is refused at once.

mod auth;
mod dedupe;
mod keyring;
mod limits;
mod parser_reference;

use crate::support::tls_client::{Reply, https_exchange};
use crate::support::{TestRelay, TestRelayOptions};
use courier::keys::ServerSigningKey;
use courier::store::sqlite::SqliteStore;
use courier::store::{Store, StoredServerKey};
use courier::xmatrix::{RequestToSign, sign_request};
use hyper::body::Bytes;
use serde_json::{Value, json};

const FAKE_ORIGIN: &str = "127.0.0.1:1";

/// Raw request targets to a relay's federation listener over real TLS
/// (`support::tls_client`), with any `Authorization` header values.
struct FedClient {
    addr: std::net::SocketAddr,
}

impl FedClient {
    fn new(relay: &TestRelay) -> FedClient {
        FedClient {
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
        let mut headers: Vec<(&str, String)> = authorization
            .iter()
            .map(|value| ("Authorization", value.clone()))
            .collect();
        if body.is_some() {
            headers.push(("Content-Type", "application/json".to_owned()));
        }
        https_exchange(
            self.addr,
            "localhost",
            "localhost",
            method,
            target,
            &headers,
            body.map(Bytes::from),
        )
        .await
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
                valid_until_ts: courier::clock::now_ms() + 3_600_000,
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
    json!({"origin": FAKE_ORIGIN, "origin_server_ts": courier::clock::now_ms(), "pdus": pdus, "edus": edus})
}

fn alice() -> String {
    format!("@alice:{FAKE_ORIGIN}")
}
