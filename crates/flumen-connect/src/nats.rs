//! NATS JetStream: a durable pull consumer with explicit acks, sent once the outcome
//! is written. Messages are pulled a batch at a time, only when the pipeline asks for
//! more, so a worker holds at most its pipeline plus one batch; on a graceful stop the
//! batch's unstarted messages are nak'ed, and the server hands them to another worker
//! at once instead of after `ack_wait`. `max_ack_pending` defaults to
//! `capacity × (workers + 1)`. The publisher awaits every acknowledgement. A server
//! that cannot be reached is waited out (see [`crate::Patience`]); the client
//! reconnects by itself.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use futures::StreamExt;

use crate::config::{NatsSink as SinkConfig, NatsSource as SourceConfig};
use crate::outage::{deliver, Outage, Patience, Sent};
use crate::{
    AckToken, Committer, CommitterKind, ConnectError, Message, Refused, SinkRecord, Source, Stopper,
};

/// How long one pull request waits for messages on an idle stream.
const EXPIRES: Duration = Duration::from_secs(1);

/// Server URLs as logs show them: credentials (`nats://user:secret@host`,
/// `token@host`) hidden, in each of a comma-separated list.
fn shown(urls: &str) -> String {
    urls.split(',')
        .map(|url| match url.rsplit_once('@') {
            Some((before, host)) => match before.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***@{host}"),
                None => format!("***@{host}"),
            },
            None => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects, waiting out a server that cannot be reached (within `patience`).
async fn connect(
    url: &str,
    role: &'static str,
    patience: Patience,
) -> Result<async_nats::Client, String> {
    let what = format!("nats {}", shown(url));
    let mut outage: Option<Outage> = None;
    loop {
        match async_nats::connect(url).await {
            Ok(client) => {
                if let Some(o) = outage {
                    o.end();
                }
                return Ok(client);
            }
            Err(e) => {
                let e = e.to_string();
                let o =
                    outage.get_or_insert_with(|| Outage::begin(what.clone(), role, patience, &e));
                o.wait(&e).await?;
            }
        }
    }
}

/// After an error on an established client: if it is disconnected, waits until it
/// has reconnected (within `patience`); otherwise reports the error once in a while
/// and pauses briefly.
async fn wait_for_server(
    client: &async_nats::Client,
    what: &str,
    role: &'static str,
    patience: Patience,
    error: &str,
    quiet_until: &mut Option<tokio::time::Instant>,
) -> Result<(), String> {
    if client.connection_state() == State::Connected {
        let now = tokio::time::Instant::now();
        if quiet_until.is_none_or(|t| now >= t) {
            tracing::warn!("{what} ({role}): {error}; the server answers, going on");
            *quiet_until = Some(now + Duration::from_secs(10));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Ok(());
    }
    let mut outage = Outage::begin(what.to_owned(), role, patience, error);
    while client.connection_state() != State::Connected {
        outage
            .wait(&format!(
                "{error} (connection {:?})",
                client.connection_state()
            ))
            .await?;
    }
    outage.end();
    Ok(())
}

struct Pulling {
    client: async_nats::Client,
    consumer: jetstream::consumer::PullConsumer,
    batch: Option<pull::Batch>,
    size: usize,
    stopper: Stopper,
    name: String,
    what: String,
    patience: Patience,
    quiet_until: Option<tokio::time::Instant>,
}

impl Pulling {
    /// The next message, or `None` once stopped (after handing back the batch).
    async fn next(&mut self) -> Option<Result<Message, ConnectError>> {
        loop {
            if self.stopper.is_stopped() {
                self.hand_back().await;
                return None;
            }
            let Some(batch) = self.batch.as_mut() else {
                let request = self
                    .consumer
                    .batch()
                    .max_messages(self.size)
                    .expires(EXPIRES)
                    .messages()
                    .await;
                match request {
                    Ok(b) => self.batch = Some(b),
                    Err(e) => {
                        if let Err(e) = self.wait(&e.to_string()).await {
                            return Some(Err(e));
                        }
                    }
                }
                continue;
            };
            let stopped = self.stopper.stopped();
            let got = tokio::select! {
                _ = stopped => continue,
                got = tokio::time::timeout(EXPIRES + Duration::from_secs(5), batch.next()) => got,
            };
            match got {
                // The batch is complete, expired, or its answer was lost.
                Err(_) | Ok(None) => self.batch = None,
                Ok(Some(Ok(m))) => return Some(Ok(self.message(m))),
                Ok(Some(Err(e))) => {
                    self.batch = None;
                    if let Err(e) = self.wait(&e.to_string()).await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// Waits for the server (or a stop: then the loop hands back and ends).
    async fn wait(&mut self, error: &str) -> Result<(), ConnectError> {
        let stopped = self.stopper.stopped();
        let waited = wait_for_server(
            &self.client,
            &self.what,
            "source",
            self.patience,
            error,
            &mut self.quiet_until,
        );
        tokio::select! {
            waited = waited => waited.map_err(ConnectError::Source),
            _ = stopped => Ok(()),
        }
    }

    fn message(&self, m: jetstream::Message) -> Message {
        let position = m
            .info()
            .map(|i| format!("{} seq {}", self.name, i.stream_sequence))
            .unwrap_or_else(|_| format!("{} {}", self.name, m.subject));
        Message {
            payload: m.payload.to_vec(),
            position,
            partition: 0,
            key: None,
            token: AckToken::Nats(Box::new(m)),
        }
    }

    /// Naks what the current batch holds or still brings (bounded by its expiry), so
    /// the server redelivers it at once, to this durable's other workers.
    async fn hand_back(&mut self) {
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        let mut n = 0;
        while let Ok(Some(m)) = tokio::time::timeout(EXPIRES, batch.next()).await {
            if let Ok(m) = m {
                if m.ack_with(jetstream::AckKind::Nak(None)).await.is_ok() {
                    n += 1;
                }
            }
        }
        // Sent before the process exits (not waited for past 2 s: without a server the
        // messages come back after ack_wait anyway).
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        if n > 0 {
            tracing::info!(
                "{}: handed back {n} messages not started, for redelivery now",
                self.what
            );
        }
    }
}

pub(crate) async fn source(
    config: &SourceConfig,
    capacity: usize,
    patience: Patience,
) -> Result<Source, ConnectError> {
    let what = format!("nats {}", shown(&config.url));
    let fail = |e: String| ConnectError::Source(format!("{what}: {e}"));
    let client = connect(&config.url, "source", patience)
        .await
        .map_err(ConnectError::Source)?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| fail(format!("stream {}: {e}", config.stream)))?;
    let capacity = capacity.max(1);
    let max_ack_pending = config
        .max_ack_pending
        .unwrap_or((capacity * (config.workers.unwrap_or(1) + 1)) as i64);
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &config.consumer,
            pull::Config {
                durable_name: Some(config.consumer.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(config.ack_wait_s.unwrap_or(30)),
                max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| fail(format!("consumer {}: {e}", config.consumer)))?;
    let stopper = Stopper::default();
    let state = Pulling {
        client,
        consumer,
        batch: None,
        size: capacity.min(256),
        stopper: stopper.clone(),
        name: config.stream.clone(),
        what,
        patience,
        quiet_until: None,
    };
    let messages = futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        match state.next().await? {
            Ok(m) => Some((Ok(m), Some(state))),
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(Source {
        messages: messages.boxed(),
        committer: Committer {
            inner: CommitterKind::Nats,
        },
        size: None,
        stopper,
    })
}

pub(crate) async fn ack(tokens: Vec<AckToken>) -> Result<(), ConnectError> {
    for token in tokens {
        if let AckToken::Nats(m) = token {
            m.ack()
                .await
                .map_err(|e| ConnectError::Commit(format!("nats ack: {e}")))?;
        }
    }
    Ok(())
}

pub(crate) async fn nak(tokens: Vec<AckToken>, delay: Duration) {
    for token in tokens {
        if let AckToken::Nats(m) = token {
            // Best effort: without it, the message comes back after ack_wait anyway.
            let _ = m.ack_with(jetstream::AckKind::Nak(Some(delay))).await;
        }
    }
}

pub(crate) struct NatsSink {
    js: jetstream::Context,
    subject: String,
    what: String,
    role: &'static str,
    patience: Patience,
}

/// Whether the server will never take this message, however often it is sent.
fn refuses(kind: jetstream::context::PublishErrorKind) -> bool {
    matches!(
        kind,
        jetstream::context::PublishErrorKind::MaxPayloadExceeded
    )
}

impl NatsSink {
    pub async fn connect(
        config: &SinkConfig,
        role: &'static str,
        patience: Patience,
    ) -> Result<NatsSink, ConnectError> {
        let client = connect(&config.url, role, patience)
            .await
            .map_err(ConnectError::Sink)?;
        Ok(NatsSink {
            js: jetstream::new(client),
            subject: config.subject.clone(),
            what: format!("nats {}", shown(&config.url)),
            role,
            patience,
        })
    }

    /// Publishes, awaiting every acknowledgement; what failed for want of the server
    /// (a timeout, a lost connection, no stream yet) is published again once it is back.
    pub async fn write(&mut self, records: Vec<SinkRecord>) -> Result<Vec<Refused>, ConnectError> {
        let (js, subject, what) = (&self.js, &self.subject, &self.what);
        let refused =
            |e: &dyn std::fmt::Display| Sent::Refused(format!("{what} subject {subject}: {e}"));
        let send = async |pending: &[usize]| {
            // Publish all, then await the acknowledgements together.
            let mut sent: Vec<Option<Sent>> = Vec::with_capacity(pending.len());
            let mut acks = Vec::new();
            for &i in pending {
                match js
                    .publish(subject.clone(), records[i].payload.clone().into())
                    .await
                {
                    Ok(ack) => {
                        acks.push((sent.len(), ack));
                        sent.push(None);
                    }
                    Err(e) if refuses(e.kind()) => sent.push(Some(refused(&e))),
                    Err(e) => sent.push(Some(Sent::Failed(format!("subject {subject}: {e}")))),
                }
            }
            let (slots, acks): (Vec<usize>, Vec<_>) = acks.into_iter().unzip();
            let answers = futures::future::join_all(
                acks.into_iter().map(std::future::IntoFuture::into_future),
            )
            .await;
            for (slot, answer) in slots.into_iter().zip(answers) {
                sent[slot] = Some(match answer {
                    Ok(_) => Sent::Taken,
                    Err(e) if refuses(e.kind()) => refused(&e),
                    Err(e) => Sent::Failed(format!("subject {subject}: {e}")),
                });
            }
            sent.into_iter()
                .map(|s| s.expect("every slot answered"))
                .collect()
        };
        deliver(records.len(), what, self.role, self.patience, send)
            .await
            .map_err(ConnectError::Sink)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_a_url_are_never_shown() {
        assert_eq!(
            super::shown("nats://user:s3cret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(super::shown("tls://token@host:4222"), "tls://***@host:4222");
        assert_eq!(
            super::shown("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(super::shown("user:pw@host:4222"), "***@host:4222");
        assert_eq!(
            super::shown("nats://a:1,nats://u:p@b:2"),
            "nats://a:1,nats://***@b:2"
        );
    }
}
