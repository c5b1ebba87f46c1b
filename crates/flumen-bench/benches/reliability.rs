//! `cargo bench --bench reliability`: Flumen under faults, on the simulated backend
//! (a = 20 ms, b = 0.5 ms, k = 2, max batch 64), in real time, with Flink
//! ML_PREDICT's per-record client beside it in the 429 storm. No assertions: it
//! reports what it measured.

use std::sync::Arc;
use std::time::Duration;

use flumen_bench::baselines::{ml_predict, MlPredict};
use flumen_bench::load::{backlog, drive, open_loop, Run, Scheduled};
use flumen_bench::report::{result_line, Table};
use flumen_core::{ErrorKind, Failure};
use flumen_engine::{
    BreakerConfig, Engine, EngineConfig, Fallback, InferExt, OperatorConfig, Served,
};
use flumen_sim::{Faults, Outage, Sim, SimConfig};
use futures::{Stream, StreamExt};

fn sim(faults: Faults, queue_limit: Option<usize>) -> Arc<Sim<u64>> {
    Arc::new(Sim::new(SimConfig {
        faults,
        queue_limit,
        seed: 7,
        ..SimConfig::default()
    }))
}

fn engine(sim: &Arc<Sim<u64>>, breaker: bool) -> Engine<Sim<u64>> {
    Engine::from_arc(
        Arc::clone(sim),
        EngineConfig {
            name: "bench".into(),
            breaker: breaker.then(BreakerConfig::default),
            ..EngineConfig::default()
        },
    )
}

fn flumen<S>(
    input: S,
    engine: &Engine<Sim<u64>>,
    deadline: Duration,
    fallback: Option<u64>,
) -> impl Stream<Item = (Scheduled, Result<(u64, Served), Failure>)>
where
    S: Stream<Item = Scheduled> + Send + 'static,
{
    let config = OperatorConfig {
        capacity: 4_096,
        timeout: Some(deadline),
        ..OperatorConfig::default()
    };
    let mut op = input.infer(engine, config, |s| Ok(s.id));
    if let Some(v) = fallback {
        op = op.with_fallback(Fallback::value(v));
    }
    op.map(|o| {
        let served = o.served;
        (o.record, o.result.map(|v| (v, served)))
    })
}

fn per_record_items(sim: &Sim<u64>, offered: usize) -> f64 {
    sim.stats().items as f64 / offered.max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = SimConfig::default();
    let limit = config.limit_rps();
    println!(
        "reliability benchmark: sim a = 20 ms, b = 0.5 ms, k = 2, max batch 64 (limit {limit:.0} records/s); real time\n"
    );
    let mut table = Table::new(&[
        "scenario",
        "system",
        "records",
        "attempts/record",
        "goodput",
        "outcomes",
    ]);

    // A. 20 % of calls fail with a transient error, at half the limit, 8 s, SLO 2 s.
    let rate = limit / 2.0;
    let dur = Duration::from_secs(8);
    let slo = Duration::from_secs(2);
    let offered = (rate * dur.as_secs_f64()).ceil() as usize;
    let half = || open_loop(rate, dur, None);
    let clean_sim = sim(Faults::default(), None);
    let clean = drive(
        flumen(half(), &engine(&clean_sim, false), slo, None),
        dur + slo,
    )
    .await;
    let faulty_sim = sim(
        Faults {
            call_error_rate: 0.2,
            ..Faults::default()
        },
        None,
    );
    let faulty = drive(
        flumen(half(), &engine(&faulty_sim, false), slo, None),
        dur + slo,
    )
    .await;
    let goodput = |r: &Run| r.goodput(slo, dur);
    let attempts_20 = per_record_items(&faulty_sim, offered);
    let goodput_ratio = goodput(&faulty) / goodput(&clean);
    for (name, r, s) in [
        ("no faults", &clean, &clean_sim),
        ("20 % of calls fail (5xx)", &faulty, &faulty_sim),
    ] {
        table.row(vec![
            format!("half load ({rate:.0}/s, 8 s, SLO 2 s): {name}"),
            "Flumen".into(),
            format!("{}/{offered}", r.completions.len()),
            format!("{:.3}", per_record_items(s, offered)),
            format!("{:.0}/s", goodput(r)),
            format!("{} ok, {} failed", r.succeeded.len(), r.failed),
        ]);
    }

    // B. The backend is dead for the whole run: half load for 5 s, deadline 1 s,
    //    with a static fallback value and the default circuit breaker.
    let dead_sim = sim(
        Faults {
            outages: vec![Outage {
                from: Duration::ZERO,
                until: Duration::from_secs(3_600),
                kind: ErrorKind::Transient,
            }],
            ..Faults::default()
        },
        None,
    );
    let dead_engine = engine(&dead_sim, true);
    let dead_dur = Duration::from_secs(5);
    let dead_offered = (rate * dead_dur.as_secs_f64()).ceil() as usize;
    let dead = drive(
        flumen(
            open_loop(rate, dead_dur, None),
            &dead_engine,
            Duration::from_secs(1),
            Some(u64::MAX),
        ),
        dead_dur + Duration::from_secs(3),
    )
    .await;
    let by_fallback = dead.succeeded.len();
    let dead_attempts = per_record_items(&dead_sim, dead_offered);
    let opened = dead_engine
        .breaker_transitions()
        .iter()
        .filter(|(_, s)| s.as_str() == "open")
        .count();
    table.row(vec![
        "backend dead all run (5 s, deadline 1 s, fallback value)".into(),
        "Flumen (+ default breaker)".into(),
        format!("{}/{dead_offered}", dead.completions.len()),
        format!("{dead_attempts:.3}"),
        "".into(),
        format!(
            "{by_fallback} by fallback, {} failed; {} calls; breaker opened {opened}×",
            dead.failed,
            dead_sim.stats().calls
        ),
    ]);

    // C. A 429 storm: the backend answers 429 (Retry-After 100 ms) to any call
    //    beyond its 2 slots. A backlog for 10 s; Flumen (defaults) against Flink
    //    ML_PREDICT's per-record client (10 concurrent, ordered, 100 retries after
    //    a fixed 100 ms, no budget, Retry-After ignored).
    let storm = || {
        sim(
            Faults {
                retry_after: Some(Duration::from_millis(100)),
                ..Faults::default()
            },
            Some(0),
        )
    };
    let window = Duration::from_secs(10);
    let n = 100_000;
    let f_sim = storm();
    let f_storm = drive(
        flumen(
            backlog(n),
            &engine(&f_sim, false),
            Duration::from_secs(60),
            None,
        ),
        window,
    )
    .await;
    let m_sim = storm();
    let m_storm = drive(
        ml_predict(backlog(n), Arc::clone(&m_sim), MlPredict::default(), |s| {
            s.id
        }),
        window,
    )
    .await;
    let storm_goodput = |r: &Run| r.succeeded.len() as f64 / window.as_secs_f64();
    let storm_ratio = storm_goodput(&f_storm) / storm_goodput(&m_storm);
    for (name, r, s) in [
        ("Flumen (defaults)", &f_storm, &f_sim),
        (
            "Flink ML_PREDICT per-record (10, retry 100 × 100 ms)",
            &m_storm,
            &m_sim,
        ),
    ] {
        let st = s.stats();
        table.row(vec![
            if name.starts_with("Flumen") {
                "429 storm (Retry-After 100 ms beyond k), 10 s backlog".into()
            } else {
                "".into()
            },
            name.into(),
            format!("{} done", r.completions.len()),
            format!(
                "{:.3} calls/record",
                st.calls as f64 / r.succeeded.len().max(1) as f64
            ),
            format!("{:.0}/s", storm_goodput(r)),
            format!("{} 429s of {} calls", st.overloaded, st.calls),
        ]);
    }

    print!("{}", table.render());
    println!(
        "\nGoals: attempts/record ≤ 1.3 and goodput ≥ 0.95 × fault-free at 20 % failures; dead backend ≤ 1 + budget (0.3) attempts/record; storm ≥ 1.5× Flink."
    );
    println!(
        "{}",
        result_line(&[
            ("attempts_per_record_20pct", format!("{attempts_20:.3}")),
            ("goodput_ratio_20pct", format!("{goodput_ratio:.3}")),
            (
                "dead_backend_attempts_per_record",
                format!("{dead_attempts:.3}")
            ),
            ("storm_vs_flink", format!("{storm_ratio:.1}")),
        ])
    );
}
