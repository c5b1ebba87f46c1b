//! The HTTP side shared by both endpoints: auth, headers, rate limits, and one
//! exhaustive mapping from HTTP status to Flumen's error kinds.

use std::sync::Mutex;
use std::time::Duration;

use flumen_core::{BackendError, ErrorKind};
use serde_json::Value;
use tokio::time::Instant;

use crate::{OpenAiConfig, RateLimits};

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

/// The `error.message` of an OpenAI-style error body, or the body itself, cut short.
fn error_message(body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.to_owned());
    message.chars().take(300).collect()
}

pub(crate) struct Client {
    http: reqwest::Client,
    pub(crate) config: OpenAiConfig,
    limits: Mutex<RateLimits>,
}

impl Client {
    pub(crate) fn new(config: OpenAiConfig, path: &str) -> Result<Self, Vec<String>> {
        let problems = config.validate(path);
        if !problems.is_empty() {
            return Err(problems);
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| vec![format!("{path}: cannot build the HTTP client: {e}")])?;
        let limits = RateLimits::new(config.requests_per_minute, config.tokens_per_minute);
        Ok(Client {
            http,
            config,
            limits: Mutex::new(limits),
        })
    }

    async fn wait_for_limits(&self, tokens: u64) {
        loop {
            let at = match self
                .limits
                .lock()
                .expect("limits lock")
                .try_acquire(Instant::now(), tokens)
            {
                Ok(()) => return,
                Err(at) => at,
            };
            tokio::time::sleep_until(at).await;
        }
    }

    /// POSTs `body` to `endpoint`, within the rate limits, and returns the JSON answer.
    pub(crate) async fn post(
        &self,
        endpoint: &str,
        body: &Value,
        tokens: u64,
    ) -> Result<Value, BackendError> {
        self.wait_for_limits(tokens).await;
        let mut request = self.http.post(self.config.url(endpoint)).json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Transient
            };
            // reqwest's errors name the URL, never the headers: no key leaks here.
            BackendError::new(kind, format!("request to {endpoint} failed: {e}"))
        })?;
        let status = response.status();
        if !status.is_success() {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let (ra, ra_ms) = (header("retry-after"), header("retry-after-ms"));
            let body = response.text().await.unwrap_or_default();
            let kind = classify_status(status.as_u16(), &body);
            let mut error = BackendError::new(
                kind,
                format!("HTTP {}: {}", status.as_u16(), error_message(&body)),
            );
            if kind == ErrorKind::Overloaded {
                error.retry_after = parse_retry_after(ra.as_deref(), ra_ms.as_deref());
            }
            return Err(error);
        }
        response.json::<Value>().await.map_err(|e| {
            BackendError::permanent(format!("unparseable response from {endpoint}: {e}"))
        })
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

    #[test]
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(r#"{"error":{"message":"slow down"}}"#),
            "slow down"
        );
        assert_eq!(error_message(r#"{"error":"plain"}"#), "plain");
        assert_eq!(error_message("oops"), "oops");
    }
}
