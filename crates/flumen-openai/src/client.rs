//! The HTTP side shared by both endpoints: auth, headers, rate limits, and one
//! exhaustive mapping from HTTP status to Flumen's error kinds.

use flumen_core::http::{response_error, transport_error};
use flumen_core::BackendError;
use serde_json::Value;
use std::sync::Mutex;
use tokio::time::Instant;

use crate::{OpenAiConfig, RateLimits};

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
        // reqwest's errors name the URL, never the headers: no key leaks here.
        let response = request.send().await.map_err(|e| {
            transport_error(e.is_timeout(), format!("request to {endpoint} failed: {e}"))
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
            let message = error_message(&body);
            return Err(response_error(
                status.as_u16(),
                &body,
                &message,
                ra.as_deref(),
                ra_ms.as_deref(),
            ));
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
    fn error_messages_come_from_the_body() {
        assert_eq!(
            error_message(r#"{"error":{"message":"slow down"}}"#),
            "slow down"
        );
        assert_eq!(error_message(r#"{"error":"plain"}"#), "plain");
        assert_eq!(error_message("oops"), "oops");
    }
}
