//! SQLite backend of `Store`. (Placeholder; the store work replaces this
//! file with the real backend.)

use super::StoreError;

pub struct SqliteStore {
    _private: (),
}

impl SqliteStore {
    pub async fn open(path: &std::path::Path) -> Result<SqliteStore, StoreError> {
        let _ = path;
        todo!("store work")
    }
}

impl super::Store for SqliteStore {
    fn upsert_device<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: Option<&'a str>,
    ) -> super::StoreFuture<'a, ()> {
        todo!()
    }
    fn delete_device<'a>(&'a self, _: &'a str, _: &'a str) -> super::StoreFuture<'a, bool> {
        todo!()
    }
    fn list_devices<'a>(&'a self, _: &'a str) -> super::StoreFuture<'a, Vec<String>> {
        todo!()
    }
    fn lookup_token<'a>(&'a self, _: &'a str) -> super::StoreFuture<'a, Option<super::DeviceKey>> {
        todo!()
    }
    fn enqueue_send(&self, _: super::SendBatch) -> super::StoreFuture<'_, super::SendOutcome> {
        todo!()
    }
    fn apply_inbound_txn(
        &self,
        _: super::InboundTxn,
    ) -> super::StoreFuture<'_, super::InboundOutcome> {
        todo!()
    }
    fn inbound_txn_response<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> super::StoreFuture<'a, Option<String>> {
        todo!()
    }
    fn fetch_inbox<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: i64,
        _: u32,
    ) -> super::StoreFuture<'a, super::InboxPage> {
        todo!()
    }
    fn in_flight<'a>(&'a self, _: &'a str) -> super::StoreFuture<'a, Option<super::InFlightTxn>> {
        todo!()
    }
    fn peek_outbox<'a>(
        &'a self,
        _: &'a str,
        _: u32,
        _: u64,
    ) -> super::StoreFuture<'a, Vec<super::OutboxEdu>> {
        todo!()
    }
    fn begin_txn(&self, _: super::InFlightTxn) -> super::StoreFuture<'_, ()> {
        todo!()
    }
    fn ack_txn<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: super::TimestampMs,
    ) -> super::StoreFuture<'a, ()> {
        todo!()
    }
    fn refuse_txn<'a>(&'a self, _: &'a str, _: &'a str) -> super::StoreFuture<'a, ()> {
        todo!()
    }
    fn quarantine_edu<'a>(
        &'a self,
        _: &'a str,
        _: i64,
        _: &'a str,
        _: super::TimestampMs,
    ) -> super::StoreFuture<'a, ()> {
        todo!()
    }
    fn list_quarantined<'a>(
        &'a self,
        _: Option<&'a str>,
    ) -> super::StoreFuture<'a, Vec<super::QuarantinedEdu>> {
        todo!()
    }
    fn release_quarantined<'a>(
        &'a self,
        _: &'a str,
        _: i64,
        _: bool,
    ) -> super::StoreFuture<'a, bool> {
        todo!()
    }
    fn retry_state<'a>(&'a self, _: &'a str) -> super::StoreFuture<'a, super::RetryState> {
        todo!()
    }
    fn set_retry_state<'a>(
        &'a self,
        _: &'a str,
        _: &'a super::RetryState,
    ) -> super::StoreFuture<'a, ()> {
        todo!()
    }
    fn destinations_with_pending(&self) -> super::StoreFuture<'_, Vec<String>> {
        todo!()
    }
    fn destination_statuses(&self) -> super::StoreFuture<'_, Vec<super::DestinationStatus>> {
        todo!()
    }
    fn server_keys<'a>(
        &'a self,
        _: &'a str,
    ) -> super::StoreFuture<'a, Vec<super::StoredServerKey>> {
        todo!()
    }
    fn put_server_keys(&self, _: Vec<super::StoredServerKey>) -> super::StoreFuture<'_, ()> {
        todo!()
    }
    fn prune(
        &self,
        _: super::TimestampMs,
        _: super::Retention,
        _: u32,
    ) -> super::StoreFuture<'_, super::PruneReport> {
        todo!()
    }
}
