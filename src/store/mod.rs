//! The durable store: one narrow domain trait (`Store`) and its backends.
//! Only this module and its children know SQL. Callers see domain
//! operations, each of which is one atomic store transaction: nothing here is
//! a generic key-value API, and no caller composes two calls into one
//! "transaction" (DESIGN §3).
//!
//! Every write returns only after it is durable (committed with fsync), so a
//! caller may acknowledge to its peer as soon as the future resolves.
//!
//! Also here: `pruner`, the periodic task that runs `Store::prune` batch
//! after batch until nothing expired is left; `open`, which with PostgreSQL
//! also claims this process's worker name.

use std::future::Future;
use std::pin::Pin;

pub mod device_lists;
pub mod keys;
pub mod postgres;
pub mod pruner;
pub mod retention;
pub mod sqlite;
pub mod token_cache;
pub mod trace;
pub mod txn_body;

pub use device_lists::DeviceListStore;
pub use keys::KeyStore;
pub use retention::{
    EventTypePattern, ExpiredMessage, ExpiryKind, ExpiryPolicy, ExpiryReason, ExpiryTotal, InboxTtl,
};
pub use txn_body::RecordedBody;

/// The future every store operation returns: boxed so that `Store` is usable
/// as `Arc<dyn Store>` by the server, which picks a backend from config.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Milliseconds since the Unix epoch.
pub type TimestampMs = i64;

/// Why a store operation failed. None of these is the caller's fault; the
/// HTTP edge maps them all to a 500 and logs the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("migration {version} failed: {reason}")]
    Migration { version: u32, reason: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is shut down")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Another live process holds this worker name (PostgreSQL, DESIGN §4):
    /// two processes with one name would share every destination lease.
    #[error(
        "worker name {name:?} is held by a live worker (instance {holder}, last heartbeat \
         {heartbeat_age_ms} ms ago): give each worker its own [worker] name, or wait until \
         that worker stops or its heartbeat is older than [worker] lease_ms"
    )]
    WorkerNameTaken {
        name: String,
        holder: String,
        heartbeat_age_ms: i64,
    },
    /// A fenced outbox write (`begin_txn`, `ack_txn`, `refuse_txn`,
    /// `quarantine_edu`, `set_retry_state`) found that the destination's
    /// lease no longer carries the caller's fence: another claim happened
    /// since (PostgreSQL, DESIGN §4). The write changed nothing; the caller
    /// has lost the destination and stops sending to it.
    #[error(
        "lease on {destination} is no longer held by worker {worker:?} at epoch {epoch}: \
         the write was fenced out"
    )]
    Fenced {
        destination: String,
        worker: String,
        epoch: i64,
    },
}

/// The fencing token of a destination lease (PostgreSQL, DESIGN §4): the
/// worker that holds it and the lease's epoch, which grows on every claim of
/// the destination (by another worker, or after the lease lapsed or was
/// released) and stays the same while the holder renews it.
/// `Store::acquire_lease` hands it out; every outbox write a destination
/// task makes passes it, and is applied only if the lease row still names
/// this worker and this epoch, that is, if no claim happened since. A lapsed
/// lease that nobody claimed yet still admits its holder's writes: nobody
/// else can have written under a newer epoch, and the write locks the lease
/// row, so a claim waits until it committed. A single-process store hands
/// out epoch 0 and checks nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub worker: String,
    pub epoch: i64,
}

/// Which devices of a local user a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    /// One device; dropped silently if the device is not registered.
    One(String),
    /// `*`: every device registered at the moment the write commits.
    All,
}

/// One message for a local user, before `*` expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInboxMessage {
    pub user_id: String,
    pub device: DeviceTarget,
    /// The id that follows the message through logs, traces and expiry: the
    /// federation EDU's `message_id`, or one minted per client send for
    /// local recipients (`todevice::new_message_id`).
    pub message_id: String,
    pub sender: String,
    pub event_type: String,
    /// The message content as serialized JSON (an object).
    pub content_json: String,
}

/// One message in a device inbox, as `/sync` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    pub stream_id: i64,
    /// As written (`NewInboxMessage::message_id`); empty for rows written
    /// before the column existed. Never sent to clients.
    pub message_id: String,
    pub sender: String,
    pub event_type: String,
    pub content_json: String,
}

/// One page of a device inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    /// At most `limit` messages, in stream order.
    pub messages: Vec<InboxMessage>,
    /// The highest stream id included, or the `since` given when none were.
    pub next_batch: i64,
    /// True when more messages remain after this page.
    pub more: bool,
}

/// What one pass of a `/sync` reads (`Store::sync_read`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRead {
    /// The inbox page, as `fetch_inbox` returns it.
    pub page: InboxPage,
    /// The device-list change log's position (`device_list_position`).
    pub device_list_position: i64,
    /// The device's key counts (`key_counts`).
    pub key_counts: keys::KeyCounts,
}

/// A device that received at least one new inbox row (for waking long-polls).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey {
    pub user_id: String,
    pub device_id: String,
}

/// One packed `m.direct_to_device` EDU for a remote destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutboxEdu {
    pub destination: String,
    /// The whole EDU (`{"edu_type", "content"}`) as serialized JSON.
    pub edu_json: String,
    /// How many device messages the EDU carries (for status and metrics).
    pub message_count: u32,
}

/// The idempotency key of a client (or RPC) send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTxnKey {
    pub user_id: String,
    /// The sending device; the RPC uses an empty string.
    pub device_id: String,
    pub event_type: String,
    pub txn_id: String,
}

/// Everything one accepted send writes, in one store transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendBatch {
    pub txn: ClientTxnKey,
    pub local: Vec<NewInboxMessage>,
    pub remote: Vec<NewOutboxEdu>,
    pub now_ms: TimestampMs,
}

impl SendBatch {
    /// The destinations of its outbox rows, each once, in first-seen order
    /// (`SendOutcome::Accepted::destinations`).
    pub fn destinations(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.remote
            .iter()
            .filter(|edu| seen.insert(edu.destination.as_str()))
            .map(|edu| edu.destination.clone())
            .collect()
    }
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The txn key was seen before: nothing was written.
    Duplicate,
    Accepted {
        /// Devices that got at least one inbox row.
        woken_devices: Vec<DeviceKey>,
        /// Destinations that got at least one outbox row.
        destinations: Vec<String>,
    },
}

/// One `m.direct_to_device` EDU received over federation, already validated
/// and split into local messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundEdu {
    pub message_id: String,
    pub messages: Vec<NewInboxMessage>,
}

/// Everything one inbound federation transaction writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundTxn {
    pub origin: String,
    pub txn_id: String,
    /// The response body to store and replay for a retransmission.
    pub response_json: String,
    /// In the order received.
    pub edus: Vec<InboundEdu>,
    pub now_ms: TimestampMs,
}

/// What an inbound transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundOutcome {
    /// (origin, txn_id) was seen before: nothing written; the stored response.
    Duplicate { response_json: String },
    Accepted {
        woken_devices: Vec<DeviceKey>,
        /// EDUs skipped because (origin, message_id) was seen before.
        duplicate_message_ids: u32,
    },
}

/// One queued EDU for a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEdu {
    pub seq: i64,
    pub edu_json: String,
    pub message_count: u32,
    pub queued_ts: TimestampMs,
    /// How many times a transaction carrying this EDU alone was refused
    /// (4xx): its solo refusals. A refused batch of several EDUs counts on
    /// none of them (it is split instead).
    pub refusals: u32,
    /// Set for a device-list EDU (`m.device_list_update` or
    /// `m.signing_key_update`): the sender finishes it with
    /// `device_lists::finish_outbound_edu` before sending.
    pub device_list: Option<device_lists::OutboundDeviceList>,
}

/// The transaction in flight to a destination, recorded before it is sent so
/// that a retry (also after a restart) resends the same txnId and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightTxn {
    pub destination: String,
    pub txn_id: String,
    /// The outbox rows it carries, in order.
    pub seqs: Vec<i64>,
    /// The exact request body.
    pub body: String,
}

/// The transaction `Store::advance` records next: the destination's oldest
/// queued rows (at most `max_edus`, stopping before `max_bytes` as
/// `peek_outbox` does) under `txn_id`, their EDUs joined by `,` and put in
/// `envelope` at byte `edus_at`.
pub struct NextTxn {
    pub txn_id: String,
    pub max_edus: u32,
    pub max_bytes: u64,
    /// The request body without its EDUs.
    pub envelope: String,
    pub edus_at: usize,
    /// Rewrites the rows before the body is made of them when any is a
    /// device-list row (`OutboxEdu::device_list`: its `prev_id`); such a
    /// transaction is recorded with its exact bytes. It runs inside the
    /// store's transaction, so it must be cheap and must not touch the
    /// store. It may run more than once (a PostgreSQL transaction retried
    /// after a serialization failure) and must give the same bytes for the
    /// same rows.
    pub finish: FinishRows,
}

/// How `NextTxn` finishes device-list rows before they are sent.
pub type FinishRows = Box<dyn Fn(&mut [OutboxEdu]) + Send + Sync>;

impl NextTxn {
    /// `head` + the EDUs + `tail`, the rows sent as stored.
    pub fn around(txn_id: &str, max_edus: u32, max_bytes: u64, head: &str, tail: &str) -> Self {
        NextTxn {
            txn_id: txn_id.to_owned(),
            max_edus,
            max_bytes,
            envelope: format!("{head}{tail}"),
            edus_at: head.len(),
            finish: Box::new(|_: &mut [OutboxEdu]| {}),
        }
    }

    /// What is recorded for `edus` (non-empty, in order): a transaction of
    /// to-device rows only names them (its EDUs are the rows themselves);
    /// one with device-list rows is finished and kept whole.
    pub fn draft(&self, destination: &str, mut edus: Vec<OutboxEdu>) -> RecordedTxn {
        let seqs = edus.iter().map(|e| e.seq).collect();
        let body = if edus.iter().any(|e| e.device_list.is_some()) {
            (self.finish)(&mut edus);
            RecordedBody::Exact(txn_body::splice(
                &self.envelope,
                self.edus_at,
                edus.iter().map(|e| e.edu_json.as_str()),
            ))
        } else {
            RecordedBody::Spliced {
                envelope: self.envelope.clone(),
                edus_at: self.edus_at,
                edus: edus.into_iter().map(|e| e.edu_json).collect(),
            }
        };
        RecordedTxn {
            destination: destination.to_owned(),
            txn_id: self.txn_id.clone(),
            seqs,
            body,
        }
    }

    /// The record of `edus` (non-empty) for `destination`, body made.
    pub fn record(&self, destination: &str, edus: Vec<OutboxEdu>) -> InFlightTxn {
        self.draft(destination, edus).into_in_flight()
    }
}

/// A transaction `Store::advance` recorded, its body not yet put together
/// (the caller does that, off the store's writer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedTxn {
    pub destination: String,
    pub txn_id: String,
    pub seqs: Vec<i64>,
    pub body: RecordedBody,
}

impl RecordedTxn {
    /// What the record row keeps: the exact body, or the envelope and the
    /// offset of the EDUs (which are the rows named by `seqs`).
    pub fn stored(&self) -> (&str, Option<i64>) {
        match &self.body {
            RecordedBody::Exact(body) => (body, None),
            RecordedBody::Spliced {
                envelope, edus_at, ..
            } => (envelope, Some(i64::try_from(*edus_at).unwrap_or(i64::MAX))),
        }
    }

    pub fn into_in_flight(self) -> InFlightTxn {
        InFlightTxn {
            destination: self.destination,
            txn_id: self.txn_id,
            seqs: self.seqs,
            body: self.body.into_body(),
        }
    }
}

impl std::fmt::Debug for NextTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextTxn")
            .field("txn_id", &self.txn_id)
            .field("max_edus", &self.max_edus)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Persisted retry state of a destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryState {
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// Do not send before this time (0: no wait).
    pub retry_after_ms: TimestampMs,
    pub last_success_ms: Option<TimestampMs>,
    pub last_error: Option<String>,
}

/// A destination's persisted refusal history (SECURITY-REVIEW F6, F14), kept
/// in its `destinations` row so that a restart or a lease move resumes it:
/// how far a refused batch has been narrowed, whether the peer accepted
/// anything since, whether the destination is marked refusing, and the EDUs
/// on probation. The default is "no refusals".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefusalState {
    /// The batch size in force while narrowing a refused batch (None: not
    /// narrowing, the full limit).
    pub split_limit: Option<u32>,
    /// Last seq of the refused batch: once delivered past it, narrowing ends.
    pub split_upto: i64,
    /// A transaction was accepted since the narrowing began: the peer takes
    /// other EDUs, so an EDU it keeps refusing alone is a bad one.
    pub split_accepted: bool,
    /// When the destination was marked refusing (None: it is not).
    pub refusing_since_ms: Option<TimestampMs>,
    /// EDUs refused alone `quarantine_after` times before the peer was seen
    /// to accept anything, in order: they wait in `quarantine` while the
    /// EDUs behind them are tried. The next accepted transaction leaves
    /// them quarantined for good; if instead the peer refuses more EDUs
    /// than `refusing_after` allows on probation, they go back to their
    /// places (`restore_quarantined`).
    pub probation_seqs: Vec<i64>,
}

/// One row of `GET /_courier/v1/destinations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationStatus {
    pub destination: String,
    pub pending_edus: u64,
    pub pending_messages: u64,
    pub oldest_queued_ts: Option<TimestampMs>,
    pub retry: RetryState,
    pub quarantined: u64,
    /// When the destination was marked refusing (`RefusalState`), if it is.
    pub refusing_since_ms: Option<TimestampMs>,
}

/// A quarantined EDU: refused alone too often, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedEdu {
    pub destination: String,
    pub seq: i64,
    pub edu_json: String,
    pub reason: String,
    pub quarantined_ts: TimestampMs,
}

/// A remote server's verify key as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredServerKey {
    pub server_name: String,
    pub key_id: String,
    /// Unpadded base64 of the 32-byte ed25519 public key.
    pub public_key: String,
    /// Effective expiry (already capped per SPEC §5.3).
    pub valid_until_ts: TimestampMs,
}

/// What one pruning pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub client_txns: u64,
    pub inbound_txns: u64,
    pub inbound_message_ids: u64,
    pub orphan_inbox_rows: u64,
    pub expired_server_keys: u64,
    /// `destinations` rows of long-idle destinations (see `Retention`).
    pub retired_destinations: u64,
    /// Tombstones of claimed one-time keys older than
    /// `Retention::claimed_key_ms`.
    pub claimed_one_time_keys: u64,
    /// Device-list interests whose `expires_ts` has passed.
    pub expired_device_list_interest: u64,
    /// Trace journal rows older than `Retention::trace_ms`.
    pub trace_events: u64,
}

impl PruneReport {
    /// The largest count of any one kind: a pass that reached the batch
    /// limit for some kind may have left more of it behind.
    pub fn max_kind(&self) -> u64 {
        [
            self.client_txns,
            self.inbound_txns,
            self.inbound_message_ids,
            self.orphan_inbox_rows,
            self.expired_server_keys,
            self.retired_destinations,
            self.claimed_one_time_keys,
            self.expired_device_list_interest,
            self.trace_events,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Adds another batch's counts to these.
    pub fn add(&mut self, other: &PruneReport) {
        self.client_txns += other.client_txns;
        self.inbound_txns += other.inbound_txns;
        self.inbound_message_ids += other.inbound_message_ids;
        self.orphan_inbox_rows += other.orphan_inbox_rows;
        self.expired_server_keys += other.expired_server_keys;
        self.retired_destinations += other.retired_destinations;
        self.claimed_one_time_keys += other.claimed_one_time_keys;
        self.expired_device_list_interest += other.expired_device_list_interest;
        self.trace_events += other.trace_events;
    }
}

/// How long dedupe records live (DESIGN §1.7), how long an idle
/// destination's retry state is kept, and how long a claimed one-time key
/// is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub client_txn_ms: i64,
    pub inbound_txn_ms: i64,
    pub inbound_message_id_ms: i64,
    /// A `destinations` row is deleted once its destination has nothing
    /// queued, in flight or quarantined and its last activity (the later of
    /// its last update, last success and `retry_after`) is this old.
    pub destination_ms: i64,
    /// A claimed one-time key's tombstone (which makes a re-upload of the
    /// key a no-op, so it is never handed out twice) is deleted once it is
    /// this old (SPEC-E2EE §7.4: at least 7 days).
    pub claimed_key_ms: i64,
    /// Trace journal rows are deleted once they are this old (`[store]
    /// trace_retention_hours`; with the journal off, 0: every row goes).
    pub trace_ms: i64,
}

impl Retention {
    pub const DEFAULT: Retention = Retention {
        client_txn_ms: 24 * 3600 * 1000,
        inbound_txn_ms: 24 * 3600 * 1000,
        inbound_message_id_ms: 7 * 24 * 3600 * 1000,
        destination_ms: 30 * 24 * 3600 * 1000,
        claimed_key_ms: 7 * 24 * 3600 * 1000,
        trace_ms: 7 * 24 * 3600 * 1000,
    };
}

/// The stored form of an access token: lowercase hex of its SHA-256. Stores
/// keep only this, never the token itself; every backend uses this function
/// so that a token registered through one is found through another.
pub fn hash_token(access_token: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let digest = Sha256::digest(access_token.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        write!(hex, "{byte:02x}").expect("writing to a String cannot fail");
    }
    hex
}

/// A wake-up published by another worker sharing the database (DESIGN §4),
/// delivered by `Store::subscribe_wakeups`. Like local wake-ups it carries no
/// data: the receiver re-reads the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// New inbox rows for these devices.
    Devices(Vec<DeviceKey>),
    /// New outbox rows for this destination.
    Destination(String),
    /// An authenticated request arrived from this server: reset its backoff.
    PeerUp(String),
}

/// The durable store. Each method is one atomic transaction. The E2EE
/// device plane's methods are in the supertraits `KeyStore` (`keys.rs`) and
/// `DeviceListStore` (`device_lists.rs`).
pub trait Store: KeyStore + DeviceListStore + Send + Sync + 'static {
    // --- devices and tokens ---------------------------------------------

    /// Registers (or re-registers) a local device; with a token, also maps
    /// the token's hash to the device (a device may have several tokens).
    fn upsert_device<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        access_token: Option<&'a str>,
    ) -> StoreFuture<'a, ()>;

    /// Removes a device, its tokens and its pending inbox. Returns whether
    /// the device existed.
    fn delete_device<'a>(&'a self, user_id: &'a str, device_id: &'a str) -> StoreFuture<'a, bool>;

    /// The registered devices of a local user, sorted.
    fn list_devices<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<String>>;

    /// The device an access token belongs to, if any (looked up by hash).
    fn lookup_token<'a>(&'a self, access_token: &'a str) -> StoreFuture<'a, Option<DeviceKey>>;

    // --- the to-device paths --------------------------------------------

    /// Records the client txn and writes inbox and outbox rows, atomically.
    /// `*` is expanded and unknown devices dropped inside the transaction.
    fn enqueue_send(&self, batch: SendBatch) -> StoreFuture<'_, SendOutcome>;

    /// Applies one inbound federation transaction atomically: the (origin,
    /// txn_id) check, each EDU's (origin, message_id) check and inbox rows,
    /// and the stored response.
    fn apply_inbound_txn(&self, txn: InboundTxn) -> StoreFuture<'_, InboundOutcome>;

    /// The stored response of an inbound transaction already applied.
    fn inbound_txn_response<'a>(
        &'a self,
        origin: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, Option<String>>;

    /// Deletes the device's rows with stream id <= `since` (the
    /// acknowledgement), then returns the next <= `limit` rows after `since`,
    /// in one transaction.
    fn fetch_inbox<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage>;

    /// One pass of a `/sync`: `fetch_inbox`, then the device-list log's
    /// position and the device's key counts. The default makes the three
    /// calls; SQLite answers them in one hop to its reader pool (or to the
    /// writer, when `since` acknowledges rows).
    fn sync_read<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, SyncRead> {
        Box::pin(async move {
            let page = self.fetch_inbox(user_id, device_id, since, limit).await?;
            let device_list_position = self.device_list_position().await?;
            let key_counts = self.key_counts(user_id, device_id).await?;
            Ok(SyncRead {
                page,
                device_list_position,
                key_counts,
            })
        })
    }

    // --- the outbox -------------------------------------------------------

    /// The recorded in-flight transaction of a destination, if any.
    fn in_flight<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, Option<InFlightTxn>>;

    /// The oldest queued, not quarantined EDUs of a destination, in order:
    /// at most `max_edus`, and stopping before the total `edu_json` length
    /// would pass `max_bytes` (but always at least one EDU if any is queued).
    fn peek_outbox<'a>(
        &'a self,
        destination: &'a str,
        max_edus: u32,
        max_bytes: u64,
    ) -> StoreFuture<'a, Vec<OutboxEdu>>;

    // The outbox writes of a destination task are fenced (these five,
    // `advance`, and `restore_quarantined` and `set_refusal_state` below):
    // each takes the `Fence` of the caller's lease and, if the lease has
    // been claimed since, changes nothing and fails with
    // `StoreError::Fenced`.

    /// Records the transaction about to be sent. Fails if another is already
    /// recorded for the destination.
    fn begin_txn<'a>(&'a self, fence: &'a Fence, txn: InFlightTxn) -> StoreFuture<'a, ()>;

    /// The peer answered 200: deletes the transaction's rows and record and
    /// records the success (resetting the retry state), atomically.
    fn ack_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()>;

    /// One step of a destination's pipeline as one atomic write: if
    /// `acked` is `(txn_id, now_ms)`, acknowledges it exactly as `ack_txn`
    /// does; then records the next transaction from the oldest queued rows
    /// (`peek_outbox` + `begin_txn`) and returns it, or `None` when nothing
    /// is queued. A crash keeps either all of it or none of it, so the
    /// transaction returned is recorded before anyone can send it. An ack
    /// of a txn that is no longer recorded deletes nothing; if another
    /// transaction is recorded, recording the next fails and the whole step
    /// changes nothing. Fenced like the writes below. The default composes
    /// the three operations (each atomic on its own, which the sender also
    /// tolerates); the backends do it in one commit.
    fn advance<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        acked: Option<(&'a str, TimestampMs)>,
        next: NextTxn,
    ) -> StoreFuture<'a, Option<InFlightTxn>> {
        Box::pin(async move {
            if let Some((txn_id, now_ms)) = acked {
                self.ack_txn(fence, destination, txn_id, now_ms).await?;
            }
            let edus = self
                .peek_outbox(destination, next.max_edus, next.max_bytes)
                .await?;
            if edus.is_empty() {
                return Ok(None);
            }
            let txn = next.record(destination, edus);
            self.begin_txn(fence, txn.clone()).await?;
            Ok(Some(txn))
        })
    }

    /// The peer refused the transaction's payload: drops the in-flight record
    /// (its rows stay queued) and, if it carried exactly one EDU, counts a
    /// solo refusal on that row (`OutboxEdu::refusals`).
    fn refuse_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, ()>;

    /// Moves one queued EDU to quarantine.
    fn quarantine_edu<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        reason: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()>;

    /// Quarantined EDUs (of one destination, or all).
    fn list_quarantined<'a>(
        &'a self,
        destination: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<QuarantinedEdu>>;

    /// Puts a quarantined EDU back at the end of its destination's queue
    /// (`requeue`) or deletes it. Returns whether it existed.
    fn release_quarantined<'a>(
        &'a self,
        destination: &'a str,
        seq: i64,
        requeue: bool,
    ) -> StoreFuture<'a, bool>;

    /// The solo refusals of a queued EDU (`OutboxEdu::refusals`), or None
    /// if it is not queued.
    fn edu_refusals<'a>(&'a self, destination: &'a str, seq: i64) -> StoreFuture<'a, Option<u32>>;

    /// Moves a quarantined EDU back into its destination's queue under its
    /// own seq (so at its old place, not at the end) with `refusals` solo
    /// refusals. Returns whether it was quarantined. Fenced like the other
    /// writes of a destination task.
    fn restore_quarantined<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        refusals: u32,
    ) -> StoreFuture<'a, bool>;

    /// Puts every quarantined EDU of the destination back at the end of its
    /// queue, in their original order (fresh seqs, refusals 0), in one
    /// transaction. Returns how many.
    fn requeue_quarantined<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, u64>;

    // --- destination retry state ----------------------------------------

    /// The destination's refusal history (default if it has none).
    fn refusal_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RefusalState>;

    /// Writes the destination's refusal history, stamped `now_ms` as its
    /// last activity. Fenced like the other writes of a destination task.
    fn set_refusal_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RefusalState,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()>;

    fn retry_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RetryState>;

    fn set_retry_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RetryState,
    ) -> StoreFuture<'a, ()>;

    /// Destinations with queued (not quarantined) EDUs or an in-flight txn.
    fn destinations_with_pending(&self) -> StoreFuture<'_, Vec<String>>;

    /// Every destination with queued, quarantined or retry state.
    fn destination_statuses(&self) -> StoreFuture<'_, Vec<DestinationStatus>>;

    // --- remote server keys -----------------------------------------------

    fn server_keys<'a>(&'a self, server_name: &'a str) -> StoreFuture<'a, Vec<StoredServerKey>>;

    fn put_server_keys(&self, keys: Vec<StoredServerKey>) -> StoreFuture<'_, ()>;

    // --- the trace journal (issue 18, `store::trace`) -------------------------

    /// The journal rows about the messages `query` names, with their inbox
    /// rows still pending and EDUs still queued, in one read.
    fn trace_journal<'a>(
        &'a self,
        query: &'a trace::TraceQuery,
    ) -> StoreFuture<'a, trace::TraceRecords>;

    /// Turns the journal on or off for every writer of this store (from
    /// `[store] trace_retention_hours`; on by default). Persisted, and in
    /// effect for this store's next write; on PostgreSQL another worker's
    /// client sends, inbound transactions and acknowledgements follow a
    /// switch to on within 2 s (`postgres::trace::Switch`).
    fn set_trace_journal(&self, enabled: bool) -> StoreFuture<'_, ()>;

    // --- housekeeping -------------------------------------------------------

    /// Removes expired dedupe records, expired server keys, inbox rows of
    /// devices that no longer exist, the retry state of long-idle
    /// destinations and expired claimed-key tombstones, at most `batch` rows
    /// of each kind. One batch; the
    /// caller (`store::pruner`) calls again while a kind reached `batch`.
    fn prune(
        &self,
        now_ms: TimestampMs,
        retention: Retention,
        batch: u32,
    ) -> StoreFuture<'_, PruneReport>;

    /// Expires undelivered rows as `policy` says (`store::retention`): at
    /// most `batch` inbox rows past their TTL, `batch` rows beyond device
    /// inbox caps and `batch` outbox rows of dead destinations (queued, in
    /// flight or quarantined), all as of `now_ms`, in one transaction that
    /// also adds them to the persisted totals. Returns the rows it deleted;
    /// the caller (`store::pruner`) logs and counts them and calls again
    /// while a reason reached `batch`.
    fn expire<'a>(
        &'a self,
        now_ms: TimestampMs,
        policy: &'a ExpiryPolicy,
        batch: u32,
    ) -> StoreFuture<'a, Vec<ExpiredMessage>>;

    /// The persisted totals of expired rows per (kind, reason), over the
    /// store's life (only those with a count).
    fn expiry_totals(&self) -> StoreFuture<'_, Vec<ExpiryTotal>>;

    /// Finishes queued writes and stops the backend's background work (for a
    /// clean shutdown). Later writes may fail with `StoreError::Closed`.
    /// Backends without background work keep the default, which does nothing.
    /// `server::run` calls it last in its shutdown, after the listeners,
    /// the sender and the other tasks stopped (SQLite: the writer finishes
    /// its queue, checkpoints the WAL and stops; PostgreSQL: the pool
    /// closes), after the leases and worker name were released.
    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    // --- several workers on one database (DESIGN §4) ------------------------
    //
    // The defaults describe a store that only one process uses (SQLite): that
    // process owns every destination, and there is nobody to wake.

    /// Claims up to `limit` destinations with pending work whose lease is
    /// free or expired, for `lease_ms` from `now_ms`. Returns only the
    /// destinations newly claimed by this call (leases the worker already
    /// held are not listed; `renew_leases` extends those). Each claim gives
    /// its lease a new epoch; the destination task learns it from its next
    /// `acquire_lease`, which extends the claimed lease and keeps the epoch.
    fn claim_destinations<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<String>> {
        let _ = (worker, now_ms, lease_ms, limit);
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Claims (or extends) the lease of one destination if it is free,
    /// expired or already held by `worker`. Returns the lease's `Fence` if
    /// `worker` holds it now, until `now_ms + lease_ms`, or `None` when
    /// another worker does. Extending an unexpired lease keeps its epoch;
    /// any other claim (also this worker's own after a lapse) gives it a
    /// new, higher one. Senders call this before every send and pass the
    /// fence to their outbox writes. The default (one process) always holds
    /// the lease, at epoch 0.
    fn acquire_lease<'a>(
        &'a self,
        worker: &'a str,
        destination: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, Option<Fence>> {
        let _ = (destination, now_ms, lease_ms);
        let fence = Fence {
            worker: worker.to_owned(),
            epoch: 0,
        };
        Box::pin(async move { Ok(Some(fence)) })
    }

    /// Extends every unexpired lease `worker` holds to `now_ms + lease_ms`,
    /// keeping their epochs. Returns how many it still holds.
    fn renew_leases<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, u64> {
        let _ = (worker, now_ms, lease_ms);
        Box::pin(async { Ok(0) })
    }

    /// Gives up every lease `worker` holds (on shutdown), so that another
    /// worker can take its destinations at once.
    fn release_leases<'a>(&'a self, worker: &'a str) -> StoreFuture<'a, ()> {
        let _ = worker;
        Box::pin(async { Ok(()) })
    }

    /// Claims the worker name `worker` for this store instance (this
    /// process) at start-up: succeeds if the name is free, already ours, or
    /// its holder's heartbeat is at least `lease_ms` old; otherwise fails
    /// with `StoreError::WorkerNameTaken`. A single-process store has no
    /// other worker, and the default succeeds.
    fn claim_worker_name<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, ()> {
        let _ = (worker, now_ms, lease_ms);
        Box::pin(async { Ok(()) })
    }

    /// Renews this instance's claim on `worker` (the lease loop calls it).
    /// Returns false when another live instance holds the name now (this
    /// one's heartbeat had lapsed and the name was taken).
    fn heartbeat_worker_name<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, bool> {
        let _ = (worker, now_ms, lease_ms);
        Box::pin(async { Ok(true) })
    }

    /// Gives up this instance's claim on `worker` (clean shutdown), so a
    /// successor may take the name at once.
    fn release_worker_name<'a>(&'a self, worker: &'a str) -> StoreFuture<'a, ()> {
        let _ = worker;
        Box::pin(async { Ok(()) })
    }

    /// Wake-ups published by other processes sharing this store, or `None`
    /// when no other process can share it. Each call starts a new
    /// subscription.
    fn subscribe_wakeups(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Wakeup>> {
        None
    }
}

/// Which backend to open (`[store] sqlite` or `[store] postgres`). Built
/// by `config` (which re-exports it); `store` does not import `config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

/// How the pruner runs (`store::pruner`): every `interval` it deletes
/// expired records in batches of at most `batch` rows per table until none
/// are left, pausing between batches so other writes are never starved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneConfig {
    /// The most rows of each kind one batch (one store write) deletes.
    pub batch: u32,
    /// Time between pruning passes.
    pub interval: std::time::Duration,
    /// A destination with nothing queued, in flight or quarantined and no
    /// send, failure or retry-state change for this long is forgotten.
    pub destination_retention: std::time::Duration,
    /// How long trace journal rows are kept (`[store]
    /// trace_retention_hours`); zero turns the journal off.
    pub trace_retention: std::time::Duration,
}

/// Opens the backend `store` names for this worker. With PostgreSQL it
/// connects with TLS as `sslmode` asks (trusting the public roots and
/// `extra_ca`, which the server passes from `[federation] extra_ca`), then
/// claims `worker_name` (`[worker] name`) for `lease`, failing with
/// `StoreError::WorkerNameTaken` while another live worker holds it.
pub async fn open(
    store: &StoreConfig,
    extra_ca: &[std::path::PathBuf],
    worker_name: &str,
    lease: std::time::Duration,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    match store {
        StoreConfig::Sqlite(path) => {
            Ok(std::sync::Arc::new(sqlite::SqliteStore::open(path).await?))
        }
        StoreConfig::Postgres(conninfo) => {
            let options = postgres::PostgresOptions {
                extra_ca: extra_ca.to_vec(),
                ..postgres::PostgresOptions::default()
            };
            let store = postgres::PostgresStore::open_with(conninfo, options).await?;
            claim_worker_name_at_start(&store, worker_name, lease).await?;
            Ok(std::sync::Arc::new(store))
        }
    }
}

/// Claims the worker name at start-up. A holder whose last heartbeat is
/// younger than the lease may be a process that just died (a crash and an
/// immediate restart): wait until that heartbeat would have lapsed and try
/// once more. A live holder heartbeats every `[worker] renew_ms` (less than
/// the lease), so the second try fails with `StoreError::WorkerNameTaken`
/// for it, within one lease.
pub async fn claim_worker_name_at_start(
    store: &dyn Store,
    name: &str,
    lease: std::time::Duration,
) -> Result<(), StoreError> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    match store
        .claim_worker_name(name, crate::clock::now_ms(), lease_ms)
        .await
    {
        Err(StoreError::WorkerNameTaken {
            heartbeat_age_ms,
            holder,
            ..
        }) if (0..lease_ms).contains(&heartbeat_age_ms) => {
            let wait = lease_ms - heartbeat_age_ms + 50;
            tracing::warn!(
                worker = %name,
                %holder,
                wait_ms = wait,
                "worker name held by a recent heartbeat; waiting for it to lapse"
            );
            tokio::time::sleep(std::time::Duration::from_millis(wait.unsigned_abs())).await;
            store
                .claim_worker_name(name, crate::clock::now_ms(), lease_ms)
                .await
        }
        other => other,
    }
}
