//! [`AnyBackend`]: the backend of a [`BackendConfig`], built (and for KServe,
//! connected), with JSON records in and JSON predictions out.

use std::time::Duration;

use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ErrorKind, ItemCost};
use serde_json::Value;

use crate::backend::{ms, BackendConfig};

/// Any configured backend, with JSON records in and JSON predictions out.
pub enum AnyBackend {
    /// See [`flumen_embed::Embedder`].
    #[cfg(feature = "embedded")]
    Embedded(flumen_embed::Embedder),
    /// See [`flumen_sim::Sim`].
    Sim(Box<flumen_sim::Sim<Value>>),
    /// See [`flumen_kserve::KserveHttp`].
    Kserve(flumen_kserve::KserveHttp),
    /// See [`flumen_kserve::grpc::KserveGrpc`].
    #[cfg(feature = "grpc")]
    KserveGrpc(flumen_kserve::grpc::KserveGrpc),
    /// See [`flumen_openai::Embeddings`].
    Embeddings(flumen_openai::Embeddings),
    /// See [`flumen_openai::Chat`].
    Chat(flumen_openai::Chat),
    /// See [`flumen_http::HttpJson`].
    Http(flumen_http::HttpJson),
    /// See [`flumen_onnx::Onnx`].
    #[cfg(feature = "onnx")]
    Onnx(Box<crate::onnx::OnnxModel>),
}

/// What a KServe v2 backend read of its model: for a gateway that serves the model
/// under the same protocol.
#[derive(Debug, Clone, Copy)]
pub struct KserveModel<'a> {
    /// The model's metadata as its server gave it (the KServe v2 HTTP shape).
    pub metadata: &'a Value,
    /// The tensors the backend fills from records and reads predictions from.
    pub signature: &'a flumen_kserve::Signature,
    /// The model's configuration (Triton's extension), when the server gave it.
    pub config: Option<&'a Value>,
}

impl AnyBackend {
    /// Whether this is an OpenAI-compatible chat backend, which takes whole chat
    /// requests (objects) as records.
    pub fn is_openai_chat(&self) -> bool {
        matches!(self, AnyBackend::Chat(_))
    }

    /// A chat record pipeline's repairs so far; `None` for other backends.
    pub fn repairs(&self) -> Option<flumen_openai::Repairs> {
        match self {
            AnyBackend::Chat(b) if b.is_pipeline() => Some(b.repairs()),
            _ => None,
        }
    }

    /// The model a KServe v2 backend serves; `None` for other backends.
    pub fn kserve_model(&self) -> Option<KserveModel<'_>> {
        match self {
            AnyBackend::Kserve(k) => Some(KserveModel {
                metadata: k.metadata(),
                signature: k.signature(),
                config: k.model_config(),
            }),
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(k) => Some(KserveModel {
                metadata: k.metadata(),
                signature: k.signature(),
                config: None,
            }),
            #[cfg(feature = "onnx")]
            AnyBackend::Onnx(m) => Some(KserveModel {
                metadata: &m.metadata,
                signature: &m.signature,
                config: None,
            }),
            _ => None,
        }
    }

    /// Builds (and for KServe, connects to) the backend of a validated configuration.
    pub async fn build(config: &BackendConfig) -> Result<AnyBackend, Vec<String>> {
        Ok(match config {
            #[cfg(feature = "embedded")]
            BackendConfig::Embedded(e) => AnyBackend::Embedded(
                flumen_embed::Embedder::load(e.embed_config())
                    .await
                    .map_err(|e| vec![format!("backend: {e}")])?,
            ),
            #[cfg(not(feature = "embedded"))]
            BackendConfig::Embedded(_) => {
                return Err(vec![
                    "backend.kind: `embedded` needs flumen built with the `embedded` feature"
                        .into(),
                ])
            }
            BackendConfig::Sim(s) => {
                AnyBackend::Sim(Box::new(flumen_sim::Sim::new(flumen_sim::SimConfig {
                    base: Duration::from_secs_f64(s.a_ms / 1e3),
                    per_item: Duration::from_secs_f64(s.b_ms / 1e3),
                    slots: s.slots,
                    max_batch: s.max_batch,
                    seed: s.seed,
                    faults: flumen_sim::Faults {
                        item_error_rate: s.error_rate,
                        ..flumen_sim::Faults::default()
                    },
                    ..flumen_sim::SimConfig::default()
                })))
            }
            BackendConfig::Kserve(k) => {
                let mut c = flumen_kserve::KserveConfig::new(&k.url, &k.model);
                c.version = k.version.clone();
                c.input = k.input.clone();
                c.output = k.output.clone();
                c.max_batch_items = k.max_batch_items;
                c.priority = k.priority;
                c.request_timeout = ms(k.timeout_ms, 30_000);
                let fail = |e: flumen_kserve::KserveError| vec![format!("backend: {e}")];
                match k.protocol.as_deref() {
                    #[cfg(feature = "grpc")]
                    Some("grpc") => AnyBackend::KserveGrpc(
                        flumen_kserve::grpc::KserveGrpc::connect(c)
                            .await
                            .map_err(fail)?,
                    ),
                    _ => AnyBackend::Kserve(
                        flumen_kserve::KserveHttp::connect(c).await.map_err(fail)?,
                    ),
                }
            }
            BackendConfig::OpenaiEmbeddings(o) => AnyBackend::Embeddings(
                flumen_openai::Embeddings::new(o.openai().map_err(|e| vec![e])?)?,
            ),
            BackendConfig::OpenaiChat(o) => {
                AnyBackend::Chat(flumen_openai::Chat::new(o.openai().map_err(|e| vec![e])?)?)
            }
            BackendConfig::Http(h) => AnyBackend::Http(flumen_http::HttpJson::new(h.http())?),
            #[cfg(feature = "onnx")]
            BackendConfig::Onnx(o) => AnyBackend::Onnx(Box::new(crate::onnx::OnnxModel::load(o)?)),
            #[cfg(not(feature = "onnx"))]
            BackendConfig::Onnx(_) => {
                return Err(vec![
                    "backend.kind: `onnx` needs flumen built with the `onnx` feature".into(),
                ])
            }
        })
    }
}

/// An embedding as JSON, each float written with the fewest digits that read back as
/// the same f32 (`-0.018750638`, not the f64 widening `-0.018750637769699097`): the
/// same values in about half the bytes.
fn vector(v: Vec<f32>) -> Value {
    let mut buf = ryu::Buffer::new();
    Value::Array(
        v.into_iter()
            .map(|x| {
                if !x.is_finite() {
                    return Value::Null;
                }
                let shortest: f64 = buf.format_finite(x).parse().unwrap_or(f64::from(x));
                serde_json::Number::from_f64(shortest).map_or(Value::Null, Value::Number)
            })
            .collect(),
    )
}

/// A record that must be a string, for the text backends.
fn text(v: &Value) -> Result<String, BackendError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| BackendError::invalid_input(format!("this backend takes text, not {v}")))
}

/// A whole chat request for an OpenAI-compatible chat backend: an object with a
/// `messages` list (as the gateway's chat front sends it). Any other object is not
/// one, and is refused as a record that is not text.
fn is_chat_request(record: &Value) -> bool {
    record.get("messages").is_some_and(Value::is_array)
}

/// Runs a text backend on JSON records: non-strings fail alone.
async fn on_text<B, O>(backend: &B, batch: &[Value], out: impl Fn(O) -> Value) -> BatchResult<Value>
where
    B: Backend<Input = String, Output = O>,
{
    let mut results: Vec<Option<Result<Value, BackendError>>> = vec![None; batch.len()];
    let mut texts = Vec::new();
    let mut at = Vec::new();
    for (i, v) in batch.iter().enumerate() {
        match text(v) {
            Ok(t) => {
                texts.push(t);
                at.push(i);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    if !texts.is_empty() {
        for (i, r) in at.into_iter().zip(backend.call(&texts).await?) {
            results[i] = Some(r.map(&out));
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every record has a result"))
        .collect())
}

impl Backend for AnyBackend {
    type Input = Value;
    type Output = Value;

    fn capabilities(&self) -> Capabilities {
        match self {
            #[cfg(feature = "embedded")]
            AnyBackend::Embedded(b) => b.capabilities(),
            AnyBackend::Sim(b) => b.capabilities(),
            AnyBackend::Kserve(b) => b.capabilities(),
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(b) => b.capabilities(),
            AnyBackend::Embeddings(b) => b.capabilities(),
            AnyBackend::Chat(b) => b.capabilities(),
            AnyBackend::Http(b) => b.capabilities(),
            #[cfg(feature = "onnx")]
            AnyBackend::Onnx(m) => m.onnx.capabilities(),
        }
    }

    fn cost(&self, record: &Value) -> ItemCost {
        match self {
            #[cfg(feature = "embedded")]
            AnyBackend::Embedded(b) => text(record).map(|t| b.cost(&t)).unwrap_or_default(),
            AnyBackend::Sim(b) => b.cost(record),
            AnyBackend::Kserve(b) => b.cost(record),
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(b) => b.cost(record),
            AnyBackend::Embeddings(b) => text(record).map(|t| b.cost(&t)).unwrap_or_default(),
            AnyBackend::Chat(b) if b.is_pipeline() => ItemCost {
                bytes: record.to_string().len() as u64,
                tokens: b
                    .prompt_tokens(record)
                    .saturating_add(u64::from(b.max_completion_tokens().unwrap_or(0))),
            },
            AnyBackend::Chat(b) => match record {
                r if is_chat_request(r) => ItemCost {
                    bytes: record.to_string().len() as u64,
                    tokens: flumen_openai::request_tokens(record),
                },
                _ => text(record).map(|t| b.cost(&t)).unwrap_or_default(),
            },
            AnyBackend::Http(b) => b.cost(record),
            #[cfg(feature = "onnx")]
            AnyBackend::Onnx(_) => flumen_core::http::json_cost(record),
        }
    }

    /// A whole chat request is billed its messages; its completion budget, which
    /// its cost counts for the rate limits, is output (below).
    fn billed_input_tokens(&self, record: &Value) -> Option<u64> {
        match self {
            AnyBackend::Chat(b) if b.is_pipeline() => Some(b.prompt_tokens(record)),
            AnyBackend::Chat(_) if is_chat_request(record) => Some(
                flumen_openai::request_tokens(record)
                    .saturating_sub(flumen_openai::completion_budget(record)),
            ),
            _ => None,
        }
    }

    /// A chat answer may cost its completion budget: the request's (`max_tokens` or
    /// `max_completion_tokens`, times `n`), else the configured one.
    fn max_output_tokens(&self, record: &Value) -> u64 {
        match self {
            // A pipeline's record may take a repair request too.
            AnyBackend::Chat(b) if b.is_pipeline() => {
                u64::from(b.max_completion_tokens().unwrap_or(0)) * (1 + u64::from(b.max_repairs()))
            }
            AnyBackend::Chat(b) => {
                let configured = u64::from(b.max_completion_tokens().unwrap_or(0));
                match flumen_openai::completion_budget(record) {
                    0 => configured,
                    asked => asked,
                }
            }
            _ => 0,
        }
    }

    /// A chat answer's completion tokens: as the API reported them for a whole
    /// request, estimated from the text for a text record. Other backends' answers
    /// cost no output tokens.
    fn output_tokens(&self, prediction: &Value) -> u64 {
        match (self, prediction) {
            (AnyBackend::Chat(_), Value::String(text)) => flumen_openai::estimate_tokens(text),
            (AnyBackend::Chat(_), answer) => answer
                .pointer("/usage/completion_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// The record as JSON text (so an object's keys count in their order). Whether
    /// it is used is `[cache]`'s decision, per backend kind.
    fn cache_key(&self, record: &Value) -> Option<Vec<u8>> {
        serde_json::to_vec(record).ok()
    }

    fn encode_output(&self, prediction: &Value) -> Option<Vec<u8>> {
        serde_json::to_vec(prediction).ok()
    }

    fn decode_output(&self, bytes: &[u8]) -> Option<Value> {
        serde_json::from_slice(bytes).ok()
    }

    async fn call(&self, batch: &[Value]) -> BatchResult<Value> {
        match self {
            #[cfg(feature = "embedded")]
            AnyBackend::Embedded(b) => on_text(b, batch, vector).await,
            AnyBackend::Sim(b) => b.call(batch).await,
            AnyBackend::Kserve(b) => b.call(batch).await,
            #[cfg(feature = "grpc")]
            AnyBackend::KserveGrpc(b) => b.call(batch).await,
            AnyBackend::Embeddings(b) => on_text(b, batch, vector).await,
            // A whole chat request (an object) goes as it is; text, as the user message.
            // One record per call (as the engine sends them): its failure is the
            // call's, so the engine sees overload and timeouts as such.
            // A pipeline's record: a bad record or a bad answer fails it alone; the
            // rest (overload, outage, timeouts) is the call's.
            AnyBackend::Chat(b) if b.is_pipeline() => {
                let mut out = Vec::with_capacity(batch.len());
                for record in batch {
                    out.push(match b.record(record).await {
                        Err(e)
                            if !matches!(
                                e.kind,
                                ErrorKind::InvalidInput | ErrorKind::InvalidOutput
                            ) && batch.len() == 1 =>
                        {
                            return Err(e)
                        }
                        result => result,
                    });
                }
                Ok(out)
            }
            AnyBackend::Chat(b) if matches!(batch, [r] if is_chat_request(r)) => {
                Ok(vec![Ok(b.request(&batch[0]).await?)])
            }
            AnyBackend::Chat(b) if batch.iter().any(is_chat_request) => {
                let mut out = Vec::with_capacity(batch.len());
                for record in batch {
                    out.push(match record {
                        r if is_chat_request(r) => b.request(record).await,
                        _ => on_text(b, std::slice::from_ref(record), Value::String)
                            .await?
                            .pop()
                            .expect("one result"),
                    });
                }
                Ok(out)
            }
            AnyBackend::Chat(b) => on_text(b, batch, Value::String).await,
            AnyBackend::Http(b) => b.call(batch).await,
            #[cfg(feature = "onnx")]
            AnyBackend::Onnx(m) => m.onnx.call(batch).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_is_billed_its_messages_and_may_cost_its_completion_budget() {
        let mut config = flumen_openai::OpenAiConfig::new("http://127.0.0.1:9/v1", "m");
        config.max_completion_tokens = Some(50);
        let chat = AnyBackend::Chat(flumen_openai::Chat::new(config).unwrap());
        let request = serde_json::json!({
            "messages": [{"role": "user", "content": "hello there, how are you today?"}],
            "max_tokens": 100,
            "n": 2
        });
        let messages = flumen_openai::estimate_tokens(&request["messages"].to_string());
        // The cost (for rate limits) counts the completion budget; the bill does not.
        assert_eq!(chat.cost(&request).tokens, messages + 200);
        assert_eq!(chat.billed_input_tokens(&request), Some(messages));
        assert_eq!(chat.max_output_tokens(&request), 200);
        // A text record: billed as its cost; its answer may cost the configured 50.
        let text = Value::from("hello");
        assert_eq!(chat.billed_input_tokens(&text), None);
        assert_eq!(chat.max_output_tokens(&text), 50);
        let answer = serde_json::json!({"usage": {"completion_tokens": 17}});
        assert_eq!(chat.output_tokens(&answer), 17);
    }

    #[test]
    fn vectors_are_written_short_and_read_back_exactly() {
        let xs = [-0.018_750_638_f32, 1.0, 0.1, 3.402_823_5e38, -1.0e-40, 0.0];
        let text = serde_json::to_string(&vector(xs.to_vec())).unwrap();
        assert!(text.starts_with("[-0.018750638,1.0,0.1,"), "{text}");
        let back: Vec<f32> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, xs, "every f32 survives the round trip");
    }
}
