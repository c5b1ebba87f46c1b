//! Reference data written by sentence-transformers, and how vectors are compared.
#![allow(dead_code)] // each test file uses a part

use serde::Deserialize;

/// A reference file: sentences, their word pieces and their vectors.
#[derive(Deserialize)]
pub struct Reference {
    /// The weights the vectors were computed from (all-MiniLM-L6-v2's file only).
    #[serde(default)]
    pub model_safetensors_sha256: String,
    /// The truncation length used.
    #[serde(default)]
    pub max_seq_length: usize,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub embedding: Vec<f32>,
}

/// Reads a reference file under `tests/data/`.
pub fn reference(relative: &str) -> Reference {
    let path = format!("{}/tests/data/{relative}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference file")).expect("json")
}

/// Cosine similarity, accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
