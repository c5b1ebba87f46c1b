//! Live counters of an engine, readable without a metrics recorder.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use flumen_core::ErrorKind;
use tokio::time::Instant;

use crate::reliability::{BreakerPhase, BreakerState};

/// How many breaker transitions are kept.
const TRANSITIONS_KEPT: usize = 1_024;

/// Buckets of the latency histogram: bucket `i` counts records answered in
/// `[2^i, 2^(i+1))` µs (the first from 0, the last up to any time): 1 µs to 71 min.
pub const LATENCY_BUCKETS: usize = 32;

const KINDS: usize = ErrorKind::ALL.len();

fn kind_index(kind: ErrorKind) -> usize {
    ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

/// Counters the dispatcher updates as it works; read them with [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    calls: AtomicU64,
    records_sent: AtomicU64,
    resent: AtomicU64,
    tokens_sent: AtomicU64,
    output_tokens: AtomicU64,
    cost_nanos: AtomicU64,
    max_batch: AtomicUsize,
    breaker: AtomicU8,
    ok: AtomicU64,
    failed: [AtomicU64; KINDS],
    shed: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    transitions: Mutex<VecDeque<(Instant, BreakerState)>>,
}

/// A point-in-time copy of an engine's [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Records answered with success so far (from the cache too).
    pub ok: u64,
    /// Records failed so far, by kind, in [`ErrorKind::ALL`]'s order.
    pub failed: [u64; KINDS],
    /// Records shed before queueing (failed `Overloaded` at once; counted in `failed`).
    pub shed: u64,
    /// Records by the time from their submission to their outcome: see
    /// [`LATENCY_BUCKETS`] and [`StatsSnapshot::latency_quantile`].
    pub latency: [u64; LATENCY_BUCKETS],
    /// Records waiting in the queue.
    pub queued: usize,
    /// Backend calls in flight.
    pub in_flight: usize,
    /// The concurrency limit.
    pub limit: usize,
    /// Backend calls sent so far.
    pub calls: u64,
    /// Records sent so far, counted once per call they were part of.
    pub records_sent: u64,
    /// Of those, sends of a record after its first (retries, and re-sends after an
    /// overload answer or a bisection).
    pub resent: u64,
    /// Input tokens sent to the backend so far, by the backend's own count
    /// ([`ItemCost::tokens`](flumen_core::ItemCost)), once per send (a retry pays
    /// again; a record answered from the cache pays nothing).
    pub tokens_sent: u64,
    /// Output tokens of the answers received so far
    /// ([`Backend::output_tokens`](flumen_core::Backend::output_tokens)).
    pub output_tokens: u64,
    /// What the calls so far cost at the engine's prices, in billionths of the
    /// currency (0 without prices): input tokens sent and output tokens received.
    pub cost_nanos: u64,
    /// The largest batch sent so far.
    pub max_batch: usize,
    /// The circuit breaker's phase (`Closed` when the engine has none).
    pub breaker: BreakerPhase,
}

impl StatsSnapshot {
    /// The `q` quantile (0–1) of the latency of the records answered since
    /// `earlier` (a snapshot of the same engine), within a factor of √2 (each
    /// bucket's geometric middle); `None` when none was.
    pub fn latency_quantile(&self, earlier: &StatsSnapshot, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .zip(earlier.latency)
            .map(|(a, b)| a.saturating_sub(b))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let mid = if i == 0 {
                    0.7
                } else {
                    2f64.powf(i as f64 + 0.5)
                };
                return Some(Duration::from_secs_f64(mid / 1e6));
            }
        }
        None
    }

    /// Mean records per call so far.
    pub fn mean_batch(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.records_sent as f64 / self.calls as f64
        }
    }
}

impl Stats {
    /// A copy of the counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            queued: self.queued.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            limit: self.limit.load(Relaxed),
            calls: self.calls.load(Relaxed),
            records_sent: self.records_sent.load(Relaxed),
            resent: self.resent.load(Relaxed),
            tokens_sent: self.tokens_sent.load(Relaxed),
            output_tokens: self.output_tokens.load(Relaxed),
            cost_nanos: self.cost_nanos.load(Relaxed),
            max_batch: self.max_batch.load(Relaxed),
            breaker: BreakerPhase::from_level(self.breaker.load(Relaxed)),
            ok: self.ok.load(Relaxed),
            failed: std::array::from_fn(|i| self.failed[i].load(Relaxed)),
            shed: self.shed.load(Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
        }
    }

    /// One record's outcome, `latency` after it was submitted.
    pub(crate) fn outcome(&self, failed: Option<ErrorKind>, latency: Duration) {
        match failed {
            None => self.ok.fetch_add(1, Relaxed),
            Some(kind) => self.failed[kind_index(kind)].fetch_add(1, Relaxed),
        };
        let us = latency.as_micros().max(1);
        let bucket = (127 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    pub(crate) fn shed(&self) {
        self.shed.fetch_add(1, Relaxed);
    }

    /// The last breaker transitions, oldest first.
    pub fn transitions(&self) -> Vec<(Instant, BreakerState)> {
        self.transitions
            .lock()
            .expect("transitions lock")
            .iter()
            .copied()
            .collect()
    }

    pub(crate) fn push_transition(&self, at: Instant, state: BreakerState) {
        let mut t = self.transitions.lock().expect("transitions lock");
        if t.len() == TRANSITIONS_KEPT {
            t.pop_front();
        }
        t.push_back((at, state));
    }

    pub(crate) fn set_gauges(
        &self,
        queued: usize,
        in_flight: usize,
        limit: usize,
        breaker: BreakerPhase,
    ) {
        self.breaker.store(breaker as u8, Relaxed);
        self.queued.store(queued, Relaxed);
        self.in_flight.store(in_flight, Relaxed);
        self.limit.store(limit, Relaxed);
    }

    /// Counts a call's answer; returns the cost so far.
    pub(crate) fn call_answered(&self, output_tokens: u64, cost_nanos: u64) -> u64 {
        self.output_tokens.fetch_add(output_tokens, Relaxed);
        self.cost_nanos.fetch_add(cost_nanos, Relaxed) + cost_nanos
    }

    pub(crate) fn call_sent(&self, items: usize, first_sends: usize, tokens: u64) {
        self.calls.fetch_add(1, Relaxed);
        self.tokens_sent.fetch_add(tokens, Relaxed);
        self.records_sent.fetch_add(items as u64, Relaxed);
        self.resent
            .fetch_add(items.saturating_sub(first_sends) as u64, Relaxed);
        self.max_batch.fetch_max(items, Relaxed);
    }
}
