//! Tenants through the gateway over HTTP: keys from a file (hashed), each tenant's
//! quotas answered with 429 and a `Retry-After` saying when it refills, priority
//! asked by header, per-tenant metrics, and the file read again when it changes —
//! a file with errors keeps the previous keys and the quotas used so far.
// Waiting (bounded) for a background reload of the keys file is not timing logic
// under test.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use flumen_gateway::serve::{start, ServeConfig};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OpenAI-compatible embeddings upstream: [length, 1.0] per input.
async fn upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/v1/embeddings",
        post(|Json(body): Json<Value>| async move {
            let inputs = body["input"].as_array().cloned().unwrap_or_default();
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    json!({"object": "embedding", "index": i,
                                      "embedding": [t.as_str().unwrap_or("").len() as f32, 1.0]})
                })
                .collect();
            Json(json!({"object": "list", "data": data, "model": "e",
                        "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn keys_file(extra: &str) -> String {
    format!(
        "[[tenants]]\nname = \"alpha\"\nkeys_sha256 = [\"{}\"]\nclass = \"interactive\"\nrpm = 3\n\n\
         [[tenants]]\nname = \"beta\"\nkeys_sha256 = [\"{}\"]\nclass = \"bulk\"\nmax_pending = 2\ntpm = 50\n{extra}",
        digest("alpha-key"),
        digest("beta-key")
    )
}

struct Caller {
    http: reqwest::Client,
    base: String,
}

impl Caller {
    async fn post(
        &self,
        key: &str,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, Value) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(&body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.send().await.unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            r.status().as_u16(),
            retry,
            r.json().await.unwrap_or(Value::Null),
        )
    }

    /// The Prometheus page, asked with `key`.
    async fn metrics(&self, key: &str) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn chat(
        &self,
        key: &str,
        n: u32,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, Value) {
        let body = json!({"model": "echo", "n": n,
                          "messages": [{"role": "user", "content": "hello"}]});
        self.post(key, "/v1/chat/completions", body, headers).await
    }
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_name_tenants_whose_quotas_answer_429_and_a_reload_keeps_what_was_used() {
    let dir = std::env::temp_dir().join(format!("flumen-tenants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, keys_file("")).unwrap();
    let url = upstream().await;
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nkeys_file = \"{}\"\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n\n\
         [[models]]\nname = \"vec\"\n[models.backend]\nkind = \"openai-embeddings\"\nbase_url = \"{url}\"\nmodel = \"e\"\n",
        keys.display()
    ))
    .unwrap();
    let gateway = start(&config).await.unwrap();
    let c = Caller {
        http: reqwest::Client::new(),
        base: format!("http://{}", gateway.addr),
    };

    // Only a tenant's key lets a request in.
    assert_eq!(c.chat("", 1, &[]).await.0, 401);
    assert_eq!(c.chat("alpha-keyy", 1, &[]).await.0, 401);

    // alpha: 3 requests a minute. The fourth is refused until one refills (20 s).
    for _ in 0..3 {
        assert_eq!(c.chat("alpha-key", 1, &[]).await.0, 200);
    }
    let (status, retry, body) = c.chat("alpha-key", 1, &[]).await;
    assert_eq!(status, 429, "{body}");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After: {retry}");
    assert!(
        message(&body).contains("alpha") && message(&body).contains("rpm"),
        "{body}"
    );

    // beta: 2 records pending at most; 50 tokens a minute.
    let (status, _, body) = c.chat("beta-key", 3, &[]).await;
    assert_eq!(status, 429, "{body}");
    assert!(message(&body).contains("max_pending"), "{body}");
    assert_eq!(c.chat("beta-key", 2, &[]).await.0, 200);
    let long = "word ".repeat(200);
    let (status, retry, body) = c
        .post(
            "beta-key",
            "/v1/embeddings",
            json!({"model": "vec", "input": [long]}),
            &[],
        )
        .await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some());
    assert!(message(&body).contains("tpm"), "{body}");
    let (status, _, body) = c
        .post(
            "beta-key",
            "/v1/embeddings",
            json!({"model": "vec", "input": ["short"]}),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // A priority that is not a class is refused, naming the header.
    let (status, _, body) = c
        .chat("beta-key", 1, &[("x-flumen-priority", "urgent")])
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(message(&body).contains("x-flumen-priority"), "{body}");

    // Rejections are counted per tenant and quota.
    let metrics = c.metrics("beta-key").await;
    for (tenant, quota) in [("alpha", "rpm"), ("beta", "pending"), ("beta", "tpm")] {
        let line =
            format!("flumen_tenant_rejections_total{{tenant=\"{tenant}\",quota=\"{quota}\"}} 1");
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }

    // A new tenant in the file is let in once the file is read again.
    std::fs::write(
        &keys,
        keys_file(&format!(
            "\n[[tenants]]\nname = \"gamma\"\nkeys_sha256 = [\"{}\"]\n",
            digest("gamma-key")
        )),
    )
    .unwrap();
    let mut admitted = false;
    for _ in 0..100 {
        if c.chat("gamma-key", 1, &[]).await.0 == 200 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "gamma's key was never read");
    // alpha's bucket was kept through the reload: still empty.
    assert_eq!(c.chat("alpha-key", 1, &[]).await.0, 429);

    // A file with errors is refused whole: gamma stays, and nobody new gets in.
    std::fs::write(
        &keys,
        keys_file(&format!(
            "\n[[tenants]]\nname = \"alpha\"\nkeys_sha256 = [\"{}\"]\n",
            digest("delta-key")
        )),
    )
    .unwrap();
    // The file is looked at each second: wait until the gateway has refused it.
    let mut refused = false;
    for _ in 0..100 {
        let metrics = c.metrics("gamma-key").await;
        if metrics.contains("flumen_keys_file_reloads_total{result=\"refused\"} 1") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the file with errors was never read");
    assert_eq!(c.chat("gamma-key", 1, &[]).await.0, 200);
    assert_eq!(c.chat("delta-key", 1, &[]).await.0, 401);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_gateway_with_a_bad_keys_file_does_not_start_and_says_why() {
    let dir = std::env::temp_dir().join(format!("flumen-tenants-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[tenants]]\nname = \"a\"\nkeys_sha256 = [\"abc\"]\nclass = \"vip\"\n",
    )
    .unwrap();
    let problems = ServeConfig::from_toml(&format!(
        "[server]\nkeys_file = \"{}\"\n\n[[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\n",
        keys.display()
    ))
    .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains("line 3") && problems[0].contains("SHA-256"),
        "{problems:#?}"
    );
    assert!(
        problems[1].contains("line 4") && problems[1].contains("`vip`"),
        "{problems:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Two replicas sharing Redis share a tenant's quota: 4 requests a minute between
/// them, not 4 each.
#[cfg(feature = "redis-cache")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_share_a_tenants_quota() {
    let redis =
        flumen_cache::server::RedisServer::start(flumen_kserve::server::free_port().unwrap())
            .unwrap();
    let dir = std::env::temp_dir().join(format!("flumen-tenants-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[tenants]]\nname = \"shared\"\nkeys_sha256 = [\"{}\"]\nrpm = 4\n",
            digest("shared-key")
        ),
    )
    .unwrap();
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nkeys_file = \"{}\"\n\n\
         [quota]\nstore = \"redis\"\nurl = \"{}\"\nreplicas = 2\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 1.0\n",
        keys.display(),
        redis.url()
    ))
    .unwrap();
    let (a, b) = (start(&config).await.unwrap(), start(&config).await.unwrap());
    let http = reqwest::Client::new();
    let (ca, cb) = (
        Caller {
            http: http.clone(),
            base: format!("http://{}", a.addr),
        },
        Caller {
            http,
            base: format!("http://{}", b.addr),
        },
    );
    for _ in 0..2 {
        assert_eq!(ca.chat("shared-key", 1, &[]).await.0, 200);
        assert_eq!(cb.chat("shared-key", 1, &[]).await.0, 200);
    }
    let (status, retry, body) = ca.chat("shared-key", 1, &[]).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some());
    assert_eq!(cb.chat("shared-key", 1, &[]).await.0, 429);
    std::fs::remove_dir_all(&dir).ok();
}

/// Through the gateway the class a request asks for decides where its records wait.
/// One tenant (so that fair shares between tenants play no part) sends 24 requests
/// of 8 records marked `x-flumen-priority: bulk` to a model of one slot and 8
/// records a call (60 ms a call); then one unmarked request (its tenant's class,
/// `interactive`) and one more marked bulk. The interactive request comes back
/// before most of the bulk requests sent before it, the late bulk one after them.
/// What is checked is the order, not the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_request_overtakes_a_bulk_backlog_of_its_tenant() {
    let dir = std::env::temp_dir().join(format!("flumen-tenants-order-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[tenants]]\nname = \"mixed\"\nkeys_sha256 = [\"{}\"]\nclass = \"interactive\"\n",
            digest("mixed-key")
        ),
    )
    .unwrap();
    let config = ServeConfig::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nkeys_file = \"{}\"\n\n\
         [[models]]\nname = \"echo\"\n[models.backend]\nkind = \"sim\"\na_ms = 60.0\nb_ms = 0.1\nslots = 1\nmax_batch = 8\n\
         [models.engine]\nconcurrency = 1\n",
        keys.display()
    ))
    .unwrap();
    let gateway = start(&config).await.unwrap();
    let c = Arc::new(Caller {
        http: reqwest::Client::new(),
        base: format!("http://{}", gateway.addr),
    });
    let done = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let send = |bulk: bool, label: String| {
        let (c, done) = (Arc::clone(&c), Arc::clone(&done));
        tokio::spawn(async move {
            let marked: &[(&str, &str)] = if bulk {
                &[("x-flumen-priority", "bulk")]
            } else {
                &[]
            };
            let (status, _, body) = c.chat("mixed-key", 8, marked).await;
            assert_eq!(status, 200, "{label}: {body}");
            done.lock().unwrap().push(label);
        })
    };
    let mut tasks: Vec<_> = (0..24).map(|i| send(true, format!("bulk {i}"))).collect();
    // Let the backlog reach the queue (a few of its 24 calls are done by then).
    tokio::time::sleep(Duration::from_millis(200)).await;
    tasks.push(send(false, "live".into()));
    tasks.push(send(true, "bulk late".into()));
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    let at = |label: &str| order.iter().position(|l| l == label).unwrap();
    assert!(at("live") < 8, "{order:?}");
    assert!(at("bulk late") >= 20, "{order:?}");
    std::fs::remove_dir_all(&dir).ok();
}
