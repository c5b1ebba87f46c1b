use tokio::time::Instant;

use super::{Cooldown, Sample, SampleOutcome};

/// Settings of the [`Aimd`] controller.
#[derive(Debug, Clone, PartialEq)]
pub struct AimdConfig {
    /// The limit at start.
    pub initial: usize,
    /// The limit never goes below this.
    pub min: usize,
    /// The limit never goes above this.
    pub max: usize,
    /// Multiplier on overload or timeout (0 < ratio < 1).
    pub decrease_ratio: f64,
}

impl Default for AimdConfig {
    fn default() -> Self {
        AimdConfig {
            initial: 1,
            min: 1,
            max: 256,
            decrease_ratio: 0.9,
        }
    }
}

/// Additive increase, multiplicative decrease, driven by explicit overload.
///
/// - A successful call that used the last slot (the limit was binding) adds
///   `1 / limit`: about +1 per round trip of a full window, as in TCP. A limit that
///   is not being reached does not grow, so an idle period cannot inflate it.
/// - An overload answer or an abandoned (timed-out) call multiplies the limit by
///   `decrease_ratio`, at most once per round trip.
/// - Fast rejections carry no latency information and are never used as one.
#[derive(Debug, Clone)]
pub struct Aimd {
    config: AimdConfig,
    limit: f64,
    cooldown: Cooldown,
}

impl Aimd {
    /// A controller starting at `config.initial`.
    pub fn new(config: AimdConfig) -> Self {
        let min = config.min.max(1);
        let max = config.max.max(min);
        let limit = config.initial.clamp(min, max) as f64;
        Aimd {
            config: AimdConfig { min, max, ..config },
            limit,
            cooldown: Cooldown::default(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// Feeds one finished call.
    pub fn on_sample(&mut self, now: Instant, sample: &Sample) {
        match sample.outcome {
            SampleOutcome::Ok if sample.limit_reached() => {
                self.limit = (self.limit + 1.0 / self.limit).min(self.config.max as f64);
            }
            SampleOutcome::Overloaded | SampleOutcome::Dropped if self.cooldown.allows(sample) => {
                let decreased = (self.limit * self.config.decrease_ratio).floor();
                self.limit = decreased.max(self.config.min as f64);
                self.cooldown.mark(now);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(t: Instant, in_flight: usize, limit: usize, outcome: SampleOutcome) -> Sample {
        Sample {
            sent_at: t,
            rtt: Duration::from_millis(20),
            items: 8,
            tokens: 0,
            in_flight,
            limit,
            outcome,
        }
    }

    #[test]
    fn grows_about_one_per_window_only_when_the_limit_binds() {
        let t = Instant::now();
        let mut c = Aimd::new(AimdConfig {
            initial: 4,
            ..AimdConfig::default()
        });
        for _ in 0..10 {
            c.on_sample(t, &sample(t, 2, 4, SampleOutcome::Ok));
        }
        assert_eq!(c.limit(), 4, "an unused limit must not grow");
        // +1/4, +1/4.25, …: five binding samples take 4 to just over 5.
        for _ in 0..5 {
            let l = c.limit();
            c.on_sample(t, &sample(t, l, l, SampleOutcome::Ok));
        }
        assert_eq!(c.limit(), 5);
    }

    #[test]
    fn overload_backs_off_once_per_round_trip() {
        let t0 = Instant::now();
        let mut c = Aimd::new(AimdConfig {
            initial: 20,
            ..AimdConfig::default()
        });
        let t1 = t0 + Duration::from_millis(100);
        // Five overloads from calls sent before the first decrease: one decrease.
        for _ in 0..5 {
            c.on_sample(t1, &sample(t0, 20, 20, SampleOutcome::Overloaded));
        }
        assert_eq!(c.limit(), 18);
        // A call sent after it may decrease again.
        c.on_sample(t1, &sample(t1, 18, 18, SampleOutcome::Dropped));
        assert_eq!(c.limit(), 16);
        // Other failures say nothing about load.
        c.on_sample(t1, &sample(t1, 16, 16, SampleOutcome::Failed));
        assert_eq!(c.limit(), 16);
    }

    #[test]
    fn never_leaves_its_bounds() {
        let mut t = Instant::now();
        let mut c = Aimd::new(AimdConfig {
            initial: 3,
            min: 2,
            max: 5,
            decrease_ratio: 0.5,
        });
        for _ in 0..100 {
            t += Duration::from_millis(1);
            c.on_sample(t, &sample(t, 9, 1, SampleOutcome::Ok));
        }
        assert_eq!(c.limit(), 5);
        for _ in 0..100 {
            t += Duration::from_millis(1);
            c.on_sample(t, &sample(t, 9, 1, SampleOutcome::Overloaded));
        }
        assert_eq!(c.limit(), 2);
    }
}
