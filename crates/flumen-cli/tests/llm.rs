//! LLM record pipelines through `flumen run`: prompts rendered from records with a
//! Jinja template, answers validated against a JSON Schema with one repair, usage,
//! and a fallback chain by error class — against a real OpenAI-compatible server
//! (llama.cpp's `llama-server` with a tiny random-weight model, `scripts/llama.sh`)
//! and, for what it will not do on demand (invalid JSON a tenth of the time, 429s, an
//! outage, refusals), the scripted harness of `flumen_bench::llm`.
#![allow(clippy::disallowed_methods)] // real time: child processes and servers

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;

use common::llama::Llama;
use flumen_bench::llm::{Harness, Script};
use serde_json::{json, Value};

/// The ticket schema every answer must match.
const SCHEMA: &str = r#"{ type = "object", properties = { label = { enum = ["bug", "billing", "other"] }, urgent = { type = "boolean" } }, required = ["label", "urgent"], additionalProperties = false }"#;

/// `n` tickets; those in `missing_subject` lack the field the template needs, and
/// those in `refused` carry text the harness refuses.
fn tickets(dir: &Path, n: usize, missing_subject: &[usize], refused: &[usize]) -> String {
    let path = dir.join("in.jsonl");
    let mut text = String::new();
    for i in 0..n {
        let mut r = json!({
            "id": i,
            "product": "Flumen",
            "subject": format!("Cannot log in ({i})"),
            "body": format!("The login page fails with error {}", i * 7 % 13),
        });
        if missing_subject.contains(&i) {
            r.as_object_mut().unwrap().remove("subject");
        }
        if refused.contains(&i) {
            r["body"] = json!("REFUSE this one");
        }
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A pipeline file: the ticket template and schema against `base_url`, then `more`.
fn pipeline(dir: &Path, base_url: &str, backend_more: &str, more: &str) -> std::path::PathBuf {
    let input = dir.join("in.jsonl");
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[source]
kind = "file"
path = "{input}"

[sink]
kind = "file"
path = "{out}"

[dead_letter]
kind = "file"
path = "{dead}"

[mapping]
output = "merge"

[backend]
kind = "openai-chat"
base_url = "{base_url}"
model = "tiny"
temperature = 0.0
max_completion_tokens = 200
system_prompt = "You label {{{{ product }}}} support tickets. Answer with JSON."
user_template = "Ticket {{{{ id }}}}: {{{{ subject }}}}\n{{{{ body }}}}"
response_schema = {SCHEMA}
{backend_more}
{more}
"#,
            input = input.display(),
            out = dir.join("out.jsonl").display(),
            dead = dir.join("dead.jsonl").display(),
        ),
    )
    .unwrap();
    path
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs the pipeline: (outputs, dead letters, stderr).
async fn run(config: &Path) -> (Vec<Value>, Vec<Value>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", config.to_str().unwrap()])
        .env(
            "RUST_LOG",
            std::env::var("FLUMEN_TEST_LOG").unwrap_or_default(),
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "flumen run failed: {stderr}");
    let dir = config.parent().unwrap();
    (
        lines(&dir.join("out.jsonl")),
        lines(&dir.join("dead.jsonl")),
        stderr,
    )
}

/// Every id in 0..n exactly once, among the outputs and the dead letters.
fn one_outcome_each(n: usize, out: &[Value], dead: &[Value]) {
    let mut seen = HashMap::new();
    for id in out
        .iter()
        .map(|v| &v["id"])
        .chain(dead.iter().map(|d| &d["record"]["id"]))
    {
        *seen.entry(id.as_u64().expect("an id")).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), n, "a record has no outcome");
    assert!(seen.values().all(|&c| c == 1), "a record has two outcomes");
}

/// A valid ticket answer, merged into the record.
fn is_valid(v: &Value) -> bool {
    ["bug", "billing", "other"].contains(&v["label"].as_str().unwrap_or(""))
        && v["urgent"].is_boolean()
}

/// The repairs the run's summary reports.
fn repairs_in(stderr: &str) -> u64 {
    let at = stderr
        .find(" repairs, ")
        .expect("the summary counts repairs");
    let start = stderr[..at].rfind(' ').unwrap() + 1;
    stderr[start..at].parse().unwrap()
}

/// Record deadlines for the real server: 1,000 records share 2 cores with it.
const PATIENT: &str = "[operator]\ntimeout_ms = 600000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_and_a_schema_against_a_real_llm_server() {
    let llama = Llama::start(4).await;
    // 1,000 tickets. The server constrains its output with the schema
    // (response_format): every answer parses and validates; the one record the
    // template cannot render fails alone, naming the field, without a request.
    let dir = tempfile::tempdir().unwrap();
    tickets(dir.path(), 1_000, &[500], &[]);
    let config = pipeline(dir.path(), &llama.base_url, "", PATIENT);
    let (out, dead, stderr) = run(&config).await;
    one_outcome_each(1_000, &out, &dead);
    assert_eq!(out.len(), 999, "{stderr}\n{:?}", dead.first());
    for v in &out {
        assert!(is_valid(v), "{v}");
        let usage = &v["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 20, "{usage}");
        assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{usage}");
        assert_eq!(usage["provider"], "backend");
        assert_eq!(usage["model"], "tiny");
        assert!(
            v.get("prediction").is_none(),
            "merged, not under a field: {v}"
        );
    }
    assert_eq!(dead[0]["record"]["id"], 500);
    assert_eq!(dead[0]["error"]["kind"], "invalid_input");
    let message = dead[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("`subject` is undefined"), "{message}");
    assert_eq!(repairs_in(&stderr), 0, "{stderr}");

    // Without the schema as response_format, the random-weight model writes
    // gibberish: no answer validates, each gets its one repair, then fails with
    // the validator's message.
    let dir = tempfile::tempdir().unwrap();
    tickets(dir.path(), 40, &[], &[]);
    let config = pipeline(dir.path(), &llama.base_url, "send_schema = false", PATIENT);
    let (out, dead, stderr) = run(&config).await;
    one_outcome_each(40, &out, &dead);
    assert!(out.is_empty(), "{out:?}");
    for d in &dead {
        assert_eq!(d["error"]["kind"], "invalid_output", "{d}");
        let message = d["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("the reply does not match the response schema after 1 repair: "),
            "{message}"
        );
    }
    assert!(stderr.contains("40 repairs, 0 of them valid"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenth_of_answers_invalid_every_record_is_validated_or_invalid_output() {
    let harness = Harness::start(Script {
        seed: 7,
        invalid_rate: 0.1,
        repair_fixes: 0.5,
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    tickets(dir.path(), 1_000, &[], &[]);
    let config = pipeline(dir.path(), &harness.base_url(), "", "");
    let (out, dead, stderr) = run(&config).await;
    one_outcome_each(1_000, &out, &dead);
    let repaired_valid = out.iter().filter(|v| v["usage"]["repairs"] == 1).count() as u64;
    for v in &out {
        assert!(is_valid(v), "{v}");
    }
    for d in &dead {
        assert_eq!(d["error"]["kind"], "invalid_output", "{d}");
        let message = d["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("the reply is not JSON") || message.contains("is not one of"),
            "the validator's message: {message}"
        );
    }
    let repairs = harness.seen.repairs.load(Ordering::SeqCst);
    assert!((60..=140).contains(&repairs), "about a tenth: {repairs}");
    assert_eq!(repairs_in(&stderr), repairs, "{stderr}");
    assert_eq!(dead.len() as u64 + repaired_valid, repairs);
    assert!(
        stderr.contains(&format!(
            "{repairs} repairs, {repaired_valid} of them valid"
        )),
        "{stderr}"
    );
    assert_eq!(
        harness.seen.requests.load(Ordering::SeqCst),
        1_000 + repairs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_and_an_outage_move_records_to_the_fallback_bad_records_do_not() {
    // The primary answers its first 15 requests with 429, then serves, then goes
    // down after 60 requests. Both providers refuse the same content.
    let primary = Harness::start(Script {
        overloaded_first: 15,
        down_after: Some(60),
        refuse: Some("REFUSE".into()),
        ..Script::default()
    })
    .await;
    let secondary = Harness::start(Script {
        refuse: Some("REFUSE".into()),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let refused = [3, 150];
    tickets(dir.path(), 200, &[30], &refused);
    let config = pipeline(
        dir.path(),
        &primary.base_url(),
        "",
        &format!(
            r#"
[engine]
max_attempts = 3

[[fallback]]
kind = "openai-chat"
base_url = "{}"
model = "tiny"
max_completion_tokens = 200
user_template = "Ticket {{{{ id }}}}: {{{{ subject }}}}\n{{{{ body }}}}"
response_schema = {SCHEMA}
"#,
            secondary.base_url()
        ),
    );
    let (out, dead, stderr) = run(&config).await;
    one_outcome_each(200, &out, &dead);
    assert_eq!(out.len(), 197, "{stderr}\n{dead:?}");
    let by = |provider: &str| {
        out.iter()
            .filter(|v| v["usage"]["provider"] == provider)
            .count()
    };
    assert!(by("backend") > 0 && by("fallback[0]") > 0, "{stderr}");
    assert_eq!(by("backend") + by("fallback[0]"), 197);
    assert!(primary.seen.throttled.load(Ordering::SeqCst) >= 15);
    // Each answer came from one provider only: no record was answered twice, and
    // the secondary answered exactly the records it is named on.
    let answered = |h: &Harness| h.seen.answered.lock().unwrap().clone();
    let (first, second) = (answered(&primary), answered(&secondary));
    let all: Vec<&String> = first.iter().chain(&second).collect();
    let distinct: HashSet<&String> = all.iter().copied().collect();
    assert_eq!(all.len(), distinct.len(), "a record was answered twice");
    let refusals = all.iter().filter(|u| u.contains("REFUSE")).count();
    assert_eq!(
        refusals,
        refused.len(),
        "a refused record went on to the fallback"
    );
    assert_eq!(
        second.len() - second.iter().filter(|u| u.contains("REFUSE")).count(),
        by("fallback[0]")
    );
    // The record the template cannot render never reached a provider.
    assert!(all.iter().all(|u| !u.starts_with("Ticket 30:")));
    let kinds: Vec<(u64, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["record"]["id"].as_u64().unwrap(),
                d["error"]["kind"].as_str().unwrap(),
            )
        })
        .collect();
    for (id, kind) in &kinds {
        assert!([3, 30, 150].contains(id), "{kinds:?}");
        assert_eq!(*kind, "invalid_input", "{kinds:?}");
    }
}

/// The official `openai` client streams through `flumen serve` from the real
/// server, then hangs up mid-stream.
const STREAM_CLIENT: &str = r#"
import json, sys, time, urllib.request
import openai

gateway, llama = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0)
never_end = {"2": -100, "4": -100}  # the model's end tokens, banned

def slot():
    with urllib.request.urlopen(llama + "/slots") as r:
        return json.load(r)[0]

# A whole stream: token by token, usage last.
stream = client.chat.completions.create(
    model="chat", messages=[{"role": "user", "content": "Tell me a story."}],
    stream=True, max_tokens=40, logit_bias=never_end,
    stream_options={"include_usage": True})
chunks = list(stream)
texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
usage = [c.usage.completion_tokens for c in chunks if c.usage]

# A long stream, left after three chunks.
long = client.chat.completions.create(
    model="chat", messages=[{"role": "user", "content": "Go on forever."}],
    stream=True, max_tokens=6000, logit_bias=never_end)
seen = [next(long) for _ in range(3)]
was_busy = slot()["is_processing"]
long.close()
for _ in range(300):
    s = slot()
    if not s["is_processing"]:
        break
    time.sleep(0.1)
decoded = s["next_token"]["n_decoded"]
# The only slot is free: the next request is answered.
after = client.chat.completions.create(
    model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5, logit_bias=never_end)
print(json.dumps({
    "chunks": len(chunks), "texts": len(texts), "models": sorted({c.model for c in chunks}),
    "finish": finish, "usage": usage, "was_busy": was_busy, "busy_after": s["is_processing"],
    "decoded": decoded, "after": after.usage.completion_tokens,
}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_streams_through_the_gateway_and_a_hang_up_frees_the_slot() {
    // One slot, and answers as long as asked: a stream left running would hold
    // the slot for its 6,000 tokens.
    let llama = Llama::start_with(1, 8000).await;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[[models]]\nname = \"chat\"\n[models.backend]\nkind = \"openai-chat\"\nbase_url = \"{}\"\nmodel = \"tiny\"\n",
            llama.base_url
        ),
    )
    .unwrap();
    let _gateway = common::serve(&config, port);
    let out = common::succeeded(
        tokio::process::Command::new("python3")
            .args(["-c", STREAM_CLIENT])
            .arg(format!("http://127.0.0.1:{port}/v1"))
            .arg(&llama.root)
            .env("PYTHONPATH", flumen_kserve::server::python_clients())
            .output()
            .await,
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Token by token: many content chunks before the last, named for the gateway's
    // model, the finish reason once, the usage at the end.
    assert!(r["texts"].as_u64().unwrap() > 1, "{r}");
    assert_eq!(r["models"], json!(["chat"]), "{r}");
    assert_eq!(r["finish"], json!(["length"]), "{r}");
    assert_eq!(r["usage"], json!([40]), "{r}");
    // The hang-up stopped the generation far short of its 6,000 tokens, and the
    // only slot answered the next request.
    assert_eq!(r["was_busy"], true, "{r}");
    assert_eq!(r["busy_after"], false, "{r}");
    assert!(r["decoded"].as_u64().unwrap() < 3_000, "{r}");
    assert_eq!(r["after"], 5, "{r}");
}

#[test]
fn bad_pipeline_settings_are_refused_at_start_each_named() {
    let dir = tempfile::tempdir().unwrap();
    tickets(dir.path(), 1, &[], &[]);
    // A template that does not parse, a schema that is not one, and a fallback
    // that would answer the same records another way.
    let config = pipeline(
        dir.path(),
        "http://127.0.0.1:9/v1",
        "",
        "[[fallback]]\nkind = \"openai-chat\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"plain\"\n",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("Ticket {{ id }}", "Ticket {{ id ")
        .replace("type = \"object\", properties", "type = 5, properties");
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", config.to_str().unwrap()])
        .output()
        .unwrap();
    common::names_every_problem(
        &out,
        &[
            "backend.user_template",
            "backend.response_schema: not a valid JSON Schema",
            "fallback[0]: every stage must answer records the same way",
        ],
    );
}
