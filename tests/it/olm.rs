//! The end-to-end encryption proof, Courier to Courier, with an Olm
//! implementation nobody here wrote: matrix-rust-sdk's `OlmMachine`
//! (`support::olm_peer`). Alice on relay A and Bob on relay B (two relays
//! federating over loopback TLS) upload their keys, track each other (no
//! shared room), query each other's devices through their own relay (so over
//! federation), claim a one-time key of the other's device over federation,
//! and each sends the other an Olm-encrypted to-device event that the other
//! side's machine decrypts; then a reply on the established sessions. Both
//! directions; bounded in time.

use std::time::Duration;

use serde_json::json;

use crate::support::TestRelay;
use crate::support::olm_peer::OlmPeer;

const EVENT_TYPE: &str = "org.courier.test.olm";
const DELIVERY: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn olm_to_device_both_ways_between_two_relays() {
    tokio::time::timeout(Duration::from_secs(180), both_ways())
        .await
        .expect("the Olm exchange finished within 180 s");
}

async fn both_ways() {
    let a = TestRelay::spawn().await;
    let b = TestRelay::spawn().await;
    let alice = OlmPeer::register(&a, "alice", "ALICEDEV").await;
    let bob = OlmPeer::register(&b, "bob", "BOBDEV").await;
    exchange(alice, bob).await;
}

/// The same exchange between devices on any two running homeservers (how
/// the driver was checked against Synapse before Courier had keys
/// endpoints). Run by hand with `OLM_EXTERNAL_A` and `OLM_EXTERNAL_B` set to
/// `<client URL> <user ID> <device ID> <access token>` each (loopback only):
/// `cargo test --test it olm::external -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs two running homeservers: OLM_EXTERNAL_A, OLM_EXTERNAL_B"]
async fn external_homeservers() {
    let peer = |name: &str| {
        let value = std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        let parts: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
        assert_eq!(
            parts.len(),
            4,
            "{name}: <client URL> <user> <device> <token>"
        );
        assert!(
            parts[0].starts_with("http://127.0.0.1"),
            "{name}: loopback only"
        );
        parts
    };
    let (a, b) = (peer("OLM_EXTERNAL_A"), peer("OLM_EXTERNAL_B"));
    let alice = OlmPeer::new(&a[0], &a[1], &a[2], &a[3]).await;
    let bob = OlmPeer::new(&b[0], &b[1], &b[2], &b[3]).await;
    tokio::time::timeout(Duration::from_secs(180), exchange(alice, bob))
        .await
        .expect("the Olm exchange finished within 180 s");
}

async fn exchange(mut alice: OlmPeer, mut bob: OlmPeer) {
    // Keys: the first requests upload device keys and one-time keys; the
    // first /sync tells the machine the server takes fallback keys, and the
    // next upload carries one.
    for peer in [&mut alice, &mut bob] {
        peer.flush().await;
        peer.sync(0).await;
        peer.flush().await;
        let decrypted = peer.sync(0).await;
        assert!(decrypted.is_empty(), "{decrypted:?}");
        let sync = &peer.last_sync;
        let count = sync["device_one_time_keys_count"]["signed_curve25519"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            count > 0,
            "{}: no one-time keys counted: {sync}",
            peer.user_id
        );
        assert_eq!(
            sync["device_unused_fallback_key_types"],
            json!(["signed_curve25519"]),
            "{}: fallback key not counted: {sync}",
            peer.user_id
        );
    }

    // Query over federation: each sees the other's device with the keys the
    // other's machine holds (the machine has checked its self-signature).
    alice.track(&bob.user_id).await;
    bob.track(&alice.user_id).await;
    for (me, other) in [(&alice, &bob), (&bob, &alice)] {
        let device = me
            .machine
            .get_device(&other.user_id, &other.device_id, None)
            .await
            .expect("device lookup")
            .unwrap_or_else(|| panic!("{} does not know {}", me.user_id, other.device_id));
        let (ed25519, curve25519) = other.identity_keys();
        assert_eq!(device.ed25519_key().map(|k| k.to_base64()), Some(ed25519));
        assert_eq!(
            device.curve25519_key().map(|k| k.to_base64()),
            Some(curve25519)
        );
    }

    // Claim over federation, both ways, before either message is sent: both
    // sides open an outbound session on a claimed one-time key.
    assert!(alice.claim_missing(&bob.user_id).await, "alice claimed");
    assert!(bob.claim_missing(&alice.user_id).await, "bob claimed");
    assert!(
        !alice.claim_missing(&bob.user_id).await,
        "one claim is enough"
    );

    let to_bob = json!({ "body": "hello Bob", "n": 1 });
    let to_alice = json!({ "body": "hello Alice", "n": 2 });
    alice
        .send_encrypted(&bob.user_id, bob.device_id.as_str(), EVENT_TYPE, &to_bob)
        .await;
    bob.send_encrypted(
        &alice.user_id,
        alice.device_id.as_str(),
        EVENT_TYPE,
        &to_alice,
    )
    .await;

    let got = bob.receive(EVENT_TYPE, DELIVERY).await;
    assert_eq!(got.event["content"], to_bob);
    assert_eq!(got.event["sender"], json!(alice.user_id.as_str()));
    assert_eq!(got.sender, alice.user_id);
    assert_eq!(got.sender_device.as_deref(), Some(alice.device_id.as_ref()));
    assert_eq!(got.sender_curve25519, alice.identity_keys().1);

    let got = alice.receive(EVENT_TYPE, DELIVERY).await;
    assert_eq!(got.event["content"], to_alice);
    assert_eq!(got.sender, bob.user_id);
    assert_eq!(got.sender_device.as_deref(), Some(bob.device_id.as_ref()));
    assert_eq!(got.sender_curve25519, bob.identity_keys().1);

    // A reply on the sessions now established in both directions.
    let reply = json!({ "body": "got it", "n": 3 });
    bob.send_encrypted(&alice.user_id, alice.device_id.as_str(), EVENT_TYPE, &reply)
        .await;
    let got = alice.receive(EVENT_TYPE, DELIVERY).await;
    assert_eq!(got.event["content"], reply);
    assert_eq!(got.sender, bob.user_id);
}
