use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use serde_json::{json, Value};

use crate::client::Client;
use crate::tokens::{estimate_tokens, fit_context, Fitted};
use crate::OpenAiConfig;

/// `POST /embeddings`: a batch of texts in, one vector per text out.
pub struct Embeddings {
    client: Client,
}

impl Embeddings {
    /// A backend for `config`, or every problem with it (paths under `backend`).
    pub fn new(config: OpenAiConfig) -> Result<Self, Vec<String>> {
        Ok(Embeddings {
            client: Client::new(config, "backend")?,
        })
    }

    fn parse(data: &Value, sent: usize) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        let items = data
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| BackendError::permanent("unparseable response: no `data` array"))?;
        let mut out = vec![None; sent];
        for item in items {
            let index = item
                .get("index")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            let vector = item.get("embedding").and_then(Value::as_array).map(|v| {
                v.iter()
                    .map(|x| x.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<f32>>>()
            });
            match (index, vector) {
                (Some(i), Some(Some(v))) if i < sent => out[i] = Some(v),
                _ => return Err(BackendError::permanent(
                    "unparseable response: an item lacks a valid `index` or a numeric `embedding`",
                )),
            }
        }
        Ok(out)
    }
}

impl Backend for Embeddings {
    type Input = String;
    type Output = Vec<f32>;

    fn capabilities(&self) -> Capabilities {
        let c = &self.client.config;
        Capabilities {
            max_batch_items: c.max_batch_items,
            max_batch_bytes: None,
            max_batch_tokens: Some(c.max_batch_tokens),
            idempotent: true,
        }
    }

    fn cost(&self, text: &String) -> ItemCost {
        let c = &self.client.config;
        let tokens = estimate_tokens(text).min(c.max_context_tokens.unwrap_or(u64::MAX));
        ItemCost {
            bytes: text.len() as u64,
            tokens,
        }
    }

    async fn call(&self, batch: &[String]) -> BatchResult<Vec<f32>> {
        let c = &self.client.config;
        let mut results: Vec<Option<Result<Vec<f32>, BackendError>>> = vec![None; batch.len()];
        let mut sent = Vec::new();
        let mut positions = Vec::new();
        for (i, text) in batch.iter().enumerate() {
            match fit_context(text, c.max_context_tokens, c.overflow) {
                Fitted::Text(t) => {
                    positions.push(i);
                    sent.push(t.into_owned());
                }
                Fitted::Skipped { tokens } => {
                    results[i] = Some(Err(BackendError::invalid_input(format!(
                        "about {tokens} tokens exceed the context of {} (overflow policy: skip)",
                        c.max_context_tokens.unwrap_or_default()
                    ))));
                }
            }
        }
        if !sent.is_empty() {
            let tokens = sent.iter().map(|t| estimate_tokens(t)).sum();
            let mut body = json!({
                "model": c.model,
                "input": sent,
                "encoding_format": "float",
            });
            if let Some(d) = c.dimensions {
                body["dimensions"] = json!(d);
            }
            let answer = self.client.post("embeddings", &body, tokens).await?;
            let vectors = Self::parse(&answer, positions.len())?;
            for (pos, vector) in positions.into_iter().zip(vectors) {
                results[pos] = Some(vector.ok_or_else(|| {
                    BackendError::permanent("the response has no embedding for this input")
                }));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every input has a result"))
            .collect())
    }
}
