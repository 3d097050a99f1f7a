//! Latency statistics for `sagan-infer --bench`.

use std::time::Duration;

/// Latency summary of repeated runs of one batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencySummary {
    pub runs: usize,
    pub batch: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    /// Images per second over all timed runs (total images / total time), not 1/p50.
    pub images_per_s: f64,
}

impl LatencySummary {
    /// Summarises per-run latencies of batches of `batch` images; `None` without samples.
    pub fn new(samples: &[Duration], batch: usize) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort();
        let total: Duration = sorted.iter().sum();
        Some(Self {
            runs: sorted.len(),
            batch,
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            images_per_s: (sorted.len() * batch) as f64 / total.as_secs_f64().max(1e-12),
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty samples: always one of the measured values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = LatencySummary::new(&samples, 4).unwrap();
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.runs, 100);
        // 400 images in 5.05 s.
        assert!((s.images_per_s - 400.0 / 5.05).abs() < 1e-9);
        let one = LatencySummary::new(&[Duration::from_millis(7)], 1).unwrap();
        assert_eq!((one.p50, one.p99), (Duration::from_millis(7), one.p50));
        assert!(LatencySummary::new(&[], 1).is_none());
    }
}
