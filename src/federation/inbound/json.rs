//! A federation request body kept as the bytes received, once proven to be
//! JSON ([`JsonBody`]), and the helpers that work on such bytes without
//! building a `serde_json::Value` tree.
//!
//! [`JsonBody::parse`] accepts exactly the documents that
//! `serde_json::from_slice::<Value>` accepts (it drives the same parser
//! through `deserialize_any`: UTF-8, escapes, lone surrogates, numbers out of
//! `f64` range and the nesting limit are all judged identically) but
//! allocates nothing per value. Code that holds a [`JsonBody`] may therefore
//! deserialize it with serde_json's lenient skipping paths (`IgnoredAny`,
//! `RawValue`), which do not re-check every string and number.
//!
//! [`minify`] drops the insignificant whitespace of a valid JSON text.

use std::fmt;

use axum::body::Bytes;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Request body bytes that are one valid JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBody(Bytes);

impl JsonBody {
    /// Checks that `bytes` is one JSON value (whitespace around it allowed);
    /// returns the serde_json error otherwise.
    pub fn parse(bytes: impl Into<Bytes>) -> Result<Self, serde_json::Error> {
        let bytes = bytes.into();
        serde_json::from_slice::<Validate>(&bytes)?;
        Ok(JsonBody(bytes))
    }

    /// The bytes as received.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The body as a `Value` tree, for the paths that need one (verifying a
    /// signature over the canonical re-encoding). Cannot fail for a body
    /// that [`JsonBody::parse`] accepted; the error is passed on anyway.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }
}

/// A JSON value read and discarded, judged exactly as `Value` would be.
struct Validate;

impl<'de> Deserialize<'de> for Validate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValidateVisitor)
    }
}

struct ValidateVisitor;

impl<'de> Visitor<'de> for ValidateVisitor {
    type Value = Validate;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_str<E>(self, _: &str) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_unit<E>(self) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_none<E>(self) -> Result<Validate, E> {
        Ok(Validate)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Validate, D::Error> {
        Validate::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Validate, A::Error> {
        while seq.next_element::<Validate>()?.is_some() {}
        Ok(Validate)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Validate, A::Error> {
        // Keys go through the same string parser as values.
        while map.next_key::<Validate>()?.is_some() {
            map.next_value::<Validate>()?;
        }
        Ok(Validate)
    }
}

/// Whether `json` contains a JSON whitespace byte anywhere (inside strings
/// too; only a space can appear there unescaped).
pub fn has_whitespace(json: &str) -> bool {
    // Whole chunks without an early exit, which the compiler vectorizes;
    // this runs over every byte of every message.
    json.as_bytes().chunks(64).any(|chunk| {
        chunk.iter().fold(false, |seen, &b| {
            seen | matches!(b, b' ' | b'\n' | b'\r' | b'\t')
        })
    })
}

/// `json` (a valid JSON text) without whitespace outside strings; strings,
/// numbers and key order are kept byte for byte.
pub fn minify(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut run_start = 0;
    for (index, byte) in json.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if byte == b'"' {
            in_string = true;
        } else if matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
            // Whitespace is ASCII, so `index` is a char boundary.
            out.push_str(&json[run_start..index]);
            run_start = index + 1;
        }
    }
    out.push_str(&json[run_start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `JsonBody::parse` accepts exactly what `Value` accepts.
    #[test]
    fn accepts_what_value_accepts() {
        let deep_ok = format!("{}{}", "[".repeat(127), "]".repeat(127));
        let too_deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        let cases: Vec<&[u8]> = vec![
            b"{}",
            b" {\"a\" : [1, 2.5, -0, 1e300, true, null, \"x\"]} ",
            b"\"\\ud83d\\ude00\"",
            b"\"\\ud800\"",
            b"\"\\udc00x\"",
            b"\"\xff\"",
            b"{\"\xc3\":1}",
            b"1e400",
            b"-1e400",
            b"{\"a\":1,}",
            b"[1,]",
            b"{} {}",
            b"",
            b"{\"a\":\"\t\"}",
            b"\"\\x\"",
            b"01",
            b"{\"a\":1,\"a\":2}",
            b"18446744073709551616",
            deep_ok.as_bytes(),
            too_deep.as_bytes(),
        ];
        for case in cases {
            let by_value = serde_json::from_slice::<Value>(case).is_ok();
            let by_body = JsonBody::parse(case.to_vec()).is_ok();
            assert_eq!(by_value, by_body, "{:?}", String::from_utf8_lossy(case));
        }
    }

    #[test]
    fn minify_keeps_strings_and_drops_the_rest() {
        let text = " {\n\t\"a b\" : [ 1 , \"x \\\" y\\\\\" ],\r\n \"c\": {} } ";
        let small = minify(text);
        assert_eq!(small, r#"{"a b":[1,"x \" y\\"],"c":{}}"#);
        let before: Value = serde_json::from_str(text).expect("json");
        let after: Value = serde_json::from_str(&small).expect("json");
        assert_eq!(before, after);
        assert!(has_whitespace(text));
        assert!(!has_whitespace(r#"{"a":1}"#));
        assert_eq!(minify("{\"é\": 1.50}"), "{\"é\":1.50}");
    }
}
