//! The SQLite backend's `DeviceListStore` (issue 16): interest, tracking,
//! the remote device-list cache, and the outbound device-list EDUs that the
//! change log's writers queue.

impl crate::store::DeviceListStore for super::SqliteStore {}
