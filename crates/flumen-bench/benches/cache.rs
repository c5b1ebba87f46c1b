//! `cargo bench --bench cache`: what the result cache saves on a stream that repeats
//! itself — 100,000 records drawn from 10,000 distinct inputs by a Zipf law
//! (s = 1.1, seeded: a few inputs very often, most rarely) — through two models:
//!
//! - the embedded all-MiniLM-L6-v2 (in process; the inputs are product-title-like
//!   texts of 3–12 words);
//! - the Triton cost model (a = 20 ms, b = 0.5 ms a row, 2 instances, max batch 64;
//!   a real Triton started here, its rows counted by Triton's own statistics).
//!
//! Each model runs with the cache off, in memory (moka) and in Redis (a real
//! redis-server started here), each cache arm starting empty. Every arm goes through
//! the same path as `flumen run`: the configured backend (`AnyBackend`, JSON in and
//! out) in an engine with adaptive batching and concurrency, through the operator.
//! The embedded model without the cache runs only the first 10,000 records of the
//! stream (about a minute on 2 cores; its rate does not depend on the stream's
//! length), the others the whole stream.
//!
//! "backend rows per record" counts what reached the model: the engine's sends for
//! the embedded model, Triton's executed rows for the cost model.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use flumen_bench::load::{drive, Run, Scheduled};
use flumen_bench::report::{ms, result_line, Table};
use flumen_cache::server::RedisServer;
use flumen_cache::{MemoryStore, RedisStore};
use flumen_config::{AnyBackend, FileConfig};
use flumen_core::Store;
use flumen_engine::{CacheConfig, Engine, EngineConfig, InferExt, OperatorConfig};
use flumen_kserve::server::{cost_model, TritonServer};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Zipf};
use serde_json::Value;
use tokio::time::Instant;

const RECORDS: usize = 100_000;
const DISTINCT: usize = 10_000;
const EMBEDDED_OFF: usize = 10_000;

const WORDS: &[&str] = &[
    "wireless",
    "headphones",
    "noise",
    "cancelling",
    "black",
    "stainless",
    "steel",
    "water",
    "bottle",
    "insulated",
    "1l",
    "kids",
    "running",
    "shoes",
    "size",
    "blue",
    "red",
    "green",
    "organic",
    "coffee",
    "beans",
    "dark",
    "roast",
    "ceramic",
    "mug",
    "set",
    "of",
    "four",
    "usb-c",
    "charger",
    "fast",
    "65w",
    "laptop",
    "stand",
    "aluminium",
    "adjustable",
    "desk",
    "lamp",
    "led",
    "dimmable",
    "yoga",
    "mat",
    "non-slip",
    "cotton",
    "t-shirt",
    "men's",
    "women's",
    "leather",
    "wallet",
    "slim",
    "backpack",
    "travel",
    "waterproof",
    "hiking",
    "boots",
    "winter",
    "jacket",
    "down",
    "kitchen",
    "knife",
    "chef's",
    "8-inch",
    "cutting",
    "board",
    "bamboo",
    "phone",
    "case",
    "clear",
    "screen",
    "protector",
    "glass",
    "smart",
    "watch",
    "fitness",
    "tracker",
    "bluetooth",
    "speaker",
    "portable",
    "gaming",
    "mouse",
    "keyboard",
    "mechanical",
    "monitor",
    "27-inch",
    "4k",
    "office",
    "chair",
    "ergonomic",
];

/// `n` distinct product-title-like texts of 3–12 words.
fn titles(n: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let words = rng.random_range(3..=12);
        let t: Vec<&str> = (0..words)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect();
        let t = t.join(" ");
        if seen.insert(t.clone()) {
            out.push(t);
        }
    }
    out
}

/// The stream: `RECORDS` indices into the distinct inputs, Zipf(s = 1.1).
fn stream(seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let zipf = Zipf::new(DISTINCT as f64, 1.1).expect("a Zipf law");
    (0..RECORDS)
        .map(|_| zipf.sample(&mut rng) as usize - 1)
        .collect()
}

struct Arm {
    records: usize,
    run: Run,
    elapsed: Duration,
    backend_rows: u64,
}

impl Arm {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
    fn rows_per_record(&self) -> f64 {
        self.backend_rows as f64 / self.records as f64
    }
}

/// The first `n` records of the stream through `backend`, with `cache`.
async fn arm(
    backend: &Arc<AnyBackend>,
    cache: Option<CacheConfig>,
    inputs: &[Value],
    stream: &[usize],
    n: usize,
    capacity: usize,
) -> (Arm, Engine<AnyBackend>) {
    let engine = Engine::from_arc(
        Arc::clone(backend),
        EngineConfig {
            name: "cache-bench".into(),
            cache,
            ..EngineConfig::default()
        },
    );
    let config = OperatorConfig {
        capacity,
        timeout: None,
        ..OperatorConfig::default()
    };
    let at = Instant::now();
    let records = futures::stream::iter(stream[..n].iter().enumerate().map(move |(id, &i)| {
        (
            Scheduled {
                id: id as u64,
                at,
                emitted: Instant::now(),
            },
            i,
        )
    }));
    let start = Instant::now();
    let outcomes = records
        .infer(&engine, config, move |(_, i)| Ok(inputs[*i].clone()))
        .map(|o| (o.record.0, o.result));
    let run = drive(outcomes, Duration::from_secs(3_600)).await;
    let elapsed = start.elapsed();
    assert_eq!(run.failed, 0, "every record is answered");
    assert_eq!(run.latencies.len(), n);
    let backend_rows = engine.stats().records_sent;
    (
        Arm {
            records: n,
            run,
            elapsed,
            backend_rows,
        },
        engine,
    )
}

fn memory() -> Option<CacheConfig> {
    Some(CacheConfig {
        store: Arc::new(MemoryStore::new(256 << 20, None)) as Arc<dyn Store>,
        namespace: "bench".into(),
        timeout: Duration::from_millis(100),
    })
}

fn redis(server: &mut RedisServer) -> Option<CacheConfig> {
    server.restart().expect("redis-server restarts, empty");
    Some(CacheConfig {
        store: Arc::new(
            RedisStore::new(&server.url(), None, Duration::from_millis(100))
                .expect("a Redis store"),
        ) as Arc<dyn Store>,
        namespace: "bench".into(),
        timeout: Duration::from_millis(100),
    })
}

async fn backend(toml: &str) -> Arc<AnyBackend> {
    let config = FileConfig::parse("bench", toml).expect("a backend section");
    Arc::new(
        AnyBackend::build(&config.backend)
            .await
            .expect("the backend starts"),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let stream = stream(11);
    let distinct_drawn = stream.iter().collect::<HashSet<_>>().len();
    let mut redis_server = RedisServer::start(flumen_kserve::server::free_port().expect("a port"))
        .expect("redis-server starts: run `bash scripts/system.sh` first");
    println!(
        "cache benchmark: {RECORDS} records over {DISTINCT} distinct inputs, Zipf s = 1.1 ({distinct_drawn} distinct drawn); cache off, in memory (moka), in Redis\n"
    );
    let mut table = Table::new(&[
        "model",
        "cache",
        "records",
        "backend rows per record",
        "throughput",
        "p50",
        "p99",
        "× cache off",
    ]);
    let mut row = |model: &str, cache: &str, a: &Arm, off: f64| {
        let s = a.run.emission_summary();
        table.row(vec![
            model.into(),
            cache.into(),
            a.records.to_string(),
            format!("{:.4}", a.rows_per_record()),
            format!("{:.0}/s", a.rate()),
            ms(s.p50),
            ms(s.p99),
            format!("{:.2}", a.rate() / off),
        ]);
    };

    // The embedded model.
    let texts: Vec<Value> = titles(DISTINCT, 7).into_iter().map(Value::from).collect();
    let embedded = backend("[backend]\nkind = \"embedded\"\n").await;
    let (e_off, _) = arm(&embedded, None, &texts, &stream, EMBEDDED_OFF, 256).await;
    let (e_mem, _) = arm(&embedded, memory(), &texts, &stream, RECORDS, 256).await;
    let (e_redis, _) = arm(
        &embedded,
        redis(&mut redis_server),
        &texts,
        &stream,
        RECORDS,
        256,
    )
    .await;
    let off = e_off.rate();
    row("embedded MiniLM", "off (first 10,000)", &e_off, off);
    row("embedded MiniLM", "memory", &e_mem, off);
    row("embedded MiniLM", "redis", &e_redis, off);

    // The Triton cost model.
    let triton = TritonServer::start(&[cost_model("cost", 20.0, 0.5, 2, 64, false)])
        .expect("tritonserver starts: run `bash scripts/triton.sh` first");
    let cost = backend(&format!(
        "[backend]\nkind = \"kserve\"\nurl = \"{}\"\nmodel = \"cost\"\ndeterministic = true\n",
        triton.http_url()
    ))
    .await;
    let numbers: Vec<Value> = (0..DISTINCT).map(|i| Value::from(i as f64)).collect();
    let mut t_arms = Vec::new();
    for cache in [None, memory(), redis(&mut redis_server)] {
        let before = triton.counts("cost").await.expect("Triton's statistics");
        let (mut a, _) = arm(&cost, cache, &numbers, &stream, RECORDS, 512).await;
        let after = triton.counts("cost").await.expect("Triton's statistics");
        a.backend_rows = after.rows - before.rows;
        t_arms.push(a);
    }
    let t_off = t_arms[0].rate();
    for (name, a) in ["off", "memory", "redis"].iter().zip(&t_arms) {
        row("Triton cost model", name, a, t_off);
    }
    print!("{}", table.render());
    println!(
        "\nLatency is from the moment the operator took each record. Goals: backend rows per record ≤ 0.11 with the cache (10,000 distinct in 100,000, plus what expires), in-memory cache ≥ 5× the embedded model's throughput without it."
    );
    let worst = e_mem
        .rows_per_record()
        .max(e_redis.rows_per_record())
        .max(t_arms[1].rows_per_record())
        .max(t_arms[2].rows_per_record());
    println!(
        "{}",
        result_line(&[
            ("backend_records_per_record", format!("{worst:.4}")),
            (
                "cache_speedup_embedded",
                format!("{:.2}", e_mem.rate() / off)
            ),
            (
                "redis_speedup_embedded",
                format!("{:.2}", e_redis.rate() / off)
            ),
            (
                "cache_speedup_triton",
                format!("{:.2}", t_arms[1].rate() / t_off)
            ),
            (
                "redis_speedup_triton",
                format!("{:.2}", t_arms[2].rate() / t_off)
            ),
        ])
    );
}
