//! Fallback chains by error class on a paused clock with the seeded simulator: a
//! primary that goes down hands its records on at once (`EngineConfig::hand_off`)
//! instead of holding them for its outage, overload moves a record on after its
//! attempts, and a bad record or a bad answer is not tried again elsewhere.

use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{assert_exactly_once, ms};
use flumen_core::{Backend, BackendError, BatchResult, Capabilities, ErrorKind};
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
        // The outage (1 s to 11 s) covers the arrivals of every record from the
        // 100th on (one each 10 ms, 300 in all): every one of them moved.
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

/// Answers each record with itself, but judges some bad: those ≡ 3 (mod 10) get
/// an invalid answer, those ≡ 7 are refused as invalid input (a content refusal).
struct Picky;

impl Backend for Picky {
    type Input = u64;
    type Output = u64;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: 16,
            ..Capabilities::default()
        }
    }

    async fn call(&self, batch: &[u64]) -> BatchResult<u64> {
        sleep(ms(5)).await;
        Ok(batch
            .iter()
            .map(|&i| match i % 10 {
                3 => Err(BackendError::invalid_output(format!("{i}: not the schema"))),
                7 => Err(BackendError::invalid_input(format!("{i}: refused"))),
                _ => Ok(i),
            })
            .collect())
    }
}

#[tokio::test(start_paused = true)]
async fn a_bad_record_or_a_bad_answer_stays_where_it_failed() {
    // At the primary: the bad ones fail there, and the fallback never sees them.
    let primary = Engine::new(
        Picky,
        EngineConfig {
            hand_off: true,
            ..EngineConfig::default()
        },
    );
    let spare = Arc::new(Sim::new(SimConfig::default()));
    let fallback = Engine::from_arc(Arc::clone(&spare), EngineConfig::default());
    let outcomes: Vec<_> = stream::iter(0..50u64)
        .infer(&primary, OperatorConfig::default(), |&i| Ok(i))
        .with_fallback(Fallback::engine(&fallback, secs(1)))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 50);
    let kind = |o: &Outcome<u64, u64>| o.result.as_ref().err().map(|f| f.kind);
    for o in &outcomes {
        let expected = match o.record % 10 {
            3 => Some(ErrorKind::InvalidOutput),
            7 => Some(ErrorKind::InvalidInput),
            _ => None,
        };
        assert_eq!(
            (kind(o), o.served),
            (expected, Served::Primary),
            "{}",
            o.record
        );
    }
    assert!(spare.calls().is_empty(), "nothing reached the fallback");

    // At a fallback stage: a primary that is down moves every record on; the
    // stage's bad ones end the chain there with their own kind, and the stage
    // after it never sees them.
    let down = Arc::new(Sim::new(SimConfig {
        faults: Faults {
            outages: vec![Outage {
                from: Duration::ZERO,
                until: secs(3_600),
                kind: ErrorKind::Transient,
            }],
            ..Faults::default()
        },
        ..SimConfig::default()
    }));
    let primary = Engine::from_arc(
        down,
        EngineConfig {
            hand_off: true,
            ..EngineConfig::default()
        },
    );
    let picky = Engine::new(
        Picky,
        EngineConfig {
            hand_off: true,
            ..EngineConfig::default()
        },
    );
    let last = Arc::new(Sim::new(SimConfig::default()));
    let last_engine = Engine::from_arc(Arc::clone(&last), EngineConfig::default());
    let outcomes: Vec<_> = stream::iter(0..50u64)
        .infer(&primary, OperatorConfig::default(), |&i| Ok(i))
        .with_fallback(Fallback::engine(&picky, secs(1)))
        .with_fallback(Fallback::engine(&last_engine, secs(1)))
        .collect()
        .await;
    assert_exactly_once(&outcomes, 50);
    for o in &outcomes {
        match o.record % 10 {
            3 | 7 => {
                let f = o.result.as_ref().unwrap_err();
                let expected = if o.record % 10 == 3 {
                    ErrorKind::InvalidOutput
                } else {
                    ErrorKind::InvalidInput
                };
                assert_eq!(f.kind, expected, "{}: {}", o.record, f.message);
                assert!(f.message.contains("fallback"), "{}", f.message);
            }
            _ => assert_eq!((&o.result, o.served), (&Ok(o.record), Served::Fallback(0))),
        }
    }
    assert!(
        last.calls().is_empty(),
        "the chain ended at the stage that judged"
    );
}
