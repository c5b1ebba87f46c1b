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

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Overload {
    table: String,
    admitted_p99_ms: f64,
    rejected_pct: f64,
}

/// Open-loop single-row requests at twice the capacity of a simulated model
/// (a = 20 ms, b = 2 ms, k = 2, N = 64: 865 rows/s) behind a gateway admitting 300
/// pending records with a 1 s deadline: the admitted must meet the deadline, the
/// rest get 429 with Retry-After, and memory must not grow with the excess.
async fn overload() -> Overload {
    let limit = 2.0 * 64.0 / (0.020 + 0.002 * 64.0);
    let config = ServeConfig::from_toml(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_pending = 300\ntimeout_ms = 1000\n\n[[models]]\nname = \"sim\"\n[models.backend]\nkind = \"sim\"\na_ms = 20.0\nb_ms = 2.0\n",
    )
    .expect("a valid gateway configuration");
    let gateway = start(&config).await.expect("the gateway starts");
    let url = format!("http://{}/v2/models/sim/infer", gateway.addr);
    let http = reqwest::Client::new();
    let rate = 2.0 * limit;
    let duration = Duration::from_secs(6);
    let n = (rate * duration.as_secs_f64()) as u64;
    let t0 = Instant::now();
    let rss_start = rss_kib();
    let mut rss = Vec::new();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        if i % (n / 6).max(1) == 0 {
            rss.push(rss_kib());
        }
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "FP32", "data": [i as f64]}]});
            let sent = Instant::now();
            let r = http.post(&url).json(&body).send().await;
            let latency = at.elapsed().max(sent.elapsed());
            match r {
                Ok(r) => (r.status().as_u16(), r.headers().contains_key("retry-after"), latency),
                Err(_) => (0, false, latency),
            }
        }));
    }
    let (mut ok, mut rejected, mut rejected_with_wait, mut other) = (Vec::new(), 0u64, 0u64, 0u64);
    for t in tasks {
        match t.await.expect("request task") {
            (200, _, l) => ok.push(l),
            (429, wait, _) => {
                rejected += 1;
                rejected_with_wait += u64::from(wait);
            }
            _ => other += 1,
        }
    }
    rss.push(rss_kib());
    let admitted = Summary::of(ok.clone());
    let mut table = Table::new(&["overload: 2× capacity, open loop, 6 s", "value"]);
    let rejected_pct = 100.0 * rejected as f64 / n as f64;
    for (k, v) in [
        (
            "offered",
            format!("{n} requests at {rate:.0}/s (capacity {limit:.0}/s)"),
        ),
        (
            "admitted and answered 200",
            format!("{} ({:.1} %)", ok.len(), 100.0 * ok.len() as f64 / n as f64),
        ),
        (
            "admitted p50 / p99 (deadline 1,000 ms)",
            format!("{} / {}", ms(admitted.p50), ms(admitted.p99)),
        ),
        (
            "rejected 429",
            format!("{rejected} ({rejected_pct:.1} %), {rejected_with_wait} with Retry-After"),
        ),
        ("other statuses or errors", other.to_string()),
        ("resident memory: start → during → end (MiB)", {
            let mib: Vec<String> = std::iter::once(rss_start)
                .chain(rss.iter().copied())
                .map(|k| format!("{:.0}", k as f64 / 1024.0))
                .collect();
            mib.join(" → ")
        }),
    ] {
        table.row(vec![k.into(), v]);
    }
    gateway.server.abort();
    Overload {
        table: table.render(),
        admitted_p99_ms: admitted.p99.as_secs_f64() * 1e3,
        rejected_pct,
    }
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

    let overload = overload().await;

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
    println!("\nLatency is per call, as a caller sees it. The embedded model's row of this comparison waits for the embedded backend (issue 5).\n");
    print!("{}", overload.table);
    println!(
        "{}",
        result_line(&[
            (
                "gateway_vs_direct_triton",
                format!("{:.2}", rg / rd.max(1e-9))
            ),
            ("backend_requests_per_row", format!("{gateway_per_row:.3}")),
            (
                "overload_admitted_p99_ms",
                format!("{:.0}", overload.admitted_p99_ms)
            ),
            (
                "overload_rejected_pct",
                format!("{:.1}", overload.rejected_pct)
            ),
        ])
    );
}
