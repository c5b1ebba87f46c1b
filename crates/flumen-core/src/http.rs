//! HTTP conventions shared by every HTTP backend: one exhaustive mapping from a
//! status to an [`ErrorKind`], and the `Retry-After` headers.

use std::time::Duration;

use crate::ErrorKind;

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
