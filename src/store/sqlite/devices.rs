//! SQL of device and access-token operations of the SQLite backend, and
//! the store's token lookups through its `TokenCache` (a hit costs no
//! database read; each write of a token invalidates). Tokens are stored
//! only as `hash_token` output.

use rusqlite::{Connection, OptionalExtension};

use super::SqliteStore;
use crate::store::token_cache::Cached;
use crate::store::{DeviceKey, StoreError, hash_token};

impl SqliteStore {
    /// `Store::upsert_device`; a token given may have named another device
    /// before, so the cache is invalidated after the write.
    pub(super) async fn upsert_device_and_token(
        &self,
        user_id: &str,
        device_id: &str,
        access_token: Option<&str>,
    ) -> Result<(), StoreError> {
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        let token = access_token.map(str::to_owned);
        let moves_a_token = token.is_some();
        let result = self
            .write(move |c| upsert_device(c, &user_id, &device_id, token.as_deref()))
            .await;
        if moves_a_token {
            self.inner.tokens.invalidate();
        }
        result
    }

    /// `Store::lookup_token`, from the cache when it can.
    pub(super) async fn cached_lookup_token(
        &self,
        access_token: &str,
    ) -> Result<Option<DeviceKey>, StoreError> {
        let ticket = match self.inner.tokens.get(access_token) {
            Cached::Hit(device) => return Ok(Some(device)),
            Cached::Miss(ticket) => ticket,
        };
        let token = access_token.to_owned();
        let found = self.read(move |c| lookup_token(c, &token)).await?;
        if let Some(device) = &found {
            self.inner.tokens.insert(ticket, device);
        }
        Ok(found)
    }
}

pub fn upsert_device(
    conn: &Connection,
    user_id: &str,
    device_id: &str,
    token: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO devices (user_id, device_id) VALUES (?1, ?2)")?
        .execute((user_id, device_id))?;
    if let Some(token) = token {
        conn.prepare_cached(
            "INSERT INTO access_tokens (token_hash, user_id, device_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (token_hash) DO UPDATE SET user_id = excluded.user_id,
                                                    device_id = excluded.device_id",
        )?
        .execute((hash_token(token), user_id, device_id))?;
    }
    Ok(())
}

pub fn list_devices(conn: &Connection, user_id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT device_id FROM devices WHERE user_id = ?1 ORDER BY device_id")?;
    let rows = stmt.query_map([user_id], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn lookup_token(conn: &Connection, token: &str) -> Result<Option<DeviceKey>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?1")?
        .query_row([hash_token(token)], |row| {
            Ok(DeviceKey {
                user_id: row.get(0)?,
                device_id: row.get(1)?,
            })
        })
        .optional()?)
}
