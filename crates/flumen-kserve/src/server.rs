//! A local Triton Inference Server for tests and benchmarks: started from the
//! install of `scripts/triton.sh`, with Python-backend models written into a
//! temporary model repository, on free loopback ports; killed on drop.
//!
//! Test support, not API: compiled only with the `test-support` feature, for this
//! crate's tests, the CLI's tests and the benchmarks.

use std::net::TcpListener;
#[cfg(unix)]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

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
    binary: PathBuf,
    server: PathBuf,
    http: u16,
    grpc: u16,
    metrics: u16,
    repo: PathBuf,
}

impl Drop for TritonServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.repo);
    }
}

/// A loopback port nothing listens on now, for a child process to bind.
///
/// Picked *below* the kernel's ephemeral range: a port the kernel handed out for
/// `127.0.0.1:0` is released before the child binds it, and in between any outgoing
/// connection on the machine may take it as its local port (or a probe may connect to
/// itself on it, the TCP "self-connect"). Ports below the range are only ever taken by
/// an explicit bind. Successive calls in one process walk the range from a start drawn
/// from the process id and the clock, so parallel tests and processes rarely meet.
pub fn free_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = ephemeral.saturating_sub(12_000).max(1024);
    let span = ephemeral.saturating_sub(low);
    if span < 1000 {
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    // One starting point per process, so that successive calls step through distinct
    // ports (97 is prime, so the steps cover the span before any repeats); a start
    // drawn per call could land two calls on the same port.
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7919) ^ nanos
    });
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + start.wrapping_add(step.wrapping_mul(97)) % span;
        let port = u16::try_from(port).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where the project's scripts install test peers: `$FLUMEN_DEPS`, by default
/// `.deps` in the repository.
fn deps_dir() -> PathBuf {
    std::env::var_os("FLUMEN_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps"))
}

/// Where `scripts/triton.sh` installed Triton: `$FLUMEN_DEPS/triton`, by default
/// `.deps/triton` in the repository.
pub fn install_dir() -> PathBuf {
    deps_dir().join("triton")
}

/// Where `scripts/pyclients.sh` installed the official Python clients (`openai`,
/// `tritonclient`), for `PYTHONPATH`.
///
/// # Panics
/// When they are not installed, saying how to install them.
pub fn python_clients() -> PathBuf {
    let dir = deps_dir().join("py");
    assert!(
        dir.join(".installed-2").exists(),
        "the Python clients are not installed: run `bash scripts/pyclients.sh` (scripts/test.sh does)"
    );
    dir
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
        let child = spawn(&binary, &server, &repo, [http, grpc, metrics])?;
        Ok(TritonServer {
            child,
            binary,
            server,
            http,
            grpc,
            metrics,
            repo,
        })
    }

    /// Kills the server (SIGKILL, as a crash) and starts it again on the same ports
    /// with the same models; like [`TritonServer::start`], it returns before the new
    /// server is ready.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.child = spawn(
            &self.binary,
            &self.server,
            &self.repo,
            [self.http, self.grpc, self.metrics],
        )?;
        Ok(())
    }

    /// Kills the whole process group: tritonserver and its Python backend stubs, which
    /// a kill of the server alone would leave orphaned.
    fn kill(&mut self) {
        #[cfg(unix)]
        {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The HTTP root, e.g. `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// The gRPC port.
    pub fn grpc_port(&self) -> u16 {
        self.grpc
    }

    /// What Triton has counted for `model` so far (from its statistics endpoint), or
    /// `None` when it does not say.
    pub async fn counts(&self, model: &str) -> Option<Counts> {
        let url = format!("{}/v2/models/{model}/stats", self.http_url());
        let v: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        let s = &v["model_stats"][0];
        Some(Counts {
            requests: s["inference_stats"]["success"]["count"].as_u64()?,
            rows: s["inference_count"].as_u64()?,
            executions: s["execution_count"].as_u64()?,
        })
    }
}

/// A model's statistics in Triton: since the server started, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests answered successfully.
    pub requests: u64,
    /// Rows inferred (a batched request counts each of its rows).
    pub rows: u64,
    /// Model executions (one per batch the server formed).
    pub executions: u64,
}

impl Counts {
    /// Rows per execution between `earlier` and `self`, if any ran.
    pub fn rows_per_execution_since(&self, earlier: Counts) -> Option<f64> {
        let e = self.executions.checked_sub(earlier.executions)?;
        (e > 0).then(|| self.rows.saturating_sub(earlier.rows) as f64 / e as f64)
    }

    /// Requests per row between `earlier` and `self`, if any row was inferred.
    pub fn requests_per_row_since(&self, earlier: Counts) -> Option<f64> {
        let r = self.rows.checked_sub(earlier.rows)?;
        (r > 0).then(|| self.requests.saturating_sub(earlier.requests) as f64 / r as f64)
    }
}

/// tritonserver over `repo` on loopback `ports` (HTTP, gRPC, metrics), in its own
/// process group.
fn spawn(binary: &Path, server: &Path, repo: &Path, ports: [u16; 3]) -> std::io::Result<Child> {
    let [http, grpc, metrics] = ports.map(|p| p.to_string());
    Command::new(binary)
        .arg(format!("--model-repository={}", repo.display()))
        .arg(format!(
            "--backend-directory={}",
            server.join("backends").display()
        ))
        .args(["--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1"])
        .args(["--http-port", &http, "--grpc-port", &grpc])
        .args(["--metrics-port", &metrics])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
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

/// A two-input, two-output model, like Triton's own `add_sub` example:
/// `FP32 INPUT0[4]`, `FP32 INPUT1[4]` → `FP32 OUTPUT0[4] = INPUT0 + INPUT1`,
/// `FP32 OUTPUT1[4] = INPUT0 − INPUT1`; max batch 8.
pub fn add_sub_model(name: &str) -> PythonModel {
    PythonModel {
        name: name.into(),
        config: "max_batch_size: 8\n\
                 input [ { name: \"INPUT0\", data_type: TYPE_FP32, dims: [ 4 ] },\n\
                 \x20       { name: \"INPUT1\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n\
                 output [ { name: \"OUTPUT0\", data_type: TYPE_FP32, dims: [ 4 ] },\n\
                 \x20        { name: \"OUTPUT1\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n"
            .into(),
        execute: "        out = []\n\
                  \x20       for r in requests:\n\
                  \x20           a = pb_utils.get_input_tensor_by_name(r, 'INPUT0').as_numpy()\n\
                  \x20           b = pb_utils.get_input_tensor_by_name(r, 'INPUT1').as_numpy()\n\
                  \x20           out.append(pb_utils.InferenceResponse([pb_utils.Tensor('OUTPUT0', (a + b).astype(np.float32)), pb_utils.Tensor('OUTPUT1', (a - b).astype(np.float32))]))\n\
                  \x20       return out"
            .into(),
    }
}

/// The text model: `BYTES TEXT[1] → INT32 LENGTH[1]`, each row's length in
/// characters (UTF-8 decoded); `max_batch`; Triton's dynamic batcher when
/// `dynamic_batching`. Its computation is negligible, so its cost is Triton's own
/// per-request and per-execution work (HTTP, scheduling, the Python backend's IPC).
pub fn text_model(name: &str, max_batch: usize, dynamic_batching: bool) -> PythonModel {
    PythonModel {
        name: name.into(),
        config: format!(
            "max_batch_size: {max_batch}\n\
             input [ {{ name: \"TEXT\", data_type: TYPE_STRING, dims: [ 1 ] }} ]\n\
             output [ {{ name: \"LENGTH\", data_type: TYPE_INT32, dims: [ 1 ] }} ]\n{}",
            if dynamic_batching { "dynamic_batching { }\n" } else { "" }
        ),
        execute: "        out = []\n\
                  \x20       for r in requests:\n\
                  \x20           t = pb_utils.get_input_tensor_by_name(r, 'TEXT').as_numpy()\n\
                  \x20           n = np.array([[len(s[0].decode('utf-8'))] for s in t], dtype=np.int32)\n\
                  \x20           out.append(pb_utils.InferenceResponse([pb_utils.Tensor('LENGTH', n)]))\n\
                  \x20       return out"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_distinct_and_below_the_ephemeral_range() {
        let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
            return; // not Linux: the fallback is the kernel's own choice
        };
        let ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        let ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!(
                p < ephemeral,
                "{p} is in the ephemeral range from {ephemeral}"
            );
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
