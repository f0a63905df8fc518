//! SQLite backend of `Store`: the embedded default (DESIGN §2, §3).
//!
//! Shape: one dedicated OS thread owns the only write connection and runs
//! **group commit** (`sqlite/writer.rs`): concurrent writes share one
//! `BEGIN IMMEDIATE` transaction and one fsync, each isolated in its own
//! savepoint. Reads go to a small pool of read connections through
//! `spawn_blocking`. No rusqlite call ever runs on a tokio worker thread.
//! The database is in WAL mode with `synchronous=FULL`, so a write future
//! resolves only after its commit is durable. The SQL of each operation is in
//! `sqlite/devices.rs`, `sqlite/send.rs`, `sqlite/inbox.rs`,
//! `sqlite/outbox.rs`, `sqlite/maintenance.rs` and `sqlite/retention.rs`;
//! the schema is in
//! `migrations/sqlite/*.sql`.
//!
//! Not here: deciding what to write (`todevice`), waking long-polls or
//! destination tasks (callers do that with the returned outcomes), and any
//! periodic pruning schedule (`store::pruner` runs `prune`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Semaphore, oneshot};

use crate::store::{
    DestinationStatus, DeviceKey, ExpiredMessage, ExpiryPolicy, ExpiryTotal, Fence, InFlightTxn,
    InboundOutcome, InboundTxn, InboxPage, KeyStore, NextTxn, OutboxEdu, PruneReport,
    QuarantinedEdu, RefusalState, Retention, RetryState, SendBatch, SendOutcome, Store, StoreError,
    StoreFuture, StoredServerKey, SyncRead, TimestampMs,
};

mod device_changes;
mod device_list_outbox;
mod device_lists;
mod devices;
mod in_flight;
mod inbox;
mod keys;
mod maintenance;
mod multirow;
mod outbox;
mod remote_cache;
mod retention;
mod schema;
mod send;
mod sync_read;
pub mod trace;
mod trace_read;
mod writer;

use crate::store::token_cache::TokenCache;
use writer::{ClosureJob, Message, Writer, WriterStats};

/// Tuning of a `SqliteStore`. `SqliteOptions::default()` suits production.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read connections in the pool (concurrent reads).
    pub readers: usize,
    /// The most write requests one group transaction takes.
    pub max_batch: usize,
    /// How long a connection waits for a lock held by another process.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            max_batch: 512,
            busy_timeout: Duration::from_secs(10),
        }
    }
}

/// The SQLite store. Cheap to clone: clones share the writer thread and the
/// reader pool. The writer stops when the last clone is dropped (after
/// finishing queued writes) or on `close`.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    busy_timeout: Duration,
    writer: mpsc::Sender<Message>,
    stats: Arc<WriterStats>,
    readers: Mutex<Vec<Connection>>,
    reader_permits: Arc<Semaphore>,
    /// Where the next prune pass continues its orphan-row scan (stream id).
    orphan_cursor: AtomicI64,
    /// Tokens confirmed by `lookup_token`; every token write invalidates.
    tokens: TokenCache<DeviceKey>,
    /// Whether the trace journal is on (`trace_settings`, mirrored).
    journal: trace::Switch,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating the file and its parent directory if missing) and
    /// migrates the database at `path`, with default options.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the database at `path` with explicit options.
    pub async fn open_with(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let path = path.to_path_buf();
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = mpsc::channel::<Message>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), StoreError>>();
        let thread_path = path.clone();
        let thread_stats = stats.clone();
        let busy_timeout = options.busy_timeout;
        let max_batch = options.max_batch.max(1);
        let journal = trace::Switch::default();
        let thread_journal = journal.clone();
        std::thread::Builder::new()
            .name("courier-sqlite-writer".to_owned())
            .spawn(move || {
                let setup = (|| {
                    if let Some(parent) = thread_path.parent()
                        && !parent.as_os_str().is_empty()
                    {
                        std::fs::create_dir_all(parent)?;
                    }
                    let mut conn = schema::open_writer(&thread_path, busy_timeout)?;
                    schema::migrate(&mut conn, crate::clock::now_ms())?;
                    thread_journal.set(trace::enabled(&conn)?);
                    Ok::<_, StoreError>(conn)
                })();
                match setup {
                    Ok(conn) => {
                        let _ = ready_tx.send(Ok(()));
                        Writer {
                            conn,
                            rx,
                            stats: thread_stats,
                            max_batch,
                        }
                        .run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx.await.map_err(|_| StoreError::Closed)??;

        let reader_path = path.clone();
        let count = options.readers.max(1);
        let readers = tokio::task::spawn_blocking(move || {
            (0..count)
                .map(|_| schema::open_reader(&reader_path, busy_timeout))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(join_error)??;
        tracing::info!(path = %path.display(), readers = count, "sqlite store open");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                busy_timeout,
                writer: tx,
                stats,
                readers: Mutex::new(readers),
                reader_permits: Arc::new(Semaphore::new(count)),
                orphan_cursor: AtomicI64::new(0),
                tokens: TokenCache::new(),
                journal,
            }),
        })
    }

    /// Group transactions committed so far (each is one WAL fsync).
    pub fn commit_count(&self) -> u64 {
        self.inner.stats.commits.load(Ordering::Relaxed)
    }

    /// Write requests answered so far.
    pub fn write_count(&self) -> u64 {
        self.inner.stats.jobs.load(Ordering::Relaxed)
    }

    /// Records one `expired` journal row in a write of its own: for tests
    /// and operator tools. The retention rules call `trace::record_expired`
    /// inside the transaction that drops the message instead.
    pub async fn record_expired(
        &self,
        message_id: &str,
        place: &str,
        reason: &str,
        now_ms: TimestampMs,
    ) -> Result<(), StoreError> {
        let (message_id, place, reason) =
            (message_id.to_owned(), place.to_owned(), reason.to_owned());
        self.write(move |c| trace::record_expired(c, now_ms, &message_id, &place, &reason))
            .await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Finishes the queued writes, checkpoints the WAL and stops the writer
    /// thread. Later writes (from any clone) fail with `StoreError::Closed`.
    pub async fn close(&self) -> Result<(), StoreError> {
        let (done_tx, done_rx) = oneshot::channel();
        if self.inner.writer.send(Message::Shutdown(done_tx)).is_err() {
            return Ok(());
        }
        // An error here means the thread is already gone: closed either way.
        let _ = done_rx.await;
        Ok(())
    }

    /// Runs `op` on the writer thread inside the next group transaction and
    /// resolves after that transaction committed.
    fn write<T, F>(&self, op: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        async move {
            let (reply_tx, reply_rx) = oneshot::channel();
            inner
                .writer
                .send(Message::Job(Box::new(ClosureJob::new(op, reply_tx))))
                .map_err(|_| StoreError::Closed)?;
            reply_rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// Runs `op` on a pooled read connection on the blocking pool.
    fn read<T, F>(&self, op: F) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        async move {
            let permit = inner
                .reader_permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| StoreError::Closed)?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let pooled = crate::sync::lock(&inner.readers).pop();
                // A connection is missing only if an earlier read panicked
                // while holding it; replace it.
                let conn = match pooled {
                    Some(conn) => conn,
                    None => schema::open_reader(&inner.path, inner.busy_timeout)?,
                };
                let result = op(&conn);
                crate::sync::lock(&inner.readers).push(conn);
                result
            })
            .await
            .map_err(join_error)?
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io(std::io::Error::other(format!(
        "sqlite read task failed: {e}"
    )))
}

impl Store for SqliteStore {
    fn upsert_device<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        access_token: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.upsert_device_and_token(user_id, device_id, access_token))
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
        let user_id = user_id.to_owned();
        Box::pin(self.read(move |c| devices::list_devices(c, &user_id)))
    }

    fn lookup_token<'a>(&'a self, access_token: &'a str) -> StoreFuture<'a, Option<DeviceKey>> {
        Box::pin(self.cached_lookup_token(access_token))
    }

    fn enqueue_send(&self, batch: SendBatch) -> StoreFuture<'_, SendOutcome> {
        let journal = self.inner.journal.clone();
        Box::pin(self.write(move |c| send::enqueue_send(c, &batch, journal.on())))
    }

    fn apply_inbound_txn(&self, txn: InboundTxn) -> StoreFuture<'_, InboundOutcome> {
        let journal = self.inner.journal.clone();
        Box::pin(self.write(move |c| inbox::apply_inbound_txn(c, &txn, journal.on())))
    }

    fn inbound_txn_response<'a>(
        &'a self,
        origin: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, Option<String>> {
        let (origin, txn_id) = (origin.to_owned(), txn_id.to_owned());
        Box::pin(self.read(move |c| inbox::inbound_txn_response(c, &origin, &txn_id)))
    }

    fn fetch_inbox<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        Box::pin(async move {
            let (page, ()) = self
                .read_inbox(user_id, device_id, since, limit, |_, _, _| Ok(()))
                .await?;
            Ok(page)
        })
    }

    fn sync_read<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, SyncRead> {
        Box::pin(async move {
            let (page, (device_list_position, key_counts)) = self
                .read_inbox(user_id, device_id, since, limit, |c, u, d| {
                    Ok((keys::device_list_position(c)?, keys::key_counts(c, u, d)?))
                })
                .await?;
            Ok(SyncRead {
                page,
                device_list_position,
                key_counts,
            })
        })
    }

    fn in_flight<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, Option<InFlightTxn>> {
        let destination = destination.to_owned();
        Box::pin(self.read(move |c| in_flight::in_flight(c, &destination)))
    }

    fn peek_outbox<'a>(
        &'a self,
        destination: &'a str,
        max_edus: u32,
        max_bytes: u64,
    ) -> StoreFuture<'a, Vec<OutboxEdu>> {
        let destination = destination.to_owned();
        Box::pin(self.read(move |c| outbox::peek_outbox(c, &destination, max_edus, max_bytes)))
    }

    // One process owns every destination: the fence of the outbox writes is
    // always valid here (`Store::acquire_lease`'s default hands out epoch 0).

    fn begin_txn<'a>(&'a self, _fence: &'a Fence, txn: InFlightTxn) -> StoreFuture<'a, ()> {
        Box::pin(self.write(move |c| outbox::begin_txn(c, &txn)))
    }

    fn ack_txn<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let (destination, txn_id) = (destination.to_owned(), txn_id.to_owned());
        Box::pin(self.write(move |c| outbox::ack_txn(c, &destination, &txn_id, now_ms)))
    }

    fn advance<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        acked: Option<(&'a str, TimestampMs)>,
        next: NextTxn,
    ) -> StoreFuture<'a, Option<InFlightTxn>> {
        let destination = destination.to_owned();
        let acked = acked.map(|(txn_id, now_ms)| (txn_id.to_owned(), now_ms));
        Box::pin(async move {
            let recorded = self
                .write(move |c| {
                    let acked = acked.as_ref().map(|(id, now)| (id.as_str(), *now));
                    outbox::advance(c, &destination, acked, next)
                })
                .await?;
            // Put together here, on the caller's thread, not the writer's.
            Ok(recorded.map(crate::store::RecordedTxn::into_in_flight))
        })
    }

    fn refuse_txn<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, ()> {
        let (destination, txn_id) = (destination.to_owned(), txn_id.to_owned());
        Box::pin(self.write(move |c| outbox::refuse_txn(c, &destination, &txn_id)))
    }

    fn quarantine_edu<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        reason: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let (destination, reason) = (destination.to_owned(), reason.to_owned());
        Box::pin(self.write(move |c| outbox::quarantine_edu(c, &destination, seq, &reason, now_ms)))
    }

    fn list_quarantined<'a>(
        &'a self,
        destination: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<QuarantinedEdu>> {
        let destination = destination.map(str::to_owned);
        Box::pin(self.read(move |c| outbox::list_quarantined(c, destination.as_deref())))
    }

    fn release_quarantined<'a>(
        &'a self,
        destination: &'a str,
        seq: i64,
        requeue: bool,
    ) -> StoreFuture<'a, bool> {
        let destination = destination.to_owned();
        Box::pin(self.write(move |c| outbox::release_quarantined(c, &destination, seq, requeue)))
    }

    fn edu_refusals<'a>(&'a self, destination: &'a str, seq: i64) -> StoreFuture<'a, Option<u32>> {
        let destination = destination.to_owned();
        Box::pin(self.read(move |c| outbox::edu_refusals(c, &destination, seq)))
    }

    fn restore_quarantined<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        refusals: u32,
    ) -> StoreFuture<'a, bool> {
        let destination = destination.to_owned();
        Box::pin(self.write(move |c| outbox::restore_quarantined(c, &destination, seq, refusals)))
    }

    fn requeue_quarantined<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, u64> {
        let destination = destination.to_owned();
        Box::pin(self.write(move |c| outbox::requeue_quarantined(c, &destination)))
    }

    fn refusal_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RefusalState> {
        let destination = destination.to_owned();
        Box::pin(self.read(move |c| outbox::refusal_state(c, &destination)))
    }

    fn set_refusal_state<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        state: &'a RefusalState,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let (destination, state) = (destination.to_owned(), state.clone());
        Box::pin(self.write(move |c| outbox::set_refusal_state(c, &destination, &state, now_ms)))
    }

    fn retry_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RetryState> {
        let destination = destination.to_owned();
        Box::pin(self.read(move |c| outbox::retry_state(c, &destination)))
    }

    fn set_retry_state<'a>(
        &'a self,
        _fence: &'a Fence,
        destination: &'a str,
        state: &'a RetryState,
    ) -> StoreFuture<'a, ()> {
        let (destination, state) = (destination.to_owned(), state.clone());
        // The trait passes no time: the retry state's activity stamp is the
        // wall clock at the write.
        let now_ms = crate::clock::now_ms();
        Box::pin(self.write(move |c| outbox::set_retry_state(c, &destination, &state, now_ms)))
    }

    fn destinations_with_pending(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.read(outbox::destinations_with_pending))
    }

    fn destination_statuses(&self) -> StoreFuture<'_, Vec<DestinationStatus>> {
        Box::pin(self.read(outbox::destination_statuses))
    }

    fn server_keys<'a>(&'a self, server_name: &'a str) -> StoreFuture<'a, Vec<StoredServerKey>> {
        let server_name = server_name.to_owned();
        Box::pin(self.read(move |c| maintenance::server_keys(c, &server_name)))
    }

    fn put_server_keys(&self, keys: Vec<StoredServerKey>) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c| maintenance::put_server_keys(c, &keys)))
    }

    fn prune(
        &self,
        now_ms: TimestampMs,
        retention: Retention,
        batch: u32,
    ) -> StoreFuture<'_, PruneReport> {
        let inner = self.inner.clone();
        Box::pin(
            self.write(move |c| {
                maintenance::prune(c, now_ms, retention, batch, &inner.orphan_cursor)
            }),
        )
    }

    fn expire<'a>(
        &'a self,
        now_ms: TimestampMs,
        policy: &'a ExpiryPolicy,
        batch: u32,
    ) -> StoreFuture<'a, Vec<ExpiredMessage>> {
        let policy = policy.clone();
        Box::pin(self.write(move |c| retention::expire(c, now_ms, &policy, batch)))
    }

    fn expiry_totals(&self) -> StoreFuture<'_, Vec<ExpiryTotal>> {
        Box::pin(self.read(retention::expiry_totals))
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(SqliteStore::close(self))
    }

    fn trace_journal<'a>(
        &'a self,
        query: &'a crate::store::trace::TraceQuery,
    ) -> StoreFuture<'a, crate::store::trace::TraceRecords> {
        let query = query.clone();
        // One read transaction: every row from one snapshot.
        Box::pin(self.read(move |c| {
            let tx = c.unchecked_transaction()?;
            let records = trace_read::trace_journal(&tx, &query)?;
            tx.commit()?;
            Ok(records)
        }))
    }

    fn set_trace_journal(&self, enabled: bool) -> StoreFuture<'_, ()> {
        let (journal, restore) = (self.inner.journal.clone(), self.inner.journal.clone());
        Box::pin(async move {
            let result = self
                .write(move |c| trace::set_enabled(c, &journal, enabled))
                .await;
            if result.is_err() {
                // The group may have failed after the switch was set: put
                // back what the table holds (best effort; the error stands).
                let reload = move |c: &Connection| trace::enabled(c).map(|on| restore.set(on));
                let _ = self.write(reload).await;
            }
            result
        })
    }
}
