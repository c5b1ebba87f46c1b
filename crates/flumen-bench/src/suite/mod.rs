//! `flumen bench`: side-by-side scenarios on one backend, through one load
//! generator, written up as a Markdown report with SVG plots.
//!
//! Every system gets a fresh simulator of the same shape for every scenario. Each
//! run has a warm-up, then a measurement window cut into 1 s slices; a run is
//! *stable* when its last three slices agree within 10 %. Latency is measured from
//! each record's scheduled send time (open loop), so queueing is never hidden.
//!
//! - `scenarios`: backlog, steady loads, overload and a failure mix, every system;
//! - `step`: a 20 % → 90 % step, how fast Flumen follows;
//! - `closed_loop`: records outstanding swept, Flumen against Async I/O;
//! - `embedded` and `triton`: the same comparison on the embedded model and on a
//!   real Triton server;
//! - `system` and `measure`: how each system is run and what a run measured.

mod closed_loop;
mod embedded;
mod measure;
mod scenarios;
mod step;
mod system;
mod triton;

use std::fmt::Write;
use std::time::Duration;

use flumen_sim::SimConfig;

use crate::svg::line_chart;

pub use measure::Measured;
pub use system::System;

/// What to run.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Short windows (3 s instead of 10 s) and at most two runs of an unstable point:
    /// the whole suite in about four and a half minutes on two cores.
    pub quick: bool,
    /// Latency objective for goodput.
    pub slo: Duration,
    /// Seed of arrivals and faults.
    pub seed: u64,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            quick: true,
            slo: Duration::from_millis(500),
            seed: 1,
        }
    }
}

/// The report: Markdown, and the SVG files it links to.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `report.md`.
    pub markdown: String,
    /// `(file name, SVG)` pairs.
    pub plots: Vec<(String, String)>,
}

/// The settings every simulated scenario shares, derived once from [`SuiteOptions`].
struct Plan {
    /// The simulated backend, without faults.
    base: SimConfig,
    /// Its physical limit, records/s.
    limit: f64,
    /// Warm-up before the measurement window.
    warmup: Duration,
    /// The measurement window.
    window: Duration,
    /// Warm-up and window.
    run_for: Duration,
    /// How long an open-loop run may drain after its last arrival.
    grace: Duration,
    /// Runs of an unstable point, at most.
    max_runs: u64,
    /// Latency objective for goodput.
    slo: Duration,
    /// Seed of arrivals and faults.
    seed: u64,
}

impl Plan {
    fn new(options: &SuiteOptions) -> Plan {
        let base = SimConfig {
            seed: options.seed,
            ..SimConfig::default()
        };
        let (warmup, window) = if options.quick {
            (Duration::from_secs(1), Duration::from_secs(3))
        } else {
            (Duration::from_secs(2), Duration::from_secs(10))
        };
        Plan {
            limit: base.limit_rps(),
            base,
            warmup,
            window,
            run_for: warmup + window,
            // An unstable point is run again, up to this many runs in all (two in the
            // quick suite, which has to stay within five minutes here).
            max_runs: if options.quick { 2 } else { 3 },
            grace: Duration::from_millis(500),
            slo: options.slo,
            seed: options.seed,
        }
    }
}

/// The machine in one line: CPU, cores, memory, operating system and architecture.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB", kb / 1_048_576.0))
        .unwrap_or_else(|| "unknown memory".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {mem}, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// Runs the suite on the simulated backend (a = 20 ms, b = 0.5 ms, k = 2, N = 64).
pub async fn run(options: &SuiteOptions) -> Report {
    let plan = Plan::new(options);
    let (warmup, window) = (plan.warmup, plan.window);
    let mut md = String::new();
    let _ = writeln!(md, "# Flumen benchmark report\n");
    let _ = writeln!(
        md,
        "- Machine: {}\n- Mode: {} (warm-up {} s, window {} s, 1 s slices; stable = last three slices within 10 %; an unstable point is run again, up to {} runs)\n- Backend: simulated cost model, a = 20 ms, b = 0.5 ms per record, k = 2 slots, max batch 64; physical limit {:.0} records/s\n- SLO for goodput: {} ms; latency from each record's scheduled send time\n- Every number below comes from this run.\n",
        machine(),
        if options.quick { "quick" } else { "full" },
        warmup.as_secs(),
        window.as_secs(),
        plan.max_runs,
        plan.limit,
        plan.slo.as_millis()
    );

    let (scenarios_md, curves) = scenarios::simulated(&plan).await;
    md.push_str(&scenarios_md);
    let (step_md, mut plots) = step::step_change(&plan).await;
    md.push_str(&step_md);
    let (sweep_md, sweep_plot) =
        closed_loop::closed_loop_sweep(&plan.base, plan.run_for, warmup, window).await;
    md.push_str(&sweep_md);
    plots.push(sweep_plot);
    md.push_str(&embedded::embedded_backlog(warmup, window).await);
    md.push_str(&triton::triton_backlog(warmup, window).await);
    let _ = writeln!(md, "## Throughput against p99 latency at steady loads (10, 50, 90 %)\n\n![throughput vs p99](throughput_p99.svg)\n");
    plots.push((
        "throughput_p99.svg".into(),
        line_chart(
            "Throughput vs p99 latency (steady 10/50/90 % loads)",
            "records/s",
            "p99 ms",
            &curves,
        ),
    ));
    Report {
        markdown: md,
        plots,
    }
}
