//! `flumen bench`: side-by-side scenarios on one backend, through one load
//! generator, written up as a Markdown report with SVG plots.
//!
//! Every system gets a fresh simulator of the same shape for every scenario. Each
//! run has a warm-up, then a measurement window cut into 1 s slices; a run is
//! *stable* when its last three slices agree within 10 %. Latency is measured from
//! each record's scheduled send time (open loop), so queueing is never hidden.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use flumen_core::Failure;
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_sim::{Faults, Sim, SimConfig};
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use crate::baselines::{fixed_batch, ml_predict, per_record, MlPredict};
use crate::load::{backlog, drive, open_loop, Run, Scheduled, Summary};
use crate::report::{ms, Table};
use crate::svg::{line_chart, Series};

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

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Flumen with its defaults (adaptive batching and concurrency, retries).
    Flumen,
    /// Flink Async I/O, unordered, capacity 100, one call per record.
    AsyncIo,
    /// Flink ML_PREDICT defaults: 10 concurrent, ordered, retries without budget.
    MlPredict,
    /// The proposed Flink AsyncBatchWaitOperator: 32 records or 20 ms, one batch in flight.
    AsyncBatchWait,
    /// Ray Serve `@serve.batch` defaults: 10 records or 10 ms, one batch in flight.
    RayServe,
}

impl System {
    /// All, Flumen first.
    pub const ALL: [System; 5] = [
        System::Flumen,
        System::AsyncIo,
        System::MlPredict,
        System::AsyncBatchWait,
        System::RayServe,
    ];

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            System::Flumen => "Flumen (defaults)",
            System::AsyncIo => "Flink Async I/O (cap 100)",
            System::MlPredict => "Flink ML_PREDICT (10, ordered)",
            System::AsyncBatchWait => "Flink AsyncBatchWait (32, 20 ms)",
            System::RayServe => "Ray Serve batch (10, 10 ms)",
        }
    }
}

/// The load of a scenario.
#[derive(Debug, Clone, Copy)]
enum Load {
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

fn sim(config: &SimConfig) -> Arc<Sim<u64>> {
    Arc::new(Sim::new(config.clone()).recording())
}

fn flumen_stream<S>(
    input: S,
    engine: &Engine<Sim<u64>>,
) -> impl Stream<Item = (Scheduled, Result<u64, Failure>)>
where
    S: Stream<Item = Scheduled> + Send + 'static,
{
    let config = OperatorConfig {
        capacity: 2_048,
        ..OperatorConfig::default()
    };
    input
        .infer(engine, config, |s| Ok(s.id))
        .map(|o| (o.record, o.result))
}

async fn run_system<S>(system: System, input: S, backend: &Arc<Sim<u64>>, limit: Duration) -> Run
where
    S: Stream<Item = Scheduled> + Send + Unpin + 'static,
{
    let id = |s: &Scheduled| s.id;
    match system {
        System::Flumen => {
            let engine = Engine::from_arc(Arc::clone(backend), EngineConfig::default());
            drive(flumen_stream(input, &engine), limit).await
        }
        System::AsyncIo => drive(per_record(input, Arc::clone(backend), 100, id), limit).await,
        System::MlPredict => {
            drive(
                ml_predict(input, Arc::clone(backend), MlPredict::default(), id),
                limit,
            )
            .await
        }
        System::AsyncBatchWait => {
            drive(
                fixed_batch(
                    input,
                    Arc::clone(backend),
                    32,
                    Duration::from_millis(20),
                    id,
                ),
                limit,
            )
            .await
        }
        System::RayServe => {
            drive(
                fixed_batch(
                    input,
                    Arc::clone(backend),
                    10,
                    Duration::from_millis(10),
                    id,
                ),
                limit,
            )
            .await
        }
    }
}

fn measure(
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
    let base = SimConfig {
        seed: options.seed,
        ..SimConfig::default()
    };
    let limit = base.limit_rps();
    let (warmup, window) = if options.quick {
        (Duration::from_secs(1), Duration::from_secs(3))
    } else {
        (Duration::from_secs(2), Duration::from_secs(10))
    };
    let run_for = warmup + window;
    // An unstable point is run again, up to this many runs in all (two in the quick
    // suite, which has to stay within five minutes here).
    let max_runs = if options.quick { 2 } else { 3 };
    let grace = Duration::from_millis(500);
    let slo = options.slo;
    let mut md = String::new();
    let _ = writeln!(md, "# Flumen benchmark report\n");
    let _ = writeln!(
        md,
        "- Machine: {}\n- Mode: {} (warm-up {} s, window {} s, 1 s slices; stable = last three slices within 10 %; an unstable point is run again, up to {max_runs} runs)\n- Backend: simulated cost model, a = 20 ms, b = 0.5 ms per record, k = 2 slots, max batch 64; physical limit {limit:.0} records/s\n- SLO for goodput: {} ms; latency from each record's scheduled send time\n- Every number below comes from this run.\n",
        machine(),
        if options.quick { "quick" } else { "full" },
        warmup.as_secs(),
        window.as_secs(),
        slo.as_millis()
    );

    let scenarios: Vec<(String, Load, Faults)> = {
        let mut v = vec![(
            "Backlog drain".to_string(),
            Load::Backlog,
            Faults::default(),
        )];
        for pct in [10.0, 50.0, 90.0] {
            v.push((
                format!("Steady {pct:.0} % of the limit"),
                Load::Rate(limit * pct / 100.0),
                Faults::default(),
            ));
        }
        v.push((
            "Overload: 150 % of the limit".into(),
            Load::Rate(limit * 1.5),
            Faults::default(),
        ));
        v.push((
            "Failure mix at 50 %: 5 % calls fail (5xx), 5 % answered 429 (Retry-After 50 ms), 2 % items fail".into(),
            Load::Rate(limit * 0.5),
            Faults {
                call_error_rate: 0.05,
                overload_rate: 0.05,
                retry_after: Some(Duration::from_millis(50)),
                item_error_rate: 0.02,
                ..Faults::default()
            },
        ));
        v
    };

    let mut curves: Vec<Series> = System::ALL
        .iter()
        .map(|s| Series {
            name: s.name().into(),
            points: vec![],
        })
        .collect();
    for (title, load, faults) in &scenarios {
        let _ = writeln!(md, "## {title}\n");
        let mut table = Table::new(&[
            "system",
            "throughput",
            "% of limit",
            "p50",
            "p90",
            "p99",
            "goodput",
            "keeps up",
            "stable",
            "calls/record",
            "batch mean / max",
            "failed",
        ]);
        let mut flumen_rate = 0.0;
        for (i, system) in System::ALL.iter().enumerate() {
            let config = SimConfig {
                faults: faults.clone(),
                ..base.clone()
            };
            // The stability rule: a point whose last three 1 s slices disagree by more
            // than 10 % is run again, up to `max_runs` runs; the last run is reported.
            let mut runs = 0;
            let m = loop {
                runs += 1;
                let backend = sim(&config);
                let run = match load {
                    Load::Backlog => {
                        run_system(*system, Box::pin(backlog(10_000_000)), &backend, run_for).await
                    }
                    Load::Rate(r) => {
                        run_system(
                            *system,
                            Box::pin(open_loop(*r, run_for, Some(options.seed + runs))),
                            &backend,
                            run_for + grace,
                        )
                        .await
                    }
                };
                let m = measure(&run, &backend, *load, warmup, window, slo);
                if m.stable || runs == max_runs {
                    break m;
                }
            };
            if *system == System::Flumen {
                flumen_rate = m.throughput;
            }
            if title.starts_with("Steady") {
                curves[i]
                    .points
                    .push((m.throughput, m.latency.p99.as_secs_f64() * 1e3));
            }
            // A backlog is all scheduled at the start: latency and goodput say nothing.
            let open = matches!(load, Load::Rate(_));
            let lat = |d: Duration| if open { ms(d) } else { "—".into() };
            table.row(vec![
                system.name().into(),
                format!("{:.0}/s", m.throughput),
                format!("{:.1} %", 100.0 * m.throughput / limit),
                lat(m.latency.p50),
                lat(m.latency.p90),
                lat(m.latency.p99),
                if open {
                    format!("{:.0}/s", m.goodput)
                } else {
                    "—".into()
                },
                m.keeps_up
                    .map_or("—".into(), |k| if k { "yes".into() } else { "no".into() }),
                match (m.stable, runs) {
                    (true, 1) => "yes".into(),
                    (true, n) => format!("yes (run {n})"),
                    (false, n) => format!("no ({n} runs)"),
                },
                format!("{:.3}", m.calls_per_record),
                format!("{:.1} / {}", m.batch_mean, m.batch_max),
                m.failed.to_string(),
            ]);
        }
        md.push_str(&table.render());
        let _ = writeln!(
            md,
            "\nFlumen's throughput here: {flumen_rate:.0} records/s.\n"
        );
    }

    // Step change: 20 % → 90 % of the limit; how fast the batcher and limiter follow.
    let _ = writeln!(md, "## Step change: 20 % → 90 % of the limit (Flumen)\n");
    let backend = sim(&base);
    let engine = Engine::from_arc(Arc::clone(&backend), EngineConfig::default());
    let half = run_for;
    let step_input = open_loop(limit * 0.2, half, Some(options.seed)).chain(open_loop_after(
        limit * 0.9,
        half,
        half,
        options.seed,
    ));
    let sampler = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            let mut last = engine.stats();
            while t0.elapsed() < half * 2 + grace {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let s = engine.stats();
                let calls = s.calls - last.calls;
                let batch = if calls == 0 {
                    0.0
                } else {
                    (s.records_sent - last.records_sent) as f64 / calls as f64
                };
                samples.push((t0.elapsed().as_secs_f64(), s.limit as f64, batch));
                last = s;
            }
            samples
        })
    };
    let step_run = drive(
        flumen_stream(Box::pin(step_input), &engine),
        half * 2 + grace,
    )
    .await;
    let samples = sampler.await.unwrap_or_default();
    let step_at = step_run.start + half;
    let target = limit * 0.9;
    let converged = (0..40)
        .map(|i| step_at + Duration::from_millis(250 * i))
        .find(|t| {
            step_run
                .completions
                .rate(*t, *t + Duration::from_millis(500))
                >= 0.9 * target
        })
        .map(|t| t.duration_since(step_at));
    let step_secs = half.as_secs_f64();
    let batch_grown = samples
        .iter()
        .find(|s| s.0 > step_secs && s.2 >= 0.6 * base.max_batch as f64)
        .map(|s| s.0 - step_secs);
    let _ = writeln!(
        md,
        "The load steps up at {step_secs:.0} s. Flumen's throughput reached 90 % of the new load ({:.0}/s) {}; its mean batch size passed 60 % of the maximum {}. Limit and mean batch size, sampled every 100 ms:\n\n![limit over time](step_limit.svg)\n\n![batch size over time](step_batch.svg)\n",
        target,
        match converged {
            Some(d) => format!("within {} ms of the step (first 500 ms slice at ≥ 90 %)", d.as_millis()),
            None => "not within 10 s".into(),
        },
        match batch_grown {
            Some(d) => format!("{:.0} ms after it", d * 1e3),
            None => "not at all".into(),
        }
    );
    let limit_series = Series {
        name: "concurrency limit".into(),
        points: samples.iter().map(|s| (s.0, s.1)).collect(),
    };
    let batch_series = Series {
        name: "mean batch size".into(),
        points: samples.iter().map(|s| (s.0, s.2)).collect(),
    };
    let mut plots = vec![
        (
            "step_limit.svg".to_string(),
            line_chart(
                "Concurrency limit after a 20 % → 90 % step",
                "seconds",
                "calls in flight allowed",
                &[limit_series],
            ),
        ),
        (
            "step_batch.svg".to_string(),
            line_chart(
                "Mean batch size after a 20 % → 90 % step",
                "seconds",
                "records per call",
                &[batch_series],
            ),
        ),
    ];
    let (sweep_md, sweep_plot) = closed_loop_sweep(&base, run_for, warmup, window).await;
    md.push_str(&sweep_md);
    plots.push(sweep_plot);
    md.push_str(&embedded_backlog(warmup, window).await);
    md.push_str(&triton_backlog(warmup, window).await);
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

/// Closed loop: the operator's capacity (records outstanding, like perf_analyzer's
/// concurrency) swept over a backlog, Flumen against Flink Async I/O at the same
/// capacity. Latency is from the moment each system took the record.
async fn closed_loop_sweep(
    base: &SimConfig,
    run_for: Duration,
    warmup: Duration,
    window: Duration,
) -> (String, (String, String)) {
    let limit = base.limit_rps();
    let mut md = String::from("## Closed loop: records outstanding swept (backlog)\n\n");
    let mut table = Table::new(&[
        "outstanding",
        "Flumen",
        "Flumen p99",
        "Flumen batch mean",
        "Async I/O",
        "Async I/O p99",
        "Flumen ×",
    ]);
    let mut curves = vec![
        Series {
            name: "Flumen (capacity c)".into(),
            points: vec![],
        },
        Series {
            name: "Flink Async I/O (capacity c)".into(),
            points: vec![],
        },
    ];
    for c in [1usize, 4, 16, 64, 256, 1024] {
        let backend = sim(base);
        let engine = Engine::from_arc(Arc::clone(&backend), EngineConfig::default());
        let config = OperatorConfig {
            capacity: c,
            ..OperatorConfig::default()
        };
        let flumen = backlog(10_000_000)
            .infer(&engine, config, |s| Ok(s.id))
            .map(|o| (o.record, o.result));
        let fr = drive(flumen, run_for).await;
        let fm = measure(&fr, &backend, Load::Backlog, warmup, window, Duration::MAX);
        let fp99 = fr.emission_summary().p99;
        let backend = sim(base);
        let ar = drive(
            per_record(backlog(10_000_000), Arc::clone(&backend), c, |s| s.id),
            run_for,
        )
        .await;
        let am = measure(&ar, &backend, Load::Backlog, warmup, window, Duration::MAX);
        let ap99 = ar.emission_summary().p99;
        curves[0]
            .points
            .push((fm.throughput, fp99.as_secs_f64() * 1e3));
        curves[1]
            .points
            .push((am.throughput, ap99.as_secs_f64() * 1e3));
        table.row(vec![
            c.to_string(),
            format!(
                "{:.0}/s ({:.0} %)",
                fm.throughput,
                100.0 * fm.throughput / limit
            ),
            ms(fp99),
            format!("{:.1}", fm.batch_mean),
            format!(
                "{:.0}/s ({:.0} %)",
                am.throughput,
                100.0 * am.throughput / limit
            ),
            ms(ap99),
            format!("{:.1}", fm.throughput / am.throughput.max(1e-9)),
        ]);
    }
    md.push_str(&table.render());
    md.push_str("\nWith c records outstanding Flumen can batch at most c at a time: at c = 1 it is a per-record client too; from c ≈ 2 × 64 it reaches the limit, where Async I/O stays bounded by one record per call.\n\n![closed loop](closed_loop.svg)\n\n");
    let plot = (
        "closed_loop.svg".to_string(),
        line_chart(
            "Closed loop: throughput vs p99 as records outstanding grow (1 … 1024)",
            "records/s",
            "p99 ms",
            &curves,
        ),
    );
    (md, plot)
}

/// Counts calls and records per call of any backend.
struct Counted<B> {
    inner: B,
    calls: std::sync::atomic::AtomicU64,
    items: std::sync::atomic::AtomicU64,
}

impl<B: flumen_core::Backend> flumen_core::Backend for Counted<B> {
    type Input = B::Input;
    type Output = B::Output;

    fn capabilities(&self) -> flumen_core::Capabilities {
        self.inner.capabilities()
    }

    fn cost(&self, input: &B::Input) -> flumen_core::ItemCost {
        self.inner.cost(input)
    }

    async fn call(&self, batch: &[B::Input]) -> flumen_core::BatchResult<B::Output> {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        self.items.fetch_add(batch.len() as u64, Relaxed);
        self.inner.call(batch).await
    }
}

/// The embedded all-MiniLM-L6-v2 on a backlog of short review texts: Flumen against
/// a per-record client (Async I/O) and fixed batching (Ray Serve's defaults).
async fn embedded_backlog(warmup: Duration, window: Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut md = String::from("## Embedded all-MiniLM-L6-v2: backlog drain\n\n");
    let model = match flumen_embed::Embedder::load(flumen_embed::EmbedConfig::default()).await {
        Ok(m) => Arc::new(Counted {
            inner: m,
            calls: Default::default(),
            items: Default::default(),
        }),
        Err(e) => {
            let _ = writeln!(md, "Not measured: the model could not be loaded: {e}\n");
            return md;
        }
    };
    let texts: Arc<Vec<String>> = Arc::new(
        include_str!("../../../examples/data/reviews.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_owned))
            .collect(),
    );
    let text = {
        let texts = Arc::clone(&texts);
        move |s: &Scheduled| texts[s.id as usize % texts.len()].clone()
    };
    let mut table = Table::new(&[
        "system",
        "sentences/s",
        "p99 from hand-over",
        "calls/record",
        "batch mean",
        "failed",
        "Flumen ×",
    ]);
    let mut rows = Vec::new();
    for system in [System::Flumen, System::AsyncIo, System::RayServe] {
        let (c0, i0) = (model.calls.load(Relaxed), model.items.load(Relaxed));
        let input = backlog(10_000_000);
        let run = match system {
            System::Flumen => {
                let engine = Engine::from_arc(Arc::clone(&model), EngineConfig::default());
                let t = text.clone();
                let out = input
                    .infer(&engine, OperatorConfig::default(), move |s| Ok(t(s)))
                    .map(|o| (o.record, o.result.map(|_| ())));
                drive(out, warmup + window).await
            }
            System::AsyncIo => {
                let out = per_record(input, Arc::clone(&model), 100, text.clone())
                    .map(|(r, res)| (r, res.map(|_| ())));
                drive(out, warmup + window).await
            }
            _ => {
                let out = fixed_batch(
                    input,
                    Arc::clone(&model),
                    10,
                    Duration::from_millis(10),
                    text.clone(),
                )
                .map(|(r, res)| (r, res.map(|_| ())));
                drive(out, warmup + window).await
            }
        };
        let (calls, items) = (
            model.calls.load(Relaxed) - c0,
            model.items.load(Relaxed) - i0,
        );
        let from = run.start + warmup;
        let rate = run.completions.rate(from, from + window);
        rows.push((
            system,
            rate,
            run.emission_summary().p99,
            calls,
            items,
            run.failed,
        ));
    }
    let flumen = rows[0].1;
    for (system, rate, p99, calls, items, failed) in rows {
        table.row(vec![
            system.name().into(),
            format!("{rate:.0}/s"),
            ms(p99),
            format!("{:.3}", calls as f64 / items.max(1) as f64),
            format!("{:.1}", items as f64 / calls.max(1) as f64),
            failed.to_string(),
            format!("{:.2}", flumen / rate.max(1e-9)),
        ]);
    }
    md.push_str(&table.render());
    md.push_str("\nThe model runs in this process on all cores (a ragged batch split across its threads), so batching buys less than against a remote server: no per-call network or framework overhead to amortise, only GEMM efficiency and thread hand-offs.\n\n");
    md
}

/// A real Triton server on a backlog, two models: the cost model (a = 20 ms,
/// b = 0.5 ms, k = 2, max batch 64), and the text model (BYTES in, length out, max
/// batch 64), whose cost is Triton's own per-request work. For each, Flumen's
/// client-side batching (dynamic batcher off) against per-record requests with
/// Triton's server-side dynamic batcher, 10 and 100 in flight (Flink's Triton
/// provider; Flink Async I/O's default capacity). Skipped, saying so, when Triton is
/// not installed (`scripts/triton.sh`).
async fn triton_backlog(warmup: Duration, window: Duration) -> String {
    use flumen_kserve::server::{cost_model, text_model, TritonServer};
    let mut md = String::new();
    let (a, b, k, n) = (20.0, 0.5, 2, 64);
    let limit = k as f64 * n as f64 / ((a + b * n as f64) / 1e3);
    let triton = match TritonServer::start(&[
        cost_model("cost", a, b, k, n, false),
        cost_model("cost_db", a, b, k, n, true),
        text_model("text", n, false),
        text_model("text_db", n, true),
    ]) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(
                md,
                "## Real Triton server: backlog drain\n\nNot measured: {e} (`bash scripts/triton.sh` installs it).\n"
            );
            return md;
        }
    };
    let windows = (warmup, window);
    let _ = writeln!(md, "## Real Triton server, cost model: backlog drain\n");
    let cost_row = |s: &Scheduled| serde_json::json!(s.id as f64);
    match triton_table(&triton, "cost", cost_row, Some(limit), windows).await {
        Ok(table) => {
            let _ = writeln!(
                md,
                "tritonserver 2.51 on this CPU, a Python-backend model; physical limit {limit:.0} rows/s.\n\n{table}"
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: Triton did not become ready: {e}\n");
        }
    }
    let _ = writeln!(md, "## Real Triton server, text model: backlog drain\n");
    let text_row = |s: &Scheduled| serde_json::json!(review(s.id));
    match triton_table(&triton, "text", text_row, None, windows).await {
        Ok(table) => {
            let _ = writeln!(
                md,
                "The same server; each row a review-like text of 30–200 characters (BYTES), the model returns its length. Its computation is negligible: what is measured is Triton's own work per request and per execution (HTTP, JSON, scheduling, the Python backend's IPC), which batching amortises. No physical limit is computed for it; \"rows per execution\" comes from Triton's own statistics.\n\n{table}"
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: Triton did not become ready: {e}\n");
        }
    }
    md
}

/// A text of 30–200 characters for row `id`, deterministic.
fn review(id: u64) -> String {
    const WORDS: [&str; 12] = [
        "the", "service", "was", "quick", "and", "friendly", "but", "the", "food", "arrived",
        "cold", "again",
    ];
    let len = 6 + (id.wrapping_mul(2_654_435_761) % 30) as usize;
    let words: Vec<&str> = (0..len)
        .map(|i| WORDS[(id as usize + i * 7) % WORDS.len()])
        .collect();
    format!("#{id} {}", words.join(" "))
}

/// Flumen on `model` and the per-record clients on `model_db` (its twin with the
/// dynamic batcher), each on a backlog: the rendered table.
async fn triton_table(
    triton: &flumen_kserve::server::TritonServer,
    model: &str,
    row: fn(&Scheduled) -> serde_json::Value,
    limit: Option<f64>,
    (warmup, window): (Duration, Duration),
) -> Result<String, flumen_kserve::KserveError> {
    use flumen_kserve::{KserveConfig, KserveHttp};
    let root = triton.http_url();
    let batched_name = format!("{model}_db");
    let plain = Arc::new(KserveHttp::connect(KserveConfig::new(root.clone(), model)).await?);
    let batched = Arc::new(KserveHttp::connect(KserveConfig::new(root, &batched_name)).await?);
    let mut header = vec!["system", "throughput"];
    if limit.is_some() {
        header.push("% of limit");
    }
    header.extend([
        "p99 from hand-over",
        "rows per execution",
        "failed",
        "Flumen ×",
    ]);
    let mut table = Table::new(&header);
    let run_for = warmup + window;
    let mut rows = Vec::new();
    for (name, inflight) in [
        ("Flumen, client-side batching (dynamic batcher off)", None),
        (
            "per record, 10 in flight, Triton dynamic batcher (Flink's Triton provider)",
            Some(10),
        ),
        (
            "per record, 100 in flight, Triton dynamic batcher (Async I/O capacity)",
            Some(100),
        ),
    ] {
        let counted = if inflight.is_some() {
            &batched_name
        } else {
            model
        };
        let before = triton.counts(counted).await;
        let run = match inflight {
            None => {
                let engine = Engine::from_arc(Arc::clone(&plain), EngineConfig::default());
                let config = OperatorConfig {
                    capacity: 512,
                    ..OperatorConfig::default()
                };
                let out = backlog(10_000_000)
                    .infer(&engine, config, move |s| Ok(row(s)))
                    .map(|o| (o.record, o.result.map(|_| ())));
                drive(out, run_for).await
            }
            Some(c) => {
                let out = per_record(backlog(10_000_000), Arc::clone(&batched), c, row)
                    .map(|(r, res)| (r, res.map(|_| ())));
                drive(out, run_for).await
            }
        };
        let after = triton.counts(counted).await;
        let per_execution = match (before, after) {
            (Some((r0, e0)), Some((r1, e1))) if e1 > e0 => {
                format!("{:.1}", (r1 - r0) as f64 / (e1 - e0) as f64)
            }
            _ => "—".into(),
        };
        let from = run.start + warmup;
        let rate = run.completions.rate(from, from + window);
        rows.push((
            name,
            rate,
            run.emission_summary().p99,
            per_execution,
            run.failed,
        ));
    }
    let flumen = rows[0].1;
    for (name, rate, p99, per_execution, failed) in rows {
        let mut cells = vec![name.to_string(), format!("{rate:.0}/s")];
        if let Some(limit) = limit {
            cells.push(format!("{:.1} %", 100.0 * rate / limit));
        }
        cells.extend([
            ms(p99),
            per_execution,
            failed.to_string(),
            format!("{:.2}", flumen / rate.max(1e-9)),
        ]);
        table.row(cells);
    }
    Ok(table.render())
}

/// Open-loop arrivals that start after `delay`.
fn open_loop_after(
    rate: f64,
    duration: Duration,
    delay: Duration,
    seed: u64,
) -> impl Stream<Item = Scheduled> + Send + 'static {
    futures::stream::once(tokio::time::sleep(delay))
        .map(move |()| open_loop(rate, duration, Some(seed + 1)))
        .flatten()
}
