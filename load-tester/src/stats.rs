//! Measurements: latency histograms, live counters and the per-message ledger.
//!
//! Histograms are HDR histograms kept per connection and merged at the end, so the hot path
//! never shares a lock; only the live counters, read by the progress line, are shared atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram tracks exactly; anything slower is recorded as this. An hour is
/// far beyond any drain or verify timeout, so clamping never hides a real figure.
const MAX_TRACKED: Duration = Duration::from_secs(3600);

/// A latency distribution in microseconds, 3 significant figures.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        let histogram = Histogram::new_with_bounds(1, MAX_TRACKED.as_micros() as u64, 3)
            .expect("the bounds are constants known to be valid");
        Latency { histogram }
    }
}

impl Latency {
    pub fn record(&mut self, latency: Duration) {
        let micros = latency.min(MAX_TRACKED).as_micros() as u64;
        self.histogram.saturating_record(micros.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// Percentiles in milliseconds, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<Percentiles> {
        if self.histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Percentiles {
            p50: ms(self.histogram.value_at_quantile(0.50)),
            p90: ms(self.histogram.value_at_quantile(0.90)),
            p99: ms(self.histogram.value_at_quantile(0.99)),
            max: ms(self.histogram.max()),
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Running totals shared by the connections and read by the progress line.
#[derive(Debug, Default)]
pub struct Counters {
    /// Publishes written to a broker connection.
    pub sent: AtomicU64,
    /// PUBACKs received.
    pub acked: AtomicU64,
    /// Connection outages (dropped or stalled), one per outage.
    pub errors: AtomicU64,
    /// Publishes written more than [`crate::fleet::LATE_AFTER`] after they were due.
    pub late: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Outcome {
    /// Never written to the broker: the run stopped early, or the connection dropped while the
    /// message was still queued. It must not be stored.
    #[default]
    NotSent,
    /// Written, but no PUBACK came (the connection dropped, or the drain timed out). The broker
    /// may or may not have it, so it may be stored at most once.
    Unconfirmed,
    /// Acknowledged by the broker (QoS 1), or written (QoS 0). It must be stored exactly once.
    Confirmed,
}

/// The outcome of every message of one device, indexed by message number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    outcomes: Vec<Outcome>,
}

impl Ledger {
    pub fn new(messages: u64) -> Ledger {
        Ledger {
            outcomes: vec![Outcome::NotSent; messages as usize],
        }
    }

    /// A ledger in which every message was confirmed, as after a clean run.
    pub fn confirmed(messages: u64) -> Ledger {
        Ledger {
            outcomes: vec![Outcome::Confirmed; messages as usize],
        }
    }

    pub fn set(&mut self, k: u64, outcome: Outcome) {
        self.outcomes[k as usize] = outcome;
    }

    pub fn get(&self, k: u64) -> Outcome {
        self.outcomes[k as usize]
    }

    pub fn len(&self) -> u64 {
        self.outcomes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.iter().filter(|&&o| o == outcome).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut latency = Latency::default();
        for ms in 1..=100 {
            latency.record(Duration::from_millis(ms));
        }
        let summary = latency.summary().unwrap();
        assert!((summary.p50 - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99 - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max - 100.0).abs() < 0.1, "{summary:?}");
        assert_eq!(Latency::default().summary(), None);
    }

    #[test]
    fn merged_histograms_count_both_sides() {
        let mut a = Latency::default();
        let mut b = Latency::default();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_secs(7200));
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!(a.summary().unwrap().max >= 3_600_000.0 * 0.999);
    }
}
