//! What the run's summary says of its costs: tokens, cost, the budget, the cache.

use flumen_config::AnyBackend;
use flumen_engine::{Engine, SpendConfig};
use tokio::time::Instant;

/// `(", N tokens sent, M received, cost C; budget …", "; cache: …")`, each empty when
/// there is nothing to say.
pub(super) fn costs(
    engine: &Engine<AnyBackend>,
    priced: bool,
    spend: Option<&SpendConfig>,
) -> (String, String) {
    let stats = engine.stats();
    let cache = engine
        .cache_stats()
        .map(|c| {
            format!(
                "; cache: {} hits, {} shared, {} misses{}",
                c.hits,
                c.shared,
                c.misses,
                if c.errors + c.bypassed > 0 {
                    format!(
                        ", {} store errors, {} lookups and writes skipped while it was down",
                        c.errors, c.bypassed
                    )
                } else {
                    String::new()
                }
            )
        })
        .unwrap_or_default();
    let mut tokens = String::new();
    if stats.tokens_sent + stats.output_tokens > 0 {
        tokens = format!(
            ", {} tokens sent, {} received",
            stats.tokens_sent, stats.output_tokens
        );
    }
    if priced {
        tokens.push_str(&format!(", cost {:.6}", stats.cost_nanos as f64 / 1e9));
    }
    if let Some(spend) = &spend {
        let mut budget = spend.budget.lock().expect("spend lock");
        let s = budget.snapshot(Instant::now());
        let unit = budget.unit();
        tokens.push_str(&format!(
            "; budget `{}`: {} of {} spent",
            budget.name(),
            unit.show(s.spent),
            unit.show(s.limit)
        ));
    }
    (tokens, cache)
}
