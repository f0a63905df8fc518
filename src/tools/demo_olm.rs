//! The demo's encrypted scenario (feature `demo-olm`, on by default): two
//! demo clients with Olm accounts from `vodozemac` (the Olm of
//! matrix-rust-sdk), Carol on relay A and Dave on relay B. Each publishes
//! signed device keys and signed one-time keys (`/keys/upload`); Carol looks
//! Dave up through her relay (`/keys/query`, so over federation) and checks
//! his device's self-signature, claims one of his one-time keys
//! (`/keys/claim`) and checks its signature, opens an Olm session and sends
//! him an `m.room.encrypted` to-device message; Dave's client decrypts it
//! from `/sync` and answers on the new session; Carol decrypts the answer.
//!
//! The relays only carry ciphertext: the Olm peers are the demo's clients,
//! not part of Courier. A production build leaves this file and `vodozemac`
//! out with `--no-default-features`; `tests/tidy.rs` checks that nothing
//! outside `src/tools/` names an Olm crate.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::canonical_json::to_canonical_string;
use crate::tools::dev_pair::{DevPairError, DevRelay, dev_token, register_device};
use crate::tools::plain_http::{HttpError, JsonClient, encode_segment};

const OLM: &str = "m.olm.v1.curve25519-aes-sha2";
const OTK: &str = "signed_curve25519";
const EVENT_TYPE: &str = "org.example.courier.demo.secret";

/// One demo client: a device with an Olm account.
struct Client<'a> {
    relay: &'a DevRelay,
    user: String,
    device: String,
    token: String,
    account: Account,
    since: Option<String>,
}

/// The other side's device as looked up: its identity keys.
struct Peer {
    user: String,
    device: String,
    curve25519: Curve25519PublicKey,
    ed25519: Ed25519PublicKey,
}

#[derive(Debug, thiserror::Error)]
pub enum OlmDemoError {
    #[error(transparent)]
    Pair(#[from] DevPairError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("encrypted scenario: {0}")]
    Failed(String),
}

/// What the scenario counted: messages sent, decrypted and checked on the
/// other side, and repeats seen afterwards.
pub struct Exchange {
    pub sent: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub elapsed: Duration,
}

fn failed(what: impl Into<String>) -> OlmDemoError {
    OlmDemoError::Failed(what.into())
}

/// Canonical JSON of `object` without `signatures` and `unsigned`: what a
/// Matrix signature covers.
fn signed_bytes(object: &Value) -> Result<String, OlmDemoError> {
    let mut bare = object.clone();
    if let Some(map) = bare.as_object_mut() {
        map.remove("signatures");
        map.remove("unsigned");
    }
    to_canonical_string(&bare).map_err(|e| failed(format!("canonical JSON: {e}")))
}

/// Checks `object`'s signature by `user`'s device `device` with `key`.
fn verify(
    object: &Value,
    user: &str,
    device: &str,
    key: &Ed25519PublicKey,
) -> Result<(), OlmDemoError> {
    let signature = object["signatures"][user][format!("ed25519:{device}")]
        .as_str()
        .ok_or_else(|| failed(format!("no signature by {user}/{device}")))?;
    let signature = Ed25519Signature::from_base64(signature)
        .map_err(|e| failed(format!("signature by {user}/{device}: {e}")))?;
    key.verify(signed_bytes(object)?.as_bytes(), &signature)
        .map_err(|e| failed(format!("bad signature by {user}/{device}: {e}")))
}

impl<'a> Client<'a> {
    async fn register(
        http: &JsonClient,
        relay: &'a DevRelay,
        user: String,
        device: &str,
    ) -> Result<Client<'a>, OlmDemoError> {
        register_device(http, relay, &user, device).await?;
        Ok(Client {
            relay,
            token: dev_token(&user, device),
            user,
            device: device.to_owned(),
            account: Account::new(),
            since: None,
        })
    }

    async fn post(
        &self,
        http: &JsonClient,
        path: &str,
        body: &Value,
    ) -> Result<Value, OlmDemoError> {
        let url = format!("{}/_matrix/client/v3{path}", self.relay.client_url);
        let r = http
            .request("POST", &url, Some(&self.token), Some(body))
            .await?;
        if r.status != 200 {
            return Err(failed(format!(
                "POST {path} answered {} {}",
                r.status, r.body
            )));
        }
        Ok(r.body)
    }

    fn sign(&self, mut object: Value) -> Result<Value, OlmDemoError> {
        let signature = self.account.sign(signed_bytes(&object)?).to_base64();
        object["signatures"] =
            json!({ self.user.clone(): { format!("ed25519:{}", self.device): signature } });
        Ok(object)
    }

    /// `/keys/upload`: signed device keys and `count` signed one-time keys.
    async fn upload_keys(&mut self, http: &JsonClient, count: usize) -> Result<(), OlmDemoError> {
        let keys = self.account.identity_keys();
        let device_keys = self.sign(json!({
            "user_id": self.user,
            "device_id": self.device,
            "algorithms": [OLM, "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", self.device): keys.curve25519.to_base64(),
                format!("ed25519:{}", self.device): keys.ed25519.to_base64(),
            },
        }))?;
        self.account.generate_one_time_keys(count);
        let mut one_time_keys = serde_json::Map::new();
        for (id, key) in self.account.one_time_keys() {
            let signed = self.sign(json!({ "key": key.to_base64() }))?;
            one_time_keys.insert(format!("{OTK}:{}", id.to_base64()), signed);
        }
        let body = json!({ "device_keys": device_keys, "one_time_keys": one_time_keys });
        let answer = self.post(http, "/keys/upload", &body).await?;
        if answer["one_time_key_counts"][OTK].as_u64() != Some(count as u64) {
            return Err(failed(format!(
                "/keys/upload counted {answer}, uploaded {count}"
            )));
        }
        self.account.mark_keys_as_published();
        Ok(())
    }

    /// `/keys/query` for `user`'s `device`; checks its IDs and self-signature.
    async fn query(
        &self,
        http: &JsonClient,
        user: &str,
        device: &str,
    ) -> Result<Peer, OlmDemoError> {
        let answer = self
            .post(
                http,
                "/keys/query",
                &json!({ "device_keys": { user: [device] }, "timeout": 10_000 }),
            )
            .await?;
        let keys = &answer["device_keys"][user][device];
        if keys["user_id"] != user || keys["device_id"] != device {
            return Err(failed(format!(
                "/keys/query for {user}/{device} answered {answer}"
            )));
        }
        let key = |algorithm: &str| {
            keys["keys"][format!("{algorithm}:{device}")]
                .as_str()
                .ok_or_else(|| failed(format!("{user}/{device} has no {algorithm} key")))
        };
        let ed25519 = Ed25519PublicKey::from_base64(key("ed25519")?)
            .map_err(|e| failed(format!("{user}/{device} ed25519 key: {e}")))?;
        let curve25519 = Curve25519PublicKey::from_base64(key("curve25519")?)
            .map_err(|e| failed(format!("{user}/{device} curve25519 key: {e}")))?;
        verify(keys, user, device, &ed25519)?;
        Ok(Peer {
            user: user.to_owned(),
            device: device.to_owned(),
            curve25519,
            ed25519,
        })
    }

    /// `/keys/claim` of one of `peer`'s one-time keys; checks its signature.
    async fn claim(
        &self,
        http: &JsonClient,
        peer: &Peer,
    ) -> Result<Curve25519PublicKey, OlmDemoError> {
        let body = json!({ "one_time_keys": { peer.user.clone(): { peer.device.clone(): OTK } }, "timeout": 10_000 });
        let answer = self.post(http, "/keys/claim", &body).await?;
        let claimed = answer["one_time_keys"][&peer.user][&peer.device]
            .as_object()
            .and_then(|keys| keys.values().next())
            .ok_or_else(|| failed(format!("/keys/claim answered {answer}")))?;
        verify(claimed, &peer.user, &peer.device, &peer.ed25519)?;
        let key = claimed["key"]
            .as_str()
            .ok_or_else(|| failed(format!("claimed key without \"key\": {claimed}")))?;
        Curve25519PublicKey::from_base64(key).map_err(|e| failed(format!("claimed key: {e}")))
    }

    /// Encrypts `content` for `peer` on `session` and sends it as `m.room.encrypted`.
    async fn send_encrypted(
        &self,
        http: &JsonClient,
        session: &mut Session,
        peer: &Peer,
        content: &Value,
        txn: &str,
    ) -> Result<(), OlmDemoError> {
        let keys = self.account.identity_keys();
        let payload = json!({
            "type": EVENT_TYPE,
            "content": content,
            "sender": self.user,
            "sender_device": self.device,
            "keys": { "ed25519": keys.ed25519.to_base64() },
            "recipient": peer.user,
            "recipient_keys": { "ed25519": peer.ed25519.to_base64() },
        });
        let message = session
            .encrypt(payload.to_string())
            .map_err(|e| failed(format!("encrypt: {e}")))?;
        let encrypted = json!({
            "algorithm": OLM,
            "sender_key": keys.curve25519.to_base64(),
            "ciphertext": { peer.curve25519.to_base64(): message },
        });
        let url = format!(
            "{}/_matrix/client/v3/sendToDevice/m.room.encrypted/{}",
            self.relay.client_url,
            encode_segment(txn)
        );
        let body = json!({ "messages": { peer.user.clone(): { peer.device.clone(): encrypted } } });
        let r = http
            .request("PUT", &url, Some(&self.token), Some(&body))
            .await?;
        if r.status != 200 {
            return Err(failed(format!(
                "sendToDevice answered {} {}",
                r.status, r.body
            )));
        }
        Ok(())
    }

    /// Syncs until an `m.room.encrypted` event from `from` arrives; returns
    /// its Olm message for our key.
    async fn next_encrypted(
        &mut self,
        http: &JsonClient,
        from: &Peer,
    ) -> Result<OlmMessage, OlmDemoError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mine = self.account.identity_keys().curve25519.to_base64();
        loop {
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "no message from {} reached {}",
                    from.user, self.user
                )));
            }
            let mut url = format!(
                "{}/_matrix/client/v3/sync?timeout=5000",
                self.relay.client_url
            );
            if let Some(since) = &self.since {
                url.push_str(&format!("&since={}", encode_segment(since)));
            }
            let r = http.request("GET", &url, Some(&self.token), None).await?;
            if r.status != 200 {
                return Err(failed(format!("sync answered {} {}", r.status, r.body)));
            }
            self.since = r.body["next_batch"].as_str().map(str::to_owned);
            let events = r.body["to_device"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for event in events {
                let content = &event["content"];
                if event["type"] != "m.room.encrypted" || event["sender"] != from.user.as_str() {
                    continue;
                }
                if content["sender_key"] != from.curve25519.to_base64().as_str() {
                    return Err(failed(format!(
                        "sender_key is not {}'s: {event}",
                        from.user
                    )));
                }
                return serde_json::from_value(content["ciphertext"][&mine].clone())
                    .map_err(|e| failed(format!("no Olm message for our key: {e}: {event}")));
            }
        }
    }

    /// One more `/sync` (no wait): how many further `m.room.encrypted`
    /// events from `from` are there (repeats of what was delivered).
    async fn count_more(&mut self, http: &JsonClient, from: &Peer) -> Result<usize, OlmDemoError> {
        let mut url = format!("{}/_matrix/client/v3/sync?timeout=0", self.relay.client_url);
        if let Some(since) = &self.since {
            url.push_str(&format!("&since={}", encode_segment(since)));
        }
        let r = http.request("GET", &url, Some(&self.token), None).await?;
        if r.status != 200 {
            return Err(failed(format!("sync answered {} {}", r.status, r.body)));
        }
        self.since = r.body["next_batch"].as_str().map(str::to_owned);
        let events = r.body["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(events
            .iter()
            .filter(|e| e["type"] == "m.room.encrypted" && e["sender"] == from.user.as_str())
            .count())
    }

    /// Checks a decrypted Olm payload: from `from`, to us, `content` as sent.
    fn check_payload(
        &self,
        plaintext: &[u8],
        from: &Peer,
        content: &Value,
    ) -> Result<(), OlmDemoError> {
        let payload: Value = serde_json::from_slice(plaintext)
            .map_err(|e| failed(format!("plaintext is not JSON: {e}")))?;
        let ours = self.account.identity_keys().ed25519.to_base64();
        let ok = payload["type"] == EVENT_TYPE
            && payload["content"] == *content
            && payload["sender"] == from.user.as_str()
            && payload["keys"]["ed25519"] == from.ed25519.to_base64().as_str()
            && payload["recipient"] == self.user.as_str()
            && payload["recipient_keys"]["ed25519"] == ours.as_str();
        if ok {
            Ok(())
        } else {
            Err(failed(format!(
                "decrypted payload {payload} is not what {} sent",
                from.user
            )))
        }
    }
}

/// Runs the scenario: 2 messages, the pre-key message and the reply, each
/// counted once it is decrypted and checked.
pub async fn encrypted_scenario(
    http: &JsonClient,
    a: &DevRelay,
    b: &DevRelay,
) -> Result<Exchange, OlmDemoError> {
    let started = Instant::now();
    let mut carol = Client::register(http, a, format!("@carol:{}", a.server_name), "CAROL").await?;
    let mut dave = Client::register(http, b, format!("@dave:{}", b.server_name), "DAVE").await?;
    carol.upload_keys(http, 5).await?;
    dave.upload_keys(http, 5).await?;

    let dave_seen = carol.query(http, &dave.user, &dave.device).await?;
    let carol_seen = dave.query(http, &carol.user, &carol.device).await?;
    let one_time_key = carol.claim(http, &dave_seen).await?;
    let mut outbound = carol
        .account
        .create_outbound_session(
            SessionConfig::version_1(),
            dave_seen.curve25519,
            one_time_key,
        )
        .map_err(|e| failed(format!("outbound session: {e}")))?;

    let txn = format!("olm-{}", crate::clock::now_ms());
    let hello = json!({ "text": "hello Dave, only you can read this" });
    carol
        .send_encrypted(http, &mut outbound, &dave_seen, &hello, &format!("{txn}-1"))
        .await?;
    let OlmMessage::PreKey(prekey) = dave.next_encrypted(http, &carol_seen).await? else {
        return Err(failed(
            "the first message of a session is not a pre-key message",
        ));
    };
    let inbound = dave
        .account
        .create_inbound_session(SessionConfig::version_1(), carol_seen.curve25519, &prekey)
        .map_err(|e| failed(format!("inbound session: {e}")))?;
    dave.check_payload(&inbound.plaintext, &carol_seen, &hello)?;
    let mut delivered = 1;

    let mut session = inbound.session;
    let reply = json!({ "text": "hello Carol, read you" });
    dave.send_encrypted(http, &mut session, &carol_seen, &reply, &format!("{txn}-2"))
        .await?;
    let message = carol.next_encrypted(http, &dave_seen).await?;
    let plaintext = outbound
        .decrypt(&message)
        .map_err(|e| failed(format!("decrypt the reply: {e}")))?;
    carol.check_payload(&plaintext, &dave_seen, &reply)?;
    delivered += 1;
    let elapsed = started.elapsed();
    let duplicates =
        dave.count_more(http, &carol_seen).await? + carol.count_more(http, &dave_seen).await?;

    Ok(Exchange {
        sent: 2,
        delivered,
        duplicates,
        elapsed,
    })
}
