//! The statistics of a benchmark run: one median for every table, chart and
//! ratio, so that they cannot disagree.

use std::collections::BTreeMap;

/// One measurement: metric name -> value.
pub type Sample = BTreeMap<String, f64>;

/// The median of `v` (mean of the middle two for an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median, min and max of one metric over the counted rounds.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The values of `metric` in `samples`, in round order.
pub fn values(samples: &[Sample], metric: &str) -> Vec<f64> {
    samples.iter().filter_map(|s| s.get(metric).copied()).collect()
}

pub fn stat(samples: &[Sample], metric: &str) -> Option<Stat> {
    let v = values(samples, metric);
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Stat { median: median(&v), min, max })
}

/// The median of the per-round ratios `a / b` (the same round index is one
/// pass over the systems, so both ran under the same conditions).
pub fn ratio(a: &[Sample], b: &[Sample], metric: &str) -> Option<f64> {
    let r: Vec<f64> =
        a.iter().zip(b).filter_map(|(x, y)| Some(x.get(metric)? / y.get(metric)?)).filter(|r| r.is_finite()).collect();
    (!r.is_empty()).then(|| median(&r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn ratio_pairs_rounds() {
        let s = |v: f64| Sample::from([("x".to_owned(), v)]);
        let a = [s(2.0), s(6.0), s(3.0)];
        let b = [s(1.0), s(2.0), s(3.0)];
        // Per-round ratios 2, 3, 1: median 2 (not 11/6 ÷ 2).
        assert_eq!(ratio(&a, &b, "x"), Some(2.0));
    }
}
