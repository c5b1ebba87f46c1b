//! HTTP conventions shared by every HTTP backend: one exhaustive mapping from a
//! status to an [`ErrorKind`], and the `Retry-After` headers.
//!
//! With the `client` feature, the client side too: `send` sends a reqwest request
//! and turns a failure (no response, or a non-success status) into a
//! [`BackendError`]; `json_cost` is the cost of a JSON record.

use std::time::Duration;

#[cfg(feature = "client")]
use crate::ItemCost;
use crate::{BackendError, ErrorKind};

/// The error kind of an HTTP status (with the response body, for context errors).
///
/// 429 and 503 are overload (they shrink concurrency and are waited out, never
/// trip a breaker); 408 and 504 are timeouts; other 5xx are transient; a 400 about
/// the context length (the record is too long) or the provider's content policy (a
/// refusal: another provider would refuse it too) is invalid input; other 4xx are
/// permanent.
pub fn classify_status(status: u16, body: &str) -> ErrorKind {
    match status {
        429 | 503 => ErrorKind::Overloaded,
        408 | 504 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Transient,
        400 if body.contains("context_length_exceeded")
            || body.contains("maximum context length")
            || body.contains("content_policy_violation")
            || body.contains("content_filter") =>
        {
            ErrorKind::InvalidInput
        }
        _ => ErrorKind::Permanent,
    }
}

/// The wait a server asked for: OpenAI's `retry-after-ms` first, then
/// `Retry-After` in seconds. (The HTTP-date form of `Retry-After` is not used by
/// these APIs and is ignored.)
pub fn parse_retry_after(
    retry_after: Option<&str>,
    retry_after_ms: Option<&str>,
) -> Option<Duration> {
    let parse = |v: Option<&str>, scale: f64| {
        v.and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|x| x.is_finite() && *x >= 0.0)
            .map(|x| Duration::from_secs_f64(x * scale))
    };
    parse(retry_after_ms, 1e-3).or_else(|| parse(retry_after, 1.0))
}

/// The error for a response with a non-success `status`: its kind from the status
/// (and the body, for context errors), and, for overload, the wait the server asked
/// for in its `Retry-After` / `retry-after-ms` headers.
pub fn response_error(
    status: u16,
    body: &str,
    message: &str,
    retry_after: Option<&str>,
    retry_after_ms: Option<&str>,
) -> BackendError {
    let kind = classify_status(status, body);
    let mut error = BackendError::new(kind, format!("HTTP {status}: {message}"));
    if kind == ErrorKind::Overloaded {
        error.retry_after = parse_retry_after(retry_after, retry_after_ms);
    }
    error
}

/// The error for a request that got no response: a timeout, or transient.
pub fn transport_error(timed_out: bool, what: impl std::fmt::Display) -> BackendError {
    let kind = if timed_out {
        ErrorKind::Timeout
    } else {
        ErrorKind::Transient
    };
    BackendError::new(kind, what.to_string())
}

/// Sends `request` and returns its response when the status is a success.
///
/// A request that gets no response is a [`transport_error`] (a timeout, or
/// transient) whose message is `"{what} failed: {error}"`. A non-success status is
/// a [`response_error`]: its kind from the status and the body, its message the
/// body's error message (`{"error": "…"}` or `{"error": {"message": "…"}}`, else
/// the body itself; at most 300 characters), and, for overload, the wait of the
/// `retry-after-ms` or `Retry-After` header. No header goes into a message: an API
/// key in a request header never leaks into an error (reqwest's errors name the
/// URL only).
#[cfg(feature = "client")]
pub async fn send(
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<reqwest::Response, BackendError> {
    send_observed(request, what, |_, _| {}).await
}

/// [`send`], showing every response's status and headers to `observe` first,
/// whatever its status (rate-limit headers come on successes and on 429s alike).
#[cfg(feature = "client")]
pub async fn send_observed(
    request: reqwest::RequestBuilder,
    what: &str,
    observe: impl FnOnce(u16, &reqwest::header::HeaderMap),
) -> Result<reqwest::Response, BackendError> {
    let response = request
        .send()
        .await
        .map_err(|e| transport_error(e.is_timeout(), format!("{what} failed: {e}")))?;
    observe(response.status().as_u16(), response.headers());
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (retry_after, retry_after_ms) = (header("retry-after"), header("retry-after-ms"));
    let body = response.text().await.unwrap_or_default();
    Err(response_error(
        status.as_u16(),
        &body,
        &error_message(&body),
        retry_after.as_deref(),
        retry_after_ms.as_deref(),
    ))
}

/// The message of an error body: `{"error": {"message": "…"}}` (OpenAI) or
/// `{"error": "…"}` (KServe), else the body itself; at most 300 characters.
#[cfg(feature = "client")]
fn error_message(body: &str) -> String {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.to_owned());
    message.chars().take(300).collect()
}

/// The cost of a JSON record: the bytes of its compact serialization (counted,
/// not allocated), and no tokens.
#[cfg(feature = "client")]
pub fn json_cost(record: &serde_json::Value) -> ItemCost {
    /// Counts the bytes written to it.
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, record)
        .expect("a JSON value serializes, and counting never fails");
    ItemCost {
        bytes: count.0,
        tokens: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_one_kind() {
        assert_eq!(classify_status(429, ""), ErrorKind::Overloaded);
        assert_eq!(classify_status(503, ""), ErrorKind::Overloaded);
        assert_eq!(classify_status(504, ""), ErrorKind::Timeout);
        assert_eq!(classify_status(408, ""), ErrorKind::Timeout);
        assert_eq!(classify_status(500, ""), ErrorKind::Transient);
        assert_eq!(classify_status(502, ""), ErrorKind::Transient);
        assert_eq!(classify_status(401, ""), ErrorKind::Permanent);
        assert_eq!(classify_status(404, ""), ErrorKind::Permanent);
        assert_eq!(classify_status(400, "{}"), ErrorKind::Permanent);
        let ctx = r#"{"error":{"code":"context_length_exceeded"}}"#;
        assert_eq!(classify_status(400, ctx), ErrorKind::InvalidInput);
    }

    #[test]
    fn response_errors_carry_retry_after_only_for_overload() {
        let e = response_error(429, "", "slow down", Some("2"), None);
        assert_eq!(
            (e.kind, e.retry_after),
            (ErrorKind::Overloaded, Some(Duration::from_secs(2)))
        );
        assert_eq!(e.message, "HTTP 429: slow down");
        let e = response_error(500, "", "boom", Some("2"), None);
        assert_eq!((e.kind, e.retry_after), (ErrorKind::Transient, None));
        assert_eq!(transport_error(true, "late").kind, ErrorKind::Timeout);
        assert_eq!(transport_error(false, "reset").kind, ErrorKind::Transient);
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let ms = Duration::from_millis;
        assert_eq!(parse_retry_after(Some("2"), None), Some(ms(2_000)));
        assert_eq!(parse_retry_after(Some("0.5"), None), Some(ms(500)));
        assert_eq!(parse_retry_after(Some("2"), Some("150")), Some(ms(150)));
        assert_eq!(
            parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT"), None),
            None
        );
        assert_eq!(parse_retry_after(Some("-1"), None), None);
        assert_eq!(parse_retry_after(None, None), None);
    }

    #[cfg(feature = "client")]
    #[test]
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(r#"{"error":{"message":"slow down"}}"#),
            "slow down"
        );
        assert_eq!(error_message(r#"{"error":"plain"}"#), "plain");
        assert_eq!(error_message("oops"), "oops");
        assert_eq!(error_message(r#"{"detail":"x"}"#), r#"{"detail":"x"}"#);
        assert_eq!(error_message(&"é".repeat(1_000)), "é".repeat(300));
    }

    #[cfg(feature = "client")]
    #[test]
    fn json_cost_is_the_compact_length() {
        use serde_json::json;
        for v in [
            json!(null),
            json!(1.5),
            json!("héllo \"quoted\"\n"),
            json!([1, 2, {"a": [true, "x"]}]),
            json!({"text": "日本語", "n": -3}),
        ] {
            assert_eq!(
                json_cost(&v),
                ItemCost {
                    bytes: v.to_string().len() as u64,
                    tokens: 0
                },
                "{v}"
            );
        }
        assert_eq!(json_cost(&json!({"a": 1})).bytes, 7);
    }

    /// A server on a loopback port that answers each of `responses`, in order, to
    /// one connection each (raw HTTP/1.1, then closes).
    #[cfg(feature = "client")]
    fn canned(responses: Vec<String>) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for response in responses {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut buf = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                stream.write_all(response.as_bytes()).unwrap();
            }
        });
        url
    }

    #[cfg(feature = "client")]
    fn response(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[cfg(feature = "client")]
    #[tokio::test]
    async fn send_maps_every_failure_to_a_backend_error() {
        let url = canned(vec![
            response(
                "429 Too Many Requests",
                "retry-after: 3\r\nretry-after-ms: 150\r\n",
                r#"{"error":{"message":"slow down"}}"#,
            ),
            response("500 Internal Server Error", "", "boom"),
            response("200 OK", "", "{}"),
        ]);
        let http = reqwest::Client::new();
        let request = || http.get(&url).header("authorization", "Bearer sk-secret");
        let e = send(request(), "probe").await.unwrap_err();
        assert_eq!(
            (e.kind, e.retry_after, e.message.as_str()),
            (
                ErrorKind::Overloaded,
                Some(Duration::from_millis(150)),
                "HTTP 429: slow down"
            )
        );
        let e = send(request(), "probe").await.unwrap_err();
        assert_eq!(
            (e.kind, e.retry_after, e.message.as_str()),
            (ErrorKind::Transient, None, "HTTP 500: boom")
        );
        let ok = send(request(), "probe").await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "{}");
        // A port nothing listens on: no response at all.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let closed = format!("http://127.0.0.1:{port}/");
        let refused = http.get(closed).header("authorization", "Bearer sk-secret");
        let e = send(refused, "probe").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert!(e.message.starts_with("probe failed: "), "{}", e.message);
        assert!(!e.message.contains("sk-secret"), "{}", e.message);
    }
}
