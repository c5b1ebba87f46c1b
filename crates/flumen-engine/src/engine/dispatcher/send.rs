//! Sending a batch: what it reserves of a spending budget first (and what becomes of
//! the records the budget cannot pay for; the policy is `crate::spend`), its spans,
//! and its call task.

use std::sync::Arc;
use std::time::Duration;

use flumen_core::{Backend, ErrorKind, Failure};
use tokio::time::Instant;

use super::super::call::Call;
use super::super::{with_last_error, Job};
use super::Dispatcher;
use crate::reliability::BreakerState;
use crate::spend::OnExhausted;
use crate::telemetry::Instruments;

impl<B: Backend> Dispatcher<B> {
    /// Reserves the spending budget for the longest prefix of `jobs` it pays for,
    /// failing (`BudgetExhausted`) any record larger than the whole budget on the
    /// way. The rest fail too, or — with `on_exhausted = wait`, or when only the
    /// reservations of calls in flight stand in the way — go back where they came
    /// from (the queue's front, or the bisection groups') and no call is sent until
    /// the budget's next period, or until a call settles (looking again every 50 ms:
    /// the calls may be another engine's). Returns the prefix and what it reserved.
    pub(super) fn reserve(
        &mut self,
        jobs: Vec<Job<B>>,
        now: Instant,
        isolated: bool,
    ) -> (Vec<Job<B>>, u64) {
        let Some(spend) = self.spend.clone() else {
            return (jobs, 0);
        };
        let mut budget = spend.budget.lock().expect("spend lock");
        let unit = budget.unit();
        let mut reserved = 0;
        let mut paid = Vec::with_capacity(jobs.len());
        let mut never = Vec::new();
        let mut refused = None;
        let mut jobs = jobs.into_iter();
        for job in jobs.by_ref() {
            let cost = unit.cost(job.billed, self.backend.max_output_tokens(&job.input));
            match budget.reserve(now, cost) {
                Ok(()) => {
                    reserved += cost;
                    paid.push(job);
                }
                Err(e) if e.never_fits => never.push((job, e.message)),
                Err(e) => {
                    refused = Some((job, e));
                    break;
                }
            }
        }
        drop(budget);
        let fail = |instruments: &Instruments, job: Job<B>, message: String| {
            let failure = Failure::new(
                ErrorKind::BudgetExhausted,
                with_last_error(message, job.last_error.as_ref()),
                job.attempts,
            );
            job.finish(instruments, Err(failure));
        };
        for (job, message) in never {
            fail(&self.instruments, job, message);
        }
        let Some((first, exhausted)) = refused else {
            return (paid, reserved);
        };
        let rest: Vec<Job<B>> = std::iter::once(first).chain(jobs).collect();
        let wait_for = if !exhausted.spent {
            // Only reservations in the way: they settle soon, here or in another
            // engine that shares the budget.
            Some(now + Duration::from_millis(50))
        } else if spend.on_exhausted == OnExhausted::Wait {
            // A budget without periods never comes back: fail rather than wait.
            exhausted.resets_at
        } else {
            None
        };
        match wait_for {
            None => {
                for job in rest {
                    fail(&self.instruments, job, exhausted.message.clone());
                }
            }
            Some(until) => {
                for job in &rest {
                    self.note_deadline(job.meta.deadline);
                }
                if isolated {
                    self.isolated.push_front(rest);
                } else {
                    for job in rest.into_iter().rev() {
                        self.queue.push_first(job);
                    }
                }
                self.spend_wait = Some(until);
            }
        }
        (paid, reserved)
    }

    pub(super) fn launch(&mut self, jobs: Vec<Job<B>>, now: Instant, isolated: bool) {
        // Records whose submitter went away are dropped before anything is reserved
        // (without a budget, in the loop below: no second pass over the batch).
        let (jobs, reserved) = if self.spend.is_some() {
            let open: Vec<Job<B>> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
            self.reserve(open, now, isolated)
        } else {
            (jobs, 0)
        };
        let mut batch: Vec<Job<B>> = Vec::with_capacity(jobs.len());
        let mut first = 0;
        // Spans (debug level; nothing is made when disabled): the call, linked to the
        // records it carries, and under each record an attempt linked to the call.
        let call_span = tracing::debug_span!("call", engine = %self.name, items = jobs.len());
        for mut job in jobs {
            if job.reply.is_closed() {
                continue;
            }
            if !call_span.is_disabled() {
                call_span.follows_from(&job.span);
                let attempt = tracing::debug_span!(parent: &job.span, "attempt", n = u64::from(job.attempts) + 1);
                attempt.follows_from(&call_span);
                job.attempt = attempt;
            }
            if job.attempts == 0 {
                self.instruments
                    .queue_time
                    .record(now.duration_since(job.meta.enqueued));
                first += 1;
            }
            job.attempts += 1;
            batch.push(job);
        }
        if batch.is_empty() {
            // Every record's submitter went away (some between the reservation and
            // now): give back what was reserved for them.
            if let (Some(spend), true) = (&self.spend, reserved > 0) {
                spend
                    .budget
                    .lock()
                    .expect("spend lock")
                    .settle(now, reserved, 0);
            }
            return;
        }
        self.budget.lock().expect("budget lock").deposit(now, first);
        let probe = self.breaker.as_mut().is_some_and(|b| {
            let half_open = b.state(now) == BreakerState::HalfOpen;
            b.on_send(now);
            half_open
        });
        self.in_flight += 1;
        self.in_flight_items += batch.len();
        let billed_input = batch.iter().map(|j| j.billed).sum();
        self.stats.call_sent(batch.len(), first, billed_input);
        self.instruments.call_tokens(billed_input);
        self.instruments.batch_size.record(batch.len() as f64);
        let call = Call {
            backend: Arc::clone(&self.backend),
            instruments: Arc::clone(&self.instruments),
            stats: Arc::clone(&self.stats),
            budget: Arc::clone(&self.budget),
            sent_at: now,
            in_flight: self.in_flight,
            limit: self.limiter.limit(),
            probe,
            attempt_timeout: self.attempt_timeout,
            hedge_after: self.hedge_after,
            spend: self
                .spend
                .as_ref()
                .map(|s| (Arc::clone(&s.budget), reserved)),
            prices: self.prices,
            billed_input,
            rate: self.rate.clone(),
        };
        self.calls
            .spawn(tracing::Instrument::instrument(call.run(batch), call_span));
    }
}
