//! Fuzz target: arbitrary bytes as the body of
//! `PUT /_matrix/federation/v1/send/{txnId}`, through the same parser the
//! handler uses. The body is network input from a peer, so any panic is a
//! bug; whatever is accepted must respect the transaction limits and answer
//! with a `{"pdus": {...}}` object.

#![no_main]

use courier::federation::inbound::parse_transaction;
use courier::federation::inbound::transaction::{MAX_EDUS, MAX_MESSAGE_ID_CHARS};
use courier::identifiers::ServerName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let origin = ServerName::parse("origin.example").expect("a valid server name");
    let us = ServerName::parse("us.example").expect("a valid server name");
    match parse_transaction(&origin, &us, body) {
        Ok(parsed) => {
            assert!(parsed.edus.len() <= MAX_EDUS);
            for edu in &parsed.edus {
                assert!(edu.message_id.chars().count() <= MAX_MESSAGE_ID_CHARS);
                for message in &edu.messages {
                    assert!(message.user_id.ends_with(":us.example"));
                    assert!(message.sender.ends_with(":origin.example"));
                }
            }
            let response: serde_json::Value =
                serde_json::from_str(&parsed.response_json).expect("the response is JSON");
            assert!(response["pdus"].is_object());
        }
        Err(error) => assert_eq!(error.status.as_u16(), 400),
    }
});
