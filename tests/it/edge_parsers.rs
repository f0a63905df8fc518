//! Every parser that network input reaches, driven with arbitrary input:
//! none panics, and each keeps its contract (a value it accepts is in
//! range; a refusal is the documented error). X-Matrix headers and `/send`
//! bodies have their own property tests and fuzz targets (`tests/it/crypto.rs`,
//! `fuzz/`); `.well-known` cache headers and `Retry-After` are covered in
//! `tests/it/discovery.rs` and the sender's tests. This file holds the rest:
//! server names and their normalized form, user IDs, `since` tokens, integer
//! query parameters, the X-Matrix header checks with allow/deny lists, JSON
//! bodies, and remote key documents.

use courier::client_api::extract::int_param;
use courier::federation::inbound::auth::{MAX_XMATRIX_HEADERS, check_headers};
use courier::federation::inbound::json::JsonBody;
use courier::federation::keyring::validate_server_key_response;
use courier::identifiers::{ServerName, UserId};
use courier::todevice::SyncToken;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Server-name-like strings: mostly valid, often not.
fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9.-]{1,30}(:[0-9]{1,6})?\\.?",
        "\\[[0-9a-fA-F:.]{0,45}\\](:[0-9]{0,7})?",
        "[0-9.]{1,20}(:[0-9]{1,8})?",
        "\\PC{0,40}",
    ]
}

/// Arbitrary JSON up to a small depth.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn server_names_normalize_idempotently_and_match_their_own_spellings(raw in name_like()) {
        if let Ok(name) = ServerName::parse(&raw) {
            let normalized = name.normalized();
            // (`1.2.3.4.` is a DNS name whose normalized form reads as an
            // IPv4 literal and so parses no longer: such names are compared
            // as text only.)
            if let Ok(again) = ServerName::parse(&normalized) {
                prop_assert_eq!(again.normalized(), normalized.clone());
                prop_assert!(name.matches_pattern(&normalized));
            }
            prop_assert!(name.matches_pattern(name.as_str()));
            prop_assert!(name.matches_pattern(&name.as_str().to_ascii_uppercase()));
            prop_assert!(!normalized.ends_with(":8448"));
        }
    }

    #[test]
    fn patterns_never_panic(name in name_like(), pattern in name_like()) {
        if let Ok(name) = ServerName::parse(&name) {
            let _ = name.matches_pattern(&pattern);
        }
    }

    #[test]
    fn user_ids_split_at_their_first_colon(raw in "@?\\PC{0,30}(:[a-z0-9.:\\[\\]]{0,20})?") {
        if let Ok(user) = UserId::parse(&raw) {
            prop_assert!(raw.starts_with('@'));
            prop_assert!(ServerName::parse(user.server_name()).is_ok());
            prop_assert_eq!(format!("@{}:{}", user.localpart(), user.server_name()), raw);
        }
    }

    #[test]
    fn since_tokens_are_ours_or_refused(
        raw in "(td_)?[0-9]{0,22}(_[0-9]{0,20})?|\\PC{0,30}",
        n in 0i64..=i64::MAX,
        m in 0i64..=i64::MAX,
    ) {
        if let Some(parsed) = SyncToken::parse(&raw) {
            prop_assert!(parsed.inbox >= 0 && parsed.device_list >= 0);
            prop_assert!(raw.starts_with("td_"));
            // One spelling per position: the token is what `format` writes.
            prop_assert_eq!(parsed.format(), raw);
        }
        let token = SyncToken {
            inbox: n % 1_000_000_000_000_000_000,
            device_list: m % 1_000_000_000_000_000_000,
        };
        prop_assert_eq!(SyncToken::parse(&token.format()), Some(token));
    }

    #[test]
    fn integer_parameters_parse_or_get_invalid_param(raw in "[0-9]{0,25}|-?[0-9]{1,5}|\\PC{0,12}") {
        match int_param("timeout", Some(&raw)) {
            Ok(Some(value)) => prop_assert_eq!(raw.trim().parse::<u64>(), Ok(value)),
            Ok(None) => prop_assert!(false, "Some(raw) never parses to None"),
            Err(error) => prop_assert_eq!(error.errcode, "M_INVALID_PARAM"),
        }
    }

    #[test]
    fn header_checks_never_panic_and_cap_the_headers(
        values in prop::collection::vec(
            prop_oneof![
                "X-Matrix origin=\"[a-zA-Z0-9.:-]{1,20}\",key=\"ed25519:[a-z]{1,3}\",sig=\"[a-z]{1,4}\"",
                "X-Matrix \\PC{0,40}",
                "\\PC{0,40}",
            ],
            0..8,
        ),
        deny in prop::collection::vec(name_like(), 0..3),
    ) {
        let us = ServerName::parse("us.example").expect("valid");
        let bytes: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
        match check_headers(bytes, &us, &[], &deny) {
            Ok((origin, headers)) => {
                prop_assert!(!headers.is_empty());
                prop_assert!(headers.len() <= MAX_XMATRIX_HEADERS);
                prop_assert!(!deny.iter().any(|d| origin.matches_pattern(d)));
            }
            Err(error) => prop_assert!(matches!(error.status.as_u16(), 400 | 401 | 403)),
        }
    }

    #[test]
    fn json_bodies_parse_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let parsed = JsonBody::parse(bytes.clone());
        let reference = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes);
        prop_assert_eq!(parsed.is_ok(), reference.is_ok());
    }

    #[test]
    fn arbitrary_key_documents_are_refused_without_panicking(
        document in json_value(),
        fields in prop::collection::btree_map(
            prop_oneof![
                Just("server_name".to_owned()),
                Just("valid_until_ts".to_owned()),
                Just("verify_keys".to_owned()),
                Just("signatures".to_owned()),
                Just("old_verify_keys".to_owned()),
            ],
            json_value(),
            0..5,
        ),
    ) {
        // Not signed by the server, so never accepted; the point is that
        // no shape of value makes validation panic.
        prop_assert!(validate_server_key_response("s.example", &document, 0).is_err());
        let mut object = serde_json::Map::new();
        object.insert("server_name".to_owned(), json!("s.example"));
        object.extend(fields);
        prop_assert!(validate_server_key_response("s.example", &Value::Object(object), i64::MAX).is_err());
    }
}
