//! The OpenAI backends against an HTTP server in the test harness that checks every
//! request against the documented shapes (`/v1/embeddings`, `/v1/chat/completions`)
//! and records it, so each test asserts what was sent, not only what came back.

// The harness's checks return the HTTP error response itself as their `Err`.
#![allow(clippy::result_large_err)]

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use flumen_core::ErrorKind;
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_openai::{ApiKey, Chat, Embeddings, OpenAiConfig, OverflowPolicy};
use futures::{stream, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;

const KEY: &str = "sk-test-123";

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    status: u16,
    body: Value,
}

#[derive(Default)]
struct Server {
    seen: Mutex<Vec<Seen>>,
    /// Answer this many requests with 429 first.
    reject: AtomicUsize,
}

fn bad(why: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": why, "type": "invalid_request_error"}})),
    )
        .into_response()
}

/// Checks what every request must carry; `Err` is the 4xx to answer.
fn check_common(s: &Server, headers: &HeaderMap, body: &Value) -> Result<(), Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {KEY}")) {
        let r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "Incorrect API key provided"}})),
        );
        return Err(r.into_response());
    }
    if headers.get("x-team").and_then(|v| v.to_str().ok()) != Some("flumen") {
        return Err(bad("missing custom header x-team".into()));
    }
    if !body.get("model").is_some_and(Value::is_string) {
        return Err(bad("`model` must be a string".into()));
    }
    if s.reject.load(Relaxed) > 0 {
        s.reject.fetch_sub(1, Relaxed);
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"error": {"message": "Rate limit reached"}})),
        )
            .into_response();
        r.headers_mut()
            .insert("retry-after-ms", "100".parse().unwrap());
        return Err(r);
    }
    Ok(())
}

fn record(s: &Server, status: u16, body: Value) {
    s.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        status,
        body,
    });
}

async fn embeddings(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let checked = check_common(&s, &headers, &body).and_then(|()| {
        let inputs = body["input"]
            .as_array()
            .filter(|a| (1..=2_048).contains(&a.len()))
            .ok_or_else(|| bad("`input` must be an array of 1 to 2048 items".into()))?;
        if body["encoding_format"] != "float" {
            return Err(bad("`encoding_format` must be float".into()));
        }
        let texts: Vec<&str> = inputs
            .iter()
            .map(Value::as_str)
            .collect::<Option<_>>()
            .ok_or_else(|| bad("every input must be a string".into()))?;
        // Answer in reverse order: the client must match by `index`.
        let data: Vec<Value> = texts
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.chars().count() as f32, i as f32]}))
            .collect();
        Ok(json!({"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
    });
    answer(&s, body, checked)
}

/// Records the request with the status it gets, and answers it.
fn answer(s: &Server, body: Value, checked: Result<Value, Response>) -> Response {
    match checked {
        Ok(answer) => {
            record(s, 200, body);
            Json(answer).into_response()
        }
        Err(r) => {
            record(s, r.status().as_u16(), body);
            r
        }
    }
}

async fn chat(
    State(s): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let checked = check_common(&s, &headers, &body).and_then(|()| {
        let messages = body["messages"]
            .as_array()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("`messages` must be a non-empty array".into()))?;
        let last = messages.last().unwrap();
        if last["role"] != "user" || !last["content"].is_string() {
            return Err(bad("the last message must be a user message with string content".into()));
        }
        if messages.iter().any(|m| !["system", "user", "assistant"].contains(&m["role"].as_str().unwrap_or(""))) {
            return Err(bad("unknown role".into()));
        }
        let reply = format!("echo: {}", last["content"].as_str().unwrap());
        Ok(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }))
    });
    answer(&s, body, checked)
}

/// Starts the server on a free loopback port; returns its state and base URL.
async fn serve() -> (Arc<Server>, String) {
    let state = Arc::new(Server::default());
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, format!("http://{addr}/v1"))
}

fn config(base: &str, model: &str) -> OpenAiConfig {
    let mut c = OpenAiConfig::new(base, model);
    c.api_key = Some(ApiKey::new(KEY));
    c.headers.push(("x-team".into(), "flumen".into()));
    c.request_timeout = Duration::from_secs(10);
    c
}

fn operator() -> OperatorConfig {
    OperatorConfig {
        capacity: 5_000,
        timeout: Some(Duration::from_secs(30)),
        ..OperatorConfig::default()
    }
}

#[tokio::test]
async fn embeddings_are_batched_up_to_the_api_limit_and_matched_by_index() {
    let (server, base) = serve().await;
    let backend = Embeddings::new(config(&base, "test-embed")).unwrap();
    let engine = Engine::new(backend, EngineConfig::default());
    let texts: Vec<String> = (0..5_000).map(|i| "x".repeat(1 + i % 50)).collect();
    let outcomes: Vec<_> = stream::iter(texts.clone())
        .infer(&engine, operator(), |t| Ok(t.clone()))
        .collect()
        .await;
    assert_eq!(outcomes.len(), 5_000);
    for o in &outcomes {
        let v = o.result.as_ref().unwrap();
        assert_eq!(v[0] as usize, o.record.chars().count(), "matched by index");
    }
    let seen = server.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| s.status == 200));
    let sizes: Vec<usize> = seen
        .iter()
        .map(|s| s.body["input"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 5_000, "each record sent once");
    assert!(sizes.iter().all(|n| *n <= 2_048));
    assert!(
        sizes.len() < 50,
        "batched: {} requests for 5,000 records",
        sizes.len()
    );
    assert!(seen.iter().all(|s| s.body["model"] == "test-embed"));
}

#[tokio::test]
async fn chat_sends_one_request_per_record_with_the_system_prompt() {
    let (server, base) = serve().await;
    let mut c = config(&base, "test-chat");
    c.system_prompt = Some("Classify the sentiment.".into());
    c.max_completion_tokens = Some(16);
    c.temperature = Some(0.0);
    let engine = Engine::new(Chat::new(c).unwrap(), EngineConfig::default());
    let outcomes: Vec<_> = stream::iter((0..30).map(|i| format!("review {i}")))
        .infer(&engine, operator(), |t| Ok(t.clone()))
        .collect()
        .await;
    for o in &outcomes {
        assert_eq!(
            o.result.as_deref(),
            Ok(format!("echo: {}", o.record).as_str())
        );
    }
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 30);
    for s in &seen {
        let m = s.body["messages"].as_array().unwrap();
        assert_eq!(
            m[0],
            json!({"role": "system", "content": "Classify the sentiment."})
        );
        assert_eq!(m[1]["role"], "user");
        assert_eq!(s.body["max_completion_tokens"], 16);
        assert_eq!(s.body["temperature"], 0.0);
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out_and_nothing_is_lost() {
    let (server, base) = serve().await;
    server.reject.store(3, Relaxed);
    let engine = Engine::new(
        Chat::new(config(&base, "test-chat")).unwrap(),
        EngineConfig::default(),
    );
    let outcomes: Vec<_> = stream::iter((0..10).map(|i| format!("r{i}")))
        .infer(&engine, operator(), |t| Ok(t.clone()))
        .collect()
        .await;
    assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
    let seen = server.seen.lock().unwrap().clone();
    let rejected: Vec<&Seen> = seen.iter().filter(|s| s.status == 429).collect();
    assert_eq!(rejected.len(), 3);
    assert_eq!(seen.iter().filter(|s| s.status == 200).count(), 10);
    // After each 429 the next request waited for its retry-after-ms (100 ms).
    for r in rejected {
        let next = seen
            .iter()
            .filter(|s| s.at > r.at)
            .map(|s| s.at)
            .min()
            .unwrap();
        assert!(
            next - r.at >= Duration::from_millis(100),
            "{:?}",
            next - r.at
        );
    }
}

#[tokio::test]
async fn records_over_the_context_are_skipped_or_truncated_as_configured() {
    let (server, base) = serve().await;
    let long = "y".repeat(100); // about 25 tokens
    let mut c = config(&base, "test-embed");
    c.max_context_tokens = Some(10);
    c.overflow = OverflowPolicy::Skip;
    let engine = Engine::new(Embeddings::new(c.clone()).unwrap(), EngineConfig::default());
    let outcomes: Vec<_> = stream::iter(vec!["short".to_string(), long.clone()])
        .infer(&engine, operator(), |t| Ok(t.clone()))
        .collect()
        .await;
    for o in &outcomes {
        match o.record.len() {
            5 => assert!(o.result.is_ok()),
            _ => {
                let f = o.result.as_ref().unwrap_err();
                assert_eq!((f.kind, f.attempts), (ErrorKind::InvalidInput, 1));
            }
        }
    }
    let sent: Vec<Value> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.body["input"].clone())
        .collect();
    assert_eq!(
        sent,
        vec![json!(["short"])],
        "the long record was never sent"
    );

    c.overflow = OverflowPolicy::TruncateTail;
    let engine = Engine::new(Embeddings::new(c).unwrap(), EngineConfig::default());
    let out = engine.submit(long, None).await.unwrap();
    assert_eq!(out[0], 40.0, "cut to 10 tokens × 4 characters");
}

#[tokio::test]
async fn a_wrong_key_is_a_permanent_failure_that_never_shows_the_key() {
    let (_server, base) = serve().await;
    let mut c = config(&base, "test-chat");
    c.api_key = Some(ApiKey::new("sk-wrong-secret"));
    let engine = Engine::new(Chat::new(c).unwrap(), EngineConfig::default());
    let f = engine.submit("hello".into(), None).await.unwrap_err();
    assert_eq!((f.kind, f.attempts), (ErrorKind::Permanent, 1));
    assert!(f.message.contains("HTTP 401"), "{}", f.message);
    assert!(!f.message.contains("sk-wrong-secret"));
}

#[tokio::test]
async fn a_dead_endpoint_is_a_transient_failure_after_retries() {
    // Nothing listens on this port (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = config(&format!("http://127.0.0.1:{port}/v1"), "m");
    let engine = Engine::new(
        Embeddings::new(c).unwrap(),
        EngineConfig {
            retry: flumen_engine::RetryConfig {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(10),
                ..Default::default()
            },
            ..EngineConfig::default()
        },
    );
    let f = engine.submit("hello".into(), None).await.unwrap_err();
    assert_eq!((f.kind, f.attempts), (ErrorKind::Transient, 2), "{f}");
}
