//! Reading a device inbox for `fetch_inbox` and `sync_read`: one read
//! (on the calling thread when a pooled connection is free) when `since`
//! acknowledges nothing (idle long-polls
//! re-read with an already-applied `since`, and stay off the writer), else
//! one writer job that journals and deletes the acknowledged rows and
//! reads the page after them. Whatever else the caller wants read (the
//! device-list position and key counts of a `/sync`) is read in the same
//! hop, on the same connection.

use rusqlite::Connection;

use super::{SqliteStore, inbox};
use crate::store::{InboxPage, StoreError};

/// What the reader decided.
enum InboxRead<T> {
    /// Nothing to acknowledge: the page (and the extra) read from the pool.
    Page(InboxPage, T),
    /// Rows at or below `since` exist: the writer must delete them.
    NeedsDelete,
}

/// The extra a caller reads beside the page: `(connection, user, device)`.
pub(super) type Extra<T> = fn(&Connection, &str, &str) -> Result<T, StoreError>;

impl SqliteStore {
    /// The device's inbox page after `since` (deleting the rows `since`
    /// acknowledges) and `extra`, read in the same hop.
    pub(super) async fn read_inbox<T: Send + 'static>(
        &self,
        user_id: &str,
        device_id: &str,
        since: i64,
        limit: u32,
        extra: Extra<T>,
    ) -> Result<(InboxPage, T), StoreError> {
        let (u, d) = (user_id.to_owned(), device_id.to_owned());
        let first = self
            .read_short(move |c| {
                if inbox::inbox_has_acked(c, &u, &d, since)? {
                    Ok(InboxRead::NeedsDelete)
                } else {
                    let page = inbox::inbox_page(c, &u, &d, since, limit)?;
                    Ok(InboxRead::Page(page, extra(c, &u, &d)?))
                }
            })
            .await?;
        match first {
            InboxRead::Page(page, more) => Ok((page, more)),
            InboxRead::NeedsDelete => {
                let (u, d) = (user_id.to_owned(), device_id.to_owned());
                let journal = self.inner.journal.clone();
                self.write(move |c| {
                    let now_ms = crate::clock::now_ms();
                    inbox::acknowledge(c, &u, &d, since, now_ms, journal.on())?;
                    let page = inbox::inbox_page(c, &u, &d, since, limit)?;
                    Ok((page, extra(c, &u, &d)?))
                })
                .await
            }
        }
    }
}

impl SqliteStore {
    /// As `read`, but on the calling thread when a pooled connection is
    /// free at once, saving the two thread switches of a hop to the
    /// blocking pool. Only for reads bounded by an index probe and a page
    /// of rows (WAL readers never wait for the writer), which hold the
    /// runtime thread for tens of microseconds.
    fn read_short<T, F>(
        &self,
        op: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        async move {
            let inner = &store.inner;
            let free = inner
                .reader_permits
                .clone()
                .try_acquire_owned()
                .ok()
                .and_then(|permit| {
                    let conn = crate::sync::lock(&inner.readers).pop()?;
                    Some((permit, conn))
                });
            match free {
                Some((permit, conn)) => {
                    let result = op(&conn);
                    crate::sync::lock(&inner.readers).push(conn);
                    drop(permit);
                    result
                }
                None => store.read(op).await,
            }
        }
    }
}
