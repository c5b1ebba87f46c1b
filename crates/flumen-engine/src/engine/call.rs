//! One backend call in its own task: it runs the call (and its hedge), fails records
//! whose deadline passes meanwhile, delivers final outcomes, and reports to the
//! dispatcher how the call went and which records are worth another try.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_core::{Backend, BackendError, ErrorKind, Failure};
use futures::FutureExt;
use tokio::time::{sleep_until, Instant};

use super::{finish, with_last_error, Job, Reply};
use crate::batcher::QueuedMeta;
use crate::limiter::Sample;
use crate::reliability::classify::{judge, CallEnd, Judged};
use crate::reliability::{RetryBudget, RetryConfig};
use crate::spend::SpendBudget;
use crate::stats::Stats;
use crate::telemetry::Instruments;

/// What a finished call tells the dispatcher.
pub(super) struct Report<B: Backend> {
    pub(super) sample: Sample,
    /// What the call says of the backend.
    pub(super) judged: Judged,
    pub(super) probe: bool,
    /// Records worth another attempt, with the error of this one.
    pub(super) retry: Vec<(Job<B>, BackendError)>,
    /// A batch that failed as a whole with a non-retryable error, to bisect.
    pub(super) split: Option<(Vec<Job<B>>, BackendError)>,
}

/// One backend call in its own task.
pub(super) struct Call<B> {
    pub(super) backend: Arc<B>,
    pub(super) instruments: Arc<Instruments>,
    pub(super) stats: Arc<Stats>,
    pub(super) budget: Arc<Mutex<RetryBudget>>,
    pub(super) sent_at: Instant,
    pub(super) in_flight: usize,
    pub(super) limit: usize,
    pub(super) probe: bool,
    pub(super) attempt_timeout: Option<Duration>,
    pub(super) hedge_after: Option<Duration>,
    /// The spending budget, and what this call reserved from it.
    pub(super) spend: Option<(Arc<Mutex<SpendBudget>>, u64)>,
    pub(super) prices: Option<crate::spend::Prices>,
    /// The upstream's rate limits: charged the output tokens of the answers.
    pub(super) rate: Option<Arc<dyn crate::rate::RateGate>>,
    /// The input tokens one send of this batch is billed.
    pub(super) billed_input: u64,
}

/// A record in a call, while it waits for its result.
struct Waiting<O> {
    reply: Option<Reply<O>>,
    meta: QueuedMeta,
    attempts: u32,
    uncounted: u32,
    billed: u64,
    last_error: Option<BackendError>,
    lane: crate::Lane,
    span: tracing::Span,
    /// Held, so that it closes when the call ends for this record.
    _attempt: tracing::Span,
}

/// The records still waiting for their outcome.
fn flat<J>(slots: Vec<Option<J>>) -> Vec<J> {
    slots.into_iter().flatten().collect()
}

/// A finished call's records set aside, and how it ended.
struct Settled<B: Backend> {
    end: CallEnd,
    /// Records worth another attempt, with the error of this one.
    retry: Vec<(Job<B>, BackendError)>,
    /// A batch that failed as a whole with a non-retryable error, to bisect.
    split: Option<(Vec<Job<B>>, BackendError)>,
}

impl<B: Backend> Settled<B> {
    /// Nothing set aside.
    fn ended(end: CallEnd) -> Self {
        Settled {
            end,
            retry: Vec::new(),
            split: None,
        }
    }
}

/// How the call itself ended.
enum Ended<O> {
    Returned(flumen_core::BatchResult<O>),
    Panicked,
    /// Every record got its outcome (deadline) before the call returned.
    Abandoned,
    AttemptTimeout,
}

impl<B: Backend> Call<B> {
    pub(super) async fn run(self, jobs: Vec<Job<B>>) -> Report<B> {
        let items = jobs.len();
        let tokens = jobs.iter().map(|j| j.meta.cost.tokens).sum();
        let mut inputs = Vec::with_capacity(items);
        let mut waiting = Vec::with_capacity(items);
        for job in jobs {
            inputs.push(job.input);
            waiting.push(Waiting {
                reply: Some(job.reply),
                meta: job.meta,
                attempts: job.attempts,
                uncounted: job.uncounted,
                billed: job.billed,
                last_error: job.last_error,
                lane: job.lane,
                span: job.span,
                _attempt: job.attempt,
            });
        }

        let hedged = AtomicBool::new(false);
        let ended = self.call(&inputs, &mut waiting, &hedged).await;
        // What the call cost: its input (twice if hedged), and its answers' output
        // tokens; nothing for a call refused as overloaded (not billed). The
        // backend's count is its code: a panic there counts no output.
        let sends = 1 + u64::from(hedged.load(Relaxed));
        let (input, output) = match &ended {
            Ended::Returned(Err(e)) if e.kind == ErrorKind::Overloaded => (0, 0),
            Ended::Returned(Ok(results)) => {
                let counted = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    results
                        .iter()
                        .filter_map(|r| r.as_ref().ok())
                        .map(|o| self.backend.output_tokens(o))
                        .sum()
                }));
                (self.billed_input * sends, counted.unwrap_or(0))
            }
            _ => (self.billed_input * sends, 0),
        };
        if let (Some(gate), true) = (&self.rate, output > 0) {
            gate.charge(output, Instant::now());
        }
        let nanos = self.prices.map_or(0, |p| p.nanos(input, output));
        let total = self.stats.call_answered(output, nanos);
        self.instruments.call_cost(output, total);
        if let Some((budget, reserved)) = &self.spend {
            let mut budget = budget.lock().expect("spend lock");
            let actual = budget.unit().cost(input, output);
            budget.settle(Instant::now(), *reserved, actual);
        }
        let rtt = self.sent_at.elapsed();
        self.instruments.backend_latency.record(rtt);
        let extra = u32::from(hedged.load(Relaxed));

        // One slot per record of the call: `None` once it has its outcome.
        let slots: Vec<Option<Job<B>>> = inputs
            .into_iter()
            .zip(waiting)
            .map(|(input, w)| {
                let reply = w.reply.filter(|r| !r.is_closed())?;
                Some(Job {
                    input,
                    meta: w.meta,
                    attempts: w.attempts + extra,
                    last_error: w.last_error,
                    starved: false,
                    uncounted: w.uncounted,
                    billed: w.billed,
                    lane: w.lane,
                    span: w.span,
                    attempt: tracing::Span::none(),
                    reply,
                })
            })
            .collect();
        let Settled { end, retry, split } = self.settle(ended, slots);
        let judged = judge(end);
        Report {
            sample: Sample {
                sent_at: self.sent_at,
                rtt,
                items,
                tokens,
                in_flight: self.in_flight,
                limit: self.limit,
                outcome: judged.outcome,
            },
            judged,
            probe: self.probe,
            retry,
            split,
        }
    }

    /// Gives the records of a finished call their outcomes, or sets them aside for
    /// another attempt (`retry`) or for bisection (`split`); returns how the call
    /// ended, for [`judge`].
    fn settle(&self, ended: Ended<B::Output>, slots: Vec<Option<Job<B>>>) -> Settled<B> {
        let fail_all = |jobs: Vec<Job<B>>, e: &BackendError| {
            for job in jobs {
                let f = Failure::from_backend(e.clone(), job.attempts);
                job.finish(&self.instruments, Err(f));
            }
        };
        match ended {
            Ended::Abandoned => Settled::ended(CallEnd::Abandoned),
            Ended::AttemptTimeout => {
                let ms = self.attempt_timeout.unwrap_or_default().as_millis();
                let e = BackendError::new(
                    ErrorKind::Timeout,
                    format!("attempt timed out after {ms} ms"),
                );
                let retry = flat(slots).into_iter().map(|j| (j, e.clone())).collect();
                Settled {
                    retry,
                    ..Settled::ended(CallEnd::AttemptTimeout)
                }
            }
            Ended::Panicked => {
                let e = BackendError::permanent("the backend panicked during the call");
                fail_all(flat(slots), &e);
                Settled::ended(CallEnd::Panicked)
            }
            Ended::Returned(Err(e)) => {
                let pending = flat(slots);
                let poisonable = matches!(e.kind, ErrorKind::Permanent | ErrorKind::InvalidInput);
                let mut settled = Settled::ended(CallEnd::refused(&e));
                if RetryConfig::retryable(e.kind) {
                    settled.retry = pending.into_iter().map(|j| (j, e.clone())).collect();
                } else if poisonable && pending.len() > 1 {
                    settled.split = Some((pending, e));
                } else {
                    fail_all(pending, &e);
                }
                settled
            }
            Ended::Returned(Ok(results)) if results.len() != slots.len() => {
                let e = BackendError::permanent(format!(
                    "backend returned {} results for a batch of {}",
                    results.len(),
                    slots.len()
                ));
                fail_all(flat(slots), &e);
                Settled::ended(CallEnd::Miscounted)
            }
            Ended::Returned(Ok(results)) => {
                let mut settled = Settled::ended(CallEnd::answered());
                for (slot, result) in slots.into_iter().zip(results) {
                    let Some(job) = slot else { continue };
                    settled.end.count(result.as_ref().err());
                    match result {
                        Ok(output) => {
                            job.finish(&self.instruments, Ok(output));
                        }
                        Err(e) if RetryConfig::retryable(e.kind) => settled.retry.push((job, e)),
                        Err(e) => {
                            let f = Failure::from_backend(e, job.attempts);
                            job.finish(&self.instruments, Err(f));
                        }
                    }
                }
                settled
            }
        }
    }

    /// Runs the call (and its hedge), failing records whose deadline passes meanwhile.
    async fn call(
        &self,
        inputs: &[B::Input],
        waiting: &mut [Waiting<B::Output>],
        hedged: &AtomicBool,
    ) -> Ended<B::Output> {
        let primary = AssertUnwindSafe(self.backend.call(inputs)).catch_unwind();
        let hedge = async {
            let Some(after) = self.hedge_after else {
                return std::future::pending().await;
            };
            sleep_until(self.sent_at + after).await;
            let granted = self
                .budget
                .lock()
                .expect("budget lock")
                .try_withdraw_many(Instant::now(), inputs.len());
            if !granted {
                return std::future::pending().await;
            }
            hedged.store(true, Relaxed);
            self.instruments.hedges.increment(1);
            self.stats.call_sent(inputs.len(), 0, self.billed_input);
            self.instruments.call_tokens(self.billed_input);
            AssertUnwindSafe(self.backend.call(inputs))
                .catch_unwind()
                .await
        };
        tokio::pin!(primary, hedge);
        let attempt_deadline = self.attempt_timeout.map(|t| self.sent_at + t);
        loop {
            let next_deadline = waiting
                .iter()
                .filter(|w| w.reply.is_some())
                .filter_map(|w| w.meta.deadline)
                .min();
            let ended = tokio::select! {
                r = &mut primary => r,
                r = &mut hedge => r,
                () = sleep_until(attempt_deadline.unwrap_or(self.sent_at)), if attempt_deadline.is_some() => {
                    return Ended::AttemptTimeout;
                }
                () = sleep_until(next_deadline.unwrap_or(self.sent_at)), if next_deadline.is_some() => {
                    if self.time_out_expired(waiting) {
                        return Ended::Abandoned;
                    }
                    continue;
                }
            };
            return match ended {
                Ok(result) => Ended::Returned(result),
                Err(_panic) => Ended::Panicked,
            };
        }
    }

    /// Fails the records whose deadline has passed; true when none is left waiting.
    fn time_out_expired(&self, waiting: &mut [Waiting<B::Output>]) -> bool {
        let now = Instant::now();
        for w in waiting.iter_mut() {
            if w.meta.deadline.is_some_and(|d| d <= now) {
                if let Some(reply) = w.reply.take() {
                    let message = with_last_error(
                        format!(
                            "deadline passed while attempt {} was in flight ({} ms)",
                            w.attempts,
                            now.duration_since(self.sent_at).as_millis()
                        ),
                        w.last_error.as_ref(),
                    );
                    let failure = Failure::new(ErrorKind::Timeout, message, w.attempts);
                    finish(
                        &self.instruments,
                        &w.span,
                        w.meta.enqueued,
                        reply,
                        w.attempts,
                        Err(failure),
                    );
                    // The record has its outcome: its spans end now, not with the call.
                    w.span = tracing::Span::none();
                    w._attempt = tracing::Span::none();
                }
            }
        }
        waiting
            .iter()
            .all(|w| w.reply.as_ref().is_none_or(|r| r.is_closed()))
    }
}
