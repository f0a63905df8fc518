//! Devices and their hashed access tokens: upsert, lookup, a token moved to
//! another device, and deleting a device with its tokens and inbox.

use courier::store::Retention;

use super::{Harness, NOW, ALICE, BOB, msg, one, batch, key, devices, accepted, inbox_ns};

pub async fn devices_and_tokens(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    assert_eq!(
        s.list_devices(ALICE).await.expect("list"),
        Vec::<String>::new()
    );
    s.upsert_device(ALICE, "B", Some("token-b"))
        .await
        .expect("upsert");
    s.upsert_device(ALICE, "A", Some("token-a1"))
        .await
        .expect("upsert");
    s.upsert_device(ALICE, "A", Some("token-a2"))
        .await
        .expect("upsert again");
    s.upsert_device(ALICE, "A", None)
        .await
        .expect("upsert without token");
    s.upsert_device(BOB, "X", None).await.expect("upsert");
    assert_eq!(s.list_devices(ALICE).await.expect("list"), vec!["A", "B"]);
    assert_eq!(s.list_devices(BOB).await.expect("list"), vec!["X"]);
    assert_eq!(
        s.lookup_token("token-a1").await.expect("lookup"),
        Some(key(ALICE, "A"))
    );
    assert_eq!(
        s.lookup_token("token-a2").await.expect("lookup"),
        Some(key(ALICE, "A"))
    );
    assert_eq!(
        s.lookup_token("token-b").await.expect("lookup"),
        Some(key(ALICE, "B"))
    );
    assert_eq!(s.lookup_token("nope").await.expect("lookup"), None);
    // A token re-registered for another device now names that device.
    s.upsert_device(BOB, "X", Some("token-b"))
        .await
        .expect("move token");
    assert_eq!(
        s.lookup_token("token-b").await.expect("lookup"),
        Some(key(BOB, "X"))
    );
}

pub async fn delete_device_removes_tokens_and_inbox(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    s.upsert_device(ALICE, "A", Some("tok"))
        .await
        .expect("upsert");
    devices(s, ALICE, &["B"]).await;
    accepted(
        s,
        batch(
            "t1",
            vec![msg(ALICE, one("A"), 1), msg(ALICE, one("B"), 2)],
            vec![],
        ),
    )
    .await;
    // Looked up first, so a store that caches tokens has this one cached.
    assert_eq!(
        s.lookup_token("tok").await.expect("lookup"),
        Some(key(ALICE, "A"))
    );
    assert!(s.delete_device(ALICE, "A").await.expect("delete"));
    assert!(!s.delete_device(ALICE, "A").await.expect("delete twice"));
    assert_eq!(s.lookup_token("tok").await.expect("lookup"), None);
    assert_eq!(s.list_devices(ALICE).await.expect("list"), vec!["B"]);
    assert_eq!(inbox_ns(s, ALICE, "A").await, Vec::<u64>::new());
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![2]);
    // Re-registering the device does not resurrect its old messages.
    devices(s, ALICE, &["A"]).await;
    assert_eq!(inbox_ns(s, ALICE, "A").await, Vec::<u64>::new());
    let report = s.prune(NOW, Retention::DEFAULT, 1000).await.expect("prune");
    assert_eq!(report.orphan_inbox_rows, 0);
    assert_eq!(inbox_ns(s, ALICE, "B").await, vec![2]);
}
