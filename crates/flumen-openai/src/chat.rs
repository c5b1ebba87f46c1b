use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use serde_json::{json, Value};

use std::sync::atomic::Ordering;

use crate::client::Client;
use crate::llm::{listed, repair_message, Answer, Compiled, Repairs};
use crate::tokens::{estimate_tokens, fit_context, Fitted};
use crate::OpenAiConfig;

/// `POST /chat/completions`: one record (the user message) per request, the
/// assistant's reply out. Flumen's adaptive concurrency decides how many run at once.
///
/// With an [`LlmPipeline`](crate::LlmPipeline) (a user template or a response
/// schema), a record is rendered into the prompt and its answer is checked: see
/// [`Chat::record`].
pub struct Chat {
    client: Client,
    pipeline: Option<Box<Compiled>>,
}

impl Chat {
    /// A backend for `config`, or every problem with it (paths under `backend`).
    pub fn new(config: OpenAiConfig) -> Result<Self, Vec<String>> {
        let pipeline = match config.llm.is_active() {
            true => Some(Box::new(Compiled::new(
                &config.llm,
                config.system_prompt.as_deref(),
                "backend",
            )?)),
            false => None,
        };
        Ok(Chat {
            client: Client::new(config, "backend")?,
            pipeline,
        })
    }

    /// Whether records go through a pipeline (a template or a schema): they are
    /// then answered by [`Chat::record`].
    pub fn is_pipeline(&self) -> bool {
        self.pipeline.is_some()
    }

    /// The estimated prompt tokens of a pipeline's record: its rendered messages
    /// (the record's own text when they cannot be rendered; it then fails unsent).
    pub fn prompt_tokens(&self, record: &Value) -> u64 {
        let rendered = self.pipeline.as_ref().and_then(|p| {
            p.messages(record, self.client.config.system_prompt.as_deref())
                .ok()
        });
        match (rendered, record) {
            (Some(messages), _) => estimate_tokens(&Value::Array(messages).to_string()),
            (None, Value::String(s)) => estimate_tokens(s),
            (None, other) => estimate_tokens(&other.to_string()),
        }
    }

    /// Repair attempts allowed per record (0 without a schema).
    pub fn max_repairs(&self) -> u32 {
        self.pipeline.as_ref().map_or(0, |p| p.max_repairs())
    }

    /// Repairs tried so far, and how many ended in a valid answer.
    pub fn repairs(&self) -> Repairs {
        self.pipeline
            .as_ref()
            .map(|p| p.counted())
            .unwrap_or_default()
    }

    /// One record through the pipeline: its prompt rendered from its fields, sent
    /// with the schema as `response_format`, the reply parsed and validated. A reply
    /// that does not parse or validate is sent back once (`max_repairs`) with the
    /// validator's errors; if the next is still wrong, the record fails with
    /// [`InvalidOutput`](flumen_core::ErrorKind::InvalidOutput) listing them. A
    /// content refusal fails it as invalid input. The answer is an [`Answer`]'s JSON.
    pub async fn record(&self, record: &Value) -> Result<Value, BackendError> {
        let c = &self.client.config;
        let pipeline = self.pipeline.as_ref().ok_or_else(|| {
            BackendError::permanent("this chat backend has no template or schema")
        })?;
        let mut messages = pipeline.messages(record, c.system_prompt.as_deref())?;
        let mut body = json!({"model": c.model});
        if let Some(t) = c.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(m) = c.max_completion_tokens {
            body["max_completion_tokens"] = json!(m);
        }
        if let Some(format) = pipeline.response_format() {
            body["response_format"] = format;
        }
        let mut answer = Answer {
            content: Value::Null,
            prompt_tokens: 0,
            completion_tokens: 0,
            repairs: 0,
            model: None,
        };
        loop {
            body["messages"] = Value::Array(messages.clone());
            let tokens = request_tokens(&body);
            let reply = self.client.post("chat/completions", &body, tokens).await?;
            answer.prompt_tokens += reply["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            answer.completion_tokens += reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            answer.model = reply["model"].as_str().map(str::to_owned);
            let content = content_of(&reply)?;
            let errors = match pipeline.check(&content) {
                Ok(value) => {
                    if answer.repairs > 0 {
                        pipeline.repairs.valid.fetch_add(1, Ordering::Relaxed);
                    }
                    answer.content = value;
                    return Ok(answer.to_value());
                }
                Err(errors) => errors,
            };
            if answer.repairs >= pipeline.max_repairs() {
                let after = match answer.repairs {
                    0 => String::new(),
                    1 => " after 1 repair".to_owned(),
                    n => format!(" after {n} repairs"),
                };
                return Err(BackendError::invalid_output(format!(
                    "the reply does not match the response schema{after}: {}",
                    listed(&errors)
                )));
            }
            answer.repairs += 1;
            pipeline.repairs.tried.fetch_add(1, Ordering::Relaxed);
            messages.push(json!({"role": "assistant", "content": content}));
            messages.push(repair_message(&errors));
        }
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
        content_of(&answer)
    }
}

/// The first choice's text; a refusal (`message.refusal`, or `finish_reason`
/// `content_filter`) fails the record as invalid input: another provider would
/// refuse it too.
fn content_of(reply: &Value) -> Result<String, BackendError> {
    let choice = &reply["choices"][0];
    if let Some(refusal) = choice["message"]["refusal"].as_str() {
        return Err(BackendError::invalid_input(format!(
            "the model refused: {}",
            refusal.chars().take(300).collect::<String>()
        )));
    }
    if choice["finish_reason"] == "content_filter" {
        return Err(BackendError::invalid_input(
            "the provider's content filter stopped the reply",
        ));
    }
    choice["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| {
            BackendError::permanent("unparseable response: no choices[0].message.content")
        })
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
        let body = self.prepare(request, false)?;
        let tokens = request_tokens(&body);
        self.client.post("chat/completions", &body, tokens).await
    }

    /// One whole chat request as [`request`](Chat::request) sends it, but with
    /// `stream: true` (and the caller's `stream_options`): the response, once its
    /// status is a success, is the provider's server-sent events, to be relayed as
    /// they come. Dropping it closes the connection, which stops the generation on
    /// servers that watch for it (vLLM, llama.cpp's server).
    pub async fn stream(&self, request: &Value) -> Result<reqwest::Response, BackendError> {
        let body = self.prepare(request, true)?;
        let tokens = request_tokens(&body);
        self.client
            .send_streamed("chat/completions", &body, tokens)
            .await
    }

    /// The body sent for a caller's whole request.
    fn prepare(&self, request: &Value, stream: bool) -> Result<Value, BackendError> {
        let c = &self.client.config;
        let Some(fields) = request.as_object() else {
            return Err(BackendError::invalid_input(
                "a chat request must be a JSON object",
            ));
        };
        let mut body = fields.clone();
        body.insert("model".into(), json!(c.model));
        if stream {
            body.insert("stream".into(), json!(true));
        } else {
            body.remove("stream");
            body.remove("stream_options");
        }
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
        Ok(Value::Object(body))
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
