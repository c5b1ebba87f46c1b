//! The gateway, started in process, with clients no one here wrote: the official
//! `openai` package and `tritonclient` (HTTP, and gRPC with the `grpc` feature),
//! installed from PyPI by `scripts/pyclients.sh`. The `embed` model is served by a
//! real Triton server behind the gateway, `echo` by the simulator, and `minilm` (with
//! the `embedded` feature) by the in-process model.

use flumen_gateway::serve::{start, ServeConfig};
use flumen_kserve::server::{python_clients as pyclients, PythonModel, TritonServer};

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
auth = {"Authorization": "Bearer tok-123"}
assert t.is_server_live(headers=auth) and t.is_server_ready(headers=auth)
assert t.is_model_ready("echo", headers=auth)
assert not t.is_model_ready("echo"), "model readiness without a token was answered"
x = httpclient.InferInput("INPUT", [3, 1], "FP32")
x.set_data_from_numpy(np.array([[1.5], [2.0], [3.0]], dtype=np.float32), binary_data=False)
res = t.infer("echo", [x], outputs=[httpclient.InferRequestedOutput("OUTPUT", binary_data=False)],
              headers={"Authorization": "Bearer tok-123"})
assert res.as_numpy("OUTPUT").reshape(-1).tolist() == [1.5, 2.0, 3.0], res.as_numpy("OUTPUT")
# tritonclient's defaults: binary tensors both ways (inputs, and outputs whether named or not).
x = httpclient.InferInput("INPUT", [3, 1], "FP32")
x.set_data_from_numpy(np.array([[1.5], [2.0], [3.0]], dtype=np.float32))
for outputs in [None, [httpclient.InferRequestedOutput("OUTPUT")]]:
    res = t.infer("echo", [x], outputs=outputs, headers=auth)
    assert res.as_numpy("OUTPUT").reshape(-1).tolist() == [1.5, 2.0, 3.0], res.as_numpy("OUTPUT")
# The Triton model's own tensors, TEXT in and EMB out, as its metadata says.
meta = t.get_model_metadata("embed", headers=auth)
assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("TEXT", "BYTES")], meta
assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [("EMB", "FP32", [-1, 4])], meta
text = httpclient.InferInput("TEXT", [2, 1], "BYTES")
text.set_data_from_numpy(np.array([[b"hello"], [b"caf\xc3\xa9"]], dtype=np.object_))
res = t.infer("embed", [text], headers=auth)
assert res.as_numpy("EMB").tolist() == [[5.0, 2.0, 0.0, 1.0], [4.0, 1.0, 0.0, 1.0]], res.as_numpy("EMB")
s = httpclient.InferInput("INPUT", [2, 1], "BYTES")
s.set_data_from_numpy(np.array([[b"hello"], [b"caf\xc3\xa9"]], dtype=np.object_))
res = t.infer("echo", [s], headers=auth)
assert [v.decode() for v in res.as_numpy("OUTPUT").reshape(-1)] == ["hello", "café"], res.as_numpy("OUTPUT")
print("TRITONCLIENT HTTP BINARY OK")
if len(sys.argv) > 2:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    g = grpcclient.InferenceServerClient(url=f"127.0.0.1:{sys.argv[2]}")
    gauth = {"authorization": "Bearer tok-123"}
    assert g.is_server_live(headers=gauth) and g.is_server_ready(headers=gauth) and g.is_model_ready("echo", headers=gauth)
    x = grpcclient.InferInput("INPUT", [2, 1], "FP32")
    x.set_data_from_numpy(np.array([[4.0], [5.5]], dtype=np.float32))
    res = g.infer("echo", [x], headers={"authorization": "Bearer tok-123"}, client_timeout=10)
    assert res.as_numpy("OUTPUT").reshape(-1).tolist() == [4.0, 5.5], res.as_numpy("OUTPUT")
    t = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"hello"], [b"caf\xc3\xa9"]], dtype=np.object_))
    res = g.infer("embed", [t], headers={"authorization": "Bearer tok-123"})
    assert res.as_numpy("EMB").tolist() == [[5.0, 2.0, 0.0, 1.0], [4.0, 1.0, 0.0, 1.0]], res.as_numpy("EMB")
    try:
        g.infer("echo", [x])
        raise SystemExit("gRPC without a token was accepted")
    except InferenceServerException as e:
        assert "UNAUTHENTICATED" in str(e.status()), e.status()
    print("GRPC OK")

with urllib.request.urlopen(urllib.request.Request(base + "/metrics", headers=auth)) as resp:
    text = resp.read().decode()
assert "flumen_batch_size" in text and 'outcome="ok"' in text, text[:2000]
print("ALL OK")
"#;

#[test]
fn official_openai_and_tritonclient_talk_to_the_gateway() {
    // Set before any thread that could read the environment exists.
    std::env::set_var("FLUMEN_TEST_GATEWAY_TOKEN", "tok-123");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(talk());
}

async fn talk() {
    let py = pyclients();
    let triton = tokio::task::spawn_blocking(|| TritonServer::start(&[embed_model()]))
        .await
        .unwrap()
        .expect("tritonserver starts (bash scripts/triton.sh)");
    let grpc = if cfg!(feature = "grpc") {
        "grpc_listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let embedded = if cfg!(feature = "embedded") {
        "\n[[models]]\nname = \"minilm\"\n[models.backend]\nkind = \"embedded\"\n"
    } else {
        ""
    };
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{grpc}api_key_env = \"FLUMEN_TEST_GATEWAY_TOKEN\"\nmax_body_bytes = 20000\nmax_items = 100\n\n\
         [[models]]\nname = \"embed\"\n[models.backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"embed\"\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\nb_ms = 0.01\n{embedded}",
        triton.http_url()
    ))
    .unwrap();
    // `start` connects to Triton (waiting for readiness) and binds before it returns.
    let running = start(&config).await.unwrap();
    let dir = std::env::temp_dir().join(format!("flumen-gateway-clients-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let mut args = vec![running.addr.port().to_string()];
    args.extend(running.grpc_addr.map(|a| a.port().to_string()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .args(&args)
            .env("PYTHONPATH", &py)
            .env(
                "FLUMEN_TEST_EMBEDDED",
                if cfg!(feature = "embedded") { "1" } else { "0" },
            )
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    if cfg!(feature = "grpc") {
        assert!(stdout.contains("GRPC OK"), "{stdout}");
    }
    running.stopper().stop();
    running.finished().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
