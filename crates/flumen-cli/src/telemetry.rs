//! Logs and traces of the `flumen` binary: logs through `tracing` to stderr (text
//! or JSON, filtered by `RUST_LOG`), and, when an OTLP endpoint is given, the
//! engine's spans exported over OTLP/HTTP (protobuf), sampled by a ratio.
//!
//! What is exported is what the spans carry: engine names, counts, outcomes, attempt
//! numbers — never a record's content, a key or a token (the spans have no such
//! field; the tests look for a record's text in every exported attribute).

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where traces go and how many: `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`)
/// and `--trace-sample-ratio` (or `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g.
    /// `http://127.0.0.1:4318` (`/v1/traces` is added to a URL without a path). Also
    /// read from `OTEL_EXPORTER_OTLP_ENDPOINT`, or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// (taken as the traces URL itself). Without one nothing is exported.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The share of traces exported, 0 to 1 (a record's trace is kept or dropped
    /// whole; a span whose parent was kept is kept). Also read from
    /// `OTEL_TRACES_SAMPLER_ARG`.
    #[arg(long, global = true, value_name = "RATIO", default_value_t = DEFAULT_SAMPLE_RATIO)]
    pub trace_sample_ratio: f64,
}

/// One record in a hundred: a stream of thousands of records a second stays cheap to
/// trace, and a slow or failed one is still likely to be among them when it repeats.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

/// What must be done before the process exits: the traces still buffered are sent.
#[must_use]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Sends what is buffered (bounded by the exporter's timeout) and stops.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("flumen: traces not all exported: {e}");
            }
        }
    }
}

/// The OTLP settings after the environment is read: the endpoint (with its
/// `/v1/traces` path) and the ratio, or why they are wrong.
fn resolve(
    args: &TraceArgs,
    explicit_ratio: bool,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<(String, f64)>> {
    let set = |k: &str| env(k).filter(|e| !e.trim().is_empty());
    let url = match (
        args.otlp_endpoint.clone(),
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    ) {
        (Some(e), _) => traces_url(&e)?,
        // The traces variable is the traces URL itself (the OTLP spec's rule).
        (None, Some(e)) => {
            traces_url(&e)?;
            e
        }
        (None, None) => match set("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(e) => traces_url(&e)?,
            None => return Ok(None),
        },
    };
    let ratio = match (explicit_ratio, env("OTEL_TRACES_SAMPLER_ARG")) {
        (false, Some(arg)) => arg.trim().parse::<f64>().map_err(|_| {
            anyhow::anyhow!("OTEL_TRACES_SAMPLER_ARG = {arg:?} is not a number between 0 and 1")
        })?,
        _ => args.trace_sample_ratio,
    };
    if !(0.0..=1.0).contains(&ratio) {
        anyhow::bail!("--trace-sample-ratio {ratio} is not between 0 and 1");
    }
    Ok(Some((url, ratio)))
}

/// `endpoint` as the URL of the traces: `http(s)://host:port` gets `/v1/traces`; a
/// URL with a path is taken as it is.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| {
            anyhow::anyhow!("--otlp-endpoint {endpoint:?} is not an http:// or https:// URL")
        })?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        anyhow::bail!("--otlp-endpoint {endpoint:?} has no host");
    }
    let path = &rest[authority.len()..];
    Ok(if path.is_empty() || path == "/" {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_owned()
    })
}

/// Installs the subscriber: the log layer (`RUST_LOG`, default `info` with the
/// brokers' clients from `warn`) and, when an endpoint is set, the OTLP layer, which
/// takes Flumen's spans from `debug` (record, attempt, call) whatever `RUST_LOG` says.
pub fn init(
    format: LogFormat,
    traces: &TraceArgs,
    explicit_ratio: bool,
) -> anyhow::Result<Telemetry> {
    // librdkafka's and async-nats's own logs only from warnings up by default: our
    // connectors report outages themselves, once every few seconds.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,async_nats=warn")
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let logs = match format {
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
    };
    let settings = resolve(traces, explicit_ratio, |k| std::env::var(k).ok())?;
    #[cfg(feature = "otlp")]
    {
        let mut layers = vec![logs];
        let provider = match settings {
            Some((url, ratio)) => {
                let (layer, provider) = otlp_layer(&url, ratio)?;
                layers.push(layer);
                Some(provider)
            }
            None => None,
        };
        let _ = tracing_subscriber::registry().with(layers).try_init();
        Ok(Telemetry { provider })
    }
    #[cfg(not(feature = "otlp"))]
    {
        if settings.is_some() {
            anyhow::bail!(
                "this flumen was built without the `otlp` feature: it cannot export traces"
            );
        }
        let _ = tracing_subscriber::registry().with(logs).try_init();
        Ok(Telemetry {})
    }
}

#[cfg(feature = "otlp")]
type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The OTLP layer: a batch exporter over HTTP (its own thread and blocking client, so
/// it works before, during and after the async runtime), parent-based ratio sampling.
#[cfg(feature = "otlp")]
fn otlp_layer(
    url: &str,
    ratio: f64,
) -> anyhow::Result<(Boxed, opentelemetry_sdk::trace::SdkTracerProvider)> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::Sampler;
    use tracing_subscriber::filter::{LevelFilter, Targets};

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| anyhow::anyhow!("--otlp-endpoint {url}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "flumen".into()))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("flumen");
    // Flumen's own spans from debug (the record, attempt and call spans are there);
    // everything else (HTTP clients, brokers) from info.
    let targets = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("flumen", LevelFilter::DEBUG);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(targets)
        .boxed();
    Ok((layer, provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: Option<&str>, ratio: f64) -> TraceArgs {
        TraceArgs {
            otlp_endpoint: endpoint.map(str::to_owned),
            trace_sample_ratio: ratio,
        }
    }

    #[test]
    fn endpoints_get_the_traces_path_unless_they_have_one() {
        let none = |_: &str| None;
        let got = |e| resolve(&args(Some(e), 1.0), true, none).unwrap().unwrap().0;
        assert_eq!(got("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(got("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(got("https://c/otlp/v1/traces"), "https://c/otlp/v1/traces");
        let err = resolve(&args(Some("c:4318"), 1.0), true, none).unwrap_err();
        assert!(err.to_string().contains("--otlp-endpoint"), "{err}");
        assert!(resolve(&args(Some("http:///x"), 1.0), true, none).is_err());
    }

    #[test]
    fn the_environment_is_read_when_no_flag_says_otherwise() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4318".to_owned()),
            "OTEL_TRACES_SAMPLER_ARG" => Some("0.25".to_owned()),
            _ => None,
        };
        let d = DEFAULT_SAMPLE_RATIO;
        assert_eq!(
            resolve(&args(None, d), false, env).unwrap(),
            Some(("http://env:4318/v1/traces".to_owned(), 0.25))
        );
        // The flags win.
        assert_eq!(
            resolve(&args(Some("http://flag:1"), 0.5), true, env).unwrap(),
            Some(("http://flag:1/v1/traces".to_owned(), 0.5))
        );
        assert_eq!(
            resolve(&args(None, d), false, |_: &str| None).unwrap(),
            None
        );
        let traces = |k: &str| {
            (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| "http://t:4318".to_owned())
        };
        assert_eq!(
            resolve(&args(None, d), false, traces).unwrap(),
            Some(("http://t:4318".to_owned(), d))
        );
        let bad = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4318".to_owned()),
            "OTEL_TRACES_SAMPLER_ARG" => Some("lots".to_owned()),
            _ => None,
        };
        let err = resolve(&args(None, d), false, bad).unwrap_err();
        assert!(err.to_string().contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
        let err = resolve(&args(Some("http://c:1"), 1.5), true, |_: &str| None).unwrap_err();
        assert!(err.to_string().contains("--trace-sample-ratio"), "{err}");
    }
}
