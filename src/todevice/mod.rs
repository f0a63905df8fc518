//! The to-device domain core: validates a send, splits recipients into local
//! inbox rows and remote outbox EDUs, writes them in one store transaction,
//! and wakes long-polls and destinations. It also owns the inbox long-poll
//! (`wait_for_inbox`) and the opaque `since` token format that `/sync` and
//! the RPC inbox share. It knows nothing of HTTP: the client API and the RPC
//! parse their requests into a `SendRequest`, and `error` maps `SendRejected`
//! to a Matrix error (`From<SendRejected> for MatrixError`).
//!
//! Remote messages are packed here, at acceptance time, into
//! `m.direct_to_device` EDUs of at most `MAX_EDU_BYTES` of canonical JSON,
//! each with its own fresh `message_id`: the outbox stores finished EDUs, so
//! a retried federation transaction resends the very same bytes. Every device
//! message content is encoded once (canonical JSON) and the EDU text is
//! assembled from those pieces, never re-serialized.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use rand::distr::Alphabetic;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::canonical_json::{CanonicalJsonError, NumberStyle, to_canonical_bytes_with};
use crate::config::SendLimits;
use crate::federation::sender::SenderHandle;
use crate::identifiers::{ServerName, UserId};
use crate::notify::Notifier;
mod pack;

use pack::{RemoteDevice, RemoteUser, json_string, pack_edus};

use crate::store::{
    ClientTxnKey, DeviceKey, DeviceTarget, InboxPage, NewInboxMessage, SendBatch, SendOutcome,
    Store, StoreError,
};

/// Largest canonical JSON encoding of one device's message content.
pub const MAX_CONTENT_BYTES: usize = 65536;
/// Largest canonical JSON encoding of one packed EDU (Synapse's soft maximum).
pub const MAX_EDU_BYTES: usize = 65536;
/// Longest event type and transaction id, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 255;
/// The most events one `/sync` (or RPC inbox) response carries.
pub const MAX_EVENTS_PER_SYNC: u32 = 100;
/// Length of a minted `message_id`.
const MESSAGE_ID_LEN: usize = 16;
/// The prefix of our opaque `since` / `next_batch` tokens.
const SINCE_PREFIX: &str = "td_";

/// One send, already authenticated and parsed from its wire form.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    /// The sending user (local to this server).
    pub sender: UserId,
    /// The sending device; the RPC uses `""`. Part of the idempotency key.
    pub sender_device: String,
    pub event_type: String,
    pub txn_id: String,
    /// user ID → (device ID or `*` → content object), as received.
    pub messages: serde_json::Map<String, Value>,
}

/// What an accepted send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// The (sender, device, type, txn) key was seen before: nothing queued.
    Duplicate,
    Accepted {
        /// Local messages written (before `*` expansion).
        local_messages: usize,
        /// Remote device messages packed into EDUs.
        remote_messages: usize,
        /// Packed EDUs queued, over all destinations.
        edus: usize,
        /// Destinations that got at least one EDU.
        destinations: usize,
    },
}

/// Why a send was refused. Each variant is the caller's fault except
/// `Store`.
#[derive(Debug, thiserror::Error)]
pub enum SendRejected {
    #[error("event type must be 1 to 255 bytes")]
    BadEventType,
    #[error("transaction id must be 1 to 255 bytes")]
    BadTxnId,
    #[error("sender {0} is not a user of this server")]
    ForeignSender(String),
    #[error("{0}")]
    BadShape(String),
    #[error("content for {user_id} / {device_id} has no canonical JSON form: {source}")]
    NotCanonical {
        user_id: String,
        device_id: String,
        source: CanonicalJsonError,
    },
    #[error("content for {user_id} / {device_id} is {bytes} bytes, over the limit of {limit}")]
    TooLarge {
        user_id: String,
        device_id: String,
        bytes: usize,
        limit: usize,
    },
    #[error("the send names {count} recipient devices, over the limit of {limit}")]
    TooManyRecipients { count: usize, limit: usize },
    #[error("the send reaches {count} or more servers, over the limit of {limit}")]
    TooManyDestinations { count: usize, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The to-device core. One per relay, shared through `AppState`.
pub struct ToDevice {
    pub server_name: ServerName,
    pub store: Arc<dyn Store>,
    pub notifier: Arc<Notifier>,
    pub sender: SenderHandle,
    /// What one send may fan out to (`[client] max_*_per_send`).
    limits: SendLimits,
    /// Cancelled by `stop_long_polls` at shutdown: every waiting long-poll
    /// then answers at once instead of holding the drain.
    long_polls: CancellationToken,
}

impl ToDevice {
    pub fn new(
        server_name: ServerName,
        store: Arc<dyn Store>,
        notifier: Arc<Notifier>,
        sender: SenderHandle,
    ) -> Self {
        ToDevice {
            server_name,
            store,
            notifier,
            sender,
            limits: SendLimits {
                max_destinations: crate::config::DEFAULT_MAX_DESTINATIONS,
                max_recipients: crate::config::DEFAULT_MAX_RECIPIENTS,
            },
            long_polls: CancellationToken::new(),
        }
    }

    /// Refuses sends that fan out past `limits` (both the client API and
    /// the RPC go through `send`).
    pub fn with_limits(mut self, limits: SendLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Makes every current and future long-poll return at once (shutdown).
    pub fn stop_long_polls(&self) {
        self.long_polls.cancel();
    }

    /// Validates, packs and durably queues one send, then wakes the affected
    /// long-polls and destinations. Returns only after the store committed.
    pub async fn send(&self, request: SendRequest) -> Result<SendResult, SendRejected> {
        let SendRequest {
            sender,
            sender_device,
            event_type,
            txn_id,
            messages,
        } = request;
        if event_type.is_empty() || event_type.len() > MAX_IDENTIFIER_BYTES {
            return Err(SendRejected::BadEventType);
        }
        if txn_id.is_empty() || txn_id.len() > MAX_IDENTIFIER_BYTES {
            return Err(SendRejected::BadTxnId);
        }
        if sender.server_name() != self.server_name.as_str() {
            return Err(SendRejected::ForeignSender(sender.to_string()));
        }

        let split = split_recipients(
            self.server_name.as_str(),
            sender.as_str(),
            &event_type,
            messages,
            self.limits,
        )?;
        let mut remote = Vec::new();
        let mut remote_messages = 0usize;
        if !split.remote.is_empty() {
            let sender_json = json_string(sender.as_str());
            let type_json = json_string(&event_type);
            for (destination, users) in &split.remote {
                remote_messages += users.iter().map(|u| u.devices.len()).sum::<usize>();
                remote.extend(pack_edus(destination, &sender_json, &type_json, users)?);
            }
        }
        let local_messages = split.local.len();
        let edus = remote.len();
        let logged = tracing::enabled!(tracing::Level::DEBUG);
        let message_ids = logged.then(|| crate::trace::send_message_ids(&split.local, &remote));

        let batch_txn_id = logged.then(|| txn_id.clone());
        let batch = SendBatch {
            txn: ClientTxnKey {
                user_id: sender.as_str().to_owned(),
                device_id: sender_device,
                event_type,
                txn_id,
            },
            local: split.local,
            remote,
            now_ms: crate::clock::now_ms(),
        };
        match self.store.enqueue_send(batch).await? {
            SendOutcome::Duplicate => {
                metrics::counter!("courier_todevice_sends_total", "outcome" => "duplicate")
                    .increment(1);
                tracing::debug!(sender = %sender, "duplicate to-device transaction");
                Ok(SendResult::Duplicate)
            }
            SendOutcome::Accepted {
                woken_devices,
                destinations,
            } => {
                self.notifier.wake(&woken_devices);
                for destination in &destinations {
                    self.sender.wake(destination);
                }
                metrics::counter!("courier_todevice_sends_total", "outcome" => "accepted")
                    .increment(1);
                metrics::counter!("courier_todevice_messages_total", "recipient" => "local")
                    .increment(local_messages as u64);
                metrics::counter!("courier_todevice_messages_total", "recipient" => "remote")
                    .increment(remote_messages as u64);
                tracing::debug!(
                    sender = %sender,
                    txn_id = batch_txn_id.as_deref(),
                    message_ids = message_ids.as_deref(),
                    local_messages,
                    remote_messages,
                    edus,
                    destinations = destinations.len(),
                    "to-device send accepted"
                );
                Ok(SendResult::Accepted {
                    local_messages,
                    remote_messages,
                    edus,
                    destinations: destinations.len(),
                })
            }
        }
    }

    /// Acknowledges everything up to `since` (an inbox position), then
    /// returns the next page of the device's inbox. With nothing pending it
    /// waits up to `timeout` for a new message (or shutdown) and reads again.
    pub async fn wait_for_inbox(
        &self,
        device: &DeviceKey,
        since: i64,
        limit: u32,
        timeout: Duration,
    ) -> Result<InboxPage, StoreError> {
        let limit = limit.clamp(1, MAX_EVENTS_PER_SYNC);
        let store = &*self.store;
        self.long_poll(device, timeout, move || async move {
            let page = store
                .fetch_inbox(&device.user_id, &device.device_id, since, limit)
                .await?;
            let ready = !page.messages.is_empty();
            Ok((page, ready))
        })
        .await
    }

    /// The long-poll every device read shares (the inbox here, `/sync` with
    /// its device-list part in `client_api`): `read` returns what it found
    /// and whether that is worth answering at once. When it is not, waits
    /// up to `timeout` for a wake-up of `device` (or shutdown) and reads
    /// again, once. The waiter is registered before the first read, so a
    /// change committed (and woken) in between is not missed; the second
    /// read happens after a timeout too, so a lost wake-up is harmless.
    pub async fn long_poll<T, F, Fut>(
        &self,
        device: &DeviceKey,
        timeout: Duration,
        mut read: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(T, bool), StoreError>>,
    {
        let mut waiter = (!timeout.is_zero()).then(|| self.notifier.subscribe(device.clone()));
        let (found, ready) = read().await?;
        let Some(waiter) = waiter.as_mut() else {
            return Ok(found);
        };
        if ready || self.long_polls.is_cancelled() {
            return Ok(found);
        }
        let woken = tokio::select! {
            result = tokio::time::timeout(timeout, waiter.wait()) => result.is_ok(),
            _ = self.long_polls.cancelled() => return Ok(found),
        };
        if woken {
            metrics::counter!("courier_longpoll_wakeups_total").increment(1);
        }
        drop(found);
        Ok(read().await?.0)
    }
}

/// A position in what a device reads: its inbox stream and the device-list
/// change log (`store::KeyStore::device_list_position`). Formatted as the
/// opaque `since` / `next_batch` token that `/sync` and the RPC inbox share:
/// `td_<inbox>_<device_list>`, or `td_<inbox>` when the device-list position
/// is 0. The short form is the only one tokens minted before the change log
/// existed have, and for them 0 is exact: every change in the log came after
/// the token, so a client holding one hears of its own changes once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncToken {
    /// The inbox stream position: everything up to it is acknowledged.
    pub inbox: i64,
    /// The device-list change-log position the token's reader has heard of.
    pub device_list: i64,
}

impl SyncToken {
    /// A token with only an inbox position (device-list position 0).
    pub fn inbox_only(inbox: i64) -> SyncToken {
        SyncToken {
            inbox,
            device_list: 0,
        }
    }

    /// Parses a token made by `format` (either spelling). `None` for
    /// anything else.
    pub fn parse(token: &str) -> Option<SyncToken> {
        let rest = token.strip_prefix(SINCE_PREFIX)?;
        let (inbox, device_list) = match rest.split_once('_') {
            None => (rest, None),
            Some((inbox, device_list)) => (inbox, Some(device_list)),
        };
        let inbox = parse_position(inbox)?;
        let device_list = match device_list {
            None => 0,
            // The long spelling is never minted with 0, so it is refused:
            // each position has exactly one token.
            Some(device_list) => match parse_position(device_list)? {
                0 => return None,
                n => n,
            },
        };
        Some(SyncToken { inbox, device_list })
    }

    /// The token text.
    pub fn format(self) -> String {
        if self.device_list == 0 {
            format!("{SINCE_PREFIX}{}", self.inbox)
        } else {
            format!("{SINCE_PREFIX}{}_{}", self.inbox, self.device_list)
        }
    }
}

/// A non-negative position of at most 18 digits (so it fits an `i64`),
/// without leading zeros (`format` never writes them).
fn parse_position(digits: &str) -> Option<i64> {
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// A fresh `message_id`: 16 random ASCII letters.
pub fn new_message_id() -> String {
    rand::rng()
        .sample_iter(Alphabetic)
        .take(MESSAGE_ID_LEN)
        .map(char::from)
        .collect()
}

/// The recipients of one send, split by where they live.
#[derive(Debug, Default)]
struct Recipients {
    local: Vec<NewInboxMessage>,
    /// destination → its users, in user ID order.
    remote: BTreeMap<String, Vec<RemoteUser>>,
}

/// Checks the shape of `messages`, encodes each content once and sorts the
/// recipients into local inbox messages and remote users per destination.
fn split_recipients(
    our_server: &str,
    sender: &str,
    event_type: &str,
    messages: serde_json::Map<String, Value>,
    limits: SendLimits,
) -> Result<Recipients, SendRejected> {
    // The recipient limit is checked before anything is encoded: an
    // oversized send costs a count, not a canonical encoding of every
    // message. The destination limit is checked as destinations appear
    // below, so at most `max_destinations` users are encoded before a send
    // that reaches too many servers is refused.
    let recipients: usize = messages
        .values()
        .map(|devices| devices.as_object().map_or(0, serde_json::Map::len))
        .sum();
    if recipients > limits.max_recipients {
        return Err(SendRejected::TooManyRecipients {
            count: recipients,
            limit: limits.max_recipients,
        });
    }
    let mut split = Recipients::default();
    // One id for every local recipient of this send: the handle by which
    // logs, traces and expiry name it (remote EDUs mint their own).
    let local_message_id = new_message_id();
    let mut unparsable = 0usize;
    for (user_id, devices) in messages {
        let Value::Object(devices) = devices else {
            return Err(SendRejected::BadShape(format!(
                "messages[{user_id:?}] must be an object of device IDs"
            )));
        };
        for (device_id, content) in &devices {
            if !content.is_object() {
                return Err(SendRejected::BadShape(format!(
                    "messages[{user_id:?}][{device_id:?}] must be an object"
                )));
            }
        }
        let user = match UserId::parse(&user_id) {
            Ok(user) => user,
            Err(error) => {
                // One line per send, not per recipient (below).
                if unparsable == 0 {
                    tracing::info!(sender, recipient = %user_id, %error, "skipping unparsable recipient");
                }
                unparsable += 1;
                continue;
            }
        };
        let local = user.server_name() == our_server;
        let mut remote_devices = Vec::new();
        for (device_id, content) in devices {
            if device_id.is_empty() {
                continue;
            }
            // Python style: floats, which Synapse accepts from clients, keep
            // the form Synapse's canonical JSON gives them; without floats
            // this is exactly the spec form.
            let encoded =
                to_canonical_bytes_with(&content, NumberStyle::Python).map_err(|source| {
                    SendRejected::NotCanonical {
                        user_id: user_id.clone(),
                        device_id: device_id.clone(),
                        source,
                    }
                })?;
            if encoded.len() > MAX_CONTENT_BYTES {
                return Err(SendRejected::TooLarge {
                    user_id,
                    device_id,
                    bytes: encoded.len(),
                    limit: MAX_CONTENT_BYTES,
                });
            }
            if local {
                let device = if device_id == "*" {
                    DeviceTarget::All
                } else {
                    DeviceTarget::One(device_id)
                };
                split.local.push(NewInboxMessage {
                    user_id: user_id.clone(),
                    device,
                    message_id: local_message_id.clone(),
                    sender: sender.to_owned(),
                    event_type: event_type.to_owned(),
                    content_json: String::from_utf8(encoded)
                        .expect("the canonical JSON encoder writes UTF-8"),
                });
            } else {
                remote_devices.push(RemoteDevice {
                    key_json: json_string(&device_id),
                    device_id,
                    content: encoded,
                });
            }
        }
        if !remote_devices.is_empty() {
            split
                .remote
                .entry(user.server_name().to_owned())
                .or_default()
                .push(RemoteUser {
                    key_json: json_string(&user_id),
                    user_id,
                    devices: remote_devices,
                });
            if split.remote.len() > limits.max_destinations {
                return Err(SendRejected::TooManyDestinations {
                    count: split.remote.len(),
                    limit: limits.max_destinations,
                });
            }
        }
    }
    if unparsable > 1 {
        tracing::info!(sender, unparsable, "skipped unparsable recipients");
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_tokens_round_trip_and_reject_garbage() {
        for inbox in [0i64, 1, 42, 9_007_199_254_740_991] {
            for device_list in [0i64, 1, 7, 999_999_999_999_999_999] {
                let token = SyncToken { inbox, device_list };
                assert_eq!(SyncToken::parse(&token.format()), Some(token));
            }
        }
        assert_eq!(SyncToken::inbox_only(41).format(), "td_41");
        assert_eq!(SyncToken::parse("td_41"), Some(SyncToken::inbox_only(41)));
        assert_eq!(
            SyncToken::parse("td_41_7"),
            Some(SyncToken {
                inbox: 41,
                device_list: 7
            })
        );
        for bad in [
            "",
            "td_",
            "td_-1",
            "td_1x",
            "s72595_4483",
            "TD_1",
            "td_ 1",
            "td_1234567890123456789",
            "td_1_",
            "td__1",
            "td_1_0",
            "td_1_2_3",
            "td_1_-2",
            "td_1_1234567890123456789",
            "td_007",
            "td_1_02",
        ] {
            assert_eq!(SyncToken::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn local_recipients_of_one_send_share_one_fresh_message_id() {
        let limits = crate::config::SendLimits {
            max_destinations: 10,
            max_recipients: 10,
        };
        let messages = |body: serde_json::Value| match body {
            Value::Object(map) => map,
            _ => unreachable!("an object literal"),
        };
        let body = serde_json::json!({
            "@a:here": {"D1": {"k": 1}, "*": {"k": 2}},
            "@b:here": {"D2": {"k": 3}},
            "@c:there": {"D3": {"k": 4}},
        });
        let split = split_recipients("here", "@s:here", "m.t", messages(body.clone()), limits)
            .expect("valid send");
        assert_eq!(split.local.len(), 3);
        let id = &split.local[0].message_id;
        assert_eq!(id.len(), MESSAGE_ID_LEN);
        assert!(split.local.iter().all(|m| &m.message_id == id));
        let again =
            split_recipients("here", "@s:here", "m.t", messages(body), limits).expect("valid send");
        assert_ne!(&again.local[0].message_id, id);
    }

    #[test]
    fn message_ids_are_sixteen_letters_and_differ() {
        let a = new_message_id();
        let b = new_message_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_alphabetic()));
        assert_ne!(a, b);
    }
}
