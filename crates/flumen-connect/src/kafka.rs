//! Kafka through librdkafka: a consumer group whose offsets Flumen commits by hand,
//! contiguously per partition, only for records whose outcomes are written; and a
//! producer that waits for every delivery (acks = all).

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
use crate::{AckToken, Committer, CommitterKind, ConnectError, Message, SinkRecord, Source};

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
    topic: String,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            // Everything committable now, revoked partitions or not: `to_commit` marks
            // every point it returns as handed out, so none may be dropped here.
            let mut tracker = self.tracker.lock().expect("tracker lock");
            let commit = offsets(&self.topic, tracker.to_commit());
            for p in &revoked {
                tracker.forget(*p);
            }
            drop(tracker);
            if commit.count() > 0 {
                if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                    eprintln!(
                        "flumen: kafka {}: commit before revocation failed: {e}",
                        self.topic
                    );
                }
            }
            eprintln!(
                "flumen: kafka {}: revoked partitions {revoked:?}",
                self.topic
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut parts: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                parts.sort_unstable();
                eprintln!(
                    "flumen: kafka {}: assigned partitions {parts:?}",
                    self.topic
                );
            }
            Rebalance::Error(e) => eprintln!("flumen: kafka {}: rebalance failed: {e}", self.topic),
            Rebalance::Revoke(_) => {}
        }
    }
}

pub(crate) fn source(config: &SourceConfig) -> Result<Source, ConnectError> {
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
    let context = Rebalancing {
        tracker: Arc::clone(&tracker),
        topic: config.topic.clone(),
    };
    let consumer: StreamConsumer<Rebalancing> = client
        .create_with_context(context)
        .map_err(|e| ConnectError::Source(format!("kafka consumer: {e}")))?;
    consumer
        .subscribe(&[&config.topic])
        .map_err(|e| ConnectError::Source(format!("subscribing to {}: {e}", config.topic)))?;
    let consumer = Arc::new(consumer);
    let topic = config.topic.clone();
    let messages = futures::stream::unfold(
        (Arc::clone(&consumer), Arc::clone(&tracker), topic.clone()),
        |(consumer, tracker, topic)| async move {
            let item = match consumer.recv().await {
                Ok(m) => {
                    let (partition, offset) = (m.partition(), m.offset());
                    tracker
                        .lock()
                        .expect("tracker lock")
                        .delivered(partition, offset);
                    Ok(Message {
                        payload: m.payload().unwrap_or_default().to_vec(),
                        position: format!("{}/{partition}@{offset}", m.topic()),
                        partition,
                        key: m.key().map(<[u8]>::to_vec),
                        token: AckToken::Kafka { partition, offset },
                    })
                }
                Err(e) => Err(ConnectError::Source(format!("kafka {topic}: {e}"))),
            };
            Some((item, (consumer, tracker, topic)))
        },
    );
    Ok(Source {
        messages: messages.boxed(),
        committer: Committer {
            inner: CommitterKind::Kafka(KafkaCommitter {
                consumer,
                tracker,
                topic,
                interval: Duration::from_millis(config.commit_interval_ms.unwrap_or(500)),
                last: None,
            }),
        },
        size: None,
    })
}

pub(crate) struct KafkaCommitter {
    consumer: Arc<StreamConsumer<Rebalancing>>,
    tracker: Arc<Mutex<crate::OffsetTracker>>,
    topic: String,
    interval: Duration,
    last: Option<Instant>,
}

impl KafkaCommitter {
    pub fn done(&mut self, tokens: Vec<AckToken>) -> Result<(), ConnectError> {
        {
            let mut t = self.tracker.lock().expect("tracker lock");
            for token in tokens {
                if let AckToken::Kafka { partition, offset } = token {
                    t.done(partition, offset);
                }
            }
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.interval)
        {
            return Ok(());
        }
        self.last = Some(now);
        self.commit(CommitMode::Async)
    }

    pub fn in_flight(&self) -> usize {
        self.tracker.lock().expect("tracker lock").in_flight()
    }

    fn commit(&self, mode: CommitMode) -> Result<(), ConnectError> {
        let list = offsets(
            &self.topic,
            self.tracker.lock().expect("tracker lock").to_commit(),
        );
        if list.count() == 0 {
            return Ok(());
        }
        // A partition revoked in a rebalance fails to commit; its new owner resumes
        // from the last commit that succeeded (duplicates, never a loss).
        self.consumer
            .commit(&list, mode)
            .map_err(|e| ConnectError::Commit(format!("kafka {}: {e}", self.topic)))
    }

    pub fn close(self) -> Result<(), ConnectError> {
        self.commit(CommitMode::Sync)
    }
}

pub(crate) struct KafkaSink {
    producer: FutureProducer,
    topic: String,
}

impl KafkaSink {
    pub fn new(config: &SinkConfig) -> Result<KafkaSink, ConnectError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        Ok(KafkaSink {
            producer: client
                .create()
                .map_err(|e| ConnectError::Sink(format!("kafka producer: {e}")))?,
            topic: config.topic.clone(),
        })
    }

    pub async fn write(&mut self, records: Vec<SinkRecord>) -> Result<(), ConnectError> {
        let sends = records.iter().map(|r| {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).payload(&r.payload);
            if let Some(k) = &r.key {
                record = record.key(k);
            }
            self.producer
                .send(record, Timeout::After(Duration::from_secs(30)))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| ConnectError::Sink(format!("kafka {}: {e}", self.topic)))?;
        }
        Ok(())
    }
}
