//! What one run of one system in one scenario measured: throughput, latency,
//! goodput, stability and batch sizes.

use std::time::Duration;

use flumen_sim::Sim;

use crate::load::{Run, Summary};

/// The load of a scenario.
#[derive(Debug, Clone, Copy)]
pub(super) enum Load {
    /// Everything queued at the start.
    Backlog,
    /// Poisson arrivals at this rate.
    Rate(f64),
}

/// What one system did in one scenario.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Outcomes per second in the window.
    pub throughput: f64,
    /// Latency percentiles of outcomes in the window (from the scheduled time).
    pub latency: Summary,
    /// Successes within the SLO per second, of records scheduled in the window.
    pub goodput: f64,
    /// Whether it kept up with an open-loop load (≥ 95 % of the offered rate).
    pub keeps_up: Option<bool>,
    /// Whether the last three 1 s slices agree within 10 %.
    pub stable: bool,
    /// Backend calls per successful record.
    pub calls_per_record: f64,
    /// Records per call: mean and largest.
    pub batch_mean: f64,
    /// The largest call.
    pub batch_max: usize,
    /// Failed outcomes.
    pub failed: usize,
}

/// Measures `run` over the window after `warmup`, with `backend`'s recorded calls.
pub(super) fn measure(
    run: &Run,
    backend: &Sim<u64>,
    load: Load,
    warmup: Duration,
    window: Duration,
    slo: Duration,
) -> Measured {
    let (from, to) = (run.start + warmup, run.start + warmup + window);
    let throughput = run.completions.rate(from, to);
    let slices: Vec<f64> = (0..window.as_secs())
        .map(|i| {
            let a = from + Duration::from_secs(i);
            run.completions.rate(a, a + Duration::from_secs(1))
        })
        .collect();
    let stable = slices.len() >= 3 && {
        let last = &slices[slices.len() - 3..];
        let mean = last.iter().sum::<f64>() / 3.0;
        mean > 0.0 && last.iter().all(|r| (r - mean).abs() <= 0.1 * mean)
    };
    let calls = backend.calls();
    let items: u64 = calls.iter().map(|c| c.items as u64).sum();
    let succeeded = run.succeeded.len().max(1);
    Measured {
        throughput,
        latency: run.summary(),
        goodput: run.succeeded.iter().filter(|l| **l <= slo).count() as f64
            / (warmup + window).as_secs_f64(),
        keeps_up: match load {
            Load::Backlog => None,
            Load::Rate(r) => Some(throughput >= 0.95 * r),
        },
        stable,
        calls_per_record: calls.len() as f64 / succeeded as f64,
        batch_mean: if calls.is_empty() {
            0.0
        } else {
            items as f64 / calls.len() as f64
        },
        batch_max: calls.iter().map(|c| c.items).max().unwrap_or(0),
        failed: run.failed,
    }
}
