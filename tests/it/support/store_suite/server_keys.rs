//! The remote server key cache: put, read back, replace, and expiry by
//! `prune`.

use courier::store::{Retention, StoredServerKey};

use super::{Harness, NOW};

fn server_key(server: &str, key_id: &str, valid_until_ts: i64) -> StoredServerKey {
    StoredServerKey {
        server_name: server.to_owned(),
        key_id: key_id.to_owned(),
        public_key: format!("pk-{server}-{key_id}-{valid_until_ts}"),
        valid_until_ts,
    }
}

pub async fn server_keys_round_trip(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert!(s.server_keys("a.test").await.expect("keys").is_empty());
    s.put_server_keys(vec![
        server_key("a.test", "ed25519:b", NOW + 10),
        server_key("a.test", "ed25519:a", NOW + 1000),
        server_key("b.test", "ed25519:a", NOW + 10),
    ])
    .await
    .expect("put");
    assert_eq!(
        s.server_keys("a.test").await.expect("keys"),
        vec![
            server_key("a.test", "ed25519:a", NOW + 1000),
            server_key("a.test", "ed25519:b", NOW + 10)
        ]
    );
    // Re-putting a key replaces it.
    s.put_server_keys(vec![server_key("a.test", "ed25519:b", NOW + 5000)])
        .await
        .expect("put");
    assert_eq!(
        s.server_keys("a.test").await.expect("keys")[1],
        server_key("a.test", "ed25519:b", NOW + 5000)
    );
    let report = s
        .prune(NOW + 2000, Retention::DEFAULT, 100)
        .await
        .expect("prune");
    assert_eq!(report.expired_server_keys, 2);
    assert_eq!(
        s.server_keys("a.test").await.expect("keys"),
        vec![server_key("a.test", "ed25519:b", NOW + 5000)]
    );
    assert!(s.server_keys("b.test").await.expect("keys").is_empty());
}
