//! The receiving side of `PUT /send` for the largest transaction Courier
//! accepts: 100 `m.direct_to_device` EDUs × 100 recipients (10,000 olm-sized
//! messages, about 3 MB), signed by the sender over canonical JSON. One
//! iteration is what the X-Matrix extractor and the `/send` handler do before
//! the store write: prove the body is JSON, verify the request signature, and
//! turn the body into inbox rows.
//!
//! `raw_body` is Courier's path for a body sent as canonical JSON: check the
//! bytes are JSON without a tree, verify over the raw bytes, deserialize
//! borrowed structs. `re_encoded_body` is the same transaction sent with
//! whitespace (as a non-Courier sender might): the raw check fails and the
//! body is parsed into a `Value` and re-encoded as canonical JSON to verify.
//! The `Value`-tree path this replaced (parse, canonical re-encoding, walk
//! the tree, `to_string()` per message) measured 45–47 ms per iteration on the
//! same machine (commit "benches/inbound: ... (baseline)"); `raw_body`
//! measured 13.3 ms and `re_encoded_body` 45–50 ms (it pays the JSON check
//! and a failed raw verification on top of the old path's work).
//!
//! Run: `cargo bench --bench inbound`

use std::hint::black_box;

use axum::body::Bytes;
use axum::http::Method;
use courier::canonical_json::to_canonical_bytes;
use courier::federation::inbound::auth::{VerifiedBy, parse_body, verify_signature};
use courier::federation::inbound::parse_transaction_json;
use courier::identifiers::ServerName;
use courier::keys::ServerSigningKey;
use courier::xmatrix::{RequestToSign, sign_request};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};

const EDUS: usize = 100;
const MESSAGES_PER_EDU: usize = 100;
const URI: &str = "/_matrix/federation/v1/send/1700000000000-0";

/// The body as Courier's sender sends it: canonical JSON.
fn body() -> Vec<u8> {
    let edus: Vec<Value> = (0..EDUS)
        .map(|i| {
            let messages: serde_json::Map<String, Value> = (0..MESSAGES_PER_EDU)
                .map(|j| {
                    (
                        format!("@user{j}:us.example"),
                        json!({ "DEVICEID": {
                            "algorithm": "m.olm.v1.curve25519-aes-sha2",
                            "sender_key": "Yr3VH1aOx0J5JYfd0G4OPD/gaKDY8JX+Vud0Km0fhCU",
                            "ciphertext": {
                                "c3BhbmNrZXlzcGFuY2tleXNwYW5ja2V5": {
                                    "type": 1, "body": "A".repeat(160),
                                },
                            },
                        }}),
                    )
                })
                .collect();
            json!({
                "edu_type": "m.direct_to_device",
                "content": {
                    "message_id": format!("m{i:015}"),
                    "sender": "@alice:origin.example",
                    "type": "m.room.encrypted",
                    "messages": messages,
                },
            })
        })
        .collect();
    let body = json!({
        "origin": "origin.example",
        "origin_server_ts": 1_700_000_000_000_i64,
        "pdus": [],
        "edus": edus,
    });
    to_canonical_bytes(&body).expect("the body is canonical JSON")
}

fn benches(c: &mut Criterion) {
    let key = ServerSigningKey::from_seed("1", [7; 32]);
    let verify_key = key.verifying_key();
    let origin = ServerName::parse("origin.example").expect("valid");
    let us = ServerName::parse("us.example").expect("valid");
    let bytes = body();
    let value: Value = serde_json::from_slice(&bytes).expect("JSON");
    let header = sign_request(
        &key,
        &RequestToSign {
            method: "PUT",
            uri: URI,
            origin: "origin.example",
            destination: "us.example",
            content: Some(&value),
        },
    )
    .expect("signs");
    drop(value);

    let mut group = c.benchmark_group("inbound_100_edus_x_100_messages");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.sample_size(10);
    let request = RequestToSign {
        method: "PUT",
        uri: URI,
        origin: "origin.example",
        destination: "us.example",
        content: None,
    };
    let receive = |bytes: &Bytes, expected: VerifiedBy| {
        let body = parse_body(&Method::PUT, bytes.clone())
            .expect("JSON")
            .expect("a body");
        let mut parsed = None;
        let by = verify_signature(&header, &request, Some(&body), &mut parsed, &verify_key)
            .expect("verifies");
        assert_eq!(by, expected);
        drop(parsed);
        let txn = parse_transaction_json(&origin, &us, &body).expect("valid");
        assert_eq!(txn.edus.len(), EDUS);
        txn
    };
    let canonical = Bytes::from(bytes.clone());
    group.bench_function("raw_body", |b| {
        b.iter(|| receive(black_box(&canonical), VerifiedBy::RawBody))
    });
    // The raw path's three steps alone.
    group.bench_function("step_json_check", |b| {
        b.iter(|| parse_body(&Method::PUT, black_box(&canonical).clone()).expect("JSON"))
    });
    let checked = parse_body(&Method::PUT, canonical.clone())
        .expect("JSON")
        .expect("a body");
    group.bench_function("step_verify_raw", |b| {
        b.iter(|| {
            courier::xmatrix::verify_request_raw(
                &header,
                &request,
                Some(black_box(checked.as_bytes())),
                &verify_key,
            )
            .expect("verifies")
        })
    });
    group.bench_function("step_parse_transaction", |b| {
        b.iter(|| parse_transaction_json(&origin, &us, black_box(&checked)).expect("valid"))
    });
    // The same JSON with a space after every comma: not the signed bytes.
    let spaced = Bytes::from(
        String::from_utf8(bytes.clone())
            .expect("UTF-8")
            .replace(",\"", ", \""),
    );
    group.bench_function("re_encoded_body", |b| {
        b.iter(|| receive(black_box(&spaced), VerifiedBy::Canonical))
    });
    group.finish();
}

criterion_group!(inbound, benches);
criterion_main!(inbound);
