//! Latency summaries.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a latency sample, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Nearest-rank percentiles of `samples` (empty gives zeros).
    pub fn of(samples: &[Duration]) -> Self {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if us.is_empty() {
                return 0.0;
            }
            let rank = (q * us.len() as f64).ceil() as usize;
            us[rank.clamp(1, us.len()) - 1]
        };
        let mean = if us.is_empty() {
            0.0
        } else {
            us.iter().sum::<f64>() / us.len() as f64
        };
        Self {
            min: pick(0.0),
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
            p999: pick(0.999),
            max: us.last().copied().unwrap_or(0.0),
            mean,
        }
    }
}

/// `85 µs`, `1.25 ms`.
pub fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let sum = Summary::of(&s);
        assert_eq!(sum.p50, 50.0);
        assert_eq!(sum.p99, 99.0);
        assert_eq!(sum.min, 1.0);
        assert_eq!(sum.max, 100.0);
        assert_eq!(Summary::of(&[]).p50, 0.0);
    }
}
