//! OpenAI-compatible backends for Flumen.
//!
//! - [`Embeddings`]: `POST {base_url}/embeddings` with many inputs per request (up
//!   to the API's 2,048 items and a token budget), results matched back by `index`.
//! - [`Chat`]: `POST {base_url}/chat/completions`, one record per request; Flumen's
//!   adaptive concurrency decides how many run at once.
//!
//! A chat backend may run a record pipeline ([`LlmPipeline`]): a Jinja user
//! template rendered from each record, and a JSON Schema its answers are validated
//! against, with one repair attempt.
//!
//! Both honour requests-per-minute and tokens-per-minute limits (token buckets fed
//! with a per-record token estimate), map 429 and 503 to overload with their
//! `Retry-After` (or OpenAI's `retry-after-ms`), other 5xx to transient and other
//! 4xx to permanent, apply a context-overflow policy like Flink's (truncate the
//! head or the tail, or skip the record), read the API key from the environment and
//! never print it. Any base URL speaking this API works: OpenAI, vLLM, TEI, Ollama,
//! LiteLLM. HTTPS needs the `tls` feature.

mod chat;
mod client;
mod config;
mod embeddings;
mod limits;
mod llm;
mod tokens;

pub use chat::{completion_budget, request_tokens, Chat};
pub use config::{ApiKey, OpenAiConfig, OverflowPolicy};
pub use embeddings::Embeddings;
pub use limits::{parse_reset, RateLimits, Reported, Seen};
pub use llm::{Answer, LlmPipeline, Repairs};
pub use tokens::{estimate_tokens, fit_context, Fitted};
