//! The OpenAI front with two official clients — the `openai` Python package and the
//! `openai` npm package under Node — for every request parameter it honours or
//! refuses: `encoding_format` (both SDKs ask for base64 by default and decode it),
//! `dimensions` on a model declared `truncate_dimensions` and refused elsewhere,
//! unknown fields refused by name, `GET /v1/models/{id}`, `n`, content parts,
//! usage, `stream_options.include_usage`, and — in front of an OpenAI-compatible chat
//! backend — tools, tool calls (plain and streamed), `response_format`, `seed`,
//! `logprobs` and `n` passed through, streams relayed as the backend sends them. The backend here is a small OpenAI-compatible
//! harness in this test that records what it receives: it scripts answers (a tool
//! call) that no model here can give; the protocol under test is the gateway's, as
//! the real clients speak it.

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flumen_gateway::serve::{start, ServeConfig};
use flumen_kserve::server::python_clients;
use serde_json::{json, Value};

/// What the harness received on `/v1/chat/completions`, in order.
type Seen = Arc<Mutex<Vec<Value>>>;

/// 8 numbers from a text: its length, vowels, spaces, then constants.
async fn embeddings(Json(body): Json<Value>) -> Json<Value> {
    let texts: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = t.chars().count() as f64;
            let vowels = t.chars().filter(|c| "aeiou".contains(*c)).count() as f64;
            let spaces = t.matches(' ').count() as f64;
            json!({"object": "embedding", "index": i,
                   "embedding": [n, vowels, spaces, 1.0, 0.5, 0.25, 0.125, 2.0]})
        })
        .collect();
    Json(
        json!({"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}),
    )
}

/// A tool call for the first tool when there are tools; else text that shows the
/// seed, the response format and the user message, `n` times. With `stream: true`,
/// the same as server-sent events, as OpenAI streams them.
async fn chat(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    seen.lock().unwrap().push(body.clone());
    let user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let n = body["n"].as_u64().unwrap_or(1);
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            if let Some(tool) = body.pointer("/tools/0/function/name") {
                json!({"index": i, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
                       "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": tool, "arguments": "{\"city\": \"Paris\"}"}}]}})
            } else {
                let content = format!(
                    "seed={} format={} {user}",
                    body["seed"],
                    body.pointer("/response_format/type").and_then(Value::as_str).unwrap_or("text")
                );
                let mut c = json!({"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": content}});
                if body["logprobs"] == json!(true) {
                    c["logprobs"] = json!({"content": [{"token": "seed", "logprob": -0.5, "bytes": null, "top_logprobs": []}]});
                }
                c
            }
        })
        .collect();
    let answer = json!({"id": "chatcmpl-harness", "object": "chat.completion", "created": 1, "model": body["model"],
                        "choices": choices, "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}});
    if body["stream"] != json!(true) {
        return Json(answer).into_response();
    }
    let chunk = |choice: Value| {
        json!({"id": "chatcmpl-harness", "object": "chat.completion.chunk", "created": 1,
               "model": body["model"], "choices": [choice]})
    };
    let mut events = String::new();
    for c in choices {
        let mut delta = c["message"].clone();
        if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
            for (k, call) in calls.iter_mut().enumerate() {
                call["index"] = json!(k);
            }
        }
        let mut first = json!({"index": c["index"], "delta": delta, "finish_reason": null});
        if let Some(l) = c.get("logprobs") {
            first["logprobs"] = l.clone();
        }
        let last = json!({"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]});
        events.push_str(&format!(
            "data: {}\n\ndata: {}\n\n",
            chunk(first),
            chunk(last)
        ));
    }
    events.push_str("data: [DONE]\n\n");
    ([("content-type", "text/event-stream")], events).into_response()
}

const PYTHON: &str = r#"
import sys, json, base64, struct, math, urllib.request
import openai
from openai import OpenAI

base, harness = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

def refused(call, param, status=400):
    try:
        call()
    except openai.APIStatusError as e:
        assert e.status_code == status and e.param == param, (e.status_code, e.param, e.body)
        return e
    raise SystemExit(f"accepted, but should be refused: {param}")

texts = ["hello world", "naive cafe"]
# The SDK asks for base64 unless told otherwise, and decodes it: the same vectors.
default = c.embeddings.create(model="vec", input=texts)
floats = c.embeddings.create(model="vec", input=texts, encoding_format="float")
assert [e.embedding for e in default.data] == [e.embedding for e in floats.data], (default, floats)
assert floats.data[0].embedding == [11.0, 3.0, 1.0, 1.0, 0.5, 0.25, 0.125, 2.0], floats.data[0]
assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
b64 = c.embeddings.create(model="vec", input=texts, encoding_format="base64")
assert list(struct.unpack("<8f", base64.b64decode(b64.data[1].embedding))) == floats.data[1].embedding

short = c.embeddings.create(model="vec_short", input=texts, dimensions=4, encoding_format="float")
v = short.data[0].embedding
head = floats.data[0].embedding[:4]
norm = math.sqrt(sum(x * x for x in head))
assert len(v) == 4 and all(abs(a - x / norm) < 1e-6 for a, x in zip(v, head)), v
refused(lambda: c.embeddings.create(model="vec", input=texts, dimensions=4), "dimensions")
refused(lambda: c.embeddings.create(model="vec_short", input=texts, dimensions=99), "dimensions")
refused(lambda: c.embeddings.create(model="vec", input=texts, extra_body={"bogus": 1}), "bogus")
refused(lambda: c.embeddings.create(model="vec", input=[[1, 2, 3]]), "input")
refused(lambda: c.embeddings.create(model="vec", input="x", encoding_format="int8"), "encoding_format")
e = refused(lambda: c.embeddings.create(model="nope", input="x"), "model", 404)
assert e.code == "model_not_found", e.body

assert c.models.retrieve("echo").id == "echo"
assert c.models.retrieve("echo").object == "model"
refused(lambda: c.models.retrieve("nope"), "model", 404)

r = c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi there"}], n=2)
assert [ch.message.content for ch in r.choices] == ["hi there", "hi there"], r
assert [ch.index for ch in r.choices] == [0, 1]
u = r.usage
assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u
r = c.chat.completions.create(model="echo", messages=[
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
assert r.choices[0].message.content == "ab", r
refused(lambda: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": [
    {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
    "messages[0].content[1].type")
refused(lambda: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], temperature=0.2), "temperature")
refused(lambda: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], extra_body={"bogus": True}), "bogus")
refused(lambda: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], n=0), "n")
refused(lambda: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], stream=True,
                                          stream_options={"include_usage": "yes"}), "stream_options.include_usage")
refused(lambda: c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}],
                                          stream_options={"include_usage": True}), "stream_options")
chunks = list(c.chat.completions.create(model="echo", messages=[{"role": "user", "content": "streamed"}],
                                        stream=True, stream_options={"include_usage": True}))
assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "streamed", chunks
assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0, chunks[-1]

tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
r = c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "weather in Paris?"}],
                              tools=tools, tool_choice="auto", seed=7, logprobs=True, top_logprobs=2)
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}, r
assert r.choices[0].finish_reason == "tool_calls" and r.usage.total_tokens == 10, r
r = c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "json please"}],
                              response_format={"type": "json_object"}, seed=3, n=2, temperature=0.1)
assert len(r.choices) == 2 and r.choices[1].message.content == "seed=3 format=json_object json please", r
assert r.id == "chatcmpl-harness" and r.created == 1, r  # the backend's own identity of the answer
chunks = list(c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "why"}],
                                        logprobs=True, stream=True))
assert any(ch.choices and ch.choices[0].logprobs for ch in chunks), chunks
chunks = list(c.chat.completions.create(model="llm", messages=[{"role": "user", "content": "weather?"}],
                                        tools=tools, stream=True))
calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
assert calls and calls[0].function.name == "get_weather" and calls[0].index == 0, chunks
assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"

seen = json.load(urllib.request.urlopen(harness + "/seen"))
assert seen[0]["model"] == "upstream-llm" and seen[0]["tools"] == tools and seen[0]["tool_choice"] == "auto", seen[0]
assert seen[0]["seed"] == 7 and seen[0]["logprobs"] is True and seen[0]["top_logprobs"] == 2, seen[0]
assert seen[1]["response_format"] == {"type": "json_object"} and seen[1]["n"] == 2 and seen[1]["temperature"] == 0.1, seen[1]
# The streamed requests went on as streams, relayed as the harness sent them.
assert [s.get("stream") for s in seen] == [None, None, True, True], seen
assert all(ch.model == "llm" for ch in chunks), chunks
print("OPENAI PARAMS OK")
"#;

const NODE: &str = r#"
const { OpenAI } = require("openai");
(async () => {
  const c = new OpenAI({ baseURL: process.argv[2] + "/v1", apiKey: "unused", maxRetries: 0 });
  const texts = ["hello world", "naive cafe"];
  const byDefault = await c.embeddings.create({ model: "vec", input: texts });
  const floats = await c.embeddings.create({ model: "vec", input: texts, encoding_format: "float" });
  const a = JSON.stringify(byDefault.data.map((e) => e.embedding));
  const b = JSON.stringify(floats.data.map((e) => e.embedding));
  if (a !== b || floats.data[0].embedding.length !== 8) throw new Error(`embeddings differ: ${a} vs ${b}`);
  const r = await c.chat.completions.create({ model: "echo", messages: [{ role: "user", content: "from node" }] });
  if (r.choices[0].message.content !== "from node") throw new Error(JSON.stringify(r));
  if ((await c.models.retrieve("echo")).id !== "echo") throw new Error("models.retrieve");
  try {
    await c.embeddings.create({ model: "vec", input: "x", dimensions: 3 });
    throw new Error("dimensions accepted");
  } catch (e) {
    if (!(e instanceof OpenAI.BadRequestError) || e.param !== "dimensions") throw e;
  }
  const stream = await c.chat.completions.create({
    model: "echo", messages: [{ role: "user", content: "streamed" }], stream: true,
    stream_options: { include_usage: true },
  });
  let text = "", usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) text += chunk.choices[0].delta.content || "";
    if (chunk.usage) usage = chunk.usage;
  }
  if (text !== "streamed" || !usage) throw new Error(`stream: ${text} ${JSON.stringify(usage)}`);
  console.log("NODE OPENAI OK");
})().catch((e) => { console.error(e); process.exit(1); });
"#;

fn run(cmd: &mut Command, ok: &str) {
    let out = cmd.output().expect("the client runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains(ok),
        "stdout: {stdout}\nstderr: {stderr}"
    );
}

/// Where `scripts/nodeclients.sh` installed the npm `openai` package.
fn node_clients() -> std::path::PathBuf {
    let deps = std::env::var_os("FLUMEN_DEPS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps"));
    let dir = deps.join("node");
    assert!(
        dir.join("node_modules/openai").is_dir(),
        "the openai npm package is not installed: run `bash scripts/nodeclients.sh` (scripts/test.sh does)"
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_clients_get_every_parameter_honoured_or_refused_by_name() {
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let harness = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat))
        .route(
            "/seen",
            get(|State(seen): State<Seen>| async move {
                Json(Value::from(seen.lock().unwrap().clone()))
            }),
        )
        .with_state(Arc::clone(&seen));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n\n\
         [[models]]\nname = \"vec\"\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{harness}/v1\"\nmodel = \"e\"\n\n\
         [[models]]\nname = \"vec_short\"\ntruncate_dimensions = true\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{harness}/v1\"\nmodel = \"e\"\n\n\
         [[models]]\nname = \"llm\"\n[models.backend]\nkind = \"openai-chat\"\nbase_url = \"{harness}/v1\"\nmodel = \"upstream-llm\"\n"
    ))
    .unwrap();
    let gateway = start(&config).await.unwrap();
    let base = format!("http://{}", gateway.addr);
    let dir = std::env::temp_dir().join(format!("flumen-openai-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (py, node) = (python_clients(), node_clients());
    std::fs::write(dir.join("client.py"), PYTHON).unwrap();
    std::fs::write(dir.join("client.js"), NODE).unwrap();

    let (script, b, h) = (dir.join("client.py"), base.clone(), harness.clone());
    tokio::task::spawn_blocking(move || {
        run(
            Command::new("python3")
                .arg(script)
                .args([&b, &h])
                .env("PYTHONPATH", py),
            "OPENAI PARAMS OK",
        )
    })
    .await
    .unwrap();
    let script = dir.join("client.js");
    tokio::task::spawn_blocking(move || {
        run(
            Command::new("node")
                .arg(script)
                .arg(&base)
                .env("NODE_PATH", node.join("node_modules")),
            "NODE OPENAI OK",
        )
    })
    .await
    .unwrap();
    gateway.stopper().stop();
    std::fs::remove_dir_all(&dir).ok();
}
