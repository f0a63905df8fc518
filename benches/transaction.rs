//! Transaction assembly on the sender's hot path, with the sender's own
//! functions: `federation::sender::transaction::build_body` concatenating 100 stored
//! `m.direct_to_device` EDU strings (as the outbox holds them) into a
//! `PUT /send` body, and the full preparation of one request two ways:
//! build the body, parse it back and sign the parsed content with
//! `xmatrix::sign_request` (what `federation::outbound::client` did before, and still
//! does for bodies stored by older versions), and build the body and sign
//! the request object assembled around it as it is (what it does now: the
//! body is canonical JSON as built).
//! Throughput is reported in EDUs per second; one EDU here carries one olm
//! message, so EDUs/s is the sender's ceiling in messages/s from assembly
//! alone.
//!
//! Run: `cargo bench --bench transaction`

use std::hint::black_box;

use courier::canonical_json::to_canonical_bytes;
use courier::federation::sender::transaction::build_body;
use courier::keys::ServerSigningKey;
use courier::store::OutboxEdu;
use courier::xmatrix::{RequestToSign, sign_request, sign_signed_bytes};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};

/// EDUs per transaction (the spec maximum, and what a busy queue sends).
const EDUS: usize = 100;

/// One stored EDU: canonical JSON of an `m.direct_to_device` EDU carrying an
/// olm-sized message for one device, like the to-device core packs it.
fn stored_edu(i: usize, ciphertext_bytes: usize) -> OutboxEdu {
    let edu = json!({
        "edu_type": "m.direct_to_device",
        "content": {
            "message_id": format!("m{i:015}"),
            "sender": "@alice:origin.example",
            "type": "m.room.encrypted",
            "messages": {
                format!("@user{i}:remote.example"): {
                    "DEVICEID": {
                        "algorithm": "m.olm.v1.curve25519-aes-sha2",
                        "sender_key": "Yr3VH1aOx0J5JYfd0G4OPD/gaKDY8JX+Vud0Km0fhCU",
                        "ciphertext": {
                            "c3BhbmNrZXlzcGFuY2tleXNwYW5ja2V5": {
                                "type": 1,
                                "body": "A".repeat(ciphertext_bytes),
                            },
                        },
                    },
                },
            },
        },
    });
    let bytes = to_canonical_bytes(&edu).expect("the EDU is canonical JSON");
    OutboxEdu {
        seq: i as i64,
        edu_json: String::from_utf8(bytes).expect("canonical JSON is UTF-8"),
        message_count: 1,
        queued_ts: 1_700_000_000_000,
        refusals: 0,
        device_list: None,
    }
}

fn benches(c: &mut Criterion) {
    let key = ServerSigningKey::from_seed("1", [7; 32]);
    for (label, ciphertext) in [("small_200B", 200), ("olm_1KiB", 1024)] {
        let edus: Vec<OutboxEdu> = (0..EDUS).map(|i| stored_edu(i, ciphertext)).collect();
        let mut group = c.benchmark_group(format!("transaction_{label}"));
        group.throughput(Throughput::Elements(EDUS as u64));
        group.bench_function("build_body_100_edus", |b| {
            b.iter(|| {
                build_body(
                    black_box("origin.example"),
                    1_700_000_000_000,
                    black_box(&edus),
                )
            })
        });
        group.bench_function("build_parse_sign_100_edus", |b| {
            b.iter(|| {
                let body = build_body("origin.example", 1_700_000_000_000, black_box(&edus));
                let content: Value = serde_json::from_str(&body).expect("the body is JSON");
                let header = sign_request(
                    &key,
                    &RequestToSign {
                        method: "PUT",
                        uri: "/_matrix/federation/v1/send/1700000000000-0",
                        origin: "origin.example",
                        destination: "remote.example",
                        content: Some(&content),
                    },
                )
                .expect("signing a JSON body cannot fail");
                black_box((body, header))
            })
        });
        // What the federation client does today: the body is canonical
        // JSON as built, so the signed object is assembled around it.
        group.bench_function("build_sign_as_is_100_edus", |b| {
            b.iter(|| {
                let body = build_body("origin.example", 1_700_000_000_000, black_box(&edus));
                let signed = RequestToSign {
                    method: "PUT",
                    uri: "/_matrix/federation/v1/send/1700000000000-0",
                    origin: "origin.example",
                    destination: "remote.example",
                    content: None,
                }
                .raw_content_bytes(Some(body.as_bytes()));
                let header = sign_signed_bytes(&key, "origin.example", "remote.example", &signed);
                black_box((body, header))
            })
        });
        group.finish();
    }
}

criterion_group!(transaction, benches);
criterion_main!(transaction);
