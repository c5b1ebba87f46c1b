//! An online estimate of a backend's call latency as a function of batch size.

use std::time::Duration;

/// Fits `latency ≈ a + b·n` to recent successful calls by exponentially weighted
/// least squares, so the batcher can tell how long a batch of `n` records will take.
///
/// Old samples fade with `decay` per sample, so the fit follows a backend whose
/// speed changes. With too little spread in `n` to see a slope, the estimate is the
/// weighted mean latency for every size.
#[derive(Debug, Clone)]
pub struct LatencyModel {
    decay: f64,
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        LatencyModel::new(0.95)
    }
}

impl LatencyModel {
    /// A model whose samples' weights fade by `decay` (0 < decay ≤ 1) per new sample.
    pub fn new(decay: f64) -> Self {
        LatencyModel {
            decay: decay.clamp(f64::MIN_POSITIVE, 1.0),
            w: 0.0,
            x: 0.0,
            y: 0.0,
            xx: 0.0,
            xy: 0.0,
        }
    }

    /// Adds one call of `items` records that took `latency`.
    pub fn observe(&mut self, items: usize, latency: Duration) {
        let (n, t) = (items as f64, latency.as_secs_f64());
        let d = self.decay;
        self.w = self.w * d + 1.0;
        self.x = self.x * d + n;
        self.y = self.y * d + t;
        self.xx = self.xx * d + n * n;
        self.xy = self.xy * d + n * t;
    }

    /// The weighted variance of the samples' sizes; `None` before any sample.
    fn variance(&self) -> Option<f64> {
        (self.w > 0.0).then(|| {
            let mx = self.x / self.w;
            self.xx / self.w - mx * mx
        })
    }

    /// Whether the samples' sizes vary enough to show how latency grows with size
    /// (a spread of less than ~0.1 item is no spread at all).
    pub fn has_spread(&self) -> bool {
        self.variance().is_some_and(|v| v > 1e-2)
    }

    /// The fitted `(a, b)` in seconds and seconds per item; `None` before any sample.
    pub fn coefficients(&self) -> Option<(f64, f64)> {
        let var = self.variance()?;
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let cov = self.xy / self.w - mx * my;
        if !self.has_spread() {
            return Some((my.max(0.0), 0.0));
        }
        let b = (cov / var).max(0.0);
        let a = (my - b * mx).max(0.0);
        Some((a, b))
    }

    /// The expected latency of a call with `items` records (zero before any sample).
    pub fn estimate(&self, items: usize) -> Duration {
        match self.coefficients() {
            Some((a, b)) => Duration::from_secs_f64((a + b * items as f64).max(0.0)),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    #[test]
    fn recovers_an_affine_cost_model() {
        let mut m = LatencyModel::default();
        for &n in [1usize, 64, 8, 32, 2, 50, 17].iter().cycle().take(60) {
            m.observe(n, ms(20.0 + 0.5 * n as f64));
        }
        let (a, b) = m.coefficients().unwrap();
        assert!((a - 0.020).abs() < 1e-6, "a = {a}");
        assert!((b - 0.0005).abs() < 1e-8, "b = {b}");
        assert!((m.estimate(64).as_secs_f64() - 0.052).abs() < 1e-6);
    }

    #[test]
    fn without_spread_estimates_the_mean() {
        let mut m = LatencyModel::default();
        assert_eq!(m.estimate(10), Duration::ZERO);
        for _ in 0..10 {
            m.observe(64, ms(52.0));
        }
        assert!((m.estimate(1).as_secs_f64() - 0.052).abs() < 1e-9);
        assert!((m.estimate(64).as_secs_f64() - 0.052).abs() < 1e-9);
        assert!(!m.has_spread());
        m.observe(32, ms(36.0));
        assert!(m.has_spread());
    }

    #[test]
    fn follows_a_backend_that_slows_down() {
        let mut m = LatencyModel::default();
        for &n in [1usize, 32, 64].iter().cycle().take(90) {
            m.observe(n, ms(10.0 + 0.1 * n as f64));
        }
        for &n in [1usize, 32, 64].iter().cycle().take(300) {
            m.observe(n, ms(40.0 + 1.0 * n as f64));
        }
        let est = m.estimate(64).as_secs_f64();
        assert!((est - 0.104).abs() < 0.001, "estimate {est}");
    }
}
