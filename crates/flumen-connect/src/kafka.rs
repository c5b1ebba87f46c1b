//! Kafka through librdkafka: a consumer group whose offsets Flumen commits by hand,
//! contiguously per partition, only for records whose outcomes are written (in the
//! background, every `commit_interval_ms`, so an idle pipeline's lag reaches 0); and
//! a producer that waits for every delivery (acks = all). A broker that cannot be
//! reached is waited out (see [`crate::Patience`]); a record the broker will never
//! take (too large) is handed back as [`crate::Refused`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::config::{KafkaSink as SinkConfig, KafkaSource as SourceConfig};
use crate::outage::{deliver, Outage, Patience, Sent};
use crate::tracker::Delivered;
use crate::{
    AckToken, Committer, CommitterKind, ConnectError, Message, Refused, SinkRecord, Source,
};

/// The commit points of `topic` as a partition list.
fn offsets(topic: &str, points: Vec<(i32, i64)>) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in points {
        // Only fails for an invalid offset, which the tracker never produces.
        let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    list
}

/// Sees rebalances: before partitions are taken away, commits what is committable (on
/// every partition) and forgets the revoked ones (their new owner resumes from that
/// commit); reports each
/// assignment on stderr, where operators (and the scale-out test) look for it.
struct Rebalancing {
    tracker: Arc<Mutex<crate::OffsetTracker>>,
    /// Held around every commit, so that two (the background task's and this one's)
    /// never race and land out of order.
    commit_lock: Arc<Mutex<()>>,
    topic: String,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            // Everything committable now, revoked partitions or not; marked committed
            // only if the broker takes it (else the background task tries again).
            let serial = self.commit_lock.lock().expect("commit lock");
            let points = self.tracker.lock().expect("tracker lock").moved();
            if !points.is_empty() {
                match consumer.commit(&offsets(&self.topic, points.clone()), CommitMode::Sync) {
                    Ok(()) => self
                        .tracker
                        .lock()
                        .expect("tracker lock")
                        .committed(&points),
                    Err(e) => {
                        tracing::warn!("kafka {}: commit before revocation failed: {e}", self.topic)
                    }
                }
            }
            drop(serial);
            let mut tracker = self.tracker.lock().expect("tracker lock");
            for p in &revoked {
                tracker.forget(*p);
            }
            drop(tracker);
            tracing::info!("kafka {}: revoked partitions {revoked:?}", self.topic);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut parts: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                parts.sort_unstable();
                tracing::info!("kafka {}: assigned partitions {parts:?}", self.topic);
            }
            Rebalance::Error(e) => tracing::warn!("kafka {}: rebalance failed: {e}", self.topic),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// How long the source goes without a partition before it says it is still waiting.
const ASSIGNMENT_REPORT: Duration = Duration::from_secs(5);

struct SourceState {
    consumer: Arc<StreamConsumer<Rebalancing>>,
    tracker: Arc<Mutex<crate::OffsetTracker>>,
    topic: String,
    what: String,
    group: String,
    patience: Patience,
    started: Instant,
    waiting_reported: Option<Instant>,
    /// Errors the broker answered through are reported at most every 10 s.
    quiet_until: Option<Instant>,
}

impl SourceState {
    /// The next record; waits out broker outages (probing with a metadata request)
    /// and says so while no partition is assigned.
    async fn next(&mut self) -> Result<Message, ConnectError> {
        loop {
            let m = match tokio::time::timeout(ASSIGNMENT_REPORT, self.consumer.recv()).await {
                Err(_) => {
                    self.report_waiting();
                    continue;
                }
                Ok(m) => m,
            };
            match m {
                Ok(m) => {
                    let (partition, offset) = (m.partition(), m.offset());
                    let gap = self
                        .tracker
                        .lock()
                        .expect("tracker lock")
                        .delivered(partition, offset);
                    match gap {
                        Delivered::First => tracing::info!(
                            "{}: {}/{partition}: reading from offset {offset}",
                            self.what,
                            self.topic
                        ),
                        Delivered::After(first, last) => tracing::info!(
                            "{}: {}/{partition}: offsets {first}..={last} were not served \
                             (compacted away, or skipped by the broker)",
                            self.what,
                            self.topic
                        ),
                        Delivered::Next => {}
                    }
                    return Ok(Message {
                        payload: m.payload().unwrap_or_default().to_vec(),
                        position: format!("{}/{partition}@{offset}", m.topic()),
                        partition,
                        key: m.key().map(<[u8]>::to_vec),
                        token: AckToken::Kafka { partition, offset },
                    });
                }
                Err(e) => self.wait_for_broker(e.to_string()).await?,
            }
        }
    }

    /// While no partition is assigned, every few seconds: what the worker waits for.
    fn report_waiting(&mut self) {
        let assigned = self
            .consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false);
        if assigned {
            self.waiting_reported = None;
            return;
        }
        let due = self
            .waiting_reported
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.waiting_reported = Some(Instant::now());
            tracing::info!(
                "{}: waiting for a partition assignment of {} in group {} ({:.0} s so far)",
                self.what,
                self.topic,
                self.group,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// A consumer error: if the broker does not answer a metadata request, waits
    /// until it does (or `patience` runs out); otherwise reports the error and goes on.
    async fn wait_for_broker(&mut self, error: String) -> Result<(), ConnectError> {
        let mut outage: Option<Outage> = None;
        loop {
            let consumer = Arc::clone(&self.consumer);
            let topic = self.topic.clone();
            let probe = tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map(|_| ())
            })
            .await
            .unwrap_or_else(|e| panic!("metadata probe panicked: {e}"));
            match (probe, outage.as_mut()) {
                (Ok(()), None) => {
                    let now = Instant::now();
                    if self.quiet_until.is_none_or(|t| now >= t) {
                        self.quiet_until = Some(now + Duration::from_secs(10));
                        tracing::warn!("{}: {error}; the broker answers, going on", self.what);
                    }
                    return Ok(());
                }
                (Ok(()), Some(_)) => {
                    outage.take().expect("outage").end();
                    return Ok(());
                }
                (Err(e), None) => {
                    let e = format!("{error}; {e}");
                    outage = Some(Outage::begin(
                        self.what.clone(),
                        "source",
                        self.patience,
                        &e,
                    ));
                }
                (Err(e), Some(o)) => o.wait(&e.to_string()).await.map_err(ConnectError::Source)?,
            }
        }
    }
}

pub(crate) fn source(config: &SourceConfig, patience: Patience) -> Result<Source, ConnectError> {
    let what = format!("kafka {}", config.brokers);
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            config.start.as_deref().unwrap_or("earliest"),
        );
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    let tracker = Arc::new(Mutex::new(crate::OffsetTracker::default()));
    let commit_lock = Arc::new(Mutex::new(()));
    let context = Rebalancing {
        tracker: Arc::clone(&tracker),
        commit_lock: Arc::clone(&commit_lock),
        topic: config.topic.clone(),
    };
    let consumer: StreamConsumer<Rebalancing> = client
        .create_with_context(context)
        .map_err(|e| ConnectError::Source(format!("{what}: consumer: {e}")))?;
    consumer.subscribe(&[&config.topic]).map_err(|e| {
        ConnectError::Source(format!("{what}: subscribing to {}: {e}", config.topic))
    })?;
    let consumer = Arc::new(consumer);
    let state = SourceState {
        consumer: Arc::clone(&consumer),
        tracker: Arc::clone(&tracker),
        topic: config.topic.clone(),
        what: what.clone(),
        group: config.group.clone(),
        patience,
        started: Instant::now(),
        waiting_reported: None,
        quiet_until: None,
    };
    let messages = futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        match state.next().await {
            Ok(m) => Some((Ok(m), Some(state))),
            Err(e) => Some((Err(e), None)),
        }
    });
    let interval = Duration::from_millis(config.commit_interval_ms.unwrap_or(500));
    let shared = Arc::new(Commits {
        consumer,
        tracker,
        commit_lock,
        topic: config.topic.clone(),
        what,
    });
    let background = tokio::spawn(Arc::clone(&shared).every(interval));
    Ok(Source {
        messages: messages.boxed(),
        committer: Committer {
            inner: CommitterKind::Kafka(KafkaCommitter {
                shared,
                background,
                patience,
            }),
        },
        size: None,
        stopper: Default::default(),
    })
}

/// What the committer and its background task share.
struct Commits {
    consumer: Arc<StreamConsumer<Rebalancing>>,
    tracker: Arc<Mutex<crate::OffsetTracker>>,
    commit_lock: Arc<Mutex<()>>,
    topic: String,
    what: String,
}

/// How long one commit is waited for (librdkafka holds a manual commit back while it
/// has no group coordinator).
const COMMIT_WAIT: Duration = Duration::from_secs(10);

impl Commits {
    /// Commits every partition whose commit point moved, and waits for the broker's
    /// answer; a point is marked committed only once the broker took it, so a commit
    /// that failed (an outage) is tried again at the next tick.
    async fn commit_now(self: &Arc<Self>) -> Result<(), CommitFailed> {
        let points = self.tracker.lock().expect("tracker lock").moved();
        if points.is_empty() {
            return Ok(());
        }
        let this = Arc::clone(self);
        let list = offsets(&self.topic, points.clone());
        let commit = tokio::task::spawn_blocking(move || {
            let _serial = this.commit_lock.lock().expect("commit lock");
            this.consumer.commit(&list, CommitMode::Sync)
        });
        let result = match tokio::time::timeout(COMMIT_WAIT, commit).await {
            Ok(joined) => joined.unwrap_or_else(|e| panic!("commit panicked: {e}")),
            Err(_) => {
                return Err(CommitFailed {
                    not_a_member: false,
                    error: ConnectError::Commit(format!(
                        "{} {}: no answer in {} s",
                        self.what,
                        self.topic,
                        COMMIT_WAIT.as_secs()
                    )),
                })
            }
        };
        match result {
            Ok(()) => {
                self.tracker
                    .lock()
                    .expect("tracker lock")
                    .committed(&points);
                Ok(())
            }
            // A partition revoked in a rebalance fails to commit; its new owner resumes
            // from the last commit that succeeded (duplicates, never a loss).
            Err(e) => Err(CommitFailed {
                not_a_member: not_a_member(&e),
                error: ConnectError::Commit(format!("{} {}: {e}", self.what, self.topic)),
            }),
        }
    }

    /// The background commits: every `interval`, whether or not input arrives.
    async fn every(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.commit_now().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("{}: offset commits go through again", self.what);
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("{}; retrying every {} ms", e.error, interval.as_millis());
                }
                Err(_) => {}
            }
        }
    }
}

pub(crate) struct KafkaCommitter {
    shared: Arc<Commits>,
    background: tokio::task::JoinHandle<()>,
    patience: Patience,
}

impl KafkaCommitter {
    pub fn done(&mut self, tokens: Vec<AckToken>) {
        let mut t = self.shared.tracker.lock().expect("tracker lock");
        for token in tokens {
            if let AckToken::Kafka { partition, offset } = token {
                t.done(partition, offset);
            }
        }
    }

    /// The final commit, retried while the broker is away (within `patience`, and
    /// never longer than 30 s: what is not committed is read again, not lost).
    pub async fn close(self) -> Result<(), ConnectError> {
        self.background.abort();
        let patience = Patience {
            max_outage: Some(
                self.patience
                    .max_outage
                    .unwrap_or(Duration::MAX)
                    .min(Duration::from_secs(30)),
            ),
        };
        let mut outage: Option<Outage> = None;
        loop {
            match self.shared.commit_now().await {
                Ok(()) => {
                    if let Some(o) = outage {
                        o.end();
                    }
                    return Ok(());
                }
                Err(e) if e.not_a_member => {
                    // The group has moved on without this worker (its session ended,
                    // say in an outage): the partitions' new owners resume from the
                    // last commit that went through. Nothing is lost; what this worker
                    // wrote since is seen again.
                    tracing::warn!(
                        "{}; no longer in the group, the final commit is left to the partitions' new owners",
                        e.error
                    );
                    return Ok(());
                }
                Err(e) => {
                    let e = e.error.to_string();
                    let o = outage.get_or_insert_with(|| {
                        Outage::begin(self.shared.what.clone(), "commit", patience, &e)
                    });
                    o.wait(&e).await.map_err(ConnectError::Commit)?;
                }
            }
        }
    }
}

impl Drop for KafkaCommitter {
    fn drop(&mut self) {
        self.background.abort();
    }
}

/// A commit the broker did not take.
struct CommitFailed {
    error: ConnectError,
    /// Refused because this consumer is no longer (or not yet) a member of the group's
    /// current generation: retrying cannot help, a rejoin will.
    not_a_member: bool,
}

fn not_a_member(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::UnknownMemberId
                | C::IllegalGeneration
                | C::RebalanceInProgress
                | C::FencedInstanceId
                | C::State
        )
    )
}

/// Whether the broker will never take this record, however often it is sent: it goes
/// to the dead letter instead of holding up the pipeline.
fn refuses(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidMessage | C::InvalidRecord)
    )
}

pub(crate) struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    what: String,
    role: &'static str,
    patience: Patience,
}

impl KafkaSink {
    pub fn new(
        config: &SinkConfig,
        role: &'static str,
        patience: Patience,
    ) -> Result<KafkaSink, ConnectError> {
        let what = format!("kafka {}", config.brokers);
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            // A delivery not confirmed in 5 s is sent again (and the outage reported):
            // the wait itself is bounded by `patience`, not by librdkafka.
            .set("message.timeout.ms", "5000");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        Ok(KafkaSink {
            producer: client
                .create()
                .map_err(|e| ConnectError::Sink(format!("{what}: producer: {e}")))?,
            topic: config.topic.clone(),
            what,
            role,
            patience,
        })
    }

    pub async fn write(&mut self, records: Vec<SinkRecord>) -> Result<Vec<Refused>, ConnectError> {
        let (producer, topic, what) = (&self.producer, &self.topic, &self.what);
        let send = async |pending: &[usize]| {
            let sends = pending.iter().map(|&i| {
                let r = &records[i];
                let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(&r.payload);
                if let Some(k) = &r.key {
                    record = record.key(k);
                }
                producer.send(record, Timeout::After(Duration::from_secs(30)))
            });
            let results = futures::future::join_all(sends).await;
            results
                .into_iter()
                .map(|result| match result {
                    Ok(_) => Sent::Taken,
                    Err((e, _)) if refuses(&e) => {
                        Sent::Refused(format!("{what} topic {topic}: {e}"))
                    }
                    Err((e, _)) => Sent::Failed(e.to_string()),
                })
                .collect()
        };
        deliver(records.len(), what, self.role, self.patience, send)
            .await
            .map_err(|e| ConnectError::Sink(format!("{e} (topic {topic})")))
    }
}
