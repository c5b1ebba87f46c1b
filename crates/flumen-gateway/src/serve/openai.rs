//! The gateway's OpenAI-compatible front: `/v1/embeddings`, `/v1/chat/completions`,
//! `/v1/models` and `/v1/models/{id}`.
//!
//! Every documented request field is honoured or refused with a 400 that names it
//! (`param`), never ignored; a field the API does not have is refused the same way.
//! Embeddings: a string or a list of strings (one record each), `encoding_format`
//! `float` or `base64`, `dimensions` for a model declared `truncate_dimensions`
//! (the vector cut and renormalised, which is right only for models trained for it),
//! `user`, and `usage` counted by the backend's tokenizer. Chat: in front of an
//! OpenAI-compatible chat backend the whole request goes through (tools, tool calls,
//! `response_format`, `seed`, `logprobs`, `n`, …) and its answer comes back; in
//! front of another backend the last user message (a string, or text parts) is the
//! record, `n` makes that many, and a sampling field it cannot honour is refused.
//! `stream: true` relays an OpenAI-compatible chat backend's own stream as it comes
//! (see [`super::stream`]) when nothing must be counted per call (no budget, no
//! upstream limits, no tenant tokens-per-minute quota); otherwise, and in front of
//! another backend, it answers as server-sent events from the whole answer, with
//! `usage` in a last chunk when `stream_options.include_usage`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use flumen_core::Backend;
use serde_json::{json, Map, Value};

use super::gateway::{Model, Shared};
use super::http::{error, invalid};

/// The request fields of `POST /v1/embeddings`.
const EMBEDDING_FIELDS: [&str; 5] = ["input", "model", "encoding_format", "dimensions", "user"];

/// The request fields of `POST /v1/chat/completions`, as OpenAI documents them.
const CHAT_FIELDS: [&str; 31] = [
    "messages",
    "model",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "metadata",
    "store",
    "service_tier",
    "reasoning_effort",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
];

/// Chat fields a backend that is not an OpenAI-compatible chat model can honour.
const PLAIN_CHAT_FIELDS: [&str; 6] = ["messages", "model", "stream", "stream_options", "n", "user"];

/// [`invalid`], boxed: the error of the helpers below (a `Response` is large).
fn refuse(param: Option<&str>, message: impl Into<String>) -> Box<Response> {
    Box::new(invalid(param, message))
}

/// The request's fields, each known to the API; else the first that is not.
fn fields<'a>(body: &'a Value, known: &[&str]) -> Result<&'a Map<String, Value>, Box<Response>> {
    let Some(fields) = body.as_object() else {
        return Err(refuse(None, "the request body must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(refuse(
            Some(unknown),
            format!("Unrecognized request argument supplied: {unknown}"),
        ));
    }
    Ok(fields)
}

/// The served model named by `model`, or OpenAI's 404.
fn model<'a>(g: &'a Shared, body: &Value) -> Result<(String, &'a Model), Box<Response>> {
    let Some(name) = body["model"].as_str() else {
        return Err(refuse(Some("model"), "`model` must be a string"));
    };
    match g.model(name) {
        Some(m) => Ok((name.to_owned(), m)),
        None => Err(Box::new(not_found(name))),
    }
}

fn not_found(name: &str) -> Response {
    let body = json!({"error": {"message": format!("The model `{name}` does not exist"),
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// The tokens of a record as the model's backend counts them (the embedded model's
/// tokenizer; for an OpenAI-compatible backend, its estimate), or for a backend that
/// does not count them, the usual estimate of about four characters a token.
fn tokens(m: &Model, record: &Value) -> u64 {
    match m.engine.backend().cost(record).tokens {
        0 => match record {
            Value::String(s) => flumen_openai::estimate_tokens(s),
            other => flumen_openai::estimate_tokens(&other.to_string()),
        },
        n => n,
    }
}

pub(crate) async fn embeddings(
    State(g): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = fields(&body, &EMBEDDING_FIELDS) {
        return *r;
    }
    let (name, m) = match model(&g, &body) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let inputs: Vec<Value> = match &body["input"] {
        Value::String(s) => vec![Value::String(s.clone())],
        Value::Array(a) if a.iter().all(Value::is_string) => a.clone(),
        Value::Array(a) if a.iter().all(|x| x.is_number() || x.is_array()) => {
            return invalid(
                Some("input"),
                "token arrays are not supported: send the text",
            )
        }
        _ => {
            return invalid(
                Some("input"),
                "`input` must be a string or an array of strings",
            )
        }
    };
    let base64 = match body.get("encoding_format").map(|v| v.as_str()) {
        None | Some(Some("float")) => false,
        Some(Some("base64")) => true,
        _ => {
            return invalid(
                Some("encoding_format"),
                "`encoding_format` must be \"float\" or \"base64\"",
            )
        }
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => match d.as_u64().filter(|d| *d > 0) {
            Some(_) if !m.truncate_dimensions => {
                return invalid(
                    Some("dimensions"),
                    format!(
                        "model `{name}` does not take `dimensions`: declare `truncate_dimensions = true` \
                         for a model trained for shortened vectors"
                    ),
                )
            }
            Some(d) => Some(d as usize),
            None => {
                return invalid(
                    Some("dimensions"),
                    "`dimensions` must be a positive integer",
                )
            }
        },
    };
    if body.get("user").is_some_and(|u| !u.is_string()) {
        return invalid(Some("user"), "`user` must be a string");
    }
    let prompt_tokens: u64 = inputs.iter().map(|i| tokens(m, i)).sum();
    let vectors = match g.infer(&name, inputs, &headers, None).await {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let mut data = Vec::with_capacity(vectors.len());
    for (i, v) in vectors.into_iter().enumerate() {
        let Some(mut floats) = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
        else {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("model `{name}` does not return vectors (got {v})"),
            );
        };
        if let Some(d) = dimensions {
            if d > floats.len() {
                return invalid(
                    Some("dimensions"),
                    format!(
                        "model `{name}` makes vectors of {} dimensions: `dimensions` must not exceed that",
                        floats.len()
                    ),
                );
            }
            floats.truncate(d);
            let norm = floats.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                floats.iter_mut().for_each(|x| *x /= norm);
            }
        }
        let embedding = if base64 {
            let bytes: Vec<u8> = floats
                .iter()
                .flat_map(|x| (*x as f32).to_le_bytes())
                .collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(floats)
        };
        data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
    }
    Json(json!({"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}))
    .into_response()
}

/// The last user message's text: a string, or the text of its content parts.
fn user_text(messages: &Value) -> Result<String, Box<Response>> {
    let Some(list) = messages.as_array() else {
        return Err(refuse(Some("messages"), "`messages` must be a list"));
    };
    let Some((i, message)) = list
        .iter()
        .enumerate()
        .rev()
        .find(|(_, m)| m["role"] == "user")
    else {
        return Err(refuse(Some("messages"), "`messages` needs a user message"));
    };
    match &message["content"] {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(refuse(
                            Some(&format!("messages[{i}].content[{j}].type")),
                            format!(
                            "content parts of type {} are not supported by this model: send text",
                            kind.map_or("(none)".into(), |k| format!("`{k}`"))
                        ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(refuse(
            Some(&format!("messages[{i}].content")),
            "a user message's content must be a string or a list of text parts",
        )),
    }
}

pub(crate) async fn chat(
    State(g): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(r) = fields(&body, &CHAT_FIELDS) {
        return *r;
    }
    let (name, m) = match model(&g, &body) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return invalid(Some("stream"), "`stream` must be true or false"),
    };
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return invalid(
                Some("stream_options"),
                "`stream_options` is only allowed when `stream` is true",
            )
        }
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "include_usage") {
                return invalid(
                    Some(&format!("stream_options.{k}")),
                    format!("Unrecognized stream option: {k}"),
                );
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return invalid(
                        Some("stream_options.include_usage"),
                        "`include_usage` must be true or false",
                    )
                }
            }
        }
        Some(_) => return invalid(Some("stream_options"), "`stream_options` must be an object"),
    };
    if body
        .get("user")
        .is_some_and(|u| !u.is_null() && !u.is_string())
    {
        return invalid(Some("user"), "`user` must be a string");
    }
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64().filter(|n| (1..=128).contains(n)) {
            Some(n) => n as usize,
            None => return invalid(Some("n"), "`n` must be an integer from 1 to 128"),
        },
    };
    if n > g.max_items {
        return invalid(
            Some("n"),
            format!("`n` is {n}; this gateway answers at most {} choices per request (server.max_items)", g.max_items),
        );
    }
    if stream && m.relays_streams {
        // The backend's own stream, relayed as it comes, unless the tenant has a
        // tokens-per-minute quota (the answer's tokens are charged from the whole
        // answer, below).
        let who = match g.who_of(&headers, None) {
            Ok(who) => who,
            Err(r) => return r.into_response(),
        };
        if who.tenant.as_ref().is_none_or(|t| t.tenant.tpm.is_none()) {
            return super::stream::relay(g.clone(), name, body, who).await;
        }
    }
    // The answer's identity: the backend's where it gives one.
    let mut meta = Map::new();
    meta.insert("id".into(), json!("chatcmpl-flumen"));
    meta.insert("created".into(), json!(0));
    meta.insert("model".into(), json!(name));
    let (choices, usage) = if m.openai_chat {
        // The whole request to an OpenAI-compatible backend, and its whole answer.
        let answer = match g.infer(&name, vec![body.clone()], &headers, None).await {
            Ok(mut out) => out.pop().unwrap_or_default(),
            Err(r) => return r.into_response(),
        };
        let Some(choices) = answer["choices"].as_array().cloned() else {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("model `{name}` answered without `choices`"),
            );
        };
        let usage = match answer.get("usage") {
            Some(u) if u.is_object() => u.clone(),
            _ => {
                // The backend did not say: the usual estimate, prompt and completions.
                let prompt = flumen_openai::estimate_tokens(&body["messages"].to_string());
                let completion: u64 = choices
                    .iter()
                    .filter_map(|c| c.pointer("/message/content").and_then(Value::as_str))
                    .map(flumen_openai::estimate_tokens)
                    .sum();
                json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
            }
        };
        // The backend's own identity of the answer, where it gives one.
        for key in ["id", "created", "system_fingerprint", "service_tier"] {
            if let Some(v) = answer.get(key).filter(|v| !v.is_null()) {
                meta.insert(key.into(), v.clone());
            }
        }
        (choices, usage)
    } else {
        if let Some(field) = body
            .as_object()
            .into_iter()
            .flat_map(|f| f.keys())
            .find(|k| !PLAIN_CHAT_FIELDS.contains(&k.as_str()))
        {
            return invalid(
                Some(field),
                format!(
                    "model `{name}` is not an OpenAI-compatible chat model: `{field}` cannot be honoured"
                ),
            );
        }
        let text = match user_text(&body["messages"]) {
            Ok(t) => t,
            Err(r) => return *r,
        };
        let record = Value::String(text);
        let prompt_tokens = tokens(m, &record);
        let replies = match g.infer(&name, vec![record; n], &headers, None).await {
            Ok(out) => out,
            Err(r) => return r.into_response(),
        };
        let mut completion_tokens = 0;
        let choices = replies
            .into_iter()
            .enumerate()
            .map(|(i, reply)| {
                let content = match reply {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                completion_tokens += tokens(m, &Value::String(content.clone()));
                json!({"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"})
            })
            .collect();
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens});
        (choices, usage)
    };
    if stream {
        return sse_reply(&meta, &choices, include_usage.then_some(&usage));
    }
    let mut answer = Value::Object(meta);
    answer["object"] = json!("chat.completion");
    answer["choices"] = Value::Array(choices);
    answer["usage"] = usage;
    Json(answer).into_response()
}

/// Whole answers as an OpenAI chat stream: for each choice a chunk with its message
/// (role, content, tool calls), then one with its finish reason; with
/// `include_usage`, a last chunk with no choices and the usage; then `[DONE]`. The
/// backends answer in one piece, so each choice streams in one piece too.
fn sse_reply(meta: &Map<String, Value>, choices: &[Value], usage: Option<&Value>) -> Response {
    let chunk = |choices: Value| {
        let mut c = Value::Object(meta.clone());
        c["object"] = json!("chat.completion.chunk");
        c["choices"] = choices;
        c
    };
    let mut body = String::new();
    for (i, c) in choices.iter().enumerate() {
        let index = c["index"].as_u64().unwrap_or(i as u64);
        let mut delta = c["message"].clone();
        if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
            // In a stream each tool call carries its index.
            for (k, call) in calls.iter_mut().enumerate() {
                if let Some(call) = call.as_object_mut() {
                    call.insert("index".into(), json!(k));
                }
            }
        }
        let mut first = json!({"index": index, "delta": delta, "finish_reason": null});
        if let Some(logprobs) = c.get("logprobs").filter(|l| !l.is_null()) {
            first["logprobs"] = logprobs.clone();
        }
        let first = json!([first]);
        let last = json!([{"index": index, "delta": {}, "finish_reason": c["finish_reason"]}]);
        body.push_str(&format!(
            "data: {}\n\ndata: {}\n\n",
            chunk(first),
            chunk(last)
        ));
    }
    if let Some(usage) = usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage.clone();
        body.push_str(&format!("data: {last}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "flumen"})
}

pub(crate) async fn list_models(State(g): State<Shared>) -> Response {
    let data: Vec<Value> = g.model_names().map(model_object).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) async fn get_model(State(g): State<Shared>, Path(name): Path<String>) -> Response {
    if g.has_model(&name) {
        Json(model_object(&name)).into_response()
    } else {
        not_found(&name)
    }
}
