//! Canonical JSON (SPEC §3.2): the one encoder used for everything Courier
//! signs or verifies.
//!
//! It writes a `serde_json::Value` straight into one `Vec<u8>`: object keys
//! sorted by code point at every level (sorted here, never trusted to the map
//! type, because serde_json's `preserve_order` feature would silently turn
//! its map into insertion order), no whitespace, the exact escaping of the
//! grammar, and integers only in ±(2^53−1). An `f64` that is integral and in
//! range is written as an integer (`-0` → `0`, `1e10` → `10000000000`); any
//! other number is an error, never a lossy rewrite.
//!
//! It does not parse JSON (serde_json does) and does not know about
//! signatures; `signing.rs` uses [`write_canonical_excluding`] to skip the
//! top-level `signatures` and `unsigned` keys without cloning the value.
//!
//! Architecture Invariant: the encoder allocates only the output buffer, plus
//! one key list for an object whose map iterates out of order (which never
//! happens with serde_json's default sorted map).

use serde_json::{Map, Number, Value};

/// The largest integer canonical JSON allows, 2^53 − 1.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;
/// The smallest integer canonical JSON allows, −(2^53 − 1).
pub const MIN_SAFE_INTEGER: i64 = -MAX_SAFE_INTEGER;

/// How numbers outside canonical JSON's integers are written.
///
/// The spec allows only integers in ±(2^53−1). Synapse, the reference peer,
/// accepts floats in client content and signs federation requests over the
/// encoding of Python's `canonicaljson`, which writes a parsed float as
/// Python's `repr` (`2.5`, `10000000000.0`, `1e+16`, `1e-05`) and integers of
/// any size verbatim. `Spec` is what Courier produces for everything it
/// signs when the spec form exists; the other two exist so that requests
/// carrying floats interoperate (see `xmatrix::RequestToSign`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberStyle {
    /// SPEC §3.2: integral in-range floats as integers; anything else fails.
    Spec,
    /// Integral in-range floats as integers, other floats as Python's
    /// `repr`, integers verbatim (what Python writes for `-0`, `1e2`, `2.5`
    /// typed as `0`, `100`... only where the spec form exists).
    SpecThenPython,
    /// Every float as Python's `repr`, integers verbatim: Python's
    /// `canonicaljson` over the same parsed value.
    Python,
}

/// Why a value has no canonical encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalJsonError {
    #[error("number {0} is not an integer in ±(2^53−1)")]
    BadNumber(String),
}

/// Encodes `value` as canonical JSON bytes.
pub fn to_canonical_bytes(value: &Value) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out)?;
    Ok(out)
}

/// Encodes `value` as a canonical JSON string.
pub fn to_canonical_string(value: &Value) -> Result<String, CanonicalJsonError> {
    let bytes = to_canonical_bytes(value)?;
    Ok(String::from_utf8(bytes).expect("the encoder writes only UTF-8 from &str and ASCII"))
}

/// Appends the canonical encoding of `value` to `out`. On error `out` holds a
/// partial encoding; callers discard it.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalJsonError> {
    write_canonical_with(value, NumberStyle::Spec, out)
}

/// Encodes `value` with the given number style.
pub fn to_canonical_bytes_with(
    value: &Value,
    style: NumberStyle,
) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut out = Vec::with_capacity(256);
    write_canonical_with(value, style, &mut out)?;
    Ok(out)
}

/// Whether `value` holds a number that the spec form writes differently
/// from Python's `canonicaljson` (any float, or an integer out of range).
pub fn has_non_spec_numbers(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.is_f64() || canonical_integer(number).is_err(),
        Value::Array(items) => items.iter().any(has_non_spec_numbers),
        Value::Object(map) => map.values().any(has_non_spec_numbers),
        _ => false,
    }
}

/// Appends the encoding of `value` with the given number style.
pub fn write_canonical_with(
    value: &Value,
    style: NumberStyle,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalJsonError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(number, style, out)?,
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical_with(item, style, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(map, &[], style, out)?,
    }
    Ok(())
}

/// Appends the canonical encoding of the object `map` without the top-level
/// keys in `excluded` (nested keys of the same name stay). Signing uses this
/// with `["signatures", "unsigned"]`.
pub fn write_canonical_excluding(
    map: &Map<String, Value>,
    excluded: &[&str],
    out: &mut Vec<u8>,
) -> Result<(), CanonicalJsonError> {
    write_object(map, excluded, NumberStyle::Spec, out)
}

/// Appends `text` as a canonical JSON string literal (quotes included).
pub fn write_string(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(text.len() + 2);
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut run_start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        // Every byte of a multi-byte UTF-8 sequence is >= 0x80, so a byte scan
        // never splits a character.
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[run_start..index]);
        out.extend_from_slice(escape);
        run_start = index + 1;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

/// Checks that `number` is allowed in canonical JSON and returns it as an
/// integer.
pub fn canonical_integer(number: &Number) -> Result<i64, CanonicalJsonError> {
    let bad = || CanonicalJsonError::BadNumber(number.to_string());
    if let Some(int) = number.as_i64() {
        return if (MIN_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&int) {
            Ok(int)
        } else {
            Err(bad())
        };
    }
    if number.is_u64() {
        // Every u64 that is not an i64 is above 2^63.
        return Err(bad());
    }
    let float = number.as_f64().ok_or_else(bad)?;
    // The range check also rules out NaN and the infinities.
    let in_range = float >= MIN_SAFE_INTEGER as f64 && float <= MAX_SAFE_INTEGER as f64;
    if in_range && float.fract() == 0.0 {
        // Exact: integral and within ±2^53, so the cast loses nothing; -0.0 → 0.
        Ok(float as i64)
    } else {
        Err(bad())
    }
}

fn write_number(
    number: &Number,
    style: NumberStyle,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalJsonError> {
    match (style, canonical_integer(number)) {
        (NumberStyle::Spec, result) => write_integer(result?, out),
        (NumberStyle::SpecThenPython, Ok(int)) => write_integer(int, out),
        (NumberStyle::Python, Ok(int)) if !number.is_f64() => write_integer(int, out),
        _ => match number.as_f64() {
            Some(float) if number.is_f64() => write_python_float(float, number, out)?,
            // An integer outside ±(2^53−1): Python writes it verbatim.
            _ => out.extend_from_slice(number.to_string().as_bytes()),
        },
    }
    Ok(())
}

/// Writes `float` as Python's `repr`: the shortest round-trip digits, fixed
/// notation with at least one fractional digit for exponents −4..=15,
/// otherwise `d.ddde±XX` with at least two exponent digits.
fn write_python_float(
    float: f64,
    number: &Number,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalJsonError> {
    if !float.is_finite() {
        return Err(CanonicalJsonError::BadNumber(number.to_string()));
    }
    // Rust's `{:e}` writes the shortest round-trip digits: `-1.5e-7`, `1e16`.
    let scientific = format!("{float:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .ok_or_else(|| CanonicalJsonError::BadNumber(number.to_string()))?;
    let exponent: i32 = exponent
        .parse()
        .map_err(|_| CanonicalJsonError::BadNumber(number.to_string()))?;
    let negative = mantissa.starts_with('-');
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    if negative {
        out.push(b'-');
    }
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let int_len = exponent as usize + 1;
            if digits.len() <= int_len {
                out.extend_from_slice(&digits);
                out.extend(std::iter::repeat_n(b'0', int_len - digits.len()));
                out.extend_from_slice(b".0");
            } else {
                out.extend_from_slice(&digits[..int_len]);
                out.push(b'.');
                out.extend_from_slice(&digits[int_len..]);
            }
        } else {
            out.extend_from_slice(b"0.");
            out.extend(std::iter::repeat_n(b'0', (-exponent - 1) as usize));
            out.extend_from_slice(&digits);
        }
    } else {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exponent < 0 { b'-' } else { b'+' });
        let magnitude = exponent.unsigned_abs();
        if magnitude < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(magnitude.to_string().as_bytes());
    }
    Ok(())
}

fn write_integer(value: i64, out: &mut Vec<u8>) {
    // |value| < 2^53 < 10^16, so 17 bytes hold the digits and a sign.
    let mut buffer = [0u8; 20];
    let mut position = buffer.len();
    let mut magnitude = value.unsigned_abs();
    loop {
        position -= 1;
        buffer[position] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if value < 0 {
        position -= 1;
        buffer[position] = b'-';
    }
    out.extend_from_slice(&buffer[position..]);
}

fn write_object(
    map: &Map<String, Value>,
    excluded: &[&str],
    style: NumberStyle,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalJsonError> {
    let keep = |key: &str| !excluded.contains(&key);
    // serde_json's default map iterates in byte order already; check that in
    // one pass and sort only when it does not (e.g. `preserve_order`).
    let mut previous: Option<&str> = None;
    let already_sorted = map.keys().all(|key| {
        let ordered = previous.is_none_or(|prev| prev < key.as_str());
        previous = Some(key);
        ordered
    });
    out.push(b'{');
    let mut first = true;
    let mut write_entry = |key: &str, value: &Value, out: &mut Vec<u8>| {
        if !first {
            out.push(b',');
        }
        first = false;
        write_string(key, out);
        out.push(b':');
        write_canonical_with(value, style, out)
    };
    if already_sorted {
        for (key, value) in map.iter().filter(|(key, _)| keep(key)) {
            write_entry(key, value, out)?;
        }
    } else {
        let mut entries: Vec<(&String, &Value)> = map.iter().filter(|(key, _)| keep(key)).collect();
        // `str` ordering is byte order, which for UTF-8 is code point order.
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key, value) in entries {
            write_entry(key, value, out)?;
        }
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_at_the_edges() {
        let out = to_canonical_string(&json!([0, -1, MAX_SAFE_INTEGER, MIN_SAFE_INTEGER]));
        assert_eq!(
            out.as_deref(),
            Ok("[0,-1,9007199254740991,-9007199254740991]")
        );
        assert!(to_canonical_bytes(&json!(MAX_SAFE_INTEGER + 1)).is_err());
        assert!(to_canonical_bytes(&json!(MIN_SAFE_INTEGER - 1)).is_err());
        assert!(to_canonical_bytes(&json!(u64::MAX)).is_err());
        assert!(to_canonical_bytes(&json!(i64::MIN)).is_err());
    }

    /// The bytes Python's canonicaljson wrote for the same values (captured
    /// from the interop venv: `encode_canonical_json(json.loads(...))`).
    #[test]
    fn python_style_matches_python_canonicaljson() {
        let value: Value = serde_json::from_str(
            r#"{"a":[2.5,1e16,1e-5,10.0,1e10,-0.0,1e15,0.0001,123456789.125,1.5e300,-1.5e-7,7]}"#,
        )
        .expect("valid JSON");
        let python = to_canonical_bytes_with(&value, NumberStyle::Python).expect("encodable");
        assert_eq!(
            String::from_utf8(python).expect("utf-8"),
            r#"{"a":[2.5,1e+16,1e-05,10.0,10000000000.0,-0.0,1000000000000000.0,0.0001,123456789.125,1.5e+300,-1.5e-07,7]}"#
        );
        let mixed =
            to_canonical_bytes_with(&value, NumberStyle::SpecThenPython).expect("encodable");
        assert_eq!(
            String::from_utf8(mixed).expect("utf-8"),
            r#"{"a":[2.5,1e+16,1e-05,10,10000000000,0,1000000000000000,0.0001,123456789.125,1.5e+300,-1.5e-07,7]}"#
        );
        assert!(has_non_spec_numbers(&value));
        assert!(!has_non_spec_numbers(
            &serde_json::json!({"a": [1, -2, {"b": 3}]})
        ));
        assert!(has_non_spec_numbers(&serde_json::json!({"a": u64::MAX})));
        let big = to_canonical_bytes_with(&serde_json::json!([u64::MAX]), NumberStyle::Python)
            .expect("ok");
        assert_eq!(big, b"[18446744073709551615]");
    }

    #[test]
    fn floats() {
        assert_eq!(to_canonical_string(&json!(-0.0)).as_deref(), Ok("0"));
        assert_eq!(to_canonical_string(&json!(2.0)).as_deref(), Ok("2"));
        assert_eq!(
            to_canonical_string(&json!(-1e10)).as_deref(),
            Ok("-10000000000")
        );
        assert!(to_canonical_bytes(&json!(1.5)).is_err());
        assert!(to_canonical_bytes(&json!(9007199254740992.0)).is_err());
        assert!(to_canonical_bytes(&json!(1e300)).is_err());
    }

    #[test]
    fn excluding_only_top_level() {
        let value = json!({"a": {"signatures": 1, "unsigned": 2}, "signatures": {}, "unsigned": 3});
        let mut out = Vec::new();
        let map = value.as_object().expect("literal object");
        assert_eq!(
            write_canonical_excluding(map, &["signatures", "unsigned"], &mut out),
            Ok(())
        );
        assert_eq!(out, br#"{"a":{"signatures":1,"unsigned":2}}"#);
    }
}
