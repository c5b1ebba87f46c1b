//! A BERT-family sentence encoder: the weights of a safetensors file and the forward
//! pass, written from the architecture (Devlin et al. 2019; sentence-transformers'
//! pooling and normalisation).
//!
//! A batch is *ragged*: the token sequences are laid end to end, `T = Σ len` rows,
//! with no padding at all. Every dense layer runs once over all `T` rows (one GEMM),
//! and attention runs per sequence over its own length, so a sentence costs the same
//! alone or next to a long one, and its result does not depend on its neighbours.

use std::path::Path;

use serde::Deserialize;

use crate::ops::{self, View, ViewMut};
use crate::EmbedError;

/// The part of a Hugging Face `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`hidden_size` must be a multiple).
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Positions the model has embeddings for.
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Epsilon of the layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    /// The activation; only `gelu` (exact) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Only `absolute` position embeddings are supported.
    #[serde(default = "default_position")]
    pub position_embedding_type: String,
}

fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position() -> String {
    "absolute".into()
}

/// How token vectors become one sentence vector (sentence-transformers' `Pooling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of all token vectors (all-MiniLM-L6-v2).
    Mean,
    /// The `[CLS]` token's vector.
    Cls,
    /// The element-wise maximum.
    Max,
}

struct Layer {
    qkv_w: Vec<f32>, // hidden × 3·hidden (query, key, value side by side), row-major
    qkv_b: Vec<f32>,
    out_w: Vec<f32>, // hidden × hidden
    out_b: Vec<f32>,
    ln1_w: Vec<f32>,
    ln1_b: Vec<f32>,
    up_w: Vec<f32>, // hidden × intermediate
    up_b: Vec<f32>,
    down_w: Vec<f32>, // intermediate × hidden
    down_b: Vec<f32>,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
}

/// The encoder's weights, ready to run.
pub struct Bert {
    config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    ln_w: Vec<f32>,
    ln_b: Vec<f32>,
    layers: Vec<Layer>,
}

/// The tensors of a safetensors file, looked up with or without a `bert.` prefix.
struct Tensors<'a> {
    file: safetensors::SafeTensors<'a>,
    path: String,
}

impl Tensors<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EmbedError> {
        let view = self
            .file
            .tensor(name)
            .or_else(|_| self.file.tensor(&format!("bert.{name}")))
            .map_err(|_| self.bad(format!("tensor `{name}` is missing")))?;
        if view.shape() != shape {
            return Err(self.bad(format!(
                "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                view.shape()
            )));
        }
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(self.bad(format!(
                "tensor `{name}` is {:?}; only F32 weights are supported",
                view.dtype()
            )));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A `Linear` weight (`out × in` in the file) transposed to `in × out`, so the
    /// forward pass multiplies dense row-major matrices.
    fn linear(&self, name: &str, inputs: usize, outputs: usize) -> Result<Vec<f32>, EmbedError> {
        let w = self.get(name, &[outputs, inputs])?;
        let mut t = vec![0.0; w.len()];
        for o in 0..outputs {
            for i in 0..inputs {
                t[i * outputs + o] = w[o * inputs + i];
            }
        }
        Ok(t)
    }

    /// Row 0 of an optional `rows × width` table (token type 0), or zeros without one.
    fn first_row(&self, name: &str, width: usize) -> Result<Vec<f32>, EmbedError> {
        let rows = match self
            .file
            .tensor(name)
            .or_else(|_| self.file.tensor(&format!("bert.{name}")))
        {
            Ok(view) if !view.shape().is_empty() && view.shape()[0] > 0 => view.shape()[0],
            _ => return Ok(vec![0.0; width]),
        };
        Ok(self.get(name, &[rows, width])?[..width].to_vec())
    }

    fn bad(&self, reason: String) -> EmbedError {
        EmbedError::Model {
            path: self.path.clone(),
            reason,
        }
    }
}

impl Bert {
    /// Loads the weights of `model.safetensors` for a model shaped like `config`.
    pub fn load(config: BertConfig, weights: &Path) -> Result<Bert, EmbedError> {
        let path = weights.display().to_string();
        let bad = |reason: String| EmbedError::Model {
            path: path.clone(),
            reason,
        };
        if config.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}` is not supported (only `gelu`)",
                config.hidden_act
            )));
        }
        if config.position_embedding_type != "absolute" {
            return Err(bad(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                config.position_embedding_type
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        let bytes = std::fs::read(weights).map_err(|e| bad(format!("cannot read: {e}")))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let t = Tensors {
            file,
            path: path.clone(),
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let (q, k, v) = (
                t.linear(&format!("{p}.attention.self.query.weight"), h, h)?,
                t.linear(&format!("{p}.attention.self.key.weight"), h, h)?,
                t.linear(&format!("{p}.attention.self.value.weight"), h, h)?,
            );
            let mut qkv_w = vec![0.0; h * 3 * h];
            for r in 0..h {
                let row = &mut qkv_w[r * 3 * h..(r + 1) * 3 * h];
                row[..h].copy_from_slice(&q[r * h..(r + 1) * h]);
                row[h..2 * h].copy_from_slice(&k[r * h..(r + 1) * h]);
                row[2 * h..].copy_from_slice(&v[r * h..(r + 1) * h]);
            }
            let mut qkv_b = t.get(&format!("{p}.attention.self.query.bias"), &[h])?;
            qkv_b.extend(t.get(&format!("{p}.attention.self.key.bias"), &[h])?);
            qkv_b.extend(t.get(&format!("{p}.attention.self.value.bias"), &[h])?);
            layers.push(Layer {
                qkv_w,
                qkv_b,
                out_w: t.linear(&format!("{p}.attention.output.dense.weight"), h, h)?,
                out_b: t.get(&format!("{p}.attention.output.dense.bias"), &[h])?,
                ln1_w: t.get(&format!("{p}.attention.output.LayerNorm.weight"), &[h])?,
                ln1_b: t.get(&format!("{p}.attention.output.LayerNorm.bias"), &[h])?,
                up_w: t.linear(&format!("{p}.intermediate.dense.weight"), h, i)?,
                up_b: t.get(&format!("{p}.intermediate.dense.bias"), &[i])?,
                down_w: t.linear(&format!("{p}.output.dense.weight"), i, h)?,
                down_b: t.get(&format!("{p}.output.dense.bias"), &[h])?,
                ln2_w: t.get(&format!("{p}.output.LayerNorm.weight"), &[h])?,
                ln2_b: t.get(&format!("{p}.output.LayerNorm.bias"), &[h])?,
            });
        }
        Ok(Bert {
            word: t.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: t.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: t.first_row("embeddings.token_type_embeddings.weight", h)?,
            ln_w: t.get("embeddings.LayerNorm.weight", &[h])?,
            ln_b: t.get("embeddings.LayerNorm.bias", &[h])?,
            layers,
            config,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Encodes token sequences (each already holding its special tokens and truncated
    /// to at most `max_position_embeddings`) into one pooled vector each; the
    /// products with the weights use up to `threads` threads (this one and scoped
    /// helpers), each computing a share of the columns.
    pub fn encode(
        &self,
        seqs: &[Vec<u32>],
        pooling: Pooling,
        normalize: bool,
        threads: usize,
    ) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let d = h / heads;
        let total: usize = seqs.iter().map(Vec::len).sum();
        if total == 0 {
            return seqs.iter().map(|_| vec![0.0; h]).collect();
        }

        // Embeddings: word + position + token type 0, then layer norm.
        let mut x = vec![0.0f32; total * h];
        let mut row = 0;
        for seq in seqs {
            for (pos, &id) in seq.iter().enumerate() {
                let id = (id as usize).min(c.vocab_size - 1);
                let pos = pos.min(c.max_position_embeddings - 1);
                let out = &mut x[row * h..(row + 1) * h];
                let w = &self.word[id * h..(id + 1) * h];
                let p = &self.position[pos * h..(pos + 1) * h];
                for j in 0..h {
                    out[j] = w[j] + p[j] + self.token_type[j];
                }
                row += 1;
            }
        }
        ops::layer_norm(&mut x, &self.ln_w, &self.ln_b, c.layer_norm_eps);

        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut qkv = vec![0.0f32; total * 3 * h];
        let mut ctx = vec![0.0f32; total * h];
        let mut scores = vec![0.0f32; longest * longest];
        let mut up = vec![0.0f32; total * c.intermediate_size];
        let scale = 1.0 / (d as f32).sqrt();

        for layer in &self.layers {
            // Query, key and value for every token in one product.
            ops::fill_rows(&mut qkv, &layer.qkv_b);
            ops::matmul_columns(
                ViewMut::dense(&mut qkv, total, 3 * h),
                View::dense(&x, total, h),
                View::dense(&layer.qkv_w, h, 3 * h),
                true,
                threads,
            );
            // Attention, per sequence and head, over that sequence's tokens only.
            let mut start = 0;
            for seq in seqs {
                let len = seq.len();
                let at = |col: usize| &qkv[start * 3 * h + col..];
                for head in 0..heads {
                    let q = View {
                        data: at(head * d),
                        rows: len,
                        cols: d,
                        rs: 3 * h,
                        cs: 1,
                    };
                    let k = View {
                        data: at(h + head * d),
                        rows: len,
                        cols: d,
                        rs: 3 * h,
                        cs: 1,
                    };
                    let v = View {
                        data: at(2 * h + head * d),
                        rows: len,
                        cols: d,
                        rs: 3 * h,
                        cs: 1,
                    };
                    let s = &mut scores[..len * len];
                    ops::matmul(ViewMut::dense(s, len, len), q, k.t(), false);
                    for e in s.iter_mut() {
                        *e *= scale;
                    }
                    ops::softmax_rows(s, len);
                    ops::matmul(
                        ViewMut {
                            data: &mut ctx[start * h + head * d..],
                            rows: len,
                            cols: d,
                            rs: h,
                            cs: 1,
                        },
                        View::dense(s, len, len),
                        v,
                        false,
                    );
                }
                start += len;
            }
            // Output projection onto the residual, then layer norm.
            ops::add_rows(&mut x, &layer.out_b);
            ops::matmul_columns(
                ViewMut::dense(&mut x, total, h),
                View::dense(&ctx, total, h),
                View::dense(&layer.out_w, h, h),
                true,
                threads,
            );
            ops::layer_norm(&mut x, &layer.ln1_w, &layer.ln1_b, c.layer_norm_eps);
            // Feed-forward: up, GELU, down onto the residual, layer norm.
            ops::fill_rows(&mut up, &layer.up_b);
            ops::matmul_columns(
                ViewMut::dense(&mut up, total, c.intermediate_size),
                View::dense(&x, total, h),
                View::dense(&layer.up_w, h, c.intermediate_size),
                true,
                threads,
            );
            ops::gelu(&mut up);
            ops::add_rows(&mut x, &layer.down_b);
            ops::matmul_columns(
                ViewMut::dense(&mut x, total, h),
                View::dense(&up, total, c.intermediate_size),
                View::dense(&layer.down_w, c.intermediate_size, h),
                true,
                threads,
            );
            ops::layer_norm(&mut x, &layer.ln2_w, &layer.ln2_b, c.layer_norm_eps);
        }

        // Pooling and normalisation.
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for seq in seqs {
            let rows = &x[start * h..(start + seq.len()) * h];
            start += seq.len();
            let mut v = match pooling {
                _ if seq.is_empty() => vec![0.0; h],
                Pooling::Cls => rows[..h].to_vec(),
                Pooling::Mean => {
                    let mut acc = vec![0.0f32; h];
                    for r in rows.chunks_exact(h) {
                        for (a, b) in acc.iter_mut().zip(r) {
                            *a += b;
                        }
                    }
                    let n = seq.len() as f32;
                    acc.iter_mut().for_each(|a| *a /= n);
                    acc
                }
                Pooling::Max => {
                    let mut acc = vec![f32::NEG_INFINITY; h];
                    for r in rows.chunks_exact(h) {
                        for (a, b) in acc.iter_mut().zip(r) {
                            *a = a.max(*b);
                        }
                    }
                    acc
                }
            };
            if normalize {
                // sentence-transformers' Normalize: v / max(‖v‖, 1e-12).
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|a| *a /= norm);
            }
            out.push(v);
        }
        out
    }
}
