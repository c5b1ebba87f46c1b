//! `cargo bench --bench triton`: against a real Triton server it starts itself
//! (installed by `scripts/triton.sh`), serving the cost model — a = 20 ms,
//! b = 0.5 ms per row, k = 2 instances, max batch 64 (limit k·N/(a+b·N) ≈ 2,462
//! rows/s) — with and without Triton's dynamic batcher, on one server:
//!
//! (a) one request per record, 10 in flight, dynamic batcher on (Flink's Triton provider);
//! (b) Flumen's client-side adaptive batching (dynamic batcher off);
//! (c) one request per record, 100 in flight (Flink Async I/O's default capacity).

use std::sync::Arc;
use std::time::Duration;

use flumen_bench::baselines::per_record;
use flumen_bench::load::{backlog, drive, Run};
use flumen_bench::report::{ms, result_line, Table};
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_kserve::server::{cost_model, Counts, TritonServer};
use flumen_kserve::{KserveConfig, KserveHttp};
use futures::StreamExt;
use serde_json::json;

const WARMUP: Duration = Duration::from_secs(2);
const WINDOW: Duration = Duration::from_secs(8);

fn rate(run: &Run) -> f64 {
    run.completions
        .rate(run.start + WARMUP, run.start + WARMUP + WINDOW)
}

async fn connect(triton: &TritonServer, model: &str) -> KserveHttp {
    KserveHttp::connect(KserveConfig::new(triton.http_url(), model))
        .await
        .expect("the model is ready")
}

async fn counts(triton: &TritonServer, model: &str) -> Counts {
    triton.counts(model).await.expect("Triton's statistics")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (a, b, k, n) = (20.0, 0.5, 2, 64);
    let limit = k as f64 * n as f64 / ((a + b * n as f64) / 1e3);
    let triton = TritonServer::start(&[
        cost_model("cost", a, b, k, n, false),
        cost_model("cost_db", a, b, k, n, true),
    ])
    .expect("tritonserver starts: run `bash scripts/triton.sh` first");
    let plain = Arc::new(connect(&triton, "cost").await);
    let batched = Arc::new(connect(&triton, "cost_db").await);
    println!(
        "triton benchmark: real Triton (CPU, Python backend) cost model a = {a} ms, b = {b} ms, k = {k}, max batch {n}; limit {limit:.0} rows/s; {} s warm-up, {} s window\n",
        WARMUP.as_secs(),
        WINDOW.as_secs()
    );
    let total = WARMUP + WINDOW;
    let records = 200_000;
    let row = |s: &flumen_bench::load::Scheduled| json!(s.id as f64);

    // (a) Flink's Triton provider: one request per record, 10 in flight, server batching.
    let before = counts(&triton, "cost_db").await;
    let run_a = drive(
        per_record(backlog(records), Arc::clone(&batched), 10, row),
        total,
    )
    .await;
    let after = counts(&triton, "cost_db").await;
    let batch_a = after.rows_per_execution_since(before).unwrap_or(0.0);

    // (b) Flumen: client-side adaptive batching, adaptive concurrency, no server batching.
    let engine = Engine::from_arc(Arc::clone(&plain), EngineConfig::default());
    // Enough in flight for two full batches running and the next one forming.
    let config = OperatorConfig {
        capacity: 512,
        ..OperatorConfig::default()
    };
    let before = counts(&triton, "cost").await;
    let flumen = backlog(records)
        .infer(&engine, config, |s| Ok(json!(s.id as f64)))
        .map(|o| (o.record, o.result));
    let run_b = drive(flumen, total).await;
    let after = counts(&triton, "cost").await;
    let batch_b = after.rows_per_execution_since(before).unwrap_or(0.0);

    // (c) Flink Async I/O's default capacity: 100 requests in flight, server batching.
    let before = counts(&triton, "cost_db").await;
    let run_c = drive(
        per_record(backlog(records), Arc::clone(&batched), 100, row),
        total,
    )
    .await;
    let after = counts(&triton, "cost_db").await;
    let batch_c = after.rows_per_execution_since(before).unwrap_or(0.0);

    let (ra, rb, rc) = (rate(&run_a), rate(&run_b), rate(&run_c));
    let mut table = Table::new(&[
        "system",
        "throughput",
        "% of limit",
        "p50",
        "p99",
        "rows per execution",
        "failed",
        "Flumen ×",
    ]);
    for (name, run, r, batch) in [
        (
            "(a) per record, 10 in flight, Triton dynamic batcher",
            &run_a,
            ra,
            batch_a,
        ),
        ("(b) Flumen adaptive batching", &run_b, rb, batch_b),
        (
            "(c) per record, 100 in flight, Triton dynamic batcher",
            &run_c,
            rc,
            batch_c,
        ),
    ] {
        let s = run.emission_summary();
        table.row(vec![
            name.into(),
            format!("{r:.0}/s"),
            format!("{:.1} %", 100.0 * r / limit),
            ms(s.p50),
            ms(s.p99),
            format!("{batch:.1}"),
            run.failed.to_string(),
            format!("{:.2}", rb / r),
        ]);
    }
    print!("{}", table.render());
    println!(
        "\nLatency is from the moment each system took the record from the backlog (Flumen holds up to 512 at once, the baselines 10 or 100). Goals: (b) ≥ 95 % of the limit, ≥ 5× (a), ≥ 1.5× (c)."
    );
    println!(
        "{}",
        result_line(&[
            ("triton_limit_pct", format!("{:.1}", 100.0 * rb / limit)),
            ("ratio_vs_10_inflight", format!("{:.2}", rb / ra)),
            ("ratio_vs_100_inflight", format!("{:.2}", rb / rc)),
        ])
    );
}
