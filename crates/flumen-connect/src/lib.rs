//! Flumen's sources and sinks, and the acknowledgement that makes a pipeline
//! at-least-once: a source's message is acknowledged (Kafka offset committed, NATS
//! message acked) only after its outcome — prediction or dead letter — has been
//! durably written by the sink.
//!
//! - [`Source`]: JSONL from a file or stdin; Kafka (feature `kafka`: a consumer group,
//!   offsets committed by hand, contiguously per partition, see [`OffsetTracker`]);
//!   NATS JetStream (feature `nats`: a durable pull consumer, explicit acks, batches
//!   pulled only when the pipeline wants more; unstarted ones nak'ed on a stop).
//! - [`Sink`]: JSONL to a file or stdout (flushed; files synced to disk when the
//!   source acknowledges, see [`Sink::syncing`]); Kafka (acks = all, every delivery
//!   awaited); NATS JetStream (every publish acknowledgement awaited).
//! - [`Committer`]: hand it the tokens of records whose outcomes a sink has written.
//!   Kafka offsets are committed in the background every `commit_interval_ms`, so the
//!   tail of a burst is committed while the input is idle.
//!
//! A broker that cannot be reached is waited out with backoff (see [`Patience`]);
//! a record that a sink refuses for itself (too large) comes back from
//! [`Sink::write`] as [`Refused`], and the pipeline goes on.
//!
//! Several processes sharing a Kafka consumer group or a NATS durable consumer share
//! the work; the brokers coordinate, Flumen does not.

mod config;
mod lines;
mod outage;
mod tracker;

#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "nats")]
mod nats;

use futures::stream::BoxStream;

/// The Kafka client library, for tests and tools that need the same version.
#[cfg(feature = "kafka")]
pub use rdkafka;

/// The NATS client library, for tests and tools that need the same version.
#[cfg(feature = "nats")]
pub use async_nats;

pub use config::{FileMode, SinkConfig, SourceConfig};
pub use outage::{Patience, OUTAGE_GAUGE, OUTAGE_STATE};
pub use tracker::OffsetTracker;

/// Why a source or sink failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Reading from the source failed; the messages before were delivered.
    #[error("source: {0}")]
    Source(String),
    /// Writing to a sink failed; nothing of that write was acknowledged.
    #[error("sink: {0}")]
    Sink(String),
    /// The reader of a stdout sink went away (a closed pipe, as in `| head`).
    #[error("{0}: the reader closed it")]
    Closed(String),
    /// Acknowledging (committing) failed; the records will be seen again.
    #[error("commit: {0}")]
    Commit(String),
    /// The connector was not compiled in.
    #[error("{0}")]
    Unsupported(String),
}

/// One message from a source.
pub struct Message {
    /// The bytes (one JSON record).
    pub payload: Vec<u8>,
    /// Where it came from, for error messages: `line 12`, `topic/3@1200`, `stream seq 77`.
    pub position: String,
    /// The partition (Kafka) or 0: the unit of per-partition order.
    pub partition: i32,
    /// The message key (Kafka), carried to the outcome's output record so that a
    /// keyed stream stays keyed.
    pub key: Option<Vec<u8>>,
    /// What to hand the [`Committer`] once the outcome is written.
    pub token: AckToken,
}

/// Identifies a delivered message to its source's [`Committer`].
pub enum AckToken {
    /// Files and stdin: nothing to acknowledge.
    None,
    /// A Kafka record.
    #[cfg(feature = "kafka")]
    Kafka {
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
    },
    /// A NATS JetStream message, acked through its reply subject.
    #[cfg(feature = "nats")]
    Nats(Box<async_nats::jetstream::Message>),
}

impl std::fmt::Debug for AckToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckToken::None => f.write_str("None"),
            #[cfg(feature = "kafka")]
            AckToken::Kafka { partition, offset } => write!(f, "Kafka({partition}@{offset})"),
            #[cfg(feature = "nats")]
            AckToken::Nats(m) => write!(f, "Nats({})", m.subject),
        }
    }
}

/// An opened source: its messages, and the committer that acknowledges them.
pub struct Source {
    /// The messages, in the source's order; an `Err` ends the stream.
    pub messages: BoxStream<'static, Result<Message, ConnectError>>,
    /// Acknowledges messages whose outcomes are written.
    pub committer: Committer,
    /// The input's size in bytes, when known (a file), for progress.
    pub size: Option<u64>,
    /// Ends `messages` early (a graceful stop); a NATS source first hands back what it
    /// has pulled but not yet yielded.
    pub stopper: Stopper,
}

/// Ends a source's stream: what was yielded is finished by the pipeline, what was not
/// is left to the broker (Kafka: uncommitted; NATS: nak'ed for redelivery at once).
#[derive(Clone)]
pub struct Stopper(std::sync::Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Stopper {
    fn default() -> Self {
        Stopper(std::sync::Arc::new(tokio::sync::watch::channel(false).0))
    }
}

impl Stopper {
    /// Stops the source: its stream ends after the next message at most.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once [`Stopper::stop`] was called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Whether [`Stopper::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }
}

/// A record that a sink refused for itself (too large for the broker, rejected as
/// invalid): writing it again would fail again, so it goes to the dead letter instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its index in the records handed to [`Sink::write`].
    pub index: usize,
    /// Why, as the sink said it.
    pub reason: String,
}

impl Source {
    /// Opens a source. `capacity`: the records the pipeline keeps in flight (NATS's
    /// default `max_ack_pending` follows from it); `patience`: how long a broker that
    /// cannot be reached is waited for.
    pub async fn open(
        config: &SourceConfig,
        capacity: usize,
        patience: Patience,
    ) -> Result<Source, ConnectError> {
        let source = match config {
            SourceConfig::File { path } => lines::file_source(path).await,
            SourceConfig::Stdin => Ok(lines::stdin_source()),
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(k) => kafka::source(k, patience),
            #[cfg(feature = "nats")]
            SourceConfig::Nats(n) => return nats::source(n, capacity, patience).await,
            #[allow(unreachable_patterns)]
            other => {
                let _ = (capacity, patience);
                Err(ConnectError::Unsupported(format!(
                    "source kind `{}` needs flumen built with the `{}` feature",
                    other.kind(),
                    other.kind()
                )))
            }
        };
        source.map(Source::stoppable)
    }

    /// A source over bytes in memory (JSONL), such as `flumen demo`'s built-in sample.
    pub fn from_bytes(bytes: &'static [u8]) -> Source {
        lines::bytes_source(bytes).stoppable()
    }

    /// Ends the stream when its stopper is stopped (sources with nothing to hand back).
    fn stoppable(mut self) -> Source {
        use futures::StreamExt;
        let stopped = self.stopper.stopped();
        self.messages = self.messages.take_until(Box::pin(stopped)).boxed();
        self
    }
}

/// Acknowledges delivered messages once their outcomes are written.
pub struct Committer {
    inner: CommitterKind,
}

enum CommitterKind {
    None,
    #[cfg(feature = "kafka")]
    Kafka(kafka::KafkaCommitter),
    #[cfg(feature = "nats")]
    Nats,
}

impl Committer {
    fn none() -> Committer {
        Committer {
            inner: CommitterKind::None,
        }
    }

    /// The outcomes of these messages are durably written: acknowledge them.
    pub async fn done(&mut self, tokens: Vec<AckToken>) -> Result<(), ConnectError> {
        match &mut self.inner {
            CommitterKind::None => {
                drop(tokens);
                Ok(())
            }
            #[cfg(feature = "kafka")]
            CommitterKind::Kafka(k) => {
                k.done(tokens);
                Ok(())
            }
            #[cfg(feature = "nats")]
            CommitterKind::Nats => nats::ack(tokens).await,
        }
    }

    /// Writing these messages' outcomes failed: NATS messages are nak'ed with `delay`
    /// so the server redelivers them then (to this or another worker); Kafka offsets
    /// simply stay uncommitted.
    pub async fn failed(&mut self, tokens: Vec<AckToken>, delay: std::time::Duration) {
        match &mut self.inner {
            #[cfg(feature = "nats")]
            CommitterKind::Nats => nats::nak(tokens, delay).await,
            _ => drop((tokens, delay)),
        }
    }

    /// Whether acknowledging means something to the source (Kafka, NATS): then what
    /// a sink wrote must survive a crash of the machine before it is acknowledged
    /// (see [`Sink::syncing`]).
    pub fn acknowledges(&self) -> bool {
        !matches!(self.inner, CommitterKind::None)
    }

    /// Commits what is committable now, and waits for it (at the end of a run).
    pub async fn close(self) -> Result<(), ConnectError> {
        match self.inner {
            CommitterKind::None => Ok(()),
            #[cfg(feature = "kafka")]
            CommitterKind::Kafka(k) => k.close().await,
            #[cfg(feature = "nats")]
            CommitterKind::Nats => Ok(()),
        }
    }
}

/// One record for a sink.
#[derive(Debug, Clone)]
pub struct SinkRecord {
    /// The key (Kafka's message key; ignored by other sinks).
    pub key: Option<Vec<u8>>,
    /// One JSON document, without a trailing newline.
    pub payload: Vec<u8>,
}

/// Where outcomes go.
pub struct Sink {
    inner: SinkKind,
}

enum SinkKind {
    Lines(lines::LinesSink),
    #[cfg(feature = "kafka")]
    Kafka(kafka::KafkaSink),
    #[cfg(feature = "nats")]
    Nats(nats::NatsSink),
}

impl Sink {
    /// Opens a sink. `role` names it in logs and metrics (`sink`, `dead_letter`);
    /// `default_mode`: how a file sink without its own `mode` opens its file;
    /// `patience`: how long a broker that cannot be reached is waited for.
    pub async fn open(
        config: &SinkConfig,
        role: &'static str,
        default_mode: FileMode,
        patience: Patience,
    ) -> Result<Sink, ConnectError> {
        let inner = match config {
            SinkConfig::File { path, mode } => {
                SinkKind::Lines(lines::LinesSink::file(path, mode.unwrap_or(default_mode)).await?)
            }
            SinkConfig::Stdout => SinkKind::Lines(lines::LinesSink::stdout()),
            #[cfg(feature = "kafka")]
            SinkConfig::Kafka(k) => SinkKind::Kafka(kafka::KafkaSink::new(k, role, patience)?),
            #[cfg(feature = "nats")]
            SinkConfig::Nats(n) => {
                SinkKind::Nats(nats::NatsSink::connect(n, role, patience).await?)
            }
            #[allow(unreachable_patterns)]
            other => {
                let _ = (role, patience);
                return Err(ConnectError::Unsupported(format!(
                    "sink kind `{}` needs flumen built with the `{}` feature",
                    other.kind(),
                    other.kind()
                )));
            }
        };
        Ok(Sink { inner })
    }

    /// With `on`, a file sink also asks the disk to keep every write (`fdatasync`)
    /// before [`Sink::write`] returns, so an acknowledged record's outcome survives a
    /// power loss, not only a crash of the process. Other sinks are durable on
    /// their own (stdout is the reader's business; brokers acknowledge).
    pub fn syncing(mut self, on: bool) -> Sink {
        #[allow(irrefutable_let_patterns)] // the only kind without the broker features
        if let SinkKind::Lines(s) = &mut self.inner {
            s.sync = on && s.file.is_some();
        }
        self
    }

    /// Writes records; when this returns `Ok` they are durable (flushed — and
    /// synced to disk, see [`Sink::syncing`] — or acknowledged by the broker), except
    /// those it lists as [`Refused`]: the broker will never take them. A broker that
    /// cannot be reached is waited for (the `patience` given to [`Sink::open`]); an
    /// `Err` means the wait ran out, or the sink cannot be written at all.
    pub async fn write(&mut self, records: Vec<SinkRecord>) -> Result<Vec<Refused>, ConnectError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        match &mut self.inner {
            SinkKind::Lines(s) => s.write(records).await.map(|()| Vec::new()),
            #[cfg(feature = "kafka")]
            SinkKind::Kafka(s) => s.write(records).await,
            #[cfg(feature = "nats")]
            SinkKind::Nats(s) => s.write(records).await,
        }
    }
}
