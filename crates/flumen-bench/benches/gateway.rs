//! `cargo bench --bench gateway`: many concurrent single-row callers — like Flink
//! subtasks calling a model one row at a time — (a) directly against the model and
//! (b) through the gateway, which batches all callers' rows together; for a real
//! Triton server (cost model a = 20 ms, b = 0.5 ms, k = 2, max batch 64; no
//! server-side batching) and for the embedded all-MiniLM-L6-v2. Then overload at 2×
//! capacity against `flumen serve` in its own process, whose memory is sampled.
//! Same callers, one run.

use std::sync::Arc;
use std::time::Duration;

use flumen_bench::load::Summary;
use flumen_bench::report::{ms, result_line, Table};
use flumen_bench::served::Served;
use flumen_core::Backend;
use flumen_gateway::serve::{start, ServeConfig};
use flumen_kserve::server::{cost_model, Counts, TritonServer};
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

async fn stats(triton: &TritonServer) -> Counts {
    triton.counts("cost").await.expect("Triton's statistics")
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// One overload run: the cells of its column, and what goes in the RESULT line.
struct Overload {
    cells: Vec<String>,
    rss_growth_mib: f64,
    admitted_p99_ms: f64,
    rejected_pct: f64,
    ok_pct: f64,
}

/// The rows of the overload table, beside each run's cells.
const OVERLOAD_ROWS: [&str; 7] = [
    "offered",
    "admitted and answered 200",
    "admitted p50 / p99 (deadline 1,000 ms)",
    "rejected 429",
    "deadline passed (504)",
    "other statuses or errors",
    "flumen serve resident memory: start → during → end (MiB)",
];

/// Open-loop single-row requests at twice the capacity of a simulated model
/// (a = 20 ms, b = 2 ms, k = 2, N = 64: 865 rows/s) behind `flumen serve` — in its own
/// process, so its memory is measured alone — admitting `max_pending` records with a
/// 1 s deadline: the admitted must meet the deadline, the rest get 429 with
/// Retry-After, and the gateway's memory must not grow with the excess. With 300
/// admission control turns the excess away; with 10,000 (the default) more than a
/// second of work can queue, and the engine itself sheds what would miss its deadline.
async fn overload(max_pending: usize) -> Overload {
    let limit = 2.0 * 64.0 / (0.020 + 0.002 * 64.0);
    let port = flumen_kserve::server::free_port().unwrap();
    let dir = std::env::temp_dir().join(format!("flumen-bench-overload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("serve.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\nmax_pending = {max_pending}\ntimeout_ms = 1000\n\n[[models]]\nname = \"sim\"\n[models.backend]\nkind = \"sim\"\na_ms = 20.0\nb_ms = 2.0\n"),
    )
    .unwrap();
    let child = Served::start(&cfg, port).await;
    let pid = child.pid();
    let url = format!("http://127.0.0.1:{port}/v2/models/sim/infer");
    let http = reqwest::Client::new();
    let rate = 2.0 * limit;
    let duration = Duration::from_secs(6);
    let n = (rate * duration.as_secs_f64()) as u64;
    let t0 = Instant::now();
    let rss_start = rss_kib(pid);
    let mut rss = Vec::new();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        if i % (n / 6).max(1) == 0 {
            rss.push(rss_kib(pid));
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
    let (mut ok, mut rejected, mut rejected_with_wait, mut late, mut other) =
        (Vec::new(), 0u64, 0u64, 0u64, 0u64);
    for t in tasks {
        match t.await.expect("request task") {
            (200, _, l) => ok.push(l),
            (429, wait, _) => {
                rejected += 1;
                rejected_with_wait += u64::from(wait);
            }
            (504, _, _) => late += 1,
            _ => other += 1,
        }
    }
    rss.push(rss_kib(pid));
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    let admitted = Summary::of(ok.clone());
    let rejected_pct = 100.0 * rejected as f64 / n as f64;
    let cells = vec![
        format!("{n} requests at {rate:.0}/s (capacity {limit:.0}/s)"),
        format!("{} ({:.1} %)", ok.len(), 100.0 * ok.len() as f64 / n as f64),
        format!("{} / {}", ms(admitted.p50), ms(admitted.p99)),
        format!("{rejected} ({rejected_pct:.1} %), {rejected_with_wait} with Retry-After"),
        format!("{late} ({:.1} %)", 100.0 * late as f64 / n as f64),
        other.to_string(),
        std::iter::once(rss_start)
            .chain(rss.iter().copied())
            .map(|k| format!("{:.0}", k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" → "),
    ];
    let rss_growth_mib = (rss.iter().copied().max().unwrap_or(0) as f64
        - rss.get(1).copied().unwrap_or(rss_start) as f64)
        / 1024.0;
    Overload {
        cells,
        rss_growth_mib,
        admitted_p99_ms: admitted.p99.as_secs_f64() * 1e3,
        rejected_pct,
        ok_pct: 100.0 * ok.len() as f64 / n as f64,
    }
}

/// The overload runs side by side.
fn overload_table(runs: &[(&str, &Overload)]) -> String {
    let mut header = vec!["overload: 2× capacity, open loop, 6 s"];
    header.extend(runs.iter().map(|(name, _)| *name));
    let mut table = Table::new(&header);
    for (i, row) in OVERLOAD_ROWS.iter().enumerate() {
        let mut cells = vec![row.to_string()];
        cells.extend(runs.iter().map(|(_, o)| o.cells[i].clone()));
        table.row(cells);
    }
    table.render()
}

/// Backend calls and rows an engine has sent, from a gateway's `/metrics`.
async fn engine_calls(metrics_url: &str, engine: &str) -> (f64, f64) {
    let text = reqwest::get(metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("engine=\"{engine}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("flumen_batch_size_count"),
        value("flumen_batch_size_sum"),
    )
}

struct EmbeddedRun {
    direct: Measured,
    gateway: Measured,
    gateway_calls_per_row: f64,
}

/// The same callers with short review texts: (a) straight into the in-process model,
/// one call per row; (b) through the gateway's `/v1/embeddings`, one input per request.
async fn embedded() -> EmbeddedRun {
    let texts: Arc<Vec<String>> = Arc::new(
        include_str!("../../../examples/data/reviews.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["text"].as_str().map(str::to_owned))
            .collect(),
    );
    let model = Arc::new(
        flumen_embed::Embedder::load(flumen_embed::EmbedConfig::default())
            .await
            .expect("all-MiniLM-L6-v2 loads"),
    );
    let direct = {
        let (model, texts) = (Arc::clone(&model), Arc::clone(&texts));
        callers(move |i| {
            let (model, texts) = (Arc::clone(&model), Arc::clone(&texts));
            async move {
                let text = texts[i as usize % texts.len()].clone();
                matches!(model.call(&[text]).await, Ok(r) if r[0].as_ref().is_ok_and(|v| v.len() == 384))
            }
        })
        .await
    };
    drop(model);
    let config = ServeConfig::from_toml(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_pending = 100000\n\n[[models]]\nname = \"minilm\"\n[models.backend]\nkind = \"embedded\"\n",
    )
    .expect("a valid gateway configuration");
    let gateway = start(&config).await.expect("the gateway starts");
    let url = format!("http://{}/v1/embeddings", gateway.addr);
    let metrics = format!("http://{}/metrics", gateway.addr);
    let before = engine_calls(&metrics, "minilm").await;
    let http = reqwest::Client::new();
    let through = callers(move |i| {
        let (http, url, texts) = (http.clone(), url.clone(), Arc::clone(&texts));
        async move {
            let body = json!({"model": "minilm", "input": texts[i as usize % texts.len()]});
            match http.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap_or_default();
                    v["data"][0]["embedding"]
                        .as_array()
                        .is_some_and(|e| e.len() == 384)
                }
                _ => false,
            }
        }
    })
    .await;
    let after = engine_calls(&metrics, "minilm").await;
    gateway.stopper().stop();
    EmbeddedRun {
        direct,
        gateway: through,
        gateway_calls_per_row: (after.0 - before.0) / (after.1 - before.1).max(1.0),
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
    let direct_per_row = after.requests_per_row_since(before).unwrap_or(0.0);

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
            let body = json!({"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32", "data": [i as f64]}]});
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
    let gateway_per_row = after.requests_per_row_since(before).unwrap_or(0.0);

    gateway.stopper().stop();
    let emb = embedded().await;
    let (admission, queued) = (overload(300).await, overload(10_000).await);
    let overload = admission;

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
    let (ed, eg) = (rate(&emb.direct), rate(&emb.gateway));
    for (name, m, r, per_row) in [
        (
            "(c) callers → embedded all-MiniLM-L6-v2 in process, one call per row",
            &emb.direct,
            ed,
            1.0,
        ),
        (
            "(d) callers → flumen serve /v1/embeddings → embedded model",
            &emb.gateway,
            eg,
            emb.gateway_calls_per_row,
        ),
    ] {
        let s = Summary::of(m.latencies.clone());
        table.row(vec![
            name.into(),
            format!("{r:.0}/s"),
            "—".into(),
            ms(s.p50),
            ms(s.p99),
            format!("{per_row:.3}"),
            m.failed.to_string(),
            format!("{:.2}", eg / r.max(1e-9)),
        ]);
    }
    print!("{}", table.render());
    println!("\nLatency is per call, as a caller sees it. \"gateway ×\" compares with the gateway row of the same model. (c) calls the model in this process with no HTTP at all; (d) adds HTTP and JSON (384 floats per answer) and batches the rows.\n");
    print!(
        "{}",
        overload_table(&[
            ("max_pending 300", &overload),
            ("max_pending 10,000 (the default)", &queued)
        ])
    );
    println!(
        "At 2× capacity at most about half the requests can be answered. With 10,000 pending allowed more than a second of work could wait; the engine sheds (429) what would miss its deadline behind the queue and fails (504) what reaches the backend too late, so the backend only works on requests that can still make it."
    );
    println!(
        "{}",
        result_line(&[
            (
                "gateway_vs_direct_triton",
                format!("{:.2}", rg / rd.max(1e-9))
            ),
            ("backend_requests_per_row", format!("{gateway_per_row:.3}")),
            (
                "gateway_vs_direct_embedded",
                format!("{:.2}", eg / ed.max(1e-9))
            ),
            (
                "embedded_calls_per_row",
                format!("{:.3}", emb.gateway_calls_per_row)
            ),
            (
                "overload_admitted_p99_ms",
                format!("{:.0}", overload.admitted_p99_ms)
            ),
            (
                "overload_rejected_pct",
                format!("{:.1}", overload.rejected_pct)
            ),
            (
                "overload_rss_growth_mib",
                format!("{:.1}", overload.rss_growth_mib)
            ),
            (
                "overload_default_pending_ok_pct",
                format!("{:.1}", queued.ok_pct)
            ),
        ])
    );
}
