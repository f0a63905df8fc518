//! A relay starts on loopback, serves its signed key document and version
//! over real TLS, answers unknown paths and wrong methods with
//! M_UNRECOGNIZED, and stops and restarts on the same store and key.

use crate::support::TestRelay;
use crate::support::tls_client::https_get_json;
use courier::signing::{decode_verify_key, verify_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_document_over_tls_is_self_signed_and_survives_restart() {
    let mut relay = TestRelay::spawn().await;
    let (status, doc) = https_get_json(
        relay.federation_addr,
        "localhost",
        &relay.server_name,
        "/_matrix/key/v2/server",
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["server_name"], relay.server_name.as_str());
    let keys = doc["verify_keys"].as_object().expect("verify_keys object");
    assert_eq!(keys.len(), 1);
    let (key_id, key) = keys.iter().next().expect("one key");
    let verify_key =
        decode_verify_key(key["key"].as_str().expect("key string")).expect("ed25519 key");
    verify_json(&doc, &relay.server_name, key_id, &verify_key).expect("self-signature verifies");
    let valid_until = doc["valid_until_ts"].as_i64().expect("valid_until_ts");
    assert!(
        valid_until > courier::clock::now_ms() + 3_600_000,
        "valid for at least an hour"
    );

    // A forged document (one byte of the server name changed) must not verify.
    let mut forged = doc.clone();
    forged["server_name"] = serde_json::json!(format!("{}x", relay.server_name));
    assert!(verify_json(&forged, &relay.server_name, key_id, &verify_key).is_err());

    let (status, version) = https_get_json(
        relay.federation_addr,
        "127.0.0.1",
        &relay.server_name,
        "/_matrix/federation/v1/version",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(version["server"]["name"], "Courier");

    let (status, body) = https_get_json(
        relay.federation_addr,
        "localhost",
        &relay.server_name,
        "/_matrix/federation/v1/nope",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["errcode"], "M_UNRECOGNIZED");

    let r = relay
        .http
        .post_json(
            &format!("{}/_courier/v1/nope", relay.rpc_url),
            None,
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json["errcode"], "M_UNRECOGNIZED");

    relay.stop().await;
    relay.restart().await;
    let (status, again) = https_get_json(
        relay.federation_addr,
        "localhost",
        &relay.server_name,
        "/_matrix/key/v2/server",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        again["verify_keys"], doc["verify_keys"],
        "same key after restart"
    );
    relay.stop().await;
}
