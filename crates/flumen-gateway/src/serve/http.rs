//! What the HTTP fronts (OpenAI and KServe v2) share: the one mapping from a
//! rejection's reason to an HTTP status, error bodies, the bearer token and deadline
//! from HTTP headers, readiness, and the access log.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flumen_core::ErrorKind;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::gateway::{Gateway, Reason, Reject, Shared};

/// An error answer: status, and an OpenAI-style body.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (status, Json(json!({"error": {"message": message, "type": status.canonical_reason().unwrap_or("error")}}))).into_response()
}

/// The one mapping from a rejection's reason to an HTTP status.
fn status(reason: Reason) -> StatusCode {
    match reason {
        Reason::Unauthorized => StatusCode::UNAUTHORIZED,
        Reason::UnknownModel => StatusCode::NOT_FOUND,
        Reason::NoInput => StatusCode::BAD_REQUEST,
        Reason::TooManyItems => StatusCode::PAYLOAD_TOO_LARGE,
        Reason::Busy => StatusCode::TOO_MANY_REQUESTS,
        Reason::Failed(kind) => match kind {
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::InvalidInput => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Transient | ErrorKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        },
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let status = status(self.reason);
        let mut r = error(status, self.message);
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("header value"));
        }
        r
    }
}

impl Gateway {
    /// Checks the `Authorization` header.
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), Reject> {
        let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
        self.check_token(sent)
    }

    /// Runs `records` through `model`'s engine, for an HTTP caller: the token from
    /// `Authorization`, the deadline from `x-request-timeout-ms` (or the default).
    pub(crate) async fn infer(
        &self,
        name: &str,
        records: Vec<Value>,
        headers: &HeaderMap,
    ) -> Result<Vec<Value>, Reject> {
        self.authorize(headers)?;
        let timeout = headers
            .get("x-request-timeout-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        self.run(name, records, self.deadline(timeout)).await
    }
}

/// Ready when every model can take requests: its backend was reached at start (the
/// gateway listens only then) and its circuit breaker is not open. Otherwise 503,
/// naming the models that are not.
pub(crate) async fn ready(State(g): State<Shared>) -> Response {
    let open = g.open_circuits();
    if open.is_empty() {
        StatusCode::OK.into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("circuit open for: {}", open.join(", ")),
        )
    }
}

/// The access log: one JSON object per request on stderr. Only the method, the path,
/// the status and the time are written — no body, query or header, so neither
/// payloads nor tokens reach the log.
pub(crate) async fn access_log(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let line = json!({
        "ts": (ts * 1e3).round() / 1e3,
        "event": "request",
        "method": method,
        "path": path,
        "status": response.status().as_u16(),
        "ms": (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
    });
    eprintln!("{line}");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_one_status() {
        let cases = [
            (Reason::Unauthorized, StatusCode::UNAUTHORIZED),
            (Reason::UnknownModel, StatusCode::NOT_FOUND),
            (Reason::NoInput, StatusCode::BAD_REQUEST),
            (Reason::TooManyItems, StatusCode::PAYLOAD_TOO_LARGE),
            (Reason::Busy, StatusCode::TOO_MANY_REQUESTS),
            (
                Reason::Failed(ErrorKind::Overloaded),
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                Reason::Failed(ErrorKind::InvalidInput),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                Reason::Failed(ErrorKind::Timeout),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                Reason::Failed(ErrorKind::Transient),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Reason::Failed(ErrorKind::Shutdown),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Reason::Failed(ErrorKind::Permanent),
                StatusCode::BAD_GATEWAY,
            ),
        ];
        for (reason, expected) in cases {
            assert_eq!(status(reason), expected, "{reason:?}");
            // Only a 429 says when to retry.
            let r = Reject::new(reason, "x").into_response();
            assert_eq!(
                r.headers().get("retry-after").is_some(),
                expected == StatusCode::TOO_MANY_REQUESTS,
                "{reason:?}"
            );
        }
        assert!(
            ErrorKind::ALL
                .iter()
                .all(|k| cases.iter().any(|(r, _)| *r == Reason::Failed(*k))),
            "every error kind has a case"
        );
    }
}
