//! A generic HTTP JSON backend: any model server that takes JSON and answers JSON.
//!
//! The request body is a template in which one JSON string is a placeholder:
//! `"{{inputs}}"` becomes the array of a batch's records ([`Mode::Batched`]), or
//! `"{{input}}"` becomes one record ([`Mode::PerRecord`]). The prediction is found
//! in the response by a JSON pointer: to the array of results (batched; with an
//! optional pointer inside each element), or to the one result (per record).
//! Requests go through [`flumen_core::http::send`], so HTTP statuses map through
//! [`flumen_core::http::classify_status`].

use std::time::Duration;

use flumen_core::http::{json_cost, send};
use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use serde_json::Value;

/// How records map to requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Many records per request, up to `max_batch_items`; the template holds
    /// `"{{inputs}}"` and `result` points at an array with one element per record.
    Batched {
        /// Records per request at most.
        max_batch_items: usize,
    },
    /// One record per request; the template holds `"{{input}}"`.
    PerRecord,
}

/// Settings of an [`HttpJson`] backend.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpJsonConfig {
    /// Where to POST.
    pub url: String,
    /// Extra headers on every request.
    pub headers: Vec<(String, String)>,
    /// Batched or one request per record.
    pub mode: Mode,
    /// The request body, with the placeholder string in it.
    pub template: Value,
    /// JSON pointer to the result (or to the array of results) in the response.
    pub result: String,
    /// Batched: JSON pointer to the prediction within each element (default: the element).
    pub item: Option<String>,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Whether sending a request twice is harmless (allows hedging).
    pub idempotent: bool,
}

const ONE: &str = "{{input}}";
const MANY: &str = "{{inputs}}";

fn count_placeholders(v: &Value, placeholder: &str) -> usize {
    match v {
        Value::String(s) => usize::from(s == placeholder),
        Value::Array(a) => a.iter().map(|x| count_placeholders(x, placeholder)).sum(),
        Value::Object(o) => o.values().map(|x| count_placeholders(x, placeholder)).sum(),
        _ => 0,
    }
}

fn fill(template: &Value, placeholder: &str, with: &Value) -> Value {
    match template {
        Value::String(s) if s == placeholder => with.clone(),
        Value::Array(a) => Value::Array(a.iter().map(|x| fill(x, placeholder, with)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), fill(x, placeholder, with)))
                .collect(),
        ),
        other => other.clone(),
    }
}

impl HttpJsonConfig {
    fn placeholder(&self) -> &'static str {
        match self.mode {
            Mode::Batched { .. } => MANY,
            Mode::PerRecord => ONE,
        }
    }

    /// Every problem with these settings, each prefixed with `path` and its field.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            problems.push(format!("{path}.url: must start with http:// or https://"));
        }
        let placeholder = self.placeholder();
        let n = count_placeholders(&self.template, placeholder);
        if n != 1 {
            problems.push(format!(
                "{path}.template: must contain the string \"{placeholder}\" exactly once (found {n})"
            ));
        }
        for (field, pointer) in [("result", Some(&self.result)), ("item", self.item.as_ref())] {
            if let Some(p) = pointer {
                if !(p.is_empty() || p.starts_with('/')) {
                    problems.push(format!(
                        "{path}.{field}: a JSON pointer is empty or starts with /"
                    ));
                }
            }
        }
        if self.mode == (Mode::Batched { max_batch_items: 0 }) {
            problems.push(format!("{path}.max_batch_items: must be > 0"));
        }
        if self.request_timeout.is_zero() {
            problems.push(format!("{path}.request_timeout: must be > 0"));
        }
        problems
    }
}

/// The generic HTTP JSON backend.
pub struct HttpJson {
    http: reqwest::Client,
    config: HttpJsonConfig,
}

impl HttpJson {
    /// A backend for `config`, or every problem with it (paths under `backend`).
    pub fn new(config: HttpJsonConfig) -> Result<Self, Vec<String>> {
        let problems = config.validate("backend");
        if !problems.is_empty() {
            return Err(problems);
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| vec![format!("backend: cannot build the HTTP client: {e}")])?;
        Ok(HttpJson { http, config })
    }

    async fn post(&self, body: &Value) -> Result<Value, BackendError> {
        let mut request = self.http.post(&self.config.url).json(body);
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        let response = send(request, "request").await?;
        response
            .json()
            .await
            .map_err(|e| BackendError::permanent(format!("unparseable response: {e}")))
    }

    fn at<'a>(v: &'a Value, pointer: &str, what: &str) -> Result<&'a Value, BackendError> {
        v.pointer(pointer).ok_or_else(|| {
            BackendError::permanent(format!("the response has nothing at {what} `{pointer}`"))
        })
    }
}

impl Backend for HttpJson {
    type Input = Value;
    type Output = Value;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: match self.config.mode {
                Mode::Batched { max_batch_items } => max_batch_items,
                Mode::PerRecord => 1,
            },
            idempotent: self.config.idempotent,
            ..Capabilities::default()
        }
    }

    fn cost(&self, record: &Value) -> ItemCost {
        json_cost(record)
    }

    async fn call(&self, batch: &[Value]) -> BatchResult<Value> {
        match self.config.mode {
            Mode::Batched { .. } => {
                let body = fill(&self.config.template, MANY, &Value::Array(batch.to_vec()));
                let answer = self.post(&body).await?;
                let results = Self::at(&answer, &self.config.result, "result")?
                    .as_array()
                    .ok_or_else(|| {
                        BackendError::permanent(format!("`{}` is not an array", self.config.result))
                    })?;
                if results.len() != batch.len() {
                    return Err(BackendError::permanent(format!(
                        "{} results for {} records",
                        results.len(),
                        batch.len()
                    )));
                }
                Ok(results
                    .iter()
                    .map(|r| match &self.config.item {
                        Some(p) => Self::at(r, p, "item").cloned(),
                        None => Ok(r.clone()),
                    })
                    .collect())
            }
            Mode::PerRecord => {
                let mut out = Vec::with_capacity(batch.len());
                for record in batch {
                    let body = fill(&self.config.template, ONE, record);
                    let answer = self.post(&body).await;
                    let result =
                        answer.and_then(|a| Self::at(&a, &self.config.result, "result").cloned());
                    if batch.len() == 1 {
                        // A whole-call error lets the engine see overload as such.
                        return Ok(vec![Ok(result?)]);
                    }
                    out.push(result);
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(mode: Mode, template: Value) -> HttpJsonConfig {
        HttpJsonConfig {
            url: "http://127.0.0.1:1/predict".into(),
            headers: vec![],
            mode,
            template,
            result: "/predictions".into(),
            item: None,
            request_timeout: Duration::from_secs(5),
            idempotent: true,
        }
    }

    #[test]
    fn templates_need_their_placeholder_exactly_once() {
        let ok = config(
            Mode::Batched { max_batch_items: 8 },
            json!({"instances": "{{inputs}}"}),
        );
        assert!(ok.validate("b").is_empty());
        let missing = config(Mode::PerRecord, json!({"instances": "{{inputs}}"}));
        assert_eq!(
            missing.validate("b"),
            vec!["b.template: must contain the string \"{{input}}\" exactly once (found 0)"]
        );
        let mut twice = config(Mode::PerRecord, json!(["{{input}}", {"x": "{{input}}"}]));
        twice.result = "predictions".into();
        twice.url = "ftp://x".into();
        let p = twice.validate("b");
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn filling_replaces_only_the_placeholder() {
        let t = json!({"a": "{{input}}", "b": ["{{input}}x", 3], "c": {"d": "{{input}}"}});
        let filled = fill(&t, ONE, &json!({"text": "hi"}));
        assert_eq!(
            filled,
            json!({"a": {"text": "hi"}, "b": ["{{input}}x", 3], "c": {"d": {"text": "hi"}}})
        );
    }
}
