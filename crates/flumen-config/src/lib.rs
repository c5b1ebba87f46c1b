//! Flumen's configuration, one schema for `flumen run` and `flumen serve`: the
//! backend (`[backend]`), the engine (`[engine]`) and the operator (`[operator]`),
//! read from TOML or filled from `flumen run`'s flags, validated once (every problem
//! at once, each with its path) and turned into an [`EngineConfig`] and an
//! [`OperatorConfig`] once.
//!
//! ```toml
//! [backend]
//! kind = "kserve"            # embedded | sim | kserve | openai-embeddings | openai-chat | http
//! url = "http://127.0.0.1:8000"
//! model = "cost"
//!
//! [engine]                   # optional
//! concurrency = "adaptive"   # adaptive (alias gradient) | aimd | a number
//! max_attempts = 4
//!
//! [operator]                 # optional
//! order = "unordered"        # unordered | ordered | keyed | partition
//! capacity = 1000
//! ```
//!
//! - [`backend`]: which backend and its settings ([`BackendConfig`]);
//! - [`engine`]: the engine's and the operator's sections, and the one parser of
//!   `concurrency`;
//! - [`cache`]: the result cache (`[cache]`): on or off, and its store;
//! - [`budget`]: what tokens cost (`[prices]`) and a spending limit (`[budget]`);
//! - [`json_backend`]: [`AnyBackend`], any configured backend built and seen by the
//!   engine as JSON records in and JSON predictions out.
//!
//! Unknown fields are errors; [`FileConfig::validate`] reports every problem at once,
//! each with its path (`backend.url: must start with http://`).

pub mod backend;
pub mod budget;
pub mod cache;
pub mod engine;
pub mod json_backend;
pub mod onnx;

pub use backend::{
    BackendConfig, EmbeddedSection, HttpSection, KserveSection, OpenAiSection, SimSection,
};
pub use budget::{BudgetSection, PricesSection};
pub use cache::{CacheSection, Stores};
pub use engine::{concurrency, concurrency_flag, EngineSection, OperatorSection};
pub use json_backend::{AnyBackend, KserveModel};
pub use onnx::OnnxSection;

use flumen_engine::{EngineConfig, OperatorConfig};
use serde::Deserialize;

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

/// A whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The model backend.
    pub backend: BackendConfig,
    /// The engine's batching, concurrency and reliability.
    #[serde(default)]
    pub engine: EngineSection,
    /// The operator's order, capacity and deadline.
    #[serde(default)]
    pub operator: OperatorSection,
    /// The result cache.
    #[serde(default)]
    pub cache: CacheSection,
    /// What the model's tokens cost.
    #[serde(default)]
    pub prices: Option<PricesSection>,
    /// A spending limit.
    #[serde(default)]
    pub budget: BudgetSection,
}

impl FileConfig {
    /// Reads and parses `text` (from `path`, named in errors).
    pub fn parse(path: &str, text: &str) -> Result<FileConfig, Vec<String>> {
        toml::from_str(text).map_err(|e| vec![format!("{path}: {}", e.to_string().trim_end())])
    }

    /// Every problem at once, each with its path.
    pub fn validate(&self) -> Vec<String> {
        let mut p = self.backend.validate("backend");
        p.extend(self.engine.validate("engine"));
        p.extend(self.operator.validate("operator"));
        p.extend(self.cache.validate("cache"));
        if let Some(prices) = &self.prices {
            p.extend(prices.validate("prices"));
        }
        p.extend(self.budget.validate("budget", self.prices.as_ref()));
        p
    }

    /// The engine's settings, with the spending budget (the cache's store is opened
    /// apart: [`CacheSection::build`]).
    pub fn engine(&self, name: &str) -> EngineConfig {
        let mut e = self.engine.config(name);
        e.spend = self.budget.build(self.prices.as_ref());
        e.prices = self.prices.map(|p| p.prices());
        e
    }

    /// The operator's settings.
    pub fn operator(&self) -> OperatorConfig {
        self.operator.config()
    }
}

#[cfg(test)]
mod tests {
    use flumen_engine::ConcurrencyConfig;

    use super::*;

    #[test]
    fn an_embedded_section_reports_every_problem() {
        let text = r#"
            [backend]
            kind = "embedded"
            dir = "/models/x"
            hub = "just-a-name"
            max_batch_items = 0
            max_seq_length = 1
        "#;
        let problems = FileConfig::parse("p.toml", text).unwrap().validate();
        for path in [
            "backend.dir, backend.hub",
            "backend.hub: `just-a-name`",
            "backend.max_batch_items",
            "backend.max_seq_length",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} missing in {problems:#?}"
            );
        }
        let err = FileConfig::parse(
            "p.toml",
            "[backend]\nkind = \"embedded\"\nthreads = \"two\"\n",
        )
        .unwrap_err()
        .join("\n");
        assert!(err.contains("threads"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [backend]
            kind = "http"
            url = "ftp://example"
            template = { text = "{{inputs}}" }
            result = "predictions"
            mode = "per-record"

            [engine]
            concurrency = "lots"
            max_attempts = 0

            [operator]
            order = "keyed"
            capacity = 0
        "#;
        let config = FileConfig::parse("p.toml", text).unwrap();
        let problems = config.validate();
        for path in [
            "backend.url",
            "backend.template",
            "backend.result",
            "engine.concurrency",
            "engine.max_attempts",
            "operator.key_field",
            "operator.capacity",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} missing in {problems:#?}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_named_with_where_they_are() {
        // Inside the tagged [backend] table the parser points at the table's line.
        let e = FileConfig::parse("p.toml", "[backend]\nkind = \"sim\"\nslotz = 3\n").unwrap_err();
        assert!(
            e[0].contains("slotz") && e[0].contains("[backend]"),
            "{e:?}"
        );
        let e = FileConfig::parse(
            "p.toml",
            "[backend]\nkind = \"sim\"\n[engine]\nbreakr = true\n",
        )
        .unwrap_err();
        assert!(e[0].contains("breakr") && e[0].contains("line 4"), "{e:?}");
        let e = FileConfig::parse("p.toml", "[backend]\nkind = \"magic\"\n").unwrap_err();
        assert!(e[0].contains("magic"), "{e:?}");
    }

    #[test]
    fn the_simulator_needs_finite_costs() {
        let text = "[backend]\nkind = \"sim\"\na_ms = inf\nb_ms = -1.0\n";
        let problems = FileConfig::parse("p.toml", text).unwrap().validate();
        assert!(
            problems[0].starts_with("backend.a_ms: must be a number ≥ 0, got inf"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("backend.b_ms: must be a number ≥ 0, got -1"),
            "{problems:?}"
        );
        let fine = "[backend]\nkind = \"sim\"\n[engine]\nconcurrency = \"gradient\"\n";
        assert!(FileConfig::parse("p.toml", fine)
            .unwrap()
            .validate()
            .is_empty());
    }

    #[test]
    fn a_good_file_makes_its_engine() {
        let text = "[backend]\nkind = \"sim\"\n[engine]\nconcurrency = 3\nmax_attempts = 2\nbreaker = true\neager = true\n";
        let config = FileConfig::parse("p.toml", text).unwrap();
        assert!(config.validate().is_empty());
        let e = config.engine("x");
        assert_eq!(e.concurrency, ConcurrencyConfig::Fixed(3));
        assert_eq!(e.retry.max_attempts, 2);
        assert!(e.breaker.is_some());
        assert!(e.batch.eager);
        let plain = FileConfig::parse("p.toml", "[backend]\nkind = \"sim\"\n").unwrap();
        assert!(
            !plain.engine("x").batch.eager,
            "holding for balance is the default"
        );
    }
}
