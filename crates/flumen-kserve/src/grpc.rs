//! KServe v2 over gRPC (tonic, with our own `.proto`): the same records-as-rows
//! backend as over HTTP. Triton answers with `raw_output_contents`; both raw and
//! typed contents are read. gRPC status codes map to Flumen's error kinds:
//! `RESOURCE_EXHAUSTED` and `UNAVAILABLE` (Triton's queue full) are overload, with
//! `grpc-retry-pushback-ms` as their wait.

use std::time::Duration;

use flumen_core::http::json_cost;
use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ErrorKind, ItemCost};
use serde_json::Value;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;

use crate::raw::decode_raw;
use crate::{finish, Batch, KserveConfig, KserveError, TensorSpec};

/// The generated protocol types and client.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient as Client;
use proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use proto::{InferParameter, InferTensorContents, ModelInferRequest};

/// The error kind of a gRPC status.
pub fn classify_code(code: Code) -> ErrorKind {
    match code {
        Code::ResourceExhausted | Code::Unavailable => ErrorKind::Overloaded,
        Code::DeadlineExceeded => ErrorKind::Timeout,
        Code::Internal | Code::Unknown | Code::Aborted | Code::Cancelled | Code::DataLoss => {
            ErrorKind::Transient
        }
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidInput,
        Code::Ok
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Unimplemented
        | Code::Unauthenticated => ErrorKind::Permanent,
    }
}

fn backend_error(status: &tonic::Status) -> BackendError {
    let kind = classify_code(status.code());
    let mut e = BackendError::new(
        kind,
        format!("gRPC {:?}: {}", status.code(), status.message()),
    );
    if kind == ErrorKind::Overloaded {
        e.retry_after = status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
    }
    e
}

/// Typed contents of a batch's elements for `datatype`.
fn contents(datatype: &str, data: &[Value]) -> Result<InferTensorContents, BackendError> {
    let mut c = InferTensorContents::default();
    let num = |v: &Value| v.as_f64().unwrap_or_default();
    match datatype {
        "BOOL" => {
            c.bool_contents = data
                .iter()
                .map(|v| v.as_bool().unwrap_or_default())
                .collect()
        }
        "INT8" | "INT16" | "INT32" => c.int_contents = data.iter().map(|v| num(v) as i32).collect(),
        "INT64" => c.int64_contents = data.iter().map(|v| num(v) as i64).collect(),
        "UINT8" | "UINT16" | "UINT32" => {
            c.uint_contents = data.iter().map(|v| num(v) as u32).collect()
        }
        "UINT64" => c.uint64_contents = data.iter().map(|v| num(v) as u64).collect(),
        "FP32" => c.fp32_contents = data.iter().map(|v| num(v) as f32).collect(),
        "FP64" => c.fp64_contents = data.iter().map(num).collect(),
        "BYTES" => {
            c.bytes_contents = data
                .iter()
                .map(|v| v.as_str().unwrap_or_default().as_bytes().to_vec())
                .collect()
        }
        other => {
            return Err(BackendError::permanent(format!(
                "datatype {other} is not supported over gRPC yet"
            )))
        }
    }
    Ok(c)
}

/// The elements of typed (non-raw) tensor contents.
pub fn typed(c: &InferTensorContents) -> Vec<Value> {
    let mut out: Vec<Value> = c.bool_contents.iter().map(|b| Value::Bool(*b)).collect();
    out.extend(c.int_contents.iter().map(|x| Value::from(*x)));
    out.extend(c.int64_contents.iter().map(|x| Value::from(*x)));
    out.extend(c.uint_contents.iter().map(|x| Value::from(*x)));
    out.extend(c.uint64_contents.iter().map(|x| Value::from(*x)));
    out.extend(c.fp32_contents.iter().map(|x| Value::from(f64::from(*x))));
    out.extend(c.fp64_contents.iter().map(|x| Value::from(*x)));
    out.extend(
        c.bytes_contents
            .iter()
            .map(|b| Value::String(String::from_utf8_lossy(b).into_owned())),
    );
    out
}

/// A KServe v2 model served over gRPC.
pub struct KserveGrpc {
    client: Client<Channel>,
    config: KserveConfig,
    input: TensorSpec,
    output: TensorSpec,
    max_batch: usize,
    batched: bool,
}

impl KserveGrpc {
    /// Connects to `config.base_url` (e.g. `http://127.0.0.1:8001`), waits until the
    /// server and model are ready, and reads the model's metadata. The protocol
    /// does not expose `max_batch_size`: for a model whose shapes start with a
    /// variable batch dimension, set `max_batch_items`.
    pub async fn connect(config: KserveConfig) -> Result<Self, KserveError> {
        let endpoint = Channel::from_shared(config.base_url.clone())
            .map_err(|e| KserveError(format!("base_url: {e}")))?
            .timeout(config.request_timeout);
        let deadline = Instant::now() + config.ready_timeout;
        let version = config.version.clone().unwrap_or_default();
        let mut client = loop {
            let last = match endpoint.connect().await {
                Ok(channel) => {
                    let mut client = Client::new(channel);
                    let server = client.server_ready(proto::ServerReadyRequest {}).await;
                    let model = client
                        .model_ready(proto::ModelReadyRequest {
                            name: config.model.clone(),
                            version: version.clone(),
                        })
                        .await;
                    match (server, model) {
                        (Ok(s), Ok(m)) if s.get_ref().ready && m.get_ref().ready => break client,
                        (_, Err(e)) => format!("model `{}`: {}", config.model, e.message()),
                        _ => format!("model `{}` not ready", config.model),
                    }
                }
                Err(e) => format!("cannot reach {}: {e}", config.base_url),
            };
            if Instant::now() >= deadline {
                return Err(KserveError(format!(
                    "not ready after {:?}: {last}",
                    config.ready_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let meta = client
            .model_metadata(proto::ModelMetadataRequest {
                name: config.model.clone(),
                version,
            })
            .await
            .map_err(|e| KserveError(format!("model metadata: {}", e.message())))?
            .into_inner();
        let batched = config.max_batch_items.is_some_and(|n| n > 1)
            && meta.inputs.first().and_then(|t| t.shape.first()) == Some(&-1);
        let spec = |t: &proto::model_metadata_response::TensorMetadata| TensorSpec {
            name: t.name.clone(),
            datatype: t.datatype.clone(),
            row_shape: if batched {
                t.shape.get(1..).unwrap_or_default().to_vec()
            } else {
                t.shape.clone()
            },
        };
        let input = match &config.input {
            Some(name) => meta.inputs.iter().find(|t| &t.name == name),
            None if meta.inputs.len() == 1 => meta.inputs.first(),
            None => {
                return Err(KserveError(format!(
                    "the model has {} inputs: name one with `input`",
                    meta.inputs.len()
                )))
            }
        }
        .map(spec)
        .ok_or_else(|| KserveError(format!("the model has no input {:?}", config.input)))?;
        let output = match &config.output {
            Some(name) => meta.outputs.iter().find(|t| &t.name == name),
            None => meta.outputs.first(),
        }
        .map(spec)
        .ok_or_else(|| KserveError(format!("the model has no output {:?}", config.output)))?;
        Ok(KserveGrpc {
            client,
            max_batch: if batched {
                config.max_batch_items.unwrap_or(1)
            } else {
                1
            },
            config,
            input,
            output,
            batched,
        })
    }

    /// The input tensor records fill.
    pub fn input(&self) -> &TensorSpec {
        &self.input
    }
}

impl Backend for KserveGrpc {
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
        let Some(batch) = Batch::assemble(&self.input, self.batched, records, &mut results) else {
            return Ok(finish(results));
        };
        let mut request = ModelInferRequest {
            model_name: self.config.model.clone(),
            model_version: self.config.version.clone().unwrap_or_default(),
            inputs: vec![InferInputTensor {
                name: self.input.name.clone(),
                datatype: self.input.datatype.clone(),
                shape: batch.shape.clone(),
                contents: Some(contents(&self.input.datatype, &batch.data)?),
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: self.output.name.clone(),
                ..Default::default()
            }],
            ..Default::default()
        };
        if let Some(p) = self.config.priority {
            request.parameters.insert(
                "priority".into(),
                InferParameter {
                    parameter_choice: Some(proto::infer_parameter::ParameterChoice::Uint64Param(p)),
                },
            );
        }
        let mut request = tonic::Request::new(request);
        // Sent as `grpc-timeout`: the server gives up when we do.
        request.set_timeout(self.config.request_timeout);
        let response = self
            .client
            .clone()
            .model_infer(request)
            .await
            .map_err(|s| backend_error(&s))?
            .into_inner();
        let (i, out) = response
            .outputs
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == self.output.name)
            .ok_or_else(|| {
                BackendError::permanent(format!(
                    "the response has no output `{}`",
                    self.output.name
                ))
            })?;
        let flat = match response.raw_output_contents.get(i) {
            Some(raw) => decode_raw(&out.datatype, raw)?,
            None => typed(
                out.contents
                    .as_ref()
                    .unwrap_or(&InferTensorContents::default()),
            ),
        };
        batch.split(&flat, &mut results)?;
        Ok(finish(results))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_full_is_overload_and_bad_requests_are_not_retried() {
        assert_eq!(classify_code(Code::Unavailable), ErrorKind::Overloaded);
        assert_eq!(
            classify_code(Code::ResourceExhausted),
            ErrorKind::Overloaded
        );
        assert_eq!(classify_code(Code::DeadlineExceeded), ErrorKind::Timeout);
        assert_eq!(classify_code(Code::Internal), ErrorKind::Transient);
        assert_eq!(
            classify_code(Code::InvalidArgument),
            ErrorKind::InvalidInput
        );
        assert_eq!(classify_code(Code::NotFound), ErrorKind::Permanent);
    }
}
