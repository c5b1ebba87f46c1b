//! `flumen run --otlp-endpoint`: the engine's spans leave the binary over OTLP/HTTP
//! (protobuf), sampled by `--trace-sample-ratio`, and carry no record's content.
//!
//! The receiver is this test's own: no OTLP collector can be installed here from
//! Debian, PyPI or npm. It decodes what the OpenTelemetry SDK's exporter sends with
//! the protocol's own message types (`opentelemetry-proto`), so what is checked is the
//! wire format a collector reads.
// The test waits on a child process with real time.
#![allow(clippy::disallowed_methods)]

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value as Any, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

mod common;

/// An OTLP/HTTP receiver on a free port: every span of every request, with the
/// service name of its resource.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Collector {
    fn start() -> Collector {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let got = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body)
                    .expect("the body is an ExportTraceServiceRequest");
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .as_ref()
                        .and_then(|r| value(&r.attributes, "service.name"))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        got.lock()
                            .unwrap()
                            .extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }),
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Collector {
            url,
            spans,
            _runtime: runtime,
        }
    }
}

/// An attribute's value as text.
fn value(attributes: &[KeyValue], key: &str) -> Option<String> {
    let v = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match v.value.as_ref()? {
        Any::StringValue(s) => s.clone(),
        Any::IntValue(i) => i.to_string(),
        Any::BoolValue(b) => b.to_string(),
        Any::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

const RECORDS: usize = 40;

/// Runs `flumen run` over RECORDS records through the simulator, with `flags`
/// before `run`; returns its stdout lines. Every record must have its outcome.
fn run(dir: &std::path::Path, flags: &[&str]) -> Vec<serde_json::Value> {
    let input = dir.join("in.jsonl");
    let lines: String = (0..RECORDS)
        .map(|i| format!("{{\"id\": {i}, \"text\": \"payload-secret-{i}\"}}\n"))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(flags)
        .args([
            "run",
            "--backend",
            "sim",
            "--sim-a-ms",
            "2",
            "--sim-b-ms",
            "0.1",
        ])
        .args(["--field", "text", "--quiet", input.to_str().unwrap()])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_TRACES_SAMPLER_ARG")
        .output()
        .expect("flumen runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), RECORDS, "{stderr}");
    assert!(records.iter().all(|r| r.get("prediction").is_some()));
    records
}

#[test]
fn every_record_is_one_exported_trace_linked_to_its_calls_and_holds_no_payload() {
    let dir = std::env::temp_dir().join(format!("flumen-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let collector = Collector::start();
    run(
        &dir,
        &[
            "--otlp-endpoint",
            &collector.url,
            "--trace-sample-ratio",
            "1",
        ],
    );
    // The process exported everything before it exited.
    let spans = collector.spans.lock().unwrap().clone();
    assert!(spans.iter().all(|(service, _)| service == "flumen"));
    let named = |n: &str| -> Vec<&Span> {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == n)
            .collect()
    };
    let (records, attempts, calls) = (named("record"), named("attempt"), named("call"));
    assert_eq!(records.len(), RECORDS, "{spans:#?}");
    let traces: HashSet<&[u8]> = records.iter().map(|r| r.trace_id.as_slice()).collect();
    assert_eq!(traces.len(), RECORDS, "one trace per record");
    assert!(records
        .iter()
        .all(|r| value(&r.attributes, "outcome").as_deref() == Some("ok")));
    let by_id: HashMap<&[u8], &Span> = records.iter().map(|r| (r.span_id.as_slice(), *r)).collect();
    let call_ids: HashSet<&[u8]> = calls.iter().map(|c| c.span_id.as_slice()).collect();
    assert!(!calls.is_empty());
    // Each attempt is under its record, in its trace, and linked to a call.
    assert!(attempts.len() >= RECORDS);
    for a in &attempts {
        let record = by_id
            .get(a.parent_span_id.as_slice())
            .unwrap_or_else(|| panic!("an attempt under no record: {a:#?}"));
        assert_eq!(a.trace_id, record.trace_id);
        assert!(
            a.links
                .iter()
                .any(|l| call_ids.contains(l.span_id.as_slice())),
            "an attempt linked to no call: {a:#?}"
        );
    }
    // Every record is carried by a call that links to it.
    let carried: HashSet<&[u8]> = calls
        .iter()
        .flat_map(|c| c.links.iter().map(|l| l.span_id.as_slice()))
        .collect();
    assert!(by_id.keys().all(|id| carried.contains(id)));
    // Nothing of the records' content is in any attribute, event or link.
    let wire = format!("{spans:?}");
    assert!(!wire.contains("payload-secret"), "{wire}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_zero_ratio_exports_no_trace_and_a_dead_collector_fails_no_record() {
    let dir = std::env::temp_dir().join(format!("flumen-otlp-0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let collector = Collector::start();
    run(
        &dir,
        &[
            "--otlp-endpoint",
            &collector.url,
            "--trace-sample-ratio",
            "0",
        ],
    );
    let exported = collector.spans.lock().unwrap().len();
    assert_eq!(exported, 0, "ratio 0 exports nothing");
    // A collector that is not there costs the run nothing but its traces.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    run(
        &dir,
        &["--otlp-endpoint", &dead, "--trace-sample-ratio", "1"],
    );
    // A bad endpoint or ratio is refused before anything runs, naming the flag.
    for (flag, value) in [
        ("--otlp-endpoint", "collector:4318"),
        ("--trace-sample-ratio", "2"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["--otlp-endpoint", "http://127.0.0.1:1", flag, value])
            .args(["run", "--backend", "sim", "/nonexistent"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
