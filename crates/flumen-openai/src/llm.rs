//! Record pipelines for a chat model: the prompt rendered from the record's fields
//! with Jinja templates (minijinja), the answer parsed and validated against a JSON
//! Schema (the `jsonschema` crate), with one repair attempt that sends the
//! validator's errors back to the model.
//!
//! A record's answer is an [`Answer`] envelope: the parsed object (or the text,
//! without a schema), the usage the provider reported over every request the record
//! took, and how many repairs it needed.

use std::sync::atomic::{AtomicU64, Ordering};

use flumen_core::BackendError;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{json, Value};

/// The template names, as errors name them (the configuration fields).
const SYSTEM: &str = "system_prompt";
const USER: &str = "user_template";

/// Errors listed in a failure's message, at most.
const SHOWN_ERRORS: usize = 5;

/// What a pipeline asks of the model and checks of its answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmPipeline {
    /// The user message, a Jinja template over the record's fields (the whole
    /// record is `record`). `None`: the record is the user message, as text.
    pub user_template: Option<String>,
    /// A JSON Schema every answer must match (the answer must be JSON).
    pub response_schema: Option<Value>,
    /// Send the schema as the request's `response_format` (`json_schema`), for
    /// providers that constrain their output with it (default on).
    pub send_schema: bool,
    /// Repair attempts after an answer that does not parse or validate (default 1).
    pub max_repairs: u32,
}

impl LlmPipeline {
    /// Whether records go through this pipeline (else they are plain text or whole
    /// chat requests).
    pub fn is_active(&self) -> bool {
        self.user_template.is_some() || self.response_schema.is_some()
    }

    /// Every problem with the templates (with `system_prompt`, rendered as one when
    /// there is a user template) and the schema, each under `path`.
    pub fn problems(&self, system_prompt: Option<&str>, path: &str) -> Vec<String> {
        Compiled::new(self, system_prompt, path)
            .err()
            .unwrap_or_default()
    }
}

/// A compiled pipeline: templates parsed, schema compiled.
pub(crate) struct Compiled {
    env: Environment<'static>,
    system: bool,
    user: bool,
    schema: Option<(Value, jsonschema::Validator)>,
    send_schema: bool,
    max_repairs: u32,
    pub(crate) repairs: Counts,
}

/// Repair attempts and how they ended.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) tried: AtomicU64,
    pub(crate) valid: AtomicU64,
}

/// Repair attempts a backend made, and how many of them ended in a valid answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Repair requests sent.
    pub tried: u64,
    /// Records whose answer was valid after a repair.
    pub valid: u64,
}

impl Compiled {
    /// Compiles `p` (with the configured system prompt as a template too), or says
    /// what is wrong with each part, under `path`.
    pub(crate) fn new(
        p: &LlmPipeline,
        system_prompt: Option<&str>,
        path: &str,
    ) -> Result<Compiled, Vec<String>> {
        let mut problems = Vec::new();
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut add = |name: &'static str, source: Option<&str>| match source {
            Some(s) => match env.add_template_owned(name, s.to_owned()) {
                Ok(()) => true,
                Err(e) => {
                    problems.push(format!("{path}.{name}: {e}"));
                    false
                }
            },
            None => false,
        };
        let system = add(SYSTEM, system_prompt.filter(|_| p.user_template.is_some()));
        let user = add(USER, p.user_template.as_deref());
        let schema = match &p.response_schema {
            Some(s) => match jsonschema::validator_for(s) {
                Ok(v) => Some((s.clone(), v)),
                Err(e) => {
                    problems.push(format!(
                        "{path}.response_schema: not a valid JSON Schema: {e}"
                    ));
                    None
                }
            },
            None => None,
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Compiled {
            env,
            system,
            user,
            schema,
            send_schema: p.send_schema,
            max_repairs: p.max_repairs,
            repairs: Counts::default(),
        })
    }

    /// The messages for `record`: the system prompt (rendered when the user message
    /// is a template; `fixed` otherwise) and the user message. A field the templates
    /// use that the record lacks fails the record, naming it.
    pub(crate) fn messages(
        &self,
        record: &Value,
        fixed_system: Option<&str>,
    ) -> Result<Vec<Value>, BackendError> {
        let mut messages = Vec::with_capacity(2);
        if self.system {
            messages.push(json!({"role": "system", "content": self.render(SYSTEM, record)?}));
        } else if let Some(system) = fixed_system {
            messages.push(json!({"role": "system", "content": system}));
        }
        let user = if self.user {
            self.render(USER, record)?
        } else {
            match record {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }
        };
        messages.push(json!({"role": "user", "content": user}));
        Ok(messages)
    }

    fn render(&self, name: &str, record: &Value) -> Result<String, BackendError> {
        let template = self.env.get_template(name).expect("compiled template");
        // The record's fields at the top level, and the whole record as `record`.
        let mut context = match record {
            Value::Object(fields) => fields.clone(),
            _ => serde_json::Map::new(),
        };
        context.insert("record".into(), record.clone());
        template
            .render(minijinja::value::Serde(&Value::Object(context)))
            .map_err(|e| BackendError::invalid_input(format!("{name}: {e}")))
    }

    /// The request's `response_format`, when the schema is sent.
    pub(crate) fn response_format(&self) -> Option<Value> {
        let (schema, _) = self.schema.as_ref().filter(|_| self.send_schema)?;
        Some(json!({
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema},
        }))
    }

    /// The answer's value: the parsed and validated JSON with a schema, the text
    /// without one; or what is wrong with it.
    pub(crate) fn check(&self, content: &str) -> Result<Value, Vec<String>> {
        let Some((_, validator)) = &self.schema else {
            return Ok(Value::String(content.to_owned()));
        };
        let value: Value = serde_json::from_str(unfenced(content))
            .map_err(|e| vec![format!("the reply is not JSON: {e}")])?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| match e.instance_path().to_string() {
                p if p.is_empty() => e.to_string(),
                p => format!("at {p}: {e}"),
            })
            .collect();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(errors)
        }
    }

    /// Repair attempts allowed for one record.
    pub(crate) fn max_repairs(&self) -> u32 {
        if self.schema.is_some() {
            self.max_repairs
        } else {
            0
        }
    }

    pub(crate) fn counted(&self) -> Repairs {
        Repairs {
            tried: self.repairs.tried.load(Ordering::Relaxed),
            valid: self.repairs.valid.load(Ordering::Relaxed),
        }
    }
}

/// The message that asks for a repair, with the validator's errors.
pub(crate) fn repair_message(errors: &[String]) -> Value {
    json!({
        "role": "user",
        "content": format!(
            "Your reply does not match the required JSON Schema: {}. Reply again with only \
             the corrected JSON, nothing else.",
            listed(errors)
        ),
    })
}

/// The first errors, and how many more there were.
pub(crate) fn listed(errors: &[String]) -> String {
    let mut text = errors
        .iter()
        .take(SHOWN_ERRORS)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > SHOWN_ERRORS {
        text.push_str(&format!(" (and {} more)", errors.len() - SHOWN_ERRORS));
    }
    text
}

/// The JSON inside a Markdown code fence (```json … ```), which models often add;
/// the text itself otherwise.
fn unfenced(content: &str) -> &str {
    let t = content.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let body = rest.split_once('\n').map_or("", |(_, b)| b);
    body.trim_end().strip_suffix("```").unwrap_or(body).trim()
}

/// A record's answer: what goes into the output, and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The parsed, validated object (with a schema), or the text.
    pub content: Value,
    /// Prompt tokens over every request the record took, as the provider reported.
    pub prompt_tokens: u64,
    /// Completion tokens, likewise.
    pub completion_tokens: u64,
    /// Repair requests it took.
    pub repairs: u32,
    /// The model that answered, as the provider named it.
    pub model: Option<String>,
}

impl Answer {
    /// The answer as the backend's JSON output: `{"content", "usage", "repairs",
    /// "model"}` (`usage` in the API's shape, so token accounting reads it).
    pub fn to_value(&self) -> Value {
        json!({
            "content": self.content,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "repairs": self.repairs,
            "model": self.model,
        })
    }

    /// Reads an answer back from [`to_value`](Answer::to_value)'s JSON.
    pub fn from_value(v: &Value) -> Option<Answer> {
        Some(Answer {
            content: v.get("content")?.clone(),
            prompt_tokens: v.pointer("/usage/prompt_tokens")?.as_u64()?,
            completion_tokens: v.pointer("/usage/completion_tokens")?.as_u64()?,
            repairs: u32::try_from(v.get("repairs")?.as_u64()?).ok()?,
            model: v.get("model").and_then(Value::as_str).map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(user: &str, schema: Option<Value>) -> Compiled {
        let p = LlmPipeline {
            user_template: Some(user.into()),
            response_schema: schema,
            send_schema: true,
            max_repairs: 1,
        };
        Compiled::new(&p, Some("You classify {{ kind }}s."), "backend").unwrap()
    }

    #[test]
    fn templates_render_fields_and_name_a_missing_one() {
        let c = compiled(
            "{{ subject }}: {{ body | upper }} ({{ record.meta.lang }})",
            None,
        );
        let record =
            json!({"kind": "ticket", "subject": "Login", "body": "help", "meta": {"lang": "en"}});
        let m = c.messages(&record, None).unwrap();
        assert_eq!(m[0]["content"], "You classify tickets.");
        assert_eq!(m[1]["content"], "Login: HELP (en)");
        let e = c
            .messages(&json!({"kind": "ticket", "body": "x", "meta": {}}), None)
            .unwrap_err();
        assert_eq!(e.kind, flumen_core::ErrorKind::InvalidInput);
        assert!(
            e.message.contains("`subject` is undefined"),
            "{}",
            e.message
        );
        assert!(e.message.starts_with("user_template: "), "{}", e.message);
        // The record's content never shows in the message beyond the field's name.
        assert!(!e.message.contains("ticket"), "{}", e.message);
    }

    #[test]
    fn bad_templates_and_schemas_are_refused_with_their_field() {
        let p = LlmPipeline {
            user_template: Some("{{ unclosed".into()),
            response_schema: Some(json!({"type": 5})),
            send_schema: true,
            max_repairs: 1,
        };
        let problems = Compiled::new(&p, Some("{% if %}"), "backend")
            .err()
            .expect("refused");
        for field in ["system_prompt", "user_template", "response_schema"] {
            assert!(
                problems
                    .iter()
                    .any(|m| m.starts_with(&format!("backend.{field}: "))),
                "{field} missing from {problems:?}"
            );
        }
    }

    #[test]
    fn answers_are_parsed_unfenced_and_validated_with_every_error_listed() {
        let schema = json!({
            "type": "object",
            "properties": {"label": {"enum": ["bug", "billing"]}, "urgency": {"type": "integer"}},
            "required": ["label", "urgency"],
            "additionalProperties": false,
        });
        let c = compiled("{{ text }}", Some(schema));
        assert_eq!(
            c.check("```json\n{\"label\": \"bug\", \"urgency\": 2}\n```"),
            Ok(json!({"label": "bug", "urgency": 2}))
        );
        let errors = c.check(r#"{"label": "spam", "extra": 1}"#).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors.iter().any(|e| e.starts_with("at /label: ")),
            "{errors:?}"
        );
        assert!(errors.iter().any(|e| e.contains("urgency")), "{errors:?}");
        let errors = c.check("{\"label\": \"bug\", ").unwrap_err();
        assert!(errors[0].starts_with("the reply is not JSON"), "{errors:?}");
        assert!(listed(&vec!["a".to_owned(); 7]).ends_with("(and 2 more)"));
    }

    #[test]
    fn an_answer_round_trips_through_json() {
        let a = Answer {
            content: json!({"label": "bug"}),
            prompt_tokens: 12,
            completion_tokens: 5,
            repairs: 1,
            model: Some("tiny".into()),
        };
        assert_eq!(Answer::from_value(&a.to_value()), Some(a));
    }
}
