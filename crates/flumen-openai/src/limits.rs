//! Requests-per-minute and tokens-per-minute limits as token buckets.
//!
//! Providers enforce a per-minute limit over shorter periods too (OpenAI: "60,000
//! requests/minute may be enforced as 1,000 requests/second"), so requests are
//! spread evenly: their bucket holds one second's worth (at least one request),
//! never a minute's burst at the start. Tokens vary so much per request that
//! their bucket holds the whole minute.
//!
//! A provider also says what the account has left, in `x-ratelimit-*` headers on
//! each response (OpenAI's names: `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests`, and the same for
//! `-tokens`). [`RateLimits::learn`] keeps a mirror of each bucket the provider
//! reports: its capacity is the limit; its refill rate is what the reset time says
//! (the missing `limit − remaining` come back in `reset`), so no window length is
//! assumed; its level is at most what the provider says remains, less what is in
//! flight. Requests then wait for the mirror instead of meeting 429s.

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
        Self::holding(f64::from(per_minute), f64::from(per_minute))
    }

    /// Holds one second's worth, at least one.
    fn per_second(per_minute: u32) -> Self {
        Self::holding(
            f64::from(per_minute),
            (f64::from(per_minute) / 60.0).max(1.0),
        )
    }

    fn holding(per_minute: f64, capacity: f64) -> Self {
        Bucket {
            per_minute,
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
        let wait = (need - self.level) * 60.0 / self.per_minute;
        now + Duration::try_from_secs_f64(wait)
            .unwrap_or(MAX_RESET)
            .min(MAX_RESET)
    }

    fn take(&mut self, amount: f64) {
        self.level -= amount.min(self.capacity);
    }
}

/// What one response's `x-ratelimit-*` headers said about one limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    /// `x-ratelimit-limit-…`: the bucket's size.
    pub limit: Option<f64>,
    /// `x-ratelimit-remaining-…`: what is left of it.
    pub remaining: Option<f64>,
    /// `x-ratelimit-reset-…`: until it is full again.
    pub reset: Option<Duration>,
}

/// What one response's `x-ratelimit-*` headers said, for requests and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Seen {
    /// The request limit.
    pub requests: Reported,
    /// The token limit.
    pub tokens: Reported,
}

impl Seen {
    /// Reads the headers (unparseable values are ignored).
    pub fn of(headers: &reqwest::header::HeaderMap) -> Seen {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let number = |name: &str| {
            get(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|x| x.is_finite() && *x >= 0.0)
        };
        let reported = |what: &str| Reported {
            limit: number(&format!("x-ratelimit-limit-{what}")),
            remaining: number(&format!("x-ratelimit-remaining-{what}")),
            reset: get(&format!("x-ratelimit-reset-{what}")).and_then(parse_reset),
        };
        Seen {
            requests: reported("requests"),
            tokens: reported("tokens"),
        }
    }

    /// Whether the response said nothing about limits.
    pub fn is_empty(&self) -> bool {
        self.requests.remaining.is_none() && self.tokens.remaining.is_none()
    }
}

/// The longest reset believed: a provider's buckets refill within a day; a longer
/// value (an epoch timestamp, a typo) is not a reset time.
const MAX_RESET: Duration = Duration::from_secs(86_400);

/// A reset time as providers write it: `1s`, `6m0s`, `20ms`, `1h2m3.5s`, or a
/// number of seconds; `None` for anything else, or longer than a day.
pub fn parse_reset(text: &str) -> Option<Duration> {
    let text = text.trim();
    let believed = |secs: f64| {
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| *d <= MAX_RESET)
    };
    if let Ok(secs) = text.parse::<f64>() {
        return believed(secs);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += value
            * match &rest[..unit] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                _ => return None,
            };
        rest = &rest[unit..];
    }
    if text.is_empty() {
        return None;
    }
    believed(total)
}

/// The account's limits: a request bucket and a token bucket, as configured, and
/// the mirrors of the provider's own, as its headers report them.
#[derive(Debug, Clone)]
pub struct RateLimits {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    learned_requests: Option<Bucket>,
    learned_tokens: Option<Bucket>,
    /// The provider's count of a request's tokens over the estimate, as learnt from
    /// its refusals (see [`RateLimits::refused`]).
    token_scale: f64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            requests: None,
            tokens: None,
            learned_requests: None,
            learned_tokens: None,
            token_scale: 1.0,
        }
    }
}

/// How much a refusal on tokens raises the estimate of what a request costs the
/// provider, and the most it may be raised to.
const TOKEN_SCALE_STEP: f64 = 1.05;
const TOKEN_SCALE_MAX: f64 = 2.0;

/// Updates the mirror of one provider bucket from what a response reported, with
/// `in_flight` sent that the provider may not have counted yet.
fn learn_one(slot: &mut Option<Bucket>, now: Instant, r: &Reported, in_flight: f64) {
    let Some(remaining) = r.remaining else {
        return;
    };
    let limit = r
        .limit
        .or(slot.as_ref().map(|b| b.capacity))
        .unwrap_or(remaining)
        .max(remaining)
        .max(1.0);
    // The missing part comes back by the reset: that is the refill rate. A full
    // bucket says nothing of its rate; OpenAI's limits are per minute.
    let per_minute = match r.reset {
        Some(reset) if remaining < limit && !reset.is_zero() => {
            (limit - remaining) / reset.as_secs_f64() * 60.0
        }
        _ => slot.as_ref().map_or(limit, |b| b.per_minute),
    }
    // A bucket refills within a day at the slowest (see `MAX_RESET`).
    .max(limit / MAX_RESET.as_secs_f64() * 60.0);
    let bucket = slot.get_or_insert_with(|| Bucket::holding(per_minute, limit));
    bucket.refill(now);
    bucket.capacity = limit;
    bucket.per_minute = per_minute.max(f64::MIN_POSITIVE);
    bucket.level = bucket
        .level
        .min(limit)
        .min(remaining - in_flight)
        .max(-limit);
}

impl RateLimits {
    /// Limits of `rpm` requests and `tpm` tokens per minute (`None`: unlimited).
    pub fn new(rpm: Option<u32>, tpm: Option<u32>) -> Self {
        RateLimits {
            requests: rpm.map(Bucket::per_second),
            tokens: tpm.map(Bucket::new),
            ..RateLimits::default()
        }
    }

    /// Learns from one response's headers: `in_flight` requests of `in_flight_tokens`
    /// were sent besides it and are not answered yet.
    pub fn learn(&mut self, now: Instant, seen: &Seen, in_flight: u64, in_flight_tokens: u64) {
        learn_one(
            &mut self.learned_requests,
            now,
            &seen.requests,
            in_flight as f64,
        );
        learn_one(
            &mut self.learned_tokens,
            now,
            &seen.tokens,
            in_flight_tokens as f64 * self.token_scale,
        );
    }

    /// A request of `tokens` (estimated) was refused with 429. When it was refused
    /// for tokens — fewer remain than it was thought to cost, or requests remain
    /// (so tokens were what ran out) — the provider counts more tokens than the
    /// estimate, which the mirror let through: requests are counted at least 5 %
    /// dearer from now on, and at least as dear as what remained (at most twice the
    /// estimate). Estimates are never lowered: a too-high one costs a little
    /// throughput, a too-low one a 429 at every refill.
    pub fn refused(&mut self, seen: &Seen, tokens: u64) {
        let Some(remaining) = seen.tokens.remaining else {
            return;
        };
        let cost = tokens.max(1) as f64 * self.token_scale;
        let requests_left = seen.requests.remaining.is_some_and(|r| r >= 1.0);
        // Refused with requests left, tokens are what ran out — if few enough
        // remain for that to be so: a 429 with plenty of both is about something
        // else (a concurrency cap, an account's quota) and says nothing of tokens.
        let plausible = remaining < tokens.max(1) as f64 * TOKEN_SCALE_MAX;
        if remaining < cost || (requests_left && plausible) {
            let at_least = (remaining + 1.0) / tokens.max(1) as f64;
            self.token_scale = (self.token_scale * TOKEN_SCALE_STEP)
                .max(at_least)
                .min(TOKEN_SCALE_MAX);
        }
    }

    /// Takes one request of `tokens` if every bucket allows it now; otherwise takes
    /// nothing and says when to ask again.
    pub fn try_acquire(&mut self, now: Instant, tokens: u64) -> Result<(), Instant> {
        let t = tokens as f64;
        // The provider's buckets count tokens as the provider does.
        let provider_t = t * self.token_scale;
        let at = [
            self.requests.as_mut().map(|b| b.ready_at(now, 1.0)),
            self.tokens.as_mut().map(|b| b.ready_at(now, t)),
            self.learned_requests.as_mut().map(|b| b.ready_at(now, 1.0)),
            self.learned_tokens
                .as_mut()
                .map(|b| b.ready_at(now, provider_t)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(now);
        if at > now {
            return Err(at);
        }
        for (b, amount) in [
            (&mut self.requests, 1.0),
            (&mut self.tokens, t),
            (&mut self.learned_requests, 1.0),
            (&mut self.learned_tokens, provider_t),
        ] {
            if let Some(b) = b.as_mut() {
                b.take(amount);
            }
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
    fn reset_times_parse_as_providers_write_them() {
        let d = |s: &str| parse_reset(s).map(|d| d.as_millis());
        assert_eq!(d("1s"), Some(1_000));
        assert_eq!(d("6m0s"), Some(360_000));
        assert_eq!(d("20ms"), Some(20));
        assert_eq!(d("1h2m3.5s"), Some(3_723_500));
        assert_eq!(d("2.5"), Some(2_500));
        assert_eq!(d(""), None);
        assert_eq!(d("soon"), None);
        assert_eq!(d("5x"), None);
    }

    #[test]
    fn learnt_limits_mirror_the_providers_bucket() {
        let t0 = Instant::now();
        let mut l = RateLimits::default();
        let seen = |remaining: f64, reset_ms: u64| Seen {
            requests: Reported {
                limit: Some(60.0),
                remaining: Some(remaining),
                reset: Some(Duration::from_millis(reset_ms)),
            },
            tokens: Reported::default(),
        };
        // 60 a minute, 10 left, full again in 50 s: one a second comes back.
        l.learn(t0, &seen(10.0, 50_000), 0, 0);
        for _ in 0..10 {
            assert_eq!(l.try_acquire(t0, 1), Ok(()));
        }
        assert_eq!(l.try_acquire(t0, 1), Err(t0 + Duration::from_secs(1)));
        // The provider saw fewer left than the mirror thinks (another client, or
        // two requests in flight): the mirror goes down, never up.
        let t1 = t0 + Duration::from_secs(5);
        l.learn(t1, &seen(4.0, 56_000), 2, 0);
        assert_eq!(l.try_acquire(t1, 1), Ok(()));
        assert_eq!(l.try_acquire(t1, 1), Ok(()));
        assert!(l.try_acquire(t1, 1).is_err());
        let mut l = RateLimits::default();
        l.learn(t0, &seen(10.0, 50_000), 0, 0);
        l.learn(t0, &seen(59.0, 1_000), 0, 0);
        assert!(
            (0..10).all(|_| l.try_acquire(t0, 1).is_ok()) && l.try_acquire(t0, 1).is_err(),
            "a later, higher report does not refill the mirror"
        );
    }

    #[test]
    fn refusals_on_tokens_make_requests_dearer() {
        let t0 = Instant::now();
        let mut l = RateLimits::default();
        let seen = |remaining: f64| Seen {
            requests: Reported::default(),
            tokens: Reported {
                limit: Some(1_000.0),
                remaining: Some(remaining),
                reset: Some(Duration::from_secs(60)),
            },
        };
        // A 429 with enough tokens left and no word on requests was not about
        // tokens: no change.
        l.refused(&seen(500.0), 100);
        l.learn(t0, &seen(500.0), 0, 0);
        assert!((0..5).all(|_| l.try_acquire(t0, 100).is_ok()));
        // One with fewer left than the request was thought to cost: 5 % dearer.
        let mut l = RateLimits::default();
        l.refused(&seen(50.0), 100);
        l.learn(t0, &seen(500.0), 0, 0);
        assert!((0..4).all(|_| l.try_acquire(t0, 100).is_ok()));
        assert!(l.try_acquire(t0, 100).is_err(), "5 × 105 > 500");
        // Refused with requests left and 130 tokens: a request costs more than 130.
        let mut l = RateLimits::default();
        let mut both = seen(130.0);
        both.requests.remaining = Some(5.0);
        l.refused(&both, 100);
        assert!((l.token_scale - 1.31).abs() < 1e-9, "{}", l.token_scale);
        for _ in 0..100 {
            l.refused(&seen(0.0), 100);
        }
        assert!((l.token_scale - TOKEN_SCALE_MAX).abs() < 1e-9, "bounded");
    }

    #[test]
    fn absurd_headers_are_ignored_not_obeyed() {
        assert_eq!(parse_reset("1e20"), None);
        assert_eq!(parse_reset("99999999999999999999s"), None);
        assert_eq!(parse_reset("1796226176"), None, "an epoch is not a reset");
        let t0 = Instant::now();
        let mut l = RateLimits::default();
        let seen = Seen {
            requests: Reported {
                limit: Some(1.0),
                remaining: Some(0.0),
                reset: Some(MAX_RESET),
            },
            tokens: Reported::default(),
        };
        l.learn(t0, &seen, 0, 0);
        let at = l.try_acquire(t0, 1).unwrap_err();
        assert!(at <= t0 + MAX_RESET, "a wait is bounded");
        // A 429 with plenty of tokens and requests left is not about tokens.
        let mut l = RateLimits::default();
        let plenty = Seen {
            requests: Reported {
                remaining: Some(50.0),
                ..Reported::default()
            },
            tokens: Reported {
                remaining: Some(100_000.0),
                ..Reported::default()
            },
        };
        l.refused(&plenty, 100);
        assert_eq!(l.token_scale, 1.0);
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
