//! An ONNX Runtime backend for Flumen: a user's own model — a classifier, a
//! tabular or vision model — in process, through the `ort` crate, with ONNX
//! Runtime's shared library loaded at run time (the PyPI `onnxruntime` wheel ships
//! it; `scripts/onnx.sh` installs it).
//!
//! The model file says what the backend takes and gives: every input and output
//! must be a numeric tensor whose first dimension is the batch (dynamic: `-1`).
//! A record is one row: for a model with one input, that input's row (a number or a
//! nested array of its shape without the batch); with several, an object of rows by
//! input name. A prediction is the row of the one output, or an object of rows by
//! output name. Rows of a call are stacked into one batch; one session runs a call
//! at a time, on a blocking thread, with the configured intra-op threads.
//!
//! A model exported with token-id inputs takes text instead when a tokenizer is
//! configured (see [`TextConfig`]): an embedder (pooled, normalised) or a
//! classifier or cross-encoder (its logits as they are).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use flumen_core::{Backend, BackendError, BatchResult, Capabilities};
use ort::session::Session;
use ort::value::{Tensor, TensorElementType, ValueType};
use serde_json::{json, Value};

mod rows;
mod text;

use rows::{run, Stacked};
use text::Text;
pub use text::{Pooling, TextConfig};

/// The inputs a text model may take, besides `input_ids`.
const TEXT_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// Settings of an ONNX backend.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxConfig {
    /// The model file.
    pub model: PathBuf,
    /// ONNX Runtime's shared library (`libonnxruntime.so`).
    pub runtime: PathBuf,
    /// Intra-op threads of the session.
    pub threads: usize,
    /// Rows per call at most.
    pub max_batch_items: usize,
    /// Text in, through the model's tokenizer: for a model whose inputs are token
    /// ids. `None`: numeric rows in.
    pub text: Option<TextConfig>,
}

/// Why a model cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OnnxError {
    /// The model file is not there.
    #[error("model file {0} does not exist")]
    Missing(String),
    /// ONNX Runtime's library could not be loaded.
    #[error("cannot load ONNX Runtime from {path}: {why}")]
    Runtime {
        /// The library.
        path: String,
        /// Why.
        why: String,
    },
    /// ONNX Runtime refused the file.
    #[error("model file {path} is not a model ONNX Runtime can load: {why}")]
    Corrupt {
        /// The model file.
        path: String,
        /// What ONNX Runtime said.
        why: String,
    },
    /// A tensor's first dimension is fixed: it has no batch dimension.
    #[error("{what} `{name}` has no batch dimension (its shape is {shape:?}; the first dimension must be dynamic)")]
    NoBatch {
        /// `input` or `output`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Its shape, `-1` for a dynamic dimension.
        shape: Vec<i64>,
    },
    /// A text model whose inputs are not token ids, or a tokenizer that does not load.
    #[error("{0}")]
    Text(String),
    /// A tensor of a type this backend does not handle.
    #[error("{what} `{name}` is {ty}: only numeric tensors (float32, float64, int32, int64) are supported")]
    Unsupported {
        /// `input` or `output`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Its type.
        ty: String,
    },
}

/// The element types handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    I32,
    I64,
}

/// One input or output: its name, element type and shape without the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Port {
    name: String,
    elem: Elem,
    dims: Vec<i64>,
}

/// An ONNX model in a session.
pub struct Onnx {
    session: Arc<Mutex<Session>>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
    max_batch_items: usize,
    text: Option<Arc<Text>>,
}

/// ONNX Runtime's shared library in an `onnxruntime` wheel installed under `site`
/// (a `pip install --target` directory, as `scripts/onnx.sh` makes), if it is there.
pub fn runtime_in(site: &Path) -> Option<PathBuf> {
    std::fs::read_dir(site.join("onnxruntime/capi"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
}

/// The process's ONNX Runtime environment (one per process), from the first
/// library asked for.
fn environment(runtime: &Path) -> Result<&'static ort::environment::Environment, OnnxError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    let shown = runtime.display().to_string();
    ENV.get_or_init(|| {
        if !runtime.is_file() {
            return Err("no such file (run `bash scripts/onnx.sh`)".to_owned());
        }
        ort::init_from(runtime)
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|why| OnnxError::Runtime {
        path: shown,
        why: why.clone(),
    })
}

fn port(o: &ort::value::Outlet, what: &'static str) -> Result<Port, OnnxError> {
    let name = o.name().to_owned();
    let (ty, shape) = match o.dtype() {
        ValueType::Tensor { ty, shape, .. } => (*ty, shape.to_vec()),
        other => {
            return Err(OnnxError::Unsupported {
                what,
                name,
                ty: other.to_string(),
            })
        }
    };
    let elem = match ty {
        TensorElementType::Float32 => Elem::F32,
        TensorElementType::Float64 => Elem::F64,
        TensorElementType::Int32 => Elem::I32,
        TensorElementType::Int64 => Elem::I64,
        other => {
            return Err(OnnxError::Unsupported {
                what,
                name,
                ty: format!("a tensor of {other:?}"),
            })
        }
    };
    match shape.first() {
        Some(-1) => Ok(Port {
            name,
            elem,
            dims: shape[1..].to_vec(),
        }),
        _ => Err(OnnxError::NoBatch { what, name, shape }),
    }
}

impl Onnx {
    /// Loads `config.model`, or says why it cannot be served.
    pub fn load(config: &OnnxConfig) -> Result<Onnx, OnnxError> {
        let shown = config.model.display().to_string();
        if !config.model.is_file() {
            return Err(OnnxError::Missing(shown));
        }
        let env = environment(&config.runtime)?;
        let corrupt = |e: ort::Error| OnnxError::Corrupt {
            path: shown.clone(),
            why: e.to_string(),
        };
        let session = Session::builder(env)
            .map_err(corrupt)?
            .with_intra_threads(config.threads.max(1))
            .map_err(|e| corrupt(e.into()))?
            .commit_from_file(&config.model)
            .map_err(corrupt)?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| port(o, "input"))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| port(o, "output"))
            .collect::<Result<Vec<_>, _>>()?;
        let text = match &config.text {
            None => None,
            Some(t) => {
                if let Some(p) = inputs
                    .iter()
                    .find(|p| !TEXT_INPUTS.contains(&p.name.as_str()) || p.elem != Elem::I64)
                {
                    return Err(OnnxError::Text(format!(
                        "input `{}` is not a token-id input: a model that takes text takes int64 input_ids, attention_mask and token_type_ids",
                        p.name
                    )));
                }
                if !inputs.iter().any(|p| p.name == "input_ids") {
                    return Err(OnnxError::Text(
                        "the model has no `input_ids` input: it cannot take text".into(),
                    ));
                }
                if outputs.first().is_none_or(|o| o.elem != Elem::F32) {
                    return Err(OnnxError::Text(
                        "a text model's first output must be float32".into(),
                    ));
                }
                let names = inputs.iter().map(|p| p.name.clone()).collect();
                Some(Arc::new(Text::load(t, names).map_err(OnnxError::Text)?))
            }
        };
        Ok(Onnx {
            session: Arc::new(Mutex::new(session)),
            inputs,
            outputs,
            max_batch_items: config.max_batch_items.max(1),
            text,
        })
    }

    /// The model's inputs and outputs, as `{"inputs": [{name, datatype, shape}], …}`
    /// with the batch dimension as -1.
    pub fn signature(&self) -> Value {
        let ports = |ps: &[Port]| {
            ps.iter()
                .map(|p| {
                    let mut shape = vec![-1];
                    shape.extend(&p.dims);
                    json!({"name": p.name, "datatype": format!("{:?}", p.elem), "shape": shape})
                })
                .collect::<Vec<_>>()
        };
        json!({"inputs": ports(&self.inputs), "outputs": ports(&self.outputs)})
    }

    /// The row of `record` for `input`: the record itself for a model with one
    /// input (or its field of that input's name), else that field.
    fn row<'a>(&self, record: &'a Value, input: &Port) -> Result<&'a Value, BackendError> {
        if self.inputs.len() == 1 {
            return Ok(match record {
                Value::Object(fields) => fields.get(&input.name).unwrap_or(record),
                other => other,
            });
        }
        record.get(&input.name).ok_or_else(|| {
            BackendError::invalid_input(format!(
                "the record has no `{}`: this model takes an object of {}",
                input.name,
                self.inputs
                    .iter()
                    .map(|p| format!("`{}`", p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }
}

impl Onnx {
    /// Text records: tokenized, grouped by length, each group padded to its longest
    /// and run, answered in order.
    async fn call_text(&self, text: &Arc<Text>, batch: &[Value]) -> BatchResult<Value> {
        let mut results: Vec<Option<Result<Value, BackendError>>> = vec![None; batch.len()];
        let mut texts = Vec::new();
        let mut at = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            match r.as_str() {
                Some(t) => {
                    texts.push(t.to_owned());
                    at.push(i);
                }
                None => {
                    results[i] = Some(Err(BackendError::invalid_input(format!(
                        "this model takes text, not {r}"
                    ))))
                }
            }
        }
        if !texts.is_empty() {
            let (session, text, output) = (
                Arc::clone(&self.session),
                Arc::clone(text),
                self.outputs[0].name.clone(),
            );
            let answers =
                tokio::task::spawn_blocking(move || run_text(&session, &text, &output, &texts))
                    .await
                    .map_err(|e| {
                        BackendError::permanent(format!("the ONNX call panicked: {e}"))
                    })??;
            for (i, v) in at.into_iter().zip(answers) {
                results[i] = Some(Ok(Value::Array(v.into_iter().map(|x| json!(x)).collect())));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every record has a result"))
            .collect())
    }
}

fn run_text(
    session: &Mutex<Session>,
    text: &Text,
    output: &str,
    texts: &[String],
) -> Result<Vec<Vec<f32>>, BackendError> {
    let failed = |e: ort::Error| BackendError::permanent(format!("ONNX Runtime: {e}"));
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = text.tokenize(&refs)?;
    let lengths: Vec<usize> = encoded.iter().map(Vec::len).collect();
    let mut answers = vec![Vec::new(); texts.len()];
    let mut session = session
        .lock()
        .map_err(|_| BackendError::permanent("the session panicked"))?;
    // Records of similar length run together, so a short one is not padded to a
    // long neighbour's length.
    for group in text::groups(&lengths) {
        let rows: Vec<&[u32]> = group.iter().map(|&i| &encoded[i][..]).collect();
        let p = Text::pad(&rows);
        let shape = vec![p.batch as i64, p.seq as i64];
        let mut values: Vec<(
            std::borrow::Cow<'static, str>,
            ort::session::SessionInputValue<'static>,
        )> = Vec::new();
        for name in &text.inputs {
            let data = match name.as_str() {
                "input_ids" => p.ids.clone(),
                "attention_mask" => p.mask.clone(),
                _ => vec![0i64; p.ids.len()],
            };
            let tensor = Tensor::from_array((shape.clone(), data)).map_err(failed)?;
            values.push((name.clone().into(), tensor.into()));
        }
        let result = session.run(values).map_err(failed)?;
        let (out_shape, data) = result[output].try_extract_tensor::<f32>().map_err(failed)?;
        for (i, v) in group.iter().zip(text.answers(&p, out_shape, data)) {
            answers[*i] = v;
        }
    }
    Ok(answers)
}

impl Backend for Onnx {
    type Input = Value;
    type Output = Value;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: self.max_batch_items,
            max_batch_bytes: None,
            max_batch_tokens: None,
            idempotent: true,
        }
    }

    async fn call(&self, batch: &[Value]) -> BatchResult<Value> {
        if let Some(text) = &self.text {
            return self.call_text(text, batch).await;
        }
        // Each record's rows, or why it is not one; the good ones are stacked.
        let mut results: Vec<Option<Result<Value, BackendError>>> = vec![None; batch.len()];
        let mut stacked: Vec<Stacked> = self.inputs.iter().map(|_| Stacked::default()).collect();
        let mut ok = Vec::new();
        for (i, record) in batch.iter().enumerate() {
            let checked: Result<Vec<_>, BackendError> = self
                .inputs
                .iter()
                .zip(&stacked)
                .map(|(port, s)| {
                    s.check(port, self.row(record, port)?).map_err(|why| {
                        BackendError::invalid_input(format!("input `{}`: {why}", port.name))
                    })
                })
                .collect();
            match checked {
                Err(e) => results[i] = Some(Err(e)),
                Ok(rows) => {
                    for ((data, shape), s) in rows.into_iter().zip(&mut stacked) {
                        s.push(data, shape);
                    }
                    ok.push(i);
                }
            }
        }
        if !ok.is_empty() {
            let (session, inputs, outputs) = (
                Arc::clone(&self.session),
                self.inputs.clone(),
                self.outputs.clone(),
            );
            let per_output =
                tokio::task::spawn_blocking(move || run(&session, &inputs, &outputs, stacked))
                    .await
                    .map_err(|e| {
                        BackendError::permanent(format!("the ONNX call panicked: {e}"))
                    })??;
            let names: Vec<&str> = self.outputs.iter().map(|p| p.name.as_str()).collect();
            for (k, &i) in ok.iter().enumerate() {
                let prediction = if names.len() == 1 {
                    per_output[0][k].clone()
                } else {
                    Value::Object(
                        names
                            .iter()
                            .zip(&per_output)
                            .map(|(n, rows)| ((*n).to_owned(), rows[k].clone()))
                            .collect(),
                    )
                };
                results[i] = Some(Ok(prediction));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every record has a result"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_model_is_refused_naming_it() {
        let c = OnnxConfig {
            model: "/nonexistent/model.onnx".into(),
            runtime: "/nonexistent/libonnxruntime.so".into(),
            threads: 1,
            max_batch_items: 8,
            text: None,
        };
        let e = Onnx::load(&c).err().unwrap();
        assert_eq!(e, OnnxError::Missing("/nonexistent/model.onnx".into()));
    }
}
