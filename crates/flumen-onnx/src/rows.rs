//! Numeric rows: a record's nested arrays flattened and stacked into a call's
//! tensors, the session run, and each output's batch cut back into rows.

use std::sync::Mutex;

use flumen_core::BackendError;
use ort::session::Session;
use ort::value::Tensor;
use serde_json::{json, Value};

use crate::{Elem, Port};

/// A row's numbers, flattened, and its shape (nested arrays).
fn flatten(
    v: &Value,
    out: &mut Vec<f64>,
    shape: &mut Vec<i64>,
    depth: usize,
) -> Result<(), String> {
    match v {
        Value::Number(n) => {
            if depth < shape.len() {
                return Err("a number where an array was expected".into());
            }
            out.push(n.as_f64().ok_or("not a number")?);
            Ok(())
        }
        Value::Array(items) => {
            match shape.get(depth) {
                None => shape.push(items.len() as i64),
                Some(&d) if d != items.len() as i64 => {
                    return Err(format!(
                        "a ragged array: {} items where {d} were expected",
                        items.len()
                    ))
                }
                Some(_) => {}
            }
            items
                .iter()
                .try_for_each(|i| flatten(i, out, shape, depth + 1))
        }
        other => Err(format!("{other} is not a number")),
    }
}

/// Checks a row's shape against the model's (dynamic dimensions match anything).
fn fits(dims: &[i64], shape: &[i64]) -> bool {
    dims.len() == shape.len() && dims.iter().zip(shape).all(|(&d, &s)| d < 0 || d == s)
}

/// One input's batch: the rows of the call's good records, stacked.
#[derive(Default)]
pub(crate) struct Stacked {
    shape: Vec<i64>,
    data: Vec<f64>,
}

impl Stacked {
    /// A record's `row` for `port`, flattened, with its shape, if it fits the model
    /// and the rows stacked before it; or why not.
    pub(crate) fn check(&self, port: &Port, row: &Value) -> Result<(Vec<f64>, Vec<i64>), String> {
        let (mut data, mut shape) = (Vec::new(), Vec::new());
        flatten(row, &mut data, &mut shape, 0)?;
        let expected = if self.shape.len() > 1 {
            &self.shape[1..]
        } else {
            &port.dims[..]
        };
        if !fits(expected, &shape) {
            return Err(format!(
                "shape {shape:?}, but the model takes {expected:?} (-1: any)"
            ));
        }
        Ok((data, shape))
    }

    /// Adds a checked row.
    pub(crate) fn push(&mut self, data: Vec<f64>, shape: Vec<i64>) {
        if self.shape.is_empty() {
            self.shape = std::iter::once(0).chain(shape).collect();
        }
        self.shape[0] += 1;
        self.data.extend(data);
    }
}

/// A batch of one output, back to one JSON row per record.
fn rows(shape: &[i64], data: Vec<f64>, integral: bool) -> Vec<Value> {
    let n = shape.first().copied().unwrap_or(0).max(0) as usize;
    let per: usize = shape[1..].iter().map(|&d| d.max(0) as usize).product();
    let number = |x: f64| {
        if integral {
            json!(x as i64)
        } else {
            json!(x)
        }
    };
    fn nest(data: &[f64], dims: &[i64], number: &dyn Fn(f64) -> Value) -> Value {
        match dims.split_first() {
            None => number(data[0]),
            Some((&d, rest)) => {
                let step: usize = rest.iter().map(|&x| x.max(0) as usize).product();
                Value::Array(
                    (0..d.max(0) as usize)
                        .map(|i| nest(&data[i * step..(i + 1) * step], rest, number))
                        .collect(),
                )
            }
        }
    }
    (0..n)
        .map(|i| nest(&data[i * per..(i + 1) * per], &shape[1..], &number))
        .collect()
}

pub(crate) fn run(
    session: &Mutex<Session>,
    inputs: &[Port],
    outputs: &[Port],
    stacked: Vec<Stacked>,
) -> Result<Vec<Vec<Value>>, BackendError> {
    let failed = |e: ort::Error| BackendError::permanent(format!("ONNX Runtime: {e}"));
    let mut values: Vec<(
        std::borrow::Cow<'static, str>,
        ort::session::SessionInputValue<'static>,
    )> = Vec::with_capacity(inputs.len());
    for (port, s) in inputs.iter().zip(stacked) {
        let shape = s.shape.clone();
        let value: ort::session::SessionInputValue<'static> = match port.elem {
            Elem::F32 => {
                Tensor::from_array((shape, s.data.iter().map(|&x| x as f32).collect::<Vec<_>>()))
                    .map_err(failed)?
                    .into()
            }
            Elem::F64 => Tensor::from_array((shape, s.data)).map_err(failed)?.into(),
            Elem::I32 => {
                Tensor::from_array((shape, s.data.iter().map(|&x| x as i32).collect::<Vec<_>>()))
                    .map_err(failed)?
                    .into()
            }
            Elem::I64 => {
                Tensor::from_array((shape, s.data.iter().map(|&x| x as i64).collect::<Vec<_>>()))
                    .map_err(failed)?
                    .into()
            }
        };
        values.push((port.name.clone().into(), value));
    }
    let mut session = session
        .lock()
        .map_err(|_| BackendError::permanent("the session panicked"))?;
    let result = session.run(values).map_err(failed)?;
    outputs
        .iter()
        .map(|port| {
            let v = &result[port.name.as_str()];
            let (shape, data) = match port.elem {
                Elem::F32 => {
                    let (s, d) = v.try_extract_tensor::<f32>().map_err(failed)?;
                    (s.to_vec(), d.iter().map(|&x| f64::from(x)).collect())
                }
                Elem::F64 => {
                    let (s, d) = v.try_extract_tensor::<f64>().map_err(failed)?;
                    (s.to_vec(), d.to_vec())
                }
                Elem::I32 => {
                    let (s, d) = v.try_extract_tensor::<i32>().map_err(failed)?;
                    (s.to_vec(), d.iter().map(|&x| f64::from(x)).collect())
                }
                Elem::I64 => {
                    let (s, d) = v.try_extract_tensor::<i64>().map_err(failed)?;
                    (s.to_vec(), d.iter().map(|&x| x as f64).collect())
                }
            };
            Ok(rows(
                &shape,
                data,
                matches!(port.elem, Elem::I32 | Elem::I64),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_flatten_and_nest_back() {
        let (mut data, mut shape) = (Vec::new(), Vec::new());
        flatten(&json!([[1, 2], [3, 4], [5, 6]]), &mut data, &mut shape, 0).unwrap();
        assert_eq!(
            (data.clone(), shape.clone()),
            (vec![1., 2., 3., 4., 5., 6.], vec![3, 2])
        );
        assert!(fits(&[-1, 2], &shape) && !fits(&[3], &shape));
        let back = rows(&[2, 3], data, true);
        assert_eq!(back, vec![json!([1, 2, 3]), json!([4, 5, 6])]);
        let mut shape = Vec::new();
        let e = flatten(&json!([[1], [2, 3]]), &mut Vec::new(), &mut shape, 0).unwrap_err();
        assert!(e.contains("ragged"), "{e}");
        assert!(flatten(&json!(["x"]), &mut Vec::new(), &mut Vec::new(), 0).is_err());
    }
}
