//! `cargo bench --bench gateway`: many concurrent single-row callers — like Flink
//! subtasks calling a model one row at a time — against a real Triton server
//! (cost model a = 20 ms, b = 0.5 ms, k = 2, max batch 64; no server-side batching)
//! (a) directly, and (b) through `flumen serve`, which batches all callers' rows
//! together. Same server, same callers, one run.

use std::sync::Arc;
use std::time::Duration;

use flumen_bench::load::Summary;
use flumen_bench::report::{ms, result_line, Table};
use flumen_core::Backend;
use flumen_gateway::serve::{start, ServeConfig};
use flumen_kserve::server::{cost_model, TritonServer};
use flumen_kserve::{KserveConfig, KserveHttp};
use serde_json::{json, Value};
use tokio::time::Instant;

const CALLERS: usize = 64;
const WARMUP: Duration = Duration::from_secs(2);
const WINDOW: Duration = Duration::from_secs(8);

/// Rows done and latencies of the calls that finished inside the window.
struct Measured {
    rows: usize,
    latencies: Vec<Duration>,
    failed: usize,
}

/// Runs `CALLERS` loops of one-row calls for warm-up + window.
async fn callers<F, Fut>(call: F) -> Measured
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let t0 = Instant::now();
    let (from, to) = (t0 + WARMUP, t0 + WARMUP + WINDOW);
    let tasks: Vec<_> = (0..CALLERS)
        .map(|c| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut rows, mut lat, mut failed) = (0, Vec::new(), 0);
                let mut i = c as u64;
                while Instant::now() < to {
                    let start = Instant::now();
                    let ok = call(i).await;
                    let end = Instant::now();
                    i += CALLERS as u64;
                    if start >= from && end <= to {
                        if ok {
                            rows += 1;
                            lat.push(end - start);
                        } else {
                            failed += 1;
                        }
                    }
                }
                (rows, lat, failed)
            })
        })
        .collect();
    let mut m = Measured {
        rows: 0,
        latencies: Vec::new(),
        failed: 0,
    };
    for t in tasks {
        let (r, l, f) = t.await.expect("caller task");
        m.rows += r;
        m.latencies.extend(l);
        m.failed += f;
    }
    m
}

async fn stats(triton: &TritonServer) -> (u64, u64) {
    let url = format!("{}/v2/models/cost/stats", triton.http_url());
    let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let s = &v["model_stats"][0];
    (
        s["inference_stats"]["success"]["count"]
            .as_u64()
            .unwrap_or(0),
        s["inference_count"].as_u64().unwrap_or(0),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let triton = TritonServer::start(&[cost_model("cost", 20.0, 0.5, 2, 64, false)])
        .expect("tritonserver starts: run `bash scripts/triton.sh` first");
    let direct = Arc::new(
        KserveHttp::connect(KserveConfig::new(triton.http_url(), "cost"))
            .await
            .expect("the model is ready"),
    );
    let limit = 2.0 * 64.0 / 0.052;
    println!(
        "gateway benchmark: {CALLERS} concurrent single-row callers, real Triton cost model (a = 20 ms, b = 0.5 ms, k = 2, max batch 64, no dynamic batcher; limit {limit:.0} rows/s); {} s warm-up, {} s window\n",
        WARMUP.as_secs(),
        WINDOW.as_secs()
    );

    // (a) Every caller sends its rows straight to Triton, one request per row.
    let before = stats(&triton).await;
    let d = {
        let direct = Arc::clone(&direct);
        callers(move |i| {
            let direct = Arc::clone(&direct);
            async move { matches!(direct.call(&[json!(i as f64)]).await, Ok(r) if r[0].is_ok()) }
        })
        .await
    };
    let after = stats(&triton).await;
    let direct_per_row = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;

    // (b) The same callers through the gateway, which batches their rows together.
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_pending = 100000\n\n[[models]]\nname = \"cost\"\n[models.backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"cost\"\n",
        triton.http_url()
    ))
    .expect("a valid gateway configuration");
    let gateway = start(&config).await.expect("the gateway starts");
    let url = format!("http://{}/v2/models/cost/infer", gateway.addr);
    let http = reqwest::Client::new();
    let before = stats(&triton).await;
    let g = callers(move |i| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = json!({"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [i as f64]}]});
            match http.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap_or_default();
                    v["outputs"][0]["data"][0].as_f64() == Some(2.0 * i as f64)
                }
                _ => false,
            }
        }
    })
    .await;
    let after = stats(&triton).await;
    let gateway_per_row = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;

    let rate = |m: &Measured| m.rows as f64 / WINDOW.as_secs_f64();
    let (rd, rg) = (rate(&d), rate(&g));
    let mut table = Table::new(&[
        "path",
        "throughput",
        "% of limit",
        "p50",
        "p99",
        "backend requests/row",
        "failed",
        "gateway ×",
    ]);
    for (name, m, r, per_row) in [
        (
            "(a) callers → Triton directly, one request per row",
            &d,
            rd,
            direct_per_row,
        ),
        (
            "(b) callers → flumen serve → Triton",
            &g,
            rg,
            gateway_per_row,
        ),
    ] {
        let s = Summary::of(m.latencies.clone());
        table.row(vec![
            name.into(),
            format!("{r:.0}/s"),
            format!("{:.1} %", 100.0 * r / limit),
            ms(s.p50),
            ms(s.p99),
            format!("{per_row:.3}"),
            m.failed.to_string(),
            format!("{:.2}", rg / r.max(1e-9)),
        ]);
    }
    print!("{}", table.render());
    println!("\nLatency is per call, as a caller sees it. The embedded model's row of this comparison waits for the embedded backend (issue 5).");
    println!(
        "{}",
        result_line(&[
            (
                "gateway_vs_direct_triton",
                format!("{:.2}", rg / rd.max(1e-9))
            ),
            ("backend_requests_per_row", format!("{gateway_per_row:.3}")),
        ])
    );
}
