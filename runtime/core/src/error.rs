//! The error every backend call returns.

/// A failure of a backing service. Never shown to a guest: the host aborts the call and
/// the dispatcher retries the event without counting it against the plugin's retry limit.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The service could not be reached or did not answer in time; retrying may help.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The request was refused as invalid (bad topic name, value too large, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A topic that does not exist and will not be created.
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl BackendError {
    /// An [`BackendError::Unavailable`] from any displayable error.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Result type of backend calls.
pub type BackendResult<T> = Result<T, BackendError>;
