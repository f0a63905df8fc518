//! Crypto tests: the SPEC §10 vectors byte for byte, the derived federation
//! fixtures and their negative cases, number rules, bad key files and
//! malformed X-Matrix headers (tables), the fuzz seed corpus, and property
//! tests of the header printer/parser and the canonical encoder. The
//! differential tests against ruma live in `tests/it/crypto_ruma.rs`.

use std::path::Path;

use courier::canonical_json::{to_canonical_bytes, to_canonical_string};
use courier::federation::keyring::validate_server_key_response;
use courier::keys::{KeyError, OldVerifyKey, ServerSigningKey, server_key_document};
use courier::signing::{
    SigningError, decode_base64, decode_verify_key, encode_base64, sign_json, verify_json,
};
use courier::xmatrix::{
    RequestToSign, XMatrix, XMatrixError, parse_authorization_headers, sign_request, verify_request,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const SPEC_SEED_BASE64: &str = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1";
const SPEC_SEED_HEX: &str = "6090c103d5e7af6b15a970fd563ed75549e6159719ae5c3c31dee4316fb75c0d";
const SPEC_PUBLIC_KEY: &str = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI";
const SPEC_PUBLIC_KEY_HEX: &str =
    "5c65f42514b601fddb7b7927cf67c18916c0a639b60e1eb58170c903c91c24d2";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn spec_seed() -> [u8; 32] {
    let seed = decode_base64(SPEC_SEED_BASE64).expect("the spec seed decodes leniently");
    seed.try_into().expect("the spec seed is 32 bytes")
}

fn spec_key() -> ServerSigningKey {
    ServerSigningKey::from_seed("1", spec_seed())
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("test JSON parses")
}

// --- §10.1 -----------------------------------------------------------------

#[test]
fn spec_seed_and_public_key() {
    assert_eq!(hex(&spec_seed()), SPEC_SEED_HEX);
    // The strict engine rejects the spec's form (non-zero trailing bits).
    use base64::Engine as _;
    assert!(
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(SPEC_SEED_BASE64)
            .is_err()
    );
    let key = spec_key();
    assert_eq!(key.key_id(), "ed25519:1");
    assert_eq!(key.public_key_base64(), SPEC_PUBLIC_KEY);
    assert_eq!(hex(key.verifying_key().as_bytes()), SPEC_PUBLIC_KEY_HEX);
    // Re-encoding gives the canonical form ending in `XA0`.
    assert!(encode_base64(&spec_seed()).ends_with("XA0"));
    // A key file in Synapse's format with the spec's seed.
    let file = format!("ed25519 1 {SPEC_SEED_BASE64}\n");
    let loaded = ServerSigningKey::parse(&file, "spec").expect("spec key file parses");
    assert_eq!(loaded.public_key_base64(), SPEC_PUBLIC_KEY);
}

#[test]
fn base64_examples_and_lenient_decoding() {
    let cases = [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ];
    for (plain, encoded) in cases {
        assert_eq!(encode_base64(plain.as_bytes()), encoded);
        assert_eq!(decode_base64(encoded).as_deref(), Ok(plain.as_bytes()));
    }
    assert_eq!(decode_base64("Zm8=").as_deref(), Ok(&b"fo"[..]));
    assert_eq!(decode_base64("Zg==").as_deref(), Ok(&b"f"[..]));
    // URL-safe input is accepted: 0xfb 0xff → "-_8" / "+/8".
    assert_eq!(decode_base64("-_8").as_deref(), Ok(&[0xfb, 0xff][..]));
    assert_eq!(decode_base64("+/8").as_deref(), Ok(&[0xfb, 0xff][..]));
    assert_eq!(decode_base64("+_8"), Err(SigningError::BadBase64));
    assert_eq!(decode_base64("Z"), Err(SigningError::BadBase64));
    assert_eq!(decode_base64("Zm9v!"), Err(SigningError::BadBase64));
}

// --- §10.2 -----------------------------------------------------------------

#[test]
fn spec_json_signing_vectors() {
    let key = spec_key();
    let mut empty = json!({});
    sign_json(&mut empty, "domain", &key).expect("signs");
    assert_eq!(
        to_canonical_string(&empty).expect("canonical"),
        r#"{"signatures":{"domain":{"ed25519:1":"K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"}}}"#
    );
    let mut two = parse(r#"{"one": 1, "two": "Two"}"#);
    sign_json(&mut two, "domain", &key).expect("signs");
    assert_eq!(
        to_canonical_string(&two).expect("canonical"),
        r#"{"one":1,"signatures":{"domain":{"ed25519:1":"KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"}},"two":"Two"}"#
    );
    let verify_key = decode_verify_key(SPEC_PUBLIC_KEY).expect("spec key decodes");
    assert_eq!(
        verify_json(&empty, "domain", "ed25519:1", &verify_key),
        Ok(())
    );
    assert_eq!(
        verify_json(&two, "domain", "ed25519:1", &verify_key),
        Ok(())
    );
}

#[test]
fn signing_merges_and_keeps_unsigned() {
    let key = spec_key();
    let other = ServerSigningKey::from_seed("2", [9; 32]);
    let mut value = json!({
        "one": 1,
        "two": "Two",
        "unsigned": {"age": 5},
        "signatures": {"other.example": {"ed25519:x": "abc"}},
    });
    sign_json(&mut value, "domain", &key).expect("signs");
    sign_json(&mut value, "domain", &other).expect("signs");
    assert_eq!(value["unsigned"], json!({"age": 5}));
    assert_eq!(value["signatures"]["other.example"]["ed25519:x"], "abc");
    // `unsigned` and `signatures` are not part of the signed bytes, so the
    // signature equals the §10.2 vector.
    assert_eq!(
        value["signatures"]["domain"]["ed25519:1"],
        "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
    );
    let verify_key = key.verifying_key();
    assert_eq!(
        verify_json(&value, "domain", "ed25519:1", &verify_key),
        Ok(())
    );
    assert_eq!(
        verify_json(&value, "domain", "ed25519:2", &other.verifying_key()),
        Ok(())
    );
    // Changing `unsigned` keeps the signature valid; changing content breaks it.
    value["unsigned"] = json!({"age": 6});
    assert_eq!(
        verify_json(&value, "domain", "ed25519:1", &verify_key),
        Ok(())
    );
    value["one"] = json!(2);
    assert_eq!(
        verify_json(&value, "domain", "ed25519:1", &verify_key),
        Err(SigningError::BadSignature)
    );
    // Wrong key, missing entity, missing key id, garbage signature.
    let mut fresh = json!({"a": 1});
    sign_json(&mut fresh, "domain", &key).expect("signs");
    assert_eq!(
        verify_json(&fresh, "domain", "ed25519:1", &other.verifying_key()),
        Err(SigningError::BadSignature)
    );
    assert!(matches!(
        verify_json(&fresh, "nobody", "ed25519:1", &verify_key),
        Err(SigningError::MissingSignature { .. })
    ));
    assert!(matches!(
        verify_json(&fresh, "domain", "ed25519:9", &verify_key),
        Err(SigningError::MissingSignature { .. })
    ));
    fresh["signatures"]["domain"]["ed25519:1"] = json!("not base64!");
    assert_eq!(
        verify_json(&fresh, "domain", "ed25519:1", &verify_key),
        Err(SigningError::BadBase64)
    );
    fresh["signatures"]["domain"]["ed25519:1"] = json!("AAAA");
    assert_eq!(
        verify_json(&fresh, "domain", "ed25519:1", &verify_key),
        Err(SigningError::BadBase64)
    );
    // Not objects.
    assert_eq!(
        sign_json(&mut json!([1]), "domain", &key),
        Err(SigningError::NotAnObject)
    );
    assert_eq!(
        sign_json(&mut json!({"signatures": 1}), "domain", &key),
        Err(SigningError::NotAnObject)
    );
    assert!(matches!(
        sign_json(&mut json!({"f": 1.5}), "domain", &key),
        Err(SigningError::Canonical(_))
    ));
}

#[test]
fn verify_key_decoding() {
    assert!(decode_verify_key(SPEC_PUBLIC_KEY).is_ok());
    // Padded form of the same key.
    assert!(decode_verify_key(&format!("{SPEC_PUBLIC_KEY}=")).is_ok());
    for bad in ["", "AAAA", "not base64!", &format!("{SPEC_PUBLIC_KEY}AAAA")] {
        assert_eq!(
            decode_verify_key(bad),
            Err(SigningError::BadVerifyKey),
            "{bad:?}"
        );
    }
}

// --- §10.3 -----------------------------------------------------------------

#[test]
fn spec_canonical_json_table() {
    let table = [
        ("{}", "{}"),
        (r#"{ "one": 1, "two": "Two" }"#, r#"{"one":1,"two":"Two"}"#),
        (r#"{ "b": "2", "a": "1" }"#, r#"{"a":"1","b":"2"}"#),
        (r#"{"b":"2","a":"1"}"#, r#"{"a":"1","b":"2"}"#),
        (r#"{ "a": "日本語" }"#, r#"{"a":"日本語"}"#),
        (r#"{ "本": 2, "日": 1 }"#, r#"{"日":1,"本":2}"#),
        (r#"{ "a": "\u65E5" }"#, r#"{"a":"日"}"#),
        (r#"{ "a": null }"#, r#"{"a":null}"#),
        (r#"{ "a": -0, "b": 1e10 }"#, r#"{"a":0,"b":10000000000}"#),
    ];
    for (input, expected) in table {
        assert_eq!(
            to_canonical_string(&parse(input)).as_deref(),
            Ok(expected),
            "{input}"
        );
    }
    let nested = r#"{"auth": {"success": true, "mxid": "@john.doe:example.com",
      "profile": {"display_name": "John Doe", "three_pids": [
         {"medium": "email", "address": "john.doe@example.org"},
         {"medium": "msisdn", "address": "123456789"}]}}}"#;
    assert_eq!(
        to_canonical_string(&parse(nested)).as_deref(),
        Ok(
            r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#
        )
    );
}

#[test]
fn spec_escaping_vector() {
    let input = r#"{"s": "\u0001\t\"\\/\u007f\u00e9\u2028\u001f\b\f\n\r", "B": 1, "a": [true, false, null, -5, 0], "\u00e9": {}, "Z": "z"}"#;
    let expected = "7b2242223a312c225a223a227a222c2261223a5b747275652c66616c73652c6e756c6c2c2d352c305d2c2273223a225c75303030315c745c225c5c2f7fc3a9e280a85c75303031665c625c665c6e5c72222c22c3a9223a7b7d7d";
    assert_eq!(
        hex(&to_canonical_bytes(&parse(input)).expect("canonical")),
        expected
    );
}

#[test]
fn number_rules() {
    let ok = [
        ("-9007199254740991", "-9007199254740991"),
        ("9007199254740991", "9007199254740991"),
        ("1.0", "1"),
        ("-0.0", "0"),
        ("1e10", "10000000000"),
        ("12e-1", ""),
    ];
    for (input, expected) in ok {
        let result = to_canonical_string(&parse(input));
        if expected.is_empty() {
            assert!(result.is_err(), "{input} must be rejected");
        } else {
            assert_eq!(result.as_deref(), Ok(expected), "{input}");
        }
    }
    for bad in [
        "1.5",
        "-0.5",
        "9007199254740992",
        "-9007199254740992",
        "9007199254740992.0",
        "18446744073709551615",
        "1e300",
        r#"{"a": [1, 2.25]}"#,
    ] {
        assert!(
            to_canonical_bytes(&parse(bad)).is_err(),
            "{bad} must be rejected"
        );
    }
}

// --- §10.4 -----------------------------------------------------------------

const SEND_BODY: &str = r#"{"edus":[{"content":{"message_id":"hiezohf6Hoo7kaev","messages":{"@bob:remote.example":{"BOBDEVICE":{"algorithm":"m.olm.v1.curve25519-aes-sha2","ciphertext":{}}}},"sender":"@alice:domain","type":"m.room.encrypted"},"edu_type":"m.direct_to_device"}],"origin":"domain","origin_server_ts":1700000000000,"pdus":[]}"#;
const SEND_URI: &str = "/_matrix/federation/v1/send/1700000000000-0";
const SEND_HEADER: &str = r#"X-Matrix origin="domain",destination="remote.example",key="ed25519:1",sig="xhUCmjmW/VBJwl/bWr11YJ4seOTXNaEZ56gMmtfVnvP88UWwR5Krimo8vneSbGk8qFJHhfqBBPYJpWL+FzxXCA""#;
const DEVICES_URI: &str = "/_matrix/federation/v1/user/devices/%40bob%3Aremote.example";
const DEVICES_SIG: &str =
    "DpHPfCosf4CJu8R+9WCDeSWHqGxn72C8EdMX3jUqluRPG2nigYUsZdntt1EjOztgp1ezUaDzpEtWY3hddS8TDA";
const QUERY_URI: &str = "/_matrix/key/v2/query/remote.example?minimum_valid_until_ts=1700000000000";
const QUERY_SIG: &str =
    "qIH6JjHfodxeD153yKfz9nvgjRIeyW/+kdYTpztGmJt68ctoI6WNPoXmMXRSgY9BLqoV0zpUkBBoStP33c7uBg";

fn request<'a>(
    method: &'a str,
    uri: &'a str,
    destination: &'a str,
    content: Option<&'a Value>,
) -> RequestToSign<'a> {
    RequestToSign {
        method,
        uri,
        origin: "domain",
        destination,
        content,
    }
}

#[test]
fn fixture_a_server_key_document() {
    let key = spec_key();
    let document = server_key_document("domain", &key, &[], 1_700_000_000_000);
    assert_eq!(
        document["signatures"]["domain"]["ed25519:1"],
        "ewq/uPhfAzmWSa/3PRlr5Q0W59jG75Wtb6mzxIELuVRAxYMHOeMFue6fNXijZkIwLLembQ0+gl7DIkiUGcoUBg"
    );
    let mut unsigned = document.clone();
    unsigned
        .as_object_mut()
        .expect("object")
        .remove("signatures");
    assert_eq!(
        to_canonical_string(&unsigned).as_deref(),
        Ok(
            r#"{"old_verify_keys":{},"server_name":"domain","valid_until_ts":1700000000000,"verify_keys":{"ed25519:1":{"key":"XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"}}}"#
        )
    );
    let now = 1_699_999_000_000;
    let keys = validate_server_key_response("domain", &document, now).expect("valid");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].server_name, "domain");
    assert_eq!(keys[0].key_id, "ed25519:1");
    assert_eq!(keys[0].public_key, SPEC_PUBLIC_KEY);
    assert_eq!(keys[0].valid_until_ts, 1_700_000_000_000);
}

#[test]
fn fixture_b_send_transaction() {
    let key = spec_key();
    let body = parse(SEND_BODY);
    let req = request("PUT", SEND_URI, "remote.example", Some(&body));
    assert_eq!(
        String::from_utf8(req.canonical_bytes().expect("canonical")).as_deref(),
        Ok(
            r#"{"content":{"edus":[{"content":{"message_id":"hiezohf6Hoo7kaev","messages":{"@bob:remote.example":{"BOBDEVICE":{"algorithm":"m.olm.v1.curve25519-aes-sha2","ciphertext":{}}}},"sender":"@alice:domain","type":"m.room.encrypted"},"edu_type":"m.direct_to_device"}],"origin":"domain","origin_server_ts":1700000000000,"pdus":[]},"destination":"remote.example","method":"PUT","origin":"domain","uri":"/_matrix/federation/v1/send/1700000000000-0"}"#
        )
    );
    let header = sign_request(&key, &req).expect("signs");
    assert_eq!(
        format!("Authorization: {}", header.to_header_value()),
        format!("Authorization: {SEND_HEADER}")
    );
    let parsed = XMatrix::parse(SEND_HEADER).expect("parses");
    assert_eq!(parsed, header);
    let verify_key = decode_verify_key(SPEC_PUBLIC_KEY).expect("decodes");
    assert_eq!(verify_request(&parsed, &req, &verify_key), Ok(()));

    // Negative: one byte of the body changed.
    let tampered = parse(&SEND_BODY.replace("hiezohf6Hoo7kaev", "hiezohf6Hoo7kaew"));
    let bad = request("PUT", SEND_URI, "remote.example", Some(&tampered));
    assert_eq!(
        verify_request(&parsed, &bad, &verify_key),
        Err(XMatrixError::Signing(SigningError::BadSignature))
    );
    // Negative: another destination (our name is not the one signed for).
    let bad = request("PUT", SEND_URI, "other.example", Some(&body));
    assert!(verify_request(&parsed, &bad, &verify_key).is_err());
    // Negative: the body dropped (content must be present when signed).
    let bad = request("PUT", SEND_URI, "remote.example", None);
    assert!(verify_request(&parsed, &bad, &verify_key).is_err());
    // Negative: another method.
    let bad = request("POST", SEND_URI, "remote.example", Some(&body));
    assert!(verify_request(&parsed, &bad, &verify_key).is_err());
}

#[test]
fn fixture_c_get_without_body() {
    let key = spec_key();
    let req = request("GET", DEVICES_URI, "remote.example", None);
    assert_eq!(
        String::from_utf8(req.canonical_bytes().expect("canonical")).as_deref(),
        Ok(
            r#"{"destination":"remote.example","method":"GET","origin":"domain","uri":"/_matrix/federation/v1/user/devices/%40bob%3Aremote.example"}"#
        )
    );
    let header = sign_request(&key, &req).expect("signs");
    assert_eq!(header.sig, DEVICES_SIG);
    let verify_key = key.verifying_key();
    assert_eq!(verify_request(&header, &req, &verify_key), Ok(()));
    // Negative: `%40`/`%3A` decoded before verifying.
    let decoded = request(
        "GET",
        "/_matrix/federation/v1/user/devices/@bob:remote.example",
        "remote.example",
        None,
    );
    assert!(verify_request(&header, &decoded, &verify_key).is_err());
    // Negative: `content: {}` or `null` added for a GET.
    let empty = json!({});
    let with_empty = request("GET", DEVICES_URI, "remote.example", Some(&empty));
    assert!(verify_request(&header, &with_empty, &verify_key).is_err());
    let null = Value::Null;
    let with_null = request("GET", DEVICES_URI, "remote.example", Some(&null));
    assert!(verify_request(&header, &with_null, &verify_key).is_err());
}

#[test]
fn fixture_d_query_string_is_signed() {
    let key = spec_key();
    let req = request("GET", QUERY_URI, "notary.example", None);
    assert_eq!(
        String::from_utf8(req.canonical_bytes().expect("canonical")).as_deref(),
        Ok(
            r#"{"destination":"notary.example","method":"GET","origin":"domain","uri":"/_matrix/key/v2/query/remote.example?minimum_valid_until_ts=1700000000000"}"#
        )
    );
    let header = sign_request(&key, &req).expect("signs");
    assert_eq!(header.sig, QUERY_SIG);
    let verify_key = key.verifying_key();
    assert_eq!(verify_request(&header, &req, &verify_key), Ok(()));
    // Negative: the uri without its query string.
    let no_query = request(
        "GET",
        "/_matrix/key/v2/query/remote.example",
        "notary.example",
        None,
    );
    assert!(verify_request(&header, &no_query, &verify_key).is_err());
    // Negative: a header whose origin differs from the rebuilt request.
    let mut other_origin = header.clone();
    other_origin.origin = "evil.example".to_owned();
    assert!(verify_request(&other_origin, &req, &verify_key).is_err());
}

#[test]
fn old_verify_keys_never_authenticate_requests() {
    let current = spec_key();
    let old = ServerSigningKey::from_seed("old", [3; 32]);
    let old_entry = OldVerifyKey {
        key_id: old.key_id().to_owned(),
        public_key: old.public_key_base64(),
        expired_ts: 1_600_000_000_000,
    };
    let document = server_key_document("domain", &current, &[old_entry], 1_700_000_000_000);
    assert_eq!(
        document["old_verify_keys"]["ed25519:old"],
        json!({"key": old.public_key_base64(), "expired_ts": 1_600_000_000_000_i64})
    );
    let keys = validate_server_key_response("domain", &document, 1_699_000_000_000).expect("valid");
    // A request signed with the old key: its key id is not among the keys a
    // verifier may use.
    let req = request("GET", DEVICES_URI, "remote.example", None);
    let header = sign_request(&old, &req).expect("signs");
    assert!(keys.iter().all(|k| k.key_id != header.key));
    assert_eq!(keys.len(), 1);
    // And verifying it with the only current key fails.
    let current_key = decode_verify_key(&keys[0].public_key).expect("decodes");
    assert!(verify_request(&header, &req, &current_key).is_err());

    // A key response signed only by a key listed in old_verify_keys.
    let mut only_old = document.clone();
    only_old
        .as_object_mut()
        .expect("object")
        .remove("signatures");
    sign_json(&mut only_old, "domain", &old).expect("signs");
    assert!(matches!(
        validate_server_key_response("domain", &only_old, 1_699_000_000_000),
        Err(KeyError::BadKeyResponse { .. })
    ));
}

#[test]
fn key_response_validation() {
    let key = spec_key();
    let now = 1_000_000_000_000_i64;
    let week = 7 * 24 * 3600 * 1000_i64;
    let far = server_key_document("domain", &key, &[], now + 30 * week);
    let keys = validate_server_key_response("domain", &far, now).expect("valid");
    assert_eq!(keys[0].valid_until_ts, now + week, "capped at 7 days");

    let good = server_key_document("domain", &key, &[], now + 1000);
    let rejected = |value: &Value, name: &str| {
        matches!(
            validate_server_key_response(name, value, now),
            Err(KeyError::BadKeyResponse { .. })
        )
    };
    assert!(rejected(&good, "other.example"), "server_name mismatch");
    assert!(rejected(&json!([]), "domain"));
    let mut tampered = good.clone();
    tampered["valid_until_ts"] = json!(now + 2000);
    assert!(rejected(&tampered, "domain"), "tampered");
    let mut unsigned = good.clone();
    unsigned
        .as_object_mut()
        .expect("object")
        .remove("signatures");
    assert!(rejected(&unsigned, "domain"), "unsigned");
    let mut foreign = unsigned.clone();
    sign_json(
        &mut foreign,
        "domain",
        &ServerSigningKey::from_seed("9", [5; 32]),
    )
    .expect("signs");
    assert!(
        rejected(&foreign, "domain"),
        "signed by a key not in verify_keys"
    );
    // One good and one bad signature by listed keys: every one must verify.
    let second = ServerSigningKey::from_seed("2", [6; 32]);
    let mut two_keys = unsigned.clone();
    two_keys["verify_keys"]["ed25519:2"] = json!({"key": second.public_key_base64()});
    sign_json(&mut two_keys, "domain", &key).expect("signs");
    sign_json(&mut two_keys, "domain", &second).expect("signs");
    let mut listed = validate_server_key_response("domain", &two_keys, now).expect("valid");
    listed.sort_by(|a, b| a.key_id.cmp(&b.key_id));
    assert_eq!(listed.len(), 2);
    two_keys["signatures"]["domain"]["ed25519:2"] = json!(key.sign_bytes(b"other"));
    assert!(rejected(&two_keys, "domain"), "one listed signature fails");
    // Unknown algorithms are skipped; a bad ed25519 key rejects.
    let mut unknown = unsigned.clone();
    unknown["verify_keys"]["curve9:x"] = json!({"key": "???"});
    sign_json(&mut unknown, "domain", &key).expect("signs");
    assert_eq!(
        validate_server_key_response("domain", &unknown, now)
            .expect("valid")
            .len(),
        1
    );
    let mut bad_key = unsigned.clone();
    bad_key["verify_keys"]["ed25519:b"] = json!({"key": "AAAA"});
    sign_json(&mut bad_key, "domain", &key).expect("signs");
    assert!(rejected(&bad_key, "domain"));
    let mut no_ts = unsigned.clone();
    no_ts
        .as_object_mut()
        .expect("object")
        .remove("valid_until_ts");
    sign_json(&mut no_ts, "domain", &key).expect("signs");
    assert!(rejected(&no_ts, "domain"));
}

// --- key files -------------------------------------------------------------

#[test]
fn bad_key_files_are_errors() {
    let table = [
        ("", "empty"),
        ("\n\n  \n", "empty"),
        ("ed25519 1", "fields"),
        ("ed25519 1 abc extra", "fields"),
        (&format!("curve25519 1 {SPEC_SEED_BASE64}"), "algorithm"),
        (&format!("ED25519 1 {SPEC_SEED_BASE64}"), "algorithm"),
        (&format!("ed25519 a-b {SPEC_SEED_BASE64}"), "version"),
        (&format!("ed25519 a:b {SPEC_SEED_BASE64}"), "version"),
        (&format!("ed25519 é {SPEC_SEED_BASE64}"), "version"),
        ("ed25519 1 not*base64", "base64"),
        ("ed25519 1 AAAA", "32"),
        (&format!("ed25519 1 {SPEC_SEED_BASE64}AAAA"), "32"),
    ];
    for (contents, reason_part) in table {
        match ServerSigningKey::parse(contents, "/etc/courier/key") {
            Err(KeyError::Malformed { path, reason }) => {
                assert_eq!(path, "/etc/courier/key");
                assert!(reason.contains(reason_part), "{contents:?}: {reason}");
            }
            other => panic!("{contents:?} gave {other:?}"),
        }
    }
    // Good variants: padded seed, surrounding blank lines, later lines ignored.
    let padded = format!("\n  ed25519 a_1 {SPEC_SEED_BASE64}=  \nignored line\n");
    let key = ServerSigningKey::parse(&padded, "k").expect("parses");
    assert_eq!(key.key_id(), "ed25519:a_1");
    assert_eq!(key.public_key_base64(), SPEC_PUBLIC_KEY);
}

#[test]
fn key_file_load_and_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("signing.key");
    assert!(matches!(
        ServerSigningKey::load(&path),
        Err(KeyError::Io { .. })
    ));
    let key = ServerSigningKey::generate("auto_1");
    std::fs::write(&path, key.to_file_contents()).expect("write");
    let loaded = ServerSigningKey::load(&path).expect("loads");
    assert_eq!(loaded.key_id(), "ed25519:auto_1");
    assert_eq!(loaded.public_key_base64(), key.public_key_base64());
    let contents = key.to_file_contents();
    assert!(contents.starts_with("ed25519 auto_1 ") && contents.ends_with('\n'));
    assert!(!contents.contains('='));
    // Two generated keys differ.
    assert_ne!(
        ServerSigningKey::generate("a").public_key_base64(),
        ServerSigningKey::generate("a").public_key_base64()
    );
    // Signatures from sign_bytes verify.
    let sig = key.sign_bytes(b"hello");
    assert_eq!(
        courier::signing::verify_bytes(b"hello", &sig, &key.verifying_key()),
        Ok(())
    );
}

// --- X-Matrix parsing ------------------------------------------------------

#[test]
fn header_parsing_accepts_compatible_forms() {
    let cases = [
        (
            r#"X-Matrix origin="domain",destination="remote.example",key="ed25519:1",sig="abc""#,
            ("domain", Some("remote.example"), "ed25519:1", "abc"),
        ),
        (
            // Old servers: unquoted values with `:`, no destination.
            "X-Matrix origin=old.example,key=ed25519:1,sig=ABCD==",
            ("old.example", None, "ed25519:1", "ABCD=="),
        ),
        (
            "x-matrix   ORIGIN=\"a.example:8448\" ,\tKey=\"ed25519:a_b\" ,  SIG=\"s\\\"ig\\\\x\", extra=1",
            ("a.example:8448", None, "ed25519:a_b", "s\"ig\\x"),
        ),
        (
            r#"X-MATRIX sig="s",key="k",origin="[::1]:8448",,"#,
            ("[::1]:8448", None, "k", "s"),
        ),
        (
            r#"X-Matrix origin = "domain" , key = "k" , sig = "s" , future="a,b=c""#,
            ("domain", None, "k", "s"),
        ),
    ];
    for (input, (origin, destination, key, sig)) in cases {
        let parsed = XMatrix::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(parsed.origin, origin, "{input}");
        assert_eq!(parsed.destination.as_deref(), destination, "{input}");
        assert_eq!(parsed.key, key, "{input}");
        assert_eq!(parsed.sig, sig, "{input}");
    }
}

#[test]
fn malformed_headers_are_errors() {
    use XMatrixError::*;
    let table: [(&str, XMatrixError); 16] = [
        ("", NotXMatrix),
        ("Bearer abc", NotXMatrix),
        ("X-Matrixorigin=\"a\"", NotXMatrix),
        ("X-Matri", NotXMatrix),
        ("X-Matrix", Missing("origin")),
        (r#"X-Matrix key="k",sig="s""#, Missing("origin")),
        (r#"X-Matrix origin="a",sig="s""#, Missing("key")),
        (r#"X-Matrix origin="a",key="k""#, Missing("sig")),
        (
            r#"X-Matrix origin="a",key="k",sig="s"#,
            Malformed(String::new()),
        ),
        (
            r#"X-Matrix origin="a",origin="b",key="k",sig="s""#,
            Malformed(String::new()),
        ),
        (
            r#"X-Matrix origin="bad host!",key="k",sig="s""#,
            Malformed(String::new()),
        ),
        (
            r#"X-Matrix origin="a",key="",sig="s""#,
            Malformed(String::new()),
        ),
        (
            r#"X-Matrix origin="a",key="k",sig="""#,
            Malformed(String::new()),
        ),
        (
            r#"X-Matrix origin="a" x,key="k",sig="s""#,
            Malformed(String::new()),
        ),
        (
            r#"X-Matrix origin,key="k",sig="s""#,
            Malformed(String::new()),
        ),
        (r#"X-Matrix ="a",key="k",sig="s""#, Malformed(String::new())),
    ];
    for (input, expected) in table {
        let result = XMatrix::parse(input);
        match (&result, &expected) {
            (Err(Malformed(_)), Malformed(_)) => {}
            _ => assert_eq!(result, Err(expected), "{input:?}"),
        }
    }
}

#[test]
fn several_authorization_headers() {
    let a = r#"X-Matrix origin="domain",key="ed25519:1",sig="a""#;
    let b = r#"X-Matrix origin="domain",key="ed25519:2",sig="b""#;
    let other = r#"X-Matrix origin="other.example",key="ed25519:1",sig="c""#;
    let parsed = parse_authorization_headers([a, "Bearer xyz", b]).expect("parses");
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[1].key, "ed25519:2");
    assert!(matches!(
        parse_authorization_headers([a, other]),
        Err(XMatrixError::Malformed(_))
    ));
    assert_eq!(
        parse_authorization_headers(["Bearer xyz"]),
        Err(XMatrixError::NotXMatrix)
    );
    assert_eq!(
        parse_authorization_headers(std::iter::empty()),
        Err(XMatrixError::NotXMatrix)
    );
    assert_eq!(
        parse_authorization_headers([a, "X-Matrix key=\"k\",sig=\"s\""]),
        Err(XMatrixError::Missing("origin"))
    );
}

#[test]
fn fuzz_seed_corpus_parses_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/xmatrix_header");
    let mut count = 0;
    let mut accepted = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory exists") {
        let bytes = std::fs::read(entry.expect("dir entry").path()).expect("readable");
        let text = String::from_utf8_lossy(&bytes);
        if XMatrix::parse(&text).is_ok() {
            accepted += 1;
        }
        let _ = parse_authorization_headers(text.lines());
        count += 1;
    }
    assert!(count >= 10, "the seed corpus has {count} files");
    assert!(accepted >= 4, "only {accepted} corpus headers parse");
}

// --- properties ------------------------------------------------------------

fn server_name() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9]{0,8}){0,3}",
            proptest::option::of(1u16..)
        )
            .prop_map(|(host, port)| match port {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }),
        (any::<[u8; 4]>(), proptest::option::of(1u16..)).prop_map(|(ip, port)| {
            let ip = std::net::Ipv4Addr::from(ip);
            port.map_or(ip.to_string(), |p| format!("{ip}:{p}"))
        }),
        any::<[u16; 8]>().prop_map(|ip| format!("[{}]", std::net::Ipv6Addr::from(ip))),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-9007199254740991i64..=9007199254740991).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[\\x00-\\x1f\"\\\\/\\x7f\u{e9}\u{2028}a-z]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Rebuilds `value` with every object's keys inserted in reverse/rotated
/// order; the encoding must not change.
fn reinsert(value: &Value, rotation: usize) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.reverse();
            if !entries.is_empty() {
                let len = entries.len();
                entries.rotate_left(rotation % len);
            }
            let mut out = Map::new();
            for (key, inner) in entries {
                out.insert(key.clone(), reinsert(inner, rotation + 1));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| reinsert(v, rotation)).collect()),
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn header_print_parse_round_trip(
        origin in server_name(),
        destination in proptest::option::of(server_name()),
        key in "[ -~]{1,20}|ed25519:[A-Za-z0-9_]{1,8}|[\"\\\\]{1,4}|\\PC{1,8}",
        sig in "[A-Za-z0-9+/]{86}|[ -~]{1,30}|\\PC{1,10}",
    ) {
        let header = XMatrix { origin, destination, key, sig };
        let printed = header.to_header_value();
        prop_assert_eq!(XMatrix::parse(&printed), Ok(header.clone()));
        prop_assert_eq!(parse_authorization_headers([printed.as_str()]), Ok(vec![header]));
    }

    #[test]
    fn header_parse_never_panics(input in "\\PC*") {
        let _ = XMatrix::parse(&input);
        let _ = parse_authorization_headers([input.as_str(), "X-Matrix origin=a,key=k,sig=s"]);
        let prefixed = format!("X-Matrix {input}");
        let _ = XMatrix::parse(&prefixed);
    }

    #[test]
    fn header_parse_never_panics_on_near_misses(
        input in "(X-Matrix|x-matrix)[ \t]{0,2}([a-zA-Z]{0,7}[ \t]*=?[ \t]*(\"([^\"\\\\]|\\\\.){0,6}\"?|[a-z:=]{0,5})[ \t]*,?){0,5}\\\\?"
    ) {
        let _ = XMatrix::parse(&input);
    }

    #[test]
    fn canonical_encoding_is_independent_of_insertion_order(value in json_value(), rotation in 0usize..5) {
        let original = to_canonical_bytes(&value);
        prop_assert!(original.is_ok());
        prop_assert_eq!(to_canonical_bytes(&reinsert(&value, rotation)), original);
    }

    #[test]
    fn canonical_output_reparses_to_the_same_value(value in json_value()) {
        let bytes = to_canonical_bytes(&value).expect("integers in range encode");
        let reparsed: Value = serde_json::from_slice(&bytes).expect("output is JSON");
        prop_assert_eq!(&reparsed, &value);
        // And it is a fixed point.
        prop_assert_eq!(to_canonical_bytes(&reparsed).expect("encodes"), bytes);
    }

    #[test]
    fn signatures_verify_and_tampering_fails(value in json_value(), seed in any::<[u8; 32]>()) {
        let key = ServerSigningKey::from_seed("p", seed);
        let mut object = json!({"payload": value});
        sign_json(&mut object, "example.org", &key).expect("signs");
        prop_assert_eq!(verify_json(&object, "example.org", "ed25519:p", &key.verifying_key()), Ok(()));
        object["payload"] = json!([object["payload"].clone()]);
        prop_assert_eq!(
            verify_json(&object, "example.org", "ed25519:p", &key.verifying_key()),
            Err(SigningError::BadSignature)
        );
    }
}

/// What Synapse sends for client content holding floats: a request signed
/// over Python canonicaljson's bytes (captured from the interop venv's
/// `encode_canonical_json`). Courier must verify it, and a changed number
/// must still fail.
#[test]
fn requests_signed_over_python_float_forms_verify() {
    use courier::keys::ServerSigningKey;
    use courier::xmatrix::{RequestToSign, verify_request};

    let key = ServerSigningKey::from_seed("1", [7u8; 32]);
    let wire = r#"{"a":[2.5,1e16,1e-5,10.0,1e10,-0.0,1e15,0.0001,123456789.125,1.5e300],"n":7}"#;
    let python = r#"{"a":[2.5,1e+16,1e-05,10.0,10000000000.0,-0.0,1000000000000000.0,0.0001,123456789.125,1.5e+300],"n":7}"#;
    let signed_bytes = format!(
        r#"{{"content":{python},"destination":"us.example","method":"PUT","origin":"them.example","uri":"/_matrix/federation/v1/send/1"}}"#
    );
    let header = courier::xmatrix::XMatrix {
        origin: "them.example".to_owned(),
        destination: Some("us.example".to_owned()),
        key: key.key_id().to_owned(),
        sig: key.sign_bytes(signed_bytes.as_bytes()),
    };
    let content: serde_json::Value = serde_json::from_str(wire).expect("valid JSON");
    let request = |content| RequestToSign {
        method: "PUT",
        uri: "/_matrix/federation/v1/send/1",
        origin: "them.example",
        destination: "us.example",
        content: Some(content),
    };
    verify_request(&header, &request(&content), &key.verifying_key())
        .expect("Python-form signature verifies");

    let mut changed = content.clone();
    changed["a"][0] = serde_json::json!(2.75);
    assert!(verify_request(&header, &request(&changed), &key.verifying_key()).is_err());
    // Our own signature over the same content is made in that same form.
    let ours = courier::xmatrix::sign_request(&key, &request(&content)).expect("signed");
    assert_eq!(ours.sig, header.sig);
}
