//! X-Matrix authentication of inbound requests: bodies verified over their
//! raw bytes or through the canonical re-encoding, every way a request can be
//! forged or damaged refused with nothing stored, senders that do not belong
//! to the origin dropped, and the origin deny and allow lists.

use super::{FAKE_ORIGIN, Fixture, alice, bob, sign, to_device_edu, txn_body};
use crate::support::TestRelayOptions;
use courier::keys::ServerSigningKey;
use courier::store::Store;
use courier::xmatrix::RequestToSign;
use serde_json::{Value, json};

/// (case, target sent, `Authorization` values, body sent, expected status).
type Case = (&'static str, String, Vec<String>, Vec<u8>, u16);

/// A header signed by the test origin over `body`'s bytes exactly as given,
/// spliced into the request object as `content` (what a sender that sends
/// canonical JSON signs), for `destination` and `target`.
fn sign_raw(key: &ServerSigningKey, destination: &str, target: &str, body: &[u8]) -> String {
    let request = RequestToSign {
        method: "PUT",
        uri: target,
        origin: FAKE_ORIGIN,
        destination,
        content: None,
    };
    courier::xmatrix::XMatrix {
        origin: FAKE_ORIGIN.to_owned(),
        destination: Some(destination.to_owned()),
        key: key.key_id().to_owned(),
        sig: key.sign_bytes(&request.raw_content_bytes(Some(body))),
    }
    .to_header_value()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_re_encoded_bodies_verify_and_changed_bytes_do_not() {
    let f = Fixture::new().await;
    let us = f.us().to_owned();
    let bob = bob(&f.relay);

    // A canonical body, signed as Courier's sender signs it.
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "canonical",
            json!({ &bob: { "BOBPHONE": {"n": 1} } }),
        )],
        vec![],
    );
    let canonical = courier::canonical_json::to_canonical_bytes(&body).expect("canonical");
    let target = "/_matrix/federation/v1/send/raw-1";
    let reply = f
        .fed
        .send(
            "PUT",
            target,
            &[sign(&f.key, FAKE_ORIGIN, &us, "PUT", target, Some(&body))],
            Some(canonical.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);

    // The same bytes with one byte of a message changed after signing.
    let text = String::from_utf8(canonical).expect("UTF-8");
    let tampered = text.replace(r#"{"n":1}"#, r#"{"n":2}"#);
    assert_ne!(tampered, text);
    let target = "/_matrix/federation/v1/send/raw-2";
    let header = sign_raw(&f.key, &us, target, text.as_bytes());
    let reply = f
        .fed
        .send(
            "PUT",
            target,
            std::slice::from_ref(&header),
            Some(tampered.into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_UNAUTHORIZED");
    // The untouched bytes under the same header verify.
    let reply = f
        .fed
        .send("PUT", target, &[header], Some(text.clone().into_bytes()))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // The same body signed for another uri, and for another destination
    // (the header still naming us): refused.
    let target = "/_matrix/federation/v1/send/raw-3";
    for header in [
        sign_raw(
            &f.key,
            &us,
            "/_matrix/federation/v1/send/raw-4",
            text.as_bytes(),
        ),
        sign_raw(&f.key, "other.example", target, text.as_bytes()).replace(
            "destination=\"other.example\"",
            &format!("destination=\"{us}\""),
        ),
    ] {
        let reply = f
            .fed
            .send("PUT", target, &[header], Some(text.clone().into_bytes()))
            .await;
        assert_eq!(reply.status, 401, "{}", reply.text);
    }
    assert_eq!(
        f.store
            .inbound_txn_response(FAKE_ORIGIN, "raw-3")
            .await
            .expect("readable"),
        None
    );

    // A body that is not canonical (keys out of order, whitespace, an
    // escaped key) signed over its canonical form: verified through the
    // re-encoding, and the message stored without the whitespace.
    let pretty = format!(
        "{{\n  \"pdus\": [],\n  \"origin\": \"{FAKE_ORIGIN}\",\n  \"edus\": [ {{\n    \
         \"content\": {{ \"type\": \"m.room.encrypted\", \"sender\": \"{}\",\n      \
         \"message_id\": \"pretty\",\n      \"mess\\u0061ges\": {{ \"{bob}\": {{ \
         \"BOBLAPTOP\": {{ \"b\": [ 1, 2 ],\n \"a\": \"x y\" }} }} }} }},\n    \
         \"edu_type\": \"m.direct_to_device\" }} ]\n}}\n",
        alice()
    );
    let parsed: Value = serde_json::from_str(&pretty).expect("JSON");
    let target = "/_matrix/federation/v1/send/pretty";
    let reply = f
        .fed
        .send(
            "PUT",
            target,
            &[sign(&f.key, FAKE_ORIGIN, &us, "PUT", target, Some(&parsed))],
            Some(pretty.into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let page = f
        .store
        .fetch_inbox(&bob, "BOBLAPTOP", 0, 10)
        .await
        .expect("inbox readable");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].content_json, r#"{"b":[1,2],"a":"x y"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_damaged_requests_are_refused_and_store_nothing() {
    let f = Fixture::new().await;
    let us = f.us().to_owned();
    let body = txn_body(
        vec![to_device_edu(
            &alice(),
            "forged",
            json!({ bob(&f.relay): { "BOBPHONE": {"secret": true} } }),
        )],
        vec![],
    );
    let bytes = body.to_string().into_bytes();
    let target = "/_matrix/federation/v1/send/t1";
    let good = sign(&f.key, FAKE_ORIGIN, &us, "PUT", target, Some(&body));

    let mut tampered = body.clone();
    tampered["edus"][0]["content"]["messages"][bob(&f.relay)]["BOBPHONE"]["secret"] = json!(false);
    let other_key = ServerSigningKey::from_seed("fake1", [7; 32]);
    let unknown_key = ServerSigningKey::from_seed("nope", [42; 32]);
    let cases: Vec<Case> = vec![
        (
            "tampered body",
            target.to_owned(),
            vec![good.clone()],
            tampered.to_string().into_bytes(),
            401,
        ),
        (
            "tampered uri",
            "/_matrix/federation/v1/send/t2".to_owned(),
            vec![good.clone()],
            bytes.clone(),
            401,
        ),
        (
            "added query",
            format!("{target}?x=1"),
            vec![good.clone()],
            bytes.clone(),
            401,
        ),
        (
            "tampered query",
            format!("{target}?x=2"),
            vec![sign(
                &f.key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                &format!("{target}?x=1"),
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "percent-decoded target",
            "/_matrix/federation/v1/send/a%3Ab".to_owned(),
            vec![sign(
                &f.key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                "/_matrix/federation/v1/send/a:b",
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "wrong method",
            target.to_owned(),
            vec![sign(&f.key, FAKE_ORIGIN, &us, "POST", target, Some(&body))],
            bytes.clone(),
            401,
        ),
        (
            "wrong destination in the header",
            target.to_owned(),
            vec![sign(
                &f.key,
                FAKE_ORIGIN,
                "other.example",
                "PUT",
                target,
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "signed for another destination, header without destination",
            target.to_owned(),
            vec![
                sign(
                    &f.key,
                    FAKE_ORIGIN,
                    "other.example",
                    "PUT",
                    target,
                    Some(&body),
                )
                .replace(",destination=\"other.example\"", ""),
            ],
            bytes.clone(),
            401,
        ),
        (
            "unknown key id",
            target.to_owned(),
            vec![sign(
                &unknown_key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                target,
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "signature by a different key under the trusted key id",
            target.to_owned(),
            vec![sign(
                &other_key,
                FAKE_ORIGIN,
                &us,
                "PUT",
                target,
                Some(&body),
            )],
            bytes.clone(),
            401,
        ),
        (
            "one good and one bad signature",
            target.to_owned(),
            vec![
                good.clone(),
                sign(&other_key, FAKE_ORIGIN, &us, "PUT", target, Some(&body)),
            ],
            bytes.clone(),
            401,
        ),
        (
            "origin not the key's owner",
            target.to_owned(),
            vec![sign(&f.key, "127.0.0.1:2", &us, "PUT", target, Some(&body))],
            bytes.clone(),
            401,
        ),
        (
            "missing header",
            target.to_owned(),
            vec![],
            bytes.clone(),
            401,
        ),
        (
            "another scheme",
            target.to_owned(),
            vec!["Bearer abcdef".to_owned()],
            bytes.clone(),
            401,
        ),
        (
            "garbage X-Matrix header",
            target.to_owned(),
            vec!["X-Matrix garbage".to_owned()],
            bytes.clone(),
            400,
        ),
        (
            "X-Matrix header without sig",
            target.to_owned(),
            vec![format!(
                "X-Matrix origin=\"{FAKE_ORIGIN}\",destination=\"{us}\",key=\"ed25519:fake1\""
            )],
            bytes.clone(),
            400,
        ),
        (
            "garbage signature",
            target.to_owned(),
            vec![format!(
                "X-Matrix origin=\"{FAKE_ORIGIN}\",destination=\"{us}\",key=\"ed25519:fake1\",sig=\"!!!\""
            )],
            bytes.clone(),
            401,
        ),
        (
            "invalid JSON body",
            target.to_owned(),
            vec![good.clone()],
            b"{not json".to_vec(),
            400,
        ),
    ];
    for (case, sent_target, headers, sent_body, expected) in cases {
        let reply = f
            .fed
            .send("PUT", &sent_target, &headers, Some(sent_body))
            .await;
        assert_eq!(reply.status, expected, "{case}: {}", reply.text);
        let errcode = reply.json["errcode"].as_str().unwrap_or_default();
        if case == "invalid JSON body" {
            assert_eq!(errcode, "M_NOT_JSON", "{case}");
        } else {
            assert_eq!(errcode, "M_UNAUTHORIZED", "{case}: {}", reply.text);
        }
        assert!(reply.json["error"].is_string(), "{case}: {}", reply.text);
        for txn in ["t1", "t2", "a:b", "a%3Ab"] {
            f.assert_nothing_stored(txn, case).await;
        }
    }

    // The genuine request still works afterwards, so the refusals above were
    // about the damage, not the setup.
    let reply = f
        .fed
        .send("PUT", target, std::slice::from_ref(&good), Some(bytes))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(f.inbox("BOBPHONE").await.len(), 1);

    // The raw (percent-encoded) target is what is verified.
    let encoded = "/_matrix/federation/v1/send/b%3Ac";
    let body2 = txn_body(vec![], vec![]);
    let auth = sign(&f.key, FAKE_ORIGIN, &us, "PUT", encoded, Some(&body2));
    let reply = f
        .fed
        .send(
            "PUT",
            encoded,
            &[auth],
            Some(body2.to_string().into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_sender_is_dropped_and_its_neighbours_delivered() {
    let f = Fixture::new().await;
    let body = txn_body(
        vec![
            to_device_edu(
                &alice(),
                "before",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "before"} } }),
            ),
            to_device_edu(
                "@mallory:evil.example",
                "spoofed",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "spoofed"} } }),
            ),
            to_device_edu(
                &bob(&f.relay),
                "claims-local",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "local"} } }),
            ),
            json!({"edu_type": "m.typing", "content": {"room_id": "!r:x", "user_id": alice(), "typing": true}}),
            json!({"edu_type": "m.direct_to_device", "content": {"sender": alice()}}),
            to_device_edu(
                &alice(),
                "after",
                json!({ bob(&f.relay): { "BOBPHONE": {"n": "after"} } }),
            ),
        ],
        vec![],
    );
    let reply = f.send_txn("spoof-txn", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let phone = f.inbox("BOBPHONE").await;
    let contents: Vec<&Value> = phone.iter().map(|m| &m["content"]["n"]).collect();
    assert_eq!(contents, vec!["before", "after"], "{phone:?}");
    assert!(phone.iter().all(|m| m["sender"] == alice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_origins_get_403() {
    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str(&format!("origin_deny = [\"{FAKE_ORIGIN}\"]\n"));
    let f = Fixture::with(options).await;
    let reply = f.send_txn("denied", &txn_body(vec![], vec![])).await;
    assert_eq!(reply.status, 403, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_FORBIDDEN");
    f.assert_nothing_stored("denied", "denied origin").await;

    let mut options = TestRelayOptions::default();
    options
        .federation_extra
        .push_str("origin_allow = [\"friend.example\"]\n");
    let f = Fixture::with(options).await;
    let reply = f.send_txn("not-allowed", &txn_body(vec![], vec![])).await;
    assert_eq!(reply.status, 403, "{}", reply.text);
    assert_eq!(reply.json["errcode"], "M_FORBIDDEN");
}
