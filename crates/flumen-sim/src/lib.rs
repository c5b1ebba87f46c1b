//! A simulated model backend: the workhorse of Flumen's tests and benchmarks.
//!
//! [`Sim`] models a server with `k` parallel slots (model instances) where a call
//! of `n` records costs `a + b·n` (plus an optional cost per token), with seeded
//! latency noise and fault injection: failed calls, failed items, overload answers,
//! stalls, outages and a bounded server-side queue. Its physical throughput limit is
//! `k·N / (a + b·N)` records/s for max batch `N` ([`SimConfig::limit_rps`]).
//!
//! Everything random comes from one seeded generator, drawn in call order, so a run
//! on a paused tokio clock is exactly reproducible. It is a cost model, never a test
//! of a real protocol.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ErrorKind, ItemCost};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// A window of time (from the simulator's creation) during which every call fails.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    /// Start, from the simulator's creation.
    pub from: Duration,
    /// End (exclusive), from the simulator's creation.
    pub until: Duration,
    /// What the calls fail with.
    pub kind: ErrorKind,
}

/// Injected faults. Rates are probabilities in `0.0..=1.0`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Faults {
    /// Probability that a whole call fails with a transient error after its latency.
    pub call_error_rate: f64,
    /// Probability that one item of a successful call fails with a transient error.
    pub item_error_rate: f64,
    /// Probability that a call is answered at once with an overload error.
    pub overload_rate: f64,
    /// `Retry-After` carried by injected overload errors (and overload outages).
    pub retry_after: Option<Duration>,
    /// Probability that a call stalls for an extra [`Faults::stall`].
    pub stall_rate: f64,
    /// How long a stalled call stalls.
    pub stall: Duration,
    /// Windows in which every call fails at once.
    pub outages: Vec<Outage>,
}

/// The simulated server's shape and behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Fixed cost of a call, `a`.
    pub base: Duration,
    /// Cost per record, `b`.
    pub per_item: Duration,
    /// Cost per token (see [`Sim::with_tokens`]).
    pub per_token: Duration,
    /// Parallel slots, `k`: calls beyond it wait in the server's queue.
    pub slots: usize,
    /// The most records one call may carry, `N`; a larger call fails as permanent.
    pub max_batch: usize,
    /// Relative latency noise: each call's latency is multiplied by `1 + u`, `u`
    /// uniform in `[-noise, +noise]`.
    pub noise: f64,
    /// Calls allowed to wait for a slot; one more is answered with an overload
    /// error (like Triton's `max_queue_size`). `None`: an unbounded queue.
    pub queue_limit: Option<usize>,
    /// Seed of every random draw.
    pub seed: u64,
    /// Injected faults.
    pub faults: Faults,
}

impl Default for SimConfig {
    /// a = 20 ms, b = 0.5 ms, k = 2, N = 64, no noise, no faults.
    fn default() -> Self {
        SimConfig {
            base: Duration::from_millis(20),
            per_item: Duration::from_micros(500),
            per_token: Duration::ZERO,
            slots: 2,
            max_batch: 64,
            noise: 0.0,
            queue_limit: None,
            seed: 0,
            faults: Faults::default(),
        }
    }
}

impl SimConfig {
    /// The cost of one call of `n` records with `tokens` tokens, without noise.
    pub fn service_time(&self, n: usize, tokens: u64) -> Duration {
        self.base + self.per_item * n as u32 + self.per_token * tokens as u32
    }

    /// The physical throughput limit `k·N / (a + b·N)` in records/s (tokens aside).
    pub fn limit_rps(&self) -> f64 {
        let n = self.max_batch.max(1);
        self.slots as f64 * n as f64 / self.service_time(n, 0).as_secs_f64()
    }

    /// What one-record-per-call reaches at best: `k / (a + b)` records/s.
    pub fn per_record_limit_rps(&self) -> f64 {
        self.slots as f64 / self.service_time(1, 0).as_secs_f64()
    }
}

/// One call as the simulator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRecord {
    /// When the call arrived.
    pub arrived: Instant,
    /// When it got a slot (equal to `arrived` when it was rejected at once).
    pub started: Instant,
    /// When it answered.
    pub finished: Instant,
    /// Records in the call.
    pub items: usize,
    /// Its outcome: `None` for success, else the kind of the whole-call error.
    pub error: Option<ErrorKind>,
}

/// Counters of a [`Sim`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Calls received, rejected ones included.
    pub calls: u64,
    /// Records received, counted once per call.
    pub items: u64,
    /// Calls answered with an overload error.
    pub overloaded: u64,
    /// The largest call received.
    pub max_batch: usize,
    /// The most calls ever holding a slot at once.
    pub max_busy: usize,
    /// Items that failed on their own in calls that succeeded.
    pub item_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    items: AtomicU64,
    overloaded: AtomicU64,
    max_batch: AtomicUsize,
    busy: AtomicUsize,
    max_busy: AtomicUsize,
    waiting: AtomicUsize,
    item_errors: AtomicU64,
}

/// The simulated backend. It echoes each input back as its output.
pub struct Sim<T> {
    config: SimConfig,
    slots: Semaphore,
    rng: Mutex<ChaCha8Rng>,
    start: Instant,
    tokens: fn(&T) -> u64,
    poison: fn(&T) -> bool,
    counters: Counters,
    log: Option<Mutex<Vec<CallRecord>>>,
    _input: PhantomData<fn(T) -> T>,
}

/// What the random draws decided for one call.
struct Plan {
    latency: Duration,
    overload: bool,
    call_error: bool,
    item_errors: Vec<bool>,
}

impl<T: Clone + Send + Sync + 'static> Sim<T> {
    /// A simulator created now (outage windows count from now).
    pub fn new(config: SimConfig) -> Self {
        Sim {
            slots: Semaphore::new(config.slots.max(1)),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(config.seed)),
            start: Instant::now(),
            tokens: |_| 0,
            poison: |_| false,
            counters: Counters::default(),
            log: None,
            config,
            _input: PhantomData,
        }
    }

    /// Counts tokens per input with `tokens` (charged at [`SimConfig::per_token`] and
    /// reported to the engine as the input's cost).
    pub fn with_tokens(mut self, tokens: fn(&T) -> u64) -> Self {
        self.tokens = tokens;
        self
    }

    /// Marks poison records: a call that carries one fails as a whole with a
    /// permanent error after its latency (like a server rejecting a batch tensor
    /// because of one malformed row).
    pub fn with_poison(mut self, poison: fn(&T) -> bool) -> Self {
        self.poison = poison;
        self
    }

    /// Keeps a [`CallRecord`] of every call (see [`Sim::calls`]).
    pub fn recording(mut self) -> Self {
        self.log = Some(Mutex::new(Vec::new()));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        SimStats {
            calls: c.calls.load(Relaxed),
            items: c.items.load(Relaxed),
            overloaded: c.overloaded.load(Relaxed),
            max_batch: c.max_batch.load(Relaxed),
            max_busy: c.max_busy.load(Relaxed),
            item_errors: c.item_errors.load(Relaxed),
        }
    }

    /// Every call so far, when built [`recording`](Sim::recording).
    pub fn calls(&self) -> Vec<CallRecord> {
        self.log
            .as_ref()
            .map(|l| l.lock().expect("sim log poisoned").clone())
            .unwrap_or_default()
    }

    fn plan(&self, batch: &[T]) -> Plan {
        let f = &self.config.faults;
        let tokens: u64 = batch.iter().map(self.tokens).sum();
        let mut rng = self.rng.lock().expect("sim rng poisoned");
        let mut latency = self.config.service_time(batch.len(), tokens).as_secs_f64();
        if self.config.noise > 0.0 {
            latency *= 1.0 + rng.random_range(-self.config.noise..=self.config.noise);
        }
        if f.stall_rate > 0.0 && rng.random_bool(f.stall_rate.clamp(0.0, 1.0)) {
            latency += f.stall.as_secs_f64();
        }
        let overload = f.overload_rate > 0.0 && rng.random_bool(f.overload_rate.clamp(0.0, 1.0));
        let call_error =
            f.call_error_rate > 0.0 && rng.random_bool(f.call_error_rate.clamp(0.0, 1.0));
        let item_errors = if f.item_error_rate > 0.0 {
            let p = f.item_error_rate.clamp(0.0, 1.0);
            batch.iter().map(|_| rng.random_bool(p)).collect()
        } else {
            Vec::new()
        };
        Plan {
            latency: Duration::from_secs_f64(latency.max(0.0)),
            overload,
            call_error,
            item_errors,
        }
    }

    fn outage(&self, now: Instant) -> Option<ErrorKind> {
        let since = now.duration_since(self.start);
        self.config
            .faults
            .outages
            .iter()
            .find(|o| o.from <= since && since < o.until)
            .map(|o| o.kind)
    }

    fn log(&self, record: CallRecord) {
        if let Some(log) = &self.log {
            log.lock().expect("sim log poisoned").push(record);
        }
    }

    fn overloaded(&self, arrived: Instant, items: usize, why: &str) -> BackendError {
        self.counters.overloaded.fetch_add(1, Relaxed);
        self.log(CallRecord {
            arrived,
            started: arrived,
            finished: arrived,
            items,
            error: Some(ErrorKind::Overloaded),
        });
        BackendError::overloaded(why, self.config.faults.retry_after)
    }

    async fn run(&self, batch: &[T]) -> BatchResult<T> {
        let arrived = Instant::now();
        let n = batch.len();
        let c = &self.counters;
        c.calls.fetch_add(1, Relaxed);
        c.items.fetch_add(n as u64, Relaxed);
        c.max_batch.fetch_max(n, Relaxed);
        if n > self.config.max_batch {
            return Err(BackendError::permanent(format!(
                "batch of {n} exceeds the model's max batch size {}",
                self.config.max_batch
            )));
        }
        if let Some(kind) = self.outage(arrived) {
            self.log(CallRecord {
                arrived,
                started: arrived,
                finished: arrived,
                items: n,
                error: Some(kind),
            });
            let mut error = BackendError::new(kind, "simulated outage");
            if kind == ErrorKind::Overloaded {
                c.overloaded.fetch_add(1, Relaxed);
                error.retry_after = self.config.faults.retry_after;
            }
            return Err(error);
        }
        let plan = self.plan(batch);
        if plan.overload {
            return Err(self.overloaded(arrived, n, "simulated overload"));
        }
        let permit = match self.slots.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                let waiting = c.waiting.fetch_add(1, Relaxed);
                if self.config.queue_limit.is_some_and(|q| waiting >= q) {
                    c.waiting.fetch_sub(1, Relaxed);
                    return Err(self.overloaded(arrived, n, "simulated queue full"));
                }
                let p = self.slots.acquire().await.expect("sim semaphore closed");
                c.waiting.fetch_sub(1, Relaxed);
                p
            }
        };
        let busy = c.busy.fetch_add(1, Relaxed) + 1;
        c.max_busy.fetch_max(busy, Relaxed);
        let started = Instant::now();
        tokio::time::sleep(plan.latency).await;
        c.busy.fetch_sub(1, Relaxed);
        drop(permit);
        let poisoned = batch.iter().any(self.poison);
        let error = if poisoned {
            Some(ErrorKind::Permanent)
        } else {
            plan.call_error.then_some(ErrorKind::Transient)
        };
        self.log(CallRecord {
            arrived,
            started,
            finished: Instant::now(),
            items: n,
            error,
        });
        match error {
            Some(ErrorKind::Permanent) => {
                return Err(BackendError::permanent(
                    "simulated bad request: a poison record",
                ))
            }
            Some(_) => return Err(BackendError::transient("simulated call failure")),
            None => {}
        }
        let failed = plan.item_errors.iter().filter(|e| **e).count();
        c.item_errors.fetch_add(failed as u64, Relaxed);
        Ok(batch
            .iter()
            .enumerate()
            .map(|(i, x)| match plan.item_errors.get(i) {
                Some(true) => Err(BackendError::transient("simulated item failure")),
                _ => Ok(x.clone()),
            })
            .collect())
    }
}

impl<T: Clone + Send + Sync + 'static> Backend for Sim<T> {
    type Input = T;
    type Output = T;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: self.config.max_batch,
            ..Capabilities::default()
        }
    }

    fn cost(&self, input: &T) -> ItemCost {
        ItemCost {
            bytes: 0,
            tokens: (self.tokens)(input),
        }
    }

    async fn call(&self, batch: &[T]) -> BatchResult<T> {
        self.run(batch).await
    }
}

/// A backend that does nothing: it echoes every input at once. For measuring the
/// engine's own overhead.
#[derive(Debug, Clone)]
pub struct Noop<T> {
    max_batch: usize,
    _input: PhantomData<fn(T) -> T>,
}

impl<T> Noop<T> {
    /// A no-op backend taking up to `max_batch` records per call.
    pub fn new(max_batch: usize) -> Self {
        Noop {
            max_batch,
            _input: PhantomData,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Backend for Noop<T> {
    type Input = T;
    type Output = T;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: self.max_batch,
            ..Capabilities::default()
        }
    }

    async fn call(&self, batch: &[T]) -> BatchResult<T> {
        Ok(batch.iter().cloned().map(Ok).collect())
    }
}

/// A [`Sim`] behind an `Arc`, so a test can read its counters while an engine uses it.
pub type SharedSim<T> = Arc<Sim<T>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn limits_follow_the_cost_model() {
        let c = SimConfig::default();
        assert_eq!(c.service_time(64, 0), ms(52));
        assert!((c.limit_rps() - 2461.5).abs() < 0.1);
        assert!((c.per_record_limit_rps() - 97.56).abs() < 0.01);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_costs_a_plus_b_n_and_slots_queue() {
        let sim = Arc::new(Sim::<u32>::new(SimConfig::default()).recording());
        let t0 = Instant::now();
        let calls = (0..3).map(|_| {
            let sim = Arc::clone(&sim);
            tokio::spawn(async move { sim.call(&[1, 2, 3, 4]).await })
        });
        for c in calls.collect::<Vec<_>>() {
            assert_eq!(c.await.unwrap().unwrap().len(), 4);
        }
        let log = sim.calls();
        // 20 + 0.5·4 = 22 ms; two slots: the third call waits for one.
        let mut ends: Vec<_> = log.iter().map(|r| r.finished - t0).collect();
        ends.sort();
        assert_eq!(ends, vec![ms(22), ms(22), ms(44)]);
        assert_eq!(sim.stats().max_busy, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_cost_time_and_are_the_inputs_cost() {
        let sim = Sim::<String>::new(SimConfig {
            per_token: Duration::from_micros(100),
            ..SimConfig::default()
        })
        .with_tokens(|s| s.split_whitespace().count() as u64);
        let batch = ["one two three".to_string(), "four".to_string()];
        assert_eq!(sim.cost(&batch[0]).tokens, 3);
        let t = Instant::now();
        sim.call(&batch).await.unwrap();
        // 20 ms + 2 × 0.5 ms + 4 tokens × 0.1 ms = 21.4 ms, rounded up by the timer.
        assert_eq!(t.elapsed(), ms(22));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bounded_queue_answers_overload_at_once() {
        let sim = Arc::new(Sim::<u32>::new(SimConfig {
            slots: 1,
            queue_limit: Some(0),
            ..SimConfig::default()
        }));
        let first = tokio::spawn({
            let sim = Arc::clone(&sim);
            async move { sim.call(&[1]).await }
        });
        tokio::task::yield_now().await;
        let t = Instant::now();
        let err = sim.call(&[2]).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Overloaded);
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert!(first.await.unwrap().is_ok());
        assert_eq!(sim.stats().overloaded, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn outages_and_oversized_batches_fail() {
        let sim = Sim::<u32>::new(SimConfig {
            max_batch: 2,
            faults: Faults {
                outages: vec![Outage {
                    from: ms(100),
                    until: ms(200),
                    kind: ErrorKind::Transient,
                }],
                ..Faults::default()
            },
            ..SimConfig::default()
        });
        assert_eq!(
            sim.call(&[1, 2, 3]).await.unwrap_err().kind,
            ErrorKind::Permanent
        );
        assert!(sim.call(&[1]).await.is_ok());
        tokio::time::sleep(ms(100)).await;
        assert_eq!(sim.call(&[1]).await.unwrap_err().kind, ErrorKind::Transient);
        tokio::time::sleep(ms(100)).await;
        assert!(sim.call(&[1]).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_seed_gives_the_same_faults() {
        let run = |seed| async move {
            let sim = Sim::<u32>::new(SimConfig {
                seed,
                noise: 0.2,
                faults: Faults {
                    item_error_rate: 0.3,
                    ..Faults::default()
                },
                ..SimConfig::default()
            });
            let mut out = Vec::new();
            for _ in 0..10 {
                let t = Instant::now();
                let r = sim.call(&[1, 2, 3, 4, 5]).await.unwrap();
                out.push((t.elapsed(), r.iter().map(|x| x.is_ok()).collect::<Vec<_>>()));
            }
            out
        };
        let (a, b, c) = (run(7).await, run(7).await, run(8).await);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().any(|(_, oks)| oks.contains(&false)));
    }
}
