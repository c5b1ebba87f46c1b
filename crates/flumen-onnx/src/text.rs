//! Text inputs: a model exported with token-id inputs (`input_ids`, and
//! `attention_mask` / `token_type_ids` when it has them) takes strings, tokenized
//! with the model's `tokenizer.json`, sorted by length within a call and run in groups of similar length, each
//! padded to its longest ([`groups`]); its
//! first output is pooled over the real tokens (mean or CLS) and normalised as
//! configured, or passed through per record (a classifier's or a cross-encoder's
//! logits: `pooling = "none"`).

use std::path::PathBuf;

use flumen_core::BackendError;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// How the first output becomes one vector per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The mean over the real (unpadded) tokens of `[batch, seq, hidden]`.
    #[default]
    Mean,
    /// The first token's row of `[batch, seq, hidden]`.
    Cls,
    /// The output's row as it is (`[batch, …]`).
    None,
}

/// Settings of a model that takes text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// The model's `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// How the first output becomes a record's answer.
    pub pooling: Pooling,
    /// L2-normalise the pooled vectors.
    pub normalize: bool,
    /// Truncate to this many tokens, special tokens included.
    pub max_tokens: usize,
}

/// The loaded tokenizer, and what the model's inputs are.
pub(crate) struct Text {
    tokenizer: Tokenizer,
    pub(crate) config: TextConfig,
    /// Which of `attention_mask`, `token_type_ids` the model takes, in its order
    /// after `input_ids`.
    pub(crate) inputs: Vec<String>,
}

/// A group's token ids, padded to its longest record, and their masks.
pub(crate) struct Padded {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) ids: Vec<i64>,
    pub(crate) mask: Vec<i64>,
}

impl Text {
    pub(crate) fn load(config: &TextConfig, inputs: Vec<String>) -> Result<Text, String> {
        let shown = config.tokenizer.display();
        let mut tokenizer = Tokenizer::from_file(&config.tokenizer)
            .map_err(|e| format!("tokenizer {shown}: {e}"))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: config.max_tokens.max(2),
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| format!("tokenizer {shown}: {e}"))?;
        Ok(Text {
            tokenizer,
            config: config.clone(),
            inputs,
        })
    }

    /// The token ids of each text, special tokens included, truncated.
    pub(crate) fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, BackendError> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| BackendError::invalid_input(format!("cannot tokenize: {e}")))
            })
            .collect()
    }

    /// Token ids padded with 0 to the longest.
    pub(crate) fn pad(encoded: &[&[u32]]) -> Padded {
        let seq = encoded.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; encoded.len() * seq];
        let mut mask = vec![0i64; encoded.len() * seq];
        for (r, e) in encoded.iter().enumerate() {
            for (c, &id) in e.iter().enumerate() {
                ids[r * seq + c] = i64::from(id);
                mask[r * seq + c] = 1;
            }
        }
        Padded {
            batch: encoded.len(),
            seq,
            ids,
            mask,
        }
    }

    /// One answer per record from the first output's `shape` and `data`.
    pub(crate) fn answers(&self, p: &Padded, shape: &[i64], data: &[f32]) -> Vec<Vec<f32>> {
        let per: usize = shape[1..].iter().map(|&d| d.max(0) as usize).product();
        (0..p.batch)
            .map(|r| {
                let rows = &data[r * per..(r + 1) * per];
                let mut v = match self.config.pooling {
                    Pooling::None => rows.to_vec(),
                    Pooling::Cls | Pooling::Mean => {
                        let hidden = shape.get(2).copied().unwrap_or(1).max(1) as usize;
                        let seq = per / hidden;
                        let mask = &p.mask[r * p.seq..r * p.seq + seq.min(p.seq)];
                        let mut sum = vec![0f32; hidden];
                        let take: Vec<usize> = match self.config.pooling {
                            Pooling::Cls => vec![0],
                            _ => (0..mask.len()).filter(|&t| mask[t] == 1).collect(),
                        };
                        for &t in &take {
                            for (s, x) in sum.iter_mut().zip(&rows[t * hidden..(t + 1) * hidden]) {
                                *s += x;
                            }
                        }
                        let n = take.len().max(1) as f32;
                        sum.iter().map(|s| s / n).collect()
                    }
                };
                if self.config.normalize {
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                v
            })
            .collect()
    }
}

/// What one more run of the session costs, in padded tokens: the fixed work of a
/// call (binding, launching the graph's kernels) against the work per token.
const RUN_COST: usize = 64;

/// A call's records in groups of similar length, each run padded to its own
/// longest: the indices sorted by length and cut where the padding saved is worth
/// more than another run (an exact dynamic programme over the sorted lengths,
/// minimising padded tokens plus [`RUN_COST`] per group). Every index is in exactly
/// one group; records of equal length stay in one.
pub(crate) fn groups(lengths: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let len = |k: usize| lengths[order[k]].max(1);
    let n = order.len();
    // best[j]: the least cost of the first j sorted records; cut[j]: where the last
    // group of that best starts.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for j in 1..=n {
        // The last group is sorted records i..j, padded to the longest, j − 1.
        let (at, min) = (0..j)
            .map(|i| (i, best[i] + (j - i) * len(j - 1) + RUN_COST))
            .min_by_key(|&(_, cost)| cost)
            .expect("j ≥ 1");
        best[j] = min;
        cut[j] = at;
    }
    let mut out = Vec::new();
    let mut j = n;
    while j > 0 {
        out.push(order[cut[j]..j].to_vec());
        j = cut[j];
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn groups_cut_where_padding_costs_more_than_a_run() {
        // Short ones together, long ones together, whatever the order they came in.
        let g = groups(&[120, 5, 100, 6, 5]);
        assert_eq!(g, vec![vec![1, 4, 3], vec![2, 0]]);
        // Similar lengths: one run.
        assert_eq!(groups(&[30, 31, 29, 30]).len(), 1);
        assert_eq!(groups(&[7; 50]), vec![(0..50).collect::<Vec<_>>()]);
        assert!(groups(&[]).is_empty());
        // Every index exactly once, each group sorted by length.
        let lengths: Vec<usize> = (0..128).map(|i| (i * 37 + 11) % 200 + 3).collect();
        let g = groups(&lengths);
        let mut seen: Vec<usize> = g.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..128).collect::<Vec<_>>());
        assert!(g.len() > 1 && g.len() < 128, "{} groups", g.len());
        for group in &g {
            assert!(group.windows(2).all(|w| lengths[w[0]] <= lengths[w[1]]));
        }
    }
}
