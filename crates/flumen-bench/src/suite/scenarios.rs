//! The simulated scenarios: a backlog drain, steady loads at 10, 50 and 90 % of the
//! limit, an overload and a failure mix, every system in each, one table a scenario.

use std::fmt::Write;
use std::time::Duration;

use flumen_sim::{Faults, SimConfig};

use super::measure::{measure, Load};
use super::system::{run_system, sim, System};
use super::Plan;
use crate::load::{backlog, open_loop};
use crate::report::{ms, Table};
use crate::svg::Series;

/// Runs every scenario on every system: the Markdown tables, and each system's
/// throughput against p99 at the steady loads.
pub(super) async fn simulated(plan: &Plan) -> (String, Vec<Series>) {
    let Plan {
        ref base,
        limit,
        warmup,
        window,
        run_for,
        grace,
        max_runs,
        slo,
        seed,
    } = *plan;
    let mut md = String::new();
    let scenarios: Vec<(String, Load, Faults)> = {
        let mut v = vec![(
            "Backlog drain".to_string(),
            Load::Backlog,
            Faults::default(),
        )];
        for pct in [10.0, 50.0, 90.0] {
            v.push((
                format!("Steady {pct:.0} % of the limit"),
                Load::Rate(limit * pct / 100.0),
                Faults::default(),
            ));
        }
        v.push((
            "Overload: 150 % of the limit".into(),
            Load::Rate(limit * 1.5),
            Faults::default(),
        ));
        v.push((
            "Failure mix at 50 %: 5 % calls fail (5xx), 5 % answered 429 (Retry-After 50 ms), 2 % items fail".into(),
            Load::Rate(limit * 0.5),
            Faults {
                call_error_rate: 0.05,
                overload_rate: 0.05,
                retry_after: Some(Duration::from_millis(50)),
                item_error_rate: 0.02,
                ..Faults::default()
            },
        ));
        v
    };

    let mut curves: Vec<Series> = System::ALL
        .iter()
        .map(|s| Series {
            name: s.name().into(),
            points: vec![],
        })
        .collect();
    for (title, load, faults) in &scenarios {
        let _ = writeln!(md, "## {title}\n");
        let mut table = Table::new(&[
            "system",
            "throughput",
            "% of limit",
            "p50",
            "p90",
            "p99",
            "goodput",
            "keeps up",
            "stable",
            "calls/record",
            "batch mean / max",
            "failed",
        ]);
        let mut flumen_rate = 0.0;
        for (i, system) in System::ALL.iter().enumerate() {
            let config = SimConfig {
                faults: faults.clone(),
                ..base.clone()
            };
            // The stability rule: a point whose last three 1 s slices disagree by more
            // than 10 % is run again, up to `max_runs` runs; the last run is reported.
            let mut runs = 0;
            let m = loop {
                runs += 1;
                let backend = sim(&config);
                let run = match load {
                    Load::Backlog => {
                        run_system(*system, Box::pin(backlog(10_000_000)), &backend, run_for).await
                    }
                    Load::Rate(r) => {
                        run_system(
                            *system,
                            Box::pin(open_loop(*r, run_for, Some(seed + runs))),
                            &backend,
                            run_for + grace,
                        )
                        .await
                    }
                };
                let m = measure(&run, &backend, *load, warmup, window, slo);
                if m.stable || runs == max_runs {
                    break m;
                }
            };
            if *system == System::Flumen {
                flumen_rate = m.throughput;
            }
            if title.starts_with("Steady") {
                curves[i]
                    .points
                    .push((m.throughput, m.latency.p99.as_secs_f64() * 1e3));
            }
            // A backlog is all scheduled at the start: latency and goodput say nothing.
            let open = matches!(load, Load::Rate(_));
            let lat = |d: Duration| if open { ms(d) } else { "—".into() };
            table.row(vec![
                system.name().into(),
                format!("{:.0}/s", m.throughput),
                format!("{:.1} %", 100.0 * m.throughput / limit),
                lat(m.latency.p50),
                lat(m.latency.p90),
                lat(m.latency.p99),
                if open {
                    format!("{:.0}/s", m.goodput)
                } else {
                    "—".into()
                },
                m.keeps_up
                    .map_or("—".into(), |k| if k { "yes".into() } else { "no".into() }),
                match (m.stable, runs) {
                    (true, 1) => "yes".into(),
                    (true, n) => format!("yes (run {n})"),
                    (false, n) => format!("no ({n} runs)"),
                },
                format!("{:.3}", m.calls_per_record),
                format!("{:.1} / {}", m.batch_mean, m.batch_max),
                m.failed.to_string(),
            ]);
        }
        md.push_str(&table.render());
        let _ = writeln!(
            md,
            "\nFlumen's throughput here: {flumen_rate:.0} records/s.\n"
        );
    }
    (md, curves)
}
