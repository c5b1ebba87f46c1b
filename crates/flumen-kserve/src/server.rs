//! A local Triton Inference Server for tests and benchmarks: started from the
//! install of `scripts/triton.sh`, with Python-backend models written into a
//! temporary model repository, on free loopback ports; killed on drop.

use std::net::TcpListener;
#[cfg(unix)]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A Python-backend model to serve.
#[derive(Debug, Clone)]
pub struct PythonModel {
    /// The model's name.
    pub name: String,
    /// `config.pbtxt` without its `name` and `backend` lines.
    pub config: String,
    /// The body of `execute(self, requests)`, indented by eight spaces; `time`,
    /// `np` and `pb_utils` are imported.
    pub execute: String,
}

/// A running tritonserver, killed on drop.
pub struct TritonServer {
    child: Child,
    http: u16,
    grpc: u16,
    repo: PathBuf,
}

impl Drop for TritonServer {
    fn drop(&mut self) {
        // The whole process group: tritonserver and its Python backend stubs, which a
        // kill of the server alone would leave orphaned.
        #[cfg(unix)]
        {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.repo);
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where `scripts/triton.sh` installed Triton: `$FLUMEN_DEPS/triton`, by default
/// `.deps/triton` in the repository.
pub fn install_dir() -> PathBuf {
    std::env::var_os("FLUMEN_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps"))
        .join("triton")
}

impl TritonServer {
    /// Starts tritonserver with `models`; it answers once [`crate::KserveHttp::connect`]
    /// says it is ready.
    pub fn start(models: &[PythonModel]) -> std::io::Result<TritonServer> {
        let dir = install_dir();
        let server = dir.join("pkg/pytriton/tritonserver");
        let binary = server.join("bin/tritonserver");
        if !binary.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "Triton is not installed at {}: run `bash scripts/triton.sh`",
                    dir.display()
                ),
            ));
        }
        let pylib = dir.join("pylib").canonicalize()?;
        let repo = std::env::temp_dir().join(format!(
            "flumen-triton-{}-{}",
            std::process::id(),
            free_port()?
        ));
        for m in models {
            let version = repo.join(&m.name).join("1");
            std::fs::create_dir_all(&version)?;
            let config = format!("name: \"{}\"\nbackend: \"python\"\n{}", m.name, m.config);
            std::fs::write(repo.join(&m.name).join("config.pbtxt"), config)?;
            let code = format!(
                "import sys\nsys.path.insert(0, {pylib:?})\nimport time\nimport numpy as np\n\
                 import triton_python_backend_utils as pb_utils\n\n\
                 class TritonPythonModel:\n    def execute(self, requests):\n{}\n",
                m.execute,
                pylib = pylib.display().to_string()
            );
            std::fs::write(version.join("model.py"), code)?;
        }
        let (http, grpc, metrics) = (free_port()?, free_port()?, free_port()?);
        let child = Command::new(binary)
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
            .args(["--metrics-port", &metrics.to_string()])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(TritonServer {
            child,
            http,
            grpc,
            repo,
        })
    }

    /// The HTTP root, e.g. `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// The gRPC port.
    pub fn grpc_port(&self) -> u16 {
        self.grpc
    }
}

/// The cost model: `FP32 X[1] → FP32 Y[1] = 2·X`; each execution sleeps
/// `a + b·n` for its `n` rows; `instances` parallel instances; `max_batch`;
/// Triton's dynamic batcher when `dynamic_batching`.
pub fn cost_model(
    name: &str,
    a_ms: f64,
    b_ms: f64,
    instances: usize,
    max_batch: usize,
    dynamic_batching: bool,
) -> PythonModel {
    PythonModel {
        name: name.into(),
        config: format!(
            "max_batch_size: {max_batch}\n\
             input [ {{ name: \"X\", data_type: TYPE_FP32, dims: [ 1 ] }} ]\n\
             output [ {{ name: \"Y\", data_type: TYPE_FP32, dims: [ 1 ] }} ]\n\
             instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]\n{}",
            if dynamic_batching { "dynamic_batching { }\n" } else { "" }
        ),
        execute: format!(
            "        xs = [pb_utils.get_input_tensor_by_name(r, 'X').as_numpy() for r in requests]\n\
             \x20       time.sleep({a} + {b} * sum(x.shape[0] for x in xs))\n\
             \x20       return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', np.ascontiguousarray(x * 2, dtype=np.float32))]) for x in xs]",
            a = a_ms / 1e3,
            b = b_ms / 1e3
        ),
    }
}
