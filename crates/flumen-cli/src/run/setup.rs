//! What a run is made of — a pipeline file or the flags, validated once into a
//! [`Setup`] — and which of the two the command line names.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use flumen_config::engine::concurrency_flag;
use flumen_config::PricesSection;
use flumen_config::{BackendConfig, BudgetSection, CacheSection, EmbeddedSection, FileConfig};
use flumen_config::{EngineSection, OperatorSection};
use flumen_connect::{Patience, SinkConfig, SourceConfig};
use flumen_engine::{EngineConfig, OperatorConfig};

use super::records::LaneFields;
use serde::Deserialize;

use super::{BackendKind, BadConfig, Order, RunArgs};

/// What orders outcomes with `keyed` order.
#[derive(Debug, Clone)]
pub(super) enum KeyBy {
    /// A record field.
    Field(String),
    /// The source partition (Kafka): per-partition order.
    Partition,
}

/// What a run is made of: from a pipeline file, or from the flags.
pub(super) struct Setup {
    pub(super) backend: BackendConfig,
    /// `[[fallback]]`: backends that answer, in order, for records the primary
    /// failed for a reason they may not share.
    pub(super) fallbacks: Vec<BackendConfig>,
    pub(super) engine: EngineConfig,
    pub(super) cache: CacheSection,
    pub(super) prices: Option<PricesSection>,
    pub(super) operator: OperatorConfig,
    pub(super) key: Option<KeyBy>,
    pub(super) source: SourceConfig,
    pub(super) sink: SinkConfig,
    pub(super) dead_letter: Option<SinkConfig>,
    pub(super) field: Option<String>,
    pub(super) output_field: String,
    pub(super) usage_field: Option<String>,
    pub(super) lanes: LaneFields,
    pub(super) max_record_bytes: usize,
    pub(super) delivery: Delivery,
}

/// What happens to outcomes a sink refuses, and to broker outages.
pub(super) struct Delivery {
    pub(super) excerpt_bytes: usize,
    pub(super) quarantine: PathBuf,
    pub(super) patience: Patience,
}

/// A pipeline file: the backend, engine and operator sections of `--config`, plus
/// where records come from and go to.
///
/// ```toml
/// [source]
/// kind = "kafka"            # file | stdin | kafka | nats
/// brokers = "127.0.0.1:9092"
/// topic = "reviews"
/// group = "flumen"
///
/// [mapping]
/// input = "text"            # the field that is the model's input (default: the record)
/// output = "embedding"      # where the prediction goes (default: "prediction")
///
/// [sink]
/// kind = "kafka"
/// brokers = "127.0.0.1:9092"
/// topic = "reviews-embedded"
///
/// [[fallback]]              # optional, any number: backends that answer, in
/// kind = "openai-chat"      # order, for records the primary could not (overload,
/// base_url = "…"            # outage, timeout); each a whole [backend] table
/// model = "…"
///
/// [dead_letter]             # optional: failures go here instead of the sink
/// kind = "file"
/// path = "failed.jsonl"
///
/// [delivery]                # optional
/// excerpt_bytes = 65536     # dead letters carry larger records as an excerpt
/// quarantine = "flumen-quarantine.jsonl"  # dead letters the dead-letter sink refuses
/// max_outage_s = 600        # give up on an unreachable broker (default: never)
///
/// [backend]
/// kind = "embedded"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PipelineFile {
    backend: BackendConfig,
    #[serde(default)]
    engine: EngineSection,
    #[serde(default)]
    operator: OperatorSection,
    #[serde(default)]
    cache: CacheSection,
    #[serde(default)]
    prices: Option<PricesSection>,
    #[serde(default)]
    budget: BudgetSection,
    source: Option<SourceConfig>,
    sink: Option<SinkConfig>,
    dead_letter: Option<SinkConfig>,
    #[serde(default)]
    mapping: MappingSection,
    #[serde(default)]
    delivery: DeliverySection,
    #[serde(default)]
    fallback: Vec<BackendConfig>,
}

/// `[delivery]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliverySection {
    /// Dead letters carry records up to this size whole, larger ones as an excerpt.
    excerpt_bytes: Option<usize>,
    /// Where refused dead letters go.
    quarantine: Option<PathBuf>,
    /// Give up on a broker unreachable this long (default: wait indefinitely).
    max_outage_s: Option<u64>,
}

/// `[mapping]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MappingSection {
    /// The record field that is the model's input.
    input: Option<String>,
    /// The field the prediction is written to.
    output: Option<String>,
    /// The field what the record cost is written to (none by default).
    usage: Option<String>,
    /// The field holding a record's priority class (see `--priority-field`).
    priority: Option<String>,
    /// The field holding a record's tenant (see `--tenant-field`).
    tenant: Option<String>,
    /// Longer records fail alone (default 1 MiB).
    max_record_bytes: Option<usize>,
}

/// The flags a pipeline file may stand beside: where records go, how they are
/// mapped, and how the run reports. The others configure what the file configures.
pub(super) const FLAGS_BESIDE_A_FILE: &[&str] = &[
    "input",
    "config",
    "output",
    "dead_letter",
    "field",
    "output_field",
    "usage_field",
    "priority_field",
    "tenant_field",
    "log_format",
    "otlp_endpoint",
    "trace_sample_ratio",
    "max_record_bytes",
    "excerpt_bytes",
    "quarantine",
    "max_outage_s",
    "metrics_addr",
    "fail_on_dead_letter",
    "quiet",
];

/// Whether `flag` (a field of [`RunArgs`]) was given on the command line.
pub(super) fn given(args: &RunArgs, flag: &str) -> bool {
    args.explicit.iter().any(|f| f == flag)
}

pub(super) fn from_file(path: &std::path::Path, args: &RunArgs) -> Result<Setup> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadConfig(vec![format!("{shown}: cannot read: {e}")]))?;
    let mut problems: Vec<String> = args
        .explicit
        .iter()
        .filter(|f| !FLAGS_BESIDE_A_FILE.contains(&f.as_str()))
        .map(|f| {
            format!(
                "--{}: the pipeline file {shown} configures the backend, engine and operator; \
                 set it there ([backend], [engine], [operator]) instead of as a flag",
                f.replace('_', "-")
            )
        })
        .collect();
    // Flags beside the file are checked as they would be alone.
    problems.extend(delivery_problems(args));
    if given(args, "max_record_bytes") && args.max_record_bytes == 0 {
        problems.push("--max-record-bytes: must be > 0".to_owned());
    }
    if let (Some(_), Some(input)) = (&args.config, &args.input) {
        problems.push(format!(
            "{}: an input beside --config {shown}: the pipeline's [source] says where records come from",
            input.display()
        ));
    }
    let file = match crate::toml_keys::parse::<PipelineFile>(&shown, &text) {
        Ok(file) => file,
        Err(more) => {
            problems.extend(more);
            return Err(BadConfig(problems).into());
        }
    };
    let PipelineFile {
        backend,
        engine,
        operator,
        cache,
        prices,
        budget,
        source,
        sink,
        dead_letter,
        mapping,
        delivery,
        fallback,
    } = file;
    let file = FileConfig {
        backend,
        engine,
        operator,
        cache,
        prices,
        budget,
    };
    let mut problems: Vec<String> = problems
        .into_iter()
        .chain(file.validate().into_iter().map(|p| format!("{shown}: {p}")))
        .collect();
    let mut more = Vec::new();
    if let Some(s) = &source {
        more.extend(s.validate("source"));
    }
    if let Some(s) = &sink {
        more.extend(s.validate("sink"));
    }
    if let Some(s) = &dead_letter {
        more.extend(s.validate("dead_letter"));
    }
    if mapping.max_record_bytes == Some(0) {
        more.push("mapping.max_record_bytes: must be > 0".into());
    }
    if delivery.excerpt_bytes == Some(0) {
        more.push("delivery.excerpt_bytes: must be > 0".into());
    }
    if delivery.max_outage_s == Some(0) {
        more.push("delivery.max_outage_s: must be > 0 (leave it out to wait indefinitely)".into());
    }
    let pipeline = |b: &BackendConfig| matches!(b, BackendConfig::OpenaiChat(o) if o.is_pipeline());
    for (i, f) in fallback.iter().enumerate() {
        more.extend(f.validate(&format!("fallback[{i}]")));
        if pipeline(f) != pipeline(&file.backend) {
            more.push(format!(
                "fallback[{i}]: every stage must answer records the same way: {} a record \
                 pipeline (an openai-chat backend with user_template or response_schema)",
                if pipeline(&file.backend) {
                    "[backend] runs, and this stage does not run,"
                } else {
                    "this stage runs, and [backend] does not run,"
                }
            ));
        }
    }
    if file.operator.order.as_deref() == Some("partition")
        && !matches!(source, Some(SourceConfig::Kafka(_)))
    {
        more.push(
            "operator.order: `partition` needs a partitioned source (kind = \"kafka\")".into(),
        );
    }
    problems.extend(more.into_iter().map(|p| format!("{shown}: {p}")));
    if !problems.is_empty() {
        return Err(BadConfig(problems).into());
    }
    let (key, operator) = (key_of(&file.operator), file.operator());
    Ok(Setup {
        engine: file.engine("backend"),
        key,
        operator,
        source: source.unwrap_or(SourceConfig::Stdin),
        sink: match &args.output {
            Some(p) => file_sink(p),
            None => sink.unwrap_or(SinkConfig::Stdout),
        },
        dead_letter: match &args.dead_letter {
            Some(p) => Some(file_sink(p)),
            None => dead_letter,
        },
        // A flag given beside the file wins over the file.
        field: args.field.clone().or(mapping.input),
        output_field: match mapping.output {
            Some(o) if !given(args, "output_field") => o,
            _ => args.output_field.clone(),
        },
        usage_field: args.usage_field.clone().or(mapping.usage),
        lanes: LaneFields {
            priority: args.priority_field.clone().or(mapping.priority),
            tenant: args.tenant_field.clone().or(mapping.tenant),
        },
        max_record_bytes: match mapping.max_record_bytes {
            Some(m) if !given(args, "max_record_bytes") => m,
            _ => args.max_record_bytes,
        },
        delivery: Delivery {
            excerpt_bytes: match delivery.excerpt_bytes {
                Some(e) if !given(args, "excerpt_bytes") => e,
                _ => args.excerpt_bytes,
            },
            quarantine: match delivery.quarantine {
                Some(q) if !given(args, "quarantine") => q,
                _ => args.quarantine.clone(),
            },
            patience: Patience {
                max_outage: args
                    .max_outage_s
                    .or(delivery.max_outage_s)
                    .map(Duration::from_secs),
            },
        },
        backend: file.backend,
        fallbacks: fallback,
        cache: file.cache,
        prices: file.prices,
    })
}

/// A file sink named by a flag; its mode follows the source (see [`flumen_connect::FileMode`]).
pub(super) fn file_sink(path: &std::path::Path) -> SinkConfig {
    SinkConfig::File {
        path: path.to_owned(),
        mode: None,
    }
}

pub(super) fn source_of_flags(args: &RunArgs) -> SourceConfig {
    match &args.input {
        None => SourceConfig::Stdin,
        Some(p) if p.as_os_str() == "-" => SourceConfig::Stdin,
        Some(p) => SourceConfig::File { path: p.clone() },
    }
}

/// What orders outcomes, by an operator section's `order`.
fn key_of(o: &OperatorSection) -> Option<KeyBy> {
    match o.order.as_deref() {
        Some("keyed") => o.key_field.clone().map(KeyBy::Field),
        Some("partition") => Some(KeyBy::Partition),
        _ => None,
    }
}

/// The flag that sets each section field `flumen run` has a flag for.
const FLAG_OF: &[(&str, &str)] = &[
    ("backend.kind", "--backend"),
    ("backend.a_ms", "--sim-a-ms"),
    ("backend.b_ms", "--sim-b-ms"),
    ("backend.slots", "--sim-slots"),
    ("backend.max_batch", "--sim-max-batch"),
    ("backend.error_rate", "--sim-error-rate"),
    ("backend.dir", "--model-dir"),
    ("backend.threads", "--model-threads"),
    ("engine.max_batch", "--max-batch"),
    ("engine.max_wait_ms", "--max-wait-ms"),
    ("engine.max_attempts", "--max-attempts"),
    ("engine.attempt_timeout_ms", "--attempt-timeout-ms"),
    ("engine.concurrency", "--concurrency"),
    ("operator.capacity", "--capacity"),
    ("operator.timeout_ms", "--timeout-ms"),
    ("operator.key_field", "--key-field"),
    ("operator.order", "--order"),
];

/// A problem found in the sections the flags filled, told with the flags' names:
/// each whole section path that has a flag is replaced by it.
fn in_flags(problem: &str) -> String {
    let mut out = String::with_capacity(problem.len());
    let mut rest = problem;
    'scan: while !rest.is_empty() {
        for (path, flag) in FLAG_OF {
            if let Some(after) = rest.strip_prefix(path) {
                let whole = !after.starts_with(|c: char| c.is_alphanumeric() || c == '_');
                let starts_word =
                    !out.ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '.');
                if whole && starts_word {
                    out.push_str(flag);
                    rest = after;
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().expect("not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The flags fill the same sections a pipeline file does, and go through the same
/// validation and the same conversion into the engine's and operator's settings.
pub(super) fn from_flags(args: &RunArgs) -> Result<Setup> {
    let backend = match args.backend {
        BackendKind::Sim => BackendConfig::Sim(args.sim.section()),
        BackendKind::Embedded => BackendConfig::Embedded(EmbeddedSection {
            dir: args.embedded.model_dir.clone(),
            threads: args.embedded.model_threads,
            offline: args.embedded.offline,
            ..EmbeddedSection::default()
        }),
    };
    let engine = EngineSection {
        max_batch: args.max_batch,
        max_wait_ms: args.max_wait_ms,
        concurrency: Some(concurrency_flag(&args.concurrency)),
        max_attempts: Some(args.max_attempts),
        attempt_timeout_ms: args.attempt_timeout_ms,
        ..EngineSection::default()
    };
    let operator = OperatorSection {
        order: Some(
            match args.order {
                Order::Unordered => "unordered",
                Order::Ordered => "ordered",
                Order::Keyed => "keyed",
            }
            .to_owned(),
        ),
        capacity: Some(args.capacity),
        timeout_ms: Some(args.timeout_ms),
        key_field: args.key_field.clone(),
    };
    let file = FileConfig {
        backend,
        engine,
        operator,
        cache: CacheSection::default(),
        prices: None,
        budget: BudgetSection::default(),
    };
    let mut problems: Vec<String> = file.validate().iter().map(|p| in_flags(p)).collect();
    if args.max_record_bytes == 0 {
        problems.push("--max-record-bytes: must be > 0".to_owned());
    }
    problems.extend(delivery_problems(args));
    if !problems.is_empty() {
        return Err(BadConfig(problems).into());
    }
    let name = match args.backend {
        BackendKind::Sim => "sim",
        BackendKind::Embedded => "embedded",
    };
    Ok(Setup {
        engine: file.engine(name),
        operator: file.operator(),
        key: key_of(&file.operator),
        backend: file.backend,
        fallbacks: Vec::new(),
        cache: file.cache,
        prices: file.prices,
        source: source_of_flags(args),
        sink: args.output.as_deref().map_or(SinkConfig::Stdout, file_sink),
        dead_letter: args.dead_letter.as_deref().map(file_sink),
        field: args.field.clone(),
        output_field: args.output_field.clone(),
        usage_field: args.usage_field.clone(),
        lanes: LaneFields {
            priority: args.priority_field.clone(),
            tenant: args.tenant_field.clone(),
        },
        max_record_bytes: args.max_record_bytes,
        delivery: Delivery {
            excerpt_bytes: args.excerpt_bytes,
            quarantine: args.quarantine.clone(),
            patience: Patience {
                max_outage: args.max_outage_s.map(Duration::from_secs),
            },
        },
    })
}

pub(super) fn delivery_problems(args: &RunArgs) -> Vec<String> {
    let mut problems = Vec::new();
    if args.excerpt_bytes == 0 {
        problems.push("--excerpt-bytes: must be > 0".to_owned());
    }
    if args.max_outage_s == Some(0) {
        problems.push("--max-outage-s: must be > 0 (leave it out to wait indefinitely)".to_owned());
    }
    problems
}

/// Which input: `--config`, else the positional input when it is a pipeline file —
/// named `*.toml`, or TOML with a `[backend]` table (a JSONL file never parses as
/// such) — else none (the input is JSONL).
pub(super) fn pipeline_path(args: &RunArgs) -> Option<PathBuf> {
    if let Some(c) = &args.config {
        return Some(c.clone());
    }
    let input = args.input.as_ref().filter(|p| p.as_os_str() != "-")?;
    if input.extension().is_some_and(|e| e == "toml") {
        return Some(input.clone());
    }
    let small = std::fs::metadata(input).is_ok_and(|m| m.is_file() && m.len() <= 1 << 20);
    let text = small
        .then(|| std::fs::read_to_string(input).ok())
        .flatten()?;
    let table = text.parse::<toml::Table>().ok()?;
    table
        .get("backend")
        .is_some_and(toml::Value::is_table)
        .then(|| input.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_paths_read_as_flags() {
        assert_eq!(
            in_flags("engine.max_attempts: must be > 0"),
            "--max-attempts: must be > 0"
        );
        assert_eq!(
            in_flags("backend.max_batch: must be > 0"),
            "--sim-max-batch: must be > 0"
        );
        assert_eq!(
            in_flags("operator.key_field: required when operator.order is \"keyed\""),
            "--key-field: required when --order is \"keyed\""
        );
        assert_eq!(
            in_flags("engine.max_batch_tokens: must be > 0"),
            "engine.max_batch_tokens: must be > 0",
            "only whole paths are renamed"
        );
        assert_eq!(
            in_flags("backend.a_ms: must be a number ≥ 0, got -1"),
            "--sim-a-ms: must be a number ≥ 0, got -1"
        );
    }
}
