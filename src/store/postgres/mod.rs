//! PostgreSQL backend of `Store`, for several Courier workers sharing one
//! database (DESIGN §3, §4).
//!
//! Shape: a deadpool pool of tokio-postgres connections; every trait method
//! is one database transaction (READ COMMITTED with explicit row locks; a
//! deadlock or serialization failure is retried a few times). PostgreSQL
//! commits with fsync and groups concurrent commits itself, so a write future
//! resolves only after its commit is durable. Inbox writers lock the target
//! device rows before taking stream ids, so one device's rows become visible
//! in stream id order and a `since` can never skip a row committed late. The
//! SQL is in `postgres/inbox.rs` (devices, inbound transactions, inbox
//! reads), `postgres/keys.rs` and `postgres/device_changes.rs` (the E2EE
//! device plane), `postgres/device_lists.rs`, `postgres/device_list_outbox.rs`
//! and `postgres/remote_devices.rs` (device-list interest, tracking, the
//! outbound EDUs and the remote cache), `postgres/send.rs` (client sends), `postgres/outbox.rs` (outbox,
//! retry state, keys, pruning) and `postgres/lease.rs` (destination leases);
//! cross-worker wake-ups over LISTEN/NOTIFY are in `postgres/wakeup.rs`; the
//! schema is in `migrations/postgres/*.sql`, applied by `postgres/schema.rs`.
//!
//! Worker names (one live process per `[worker] name`) are in
//! `postgres/workers.rs`; TLS to the database (`sslmode`, verified against
//! the same roots as outbound federation) in `postgres/tls.rs`.
//!
//! Not here: deciding what to write (`todevice`), waking local long-polls or
//! destination tasks (callers do that with the returned outcomes; the wake-up
//! subscription only carries other workers' wake-ups), and any periodic
//! schedule (the pruner runs `prune`; `cluster` renews leases and the
//! worker-name heartbeat).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::{
    DestinationStatus, DeviceKey, ExpiredMessage, ExpiryPolicy, ExpiryTotal, Fence, InFlightTxn,
    InboundOutcome, InboundTxn, InboxPage, KeyStore, NextTxn, OutboxEdu, PruneReport,
    QuarantinedEdu, RefusalState, Retention, RetryState, SendBatch, SendOutcome, Store, StoreError,
    StoreFuture, StoredServerKey, TimestampMs, Wakeup,
};

mod device_changes;
mod device_list_outbox;
mod device_lists;
mod inbox;
mod keys;
mod lease;
mod outbox;
mod refusals;
mod remote_devices;
mod retention;
mod schema;
mod send;
mod server_keys;
pub mod tls;
mod trace;
mod wakeup;
mod workers;

/// How often an operation is retried after a deadlock or serialization
/// failure before the error is returned.
const MAX_ATTEMPTS: u32 = 5;

/// Tuning of a `PostgresStore`. `PostgresOptions::default()` suits production.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The most connections the pool opens.
    pub pool_size: usize,
    /// Publish wake-ups for other workers after writes (LISTEN/NOTIFY).
    pub publish_wakeups: bool,
    /// CA certificates trusted for TLS to the database besides the public
    /// roots (the server passes `[federation] extra_ca`).
    pub extra_ca: Vec<std::path::PathBuf>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            publish_wakeups: true,
            extra_ca: Vec::new(),
        }
    }
}

/// The PostgreSQL store. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    /// TLS for the LISTEN connection (the pool has its own clone).
    tls: MakeRustlsConnect,
    /// Where the next prune pass continues its orphan-row scan (stream id).
    orphan_cursor: AtomicI64,
    /// Names this store instance in published wake-ups, so that its own
    /// subscription skips them (the local process already woke itself).
    instance: String,
    /// Feeds the publisher task (None when publishing is off).
    publisher: Option<tokio::sync::mpsc::UnboundedSender<Wakeup>>,
    /// This worker's copy of whether the trace journal is on.
    journal: trace::Switch,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

/// Why one attempt of an operation failed: a database error (maybe worth a
/// retry) or a store-level one.
#[derive(Debug)]
enum Fail {
    Db(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl Fail {
    fn retryable(&self) -> bool {
        matches!(self, Fail::Db(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
            || e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE))
    }

    fn into_store(self) -> StoreError {
        match self {
            Fail::Db(e) => pg_error(&e),
            Fail::Store(e) => e,
        }
    }
}

/// A `StoreError` with the server's message (tokio-postgres' own Display
/// says only "db error").
fn pg_error(e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        )),
        None => StoreError::Postgres(e.to_string()),
    }
}

impl PostgresStore {
    /// Connects with a libpq-style connection string (`host=/run/pg
    /// user=courier dbname=courier`, or a `postgresql://` URL) and applies
    /// pending migrations, with default options.
    pub async fn open(conninfo: &str) -> Result<PostgresStore, StoreError> {
        Self::open_with(conninfo, PostgresOptions::default()).await
    }

    /// Connects and migrates with explicit options.
    pub async fn open_with(
        conninfo: &str,
        options: PostgresOptions,
    ) -> Result<PostgresStore, StoreError> {
        let (mut pg_config, tls_mode) = tls::parse_conninfo(conninfo)?;
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("courier");
        }
        crate::tls::install_crypto_provider();
        let tls = tls::connector(&options.extra_ca)?;
        let manager = Manager::from_config(
            pg_config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .build()
            .map_err(|e| StoreError::Postgres(format!("building the pool: {e}")))?;
        let instance = instance_id();
        let publisher = options
            .publish_wakeups
            .then(|| wakeup::spawn_publisher(pool.clone(), instance.clone()));
        let inner = Arc::new(Inner {
            pool,
            pg_config,
            tls,
            orphan_cursor: AtomicI64::new(0),
            instance,
            publisher,
            journal: trace::Switch::new(),
        });
        let store = PostgresStore { inner };
        let mut client = store.client().await?;
        schema::migrate(&mut client, crate::clock::now_ms()).await?;
        tracing::info!(instance = %store.inner.instance, tls = ?tls_mode, "postgres store open");
        Ok(store)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Postgres(format!("no database connection: {e}")))
    }

    /// Runs one operation on a pooled connection, retrying it from the
    /// start after a deadlock or serialization failure.
    async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Object) -> Fut,
        Fut: Future<Output = (Object, Result<T, Fail>)>,
    {
        let mut client = self.client().await?;
        let mut attempt = 1;
        loop {
            let (back, result) = op(client).await;
            client = back;
            match result {
                Ok(value) => return Ok(value),
                Err(fail) if fail.retryable() && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, error = ?fail, "postgres transaction retried");
                    attempt += 1;
                }
                Err(fail) => return Err(fail.into_store()),
            }
        }
    }

    /// Hands wake-ups for other workers to the publisher task, after a
    /// committed write. Never waits: the publisher batches them into one
    /// NOTIFY transaction, off the request path.
    fn publish(&self, wakeups: Vec<Wakeup>) {
        if let Some(publisher) = &self.inner.publisher {
            for wakeup in wakeups {
                // Fails only once the publisher is gone (shutting down).
                let _ = publisher.send(wakeup);
            }
        }
    }

    /// The pool's connection settings (for a dedicated LISTEN connection).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.inner.pg_config
    }
}

/// A random name for this store instance (hex of 8 random bytes).
fn instance_id() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unwraps a `run` closure's result pair.
macro_rules! on_client {
    ($self:expr, |$c:ident| $body:expr) => {
        $self.run(move |$c: Object| async move {
            #[allow(unused_mut)]
            let mut $c = $c;
            let result = $body;
            ($c, result)
        })
    };
}

impl PostgresStore {
    /// Records one `expired` journal row in a transaction of its own: for
    /// tests and operator tools. The retention rules call
    /// `trace::record_expired` inside the transaction that drops the
    /// message instead.
    pub async fn record_expired(
        &self,
        message_id: &str,
        place: &str,
        reason: &str,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        on_client!(self, |c| {
            let result: Result<(), Fail> = async {
                let tx = c.transaction().await?;
                trace::record_expired(&tx, now_ms, message_id, place, reason).await?;
                tx.commit().await?;
                Ok(())
            }
            .await;
            result
        })
        .await
    }

    /// Test support, not part of `Store`: whether `worker` holds an
    /// unexpired lease on `destination`, read without taking or extending
    /// it. The sender asks `Store::acquire_lease` instead; only
    /// `tests/it/store_postgres.rs` calls this, to check lease ownership.
    pub async fn holds_lease(
        &self,
        worker: &str,
        destination: &str,
        now_ms: TimestampMs,
    ) -> Result<bool, StoreError> {
        on_client!(self, |c| lease::holds_lease(
            &c,
            worker,
            destination,
            now_ms
        )
        .await)
        .await
    }

    /// Test support, not part of `Store`: publishes a `Wakeup::PeerUp` for
    /// `origin` to the other store instances, as `apply_inbound_txn` does
    /// for a backing-off origin, without writing anything. Only
    /// `tests/it/store_postgres.rs` calls this, as a probe that a LISTEN
    /// subscription is live.
    pub fn publish_peer_up(&self, origin: &str) {
        self.publish(vec![Wakeup::PeerUp(origin.to_owned())]);
    }
}

impl Store for PostgresStore {
    fn upsert_device<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        access_token: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(on_client!(self, |c| inbox::upsert_device(
            &mut c,
            user_id,
            device_id,
            access_token
        )
        .await))
    }

    fn delete_device<'a>(&'a self, user_id: &'a str, device_id: &'a str) -> StoreFuture<'a, bool> {
        // The same deletion as `KeyStore::delete_devices` (keys, signatures,
        // a logged change); the trait passes no time, so the change is
        // stamped with the wall clock.
        Box::pin(async move {
            let ids = [device_id.to_owned()];
            let deleted = self
                .delete_devices(user_id, &ids, crate::clock::now_ms())
                .await?;
            Ok(!deleted.is_empty())
        })
    }

    fn list_devices<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(on_client!(self, |c| inbox::list_devices(&c, user_id).await))
    }

    fn lookup_token<'a>(&'a self, access_token: &'a str) -> StoreFuture<'a, Option<DeviceKey>> {
        Box::pin(on_client!(self, |c| inbox::lookup_token(&c, access_token).await))
    }

    fn enqueue_send(&self, batch: SendBatch) -> StoreFuture<'_, SendOutcome> {
        Box::pin(async move {
            let batch = &batch;
            let outcome = on_client!(self, |c| send::enqueue_send(
                &mut c,
                batch,
                &self.inner.journal
            )
            .await)
            .await?;
            if let SendOutcome::Accepted {
                woken_devices,
                destinations,
            } = &outcome
            {
                let mut wakeups = Vec::new();
                if !woken_devices.is_empty() {
                    wakeups.push(Wakeup::Devices(woken_devices.clone()));
                }
                wakeups.extend(destinations.iter().cloned().map(Wakeup::Destination));
                self.publish(wakeups);
            }
            Ok(outcome)
        })
    }

    fn apply_inbound_txn(&self, txn: InboundTxn) -> StoreFuture<'_, InboundOutcome> {
        Box::pin(async move {
            let txn = &txn;
            let (outcome, origin_backing_off) = on_client!(self, |c| {
                inbox::apply_inbound_txn(&mut c, txn, &self.inner.journal).await
            })
            .await?;
            let mut wakeups = Vec::new();
            // Only an authenticated origin reaches the store: it is up. Tell
            // the worker that owns it, if its sender is backing off.
            if origin_backing_off {
                wakeups.push(Wakeup::PeerUp(txn.origin.clone()));
            }
            if let InboundOutcome::Accepted { woken_devices, .. } = &outcome
                && !woken_devices.is_empty()
            {
                wakeups.push(Wakeup::Devices(woken_devices.clone()));
            }
            self.publish(wakeups);
            Ok(outcome)
        })
    }

    fn inbound_txn_response<'a>(
        &'a self,
        origin: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(on_client!(self, |c| inbox::inbound_txn_response(
            &c, origin, txn_id
        )
        .await))
    }

    fn fetch_inbox<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        let now_ms = crate::clock::now_ms();
        let journal = &self.inner.journal;
        Box::pin(on_client!(self, |c| inbox::fetch_inbox(
            &c, user_id, device_id, since, limit, now_ms, journal
        )
        .await))
    }

    fn in_flight<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, Option<InFlightTxn>> {
        Box::pin(on_client!(self, |c| outbox::in_flight(&c, destination).await))
    }

    fn peek_outbox<'a>(
        &'a self,
        destination: &'a str,
        max_edus: u32,
        max_bytes: u64,
    ) -> StoreFuture<'a, Vec<OutboxEdu>> {
        Box::pin(on_client!(self, |c| outbox::peek_outbox(
            &c,
            destination,
            max_edus,
            max_bytes
        )
        .await))
    }

    fn begin_txn<'a>(&'a self, fence: &'a Fence, txn: InFlightTxn) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let txn = &txn;
            on_client!(self, |c| outbox::begin_txn(&mut c, fence, txn).await).await
        })
    }

    fn ack_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let sent = on_client!(self, |c| outbox::ack_txn(
                &mut c,
                fence,
                destination,
                txn_id,
                now_ms
            )
            .await)
            .await?;
            if sent > 0 {
                metrics::counter!("courier_device_list_updates_total", "event" => "sent")
                    .increment(sent);
            }
            Ok(())
        })
    }

    fn advance<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        acked: Option<(&'a str, TimestampMs)>,
        next: NextTxn,
    ) -> StoreFuture<'a, Option<InFlightTxn>> {
        Box::pin(async move {
            let next = &next;
            let (txn, sent) = on_client!(self, |c| outbox::advance(
                &mut c,
                fence,
                destination,
                acked,
                next
            )
            .await)
            .await?;
            if sent > 0 {
                metrics::counter!("courier_device_list_updates_total", "event" => "sent")
                    .increment(sent);
            }
            // Put together here, after the commit.
            Ok(txn.map(crate::store::RecordedTxn::into_in_flight))
        })
    }

    fn refuse_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(on_client!(self, |c| outbox::refuse_txn(
            &mut c,
            fence,
            destination,
            txn_id
        )
        .await))
    }

    fn quarantine_edu<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        reason: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        Box::pin(on_client!(self, |c| refusals::quarantine_edu(
            &mut c,
            fence,
            destination,
            seq,
            reason,
            now_ms
        )
        .await))
    }

    fn list_quarantined<'a>(
        &'a self,
        destination: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<QuarantinedEdu>> {
        Box::pin(on_client!(self, |c| refusals::list_quarantined(
            &c,
            destination
        )
        .await))
    }

    fn release_quarantined<'a>(
        &'a self,
        destination: &'a str,
        seq: i64,
        requeue: bool,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let released = on_client!(self, |c| refusals::release_quarantined(
                &mut c,
                destination,
                seq,
                requeue
            )
            .await)
            .await?;
            if released && requeue {
                self.publish(vec![Wakeup::Destination(destination.to_owned())]);
            }
            Ok(released)
        })
    }

    fn edu_refusals<'a>(&'a self, destination: &'a str, seq: i64) -> StoreFuture<'a, Option<u32>> {
        Box::pin(on_client!(self, |c| refusals::edu_refusals(
            &c,
            destination,
            seq
        )
        .await))
    }

    fn restore_quarantined<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        refusals: u32,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let restored = on_client!(self, |c| refusals::restore_quarantined(
                &mut c,
                fence,
                destination,
                seq,
                refusals
            )
            .await)
            .await?;
            if restored {
                self.publish(vec![Wakeup::Destination(destination.to_owned())]);
            }
            Ok(restored)
        })
    }

    fn requeue_quarantined<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let requeued = on_client!(self, |c| refusals::requeue_quarantined(&mut c, destination)
                .await)
            .await?;
            if requeued > 0 {
                self.publish(vec![Wakeup::Destination(destination.to_owned())]);
            }
            Ok(requeued)
        })
    }

    fn refusal_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RefusalState> {
        Box::pin(on_client!(self, |c| refusals::refusal_state(
            &c,
            destination
        )
        .await))
    }

    fn set_refusal_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RefusalState,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        Box::pin(on_client!(self, |c| refusals::set_refusal_state(
            &mut c,
            fence,
            destination,
            state,
            now_ms
        )
        .await))
    }

    fn retry_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RetryState> {
        Box::pin(on_client!(self, |c| outbox::retry_state(&c, destination).await))
    }

    fn set_retry_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RetryState,
    ) -> StoreFuture<'a, ()> {
        // The trait passes no time: the retry state's activity stamp is the
        // wall clock at the write.
        let now_ms = crate::clock::now_ms();
        Box::pin(on_client!(self, |c| outbox::set_retry_state(
            &mut c,
            fence,
            destination,
            state,
            now_ms
        )
        .await))
    }

    fn destinations_with_pending(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(on_client!(self, |c| outbox::destinations_with_pending(&c).await))
    }

    fn destination_statuses(&self) -> StoreFuture<'_, Vec<DestinationStatus>> {
        Box::pin(on_client!(self, |c| outbox::destination_statuses(&c).await))
    }

    fn server_keys<'a>(&'a self, server_name: &'a str) -> StoreFuture<'a, Vec<StoredServerKey>> {
        Box::pin(on_client!(self, |c| server_keys::server_keys(
            &c,
            server_name
        )
        .await))
    }

    fn put_server_keys(&self, keys: Vec<StoredServerKey>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let keys = &keys;
            on_client!(self, |c| server_keys::put_server_keys(&mut c, keys).await).await
        })
    }

    fn prune(
        &self,
        now_ms: TimestampMs,
        retention: Retention,
        batch: u32,
    ) -> StoreFuture<'_, PruneReport> {
        let cursor = &self.inner.orphan_cursor;
        Box::pin(on_client!(self, |c| outbox::prune(
            &c, now_ms, retention, batch, cursor
        )
        .await))
    }

    fn expire<'a>(
        &'a self,
        now_ms: TimestampMs,
        policy: &'a ExpiryPolicy,
        batch: u32,
    ) -> StoreFuture<'a, Vec<ExpiredMessage>> {
        Box::pin(on_client!(self, |c| retention::expire(
            &mut c, now_ms, policy, batch
        )
        .await))
    }

    fn expiry_totals(&self) -> StoreFuture<'_, Vec<ExpiryTotal>> {
        Box::pin(on_client!(self, |c| retention::expiry_totals(&c).await))
    }

    fn trace_journal<'a>(
        &'a self,
        query: &'a crate::store::trace::TraceQuery,
    ) -> StoreFuture<'a, crate::store::trace::TraceRecords> {
        // One read-only REPEATABLE READ transaction: every row from one
        // snapshot.
        Box::pin(on_client!(self, |c| {
            let result: Result<_, Fail> = async {
                let tx = c
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let records = trace::trace_journal(&tx, query).await?;
                tx.commit().await?;
                Ok(records)
            }
            .await;
            result
        }))
    }

    fn set_trace_journal(&self, enabled: bool) -> StoreFuture<'_, ()> {
        let journal = &self.inner.journal;
        Box::pin(on_client!(self, |c| trace::set_enabled(
            &c, journal, enabled
        )
        .await))
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.inner.pool.close();
            Ok(())
        })
    }

    fn claim_destinations<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(on_client!(self, |c| lease::claim_destinations(
            &mut c, worker, now_ms, lease_ms, limit
        )
        .await))
    }

    fn acquire_lease<'a>(
        &'a self,
        worker: &'a str,
        destination: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, Option<Fence>> {
        Box::pin(on_client!(self, |c| lease::acquire_lease(
            &c,
            worker,
            destination,
            now_ms,
            lease_ms
        )
        .await))
    }

    fn renew_leases<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, u64> {
        Box::pin(on_client!(self, |c| lease::renew_leases(
            &mut c, worker, now_ms, lease_ms
        )
        .await))
    }

    fn release_leases<'a>(&'a self, worker: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(on_client!(self, |c| lease::release_leases(&c, worker).await))
    }

    fn claim_worker_name<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, ()> {
        let instance = self.inner.instance.as_str();
        Box::pin(on_client!(self, |c| workers::claim(
            &c, worker, instance, now_ms, lease_ms
        )
        .await))
    }

    fn heartbeat_worker_name<'a>(
        &'a self,
        worker: &'a str,
        now_ms: TimestampMs,
        lease_ms: i64,
    ) -> StoreFuture<'a, bool> {
        let instance = self.inner.instance.as_str();
        Box::pin(on_client!(self, |c| workers::heartbeat(
            &c, worker, instance, now_ms, lease_ms
        )
        .await))
    }

    fn release_worker_name<'a>(&'a self, worker: &'a str) -> StoreFuture<'a, ()> {
        let instance = self.inner.instance.as_str();
        Box::pin(on_client!(self, |c| workers::release(&c, worker, instance).await))
    }

    fn subscribe_wakeups(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Wakeup>> {
        Some(wakeup::subscribe(
            self.inner.pg_config.clone(),
            self.inner.tls.clone(),
            self.inner.instance.clone(),
        ))
    }
}
