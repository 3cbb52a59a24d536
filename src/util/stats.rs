//! Medians and spreads of per-step timings, with the one warm-up rule used by the trainer's
//! summary, `bench step`, `bench scaling` and `ctseg report`.

use serde::{Deserialize, Serialize};

/// Steps left out as warm-up by the medians of per-step figures, when a run has more than
/// [`WARMUP_MIN_STEPS`] steps.
pub const WARMUP_STEPS: usize = 2;
/// Runs with at most this many steps keep all of them in the medians.
pub const WARMUP_MIN_STEPS: usize = 4;

/// Median and spread of a set of timings.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Interquartile range.
    pub iqr: f64,
}

/// Median (mean of the two middle values for an even count); `None` when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(quantile(&v, 0.5))
}

/// Median of per-step values without the first [`WARMUP_STEPS`] when there are more than
/// [`WARMUP_MIN_STEPS`]; non-finite values are left out. `None` when nothing is left.
pub fn warm_median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.into_iter().collect();
    let skip = if v.len() > WARMUP_MIN_STEPS {
        WARMUP_STEPS
    } else {
        0
    };
    median(v.into_iter().skip(skip).filter(|x| x.is_finite()))
}

/// The [`Spread`] of `times` (NaN fields when empty).
pub fn spread(times: &[f64]) -> Spread {
    let mut s = times.to_vec();
    s.sort_by(f64::total_cmp);
    Spread {
        median: quantile(&s, 0.5),
        min: s.first().copied().unwrap_or(f64::NAN),
        max: s.last().copied().unwrap_or(f64::NAN),
        iqr: quantile(&s, 0.75) - quantile(&s, 0.25),
    }
}

/// The `q`-quantile of sorted values with linear interpolation (NaN when empty).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_warm_median() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
        // Five steps: the first two are warm-up; four or fewer keep everything.
        assert_eq!(warm_median([9.0, 9.0, 1.0, 2.0, 3.0]), Some(2.0));
        assert_eq!(warm_median([9.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(warm_median([9.0, 9.0, f64::NAN, 2.0, 4.0]), Some(3.0));
    }

    #[test]
    fn spread_of_four() {
        let s = spread(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        // Quartiles at positions 0.75 and 2.25 of [1, 2, 3, 4]: 1.75 and 3.25.
        assert_eq!(s.iqr, 1.5);
    }
}
