//! `cargo bench --bench engine`: Flumen's engine against per-record calls (Flink
//! Async I/O) and fixed batching (Ray Serve defaults) on one simulated backend:
//! a = 20 ms, b = 0.5 ms, k = 2, max batch 64 (limit k·N/(a+b·N) ≈ 2,462 records/s).
//!
//! Real time on a multi-threaded runtime; every system gets a fresh simulator of
//! the same shape and the same load in the same run. No assertions: it reports.

use std::sync::Arc;
use std::time::Duration;

use flumen_bench::baselines::{fixed_batch, per_record};
use flumen_bench::load::{backlog, drive, open_loop, Run, Scheduled};
use flumen_bench::report::{ms, result_line, Table};
use flumen_core::Failure;
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_sim::{Noop, Sim, SimConfig};
use futures::{Stream, StreamExt};
use tokio::time::Instant;

const WARMUP: Duration = Duration::from_secs(1);

fn sim() -> Arc<Sim<u64>> {
    Arc::new(Sim::new(SimConfig::default()))
}

fn flumen_engine(sim: &Arc<Sim<u64>>) -> Engine<Sim<u64>> {
    Engine::from_arc(
        Arc::clone(sim),
        EngineConfig {
            name: "bench".into(),
            ..EngineConfig::default()
        },
    )
}

fn flumen<S>(
    input: S,
    engine: &Engine<Sim<u64>>,
    capacity: usize,
) -> impl Stream<Item = (Scheduled, Result<u64, Failure>)>
where
    S: Stream<Item = Scheduled> + Send + 'static,
{
    let config = OperatorConfig {
        capacity,
        timeout: None,
        ..OperatorConfig::default()
    };
    input
        .infer(engine, config, |s| Ok(s.id))
        .map(|o| (o.record, o.result))
}

fn steady_rate(run: &Run, window: Duration) -> f64 {
    run.completions
        .rate(run.start + WARMUP, run.start + WARMUP + window)
}

/// Records/s through the operator and engine with a backend that does nothing.
async fn noop_rate(n: u64) -> f64 {
    let noop = Engine::new(Noop::<u64>::new(1_024), EngineConfig::default());
    let config = OperatorConfig {
        capacity: 8_192,
        timeout: Some(Duration::from_secs(60)),
        ..OperatorConfig::default()
    };
    let t = Instant::now();
    let done = futures::stream::iter(0..n)
        .infer(&noop, config, |&i| Ok(i))
        .fold(0u64, |n, o| async move { n + o.result.is_ok() as u64 })
        .await;
    let rate = done as f64 / t.elapsed().as_secs_f64();
    assert_eq!(done, n, "every no-op record succeeds");
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = SimConfig::default();
    let limit = config.limit_rps();
    println!(
        "engine benchmark: sim a = 20 ms, b = 0.5 ms, k = {}, max batch {}; limit {:.0} records/s, per-record limit {:.1} records/s\n",
        config.slots,
        config.max_batch,
        limit,
        config.per_record_limit_rps()
    );

    // 1. Backlog drain: ≥ 10 s of steady state for Flumen.
    let window = Duration::from_secs(10);
    let n = (limit * 12.5) as u64;
    let s = sim();
    let engine = flumen_engine(&s);
    let f_drain = drive(flumen(backlog(n), &engine, 2_048), Duration::from_secs(30)).await;
    let f_calls = s.stats().calls as f64 / s.stats().items.max(1) as f64;
    let f_rps = steady_rate(&f_drain, window);
    let base_window = Duration::from_secs(5);
    let s_pr = sim();
    let pr_drain = drive(
        per_record(backlog(n), Arc::clone(&s_pr), 100, |x| x.id),
        WARMUP + base_window,
    )
    .await;
    let pr_rps = steady_rate(&pr_drain, base_window);
    let s_fb = sim();
    let fb_drain = drive(
        fixed_batch(
            Box::pin(backlog(n)),
            Arc::clone(&s_fb),
            10,
            Duration::from_millis(10),
            |x| x.id,
        ),
        WARMUP + base_window,
    )
    .await;
    let fb_rps = steady_rate(&fb_drain, base_window);

    // 2. Idle backend: one record every 100 ms. Latency from the moment the record is
    //    handed over: the generator's own timer lateness (~1 ms) is not the system's.
    let idle = || open_loop(10.0, Duration::from_secs(3), None);
    let s_idle = sim();
    let e_idle = flumen_engine(&s_idle);
    let f_idle = drive(flumen(idle(), &e_idle, 100), Duration::from_secs(10))
        .await
        .emission_summary();
    let fb_idle = drive(
        fixed_batch(
            Box::pin(idle()),
            sim(),
            10,
            Duration::from_millis(10),
            |x| x.id,
        ),
        Duration::from_secs(10),
    )
    .await
    .emission_summary();
    let pr_idle = drive(
        per_record(idle(), sim(), 100, |x| x.id),
        Duration::from_secs(10),
    )
    .await
    .emission_summary();

    // 3. Steady 50 % of the limit, open loop (evenly spaced), 5 s.
    let rate = limit / 2.0;
    let dur = Duration::from_secs(5);
    let grace = Duration::from_millis(500);
    let offered = (rate * dur.as_secs_f64()).ceil() as usize;
    let half = || open_loop(rate, dur, None);
    let s_half = sim();
    let e_half = flumen_engine(&s_half);
    let f_half = drive(flumen(half(), &e_half, 2_048), dur + grace).await;
    let pr_half = drive(per_record(half(), sim(), 100, |x| x.id), dur + grace).await;
    let fb_half = drive(
        fixed_batch(
            Box::pin(half()),
            sim(),
            10,
            Duration::from_millis(10),
            |x| x.id,
        ),
        dur + grace,
    )
    .await;
    let keeps_up = |r: &Run| r.completions.len() as f64 >= 0.99 * offered as f64;

    // 4. Engine overhead: a no-op backend; the median of three runs (this machine
    //    is shared and noisy).
    let mut noop_runs: Vec<f64> = Vec::new();
    for _ in 0..3 {
        noop_runs.push(noop_rate(2_000_000).await);
    }
    noop_runs.sort_by(f64::total_cmp);
    let noop_rps = noop_runs[1];
    // 5. The same with `tracing` on at `info` — a `fmt` subscriber writing to
    //    nowhere, as `flumen` runs by default, exporting nothing — installed for the
    //    whole process now (it cannot be taken back, so this comes last): the
    //    engine's record, attempt and call spans are at debug level, so this is what
    //    their disabled call sites cost. Median of three, as above.
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("no subscriber yet");
    let mut info_runs: Vec<f64> = Vec::new();
    for _ in 0..3 {
        info_runs.push(noop_rate(2_000_000).await);
    }
    info_runs.sort_by(f64::total_cmp);
    let (noop_off, noop_info) = (noop_rps, info_runs[1]);

    let pct = |x: f64| format!("{:.1} %", 100.0 * x / limit);
    let rps = |x: f64| format!("{x:.0}/s");
    let mut table = Table::new(&[
        "scenario",
        "system",
        "throughput",
        "% of limit",
        "p50",
        "p99",
        "calls/record",
        "Flumen ×",
    ]);
    table.row(vec![
        format!("backlog drain ({} s steady)", window.as_secs()),
        "Flumen (adaptive)".into(),
        rps(f_rps),
        pct(f_rps),
        "".into(),
        "".into(),
        format!("{f_calls:.4}"),
        "1.00".into(),
    ]);
    table.row(vec![
        "".into(),
        "per-record, Flink Async I/O (cap 100)".into(),
        rps(pr_rps),
        pct(pr_rps),
        "".into(),
        "".into(),
        "1.0000".into(),
        format!("{:.1}", f_rps / pr_rps),
    ]);
    table.row(vec![
        "".into(),
        "fixed batch, Ray Serve (10, 10 ms)".into(),
        rps(fb_rps),
        pct(fb_rps),
        "".into(),
        "".into(),
        format!(
            "{:.4}",
            s_fb.stats().calls as f64 / s_fb.stats().items.max(1) as f64
        ),
        format!("{:.1}", f_rps / fb_rps),
    ]);
    for (name, s) in [
        ("Flumen (adaptive)", &f_idle),
        ("per-record, Flink Async I/O", &pr_idle),
        ("fixed batch, Ray Serve (10, 10 ms)", &fb_idle),
    ] {
        let first = name.starts_with("Flumen");
        table.row(vec![
            if first {
                "idle: 1 record / 100 ms (latency from hand-over)".into()
            } else {
                "".into()
            },
            name.into(),
            "".into(),
            "".into(),
            ms(s.p50),
            ms(s.p99),
            "".into(),
            "".into(),
        ]);
    }
    for (name, r) in [
        ("Flumen (adaptive)", &f_half),
        ("per-record, Flink Async I/O (cap 100)", &pr_half),
        ("fixed batch, Ray Serve (10, 10 ms)", &fb_half),
    ] {
        let first = name.starts_with("Flumen");
        let s = r.summary();
        let done = r.completions.len();
        table.row(vec![
            if first {
                format!("50 % load ({rate:.0}/s, 5 s open loop)")
            } else {
                "".into()
            },
            name.into(),
            format!(
                "{done}/{offered} done: {}",
                if keeps_up(r) {
                    "keeps up"
                } else {
                    "falls behind"
                }
            ),
            "".into(),
            ms(s.p50),
            format!(
                "{}{}",
                ms(s.p99),
                if keeps_up(r) { "" } else { " (of those done)" }
            ),
            "".into(),
            "".into(),
        ]);
    }
    table.row(vec![
        "engine overhead".into(),
        "Flumen, no-op backend (median of 3)".into(),
        rps(noop_rps),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
    ]);
    for (system, rate) in [
        ("Flumen, no-op, tracing off (the run above)", noop_off),
        ("Flumen, no-op, tracing at info (median of 3)", noop_info),
    ] {
        table.row(vec![
            "tracing overhead".into(),
            system.into(),
            rps(rate),
            "".into(),
            "".into(),
            "".into(),
            "".into(),
            format!("{:.2}", rate / noop_off),
        ]);
    }
    print!("{}", table.render());
    let failed = f_drain.failed + f_half.failed;
    println!(
        "\nFlumen failures: {failed}. Goals: ≥ 97 % of limit; idle p50 ≤ a + b + 2 ms = 22.5 ms; no-op ≥ 1,000,000/s; with tracing at info ≥ 90 % of without."
    );
    println!(
        "{}",
        result_line(&[
            ("limit_pct", format!("{:.1}", 100.0 * f_rps / limit)),
            ("vs_per_record", format!("{:.1}", f_rps / pr_rps)),
            ("vs_fixed_batch", format!("{:.2}", f_rps / fb_rps)),
            (
                "p50_idle_ms",
                format!("{:.1}", f_idle.p50.as_secs_f64() * 1e3)
            ),
            (
                "p99_half_load_ms",
                format!("{:.1}", f_half.summary().p99.as_secs_f64() * 1e3)
            ),
            ("noop_rps", format!("{noop_rps:.0}")),
            ("noop_rps_tracing_off", format!("{noop_off:.0}")),
            ("noop_rps_tracing_info", format!("{noop_info:.0}")),
            (
                "tracing_info_vs_off",
                format!("{:.3}", noop_info / noop_off)
            ),
        ])
    );
}
