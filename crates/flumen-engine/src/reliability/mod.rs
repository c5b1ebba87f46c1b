//! Reliability policies: retries with backoff, a verdict per failed record and a
//! budget; the circuit breaker; and, internal to the crate, the judgement of a
//! finished call and the pause after overload and repeated failures. Plain structs and functions fed with instants and
//! outcomes, tested with made-up sequences; the engine's dispatcher and call tasks
//! are the mechanism around them (and the fallback chain, which runs engines, lives
//! beside the operator).

mod breaker;
pub(crate) mod classify;
pub(crate) mod pause;
mod retry;

pub use breaker::{Breaker, BreakerConfig, BreakerPhase, BreakerState, BreakerWindow, CallClass};
pub use retry::{RetryBudget, RetryConfig, Verdict, MIN_REFILL_PER_SEC};
