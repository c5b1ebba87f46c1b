//! KServe v2 over gRPC for `flumen serve` (with the `grpc` feature): the same models
//! and engines as over HTTP. Tensors come as typed contents or `raw_input_contents`
//! (what tritonclient sends) and go back as `raw_output_contents`; `grpc-timeout`
//! becomes the records' deadline; admission control answers `RESOURCE_EXHAUSTED`.

use std::sync::Arc;
use std::time::Duration;

use flumen_core::ErrorKind;
use flumen_kserve::grpc::proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use flumen_kserve::grpc::proto::model_infer_response::InferOutputTensor;
use flumen_kserve::grpc::proto::{self, model_metadata_response::TensorMetadata};
use flumen_kserve::grpc::typed;
use flumen_kserve::raw::{decode_raw, encode_raw};
use serde_json::Value;
use tonic::{Request, Response, Status};

use super::gateway::{Endpoint, Gateway, Model, Reason, Reject};
use super::tensors::Declared;
use super::tensors::Input;

/// The gRPC face of the gateway.
pub(crate) struct GrpcGateway(pub(crate) Arc<Gateway>);

impl GrpcGateway {
    /// The service, its requests bounded like HTTP bodies (`max_body_bytes`); its
    /// answers, like HTTP's, are not.
    pub(crate) fn service(self, max_bytes: usize) -> GrpcInferenceServiceServer<GrpcGateway> {
        GrpcInferenceServiceServer::new(self).max_decoding_message_size(max_bytes)
    }

    /// The model named, at the version asked for (empty: any), or NOT_FOUND.
    fn served(&self, name: &str, version: &str) -> Result<&Model, Status> {
        self.0
            .served(name, Some(version))
            .map_err(Status::not_found)
    }

    /// The bearer token from the call's `authorization` metadata, for `endpoint`.
    fn authorize<T>(&self, endpoint: Endpoint, r: &Request<T>) -> Result<(), Status> {
        let sent = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.0.check_access(endpoint, sent).map_err(status)
    }
}

/// `grpc-timeout`: an integer and a unit (H, M, S, m, u, n).
fn grpc_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The one mapping from a rejection's reason to a gRPC status.
fn status(r: Reject) -> Status {
    let message = r.message;
    match r.reason {
        Reason::Busy
        | Reason::Quota { .. }
        | Reason::Failed(ErrorKind::Overloaded | ErrorKind::BudgetExhausted) => {
            Status::resource_exhausted(message)
        }
        Reason::BadRequest => Status::invalid_argument(message),
        Reason::Unauthorized => Status::unauthenticated(message),
        Reason::UnknownModel => Status::not_found(message),
        Reason::NoInput | Reason::TooManyItems | Reason::Failed(ErrorKind::InvalidInput) => {
            Status::invalid_argument(message)
        }
        Reason::Failed(ErrorKind::Timeout) => Status::deadline_exceeded(message),
        Reason::Failed(ErrorKind::Transient | ErrorKind::Shutdown) => Status::unavailable(message),
        Reason::Failed(_) => Status::internal(message),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcGateway {
    async fn server_live(
        &self,
        r: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        self.authorize(Endpoint::Health, &r)?;
        Ok(Response::new(proto::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        r: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        self.authorize(Endpoint::Health, &r)?;
        // As `/health/ready`: not while a model's circuit breaker is open.
        let ready = self.0.open_circuits().is_empty();
        Ok(Response::new(proto::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        r: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        self.authorize(Endpoint::Model, &r)?;
        let req = r.get_ref();
        let ready = self.served(&req.name, &req.version).is_ok();
        Ok(Response::new(proto::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        r: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        self.authorize(Endpoint::Model, &r)?;
        Ok(Response::new(proto::ServerMetadataResponse {
            name: "flumen".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![
                "binary_tensor_data".into(),
                "model_configuration".into(),
                "statistics".into(),
            ],
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        self.authorize(Endpoint::Model, &r)?;
        let req = r.into_inner();
        let m = self.served(&req.name, &req.version)?;
        let tensors = |list: &[Declared]| -> Vec<TensorMetadata> {
            list.iter()
                .map(|t| TensorMetadata {
                    name: t.name.clone(),
                    datatype: t.datatype.clone(),
                    shape: t.shape.clone(),
                })
                .collect()
        };
        Ok(Response::new(proto::ModelMetadataResponse {
            name: req.name,
            versions: m.tensors.versions.clone(),
            platform: m.tensors.platform.clone(),
            inputs: tensors(&m.tensors.inputs),
            outputs: tensors(&m.tensors.outputs),
        }))
    }

    async fn model_config(
        &self,
        r: Request<proto::ModelConfigRequest>,
    ) -> Result<Response<proto::ModelConfigResponse>, Status> {
        self.authorize(Endpoint::Model, &r)?;
        let req = r.into_inner();
        let m = self.served(&req.name, &req.version)?;
        let config = m.tensors.config(&req.name, m.max_batch());
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let tensor = |t: &Value| {
            let data_type = t["data_type"]
                .as_str()
                .and_then(proto::DataType::from_str_name)
                .unwrap_or(proto::DataType::TypeInvalid) as i32;
            let dims: Vec<i64> = t["dims"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|x| x.as_i64().or_else(|| x.as_str()?.parse().ok()))
                        .collect()
                })
                .unwrap_or_default();
            (text(&t["name"]), data_type, dims)
        };
        let list = |key: &str| -> Vec<(String, i32, Vec<i64>)> {
            config[key]
                .as_array()
                .map(|a| a.iter().map(tensor).collect())
                .unwrap_or_default()
        };
        Ok(Response::new(proto::ModelConfigResponse {
            config: Some(proto::ModelConfig {
                name: req.name,
                platform: text(&config["platform"]),
                backend: text(&config["backend"]),
                max_batch_size: config["max_batch_size"].as_i64().unwrap_or(0) as i32,
                input: list("input")
                    .into_iter()
                    .map(|(name, data_type, dims)| proto::ModelInput {
                        name,
                        data_type,
                        dims,
                    })
                    .collect(),
                output: list("output")
                    .into_iter()
                    .map(|(name, data_type, dims)| proto::ModelOutput {
                        name,
                        data_type,
                        dims,
                    })
                    .collect(),
            }),
        }))
    }

    async fn model_statistics(
        &self,
        r: Request<proto::ModelStatisticsRequest>,
    ) -> Result<Response<proto::ModelStatisticsResponse>, Status> {
        self.authorize(Endpoint::Model, &r)?;
        let req = r.into_inner();
        let m = self.served(&req.name, &req.version)?;
        let c = m.counts();
        let count = |count: u64| Some(proto::StatisticDuration { count, ns: 0 });
        let version = if req.version.is_empty() {
            m.tensors.version().to_owned()
        } else {
            req.version
        };
        Ok(Response::new(proto::ModelStatisticsResponse {
            model_stats: vec![proto::ModelStatistics {
                name: req.name,
                version,
                last_inference: 0,
                inference_count: c.rows,
                execution_count: c.calls,
                inference_stats: Some(proto::InferStatistics {
                    success: count(c.answered),
                    fail: count(c.failed),
                    queue: count(0),
                    compute_input: count(0),
                    compute_infer: count(0),
                    compute_output: count(0),
                    cache_hit: count(0),
                    cache_miss: count(0),
                }),
            }],
        }))
    }

    async fn model_infer(
        &self,
        r: Request<proto::ModelInferRequest>,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        self.authorize(Endpoint::Model, &r)?;
        let timeout = r
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout);
        let authorization = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let header = r
            .metadata()
            .get(super::gateway::PRIORITY_HEADER)
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
        let req = r.into_inner();
        // The request's `priority` parameter, else the metadata's.
        let asked = match req
            .parameters
            .get("priority")
            .and_then(|p| p.parameter_choice.as_ref())
        {
            Some(choice) => {
                use proto::infer_parameter::ParameterChoice as P;
                let value = match choice {
                    P::Int64Param(n) => serde_json::json!(n),
                    P::Uint64Param(n) => serde_json::json!(n),
                    P::StringParam(s) => serde_json::json!(s),
                    P::BoolParam(b) => serde_json::json!(b),
                    P::DoubleParam(d) => serde_json::json!(d),
                };
                super::kserve::kserve_priority(&value).map_err(Status::invalid_argument)?
            }
            None => match header {
                Some(v) => Some(
                    super::gateway::class_of(&v, super::gateway::PRIORITY_HEADER)
                        .map_err(status)?,
                ),
                None => None,
            },
        };
        let who = self.0.who(authorization.as_deref(), asked);
        let m = self.served(&req.model_name, &req.model_version)?;
        let mut inputs = Vec::with_capacity(req.inputs.len());
        for (i, t) in req.inputs.iter().enumerate() {
            let data = match req.raw_input_contents.get(i) {
                Some(raw) => decode_raw(&t.datatype, raw).map_err(|e| {
                    Status::invalid_argument(format!("input '{}': {}", t.name, e.message))
                })?,
                None => typed(t.contents.as_ref().unwrap_or(&Default::default())),
            };
            if t.shape.iter().any(|d| *d < 0) {
                return Err(Status::invalid_argument(format!(
                    "input '{}': shape {:?} has a negative size",
                    t.name, t.shape
                )));
            }
            inputs.push(Input {
                name: t.name.clone(),
                datatype: t.datatype.clone(),
                shape: t.shape.clone(),
                data,
            });
        }
        let records = m
            .tensors
            .records(&req.model_name, &inputs, self.0.max_items)
            .map_err(|e| Status::invalid_argument(e.message()))?;
        let names: Vec<String> = req.outputs.iter().map(|o| o.name.clone()).collect();
        let selected = m
            .tensors
            .requested(&req.model_name, &names)
            .map_err(Status::invalid_argument)?;
        let predictions = self
            .0
            .run(&req.model_name, records, self.0.deadline(timeout), &who)
            .await
            .map_err(status)?;
        let outputs = m
            .tensors
            .outputs(&selected, &predictions)
            .map_err(Status::internal)?;
        let mut raw = Vec::with_capacity(outputs.len());
        let mut tensors = Vec::with_capacity(outputs.len());
        for o in outputs {
            raw.push(encode_raw(&o.datatype, &o.data).map_err(|e| Status::internal(e.message))?);
            tensors.push(InferOutputTensor {
                name: o.name,
                datatype: o.datatype,
                shape: o.shape,
                ..Default::default()
            });
        }
        let version = if req.model_version.is_empty() {
            m.tensors.version().to_owned()
        } else {
            req.model_version
        };
        Ok(Response::new(proto::ModelInferResponse {
            model_name: req.model_name,
            model_version: version,
            id: req.id,
            outputs: tensors,
            raw_output_contents: raw,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_one_grpc_code() {
        use tonic::Code;
        let code = |reason| status(Reject::new(reason, "x")).code();
        let cases = [
            (Reason::Unauthorized, Code::Unauthenticated),
            (Reason::UnknownModel, Code::NotFound),
            (Reason::NoInput, Code::InvalidArgument),
            (Reason::TooManyItems, Code::InvalidArgument),
            (Reason::Busy, Code::ResourceExhausted),
            (Reason::Quota { retry_after_s: 3 }, Code::ResourceExhausted),
            (Reason::BadRequest, Code::InvalidArgument),
            (
                Reason::Failed(ErrorKind::Overloaded),
                Code::ResourceExhausted,
            ),
            (
                Reason::Failed(ErrorKind::InvalidInput),
                Code::InvalidArgument,
            ),
            (Reason::Failed(ErrorKind::Timeout), Code::DeadlineExceeded),
            (Reason::Failed(ErrorKind::Transient), Code::Unavailable),
            (Reason::Failed(ErrorKind::Shutdown), Code::Unavailable),
            (Reason::Failed(ErrorKind::Permanent), Code::Internal),
            (Reason::Failed(ErrorKind::InvalidOutput), Code::Internal),
            (
                Reason::Failed(ErrorKind::BudgetExhausted),
                Code::ResourceExhausted,
            ),
        ];
        for (reason, expected) in cases {
            assert_eq!(code(reason), expected, "{reason:?}");
        }
        assert!(
            ErrorKind::ALL
                .iter()
                .all(|k| cases.iter().any(|(r, _)| *r == Reason::Failed(*k))),
            "every error kind has a case"
        );
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(grpc_timeout("x"), None);
        assert_eq!(grpc_timeout(""), None);
    }
}
