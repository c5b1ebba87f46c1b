//! KServe v2 (Open Inference Protocol) / Triton backend over HTTP JSON.
//!
//! [`KserveHttp::connect`] waits for the server and the model to be ready, reads the
//! model's metadata (its input and output tensors, their datatypes and shapes) and,
//! from Triton's configuration extension, its `max_batch_size`. Each record is one
//! row of the batch tensor: a JSON number, string (for `BYTES`) or array with the
//! row's shape; the prediction is the matching row of the output tensor.
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
    /// The input tensor to fill (default: the model's only input).
    pub input: Option<String>,
    /// The output tensor to read (default: the model's first output).
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

/// A tensor as the model's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name.
    pub name: String,
    /// `FP32`, `INT64`, `BYTES`, …
    pub datatype: String,
    /// The shape of one row (the metadata's shape without the batch dimension).
    pub row_shape: Vec<i64>,
}

impl TensorSpec {
    fn from_metadata(v: &Value, batched: bool) -> Option<TensorSpec> {
        let shape: Vec<i64> = v
            .get("shape")?
            .as_array()?
            .iter()
            .map(Value::as_i64)
            .collect::<Option<_>>()?;
        let row_shape = if batched {
            shape.get(1..)?.to_vec()
        } else {
            shape
        };
        Some(TensorSpec {
            name: v.get("name")?.as_str()?.to_owned(),
            datatype: v.get("datatype")?.as_str()?.to_owned(),
            row_shape,
        })
    }

    /// A record's elements, flattened and checked against this tensor's datatype
    /// and row shape.
    pub fn row_elements(&self, row: &Value) -> Result<Vec<Value>, String> {
        let mut flat = Vec::new();
        fn walk(v: &Value, out: &mut Vec<Value>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                x => out.push(x.clone()),
            }
        }
        walk(row, &mut flat);
        let bytes = self.datatype == "BYTES";
        let bool_type = self.datatype == "BOOL";
        for x in &flat {
            let fits = if bytes {
                x.is_string()
            } else if bool_type {
                x.is_boolean()
            } else {
                x.is_number()
            };
            if !fits {
                return Err(format!(
                    "input `{}` is {}: {x} does not fit",
                    self.name, self.datatype
                ));
            }
        }
        if let Some(n) = self.row_len() {
            if flat.len() != n {
                return Err(format!(
                    "input `{}` takes {n} element(s) per row (shape {:?}), the record has {}",
                    self.name,
                    self.row_shape,
                    flat.len()
                ));
            }
        }
        Ok(flat)
    }

    /// Elements per row, when the shape is fixed.
    pub(crate) fn row_len(&self) -> Option<usize> {
        self.row_shape
            .iter()
            .try_fold(1usize, |n, d| usize::try_from(*d).ok().map(|d| n * d))
    }
}

/// One result slot per record of a call.
pub(crate) type Slots = Vec<Option<Result<Value, BackendError>>>;

/// The records of a call that fit the input tensor, as one batch tensor.
pub(crate) struct Batch {
    /// Positions of the records in the call.
    pub(crate) rows: Vec<usize>,
    /// Their elements, flattened.
    pub(crate) data: Vec<Value>,
    /// The batch tensor's shape.
    pub(crate) shape: Vec<i64>,
}

impl Batch {
    /// Flattens the records that fit `input`; those that do not get an invalid-input
    /// result in `results`. `None` when no record fits.
    pub(crate) fn assemble(
        input: &TensorSpec,
        batched: bool,
        records: &[Value],
        results: &mut Slots,
    ) -> Option<Batch> {
        let (mut rows, mut data) = (Vec::new(), Vec::new());
        for (i, row) in records.iter().enumerate() {
            match input.row_elements(row) {
                Ok(flat) => {
                    data.extend(flat);
                    rows.push(i);
                }
                Err(why) => results[i] = Some(Err(BackendError::invalid_input(why))),
            }
        }
        if rows.is_empty() {
            return None;
        }
        let mut shape = input.row_shape.clone();
        if input.row_len().is_none() {
            // A variable dimension: infer it from the elements.
            let known: i64 = shape.iter().filter(|d| **d > 0).product();
            let per_row = data.len() as i64 / rows.len() as i64;
            for d in shape.iter_mut().filter(|d| **d < 0) {
                *d = per_row / known.max(1);
            }
        }
        if batched {
            shape.insert(0, rows.len() as i64);
        }
        Some(Batch { rows, data, shape })
    }

    /// Splits the output's flat elements back into one value per record.
    pub(crate) fn split(self, flat: &[Value], results: &mut Slots) -> Result<(), BackendError> {
        if !flat.len().is_multiple_of(self.rows.len()) {
            return Err(BackendError::permanent(format!(
                "{} output elements do not split into {} rows",
                flat.len(),
                self.rows.len()
            )));
        }
        let per_row = flat.len() / self.rows.len();
        for (k, i) in self.rows.into_iter().enumerate() {
            let chunk = &flat[k * per_row..(k + 1) * per_row];
            let value = if per_row == 1 {
                chunk[0].clone()
            } else {
                Value::Array(chunk.to_vec())
            };
            results[i] = Some(Ok(value));
        }
        Ok(())
    }
}

/// Every slot filled.
pub(crate) fn finish(results: Slots) -> Vec<Result<Value, BackendError>> {
    results
        .into_iter()
        .map(|r| r.expect("every record has a result"))
        .collect()
}

/// A KServe v2 model served over HTTP with JSON tensors.
pub struct KserveHttp {
    http: reqwest::Client,
    config: KserveConfig,
    input: TensorSpec,
    output: TensorSpec,
    max_batch: usize,
    /// Whether the model takes a batch dimension (Triton: `max_batch_size` > 0).
    batched: bool,
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
        let pick = |list: &str, name: &Option<String>| -> Result<TensorSpec, KserveError> {
            let tensors = meta
                .get(list)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let found = match name {
                Some(n) => tensors.iter().find(|t| t["name"] == n.as_str()),
                None if list == "inputs" && tensors.len() != 1 => {
                    return Err(KserveError(format!(
                        "the model has {} inputs: name one with `input`",
                        tensors.len()
                    )))
                }
                None => tensors.first(),
            };
            let found = found.ok_or_else(|| {
                KserveError(format!(
                    "the model has no such tensor among its {list}: {name:?}"
                ))
            })?;
            TensorSpec::from_metadata(found, batched)
                .ok_or_else(|| KserveError(format!("unparseable tensor metadata: {found}")))
        };
        let input = pick("inputs", &config.input)?;
        let output = pick("outputs", &config.output)?;
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
            input,
            output,
            max_batch: max_batch.max(1),
            batched,
        })
    }

    /// The input tensor records fill.
    pub fn input(&self) -> &TensorSpec {
        &self.input
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

    async fn call(&self, batch: &[Value]) -> BatchResult<Value> {
        let mut results = vec![None; batch.len()];
        let Some(mut batch) = Batch::assemble(&self.input, self.batched, batch, &mut results)
        else {
            return Ok(finish(results));
        };
        // Large batches use the binary tensor extension both ways.
        let binary = self
            .config
            .binary_threshold
            .is_some_and(|t| batch.data.len() >= t);
        let mut input =
            json!({"name": self.input.name, "shape": batch.shape, "datatype": self.input.datatype});
        let mut output = json!({"name": self.output.name});
        let raw = if binary {
            let raw = raw::encode_raw(&self.input.datatype, &batch.data)?;
            input["parameters"] = json!({"binary_data_size": raw.len()});
            output["parameters"] = json!({"binary_data": true});
            Some(raw)
        } else {
            input["data"] = Value::Array(std::mem::take(&mut batch.data));
            None
        };
        let mut header = json!({"inputs": [input], "outputs": [output]});
        // Triton's per-request timeout (µs): the server gives up when we do.
        header["parameters"] = json!({"timeout": self.config.request_timeout.as_micros() as u64});
        if let Some(p) = self.config.priority {
            header["parameters"]["priority"] = json!(p);
        }
        let url = format!("{}/infer", self.config.model_path());
        let request = match raw {
            Some(raw) => {
                let mut body = serde_json::to_vec(&header).expect("JSON serializes");
                let header_len = body.len();
                body.extend(raw);
                self.http
                    .post(&url)
                    .header("Inference-Header-Content-Length", header_len)
                    .header("Content-Type", "application/octet-stream")
                    .body(body)
            }
            None => self.http.post(&url).json(&header),
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
        let outputs = answer
            .get("outputs")
            .and_then(Value::as_array)
            .ok_or_else(|| BackendError::permanent("the response has no `outputs`"))?;
        let mut flat = None;
        for out in outputs {
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
            if out["name"] != self.output.name.as_str() {
                continue;
            }
            flat = Some(match raw {
                Some(raw) => raw::decode_raw(
                    out["datatype"].as_str().unwrap_or(&self.output.datatype),
                    raw,
                )?,
                None => out
                    .get("data")
                    .and_then(Value::as_array)
                    .cloned()
                    .ok_or_else(|| {
                        BackendError::permanent("the output has neither `data` nor binary data")
                    })?,
            });
        }
        let flat = flat.ok_or_else(|| {
            BackendError::permanent(format!("the response has no output `{}`", self.output.name))
        })?;
        batch.split(&flat, &mut results)?;
        Ok(finish(results))
    }
}
