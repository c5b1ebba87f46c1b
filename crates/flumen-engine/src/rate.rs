//! Rate limits on the calls an engine sends: an upstream provider's requests and
//! tokens per minute, which the dispatcher asks before each call (a
//! [`RateGate`]; [`LocalRate`] keeps the buckets in this process, a gateway may
//! share them between replicas).
//!
//! A call is asked for when it is about to be sent (one request, its input tokens);
//! the output tokens its answers report are charged afterwards. When the gate says
//! no, nothing is sent until the time it names, and the records wait in the queue
//! within their deadlines, as they do for a free slot.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: holds up to `capacity`, refills `per_minute` spread evenly.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    capacity: f64,
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(capacity: f64, per_minute: f64, now: Instant) -> Self {
        Bucket {
            capacity,
            per_minute,
            level: capacity,
            at: now,
        }
    }

    /// A full bucket holding a minute's quota (a caller may spend a minute's worth
    /// at once, then as it refills).
    pub fn per_minute(per_minute: f64, now: Instant) -> Self {
        Bucket::new(per_minute, per_minute, now)
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.per_minute / 60.0).min(self.capacity);
        self.at = self.at.max(now);
    }

    /// Takes `n`, or says how long until `n` is there (`None`: never, `n` is more
    /// than the bucket holds).
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Option<Duration>> {
        self.refill(now);
        if n > self.capacity {
            return Err(None);
        }
        if self.level >= n {
            self.level -= n;
            return Ok(());
        }
        Err(Some(Duration::from_secs_f64(
            (n - self.level) * 60.0 / self.per_minute,
        )))
    }

    /// Takes `n` whatever is left (what is known only afterwards, like output
    /// tokens): the level may go below zero, and what follows waits for the refill.
    /// A negative `n` gives back.
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level - n).min(self.capacity);
    }

    /// Gives the bucket a new shape, keeping what is in it (up to the new capacity).
    pub fn reshape(&mut self, capacity: f64, per_minute: f64, now: Instant) {
        self.refill(now);
        self.capacity = capacity;
        self.per_minute = per_minute;
        self.level = self.level.min(capacity);
    }

    /// Empties it: from now it holds only what refills.
    pub fn drain(&mut self, now: Instant) {
        self.at = self.at.max(now);
        self.level = self.level.min(0.0);
    }

    /// What it holds now.
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }
}

/// An upstream's limits: requests (calls) and tokens per minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    /// Calls per minute.
    pub rpm: Option<f64>,
    /// Tokens per minute (input when a call is sent, output as it answers).
    pub tpm: Option<f64>,
}

/// How much of a minute's limit an upstream bucket lets through at once: half a
/// second's worth (at least one call). A provider counts per minute; a bucket
/// holding a whole minute would let a minute's calls through in the first second and
/// the same again as it refills — twice the limit within one minute.
pub const UPSTREAM_BURST: f64 = 1.0 / 120.0;

impl RateLimits {
    /// The capacity of a bucket for `per_minute`: [`UPSTREAM_BURST`] of it, at least
    /// `least` (one call, or one call's tokens).
    pub fn capacity(per_minute: f64, least: f64) -> f64 {
        // A call larger than the bucket waits for a full bucket (see `acquire`).
        (per_minute * UPSTREAM_BURST).max(least).max(1.0)
    }
}

/// Asked by the dispatcher before each call.
pub trait RateGate: Send + Sync + std::fmt::Debug {
    /// One call of `tokens` input tokens now, or when to ask again.
    fn acquire(&self, tokens: u64, now: Instant) -> Result<(), Instant>;
    /// The output tokens a call's answers reported.
    fn charge(&self, tokens: u64, now: Instant);
}

/// The buckets in this process.
#[derive(Debug)]
pub struct LocalRate {
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
    /// The most tokens the token bucket holds: a larger call waits for this many.
    max_tokens: f64,
}

impl LocalRate {
    /// Buckets for `limits`, full now; `call_tokens` is the most tokens one call may
    /// carry (0: not known), which a token bucket holds at least.
    pub fn new(limits: RateLimits, call_tokens: u64, now: Instant) -> Self {
        let call_tokens = call_tokens as f64;
        let token_capacity = limits.tpm.map(|t| RateLimits::capacity(t, call_tokens));
        LocalRate {
            requests: limits
                .rpm
                .map(|r| Mutex::new(Bucket::new(RateLimits::capacity(r, 1.0), r, now))),
            tokens: limits
                .tpm
                .zip(token_capacity)
                .map(|(t, c)| Mutex::new(Bucket::new(c, t, now))),
            max_tokens: token_capacity.unwrap_or(f64::MAX),
        }
    }
}

impl LocalRate {
    /// Empties its buckets: a replica that takes over its share of a limit that was
    /// shared starts from nothing, so the hand-over adds no burst.
    pub fn drain(&self, now: Instant) {
        for b in [&self.requests, &self.tokens].into_iter().flatten() {
            b.lock().expect("bucket lock").drain(now);
        }
    }
}

impl RateGate for LocalRate {
    fn acquire(&self, tokens: u64, now: Instant) -> Result<(), Instant> {
        // A call larger than the bucket waits for a full one, and is charged whole:
        // the bucket goes below zero and the next calls wait for it.
        let all = tokens as f64;
        let tokens = all.min(self.max_tokens);
        let wait = |r: Result<(), Option<Duration>>| match r {
            Ok(()) => Ok(()),
            Err(d) => Err(now
                + d.unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_millis(1))),
        };
        if let Some(t) = &self.tokens {
            // Tokens first: a call refused for tokens takes no request.
            let mut t = t.lock().expect("bucket lock");
            if let Some(r) = &self.requests {
                let mut r = r.lock().expect("bucket lock");
                // Both or neither: look at both before taking from either.
                let (rl, tl) = (r.level(now), t.level(now));
                if rl < 1.0 {
                    return wait(r.take(1.0, now));
                }
                if tl < tokens {
                    return wait(t.take(tokens, now));
                }
                r.take(1.0, now).expect("looked");
            }
            let taken = wait(t.take(tokens, now));
            if taken.is_ok() && all > tokens {
                t.charge(all - tokens, now);
            }
            return taken;
        }
        if let Some(r) = &self.requests {
            return wait(r.lock().expect("bucket lock").take(1.0, now));
        }
        Ok(())
    }

    fn charge(&self, tokens: u64, now: Instant) {
        if let Some(t) = &self.tokens {
            t.lock().expect("bucket lock").charge(tokens as f64, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_and_says_when() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(60.0, t0);
        for _ in 0..60 {
            b.take(1.0, t0).unwrap();
        }
        assert_eq!(b.take(1.0, t0), Err(Some(Duration::from_secs(1))));
        assert_eq!(b.take(1.0, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(b.take(61.0, t0), Err(None));
        b.charge(30.0, t0 + Duration::from_secs(1));
        assert_eq!(
            b.take(1.0, t0 + Duration::from_secs(1)),
            Err(Some(Duration::from_secs(31)))
        );
        let mut b = Bucket::per_minute(10.0, t0);
        b.take(10.0, t0).unwrap();
        assert_eq!(b.take(10.0, t0 + Duration::from_secs(3600)), Ok(()));
        assert!(b.take(1.0, t0 + Duration::from_secs(3600)).is_err());
    }

    #[test]
    fn an_upstream_limit_lets_no_more_than_a_minute_through_in_any_minute() {
        // 600 calls a minute, asked for every millisecond for three minutes: in any
        // 60 s window at most 600 plus the half-second burst.
        let t0 = Instant::now();
        let gate = LocalRate::new(
            RateLimits {
                rpm: Some(600.0),
                tpm: None,
            },
            0,
            t0,
        );
        let mut sent = Vec::new();
        for ms in 0..180_000u64 {
            let now = t0 + Duration::from_millis(ms);
            if gate.acquire(0, now).is_ok() {
                sent.push(ms);
            }
        }
        let most = (0..sent.len())
            .map(|i| {
                sent[i..]
                    .iter()
                    .take_while(|t| **t < sent[i] + 60_000)
                    .count()
            })
            .max()
            .unwrap();
        assert!((600..=605).contains(&most), "{most} in one minute");
        assert!(sent.len() >= 1_795, "{}", sent.len());
    }

    #[test]
    fn tokens_and_requests_are_taken_together_or_not_at_all() {
        let t0 = Instant::now();
        let gate = LocalRate::new(
            RateLimits {
                rpm: Some(120.0),
                tpm: Some(1_200.0),
            },
            100,
            t0,
        );
        // Capacity: 1 request (120 / 120), 100 tokens (one call's).
        assert_eq!(gate.acquire(100, t0), Ok(()));
        let again = gate.acquire(100, t0).unwrap_err();
        assert_eq!(again, t0 + Duration::from_millis(500));
        // Half a second later a request is there but only 10 tokens: refused, and
        // the request is not taken.
        let t1 = t0 + Duration::from_millis(500);
        assert!(gate.acquire(100, t1).is_err());
        assert_eq!(gate.acquire(10, t1), Ok(()));
        gate.charge(1_000, t1);
        assert!(gate.acquire(1, t1 + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn a_call_larger_than_the_bucket_waits_for_a_full_one_and_is_charged_whole() {
        // 1,200 tokens a minute, the most per call unknown: the bucket holds 10.
        let t0 = Instant::now();
        let gate = LocalRate::new(
            RateLimits {
                rpm: None,
                tpm: Some(1_200.0),
            },
            0,
            t0,
        );
        assert_eq!(gate.acquire(500, t0), Ok(()));
        // 490 tokens owed at 20 a second, then 10 to fill: 25 s.
        assert_eq!(gate.acquire(1, t0), Err(t0 + Duration::from_millis(24_550)));
        assert!(gate
            .acquire(10, t0 + Duration::from_millis(24_999))
            .is_err());
        assert_eq!(gate.acquire(10, t0 + Duration::from_millis(25_001)), Ok(()));
    }
}
