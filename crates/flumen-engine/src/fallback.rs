use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flumen_core::{Backend, ErrorKind, Failure};
use tokio::time::Instant;

use crate::Engine;

/// Which stage produced an outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Served {
    /// The operator's own engine.
    #[default]
    Primary,
    /// The fallback stage at this index of the chain.
    Fallback(usize),
}

/// The future of one fallback attempt.
pub type StageFuture<O> = Pin<Box<dyn Future<Output = Result<O, Failure>> + Send>>;

/// Something that can answer for a record whose primary backend failed.
pub trait FallbackStage<I, O>: Send + Sync {
    /// A short name for metrics and failure messages.
    fn name(&self) -> &str;
    /// Answers for `input`, within `deadline`.
    fn run(&self, input: I, deadline: Instant) -> StageFuture<O>;
}

impl<B: Backend> FallbackStage<B::Input, B::Output> for Engine<B> {
    fn name(&self) -> &str {
        Engine::name(self)
    }

    fn run(&self, input: B::Input, deadline: Instant) -> StageFuture<B::Output> {
        Box::pin(self.submit(input, Some(deadline)))
    }
}

struct StaticValue<O> {
    value: O,
}

impl<I, O: Clone + Send + Sync + 'static> FallbackStage<I, O> for StaticValue<O> {
    fn name(&self) -> &str {
        "default_value"
    }

    fn run(&self, _input: I, _deadline: Instant) -> StageFuture<O> {
        let value = self.value.clone();
        Box::pin(async move { Ok(value) })
    }
}

/// One stage of an operator's fallback chain, with its own timeout.
///
/// A record whose primary outcome is a failure (other than invalid input: a bad
/// record is dead-lettered, not masked) goes through the stages in order; the first
/// success is its outcome. When every stage fails, the record fails with the
/// primary failure, its message extended by each stage's reason: the dead letter.
pub struct Fallback<I, O> {
    pub(crate) stage: Arc<dyn FallbackStage<I, O>>,
    pub(crate) timeout: Duration,
}

impl<I, O> Clone for Fallback<I, O> {
    fn clone(&self) -> Self {
        Fallback {
            stage: Arc::clone(&self.stage),
            timeout: self.timeout,
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Fallback<I, O> {
    /// Another engine (another backend, or the same backend with other settings).
    pub fn engine<B>(engine: &Engine<B>, timeout: Duration) -> Self
    where
        B: Backend<Input = I, Output = O>,
    {
        Fallback {
            stage: Arc::new(engine.clone()),
            timeout,
        }
    }

    /// A static default value (Flink ML_PREDICT's `default-value`).
    pub fn value(value: O) -> Self
    where
        O: Clone + Sync,
    {
        Fallback {
            stage: Arc::new(StaticValue { value }),
            timeout: Duration::from_secs(1),
        }
    }

    /// Any custom stage.
    pub fn stage(stage: Arc<dyn FallbackStage<I, O>>, timeout: Duration) -> Self {
        Fallback { stage, timeout }
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        self.stage.name()
    }

    /// Runs the stage for `input`, failing with a timeout after the stage's timeout.
    pub(crate) fn run(&self, input: I) -> StageFuture<O> {
        let deadline = Instant::now() + self.timeout;
        let run = self.stage.run(input, deadline);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, run).await {
                Ok(result) => result,
                Err(_) => Err(Failure::new(
                    ErrorKind::Timeout,
                    format!("fallback stage timed out after {} ms", timeout.as_millis()),
                    0,
                )),
            }
        })
    }
}
