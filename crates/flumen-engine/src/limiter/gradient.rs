use std::time::Duration;

use tokio::time::Instant;

use super::{Cooldown, Sample, SampleOutcome};

/// Settings of the [`Gradient`] controller.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientConfig {
    /// The limit at start. Starting low lets the controller learn the no-load latency
    /// before it can queue calls inside the backend.
    pub initial: usize,
    /// The limit never goes below this.
    pub min: usize,
    /// The limit never goes above this.
    pub max: usize,
    /// How many calls may queue inside the backend, as a fraction of the limit (at
    /// least three quarters of a call): above it the limit shrinks; below half of it, it
    /// grows.
    pub tolerance: f64,
    /// How long a no-load latency is remembered. Baselines are windowed minima over
    /// the last one to two half-windows, so a backend that slows down for good moves
    /// the baseline with it instead of looking overloaded forever.
    pub baseline_window: Duration,
    /// Multiplier on overload or on an abandoned (timed-out) call.
    pub decrease_ratio: f64,
    /// After queueing made the limit shrink, rounds to hold before probing upward
    /// again. Probing costs queueing (a call waiting inside the backend), so near
    /// the backend's capacity the limit spends one round in `probe_after + 2` above it.
    pub probe_after: u32,
}

impl Default for GradientConfig {
    fn default() -> Self {
        GradientConfig {
            initial: 1,
            min: 1,
            max: 256,
            tolerance: 0.1,
            baseline_window: Duration::from_secs(10),
            decrease_ratio: 0.9,
            probe_after: 4,
        }
    }
}

/// The fewest queued calls that count as queueing: a steady three quarters of a call
/// waiting means the limit is above the backend's capacity.
const MIN_QUEUE: f64 = 0.75;

/// Buckets per doubling of the call size: sizes within a bucket differ by < 19 %.
const BUCKETS_PER_OCTAVE: f64 = 4.0;
const BUCKETS: usize = 72;

/// The baseline bucket of a call of `size` (see [`Sample::size`]).
fn bucket(size: u64) -> usize {
    let n = size.max(1) as f64;
    ((n.log2() * BUCKETS_PER_OCTAVE) as usize).min(BUCKETS - 1)
}

/// The samples of one round: the calls sent since the last decision.
#[derive(Debug, Clone, Default)]
struct Round {
    start: Option<Instant>,
    ratios: f64,
    count: usize,
    limit_reached: bool,
}

/// A latency-gradient controller for batched calls.
///
/// Once per round (twice as many clean samples as the limit, all sent after the previous
/// decision) it compares the calls' latency with their no-load latency. By Little's
/// law, `limit × (1 − no_load / observed)` estimates how many calls were waiting
/// inside the backend (Vegas's queue estimate, Gradient2's gradient). Above
/// `max(0.75, tolerance × limit)` queued calls the limit drops by that estimate (by half
/// at most, rounded to the nearest call); below
/// half of it, and only if the limit was reached, it grows by one; in between it holds.
/// After a decrease it holds for [`GradientConfig::probe_after`] rounds before probing
/// upward again, so it spends most of its time at the backend's capacity, not above.
///
/// Changes from Netflix Gradient2 and Vegas, for batching and their known failure modes:
///
/// - **Size-aware baseline.** A call's latency grows with its size, which is not
///   queueing. The no-load latency is kept per size bucket (four per doubling) as a
///   windowed minimum, and each call is compared with its own bucket. The size is
///   the call's tokens when the backend charges by tokens ([`Sample::size`]): a
///   128-word sentence alone takes ten times as long as a 4-word one, and reading
///   that spread as queueing would pin the limit near 1.
/// - **No drifting baseline.** Windowed minima expire (see
///   [`GradientConfig::baseline_window`]) instead of a long-term average that creeps
///   up under sustained queueing.
/// - **Only clean samples.** Latency comes from successful calls only: fast
///   rejections would teach a near-zero baseline. Overload and abandoned calls
///   shrink the limit by `decrease_ratio` at most once per round trip; other failures
///   are ignored. Growth needs the limit to have been reached, so steady timeouts or
///   idleness never grow it.
#[derive(Debug, Clone)]
pub struct Gradient {
    config: GradientConfig,
    limit: usize,
    queue: f64,
    round: Round,
    hold: u32,
    current: Vec<Option<Duration>>,
    previous: Vec<Option<Duration>>,
    window_start: Option<Instant>,
    cooldown: Cooldown,
}

impl Gradient {
    /// A controller starting at `config.initial`.
    pub fn new(config: GradientConfig) -> Self {
        let min = config.min.max(1);
        let max = config.max.max(min);
        let limit = config.initial.clamp(min, max);
        Gradient {
            config: GradientConfig { min, max, ..config },
            limit,
            queue: 0.0,
            round: Round::default(),
            hold: 0,
            current: vec![None; BUCKETS],
            previous: vec![None; BUCKETS],
            window_start: None,
            cooldown: Cooldown::default(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The last round's estimate of calls queued inside the backend.
    pub fn queue_estimate(&self) -> f64 {
        self.queue
    }

    /// The no-load latency remembered for calls of `size` ([`Sample::size`]), if any.
    pub fn baseline(&self, size: u64) -> Option<Duration> {
        let b = bucket(size);
        match (self.current[b], self.previous[b]) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn rotate(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= self.config.baseline_window / 2 {
            self.previous = std::mem::replace(&mut self.current, vec![None; BUCKETS]);
            self.window_start = Some(now);
        }
    }

    fn set_limit(&mut self, now: Instant, limit: f64) {
        self.limit = (limit.round() as usize).clamp(self.config.min, self.config.max);
        self.round = Round {
            start: Some(now),
            ..Round::default()
        };
    }

    /// Feeds one finished call.
    pub fn on_sample(&mut self, now: Instant, sample: &Sample) {
        self.rotate(now);
        match sample.outcome {
            SampleOutcome::Ok => {}
            SampleOutcome::Overloaded | SampleOutcome::Dropped => {
                if self.cooldown.allows(sample) {
                    self.cooldown.mark(now);
                    let decreased = (self.limit as f64 * self.config.decrease_ratio).floor();
                    self.set_limit(now, decreased);
                }
                return;
            }
            SampleOutcome::Failed => return,
        }

        let ratio = sample.ratio_to(self.baseline(sample.size()));
        let slot = &mut self.current[bucket(sample.size())];
        *slot = Some(slot.map_or(sample.rtt, |m| m.min(sample.rtt)));

        // Calls sent before the last decision saw the old limit: they say nothing new.
        if self.round.start.is_some_and(|s| sample.sent_at < s) {
            return;
        }
        self.round.ratios += ratio;
        self.round.count += 1;
        self.round.limit_reached |= sample.limit_reached();
        if self.round.count < 2 * self.limit {
            return;
        }

        let limit = self.limit as f64;
        let mean = self.round.ratios / self.round.count as f64;
        self.queue = (limit * (1.0 - 1.0 / mean)).max(0.0);
        let high = (self.config.tolerance * limit).max(MIN_QUEUE);
        if self.queue > high {
            self.cooldown.mark(now);
            self.hold = self.config.probe_after;
            self.set_limit(now, (limit - self.queue).max(limit / 2.0));
        } else if self.queue < high / 2.0 && self.round.limit_reached && self.hold == 0 {
            self.set_limit(now, limit + 1.0);
        } else {
            self.hold = self.hold.saturating_sub(1);
            self.set_limit(now, limit);
        }
    }
}

impl Sample {
    /// This call's latency relative to a no-load `baseline` (1.0 without one).
    fn ratio_to(&self, baseline: Option<Duration>) -> f64 {
        match baseline {
            Some(b) if !b.is_zero() => self.rtt.as_secs_f64() / b.as_secs_f64(),
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up backend: `k` slots, every call of `n` items takes `a + b·n`; calls
    /// beyond `k` wait in its queue. Returns each call's latency at concurrency `c`
    /// in a steady backlog (the first `k` run at once, the rest wait a full service).
    fn latency_at(c: usize, k: usize, n: usize, i: usize) -> Duration {
        let service = Duration::from_micros(20_000 + 500 * n as u64);
        let waits = (i % c) / k;
        service * (1 + waits as u32)
    }

    fn run(ctrl: &mut Gradient, k: usize, n: usize, calls: usize, t: &mut Instant) -> Vec<usize> {
        let mut limits = Vec::new();
        for i in 0..calls {
            let c = ctrl.limit();
            let rtt = latency_at(c, k, n, i);
            let sent_at = *t;
            *t += rtt / c as u32;
            ctrl.on_sample(
                *t,
                &Sample {
                    sent_at,
                    rtt,
                    items: n,
                    tokens: 0,
                    in_flight: c,
                    limit: c,
                    outcome: SampleOutcome::Ok,
                },
            );
            limits.push(ctrl.limit());
        }
        limits
    }

    #[test]
    fn settles_near_the_slot_count_under_backlog() {
        for k in [1usize, 2, 4, 8] {
            let mut t = Instant::now();
            let mut c = Gradient::new(GradientConfig::default());
            let limits = run(&mut c, k, 64, 2_000, &mut t);
            let tail = &limits[1_000..];
            let (lo, hi) = (tail.iter().min().unwrap(), tail.iter().max().unwrap());
            assert!(
                *lo + 1 >= k && *hi <= k + 1,
                "k = {k}: limit ranged {lo}..={hi}"
            );
        }
    }

    #[test]
    fn batch_size_alone_is_not_queueing() {
        let mut t = Instant::now();
        let mut c = Gradient::new(GradientConfig {
            initial: 4,
            ..GradientConfig::default()
        });
        // Small batches first, then large ones with no queueing at all: the larger
        // latency of larger batches must not shrink the limit.
        for n in [1usize, 2, 4, 8, 16, 32, 64] {
            run(&mut c, 64, n, 50, &mut t);
        }
        assert!(c.limit() >= 4, "limit fell to {}", c.limit());
    }

    /// One record per call whose cost varies 4–128 tokens (seeded), on `k` slots:
    /// each call takes `2 ms + 0.2 ms·tokens` and waits a full service per `k` calls
    /// ahead of it. Returns the limits over the last half.
    fn one_record_calls(k: usize, report_tokens: bool) -> Vec<usize> {
        let mut t = Instant::now();
        let mut c = Gradient::new(GradientConfig::default());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut limits = Vec::new();
        for i in 0..6_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let tokens = 4 + seed % 125;
            let limit = c.limit();
            let service = Duration::from_micros(2_000 + 200 * tokens);
            let rtt = service * (1 + ((i % limit) / k) as u32);
            let sent_at = t;
            t += rtt / limit as u32;
            let sample = Sample {
                sent_at,
                rtt,
                items: 1,
                tokens: if report_tokens { tokens } else { 0 },
                in_flight: limit,
                limit,
                outcome: SampleOutcome::Ok,
            };
            c.on_sample(t, &sample);
            if i >= 3_000 {
                limits.push(c.limit());
            }
        }
        limits
    }

    #[test]
    fn the_cost_of_a_record_is_not_queueing() {
        for k in [4usize, 8] {
            let limits = one_record_calls(k, true);
            let (lo, hi) = (limits.iter().min().unwrap(), limits.iter().max().unwrap());
            assert!(
                *lo + 1 >= k && *hi <= k + 1,
                "k = {k}: limit ranged {lo}..={hi}"
            );
            // Without the tokens, the tenfold spread of latencies reads as queueing.
            let blind = one_record_calls(k, false);
            let mean = blind.iter().sum::<usize>() as f64 / blind.len() as f64;
            assert!(mean < k as f64 / 2.0, "k = {k}: blind mean limit {mean}");
        }
    }

    #[test]
    fn fast_rejections_do_not_poison_the_baseline() {
        let t = Instant::now();
        let mut c = Gradient::new(GradientConfig {
            initial: 10,
            ..GradientConfig::default()
        });
        let mut s = Sample {
            sent_at: t,
            rtt: Duration::from_micros(50),
            items: 8,
            tokens: 0,
            in_flight: 10,
            limit: 10,
            outcome: SampleOutcome::Overloaded,
        };
        c.on_sample(t, &s);
        assert_eq!(c.limit(), 9);
        assert_eq!(c.baseline(8), None);
        s.outcome = SampleOutcome::Failed;
        c.on_sample(t, &s);
        assert_eq!((c.limit(), c.baseline(8)), (9, None));
    }

    #[test]
    fn a_backend_that_slows_for_good_becomes_the_new_baseline() {
        let mut t = Instant::now();
        let mut c = Gradient::new(GradientConfig::default());
        run(&mut c, 2, 64, 300, &mut t);
        let before = c.baseline(64).unwrap();
        // The backend becomes 3× slower for good; after two windows the baseline follows.
        let slow = |c: &mut Gradient, t: &mut Instant| {
            let rtt = before * 3;
            let sent_at = *t;
            *t += rtt;
            c.on_sample(
                *t,
                &Sample {
                    sent_at,
                    rtt,
                    items: 64,
                    tokens: 0,
                    in_flight: 1,
                    limit: c.limit(),
                    outcome: SampleOutcome::Ok,
                },
            );
        };
        for _ in 0..200 {
            slow(&mut c, &mut t);
        }
        assert_eq!(c.baseline(64), Some(before * 3));
        assert!(c.queue_estimate() < 0.5, "queue {}", c.queue_estimate());
    }

    #[test]
    fn buckets_are_a_quarter_octave_wide() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 4);
        assert_eq!(bucket(64), 24);
        assert_ne!(bucket(48), bucket(64));
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }
}
