//! Fallback chains by error class on a paused clock with the seeded simulator: a
//! primary that goes down hands its records on at once (`EngineConfig::hand_off`)
//! instead of holding them for its outage, overload moves a record on after its
//! attempts, and a bad record is not tried again elsewhere.

use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{assert_exactly_once, ms};
use flumen_core::ErrorKind;
use flumen_engine::{Engine, EngineConfig, Fallback, InferExt, OperatorConfig, Outcome, Served};
use flumen_sim::{Faults, Outage, Sim, SimConfig};
use futures::{stream, StreamExt};
use tokio::time::{sleep, Instant};

fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

/// A simulator that is down (`kind`) from 1 s to 11 s.
fn primary(kind: ErrorKind) -> Arc<Sim<u64>> {
    Arc::new(Sim::new(SimConfig {
        seed: 5,
        faults: Faults {
            outages: vec![Outage {
                from: secs(1),
                until: secs(11),
                kind,
            }],
            ..Faults::default()
        },
        ..SimConfig::default()
    }))
}

/// An outcome of a record that knows when it arrived.
type Timed = Outcome<(u64, Instant), u64>;

/// 300 records, one every 10 ms, through `primary` and then a healthy fallback:
/// the outcomes, with each record's latency.
async fn through(kind: ErrorKind, hand_off: bool) -> Vec<(Outcome<u64, u64>, Duration)> {
    let primary = Engine::from_arc(
        primary(kind),
        EngineConfig {
            hand_off,
            ..EngineConfig::default()
        },
    );
    let second = Engine::new(Sim::new(SimConfig::default()), EngineConfig::default());
    let config = OperatorConfig {
        capacity: 1_000,
        timeout: Some(secs(30)),
        ..OperatorConfig::default()
    };
    let records = stream::iter(0..300u64).then(|i| async move {
        sleep(ms(10)).await;
        (i, Instant::now())
    });
    let outcomes: Vec<(Timed, Instant)> = records
        .infer(&primary, config, |&(i, _)| Ok(i))
        .with_fallback(Fallback::engine(&second, secs(30)))
        .map(|o| (o, Instant::now()))
        .collect()
        .await;
    outcomes
        .into_iter()
        .map(|(o, done)| {
            let (record, at) = o.record;
            let latency = done.duration_since(at);
            (
                Outcome {
                    record,
                    result: o.result,
                    served: o.served,
                    receipt: o.receipt,
                },
                latency,
            )
        })
        .collect()
}

fn worst(runs: &[(Outcome<u64, u64>, Duration)]) -> Duration {
    runs.iter().map(|(_, l)| *l).max().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_primary_that_goes_down_hands_its_records_on_at_once() {
    for kind in [ErrorKind::Transient, ErrorKind::Overloaded] {
        let runs = through(kind, true).await;
        let outcomes: Vec<_> = runs.iter().map(|(o, _)| o.clone()).collect();
        assert_exactly_once(&outcomes, 300);
        assert!(outcomes.iter().all(|o| o.result == Ok(o.record)), "{kind}");
        let moved = outcomes
            .iter()
            .filter(|o| o.served == Served::Fallback(0))
            .count();
        // The 10 s outage covers about 1,000 records' arrivals at 10 ms: here, all
        // from the 100th on; every one of them moved.
        assert!(moved >= 190, "{kind}: {moved} moved");
        // No record waited for the outage to end.
        assert!(worst(&runs) < secs(1), "{kind}: {:?}", worst(&runs));

        // Without a hand-off the engine holds records through its pauses: the
        // same records wait far longer for the same answer.
        let held = through(kind, false).await;
        assert!(
            worst(&held) > 2 * worst(&runs),
            "{kind}: {:?}",
            worst(&held)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_bad_record_is_not_tried_again_on_the_fallback() {
    let primary = Engine::new(
        Sim::new(SimConfig::default()),
        EngineConfig {
            hand_off: true,
            ..EngineConfig::default()
        },
    );
    let second = Arc::new(Sim::new(SimConfig::default()));
    let fallback = Engine::from_arc(Arc::clone(&second), EngineConfig::default());
    let outcomes: Vec<_> = stream::iter(0..50u64)
        .infer(&primary, OperatorConfig::default(), |&i| {
            if i % 10 == 3 {
                Err(format!("record {i} has no text"))
            } else {
                Ok(i)
            }
        })
        .with_fallback(Fallback::engine(&fallback, secs(1)))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 50);
    for o in &outcomes {
        match o.record % 10 {
            3 => {
                let f = o.result.as_ref().unwrap_err();
                assert_eq!(
                    (f.kind, o.served),
                    (ErrorKind::InvalidInput, Served::Primary)
                );
            }
            _ => assert_eq!((&o.result, o.served), (&Ok(o.record), Served::Primary)),
        }
    }
    assert!(second.calls().is_empty(), "nothing reached the fallback");
}
