//! The execution engine: one queue, one batcher and one concurrency limiter per
//! backend, shared by every operator (and, later, every gateway caller) that submits
//! to it, so records from many streams are batched together.
//!
//! Mechanism only: the dispatcher task owns the queue and asks the pure
//! [`BatchPolicy`] when to cut a batch and the [`Limiter`] how many calls may run.
//! Each call runs in its own task, which delivers one outcome per record and reports
//! a [`Sample`] back to the dispatcher.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flumen_core::{Backend, BackendError, ErrorKind, Failure};
use futures::FutureExt;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, Sleep};

use crate::batcher::{BatchConfig, BatchPolicy, Decision, QueuedMeta};
use crate::limiter::{ConcurrencyConfig, Limiter, Sample, SampleOutcome};
use crate::stats::{Stats, StatsSnapshot};
use crate::{telemetry, LatencyModel};

/// Settings of an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// The engine's name: the `engine` label on its metrics.
    pub name: String,
    /// How batches are bounded and cut.
    pub batch: BatchConfig,
    /// How many backend calls may be in flight.
    pub concurrency: ConcurrencyConfig,
}

type Reply<O> = oneshot::Sender<Result<O, Failure>>;

struct Job<B: Backend> {
    input: B::Input,
    meta: QueuedMeta,
    attempts: u32,
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
        let policy = BatchPolicy::new(&config.batch, &backend.capabilities());
        let limiter = Limiter::new(&config.concurrency);
        let dispatcher = Dispatcher {
            backend: Arc::clone(&backend),
            rx,
            queue: VecDeque::new(),
            policy,
            limiter,
            latency: LatencyModel::default(),
            calls: JoinSet::new(),
            in_flight: 0,
            next_expiry: None,
            paused_until: None,
            stats: Arc::clone(&stats),
            instruments: Arc::new(Instruments::new(&config.name)),
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
    /// `deadline`, whether it is still queued or in a call by then. Dropping the
    /// future abandons the record: it is not sent if it has not been yet.
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

/// Metric handles, registered once per engine.
struct Instruments {
    queue_depth: Gauge,
    in_flight: Gauge,
    limit: Gauge,
    batch_size: Histogram,
    queue_time: Histogram,
    backend_latency: Histogram,
    ok: Counter,
    failed: Vec<Counter>,
}

impl Instruments {
    fn new(name: &str) -> Self {
        let engine = name.to_owned();
        let outcome = |o: &'static str| metrics::counter!(telemetry::OUTCOMES, "engine" => engine.clone(), "outcome" => o);
        Instruments {
            queue_depth: metrics::gauge!(telemetry::QUEUE_DEPTH, "engine" => engine.clone()),
            in_flight: metrics::gauge!(telemetry::BATCHES_IN_FLIGHT, "engine" => engine.clone()),
            limit: metrics::gauge!(telemetry::CONCURRENCY_LIMIT, "engine" => engine.clone()),
            batch_size: metrics::histogram!(telemetry::BATCH_SIZE, "engine" => engine.clone()),
            queue_time: metrics::histogram!(telemetry::QUEUE_TIME, "engine" => engine.clone()),
            backend_latency: metrics::histogram!(telemetry::BACKEND_LATENCY, "engine" => engine.clone()),
            ok: outcome("ok"),
            failed: ErrorKind::ALL.iter().map(|k| outcome(k.as_str())).collect(),
        }
    }

    fn failed(&self, kind: ErrorKind) -> &Counter {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.failed[i]
    }
}

struct Dispatcher<B: Backend> {
    backend: Arc<B>,
    rx: mpsc::UnboundedReceiver<Job<B>>,
    queue: VecDeque<Job<B>>,
    policy: BatchPolicy,
    limiter: Limiter,
    latency: LatencyModel,
    calls: JoinSet<Report>,
    in_flight: usize,
    next_expiry: Option<Instant>,
    /// After an overload answer no call is sent before this instant.
    paused_until: Option<Instant>,
    stats: Arc<Stats>,
    instruments: Arc<Instruments>,
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
            self.expire(now);
            let wake = self.dispatch(now);
            self.publish();
            if !open && self.queue.is_empty() && self.calls.is_empty() {
                return;
            }

            let wake = match (wake, self.next_expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if wake != armed {
                timer.as_mut().reset(wake.unwrap_or_else(far));
                armed = wake;
            }
            tokio::select! {
                biased;
                Some(done) = self.calls.join_next(), if !self.calls.is_empty() => {
                    self.in_flight -= 1;
                    if let Ok(report) = done {
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

    fn enqueue(&mut self, job: Job<B>) {
        if let Some(d) = job.meta.deadline {
            self.next_expiry = Some(self.next_expiry.map_or(d, |e| e.min(d)));
        }
        self.queue.push_back(job);
    }

    /// Fails queued records whose deadline has passed, before they are sent; forgets
    /// records whose submitter has gone away.
    fn expire(&mut self, now: Instant) {
        if self.next_expiry.is_none_or(|e| e > now) {
            return;
        }
        self.next_expiry = None;
        let mut expired = 0;
        for job in std::mem::take(&mut self.queue) {
            match job.meta.deadline {
                _ if job.reply.is_closed() => {}
                Some(d) if d <= now => {
                    let waited = now.duration_since(job.meta.enqueued);
                    let failure = Failure::new(
                        ErrorKind::Timeout,
                        format!(
                            "deadline passed after {} ms in the queue, before the record could be sent",
                            waited.as_millis()
                        ),
                        job.attempts,
                    );
                    let _ = job.reply.send(Err(failure));
                    expired += 1;
                }
                deadline => {
                    if let Some(d) = deadline {
                        self.next_expiry = Some(self.next_expiry.map_or(d, |e| e.min(d)));
                    }
                    self.queue.push_back(job);
                }
            }
        }
        self.instruments
            .failed(ErrorKind::Timeout)
            .increment(expired);
    }

    /// Sends batches while the policy says so; returns when to look again.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let paused = self.paused_until.filter(|p| *p > now);
        loop {
            let slot_free = self.in_flight < self.limiter.limit() && paused.is_none();
            let metas = self.queue.iter().map(|j| &j.meta);
            match self.policy.decide(now, slot_free, metas, &self.latency) {
                Decision::Send(n) => self.launch(n, now),
                Decision::RejectOversized => self.reject_head(),
                Decision::Wait(at) if self.queue.is_empty() => return at,
                Decision::Wait(at) => return at.or(paused),
            }
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
            let _ = job.reply.send(Err(failure));
            self.instruments
                .failed(ErrorKind::InvalidInput)
                .increment(1);
        }
    }

    fn launch(&mut self, n: usize, now: Instant) {
        let mut jobs: Vec<Job<B>> = Vec::with_capacity(n);
        for mut job in self.queue.drain(..n) {
            if job.reply.is_closed() {
                continue;
            }
            self.instruments
                .queue_time
                .record(now.duration_since(job.meta.enqueued));
            job.attempts += 1;
            jobs.push(job);
        }
        if jobs.is_empty() {
            return;
        }
        self.in_flight += 1;
        self.stats.call_sent(jobs.len());
        self.instruments.batch_size.record(jobs.len() as f64);
        let call = Call {
            backend: Arc::clone(&self.backend),
            instruments: Arc::clone(&self.instruments),
            sent_at: now,
            in_flight: self.in_flight,
            limit: self.limiter.limit(),
        };
        self.calls.spawn(call.run(jobs));
    }

    fn on_report(
        &mut self,
        Report {
            sample,
            retry_after,
        }: Report,
    ) {
        let now = Instant::now();
        match sample.outcome {
            SampleOutcome::Ok => self.latency.observe(sample.items, sample.rtt),
            // An overloaded backend is not called again before it asked, or, when it
            // did not say, before one call's expected latency: a backend answering
            // 429 at once must not be hammered in a loop.
            SampleOutcome::Overloaded => {
                let wait = retry_after
                    .unwrap_or_else(|| self.latency.estimate(1))
                    .max(MIN_OVERLOAD_PAUSE);
                let until = now + wait;
                self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
            }
            SampleOutcome::Dropped | SampleOutcome::Failed => {}
        }
        self.limiter.on_sample(now, &sample);
    }

    fn publish(&self) {
        let limit = self.limiter.limit();
        self.stats
            .set_gauges(self.queue.len(), self.in_flight, limit);
        self.instruments.queue_depth.set(self.queue.len() as f64);
        self.instruments.in_flight.set(self.in_flight as f64);
        self.instruments.limit.set(limit as f64);
    }
}

/// The shortest pause after an overload answer.
const MIN_OVERLOAD_PAUSE: Duration = Duration::from_millis(1);

/// What a finished call tells the dispatcher.
struct Report {
    sample: Sample,
    retry_after: Option<Duration>,
}

/// One backend call in its own task.
struct Call<B> {
    backend: Arc<B>,
    instruments: Arc<Instruments>,
    sent_at: Instant,
    in_flight: usize,
    limit: usize,
}

/// A record in a call, until its outcome is sent.
struct Waiting<O> {
    reply: Option<Reply<O>>,
    deadline: Option<Instant>,
    attempts: u32,
}

impl<B: Backend> Call<B> {
    async fn run(self, jobs: Vec<Job<B>>) -> Report {
        let items = jobs.len();
        let mut inputs = Vec::with_capacity(items);
        let mut waiting = Vec::with_capacity(items);
        for job in jobs {
            inputs.push(job.input);
            waiting.push(Waiting {
                reply: Some(job.reply),
                deadline: job.meta.deadline,
                attempts: job.attempts,
            });
        }

        let call = AssertUnwindSafe(self.backend.call(&inputs)).catch_unwind();
        tokio::pin!(call);
        let result = loop {
            let next_deadline = waiting
                .iter()
                .filter(|w| w.reply.is_some())
                .filter_map(|w| w.deadline)
                .min();
            tokio::select! {
                r = &mut call => break Some(r),
                () = sleep_until(next_deadline.unwrap_or(self.sent_at)), if next_deadline.is_some() => {
                    if self.time_out_expired(&mut waiting) {
                        // Every record has its outcome: abandon the call.
                        break None;
                    }
                }
            }
        };
        let rtt = self.sent_at.elapsed();
        self.instruments.backend_latency.record(rtt);

        let mut retry_after = None;
        let outcome = match result {
            None => SampleOutcome::Dropped,
            Some(Err(_panic)) => {
                let e = BackendError::permanent("the backend panicked during the call");
                self.fail_all(&mut waiting, &e);
                SampleOutcome::Failed
            }
            Some(Ok(Err(e))) => {
                retry_after = e.retry_after;
                self.fail_all(&mut waiting, &e);
                match e.kind {
                    ErrorKind::Overloaded => SampleOutcome::Overloaded,
                    ErrorKind::Timeout => SampleOutcome::Dropped,
                    _ => SampleOutcome::Failed,
                }
            }
            Some(Ok(Ok(results))) if results.len() != items => {
                let e = BackendError::permanent(format!(
                    "backend returned {} results for a batch of {items}",
                    results.len()
                ));
                self.fail_all(&mut waiting, &e);
                SampleOutcome::Failed
            }
            Some(Ok(Ok(results))) => {
                self.deliver(&mut waiting, results);
                SampleOutcome::Ok
            }
        };
        let sample = Sample {
            sent_at: self.sent_at,
            rtt,
            items,
            in_flight: self.in_flight,
            limit: self.limit,
            outcome,
        };
        Report {
            sample,
            retry_after,
        }
    }

    /// Fails the records whose deadline has passed; true when none is left waiting.
    fn time_out_expired(&self, waiting: &mut [Waiting<B::Output>]) -> bool {
        let now = Instant::now();
        let mut timed_out = 0;
        for w in waiting.iter_mut() {
            if w.deadline.is_some_and(|d| d <= now) {
                if let Some(reply) = w.reply.take() {
                    let failure = Failure::new(
                        ErrorKind::Timeout,
                        format!(
                            "deadline passed while the backend call was in flight ({} ms)",
                            now.duration_since(self.sent_at).as_millis()
                        ),
                        w.attempts,
                    );
                    let _ = reply.send(Err(failure));
                    timed_out += 1;
                }
            }
        }
        self.instruments
            .failed(ErrorKind::Timeout)
            .increment(timed_out);
        waiting
            .iter()
            .all(|w| w.reply.as_ref().is_none_or(|r| r.is_closed()))
    }

    fn fail_all(&self, waiting: &mut [Waiting<B::Output>], error: &BackendError) {
        let mut n = 0;
        for w in waiting.iter_mut() {
            if let Some(reply) = w.reply.take() {
                let _ = reply.send(Err(Failure::from_backend(error.clone(), w.attempts)));
                n += 1;
            }
        }
        self.instruments.failed(error.kind).increment(n);
    }

    fn deliver(
        &self,
        waiting: &mut [Waiting<B::Output>],
        results: Vec<Result<B::Output, BackendError>>,
    ) {
        let mut ok = 0;
        for (w, result) in waiting.iter_mut().zip(results) {
            let Some(reply) = w.reply.take() else {
                continue;
            };
            let outcome = match result {
                Ok(output) => {
                    ok += 1;
                    Ok(output)
                }
                Err(e) => {
                    self.instruments.failed(e.kind).increment(1);
                    Err(Failure::from_backend(e, w.attempts))
                }
            };
            let _ = reply.send(outcome);
        }
        self.instruments.ok.increment(ok);
    }
}
