//! Requests-per-minute and tokens-per-minute limits as token buckets.
//!
//! Providers enforce a per-minute limit over shorter periods too (OpenAI: "60,000
//! requests/minute may be enforced as 1,000 requests/second"), so requests are
//! spread evenly: their bucket holds one second's worth (at least one request),
//! never a minute's burst at the start. Tokens vary so much per request that
//! their bucket holds the whole minute.

use std::time::Duration;

use tokio::time::Instant;

/// One bucket: refilled continuously at `per_minute`, holding at most `capacity`,
/// starting full.
#[derive(Debug, Clone)]
struct Bucket {
    per_minute: f64,
    capacity: f64,
    level: f64,
    last: Option<Instant>,
}

impl Bucket {
    /// Holds a whole minute's worth.
    fn new(per_minute: u32) -> Self {
        Self::holding(per_minute, f64::from(per_minute))
    }

    /// Holds one second's worth, at least one.
    fn per_second(per_minute: u32) -> Self {
        Self::holding(per_minute, (f64::from(per_minute) / 60.0).max(1.0))
    }

    fn holding(per_minute: u32, capacity: f64) -> Self {
        Bucket {
            per_minute: f64::from(per_minute),
            capacity,
            level: capacity,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            self.level = (self.level + secs * self.per_minute / 60.0).min(self.capacity);
        }
        self.last = Some(now);
    }

    /// When `amount` will be available (now if it is). An amount above the
    /// capacity waits for a full bucket: it is let through alone.
    fn ready_at(&mut self, now: Instant, amount: f64) -> Instant {
        self.refill(now);
        let need = amount.min(self.capacity);
        if self.level >= need {
            return now;
        }
        now + Duration::from_secs_f64((need - self.level) * 60.0 / self.per_minute)
    }

    fn take(&mut self, amount: f64) {
        self.level -= amount.min(self.capacity);
    }
}

/// The account's limits: a request bucket and a token bucket.
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl RateLimits {
    /// Limits of `rpm` requests and `tpm` tokens per minute (`None`: unlimited).
    pub fn new(rpm: Option<u32>, tpm: Option<u32>) -> Self {
        RateLimits {
            requests: rpm.map(Bucket::per_second),
            tokens: tpm.map(Bucket::new),
        }
    }

    /// Takes one request of `tokens` if both buckets allow it now; otherwise takes
    /// nothing and says when to ask again.
    pub fn try_acquire(&mut self, now: Instant, tokens: u64) -> Result<(), Instant> {
        let t = tokens as f64;
        let at = [
            self.requests.as_mut().map(|b| b.ready_at(now, 1.0)),
            self.tokens.as_mut().map(|b| b.ready_at(now, t)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(now);
        if at > now {
            return Err(at);
        }
        if let Some(b) = self.requests.as_mut() {
            b.take(1.0);
        }
        if let Some(b) = self.tokens.as_mut() {
            b.take(t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_pace_requests_evenly() {
        let t0 = Instant::now();
        // 60 a minute: one at once, then one a second.
        let mut l = RateLimits::new(Some(60), None);
        assert_eq!(l.try_acquire(t0, 10), Ok(()));
        assert_eq!(l.try_acquire(t0, 10), Err(t0 + Duration::from_secs(1)));
        assert_eq!(l.try_acquire(t0 + Duration::from_secs(1), 10), Ok(()));
        // 600 a minute: a second's worth (10) at once, never the minute's 600.
        let mut l = RateLimits::new(Some(600), None);
        for _ in 0..10 {
            assert_eq!(l.try_acquire(t0, 1), Ok(()));
        }
        assert_eq!(l.try_acquire(t0, 1), Err(t0 + Duration::from_millis(100)));
        // Over a minute, 600 and no more.
        let granted = (0..=6_000u64)
            .map(|i| t0 + Duration::from_millis(10 * i))
            .filter(|&t| l.try_acquire(t, 1).is_ok())
            .count();
        assert_eq!(granted, 600);
    }

    #[test]
    fn tokens_per_minute_pace_by_size_and_let_a_huge_request_through_alone() {
        let t0 = Instant::now();
        let mut l = RateLimits::new(None, Some(6_000));
        assert_eq!(l.try_acquire(t0, 5_000), Ok(()));
        // 1,000 left; 3,000 more need 2,000 refilled at 100/s: 20 s.
        assert_eq!(l.try_acquire(t0, 3_000), Err(t0 + Duration::from_secs(20)));
        // Larger than the whole minute: waits for a full bucket, then goes.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(l.try_acquire(t1, 50_000), Ok(()));
        assert!(l.try_acquire(t1, 1).is_err());
    }

    #[test]
    fn no_limits_never_wait() {
        let mut l = RateLimits::default();
        let t = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(l.try_acquire(t, 1_000_000), Ok(()));
        }
    }
}
