//! The closed-loop sweep: records outstanding grown from 1 to 1024 over a backlog,
//! Flumen against Flink Async I/O at the same capacity.

use std::sync::Arc;
use std::time::Duration;

use flumen_engine::{Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_sim::SimConfig;
use futures::StreamExt;

use super::measure::{measure, Load};
use super::system::sim;
use crate::baselines::per_record;
use crate::load::{backlog, drive};
use crate::report::{ms, Table};
use crate::svg::{line_chart, Series};

/// Closed loop: the operator's capacity (records outstanding, like perf_analyzer's
/// concurrency) swept over a backlog, Flumen against Flink Async I/O at the same
/// capacity. Latency is from the moment each system took the record.
pub(super) async fn closed_loop_sweep(
    base: &SimConfig,
    run_for: Duration,
    warmup: Duration,
    window: Duration,
) -> (String, (String, String)) {
    let limit = base.limit_rps();
    let mut md = String::from("## Closed loop: records outstanding swept (backlog)\n\n");
    let mut table = Table::new(&[
        "outstanding",
        "Flumen",
        "Flumen p99",
        "Flumen batch mean",
        "Async I/O",
        "Async I/O p99",
        "Flumen ×",
    ]);
    let mut curves = vec![
        Series {
            name: "Flumen (capacity c)".into(),
            points: vec![],
        },
        Series {
            name: "Flink Async I/O (capacity c)".into(),
            points: vec![],
        },
    ];
    for c in [1usize, 4, 16, 64, 256, 1024] {
        let backend = sim(base);
        let engine = Engine::from_arc(Arc::clone(&backend), EngineConfig::default());
        let config = OperatorConfig {
            capacity: c,
            ..OperatorConfig::default()
        };
        let flumen = backlog(10_000_000)
            .infer(&engine, config, |s| Ok(s.id))
            .map(|o| (o.record, o.result));
        let fr = drive(flumen, run_for).await;
        let fm = measure(&fr, &backend, Load::Backlog, warmup, window, Duration::MAX);
        let fp99 = fr.emission_summary().p99;
        let backend = sim(base);
        let ar = drive(
            per_record(backlog(10_000_000), Arc::clone(&backend), c, |s| s.id),
            run_for,
        )
        .await;
        let am = measure(&ar, &backend, Load::Backlog, warmup, window, Duration::MAX);
        let ap99 = ar.emission_summary().p99;
        curves[0]
            .points
            .push((fm.throughput, fp99.as_secs_f64() * 1e3));
        curves[1]
            .points
            .push((am.throughput, ap99.as_secs_f64() * 1e3));
        table.row(vec![
            c.to_string(),
            format!(
                "{:.0}/s ({:.0} %)",
                fm.throughput,
                100.0 * fm.throughput / limit
            ),
            ms(fp99),
            format!("{:.1}", fm.batch_mean),
            format!(
                "{:.0}/s ({:.0} %)",
                am.throughput,
                100.0 * am.throughput / limit
            ),
            ms(ap99),
            format!("{:.1}", fm.throughput / am.throughput.max(1e-9)),
        ]);
    }
    md.push_str(&table.render());
    md.push_str("\nWith c records outstanding Flumen can batch at most c at a time: at c = 1 it is a per-record client too; from c ≈ 2 × 64 it reaches the limit, where Async I/O stays bounded by one record per call.\n\n![closed loop](closed_loop.svg)\n\n");
    let plot = (
        "closed_loop.svg".to_string(),
        line_chart(
            "Closed loop: throughput vs p99 as records outstanding grow (1 … 1024)",
            "records/s",
            "p99 ms",
            &curves,
        ),
    );
    (md, plot)
}
