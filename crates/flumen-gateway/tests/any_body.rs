//! Any request body, to either front of a running gateway over real HTTP, is
//! answered — never a dropped connection (a panic) — and every error is shaped as
//! its protocol shapes errors: OpenAI's `{"error": {"message", "type", "param",
//! "code"}}` under `/v1`, Triton's `{"error": "…"}` under `/v2`.

use std::sync::OnceLock;

use flumen_gateway::serve::{start, Running, ServeConfig};
use proptest::prelude::*;
use serde_json::{json, Value};

/// One runtime and one gateway for every case.
fn gateway() -> &'static (tokio::runtime::Runtime, Running, reqwest::Client) {
    static GATEWAY: OnceLock<(tokio::runtime::Runtime, Running, reqwest::Client)> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = ServeConfig::from_toml(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 4096\nmax_items = 16\n\n\
             [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 0.1\n",
        )
        .unwrap();
        let running = rt.block_on(start(&config)).unwrap();
        (rt, running, reqwest::Client::new())
    })
}

/// JSON values of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("model".to_owned()),
                    Just("input".to_owned()),
                    Just("messages".to_owned()),
                    Just("inputs".to_owned()),
                    Just("data".to_owned()),
                    Just("shape".to_owned()),
                    Just("datatype".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bodies: raw bytes, any JSON, or a valid request with one field replaced.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        Just(json!({"model": "echo", "input": ["a", "b"]})),
        Just(json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]})),
        Just(
            json!({"inputs": [{"name": "X", "shape": [2, 1], "datatype": "FP32", "data": [1.0, 2.0]}]})
        ),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (valid, "[a-z]{1,8}", any_json()).prop_map(|(mut v, key, value)| {
            v[key.as_str()] = value;
            serde_json::to_vec(&v).unwrap()
        }),
    ]
}

proptest! {
    // A fixed seed: the same cases on every run and every machine.
    #![proptest_config(ProptestConfig {
        cases: 400,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5EED_B0D1),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_body_gets_an_answer_in_its_protocols_shape(
        body in any_body(),
        path in prop::sample::select(vec![
            "/v1/embeddings", "/v1/chat/completions", "/v1/nothing",
            "/v2/models/echo/infer", "/v2/models/none/infer", "/v2/models/echo",
            "/v2/models/echo/versions/1/infer", "/v2/models/echo/versions/7/infer",
        ]),
        content_type in prop::sample::select(vec!["application/json", "application/octet-stream", "text/plain", ""]),
        header_length in prop::option::of(0usize..700),
        encoding in prop::sample::select(vec!["", "", "gzip", "deflate", "br"]),
    ) {
        let (rt, running, http) = gateway();
        let url = format!("http://{}{path}", running.addr);
        let (status, text) = rt.block_on(async {
            let mut req = http.post(&url).body(body.clone());
            if !content_type.is_empty() {
                req = req.header("content-type", content_type);
            }
            if !encoding.is_empty() {
                req = req.header("content-encoding", encoding);
            }
            if let Some(n) = header_length {
                req = req.header("inference-header-content-length", n.to_string());
            }
            let r = req.send().await.expect("an answer, not a dropped connection");
            (r.status(), r.bytes().await.expect("a whole answer"))
        });
        if status.is_success() {
            return Ok(());
        }
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| TestCaseError::fail(format!("{status} {path}: not JSON ({e}): {}", String::from_utf8_lossy(&text))))?;
        if path.starts_with("/v2/") {
            prop_assert!(v["error"].is_string(), "{} {}: {}", status, path, v);
        } else {
            prop_assert!(v["error"]["message"].is_string(), "{} {}: {}", status, path, v);
            prop_assert!(v["error"]["type"].is_string(), "{} {}: {}", status, path, v);
            let e = v["error"].as_object().unwrap();
            prop_assert!(e.contains_key("param") && e.contains_key("code"), "{} {}: {}", status, path, v);
        }
    }
}
