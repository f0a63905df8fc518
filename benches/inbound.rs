//! The receiving side of `PUT /send` for the largest transaction Courier
//! accepts: 100 `m.direct_to_device` EDUs × 100 recipients (10,000 olm-sized
//! messages, about 3 MB), signed by the sender over canonical JSON. One
//! iteration is what the X-Matrix extractor and the `/send` handler do before
//! the store write: prove the body is JSON, verify the request signature, and
//! turn the body into inbox rows.
//!
//! Run: `cargo bench --bench inbound`

use std::hint::black_box;

use courier::canonical_json::to_canonical_bytes;
use courier::federation::inbound::parse_transaction_value;
use courier::identifiers::ServerName;
use courier::keys::ServerSigningKey;
use courier::xmatrix::{RequestToSign, sign_request, verify_request};
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
    group.bench_function("value_tree_parse_verify", |b| {
        b.iter(|| {
            let value: Value = serde_json::from_slice(black_box(&bytes)).expect("JSON");
            verify_request(
                &header,
                &RequestToSign {
                    method: "PUT",
                    uri: URI,
                    origin: "origin.example",
                    destination: "us.example",
                    content: Some(&value),
                },
                &verify_key,
            )
            .expect("verifies");
            let parsed = parse_transaction_value(&origin, &us, &value).expect("valid");
            assert_eq!(parsed.edus.len(), EDUS);
            parsed
        })
    });
    group.finish();
}

criterion_group!(inbound, benches);
criterion_main!(inbound);
