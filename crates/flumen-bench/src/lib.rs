//! Benchmark support: load generators, faithful baselines and table output.
//!
//! Every benchmark measures Flumen and its baselines in the same run, on fresh
//! instances of the same backend, through the same load generator.

pub mod baselines;
pub mod corpus;
pub mod flink;
pub mod llm;
pub mod load;
pub mod report;
pub mod served;
pub mod suite;
pub mod svg;
