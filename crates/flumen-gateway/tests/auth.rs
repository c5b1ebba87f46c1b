//! With a bearer token set, every endpoint needs it — models, their metadata and
//! readiness, unknown paths, health and metrics — unless `server.unauthenticated`
//! opens health, metrics or the status page; over HTTP and (with the `grpc` feature)
//! gRPC.

use flumen_gateway::serve::{start, Running, ServeConfig};

async fn gateway(open: &str) -> Running {
    let grpc = if cfg!(feature = "grpc") {
        "grpc_listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{grpc}api_key_env = \"FLUMEN_TEST_AUTH_TOKEN\"\n{open}\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 0.1\n"
    ))
    .unwrap();
    start(&config).await.unwrap()
}

const PATHS: [&str; 12] = [
    "/",
    "/status.json",
    "/assets/uPlot.iife.min.js",
    "/v1/models",
    "/v2/models/echo",
    "/v2/models/echo/ready",
    "/v2/health/live",
    "/v2/health/ready",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/no/such/path",
];

/// Each path's status without a token, then with it.
async fn statuses(running: &Running) -> Vec<(&'static str, u16, u16)> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for path in PATHS {
        let url = format!("http://{}{path}", running.addr);
        let without = http.get(&url).send().await.unwrap().status().as_u16();
        let with = http
            .get(&url)
            .bearer_auth("sesame")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        out.push((path, without, with));
    }
    out
}

#[test]
fn the_token_guards_every_endpoint_unless_health_or_metrics_are_opened() {
    // Set before any thread that could read the environment exists; one test, so
    // that no other test of this file reads it meanwhile.
    std::env::set_var("FLUMEN_TEST_AUTH_TOKEN", "sesame");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(guarded_by_default());
    rt.block_on(health_and_metrics_open_only_when_named());
    rt.block_on(the_status_page_opens_only_when_named());
}

async fn guarded_by_default() {
    let running = gateway("").await;
    for (path, without, with) in statuses(&running).await {
        assert_eq!(without, 401, "{path} answered without the token");
        let expected = if path == "/no/such/path" { 404 } else { 200 };
        assert_eq!(with, expected, "{path} with the token");
    }
    let body: serde_json::Value = reqwest::get(format!("http://{}/metrics", running.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    #[cfg(feature = "grpc")]
    grpc::check(&running, false).await;
    running.stopper().stop();
}

async fn health_and_metrics_open_only_when_named() {
    let running = gateway("unauthenticated = [\"health\", \"metrics\"]").await;
    for (path, without, _) in statuses(&running).await {
        let open = path.contains("health") || path == "/metrics";
        assert_eq!(without == 200, open, "{path}: {without} without the token");
        if !open {
            assert_eq!(without, 401, "{path}");
        }
    }
    #[cfg(feature = "grpc")]
    grpc::check(&running, true).await;
    running.stopper().stop();
}

async fn the_status_page_opens_only_when_named() {
    let running = gateway("unauthenticated = [\"status\"]").await;
    for (path, without, _) in statuses(&running).await {
        let open = path == "/" || path == "/status.json" || path.starts_with("/assets/");
        assert_eq!(without == 200, open, "{path}: {without} without the token");
    }
    running.stopper().stop();
}

#[test]
fn an_unknown_open_endpoint_is_refused_by_name() {
    let err = ServeConfig::from_toml(
        "[server]\nunauthenticated = [\"health\", \"models\"]\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\n",
    )
    .unwrap_err();
    assert!(
        err.iter()
            .any(|p| p.contains("server.unauthenticated[1]") && p.contains("models")),
        "{err:?}"
    );
}

#[cfg(feature = "grpc")]
mod grpc {
    use flumen_kserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use flumen_kserve::grpc::proto::{ModelMetadataRequest, ServerLiveRequest};

    /// ServerLive answers without the token only when health is open; model metadata
    /// never does, and does with it.
    pub async fn check(running: &flumen_gateway::serve::Running, health_open: bool) {
        let addr = running.grpc_addr.expect("a gRPC listener");
        let mut c = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let live = c.server_live(ServerLiveRequest {}).await;
        assert_eq!(live.is_ok(), health_open, "{live:?}");
        if let Err(s) = live {
            assert_eq!(s.code(), tonic::Code::Unauthenticated);
        }
        let meta = c
            .model_metadata(ModelMetadataRequest {
                name: "echo".into(),
                version: String::new(),
            })
            .await;
        assert_eq!(meta.unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut req = tonic::Request::new(ModelMetadataRequest {
            name: "echo".into(),
            version: String::new(),
        });
        req.metadata_mut()
            .insert("authorization", "Bearer sesame".parse().unwrap());
        assert!(c.model_metadata(req).await.is_ok());
    }
}
