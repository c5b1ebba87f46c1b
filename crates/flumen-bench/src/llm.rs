//! A scripted OpenAI-compatible chat server, for what a real LLM server will not do
//! on demand: answers that are not valid JSON a set share of the time, rate limits
//! enforced and reported in `x-ratelimit-*` headers, content refusals, a run of
//! 429s, an outage. The LLM tests use a real server (llama.cpp's) for everything
//! else.
//!
//! Its answers are for a ticket-classification schema: `{"label": "bug" | "billing"
//! | "other", "urgent": bool}`. Whether an answer is bad is decided by a seeded hash
//! of the request's messages, so it does not depend on the order requests arrive in.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The provider's limits, as it enforces them: buckets of `requests` and `tokens`
/// that refill fully over `window` (a minute for OpenAI; shorter to make a
/// benchmark quicker — a client that reads the reset times cannot tell).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per window.
    pub requests: u64,
    /// Tokens per window: a request's prompt bytes / 3 (a tokenizer the client does
    /// not have) plus its completion budget.
    pub tokens: u64,
    /// The window.
    pub window: Duration,
}

/// What the harness does.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Seed of the bad-answer hash.
    pub seed: u64,
    /// Share of first answers that are bad (half not JSON, half not matching).
    pub invalid_rate: f64,
    /// Share of repair requests answered validly.
    pub repair_fixes: f64,
    /// Enforced and reported limits.
    pub limits: Option<Limits>,
    /// A user message containing this is refused (`message.refusal`).
    pub refuse: Option<String>,
    /// The first this many requests get 429 (`retry-after-ms: 20`).
    pub overloaded_first: u64,
    /// After this many requests the server goes down: it stops listening, and
    /// answers what still comes on open connections with 503, closing them.
    pub down_after: Option<u64>,
}

/// Counts of what the harness saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests received.
    pub requests: AtomicU64,
    /// Answered 429.
    pub throttled: AtomicU64,
    /// Tokens charged to the limits, for the requests let through.
    pub tokens: AtomicU64,
    /// Repair requests (with an assistant message in them).
    pub repairs: AtomicU64,
    /// The user message of every request answered 200, in order.
    pub answered: Mutex<Vec<String>>,
}

struct Buckets {
    limits: Limits,
    requests: f64,
    tokens: f64,
    last: Instant,
}

impl Buckets {
    fn refill(&mut self, now: Instant) {
        let share = now.duration_since(self.last).as_secs_f64() / self.limits.window.as_secs_f64();
        self.requests =
            (self.requests + share * self.limits.requests as f64).min(self.limits.requests as f64);
        self.tokens =
            (self.tokens + share * self.limits.tokens as f64).min(self.limits.tokens as f64);
        self.last = now;
    }

    /// Until the bucket holding `level` of `limit` is full again.
    fn reset(&self, level: f64, limit: u64) -> String {
        let missing = (limit as f64 - level).max(0.0) / limit as f64;
        format!("{:.3}s", missing * self.limits.window.as_secs_f64())
    }

    fn headers(&self, h: &mut HeaderMap) {
        let l = self.limits;
        let mut set = |name: &'static str, v: String| {
            h.insert(name, HeaderValue::from_str(&v).expect("ascii"));
        };
        set("x-ratelimit-limit-requests", l.requests.to_string());
        set(
            "x-ratelimit-remaining-requests",
            (self.requests.max(0.0).floor() as u64).to_string(),
        );
        set(
            "x-ratelimit-reset-requests",
            self.reset(self.requests, l.requests),
        );
        set("x-ratelimit-limit-tokens", l.tokens.to_string());
        set(
            "x-ratelimit-remaining-tokens",
            (self.tokens.max(0.0).floor() as u64).to_string(),
        );
        set(
            "x-ratelimit-reset-tokens",
            self.reset(self.tokens, l.tokens),
        );
    }
}

struct Shared {
    script: Script,
    seen: Arc<Seen>,
    buckets: Option<Mutex<Buckets>>,
    down: Notify,
}

/// A running harness; it stops when dropped.
pub struct Harness {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// Starts a harness on a port of the system's choosing.
    pub async fn start(script: Script) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the harness");
        let addr = listener.local_addr().expect("address");
        let seen = Arc::new(Seen::default());
        let shared = Arc::new(Shared {
            buckets: script.limits.map(|limits| {
                Mutex::new(Buckets {
                    limits,
                    requests: limits.requests as f64,
                    tokens: limits.tokens as f64,
                    last: Instant::now(),
                })
            }),
            script,
            seen: Arc::clone(&seen),
            down: Notify::new(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(Arc::clone(&shared));
        // Going down drops the listener at once: new connections are refused. A
        // connection already open gets 503 with `connection: close`.
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                _ = shared.down.notified() => {}
            }
        });
        Harness { addr, seen, task }
    }

    /// The API root to configure a backend with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A seeded hash of `parts`, uniform in [0, 1).
fn unit(seed: u64, parts: &impl Hash) -> f64 {
    let mut h = DefaultHasher::new();
    (seed, parts).hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

async fn chat(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    let n = s.seen.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if s.script.down_after.is_some_and(|d| n > d) {
        s.down.notify_one();
        let close = [("connection", "close")];
        return (StatusCode::SERVICE_UNAVAILABLE, close, "going down").into_response();
    }
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let user = messages
        .iter()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let mut headers = HeaderMap::new();
    if let Some(buckets) = &s.buckets {
        let mut b = buckets.lock().expect("buckets");
        b.refill(Instant::now());
        let budget = body["max_completion_tokens"]
            .as_u64()
            .or_else(|| body["max_tokens"].as_u64())
            .unwrap_or(0);
        let cost = (body["messages"].to_string().len() as f64 / 3.0).ceil() + budget as f64;
        let allowed = b.requests >= 1.0 && b.tokens >= cost;
        if allowed {
            b.requests -= 1.0;
            b.tokens -= cost;
            s.seen.tokens.fetch_add(cost as u64, Ordering::SeqCst);
        }
        b.headers(&mut headers);
        if !allowed {
            s.seen.throttled.fetch_add(1, Ordering::SeqCst);
            let wait = if b.requests < 1.0 {
                (1.0 - b.requests) / b.limits.requests as f64
            } else {
                (cost - b.tokens) / b.limits.tokens as f64
            } * b.limits.window.as_secs_f64();
            headers.insert(
                "retry-after-ms",
                HeaderValue::from_str(&format!("{}", (wait * 1e3).ceil() as u64)).expect("ascii"),
            );
            let error = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
            return (StatusCode::TOO_MANY_REQUESTS, headers, Json(error)).into_response();
        }
    }
    if n <= s.script.overloaded_first {
        s.seen.throttled.fetch_add(1, Ordering::SeqCst);
        headers.insert("retry-after-ms", HeaderValue::from_static("20"));
        let error =
            json!({"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}});
        return (StatusCode::TOO_MANY_REQUESTS, headers, Json(error)).into_response();
    }
    let repair = messages.iter().any(|m| m["role"] == "assistant");
    if repair {
        s.seen.repairs.fetch_add(1, Ordering::SeqCst);
    }
    let mut message = json!({"role": "assistant", "content": null});
    if s.script
        .refuse
        .as_ref()
        .is_some_and(|r| user.contains(r.as_str()))
    {
        message["refusal"] = json!("I can't help with that.");
    } else {
        let bad = match repair {
            false => unit(s.script.seed, &user) < s.script.invalid_rate,
            true => unit(s.script.seed ^ 1, &user) >= s.script.repair_fixes,
        };
        let urgent = unit(s.script.seed ^ 2, &user) < 0.3;
        let content = match (bad, unit(s.script.seed ^ 3, &(&user, repair)) < 0.5) {
            (false, _) => json!({"label": "bug", "urgent": urgent}).to_string(),
            (true, true) => "{\"label\": \"bug\", \"urgent\": ".to_owned(),
            (true, false) => json!({"label": "spam", "urgent": urgent}).to_string(),
        };
        message["content"] = json!(content);
    }
    s.seen.answered.lock().expect("answered").push(user);
    let prompt = body["messages"].to_string().len() as u64 / 4;
    let answer = json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "model": "harness",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": 9, "total_tokens": prompt + 9},
    });
    (StatusCode::OK, headers, Json(answer)).into_response()
}
