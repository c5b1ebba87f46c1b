//! The KServe v2 HTTP backend against a real Triton Inference Server (CPU), installed
//! by `scripts/triton.sh` and started here with Python-backend models generated for
//! each test: a cost model (`a + b·n` per execution, 2 instances, max batch 64), a
//! text model (BYTES in, length out) and a model with a one-request queue.

use std::sync::Arc;
use std::time::Duration;

use flumen_core::{Backend, ErrorKind};
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_kserve::server::{cost_model, text_model, PythonModel, TritonServer};
use flumen_kserve::{KserveConfig, KserveHttp};
use futures::{stream, StreamExt};
use serde_json::{json, Value};

fn start() -> TritonServer {
    let text = text_model("text", 32, false);
    let queued = PythonModel {
        name: "queued".into(),
        config: "max_batch_size: 1\n\
                 input [ { name: \"X\", data_type: TYPE_FP32, dims: [ 1 ] } ]\n\
                 output [ { name: \"Y\", data_type: TYPE_FP32, dims: [ 1 ] } ]\n\
                 instance_group [ { count: 1, kind: KIND_CPU } ]\n\
                 dynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"
            .into(),
        execute: "        time.sleep(0.3)\n\
                  \x20       return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', pb_utils.get_input_tensor_by_name(r, 'X').as_numpy())]) for r in requests]"
            .into(),
    };
    let cost = cost_model("cost", 20.0, 0.5, 2, 64, false);
    TritonServer::start(&[cost, text, queued])
        .expect("tritonserver starts (bash scripts/triton.sh installs it)")
}

async fn connect(triton: &TritonServer, model: &str) -> KserveHttp {
    KserveHttp::connect(KserveConfig::new(triton.http_url(), model))
        .await
        .unwrap()
}

async fn stats(triton: &TritonServer, model: &str) -> Value {
    let url = format!("{}/v2/models/{model}/stats", triton.http_url());
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_become_rows_of_a_batch_tensor_and_come_back_out() {
    let triton = start();
    let backend = connect(&triton, "cost").await;
    assert_eq!(backend.max_batch(), 64, "read from the model's config");
    assert_eq!(backend.signature().inputs[0].datatype, "FP32");
    let engine = Engine::new(backend, EngineConfig::default());
    let config = OperatorConfig {
        capacity: 1_000,
        ..OperatorConfig::default()
    };
    let outcomes: Vec<_> = stream::iter(0..1_000u64)
        .infer(&engine, config, |&i| Ok(json!(i as f64)))
        .collect()
        .await;
    assert_eq!(outcomes.len(), 1_000);
    for o in &outcomes {
        assert_eq!(
            o.result.as_ref().unwrap().as_f64(),
            Some(2.0 * o.record as f64)
        );
    }
    // The server's own statistics: every row inferred once, in far fewer executions.
    let stats = stats(&triton, "cost").await;
    let s = &stats["model_stats"][0];
    assert_eq!(s["inference_count"], 1_000, "{s}");
    let executions = s["execution_count"].as_u64().unwrap();
    assert!(executions <= 40, "{executions} executions for 1,000 rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_tensors_carry_text() {
    let triton = start();
    let engine = Engine::new(connect(&triton, "text").await, EngineConfig::default());
    let texts = ["", "a", "naïve café", "x".repeat(300).as_str()].map(str::to_owned);
    let outcomes: Vec<_> = stream::iter(texts.clone())
        .infer(&engine, OperatorConfig::default(), |t| Ok(json!(t)))
        .collect()
        .await;
    for o in &outcomes {
        assert_eq!(
            o.result.as_ref().unwrap().as_u64(),
            Some(o.record.chars().count() as u64),
            "{o:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_tensor_extension_carries_numbers_and_text_both_ways() {
    let triton = start();
    let binary = |model: &str| {
        let mut c = KserveConfig::new(triton.http_url(), model);
        c.binary_threshold = Some(1);
        c
    };
    let cost = KserveHttp::connect(binary("cost")).await.unwrap();
    let rows: Vec<Value> = (0..64).map(|i| json!(i as f64 + 0.25)).collect();
    for (i, r) in cost.call(&rows).await.unwrap().iter().enumerate() {
        assert_eq!(r.as_ref().unwrap().as_f64(), Some(2.0 * (i as f64 + 0.25)));
    }
    let text = KserveHttp::connect(binary("text")).await.unwrap();
    let out = text
        .call(&[json!("naïve"), json!(""), json!("x".repeat(1000))])
        .await
        .unwrap();
    let lengths: Vec<u64> = out
        .iter()
        .map(|r| r.as_ref().unwrap().as_u64().unwrap())
        .collect();
    assert_eq!(lengths, vec![5, 0, 1000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_triton_really_returns_are_classified() {
    let triton = start();
    // Connecting to a known model first waits (up to a minute) for the server to be
    // up, so the short wait below is spent on the unknown model, not on startup.
    let backend = connect(&triton, "cost").await;
    // An unknown model: connect says so, with Triton's words.
    let mut config = KserveConfig::new(triton.http_url(), "no_such_model");
    config.ready_timeout = Duration::from_secs(2);
    let err = KserveHttp::connect(config)
        .await
        .err()
        .expect("unknown model");
    assert!(err.to_string().contains("no_such_model"), "{err}");

    // A record of the wrong datatype or shape fails alone, as invalid input.
    let results = backend
        .call(&[json!(1.5), json!("text"), json!([1.0, 2.0])])
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap().as_f64(), Some(3.0));
    assert_eq!(
        results[1].as_ref().unwrap_err().kind,
        ErrorKind::InvalidInput
    );
    assert_eq!(
        results[2].as_ref().unwrap_err().kind,
        ErrorKind::InvalidInput
    );

    // Triton's own answer to a wrong shape and to a wrong datatype (sent raw, since
    // the backend checks records before sending them): 400, permanent.
    for bad in [
        json!({"inputs": [{"name": "X", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}),
        json!({"inputs": [{"name": "X", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}),
    ] {
        let r = reqwest::Client::new()
            .post(format!("{}/v2/models/cost/infer", triton.http_url()))
            .json(&bad)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            flumen_core::http::classify_status(status, &body),
            ErrorKind::Permanent
        );
    }

    // Queue full (max_queue_size 1, one instance busy 300 ms): Triton rejects, and
    // the rejection is overload, not failure.
    let queued = Arc::new(connect(&triton, "queued").await);
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let b = Arc::clone(&queued);
            tokio::spawn(async move { b.call(&[json!(i as f64)]).await })
        })
        .collect();
    let mut kinds = Vec::new();
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => kinds.push(None),
            Err(e) => {
                assert!(e.message.contains("HTTP"), "{e}");
                kinds.push(Some(e.kind));
            }
        }
    }
    assert!(kinds.contains(&None), "{kinds:?}");
    assert!(kinds.contains(&Some(ErrorKind::Overloaded)), "{kinds:?}");
    assert!(
        kinds.iter().flatten().all(|k| *k == ErrorKind::Overloaded),
        "{kinds:?}"
    );
}

#[cfg(feature = "grpc")]
mod grpc {
    use super::*;
    use flumen_kserve::grpc::KserveGrpc;

    async fn connect(triton: &TritonServer, model: &str, max_batch: usize) -> KserveGrpc {
        let mut config =
            KserveConfig::new(format!("http://127.0.0.1:{}", triton.grpc_port()), model);
        config.max_batch_items = Some(max_batch);
        KserveGrpc::connect(config).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_go_over_grpc_as_rows_and_text_as_bytes() {
        let triton = start();
        let engine = Engine::new(connect(&triton, "cost", 64).await, EngineConfig::default());
        let outcomes: Vec<_> = stream::iter(0..500u64)
            .infer(&engine, OperatorConfig::default(), |&i| Ok(json!(i as f64)))
            .collect()
            .await;
        for o in &outcomes {
            assert_eq!(
                o.result.as_ref().unwrap().as_f64(),
                Some(2.0 * o.record as f64)
            );
        }
        let s = &stats(&triton, "cost").await["model_stats"][0];
        assert_eq!(s["inference_count"], 500);
        assert!(s["execution_count"].as_u64().unwrap() <= 25, "{s}");

        let text = connect(&triton, "text", 32).await;
        let out = text
            .call(&[json!("naïve"), json!(""), json!(5)])
            .await
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap().as_u64(), Some(5));
        assert_eq!(out[1].as_ref().unwrap().as_u64(), Some(0));
        assert_eq!(out[2].as_ref().unwrap_err().kind, ErrorKind::InvalidInput);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_errors_triton_really_returns_are_classified() {
        let triton = start();
        // As above: a known model first, so the short wait is not spent on startup.
        let queued = Arc::new(connect(&triton, "queued", 1).await);
        let mut config =
            KserveConfig::new(format!("http://127.0.0.1:{}", triton.grpc_port()), "nope");
        config.ready_timeout = Duration::from_secs(2);
        let err = KserveGrpc::connect(config)
            .await
            .err()
            .expect("unknown model");
        assert!(err.to_string().contains("nope"), "{err}");

        let calls: Vec<_> = (0..6)
            .map(|i| {
                let b = Arc::clone(&queued);
                tokio::spawn(async move { b.call(&[json!(i as f64)]).await })
            })
            .collect();
        let mut kinds = Vec::new();
        for c in calls {
            kinds.push(c.await.unwrap().err().map(|e| e.kind));
        }
        assert!(kinds.contains(&None), "{kinds:?}");
        assert!(kinds.contains(&Some(ErrorKind::Overloaded)), "{kinds:?}");
        assert!(
            kinds.iter().flatten().all(|k| *k == ErrorKind::Overloaded),
            "{kinds:?}"
        );
    }
}
