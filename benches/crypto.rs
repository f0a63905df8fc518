//! Criterion benches for the federation hot path: canonical JSON and signing
//! of a realistic to-device transaction (50 EDUs), request-signature
//! verification, and X-Matrix header parsing. Timings on shared cores are
//! noisy; use them to compare, not as a gate.

use std::hint::black_box;

use courier::canonical_json::to_canonical_bytes;
use courier::keys::ServerSigningKey;
use courier::signing::{sign_json, verify_json};
use courier::xmatrix::{RequestToSign, XMatrix, sign_request, verify_request};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

/// A `PUT /send` body with 50 `m.direct_to_device` EDUs, each carrying an
/// olm-sized ciphertext for two devices.
fn transaction_body() -> Value {
    let ciphertext = "AwogZ3Vv".repeat(60);
    let edus: Vec<Value> = (0..50)
        .map(|i| {
            json!({
                "edu_type": "m.direct_to_device",
                "content": {
                    "message_id": format!("msg{i:05}xyzzy"),
                    "sender": format!("@user{i}:origin.example"),
                    "type": "m.room.encrypted",
                    "messages": {
                        format!("@peer{i}:remote.example"): {
                            "DEVICEAAAA": {
                                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                                "sender_key": "Yr3VH1aOx0J5JYfd0G4OPD/gaKDY8JX+Vud0Km0fhCU",
                                "ciphertext": {
                                    "c3BhbmNrZXlzcGFuY2tleXNwYW5ja2V5": {"type": 0, "body": ciphertext},
                                },
                            },
                            "DEVICEBBBB": {
                                "algorithm": "m.olm.v1.curve25519-aes-sha2",
                                "sender_key": "Yr3VH1aOx0J5JYfd0G4OPD/gaKDY8JX+Vud0Km0fhCU",
                                "ciphertext": {
                                    "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5": {"type": 1, "body": ciphertext},
                                },
                            },
                        },
                    },
                },
            })
        })
        .collect();
    json!({
        "origin": "origin.example",
        "origin_server_ts": 1_700_000_000_000_i64,
        "pdus": [],
        "edus": edus,
    })
}

fn benches(c: &mut Criterion) {
    let key = ServerSigningKey::from_seed("1", [7; 32]);
    let body = transaction_body();
    let request = RequestToSign {
        method: "PUT",
        uri: "/_matrix/federation/v1/send/1700000000000-0",
        origin: "origin.example",
        destination: "remote.example",
        content: Some(&body),
    };
    let header = sign_request(&key, &request).expect("the body is canonical");
    let verify_key = key.verifying_key();
    let header_value = header.to_header_value();

    c.bench_function("canonical_json/transaction_50_edus", |b| {
        b.iter(|| to_canonical_bytes(black_box(&body)).expect("canonical"))
    });
    c.bench_function("sign_request/transaction_50_edus", |b| {
        b.iter(|| sign_request(&key, black_box(&request)).expect("signs"))
    });
    c.bench_function("verify_request/transaction_50_edus", |b| {
        b.iter(|| verify_request(black_box(&header), &request, &verify_key).expect("verifies"))
    });
    let mut signed = json!({"edus": body["edus"].clone(), "origin": "origin.example"});
    sign_json(&mut signed, "origin.example", &key).expect("signs");
    c.bench_function("verify_json/transaction_50_edus", |b| {
        b.iter(|| {
            verify_json(
                black_box(&signed),
                "origin.example",
                "ed25519:1",
                &verify_key,
            )
            .expect("verifies")
        })
    });
    c.bench_function("xmatrix/parse", |b| {
        b.iter(|| XMatrix::parse(black_box(&header_value)).expect("parses"))
    });
}

criterion_group!(crypto, benches);
criterion_main!(crypto);
