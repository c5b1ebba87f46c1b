//! When not to call the backend at all for a while: after an overload answer, for as
//! long as the backend asked (or one call's expected latency when it did not say),
//! so that a backend answering 429 at once is not hammered in a loop; and from the
//! second failed call in a row, for the retry backoff (jittered, growing with the
//! streak), so that an outage burns few attempts before the breaker (if any) opens.
//! One successful call ends the streak.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::classify::Judged;
use super::{CallClass, RetryConfig};
use crate::limiter::SampleOutcome;

/// The shortest pause after an overload answer.
pub(crate) const MIN_OVERLOAD_PAUSE: Duration = Duration::from_millis(1);

/// The pause policy: the run of failed calls, and the pause it and overload call for.
#[derive(Debug, Default)]
pub(crate) struct Pause {
    /// Calls in a row that failed for the backend's sake.
    streak: u32,
    until: Option<Instant>,
}

impl Pause {
    /// Takes in a judged call that finished at `now`; `expected` is one call's
    /// expected latency, the pause after an overload answer that named no wait.
    pub(crate) fn on_call(
        &mut self,
        now: Instant,
        judged: &Judged,
        expected: Duration,
        retry: &RetryConfig,
        rng: &mut impl Rng,
    ) {
        if judged.outcome == SampleOutcome::Overloaded {
            let wait = judged.retry_after.unwrap_or(expected);
            self.extend(now + wait.max(MIN_OVERLOAD_PAUSE));
        }
        match judged.class {
            CallClass::Failure => {
                self.streak += 1;
                if self.streak >= 2 {
                    self.extend(now + retry.backoff(self.streak - 1, None, rng));
                }
            }
            CallClass::Success => self.streak = 0,
            CallClass::Ignored => {}
        }
    }

    fn extend(&mut self, until: Instant) {
        self.until = Some(self.until.map_or(until, |p| p.max(until)));
    }

    /// Whether the last two or more calls failed (a pause then is for an outage,
    /// not for overload).
    pub(crate) fn failing(&self) -> bool {
        self.streak >= 2
    }

    /// Until when no call may be sent, if that is still ahead of `now`.
    pub(crate) fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|p| *p > now)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn judged(outcome: SampleOutcome, class: CallClass, retry_after: Option<Duration>) -> Judged {
        Judged {
            outcome,
            class,
            retry_after,
        }
    }

    #[test]
    fn overload_pauses_as_asked_or_for_one_expected_call() {
        let (retry, mut rng) = (RetryConfig::default(), ChaCha8Rng::seed_from_u64(1));
        let now = Instant::now();
        let mut p = Pause::default();
        let asked = judged(SampleOutcome::Overloaded, CallClass::Ignored, Some(ms(250)));
        p.on_call(now, &asked, ms(20), &retry, &mut rng);
        assert_eq!(p.until(now), Some(now + ms(250)));
        assert_eq!(p.until(now + ms(250)), None, "over once reached");
        // A shorter pause never cuts a longer one short.
        let unsaid = judged(SampleOutcome::Overloaded, CallClass::Ignored, None);
        p.on_call(now, &unsaid, ms(20), &retry, &mut rng);
        assert_eq!(p.until(now), Some(now + ms(250)));
        let mut p = Pause::default();
        p.on_call(now, &unsaid, ms(20), &retry, &mut rng);
        assert_eq!(p.until(now), Some(now + ms(20)));
        let mut p = Pause::default();
        p.on_call(now, &unsaid, Duration::ZERO, &retry, &mut rng);
        assert_eq!(p.until(now), Some(now + MIN_OVERLOAD_PAUSE));
    }

    #[test]
    fn failures_pause_from_the_second_in_a_row_until_a_success() {
        let (retry, mut rng) = (RetryConfig::default(), ChaCha8Rng::seed_from_u64(2));
        let now = Instant::now();
        let fail = judged(SampleOutcome::Failed, CallClass::Failure, None);
        let ok = judged(SampleOutcome::Ok, CallClass::Success, None);
        let ignored = judged(SampleOutcome::Failed, CallClass::Ignored, None);
        let mut p = Pause::default();
        p.on_call(now, &fail, ms(20), &retry, &mut rng);
        assert_eq!(p.until(now), None, "one failure is no streak");
        // Ignored calls (bad requests, overload) neither extend nor end the streak.
        p.on_call(now, &ignored, ms(20), &retry, &mut rng);
        assert_eq!((p.streak, p.until(now)), (1, None));
        p.on_call(now, &fail, ms(20), &retry, &mut rng);
        assert_eq!(p.streak, 2);
        // The second failure in a row pauses for a jittered backoff under the
        // initial ceiling (a draw of zero pauses for no time at all).
        let first = p.until.map(|u| u - now);
        assert!(
            first.is_some_and(|d| d <= retry.initial_backoff),
            "{first:?}"
        );
        // The ceiling grows with the streak: over many failures, some pause is long.
        let mut longest = Duration::ZERO;
        for _ in 0..20 {
            p.on_call(now, &fail, ms(20), &retry, &mut rng);
            longest = longest.max(p.until(now).map_or(Duration::ZERO, |u| u - now));
        }
        assert!(longest > retry.initial_backoff, "{longest:?}");
        assert!(longest <= retry.max_backoff);
        // One success ends the streak: the next failure alone does not pause.
        let later = now + retry.max_backoff;
        p.on_call(later, &ok, ms(20), &retry, &mut rng);
        assert_eq!(p.streak, 0);
        p.on_call(later, &fail, ms(20), &retry, &mut rng);
        assert_eq!((p.streak, p.until(later)), (1, None));
    }
}
