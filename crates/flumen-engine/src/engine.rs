//! The execution engine: one queue, one batcher, one concurrency limiter, one
//! retry budget and one circuit breaker per backend, shared by every operator (and
//! every gateway caller) that submits to it, so records from many streams are
//! batched together.
//!
//! Mechanism only: the dispatcher task owns the queue and asks the pure
//! [`BatchPolicy`] when to cut a batch, the [`Limiter`] how many calls may run, the
//! [`Breaker`] whether calls may run at all, and the [`RetryConfig`] and
//! [`RetryBudget`] whether a failed record is sent again. Each call runs in its own
//! task, which delivers final outcomes itself and hands records worth another try
//! back to the dispatcher with a [`Sample`] of how the call went.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use flumen_core::{Backend, BackendError, ErrorKind, Failure};
use futures::FutureExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, Sleep};

use crate::batcher::{BatchConfig, BatchPolicy, Decision, QueuedMeta, Slots};
use crate::limiter::{ConcurrencyConfig, Limiter, Sample, SampleOutcome};
use crate::reliability::{
    Breaker, BreakerConfig, BreakerState, CallClass, RetryBudget, RetryConfig,
};
use crate::stats::{Stats, StatsSnapshot};
use crate::telemetry::Instruments;
use crate::LatencyModel;

/// Settings of an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// The engine's name: the `engine` label on its metrics.
    pub name: String,
    /// How batches are bounded and cut.
    pub batch: BatchConfig,
    /// How many backend calls may be in flight.
    pub concurrency: ConcurrencyConfig,
    /// How failed records are retried.
    pub retry: RetryConfig,
    /// The circuit breaker; `None` for none.
    pub breaker: Option<BreakerConfig>,
    /// The longest one call may take before it is abandoned and its records are
    /// retried (within their deadlines); `None` for no limit but the deadlines.
    pub attempt_timeout: Option<Duration>,
    /// Hedging, for idempotent backends: when a call has not answered after this
    /// long, send the same batch once more (paid from the retry budget, one token
    /// per record) and take whichever answers first. `None` (the default): never.
    pub hedge_after: Option<Duration>,
    /// Seed of the backoff jitter.
    pub seed: u64,
}

type Reply<O> = oneshot::Sender<Result<O, Failure>>;

struct Job<B: Backend> {
    input: B::Input,
    meta: QueuedMeta,
    attempts: u32,
    last_error: Option<BackendError>,
    /// Whether the retry budget has made this record wait.
    starved: bool,
    /// Attempts that do not count toward `max_attempts`: overload answers (the
    /// backend asked us to wait) and breaker probes (the breaker, not the record,
    /// was being tested) — for records with a deadline, which bounds them instead.
    uncounted: u32,
    reply: Reply<B::Output>,
}

struct Shared<B: Backend> {
    tx: mpsc::UnboundedSender<Job<B>>,
    backend: Arc<B>,
    stats: Arc<Stats>,
    name: String,
}

/// A handle to a running engine; cheap to clone, shared by every submitter.
///
/// The engine's dispatcher runs as a tokio task until the last handle is dropped
/// and every queued and in-flight record has its outcome.
pub struct Engine<B: Backend> {
    shared: Arc<Shared<B>>,
}

impl<B: Backend> Clone for Engine<B> {
    fn clone(&self) -> Self {
        Engine {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.shared.name)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<B: Backend> Engine<B> {
    /// Starts an engine for `backend` on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(backend: B, config: EngineConfig) -> Self {
        Engine::from_arc(Arc::new(backend), config)
    }

    /// Starts an engine for a backend that is shared with other code.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn from_arc(backend: Arc<B>, config: EngineConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let caps = backend.capabilities();
        let instruments = Arc::new(Instruments::new(&config.name));
        let dispatcher = Dispatcher {
            backend: Arc::clone(&backend),
            rx,
            queue: VecDeque::new(),
            delayed: BTreeMap::new(),
            isolated: VecDeque::new(),
            seq: 0,
            policy: BatchPolicy::new(&config.batch, &caps),
            limiter: Limiter::new(&config.concurrency),
            breaker: config.breaker.clone().map(Breaker::new),
            budget: Arc::new(Mutex::new(RetryBudget::new(&config.retry))),
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            latency: LatencyModel::default(),
            calls: JoinSet::new(),
            in_flight: 0,
            in_flight_items: 0,
            freed_at: None,
            next_expiry: None,
            paused_until: None,
            failure_streak: 0,
            stats: Arc::clone(&stats),
            instruments,
            attempt_timeout: config.attempt_timeout,
            hedge_after: config.hedge_after.filter(|_| caps.idempotent),
            retry: config.retry,
        };
        tokio::spawn(dispatcher.run());
        Engine {
            shared: Arc::new(Shared {
                tx,
                backend,
                stats,
                name: config.name,
            }),
        }
    }

    /// Queues one input; the returned future resolves to its one outcome.
    ///
    /// The record fails with [`ErrorKind::Timeout`] if it has no result by
    /// `deadline`, whether it is queued, waiting to be retried or in a call by then.
    /// Dropping the future abandons the record: it is not sent if it has not been yet.
    pub fn submit(&self, input: B::Input, deadline: Option<Instant>) -> Pending<B::Output> {
        let (reply, rx) = oneshot::channel();
        let cost = self.shared.backend.cost(&input);
        let job = Job {
            input,
            meta: QueuedMeta {
                enqueued: Instant::now(),
                deadline,
                cost,
            },
            attempts: 0,
            last_error: None,
            starved: false,
            uncounted: 0,
            reply,
        };
        // If the dispatcher is gone, the job (and its sender) is dropped here and
        // the receiver resolves to a Shutdown failure.
        let _ = self.shared.tx.send(job);
        Pending { rx }
    }

    /// Counters of this engine now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The circuit breaker's transitions so far, oldest first (at most the last 1,024).
    pub fn breaker_transitions(&self) -> Vec<(Instant, BreakerState)> {
        self.shared.stats.transitions()
    }

    /// The backend this engine calls.
    pub fn backend(&self) -> &Arc<B> {
        &self.shared.backend
    }

    /// The engine's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

/// The outcome of one submitted record, to come.
#[derive(Debug)]
#[must_use = "a record's outcome is only observed by awaiting its Pending"]
pub struct Pending<O> {
    rx: oneshot::Receiver<Result<O, Failure>>,
}

impl<O> Future for Pending<O> {
    type Output = Result<O, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                Err(Failure::new(
                    ErrorKind::Shutdown,
                    "the engine stopped before this record completed",
                    0,
                ))
            })
        })
    }
}

/// Sends a record's one outcome and counts it.
fn finish<O>(
    instruments: &Instruments,
    reply: Reply<O>,
    attempts: u32,
    result: Result<O, Failure>,
) {
    instruments.outcome(attempts, result.as_ref().err().map(|f| f.kind));
    let _ = reply.send(result);
}

/// "message (last error: …)" when there was one.
fn with_last_error(message: String, last: Option<&BackendError>) -> String {
    match last {
        Some(e) => format!("{message} (last error: {e})"),
        None => message,
    }
}

struct Dispatcher<B: Backend> {
    backend: Arc<B>,
    rx: mpsc::UnboundedReceiver<Job<B>>,
    /// Records ready to send, oldest first.
    queue: VecDeque<Job<B>>,
    /// Records waiting out a backoff, by when they may go again.
    delayed: BTreeMap<(Instant, u64), Job<B>>,
    /// Halves of batches that failed as a whole, each sent alone to find the record
    /// that poisoned them.
    isolated: VecDeque<Vec<Job<B>>>,
    seq: u64,
    policy: BatchPolicy,
    limiter: Limiter,
    breaker: Option<Breaker>,
    budget: Arc<Mutex<RetryBudget>>,
    rng: ChaCha8Rng,
    latency: LatencyModel,
    calls: JoinSet<Report<B>>,
    in_flight: usize,
    /// Records in the calls in flight.
    in_flight_items: usize,
    /// When a call last finished.
    freed_at: Option<Instant>,
    next_expiry: Option<Instant>,
    /// After an overload answer, or a run of failed calls, no call is sent before
    /// this instant.
    paused_until: Option<Instant>,
    /// Calls in a row that failed for the backend's sake.
    failure_streak: u32,
    stats: Arc<Stats>,
    instruments: Arc<Instruments>,
    attempt_timeout: Option<Duration>,
    hedge_after: Option<Duration>,
    retry: RetryConfig,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<B: Backend> Dispatcher<B> {
    async fn run(mut self) {
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(far()));
        let mut armed: Option<Instant> = None;
        let mut open = true;
        loop {
            while open {
                match self.rx.try_recv() {
                    Ok(job) => self.enqueue(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let now = Instant::now();
            self.release_due(now);
            self.expire(now);
            let wake = self.dispatch(now);
            self.publish(now);
            let idle = self.queue.is_empty() && self.delayed.is_empty() && self.isolated.is_empty();
            if !open && idle && self.calls.is_empty() {
                return;
            }

            let wake = earliest(wake, self.next_expiry);
            let wake = earliest(wake, self.delayed.keys().next().map(|k| k.0));
            if wake != armed {
                timer.as_mut().reset(wake.unwrap_or_else(far));
                armed = wake;
            }
            tokio::select! {
                biased;
                Some(done) = self.calls.join_next(), if !self.calls.is_empty() => {
                    self.in_flight -= 1;
                    self.freed_at = Some(Instant::now());
                    // A call task never panics: backend panics are caught inside it.
                    if let Ok(report) = done {
                        self.in_flight_items -= report.sample.items;
                        self.on_report(report);
                    }
                }
                job = self.rx.recv(), if open => match job {
                    Some(job) => self.enqueue(job),
                    None => open = false,
                },
                () = timer.as_mut(), if armed.is_some() => {
                    armed = None;
                    timer.as_mut().reset(far());
                }
            }
        }
    }

    fn note_deadline(&mut self, deadline: Option<Instant>) {
        self.next_expiry = earliest(self.next_expiry, deadline);
    }

    fn enqueue(&mut self, job: Job<B>) {
        if let Some(deadline) = job.meta.deadline {
            let now = Instant::now();
            if let Some(answer) = self.earliest_answer(now) {
                if answer > deadline {
                    self.shed(job, now, answer, deadline);
                    return;
                }
            }
        }
        self.note_deadline(job.meta.deadline);
        self.queue.push_back(job);
    }

    /// Behind a backlog (at least one full batch queued), the earliest a record
    /// queued now could have its answer: the full calls its predecessors need, `limit`
    /// at a time, then its own. `None` without a backlog or a latency sample.
    fn earliest_answer(&self, now: Instant) -> Option<Instant> {
        let full = self.policy.max_items();
        if self.queue.len() < full {
            return None;
        }
        self.latency.coefficients()?;
        let rounds = self.queue.len() / (full * self.limiter.limit().max(1));
        let call = self.latency.estimate(full);
        Some(now + call * u32::try_from(rounds + 1).unwrap_or(u32::MAX))
    }

    /// Fails a record that would miss its deadline behind the queue, before queueing
    /// it: under sustained overload a FIFO queue otherwise fills with records that
    /// reach the backend only as their deadlines pass, and every call carries records
    /// that time out in flight while fresh ones wait behind them.
    fn shed(&mut self, job: Job<B>, now: Instant, answer: Instant, deadline: Instant) {
        let failure = Failure::new(
            ErrorKind::Overloaded,
            format!(
                "shed before queueing: {} records ahead, an answer in about {} ms, the deadline in {} ms",
                self.queue.len(),
                answer.duration_since(now).as_millis(),
                deadline.saturating_duration_since(now).as_millis()
            ),
            job.attempts,
        );
        finish(&self.instruments, job.reply, job.attempts, Err(failure));
    }

    /// Moves retries whose backoff is over to the front of the queue (they are the
    /// oldest records), keeping their order, as far as the retry budget pays for
    /// them. The rest wait for the budget to refill, within their deadlines: a retry
    /// is never sent unpaid, and never turned into a failure while time remains.
    fn release_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        let mut budget = self.budget.lock().expect("budget lock");
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            if entry.get().reply.is_closed() {
                entry.remove();
                continue;
            }
            if !budget.try_withdraw(now) {
                let at = budget
                    .next_token_at(now)
                    .max(now + Duration::from_millis(1));
                let mut job = entry.remove();
                if !job.starved {
                    job.starved = true;
                    self.instruments.budget_exhausted.increment(1);
                }
                self.seq += 1;
                self.delayed.insert((at, self.seq), job);
                break;
            }
            let job = entry.remove();
            if let Some(e) = &job.last_error {
                self.instruments.retry(e.kind);
            }
            due.push(job);
        }
        drop(budget);
        for job in due.into_iter().rev() {
            self.note_deadline(job.meta.deadline);
            self.queue.push_front(job);
        }
    }

    /// Fails waiting records whose deadline has passed, before they are sent again;
    /// forgets records whose submitter has gone away.
    fn expire(&mut self, now: Instant) {
        if self.next_expiry.is_none_or(|e| e > now) {
            return;
        }
        self.next_expiry = None;
        let breaker_open = matches!(
            self.breaker.as_mut().map(|b| b.state(now)),
            Some(BreakerState::Open { .. })
        );
        let keep = |job: Job<B>, kept: &mut Vec<Job<B>>, next: &mut Option<Instant>| match job
            .meta
            .deadline
        {
            _ if job.reply.is_closed() => {}
            Some(d) if d <= now => {
                let waited = now.duration_since(job.meta.enqueued).as_millis();
                let why = if job.starved {
                    "waiting for the retry budget"
                } else if breaker_open {
                    "while the circuit breaker was open"
                } else {
                    "in the queue"
                };
                let message = with_last_error(
                    format!(
                        "deadline passed after {waited} ms, {why}, before the record could be sent"
                    ),
                    job.last_error.as_ref(),
                );
                let failure = Failure::new(ErrorKind::Timeout, message, job.attempts);
                finish(&self.instruments, job.reply, job.attempts, Err(failure));
            }
            deadline => {
                *next = earliest(*next, deadline);
                kept.push(job);
            }
        };
        let mut next = None;
        let mut kept = Vec::with_capacity(self.queue.len());
        for job in std::mem::take(&mut self.queue) {
            keep(job, &mut kept, &mut next);
        }
        self.queue = kept.into();
        for group in std::mem::take(&mut self.isolated) {
            let mut kept = Vec::with_capacity(group.len());
            for job in group {
                keep(job, &mut kept, &mut next);
            }
            if !kept.is_empty() {
                self.isolated.push_back(kept);
            }
        }
        for ((at, seq), job) in std::mem::take(&mut self.delayed) {
            let mut kept = Vec::with_capacity(1);
            keep(job, &mut kept, &mut next);
            if let Some(job) = kept.pop() {
                self.delayed.insert((at, seq), job);
            }
        }
        self.next_expiry = next;
    }

    /// Sends batches while the policy allows; returns when to look again.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let paused = self.paused_until.filter(|p| *p > now);
        loop {
            let breaker_allows = self.breaker.as_mut().is_none_or(|b| b.allows(now));
            let free_slots = if paused.is_none() && breaker_allows {
                self.limiter.limit().saturating_sub(self.in_flight)
            } else {
                0
            };
            if free_slots > 0 && self.launch_isolated(now) {
                continue;
            }
            let metas = self.queue.iter().map(|j| &j.meta);
            let slots = Slots {
                free: free_slots,
                busy: self.in_flight,
                busy_items: self.in_flight_items,
                freed_at: self.freed_at,
            };
            match self.policy.decide(now, slots, metas, &self.latency) {
                Decision::Send(n) => {
                    let jobs: Vec<Job<B>> = self.queue.drain(..n).collect();
                    self.launch(jobs, now);
                }
                Decision::RejectOversized => self.reject_head(),
                Decision::RejectHopeless { expected } => self.fail_hopeless_head(now, expected),
                Decision::Wait(at) => {
                    if self.queue.is_empty() && self.isolated.is_empty() {
                        return at;
                    }
                    let reopens = self.breaker.as_ref().and_then(Breaker::reopens_at);
                    let mut wake = earliest(earliest(at, paused), reopens);
                    if !self.isolated.is_empty() {
                        let budget = self.budget.lock().expect("budget lock").next_token_at(now);
                        wake = earliest(wake, Some(budget.max(now + Duration::from_millis(1))));
                    }
                    return wake;
                }
            }
        }
    }

    /// Sends the first bisection group, or as much of it as the retry budget pays
    /// for; false when there is none or the budget is empty.
    fn launch_isolated(&mut self, now: Instant) -> bool {
        let Some(group) = self.isolated.front_mut() else {
            return false;
        };
        let mut budget = self.budget.lock().expect("budget lock");
        let n = budget.affordable(now, group.len());
        if n == 0 {
            return false;
        }
        for _ in 0..n {
            budget.try_withdraw(now);
        }
        drop(budget);
        let rest = group.split_off(n);
        let paid = std::mem::replace(group, rest);
        if self.isolated.front().is_some_and(Vec::is_empty) {
            self.isolated.pop_front();
        }
        for job in &paid {
            if let Some(e) = &job.last_error {
                self.instruments.retry(e.kind);
            }
        }
        self.launch(paid, now);
        true
    }

    fn fail_hopeless_head(&mut self, now: Instant, expected: Duration) {
        if let Some(job) = self.queue.pop_front() {
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
            finish(&self.instruments, job.reply, job.attempts, Err(failure));
        }
    }

    fn reject_head(&mut self) {
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
            finish(&self.instruments, job.reply, job.attempts, Err(failure));
        }
    }

    fn launch(&mut self, jobs: Vec<Job<B>>, now: Instant) {
        let mut batch: Vec<Job<B>> = Vec::with_capacity(jobs.len());
        let mut first = 0;
        for mut job in jobs {
            if job.reply.is_closed() {
                continue;
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
        self.stats.call_sent(batch.len(), first);
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
        };
        self.calls.spawn(call.run(batch));
    }

    fn on_report(&mut self, report: Report<B>) {
        let now = Instant::now();
        let sample = report.sample;
        match sample.outcome {
            SampleOutcome::Ok => self.latency.observe(sample.items, sample.rtt),
            // An overloaded backend is not called again before it asked, or, when it
            // did not say, before one call's expected latency: a backend answering
            // 429 at once must not be hammered in a loop.
            SampleOutcome::Overloaded => {
                let wait = report
                    .retry_after
                    .unwrap_or_else(|| self.latency.estimate(1))
                    .max(MIN_OVERLOAD_PAUSE);
                self.pause(now + wait);
            }
            SampleOutcome::Dropped | SampleOutcome::Failed => {}
        }
        self.limiter.on_sample(now, &sample);
        // A backend failing call after call is not sent call after call: from the
        // second failure in a row, pause with the retry backoff (jittered, growing
        // with the streak), so an outage burns few attempts before the breaker (if
        // any) opens. One success ends the streak.
        match report.class {
            CallClass::Failure => {
                self.failure_streak += 1;
                if self.failure_streak >= 2 {
                    let wait = self
                        .retry
                        .backoff(self.failure_streak - 1, None, &mut self.rng);
                    self.pause(now + wait);
                }
            }
            CallClass::Success => self.failure_streak = 0,
            CallClass::Ignored => {}
        }
        if let Some(b) = self.breaker.as_mut() {
            b.on_result(now, report.class, sample.rtt, report.probe);
            for (at, state) in b.take_transitions() {
                self.instruments.breaker_transition(state);
                self.stats.push_transition(at, state);
            }
        }
        for (mut job, error) in report.retry {
            if report.probe && job.meta.deadline.is_some() {
                job.uncounted += 1;
            }
            self.retry(job, error, now);
        }
        if let Some((jobs, error)) = report.split {
            self.split(jobs, error);
        }
    }

    fn pause(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    /// Schedules another attempt for a record after its backoff, or gives it its
    /// final failure. The retry budget is charged when the attempt is sent.
    fn retry(&mut self, mut job: Job<B>, error: BackendError, now: Instant) {
        if job.reply.is_closed() {
            return;
        }
        // Waiting out overload (and breaker probes, below) is free only for a record
        // with a deadline: without one, max_attempts is all that ends it.
        if error.kind == ErrorKind::Overloaded && job.meta.deadline.is_some() {
            job.uncounted += 1;
        }
        if job.attempts.saturating_sub(job.uncounted) >= self.retry.max_attempts {
            let failure = Failure::from_backend(error, job.attempts);
            return finish(&self.instruments, job.reply, job.attempts, Err(failure));
        }
        let at = now
            + self
                .retry
                .backoff(job.attempts, error.retry_after, &mut self.rng);
        if job.meta.deadline.is_some_and(|d| at >= d) {
            let message = with_last_error(
                format!(
                    "deadline would pass before attempt {} could start",
                    job.attempts + 1
                ),
                Some(&error),
            );
            let failure = Failure::new(ErrorKind::Timeout, message, job.attempts);
            return finish(&self.instruments, job.reply, job.attempts, Err(failure));
        }
        job.last_error = Some(error);
        self.note_deadline(job.meta.deadline);
        self.seq += 1;
        self.delayed.insert((at, self.seq), job);
    }

    /// A batch failed as a whole with an error that is not worth retrying as is:
    /// perhaps one record poisoned it. Each half is sent again on its own (paid from
    /// the retry budget when sent), so the poison ends up alone; a record alone
    /// that still fails gets the error.
    fn split(&mut self, mut jobs: Vec<Job<B>>, error: BackendError) {
        jobs.retain(|j| !j.reply.is_closed());
        for job in &mut jobs {
            job.last_error = Some(error.clone());
        }
        let second = jobs.split_off(jobs.len() / 2);
        for half in [jobs, second] {
            if !half.is_empty() {
                let deadline = half.iter().filter_map(|j| j.meta.deadline).min();
                self.note_deadline(deadline);
                self.isolated.push_back(half);
            }
        }
    }

    fn publish(&mut self, now: Instant) {
        let limit = self.limiter.limit();
        let queued = self.queue.len()
            + self.delayed.len()
            + self.isolated.iter().map(Vec::len).sum::<usize>();
        let breaker = self
            .breaker
            .as_mut()
            .map_or(BreakerState::Closed, |b| b.state(now));
        self.stats
            .set_gauges(queued, self.in_flight, limit, breaker.level());
        self.instruments
            .gauges(queued, self.in_flight, limit, breaker.level());
    }
}

/// The shortest pause after an overload answer.
const MIN_OVERLOAD_PAUSE: Duration = Duration::from_millis(1);

/// What a finished call tells the dispatcher.
struct Report<B: Backend> {
    sample: Sample,
    retry_after: Option<Duration>,
    class: CallClass,
    probe: bool,
    /// Records worth another attempt, with the error of this one.
    retry: Vec<(Job<B>, BackendError)>,
    /// A batch that failed as a whole with a non-retryable error, to bisect.
    split: Option<(Vec<Job<B>>, BackendError)>,
}

/// One backend call in its own task.
struct Call<B> {
    backend: Arc<B>,
    instruments: Arc<Instruments>,
    stats: Arc<Stats>,
    budget: Arc<Mutex<RetryBudget>>,
    sent_at: Instant,
    in_flight: usize,
    limit: usize,
    probe: bool,
    attempt_timeout: Option<Duration>,
    hedge_after: Option<Duration>,
}

/// A record in a call, while it waits for its result.
struct Waiting<O> {
    reply: Option<Reply<O>>,
    meta: QueuedMeta,
    attempts: u32,
    uncounted: u32,
    last_error: Option<BackendError>,
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
    async fn run(self, jobs: Vec<Job<B>>) -> Report<B> {
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
                last_error: job.last_error,
            });
        }

        let hedged = AtomicBool::new(false);
        let ended = self.call(&inputs, &mut waiting, &hedged).await;
        let rtt = self.sent_at.elapsed();
        self.instruments.backend_latency.record(rtt);
        let extra = u32::from(hedged.load(Relaxed));

        let mut report = Report {
            sample: Sample {
                sent_at: self.sent_at,
                rtt,
                items,
                tokens,
                in_flight: self.in_flight,
                limit: self.limit,
                outcome: SampleOutcome::Ok,
            },
            retry_after: None,
            class: CallClass::Success,
            probe: self.probe,
            retry: Vec::new(),
            split: None,
        };
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
                    reply,
                })
            })
            .collect();
        let fail_all = |slots: Vec<Option<Job<B>>>, e: &BackendError| {
            for job in slots.into_iter().flatten() {
                let f = Failure::from_backend(e.clone(), job.attempts);
                finish(&self.instruments, job.reply, job.attempts, Err(f));
            }
        };
        match ended {
            Ended::Abandoned => {
                report.sample.outcome = SampleOutcome::Dropped;
                report.class = CallClass::Ignored;
            }
            Ended::AttemptTimeout => {
                report.sample.outcome = SampleOutcome::Dropped;
                report.class = CallClass::Failure;
                let ms = self.attempt_timeout.unwrap_or_default().as_millis();
                let e = BackendError::new(
                    ErrorKind::Timeout,
                    format!("attempt timed out after {ms} ms"),
                );
                report.retry = slots
                    .into_iter()
                    .flatten()
                    .map(|j| (j, e.clone()))
                    .collect();
            }
            Ended::Panicked => {
                report.sample.outcome = SampleOutcome::Failed;
                report.class = CallClass::Failure;
                fail_all(
                    slots,
                    &BackendError::permanent("the backend panicked during the call"),
                );
            }
            Ended::Returned(Err(e)) => {
                report.retry_after = e.retry_after;
                (report.sample.outcome, report.class) = match e.kind {
                    ErrorKind::Overloaded => (SampleOutcome::Overloaded, CallClass::Ignored),
                    ErrorKind::Timeout => (SampleOutcome::Dropped, CallClass::Failure),
                    ErrorKind::Transient => (SampleOutcome::Failed, CallClass::Failure),
                    _ => (SampleOutcome::Failed, CallClass::Ignored),
                };
                let pending: Vec<Job<B>> = slots.into_iter().flatten().collect();
                let poisonable = matches!(e.kind, ErrorKind::Permanent | ErrorKind::InvalidInput);
                if RetryConfig::retryable(e.kind) {
                    report.retry = pending.into_iter().map(|j| (j, e.clone())).collect();
                } else if poisonable && pending.len() > 1 {
                    report.split = Some((pending, e));
                } else {
                    fail_all(pending.into_iter().map(Some).collect(), &e);
                }
            }
            Ended::Returned(Ok(results)) if results.len() != items => {
                report.sample.outcome = SampleOutcome::Failed;
                report.class = CallClass::Ignored;
                let e = BackendError::permanent(format!(
                    "backend returned {} results for a batch of {items}",
                    results.len()
                ));
                fail_all(slots, &e);
            }
            Ended::Returned(Ok(results)) => {
                let (mut answered, mut retryable) = (0usize, 0usize);
                for (slot, result) in slots.into_iter().zip(results) {
                    let Some(job) = slot else { continue };
                    answered += 1;
                    match result {
                        Ok(output) => {
                            finish(&self.instruments, job.reply, job.attempts, Ok(output));
                        }
                        Err(e) if RetryConfig::retryable(e.kind) => {
                            retryable += 1;
                            report.retry.push((job, e));
                        }
                        Err(e) => {
                            let f = Failure::from_backend(e, job.attempts);
                            finish(&self.instruments, job.reply, job.attempts, Err(f));
                        }
                    }
                }
                // A call whose every record failed for the backend's sake is a failure.
                if answered > 0 && retryable == answered {
                    report.class = CallClass::Failure;
                }
            }
        }
        report
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
            self.stats.call_sent(inputs.len(), 0);
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
                    finish(&self.instruments, reply, w.attempts, Err(failure));
                }
            }
        }
        waiting
            .iter()
            .all(|w| w.reply.as_ref().is_none_or(|r| r.is_closed()))
    }
}
