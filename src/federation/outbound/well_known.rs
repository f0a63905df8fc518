//! `/.well-known/matrix/server` (SPEC §6.2): what a response means and how
//! long to remember it. Pure functions only: parsing the body, reading
//! `Cache-Control` / `Expires`, and the failure backoff. Fetching and the
//! cache itself live in discovery.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

use crate::identifiers::ServerName;

/// Largest body read (Synapse's limit).
pub const MAX_BODY_BYTES: usize = 50 * 1024;
/// Cache period when the response names none.
pub const DEFAULT_CACHE: Duration = Duration::from_secs(24 * 3600);
/// Longest a valid answer is cached.
pub const MAX_CACHE: Duration = Duration::from_secs(48 * 3600);
/// Shortest a valid answer is cached (so `no-store` does not mean a fetch
/// per connection).
pub const MIN_CACHE: Duration = Duration::from_secs(60);
/// First failure is cached this long, doubling per consecutive failure...
pub const FAILURE_CACHE_INITIAL: Duration = Duration::from_secs(60);
/// ...up to this.
pub const FAILURE_CACHE_MAX: Duration = Duration::from_secs(3600);
/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// The delegated server name of a `.well-known` body, parsed as JSON
/// whatever the Content-Type.
pub fn parse_body(body: &[u8]) -> Result<ServerName, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let server = object
        .get("m.server")
        .ok_or("no m.server")?
        .as_str()
        .ok_or("m.server is not a string")?;
    ServerName::parse(server).map_err(|e| e.to_string())
}

/// How long a valid answer may be cached, from its headers, clamped to
/// [`MIN_CACHE`, `MAX_CACHE`].
pub fn cache_period(headers: &HeaderMap, now: SystemTime) -> Duration {
    let from_headers = cache_control_period(headers).or_else(|| expires_period(headers, now));
    from_headers
        .unwrap_or(DEFAULT_CACHE)
        .clamp(MIN_CACHE, MAX_CACHE)
}

fn cache_control_period(headers: &HeaderMap) -> Option<Duration> {
    let mut max_age = None;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            if directive == "no-store" || directive == "no-cache" {
                return Some(Duration::ZERO);
            }
            if let Some(seconds) = directive.strip_prefix("max-age=") {
                let digits = seconds.trim_matches('"');
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    // Too many digits for a u64 is still "very long": the
                    // clamp to `MAX_CACHE` applies, never an overflow.
                    let n = digits.parse::<u64>().unwrap_or(u64::MAX);
                    max_age = Some(Duration::from_secs(n));
                }
            }
        }
    }
    max_age
}

fn expires_period(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get(http::header::EXPIRES)?.to_str().ok()?;
    // An unparseable Expires means "already expired" (RFC 9111 §5.3).
    let Some(at) = parse_http_date(text) else {
        return Some(Duration::ZERO);
    };
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// How long the `failures`-th consecutive failure is cached.
pub fn failure_period(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FAILURE_CACHE_INITIAL
        .saturating_mul(1 << doublings)
        .min(FAILURE_CACHE_MAX)
}

/// Years an HTTP date may name; anything else is treated as unparseable
/// (a peer's header must never make date arithmetic overflow).
const YEARS: std::ops::RangeInclusive<i64> = 1970..=9999;

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form
/// RFC 9110 lets senders use. Years outside 1970..=9999 give None.
pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    let rest = text.trim().split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    if !YEARS.contains(&year) {
        return None;
    }
    let mut clock = parts.next()?.split(':');
    let hour: u64 = clock.next()?.parse().ok()?;
    let minute: u64 = clock.next()?.parse().ok()?;
    let second: u64 = clock.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if days < 0 {
        return None;
    }
    // With the year bounded none of this can overflow; checked anyway.
    let seconds = u64::try_from(days)
        .ok()?
        .checked_mul(86_400)?
        .checked_add(hour * 3600 + minute * 60 + second)?;
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::strategy::Strategy;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn bodies() {
        assert_eq!(
            parse_body(br#"{"m.server":"delegated.example:1234"}"#)
                .expect("valid")
                .as_str(),
            "delegated.example:1234"
        );
        assert!(parse_body(b"not json").is_err());
        assert!(parse_body(b"[]").is_err());
        assert!(parse_body(br#"{"m.server": 5}"#).is_err());
        assert!(parse_body(br#"{"m.server": "bad name!"}"#).is_err());
        assert!(parse_body(br#"{}"#).is_err());
    }

    #[test]
    fn cache_headers() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(cache_period(&headers(&[]), now), DEFAULT_CACHE);
        assert_eq!(
            cache_period(&headers(&[("cache-control", "public, max-age=3600")]), now),
            Duration::from_secs(3600)
        );
        assert_eq!(
            cache_period(&headers(&[("cache-control", "max-age=999999999")]), now),
            MAX_CACHE
        );
        assert_eq!(
            cache_period(&headers(&[("cache-control", "no-store")]), now),
            MIN_CACHE
        );
        assert_eq!(
            cache_period(
                &headers(&[("expires", "Sun, 06 Nov 1994 10:49:37 GMT")]),
                now
            ),
            Duration::from_secs(7200)
        );
        // max-age wins over Expires.
        assert_eq!(
            cache_period(
                &headers(&[
                    ("expires", "Sun, 06 Nov 1994 10:49:37 GMT"),
                    ("cache-control", "max-age=600")
                ]),
                now
            ),
            Duration::from_secs(600)
        );
        assert_eq!(
            cache_period(&headers(&[("expires", "garbage")]), now),
            MIN_CACHE
        );
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(UNIX_EPOCH)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(1_835_438_400))
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert!(parse_http_date("Fri, 31 Dec 9999 23:59:59 GMT").is_some());
    }

    /// The exact inputs that used to panic (F5): a year so large that
    /// `UNIX_EPOCH + Duration` or the day arithmetic overflowed.
    #[test]
    fn huge_or_negative_years_are_unparseable_not_a_panic() {
        for text in [
            "Mon, 01 Jan 400000000000 00:00:00 GMT",
            "Mon, 01 Jan 300000000000 00:00:00 GMT",
            "Mon, 01 Jan 9223372036854775807 23:59:60 GMT",
            "Mon, 01 Jan -9223372036854775808 00:00:00 GMT",
            "Mon, 01 Jan 10000 00:00:00 GMT",
            "Mon, 01 Jan 1969 00:00:00 GMT",
            "Mon, 01 Jan 18446744073709551616 00:00:00 GMT",
        ] {
            assert_eq!(parse_http_date(text), None, "{text}");
        }
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // Through the public entry: an unparseable Expires is "expired".
        assert_eq!(
            cache_period(
                &headers(&[("expires", "Mon, 01 Jan 400000000000 00:00:00 GMT")]),
                now
            ),
            MIN_CACHE
        );
        assert_eq!(
            cache_period(
                &headers(&[("cache-control", "max-age=99999999999999999999999999")]),
                now
            ),
            MAX_CACHE
        );
        assert_eq!(
            cache_period(
                &headers(&[("cache-control", "max-age=18446744073709551615")]),
                now
            ),
            MAX_CACHE
        );
        assert_eq!(
            cache_period(&headers(&[("cache-control", "max-age=-5")]), now),
            DEFAULT_CACHE
        );
        // A far-future (but valid) Expires is clamped.
        assert_eq!(
            cache_period(
                &headers(&[("expires", "Fri, 31 Dec 9999 23:59:59 GMT")]),
                now
            ),
            MAX_CACHE
        );
        // `now` itself at the end of time: no overflow either.
        let late = UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 100);
        assert_eq!(
            cache_period(
                &headers(&[("expires", "Sun, 06 Nov 1994 10:49:37 GMT")]),
                late
            ),
            MIN_CACHE
        );
    }

    proptest::proptest! {
        /// Whatever the headers say, `cache_period` returns a period in
        /// [`MIN_CACHE`, `MAX_CACHE`] and never panics.
        #[test]
        fn cache_period_is_total_over_arbitrary_headers(
            cache_control in proptest::option::of("[ -~]{0,80}"),
            expires in proptest::option::of(proptest::prop_oneof![
                "[ -~]{0,60}",
                (0u32..7, 0u32..40, 0usize..12, proptest::num::i64::ANY, 0u64..100, 0u64..100, 0u64..100)
                    .prop_map(|(wd, d, m, y, h, mi, s)| {
                        let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
                        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
                        format!("{}, {d:02} {} {y} {h:02}:{mi:02}:{s:02} GMT", days[wd as usize], months[m])
                    }),
            ]),
            max_age in proptest::num::u64::ANY,
            now_secs in 0u64..(1u64 << 40),
        ) {
            let mut map = HeaderMap::new();
            if let Some(text) = cache_control.and_then(|t| HeaderValue::from_str(&t).ok()) {
                map.append(http::header::CACHE_CONTROL, text);
            }
            if let Some(text) = expires.and_then(|t| HeaderValue::from_str(&t).ok()) {
                map.append(http::header::EXPIRES, text);
            }
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            let period = cache_period(&map, now);
            proptest::prop_assert!((MIN_CACHE..=MAX_CACHE).contains(&period));
            let mut with_age = map.clone();
            with_age.append(
                http::header::CACHE_CONTROL,
                HeaderValue::from_str(&format!("max-age={max_age}")).expect("digits"),
            );
            let period = cache_period(&with_age, now);
            proptest::prop_assert!((MIN_CACHE..=MAX_CACHE).contains(&period));
        }
    }

    #[test]
    fn failures_back_off_up_to_an_hour() {
        assert_eq!(failure_period(1), Duration::from_secs(60));
        assert_eq!(failure_period(2), Duration::from_secs(120));
        assert_eq!(failure_period(6), Duration::from_secs(1920));
        assert_eq!(failure_period(7), FAILURE_CACHE_MAX);
        assert_eq!(failure_period(u32::MAX), FAILURE_CACHE_MAX);
    }
}
