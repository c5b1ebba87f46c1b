//! The KServe v2 HTTP backend against a real Triton Inference Server (CPU), installed
//! by `scripts/triton.sh` and started here with Python-backend models generated for
//! each test: a cost model (`a + b·n` per execution, 2 instances, max batch 64), a
//! text model (BYTES in, length out) and a model with a one-request queue.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flumen_core::{Backend, ErrorKind};
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_kserve::{KserveConfig, KserveHttp};
use futures::{stream, StreamExt};
use serde_json::{json, Value};

/// A running tritonserver, killed on drop.
struct Triton {
    child: Child,
    http: u16,
    _repo: TempDir,
}

impl Drop for Triton {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn triton_dir() -> PathBuf {
    let deps = std::env::var_os("FLUMEN_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps"));
    let dir = deps.join("triton");
    assert!(
        dir.join("pkg/pytriton/tritonserver/bin/tritonserver")
            .exists(),
        "Triton is not installed: run `bash scripts/triton.sh` (scripts/test.sh does)"
    );
    dir
}

/// Writes a Python-backend model: `config.pbtxt` and `1/model.py`.
fn model(repo: &Path, name: &str, config: &str, execute: &str, pylib: &Path) {
    let dir = repo.join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        repo.join(name).join("config.pbtxt"),
        format!("name: \"{name}\"\nbackend: \"python\"\n{config}"),
    )
    .unwrap();
    let code = format!(
        "import sys\nsys.path.insert(0, {pylib:?})\nimport time\nimport numpy as np\nimport triton_python_backend_utils as pb_utils\n\n\
         class TritonPythonModel:\n    def execute(self, requests):\n{execute}\n",
        pylib = pylib.display().to_string()
    );
    std::fs::write(dir.join("model.py"), code).unwrap();
}

fn start() -> Triton {
    let dir = triton_dir();
    let server = dir.join("pkg/pytriton/tritonserver");
    let repo = std::env::temp_dir().join(format!(
        "flumen-triton-{}-{}",
        std::process::id(),
        free_port()
    ));
    let pylib = dir.join("pylib").canonicalize().unwrap();
    model(
        &repo,
        "cost",
        "max_batch_size: 64\n\
         input [ { name: \"X\", data_type: TYPE_FP32, dims: [ 1 ] } ]\n\
         output [ { name: \"Y\", data_type: TYPE_FP32, dims: [ 1 ] } ]\n\
         instance_group [ { count: 2, kind: KIND_CPU } ]\n",
        "        xs = [pb_utils.get_input_tensor_by_name(r, 'X').as_numpy() for r in requests]\n\
         \x20       time.sleep(0.020 + 0.0005 * sum(x.shape[0] for x in xs))\n\
         \x20       return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', np.ascontiguousarray(x * 2, dtype=np.float32))]) for x in xs]",
        &pylib,
    );
    model(
        &repo,
        "text",
        "max_batch_size: 32\n\
         input [ { name: \"TEXT\", data_type: TYPE_STRING, dims: [ 1 ] } ]\n\
         output [ { name: \"LENGTH\", data_type: TYPE_INT32, dims: [ 1 ] } ]\n",
        "        out = []\n\
         \x20       for r in requests:\n\
         \x20           t = pb_utils.get_input_tensor_by_name(r, 'TEXT').as_numpy()\n\
         \x20           n = np.array([[len(s[0].decode('utf-8'))] for s in t], dtype=np.int32)\n\
         \x20           out.append(pb_utils.InferenceResponse([pb_utils.Tensor('LENGTH', n)]))\n\
         \x20       return out",
        &pylib,
    );
    model(
        &repo,
        "queued",
        "max_batch_size: 1\n\
         input [ { name: \"X\", data_type: TYPE_FP32, dims: [ 1 ] } ]\n\
         output [ { name: \"Y\", data_type: TYPE_FP32, dims: [ 1 ] } ]\n\
         instance_group [ { count: 1, kind: KIND_CPU } ]\n\
         dynamic_batching { default_queue_policy { max_queue_size: 1 } }\n",
        "        time.sleep(0.3)\n\
         \x20       return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', pb_utils.get_input_tensor_by_name(r, 'X').as_numpy())]) for r in requests]",
        &pylib,
    );
    let (http, grpc, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(server.join("bin/tritonserver"))
        .arg(format!("--model-repository={}", repo.display()))
        .arg(format!(
            "--backend-directory={}",
            server.join("backends").display()
        ))
        .args(["--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1"])
        .args([
            "--http-port",
            &http.to_string(),
            "--grpc-port",
            &grpc.to_string(),
        ])
        .args(["--metrics-port", &metrics.to_string(), "--log-verbose", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tritonserver starts");
    Triton {
        child,
        http,
        _repo: TempDir(repo),
    }
}

impl Triton {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    async fn connect(&self, model: &str) -> KserveHttp {
        KserveHttp::connect(KserveConfig::new(self.url(), model))
            .await
            .unwrap()
    }

    async fn stats(&self, model: &str) -> Value {
        let url = format!("{}/v2/models/{model}/stats", self.url());
        reqwest::get(url).await.unwrap().json().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_become_rows_of_a_batch_tensor_and_come_back_out() {
    let triton = start();
    let backend = triton.connect("cost").await;
    assert_eq!(backend.max_batch(), 64, "read from the model's config");
    assert_eq!(backend.input().datatype, "FP32");
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
    let stats = triton.stats("cost").await;
    let s = &stats["model_stats"][0];
    assert_eq!(s["inference_count"], 1_000, "{s}");
    let executions = s["execution_count"].as_u64().unwrap();
    assert!(executions <= 40, "{executions} executions for 1,000 rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_tensors_carry_text() {
    let triton = start();
    let engine = Engine::new(triton.connect("text").await, EngineConfig::default());
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
async fn errors_triton_really_returns_are_classified() {
    let triton = start();
    // An unknown model: connect says so, with Triton's words.
    let mut config = KserveConfig::new(triton.url(), "no_such_model");
    config.ready_timeout = Duration::from_secs(2);
    let err = KserveHttp::connect(config)
        .await
        .err()
        .expect("unknown model");
    assert!(err.to_string().contains("no_such_model"), "{err}");

    // A record of the wrong datatype or shape fails alone, as invalid input.
    let backend = triton.connect("cost").await;
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

    // Queue full (max_queue_size 1, one instance busy 300 ms): Triton rejects, and
    // the rejection is overload, not failure.
    let queued = Arc::new(triton.connect("queued").await);
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
