//! A custom backend in about thirty lines: a keyword "sentiment model" that scores
//! a batch of texts in one call, plugged into Flumen's operator.
//!
//! Run: `cargo run -p flumen-engine --example custom_backend`

use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ItemCost};
use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use futures::StreamExt;

/// Scores texts: +1 per positive word, -1 per negative word.
struct Keywords;

impl Backend for Keywords {
    type Input = String;
    type Output = i32;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: 32,
            max_batch_tokens: Some(4_096),
            ..Capabilities::default()
        }
    }

    fn cost(&self, text: &String) -> ItemCost {
        let tokens = text.split_whitespace().count() as u64;
        ItemCost {
            bytes: text.len() as u64,
            tokens,
        }
    }

    async fn call(&self, batch: &[String]) -> BatchResult<i32> {
        Ok(batch.iter().map(|text| score(text)).collect())
    }
}

fn score(text: &str) -> Result<i32, BackendError> {
    if text.trim().is_empty() {
        return Err(BackendError::invalid_input("empty text"));
    }
    Ok(text
        .split_whitespace()
        .map(|w| match w.trim_matches(|c: char| !c.is_alphanumeric()) {
            "good" | "great" | "excellent" => 1,
            "bad" | "awful" | "broken" => -1,
            _ => 0,
        })
        .sum())
}

#[tokio::main]
async fn main() {
    let engine = Engine::new(Keywords, EngineConfig::default());
    let reviews = [
        "great phone, excellent battery",
        "awful: broken on arrival",
        "",
        "fine",
    ];
    let mut outcomes =
        futures::stream::iter(reviews).infer(&engine, OperatorConfig::default(), |text| {
            Ok(text.to_string())
        });
    while let Some(o) = outcomes.next().await {
        match o.result {
            Ok(score) => println!("{score:+} {:?}", o.record),
            Err(failure) => println!("failed {:?}: {failure}", o.record),
        }
    }
}
