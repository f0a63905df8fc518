//! The per-destination retry schedule: a pure function from the retry policy
//! (`federation.retry_*` in config), the number of consecutive failures and a
//! jitter sample to the delay before the next attempt. It keeps no state; the
//! sender persists `failures` and `retry_after` in the store.
//!
//! The schedule has two phases. During the first `quick_phase` of an outage
//! (5 min by default, measured pessimistically, as if every jitter sample
//! had been the shortest) the delay grows exponentially from `initial` but,
//! even with the largest jitter, never past `quick_return - send_margin`
//! (4 s by default), so a peer that comes back from a short outage is
//! reached within `quick_return` (5 s) of its return. After that, the delay
//! keeps growing by `multiplier` from that ceiling up to `max`, and jitter
//! never pushes it above `max`. No delay is shorter than `initial` (2 s),
//! jitter included: a dead peer is not tried more often than that. README
//! ("Retry schedule") shows the default schedule as a table.

use std::time::Duration;

use crate::config::RetryConfig;

/// The nominal (jitter-free) delay after `failures` consecutive failures
/// (`failures >= 1`; 0 means no wait).
pub fn nominal_delay(policy: &RetryConfig, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let max = policy.max.as_secs_f64();
    let floor = policy.initial.as_secs_f64().min(max);
    // The quick-phase ceiling, so that even a maximal jitter sample stays
    // within `quick_return - send_margin`.
    let quick_cap = (policy
        .quick_return
        .saturating_sub(policy.send_margin)
        .as_secs_f64()
        / (1.0 + policy.jitter))
        .min(max)
        .max(floor);
    // The least time the outage can have lasted: every sample shortest,
    // but never below the floor `delay` applies.
    let shrink = 1.0 - policy.jitter;
    let quick_phase = policy.quick_phase.as_secs_f64();
    let mut delay = floor;
    let mut elapsed_min = 0.0;
    let mut in_quick_phase = quick_phase > 0.0;
    for _ in 1..failures {
        if delay >= max {
            break;
        }
        elapsed_min += (delay * shrink).max(floor);
        if in_quick_phase && elapsed_min >= quick_phase {
            in_quick_phase = false;
        }
        delay = (delay * policy.multiplier).min(max);
        if in_quick_phase {
            delay = delay.min(quick_cap);
        }
    }
    Duration::from_secs_f64(delay)
}

/// The delay to actually wait: the nominal delay scaled by a jitter sample
/// `unit` in [0, 1) to within ±`jitter`, never below `initial` nor above
/// `max`.
pub fn delay(policy: &RetryConfig, failures: u32, unit: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let max = policy.max.as_secs_f64();
    let nominal = nominal_delay(policy, failures).as_secs_f64();
    let factor = 1.0 + policy.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    Duration::from_secs_f64(
        (nominal * factor)
            .max(policy.initial.as_secs_f64())
            .min(max)
            .max(0.0),
    )
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
            quick_phase: Duration::from_secs(300),
            quick_return: Duration::from_secs(5),
            send_margin: Duration::from_secs(1),
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
        // Then held at (5 s - 1 s) / 1.2 during the quick phase.
        let cap = 4.0 / 1.2;
        for n in 2..50 {
            assert!(
                (nominal_delay(&p, n).as_secs_f64() - cap).abs() < 1e-9,
                "n {n}"
            );
        }
        // A policy with a longer quick return grows exponentially first.
        let slow = RetryConfig {
            quick_return: Duration::from_secs(30),
            send_margin: Duration::from_secs(5),
            ..p
        };
        assert_eq!(nominal_delay(&slow, 2), Duration::from_secs(4));
        assert_eq!(nominal_delay(&slow, 3), Duration::from_secs(8));
        assert_eq!(nominal_delay(&slow, 4), Duration::from_secs(16));
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
        assert_eq!(nominal_delay(&p, 200), p.max);
        assert_eq!(nominal_delay(&p, u32::MAX), p.max);
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let p = defaults();
        let nominal = nominal_delay(&p, 3).as_secs_f64();
        assert!((delay(&p, 3, 0.0).as_secs_f64() - nominal * 0.8).abs() < 1e-9);
        assert!((delay(&p, 3, 0.5).as_secs_f64() - nominal).abs() < 1e-9);
        assert!(delay(&p, 3, 0.999).as_secs_f64() <= nominal * 1.2);
        // The floor: the first delay (2 s nominal) is never shortened.
        assert_eq!(delay(&p, 1, 0.0), p.initial);
        for failures in 1..300 {
            for unit in [0.0, 0.3, 0.999_999] {
                assert!(
                    delay(&p, failures, unit) >= p.initial,
                    "failures {failures}"
                );
            }
        }
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
    fn defaults_reach_a_peer_within_5s_of_its_return_after_a_5_minute_outage() {
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
                let bound = (p.quick_return - p.send_margin).as_secs_f64();
                assert!(wait <= bound, "peer back at {back}s reached {wait}s later");
            }
        }
        assert!(worst > 3.0, "the check is not vacuous: worst wait {worst}s");
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
            .find(|&n| nominal_delay(&p, n) > Duration::from_secs(4))
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
            quick_phase: Duration::from_secs(300),
            quick_return: Duration::from_secs(5),
            send_margin: Duration::from_secs(1),
        };
        let got: Vec<u128> = (1..7).map(|n| nominal_delay(&p, n).as_millis()).collect();
        assert_eq!(got, vec![10, 20, 40, 80, 100, 100]);
    }

    /// The default schedule as README's "Retry schedule" table shows it:
    /// the nominal delay per failure count where it changes, and the least
    /// time the outage has lasted by then (jitter-free).
    #[test]
    fn the_default_schedule_matches_the_documented_table() {
        let p = defaults();
        let mut rows = Vec::new();
        let mut elapsed: f64 = 0.0;
        let mut last: f64 = 0.0;
        for n in 1..200u32 {
            let d = nominal_delay(&p, n).as_secs_f64();
            if (d - last).abs() > 1e-6 {
                rows.push((n, (d * 10.0).round() / 10.0, elapsed.round()));
                last = d;
            }
            elapsed += d;
        }
        let expected = [
            (1, 2.0, 0.0),
            (2, 3.3, 2.0),
            (114, 6.7, 375.0),
            (115, 13.3, 382.0),
            (116, 26.7, 395.0),
            (117, 53.3, 422.0),
            (118, 106.7, 475.0),
            (119, 213.3, 582.0),
            (120, 426.7, 795.0),
            (121, 600.0, 1222.0),
        ];
        assert_eq!(rows, expected);
    }
}
