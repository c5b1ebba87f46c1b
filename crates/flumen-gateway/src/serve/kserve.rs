//! The gateway's KServe v2 HTTP front, as `tritonclient` and Triton users call it:
//! server metadata (`GET /v2`), model metadata, configuration, readiness and
//! statistics, and `infer`, each also under `/versions/{v}`; tensors as JSON `data`
//! or as Triton's binary tensor extension, both ways; every input checked against
//! what the model declares, every requested output by name (see [`super::tensors`]).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flumen_engine::Class;
use serde_json::{json, Value};

use super::gateway::Shared;
use super::http::Front;
use super::tensors::{Input, Output, Unfit};

/// `GET /v2`: who serves, and which extensions of the protocol.
pub(crate) async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "flumen", "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
    }))
}

/// Triton's 404 for an unknown model or version (see [`super::gateway::Gateway::served`]).
fn unknown(why: String) -> Response {
    Front::Kserve.error(StatusCode::NOT_FOUND, why)
}

/// A path's model and version: `{model}` or `{model}/versions/{version}`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ModelPath {
    model: String,
    version: Option<String>,
}

pub(crate) async fn kserve_metadata(State(g): State<Shared>, Path(p): Path<ModelPath>) -> Response {
    match g.served(&p.model, p.version.as_deref()) {
        Ok(m) => Json(m.tensors.metadata(&p.model)).into_response(),
        Err(why) => unknown(why),
    }
}

/// Triton's configuration extension: the server's own configuration of the model
/// behind a KServe backend, else one made from what the model declares.
pub(crate) async fn kserve_config(State(g): State<Shared>, Path(p): Path<ModelPath>) -> Response {
    match g.served(&p.model, p.version.as_deref()) {
        Ok(m) => Json(m.tensors.config(&p.model, m.max_batch())).into_response(),
        Err(why) => unknown(why),
    }
}

pub(crate) async fn kserve_ready(State(g): State<Shared>, Path(p): Path<ModelPath>) -> Response {
    match g.served(&p.model, p.version.as_deref()) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(why) => unknown(why),
    }
}

/// Triton's statistics extension, with Flumen's own numbers: requests answered and
/// failed, rows sent to the backend (`inference_count`) and backend calls
/// (`execution_count`). Times are not measured here and read 0.
pub(crate) async fn kserve_stats(State(g): State<Shared>, Path(p): Path<ModelPath>) -> Response {
    let m = match g.served(&p.model, p.version.as_deref()) {
        Ok(m) => m,
        Err(why) => return unknown(why),
    };
    let c = m.counts();
    let count = |n: u64| json!({"count": n, "ns": 0});
    Json(json!({"model_stats": [{
        "name": p.model, "version": p.version.unwrap_or_else(|| m.tensors.version().to_owned()),
        "last_inference": 0,
        "inference_count": c.rows, "execution_count": c.calls,
        "inference_stats": {
            "success": count(c.answered), "fail": count(c.failed),
            "queue": count(0), "compute_input": count(0), "compute_infer": count(0),
            "compute_output": count(0), "cache_hit": count(0), "cache_miss": count(0),
        },
        "batch_stats": [],
    }]}))
    .into_response()
}

/// The binary tensor extension's header: how many leading body bytes are JSON.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// A KServe v2 infer request, read.
#[derive(Debug, PartialEq)]
pub(crate) struct InferRequest {
    pub(crate) id: Option<String>,
    pub(crate) inputs: Vec<Input>,
    /// The outputs asked for by name, each with whether it wants binary data.
    pub(crate) outputs: Vec<(String, bool)>,
    /// `parameters.binary_data_output`: every output as binary data.
    pub(crate) binary_output: bool,
    /// `parameters.priority`: the priority class asked for (see [`kserve_priority`]).
    pub(crate) priority: Option<Class>,
}

/// KServe's (Triton's) `priority` parameter: a number, 0 for the model's default
/// and 1 the most urgent — level `n - 1` (so 1 is `interactive`, 2 `default`, 3
/// `bulk`; beyond 8, the lowest) — or a class's name.
pub(crate) fn kserve_priority(v: &Value) -> Result<Option<Class>, String> {
    let bad = || {
        format!(
            "parameters.priority: {v} is not a priority (0 for the default, 1 the most urgent, or interactive, default, bulk)"
        )
    };
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(0) => Ok(None),
            Some(n) => Ok(Class::level(
                u8::try_from(n - 1)
                    .unwrap_or(u8::MAX)
                    .min(Class::LOWEST.get()),
            )),
            None => Err(bad()),
        },
        Value::String(s) => Class::parse(s).map(Some).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Reads an infer request with JSON `data` tensors or with Triton's binary tensor
/// extension (tritonclient's default): a JSON header of `Inference-Header-Content-Length`
/// bytes, then the raw bytes of each input that has `parameters.binary_data_size`,
/// in the order of `inputs`. Errors name the field at fault.
pub(crate) fn read_infer_request(headers: &HeaderMap, body: &[u8]) -> Result<InferRequest, String> {
    let (json, mut binary) = match headers.get(HEADER_LENGTH) {
        None => (body, &[][..]),
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("Inference-Header-Content-Length must be a byte count")?;
            if n > body.len() {
                return Err(format!(
                    "Inference-Header-Content-Length is {n} but the body has {} bytes",
                    body.len()
                ));
            }
            body.split_at(n)
        }
    };
    let request: Value =
        serde_json::from_slice(json).map_err(|e| format!("malformed JSON: {e}"))?;
    let listed = request["inputs"]
        .as_array()
        .filter(|i| !i.is_empty())
        .ok_or("`inputs` must list at least one tensor")?;
    let mut inputs = Vec::with_capacity(listed.len());
    for (i, input) in listed.iter().enumerate() {
        let text = |field: &str| {
            input[field]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("inputs[{i}].{field} must be a string"))
        };
        let (name, datatype) = (text("name")?, text("datatype")?);
        let shape = input["shape"]
            .as_array()
            .and_then(|s| s.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
            .filter(|s| s.iter().all(|d| *d >= 0))
            .ok_or_else(|| format!("inputs[{i}].shape must be a list of sizes"))?;
        let data = match input.pointer("/parameters/binary_data_size") {
            Some(size) => {
                let size = size.as_u64().ok_or_else(|| {
                    format!("inputs[{i}].parameters.binary_data_size must be a byte count")
                })? as usize;
                if size > binary.len() {
                    return Err(format!(
                        "inputs[{i}].parameters.binary_data_size is {size} but {} binary bytes are left",
                        binary.len()
                    ));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                flumen_kserve::raw::decode_raw(&datatype, mine)
                    .map_err(|e| format!("inputs[{i}]: {}", e.message))?
            }
            None => {
                let data = input["data"].as_array().ok_or_else(|| {
                    format!("inputs[{i}] has neither `data` nor `parameters.binary_data_size`")
                })?;
                let mut flat = Vec::new();
                flatten_into(data, &mut flat);
                flat
            }
        };
        inputs.push(Input {
            name,
            datatype,
            shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes after the last binary input (check binary_data_size)",
            binary.len()
        ));
    }
    let wants_binary = |v: &Value, key: &str| {
        v.pointer(&format!("/parameters/{key}"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    let outputs = match request.get("outputs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, o)| {
                o["name"]
                    .as_str()
                    .map(|n| (n.to_owned(), wants_binary(o, "binary_data")))
                    .ok_or_else(|| format!("outputs[{i}].name must be a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`outputs` must be a list".into()),
    };
    let priority = kserve_priority(
        request
            .pointer("/parameters/priority")
            .unwrap_or(&Value::Null),
    )?;
    Ok(InferRequest {
        id: request["id"].as_str().map(str::to_owned),
        inputs,
        outputs,
        binary_output: wants_binary(&request, "binary_data_output"),
        priority,
    })
}

/// JSON `data` may nest rows as arrays: their elements, in order.
fn flatten_into(data: &[Value], out: &mut Vec<Value>) {
    for v in data {
        match v {
            Value::Array(a) => flatten_into(a, out),
            x => out.push(x.clone()),
        }
    }
}

/// The infer response: each output as JSON `data`, or as binary data after a JSON
/// header when `binary(name)` says so.
pub(crate) fn infer_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: Vec<Output>,
    binary: impl Fn(&str) -> bool,
) -> Response {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::new();
    for o in outputs {
        let mut t = json!({"name": o.name, "datatype": o.datatype, "shape": o.shape});
        if binary(&o.name) {
            match flumen_kserve::raw::encode_raw(&o.datatype, &o.data) {
                Ok(bytes) => {
                    t["parameters"] = json!({"binary_data_size": bytes.len()});
                    raw.extend(bytes);
                }
                Err(e) => return Front::Kserve.error(StatusCode::INTERNAL_SERVER_ERROR, e.message),
            }
        } else {
            t["data"] = Value::Array(o.data);
        }
        tensors.push(t);
    }
    let mut reply = json!({"model_name": model, "model_version": version, "outputs": tensors});
    if let Some(id) = id {
        reply["id"] = json!(id);
    }
    if raw.is_empty() {
        return Json(reply).into_response();
    }
    let mut body = serde_json::to_vec(&reply).expect("a JSON value serialises");
    let header_length = body.len();
    body.extend(raw);
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static(HEADER_LENGTH),
                header_length.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

/// KServe v2 infer: each row of the batch is a record; the predictions come back as
/// the outputs asked for (all by default), with the model's declared datatypes.
pub(crate) async fn kserve_infer(
    State(g): State<Shared>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let bad = |why: String| Front::Kserve.error(StatusCode::BAD_REQUEST, why);
    let m = match g.served(&p.model, p.version.as_deref()) {
        Ok(m) => m,
        Err(why) => return unknown(why),
    };
    // KServe clients do not always say `application/json`: the body is read by the
    // presence of the binary extension's header, whatever its content type.
    let request = match read_infer_request(&headers, &body) {
        Ok(r) => r,
        Err(why) => return bad(why),
    };
    let records = match m.tensors.records(&p.model, &request.inputs, g.max_items) {
        Ok(r) => r,
        Err(Unfit::Invalid(why)) => return bad(why),
        Err(Unfit::TooMany(why)) => return Front::Kserve.error(StatusCode::PAYLOAD_TOO_LARGE, why),
    };
    let names: Vec<String> = request.outputs.iter().map(|(n, _)| n.clone()).collect();
    let selected = match m.tensors.requested(&p.model, &names) {
        Ok(s) => s,
        Err(why) => return bad(why),
    };
    let predictions = match g.infer(&p.model, records, &headers, request.priority).await {
        Ok(out) => out,
        Err(r) => return r.response(Front::Kserve),
    };
    let outputs = match m.tensors.outputs(&selected, &predictions) {
        Ok(o) => o,
        Err(why) => return Front::Kserve.error(StatusCode::BAD_GATEWAY, why),
    };
    let version = p
        .version
        .clone()
        .unwrap_or_else(|| m.tensors.version().to_owned());
    infer_response(&p.model, &version, request.id.as_deref(), outputs, |name| {
        request.binary_output
            || request
                .outputs
                .iter()
                .any(|(n, binary)| n == name && *binary)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary-extension request: the JSON header, then each input's raw bytes.
    fn binary_request(header: &Value, raw: &[&[u8]]) -> (HeaderMap, Vec<u8>) {
        let mut body = serde_json::to_vec(header).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, body.len().to_string().parse().unwrap());
        for r in raw {
            body.extend(*r);
        }
        (headers, body)
    }

    #[test]
    fn infer_requests_read_json_and_binary_tensors() {
        let fp32: Vec<u8> = [1.5f32, -2.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let header = json!({
            "inputs": [{"name": "X", "shape": [3, 1], "datatype": "FP32",
                        "parameters": {"binary_data_size": fp32.len()}}],
            "outputs": [{"name": "OUTPUT", "parameters": {"binary_data": true}}]
        });
        let (headers, body) = binary_request(&header, &[&fp32]);
        assert_eq!(
            read_infer_request(&headers, &body),
            Ok(InferRequest {
                id: None,
                inputs: vec![Input {
                    name: "X".into(),
                    datatype: "FP32".into(),
                    shape: vec![3, 1],
                    data: vec![json!(1.5), json!(-2.0), json!(4.0)],
                }],
                outputs: vec![("OUTPUT".into(), true)],
                priority: None,
                binary_output: false,
            })
        );

        // BYTES rows as the first input, a second binary input after it, and
        // outputs in binary by the request-level parameter.
        let text = flumen_kserve::raw::encode_raw("BYTES", &[json!("café"), json!("")]).unwrap();
        let header = json!({
            "inputs": [
                {"name": "T", "shape": [2, 1], "datatype": "BYTES",
                 "parameters": {"binary_data_size": text.len()}},
                {"name": "Y", "shape": [1], "datatype": "FP32",
                 "parameters": {"binary_data_size": 4}}
            ],
            "parameters": {"binary_data_output": true}
        });
        let (headers, body) = binary_request(&header, &[&text, &[0, 0, 128, 63]]);
        let read = read_infer_request(&headers, &body).unwrap();
        assert_eq!(read.inputs[0].data, vec![json!("café"), json!("")]);
        assert_eq!(read.inputs[1].data, vec![json!(1.0)]);
        assert!(read.binary_output && read.outputs.is_empty());

        // Plain JSON: rows of two elements, JSON outputs.
        let body = json!({"id": "r1", "inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32",
                                      "data": [[1, 2], [3, 4]]}]});
        let read = read_infer_request(&HeaderMap::new(), body.to_string().as_bytes()).unwrap();
        assert_eq!(
            read.inputs[0].data,
            vec![json!(1), json!(2), json!(3), json!(4)]
        );
        assert_eq!(read.id.as_deref(), Some("r1"));
        assert!(!read.binary_output);
    }

    #[test]
    fn bad_binary_requests_name_what_is_wrong() {
        let header = json!({"inputs": [{"name": "X", "shape": [2, 1], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 8}}]});
        let err = |headers: &HeaderMap, body: &[u8]| read_infer_request(headers, body).unwrap_err();
        // Fewer bytes than announced.
        let (headers, body) = binary_request(&header, &[&[0; 4]]);
        assert!(err(&headers, &body).contains("inputs[0].parameters.binary_data_size is 8"));
        // More bytes than announced.
        let (headers, body) = binary_request(&header, &[&[0; 12]]);
        assert!(err(&headers, &body).contains("4 bytes after the last binary input"));
        // A header length past the body, or not a number.
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, "999".parse().unwrap());
        assert!(err(&headers, b"{}").contains("Inference-Header-Content-Length is 999"));
        headers.insert(HEADER_LENGTH, "ten".parse().unwrap());
        assert!(err(&headers, b"{}").contains("must be a byte count"));
        // Raw bytes that do not fit the datatype.
        let header = json!({"inputs": [{"name": "X", "shape": [1, 1], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 3}}]});
        let (headers, body) = binary_request(&header, &[&[0; 3]]);
        assert!(err(&headers, &body).starts_with("inputs[0]: 3 raw bytes"));
        // Neither data nor binary.
        let body = json!({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32"}]});
        assert!(err(&HeaderMap::new(), body.to_string().as_bytes()).contains("neither `data`"));
    }

    proptest::proptest! {
        // A fixed seed: the same cases on every run and every machine.
        #![proptest_config(proptest::test_runner::Config {
            cases: 512,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0xB1_7E5),
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Whatever the body and the header length, a request is read or refused
        /// with a reason; nothing panics.
        #[test]
        fn any_body_is_read_or_refused(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            header_length in proptest::option::of(0usize..400),
        ) {
            let mut headers = HeaderMap::new();
            if let Some(n) = header_length {
                headers.insert(HEADER_LENGTH, n.to_string().parse().unwrap());
            }
            if let Err(why) = read_infer_request(&headers, &body) {
                proptest::prop_assert!(!why.is_empty());
            }
        }

        /// A JSON header with one binary input of random bytes and a random datatype
        /// and size: read or refused, never a panic, and read only when the bytes fit.
        #[test]
        fn any_binary_input_is_read_or_refused(
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            size in 0usize..80,
            rows in 0u64..6,
            datatype in proptest::sample::select(vec!["FP32", "INT64", "BYTES", "BOOL", "FP16", ""]),
        ) {
            let header = json!({"inputs": [{"name": "X", "shape": [rows, 1], "datatype": datatype,
                                            "parameters": {"binary_data_size": size}}]});
            let (headers, body) = binary_request(&header, &[&raw]);
            if let Ok(read) = read_infer_request(&headers, &body) {
                proptest::prop_assert_eq!(size, raw.len());
                proptest::prop_assert_eq!(&read.inputs[0].shape, &vec![rows as i64, 1]);
                let width = match datatype { "FP32" => 4, "INT64" => 8, "BOOL" => 1, _ => 0 };
                if width > 0 {
                    proptest::prop_assert_eq!(read.inputs[0].data.len() * width, size);
                }
            }
        }
    }

    #[tokio::test]
    async fn binary_responses_carry_the_header_length_and_raw_rows() {
        let out = vec![Output {
            name: "OUTPUT".into(),
            datatype: "FP32".into(),
            shape: vec![2, 2],
            data: vec![json!(0.5), json!(1.0), json!(2.0), json!(-1.0)],
        }];
        let response = infer_response("m", "1", None, out, |_| true);
        let length: usize = response.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let header: Value = serde_json::from_slice(&body[..length]).unwrap();
        assert_eq!(header["outputs"][0]["shape"], json!([2, 2]));
        assert_eq!(
            header["outputs"][0]["parameters"]["binary_data_size"],
            json!(16)
        );
        assert_eq!(header["outputs"][0].get("data"), None);
        let rows = flumen_kserve::raw::decode_raw("FP32", &body[length..]).unwrap();
        assert_eq!(rows, vec![json!(0.5), json!(1.0), json!(2.0), json!(-1.0)]);
    }
}
