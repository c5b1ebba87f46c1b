//! Flumen's core vocabulary, shared by the engine, every backend and every front end.
//!
//! - [`Backend`]: what a model backend implements: one async call per batch, one
//!   result per item, plus the [`Capabilities`] the engine plans with.
//! - [`ErrorKind`] and [`BackendError`]: the error classes every backend maps its
//!   protocol errors into (overload is not failure; invalid input is not transient).
//! - [`Failure`]: the explicit failure outcome of a record: kind, message, attempts.
//! - [`Store`]: where the engine's result cache keeps answers (memory, a file, Redis).
//!
//! Dependencies point downward: this crate knows nothing of tokio, channels or
//! time sources, so a backend crate can depend on it alone. The optional `client`
//! feature adds the HTTP/JSON backends' shared client side (`http::send`,
//! `http::json_cost`), over reqwest and serde_json.

mod backend;
pub mod cache;
mod error;
pub mod http;

pub use backend::{Backend, BatchResult, Capabilities, ItemCost};
pub use cache::{CacheKey, Store, StoreError, StoreFuture};
pub use error::{BackendError, ErrorKind, Failure};
