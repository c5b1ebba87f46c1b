//! The Flink integration on a real Flink 2.3 local cluster: `ML_PREDICT` with the
//! `flumen` model provider (integrations/flink, built with javac by
//! `scripts/flink.sh`), run by a Java main on Flink's own jars, against a real
//! `flumen serve` — the embedded model, a Triton server behind the gateway, and the
//! simulator for faults (429 from admission control, 503 from failing calls, the
//! gateway killed and restarted mid-run).
#![allow(clippy::disallowed_methods)] // child processes and real time, not timing logic

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use flumen_bench::flink::job;
use flumen_kserve::server::{cost_model, TritonServer};
use serde_json::Value;

mod common;
use common::{free_port, Killed};

/// Runs the SQL job to its end: its outcome lines, and its output.
fn run(args: &[String]) -> (Vec<Value>, Output) {
    run_main("SqlJob", args)
}

/// Runs a test job to its end: its outcome lines, and its output.
fn run_main(main: &str, args: &[String]) -> (Vec<Value>, Output) {
    let out = job(main, args).output().expect("java runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = outcomes(stdout.lines());
    (rows, out)
}

fn outcomes<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<Value> {
    lines
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON outcome line"))
        .collect()
}

/// `key=value` arguments.
fn args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Waits (bounded) until something listens on `port`.
fn wait_listening(port: u16) {
    for _ in 0..600 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("flumen serve did not listen on {port}");
}

/// `flumen serve` with `models` (TOML `[[models]]` entries) and `server` settings,
/// listening on `port`; its stderr (JSON logs) goes to `log` when given.
fn serve(dir: &Path, port: u16, server: &str, models: &str, log: Option<&Path>) -> Killed {
    let config = dir.join(format!("serve-{port}.toml"));
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{server}\n{models}"),
    )
    .unwrap();
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::inherit(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["--log-format", "json", "serve", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("flumen serve starts");
    wait_listening(port);
    Killed(child)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flumen-flink-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text `SqlJob` generates for row `id`.
fn text(id: u64) -> String {
    let tail = [
        "great value, arrived early",
        "the strap broke after a week",
        "works as described",
        "would not buy again",
    ][(id % 4) as usize];
    format!("review {id}: {tail}")
}

/// Every id in 1..=n exactly once, in `rows`.
fn assert_every_row_once(rows: &[Value], n: u64) {
    let mut seen = vec![0u32; n as usize + 1];
    for r in rows {
        seen[r["id"].as_u64().expect("an id") as usize] += 1;
    }
    let wrong: Vec<usize> = (1..=n as usize).filter(|&i| seen[i] != 1).collect();
    assert!(
        wrong.is_empty(),
        "ids without exactly one outcome: {wrong:?}"
    );
    assert_eq!(rows.len() as u64, n);
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a vector")
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// What `/v1/embeddings` answers for `texts`, asked directly.
fn embeddings(port: u16, texts: &[String]) -> Vec<Vec<f64>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        // Small requests: the gateway under test refuses bodies over 4 KiB.
        for chunk in texts.chunks(40) {
            let answer: Value = http
                .post(format!("http://127.0.0.1:{port}/v1/embeddings"))
                .json(&serde_json::json!({"model": "minilm", "input": chunk}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            out.extend(
                answer["data"]
                    .as_array()
                    .expect("embeddings")
                    .iter()
                    .map(|d| vector(&d["embedding"])),
            );
        }
        out
    })
}

const MINILM: &str = "[[models]]\nname = \"minilm\"\n[models.backend]\nkind = \"embedded\"\n";

/// 10,000 rows through the embedded model: every row answered once, and its vector
/// what `/v1/embeddings` answers for the same text; then the sync function and the
/// ordered mode, and rows over the gateway's size limit failing alone.
#[test]
fn ml_predict_embeds_every_row_as_the_gateway_does() {
    let dir = temp_dir("embed");
    let port = free_port();
    // Requests over 4 KiB are refused (413): the size limit the long rows exceed.
    let _gateway = serve(&dir, port, "max_body_bytes = 4096\n", MINILM, None);
    let endpoint = format!("http://127.0.0.1:{port}");
    let common = |rows: u64| {
        vec![
            ("endpoint", endpoint.clone()),
            ("model", "minilm".to_owned()),
            ("rows", rows.to_string()),
        ]
    };

    let n = 10_000;
    let mut a = common(n);
    a.push(("output-mode", "ALLOW_UNORDERED".into()));
    let (rows, out) = run(&args(&a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_every_row_once(&rows, n);
    let failed: Vec<&Value> = rows.iter().filter(|r| !r["error"].is_null()).collect();
    assert!(
        failed.is_empty(),
        "{} rows failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    // Every tenth row's vector against the gateway's own answer for its text.
    let sample: Vec<&Value> = rows
        .iter()
        .filter(|r| r["id"].as_u64().unwrap() % 10 == 0)
        .collect();
    let texts: Vec<String> = sample
        .iter()
        .map(|r| text(r["id"].as_u64().unwrap()))
        .collect();
    let direct = embeddings(port, &texts);
    for (row, want) in sample.iter().zip(&direct) {
        let got = vector(&row["prediction"]);
        assert_eq!(got.len(), 384);
        let c = cosine(&got, want);
        assert!(c >= 0.99999, "row {}: cosine {c}", row["id"]);
    }

    // The sync function ('async' = 'false'), and the ordered mode on one subtask
    // (whose input comes in id order, so its output must too).
    for (mode, value, parallelism) in [("async", "false", "2"), ("output-mode", "ORDERED", "1")] {
        let mut a = common(300);
        a.push((mode, value.to_owned()));
        a.push(("parallelism", parallelism.to_owned()));
        let (rows, out) = run(&args(&a));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_every_row_once(&rows, 300);
        assert!(rows
            .iter()
            .all(|r| r["error"].is_null() && r["prediction"].is_array()));
        if value == "ORDERED" {
            let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
        }
    }

    // Every 50th row is over the size limit: it alone gets the error column; the job
    // does not fail (the default on-error = emit).
    let mut a = common(300);
    a.push(("long-every", "50".into()));
    let (rows, out) = run(&args(&a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_every_row_once(&rows, 300);
    for r in &rows {
        let id = r["id"].as_u64().unwrap();
        if id % 50 == 0 {
            assert!(r["prediction"].is_null(), "{r}");
            let e = r["error"].as_str().unwrap_or_default();
            assert!(e.starts_with("invalid_input: HTTP 413"), "row {id}: {e}");
        } else {
            assert!(r["error"].is_null() && r["prediction"].is_array(), "{r}");
        }
    }
    // With on-error = fail, the same bad row fails the job, naming why.
    a.push(("on-error", "fail".into()));
    let (_, out) = run(&args(&a));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job should fail");
    assert!(err.contains("flumen: a row failed: invalid_input"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_misspelled_option_is_refused_by_flinks_validation() {
    let refused = |pairs: &[(&str, String)]| {
        let (_, out) = run(&args(pairs));
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&[
        ("endpoint", "http://127.0.0.1:9".into()),
        ("model", "m".into()),
        ("retry-timout", "10s".into()),
        ("rows", "1".into()),
    ]);
    assert!(
        err.contains("Unsupported options found for 'flumen'") && err.contains("retry-timout"),
        "{err}"
    );
    // A misspelled required option: Flink names the one missing.
    let err = refused(&[
        ("endpont", "http://127.0.0.1:9".into()),
        ("model", "m".into()),
        ("rows", "1".into()),
    ]);
    assert!(
        err.contains("Missing required options are:") && err.contains("\nendpoint"),
        "{err}"
    );
}

/// KServe v2 through the gateway to a real Triton server's cost model (y = 2x).
#[test]
fn ml_predict_reaches_triton_through_the_gateway() {
    let triton = TritonServer::start(&[cost_model("cost", 5.0, 0.1, 2, 64, false)])
        .expect("tritonserver starts (bash scripts/triton.sh installs it)");
    let dir = temp_dir("triton");
    let port = free_port();
    let models = format!(
        "[[models]]\nname = \"cost\"\n[models.backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"cost\"\n",
        triton.http_url()
    );
    let _gateway = serve(&dir, port, "", &models, None);
    let (rows, out) = run(&args(&[
        ("endpoint", format!("http://127.0.0.1:{port}")),
        ("model", "cost".into()),
        ("protocol", "kserve".into()),
        // The gateway serves the Triton model's own tensors: its input is `X`.
        ("kserve.input", "X".into()),
        ("input", "number".into()),
        ("output", "DOUBLE".into()),
        ("rows", "500".into()),
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_every_row_once(&rows, 500);
    for r in &rows {
        let id = r["id"].as_f64().unwrap();
        assert_eq!(r["prediction"].as_f64(), Some(2.0 * id), "{r}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

const ECHO: &str =
    "[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 2.0\nb_ms = 0.01\n";

/// The gateway answers 429 (admission control, with Retry-After) and 503 (half the
/// calls fail, no retry inside the gateway) for the whole run: the job does not fail,
/// and every row is answered.
#[test]
fn overload_and_503s_are_ridden_out_without_losing_a_row() {
    let dir = temp_dir("faults");
    let port = free_port();
    let log = dir.join("access.log");
    let models = "[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 2.0\nerror_rate = 0.5\n\
                  [models.engine]\nmax_attempts = 1\nconcurrency = 1\n";
    let gateway = serve(
        &dir,
        port,
        "max_pending = 4\nlog_requests = true\n",
        models,
        Some(&log),
    );
    let n = 200;
    let (rows, out) = run(&args(&[
        ("endpoint", format!("http://127.0.0.1:{port}")),
        ("model", "echo".into()),
        ("protocol", "openai-chat".into()),
        ("output", "STRING".into()),
        ("rows", n.to_string()),
        ("backoff.max", "200ms".into()),
    ]));
    drop(gateway);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_every_row_once(&rows, n);
    for r in &rows {
        let id = r["id"].as_u64().unwrap();
        assert_eq!(r["prediction"].as_str(), Some(text(id).as_str()), "{r}");
    }
    let statuses: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request")
        .filter_map(|v| v["fields"]["status"].as_u64())
        .collect();
    let count = |s| statuses.iter().filter(|&&x| x == s).count();
    assert!(
        count(429) > 0 && count(503) > 0,
        "429s: {}, 503s: {}",
        count(429),
        count(503)
    );
    assert_eq!(count(200), n as usize, "one answered request per row");
    std::fs::remove_dir_all(&dir).ok();
}

/// The gateway is killed mid-run and comes back 3 s later on the same port: the
/// rows in between wait for it (within retry-timeout), and every row is answered.
#[test]
fn a_gateway_restarted_mid_run_loses_no_row() {
    let dir = temp_dir("restart");
    let port = free_port();
    let gateway = serve(&dir, port, "", ECHO, None);
    let n = 3_000;
    let mut child: Child = job(
        "SqlJob",
        &args(&[
            ("endpoint", format!("http://127.0.0.1:{port}")),
            ("model", "echo".into()),
            ("protocol", "openai-chat".into()),
            ("output", "STRING".into()),
            ("rows", n.to_string()),
            ("backoff.max", "500ms".into()),
        ]),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .expect("java runs");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut gateway = Some(gateway);
    let mut restarted = None;
    for line in stdout.lines() {
        let line = line.unwrap();
        if lines.len() == 300 && gateway.is_some() {
            drop(gateway.take());
            std::thread::sleep(Duration::from_secs(3));
            restarted = Some(serve(&dir, port, "", ECHO, None));
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(restarted.is_some(), "the gateway was never restarted");
    let rows = outcomes(lines.iter().map(String::as_str));
    assert_every_row_once(&rows, n);
    for r in &rows {
        let id = r["id"].as_u64().unwrap();
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["prediction"].as_str(), Some(text(id).as_str()), "{r}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The DataStream function: every record answered once, its vector what
/// `/v1/embeddings` answers for its text; ordered (one subtask: ids in input order)
/// and unordered (two subtasks).
#[test]
fn the_datastream_function_answers_every_record_ordered_and_unordered() {
    let dir = temp_dir("stream");
    let port = free_port();
    let _gateway = serve(&dir, port, "", MINILM, None);
    let n = 400;
    let texts: Vec<String> = (1..=n).map(text).collect();
    let direct = embeddings(port, &texts);
    for (ordered, parallelism) in [(true, 1), (false, 2)] {
        let (rows, out) = run_main(
            "StreamJob",
            &args(&[
                ("endpoint", format!("http://127.0.0.1:{port}")),
                ("model", "minilm".into()),
                ("rows", n.to_string()),
                ("ordered", ordered.to_string()),
                ("parallelism", parallelism.to_string()),
            ]),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_every_row_once(&rows, n);
        let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        if ordered {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
        }
        for r in &rows {
            let id = r["id"].as_u64().unwrap();
            assert!(r["error"].is_null(), "{r}");
            let c = cosine(&vector(&r["prediction"]), &direct[id as usize - 1]);
            assert!(c >= 0.99999, "record {id}: cosine {c}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
