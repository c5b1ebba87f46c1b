//! A BERT of another shape (2 layers, 48 wide, 4 heads, 40 positions, CLS pooling, no
//! normalisation, saved by sentence-transformers 6), against sentence-transformers'
//! own vectors. Written by `scripts/tiny_bert.py` with random weights.

use flumen_embed::{EmbedConfig, Embedder, ModelSpec};

mod common;
use common::cosine;

#[tokio::test]
async fn another_bert_shape_matches_sentence_transformers() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny-bert");
    let reference = common::reference("tiny-bert/reference.json");
    let config = EmbedConfig {
        model: ModelSpec::dir(dir),
        threads: 2,
        ..EmbedConfig::default()
    };
    let model = Embedder::load(config).await.expect("loads");
    assert_eq!(model.dimensions(), 48);
    assert_eq!(model.max_seq_length(), 40, "from tokenizer_config.json");
    let texts: Vec<String> = reference.cases.iter().map(|c| c.text.clone()).collect();
    let vectors = model.embed(texts).await.unwrap();
    for (case, v) in reference.cases.iter().zip(&vectors) {
        assert_eq!(
            model.tokenize(&case.text),
            case.token_ids,
            "{:?}",
            case.text
        );
        let c = cosine(v, &case.embedding);
        assert!(c >= 0.9999, "cosine {c} for {:?}", case.text);
        // Not normalised, so the scale must match too: CLS pooling, raw.
        let (n, want) = (
            v.iter().map(|x| x * x).sum::<f32>().sqrt(),
            case.embedding.iter().map(|x| x * x).sum::<f32>().sqrt(),
        );
        assert!((n - want).abs() <= 1e-3 * want, "norm {n} vs {want}");
    }
}
