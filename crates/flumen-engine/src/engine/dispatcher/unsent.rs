//! Records failed before they are sent: shed at enqueue behind a backlog, too large
//! for any batch, or unable to make their deadline in the call they would ride.

use std::time::Duration;

use flumen_core::{Backend, ErrorKind, Failure};
use tokio::time::Instant;

use super::super::{with_last_error, Job};
use super::Dispatcher;

impl<B: Backend> Dispatcher<B> {
    /// Fails a record that would miss its deadline behind the queue, before queueing
    /// it: under sustained overload a FIFO queue otherwise fills with records that
    /// reach the backend only as their deadlines pass, and every call carries records
    /// that time out in flight while fresh ones wait behind them.
    pub(super) fn shed(&mut self, job: Job<B>, now: Instant, answer: Instant, deadline: Instant) {
        let failure = Failure::new(
            ErrorKind::Overloaded,
            format!(
                "shed before queueing: {} records ahead, an answer in about {} ms, the deadline in {} ms",
                self.queue.ahead(&job.lane, job.meta.deadline),
                answer.duration_since(now).as_millis(),
                deadline.saturating_duration_since(now).as_millis()
            ),
            job.attempts,
        );
        self.stats.shed();
        job.finish(&self.instruments, Err(failure));
    }

    /// With somewhere else to go ([`hand_off`](crate::EngineConfig::hand_off)),
    /// fails every record waiting here (queued, waiting to retry, or isolating a
    /// poison record) as transient, for the next stage: `why` the backend is not
    /// being called.
    pub(super) fn hand_off_waiting(&mut self, why: &str) {
        let mut jobs = Vec::new();
        while let Some(job) = self.queue.pop_front() {
            jobs.push(job);
        }
        jobs.extend(std::mem::take(&mut self.delayed).into_values());
        jobs.extend(std::mem::take(&mut self.isolated).into_iter().flatten());
        for job in jobs {
            let message =
                with_last_error(format!("handed on unsent: {why}"), job.last_error.as_ref());
            let failure = Failure::new(ErrorKind::Transient, message, job.attempts);
            job.finish(&self.instruments, Err(failure));
        }
    }

    /// Fails the head record, which cannot make its deadline in its call.
    pub(super) fn fail_hopeless_head(&mut self, now: Instant, expected: Duration) {
        if let Some(job) = self.queue.pop_front() {
            self.fail_hopeless(job, now, expected);
        }
    }

    /// Behind a backlog while calls run, the front records go out in a full call:
    /// those of them that cannot make their deadline in it are failed unsent, as
    /// the policy fails such a record at the head. In one FIFO lane the head is
    /// the nearest deadline; with classes and tenants the records of the first call
    /// come from several lanes, and one near its deadline further in would make
    /// the policy cut the call short for it.
    pub(super) fn fail_hopeless_in_first_call(&mut self, now: Instant, busy: usize) {
        if busy == 0 || self.latency.coefficients().is_none() {
            return;
        }
        // No record is due before a call of the most records could end: nothing to
        // look for (`next_expiry` is at or before the earliest deadline waiting).
        let longest = self.latency.estimate(self.policy.max_items());
        if self.next_expiry.is_none_or(|e| e > now + longest) {
            return;
        }
        loop {
            let Some(full) = self.policy.full_call(self.queue.iter().map(|j| &j.meta)) else {
                return;
            };
            let expected = self.latency.estimate(full);
            let hopeless = self.queue.remove_in_first(full, |j| {
                j.meta.deadline.is_some_and(|d| now + expected > d)
            });
            if hopeless.is_empty() {
                return;
            }
            for job in hopeless {
                self.fail_hopeless(job, now, expected);
            }
        }
    }

    /// Fails a record that cannot make its deadline in the call it would go in.
    fn fail_hopeless(&self, job: Job<B>, now: Instant, expected: Duration) {
        let left = job
            .meta
            .deadline
            .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
        let message = with_last_error(
            format!(
                "deadline {} ms away, nearer than the backend's expected latency ({} ms): failed before sending, after {} ms in the queue",
                left.as_millis(),
                expected.as_millis(),
                now.duration_since(job.meta.enqueued).as_millis()
            ),
            job.last_error.as_ref(),
        );
        let failure = Failure::new(ErrorKind::Timeout, message, job.attempts);
        job.finish(&self.instruments, Err(failure));
    }

    /// Fails the head record, too large for any batch.
    pub(super) fn reject_head(&mut self) {
        if let Some(job) = self.queue.pop_front() {
            let c = job.meta.cost;
            let failure = Failure::new(
                ErrorKind::InvalidInput,
                format!(
                    "record too large for any batch ({} bytes, {} tokens; see batch.max_bytes and batch.max_tokens)",
                    c.bytes, c.tokens
                ),
                job.attempts,
            );
            job.finish(&self.instruments, Err(failure));
        }
    }
}
