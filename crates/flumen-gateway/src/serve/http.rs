//! What the HTTP fronts (OpenAI and KServe v2) share: the one mapping from a
//! rejection's reason to an HTTP status, error bodies, the bearer token and deadline
//! from HTTP headers, readiness, and the access log.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flumen_core::ErrorKind;
use flumen_engine::Class;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::gateway::{class_of, Endpoint, Gateway, Reason, Reject, Shared, Who, PRIORITY_HEADER};

/// Which front a path belongs to, for the shape of its errors: KServe v2 (`/v2/…`,
/// Triton's `{"error": "…"}`) or the rest (OpenAI's `{"error": {"message", "type",
/// "param", "code"}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    OpenAi,
    Kserve,
}

impl Front {
    pub(crate) fn of(path: &str) -> Front {
        if path == "/v2" || path.starts_with("/v2/") {
            Front::Kserve
        } else {
            Front::OpenAi
        }
    }

    /// An error answer in this front's shape.
    pub(crate) fn error(self, status: StatusCode, message: impl Into<String>) -> Response {
        match self {
            Front::OpenAi => error(status, message),
            Front::Kserve => (status, Json(json!({"error": message.into()}))).into_response(),
        }
    }
}

/// An error answer in OpenAI's shape: `type` and `code` as OpenAI's API gives them
/// for that status.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let (kind, code) = match status.as_u16() {
        401 => ("invalid_request_error", json!("invalid_api_key")),
        429 => ("requests", json!("rate_limit_exceeded")),
        s if s >= 500 => ("server_error", Value::Null),
        _ => ("invalid_request_error", Value::Null),
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// A 400 in OpenAI's shape naming the request field at fault (`param`).
pub(crate) fn invalid(param: Option<&str>, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error",
                                "param": param, "code": null}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// The one mapping from a rejection's reason to an HTTP status.
fn status(reason: Reason) -> StatusCode {
    match reason {
        Reason::Unauthorized => StatusCode::UNAUTHORIZED,
        Reason::UnknownModel => StatusCode::NOT_FOUND,
        Reason::NoInput => StatusCode::BAD_REQUEST,
        Reason::TooManyItems => StatusCode::PAYLOAD_TOO_LARGE,
        Reason::Busy | Reason::Quota { .. } => StatusCode::TOO_MANY_REQUESTS,
        Reason::BadRequest => StatusCode::BAD_REQUEST,
        Reason::Failed(kind) => match kind {
            // The message names the budget, what is spent and when it resets.
            ErrorKind::Overloaded | ErrorKind::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::InvalidInput => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Transient | ErrorKind::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        },
    }
}

impl Reject {
    /// The answer in `front`'s shape; a 429 says when to retry.
    pub(crate) fn response(self, front: Front) -> Response {
        let status = status(self.reason);
        let retry = match self.reason {
            Reason::Quota { retry_after_s } => retry_after_s,
            _ => 1,
        };
        let mut r = front.error(status, self.message);
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(
                "retry-after",
                retry.to_string().parse().expect("header value"),
            );
        }
        r
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        self.response(Front::OpenAi)
    }
}

/// The request body's limits (`[server]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// The whole body must arrive within this (408 otherwise, and the connection
    /// closes).
    pub(crate) timeout: Duration,
    /// Bytes (413 above).
    pub(crate) max_bytes: usize,
}

/// Reads the whole request body within its limits before any route sees it, so that
/// a client that never finishes its body is answered 408 and let go; then gives
/// every error answer the shape of its front, the framework's own rejections (a
/// body that is not JSON, an unknown path, a wrong method) included.
pub(crate) async fn read_body(
    State(limits): State<BodyLimits>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let front = Front::of(req.uri().path());
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_bytes));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        Err(_) => {
            let mut r = front.error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms (server.body_timeout_ms)",
                    limits.timeout.as_millis()
                ),
            );
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            return r;
        }
        Ok(Err(e)) => {
            let too_large = e
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_large {
                front.error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is over {} bytes (server.max_body_bytes)",
                        limits.max_bytes
                    ),
                )
            } else {
                front.error(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                )
            };
        }
    };
    let mut parts = parts;
    let bytes = match decoded(&mut parts.headers, bytes, limits.max_bytes) {
        Ok(bytes) => bytes,
        Err(r) => return front.error(r.0, r.1),
    };
    let accepts = parts
        .headers
        .get(axum::http::header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .and_then(Coding::accepted);
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    let response = shaped(front, next.run(req).await).await;
    match accepts {
        Some(coding) => encoded(response, coding).await,
        None => response,
    }
}

/// `gzip` or `deflate` (zlib), the `Content-Encoding`s taken and given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    fn named(name: &str) -> Option<Coding> {
        match name.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            _ => None,
        }
    }

    /// The first of an `Accept-Encoding` list this server gives (one with a
    /// q-value of 0 refused).
    fn accepted(list: &str) -> Option<Coding> {
        list.split(',').find_map(|item| {
            let mut parts = item.split(';');
            let coding = Coding::named(parts.next()?)?;
            let refused = parts.any(|p| {
                let p = p.trim();
                (p.starts_with("q=") || p.starts_with("Q="))
                    && p[2..].trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
            });
            (!refused).then_some(coding)
        })
    }

    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// A body sent with `Content-Encoding: gzip` or `deflate`, decompressed (at most
/// `max_bytes`: a small body must not expand without bound), its headers made to
/// say so; a body without one, as it is.
fn decoded(
    headers: &mut axum::http::HeaderMap,
    bytes: axum::body::Bytes,
    max_bytes: usize,
) -> Result<axum::body::Bytes, (StatusCode, String)> {
    use std::io::Read;
    let Some(value) = headers.get(axum::http::header::CONTENT_ENCODING) else {
        return Ok(bytes);
    };
    let name = value.to_str().unwrap_or("").to_owned();
    if name.trim().eq_ignore_ascii_case("identity") {
        return Ok(bytes);
    }
    let coding = Coding::named(&name).ok_or_else(|| {
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding `{name}` is not supported: send gzip, deflate or none"),
        )
    })?;
    let reader: Box<dyn Read> = match coding {
        Coding::Gzip => Box::new(flate2::read::GzDecoder::new(&bytes[..])),
        Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(&bytes[..])),
    };
    let mut out = Vec::new();
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("the {} body could not be decompressed: {e}", coding.name()),
            )
        })?;
    if out.len() > max_bytes {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body decompresses to over {max_bytes} bytes (server.max_body_bytes)"
            ),
        ));
    }
    headers.remove(axum::http::header::CONTENT_ENCODING);
    headers.insert(
        axum::http::header::CONTENT_LENGTH,
        axum::http::HeaderValue::from(out.len()),
    );
    Ok(axum::body::Bytes::from(out))
}

/// A response compressed as the caller accepts (as Triton does, whatever its size),
/// unless it is already encoded or a stream.
async fn encoded(response: Response, coding: Coding) -> Response {
    use std::io::Write;
    let streamed = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if streamed
        || response
            .headers()
            .contains_key(axum::http::header::CONTENT_ENCODING)
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.append(
        axum::http::header::VARY,
        axum::http::HeaderValue::from_static("accept-encoding"),
    );
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if bytes.is_empty() {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let level = flate2::Compression::fast();
    let compressed = match coding {
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
            e.write_all(&bytes).and_then(|()| e.finish())
        }
        Coding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(&bytes).and_then(|()| e.finish())
        }
    };
    let Ok(compressed) = compressed else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    parts.headers.insert(
        axum::http::header::CONTENT_ENCODING,
        axum::http::HeaderValue::from_static(coding.name()),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(compressed))
}

/// An error answer that is not JSON (a rejection of the framework's: plain text or
/// empty) rewritten in `front`'s shape, its status and headers kept.
async fn shaped(front: Front, response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut r = front.error(status, message);
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            r.headers_mut().append(name.clone(), value.clone());
        }
    }
    r
}

/// What a path is for, as far as the bearer token goes.
fn endpoint(path: &str) -> Endpoint {
    match path {
        "/health/live" | "/health/ready" | "/v2/health/live" | "/v2/health/ready" => {
            Endpoint::Health
        }
        "/metrics" => Endpoint::Metrics,
        "/" | "/status.json" => Endpoint::Status,
        p if p.starts_with("/assets/") => Endpoint::Status,
        _ => Endpoint::Model,
    }
}

/// The bearer token, checked once for every path (an unknown path too, so that
/// none answers differently without it), before the body is read.
pub(crate) async fn authorize(
    State(g): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let sent = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(r) = g.check_access(endpoint(path), sent) {
        return r.response(Front::of(path));
    }
    next.run(req).await
}

/// Any path no route has: 404 in the shape of the front its path belongs to.
pub(crate) async fn no_route(req: axum::extract::Request) -> Response {
    let path = req.uri().path();
    Front::of(path).error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {path}", req.method()),
    )
}

impl Gateway {
    /// Runs `records` through `model`'s engine, for an HTTP caller (whose token
    /// [`authorize`] checked) and [`who`](Gateway::who_of) it is for (`asked`:
    /// KServe's `priority` parameter), by `x-request-timeout-ms` or the default.
    pub(crate) async fn infer(
        &self,
        name: &str,
        records: Vec<Value>,
        headers: &HeaderMap,
        asked: Option<Class>,
    ) -> Result<Vec<Value>, Reject> {
        let timeout = headers
            .get("x-request-timeout-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let who = self.who_of(headers, asked)?;
        self.run(name, records, self.deadline(timeout), &who).await
    }

    /// Who an HTTP request is for: its key's tenant, the class `asked` by its body or
    /// else by its `x-flumen-priority` header (a bad value refused, naming it).
    pub(crate) fn who_of(&self, headers: &HeaderMap, asked: Option<Class>) -> Result<Who, Reject> {
        let asked = match (asked, headers.get(PRIORITY_HEADER)) {
            (Some(c), _) => Some(c),
            (None, Some(v)) => Some(class_of(
                v.to_str().unwrap_or("(not text)"),
                PRIORITY_HEADER,
            )?),
            (None, None) => None,
        };
        let authorization = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Ok(self.who(authorization, asked))
    }
}

/// Ready when every model can take requests: its backend was reached at start (the
/// gateway listens only then) and its circuit breaker is not open. Otherwise 503,
/// naming the models that are not.
pub(crate) async fn ready(State(g): State<Shared>, uri: axum::http::Uri) -> Response {
    let open = g.open_circuits();
    if open.is_empty() {
        StatusCode::OK.into_response()
    } else {
        Front::of(uri.path()).error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("circuit open for: {}", open.join(", ")),
        )
    }
}

/// The access log: one `request` event per request (target `flumen::access`), as
/// text or JSON with the rest of the logs (`--log-format`). Only the method, the
/// path, the tenant (its name, from the keys file; `-` for none), the status and the
/// time are written — no body, query or header, so neither payloads nor keys reach
/// the log.
pub(crate) async fn access_log(
    State(g): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let tenant = g
        .tenant(
            req.headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
        .map_or_else(|| "-".to_owned(), |t| t.tenant.name.to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    tracing::info!(
        target: "flumen::access",
        method = %method,
        path,
        tenant,
        status = response.status().as_u16(),
        ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        "request"
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_picks_the_first_coding_given() {
        assert_eq!(Coding::accepted("gzip, deflate"), Some(Coding::Gzip));
        assert_eq!(Coding::accepted("br, deflate;q=0.5"), Some(Coding::Deflate));
        assert_eq!(Coding::accepted("gzip;q=0, deflate"), Some(Coding::Deflate));
        assert_eq!(Coding::accepted("identity, br"), None);
        assert_eq!(
            Coding::accepted("gzip;q=0.0, deflate;q=0.2"),
            Some(Coding::Deflate)
        );
        assert_eq!(Coding::accepted("gzip; Q=0.000"), None);
    }

    #[test]
    fn compressed_bodies_are_read_within_the_size_limit() {
        use std::io::Write;
        let body = br#"{"model": "m", "input": "hello"}"#;
        let gzip = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            axum::body::Bytes::from(e.finish().unwrap())
        };
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("content-encoding", "gzip".parse().unwrap());
        let plain = decoded(&mut headers, gzip(body), 1000).unwrap();
        assert_eq!(&plain[..], &body[..]);
        assert!(!headers.contains_key("content-encoding"));
        // 1 MB of zeros is a few KB compressed: refused past the limit, not inflated.
        headers.insert("content-encoding", "gzip".parse().unwrap());
        let bomb = gzip(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 5_000);
        let (status, message) = decoded(&mut headers, bomb, 64 << 10).unwrap_err();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(message.contains("server.max_body_bytes"), "{message}");
        headers.insert("content-encoding", "br".parse().unwrap());
        let (status, _) = decoded(&mut headers, gzip(body), 1000).unwrap_err();
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        headers.insert("content-encoding", "gzip".parse().unwrap());
        let (status, _) = decoded(
            &mut headers,
            axum::body::Bytes::from_static(b"not gzip"),
            1000,
        )
        .unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn each_reason_has_one_status() {
        let cases = [
            (Reason::Unauthorized, StatusCode::UNAUTHORIZED),
            (Reason::UnknownModel, StatusCode::NOT_FOUND),
            (Reason::NoInput, StatusCode::BAD_REQUEST),
            (Reason::TooManyItems, StatusCode::PAYLOAD_TOO_LARGE),
            (Reason::Busy, StatusCode::TOO_MANY_REQUESTS),
            (
                Reason::Quota { retry_after_s: 7 },
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (Reason::BadRequest, StatusCode::BAD_REQUEST),
            (
                Reason::Failed(ErrorKind::Overloaded),
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                Reason::Failed(ErrorKind::InvalidInput),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                Reason::Failed(ErrorKind::Timeout),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                Reason::Failed(ErrorKind::Transient),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Reason::Failed(ErrorKind::Shutdown),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Reason::Failed(ErrorKind::Permanent),
                StatusCode::BAD_GATEWAY,
            ),
            (
                Reason::Failed(ErrorKind::InvalidOutput),
                StatusCode::BAD_GATEWAY,
            ),
            (
                Reason::Failed(ErrorKind::BudgetExhausted),
                StatusCode::TOO_MANY_REQUESTS,
            ),
        ];
        for (reason, expected) in cases {
            assert_eq!(status(reason), expected, "{reason:?}");
            // Only a 429 says when to retry.
            let r = Reject::new(reason, "x").into_response();
            assert_eq!(
                r.headers().get("retry-after").is_some(),
                expected == StatusCode::TOO_MANY_REQUESTS,
                "{reason:?}"
            );
        }
        assert!(
            ErrorKind::ALL
                .iter()
                .all(|k| cases.iter().any(|(r, _)| *r == Reason::Failed(*k))),
            "every error kind has a case"
        );
    }
}
