//! Judging a finished call: what it tells the concurrency limiter (a
//! [`SampleOutcome`]), the circuit breaker and the failure pause (a [`CallClass`]),
//! and how long the backend asked to be left alone. A pure function of how the call
//! ended; the call task gathers the facts, this decides what they mean.

use std::time::Duration;

use flumen_core::{BackendError, ErrorKind};

use super::{CallClass, RetryConfig};
use crate::limiter::SampleOutcome;

/// How a call ended, as far as judging the backend goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallEnd {
    /// Every record had its outcome (its deadline passed) before the call returned.
    Abandoned,
    /// The attempt timeout passed first.
    AttemptTimeout,
    /// The backend panicked.
    Panicked,
    /// The call failed as a whole with an error of this kind.
    Refused {
        kind: ErrorKind,
        retry_after: Option<Duration>,
    },
    /// The backend returned another number of results than records.
    Miscounted,
    /// The backend answered each record. Of the `answered` records still waiting
    /// for their outcome, `retryable` failed with a retryable error, `overloaded` of
    /// those with overload; `retry_after` is the longest wait those asked for.
    Answered {
        answered: usize,
        retryable: usize,
        overloaded: usize,
        retry_after: Option<Duration>,
    },
}

impl CallEnd {
    /// An `Answered` end with nothing counted yet (see [`CallEnd::count`]).
    pub(crate) fn answered() -> Self {
        CallEnd::Answered {
            answered: 0,
            retryable: 0,
            overloaded: 0,
            retry_after: None,
        }
    }

    /// A call refused as a whole with `e`.
    pub(crate) fn refused(e: &BackendError) -> Self {
        CallEnd::Refused {
            kind: e.kind,
            retry_after: e.retry_after,
        }
    }

    /// Counts one answered record's result into an `Answered` end.
    pub(crate) fn count(&mut self, error: Option<&BackendError>) {
        if let CallEnd::Answered {
            answered,
            retryable,
            overloaded,
            retry_after,
        } = self
        {
            *answered += 1;
            let Some(e) = error.filter(|e| RetryConfig::retryable(e.kind)) else {
                return;
            };
            *retryable += 1;
            if e.kind == ErrorKind::Overloaded {
                *overloaded += 1;
                *retry_after = (*retry_after).max(e.retry_after);
            }
        }
    }
}

/// What a call tells the limiter, the breaker and the pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Judged {
    pub(crate) outcome: SampleOutcome,
    pub(crate) class: CallClass,
    /// The wait the backend asked for, with an overload answer.
    pub(crate) retry_after: Option<Duration>,
}

/// Judges a finished call.
///
/// Overload is never failure, whether the call was refused as a whole (a 429) or
/// every record it answered was (a 429 per record): either is an `Overloaded`
/// sample, which shrinks concurrency, pauses calls for as long as the backend asked
/// (the longest wait, per record), and neither feeds the breaker nor the failure
/// streak. A call whose every answered record failed retryably with at least one
/// error other than overload (5xx, timeouts) is a failure, as a transient refusal
/// of the whole call is.
pub(crate) fn judge(end: CallEnd) -> Judged {
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
        CallEnd::Refused { kind, retry_after } => match kind {
            ErrorKind::Overloaded => Judged {
                retry_after,
                ..judged(SampleOutcome::Overloaded, CallClass::Ignored)
            },
            ErrorKind::Timeout => judged(SampleOutcome::Dropped, CallClass::Failure),
            ErrorKind::Transient => judged(SampleOutcome::Failed, CallClass::Failure),
            _ => judged(SampleOutcome::Failed, CallClass::Ignored),
        },
        CallEnd::Answered {
            answered,
            retryable,
            overloaded,
            retry_after,
        } => {
            if answered == 0 || retryable < answered {
                judged(SampleOutcome::Ok, CallClass::Success)
            } else if overloaded == answered {
                Judged {
                    retry_after,
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

    /// An `Answered` end counted from each answered record's error (`None`: ok).
    fn answered(results: &[Option<BackendError>]) -> CallEnd {
        let mut end = CallEnd::answered();
        for r in results {
            end.count(r.as_ref());
        }
        end
    }

    #[test]
    fn a_refused_call_is_judged_by_its_error_kind() {
        let refused = |e: BackendError| {
            let j = judge(CallEnd::refused(&e));
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
        let j = judge(answered(&[
            Some(BackendError::overloaded("429", Some(ms(100)))),
            Some(BackendError::overloaded("429", Some(ms(300)))),
            Some(BackendError::overloaded("429", None)),
        ]));
        assert_eq!(j.outcome, SampleOutcome::Overloaded);
        assert_eq!(j.class, CallClass::Ignored);
        assert_eq!(j.retry_after, Some(ms(300)), "the longest wait asked for");
    }

    #[test]
    fn every_record_failing_retryably_for_another_reason_is_a_failure() {
        let t = || Some(BackendError::transient("500"));
        let o = || Some(BackendError::overloaded("429", None));
        let timeout = || Some(BackendError::new(ErrorKind::Timeout, "slow"));
        for results in [vec![t(), t()], vec![t(), o()], vec![timeout(), o()]] {
            let j = judge(answered(&results));
            assert_eq!(
                (j.outcome, j.class, j.retry_after),
                (SampleOutcome::Ok, CallClass::Failure, None),
                "{results:?}"
            );
        }
    }

    #[test]
    fn one_answer_or_one_permanent_error_makes_the_call_a_success() {
        let t = || Some(BackendError::transient("500"));
        let p = || Some(BackendError::permanent("bad record"));
        let o = || Some(BackendError::overloaded("429", None));
        for results in [
            vec![t(), o(), None],
            vec![t(), p()],
            vec![o(), p()],
            vec![None],
            vec![],
        ] {
            let j = judge(answered(&results));
            assert_eq!(
                (j.outcome, j.class),
                (SampleOutcome::Ok, CallClass::Success),
                "{results:?}"
            );
        }
    }
}
