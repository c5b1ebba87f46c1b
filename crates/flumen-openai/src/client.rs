//! The HTTP side shared by both endpoints: auth, headers, rate limits, and one
//! exhaustive mapping from HTTP status to Flumen's error kinds.

use flumen_core::http::send;
use flumen_core::BackendError;
use serde_json::Value;
use std::sync::Mutex;
use tokio::time::Instant;

use crate::{OpenAiConfig, RateLimits};

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
        // No header goes into an error's message: no key leaks here.
        let response = send(request, &format!("request to {endpoint}")).await?;
        response.json::<Value>().await.map_err(|e| {
            BackendError::permanent(format!("unparseable response from {endpoint}: {e}"))
        })
    }
}
