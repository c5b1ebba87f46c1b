//! The gateway's OpenAI-compatible front: `/v1/embeddings` (a string or a list of
//! strings, one record each), `/v1/chat/completions` (the last user message is the
//! record; `stream: true` answers as one SSE chunk, since no backend streams yet) and
//! `/v1/models`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::gateway::Shared;
use super::http::error;

pub(crate) async fn embeddings(
    State(g): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let inputs: Vec<Value> = match &body["input"] {
        Value::String(s) => vec![Value::String(s.clone())],
        Value::Array(a) if a.iter().all(Value::is_string) => a.clone(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "`input` must be a string or an array of strings",
            )
        }
    };
    match g.infer(&model, inputs, &headers).await {
        Err(r) => r.into_response(),
        Ok(vectors) => {
            if let Some(bad) = vectors
                .iter()
                .find(|v| !v.as_array().is_some_and(|a| a.iter().all(Value::is_number)))
            {
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("model `{model}` does not return vectors (got {bad})"),
                );
            }
            let data: Vec<Value> = vectors
                .into_iter()
                .enumerate()
                .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
                .collect();
            Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}})).into_response()
        }
    }
}

pub(crate) async fn chat(
    State(g): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let stream = body["stream"].as_bool() == Some(true);
    let Some(content) = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "`messages` needs a user message with string content",
        );
    };
    match g
        .infer(&model, vec![Value::String(content.to_owned())], &headers)
        .await
    {
        Err(r) => r.into_response(),
        Ok(mut out) => {
            let reply = match out.pop() {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            };
            if stream {
                return sse_reply(&model, &reply);
            }
            Json(json!({
                "id": "chatcmpl-flumen", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            }))
            .into_response()
        }
    }
}

/// A whole reply as an OpenAI chat stream: one content chunk, a final chunk, and
/// `[DONE]`. The backends answer in one piece, so the stream has one piece too.
fn sse_reply(model: &str, reply: &str) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": "chatcmpl-flumen", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        })
    };
    let body = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        chunk(json!({"role": "assistant", "content": reply}), Value::Null),
        chunk(json!({}), json!("stop"))
    );
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn list_models(State(g): State<Shared>) -> Response {
    let data: Vec<Value> = g
        .model_names()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "flumen"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}
