use std::time::Duration;

use flumen_core::{BackendError, ErrorKind};
use rand::Rng;
use tokio::time::Instant;

/// When and how often failed records are sent again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts per record at most, the first included (1 = no retries). Not
    /// counted, for a record with a deadline (which bounds them instead): overload
    /// answers (the backend asked us to wait: we wait, within the deadline) and
    /// breaker probes. Never counted: the halvings that isolate a poison record
    /// (at most log2 of the batch size). All of them are paid from the budget.
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; it grows by `multiplier` per attempt.
    pub initial_backoff: Duration,
    /// The largest backoff ceiling.
    pub max_backoff: Duration,
    /// Growth of the ceiling per attempt.
    pub multiplier: f64,
    /// Retries may use at most this many tokens per first attempt (0.3: retries are
    /// at most 30 % of recent first sends, plus the floor). A failure rate `f` needs
    /// `f / (1 − f)` retries per record, so 0.3 rides out up to 23 % failures; beyond
    /// that, records wait for the budget (within their deadlines) instead of
    /// multiplying the load…
    pub budget_ratio: f64,
    /// …plus this many per second, so that a quiet stream can still retry and a
    /// record waiting for the budget always gets its turn (values below
    /// [`MIN_REFILL_PER_SEC`] are raised to it)…
    pub budget_min_per_sec: f64,
    /// …and unspent tokens accumulate up to this many at most ("recent" calls only;
    /// at least 1). The budget starts full.
    pub budget_burst: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            budget_ratio: 0.3,
            budget_min_per_sec: 10.0,
            budget_burst: 1_000.0,
        }
    }
}

impl RetryConfig {
    /// Whether an error of `kind` is worth sending again (as is, not split).
    pub fn retryable(kind: ErrorKind) -> bool {
        matches!(
            kind,
            ErrorKind::Transient | ErrorKind::Overloaded | ErrorKind::Timeout
        )
    }

    /// The wait before attempt `failed + 1` after `failed` failed attempts: full
    /// jitter, uniform in `[0, min(initial·multiplier^(failed−1), max)]`, and never
    /// less than the backend's `retry_after`.
    pub fn backoff(
        &self,
        failed: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(failed.saturating_sub(1) as i32);
        let ceiling =
            (self.initial_backoff.as_secs_f64() * exp).min(self.max_backoff.as_secs_f64());
        let jittered = Duration::from_secs_f64(rng.random_range(0.0..=ceiling.max(0.0)));
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }

    /// Whether an attempt that failed with `kind` is free, not counted toward
    /// `max_attempts`: waiting out overload is, for a record with a deadline (which
    /// bounds the waiting instead); without one, `max_attempts` is all that ends it.
    pub fn free_attempt(kind: ErrorKind, has_deadline: bool) -> bool {
        kind == ErrorKind::Overloaded && has_deadline
    }

    /// What becomes of a record whose attempt failed with the retryable `error`,
    /// after `attempts` attempts of which `free` did not count (those
    /// [`free_attempt`](RetryConfig::free_attempt) says are free, and breaker probes): its final failure,
    /// a timeout when its next attempt could not start before `deadline`, or another
    /// attempt at the instant returned (the backoff, never before the backend's
    /// `retry_after`).
    pub fn verdict(
        &self,
        attempts: u32,
        free: u32,
        error: &BackendError,
        deadline: Option<Instant>,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Verdict {
        if attempts.saturating_sub(free) >= self.max_attempts {
            return Verdict::Fail;
        }
        let at = now + self.backoff(attempts, error.retry_after, rng);
        if deadline.is_some_and(|d| at >= d) {
            return Verdict::TimeOut;
        }
        Verdict::RetryAt(at)
    }
}

/// What [`RetryConfig::verdict`] decides for a record whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No attempts left: the record fails with the error.
    Fail,
    /// The deadline would pass before the next attempt could start: the record
    /// times out now rather than then.
    TimeOut,
    /// Send it again at this instant.
    RetryAt(Instant),
}

/// The smallest refill rate of a retry budget: without one, a record waiting for a
/// retry at the end of a stream, with no deadline, would wait forever.
pub const MIN_REFILL_PER_SEC: f64 = 0.1;

/// A token bucket that bounds retries by recent traffic (gRPC retry throttling,
/// Finagle's retry budget): each first attempt deposits `ratio` tokens, time
/// deposits `min_per_sec`, the balance is capped at `burst`, and each re-sent record
/// costs one token. Hence, over any run,
/// `retries ≤ burst + ratio · first_attempts + min_per_sec · elapsed`.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    burst: f64,
    balance: f64,
    last: Option<Instant>,
    first_attempts: u64,
    retries: u64,
    denied: u64,
}

impl RetryBudget {
    /// A full budget with `config`'s parameters.
    pub fn new(config: &RetryConfig) -> Self {
        // Below one token no retry could ever be paid for.
        let burst = config.budget_burst.max(1.0);
        RetryBudget {
            ratio: config.budget_ratio.max(0.0),
            min_per_sec: config.budget_min_per_sec.max(MIN_REFILL_PER_SEC),
            burst,
            balance: burst,
            last: None,
            first_attempts: 0,
            retries: 0,
            denied: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            self.balance = (self.balance + secs * self.min_per_sec).min(self.burst);
        }
        self.last = Some(now);
    }

    /// `n` records are sent for the first time.
    pub fn deposit(&mut self, now: Instant, n: usize) {
        self.refill(now);
        self.first_attempts += n as u64;
        self.balance = (self.balance + self.ratio * n as f64).min(self.burst);
    }

    /// Asks to re-send one record; false when the budget is spent.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.balance >= 1.0 {
            self.balance -= 1.0;
            self.retries += 1;
            true
        } else {
            self.denied += 1;
            false
        }
    }

    /// How many re-sends the budget could pay for now, up to `n`.
    pub fn affordable(&mut self, now: Instant, n: usize) -> usize {
        self.refill(now);
        (self.balance.max(0.0).floor() as usize).min(n)
    }

    /// When the next token will be there without new traffic.
    pub fn next_token_at(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.balance >= 1.0 {
            return now;
        }
        now + Duration::from_secs_f64((1.0 - self.balance) / self.min_per_sec)
    }

    /// Asks to re-send `n` records at once (a hedge); all or nothing.
    pub fn try_withdraw_many(&mut self, now: Instant, n: usize) -> bool {
        self.refill(now);
        if self.balance >= n as f64 {
            self.balance -= n as f64;
            self.retries += n as u64;
            true
        } else {
            self.denied += n as u64;
            false
        }
    }

    /// Records sent for the first time so far.
    pub fn first_attempts(&self) -> u64 {
        self.first_attempts
    }

    /// Re-sends granted so far.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Re-sends refused so far.
    pub fn denied(&self) -> u64 {
        self.denied
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_a_growing_ceiling_and_honours_retry_after() {
        let c = RetryConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for failed in 1..=10u32 {
            let ceiling = (0.05 * 2f64.powi(failed as i32 - 1)).min(5.0);
            let draws: Vec<f64> = (0..200)
                .map(|_| c.backoff(failed, None, &mut rng).as_secs_f64())
                .collect();
            assert!(draws.iter().all(|d| *d <= ceiling + 1e-9));
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            assert!(
                (mean - ceiling / 2.0).abs() < ceiling * 0.15,
                "{failed}: {mean}"
            );
        }
        let wait = Duration::from_secs(2);
        for _ in 0..50 {
            assert!(c.backoff(1, Some(wait), &mut rng) >= wait);
        }
    }

    #[test]
    fn only_transient_overload_and_timeout_are_retried() {
        let yes = [
            ErrorKind::Transient,
            ErrorKind::Overloaded,
            ErrorKind::Timeout,
        ];
        for k in ErrorKind::ALL {
            assert_eq!(RetryConfig::retryable(k), yes.contains(&k), "{k}");
        }
    }

    #[test]
    fn the_verdict_fails_times_out_or_delays_by_attempts_deadline_and_retry_after() {
        let c = RetryConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let now = Instant::now();
        let t = BackendError::transient("502");
        let far = Some(now + Duration::from_secs(60));
        // Attempts left: another one after the jittered backoff.
        for attempts in 1..c.max_attempts {
            match c.verdict(attempts, 0, &t, far, now, &mut rng) {
                Verdict::RetryAt(at) => assert!(at >= now && at <= now + c.max_backoff),
                other => panic!("attempt {attempts}: {other:?}"),
            }
        }
        // The last attempt spent: the record fails, deadline or not…
        assert_eq!(c.verdict(4, 0, &t, far, now, &mut rng), Verdict::Fail);
        assert_eq!(c.verdict(4, 0, &t, None, now, &mut rng), Verdict::Fail);
        // …unless some attempts were free (overload waited out, probes).
        assert!(matches!(
            c.verdict(4, 1, &t, far, now, &mut rng),
            Verdict::RetryAt(_)
        ));
        // A Retry-After that ends past the deadline: time out now, not then.
        let o = BackendError::overloaded("429", Some(Duration::from_secs(2)));
        let soon = Some(now + Duration::from_secs(1));
        assert_eq!(c.verdict(1, 1, &o, soon, now, &mut rng), Verdict::TimeOut);
        assert_eq!(
            c.verdict(1, 1, &o, far, now, &mut rng),
            Verdict::RetryAt(now + Duration::from_secs(2))
        );
        assert_eq!(
            c.verdict(1, 0, &o, None, now, &mut rng),
            Verdict::RetryAt(now + Duration::from_secs(2))
        );
    }

    #[test]
    fn only_overload_with_a_deadline_is_a_free_attempt() {
        for k in ErrorKind::ALL {
            assert_eq!(
                RetryConfig::free_attempt(k, true),
                k == ErrorKind::Overloaded,
                "{k}"
            );
            assert!(!RetryConfig::free_attempt(k, false), "{k}");
        }
    }

    #[test]
    fn the_budget_bounds_retries_by_first_attempts_and_time() {
        let config = RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_sec: 10.0,
            budget_burst: 50.0,
            ..RetryConfig::default()
        };
        let mut b = RetryBudget::new(&config);
        let t0 = Instant::now();
        // A dead backend: every record wants a retry, forever.
        let mut t = t0;
        for _ in 0..1_000 {
            t += Duration::from_millis(10);
            b.deposit(t, 10);
            for _ in 0..10 {
                b.try_withdraw(t);
            }
        }
        let elapsed = t.duration_since(t0).as_secs_f64();
        let bound = 50.0 + 0.2 * b.first_attempts() as f64 + 10.0 * elapsed;
        assert!(b.retries() as f64 <= bound);
        // And it is not merely loose: the budget is what limited it.
        assert!(
            b.retries() as f64 >= bound - 51.0,
            "{} of {bound}",
            b.retries()
        );
        assert!(b.denied() > 0);
    }

    #[test]
    fn an_idle_budget_refills_only_up_to_its_burst() {
        let config = RetryConfig {
            budget_burst: 5.0,
            ..RetryConfig::default()
        };
        let mut b = RetryBudget::new(&config);
        let t = Instant::now() + Duration::from_secs(3_600);
        let granted = (0..20).filter(|_| b.try_withdraw(t)).count();
        assert_eq!(granted, 5);
    }
}
