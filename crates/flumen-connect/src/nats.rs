//! NATS JetStream: a durable pull consumer with explicit acks (sent once the outcome
//! is written; `max_ack_pending` is the pipeline's capacity, so a slow pipeline slows
//! the server's deliveries), and a publisher that awaits every acknowledgement.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use futures::StreamExt;

use crate::config::{NatsSink as SinkConfig, NatsSource as SourceConfig};
use crate::{AckToken, Committer, CommitterKind, ConnectError, Message, SinkRecord, Source};

pub(crate) async fn source(config: &SourceConfig, capacity: usize) -> Result<Source, ConnectError> {
    let fail = |e: String| ConnectError::Source(format!("nats {}: {e}", config.url));
    let client = async_nats::connect(&config.url)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&config.stream)
        .await
        .map_err(|e| fail(format!("stream {}: {e}", config.stream)))?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &config.consumer,
            pull::Config {
                durable_name: Some(config.consumer.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(config.ack_wait_s.unwrap_or(30)),
                max_ack_pending: capacity.max(1) as i64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| fail(format!("consumer {}: {e}", config.consumer)))?;
    let messages = consumer.messages().await.map_err(|e| fail(e.to_string()))?;
    let name = config.stream.clone();
    let messages = messages.map(move |m| match m {
        Ok(m) => {
            let position = m
                .info()
                .map(|i| format!("{name} seq {}", i.stream_sequence))
                .unwrap_or_else(|_| format!("{name} {}", m.subject));
            Ok(Message {
                payload: m.payload.to_vec(),
                position,
                partition: 0,
                key: None,
                token: AckToken::Nats(Box::new(m)),
            })
        }
        Err(e) => Err(ConnectError::Source(format!("nats {name}: {e}"))),
    });
    Ok(Source {
        messages: messages.boxed(),
        committer: Committer {
            inner: CommitterKind::Nats,
        },
        size: None,
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
}

impl NatsSink {
    pub async fn connect(config: &SinkConfig) -> Result<NatsSink, ConnectError> {
        let client = async_nats::connect(&config.url)
            .await
            .map_err(|e| ConnectError::Sink(format!("nats {}: {e}", config.url)))?;
        Ok(NatsSink {
            js: jetstream::new(client),
            subject: config.subject.clone(),
        })
    }

    pub async fn write(&mut self, records: Vec<SinkRecord>) -> Result<(), ConnectError> {
        let fail = |e: String| ConnectError::Sink(format!("nats {}: {e}", self.subject));
        let mut acks = Vec::with_capacity(records.len());
        for r in records {
            acks.push(
                self.js
                    .publish(self.subject.clone(), r.payload.into())
                    .await
                    .map_err(|e| fail(e.to_string()))?,
            );
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack.map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    }
}
