//! A real Triton server on a backlog: Flumen's client-side batching against
//! per-record requests with Triton's dynamic batcher.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use futures::StreamExt;

use crate::baselines::per_record;
use crate::load::{backlog, drive, Scheduled};
use crate::report::{ms, Table};

/// A real Triton server on a backlog, two models: the cost model (a = 20 ms,
/// b = 0.5 ms, k = 2, max batch 64), and the text model (BYTES in, length out, max
/// batch 64), whose cost is Triton's own per-request work. For each, Flumen's
/// client-side batching (dynamic batcher off) against per-record requests with
/// Triton's server-side dynamic batcher, 10 and 100 in flight (Flink's Triton
/// provider; Flink Async I/O's default capacity). Skipped, saying so, when Triton is
/// not installed (`scripts/triton.sh`).
pub(super) async fn triton_backlog(warmup: Duration, window: Duration) -> String {
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
            (Some(b), Some(a)) => a
                .rows_per_execution_since(b)
                .map_or("—".into(), |x| format!("{x:.1}")),
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
