//! `cargo bench --bench llm`: 2,000 ticket records through a chat record pipeline
//! (a user template and a response schema) against a provider that enforces 60
//! requests and 10,000 tokens per window and reports both in OpenAI's
//! `x-ratelimit-*` headers (the scripted harness of `flumen_bench::llm`), in one
//! run:
//!
//! - **Flumen**: the OpenAI-compatible chat backend learning the limits from the
//!   headers (the default) — it keeps a mirror of each bucket the provider reports
//!   and waits for it;
//! - **baseline**: the same engine and backend with the headers ignored
//!   (`rate_limit_headers = false`): 429s with `retry-after-ms`, waited out and
//!   retried, with the engine's adaptive concurrency — what a client without header
//!   pacing does.
//!
//! The harness charges a request its prompt bytes / 3 plus its completion budget
//! (200), a tokenizer the client does not have (Flumen estimates bytes / 4): the
//! token limit binds, at about 40 requests a window, and the client must learn
//! what it costs from the headers.
//!
//! The window is 2 s rather than a minute (`FLUMEN_LLM_WINDOW_S` sets it; 60 is the
//! real thing, and takes about 50 minutes a run): the client derives the refill rate
//! from the reset times it is told, never from a window length, so only the time
//! the benchmark takes changes.
//!
//! Reported: 429s per 1,000 records, and utilisation — the share of what the limits
//! allowed over the run's duration (a full bucket at the start plus the refill)
//! that was used, for whichever limit binds.
//! `RESULT ratelimit_429_per_1000=… ratelimit_utilisation=…` (Flumen's; goals: a
//! handful at most, and ≥ 0.9), with the baseline's as `baseline_…`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use flumen_bench::llm::{Harness, Limits, Script};
use flumen_bench::report::{result_line, Table};
use flumen_config::{AnyBackend, BackendConfig};
use flumen_engine::{Engine, EngineConfig};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

const RECORDS: usize = 2_000;
const REQUESTS: u64 = 60;
const TOKENS: u64 = 10_000;

struct Measured {
    elapsed: Duration,
    ok: usize,
    failed: usize,
    throttled: u64,
    requests: u64,
    tokens: u64,
    window: Duration,
}

impl Measured {
    fn per_1000(&self) -> f64 {
        self.throttled as f64 * 1_000.0 / RECORDS as f64
    }

    /// The binding limit's share used: what went through over what a full bucket
    /// and the refill over the run allowed.
    fn utilisation(&self) -> f64 {
        let windows = 1.0 + self.elapsed.as_secs_f64() / self.window.as_secs_f64();
        let requests = (self.requests - self.throttled) as f64 / (REQUESTS as f64 * windows);
        let tokens = self.tokens as f64 / (TOKENS as f64 * windows);
        requests.max(tokens)
    }
}

async fn run(learn: bool, window: Duration) -> Measured {
    let harness = Harness::start(Script {
        limits: Some(Limits {
            requests: REQUESTS,
            tokens: TOKENS,
            window,
        }),
        ..Script::default()
    })
    .await;
    let config: BackendConfig = toml::from_str(&format!(
        r#"
kind = "openai-chat"
base_url = "{}"
model = "harness"
max_completion_tokens = 200
system_prompt = "You label support tickets for {{{{ product }}}}. Answer with JSON."
user_template = "Ticket {{{{ id }}}}: {{{{ subject }}}}\n{{{{ body }}}}"
response_schema = {{ type = "object", properties = {{ label = {{ enum = ["bug", "billing", "other"] }}, urgent = {{ type = "boolean" }} }}, required = ["label", "urgent"] }}
rate_limit_headers = {learn}
"#,
        harness.base_url()
    ))
    .expect("a valid backend");
    let backend = AnyBackend::build(&config).await.expect("the backend");
    let engine = Engine::new(
        backend,
        EngineConfig {
            name: if learn { "flumen" } else { "baseline" }.into(),
            ..EngineConfig::default()
        },
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3_600);
    let outcomes: Vec<bool> = futures::stream::iter(0..RECORDS)
        .map(|i| {
            let record = json!({
                "id": i,
                "product": "Flumen",
                "subject": format!("Cannot log in ({i})"),
                "body": format!("The login page fails with error {} after the update", i * 7 % 13),
            });
            let engine = engine.clone();
            async move { engine.submit(record, Some(deadline)).await.is_ok() }
        })
        .buffer_unordered(RECORDS)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let ok = outcomes.iter().filter(|o| **o).count();
    Measured {
        elapsed,
        ok,
        failed: RECORDS - ok,
        throttled: harness.seen.throttled.load(Ordering::SeqCst),
        requests: harness.seen.requests.load(Ordering::SeqCst),
        tokens: harness.seen.tokens.load(Ordering::SeqCst),
        window,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let window = Duration::from_secs_f64(
        std::env::var("FLUMEN_LLM_WINDOW_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2.0),
    );
    println!(
        "llm benchmark: {RECORDS} records, a provider enforcing {REQUESTS} requests and {TOKENS} tokens per {:.1} s window (x-ratelimit-* headers)\n",
        window.as_secs_f64()
    );
    let flumen = run(true, window).await;
    let baseline = run(false, window).await;
    let mut table = Table::new(&[
        "client",
        "ok",
        "failed",
        "requests",
        "429s",
        "429/1000",
        "seconds",
        "utilisation",
    ]);
    for (name, m) in [
        ("flumen (headers learnt)", &flumen),
        ("baseline (429 + retry-after)", &baseline),
    ] {
        table.row(vec![
            name.into(),
            m.ok.to_string(),
            m.failed.to_string(),
            m.requests.to_string(),
            m.throttled.to_string(),
            format!("{:.1}", m.per_1000()),
            format!("{:.1}", m.elapsed.as_secs_f64()),
            format!("{:.3}", m.utilisation()),
        ]);
    }
    println!("{}", table.render());
    println!(
        "{}",
        result_line(&[
            (
                "ratelimit_429_per_1000",
                format!("{:.1}", flumen.per_1000())
            ),
            (
                "ratelimit_utilisation",
                format!("{:.3}", flumen.utilisation())
            ),
            (
                "baseline_ratelimit_429_per_1000",
                format!("{:.1}", baseline.per_1000())
            ),
            (
                "baseline_ratelimit_utilisation",
                format!("{:.3}", baseline.utilisation())
            ),
        ])
    );
}
