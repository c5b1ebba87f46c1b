//! Three `flumen serve` replicas sharing an upstream limit of 600 calls a minute
//! through a real Redis, driven at three times that for 60 s: the upstream (a
//! harness that counts the calls it gets, one input each) sees no more than 600
//! (+ 2 %) in any minute. Redis is killed 20 s in and restarted 18 s later: the
//! replicas keep serving within their local share (600 / 3 each), say so in their
//! metrics, and share the limit again once Redis is back.
// Real processes, real time: the test paces its requests and reads the clock.
#![allow(clippy::disallowed_methods)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use flumen_cache::server::RedisServer;
use serde_json::{json, Value};
use tokio::time::Instant;

mod common;

use common::{free_port, Killed};

/// An OpenAI-compatible embeddings upstream that notes when each call came.
async fn upstream(calls: Arc<Mutex<Vec<Instant>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/v1/embeddings",
        post(move |Json(body): Json<Value>| {
            let calls = Arc::clone(&calls);
            async move {
                calls.lock().unwrap().push(Instant::now());
                let n = body["input"].as_array().map_or(1, Vec::len);
                let data: Vec<Value> = (0..n)
                    .map(|i| json!({"object": "embedding", "index": i, "embedding": [1.0, 0.0]}))
                    .collect();
                Json(json!({"object": "list", "data": data, "model": "e",
                            "usage": {"prompt_tokens": n, "total_tokens": n}}))
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The value of an unlabelled gauge in a Prometheus text page.
fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

async fn store_up(http: &reqwest::Client, port: u16) -> Option<f64> {
    let page = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    gauge(&page, "flumen_quota_store_up")
}

/// The most calls within any 60 s of `calls` (sorted), and how many fell in [a, b).
fn most_in_a_minute(calls: &[Instant]) -> usize {
    (0..calls.len())
        .map(|i| {
            calls[i..]
                .iter()
                .take_while(|t| **t < calls[i] + Duration::from_secs(60))
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_upstream_limit_through_redis_and_ride_out_its_outage() {
    let mut redis = RedisServer::start(free_port()).unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let url = upstream(Arc::clone(&calls)).await;
    let dir = std::env::temp_dir().join(format!("flumen-quota-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _replicas: Vec<Killed> = ports
        .iter()
        .map(|port| {
            let config = dir.join(format!("serve-{port}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
                     [quota]\nstore = \"redis\"\nurl = \"{}\"\nreplicas = 3\n\n\
                     [[models]]\nname = \"vec\"\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{url}\"\nmodel = \"e\"\n\
                     [models.engine]\nmax_batch = 1\n[models.upstream]\nrpm = 600\n",
                    redis.url()
                ),
            )
            .unwrap();
            Killed(
                Command::new(env!("CARGO_BIN_EXE_flumen"))
                    .args(["serve", config.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("flumen serve starts"),
            )
        })
        .collect();
    let http = reqwest::Client::new();
    for port in &ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http
            .get(format!("http://127.0.0.1:{port}/health/live"))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "replica {port} did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 30 requests a second, round robin over the replicas, for 60 s; each may wait
    // 2 s for the limit (then 504, or 429 when shed).
    let t0 = Instant::now();
    let answered = Arc::new(Mutex::new(Vec::<u16>::new()));
    let mut requests = Vec::new();
    let (mut killed, mut restarted, mut down_seen) = (false, false, None);
    for i in 0..1_800u64 {
        let at = t0 + Duration::from_millis(i * 1_000 / 30);
        tokio::time::sleep_until(at).await;
        let since = at - t0;
        if !killed && since >= Duration::from_secs(20) {
            redis.kill();
            killed = true;
        }
        if killed && down_seen.is_none() && since >= Duration::from_secs(30) {
            let mut states = Vec::new();
            for port in &ports {
                states.push(store_up(&http, *port).await);
            }
            down_seen = Some(states);
        }
        if !restarted && since >= Duration::from_secs(38) {
            redis.restart().unwrap();
            restarted = true;
        }
        let port = ports[(i % 3) as usize];
        let (http, answered) = (http.clone(), Arc::clone(&answered));
        requests.push(tokio::spawn(async move {
            let status = http
                .post(format!("http://127.0.0.1:{port}/v1/embeddings"))
                .header("x-request-timeout-ms", "2000")
                .json(&json!({"model": "vec", "input": [format!("text {i}")]}))
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            answered.lock().unwrap().push(status);
        }));
    }
    for r in requests {
        r.await.unwrap();
    }
    // Every replica is back on Redis.
    let mut states = Vec::new();
    for port in &ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = store_up(&http, *port).await;
            if up == Some(1.0) || Instant::now() > deadline {
                states.push(up);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut calls = calls.lock().unwrap().clone();
    calls.sort();
    let most = most_in_a_minute(&calls);
    let window = |a: u64, b: u64| {
        calls
            .iter()
            .filter(|t| **t >= t0 + Duration::from_secs(a) && **t < t0 + Duration::from_secs(b))
            .count()
    };
    let statuses = answered.lock().unwrap().clone();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    eprintln!(
        "{} calls upstream, at most {most} in a minute; {} in 0-20 s, {} in 22-38 s (Redis down), {} in 40-60 s; \
         {ok} of {} requests answered; store up while down: {down_seen:?}, after: {states:?}",
        calls.len(),
        window(0, 20),
        window(22, 38),
        window(40, 60),
        statuses.len()
    );
    assert_eq!(statuses.len(), 1_800, "every request has an answer");
    assert!(
        statuses.iter().all(|s| [200, 429, 504].contains(s)),
        "{statuses:?}"
    );
    // One upstream call per answered request; a call still in flight when its
    // request's deadline passed was answered 504.
    let late = statuses.iter().filter(|s| **s == 504).count();
    assert!(
        ok <= calls.len() && calls.len() - ok <= late,
        "{} calls for {ok} answers and {late} deadlines passed",
        calls.len()
    );
    assert!(
        most <= 612,
        "{most} calls within one minute: more than 600 + 2 %"
    );
    // Each part of the run used the limit: 10 calls a second, the outage included
    // (three local shares of 200 a minute).
    for (a, b) in [(0, 20), (22, 38), (40, 60)] {
        let n = window(a, b) as f64;
        let expected = (b - a) as f64 * 10.0;
        assert!(
            (0.8 * expected..=1.1 * expected + 5.0).contains(&n),
            "{n} calls in {a}-{b} s, {expected} expected"
        );
    }
    assert_eq!(
        down_seen,
        Some(vec![Some(0.0); 3]),
        "each replica says Redis is down"
    );
    assert_eq!(states, vec![Some(1.0); 3], "each replica is back on Redis");
    std::fs::remove_dir_all(&dir).ok();
}
