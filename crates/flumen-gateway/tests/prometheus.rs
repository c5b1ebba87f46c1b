//! A real Prometheus server (Debian's `prometheus`, installed by `scripts/system.sh`)
//! scrapes `flumen serve` under load, configured with the shipped
//! `deploy/prometheus.yml` (its target pointed at the test's gateway, its interval
//! made 1 s); its HTTP API then answers for the batch-size histogram (buckets), the
//! concurrency limit and the outcome counters by kind, and every query of the shipped
//! Grafana dashboard (`deploy/grafana-dashboard.json`) is valid against it.
// Waits on a child process in real time.
#![allow(clippy::disallowed_methods)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flumen_gateway::serve::{start, ServeConfig};
use serde_json::{json, Value};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The result vector of an instant query.
async fn query(http: &reqwest::Client, prometheus: &str, q: &str) -> Vec<Value> {
    let encoded: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r: Value = http
        .get(format!("{prometheus}/api/v1/query?query={encoded}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "success", "{q}: {r}");
    r["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_histograms_gauges_and_outcomes_by_kind() {
    // A model that fails a fifth of its records, not retried: outcomes of two kinds.
    let config = ServeConfig::from_toml(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 2.0\nb_ms = 0.05\nerror_rate = 0.2\n\
         [models.engine]\nmax_attempts = 1\n",
    )
    .unwrap();
    let gateway = start(&config).await.unwrap();
    let target = gateway.addr.to_string();

    let dir = std::env::temp_dir().join(format!("flumen-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus.yml"
    ))
    .unwrap();
    assert!(
        shipped.contains("127.0.0.1:8080"),
        "the shipped config scrapes flumen serve"
    );
    let yml = shipped
        .replace("127.0.0.1:8080", &target)
        .replace("scrape_interval: 5s", "scrape_interval: 1s");
    std::fs::write(dir.join("prometheus.yml"), yml).unwrap();
    let port = flumen_kserve::server::free_port().unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs: `bash scripts/system.sh` installs it"),
    );
    let prometheus = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{prometheus}/-/ready")).send().await {
            if r.status().is_success() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "prometheus did not get ready within 20 s");

    // Load: 16 callers sending rows of 1–8 for 6 s.
    let url = format!("http://{target}/v2/models/echo/infer");
    let load: Vec<_> = (0..16)
        .map(|c| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let end = tokio::time::Instant::now() + Duration::from_secs(6);
                let mut i = 0u64;
                while tokio::time::Instant::now() < end {
                    let rows = 1 + (c + i) % 8;
                    let data: Vec<f64> = (0..rows).map(|x| x as f64).collect();
                    let body = json!({"inputs": [{"name": "INPUT", "shape": [rows, 1], "datatype": "FP64", "data": data}]});
                    let _ = http.post(&url).json(&body).send().await;
                    i += 1;
                }
            })
        })
        .collect();
    for l in load {
        l.await.unwrap();
    }

    // Scraped once a second: the last scrape of the load is in within a few.
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        outcomes = query(&http, &prometheus, "flumen_outcomes_total{engine=\"echo\"}").await;
        let transient = outcomes
            .iter()
            .any(|s| s["metric"]["outcome"] == "transient");
        if transient
            && outcomes
                .iter()
                .any(|s| s["metric"]["outcome"] == "ok" && value(s) > 100.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let by_kind = |kind: &str| {
        outcomes
            .iter()
            .find(|s| s["metric"]["outcome"] == kind)
            .map_or(0.0, value)
    };
    assert!(by_kind("ok") > 100.0, "{outcomes:?}");
    assert!(by_kind("transient") > 10.0, "{outcomes:?}");

    let buckets = query(
        &http,
        &prometheus,
        "flumen_batch_size_bucket{engine=\"echo\"}",
    )
    .await;
    assert!(buckets.len() >= 5, "a histogram with buckets: {buckets:?}");
    let le = |s: &Value| s["metric"]["le"].as_str().unwrap().to_owned();
    let inf = buckets
        .iter()
        .find(|s| le(s) == "+Inf")
        .expect("a +Inf bucket");
    assert!(value(inf) > 0.0);
    // Calls carried more than one record (16 callers, one queue): the batch-size
    // distribution is not all in the first bucket.
    let one = buckets
        .iter()
        .find(|s| le(s) == "1")
        .expect("a bucket at 1");
    assert!(
        value(one) < value(inf),
        "every call carried one record: {buckets:?}"
    );
    let count = query(
        &http,
        &prometheus,
        "flumen_batch_size_count{engine=\"echo\"}",
    )
    .await;
    assert_eq!(count.len(), 1);

    let limit = query(
        &http,
        &prometheus,
        "flumen_concurrency_limit{engine=\"echo\"}",
    )
    .await;
    assert_eq!(limit.len(), 1, "{limit:?}");
    assert!(value(&limit[0]) >= 1.0);

    // The shipped Grafana dashboard: every query is valid PromQL against this server,
    // and the engine's own panels have data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    // rate() needs two samples in its window: wait for a few scrapes (the first
    // comes after a random part of the interval, and 2 cores are busy with the load).
    let mut scrapes = 0.0;
    for _ in 0..150 {
        let n = query(
            &http,
            &prometheus,
            "count_over_time(flumen_queue_depth{engine=\"echo\"}[1m])",
        )
        .await;
        scrapes = n.first().map_or(0.0, value);
        if scrapes >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(scrapes >= 3.0, "{scrapes} scrapes in 30 s");
    let mut with_data = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$engine", "echo");
            if !query(&http, &prometheus, &expr).await.is_empty() {
                with_data.push(panel["title"].as_str().unwrap().to_owned());
            }
        }
    }
    for title in [
        "Outcomes / s by kind",
        "Batch size (p50, p99, mean)",
        "Concurrency: limit and calls in flight",
        "Queue depth",
        "Backend call latency (p50, p99)",
    ] {
        assert!(
            with_data.iter().any(|t| t == title),
            "no data for {title}: {with_data:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
