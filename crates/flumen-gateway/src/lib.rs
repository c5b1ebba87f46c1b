//! Flumen's gateway, `flumen serve`: OpenAI-compatible and KServe v2 endpoints in
//! front of one shared engine per model, so that callers that send one request per
//! row get batching, adaptive concurrency, retries and breakers.
//!
//! - [`serve`]: the gateway — its configuration, its protocol-neutral core, and the
//!   fronts that translate each protocol into records;
//! - [`signals`]: SIGINT/SIGTERM, for the graceful stops of `flumen serve` and
//!   `flumen run`.
//!
//! The backends and the engine settings it serves come from [`flumen_config`].

pub mod serve;
pub mod signals;
