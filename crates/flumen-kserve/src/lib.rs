//! KServe v2 (Open Inference Protocol) / Triton backend over HTTP JSON.
//!
//! [`KserveHttp::connect`] waits for the server and the model to be ready, reads the
//! model's metadata (its input and output tensors, their datatypes and shapes) and,
//! from Triton's configuration extension, its `max_batch_size`. Each record is one
//! row of the batch: for a model of one input (or with `input` named), a JSON
//! number, string (for `BYTES`) or array with the row's shape; for several inputs,
//! an object with such a row for each, by name. The prediction is the matching row
//! of the output (or of `output` when named); of several outputs, an object with
//! each output's row by name (see [`Signature`]).
//!
//! Errors map through [`flumen_core::http::classify_status`]: 429 and 503 (Triton's
//! queue full) are overload, other 5xx transient, 4xx (unknown model, wrong shape or
//! datatype) permanent. A record that does not fit the input's shape or datatype
//! fails alone, as invalid input, without being sent. With the `grpc` feature,
//! [`grpc::KserveGrpc`] speaks the same protocol over gRPC. Large batches use
//! the binary tensor extension over HTTP (see [`KserveConfig::binary_threshold`]).

#[cfg(feature = "grpc")]
pub mod grpc;
pub mod raw;
#[cfg(feature = "test-support")]
pub mod server;
mod tensor;

pub(crate) use tensor::{finish, Batch};
pub use tensor::{Signature, TensorSpec};

use std::time::Duration;

use flumen_core::http::{json_cost, send};
use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use serde_json::{json, Value};
use tokio::time::Instant;

/// Settings of a [`KserveHttp`] backend.
#[derive(Debug, Clone, PartialEq)]
pub struct KserveConfig {
    /// The server's root, e.g. `http://127.0.0.1:8000`.
    pub base_url: String,
    /// The model's name.
    pub model: String,
    /// A model version, or the server's choice.
    pub version: Option<String>,
    /// The one input tensor to fill (default: every input of the model).
    pub input: Option<String>,
    /// The one output tensor to read (default: every output of the model).
    pub output: Option<String>,
    /// Rows per request at most (default: the model's `max_batch_size`).
    pub max_batch_items: Option<usize>,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// How long [`KserveHttp::connect`] waits for the server and model to be ready.
    pub ready_timeout: Duration,
    /// Request priority passed to the server (Triton: `priority`, 1 is highest).
    pub priority: Option<u64>,
    /// HTTP: batches of at least this many elements travel as binary tensors (the
    /// binary tensor extension), both ways; `None`: always JSON.
    pub binary_threshold: Option<usize>,
}

impl KserveConfig {
    /// Defaults for `model` on the server at `base_url`.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        KserveConfig {
            base_url: base_url.into(),
            model: model.into(),
            version: None,
            input: None,
            output: None,
            max_batch_items: None,
            request_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(60),
            priority: None,
            binary_threshold: Some(4_096),
        }
    }

    fn model_path(&self) -> String {
        let root = self.base_url.trim_end_matches('/');
        match &self.version {
            Some(v) => format!("{root}/v2/models/{}/versions/{v}", self.model),
            None => format!("{root}/v2/models/{}", self.model),
        }
    }
}

/// Why a backend could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KserveError(pub String);

impl std::fmt::Display for KserveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KserveError {}

/// A KServe v2 model served over HTTP with JSON tensors.
pub struct KserveHttp {
    http: reqwest::Client,
    config: KserveConfig,
    sig: Signature,
    max_batch: usize,
    /// The model's metadata as the server gave it.
    metadata: Value,
    /// The model's configuration (Triton's extension), when the server has it.
    model_config: Option<Value>,
}

impl KserveHttp {
    /// Waits until the server and the model are ready (up to `ready_timeout`), then
    /// reads the model's metadata.
    pub async fn connect(config: KserveConfig) -> Result<Self, KserveError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| KserveError(format!("cannot build the HTTP client: {e}")))?;
        let root = config.base_url.trim_end_matches('/').to_owned();
        let model = config.model_path();
        let deadline = Instant::now() + config.ready_timeout;
        let mut last;
        loop {
            let ready = async {
                let server = http.get(format!("{root}/v2/health/ready")).send().await?;
                if !server.status().is_success() {
                    return Ok::<_, reqwest::Error>(Err(format!(
                        "server not ready ({})",
                        server.status()
                    )));
                }
                let m = http.get(format!("{model}/ready")).send().await?;
                Ok(if m.status().is_success() {
                    Ok(())
                } else {
                    Err(format!(
                        "model `{}` not ready ({}): {}",
                        config.model,
                        m.status(),
                        m.text().await.unwrap_or_default()
                    ))
                })
            };
            match ready.await {
                Ok(Ok(())) => break,
                Ok(Err(why)) => last = why,
                Err(e) => last = format!("cannot reach {root}: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(KserveError(format!(
                    "not ready after {:?}: {last}",
                    config.ready_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let get = |url: String| {
            let http = http.clone();
            async move {
                let r = http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| KserveError(format!("GET {url}: {e}")))?;
                let status = r.status();
                let body: Value = r
                    .json()
                    .await
                    .map_err(|e| KserveError(format!("GET {url}: unparseable: {e}")))?;
                Ok::<_, KserveError>((status.is_success(), body))
            }
        };
        let (ok, meta) = get(model.clone()).await?;
        if !ok {
            return Err(KserveError(format!("model metadata: {meta}")));
        }
        // Triton's configuration extension says whether the model batches.
        let (has_config, model_config) = get(format!("{model}/config")).await?;
        let server_max = has_config
            .then(|| model_config.get("max_batch_size").and_then(Value::as_u64))
            .flatten()
            .map(|m| m as usize);
        let batched = server_max.is_some_and(|m| m > 0);
        // The named tensor, else every one of the list.
        let pick = |list: &str, name: &Option<String>| -> Result<Vec<TensorSpec>, KserveError> {
            let tensors = meta
                .get(list)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let chosen: Vec<&Value> = match name {
                Some(n) => tensors.iter().filter(|t| t["name"] == n.as_str()).collect(),
                None => tensors.iter().collect(),
            };
            if chosen.is_empty() {
                return Err(KserveError(format!(
                    "the model has no such tensor among its {list}: {name:?}"
                )));
            }
            chosen
                .into_iter()
                .map(|t| {
                    TensorSpec::from_metadata(t, batched)
                        .ok_or_else(|| KserveError(format!("unparseable tensor metadata: {t}")))
                })
                .collect()
        };
        let sig = Signature {
            inputs: pick("inputs", &config.input)?,
            outputs: pick("outputs", &config.output)?,
            batched,
        };
        let max_batch = match (config.max_batch_items, server_max) {
            (Some(c), Some(s)) if s > 0 => c.min(s),
            (Some(c), _) => c,
            (None, Some(s)) if s > 0 => s,
            _ => 1,
        };
        if !batched && max_batch > 1 {
            return Err(KserveError(format!(
                "model `{}` does not batch (max_batch_size 0): max_batch_items must be 1",
                config.model
            )));
        }
        Ok(KserveHttp {
            http,
            config,
            sig,
            max_batch: max_batch.max(1),
            metadata: meta,
            model_config: has_config.then_some(model_config),
        })
    }

    /// The tensors records fill and predictions come from.
    pub fn signature(&self) -> &Signature {
        &self.sig
    }

    /// The model's metadata as the server gave it (`GET /v2/models/{model}`).
    pub fn metadata(&self) -> &Value {
        &self.metadata
    }

    /// The model's configuration (Triton's `GET /v2/models/{model}/config`), when
    /// the server has that extension.
    pub fn model_config(&self) -> Option<&Value> {
        self.model_config.as_ref()
    }

    /// Rows per request at most.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

impl Backend for KserveHttp {
    type Input = Value;
    type Output = Value;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: self.max_batch,
            ..Capabilities::default()
        }
    }

    fn cost(&self, row: &Value) -> ItemCost {
        json_cost(row)
    }

    async fn call(&self, records: &[Value]) -> BatchResult<Value> {
        let mut results = vec![None; records.len()];
        let Some(mut batch) = Batch::assemble(&self.sig, records, &mut results) else {
            return Ok(finish(results));
        };
        // Large batches use the binary tensor extension both ways.
        let elements: usize = batch.inputs.iter().map(|(d, _)| d.len()).sum();
        let binary = self.config.binary_threshold.is_some_and(|t| elements >= t);
        let mut inputs = Vec::with_capacity(self.sig.inputs.len());
        let mut raws = Vec::new();
        for (t, (data, shape)) in self.sig.inputs.iter().zip(&mut batch.inputs) {
            let mut input = json!({"name": t.name, "shape": shape, "datatype": t.datatype});
            if binary {
                let raw = raw::encode_raw(&t.datatype, data)?;
                input["parameters"] = json!({"binary_data_size": raw.len()});
                raws.push(raw);
            } else {
                input["data"] = Value::Array(std::mem::take(data));
            }
            inputs.push(input);
        }
        let outputs: Vec<Value> = self
            .sig
            .outputs
            .iter()
            .map(|t| {
                if binary {
                    json!({"name": t.name, "parameters": {"binary_data": true}})
                } else {
                    json!({"name": t.name})
                }
            })
            .collect();
        let mut header = json!({"inputs": inputs, "outputs": outputs});
        // Triton's per-request timeout (µs): the server gives up when we do.
        header["parameters"] = json!({"timeout": self.config.request_timeout.as_micros() as u64});
        if let Some(p) = self.config.priority {
            header["parameters"]["priority"] = json!(p);
        }
        let url = format!("{}/infer", self.config.model_path());
        let request = if binary {
            let mut body = serde_json::to_vec(&header).expect("JSON serializes");
            let header_len = body.len();
            for raw in raws {
                body.extend(raw);
            }
            self.http
                .post(&url)
                .header("Inference-Header-Content-Length", header_len)
                .header("Content-Type", "application/octet-stream")
                .body(body)
        } else {
            self.http.post(&url).json(&header)
        };
        let response = send(request, "infer request").await?;
        let header_len = response
            .headers()
            .get("inference-header-content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let bytes = response.bytes().await.map_err(|e| {
            BackendError::transient(format!("reading the infer response failed: {e}"))
        })?;
        let split_at = header_len.unwrap_or(bytes.len()).min(bytes.len());
        let (json_part, mut binary_part) = bytes.split_at(split_at);
        let answer: Value = serde_json::from_slice(json_part)
            .map_err(|e| BackendError::permanent(format!("unparseable infer response: {e}")))?;
        let answered = answer
            .get("outputs")
            .and_then(Value::as_array)
            .ok_or_else(|| BackendError::permanent("the response has no `outputs`"))?;
        let mut flats: Vec<Option<Vec<Value>>> = vec![None; self.sig.outputs.len()];
        for out in answered {
            let size = out
                .pointer("/parameters/binary_data_size")
                .and_then(Value::as_u64);
            let raw = match size {
                Some(n) if n as usize <= binary_part.len() => {
                    let (this, rest) = binary_part.split_at(n as usize);
                    binary_part = rest;
                    Some(this)
                }
                Some(_) => return Err(BackendError::permanent("truncated binary output")),
                None => None,
            };
            let Some(k) = self
                .sig
                .outputs
                .iter()
                .position(|t| out["name"] == t.name.as_str())
            else {
                continue;
            };
            let datatype = out["datatype"]
                .as_str()
                .unwrap_or(&self.sig.outputs[k].datatype);
            flats[k] = Some(match raw {
                Some(raw) => raw::decode_raw(datatype, raw)?,
                None => out
                    .get("data")
                    .and_then(Value::as_array)
                    .cloned()
                    .ok_or_else(|| {
                        BackendError::permanent("the output has neither `data` nor binary data")
                    })?,
            });
        }
        let flats = flats
            .into_iter()
            .zip(&self.sig.outputs)
            .map(|(f, t)| {
                f.ok_or_else(|| {
                    BackendError::permanent(format!("the response has no output `{}`", t.name))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        batch.split(&self.sig, &flats, &mut results)?;
        Ok(finish(results))
    }
}
