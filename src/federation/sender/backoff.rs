//! The per-destination retry schedule: a pure function from the retry policy
//! (`federation.retry_*` in config), the number of consecutive failures and a
//! jitter sample to the delay before the next attempt. It keeps no state; the
//! sender persists `failures` and `retry_after` in the store.
//!
//! The schedule has two phases. During the first five minutes of an outage
//! (measured pessimistically, as if every jitter sample had been the
//! shortest) the delay grows exponentially from `initial` but, even with
//! the largest jitter, never past `QUICK_RETURN - SEND_MARGIN` (25 s), so a
//! peer that comes back from a short outage is reached within 30 seconds of
//! its return. After that, the delay keeps
//! growing by `multiplier` from that ceiling up to `max`, and jitter never
//! pushes it above `max`.

use std::time::Duration;

use crate::config::RetryConfig;

/// How long an outage counts as "short" (the promise of the issue).
pub const QUICK_PHASE: Duration = Duration::from_secs(5 * 60);
/// A peer back from a short outage is reached within this time.
pub const QUICK_RETURN: Duration = Duration::from_secs(30);
/// Part of `QUICK_RETURN` reserved for connecting and sending: the next
/// attempt itself starts at most `QUICK_RETURN - SEND_MARGIN` after the
/// peer's return.
pub const SEND_MARGIN: Duration = Duration::from_secs(5);

/// The nominal (jitter-free) delay after `failures` consecutive failures
/// (`failures >= 1`; 0 means no wait).
pub fn nominal_delay(policy: &RetryConfig, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let max = policy.max.as_secs_f64();
    // The quick-phase ceiling, so that even a maximal jitter sample stays
    // within QUICK_RETURN.
    let quick_cap = ((QUICK_RETURN - SEND_MARGIN).as_secs_f64() / (1.0 + policy.jitter)).min(max);
    // The least time the outage can have lasted, given every sample shortest.
    let shrink = 1.0 - policy.jitter;
    let mut delay = policy.initial.as_secs_f64().min(max);
    let mut elapsed_min = 0.0;
    let mut in_quick_phase = true;
    for _ in 1..failures {
        if delay >= max {
            break;
        }
        elapsed_min += delay * shrink;
        if in_quick_phase && elapsed_min >= QUICK_PHASE.as_secs_f64() {
            in_quick_phase = false;
        }
        delay = (delay * policy.multiplier).min(max);
        if in_quick_phase {
            delay = delay.min(quick_cap.max(policy.initial.as_secs_f64().min(max)));
        }
    }
    Duration::from_secs_f64(delay)
}

/// The delay to actually wait: the nominal delay scaled by a jitter sample
/// `unit` in [0, 1) to within ±`jitter`, never above `max`.
pub fn delay(policy: &RetryConfig, failures: u32, unit: f64) -> Duration {
    let nominal = nominal_delay(policy, failures).as_secs_f64();
    let factor = 1.0 + policy.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    Duration::from_secs_f64((nominal * factor).min(policy.max.as_secs_f64()).max(0.0))
}

/// A jitter sample from the thread RNG.
pub fn jitter_sample() -> f64 {
    rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> RetryConfig {
        // The defaults of config.rs (checked against it in the test below).
        RetryConfig {
            initial: Duration::from_secs(2),
            multiplier: 2.0,
            max: Duration::from_secs(600),
            jitter: 0.2,
        }
    }

    #[test]
    fn defaults_match_the_config_defaults() {
        let text = r#"
server_name = "a.example"
signing_key_path = "k"
[federation]
bind = "127.0.0.1:1"
tls_cert = "c"
tls_key = "k"
[client]
bind = "127.0.0.1:2"
[rpc]
bind = "127.0.0.1:3"
secret = "long-enough-secret"
[store]
sqlite = "x"
"#;
        let config = crate::config::Config::from_toml_str(text, "t", std::iter::empty())
            .expect("minimal config is valid");
        assert_eq!(config.federation.retry, defaults());
    }

    #[test]
    fn starts_at_initial_and_grows_exponentially() {
        let p = defaults();
        assert_eq!(nominal_delay(&p, 0), Duration::ZERO);
        assert_eq!(nominal_delay(&p, 1), Duration::from_secs(2));
        assert_eq!(nominal_delay(&p, 2), Duration::from_secs(4));
        assert_eq!(nominal_delay(&p, 3), Duration::from_secs(8));
        assert_eq!(nominal_delay(&p, 4), Duration::from_secs(16));
    }

    #[test]
    fn never_exceeds_the_cap_even_with_jitter() {
        let p = defaults();
        for failures in 0..500 {
            for unit in [0.0, 0.5, 0.999_999, 1.0] {
                assert!(delay(&p, failures, unit) <= p.max, "failures {failures}");
            }
        }
        // Long outages settle at the cap.
        assert_eq!(nominal_delay(&p, 40), p.max);
        assert_eq!(nominal_delay(&p, u32::MAX), p.max);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = defaults();
        let nominal = nominal_delay(&p, 3).as_secs_f64();
        assert!((delay(&p, 3, 0.0).as_secs_f64() - nominal * 0.8).abs() < 1e-9);
        assert!((delay(&p, 3, 0.5).as_secs_f64() - nominal).abs() < 1e-9);
        assert!(delay(&p, 3, 0.999).as_secs_f64() <= nominal * 1.2);
    }

    /// Simulates an outage starting with a failed attempt at t = 0 and the
    /// peer returning at `back`; returns how long after `back` the next
    /// attempt happens. `samples` yields the jitter draws.
    fn wait_after_return(p: &RetryConfig, back: f64, mut samples: impl FnMut() -> f64) -> f64 {
        let mut t = 0.0;
        let mut failures = 0;
        loop {
            if t >= back {
                return t - back;
            }
            failures += 1;
            t += delay(p, failures, samples()).as_secs_f64();
        }
    }

    #[test]
    fn defaults_reach_a_peer_within_30s_of_its_return_after_a_5_minute_outage() {
        let p = defaults();
        let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
        let mut lcg = move || {
            rng_state = rng_state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (rng_state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut worst: f64 = 0.0;
        // Every return time in the first five minutes, in 250 ms steps, with
        // always-shortest, always-longest, alternating and random jitter.
        for step in 0..=(300 * 4) {
            let back = step as f64 / 4.0;
            let mut flip = false;
            let strategies: [&mut dyn FnMut() -> f64; 4] = [
                &mut || 0.0,
                &mut || 0.999_999,
                &mut || {
                    flip = !flip;
                    if flip { 0.0 } else { 0.999_999 }
                },
                &mut lcg,
            ];
            for samples in strategies {
                let wait = wait_after_return(&p, back, samples);
                worst = worst.max(wait);
                let bound = (QUICK_RETURN - SEND_MARGIN).as_secs_f64();
                assert!(wait <= bound, "peer back at {back}s reached {wait}s later");
            }
        }
        assert!(
            worst > 20.0,
            "the check is not vacuous: worst wait {worst}s"
        );
    }

    #[test]
    fn after_long_outages_the_wait_is_bounded_by_the_cap() {
        let p = defaults();
        for hours in [1.0, 6.0, 24.0, 72.0] {
            let back = hours * 3600.0;
            let wait = wait_after_return(&p, back, || 0.999_999);
            assert!(
                wait <= p.max.as_secs_f64(),
                "{hours} h outage: waited {wait}s"
            );
        }
        // After the quick phase the schedule does grow towards the cap.
        let after_quick = (1..200)
            .find(|&n| nominal_delay(&p, n) > Duration::from_secs(25))
            .expect("the schedule leaves the quick phase");
        assert!(nominal_delay(&p, after_quick + 10) == p.max);
    }

    #[test]
    fn small_test_policies_are_plain_exponential() {
        let p = RetryConfig {
            initial: Duration::from_millis(10),
            multiplier: 2.0,
            max: Duration::from_millis(100),
            jitter: 0.0,
        };
        let got: Vec<u128> = (1..7).map(|n| nominal_delay(&p, n).as_millis()).collect();
        assert_eq!(got, vec![10, 20, 40, 80, 100, 100]);
    }
}
