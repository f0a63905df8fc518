//! The SQLite backend's E2EE device plane (`KeyStore`, DESIGN §7): the impl,
//! and the SQL of key uploads, counts, one-time-key claims and key queries;
//! display names, deletion, cross-signing keys, signatures and the
//! device-list change log are in `device_changes.rs` (tables in
//! `migrations/sqlite/0003_e2ee.sql`).
//!
//! Writes run on the writer thread like every other write, so a claim's
//! select and delete can never interleave with another claim, and its future
//! resolves only after the commit. Every check of an upload runs before its
//! first write, so a refused upload writes nothing. Reads that take several
//! statements (`user_devices`) run in one read transaction, one snapshot.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, OptionalExtension};

use super::device_changes::{
    delete_devices, log_change, put_cross_signing_keys, put_signatures, set_display_name,
    stream_id, users_with_changes,
};
use super::device_list_outbox::{cross_signing_keys, signatures_of};
use crate::store::keys::{
    ClaimWanted, ClaimedKey, DeviceListChanges, DeviceQuery, DeviceRecord, KeyCounts, KeyStore,
    KeysUpload, NewCrossSigningKey, StoredSignature, UploadOutcome, UserDevices,
};
use crate::store::{StoreError, StoreFuture, TimestampMs};

impl KeyStore for super::SqliteStore {
    fn upload_keys(&self, upload: KeysUpload) -> StoreFuture<'_, UploadOutcome> {
        Box::pin(self.write(move |c| upload_keys(c, &upload)))
    }

    fn key_counts<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
    ) -> StoreFuture<'a, KeyCounts> {
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        Box::pin(self.read(move |c| key_counts(c, &user_id, &device_id)))
    }

    fn claim_keys(
        &self,
        wanted: Vec<ClaimWanted>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, Vec<ClaimedKey>> {
        Box::pin(self.write(move |c| claim_keys(c, &wanted, now_ms)))
    }

    fn user_devices(&self, queries: Vec<DeviceQuery>) -> StoreFuture<'_, Vec<UserDevices>> {
        Box::pin(self.read(move |c| {
            // One snapshot for the whole answer.
            let tx = c.unchecked_transaction()?;
            let answer = queries
                .iter()
                .map(|q| user_devices(&tx, q))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok(answer)
        }))
    }

    fn set_display_name<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        display_name: Option<&'a str>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, bool> {
        let (user_id, device_id) = (user_id.to_owned(), device_id.to_owned());
        let name = display_name.map(str::to_owned);
        Box::pin(
            self.write(move |c| set_display_name(c, &user_id, &device_id, name.as_deref(), now_ms)),
        )
    }

    fn delete_devices<'a>(
        &'a self,
        user_id: &'a str,
        device_ids: &'a [String],
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        let (user_id, device_ids) = (user_id.to_owned(), device_ids.to_vec());
        Box::pin(async move {
            let result = self
                .write(move |c| delete_devices(c, &user_id, &device_ids, now_ms))
                .await;
            // Their tokens are gone (or, on an error, may be).
            self.inner.tokens.invalidate();
            result
        })
    }

    fn put_cross_signing_keys<'a>(
        &'a self,
        user_id: &'a str,
        keys: Vec<NewCrossSigningKey>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        let user_id = user_id.to_owned();
        Box::pin(self.write(move |c| put_cross_signing_keys(c, &user_id, &keys, now_ms)))
    }

    fn put_signatures(
        &self,
        signatures: Vec<StoredSignature>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |c| put_signatures(c, &signatures, now_ms)))
    }

    fn device_list_position(&self) -> StoreFuture<'_, i64> {
        Box::pin(self.read(device_list_position))
    }

    fn users_with_changes(
        &self,
        users: Vec<String>,
        after: i64,
        up_to: i64,
    ) -> StoreFuture<'_, DeviceListChanges> {
        Box::pin(self.read(move |c| users_with_changes(c, &users, after, up_to)))
    }
}

// --- uploads and counts --------------------------------------------------------

fn upload_keys(conn: &Connection, up: &KeysUpload) -> Result<UploadOutcome, StoreError> {
    let (user, device) = (up.user_id.as_str(), up.device_id.as_str());
    if !device_exists(conn, user, device)? {
        return Ok(UploadOutcome::UnknownDevice);
    }
    // Checks first: a refused upload must write nothing.
    let mut keys_changed = false;
    if let Some(keys) = &up.device_keys {
        let stored: Option<(String, String)> = conn
            .prepare_cached(
                "SELECT key_json, identity FROM device_keys WHERE user_id = ?1 AND device_id = ?2",
            )?
            .query_row((user, device), |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        match stored {
            Some((_, identity)) if identity != keys.identity => {
                return Ok(UploadOutcome::IdentityChanged);
            }
            Some((json, _)) => keys_changed = json != keys.json,
            None => keys_changed = true,
        }
    }
    let mut fresh = Vec::new();
    let mut listed: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for key in &up.one_time_keys {
        let id = (key.algorithm.as_str(), key.key_id.as_str());
        if let Some(value) = listed.insert(id, &key.key_json) {
            // Listed twice in this upload: the same key again is skipped.
            if value != key.key_json {
                return Ok(conflict(key));
            }
            continue;
        }
        if is_claimed(conn, user, device, id.0, id.1)? {
            continue;
        }
        let stored: Option<String> = conn
            .prepare_cached(
                "SELECT key_json FROM one_time_keys
                 WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND key_id = ?4",
            )?
            .query_row((user, device, id.0, id.1), |row| row.get(0))
            .optional()?;
        match stored {
            Some(value) if value == key.key_json => {}
            Some(_) => return Ok(conflict(key)),
            None => fresh.push(key),
        }
    }

    if let Some(keys) = up.device_keys.as_ref().filter(|_| keys_changed) {
        conn.prepare_cached(
            "INSERT INTO device_keys (user_id, device_id, key_json, identity)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (user_id, device_id) DO UPDATE SET key_json = excluded.key_json",
        )?
        .execute((user, device, &keys.json, &keys.identity))?;
        log_change(conn, user, Some(device), up.now_ms)?;
    }
    if !fresh.is_empty() {
        let mut seq: i64 = conn
            .prepare_cached(
                "SELECT coalesce(max(upload_seq), 0) FROM one_time_keys
                 WHERE user_id = ?1 AND device_id = ?2",
            )?
            .query_row((user, device), |row| row.get(0))?;
        let mut insert = conn.prepare_cached(
            "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, key_json, upload_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for key in fresh {
            seq += 1;
            insert.execute((
                user,
                device,
                &key.algorithm,
                &key.key_id,
                &key.key_json,
                seq,
            ))?;
        }
    }
    let mut fallback = conn.prepare_cached(
        "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key_json, used)
         VALUES (?1, ?2, ?3, ?4, ?5, 0)
         ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET
             key_id = excluded.key_id,
             key_json = excluded.key_json,
             used = CASE WHEN fallback_keys.key_id = excluded.key_id
                          AND fallback_keys.key_json = excluded.key_json
                         THEN fallback_keys.used ELSE 0 END",
    )?;
    for key in &up.fallback_keys {
        fallback.execute((user, device, &key.algorithm, &key.key_id, &key.key_json))?;
    }
    Ok(UploadOutcome::Stored {
        one_time_key_counts: one_time_counts(conn, user, device)?,
        device_list_changed: keys_changed,
    })
}

fn conflict(key: &crate::store::keys::NewKey) -> UploadOutcome {
    UploadOutcome::OneTimeKeyConflict {
        algorithm: key.algorithm.clone(),
        key_id: key.key_id.clone(),
    }
}

fn device_exists(conn: &Connection, user: &str, device: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2")?
        .query_row((user, device), |_| Ok(()))
        .optional()?
        .is_some())
}

fn is_claimed(
    conn: &Connection,
    user: &str,
    device: &str,
    algorithm: &str,
    key_id: &str,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM claimed_one_time_keys
             WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND key_id = ?4",
        )?
        .query_row((user, device, algorithm, key_id), |_| Ok(()))
        .optional()?
        .is_some())
}

fn one_time_counts(
    conn: &Connection,
    user: &str,
    device: &str,
) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT algorithm, count(*) FROM one_time_keys
         WHERE user_id = ?1 AND device_id = ?2 GROUP BY algorithm",
    )?;
    let rows = stmt.query_map((user, device), |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    let mut counts = BTreeMap::new();
    for row in rows {
        let (algorithm, n) = row?;
        counts.insert(algorithm, n.unsigned_abs());
    }
    Ok(counts)
}

pub(super) fn device_list_position(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT coalesce(max(position), 0) FROM device_list_changes")?
        .query_row([], |row| row.get(0))?)
}

pub(super) fn key_counts(
    conn: &Connection,
    user: &str,
    device: &str,
) -> Result<KeyCounts, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT algorithm FROM fallback_keys
         WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm",
    )?;
    let unused_fallback = stmt
        .query_map((user, device), |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(KeyCounts {
        one_time: one_time_counts(conn, user, device)?,
        unused_fallback,
    })
}

// --- claims ---------------------------------------------------------------------

fn claim_keys(
    conn: &Connection,
    wanted: &[ClaimWanted],
    now_ms: TimestampMs,
) -> Result<Vec<ClaimedKey>, StoreError> {
    let mut claimed = Vec::new();
    for w in wanted {
        let (user, device, algorithm) = (&w.user_id, &w.device_id, &w.algorithm);
        let oldest: Option<(String, String)> = conn
            .prepare_cached(
                "SELECT key_id, key_json FROM one_time_keys
                 WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
                 ORDER BY upload_seq, key_id LIMIT 1",
            )?
            .query_row((user, device, algorithm), |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        let (key_id, key_json, fallback) = match oldest {
            Some((key_id, key_json)) => {
                conn.prepare_cached(
                    "DELETE FROM one_time_keys
                     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND key_id = ?4",
                )?
                .execute((user, device, algorithm, &key_id))?;
                conn.prepare_cached(
                    "INSERT INTO claimed_one_time_keys
                         (user_id, device_id, algorithm, key_id, claimed_ts)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (user_id, device_id, algorithm, key_id)
                         DO UPDATE SET claimed_ts = excluded.claimed_ts",
                )?
                .execute((user, device, algorithm, &key_id, now_ms))?;
                (key_id, key_json, false)
            }
            None => {
                let fallback: Option<(String, String)> = conn
                    .prepare_cached(
                        "UPDATE fallback_keys SET used = 1
                         WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
                         RETURNING key_id, key_json",
                    )?
                    .query_row((user, device, algorithm), |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .optional()?;
                match fallback {
                    Some((key_id, key_json)) => (key_id, key_json, true),
                    None => continue,
                }
            }
        };
        claimed.push(ClaimedKey {
            user_id: user.clone(),
            device_id: device.clone(),
            algorithm: algorithm.clone(),
            key_id,
            key_json,
            fallback,
        });
    }
    Ok(claimed)
}

// --- queries --------------------------------------------------------------------

fn user_devices(conn: &Connection, q: &DeviceQuery) -> Result<UserDevices, StoreError> {
    let user = q.user_id.as_str();
    let mut rows: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let row = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
    if q.device_ids.is_empty() {
        let mut stmt = conn.prepare_cached(
            "SELECT d.device_id, d.display_name, k.key_json FROM devices d
             LEFT JOIN device_keys k ON k.user_id = d.user_id AND k.device_id = d.device_id
             WHERE d.user_id = ?1 ORDER BY d.device_id",
        )?;
        for r in stmt.query_map([user], row)? {
            rows.push(r?);
        }
    } else {
        let wanted: BTreeSet<&str> = q.device_ids.iter().map(String::as_str).collect();
        let mut stmt = conn.prepare_cached(
            "SELECT d.device_id, d.display_name, k.key_json FROM devices d
             LEFT JOIN device_keys k ON k.user_id = d.user_id AND k.device_id = d.device_id
             WHERE d.user_id = ?1 AND d.device_id = ?2",
        )?;
        for device in wanted {
            if let Some(r) = stmt.query_row((user, device), row).optional()? {
                rows.push(r);
            }
        }
    }
    let mut devices = Vec::with_capacity(rows.len());
    for (device_id, display_name, keys_json) in rows {
        let signatures = signatures_of(conn, user, &device_id)?;
        devices.push(DeviceRecord {
            device_id,
            display_name,
            keys_json,
            signatures,
        });
    }

    let cross_signing = cross_signing_keys(conn, user)?;

    Ok(UserDevices {
        user_id: q.user_id.clone(),
        stream_id: stream_id(conn, user)?,
        devices,
        cross_signing,
    })
}
