//! Fuzz target: arbitrary UTF-8 into the `.well-known` rules, which read a
//! remote server's answer: the first line as an HTTP date, as `Expires`
//! and as `Cache-Control` (through `cache_period`, which must always give
//! a period within its bounds), and the whole input as a body. Any panic
//! is a bug.

#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier::federation::outbound::well_known::{
    MAX_CACHE, MIN_CACHE, cache_period, parse_body, parse_http_date,
};
use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let first = input.lines().next().unwrap_or_default();
    let _ = parse_http_date(first);
    let _ = parse_body(input.as_bytes());
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for name in [header::EXPIRES, header::CACHE_CONTROL] {
        if let Ok(value) = HeaderValue::from_str(first) {
            let mut headers = HeaderMap::new();
            headers.insert(name, value);
            for now in [now, SystemTime::UNIX_EPOCH] {
                let period = cache_period(&headers, now);
                assert!((MIN_CACHE..=MAX_CACHE).contains(&period), "{period:?}");
            }
        }
    }
});
