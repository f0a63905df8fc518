//! The load generator's bookkeeping, kept free of I/O: the delivery tally
//! (each message id counted once, duplicates flagged) and latency
//! percentiles. Reading CPU time and memory from `/proc` is `procfs.rs`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// Per-message delivery counts, indexed by sequence number.
pub struct Tally {
    counts: Vec<AtomicU8>,
}

/// What recording one arrival found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first time this id arrived.
    First,
    /// It had arrived before.
    Duplicate,
    /// Not an id this run sent.
    Unknown,
}

impl Tally {
    pub fn new(len: usize) -> Tally {
        Tally {
            counts: (0..len).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    pub fn record(&self, seq: u64) -> Arrival {
        let Some(slot) = usize::try_from(seq).ok().and_then(|i| self.counts.get(i)) else {
            return Arrival::Unknown;
        };
        // Saturate rather than wrap: a count only has to tell 0, 1 and more.
        let previous = slot
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u8::MAX);
        if previous == 0 {
            Arrival::First
        } else {
            Arrival::Duplicate
        }
    }

    /// Whether `seq` arrived at least once.
    pub fn arrived(&self, seq: u64) -> bool {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.counts.get(i))
            .is_some_and(|c| c.load(Ordering::Relaxed) > 0)
    }
}

/// Percentiles of a set of latency samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

/// Summarizes samples in microseconds (nearest-rank percentiles); `None`
/// when there are none. Sorts `samples`.
pub fn summarize(samples: &mut [u64]) -> Option<LatencySummary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let n = samples.len();
    let rank = |p: f64| {
        let index = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
        Duration::from_micros(samples[index])
    };
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    Some(LatencySummary {
        count: n,
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: Duration::from_micros(samples[n - 1]),
        mean: Duration::from_micros((sum / n as u128) as u64),
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_each_id_once_and_flags_repeats() {
        let tally = Tally::new(3);
        assert_eq!(tally.record(1), Arrival::First);
        assert_eq!(tally.record(1), Arrival::Duplicate);
        assert_eq!(tally.record(0), Arrival::First);
        assert_eq!(tally.record(3), Arrival::Unknown);
        assert!(tally.arrived(0) && tally.arrived(1) && !tally.arrived(2));
        for _ in 0..300 {
            assert_eq!(tally.record(1), Arrival::Duplicate);
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).rev().collect();
        let s = summarize(&mut samples).expect("non-empty");
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_micros(50));
        assert_eq!(s.p90, Duration::from_micros(90));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        assert_eq!(s.mean, Duration::from_micros(50));
        let one = summarize(&mut [7]).expect("non-empty");
        let seven = Duration::from_micros(7);
        assert_eq!((one.p50, one.p99, one.max), (seven, seven, seven));
        assert_eq!(summarize(&mut []), None);
    }
}
