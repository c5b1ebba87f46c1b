//! What a run adds for a chat backend's record pipeline (a user template, a response
//! schema): answers unwrapped into the output record (or merged into it), the usage
//! the provider reported, which provider answered, the fallback chain, and the
//! repairs' count in the summary.

use std::time::Duration;

use anyhow::Result;
use flumen_config::{AnyBackend, BackendConfig};
use flumen_engine::{Engine, EngineConfig, Fallback, Served};
use flumen_openai::{Answer, Repairs};
use serde_json::{json, Map, Value};

use super::records::{success_line, usage, Line};

/// `[mapping] output = "merge"`: the answer's fields go into the record itself.
pub(super) const MERGE: &str = "merge";

/// How answers are written.
pub(super) struct Answers {
    /// Whether the primary backend runs a record pipeline (its answers are
    /// [`Answer`] envelopes).
    pub(super) pipeline: bool,
    /// Where the answer goes (`merge`: into the record).
    pub(super) output_field: String,
    /// Where what the record cost goes.
    pub(super) usage_field: Option<String>,
    /// The name of each stage: the primary, then each fallback.
    pub(super) providers: Vec<String>,
}

impl Answers {
    /// The output line of an answered record.
    pub(super) fn line(
        &self,
        record: &Line,
        prediction: Value,
        served: Served,
        receipt: &flumen_engine::Receipt,
    ) -> Value {
        let answer = self
            .pipeline
            .then(|| Answer::from_value(&prediction))
            .flatten();
        let Some(answer) = answer else {
            let mut json = success_line(record, &self.output_field, prediction);
            if let (Some(field), Value::Object(map)) = (&self.usage_field, &mut json) {
                map.insert(field.clone(), usage(receipt));
            }
            return json;
        };
        let mut json = match (&answer.content, self.output_field.as_str()) {
            (Value::Object(fields), MERGE) => {
                let mut line = match &record.record {
                    Ok(Value::Object(map)) => map.clone(),
                    Ok(other) => Map::from_iter([("input".to_owned(), other.clone())]),
                    Err(_) => unreachable!("a record that did not parse never reaches the backend"),
                };
                line.extend(fields.clone());
                Value::Object(line)
            }
            // Not an object (no schema): it has to go under a field.
            (content, MERGE) => success_line(record, "prediction", content.clone()),
            (content, field) => success_line(record, field, content.clone()),
        };
        if let (Some(field), Value::Object(map)) = (&self.usage_field, &mut json) {
            map.insert(field.clone(), self.usage(&answer, served, receipt));
        }
        json
    }

    /// What the provider reported the record cost, over every request it took.
    fn usage(&self, a: &Answer, served: Served, receipt: &flumen_engine::Receipt) -> Value {
        let stage = match served {
            Served::Primary => 0,
            Served::Fallback(i) => i + 1,
        };
        let mut u = Map::new();
        u.insert("prompt_tokens".into(), a.prompt_tokens.into());
        u.insert("completion_tokens".into(), a.completion_tokens.into());
        u.insert("repairs".into(), a.repairs.into());
        u.insert(
            "provider".into(),
            json!(self.providers.get(stage).map_or("", String::as_str)),
        );
        u.insert("model".into(), json!(a.model));
        if let Some(cost) = receipt.cost.filter(|_| served == Served::Primary) {
            u.insert("cost".into(), cost.into());
        }
        u.insert("cached".into(), receipt.from_cache.into());
        Value::Object(u)
    }
}

/// The fallback chain: an engine for each `[[fallback]]` backend (with the primary's
/// engine settings and its own limits), each stage within `timeout`.
pub(super) async fn fallbacks(
    backends: &[BackendConfig],
    engine: &EngineConfig,
    timeout: Duration,
) -> Result<Vec<(Engine<AnyBackend>, Fallback<Value, Value>)>> {
    let mut chain = Vec::with_capacity(backends.len());
    for (i, config) in backends.iter().enumerate() {
        let backend = AnyBackend::build(config).await.map_err(|p| {
            anyhow::anyhow!(
                "cannot start fallback[{i}]: {}",
                p.join("; ").replace("backend", &format!("fallback[{i}]"))
            )
        })?;
        let mut settings = engine.clone();
        settings.name = format!("fallback[{i}]");
        settings.cache = None;
        // The last stage waits out a failing backend; the others hand records on.
        settings.hand_off = i + 1 < backends.len();
        let e = Engine::new(backend, settings);
        let stage = Fallback::engine(&e, timeout);
        chain.push((e, stage));
    }
    Ok(chain)
}

/// The repairs of every pipeline stage, for the run's summary ("" without any).
pub(super) fn repairs<'a>(engines: impl Iterator<Item = &'a Engine<AnyBackend>>) -> String {
    let mut total = Repairs::default();
    let mut any = false;
    for e in engines {
        if let Some(r) = e.backend().repairs() {
            any = true;
            total.tried += r.tried;
            total.valid += r.valid;
        }
    }
    match any {
        true => format!("; {} repairs, {} of them valid", total.tried, total.valid),
        false => String::new(),
    }
}
