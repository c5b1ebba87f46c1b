//! `flumen serve` as a command: a bad configuration file, HTTPS, the access log (in
//! the JSON logs, naming the tenant of a key from the keys file, which SIGHUP reads
//! again), and SIGTERM draining every listener, with the official `openai` package and
//! `tritonclient` (installed from PyPI by `scripts/pyclients.sh`) as callers. The
//! gateway's protocols with those clients are tested in process in
//! `flumen-gateway/tests/clients.rs`.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{free_port, Killed as Gateway};
use flumen_kserve::server::python_clients as pyclients;

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

/// The hex SHA-256 of `key`, as a keys file holds it.
fn sha256(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
fn the_access_log_names_the_tenant_not_its_key_and_sighup_reads_the_keys_file_again() {
    use std::io::{BufRead, Read};
    let dir = std::env::temp_dir().join(format!("flumen-serve-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = dir.join("log.toml");
    // One tenant, whose key is hashed in the file.
    let keys = dir.join("keys.toml");
    let keys_for = |key: &str| {
        format!(
            "[[tenants]]\nname = \"acme\"\nkeys_sha256 = [\"{}\"]\n",
            sha256(key)
        )
    };
    std::fs::write(&keys, keys_for("acme-secret-key-7")).unwrap();
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\napi_key_env = \"FLUMEN_TEST_LOG_TOKEN\"\nkeys_file = \"{}\"\nlog_requests = true\n\n[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n", keys.display()),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["--log-format", "json", "serve", config.to_str().unwrap()])
        .env("FLUMEN_TEST_LOG_TOKEN", "sekrit-token-42")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flumen serve starts");
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
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
    assert!(request("acme-secret-key-7").starts_with("HTTP/1.1 200"));
    // The key changes in place, the file keeping its length and modification time
    // (so that only SIGHUP makes the gateway read it again).
    // Written aside and renamed over it, so that the gateway never sees the new
    // content with a new time.
    let modified = std::fs::metadata(&keys).unwrap().modified().unwrap();
    let aside = dir.join("keys.toml.new");
    std::fs::write(&aside, keys_for("acme-secret-key-8")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&aside)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    std::fs::rename(&aside, &keys).unwrap();
    std::thread::sleep(Duration::from_millis(2_500));
    assert!(
        request("acme-secret-key-8").starts_with("HTTP/1.1 401"),
        "read again without SIGHUP"
    );
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut reloaded = false;
    for _ in 0..100 {
        if request("acme-secret-key-8").starts_with("HTTP/1.1 200") {
            reloaded = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reloaded, "SIGHUP did not read the keys file again");
    assert!(request("acme-secret-key-7").starts_with("HTTP/1.1 401"));
    let mut logged = Vec::new();
    for _ in 0..100 {
        logged = lines.lock().unwrap().clone();
        if logged
            .iter()
            .filter(|l| l.contains("\"message\":\"request\""))
            .count()
            >= 6
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let events: Vec<serde_json::Value> = logged
        .iter()
        .map(|l| serde_json::from_str(l).expect("each log line is JSON"))
        .collect();
    let requests: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["fields"]["message"] == "request")
        .map(|e| &e["fields"])
        .collect();
    assert!(requests.len() >= 6, "{logged:#?}");
    assert_eq!(requests[0]["path"], "/v1/chat/completions");
    assert_eq!(requests[0]["method"], "POST");
    assert_eq!(requests[0]["status"], 200);
    assert_eq!(requests[1]["status"], 401);
    // The tenant is named (the shared token and a wrong key name none); its key is not.
    let tenants: Vec<&str> = requests
        .iter()
        .map(|r| r["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants[..3], ["-", "-", "acme"]);
    // The new key, once read again, names the tenant too.
    assert!(
        tenants.iter().filter(|t| **t == "acme").count() >= 2,
        "{tenants:?}"
    );
    assert!(requests.iter().all(|r| r["ms"].as_f64().is_some()));
    assert!(events.iter().all(|e| e["timestamp"].is_string()));
    let all = logged.join("\n");
    for secret in [
        "sekrit-token-42",
        "payload-secret-text",
        "hidden",
        "acme-secret-key",
    ] {
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
