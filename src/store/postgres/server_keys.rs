//! SQL of the PostgreSQL backend for the cache of remote servers' verify
//! keys (`server_keys`): read per server, and upserted in one transaction.

use deadpool_postgres::Object;

use super::Fail;
use crate::store::StoredServerKey;

pub async fn server_keys(c: &Object, server_name: &str) -> Result<Vec<StoredServerKey>, Fail> {
    let stmt = c
        .prepare_cached(
            "SELECT server_name, key_id, public_key, valid_until_ts FROM server_keys
             WHERE server_name = $1 ORDER BY key_id",
        )
        .await?;
    Ok(c.query(&stmt, &[&server_name])
        .await?
        .iter()
        .map(|r| StoredServerKey {
            server_name: r.get(0),
            key_id: r.get(1),
            public_key: r.get(2),
            valid_until_ts: r.get(3),
        })
        .collect())
}

pub async fn put_server_keys(c: &mut Object, keys: &[StoredServerKey]) -> Result<(), Fail> {
    let tx = c.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO server_keys (server_name, key_id, public_key, valid_until_ts)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (server_name, key_id) DO UPDATE SET
                 public_key = excluded.public_key,
                 valid_until_ts = excluded.valid_until_ts",
        )
        .await?;
    for key in keys {
        tx.execute(
            &stmt,
            &[
                &key.server_name,
                &key.key_id,
                &key.public_key,
                &key.valid_until_ts,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
