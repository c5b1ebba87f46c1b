//! The execution engine: one queue, one batcher, one concurrency limiter, one
//! retry budget and one circuit breaker per backend, shared by every operator (and
//! every gateway caller) that submits to it, so records from many streams are
//! batched together.
//!
//! Mechanism only, in three parts:
//! - this module: the handle ([`Engine`]) that queues records and the [`Pending`]
//!   outcome each submitter awaits;
//! - `dispatcher`: the task that owns the queue and asks the pure policies what to
//!   do — [`BatchPolicy`](crate::BatchPolicy) when to cut a batch and whether a
//!   record is shed at enqueue, the [`Limiter`](crate::Limiter) how many calls may
//!   run, the [`Breaker`](crate::Breaker) whether calls may run at all,
//!   [`RetryConfig::verdict`](crate::RetryConfig::verdict) and the
//!   [`RetryBudget`](crate::RetryBudget) whether a failed record is sent again, and
//!   the pause policy when not to call for a while;
//! - `call`: one backend call in its own task, which delivers final outcomes itself
//!   and hands records worth another try back to the dispatcher, with the call
//!   judged by the pure classification in `reliability::classify`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use flumen_core::{Backend, BackendError, ErrorKind, Failure};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::batcher::{BatchConfig, QueuedMeta};
use crate::limiter::ConcurrencyConfig;
use crate::reliability::{BreakerConfig, BreakerState, RetryConfig};
use crate::stats::{Stats, StatsSnapshot};
use crate::telemetry::Instruments;

mod cache;
mod call;
mod dispatcher;

pub use cache::{CacheConfig, CacheStats, STORE_REST};

use dispatcher::Dispatcher;

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
    /// The result cache, for backends that give their inputs a
    /// [`cache_key`](Backend::cache_key); `None` (the default): none.
    pub cache: Option<CacheConfig>,
    /// A spending budget that every call is reserved from and settled against (see
    /// [`spend`](crate::spend)); `None` (the default): none. With one, hedging is off
    /// (a hedge would spend twice for one answer).
    pub spend: Option<crate::spend::SpendConfig>,
    /// What the backend's tokens cost, for the cost in [`StatsSnapshot::cost_nanos`]
    /// and the `flumen_cost_total` metric; `None` (the default): not counted.
    pub prices: Option<crate::spend::Prices>,
    /// How priority classes share the engine (see [`schedule`](crate::schedule)).
    pub scheduling: crate::SchedulingConfig,
    /// An upstream's rate limits, asked before each call (see [`rate`](crate::rate));
    /// `None` (the default): none. With one, hedging is off (a hedge is a second
    /// request).
    pub rate: Option<Arc<dyn crate::rate::RateGate>>,
    /// Whether something else can answer for this engine's records (an operator's
    /// fallback chain): then no record waits for a backend that is failing. Overload
    /// answers count toward `max_attempts` instead of being waited out, and while
    /// the engine is paused after two or more failed calls in a row, or its breaker
    /// is open, the records waiting fail at once as transient ("handed on unsent"),
    /// for the next stage to answer. Off by default.
    pub hand_off: bool,
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
    /// The input tokens a send of this record is billed (see
    /// [`Backend::billed_input_tokens`]).
    billed: u64,
    /// Its class and tenant: where it waits in the queue.
    lane: crate::Lane,
    /// The record's span (`record`, at debug level): open from submission to outcome.
    span: tracing::Span,
    /// The span of the attempt in flight (`attempt`, a child of `span`).
    attempt: tracing::Span,
    reply: Reply<B::Output>,
}

struct Shared<B: Backend> {
    tx: mpsc::UnboundedSender<Job<B>>,
    backend: Arc<B>,
    stats: Arc<Stats>,
    instruments: Arc<Instruments>,
    cache: Option<cache::Cache>,
    prices: Option<crate::spend::Prices>,
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
        let instruments = Arc::new(Instruments::new(&config.name, Arc::clone(&stats)));
        let dispatcher = Dispatcher::new(
            Arc::clone(&backend),
            &config,
            rx,
            Arc::clone(&stats),
            Arc::clone(&instruments),
        );
        tokio::spawn(dispatcher.run());
        let cache = config
            .cache
            .as_ref()
            .map(|c| cache::Cache::new(c, &config.name));
        Engine {
            shared: Arc::new(Shared {
                tx,
                backend,
                stats,
                instruments,
                cache,
                prices: config.prices,
                name: config.name,
            }),
        }
    }

    /// Queues one input; the returned future resolves to its one outcome.
    ///
    /// The record fails with [`ErrorKind::Timeout`] if it has no result by
    /// `deadline`, whether it is queued, waiting to be retried or in a call by then.
    /// Dropping the future abandons the record: it is not sent if it has not been yet.
    ///
    /// With a result cache, a record whose backend gives it a key is first looked
    /// up, and shares the call of an identical record in flight (see
    /// [`CacheConfig`]); it is queued only when the future is first polled.
    ///
    /// Identical records share the first one's lookup and call, which run while
    /// *its* future is polled: await records together (as the operator and
    /// `join_all` do), not one after another while an earlier one is left unpolled.
    pub fn submit(&self, input: B::Input, deadline: Option<Instant>) -> Pending<B::Output> {
        self.submit_in(input, deadline, crate::Lane::default())
    }

    /// [`submit`](Self::submit) in a lane: a priority class and a tenant, which say
    /// where the record waits in the queue (see [`schedule`](crate::schedule)).
    pub fn submit_in(
        &self,
        input: B::Input,
        deadline: Option<Instant>,
        lane: crate::Lane,
    ) -> Pending<B::Output> {
        let backend = &self.shared.backend;
        let cost = backend.cost(&input);
        let billed = backend.billed_input_tokens(&input).unwrap_or(cost.tokens);
        let span = tracing::debug_span!(
            "record",
            engine = %self.shared.name,
            outcome = tracing::field::Empty,
            attempts = tracing::field::Empty,
            cached = tracing::field::Empty,
        );
        let key = self
            .shared
            .cache
            .as_ref()
            .and_then(|cache| Some(cache.key(&backend.cache_key(&input)?)));
        let queued = Queued {
            input,
            deadline,
            cost,
            billed,
            lane,
            span,
        };
        let inner = match key {
            Some(key) => PendingInner::Cached(Box::pin(self.clone().cached(key, queued))),
            None => PendingInner::Queued(self.enqueue(queued)),
        };
        Pending {
            inner,
            input_tokens: billed,
        }
    }

    /// What a record that had `outcome` cost: its input tokens (one send's worth),
    /// its answer's output tokens, at the engine's prices; nothing when the answer
    /// came from the cache.
    pub fn receipt(&self, outcome: &Result<B::Output, Failure>, detail: Detail) -> Receipt {
        let output_tokens = outcome
            .as_ref()
            .map_or(0, |o| self.shared.backend.output_tokens(o));
        let paid = !detail.from_cache && outcome.is_ok();
        Receipt {
            from_cache: detail.from_cache,
            input_tokens: detail.input_tokens,
            output_tokens,
            cost: self.shared.prices.map(|p| {
                if paid {
                    p.nanos(detail.input_tokens, output_tokens) as f64 / 1e9
                } else {
                    0.0
                }
            }),
        }
    }

    /// A record through the result cache: led or followed, then looked up, then
    /// queued (see `cache.rs`). True with an answer from the store or another
    /// record's call.
    async fn cached(
        self,
        key: flumen_core::CacheKey,
        queued: Queued<B::Input>,
    ) -> (Result<B::Output, Failure>, bool) {
        let deadline = queued.deadline;
        let started = Instant::now();
        let span = queued.span.clone();
        let cache = self
            .shared
            .cache
            .as_ref()
            .expect("cached only with a cache");
        let backend = &self.shared.backend;
        let instruments = &self.shared.instruments;
        let guard = loop {
            match cache.join(key) {
                cache::Role::Leader(guard) => break guard,
                cache::Role::Follower(rx) => match cache::follow(rx, deadline).await {
                    Ok(Some(Ok(bytes))) => match backend.decode_output(&bytes) {
                        Some(output) => {
                            cache.shared();
                            instruments.outcome(0, None, started.elapsed());
                            span.record("outcome", "ok");
                            span.record("cached", true);
                            return (Ok(output), true);
                        }
                        None => cache.undecodable(),
                    },
                    Ok(Some(Err(failure))) | Err(failure) => {
                        instruments.outcome(
                            failure.attempts,
                            Some(failure.kind),
                            started.elapsed(),
                        );
                        span.record("outcome", failure.kind.as_str());
                        return (Err(failure), false);
                    }
                    Ok(None) => {}
                },
            }
        };
        if let cache::Lookup::Hit(bytes) = cache.get(&key).await {
            match backend.decode_output(&bytes) {
                Some(output) => {
                    cache.hit();
                    instruments.outcome(0, None, started.elapsed());
                    span.record("outcome", "ok");
                    span.record("cached", true);
                    guard.answer(bytes);
                    return (Ok(output), true);
                }
                None => cache.undecodable(),
            }
        }
        cache.miss();
        // From here the job carries the record's span, to its outcome.
        drop(span);
        let result = recv(self.enqueue(queued)).await;
        match &result {
            Ok(output) => {
                if let Some(bytes) = backend.encode_output(output) {
                    cache.put(&key, &bytes, deadline).await;
                    guard.answer(bytes);
                }
            }
            Err(f) if matches!(f.kind, ErrorKind::InvalidInput | ErrorKind::Permanent) => {
                guard.fail(f);
            }
            // The leader's own failure: its followers lead again (the guard drops).
            Err(_) => {}
        }
        (result, false)
    }

    /// Queues one input for the dispatcher; its outcome comes on the receiver.
    fn enqueue(&self, q: Queued<B::Input>) -> oneshot::Receiver<Result<B::Output, Failure>> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            input: q.input,
            meta: QueuedMeta {
                enqueued: Instant::now(),
                deadline: q.deadline,
                cost: q.cost,
            },
            attempts: 0,
            last_error: None,
            starved: false,
            uncounted: 0,
            billed: q.billed,
            lane: q.lane,
            span: q.span,
            attempt: tracing::Span::none(),
            reply,
        };
        // If the dispatcher is gone, the job (and its sender) is dropped here and
        // the receiver resolves to a Shutdown failure.
        let _ = self.shared.tx.send(job);
        rx
    }

    /// Counters of this engine now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// What the result cache has done so far; `None` without one.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.shared.cache.as_ref().map(|c| c.counters.snapshot())
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

/// A record about to be queued: its input and what was computed of it once.
struct Queued<I> {
    input: I,
    deadline: Option<Instant>,
    cost: flumen_core::ItemCost,
    billed: u64,
    lane: crate::Lane,
    span: tracing::Span,
}

/// The outcome of one submitted record, to come.
#[must_use = "a record's outcome is only observed by awaiting its Pending"]
pub struct Pending<O> {
    inner: PendingInner<O>,
    input_tokens: u64,
}

type Outcome<O> = Result<O, Failure>;

enum PendingInner<O> {
    /// Queued: the dispatcher will answer.
    Queued(oneshot::Receiver<Outcome<O>>),
    /// Through the result cache (true: answered from it).
    Cached(Pin<Box<dyn Future<Output = (Outcome<O>, bool)> + Send>>),
}

/// How a record was answered, beside its outcome: see [`Pending::poll_detailed`]
/// and [`Engine::receipt`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Detail {
    /// Answered from the result cache, or by an identical record's call.
    pub from_cache: bool,
    /// The record's input tokens, by the backend's count.
    pub input_tokens: u64,
}

/// What one record cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Receipt {
    /// Answered from the result cache (or by an identical record's call): it cost
    /// nothing.
    pub from_cache: bool,
    /// Its input tokens (one send's worth: a retried record was paid again, which
    /// the engine's totals count).
    pub input_tokens: u64,
    /// Its answer's output tokens.
    pub output_tokens: u64,
    /// What it cost at the engine's prices (`None` without prices).
    pub cost: Option<f64>,
}

impl<O> std::fmt::Debug for Pending<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            PendingInner::Queued(_) => "Pending(queued)",
            PendingInner::Cached(_) => "Pending(cached)",
        })
    }
}

/// The receiver's outcome: a dropped reply is a `Shutdown` failure, never nothing.
fn received<O>(r: Result<Outcome<O>, oneshot::error::RecvError>) -> Outcome<O> {
    r.unwrap_or_else(|_| {
        Err(Failure::new(
            ErrorKind::Shutdown,
            "the engine stopped before this record completed",
            0,
        ))
    })
}

async fn recv<O>(rx: oneshot::Receiver<Outcome<O>>) -> Outcome<O> {
    received(rx.await)
}

impl<O> Pending<O> {
    /// Polls for the outcome with how it was answered.
    pub fn poll_detailed(&mut self, cx: &mut Context<'_>) -> Poll<(Outcome<O>, Detail)> {
        let input_tokens = self.input_tokens;
        let (outcome, from_cache) = match &mut self.inner {
            PendingInner::Queued(rx) => match Pin::new(rx).poll(cx) {
                Poll::Ready(r) => (received(r), false),
                Poll::Pending => return Poll::Pending,
            },
            PendingInner::Cached(f) => match f.as_mut().poll(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready((
            outcome,
            Detail {
                from_cache,
                input_tokens,
            },
        ))
    }
}

impl<O> Future for Pending<O> {
    type Output = Outcome<O>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_detailed(cx).map(|(outcome, _)| outcome)
    }
}

/// Sends a record's one outcome and counts it.
fn finish<O>(
    instruments: &Instruments,
    span: &tracing::Span,
    enqueued: Instant,
    reply: Reply<O>,
    attempts: u32,
    result: Result<O, Failure>,
) {
    let latency = enqueued.elapsed();
    span.record(
        "outcome",
        result.as_ref().err().map_or("ok", |f| f.kind.as_str()),
    );
    span.record("attempts", u64::from(attempts));
    instruments.outcome(attempts, result.as_ref().err().map(|f| f.kind), latency);
    let _ = reply.send(result);
}

impl<B: Backend> crate::schedule::Scheduled for Job<B> {
    fn lane(&self) -> &crate::Lane {
        &self.lane
    }
    fn deadline(&self) -> Option<Instant> {
        self.meta.deadline
    }
}

impl<B: Backend> Job<B> {
    /// Sends this record's one outcome and counts it.
    fn finish(self, instruments: &Instruments, result: Result<B::Output, Failure>) {
        finish(
            instruments,
            &self.span,
            self.meta.enqueued,
            self.reply,
            self.attempts,
            result,
        );
    }
}

/// "message (last error: …)" when there was one.
fn with_last_error(message: String, last: Option<&BackendError>) -> String {
    match last {
        Some(e) => format!("{message} (last error: {e})"),
        None => message,
    }
}
