//! Spending budgets on a paused clock: 64 concurrent callers cannot overshoot a token
//! budget by more than the calls in flight spend beyond their reservations (nothing,
//! when the output estimate holds), every record still has exactly one outcome, and
//! a periodic budget with `wait` holds each period's spending while every record is
//! answered in a later period.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_core::{Backend, BatchResult, Capabilities, ErrorKind, ItemCost};
use flumen_engine::{
    ConcurrencyConfig, Engine, EngineConfig, OnExhausted, SpendBudget, SpendConfig, Unit,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::{sleep, Instant};

const MAX_BATCH: usize = 8;
const CALLS: usize = 4;
/// Output tokens reserved per record.
const OUT_ESTIMATE: u64 = 20;

/// An LLM-like backend: a record's input tokens are its value; its answer costs a
/// seeded number of output tokens up to `max_out` (above the estimate of 20 when
/// `max_out` > 20). Counts what it was really paid, with when.
struct Llm {
    max_out: u64,
    rng: Mutex<ChaCha8Rng>,
    paid: Mutex<Vec<(Instant, u64)>>,
}

impl Llm {
    fn new(max_out: u64) -> Self {
        Llm {
            max_out,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(7)),
            paid: Mutex::new(Vec::new()),
        }
    }

    fn total(&self) -> u64 {
        self.paid.lock().unwrap().iter().map(|(_, c)| c).sum()
    }
}

impl Backend for Llm {
    type Input = u64;
    type Output = u64;

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_items: MAX_BATCH,
            ..Capabilities::default()
        }
    }

    fn cost(&self, input: &u64) -> ItemCost {
        ItemCost {
            bytes: 0,
            tokens: *input,
        }
    }

    fn max_output_tokens(&self, _input: &u64) -> u64 {
        OUT_ESTIMATE
    }

    fn output_tokens(&self, output: &u64) -> u64 {
        *output
    }

    async fn call(&self, batch: &[u64]) -> BatchResult<u64> {
        sleep(Duration::from_millis(50)).await;
        let outs: Vec<u64> = {
            let mut rng = self.rng.lock().unwrap();
            batch
                .iter()
                .map(|_| rng.random_range(0..=self.max_out))
                .collect()
        };
        let cost: u64 = batch.iter().sum::<u64>() + outs.iter().sum::<u64>();
        self.paid.lock().unwrap().push((Instant::now(), cost));
        Ok(outs.into_iter().map(Ok).collect())
    }
}

fn engine(backend: &Arc<Llm>, budget: SpendBudget, on_exhausted: OnExhausted) -> Engine<Llm> {
    Engine::from_arc(
        Arc::clone(backend),
        EngineConfig {
            name: "spend".into(),
            concurrency: ConcurrencyConfig::Fixed(CALLS),
            spend: Some(SpendConfig {
                budget: Arc::new(Mutex::new(budget)),
                on_exhausted,
            }),
            ..EngineConfig::default()
        },
    )
}

/// 64 callers, each submitting records (10–59 input tokens) one after another until
/// the budget refuses one; every outcome, by caller.
async fn sixty_four_callers(engine: &Engine<Llm>) -> Vec<Vec<Result<u64, flumen_core::Failure>>> {
    let callers = (0..64u64).map(|c| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(c);
            let mut outcomes = Vec::new();
            loop {
                let r = engine.submit(rng.random_range(10..60), None).await;
                let spent = matches!(&r, Err(f) if f.kind == ErrorKind::BudgetExhausted);
                outcomes.push(r);
                if spent || outcomes.len() >= 1_000 {
                    return outcomes;
                }
            }
        })
    });
    let mut all = Vec::new();
    for c in callers {
        all.push(c.await.unwrap());
    }
    all
}

#[tokio::test(start_paused = true)]
async fn sixty_four_concurrent_callers_stay_within_the_budget_bound() {
    let limit = 10_000;
    // Output estimate holds (answers of 0–20 tokens): never over the limit. Answers
    // of up to 40 tokens: over by at most what the calls in flight cost beyond their
    // reservations, 4 calls × 8 records × 20 tokens.
    for (max_out, bound) in [
        (OUT_ESTIMATE, 0),
        (40, CALLS as u64 * MAX_BATCH as u64 * 20),
    ] {
        let backend = Arc::new(Llm::new(max_out));
        let budget = SpendBudget::new("test", Unit::Tokens, limit, None, Instant::now());
        let engine = engine(&backend, budget, OnExhausted::Fail);
        let outcomes = sixty_four_callers(&engine).await;
        let paid = backend.total();
        eprintln!("max_out {max_out}: paid {paid} of {limit} (bound +{bound})");
        assert!(
            paid <= limit + bound,
            "paid {paid}, limit {limit} + bound {bound}"
        );
        // It stops only when it must: what is left is less than one record's
        // reservation (59 input + 20 output tokens).
        assert!(paid + 59 + OUT_ESTIMATE >= limit, "stopped early at {paid}");
        for (c, o) in outcomes.iter().enumerate() {
            let (last, before) = o.split_last().unwrap();
            assert!(before.iter().all(Result::is_ok), "caller {c}");
            let f = last.as_ref().unwrap_err();
            assert_eq!(f.kind, ErrorKind::BudgetExhausted, "caller {c}: {f}");
            assert!(f.message.contains("budget `test` is spent"), "{f}");
            assert_eq!(f.attempts, 0, "a refused record was never sent");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_periodic_budget_with_wait_holds_each_period_and_answers_every_record() {
    let backend = Arc::new(Llm::new(OUT_ESTIMATE));
    let t0 = Instant::now();
    let period = Duration::from_secs(60);
    let budget = SpendBudget::new("per-minute", Unit::Tokens, 2_000, Some(period), t0);
    let engine = engine(&backend, budget, OnExhausted::Wait);
    // 300 records of 10–59 tokens, about 15,000 tokens with their answers: several
    // periods' worth, all submitted at once, each with a 20-minute deadline.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let deadline = t0 + Duration::from_secs(1_200);
    let pending: Vec<_> = (0..300)
        .map(|_| engine.submit(rng.random_range(10..60), Some(deadline)))
        .collect();
    let outcomes = futures::future::join_all(pending).await;
    assert!(
        outcomes.iter().all(Result::is_ok),
        "every record waits its turn"
    );
    let paid = backend.paid.lock().unwrap().clone();
    let mut by_period = std::collections::BTreeMap::new();
    for (at, cost) in &paid {
        *by_period.entry((*at - t0).as_secs() / 60).or_insert(0u64) += cost;
    }
    eprintln!("spent by period: {by_period:?}");
    assert!(by_period.len() >= 7, "{by_period:?}");
    // A call is counted in the period it answers in; its reservation, made in the
    // period before, carries over: no period spends more than its limit.
    for (p, spent) in &by_period {
        assert!(*spent <= 2_000, "period {p}: {spent}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_record_larger_than_the_whole_budget_fails_alone_even_when_waiting() {
    let backend = Arc::new(Llm::new(OUT_ESTIMATE));
    let t0 = Instant::now();
    let budget = SpendBudget::new(
        "small",
        Unit::Tokens,
        500,
        Some(Duration::from_secs(60)),
        t0,
    );
    let engine = engine(&backend, budget, OnExhausted::Wait);
    // 1,000 input tokens can never fit 500: it fails at once; the others, queued
    // behind it, are answered.
    let big = engine.submit(1_000, None);
    let small: Vec<_> = (0..5).map(|_| engine.submit(30, None)).collect();
    let f = big.await.unwrap_err();
    assert_eq!(f.kind, ErrorKind::BudgetExhausted);
    assert!(f.message.contains("more than the whole budget"), "{f}");
    for r in futures::future::join_all(small).await {
        assert!(r.is_ok());
    }
    assert!(backend.total() > 0);
}

#[tokio::test(start_paused = true)]
async fn engines_sharing_a_budget_wait_for_each_others_calls_and_never_hang() {
    // Two engines, one budget of 3,000 tokens: each engine's records are blocked at
    // times only by the other's reservations (which settle for less: answers of
    // 0–20 tokens against 20 reserved); none waits forever, even without a deadline.
    let budget = Arc::new(Mutex::new(SpendBudget::new(
        "shared",
        Unit::Tokens,
        3_000,
        None,
        Instant::now(),
    )));
    let backends = [
        Arc::new(Llm::new(OUT_ESTIMATE)),
        Arc::new(Llm::new(OUT_ESTIMATE)),
    ];
    let engines: Vec<Engine<Llm>> = backends
        .iter()
        .map(|b| {
            Engine::from_arc(
                Arc::clone(b),
                EngineConfig {
                    name: "shared".into(),
                    concurrency: ConcurrencyConfig::Fixed(CALLS),
                    spend: Some(SpendConfig {
                        budget: Arc::clone(&budget),
                        on_exhausted: OnExhausted::Fail,
                    }),
                    ..EngineConfig::default()
                },
            )
        })
        .collect();
    let pending: Vec<_> = (0..200)
        .map(|i| engines[i % 2].submit(10 + (i as u64 % 50), None))
        .collect();
    let outcomes = tokio::time::timeout(
        Duration::from_secs(3_600),
        futures::future::join_all(pending),
    )
    .await
    .expect("no record waits forever");
    let ok = outcomes.iter().filter(|r| r.is_ok()).count();
    for r in &outcomes {
        if let Err(f) = r {
            assert_eq!(f.kind, ErrorKind::BudgetExhausted, "{f}");
        }
    }
    let paid = backends[0].total() + backends[1].total();
    assert!(paid <= 3_000, "paid {paid}");
    assert!(ok > 40, "{ok} answered");
}
