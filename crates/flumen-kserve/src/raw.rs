//! Tensors as raw little-endian bytes: the gRPC `raw_*_contents` and HTTP's binary
//! tensor extension. `BYTES` elements are a 4-byte little-endian length, then the bytes.

use flumen_core::BackendError;
use serde_json::Value;

/// Elements of a raw tensor.
pub fn decode_raw(datatype: &str, raw: &[u8]) -> Result<Vec<Value>, BackendError> {
    fn fixed<const N: usize>(
        raw: &[u8],
        f: impl Fn([u8; N]) -> Value,
    ) -> Result<Vec<Value>, BackendError> {
        if !raw.len().is_multiple_of(N) {
            return Err(BackendError::permanent(format!(
                "{} raw bytes are not a multiple of {N}",
                raw.len()
            )));
        }
        Ok(raw
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N")))
            .collect())
    }
    match datatype {
        "BOOL" => fixed::<1>(raw, |b| Value::Bool(b[0] != 0)),
        "INT8" => fixed::<1>(raw, |b| i8::from_le_bytes(b).into()),
        "UINT8" => fixed::<1>(raw, |b| u8::from_le_bytes(b).into()),
        "INT16" => fixed::<2>(raw, |b| i16::from_le_bytes(b).into()),
        "UINT16" => fixed::<2>(raw, |b| u16::from_le_bytes(b).into()),
        "INT32" => fixed::<4>(raw, |b| i32::from_le_bytes(b).into()),
        "UINT32" => fixed::<4>(raw, |b| u32::from_le_bytes(b).into()),
        "INT64" => fixed::<8>(raw, |b| i64::from_le_bytes(b).into()),
        "UINT64" => fixed::<8>(raw, |b| u64::from_le_bytes(b).into()),
        "FP32" => fixed::<4>(raw, |b| f64::from(f32::from_le_bytes(b)).into()),
        "FP64" => fixed::<8>(raw, |b| f64::from_le_bytes(b).into()),
        "BYTES" => {
            // Each element: a 4-byte little-endian length, then the bytes.
            let mut out = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                let (len, tail) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| BackendError::permanent("truncated BYTES element length"))?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(BackendError::permanent("truncated BYTES element"));
                }
                out.push(Value::String(
                    String::from_utf8_lossy(&tail[..len]).into_owned(),
                ));
                rest = &tail[len..];
            }
            Ok(out)
        }
        other => Err(BackendError::permanent(format!(
            "datatype {other} has no raw form here (supported: BOOL, INT8–64, UINT8–64, FP32, FP64, BYTES)"
        ))),
    }
}

/// A raw tensor of `data` as `datatype`.
pub fn encode_raw(datatype: &str, data: &[Value]) -> Result<Vec<u8>, BackendError> {
    let mut out = Vec::new();
    let num = |v: &Value| v.as_f64().unwrap_or_default();
    for v in data {
        match datatype {
            "BOOL" => out.push(u8::from(v.as_bool().unwrap_or_default())),
            "INT8" => out.extend((num(v) as i8).to_le_bytes()),
            "UINT8" => out.extend((num(v) as u8).to_le_bytes()),
            "INT16" => out.extend((num(v) as i16).to_le_bytes()),
            "UINT16" => out.extend((num(v) as u16).to_le_bytes()),
            "INT32" => out.extend((num(v) as i32).to_le_bytes()),
            "UINT32" => out.extend((num(v) as u32).to_le_bytes()),
            "INT64" => out.extend((num(v) as i64).to_le_bytes()),
            "UINT64" => out.extend((num(v) as u64).to_le_bytes()),
            "FP32" => out.extend((num(v) as f32).to_le_bytes()),
            "FP64" => out.extend(num(v).to_le_bytes()),
            "BYTES" => {
                let s = v.as_str().unwrap_or_default().as_bytes();
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s);
            }
            other => {
                return Err(BackendError::permanent(format!(
                    "datatype {other} is not supported as raw bytes yet"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_tensors_decode_little_endian_and_length_prefixed_bytes() {
        let fp32: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            decode_raw("FP32", &fp32).unwrap(),
            vec![Value::from(1.5), Value::from(-2.0)]
        );
        let mut bytes = Vec::new();
        for s in ["ab", "", "é"] {
            bytes.extend((s.len() as u32).to_le_bytes());
            bytes.extend(s.as_bytes());
        }
        assert_eq!(
            decode_raw("BYTES", &bytes).unwrap(),
            vec![Value::from("ab"), Value::from(""), Value::from("é")]
        );
        assert!(decode_raw("INT32", &[1, 2, 3]).is_err());
        assert!(decode_raw("BYTES", &[9, 0, 0, 0, b'x']).is_err());
    }

    #[test]
    fn encoding_round_trips() {
        for (dt, data) in [
            ("FP32", vec![Value::from(1.5), Value::from(-3.0)]),
            ("INT64", vec![Value::from(-7), Value::from(1_i64 << 40)]),
            ("BYTES", vec![Value::from("naïve"), Value::from("")]),
            ("BOOL", vec![Value::from(true), Value::from(false)]),
        ] {
            assert_eq!(
                decode_raw(dt, &encode_raw(dt, &data).unwrap()).unwrap(),
                data,
                "{dt}"
            );
        }
    }
}
