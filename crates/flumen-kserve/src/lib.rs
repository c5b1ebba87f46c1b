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
//! fails alone, as invalid input, without being sent. Not yet here: gRPC and the
//! binary tensor extension.

pub mod server;

use std::time::Duration;

use flumen_core::http::{classify_status, parse_retry_after};
use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ErrorKind, ItemCost};
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

    /// Elements per row, when the shape is fixed.
    fn row_len(&self) -> Option<usize> {
        self.row_shape
            .iter()
            .try_fold(1usize, |n, d| usize::try_from(*d).ok().map(|d| n * d))
    }
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

    /// A record's elements, checked against the input's datatype and row shape.
    fn elements(&self, row: &Value) -> Result<Vec<Value>, String> {
        let mut flat = Vec::new();
        fn walk(v: &Value, out: &mut Vec<Value>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                x => out.push(x.clone()),
            }
        }
        walk(row, &mut flat);
        let bytes = self.input.datatype == "BYTES";
        let bool_type = self.input.datatype == "BOOL";
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
                    self.input.name, self.input.datatype
                ));
            }
        }
        if let Some(n) = self.input.row_len() {
            if flat.len() != n {
                return Err(format!(
                    "input `{}` takes {n} element(s) per row (shape {:?}), the record has {}",
                    self.input.name,
                    self.input.row_shape,
                    flat.len()
                ));
            }
        }
        Ok(flat)
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
        ItemCost {
            bytes: row.to_string().len() as u64,
            tokens: 0,
        }
    }

    async fn call(&self, batch: &[Value]) -> BatchResult<Value> {
        let mut results: Vec<Option<Result<Value, BackendError>>> = vec![None; batch.len()];
        let mut data = Vec::new();
        let mut rows = Vec::new();
        for (i, row) in batch.iter().enumerate() {
            match self.elements(row) {
                Ok(flat) => {
                    data.extend(flat);
                    rows.push(i);
                }
                Err(why) => results[i] = Some(Err(BackendError::invalid_input(why))),
            }
        }
        if !rows.is_empty() {
            let mut shape: Vec<i64> = self.input.row_shape.clone();
            if self.input.row_len().is_none() {
                // A variable dimension: infer it from the elements.
                let known: i64 = shape.iter().filter(|d| **d > 0).product();
                let per_row = data.len() as i64 / rows.len() as i64;
                for d in shape.iter_mut().filter(|d| **d < 0) {
                    *d = per_row / known.max(1);
                }
            }
            if self.batched {
                shape.insert(0, rows.len() as i64);
            }
            let body = json!({
                "inputs": [{"name": self.input.name, "shape": shape, "datatype": self.input.datatype, "data": data}],
                "outputs": [{"name": self.output.name}],
            });
            let url = format!("{}/infer", self.config.model_path());
            let response = self.http.post(&url).json(&body).send().await.map_err(|e| {
                let kind = if e.is_timeout() {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Transient
                };
                BackendError::new(kind, format!("infer request failed: {e}"))
            })?;
            let status = response.status();
            if !status.is_success() {
                let ra = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let text = response.text().await.unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or(text);
                let kind = classify_status(status.as_u16(), &message);
                let mut e = BackendError::new(kind, format!("HTTP {}: {message}", status.as_u16()));
                if kind == ErrorKind::Overloaded {
                    e.retry_after = parse_retry_after(ra.as_deref(), None);
                }
                return Err(e);
            }
            let answer: Value = response
                .json()
                .await
                .map_err(|e| BackendError::permanent(format!("unparseable infer response: {e}")))?;
            let out = answer
                .get("outputs")
                .and_then(Value::as_array)
                .and_then(|o| o.iter().find(|t| t["name"] == self.output.name.as_str()))
                .ok_or_else(|| {
                    BackendError::permanent(format!(
                        "the response has no output `{}`",
                        self.output.name
                    ))
                })?;
            let flat = out.get("data").and_then(Value::as_array).ok_or_else(|| {
                BackendError::permanent(
                    "the output has no JSON `data` (binary outputs are not supported yet)",
                )
            })?;
            if flat.len() % rows.len() != 0 {
                return Err(BackendError::permanent(format!(
                    "{} output elements do not split into {} rows",
                    flat.len(),
                    rows.len()
                )));
            }
            let per_row = flat.len() / rows.len();
            for (k, i) in rows.into_iter().enumerate() {
                let chunk = &flat[k * per_row..(k + 1) * per_row];
                let value = if per_row == 1 {
                    chunk[0].clone()
                } else {
                    Value::Array(chunk.to_vec())
                };
                results[i] = Some(Ok(value));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every row has a result"))
            .collect())
    }
}
