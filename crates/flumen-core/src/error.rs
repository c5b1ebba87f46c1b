use std::fmt;
use std::time::Duration;

/// The class of an error, shared by the whole engine.
///
/// Every backend maps its protocol's errors into one of these; the engine decides
/// what to do (shrink concurrency, retry, fail the record) from the kind alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The backend is overloaded (HTTP 429, 503 "queue full", gRPC
    /// `RESOURCE_EXHAUSTED`). Shrinks concurrency; it is not a failure of the backend.
    Overloaded,
    /// May succeed if tried again (connection reset, 5xx, gRPC `UNAVAILABLE`).
    Transient,
    /// The record's deadline (or an attempt's timeout) passed before a result came.
    Timeout,
    /// Will not succeed if tried again (other 4xx, unparseable model output).
    Permanent,
    /// The record itself is bad (malformed, missing field, too large for any batch).
    InvalidInput,
    /// The engine stopped before the record could complete.
    Shutdown,
    /// A spending budget (tokens or money) is spent for its period, and the record
    /// was not sent (with `on_exhausted = "fail"`; with `"wait"` it waits for the next
    /// period within its deadline instead).
    BudgetExhausted,
    /// The backend answered, but the answer is not what was asked for: a language
    /// model's reply that does not parse or does not match the pipeline's JSON
    /// Schema, after its repair attempt. Not retried as is, and not moved to a
    /// fallback (the prompt would be the same there).
    InvalidOutput,
}

impl ErrorKind {
    /// Every kind, in a stable order (for metrics labels and reports).
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Overloaded,
        ErrorKind::Transient,
        ErrorKind::Timeout,
        ErrorKind::Permanent,
        ErrorKind::InvalidInput,
        ErrorKind::Shutdown,
        ErrorKind::BudgetExhausted,
        ErrorKind::InvalidOutput,
    ];

    /// A short snake_case name, stable for logs, metrics labels and dead-letter records.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Transient => "transient",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Permanent => "permanent",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::BudgetExhausted => "budget_exhausted",
            ErrorKind::InvalidOutput => "invalid_output",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned by a backend, for a whole batch or for one item of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct BackendError {
    /// What class of error this is.
    pub kind: ErrorKind,
    /// A human-readable message. Never contains secrets.
    pub message: String,
    /// How long the backend asked us to wait before calling again (`Retry-After`,
    /// `grpc-retry-pushback-ms`), when it said.
    pub retry_after: Option<Duration>,
}

impl BackendError {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// An overload error, optionally with the wait the backend asked for.
    pub fn overloaded(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        BackendError {
            retry_after,
            ..BackendError::new(ErrorKind::Overloaded, message)
        }
    }

    /// A transient error.
    pub fn transient(message: impl Into<String>) -> Self {
        BackendError::new(ErrorKind::Transient, message)
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        BackendError::new(ErrorKind::Permanent, message)
    }

    /// The record itself is invalid.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        BackendError::new(ErrorKind::InvalidInput, message)
    }

    /// The answer is not what was asked for (see [`ErrorKind::InvalidOutput`]).
    pub fn invalid_output(message: impl Into<String>) -> Self {
        BackendError::new(ErrorKind::InvalidOutput, message)
    }
}

/// The explicit failure outcome of one record: why, and how many backend calls it took part in.
///
/// A record that fails is never dropped: it yields exactly one `Failure`, which a
/// pipeline can write to a dead-letter output together with the original record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} after {attempts} attempt(s): {message}")]
pub struct Failure {
    /// What class of failure this is.
    pub kind: ErrorKind,
    /// A human-readable reason.
    pub message: String,
    /// How many backend calls this record was part of (0 when it never reached the backend).
    pub attempts: u32,
}

impl Failure {
    /// A failure of `kind` after `attempts` backend calls.
    pub fn new(kind: ErrorKind, message: impl Into<String>, attempts: u32) -> Self {
        Failure {
            kind,
            message: message.into(),
            attempts,
        }
    }

    /// The failure a backend error becomes after `attempts` calls.
    pub fn from_backend(error: BackendError, attempts: u32) -> Self {
        Failure::new(error.kind, error.message, attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_distinct_stable_names() {
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        assert_eq!(ErrorKind::InvalidInput.to_string(), "invalid_input");
    }

    #[test]
    fn failure_displays_kind_attempts_and_reason() {
        let f = Failure::from_backend(BackendError::transient("connection reset"), 2);
        assert_eq!(
            f.to_string(),
            "transient after 2 attempt(s): connection reset"
        );
    }
}
