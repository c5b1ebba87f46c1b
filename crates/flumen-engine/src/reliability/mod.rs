//! Reliability policies: retries with backoff and a budget, the circuit breaker,
//! and fallback stages. Plain structs fed with instants and outcomes; the engine's
//! dispatcher and the operator are the mechanism around them.

mod breaker;
mod fallback;
mod retry;

pub use breaker::{Breaker, BreakerConfig, BreakerState, BreakerWindow, CallClass};
pub use fallback::{Fallback, FallbackStage, Served};
pub use retry::{RetryBudget, RetryConfig, MIN_REFILL_PER_SEC};
