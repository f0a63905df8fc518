//! Per-origin rate limiting of authenticated inbound federation requests: a
//! token bucket per origin server holding up to rate × burst tokens (the
//! burst window, `RateShape::burst`, 2 s unless configured), refilled at
//! `rate` tokens per second. It is keyed by the *authenticated* origin only,
//! so nobody can spend another server's budget by forging its name.
//!
//! A request that finds the bucket empty is not refused at once: when a
//! token will be there within `RateShape::max_delay` ([`MAX_SHAPING_DELAY`]
//! unless configured), the token is reserved
//! (the bucket goes into debt) and the caller waits that long, so a busy but
//! honest peer is slowed to the rate instead of being bounced for a whole
//! `Retry-After` second. Only a request that would wait longer is refused.
//! The debt bounds how many requests can be waiting: rate × the delay.
//!
//! The map is bounded: when it is full, buckets that have refilled completely
//! (indistinguishable from a fresh bucket) are dropped, and if that is not
//! enough the least recently used half goes. [`admit`] turns a decision
//! into the request's fate: go on now, go on after the wait, or 429
//! `M_LIMIT_EXCEEDED` with the time until the next token (the inbound
//! `/send` route and the client send route both use it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::RateShape;

/// Most origins tracked at once.
const MAX_ORIGINS: usize = 10_000;

/// The longest a request over the rate is held before it is let through,
/// unless configured; one that would have to wait longer is refused.
pub const MAX_SHAPING_DELAY: Duration = RateShape::DEFAULT.max_delay;

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead now.
    Now,
    /// A token is reserved: go ahead after this delay.
    After(Duration),
    /// Refused: a token is this far away.
    Refused(Duration),
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by origin.
pub struct OriginRateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    max_origins: usize,
}

impl Default for OriginRateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl OriginRateLimiter {
    pub fn new() -> Self {
        Self::with_capacity(MAX_ORIGINS)
    }

    /// A limiter tracking at most `max_origins` origins.
    pub fn with_capacity(max_origins: usize) -> Self {
        OriginRateLimiter {
            buckets: Mutex::new(HashMap::new()),
            max_origins: max_origins.max(1),
        }
    }

    /// Takes one token for `origin` at `rate_per_sec` (the bucket holds
    /// rate × `shape.burst`, at least one token). When the bucket is empty
    /// but a token will be there within `shape.max_delay`, the token is
    /// reserved and the answer says how long to wait first. A rate of 0
    /// disables limiting.
    pub fn admit(&self, origin: &str, rate_per_sec: u32, shape: RateShape) -> Admission {
        if rate_per_sec == 0 {
            return Admission::Now;
        }
        let max_delay = shape.max_delay;
        let rate = f64::from(rate_per_sec);
        let capacity = (rate * shape.burst.as_secs_f64()).max(1.0);
        let now = Instant::now();
        let mut buckets = crate::sync::lock(&self.buckets);
        if !buckets.contains_key(origin) && buckets.len() >= self.max_origins {
            evict(&mut buckets, now, rate, capacity, self.max_origins);
        }
        let bucket = buckets.entry(origin.to_owned()).or_insert(Bucket {
            tokens: capacity,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Admission::Now;
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        if wait <= max_delay {
            bucket.tokens -= 1.0;
            Admission::After(wait)
        } else {
            Admission::Refused(wait)
        }
    }

    /// How many origins are tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        crate::sync::lock(&self.buckets).len()
    }
}

/// One token for `key` at `rate_per_sec` from `limiter`: `Ok` now or after
/// a wait of at most `shape.max_delay`, else a 429 `M_LIMIT_EXCEEDED`
/// whose Retry-After is the time until the next token. Counted in
/// `courier_rate_limit_total{outcome="delayed"|"refused"}`.
pub async fn admit(
    limiter: &OriginRateLimiter,
    key: &str,
    rate_per_sec: u32,
    shape: RateShape,
) -> Result<(), crate::error::MatrixError> {
    match limiter.admit(key, rate_per_sec, shape) {
        Admission::Now => Ok(()),
        Admission::After(delay) => {
            metrics::counter!("courier_rate_limit_total", "outcome" => "delayed").increment(1);
            tokio::time::sleep(delay).await;
            Ok(())
        }
        Admission::Refused(wait) => {
            tracing::info!(key, "rate limiting");
            metrics::counter!("courier_rate_limit_total", "outcome" => "refused").increment(1);
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Err(crate::error::MatrixError::limit_exceeded(secs.max(1)))
        }
    }
}

fn evict(
    buckets: &mut HashMap<String, Bucket>,
    now: Instant,
    rate: f64,
    capacity: f64,
    max_origins: usize,
) {
    buckets.retain(|_, bucket| {
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens + elapsed * rate < capacity
    });
    if buckets.len() >= max_origins {
        let mut by_age: Vec<(Instant, String)> = buckets
            .iter()
            .map(|(origin, bucket)| (bucket.last, origin.clone()))
            .collect();
        by_age.sort();
        for (_, origin) in by_age.into_iter().take(max_origins.div_ceil(2)) {
            buckets.remove(&origin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request that may not wait: `Err` is how long until a token.
    fn check(limiter: &OriginRateLimiter, origin: &str, rate: u32) -> Result<(), Duration> {
        let shape = RateShape {
            max_delay: Duration::ZERO,
            ..RateShape::DEFAULT
        };
        match limiter.admit(origin, rate, shape) {
            Admission::Now => Ok(()),
            Admission::After(wait) | Admission::Refused(wait) => Err(wait),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_of_twice_the_rate_then_refill() {
        let limiter = OriginRateLimiter::new();
        for _ in 0..10 {
            assert!(check(&limiter, "a.example", 5).is_ok());
        }
        let wait = check(&limiter, "a.example", 5).expect_err("bucket is empty");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200));
        // Another origin has its own bucket.
        assert!(check(&limiter, "b.example", 5).is_ok());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(check(&limiter, "a.example", 5).is_ok());
        assert!(check(&limiter, "a.example", 5).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_just_over_the_rate_waits_instead_of_being_refused() {
        let limiter = OriginRateLimiter::new();
        let max = Duration::from_millis(500);
        let shape = RateShape {
            burst: Duration::from_secs(2),
            max_delay: max,
        };
        // Rate 10/s: the burst of 20 goes at once.
        for _ in 0..20 {
            assert_eq!(limiter.admit("a.example", 10, shape), Admission::Now);
        }
        // Then tokens are reserved 100 ms apart, while they are within the
        // longest delay: 5 of them (100 … 500 ms).
        let mut waits = Vec::new();
        while let Admission::After(wait) = limiter.admit("a.example", 10, shape) {
            waits.push(wait.as_millis());
        }
        assert_eq!(waits.len(), 5, "{waits:?}");
        for (i, wait) in waits.iter().enumerate() {
            let expected = 100 * (i as u128 + 1);
            assert!(wait.abs_diff(expected) <= 1, "{waits:?}");
        }
        // The next would wait 600 ms: refused, and the refusal reserves
        // nothing.
        match limiter.admit("a.example", 10, shape) {
            Admission::Refused(wait) => assert!(wait > max, "{wait:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(
            limiter.admit("a.example", 10, shape),
            Admission::After(wait) if wait <= max
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_window_sizes_the_bucket() {
        let limiter = OriginRateLimiter::new();
        let shape = |burst_ms| RateShape {
            burst: Duration::from_millis(burst_ms),
            max_delay: Duration::ZERO,
        };
        // 10/s over a 5 s window: 50 at once, then empty.
        for _ in 0..50 {
            assert_eq!(limiter.admit("a.example", 10, shape(5000)), Admission::Now);
        }
        assert!(matches!(
            limiter.admit("a.example", 10, shape(5000)),
            Admission::Refused(_)
        ));
        // A window shorter than one token's worth still holds one token.
        assert_eq!(limiter.admit("b.example", 1, shape(100)), Admission::Now);
        assert!(matches!(
            limiter.admit("b.example", 1, shape(100)),
            Admission::Refused(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_zero_disables_limiting() {
        let limiter = OriginRateLimiter::new();
        for _ in 0..1000 {
            assert!(check(&limiter, "a.example", 0).is_ok());
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded() {
        let limiter = OriginRateLimiter::with_capacity(100);
        for i in 0..1000 {
            // Every origin spends a token, so no bucket is "full" and the
            // least recently used half is evicted when the map fills.
            let _ = check(&limiter, &format!("s{i}.example"), 1);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert!(limiter.tracked() <= 100);
        // A recently limited origin is still remembered.
        assert!(check(&limiter, "s999.example", 1).is_ok());
        assert!(check(&limiter, "s999.example", 1).is_err());
    }
}
