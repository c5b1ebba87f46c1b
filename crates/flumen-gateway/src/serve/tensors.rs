//! Tensors to records and back, for both KServe v2 fronts (HTTP and gRPC): a flat
//! tensor's rows become one record each, and predictions become one output tensor.

use serde_json::Value;

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

/// Predictions as one output tensor: its datatype (FP32 when every element is a
/// number, else BYTES), its flat elements and its columns per row.
pub(crate) fn output_tensor(out: &[Value]) -> (&'static str, Vec<Value>, usize) {
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
