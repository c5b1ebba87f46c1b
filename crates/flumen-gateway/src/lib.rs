//! Flumen's gateway and backend configuration, shared by `flumen run` and
//! `flumen serve`:
//!
//! - [`backends`]: backends chosen and configured in TOML ([`backends::FileConfig`],
//!   [`backends::BackendConfig`]), every problem reported with its path, built into
//!   one [`backends::AnyBackend`] with JSON records in and out;
//! - [`serve`]: the gateway — OpenAI-compatible and KServe v2 endpoints in front of
//!   one shared engine per model;
//! - [`signals`]: SIGINT/SIGTERM, for both commands' graceful stops.

pub mod backends;
pub mod serve;
#[cfg(feature = "grpc")]
mod serve_grpc;
mod serve_kserve;
mod serve_openai;
pub mod signals;

/// Invalid configuration: every problem found, each naming its path or flag.
#[derive(Debug)]
pub struct BadConfig(pub Vec<String>);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid options:")?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BadConfig {}
