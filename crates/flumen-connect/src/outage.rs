//! Waiting out a broker that cannot be reached: with backoff, saying so on stderr
//! (the broker's address and how long so far) and in the metrics
//! (`flumen_connector_outage{connector}`: 1 while it lasts;
//! `flumen_connector_outage_seconds{connector}`: its length at the last attempt), up
//! to [`Patience::max_outage`]
//! (default: indefinitely, as Kafka Connect and Flink do).
// Only the broker connectors (features `kafka`, `nats`) ride out outages.
#![cfg_attr(not(any(feature = "kafka", feature = "nats")), allow(dead_code))]

use std::time::Duration;

use tokio::time::Instant;

use crate::Refused;

/// How long a source or sink waits for a broker that cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Patience {
    /// Give up (and end the run with an error naming the broker) after an outage of
    /// this long; `None`: wait indefinitely.
    pub max_outage: Option<Duration>,
}

/// The metrics gauge: seconds the current outage had lasted at its last attempt, 0
/// when connected.
pub const OUTAGE_GAUGE: &str = "flumen_connector_outage_seconds";

/// The metrics gauge: 1 while an outage lasts, 0 when connected.
pub const OUTAGE_STATE: &str = "flumen_connector_outage";

/// One outage of one connector, from its first failure to [`Outage::end`].
pub(crate) struct Outage {
    what: String,
    role: &'static str,
    since: Instant,
    last_log: Instant,
    attempt: u32,
    limit: Option<Duration>,
}

/// The two gauges of `role`: an outage of `length` seconds so far, or none.
fn gauges(role: &'static str, length: Option<f64>) {
    metrics::gauge!(OUTAGE_STATE, "connector" => role).set(if length.is_some() {
        1.0
    } else {
        0.0
    });
    metrics::gauge!(OUTAGE_GAUGE, "connector" => role).set(length.unwrap_or(0.0));
}

/// Between two attempts: 100 ms, doubling, at most 5 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}

/// How often a continuing outage is reported.
const REPORT_EVERY: Duration = Duration::from_secs(5);

impl Outage {
    /// The first failure: reports it. `what` names the broker (`kafka 127.0.0.1:9092`).
    pub(crate) fn begin(
        what: String,
        role: &'static str,
        patience: Patience,
        error: &str,
    ) -> Outage {
        let limit = patience
            .max_outage
            .map(|l| format!("at most {} s", l.as_secs_f64()))
            .unwrap_or_else(|| "until it is back".into());
        tracing::warn!("{what} ({role}): cannot reach the broker ({error}); waiting, {limit}");
        let now = Instant::now();
        gauges(role, Some(0.0));
        Outage {
            what,
            role,
            since: now,
            last_log: now,
            attempt: 0,
            limit: patience.max_outage,
        }
    }

    /// The time since the first failure.
    pub(crate) fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    /// Another failure: waits before the next attempt, or gives up past the limit
    /// with a message naming the broker and the time waited.
    pub(crate) async fn wait(&mut self, error: &str) -> Result<(), String> {
        let waited = self.elapsed();
        gauges(self.role, Some(waited.as_secs_f64()));
        if let Some(limit) = self.limit.filter(|l| waited >= *l) {
            gauges(self.role, None);
            return Err(format!(
                "{} ({}): unreachable for {:.1} s, longer than max_outage_s = {}: {error}",
                self.what,
                self.role,
                waited.as_secs_f64(),
                limit.as_secs_f64()
            ));
        }
        if self.last_log.elapsed() >= REPORT_EVERY {
            self.last_log = Instant::now();
            tracing::warn!(
                "{} ({}): still unreachable after {:.0} s ({error}); waiting",
                self.what,
                self.role,
                waited.as_secs_f64()
            );
        }
        let mut pause = backoff(self.attempt);
        if let Some(limit) = self.limit {
            pause = pause.min(limit.saturating_sub(waited).max(Duration::from_millis(10)));
        }
        self.attempt += 1;
        tokio::time::sleep(pause).await;
        Ok(())
    }

    /// The broker answers again.
    pub(crate) fn end(self) {
        gauges(self.role, None);
        tracing::info!(
            "{} ({}): reachable again after {:.1} s",
            self.what,
            self.role,
            self.elapsed().as_secs_f64()
        );
    }
}

/// What one send of a record to a broker came to.
pub(crate) enum Sent {
    /// The broker has it.
    Taken,
    /// The broker will never take it (too large): the reason.
    Refused(String),
    /// Not taken this time (unreachable, timed out): the error.
    Failed(String),
}

/// Sends records `0..n` until each is taken or refused: `send` tries the indices it is
/// given and answers for each, in order; those that failed are sent again once the
/// outage's backoff has passed (`Err` once `patience` runs out). Returns the refused.
pub(crate) async fn deliver(
    n: usize,
    what: &str,
    role: &'static str,
    patience: Patience,
    mut send: impl AsyncFnMut(&[usize]) -> Vec<Sent>,
) -> Result<Vec<Refused>, String> {
    let mut pending: Vec<usize> = (0..n).collect();
    let mut refused = Vec::new();
    let mut outage: Option<Outage> = None;
    loop {
        let mut again = Vec::new();
        let mut error = None;
        let answers = send(&pending).await;
        assert_eq!(answers.len(), pending.len(), "one answer per record sent");
        for (&index, sent) in pending.iter().zip(answers) {
            match sent {
                Sent::Taken => {}
                Sent::Refused(reason) => refused.push(Refused { index, reason }),
                Sent::Failed(e) => {
                    error = Some(e);
                    again.push(index);
                }
            }
        }
        let Some(error) = error else {
            if let Some(o) = outage {
                o.end();
            }
            refused.sort_by_key(|r| r.index);
            return Ok(refused);
        };
        let o =
            outage.get_or_insert_with(|| Outage::begin(what.to_owned(), role, patience, &error));
        o.wait(&error).await?;
        pending = again;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn records_that_failed_are_sent_again_and_refused_ones_are_not() {
        // Record 1 fails twice, then is taken; record 2 is refused; 0 and 3 go at once.
        let mut tries = [0; 4];
        let mut sends = Vec::new();
        let refused = deliver(
            4,
            "kafka x",
            "sink",
            Patience::default(),
            async |pending: &[usize]| {
                sends.push(pending.to_vec());
                pending
                    .iter()
                    .map(|&i| {
                        tries[i] += 1;
                        match (i, tries[i]) {
                            (1, 1 | 2) => Sent::Failed("down".into()),
                            (2, _) => Sent::Refused("too large".into()),
                            _ => Sent::Taken,
                        }
                    })
                    .collect()
            },
        )
        .await
        .unwrap();
        assert_eq!(sends, vec![vec![0, 1, 2, 3], vec![1], vec![1]]);
        assert_eq!(
            refused,
            vec![Refused {
                index: 2,
                reason: "too large".into()
            }]
        );
        // With a limit, a record that never goes through ends the wait with the error.
        let patience = Patience {
            max_outage: Some(Duration::from_secs(3)),
        };
        let err = deliver(1, "nats y", "sink", patience, async |p: &[usize]| {
            p.iter().map(|_| Sent::Failed("no stream".into())).collect()
        })
        .await
        .unwrap_err();
        assert!(err.contains("nats y") && err.contains("no stream"), "{err}");
    }

    #[test]
    fn an_outage_is_in_the_metrics_while_it_lasts() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let gauges = || -> Vec<(String, String, f64)> {
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter_map(|(key, _, _, value)| match value {
                    DebugValue::Gauge(g) => Some((
                        key.key().name().to_owned(),
                        key.key().labels().map(|l| l.value().to_owned()).collect(),
                        g.into_inner(),
                    )),
                    _ => None,
                })
                .collect()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            // Begun and waited on the runtime's paused clock.
            let o = rt.block_on(async {
                let mut o = Outage::begin("kafka b:1".into(), "sink", Patience::default(), "down");
                assert!(gauges().contains(&(OUTAGE_STATE.into(), "sink".into(), 1.0)));
                for _ in 0..4 {
                    o.wait("down").await.unwrap();
                }
                o
            });
            // 100 + 200 + 400 ms of backoff had passed at the fourth attempt.
            let length = gauges()
                .into_iter()
                .find(|(n, _, _)| n == OUTAGE_GAUGE)
                .map(|(_, _, v)| v);
            assert_eq!(length, Some(0.7));
            o.end();
            assert!(gauges().contains(&(OUTAGE_STATE.into(), "sink".into(), 0.0)));
            assert!(gauges().contains(&(OUTAGE_GAUGE.into(), "sink".into(), 0.0)));
        });
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let got: Vec<u64> = (0..9).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_waited_out_up_to_the_limit_and_named() {
        let patience = Patience {
            max_outage: Some(Duration::from_secs(10)),
        };
        let mut o = Outage::begin("kafka 127.0.0.1:1".into(), "sink", patience, "refused");
        let start = Instant::now();
        let mut waits = 0;
        let err = loop {
            match o.wait("refused").await {
                Ok(()) => waits += 1,
                Err(e) => break e,
            }
        };
        // Gave up at the limit, not before, and not long after (the last pause is cut
        // to what remains).
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_millis(10_100),
            "{took:?}"
        );
        assert!(waits > 3, "{waits}");
        assert!(
            err.contains("kafka 127.0.0.1:1") && err.contains("max_outage_s = 10"),
            "{err}"
        );

        // Without a limit it never gives up.
        let mut o = Outage::begin("nats x".into(), "source", Patience::default(), "e");
        for _ in 0..100 {
            o.wait("e").await.unwrap();
        }
        assert!(o.elapsed() > Duration::from_secs(400));
        o.end();
    }
}
