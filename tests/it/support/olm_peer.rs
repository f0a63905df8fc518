//! `OlmPeer`: one device of one user with matrix-rust-sdk's `OlmMachine`,
//! driven over a relay's client API as a real client would. The machine
//! decides what to send (`outgoing_requests`: key uploads, key queries,
//! to-device messages); the driver turns each request into HTTP with ruma,
//! sends it to the relay, parses the answer into the machine's response type
//! and hands it back (`mark_request_as_sent`). `/sync` answers are fed to
//! `receive_sync_changes` (to-device events, one-time key counts, unused
//! fallback key types, `device_lists`), which decrypts what is encrypted.
//! Claims go through `get_missing_sessions`, encryption through
//! `Device::encrypt_event_raw`. Courier only carries what the machine
//! produced; nothing here encrypts or signs by hand.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use matrix_sdk_common::deserialized_responses::{AlgorithmInfo, ProcessedToDeviceEvent};
use matrix_sdk_crypto::types::requests::{AnyOutgoingRequest, KeysQueryRequest, ToDeviceRequest};
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSyncChanges, OlmMachine, TrustRequirement,
};
use ruma::api::auth_scheme::{AccessToken, SendAccessToken};
use ruma::api::client::keys::{claim_keys, get_keys, upload_keys};
use ruma::api::client::sync::sync_events::DeviceLists;
use ruma::api::client::to_device::send_event_to_device;
use ruma::api::path_builder::VersionHistory;
use ruma::api::{IncomingResponse, OutgoingRequest, SupportedVersions};
use ruma::events::AnyToDeviceEvent;
use ruma::serde::Raw;
use ruma::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId, TransactionId, UInt, UserId};
use serde_json::{Value, json};

use super::http::HttpClient;
use super::relay::{TestRelay, encode};

/// At most 400 characters of a request body, for failure messages (a key
/// upload is many kilobytes).
fn short(text: &str) -> String {
    match text.char_indices().nth(400) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A decrypted to-device event: the plaintext event (`sender`, `type`,
/// `content`, …) and who the machine says sent it.
#[derive(Debug)]
pub struct Decrypted {
    pub event: Value,
    pub sender: OwnedUserId,
    pub sender_device: Option<OwnedDeviceId>,
    pub sender_curve25519: String,
}

pub struct OlmPeer {
    client_url: String,
    http: HttpClient,
    pub machine: OlmMachine,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    token: String,
    since: Option<String>,
    /// The last `/sync` answer, whole.
    pub last_sync: Value,
    versions: SupportedVersions,
}

impl OlmPeer {
    /// Registers `@<localpart>:<relay>` / `device_id` over the relay's RPC and
    /// gives it a fresh in-memory `OlmMachine`.
    pub async fn register(relay: &TestRelay, localpart: &str, device_id: &str) -> Self {
        let user = format!("@{localpart}:{}", relay.server_name);
        let token = format!("olm-token-{localpart}-{device_id}");
        relay.register_device(&user, device_id, &token).await;
        Self::new(&relay.client_url, &user, device_id, &token).await
    }

    /// A fresh in-memory `OlmMachine` for a device that already has
    /// `token` on the homeserver at `client_url` (any homeserver).
    pub async fn new(client_url: &str, user: &str, device_id: &str, token: &str) -> Self {
        let user_id = UserId::parse(user).expect("valid user id");
        let device_id: OwnedDeviceId = device_id.into();
        let machine = OlmMachine::new(&user_id, &device_id).await;
        OlmPeer {
            client_url: client_url.trim_end_matches('/').to_owned(),
            http: HttpClient::new(),
            machine,
            user_id,
            device_id,
            token: token.to_owned(),
            since: None,
            last_sync: Value::Null,
            versions: SupportedVersions::from_parts(&["v1.11".to_owned()], &BTreeMap::new()),
        }
    }

    /// The device's Ed25519 and Curve25519 keys, unpadded base64.
    pub fn identity_keys(&self) -> (String, String) {
        let keys = self.machine.identity_keys();
        (keys.ed25519.to_base64(), keys.curve25519.to_base64())
    }

    /// Sends everything the machine wants sent, until it wants nothing more
    /// (at most 5 rounds: an upload answer can make it upload once more).
    pub async fn flush(&self) {
        for _ in 0..5 {
            let requests = self.machine.outgoing_requests().await.expect("outgoing");
            if requests.is_empty() {
                return;
            }
            for request in requests {
                self.send(request.request_id(), request.request()).await;
            }
        }
        panic!(
            "{}: the machine still has requests after 5 rounds",
            self.user_id
        );
    }

    async fn send(&self, id: &TransactionId, request: &AnyOutgoingRequest) {
        match request {
            AnyOutgoingRequest::KeysUpload(r) => {
                let response: upload_keys::v3::Response = self.call(r.clone()).await;
                self.machine
                    .mark_request_as_sent(id, &response)
                    .await
                    .expect("keys upload marked");
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let response = self.query(r).await;
                self.machine
                    .mark_request_as_sent(id, &response)
                    .await
                    .expect("keys query marked");
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let response: claim_keys::v3::Response = self.call(r.clone()).await;
                self.machine
                    .mark_request_as_sent(id, &response)
                    .await
                    .expect("keys claim marked");
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => {
                let response = self.to_device(r).await;
                self.machine
                    .mark_request_as_sent(id, &response)
                    .await
                    .expect("to-device marked");
            }
            other => panic!("{}: unexpected request {other:?}", self.user_id),
        }
    }

    /// One ruma request over HTTP; a non-200 answer or one the machine's
    /// types cannot parse fails the test with the request and the answer.
    async fn call<R>(&self, request: R) -> R::IncomingResponse
    where
        R: OutgoingRequest<Authentication = AccessToken, PathBuilder = VersionHistory>,
    {
        let req: http::Request<Vec<u8>> = request
            .try_into_http_request(
                &self.client_url,
                SendAccessToken::Always(&self.token),
                Cow::Borrowed(&self.versions),
            )
            .expect("request to HTTP");
        let (method, url) = (req.method().to_string(), req.uri().to_string());
        let body = short(&String::from_utf8_lossy(req.body()));
        let answer = self
            .http
            .request(&method, &url, Some(&self.token), Some(req.into_body()))
            .await;
        assert_eq!(
            answer.status, 200,
            "{}: {method} {url} {body} -> {} {}",
            self.user_id, answer.status, answer.text
        );
        let response = http::Response::builder()
            .status(answer.status)
            .header("content-type", "application/json")
            .body(answer.text.clone().into_bytes())
            .expect("response");
        R::IncomingResponse::try_from_http_response(response).unwrap_or_else(|error| {
            panic!(
                "{}: {method} {url} {body}: answer {} not understood: {error}",
                self.user_id, answer.text
            )
        })
    }

    async fn post_json(&self, path: &str, body: &Value) -> String {
        let url = format!("{}/_matrix/client/v3{path}", self.client_url);
        let answer = self.http.post_json(&url, Some(&self.token), body).await;
        assert_eq!(
            answer.status,
            200,
            "{}: POST {url} {} -> {} {}",
            self.user_id,
            short(&body.to_string()),
            answer.status,
            answer.text
        );
        answer.text
    }

    async fn query(&self, request: &KeysQueryRequest) -> get_keys::v3::Response {
        let mut body = json!({ "device_keys": request.device_keys });
        if let Some(timeout) = request.timeout {
            body["timeout"] = json!(timeout.as_millis() as u64);
        }
        let text = self.post_json("/keys/query", &body).await;
        let response = http::Response::builder()
            .status(200)
            .body(text.clone().into_bytes())
            .expect("response");
        get_keys::v3::Response::try_from_http_response(response)
            .unwrap_or_else(|error| panic!("/keys/query {body} answered {text}: {error}"))
    }

    async fn to_device(&self, request: &ToDeviceRequest) -> send_event_to_device::v3::Response {
        let url = format!(
            "{}/_matrix/client/v3/sendToDevice/{}/{}",
            self.client_url,
            encode(&request.event_type.to_string()),
            encode(request.txn_id.as_str())
        );
        let body = json!({ "messages": request.messages });
        let answer = self.http.put_json(&url, Some(&self.token), &body).await;
        assert_eq!(
            answer.status, 200,
            "{}: PUT {url} -> {} {}",
            self.user_id, answer.status, answer.text
        );
        send_event_to_device::v3::Response::new()
    }

    /// Tracks `user` (no shared room makes the machine do it) and sends the
    /// key query that follows.
    pub async fn track(&self, user: &UserId) {
        self.machine
            .update_tracked_users([user])
            .await
            .expect("tracked");
        self.flush().await;
    }

    /// Claims one-time keys of every device of `user` the machine has no Olm
    /// session with; true if it had to claim.
    pub async fn claim_missing(&self, user: &UserId) -> bool {
        let missing = self
            .machine
            .get_missing_sessions([user].into_iter())
            .await
            .expect("missing sessions");
        let Some((id, request)) = missing else {
            return false;
        };
        let response: claim_keys::v3::Response = self.call(request).await;
        assert!(
            response.failures.is_empty(),
            "{}: /keys/claim failures {:?}",
            self.user_id,
            response.failures
        );
        self.machine
            .mark_request_as_sent(&id, &response)
            .await
            .expect("claim marked");
        true
    }

    /// Encrypts `{type, content}` for one device of another user with the
    /// machine's Olm session and sends it as `m.room.encrypted`.
    pub async fn send_encrypted(
        &self,
        user: &UserId,
        device: &str,
        event_type: &str,
        content: &Value,
    ) {
        let target = self
            .machine
            .get_device(user, device.into(), None)
            .await
            .expect("device lookup")
            .unwrap_or_else(|| panic!("{}: {user}/{device} unknown", self.user_id));
        let encrypted = target
            .encrypt_event_raw(event_type, content, CollectStrategy::AllDevices)
            .await
            .unwrap_or_else(|error| {
                panic!("{}: encrypt for {user}/{device}: {error}", self.user_id)
            });
        let url = format!(
            "{}/_matrix/client/v3/sendToDevice/m.room.encrypted/{}",
            self.client_url,
            encode(TransactionId::new().as_str())
        );
        let body = json!({ "messages": { user.as_str(): { device: encrypted } } });
        let answer = self.http.put_json(&url, Some(&self.token), &body).await;
        assert_eq!(
            answer.status, 200,
            "{}: PUT {url} -> {} {}",
            self.user_id, answer.status, answer.text
        );
    }

    /// One `/sync` (long-poll `timeout_ms`), fed to the machine. Returns
    /// what it decrypted; a to-device event it could not decrypt, or one
    /// that came in plain text, fails the test.
    pub async fn sync(&mut self, timeout_ms: u64) -> Vec<Decrypted> {
        let mut url = format!(
            "{}/_matrix/client/v3/sync?timeout={timeout_ms}",
            self.client_url
        );
        if let Some(since) = &self.since {
            url.push_str(&format!("&since={}", encode(since)));
        }
        let answer = self.http.get(&url, Some(&self.token)).await;
        assert_eq!(
            answer.status, 200,
            "{}: /sync -> {}",
            self.user_id, answer.text
        );
        let body = answer.json;
        let next_batch = body["next_batch"]
            .as_str()
            .unwrap_or_else(|| panic!("/sync without next_batch: {body}"))
            .to_owned();
        let events: Vec<Raw<AnyToDeviceEvent>> =
            serde_json::from_value(body["to_device"]["events"].clone()).unwrap_or_default();
        let lists: DeviceLists = serde_json::from_value(body["device_lists"].clone())
            .unwrap_or_else(|_| DeviceLists::new());
        let counts: BTreeMap<OneTimeKeyAlgorithm, UInt> =
            serde_json::from_value(body["device_one_time_keys_count"].clone()).unwrap_or_default();
        let fallback: Option<Vec<OneTimeKeyAlgorithm>> =
            serde_json::from_value(body["device_unused_fallback_key_types"].clone()).ok();
        let changes = EncryptionSyncChanges {
            to_device_events: events,
            changed_devices: &lists,
            one_time_keys_counts: &counts,
            unused_fallback_keys: fallback.as_deref(),
            next_batch_token: Some(next_batch.clone()),
        };
        let settings = DecryptionSettings {
            sender_device_trust_requirement: TrustRequirement::Untrusted,
        };
        let (processed, _) = self
            .machine
            .receive_sync_changes(changes, &settings)
            .await
            .expect("sync changes");
        self.since = Some(next_batch);
        self.last_sync = body;
        processed
            .into_iter()
            .map(|event| match event {
                ProcessedToDeviceEvent::Decrypted {
                    raw,
                    encryption_info,
                } => {
                    let AlgorithmInfo::OlmV1Curve25519AesSha2 {
                        curve25519_public_key_base64,
                    } = encryption_info.algorithm_info
                    else {
                        panic!("not Olm: {:?}", encryption_info.algorithm_info)
                    };
                    Decrypted {
                        event: serde_json::from_str(raw.json().get()).expect("decrypted JSON"),
                        sender: encryption_info.sender,
                        sender_device: encryption_info.sender_device,
                        sender_curve25519: curve25519_public_key_base64,
                    }
                }
                other => panic!("{}: not decrypted: {other:?}", self.user_id),
            })
            .collect()
    }

    /// Syncs until an event of `event_type` is decrypted or `within` passes.
    pub async fn receive(&mut self, event_type: &str, within: Duration) -> Decrypted {
        let end = tokio::time::Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no {event_type} decrypted within {within:?}",
                self.user_id
            );
            let timeout = left.as_millis().min(5_000) as u64;
            let mut got = self.sync(timeout).await;
            if let Some(i) = got.iter().position(|d| d.event["type"] == event_type) {
                let rest = got.split_off(i + 1);
                assert!(
                    rest.iter().all(|d| d.event["type"] != event_type),
                    "{}: more than one {event_type}: {rest:?}",
                    self.user_id
                );
                return got.swap_remove(i);
            }
        }
    }
}
