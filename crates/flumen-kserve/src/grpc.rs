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
use crate::{finish, Batch, KserveConfig, KserveError, Signature, TensorSpec};

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
    sig: Signature,
    max_batch: usize,
    /// The model's metadata, in the shape of KServe v2's HTTP answer.
    metadata: Value,
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
        // The named tensor, else every one of the list.
        let pick = |list: &[proto::model_metadata_response::TensorMetadata],
                    name: &Option<String>,
                    what: &str|
         -> Result<Vec<TensorSpec>, KserveError> {
            let chosen: Vec<TensorSpec> = list
                .iter()
                .filter(|t| name.as_ref().is_none_or(|n| &t.name == n))
                .map(spec)
                .collect();
            if chosen.is_empty() {
                return Err(KserveError(format!("the model has no {what} {name:?}")));
            }
            Ok(chosen)
        };
        let sig = Signature {
            inputs: pick(&meta.inputs, &config.input, "input")?,
            outputs: pick(&meta.outputs, &config.output, "output")?,
            batched,
        };
        let tensors = |list: &[proto::model_metadata_response::TensorMetadata]| -> Vec<Value> {
            list.iter()
                .map(|t| serde_json::json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
                .collect()
        };
        let metadata = serde_json::json!({
            "name": meta.name, "versions": meta.versions, "platform": meta.platform,
            "inputs": tensors(&meta.inputs), "outputs": tensors(&meta.outputs),
        });
        Ok(KserveGrpc {
            client,
            max_batch: if batched {
                config.max_batch_items.unwrap_or(1)
            } else {
                1
            },
            config,
            sig,
            metadata,
        })
    }

    /// The tensors records fill and predictions come from.
    pub fn signature(&self) -> &Signature {
        &self.sig
    }

    /// The model's metadata, in the shape of KServe v2's HTTP answer.
    pub fn metadata(&self) -> &Value {
        &self.metadata
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
        let Some(batch) = Batch::assemble(&self.sig, records, &mut results) else {
            return Ok(finish(results));
        };
        let inputs = self
            .sig
            .inputs
            .iter()
            .zip(&batch.inputs)
            .map(|(t, (data, shape))| {
                Ok(InferInputTensor {
                    name: t.name.clone(),
                    datatype: t.datatype.clone(),
                    shape: shape.clone(),
                    contents: Some(contents(&t.datatype, data)?),
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let mut request = ModelInferRequest {
            model_name: self.config.model.clone(),
            model_version: self.config.version.clone().unwrap_or_default(),
            inputs,
            outputs: self
                .sig
                .outputs
                .iter()
                .map(|t| InferRequestedOutputTensor {
                    name: t.name.clone(),
                    ..Default::default()
                })
                .collect(),
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
        let flats = self
            .sig
            .outputs
            .iter()
            .map(|t| {
                let (i, out) = response
                    .outputs
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.name == t.name)
                    .ok_or_else(|| {
                        BackendError::permanent(format!("the response has no output `{}`", t.name))
                    })?;
                Ok(match response.raw_output_contents.get(i) {
                    Some(raw) => decode_raw(&out.datatype, raw)?,
                    None => typed(
                        out.contents
                            .as_ref()
                            .unwrap_or(&InferTensorContents::default()),
                    ),
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        batch.split(&self.sig, &flats, &mut results)?;
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
