//! The benchmarks' text corpus: English-like sentences of 4–128 words, seeded.

use rand::{Rng, SeedableRng};

const WORDS: &[&str] = &[
    "the",
    "model",
    "stream",
    "record",
    "batch",
    "latency",
    "is",
    "a",
    "of",
    "to",
    "and",
    "in",
    "that",
    "it",
    "with",
    "for",
    "on",
    "was",
    "as",
    "be",
    "this",
    "service",
    "quickly",
    "arrived",
    "broken",
    "excellent",
    "terrible",
    "price",
    "quality",
    "delivery",
    "customer",
    "support",
    "would",
    "recommend",
    "never",
    "again",
    "product",
    "works",
    "well",
    "after",
    "update",
    "battery",
    "screen",
    "sound",
    "phone",
    "laptop",
    "kitchen",
    "coffee",
    "morning",
    "evening",
    "weather",
    "city",
    "train",
    "station",
    "late",
    "early",
    "because",
    "however",
    "although",
    "while",
    "backpressure",
    "throughput",
    "engineers",
    "measured",
    "queue",
    "server",
    "request",
    "response",
    "timeout",
    "retry",
    "limit",
    "window",
    "probe",
    "graceful",
    "degradation",
    "Paris",
    "Berlin",
    "Tokyo",
    "river",
    "mountain",
    "forest",
    "children",
    "played",
    "football",
    "yesterday",
    "tomorrow",
    "important",
    "meeting",
    "schedule",
    "unfortunately",
    "definitely",
    "absolutely",
    "surprisingly",
    "nevertheless",
    "!",
    ",",
    ".",
    "?",
];

/// `n` sentences of 4–128 words drawn from a small vocabulary, seeded.
pub fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let words = rng.random_range(4..=128);
            let mut s = String::new();
            for i in 0..words {
                let w = WORDS[rng.random_range(0..WORDS.len())];
                if i > 0 && !matches!(w, "!" | "," | "." | "?") {
                    s.push(' ');
                }
                s.push_str(w);
            }
            s
        })
        .collect()
}
