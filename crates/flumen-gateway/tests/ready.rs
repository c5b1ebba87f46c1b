//! The gateway in process, over real HTTP with reqwest (and gRPC with tonic, with
//! the `grpc` feature): readiness follows each model's circuit breaker.

use flumen_gateway::serve::{start, ServeConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_while_a_models_breaker_is_open() {
    let grpc = if cfg!(feature = "grpc") {
        "grpc_listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{grpc}\n\
         [[models]]\nname = \"good\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n\n\
         [[models]]\nname = \"bad\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\nerror_rate = 1.0\n\
         [models.engine]\nbreaker = true\nbreaker_min_calls = 3\nmax_attempts = 1\n"
    ))
    .unwrap();
    let running = start(&config).await.unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let ready = || async {
        let r = http
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    #[cfg(feature = "grpc")]
    assert!(grpc_ready(&running).await);
    let row =
        json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]});
    // Failing calls until the breaker opens (3 are needed; with it open, a
    // request would wait for it within its deadline, so stop there).
    let mut sent = 0;
    while ready().await.0 == 200 {
        assert!(sent < 10, "the breaker never opened");
        let r = http
            .post(format!("{base}/v2/models/bad/infer"))
            .header("x-request-timeout-ms", "2000")
            .json(&row)
            .send()
            .await
            .unwrap();
        assert!(!r.status().is_success());
        sent += 1;
    }
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("circuit open for: bad"), "{body}");
    #[cfg(feature = "grpc")]
    assert!(!grpc_ready(&running).await, "gRPC readiness says the same");
    let good = http
        .post(format!("{base}/v2/models/good/infer"))
        .json(&row)
        .send()
        .await
        .unwrap();
    assert!(good.status().is_success(), "the other model still serves");
    running.stopper().stop();
}

/// KServe v2 `ServerReady` over gRPC.
#[cfg(feature = "grpc")]
async fn grpc_ready(running: &flumen_gateway::serve::Running) -> bool {
    use flumen_kserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use flumen_kserve::grpc::proto::ServerReadyRequest;
    let addr = running.grpc_addr.expect("grpc_listen is set");
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .server_ready(ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready
}
