//! Records to batch tensors and back: a model's tensors ([`TensorSpec`]), the ones a
//! backend fills and reads ([`Signature`]), and one call's rows ([`Batch`]), shared
//! by the HTTP and gRPC backends.

use flumen_core::BackendError;
use serde_json::Value;

/// A tensor as the model's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name.
    pub name: String,
    /// `FP32`, `INT64`, `BYTES`, …
    pub datatype: String,
    /// The shape of one row (the metadata's shape without the batch dimension).
    pub row_shape: Vec<i64>,
}

impl TensorSpec {
    pub(crate) fn from_metadata(v: &Value, batched: bool) -> Option<TensorSpec> {
        let shape: Vec<i64> = v
            .get("shape")?
            .as_array()?
            .iter()
            .map(Value::as_i64)
            .collect::<Option<_>>()?;
        let row_shape = if batched {
            shape.get(1..)?.to_vec()
        } else {
            shape
        };
        Some(TensorSpec {
            name: v.get("name")?.as_str()?.to_owned(),
            datatype: v.get("datatype")?.as_str()?.to_owned(),
            row_shape,
        })
    }

    /// A record's elements, flattened and checked against this tensor's datatype
    /// and row shape.
    pub fn row_elements(&self, row: &Value) -> Result<Vec<Value>, String> {
        let mut flat = Vec::new();
        fn walk(v: &Value, out: &mut Vec<Value>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                x => out.push(x.clone()),
            }
        }
        walk(row, &mut flat);
        let bytes = self.datatype == "BYTES";
        let bool_type = self.datatype == "BOOL";
        for x in &flat {
            let fits = if bytes {
                x.is_string()
            } else if bool_type {
                x.is_boolean()
            } else {
                x.is_number()
            };
            if !fits {
                return Err(format!(
                    "input `{}` is {}: {x} does not fit",
                    self.name, self.datatype
                ));
            }
        }
        if let Some(n) = self.row_len() {
            if flat.len() != n {
                return Err(format!(
                    "input `{}` takes {n} element(s) per row (shape {:?}), the record has {}",
                    self.name,
                    self.row_shape,
                    flat.len()
                ));
            }
        }
        Ok(flat)
    }

    /// Elements per row, when the shape is fixed.
    pub(crate) fn row_len(&self) -> Option<usize> {
        self.row_shape
            .iter()
            .try_fold(1usize, |n, d| usize::try_from(*d).ok().map(|d| n * d))
    }
}

/// The tensors a backend fills from records and reads predictions from.
///
/// A record is the row itself when there is one input, else an object with a row
/// for every input, by name; a prediction is the row of the one output, else an
/// object with the row of every output, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The inputs, in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// The outputs read, in the model's order.
    pub outputs: Vec<TensorSpec>,
    /// Whether the tensors take a batch dimension first.
    pub batched: bool,
}

impl Signature {
    /// A record's flat elements for each input, checked against its datatype and
    /// row shape.
    pub fn row(&self, record: &Value) -> Result<Vec<Vec<Value>>, String> {
        if let [only] = self.inputs.as_slice() {
            return Ok(vec![only.row_elements(record)?]);
        }
        let Some(fields) = record.as_object() else {
            return Err(format!(
                "the model has {} inputs ({}): a record must be an object with each",
                self.inputs.len(),
                self.input_names()
            ));
        };
        if let Some(extra) = fields
            .keys()
            .find(|k| !self.inputs.iter().any(|t| &t.name == *k))
        {
            return Err(format!(
                "`{extra}` is not an input of the model (its inputs: {})",
                self.input_names()
            ));
        }
        self.inputs
            .iter()
            .map(|t| match fields.get(&t.name) {
                Some(v) => t.row_elements(v),
                None => Err(format!("the record has no input `{}`", t.name)),
            })
            .collect()
    }

    /// One row's prediction from each output's row value, in `outputs` order.
    pub fn prediction(&self, mut values: Vec<Value>) -> Value {
        if values.len() == 1 {
            return values.pop().expect("one value");
        }
        Value::Object(
            self.outputs
                .iter()
                .map(|t| t.name.clone())
                .zip(values)
                .collect(),
        )
    }

    fn input_names(&self) -> String {
        self.inputs
            .iter()
            .map(|t| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One result slot per record of a call.
pub(crate) type Slots = Vec<Option<Result<Value, BackendError>>>;

/// The records of a call that fit the inputs, as one batch tensor per input.
pub(crate) struct Batch {
    /// Positions of the records in the call.
    pub(crate) rows: Vec<usize>,
    /// Each input's elements, flattened, and its batch tensor's shape.
    pub(crate) inputs: Vec<(Vec<Value>, Vec<i64>)>,
}

impl Batch {
    /// Flattens the records that fit the signature's inputs; those that do not get
    /// an invalid-input result in `results`. `None` when no record fits.
    pub(crate) fn assemble(
        sig: &Signature,
        records: &[Value],
        results: &mut Slots,
    ) -> Option<Batch> {
        let mut rows = Vec::new();
        let mut data: Vec<Vec<Value>> = vec![Vec::new(); sig.inputs.len()];
        for (i, record) in records.iter().enumerate() {
            match sig.row(record) {
                Ok(flats) => {
                    for (d, flat) in data.iter_mut().zip(flats) {
                        d.extend(flat);
                    }
                    rows.push(i);
                }
                Err(why) => results[i] = Some(Err(BackendError::invalid_input(why))),
            }
        }
        if rows.is_empty() {
            return None;
        }
        let inputs = sig
            .inputs
            .iter()
            .zip(data)
            .map(|(t, data)| {
                let mut shape = t.row_shape.clone();
                if t.row_len().is_none() {
                    // A variable dimension: infer it from the elements.
                    let known: i64 = shape.iter().filter(|d| **d > 0).product();
                    let per_row = data.len() as i64 / rows.len() as i64;
                    for d in shape.iter_mut().filter(|d| **d < 0) {
                        *d = per_row / known.max(1);
                    }
                }
                if sig.batched {
                    shape.insert(0, rows.len() as i64);
                }
                (data, shape)
            })
            .collect();
        Some(Batch { rows, inputs })
    }

    /// Splits each output's flat elements (in the signature's order) back into one
    /// prediction per record.
    pub(crate) fn split(
        self,
        sig: &Signature,
        outputs: &[Vec<Value>],
        results: &mut Slots,
    ) -> Result<(), BackendError> {
        let n = self.rows.len();
        let mut per_output = Vec::with_capacity(outputs.len());
        for (t, flat) in sig.outputs.iter().zip(outputs) {
            if !flat.len().is_multiple_of(n) {
                return Err(BackendError::permanent(format!(
                    "{} elements of output `{}` do not split into {n} rows",
                    flat.len(),
                    t.name
                )));
            }
            per_output.push(flat.len() / n);
        }
        for (k, i) in self.rows.into_iter().enumerate() {
            let values = outputs
                .iter()
                .zip(&per_output)
                .map(|(flat, &per_row)| {
                    let chunk = &flat[k * per_row..(k + 1) * per_row];
                    if per_row == 1 {
                        chunk[0].clone()
                    } else {
                        Value::Array(chunk.to_vec())
                    }
                })
                .collect();
            results[i] = Some(Ok(sig.prediction(values)));
        }
        Ok(())
    }
}

/// Every slot filled.
pub(crate) fn finish(results: Slots) -> Vec<Result<Value, BackendError>> {
    results
        .into_iter()
        .map(|r| r.expect("every record has a result"))
        .collect()
}
