//! The backend-generic conformance cases of `courier::store::DeviceListStore`
//! (issue 16): interest, the device-list EDUs each local change queues in
//! its own transaction (content, coalescing, the in-flight exception, the
//! `prev_id` chain, acknowledged streams), tracking and `left` entries, and
//! the remote device-list cache with its gap rules and stale flag. Like
//! `store_suite_keys`, each case takes a [`Harness`] with a fresh store; a
//! backend's test module expands `store_device_list_conformance_tests!`
//! with its constructor to get one `#[tokio::test]` per case.

use std::collections::BTreeMap;

use courier::store::device_lists::{
    Interest, NewInterest, RemoteDevice, RemoteDeviceUpdate, RemoteSnapshot, SnapshotOutcome,
    TrackSource, TrackTarget,
};
use courier::store::keys::{
    CrossSigningKind, DeviceQuery, KeysUpload, NewCrossSigningKey, StoredSignature,
    UploadedDeviceKeys,
};
use courier::store::{
    ClientTxnKey, InFlightTxn, NewOutboxEdu, OutboxEdu, Retention, SendBatch, Store,
};
use serde_json::{Value, json};

use super::e2ee::{key, public_key, sign};
use super::store_suite::Harness;

/// Expands to one `#[tokio::test]` per device-list case; the forms are those
/// of `store_key_conformance_tests!` (`optional` for a constructor
/// returning `Option<Harness>`).
#[allow(unused_macros)]
macro_rules! store_device_list_conformance_tests {
    ($make:path) => {
        store_device_list_conformance_tests!(@list [] $make);
    };
    (optional $make:path) => {
        store_device_list_conformance_tests!(@list [optional] $make);
    };
    (@list [$($opt:ident)?] $make:path) => {
        store_device_list_conformance_tests!(@cases [$($opt)?] $make;
            dl_interest_upsert_expiry_and_destinations,
            dl_a_change_queues_one_edu_per_interested_destination,
            dl_signing_key_update_has_no_user_signing_key_and_no_stream,
            dl_only_real_changes_queue_and_store_delete_device_queues_too,
            dl_to_device_rows_have_no_device_list_meta,
            dl_a_requeued_quarantined_row_keeps_its_device_list_meta,
            dl_a_thousand_changes_to_a_down_destination_coalesce_to_one_row,
            dl_a_row_in_the_in_flight_txn_is_not_coalesced,
            dl_prev_id_chain_first_none_then_chained_then_acked,
            dl_two_devices_of_one_user_chain_in_order,
            dl_coalescing_keeps_every_sent_chain_consistent,
            dl_tracking_untracking_left_users_and_tracker_devices,
            dl_left_entries_do_not_move_the_tracked_users_stream,
            dl_track_creates_a_stale_list_and_a_snapshot_clears_it,
            dl_updates_apply_in_order_replays_and_backwards_are_not_newer,
            dl_an_unknown_prev_id_is_a_gap_and_nothing_after_it_applies,
            dl_an_empty_prev_id_with_a_known_extremity_is_a_gap,
            dl_updates_while_stale_are_not_applied_and_an_older_snapshot_stays_stale,
            dl_an_untracked_user_stores_nothing,
            dl_users_with_changes_sees_remote_changes_not_left_entries,
            dl_remote_cross_signing_keys_are_kept_or_replaced,
            dl_mark_stale_and_stale_users_longest_first,
            dl_prune_deletes_expired_interests,
            dl_reopen_keeps_queued_rows_acked_streams_and_stale_flags,
        );
    };
    (@cases [] $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make().await;
                $crate::support::store_suite_device_lists::$case(&harness).await;
                drop(harness);
            }
        )+
    };
    (@cases [optional] $make:path; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(harness) = $make().await else { return };
                $crate::support::store_suite_device_lists::$case(&harness).await;
                drop(harness);
            }
        )+
    };
}

const NOW: i64 = 1_700_000_000_000;
const ALICE: &str = "@alice:local.test";
const BOB: &str = "@bob:local.test";
const ERIN: &str = "@erin:local.test";
const CAROL: &str = "@carol:remote.test";
const DAVE: &str = "@dave:remote.test";
const REMOTE: &str = "remote.test";
const OTHER: &str = "other.test";

// --- helpers ----------------------------------------------------------------------

async fn register(store: &dyn Store, user: &str, ids: &[&str]) {
    for id in ids {
        store.upsert_device(user, id, None).await.expect("device");
    }
}

async fn interest(store: &dyn Store, user: &str, destination: &str, expires_ts: Option<i64>) {
    store
        .add_device_list_interest(
            vec![NewInterest {
                user_id: user.to_owned(),
                destination: destination.to_owned(),
                expires_ts,
            }],
            NOW,
        )
        .await
        .expect("interest");
}

/// A device's self-signed `device_keys` object (a real ed25519 signature).
fn signed_keys(user: &str, device: &str, seed: u8) -> Value {
    let signing = key(seed);
    let mut object = json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): format!("curve-{seed}"),
            format!("ed25519:{device}"): public_key(&signing),
        },
    });
    sign(&mut object, user, &format!("ed25519:{device}"), &signing);
    object
}

async fn upload_keys(store: &dyn Store, user: &str, device: &str, keys: &Value) {
    store
        .upload_keys(KeysUpload {
            user_id: user.to_owned(),
            device_id: device.to_owned(),
            device_keys: Some(UploadedDeviceKeys {
                json: keys.to_string(),
                identity: keys["keys"].to_string(),
            }),
            one_time_keys: vec![],
            fallback_keys: vec![],
            now_ms: NOW,
        })
        .await
        .expect("upload");
}

async fn rename(store: &dyn Store, user: &str, device: &str, name: &str) {
    assert!(
        store
            .set_display_name(user, device, Some(name), NOW)
            .await
            .expect("name")
    );
}

async fn stream_id(store: &dyn Store, user: &str) -> i64 {
    let query = DeviceQuery {
        user_id: user.to_owned(),
        device_ids: vec![],
    };
    store.user_devices(vec![query]).await.expect("query")[0].stream_id
}

async fn peek(store: &dyn Store, destination: &str) -> Vec<OutboxEdu> {
    store
        .peek_outbox(destination, 1000, u64::MAX)
        .await
        .expect("peek")
}

/// The EDU's type and content.
fn parsed(edu: &OutboxEdu) -> (String, Value) {
    let value: Value = serde_json::from_str(&edu.edu_json).expect("edu json");
    let edu_type = value["edu_type"].as_str().expect("edu_type").to_owned();
    (edu_type, value["content"].clone())
}

/// (user, stream_id, prev_id) of a device-list row.
fn meta(edu: &OutboxEdu) -> (String, Option<i64>, Option<i64>) {
    let m = edu.device_list.as_ref().expect("device-list meta");
    (m.user_id.clone(), m.stream_id, m.prev_id)
}

/// Records the rows as the in-flight txn, then (if `ack`) acknowledges it.
async fn send_txn(
    store: &dyn Store,
    destination: &str,
    txn_id: &str,
    rows: &[OutboxEdu],
    ack: bool,
) {
    store
        .begin_txn(
            &crate::support::lease_fence(store, destination).await,
            InFlightTxn {
                destination: destination.to_owned(),
                txn_id: txn_id.to_owned(),
                seqs: rows.iter().map(|r| r.seq).collect(),
                body: "{}".to_owned(),
            },
        )
        .await
        .expect("begin");
    if ack {
        store
            .ack_txn(
                &crate::support::lease_fence(store, destination).await,
                destination,
                txn_id,
                NOW,
            )
            .await
            .expect("ack");
    }
}

fn track(user: &str, remote: bool) -> TrackTarget {
    TrackTarget {
        user_id: user.to_owned(),
        remote,
    }
}

async fn track_remote(store: &dyn Store, tracker: &str, user: &str, now_ms: i64) -> Vec<String> {
    store
        .track_users(tracker, vec![track(user, true)], TrackSource::Query, now_ms)
        .await
        .expect("track")
}

fn remote_device(id: &str, name: Option<&str>) -> RemoteDevice {
    RemoteDevice {
        device_id: id.to_owned(),
        keys_json: Some(json!({ "device_id": id, "user_id": CAROL }).to_string()),
        display_name: name.map(str::to_owned),
    }
}

fn snapshot(user: &str, stream_id: i64, devices: Vec<RemoteDevice>) -> RemoteSnapshot {
    RemoteSnapshot {
        user_id: user.to_owned(),
        stream_id,
        devices,
        master_key_json: Some(json!({ "usage": ["master"] }).to_string()),
        self_signing_key_json: None,
    }
}

fn update(stream_id: i64, prev_ids: &[i64], device: &str, deleted: bool) -> RemoteDeviceUpdate {
    RemoteDeviceUpdate {
        stream_id,
        prev_ids: prev_ids.to_vec(),
        device_id: device.to_owned(),
        deleted,
        keys_json: (!deleted)
            .then(|| json!({ "device_id": device, "user_id": CAROL, "s": stream_id }).to_string()),
        display_name: None,
    }
}

async fn stored_snapshot(store: &dyn Store, snap: RemoteSnapshot) -> SnapshotOutcome {
    store
        .replace_remote_device_list(snap, NOW)
        .await
        .expect("snapshot")
}

async fn list(
    store: &dyn Store,
    user: &str,
) -> Option<courier::store::device_lists::RemoteDeviceList> {
    let mut lists = store
        .remote_device_lists(vec![user.to_owned()])
        .await
        .expect("lists");
    assert!(lists.len() <= 1);
    lists.pop()
}

fn device_ids(devices: &[RemoteDevice]) -> Vec<&str> {
    devices.iter().map(|d| d.device_id.as_str()).collect()
}

async fn position(store: &dyn Store) -> i64 {
    store.device_list_position().await.expect("position")
}

// --- interest and outbound EDUs -----------------------------------------------------

pub async fn dl_interest_upsert_expiry_and_destinations(harness: &Harness) {
    let s = &*harness.store;
    interest(s, ALICE, REMOTE, Some(NOW + 100)).await;
    // An earlier expiry does not shorten a later one.
    interest(s, ALICE, REMOTE, Some(NOW + 50)).await;
    interest(s, ALICE, OTHER, Some(NOW - 1)).await;
    interest(s, ALICE, "third.test", Some(NOW + 10)).await;
    // No expiry beats any time, and a time never replaces it.
    interest(s, ALICE, "third.test", None).await;
    interest(s, ALICE, "third.test", Some(NOW + 1_000)).await;
    interest(s, BOB, REMOTE, None).await;
    let got = s.device_list_interest(ALICE).await.expect("interest");
    let want = |d: &str, t: Option<i64>| Interest {
        destination: d.to_owned(),
        expires_ts: t,
    };
    assert_eq!(
        got,
        vec![
            want(OTHER, Some(NOW - 1)),
            want(REMOTE, Some(NOW + 100)),
            want("third.test", None),
        ]
    );
    assert_eq!(
        s.device_list_destinations(ALICE, NOW).await.expect("dests"),
        vec![REMOTE.to_owned(), "third.test".to_owned()]
    );
    // Expiry is strict: at expires_ts the interest is over.
    assert_eq!(
        s.device_list_destinations(ALICE, NOW + 100)
            .await
            .expect("dests"),
        vec!["third.test".to_owned()]
    );
    let removed = s
        .remove_device_list_interest(ALICE, vec![REMOTE.into(), "never.test".into()])
        .await
        .expect("remove");
    assert_eq!(removed, 1);
    assert_eq!(
        s.device_list_destinations(ALICE, NOW).await.expect("dests"),
        vec!["third.test".to_owned()]
    );
    assert_eq!(
        s.device_list_destinations(BOB, NOW).await.expect("dests"),
        vec![REMOTE.to_owned()]
    );
}

pub async fn dl_a_change_queues_one_edu_per_interested_destination(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    interest(s, ALICE, REMOTE, None).await;
    interest(s, ALICE, OTHER, Some(NOW + 1)).await;
    interest(s, ALICE, "expired.test", Some(NOW - 1)).await;
    interest(s, BOB, "bob-only.test", None).await;
    let keys = signed_keys(ALICE, "A", 7);
    upload_keys(s, ALICE, "A", &keys).await;
    rename(s, ALICE, "A", "phone").await;
    let cross = StoredSignature {
        target_user_id: ALICE.to_owned(),
        target_key_id: "A".to_owned(),
        signer_user_id: ALICE.to_owned(),
        signer_key_id: "ed25519:SELFSIGNING".to_owned(),
        signature: "cross-sig".to_owned(),
    };
    s.put_signatures(vec![cross], NOW).await.expect("signature");
    let stream = stream_id(s, ALICE).await;
    assert_eq!(stream, 3);
    let mut merged = keys.clone();
    merged["signatures"][ALICE]["ed25519:SELFSIGNING"] = json!("cross-sig");
    for destination in [REMOTE, OTHER] {
        let rows = peek(s, destination).await;
        assert_eq!(rows.len(), 1, "{destination}: one coalesced row");
        let (edu_type, content) = parsed(&rows[0]);
        assert_eq!(edu_type, "m.device_list_update");
        assert_eq!(
            content,
            json!({
                "user_id": ALICE,
                "device_id": "A",
                "stream_id": stream,
                "device_display_name": "phone",
                "keys": merged,
            })
        );
        assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(stream), None));
    }
    assert!(peek(s, "expired.test").await.is_empty());
    assert!(peek(s, "bob-only.test").await.is_empty());

    // A deletion replaces the queued state with deleted: true.
    let deleted = s
        .delete_devices(ALICE, &["A".to_owned()], NOW)
        .await
        .expect("delete");
    assert_eq!(deleted, vec!["A".to_owned()]);
    for destination in [REMOTE, OTHER] {
        let rows = peek(s, destination).await;
        assert_eq!(rows.len(), 1);
        let (edu_type, content) = parsed(&rows[0]);
        assert_eq!(edu_type, "m.device_list_update");
        assert_eq!(
            content,
            json!({ "user_id": ALICE, "device_id": "A", "stream_id": 4, "deleted": true })
        );
        assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(4), None));
    }
}

pub async fn dl_signing_key_update_has_no_user_signing_key_and_no_stream(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    interest(s, ALICE, REMOTE, None).await;
    let key_of = |kind: CrossSigningKind, public: &str| NewCrossSigningKey {
        kind,
        public_key: public.to_owned(),
        key_json: json!({
            "user_id": ALICE,
            "usage": [kind.as_str()],
            "keys": { format!("ed25519:{public}"): public },
        })
        .to_string(),
    };
    s.put_cross_signing_keys(
        ALICE,
        vec![
            key_of(CrossSigningKind::Master, "MPK"),
            key_of(CrossSigningKind::SelfSigning, "SSK"),
            key_of(CrossSigningKind::UserSigning, "USK"),
        ],
        NOW,
    )
    .await
    .expect("cross-signing");
    let on_master = StoredSignature {
        target_user_id: ALICE.to_owned(),
        target_key_id: "MPK".to_owned(),
        signer_user_id: ALICE.to_owned(),
        signer_key_id: "ed25519:A".to_owned(),
        signature: "device-sig".to_owned(),
    };
    s.put_signatures(vec![on_master], NOW).await.expect("sig");
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1, "the second change coalesces the first");
    let (edu_type, content) = parsed(&rows[0]);
    assert_eq!(edu_type, "m.signing_key_update");
    assert_eq!(
        content,
        json!({
            "user_id": ALICE,
            "master_key": {
                "user_id": ALICE,
                "usage": ["master"],
                "keys": { "ed25519:MPK": "MPK" },
                "signatures": { ALICE: { "ed25519:A": "device-sig" } },
            },
            "self_signing_key": {
                "user_id": ALICE,
                "usage": ["self_signing"],
                "keys": { "ed25519:SSK": "SSK" },
            },
        })
    );
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), None, None));
    // A device change after it chains from nothing: signing-key rows are
    // not part of the stream chain.
    rename(s, ALICE, "A", "laptop").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(meta(&rows[1]), (ALICE.to_owned(), Some(3), None));
    send_txn(s, REMOTE, "t1", &rows, true).await;
    rename(s, ALICE, "A", "tablet").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(4), Some(3)));
}

pub async fn dl_only_real_changes_queue_and_store_delete_device_queues_too(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    interest(s, ALICE, REMOTE, None).await;
    let keys = signed_keys(ALICE, "A", 9);
    upload_keys(s, ALICE, "A", &keys).await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1);
    send_txn(s, REMOTE, "t1", &rows, true).await;
    // The same keys again, the same name again, no signature change: no
    // change is logged, so nothing is queued.
    upload_keys(s, ALICE, "A", &keys).await;
    assert!(
        s.set_display_name(ALICE, "A", None, NOW)
            .await
            .expect("name")
    );
    assert!(peek(s, REMOTE).await.is_empty());
    assert_eq!(stream_id(s, ALICE).await, 1);
    // Store::delete_device is the same deletion, with the same EDU.
    assert!(s.delete_device(ALICE, "A").await.expect("delete"));
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        parsed(&rows[0]),
        (
            "m.device_list_update".to_owned(),
            json!({ "user_id": ALICE, "device_id": "A", "stream_id": 2, "deleted": true })
        )
    );
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(2), Some(1)));
}

pub async fn dl_to_device_rows_have_no_device_list_meta(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    interest(s, ALICE, REMOTE, None).await;
    let batch = SendBatch {
        txn: ClientTxnKey {
            user_id: ALICE.to_owned(),
            device_id: "A".to_owned(),
            event_type: "m.test".to_owned(),
            txn_id: "t1".to_owned(),
        },
        local: vec![],
        remote: vec![NewOutboxEdu {
            destination: REMOTE.to_owned(),
            edu_json: json!({ "edu_type": "m.direct_to_device", "content": {} }).to_string(),
            message_count: 1,
        }],
        now_ms: NOW,
    };
    s.enqueue_send(batch).await.expect("send");
    rename(s, ALICE, "A", "phone").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].device_list, None);
    assert_eq!(rows[0].message_count, 1);
    assert_eq!(meta(&rows[1]), (ALICE.to_owned(), Some(1), None));
    send_txn(s, REMOTE, "t1", &rows, true).await;
    assert!(peek(s, REMOTE).await.is_empty());
}

pub async fn dl_a_requeued_quarantined_row_keeps_its_device_list_meta(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    interest(s, ALICE, REMOTE, None).await;
    rename(s, ALICE, "A", "phone").await;
    let rows = peek(s, REMOTE).await;
    s.quarantine_edu(
        &crate::support::lease_fence(s, REMOTE).await,
        REMOTE,
        rows[0].seq,
        "refused",
        NOW,
    )
    .await
    .expect("quarantine");
    assert!(peek(s, REMOTE).await.is_empty());
    assert!(
        s.release_quarantined(REMOTE, rows[0].seq, true)
            .await
            .expect("release")
    );
    let requeued = peek(s, REMOTE).await;
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].edu_json, rows[0].edu_json);
    assert_eq!(meta(&requeued[0]), (ALICE.to_owned(), Some(1), None));
    // And a later change of the device still replaces it.
    rename(s, ALICE, "A", "laptop").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(2), None));
}

pub async fn dl_a_thousand_changes_to_a_down_destination_coalesce_to_one_row(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    interest(s, ALICE, REMOTE, None).await;
    rename(s, ALICE, "B", "other").await;
    for i in 0..1_000 {
        rename(s, ALICE, "A", &format!("name-{i}")).await;
    }
    let stream = stream_id(s, ALICE).await;
    assert_eq!(stream, 1_001);
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 2, "one row per device");
    assert_eq!(parsed(&rows[0]).1["device_id"], json!("B"));
    let (_, content) = parsed(&rows[1]);
    assert_eq!(content["device_id"], json!("A"));
    assert_eq!(content["device_display_name"], json!("name-999"));
    assert_eq!(content["stream_id"], json!(stream));
    assert_eq!(meta(&rows[1]), (ALICE.to_owned(), Some(stream), Some(1)));
}

pub async fn dl_a_row_in_the_in_flight_txn_is_not_coalesced(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A"]).await;
    interest(s, ALICE, REMOTE, None).await;
    rename(s, ALICE, "A", "one").await;
    let first = peek(s, REMOTE).await;
    assert_eq!(first.len(), 1);
    send_txn(s, REMOTE, "t1", &first, false).await;
    rename(s, ALICE, "A", "two").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 2, "the in-flight row stays");
    assert_eq!(rows[0].seq, first[0].seq);
    // A third change replaces the second, never the in-flight one.
    rename(s, ALICE, "A", "three").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].seq, first[0].seq);
    assert_eq!(parsed(&rows[1]).1["device_display_name"], json!("three"));
    s.ack_txn(
        &crate::support::lease_fence(s, REMOTE).await,
        REMOTE,
        "t1",
        NOW,
    )
    .await
    .expect("ack");
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(3), Some(1)));
}

pub async fn dl_prev_id_chain_first_none_then_chained_then_acked(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    register(s, BOB, &["X"]).await;
    interest(s, ALICE, REMOTE, None).await;
    interest(s, BOB, REMOTE, None).await;
    rename(s, ALICE, "A", "a1").await; // 1
    rename(s, BOB, "X", "x1").await; // bob 1
    rename(s, ALICE, "B", "b1").await; // 2
    let rows = peek(s, REMOTE).await;
    let metas: Vec<_> = rows.iter().map(meta).collect();
    assert_eq!(
        metas,
        vec![
            (ALICE.to_owned(), Some(1), None),
            (BOB.to_owned(), Some(1), None),
            (ALICE.to_owned(), Some(2), Some(1)),
        ]
    );
    // A peek limited to one row still starts from nothing.
    let one = s.peek_outbox(REMOTE, 1, u64::MAX).await.expect("peek");
    assert_eq!(meta(&one[0]), (ALICE.to_owned(), Some(1), None));
    send_txn(s, REMOTE, "t1", &rows, true).await;
    rename(s, ALICE, "A", "a2").await; // 3
    rename(s, BOB, "X", "x2").await; // bob 2
    let rows = peek(s, REMOTE).await;
    let metas: Vec<_> = rows.iter().map(meta).collect();
    assert_eq!(
        metas,
        vec![
            (ALICE.to_owned(), Some(3), Some(2)),
            (BOB.to_owned(), Some(2), Some(1)),
        ]
    );
    // Another destination has acknowledged nothing.
    interest(s, ALICE, OTHER, None).await;
    rename(s, ALICE, "A", "a3").await; // 4
    let rows = peek(s, OTHER).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(4), None));
}

pub async fn dl_two_devices_of_one_user_chain_in_order(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A", "B"]).await;
    interest(s, ALICE, REMOTE, None).await;
    rename(s, ALICE, "A", "a1").await; // 1
    rename(s, ALICE, "B", "b1").await; // 2
    rename(s, ALICE, "A", "a2").await; // 3 replaces 1
    rename(s, ALICE, "B", "b2").await; // 4 replaces 2
    rename(s, ALICE, "A", "a3").await; // 5 replaces 3
    let rows = peek(s, REMOTE).await;
    let got: Vec<_> = rows
        .iter()
        .map(|r| (parsed(r).1["device_id"].clone(), meta(r)))
        .collect();
    assert_eq!(
        got,
        vec![
            (json!("B"), (ALICE.to_owned(), Some(4), None)),
            (json!("A"), (ALICE.to_owned(), Some(5), Some(4))),
        ]
    );
}

/// A sender simulation: changes of three devices interleaved with
/// transactions of up to three rows to two destinations, some left in
/// flight while more changes come. Every `prev_id` sent names a
/// `stream_id` sent to that destination before, streams only grow, and
/// once everything is sent the last state sent of each device is its
/// current one.
pub async fn dl_coalescing_keeps_every_sent_chain_consistent(harness: &Harness) {
    let s = &*harness.store;
    let devices = ["A", "B", "C"];
    register(s, ALICE, &devices).await;
    interest(s, ALICE, REMOTE, None).await;
    interest(s, ALICE, OTHER, None).await;
    let mut rng: u64 = 0x5eed;
    let mut next = move |n: u64| {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % n
    };
    // Per destination: the in-flight rows, the streams sent, the last
    // content sent per device.
    let mut in_flight: BTreeMap<&str, (String, Vec<OutboxEdu>)> = BTreeMap::new();
    let mut sent: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    let mut last: BTreeMap<(&str, String), Value> = BTreeMap::new();
    let mut txn = 0;
    let mut step = |destination: &'static str, rows: Vec<OutboxEdu>| {
        let streams = sent.entry(destination).or_default();
        for row in &rows {
            let (user, stream, prev) = meta(row);
            assert_eq!(user, ALICE);
            let stream = stream.expect("a device update");
            match prev {
                None => assert!(
                    streams.is_empty(),
                    "{destination}: prev None after {streams:?}"
                ),
                Some(p) => assert!(
                    streams.contains(&p),
                    "{destination}: prev {p} never sent ({streams:?})"
                ),
            }
            assert!(streams.last().is_none_or(|l| *l < stream), "streams grow");
            streams.push(stream);
            let content = parsed(row).1;
            let device = content["device_id"].as_str().expect("id").to_owned();
            last.insert((destination, device), content);
        }
    };
    for round in 0..200 {
        let destination = if next(2) == 0 { REMOTE } else { OTHER };
        match next(4) {
            0 | 1 => {
                let device = devices[next(3) as usize];
                rename(s, ALICE, device, &format!("{device}-{round}")).await;
            }
            2 => {
                if let Some((txn_id, rows)) = in_flight.remove(destination) {
                    s.ack_txn(
                        &crate::support::lease_fence(s, destination).await,
                        destination,
                        &txn_id,
                        NOW,
                    )
                    .await
                    .expect("ack");
                    step(destination, rows);
                } else {
                    let rows = s.peek_outbox(destination, 3, u64::MAX).await.expect("peek");
                    if !rows.is_empty() {
                        txn += 1;
                        let txn_id = format!("t{txn}");
                        send_txn(s, destination, &txn_id, &rows, false).await;
                        in_flight.insert(destination, (txn_id, rows));
                    }
                }
            }
            _ => {}
        }
    }
    // Drain both destinations.
    for destination in [REMOTE, OTHER] {
        if let Some((txn_id, rows)) = in_flight.remove(destination) {
            s.ack_txn(
                &crate::support::lease_fence(s, destination).await,
                destination,
                &txn_id,
                NOW,
            )
            .await
            .expect("ack");
            step(destination, rows);
        }
        loop {
            let rows = s.peek_outbox(destination, 3, u64::MAX).await.expect("peek");
            if rows.is_empty() {
                break;
            }
            txn += 1;
            send_txn(s, destination, &format!("t{txn}"), &rows, true).await;
            step(destination, rows);
        }
    }
    for destination in [REMOTE, OTHER] {
        for device in devices {
            let Some(content) = last.get(&(destination, device.to_owned())) else {
                continue;
            };
            let record = s
                .user_devices(vec![DeviceQuery {
                    user_id: ALICE.to_owned(),
                    device_ids: vec![device.to_owned()],
                }])
                .await
                .expect("query")
                .remove(0)
                .devices
                .remove(0);
            assert_eq!(
                content["device_display_name"].as_str(),
                record.display_name.as_deref(),
                "{destination} {device}: the last state sent is the current one"
            );
        }
    }
}

// --- tracking ---------------------------------------------------------------------

pub async fn dl_tracking_untracking_left_users_and_tracker_devices(harness: &Harness) {
    let s = &*harness.store;
    register(s, ALICE, &["A2", "A1"]).await;
    register(s, ERIN, &["E"]).await;
    register(s, BOB, &["X"]).await;
    let stale = s
        .track_users(
            ALICE,
            vec![track(BOB, false), track(CAROL, true)],
            TrackSource::Query,
            NOW,
        )
        .await
        .expect("track");
    assert_eq!(stale, vec![CAROL.to_owned()]);
    s.track_users(ERIN, vec![track(CAROL, true)], TrackSource::Homeserver, NOW)
        .await
        .expect("track");
    assert_eq!(
        s.tracked_users(ALICE).await.expect("tracked"),
        vec![BOB.to_owned(), CAROL.to_owned()]
    );
    let devices = |keys: Vec<courier::store::DeviceKey>| -> Vec<(String, String)> {
        keys.into_iter().map(|k| (k.user_id, k.device_id)).collect()
    };
    assert_eq!(
        devices(s.tracker_devices(vec![BOB.into()]).await.expect("devices")),
        vec![(ALICE.into(), "A1".into()), (ALICE.into(), "A2".into())]
    );
    assert_eq!(
        devices(
            s.tracker_devices(vec![CAROL.into(), BOB.into(), DAVE.into()])
                .await
                .expect("devices")
        ),
        vec![
            (ALICE.into(), "A1".into()),
            (ALICE.into(), "A2".into()),
            (ERIN.into(), "E".into()),
        ]
    );
    let before = position(s).await;
    let untracked = s
        .untrack_users(ALICE, vec![BOB.into(), DAVE.into(), BOB.into()], NOW)
        .await
        .expect("untrack");
    assert_eq!(untracked, vec![BOB.to_owned()]);
    let after = position(s).await;
    assert_eq!(
        s.left_users(ALICE, before, after).await.expect("left"),
        vec![BOB.to_owned()]
    );
    assert!(
        s.left_users(ERIN, before, after)
            .await
            .expect("left")
            .is_empty()
    );
    assert!(
        s.left_users(ALICE, after, after)
            .await
            .expect("left")
            .is_empty()
    );
    assert!(
        s.untrack_users(ALICE, vec![BOB.into()], NOW)
            .await
            .expect("untrack")
            .is_empty()
    );
    assert_eq!(
        s.tracked_users(ALICE).await.expect("tracked"),
        vec![CAROL.to_owned()]
    );
    // CAROL's cached list stays while ERIN tracks her, then goes.
    s.untrack_users(ALICE, vec![CAROL.into()], NOW)
        .await
        .expect("untrack");
    assert!(list(s, CAROL).await.is_some());
    s.untrack_users(ERIN, vec![CAROL.into()], NOW)
        .await
        .expect("untrack");
    assert!(list(s, CAROL).await.is_none());
    assert!(s.stale_remote_users(10).await.expect("stale").is_empty());
    let end = position(s).await;
    assert_eq!(
        s.left_users(ERIN, after, end).await.expect("left"),
        vec![CAROL.to_owned()]
    );
}

pub async fn dl_left_entries_do_not_move_the_tracked_users_stream(harness: &Harness) {
    let s = &*harness.store;
    register(s, BOB, &["X"]).await;
    interest(s, BOB, REMOTE, None).await;
    rename(s, BOB, "X", "x1").await;
    s.track_users(ALICE, vec![track(BOB, false)], TrackSource::Query, NOW)
        .await
        .expect("track");
    s.untrack_users(ALICE, vec![BOB.into()], NOW)
        .await
        .expect("untrack");
    assert_eq!(stream_id(s, BOB).await, 1);
    rename(s, BOB, "X", "x2").await;
    assert_eq!(stream_id(s, BOB).await, 2);
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1, "a left entry queues nothing");
    assert_eq!(meta(&rows[0]), (BOB.to_owned(), Some(2), None));
}

// --- the remote cache -------------------------------------------------------------

pub async fn dl_track_creates_a_stale_list_and_a_snapshot_clears_it(harness: &Harness) {
    let s = &*harness.store;
    assert_eq!(
        track_remote(s, ALICE, CAROL, NOW).await,
        vec![CAROL.to_owned()]
    );
    let cached = list(s, CAROL).await.expect("a cached list");
    assert!(cached.stale);
    assert_eq!(cached.stream_id, None);
    assert_eq!(cached.fetched_ts, None);
    assert_eq!(cached.pushed_ts, None, "a snapshot is not a push");
    assert!(cached.devices.is_empty());
    assert_eq!(
        s.stale_remote_users(10).await.expect("stale"),
        vec![CAROL.to_owned()]
    );
    // Still stale: tracking again (by anyone) names it again.
    assert_eq!(
        track_remote(s, ERIN, CAROL, NOW).await,
        vec![CAROL.to_owned()]
    );

    let snap = snapshot(
        CAROL,
        5,
        vec![
            remote_device("D2", None),
            remote_device("D1", Some("phone")),
        ],
    );
    assert_eq!(
        stored_snapshot(s, snap.clone()).await,
        SnapshotOutcome::Stored {
            changed: true,
            still_stale: false
        }
    );
    let cached = list(s, CAROL).await.expect("cached");
    assert!(!cached.stale);
    assert_eq!(cached.stream_id, Some(5));
    assert_eq!(cached.fetched_ts, Some(NOW));
    assert_eq!(
        cached.devices,
        vec![
            remote_device("D1", Some("phone")),
            remote_device("D2", None)
        ]
    );
    assert_eq!(cached.master_key_json, snap.master_key_json);
    assert_eq!(cached.self_signing_key_json, None);
    assert!(s.stale_remote_users(10).await.expect("stale").is_empty());
    assert!(track_remote(s, ALICE, CAROL, NOW).await.is_empty());
    assert_eq!(
        stored_snapshot(s, snap).await,
        SnapshotOutcome::Stored {
            changed: false,
            still_stale: false
        }
    );
    // A snapshot of an untracked user stores nothing.
    assert_eq!(
        stored_snapshot(s, snapshot(DAVE, 1, vec![])).await,
        SnapshotOutcome::Untracked
    );
    assert!(list(s, DAVE).await.is_none());
}

pub async fn dl_updates_apply_in_order_replays_and_backwards_are_not_newer(harness: &Harness) {
    let s = &*harness.store;
    track_remote(s, ALICE, CAROL, NOW).await;
    stored_snapshot(
        s,
        snapshot(
            CAROL,
            5,
            vec![remote_device("D1", None), remote_device("D2", None)],
        ),
    )
    .await;
    // Interest in a remote user (never set by the relay) would still queue
    // nothing: the cache's changes are not local changes.
    interest(s, CAROL, REMOTE, None).await;
    let report = s
        .apply_remote_device_updates(
            CAROL,
            vec![update(6, &[5], "D3", false), update(7, &[6], "D1", true)],
            NOW,
        )
        .await
        .expect("apply");
    assert!(report.tracked);
    assert_eq!(
        (report.applied, report.not_newer, report.needs_resync),
        (2, 0, false)
    );
    let cached = list(s, CAROL).await.expect("cached");
    assert_eq!(cached.stream_id, Some(7));
    assert_eq!(cached.pushed_ts, Some(NOW), "the server pushes this user");
    assert_eq!(device_ids(&cached.devices), vec!["D2", "D3"]);
    assert_eq!(cached.devices[1], {
        let mut d = remote_device("D3", None);
        d.keys_json = update(6, &[5], "D3", false).keys_json;
        d
    });
    // A replay and a stream going backwards are ignored.
    let report = s
        .apply_remote_device_updates(
            CAROL,
            vec![update(3, &[2], "D9", false), update(6, &[5], "D3", false)],
            NOW,
        )
        .await
        .expect("apply");
    assert_eq!(
        (report.applied, report.not_newer, report.needs_resync),
        (0, 2, false)
    );
    // Several prev_ids, each known.
    let report = s
        .apply_remote_device_updates(CAROL, vec![update(9, &[7, 6], "D4", false)], NOW)
        .await
        .expect("apply");
    assert_eq!((report.applied, report.needs_resync), (1, false));
    let cached = list(s, CAROL).await.expect("cached");
    assert_eq!(cached.stream_id, Some(9));
    assert!(!cached.stale);
    assert_eq!(device_ids(&cached.devices), vec!["D2", "D3", "D4"]);
    assert!(peek(s, REMOTE).await.is_empty());
}

pub async fn dl_an_unknown_prev_id_is_a_gap_and_nothing_after_it_applies(harness: &Harness) {
    let s = &*harness.store;
    track_remote(s, ALICE, CAROL, NOW).await;
    stored_snapshot(s, snapshot(CAROL, 5, vec![remote_device("D1", None)])).await;
    let report = s
        .apply_remote_device_updates(
            CAROL,
            vec![
                update(6, &[5], "D2", false),
                update(8, &[7], "D3", false),
                update(9, &[8], "D4", false),
            ],
            NOW + 1,
        )
        .await
        .expect("apply");
    assert_eq!((report.applied, report.needs_resync), (1, true));
    let cached = list(s, CAROL).await.expect("cached");
    assert!(cached.stale);
    assert_eq!(cached.stream_id, Some(6));
    assert_eq!(device_ids(&cached.devices), vec!["D1", "D2"]);
    assert_eq!(
        s.stale_remote_users(10).await.expect("stale"),
        vec![CAROL.to_owned()]
    );
    // A snapshot older than what was seen (9) leaves it stale.
    assert_eq!(
        stored_snapshot(s, snapshot(CAROL, 7, vec![remote_device("D1", None)])).await,
        SnapshotOutcome::Stored {
            changed: true,
            still_stale: true
        }
    );
    assert!(list(s, CAROL).await.expect("cached").stale);
    assert_eq!(
        stored_snapshot(s, snapshot(CAROL, 9, vec![remote_device("D4", None)])).await,
        SnapshotOutcome::Stored {
            changed: true,
            still_stale: false
        }
    );
    let cached = list(s, CAROL).await.expect("cached");
    assert!(!cached.stale);
    assert_eq!(cached.stream_id, Some(9));
    assert_eq!(device_ids(&cached.devices), vec!["D4"]);
}

pub async fn dl_an_empty_prev_id_with_a_known_extremity_is_a_gap(harness: &Harness) {
    let s = &*harness.store;
    track_remote(s, ALICE, CAROL, NOW).await;
    stored_snapshot(s, snapshot(CAROL, 5, vec![])).await;
    let report = s
        .apply_remote_device_updates(CAROL, vec![update(6, &[], "D1", false)], NOW)
        .await
        .expect("apply");
    assert_eq!((report.applied, report.needs_resync), (0, true));
    let cached = list(s, CAROL).await.expect("cached");
    assert!(cached.stale);
    assert_eq!(cached.stream_id, Some(5));
    assert!(cached.devices.is_empty());
}

pub async fn dl_updates_while_stale_are_not_applied_and_an_older_snapshot_stays_stale(
    harness: &Harness,
) {
    let s = &*harness.store;
    track_remote(s, ALICE, CAROL, NOW).await;
    // Never fetched: stale, so nothing applies, even a first update.
    let report = s
        .apply_remote_device_updates(
            CAROL,
            vec![update(9, &[], "D1", false), update(10, &[9], "D2", false)],
            NOW,
        )
        .await
        .expect("apply");
    assert!(report.tracked);
    assert_eq!((report.applied, report.needs_resync), (0, true));
    assert!(list(s, CAROL).await.expect("cached").devices.is_empty());
    assert_eq!(
        stored_snapshot(s, snapshot(CAROL, 8, vec![remote_device("D1", None)])).await,
        SnapshotOutcome::Stored {
            changed: true,
            still_stale: true
        }
    );
    let cached = list(s, CAROL).await.expect("cached");
    assert!(cached.stale);
    // Still stale: a further update is not applied either.
    let report = s
        .apply_remote_device_updates(CAROL, vec![update(9, &[8], "D5", false)], NOW)
        .await
        .expect("apply");
    assert_eq!((report.applied, report.needs_resync), (0, true));
    assert_eq!(
        stored_snapshot(s, snapshot(CAROL, 10, vec![remote_device("D2", None)])).await,
        SnapshotOutcome::Stored {
            changed: true,
            still_stale: false
        }
    );
    assert!(!list(s, CAROL).await.expect("cached").stale);
}

pub async fn dl_an_untracked_user_stores_nothing(harness: &Harness) {
    let s = &*harness.store;
    let before = position(s).await;
    let report = s
        .apply_remote_device_updates(DAVE, vec![update(1, &[], "D1", false)], NOW)
        .await
        .expect("apply");
    assert!(!report.tracked);
    assert_eq!((report.applied, report.needs_resync), (0, false));
    assert!(
        !s.put_remote_cross_signing(DAVE, Some("{}".into()), None, NOW)
            .await
            .expect("cross-signing")
    );
    assert!(
        s.mark_remote_stale(vec![DAVE.into()], NOW)
            .await
            .expect("stale")
            .is_empty()
    );
    assert!(list(s, DAVE).await.is_none());
    assert!(s.stale_remote_users(10).await.expect("stale").is_empty());
    assert_eq!(position(s).await, before);
}

pub async fn dl_users_with_changes_sees_remote_changes_not_left_entries(harness: &Harness) {
    let s = &*harness.store;
    let p0 = position(s).await;
    track_remote(s, ALICE, CAROL, NOW).await;
    stored_snapshot(s, snapshot(CAROL, 5, vec![remote_device("D1", None)])).await;
    let p1 = position(s).await;
    let changed = |after, up_to| async move {
        s.users_with_changes(vec![CAROL.into(), DAVE.into()], after, up_to)
            .await
            .expect("changes")
            .users
    };
    assert_eq!(changed(p0, p1).await, vec![CAROL.to_owned()]);
    s.apply_remote_device_updates(CAROL, vec![update(6, &[5], "D2", false)], NOW)
        .await
        .expect("apply");
    let p2 = position(s).await;
    assert!(p2 > p1);
    assert_eq!(changed(p1, p2).await, vec![CAROL.to_owned()]);
    // Nothing new: an unchanged snapshot and a replay log nothing.
    stored_snapshot(
        s,
        snapshot(
            CAROL,
            6,
            vec![remote_device("D1", None), {
                let mut d = remote_device("D2", None);
                d.keys_json = update(6, &[5], "D2", false).keys_json;
                d
            }],
        ),
    )
    .await;
    s.apply_remote_device_updates(CAROL, vec![update(6, &[5], "D2", false)], NOW)
        .await
        .expect("apply");
    assert_eq!(position(s).await, p2);
    s.untrack_users(ALICE, vec![CAROL.into()], NOW)
        .await
        .expect("untrack");
    let p3 = position(s).await;
    assert!(p3 > p2, "the left entry has a position");
    assert!(changed(p2, p3).await.is_empty());
    assert_eq!(
        s.left_users(ALICE, p2, p3).await.expect("left"),
        vec![CAROL.to_owned()]
    );
}

pub async fn dl_remote_cross_signing_keys_are_kept_or_replaced(harness: &Harness) {
    let s = &*harness.store;
    track_remote(s, ALICE, CAROL, NOW).await;
    let mut snap = snapshot(CAROL, 5, vec![]);
    snap.self_signing_key_json = Some("{\"ssk\":0}".into());
    stored_snapshot(s, snap.clone()).await;
    let p0 = position(s).await;
    let put = |master: Option<&str>, ssk: Option<&str>| {
        let (master, ssk) = (master.map(str::to_owned), ssk.map(str::to_owned));
        async move {
            s.put_remote_cross_signing(CAROL, master, ssk, NOW)
                .await
                .expect("cross-signing")
        }
    };
    assert!(put(Some("{\"m\":1}"), None).await);
    let cached = list(s, CAROL).await.expect("cached");
    assert_eq!(cached.master_key_json.as_deref(), Some("{\"m\":1}"));
    assert_eq!(cached.self_signing_key_json, snap.self_signing_key_json);
    assert!(!put(None, None).await);
    assert!(!put(Some("{\"m\":1}"), None).await);
    assert!(put(None, Some("{\"ssk\":1}")).await);
    let cached = list(s, CAROL).await.expect("cached");
    assert_eq!(cached.master_key_json.as_deref(), Some("{\"m\":1}"));
    assert_eq!(cached.self_signing_key_json.as_deref(), Some("{\"ssk\":1}"));
    let p1 = position(s).await;
    assert_eq!(p1 - p0, 2, "one change per call that changed something");
    assert_eq!(
        s.users_with_changes(vec![CAROL.into()], p0, p1)
            .await
            .expect("changes")
            .users,
        vec![CAROL.to_owned()]
    );
}

pub async fn dl_mark_stale_and_stale_users_longest_first(harness: &Harness) {
    let s = &*harness.store;
    let users = ["@c1:remote.test", "@c2:remote.test", "@c3:remote.test"];
    for user in users {
        track_remote(s, ALICE, user, NOW).await;
    }
    assert_eq!(
        s.stale_remote_users(10).await.expect("stale"),
        users.map(String::from).to_vec()
    );
    assert_eq!(s.stale_remote_users(2).await.expect("stale").len(), 2);
    for user in users {
        stored_snapshot(s, snapshot(user, 1, vec![])).await;
    }
    assert!(s.stale_remote_users(10).await.expect("stale").is_empty());
    let marked = s
        .mark_remote_stale(vec![users[2].into()], NOW + 10)
        .await
        .expect("mark");
    assert_eq!(marked, vec![users[2].to_owned()]);
    let marked = s
        .mark_remote_stale(vec![users[0].into(), DAVE.into()], NOW + 20)
        .await
        .expect("mark");
    assert_eq!(marked, vec![users[0].to_owned()]);
    // Marking again keeps the first time.
    s.mark_remote_stale(vec![users[2].into()], NOW + 30)
        .await
        .expect("mark");
    assert_eq!(
        s.stale_remote_users(10).await.expect("stale"),
        vec![users[2].to_owned(), users[0].to_owned()]
    );
    assert_eq!(
        s.stale_remote_users(1).await.expect("stale"),
        vec![users[2].to_owned()]
    );
    assert!(list(s, users[2]).await.expect("cached").stale);
    // A stale list does not apply updates.
    let report = s
        .apply_remote_device_updates(users[2], vec![update(2, &[1], "D", false)], NOW)
        .await
        .expect("apply");
    assert_eq!((report.applied, report.needs_resync), (0, true));
}

pub async fn dl_prune_deletes_expired_interests(harness: &Harness) {
    let s = &*harness.store;
    interest(s, ALICE, REMOTE, Some(NOW - 1)).await;
    interest(s, ALICE, OTHER, Some(NOW + 1_000)).await;
    interest(s, BOB, REMOTE, None).await;
    let report = s.prune(NOW, Retention::DEFAULT, 100).await.expect("prune");
    assert_eq!(report.expired_device_list_interest, 1);
    assert_eq!(
        s.device_list_interest(ALICE).await.expect("interest"),
        vec![Interest {
            destination: OTHER.to_owned(),
            expires_ts: Some(NOW + 1_000),
        }]
    );
    assert_eq!(
        s.device_list_interest(BOB).await.expect("interest").len(),
        1
    );
    let report = s.prune(NOW, Retention::DEFAULT, 100).await.expect("prune");
    assert_eq!(report.expired_device_list_interest, 0);
}

pub async fn dl_reopen_keeps_queued_rows_acked_streams_and_stale_flags(harness: &Harness) {
    let store = harness.store.clone();
    let s = &*store;
    register(s, ALICE, &["A"]).await;
    interest(s, ALICE, REMOTE, None).await;
    rename(s, ALICE, "A", "one").await;
    let rows = peek(s, REMOTE).await;
    send_txn(s, REMOTE, "t1", &rows, true).await;
    rename(s, ALICE, "A", "two").await;
    track_remote(s, ALICE, CAROL, NOW).await;
    s.track_users(ALICE, vec![track(BOB, false)], TrackSource::Homeserver, NOW)
        .await
        .expect("track");
    let before = peek(s, REMOTE).await;
    assert_eq!(before.len(), 1);
    assert_eq!(meta(&before[0]), (ALICE.to_owned(), Some(2), Some(1)));
    store.close().await.expect("close");
    drop(store);

    let store = (harness.reopen)().await;
    let s = &*store;
    assert_eq!(peek(s, REMOTE).await, before);
    assert_eq!(
        s.stale_remote_users(10).await.expect("stale"),
        vec![CAROL.to_owned()]
    );
    assert_eq!(
        s.tracked_users(ALICE).await.expect("tracked"),
        vec![BOB.to_owned(), CAROL.to_owned()]
    );
    assert_eq!(
        s.device_list_destinations(ALICE, NOW).await.expect("dests"),
        vec![REMOTE.to_owned()]
    );
    // Coalescing still works on the reopened queue.
    rename(s, ALICE, "A", "three").await;
    let rows = peek(s, REMOTE).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(meta(&rows[0]), (ALICE.to_owned(), Some(3), Some(1)));
}
