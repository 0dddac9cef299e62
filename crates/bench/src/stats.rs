//! Latency histograms: recorded concurrently by many session tasks, shipped
//! between load-generator processes as plain JSON, summarised as
//! p50/p99/p99.9/max.

use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest recordable value: one hour in microseconds.
const MAX_MICROS: u64 = 3_600_000_000;
/// Enough shards that two runtime threads rarely meet on one lock.
const SHARDS: usize = 16;

fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// A microsecond histogram many tasks record into at once: each task sticks
/// to one shard (by its session number), so the locks are uncontended.
#[derive(Debug)]
pub(crate) struct Shards {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Shards {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(empty())).collect(),
        }
    }

    pub(crate) fn record(&self, shard: usize, value: Duration) {
        let micros = u64::try_from(value.as_micros())
            .unwrap_or(MAX_MICROS)
            .clamp(1, MAX_MICROS);
        let mut histogram = self.shards[shard % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        histogram.saturating_record(micros);
    }

    pub(crate) fn data(&self) -> HistData {
        let mut merged = empty();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            merged
                .add(&*shard)
                .expect("histograms with equal bounds merge");
        }
        HistData::from_histogram(&merged)
    }
}

/// A histogram as (value, count) pairs: what worker processes send back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HistData {
    pub(crate) buckets: Vec<(u64, u64)>,
}

impl HistData {
    fn from_histogram(histogram: &Histogram<u64>) -> Self {
        Self {
            buckets: histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    fn to_histogram(&self) -> Histogram<u64> {
        let mut histogram = empty();
        for &(value, count) in &self.buckets {
            histogram.saturating_record_n(value.clamp(1, MAX_MICROS), count);
        }
        histogram
    }

    pub(crate) fn merge(&mut self, other: &HistData) {
        let mut histogram = self.to_histogram();
        histogram
            .add(other.to_histogram())
            .expect("histograms with equal bounds merge");
        *self = Self::from_histogram(&histogram);
    }

    pub(crate) fn summary(&self) -> Summary {
        let histogram = self.to_histogram();
        let ms = |micros: u64| micros as f64 / 1000.0;
        Summary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }
    }
}

/// What the report says about one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) mean_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_and_survive_a_round_trip() {
        let shards = Shards::new();
        for i in 1..=1000u64 {
            shards.record(i as usize, Duration::from_micros(i * 10));
        }
        let mut data = shards.data();
        let summary = data.summary();
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 5.0).abs() < 0.05, "{summary:?}");
        data.merge(&shards.data());
        assert_eq!(data.summary().count, 2000);
    }
}
