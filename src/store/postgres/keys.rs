//! The PostgreSQL backend's E2EE device plane (`KeyStore`, DESIGN §7): the
//! impl, and the SQL of key uploads, counts, one-time-key claims and key
//! queries; display names, deletion, cross-signing keys, signatures and the
//! device-list change log are in `device_changes.rs` (tables in
//! `migrations/postgres/0004_e2ee.sql`). Each operation is one transaction,
//! answered after its commit.
//!
//! Concurrency: an upload locks its device row first, so uploads of one
//! device (and its deletion) take turns. A claim deletes the oldest key with
//! `FOR UPDATE SKIP LOCKED` and writes its tombstone in the same
//! transaction, so concurrent claims, also from other workers, never take
//! one key twice. An upload reads a key's stored row and its tombstone in
//! one statement (one snapshot), so a claim committing in between cannot
//! make a claimed key look new.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::{GenericClient, Object};

use super::Fail;
use super::device_changes::{self, Change};
use super::device_list_outbox::{Queued, log_local_changes};
use crate::store::keys::{
    ClaimWanted, ClaimedKey, CrossSigningKey, CrossSigningKind, DeviceListChanges, DeviceQuery,
    DeviceRecord, KeyCounts, KeyStore, KeysUpload, NewCrossSigningKey, NewKey, StoredSignature,
    UploadOutcome, UserDevices,
};
use crate::store::{StoreError, StoreFuture, TimestampMs};

/// Runs `$body` (with `$c: &mut Object`) through `PostgresStore::run`.
macro_rules! with_client {
    ($self:expr, |$c:ident| $body:expr) => {
        $self.run(move |$c: Object| async move {
            #[allow(unused_mut)]
            let mut $c = $c;
            let result = $body;
            ($c, result)
        })
    };
}

impl KeyStore for super::PostgresStore {
    fn upload_keys(&self, upload: KeysUpload) -> StoreFuture<'_, UploadOutcome> {
        Box::pin(async move {
            let upload = &upload;
            let (outcome, queued) =
                with_client!(self, |c| upload_keys(&mut c, upload).await).await?;
            self.settle(&queued);
            Ok(outcome)
        })
    }

    fn key_counts<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
    ) -> StoreFuture<'a, KeyCounts> {
        Box::pin(with_client!(self, |c| key_counts(&c, user_id, device_id).await))
    }

    fn claim_keys(
        &self,
        wanted: Vec<ClaimWanted>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, Vec<ClaimedKey>> {
        Box::pin(async move {
            let wanted = &wanted;
            with_client!(self, |c| claim_keys(&mut c, wanted, now_ms).await).await
        })
    }

    fn user_devices(&self, queries: Vec<DeviceQuery>) -> StoreFuture<'_, Vec<UserDevices>> {
        Box::pin(async move {
            let queries = &queries;
            with_client!(self, |c| {
                async {
                    // One snapshot for the whole answer.
                    let tx = c
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .await?;
                    let mut answer = Vec::with_capacity(queries.len());
                    for q in queries {
                        answer.push(user_devices(&tx, q).await?);
                    }
                    tx.commit().await?;
                    Ok(answer)
                }
                .await
            })
            .await
        })
    }

    fn set_display_name<'a>(
        &'a self,
        user_id: &'a str,
        device_id: &'a str,
        display_name: Option<&'a str>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let (known, queued) = with_client!(self, |c| device_changes::set_display_name(
                &mut c,
                user_id,
                device_id,
                display_name,
                now_ms
            )
            .await)
            .await?;
            self.settle(&queued);
            Ok(known)
        })
    }

    fn delete_devices<'a>(
        &'a self,
        user_id: &'a str,
        device_ids: &'a [String],
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let (deleted, queued) = with_client!(self, |c| device_changes::delete_devices(
                &mut c, user_id, device_ids, now_ms
            )
            .await)
            .await?;
            self.settle(&queued);
            Ok(deleted)
        })
    }

    fn put_cross_signing_keys<'a>(
        &'a self,
        user_id: &'a str,
        keys: Vec<NewCrossSigningKey>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys = &keys;
            let queued = with_client!(self, |c| device_changes::put_cross_signing_keys(
                &mut c, user_id, keys, now_ms
            )
            .await)
            .await?;
            self.settle(&queued);
            Ok(())
        })
    }

    fn put_signatures(
        &self,
        signatures: Vec<StoredSignature>,
        now_ms: TimestampMs,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let signatures = &signatures;
            let queued = with_client!(self, |c| device_changes::put_signatures(
                &mut c, signatures, now_ms
            )
            .await)
            .await?;
            self.settle(&queued);
            Ok(())
        })
    }

    fn device_list_position(&self) -> StoreFuture<'_, i64> {
        Box::pin(with_client!(self, |c| device_changes::position(&c).await))
    }

    fn users_with_changes(
        &self,
        users: Vec<String>,
        after: i64,
        up_to: i64,
    ) -> StoreFuture<'_, DeviceListChanges> {
        Box::pin(async move {
            let users = &users;
            with_client!(self, |c| device_changes::users_with_changes(
                &c, users, after, up_to
            )
            .await)
            .await
        })
    }
}

// --- uploads and counts --------------------------------------------------------

async fn upload_keys(c: &mut Object, up: &KeysUpload) -> Result<(UploadOutcome, Queued), Fail> {
    let (user, device) = (up.user_id.as_str(), up.device_id.as_str());
    let tx = c.transaction().await?;
    let lock = tx
        .prepare_cached(
            "SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2 FOR NO KEY UPDATE",
        )
        .await?;
    if tx.query_opt(&lock, &[&user, &device]).await?.is_none() {
        return Ok((UploadOutcome::UnknownDevice, Queued::default()));
    }
    // Checks first: a refused upload writes nothing (and rolls back).
    let mut keys_changed = false;
    if let Some(keys) = &up.device_keys {
        let stmt = tx
            .prepare_cached(
                "SELECT key_json, identity FROM device_keys WHERE user_id = $1 AND device_id = $2",
            )
            .await?;
        match tx.query_opt(&stmt, &[&user, &device]).await? {
            Some(row) if row.get::<_, &str>(1) != keys.identity => {
                return Ok((UploadOutcome::IdentityChanged, Queued::default()));
            }
            Some(row) => keys_changed = row.get::<_, &str>(0) != keys.json,
            None => keys_changed = true,
        }
    }
    let mut unique: Vec<&NewKey> = Vec::new();
    let mut listed: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    for key in &up.one_time_keys {
        match listed.insert((&key.algorithm, &key.key_id), &key.key_json) {
            Some(value) if value != key.key_json => return Ok((conflict(key), Queued::default())),
            Some(_) => {}
            None => unique.push(key),
        }
    }
    let mut fresh: Vec<&NewKey> = Vec::new();
    if !unique.is_empty() {
        let algorithms: Vec<&str> = unique.iter().map(|k| k.algorithm.as_str()).collect();
        let key_ids: Vec<&str> = unique.iter().map(|k| k.key_id.as_str()).collect();
        // The stored value and the tombstone in one snapshot.
        let stmt = tx
            .prepare_cached(
                "SELECT r.o, k.key_json,
                        EXISTS (SELECT 1 FROM claimed_one_time_keys t
                                WHERE t.user_id = $1 AND t.device_id = $2
                                  AND t.algorithm = r.a AND t.key_id = r.k)
                 FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS r (a, k, o)
                 LEFT JOIN one_time_keys k
                        ON k.user_id = $1 AND k.device_id = $2
                       AND k.algorithm = r.a AND k.key_id = r.k
                 ORDER BY r.o",
            )
            .await?;
        for row in tx
            .query(&stmt, &[&user, &device, &algorithms, &key_ids])
            .await?
        {
            let index = usize::try_from(row.get::<_, i64>(0) - 1)
                .map_err(|_| StoreError::Corrupt("unnest ordinality".to_owned()))?;
            let key = unique
                .get(index)
                .ok_or_else(|| StoreError::Corrupt("unnest ordinality".to_owned()))?;
            let stored: Option<&str> = row.get(1);
            let claimed: bool = row.get(2);
            match stored {
                Some(value) if value == key.key_json => {}
                Some(_) => return Ok((conflict(key), Queued::default())),
                None if claimed => {}
                None => fresh.push(key),
            }
        }
    }

    let mut changes = Vec::new();
    if let Some(keys) = up.device_keys.as_ref().filter(|_| keys_changed) {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO device_keys (user_id, device_id, key_json, identity)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (user_id, device_id) DO UPDATE SET key_json = excluded.key_json",
            )
            .await?;
        tx.execute(&stmt, &[&user, &device, &keys.json, &keys.identity])
            .await?;
        changes.push(Change::device(user, device));
    }
    if !fresh.is_empty() {
        let algorithms: Vec<&str> = fresh.iter().map(|k| k.algorithm.as_str()).collect();
        let key_ids: Vec<&str> = fresh.iter().map(|k| k.key_id.as_str()).collect();
        let values: Vec<&str> = fresh.iter().map(|k| k.key_json.as_str()).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO one_time_keys
                     (user_id, device_id, algorithm, key_id, key_json, upload_seq)
                 SELECT $1::text, $2::text, r.a, r.k, r.j,
                        (SELECT coalesce(max(upload_seq), 0) FROM one_time_keys
                         WHERE user_id = $1 AND device_id = $2) + r.o
                 FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS r (a, k, j, o)",
            )
            .await?;
        tx.execute(&stmt, &[&user, &device, &algorithms, &key_ids, &values])
            .await?;
    }
    let fallback = tx
        .prepare_cached(
            "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key_json, used)
             VALUES ($1, $2, $3, $4, $5, false)
             ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET
                 key_id = excluded.key_id,
                 key_json = excluded.key_json,
                 used = fallback_keys.used AND fallback_keys.key_id = excluded.key_id
                        AND fallback_keys.key_json = excluded.key_json",
        )
        .await?;
    for key in &up.fallback_keys {
        tx.execute(
            &fallback,
            &[&user, &device, &key.algorithm, &key.key_id, &key.key_json],
        )
        .await?;
    }
    let queued = log_local_changes(&tx, &changes, up.now_ms).await?;
    let one_time_key_counts = one_time_counts(&tx, user, device).await?;
    tx.commit().await?;
    let outcome = UploadOutcome::Stored {
        one_time_key_counts,
        device_list_changed: keys_changed,
    };
    Ok((outcome, queued))
}

fn conflict(key: &NewKey) -> UploadOutcome {
    UploadOutcome::OneTimeKeyConflict {
        algorithm: key.algorithm.clone(),
        key_id: key.key_id.clone(),
    }
}

async fn one_time_counts(
    c: &impl GenericClient,
    user: &str,
    device: &str,
) -> Result<BTreeMap<String, u64>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT algorithm, count(*) FROM one_time_keys
             WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm",
        )
        .await?;
    Ok(c.query(&stmt, &[&user, &device])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).unsigned_abs()))
        .collect())
}

async fn key_counts(c: &Object, user: &str, device: &str) -> Result<KeyCounts, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT algorithm FROM fallback_keys
             WHERE user_id = $1 AND device_id = $2 AND NOT used ORDER BY algorithm",
        )
        .await?;
    let unused_fallback = c
        .query(&stmt, &[&user, &device])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(KeyCounts {
        one_time: one_time_counts(c, user, device).await?,
        unused_fallback,
    })
}

// --- claims ---------------------------------------------------------------------

async fn claim_keys(
    c: &mut Object,
    wanted: &[ClaimWanted],
    now_ms: TimestampMs,
) -> Result<Vec<ClaimedKey>, Fail> {
    let tx = c.transaction().await?;
    // The oldest key no other claim holds, deleted, and its tombstone.
    let take = tx
        .prepare_cached(
            "WITH taken AS (
                 DELETE FROM one_time_keys
                 WHERE (user_id, device_id, algorithm, key_id) IN (
                     SELECT user_id, device_id, algorithm, key_id FROM one_time_keys
                     WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                     ORDER BY upload_seq, key_id LIMIT 1
                     FOR UPDATE SKIP LOCKED)
                 RETURNING key_id, key_json
             ), tombstone AS (
                 INSERT INTO claimed_one_time_keys
                     (user_id, device_id, algorithm, key_id, claimed_ts)
                 SELECT $1::text, $2::text, $3::text, key_id, $4::bigint FROM taken
                 ON CONFLICT (user_id, device_id, algorithm, key_id)
                     DO UPDATE SET claimed_ts = excluded.claimed_ts
             )
             SELECT key_id, key_json FROM taken",
        )
        .await?;
    let fallback = tx
        .prepare_cached(
            "UPDATE fallback_keys SET used = true
             WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
             RETURNING key_id, key_json",
        )
        .await?;
    let mut claimed = Vec::new();
    for w in wanted {
        let (user, device, algorithm) = (&w.user_id, &w.device_id, &w.algorithm);
        let (row, is_fallback) = match tx
            .query_opt(&take, &[user, device, algorithm, &now_ms])
            .await?
        {
            Some(row) => (row, false),
            None => match tx.query_opt(&fallback, &[user, device, algorithm]).await? {
                Some(row) => (row, true),
                None => continue,
            },
        };
        claimed.push(ClaimedKey {
            user_id: user.clone(),
            device_id: device.clone(),
            algorithm: algorithm.clone(),
            key_id: row.get(0),
            key_json: row.get(1),
            fallback: is_fallback,
        });
    }
    tx.commit().await?;
    Ok(claimed)
}

// --- queries --------------------------------------------------------------------

/// The wanted devices of a user and its cross-signing keys, with their
/// signatures (also the content of the outbound device-list EDUs).
pub(super) async fn user_devices(
    c: &impl GenericClient,
    q: &DeviceQuery,
) -> Result<UserDevices, Fail> {
    let user = q.user_id.as_str();
    let stmt = c
        .prepare_cached(
            "SELECT d.device_id, d.display_name, k.key_json FROM devices d
             LEFT JOIN device_keys k ON k.user_id = d.user_id AND k.device_id = d.device_id
             WHERE d.user_id = $1 AND (cardinality($2::text[]) = 0 OR d.device_id = ANY($2))
             ORDER BY d.device_id",
        )
        .await?;
    let wanted: Vec<&str> = q
        .device_ids
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let rows = c.query(&stmt, &[&user, &wanted]).await?;
    let mut devices = Vec::with_capacity(rows.len());
    for r in rows {
        let device_id: String = r.get(0);
        let signatures = signatures_of(c, user, &device_id).await?;
        devices.push(DeviceRecord {
            device_id,
            display_name: r.get(1),
            keys_json: r.get(2),
            signatures,
        });
    }
    let cross_signing = cross_signing_keys(c, user).await?;
    Ok(UserDevices {
        user_id: q.user_id.clone(),
        stream_id: device_changes::stream_id(c, user).await?,
        devices,
        cross_signing,
    })
}

/// A user's cross-signing keys with their signatures, sorted by kind.
pub(super) async fn cross_signing_keys(
    c: &impl GenericClient,
    user: &str,
) -> Result<Vec<CrossSigningKey>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT kind, public_key, key_json FROM cross_signing_keys WHERE user_id = $1",
        )
        .await?;
    let mut cross_signing = Vec::new();
    for r in c.query(&stmt, &[&user]).await? {
        let kind: &str = r.get(0);
        let kind = CrossSigningKind::parse(kind)
            .ok_or_else(|| StoreError::Corrupt(format!("cross-signing key kind {kind:?}")))?;
        let public_key: String = r.get(1);
        let signatures = signatures_of(c, user, &public_key).await?;
        cross_signing.push(CrossSigningKey {
            kind,
            public_key,
            key_json: r.get(2),
            signatures,
        });
    }
    cross_signing.sort_by_key(|k| k.kind);
    Ok(cross_signing)
}

async fn signatures_of(
    c: &impl GenericClient,
    target_user: &str,
    target_key: &str,
) -> Result<Vec<StoredSignature>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT signer_user_id, signer_key_id, signature FROM e2ee_signatures
             WHERE target_user_id = $1 AND target_key_id = $2 ORDER BY seq",
        )
        .await?;
    Ok(c.query(&stmt, &[&target_user, &target_key])
        .await?
        .iter()
        .map(|r| StoredSignature {
            target_user_id: target_user.to_owned(),
            target_key_id: target_key.to_owned(),
            signer_user_id: r.get(0),
            signer_key_id: r.get(1),
            signature: r.get(2),
        })
        .collect())
}
