//! The HTTP side shared by both endpoints: auth, headers, rate limits, and one
//! exhaustive mapping from HTTP status to Flumen's error kinds.

use flumen_core::http::send_observed;
use flumen_core::BackendError;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::time::Instant;

use crate::limits::Seen;
use crate::{OpenAiConfig, RateLimits};

pub(crate) struct Client {
    http: reqwest::Client,
    /// For responses read as streams: timeouts on connecting and on each read only.
    streaming: reqwest::Client,
    pub(crate) config: OpenAiConfig,
    limits: Mutex<RateLimits>,
    in_flight: Outstanding,
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
        let streaming = reqwest::Client::builder()
            .connect_timeout(config.request_timeout)
            .read_timeout(config.request_timeout)
            .build()
            .map_err(|e| vec![format!("{path}: cannot build the HTTP client: {e}")])?;
        let limits = RateLimits::new(config.requests_per_minute, config.tokens_per_minute);
        Ok(Client {
            http,
            streaming,
            config,
            limits: Mutex::new(limits),
            in_flight: Outstanding::default(),
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
        let response = self.send(endpoint, body, tokens).await?;
        response.json::<Value>().await.map_err(|e| {
            BackendError::permanent(format!("unparseable response from {endpoint}: {e}"))
        })
    }

    /// POSTs `body` to `endpoint`, within the rate limits, and returns the response
    /// once its status is a success. The provider's `x-ratelimit-*` headers, on any
    /// response, teach the limits what the account has left.
    pub(crate) async fn send(
        &self,
        endpoint: &str,
        body: &Value,
        tokens: u64,
    ) -> Result<reqwest::Response, BackendError> {
        self.send_with(&self.http, endpoint, body, tokens).await
    }

    /// [`send`](Client::send) for a response read as a stream: no timeout on the
    /// whole exchange (a generation may stream for minutes), only on connecting and
    /// on each read.
    pub(crate) async fn send_streamed(
        &self,
        endpoint: &str,
        body: &Value,
        tokens: u64,
    ) -> Result<reqwest::Response, BackendError> {
        self.send_with(&self.streaming, endpoint, body, tokens)
            .await
    }

    async fn send_with(
        &self,
        http: &reqwest::Client,
        endpoint: &str,
        body: &Value,
        tokens: u64,
    ) -> Result<reqwest::Response, BackendError> {
        self.wait_for_limits(tokens).await;
        let mut request = http.post(self.config.url(endpoint)).json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key.expose());
        }
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        let in_flight = InFlight::start(&self.in_flight, tokens);
        // No header goes into an error's message: no key leaks here.
        send_observed(
            request,
            &format!("request to {endpoint}"),
            |status, headers| {
                if !self.config.rate_limit_headers {
                    return;
                }
                let seen = Seen::of(headers);
                if !seen.is_empty() {
                    let (requests, in_flight_tokens) = in_flight.others();
                    let mut limits = self.limits.lock().expect("limits lock");
                    if status == 429 {
                        limits.refused(&seen, tokens);
                    }
                    limits.learn(Instant::now(), &seen, requests, in_flight_tokens);
                }
            },
        )
        .await
    }
}

/// Requests sent and not yet answered, and their tokens: what a provider's
/// remaining counts may not include yet.
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    requests: AtomicU64,
    tokens: AtomicU64,
}

/// One request's share of [`Outstanding`], given back when it is dropped.
struct InFlight<'a> {
    all: &'a Outstanding,
    tokens: u64,
}

impl<'a> InFlight<'a> {
    fn start(all: &'a Outstanding, tokens: u64) -> Self {
        all.requests.fetch_add(1, Ordering::Relaxed);
        all.tokens.fetch_add(tokens, Ordering::Relaxed);
        InFlight { all, tokens }
    }

    /// The other requests in flight, and their tokens.
    fn others(&self) -> (u64, u64) {
        let requests = self.all.requests.load(Ordering::Relaxed).saturating_sub(1);
        let tokens = self.all.tokens.load(Ordering::Relaxed);
        (requests, tokens.saturating_sub(self.tokens))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.all.requests.fetch_sub(1, Ordering::Relaxed);
        self.all.tokens.fetch_sub(self.tokens, Ordering::Relaxed);
    }
}
