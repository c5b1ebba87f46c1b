//! The generic HTTP JSON backend against a server in the test harness that checks
//! each request's shape and records it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_http::{HttpJson, HttpJsonConfig, Mode};
use futures::{stream, StreamExt};
use serde_json::{json, Value};

type Seen = Arc<Mutex<Vec<Value>>>;

async fn batch(
    State(seen): State<Seen>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
    seen.lock().unwrap().push(body.clone());
    let xs = body["instances"]
        .as_array()
        .ok_or(StatusCode::BAD_REQUEST)?;
    if body["options"]["scale"] != 2 {
        return Err(StatusCode::BAD_REQUEST);
    }
    let predictions: Vec<Value> = xs
        .iter()
        .map(|x| x["x"].as_f64().map(|v| json!({"score": v * 2.0})))
        .collect::<Option<_>>()
        .ok_or(StatusCode::UNPROCESSABLE_ENTITY)?;
    Ok(Json(json!({"model": "m", "predictions": predictions})))
}

async fn one(State(seen): State<Seen>, Json(body): Json<Value>) -> Result<Json<Value>, StatusCode> {
    seen.lock().unwrap().push(body.clone());
    let text = body["text"].as_str().ok_or(StatusCode::BAD_REQUEST)?;
    Ok(Json(json!({"result": {"length": text.chars().count()}})))
}

async fn serve() -> (Seen, String) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route("/batch", post(batch))
        .route("/one", post(one))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (seen, format!("http://{addr}"))
}

fn config(
    url: String,
    mode: Mode,
    template: Value,
    result: &str,
    item: Option<&str>,
) -> HttpJsonConfig {
    HttpJsonConfig {
        url,
        headers: vec![],
        mode,
        template,
        result: result.into(),
        item: item.map(str::to_owned),
        request_timeout: Duration::from_secs(10),
        idempotent: true,
    }
}

#[tokio::test]
async fn batched_requests_carry_many_records_and_results_come_back_by_position() {
    let (seen, base) = serve().await;
    let backend = HttpJson::new(config(
        format!("{base}/batch"),
        Mode::Batched {
            max_batch_items: 16,
        },
        json!({"instances": "{{inputs}}", "options": {"scale": 2}}),
        "/predictions",
        Some("/score"),
    ))
    .unwrap();
    let engine = Engine::new(backend, EngineConfig::default());
    let outcomes: Vec<_> = stream::iter(0..200)
        .infer(&engine, OperatorConfig::default(), |&i| Ok(json!({"x": i})))
        .collect()
        .await;
    for o in &outcomes {
        assert_eq!(
            o.result.as_ref().unwrap().as_f64(),
            Some(2.0 * f64::from(o.record))
        );
    }
    let seen = seen.lock().unwrap();
    let sizes: Vec<usize> = seen
        .iter()
        .map(|b| b["instances"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 200);
    assert!(sizes.iter().all(|n| *n <= 16));
    assert!(sizes.len() < 200, "batched");
    assert!(seen.iter().all(|b| b["options"] == json!({"scale": 2})));
}

#[tokio::test]
async fn one_request_per_record_and_errors_fail_only_their_record() {
    let (seen, base) = serve().await;
    let backend = HttpJson::new(config(
        format!("{base}/one"),
        Mode::PerRecord,
        json!({"text": "{{input}}"}),
        "/result/length",
        None,
    ))
    .unwrap();
    let engine = Engine::new(backend, EngineConfig::default());
    let records = vec![json!("naïve"), json!(42), json!("")];
    let outcomes: Vec<_> = stream::iter(records)
        .infer(&engine, OperatorConfig::default(), |r| Ok(r.clone()))
        .collect()
        .await;
    for o in &outcomes {
        match o.record.as_str() {
            Some(t) => assert_eq!(
                o.result.as_ref().unwrap().as_u64(),
                Some(t.chars().count() as u64)
            ),
            None => {
                let f = o.result.as_ref().unwrap_err();
                assert_eq!(f.kind, flumen_core::ErrorKind::Permanent);
                assert!(f.message.contains("HTTP 400"), "{f}");
            }
        }
    }
    assert_eq!(seen.lock().unwrap().len(), 3);
}
