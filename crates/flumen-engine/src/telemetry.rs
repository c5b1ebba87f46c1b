//! Metric names, defined once, with their units, reported through the `metrics` facade.
//!
//! Every metric carries the label `engine` (the engine's name). Install any
//! `metrics` recorder (Prometheus, statsd, …) to export them; without one they cost
//! next to nothing.

use flumen_core::ErrorKind;
use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};

use std::sync::Arc;
use std::time::Duration;

use crate::reliability::BreakerState;
use crate::stats::Stats;

/// Records queued in the engine, waiting for a batch or a retry (gauge).
pub const QUEUE_DEPTH: &str = "flumen_queue_depth";
/// Backend calls in flight (gauge).
pub const BATCHES_IN_FLIGHT: &str = "flumen_batches_in_flight";
/// The concurrency controller's current limit on calls in flight (gauge).
pub const CONCURRENCY_LIMIT: &str = "flumen_concurrency_limit";
/// Records per backend call (histogram).
pub const BATCH_SIZE: &str = "flumen_batch_size";
/// Time a record waited in the engine's queue before its first call (histogram, seconds).
pub const QUEUE_TIME: &str = "flumen_queue_time_seconds";
/// Duration of one backend call (histogram, seconds).
pub const BACKEND_LATENCY: &str = "flumen_backend_latency_seconds";
/// From the operator taking a record to its outcome (histogram, seconds).
pub const END_TO_END_LATENCY: &str = "flumen_end_to_end_latency_seconds";
/// Outcomes by kind: `ok` or an error kind (counter, records). Label `outcome`.
pub const OUTCOMES: &str = "flumen_outcomes_total";
/// Backend calls each record was part of, at its outcome (histogram).
pub const ATTEMPTS: &str = "flumen_attempts";
/// Records sent again, by the kind of error that made them (counter). Label `kind`.
pub const RETRIES: &str = "flumen_retries_total";
/// Retries refused because the retry budget was spent (counter, records).
pub const BUDGET_EXHAUSTED: &str = "flumen_retry_budget_exhausted_total";
/// Hedged calls sent (counter).
pub const HEDGES: &str = "flumen_hedges_total";
/// The circuit breaker: 0 closed, 1 half-open, 2 open (gauge).
pub const BREAKER_STATE: &str = "flumen_breaker_state";
/// Circuit breaker transitions, by the state entered (counter). Label `to`.
pub const BREAKER_TRANSITIONS: &str = "flumen_breaker_transitions_total";
/// Fallback stages run, by stage and result (counter). Labels `stage`, `result`.
pub const FALLBACKS: &str = "flumen_fallbacks_total";

/// Tokens the backend was sent and answered, by direction: `input` (counted when a
/// call is sent, once per send) and `output` (when it answers) (counter, tokens).
/// Label `direction`.
pub const TOKENS: &str = "flumen_tokens_total";
/// What the calls so far cost at the engine's configured prices, in the prices'
/// currency (a gauge that only grows: the `metrics` facade's counters count whole
/// units).
pub const COST: &str = "flumen_cost";
/// Result cache lookups, by result: `hit` (answered from the store), `miss` (sent
/// on, or waiting for an identical record's call), `shared` (of the misses, answered
/// by an identical record's call) (counter, records). Labels `store`, `result`.
pub const CACHE_LOOKUPS: &str = "flumen_cache_lookups_total";
/// Result cache operations that failed or timed out, and entries that did not decode
/// (counter). Labels `store`, `op` (`get`, `put`, `decode`).
pub const CACHE_ERRORS: &str = "flumen_cache_errors_total";
/// Result cache operations skipped because the store had just failed (counter).
/// Label `store`.
pub const CACHE_BYPASSED: &str = "flumen_cache_bypassed_total";
/// Whether the result cache's store answered its last operation: 1, or 0 after a
/// failure until it answers again (gauge). Label `store`.
pub const CACHE_STORE_UP: &str = "flumen_cache_store_up";

/// Registers descriptions and units of every metric with the installed recorder.
pub fn describe() {
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "records queued in the engine");
    describe_gauge!(BATCHES_IN_FLIGHT, Unit::Count, "backend calls in flight");
    describe_gauge!(
        CONCURRENCY_LIMIT,
        Unit::Count,
        "concurrency limit on backend calls"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "records per backend call");
    describe_histogram!(QUEUE_TIME, Unit::Seconds, "time records wait in the queue");
    describe_histogram!(BACKEND_LATENCY, Unit::Seconds, "duration of backend calls");
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "time from input to outcome"
    );
    describe_counter!(OUTCOMES, Unit::Count, "outcomes by kind");
    describe_histogram!(ATTEMPTS, Unit::Count, "backend calls per record");
    describe_counter!(RETRIES, Unit::Count, "records sent again, by error kind");
    describe_counter!(
        BUDGET_EXHAUSTED,
        Unit::Count,
        "retries refused by the retry budget"
    );
    describe_counter!(HEDGES, Unit::Count, "hedged calls sent");
    describe_gauge!(BREAKER_STATE, Unit::Count, "0 closed, 1 half-open, 2 open");
    describe_counter!(
        BREAKER_TRANSITIONS,
        Unit::Count,
        "breaker transitions by state entered"
    );
    describe_counter!(
        TOKENS,
        Unit::Count,
        "tokens sent and answered, by direction"
    );
    describe_gauge!(COST, "cost of the calls so far at the configured prices");
    describe_counter!(
        CACHE_LOOKUPS,
        Unit::Count,
        "result cache lookups by result (hit, miss, shared)"
    );
    describe_counter!(
        CACHE_ERRORS,
        Unit::Count,
        "result cache operations that failed, by op"
    );
    describe_counter!(
        CACHE_BYPASSED,
        Unit::Count,
        "result cache operations skipped while the store rests after a failure"
    );
    describe_gauge!(
        CACHE_STORE_UP,
        Unit::Count,
        "1 while the result cache's store answers, 0 after a failure"
    );
    describe_counter!(
        FALLBACKS,
        Unit::Count,
        "fallback stages run, by stage and result"
    );
}

/// An engine's metric handles, registered once.
pub(crate) struct Instruments {
    queue_depth: Gauge,
    in_flight: Gauge,
    limit: Gauge,
    breaker_state: Gauge,
    pub(crate) batch_size: Histogram,
    pub(crate) queue_time: Histogram,
    pub(crate) backend_latency: Histogram,
    attempts: Histogram,
    pub(crate) budget_exhausted: Counter,
    pub(crate) hedges: Counter,
    input_tokens: Counter,
    output_tokens: Counter,
    cost: Gauge,
    ok: Counter,
    failed: Vec<Counter>,
    retries: Vec<Counter>,
    transitions: [Counter; 3],
    stats: Arc<Stats>,
}

fn index(kind: ErrorKind) -> usize {
    ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl Instruments {
    pub(crate) fn new(name: &str, stats: Arc<Stats>) -> Self {
        let engine = name.to_owned();
        let outcome = |o: &'static str| metrics::counter!(OUTCOMES, "engine" => engine.clone(), "outcome" => o);
        let retry =
            |k: &'static str| metrics::counter!(RETRIES, "engine" => engine.clone(), "kind" => k);
        let to = |s: &'static str| metrics::counter!(BREAKER_TRANSITIONS, "engine" => engine.clone(), "to" => s);
        Instruments {
            queue_depth: metrics::gauge!(QUEUE_DEPTH, "engine" => engine.clone()),
            in_flight: metrics::gauge!(BATCHES_IN_FLIGHT, "engine" => engine.clone()),
            limit: metrics::gauge!(CONCURRENCY_LIMIT, "engine" => engine.clone()),
            breaker_state: metrics::gauge!(BREAKER_STATE, "engine" => engine.clone()),
            batch_size: metrics::histogram!(BATCH_SIZE, "engine" => engine.clone()),
            queue_time: metrics::histogram!(QUEUE_TIME, "engine" => engine.clone()),
            backend_latency: metrics::histogram!(BACKEND_LATENCY, "engine" => engine.clone()),
            attempts: metrics::histogram!(ATTEMPTS, "engine" => engine.clone()),
            budget_exhausted: metrics::counter!(BUDGET_EXHAUSTED, "engine" => engine.clone()),
            hedges: metrics::counter!(HEDGES, "engine" => engine.clone()),
            input_tokens: metrics::counter!(TOKENS, "engine" => engine.clone(), "direction" => "input"),
            output_tokens: metrics::counter!(TOKENS, "engine" => engine.clone(), "direction" => "output"),
            cost: metrics::gauge!(COST, "engine" => engine.clone()),
            ok: outcome("ok"),
            failed: ErrorKind::ALL.iter().map(|k| outcome(k.as_str())).collect(),
            retries: ErrorKind::ALL.iter().map(|k| retry(k.as_str())).collect(),
            transitions: [to("closed"), to("half_open"), to("open")],
            stats,
        }
    }

    /// One record's outcome after `attempts` calls (`None` for success), `latency`
    /// after it was submitted.
    pub(crate) fn outcome(&self, attempts: u32, failed: Option<ErrorKind>, latency: Duration) {
        self.stats.outcome(failed, latency);
        self.attempts.record(attempts as f64);
        match failed {
            None => self.ok.increment(1),
            Some(kind) => self.failed[index(kind)].increment(1),
        }
    }

    /// A call was sent with `tokens` input tokens.
    pub(crate) fn call_tokens(&self, tokens: u64) {
        self.input_tokens.increment(tokens);
    }

    /// A call answered with `output` tokens; the engine's cost so far is `total_nanos`.
    pub(crate) fn call_cost(&self, output: u64, total_nanos: u64) {
        self.output_tokens.increment(output);
        if total_nanos > 0 {
            self.cost.set(total_nanos as f64 / 1e9);
        }
    }

    pub(crate) fn retry(&self, kind: ErrorKind) {
        self.retries[index(kind)].increment(1);
    }

    pub(crate) fn breaker_transition(&self, to: BreakerState) {
        self.transitions[to.level() as usize].increment(1);
    }

    pub(crate) fn gauges(&self, queued: usize, in_flight: usize, limit: usize, breaker: u8) {
        self.queue_depth.set(queued as f64);
        self.in_flight.set(in_flight as f64);
        self.limit.set(limit as f64);
        self.breaker_state.set(f64::from(breaker));
    }
}
