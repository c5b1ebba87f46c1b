use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use serde_json::{json, Value};

use crate::client::Client;
use crate::tokens::{estimate_tokens, fit_context, Fitted};
use crate::OpenAiConfig;

/// `POST /chat/completions`: one record (the user message) per request, the
/// assistant's reply out. Flumen's adaptive concurrency decides how many run at once.
pub struct Chat {
    client: Client,
}

impl Chat {
    /// A backend for `config`, or every problem with it (paths under `backend`).
    pub fn new(config: OpenAiConfig) -> Result<Self, Vec<String>> {
        Ok(Chat {
            client: Client::new(config, "backend")?,
        })
    }

    async fn one(&self, text: &str) -> Result<String, BackendError> {
        let c = &self.client.config;
        let content = match fit_context(text, c.max_context_tokens, c.overflow) {
            Fitted::Text(t) => t,
            Fitted::Skipped { tokens } => {
                return Err(BackendError::invalid_input(format!(
                    "about {tokens} tokens exceed the context of {} (overflow policy: skip)",
                    c.max_context_tokens.unwrap_or_default()
                )))
            }
        };
        let mut messages = Vec::new();
        if let Some(system) = &c.system_prompt {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": content}));
        let mut body = json!({"model": c.model, "messages": messages});
        if let Some(t) = c.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(m) = c.max_completion_tokens {
            body["max_completion_tokens"] = json!(m);
        }
        let tokens = estimate_tokens(&content)
            + c.system_prompt.as_deref().map_or(0, estimate_tokens)
            + u64::from(c.max_completion_tokens.unwrap_or(0));
        let answer = self.client.post("chat/completions", &body, tokens).await?;
        answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                BackendError::permanent("unparseable response: no choices[0].message.content")
            })
    }
}

impl Chat {
    /// The completion budget of each answer to a text record (`max_completion_tokens`).
    pub fn max_completion_tokens(&self) -> Option<u32> {
        self.client.config.max_completion_tokens
    }

    /// One whole chat request, as a caller of an OpenAI-compatible API wrote it
    /// (`messages` with tools, `response_format`, `seed`, `n`, …): sent with this
    /// backend's model in place of the caller's, `stream` off, and the configured
    /// system prompt first when the request has no system message. The answer is the
    /// API's whole JSON (`choices`, `usage`).
    pub async fn request(&self, request: &Value) -> Result<Value, BackendError> {
        let c = &self.client.config;
        let Some(fields) = request.as_object() else {
            return Err(BackendError::invalid_input(
                "a chat request must be a JSON object",
            ));
        };
        let mut body = fields.clone();
        body.insert("model".into(), json!(c.model));
        body.remove("stream");
        body.remove("stream_options");
        if let (Some(system), Some(Value::Array(messages))) =
            (&c.system_prompt, body.get_mut("messages"))
        {
            if !messages
                .iter()
                .any(|m| m["role"] == "system" || m["role"] == "developer")
            {
                messages.insert(0, json!({"role": "system", "content": system}));
            }
        }
        if let Some(t) = c.temperature {
            body.entry("temperature").or_insert(json!(t));
        }
        // The configured budget, unless the caller set one (either name: OpenAI
        // refuses both at once).
        if let Some(m) = c.max_completion_tokens {
            if !body.contains_key("max_tokens") {
                body.entry("max_completion_tokens").or_insert(json!(m));
            }
        }
        let body = Value::Object(body);
        let tokens = request_tokens(&body);
        self.client.post("chat/completions", &body, tokens).await
    }
}

/// A whole request's tokens, estimated from its text, and its completion budget for
/// each of its `n` choices (saturating: a caller's huge budget cannot wrap).
pub fn request_tokens(body: &Value) -> u64 {
    estimate_tokens(&body["messages"].to_string()).saturating_add(completion_budget(body))
}

/// A whole request's completion budget: `max_completion_tokens` (or `max_tokens`)
/// for each of its `n` choices; 0 when it sets none.
pub fn completion_budget(body: &Value) -> u64 {
    let budget = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .unwrap_or(0);
    let n = body["n"].as_u64().unwrap_or(1).max(1);
    budget.saturating_mul(n)
}

impl Backend for Chat {
    type Input = String;
    type Output = String;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: 1,
            max_batch_bytes: None,
            max_batch_tokens: None,
            // A completion may be sampled: sending it twice is not harmless.
            idempotent: false,
        }
    }

    fn cost(&self, text: &String) -> ItemCost {
        ItemCost {
            bytes: text.len() as u64,
            tokens: estimate_tokens(text),
        }
    }

    async fn call(&self, batch: &[String]) -> BatchResult<String> {
        // The engine sends one record per call (max_batch_items = 1); a whole-call
        // error lets it see overload and timeouts as such.
        if let [text] = batch {
            return Ok(vec![Ok(self.one(text).await?)]);
        }
        let mut out = Vec::with_capacity(batch.len());
        for text in batch {
            out.push(self.one(text).await);
        }
        Ok(out)
    }
}
