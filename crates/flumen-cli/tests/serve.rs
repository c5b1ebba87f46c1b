//! `flumen serve` with clients no one here wrote: the official `openai` package and
//! `tritonclient[http]`, installed from PyPI by `scripts/pyclients.sh`. The `embed`
//! model is served by a real Triton server behind the gateway; `echo` by the simulator.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flumen_kserve::server::{PythonModel, TritonServer};

mod common;
use common::{free_port, Killed as Gateway};

fn pyclients() -> PathBuf {
    let dir = std::env::var_os("FLUMEN_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps"))
        .join("py");
    assert!(
        dir.join(".installed-2").exists(),
        "the Python clients are not installed: run `bash scripts/pyclients.sh` (scripts/test.sh does)"
    );
    dir
}

/// Waits (bounded) until something listens on `port`.
// Waiting for a child process is not timing logic under test.
#[allow(clippy::disallowed_methods)]
fn wait_listening(port: u16, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "flumen serve did not start listening"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `flumen serve CONFIG`, once it listens on `port`.
fn serve(config: &Path, port: u16) -> Gateway {
    let gateway = Gateway(
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["serve", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("flumen serve starts"),
    );
    wait_listening(port, Duration::from_secs(30));
    gateway
}

fn embed_model() -> PythonModel {
    PythonModel {
        name: "embed".into(),
        config: "max_batch_size: 64\n\
                 input [ { name: \"TEXT\", data_type: TYPE_STRING, dims: [ 1 ] } ]\n\
                 output [ { name: \"EMB\", data_type: TYPE_FP32, dims: [ 4 ] } ]\n"
            .into(),
        execute: "        out = []\n\
                  \x20       for r in requests:\n\
                  \x20           t = pb_utils.get_input_tensor_by_name(r, 'TEXT').as_numpy()\n\
                  \x20           e = []\n\
                  \x20           for s in t:\n\
                  \x20               x = s[0].decode('utf-8')\n\
                  \x20               e.append([len(x), sum(c in 'aeiou' for c in x), x.count(' '), 1.0])\n\
                  \x20           out.append(pb_utils.InferenceResponse([pb_utils.Tensor('EMB', np.array(e, dtype=np.float32))]))\n\
                  \x20       return out"
            .into(),
    }
}

const CLIENT: &str = r#"
import json, sys, urllib.request, urllib.error
import numpy as np
import openai
from openai import OpenAI
import tritonclient.http as httpclient

port = sys.argv[1]
base = f"http://127.0.0.1:{port}"
c = OpenAI(base_url=base + "/v1", api_key="tok-123", max_retries=0)
r = c.embeddings.create(model="embed", input=["hello world", "naïve"])
assert [d.index for d in r.data] == [0, 1], r
assert r.data[0].embedding == [11.0, 3.0, 1.0, 1.0], r.data[0].embedding
assert r.data[1].embedding == [5.0, 2.0, 0.0, 1.0], r.data[1].embedding
one = c.embeddings.create(model="embed", input="abc")
assert len(one.data) == 1 and one.data[0].embedding[0] == 3.0
ch = c.chat.completions.create(model="echo", messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "ping"}])
assert ch.choices[0].message.content == "ping", ch
import os
embedded = os.environ.get("FLUMEN_TEST_EMBEDDED") == "1"
assert sorted(m.id for m in c.models.list()) == ["echo", "embed"] + (["minilm"] if embedded else [])
if embedded:
    # The in-process all-MiniLM-L6-v2: unit vectors, paraphrases close.
    e = c.embeddings.create(model="minilm", input=["The parcel arrived on time.", "My package was delivered punctually.", "Quarks feel the strong force."])
    v = [np.array(d.embedding) for d in e.data]
    assert all(len(x) == 384 and abs(np.linalg.norm(x) - 1) < 1e-4 for x in v)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3, (v[0] @ v[1], v[0] @ v[2])
pieces = [ev.choices[0].delta.content for ev in c.chat.completions.create(
    model="echo", messages=[{"role": "user", "content": "streamed"}], stream=True) if ev.choices and ev.choices[0].delta.content]
assert "".join(pieces) == "streamed", pieces

bad = OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
try:
    bad.embeddings.create(model="embed", input="x")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
try:
    c.embeddings.create(model="nope", input="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass

def post(path, data, ctype="application/json"):
    req = urllib.request.Request(base + path, data=data, method="POST",
        headers={"Content-Type": ctype, "Authorization": "Bearer tok-123"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

status, body = post("/v1/embeddings", b'{"model": "embed", "input": [')
assert status == 400, (status, body)
status, body = post("/v1/embeddings", json.dumps({"model": "embed", "input": ["x" * 100] * 300}).encode())
assert status == 413, (status, body)

# Bad requests (wrong token, oversized, malformed) while good callers work: the good
# ones all succeed.
import threading
good_results = []
def good_caller(k):
    cc = OpenAI(base_url=base + "/v1", api_key="tok-123", max_retries=0)
    for j in range(20):
        r = cc.chat.completions.create(model="echo", messages=[{"role": "user", "content": f"g{k}-{j}"}])
        good_results.append(r.choices[0].message.content == f"g{k}-{j}")
def bad_caller():
    for _ in range(20):
        assert post("/v1/embeddings", b'{"model": "embed", "input": [')[0] == 400
        assert post("/v1/embeddings", json.dumps({"model": "embed", "input": ["x" * 100] * 300}).encode())[0] == 413
        try:
            bad.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
            raise SystemExit("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
threads = [threading.Thread(target=good_caller, args=(k,)) for k in range(4)] + [threading.Thread(target=bad_caller)]
for th in threads:
    th.start()
for th in threads:
    th.join()
assert len(good_results) == 80 and all(good_results), good_results

t = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
assert t.is_server_live() and t.is_server_ready()
assert t.is_model_ready("echo")
x = httpclient.InferInput("INPUT", [3, 1], "FP32")
x.set_data_from_numpy(np.array([[1.5], [2.0], [3.0]], dtype=np.float32), binary_data=False)
res = t.infer("echo", [x], outputs=[httpclient.InferRequestedOutput("OUTPUT", binary_data=False)],
              headers={"Authorization": "Bearer tok-123"})
assert res.as_numpy("OUTPUT").reshape(-1).tolist() == [1.5, 2.0, 3.0], res.as_numpy("OUTPUT")
# tritonclient's defaults: binary tensors both ways (inputs, and outputs whether named or not).
auth = {"Authorization": "Bearer tok-123"}
x = httpclient.InferInput("INPUT", [3, 1], "FP32")
x.set_data_from_numpy(np.array([[1.5], [2.0], [3.0]], dtype=np.float32))
for outputs in [None, [httpclient.InferRequestedOutput("OUTPUT")]]:
    res = t.infer("echo", [x], outputs=outputs, headers=auth)
    assert res.as_numpy("OUTPUT").reshape(-1).tolist() == [1.5, 2.0, 3.0], res.as_numpy("OUTPUT")
s = httpclient.InferInput("INPUT", [2, 1], "BYTES")
s.set_data_from_numpy(np.array([[b"hello"], [b"caf\xc3\xa9"]], dtype=np.object_))
res = t.infer("embed", [s], headers=auth)
assert res.as_numpy("OUTPUT").tolist() == [[5.0, 2.0, 0.0, 1.0], [4.0, 1.0, 0.0, 1.0]], res.as_numpy("OUTPUT")
res = t.infer("echo", [s], headers=auth)
assert [v.decode() for v in res.as_numpy("OUTPUT").reshape(-1)] == ["hello", "café"], res.as_numpy("OUTPUT")
print("TRITONCLIENT HTTP BINARY OK")
if len(sys.argv) > 2:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    g = grpcclient.InferenceServerClient(url=f"127.0.0.1:{sys.argv[2]}")
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("echo")
    x = grpcclient.InferInput("INPUT", [2, 1], "FP32")
    x.set_data_from_numpy(np.array([[4.0], [5.5]], dtype=np.float32))
    res = g.infer("echo", [x], headers={"authorization": "Bearer tok-123"}, client_timeout=10)
    assert res.as_numpy("OUTPUT").reshape(-1).tolist() == [4.0, 5.5], res.as_numpy("OUTPUT")
    t = grpcclient.InferInput("INPUT", [2, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"hello"], [b"caf\xc3\xa9"]], dtype=np.object_))
    res = g.infer("embed", [t], headers={"authorization": "Bearer tok-123"})
    assert res.as_numpy("OUTPUT").tolist() == [[5.0, 2.0, 0.0, 1.0], [4.0, 1.0, 0.0, 1.0]], res.as_numpy("OUTPUT")
    try:
        g.infer("echo", [x])
        raise SystemExit("gRPC without a token was accepted")
    except InferenceServerException as e:
        assert "UNAUTHENTICATED" in str(e.status()), e.status()
    print("GRPC OK")

with urllib.request.urlopen(base + "/metrics") as resp:
    text = resp.read().decode()
assert "flumen_batch_size" in text and 'outcome="ok"' in text, text[:2000]
print("ALL OK")
"#;

// Waiting (bounded) for a child process to listen is not timing logic under test.
#[allow(clippy::disallowed_methods)]
#[test]
fn official_openai_and_tritonclient_talk_to_flumen_serve() {
    let py = pyclients();
    let triton = TritonServer::start(&[embed_model()])
        .expect("tritonserver starts (bash scripts/triton.sh)");
    let free = || free_port();
    let (port, grpc_port) = (free(), free());
    let grpc = if cfg!(feature = "grpc") {
        format!("grpc_listen = \"127.0.0.1:{grpc_port}\"\n")
    } else {
        String::new()
    };
    let embedded = if cfg!(feature = "embedded") {
        "\n[[models]]\nname = \"minilm\"\n[models.backend]\nkind = \"embedded\"\n"
    } else {
        ""
    };
    let dir = std::env::temp_dir().join(format!("flumen-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{grpc}api_key_env = \"FLUMEN_TEST_GATEWAY_TOKEN\"\nmax_body_bytes = 20000\nmax_items = 100\n\n\
             [[models]]\nname = \"embed\"\n[models.backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"embed\"\n\n\
             [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\nb_ms = 0.01\n{embedded}",
            triton.http_url()
        ),
    )
    .unwrap();
    let _gateway = Gateway(
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["serve", config.to_str().unwrap()])
            .env("FLUMEN_TEST_GATEWAY_TOKEN", "tok-123")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("flumen serve starts"),
    );
    // The gateway connects to Triton (waiting for readiness) before it listens.
    wait_listening(port, Duration::from_secs(60));
    let script = dir.join("client.py");
    std::fs::File::create(&script)
        .unwrap()
        .write_all(CLIENT.as_bytes())
        .unwrap();
    let mut args = vec![port.to_string()];
    if cfg!(feature = "grpc") {
        args.push(grpc_port.to_string());
    }
    let out = Command::new("python3")
        .arg(&script)
        .args(&args)
        .env("PYTHONPATH", &py)
        .env(
            "FLUMEN_TEST_EMBEDDED",
            if cfg!(feature = "embedded") { "1" } else { "0" },
        )
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_gateway_config_reports_every_problem() {
    let dir = std::env::temp_dir().join(format!("flumen-serve-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"nowhere\"\nmax_items = 0\n\n[[models]]\nname = \"a\"\n[models.backend]\nkind = \"sim\"\nslots = 0\n\n[[models]]\nname = \"a\"\n[models.backend]\nkind = \"sim\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["serve", config.to_str().unwrap()])
        .output()
        .unwrap();
    common::names_every_problem(
        &out,
        &[
            "server.listen",
            "server.max_items",
            "models[0].backend.slots",
            "models[1].name",
        ],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A self-signed certificate for 127.0.0.1 and its key, written into `dir`.
#[cfg(feature = "tls")]
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[cfg(feature = "tls")]
// Waiting (bounded) for a child process to listen is not timing logic under test.
#[allow(clippy::disallowed_methods)]
#[test]
fn the_gateway_speaks_https_with_its_certificate() {
    let py = pyclients();
    let dir = std::env::temp_dir().join(format!("flumen-serve-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = self_signed(&dir);
    let port = free_port();
    let config = dir.join("tls.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n",
            cert_path.display(),
            key_path.display()
        ),
    )
    .unwrap();
    let _gateway = serve(&config, port);
    let script = format!(
        "import sys, httpx\nfrom openai import OpenAI\n\
         c = OpenAI(base_url='https://127.0.0.1:{port}/v1', api_key='x', max_retries=0, http_client=httpx.Client(verify={cert:?}))\n\
         r = c.chat.completions.create(model='echo', messages=[{{'role': 'user', 'content': 'over tls'}}])\n\
         assert r.choices[0].message.content == 'over tls', r\n\
         try:\n    httpx.get('http://127.0.0.1:{port}/health/live', timeout=5)\n    raise SystemExit('plain HTTP was answered')\n\
         except httpx.HTTPError:\n    pass\nprint('TLS OK')\n",
        cert = cert_path.display().to_string()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .env("PYTHONPATH", &py)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("TLS OK"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

// Waiting (bounded) for a child process to listen is not timing logic under test.
#[allow(clippy::disallowed_methods)]
#[test]
fn the_access_log_is_one_json_line_per_request_without_payloads_or_tokens() {
    use std::io::{BufRead, Read};
    let dir = std::env::temp_dir().join(format!("flumen-serve-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = dir.join("log.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\napi_key_env = \"FLUMEN_TEST_LOG_TOKEN\"\nlog_requests = true\n\n[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["serve", config.to_str().unwrap()])
        .env("FLUMEN_TEST_LOG_TOKEN", "sekrit-token-42")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen serve starts");
    let stderr = child.stderr.take().unwrap();
    let _gateway = Gateway(child);
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(l);
        }
    });
    wait_listening(port, Duration::from_secs(30));
    let request = |auth: &str| {
        let body = r#"{"model": "echo", "messages": [{"role": "user", "content": "payload-secret-text"}]}"#;
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "POST /v1/chat/completions?q=hidden HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(request("sekrit-token-42").starts_with("HTTP/1.1 200"));
    assert!(request("wrong").starts_with("HTTP/1.1 401"));
    let mut logged = Vec::new();
    for _ in 0..100 {
        logged = lines.lock().unwrap().clone();
        if logged
            .iter()
            .filter(|l| l.contains("\"event\":\"request\""))
            .count()
            >= 2
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let requests: Vec<serde_json::Value> = logged
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("each log line is JSON"))
        .collect();
    assert_eq!(requests.len(), 2, "{logged:#?}");
    assert_eq!(requests[0]["path"], "/v1/chat/completions");
    assert_eq!(requests[0]["method"], "POST");
    assert_eq!(requests[0]["status"], 200);
    assert_eq!(requests[1]["status"], 401);
    assert!(requests
        .iter()
        .all(|r| r["ms"].as_f64().is_some() && r["ts"].as_f64().is_some()));
    let all = logged.join("\n");
    for secret in ["sekrit-token-42", "payload-secret-text", "hidden"] {
        assert!(
            !all.contains(secret),
            "`{secret}` leaked into the log: {all}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Six requests to a slow model (one record per call, 300 ms each), SIGTERM once all
/// six are in the engine: every one is answered, then the gateway exits 0 and a new
/// request finds nobody listening. Driven from Python (`httpx`), which signals the
/// gateway itself so that it knows what is in flight at that moment.
const DRAIN: &str = r#"
import os, signal, sys, threading, time, httpx
base, pid, verify, grpc_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
verify = True if verify == "-" else verify
results = []
def call(i):
    if grpc_port != "-":
        import numpy as np
        import tritonclient.grpc as grpcclient
        g = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        x = grpcclient.InferInput("x", [1, 1], "FP32")
        x.set_data_from_numpy(np.array([[float(i)]], dtype=np.float32))
        results.append((200, float(g.infer("slow", [x], client_timeout=60).as_numpy("OUTPUT").reshape(-1)[0])))
        return
    with httpx.Client(verify=verify, timeout=60) as c:
        r = c.post(base + "/v2/models/slow/infer",
                   json={"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [float(i)]}]})
        results.append((r.status_code, r.json()["outputs"][0]["data"][0] if r.status_code == 200 else r.text))
threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
for t in threads:
    t.start()
def in_engine(text):
    lines = [l for l in text.splitlines() if 'engine="slow"' in l]
    value = lambda name: sum(float(l.rsplit(" ", 1)[1]) for l in lines if l.startswith(name + "{"))
    return value("flumen_queue_depth") + value("flumen_batches_in_flight")
with httpx.Client(verify=verify, timeout=10) as c:
    for _ in range(600):
        if in_engine(c.get(base + "/metrics").text) >= 6:
            break
        time.sleep(0.05)
    else:
        raise SystemExit("the six requests never reached the engine")
os.kill(pid, signal.SIGTERM)
for t in threads:
    t.join()
assert sorted(results) == [(200, float(i)) for i in range(6)], results
try:
    httpx.get(base + "/health/live", verify=verify, timeout=5)
    raise SystemExit("a request after the stop was answered")
except httpx.HTTPError:
    pass
if grpc_port != "-":
    import tritonclient.grpc as grpcclient
    try:
        grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}").is_server_live(client_timeout=5)
        raise SystemExit("a gRPC request after the stop was answered")
    except grpcclient.InferenceServerException:
        pass
print("DRAIN OK")
"#;

/// Runs [`DRAIN`] against a `flumen serve` with `server_extra` in `[server]`; the
/// requests go over gRPC to `grpc_port` when there is one.
// Waiting (bounded) for a child process is not timing logic under test.
#[allow(clippy::disallowed_methods)]
fn sigterm_drains(
    name: &str,
    server_extra: &str,
    scheme: &str,
    verify: Option<&Path>,
    grpc_port: Option<u16>,
) {
    let py = pyclients();
    let dir = std::env::temp_dir().join(format!("flumen-serve-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = dir.join("drain.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n{server_extra}\n\
             [[models]]\nname = \"slow\"\n[models.backend]\nkind = \"sim\"\na_ms = 300.0\nslots = 1\nmax_batch = 1\n"
        ),
    )
    .unwrap();
    let mut gateway = serve(&config, port);
    let mut python = Command::new("python3");
    python
        .args(["-c", DRAIN, &format!("{scheme}://127.0.0.1:{port}")])
        .arg(gateway.0.id().to_string())
        .arg(verify.map_or("-".into(), |p| p.display().to_string()))
        .arg(grpc_port.map_or("-".into(), |p| p.to_string()))
        .env("PYTHONPATH", &py);
    let out = python.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("DRAIN OK"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(status) = gateway.0.try_wait().unwrap() {
            break status;
        }
        assert!(waited < Duration::from_secs(30), "the gateway did not exit");
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    };
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_answers_the_requests_in_flight_then_exits() {
    sigterm_drains("drain", "", "http", None, None);
}

#[cfg(feature = "grpc")]
#[test]
fn sigterm_drains_grpc_too() {
    let port = free_port();
    let grpc = format!("grpc_listen = \"127.0.0.1:{port}\"\n");
    sigterm_drains("drain-grpc", &grpc, "http", None, Some(port));
}

#[cfg(feature = "tls")]
#[test]
fn sigterm_drains_https_too() {
    let dir = std::env::temp_dir().join(format!("flumen-drain-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = self_signed(&dir);
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    sigterm_drains("drain-tls", &tls, "https", Some(&cert_path), None);
    std::fs::remove_dir_all(&dir).ok();
}
