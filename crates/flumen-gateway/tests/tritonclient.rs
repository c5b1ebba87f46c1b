//! The official `tritonclient` (HTTP, and gRPC with the `grpc` feature), used the
//! way a Triton user writes it — metadata first, inputs and outputs built from it —
//! against a real Triton serving a two-input, two-output model: the same script
//! runs against Triton itself and against `flumen serve` in front of it, and must
//! pass both.

use std::process::Command;

use flumen_gateway::serve::{start, ServeConfig};
use flumen_kserve::server::{add_sub_model, python_clients, TritonServer};

/// A Triton user's script: `URL MODEL PROTOCOL`.
const USER: &str = r#"
import sys
import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

url, model, protocol = sys.argv[1], sys.argv[2], sys.argv[3]
if protocol == "http":
    import tritonclient.http as tc
    client = tc.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model)
else:
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(url=url)
    meta = client.get_model_metadata(model, as_json=True)

assert client.is_server_live() and client.is_server_ready()
assert client.is_model_ready(model)
assert not client.is_model_ready("no_such_model")

rng = np.random.default_rng(7)
batch = 3
def tensors(inputs_meta, batch):
    made, arrays = [], {}
    for i in inputs_meta:
        shape = [batch if d == -1 else d for d in (int(x) for x in i["shape"])]
        a = rng.standard_normal(shape).astype(triton_to_np_dtype(i["datatype"]))
        t = tc.InferInput(i["name"], shape, i["datatype"])
        t.set_data_from_numpy(a)
        made.append(t)
        arrays[i["name"]] = a
    return made, arrays

inputs, arrays = tensors(meta["inputs"], batch)
names = [o["name"] for o in meta["outputs"]]
assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"], meta
assert names == ["OUTPUT0", "OUTPUT1"], meta
assert all(i["datatype"] == "FP32" and [int(x) for x in i["shape"]] == [-1, 4] for i in meta["inputs"]), meta

# Every output, asked for by name.
res = client.infer(model, inputs, outputs=[tc.InferRequestedOutput(n) for n in names])
a, b = arrays["INPUT0"], arrays["INPUT1"]
assert np.allclose(res.as_numpy("OUTPUT0"), a + b), res.as_numpy("OUTPUT0")
assert np.allclose(res.as_numpy("OUTPUT1"), a - b), res.as_numpy("OUTPUT1")
assert res.as_numpy("OUTPUT0").dtype == np.float32 and res.as_numpy("OUTPUT0").shape == (batch, 4)
# None named: all of them.
res = client.infer(model, inputs)
assert np.allclose(res.as_numpy("OUTPUT1"), a - b)
# One of them: only that one.
res = client.infer(model, inputs, outputs=[tc.InferRequestedOutput("OUTPUT1")])
assert res.as_numpy("OUTPUT0") is None and np.allclose(res.as_numpy("OUTPUT1"), a - b)
# JSON tensors instead of binary ones (HTTP's other encoding).
if protocol == "http":
    json_inputs = []
    for name, arr in arrays.items():
        t = tc.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr, binary_data=False)
        json_inputs.append(t)
    res = client.infer(model, json_inputs, outputs=[tc.InferRequestedOutput("OUTPUT0", binary_data=False)])
    assert np.allclose(res.as_numpy("OUTPUT0"), a + b)
# Compressed both ways (HTTP's Content-Encoding and Accept-Encoding).
if protocol == "http":
    for algorithm in ["gzip", "deflate"]:
        res = client.infer(model, inputs, request_compression_algorithm=algorithm,
                           response_compression_algorithm=algorithm)
        assert np.allclose(res.as_numpy("OUTPUT0"), a + b), algorithm
# A versioned call.
res = client.infer(model, inputs, model_version="1")
assert np.allclose(res.as_numpy("OUTPUT0"), a + b)

def refused(inputs, outputs=None, expect=""):
    try:
        client.infer(model, inputs, outputs=outputs)
    except InferenceServerException as e:
        assert expect in e.message(), (expect, e.message())
        return e.message()
    raise SystemExit(f"accepted, but should be refused: {expect}")

x0 = tc.InferInput("INPUT0", [batch, 4], "FP32"); x0.set_data_from_numpy(a)
x1 = tc.InferInput("INPUT1", [batch, 4], "FP32"); x1.set_data_from_numpy(b)
wrong_type = tc.InferInput("INPUT1", [batch, 4], "FP64"); wrong_type.set_data_from_numpy(b.astype(np.float64))
wrong_name = tc.InferInput("INPUT9", [batch, 4], "FP32"); wrong_name.set_data_from_numpy(b)
wrong_shape = tc.InferInput("INPUT1", [batch, 2], "FP32"); wrong_shape.set_data_from_numpy(b[:, :2].copy())
print(refused([x0], expect=f"expected 2 inputs but got 1 inputs for model '{model}'"))
print(refused([x0, wrong_type], expect=f"inference input 'INPUT1' data-type is 'FP64', but model '{model}' expects 'FP32'"))
print(refused([x0, wrong_name], expect=f"unexpected inference input 'INPUT9' for model '{model}'"))
print(refused([x0, wrong_shape], expect=f"unexpected shape for input 'INPUT1' for model '{model}'"))
print(refused([x0, x1], outputs=[tc.InferRequestedOutput("OUTPUT7")], expect=f"unexpected inference output 'OUTPUT7' for model '{model}'"))

if protocol == "grpc":
    config = client.get_model_config(model, as_json=True)["config"]
    assert int(config.get("max_batch_size", 0)) == 8, config
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"], config
    assert config["input"][0]["data_type"] == "TYPE_FP32" and [int(d) for d in config["input"][0]["dims"]] == [4], config
    stats = client.get_inference_statistics(model, as_json=True)
    assert stats["model_stats"][0]["name"] == model and int(stats["model_stats"][0]["inference_count"]) > 0, stats
if protocol == "http":
    config = client.get_model_config(model)
    # Over gRPC the backend is not told max_batch_size; it was given max_batch_items 8.
    assert config["max_batch_size"] == 8, config
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"], config
    stats = client.get_inference_statistics(model)
    assert stats["model_stats"][0]["name"] == model and stats["model_stats"][0]["inference_count"] > 0, stats
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"], server
print("TRITON USER OK", protocol)
"#;

fn run_user(
    py: &std::path::Path,
    script: &std::path::Path,
    url: &str,
    model: &str,
    protocol: &str,
) {
    let out = Command::new("python3")
        .arg(script)
        .args([url, model, protocol])
        .env("PYTHONPATH", py)
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{model} over {protocol} at {url}:\n{stdout}");
    assert!(
        out.status.success() && stdout.contains("TRITON USER OK"),
        "{model} over {protocol} at {url}:\nstdout: {stdout}\nstderr: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triton_users_script_passes_against_triton_and_against_the_gateway() {
    let py = python_clients();
    let triton = tokio::task::spawn_blocking(|| TritonServer::start(&[add_sub_model("add_sub")]))
        .await
        .unwrap()
        .expect("tritonserver starts (bash scripts/triton.sh installs it)");
    let grpc = if cfg!(feature = "grpc") {
        "grpc_listen = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    // The same model through the gateway's KServe backend over HTTP, and (with the
    // `grpc` feature) over gRPC.
    let via_grpc = if cfg!(feature = "grpc") {
        format!(
            "[[models]]\nname = \"add_sub_via_grpc\"\n[models.backend]\nkind = \"kserve\"\nprotocol = \"grpc\"\n\
             url = \"http://127.0.0.1:{}\"\nmodel = \"add_sub\"\nmax_batch_items = 8\n",
            triton.grpc_port()
        )
    } else {
        String::new()
    };
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{grpc}\n\
         [[models]]\nname = \"add_sub\"\n[models.backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"add_sub\"\n\n{via_grpc}",
        triton.http_url()
    ))
    .unwrap();
    let gateway = start(&config).await.unwrap();
    let dir = std::env::temp_dir().join(format!("flumen-tritonclient-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("user.py");
    std::fs::write(&script, USER).unwrap();

    let direct = triton.http_url().trim_start_matches("http://").to_owned();
    let through = gateway.addr.to_string();
    let mut runs = vec![
        (direct, "add_sub", "http"),
        (through.clone(), "add_sub", "http"),
    ];
    if cfg!(feature = "grpc") {
        let grpc_front = gateway.grpc_addr.unwrap().to_string();
        runs.push((
            format!("127.0.0.1:{}", triton.grpc_port()),
            "add_sub",
            "grpc",
        ));
        runs.push((grpc_front.clone(), "add_sub", "grpc"));
        runs.push((through, "add_sub_via_grpc", "http"));
        runs.push((grpc_front, "add_sub_via_grpc", "grpc"));
    }
    for (url, model, protocol) in runs {
        let (py, script) = (py.clone(), script.clone());
        tokio::task::spawn_blocking(move || run_user(&py, &script, &url, model, protocol))
            .await
            .unwrap();
    }
    gateway.stopper().stop();
    std::fs::remove_dir_all(&dir).ok();
}
