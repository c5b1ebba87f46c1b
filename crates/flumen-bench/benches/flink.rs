//! `cargo bench --bench flink`: the same Flink SQL job — `ML_PREDICT` over generated
//! rows with the `flumen` model provider, parallelism 2, ORDERED output (Flink's
//! default), on a Flink 2.3 local cluster in its own JVM — against a real Triton
//! server serving the cost model (a = 20 ms, b = 0.5 ms, 2 instances, max batch 64,
//! Triton's dynamic batcher on; limit ≈ 2,462 rows/s):
//!
//! (a) straight at Triton with Flink's defaults: one row per request, 10 in flight
//!     per subtask (what Flink's own Triton provider does);
//! (b) straight at Triton with the in-flight count raised to the one recommended
//!     with Flumen;
//! (c) through `flumen serve` with that setting.
//!
//! Each run kills Triton (SIGKILL) once 60 % of its rows are out and starts it again
//! on the same port: the table says what the job did. Throughput and latency come
//! from the rows before that (10 %–55 % of them, by emission time); latency from
//! the provider taking a row to its answer (the test provider `flumen-timed` stamps
//! the calls in the job's JVM), and from the source emitting it to its outcome.
//!
//! Then (d): an OpenAI-compatible embeddings endpoint that allows a fixed number of
//! requests per minute (a harness in this process that counts, answering 429 with
//! `retry-after-ms` and `Retry-After` beyond it), per row straight from Flink versus
//! through `flumen serve` (whose backend paces itself at the same limit).
#![allow(clippy::disallowed_methods)] // child processes and real time, not timing logic

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use flumen_bench::flink::job;
use flumen_bench::load::Summary;
use flumen_bench::report::{ms, result_line, Table};
use flumen_bench::served::Served;
use flumen_kserve::server::{cost_model, free_port, Counts, TritonServer};
use serde_json::{json, Value};
use tokio::time::Instant;

const PARALLELISM: usize = 2;
/// Flink's `table.exec.async-ml-predict.max-concurrent-operations`.
const FLINK_DEFAULT: usize = 10;
/// Rows in flight per subtask recommended with Flumen: enough that parallelism ×
/// this covers two full batches per model instance (2 · k · N = 256 rows here), one
/// executing and one waiting, so every execution can be full.
const RECOMMENDED: usize = 128;
/// The harness's request limit in (d).
const REQUESTS_PER_MINUTE: u32 = 600;

/// One outcome line of the job.
struct Outcome {
    id: u64,
    prediction: Option<f64>,
    failed: bool,
    /// Nanoseconds (the job JVM's clock) when the row entered `ML_PREDICT`.
    t0: i64,
    /// … and when its outcome left it.
    t1: i64,
}

/// What one run of the job did.
struct JobRun {
    /// Every outcome, by emission time.
    outcomes: Vec<Outcome>,
    /// Every provider call, `(start, end)` in the job JVM's nanoseconds.
    calls: Vec<(i64, i64)>,
    /// The job exited 0 after printing `DONE` with every row.
    finished: bool,
    /// The last lines of the job's stderr, when it failed.
    stderr_tail: String,
    /// Emission time of the last row seen before Triton was restarted.
    restarted_after: Option<i64>,
    /// Triton's counts at the start and just before the restart.
    counts: Option<(Counts, Counts)>,
}

impl JobRun {
    /// The rows between 10 % and 55 % of the run, by emission time: before the restart.
    fn window(&self) -> &[Outcome] {
        let n = self.outcomes.len();
        &self.outcomes[n / 10..(n * 55 / 100).max(n / 10)]
    }

    /// Rows per second over the window.
    fn throughput(&self) -> f64 {
        let w = self.window();
        match (w.first(), w.last()) {
            (Some(a), Some(b)) if b.t1 > a.t1 => {
                (w.len() - 1) as f64 / ((b.t1 - a.t1) as f64 / 1e9)
            }
            _ => 0.0,
        }
    }

    /// From the provider taking a row to its answer, for the calls that ended in
    /// the window.
    fn call_latency(&self) -> Summary {
        let w = self.window();
        let (Some(from), Some(to)) = (w.first().map(|o| o.t1), w.last().map(|o| o.t1)) else {
            return Summary::default();
        };
        Summary::of(
            self.calls
                .iter()
                .filter(|&&(_, end)| end >= from && end <= to)
                .map(|&(start, end)| Duration::from_nanos((end - start).max(0) as u64))
                .collect(),
        )
    }

    /// From the source emitting a row to its outcome leaving `ML_PREDICT`, over the
    /// window: includes the rows waiting in Flink's buffers before the operator.
    fn source_to_outcome(&self) -> Summary {
        Summary::of(
            self.window()
                .iter()
                .map(|o| Duration::from_nanos((o.t1 - o.t0).max(0) as u64))
                .collect(),
        )
    }

    fn failed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.failed).count()
    }

    /// The longest time without an outcome after the restart.
    fn stall(&self) -> Option<Duration> {
        let from = self.restarted_after?;
        let after: Vec<i64> = self
            .outcomes
            .iter()
            .map(|o| o.t1)
            .filter(|&t| t >= from)
            .collect();
        let gap = after.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Some(Duration::from_nanos(gap.max(0) as u64))
    }

    /// Every id in 1..=rows exactly once.
    fn every_row_once(&self, rows: u64) -> bool {
        let mut seen = vec![0u8; rows as usize + 1];
        for o in &self.outcomes {
            match seen.get_mut(o.id as usize) {
                Some(s) if o.id > 0 => *s += 1,
                _ => return false,
            }
        }
        seen[1..].iter().all(|&s| s == 1)
    }
}

/// Runs the SQL job with these `WITH`/run arguments; when `restart` is given, kills
/// and restarts that Triton once `restart_at` outcomes are out, noting its counts of
/// `model` before.
async fn run_job(
    args: Vec<String>,
    mut restart: Option<(&mut TritonServer, &str, usize)>,
    log: &Path,
) -> JobRun {
    let mut child = job("SqlJob", &args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("a log file"))
        .spawn()
        .expect("java runs: scripts/system.sh installs a JDK");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut start_counts = None;
    if let Some((triton, model, _)) = restart.as_mut() {
        start_counts = triton.counts(model).await;
    }
    let (mut outcomes, mut calls, mut done, mut restarted_after, mut counts) =
        (Vec::new(), Vec::new(), false, None, None);
    while let Some(line) = rx.recv().await {
        if line.starts_with("DONE") {
            done = true;
            continue;
        }
        if let Some(call) = line.strip_prefix("CALL ") {
            let mut t = call.split(' ').filter_map(|x| x.parse::<i64>().ok());
            if let (Some(start), Some(end)) = (t.next(), t.next()) {
                calls.push((start, end));
            }
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        outcomes.push(Outcome {
            id: v["id"].as_u64().unwrap_or(0),
            prediction: v["prediction"].as_f64(),
            failed: !v["error"].is_null(),
            t0: v["t0"].as_i64().unwrap_or(0),
            t1: v["t1"].as_i64().unwrap_or(0),
        });
        if let Some((triton, model, at)) = restart.as_mut() {
            if outcomes.len() == *at {
                let before_kill = triton.counts(model).await;
                counts = start_counts.zip(before_kill);
                restarted_after = outcomes.last().map(|o| o.t1);
                triton.restart().expect("tritonserver restarts");
            }
        }
    }
    reader.await.expect("the reader");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("the wait")
        .expect("the job's status");
    if let Some((triton, model, _)) = restart.as_mut() {
        ready(triton, model).await;
    }
    outcomes.sort_by_key(|o| o.t1);
    let stderr = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
    JobRun {
        outcomes,
        calls,
        finished: status.success() && done,
        stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        restarted_after,
        counts,
    }
}

/// Waits (bounded) until Triton answers for `model` again.
async fn ready(triton: &TritonServer, model: &str) {
    let until = Instant::now() + Duration::from_secs(120);
    while triton.counts(model).await.is_none() {
        assert!(Instant::now() < until, "Triton did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `key=value` arguments.
fn args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// (d)'s endpoint: OpenAI-compatible `/v1/embeddings` allowing `per_minute` requests
/// a minute (a token bucket refilled evenly, holding at most a second's worth), any
/// number of inputs per request, and counting what it accepted and refused.
struct Limited {
    per_second: f64,
    bucket: Mutex<(f64, Instant)>,
    accepted: AtomicU64,
    refused: AtomicU64,
    rows: AtomicU64,
}

impl Limited {
    fn new(per_minute: u32) -> Limited {
        let per_second = f64::from(per_minute) / 60.0;
        Limited {
            per_second,
            bucket: Mutex::new((per_second.max(1.0), Instant::now())),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        }
    }

    /// `None` when a request may go now; else how long until it may.
    fn admit(&self) -> Option<Duration> {
        let mut b = self.bucket.lock().expect("the bucket");
        let now = Instant::now();
        let capacity = self.per_second.max(1.0);
        b.0 = (b.0 + (now - b.1).as_secs_f64() * self.per_second).min(capacity);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - b.0) / self.per_second))
        }
    }
}

async fn limited_embeddings(State(s): State<Arc<Limited>>, Json(body): Json<Value>) -> Response {
    if let Some(wait) = s.admit() {
        s.refused.fetch_add(1, Ordering::Relaxed);
        let headers = [
            ("retry-after-ms", wait.as_millis().max(1).to_string()),
            (
                "retry-after",
                wait.as_secs_f64().ceil().max(1.0).to_string(),
            ),
        ];
        let error =
            json!({"error": {"message": "rate limit reached for requests", "type": "requests"}});
        return (StatusCode::TOO_MANY_REQUESTS, headers, Json(error)).into_response();
    }
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    s.accepted.fetch_add(1, Ordering::Relaxed);
    s.rows.fetch_add(inputs.len() as u64, Ordering::Relaxed);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.len() as f64, 1.0, 0.0, 0.5]}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
        .into_response()
}

/// `flumen serve` with `models` (TOML `[[models]]` entries), on a free port.
async fn serve(dir: &Path, models: &str) -> (Served, String) {
    let port = free_port().expect("a free port");
    let config = dir.join(format!("serve-{port}.toml"));
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n\n{models}"),
    )
    .expect("the config is written");
    (
        Served::start(&config, port).await,
        format!("http://127.0.0.1:{port}"),
    )
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flumen-bench-flink-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    dir
}

/// The cells of one Triton row of the table.
fn triton_cells(name: &str, in_flight: usize, rows: u64, run: &JobRun, base: f64) -> Vec<String> {
    let lat = run.call_latency();
    let (per_row, per_exec) = run.counts.map_or((None, None), |(a, b)| {
        (b.requests_per_row_since(a), b.rows_per_execution_since(a))
    });
    let wrong = run
        .outcomes
        .iter()
        .filter(|o| !o.failed && o.prediction != Some(2.0 * o.id as f64))
        .count();
    let restart = format!(
        "{}; {} rows failed; {} wrong; longest stall {}",
        if run.finished && run.every_row_once(rows) {
            "job finished, every row once"
        } else if run.finished {
            "job finished, ROWS MISSING"
        } else {
            "JOB FAILED"
        },
        run.failed(),
        wrong,
        run.stall()
            .map_or("—".into(), |d| format!("{:.1} s", d.as_secs_f64()))
    );
    vec![
        name.into(),
        format!("{PARALLELISM} × {in_flight}"),
        format!("{:.0}/s", run.throughput()),
        ms(lat.p50),
        ms(lat.p99),
        ms(run.source_to_outcome().p99),
        per_row.map_or("—".into(), |x| format!("{x:.3}")),
        per_exec.map_or("—".into(), |x| format!("{x:.1}")),
        restart,
        format!("{:.2}", base / run.throughput().max(1e-9)),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (a, b, k, n) = (20.0, 0.5, 2, 64);
    let limit = k as f64 * n as f64 / ((a + b * n as f64) / 1e3);
    let dir = temp_dir();
    let mut triton = TritonServer::start(&[cost_model("cost", a, b, k, n, true)])
        .expect("tritonserver starts: run `bash scripts/triton.sh` first");
    ready(&triton, "cost").await;
    println!(
        "flink benchmark: Flink 2.3 SQL job, ML_PREDICT with the flumen provider, parallelism {PARALLELISM}, ORDERED; \
         real Triton (CPU, Python backend) cost model a = {a} ms, b = {b} ms, k = {k}, max batch {n}, dynamic batcher on; \
         limit {limit:.0} rows/s\n"
    );
    // The cost model's input is `X`, straight at Triton and through the gateway,
    // which serves the model's own metadata.
    let numbers = |endpoint: &str, in_flight: usize, rows: u64, input: Option<&str>| {
        let mut a = args(&[
            ("endpoint", endpoint.to_string()),
            ("model", "cost".into()),
            ("protocol", "kserve".into()),
            ("input", "number".into()),
            ("output", "FLOAT".into()),
            ("timing", "true".into()),
            ("rows", rows.to_string()),
            ("parallelism", PARALLELISM.to_string()),
            ("max-concurrent-operations", in_flight.to_string()),
        ]);
        if let Some(name) = input {
            a.push(format!("kserve.input={name}"));
        }
        a
    };
    let url = triton.http_url();
    let (rows_a, rows_bc) = (6_000u64, 24_000u64);
    let restart_at = |rows: u64| (rows * 6 / 10) as usize;

    let run_a = run_job(
        numbers(&url, FLINK_DEFAULT, rows_a, Some("X")),
        Some((&mut triton, "cost", restart_at(rows_a))),
        &dir.join("a.log"),
    )
    .await;
    let run_b = run_job(
        numbers(&url, RECOMMENDED, rows_bc, Some("X")),
        Some((&mut triton, "cost", restart_at(rows_bc))),
        &dir.join("b.log"),
    )
    .await;
    let (gateway, endpoint) = serve(
        &dir,
        &format!(
            "[[models]]\nname = \"cost\"\n[models.backend]\nkind = \"kserve\"\nurl = \"{url}\"\nmodel = \"cost\"\n"
        ),
    )
    .await;
    let run_c = run_job(
        numbers(&endpoint, RECOMMENDED, rows_bc, Some("X")),
        Some((&mut triton, "cost", restart_at(rows_bc))),
        &dir.join("c.log"),
    )
    .await;
    drop(gateway);
    drop(triton);

    let mut table = Table::new(&[
        "path",
        "rows in flight",
        "throughput",
        "p50",
        "p99",
        "p99 source → outcome",
        "Triton requests/row",
        "rows per execution",
        "Triton killed and restarted at 60 % of the rows",
        "(c) ×",
    ]);
    let base = run_c.throughput();
    table.row(triton_cells(
        "(a) Flink → Triton, Flink's defaults",
        FLINK_DEFAULT,
        rows_a,
        &run_a,
        base,
    ));
    table.row(triton_cells(
        "(b) Flink → Triton, recommended in-flight",
        RECOMMENDED,
        rows_bc,
        &run_b,
        base,
    ));
    table.row(triton_cells(
        "(c) Flink → flumen serve → Triton, recommended in-flight",
        RECOMMENDED,
        rows_bc,
        &run_c,
        base,
    ));
    print!("{}", table.render());
    println!(
        "Rows in flight: parallelism × max-concurrent-operations. Throughput and latency over the rows between 10 % and 55 % of each run \
         by emission time (before the restart). p50 and p99: from the provider taking a row to its answer; \
         source → outcome adds the rows waiting in Flink's network buffers ahead of ML_PREDICT's operator (a backlog: the source outruns the model). \
         Runs: (a) {rows_a} rows, (b) and (c) {rows_bc} rows each."
    );
    for (name, run) in [("a", &run_a), ("b", &run_b), ("c", &run_c)] {
        if !run.finished {
            println!("({name}) failed; its stderr ends:\n{}", run.stderr_tail);
        }
    }

    // (d) A request-limited embeddings endpoint, straight and through the gateway.
    let harness = Arc::new(Limited::new(REQUESTS_PER_MINUTE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let harness_url = format!("http://{}", listener.local_addr().expect("its address"));
    let app = Router::new()
        .route("/v1/embeddings", post(limited_embeddings))
        .with_state(Arc::clone(&harness));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let texts = |endpoint: &str, in_flight: usize, rows: u64| {
        args(&[
            ("endpoint", endpoint.to_string()),
            ("model", "emb".into()),
            ("timing", "true".into()),
            ("rows", rows.to_string()),
            ("parallelism", PARALLELISM.to_string()),
            ("max-concurrent-operations", in_flight.to_string()),
        ])
    };
    let counted = |h: &Limited| {
        (
            h.accepted.load(Ordering::Relaxed),
            h.refused.load(Ordering::Relaxed),
            h.rows.load(Ordering::Relaxed),
        )
    };
    let (rows_direct, rows_gateway) = (300u64, 30_000u64);
    let before = counted(&harness);
    let direct = run_job(
        texts(&harness_url, FLINK_DEFAULT, rows_direct),
        None,
        &dir.join("d-direct.log"),
    )
    .await;
    let mid = counted(&harness);
    let (gateway, endpoint) = serve(
        &dir,
        &format!(
            "[[models]]\nname = \"emb\"\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{harness_url}/v1\"\nmodel = \"emb\"\nrequests_per_minute = {REQUESTS_PER_MINUTE}\n"
        ),
    )
    .await;
    let through = run_job(
        texts(&endpoint, RECOMMENDED, rows_gateway),
        None,
        &dir.join("d-gateway.log"),
    )
    .await;
    drop(gateway);
    let after = counted(&harness);

    // Rows per second over the whole run (first row in to last out).
    let rate = |run: &JobRun| {
        let first = run.outcomes.iter().map(|o| o.t0).min().unwrap_or(0);
        let last = run.outcomes.iter().map(|o| o.t1).max().unwrap_or(0);
        let answered = run.outcomes.iter().filter(|o| !o.failed).count();
        if last > first {
            answered as f64 / ((last - first) as f64 / 1e9)
        } else {
            0.0
        }
    };
    let (rd, rg) = (rate(&direct), rate(&through));
    let mut limited = Table::new(&[
        "path",
        "rows in flight",
        "rows",
        "rows/s",
        "requests accepted",
        "429s",
        "rows per accepted request",
        "job",
        "gateway ×",
    ]);
    for (name, in_flight, rows, run, (a0, r0, n0), (a1, r1, n1), r) in [
        (
            "(d) Flink → endpoint, one row per request",
            FLINK_DEFAULT,
            rows_direct,
            &direct,
            before,
            mid,
            rd,
        ),
        (
            "(d) Flink → flumen serve → endpoint",
            RECOMMENDED,
            rows_gateway,
            &through,
            mid,
            after,
            rg,
        ),
    ] {
        limited.row(vec![
            name.into(),
            format!("{PARALLELISM} × {in_flight}"),
            rows.to_string(),
            format!("{r:.1}"),
            (a1 - a0).to_string(),
            (r1 - r0).to_string(),
            format!("{:.1}", (n1 - n0) as f64 / (a1 - a0).max(1) as f64),
            format!(
                "{}, {} rows failed",
                if run.finished && run.every_row_once(rows) {
                    "finished, every row once"
                } else {
                    "FAILED OR ROWS MISSING"
                },
                run.failed()
            ),
            format!("{:.1}", rg / r.max(1e-9)),
        ]);
    }
    println!(
        "\nrequest-limited embeddings endpoint: {REQUESTS_PER_MINUTE} requests per minute (a token bucket, 429 with retry-after-ms beyond it), any number of inputs per request\n"
    );
    print!("{}", limited.render());
    println!("rows/s over each whole run, first row in to last row out.");
    for (name, run) in [("direct", &direct), ("gateway", &through)] {
        if !run.finished {
            println!("(d) {name} failed; its stderr ends:\n{}", run.stderr_tail);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let runs = [&run_a, &run_b, &run_c, &direct, &through];
    assert!(
        runs.iter().all(|r| r.finished),
        "a job failed (its stderr is above): no result"
    );
    let per_row = run_c
        .counts
        .and_then(|(a, b)| b.requests_per_row_since(a))
        .unwrap_or(f64::NAN);
    println!(
        "Goals: gateway ≥ 4× (a), ≥ 1.0× (b), ≤ 1/16 Triton requests per row, ≥ 20× rows/s within the request limit."
    );
    println!(
        "{}",
        result_line(&[
            (
                "flink_gateway_vs_default",
                format!("{:.2}", base / run_a.throughput().max(1e-9))
            ),
            (
                "flink_gateway_vs_tuned",
                format!("{:.2}", base / run_b.throughput().max(1e-9))
            ),
            ("flink_backend_requests_per_row", format!("{per_row:.4}")),
            (
                "flink_rpm_limited_gain",
                format!("{:.1}", rg / rd.max(1e-9))
            ),
        ])
    );
}
