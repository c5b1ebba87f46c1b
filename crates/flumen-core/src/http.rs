//! HTTP conventions shared by every HTTP backend: one exhaustive mapping from a
//! status to an [`ErrorKind`], and the `Retry-After` headers.

use std::time::Duration;

use crate::{BackendError, ErrorKind};

/// The error kind of an HTTP status (with the response body, for context errors).
///
/// 429 and 503 are overload (they shrink concurrency and are waited out, never
/// trip a breaker); 408 and 504 are timeouts; other 5xx are transient; a 400 about
/// the context length is invalid input (the record is too long); other 4xx are
/// permanent.
pub fn classify_status(status: u16, body: &str) -> ErrorKind {
    match status {
        429 | 503 => ErrorKind::Overloaded,
        408 | 504 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Transient,
        400 if body.contains("context_length_exceeded")
            || body.contains("maximum context length") =>
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
}
