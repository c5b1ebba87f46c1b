//! Priority classes and tenants on a paused clock with the seeded simulator (a =
//! 20 ms, b = 0.5 ms, 2 slots, 64 records a call, 5 % noise): interactive records
//! over a saturating bulk backlog, the share a waiting class is owed, and weighted
//! fair queuing between tenants flooding one class.
//!
//! The concurrency limit is fixed at the simulator's two slots: what is tested is
//! the order records are sent in, and a limiter probing above the slots would add
//! the simulator's own queue to every latency.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use flumen_core::ErrorKind;
use flumen_engine::{Class, ConcurrencyConfig, Engine, EngineConfig, Lane, SchedulingConfig};
use flumen_sim::{Sim, SimConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::{sleep_until, Instant};

const NOISE: f64 = 0.05;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn sim() -> SimConfig {
    SimConfig {
        noise: NOISE,
        seed: 9,
        ..SimConfig::default()
    }
}

fn engine(min_share: f64) -> (Engine<Sim<u64>>, SimConfig) {
    let config = sim();
    let engine = Engine::new(
        Sim::new(config.clone()),
        EngineConfig {
            name: "priority".into(),
            concurrency: ConcurrencyConfig::Fixed(config.slots),
            scheduling: SchedulingConfig { min_share },
            ..EngineConfig::default()
        },
    );
    (engine, config)
}

/// The records/s the backend can do: every slot busy with full calls.
fn limit(config: &SimConfig) -> f64 {
    config.slots as f64 * config.max_batch as f64
        / config.service_time(config.max_batch, 0).as_secs_f64()
}

/// `callers` closed loops in `lane`, from now until `end`: each submits, awaits,
/// submits again. Counts the answers that came after `warm`; await the loops
/// ([`Loops::join`]) for their assertions to count.
struct Loops {
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Loops {
    /// Waits for every loop (they end at `end`); a failed assertion fails the test.
    async fn join(self) -> u64 {
        for t in self.tasks {
            t.await.expect("a caller's assertion failed");
        }
        self.done.load(Relaxed)
    }
}

fn closed_loops(
    engine: &Engine<Sim<u64>>,
    lane: &Lane,
    callers: usize,
    warm: Instant,
    end: Instant,
) -> Loops {
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let (engine, lane, done) = (engine.clone(), lane.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let answer = engine.submit_in(1, None, lane.clone()).await;
                assert_eq!(answer, Ok(1), "no record without a deadline fails");
                if Instant::now() >= warm && Instant::now() < end {
                    done.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    Loops { done, tasks }
}

/// Poisson arrivals (seeded) at `rate` per second in `lane`, from now until `end`,
/// each due `timeout` after it arrives; the arrival time and outcome of each.
async fn open_loop(
    engine: &Engine<Sim<u64>>,
    lane: &Lane,
    rate: f64,
    seed: u64,
    timeout: Option<Duration>,
    end: Instant,
) -> Vec<(Instant, Duration, Result<u64, flumen_core::Failure>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut at = Instant::now();
    let mut records = Vec::new();
    loop {
        at += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / rate);
        if at >= end {
            break;
        }
        sleep_until(at).await;
        let (engine, lane) = (engine.clone(), lane.clone());
        records.push(tokio::spawn(async move {
            let result = engine.submit_in(2, timeout.map(|t| at + t), lane).await;
            (at, at.elapsed(), result)
        }));
    }
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        out.push(r.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn interactive_records_ride_the_next_call_over_a_saturating_bulk_backlog() {
    let (engine, config) = engine(0.1);
    let t0 = Instant::now();
    let (warm, end) = (t0 + Duration::from_secs(2), t0 + Duration::from_secs(22));
    // 600 bulk callers keep several full calls queued at every moment.
    let bulk = closed_loops(&engine, &Lane::class(Class::BULK), 600, warm, end);
    // 20 interactive records a second, each due in 2 s.
    let interactive = open_loop(
        &engine,
        &Lane::class(Class::INTERACTIVE),
        20.0,
        3,
        Some(Duration::from_secs(2)),
        end,
    )
    .await;
    tokio::time::sleep_until(end + Duration::from_secs(1)).await;

    // Idle latency: a call of one; a full call at the noise's worst; 1 ms of timer
    // resolution for each of the three waits.
    let idle = config.service_time(1, 0).mul_f64(1.0 + NOISE);
    let full = config
        .service_time(config.max_batch, 0)
        .mul_f64(1.0 + NOISE);
    let bound = idle + full * 2 + ms(3);
    let mut worst = Duration::ZERO;
    for (at, latency, result) in &interactive {
        assert_eq!(*result, Ok(2), "interactive record at {:?}", *at - t0);
        worst = worst.max(*latency);
    }
    assert!(interactive.len() > 300, "{}", interactive.len());
    assert!(
        worst <= bound,
        "worst interactive latency {worst:?} > idle + two full calls = {bound:?}"
    );
    // Bulk keeps at least 90 % of what the interactive records leave.
    let window = (end - warm).as_secs_f64();
    let interactive_rate = interactive.iter().filter(|r| r.0 >= warm).count() as f64 / window;
    let bulk_rate = bulk.join().await as f64 / window;
    let rest = limit(&config) - interactive_rate;
    eprintln!(
        "interactive: {} records, worst {worst:?} (bound {bound:?}); bulk {bulk_rate:.0}/s of {rest:.0}/s left",
        interactive.len()
    );
    assert!(
        bulk_rate >= 0.9 * rest,
        "bulk {bulk_rate:.0}/s < 90 % of the {rest:.0}/s left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_bulk_class_under_saturating_interactive_load_gets_its_share_and_no_more() {
    for share in [0.1, 0.25] {
        let (engine, config) = engine(share);
        let t0 = Instant::now();
        let (warm, end) = (t0 + Duration::from_secs(2), t0 + Duration::from_secs(12));
        // Either class alone could saturate the backend.
        let urgent = closed_loops(&engine, &Lane::class(Class::INTERACTIVE), 400, warm, end);
        let bulk = closed_loops(&engine, &Lane::class(Class::BULK), 400, warm, end);
        tokio::time::sleep_until(end + Duration::from_secs(1)).await;
        let (u, b) = (urgent.join().await as f64, bulk.join().await as f64);
        let got = b / (u + b);
        let rate = (u + b) / (end - warm).as_secs_f64();
        eprintln!("min_share {share}: bulk got {got:.3} of {rate:.0} records/s");
        assert!(
            (share - 0.01..=share + 0.02).contains(&got),
            "min_share {share}: bulk got {got:.3}"
        );
        assert!(rate >= 0.95 * limit(&config), "{rate:.0}/s");
    }
}

/// Two tenants of one class flooding with Poisson arrivals at `rates` × the limit,
/// records due in 1 s: each tenant's share of the answers after warm-up, and its
/// answered records' p99 latency.
async fn two_tenants(rates: [f64; 2]) -> [(f64, Duration); 2] {
    let (engine, config) = engine(0.1);
    let limit = limit(&config);
    let t0 = Instant::now();
    let (warm, end) = (t0 + Duration::from_secs(2), t0 + Duration::from_secs(12));
    let lanes = [
        Lane::tenant(Class::DEFAULT, "a", 1.0),
        Lane::tenant(Class::DEFAULT, "b", 1.0),
    ];
    let (a, b) = tokio::join!(
        open_loop(
            &engine,
            &lanes[0],
            rates[0] * limit,
            21,
            Some(ms(1_000)),
            end
        ),
        open_loop(
            &engine,
            &lanes[1],
            rates[1] * limit,
            22,
            Some(ms(1_000)),
            end
        ),
    );
    let stats = |records: &[(Instant, Duration, Result<u64, flumen_core::Failure>)]| {
        let mut latencies = Vec::new();
        for (at, latency, result) in records {
            match result {
                Ok(_) if *at >= warm => latencies.push(*latency),
                Ok(_) => {}
                Err(f) => assert!(
                    matches!(f.kind, ErrorKind::Overloaded | ErrorKind::Timeout),
                    "{f:?}"
                ),
            }
        }
        latencies.sort();
        let p99 = latencies
            .get((latencies.len().max(1) - 1) * 99 / 100)
            .copied()
            .unwrap_or_default();
        (latencies.len() as f64, p99)
    };
    let ((na, pa), (nb, pb)) = (stats(&a), stats(&b));
    eprintln!(
        "tenants at {rates:?} x the limit: a {na} answers (p99 {pa:?}), b {nb} (p99 {pb:?}); {:.2} of the limit",
        (na + nb) / (end - warm).as_secs_f64() / limit
    );
    [(na / (na + nb), pa), (nb / (na + nb), pb)]
}

#[tokio::test(start_paused = true)]
async fn two_tenants_of_equal_weight_flooding_each_get_half() {
    for rates in [[3.0, 3.0], [3.0, 0.75]] {
        let [(a, _), (b, _)] = two_tenants(rates).await;
        assert!(
            (0.45..=0.55).contains(&a) && (0.45..=0.55).contains(&b),
            "at {rates:?} x the limit: a got {a:.3}, b {b:.3}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_tenant_under_its_share_keeps_its_latency_while_another_floods() {
    let config = sim();
    let [(_, _), (_, quiet_p99)] = two_tenants([3.0, 0.2]).await;
    // The quiet tenant's records wait at most for a slot and ride the next call.
    let bound = config
        .service_time(config.max_batch, 0)
        .mul_f64(1.0 + NOISE)
        * 2
        + ms(3);
    assert!(
        quiet_p99 <= bound,
        "the quiet tenant's p99 {quiet_p99:?} > two full calls {bound:?}"
    );
}
