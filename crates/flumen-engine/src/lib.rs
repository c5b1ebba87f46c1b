//! Flumen's execution engine and inference operator.
//!
//! ```text
//! Stream of records ─▶ Infer (operator) ─▶ Engine ─▶ Backend
//!                      order, capacity,     queue ▸ BatchPolicy ▸ Limiter ▸ calls
//!                      deadlines            (one per backend, shared by all operators)
//! ```
//!
//! - [`Infer`] (via [`InferExt::infer`]) wraps any `futures::Stream` and yields exactly
//!   one [`Outcome`] per record, `Unordered`, `Ordered` or `Keyed`, with at most
//!   `capacity` records in flight.
//! - [`Engine`] queues records from every operator that uses it, cuts batches with
//!   the pure [`BatchPolicy`] and holds calls in flight to the [`Limiter`]'s limit.
//! - Policies ([`BatchPolicy`], [`Aimd`], [`Gradient`], [`LatencyModel`],
//!   [`RetryConfig::verdict`], [`Breaker`]; inside the crate, the judgement of a
//!   finished call and the pause after overload or failures) are plain structs and
//!   functions tested with made-up sequences; the engine is the mechanism around them.
//!
//! A complete program:
//!
//! ```
//! use flumen_core::{Backend, BatchResult, Capabilities};
//! use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
//! use futures::StreamExt;
//!
//! struct Len;
//! impl Backend for Len {
//!     type Input = String;
//!     type Output = usize;
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities { max_batch_items: 16, ..Capabilities::default() }
//!     }
//!     async fn call(&self, batch: &[String]) -> BatchResult<usize> {
//!         Ok(batch.iter().map(|s| Ok(s.len())).collect())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let engine = Engine::new(Len, EngineConfig::default());
//! let words = futures::stream::iter(["a", "bb", "ccc"]);
//! let outcomes: Vec<_> = words
//!     .infer(&engine, OperatorConfig::default(), |w| Ok(w.to_string()))
//!     .collect()
//!     .await;
//! assert_eq!(outcomes.len(), 3);
//! # }
//! ```

mod batcher;
mod engine;
mod fallback;
mod latency;
pub mod limiter;
mod operator;
pub mod rate;
pub mod reliability;
pub mod schedule;
pub mod spend;
mod stats;
pub mod telemetry;

pub use batcher::{BatchConfig, BatchPolicy, Decision, QueuedMeta, Slots};
pub use engine::{
    CacheConfig, CacheStats, Detail, Engine, EngineConfig, Pending, Receipt, STORE_REST,
};
pub use fallback::{Fallback, FallbackStage, Served, StageFuture};
pub use latency::LatencyModel;
pub use limiter::{Aimd, AimdConfig, ConcurrencyConfig, Gradient, GradientConfig, Limiter};
pub use operator::{Infer, InferExt, OperatorConfig, OrderMode, Outcome};
pub use reliability::{
    Breaker, BreakerConfig, BreakerPhase, BreakerState, BreakerWindow, RetryBudget, RetryConfig,
    Verdict,
};
pub use schedule::{Class, Lane, SchedulingConfig};
pub use spend::{OnExhausted, Prices, SpendBudget, SpendConfig, SpendSnapshot, Unit};
pub use stats::{Stats, StatsSnapshot, LATENCY_BUCKETS};
