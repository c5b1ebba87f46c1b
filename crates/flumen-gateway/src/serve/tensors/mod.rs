//! Tensors to records and back, for both KServe v2 fronts (HTTP and gRPC), checked
//! against what the model declares.
//!
//! A model behind a KServe v2 backend declares its own tensors (the backend read
//! them from the server, Triton's metadata): a request must name every input, with
//! the declared datatype and a shape that fits, and may ask for any of the outputs by
//! name — refused otherwise with Triton's messages. Each row of the batch becomes a
//! record: the row itself for one input, else an object with every input's row by
//! name (what [`flumen_kserve::Signature`] takes); a prediction is the row of the one
//! output, else an object by output name. Other backends are checked the same way
//! against the tensors `[models.kserve]` declares for them; without it they show
//! one input `INPUT` and one output `OUTPUT` of any datatype: any single input is
//! taken, and the output's datatype follows the predictions (FP32 for numbers, else
//! BYTES).

use serde_json::{json, Value};

/// One tensor a model declares: its full shape, batch dimension first when the
/// model batches (-1: any size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Declared {
    pub(crate) name: String,
    pub(crate) datatype: String,
    pub(crate) shape: Vec<i64>,
}

/// A model's tensors as the KServe fronts serve and check them.
#[derive(Debug, Clone)]
pub(crate) struct Tensors {
    pub(crate) inputs: Vec<Declared>,
    pub(crate) outputs: Vec<Declared>,
    /// The first dimension is the batch.
    pub(crate) batched: bool,
    /// The backend declared them (KServe): names, datatypes and shapes are checked.
    pub(crate) declared: bool,
    /// `GET /v2/models/{m}`'s `platform` and `versions`.
    pub(crate) platform: String,
    pub(crate) versions: Vec<String>,
    /// The model's configuration as its server gave it (Triton's extension).
    pub(crate) config: Option<Value>,
}

/// Why a request's inputs were refused: they do not fit the model (400), or hold
/// more rows than a request may (413).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unfit {
    Invalid(String),
    TooMany(String),
}

impl Unfit {
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))] // gRPC answers both with a status
    pub(crate) fn message(&self) -> &str {
        match self {
            Unfit::Invalid(m) | Unfit::TooMany(m) => m,
        }
    }
}

/// An input tensor of a request, its elements flat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Input {
    pub(crate) name: String,
    pub(crate) datatype: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) data: Vec<Value>,
}

/// An output tensor of an answer, its elements flat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Output {
    pub(crate) name: String,
    pub(crate) datatype: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) data: Vec<Value>,
}

fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(","))
}

impl Tensors {
    /// What a backend that declares nothing is served as.
    pub(crate) fn generic() -> Tensors {
        let any = |name: &str| Declared {
            name: name.into(),
            datatype: "BYTES".into(),
            shape: vec![-1, -1],
        };
        Tensors {
            inputs: vec![any("INPUT")],
            outputs: vec![any("OUTPUT")],
            batched: true,
            declared: false,
            platform: "flumen".into(),
            versions: vec!["1".into()],
            config: None,
        }
    }

    /// The tensors `[models.kserve]` declares for a backend that does not say.
    pub(crate) fn declared(declared: &super::config::DeclaredTensors) -> Tensors {
        let list = |l: &[super::config::TensorSection]| -> Vec<Declared> {
            l.iter()
                .map(|t| Declared {
                    name: t.name.clone(),
                    datatype: t.datatype.clone(),
                    shape: t.shape.clone(),
                })
                .collect()
        };
        Tensors {
            inputs: list(&declared.inputs),
            outputs: list(&declared.outputs),
            batched: true,
            declared: true,
            platform: "flumen".into(),
            versions: vec!["1".into()],
            config: None,
        }
    }

    /// A KServe backend's tensors: `metadata` as its server gave it, the tensors
    /// the backend fills and reads (`signature`), and its configuration if any.
    pub(crate) fn of_backend(
        metadata: &Value,
        signature: &flumen_kserve::Signature,
        config: Option<&Value>,
    ) -> Tensors {
        let declare = |t: &flumen_kserve::TensorSpec| Declared {
            name: t.name.clone(),
            datatype: t.datatype.clone(),
            shape: if signature.batched {
                std::iter::once(-1)
                    .chain(t.row_shape.iter().copied())
                    .collect()
            } else {
                t.row_shape.clone()
            },
        };
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
        };
        Tensors {
            inputs: signature.inputs.iter().map(declare).collect(),
            outputs: signature.outputs.iter().map(declare).collect(),
            batched: signature.batched,
            declared: true,
            platform: metadata["platform"].as_str().unwrap_or("flumen").to_owned(),
            versions: strings(&metadata["versions"])
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| vec!["1".into()]),
            config: config.cloned(),
        }
    }

    /// The version served when a request names none.
    pub(crate) fn version(&self) -> &str {
        self.versions.first().map_or("1", String::as_str)
    }

    /// `GET /v2/models/{model}` (and gRPC ModelMetadata).
    pub(crate) fn metadata(&self, model: &str) -> Value {
        let tensors = |list: &[Declared]| -> Vec<Value> {
            list.iter()
                .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
                .collect()
        };
        json!({
            "name": model, "versions": self.versions, "platform": self.platform,
            "inputs": tensors(&self.inputs), "outputs": tensors(&self.outputs),
        })
    }

    /// `GET /v2/models/{model}/config`: the server's own, else one in Triton's form
    /// made from the declared tensors.
    pub(crate) fn config(&self, model: &str, max_batch: usize) -> Value {
        if let Some(Value::Object(c)) = &self.config {
            let mut c = c.clone();
            c.insert("name".into(), json!(model));
            return Value::Object(c);
        }
        let tensors = |list: &[Declared]| -> Vec<Value> {
            list.iter()
                .map(|t| {
                    let dims = if self.batched { &t.shape[1..] } else { &t.shape[..] };
                    json!({"name": t.name, "data_type": format!("TYPE_{}", if t.datatype == "BYTES" { "STRING" } else { &t.datatype }), "dims": dims})
                })
                .collect()
        };
        json!({
            "name": model, "platform": self.platform, "backend": "flumen",
            "max_batch_size": if self.batched { max_batch } else { 0 },
            "input": tensors(&self.inputs), "output": tensors(&self.outputs),
        })
    }

    /// The request's inputs as one record per row, at most `max_rows` of them,
    /// checked against the declared inputs (Triton's messages when they do not fit).
    pub(crate) fn records(
        &self,
        model: &str,
        inputs: &[Input],
        max_rows: usize,
    ) -> Result<Vec<Value>, Unfit> {
        let too_many = |n: i64| {
            Unfit::TooMany(format!(
                "{n} rows for model '{model}'; at most {max_rows} per request (server.max_items)"
            ))
        };
        if !self.declared {
            return match inputs {
                [one] => {
                    let rows = one.shape.first().copied().unwrap_or(1).max(1);
                    if rows > max_rows as i64 {
                        return Err(too_many(rows));
                    }
                    tensor_records(&one.data, rows as usize).map_err(|why| {
                        Unfit::Invalid(format!(
                            "input '{}': {why} (shape {})",
                            one.name,
                            shape_text(&one.shape)
                        ))
                    })
                }
                _ => Err(Unfit::Invalid(format!(
                    "expected 1 inputs but got {} inputs for model '{model}'",
                    inputs.len()
                ))),
            };
        }
        self.declared_records(model, inputs, max_rows, too_many)
    }

    fn declared_records(
        &self,
        model: &str,
        inputs: &[Input],
        max_rows: usize,
        too_many: impl Fn(i64) -> Unfit,
    ) -> Result<Vec<Value>, Unfit> {
        let invalid = |m: String| Unfit::Invalid(m);
        for (k, i) in inputs.iter().enumerate() {
            if inputs[..k].iter().any(|j| j.name == i.name) {
                return Err(invalid(format!(
                    "input '{}' appears more than once in the request for model '{model}'",
                    i.name
                )));
            }
        }
        for i in inputs {
            if !self.inputs.iter().any(|d| d.name == i.name) {
                return Err(invalid(format!(
                    "unexpected inference input '{}' for model '{model}'",
                    i.name
                )));
            }
        }
        if inputs.len() != self.inputs.len() {
            let quoted = |names: Vec<&str>| {
                let q: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
                format!("[{}]", q.join(", "))
            };
            let got = quoted(inputs.iter().map(|i| i.name.as_str()).collect());
            let missing = quoted(
                self.inputs
                    .iter()
                    .filter(|d| !inputs.iter().any(|i| i.name == d.name))
                    .map(|d| d.name.as_str())
                    .collect(),
            );
            return Err(invalid(format!(
                "expected {} inputs but got {} inputs for model '{model}'. Got input(s) {got}, \
                 but missing required input(s) {missing}. Please provide all required input(s).",
                self.inputs.len(),
                inputs.len(),
            )));
        }
        let mut rows: Option<usize> = None;
        let mut per_input = Vec::with_capacity(self.inputs.len());
        for d in &self.inputs {
            // Present: the names are declared, distinct and as many as declared.
            let Some(i) = inputs.iter().find(|i| i.name == d.name) else {
                return Err(invalid(format!("input '{}' is missing", d.name)));
            };
            if i.datatype != d.datatype {
                return Err(invalid(format!(
                    "inference input '{}' data-type is '{}', but model '{model}' expects '{}'",
                    i.name, i.datatype, d.datatype
                )));
            }
            let fits = i.shape.len() == d.shape.len()
                && i.shape
                    .iter()
                    .zip(&d.shape)
                    .all(|(&got, &want)| got >= 0 && (want < 0 || got == want));
            if !fits {
                return Err(invalid(format!(
                    "unexpected shape for input '{}' for model '{model}'. Expected {}, got {}",
                    i.name,
                    shape_text(&d.shape),
                    shape_text(&i.shape)
                )));
            }
            if self.batched && i.shape[0] > max_rows as i64 {
                return Err(too_many(i.shape[0]));
            }
            let elements = i.shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d));
            if elements != Some(i.data.len() as i64) {
                return Err(invalid(format!(
                    "input '{}': shape {} does not hold the {} elements the request has",
                    i.name,
                    shape_text(&i.shape),
                    i.data.len()
                )));
            }
            let n = if self.batched { i.shape[0] as usize } else { 1 };
            if *rows.get_or_insert(n) != n {
                return Err(invalid(format!(
                    "inputs of model '{model}' have different batch sizes ({} and {n})",
                    rows.unwrap_or_default()
                )));
            }
            per_input.push(i);
        }
        let n = rows.unwrap_or(1);
        if n == 0 {
            return Err(invalid(format!(
                "the request for model '{model}' has no rows"
            )));
        }
        let columns: Vec<Vec<Value>> = per_input
            .iter()
            .map(|i| {
                let per_row = i.data.len() / n;
                (0..n)
                    .map(|r| {
                        let chunk = &i.data[r * per_row..(r + 1) * per_row];
                        if per_row == 1 {
                            chunk[0].clone()
                        } else {
                            Value::Array(chunk.to_vec())
                        }
                    })
                    .collect()
            })
            .collect();
        Ok((0..n)
            .map(|r| {
                if let [only] = columns.as_slice() {
                    only[r].clone()
                } else {
                    Value::Object(
                        self.inputs
                            .iter()
                            .zip(&columns)
                            .map(|(d, c)| (d.name.clone(), c[r].clone()))
                            .collect(),
                    )
                }
            })
            .collect())
    }

    /// The outputs a request asks for (all when it names none), by position.
    pub(crate) fn requested(&self, model: &str, names: &[String]) -> Result<Vec<usize>, String> {
        if names.is_empty() {
            return Ok((0..self.outputs.len()).collect());
        }
        names
            .iter()
            .map(|n| {
                self.outputs
                    .iter()
                    .position(|d| &d.name == n)
                    .ok_or_else(|| format!("unexpected inference output '{n}' for model '{model}'"))
            })
            .collect()
    }

    /// The output tensors `selected` of `predictions`, one row each.
    pub(crate) fn outputs(
        &self,
        selected: &[usize],
        predictions: &[Value],
    ) -> Result<Vec<Output>, String> {
        selected
            .iter()
            .map(|&k| {
                let d = &self.outputs[k];
                let rows: Vec<&Value> = predictions
                    .iter()
                    .map(|p| {
                        if self.outputs.len() == 1 {
                            Ok(p)
                        } else {
                            p.get(&d.name)
                                .ok_or_else(|| format!("the backend's answer has no output '{}'", d.name))
                        }
                    })
                    .collect::<Result<_, String>>()?;
                let owned: Vec<Value> = rows.into_iter().cloned().collect();
                let (guessed, data, cols) = flatten(&owned);
                if !self.declared {
                    return Ok(Output {
                        name: d.name.clone(),
                        datatype: guessed.to_owned(),
                        shape: vec![predictions.len() as i64, cols as i64],
                        data,
                    });
                }
                let shape = declared_shape(d, self.batched, predictions.len(), data.len())
                    .ok_or_else(|| {
                        format!(
                            "the backend's output '{}' has {} elements for {} rows, which does not fit its shape {}",
                            d.name,
                            data.len(),
                            predictions.len(),
                            shape_text(&d.shape)
                        )
                    })?;
                Ok(Output {
                    name: d.name.clone(),
                    datatype: d.datatype.clone(),
                    shape,
                    data,
                })
            })
            .collect()
    }
}

/// A declared output's shape for `rows` rows of `elements` elements in all: the
/// batch dimension first when batched, and a variable dimension inferred when there
/// is one. `None` when the elements do not fit the declared shape.
fn declared_shape(d: &Declared, batched: bool, rows: usize, elements: usize) -> Option<Vec<i64>> {
    let mut shape = d.shape.clone();
    if batched {
        *shape.first_mut()? = rows as i64;
    }
    let known: i64 = shape.iter().filter(|&&x| x >= 0).product();
    let unknown = shape.iter().filter(|&&x| x < 0).count();
    match unknown {
        0 => (known == elements as i64).then_some(shape),
        1 if known > 0 && elements as i64 % known == 0 => {
            let fill = elements as i64 / known;
            for x in shape.iter_mut().filter(|x| **x < 0) {
                *x = fill;
            }
            Some(shape)
        }
        _ => None,
    }
}

/// The rows of a tensor's flat `data` with `rows` rows, one record each (a scalar
/// for one element per row, else an array).
pub(crate) fn tensor_records(data: &[Value], rows: usize) -> Result<Vec<Value>, String> {
    let rows = rows.max(1);
    if data.is_empty() || !data.len().is_multiple_of(rows) {
        return Err(format!("{} elements do not fill {rows} rows", data.len()));
    }
    let per_row = data.len() / rows;
    Ok(data
        .chunks(per_row)
        .map(|c| {
            if per_row == 1 {
                c[0].clone()
            } else {
                Value::Array(c.to_vec())
            }
        })
        .collect())
}

/// Rows of predictions flattened: the datatype they suggest (FP32 when every
/// element is a number, else BYTES, numbers written as text), the elements, and the
/// elements per row.
fn flatten(out: &[Value]) -> (&'static str, Vec<Value>, usize) {
    let flat: Vec<Value> = out
        .iter()
        .flat_map(|v| match v {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        })
        .collect();
    let numeric = flat.iter().all(Value::is_number);
    let flat: Vec<Value> = if numeric {
        flat
    } else {
        flat.iter()
            .map(|v| Value::String(v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
            .collect()
    };
    let cols = flat.len() / out.len().max(1);
    (if numeric { "FP32" } else { "BYTES" }, flat, cols)
}

#[cfg(test)]
mod tests;
