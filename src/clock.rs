//! The wall clock for the timestamps Courier stores, signs or compares with
//! stored ones: milliseconds since the Unix epoch (`now_ms`). Durations and
//! deadlines use `tokio::time` instead, which tests can pause; HTTP dates
//! (`.well-known` caching) read `SystemTime` where they are parsed.

/// Milliseconds since the Unix epoch, from the system clock (0 if the clock
/// reads before the epoch).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
