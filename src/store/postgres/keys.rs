// PLACEHOLDER (e2ee-base branch only, replaced by the store lane): every
// method fails, so the rest of the tree compiles against the KeyStore trait.

use crate::store::keys::*;
use crate::store::{StoreError, StoreFuture, TimestampMs};

fn unimplemented<'a, T: Send + 'a>() -> StoreFuture<'a, T> {
    Box::pin(async { Err(StoreError::Corrupt("KeyStore not implemented yet".into())) })
}

impl KeyStore for super::PostgresStore {
    fn upload_keys(&self, _upload: KeysUpload) -> StoreFuture<'_, UploadOutcome> {
        unimplemented()
    }
    fn key_counts<'a>(&'a self, _u: &'a str, _d: &'a str) -> StoreFuture<'a, KeyCounts> {
        unimplemented()
    }
    fn claim_keys(
        &self,
        _w: Vec<ClaimWanted>,
        _n: TimestampMs,
    ) -> StoreFuture<'_, Vec<ClaimedKey>> {
        unimplemented()
    }
    fn user_devices(&self, _q: Vec<DeviceQuery>) -> StoreFuture<'_, Vec<UserDevices>> {
        unimplemented()
    }
    fn set_display_name<'a>(
        &'a self,
        _u: &'a str,
        _d: &'a str,
        _n: Option<&'a str>,
        _t: TimestampMs,
    ) -> StoreFuture<'a, bool> {
        unimplemented()
    }
    fn delete_devices<'a>(
        &'a self,
        _u: &'a str,
        _d: &'a [String],
        _t: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        unimplemented()
    }
    fn put_cross_signing_keys<'a>(
        &'a self,
        _u: &'a str,
        _k: Vec<NewCrossSigningKey>,
        _t: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        unimplemented()
    }
    fn put_signatures(&self, _s: Vec<StoredSignature>, _t: TimestampMs) -> StoreFuture<'_, ()> {
        unimplemented()
    }
    fn device_list_position(&self) -> StoreFuture<'_, i64> {
        unimplemented()
    }
    fn users_with_changes(
        &self,
        _u: Vec<String>,
        _a: i64,
        _b: i64,
    ) -> StoreFuture<'_, DeviceListChanges> {
        unimplemented()
    }
}
