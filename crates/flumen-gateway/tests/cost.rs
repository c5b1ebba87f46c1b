//! Cost control through the gateway, against an OpenAI-compatible embeddings upstream
//! that counts what it embeds: two `flumen serve` replicas sharing a real Redis as
//! their result cache pay the upstream once per distinct input between them (and an
//! input repeated within one request once); a model's token budget, once spent,
//! answers 429 with a message naming the budget, and loses no request.
#![cfg(feature = "redis-cache")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use flumen_cache::server::RedisServer;
use flumen_gateway::serve::{start, ServeConfig};
use serde_json::{json, Value};

type Embedded = Arc<Mutex<HashMap<String, u32>>>;

/// Embeds each input as [its length, 1.0]; counts each input it was sent.
async fn embeddings(State(seen): State<Embedded>, Json(body): Json<Value>) -> Json<Value> {
    let inputs: Vec<String> = body["input"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut seen = seen.lock().unwrap();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            *seen.entry(text.clone()).or_default() += 1;
            json!({"object": "embedding", "index": index, "embedding": [text.len() as f32, 1.0]})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.len().div_ceil(4)).sum();
    Json(json!({"object": "list", "data": data, "model": "e",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
}

async fn upstream() -> (Embedded, String) {
    let seen: Embedded = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .with_state(Arc::clone(&seen));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (seen, url)
}

async fn embed(http: &reqwest::Client, base: &str, inputs: &[&str]) -> (u16, Value) {
    let r = http
        .post(format!("{base}/v1/embeddings"))
        .json(&json!({"model": "vec", "input": inputs}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_pay_once_per_input_and_a_spent_budget_answers_429() {
    let redis = RedisServer::start(flumen_kserve::server::free_port().unwrap()).unwrap();
    let (seen, url) = upstream().await;
    // Embeddings are deterministic: the cache is on without being asked; here in Redis.
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [[models]]\nname = \"vec\"\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{url}\"\nmodel = \"e\"\n\
         [models.cache]\nstore = \"redis\"\nurl = \"{}\"\n",
        redis.url()
    ))
    .unwrap();
    let (a, b) = (start(&config).await.unwrap(), start(&config).await.unwrap());
    let (base_a, base_b) = (format!("http://{}", a.addr), format!("http://{}", b.addr));
    let http = reqwest::Client::new();

    let texts: Vec<String> = (0..40).map(|i| format!("product {i}")).collect();
    let first: Vec<&str> = texts[..30].iter().map(String::as_str).collect();
    // Replica A: 30 distinct inputs, one of them three times in the request.
    let mut request = first.clone();
    request.extend(["product 7", "product 7"]);
    let (status, answer) = embed(&http, &base_a, &request).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"].as_array().unwrap().len(), 32);
    assert_eq!(answer["data"][31]["embedding"], json!([9.0, 1.0]));
    // Replica B: the same 30 and 10 new ones.
    let all: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (status, answer) = embed(&http, &base_b, &all).await;
    assert_eq!(status, 200, "{answer}");
    for (i, d) in answer["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            d["embedding"],
            json!([texts[i].len() as f32, 1.0]),
            "input {i}"
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 40);
    assert!(
        seen.values().all(|n| *n == 1),
        "an input reached the upstream twice: {seen:?}"
    );
    // The metrics say where the answers came from (one recorder per process: both
    // replicas' counts, of which A's hits are none — its repeat was shared in flight).
    let metrics = http
        .get(format!("{base_b}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hits = metrics
        .lines()
        .find(|l| l.starts_with("flumen_cache_lookups_total") && l.contains("result=\"hit\""))
        .unwrap_or_else(|| panic!("no cache hits metric in\n{metrics}"));
    assert!(hits.ends_with(" 30"), "{hits}");

    // A budget of 100 tokens (the upstream's inputs are about 3 tokens each here).
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [[models]]\nname = \"vec\"\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{url}\"\nmodel = \"e\"\n\
         [models.cache]\nenabled = false\n[models.budget]\ntokens = 100\nname = \"vec-test\"\n"
    ))
    .unwrap();
    let limited = start(&config).await.unwrap();
    let base = format!("http://{}", limited.addr);
    let mut answered = 0;
    let mut refused = None;
    for i in 0..200 {
        let text = format!("budgeted input {i}");
        let (status, body) = embed(&http, &base, &[&text]).await;
        match status {
            200 => answered += 1,
            429 => {
                refused = Some(body);
                break;
            }
            other => panic!("{other}: {body}"),
        }
    }
    let body = refused.expect("the budget ran out within 200 requests");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("budget `vec-test` is spent"), "{message}");
    assert!(
        answered > 5,
        "{answered} answered before the budget ran out"
    );
}
