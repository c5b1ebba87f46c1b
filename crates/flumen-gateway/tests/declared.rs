//! A model that is not behind a KServe backend shows, over KServe v2, the tensors its
//! `[models.kserve]` section declares, and requests are checked against them as
//! against a Triton model's own; a bad declaration is refused by path.

use flumen_gateway::serve::{start, ServeConfig};
use serde_json::{json, Value};

const MODELS: &str = "[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 0.5\n\
    [models.kserve]\ninputs = [{ name = \"TEXT\", datatype = \"BYTES\", shape = [-1, 1] }]\n\
    outputs = [{ name = \"ECHO\", datatype = \"BYTES\", shape = [-1, 1] }]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_tensors_are_served_and_checked() {
    let config =
        ServeConfig::from_toml(&format!("[server]\nlisten = \"127.0.0.1:0\"\n\n{MODELS}")).unwrap();
    let gateway = start(&config).await.unwrap();
    let base = format!("http://{}/v2/models/echo", gateway.addr);
    let http = reqwest::Client::new();
    let meta: Value = http.get(&base).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        meta["inputs"],
        json!([{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}])
    );
    assert_eq!(
        meta["outputs"],
        json!([{"name": "ECHO", "datatype": "BYTES", "shape": [-1, 1]}])
    );
    let config: Value = http
        .get(format!("{base}/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["input"][0]["data_type"], "TYPE_STRING", "{config}");

    let infer = |name: &str, datatype: &str, data: Value| {
        let body = json!({"inputs": [{"name": name, "shape": [2, 1], "datatype": datatype, "data": data}]});
        let (http, url) = (http.clone(), format!("{base}/infer"));
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = infer("TEXT", "BYTES", json!(["a", "b"])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["name"], "ECHO");
    assert_eq!(answer["outputs"][0]["datatype"], "BYTES");
    assert_eq!(answer["outputs"][0]["data"], json!(["a", "b"]));
    let (status, answer) = infer("INPUT", "BYTES", json!(["a", "b"])).await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["error"],
        "unexpected inference input 'INPUT' for model 'echo'"
    );
    let (status, answer) = infer("TEXT", "FP32", json!([1.0, 2.0])).await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["error"],
        "inference input 'TEXT' data-type is 'FP32', but model 'echo' expects 'BYTES'"
    );
    gateway.stopper().stop();
}

#[test]
fn a_bad_declaration_is_refused_by_path() {
    let bad = "[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\n\
        [models.kserve]\ninputs = [{ name = \"X\", datatype = \"FLOAT\", shape = [4] }]\noutputs = []\n";
    let problems = ServeConfig::from_toml(bad).unwrap_err();
    for expected in [
        "models[0].kserve.inputs[0].datatype: `FLOAT` is not one of",
        "models[0].kserve.inputs[0].shape: [4] must start with -1",
        "models[0].kserve.outputs: at least one tensor is needed",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{expected} not in {problems:?}"
        );
    }
}

/// The example the README points to is a valid configuration.
#[cfg(feature = "embedded")]
#[test]
fn the_example_gateway_config_is_valid() {
    let text = include_str!("../../../examples/config/gateway.toml");
    if let Err(problems) = ServeConfig::from_toml(text) {
        panic!("examples/config/gateway.toml: {problems:?}");
    }
}
