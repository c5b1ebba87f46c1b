//! The inference operator: wraps any `Stream` of records and yields exactly one
//! [`Outcome`] per record, in the chosen [`OrderMode`], with at most `capacity`
//! records in flight (the backpressure).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use flumen_core::{Backend, ErrorKind, Failure};
use futures::stream::{Fuse, FusedStream, FuturesUnordered};
use futures::{Stream, StreamExt};
use metrics::{Counter, Histogram};
use slab::Slab;
use tokio::time::Instant;

use crate::engine::{Detail, Engine, Pending, Receipt};
use crate::fallback::{Fallback, Served};
use crate::telemetry;

/// In which order outcomes leave the operator (Flink's `output-mode`, plus `Keyed`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OrderMode {
    /// As soon as each completes (the default): one slow record blocks no one.
    #[default]
    Unordered,
    /// In input order: a slow record holds back every later one.
    Ordered,
    /// In input order among records with the same key (a Kafka partition's
    /// semantics); records with different keys overtake each other. Set the key with
    /// [`Infer::keyed_by`]; without one, every record shares one key (= `Ordered`).
    Keyed,
}

/// Settings of one inference operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorConfig {
    /// Output order.
    pub order: OrderMode,
    /// Records in flight at most (taken from the input, not yet yielded, including
    /// completed ones held back for ordering). When full the operator stops polling
    /// its input: that is the backpressure. Default 100, as Flink's Async I/O.
    pub capacity: usize,
    /// Each record's deadline, from when the operator takes it; on expiry it fails
    /// with [`ErrorKind::Timeout`]. `None` waits forever. Default 60 s.
    pub timeout: Option<Duration>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            order: OrderMode::Unordered,
            capacity: 100,
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// One record's outcome: the record itself and its prediction or failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<R, O> {
    /// The input record, as it came in (for joins and dead-letter outputs).
    pub record: R,
    /// The prediction, or why there is none.
    pub result: Result<O, Failure>,
    /// Who produced the result: the primary engine or a fallback stage.
    pub served: Served,
    /// What the record cost at the primary engine (zero for an answer from a
    /// fallback stage, or a record refused before reaching the engine).
    pub receipt: Receipt,
}

/// Adds [`infer`](InferExt::infer) to every stream.
pub trait InferExt: Stream + Sized {
    /// Runs every record through `engine`. `extract` makes the backend's input from
    /// a record; an `Err(reason)` fails that record as invalid input without calling
    /// the backend.
    fn infer<B, F>(
        self,
        engine: &Engine<B>,
        config: OperatorConfig,
        extract: F,
    ) -> Infer<Self, B, F>
    where
        B: Backend,
        F: FnMut(&Self::Item) -> Result<B::Input, String>,
    {
        Infer::new(self, engine, config, extract)
    }
}

impl<S: Stream> InferExt for S {}

type KeyFn<R> = Box<dyn FnMut(&R) -> u64 + Send>;
type LaneFn<R> = Box<dyn FnMut(&R) -> crate::Lane + Send>;

struct Entry<R, O> {
    record: R,
    key: u64,
    taken: Instant,
    result: Option<Result<O, Failure>>,
    served: Served,
    /// The primary failure, while fallback stages run.
    primary: Option<Failure>,
    /// How the primary engine answered.
    detail: Detail,
}

/// A running fallback stage: (slot, stage, result).
type FallbackRun<O> = Pin<Box<dyn Future<Output = (usize, usize, Result<O, Failure>)> + Send>>;

/// Whether a failure of `kind` moves a record on to the next fallback stage: not
/// when the record itself is the problem (invalid input, a content refusal), when
/// the answer is (invalid output: the same prompt goes to the next stage), or when
/// the engine is stopping.
fn moves_on(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::InvalidInput | ErrorKind::InvalidOutput | ErrorKind::Shutdown
    )
}

/// One fallback stage of an operator, with its metric handles.
struct Stage<I, O> {
    fallback: Fallback<I, O>,
    ok: Counter,
    failed: Counter,
}

/// A record's pending outcome, tagged with its slot.
struct Tagged<O> {
    slot: usize,
    pending: Pending<O>,
}

impl<O> Future for Tagged<O> {
    type Output = (usize, Result<O, Failure>, Detail);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = self.slot;
        self.pending
            .poll_detailed(cx)
            .map(|(r, detail)| (slot, r, detail))
    }
}

/// The stream returned by [`InferExt::infer`].
#[must_use = "streams do nothing unless polled"]
pub struct Infer<S: Stream, B: Backend, F> {
    input: Pin<Box<Fuse<S>>>,
    engine: Engine<B>,
    extract: F,
    key: Option<KeyFn<S::Item>>,
    lane: Option<LaneFn<S::Item>>,
    config: OperatorConfig,
    entries: Slab<Entry<S::Item, B::Output>>,
    pending: FuturesUnordered<Tagged<B::Output>>,
    fallbacks: Vec<Stage<B::Input, B::Output>>,
    running: FuturesUnordered<FallbackRun<B::Output>>,
    order: VecDeque<usize>,
    by_key: HashMap<u64, VecDeque<usize>>,
    ready: VecDeque<Outcome<S::Item, B::Output>>,
    end_to_end: Histogram,
    invalid: Counter,
}

impl<S, B, F> Infer<S, B, F>
where
    S: Stream,
    B: Backend,
    F: FnMut(&S::Item) -> Result<B::Input, String>,
{
    /// The operator over `input`; see [`InferExt::infer`].
    pub fn new(input: S, engine: &Engine<B>, config: OperatorConfig, extract: F) -> Self {
        let name = engine.name().to_owned();
        Infer {
            input: Box::pin(input.fuse()),
            engine: engine.clone(),
            extract,
            key: None,
            lane: None,
            config: OperatorConfig {
                capacity: config.capacity.max(1),
                ..config
            },
            entries: Slab::new(),
            pending: FuturesUnordered::new(),
            fallbacks: Vec::new(),
            running: FuturesUnordered::new(),
            order: VecDeque::new(),
            by_key: HashMap::new(),
            ready: VecDeque::new(),
            end_to_end: metrics::histogram!(telemetry::END_TO_END_LATENCY, "engine" => name.clone()),
            invalid: metrics::counter!(telemetry::OUTCOMES, "engine" => name, "outcome" => ErrorKind::InvalidInput.as_str()),
        }
    }

    /// Keys records for [`OrderMode::Keyed`] (and switches to it): outcomes keep
    /// input order among records whose keys are equal. Keys are hashed; two keys
    /// whose hashes collide are merely ordered together.
    pub fn keyed_by<K: Hash>(
        mut self,
        mut key: impl FnMut(&S::Item) -> K + Send + 'static,
    ) -> Self {
        let hasher =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        self.key = Some(Box::new(move |r| hasher.hash_one(key(r))));
        self.config.order = OrderMode::Keyed;
        self
    }

    /// Gives each record its lane — priority class and tenant — in the engine's
    /// queue (see [`schedule`](crate::schedule)); without it, every record is in
    /// [`Lane::default`](crate::Lane::default).
    pub fn lane_by(mut self, lane: impl FnMut(&S::Item) -> crate::Lane + Send + 'static) -> Self {
        self.lane = Some(Box::new(lane));
        self
    }

    /// Adds a stage to the fallback chain. A record whose primary outcome is a
    /// failure of a kind another backend may not share (overload, an outage or an
    /// open breaker, a timeout, a permanent error such as a refused key, a spent
    /// budget) goes through the stages in order, each with its own timeout; the
    /// first success is its outcome ([`Outcome::served`] says which stage). Invalid
    /// input (a content refusal too) and invalid output do not move on: the record
    /// would fail the same way there. When every stage fails, the record keeps its
    /// primary failure, whose message then lists each stage's reason; when a stage
    /// fails with such a kind, the chain stops there and the record fails with that
    /// kind (the message still lists every reason).
    pub fn with_fallback(mut self, fallback: Fallback<B::Input, B::Output>) -> Self {
        let engine = self.engine.name().to_owned();
        let stage = format!("{}:{}", self.fallbacks.len(), fallback.name());
        let counter = |result: &'static str| metrics::counter!(telemetry::FALLBACKS, "engine" => engine.clone(), "stage" => stage.clone(), "result" => result);
        self.fallbacks.push(Stage {
            ok: counter("ok"),
            failed: counter("failed"),
            fallback,
        });
        self
    }

    /// Records taken from the input whose outcome has not been yielded yet.
    pub fn in_flight(&self) -> usize {
        self.entries.len() + self.ready.len()
    }

    fn admit(&mut self, record: S::Item) {
        let now = Instant::now();
        let key = match (&mut self.key, self.config.order) {
            (Some(f), OrderMode::Keyed) => f(&record),
            _ => 0,
        };
        let input = (self.extract)(&record);
        let slot = self.entries.insert(Entry {
            record,
            key,
            taken: now,
            result: None,
            served: Served::Primary,
            primary: None,
            detail: Detail::default(),
        });
        match self.config.order {
            OrderMode::Unordered => {}
            OrderMode::Ordered => self.order.push_back(slot),
            OrderMode::Keyed => self.by_key.entry(key).or_default().push_back(slot),
        }
        match input {
            Ok(input) => {
                let deadline = self.config.timeout.map(|t| now + t);
                let lane = self
                    .lane
                    .as_mut()
                    .map_or_else(crate::Lane::default, |f| f(&self.entries[slot].record));
                let pending = self.engine.submit_in(input, deadline, lane);
                self.pending.push(Tagged { slot, pending });
            }
            Err(reason) => {
                self.invalid.increment(1);
                let failure = Failure::new(ErrorKind::InvalidInput, reason, 0);
                self.complete(slot, Err(failure));
            }
        }
    }

    /// The primary engine answered for `slot`.
    fn on_primary(&mut self, slot: usize, result: Result<B::Output, Failure>) {
        match result {
            Err(failure) if moves_on(failure.kind) && !self.fallbacks.is_empty() => {
                self.entries[slot].primary = Some(failure);
                self.start_fallback(slot, 0);
            }
            result => self.complete(slot, result),
        }
    }

    fn start_fallback(&mut self, slot: usize, stage: usize) {
        match (self.extract)(&self.entries[slot].record) {
            Ok(input) => {
                let run = self.fallbacks[stage].fallback.run(input);
                self.running
                    .push(Box::pin(async move { (slot, stage, run.await) }));
            }
            Err(reason) => {
                let failure = Failure::new(ErrorKind::InvalidInput, reason, 0);
                self.on_fallback(slot, stage, Err(failure));
            }
        }
    }

    /// Fallback `stage` answered for `slot`.
    fn on_fallback(&mut self, slot: usize, stage: usize, result: Result<B::Output, Failure>) {
        let Stage {
            fallback,
            ok,
            failed,
        } = &self.fallbacks[stage];
        match result {
            Ok(output) => {
                ok.increment(1);
                self.entries[slot].served = Served::Fallback(stage);
                self.complete(slot, Ok(output));
            }
            Err(failure) => {
                failed.increment(1);
                let note = format!("; fallback {} failed: {}", fallback.name(), failure);
                let primary = self.entries[slot]
                    .primary
                    .as_mut()
                    .expect("a fallback runs only after a primary failure");
                primary.message.push_str(&note);
                if !moves_on(failure.kind) {
                    // The record itself (or its answer) is the problem: that is its
                    // failure, not the primary's.
                    primary.kind = failure.kind;
                }
                if stage + 1 < self.fallbacks.len() && moves_on(failure.kind) {
                    self.start_fallback(slot, stage + 1);
                } else {
                    let failure = self.entries[slot].primary.take().expect("primary failure");
                    self.complete(slot, Err(failure));
                }
            }
        }
    }

    fn complete(&mut self, slot: usize, result: Result<B::Output, Failure>) {
        self.end_to_end.record(self.entries[slot].taken.elapsed());
        self.entries[slot].result = Some(result);
        match self.config.order {
            OrderMode::Unordered => self.release(slot),
            OrderMode::Ordered => {
                while let Some(&head) = self.order.front() {
                    if self.entries[head].result.is_none() {
                        break;
                    }
                    self.order.pop_front();
                    self.release(head);
                }
            }
            OrderMode::Keyed => {
                let key = self.entries[slot].key;
                let Some(queue) = self.by_key.get_mut(&key) else {
                    return;
                };
                let mut done = Vec::new();
                while let Some(&head) = queue.front() {
                    if self.entries[head].result.is_none() {
                        break;
                    }
                    queue.pop_front();
                    done.push(head);
                }
                if queue.is_empty() {
                    self.by_key.remove(&key);
                }
                for head in done {
                    self.release(head);
                }
            }
        }
    }

    fn release(&mut self, slot: usize) {
        let entry = self.entries.remove(slot);
        let result = entry.result.expect("only completed entries are released");
        let receipt = match entry.served {
            Served::Primary => self.engine.receipt(&result, entry.detail),
            Served::Fallback(_) => Receipt::default(),
        };
        self.ready.push_back(Outcome {
            record: entry.record,
            result,
            served: entry.served,
            receipt,
        });
    }
}

// No field is ever pinned in place: the input is boxed and everything else is
// moved freely, so the operator may be moved between polls.
impl<S: Stream, B: Backend, F> Unpin for Infer<S, B, F> {}

impl<S, B, F> Stream for Infer<S, B, F>
where
    S: Stream,
    B: Backend,
    F: FnMut(&S::Item) -> Result<B::Input, String>,
{
    type Item = Outcome<S::Item, B::Output>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = Pin::into_inner(self);
        while this.in_flight() < this.config.capacity && !this.input.is_terminated() {
            match this.input.as_mut().poll_next(cx) {
                Poll::Ready(Some(record)) => this.admit(record),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some((slot, result, detail))) = this.pending.poll_next_unpin(cx) {
            this.entries[slot].detail = detail;
            this.on_primary(slot, result);
        }
        while let Poll::Ready(Some((slot, stage, result))) = this.running.poll_next_unpin(cx) {
            this.on_fallback(slot, stage, result);
        }
        if let Some(outcome) = this.ready.pop_front() {
            return Poll::Ready(Some(outcome));
        }
        if this.input.is_terminated() && this.entries.is_empty() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (lo, hi) = self.input.size_hint();
        let held = self.in_flight();
        (
            lo.saturating_add(held),
            hi.and_then(|h| h.checked_add(held)),
        )
    }
}

impl<S, B, F> FusedStream for Infer<S, B, F>
where
    S: Stream,
    B: Backend,
    F: FnMut(&S::Item) -> Result<B::Input, String>,
{
    fn is_terminated(&self) -> bool {
        self.input.is_terminated() && self.entries.is_empty() && self.ready.is_empty()
    }
}
