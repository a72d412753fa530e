//! min / median / p90 / max, computed as scripts/lib/bench.py computes them, so the probe's
//! figures and the other benchmarks' agree.

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(xs: &[f64]) -> Option<Summary> {
        if xs.is_empty() {
            return None;
        }
        let mut s = xs.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Summary {
            n: s.len(),
            min: s[0],
            median: quantile(&s, 0.5),
            p90: quantile(&s, 0.9),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        })
    }

    pub fn to_json(self) -> Value {
        json!({
            "n": self.n,
            "min_ms": round3(self.min),
            "median_ms": round3(self.median),
            "p90_ms": round3(self.p90),
            "max_ms": round3(self.max),
            "mean_ms": round3(self.mean),
        })
    }
}

/// Linear interpolation between closest ranks (numpy's default; `statistics.quantiles`'
/// `inclusive` method). `sorted` must be sorted and non-empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = (sorted.len() - 1) as f64 * q;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("summary");
        assert_eq!(
            (s.n, s.min, s.median, s.max, s.mean),
            (5, 1.0, 3.0, 5.0, 3.0)
        );
        assert!((s.p90 - 4.6).abs() < 1e-9);
        let one = Summary::of(&[7.0]).expect("one");
        assert_eq!((one.median, one.p90), (7.0, 7.0));
        let even = Summary::of(&[1.0, 2.0, 3.0, 4.0]).expect("even");
        assert_eq!(even.median, 2.5);
        assert!(Summary::of(&[]).is_none());
        assert_eq!(round3(1.23456), 1.235);
    }
}
