//! `delegate_key_store!`: a `KeyStore` impl for a store wrapper that passes
//! every E2EE call, unchanged, to the store it wraps, and
//! `delegate_device_list_store!`, the same for `DeviceListStore`.

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

/// `delegate_device_list_store!`: the same for `DeviceListStore`.
#[macro_export]
macro_rules! delegate_device_list_store {
    ($wrapper:ty, |$s:ident| $inner:expr) => {
        impl courier::store::DeviceListStore for $wrapper {
            fn add_device_list_interest(&self, interests: Vec<courier::store::device_lists::NewInterest>, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'_, ()> {
                let $s = self;
                $inner.add_device_list_interest(interests, now_ms)
            }
            fn remove_device_list_interest<'a>(&'a self, user_id: &'a str, destinations: Vec<String>) -> courier::store::StoreFuture<'a, u64> {
                let $s = self;
                $inner.remove_device_list_interest(user_id, destinations)
            }
            fn device_list_interest<'a>(&'a self, user_id: &'a str) -> courier::store::StoreFuture<'a, Vec<courier::store::device_lists::Interest>> {
                let $s = self;
                $inner.device_list_interest(user_id)
            }
            fn device_list_destinations<'a>(&'a self, user_id: &'a str, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'a, Vec<String>> {
                let $s = self;
                $inner.device_list_destinations(user_id, now_ms)
            }
            fn track_users<'a>(&'a self, tracker: &'a str, targets: Vec<courier::store::device_lists::TrackTarget>, source: courier::store::device_lists::TrackSource, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'a, Vec<String>> {
                let $s = self;
                $inner.track_users(tracker, targets, source, now_ms)
            }
            fn untrack_users<'a>(&'a self, tracker: &'a str, users: Vec<String>, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'a, Vec<String>> {
                let $s = self;
                $inner.untrack_users(tracker, users, now_ms)
            }
            fn tracked_users<'a>(&'a self, tracker: &'a str) -> courier::store::StoreFuture<'a, Vec<String>> {
                let $s = self;
                $inner.tracked_users(tracker)
            }
            fn tracker_devices(&self, users: Vec<String>) -> courier::store::StoreFuture<'_, Vec<courier::store::DeviceKey>> {
                let $s = self;
                $inner.tracker_devices(users)
            }
            fn left_users<'a>(&'a self, tracker: &'a str, after: i64, up_to: i64) -> courier::store::StoreFuture<'a, Vec<String>> {
                let $s = self;
                $inner.left_users(tracker, after, up_to)
            }
            fn remote_device_lists(&self, users: Vec<String>) -> courier::store::StoreFuture<'_, Vec<courier::store::device_lists::RemoteDeviceList>> {
                let $s = self;
                $inner.remote_device_lists(users)
            }
            fn apply_remote_device_updates<'a>(&'a self, user_id: &'a str, updates: Vec<courier::store::device_lists::RemoteDeviceUpdate>, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'a, courier::store::device_lists::RemoteUpdateReport> {
                let $s = self;
                $inner.apply_remote_device_updates(user_id, updates, now_ms)
            }
            fn put_remote_cross_signing<'a>(&'a self, user_id: &'a str, master_key_json: Option<String>, self_signing_key_json: Option<String>, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'a, bool> {
                let $s = self;
                $inner.put_remote_cross_signing(user_id, master_key_json, self_signing_key_json, now_ms)
            }
            fn replace_remote_device_list(&self, snapshot: courier::store::device_lists::RemoteSnapshot, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'_, courier::store::device_lists::SnapshotOutcome> {
                let $s = self;
                $inner.replace_remote_device_list(snapshot, now_ms)
            }
            fn mark_remote_stale(&self, users: Vec<String>, now_ms: courier::store::TimestampMs) -> courier::store::StoreFuture<'_, Vec<String>> {
                let $s = self;
                $inner.mark_remote_stale(users, now_ms)
            }
            fn stale_remote_users(&self, limit: u32) -> courier::store::StoreFuture<'_, Vec<String>> {
                let $s = self;
                $inner.stale_remote_users(limit)
            }
        }
    };
}
