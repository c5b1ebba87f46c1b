//! Judging a finished call: what it tells the concurrency limiter (a
//! [`SampleOutcome`]), the circuit breaker and the failure pause (a [`CallClass`]),
//! and how long the backend asked to be left alone. A pure function of how the call
//! ended; the call task gathers the facts, this decides what they mean.

use std::time::Duration;

use flumen_core::{BackendError, ErrorKind};

use super::{CallClass, RetryConfig};
use crate::limiter::SampleOutcome;

/// How a call ended, as far as judging the backend goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CallEnd<'a> {
    /// Every record had its outcome (its deadline passed) before the call returned.
    Abandoned,
    /// The attempt timeout passed first.
    AttemptTimeout,
    /// The backend panicked.
    Panicked,
    /// The call failed as a whole with this error.
    Refused(&'a BackendError),
    /// The backend returned another number of results than records.
    Miscounted,
    /// The backend answered each record; the errors of those that failed and were
    /// still waiting for their outcome (`answered` counts those waiting).
    Answered {
        answered: usize,
        errors: &'a [BackendError],
    },
}

/// What a call tells the limiter, the breaker and the pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Judged {
    pub(crate) outcome: SampleOutcome,
    pub(crate) class: CallClass,
    /// The wait the backend asked for, with an overload answer.
    pub(crate) retry_after: Option<Duration>,
}

/// Judges a finished call.
///
/// Overload is never failure, whether the call was refused as a whole (a 429) or
/// every record it answered was (a 429 per record): either shrinks concurrency and
/// pauses calls as the backend asked, and neither feeds the breaker. A call whose
/// every answered record failed retryably for another reason (5xx, timeouts) is a
/// failure, as a transient refusal of the whole call is.
pub(crate) fn judge(end: CallEnd<'_>) -> Judged {
    let judged = |outcome, class| Judged {
        outcome,
        class,
        retry_after: None,
    };
    match end {
        CallEnd::Abandoned => judged(SampleOutcome::Dropped, CallClass::Ignored),
        CallEnd::AttemptTimeout => judged(SampleOutcome::Dropped, CallClass::Failure),
        CallEnd::Panicked => judged(SampleOutcome::Failed, CallClass::Failure),
        CallEnd::Miscounted => judged(SampleOutcome::Failed, CallClass::Ignored),
        CallEnd::Refused(e) => match e.kind {
            ErrorKind::Overloaded => Judged {
                retry_after: e.retry_after,
                ..judged(SampleOutcome::Overloaded, CallClass::Ignored)
            },
            ErrorKind::Timeout => judged(SampleOutcome::Dropped, CallClass::Failure),
            ErrorKind::Transient => judged(SampleOutcome::Failed, CallClass::Failure),
            _ => judged(SampleOutcome::Failed, CallClass::Ignored),
        },
        CallEnd::Answered { answered, errors } => {
            let retryable = errors.iter().filter(|e| RetryConfig::retryable(e.kind));
            let all_failed = answered > 0 && retryable.clone().count() == answered;
            if !all_failed {
                return judged(SampleOutcome::Ok, CallClass::Success);
            }
            if errors.iter().all(|e| e.kind == ErrorKind::Overloaded) {
                Judged {
                    retry_after: errors.iter().filter_map(|e| e.retry_after).max(),
                    ..judged(SampleOutcome::Overloaded, CallClass::Ignored)
                }
            } else {
                judged(SampleOutcome::Ok, CallClass::Failure)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_refused_call_is_judged_by_its_error_kind() {
        let refused = |e: BackendError| {
            let j = judge(CallEnd::Refused(&e));
            (j.outcome, j.class, j.retry_after)
        };
        assert_eq!(
            refused(BackendError::overloaded("429", Some(ms(250)))),
            (SampleOutcome::Overloaded, CallClass::Ignored, Some(ms(250)))
        );
        assert_eq!(
            refused(BackendError::transient("502")),
            (SampleOutcome::Failed, CallClass::Failure, None)
        );
        assert_eq!(
            refused(BackendError::new(ErrorKind::Timeout, "504")),
            (SampleOutcome::Dropped, CallClass::Failure, None)
        );
        // A bad request says nothing about the backend's health.
        assert_eq!(
            refused(BackendError::permanent("400")),
            (SampleOutcome::Failed, CallClass::Ignored, None)
        );
        assert_eq!(
            refused(BackendError::invalid_input("too long")),
            (SampleOutcome::Failed, CallClass::Ignored, None)
        );
    }

    #[test]
    fn calls_that_never_answered_are_failures_unless_abandoned() {
        let class = |end| judge(end).class;
        assert_eq!(class(CallEnd::AttemptTimeout), CallClass::Failure);
        assert_eq!(class(CallEnd::Panicked), CallClass::Failure);
        assert_eq!(class(CallEnd::Abandoned), CallClass::Ignored);
        assert_eq!(class(CallEnd::Miscounted), CallClass::Ignored);
        assert_eq!(
            judge(CallEnd::AttemptTimeout).outcome,
            SampleOutcome::Dropped
        );
    }

    #[test]
    fn every_record_overloaded_is_overload_not_failure() {
        let a = BackendError::overloaded("429", Some(ms(100)));
        let b = BackendError::overloaded("429", Some(ms(300)));
        let c = BackendError::overloaded("429", None);
        let j = judge(CallEnd::Answered {
            answered: 3,
            errors: &[a, b, c],
        });
        assert_eq!(j.outcome, SampleOutcome::Overloaded);
        assert_eq!(j.class, CallClass::Ignored);
        assert_eq!(j.retry_after, Some(ms(300)), "the longest wait asked for");
    }

    #[test]
    fn every_record_failing_transiently_is_a_failure() {
        let t = BackendError::transient("500");
        let o = BackendError::overloaded("429", None);
        for errors in [vec![t.clone(), t.clone()], vec![t, o]] {
            let j = judge(CallEnd::Answered {
                answered: 2,
                errors: &errors,
            });
            assert_eq!(j.class, CallClass::Failure, "{errors:?}");
        }
    }

    #[test]
    fn one_answer_or_one_permanent_error_makes_the_call_a_success() {
        let t = BackendError::transient("500");
        let p = BackendError::permanent("bad record");
        let o = BackendError::overloaded("429", None);
        for (answered, errors) in [
            (3, vec![t.clone(), o.clone()]),
            (2, vec![t, p.clone()]),
            (2, vec![o, p]),
            (0, vec![]),
        ] {
            let j = judge(CallEnd::Answered {
                answered,
                errors: &errors,
            });
            assert_eq!(
                (j.outcome, j.class),
                (SampleOutcome::Ok, CallClass::Success),
                "{answered} answered, errors {errors:?}"
            );
        }
    }
}
