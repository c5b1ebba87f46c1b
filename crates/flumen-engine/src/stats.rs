//! Live counters of an engine, readable without a metrics recorder.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Counters the dispatcher updates as it works; read them with [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    queued: AtomicUsize,
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    calls: AtomicU64,
    records_sent: AtomicU64,
    max_batch: AtomicUsize,
}

/// A point-in-time copy of an engine's [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
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
    /// The largest batch sent so far.
    pub max_batch: usize,
}

impl StatsSnapshot {
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
            max_batch: self.max_batch.load(Relaxed),
        }
    }

    pub(crate) fn set_gauges(&self, queued: usize, in_flight: usize, limit: usize) {
        self.queued.store(queued, Relaxed);
        self.in_flight.store(in_flight, Relaxed);
        self.limit.store(limit, Relaxed);
    }

    pub(crate) fn call_sent(&self, items: usize) {
        self.calls.fetch_add(1, Relaxed);
        self.records_sent.fetch_add(items as u64, Relaxed);
        self.max_batch.fetch_max(items, Relaxed);
    }
}
