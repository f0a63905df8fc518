//! SQL of device and access-token operations of the SQLite backend. Tokens
//! are stored only as `hash_token` output.

use rusqlite::{Connection, OptionalExtension};

use crate::store::{DeviceKey, StoreError, hash_token};

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
