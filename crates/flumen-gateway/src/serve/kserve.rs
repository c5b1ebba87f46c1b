//! The gateway's KServe v2 HTTP front: model metadata, readiness and `infer`, with
//! tensors as JSON `data` or as Triton's binary tensor extension, both ways.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::gateway::Shared;
use super::http::Front;
use super::tensors::{output_tensor, tensor_records};

pub(crate) async fn kserve_metadata(
    State(g): State<Shared>,
    Path(model): Path<String>,
) -> Response {
    if !g.has_model(&model) {
        return Front::Kserve.error(StatusCode::NOT_FOUND, format!("unknown model `{model}`"));
    }
    Json(json!({
        "name": model, "versions": ["1"], "platform": "flumen",
        "inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT", "datatype": "BYTES", "shape": [-1, -1]}]
    }))
    .into_response()
}

pub(crate) async fn kserve_ready(State(g): State<Shared>, Path(model): Path<String>) -> StatusCode {
    if g.has_model(&model) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// The binary tensor extension's header: how many leading body bytes are JSON.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// A KServe v2 infer request, read: the first input's rows as records, and whether
/// the caller wants the outputs as binary tensors.
#[derive(Debug, PartialEq)]
pub(crate) struct InferRequest {
    pub(crate) records: Vec<Value>,
    pub(crate) binary_output: bool,
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
    let inputs = request["inputs"]
        .as_array()
        .filter(|i| !i.is_empty())
        .ok_or("`inputs` must hold one tensor")?;
    // Every binary input's bytes, in order; the records come from the first input.
    let mut first_raw = None;
    for (i, input) in inputs.iter().enumerate() {
        let Some(size) = input.pointer("/parameters/binary_data_size") else {
            continue;
        };
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
        if i == 0 {
            first_raw = Some(mine);
        }
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes after the last binary input (check binary_data_size)",
            binary.len()
        ));
    }
    let input = &inputs[0];
    let shape: Vec<usize> = input["shape"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(Value::as_u64)
                .map(|d| d as usize)
                .collect()
        })
        .unwrap_or_default();
    let decoded;
    let data: &[Value] = match first_raw {
        Some(raw) => {
            let datatype = input["datatype"]
                .as_str()
                .ok_or("inputs[0].datatype is missing")?;
            decoded = flumen_kserve::raw::decode_raw(datatype, raw)
                .map_err(|e| format!("inputs[0]: {}", e.message))?;
            &decoded
        }
        None => input["data"]
            .as_array()
            .ok_or("inputs[0] has neither `data` nor `parameters.binary_data_size`")?,
    };
    let records = tensor_records(data, shape.first().copied().unwrap_or(1))
        .map_err(|why| format!("inputs[0]: {why} (shape {shape:?})"))?;
    let wants_binary = |v: &Value, key: &str| {
        v.pointer(&format!("/parameters/{key}"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    let binary_output = wants_binary(&request, "binary_data_output")
        || request["outputs"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| wants_binary(o, "binary_data")));
    Ok(InferRequest {
        records,
        binary_output,
    })
}

/// The infer response: predictions as the rows of `OUTPUT`, as JSON `data` or, when
/// asked, as a binary tensor after a JSON header.
pub(crate) fn infer_response(model: &str, out: &[Value], binary: bool) -> Response {
    let (datatype, data, cols) = output_tensor(out);
    let mut tensor = json!({"name": "OUTPUT", "datatype": datatype, "shape": [out.len(), cols]});
    let reply =
        |tensor: Value| json!({"model_name": model, "model_version": "1", "outputs": [tensor]});
    if !binary {
        tensor["data"] = Value::Array(data);
        return Json(reply(tensor)).into_response();
    }
    let raw = match flumen_kserve::raw::encode_raw(datatype, &data) {
        Ok(raw) => raw,
        Err(e) => return Front::Kserve.error(StatusCode::INTERNAL_SERVER_ERROR, e.message),
    };
    tensor["parameters"] = json!({"binary_data_size": raw.len()});
    let reply = reply(tensor);
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

/// KServe v2 infer: each row of the first input is a record; the predictions come
/// back as the rows of `OUTPUT` (FP32 for numbers, BYTES else). JSON and binary
/// tensors both ways (see [`read_infer_request`]).
pub(crate) async fn kserve_infer(
    State(g): State<Shared>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    // KServe clients do not always say `application/json`: the body is read by the
    // presence of the binary extension's header, whatever its content type.
    let request = match read_infer_request(&headers, &body) {
        Ok(r) => r,
        Err(why) => return Front::Kserve.error(StatusCode::BAD_REQUEST, why),
    };
    match g.infer(&model, request.records, &headers).await {
        Err(r) => r.response(Front::Kserve),
        Ok(out) => infer_response(&model, &out, request.binary_output),
    }
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
                records: vec![json!(1.5), json!(-2.0), json!(4.0)],
                binary_output: true
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
        assert_eq!(read.records, vec![json!("café"), json!("")]);
        assert!(read.binary_output);

        // Plain JSON: rows of two elements, JSON outputs.
        let body = json!({"inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32",
                                      "data": [1, 2, 3, 4]}]});
        let read = read_infer_request(&HeaderMap::new(), body.to_string().as_bytes()).unwrap();
        assert_eq!(read.records, vec![json!([1, 2]), json!([3, 4])]);
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
        /// and size: read or refused, never a panic, and rows only when the bytes fit.
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
                proptest::prop_assert_eq!(read.records.len() as u64, rows.max(1));
            }
        }
    }

    #[tokio::test]
    async fn binary_responses_carry_the_header_length_and_raw_rows() {
        let out = [json!([0.5, 1.0]), json!([2.0, -1.0])];
        let response = infer_response("m", &out, true);
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
