//! The demo's device-list row (issue 16): Bob on relay B asks for Alice's
//! keys on relay A (so B tracks Alice and A counts B as interested in her
//! devices); Alice then adds a device with signed device keys and later
//! deletes it. Each change must reach Bob the way a client needs it: his
//! `/sync` names Alice in `device_lists.changed`, and his `/keys/query` for
//! Alice shows the new device (with its ed25519 key as uploaded), then no
//! longer shows it. Plain HTTP against the two dev relays; the device keys
//! are signed with an ed25519 key made here (Courier only verifies).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::keys::ServerSigningKey;
use crate::signing::{encode_base64, sign_json};
use crate::tools::dev_pair::{DevRelay, dev_token, register_device};
use crate::tools::plain_http::JsonClient;

/// How long each change may take to reach Bob.
const DEADLINE: Duration = Duration::from_secs(30);
/// The device Alice adds and deletes.
const NEW_DEVICE: &str = "ALICE3";

/// What the row reports.
pub struct DeviceListExchange {
    /// Changes made on A (a new device, its deletion).
    pub sent: usize,
    /// Changes Bob saw on B (in `/sync` and in `/keys/query`).
    pub delivered: usize,
    pub elapsed: Duration,
}

/// Runs the row. An error names the step that failed.
pub async fn device_list_scenario(
    http: &JsonClient,
    a: &DevRelay,
    b: &DevRelay,
) -> Result<DeviceListExchange, String> {
    let alice = format!("@alice:{}", a.server_name);
    let bob = format!("@bob:{}", b.server_name);
    let bob_token = dev_token(&bob, "BOB1");
    let bob = Client {
        http,
        url: &b.client_url,
        token: &bob_token,
    };

    // Bob asks once: B tracks Alice, A records B's interest. Then let B's
    // first resync of her list settle, so the changes below are news.
    bob.query(&alice).await?;
    let mut since = bob.sync(None, 0).await?.1;
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        let (changed, next) = bob.sync(Some(&since), 1_000).await?;
        since = next;
        if changed.contains(&alice) {
            break;
        }
    }

    let started = Instant::now();
    let token = register_device(http, a, &alice, NEW_DEVICE)
        .await
        .map_err(|e| format!("registering {NEW_DEVICE}: {e}"))?;
    let key = ServerSigningKey::generate(NEW_DEVICE);
    let mut device_keys = json!({
        "user_id": alice,
        "device_id": NEW_DEVICE,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{NEW_DEVICE}"): encode_base64(&rand::random::<[u8; 32]>()),
            format!("ed25519:{NEW_DEVICE}"): key.public_key_base64(),
        },
    });
    sign_json(&mut device_keys, &alice, &key).map_err(|e| format!("signing: {e}"))?;
    let upload = http
        .request(
            "POST",
            &format!("{}/_matrix/client/v3/keys/upload", a.client_url),
            Some(&token),
            Some(&json!({ "device_keys": device_keys })),
        )
        .await
        .map_err(|e| format!("/keys/upload: {e}"))?;
    if upload.status != 200 {
        return Err(format!(
            "/keys/upload answered {} {}",
            upload.status, upload.body
        ));
    }
    let mut delivered = 0;
    let added = bob
        .await_change(&alice, &mut since, |devices| {
            devices[NEW_DEVICE]["keys"][format!("ed25519:{NEW_DEVICE}")]
                == Value::String(key.public_key_base64())
        })
        .await?;
    delivered += usize::from(added);

    let url = format!(
        "{}/_courier/v1/devices/{}/{NEW_DEVICE}",
        a.rpc_url,
        segment(&alice)
    );
    let deleted = http
        .request("DELETE", &url, Some(&a.rpc_secret), None)
        .await
        .map_err(|e| format!("deleting {NEW_DEVICE}: {e}"))?;
    if deleted.status != 200 {
        return Err(format!(
            "deleting {NEW_DEVICE} answered {} {}",
            deleted.status, deleted.body
        ));
    }
    let gone = bob
        .await_change(&alice, &mut since, |devices| {
            devices.get(NEW_DEVICE).is_none()
        })
        .await?;
    delivered += usize::from(gone);
    Ok(DeviceListExchange {
        sent: 2,
        delivered,
        elapsed: started.elapsed(),
    })
}

/// Bob's client on B.
struct Client<'a> {
    http: &'a JsonClient,
    url: &'a str,
    token: &'a str,
}

impl Client<'_> {
    /// `/keys/query` for all of `user`'s devices: device ID → device keys.
    async fn query(&self, user: &str) -> Result<Value, String> {
        let r = self
            .http
            .request(
                "POST",
                &format!("{}/_matrix/client/v3/keys/query", self.url),
                Some(self.token),
                Some(&json!({ "device_keys": { user: [] } })),
            )
            .await
            .map_err(|e| format!("/keys/query: {e}"))?;
        if r.status != 200 {
            return Err(format!("/keys/query answered {} {}", r.status, r.body));
        }
        Ok(r.body["device_keys"][user].clone())
    }

    /// One `/sync`: the users in `device_lists.changed` and `next_batch`.
    async fn sync(
        &self,
        since: Option<&str>,
        timeout_ms: u64,
    ) -> Result<(Vec<String>, String), String> {
        let mut url = format!("{}/_matrix/client/v3/sync?timeout={timeout_ms}", self.url);
        if let Some(since) = since {
            url.push_str(&format!("&since={}", segment(since)));
        }
        let r = self
            .http
            .request("GET", &url, Some(self.token), None)
            .await
            .map_err(|e| format!("/sync: {e}"))?;
        if r.status != 200 {
            return Err(format!("/sync answered {} {}", r.status, r.body));
        }
        let changed = r.body["device_lists"]["changed"]
            .as_array()
            .map(|users| {
                users
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let next = r.body["next_batch"]
            .as_str()
            .ok_or("/sync answered no next_batch")?
            .to_owned();
        Ok((changed, next))
    }

    /// Long-polls until `/sync` names `user` as changed, then queries until
    /// `/keys/query` agrees with `current` (both within `DEADLINE`).
    /// Returns whether both happened.
    async fn await_change(
        &self,
        user: &str,
        since: &mut String,
        current: impl Fn(&Value) -> bool,
    ) -> Result<bool, String> {
        let deadline = Instant::now() + DEADLINE;
        let mut named = false;
        while !named && Instant::now() < deadline {
            let (changed, next) = self.sync(Some(since), 2_000).await?;
            *since = next;
            named = changed.iter().any(|u| u == user);
        }
        while named && Instant::now() < deadline {
            if current(&self.query(user).await?) {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(false)
    }
}

fn segment(text: &str) -> String {
    crate::tools::plain_http::encode_segment(text)
}
