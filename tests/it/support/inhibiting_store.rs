//! The real store, with each call run on a blocking thread. Tokio does not
//! auto-advance paused time while a `spawn_blocking` task runs, so an fsync
//! on the store's writer thread costs no virtual time in the paused tests.
//! Every call still goes to the real `SqliteStore`.

use std::future::Future;
use std::sync::Arc;

use courier::store::*;

pub struct InhibitingStore(pub Arc<dyn Store>);

fn blocking<T: Send + 'static>(
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> StoreFuture<'static, T> {
    let handle = tokio::runtime::Handle::current();
    Box::pin(async move {
        tokio::task::spawn_blocking(move || handle.block_on(work))
            .await
            .map_err(|_| StoreError::Closed)?
    })
}

macro_rules! owned {
    ($($name:ident),*) => { $(let $name = $name.to_owned();)* };
}

impl Store for InhibitingStore {
    fn upsert_device<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        access_token: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        self.0.upsert_device(user_id, device_id, access_token)
    }
    fn delete_device<'a>(&'a self, user_id: &'a str, device_id: &'a str) -> StoreFuture<'a, bool> {
        self.0.delete_device(user_id, device_id)
    }
    fn list_devices<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.0.list_devices(user_id)
    }
    fn lookup_token<'a>(&'a self, access_token: &'a str) -> StoreFuture<'a, Option<DeviceKey>> {
        self.0.lookup_token(access_token)
    }
    fn enqueue_send(&self, batch: SendBatch) -> StoreFuture<'_, SendOutcome> {
        let s = self.0.clone();
        blocking(async move { s.enqueue_send(batch).await })
    }
    fn apply_inbound_txn(&self, txn: InboundTxn) -> StoreFuture<'_, InboundOutcome> {
        self.0.apply_inbound_txn(txn)
    }
    fn inbound_txn_response<'a>(
        &'a self,
        origin: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, Option<String>> {
        self.0.inbound_txn_response(origin, txn_id)
    }
    fn fetch_inbox<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        self.0.fetch_inbox(user_id, device_id, since, limit)
    }
    fn in_flight<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, Option<InFlightTxn>> {
        let s = self.0.clone();
        owned!(destination);
        blocking(async move { s.in_flight(&destination).await })
    }
    fn peek_outbox<'a>(
        &'a self,
        destination: &'a str,
        max_edus: u32,
        max_bytes: u64,
    ) -> StoreFuture<'a, Vec<OutboxEdu>> {
        let s = self.0.clone();
        owned!(destination);
        blocking(async move { s.peek_outbox(&destination, max_edus, max_bytes).await })
    }
    fn begin_txn<'a>(&'a self, fence: &'a Fence, txn: InFlightTxn) -> StoreFuture<'a, ()> {
        let s = self.0.clone();
        let fence = fence.clone();
        blocking(async move { s.begin_txn(&fence, txn).await })
    }
    fn ack_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let s = self.0.clone();
        owned!(destination, txn_id);
        let fence = fence.clone();
        blocking(async move { s.ack_txn(&fence, &destination, &txn_id, now_ms).await })
    }
    fn refuse_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, ()> {
        let s = self.0.clone();
        owned!(destination, txn_id);
        let fence = fence.clone();
        blocking(async move { s.refuse_txn(&fence, &destination, &txn_id).await })
    }
    fn quarantine_edu<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        reason: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let s = self.0.clone();
        owned!(destination, reason);
        let fence = fence.clone();
        blocking(async move {
            s.quarantine_edu(&fence, &destination, seq, &reason, now_ms)
                .await
        })
    }
    fn list_quarantined<'a>(
        &'a self,
        destination: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<QuarantinedEdu>> {
        self.0.list_quarantined(destination)
    }
    fn release_quarantined<'a>(
        &'a self,
        destination: &'a str,
        seq: i64,
        requeue: bool,
    ) -> StoreFuture<'a, bool> {
        self.0.release_quarantined(destination, seq, requeue)
    }
    fn edu_refusals<'a>(&'a self, destination: &'a str, seq: i64) -> StoreFuture<'a, Option<u32>> {
        let s = self.0.clone();
        owned!(destination);
        blocking(async move { s.edu_refusals(&destination, seq).await })
    }
    fn restore_quarantined<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        refusals: u32,
    ) -> StoreFuture<'a, bool> {
        let s = self.0.clone();
        owned!(destination);
        let fence = fence.clone();
        blocking(async move {
            s.restore_quarantined(&fence, &destination, seq, refusals)
                .await
        })
    }
    fn requeue_quarantined<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, u64> {
        let s = self.0.clone();
        owned!(destination);
        blocking(async move { s.requeue_quarantined(&destination).await })
    }
    fn refusal_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RefusalState> {
        let s = self.0.clone();
        owned!(destination);
        blocking(async move { s.refusal_state(&destination).await })
    }
    fn set_refusal_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RefusalState,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let s = self.0.clone();
        owned!(destination);
        let (fence, state) = (fence.clone(), state.clone());
        blocking(async move {
            s.set_refusal_state(&fence, &destination, &state, now_ms)
                .await
        })
    }
    fn retry_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RetryState> {
        let s = self.0.clone();
        owned!(destination);
        blocking(async move { s.retry_state(&destination).await })
    }
    fn set_retry_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RetryState,
    ) -> StoreFuture<'a, ()> {
        let s = self.0.clone();
        owned!(destination);
        let (fence, state) = (fence.clone(), state.clone());
        blocking(async move { s.set_retry_state(&fence, &destination, &state).await })
    }
    fn destinations_with_pending(&self) -> StoreFuture<'_, Vec<String>> {
        let s = self.0.clone();
        blocking(async move { s.destinations_with_pending().await })
    }
    fn destination_statuses(&self) -> StoreFuture<'_, Vec<DestinationStatus>> {
        let s = self.0.clone();
        blocking(async move { s.destination_statuses().await })
    }
    fn server_keys<'a>(&'a self, server_name: &'a str) -> StoreFuture<'a, Vec<StoredServerKey>> {
        self.0.server_keys(server_name)
    }
    fn put_server_keys(&self, keys: Vec<StoredServerKey>) -> StoreFuture<'_, ()> {
        self.0.put_server_keys(keys)
    }
    fn prune(
        &self,
        now_ms: TimestampMs,
        retention: Retention,
        batch: u32,
    ) -> StoreFuture<'_, PruneReport> {
        self.0.prune(now_ms, retention, batch)
    }
    fn expire<'a>(
        &'a self,
        now_ms: TimestampMs,
        policy: &'a ExpiryPolicy,
        batch: u32,
    ) -> StoreFuture<'a, Vec<ExpiredMessage>> {
        self.0.expire(now_ms, policy, batch)
    }
    fn expiry_totals(&self) -> StoreFuture<'_, Vec<ExpiryTotal>> {
        self.0.expiry_totals()
    }
    fn trace_journal<'a>(
        &'a self,
        query: &'a courier::store::trace::TraceQuery,
    ) -> StoreFuture<'a, courier::store::trace::TraceRecords> {
        self.0.trace_journal(query)
    }
    fn set_trace_journal(&self, enabled: bool) -> StoreFuture<'_, ()> {
        self.0.set_trace_journal(enabled)
    }
}

crate::delegate_key_store!(InhibitingStore, |s| s.0);
crate::delegate_device_list_store!(InhibitingStore, |s| s.0);
