//! Metric names, defined once, with their units, reported through the `metrics` facade.
//!
//! Every metric carries the label `engine` (the engine's name). Install any
//! `metrics` recorder (Prometheus, statsd, …) to export them; without one they cost
//! next to nothing.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Records queued in the engine, waiting for a batch (gauge).
pub const QUEUE_DEPTH: &str = "flumen_queue_depth";
/// Backend calls in flight (gauge).
pub const BATCHES_IN_FLIGHT: &str = "flumen_batches_in_flight";
/// The concurrency controller's current limit on calls in flight (gauge).
pub const CONCURRENCY_LIMIT: &str = "flumen_concurrency_limit";
/// Records per backend call (histogram).
pub const BATCH_SIZE: &str = "flumen_batch_size";
/// Time a record waited in the engine's queue before its call was sent (histogram, seconds).
pub const QUEUE_TIME: &str = "flumen_queue_time_seconds";
/// Duration of one backend call (histogram, seconds).
pub const BACKEND_LATENCY: &str = "flumen_backend_latency_seconds";
/// From the operator taking a record to its outcome (histogram, seconds).
pub const END_TO_END_LATENCY: &str = "flumen_end_to_end_latency_seconds";
/// Outcomes by kind: `ok` or an error kind (counter, records). Label `outcome`.
pub const OUTCOMES: &str = "flumen_outcomes_total";

/// Registers descriptions and units of every metric with the installed recorder.
pub fn describe() {
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "records queued in the engine");
    describe_gauge!(BATCHES_IN_FLIGHT, Unit::Count, "backend calls in flight");
    describe_gauge!(
        CONCURRENCY_LIMIT,
        Unit::Count,
        "concurrency limit on backend calls"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "records per backend call");
    describe_histogram!(QUEUE_TIME, Unit::Seconds, "time records wait in the queue");
    describe_histogram!(BACKEND_LATENCY, Unit::Seconds, "duration of backend calls");
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "time from input to outcome"
    );
    describe_counter!(OUTCOMES, Unit::Count, "outcomes by kind");
}
