//! What a handler returns when it does not accept an event.

use crate::wit::types::HandleError;
use std::fmt::Display;

/// The result of handling one event: `Ok(())` applies the call's effects.
pub type Outcome = Result<(), HandlerError>;

/// Why a handler did not accept an event. Either way, the call's state writes, cache
/// writes and emits are discarded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A transient problem: the runtime retries the event with exponential backoff up
    /// to the plugin's retry limit, then dead-letters it with this reason.
    #[error("retry: {0}")]
    Retry(String),
    /// The event can never be handled: it is dead-lettered at once with this reason.
    #[error("reject: {0}")]
    Reject(String),
}

impl HandlerError {
    /// A transient failure: try the event again later.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry(reason.into())
    }

    /// A permanent failure: send the event to the dead-letter topic now.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject(reason.into())
    }

    /// The reason given, without the retry/reject prefix.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retry(r) | Self::Reject(r) => r,
        }
    }

    /// Whether the runtime will retry the event.
    pub fn is_retry(&self) -> bool {
        matches!(self, Self::Retry(_))
    }

    /// Whether the event goes to the dead-letter topic at once.
    pub fn is_reject(&self) -> bool {
        matches!(self, Self::Reject(_))
    }
}

/// Bad JSON can never become good on retry, so it rejects.
impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        Self::Reject(format!("invalid JSON: {e}"))
    }
}

/// Bytes that are not UTF-8 will not become UTF-8 on retry, so they reject.
impl From<std::str::Utf8Error> for HandlerError {
    fn from(e: std::str::Utf8Error) -> Self {
        Self::Reject(format!("invalid UTF-8: {e}"))
    }
}

/// Bytes that are not UTF-8 will not become UTF-8 on retry, so they reject.
impl From<std::string::FromUtf8Error> for HandlerError {
    fn from(e: std::string::FromUtf8Error) -> Self {
        Self::Reject(format!("invalid UTF-8: {e}"))
    }
}

impl From<HandlerError> for HandleError {
    fn from(e: HandlerError) -> Self {
        match e {
            HandlerError::Retry(r) => HandleError::Retry(r),
            HandlerError::Reject(r) => HandleError::Reject(r),
        }
    }
}

/// Turn any error or missing value into a [`HandlerError`] with context, e.g.
/// `order.amount.checked_add(x).or_reject("amount overflows")?`.
pub trait ResultExt<T> {
    /// Reject the event, with `context` and the underlying error as the reason.
    fn or_reject(self, context: impl Display) -> Result<T, HandlerError>;
    /// Retry the event, with `context` and the underlying error as the reason.
    fn or_retry(self, context: impl Display) -> Result<T, HandlerError>;
}

impl<T, E: Display> ResultExt<T> for Result<T, E> {
    fn or_reject(self, context: impl Display) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::Reject(format!("{context}: {e}")))
    }

    fn or_retry(self, context: impl Display) -> Result<T, HandlerError> {
        self.map_err(|e| HandlerError::Retry(format!("{context}: {e}")))
    }
}

impl<T> ResultExt<T> for Option<T> {
    fn or_reject(self, context: impl Display) -> Result<T, HandlerError> {
        self.ok_or_else(|| HandlerError::Reject(context.to_string()))
    }

    fn or_retry(self, context: impl Display) -> Result<T, HandlerError> {
        self.ok_or_else(|| HandlerError::Retry(context.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn json_errors_reject_with_serdes_reason() {
        let e: HandlerError = serde_json::from_str::<u32>("\"x\"")
            .map_err(HandlerError::from)
            .unwrap_err();
        assert!(e.is_reject());
        assert!(e.reason().starts_with("invalid JSON: invalid type"), "{e}");
    }

    #[test]
    fn lowers_to_the_wit_variant() {
        assert!(matches!(
            HandleError::from(HandlerError::retry("later")),
            HandleError::Retry(r) if r == "later"
        ));
        assert!(matches!(
            HandleError::from(HandlerError::reject("never")),
            HandleError::Reject(r) if r == "never"
        ));
    }

    #[test]
    fn context_helpers() {
        let e = "x".parse::<u8>().or_reject("bad count").unwrap_err();
        assert_eq!(e.reason(), "bad count: invalid digit found in string");
        let e = None::<u8>.or_retry("not ready").unwrap_err();
        assert_eq!(e, HandlerError::retry("not ready"));
    }
}
