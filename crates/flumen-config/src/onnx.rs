//! `kind = "onnx"`: a model file run in process by ONNX Runtime (the `onnx`
//! feature, `flumen-onnx`), and what the KServe v2 fronts read of it.

use std::path::PathBuf;

use serde::Deserialize;

/// `kind = "onnx"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxSection {
    /// The model file.
    pub model: PathBuf,
    /// ONNX Runtime's shared library (default: `$FLUMEN_ONNXRUNTIME`, else the
    /// one `scripts/onnx.sh` installs under `.deps/onnx`, else `libonnxruntime.so`
    /// on the library path).
    #[serde(default)]
    pub runtime: Option<PathBuf>,
    /// Intra-op threads of the session (default 2).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Rows per call at most (default 64).
    #[serde(default)]
    pub max_batch_items: Option<usize>,
    /// Text in: the model's `tokenizer.json`, for a model whose inputs are token ids
    /// (`input_ids`, `attention_mask`, `token_type_ids`).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// With a tokenizer: `mean` (default), `cls`, or `none` (the first output's
    /// row as it is: a classifier's logits).
    #[serde(default)]
    pub pooling: Option<String>,
    /// With a tokenizer: L2-normalise the pooled vectors (default true, but false
    /// with `pooling = "none"`).
    #[serde(default)]
    pub normalize: Option<bool>,
    /// With a tokenizer: truncate to this many tokens (default 256).
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

impl OnnxSection {
    /// Every problem with these settings, each under `path`.
    pub(crate) fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.threads == Some(0) {
            p.push(format!("{path}.threads: must be > 0"));
        }
        if self.max_batch_items == Some(0) {
            p.push(format!("{path}.max_batch_items: must be > 0"));
        }
        if let Some(other) = self
            .pooling
            .as_deref()
            .filter(|p| !["mean", "cls", "none"].contains(p))
        {
            p.push(format!(
                "{path}.pooling: `{other}` is not mean, cls or none"
            ));
        }
        if self.tokenizer.is_none()
            && (self.pooling.is_some() || self.normalize.is_some() || self.max_tokens.is_some())
        {
            p.push(format!(
                "{path}.tokenizer: pooling, normalize and max_tokens are for a model that takes text: name its tokenizer.json"
            ));
        }
        if self.max_tokens.is_some_and(|n| n < 2) {
            p.push(format!("{path}.max_tokens: must be ≥ 2"));
        }
        if !cfg!(feature = "onnx") {
            p.push(format!(
                "{path}.kind: `onnx` needs flumen built with the `onnx` feature"
            ));
        }
        p
    }

    /// The library to load: the setting, the environment, the project's install,
    /// or the system's.
    #[cfg(feature = "onnx")]
    pub fn runtime(&self) -> PathBuf {
        if let Some(r) = &self.runtime {
            return r.clone();
        }
        if let Some(r) = std::env::var_os("FLUMEN_ONNXRUNTIME") {
            return r.into();
        }
        let deps = std::env::var_os("FLUMEN_DEPS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.deps")));
        flumen_onnx::runtime_in(&deps.join("onnx"))
            .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
    }

    /// What makes the model's answers what they are: the file, by path and size,
    /// and how text becomes its input and its output an answer.
    pub(crate) fn identity(&self) -> String {
        let size = std::fs::metadata(&self.model).map_or(0, |m| m.len());
        format!(
            "onnx model={} bytes={size} tokenizer={:?} pooling={:?} normalize={:?} max_tokens={:?}",
            self.model.display(),
            self.tokenizer,
            self.pooling,
            self.normalize,
            self.max_tokens
        )
    }
}

/// A loaded ONNX model, and its tensors as a KServe v2 server would describe them.
#[cfg(feature = "onnx")]
pub struct OnnxModel {
    pub(crate) onnx: flumen_onnx::Onnx,
    pub(crate) metadata: serde_json::Value,
    pub(crate) signature: flumen_kserve::Signature,
}

#[cfg(feature = "onnx")]
impl OnnxModel {
    /// Loads the section's model, or says why it cannot be served.
    pub(crate) fn load(s: &OnnxSection) -> Result<OnnxModel, Vec<String>> {
        let config = flumen_onnx::OnnxConfig {
            model: s.model.clone(),
            runtime: s.runtime(),
            threads: s.threads.unwrap_or(2),
            max_batch_items: s.max_batch_items.unwrap_or(64),
            text: s.tokenizer.as_ref().map(|t| {
                let pooling = match s.pooling.as_deref() {
                    Some("cls") => flumen_onnx::Pooling::Cls,
                    Some("none") => flumen_onnx::Pooling::None,
                    _ => flumen_onnx::Pooling::Mean,
                };
                flumen_onnx::TextConfig {
                    tokenizer: t.clone(),
                    pooling,
                    normalize: s.normalize.unwrap_or(pooling != flumen_onnx::Pooling::None),
                    max_tokens: s.max_tokens.unwrap_or(256),
                }
            }),
        };
        let onnx = flumen_onnx::Onnx::load(&config).map_err(|e| vec![format!("backend: {e}")])?;
        let kserve = |ports: &serde_json::Value| -> Vec<serde_json::Value> {
            ports
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let datatype = match p["datatype"].as_str() {
                        Some("F32") => "FP32",
                        Some("F64") => "FP64",
                        Some("I32") => "INT32",
                        _ => "INT64",
                    };
                    serde_json::json!({"name": p["name"], "datatype": datatype, "shape": p["shape"]})
                })
                .collect()
        };
        let sig = onnx.signature();
        let name = s
            .model
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or("model");
        let metadata = serde_json::json!({
            "name": name,
            "platform": "onnxruntime_onnx",
            "inputs": kserve(&sig["inputs"]),
            "outputs": kserve(&sig["outputs"]),
        });
        let spec = |v: &serde_json::Value| flumen_kserve::TensorSpec {
            name: v["name"].as_str().unwrap_or_default().to_owned(),
            datatype: v["datatype"].as_str().unwrap_or_default().to_owned(),
            row_shape: v["shape"]
                .as_array()
                .into_iter()
                .flatten()
                .skip(1)
                .filter_map(serde_json::Value::as_i64)
                .collect(),
        };
        let signature = flumen_kserve::Signature {
            inputs: metadata["inputs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(spec)
                .collect(),
            outputs: metadata["outputs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(spec)
                .collect(),
            batched: true,
        };
        Ok(OnnxModel {
            onnx,
            metadata,
            signature,
        })
    }
}
