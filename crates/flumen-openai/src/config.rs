use std::fmt;
use std::time::Duration;

/// What to do with a record longer than the model's context (Flink ML_PREDICT's
/// `context-overflow-action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Keep the beginning, drop the end.
    #[default]
    TruncateTail,
    /// Keep the end, drop the beginning.
    TruncateHead,
    /// Fail the record as invalid input without sending it.
    Skip,
}

/// An API key: read from the environment, sent in the `Authorization` header, never
/// printed (`Debug` shows `ApiKey(***)`).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// Reads the key from environment variable `var`.
    pub fn from_env(var: &str) -> Result<Self, String> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(ApiKey(v)),
            _ => Err(format!(
                "api_key_env: environment variable `{var}` is not set"
            )),
        }
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// Settings of an OpenAI-compatible backend.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiConfig {
    /// The API root, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The `model` field of every request.
    pub model: String,
    /// The key, if the endpoint wants one (`Authorization: Bearer …`).
    pub api_key: Option<ApiKey>,
    /// Extra headers on every request (e.g. `OpenAI-Organization`).
    pub headers: Vec<(String, String)>,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// Embeddings: inputs per request at most (the API allows 2,048).
    pub max_batch_items: usize,
    /// Embeddings: estimated tokens per request at most.
    pub max_batch_tokens: u64,
    /// Requests per minute allowed by the account, if limited.
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute allowed by the account, if limited (estimated tokens).
    pub tokens_per_minute: Option<u32>,
    /// The model's context, in estimated tokens; longer records follow `overflow`.
    pub max_context_tokens: Option<u64>,
    /// What to do with a record longer than `max_context_tokens`.
    pub overflow: OverflowPolicy,
    /// Embeddings: the `dimensions` field, for models that support it.
    pub dimensions: Option<u32>,
    /// Chat: a system message sent before each record.
    pub system_prompt: Option<String>,
    /// Chat: `temperature`.
    pub temperature: Option<f32>,
    /// Chat: `max_completion_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Chat: a record pipeline (a user template, a response schema).
    pub llm: crate::LlmPipeline,
    /// Pace requests by the provider's `x-ratelimit-*` headers (default on; see
    /// [`RateLimits::learn`](crate::RateLimits::learn)).
    pub rate_limit_headers: bool,
}

/// The API's limit on inputs per embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 2_048;

impl OpenAiConfig {
    /// Defaults for `model` at `base_url`, with no key.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            headers: Vec::new(),
            request_timeout: Duration::from_secs(60),
            max_batch_items: MAX_EMBEDDING_INPUTS,
            max_batch_tokens: 300_000,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_context_tokens: Some(8_192),
            overflow: OverflowPolicy::TruncateTail,
            dimensions: None,
            system_prompt: None,
            temperature: None,
            max_completion_tokens: None,
            llm: crate::LlmPipeline {
                send_schema: true,
                max_repairs: 1,
                ..crate::LlmPipeline::default()
            },
            rate_limit_headers: true,
        }
    }

    /// Every problem with these settings, each prefixed with `path` and its field.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, why: &str| problems.push(format!("{path}.{field}: {why}"));
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            bad("base_url", "must start with http:// or https://");
        }
        if self.base_url.starts_with("https://") && !cfg!(feature = "tls") {
            bad("base_url", "https needs flumen-openai's `tls` feature");
        }
        if self.model.trim().is_empty() {
            bad("model", "must not be empty");
        }
        if self.request_timeout.is_zero() {
            bad("request_timeout", "must be > 0");
        }
        if self.max_batch_items == 0 || self.max_batch_items > MAX_EMBEDDING_INPUTS {
            bad("max_batch_items", "must be within 1..=2048");
        }
        if self.max_batch_tokens == 0 {
            bad("max_batch_tokens", "must be > 0");
        }
        if self.requests_per_minute == Some(0) {
            bad("requests_per_minute", "must be > 0");
        }
        if self.tokens_per_minute == Some(0) {
            bad("tokens_per_minute", "must be > 0");
        }
        if self.max_context_tokens == Some(0) {
            bad("max_context_tokens", "must be > 0");
        }
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            bad("temperature", "must be within 0..=2");
        }
        for (name, _) in &self.headers {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                bad("headers", &format!("`{name}` is not a valid header name"));
            }
        }
        if self.llm.is_active() {
            problems.extend(self.llm.problems(self.system_prompt.as_deref(), path));
        }
        problems
    }

    pub(crate) fn url(&self, endpoint: &str) -> String {
        format!("{}/{endpoint}", self.base_url.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let mut c = OpenAiConfig::new("http://localhost/v1", "m");
        c.api_key = Some(ApiKey::new("sk-very-secret"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert!(shown.contains("ApiKey(***)"));
    }

    #[test]
    fn validation_reports_every_problem_with_its_path() {
        let mut c = OpenAiConfig::new("ftp://x", " ");
        c.max_batch_items = 5_000;
        c.requests_per_minute = Some(0);
        c.temperature = Some(3.0);
        c.headers.push(("Bad Header".into(), "v".into()));
        let p = c.validate("backends.openai");
        for field in [
            "base_url",
            "model",
            "max_batch_items",
            "requests_per_minute",
            "temperature",
            "headers",
        ] {
            assert!(
                p.iter()
                    .any(|m| m.starts_with(&format!("backends.openai.{field}:"))),
                "{field} missing from {p:?}"
            );
        }
        assert!(OpenAiConfig::new("http://127.0.0.1:1/v1", "m")
            .validate("x")
            .is_empty());
    }

    #[test]
    fn a_missing_key_variable_is_named() {
        let e = ApiKey::from_env("FLUMEN_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert!(e.contains("FLUMEN_TEST_SURELY_UNSET_VAR"));
    }
}
