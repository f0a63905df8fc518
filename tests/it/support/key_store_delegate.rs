//! `delegate_key_store!`: a `KeyStore` impl for a store wrapper that passes
//! every E2EE call, unchanged, to the store it wraps.

#[macro_export]
macro_rules! delegate_key_store {
    ($wrapper:ty, |$s:ident| $inner:expr) => {
        impl courier::store::KeyStore for $wrapper {
            fn upload_keys(
                &self,
                upload: courier::store::keys::KeysUpload,
            ) -> courier::store::StoreFuture<'_, courier::store::keys::UploadOutcome> {
                let $s = self;
                $inner.upload_keys(upload)
            }
            fn key_counts<'a>(
                &'a self,
                user_id: &'a str,
                device_id: &'a str,
            ) -> courier::store::StoreFuture<'a, courier::store::keys::KeyCounts> {
                let $s = self;
                $inner.key_counts(user_id, device_id)
            }
            fn claim_keys(
                &self,
                wanted: Vec<courier::store::keys::ClaimWanted>,
                now_ms: courier::store::TimestampMs,
            ) -> courier::store::StoreFuture<'_, Vec<courier::store::keys::ClaimedKey>> {
                let $s = self;
                $inner.claim_keys(wanted, now_ms)
            }
            fn user_devices(
                &self,
                queries: Vec<courier::store::keys::DeviceQuery>,
            ) -> courier::store::StoreFuture<'_, Vec<courier::store::keys::UserDevices>> {
                let $s = self;
                $inner.user_devices(queries)
            }
            fn set_display_name<'a>(
                &'a self,
                user_id: &'a str,
                device_id: &'a str,
                display_name: Option<&'a str>,
                now_ms: courier::store::TimestampMs,
            ) -> courier::store::StoreFuture<'a, bool> {
                let $s = self;
                $inner.set_display_name(user_id, device_id, display_name, now_ms)
            }
            fn delete_devices<'a>(
                &'a self,
                user_id: &'a str,
                device_ids: &'a [String],
                now_ms: courier::store::TimestampMs,
            ) -> courier::store::StoreFuture<'a, Vec<String>> {
                let $s = self;
                $inner.delete_devices(user_id, device_ids, now_ms)
            }
            fn put_cross_signing_keys<'a>(
                &'a self,
                user_id: &'a str,
                keys: Vec<courier::store::keys::NewCrossSigningKey>,
                now_ms: courier::store::TimestampMs,
            ) -> courier::store::StoreFuture<'a, ()> {
                let $s = self;
                $inner.put_cross_signing_keys(user_id, keys, now_ms)
            }
            fn put_signatures(
                &self,
                signatures: Vec<courier::store::keys::StoredSignature>,
                now_ms: courier::store::TimestampMs,
            ) -> courier::store::StoreFuture<'_, ()> {
                let $s = self;
                $inner.put_signatures(signatures, now_ms)
            }
            fn device_list_position(&self) -> courier::store::StoreFuture<'_, i64> {
                let $s = self;
                $inner.device_list_position()
            }
            fn users_with_changes(
                &self,
                users: Vec<String>,
                after: i64,
                up_to: i64,
            ) -> courier::store::StoreFuture<'_, courier::store::keys::DeviceListChanges> {
                let $s = self;
                $inner.users_with_changes(users, after, up_to)
            }
        }
    };
}
