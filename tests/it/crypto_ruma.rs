//! Differential tests against ruma (dev-dependency oracle, CRATES.md §4):
//! for generated JSON objects our canonical bytes equal ruma's canonical
//! serialisation, our signatures equal `ruma_signatures::sign_json`, and each
//! side verifies the other's signatures.
//!
//! ruma rejects every float, including integral ones such as `-0` or `1e10`
//! that SPEC §10.3 writes as integers, so the generated values contain
//! integers only; the float cases are covered in `tests/it/crypto.rs`.

use std::collections::BTreeMap;

use courier::canonical_json::to_canonical_string;
use courier::keys::ServerSigningKey;
use courier::signing::{sign_json, verify_json};
use courier::xmatrix::{RequestToSign, sign_request};
use proptest::prelude::*;
use ruma_common::CanonicalJsonValue;
use ruma_common::canonical_json::CanonicalJsonObject;
use ruma_common::serde::Base64;
use ruma_signatures::{Ed25519KeyPair, PublicKeyMap};
use serde_json::{Value, json};

/// A PKCS#8 v1 DER document for an ed25519 seed: a fixed 16-byte header
/// (RFC 8410) followed by the 32-byte seed. ruma only loads DER.
fn ruma_key_pair(seed: [u8; 32], version: &str) -> Ed25519KeyPair {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    Ed25519KeyPair::from_der(&der, version.to_owned()).expect("a valid PKCS#8 ed25519 document")
}

fn to_ruma_object(value: &Value) -> CanonicalJsonObject {
    match CanonicalJsonValue::try_from(value.clone()).expect("integer-only JSON is canonical") {
        CanonicalJsonValue::Object(object) => object,
        other => panic!("expected an object, got {other:?}"),
    }
}

fn public_key_map(entity: &str, key: &ServerSigningKey) -> PublicKeyMap {
    let mut set = BTreeMap::new();
    set.insert(
        key.key_id().to_owned(),
        Base64::new(key.verifying_key().as_bytes().to_vec()),
    );
    let mut map = PublicKeyMap::new();
    map.insert(entity.to_owned(), set);
    map
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-9007199254740991i64..=9007199254740991).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[\\x00-\\x1f\"\\\\/\\x7f\u{e9}\u{2028}\u{10000}a-z]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    proptest::collection::btree_map("[a-z_\u{e9}\u{65e5}]{0,6}", json_value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

#[test]
fn spec_vector_matches_ruma() {
    let seed: [u8; 32] =
        courier::signing::decode_base64("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")
            .expect("decodes")
            .try_into()
            .expect("32 bytes");
    let ours = ServerSigningKey::from_seed("1", seed);
    let theirs = ruma_key_pair(seed, "1");
    let mut object = to_ruma_object(&json!({"one": 1, "two": "Two"}));
    ruma_signatures::sign_json("domain", &theirs, &mut object).expect("ruma signs");
    let mut value = json!({"one": 1, "two": "Two"});
    sign_json(&mut value, "domain", &ours).expect("signs");
    assert_eq!(
        CanonicalJsonValue::Object(object).to_string(),
        to_canonical_string(&value).expect("canonical")
    );
}

/// ruma's request signing is in ruma-federation-api, which is not a
/// dependency; its documented construction is `sign_json` over the
/// `{method, uri, origin, destination, content}` object, which we rebuild
/// here to compare with our direct byte writer.
#[test]
fn request_signature_matches_ruma_json_signing() {
    let seed = [42u8; 32];
    let ours = ServerSigningKey::from_seed("r", seed);
    let body =
        json!({"edus": [{"edu_type": "m.direct_to_device", "content": {"x": 1}}], "pdus": []});
    let request = RequestToSign {
        method: "PUT",
        uri: "/_matrix/federation/v1/send/1?q=%20",
        origin: "a.example",
        destination: "b.example:8448",
        content: Some(&body),
    };
    let header = sign_request(&ours, &request).expect("signs");
    let mut object = to_ruma_object(&json!({
        "method": "PUT",
        "uri": "/_matrix/federation/v1/send/1?q=%20",
        "origin": "a.example",
        "destination": "b.example:8448",
        "content": body,
    }));
    ruma_signatures::sign_json("a.example", &ruma_key_pair(seed, "r"), &mut object)
        .expect("ruma signs");
    let ruma_sig = object["signatures"]
        .as_object()
        .and_then(|s| s["a.example"].as_object())
        .and_then(|s| s["ed25519:r"].as_str())
        .expect("ruma put a signature there")
        .to_owned();
    assert_eq!(header.sig, ruma_sig);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn canonical_bytes_equal_ruma(value in json_object()) {
        let ruma = CanonicalJsonValue::Object(to_ruma_object(&value)).to_string();
        prop_assert_eq!(to_canonical_string(&value).expect("canonical"), ruma);
    }

    #[test]
    fn signatures_equal_ruma_and_cross_verify(
        value in json_object(),
        seed in any::<[u8; 32]>(),
        with_unsigned in any::<bool>(),
    ) {
        let mut value = value;
        if with_unsigned {
            value["unsigned"] = json!({"age_ts": 5, "signatures": "nested stays"});
        }
        let ours_key = ServerSigningKey::from_seed("k1", seed);
        let ruma_key = ruma_key_pair(seed, "k1");

        let mut ours = value.clone();
        sign_json(&mut ours, "example.org", &ours_key).expect("signs");
        let mut theirs = to_ruma_object(&value);
        ruma_signatures::sign_json("example.org", &ruma_key, &mut theirs).expect("ruma signs");
        let theirs_value: Value = serde_json::to_value(&theirs).expect("serialises");
        prop_assert_eq!(&ours, &theirs_value);

        // Cross-verification: ruma checks ours, we check ruma's.
        let keys = public_key_map("example.org", &ours_key);
        prop_assert!(ruma_signatures::verify_json(&keys, &to_ruma_object(&ours)).is_ok());
        prop_assert_eq!(
            verify_json(&theirs_value, "example.org", "ed25519:k1", &ours_key.verifying_key()),
            Ok(())
        );
        // And both reject the same tampering.
        let mut tampered = ours.clone();
        tampered["~tamper"] = json!(1);
        prop_assert!(ruma_signatures::verify_json(&keys, &to_ruma_object(&tampered)).is_err());
        prop_assert!(verify_json(&tampered, "example.org", "ed25519:k1", &ours_key.verifying_key()).is_err());
    }
}

/// The deliberate difference (see `signing.rs`): with the small-order
/// identity point as public key, the signature `R = identity, S = 0` passes
/// ed25519-dalek's non-strict `verify` for every message, which ruma uses.
/// Our strict check rejects it, as libsodium (Synapse) does.
#[test]
fn weak_key_signature_is_rejected_unlike_ruma() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut forged = [0u8; 64];
    forged[0] = 1;
    let weak_key = courier::signing::encode_base64(&identity);
    let forged_sig = courier::signing::encode_base64(&forged);
    let value = json!({
        "anything": "at all",
        "signatures": {"weak.example": {"ed25519:w": forged_sig}},
    });

    let verify_key = courier::signing::decode_verify_key(&weak_key).expect("a valid point");
    assert_eq!(
        verify_json(&value, "weak.example", "ed25519:w", &verify_key),
        Err(courier::signing::SigningError::BadSignature)
    );

    let mut set = BTreeMap::new();
    set.insert("ed25519:w".to_owned(), Base64::new(identity.to_vec()));
    let mut keys = PublicKeyMap::new();
    keys.insert("weak.example".to_owned(), set);
    assert!(
        ruma_signatures::verify_json(&keys, &to_ruma_object(&value)).is_ok(),
        "ruma's non-strict verification accepts the weak-key forgery"
    );
}
