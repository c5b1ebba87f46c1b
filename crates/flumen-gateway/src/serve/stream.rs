//! `stream: true` in front of an OpenAI-compatible chat backend: the backend's
//! server-sent events relayed as they come, each event's `model` renamed to the
//! gateway's name for the model. A caller that disconnects drops the relay, which
//! drops the backend's response and closes its connection: servers that watch for
//! that (vLLM, llama.cpp's server) stop generating and free the slot.
//!
//! A stream is admitted like any request (the model's `max_pending`, the tenant's
//! rpm quota and `max_pending`), and holds its place until it ends. It goes to the
//! backend's client directly: past the batcher and the adaptive concurrency (a
//! stream is one long call that cannot be batched), within the client's own rate
//! limits (configured, and learnt from the provider's headers). Only models with
//! nothing to count per call are relayed — no `[models.budget]`, no
//! `[models.upstream]` — and only for tenants without a tokens-per-minute quota;
//! the others stream from the whole answer, which goes through the engine. The
//! caller's deadline (`x-request-timeout-ms`) does not bound a relayed stream: the
//! caller ends it by hanging up.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flumen_config::AnyBackend;
use flumen_core::{Backend, Failure};
use futures::StreamExt;
use serde_json::Value;

use super::gateway::{admits, Reason, Reject, Shared, Who};
use super::tenants::Entry;

/// A stream's places in its model's and its tenant's pending counts, given back
/// when the stream ends or its caller goes away.
struct Ticket {
    g: Shared,
    model: String,
    tenant: Option<Arc<Entry>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(m) = self.g.models.get(&self.model) {
            m.pending.fetch_sub(1, Relaxed);
        }
        if let Some(t) = &self.tenant {
            t.usage.pending.fetch_sub(1, Relaxed);
        }
    }
}

/// Relays `body`, a chat request with `stream: true`, to model `name`'s backend,
/// for `who`.
pub(crate) async fn relay(g: Shared, name: String, body: Value, who: Who) -> Response {
    match open(g, name, body, who).await {
        Ok(response) => response,
        Err(reject) => reject.into_response(),
    }
}

async fn open(g: Shared, name: String, body: Value, who: Who) -> Result<Response, Reject> {
    let model = g
        .models
        .get(&name)
        .ok_or_else(|| Reject::new(Reason::UnknownModel, format!("unknown model `{name}`")))?;
    let backend = Arc::clone(model.engine.backend());
    let AnyBackend::Chat(chat) = &*backend else {
        return Err(Reject::new(
            Reason::BadRequest,
            format!("model `{name}` cannot stream: it is not an OpenAI-compatible chat model"),
        ));
    };
    let mut ticket = Ticket {
        g: Arc::clone(&g),
        model: name.clone(),
        tenant: None,
    };
    if model.pending.fetch_add(1, Relaxed) + 1 > admits(g.max_pending, who.class) {
        return Err(Reject::new(
            Reason::Busy,
            "the model is overloaded; retry later",
        ));
    }
    if let Some(t) = &who.tenant {
        let tokens = backend
            .billed_input_tokens(&body)
            .unwrap_or_else(|| backend.cost(&body).tokens);
        g.admit_tenant(t, 1, tokens).await?.keep();
        ticket.tenant = Some(Arc::clone(t));
    }
    let response = chat
        .stream(&body)
        .await
        .map_err(|e| Reject::failed(&Failure::from_backend(e, 1)))?;
    let events = Relay {
        upstream: response.bytes_stream().boxed(),
        buffer: Vec::new(),
        name,
    };
    let stream = futures::stream::unfold((events, ticket), |(mut events, ticket)| async move {
        let chunk = events.next_event().await?;
        Some((chunk, (events, ticket)))
    });
    Ok((
        StatusCode::OK,
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

type Upstream = futures::stream::BoxStream<'static, reqwest::Result<Bytes>>;

/// The backend's events, cut at their blank lines and renamed.
struct Relay {
    upstream: Upstream,
    buffer: Vec<u8>,
    name: String,
}

impl Relay {
    /// The next whole event (or what is left when the backend ends), `None` at the
    /// end. A backend that fails mid-stream ends it with an error event.
    async fn next_event(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let event: Vec<u8> = self.buffer.drain(..end).collect();
                return Some(Ok(Bytes::from(self.renamed(&event))));
            }
            match self.upstream.next().await {
                Some(Ok(bytes)) => self.buffer.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    let error = serde_json::json!({"error": {"message": format!("the backend's stream failed: {e}"), "type": "server_error"}});
                    self.buffer.clear();
                    return Some(Ok(Bytes::from(format!("data: {error}\n\n"))));
                }
                None if self.buffer.is_empty() => return None,
                None => {
                    let rest = std::mem::take(&mut self.buffer);
                    return Some(Ok(Bytes::from(self.renamed(&rest))));
                }
            }
        }
    }

    /// `event` with the `model` of its JSON data set to the gateway's name.
    fn renamed(&self, event: &[u8]) -> Vec<u8> {
        let Ok(text) = std::str::from_utf8(event) else {
            return event.to_vec();
        };
        let mut out = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            let data = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"));
            match data.map(str::trim).map(serde_json::from_str::<Value>) {
                Some(Ok(Value::Object(mut fields))) if fields.contains_key("model") => {
                    fields.insert("model".into(), Value::String(self.name.clone()));
                    out.push_str("data: ");
                    out.push_str(&Value::Object(fields).to_string());
                    out.push('\n');
                }
                _ => out.push_str(line),
            }
        }
        out.into_bytes()
    }
}

/// Where the first event ends: after its blank line (`\n\n`, or `\r\n\r\n`).
fn find_blank_line(buffer: &[u8]) -> Option<usize> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A stream of relayed events, for tests.
#[cfg(test)]
fn relayed(parts: Vec<&'static str>, name: &str) -> impl futures::Stream<Item = String> {
    let upstream = futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p)))).boxed();
    let relay = Relay {
        upstream,
        buffer: Vec::new(),
        name: name.to_owned(),
    };
    futures::stream::unfold(relay, |mut r| async move {
        let e = r.next_event().await?.ok()?;
        Some((String::from_utf8(e.to_vec()).unwrap(), r))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_cut_at_blank_lines_and_renamed() {
        let events: Vec<String> = relayed(
            vec![
                "data: {\"model\":\"tiny\",\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\n",
                "\ndata: {\"model\":\"tiny\",\"choices\":[{\"del",
                "ta\":{\"content\":\"llo\"}}]}\n\ndata: [DONE]\n\n",
            ],
            "chat",
        )
        .collect()
        .await;
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(
            events[0],
            "data: {\"model\":\"chat\",\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\n\n"
        );
        assert!(events[1].contains("\"llo\"") && events[1].contains("\"chat\""));
        assert_eq!(events[2], "data: [DONE]\n\n");
    }

    #[test]
    fn the_first_blank_line_ends_an_event() {
        assert_eq!(find_blank_line(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(find_blank_line(b"data: a\r\n\r\nx"), Some(11));
        assert_eq!(find_blank_line(b"data: a\n"), None);
    }
}
