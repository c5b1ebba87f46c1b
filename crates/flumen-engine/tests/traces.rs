//! Traces through the OpenTelemetry SDK's in-memory exporter (via
//! `tracing-opentelemetry`): one record's spans form one trace from its submission to
//! its outcome — the `record` span, and an `attempt` span under it for each call it
//! rode in — and each `call` span is linked to the records it carried, each attempt
//! to its call. A retry shows as a second attempt.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flumen_core::{Backend, BackendError, BatchResult, Capabilities};
use flumen_engine::{Engine, EngineConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

/// Fails its first call (transient), answers the next ones.
#[derive(Default)]
struct FlakyOnce {
    calls: AtomicU32,
}

impl Backend for FlakyOnce {
    type Input = u32;
    type Output = u32;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: 8,
            ..Capabilities::default()
        }
    }

    async fn call(&self, batch: &[u32]) -> BatchResult<u32> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(BackendError::transient("connection reset"));
        }
        Ok(batch.iter().map(|x| Ok(x + 1)).collect())
    }
}

/// An attribute as text (a field recorded after the span began comes as a string).
fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

#[test]
fn one_record_is_one_trace_with_its_attempts_and_their_calls_linked() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::DEBUG)
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("flumen-test")));
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let engine = Engine::new(
                FlakyOnce::default(),
                EngineConfig {
                    name: "traced".into(),
                    ..EngineConfig::default()
                },
            );
            let answer = engine
                .submit(
                    41,
                    Some(tokio::time::Instant::now() + Duration::from_secs(10)),
                )
                .await;
            assert_eq!(answer.unwrap(), 42);
        });
    });
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let named = |n: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == n).collect() };
    let (records, attempts, calls) = (named("record"), named("attempt"), named("call"));
    assert_eq!(records.len(), 1, "{spans:#?}");
    assert_eq!(attempts.len(), 2, "a retry is a second attempt: {spans:#?}");
    assert_eq!(calls.len(), 2, "{spans:#?}");
    let record = records[0];
    let trace = record.span_context.trace_id();
    assert_eq!(attribute(record, "outcome").as_deref(), Some("ok"));
    assert_eq!(attribute(record, "attempts").as_deref(), Some("2"));
    assert_eq!(attribute(record, "engine").as_deref(), Some("traced"));
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(
            a.span_context.trace_id(),
            trace,
            "attempt {i} in the record's trace"
        );
        assert_eq!(
            a.parent_span_id,
            record.span_context.span_id(),
            "attempt {i} under the record"
        );
        // Each attempt links to a call, and that call back to the record.
        let call = a.links.links.iter().find_map(|l| {
            calls
                .iter()
                .find(|c| c.span_context.span_id() == l.span_context.span_id())
        });
        let call = call.unwrap_or_else(|| panic!("attempt {i} links to no call: {a:#?}"));
        assert!(
            call.links
                .links
                .iter()
                .any(|l| l.span_context.span_id() == record.span_context.span_id()),
            "call {i} is not linked to the record it carried"
        );
        assert!(
            a.end_time <= record.end_time,
            "attempt {i} ends before the outcome"
        );
    }
    let mut numbers: Vec<Option<String>> = attempts.iter().map(|a| attribute(a, "n")).collect();
    numbers.sort();
    assert_eq!(numbers, vec![Some("1".into()), Some("2".into())]);
}
