//! The live status page of `flumen serve` in a real headless browser (Debian's
//! `chromium`, installed by `scripts/system.sh`), under load: its charts have
//! points (the page's own script fetched `/status.json` and drew them), and when the
//! model's backend goes down its circuit breaker shows as open on the page. The test
//! takes a screenshot under load into `target/`; with `FLUMEN_UPDATE_DOCS=1`, into
//! `docs/status-page.png`, which is where the one in the repository comes from.
// Waits on child processes in real time.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use flumen_gateway::serve::{start, ServeConfig};
use serde_json::{json, Value};

/// Doubles each instance after 5 ms; answers 500 while `down`.
async fn model(
    State(down): State<Arc<AtomicBool>>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    if down.load(Ordering::SeqCst) {
        return Err(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let xs = body["instances"].as_array().cloned().unwrap_or_default();
    let ys: Vec<Value> = xs
        .iter()
        .map(|x| json!(x.as_f64().unwrap_or(0.0) * 2.0))
        .collect();
    Ok(Json(json!({ "predictions": ys })))
}

fn chromium(args: &[&str], url: &str) -> String {
    let profile = std::env::temp_dir().join(format!("flumen-chromium-{}", std::process::id()));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=5000", "--window-size=1280,1100"])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs: `bash scripts/system.sh` installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The gateway's `/status.json`.
async fn status_json(http: &reqwest::Client, base: &str) -> Value {
    http.get(format!("{base}/status.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The value of attribute `attr` on the element with `id`, in serialized HTML.
fn attribute(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let from = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
    Some(tag[from..from + tag[from..].find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_live_series_and_shows_the_breaker_open() {
    let down = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}/predict", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/predict", post(model))
        .with_state(Arc::clone(&down));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [[models]]\nname = \"m\"\n[models.backend]\nkind = \"http\"\nurl = \"{backend}\"\n\
         template = {{ instances = \"{{{{inputs}}}}\" }}\nresult = \"/predictions\"\n\
         [models.engine]\nmax_attempts = 1\nbreaker = true\nbreaker_min_calls = 2\nbreaker_window_s = 4\nbreaker_open_ms = 60000\n"
    ))
    .unwrap();
    let gateway = start(&config).await.unwrap();
    let base = format!("http://{}", gateway.addr);

    // Load: 8 callers until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::new();
    for c in 0..8u64 {
        let (http, url, stop) = (
            http.clone(),
            format!("{base}/v2/models/m/infer"),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let rows = 1 + (c + i) % 4;
                let body = json!({"inputs": [{"name": "INPUT", "shape": [rows], "datatype": "FP64",
                                              "data": (0..rows).map(|x| x as f64).collect::<Vec<_>>()}]});
                let _ = http.post(&url).json(&body).send().await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    // A few samples (one a second) under load.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = status_json(&http, &base).await;
    let m = &status["models"][0];
    assert_eq!(m["name"], "m");
    assert!(m["t"].as_array().unwrap().len() >= 3, "{m}");
    assert!(
        m["series"]["throughput"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_f64().unwrap_or(0.0) > 0.0),
        "{m}"
    );

    let url = format!("{base}/");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&["--dump-dom"], &url)
    })
    .await
    .unwrap();
    assert_eq!(
        attribute(&dom, "breaker-m", "data-state").as_deref(),
        Some("closed"),
        "{dom}"
    );
    for chart in ["throughput", "batch", "queue", "latency", "trouble"] {
        let points: usize = attribute(&dom, &format!("chart-m-{chart}"), "data-points")
            .unwrap_or_else(|| panic!("no points on chart {chart}: {dom}"))
            .parse()
            .unwrap();
        assert!(points >= 3, "chart {chart} has {points} points");
    }
    let shot: PathBuf = if std::env::var_os("FLUMEN_UPDATE_DOCS").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/status-page.png")
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/status-page.png")
    };
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&[&arg], &url)
    })
    .await
    .unwrap();
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );

    // The backend goes down: the breaker opens, and the page says so.
    down.store(true, Ordering::SeqCst);
    // Failed calls come further and further apart (the engine pauses after a run of
    // them), and the breaker judges the calls of its last 4 s: it opens once the
    // successes have left that window.
    let mut open = false;
    for _ in 0..200 {
        let s = status_json(&http, &base).await;
        if s["models"][0]["breaker"] == "open" {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = status_json(&http, &base).await;
    assert!(
        open,
        "the breaker did not open within 40 s of the backend going down: {}",
        last["models"][0]
    );
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &url))
        .await
        .unwrap();
    assert_eq!(
        attribute(&dom, "breaker-m", "data-state").as_deref(),
        Some("open"),
        "{dom}"
    );
    stop.store(true, Ordering::SeqCst);
}
