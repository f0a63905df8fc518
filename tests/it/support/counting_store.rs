//! A store that counts the sender's outbox reads (`peek_outbox`) and
//! passes every call, unchanged, to the store it wraps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use courier::store::*;

pub struct CountingStore {
    pub inner: Arc<dyn Store>,
    pub peeks: AtomicU64,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        CountingStore {
            inner,
            peeks: AtomicU64::new(0),
        }
    }
    pub fn peeks(&self) -> u64 {
        self.peeks.load(Ordering::SeqCst)
    }
}

impl Store for CountingStore {
    fn upsert_device<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        access_token: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        self.inner.upsert_device(user_id, device_id, access_token)
    }
    fn delete_device<'a>(&'a self, user_id: &'a str, device_id: &'a str) -> StoreFuture<'a, bool> {
        self.inner.delete_device(user_id, device_id)
    }
    fn list_devices<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.list_devices(user_id)
    }
    fn lookup_token<'a>(&'a self, access_token: &'a str) -> StoreFuture<'a, Option<DeviceKey>> {
        self.inner.lookup_token(access_token)
    }
    fn enqueue_send(&self, batch: SendBatch) -> StoreFuture<'_, SendOutcome> {
        self.inner.enqueue_send(batch)
    }
    fn apply_inbound_txn(&self, txn: InboundTxn) -> StoreFuture<'_, InboundOutcome> {
        self.inner.apply_inbound_txn(txn)
    }
    fn inbound_txn_response<'a>(
        &'a self,
        origin: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, Option<String>> {
        self.inner.inbound_txn_response(origin, txn_id)
    }
    fn fetch_inbox<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        since: i64,
        limit: u32,
    ) -> StoreFuture<'a, InboxPage> {
        self.inner.fetch_inbox(user_id, device_id, since, limit)
    }
    fn in_flight<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, Option<InFlightTxn>> {
        self.inner.in_flight(destination)
    }
    fn peek_outbox<'a>(
        &'a self,
        destination: &'a str,
        max_edus: u32,
        max_bytes: u64,
    ) -> StoreFuture<'a, Vec<OutboxEdu>> {
        self.peeks.fetch_add(1, Ordering::SeqCst);
        self.inner.peek_outbox(destination, max_edus, max_bytes)
    }
    fn begin_txn<'a>(&'a self, fence: &'a Fence, txn: InFlightTxn) -> StoreFuture<'a, ()> {
        self.inner.begin_txn(fence, txn)
    }
    fn ack_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        self.inner.ack_txn(fence, destination, txn_id, now_ms)
    }
    fn refuse_txn<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        txn_id: &'a str,
    ) -> StoreFuture<'a, ()> {
        self.inner.refuse_txn(fence, destination, txn_id)
    }
    fn quarantine_edu<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        reason: &'a str,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        self.inner
            .quarantine_edu(fence, destination, seq, reason, now_ms)
    }
    fn list_quarantined<'a>(
        &'a self,
        destination: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<QuarantinedEdu>> {
        self.inner.list_quarantined(destination)
    }
    fn release_quarantined<'a>(
        &'a self,
        destination: &'a str,
        seq: i64,
        requeue: bool,
    ) -> StoreFuture<'a, bool> {
        self.inner.release_quarantined(destination, seq, requeue)
    }
    fn edu_refusals<'a>(&'a self, destination: &'a str, seq: i64) -> StoreFuture<'a, Option<u32>> {
        self.inner.edu_refusals(destination, seq)
    }
    fn restore_quarantined<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        seq: i64,
        refusals: u32,
    ) -> StoreFuture<'a, bool> {
        self.inner
            .restore_quarantined(fence, destination, seq, refusals)
    }
    fn requeue_quarantined<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, u64> {
        self.inner.requeue_quarantined(destination)
    }
    fn refusal_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RefusalState> {
        self.inner.refusal_state(destination)
    }
    fn set_refusal_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RefusalState,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        self.inner
            .set_refusal_state(fence, destination, state, now_ms)
    }
    fn retry_state<'a>(&'a self, destination: &'a str) -> StoreFuture<'a, RetryState> {
        self.inner.retry_state(destination)
    }
    fn set_retry_state<'a>(
        &'a self,
        fence: &'a Fence,
        destination: &'a str,
        state: &'a RetryState,
    ) -> StoreFuture<'a, ()> {
        self.inner.set_retry_state(fence, destination, state)
    }
    fn destinations_with_pending(&self) -> StoreFuture<'_, Vec<String>> {
        self.inner.destinations_with_pending()
    }
    fn destination_statuses(&self) -> StoreFuture<'_, Vec<DestinationStatus>> {
        self.inner.destination_statuses()
    }
    fn server_keys<'a>(&'a self, server_name: &'a str) -> StoreFuture<'a, Vec<StoredServerKey>> {
        self.inner.server_keys(server_name)
    }
    fn put_server_keys(&self, keys: Vec<StoredServerKey>) -> StoreFuture<'_, ()> {
        self.inner.put_server_keys(keys)
    }
    fn prune(
        &self,
        now_ms: TimestampMs,
        retention: Retention,
        batch: u32,
    ) -> StoreFuture<'_, PruneReport> {
        self.inner.prune(now_ms, retention, batch)
    }
    fn expire<'a>(
        &'a self,
        now_ms: TimestampMs,
        policy: &'a ExpiryPolicy,
        batch: u32,
    ) -> StoreFuture<'a, Vec<ExpiredMessage>> {
        self.inner.expire(now_ms, policy, batch)
    }
    fn expiry_totals(&self) -> StoreFuture<'_, Vec<ExpiryTotal>> {
        self.inner.expiry_totals()
    }
    fn trace_journal<'a>(
        &'a self,
        query: &'a courier::store::trace::TraceQuery,
    ) -> StoreFuture<'a, courier::store::trace::TraceRecords> {
        self.inner.trace_journal(query)
    }
    fn set_trace_journal(&self, enabled: bool) -> StoreFuture<'_, ()> {
        self.inner.set_trace_journal(enabled)
    }
}

crate::delegate_key_store!(CountingStore, |s| s.inner);
crate::delegate_device_list_store!(CountingStore, |s| s.inner);
